"""A real `civicdial up` in a subprocess, as a user runs it: start, read what it prints,
post to it, ask its status, stop it the way Ctrl-C does."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post_form(url: str, fields: dict[str, str], timeout: float = 10) -> str:
    data = urllib.parse.urlencode(fields).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout) as r:
        return r.read().decode()


def embedded_env() -> dict[str, str]:
    """The environment of a bare machine: no Redis or database servers configured."""
    return {k: v for k, v in os.environ.items()
            if k not in ("REDIS_URL", "DATABASE_URL", "CIVICDIAL_DATA_DIR")}


@dataclass
class Node:
    """One `civicdial up` on a data dir; `ussd_url` is the callback URL it printed."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=embedded_env)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)
    ussd_url: str = ""
    _reader: threading.Thread | None = None

    def start(self, *args: str, timeout: float = 60) -> Node:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "--data-dir", str(self.data_dir), "up",
             "--port", str(self.port), *args], env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.ussd_url:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if line.strip().startswith("curl "):
                found = re.search(r"(http://\S+/ussd)", line)
                assert found, line
                self.ussd_url = found.group(1)
        assert self.ussd_url, "".join(self.output)
        # Keep reading: the access log goes to the same pipe, and a full pipe would block
        # the web server.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return "".join(self.output)

    def wait_for_output(self, needle: str, timeout: float = 60, after: int = 0) -> str:
        """The first line (from line `after` on) that contains `needle`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output[after:]:
                if needle in line:
                    return line
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not in the output of up:\n{self.text()}")

    def child(self, name: str) -> psutil.Process:
        """A process `up` runs: 'worker', 'web server' (gunicorn's master) or 'redis'."""
        assert self.proc is not None
        marks = {"worker": "gateway.cli worker", "web server": "gunicorn",
                 "redis": "redis-server"}
        for p in psutil.Process(self.proc.pid).children():
            try:
                if marks[name] in " ".join(p.cmdline()):
                    return p
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no {name} under up (pid {self.proc.pid})")

    def get(self, path: str, timeout: float = 10) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:  # not listening (yet, or while it restarts)
            return 0, str(exc)

    def hop(self, fields: dict[str, str], timeout: float = 30) -> str:
        """Post one hop, waiting for the web server to start listening."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return post_form(self.ussd_url, fields)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", "--data-dir", str(self.data_dir), *args],
            env=self.env, capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict[str, Any]:
        out = self.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def stop(self, timeout: float = 30) -> int:
        """Ctrl-C, as a terminal sends it (to the whole process group)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        if self._reader is not None:
            self.proc.wait(timeout=timeout)
            self._reader.join(timeout=timeout)
        else:
            rest, _ = self.proc.communicate(timeout=timeout)
            self.output.append(rest or "")
        return self.proc.returncode

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
