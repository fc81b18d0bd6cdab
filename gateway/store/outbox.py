"""The outbox: outbound SMS rows waiting in SQL and the RQ send jobs that carry them.

Domain code (invitations, publishing results) queues messages here; the send job itself,
`workers.outbound.send_message`, is named by its dotted path so nothing below the workers
imports them.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import redis
from rq import Queue
from rq.job import Job, JobStatus
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from gateway.config import Settings
from gateway.store.db import set_status
from gateway.store.models import Channel, OutboundMessage

SEND_JOB = "workers.outbound.send_message"
INTERACTIVE_QUEUE = "civicdial-sms"  # replies: a person is waiting
BULK_QUEUE = "civicdial-sms-bulk"  # invitations, reminders, hand-overs
STALE_SENDING = timedelta(minutes=10)
# An idempotent send (SMS Gateway for Android) 'sending' this long lost its worker; longer
# than any provider call.
RESEND_AFTER = timedelta(minutes=2)


def queue_for(client: redis.Redis, priority: int) -> Queue:
    return Queue(INTERACTIVE_QUEUE if priority == 0 else BULK_QUEUE, connection=client)


def pending_key(prefix: str, message_id: int) -> str:
    """Set while a send job for the message waits in a queue (cleared when it starts), so
    the sweeper does not enqueue a throttled backlog again."""
    return f"{prefix}sendq:{message_id}"


def send_job_id(message_id: int) -> str:
    return f"send-{message_id}-{time.time_ns()}"


def enqueue_send(client: redis.Redis, message_id: int, priority: int,
                 delay: float = 0.0, prefix: str = "cd:", unless_waiting: bool = False) -> None:
    """Queue a send job; with unless_waiting, not if one already waits for the message."""
    job_id = send_job_id(message_id)
    if not client.set(pending_key(prefix, message_id), job_id, ex=7 * 86400,
                      nx=unless_waiting):
        return
    queue = queue_for(client, priority)
    if delay > 0:
        queue.enqueue_in(timedelta(seconds=delay), SEND_JOB, message_id, result_ttl=0,
                         job_id=job_id)
    else:
        queue.enqueue(SEND_JOB, message_id, result_ttl=0, job_id=job_id)


def _still_waiting(client: redis.Redis, job_id: bytes | None) -> bool:
    """Is this send job still waiting its turn? A job a dying worker took off the queue
    (status 'started' but our code never ran: the marker would be gone) is not; nor is
    one it popped from the queue and died before marking started: its status still says
    'queued', but it is in no queue, and nobody would ever run it."""
    if not job_id:
        return False
    # One read of the job's hash, not Job.fetch then get_status: a worker that finishes
    # the job between those two deletes the hash (result_ttl=0) and get_status raises.
    status, origin = client.hmget(Job.key_for(job_id.decode()), "status", "origin")
    if status is None:
        return False  # finished, or never there: either way nothing waits
    if status.decode() == JobStatus.QUEUED:
        return origin is not None and client.lpos(
            Queue(origin.decode(), connection=client).key, job_id) is not None
    return status.decode() in (JobStatus.SCHEDULED, JobStatus.DEFERRED)


def outbox_size(engine: Engine, channel_id: int) -> int:
    """Messages of a channel waiting to go or going."""
    with Session(engine) as db:
        return db.scalar(select(func.count()).select_from(OutboundMessage).where(
            OutboundMessage.channel_id == channel_id,
            OutboundMessage.status.in_(("queued", "sending")))) or 0


def sweep(settings: Settings, engine: Engine, client: redis.Redis,
          older_than: timedelta = timedelta(minutes=5),
          stuck_after: timedelta = STALE_SENDING,
          resend_providers: frozenset[str] = frozenset(),
          resend_after: timedelta = RESEND_AFTER) -> int:
    """Re-enqueue queued messages whose job was lost (a worker died between writing the
    row and enqueueing), and give up on rows stuck in 'sending' -- except on channels of
    resend_providers, whose sends are idempotent (our id, 409 on a repeat): those go
    again."""
    now = datetime.now(UTC)
    with Session(engine) as db:
        if resend_providers:
            again = db.execute(select(OutboundMessage.id, OutboundMessage.priority).join(
                Channel, Channel.id == OutboundMessage.channel_id).where(
                OutboundMessage.status == "sending", Channel.provider.in_(resend_providers),
                OutboundMessage.updated_at < now - resend_after)).all()
            for message_id, priority in again:
                if set_status(engine, OutboundMessage, message_id, if_status="sending",
                              untouched_since=now - resend_after, status="queued",
                              error="a worker died during the provider call; sent again "
                                    "(same id)"):
                    enqueue_send(client, message_id, priority, prefix=settings.redis_prefix)
        stale = db.execute(select(OutboundMessage.id, OutboundMessage.priority).where(
            OutboundMessage.status == "queued",
            OutboundMessage.updated_at < now - older_than)).all()
        stuck = db.scalars(select(OutboundMessage.id).where(
            OutboundMessage.status == "sending",
            OutboundMessage.updated_at < now - stuck_after)).all()
    waiting = client.mget([pending_key(settings.redis_prefix, m) for m, _ in stale]) \
        if stale else []
    requeued = 0
    for (message_id, priority), job_id in zip(stale, waiting, strict=True):
        if _still_waiting(client, job_id):  # e.g. a throttled backlog
            continue
        # Touched (so not swept again at once) only if no job claimed it since we looked:
        # resetting a row a worker is sending to 'queued' would send it twice.
        if set_status(engine, OutboundMessage, message_id, if_status="queued",
                      untouched_since=now - older_than):
            enqueue_send(client, message_id, priority, prefix=settings.redis_prefix)
            requeued += 1
    for message_id in stuck:
        set_status(engine, OutboundMessage, message_id, if_status="sending",
                   untouched_since=now - stuck_after, status="unknown",
             error="stuck in sending (worker died?); not resent to avoid a duplicate")
    return requeued
