"""RQ jobs the coordinator console starts (the `civicdial` queue): contact import,
invitations and the tally. Each reports progress in its job's meta (`done`, `total`) for
the console's progress bar, and writes its audit entry when it has succeeded."""

from __future__ import annotations

import json
from typing import Any

from rq import Queue, get_current_job
from sqlalchemy.orm import Session

from gateway.config import load_settings
from gateway.coordination.campaigns import audit
from gateway.coordination.contacts import ContactFileError, count_lines, import_contacts
from gateway.coordination.invitations import Audience, InvitationError, invite
from gateway.indicator.tally import run_tally
from gateway.store.crypto import NumberBox
from gateway.store.db import shared_engine
from gateway.store.redis_conn import shared_redis

QUEUE = "civicdial"
KEEP_SECONDS = 7 * 86400  # results (and the rejected-rows report) stay this long


class Progress:
    """Counts work done into the running job's meta, saved at most every chunk."""

    def __init__(self, total: int) -> None:
        self.job = get_current_job()
        self.done = 0
        if self.job is not None:
            self.job.meta.update(done=0, total=total)
            self.job.save_meta()

    def __call__(self, n: int) -> None:
        self.done += n
        if self.job is not None:
            self.job.meta["done"] = min(self.done, self.job.meta.get("total") or self.done)
            self.job.save_meta()

    def finish(self) -> None:
        if self.job is not None:
            self.job.meta["done"] = self.job.meta.get("total", 0)
            self.job.save_meta()


def import_job(campaign_id: int, slug: str, data: bytes, actor: str) -> dict[str, Any]:
    """Import a contact CSV into a campaign; returns the counts and every rejected row."""
    settings = load_settings()
    engine = shared_engine(settings)
    progress = Progress(count_lines(data))
    try:
        result = import_contacts(engine, campaign_id, data,
                                 pseudonym_key=settings.pseudonym_key,
                                 box=NumberBox(settings.encryption_key),
                                 default_region=settings.default_region,
                                 progress=progress)
    except ContactFileError as exc:
        return {"error": str(exc)}
    progress.finish()
    with Session(engine) as db, db.begin():
        audit(db, actor, "contacts.import", slug,
              after={"rows": result.rows, "imported": result.imported,
                     "rejected": len(result.rejected)})
    return result.as_dict()


def invite_job(slug: str, audience: dict[str, Any], actor: str, total: int) -> dict[str, Any]:
    """Queue the campaign's invitations for this audience."""
    settings = load_settings()
    engine = shared_engine(settings)
    who = Audience(audience.get("region", ""), audience.get("language", ""),
                   tuple(audience.get("attributes", {}).items()), audience.get("limit"))
    try:
        progress = Progress(total)
        result = invite(engine, shared_redis(settings), slug, progress=progress,
                        prefix=settings.redis_prefix, backlog=settings.outbox_backlog,
                        audience=who)
    except InvitationError as exc:
        return {"error": str(exc)}
    progress.finish()
    with Session(engine) as db, db.begin():
        audit(db, actor, "campaign.invite", slug,
              after={**result.as_dict(), "audience": who.as_dict()})
    return result.as_dict()


def tally_job(campaign_id: int, slug: str, actor: str) -> dict[str, Any]:
    """A new tally snapshot of the campaign (publishing stays a separate decision)."""
    settings = load_settings()
    engine = shared_engine(settings)
    progress = Progress(1)
    snap = run_tally(engine, campaign_id)
    progress.finish()
    with Session(engine) as db, db.begin():
        audit(db, actor, "campaign.tally", slug, after={"snapshot": snap.version})
    weighting = json.loads(snap.result)["weighting"]
    return {"snapshot": snap.version, "n_interviews": snap.n_interviews,
            "n_completed": snap.n_completed, "converged": weighting.get("converged")}


def enqueue(queue: Queue, kind: str, slug: str, func: Any, *args: Any) -> str:
    """Start a console job; its meta names what it is and for which campaign, so the
    console shows only its own jobs."""
    job = queue.enqueue(func, *args, job_timeout=1800, result_ttl=KEEP_SECONDS,
                        failure_ttl=KEEP_SECONDS, meta={"console": kind, "campaign": slug,
                                                        "done": 0, "total": 0})
    return str(job.id)
