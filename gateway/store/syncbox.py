"""The edge's sync outbox: what the persist worker writes to SQL that central needs, in
the persist transaction itself (so an event is in SQL and in the outbox, or in neither).

Each row gets the next per-edge sequence number (the table's key) and a globally unique
id, `<edge id>/<event id>`. The body is the event as central applies it: the campaign by
slug (ids differ between nodes), no channel id and no phone number, sealed or not
(numbers stay on the edge; central has no use for them and should not hold them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, or_, select, update

from gateway.store.models import Campaign, EdgeEnrolment, SyncOutbox, utcnow

# Interview events (answers, status changes including withdrawals, which erase) and opt-outs.
INTERVIEW_KINDS = frozenset({"started", "answer", "completed", "abandoned", "declined",
                             "withdrawn", "screened_out", "part_break"})
UP_KINDS = INTERVIEW_KINDS | {"optout", "erased", "sms_counts"}
_LOCAL_ONLY = ("ch", "to", "sch", "c")

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode


def outbox_body(event: dict[str, Any], slug: str) -> dict[str, Any]:
    body = {k: v for k, v in event.items() if k not in _LOCAL_ONLY}
    if event.get("k") in INTERVIEW_KINDS:
        body["cs"] = slug
    return body


def record_outbox(conn: Connection, engine: Engine, events: Iterable[dict[str, Any]]) -> int:
    """On an enrolled edge, add the batch's events for central to the outbox (a repeated
    batch adds nothing); elsewhere, nothing. Returns the rows added."""
    enrolled = conn.execute(select(EdgeEnrolment.edge_id, EdgeEnrolment.campaign_slug)
                            .where(EdgeEnrolment.id == 1)).first()
    if enrolled is None:
        return 0
    edge_id, slug = enrolled
    campaign = conn.scalar(select(Campaign.id).where(Campaign.slug == slug))
    rows = []
    now = utcnow()
    for e in events:
        kind = e.get("k")
        if kind not in UP_KINDS:
            continue
        if kind in INTERVIEW_KINDS and e.get("c") != campaign:
            continue  # another local campaign (the default one, say): not central's
        rows.append({"event_id": f"{edge_id}/{e['id']}", "body": _encode(outbox_body(e, slug)),
                     "created_at": now})
    if not rows:
        return 0
    # Sequence numbers are dense (central reports the highest *contiguous* one it holds),
    # so they are given here rather than by an autoincrement that a skipped row would
    # leave a gap in. A batch written again finds its rows and adds nothing.
    ids = [row["event_id"] for row in rows]
    seen = set(conn.scalars(select(SyncOutbox.event_id).where(SyncOutbox.event_id.in_(ids))))
    rows = list({row["event_id"]: row for row in rows if row["event_id"] not in seen}.values())
    last = conn.scalar(select(func.coalesce(func.max(SyncOutbox.seq), 0))) or 0
    for n, row in enumerate(rows, start=1):
        row["seq"] = last + n
    if rows:
        conn.execute(insert(SyncOutbox), rows)
    return len(rows)


SCRUBBED = '{"k":"scrubbed"}'


def scrub_outbox(conn: Connection, respondents: Iterable[str],
                 seqs: tuple[int, int] | None = None) -> int:
    """Empty the outbox rows central has acknowledged that hold these (erased)
    respondents' events. Rows still pending keep their content, so a batch sent again
    is the same batch (a changed body would read as a conflict); central refuses them
    as erased, and they are emptied once acknowledged. seqs: only rows first..last."""
    marks = [f'%"r":{json.dumps(r)}%' for r in respondents]
    if not marks:
        return 0
    scrubbed = 0
    for start in range(0, len(marks), 200):
        query = update(SyncOutbox).where(
            SyncOutbox.acked_at.is_not(None), SyncOutbox.body != SCRUBBED,
            or_(*(SyncOutbox.body.like(m) for m in marks[start:start + 200])))
        if seqs is not None:
            query = query.where(SyncOutbox.seq.between(*seqs))
        scrubbed += conn.execute(query.values(body=SCRUBBED)).rowcount
    return scrubbed
