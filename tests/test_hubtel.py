"""Hubtel Programmable Services USSD: the provider's exact payloads, good and bad.

Shapes from the official SDK (hubtel/programmable-services-sdk-dotnet:
ProgrammableServiceRequest, ProgrammableServiceResponse) and the docs' sample
interaction (hubtel.readme.io/reference/sample-general-services-interaction).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from redis_view import counted_out
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from gateway.cli import main
from gateway.store.models import Campaign, Channel, UssdSessionEnd
from gateway.store.sessions import SessionStore
from workers.persist import drain

JSON = "application/json"
SESSION = "8d44f5a3c0a14e8f9b8e2f7d6c5b4a39"
MOBILE = "233246912184"
CODE = "*713*20#"
REPLY_KEYS = {"SessionId", "Type", "Message", "Label", "DataType", "FieldType"}


def add_hubtel_channel(engine: Engine, config: dict[str, Any] | None = None,
                       address: str = CODE) -> Channel:
    """A Hubtel USSD channel on the default campaign, as `channels add` makes one."""
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign))
        assert campaign is not None
        ch = Channel(key="hubtel-test-key", provider="hubtel", kind="ussd", address=address,
                     campaign_id=campaign.id, screen_limit=160,
                     config=json.dumps(config or {}))
        db.add(ch)
        db.flush()
        db.expunge(ch)
    return ch


@pytest.fixture
def hubtel(engine: Engine, channel: Channel) -> Channel:
    return add_hubtel_channel(engine)


@pytest.fixture
def hubtel_url(hubtel: Channel) -> str:
    return f"/webhooks/hubtel/{hubtel.key}/ussd"


def request_json(type_: str = "Initiation", message: str = "*713*20#", sequence: Any = 1,
                 session: str = SESSION, mobile: str = MOBILE, **changes: Any) -> dict[str, Any]:
    """A request as the SDK's ProgrammableServiceRequest serialises it (USSD, MTN)."""
    body: dict[str, Any] = {
        "Type": type_, "Mobile": mobile, "SessionId": session, "ServiceCode": "713*20",
        "Message": message, "Operator": "mtn", "Sequence": sequence, "ClientState": "",
        "Platform": "USSD", "ExtraData": {},
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not Ellipsis}


# The docs' sample interaction, exactly (Sequence as text, an app operator, no Platform).
DOCS_SAMPLE = {"Sequence": "1", "Type": "initiation", "Message": "", "ServiceCode": "713*20",
               "Operator": "Hubtel-Android", "ClientState": "", "Mobile": "233246912184",
               "SessionId": "8d44e7b5c1d34a0f8e0b6c2d9a7f1e53"}

DROP = ...  # a field left out


@dataclass(frozen=True)
class Case:
    label: str
    body: str | bytes | dict[str, Any] | list[Any]
    status: int
    contains: str = ""  # in the Message (200) or the refusal (4xx)
    type_: str = ""  # the reply's Type, for a 200 from the hop
    path: str = "ussd"
    content_type: str = JSON
    method: str = "POST"
    key: str | None = None  # None: the Hubtel channel's key


INCOMING = [
    Case("docs sample: initiation from the Hubtel app", DOCS_SAMPLE, 200,
         contains="Language / Kasa:", type_="response"),
    Case("SDK shape: USSD initiation on MTN", request_json(), 200, "Language / Kasa:",
         "response"),
    Case("Type in any case", request_json(type_="INITIATION"), 200, "Language", "response"),
    Case("ServiceCode with star and hash", request_json(ServiceCode="*713*20#"), 200,
         "Language", "response"),
    Case("ServiceCode extension", request_json(ServiceCode="*713*20*5#"), 200, "Language",
         "response"),
    Case("Sequence as text", request_json(sequence="1"), 200, "Language", "response"),
    Case("optional fields null", request_json(ClientState=None, Platform=None,
                                              ExtraData=None, Operator=None), 200, "Language",
         "response"),
    Case("optional fields left out", request_json(ClientState=DROP, Platform=DROP,
                                                  ExtraData=DROP, Operator=DROP,
                                                  Message=DROP), 200, "Language", "response"),
    Case("Telecel operator, ExtraData with values",
         request_json(Operator="vodafone-gh", ExtraData={"k": [1, {"x": None}]}), 200,
         "Language", "response"),
    Case("phone with plus", request_json(mobile="+233246912184"), 200, "Language",
         "response"),
    Case("a field Hubtel may add later", request_json(NewField="x"), 200, "Language",
         "response"),
    Case("charset in the content type", json.dumps(request_json()), 200, "Language",
         "response", content_type="application/json; charset=utf-8"),
    Case("release of an unknown session is recorded", request_json(type_="Release"), 200,
         type_="release"),
    Case("timeout is recorded", request_json(type_="timeout", sequence=3), 200,
         type_="release"),
    Case("release without ServiceCode or Message",
         request_json(type_="release", ServiceCode=DROP, Message=DROP), 200, type_="release"),
    Case("fulfilment POST (never expected: no payment)", {"SessionId": SESSION,
                                                          "OrderId": "o1"}, 200,
         contains="OK", path="ussd/fulfilment"),
    Case("fulfilment reachability GET", "", 200, contains="OK", path="ussd/fulfilment",
         method="GET"),
    # -- refused --------------------------------------------------------------------------
    Case("missing Type", request_json(Type=DROP), 400, "Type"),
    Case("missing SessionId", request_json(SessionId=DROP), 400, "SessionId"),
    Case("missing Mobile", request_json(Mobile=DROP), 400, "Mobile"),
    Case("missing Sequence", request_json(Sequence=DROP), 400, "Sequence"),
    Case("missing ServiceCode", request_json(ServiceCode=DROP), 400, "ServiceCode"),
    Case("response without Message", request_json(type_="Response", sequence=2,
                                                  Message=DROP), 400, "Message"),
    Case("empty SessionId", request_json(session=""), 400, "SessionId"),
    Case("unknown Type", request_json(type_="bogus"), 400, "unknown Type"),
    Case("query Type (pre-filled steps: not offered)", request_json(type_="Query"), 400,
         "unknown Type"),
    Case("AddToCart Type", request_json(type_="AddToCart"), 400, "unknown Type"),
    Case("Type not text", request_json(Type=1), 400, "Type must be text"),
    Case("Sequence a word", request_json(sequence="one"), 400, "Sequence"),
    Case("Sequence negative", request_json(sequence=-1), 400, "Sequence must be a whole "
         "number from 0 to 999999999, not a negative number"),
    Case("Sequence zero (Hubtel counts from 1)", request_json(sequence=0), 400, "Sequence"),
    Case("Sequence a fraction", request_json(sequence=1.5), 400, "not a fraction"),
    Case("Sequence true", request_json(sequence=True), 400, "Sequence"),
    Case("Sequence huge", request_json(sequence=10**12), 400, "not a larger number"),
    Case("Mobile a JSON number", request_json(mobile=233246912184), 400, "Mobile must be text"),
    Case("Mobile not a number", request_json(mobile="hello"), 400, "Mobile"),
    Case("Mobile in local format", request_json(mobile="0246912184"), 400, "Mobile"),
    Case("Message not text", request_json(message=["1"]), 400, "Message must be text"),
    Case("Message too long", request_json(message="1" * 1001), 400, "Message"),
    Case("SessionId too long", request_json(session="S" * 500), 400, "SessionId"),
    Case("control characters", request_json(session="S\u0000"), 400, "control"),
    Case("ExtraData a list", request_json(ExtraData=[1]), 400, "ExtraData"),
    Case("other service code", request_json(ServiceCode="*384*1#"), 400, "ServiceCode"),
    Case("release for another service code", request_json(type_="release",
                                                        ServiceCode="384"), 400,
         "ServiceCode"),
    Case("a JSON list, not an object", [request_json()], 400, "JSON object"),
    Case("not JSON at all", "Type=initiation", 400, "not valid JSON"),
    Case("truncated JSON", json.dumps(request_json())[:-5], 400, "not valid JSON"),
    Case("deeply nested JSON", "[" * 5_000 + "]" * 5_000, 400, "nested"),
    Case("non-UTF-8 body", b'{"Type": "initiation", "Message": "\xff\xfe"}', 400, "UTF-8"),
    Case("form-encoded instead of JSON", "Type=initiation&SessionId=S1", 415,
         "application/json", content_type="application/x-www-form-urlencoded"),
    Case("text/plain", json.dumps(request_json()), 415, "application/json",
         content_type="text/plain"),
    Case("oversized body", request_json(ExtraData={"pad": "x" * 40_000}), 413),
    Case("GET is not allowed", "", 405, method="GET"),
    Case("unknown channel key", request_json(), 404, "unknown channel", key="not-a-key"),
    Case("fulfilment, unknown channel key", {}, 404, "unknown channel",
         path="ussd/fulfilment", key="not-a-key"),
    Case("response for a session that never started", request_json(type_="Response",
                                                                   sequence=2, message="1"),
         409, "unknown session"),
]


def post(client: FlaskClient, url: str, body: Any, content_type: str = JSON,
         method: str = "POST") -> Any:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.open(url, method=method, data=data, content_type=content_type)


@pytest.mark.parametrize("case", INCOMING, ids=lambda c: c.label)
def test_incoming(client: FlaskClient, hubtel: Channel, redis_client: redis.Redis,
                  caplog: pytest.LogCaptureFixture, case: Case) -> None:
    """Each payload gets the status and body Hubtel expects; a refusal is one log line
    and leaves Redis untouched."""
    caplog.set_level("WARNING", logger="civicdial.webhooks")
    key = case.key or hubtel.key
    resp = post(client, f"/webhooks/hubtel/{key}/{case.path}", case.body, case.content_type,
                case.method)
    body = resp.get_data(as_text=True)
    assert resp.status_code == case.status, body
    lines = [r.getMessage() for r in caplog.records if r.name == "civicdial.webhooks"]
    if case.status >= 400:
        assert case.contains in body
        assert len(lines) == 1 and str(case.status) in lines[0]
        assert key not in lines[0] and MOBILE not in lines[0]
        assert counted_out(redis_client.keys("*")) == []
        return
    if case.path != "ussd":
        assert body == case.contains
        return
    reply = json.loads(body)
    assert resp.mimetype == JSON
    assert set(reply) == REPLY_KEYS
    assert reply["Type"] == case.type_
    assert reply["SessionId"] == (case.body["SessionId"]  # type: ignore[index]
                                  if isinstance(case.body, dict) else SESSION)
    assert reply["DataType"] == ("display" if case.type_ == "release" else "input")
    assert reply["FieldType"] in ("text", "number")
    assert reply["Label"] == "Survey"
    assert reply["Message"].startswith(case.contains)
    assert len(reply["Message"]) <= 160


def hop(client: FlaskClient, url: str, type_: str, sequence: Any, message: str = "",
        session: str = SESSION, mobile: str = MOBILE) -> tuple[int, dict[str, Any] | str]:
    resp = post(client, url, request_json(type_, message, sequence, session, mobile))
    body = resp.get_data(as_text=True)
    return resp.status_code, json.loads(body) if resp.status_code == 200 else body


def snapshot(redis_client: redis.Redis) -> tuple[dict[bytes, bytes | None], int]:
    """Every interview state and the stream's length."""
    return ({k: redis_client.get(k) for k in redis_client.keys("cd:st:*")},
            SessionStore(redis_client).waiting())


def test_repeated_sequence_gets_the_same_reply_and_changes_nothing(
        client: FlaskClient, hubtel_url: str, redis_client: redis.Redis) -> None:
    """A request sent again with the same SessionId and Sequence is a retry."""
    first = hop(client, hubtel_url, "initiation", 1, "*713*20#")
    assert hop(client, hubtel_url, "initiation", 1, "*713*20#") == first
    hop(client, hubtel_url, "response", 2, "1")  # English
    status, consent = hop(client, hubtel_url, "response", "3", "1")  # yes, Sequence as text
    before = snapshot(redis_client)
    for sequence in (3, "3"):
        assert hop(client, hubtel_url, "response", sequence, "1") == (status, consent)
    assert snapshot(redis_client) == before
    assert isinstance(consent, dict) and consent["Message"].startswith("What is your sex?")
    assert consent["FieldType"] == "number" and consent["DataType"] == "input"


@pytest.mark.parametrize("sequence", [5, 2, 1, 0], ids=["skips", "goes back one",
                                                        "back to the start", "zero"])
def test_sequence_that_does_not_follow_is_refused(client: FlaskClient, hubtel_url: str,
                                                  redis_client: redis.Redis,
                                                  sequence: int) -> None:
    """Sequence 3 is next; anything but 3 (or the retry 2) gets 409 and changes nothing."""
    hop(client, hubtel_url, "initiation", 1)
    _, language_done = hop(client, hubtel_url, "response", 2, "1")
    before = snapshot(redis_client)
    if sequence == 2:
        assert hop(client, hubtel_url, "response", 2, "2") == (200, language_done)
    else:
        status, body = hop(client, hubtel_url, "response", sequence, "1")
        if sequence == 0:  # no Sequence Hubtel sends at all
            assert status == 400 and "1 or more" in str(body)
        else:
            assert status == 409 and "does not follow" in str(body)
    assert snapshot(redis_client) == before
    status, body = hop(client, hubtel_url, "response", 3, "1")
    assert status == 200 and isinstance(body, dict)
    assert body["Message"].startswith("What is your sex?")


def test_initiation_again_in_a_session_under_way_is_refused(client: FlaskClient,
                                                            hubtel_url: str) -> None:
    """An initiation that is not a retry of the first request does not restart anything."""
    hop(client, hubtel_url, "initiation", 1)
    hop(client, hubtel_url, "response", 2, "1")
    status, body = hop(client, hubtel_url, "initiation", 3)
    assert status == 409


def test_session_id_reused_by_another_phone_is_refused(client: FlaskClient,
                                                       hubtel_url: str) -> None:
    """A SessionId belongs to one phone number."""
    hop(client, hubtel_url, "initiation", 1)
    status, _ = hop(client, hubtel_url, "response", 2, "1", mobile="233209999999")
    assert status == 409


def test_timeout_is_recorded_and_the_next_dial_resumes(client: FlaskClient, hubtel_url: str,
                                                       hubtel: Channel, engine: Engine,
                                                       redis_client: redis.Redis) -> None:
    """Hubtel's timeout ends the session, is recorded once however often it comes, and
    the next dial offers to continue at the same question."""
    hop(client, hubtel_url, "initiation", 1)
    hop(client, hubtel_url, "response", 2, "1")
    _, asked = hop(client, hubtel_url, "response", 3, "1")  # consented; now at sex
    assert isinstance(asked, dict) and asked["Message"].startswith("What is your sex?")
    for _ in range(2):
        status, ended = hop(client, hubtel_url, "Timeout", 4)
        assert status == 200 and isinstance(ended, dict)
        assert ended["Type"] == "release" and ended["DataType"] == "display"
    status, back = hop(client, hubtel_url, "initiation", 1, session="second-dial")
    assert isinstance(back, dict)
    assert back["Message"].startswith("Welcome back.\n1 Continue\n2 Start again")
    _, again = hop(client, hubtel_url, "response", 2, "1", session="second-dial")
    assert again == {**asked, "SessionId": "second-dial"}
    drain(redis_client, engine, "cd:events")
    with Session(engine) as db:
        (end,) = db.scalars(select(UssdSessionEnd)).all()
    assert (end.channel_id, end.session_id, end.status, end.hops) == (
        hubtel.id, SESSION, "timeout", 4)
    assert "too late" in end.error and end.network_code == "mtn"


def test_release_by_the_user_is_recorded(client: FlaskClient, hubtel_url: str,
                                         engine: Engine, redis_client: redis.Redis) -> None:
    """The user ending the session is recorded as a release; the interview waits."""
    hop(client, hubtel_url, "initiation", 1)
    hop(client, hubtel_url, "response", 2, "1")
    hop(client, hubtel_url, "response", 3, "1")
    assert hop(client, hubtel_url, "release", 4)[0] == 200
    drain(redis_client, engine, "cd:events")
    with Session(engine) as db:
        assert [e.status for e in db.scalars(select(UssdSessionEnd))] == ["release"]
    assert redis_client.keys("cd:st:*")  # the interview is still there to resume


def test_label_from_channel_config(engine: Engine, channel: Channel, app: Flask) -> None:
    """A channel's `label` config is the title Hubtel's app shows."""
    ch = add_hubtel_channel(engine, {"label": "GSS survey"}, address="*713*21#")
    resp = app.test_client().post(f"/webhooks/hubtel/{ch.key}/ussd", content_type=JSON,
                                  data=json.dumps(request_json(ServiceCode="713*21")))
    assert resp.status_code == 200
    assert json.loads(resp.get_data())["Label"] == "GSS survey"


def test_closed_campaign_says_so(client: FlaskClient, hubtel_url: str, engine: Engine,
                                 app: Flask, redis_client: redis.Redis) -> None:
    """A closed campaign releases the session with a message and keeps nothing."""
    with engine.begin() as conn:
        conn.execute(update(Campaign).values(state="closed"))
    app.extensions["civicdial"].registry.refresh()
    status, body = hop(client, hubtel_url, "initiation", 1)
    assert isinstance(body, dict)
    assert body["Type"] == "release" and body["Message"].startswith("This survey is not open")
    assert counted_out(redis_client.keys("*")) == []


def test_keys_do_not_cross_providers(client: FlaskClient, hubtel: Channel,
                                     channel: Channel) -> None:
    """A Hubtel key on Africa's Talking's URL, and the other way round, is unknown."""
    at = client.post(f"/webhooks/africastalking/{hubtel.key}/ussd", data="text=",
                     content_type="application/x-www-form-urlencoded")
    hub = post(client, f"/webhooks/hubtel/{channel.key}/ussd", request_json())
    assert at.status_code == hub.status_code == 404


def test_channels_add_hubtel_and_arkesel(env: dict[str, str], channel: Channel,
                                         client: FlaskClient) -> None:
    """`channels add --provider hubtel` prints the Service Interaction and fulfilment URLs,
    and both answer; Arkesel gets its one URL; neither has an SMS channel."""
    def cli(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
        return result.exit_code, result.output

    code, out = cli("channels", "add", "--provider", "hubtel", "--kind", "ussd",
                    "--address", "*713*20#", "--campaign", "sdg1662", "--json")
    assert code == 0, out
    urls = json.loads(out)["urls"]
    assert set(urls) == {"ussd", "fulfilment"}
    assert re.fullmatch(r"http://127\.0\.0\.1:8000/webhooks/hubtel/[\w-]{24}/ussd", urls["ussd"])
    assert urls["fulfilment"] == urls["ussd"] + "/fulfilment"
    resp = post(client, urlsplit(urls["ussd"]).path, request_json())
    assert json.loads(resp.get_data())["Message"].startswith("Language / Kasa:")
    assert post(client, urlsplit(urls["fulfilment"]).path, {}).status_code == 200

    code, out = cli("channels", "add", "--provider", "arkesel", "--kind", "ussd",
                    "--address", "*928*311#", "--json")
    assert code == 0 and set(json.loads(out)["urls"]) == {"ussd"}
    listed = json.loads(cli("channels", "--json")[1])
    assert [c["provider"] for c in listed] == ["africastalking", "hubtel", "arkesel"]
    code, out = cli("channels", "add", "--provider", "hubtel", "--kind", "sms",
                    "--address", "1662")
    assert code != 0 and "hubtel has no sms channel" in out


def sent_kinds(redis_client: redis.Redis) -> list[str]:
    """The kinds of SMS queued through the stream (hand-overs, reminders, ...)."""
    return [e["kind"] for _, f in redis_client.xrange("cd:events")
            if (e := json.loads(f[b"e"]))["k"] == "send"]


@pytest.fixture
def handover_campaign(engine: Engine, channel: Channel) -> None:
    """Hand-over on, an SMS channel, and a 3-screen budget (a part break comes soon)."""
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign))
        assert campaign is not None
        campaign.sms_handover, campaign.budget_screens = True, 3
        db.add(Channel(key="at-sms-key", provider="africastalking", kind="sms",
                       address="1662", campaign_id=campaign.id,
                       config=json.dumps({"username": "sandbox", "api_key": "k"})))


def test_timeout_mid_interview_hands_over_to_sms(handover_campaign: None,
                                                 client: FlaskClient, hubtel_url: str,
                                                 redis_client: redis.Redis) -> None:
    """With --sms-handover, a Hubtel timeout in an unfinished interview offers the rest by
    SMS, once, however often the timeout comes."""
    hop(client, hubtel_url, "initiation", 1)
    hop(client, hubtel_url, "response", 2, "1")
    hop(client, hubtel_url, "response", 3, "1")  # consented; now at sex
    for _ in range(2):
        hop(client, hubtel_url, "timeout", 4)
    assert sent_kinds(redis_client) == ["handover"]


def test_release_after_a_part_break_is_no_drop(handover_campaign: None, client: FlaskClient,
                                               hubtel_url: str,
                                               redis_client: redis.Redis) -> None:
    """A release after "Part 1 of n done" is the pause we announced: no SMS hand-over, and
    the next dial continues at the next question."""
    hop(client, hubtel_url, "initiation", 1)
    hop(client, hubtel_url, "response", 2, "1")
    hop(client, hubtel_url, "response", 3, "1")
    _, part = hop(client, hubtel_url, "response", 4, "1")  # sex; the budget is spent
    assert isinstance(part, dict) and part["Type"] == "release"
    assert part["Message"].startswith("Part 1 of ") and "Dial *713*20#" in part["Message"]
    hop(client, hubtel_url, "release", 5)
    assert sent_kinds(redis_client) == []
    _, next_part = hop(client, hubtel_url, "initiation", 1, session="part-two")
    assert isinstance(next_part, dict) and next_part["Message"].startswith("How old are you?")


REFUSED_BY_PARSING = [c for c in INCOMING
                      if c.status in (400, 405, 413, 415) and c.path == "ussd" and not c.key]


@pytest.mark.parametrize("case", REFUSED_BY_PARSING, ids=lambda c: c.label)
def test_bad_input_mid_session_changes_nothing(client: FlaskClient, hubtel_url: str,
                                               redis_client: redis.Redis, case: Case) -> None:
    """Refused in the middle of an interview: the session is as it was and carries on."""
    hop(client, hubtel_url, "initiation", 1)
    hop(client, hubtel_url, "response", 2, "1")
    before = snapshot(redis_client), redis_client.keys("cd:ps:*")
    resp = post(client, hubtel_url, case.body, case.content_type, case.method)
    assert resp.status_code == case.status
    assert (snapshot(redis_client), redis_client.keys("cd:ps:*")) == before
    status, body = hop(client, hubtel_url, "response", 3, "1")
    assert status == 200 and isinstance(body, dict)
    assert body["Message"].startswith("What is your sex?")
