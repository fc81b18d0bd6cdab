"""The stream-to-SQL worker: exactly once through retries, replays and killed workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from gateway.config import Settings
from gateway.coordination.bootstrap import shipped_questionnaire
from gateway.coordination.status import campaign_status
from gateway.interview.engine import Input, step
from gateway.store.models import Answer, Channel, Interview
from gateway.store.registry import Registry
from gateway.store.sessions import GROUP, SessionStore, stream_event
from workers.jobs import QUEUE, pump_once, run_worker
from workers.persist import drain, write_events

STREAM = "cd:events"


def interview(engine: Engine, channel: Channel, respondent: str, inputs: list[str],
              interview_id: str) -> list[dict[str, Any]]:
    """The events a real interview produces, as the channel would put them on the stream."""
    info = Registry(engine).channel(channel.key)
    assert info is not None
    form = shipped_questionnaire()
    result = step(form, None, Input.open(1000.0, interview_id))
    state, events = result.state, list(result.events)
    for n, text_in in enumerate(inputs):
        result = step(form, state, Input.answer(text_in, 1001.0 + n), info.rules)
        state = result.state
        events.extend(result.events)
    return [stream_event(e, info.campaign_id, info.id, respondent, form.version)
            for e in events]


# language, consent, sex, age 25-34, region, urban, income, six WG-SS, health used + 6,
# primary no, secondary no, govt no, improve, results by SMS: no
FULL = ["1", "1", "1", "3", "2", "1", "2", "1", "1", "1", "1", "1", "1",
        "1", "1", "2", "3", "4", "5", "1", "2", "2", "2", "Shorter queues", "2"]


def answers(engine: Engine) -> list[tuple[str, str, str | None]]:
    with Session(engine) as db:
        return sorted(db.execute(select(Answer.interview_id, Answer.question,
                                        Answer.value)).all())


def test_full_interview_is_written(engine: Engine, channel: Channel) -> None:
    """A completed interview becomes one interview row and one row per answer."""
    events = interview(engine, channel, "resp1", FULL, "iv1")
    write_events(engine, events)
    rows = answers(engine)
    names = [q for _, q, _ in rows]
    assert len(names) == len(set(names))
    assert ("iv1", "h_sat", "vs") in rows
    assert ("iv1", "improve", "Shorter queues") in rows
    assert not any(q.startswith(("p_acc", "s_acc", "g_acc")) for q in names)
    with Session(engine) as db:
        iv = db.get(Interview, "iv1")
        assert iv is not None
        assert (iv.status, iv.respondent, iv.lang) == ("completed", "resp1", "English (en)")
        assert iv.completed_at is not None


def test_same_batch_twice_changes_nothing(engine: Engine, channel: Channel) -> None:
    """Writing a batch again (a retry after a crash before XACK) is harmless."""
    events = interview(engine, channel, "resp1", FULL, "iv1")
    write_events(engine, events)
    first = answers(engine)
    write_events(engine, events)
    write_events(engine, list(reversed(events)))
    assert answers(engine) == first


def test_newer_answer_wins_whatever_the_order(engine: Engine, channel: Channel) -> None:
    """An answer changed by going back keeps its latest value even if batches cross."""
    events = interview(engine, channel, "resp1", ["1", "1", "1", "0", "2"], "iv1")
    sex = [e for e in events if e.get("q") == "sex"]
    assert [e["v"] for e in sex] == ["female", "male"]
    write_events(engine, [sex[1]])
    write_events(engine, [sex[0]])
    assert ("iv1", "sex", "male") in answers(engine)


def test_withdrawal_erases_answers(engine: Engine, channel: Channel) -> None:
    """Going back to consent and saying No deletes what was stored."""
    events = interview(engine, channel, "resp1", ["1", "1", "1", "0", "0", "2"], "iv1")
    assert events[-1]["k"] == "withdrawn"
    write_events(engine, events[:-1])
    assert answers(engine)
    write_events(engine, events[-1:])
    assert answers(engine) == []
    with Session(engine) as db:
        iv = db.get(Interview, "iv1")
        assert iv is not None and iv.status == "withdrawn" and iv.respondent is None


def push(client: redis.Redis, events: list[dict[str, Any]]) -> None:
    SessionStore(client).append(events)


def test_drain_acks_and_empties_the_stream(engine: Engine, channel: Channel,
                                           redis_client: redis.Redis) -> None:
    """After a drain, nothing waits in the stream and nothing is pending."""
    pushed = 0
    for n in range(5):
        events = interview(engine, channel, f"r{n}", FULL, f"iv{n}")
        push(redis_client, events)
        pushed += len(events)
    assert drain(redis_client, engine, STREAM, batch=7) == pushed
    assert redis_client.xlen(STREAM) == 0
    assert pending(redis_client) == 0
    assert len(answers(engine)) == 5 * 24


def pending(client: redis.Redis) -> int:
    try:
        return int(client.xpending(STREAM, GROUP)["pending"])
    except redis.ResponseError:  # the doomed worker has not created the group yet
        return 0


@contextmanager
def sql_write_lock(engine: Engine) -> Iterator[None]:
    """Hold the database's write lock from another connection, like a slow transaction."""
    conn = engine.connect()
    if engine.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.begin()
        conn.execute(text("LOCK TABLE answers IN ACCESS EXCLUSIVE MODE"))
    try:
        yield
    finally:
        conn.rollback()
        conn.close()


DRAIN_SCRIPT = """
import sys
from gateway.config import load_settings
from gateway.store.db import make_engine
from gateway.store.redis_conn import connect
from workers.persist import drain
s = load_settings()
drain(connect(s), make_engine(s), "cd:events", batch=1000, consumer="doomed")
"""


def test_worker_killed_mid_batch_loses_nothing(engine: Engine, channel: Channel,
                                               redis_client: redis.Redis,
                                               env: dict[str, str]) -> None:
    """A worker SIGKILLed while writing a batch: a second worker reclaims and finishes it."""
    events: list[dict[str, Any]] = []
    for n in range(20):
        events += interview(engine, channel, f"r{n}", FULL, f"iv{n}")
    push(redis_client, events)
    with sql_write_lock(engine):
        proc = subprocess.Popen([sys.executable, "-c", DRAIN_SCRIPT],
                                env={**os.environ, **env})
        try:
            # Bounded wait until the doomed worker has read a batch it cannot write.
            for _ in range(200):
                if pending(redis_client):
                    break
                time.sleep(0.05)
            assert pending(redis_client) == len(events)
            time.sleep(0.2)
            assert proc.poll() is None, "the worker should be stuck on the SQL lock"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert answers(engine) == []
    assert pending(redis_client) == len(events)
    # Idle time 0 stands in for "the dead consumer's entries have been idle long enough".
    drain(redis_client, engine, STREAM, batch=1000, reclaim_idle_ms=0, consumer="rescuer")
    rows = answers(engine)
    assert len(rows) == 20 * 24
    assert len({(i, q) for i, q, _ in rows}) == len(rows)
    # Each stored answer is the one the event carried (the newest per question), not just
    # the right number of rows.
    sent: dict[tuple[str, str], tuple[int, str | None]] = {}
    for e in events:
        if e["k"] == "answer":
            seq = int(e["id"].rsplit("-", 1)[1])
            if (e["i"], e["q"]) not in sent or sent[(e["i"], e["q"])][0] < seq:
                sent[(e["i"], e["q"])] = (seq, e["v"])
    assert rows == sorted((i, q, v) for (i, q), (_, v) in sent.items() if v is not None)
    with Session(engine) as db:
        owners = dict(db.execute(select(Interview.id, Interview.respondent)).all())
    assert owners == {f"iv{n}": f"r{n}" for n in range(20)}
    assert pending(redis_client) == 0
    assert redis_client.xlen(STREAM) == 0


def test_reclaim_waits_for_idle_time(engine: Engine, channel: Channel,
                                     redis_client: redis.Redis) -> None:
    """Entries another live consumer is working on are not stolen before they go idle."""
    push(redis_client, interview(engine, channel, "r1", FULL, "iv1"))
    drain(redis_client, engine, STREAM, max_batches=0)  # creates the group only
    redis_client.xreadgroup(GROUP, "busy", {STREAM: ">"}, count=1000)
    assert drain(redis_client, engine, STREAM, reclaim_idle_ms=60_000) == 0
    assert answers(engine) == []
    assert drain(redis_client, engine, STREAM, reclaim_idle_ms=0) > 0
    assert len(answers(engine)) == 24


def test_rq_worker_drains_through_the_queue(engine: Engine, channel: Channel,
                                            redis_client: redis.Redis, settings: Settings,
                                            env: dict[str, str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The pump enqueues one drain job; an RQ worker runs it and SQL gets the answers."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    push(redis_client, interview(engine, channel, "r1", FULL, "iv1"))
    from rq import Queue

    queue = Queue(QUEUE, connection=redis_client)
    assert pump_once(redis_client, settings, queue) is True
    assert pump_once(redis_client, settings, queue) is False  # one is already queued
    run_worker(settings, burst=True)
    assert len(answers(engine)) == 24
    assert redis_client.xlen(STREAM) == 0
    assert pump_once(redis_client, settings, queue) is False  # nothing waiting


def test_ussd_end_notifications_are_recorded_once(engine: Engine, channel: Channel,
                                                  redis_client: redis.Redis) -> None:
    """The same end-of-session notification twice is one row."""
    note = {"id": f"ussd_end:{channel.id}:S1", "k": "ussd_end", "ch": channel.id, "s": "S1",
            "r": None, "st": "Incomplete", "n": "62001", "d": 40000, "h": 7,
            "cost": "GHS 0.05", "err": "", "t": time.time()}
    push(redis_client, [note, note])
    drain(redis_client, engine, STREAM)
    with Session(engine) as db:
        assert db.scalar(text("SELECT count(*) FROM ussd_session_ends")) == 1
        assert db.scalar(select(func.count()).select_from(Interview)) == 0


def test_the_first_end_notification_of_a_session_is_kept(engine: Engine, channel: Channel,
                                                         redis_client: redis.Redis) -> None:
    """A sparser resend of a session's notification replaces nothing, whether it comes in
    the same batch as the first or in a later one."""
    def note(session: str, **values: Any) -> dict[str, Any]:
        return {"id": f"ussd_end:{channel.id}:{session}", "k": "ussd_end", "ch": channel.id,
                "s": session, "r": None, "st": "Failed", "t": time.time(), **values}

    full = {"n": "62001", "cost": "GHS 0.05", "d": 40000, "h": 7}
    push(redis_client, [note("S1", **full), note("S1")])  # one batch
    drain(redis_client, engine, STREAM)
    push(redis_client, [note("S2", **full)])
    drain(redis_client, engine, STREAM)
    push(redis_client, [note("S2")])  # a later batch
    drain(redis_client, engine, STREAM)
    with Session(engine) as db:
        rows = db.execute(text("SELECT session_id, network_code, cost, duration_ms, hops "
                               "FROM ussd_session_ends ORDER BY session_id")).all()
    assert [tuple(r) for r in rows] == [("S1", "62001", "GHS 0.05", 40000, 7),
                                        ("S2", "62001", "GHS 0.05", 40000, 7)]


def test_stream_entry_format_is_json(redis_client: redis.Redis, engine: Engine,
                                     channel: Channel) -> None:
    """Stream entries carry one JSON field 'e' (what `civicdial status` reads)."""
    push(redis_client, interview(engine, channel, "r1", ["1", "1"], "iv1"))
    (_, fields), *_ = redis_client.xrange(STREAM)
    assert json.loads(fields[b"e"])["k"] == "started"


def test_a_malformed_entry_is_parked_not_blocking(engine: Engine, channel: Channel,
                                                  redis_client: redis.Redis) -> None:
    """One bad entry goes to the dead-letter stream; the good ones around it are written."""
    good = interview(engine, channel, "r1", FULL, "iv1")
    redis_client.xadd(STREAM, {"e": json.dumps({"k": "answer", "id": "broken"})})
    push(redis_client, good)
    assert drain(redis_client, engine, STREAM) == len(good) + 1
    assert len(answers(engine)) == 24
    (dead,) = redis_client.xrange(f"{STREAM}:dead")
    assert b"broken" in dead[1][b"e"]
    assert redis_client.xlen(STREAM) == 0


def poison_end(channel: Channel, session: str, **values: Any) -> dict[str, Any]:
    """An end-of-session notification as an older webhook (no range check) streamed it."""
    return {"id": f"ussd_end:{channel.id}:{session}", "k": "ussd_end", "ch": channel.id,
            "s": session, "r": None, "st": "Failed", "n": "62001", "d": 1000, "h": 3,
            "cost": "", "err": "", "t": time.time(), **values}


@pytest.mark.parametrize("values", [{"d": 2**63}, {"h": 2**64}, {"d": 2**63, "h": -2**70}],
                         ids=["durationInMillis 2^63", "hopsCount 2^64", "both"])
def test_an_entry_sql_cannot_take_is_parked_and_the_batch_written(
        engine: Engine, channel: Channel, redis_client: redis.Redis,
        settings: Settings, values: dict[str, Any]) -> None:
    """A value no column can hold raises in the database driver (OverflowError, DataError):
    that entry alone is parked, every other entry of its batch (answers, an opt-out, a sound
    notification) is written, and nothing is left waiting."""
    good = interview(engine, channel, "r1", FULL, "iv1")
    optout = {"id": "optout:r9:m1", "k": "optout", "r": "r9", "ch": channel.id,
              "t": time.time()}
    push(redis_client, good[:10] + [poison_end(channel, "BAD", **values)] + good[10:]
         + [optout, poison_end(channel, "GOOD")])
    assert drain(redis_client, engine, STREAM) == len(good) + 3
    stored = answers(engine)
    sent = {(e["i"], e["q"], e["v"]) for e in good if e["k"] == "answer"}
    assert set(stored) == sent and len(stored) == 24
    with Session(engine) as db:
        assert db.scalar(text("SELECT session_id FROM ussd_session_ends")) == "GOOD"
        assert db.scalar(text("SELECT respondent FROM opt_outs")) == "r9"
    (dead,) = redis_client.xrange(f"{STREAM}:dead")
    assert json.loads(dead[1][b"e"])["s"] == "BAD"
    assert redis_client.xlen(STREAM) == 0 and pending(redis_client) == 0
    assert campaign_status(engine, SessionStore(redis_client, settings.redis_prefix))[
        "events_waiting"] == 0


def test_two_poison_entries_far_apart_are_both_found(engine: Engine, channel: Channel,
                                                     redis_client: redis.Redis) -> None:
    """Splitting finds every entry at fault, wherever it sits in the batch."""
    good = interview(engine, channel, "r1", FULL, "iv1")
    push(redis_client, [poison_end(channel, "B1", d=2**63)] + good
         + [poison_end(channel, "B2", h=2**63)])
    drain(redis_client, engine, STREAM)
    assert len(answers(engine)) == 24
    parked = [json.loads(f[b"e"])["s"] for _, f in redis_client.xrange(f"{STREAM}:dead")]
    assert sorted(parked) == ["B1", "B2"]


def test_database_down_parks_nothing(channel: Channel, engine: Engine,
                                     redis_client: redis.Redis, tmp_path: Any) -> None:
    """When the database itself fails, the batch stays in the stream to be retried: no
    entry is blamed and parked."""
    good = interview(engine, channel, "r1", FULL, "iv1")
    push(redis_client, good)
    unreachable = create_engine(f"sqlite:///{tmp_path}/no/such/dir/db.sqlite")
    with pytest.raises(OperationalError):
        drain(redis_client, unreachable, STREAM)
    assert redis_client.xlen(f"{STREAM}:dead") == 0
    assert redis_client.xlen(STREAM) == len(good)
    assert drain(redis_client, engine, STREAM, reclaim_idle_ms=0) == len(good)
    assert len(answers(engine)) == 24


def test_a_batch_the_database_refused_goes_again_at_the_next_drain(
        channel: Channel, engine: Engine, redis_client: redis.Redis, tmp_path: Any) -> None:
    """The worker that read a batch while SQL was down writes it at its next drain once SQL
    answers: it does not wait a minute for its own entries to look abandoned
    (CIVICDIAL_RECLAIM_IDLE_MS is for entries of workers that died)."""
    good = interview(engine, channel, "r1", FULL, "iv1")
    push(redis_client, good)
    unreachable = create_engine(f"sqlite:///{tmp_path}/no/such/dir/db.sqlite")
    with pytest.raises(OperationalError):
        drain(redis_client, unreachable, STREAM, consumer="w1")
    assert pending(redis_client) == len(good)
    assert drain(redis_client, engine, STREAM, reclaim_idle_ms=60_000, consumer="w1") \
        == len(good)
    assert len(answers(engine)) == 24
    assert pending(redis_client) == 0 and redis_client.xlen(STREAM) == 0
