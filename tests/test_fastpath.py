"""The USSD fast path (gateway.web.fastpath) answers exactly as the Flask route it stands in
front of: for each case, the same requests go once through the fast path and once straight
to Flask, each on a fresh Redis, and the status lines, headers, bodies, log lines, metrics
and Redis keys must be the same, byte for byte."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import redis
from flask import Flask
from prometheus_client import REGISTRY
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from werkzeug.test import EnvironBuilder

from gateway.config import Settings
from gateway.store.models import Campaign, Channel
from gateway.web.app import create_app
from gateway.web.fastpath import UssdFastPath
from gateway.web.framing import BodyGuard

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
PHONE = "+233241234567"
HUBTEL_CODE = "*713*20#"
ARKESEL_CODE = "*928*311#"


def hop(text: str, session: str = "F1", **fields: str) -> bytes:
    form = {"sessionId": session, "serviceCode": "*920*16#", "phoneNumber": PHONE,
            "networkCode": "62001", "text": text, **fields}
    return urlencode({k: v for k, v in form.items() if v is not None}).encode()


def hubtel(type_: str, sequence: Any, message: str = "", session: str = "H1",
           **changes: Any) -> bytes:
    body = {"Type": type_, "Mobile": PHONE[1:], "SessionId": session, "ServiceCode": "713*20",
            "Message": message, "Operator": "mtn", "Sequence": sequence, "ClientState": "",
            "Platform": "USSD", "ExtraData": {}, **changes}
    return json.dumps(body).encode()


def arkesel(user_data: str, new: bool, **changes: Any) -> bytes:
    return json.dumps({"sessionID": "A1", "userID": "u1", "newSession": new,
                       "msisdn": PHONE[1:], "userData": user_data, "network": "MTN",
                       **changes}).encode()


@dataclass(frozen=True)
class Req:
    body: bytes
    content_type: str | None = FORM
    method: str = "POST"
    key: str | None = None  # None: the provider's channel's own key
    length: int | None = None  # a Content-Length other than the body's
    suffix: str = "/ussd"
    provider: str = "africastalking"


def H(body: bytes, content_type: str | None = JSON, **kw: Any) -> Req:  # noqa: N802
    return Req(body, content_type, provider="hubtel", **kw)


def A(body: bytes, content_type: str | None = JSON, **kw: Any) -> Req:  # noqa: N802
    return Req(body, content_type, provider="arkesel", **kw)


@dataclass(frozen=True)
class Case:
    label: str
    requests: list[Req]
    fast: bool = True  # the fast path answers it itself (else it hands it to Flask)
    counted: bool = True  # a hop in the metrics (a 405 never reaches a view)
    status: list[int] = field(default_factory=list)  # expected, one per request


BIG = 16 * 1024 + 1  # one byte over CIVICDIAL_MAX_BODY_BYTES' default

CASES = [
    Case("first screen", [Req(hop(""))], status=[200]),
    Case("walk, replay, next, stale", [Req(hop("")), Req(hop("1")), Req(hop("1")),
                                        Req(hop("1*1")), Req(hop("2"))],
         status=[200, 200, 200, 200, 409]),
    Case("charset in the content type", [Req(hop(""), f"{FORM}; charset=UTF-8")],
         status=[200]),
    Case("no content type", [Req(hop(""), None)], status=[200]),
    Case("a repeated field keeps its first value",
         [Req(hop("") + b"&text=9&sessionId=other")], status=[200]),
    Case("missing sessionId", [Req(hop("", session=None))], status=[400]),  # type: ignore[arg-type]
    Case("not a phone number", [Req(hop("", phoneNumber="07x"))], status=[400]),
    Case("another channel's service code", [Req(hop("", serviceCode="*1#"))], status=[400]),
    Case("control characters", [Req(hop("1\x01"))], status=[400]),
    Case("not UTF-8", [Req(hop("") + b"&x=\xff\xfe")], status=[400]),
    Case("empty body", [Req(b"")], status=[400]),
    Case("unknown channel", [Req(hop(""), key="nope")], status=[404]),
    Case("body over the limit", [Req(hop("") + b"&pad=" + b"x" * BIG)], status=[413]),
    Case("body over the limit, unknown channel",
         [Req(hop("") + b"&pad=" + b"x" * BIG, key="nope")], status=[404]),
    Case("body shorter than its Content-Length", [Req(hop(""), length=len(hop("")) + 40)],
         status=[400]),
    Case("hubtel: initiation, next, retry, out of sequence",
         [H(hubtel("Initiation", 1, HUBTEL_CODE)), H(hubtel("Response", 2, "1")),
          H(hubtel("Response", 2, "1")), H(hubtel("Response", 5, "1"))],
         status=[200, 200, 200, 409]),
    Case("hubtel: charset in the content type",
         [H(hubtel("Initiation", 1, HUBTEL_CODE), f"{JSON}; charset=utf-8")], status=[200]),
    Case("hubtel: release", [H(hubtel("Initiation", 1, HUBTEL_CODE)),
                             H(hubtel("Release", 2))], status=[200, 200]),
    Case("hubtel: not JSON", [H(b"{'Type': 1")], status=[400]),
    Case("hubtel: not an object", [H(b"[1, 2]")], status=[400]),
    Case("hubtel: NaN", [H(b'{"Type": NaN}')], status=[400]),
    Case("hubtel: unknown Type", [H(hubtel("Payment", 1))], status=[400]),
    Case("hubtel: a field of the wrong type", [H(hubtel("Initiation", "one", HUBTEL_CODE))],
         status=[400]),
    Case("hubtel: body over the limit",
         [H(hubtel("Initiation", 1, HUBTEL_CODE, ClientState="x" * BIG))], status=[413]),
    Case("hubtel: body shorter than its Content-Length",
         [H(hubtel("Initiation", 1, HUBTEL_CODE), length=400)], status=[400]),
    Case("hubtel: unknown channel", [H(hubtel("Initiation", 1, HUBTEL_CODE), key="nope")],
         status=[404]),
    Case("arkesel: new session, next, repeat of the opening",
         [A(arkesel(ARKESEL_CODE, True)), A(arkesel("1", False)),
          A(arkesel(ARKESEL_CODE, True))], status=[200, 200, 409]),
    Case("arkesel: not a phone number", [A(arkesel("", True, msisdn="x"))], status=[400]),
    # Not the fast path's: handed to Flask, which answers as it always did.
    Case("hubtel: a form body", [H(b"Type=Initiation", FORM)], fast=False, status=[415]),
    Case("hubtel: no content type", [H(b"{}", None)], fast=False, status=[415]),
    Case("JSON content type", [Req(b"{}", "application/json")], fast=False, status=[415]),
    Case("GET", [Req(b"", method="GET")], fast=False, counted=False,
         status=[405]),
    Case("another route", [Req(hop(""), suffix="/ussd/events")], fast=False, status=[400]),
]


@dataclass
class Answer:
    status: str
    headers: list[tuple[str, str]]
    body: bytes


def call(wsgi: Callable[..., Iterable[bytes]], path: str, req: Req) -> Answer:
    environ = EnvironBuilder(path=path, method=req.method, input_stream=io.BytesIO(req.body),
                             content_type=req.content_type).get_environ()
    if req.length is not None:  # the builder states the stream's own length
        environ["CONTENT_LENGTH"] = str(req.length)
    if req.content_type is None:
        environ.pop("CONTENT_TYPE", None)
    got: dict[str, Any] = {}

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        got.update(status=status, headers=list(headers))

    body = b"".join(wsgi(environ, start))
    return Answer(got["status"], got["headers"], body)


def metric_samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for m in REGISTRY.collect() if m.name in ("civicdial_replies", "civicdial_hop_seconds")
            for s in m.samples if s.name.endswith(("_total", "_count"))}


def delta(before: dict[Any, float], after: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


@dataclass
class Run:
    answers: list[Answer]
    logs: list[str]
    metrics: dict[Any, float]
    keys: list[bytes]
    flask_calls: int


def run(app: Flask, fast: bool, keys: dict[str, str], requests: list[Req],
        client: redis.Redis | None, caplog: pytest.LogCaptureFixture) -> Run:
    """The requests through BodyGuard and then the fast path, or straight to Flask."""
    guard = app.wsgi_app
    assert isinstance(guard, BodyGuard) and isinstance(guard.app, UssdFastPath)
    flask_wsgi = guard.app.flask
    calls = [0]

    def flask_counted(environ: dict[str, Any], start: Any) -> Iterable[bytes]:
        calls[0] += 1
        return flask_wsgi(environ, start)

    wsgi = BodyGuard(UssdFastPath(app, flask_counted) if fast else flask_counted)
    if client is not None:
        client.flushdb()
    caplog.clear()
    before = metric_samples()
    answers = [call(wsgi, f"/webhooks/{req.provider}/{req.key or keys[req.provider]}"
                          f"{req.suffix}", req) for req in requests]
    logs = [r.getMessage() for r in caplog.records if r.name.startswith("civicdial")]
    keys = sorted(client.keys("*")) if client is not None else []
    return Run(answers, logs, delta(before, metric_samples()), keys, calls[0])


@pytest.fixture
def keys(engine: Engine, channel: Channel) -> dict[str, str]:
    """Each USSD provider's channel key, on the default campaign."""
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign))
        assert campaign is not None
        for provider, key, code in (("hubtel", "hubtel-fast-key", HUBTEL_CODE),
                                    ("arkesel", "arkesel-fast-key", ARKESEL_CODE)):
            db.add(Channel(key=key, provider=provider, kind="ussd", address=code,
                           campaign_id=campaign.id, screen_limit=160, config="{}"))
    return {"africastalking": channel.key, "hubtel": "hubtel-fast-key",
            "arkesel": "arkesel-fast-key"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_fast_path_answers_as_the_flask_route(case: Case, app: Flask, keys: dict[str, str],
                                              redis_client: redis.Redis,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Same answers, log lines, metrics and Redis keys through the fast path and Flask."""
    caplog.set_level(logging.WARNING)
    fast = run(app, True, keys, case.requests, redis_client, caplog)
    flask = run(app, False, keys, case.requests, redis_client, caplog)
    assert [int(a.status.split()[0]) for a in flask.answers] == case.status
    assert fast.answers == flask.answers
    assert fast.logs == flask.logs
    assert fast.metrics == flask.metrics
    assert bool(fast.metrics) == case.counted
    assert fast.keys == flask.keys
    # The fast path took the request itself (else this compares Flask with Flask).
    assert fast.flask_calls == (0 if case.fast else len(case.requests))
    assert flask.flask_calls == len(case.requests)


def test_fast_path_answers_as_the_flask_route_when_redis_is_down(
        settings: Settings, engine: Engine, channel: Channel, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Redis unreachable: the same 503 with Retry-After, log line and metrics."""
    caplog.set_level(logging.WARNING)
    app = create_app(settings.with_(redis_url=f"unix://{tmp_path}/no-redis.socket"))
    try:
        requests = [Req(hop("")), Req(hop("1"))]
        keys = {"africastalking": channel.key}
        fast = run(app, True, keys, requests, None, caplog)
        flask = run(app, False, keys, requests, None, caplog)
    finally:
        app.extensions["civicdial"].engine.dispose()
    assert [a.status for a in flask.answers] == ["503 SERVICE UNAVAILABLE"] * 2
    assert fast.answers == flask.answers
    assert ("Retry-After", "1") in fast.answers[0].headers
    assert fast.logs == flask.logs and "redis unavailable" in fast.logs[0]
    assert fast.metrics == flask.metrics and fast.metrics
    assert fast.flask_calls == 0


def test_fast_path_masks_the_channel_key_in_its_log_lines(
        app: Flask, channel: Channel, redis_client: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    """A refusal's log line names the route with the channel key cut short."""
    caplog.set_level(logging.WARNING)
    fast = run(app, True, {"africastalking": channel.key}, [Req(hop("", phoneNumber="x"))],
               redis_client, caplog)
    assert fast.logs and all(channel.key not in line for line in fast.logs)
    assert f"/webhooks/africastalking/{channel.key[:4]}***/ussd -> 400" in fast.logs[0]
