"""The package layout is the architecture: imports point one way, and a data dir made
before the layout changed still opens with everything in it."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from node import Node

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "workers")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
                          cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_imports_point_one_way() -> None:
    """import-linter's contracts (pyproject.toml) hold: layers and no sibling cycles."""
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "bad_import"), [
    ("gateway/interview/engine.py", "import gateway.store.sessions"),
    ("gateway/store/db.py", "import workers.persist"),
    ("gateway/coordination/invitations.py", "import gateway.channels.sms"),
    ("workers/outbound.py", "import gateway.web.app"),
], ids=["engine->store", "store->workers", "coordination->channels", "workers->web"])
def test_an_import_the_wrong_way_breaks_the_contract(tmp_path: Path, module: str,
                                                      bad_import: str) -> None:
    """The check is not vacuous: one import pointing up in a copy of the tree fails it."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{bad_import}  # planted\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout


def _local_imports_of_ours(path: Path) -> list[str]:
    found = []
    tree = ast.parse(path.read_text())
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                a.name for a in node.names] if isinstance(node, ast.Import) else []
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                      if n.split(".")[0] in PACKAGES]
    return found


def test_no_function_local_import_of_our_own_modules() -> None:
    """No cycle is dodged by importing inside a function."""
    offenders = [hit for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
                 for hit in _local_imports_of_ours(path)]
    assert offenders == []


# When the data dir below was written (its last hop, UNIX time): its Redis keys expire and
# its half-done interview's resume window ends 24 h after that.
WRITTEN_AT = 1796116666.2


def _resp_commands(data: bytes) -> list[list[bytes]]:
    """The commands of an append-only file (RESP arrays of bulk strings)."""
    commands, at = [], 0
    while at < len(data):
        assert data[at:at + 1] == b"*", data[at:at + 40]
        end = data.index(b"\r\n", at)
        count, at = int(data[at + 1:end]), end + 2
        args = []
        for _ in range(count):
            end = data.index(b"\r\n", at)
            size = int(data[at + 1:end])
            args.append(data[end + 2:end + 2 + size])
            at = end + 2 + size + 2
        commands.append(args)
    return commands


def _shift_epoch(value: object, seconds: float) -> object:
    if isinstance(value, list):
        return [_shift_epoch(v, seconds) for v in value]
    if isinstance(value, float) and 1.7e9 < value < 2.1e9:
        return value + seconds
    return value


def age_aof(path: Path, seconds: float) -> None:
    """Move every absolute time in the file `seconds` later, as if it had been written
    that much later: the keys' expiry (PXAT, PEXPIREAT) and the session states' own
    clocks (their JSON arrays' epoch floats), so that the fixture does not go stale as the
    calendar moves on."""
    out = bytearray()
    for args in _resp_commands(path.read_bytes()):
        name = args[0].upper()
        for n, arg in enumerate(args):
            if n and args[n - 1].upper() == b"PXAT" or (name == b"PEXPIREAT" and n == 2):
                args[n] = str(int(arg) + round(seconds * 1000)).encode()
        if name == b"SET" and args[1].startswith(b"cd:st:"):
            args[2] = json.dumps(_shift_epoch(json.loads(args[2]), seconds),
                                 separators=(",", ":")).encode()
        out += b"*%d\r\n" % len(args)
        for arg in args:
            out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    path.write_bytes(bytes(out))


def test_a_data_dir_from_before_the_layout_opens_with_its_answers(tmp_path: Path) -> None:
    """A data dir written by main before the move (62f074f: 6 completed interviews, 155
    answers, one interview half done in Redis) opens under `civicdial up`: the counts are
    the same, the old callback URL answers, the half-done interview is offered to resume."""
    with tarfile.open(Path(__file__).parent / "data" / "datadir-pre-layout.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    data_dir = tmp_path / "olddd"
    (data_dir / "redis.db.settings").unlink()  # runtime state of the old server (its pid)
    # As if its last hop were a minute ago (the resume window is 24 h).
    age_aof(data_dir / "appendonly.aof", time.time() - 60 - WRITTEN_AT)
    with Node(data_dir) as node:
        assert "/webhooks/africastalking/h1IQX9ALDNI6pUW3_J42ukHj/ussd" in node.ussd_url
        hop = {"sessionId": "after-move", "serviceCode": "*920*16#",
               "phoneNumber": "+233245550009", "networkCode": "62001", "text": ""}
        first = node.hop(hop)
        assert first.startswith("CON ") and "Continue" in first, first
        deadline = time.monotonic() + 30
        while True:
            campaign = node.status()["campaigns"][0]
            if campaign["events_waiting"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert campaign["slug"] == "sdg1662"
        assert campaign["interviews_completed"] == 6
        assert campaign["answers_stored"] == 155
    assert node.proc is not None and node.proc.returncode == 0, "".join(node.output)
