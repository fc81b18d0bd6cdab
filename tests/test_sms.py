"""SMS surveys over Africa's Talking and Twilio: real payloads, signatures, the outbound
queue against a local fake provider, keywords, hand-over from USSD."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from unittest.mock import patch
from urllib.parse import urlencode

import pytest
import redis
from fake_providers import FakeProvider, fake_provider
from flask import Flask
from flask.testing import FlaskClient
from rq import SimpleWorker
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session
from twilio.request_validator import RequestValidator

from gateway.interview.segments import count_segments
from gateway.store.crypto import NumberBox
from gateway.store.models import Answer, Campaign, Channel, Interview, OptOut, OutboundMessage
from gateway.store.outbox import BULK_QUEUE, INTERACTIVE_QUEUE, sweep
from gateway.store.sessions import SessionStore, pseudonym
from workers.jobs import QUEUE
from workers.persist import drain

FORM = "application/x-www-form-urlencoded"
PHONE = "+233241234567"
TWILIO_TOKEN = "tw-auth-token"
TWILIO_SID = "AC" + "a" * 32


@dataclass(frozen=True)
class SmsChannels:
    at: Channel
    tw: Channel
    fake: FakeProvider


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with fake_provider() as provider:
        yield provider


def add_channel(engine: Engine, provider: str, address: str, config: dict) -> Channel:
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign))
        assert campaign is not None
        ch = Channel(key=f"{provider}-key-{address.strip('+')}", provider=provider, kind="sms",
                     address=address, campaign_id=campaign.id, config=json.dumps(config))
        db.add(ch)
        db.flush()
        db.expunge(ch)
    return ch


@pytest.fixture
def sms(engine: Engine, channel: Channel, fake: FakeProvider, app: Flask,
        env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> SmsChannels:
    at = add_channel(engine, "africastalking", "1662", {
        "username": "sandbox", "api_key": "at-key", "sender_id": "GSS",
        "base_url": fake.base_url, "rate_per_second": 0})
    tw = add_channel(engine, "twilio", "+15005550006", {
        "account_sid": TWILIO_SID, "auth_token": TWILIO_TOKEN, "from": "+15005550006",
        "base_url": fake.base_url, "rate_per_second": 0})
    app.extensions["civicdial"].registry.refresh()
    # Send jobs read their settings from the environment, as in a worker process.
    for name, value in {**env, "CIVICDIAL_SEND_BACKOFF_SECONDS": "0"}.items():
        monkeypatch.setenv(name, value)
    return SmsChannels(at, tw, fake)


def work(engine: Engine, client: redis.Redis) -> None:
    """What `civicdial worker` does, in-process: persist events, then send."""
    for _ in range(20):  # bounded: retries re-enqueue, drains may create sends
        drain(client, engine, "cd:events")
        SimpleWorker([INTERACTIVE_QUEUE, QUEUE, BULK_QUEUE], connection=client).work(
            burst=True, logging_level="WARNING")
        if client.xlen("cd:events") == 0 and all(
                client.llen(f"rq:queue:{q}") == 0 for q in (INTERACTIVE_QUEUE, BULK_QUEUE)):
            return


def at_sms(client: FlaskClient, ch: Channel, text: str, msg_id: str,
           phone: str = PHONE) -> tuple[int, str]:
    resp = client.post(f"/webhooks/africastalking/{ch.key}/sms", content_type=FORM,
                       data=urlencode({"from": phone, "to": "1662", "text": text,
                                       "date": "2026-11-25 12:00:00", "id": msg_id,
                                       "linkId": "", "networkCode": "62001"}))
    return resp.status_code, resp.get_data(as_text=True)


def twilio_form(body: str, sid: str, phone: str = PHONE, **extra: str) -> dict[str, str]:
    return {"ToCountry": "US", "SmsMessageSid": sid, "NumMedia": "0", "SmsSid": sid,
            "SmsStatus": "received", "Body": body, "To": "+15005550006", "NumSegments": "1",
            "MessageSid": sid, "AccountSid": TWILIO_SID, "From": phone, "ApiVersion":
            "2010-04-01", "FromCountry": "GH", **extra}


def signed_post(client: FlaskClient, path: str, form: dict[str, str],
                signature: str | None = "valid", base: str = "http://localhost") -> tuple[int, str]:
    headers = {}
    if signature == "valid":
        headers["X-Twilio-Signature"] = RequestValidator(TWILIO_TOKEN).compute_signature(
            base + path, form)
    elif signature is not None:
        headers["X-Twilio-Signature"] = signature
    resp = client.post(path, data=urlencode(form), content_type=FORM, headers=headers)
    return resp.status_code, resp.get_data(as_text=True)


def tw_sms(client: FlaskClient, ch: Channel, body: str, sid: str,
           phone: str = PHONE) -> tuple[int, str]:
    return signed_post(client, f"/webhooks/twilio/{ch.key}/sms", twilio_form(body, sid, phone))


def twiml_text(body: str) -> str:
    import xml.etree.ElementTree as ET

    node = ET.fromstring(body).find("Message")
    return "" if node is None else (node.text or "")


# -- Africa's Talking inbound: the provider's exact payloads -----------------------------

@dataclass(frozen=True)
class Case:
    label: str
    body: str | bytes
    status: int
    contains: str = ""
    path: str = "sms"


AT_CASES = [
    Case("keyword starts the survey", urlencode({"from": PHONE, "to": "1662", "text": "SURVEY",
                                                 "date": "2026-11-25 12:00:00", "id": "m1",
                                                 "linkId": "", "networkCode": "62001"}),
         200, "OK"),
    Case("lower-case keyword, no linkId", urlencode({"from": PHONE, "to": "1662",
                                                     "text": " survey ", "id": "m2"}), 200, "OK"),
    Case("local number format", urlencode({"from": "0241234567", "text": "HELP", "id": "m3"}),
         200, "OK"),
    # Real senders phonenumbers calls invalid (a range its metadata does not list yet) are
    # still people: the provider carried their message.
    Case("sender in a range phonenumbers does not list", urlencode({
        "from": "+233590000000", "to": "1662", "text": "SURVEY", "id": "m8"}), 200, "OK"),
    Case("sandbox simulator sender (Kenyan number, no plus)", urlencode({
        "from": "254711082000", "to": "1662", "text": "SURVEY", "id": "m9",
        "networkCode": "99999"}), 200, "OK"),
    Case("missing id", urlencode({"from": PHONE, "text": "SURVEY"}), 400, "missing field id"),
    Case("missing from", urlencode({"id": "m4", "text": "SURVEY"}), 400, "missing field from"),
    Case("sender not a number", urlencode({"from": "MTN-PROMO", "text": "x", "id": "m5"}), 400,
         "from:"),
    Case("body over 1600 characters", urlencode({"from": PHONE, "text": "x" * 1601, "id": "m6"}),
         400, "longer than 1600"),
    Case("non-UTF-8 body", b"from=%2B233241234567&id=m7&text=%FF", 400, "UTF-8"),
    Case("delivery report", urlencode({"id": "ATXid_1", "status": "Success",
                                       "phoneNumber": PHONE, "networkCode": "62001",
                                       "retryCount": "0"}), 200, "OK", "sms/delivery"),
    Case("failed delivery report", urlencode({"id": "ATXid_2", "status": "Failed",
                                              "phoneNumber": PHONE, "failureReason":
                                              "UserInBlackList", "retryCount": "1"}),
         200, "OK", "sms/delivery"),
    Case("delivery report, expired", urlencode({"id": "ATXid_4", "status": "Expired",
                                                "phoneNumber": PHONE, "networkCode": "62001",
                                                "retryCount": "2"}), 200, "OK", "sms/delivery"),
    Case("delivery report, unknown status is logged and accepted",
         urlencode({"id": "ATXid_3", "status": "Lost"}), 200, "OK", "sms/delivery"),
]


@pytest.mark.parametrize("case", AT_CASES, ids=lambda c: c.label)
def test_africastalking_incoming(client: FlaskClient, sms: SmsChannels, case: Case) -> None:
    """Each AT SMS payload gets the status the provider expects, never a 500."""
    resp = client.post(f"/webhooks/africastalking/{sms.at.key}/{case.path}", data=case.body,
                       content_type=FORM)
    assert resp.status_code == case.status
    assert case.contains in resp.get_data(as_text=True)


def test_sms_to_a_ussd_channel_key_is_404(client: FlaskClient, sms: SmsChannels,
                                          channel: Channel) -> None:
    """A channel key only works on its own kind of endpoint."""
    resp = client.post(f"/webhooks/africastalking/{channel.key}/sms", content_type=FORM,
                       data=urlencode({"from": PHONE, "text": "SURVEY", "id": "m1"}))
    assert resp.status_code == 404


# -- Twilio inbound: signatures ---------------------------------------------------------

TWILIO_CASES = [
    ("valid signature", "valid", 200),
    ("missing signature", None, 403),
    ("wrong signature", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=", 403),
    ("signature of another token", RequestValidator("other").compute_signature(
        "http://localhost/x", {}), 403),
]


@pytest.mark.parametrize("label,signature,status", TWILIO_CASES, ids=[c[0] for c in TWILIO_CASES])
def test_twilio_signature(client: FlaskClient, sms: SmsChannels, redis_client: redis.Redis,
                          label: str, signature: str | None, status: int) -> None:
    """Only correctly signed requests change anything."""
    code, body = signed_post(client, f"/webhooks/twilio/{sms.tw.key}/sms",
                             twilio_form("SURVEY", "SM1"), signature)
    assert code == status
    if status == 403:
        assert redis_client.keys("cd:st:*") == []
        assert redis_client.xlen("cd:events") == 0
    else:
        assert twiml_text(body).startswith("Language / Kasa:")


def test_twilio_signature_uses_public_url_behind_proxy(
        client: FlaskClient, sms: SmsChannels, app: Flask) -> None:
    """Behind a proxy, the URL Twilio signed is the configured public one."""
    services = app.extensions["civicdial"]
    services.settings = services.settings.with_(public_base_url="https://gw.example.org")
    path = f"/webhooks/twilio/{sms.tw.key}/sms"
    assert signed_post(client, path, twilio_form("SURVEY", "SM1"))[0] == 403
    assert signed_post(client, path, twilio_form("SURVEY", "SM2"),
                       base="https://gw.example.org")[0] == 200


def test_twilio_tampered_body_is_refused(client: FlaskClient, sms: SmsChannels,
                                        redis_client: redis.Redis, engine: Engine) -> None:
    """A signature over one body does not cover another, and nothing is written."""
    path = f"/webhooks/twilio/{sms.tw.key}/sms"
    form = twilio_form("SURVEY", "SM1")
    signature = RequestValidator(TWILIO_TOKEN).compute_signature("http://localhost" + path, form)
    form["Body"] = "STOP"
    before = {k: redis_client.dump(k) for k in redis_client.keys("cd:*")}
    resp = client.post(path, data=urlencode(form), content_type=FORM,
                       headers={"X-Twilio-Signature": signature})
    assert resp.status_code == 403
    # Nothing was written: no opt-out flag, no state, no stream entry, no reply record.
    assert {k: redis_client.dump(k) for k in redis_client.keys("cd:*")} == before
    assert redis_client.xlen("cd:events") == 0
    work(engine, redis_client)
    with Session(engine) as db:
        for model in (OptOut, Interview, Answer, OutboundMessage):
            assert db.scalar(select(func.count()).select_from(model)) == 0, model


# -- conversations ----------------------------------------------------------------------

# language, consent, sex, age, region (by number), urban, income, WG-SS x6, health yes,
# 5 attributes + overall, primary no, secondary no, government no, improve, results: no
ANSWERS = ["1", "1", "Female", "3", "2", "urban", "2", "1", "No difficulty", "1", "1", "1",
           "1", "yes", "agree", "1", "2", "3", "Strongly Agree.", "2", "2", "2", "2",
           "Clean water at the clinic", "no"]


def test_full_interview_by_sms_on_twilio(client: FlaskClient, sms: SmsChannels,
                                         engine: Engine, redis_client: redis.Redis) -> None:
    """A citizen completes the questionnaire by Twilio SMS, answering by number or label."""
    code, body = tw_sms(client, sms.tw, "SURVEY", "SM0")
    for n, answer in enumerate(ANSWERS, start=1):
        code, body = tw_sms(client, sms.tw, answer, f"SM{n}")
        assert code == 200
        text = twiml_text(body)
        assert "Invalid" not in text and "reply with a number" not in text, (answer, text)
    assert text.startswith("Thank you! Your answers are recorded")
    work(engine, redis_client)
    with Session(engine) as db:
        interview = db.scalar(select(Interview))
        assert interview is not None and interview.status == "completed"
        got = dict(db.execute(select(Answer.question, Answer.value)).all())
    assert got["sex"] == "female" and got["urban"] == "urban" and got["h_acc"] == "a"
    assert got["wg_hear"] == "none" and got["h_used"] == "yes" and got["h_court"] == "sa"
    assert got["improve"] == "Clean water at the clinic"
    assert len(got) == 24


def test_full_interview_by_sms_on_africastalking(client: FlaskClient, sms: SmsChannels,
                                                 engine: Engine,
                                                 redis_client: redis.Redis) -> None:
    """Over AT every reply goes through the outbound queue to the provider's API."""
    at_sms(client, sms.at, "SURVEY", "m0")
    work(engine, redis_client)
    assert sms.fake.bodies_to(PHONE)[-1].startswith("Language / Kasa:")
    for n, answer in enumerate(ANSWERS, start=1):
        assert at_sms(client, sms.at, answer, f"m{n}") == (200, "OK")
        work(engine, redis_client)
        assert len(sms.fake.bodies_to(PHONE)) == n + 1, answer
    assert sms.fake.bodies_to(PHONE)[-1].startswith("Thank you! Your answers are recorded")
    assert {m["from"] for m in sms.fake.accepted} == {"GSS"}
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(Answer)) == 24
        statuses = db.scalars(select(OutboundMessage.status)).all()
        assert set(statuses) == {"sent"} and len(statuses) == len(ANSWERS) + 1
        # The number is stored encrypted, and only where sending needs it.
        row = db.scalars(select(OutboundMessage)).first()
        assert row is not None and PHONE not in row.recipient


def test_provider_redelivery_is_processed_once(client: FlaskClient, sms: SmsChannels,
                                               engine: Engine,
                                               redis_client: redis.Redis) -> None:
    """The same message id twice: one state change, one reply sent."""
    at_sms(client, sms.at, "SURVEY", "m0")
    at_sms(client, sms.at, "1", "m1")
    state = redis_client.get(next(iter(redis_client.scan_iter("cd:st:*"))))
    assert at_sms(client, sms.at, "1", "m1") == (200, "OK")
    assert redis_client.get(next(iter(redis_client.scan_iter("cd:st:*")))) == state
    work(engine, redis_client)
    assert len(sms.fake.bodies_to(PHONE)) == 2
    first = tw_sms(client, sms.tw, "SURVEY", "SMdup", phone="+233201111111")
    assert tw_sms(client, sms.tw, "SURVEY", "SMdup", phone="+233201111111") == first


def test_keywords_help_lang_and_invalid_hint(client: FlaskClient, sms: SmsChannels) -> None:
    """HELP says who and how to stop; LANG switches language mid-question; a wrong answer
    gets a hint with the valid range."""
    assert "Text SURVEY to take part" in twiml_text(tw_sms(client, sms.tw, "hello", "S1")[1])
    assert "STOP" in twiml_text(tw_sms(client, sms.tw, "HELP", "S2")[1])
    tw_sms(client, sms.tw, "SURVEY", "S3")
    tw_sms(client, sms.tw, "1", "S4")
    consent = twiml_text(tw_sms(client, sms.tw, "maybe", "S5")[1])
    assert consent.startswith("Please reply with a number from 1 to 2.")
    assert twiml_text(tw_sms(client, sms.tw, "LANG", "S6")[1]).startswith("Language / Kasa")
    twi = twiml_text(tw_sms(client, sms.tw, "2", "S7")[1])
    assert twi.startswith("GSS bisa mpanimfoɔ (18+)")
    assert "ɛ" in twi  # SMS keeps Twi letters (USSD folds them)
    assert twiml_text(tw_sms(client, sms.tw, "aane, mepene so", "S8")[1]).startswith("Woyɛ ɔbaa")


def test_stop_is_respected_by_later_messages(client: FlaskClient, sms: SmsChannels,
                                             engine: Engine, redis_client: redis.Redis,
                                             settings) -> None:  # type: ignore[no-untyped-def]
    """After STOP (confirmed once), an invitation to that number is never sent; START
    opts back in."""
    at_sms(client, sms.at, "SURVEY", "m0")
    work(engine, redis_client)
    at_sms(client, sms.at, "STOP", "m1")
    at_sms(client, sms.at, "STOP", "m2")  # confirmed once only
    at_sms(client, sms.at, "1", "m3")  # ignored while opted out
    work(engine, redis_client)
    bodies = sms.fake.bodies_to(PHONE)
    assert len(bodies) == 2 and bodies[1].startswith("You will get no more messages")
    respondent = pseudonym(settings.pseudonym_key, PHONE)
    with Session(engine) as db, db.begin():
        assert db.get(OptOut, respondent) is not None
        db.add(OutboundMessage(key="invite:1", channel_id=sms.at.id, respondent=respondent,
                               recipient=NumberBox(settings.encryption_key).seal(PHONE),
                               body="Please take our survey", kind="invitation", priority=1))
    sweep(settings, engine, redis_client, older_than=timedelta(0))
    work(engine, redis_client)
    with Session(engine) as db:
        assert db.scalar(select(OutboundMessage.status).where(
            OutboundMessage.key == "invite:1")) == "stopped"
    assert len(sms.fake.bodies_to(PHONE)) == 2
    at_sms(client, sms.at, "START", "m4")
    work(engine, redis_client)
    assert sms.fake.bodies_to(PHONE)[-1].startswith("Language / Kasa")


def test_twilio_advanced_opt_out_is_recorded_without_reply(
        client: FlaskClient, sms: SmsChannels, redis_client: redis.Redis) -> None:
    """Twilio answers STOP itself: we record the opt-out and reply nothing."""
    code, body = signed_post(client, f"/webhooks/twilio/{sms.tw.key}/sms",
                             twilio_form("STOP", "SM9", OptOutType="STOP"))
    assert code == 200 and twiml_text(body) == ""
    assert SessionStore(redis_client).opted_out(
        next(k.decode().split(":")[-1] for k in redis_client.scan_iter("cd:optout:*")))


def test_ussd_session_dropped_continues_by_sms(client: FlaskClient, sms: SmsChannels,
                                               channel: Channel, engine: Engine,
                                               redis_client: redis.Redis) -> None:
    """With hand-over on, an Incomplete USSD session gets an SMS with the current question;
    the answers by SMS complete the same interview."""
    with engine.begin() as conn:
        conn.execute(update(Campaign).values(sms_handover=True))
    client.application.extensions["civicdial"].registry.refresh()
    ussd = f"/webhooks/africastalking/{channel.key}/ussd"
    for text in ("", "1", "1*1", "1*1*2"):  # English, consent, sex: now at age
        client.post(ussd, content_type=FORM, data={
            "sessionId": "U1", "serviceCode": "*920*16#", "phoneNumber": PHONE,
            "networkCode": "62001", "text": text})
    events = {"sessionId": "U1", "serviceCode": "*920*16#", "phoneNumber": PHONE,
              "networkCode": "62001", "status": "Incomplete", "durationInMillis": "30000",
              "hopsCount": "4", "input": "1*1*2", "lastAppResponse": "CON How old are you?",
              "date": "2026-11-25 12:00:00", "cost": "GHS 0.05"}
    client.post(f"{ussd}/events", data=events, content_type=FORM)
    client.post(f"{ussd}/events", data=events, content_type=FORM)  # AT retries: one SMS
    work(engine, redis_client)
    (handover,) = sms.fake.bodies_to(PHONE)
    assert handover.startswith("Your survey call was cut.")
    assert "How old are you?\n1 Under 18\n2 18-24" in handover
    for n, answer in enumerate(ANSWERS[3:], start=1):
        at_sms(client, sms.at, answer, f"h{n}")
    work(engine, redis_client)
    assert sms.fake.bodies_to(PHONE)[-1].startswith("Thank you! Your answers are recorded")
    with Session(engine) as db:
        interviews = db.scalars(select(Interview)).all()
        assert [(i.status, i.channel_id) for i in interviews] == [("completed", channel.id)]
        assert db.scalar(select(func.count()).select_from(Answer)) == 24


# -- outbound queue ---------------------------------------------------------------------

def queue_messages(engine: Engine, settings, channel: Channel, n: int,  # type: ignore[no-untyped-def]
                   prefix: str = "+23320") -> list[str]:
    box = NumberBox(settings.encryption_key)
    numbers = [f"{prefix}{i:07d}" for i in range(n)]
    with Session(engine) as db, db.begin():
        for i, number in enumerate(numbers):
            db.add(OutboundMessage(key=f"bulk:{i}", channel_id=channel.id,
                                   respondent=f"r{i}", recipient=box.seal(number),
                                   body=f"Message {i}", kind="invitation", priority=1))
    return numbers


@pytest.mark.parametrize("provider", ["africastalking", "twilio"])
def test_outbound_survives_a_flaky_provider(sms: SmsChannels, engine: Engine,
                                            redis_client: redis.Redis, settings,  # type: ignore[no-untyped-def]
                                            provider: str) -> None:
    """30% of requests fail with 503: every message still arrives exactly once; a number
    the provider rejects (4xx) fails without retries."""
    sms.fake.fail_rate = 0.3
    ch = sms.at if provider == "africastalking" else sms.tw
    numbers = queue_messages(engine, settings, ch, 40)
    sms.fake.reject.add(numbers[7])
    sweep(settings, engine, redis_client, older_than=timedelta(0))
    work(engine, redis_client)
    received = [m["to"] for m in sms.fake.accepted]
    assert sorted(received) == sorted(n for n in numbers if n != numbers[7])
    assert sms.fake.requests > len(received)  # failures happened and were retried
    with Session(engine) as db:
        rows = {r.key: r for r in db.scalars(select(OutboundMessage))}
    assert rows["bulk:7"].status == "failed" and rows["bulk:7"].attempts == 1
    assert {r.status for k, r in rows.items() if k != "bulk:7"} == {"sent"}
    assert all(r.provider_id for k, r in rows.items() if k != "bulk:7")


def test_a_persons_messages_leave_in_order(sms: SmsChannels, engine: Engine,
                                          redis_client: redis.Redis, settings) -> None:  # type: ignore[no-untyped-def]
    """Six messages to one person, bulk and interactive interleaved (interactive jobs run
    first), through a provider failing half its requests: they reach the person in the
    order they were written, each once. Others' messages are not held behind them."""
    sms.fake.fail_rate = 0.5
    box = NumberBox(settings.encryption_key)
    with Session(engine) as db, db.begin():
        for i in range(6):
            db.add(OutboundMessage(key=f"m{i}", channel_id=sms.at.id, respondent="one",
                                   recipient=box.seal(PHONE), body=f"Message {i}",
                                   kind="reply" if i % 2 else "reminder", priority=i % 2 ^ 1))
            db.add(OutboundMessage(key=f"o{i}", channel_id=sms.at.id, respondent=f"other{i}",
                                   recipient=box.seal(f"+23320000000{i}"), body="Hello",
                                   kind="invitation", priority=1))
    sweep(settings, engine, redis_client, older_than=timedelta(0))
    work(engine, redis_client)
    assert sms.fake.bodies_to(PHONE) == [f"Message {i}" for i in range(6)]
    assert len(sms.fake.accepted) == 12
    with Session(engine) as db:
        assert set(db.scalars(select(OutboundMessage.status))) == {"sent"}


def test_delivery_reports_update_messages_in_order(client: FlaskClient, sms: SmsChannels,
                                                   engine: Engine, redis_client: redis.Redis,
                                                   settings) -> None:  # type: ignore[no-untyped-def]
    """Reports arriving out of order never move a message backwards."""
    queue_messages(engine, settings, sms.tw, 1)
    sweep(settings, engine, redis_client, older_than=timedelta(0))
    work(engine, redis_client)
    with Session(engine) as db:
        sid = db.scalar(select(OutboundMessage.provider_id))
    path = f"/webhooks/twilio/{sms.tw.key}/status"
    base = {"MessageSid": sid, "AccountSid": TWILIO_SID, "From": "+15005550006",
            "To": "+233200000000", "ApiVersion": "2010-04-01"}
    assert signed_post(client, path, {**base, "MessageStatus": "delivered",
                                      "RawDlrDoneDate": "2611251200"})[0] == 204
    assert signed_post(client, path, {**base, "MessageStatus": "sent"})[0] == 204
    assert signed_post(client, path, {**base, "MessageStatus": "sent"}, signature="bad")[0] == 403
    work(engine, redis_client)
    with Session(engine) as db:
        assert db.scalar(select(OutboundMessage.status)) == "delivered"


SEGMENTS = [
    ("plain English", "Overall, how satisfied were you?", "GSM-7", 1),
    ("160 GSM characters", "x" * 160, "GSM-7", 1),
    ("161 GSM characters", "x" * 161, "GSM-7", 2),
    ("extension characters count double", "{" * 81, "GSM-7", 2),
    ("Twi letter forces UCS-2", "Wo ho tɛn?", "UCS-2", 1),
    ("71 UCS-2 characters", "ɛ" * 71, "UCS-2", 2),
    ("emoji", "👍" * 35, "UCS-2", 1),
]


@pytest.mark.parametrize("text,encoding,segments", [c[1:] for c in SEGMENTS],
                         ids=[c[0] for c in SEGMENTS])
def test_segments(text: str, encoding: str, segments: int) -> None:
    """Segment counts follow GSM 03.38 (160/153) and UCS-2 (70/67)."""
    count = count_segments(text)
    assert (count.encoding, count.segments) == (encoding, segments)


def test_opt_out_check_happens_at_send_time(sms: SmsChannels, engine: Engine,
                                            redis_client: redis.Redis, settings) -> None:  # type: ignore[no-untyped-def]
    """A message queued before STOP is not sent after it."""
    numbers = queue_messages(engine, settings, sms.at, 1)
    redis_client.set(f"cd:optout:{pseudonym(settings.pseudonym_key, numbers[0])}", "1")
    with Session(engine) as db, db.begin():
        db.execute(update(OutboundMessage).values(
            respondent=pseudonym(settings.pseudonym_key, numbers[0])))
    sweep(settings, engine, redis_client, older_than=timedelta(0))
    work(engine, redis_client)
    assert sms.fake.accepted == []


def test_idle_sms_interview_gets_one_reminder_then_expires(
        client: FlaskClient, sms: SmsChannels, engine: Engine, redis_client: redis.Redis,
        settings, app: Flask) -> None:  # type: ignore[no-untyped-def]
    """Halfway through the idle window: one reminder with the current question; at the
    end of it the interview is abandoned and forgotten."""
    from workers.reminders import remind_idle

    for n, answer in enumerate(["SURVEY", "1", "1", "2"]):  # ... now at age
        tw_sms(client, sms.tw, answer, f"SM{n}")
    registry = app.extensions["civicdial"].registry
    now = time.time()
    assert remind_idle(settings, redis_client, registry, now=now + 3600)["reminded"] == 0
    assert remind_idle(settings, redis_client, registry, now=now + 13 * 3600)["reminded"] == 1
    assert remind_idle(settings, redis_client, registry, now=now + 14 * 3600)["reminded"] == 0
    work(engine, redis_client)
    (reminder,) = sms.fake.bodies_to(PHONE)
    assert reminder.startswith("You have an unfinished survey")
    assert "How old are you?" in reminder
    assert remind_idle(settings, redis_client, registry, now=now + 25 * 3600)["expired"] == 1
    work(engine, redis_client)
    with Session(engine) as db:
        assert db.scalar(select(Interview.status)) == "abandoned"
    assert redis_client.keys("cd:st:*") == []
    assert "Text SURVEY to take part" in twiml_text(tw_sms(client, sms.tw, "3", "SM9")[1])


def test_reminders_every_n_hours_at_most_m(
        client: FlaskClient, sms: SmsChannels, engine: Engine, redis_client: redis.Redis,
        settings, app: Flask, env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    """`campaign set --reminder-hours 2 --reminder-max 3`: a silent respondent is reminded
    after 2, 4 and 6 hours and then no more; an answer restarts the 2-hour clock but not
    the count; the interview still expires at the end of its window."""
    from click.testing import CliRunner

    from gateway.cli import main
    from workers.reminders import remind_idle

    result = CliRunner().invoke(main, ["campaign", "set", "sdg1662", "--reminder-hours", "2",
                                       "--reminder-max", "3"], env=env)
    assert result.exit_code == 0, result.output
    assert "reminders every 2 h at most 3" in result.output
    registry = app.extensions["civicdial"].registry
    registry.refresh()
    for n, answer in enumerate(["SURVEY", "1", "1"]):  # ... now at sex
        tw_sms(client, sms.tw, answer, f"SM{n}")
    now = time.time()

    def remind(hours: float) -> int:
        return remind_idle(settings, redis_client, registry, now=now + hours * 3600)["reminded"]

    assert [remind(h) for h in (1, 2.1, 3, 4.2, 5)] == [0, 1, 0, 1, 0]
    with patch("time.time", return_value=now + 5 * 3600):  # answers after 5 hours
        tw_sms(client, sms.tw, "2", "SM3")
    assert [remind(h) for h in (6.5, 7.1, 9.5, 23)] == [0, 1, 0, 0]
    work(engine, redis_client)
    reminders = sms.fake.bodies_to(PHONE)[-3:]
    assert [r.split("\n")[0] for r in reminders] == [
        "You have an unfinished survey on public services. Reply to continue (free), "
        "or STOP to opt out."] * 3
    assert "What is your sex?" in reminders[0] and "How old are you?" in reminders[2]
    assert remind_idle(settings, redis_client, registry,
                       now=now + 29.1 * 3600)["expired"] == 1
    assert redis_client.zcard("cd:sms:idle") == 0


def test_unfinished_ussd_interview_is_reminded_by_sms_to_dial_again(
        client: FlaskClient, sms: SmsChannels, channel: Channel, engine: Engine,
        redis_client: redis.Redis, settings, app: Flask) -> None:  # type: ignore[no-untyped-def]
    """A USSD session that ends unfinished (AT's Incomplete notification, no hand-over):
    after reminder_hours an SMS asks the respondent to dial again, once (reminder_max 1);
    the interview expires at the end of its window."""
    from workers.reminders import remind_idle

    ussd = f"/webhooks/africastalking/{channel.key}/ussd"
    for text in ("", "1", "1*1"):  # English, consent: now at sex
        client.post(ussd, content_type=FORM, data={
            "sessionId": "U1", "serviceCode": "*920*16#", "phoneNumber": PHONE,
            "networkCode": "62001", "text": text})
    client.post(f"{ussd}/events", content_type=FORM, data={
        "sessionId": "U1", "serviceCode": "*920*16#", "phoneNumber": PHONE,
        "networkCode": "62001", "status": "Incomplete", "durationInMillis": "9000",
        "hopsCount": "3", "input": "1*1", "lastAppResponse": "CON What is your sex?",
        "date": "2026-11-25 12:00:00", "cost": "GHS 0.05"})
    registry = app.extensions["civicdial"].registry
    now = time.time()
    assert remind_idle(settings, redis_client, registry, now=now + 3600)["reminded"] == 0
    assert remind_idle(settings, redis_client, registry, now=now + 12.1 * 3600)["reminded"] == 1
    work(engine, redis_client)
    (reminder,) = sms.fake.bodies_to(PHONE)
    assert reminder == ("You have an unfinished survey on public services. Dial *920*16# to "
                        "continue where you left off (free). Reply STOP to opt out.")
    assert remind_idle(settings, redis_client, registry, now=now + 13 * 3600)["reminded"] == 0
    assert redis_client.zcard("cd:sms:idle") == 1  # waits for expiry
    # They dial again and are asked to continue; with reminders off, only expiry is left.
    resumed = client.post(ussd, content_type=FORM, data={
        "sessionId": "U2", "serviceCode": "*920*16#", "phoneNumber": PHONE,
        "networkCode": "62001", "text": ""}).get_data(as_text=True)
    assert "Welcome back" in resumed
    with engine.begin() as conn:
        conn.execute(update(Campaign).values(reminder_max=0))
    registry.refresh()
    assert remind_idle(settings, redis_client, registry, now=now + 30 * 3600) == {
        "reminded": 0, "expired": 1, "forgotten": 0}


def test_emoji_and_empty_bodies_are_answers_not_errors(client: FlaskClient,
                                                       sms: SmsChannels) -> None:
    """Emoji, empty and binary-looking bodies get a re-ask, never a 4xx/5xx."""
    tw_sms(client, sms.tw, "SURVEY", "S1")
    for n, body in enumerate(["👍", "", "\x00\x01", "  "]):
        code, reply = tw_sms(client, sms.tw, body, f"S{n + 2}")
        assert code == 200
        if n < 2:
            assert twiml_text(reply).startswith(("Please reply with a number", "Language"))


class Worker:
    """A real `civicdial worker` in its own process group, to be SIGKILLed mid-run; then
    a second one, with the sweeper, finishes what the first left."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker"],
                                env=self.env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill_when(self, ready: Callable[[], bool], within: float) -> None:
        first = self.start()
        try:
            deadline = time.monotonic() + within
            while not ready() and time.monotonic() < deadline:
                time.sleep(0.005)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()

    def finish(self, settings: Any, engine: Engine, redis_client: redis.Redis) -> None:
        second = self.start()
        try:
            deadline = time.monotonic() + 240  # generous: CI machines can be busy
            while time.monotonic() < deadline:
                sweep(settings, engine, redis_client, older_than=timedelta(seconds=2),
                      stuck_after=timedelta(seconds=5))
                with Session(engine) as db:
                    open_rows = db.scalar(select(func.count()).select_from(OutboundMessage)
                                          .where(OutboundMessage.status.in_(["queued",
                                                                             "sending"])))
                if open_rows == 0:
                    return
                time.sleep(0.5)
        finally:
            os.killpg(second.pid, signal.SIGTERM)
            second.wait(timeout=30)


def test_worker_killed_mid_send_neither_loses_nor_doubles(
        sms: SmsChannels, engine: Engine, redis_client: redis.Redis, settings,  # type: ignore[no-untyped-def]
        env: dict[str, str]) -> None:
    """SIGKILL a real `civicdial worker` while it sends; a second one finishes. Every
    message reaches the provider at most once; each is 'sent' or, if the kill hit it
    in flight, 'unknown' (never silently dropped, never resent)."""
    sms.fake.delay = 0.02
    numbers = queue_messages(engine, settings, sms.at, 60)
    sweep(settings, engine, redis_client, older_than=timedelta(0))
    worker = Worker({**os.environ, **env, "CIVICDIAL_SEND_BACKOFF_SECONDS": "0"})
    worker.kill_when(lambda: len(sms.fake.accepted) >= 15, within=60)
    killed_at = len(sms.fake.accepted)
    assert 15 <= killed_at < 60, "the kill should land mid-run"
    worker.finish(settings, engine, redis_client)
    received = [m["to"] for m in sms.fake.accepted]
    assert len(received) == len(set(received)), "a message was sent twice"
    with Session(engine) as db:
        rows = db.scalars(select(OutboundMessage)).all()
    box = NumberBox(settings.encryption_key)
    status = {box.open(r.recipient): r.status for r in rows}
    assert set(status.values()) <= {"sent", "unknown"}
    assert sum(s == "unknown" for s in status.values()) <= 2
    for number in numbers:
        if status[number] == "sent":
            assert number in received


def test_results_opt_in_and_results_keyword(client: FlaskClient, sms: SmsChannels,
                                            channel: Channel, engine: Engine,
                                            redis_client: redis.Redis, settings) -> None:  # type: ignore[no-untyped-def]
    """'Yes' to the results opt-in keeps the number encrypted for that purpose only;
    RESULTS answers with the region's published summary, by SMS and on a new USSD dial."""
    from gateway.store.models import FeedbackSubscriber

    assert "not published yet" in twiml_text(tw_sms(client, sms.tw, "RESULTS", "R0")[1])
    tw_sms(client, sms.tw, "SURVEY", "R1")
    for n, answer in enumerate([*ANSWERS[:-1], "yes"], start=2):
        text = twiml_text(tw_sms(client, sms.tw, answer, f"R{n}")[1])
    assert text.startswith("Thank you! Your answers are recorded")
    work(engine, redis_client)
    with Session(engine) as db:
        (sub,) = db.scalars(select(FeedbackSubscriber)).all()
    assert sub.channel_id == sms.tw.id and PHONE not in sub.recipient
    assert NumberBox(settings.encryption_key).open(sub.recipient) == PHONE
    campaign_id = sub.campaign_id
    redis_client.hset(f"cd:results:{campaign_id}", mapping={
        "en:ashanti": "Health care, Ashanti: 62% satisfied (n=412). Ghana: 58%.",
        "en:_national": "Health care, Ghana: 58% satisfied (n=4012).",
    })
    reply = twiml_text(tw_sms(client, sms.tw, "results", "R99")[1])
    assert reply == "Health care, Ashanti: 62% satisfied (n=412). Ghana: 58%."
    other = twiml_text(tw_sms(client, sms.tw, "RESULTS", "R100", phone="+233209999999")[1])
    assert other == "Health care, Ghana: 58% satisfied (n=4012)."
    def dial(text: str) -> str:
        return client.post(f"/webhooks/africastalking/{channel.key}/ussd", content_type=FORM,
                           data={"sessionId": "U9", "serviceCode": "*920*16#",
                                 "phoneNumber": PHONE, "networkCode": "62001",
                                 "text": text}).get_data(as_text=True)

    menu = dial("")
    assert menu.startswith("CON You have already completed this survey")
    assert "1 See the results\n2 Delete my answers" in menu
    ussd = dial("1")
    assert ussd.startswith("END ") and "Ashanti: 62% satisfied" in ussd and len(ussd) <= 160


def test_rate_limit_token_bucket(redis_client: redis.Redis) -> None:
    """A channel at 1 message/s lets the first message out at once and makes the next
    wait; another channel has its own bucket; 0 means unthrottled."""
    from workers.outbound import _TAKE_TOKEN, wait_for_token

    take = redis_client.register_script(_TAKE_TOKEN)
    assert int(take(keys=["cd:rate:1"], args=[1, 1])) == 0
    assert 0 < int(take(keys=["cd:rate:1"], args=[1, 1])) <= 1000
    assert int(take(keys=["cd:rate:2"], args=[1, 1])) == 0
    wait_for_token(redis_client, "cd:", 3, 0)  # unthrottled: returns without touching Redis
    assert not redis_client.exists("cd:rate:3")


def test_sweep_leaves_waiting_jobs_alone(sms: SmsChannels, engine: Engine,
                                        redis_client: redis.Redis, settings) -> None:  # type: ignore[no-untyped-def]
    """A throttled backlog is not enqueued again by every sweep; a lost job is."""
    queue_messages(engine, settings, sms.at, 5)
    assert sweep(settings, engine, redis_client, older_than=timedelta(0)) == 5
    assert sweep(settings, engine, redis_client, older_than=timedelta(0)) == 0
    assert redis_client.llen("rq:queue:civicdial-sms-bulk") == 5
    with Session(engine) as db:
        lost = db.scalar(select(func.min(OutboundMessage.id)))
    job_id = redis_client.get(f"cd:sendq:{lost}")
    assert job_id is not None
    redis_client.lrem("rq:queue:civicdial-sms-bulk", 1, job_id)  # lost with a worker
    redis_client.delete(f"cd:sendq:{lost}")
    assert sweep(settings, engine, redis_client, older_than=timedelta(0)) == 1
    assert redis_client.llen("rq:queue:civicdial-sms-bulk") == 5


def test_sweep_requeues_a_job_taken_by_a_dying_worker(sms: SmsChannels, engine: Engine,
                                                      redis_client: redis.Redis,
                                                      settings) -> None:  # type: ignore[no-untyped-def]
    """A worker that took a job off the queue and died before running it leaves the job
    'started' and the row queued: the sweeper enqueues it again."""
    from rq import Queue
    from rq.job import Job, JobStatus

    queue_messages(engine, settings, sms.at, 1)
    assert sweep(settings, engine, redis_client, older_than=timedelta(0)) == 1
    queue = Queue("civicdial-sms-bulk", connection=redis_client)
    (job_id,) = queue.get_job_ids()
    queue.remove(job_id)
    Job.fetch(job_id, connection=redis_client).set_status(JobStatus.STARTED)
    assert sweep(settings, engine, redis_client, older_than=timedelta(0)) == 1
    assert len(queue.get_job_ids()) == 1



def test_sweep_requeues_a_job_popped_by_a_worker_killed_before_starting_it(
        sms: SmsChannels, engine: Engine, redis_client: redis.Redis,
        settings) -> None:  # type: ignore[no-untyped-def]
    """A worker listening on several queues pops a job (BLPOP) and is killed before it
    marks it started: the job still says 'queued' but is in no queue. The row must not
    stay queued for ever (a killed-worker test caught it doing so)."""
    from rq import Queue

    queue_messages(engine, settings, sms.at, 1)
    assert sweep(settings, engine, redis_client, older_than=timedelta(0)) == 1
    queue = Queue("civicdial-sms-bulk", connection=redis_client)
    assert redis_client.lpop(queue.key) is not None  # what the dying worker did
    assert sweep(settings, engine, redis_client, older_than=timedelta(0)) == 1
    assert len(queue.get_job_ids()) == 1
    assert sweep(settings, engine, redis_client, older_than=timedelta(0)) == 0  # now waiting

def test_no_reminders_while_the_campaign_is_paused(
        client: FlaskClient, sms: SmsChannels, engine: Engine, redis_client: redis.Redis,
        settings, app: Flask) -> None:  # type: ignore[no-untyped-def]
    """A paused campaign reminds nobody; the reminder goes once it is open again."""
    from workers.reminders import remind_idle

    for n, answer in enumerate(["SURVEY", "1", "1"]):
        tw_sms(client, sms.tw, answer, f"P{n}")
    registry = app.extensions["civicdial"].registry
    with engine.begin() as conn:
        conn.execute(update(Campaign).values(state="paused"))
    registry.refresh()
    now = time.time()
    assert remind_idle(settings, redis_client, registry, now=now + 13 * 3600)["reminded"] == 0
    ((_, due),) = redis_client.zrange("cd:sms:idle", 0, -1, withscores=True)
    assert due > now + 13 * 3600  # not looked at again at every pass
    with engine.begin() as conn:
        conn.execute(update(Campaign).values(state="open"))
    registry.refresh()
    assert remind_idle(settings, redis_client, registry, now=now + 14 * 3600)["reminded"] == 1
