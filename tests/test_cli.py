"""The civicdial command line, as a coordinator or a script uses it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
from click.testing import CliRunner
from flask.testing import FlaskClient

from gateway.cli import main
from gateway.store.models import Channel

FORM = "application/x-www-form-urlencoded"


def run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def test_channels_json_lists_webhook_urls(env: dict[str, str], channel: Channel) -> None:
    """`channels --json` gives each channel's callback URLs, with the secret key."""
    code, out = run(env, "channels", "--json", "--base-url", "https://gw.example.org")
    assert code == 0
    (item,) = json.loads(out)
    assert item["provider"] == "africastalking" and item["address"] == "*920*16#"
    assert item["urls"] == {
        "ussd": f"https://gw.example.org/webhooks/africastalking/{channel.key}/ussd",
        "events": f"https://gw.example.org/webhooks/africastalking/{channel.key}/ussd/events",
    }


def test_status_json_counts(env: dict[str, str], client: FlaskClient, ussd_url: str,
                            engine, redis_client) -> None:  # type: ignore[no-untyped-def]
    """`status --json` shows started interviews, stored answers and waiting events."""
    for text in ("", "1", "1*1", "1*1*2"):
        client.post(ussd_url, content_type=FORM, data={
            "sessionId": "S1", "serviceCode": "*920*16#", "phoneNumber": "+233241234567",
            "networkCode": "62001", "text": text})
    code, out = run(env, "status", "--json")
    assert code == 0
    campaign = json.loads(out)["campaigns"][0]
    assert campaign["events_waiting"] == 3  # started, consent, sex: not yet persisted
    assert campaign["answers_stored"] == 0
    from workers.persist import drain

    drain(redis_client, engine, "cd:events")
    campaign = json.loads(run(env, "status", "--json")[1])["campaigns"][0]
    assert campaign["events_waiting"] == 0
    assert campaign["interviews_started"] == 1
    assert campaign["answers_stored"] == 2
    code, out = run(env, "status")
    assert "sdg1662" in out and "waiting" in out


def test_questionnaire_check(env: dict[str, str], tmp_path: Path) -> None:
    """A good form is summarised; a bad one names sheet, row and column, exit 1."""
    shipped = Path(__file__).parents[1] / "questionnaires" / "sdg1662.md"
    code, out = run(env, "questionnaire", "check", str(shipped), "--json")
    assert code == 0
    assert json.loads(out)["languages"] == ["English (en)", "Twi (tw)"]
    bad = tmp_path / "bad.md"
    bad.write_text("| survey |\n|  | type | name | label |\n"
                   "|  | select_one yesno | consent | OK? |\n|  | geopoint | where | Where? |\n"
                   "| choices |\n|  | list_name | name | label |\n|  | yesno | yes | Yes |\n")
    code, out = run(env, "questionnaire", "check", str(bad), "--json")
    assert code == 1
    assert json.loads(out) == {"ok": False, "sheet": "survey", "row": 3, "column": "type",
                               "error": json.loads(out)["error"]}
    assert "geopoint" in json.loads(out)["error"]
    code, out = run(env, "questionnaire", "check", str(bad))
    assert code == 1 and "sheet 'survey', row 3, column 'type'" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, fields: dict[str, str]) -> str:
    data = urllib.parse.urlencode(fields).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as resp:
        return resp.read().decode()


def test_up_runs_everything_embedded_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """`civicdial up` on a bare machine: embedded Redis + SQLite, web, worker; Ctrl-C."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "CIVICDIAL_DATA_DIR")}
    port = _free_port()
    data_dir = tmp_path / "field-kit"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "--data-dir", str(data_dir), "up", "--port",
         str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    output: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        url = ""
        while time.monotonic() < deadline and not url:
            line = proc.stdout.readline()
            if not line:
                break
            output.append(line)
            if line.strip().startswith("curl "):
                url = re.search(r"(http://\S+/ussd)", line).group(1)  # type: ignore[union-attr]
        assert url, "".join(output)
        output.append(proc.stdout.readline())
        dashboard = re.search(r"^Dashboard: (http://\S+/dashboard/) ", output[-1])
        assert dashboard, "".join(output)
        hop = {"sessionId": "S1", "serviceCode": "*920*16#", "phoneNumber": "+233241234567",
               "networkCode": "62001"}
        body = ""
        while time.monotonic() < deadline:
            try:
                body = _post(url, {**hop, "text": ""})
                break
            except OSError:
                time.sleep(0.2)
        assert body.startswith("CON Language")
        _post(url, {**hop, "text": "1"})
        assert _post(url, {**hop, "text": "1*1"}).startswith("CON What is your sex?")
        # The worker started by `up` drains the stream into SQLite by itself.
        status: dict = {}
        while time.monotonic() < deadline:
            out = subprocess.run(
                [sys.executable, "-m", "gateway.cli", "--data-dir", str(data_dir), "status",
                 "--json"], env=env, capture_output=True, text=True, timeout=30)
            status = json.loads(out.stdout)
            if status["campaigns"][0]["answers_stored"] == 1:
                break
            time.sleep(0.3)
        assert status["campaigns"][0]["answers_stored"] == 1
        assert status["events_waiting"] == 0
        # The dashboard it names answers, asking for a token first.
        with urllib.request.urlopen(dashboard.group(1), timeout=10) as resp:
            assert resp.url.endswith("/dashboard/login") and b"token" in resp.read()
        registry = json.loads((data_dir / "redis.db.settings").read_text())
        redis_pid = int(Path(registry["pidfile"]).read_text())
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)  # and an impatient second Ctrl-C
        rest, _ = proc.communicate(timeout=30)
        output.append(rest)
    assert proc.returncode == 0, "".join(output)
    assert "stopped." in "".join(output)
    assert (data_dir / "civicdial.db").exists()
    assert not psutil.pid_exists(redis_pid), "the embedded Redis was left running"
