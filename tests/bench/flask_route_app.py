"""The real app with its USSD fast path (gateway.web.fastpath) taken out, so that Flask's
route answers every hop: `run.py --flask-route` serves it beside the real app, to show in
the same run what the fast path saves."""

from __future__ import annotations

from flask import Flask

from gateway.web.app import create_app as create_real_app
from gateway.web.fastpath import UssdFastPath
from gateway.web.framing import BodyGuard


def create_app() -> Flask:
    app = create_real_app()
    guard = app.wsgi_app
    if not (isinstance(guard, BodyGuard) and isinstance(guard.app, UssdFastPath)):
        raise RuntimeError("the app's WSGI layers are not BodyGuard(UssdFastPath(...))")
    app.wsgi_app = BodyGuard(guard.app.flask)  # type: ignore[method-assign]
    return app
