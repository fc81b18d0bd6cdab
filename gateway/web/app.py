"""Flask app factory: the web process that answers provider webhooks."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import redis
from flask import Flask, Response, request
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from gateway.channels import africastalking, android, arkesel, hubtel, twilio
from gateway.channels.webhook import WebhookError
from gateway.config import Settings, load_settings
from gateway.logformat import configure_logging
from gateway.store.crypto import NumberBox
from gateway.store.db import make_engine
from gateway.store.redis_conn import connect
from gateway.store.registry import Registry
from gateway.store.sessions import HopLimits, SessionStore
from gateway.web import api, console, dashboard, metrics, refusals, sync
from gateway.web.fastpath import UssdFastPath
from gateway.web.framing import BodyGuard

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
    configure_logging(settings)
    app = Flask(__name__)
    # Webhooks are tiny; only the admin API's uploads may be large (checked per route).
    app.config["MAX_CONTENT_LENGTH"] = api.MAX_UPLOAD
    app.config["MAX_FORM_MEMORY_SIZE"] = api.MAX_UPLOAD
    engine = make_engine(settings)
    client = connect(settings)
    app.extensions["civicdial"] = Services(
        settings=settings, engine=engine, redis=client,
        store=SessionStore(client, settings.redis_prefix, HopLimits(
            settings.limit_window_seconds, settings.limit_per_respondent,
            settings.limit_per_channel)),
        registry=Registry(engine, settings.registry_refresh_seconds),
        box=NumberBox(settings.encryption_key),
    )
    app.register_blueprint(africastalking.bp)
    app.register_blueprint(hubtel.bp)
    app.register_blueprint(arkesel.bp)
    app.register_blueprint(twilio.bp)
    app.register_blueprint(android.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(dashboard.bp)
    app.register_blueprint(console.bp)
    app.register_blueprint(sync.bp)
    # The USSD hops skip Flask's request layers (gateway.web.fastpath),
    # answering exactly as its Flask route does. Around both, a body the server cannot
    # decode, or shorter than announced: 400, never a 500 or a truncated form processed
    # as if complete.
    app.wsgi_app = BodyGuard(UssdFastPath(app, app.wsgi_app))  # type: ignore[method-assign]
    app.register_blueprint(metrics.bp)
    metrics.instrument(app)
    if settings.trust_proxy:
        # Behind a reverse proxy: request.url must be the public URL a provider signed.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_port=1)  # type: ignore[method-assign]

    @app.errorhandler(WebhookError)
    def _refused(exc: WebhookError) -> Response:
        return refusals.refused(request.method, request.path, exc).response()

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return refusals.http_error(request.method, request.path, exc).response()

    def _unavailable(exc: Exception) -> Response:
        return refusals.unavailable(request.method, request.path, exc).response()

    for kind in refusals.UNAVAILABLE:
        app.register_error_handler(kind, _unavailable)

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
