"""Quotas per cell of the disaggregation variables (say region × sex).

A campaign's quota names the questions that define a cell and a target per cell. SQL is
the source of truth for the fill: the worker counts completed interviews per cell and
writes the full cells to one Redis key, which the webhook hop reads in the same MGET as
the session state; the engine then thanks and ends a respondent whose last quota answer
puts them in a full cell. Interviews past the quota questions when their cell fills are
allowed to finish, so a cell can end slightly over its target.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis
from sqlalchemy import Engine, and_, func, select
from sqlalchemy.orm import Session

from gateway.interview.engine import cell_key
from gateway.interview.quota import Quota
from gateway.store.counting import superseded
from gateway.store.models import Answer, Campaign, Interview
from gateway.store.sessions import quota_key, real_respondent


def counts(engine: Engine, campaign_id: int, quota: Quota) -> dict[tuple[str, str], int]:
    """(cell key, status) -> interviews, for completed and screened-out interviews."""
    i = Interview.__table__
    joined = i
    values = []
    for n, name in enumerate(quota.on):
        a = Answer.__table__.alias(f"q{n}")
        joined = joined.join(a, and_(a.c.interview_id == i.c.id, a.c.question == name))
        values.append(a.c.value)
    query = (select(*values, i.c.status, func.count()).select_from(joined)
             .where(i.c.campaign_id == campaign_id,
                    i.c.status.in_(("completed", "screened_out")),
                    real_respondent(i.c.respondent), ~superseded(i),
                    *[v.is_not(None) for v in values])
             .group_by(*values, i.c.status))
    with engine.connect() as conn:
        return {(cell_key(row[:-2]), row[-2]): row[-1] for row in conn.execute(query)}


def fill(engine: Engine, campaign_id: int, quota: Quota) -> list[dict[str, Any]]:
    """Each cell with its target, completed interviews and people turned away."""
    seen = counts(engine, campaign_id, quota)
    return [{"cell": quota.cell(key), "target": target,
             "completed": seen.get((key, "completed"), 0),
             "screened_out": seen.get((key, "screened_out"), 0),
             "full": seen.get((key, "completed"), 0) >= target}
            for key, target in sorted(quota.targets.items())]


def report(engine: Engine, campaign: Campaign) -> dict[str, Any] | None:
    """A campaign's quotas and their fill, as the CLI, API and dashboard show them."""
    quota = Quota.decode(campaign.quotas)
    if quota is None:
        return None
    return {"on": list(quota.on), "cells": fill(engine, campaign.id, quota)}


def refresh(engine: Engine, client: redis.Redis, prefix: str,
            campaign_ids: Iterable[int] | None = None) -> dict[int, list[str]]:
    """Recount the campaigns' cells and publish which are full; returns them."""
    with Session(engine) as db:
        query = select(Campaign.id, Campaign.quotas)
        if campaign_ids is not None:
            query = query.where(Campaign.id.in_(list(campaign_ids)))
        rows = db.execute(query).all()
    published: dict[int, list[str]] = {}
    for campaign_id, raw in rows:
        quota = Quota.decode(raw)
        key = quota_key(prefix, campaign_id)
        if quota is None:
            client.delete(key)
            continue
        seen = counts(engine, campaign_id, quota)
        full = sorted(cell for cell, target in quota.targets.items()
                      if seen.get((cell, "completed"), 0) >= target)
        client.set(key, json.dumps(full))
        published[campaign_id] = full
    return published

