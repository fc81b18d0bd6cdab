"""Central's half of edge sync: take a signed batch of an edge's events and apply it, once;
serve the changes an edge pulls.

A batch is checked before anything is read from it (edge known and not revoked, signature,
a nonce never seen), then applied in one transaction through the persist path's own
upserts (workers.persist.write_events), with a record of every event id and a digest of
its content: an id seen before with the same content is a duplicate (nothing changes), with
other content a conflict (kept aside, never applied). The answer names each event's fate,
the highest sequence number up to which central holds everything, and central's clock.
The HTTP endpoint (gateway/web/sync.py) and `civicdial sync import` both call
receive_batch, so a USB stick goes through exactly the checks a link does.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import json
import logging
import re
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import Connection, Engine, func, select, text, update
from sqlalchemy.orm import Session

from gateway.config import Settings
from gateway.coordination.edges import (
    H_EDGE,
    H_NONCE,
    H_SIGNATURE,
    H_TIMESTAMP,
    edge_secret,
    signature,
    transport_box,
)
from gateway.coordination.quotas import refresh as refresh_quotas
from gateway.indicator.estimates import read_margins
from gateway.indicator.tally import cells_of, region_names, summary_texts
from gateway.store.crypto import NumberBox
from gateway.store.db import in_values, stored_utc, upsert_insert
from gateway.store.models import (
    Campaign,
    CampaignContact,
    Contact,
    EdgeNode,
    Erasure,
    Interview,
    OptOut,
    QuestionnaireVersion,
    SyncChange,
    SyncConflict,
    SyncNonce,
    SyncReceived,
    TallySnapshot,
)
from gateway.store.sessions import SessionStore
from gateway.store.syncbox import INTERVIEW_KINDS, UP_KINDS
from workers.persist import forget, write_events

log = logging.getLogger("civicdial.sync")

BATCHES_PATH = "/api/v1/sync/batches"
CHANGES_PATH = "/api/v1/sync/changes"
MAX_EVENTS = 1000
MAX_BATCH_BYTES = 1024 * 1024  # what the edge sends: at most 1 MiB of JSON, gzipped
MAX_BODY_BYTES = MAX_BATCH_BYTES + 64 * 1024  # gzip of incompressible data grows a little
CHANGES_PAGE = 500
# An edge clock further off than this (central's minus the edge's, measured as the batch
# arrives) is wrong, not late: its events' times are moved by the skew so answers are not
# misdated. Within it, times are kept as the edge wrote them.
CLOCK_TOLERANCE = 300.0
_NONCE = re.compile(r"[0-9a-f]{16,64}")
_MALFORMED = (KeyError, ValueError, TypeError, IndexError, AttributeError)


class SyncRefused(Exception):
    """A request refused as a whole: nothing of it was applied."""

    def __init__(self, status: int, reason: str, *, replay: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.replay = replay


@dataclass(frozen=True)
class BatchResult:
    edge: str
    results: list[dict[str, Any]]
    acked_seq: int
    central_time: float
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"edge": self.edge, "results": self.results, "acked_seq": self.acked_seq,
                "central_time": self.central_time, **self.counts}


def digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def authenticate(db: Session, settings: Settings, headers: Mapping[str, str], method: str,
                 path: str, body: bytes, *, live: bool = True) -> EdgeNode:
    """The edge a request comes from, if it is enrolled, active, signed and not a replay.
    Its clock is not checked: an edge without a time source still syncs; the nonce (kept
    for good) and the sequence numbers are what stop a replay."""
    edge_id = headers.get(H_EDGE, "")
    timestamp, nonce, given = (headers.get(h, "") for h in (H_TIMESTAMP, H_NONCE, H_SIGNATURE))
    if not (edge_id and timestamp and nonce and given):
        raise SyncRefused(401, "unsigned request (edge, timestamp, nonce and signature "
                               "headers are required)")
    # Locked (PostgreSQL) until the transaction ends: one edge's batches are applied one
    # at a time, so a resend racing its original finds its events already received.
    edge = db.get(EdgeNode, edge_id[:32], with_for_update=True)
    if edge is None:
        raise SyncRefused(403, "unknown edge")
    if edge.revoked_at is not None:
        raise SyncRefused(403, f"edge {edge.name} is revoked")
    if not _NONCE.fullmatch(nonce):
        raise SyncRefused(400, "the nonce must be 16 to 64 lowercase hex digits")
    expected = signature(edge_secret(settings, edge), method, path, edge_id, timestamp, nonce,
                         body)
    if not hmac.compare_digest(expected, given.lower()):
        raise SyncRefused(401, f"bad signature from edge {edge.name}")
    if db.get(SyncNonce, (edge.id, nonce)) is not None:
        raise SyncRefused(401, f"replayed nonce from edge {edge.name}", replay=True)
    db.add(SyncNonce(edge_id=edge.id, nonce=nonce))
    try:
        sent = float(timestamp)
    except ValueError:
        raise SyncRefused(400, "the timestamp must be a number of seconds") from None
    if live:
        # Over a link the request is seconds old, so this is the edge's clock error. A
        # file from a USB stick is as old as the trip: the last live measure stands.
        edge.skew_seconds = round(time.time() - sent, 3)
        edge.last_contact_at = datetime.now(UTC)
    return edge


def decode_batch(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise SyncRefused(413, f"batch over {MAX_BODY_BYTES} bytes")
    try:
        inflater = zlib.decompressobj(wbits=31)  # gzip
        raw = inflater.decompress(body, MAX_BATCH_BYTES + 1)
        if len(raw) > MAX_BATCH_BYTES or inflater.unconsumed_tail:
            raise SyncRefused(413, f"batch inflates to over {MAX_BATCH_BYTES} bytes")
        if not inflater.eof:
            raise ValueError("truncated gzip stream")
        payload = json.loads(raw)
    except (zlib.error, ValueError, UnicodeDecodeError) as exc:
        raise SyncRefused(400, f"batch is not gzipped JSON ({exc})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("events"), list):
        raise SyncRefused(400, "batch must be an object with an events list")
    if len(payload["events"]) > MAX_EVENTS:
        raise SyncRefused(413, f"batch over {MAX_EVENTS} events")
    return payload


def receive_batch(engine: Engine, client: redis.Redis | None, settings: Settings,
                  headers: Mapping[str, str], body: bytes, path: str = BATCHES_PATH,
                  *, live: bool = True) -> BatchResult:
    """Check and apply one batch in one transaction; SyncRefused if refused whole.
    live=False for a batch read from a file (`sync import`)."""
    if len(body) > MAX_BODY_BYTES:
        raise SyncRefused(413, f"batch over {MAX_BODY_BYTES} bytes")
    with Session(engine, expire_on_commit=False) as db, db.begin():
        edge = authenticate(db, settings, headers, "POST", path, body, live=live)
        payload = decode_batch(body)
        slug = db.scalar(select(Campaign.slug).where(Campaign.id == edge.campaign_id))
        if payload.get("edge") != edge.id:
            raise SyncRefused(400, "batch names another edge than its signer")
        if payload.get("campaign") != slug:
            raise SyncRefused(403, f"edge {edge.name} is not enrolled in campaign "
                                   f"{payload.get('campaign')!r}")
        try:
            applied = _apply(db.connection(), engine, edge, slug, payload)
        except SyncRefused:
            raise
        except _MALFORMED as exc:
            raise SyncRefused(400, f"malformed event in batch ({exc!r})"[:300]) from None
        result = BatchResult(edge.id, applied.results, edge.acked_seq, time.time(),
                             applied.counts)
    # After the commit, as the persist path does: the hop reads opt-outs and full quota
    # cells from Redis.
    if client is not None:
        store = SessionStore(client, settings.redis_prefix)
        if applied.optouts:
            with client.pipeline(transaction=False) as pipe:
                for respondent in applied.optouts:
                    pipe.set(store.optout_key(respondent), "1")
                pipe.execute()
        if applied.erased:
            forget(engine, client, settings.redis_prefix, applied.erased)
        if applied.completed:
            refresh_quotas(engine, client, settings.redis_prefix, applied.completed)
    return result


@dataclass
class _Applied:
    results: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    optouts: list[str] = field(default_factory=list)
    erased: list[str] = field(default_factory=list)
    completed: set[int] = field(default_factory=set)


def _before_erasure(body: Mapping[str, Any], tombstones: Mapping[str, float],
                    shift: float) -> bool:
    erased_at = tombstones.get(str(body.get("r")))
    when = body.get("t")
    if erased_at is None:
        return False
    # An event without a usable time cannot show it came after: refused.
    return not isinstance(when, int | float) or when + shift <= erased_at


def _apply(conn: Connection, engine: Engine, edge: EdgeNode, slug: str,
           payload: dict[str, Any]) -> _Applied:
    items = payload["events"]
    prefix = f"{edge.id}/"
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("seq"), int)
                and item["seq"] > 0 and isinstance(item.get("id"), str)
                and item["id"].startswith(prefix) and len(item["id"]) <= 200
                and isinstance(item.get("e"), dict)
                and item["id"] == prefix + str(item["e"].get("id"))):
            raise SyncRefused(400, "each event needs seq (> 0), id (<edge>/<event id>) and e")
        if item["e"].get("k") in INTERVIEW_KINDS and item["e"].get("cs") != slug:
            raise SyncRefused(403, f"edge {edge.name} is not enrolled in campaign "
                                   f"{item['e'].get('cs')!r}")
    known: dict[str, str] = dict(conn.execute(
        select(SyncReceived.event_id, SyncReceived.digest)
        .where(in_values(engine, SyncReceived.event_id, [item["id"] for item in items]))).all())
    interviews = {str(item["e"].get("i")) for item in items
                  if item["e"].get("k") in INTERVIEW_KINDS}
    erased = set(conn.scalars(select(Interview.id).where(
        in_values(engine, Interview.id, interviews), Interview.status == "withdrawn")))
    respondents = {item["e"]["r"] for item in items if isinstance(item["e"].get("r"), str)}
    tombstones = {r: stored_utc(at).timestamp() for r, at in conn.execute(
        select(Erasure.respondent, Erasure.at)
        .where(in_values(engine, Erasure.respondent, respondents)))}
    out = _Applied(counts={"accepted": 0, "duplicate": 0, "conflict": 0, "rejected": 0})
    anonymous: set[str] = set()
    skew = edge.skew_seconds or 0.0
    shift = skew if abs(skew) > CLOCK_TOLERANCE else 0.0
    received: list[dict[str, Any]] = []
    conflicts: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    now = datetime.now(UTC)
    for item in items:
        body, gid, seq = item["e"], item["id"], item["seq"]
        fingerprint = digest(body)
        kind = body.get("k")
        if gid in known:
            result = "duplicate" if known[gid] == fingerprint else "conflict"
            if result == "conflict":
                conflicts.append({"edge_id": edge.id, "event_id": gid, "seq": seq,
                                  "digest": fingerprint, "content": json.dumps(body),
                                  "at": now})
        elif kind not in UP_KINDS:
            result = "rejected"  # a kind central does not take from edges
        elif kind in INTERVIEW_KINDS and body.get("i") in erased and kind != "withdrawn":
            result = "rejected"  # the interview was erased: nothing of it comes back
        elif kind == "answer" and _before_erasure(body, tombstones, shift):
            result = "rejected"  # its respondent asked to be erased after saying it
        else:
            result = "accepted"
            if kind in INTERVIEW_KINDS and _before_erasure(body, tombstones, shift):
                # Its respondent asked to be erased after it began: what it said is not
                # taken, but that it happened is, unlinked, as on the node that erased it
                # (an 'erased' interview, counted where the erased are).
                body = {**body, "r": None}
                anonymous.add(str(body.get("i")))
            if kind == "sms_counts":
                if seq > edge.sms_counts_seq:
                    edge.sms_counts = json.dumps(dict(body["counts"]))
                    edge.sms_counts_seq = seq
            else:
                event = {k: v for k, v in body.items() if k != "cs"}
                if shift and isinstance(event.get("t"), int | float):
                    event["t"] = event["t"] + shift
                if kind in INTERVIEW_KINDS:
                    event["c"] = edge.campaign_id
                    if kind == "withdrawn":
                        erased.add(str(body["i"]))
                    if kind == "completed":
                        out.completed.add(edge.campaign_id)
                if kind == "optout":
                    out.optouts.append(str(body["r"]))
                if kind == "erased":
                    out.erased.append(str(body["r"]))
                event["ch"] = None
                events.append(event)
        if gid not in known:
            known[gid] = fingerprint
            received.append({"event_id": gid, "edge_id": edge.id, "seq": seq,
                             "digest": fingerprint, "result": result, "received_at": now})
        out.counts[result] += 1
        out.results.append({"seq": seq, "id": gid, "result": result})
    if events:
        write_events(engine, events, conn=conn)
    if anonymous:
        conn.execute(update(Interview).where(Interview.id.in_(sorted(anonymous)))
                     .values(respondent=None, status="erased"))
    if received and engine.dialect.name == "postgresql":
        conn.execute(_PG_RECEIVED, {"rows": json.dumps(received, default=datetime.isoformat)})
    elif received:
        conn.execute(upsert_insert(engine, SyncReceived.__table__).on_conflict_do_nothing(
            index_elements=["event_id"]), received)
    if conflicts:
        conn.execute(upsert_insert(engine, SyncConflict.__table__).on_conflict_do_nothing(
            index_elements=["event_id", "digest"]), conflicts)
        log.warning("edge %s: %d conflicting events quarantined", edge.name, len(conflicts))
    edge.events_received += len(received)
    edge.edge_seq = max(edge.edge_seq, int(payload.get("last_seq") or 0),
                        max((item["seq"] for item in items), default=0))
    edge.acked_seq = _contiguous(conn, edge)
    return out


# One statement for a whole batch on PostgreSQL: the rows travel as one JSON text, which
# costs the driver one parameter instead of six arrays of a thousand quoted strings each.
_PG_RECEIVED = text(
    "INSERT INTO sync_received (event_id, edge_id, seq, digest, result, received_at) "
    "SELECT event_id, edge_id, seq, digest, result, received_at "
    "FROM json_to_recordset(CAST(:rows AS json)) AS r(event_id varchar, edge_id varchar, "
    "seq bigint, digest varchar, result varchar, received_at timestamptz) "
    "ON CONFLICT (event_id) DO NOTHING")


def _contiguous(conn: Connection, edge: EdgeNode) -> int:
    """The highest n such that every sequence number 1..n has been received."""
    acked = edge.acked_seq
    while True:
        seqs = conn.scalars(
            select(SyncReceived.seq).where(SyncReceived.edge_id == edge.id,
                                           SyncReceived.seq > acked)
            .union(select(SyncConflict.seq).where(SyncConflict.edge_id == edge.id,
                                                  SyncConflict.seq > acked))
            .order_by("seq").limit(10_000)).all()
        moved = False
        for seq in seqs:
            if seq == acked + 1:
                acked, moved = seq, True
            elif seq > acked + 1:
                return acked
        if not moved or len(seqs) < 10_000:
            return acked


# -- changes, central -> edge -------------------------------------------------------------


def _campaign_payload(c: Campaign) -> dict[str, Any]:
    return {"slug": c.slug, "name": c.name, "questionnaire_version": c.questionnaire_version,
            "state": c.state, "budget_seconds": c.budget_seconds,
            "budget_screens": c.budget_screens, "resume_window": c.resume_window,
            "max_invalid": c.max_invalid, "sms_keyword": c.sms_keyword,
            "sms_handover": c.sms_handover, "sms_idle_seconds": c.sms_idle_seconds,
            "target_size": c.target_size,
            "opens_at": c.opens_at.isoformat() if c.opens_at else None,
            "closes_at": c.closes_at.isoformat() if c.closes_at else None,
            "languages": c.languages, "quotas": c.quotas, "reminder_hours": c.reminder_hours,
            "reminder_max": c.reminder_max}


def record_changes(engine: Engine) -> None:
    """Bring the change feed up to date with central's tables: a state not logged yet
    (a new questionnaire, a campaign's new settings, a contact, an opt-out, a newly
    published summary) gets the next cursor. Done when an edge asks, so no other code
    path has to remember to log what it changes."""
    rows: list[dict[str, Any]] = []
    now = datetime.now(UTC)

    def add(kind: str, key: str, payload: dict[str, Any], campaign: int | None = None,
            region: str = "", after: int = 0) -> None:
        # States that can come back (a campaign paused, then opened again) are logged
        # again: their digest includes the change they follow.
        mark = digest(payload) if not after else digest({"after": after, "state": payload})
        rows.append({"kind": kind, "key": key, "digest": mark,
                     "campaign_id": campaign, "region": region.casefold(),
                     "payload": json.dumps(payload), "at": now})

    def changed(kind: str, key: str, payload: dict[str, Any]) -> tuple[bool, int]:
        last = latest.get((kind, key))
        if last is None:
            return True, 0
        return json.loads(last[1]) != payload, last[0]

    with engine.begin() as conn:
        logged = {(k, key) for k, key in conn.execute(
            select(SyncChange.kind, SyncChange.key)
            .where(SyncChange.kind.in_(("questionnaire", "optout", "contact"))))}
        newest = (select(func.max(SyncChange.id)).where(SyncChange.kind.in_(
            ("campaign", "results", "erasure"))).group_by(SyncChange.kind, SyncChange.key))
        latest = {(k, key): (row_id, payload) for row_id, k, key, payload in conn.execute(
            select(SyncChange.id, SyncChange.kind, SyncChange.key, SyncChange.payload)
            .where(SyncChange.id.in_(newest)))}
        for q in conn.execute(select(QuestionnaireVersion)).all():
            if ("questionnaire", q.version) not in logged:
                add("questionnaire", q.version, {
                    "version": q.version, "form_id": q.form_id, "title": q.title,
                    "form_version": q.form_version, "filename": q.filename,
                    "languages": q.languages, "question_count": q.question_count,
                    "source": base64.b64encode(q.source).decode()})
        for c in conn.execute(select(Campaign)).all():
            payload = _campaign_payload(c)
            new, after = changed("campaign", c.slug, payload)
            if new:
                add("campaign", c.slug, payload, c.id, after=after)
        for respondent, at in conn.execute(select(OptOut.respondent, OptOut.at)).all():
            if ("optout", respondent) not in logged:
                add("optout", respondent, {"respondent": respondent,
                                           "at": at.isoformat() if at else None})
        # An erasure is logged again if the same person is erased again (they took part
        # anew after the first): its payload carries the time.
        for respondent, at in conn.execute(select(Erasure.respondent, Erasure.at)).all():
            payload = {"respondent": respondent, "at": stored_utc(at).isoformat()}
            new, after = changed("erasure", respondent, payload)
            if new:
                add("erasure", respondent, payload, after=after)
        for contact_id, campaign_id, region, respondent, language, attributes in conn.execute(
                select(Contact.id, CampaignContact.campaign_id, Contact.region,
                       Contact.respondent, Contact.language, Contact.attributes)
                .join(CampaignContact, CampaignContact.contact_id == Contact.id)).all():
            key = f"{campaign_id}:{contact_id}"
            if ("contact", key) not in logged:
                add("contact", key, {"contact_id": contact_id, "respondent": respondent,
                                     "language": language, "region": region,
                                     "attributes": attributes}, campaign_id, region or "")
        published = conn.execute(
            select(TallySnapshot).where(TallySnapshot.published_at.is_not(None))
            .order_by(TallySnapshot.campaign_id, TallySnapshot.version)).all()
        latest = {s.campaign_id: s for s in published}
        for campaign_id, snap in latest.items():
            texts = summary_texts(cells_of(snap), region_names(read_margins(snap.margins)))
            payload = {"snapshot": snap.version, "texts": texts}
            new, after = changed("results", str(campaign_id), payload)
            if new:
                add("results", str(campaign_id), payload, campaign_id, after=after)
        if rows:
            conn.execute(upsert_insert(engine, SyncChange.__table__).on_conflict_do_nothing(
                index_elements=["kind", "key", "digest"]), rows)


def changes_since(engine: Engine, settings: Settings, edge: EdgeNode, since: int,
                  limit: int = CHANGES_PAGE) -> dict[str, Any]:
    """One page of the feed for an edge: what concerns its campaign (and region), from
    the cursor on. Contacts' numbers travel sealed with the edge's transport key."""
    record_changes(engine)
    mine = (SyncChange.campaign_id.is_(None)) | (SyncChange.campaign_id == edge.campaign_id)
    query = select(SyncChange).where(SyncChange.id > since, mine)
    if edge.region:
        query = query.where((SyncChange.kind != "contact")
                            | (SyncChange.region == edge.region.casefold()))
    with Session(engine) as db:
        rows = db.scalars(query.order_by(SyncChange.id).limit(limit)).all()
        last = db.scalar(select(func.coalesce(func.max(SyncChange.id), 0))) or 0
        contact_ids = [json.loads(r.payload)["contact_id"] for r in rows if r.kind == "contact"]
        numbers = dict(db.execute(select(Contact.id, Contact.recipient)
                                  .where(Contact.id.in_(contact_ids))).all()) if contact_ids else {}
        secret = edge_secret(settings, edge)
    central, transport = NumberBox(settings.encryption_key), transport_box(secret)
    out = []
    for r in rows:
        payload = json.loads(r.payload)
        if r.kind == "contact":
            if payload["contact_id"] not in numbers:
                continue  # erased since it was logged (erase_respondents drops the row too)
            payload["recipient"] = transport.seal(central.open(numbers[payload["contact_id"]]))
        out.append({"cursor": r.id, "kind": r.kind, "key": r.key, "payload": payload})
    more = len(rows) == limit
    cursor = rows[-1].id if more else max(last, since)
    return {"changes": out, "cursor": cursor, "more": more, "central_time": time.time()}


def read_changes(engine: Engine, settings: Settings, headers: Mapping[str, str],
                 path_with_query: str, since: int) -> dict[str, Any]:
    """The GET endpoint's logic: the request is signed like a batch (body empty)."""
    with Session(engine, expire_on_commit=False) as db, db.begin():
        edge = authenticate(db, settings, headers, "GET", path_with_query, b"")
        db.expunge(edge)
    return changes_since(engine, settings, edge, since)


def conflicts_of(engine: Engine, edge_id: str) -> list[dict[str, Any]]:
    with Session(engine) as db:
        return [{"event_id": c.event_id, "seq": c.seq, "at": c.at.isoformat(),
                 "content": json.loads(c.content)}
                for c in db.scalars(select(SyncConflict).where(SyncConflict.edge_id == edge_id)
                                    .order_by(SyncConflict.id))]


def gzip_json(data: Any) -> bytes:
    return gzip.compress(json.dumps(data, separators=(",", ":")).encode(), compresslevel=6)

