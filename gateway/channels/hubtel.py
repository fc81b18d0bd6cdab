"""Hubtel Programmable Services: USSD through the Service Interaction URL.

Hubtel posts JSON {Type, Mobile, SessionId, ServiceCode, Message, Operator, Sequence,
ClientState, Platform, ExtraData} (the SDK's ProgrammableServiceRequest). `Message` is the
latest input only (on `initiation`, the string dialled) and `Sequence` numbers the requests
of a session, so the hop tells a retry (same Sequence) from the next input (Sequence + 1)
and refuses anything else. `Type` is case-insensitive: initiation | response | release
(the user ended the session) | timeout (the SDK: our reply came too late; the 2026 docs:
the user cancelled; either way the session is over and the next dial resumes). We answer
{SessionId, Type: response | release, Message, Label, DataType: input | display,
FieldType: text | number}, all of them always (the docs make them mandatory).

Hubtel does not sign callbacks: the channel key in the URL is the secret. It also requires
a Service Fulfilment URL to register a service; a survey takes no payment (we never send
AddToCart), so that URL just answers 200.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, request

from gateway.channels.jsonbody import optional_object, parse_json, text, whole_number
from gateway.channels.ussd import (
    Render,
    Screen,
    SessionEnd,
    UssdInput,
    hop,
    provider_channel,
    same_service,
    services,
    session_ended,
)
from gateway.channels.webhook import WebhookError, log, phone_number, read_body

bp = Blueprint("hubtel", __name__, url_prefix="/webhooks/hubtel")

PROVIDER = "hubtel"
TYPES = ("initiation", "response", "release", "timeout")
ENDS = {
    "release": "the user ended the session",
    "timeout": "Hubtel timeout: our reply came too late (SDK) or the user cancelled (docs)",
}
DEFAULT_LABEL = "Survey"

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _json(body: str) -> Response:
    return Response(body, status=200, mimetype="application/json")


def _renderer(session_id: str, label: str) -> Render:
    def draw(screen: Screen) -> str:
        return _dumps({
            "SessionId": session_id, "Type": "release" if screen.end else "response",
            "Message": screen.text, "Label": label,
            "DataType": "display" if screen.end else "input",
            "FieldType": "number" if screen.numeric else "text",
        })
    return draw


def service_code(code: str) -> str:
    """'713*20' or '*713*20#' (both are seen) as the channel's address is written."""
    return "*" + code.strip("*#") + "#"


@bp.post("/<channel_key>/ussd")
def ussd(channel_key: str) -> Response:
    """The Service Interaction URL: one request in, one screen out."""
    return _json(ussd_reply(channel_key, lambda: parse_json(request)))


def ussd_reply(channel_key: str, read_json: Callable[[], dict[str, Any]]) -> str:
    """The answer's body for one request, or a WebhookError. The body is read
    (`read_json`) after the channel key is checked, as for every route; also called by
    gateway.web.fastpath, without Flask's request layers."""
    ch = provider_channel(PROVIDER, channel_key)
    data = read_json()
    kind = text(data, "Type", max_len=20).lower()
    if kind not in TYPES:
        raise WebhookError(400, f"unknown Type {kind[:20]!r}: expected one of "
                                f"{', '.join(TYPES)}")
    session_id = text(data, "SessionId", max_len=128)
    phone = phone_number({"Mobile": text(data, "Mobile", max_len=32)}, "Mobile")
    sequence = whole_number(data, "Sequence")
    if sequence < 1:  # Hubtel counts a session's requests from 1 (the initiation)
        raise WebhookError(400, "field Sequence must be 1 or more")
    dialled = text(data, "ServiceCode", max_len=40, required=kind not in ENDS)
    message = text(data, "Message", max_len=1000, required=kind == "response",
                   allow_empty=True)
    operator = text(data, "Operator", max_len=40, required=False)
    for optional in ("ClientState", "Platform"):
        text(data, optional, max_len=1000, required=False)
    optional_object(data, "ExtraData")
    label = ch.config.get("label")
    draw = _renderer(session_id, label if isinstance(label, str) and label else DEFAULT_LABEL)
    if dialled and not same_service(service_code(dialled), ch.address):
        raise WebhookError(400, f"ServiceCode {dialled} is not this channel's {ch.address}")
    if kind in ENDS:
        session_ended(ch, SessionEnd(session_id, phone, kind, dropped=True, network=operator,
                                     hops=sequence, error=ENDS[kind]))
        # Hubtel ignores an answer to these; it still gets a well-formed one.
        return draw(Screen("", end=True))
    return hop(ch, UssdInput(session_id, phone, message, opens=kind == "initiation",
                             sequence=sequence), draw)


@bp.route("/<channel_key>/ussd/fulfilment", methods=["GET", "POST"])
def fulfilment(channel_key: str) -> Response:
    """The Service Fulfilment URL Hubtel requires: answers 200. Hubtel calls it only after
    a payment, and a survey never asks for one, so a call is worth a log line."""
    ch = provider_channel(PROVIDER, channel_key)
    if request.method == "POST":
        size = len(read_body(request, services().settings.max_body_bytes))
        log.warning("hubtel channel %s: fulfilment callback (%d bytes) ignored: a survey "
                    "takes no payment", ch.id, size)
    return Response("OK", status=200, mimetype="text/plain")
