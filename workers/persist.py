"""Drain the event stream into SQL, exactly once.

Each batch is read with a consumer group, written in one SQL transaction with upserts
that are harmless to repeat (answers keyed by interview+question and ordered by the
event's sequence number, interviews by id, notifications by event id), then XACKed and
deleted from the stream. A consumer killed between the read and the ack leaves its
entries pending; the next drain reclaims them with XAUTOCLAIM once they have been idle
for `reclaim_idle_ms`, and the upserts make the second write a no-op.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from sqlalchemy import Connection, Engine, case, delete, func, insert, or_, select, text, update
from sqlalchemy import exc as sa_exc

from gateway.channels.sms import FEEDBACK_QUESTION
from gateway.channels.sms import forget as forget_in_redis
from gateway.coordination.quotas import refresh as refresh_quotas
from gateway.interview.questionnaire import INELIGIBLE
from gateway.store.db import upsert_insert
from gateway.store.models import (
    AirtimePayment,
    Answer,
    AuditEntry,
    CampaignContact,
    Channel,
    Contact,
    Erasure,
    FeedbackSubscriber,
    Interview,
    OptOut,
    OutboundMessage,
    SyncChange,
    UssdPartBreak,
    UssdSessionEnd,
)
from gateway.store.outbox import enqueue_send
from gateway.store.sessions import GROUP, STREAM, is_simulated
from gateway.store.syncbox import record_outbox, scrub_outbox
from workers.airtime import enqueue as enqueue_airtime
from workers.airtime import reserve as reserve_airtime

log = logging.getLogger(__name__)

# Events that change an interview's status; answers do not.
_STATUS = {"started": "started", "completed": "completed", "abandoned": "abandoned",
           "declined": "declined", "withdrawn": "withdrawn", "screened_out": "screened_out"}


def ensure_group(client: redis.Redis, stream: str) -> None:
    try:
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _ts(value: Any) -> datetime:
    return datetime.fromtimestamp(float(value), UTC)


# How far along a message is; a delivery report never moves a message backwards
# (callbacks arrive out of order).
_PROGRESS = {"held": 0, "queued": 0, "sending": 1, "unknown": 1, "sent": 2, "delivered": 3,
             "failed": 3, "rejected": 3, "undelivered": 3, "stopped": 3}


_ANSWER_COLUMNS = ("interview_id", "campaign_id", "respondent", "questionnaire_version",
                   "question", "value", "seq", "event_id", "answered_at")
# One statement per batch, whatever its size: the rows travel as one JSON text (one
# parameter for the driver, where nine arrays of a thousand values each cost more to dump
# than the upsert costs PostgreSQL). Same upsert as the portable path below (newest
# sequence number wins).
_PG_ANSWERS = text(
    "INSERT INTO answers (" + ", ".join(_ANSWER_COLUMNS) + ") "
    "SELECT " + ", ".join(_ANSWER_COLUMNS) + " FROM json_to_recordset(CAST(:rows AS json)) "
    "AS r(interview_id varchar, campaign_id int, respondent varchar, "
    "questionnaire_version varchar, question varchar, value text, seq int, event_id varchar, "
    "answered_at timestamptz) "
    "ON CONFLICT (interview_id, question) DO UPDATE SET value = EXCLUDED.value, "
    "seq = EXCLUDED.seq, event_id = EXCLUDED.event_id, answered_at = EXCLUDED.answered_at "
    "WHERE answers.seq < EXCLUDED.seq"
)


@dataclass
class Written:
    """Work a batch created, to be done once it is committed."""

    sends: list[tuple[int, int]] = field(default_factory=list)  # (message id, priority)
    airtime: list[int] = field(default_factory=list)  # payment ids
    # Campaigns with an interview completed in the batch: their quota fill moved.
    completed: set[int] = field(default_factory=set)

    def __iadd__(self, other: Written) -> Written:
        self.sends += other.sends
        self.airtime += other.airtime
        self.completed |= other.completed
        return self


def write_events(engine: Engine, events: Iterable[dict[str, Any]],
                 conn: Connection | None = None) -> Written:
    """Write a batch of events in one transaction; repeating a batch changes nothing.

    On an edge node the events central needs also go to the sync outbox, in the same
    transaction, so an event is in both or in neither. With conn, the work joins the
    caller's transaction and records nothing for sync: central applying an edge's batch
    (workers/sync_central.py) goes through these same upserts, not a copy of them."""
    events = list(events)
    own_transaction = conn is None
    answers: dict[tuple[str, str], dict[str, Any]] = {}
    sends: dict[str, dict[str, Any]] = {}
    reports: list[dict[str, Any]] = []
    optouts: dict[str, dict[str, Any]] = {}
    # (campaign, respondent) -> the opt-in event, or None for "no" (unsubscribe).
    subscriptions: dict[tuple[int, str], dict[str, Any] | None] = {}
    interviews: dict[str, dict[str, Any]] = {}
    ends: dict[str, dict[str, Any]] = {}
    breaks: dict[tuple[str, int], dict[str, Any]] = {}  # (interview, part) -> its row
    withdrawn: set[str] = set()
    completions: list[dict[str, Any]] = []  # completed interviews owed an airtime thank-you
    completed_campaigns: set[int] = set()
    airtime_reports: list[dict[str, Any]] = []
    erased: dict[str, datetime] = {}  # respondents who asked to be erased, and when
    for e in events:
        kind = e.get("k")
        if kind == "send":
            sends[e["id"]] = {
                "key": e["id"], "channel_id": e["ch"], "respondent": e["r"],
                "recipient": e["to"], "body": e["body"], "kind": e.get("kind", "reply"),
                "priority": e.get("prio", 0), "segments": e.get("seg", 1),
                "status": "queued", "attempts": 0, "error": "",
                "created_at": _ts(e["t"]), "updated_at": _ts(e["t"]),
            }
            continue
        if kind == "dlr":
            reports.append(e)
            continue
        if kind == "optout":
            optouts[e["r"]] = {"respondent": e["r"], "channel_id": e.get("ch"),
                               "at": _ts(e["t"])}
            continue
        if kind == "airtime_status":
            airtime_reports.append(e)
            continue
        if kind == "erased":
            erased[e["r"]] = max(erased.get(e["r"], _ts(e["t"])), _ts(e["t"]))
            continue
        if kind == "ussd_end":
            # The first notification of a session counts, as across batches (DO NOTHING):
            # a provider's later resend of it never replaces what was recorded.
            if e["id"] in ends:
                continue
            ends[e["id"]] = {
                "event_id": e["id"], "channel_id": e["ch"], "session_id": e["s"],
                "respondent": e.get("r"), "status": e.get("st", ""),
                "network_code": e.get("n", ""), "duration_ms": e.get("d"),
                "hops": e.get("h"), "cost": e.get("cost", ""), "error": e.get("err", ""),
                "received_at": _ts(e["t"]),
            }
            continue
        iid = e["i"]
        row = interviews.setdefault(iid, {
            "id": iid, "campaign_id": e["c"], "channel_id": e.get("ch"),
            "respondent": e.get("r"), "questionnaire_version": e.get("ver"),
            "lang": None, "status": "started", "started_at": None, "completed_at": None,
            "last_seq": 0, "reason": None,
        })
        seq = int(e["id"].rsplit("-", 1)[1])
        if kind == "part_break":
            part = int(e.get("part") or 0)
            breaks[(iid, part)] = {"interview_id": iid, "campaign_id": e["c"],
                                   "channel_id": e.get("ch"), "part": part, "seq": seq,
                                   "at": _ts(e["t"])}
        if kind == "answer" and e["q"] == FEEDBACK_QUESTION:
            subscriptions[(e["c"], e["r"])] = e if e.get("v") == "yes" and "to" in e \
                and not is_simulated(e.get("r")) else None
        if kind == "answer":
            key = (iid, e["q"])
            if key not in answers or answers[key]["seq"] < seq:
                answers[key] = {
                    "interview_id": iid, "campaign_id": e["c"], "respondent": e["r"],
                    "questionnaire_version": e["ver"], "question": e["q"], "value": e.get("v"),
                    "seq": seq, "event_id": e["id"], "answered_at": _ts(e["t"]),
                }
        elif kind in _STATUS:
            if kind == "started":
                row["started_at"] = _ts(e["t"])
                row["lang"] = e.get("l")
            if kind == "completed":
                row["completed_at"] = _ts(e["t"])
                completed_campaigns.add(int(e["c"]))
                # Simulator interviews are test data: no airtime thank-you.
                if e.get("to") and e.get("r") and not is_simulated(e["r"]):
                    completions.append({"campaign_id": e["c"], "respondent": e["r"],
                                        "interview_id": iid, "channel_id": e.get("ch"),
                                        "recipient": e["to"], "at": _ts(e["t"])})
            if kind == "screened_out":
                row["reason"] = e.get("why") or "quota"  # before 'why': quotas only
            if kind == "withdrawn" or (kind == "screened_out" and e.get("why") == INELIGIBLE):
                # Someone outside the population (under 18) leaves only a count, as a
                # withdrawal does: their answers so far are erased.
                withdrawn.add(iid)
            if seq > row["last_seq"]:
                row["status"], row["last_seq"] = _STATUS[kind], seq
    with _transaction(engine, conn) as conn:
        if own_transaction:
            record_outbox(conn, engine, events)
        if interviews:
            stmt = upsert_insert(engine, Interview.__table__)
            excluded = stmt.excluded
            t = Interview.__table__.c
            newer = excluded.last_seq > t.last_seq
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["id"],
                set_={
                    "started_at": func.coalesce(t.started_at, excluded.started_at),
                    "lang": func.coalesce(t.lang, excluded.lang),
                    "completed_at": func.coalesce(t.completed_at, excluded.completed_at),
                    "respondent": func.coalesce(t.respondent, excluded.respondent),
                    "reason": func.coalesce(excluded.reason, t.reason),
                    "status": case((newer, excluded.status), else_=t.status),
                    "last_seq": case((newer, excluded.last_seq), else_=t.last_seq),
                },
            ), list(interviews.values()))
        if answers and engine.dialect.name == "postgresql":
            conn.execute(_PG_ANSWERS, {"rows": json.dumps(list(answers.values()),
                                                          default=datetime.isoformat)})
        elif answers:
            stmt = upsert_insert(engine, Answer.__table__)
            excluded = stmt.excluded
            t = Answer.__table__.c
            conn.execute(stmt.on_conflict_do_update(
                index_elements=["interview_id", "question"],
                set_={"value": excluded.value, "seq": excluded.seq,
                      "event_id": excluded.event_id, "answered_at": excluded.answered_at},
                where=t.seq < excluded.seq,
            ), list(answers.values()))
        if subscriptions:
            by_campaign: dict[int, list[str]] = {}
            for campaign, respondent in subscriptions:
                by_campaign.setdefault(campaign, []).append(respondent)
            for campaign, respondents in by_campaign.items():
                conn.execute(delete(FeedbackSubscriber).where(
                    FeedbackSubscriber.campaign_id == campaign,
                    FeedbackSubscriber.respondent.in_(respondents)))
            opted_in = [{"campaign_id": c, "respondent": r, "channel_id": e.get("sch"),
                         "recipient": e["to"], "created_at": _ts(e["t"])}
                        for (c, r), e in subscriptions.items() if e is not None]
            if opted_in:
                conn.execute(insert(FeedbackSubscriber), opted_in)
        if withdrawn:
            # Withdrawing consent erases what was said, and any request for results.
            conn.execute(delete(FeedbackSubscriber).where(
                FeedbackSubscriber.respondent.in_(
                    select(Interview.respondent).where(Interview.id.in_(withdrawn)))))
            conn.execute(delete(Answer).where(Answer.interview_id.in_(withdrawn)))
            conn.execute(update(Interview).where(Interview.id.in_(withdrawn))
                         .values(respondent=None))
        if ends:
            stmt = upsert_insert(engine, UssdSessionEnd.__table__)
            conn.execute(stmt.on_conflict_do_nothing(index_elements=["event_id"]),
                         list(ends.values()))
        if breaks:
            stmt = upsert_insert(engine, UssdPartBreak.__table__)
            conn.execute(stmt.on_conflict_do_nothing(index_elements=["interview_id", "part"]),
                         list(breaks.values()))
        if optouts:
            stmt = upsert_insert(engine, OptOut.__table__)
            conn.execute(stmt.on_conflict_do_nothing(index_elements=["respondent"]),
                         list(optouts.values()))
        if erased:
            # After this batch's answers and before its sends: the confirmation queued in
            # the same batch must still go out.
            erase_respondents(conn, erased)
        created = Written(completed=completed_campaigns)
        if completions:
            created.airtime = reserve_airtime(conn, engine, completions)
        for report in airtime_reports:
            # Forward only: a late or repeated callback never undoes a final status.
            conn.execute(update(AirtimePayment).where(
                AirtimePayment.request_id == report["rid"],
                AirtimePayment.status.in_(("sending", "sent", "unknown")),
            ).values(status=report["st"], error=report.get("err") or "",
                     updated_at=datetime.now(UTC)))
        if sends:
            stmt = upsert_insert(engine, OutboundMessage.__table__).on_conflict_do_nothing(
                index_elements=["key"]).returning(OutboundMessage.id,
                                                  OutboundMessage.priority)
            for row in conn.execute(stmt, list(sends.values())):
                created.sends.append((row[0], row[1]))
        for report in reports:
            behind = [s for s, rank in _PROGRESS.items() if rank < _PROGRESS[report["st"]]]
            conn.execute(update(OutboundMessage).where(
                OutboundMessage.channel_id == report["ch"],
                OutboundMessage.provider_id == report["pid"],
                OutboundMessage.status.in_(behind),
            ).values(status=report["st"], error=report.get("err") or "",
                     updated_at=datetime.now(UTC)))
    return created


# Outbound rows a worker may be sending right now: left for it to finish.
_IN_FLIGHT = ("sending", "unknown")


def erase_on_request(engine: Engine, client: redis.Redis | None, prefix: str,
                     respondent: str, actor: str) -> dict[str, int]:
    """An erasure a coordinator makes for a citizen who asked by letter or by phone: the
    same as the citizen's DELETE (SQL, Redis, the tombstone), and on an edge it also goes
    to central in the same transaction, as the persist worker's own erasures do."""
    event = {"id": f"erased:{actor}:{secrets.token_hex(8)}", "k": "erased",
             "r": respondent, "t": datetime.now(UTC).timestamp()}
    with engine.begin() as conn:
        held = {
            "interviews": conn.scalar(select(func.count()).select_from(Interview)
                                      .where(Interview.respondent == respondent)) or 0,
            "answers": conn.scalar(select(func.count()).select_from(Answer)
                                   .where(Answer.respondent == respondent)) or 0,
            "contacts": conn.scalar(select(func.count()).select_from(Contact)
                                    .where(Contact.respondent == respondent)) or 0,
        }
        record_outbox(conn, engine, [event])
        erase_respondents(conn, {respondent: _ts(event["t"])}, actor=actor)
    if client is not None:
        forget(engine, client, prefix, [respondent])
    return held


def erase_respondents(conn: Connection, asked: Mapping[str, datetime],
                      actor: str = "citizen") -> None:
    """Erase what SQL holds of these respondents from before they asked (`asked`: when),
    in every campaign: answers, the link from their interviews (kept as anonymous counts
    with status 'erased', which tallies and exports leave out), results subscription,
    contact rows, and the numbers and bodies of messages to them. An interview begun
    after the request is theirs to keep: an erasure that reaches a node later (by sync,
    after a lost link) or again (its own, coming back from central) takes only what came
    before it. The audit log records that it happened, with counts and no identity.
    Published snapshots are not rewritten."""
    now = datetime.now(UTC)
    answers = interviews = contacts = 0
    for respondent, at in sorted(asked.items()):
        before = select(Interview.id).where(
            Interview.respondent == respondent,
            or_(Interview.started_at.is_(None), Interview.started_at <= at))
        ids = list(conn.scalars(before))
        answers += conn.execute(delete(Answer).where(
            Answer.respondent == respondent,
            or_(Answer.answered_at <= at, Answer.interview_id.in_(ids)))).rowcount
        interviews += conn.execute(update(Interview).where(Interview.id.in_(ids))
                                   .values(respondent=None, status="erased")).rowcount
        conn.execute(delete(FeedbackSubscriber).where(
            FeedbackSubscriber.respondent == respondent, FeedbackSubscriber.created_at <= at))
        contacts += _erase_contacts(conn, respondent)
        conn.execute(update(OutboundMessage).where(
            OutboundMessage.respondent == respondent, OutboundMessage.created_at <= at,
            OutboundMessage.status.in_(("queued", "held")))
            .values(status="stopped", error="erased on request", updated_at=now))
        conn.execute(update(OutboundMessage).where(
            OutboundMessage.respondent == respondent, OutboundMessage.created_at <= at,
            OutboundMessage.status.not_in(_IN_FLIGHT))
            .values(recipient="", body="", updated_at=now))
        conn.execute(update(AirtimePayment).where(
            AirtimePayment.respondent == respondent,
            AirtimePayment.status.in_(("success", "failed", "skipped")))
            .values(recipient=""))
        conn.execute(update(UssdSessionEnd).where(UssdSessionEnd.respondent == respondent,
                                                  UssdSessionEnd.received_at <= at)
                     .values(respondent=None))
    who = sorted(asked)
    # The tombstone, at the latest request: every node learns of the erasure from it
    # (central's change feed), and answers from before it that arrive later are refused
    # (workers/sync_central.py).
    stmt = upsert_insert(conn.engine, Erasure.__table__)
    table = Erasure.__table__.c
    conn.execute(stmt.on_conflict_do_update(
        index_elements=["respondent"],
        set_={"at": case((stmt.excluded.at > table.at, stmt.excluded.at), else_=table.at)}),
        [{"respondent": r, "at": asked[r]} for r in who])
    scrub_outbox(conn, who)
    conn.execute(insert(AuditEntry).values(
        at=now, actor=actor, action="respondent.erase", target="respondent",
        before="", after=json.dumps({"respondents": len(who), "interviews": interviews,
                                     "answers": answers, "contacts": contacts})))
    log.info("erased %d respondent(s) on request: %d interviews, %d answers",
             len(who), interviews, answers)


def _erase_contacts(conn: Connection, respondent: str) -> int:
    contact_ids = select(Contact.id).where(Contact.respondent == respondent)
    # Central's change feed keeps no copy of an erased contact for edges still to pull it.
    logged = [f"{campaign}:{contact}" for campaign, contact in conn.execute(
        select(CampaignContact.campaign_id, CampaignContact.contact_id)
        .where(CampaignContact.contact_id.in_(contact_ids)))]
    for start in range(0, len(logged), 500):
        conn.execute(delete(SyncChange).where(SyncChange.kind == "contact",
                                              SyncChange.key.in_(logged[start:start + 500])))
    conn.execute(delete(CampaignContact).where(CampaignContact.contact_id.in_(contact_ids)))
    return int(conn.execute(delete(Contact).where(Contact.respondent == respondent)).rowcount)


def forget(engine: Engine, client: redis.Redis, prefix: str, respondents: Iterable[str]) -> None:
    """The Redis half of an erasure that came from another node (by sync) or from a
    coordinator (the webhook does this itself for a DELETE it confirmed). The opt-out flag
    stays."""
    who = list(respondents)
    if not who:
        return
    with engine.connect() as conn:
        channels = [(ch, campaign) for ch, campaign in
                    conn.execute(select(Channel.id, Channel.campaign_id)).all()]
    forget_in_redis(client, prefix, channels, who)


@contextmanager
def _transaction(engine: Engine, conn: Connection | None) -> Iterator[Connection]:
    if conn is not None:
        yield conn
        return
    with engine.begin() as own:
        yield own


def drain(client: redis.Redis, engine: Engine, stream: str, *, batch: int = 2000,
          reclaim_idle_ms: int = 60_000, consumer: str | None = None,
          max_batches: int | None = None) -> int:
    """Persist stream entries until none are waiting; returns how many were persisted."""
    ensure_group(client, stream)
    consumer = consumer or consumer_name()
    total = 0
    batches = 0
    # A failed write leaves the drain, so this consumer's own unacknowledged entries can
    # only be there when a drain starts: read them until none are left, then never again.
    own = True
    while max_batches is None or batches < max_batches:
        entries = _own_pending(client, stream, consumer, batch) if own else []
        own = bool(entries)
        if not entries:
            entries = _reclaim(client, stream, consumer, reclaim_idle_ms, batch)
        if not entries:
            reply = client.xreadgroup(GROUP, consumer, {stream: ">"}, count=batch)
            entries = reply[0][1] if reply else []
        if not entries:
            break
        ids = [entry_id for entry_id, _ in entries]
        created = _write_batch(client, engine, stream, entries)
        if created.completed:  # before the ack: a crash here only repeats a recount
            refresh_quotas(engine, client, stream.removesuffix(STREAM), created.completed)
        # Enqueued before the ack: if we die in between, the batch is rewritten (no new
        # rows, so nothing enqueued twice) and the sweeper finds any row left unqueued.
        for payment_id in created.airtime:
            enqueue_airtime(client, payment_id)
        for message_id, priority in created.sends:
            # The stream is "<prefix>events": its keys and the queue markers share a prefix.
            enqueue_send(client, message_id, priority, prefix=stream.removesuffix(STREAM))
        pipe = client.pipeline(transaction=True)
        pipe.xack(stream, GROUP, *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()
        total += len(ids)
        batches += 1
        log.info("persisted %d events (%d this drain)", len(ids), total)
    return total


# Errors that say the database (or Redis), not the entry, is in trouble: the batch is
# retried as it is, never split and parked.
_TRANSIENT = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError,
              sa_exc.TimeoutError, redis.RedisError)


def _write_batch(client: redis.Redis, engine: Engine, stream: str,
                 entries: list[tuple[bytes, dict[bytes, bytes]]]) -> Written:
    """Write a batch; if it fails, split it in halves until each entry the worker cannot
    write (whatever the exception: malformed, out of range for a column, a bug) is alone,
    park it in `<stream>:dead` with the error and write the rest, so one poison entry
    cannot stall every batch after it. Errors of the database itself (connection lost,
    lock timeout) are not caught: the batch is retried."""
    try:
        return write_events(engine, [json.loads(fields[b"e"]) for _, fields in entries])
    except _TRANSIENT:
        raise
    except Exception as exc:
        if not _database_answers(engine):
            raise
        if len(entries) == 1:
            entry_id, fields = entries[0]
            client.xadd(f"{stream}:dead", {"id": entry_id, "e": fields.get(b"e", b""),
                                           "error": repr(exc)[:500]})
            log.error("parked a stream entry the worker cannot write, %s: %r", entry_id,
                      exc)
            return Written()
        log.warning("a batch of %d entries cannot be written (%s); splitting it to find "
                    "the entries at fault", len(entries), type(exc).__name__)
    half = len(entries) // 2
    created = _write_batch(client, engine, stream, entries[:half])
    created += _write_batch(client, engine, stream, entries[half:])
    return created


def _database_answers(engine: Engine) -> bool:
    """Whether the database takes a trivial query: if it does not, a failed write is its
    fault, not the entry's, and nothing may be parked."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except sa_exc.SQLAlchemyError:
        return False


def _own_pending(client: redis.Redis, stream: str, consumer: str,
                 batch: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Entries this consumer read and did not acknowledge: a batch the database refused
    (down, a lock timeout) is written again at the next drain, not when it has been idle
    long enough to be reclaimed as a dead worker's."""
    reply = client.xreadgroup(GROUP, consumer, {stream: "0"}, count=batch)
    return _present(client, stream, reply[0][1] if reply else [])


def _reclaim(client: redis.Redis, stream: str, consumer: str, idle_ms: int,
             batch: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Take over entries another consumer read but never acknowledged."""
    reply = client.xautoclaim(stream, GROUP, consumer, min_idle_time=idle_ms,
                              start_id="0-0", count=batch)
    return _present(client, stream, reply[1])


def _present(client: redis.Redis, stream: str,
             claimed: list[tuple[bytes, dict[bytes, bytes] | None]]
             ) -> list[tuple[bytes, dict[bytes, bytes]]]:
    # An entry deleted after it was read comes back without fields: ack it away.
    gone = [entry_id for entry_id, fields in claimed if not fields]
    if gone:
        client.xack(stream, GROUP, *gone)
    return [(entry_id, fields) for entry_id, fields in claimed if fields]
