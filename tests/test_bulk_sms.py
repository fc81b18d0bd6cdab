"""Invitations in batches: one Africa's Talking SMS.send for many recipients of one text.

The guarantees of one-at-a-time sending (tests/test_sms.py) hold for batches too: each
recipient's outcome is its own, opt-outs are checked at send time, and a worker killed
mid-batch neither loses a message nor sends one twice.
"""

# ruff: noqa: F811 - the fixtures imported from test_sms are parameters by name
from __future__ import annotations

import os
from datetime import timedelta

import redis
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from test_sms import SmsChannels, Worker, fake, sms, work  # noqa: F401 - fixtures used by name

from gateway.store.crypto import NumberBox
from gateway.store.models import OutboundMessage
from gateway.store.outbox import sweep
from gateway.store.sessions import pseudonym

INVITATION = "Ghana Statistical Service asks about public services. Reply SURVEY to start."


def queue_invitations(engine: Engine, settings, channel_id: int, n: int,  # type: ignore[no-untyped-def]
                      body: str = INVITATION, key: str = "invite") -> list[str]:
    """n invitations of one text, one number each, as `civicdial invite` writes them."""
    box = NumberBox(settings.encryption_key)
    numbers = [f"+23326{i:07d}" for i in range(n)]
    with Session(engine) as db, db.begin():
        for i, number in enumerate(numbers):
            db.add(OutboundMessage(key=f"{key}:{i}", channel_id=channel_id,
                                   respondent=pseudonym(settings.pseudonym_key, number),
                                   recipient=box.seal(number), body=body,
                                   kind="invitation", priority=1))
    return numbers


def rows_by_number(engine: Engine, settings) -> dict[str, OutboundMessage]:  # type: ignore[no-untyped-def]
    box = NumberBox(settings.encryption_key)
    with Session(engine) as db:
        return {box.open(r.recipient): r for r in db.scalars(select(OutboundMessage))}


def test_one_call_per_batch_and_an_outcome_per_recipient(
        sms: SmsChannels, engine: Engine, redis_client: redis.Redis, settings) -> None:  # type: ignore[no-untyped-def]
    """250 invitations of one text leave in calls of at most 100 recipients (the default
    CIVICDIAL_SEND_BATCH), not 250 calls. A number Africa's Talking rejects fails alone,
    after one attempt; one it answers 500 for is retried alone and sent; one who texted
    STOP after the invitation was queued gets nothing. Every other number gets it once,
    with its own message id; no send job is left behind in Redis."""
    numbers = queue_invitations(engine, settings, sms.at.id, 250)
    rejected, flaky, stopped = numbers[3], numbers[150], numbers[201]
    sms.fake.reject.add(rejected)
    sms.fake.recipient_fail[flaky] = 1
    redis_client.set(f"cd:optout:{pseudonym(settings.pseudonym_key, stopped)}", "1")
    assert sweep(settings, engine, redis_client, older_than=timedelta(0)) == 250
    work(engine, redis_client)

    received = [m["to"] for m in sms.fake.accepted]
    assert sorted(received) == sorted(set(numbers) - {rejected, stopped})
    assert max(sms.fake.calls) == 100 and len(sms.fake.calls) <= 5
    assert sum(sms.fake.calls) == 250  # 249 asked once (not STOP), the flaky one twice
    rows = rows_by_number(engine, settings)
    assert (rows[rejected].status, rows[rejected].attempts) == ("failed", 1)
    assert "403 InvalidPhoneNumber" in rows[rejected].error
    assert (rows[flaky].status, rows[flaky].attempts) == ("sent", 2)
    assert rows[stopped].status == "stopped"
    sent = [r for n, r in rows.items() if n not in (rejected, stopped)]
    assert {r.status for r in sent} == {"sent"}
    ids = {m["id"] for m in sms.fake.accepted}
    assert {r.provider_id for r in sent} == {f"ATXid_{i}" for i in ids}
    assert redis_client.keys("rq:job:send-*") == []
    assert redis_client.keys("cd:sendq:*") == []


def test_different_texts_and_batch_size_one(sms: SmsChannels, engine: Engine,
                                            redis_client: redis.Redis, settings,  # type: ignore[no-untyped-def]
                                            monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Only one text goes in one call (English and Twi invitations go apart); with
    CIVICDIAL_SEND_BATCH=1 every message is a call of its own, as before."""
    queue_invitations(engine, settings, sms.at.id, 10)
    box = NumberBox(settings.encryption_key)
    with Session(engine) as db, db.begin():
        for i in range(5):
            db.add(OutboundMessage(key=f"tw:{i}", channel_id=sms.at.id, respondent=f"t{i}",
                                   recipient=box.seal(f"+23327{i:07d}"), body="Yɛfrɛ wo",
                                   kind="invitation", priority=1))
    sweep(settings, engine, redis_client, older_than=timedelta(0))
    work(engine, redis_client)
    assert sorted(sms.fake.calls) == [5, 10]
    assert {m["body"] for m in sms.fake.accepted if m["to"].startswith("+23327")} == {
        "Yɛfrɛ wo"}

    monkeypatch.setenv("CIVICDIAL_SEND_BATCH", "1")
    sms.fake.calls.clear()
    queue_invitations(engine, settings, sms.at.id, 4, body="Second round", key="round2")
    sweep(settings, engine, redis_client, older_than=timedelta(0))
    work(engine, redis_client)
    assert sms.fake.calls == [1, 1, 1, 1]


def test_worker_killed_mid_batch_neither_loses_nor_doubles(
        sms: SmsChannels, engine: Engine, redis_client: redis.Redis, settings,  # type: ignore[no-untyped-def]
        env: dict[str, str]) -> None:
    """SIGKILL a real `civicdial worker` while a batch of 20 is at the provider (which
    takes 0.3 s to answer); a second worker finishes. No number gets the invitation
    twice; none is lost: each row ends 'sent' (and its number got it) or 'unknown' (the
    batch the kill caught: at most one batch, never resent); nothing stays queued."""
    sms.fake.delay = 0.3
    numbers = queue_invitations(engine, settings, sms.at.id, 200)
    sweep(settings, engine, redis_client, older_than=timedelta(0))
    worker_env = {**os.environ, **env, "CIVICDIAL_SEND_BACKOFF_SECONDS": "0",
                  "CIVICDIAL_SEND_BATCH": "20"}

    worker = Worker(worker_env)
    # Two batches answered, and a third at the provider (inside its 0.3 s).
    worker.kill_when(lambda: len(sms.fake.calls) >= 2 and sms.fake.posts > len(sms.fake.calls),
                     within=120)
    assert 2 <= len(sms.fake.calls) < 10, "the kill should land mid-run"
    worker.finish(settings, engine, redis_client)
    received = [m["to"] for m in sms.fake.accepted]
    assert len(received) == len(set(received)), "an invitation was sent twice"
    rows = rows_by_number(engine, settings)
    assert {r.status for r in rows.values()} <= {"sent", "unknown"}
    unknown = [n for n, r in rows.items() if r.status == "unknown"]
    assert 0 < len(unknown) <= 20, "the batch at the provider, and only it, is unknown"
    # The provider did take that batch (it answered a worker that was gone): unknown, but
    # neither lost nor, since nobody resent it, doubled.
    assert set(unknown) <= set(received)
    for number in numbers:
        if rows[number].status == "sent":
            assert number in received
