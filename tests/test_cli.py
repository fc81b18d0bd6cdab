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
import pytest
from click.testing import CliRunner
from flask.testing import FlaskClient
from sqlalchemy import func, select

from gateway.cli import main
from gateway.store.models import AuditEntry, Campaign, Channel, TallySnapshot

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


# -- refused input: one line, a non-zero exit, no traceback, nothing stored --------------

MARGINS = (Path(__file__).parents[1] / "gateway" / "indicator" / "data"
           / "ghana_margins.csv").read_bytes()


def refused(env: dict[str, str], *args: str) -> str:
    """Run a command that must be refused; its one 'Error: ...' line. A usage error (exit 2)
    comes with click's usage lines, a refusal (exit 1) with nothing else."""
    result = CliRunner().invoke(main, list(args), env=env)
    # An exception other than SystemExit is what a user would have seen as a traceback.
    assert isinstance(result.exception, SystemExit), (result.exception, result.output)
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    if result.exit_code == 1:
        assert result.output.strip() == errors[0], result.output
    return errors[0]


def _margins_line(n: int, line: bytes) -> bytes:
    """The shipped margins with line n (1: the header) replaced."""
    lines = MARGINS.splitlines(keepends=True)
    lines[n - 1] = line + b"\n"
    return b"".join(lines)


@pytest.mark.parametrize(("content", "expected"), [
    (b"variable,category,status\nregion,Ashanti,final\n", "line 1: no column 'population'"),
    (_margins_line(4, b"region,Eastern,0,final,x"), "line 4, column 'population': '0' must"),
    (_margins_line(4, b"region,Eastern,-3,final,x"), "line 4, column 'population': '-3' must"),
    (_margins_line(5, b"region,Central,abc,final,x"),
     "line 5, column 'population': 'abc' is not a number"),
    (_margins_line(5, b"region,Central,nan,final,x"),
     "line 5, column 'population': 'nan' is not a finite number"),
    (_margins_line(5, b"region,Central,1e999,final,x"),
     "line 5, column 'population': '1e999' is not a finite number"),
    (_margins_line(5, b"region,Central"), "line 5, column 'population': no value"),
    (_margins_line(5, b"region,ashanti,12,final,x"), "line 5, column 'category': "
                                                      "region=ashanti is given on line 3"),
    (_margins_line(6, "region,Northern,2310939,final,Recensement g\u00e9n\u00e9ral"
                   .encode("cp1252")), "line 6, column 'source': byte 0xe9 is not UTF-8"),
    (b"", "the file is empty"),
    (b"variable,category,population\n", "has a header and no rows"),
], ids=["missing-column", "zero", "negative", "abc", "nan", "inf", "short-row", "duplicate",
        "cp1252", "empty", "no-rows"])
def test_tally_refuses_a_bad_margins_file(env: dict[str, str], engine, channel: Channel,
                                          tmp_path: Path, content: bytes,
                                          expected: str) -> None:  # type: ignore[no-untyped-def]
    """A margins file the raking cannot use stops the tally before it stores a snapshot;
    the one line says which file, line and column."""
    path = tmp_path / "margins.csv"
    path.write_bytes(content)
    error = refused(env, "tally", "sdg1662", "--margins", str(path))
    assert error.startswith(f"Error: {path}: ") and expected in error, error
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(TallySnapshot)) == 0


def test_tally_takes_a_good_margins_file_with_a_spreadsheet_bom(
        env: dict[str, str], channel: Channel, tmp_path: Path) -> None:
    """The checks refuse only what is wrong: the shipped file, saved by a spreadsheet as
    'CSV UTF-8' (a BOM, a trailing empty row), still tallies."""
    path = tmp_path / "margins.csv"
    path.write_bytes(b"\xef\xbb\xbf" + MARGINS + b",,,,\n")
    code, out = run(env, "tally", "sdg1662", "--margins", str(path), "--json")
    assert code == 0, out
    assert json.loads(out)["version"] == 1


def _version(engine) -> str:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return str(conn.scalar(select(Campaign.questionnaire_version)))


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--target-size", "99999999999999999999999", "--target-size"),
    ("--target-size", "2147483648", "--target-size"),
    ("--target-size", "0", "--target-size"),
    ("--name", "", "give the campaign a name"),
    ("--name", "   ", "give the campaign a name"),
    ("--name", "x" * 5000, "at most 300 characters (not 5000)"),
    ("--name", "Volta\x1b[2J2027", "no control characters"),
])
def test_campaign_create_refuses_what_the_api_refuses(
        env: dict[str, str], engine, channel: Channel, option: str, value: str,
        expected: str) -> None:  # type: ignore[no-untyped-def]
    """Numbers beyond an SQL INTEGER and names the API refuses (empty, over 300
    characters) are a usage error, and no campaign is created."""
    args = {"--name": "Volta 2027", "--target-size": "800", option: value}
    error = refused(env, "campaign", "create", "volta-2027", "--questionnaire",
                    _version(engine), *[x for item in args.items() for x in item])
    assert expected in error, error
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Campaign)) == 1  # sdg1662
        assert conn.scalar(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.action == "campaign.create")) == 0
    # The largest the API takes is taken here too.
    args[option] = "2147483647" if option == "--target-size" else "x" * 300
    code, out = run(env, "campaign", "create", "volta-2027", "--questionnaire",
                    _version(engine), *[x for item in args.items() for x in item])
    assert code == 0, out


@pytest.mark.parametrize("args", [
    ("campaign", "set", "sdg1662", "--reminder-hours", "99999999999999999999999"),
    ("campaign", "set", "sdg1662", "--reminder-max", "99999999999999999999999"),
    ("export", "sdg1662", "--format", "csv", "-o", "x.csv", "--snapshot",
     "99999999999999999999999"),
    ("publish", "sdg1662", "--snapshot", "99999999999999999999999"),
    ("audit", "--limit", "99999999999999999999999"),
])
def test_huge_numbers_are_refused_in_one_line(env: dict[str, str], channel: Channel,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              args: tuple[str, ...]) -> None:
    """Every other integer option a database sees: a clean refusal, not OverflowError."""
    monkeypatch.chdir(tmp_path)  # export's -o, should it get that far
    error = refused(env, *args)
    assert "between" in error or "range" in error, error


@pytest.mark.parametrize(("args", "says"), [
    (("--min-neff", "nan"), "'nan' is not a number from 0"),
    (("--flag-neff", "inf"), "'inf' is not a number from 0"),
    (("--min-neff", "-1"), "'-1' is not a number from 0"),
    (("--min-n", "-5"), "-5 is not in the range"),
    (("--trim", "-1"), "'-1' is not a number from 0"),
    (("--trim", "0.5"), "0 (no trimming) or a multiple of the mean weight of at least 1"),
    (("--replicates", "100000000"), "100000000 is not in the range 0<=x<=2000"),
    (("--seed", "-1"), "-1 is not in the range"),
])
def test_tally_thresholds_out_of_range_are_refused(env: dict[str, str], channel: Channel,
                                                   args: tuple[str, ...], says: str) -> None:
    """Disclosure control cannot be switched off by a value no comparison holds for (NaN),
    nor the tally run out of memory by a replicate count: one line, no snapshot."""
    error = refused(env, "tally", "sdg1662", *args)
    assert says in error, error
    assert "Traceback" not in error


@pytest.mark.parametrize(("target", "expected"), [
    ("100000000000000000000000", "target must be from 0 to 2147483647"),
    ("2147483648", "target must be from 0 to 2147483647"),
    ("-1", "target must be from 0 to"),
])
def test_quota_set_refuses_a_target_beyond_an_integer(
        env: dict[str, str], engine, channel: Channel, tmp_path: Path, target: str,
        expected: str) -> None:  # type: ignore[no-untyped-def]
    """A quota target beyond an SQL INTEGER is a typo: refused naming the cell, and the
    quotas stay as they were."""
    path = tmp_path / "quotas.csv"
    path.write_text(f"sex,target\nfemale,120\nmale,{target}\n")
    error = refused(env, "campaign", "quota", "set", "sdg1662", str(path))
    assert "cell 2 (sex=male)" in error and expected in error, error
    with engine.connect() as conn:
        assert conn.scalar(select(Campaign.quotas)) == ""
    path.write_text("sex,target\nfemale,120\nmale,2147483647\n")
    assert run(env, "campaign", "quota", "set", "sdg1662", str(path))[0] == 0


@pytest.mark.parametrize("fmt", ["csv", "xlsx", "sdmx", "microdata"])
def test_export_to_a_missing_folder_says_so(env: dict[str, str], channel: Channel,
                                            tmp_path: Path, fmt: str) -> None:
    """-o in a folder that is not there: one line naming the path, and no file anywhere;
    a good path then gets the whole export and no stray part file."""
    assert run(env, "tally", "sdg1662")[0] == 0
    missing = tmp_path / "nonexistent" / "x.csv"
    error = refused(env, "export", "sdg1662", "--format", fmt, "-o", str(missing))
    assert error == f"Error: cannot write {missing}: no such directory"
    assert not missing.parent.exists()
    good = tmp_path / "out" / "x.csv"
    good.parent.mkdir()
    code, out = run(env, "export", "sdg1662", "--format", fmt, "-o", str(good))
    assert code == 0, out
    assert [p.name for p in good.parent.iterdir()] == ["x.csv"] and good.stat().st_size
