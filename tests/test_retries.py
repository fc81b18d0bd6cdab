"""A retry that is due goes out within seconds, whatever worker was killed before it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis
from fake_providers import FakeProvider, fake_provider
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from gateway.store.crypto import NumberBox
from gateway.store.models import Campaign, Channel, OutboundMessage
from gateway.store.outbox import enqueue_send


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with fake_provider() as provider:
        yield provider


def _sms_channel(engine: Engine, fake: FakeProvider) -> Channel:
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign))
        assert campaign is not None
        ch = Channel(key="at-retry-key", provider="africastalking", kind="sms", address="1662",
                     campaign_id=campaign.id, config=json.dumps({
                         "username": "sandbox", "api_key": "at-key", "sender_id": "GSS",
                         "base_url": fake.base_url, "rate_per_second": 0}))
        db.add(ch)
        db.flush()
        db.expunge(ch)
    return ch


def _message(engine: Engine, settings, ch: Channel) -> OutboundMessage:  # type: ignore[no-untyped-def]
    with Session(engine) as db:
        row = db.scalar(select(OutboundMessage).where(OutboundMessage.channel_id == ch.id))
        assert row is not None
        return row


def _wait(predicate, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_a_due_retry_goes_out_after_its_worker_was_killed(
        engine: Engine, channel: Channel, redis_client: redis.Redis, settings,  # type: ignore[no-untyped-def]
        env: dict[str, str], fake: FakeProvider) -> None:
    """A send fails with 503 and is scheduled for a retry; its worker (and everything it
    forked) is SIGKILLed; a new worker sends the retry within seconds of its due time,
    not when a dead scheduler's lock expires or at the next 10-minute maintenance."""
    ch = _sms_channel(engine, fake)
    with Session(engine) as db, db.begin():
        db.add(OutboundMessage(key="retry:1", channel_id=ch.id, respondent="r1",
                               recipient=NumberBox(settings.encryption_key).seal("+233200000001"),
                               body="Hello", kind="invitation", priority=1))
    row = _message(engine, settings, ch)
    worker_env = {**os.environ, **env, "CIVICDIAL_SEND_BACKOFF_SECONDS": "3"}

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker"],
                                env=worker_env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    fake.fail_rate = 1.0  # the provider is down: the first attempt gets a 503
    first = start()
    try:
        # Up long enough to hold whatever scheduling lock it takes, then the send.
        assert _wait(lambda: redis_client.keys("rq:worker:*"), 60)
        time.sleep(2)
        enqueue_send(redis_client, row.id, 1, prefix=settings.redis_prefix)
        assert _wait(lambda: _message(engine, settings, ch).attempts == 1, 60)
        assert _message(engine, settings, ch).status == "queued"  # a retry is scheduled
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the worker and everything it forked
        first.wait()
    fake.fail_rate = 0.0  # the provider is back
    second = start()
    try:
        # Due 3 s after the failure; a stalled scheduler would leave it for a minute or ten.
        assert _wait(lambda: _message(engine, settings, ch).status == "sent", 30), \
            _message(engine, settings, ch).status
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(timeout=30)
    assert [m["to"] for m in fake.accepted] == ["+233200000001"]
