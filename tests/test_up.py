"""`civicdial up` as an operator meets it: processes that die, a busy port, health,
metrics and logs — each on a real `up` in a subprocess (tests/node.py)."""

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
from pathlib import Path

from node import Node, embedded_env, free_port, post_form

# Every hop after the language and the consent screen's first show answers a question:
# language, consent, sex, age 25-34, then the first choice of region, urban, income and
# three Washington Group questions: 9 answers from 11 hops.
PATH = ["", "1", "1*1", "1*1*2", "1*1*2*3"]
PATH += [PATH[-1] + "*1" * n for n in range(1, 7)]
ANSWERS_PER_RESPONDENT = len(PATH) - 2


def hop_until_answered(node: Node, fields: dict[str, str], deadline: float) -> str:
    """Post a hop as Africa's Talking does: again (same sessionId and text) until it gets
    an answer. While a process restarts a hop may fail (503, refused connection)."""
    while True:
        try:
            return post_form(node.ussd_url, fields, timeout=10)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Respondents(threading.Thread):
    """Citizens walking the same path one after another until told to stop."""

    def __init__(self, node: Node) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.stop = threading.Event()
        self.done = 0
        self.replies: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                phone = f"+23324{self.done:07d}"
                for text in PATH:
                    reply = hop_until_answered(self.node, {
                        "sessionId": f"kill-{self.done}", "serviceCode": "*920*16#",
                        "phoneNumber": phone, "networkCode": "62001", "text": text},
                        time.monotonic() + 120)
                    self.replies.append(reply)
                self.done += 1
        except BaseException as exc:  # noqa: B036 - reported by the test
            self.error = exc


def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def test_up_restarts_what_dies_and_loses_no_answer(tmp_path: Path) -> None:
    """SIGKILL the worker, the web server and the embedded redis-server in turn while
    citizens keep answering: `up` restarts each (logged, with its pid), keeps running,
    and every answer accepted reaches SQL; Ctrl-C still stops it, saying so."""
    env = {**embedded_env(), "CIVICDIAL_RECLAIM_IDLE_MS": "2000"}
    with Node(tmp_path / "data", env=env) as node:
        wait_until(lambda: node.get("/readyz")[0] == 200, 60, "/readyz")
        citizens = Respondents(node)
        citizens.start()
        for name in ("worker", "web server", "redis"):
            wait_until(lambda before=citizens.done: citizens.done >= before + 2
                       or citizens.error, 120, "citizens to answer")
            victim = node.child(name)
            mark = len(node.output)
            victim.send_signal(signal.SIGKILL)
            line = node.wait_for_output(f"the {name} (pid {victim.pid}) killed by SIGKILL",
                                        after=mark)
            assert "restarting in" in line, line
            node.wait_for_output(f"restarted the {name} (pid ", after=mark)
            assert node.child(name).pid != victim.pid
            assert node.proc is not None and node.proc.poll() is None, node.text()
        done_before = citizens.done
        wait_until(lambda: citizens.done >= done_before + 2 or citizens.error, 120,
                   "citizens to answer after the restarts")
        citizens.stop.set()
        citizens.join(timeout=120)
        assert citizens.error is None, repr(citizens.error)
        assert all(r.startswith("CON ") for r in citizens.replies), \
            [r for r in citizens.replies if not r.startswith("CON ")][:3]
        expected = citizens.done * ANSWERS_PER_RESPONDENT

        def persisted() -> bool:
            campaign = node.status()["campaigns"][0]
            return campaign["events_waiting"] == 0 and campaign["answers_stored"] >= expected

        wait_until(persisted, 120, "every answer in SQL")
        campaign = node.status()["campaigns"][0]
        assert campaign["answers_stored"] == expected
        assert campaign["interviews_started"] == citizens.done
        status, metrics = node.get("/metrics")
        assert status == 200
        restarts = dict(re.findall(r'civicdial_restarts_total\{process="([^"]+)"\} ([\d.]+)',
                                   metrics))
        # The worker may also have died with its Redis, and been restarted for it.
        assert restarts.keys() == {"worker", "web server", "redis"}, metrics
        assert float(restarts["web server"]) == float(restarts["redis"]) == 1.0, restarts
    assert node.proc is not None and node.proc.returncode == 0, node.text()
    assert "stopping: Ctrl-C" in node.text()


def test_up_stops_on_a_crash_loop_and_says_which(tmp_path: Path) -> None:
    """A worker that dies at once every time (here: REDIS_URL names a server that is not
    there) is restarted with growing delays, then `up` gives up with exit 1, naming it."""
    env = {**embedded_env(), "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    node = Node(tmp_path / "data", env=env).start()
    assert node.proc is not None
    node.proc.wait(timeout=180)
    node._reader.join(timeout=10)  # type: ignore[union-attr]
    assert node.proc.returncode == 1, node.text()
    assert re.search(r"stopping: the worker is in a crash loop \(exited with code 1; 5 times "
                     r"in a row within 30 s of starting\)", node.text()), node.text()
    delays = [float(d) for d in re.findall(
        r"the worker \(pid \d+\) exited with code 1; restarting in ([\d.]+) s", node.text())]
    assert delays == [0.5, 1, 2, 4], delays
    assert "stopped." in node.text()


def test_up_stops_on_sigterm_and_says_so(tmp_path: Path) -> None:
    """SIGTERM (a service manager's stop): everything stops cleanly, exit 0, and the
    embedded Redis saved what it held (the next `up` finds it)."""
    node = Node(tmp_path / "data").start()
    reply = node.hop({"sessionId": "T1", "serviceCode": "*920*16#",
                      "phoneNumber": "+233241110000", "networkCode": "62001", "text": ""})
    assert reply.startswith("CON ")
    assert node.proc is not None
    redis_pid = node.child("redis").pid
    node.proc.send_signal(signal.SIGTERM)
    node.proc.wait(timeout=60)
    node._reader.join(timeout=10)  # type: ignore[union-attr]
    assert node.proc.returncode == 0, node.text()
    assert "stopping: SIGTERM" in node.text()
    # Commands on the same data dir print the URLs `up` served, not the default port.
    listed = json.loads(node.cli("channels", "--json").stdout)
    urls = [url for ch in listed for url in ch["urls"].values()]
    assert urls and all(url.startswith(node.base_url) for url in urls), urls
    assert not _alive(redis_pid)
    assert not (tmp_path / "data" / "redis.db.settings").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has not been reaped by up yet, but it is not running.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_up_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    """Port taken: one line naming the port and --port; nothing started, no traceback."""
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "--data-dir", str(tmp_path / "data"), "up",
             "--port", str(port)], env=embedded_env(), capture_output=True, text=True,
            timeout=60)
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.strip() == (f"Error: port {port} on 127.0.0.1 is in use (another server "
                                  f"is listening there); try --port {port + 1}")
    assert not (tmp_path / "data" / "redis.db.settings").exists()


def test_access_log_masks_the_channel_key(tmp_path: Path) -> None:
    """The channel key (the only credential of an Africa's Talking callback) never
    appears in what `up` prints, access log included; the masked path does."""
    with Node(tmp_path / "data") as node:
        key = node.ussd_url.split("/")[-2]
        for text in ("", "1"):
            node.hop({"sessionId": "L1", "serviceCode": "*920*16#",
                      "phoneNumber": "+233241234567", "networkCode": "62001", "text": text})
        post_form(node.ussd_url + "/events", {"sessionId": "L1", "status": "Success"})
        node.wait_for_output(f"/webhooks/africastalking/{key[:4]}***/ussd/events")
    logged = node.text().split("Ctrl-C stops everything.", 1)[1]
    assert key not in logged, [line for line in logged.splitlines() if key in line][:3]
    assert logged.count(f'"POST /webhooks/africastalking/{key[:4]}***/ussd HTTP/1.1" 200') == 2


def test_json_logs_one_object_per_line(tmp_path: Path) -> None:
    """CIVICDIAL_LOG_FORMAT=json: every log line of the web server (access log included)
    is one JSON object; numbers and keys stay masked."""
    env = {**embedded_env(), "CIVICDIAL_LOG_FORMAT": "json"}
    with Node(tmp_path / "data", env=env) as node:
        key = node.ussd_url.split("/")[-2]
        node.hop({"sessionId": "J1", "serviceCode": "*920*16#", "phoneNumber": "+233241234567",
                  "networkCode": "62001", "text": ""})
        # A refused hop logs a warning (the key masked).
        try:
            post_form(node.ussd_url, {"serviceCode": "*920*16#", "phoneNumber": "+233241234567",
                                      "networkCode": "62001", "text": ""})
        except urllib.error.HTTPError as exc:
            assert exc.code == 400
        node.wait_for_output('"level": "WARNING"')
        node.wait_for_output('HTTP/1.1\\" 400')
    logged = node.text().split("Ctrl-C stops everything.\n", 1)[1].splitlines()
    lines = [line for line in logged if line.strip() and not line.startswith(
        ("stopping", "stopped"))]
    records = [json.loads(line) for line in lines]  # each line is one object
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["level"] == "WARNING" and "400 missing field sessionId" in r["message"]
               for r in records), records
    text = "\n".join(lines)
    assert key not in text and "+233241234567" not in text


def test_up_supervises_without_the_app_in_its_memory(tmp_path: Path) -> None:
    """Once everything runs, `up`'s own process (the same pid) is the supervisor, which
    imports none of the app: no numpy or SQLAlchemy library mapped into it. And the
    channel key it printed is not on its command line, which any local user can read."""
    with Node(tmp_path / "data") as node:
        assert node.proc is not None
        key = node.ussd_url.split("/")[-2]
        cmdline = Path(f"/proc/{node.proc.pid}/cmdline").read_bytes()
        maps = Path(f"/proc/{node.proc.pid}/maps").read_text()
    assert b"gateway.supervision" in cmdline and key.encode() not in cmdline
    assert "numpy" not in maps and "sqlalchemy" not in maps
    # What the check looks for is there in a process that imports the command (as `up`
    # did until it handed over).
    cli_maps = subprocess.run(
        [sys.executable, "-c", "import gateway.cli; print(open('/proc/self/maps').read())"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    assert "numpy" in cli_maps and "sqlalchemy" in cli_maps


def test_a_killed_up_leaves_nothing_the_next_one_does_not_clear(tmp_path: Path) -> None:
    """SIGKILL `up` itself (no clean-up runs): its processes die with it, and the next
    `up` on the same machine removes the run dir (socket, metrics files) it left behind,
    while the run dir of an `up` still running is kept."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**embedded_env(), "TMPDIR": str(tmp)}
    with Node(tmp_path / "other", env=env) as running:
        killed = Node(tmp_path / "data", env=env).start()
        assert killed.proc is not None
        children = [killed.child(name) for name in ("worker", "web server", "redis")]
        both = set(tmp.glob("civicdial-up-*"))
        assert len(both) == 2, both
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait(timeout=30)
        wait_until(lambda: not any(_alive(c.pid) for c in children), 60,
                   "up's processes to die with it")
        assert set(tmp.glob("civicdial-up-*")) == both  # nobody cleaned up
        with Node(tmp_path / "data", env=env) as again:
            reply = again.hop({"sessionId": "K1", "serviceCode": "*920*16#",
                               "phoneNumber": "+233241110001", "networkCode": "62001",
                               "text": ""})
            assert reply.startswith("CON "), reply
            left = set(tmp.glob("civicdial-up-*"))
            assert len(left) == 2 and len(left & both) == 1, (left, both)
            assert running.hop({"sessionId": "K2", "serviceCode": "*920*16#",
                                "phoneNumber": "+233241110002", "networkCode": "62001",
                                "text": ""}).startswith("CON ")
    assert not list(tmp.glob("civicdial-up-*"))
