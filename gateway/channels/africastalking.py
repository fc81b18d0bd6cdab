"""Africa's Talking: USSD (session callback, end-of-session notification), SMS, airtime.

USSD: AT posts form fields sessionId, serviceCode, phoneNumber, networkCode and text, where
text is every input of the session so far joined by '*' ('' on the first hop), and
expects text/plain 'CON ...' (wait for input) or 'END ...' (close). This module only
parses that form and renders the screen; the hop itself (gateway.channels.ussd) is shared
with the other USSD providers. AT does not sign callbacks: the channel key in the URL is
the secret. AT retries a hop it got no answer for; a retried hop (same sessionId and
text) gets the stored reply and changes nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

import requests
from africastalking.Airtime import AirtimeService
from africastalking.Service import AfricasTalkingException, validate_phone
from africastalking.SMS import SMSService
from flask import Blueprint, Response, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.channels.sending import Failure, SendError, Sent, classify_http
from gateway.channels.sms import Inbound, converse, delivery_event
from gateway.channels.ussd import (
    Screen,
    SessionEnd,
    UssdInput,
    hop,
    provider_channel,
    same_service,
    services,
    session_ended,
)
from gateway.channels.webhook import (
    WebhookError,
    field,
    log,
    parse_form,
    parse_form_or_json,
    phone_number,
)
from gateway.money import minor_to_text
from gateway.phones import BadPhoneNumber, to_e164
from gateway.store.models import AirtimePayment
from gateway.store.registry import ChannelInfo
from gateway.store.sessions import mask_phone, pseudonym

bp = Blueprint("africastalking", __name__, url_prefix="/webhooks/africastalking")

END_STATUSES = {"Success", "Incomplete", "Failed"}


def _services() -> Any:
    return services()


def _channel(channel_key: str, kind: str | None = "ussd") -> ChannelInfo:
    """The channel a URL names; kind None: any of this provider's channels."""
    return provider_channel("africastalking", channel_key, kind)


def _text(body: str) -> Response:
    return Response(body, status=200, mimetype="text/plain")


def _render(screen: Screen) -> str:
    return ("END " if screen.end else "CON ") + screen.text


@bp.post("/<channel_key>/ussd")
def ussd(channel_key: str) -> Response:
    """A USSD hop: one input in, one screen out."""
    return _text(ussd_hop(channel_key, lambda: parse_form(request)))


def ussd_hop(channel_key: str, read_form: Callable[[], dict[str, str]]) -> str:
    """The reply screen for one request, or a WebhookError. The form is read (`read_form`)
    after the channel key is checked, as for every route."""
    ch = _channel(channel_key)
    form = read_form()
    session_id = field(form, "sessionId", max_len=128)
    phone = phone_number(form, "phoneNumber")
    service_code = field(form, "serviceCode", max_len=40)
    text = field(form, "text", max_len=1000, allow_empty=True)
    field(form, "networkCode", max_len=10, required=False)
    # AT sends every input so far as `text`, so the hop can tell a retry from the next input.
    return hop(ch, UssdInput(session_id, phone, text, cumulative=True,
                             service_code=service_code), _render)


@bp.post("/<channel_key>/ussd/events")
def ussd_events(channel_key: str) -> Response:
    """End-of-session notification: recorded for the coordinator's view."""
    ch = _channel(channel_key)
    form = parse_form(request)
    session_id = field(form, "sessionId", max_len=128)
    status = field(form, "status", max_len=40)
    if status not in END_STATUSES:
        raise WebhookError(400, f"status must be one of {', '.join(sorted(END_STATUSES))}")
    phone = phone_number(form, "phoneNumber") if form.get("phoneNumber") else ""
    code = field(form, "serviceCode", max_len=40, required=False)
    if code and not same_service(code, ch.address):
        raise WebhookError(400, f"serviceCode {code} is not this channel's {ch.address}")
    session_ended(ch, SessionEnd(
        session_id, phone, status, dropped=status != "Success",
        network=field(form, "networkCode", max_len=10, required=False),
        duration_ms=_count(form, "durationInMillis"),
        hops=_count(form, "hopsCount"),
        cost=field(form, "cost", max_len=40, required=False),
        error=field(form, "errorMessage", max_len=2000, required=False)))
    return _text("OK")


@bp.post("/<channel_key>/sms")
def sms(channel_key: str) -> Response:
    """An inbound SMS: one input to the interview; the reply goes out through the queue."""
    ch = _channel(channel_key, "sms")
    form = parse_form(request)
    message_id = field(form, "id", max_len=100)
    try:
        # The provider carried this message: a real number, even one phonenumbers
        # does not know yet.
        phone = to_e164(field(form, "from", max_len=32), _services().settings.default_region,
                        require_valid=False)
    except BadPhoneNumber as exc:
        raise WebhookError(400, f"from: {exc}") from None
    for optional in ("to", "date", "linkId", "networkCode"):
        field(form, optional, max_len=100, required=False)
    converse(_services(), ch, Inbound(phone, form.get("text", ""), message_id),
             reply_by_queue=True)
    return _text("OK")


@bp.post("/<channel_key>/sms/delivery")
def sms_delivery(channel_key: str) -> Response:
    """Delivery report for a message we sent."""
    ch = _channel(channel_key, "sms")
    form = parse_form(request)
    message_id = field(form, "id", max_len=100)
    status = field(form, "status", max_len=30)
    if status not in DELIVERY_STATUS:
        # Accepted, not refused: a 4xx makes Africa's Talking retry the report for days,
        # and a status we cannot place must not move the message anywhere.
        log.warning("africastalking %s: unknown delivery status %r for message %s; ignored",
                    ch.id, status, message_id)
        return _text("OK")
    _services().store.append([delivery_event(
        ch.id, message_id, DELIVERY_STATUS[status],
        field(form, "failureReason", max_len=100, required=False))])
    return _text("OK")


@bp.post("/<channel_key>/airtime/status")
def airtime_status(channel_key: str) -> Response:
    """Airtime status callback: whether a thank-you payment reached the phone."""
    _channel(channel_key, None)
    form = parse_form_or_json(request)
    request_id = field(form, "requestId", max_len=100)
    status = field(form, "status", max_len=30)
    if status not in AIRTIME_STATUS:
        raise WebhookError(400, f"status must be one of {', '.join(AIRTIME_STATUS)}")
    field(form, "phoneNumber", max_len=30, required=False)
    _services().store.append([{
        "id": f"airtime:{request_id}:{status}", "k": "airtime_status", "rid": request_id,
        "st": AIRTIME_STATUS[status],
        "err": field(form, "description", max_len=300, required=False)
        if status != "Success" else "",
    }])
    return _text("OK")


@bp.post("/<channel_key>/airtime/validation")
def airtime_validation(channel_key: str) -> Response:
    """Africa's Talking asks, before paying, whether we sent this airtime request. Only a
    payment of ours in flight to that number, for that amount, is validated: a leaked API
    key pays nobody."""
    _channel(channel_key, None)
    form = parse_form_or_json(request)
    transaction = field(form, "transactionId", max_len=100)
    phone = phone_number(form, "phoneNumber")
    currency = field(form, "currencyCode", max_len=3)
    try:
        amount = Decimal(field(form, "amount", max_len=20))
    except InvalidOperation:
        raise WebhookError(400, "amount is not a number") from None
    # Infinity, NaN and amounts no payment column holds (1e18, 1e999999) are refused
    # here: int() of Infinity raises OverflowError, and SQL cannot compare a huge int.
    if not amount.is_finite() or not 0 <= amount <= MAX_AMOUNT:
        raise WebhookError(400, f"amount must be a number from 0 to {MAX_AMOUNT}")
    minor = int((amount * 100).to_integral_value())
    services = _services()
    respondent = pseudonym(services.settings.pseudonym_key, phone)
    with Session(services.engine) as db:
        ours = db.scalar(select(AirtimePayment.id).where(
            AirtimePayment.respondent == respondent, AirtimePayment.status == "sending",
            AirtimePayment.currency == currency, AirtimePayment.amount == minor).limit(1))
    if ours is None:
        log.warning("airtime validation refused: %s %s %s to %s is not a payment in flight",
                    transaction, currency, amount, mask_phone(phone))
    return Response(json.dumps({"status": "Validated" if ours else "Failed"}),
                    mimetype="application/json")


# AirtimePayment.amount is SQL INTEGER minor units.
MAX_AMOUNT = Decimal(2**31 - 1) / 100
# The columns are SQL INTEGER: a bigger count would fail in the worker, not here.
MAX_COUNT = 2**31 - 1
_WHOLE = re.compile(r"^[+-]?\d+$")


def _count(form: dict[str, str], name: str) -> int | None:
    """A whole number from 0 to MAX_COUNT, or None if absent or not a number (recorded as
    unknown, as before); a number out of that range is refused (400) before it reaches
    the stream."""
    raw = field(form, name, max_len=20, required=False).strip()
    if not _WHOLE.match(raw):
        return None
    value = int(raw)
    if not 0 <= value <= MAX_COUNT:
        raise WebhookError(400, f"field {name} must be a whole number from 0 to {MAX_COUNT}")
    return value


# -- outbound SMS ---------------------------------------------------------------------

# Delivery report status -> our message status: every status Africa's Talking documents,
# and the ones it sends without documenting them (courier maps Expired to failed too).
DELIVERY_STATUS = {
    "Sent": "sent", "Submitted": "sent", "Buffered": "sent", "Queued": "sent",
    "Success": "delivered", "Failed": "failed", "Rejected": "rejected",
    "Expired": "failed", "AbsentSubscriber": "failed",
}
# Per-recipient statusCode in the send response.
ACCEPTED_CODES = {100, 101, 102}
RETRY_CODES = {500, 501, 502}


def _recording(service: Any, base_url: str | None, path: str) -> None:
    """Point an SDK service at a configurable base URL (a local stand-in, a proxy) and
    make it remember the HTTP status of its last request (its exception has only the
    body)."""
    if base_url:
        service._baseUrl = base_url.rstrip("/") + path
    service.last_status = 0

    def post(url, headers, data, params, callback=None, timeout=(3.05, 9.05)):  # type: ignore[no-untyped-def]
        res = requests.post(url=url, headers=headers, params=params, data=data,
                            timeout=timeout)
        service.last_status = res.status_code
        return res

    # The SDK calls this name-mangled static method through self.
    service._Service__make_post_request = post


def _call(service: Any, send: Callable[[], Any]) -> dict[str, Any]:
    """Run one SDK call; every failure becomes a SendError saying whether to retry."""
    try:
        resp = send()
    except ValueError as exc:  # the SDK's own checks (number, amount)
        raise SendError(Failure.REJECTED, str(exc)) from None
    except AfricasTalkingException as exc:
        raise classify_http(service.last_status, str(exc)[:300]) from None
    except requests.ReadTimeout:
        # The request reached AT, which may have acted on it: retrying could do it twice.
        raise SendError(Failure.BAD_RESPONSE, "timed out waiting for Africa's Talking's "
                                              "answer; it may have been done") from None
    except requests.RequestException as exc:  # never reached AT: safe to retry
        raise SendError(Failure.TEMPORARY, f"{type(exc).__name__}: {exc}"[:300]) from None
    if isinstance(resp, str):  # the SDK returns text unless content-type is exactly JSON
        try:
            resp = json.loads(resp)
        except ValueError:
            raise SendError(Failure.BAD_RESPONSE, resp[:300]) from None
    if not isinstance(resp, dict):
        raise SendError(Failure.BAD_RESPONSE, str(resp)[:300])
    return resp


def _credentials(config: dict[str, Any]) -> tuple[str, str]:
    username, api_key = config.get("username"), config.get("api_key")
    if not isinstance(username, str) or not isinstance(api_key, str):
        raise SendError(Failure.CONFIG, "channel config needs username and api_key")
    return username, api_key


def send_sms(config: dict[str, Any], to: str, body: str) -> Sent:
    """Send one SMS through Africa's Talking (SDK `SMS.send`)."""
    service = SMSService(*_credentials(config))
    _recording(service, config.get("base_url"), "/version1")
    resp = _call(service, lambda: service.send(
        body, [to], sender_id=config.get("sender_id") or None,
        timeout=(3.05, float(config.get("timeout", 10)))))
    try:
        recipient = resp["SMSMessageData"]["Recipients"][0]
        code = int(recipient["statusCode"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise SendError(Failure.BAD_RESPONSE, json.dumps(resp)[:300]) from None
    outcome = _recipient_outcome(recipient, code)
    if isinstance(outcome, SendError):
        raise outcome
    return outcome


def _recipient_outcome(recipient: dict[str, Any], code: int) -> Sent | SendError:
    """One recipient's entry of a send response: sent, or why not (retry or not)."""
    if code in ACCEPTED_CODES:
        return Sent(provider_id=str(recipient.get("messageId", "")))
    detail = f"{code} {recipient.get('status', '')}"
    if code in RETRY_CODES:
        return SendError(Failure.TEMPORARY, detail)
    return SendError(Failure.REJECTED, detail)


def send_sms_bulk(config: dict[str, Any], recipients: list[str],
                  body: str) -> list[Sent | SendError]:
    """Send one text to many numbers in one SDK `SMS.send` call (Africa's Talking's bulk
    mode), and return each recipient's outcome, in order: its message id, or a SendError
    saying whether that recipient alone may be retried. A failure of the whole call (no
    answer, 5xx, 429, 401) raises a SendError, which applies to every recipient. A number
    the SDK would refuse (it refuses the whole list for one) is rejected on its own."""
    outcomes: list[Sent | SendError | None] = [
        None if validate_phone(to) else SendError(Failure.REJECTED, f"invalid number {to}")
        for to in recipients]
    valid = [to for to, o in zip(recipients, outcomes, strict=True) if o is None]
    if valid:
        service = SMSService(*_credentials(config))
        _recording(service, config.get("base_url"), "/version1")
        resp = _call(service, lambda: service.send(
            body, valid, sender_id=config.get("sender_id") or None,
            timeout=(3.05, float(config.get("timeout", 10)))))
        try:
            entries = resp["SMSMessageData"]["Recipients"]
            by_number = {str(e["number"]): e for e in entries}
        except (KeyError, TypeError):
            raise SendError(Failure.BAD_RESPONSE, json.dumps(resp)[:300]) from None
        for i, to in enumerate(recipients):
            if outcomes[i] is not None:
                continue
            entry = by_number.get(to)
            try:
                outcomes[i] = _recipient_outcome(entry, int(entry["statusCode"])) \
                    if entry is not None else SendError(
                        Failure.BAD_RESPONSE, "not in Africa's Talking's answer; it may "
                                              "have been sent")
            except (KeyError, TypeError, ValueError):
                outcomes[i] = SendError(Failure.BAD_RESPONSE, json.dumps(entry)[:300])
    return [o if o is not None else SendError(Failure.BAD_RESPONSE, "no outcome")
            for o in outcomes]


# -- airtime ----------------------------------------------------------------------------

# Airtime status callback -> our payment status.
AIRTIME_STATUS = {"Success": "success", "Failed": "failed"}


def send_airtime(config: dict[str, Any], to: str, currency: str, amount_minor: int,
                 idempotency_key: str) -> Sent:
    """Send airtime to one number (SDK `Airtime.send`). The idempotency key makes Africa's
    Talking ignore a repeat of the same request, our second guard against paying twice."""
    service = AirtimeService(*_credentials(config))
    _recording(service, config.get("base_url"), "/version1/airtime")
    amount = minor_to_text(amount_minor)
    resp = _call(service, lambda: service.send(
        phone_number=to, amount=amount, currency_code=currency,
        idempotency_key=idempotency_key, timeout=(3.05, float(config.get("timeout", 10)))))
    try:
        entry = resp["responses"][0]
        status = str(entry["status"])
    except (KeyError, IndexError, TypeError):
        # No per-number entry: the request as a whole was refused (balance, currency).
        raise SendError(Failure.REJECTED, str(resp.get("errorMessage", resp))[:300]) from None
    if status in ("Sent", "Success"):
        return Sent(provider_id=str(entry.get("requestId", "")),
                    status="success" if status == "Success" else "sent")
    raise SendError(Failure.REJECTED, f"{status}: {entry.get('errorMessage', '')}"[:300])
