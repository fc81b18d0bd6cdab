"""Outbound SMS: one persisted row and one RQ job per message.

A message row is written (idempotently, by key) before any attempt. A send job claims the
row by moving it from 'queued' to 'sending' in one UPDATE, so two jobs for one message
cannot both send. Timeouts, 5xx and 429 are retried with exponential backoff; 4xx are
final. A worker killed during the provider call leaves the row in 'sending': it is marked
'unknown' rather than sent again, because neither Africa's Talking nor Twilio can tell us
whether it went out and a duplicate survey question is worse than a visible gap.

Invitations and reminders of one text on a channel whose provider has a bulk sender
(BULK_SENDERS: Africa's Talking) go in batches: the job of one claims it and its queued
siblings in one UPDATE, takes their send jobs off the queue, and sends them in one call; each
recipient's outcome is recorded on its own row (see _attempt_batch).

SMS Gateway for Android is different: it takes our id for the message and answers 409 to a
second request with it, so its messages are sent again instead (IDEMPOTENT_SENDERS) and
never end 'unknown'.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from prometheus_client import Counter
from sqlalchemy import Engine, Exists, bindparam, exists, func, or_, select, update
from sqlalchemy.orm import Session

from gateway.channels import africastalking, android, twilio
from gateway.channels.sending import SendError, Sent, after_failure
from gateway.config import Settings, load_settings
from gateway.coordination.channels import UNBOUND_ERROR, channel_urls
from gateway.store.crypto import NumberBox
from gateway.store.db import set_status, shared_engine
from gateway.store.models import Campaign, Channel, OutboundMessage
from gateway.store.outbox import (
    enqueue_send,
    outbox_size,
    pending_key,
    queue_for,
)
from gateway.store.redis_conn import shared_redis
from gateway.store.sessions import SIMULATOR_PREFIX, SessionStore, is_simulated

log = logging.getLogger(__name__)

# Per send job, what became of the message (in the worker's process; /metrics adds up every
# process's under prometheus_client's multiprocess mode).
SENDS = Counter("civicdial_sends_total", "Outbound SMS send jobs by result: sent, retry, "
                "failed, unknown, stopped, held, waiting (behind an earlier message), taken",
                ["result"])

SENDERS: dict[str, Callable[[dict[str, Any], str, str], Sent]] = {
    "africastalking": africastalking.send_sms,
    "twilio": twilio.send_sms,
}
# Optional, per provider: one call for one text to many numbers, returning each
# recipient's Sent or SendError in order (raising a SendError that applies to all).
BulkSender = Callable[[dict[str, Any], list[str], str], list[Sent | SendError]]
BULK_SENDERS: dict[str, BulkSender] = {
    "africastalking": africastalking.send_sms_bulk,
}
# Messages that go out in batches (one text to many people) where the provider can.
BATCHED_KINDS = ("invitation", "reminder")
# Under a rate limit a batch is at most a tenth of a second's worth, so that the rate
# stays smooth rather than one burst a second.
BATCHES_PER_SECOND = 10
# Providers that take our id for a message and refuse a second message with it: a send
# whose outcome we did not hear (a timeout, a worker killed mid-call) is simply repeated.
IDEMPOTENT_SENDERS: dict[str, Callable[[dict[str, Any], android.Outgoing], Sent]] = {
    "android": android.send_sms,
}
IDEMPOTENT_PROVIDERS = frozenset(IDEMPOTENT_SENDERS)
# A worker holds a message at most this long for a rate-limit token; a longer wait (a
# phone's SIM allows ~100 SMS/hour) puts the job back with a delay instead, so the
# worker persists answers and sends other channels' messages meanwhile.
MAX_TOKEN_WAIT = 1.0
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
local count = tonumber(ARGV[3]) or 1
local wait = 0
if tokens >= count then
  tokens = math.min(burst, tokens - count)
else
  wait = math.ceil((count - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
-- Kept at least as long as a full refill takes: forgetting the bucket sooner would hand
-- out a fresh burst early on a slow (per-hour) channel.
redis.call('PEXPIRE', KEYS[1], math.max(60000, math.ceil(burst * 1000 / rate)))
return wait
"""

# Where deferred bulk messages of a throttled channel wake up: one slot per token interval
# after the last one handed out, so a backlog of invitations wakes once each, in turn,
# instead of all polling for every token. Replies are not spread: they wait for the next
# token only, and the worker takes them first.
_BULK_SLOT = """
local wait = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local last = tonumber(redis.call('GET', KEYS[1])) or 0
local slot = math.max(now + wait, last + interval)
redis.call('SET', KEYS[1], slot, 'PX', slot - now + 60000)
return slot - now
"""


def wait_for_token(client: redis.Redis, prefix: str, channel_id: int, rate: float,
                   max_wait: float = 60.0, burst: float | None = None,
                   count: int = 1) -> float:
    """Block until the channel's rate limit lets `count` more messages out (0.0), or, when
    that would take longer than max_wait, return the seconds still to wait (no token
    taken: the caller defers the message). A negative count gives back tokens taken for
    messages of a batch that did not go."""
    if rate <= 0:
        return 0.0
    script = client.register_script(_TAKE_TOKEN)
    deadline = time.monotonic() + max_wait
    while True:
        wait_ms = int(script(keys=[f"{prefix}rate:{channel_id}"],
                             args=[rate, burst or max(1.0, rate), count]))
        if wait_ms <= 0:
            return 0.0
        if time.monotonic() + wait_ms / 1000 > deadline:
            return wait_ms / 1000
        time.sleep(wait_ms / 1000)


def defer_delay(client: redis.Redis, prefix: str, channel_id: int, rate: float,
                wait: float, bulk: bool) -> float:
    """How long to put a throttled message back for: until the next token (a reply), or
    until the next free bulk slot (an invitation, a reminder)."""
    if not bulk:
        return wait
    script = client.register_script(_BULK_SLOT)
    return int(script(keys=[f"{prefix}rate:{channel_id}:bulk"],
                      args=[int(wait * 1000), int(1000 / rate)])) / 1000


def channel_rate(provider: str, config: dict[str, Any]) -> float:
    """Messages per second a channel may send (0: unthrottled)."""
    if provider == "android":
        return android.rate_per_second(config)
    return float(config.get("rate_per_second", 10))


def _set(engine: Engine, message_id: int, **conditions_and_values: Any) -> bool:
    return set_status(engine, OutboundMessage, message_id, **conditions_and_values)


def send_message(message_id: int) -> str:
    """RQ job: send one queued message; returns the status it leaves the row in."""
    settings = load_settings()
    client = shared_redis(settings)
    client.delete(pending_key(settings.redis_prefix, message_id))
    status = _send(settings, shared_engine(settings), client, message_id)
    # Back in the queue after a failure means a retry is scheduled.
    SENDS.labels("retry" if status == "queued" else status).inc()
    return status


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
    idempotent = channel is not None and channel.provider in IDEMPOTENT_PROVIDERS
    if row.status == "sending" and idempotent:
        # The worker died during the call: send it again under the same id (the phone
        # answers 409 if the first one got through).
        if not _set(engine, message_id, if_status="sending",
                    untouched_since=datetime.now(UTC) - IN_FLIGHT, status="queued",
                    error="a worker died during the provider call; sent again (same id)"):
            return "taken"
        row.status = "queued"
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
    if channel is not None and channel.unbound_at is not None:
        # Queued after the unbind stopped the rest (a results broadcast, say).
        _set(engine, message_id, if_status="queued", status="failed", error=UNBOUND_ERROR)
        return "failed"
    if channel is None or (channel.provider not in SENDERS
                           and channel.provider not in IDEMPOTENT_SENDERS):
        _set(engine, message_id, if_status="queued", status="failed",
             error="channel missing or cannot send")
        return "failed"
    if row.kind in HELD_WHILE_PAUSED and not _campaign_open(engine, channel.campaign_id):
        # Pausing a campaign stops its bulk sends; release_held resumes them on reopening.
        _set(engine, message_id, if_status="queued", status="held",
             error="campaign not open")
        return "held"
    config = json.loads(channel.config or "{}")
    rate = channel_rate(channel.provider, config)
    size = batch_size(settings, config, rate)
    if row.kind in BATCHED_KINDS and channel.provider in BULK_SENDERS and size > 1:
        return _attempt_batch(settings, engine, client, row, channel, config, rate, size)
    burst = config.get("burst")
    wait = wait_for_token(client, settings.redis_prefix, channel.id, rate,
                          max_wait=MAX_TOKEN_WAIT if rate < 1 else 60.0,
                          burst=float(burst) if isinstance(burst, int | float) else None)
    if wait > 0:
        delay = defer_delay(client, settings.redis_prefix, channel.id, rate, wait,
                            bulk=priority != 0)
        enqueue_send(client, message_id, priority, delay, settings.redis_prefix)
        return "queued"
    idempotent = channel.provider in IDEMPOTENT_SENDERS
    values: dict[str, Any] = {"status": "sending", "attempts": OutboundMessage.attempts + 1,
                              "updated_at": datetime.now(UTC)}
    if idempotent:
        # Our id for the message, chosen at the first claim and kept for every retry;
        # random, not the row id, so a node started afresh on a new database cannot
        # collide with messages the phone still remembers (a 409 would swallow them).
        values["provider_id"] = func.coalesce(OutboundMessage.provider_id,
                                              f"cd-{secrets.token_hex(12)}")
    with engine.begin() as conn:
        claimed_row = conn.execute(
            update(OutboundMessage)
            .where(OutboundMessage.id == message_id, OutboundMessage.status == "queued",
                   ~_earlier_pending(row))
            .values(**values).returning(OutboundMessage.provider_id)).first()
    if claimed_row is None:
        return "taken"
    attempts += 1
    to = NumberBox(settings.encryption_key).open(row.recipient)
    if channel.provider == "twilio" and not config.get("status_callback") \
            and settings.public_base_url:
        # The status URL holds the channel's key: it comes from the channel itself, so
        # nobody has to copy it into the config (which no command could edit).
        config["status_callback"] = channel_urls(channel, settings.public_base_url)["status"]
    try:
        if idempotent:
            sent = IDEMPOTENT_SENDERS[channel.provider](config, android.Outgoing(
                id=str(claimed_row[0]), to=to, body=row.body, interactive=priority == 0))
        else:
            sent = SENDERS[channel.provider](config, to, row.body)
    except SendError as exc:
        status, delay = after_failure(exc, attempts, settings.send_retries,
                                      settings.send_backoff_seconds)
        if status == "unknown" and idempotent:
            status = "failed"  # cannot happen (its sender never says "maybe"), but never
        if not _set(engine, message_id, if_status="sending" if idempotent else None,
                    status=status, error=str(exc)):
            return "sent"  # a webhook said it went (the answer we missed was a 202)
        if status == "queued":
            enqueue_send(client, message_id, priority, delay, settings.redis_prefix)
        log.log(logging.INFO if status == "queued" else logging.WARNING,
                "message %d: %s (now %s, attempt %d)", message_id, exc, status, attempts)
        return status
    if idempotent:
        # Its delivery webhooks match on the id set at the claim and may already have
        # moved the message on (sent, delivered): never pull it back.
        if not _set(engine, message_id, if_status="sending", status=sent.status, error=""):
            return "sent"
        return sent.status
    _set(engine, message_id, status=sent.status, provider_id=sent.provider_id, error="")
    return sent.status


def batch_size(settings: Settings, config: dict[str, Any], rate: float) -> int:
    """Recipients per bulk call on a channel: its config's `batch_size`, else
    CIVICDIAL_SEND_BATCH; under a rate limit at most a tenth of a second's worth."""
    size = int(config.get("batch_size") or settings.send_batch)
    if rate > 0:
        size = min(size, max(1, int(rate / BATCHES_PER_SECOND)))
    return max(1, size)


_OUTBOX = OutboundMessage.__table__
# Remove a claimed sibling's send job from its queue, if it still waits there (a worker
# may have taken it already: it will find the row claimed and stop), with its marker.
_DROP_JOBS = """
for i, marker in ipairs(KEYS) do
  local job = redis.call('GET', marker)
  if job then
    if redis.call('LREM', ARGV[1], 1, job) > 0 then
      redis.call('DEL', ARGV[2] .. job)
    end
    redis.call('DEL', marker)
  end
end
return 1
"""


def _claim_batch(engine: Engine, row: OutboundMessage, size: int) -> list[Any]:
    """Claim `row` and up to size - 1 queued siblings (same channel, text, kind and
    priority; never tried yet, so no retry skips its backoff; nobody's earlier message
    still waiting) in one UPDATE: queued -> sending. Another worker's claim skips the
    rows this one holds (SKIP LOCKED on PostgreSQL; SQLite has one writer at a time)."""
    earlier = _OUTBOX.alias("earlier")
    unblocked = ~exists().where(earlier.c.channel_id == _OUTBOX.c.channel_id,
                                earlier.c.respondent == _OUTBOX.c.respondent,
                                earlier.c.id < _OUTBOX.c.id,
                                earlier.c.status.in_(("queued", "sending")))
    siblings = (select(_OUTBOX.c.id).where(
        _OUTBOX.c.channel_id == row.channel_id, _OUTBOX.c.status == "queued",
        _OUTBOX.c.body == row.body, _OUTBOX.c.kind.in_(BATCHED_KINDS),
        _OUTBOX.c.priority == row.priority, _OUTBOX.c.attempts == 0,
        _OUTBOX.c.id != row.id, unblocked,
        # The simulator's messages are never sent: its rows go one by one (marked there).
        or_(_OUTBOX.c.respondent.is_(None),
            _OUTBOX.c.respondent.not_like(f"{SIMULATOR_PREFIX}%")))
        .order_by(_OUTBOX.c.id).limit(size - 1).with_for_update(skip_locked=True))
    mine = (select(_OUTBOX.c.id).where(_OUTBOX.c.id == row.id, _OUTBOX.c.status == "queued")
            .with_for_update(skip_locked=True))
    with engine.begin() as conn:
        # The job's own row first, and only rows nobody else holds: a claim never waits
        # for another worker's claim, so two claims cannot deadlock.
        if conn.scalar(mine) is None:
            return []
        ids = [row.id, *conn.scalars(siblings)] if size > 1 else [row.id]
        return list(conn.execute(
            update(_OUTBOX).where(_OUTBOX.c.id.in_(ids), _OUTBOX.c.status == "queued",
                                  # The row itself: its own earlier messages, checked
                                  # again as in the single send's claim.
                                  (_OUTBOX.c.id != row.id) | ~_earlier_pending(row))
            .values(status="sending", attempts=_OUTBOX.c.attempts + 1,
                    updated_at=datetime.now(UTC))
            .returning(_OUTBOX.c.id, _OUTBOX.c.respondent, _OUTBOX.c.recipient,
                       _OUTBOX.c.attempts, _OUTBOX.c.priority)).all())


def _record(engine: Engine, outcomes: list[dict[str, Any]]) -> None:
    """Every recipient's outcome of one batch, in one transaction."""
    if not outcomes:
        return
    with engine.begin() as conn:
        conn.execute(update(_OUTBOX).where(_OUTBOX.c.id == bindparam("b_id"),
                                           _OUTBOX.c.status == "sending")
                     .values(status=bindparam("b_status"), error=bindparam("b_error"),
                             provider_id=bindparam("b_provider"),
                             updated_at=datetime.now(UTC)), outcomes)


def _attempt_batch(settings: Settings, engine: Engine, client: redis.Redis,
                   row: OutboundMessage, channel: Channel, config: dict[str, Any],
                   rate: float, size: int) -> str:
    """Send `row` with up to size - 1 queued messages of the same text in one bulk call.

    The same guarantees as one message at a time: the rate limit (a token per recipient),
    a person's order (siblings with an earlier message waiting are left for later), the
    opt-out at send time (checked after the claim, just before the call), and no
    duplicate under a kill (every row of the batch is 'sending' before the call, so a
    worker killed during it leaves them all to become 'unknown', never resent). Each
    recipient's outcome is its own: sent, retried with backoff, or failed."""
    prefix = settings.redis_prefix
    wait_for_token(client, prefix, channel.id, rate, count=size)
    claimed = _claim_batch(engine, row, size)
    if rate > 0 and len(claimed) < size:
        wait_for_token(client, prefix, channel.id, rate, count=len(claimed) - size)
    if not claimed:
        return "taken"
    others = [c.id for c in claimed if c.id != row.id]
    if others:
        client.register_script(_DROP_JOBS)(
            keys=[pending_key(prefix, m) for m in others],
            args=[queue_for(client, row.priority).key, "rq:job:"])
    box = NumberBox(settings.encryption_key)
    outcomes: list[dict[str, Any]] = []
    batch: list[tuple[Any, str]] = []
    seen: set[str] = set()
    optouts = client.mget([SessionStore(client, prefix).optout_key(c.respondent)
                           for c in claimed])
    for c, opted_out in zip(claimed, optouts, strict=True):
        to = box.open(c.recipient)
        if opted_out is not None:
            outcomes.append({"b_id": c.id, "b_status": "stopped", "b_provider": None,
                             "b_error": "recipient opted out (STOP)"})
        elif to in seen:  # one number twice in a call would be one message: next batch
            outcomes.append({"b_id": c.id, "b_status": "queued", "b_provider": None,
                             "b_error": "", "retry": 0.0, "priority": c.priority})
        else:
            seen.add(to)
            batch.append((c, to))
    try:
        results: list[Sent | SendError] = BULK_SENDERS[channel.provider](
            config, [to for _, to in batch], row.body) if batch else []
    except SendError as exc:  # the whole call failed: it applies to every recipient
        results = [exc] * len(batch)
    for (c, _), result in zip(batch, results, strict=True):
        if isinstance(result, Sent):
            outcomes.append({"b_id": c.id, "b_status": result.status,
                             "b_provider": result.provider_id, "b_error": ""})
            continue
        status, delay = after_failure(result, c.attempts, settings.send_retries,
                                      settings.send_backoff_seconds)
        outcomes.append({"b_id": c.id, "b_status": status, "b_provider": None,
                         "b_error": str(result), "retry": delay, "priority": c.priority})
        log.log(logging.INFO if status == "queued" else logging.WARNING,
                "message %d: %s (now %s, attempt %d)", c.id, result, status, c.attempts)
    _record(engine, [{k: v for k, v in o.items() if k.startswith("b_")} for o in outcomes])
    for o in outcomes:
        if o["b_status"] == "queued":
            enqueue_send(client, o["b_id"], o["priority"], o["retry"], prefix)
    for o in outcomes:  # the job's own row is counted by send_message
        if o["b_id"] != row.id:
            SENDS.labels("retry" if o["b_status"] == "queued" else o["b_status"]).inc()
    done = {o["b_id"] for o in outcomes if o["b_status"] != "queued"}
    _kick_next_of(settings, engine, client, channel.id,
                  [c.respondent for c in claimed if c.id in done and c.id != row.id])
    # Whatever was claimed is sent; the row itself is claimed first or not at all.
    return next((o["b_status"] for o in outcomes if o["b_id"] == row.id), "taken")


def _kick_next_of(settings: Settings, engine: Engine, client: redis.Redis, channel_id: int,
                  respondents: list[str]) -> None:
    """_kick_next for the rest of a batch (the job's own row is kicked by _send): each
    person's next queued message on the channel, in one query."""
    if not respondents:
        return
    with Session(engine) as db:
        following = db.execute(
            select(func.min(OutboundMessage.id), OutboundMessage.respondent)
            .where(OutboundMessage.channel_id == channel_id,
                   OutboundMessage.respondent.in_(respondents),
                   OutboundMessage.status == "queued")
            .group_by(OutboundMessage.respondent)).all()
        priorities = dict(db.execute(select(OutboundMessage.id, OutboundMessage.priority)
                                     .where(OutboundMessage.id.in_(
                                         [f[0] for f in following])))
                          .tuples().all()) if following else {}
    for message_id, _ in following:
        enqueue_send(client, message_id, priorities[message_id], prefix=settings.redis_prefix,
                     unless_waiting=True)


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
            OutboundMessage.status == "held", Campaign.state == "open",
            Channel.unbound_at.is_(None)).distinct()).all()
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
