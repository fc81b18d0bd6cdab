"""The USSD hops as a plain WSGI callable in front of Flask.

The hop is the route that carries the load, and its own work is one or two Redis round
trips and the engine; Flask's request context, Werkzeug's Request and Response objects, URL matching
and the error-handler lookup cost about as much CPU again (tests/bench/README.md). Here a
POST to /webhooks/<provider>/<key>/ussd (Africa's Talking's form; Hubtel's and Arkesel's
JSON) with a body of a stated length goes straight to the provider module's hop function
(`africastalking.ussd_hop`, `hubtel.ussd_reply`, `arkesel.ussd_reply`) in an app context,
and gets what the Flask route gives, byte for byte (tests/test_fastpath.py compares them):
the same refusals and log lines (gateway.web.refusals: 4xx for a bad request, 413 for a
body over CIVICDIAL_MAX_BODY_BYTES, 400 for one that ends before its Content-Length, 503
when Redis is down), the same per-hop metrics (gateway.web.metrics.observe), and the same
body read through gateway.web.framing.BodyGuard, which wraps this callable.

Whatever is not plainly such a hop (another method or path, another content type, no
Content-Length, a Transfer-Encoding) goes to Flask unchanged, which answers it as before.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flask import Flask
from werkzeug.exceptions import HTTPException, InternalServerError, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES, parse_options_header

from gateway.channels import africastalking, arkesel, hubtel
from gateway.channels.jsonbody import object_from_body
from gateway.channels.webhook import WebhookError, form_from_body
from gateway.web import metrics, refusals
from gateway.web.framing import BrokenBody

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_FORM = "application/x-www-form-urlencoded"
_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class HopRoute:
    """A provider's USSD hop as its Flask route serves it."""

    mimetypes: tuple[str, ...]  # the request bodies taken here (any other: Flask's)
    reply_type: str  # the Content-Type of its 200 answers
    reply: Callable[[str, Callable[[], dict[str, Any]]], str]  # (key, read body) -> body
    parse: Callable[[bytes], dict[str, Any]]  # the body, as the route decodes it


ROUTES = {
    "africastalking": HopRoute(("", _FORM), _TEXT, africastalking.ussd_hop, form_from_body),
    "hubtel": HopRoute((_JSON,), _JSON, hubtel.ussd_reply, object_from_body),
    "arkesel": HopRoute((_JSON,), _JSON, arkesel.ussd_reply, object_from_body),
}


@functools.lru_cache(maxsize=64)
def _mimetype(content_type: str) -> str:
    # As Werkzeug's Request.mimetype reads the header.
    return parse_options_header(content_type)[0].lower()


@functools.lru_cache(maxsize=64)
def _status_line(status: int) -> str:
    # As Werkzeug's Response writes it.
    return f"{status} {HTTP_STATUS_CODES.get(status, 'UNKNOWN').upper()}"


def hop_route(environ: dict[str, Any]) -> tuple[str, HopRoute] | None:
    """(channel key, route) of a request the fast path takes, or None for Flask's."""
    if environ.get("REQUEST_METHOD") != "POST":
        return None
    parts = environ.get("PATH_INFO", "").split("/")
    if (len(parts) != 5 or parts[1] != "webhooks" or parts[4] != "ussd" or not parts[3]
            or not parts[3].isascii()):
        return None
    route = ROUTES.get(parts[2])
    length = environ.get("CONTENT_LENGTH") or ""
    if (route is None or not (length.isascii() and length.isdigit())
            or environ.get("HTTP_TRANSFER_ENCODING")
            or _mimetype(environ.get("CONTENT_TYPE") or "") not in route.mimetypes):
        return None
    return parts[3], route


def read_body(stream: Any, size: int) -> bytes:
    """Exactly `size` bytes of the body; a body that ends sooner is refused (400), as
    BodyGuard refuses it for Flask."""
    data = stream.read(size) if size else b""
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            raise BrokenBody(f"the body ended after {len(data)} of the {size} bytes its "
                             "Content-Length announced")
        data += more
    return data


class UssdFastPath:
    """WSGI middleware: USSD hops here, every other request to Flask."""

    def __init__(self, app: Flask, flask_wsgi: WSGIApp) -> None:
        self.app = app
        self.flask = flask_wsgi

    def __call__(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        found = hop_route(environ)
        if found is None:
            return self.flask(environ, start)
        key, route = found
        path = environ["PATH_INFO"]
        size = int(environ["CONTENT_LENGTH"])
        stream = environ["wsgi.input"]
        with self.app.app_context():
            settings = self.app.extensions["civicdial"].settings

            def read() -> dict[str, Any]:
                if size > settings.max_body_bytes:
                    raise RequestEntityTooLarge()
                return route.parse(read_body(stream, size))

            answer, reply_type = self._answer(key, path, route, read)
        data = answer.body.encode()
        start(_status_line(answer.status), [*answer.headers, ("Content-Type", reply_type),
                                            ("Content-Length", str(len(data)))])
        return [data]

    def _answer(self, key: str, path: str, route: HopRoute,
                read: Callable[[], dict[str, Any]]) -> tuple[refusals.Answer, str]:
        # The Flask route's view and its wrapper (metrics._timed), then its error handlers.
        started = time.perf_counter()
        try:
            body = route.reply(key, read)
        except Exception as exc:
            metrics.observe(key, time.perf_counter() - started, metrics.failure_kind(exc))
            return self._refusal(path, exc), _TEXT
        text = route.reply_type == _TEXT
        metrics.observe(key, time.perf_counter() - started,
                        metrics.reply_kind(200, body[:4].encode() if text else None))
        return refusals.Answer(200, body), route.reply_type

    def _refusal(self, path: str, exc: Exception) -> refusals.Answer:
        if isinstance(exc, WebhookError):
            return refusals.refused("POST", path, exc)
        if isinstance(exc, HTTPException):
            return refusals.http_error("POST", path, exc)
        if isinstance(exc, refusals.UNAVAILABLE):
            return refusals.unavailable("POST", path, exc)
        if self.app.config["PROPAGATE_EXCEPTIONS"] or self.app.testing or self.app.debug:
            raise exc
        # As Flask does for an unhandled error: the traceback, then the 500 handler's line
        # (with the channel key masked, which Flask's own line does not do).
        self.app.logger.error("Exception on %s [POST]", refusals.mask_path(path),
                              exc_info=exc)
        return refusals.http_error("POST", path, InternalServerError())
