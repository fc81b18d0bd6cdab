"""The 16.6.2 tally over SQL: aggregation, a versioned snapshot, and publishing.

The answers table is long (one row per interview and question). One GROUP BY per interview
pivots it to a profile plus the service answers, and a second GROUP BY counts how many
interviews share each combination: only those counts come into Python (no interview id,
no pseudonym), where gateway.indicator.estimates weights and estimates. Both statements are plain
SQLAlchemy Core (CASE inside MAX/SUM), so SQLite and PostgreSQL give the same rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import numpy as np
import redis
from sqlalchemy import Engine, and_, case, func, or_, select, text
from sqlalchemy.orm import Session

from gateway.config import Settings
from gateway.indicator.estimates import (
    AREAS,
    UNKNOWN,
    WG_QUESTIONS,
    Margins,
    Params,
    Patterns,
    Tally,
    choice_name,
    estimate,
    read_margins,
)
from gateway.interview.segments import count_segments
from gateway.store.counting import counted_interviews
from gateway.store.db import upsert_insert
from gateway.store.models import (
    Answer,
    Campaign,
    FeedbackSubscriber,
    Interview,
    OutboundMessage,
    TallySnapshot,
)
from gateway.store.outbox import sweep
from gateway.store.sessions import RESULTS_PUBLISHED, real_respondent

PROFILE = ("sex", "age", "region", "urban", "income")
OUTCOMES = tuple(q for _label, attrs, overall in AREAS.values() for q in (*attrs, overall))
# Answers that say nothing about the respondent's group: they fall in the "unknown" group.
NOT_STATED = frozenset({"refuse", "dk"})
# Interviews that never got to the questions: refused, withdrawn, or turned away by a quota.
NOT_INTERVIEWED = ("declined", "withdrawn", "screened_out", "erased")
RESULTS_KIND = "results"
DEFAULT_PARAMS = Params()


def default_margins() -> Margins:
    """The adult census margins shipped with the package (a copy of ghana_margins.csv)."""
    return read_margins(resources.files("gateway.indicator").joinpath(
        "data/ghana_margins.csv").read_text(encoding="utf-8"))


def campaign_by_slug(engine: Engine, slug: str) -> Campaign | None:
    with Session(engine) as db:
        campaign = db.scalar(select(Campaign).where(Campaign.slug == slug))
        if campaign is not None:
            db.expunge(campaign)
        return campaign


# -- aggregation -----------------------------------------------------------------------
def pattern_query(campaign_id: int) -> Any:
    """Counts of interviews per (profile, disability, completed, service answers)."""
    a = Answer.__table__.c
    i = Interview.__table__.c

    def pick(question: str) -> Any:
        # MAX(...) FILTER (WHERE ...): PostgreSQL and SQLite >= 3.30; a little faster
        # than MAX(CASE ...) on PostgreSQL.
        return func.max(a.value).filter(a.question == question).label(question)

    wg_yes = func.max(case((and_(a.question.in_(WG_QUESTIONS),
                                 a.value.in_(("alot", "cannot"))), 1), else_=0))
    wg_no = func.sum(case((and_(a.question.in_(WG_QUESTIONS),
                                a.value.in_(("none", "some"))), 1), else_=0))
    per_interview = (
        select(*[pick(q) for q in (*PROFILE, *OUTCOMES)],
               wg_yes.label("wg_yes"), wg_no.label("wg_no"),
               func.max(case((i.status == "completed", 1), else_=0)).label("completed"))
        .select_from(Answer.__table__.join(Interview.__table__, i.id == a.interview_id))
        .where(a.campaign_id == campaign_id, a.value.is_not(None),
               i.status.not_in(NOT_INTERVIEWED), real_respondent(a.respondent),
               # One interview per person: a second completion (on another node) is not
               # a second respondent.
               a.interview_id.in_(counted_interviews(campaign_id)),
               # Screening, open text and opt-in answers play no part: skip their rows.
               a.question.in_((*PROFILE, *WG_QUESTIONS, *OUTCOMES)))
        .group_by(a.interview_id)
    ).subquery("per_interview")
    p = per_interview.c
    # Washington Group Short Set: any 'a lot'/'cannot' = disability; all six answered
    # without = none; otherwise not known.
    disability = case((p.wg_yes == 1, "yes"), (p.wg_no == len(WG_QUESTIONS), "no"),
                      else_=None).label("disability")
    columns = [p[q] for q in (*PROFILE, *OUTCOMES)]
    return (select(*columns, disability, p.completed, func.count().label("n"))
            .where(or_(p.age.is_(None), p.age != "u18"))  # adults only
            .group_by(*columns, disability, p.completed))


def fetch_patterns(engine: Engine, campaign_id: int) -> Patterns:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # One pass over the answers: JIT compilation costs more than it saves here,
            # and the per-interview sort should stay in memory rather than spill.
            conn.execute(text("SET LOCAL jit = off"))
            conn.execute(text("SET LOCAL work_mem = '64MB'"))
        rows = conn.execute(pattern_query(campaign_id)).all()
    # A stable order: the same data gives the same arrays (and bootstrap) on any back-end.
    rows.sort(key=lambda r: "\x1f".join(["" if v is None else str(v) for v in r]))
    names = (*PROFILE, *OUTCOMES, "disability", "completed", "n")
    cols = dict(zip(names, (list(c) for c in zip(*rows, strict=True)), strict=True)) if rows \
        else {name: [] for name in names}
    profile = {v: [None if x in NOT_STATED else x for x in cols[v]]
               for v in (*PROFILE, "disability")}
    return Patterns(
        count=np.array(cols["n"], dtype=np.int64),
        completed=np.array([bool(x) for x in cols["completed"]], dtype=bool),
        profile=profile,
        answers={q: cols[q] for q in OUTCOMES},
    )


def questionnaire_versions(engine: Engine, campaign_id: int) -> list[str]:
    with Session(engine) as db:
        # From the interviews (one row each) rather than a scan of every answer.
        return sorted(v for v in db.scalars(select(Interview.questionnaire_version).where(
            Interview.campaign_id == campaign_id,
            Interview.status.not_in(NOT_INTERVIEWED)).distinct()).all() if v)


# -- snapshots -------------------------------------------------------------------------
def _clean(value: Any) -> Any:
    """JSON without NaN/inf (not JSON), floats rounded to what can matter."""
    if isinstance(value, float):
        return round(value, 10) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def compute(engine: Engine, campaign_id: int, margins: Margins,
            params: Params = DEFAULT_PARAMS) -> Tally:
    return estimate(fetch_patterns(engine, campaign_id), margins, params)


def run_tally(engine: Engine, campaign_id: int, margins: Margins | None = None,
              params: Params = DEFAULT_PARAMS) -> TallySnapshot:
    """Tally a campaign and store the result as its next snapshot version."""
    margins = margins or default_margins()
    tally = compute(engine, campaign_id, margins, params)
    versions = questionnaire_versions(engine, campaign_id)
    result = json.dumps(_clean(tally.as_dict()), sort_keys=True)
    with Session(engine) as db, db.begin():
        last = db.scalar(select(func.max(TallySnapshot.version)).where(
            TallySnapshot.campaign_id == campaign_id)) or 0
        snap = TallySnapshot(
            campaign_id=campaign_id, version=last + 1, created_at=datetime.now(UTC),
            questionnaire_versions=",".join(versions), margins_sha256=margins.sha256,
            margins=margins.text, params=json.dumps(params.as_dict(), sort_keys=True),
            n_interviews=tally.n_interviews, n_completed=tally.n_completed, result=result)
        db.add(snap)
        db.flush()
        db.expunge(snap)
    return snap


def reproduce(engine: Engine, snap: TallySnapshot) -> bool:
    """Does tallying the same campaign with the snapshot's margins and parameters give the
    same result now? (False once answers changed since.)"""
    params = Params(**json.loads(snap.params))
    tally = compute(engine, snap.campaign_id, read_margins(snap.margins), params)
    return json.dumps(_clean(tally.as_dict()), sort_keys=True) == snap.result


def latest_snapshot(engine: Engine, campaign_id: int,
                    version: int | None = None) -> TallySnapshot | None:
    with Session(engine) as db:
        stmt = select(TallySnapshot).where(TallySnapshot.campaign_id == campaign_id)
        if version is not None:
            stmt = stmt.where(TallySnapshot.version == version)
        snap = db.scalar(stmt.order_by(TallySnapshot.version.desc()).limit(1))
        if snap is not None:
            db.expunge(snap)
        return snap


class NoSnapshot(LookupError):
    """The snapshot asked for does not exist; the message says what does."""


def snapshot_of(engine: Engine, campaign_id: int, version: int | None = None,
                then: str = "run `civicdial tally` first") -> TallySnapshot:
    """The latest snapshot, or version `version`; NoSnapshot naming the latest there is."""
    snap = latest_snapshot(engine, campaign_id, version)
    if snap is not None:
        return snap
    latest = latest_snapshot(engine, campaign_id) if version is not None else None
    if latest is None:
        raise NoSnapshot(f"no tally snapshot yet: {then}")
    raise NoSnapshot(f"no snapshot v{version}: the latest is v{latest.version}")


def cells_of(snap: TallySnapshot) -> list[dict[str, Any]]:
    return list(json.loads(snap.result)["cells"])


# -- results back to citizens ----------------------------------------------------------
# Twi wording is a DRAFT (machine-assisted, like the form's labels): to be reviewed by a
# native speaker. Written without ɛ/ɔ so a message stays GSM-7 (160 characters, not 70).
_AREA_LABEL = {
    "en": {"health": "Health care", "primary": "Primary school",
           "secondary": "Secondary school", "govt": "ID/civil registration"},
    "tw": {"health": "Ayaresa", "primary": "Praemari sukuu", "secondary": "Sekondiri sukuu",
           "govt": "ID/awoo nkyerewee"},
}
_SATISFIED = {"en": "satisfied", "tw": "ani gye"}
_NATION = "Ghana"
SMS_LIMIT = 160


def _pct(value: float) -> str:
    return f"{round(value * 100):d}%"


def _fits(text: str) -> bool:
    return count_segments(text).segments == 1 and count_segments(text).units <= SMS_LIMIT


def summary_texts(cells: list[dict[str, Any]], region_names: dict[str, str]
                  ) -> dict[str, str]:
    """Redis hash fields "{lang}:{region}" and "{lang}:_national" -> one short SMS, from
    published (not suppressed) 'satisfied overall' cells only."""
    sat = {(c["area"], c["breakdown"], c["group"]): c for c in cells
           if c["measure"] == "satisfied" and c["estimate"] is not None
           and not str(c["status"]).startswith("suppressed")}
    regions = sorted({g for (_a, b, g) in sat if b == "region" and g != UNKNOWN})
    out: dict[str, str] = {}
    for lang in _AREA_LABEL:
        labels, word = _AREA_LABEL[lang], _SATISFIED[lang]
        national = [(area, sat[(area, "total", "_T")]) for area in AREAS
                    if (area, "total", "_T") in sat]
        if national:
            parts = [f"{labels[a]} {_pct(c['estimate'])}" for a, c in national]
            out[f"{lang}:_national"] = _pack(f"{_NATION}, % {word}: ", parts, "; ", ".")
        for region in regions:
            name = region_names.get(region, region.replace("_", " ").title())
            pieces = []
            for area in AREAS:
                cell = sat.get((area, "region", region))
                if cell is None:
                    continue
                whole = sat.get((area, "total", "_T"))
                tail = f" {_NATION}: {_pct(whole['estimate'])}." if whole else ""
                if not pieces:
                    pieces.append(f"{labels[area]}, {name}: {_pct(cell['estimate'])} {word} "
                                  f"(n={cell['n']}).{tail}")
                else:
                    pieces.append(f"{labels[area]}: {_pct(cell['estimate'])} "
                                  f"(n={cell['n']}).{tail}")
            if pieces:
                out[f"{lang}:{region}"] = _pack("", pieces, " ", "")
    return out


def _pack(head: str, parts: list[str], sep: str, end: str) -> str:
    """As many parts as fit one SMS (always the first)."""
    text = head + parts[0]
    for part in parts[1:]:
        if not _fits(text + sep + part + end):
            break
        text += sep + part
    return text + end


def region_names(margins: Margins) -> dict[str, str]:
    return {choice_name(r.category): r.category for r in margins.categories("region")}


@dataclass(frozen=True)
class Published:
    snapshot_id: int
    version: int
    fields: int
    queued: int
    enqueued: int


def _lang_code(lang: str | None) -> str:
    """'Twi (tw)' -> 'tw'; anything else falls back to English."""
    if lang and lang.endswith(")") and "(" in lang:
        code = lang.rsplit("(", 1)[1][:-1]
        if code in _AREA_LABEL:
            return code
    return "en"


def publish(settings: Settings, engine: Engine, client: redis.Redis, campaign_id: int,
            version: int | None = None) -> Published:
    """Mark a snapshot published, write the summaries for RESULTS into Redis, and queue
    the summary SMS to everyone who asked for it (STOP is checked at send time)."""
    snap = snapshot_of(engine, campaign_id, version)
    texts = summary_texts(cells_of(snap), region_names(read_margins(snap.margins)))
    with Session(engine) as db, db.begin():
        row = db.get(TallySnapshot, snap.id)
        assert row is not None
        if row.published_at is None:
            row.published_at = datetime.now(UTC)
    key = f"{settings.redis_prefix}results:{campaign_id}"
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)  # an earlier publication's regions must not linger
    # Written even when every cell is suppressed: RESULTS then says it is published but
    # too few have answered, not that nothing is published.
    pipe.hset(key, mapping={**texts, RESULTS_PUBLISHED: str(snap.version)})
    pipe.execute()
    queued = _queue_results(engine, snap, texts)
    enqueued = sweep(settings, engine, client, older_than=timedelta(0)) if queued else 0
    return Published(snap.id, snap.version, len(texts), queued, enqueued)


def _queue_results(engine: Engine, snap: TallySnapshot, texts: dict[str, str]) -> int:
    """One outbound row per subscriber (idempotent by key), all in one transaction."""
    a = Answer.__table__.c
    region = (select(a.respondent, func.max(a.value).label("region"))
              .where(a.campaign_id == snap.campaign_id, a.question == "region")
              .group_by(a.respondent).subquery())
    lang = (select(Interview.respondent, func.max(Interview.lang).label("lang"))
            .where(Interview.campaign_id == snap.campaign_id)
            .group_by(Interview.respondent).subquery())
    stmt = (select(FeedbackSubscriber, region.c.region, lang.c.lang)
            .outerjoin(region, region.c.respondent == FeedbackSubscriber.respondent)
            .outerjoin(lang, lang.c.respondent == FeedbackSubscriber.respondent)
            .where(FeedbackSubscriber.campaign_id == snap.campaign_id,
                   FeedbackSubscriber.channel_id.is_not(None)))
    now = datetime.now(UTC)
    rows = []
    with Session(engine) as db:
        for sub, reg, lng in db.execute(stmt).all():
            code = _lang_code(lng)
            body = (texts.get(f"{code}:{reg}") or texts.get(f"{code}:_national")
                    or texts.get(f"en:{reg}") or texts.get("en:_national"))
            if not body:
                continue
            rows.append({"key": f"results:{snap.id}:{sub.respondent}",
                         "channel_id": sub.channel_id, "respondent": sub.respondent,
                         "recipient": sub.recipient, "body": body, "kind": RESULTS_KIND,
                         "priority": 1, "segments": count_segments(body).segments,
                         "status": "queued", "attempts": 0, "error": "",
                         "created_at": now, "updated_at": now})
    if not rows:
        return 0
    stmt_ins = upsert_insert(engine, OutboundMessage.__table__).on_conflict_do_nothing(
        index_elements=["key"])
    with engine.begin() as conn:
        conn.execute(stmt_ins, rows)
        # rowcount is not reliable for executemany on every driver: count what is there.
        return int(conn.scalar(select(func.count()).select_from(OutboundMessage.__table__)
                               .where(OutboundMessage.key.like(f"results:{snap.id}:%"))) or 0)
