"""RQ jobs and the worker process (`civicdial worker`).

Job functions live at module level so RQ can import them by dotted path.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from rq import Queue, SimpleWorker
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import Settings, load_settings
from gateway.coordination.quotas import refresh as refresh_quotas
from gateway.store.db import make_engine, shared_engine
from gateway.store.outbox import BULK_QUEUE, INTERACTIVE_QUEUE, sweep
from gateway.store.redis_conn import connect
from gateway.store.registry import Registry
from gateway.store.sessions import SessionStore
from workers.airtime import sweep as sweep_airtime
from workers.outbound import release_held
from workers.persist import drain, ensure_group
from workers.reminders import remind_idle
from workers.sync_edge import due as sync_due
from workers.sync_edge import sync_job

log = logging.getLogger(__name__)

QUEUE = "civicdial"
SWEEP_SECONDS = 60
SYNC_CHECK_SECONDS = 5


def _queued_flag(settings: Settings) -> str:
    return f"{settings.redis_prefix}drain:queued"


def drain_job() -> int:
    """Persist everything waiting in the event stream (enqueued by the pump)."""
    settings = load_settings()
    client = connect(settings)
    # Cleared first: events arriving while this job runs get a job of their own.
    client.delete(_queued_flag(settings))
    return drain(client, shared_engine(settings), f"{settings.redis_prefix}events",
                 batch=settings.stream_batch, reclaim_idle_ms=settings.reclaim_idle_ms)


def pump_once(client: redis.Redis, settings: Settings, queue: Queue) -> bool:
    """Enqueue a drain job if events are waiting and none is queued yet."""
    store = SessionStore(client, settings.redis_prefix)
    if store.waiting() == 0:
        return False
    # The flag expires so a job lost with a dead worker is replaced.
    if not client.set(_queued_flag(settings), "1", nx=True, ex=30):
        return False
    queue.enqueue(drain_job, result_ttl=0, failure_ttl=7 * 86400, job_timeout=600)
    return True


def pump_sync(client: redis.Redis, settings: Settings, engine: Engine, queue: Queue) -> bool:
    """On an edge node: enqueue a sync job when one is due (see workers/sync_edge.due)
    and none is queued or running."""
    if not sync_due(engine, settings.sync_interval_seconds):
        return False
    # The flag expires so a job lost with a dead worker is replaced.
    if not client.set(f"{settings.redis_prefix}sync:queued", "1", nx=True, ex=900):
        return False
    queue.enqueue(sync_job, result_ttl=0, failure_ttl=7 * 86400, job_timeout=840)
    return True


def _pump(settings: Settings, stop: threading.Event) -> None:
    client = connect(settings)
    queue = Queue(QUEUE, connection=client)
    engine = make_engine(settings)
    registry = Registry(engine)
    last_sweep = last_sync = 0.0
    while not stop.wait(settings.drain_interval_ms / 1000):
        try:
            pump_once(client, settings, queue)
            if time.monotonic() - last_sync > SYNC_CHECK_SECONDS:
                last_sync = time.monotonic()
                pump_sync(client, settings, engine, queue)
            if time.monotonic() - last_sweep > SWEEP_SECONDS:
                last_sweep = time.monotonic()
                sweep(settings, engine, client)
                release_held(settings, engine, client)
                remind_idle(settings, client, registry)
                # Quotas changed by a coordinator take effect without a completion.
                refresh_quotas(engine, client, settings.redis_prefix)
                sweep_airtime(engine, client)
        except (redis.RedisError, SQLAlchemyError) as exc:
            log.warning("pump: %s", exc)


def run_worker(settings: Settings, burst: bool = False) -> None:
    """An RQ worker on the civicdial queues, plus a pump that schedules stream drains and
    re-enqueues outbound messages whose job was lost."""
    client = connect(settings)
    ensure_group(client, f"{settings.redis_prefix}events")
    stop = threading.Event()
    pump = threading.Thread(target=_pump, args=(settings, stop), name="drain-pump",
                            daemon=True)
    if burst:
        pump_once(client, settings, Queue(QUEUE, connection=client))
    else:
        pump.start()
    try:
        # Replies to people waiting first, then persistence, then bulk sends. Jobs run in
        # this process: forking a work horse while the pump thread holds a lock (an
        # import, a connection pool) can deadlock the child, and forks cost per job.
        SimpleWorker([INTERACTIVE_QUEUE, QUEUE, BULK_QUEUE], connection=client).work(
            burst=burst, logging_level=settings.log_level, with_scheduler=not burst)
    finally:
        stop.set()
