"""Retention: contact numbers and outbound message bodies are kept CIVICDIAL_RETENTION_DAYS
(answers stay, pseudonymous); the worker purges older ones once a day."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from sqlalchemy import Engine, delete, func, select, update

from gateway.config import Settings
from gateway.store.db import stored_utc
from gateway.store.models import CampaignContact, Contact, OutboundMessage

DAY = 86400
# A message still on its way keeps its number and body until it is done.
_UNFINISHED = ("queued", "held", "sending", "unknown")


@dataclass(frozen=True)
class Purged:
    contacts: int
    message_bodies: int


def purge(settings: Settings, engine: Engine, now: datetime | None = None) -> Purged:
    """Delete contacts and blank the numbers and bodies of finished outbound messages
    created more than `retention_days` ago (0: keep everything)."""
    if settings.retention_days <= 0:
        return Purged(0, 0)
    cutoff = (now or datetime.now(UTC)) - timedelta(days=settings.retention_days)
    with engine.begin() as conn:
        old = select(Contact.id).where(Contact.created_at < cutoff)
        conn.execute(delete(CampaignContact).where(CampaignContact.contact_id.in_(old)))
        contacts = conn.execute(delete(Contact).where(Contact.created_at < cutoff)).rowcount
        bodies = conn.execute(update(OutboundMessage).where(
            OutboundMessage.created_at < cutoff, OutboundMessage.body != "",
            OutboundMessage.status.not_in(_UNFINISHED)).values(body="", recipient="")).rowcount
    return Purged(contacts, bodies)


def purge_daily(settings: Settings, engine: Engine, client: redis.Redis) -> Purged | None:
    """Run `purge` at most once a day across every worker (a Redis marker with a day's
    expiry); None when another run is still fresh."""
    marker = f"{settings.redis_prefix}retention:last"
    if not client.set(marker, datetime.now(UTC).isoformat(), nx=True, ex=DAY):
        return None
    return purge(settings, engine)


def oldest_kept(settings: Settings, engine: Engine) -> dict[str, Any]:
    """What `status` shows: the policy and the oldest contact number and message body
    still kept (None: none kept)."""
    with engine.connect() as conn:
        contact = conn.scalar(select(func.min(Contact.created_at)))
        body = conn.scalar(select(func.min(OutboundMessage.created_at))
                           .where(OutboundMessage.body != ""))
    return {"retention_days": settings.retention_days,
            "oldest_contact_number": _iso(contact), "oldest_message_body": _iso(body)}


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return stored_utc(moment).isoformat()
