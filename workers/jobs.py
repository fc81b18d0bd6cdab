"""RQ jobs and the worker process (`civicdial worker`).

Job functions live at module level so RQ can import them by dotted path.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import redis
from rq import Queue, SimpleWorker
from rq.scheduler import RQScheduler
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import Settings, load_settings
from gateway.coordination.quotas import refresh as refresh_quotas
from gateway.coordination.retention import purge_daily
from gateway.logformat import configure_logging
from gateway.store.db import make_engine, shared_engine
from gateway.store.outbox import BULK_QUEUE, INTERACTIVE_QUEUE, sweep
from gateway.store.redis_conn import connect
from gateway.store.registry import Registry
from gateway.store.sessions import SessionStore
from workers.airtime import sweep as sweep_airtime
from workers.outbound import IDEMPOTENT_PROVIDERS, release_held
from workers.persist import drain, ensure_group
from workers.reminders import remind_idle
from workers.sync_edge import due as sync_due
from workers.sync_edge import sync_job

log = logging.getLogger(__name__)

QUEUE = "civicdial"
SWEEP_SECONDS = 60
QUEUES = [INTERACTIVE_QUEUE, QUEUE, BULK_QUEUE]
# RQ's own scheduler holds a lock per queue for 61 s and a worker that finds it taken
# tries again only at its 10-minute maintenance: after a worker was killed, retries due
# in the meantime waited that long. Ours is a short lease the pump renews every second,
# so a dead holder's lease runs out within seconds and any live worker takes over.
SCHEDULER_LEASE_MS = 5000
SCHEDULE_SECONDS = 1.0

# Take the lease if free, renew it if ours; 1 when we hold it.
_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

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


class DueJobs:
    """Moves scheduled jobs (retries with a delay) onto their queues once due, in one
    worker at a time: the one holding the scheduler lease."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.key = f"{settings.redis_prefix}scheduler:lease"
        self.token = uuid.uuid4().hex
        self._lease = client.register_script(_LEASE)
        # RQ's scheduler does the moving (its registries, rate-limited jobs); only its
        # locking is replaced.
        self._scheduler = RQScheduler(QUEUES, connection=client)
        self._scheduler.prepare_registries(QUEUES)

    def run_once(self) -> bool:
        """Enqueue what is due if we hold (or can take) the lease."""
        if not self._lease(keys=[self.key], args=[self.token, SCHEDULER_LEASE_MS]):
            return False
        self._scheduler.enqueue_scheduled_jobs()
        return True

    def release(self) -> None:
        if self.client.get(self.key) == self.token.encode():
            self.client.delete(self.key)


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
    due = DueJobs(client, settings)
    last_sweep = last_sync = 0.0
    last_schedule = 0.0
    while not stop.wait(settings.drain_interval_ms / 1000):
        try:
            pump_once(client, settings, queue)
            if time.monotonic() - last_schedule >= SCHEDULE_SECONDS:
                last_schedule = time.monotonic()
                due.run_once()
            if time.monotonic() - last_sync > SYNC_CHECK_SECONDS:
                last_sync = time.monotonic()
                pump_sync(client, settings, engine, queue)
            if time.monotonic() - last_sweep > SWEEP_SECONDS:
                last_sweep = time.monotonic()
                sweep(settings, engine, client, resend_providers=IDEMPOTENT_PROVIDERS)
                release_held(settings, engine, client)
                remind_idle(settings, client, registry)
                # Quotas changed by a coordinator take effect without a completion.
                refresh_quotas(engine, client, settings.redis_prefix)
                sweep_airtime(engine, client)
                # Contact numbers and message bodies past CIVICDIAL_RETENTION_DAYS: once
                # a day, by whichever worker gets there first.
                purge_daily(settings, engine, client)
        except (redis.RedisError, SQLAlchemyError) as exc:
            log.warning("pump: %s", exc)
        except Exception:
            # This thread schedules every drain of the stream: if it died, answers would
            # wait in Redis while the worker looked alive.
            log.exception("pump: unexpected error (going on)")
    try:
        due.release()
    except redis.RedisError:
        pass  # the lease runs out by itself


def run_worker(settings: Settings, burst: bool = False) -> None:
    """An RQ worker on the civicdial queues, plus a pump that schedules stream drains and
    re-enqueues outbound messages whose job was lost."""
    configure_logging(settings)
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
        # Due retries are moved by the pump (DueJobs), not by RQ's scheduler process.
        SimpleWorker(QUEUES, connection=client).work(
            burst=burst, logging_level=settings.log_level, with_scheduler=False)
    finally:
        stop.set()
