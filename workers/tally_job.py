"""RQ job: the 16.6.2 tally of one campaign (enqueue on the `civicdial` queue).

The job stores a new snapshot and returns its summary; it does not publish, which stays a
coordinator's decision (`civicdial publish`).
"""

from __future__ import annotations

import json
from typing import Any

from rq import Queue

from gateway.config import load_settings
from gateway.indicator.estimates import Params, read_margins
from gateway.indicator.tally import run_tally
from gateway.store.db import shared_engine


def tally_job(campaign_id: int, margins_csv: str | None = None,
              params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tally a campaign into a new snapshot; returns its id, version and n."""
    settings = load_settings()
    margins = read_margins(margins_csv) if margins_csv else None
    snap = run_tally(shared_engine(settings), campaign_id, margins, Params(**(params or {})))
    weighting = json.loads(snap.result)["weighting"]
    return {"snapshot_id": snap.id, "version": snap.version,
            "n_interviews": snap.n_interviews, "n_completed": snap.n_completed,
            "converged": weighting.get("converged")}


def enqueue_tally(queue: Queue, campaign_id: int, margins_csv: str | None = None,
                  params: dict[str, Any] | None = None) -> str:
    job = queue.enqueue(tally_job, campaign_id, margins_csv, params, job_timeout=1800,
                        result_ttl=86400)
    return str(job.id)
