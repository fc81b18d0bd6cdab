"""Quotas per cell: the engine's screening, the worker's fill count, the CLI and the API."""

from __future__ import annotations

import html
import io
import json
from dataclasses import replace
from pathlib import Path

import openpyxl
import pytest
import redis
from click.testing import CliRunner
from flask.testing import FlaskClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from test_console import csrf_of
from test_dashboard import signed_in_client, tokens  # noqa: F401 - the role tokens fixture
from test_engine import SMALL, TO_USED, UNLIMITED, USED_NO, Script, Turn, play
from test_sms import fake, sms  # noqa: F401 - fixtures

from gateway.coordination.campaigns import create_token
from gateway.interview.engine import Input, Stage, step
from gateway.interview.quota import QuotaError, define, read_csv
from gateway.store.models import AuditEntry, Campaign, Channel, Interview
from gateway.store.sessions import quota_key
from workers.persist import drain

FORM = "application/x-www-form-urlencoded"
FULL = "We already have enough answers from people like you"
RED_YES = replace(UNLIMITED, quota_on=("color", "used"), full_cells=frozenset({"red|yes"}))


# -- the engine ---------------------------------------------------------------------------

@pytest.mark.parametrize("script", [
    Script("a full cell is thanked and ended at its last quota question", (
        *TO_USED,
        Turn("1", FULL, end=True, events=("answer used=yes", "screened_out=quota"), gone=True),
    ), rules=RED_YES),
    Script("an open cell goes on to the substantive questions", (
        *TO_USED, Turn("2", "Nearly done.", events=("answer used=no",), question="info"),
    ), rules=RED_YES),
    Script("a one-variable quota screens at that question", (
        *TO_USED[:3],
        Turn("1", FULL, end=True, events=("answer color=red", "screened_out=quota"), gone=True),
    ), rules=replace(UNLIMITED, quota_on=("color",), full_cells=frozenset({"red"}))),
    Script("without quotas nobody is screened", (
        *TO_USED, Turn("1", "Well treated?", events=("answer used=yes",)),
    ), rules=replace(UNLIMITED, full_cells=frozenset({"red|yes"}))),
], ids=lambda s: s.label)
def test_quota_scripts(script: Script) -> None:
    play(script)


def test_a_cell_filling_mid_interview_does_not_cut_the_interview() -> None:
    """Someone past the quota questions when their cell fills still finishes."""
    state = play(Script("to rating", (*TO_USED, Turn("1", "Well treated?",
                                                     events=("answer used=yes",))),
                        rules=replace(RED_YES, full_cells=frozenset())))[-1].state
    assert state is not None
    result = step(SMALL, state, Input.answer("1", 2_000_000.0), RED_YES)
    assert result.reply.text.startswith("Why did you go?")
    assert [e.kind for e in result.events] == ["answer"]


def test_going_back_into_a_full_cell_is_screened() -> None:
    """Changing a quota answer re-checks the cell."""
    steps = play(Script("back", (*TO_USED, USED_NO), rules=RED_YES))
    state = steps[-1].state
    assert state is not None
    back = step(SMALL, state, Input.answer("0", 2_000_000.0), RED_YES)  # 0 = Back
    assert back.state is not None and back.state.stage is Stage.QUESTION
    again = step(SMALL, back.state, Input.answer("1", 2_000_001.0), RED_YES)
    assert again.state is None and FULL in again.reply.text


# -- defining quotas ------------------------------------------------------------------------

@pytest.mark.parametrize("csv, error", [
    (b"colour,target\nred,3\n", "'colour' is not a single-choice question"),
    (b"color,target\npurple,3\n", "'purple' is not a choice of color"),
    (b"color,target\nred,three\n", "target 'three' is not a whole number"),
    (b"color,target\nred,-1\n", "target must be from 0 to"),
    (b"color,target\nred,1\nred,2\n", "red is given twice"),
    (b"color,used\nred,yes\n", "then 'target'"),
    (b"visits,target\n3,1\n", "'visits' is not a single-choice question"),
    (b"color,target\n", "at least one cell"),
])
def test_bad_quota_files_say_what_to_fix(csv: bytes, error: str) -> None:
    with pytest.raises(QuotaError, match=error):
        read_csv(csv, SMALL)


def test_quota_file_with_bom_and_excel_quoting() -> None:
    quota = read_csv('\ufeff"color","used","target"\r\n"red","yes","2"\r\n\r\nblue,no,0\r\n'
                     .encode(), SMALL)
    assert quota.on == ("color", "used")
    assert quota.targets == {"red|yes": 2, "blue|no": 0}
    assert define(SMALL, ["color"], [({"color": "red"}, 1)]).targets == {"red": 1}


# -- a real USSD campaign -------------------------------------------------------------------

def run(env: dict[str, str], *args: str) -> tuple[int, str]:
    from gateway.cli import main

    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.output


def xlsx_workbook() -> bytes:
    """A real Excel workbook of quotas: picked instead of the CSV saved from it."""
    book = openpyxl.Workbook()
    for row in (["sex", "target"], ["female", 3]):
        book.active.append(row)
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


SAVE_AS = "save it as CSV UTF-8"
UNREADABLE = pytest.mark.parametrize("content,error", [
    (xlsx_workbook(), "not a UTF-8 CSV file (it looks like an .xlsx workbook"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(512), "(it looks like an .xls workbook)"),
    (bytes(range(256)) * 4, "not a UTF-8 CSV file (it holds binary data"),
    ("sex,target\nfemale,3\n".encode("utf-16-le"), "UTF-16 without a byte-order mark"),
    (b'sex,target\nmale,4\nfemale,"3\n' + b"x" * 140_000, 'line 3: field larger than field '
     'limit (131072); is a quote (")'),
], ids=["xlsx", "xls", "binary", "utf-16 without BOM", "unclosed quote"])


def nothing_stored(engine: Engine) -> bool:
    with Session(engine) as db:
        return (db.scalar(select(Campaign.quotas).where(Campaign.slug == "sdg1662")) == ""
                and "campaign.quotas" not in db.scalars(select(AuditEntry.action)).all())


@UNREADABLE
def test_cli_refuses_a_quota_file_that_is_not_csv_text(env: dict[str, str], engine: Engine,
                                                       channel: Channel, tmp_path: Path,
                                                       content: bytes, error: str) -> None:
    """One line with what is wrong and the fix; exit 1, no traceback (the runner lets any
    other exception through), no quotas set."""
    from gateway.cli import main

    path = tmp_path / "quotas.csv"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["campaign", "quota", "set", "sdg1662", str(path)],
                                env=env, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: quotas: ") and result.output.count("\n") == 1
    assert error in result.output and SAVE_AS in result.output
    assert nothing_stored(engine)


@UNREADABLE
def test_console_refuses_a_quota_file_that_is_not_csv_text(
        client: FlaskClient, engine: Engine, tokens: dict[str, str],  # noqa: F811
        content: bytes, error: str) -> None:
    """Settings > quota upload: 422 with the same message, as for a quota that does not fit
    the questionnaire."""
    signed_in_client(client, tokens["coordinator"])
    csrf = csrf_of(client.get("/dashboard/campaigns/sdg1662/settings").get_data(as_text=True))
    resp = client.post("/dashboard/campaigns/sdg1662/quotas", data={
        "csrf": csrf, "file": (io.BytesIO(content), "quotas.csv")})
    page = html.unescape(resp.get_data(as_text=True))
    assert resp.status_code == 422, page[:2000]
    assert "Quotas not set: quotas: " in page and error in page and SAVE_AS in page
    assert nothing_stored(engine)


@pytest.mark.parametrize("content", [
    b"region,sex,target\rashanti,female,3\rashanti,male,4\r",
    "region\tsex\ttarget\r\nashanti\tfemale\t3\r\nashanti\tmale\t4\r\n".encode("utf-16"),
    b"\xfe\xff" + "region;sex;target\nashanti;female;3\nashanti;male;4\n".encode("utf-16-be"),
], ids=["old-mac line endings", "utf-16 unicode text", "utf-16-be with BOM, semicolons"])
def test_other_spreadsheet_quota_csvs_are_read(env: dict[str, str], engine: Engine,
                                               channel: Channel, tmp_path: Path,
                                               content: bytes) -> None:
    """`\\r`-only line endings and Excel's UTF-16 "Unicode Text" set quotas like any CSV."""
    path = tmp_path / "quotas.csv"
    path.write_bytes(content)
    code, out = run(env, "campaign", "quota", "set", "sdg1662", str(path), "--json")
    assert code == 0, out
    assert json.loads(out)["quotas"] == {"on": ["region", "sex"], "targets": {
        "ashanti|female": 3, "ashanti|male": 4}}


class Dialler:
    """One phone talking to the USSD webhook as Africa's Talking would."""

    def __init__(self, client: FlaskClient, url: str, phone: str) -> None:
        self.client, self.url, self.phone = client, url, phone
        self.sessions, self.inputs = 0, []  # type: ignore[var-annotated]

    def dial(self) -> str:
        self.sessions += 1
        self.inputs = []
        return self._post()

    def send(self, text: str) -> str:
        self.inputs.append(text)
        return self._post()

    def _post(self) -> str:
        resp = self.client.post(self.url, content_type=FORM, data={
            "sessionId": f"ATUid_{self.phone}_{self.sessions}", "serviceCode": "*920*16#",
            "phoneNumber": self.phone, "networkCode": "62001", "text": "*".join(self.inputs)})
        assert resp.status_code == 200, resp.text
        return resp.text

    def to_region(self, sex: str) -> str:
        """English, consent, sex (1 female, 2 male), 18-24, Greater Accra."""
        assert "Language" in self.dial()
        for answer in ("1", "1", sex, "2"):
            self.send(answer)
        return self.send("1")

    def finish(self) -> str:
        """Answer the first option everywhere (18-24 for age; any text to open
        questions), redialling after each part break, until the interview completes."""
        screen = self.inputs and self._post() or self.dial()
        for _ in range(300):
            if screen.startswith("END"):
                if "Part" not in screen:
                    return screen
                screen = self.dial()
                continue
            # An adult (option 1 is "Under 18", which ends the survey at once).
            adult = "How old are you?" in screen or "Wadi mfee ahe?" in screen
            screen = self.send("2" if adult else "1")
        raise AssertionError("the interview never ended")


def test_a_full_cell_turns_people_away_over_ussd(
        client: FlaskClient, ussd_url: str, env: dict[str, str], engine: Engine,
        redis_client: redis.Redis, channel: Channel, tmp_path: Path) -> None:
    """Quota Greater Accra × female = 1: once one woman there completes (and the worker
    has persisted it), the next is thanked and ended before the substantive questions;
    a man there, and a woman elsewhere, go on. The fill shows in the CLI."""
    quota_file = tmp_path / "quotas.csv"
    quota_file.write_text("region,sex,target\ngreater_accra,female,1\n"
                          "greater_accra,male,5\nashanti,female,5\n")
    code, out = run(env, "campaign", "quota", "set", "sdg1662", str(quota_file))
    assert code == 0, out
    assert "3 quota cells on region x sex" in out

    first = Dialler(client, ussd_url, "+233240000001")
    assert "urban" in first.to_region("1").lower()  # cell open: on to residence
    assert "Thank you!" in first.finish()
    drain(redis_client, engine, "cd:events")
    assert json.loads(redis_client.get(quota_key("cd:", channel.campaign_id))) == [
        "greater_accra|female"]

    second = Dialler(client, ussd_url, "+233240000002")
    ended = second.to_region("1")
    assert ended.startswith("END ") and FULL in ended
    man = Dialler(client, ussd_url, "+233240000003")
    assert "urban" in man.to_region("2").lower()
    drain(redis_client, engine, "cd:events")
    with Session(engine) as db:
        statuses = dict(db.execute(select(Interview.respondent, Interview.status)).all())
    assert sorted(statuses.values()) == ["completed", "screened_out", "started"]

    code, out = run(env, "campaign", "quota", "show", "sdg1662", "--json")
    assert code == 0, out
    cells = {(c["cell"]["region"], c["cell"]["sex"]): c for c in json.loads(out)["cells"]}
    assert cells["greater_accra", "female"] == {
        "cell": {"region": "greater_accra", "sex": "female"}, "target": 1, "completed": 1,
        "screened_out": 1, "full": True}
    assert cells["greater_accra", "male"]["completed"] == 0
    assert not cells["greater_accra", "male"]["full"]
    code, out = run(env, "campaign", "status", "sdg1662")
    assert code == 0 and "1 screened out by quotas" in out
    assert "greater_accra  female  1       1          100%  FULL  1" in out

    # Raising the target reopens the cell at once.
    quota_file.write_text("region,sex,target\ngreater_accra,female,2\n")
    assert run(env, "campaign", "quota", "set", "sdg1662", str(quota_file))[0] == 0
    assert json.loads(redis_client.get(quota_key("cd:", channel.campaign_id))) == []
    third = Dialler(client, ussd_url, "+233240000004")
    assert "urban" in third.to_region("1").lower()
    assert run(env, "campaign", "quota", "clear", "sdg1662")[0] == 0
    assert redis_client.get(quota_key("cd:", channel.campaign_id)) is None
    with Session(engine) as db:
        actions = db.scalars(select(AuditEntry.action)).all()
    assert actions.count("campaign.quotas") == 3


def test_quotas_over_the_api(client: FlaskClient, engine: Engine, channel: Channel,
                             redis_client: redis.Redis) -> None:
    with Session(engine) as db, db.begin():
        tokens = {role: create_token(db, "test", role, role)
                  for role in ("coordinator", "viewer")}
    coord = {"Authorization": f"Bearer {tokens['coordinator']}"}
    viewer = {"Authorization": f"Bearer {tokens['viewer']}"}
    url = "/api/v1/campaigns/sdg1662/quotas"
    body = {"on": ["region", "sex"], "cells": [
        {"values": {"region": "ashanti", "sex": "male"}, "target": 0}]}
    assert client.put(url, json=body, headers=viewer).status_code == 403
    bad = client.put(url, headers=coord, json={
        "on": ["region"], "cells": [{"values": {"region": "accra"}, "target": 3}]})
    assert bad.status_code == 422 and "'accra' is not a choice of region" in bad.json["error"]
    assert client.put(url, headers=coord, json={"on": ["region"]}).status_code == 422
    assert client.put(url, headers=coord, json={"on": ["region"], "cells": [
        {"values": {"region": "ashanti"}, "target": True}]}).status_code == 422
    assert client.get(url, headers=viewer).json == {"on": [], "cells": []}

    resp = client.put(url, json=body, headers=coord)
    assert resp.status_code == 200, resp.json
    # A target of 0 closes the cell before anyone completes.
    assert resp.json["cells"] == [{"cell": {"region": "ashanti", "sex": "male"}, "target": 0,
                                   "completed": 0, "screened_out": 0, "full": True}]
    assert json.loads(redis_client.get(quota_key("cd:", channel.campaign_id))) == [
        "ashanti|male"]
    assert client.get(url, headers=viewer).json["on"] == ["region", "sex"]
    stats = client.get("/api/v1/campaigns/sdg1662/stats", headers=viewer).json
    assert stats["quotas"]["cells"][0]["full"] is True
    assert client.delete(url, headers=coord).json == {"on": [], "cells": []}
    assert client.get("/api/v1/campaigns/nope/quotas", headers=viewer).status_code == 404


def test_a_full_cell_by_sms(client: FlaskClient, sms, engine: Engine,  # type: ignore[no-untyped-def]  # noqa: F811
                            redis_client: redis.Redis, env: dict[str, str], tmp_path: Path,
                            app) -> None:  # type: ignore[no-untyped-def]
    """The same screening in an SMS conversation (Twilio): a woman, when women are full,
    is thanked at the sex question and the conversation ends; a man goes on."""
    from test_sms import tw_sms, twiml_text

    quota_file = tmp_path / "quotas.csv"
    quota_file.write_text("sex,target\nfemale,0\nmale,10\n")
    assert run(env, "campaign", "quota", "set", "sdg1662", str(quota_file))[0] == 0
    app.extensions["civicdial"].registry.refresh()
    for n, text in enumerate(["SURVEY", "1", "1"]):
        tw_sms(client, sms.tw, text, f"W{n}")
    code, body = tw_sms(client, sms.tw, "Female", "W3")
    assert code == 200 and FULL in twiml_text(body)
    assert redis_client.keys("cd:st:*") == []
    for n, text in enumerate(["SURVEY", "1", "1"]):
        tw_sms(client, sms.tw, text, f"M{n}", phone="+233240007777")
    code, body = tw_sms(client, sms.tw, "Male", "M3", phone="+233240007777")
    assert "How old are you?" in twiml_text(body)
    drain(redis_client, engine, "cd:events")
    with Session(engine) as db:
        assert sorted(db.scalars(select(Interview.status))) == ["screened_out", "started"]
