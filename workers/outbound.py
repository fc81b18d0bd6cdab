"""Outbound SMS: one persisted row and one RQ job per message.

A message row is written (idempotently, by key) before any attempt. A send job claims the
row by moving it from 'queued' to 'sending' in one UPDATE, so two jobs for one message
cannot both send. Timeouts, 5xx and 429 are retried with exponential backoff; 4xx are
final. A worker killed during the provider call leaves the row in 'sending': it is marked
'unknown' rather than sent again, because neither Africa's Talking nor Twilio can tell us
whether it went out and a duplicate survey question is worse than a visible gap.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import Engine, Exists, exists, select, update
from sqlalchemy.orm import Session

from gateway.channels import africastalking, twilio
from gateway.channels.sending import SendError, Sent, after_failure
from gateway.config import Settings, load_settings
from gateway.store.crypto import NumberBox
from gateway.store.db import set_status, shared_engine
from gateway.store.models import Campaign, Channel, OutboundMessage
from gateway.store.outbox import (
    enqueue_send,
    outbox_size,
    pending_key,
)
from gateway.store.redis_conn import shared_redis
from gateway.store.sessions import SessionStore, is_simulated

log = logging.getLogger(__name__)

SENDERS: dict[str, Callable[[dict[str, Any], str, str], Sent]] = {
    "africastalking": africastalking.send_sms,
    "twilio": twilio.send_sms,
}
# Messages asking people to take part, which a paused or closed campaign does not send
# (replies, opt-out confirmations and published results still go).
HELD_WHILE_PAUSED = {"invitation", "reminder"}
# Messages that must go out even to someone who has opted out.
EXEMPT_FROM_OPTOUT = {"optout_confirm"}
# Longer than any provider call (connect 3 s + read 10 s): a message 'sending' for less
# may be in another worker's hands; for more, that worker died.
IN_FLIGHT = timedelta(seconds=30)

# Token bucket per channel, on the Redis server's clock so every worker shares it.
_TAKE_TOKEN = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], 60000)
return wait
"""


def wait_for_token(client: redis.Redis, prefix: str, channel_id: int, rate: float,
                   max_wait: float = 60.0) -> None:
    """Block until the channel's rate limit lets one more message out."""
    if rate <= 0:
        return
    script = client.register_script(_TAKE_TOKEN)
    deadline = time.monotonic() + max_wait
    while True:
        wait_ms = int(script(keys=[f"{prefix}rate:{channel_id}"], args=[rate, max(1.0, rate)]))
        if wait_ms <= 0 or time.monotonic() > deadline:
            return
        time.sleep(wait_ms / 1000)


def _set(engine: Engine, message_id: int, **conditions_and_values: Any) -> bool:
    return set_status(engine, OutboundMessage, message_id, **conditions_and_values)


def send_message(message_id: int) -> str:
    """RQ job: send one queued message; returns the status it leaves the row in."""
    settings = load_settings()
    client = shared_redis(settings)
    client.delete(pending_key(settings.redis_prefix, message_id))
    return _send(settings, shared_engine(settings), client, message_id)


def _earlier_pending(row: OutboundMessage) -> Exists:
    """An earlier message to the same person on the same channel has not gone yet: this
    one must wait, so a person's messages leave in the order they were written."""
    earlier = OutboundMessage.__table__.alias("earlier")
    return exists().where(earlier.c.channel_id == row.channel_id,
                          earlier.c.respondent == row.respondent,
                          earlier.c.id < row.id,
                          earlier.c.status.in_(("queued", "sending")))


def _kick_next(settings: Settings, engine: Engine, client: redis.Redis,
               row: OutboundMessage) -> None:
    """This message is done: the person's next message, if one waits, may go now."""
    with Session(engine) as db:
        following = db.execute(select(OutboundMessage.id, OutboundMessage.priority).where(
            OutboundMessage.channel_id == row.channel_id,
            OutboundMessage.respondent == row.respondent, OutboundMessage.id > row.id,
            OutboundMessage.status == "queued").order_by(OutboundMessage.id).limit(1)).first()
    if following is not None:
        enqueue_send(client, following[0], following[1], prefix=settings.redis_prefix,
                     unless_waiting=True)


def _send(settings: Settings, engine: Engine, client: redis.Redis, message_id: int) -> str:
    with Session(engine) as db:
        row = db.get(OutboundMessage, message_id)
        if row is None:
            return "missing"
        channel = db.get(Channel, row.channel_id)
        db.expunge_all()
    if row.status == "sending":
        # Sending for longer than any provider call takes: the worker died during it.
        if not _set(engine, message_id, if_status="sending",
                    untouched_since=datetime.now(UTC) - IN_FLIGHT, status="unknown",
                    error="a worker died during the provider call; not resent to avoid "
                    "a duplicate"):
            return "taken"  # another worker is sending it right now
        status = "unknown"
    elif row.status != "queued":
        status = row.status
    else:
        status = _attempt(settings, engine, client, row, channel)
    if status not in ("queued", "waiting", "taken"):
        _kick_next(settings, engine, client, row)
    return status


def _attempt(settings: Settings, engine: Engine, client: redis.Redis, row: OutboundMessage,
             channel: Channel | None) -> str:
    """One try at sending a queued message; returns the status it leaves it in ('waiting':
    behind an earlier message to the same person, whose end will enqueue this one)."""
    message_id, attempts, priority = row.id, row.attempts, row.priority
    with Session(engine) as db:
        # Checked before taking a rate-limit token; the claim below checks again, atomically.
        if db.scalar(select(_earlier_pending(row))):
            return "waiting"
    if row.kind not in EXEMPT_FROM_OPTOUT and SessionStore(
            client, settings.redis_prefix).opted_out(row.respondent):
        _set(engine, message_id, if_status="queued", status="stopped",
             error="recipient opted out (STOP)")
        return "stopped"
    if is_simulated(row.respondent):
        # The console's phone simulator: its number is fictional, and the panel shows
        # the message from this row.
        _set(engine, message_id, if_status="queued", status="simulated",
             error="phone simulator: shown in the console, not sent")
        return "simulated"
    if channel is None or channel.provider not in SENDERS:
        _set(engine, message_id, if_status="queued", status="failed",
             error="channel missing or cannot send")
        return "failed"
    if row.kind in HELD_WHILE_PAUSED and not _campaign_open(engine, channel.campaign_id):
        # Pausing a campaign stops its bulk sends; release_held resumes them on reopening.
        _set(engine, message_id, if_status="queued", status="held",
             error="campaign not open")
        return "held"
    config = json.loads(channel.config or "{}")
    wait_for_token(client, settings.redis_prefix, channel.id,
                   float(config.get("rate_per_second", 10)))
    with engine.begin() as conn:
        claimed = conn.execute(
            update(OutboundMessage)
            .where(OutboundMessage.id == message_id, OutboundMessage.status == "queued",
                   ~_earlier_pending(row))
            .values(status="sending", attempts=OutboundMessage.attempts + 1,
                    updated_at=datetime.now(UTC))).rowcount
    if not claimed:
        return "taken"
    attempts += 1
    to = NumberBox(settings.encryption_key).open(row.recipient)
    try:
        sent = SENDERS[channel.provider](config, to, row.body)
    except SendError as exc:
        status, delay = after_failure(exc, attempts, settings.send_retries,
                                      settings.send_backoff_seconds)
        _set(engine, message_id, status=status, error=str(exc))
        if status == "queued":
            enqueue_send(client, message_id, priority, delay, settings.redis_prefix)
        log.log(logging.INFO if status == "queued" else logging.WARNING,
                "message %d: %s (now %s, attempt %d)", message_id, exc, status, attempts)
        return status
    _set(engine, message_id, status=sent.status, provider_id=sent.provider_id, error="")
    return sent.status


def _campaign_open(engine: Engine, campaign_id: int) -> bool:
    with Session(engine) as db:
        return db.scalar(select(Campaign.state).where(Campaign.id == campaign_id)) == "open"


def release_held(settings: Settings, engine: Engine, client: redis.Redis) -> int:
    """Move held bulk messages of open campaigns to the queue as far as each channel's
    backlog allows, oldest first."""
    with Session(engine) as db:
        channels = db.scalars(select(OutboundMessage.channel_id).join(
            Channel, Channel.id == OutboundMessage.channel_id).join(
            Campaign, Campaign.id == Channel.campaign_id).where(
            OutboundMessage.status == "held", Campaign.state == "open").distinct()).all()
    released = 0
    for channel_id in channels:
        room = settings.outbox_backlog - outbox_size(engine, channel_id)
        if room <= 0:
            continue
        with Session(engine) as db:
            batch = db.scalars(select(OutboundMessage.id).where(
                OutboundMessage.channel_id == channel_id, OutboundMessage.status == "held")
                .order_by(OutboundMessage.id).limit(room)).all()
        for message_id in batch:
            with engine.begin() as conn:
                moved = conn.execute(update(OutboundMessage).where(
                    OutboundMessage.id == message_id, OutboundMessage.status == "held")
                    .values(status="queued", error="", updated_at=datetime.now(UTC))).rowcount
            if moved:
                enqueue_send(client, message_id, 1, prefix=settings.redis_prefix)
                released += 1
    return released
