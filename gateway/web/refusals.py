"""What the web app answers when it refuses a request or cannot serve it, with the one log
line each: shared by Flask's error handlers (gateway.web.app) and the USSD fast path
(gateway.web.fastpath), so that both give the same status, body, headers and line."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from flask import Response
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import HTTPException

from gateway.channels.webhook import WebhookError
from gateway.web.framing import BrokenBody

log = logging.getLogger("civicdial.webhooks")


@dataclass(frozen=True)
class Answer:
    """A text/plain answer: status, body, and the headers besides Content-Type/-Length."""

    status: int
    body: str
    headers: tuple[tuple[str, str], ...] = ()

    def response(self) -> Response:
        return Response(self.body, status=self.status, mimetype="text/plain",
                        headers=list(self.headers) or None)


def mask_path(path: str) -> str:
    """A request path with its channel key (the webhook's only secret) cut short."""
    parts = path.split("/")
    if len(parts) > 3 and parts[1] == "webhooks":
        parts[3] = parts[3][:4] + "***"
    return "/".join(parts)


def refused(method: str, path: str, exc: WebhookError) -> Answer:
    log.warning("%s %s -> %d %s", method, mask_path(path), exc.status, exc.reason)
    return Answer(exc.status, exc.reason + "\n")


def http_error(method: str, path: str, exc: HTTPException) -> Answer:
    # A body broken in transit says how (Werkzeug's own descriptions are boilerplate).
    name = f"{exc.name}: {exc.description}" if isinstance(exc, BrokenBody) else exc.name
    log.warning("%s %s -> %d %s", method, mask_path(path), exc.code, name)
    return Answer(exc.code or 400, f"{name}\n")


def unavailable(method: str, path: str, exc: Exception) -> Answer:
    """Redis restarting or unreachable, or SQL failing before the channel cache was
    loaded: not a 500. The provider retries the hop and gets it processed once (or, if
    the commit landed, the stored reply)."""
    what = "redis" if isinstance(exc, redis.RedisError) else "sql"
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    log.warning("%s %s -> 503 %s unavailable: %s", method, mask_path(path), what, reason)
    return Answer(503, "temporarily unavailable\n", (("Retry-After", "1"),))


# The errors answered with a 503 (the app registers its handler for these): Redis down,
# and the database down or refusing (OperationalError: connection refused, locked, ...).
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
SQL_DOWN = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
UNAVAILABLE = REDIS_DOWN + SQL_DOWN
