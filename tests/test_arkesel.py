"""Arkesel USSD: the provider's exact payloads, good and bad.

Shape: request {sessionID, userID, newSession, msisdn, userData, network}, response
{sessionID, userID, msisdn, continueSession, message} (Arkesel's sample apps; spec
ghana-ussd.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from gateway.store.models import Campaign, Channel
from gateway.store.sessions import SessionStore

JSON = "application/json"
DROP = ...  # a field left out


@pytest.fixture
def arkesel(engine: Engine, channel: Channel) -> Channel:
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign))
        assert campaign is not None
        ch = Channel(key="arkesel-test-key", provider="arkesel", kind="ussd",
                     address="*928*311#", campaign_id=campaign.id, screen_limit=160,
                     config="{}")
        db.add(ch)
        db.flush()
        db.expunge(ch)
    return ch


def body(user_data: str = "*928*311#", new: Any = True, session: str = "1700000000123",
         msisdn: Any = "233246912184", **changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"sessionID": session, "userID": "GSS_USSD", "newSession": new,
                               "msisdn": msisdn, "userData": user_data, "network": "MTN"}
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not Ellipsis}


@dataclass(frozen=True)
class Case:
    label: str
    body: str | bytes | dict[str, Any]
    status: int
    contains: str = ""
    cont: bool | None = None  # continueSession expected, for a 200
    content_type: str = JSON
    key: str | None = None


INCOMING = [
    Case("new session, the code dialled", body(), 200, "Language / Kasa:", True),
    Case("new session, empty userData", body(user_data=""), 200, "Language", True),
    Case("Telecel network", body(network="VODAFONE"), 200, "Language", True),
    Case("no network", body(network=DROP), 200, "Language", True),
    Case("missing sessionID", body(sessionID=DROP), 400, "sessionID"),
    Case("missing userID", body(userID=DROP), 400, "userID"),
    Case("missing newSession", body(newSession=DROP), 400, "newSession"),
    Case("missing msisdn", body(msisdn=DROP), 400, "msisdn"),
    Case("missing userData", body(userData=DROP), 400, "userData"),
    Case("newSession as text", body(new="true"), 400, "newSession must be true or false"),
    Case("newSession as 1", body(new=1), 400, "newSession"),
    Case("msisdn a JSON number", body(msisdn=233246912184), 400, "msisdn must be text"),
    Case("msisdn not a number", body(msisdn="abc"), 400, "msisdn"),
    Case("userData a number", body(userData=1), 400, "userData must be text"),
    Case("userData too long", body(userData="1" * 1001), 400, "userData"),
    Case("sessionID with control characters", body(session="1\u0007"), 400, "control"),
    Case("a JSON string", '"hello"', 400, "JSON object"),
    Case("not JSON", "sessionID=1", 400, "not valid JSON"),
    Case("form-encoded", "sessionID=1", 415, "application/json",
         content_type="application/x-www-form-urlencoded"),
    Case("oversized", body(userData="1" * 20_000), 413),
    Case("unknown channel key", body(), 404, "unknown channel", key="nope"),
    Case("follow-up in a session that never started", body("1", new=False), 409,
         "unknown session"),
]


@pytest.mark.parametrize("case", INCOMING, ids=lambda c: c.label)
def test_incoming(client: FlaskClient, arkesel: Channel, redis_client: redis.Redis,
                  caplog: pytest.LogCaptureFixture, case: Case) -> None:
    """Each payload gets the status and body Arkesel expects; a refusal is one log line and
    leaves Redis untouched."""
    caplog.set_level("WARNING", logger="civicdial.webhooks")
    data = case.body if isinstance(case.body, str | bytes) else json.dumps(case.body)
    resp = client.post(f"/webhooks/arkesel/{case.key or arkesel.key}/ussd", data=data,
                       content_type=case.content_type)
    text = resp.get_data(as_text=True)
    assert resp.status_code == case.status, text
    if case.status >= 400:
        assert case.contains in text
        lines = [r.getMessage() for r in caplog.records if r.name == "civicdial.webhooks"]
        assert len(lines) == 1 and str(case.status) in lines[0]
        assert redis_client.keys("*") == []
        return
    assert isinstance(case.body, dict)
    reply = json.loads(text)
    assert reply == {"sessionID": case.body["sessionID"], "userID": "GSS_USSD",
                     "msisdn": "233246912184", "continueSession": case.cont,
                     "message": reply["message"]}
    assert reply["message"].startswith(case.contains) and len(reply["message"]) <= 160


def send(client: FlaskClient, ch: Channel, user_data: str, new: bool = False) -> dict[str, Any]:
    resp = client.post(f"/webhooks/arkesel/{ch.key}/ussd", content_type=JSON,
                       data=json.dumps(body(user_data, new)))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return json.loads(resp.get_data())  # type: ignore[no-any-return]


def test_interview_over_arkesel(client: FlaskClient, arkesel: Channel,
                                redis_client: redis.Redis) -> None:
    """The same engine: language, consent, the questions; a repeated opening request gets
    the same reply and changes nothing."""
    first = send(client, arkesel, "*928*311#", new=True)
    waiting = SessionStore(redis_client).waiting()
    assert send(client, arkesel, "*928*311#", new=True) == first
    assert SessionStore(redis_client).waiting() == waiting
    assert send(client, arkesel, "1")["message"].startswith("Ghana Statistical Service asks")
    asked = send(client, arkesel, "1")
    assert asked["message"].startswith("What is your sex?") and asked["continueSession"]
    reopened = client.post(f"/webhooks/arkesel/{arkesel.key}/ussd",
                                     content_type=JSON,
                                     data=json.dumps(body("*928*311#", True)))
    assert reopened.status_code == 409  # newSession again, mid-session


def test_declining_ends_the_session(client: FlaskClient, arkesel: Channel) -> None:
    """continueSession false on the last screen."""
    send(client, arkesel, "", new=True)
    send(client, arkesel, "1")
    last = send(client, arkesel, "2")
    assert last["continueSession"] is False
    assert last["message"].startswith("Thank you. Nothing has been recorded")


@pytest.mark.parametrize("case", [c for c in INCOMING if c.status in (400, 413, 415)
                                  and not c.key], ids=lambda c: c.label)
def test_bad_input_mid_session_changes_nothing(client: FlaskClient, arkesel: Channel,
                                               redis_client: redis.Redis, case: Case) -> None:
    """Refused in the middle of an interview: the session is as it was and carries on."""
    send(client, arkesel, "*928*311#", new=True)
    send(client, arkesel, "1")
    before = {k: redis_client.get(k) for k in redis_client.keys("cd:*")}
    data = case.body if isinstance(case.body, str | bytes) else json.dumps(case.body)
    resp = client.post(f"/webhooks/arkesel/{arkesel.key}/ussd", data=data,
                       content_type=case.content_type)
    assert resp.status_code == case.status
    assert {k: redis_client.get(k) for k in redis_client.keys("cd:*")} == before
    assert send(client, arkesel, "1")["message"].startswith("What is your sex?")
