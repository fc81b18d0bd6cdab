"""The baseline: bare Flask endpoints at the real paths' shapes, answering constants.

Served by gunicorn exactly like the real app (`bare_app:create_app()`), so the benchmarks'
ratios show what a hop itself costs on top of Flask and gunicorn: the USSD hop (run.py;
Hubtel's shape too, bench_ussd_providers.py), and the inbound SMS hops of Twilio (a
constant TwiML reply) and Africa's Talking (`OK`; bench_sms.py).
"""

from __future__ import annotations

import json

from flask import Flask, Response

# About as long as a real question screen.
SCREEN = ("CON Do you have difficulty walking or climbing steps?\n1 No difficulty\n"
          "2 Some difficulty\n3 A lot of difficulty\n4 Cannot do at all\n5 Prefer not to say")

# The same screen as Hubtel's JSON answer (all six fields, as the real hop sends them).
HUBTEL = json.dumps({"SessionId": "8d44f5a3c0a14e8f9b8e2f7d6c5b4a39", "Type": "response",
                     "Message": SCREEN[4:], "Label": "Survey", "DataType": "input",
                     "FieldType": "number"}, separators=(",", ":"))

# About as long as a real SMS question, as TwiML.
TWIML = ('<?xml version="1.0" encoding="UTF-8"?><Response><Message>Expenses for the health '
         "care were affordable to you/your household.\n1 Strongly agree\n2 Agree\n"
         "3 Disagree\n4 Strongly disagree\n5 Don't know/skip</Message></Response>")


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/webhooks/africastalking/<channel_key>/ussd")
    def ussd(channel_key: str) -> Response:
        """Same route shape as the real hop; no parsing, no storage."""
        return Response(SCREEN, status=200, mimetype="text/plain")

    @app.post("/webhooks/hubtel/<channel_key>/ussd")
    def hubtel_ussd(channel_key: str) -> Response:
        """Hubtel's route shape, a constant JSON screen; no parsing, no storage."""
        return Response(HUBTEL, status=200, mimetype="application/json")

    @app.post("/webhooks/twilio/<channel_key>/sms")
    def twilio_sms(channel_key: str) -> Response:
        """A constant inline TwiML reply; no signature check, no parsing, no storage."""
        return Response(TWIML, status=200, mimetype="text/xml")

    @app.post("/webhooks/africastalking/<channel_key>/sms")
    def africastalking_sms(channel_key: str) -> Response:
        """Africa's Talking expects any 200; the real reply goes out by the queue."""
        return Response("OK", status=200, mimetype="text/plain")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", mimetype="text/plain")

    return app
