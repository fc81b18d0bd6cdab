"""A campaign's progress as the coordinator sees it (CLI `status`, API `/stats`, the
dashboard): interviews by outcome, answers in SQL, events still in the stream, SMS cost,
quota fill and airtime."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from gateway.coordination.airtime import summary as airtime_summary
from gateway.coordination.channels import UNBOUND_ERROR
from gateway.coordination.quotas import report as quota_report
from gateway.interview.engine import Rules, longest_path_screens
from gateway.interview.questionnaire import INELIGIBLE
from gateway.interview.segments import interview_cost
from gateway.store.models import Answer, Campaign, Channel, Interview, OutboundMessage
from gateway.store.registry import Registry
from gateway.store.sessions import SessionStore, real_respondent

# A message is queued or sending this long after its due time (its last change: queued,
# or failed and scheduled for a retry that is due within seconds): stuck, not waiting.
OVERDUE_AFTER = timedelta(minutes=5)
# Kinds a paused or closed campaign holds back on purpose (workers.outbound): not stuck.
HELD_WHILE_PAUSED = ("invitation", "reminder")


def campaign_status(engine: Engine, store: SessionStore,
                    overdue_after: timedelta = OVERDUE_AFTER) -> dict[str, Any]:
    outbound = _outbound(engine, overdue_after)
    with Session(engine) as db:
        campaigns = db.scalars(select(Campaign).order_by(Campaign.id)).all()
        counts: dict[tuple[int, str], int] = {
            (cid, status): n for cid, status, n in db.execute(
                select(Interview.campaign_id, Interview.status, func.count())
                .where(real_respondent(Interview.respondent))
                .group_by(Interview.campaign_id, Interview.status))
        }
        # Outside the survey's population (under 18): only this count is kept of them.
        ineligible: dict[int, int] = dict(db.execute(
            select(Interview.campaign_id, func.count())
            .where(Interview.status == "screened_out", Interview.reason == INELIGIBLE)
            .group_by(Interview.campaign_id)).all())
        started: dict[int, int] = dict(db.execute(
            select(Interview.campaign_id, func.count()).where(Interview.started_at.is_not(None),
                                                       real_respondent(Interview.respondent))
            .group_by(Interview.campaign_id)).all())
        answers: dict[int, int] = dict(db.execute(
            select(Answer.campaign_id, func.count()).where(Answer.value.is_not(None),
                                                          real_respondent(Answer.respondent))
            .group_by(Answer.campaign_id)).all())
        unbound = _unbound_channels(db)
    waiting = _waiting_by_campaign(store)
    costs = {c.questionnaire_version: _sms_cost(engine, c.questionnaire_version)
             for c in campaigns}
    return {
        "campaigns": [{
            "id": c.id, "slug": c.slug, "name": c.name, "state": c.state,
            "questionnaire_version": c.questionnaire_version,
            "interviews_started": started.get(c.id, 0),
            "interviews_completed": counts.get((c.id, "completed"), 0),
            "declined": counts.get((c.id, "declined"), 0),
            "screened_out": counts.get((c.id, "screened_out"), 0),
            # Still counted as started: the erasure keeps an interview as an anonymous
            # count, so completed falls and started does not.
            "withdrawn": counts.get((c.id, "withdrawn"), 0),
            "erased": counts.get((c.id, "erased"), 0),
            "ineligible": ineligible.get(c.id, 0),
            "answers_stored": answers.get(c.id, 0),
            "events_waiting": waiting.get(c.id, 0),
            "sms_segments_per_interview": costs[c.questionnaire_version],
            "target_size": c.target_size,
            "quotas": quota_report(engine, c),
            "airtime": airtime_summary(engine, c),
            "channels_unbound": unbound.get(c.id, []),
            **outbound.get(c.id, _no_outbound(overdue_after)),
        } for c in campaigns],
        "events_waiting": store.waiting(),
        # Malformed entries the worker set aside (see workers/persist.py); should stay 0.
        "events_parked": int(store.r.xlen(f"{store.stream}:dead")),
    }


def _unbound_channels(db: Session) -> dict[int, list[dict[str, Any]]]:
    """Per campaign, its unbound channels and the messages their unbinding stopped (failed
    with "channel unbound"): what a coordinator must know was never sent."""
    stopped = dict(db.execute(
        select(OutboundMessage.channel_id, func.count())
        .where(OutboundMessage.status == "failed", OutboundMessage.error == UNBOUND_ERROR)
        .group_by(OutboundMessage.channel_id)).all())
    report: dict[int, list[dict[str, Any]]] = {}
    for ch in db.scalars(select(Channel).where(Channel.unbound_at.is_not(None))
                         .order_by(Channel.id)):
        moment = ch.unbound_at
        if moment is not None and moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)  # SQLite keeps no time zone
        report.setdefault(ch.campaign_id, []).append({
            "id": ch.id, "provider": ch.provider, "kind": ch.kind, "address": ch.address,
            "unbound_at": moment.isoformat() if moment else None,
            "messages_stopped": stopped.get(ch.id, 0), "error": UNBOUND_ERROR})
    return report


def _no_outbound(overdue_after: timedelta) -> dict[str, Any]:
    return {"invitations_by_status": {}, "outbound_by_status": {},
            "outbound_overdue": {"count": 0, "oldest_due_at": None,
                                 "after_seconds": int(overdue_after.total_seconds())}}


def _outbound(engine: Engine, overdue_after: timedelta) -> dict[int, dict[str, Any]]:
    """Per campaign: invitations and all outbound SMS by status, and the messages still
    queued (or sending) long past their due time, with the oldest one's due time."""
    cutoff = datetime.now(UTC) - overdue_after
    report: dict[int, dict[str, Any]] = {}
    with Session(engine) as db:
        for cid, kind, status, n in db.execute(
                select(Channel.campaign_id, OutboundMessage.kind, OutboundMessage.status,
                       func.count())
                .join(Channel, Channel.id == OutboundMessage.channel_id)
                .group_by(Channel.campaign_id, OutboundMessage.kind, OutboundMessage.status)):
            entry = report.setdefault(cid, _no_outbound(overdue_after))
            by_status = entry["outbound_by_status"]
            by_status[status] = by_status.get(status, 0) + n
            if kind == "invitation":
                entry["invitations_by_status"][status] = n
        for cid, n, oldest in db.execute(
                select(Channel.campaign_id, func.count(), func.min(OutboundMessage.updated_at))
                .join(Channel, Channel.id == OutboundMessage.channel_id)
                .join(Campaign, Campaign.id == Channel.campaign_id)
                .where(OutboundMessage.status.in_(("queued", "sending")),
                       OutboundMessage.updated_at < cutoff,
                       (Campaign.state == "open")
                       | OutboundMessage.kind.not_in(HELD_WHILE_PAUSED))
                .group_by(Channel.campaign_id)):
            entry = report.setdefault(cid, _no_outbound(overdue_after))
            if oldest is not None and oldest.tzinfo is None:
                oldest = oldest.replace(tzinfo=UTC)  # SQLite keeps no time zone
            entry["outbound_overdue"] = {
                "count": n, "oldest_due_at": oldest.isoformat() if oldest else None,
                "after_seconds": int(overdue_after.total_seconds())}
    return report


def _sms_cost(engine: Engine, version: str) -> dict[str, dict[str, int]]:
    """Segments we send in an SMS interview that is asked everything, per language: as
    written, and with Twi letters folded to GSM-7 (channel config "fold": true)."""
    form = Registry(engine).questionnaire(version)
    return {lang.key: {
        "as_written": interview_cost(longest_path_screens(form, lang.key, Rules.sms())),
        "folded": interview_cost(longest_path_screens(form, lang.key, Rules.sms(fold=True))),
    } for lang in form.languages}


def _waiting_by_campaign(store: SessionStore) -> Counter[int]:
    counts: Counter[int] = Counter()
    start = "-"
    while True:
        chunk = store.r.xrange(store.stream, min=start, count=5000)
        if not chunk:
            return counts
        for _, fields in chunk:
            event = json.loads(fields[b"e"])
            if "c" in event:
                counts[event["c"]] += 1
        last = chunk[-1][0].decode()
        start = "(" + last
