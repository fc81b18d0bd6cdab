"""The baseline: a bare Flask endpoint at the same path shape, answering a constant screen.

Served by gunicorn exactly like the real app (`bare_app:create_app()`), so the benchmark's
ratio shows what the hop itself costs on top of Flask and gunicorn.
"""

from __future__ import annotations

from flask import Flask, Response

# About as long as a real question screen.
SCREEN = ("CON Do you have difficulty walking or climbing steps?\n1 No difficulty\n"
          "2 Some difficulty\n3 A lot of difficulty\n4 Cannot do at all\n5 Prefer not to say")


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/webhooks/africastalking/<channel_key>/ussd")
    def ussd(channel_key: str) -> Response:
        """Same route shape as the real hop; no parsing, no storage."""
        return Response(SCREEN, status=200, mimetype="text/plain")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", mimetype="text/plain")

    return app
