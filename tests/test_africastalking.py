"""Africa's Talking USSD channel: the provider's exact payloads, good and bad."""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlencode

import pytest
import redis
from flask.testing import FlaskClient

from gateway.store.models import Channel
from gateway.store.sessions import ENDED_SESSION_TTL, ProviderSession, SessionStore

FORM = "application/x-www-form-urlencoded"


def ussd_body(session: str = "ATUid_5d3b4c2b1", text: str = "",
              phone: str = "+233241234567", code: str = "*920*16#",
              network: str = "62001") -> str:
    return urlencode({"sessionId": session, "serviceCode": code, "phoneNumber": phone,
                      "networkCode": network, "text": text})


def events_body(**fields: str) -> str:
    """An end-of-session notification as Africa's Talking posts it."""
    return urlencode({"sessionId": "ATUid_9", "serviceCode": "*920*16#",
                      "networkCode": "62001", "phoneNumber": "+233241234567",
                      "status": "Incomplete", "cost": "GHS 0.05", "durationInMillis": "41234",
                      "hopsCount": "9", **fields})


@dataclass(frozen=True)
class Case:
    label: str
    body: str | bytes
    status: int
    startswith: str = ""
    contains: str = ""
    path: str = "ussd"
    content_type: str = FORM
    method: str = "POST"
    key: str | None = None  # None: the real channel key


INCOMING = [
    Case("first screen", ussd_body(), 200, startswith="CON Language / Kasa:"),
    Case("first screen, AT-encoded star and hash",
         "sessionId=S9&serviceCode=%2A920%2A16%23&phoneNumber=%2B233241234567"
         "&networkCode=62001&text=", 200, startswith="CON "),
    Case("sandbox network code", ussd_body(network="99999"), 200, startswith="CON "),
    Case("service code extension", ussd_body(code="*920*16*5#"), 200, startswith="CON "),
    Case("phone without plus", ussd_body(phone="233241234567"), 200, startswith="CON "),
    Case("no networkCode", "sessionId=S1&serviceCode=%2A920%2A16%23"
         "&phoneNumber=%2B233241234567&text=", 200, startswith="CON "),
    Case("missing sessionId", "serviceCode=%2A920%2A16%23&phoneNumber=%2B233241234567&text=",
         400, contains="sessionId"),
    Case("missing phoneNumber", "sessionId=S1&serviceCode=%2A920%2A16%23&text=", 400,
         contains="phoneNumber"),
    Case("missing serviceCode", "sessionId=S1&phoneNumber=%2B233241234567&text=", 400,
         contains="serviceCode"),
    Case("missing text", "sessionId=S1&serviceCode=%2A920%2A16%23&phoneNumber=%2B233241234567",
         400, contains="text"),
    Case("empty body", "", 400, contains="missing field"),
    Case("phone not a number", ussd_body(phone="hello"), 400, contains="phoneNumber"),
    Case("other service code", ussd_body(code="*384*1#"), 400, contains="serviceCode"),
    Case("sessionId too long", ussd_body(session="S" * 500), 400, contains="sessionId"),
    Case("control characters", ussd_body(session="S\x00"), 400, contains="control"),
    Case("non-UTF-8 body", b"sessionId=S1&serviceCode=%2A920%2A16%23&phoneNumber=%2B233241234567"
         b"&text=%FF%FE", 400, contains="UTF-8"),
    Case("raw non-UTF-8 bytes", b"sessionId=\xff\xfe&text=", 400, contains="UTF-8"),
    Case("JSON instead of form", json.dumps({"sessionId": "S1"}), 415,
         content_type="application/json", contains="x-www-form-urlencoded"),
    Case("oversized body", ussd_body(text="1" * 40_000), 413),
    Case("GET is not allowed", "", 405, method="GET"),
    Case("unknown channel key", ussd_body(), 404, key="not-a-key", contains="unknown channel"),
    Case("events: success", urlencode({
        "date": "2026-11-25 12:00:00", "sessionId": "ATUid_1", "serviceCode": "*920*16#",
        "networkCode": "62001", "phoneNumber": "+233241234567", "status": "Success",
        "cost": "GHS 0.05", "durationInMillis": "41234", "hopsCount": "9",
        "input": "1*1*2", "lastAppResponse": "END Thank you"}), 200, contains="OK",
         path="ussd/events"),
    Case("events: failed with message", urlencode({
        "sessionId": "ATUid_2", "phoneNumber": "+233241234567", "status": "Failed",
        "errorMessage": "Session timed out", "durationInMillis": "bogus"}), 200,
         contains="OK", path="ussd/events"),
    Case("events: unknown status", urlencode({"sessionId": "ATUid_3", "status": "Weird"}),
         400, contains="status", path="ussd/events"),
    Case("events: missing sessionId", urlencode({"status": "Success"}), 400,
         contains="sessionId", path="ussd/events"),
    *[Case(f"events: {name} {value}", events_body(**{name: value}), 400, contains=name,
           path="ussd/events")
      for name in ("durationInMillis", "hopsCount")
      for value in (str(2**63), str(2**64 + 1), str(2**31), "-1", "9" * 25)],
    *[Case(f"{path}: JSON nested {levels} deep",
           '{"requestId": "R1", "status": "Success", "x": %s}' % ("[" * levels + "]" * levels),
           400, contains="nested", path=path, content_type="application/json")
      for path in ("airtime/status", "airtime/validation") for levels in (33, 1000, 5000)],
    Case("airtime validation: NaN is not JSON", '{"transactionId": "T1", "phoneNumber": '
         '"+233241234567", "currencyCode": "GHS", "amount": NaN}', 400, contains="JSON",
         path="airtime/validation", content_type="application/json"),
    *[Case(f"{path}: lone surrogate in JSON text", '{"requestId": "R\\ud800", '
           '"status": "Failed", "transactionId": "T1"}', 400, contains="surrogate",
           path=path, content_type="application/json")
      for path in ("airtime/status", "airtime/validation")],
    Case("events: largest counts", events_body(durationInMillis=str(2**31 - 1),
                                               hopsCount="0"), 200, contains="OK",
         path="ussd/events"),
]


@pytest.mark.parametrize("case", INCOMING, ids=lambda c: c.label)
def test_incoming(client: FlaskClient, channel: Channel, case: Case) -> None:
    """Each payload gets the status and body the provider expects, never a 500."""
    key = case.key or channel.key
    resp = client.open(f"/webhooks/africastalking/{key}/{case.path}", method=case.method,
                       data=case.body, content_type=case.content_type)
    body = resp.get_data(as_text=True)
    assert resp.status_code == case.status, body
    assert resp.mimetype == "text/plain"
    assert body.startswith(case.startswith)
    assert case.contains in body
    if resp.status_code == 200 and case.path == "ussd":
        assert len(body) <= 160


def post(client: FlaskClient, url: str, text: str, session: str = "S1",
         phone: str = "+233241234567") -> tuple[int, str]:
    resp = client.post(url, data=ussd_body(session=session, text=text, phone=phone),
                       content_type=FORM)
    return resp.status_code, resp.get_data(as_text=True)


def test_replayed_hop_returns_same_reply_and_changes_nothing(
        client: FlaskClient, ussd_url: str, redis_client: redis.Redis) -> None:
    """A provider retry of a hop (same sessionId and text) is answered from the cache."""
    post(client, ussd_url, "")
    post(client, ussd_url, "1")
    status, first = post(client, ussd_url, "1*1")
    keys_before = {k: redis_client.get(k) for k in redis_client.keys("cd:st:*")}
    waiting = SessionStore(redis_client).waiting()
    for _ in range(3):
        assert post(client, ussd_url, "1*1") == (200, first)
    assert {k: redis_client.get(k) for k in redis_client.keys("cd:st:*")} == keys_before
    assert SessionStore(redis_client).waiting() == waiting
    assert first.startswith("CON What is your sex?")


def test_text_that_does_not_extend_history_is_refused(client: FlaskClient,
                                                      ussd_url: str,
                                                      redis_client: redis.Redis) -> None:
    """A stale or forged hop gets 409 and leaves the session as it was."""
    post(client, ussd_url, "")
    post(client, ussd_url, "1")
    state = redis_client.keys("cd:st:*")
    before = [redis_client.get(k) for k in state]
    status, body = post(client, ussd_url, "2*2")
    assert status == 409
    assert "extend" in body
    assert [redis_client.get(k) for k in state] == before
    # The session carries on normally afterwards.
    assert post(client, ussd_url, "1*1")[1].startswith("CON What is your sex?")


def test_session_id_reused_by_another_phone_is_refused(client: FlaskClient,
                                                       ussd_url: str) -> None:
    """A sessionId belongs to one phone number."""
    post(client, ussd_url, "", session="SX")
    status, body = post(client, ussd_url, "1", session="SX", phone="+233209999999")
    assert status == 409


def test_answer_containing_a_star(client: FlaskClient, ussd_url: str) -> None:
    """An input containing '*' is taken whole, by diffing against the seen history."""
    post(client, ussd_url, "")
    status, body = post(client, ussd_url, "1*2")  # '1*2' is not a valid language
    assert status == 200
    assert body.startswith("CON Invalid choice.")


def test_closed_campaign_says_so(client: FlaskClient, ussd_url: str, engine,
                                 app) -> None:  # type: ignore[no-untyped-def]
    """A closed campaign answers END and keeps nothing."""
    from sqlalchemy import update

    from gateway.store.models import Campaign

    with engine.begin() as conn:
        conn.execute(update(Campaign).values(state="closed"))
    app.extensions["civicdial"].registry.refresh()
    status, body = post(client, ussd_url, "")
    assert status == 200
    assert body.startswith("END This survey is not open")


def test_webhook_error_is_logged_with_key_masked(client: FlaskClient, channel: Channel,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A refused request leaves one log line, without the channel secret."""
    caplog.set_level("WARNING", logger="civicdial.webhooks")
    client.post(f"/webhooks/africastalking/{channel.key}/ussd", data="text=",
                content_type=FORM)
    lines = [r.getMessage() for r in caplog.records if r.name == "civicdial.webhooks"]
    assert len(lines) == 1
    assert "400" in lines[0] and "missing field" in lines[0]
    assert channel.key not in lines[0]


def test_declined_consent_stores_nothing(client: FlaskClient, ussd_url: str,
                                         redis_client: redis.Redis) -> None:
    """Declining ends politely; no state and no personal data are kept."""
    post(client, ussd_url, "")
    post(client, ussd_url, "1")
    status, body = post(client, ussd_url, "1*2")
    assert body.startswith("END Thank you. Nothing has been recorded")
    assert redis_client.keys("cd:st:*") == []
    events = [json.loads(f[b"e"]) for _, f in redis_client.xrange("cd:events")]
    assert [e["k"] for e in events] == ["declined"]
    assert events[0]["r"] is None


def test_dropped_session_offers_continue(client: FlaskClient, ussd_url: str,
                                         redis_client: redis.Redis) -> None:
    """Dialling again after a drop offers 1 Continue 2 Start again, and 1 resumes; the
    dropped session's replay record is closed (a late retry of it is still a retry:
    tests/test_ended_sessions.py), and expires when it would have."""
    post(client, ussd_url, "", session="A")
    post(client, ussd_url, "1", session="A")
    post(client, ussd_url, "1*1", session="A")  # consented; now at sex
    assert [k.decode().rsplit(":", 1)[1] for k in redis_client.keys("cd:ps:*")] == ["A"]
    status, body = post(client, ussd_url, "", session="B")
    assert body.startswith("CON Welcome back.\n1 Continue\n2 Start again")
    records = {k.decode().rsplit(":", 1)[1]: k for k in redis_client.keys("cd:ps:*")}
    assert sorted(records) == ["A", "B"]
    assert ProviderSession.decode(redis_client.get(records["A"]).decode()).ended
    assert 0 < redis_client.ttl(records["A"]) <= ENDED_SESSION_TTL < redis_client.ttl(records["B"])
    assert post(client, ussd_url, "1", session="B")[1].startswith("CON What is your sex?")


def test_out_of_range_counts_never_reach_the_stream(client: FlaskClient, channel: Channel,
                                                    redis_client: redis.Redis) -> None:
    """A refused notification leaves nothing for the worker; a sound one is streamed."""
    url = f"/webhooks/africastalking/{channel.key}/ussd/events"
    assert client.post(url, data=events_body(durationInMillis=str(2**63)),
                       content_type=FORM).status_code == 400
    assert client.post(url, data=events_body(hopsCount=str(2**64)),
                       content_type=FORM).status_code == 400
    assert redis_client.xlen("cd:events") == 0
    assert client.post(url, data=events_body(), content_type=FORM).status_code == 200
    (_, fields), = redis_client.xrange("cd:events")
    event = json.loads(fields[b"e"])
    assert (event["d"], event["h"]) == (41234, 9)
