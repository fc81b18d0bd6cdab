"""The naive hop: a tutorial-style Flask USSD handler on the same Redis as the real one.

What a USSD tutorial writes: read the form with `request.form`, GET the session's JSON state,
append the input, then SET the state and RPUSH an event in one pipeline, through redis-py's
ordinary pooled client, and answer a constant screen. No replay cache, no compare-and-set,
no validation, no engine. Served by the same server, with the same settings, as the real app
(`naive_app:create_app()`), and driven by the same replayed sequences as the bare endpoint:
run.py's third target, so that the real hop can be compared with what a naive one costs.
"""

from __future__ import annotations

import json
import os
import time

import redis
from bare_app import SCREEN
from flask import Flask, Response, request


def create_app() -> Flask:
    app = Flask(__name__)
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    # Under the bench's key prefix, so that its clean-up removes these keys too.
    prefix = os.environ.get("CIVICDIAL_REDIS_PREFIX", "cd:") + "naive:"

    @app.post("/webhooks/africastalking/<channel_key>/ussd")
    def ussd(channel_key: str) -> Response:
        session_id = request.form["sessionId"]
        text = request.form.get("text", "")
        key = f"{prefix}st:{session_id}"
        raw = client.get(key)
        state = json.loads(raw) if raw else {"phone": request.form["phoneNumber"],
                                             "inputs": []}
        state["inputs"].append(text.rsplit("*", 1)[-1])
        pipe = client.pipeline()
        pipe.set(key, json.dumps(state), ex=3600)
        pipe.rpush(f"{prefix}events", json.dumps({"session": session_id, "text": text,
                                                  "at": time.time()}))
        pipe.execute()
        return Response(SCREEN, status=200, mimetype="text/plain")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", mimetype="text/plain")

    return app
