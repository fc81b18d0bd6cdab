"""Flask app factory: the web process that answers provider webhooks."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis
from flask import Flask, Response, request
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.middleware.proxy_fix import ProxyFix

from gateway.channels import africastalking, arkesel, hubtel, twilio
from gateway.channels.webhook import WebhookError, form_from_body
from gateway.config import Settings, load_settings
from gateway.store.crypto import NumberBox
from gateway.store.db import make_engine
from gateway.store.redis_conn import connect
from gateway.store.registry import Registry
from gateway.store.sessions import SessionStore
from gateway.web import api, dashboard

log = logging.getLogger("civicdial.webhooks")


@dataclass
class Services:
    settings: Settings
    engine: Engine
    redis: redis.Redis
    store: SessionStore
    registry: Registry
    box: NumberBox


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask(__name__)
    # Webhooks are tiny; only the admin API's uploads may be large (checked per route).
    app.config["MAX_CONTENT_LENGTH"] = api.MAX_UPLOAD
    app.config["MAX_FORM_MEMORY_SIZE"] = api.MAX_UPLOAD
    engine = make_engine(settings)
    client = connect(settings)
    app.extensions["civicdial"] = Services(
        settings=settings, engine=engine, redis=client,
        store=SessionStore(client, settings.redis_prefix), registry=Registry(engine),
        box=NumberBox(settings.encryption_key),
    )
    app.register_blueprint(africastalking.bp)
    app.register_blueprint(hubtel.bp)
    app.register_blueprint(arkesel.bp)
    app.register_blueprint(twilio.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(dashboard.bp)
    # The USSD hop skips Flask's request layers (see UssdFastPath); inside ProxyFix, which
    # it does not need but which must still see every other request first.
    app.wsgi_app = UssdFastPath(app, app.wsgi_app, settings.max_body_bytes)  # type: ignore[method-assign]
    if settings.trust_proxy:
        # Behind a reverse proxy: request.url must be the public URL a provider signed.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_port=1)  # type: ignore[method-assign]

    @app.errorhandler(WebhookError)
    def _refused(exc: WebhookError) -> Response:
        log.warning("%s %s -> %d %s", request.method, _safe_path(), exc.status, exc.reason)
        return exc.response()

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        log.warning("%s %s -> %d %s", request.method, _safe_path(), exc.code, exc.name)
        return Response(f"{exc.name}\n", status=exc.code or 400, mimetype="text/plain")

    @app.get("/healthz")
    def healthz() -> Response:
        client.ping()
        return Response("ok\n", mimetype="text/plain")

    # Once per process, not per hop: the questionnaires the channels serve are parsed now
    # (an XLSForm takes a few hundred ms: the first hop of every worker paid it), and what
    # the app holds from here on (forms, SQLAlchemy's mappers, the routes) is moved out of
    # the garbage collector's generations, so that its full collections, which scan every
    # tracked object, stop walking them during hops.
    try:
        app.extensions["civicdial"].registry.preload()
    except (SQLAlchemyError, LookupError) as exc:  # not migrated yet: the first hop loads it
        log.warning("questionnaires not preloaded: %s", exc)
    gc.collect()
    gc.freeze()
    return app


StartResponse = Callable[[str, list[tuple[str, str]]], Any]
_TEXT = "text/plain; charset=utf-8"
_FORM = ("", "application/x-www-form-urlencoded")


class UssdFastPath:
    """The Africa's Talking USSD hop as a plain WSGI callable, in front of Flask.

    The hop is the one route that carries load, and its work is two Redis round trips and
    the engine; Flask's request context, Werkzeug's Request and Response objects, URL
    matching and the error-handler lookup cost about as much CPU again (see
    tests/bench/README.md). Here a plain POST of a form body of known length to
    /webhooks/africastalking/<key>/ussd goes straight to `africastalking.ussd_hop`, in an
    app context, with the same replies, status lines, headers and log lines as through
    Flask. Anything else — another method or path, another content type, no or too large
    a Content-Length (413 and 415 are Flask's to answer) — goes to Flask unchanged.
    """

    def __init__(self, app: Flask, wsgi_app: Callable[..., Iterable[bytes]],
                 max_body: int) -> None:
        self.app = app
        self.flask = wsgi_app
        self.max_body = max_body

    def __call__(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        parts = path.split("/")
        if (environ.get("REQUEST_METHOD") != "POST" or len(parts) != 5 or parts[1] != "webhooks"
                or parts[2] != "africastalking" or parts[4] != "ussd" or not parts[3]):
            return self.flask(environ, start)
        length = environ.get("CONTENT_LENGTH", "")
        mimetype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        if (mimetype not in _FORM or not length.isdigit() or int(length) > self.max_body
                or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()):
            return self.flask(environ, start)
        stream = environ["wsgi.input"]
        size = int(length)
        try:
            with self.app.app_context():
                body, status = africastalking.ussd_hop(
                    parts[3], lambda: form_from_body(stream.read(size) if size else b"")), 200
        except WebhookError as exc:
            log.warning("POST %s -> %d %s", _mask(path), exc.status, exc.reason)
            body, status = exc.reason + "\n", exc.status
        except HTTPException as exc:
            log.warning("POST %s -> %d %s", _mask(path), exc.code, exc.name)
            body, status = f"{exc.name}\n", exc.code or 400
        except Exception:
            if self.app.config["PROPAGATE_EXCEPTIONS"] or self.app.testing or self.app.debug:
                raise
            # As Flask does for an unhandled error: the traceback, then the 500 handler's line.
            self.app.logger.exception("Exception on %s [POST]", _mask(path))
            log.warning("POST %s -> 500 Internal Server Error", _mask(path))
            body, status = "Internal Server Error\n", 500
        data = body.encode()
        start(f"{status} {HTTP_STATUS_CODES.get(status, 'UNKNOWN').upper()}",
              [("Content-Type", _TEXT), ("Content-Length", str(len(data)))])
        return [data]


def _safe_path() -> str:
    """The request path with channel keys (secrets) masked."""
    return _mask(request.path)


def _mask(path: str) -> str:
    parts = path.split("/")
    if len(parts) > 3 and parts[1] == "webhooks":
        parts[3] = parts[3][:4] + "***"
    return "/".join(parts)
