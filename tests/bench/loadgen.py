"""Load generator: virtual citizens dial the USSD endpoint over loopback (asyncio + aiohttp).

Run as its own process (`python loadgen.py CONFIG.json RESULT.json`) so that it shares no
GIL with the orchestrator. Modes:

- walk:   citizens walk the shipped questionnaire by reading each screen, with the
          Africa's Talking request shape (cumulative `text`, a new sessionId after every END
          that is not the end of the interview); the request sequences are recorded.
- replay: the recorded sequences are replayed (fresh phones and sessionIds) against an
          endpoint whose replies carry no meaning (the bare Flask app).
- park:   `park` citizens each stop at a random point mid-interview and stay live in Redis.

Every loop is bounded in count and time; only loopback URLs are accepted.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp

from gateway.cli import DEFAULT_SERVICE_CODE, shipped_questionnaire
from gateway.questionnaire import Question
from gateway.render import BACK, MORE, fold

HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}
NETWORK = "62001"  # MTN Ghana
MAX_HOPS_PER_CITIZEN = 400  # a full interview is well under 100 screens
MAX_REQUESTS = 5_000_000
IMPROVE = ("Fewer queues at the clinic", "Open the ID office on Saturdays",
           "Cheaper school uniforms", "More nurses at night", "Answer the phone")
COMPLETED = "Your answers are recorded"
ALREADY = "already completed"


@dataclass
class Config:
    url: str
    mode: str  # walk | replay | park
    connections: int = 32
    warmup: float = 3.0
    duration: float = 20.0
    seed: int = 1662
    phone_base: int = 0  # citizens get +23324 followed by 7 digits from here on
    drop_rate: float = 0.01  # per hop: the network drops the session, the citizen redials
    retry_rate: float = 0.01  # per hop: the provider sends the same request twice at once
    typo_rate: float = 0.02  # per hop: a wrong key
    park: int = 0  # park mode: how many citizens to leave mid-interview
    traces_in: str = ""  # replay mode: the sequences to replay
    traces_out: str = ""  # walk mode: where to record the sequences
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


class Client:
    """One keep-alive HTTP client shared by all virtual citizens, with a request budget."""

    def __init__(self, session: aiohttp.ClientSession, cfg: Config, stats: Stats,
                 stop_at: float) -> None:
        self.session = session
        self.cfg = cfg
        self.stats = stats
        self.stop_at = stop_at
        self.sent = 0

    @property
    def stopping(self) -> bool:
        return time.monotonic() >= self.stop_at or self.sent >= MAX_REQUESTS

    async def post(self, session_id: str, phone: str, text: str) -> tuple[bool, str]:
        body = urlencode({"sessionId": session_id, "serviceCode": DEFAULT_SERVICE_CODE,
                          "phoneNumber": phone, "networkCode": NETWORK, "text": text})
        self.sent += 1
        start = time.monotonic()
        try:
            async with self.session.post(self.cfg.url, data=body, headers=HEADERS) as resp:
                reply = await resp.text()
                status = str(resp.status)
        except (TimeoutError, aiohttp.ClientError) as exc:
            reply, status = type(exc).__name__, "exc"
        latency = time.monotonic() - start
        ok = status == "200" and reply.startswith(("CON ", "END ")) and len(reply) <= 182
        self.stats.add(start, latency, ok, status, reply)
        return ok, reply


def _question(screen: str, by_label: dict[str, Question]) -> Question | None:
    """The question on a screen: its label is the first line, or the second after an
    error line, and may be clipped with '...' to make room."""
    for line in screen.splitlines()[:2]:
        if line in by_label:
            return by_label[line]
        if line.endswith("...") and len(line) > 20:
            for label, question in by_label.items():
                if label.startswith(line[:-3]):
                    return question
    return None


def _session_id(rng: random.Random) -> str:
    # Africa's Talking's shape: ATUid_ and 32 hex digits.
    return f"ATUid_{rng.getrandbits(128):032x}"


def _phone(number: int) -> str:
    return f"+23324{number % 10_000_000:07d}"


class Citizen:
    """Walks the questionnaire by reading each screen, as a person would."""

    def __init__(self, number: int, rng: random.Random, cfg: Config,
                 by_label: dict[str, Question]) -> None:
        self.rng = rng
        self.cfg = cfg
        self.by_label = by_label
        self.phone = _phone(cfg.phone_base + number)
        # Which services this citizen used in the last 12 months.
        self.used = {s: rng.random() < 0.5 for s in ("h_used", "p_used", "s_used", "g_used")}
        self.session_id = ""
        self.session_no = 0
        self.history: list[str] = []
        self.trace: list[tuple[int, str]] = []
        self.picked: dict[str, int] = {}  # one answer per question, however often asked

    def new_session(self) -> None:
        self.session_no += 1
        self.session_id = _session_id(self.rng)
        self.history = []

    def answer(self, screen: str) -> str | None:
        """The next input for this screen; None for a screen we do not recognise."""
        if screen.startswith("Language"):
            return "1"  # English
        if screen.startswith("Welcome back"):
            return "1"  # Continue
        question = _question(screen, self.by_label)
        if question is None:
            return None
        if self.rng.random() < self.cfg.typo_rate:
            return self.rng.choice(("99", "x"))
        if question.type == "text":
            return self.rng.choice(IMPROVE)
        if question.type == "note" or not question.choices:
            return "1"
        index = self.picked.get(question.name)
        if index is None:
            index = self.pick(question)
            self.picked[question.name] = index
        shown = {line.split(" ", 1)[0] for line in screen.splitlines()}
        if str(index + 1) not in shown and MORE in shown:
            return MORE  # the option is on a later page (region)
        if str(index + 1) not in shown and BACK in shown:
            return BACK
        return str(index + 1)

    def pick(self, question: Question) -> int:
        """0-based option index: consent yes, adults only, some services used."""
        if question.name == "consent":
            return 0
        if question.name == "age":
            return self.rng.randrange(1, len(question.choices))
        if question.name in self.used:
            return 0 if self.used[question.name] else self.rng.choice((1, 1, 1, 2))
        return self.rng.randrange(len(question.choices))

    async def hop(self, client: Client, text: str | None) -> tuple[bool, str]:
        if text is None:
            self.new_session()
        else:
            self.history.append(text)
        cumulative = "*".join(self.history)
        self.trace.append((self.session_no, cumulative))
        if self.rng.random() >= self.cfg.retry_rate:
            return await client.post(self.session_id, self.phone, cumulative)
        # The provider gave up waiting and sent the hop again while the first is in flight.
        client.stats.events["provider retries racing the original"] += 1
        self.trace.append((self.session_no, cumulative))
        (ok, reply), (ok2, again) = await asyncio.gather(
            client.post(self.session_id, self.phone, cumulative),
            client.post(self.session_id, self.phone, cumulative))
        if ok and ok2 and again != reply:
            client.stats.events["retry got a different reply"] += 1
            if len(client.stats.error_samples) < 10:
                client.stats.error_samples.append(f"retry differs: {reply!r} / {again!r}")
        if not ok and ok2:
            return ok2, again
        return ok, reply

    async def walk(self, client: Client, stop_after: int | None = None) -> str:
        """Walk until the interview is complete, time is up, or `stop_after` hops."""
        ok, reply = await self.hop(client, None)
        for hops in range(1, MAX_HOPS_PER_CITIZEN):
            if not ok:
                return "error"
            if client.stopping:
                return "cut by the clock"
            if reply.startswith("END "):
                if COMPLETED in reply:
                    return "completed"
                if ALREADY in reply:
                    return "already completed"
                client.stats.events["END, redial (part break or too many typos)"] += 1
                ok, reply = await self.hop(client, None)
                continue
            screen = reply[4:]
            if stop_after is not None and (hops >= stop_after or screen.startswith("Optional")):
                return "parked"
            if self.rng.random() < self.cfg.drop_rate:
                client.stats.events["network drops, redial"] += 1
                ok, reply = await self.hop(client, None)
                continue
            text = self.answer(screen)
            if text is None:
                client.stats.events["unrecognised screens"] += 1
                if len(client.stats.error_samples) < 10:
                    client.stats.error_samples.append(f"unrecognised: {reply[:120]!r}")
                return "error"
            ok, reply = await self.hop(client, text)
        return "too many hops"


async def _walkers(cfg: Config, client: Client, stats: Stats,
                   traces: list[list[tuple[int, str]]]) -> None:
    form = shipped_questionnaire()
    by_label = {fold(q.label(form.default_language)): q for q in form.questions
                if q.type != "calculate"}
    next_number = 0
    lock = asyncio.Lock()

    async def worker(w: int) -> None:
        nonlocal next_number
        rng = random.Random(cfg.seed * 1000 + w)
        for _ in range(1_000_000):
            if client.stopping:
                return
            async with lock:
                number = next_number
                next_number += 1
                if cfg.mode == "park" and number >= cfg.park:
                    return
            citizen = Citizen(number, rng, cfg, by_label)
            stop_after = rng.randint(3, 40) if cfg.mode == "park" else None
            outcome = await citizen.walk(client, stop_after)
            stats.events[f"citizens {outcome}"] += 1
            if outcome == "completed" and len(traces) < cfg.max_traces:
                traces.append(citizen.trace)

    await asyncio.gather(*(worker(w) for w in range(cfg.connections)))


async def _replayers(cfg: Config, client: Client, stats: Stats) -> None:
    traces: list[list[list[Any]]] = json.loads(Path(cfg.traces_in).read_text())
    if not traces:
        raise SystemExit("no traces to replay")
    counter = 0

    async def worker(w: int) -> None:
        nonlocal counter
        rng = random.Random(cfg.seed * 1000 + w)
        for _ in range(1_000_000):
            counter += 1
            trace = traces[counter % len(traces)]
            phone = _phone(cfg.phone_base + counter)
            session_no, session_id = -1, ""
            for number, text in trace:
                if client.stopping:
                    return
                if number != session_no:
                    session_no, session_id = number, _session_id(rng)
                ok, _ = await client.post(session_id, phone, text)
                if not ok:
                    break
            stats.events["sequences replayed"] += 1

    await asyncio.gather(*(worker(w) for w in range(cfg.connections)))


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _children(pid: int) -> list[int]:
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


async def run(cfg: Config) -> dict[str, Any]:
    host = urlsplit(cfg.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load a non-loopback host: {host}")
    stats = Stats()
    traces: list[list[tuple[int, str]]] = []
    timed = cfg.mode != "park"
    begin = time.monotonic()
    measure_from = begin + (cfg.warmup if timed else 0.0)
    stop_at = measure_from + cfg.duration if timed else begin + 600.0
    connector = aiohttp.TCPConnector(limit=cfg.connections, limit_per_host=cfg.connections)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout)
    watch = {name: [p for pid in pids for p in (pid, *_children(pid))]
             for name, pids in cfg.watch.items()}
    cpu_marks: dict[str, CpuMark] = {}

    async def mark(at: float, name: str) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        cpu_marks[name] = CpuMark.take(watch)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = Client(session, cfg, stats, stop_at)
        marks = [asyncio.create_task(mark(measure_from, "from")),
                 asyncio.create_task(mark(stop_at, "to"))] if timed else []
        if cfg.mode == "replay":
            await _replayers(cfg, client, stats)
        else:
            await _walkers(cfg, client, stats, traces)
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
    errors = sum(1 for i in window if not stats.oks[i])
    elapsed = cfg.duration if timed else time.monotonic() - begin
    result: dict[str, Any] = {
        "mode": cfg.mode, "requests": len(window), "seconds": elapsed,
        "rps": len(window) / elapsed if elapsed else 0.0,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p90_ms": _percentile(latencies, 0.90) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "max_ms": (latencies[-1] * 1000) if latencies else float("nan"),
        "errors": errors, "statuses": dict(stats.statuses),
        "error_samples": stats.error_samples, "events": dict(stats.events),
        "all_requests": len(stats.starts),
    }
    if "from" in cpu_marks and "to" in cpu_marks:
        result["cores"] = cores_used(cpu_marks["from"], cpu_marks["to"])
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: loadgen.py CONFIG.json RESULT.json", file=sys.stderr)
        return 2
    cfg = Config(**json.loads(Path(argv[1]).read_text()))
    result = asyncio.run(run(cfg))
    Path(argv[2]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
