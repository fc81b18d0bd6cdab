"""Flask app factory: the web process that answers provider webhooks."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from flask import Flask, Response, request
from sqlalchemy import Engine
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from gateway.channels import africastalking, arkesel, hubtel, twilio
from gateway.channels.webhook import WebhookError
from gateway.config import Settings, load_settings
from gateway.store.crypto import NumberBox
from gateway.store.db import make_engine
from gateway.store.redis_conn import connect
from gateway.store.registry import Registry
from gateway.store.sessions import SessionStore
from gateway.web import api, console, dashboard

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
    app.register_blueprint(console.bp)
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

    return app


def _safe_path() -> str:
    """The request path with channel keys (secrets) masked."""
    parts = request.path.split("/")
    if len(parts) > 3 and parts[1] == "webhooks":
        parts[3] = parts[3][:4] + "***"
    return "/".join(parts)
