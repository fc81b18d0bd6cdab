"""Arkesel USSD: one module and a payload table over the shared hop (gateway.channels.ussd).

Arkesel posts JSON {sessionID, userID, newSession, msisdn, userData, network}: `userData`
is the latest input only and `newSession` is true on the first request of a session. We
answer {sessionID, userID, msisdn, continueSession, message}, echoing what it sent.

Arkesel numbers no request and sends no history, so a repeated request cannot be told
from the same key pressed again: only a repeat of the opening request (newSession true,
same sessionID) gets the stored reply; any other request is the next input. Arkesel does
not sign callbacks: the channel key in the URL is the secret.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, request

from gateway.channels.jsonbody import boolean, parse_json, text
from gateway.channels.ussd import Render, Screen, UssdInput, hop, provider_channel
from gateway.channels.webhook import phone_number

bp = Blueprint("arkesel", __name__, url_prefix="/webhooks/arkesel")

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _renderer(session_id: str, user_id: str, msisdn: str) -> Render:
    def draw(screen: Screen) -> str:
        return _dumps({"sessionID": session_id, "userID": user_id, "msisdn": msisdn,
                       "continueSession": not screen.end, "message": screen.text})
    return draw


@bp.post("/<channel_key>/ussd")
def ussd(channel_key: str) -> Response:
    """A USSD hop: one input in, one screen out."""
    return Response(ussd_reply(channel_key, lambda: parse_json(request)), status=200,
                    mimetype="application/json")


def ussd_reply(channel_key: str, read_json: Callable[[], dict[str, Any]]) -> str:
    """The answer's body for one request, or a WebhookError (the body read after the
    channel key is checked); also called by gateway.web.fastpath."""
    ch = provider_channel("arkesel", channel_key)
    data = read_json()
    session_id = text(data, "sessionID", max_len=128)
    user_id = text(data, "userID", max_len=128)
    opens = boolean(data, "newSession")
    msisdn = text(data, "msisdn", max_len=32)
    phone = phone_number({"msisdn": msisdn}, "msisdn")
    user_data = text(data, "userData", max_len=1000, allow_empty=True)
    text(data, "network", max_len=40, required=False)
    return hop(ch, UssdInput(session_id, phone, user_data, opens=opens),
               _renderer(session_id, user_id, msisdn))
