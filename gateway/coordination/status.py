"""A campaign's progress as the coordinator sees it (CLI `status`, API `/stats`, the
dashboard): interviews by outcome, answers in SQL, events still in the stream, SMS cost,
quota fill and airtime."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from gateway.coordination.airtime import summary as airtime_summary
from gateway.coordination.quotas import report as quota_report
from gateway.interview.engine import Rules, longest_path_screens
from gateway.interview.segments import interview_cost
from gateway.store.models import Answer, Campaign, Interview
from gateway.store.registry import Registry
from gateway.store.sessions import SessionStore, real_respondent


def campaign_status(engine: Engine, store: SessionStore) -> dict[str, Any]:
    with Session(engine) as db:
        campaigns = db.scalars(select(Campaign).order_by(Campaign.id)).all()
        counts: dict[tuple[int, str], int] = {
            (cid, status): n for cid, status, n in db.execute(
                select(Interview.campaign_id, Interview.status, func.count())
                .where(real_respondent(Interview.respondent))
                .group_by(Interview.campaign_id, Interview.status))
        }
        started: dict[int, int] = dict(db.execute(
            select(Interview.campaign_id, func.count()).where(Interview.started_at.is_not(None),
                                                       real_respondent(Interview.respondent))
            .group_by(Interview.campaign_id)).all())
        answers: dict[int, int] = dict(db.execute(
            select(Answer.campaign_id, func.count()).where(Answer.value.is_not(None),
                                                          real_respondent(Answer.respondent))
            .group_by(Answer.campaign_id)).all())
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
            "answers_stored": answers.get(c.id, 0),
            "events_waiting": waiting.get(c.id, 0),
            "sms_segments_per_interview": costs[c.questionnaire_version],
            "target_size": c.target_size,
            "quotas": quota_report(engine, c),
            "airtime": airtime_summary(engine, c),
        } for c in campaigns],
        "events_waiting": store.waiting(),
        # Malformed entries the worker set aside (see workers/persist.py); should stay 0.
        "events_parked": int(store.r.xlen(f"{store.stream}:dead")),
    }


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
