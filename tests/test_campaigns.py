"""Campaign lifecycle, questionnaire versions, tokens and the audit log, from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from gateway.coordination.campaigns import hash_token
from gateway.store.models import ApiToken, Campaign, Channel

SHIPPED = Path(__file__).parents[1] / "questionnaires" / "sdg1662.md"


def run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main_group(), list(args), env=env)
    return result.exit_code, result.output


def main_group():  # type: ignore[no-untyped-def]
    from gateway.cli import main

    return main


def test_questionnaire_versions_are_immutable_and_listed(env: dict[str, str], engine: Engine,
                                                         tmp_path: Path) -> None:
    """Loading stores a version by content hash; loading it again is a no-op; a changed
    form is a new version; a bad form is refused with sheet, row and column."""
    code, out = run(env, "questionnaire", "load", str(SHIPPED), "--json")
    first = json.loads(out)
    assert code == 0 and first["new"] is True and first["questions"] == 43
    assert json.loads(run(env, "questionnaire", "load", str(SHIPPED), "--json")[1])["new"] is False
    changed = tmp_path / "v2.md"
    changed.write_text(SHIPPED.read_text().replace("How old are you?", "Your age?"))
    second = json.loads(run(env, "questionnaire", "load", str(changed), "--json")[1])
    assert second["version"] != first["version"]
    listed = json.loads(run(env, "questionnaire", "list", "--json")[1])
    assert [q["version"] for q in listed] == [first["version"], second["version"]]
    assert listed[0]["languages"] == ["English (en)", "Twi (tw)"]
    bad = tmp_path / "bad.md"
    bad.write_text("| survey |\n|  | type | name | label |\n|  | geopoint | where | Where? |\n")
    code, out = run(env, "questionnaire", "load", str(bad))
    assert code == 1 and "sheet 'survey', row 2, column 'type'" in out


def test_campaign_lifecycle_and_audit(env: dict[str, str], engine: Engine,
                                      channel: Channel) -> None:
    """draft -> open -> paused -> open -> closed; impossible moves say what is allowed;
    a code bound to another open campaign blocks opening; everything is audited."""
    version = json.loads(run(env, "questionnaire", "load", str(SHIPPED), "--json")[1])["version"]
    code, out = run(env, "campaign", "create", "volta-2027", "--name", "Volta 2027",
                    "--questionnaire", version, "--target-size", "800", "--json")
    assert code == 0 and json.loads(out)["state"] == "draft"
    assert "already exists" in run(env, "campaign", "create", "volta-2027", "--name", "x",
                                   "--questionnaire", version)[1]
    assert "no questionnaire version" in run(env, "campaign", "create", "x2", "--name", "x",
                                             "--questionnaire", "nope")[1]
    code, out = run(env, "channels", "add", "--provider", "africastalking", "--kind", "ussd",
                    "--address", "*920*16#", "--campaign", "volta-2027")
    assert code == 0
    code, out = run(env, "campaign", "open", "volta-2027")
    assert code == 1 and "bound to open campaign sdg1662" in out
    assert run(env, "campaign", "close", "sdg1662")[0] == 0
    for verb, state in [("open", "open"), ("pause", "paused"), ("open", "open"),
                        ("close", "closed")]:
        code, out = run(env, "campaign", verb, "volta-2027", "--json")
        assert code == 0 and json.loads(out)["state"] == state, out
    code, out = run(env, "campaign", "open", "volta-2027")
    assert code == 1 and "closed: it can go to nothing" in out
    listed = {c["slug"]: c["state"] for c in json.loads(run(env, "campaign", "list",
                                                            "--json")[1])}
    assert listed == {"sdg1662": "closed", "volta-2027": "closed"}
    status = json.loads(run(env, "campaign", "status", "volta-2027", "--json")[1])
    assert status["interviews_started"] == 0
    log = json.loads(run(env, "audit", "--json", "--limit", "100")[1])
    actions = [(e["action"], e["target"]) for e in reversed(log)]
    assert ("campaign.create", "volta-2027") in actions
    assert actions.count(("campaign.open", "volta-2027")) == 2
    assert ("channel.add", "africastalking/ussd/*920*16#") in actions
    pause = next(e for e in log if e["action"] == "campaign.pause")
    assert (pause["before"]["state"], pause["after"]["state"]) == ("open", "paused")
    assert all(e["actor"].startswith("cli") for e in log)


@pytest.mark.parametrize("role", ["admin", "coordinator", "viewer"])
def test_tokens_are_stored_hashed(env: dict[str, str], engine: Engine, role: str) -> None:
    """A token is shown once and only its hash is stored."""
    code, out = run(env, "token", "create", "--role", role, "--name", "district office")
    token = out.strip()
    assert code == 0 and token.startswith("cd_") and len(token) > 40
    with Session(engine) as db:
        row = db.scalar(select(ApiToken))
    assert row is not None and row.role == role and row.token_hash == hash_token(token)
    assert token not in json.dumps(json.loads(run(env, "token", "list", "--json")[1]))
    assert run(env, "token", "create", "--role", "root", "--name", "x")[0] == 2
    code, out = run(env, "token", "create", "--role", role, "--name", "a script", "--json")
    made = json.loads(out)
    assert code == 0 and made["name"] == "a script" and made["role"] == role
    listed = {t["id"]: t["name"] for t in json.loads(run(env, "token", "list", "--json")[1])}
    assert listed[made["id"]] == "a script"
    assert made["token"].startswith("cd_") and made["token"] != token
    with Session(engine) as db:
        assert db.get(ApiToken, made["id"]).token_hash == hash_token(made["token"])


def test_token_revoke_ends_its_console_sessions(env: dict[str, str], app, engine: Engine,  # type: ignore[no-untyped-def]
                                               ) -> None:
    """`token revoke NAME --json`: the token stops working for the API at once, and the
    browser signed in with it is signed out at its next click (its server-side session
    is ended, not just the token); a second revoke finds nothing (exit 1)."""
    from test_dashboard import signed_in_client

    token = run(env, "token", "create", "--role", "coordinator", "--name", "district office")[
        1].strip()
    run(env, "token", "create", "--role", "viewer", "--name", "someone else")
    browser = signed_in_client(app.test_client(), token)
    assert browser.get("/dashboard/").status_code == 200
    api = app.test_client()
    auth = {"Authorization": f"Bearer {token}"}
    assert api.get("/api/v1/campaigns", headers=auth).status_code == 200
    code, out = run(env, "token", "revoke", "district office", "--json")
    assert code == 0, out
    done = json.loads(out)
    assert [(t["name"], t["role"]) for t in done["revoked"]] == [
        ("district office", "coordinator")] and done["sessions_ended"] == 1
    resp = browser.get("/dashboard/")
    assert resp.status_code == 303 and "error=expired" in resp.headers["Location"]
    assert api.get("/api/v1/campaigns", headers=auth).status_code == 401
    listed = {t["name"]: t["revoked"] for t in json.loads(run(env, "token", "list", "--json")[1])}
    assert listed == {"district office": True, "someone else": False}
    code, out = run(env, "token", "revoke", "district office", "--json")
    assert code == 1 and json.loads(out) == {"revoked": [], "sessions_ended": 0}
    other = json.loads(run(env, "token", "list", "--json")[1])[1]["id"]
    code, out = run(env, "token", "revoke", f"#{other}")
    assert code == 0 and "someone else" in out and "0 console session(s)" in out


def test_schedule_limits_when_a_campaign_answers(env: dict[str, str], client, app,  # type: ignore[no-untyped-def]
                                                 ussd_url: str) -> None:
    """Before opens_at or after closes_at an open campaign says it is not open."""
    hop = {"sessionId": "S1", "serviceCode": "*920*16#", "phoneNumber": "+233241234567",
           "networkCode": "62001", "text": ""}
    registry = app.extensions["civicdial"].registry
    code, out = run(env, "campaign", "schedule", "sdg1662", "--opens-at", "2999-01-01T00:00:00",
                    "--json")
    assert code == 0 and json.loads(out)["opens_at"].startswith("2999-01-01")
    registry.refresh()
    assert client.post(ussd_url, data=hop).get_data(as_text=True).startswith("END This survey "
                                                                           "is not open")
    run(env, "campaign", "schedule", "sdg1662", "--closes-at", "2000-01-01T00:00:00")
    registry.refresh()
    assert "not open" in client.post(ussd_url, data={**hop, "sessionId": "S2"}).get_data(
        as_text=True)
    run(env, "campaign", "schedule", "sdg1662")  # no limits
    registry.refresh()
    assert client.post(ussd_url, data={**hop, "sessionId": "S3"}).get_data(
        as_text=True).startswith("CON Language")
    code, out = run(env, "campaign", "schedule", "sdg1662", "--opens-at", "2030-01-02",
                    "--closes-at", "2030-01-01")
    assert code == 1 and "closes_at must be after opens_at" in out


def test_new_questionnaire_version_for_a_paused_campaign(
        env: dict[str, str], engine: Engine, client, ussd_url: str, tmp_path: Path,  # type: ignore[no-untyped-def]
        redis_client) -> None:  # type: ignore[no-untyped-def]
    """A new version goes to a draft or paused campaign, never an open one; interviews
    under way finish on the version they started on, new ones get the new version; the
    quotas must fit the new version."""
    from test_engine import SMALL_MD
    from test_quotas import Dialler

    small = tmp_path / "small.md"
    small.write_text(SMALL_MD)
    code, out = run(env, "questionnaire", "load", str(small), "--json")
    assert code == 0, out
    version = json.loads(out)["version"]
    under_way = Dialler(client, ussd_url, "+233240009001")
    assert "Language" in under_way.dial()
    assert "GSS asks adults (18+)" in under_way.send("1")  # shipped consent

    code, out = run(env, "campaign", "set", "sdg1662", "--questionnaire", version)
    assert code != 0 and "is open: pause it" in out
    quotas = tmp_path / "q.csv"
    quotas.write_text("sex,target\nfemale,10\n")
    assert run(env, "campaign", "quota", "set", "sdg1662", str(quotas))[0] == 0
    code, out = run(env, "campaign", "set", "sdg1662", "--state", "paused",
                    "--questionnaire", version)
    assert code != 0 and "quotas do not fit" in out and "'sex' is not" in out
    with Session(engine) as db:  # all or nothing: not even the pause was applied
        assert db.scalar(select(Campaign.state).where(Campaign.slug == "sdg1662")) == "open"
    assert run(env, "campaign", "quota", "clear", "sdg1662")[0] == 0
    code, out = run(env, "campaign", "set", "sdg1662", "--state", "paused",
                    "--questionnaire", version, "--json")
    assert code == 0, out
    assert (json.loads(out)["questionnaire_version"], json.loads(out)["state"]) == (
        version, "paused")
    assert run(env, "campaign", "set", "sdg1662", "--state", "open")[0] == 0
    client.application.extensions["civicdial"].registry.refresh()

    assert "What is your sex?" in under_way.send("1")  # consent: still the shipped form
    newcomer = Dialler(client, ussd_url, "+233240009002")
    newcomer.dial()
    assert "Join the survey?" in newcomer.send("1")


def test_languages_offered(env: dict[str, str], engine: Engine, client,  # type: ignore[no-untyped-def]
                           ussd_url: str, redis_client) -> None:  # type: ignore[no-untyped-def]
    """A campaign can offer only some of its questionnaire's languages: with one, the
    language screen is skipped and the interview is in that language."""
    from test_quotas import Dialler

    code, out = run(env, "campaign", "set", "sdg1662", "--languages", "xx")
    assert code != 0 and "language 'xx' is not in questionnaire" in out and "tw (Twi)" in out
    code, out = run(env, "campaign", "set", "sdg1662", "--languages", "Twi", "--json")
    assert code == 0, out
    assert json.loads(out)["languages"] == ["Twi (tw)"]
    client.application.extensions["civicdial"].registry.refresh()
    twi = Dialler(client, ussd_url, "+233240008001")
    first = twi.dial()
    assert "Language" not in first and "GSS bisa mpanimfo" in first
    assert run(env, "campaign", "set", "sdg1662", "--languages", "all")[0] == 0
    client.application.extensions["civicdial"].registry.refresh()
    assert "Language / Kasa" in Dialler(client, ussd_url, "+233240008002").dial()
    assert "Woye obaa anaa obarima?" in twi.send("1")  # under way: stays in Twi


def test_binding_a_code_held_by_an_open_campaign_is_refused(env: dict[str, str],
                                                           engine: Engine,
                                                           channel: Channel) -> None:
    """`channels add` refuses a USSD code for open campaign B while open campaign A holds
    it (with or without the '#'), and adds nothing; a draft may take it to open later."""
    version = json.loads(run(env, "questionnaire", "load", str(SHIPPED), "--json")[1])["version"]
    for slug in ("volta-2027", "draft-2028"):
        assert run(env, "campaign", "create", slug, "--name", slug, "--questionnaire",
                   version)[0] == 0
    assert run(env, "campaign", "open", "volta-2027")[0] == 0  # no channel yet: no clash
    for code in ("*920*16#", "*920*16"):
        status, out = run(env, "channels", "add", "--provider", "africastalking", "--kind",
                          "ussd", "--address", code, "--campaign", "volta-2027")
        assert status == 1 and "bound to open campaign sdg1662" in out, out
    with Session(engine) as db:
        assert [c.address for c in db.scalars(select(Channel))] == ["*920*16#"]
    log = json.loads(run(env, "audit", "--json", "--limit", "100")[1])
    assert not [e for e in log if e["action"] == "channel.add"]
    # Text that is no USSD code would bind a channel no hop can ever reach.
    for code in ("hello world", "*920*16#; drop", "#", "*"):
        status, out = run(env, "channels", "add", "--provider", "africastalking", "--kind",
                          "ussd", "--address", code, "--campaign", "volta-2027")
        assert status == 1 and "a USSD code such as *920*16#" in out, (code, out)
    # Another code is free; a draft campaign may take the held one, told it must wait.
    assert run(env, "channels", "add", "--provider", "africastalking", "--kind", "ussd",
               "--address", "*920*17#", "--campaign", "volta-2027")[0] == 0
    status, out = run(env, "channels", "add", "--provider", "africastalking", "--kind",
                      "ussd", "--address", "*920*16#", "--campaign", "draft-2028")
    assert status == 0 and "can open once sdg1662 is closed or paused" in out
    assert "bound to open campaign sdg1662" in run(env, "campaign", "open", "draft-2028")[1]
