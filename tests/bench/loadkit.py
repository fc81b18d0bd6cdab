"""What the two load generators (loadgen.py: USSD, sms_loadgen.py: SMS) share.

The request budget, the timing and recording of every request, the racing provider retry,
the citizen's choices, the warm-up and measured window with its CPU marks, the result
figures and the command line. Also the CPU accounting from /proc, which the bench drivers
use for their own windows. Only loopback URLs are accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp

from gateway.interview.questionnaire import Question

HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}
NETWORK = "62001"  # MTN Ghana
MAX_REQUESTS = 5_000_000
IMPROVE = ("Fewer queues at the clinic", "Open the ID office on Saturdays",
           "Cheaper school uniforms", "More nurses at night", "Answer the phone")
COMPLETED = "Your answers are recorded"
ALREADY = "already completed"
SERVICES = ("h_used", "p_used", "s_used", "g_used")


@dataclass
class LoadConfig:
    """The options both load generators take (their Config adds its own)."""

    url: str
    mode: str
    connections: int = 32
    warmup: float = 3.0
    duration: float = 20.0
    seed: int = 1662
    phone_base: int = 0  # citizens get +23324 followed by 7 digits from here on
    retry_rate: float = 0.01  # the provider sends the same request twice at once
    typo_rate: float = 0.02  # a wrong key
    traces_in: str = ""  # replay mode: the sequences to replay
    traces_out: str = ""  # where to record the completed sequences
    raw_out: str = ""  # where to write every request as [start s, latency s, ok], if wanted
    max_traces: int = 5000
    timeout: float = 10.0  # per request
    # Processes whose CPU use to report over the measured window (with their children).
    watch: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class Stats:
    starts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    oks: list[bool] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)

    def add(self, start: float, latency: float, ok: bool, status: str, body: str) -> None:
        self.starts.append(start)
        self.latencies.append(latency)
        self.oks.append(ok)
        self.statuses[status] += 1
        if not ok and len(self.error_samples) < 10:
            self.error_samples.append(f"{status}: {body[:120]!r}")

    def sample(self, text: str) -> None:
        """Keep a few error samples, not all: the result file stays small."""
        if len(self.error_samples) < 10:
            self.error_samples.append(text)


class Client:
    """One keep-alive HTTP client shared by all virtual citizens, with a request budget."""

    def __init__(self, session: aiohttp.ClientSession, url: str, stats: Stats,
                 stop_at: float) -> None:
        self.session = session
        self.url = url
        self.stats = stats
        self.stop_at = stop_at
        self.sent = 0

    @property
    def stopping(self) -> bool:
        return time.monotonic() >= self.stop_at or self.sent >= MAX_REQUESTS

    async def send(self, body: str, headers: dict[str, str],
                   judge: Callable[[str, str], tuple[bool, str]]) -> tuple[bool, str]:
        """POST one request, timed and recorded; `judge(status, reply)` says whether the
        answer is right and what the citizen reads of it."""
        self.sent += 1
        start = time.monotonic()
        try:
            async with self.session.post(self.url, data=body, headers=headers) as resp:
                reply = await resp.text()
                status = str(resp.status)
        except (TimeoutError, aiohttp.ClientError) as exc:
            reply, status = type(exc).__name__, "exc"
        latency = time.monotonic() - start
        ok, shown = judge(status, reply)
        self.stats.add(start, latency, ok, status, reply)
        return ok, shown


async def racing_retry(stats: Stats, first: Awaitable[tuple[bool, str]],
                       second: Awaitable[tuple[bool, str]]) -> tuple[bool, str]:
    """The provider gave up waiting and sent the request again while the first is in
    flight: both answers must match; the citizen reads the one that worked."""
    stats.events["provider retries racing the original"] += 1
    (ok, reply), (ok2, again) = await asyncio.gather(first, second)
    if ok and ok2 and again != reply:
        stats.events["retry got a different reply"] += 1
        stats.sample(f"retry differs: {reply!r} / {again!r}")
    if not ok and ok2:
        return ok2, again
    return ok, reply


def phone(number: int) -> str:
    return f"+23324{number % 10_000_000:07d}"


def services_used(rng: random.Random) -> dict[str, bool]:
    """Which services a citizen used in the last 12 months."""
    return {s: rng.random() < 0.5 for s in SERVICES}


def pick(question: Question, rng: random.Random, used: dict[str, bool]) -> int:
    """0-based option index: consent yes, adults only, some services used."""
    if question.name == "consent":
        return 0
    if question.name == "age":
        return rng.randrange(1, len(question.choices))
    if question.name in used:
        return 0 if used[question.name] else rng.choice((1, 1, 1, 2))
    return rng.randrange(len(question.choices))


async def per_connection(cfg: LoadConfig,
                         work: Callable[[random.Random], Awaitable[None]]) -> None:
    """One worker per connection, each with a random generator of its own (seeded, so
    that a run can be repeated)."""
    await asyncio.gather(*(work(random.Random(cfg.seed * 1000 + w))
                           for w in range(cfg.connections)))


async def replay(cfg: LoadConfig, client: Client,
                 play: Callable[[random.Random, str, list[Any]], Awaitable[None]]) -> None:
    """Every connection replays the recorded traces (`cfg.traces_in`) in turn, each with a
    fresh phone number: `play(rng, phone, trace)` sends one, and counts it."""
    traces: list[list[Any]] = json.loads(Path(cfg.traces_in).read_text())
    if not traces:
        raise SystemExit("no traces to replay")
    counter = 0

    async def worker(rng: random.Random) -> None:
        nonlocal counter
        for _ in range(1_000_000):
            if client.stopping:
                return
            counter += 1
            await play(rng, phone(cfg.phone_base + counter), traces[counter % len(traces)])

    await per_connection(cfg, worker)


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


C = TypeVar("C", bound=Client)


async def run_load(cfg: LoadConfig,
                   make_client: Callable[[aiohttp.ClientSession, Stats, float], C],
                   load: Callable[[C], Awaitable[None]], traces: list[Any],
                   timed: bool = True) -> dict[str, Any]:
    """Run `load` with a client, warm-up then the measured window (untimed: until `load`
    is done, at most 10 minutes), and return the window's figures."""
    host = urlsplit(cfg.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load a non-loopback host: {host}")
    stats = Stats()
    begin = time.monotonic()
    measure_from = begin + (cfg.warmup if timed else 0.0)
    stop_at = measure_from + cfg.duration if timed else begin + 600.0
    connector = aiohttp.TCPConnector(limit=cfg.connections, limit_per_host=cfg.connections)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout)
    watch = {name: [p for pid in pids for p in (pid, *children(pid))]
             for name, pids in cfg.watch.items()}
    cpu_marks: dict[str, CpuMark] = {}

    async def mark(at: float, name: str) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        cpu_marks[name] = CpuMark.take(watch)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = make_client(session, stats, stop_at)
        marks = [asyncio.create_task(mark(measure_from, "from")),
                 asyncio.create_task(mark(stop_at, "to"))] if timed else []
        await load(client)
        if marks:
            await asyncio.wait(marks, timeout=2.0)
        for task in marks:
            task.cancel()
    if cfg.traces_out:
        Path(cfg.traces_out).write_text(json.dumps(traces))
    if cfg.raw_out:
        Path(cfg.raw_out).write_text(json.dumps([
            [round(s - begin, 6), round(lat, 6), ok]
            for s, lat, ok in zip(stats.starts, stats.latencies, stats.oks, strict=True)]))
    window = [i for i, s in enumerate(stats.starts) if measure_from <= s < stop_at]
    if not timed:
        window = list(range(len(stats.starts)))
    latencies = sorted(stats.latencies[i] for i in window)
    elapsed = cfg.duration if timed else time.monotonic() - begin
    result: dict[str, Any] = {
        "mode": cfg.mode, "requests": len(window), "seconds": elapsed,
        "rps": len(window) / elapsed if elapsed else 0.0,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p90_ms": _percentile(latencies, 0.90) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "max_ms": (latencies[-1] * 1000) if latencies else float("nan"),
        "errors": sum(1 for i in window if not stats.oks[i]),
        "statuses": dict(stats.statuses), "error_samples": stats.error_samples,
        "events": dict(stats.events), "all_requests": len(stats.starts),
        "traces": len(traces),
    }
    if "from" in cpu_marks and "to" in cpu_marks:
        result["cores"] = cores_used(cpu_marks["from"], cpu_marks["to"])
    return result


def main(argv: list[str], config: Callable[..., LoadConfig],
         run: Callable[[Any], Awaitable[dict[str, Any]]]) -> int:
    """`python SCRIPT CONFIG.json RESULT.json`: a config from the driver, a result for it."""
    if len(argv) != 3:
        print(f"usage: {Path(argv[0]).name} CONFIG.json RESULT.json", file=sys.stderr)
        return 2
    cfg = config(**json.loads(Path(argv[1]).read_text()))
    result = asyncio.run(run(cfg))
    Path(argv[2]).write_text(json.dumps(result))
    return 0


# -- CPU accounting (the drivers use it too) ----------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
    return kids


@dataclass
class CpuMark:
    """CPU seconds spent so far: this process, watched process groups, the whole machine."""

    own: float
    groups: dict[str, float]
    # Whole machine, all cores, in processes (interrupt and softirq time, much of it the
    # loopback network stack, is left out: no process is charged for it).
    busy: float
    wall: float

    @classmethod
    def take(cls, watch: dict[str, list[int]]) -> CpuMark:
        with open("/proc/stat") as fh:
            user, nice, system = (float(v) / _TICK for v in fh.readline().split()[1:4])
        return cls(time.process_time(),
                   {name: sum(_cpu_seconds(p) for p in pids) for name, pids in watch.items()},
                   user + nice + system, time.monotonic())


def cores_used(first: CpuMark, last: CpuMark) -> dict[str, float]:
    """Average cores used between two marks: client, each watched group, everything else."""
    wall = last.wall - first.wall
    if wall <= 0:
        return {}
    used = {"client": (last.own - first.own) / wall}
    for name in first.groups:
        used[name] = (last.groups[name] - first.groups[name]) / wall
    used["other"] = max(0.0, (last.busy - first.busy) / wall - sum(used.values()))
    return used
