"""Retention: contact numbers and outbound bodies older than CIVICDIAL_RETENTION_DAYS are
purged by a daily job the worker schedules; `status` shows the oldest kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import redis
from click.testing import CliRunner
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from gateway.cli import main
from gateway.config import Settings
from gateway.coordination.retention import purge, purge_daily
from gateway.store.models import Channel, Contact, OutboundMessage

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def seed(engine: Engine, channel: Channel) -> None:
    old, new = NOW - timedelta(days=400), NOW - timedelta(days=10)
    with Session(engine) as db, db.begin():
        db.execute(insert(Contact), [
            {"respondent": "old", "recipient": "sealed-old", "created_at": old},
            {"respondent": "new", "recipient": "sealed-new", "created_at": new}])
        rows = [("old-sent", "sent", old), ("old-queued", "queued", old),
                ("new-sent", "delivered", new)]
        db.execute(insert(OutboundMessage), [
            {"key": key, "channel_id": channel.id, "respondent": "r", "recipient": "sealed",
             "body": f"body of {key}", "status": status, "created_at": at, "updated_at": at}
            for key, status, at in rows])


def test_purge_drops_old_numbers_and_bodies_only(settings: Settings, engine: Engine,
                                                 channel: Channel) -> None:
    """Older than the retention: contact gone, finished message blanked; a message still
    queued, and anything newer, kept."""
    seed(engine, channel)
    done = purge(settings.with_(retention_days=365), engine, now=NOW)
    assert (done.contacts, done.message_bodies) == (1, 1)
    with Session(engine) as db:
        assert db.scalars(select(Contact.respondent)).all() == ["new"]
        kept = dict(db.execute(select(OutboundMessage.key, OutboundMessage.body)).all())
    assert kept == {"old-sent": "", "old-queued": "body of old-queued",
                    "new-sent": "body of new-sent"}
    assert purge(settings.with_(retention_days=0), engine, now=NOW + timedelta(days=999)) \
        .contacts == 0


def test_purge_runs_once_a_day(settings: Settings, engine: Engine,
                               redis_client: redis.Redis) -> None:
    """However many workers call it, one purge a day."""
    assert purge_daily(settings, engine, redis_client) is not None
    assert purge_daily(settings, engine, redis_client) is None
    assert 0 < redis_client.ttl("cd:retention:last") <= 86400


def test_the_worker_schedules_the_purge(settings: Settings, engine: Engine, env: dict[str, str],
                                        redis_client: redis.Redis, channel: Channel) -> None:
    """A real `civicdial worker` process runs the daily purge (its first sweep is at
    start)."""
    with Session(engine) as db, db.begin():
        db.execute(insert(Contact).values(respondent="ancient", recipient="x",
                                          created_at=datetime.now(UTC) - timedelta(days=4000)))
    proc = subprocess.Popen([sys.executable, "-c", WORKER], env={**os.environ, **env})
    try:
        for _ in range(600):  # bounded wait for the first sweep, not a timing assertion
            if redis_client.exists("cd:retention:last"):
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert redis_client.exists("cd:retention:last")
    with Session(engine) as db:
        assert db.scalars(select(Contact.respondent)).all() == []


WORKER = "from gateway.config import load_settings; from workers.jobs import run_worker; " \
         "run_worker(load_settings())"


def test_status_shows_the_oldest_kept(env: dict[str, str], engine: Engine,
                                      channel: Channel) -> None:
    """`status --json` and `status` name the policy and the oldest number and body kept."""
    seed(engine, channel)
    result = CliRunner().invoke(main, ["status", "--json"], env={
        **env, "CIVICDIAL_RETENTION_DAYS": "30"})
    kept = json.loads(result.output)["retention"]
    assert kept["retention_days"] == 30
    assert kept["oldest_contact_number"].startswith("2025-10-27")
    assert kept["oldest_message_body"].startswith("2025-10-27")
    text = CliRunner().invoke(main, ["status"], env=env).output
    assert "retention 365 days: oldest contact number 2025-10-27" in text
