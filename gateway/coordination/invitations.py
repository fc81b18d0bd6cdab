"""Invite a campaign's contacts by SMS through the outbound queue.

Each invitation is an outbound row keyed `invite:<campaign>:<contact>`, so inviting twice
queues nothing new, and a worker that dies halfway loses nothing (the sweeper enqueues any
row left without a job). Opted-out contacts are skipped here and checked again at send time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Queue
from sqlalchemy import Engine, and_, select

from gateway.interview.messages import message
from gateway.interview.segments import count_segments
from gateway.store.db import upsert_insert
from gateway.store.models import (
    Campaign,
    CampaignContact,
    Channel,
    Contact,
    OptOut,
    OutboundMessage,
)
from gateway.store.outbox import BULK_QUEUE, SEND_JOB, outbox_size, pending_key, send_job_id

CHUNK = 2000
_LANGUAGE_CODES = {"tw": "tw", "twi": "tw", "akan": "tw", "en": "en", "english": "en"}


class InvitationError(ValueError):
    pass


@dataclass(frozen=True)
class InviteResult:
    queued: int
    skipped_opted_out: int
    already_invited: int
    held: int = 0  # over the channel's backlog: released as the outbox drains

    def as_dict(self) -> dict[str, int]:
        return {"queued": self.queued, "held": self.held,
                "skipped_opted_out": self.skipped_opted_out,
                "already_invited": self.already_invited}


@dataclass(frozen=True)
class Audience:
    """Which of a campaign's contacts to invite; empty fields match everyone. Text is
    compared without regard to case or surrounding spaces."""

    region: str = ""
    language: str = ""
    attributes: tuple[tuple[str, str], ...] = ()
    limit: int | None = None

    def matches(self, region: str, language: str, attributes: str) -> bool:
        if self.region and _norm(region) != _norm(self.region):
            return False
        if self.language and _norm(language) != _norm(self.language):
            return False
        if self.attributes:
            held = {_norm(k): _norm(str(v)) for k, v in json.loads(attributes or "{}").items()}
            return all(held.get(_norm(k)) == _norm(v) for k, v in self.attributes)
        return True

    def as_dict(self) -> dict[str, object]:
        return {"region": self.region, "language": self.language,
                "attributes": dict(self.attributes), "limit": self.limit}


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _select(rows: Sequence[Any], audience: Audience) -> tuple[list[Any], int, int]:
    """Who of these contacts gets an invitation now; and how many are skipped as opted
    out or already invited."""
    rows = [r for r in rows if audience.matches(r.region, r.language, r.attributes)]
    stopped = sum(1 for r in rows if r.stopped)
    already = sum(1 for r in rows if r.sent and not r.stopped)
    return [r for r in rows if not r.stopped and not r.sent][:audience.limit], stopped, already


def preview(engine: Engine, campaign_slug: str, audience: Audience = Audience()) -> InviteResult:
    """What `invite` would do now with these filters, without queueing anything (held
    invitations are counted as queued)."""
    _, _, rows = _candidates(engine, campaign_slug)
    todo, stopped, already = _select(rows, audience)
    return InviteResult(len(todo), stopped, already)


def _candidates(engine: Engine, campaign_slug: str) -> tuple[Any, int, Sequence[Any]]:
    """The campaign, its SMS channel and its enrolled contacts with their opt-out and
    invitation state."""
    with engine.connect() as conn:
        campaign = conn.execute(select(Campaign).where(Campaign.slug == campaign_slug)).first()
        if campaign is None:
            raise InvitationError(f"no campaign {campaign_slug!r}")
        if campaign.state != "open":
            raise InvitationError(f"campaign {campaign_slug} is {campaign.state}, not open")
        channel_id = conn.scalar(select(Channel.id).where(
            Channel.campaign_id == campaign.id, Channel.kind == "sms",
            Channel.unbound_at.is_(None)).order_by(Channel.id))
        if channel_id is None:
            raise InvitationError(f"campaign {campaign_slug} has no SMS channel to invite "
                                  "through (civicdial channels add --kind sms ...)")
        rows = conn.execute(
            select(Contact.id, Contact.respondent, Contact.recipient, Contact.language,
                   Contact.region, Contact.attributes,
                   OptOut.respondent.label("stopped"), OutboundMessage.id.label("sent"))
            .join(CampaignContact, CampaignContact.contact_id == Contact.id)
            .outerjoin(OptOut, OptOut.respondent == Contact.respondent)
            .outerjoin(OutboundMessage, and_(
                OutboundMessage.respondent == Contact.respondent,
                OutboundMessage.kind == "invitation",
                OutboundMessage.channel_id == channel_id))
            .where(CampaignContact.campaign_id == campaign.id)
            .order_by(Contact.id)).all()
    return campaign, channel_id, rows


def invite(engine: Engine, client: redis.Redis, campaign_slug: str,
           progress: Callable[[int], None] | None = None, prefix: str = "cd:",
           backlog: int = 10_000, audience: Audience = Audience()) -> InviteResult:
    campaign, channel_id, rows = _candidates(engine, campaign_slug)
    examined = len(rows)
    todo, stopped, already = _select(rows, audience)
    if progress:  # contacts left out count as done
        progress(examined - len(todo))
    bodies = {code: message(code, "invitation", keyword=campaign.sms_keyword)
              for code in ("en", "tw")}
    queue = Queue(BULK_QUEUE, connection=client)
    # Past the channel's backlog, invitations are stored as 'held' and released by the
    # worker as the outbox drains, so bulk work never floods the provider or delays replies.
    room = max(0, backlog - outbox_size(engine, channel_id))
    queued = held = 0
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start:start + CHUNK]
        now = datetime.now(UTC)
        values = []
        for n, r in enumerate(chunk):
            body = bodies[_LANGUAGE_CODES.get((r.language or "").strip().lower(), "en")]
            values.append({
                "key": f"invite:{campaign.id}:{r.id}", "channel_id": channel_id,
                "respondent": r.respondent, "recipient": r.recipient, "body": body,
                "kind": "invitation", "priority": 1,
                "segments": count_segments(body).segments,
                "status": "queued" if queued + n < room else "held",
                "attempts": 0, "error": "", "created_at": now, "updated_at": now})
        with engine.begin() as conn:
            rows = conn.execute(upsert_insert(engine, OutboundMessage.__table__)
                                .on_conflict_do_nothing(index_elements=["key"])
                                .returning(OutboundMessage.id, OutboundMessage.status),
                                values).all()
        ids = [message_id for message_id, status in rows if status == "queued"]
        held += len(rows) - len(ids)
        # One pipelined round trip per chunk: 100,000 invitations queue in seconds.
        job_ids = {message_id: send_job_id(message_id) for message_id in ids}
        with client.pipeline(transaction=False) as pipe:
            for message_id, job_id in job_ids.items():
                pipe.set(pending_key(prefix, message_id), job_id, ex=7 * 86400)
            pipe.execute()
        queue.enqueue_many([Queue.prepare_data(SEND_JOB, (message_id,), result_ttl=0,
                                               job_id=job_id)
                            for message_id, job_id in job_ids.items()])
        queued += len(ids)
        if progress:
            progress(len(chunk))
    return InviteResult(queued, stopped, already, held)
