"""SMS Gateway for Android channel: the app's exact envelopes and signatures, dedup, sends
through the phone's API (202, 409, timeouts, a dead worker), `channels add|check`."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from fake_android import FakePhone, fake_phone, flask_transport, gson, serve_app, sign
from flask import Flask
from flask.testing import FlaskClient
from redis_view import counted_out
from rq import SimpleWorker
from rq.registry import ScheduledJobRegistry
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from gateway.channels.android import content_key, verify
from gateway.cli.main import main
from gateway.store.crypto import NumberBox
from gateway.store.models import Answer, Campaign, Channel, Interview, OutboundMessage
from gateway.store.outbox import BULK_QUEUE, INTERACTIVE_QUEUE, sweep
from workers.jobs import QUEUE
from workers.outbound import IDEMPOTENT_PROVIDERS, send_message
from workers.persist import drain

PHONE = "+233241234567"
SIM = "+233201112222"
KEY = "s1gnKey8"
DEVICE = "ffffffffceb0b1db0000018e937c815b"
ANSWERS = ["1", "1", "Female", "3", "2", "urban", "2", "1", "No difficulty", "1", "1", "1",
           "1", "yes", "agree", "1", "2", "3", "Strongly Agree.", "2", "2", "2", "2",
           "Clean water at the clinic", "no"]


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def phone() -> Iterator[FakePhone]:
    with fake_phone(signing_key=KEY) as p:
        yield p


def add_android(engine: Engine, phone: FakePhone, **config: Any) -> Channel:
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign))
        assert campaign is not None
        ch = Channel(key="android-key-0001", provider="android", kind="sms", address=SIM,
                     campaign_id=campaign.id,
                     config=json.dumps(phone.channel_config(rate_per_hour=0, **config)))
        db.add(ch)
        db.flush()
        db.expunge(ch)
    return ch


@pytest.fixture
def android(engine: Engine, channel: Channel, phone: FakePhone, app: Flask,
            client: FlaskClient, env: dict[str, str],
            monkeypatch: pytest.MonkeyPatch) -> Channel:
    """An Android channel on the default campaign, its phone's webhooks delivered through
    the Flask test client."""
    ch = add_android(engine, phone)
    app.extensions["civicdial"].registry.refresh()
    for event in ("sms:received", "sms:sent", "sms:delivered", "sms:failed"):
        phone.add_webhook(f"http://127.0.0.1/webhooks/android/{ch.key}/events", event)
    phone.transport = flask_transport(client)
    for name, value in {**env, "CIVICDIAL_SEND_BACKOFF_SECONDS": "0"}.items():
        monkeypatch.setenv(name, value)
    return ch


def work(engine: Engine, client: redis.Redis) -> None:
    """What `civicdial worker` does, in-process: persist events, then send."""
    for _ in range(20):
        drain(client, engine, "cd:events")
        SimpleWorker([INTERACTIVE_QUEUE, QUEUE, BULK_QUEUE], connection=client).work(
            burst=True, logging_level="WARNING")
        if client.xlen("cd:events") == 0 and all(
                client.llen(f"rq:queue:{q}") == 0 for q in (INTERACTIVE_QUEUE, BULK_QUEUE)):
            return


def outbound(engine: Engine) -> list[OutboundMessage]:
    with Session(engine) as db:
        return list(db.scalars(select(OutboundMessage).order_by(OutboundMessage.id)))


# -- the envelopes, exactly as the app sends them ----------------------------------------


def received(text: str = "SURVEY", sender: str | None = PHONE, *, legacy: bool = False,
             received_at: str = "2026-12-01T09:31:26.123Z",
             envelope_id: str = "Ey6ECgOkVVFjz3CL48B8C",
             **overrides: Any) -> dict[str, Any]:
    """An sms:received envelope, fields in the order Gson writes them."""
    payload: dict[str, Any] = {"message": text, "receivedAt": received_at,
                               "messageId": "8f1a2b3c"}
    if not legacy:
        payload.update(sender=sender, recipient=SIM)
    payload.update(simNumber=1, phoneNumber=sender)
    return {"id": envelope_id, "webhookId": "LreFUt-Z3sSq0JufY9uWB", "event": "sms:received",
            "deviceId": DEVICE, "payload": payload, **overrides}


def status_event(event: str, message_id: str = "cd-0123", **extra: Any) -> dict[str, Any]:
    at = {"sms:sent": "sentAt", "sms:delivered": "deliveredAt",
          "sms:failed": "failedAt"}.get(event, "at")
    payload = {at: "2026-12-01T09:31:30.000Z", "messageId": message_id, "sender": SIM,
               "recipient": PHONE, "simNumber": 1, "phoneNumber": PHONE, **extra}
    if event == "sms:sent":
        payload = {"partsCount": 1, **payload}
    return {"id": "Qw3rTy_uIoP-AsDfGhJkL", "webhookId": "hook2", "event": event,
            "deviceId": DEVICE, "payload": payload}


NOW = "now"


@dataclass(frozen=True)
class Case:
    label: str
    body: bytes
    status: int
    contains: str = ""
    signature: str = "valid"  # valid | wrong | missing | upper | reserialised | none-ts
    ts_offset: int = 0  # seconds from now in X-Timestamp
    key: str | None = None  # None: the channel's key
    changes: bool = False  # expect something appended to the event stream


def body(obj: Any) -> bytes:
    return gson(obj)


CASES = [
    Case("sms:received SURVEY starts the interview", body(received()), 200, "OK", changes=True),
    Case("old app: phoneNumber only, no sender", body(received(legacy=True)), 200, "OK",
         changes=True),
    Case("receivedAt with a +00:00 offset (pre-Android-N format)",
         body(received(received_at="2026-12-01T09:31:26.123+00:00")), 200, changes=True),
    Case("Gson-escaped text (\\u003d) verified over the raw bytes",
         body(received(text="1 = yes <ok>")), 200, changes=True),
    Case("upper-case hex signature", body(received()), 200, signature="upper", changes=True),
    Case("timestamp 299 s old", body(received()), 200, ts_offset=-299, changes=True),
    Case("wrong signature", body(received()), 401, "bad X-Signature", signature="wrong"),
    Case("signature over re-serialised JSON", body(received(text="a=b")), 401,
         "bad X-Signature", signature="reserialised"),
    Case("missing signature", body(received()), 401, "missing", signature="missing"),
    Case("missing timestamp", body(received()), 401, "missing", signature="none-ts"),
    Case("stale timestamp (301 s old)", body(received()), 401, "from our clock",
         ts_offset=-301),
    Case("timestamp 301 s ahead", body(received()), 401, "from our clock", ts_offset=301),
    Case("signed with another key", body(received()), 401, "bad X-Signature", key="other"),
    Case("not JSON", b"sender=+233241234567&message=1", 400, "not valid JSON"),
    Case("not UTF-8", b"\xff\xfe{}", 400, "not valid UTF-8"),
    Case("JSON array", b"[]", 400, "JSON object"),
    Case("no envelope id", body({**received(), "id": None}), 400, "id"),
    Case("no event", body({**received(), "event": None}), 400, "event"),
    Case("payload not an object", body({**received(), "payload": "x"}), 400, "payload"),
    Case("no message", body(received(text=None)), 400, "message"),  # type: ignore[arg-type]
    Case("no sender nor phoneNumber", body(received(sender=None)), 400, "sender"),
    Case("receivedAt not a time", body(received(received_at="yesterday")), 400,
         "receivedAt"),
    Case("alphanumeric sender (a carrier's promo): ignored, not retried",
         body(received(sender="MTN")), 200, "ignored"),
    Case("system:ping", body({"id": "p1", "webhookId": "w", "event": "system:ping",
                              "deviceId": DEVICE, "payload": {"health": {}}}), 200, "ignored"),
    Case("app:started", body({"id": "p2", "webhookId": "w", "event": "app:started",
                              "deviceId": DEVICE, "payload": {}}), 200, "ignored"),
    Case("an event we do not know", body({"id": "p3", "webhookId": "w", "event": "sms:new",
                                          "deviceId": DEVICE, "payload": {}}), 200, "ignored"),
    Case("sms:sent", body(status_event("sms:sent")), 200, "OK", changes=True),
    Case("sms:delivered", body(status_event("sms:delivered")), 200, "OK", changes=True),
    Case("sms:failed", body(status_event("sms:failed", reason="RESULT_ERROR_NO_SERVICE")),
         200, "OK", changes=True),
    Case("sms:sent without messageId", body({**status_event("sms:sent"), "payload": {
        "sender": SIM}}), 400, "messageId"),
]


def post(client: FlaskClient, ch: Channel, raw: bytes, *, signature: str = "valid",
         ts_offset: int = 0, key: str | None = None,
         channel_key: str | None = None) -> tuple[int, str]:
    ts = str(int(time.time()) + ts_offset)
    signed = raw
    if signature == "reserialised":  # what a careless receiver would verify
        signed = json.dumps(json.loads(raw)).encode()
    sig = sign(key or KEY, signed, ts)
    headers = {"X-Signature": sig, "X-Timestamp": ts}
    if signature == "wrong":
        headers["X-Signature"] = "0" * 64
    elif signature == "upper":
        headers["X-Signature"] = sig.upper()
    elif signature == "missing":
        del headers["X-Signature"]
    elif signature == "none-ts":
        del headers["X-Timestamp"]
    resp = client.post(f"/webhooks/android/{channel_key or ch.key}/events", data=raw,
                       headers=headers, content_type="application/json; charset=UTF-8")
    return resp.status_code, resp.get_data(as_text=True)


def stream_len(r: redis.Redis) -> int:
    return r.xlen("cd:events")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_events(client: FlaskClient, android: Channel, redis_client: redis.Redis,
                case: Case, caplog: pytest.LogCaptureFixture) -> None:
    """Each envelope the app can send gets the right answer; refused ones change
    nothing and leave one log line."""
    before = stream_len(redis_client)
    keys_before = set(counted_out(redis_client.keys("cd:*")))
    status, text = post(client, android, case.body, signature=case.signature,
                        ts_offset=case.ts_offset, key=case.key)
    assert status == case.status, text
    assert case.contains in text
    if case.changes:
        assert stream_len(redis_client) > before
    else:
        assert stream_len(redis_client) == before
        assert set(counted_out(redis_client.keys("cd:*"))) - keys_before <= {
            k for k in counted_out(redis_client.keys("cd:*")) if b"registry" in k}
    if status >= 400:
        assert any(str(status) in r.getMessage() for r in caplog.records
                   if r.levelname == "WARNING")


def test_unknown_channel_and_oversized_body(client: FlaskClient, android: Channel) -> None:
    """Another channel's key is 404; a body over the limit 413, never 500."""
    assert post(client, android, body(received()), channel_key="nope")[0] == 404
    huge = body(received(text="x" * 20_000))
    assert post(client, android, huge)[0] == 413


def test_channel_without_signing_key_refuses_everything(
        client: FlaskClient, engine: Engine, app: Flask, phone: FakePhone,
        channel: Channel) -> None:
    """A channel configured without a signing key cannot verify: 401, not open."""
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign))
        assert campaign is not None
        ch = Channel(key="nokey", provider="android", kind="sms", address=SIM,
                     campaign_id=campaign.id, config=json.dumps({"url": phone.url}))
        db.add(ch)
    app.extensions["civicdial"].registry.refresh()
    status, text = post(client, ch, body(received()), channel_key="nokey")
    assert status == 401 and "signing_key" in text


def test_verify_is_the_apps_signature() -> None:
    """HMAC-SHA256 over body + timestamp, key as UTF-8, lowercase hex; the window is
    +-300 s."""
    raw = b'{"id":"x","event":"sms:received"}'
    sig = sign("k\u00e9y", raw, "1764581486")
    assert verify("k\u00e9y", raw, "1764581486", sig, 1764581486 + 300) is None
    assert verify("k\u00e9y", raw, "1764581486", sig, 1764581486 + 301) is not None
    assert verify("k\u00e9y", raw + b" ", "1764581486", sig, 1764581486) == "bad X-Signature"
    assert verify("k\u00e9y", raw, "1764581487", sig, 1764581486) == "bad X-Signature"


# -- dedup ----------------------------------------------------------------------------


def answers(engine: Engine) -> list[tuple[str, str]]:
    with Session(engine) as db:
        return [(a.question, a.value or "") for a in
                db.scalars(select(Answer).order_by(Answer.seq))]


def test_same_envelope_twice_changes_nothing(client: FlaskClient, android: Channel,
                                             engine: Engine, redis_client: redis.Redis) -> None:
    """A retry of one delivery (same envelope id, re-signed later) is a duplicate."""
    post(client, android, body(received("SURVEY", envelope_id="e1",
                                        received_at="2026-12-01T09:00:00.000Z")))
    first = stream_len(redis_client)
    status, text = post(client, android, body(received(
        "SURVEY", envelope_id="e1", received_at="2026-12-01T09:00:00.000Z")), ts_offset=-20)
    assert (status, text.strip()) == (200, "duplicate")
    assert stream_len(redis_client) == first


def test_reemission_with_fresh_envelope_id_changes_nothing(
        client: FlaskClient, android: Channel, engine: Engine,
        redis_client: redis.Redis) -> None:
    """The same SMS emitted again (new envelope id, same device/sender/receivedAt/text),
    even written in another time zone, is recognised; the same answer sent again later
    by the citizen is a new message."""
    for n, text in enumerate(["SURVEY", "1", "1"]):
        post(client, android, body(received(text, envelope_id=f"a{n}",
                                            received_at=f"2026-12-01T09:0{n}:00.000Z")))
    work(engine, redis_client)
    stored = answers(engine)
    assert stored == [("consent", "yes")]  # the language is not an answer
    before = stream_len(redis_client)
    again = received("1", envelope_id="fresh-id",
                     received_at="2026-12-01T10:02:00.000+01:00")  # = 09:02Z
    assert post(client, android, body(again))[1].strip() == "duplicate"
    assert stream_len(redis_client) == before
    # A new SMS, at a new time, is an answer of its own.
    assert post(client, android, body(received("Female", envelope_id="a9",
                                               received_at="2026-12-01T09:05:00.000Z")))[1] \
        .strip() == "OK"
    work(engine, redis_client)
    assert [q for q, _ in answers(engine)] == ["consent", "sex"]


def test_content_key_ignores_the_envelope() -> None:
    """The second dedup key: device, sender, the instant received, the text's hash."""
    a = content_key(DEVICE, PHONE, 1764581486123, "1")
    assert a == content_key(DEVICE, PHONE, 1764581486123, "1")
    assert a != content_key(DEVICE, PHONE, 1764581486124, "1")
    assert a != content_key(DEVICE, PHONE, 1764581486123, "2")
    assert a != content_key("other-device", PHONE, 1764581486123, "1")


# -- sending through the phone --------------------------------------------------------


def test_reply_goes_through_the_phone_and_statuses_move_forward(
        client: FlaskClient, android: Channel, phone: FakePhone, engine: Engine,
        redis_client: redis.Redis) -> None:
    """The reply is POSTed with our id, delivery reports on, expedited priority; the
    phone's sms:sent and sms:delivered webhooks move it forward, never back."""
    phone.text(PHONE, "SURVEY")
    assert phone.deliver() == 0
    work(engine, redis_client)
    (msg,) = phone.messages.values()
    (row,) = outbound(engine)
    assert msg["id"] == row.provider_id and row.provider_id.startswith("cd-")
    assert msg["phoneNumbers"] == [PHONE] and msg["text"].startswith("Language")
    assert msg["withDeliveryReport"] is True and msg["priority"] == 100
    assert row.status == "sent"
    phone.deliver()  # sms:sent, sms:delivered
    work(engine, redis_client)
    assert outbound(engine)[0].status == "delivered"
    # A late sms:sent (a retry that arrived last) does not pull it back.
    post(client, android, body(status_event("sms:sent", row.provider_id)))
    work(engine, redis_client)
    assert outbound(engine)[0].status == "delivered"


def test_failed_report_marks_the_message_failed(
        android: Channel, phone: FakePhone, engine: Engine, redis_client: redis.Redis) -> None:
    """A number the phone cannot reach: 202, then sms:failed with the reason."""
    phone.fail_numbers.add(PHONE)
    phone.text(PHONE, "SURVEY")
    phone.deliver()
    work(engine, redis_client)
    phone.deliver()
    work(engine, redis_client)
    (row,) = outbound(engine)
    assert row.status == "failed" and "GENERIC_FAILURE" in row.error


def queue_one(engine: Engine, ch: Channel, settings: Any, to: str = PHONE,
              priority: int = 0, key: str = "k1") -> int:
    box = NumberBox(settings.encryption_key)
    with Session(engine) as db, db.begin():
        row = OutboundMessage(key=key, channel_id=ch.id, respondent=f"r-{key}",
                              recipient=box.seal(to), body="Hello", priority=priority,
                              kind="reply" if priority == 0 else "invitation")
        db.add(row)
        db.flush()
        return row.id


def test_timeout_after_the_phone_got_it_is_retried_and_409_counts_as_sent(
        android: Channel, phone: FakePhone, engine: Engine, settings: Any) -> None:
    """The phone records the message but answers after our timeout: the retry carries
    the same id, gets 409, and the message is 'sent', on the phone once."""
    with Session(engine) as db, db.begin():
        ch = db.get(Channel, android.id)
        assert ch is not None
        ch.config = json.dumps({**json.loads(ch.config), "timeout": 0.5})
    phone.hang_after_accept, phone.hang_seconds = 1, 2.0
    message_id = queue_one(engine, android, settings)
    assert send_message(message_id) == "queued"  # the read timed out: retry
    assert send_message(message_id) == "sent"  # 409: it was there all along
    assert phone.send_requests == 2 and len(phone.messages) == 1
    (row,) = outbound(engine)
    assert row.status == "sent" and row.attempts == 2
    assert list(phone.messages) == [row.provider_id]


def test_phone_unavailable_is_retried(android: Channel, phone: FakePhone, engine: Engine,
                                      settings: Any) -> None:
    """503 from the phone: retried with backoff, then sent once."""
    phone.fail_sends = 2
    message_id = queue_one(engine, android, settings)
    assert [send_message(message_id) for _ in range(3)] == ["queued", "queued", "sent"]
    assert len(phone.messages) == 1


def test_bad_number_is_refused_before_calling_the_phone(
        android: Channel, phone: FakePhone, engine: Engine, settings: Any) -> None:
    """A request without a valid phone number never reaches the app (it would 500)."""
    message_id = queue_one(engine, android, settings, to="12345")
    assert send_message(message_id) == "failed"
    assert phone.send_requests == 0
    assert "E.164" in outbound(engine)[0].error


def test_bulk_goes_at_normal_priority_with_sim_number(
        engine: Engine, app: Flask, phone: FakePhone, channel: Channel, settings: Any,
        env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An invitation is not expedited; simNumber comes from the channel config."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ch = add_android(engine, phone, sim_number=2)
    send_message(queue_one(engine, ch, settings, priority=1))
    (msg,) = phone.messages.values()
    assert msg["priority"] == 0 and msg["simNumber"] == 2


def test_worker_died_mid_call_is_sent_again_not_unknown(
        android: Channel, phone: FakePhone, engine: Engine, settings: Any,
        redis_client: redis.Redis) -> None:
    """A row left 'sending' by a dead worker (the phone did get it) is resent by the
    sweeper under the same id: 409, 'sent' -- never 'unknown', never twice."""
    message_id = queue_one(engine, android, settings)
    with Session(engine) as db, db.begin():
        row = db.get(OutboundMessage, message_id)
        assert row is not None
        row.status, row.provider_id, row.attempts = "sending", "cd-died-mid-call", 1
        row.updated_at = datetime.now(UTC) - timedelta(minutes=3)
    phone.accept({"id": "cd-died-mid-call", "phoneNumbers": [PHONE],
                  "textMessage": {"text": "Hello"}})
    # The sweeper of the other providers would give up on it ('unknown'); not this one.
    assert sweep(settings, engine, redis_client, older_than=timedelta(0),
                 stuck_after=timedelta(hours=1),
                 resend_providers=IDEMPOTENT_PROVIDERS) == 0
    assert outbound(engine)[0].status == "queued"
    SimpleWorker([INTERACTIVE_QUEUE], connection=redis_client).work(burst=True)
    (row,) = outbound(engine)
    assert row.status == "sent" and len(phone.messages) == 1
    assert phone.send_requests == 2  # ours, then the 409


def test_send_job_finding_its_row_sending_resends(
        android: Channel, phone: FakePhone, engine: Engine, settings: Any) -> None:
    """The job itself, run again after its worker died, resends instead of 'unknown'."""
    message_id = queue_one(engine, android, settings)
    with Session(engine) as db, db.begin():
        row = db.get(OutboundMessage, message_id)
        assert row is not None
        row.status, row.provider_id = "sending", "cd-abc"
        row.updated_at = datetime.now(UTC) - timedelta(minutes=1)
    assert send_message(message_id) == "sent"
    assert list(phone.messages) == ["cd-abc"]


def test_rate_per_hour_defers_instead_of_blocking(
        android: Channel, phone: FakePhone, engine: Engine, settings: Any,
        redis_client: redis.Redis) -> None:
    """At 60 SMS/hour the first message goes; the next is put back with a delay
    (scheduled), not sent, and the worker is free at once."""
    with Session(engine) as db, db.begin():
        ch = db.get(Channel, android.id)
        assert ch is not None
        ch.config = json.dumps({**json.loads(ch.config), "rate_per_hour": 60})
    first = queue_one(engine, android, settings, key="a")
    second = queue_one(engine, android, settings, key="b", to="+233241234568")
    third = queue_one(engine, android, settings, key="c", to="+233241234569", priority=1)
    assert send_message(first) == "sent"
    assert send_message(second) == "queued"
    assert send_message(third) == "queued"
    assert len(phone.messages) == 1
    scheduled = ScheduledJobRegistry(INTERACTIVE_QUEUE, connection=redis_client)
    bulk = ScheduledJobRegistry(BULK_QUEUE, connection=redis_client)
    assert len(scheduled) == 1 and len(bulk) == 1
    # The reply waits for the next token; the invitation for a later slot.
    reply_at = scheduled.get_scheduled_time(scheduled.get_job_ids()[0])
    bulk_at = bulk.get_scheduled_time(bulk.get_job_ids()[0])
    assert reply_at <= bulk_at


# -- end to end: a citizen, the fake phone, the real app over HTTP, the worker ----------


def cli(env: dict[str, str], *args: str) -> Any:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_citizen_completes_by_sms_through_the_phone_every_webhook_twice(
        engine: Engine, channel: Channel, settings: Any, env: dict[str, str],
        redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """`channels add` sets the phone up; a citizen answers the whole questionnaire by SMS;
    every webhook arrives twice and one reply's send times out after the phone took it.
    Each answer is in SQL once, each question went out once, in order."""
    from gateway.web.app import create_app

    for name, value in {**env, "CIVICDIAL_SEND_BACKOFF_SECONDS": "0"}.items():
        monkeypatch.setenv(name, value)
    with fake_phone(signing_key=KEY, duplicate_deliveries=True) as ph, \
            serve_app(create_app(settings)) as base:
        config = ph.channel_config(rate_per_hour=0, timeout=0.5)
        result = cli(env, "channels", "add", "--provider", "android", "--kind", "sms",
                     "--address", SIM, "--campaign", "sdg1662", "--config",
                     json.dumps(config), "--base-url", base, "--json")
        assert result.exit_code == 0, result.output
        added = json.loads(result.output.splitlines()[-1])
        assert sorted(h["event"] for h in ph.webhooks.values()) == [
            "sms:delivered", "sms:failed", "sms:received", "sms:sent"]
        assert {h["url"] for h in ph.webhooks.values()} == {added["urls"]["events"]}
        ph.hang_seconds = 1.5  # longer than the channel's timeout
        texts = ["SURVEY", *ANSWERS]
        for n, text in enumerate(texts):
            if n == 2:
                ph.hang_after_accept = 1  # this reply: the phone takes it, answers too late
            ph.text(PHONE, text)
            assert ph.deliver() == 0
            work(engine, redis_client)
            ph.deliver()  # sms:sent / sms:delivered for the reply
        work(engine, redis_client)
        replies = ph.sent_to(PHONE)
    assert len(replies) == len(texts)  # one reply per text, none twice
    assert replies[0].startswith("Language")
    assert replies[-1].startswith("Thank you! Your answers are recorded")
    with Session(engine) as db:
        (interview,) = db.scalars(select(Interview)).all()
        n_answers = db.scalar(select(func.count()).select_from(Answer))
        statuses = set(db.scalars(select(OutboundMessage.status)))
        retried = db.scalar(select(func.count()).select_from(OutboundMessage).where(
            OutboundMessage.attempts > 1))
    assert retried == 1  # the one that timed out, then got 409
    assert interview.status == "completed"
    assert n_answers == len({q for q, _ in answers(engine)}) >= 20
    assert statuses == {"delivered"}


def test_killed_worker_leaves_nothing_unknown(
        engine: Engine, channel: Channel, settings: Any, env: dict[str, str],
        redis_client: redis.Redis, app: Flask) -> None:
    """SIGKILL a real `civicdial worker` while it sends through a slow phone; the sweeper
    and a second worker finish: every message 'sent', each on the phone once."""
    import os
    import signal
    import subprocess
    import sys

    with fake_phone(signing_key=KEY) as ph:
        ch = add_android(engine, ph, timeout=5)
        box = NumberBox(settings.encryption_key)
        with Session(engine) as db, db.begin():
            for n in range(30):
                db.add(OutboundMessage(key=f"inv-{n}", channel_id=ch.id, respondent=f"r{n}",
                                       recipient=box.seal(f"+2332412{n:05d}"), body=f"Hi {n}",
                                       priority=1, kind="invitation"))
        sweep(settings, engine, redis_client, older_than=timedelta(0))
        ph.hang_after_accept, ph.hang_seconds = 1000, 0.05  # every send a little slow
        worker_env = {**os.environ, **env, "CIVICDIAL_SEND_BACKOFF_SECONDS": "0"}

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker"],
                                    env=worker_env, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        first = start()
        try:
            deadline = time.monotonic() + 60
            while len(ph.messages) < 8 and time.monotonic() < deadline:
                time.sleep(0.005)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        assert 8 <= len(ph.messages) < 30, "the kill should land mid-run"
        second = start()
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                sweep(settings, engine, redis_client, older_than=timedelta(seconds=1),
                      resend_providers=IDEMPOTENT_PROVIDERS,
                      resend_after=timedelta(seconds=1))
                with Session(engine) as db:
                    open_rows = db.scalar(select(func.count()).select_from(OutboundMessage)
                                          .where(OutboundMessage.status.in_(
                                              ["queued", "sending"])))
                if open_rows == 0:
                    break
                time.sleep(0.3)
        finally:
            os.killpg(second.pid, signal.SIGTERM)
            second.wait(timeout=30)
        on_phone = [m["phoneNumbers"][0] for m in ph.messages.values()]
        on_phone_ids = set(ph.messages)
    rows = outbound(engine)
    assert {r.status for r in rows} == {"sent"}
    assert len(on_phone) == len(set(on_phone)) == 30
    assert {r.provider_id for r in rows} == on_phone_ids


# -- the CLI: channels add / check ----------------------------------------------------


def add_cmd(env: dict[str, str], config: dict[str, Any], *extra: str) -> Any:
    return cli(env, "channels", "add", "--provider", "android", "--kind", "sms",
               "--address", SIM, "--config", json.dumps(config), *extra)


def test_channels_add_registers_webhooks_and_says_what_to_set(
        engine: Engine, channel: Channel, env: dict[str, str], phone: FakePhone) -> None:
    """Four webhooks to the channel's events URL, the phone settings printed; running
    it for the same channel key again would replace, not duplicate (stable ids)."""
    result = add_cmd(env, phone.channel_config())
    assert result.exit_code == 0, result.output
    assert "Processing order: FIFO" in result.output
    assert "Signing Key" in result.output and "1.66.2" in result.output
    urls = {h["url"] for h in phone.webhooks.values()}
    (url,) = urls
    assert url.startswith("http://127.0.0.1:8000/webhooks/android/") and url.endswith("/events")
    assert len(phone.webhooks) == 4
    with Session(engine) as db:
        ch = db.scalar(select(Channel).where(Channel.provider == "android"))
        assert ch is not None and ch.address == SIM and url.split("/")[-2] == ch.key


@pytest.mark.parametrize("label,setup,config,extra,message", [
    ("unreachable phone", None, {"url": "http://127.0.0.1:9"}, (), "cannot reach the phone"),
    ("wrong password", None, {"password": "nope"}, (), "refused the username/password"),
    ("a LAN http URL on the standard build", None, {},
     ("--base-url", "http://192.168.1.20:8000"), "http://127.0.0.1"),
    ("missing signing key", None, {"signing_key": ""}, (), "signing_key"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_channels_add_errors(engine: Engine, channel: Channel, env: dict[str, str],
                             phone: FakePhone, label: str, setup: Callable | None,
                             config: dict[str, Any], extra: tuple[str, ...],
                             message: str) -> None:
    """Clear errors, and no channel left behind."""
    result = CliRunner().invoke(main, ["channels", "add", "--provider", "android", "--kind",
                                       "sms", "--address", SIM, "--config",
                                       json.dumps({**phone.channel_config(), **config}),
                                       *extra], env=env)
    assert result.exit_code != 0
    assert message in result.output
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(Channel).where(
            Channel.provider == "android")) == 0
    assert phone.webhooks == {}


def test_channels_check_reports_queue_webhooks_and_clock(
        engine: Engine, channel: Channel, env: dict[str, str]) -> None:
    """Health, pending messages (X-Total-Count), our webhooks, and a warning when the
    phone's clock is more than 60 s off."""
    with fake_phone(signing_key=KEY, clock_skew=120, auto_send=False) as ph:
        assert add_cmd(env, ph.channel_config()).exit_code == 0
        for n in range(3):
            ph.accept({"id": f"m{n}", "phoneNumbers": [PHONE], "textMessage": {"text": "x"}})
        with Session(engine) as db:
            key = db.scalar(select(Channel.key).where(Channel.provider == "android"))
        result = cli(env, "channels", "check", str(key), "--json")
        report = json.loads(result.output)
        assert report["status"] == "pass" and report["version"] == "1.66.2"
        assert report["pending"] == 3
        assert report["missing_webhooks"] == []
        assert 115 <= report["clock_skew_seconds"] <= 125
        assert report["ok"] is False and any("clock" in w for w in report["warnings"])
        text = cli(env, "channels", "check", str(key)).output
        assert "3 message(s) pending" in text
        assert re.search(r"clock +phone \+1[12]\d\.\d s from this node", text), text
    # The phone gone: a clear error, exit code 1.
    result = CliRunner().invoke(main, ["channels", "check", str(key)], env=env)
    assert result.exit_code == 1 and "cannot reach the phone" in result.output


def test_gson_dates_in_another_time_zone_parse_to_the_same_instant() -> None:
    """The fake writes receivedAt as the app does (yyyy-MM-dd'T'HH:mm:ss.SSSXXX)."""
    from fake_android import gson_date

    at = datetime(2026, 12, 1, 9, 31, 26, 123000, tzinfo=UTC)
    assert gson_date(at) == "2026-12-01T09:31:26.123Z"
    accra_plus_one = at.astimezone(timezone(timedelta(hours=1)))
    assert gson_date(accra_plus_one) == "2026-12-01T10:31:26.123+01:00"
    assert datetime.fromisoformat(gson_date(accra_plus_one)) == at
