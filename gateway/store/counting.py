"""Which stored interviews count: one person, one interview per campaign.

A node lets a person complete a campaign once (a second dial hears "already completed").
Across nodes it cannot: someone can finish on an edge while offline and again on central,
or on two edges, and central gets both. The pseudonym is the same on every node (the
edge's bundle carries the key), so central can tell. Counting keeps, per respondent, the
first completion (the earliest completed_at, then the smaller id, the same on every node
and in any order of arrival) and leaves out their other interviews, completed or not.
A respondent with no completion counts by each interview, as before.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, exists, or_, select

from gateway.store.models import Interview


def superseded(interview: Any) -> Any:
    """SQL, for a row of `interview` (the interviews table or an alias of it): true when
    its respondent has an earlier completion in the campaign than this interview's own."""
    other = Interview.__table__.alias("first_completion")
    return exists().where(
        other.c.campaign_id == interview.c.campaign_id,
        other.c.respondent == interview.c.respondent,
        other.c.status == "completed",
        other.c.id != interview.c.id,
        or_(interview.c.status != "completed",
            other.c.completed_at < interview.c.completed_at,
            and_(other.c.completed_at == interview.c.completed_at,
                 other.c.id < interview.c.id)))


def counted_interviews(campaign_id: int) -> Any:
    """SELECT the ids of the campaign's interviews that count."""
    i = Interview.__table__
    return select(i.c.id).where(i.c.campaign_id == campaign_id, ~superseded(i))
