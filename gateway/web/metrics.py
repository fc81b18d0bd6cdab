"""Prometheus metrics (`/metrics`) and the health checks (`/healthz`, `/readyz`).

Per-request values (hops, their latency, replies) are counted in the process that served
them; under gunicorn, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR,
which `civicdial up` makes per run) adds them up across workers at scrape time. Values
that live in Redis or SQL (events waiting, outbound by status, restarts) are read when
scraped, so every scrape agrees with `civicdial status`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from gateway.store.models import Campaign, OutboundMessage
from gateway.store.redis_conn import RESTARTS_KEY

log = logging.getLogger("civicdial.metrics")

bp = Blueprint("metrics", __name__)

# Hops take about a millisecond when all is well; the upper buckets show Redis trouble.
HOP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
HOPS = Histogram("civicdial_hop_seconds", "Webhook requests (hops) by channel and their "
                 "latency in this process", ["channel"], buckets=HOP_BUCKETS)
REPLIES = Counter("civicdial_replies_total", "Webhook replies by kind: con, end (USSD "
                  "screens), ok (other 2xx), refused (4xx), error (5xx)", ["channel", "kind"])
# Where `civicdial up` counts the restarts of its processes.


def instrument(app: Flask) -> None:
    """Time every webhook endpoint (and nothing else: the dashboard and API are not hops).
    Per hop: one histogram observation and one counter increment on label children cached
    per channel, no I/O."""
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/webhooks/") and rule.endpoint in app.view_functions:
            app.view_functions[rule.endpoint] = _timed(app.view_functions[rule.endpoint])


_children: dict[tuple[str, str], tuple[Any, Any]] = {}


def observe(key: str, seconds: float, kind: str) -> None:
    """One hop on the channel whose key is `key` (in an app context): its latency and its
    reply's kind. Called by the Flask views' wrapper and by gateway.web.fastpath."""
    services = current_app.extensions["civicdial"]
    ch = services.registry.cached(key) if key else None
    label = str(ch.id) if ch is not None else "unknown"
    pair = _children.get((label, kind))
    if pair is None:
        pair = _children.setdefault((label, kind), (HOPS.labels(label),
                                                    REPLIES.labels(label, kind)))
    pair[0].observe(seconds)
    pair[1].inc()


def reply_kind(status: int, text_body: bytes | None) -> str:
    """The kind of a reply: its status, and for a text/plain body whether it is a USSD
    screen (None: not a text/plain body that was read)."""
    if status >= 500:
        return "error"
    if status >= 400:
        return "refused"
    if text_body is not None:
        head = text_body[:4]
        if head == b"CON ":
            return "con"
        if head == b"END ":
            return "end"
    return "ok"


def failure_kind(exc: Exception) -> str:
    """The kind of a hop that raised: refused for what becomes a 4xx, else error."""
    status = getattr(exc, "status", None) or getattr(exc, "code", None) or 500
    return "refused" if isinstance(status, int) and status < 500 else "error"


def _kind(response: Response) -> str:
    plain = response.mimetype == "text/plain" and not response.is_streamed
    return reply_kind(response.status_code, response.get_data() if plain else None)


def _timed(view: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(view)
    def timed(**kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            result = view(**kwargs)
        except Exception as exc:
            observe(kwargs.get("channel_key", ""), time.perf_counter() - started,
                    failure_kind(exc))
            raise
        response = current_app.make_response(result)
        observe(kwargs.get("channel_key", ""), time.perf_counter() - started,
                _kind(response))
        return response
    return timed


class StoreCollector(Collector):
    """What Redis and SQL hold, read at scrape time."""

    def collect(self) -> Iterator[Any]:
        services = current_app.extensions["civicdial"]
        prefix = services.settings.redis_prefix
        waiting = GaugeMetricFamily("civicdial_events_waiting",
                                    "Events in the stream not yet written to SQL")
        restarts = CounterMetricFamily("civicdial_restarts",
                                       "Processes `civicdial up` restarted after they died",
                                       labels=["process"])
        try:
            waiting.add_metric([], services.store.waiting())
            for name, count in services.redis.hgetall(f"{prefix}{RESTARTS_KEY}").items():
                restarts.add_metric([name.decode()], int(count))
        except redis.RedisError as exc:
            log.warning("metrics: redis: %s", exc)
        yield waiting
        yield restarts
        outbound = GaugeMetricFamily("civicdial_outbound_messages",
                                     "Outbound SMS by kind (invitation, reply, reminder, ...) "
                                     "and status", labels=["kind", "status"])
        campaigns = GaugeMetricFamily("civicdial_campaigns", "Campaigns by state",
                                      labels=["state"])
        try:
            with services.engine.connect() as conn:
                for kind, status, n in conn.execute(select(
                        OutboundMessage.kind, OutboundMessage.status, func.count())
                        .group_by(OutboundMessage.kind, OutboundMessage.status)):
                    outbound.add_metric([kind, status], n)
                for state, n in conn.execute(select(
                        Campaign.state, func.count()).group_by(Campaign.state)):
                    campaigns.add_metric([state], n)
        except SQLAlchemyError as exc:
            log.warning("metrics: sql: %s", exc)
        yield outbound
        yield campaigns


_STORE = StoreCollector()


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format: this process's (or every gunicorn worker's) counters and
    histograms, the worker's send results, and what Redis and SQL hold now."""
    settings = current_app.extensions["civicdial"].settings
    if settings.metrics_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=settings.metrics_dir)
    else:
        registry = REGISTRY
    body = generate_latest(registry) + generate_latest(_StoreOnly())
    return Response(body, mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})


class _StoreOnly(CollectorRegistry):
    """A registry of the store collector alone (never the global one, which a second
    app in the same process would register twice)."""

    def __init__(self) -> None:
        super().__init__(auto_describe=False)
        self.register(_STORE)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is up (for a liveness probe: it touches nothing else)."""
    return Response("ok\n", mimetype="text/plain")


@bp.get("/readyz")
def readyz() -> Response:
    """Ready to take hops: Redis and SQL both answer; else 503 naming what does not."""
    services = current_app.extensions["civicdial"]
    problems = []
    try:
        services.redis.ping()
    except redis.RedisError as exc:
        problems.append(f"redis: {exc.__class__.__name__}")
    try:
        with services.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        problems.append(f"sql: {exc.__class__.__name__}")
    if problems:
        log.warning("not ready: %s (%s)", "; ".join(problems), request.path)
        return Response("not ready: " + "; ".join(problems) + "\n", status=503,
                        mimetype="text/plain")
    return Response("ready\n", mimetype="text/plain")
