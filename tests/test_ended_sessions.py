"""Hops after END: a provider session that has ended answers a retry of its last hop with
the stored END, and anything else with 409, changing nothing (the rule lives in
gateway/store/sessions.py, so it holds for every provider's USSD hop)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlencode

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, update

from gateway.interview.engine import SessionState, Stage
from gateway.store.models import Campaign
from gateway.store.sessions import (
    ProviderSession,
    SessionEnded,
    encode_state,
    pseudonym,
)

FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Case:
    label: str
    hops: tuple[str, ...]  # the session's hops, the last of which is answered END
    end: str  # how that END starts
    after: str  # a further hop on the same sessionId
    status: int
    budget_screens: int = 15


ENDED = [
    Case("declined, then an answer", ("", "1", "1*2"), "END Thank you. Nothing", "1*2*1", 409),
    Case("declined, then a retry", ("", "1", "1*2"), "END Thank you. Nothing", "1*2", 200),
    Case("too many invalid, then an answer", ("", "9", "9*9", "9*9*9"),
         "END Too many invalid", "9*9*9*1", 409),
    Case("too many invalid, then a retry", ("", "9", "9*9", "9*9*9"),
         "END Too many invalid", "9*9*9", 200),
    Case("part break, then an answer", ("", "1", "1*1", "1*1*1"), "END Part 1 of",
         "1*1*1*2", 409, budget_screens=3),
    Case("part break, then two answers", ("", "1", "1*1", "1*1*1"), "END Part 1 of",
         "1*1*1*2*1", 409, budget_screens=3),
    Case("part break, then a retry", ("", "1", "1*1", "1*1*1"), "END Part 1 of",
         "1*1*1", 200, budget_screens=3),
    Case("part break, then text that does not extend it", ("", "1", "1*1", "1*1*1"),
         "END Part 1 of", "2", 409, budget_screens=3),
]


def _post(client: FlaskClient, url: str, text: str, session: str) -> tuple[int, str]:
    resp = client.post(url, data=urlencode({
        "sessionId": session, "serviceCode": "*920*16#", "phoneNumber": "+233241234567",
        "networkCode": "62001", "text": text}), content_type=FORM)
    return resp.status_code, resp.get_data(as_text=True)


def _redis_snapshot(r: redis.Redis) -> dict[bytes, object]:
    """Every key CivicDial holds, with its value (streams as their entries)."""
    out: dict[bytes, object] = {}
    for key in r.keys("cd:*"):
        if b":lim:" in key:
            continue  # the per-number limit counters count every hop
        kind = r.type(key)
        out[key] = r.xrange(key) if kind == b"stream" else r.dump(key)
    return out


@pytest.mark.parametrize("case", ENDED, ids=lambda c: c.label)
def test_hop_after_end(client: FlaskClient, ussd_url: str, redis_client: redis.Redis,
                       engine: Engine, app: Flask, case: Case) -> None:
    """After END only a retry of the final hop is answered (with the same END)."""
    with engine.begin() as conn:
        conn.execute(update(Campaign).values(budget_screens=case.budget_screens))
    app.extensions["civicdial"].registry.refresh()
    for text in case.hops[:-1]:
        assert _post(client, ussd_url, text, "S1")[1].startswith("CON ")
    status, end = _post(client, ussd_url, case.hops[-1], "S1")
    assert (status, end[:len(case.end)]) == (200, case.end)
    before = _redis_snapshot(redis_client)
    status, body = _post(client, ussd_url, case.after, "S1")
    assert status == case.status, body
    if status == 200:
        assert body == end
    else:
        assert "ended" in body or "extend" in body
    assert _redis_snapshot(redis_client) == before


def test_results_screen_session_is_ended(client: FlaskClient, ussd_url: str,
                                         redis_client: redis.Redis, app: Flask) -> None:
    """After completing, the menu's results screen (END) ends the session; a hop on it is
    refused."""
    services = app.extensions["civicdial"]
    ch = services.registry.channel(ussd_url.split("/")[3])
    respondent = pseudonym(services.settings.pseudonym_key, "+233241234567")
    done = SessionState(version=ch.questionnaire_version, interview="i1", stage=Stage.DONE,
                        lang="English (en)", consented=True, seq=40, updated=time.time())
    assert services.store.commit(
        campaign=ch.campaign_id, respondent=respondent, channel=ch.id, session_id="old",
        expected="", state=encode_state(done), state_ttl=600, provider=None,
        provider_ttl=1, events=[])
    status, menu = _post(client, ussd_url, "", "D")
    assert status == 200 and menu.startswith("CON You have already completed")
    status, end = _post(client, ussd_url, "1", "D")
    assert status == 200 and end.startswith("END ")
    before = _redis_snapshot(redis_client)
    assert _post(client, ussd_url, "1*2", "D")[0] == 409
    assert _post(client, ussd_url, "1", "D") == (200, end)
    assert _redis_snapshot(redis_client) == before


def test_provider_session_record() -> None:
    """The ended flag survives encoding; records written before it read as open."""
    record = ProviderSession("1*2", "END bye", 1, "r", ended=True)
    assert ProviderSession.decode(record.encode()) == record
    assert record.answer_to(retry=True) == "END bye"
    with pytest.raises(SessionEnded):
        record.answer_to(retry=False)
    open_record = ProviderSession("1*2", "CON next", 1, "r", menu="2")
    assert ProviderSession.decode(open_record.encode()) == open_record
    assert open_record.answer_to(retry=False) is None
    assert ProviderSession.decode('["1","CON x",1,"r"]') == ProviderSession("1", "CON x", 1,
                                                                            "r")


def test_hubtel_hop_after_release(client: FlaskClient, engine: Engine,
                                  redis_client: redis.Redis, app: Flask) -> None:
    """The same rule on Hubtel: after the Release, the same Sequence gets the same body;
    the next Sequence gets 409 and changes nothing."""
    from test_hubtel import add_hubtel_channel, request_json

    ch = add_hubtel_channel(engine)
    app.extensions["civicdial"].registry.refresh()
    url = f"/webhooks/hubtel/{ch.key}/ussd"
    client.post(url, json=request_json())
    client.post(url, json=request_json(type_="Response", message="1", sequence=2))
    last = client.post(url, json=request_json(type_="Response", message="2", sequence=3))
    assert last.status_code == 200 and last.get_json()["Type"].lower() == "release"
    before = _redis_snapshot(redis_client)
    again = client.post(url, json=request_json(type_="Response", message="2", sequence=3))
    assert again.get_data() == last.get_data()
    after = client.post(url, json=request_json(type_="Response", message="1", sequence=4))
    assert after.status_code == 409
    assert _redis_snapshot(redis_client) == before


def test_late_retry_of_a_superseded_session(client: FlaskClient, ussd_url: str,
                                            redis_client: redis.Redis) -> None:
    """A citizen redials (session B) and the provider then retries the old session A's
    last hop: A's retry gets A's own last screen and changes nothing, a new input on A gets
    409, and B goes on where it was (once a retry like A's took over B's interview: it
    answered 'Welcome back' and B's next answer was read as a choice on that menu)."""
    for text in ("", "1", "1*1"):
        status, last_a = _post(client, ussd_url, text, "A")
        assert status == 200 and last_a.startswith("CON "), last_a
    assert _post(client, ussd_url, "", "B")[1].startswith("CON Welcome back")
    status, question = _post(client, ussd_url, "1", "B")
    assert status == 200 and question.startswith("CON ") and "Welcome back" not in question
    before = _redis_snapshot(redis_client)
    assert _post(client, ussd_url, "1*1", "A") == (200, last_a)
    status, body = _post(client, ussd_url, "1*1*2", "A")
    assert status == 409 and "ended" in body
    assert _redis_snapshot(redis_client) == before
    status, following = _post(client, ussd_url, "1*1", "B")
    assert status == 200 and following.startswith("CON "), following
    assert following != question and "Welcome back" not in following


def test_hops_after_the_provider_says_the_session_ended(
        client: FlaskClient, ussd_url: str, redis_client: redis.Redis) -> None:
    """Africa's Talking's end-of-session notification closes the session: a retry of its
    last hop is still answered alike, a further input gets 409 and changes nothing."""
    for text in ("", "1"):
        status, last = _post(client, ussd_url, text, "S")
    events = client.post(ussd_url + "/events", data=urlencode({
        "sessionId": "S", "phoneNumber": "+233241234567", "serviceCode": "*920*16#",
        "networkCode": "62001", "status": "Failed", "durationInMillis": "60000",
        "hopsCount": "2", "errorMessage": "session timed out", "input": "1",
        "date": "2026-12-02 05:40:00", "cost": "KES 0.0000"}), content_type=FORM)
    assert events.status_code == 200
    before = _redis_snapshot(redis_client)
    assert _post(client, ussd_url, "1", "S") == (200, last)
    status, body = _post(client, ussd_url, "1*1", "S")
    assert status == 409 and "ended" in body
    after = _redis_snapshot(redis_client)
    assert after == before


def test_an_end_notification_for_another_number_or_code_is_refused(
        client: FlaskClient, ussd_url: str, redis_client: redis.Redis) -> None:
    """The end notification is checked as a hop is: another service code gets 400, another
    phone number 409, and neither closes the citizen's session."""
    for text in ("", "1"):
        status, last = _post(client, ussd_url, text, "S")
    note = {"sessionId": "S", "phoneNumber": "+233241234567", "serviceCode": "*920*16#",
            "networkCode": "62001", "status": "Failed", "durationInMillis": "1",
            "hopsCount": "2"}
    before = _redis_snapshot(redis_client)
    for changes, status in (({"serviceCode": "*111#"}, 400),
                            ({"phoneNumber": "+233241009999"}, 409)):
        resp = client.post(ussd_url + "/events", data=urlencode({**note, **changes}),
                           content_type=FORM)
        assert resp.status_code == status, (changes, resp.get_data())
    assert _redis_snapshot(redis_client) == before
    status, screen = _post(client, ussd_url, "1*1", "S")
    assert status == 200 and screen.startswith("CON "), screen


def test_hubtel_hop_after_the_user_released(client: FlaskClient, engine: Engine,
                                            redis_client: redis.Redis, app: Flask) -> None:
    """Hubtel's own Release (the user ended the session) and Timeout close the session:
    the next Sequence gets 409 and stores nothing; a retry of the last hop is answered
    alike."""
    from test_hubtel import add_hubtel_channel, request_json

    ch = add_hubtel_channel(engine)
    app.extensions["civicdial"].registry.refresh()
    url = f"/webhooks/hubtel/{ch.key}/ussd"
    for kind, session in (("Release", "H1"), ("Timeout", "H2")):
        client.post(url, json=request_json(session=session))
        last = client.post(url, json=request_json(type_="Response", message="1", sequence=2,
                                                  session=session))
        assert last.status_code == 200 and last.get_json()["Type"].lower() == "response"
        ended = client.post(url, json=request_json(type_=kind, message="", sequence=3,
                                                   session=session))
        assert ended.status_code == 200
        before = _redis_snapshot(redis_client)
        again = client.post(url, json=request_json(type_="Response", message="1",
                                                   sequence=2, session=session))
        assert again.get_data() == last.get_data()
        after = client.post(url, json=request_json(type_="Response", message="1",
                                                   sequence=3, session=session))
        assert after.status_code == 409, (kind, after.get_data())
        assert _redis_snapshot(redis_client) == before
