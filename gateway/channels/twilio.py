"""Twilio Programmable SMS: inbound messages, status callbacks, outbound send.

Every request must carry a valid X-Twilio-Signature, computed by Twilio over the exact
public URL it called plus the POST parameters (the SDK's RequestValidator). Behind a
reverse proxy, set CIVICDIAL_PUBLIC_BASE_URL (or CIVICDIAL_TRUST_PROXY=1 for
X-Forwarded-*) so that the URL we check is the one Twilio signed.

Replies go inline as TwiML by default (channel config "reply": "inline"), or through
the outbound queue ("reply": "queue") when messages must be tracked with status callbacks.
Twilio handles STOP/UNSUBSCRIBE/... itself (Advanced Opt-Out) and tells us with
OptOutType=STOP: we record the opt-out and send nothing (Twilio would refuse it anyway).
"""

from __future__ import annotations

from typing import Any

import requests
from flask import Blueprint, Response, current_app, request
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.request_validator import RequestValidator, get_signature_algorithm
from twilio.rest import Client
from twilio.twiml.messaging_response import MessagingResponse
from werkzeug.datastructures import MultiDict

from gateway.channels.sending import Failure, SendError, Sent, classify_http
from gateway.channels.sms import Inbound, converse, delivery_event
from gateway.channels.webhook import WebhookError, bound_channel, field, log, parse_pairs
from gateway.phones import BadPhoneNumber, to_e164
from gateway.store.registry import ChannelInfo

bp = Blueprint("twilio", __name__, url_prefix="/webhooks/twilio")

SIGNATURE_HEADER = "X-Twilio-Signature"
SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"

# MessageStatus -> our message status: every status Twilio documents for an outbound
# message (receiving/received are inbound only).
DELIVERY_STATUS = {
    "accepted": "sent", "scheduled": "sent", "queued": "sent", "sending": "sent",
    "sent": "sent", "delivered": "delivered", "read": "delivered",
    "partially_delivered": "undelivered", "undelivered": "undelivered",
    "failed": "failed", "canceled": "failed",
}


def _services() -> Any:
    return current_app.extensions["civicdial"]


def _channel(channel_key: str) -> ChannelInfo:
    return bound_channel(_services().registry, "twilio", channel_key, "sms")


def _signed_url() -> str:
    base = _services().settings.public_base_url
    if not base:
        return request.url
    query = request.query_string.decode("latin-1")
    return base.rstrip("/") + request.path + (f"?{query}" if query else "")


def _verified_form(ch: ChannelInfo) -> dict[str, str]:
    """The POST parameters, once the signature over them checks out (else 403)."""
    pairs = parse_pairs(request)
    token = ch.config.get("auth_token")
    if not isinstance(token, str) or not token:
        raise WebhookError(403, "channel has no auth_token configured; cannot verify")
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not signature:
        raise WebhookError(403, "missing X-Twilio-Signature")
    algorithm = get_signature_algorithm(request.headers.get(SETTINGS_HEADER))
    if not RequestValidator(token).validate(_signed_url(), MultiDict(pairs), signature,
                                            algorithm=algorithm):
        raise WebhookError(403, "bad X-Twilio-Signature")
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form


def _twiml(text: str | None) -> Response:
    twiml = MessagingResponse()
    if text:
        twiml.message(text)
    return Response(str(twiml), status=200, mimetype="text/xml")


@bp.post("/<channel_key>/sms")
def sms(channel_key: str) -> Response:
    """An inbound SMS: one input to the interview; reply inline (TwiML) or queued."""
    ch = _channel(channel_key)
    form = _verified_form(ch)
    sid = field(form, "MessageSid", max_len=64)
    try:
        # Twilio carried this message: a real number, even one phonenumbers does not
        # know yet.
        phone = to_e164(field(form, "From", max_len=32),
                        _services().settings.default_region, require_valid=False)
    except BadPhoneNumber as exc:
        raise WebhookError(400, f"From: {exc}") from None
    body = form.get("Body", "")
    by_queue = ch.config.get("reply", "inline") == "queue"
    outcome = converse(_services(), ch, Inbound(phone, body, sid), reply_by_queue=by_queue,
                       provider_stop=form.get("OptOutType", "").upper() == "STOP")
    return _twiml(None if by_queue else outcome.reply)


@bp.post("/<channel_key>/status")
def status(channel_key: str) -> Response:
    """Status callback for a message we sent: recorded against the message."""
    ch = _channel(channel_key)
    form = _verified_form(ch)
    sid = field(form, "MessageSid", max_len=64)
    state = field(form, "MessageStatus", max_len=30)
    if state not in DELIVERY_STATUS:
        # Accepted, not refused: Twilio would retry, and the message keeps its status.
        log.warning("twilio %s: unknown MessageStatus %r for %s; ignored", ch.id, state, sid)
        return Response("", status=200)
    _services().store.append([delivery_event(
        ch.id, sid, DELIVERY_STATUS[state], field(form, "ErrorCode", max_len=20, required=False))])
    return Response("", status=204)


def send_sms(config: dict[str, Any], to: str, body: str) -> Sent:
    """Send one SMS through Twilio's REST API (the SDK's Client.messages.create)."""
    sid, token = config.get("account_sid"), config.get("auth_token")
    sender = config.get("messaging_service_sid") or config.get("from")
    if not sid or not token or not sender:
        raise SendError(Failure.CONFIG, "channel config needs account_sid, auth_token and "
                                        "from (or messaging_service_sid)")
    client = Client(sid, token)
    if config.get("base_url"):
        client.api.base_url = str(config["base_url"]).rstrip("/")
    kwargs: dict[str, Any] = {"to": to, "body": body}
    if config.get("messaging_service_sid"):
        kwargs["messaging_service_sid"] = config["messaging_service_sid"]
    else:
        kwargs["from_"] = config["from"]
    if config.get("status_callback"):
        kwargs["status_callback"] = config["status_callback"]
    try:
        message = client.messages.create(**kwargs)
    except TwilioRestException as exc:
        raise classify_http(exc.status, f"{exc.code} {exc.msg}"[:300]) from None
    except requests.ReadTimeout:
        # The request reached Twilio; it may have queued the SMS. Retrying could duplicate.
        raise SendError(Failure.BAD_RESPONSE, "timed out waiting for Twilio's answer; the "
                                              "message may have been sent") from None
    except (TwilioException, requests.RequestException) as exc:  # never reached Twilio
        raise SendError(Failure.TEMPORARY, f"{type(exc).__name__}: {exc}"[:300]) from None
    if not message.sid:
        raise SendError(Failure.BAD_RESPONSE, "no sid in Twilio's answer")
    return Sent(provider_id=message.sid)
