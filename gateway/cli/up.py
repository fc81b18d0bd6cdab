"""`civicdial up`: the embedded Redis, one RQ worker and the web app, on one data dir,
supervised: a process that dies is restarted (with backoff) until Ctrl-C, SIGTERM or a
crash loop stops everything.

This command checks the data dir and the port, bootstraps the database and composes the
banner; then it becomes the supervisor (gateway.supervision, by exec: the same process,
without the app's modules in its memory), which starts and watches the processes."""

from __future__ import annotations

import errno
import fcntl
import shlex
import signal
import socket

import click

from gateway.cli.context import settings_of
from gateway.config import Settings
from gateway.coordination.bootstrap import bootstrap
from gateway.coordination.channels import channel_urls
from gateway.logformat import configure_logging
from gateway.store.db import make_engine
from gateway.supervision import Plan, hand_over, interrupt


def demo_curl(url: str, address: str, text: str = "") -> str:
    return (f"curl -s -X POST {url} --data-urlencode sessionId=demo-$RANDOM "
            f"--data-urlencode {shlex.quote('serviceCode=' + address)} "
            f"--data-urlencode phoneNumber=+233241234567 --data-urlencode networkCode=62001 "
            f"--data-urlencode text={shlex.quote(text)}")


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


# (web workers, threads per worker) per --profile. The edge's come from the one-core bench
# (tests/bench/README.md, "An edge on one small core").
PROFILES = {"default": (2, 4), "edge": (1, 4)}


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--web-workers", default=None, type=int,
              help="gunicorn worker processes [2; --profile edge: 1].")
@click.option("--profile", type=click.Choice(sorted(PROFILES)), default="default",
              show_default=True,
              help="edge: the offline field kit on one small core (fewer web workers).")
@click.pass_context
def up(ctx: click.Context, host: str, port: int, web_workers: int | None,
       profile: str) -> None:
    """Run everything: web app, one RQ worker, embedded Redis and SQLite."""
    web_workers, threads = web_workers or PROFILES[profile][0], PROFILES[profile][1]
    settings = settings_of(ctx, create=True)
    configure_logging(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Two `up`s on one data dir would share (and then stop) one embedded Redis. The lock is
    # held by the supervisor this process becomes, until it exits.
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
    # Stopped while bootstrapping: as the supervisor stops (nothing is running yet).
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        hand_over(_plan(ctx, settings, host, port, web_workers, threads, lock.fileno()))
    except KeyboardInterrupt as stop:
        click.echo(f"\nstopping: {stop.args[0] if stop.args else 'Ctrl-C'}")
        click.echo("stopped.")


def _plan(ctx: click.Context, settings: Settings, host: str, port: int, web_workers: int,
          threads: int, lock_fd: int) -> Plan:
    """The database bootstrapped, and what the supervisor runs and prints."""
    engine = make_engine(settings)
    database = engine.url.render_as_string(hide_password=True)
    channel = bootstrap(engine)
    engine.dispose()
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = (settings.public_base_url or f"http://{shown}:{port}").rstrip("/")
    urls = channel_urls(channel, settings.public_base_url or f"http://{shown}:{port}")
    settings.served_url_file.write_text(base + "\n")
    banner = [
        "",
        f"USSD {channel.address} -> Africa's Talking callback URL:",
        f"  {urls['ussd']}",
        f"  events callback: {urls['events']}",
        "Play the first screen:",
        f"  {demo_curl(urls['ussd'], channel.address)}",
        f"Dashboard: {base}/dashboard/ (sign in with a token from "
        "`civicdial token create --role viewer --name YOU`)",
        f"Health: {base}/readyz  Metrics: {base}/metrics",
        "Ctrl-C stops everything.",
    ]
    root = ctx.find_root()
    return Plan(data_dir=root.obj.get("data_dir") if root.obj else None, lock_fd=lock_fd,
                host=host, port=port, web_workers=web_workers, threads=threads,
                database=database, banner=banner)
