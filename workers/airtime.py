"""Airtime thank-you: a fixed amount per completed interview, once, within a budget.

Three guards against paying twice: the payment row is unique per (campaign, respondent)
and written in the same transaction as the completion it rewards; a job claims the row
by moving it from 'queued' to 'sending' in one UPDATE; and Africa's Talking gets an
idempotency key per payment. A worker killed during the provider call leaves the row in
'sending': it is marked 'unknown' for a person to check, never retried. The budget is
reserved when the row is written (rows that failed free their share), under a lock on
the campaign row, so concurrent workers cannot overspend it.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from rq import Queue
from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.orm import Session

from gateway.channels.africastalking import send_airtime
from gateway.channels.sending import SendError, after_failure
from gateway.config import Settings, load_settings
from gateway.coordination.airtime import COMMITTED
from gateway.store.crypto import NumberBox
from gateway.store.db import set_status, shared_engine, upsert_insert
from gateway.store.models import AirtimePayment, Campaign, Channel
from gateway.store.redis_conn import shared_redis

log = logging.getLogger(__name__)

QUEUE = "civicdial-sms-bulk"  # with the bulk sends: nobody waits on a thank-you
IN_FLIGHT = timedelta(seconds=30)


def reserve(conn: Connection, engine: Engine, completions: list[dict[str, Any]]) -> list[int]:
    """In the persist transaction: one payment row per completed interview of a campaign
    with airtime on, 'queued' while the budget allows, else 'skipped'. Returns the ids of
    new queued rows (to enqueue after commit); a repeated batch creates none."""
    created: list[int] = []
    by_campaign: dict[int, list[dict[str, Any]]] = {}
    for c in completions:
        by_campaign.setdefault(c["campaign_id"], []).append(c)
    for campaign_id, rows in by_campaign.items():
        lock = select(Campaign.airtime_currency, Campaign.airtime_amount,
                      Campaign.airtime_budget).where(Campaign.id == campaign_id)
        if engine.dialect.name == "postgresql":
            lock = lock.with_for_update()  # SQLite: the write transaction already serialises
        settings = conn.execute(lock).first()
        if settings is None or settings.airtime_amount is None:
            continue
        spent = conn.scalar(select(func.coalesce(func.sum(AirtimePayment.amount), 0)).where(
            AirtimePayment.campaign_id == campaign_id,
            AirtimePayment.status.in_(COMMITTED))) or 0
        for row in rows:
            fits = spent + settings.airtime_amount <= (settings.airtime_budget or 0)
            stmt = upsert_insert(engine, AirtimePayment.__table__).values(
                campaign_id=campaign_id, respondent=row["respondent"],
                interview_id=row["interview_id"], channel_id=row["channel_id"],
                recipient=row["recipient"], currency=settings.airtime_currency,
                amount=settings.airtime_amount, status="queued" if fits else "skipped",
                attempts=0, error="" if fits else "campaign airtime budget spent",
                created_at=row["at"], updated_at=row["at"],
            ).on_conflict_do_nothing(index_elements=["campaign_id", "respondent"])
            new_id = conn.execute(stmt.returning(AirtimePayment.id)).scalar()
            if new_id is not None and fits:
                spent += settings.airtime_amount
                created.append(new_id)
    return created


def enqueue(client: redis.Redis, payment_id: int, delay: float = 0.0) -> None:
    queue = Queue(QUEUE, connection=client)
    if delay > 0:
        queue.enqueue_in(timedelta(seconds=delay), pay, payment_id, result_ttl=0)
    else:
        queue.enqueue(pay, payment_id, result_ttl=0)


def pay(payment_id: int) -> str:
    """RQ job: send one queued airtime payment; returns the status it leaves it in."""
    settings = load_settings()
    return _pay(settings, shared_engine(settings), shared_redis(settings), payment_id)


def _set(engine: Engine, payment_id: int, **conditions_and_values: Any) -> bool:
    return set_status(engine, AirtimePayment, payment_id, **conditions_and_values)


def _credentials(db: Session, payment: AirtimePayment) -> tuple[int, dict[str, Any]] | None:
    """The Africa's Talking account to pay from: the interview's channel if it has
    credentials, else the campaign's first Africa's Talking channel that has them."""
    channels = db.scalars(select(Channel).where(
        Channel.campaign_id == payment.campaign_id, Channel.provider == "africastalking",
        Channel.unbound_at.is_(None)).order_by(Channel.id)).all()
    channels.sort(key=lambda c: c.id != payment.channel_id)
    for ch in channels:
        config = json.loads(ch.config or "{}")
        if config.get("username") and config.get("api_key"):
            return ch.id, config
    return None


def _pay(settings: Settings, engine: Engine, client: redis.Redis, payment_id: int) -> str:
    with Session(engine) as db:
        payment = db.get(AirtimePayment, payment_id)
        if payment is None:
            return "missing"
        account = _credentials(db, payment)
        db.expunge_all()
    if payment.status == "sending":
        # In flight for longer than any provider call takes: its worker died during it.
        return "unknown" if _give_up(engine, payment_id, IN_FLIGHT) else "taken"
    if payment.status != "queued":
        return payment.status
    if account is None:
        _set(engine, payment_id, if_status="queued", status="failed",
             error="the campaign has no Africa's Talking channel with username and api_key")
        return "failed"
    channel_id, config = account
    with engine.begin() as conn:
        claimed = conn.execute(update(AirtimePayment).where(
            AirtimePayment.id == payment_id, AirtimePayment.status == "queued").values(
            status="sending", attempts=AirtimePayment.attempts + 1, channel_id=channel_id,
            updated_at=datetime.now(UTC))).rowcount
    if not claimed:
        return "taken"
    attempts = payment.attempts + 1
    to = NumberBox(settings.encryption_key).open(payment.recipient)
    try:
        sent = send_airtime(config, to, payment.currency, payment.amount,
                            f"civicdial-airtime-{payment.campaign_id}-{payment.respondent}")
    except SendError as exc:
        status, delay = after_failure(exc, attempts, settings.send_retries,
                                      settings.send_backoff_seconds)
        _set(engine, payment_id, status=status, error=str(exc))
        if status == "queued":
            enqueue(client, payment_id, delay)
        log.log(logging.INFO if status == "queued" else logging.WARNING,
                "airtime %d: %s (now %s, attempt %d)", payment_id, exc, status, attempts)
        return status
    _set(engine, payment_id, status=sent.status, request_id=sent.provider_id, error="")
    return sent.status


def sweep(engine: Engine, client: redis.Redis,
          older_than: timedelta = timedelta(minutes=5)) -> int:
    """Re-enqueue queued payments whose job was lost (a worker died before enqueueing, or
    a retry's scheduled job vanished). A job that still waits only finds the row taken."""
    cutoff = datetime.now(UTC) - older_than
    with Session(engine) as db:
        stale = db.execute(select(AirtimePayment.id, AirtimePayment.status).where(
            AirtimePayment.status.in_(("queued", "sending")),
            AirtimePayment.updated_at < cutoff)).all()
    requeued = 0
    for payment_id, status in stale:
        if status == "sending":
            _give_up(engine, payment_id, older_than)
        # Touched (not swept again at once) only if no job claimed it since we looked.
        elif _set(engine, payment_id, if_status="queued", untouched_since=cutoff):
            enqueue(client, payment_id)
            requeued += 1
    return requeued


def _give_up(engine: Engine, payment_id: int, idle: timedelta) -> bool:
    """A payment 'sending' for longer than any provider call: its worker died during the
    call. Never retried: it may have been paid."""
    return _set(engine, payment_id, if_status="sending",
                untouched_since=datetime.now(UTC) - idle,
                status="unknown", error="a worker died during the provider call; not "
                "retried so as never to pay twice: check the Africa's Talking account")
