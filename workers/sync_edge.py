"""The edge's half of sync: push the outbox to central in signed batches, pull central's
changes, and say honestly how it is going.

Batches hold at most 1,000 events or 1 MiB of JSON, gzipped and signed (HMAC-SHA256 with
the edge's secret over the request, a timestamp and a fresh nonce). Central answers per
event; every event it answered for is marked acknowledged, so a batch whose answer was
lost is simply sent again (with a new nonce) and comes back as duplicates. With no link,
attempts back off exponentially up to 10 minutes. A USB stick carries the same signed
batches (`civicdial sync export` / `sync import`).
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import requests
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from gateway.config import Settings, load_settings
from gateway.coordination.edges import signed_headers, transport_box
from gateway.coordination.quotas import refresh as refresh_quotas
from gateway.store.crypto import NumberBox
from gateway.store.db import shared_engine, stored_iso, stored_utc
from gateway.store.models import (
    Campaign,
    CampaignContact,
    Contact,
    EdgeEnrolment,
    Erasure,
    OptOut,
    OutboundMessage,
    QuestionnaireVersion,
    SyncOutbox,
)
from gateway.store.redis_conn import connect
from gateway.store.sessions import SessionStore
from gateway.store.syncbox import record_outbox, scrub_outbox
from workers.persist import erase_respondents, forget
from workers.sync_central import BATCHES_PATH, CHANGES_PATH, MAX_BATCH_BYTES, MAX_EVENTS

log = logging.getLogger("civicdial.sync")

EXPORT_FORMAT = "civicdial-sync-export/1"
BACKOFF_FIRST = 5.0
BACKOFF_MAX = 600.0  # ten minutes
TIMEOUT = 30.0


class SyncError(Exception):
    """A sync attempt that did not get through (no link, central refused, bad answer)."""


@dataclass(frozen=True)
class Credentials:
    edge_id: str
    secret: str
    campaign: str
    central_url: str


def credentials(settings: Settings, enrol: EdgeEnrolment) -> Credentials:
    return Credentials(enrol.edge_id, NumberBox(settings.encryption_key).open(enrol.secret),
                       enrol.campaign_slug, enrol.central_url.rstrip("/"))


def load_enrolment(engine: Engine) -> EdgeEnrolment | None:
    with Session(engine, expire_on_commit=False) as db:
        return db.get(EdgeEnrolment, 1)


# -- up: the outbox in batches ------------------------------------------------------------


def pending_batches(engine: Engine, max_events: int = MAX_EVENTS,
                    max_bytes: int = MAX_BATCH_BYTES) -> Iterator[list[tuple[int, str, str]]]:
    """Unacknowledged outbox rows, oldest first, cut into batches within the limits."""
    after = 0
    while True:
        with engine.connect() as conn:
            rows = conn.execute(select(SyncOutbox.seq, SyncOutbox.event_id, SyncOutbox.body)
                                .where(SyncOutbox.acked_at.is_(None), SyncOutbox.seq > after)
                                .order_by(SyncOutbox.seq).limit(max_events)).all()
        if not rows:
            return
        batch: list[tuple[int, str, str]] = []
        size = 200  # the envelope
        for seq, event_id, body in rows:
            item = len(body) + len(event_id) + 40
            if batch and size + item > max_bytes:
                break
            batch.append((seq, event_id, body))
            size += item
        after = batch[-1][0]
        yield batch


def encode_batch(creds: Credentials, rows: list[tuple[int, str, str]], last_seq: int,
                 now: float | None = None) -> tuple[dict[str, str], bytes]:
    """The signed request for a batch: headers and the gzipped body."""
    events = ",".join(f'{{"seq":{seq},"id":{json.dumps(event_id)},"e":{body}}}'
                      for seq, event_id, body in rows)
    envelope = (f'{{"edge":{json.dumps(creds.edge_id)},"campaign":{json.dumps(creds.campaign)},'
                f'"last_seq":{last_seq},"sent_at":{time.time() if now is None else now},'
                f'"events":[{events}]}}')
    body = gzip.compress(envelope.encode(), compresslevel=6)
    return signed_headers(creds.edge_id, creds.secret, "POST", BATCHES_PATH, body, now), body


def mark_results(engine: Engine, answer: dict[str, Any], sent_at: float,
                 received_at: float) -> dict[str, int]:
    """Mark what central answered for as acknowledged; record what it holds and the clock
    skew measured (central's time against the middle of our request)."""
    by_result: dict[str, list[int]] = {}
    for item in answer["results"]:
        by_result.setdefault(str(item["result"]), []).append(int(item["seq"]))
    now = datetime.now(UTC)
    skew = float(answer["central_time"]) - (sent_at + received_at) / 2
    with engine.begin() as conn:
        for result, seqs in by_result.items():
            for start in range(0, len(seqs), 500):
                conn.execute(update(SyncOutbox).where(
                    SyncOutbox.seq.in_(seqs[start:start + 500]),
                    SyncOutbox.acked_at.is_(None)).values(acked_at=now, result=result))
        # Rows of people erased (here or elsewhere) are emptied once central has them.
        acked = [seq for seqs in by_result.values() for seq in seqs]
        if acked:
            scrub_outbox(conn, conn.scalars(select(Erasure.respondent)).all(),
                         (min(acked), max(acked)))
        conn.execute(update(EdgeEnrolment).where(EdgeEnrolment.id == 1).values(
            acked_seq=int(answer["acked_seq"]), skew_seconds=round(skew, 3),
            conflicts=EdgeEnrolment.conflicts + len(by_result.get("conflict", [])),
            rejected=EdgeEnrolment.rejected + len(by_result.get("rejected", []))))
    return {result: len(seqs) for result, seqs in by_result.items()}


def _post(http: requests.Session, url: str, headers: dict[str, str], body: bytes,
          timeout: float) -> dict[str, Any]:
    try:
        resp = http.post(url, data=body, timeout=timeout, headers={
            **headers, "Content-Type": "application/json", "Content-Encoding": "gzip"})
    except requests.RequestException as exc:
        raise SyncError(f"central unreachable: {exc.__class__.__name__}: {exc}"[:300]) from None
    return _answer(resp)


def _answer(resp: requests.Response) -> dict[str, Any]:
    if resp.status_code != 200:
        try:
            reason = resp.json().get("error", "")
        except ValueError:
            reason = resp.text[:200]
        raise SyncError(f"central answered {resp.status_code}: {reason}")
    try:
        return dict(resp.json())
    except ValueError:
        raise SyncError("central's answer is not JSON") from None


def record_sms_counts(engine: Engine) -> bool:
    """Queue the edge's outbound SMS outcomes (counts by status, nothing else) for
    central when they changed since last queued."""
    with engine.begin() as conn:
        counts = dict(conn.execute(select(OutboundMessage.status, func.count())
                                   .group_by(OutboundMessage.status)).all())
        last = conn.scalar(select(EdgeEnrolment.sms_counts).where(EdgeEnrolment.id == 1))
        if last is None or json.loads(last or "{}") == counts or not counts:
            return False
        mark = conn.scalar(select(func.coalesce(func.max(SyncOutbox.seq), 0))) or 0
        record_outbox(conn, conn.engine, [{"id": f"sms_counts:{mark + 1}", "k": "sms_counts",
                                           "counts": counts}])
        conn.execute(update(EdgeEnrolment).where(EdgeEnrolment.id == 1)
                     .values(sms_counts=json.dumps(counts)))
        return True


def push(settings: Settings, engine: Engine, http: requests.Session | None = None,
         timeout: float = TIMEOUT, max_batches: int | None = None) -> dict[str, int]:
    """Send every pending batch; raises SyncError at the first that does not get through
    (what was acknowledged before stays acknowledged)."""
    enrol = load_enrolment(engine)
    if enrol is None:
        raise SyncError("this node is not an edge (civicdial edge join BUNDLE)")
    creds = credentials(settings, enrol)
    http = http or requests.Session()
    totals: dict[str, int] = {}
    sent = 0
    for rows in pending_batches(engine):
        last_seq = _last_seq(engine)
        headers, body = encode_batch(creds, rows, last_seq)
        started = time.time()
        answer = _post(http, creds.central_url + BATCHES_PATH, headers, body, timeout)
        for result, n in mark_results(engine, answer, started, time.time()).items():
            totals[result] = totals.get(result, 0) + n
        sent += 1
        if max_batches is not None and sent >= max_batches:
            break
    return totals


def _last_seq(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.coalesce(func.max(SyncOutbox.seq), 0))) or 0


# -- down: central's changes --------------------------------------------------------------


def pull(settings: Settings, engine: Engine, client: redis.Redis | None,
         http: requests.Session | None = None, timeout: float = TIMEOUT) -> int:
    """Apply central's changes since our cursor; returns how many were applied."""
    enrol = load_enrolment(engine)
    if enrol is None:
        raise SyncError("this node is not an edge (civicdial edge join BUNDLE)")
    creds = credentials(settings, enrol)
    http = http or requests.Session()
    cursor, applied = enrol.cursor, 0
    while True:
        path = f"{CHANGES_PATH}?since={cursor}"
        headers = signed_headers(creds.edge_id, creds.secret, "GET", path, b"")
        try:
            resp = http.get(creds.central_url + path, headers=headers, timeout=timeout)
        except requests.RequestException as exc:
            raise SyncError(f"central unreachable: {exc.__class__.__name__}: {exc}"[:300]
                            ) from None
        feed = _answer(resp)
        applied += apply_changes(settings, engine, client, creds, feed["changes"],
                                 int(feed["cursor"]))
        cursor = int(feed["cursor"])
        if not feed.get("more"):
            return applied


def apply_changes(settings: Settings, engine: Engine, client: redis.Redis | None,
                  creds: Credentials, changes: list[dict[str, Any]], cursor: int) -> int:
    """Central's changes into the edge's SQL (and Redis, which the hop reads), with the
    new cursor in the same transaction: a change is applied once, or again harmlessly."""
    box, transport = NumberBox(settings.encryption_key), transport_box(creds.secret)
    optouts: list[str] = []
    erased: set[str] = set()
    results: dict[str, str] | None = None
    with Session(engine) as db, db.begin():
        for change in changes:
            kind, p = change["kind"], change["payload"]
            if kind == "questionnaire":
                if db.get(QuestionnaireVersion, p["version"]) is None:
                    db.add(QuestionnaireVersion(
                        version=p["version"], form_id=p["form_id"], title=p["title"],
                        form_version=p["form_version"], filename=p["filename"],
                        languages=p["languages"], question_count=p["question_count"],
                        source=base64.b64decode(p["source"])))
                    db.flush()
            elif kind == "campaign" and p["slug"] == creds.campaign:
                campaign = db.scalar(select(Campaign).where(Campaign.slug == p["slug"]))
                if campaign is None:
                    campaign = Campaign(slug=p["slug"])
                    db.add(campaign)
                for name, value in p.items():
                    if name in ("opens_at", "closes_at"):
                        value = datetime.fromisoformat(value) if value else None
                    setattr(campaign, name, value)
                db.flush()
            elif kind == "contact":
                campaign_id = db.scalar(select(Campaign.id).where(
                    Campaign.slug == creds.campaign))
                if campaign_id is None:
                    continue
                contact = db.scalar(select(Contact).where(Contact.respondent == p["respondent"]))
                sealed = box.seal(transport.open(p["recipient"]))
                if contact is None:
                    contact = Contact(respondent=p["respondent"], recipient=sealed)
                    db.add(contact)
                contact.language, contact.region = p["language"], p["region"]
                contact.attributes = p["attributes"]
                db.flush()
                if db.get(CampaignContact, (campaign_id, contact.id)) is None:
                    db.add(CampaignContact(campaign_id=campaign_id, contact_id=contact.id))
            elif kind == "optout":
                # STOP wins: an opt-out from anywhere holds here too.
                if db.get(OptOut, p["respondent"]) is None:
                    at = datetime.fromisoformat(p["at"]) if p.get("at") else datetime.now(UTC)
                    db.add(OptOut(respondent=p["respondent"], at=at))
                optouts.append(p["respondent"])
            elif kind == "results":
                results = dict(p["texts"])
            elif kind == "erasure":
                # Erased elsewhere: nothing of theirs stays here either (what the outbox
                # still holds for central is refused there as erased, then emptied here).
                # In feed order, so a contact imported again after the erasure stays.
                # Only what came before the request: an interview begun since stays.
                # Its own erasure coming back (or one applied already) changes nothing.
                db.flush()
                respondent = str(p["respondent"])
                at = (stored_utc(datetime.fromisoformat(p["at"])) if p.get("at")
                      else datetime.now(UTC))
                here = db.get(Erasure, respondent)
                if here is not None and stored_utc(here.at) >= at:
                    continue
                erase_respondents(db.connection(), {respondent: at})
                erased.add(respondent)
        db.execute(update(EdgeEnrolment).where(EdgeEnrolment.id == 1).values(cursor=cursor))
        campaign_id = db.scalar(select(Campaign.id).where(Campaign.slug == creds.campaign))
    if client is not None:
        store = SessionStore(client, settings.redis_prefix)
        pipe = client.pipeline(transaction=True)
        for respondent in optouts:
            pipe.set(store.optout_key(respondent), "1")
        if results is not None and campaign_id is not None:
            key = f"{settings.redis_prefix}results:{campaign_id}"
            pipe.delete(key)
            if results:
                pipe.hset(key, mapping=results)
        pipe.execute()
        forget(engine, client, settings.redis_prefix, erased)
        if campaign_id is not None:
            refresh_quotas(engine, client, settings.redis_prefix, {campaign_id})
    return len(changes)


# -- the job, its backoff and its report ----------------------------------------------------


def backoff(failures: int) -> float:
    """Seconds to wait after the n-th failure in a row: 5 s, 10 s, 20 s ... at most 600 s."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1))


def sync_once(settings: Settings, engine: Engine, client: redis.Redis | None,
              http: requests.Session | None = None,
              timeout: float = TIMEOUT) -> dict[str, Any]:
    """Pull, then push everything pending; record the outcome (and the next attempt)."""
    started = datetime.now(UTC)
    http = http or requests.Session()
    try:
        pulled = pull(settings, engine, client, http, timeout)
        record_sms_counts(engine)
        pushed = push(settings, engine, http, timeout)
    except SyncError as exc:
        with engine.begin() as conn:
            failures = (conn.scalar(select(EdgeEnrolment.failures)
                                    .where(EdgeEnrolment.id == 1)) or 0) + 1
            conn.execute(update(EdgeEnrolment).where(EdgeEnrolment.id == 1).values(
                last_attempt_at=started, last_error=str(exc), last_error_at=started,
                failures=failures,
                next_attempt_at=started + timedelta(seconds=backoff(failures))))
        log.warning("sync: %s (attempt %d failed; next in %.0f s)", exc, failures,
                    backoff(failures))
        return {"ok": False, "error": str(exc), "failures": failures}
    with engine.begin() as conn:
        conn.execute(update(EdgeEnrolment).where(EdgeEnrolment.id == 1).values(
            last_attempt_at=started, last_success_at=datetime.now(UTC), failures=0,
            next_attempt_at=None))
    return {"ok": True, "pulled": pulled, "pushed": pushed}


def due(engine: Engine, interval: float) -> bool:
    """Whether the pump should start a sync now: enrolled, past any backoff, and either
    something is waiting or `interval` passed since the last attempt (to pull)."""
    enrol = load_enrolment(engine)
    if enrol is None:
        return False
    now = datetime.now(UTC)
    if enrol.next_attempt_at is not None and stored_utc(enrol.next_attempt_at) > now:
        return False
    if enrol.last_attempt_at is None:
        return True
    if (now - stored_utc(enrol.last_attempt_at)).total_seconds() >= interval:
        return True
    with engine.connect() as conn:
        return bool(conn.scalar(select(func.count()).select_from(SyncOutbox)
                                .where(SyncOutbox.acked_at.is_(None))))


def sync_job() -> dict[str, Any]:
    """RQ job, enqueued by the worker's pump on an edge node."""
    settings = load_settings()
    client = connect(settings)
    try:
        return sync_once(settings, shared_engine(settings), client)
    finally:
        client.delete(f"{settings.redis_prefix}sync:queued")


def status(engine: Engine) -> dict[str, Any]:
    """`civicdial sync status`: what waits, what central holds, how the last tries went."""
    enrol = load_enrolment(engine)
    if enrol is None:
        return {"enrolled": False}
    with engine.connect() as conn:
        waiting = conn.scalar(select(func.count()).select_from(SyncOutbox)
                              .where(SyncOutbox.acked_at.is_(None))) or 0
        last_seq = conn.scalar(select(func.coalesce(func.max(SyncOutbox.seq), 0))) or 0
        by_result = dict(conn.execute(select(SyncOutbox.result, func.count())
                                      .where(SyncOutbox.acked_at.is_not(None))
                                      .group_by(SyncOutbox.result)).all())
    return {
        "enrolled": True, "edge": enrol.name, "edge_id": enrol.edge_id,
        "campaign": enrol.campaign_slug, "region": enrol.region,
        "central_url": enrol.central_url, "events_waiting": waiting, "last_seq": last_seq,
        "central_acked_seq": enrol.acked_seq, "acknowledged": by_result,
        "last_success_at": stored_iso(enrol.last_success_at),
        "last_attempt_at": stored_iso(enrol.last_attempt_at),
        "last_error": enrol.last_error or None, "last_error_at": stored_iso(enrol.last_error_at),
        "failures": enrol.failures, "next_attempt_at": stored_iso(enrol.next_attempt_at),
        "skew_seconds": enrol.skew_seconds, "changes_cursor": enrol.cursor,
    }


# -- USB: the same signed batches in a file --------------------------------------------------


def export_pending(settings: Settings, engine: Engine, path: Path) -> dict[str, int]:
    """Write every pending batch, signed, to a file central can import. The events stay
    pending here until central's answer comes back by a link (or they are sent again:
    duplicates change nothing)."""
    enrol = load_enrolment(engine)
    if enrol is None:
        raise SyncError("this node is not an edge (civicdial edge join BUNDLE)")
    creds = credentials(settings, enrol)
    last_seq = _last_seq(engine)
    batches = []
    events = 0
    for rows in pending_batches(engine):
        headers, body = encode_batch(creds, rows, last_seq)
        batches.append({"path": BATCHES_PATH, "headers": headers,
                        "body": base64.b64encode(body).decode()})
        events += len(rows)
    data = {"format": EXPORT_FORMAT, "edge": creds.edge_id, "campaign": creds.campaign,
            "exported_at": time.time(), "batches": batches}
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return {"batches": len(batches), "events": events}


def read_export(path: Path) -> list[tuple[dict[str, str], bytes]]:
    try:
        data = json.loads(path.read_text())
        if data.get("format") != EXPORT_FORMAT:
            raise ValueError("not a CivicDial sync export")
        return [(dict(b["headers"]), base64.b64decode(b["body"])) for b in data["batches"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SyncError(f"{path}: not a CivicDial sync export ({exc})") from None
