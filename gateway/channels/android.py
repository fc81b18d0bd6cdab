"""SMS Gateway for Android (capcom6, "SMSGate"): a phone with a local SIM as the SMS
channel of a node with no internet (local-server mode).

The phone POSTs one JSON envelope per event to `/webhooks/android/<key>/events`:
`{"id", "webhookId", "event", "deviceId", "payload"}` (Gson output: null fields dropped,
`=` escaped as `\\u003d`), signed with `X-Signature` = lowercase hex HMAC-SHA256(signing
key, raw body + `X-Timestamp`). We check the signature over the raw bytes, never over
re-serialised JSON, and refuse a timestamp more than 300 s from our clock (401, nothing
changes).

The app retries any non-2xx (16 attempts over about 45 h, same envelope id) and gives the
same SMS a fresh envelope id whenever it emits it again (another webhook, an inbox export
on old versions), while its `messageId` is a 32-bit hash. So an inbound SMS is
deduplicated on the envelope id first, then on (device, sender, receivedAt, sha256 of the
text): the second is the conversation's message id, so a re-emission gets the stored
reply and changes nothing. We answer 2xx only once the message is committed to Redis
(the hop's one Lua commit), and fast: the app gives up on a socket silent for 5 s.

Replies cannot go inline (the app ignores the response body): they go through the
outbound queue and the phone's REST API. We give each message our own id, so a send
retried after a timeout, or after the worker died mid-call, gets 409 ("already have it")
and counts as sent: no message of this channel is ever left `unknown`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from android_sms_gateway import client as asg_client
from android_sms_gateway import domain as asg_domain
from android_sms_gateway import errors as asg_errors
from android_sms_gateway.http import RequestsHttpClient
from flask import Blueprint, Response, current_app, request

from gateway.channels.sending import Failure, SendError, Sent, classify_http
from gateway.channels.sms import Inbound, converse, delivery_event
from gateway.channels.webhook import (
    WebhookError,
    bound_channel,
    json_from_body,
    log,
    read_body,
)
from gateway.phones import BadPhoneNumber, to_e164
from gateway.store.registry import ChannelInfo
from gateway.store.sessions import mask_phone

bp = Blueprint("android", __name__, url_prefix="/webhooks/android")

SIGNATURE_HEADER = "X-Signature"
TIMESTAMP_HEADER = "X-Timestamp"
# The app signs each attempt afresh, so a tight window costs nothing but needs the
# phone's clock and ours to agree (`civicdial channels check` compares them).
SIGNATURE_WINDOW = 300

# The webhooks a channel registers on the phone, and what each becomes.
EVENTS = ("sms:received", "sms:sent", "sms:delivered", "sms:failed")
DELIVERY_STATUS = {"sms:sent": "sent", "sms:delivered": "delivered", "sms:failed": "failed",
                   "sms:cancelled": "failed"}
# Events of the app's enum we answer 200 and otherwise ignore (a 4xx would only make the
# phone retry them for two days).
IGNORED_EVENTS = {"system:ping", "app:started", "sms:data-received", "mms:received",
                  "mms:downloaded"}

# SMS Gateway for Android's priority is a signed byte: 100..127 is "expedited" (skips the
# phone's own limits, delays and working hours); 128+ wraps negative. Replies to a person
# waiting go expedited, bulk messages at 0 behind them.
PRIORITY_EXPEDITED = 100
DEFAULT_RATE_PER_HOUR = 100  # carriers allow roughly 30-200 SMS/hour per SIM
CONNECT_TIMEOUT = 3.05


def _services() -> Any:
    return current_app.extensions["civicdial"]


def _channel(channel_key: str) -> ChannelInfo:
    return bound_channel(_services().registry, "android", channel_key, "sms")


def signature(key: str, body: bytes, timestamp: str) -> str:
    """What the app puts in X-Signature (its PayloadSingingPlugin)."""
    return hmac.new(key.encode("utf-8"), body + timestamp.encode("utf-8"),
                    hashlib.sha256).hexdigest()


def verify(key: str, body: bytes, timestamp: str, given: str, now: float) -> str | None:
    """None if the request is the phone's, else why not."""
    if not given or not timestamp:
        return "missing X-Signature or X-Timestamp"
    try:
        sent_at = int(timestamp)
    except ValueError:
        return "X-Timestamp is not a number of seconds"
    # Compared before the time check, so a forger learns nothing from the answer.
    if not hmac.compare_digest(signature(key, body, timestamp), given.strip().lower()):
        return "bad X-Signature"
    if abs(now - sent_at) > SIGNATURE_WINDOW:
        return (f"X-Timestamp is {int(now - sent_at)} s from our clock (more than "
                f"{SIGNATURE_WINDOW} s): check the phone's and the node's clocks")
    return None


def _verified_body(ch: ChannelInfo) -> bytes:
    """The raw body, once its signature checks out (else 401)."""
    body = read_body(request, _services().settings.max_body_bytes)
    key = ch.config.get("signing_key")
    if not isinstance(key, str) or not key:
        raise WebhookError(401, "channel has no signing_key configured; cannot verify")
    problem = verify(key, body, request.headers.get(TIMESTAMP_HEADER, ""),
                     request.headers.get(SIGNATURE_HEADER, ""), time.time())
    if problem:
        raise WebhookError(401, problem)
    return body


@dataclass(frozen=True)
class Envelope:
    id: str
    event: str
    device_id: str
    payload: dict[str, Any]


def parse_envelope(body: bytes) -> Envelope:
    # The same strict JSON as every other endpoint's; any Content-Type, as the app's
    # signature (checked before this) covers the bytes, not the header.
    data = json_from_body(body)
    if not isinstance(data, dict):
        raise WebhookError(400, "expected a JSON object")
    fields = {name: data.get(name) for name in ("id", "event", "deviceId")}
    for name, value in fields.items():
        if not isinstance(value, str) or not value or len(value) > 100:
            raise WebhookError(400, f"envelope field {name} missing or not a short string")
    payload = data.get("payload")
    if not isinstance(payload, dict):
        raise WebhookError(400, "envelope field payload missing or not an object")
    return Envelope(fields["id"], fields["event"], fields["deviceId"], payload)


def _text_field(payload: dict[str, Any], name: str, max_len: int = 200) -> str:
    value = payload.get(name)
    if not isinstance(value, str):
        raise WebhookError(400, f"payload field {name} missing or not text")
    if len(value) > max_len:
        raise WebhookError(400, f"payload field {name} is longer than {max_len} characters")
    return value


def _instant(raw: str) -> int:
    """receivedAt (the phone's local time with its offset) as epoch milliseconds: the same
    SMS emitted again after the phone's time zone changed is still the same SMS."""
    try:
        return int(datetime.fromisoformat(raw).timestamp() * 1000)
    except ValueError:
        raise WebhookError(400, "payload field receivedAt is not an ISO-8601 time") from None


def content_key(device_id: str, sender: str, received_ms: int, text: str) -> str:
    """The second dedup key: the same SMS however many times the app emits it."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return hashlib.sha256(f"{device_id}\x1f{sender}\x1f{received_ms}\x1f{digest}"
                          .encode()).hexdigest()[:40]


def _envelope_key(ch: ChannelInfo, envelope_id: str) -> str:
    return f"{_services().settings.redis_prefix}android:env:{ch.id}:{envelope_id}"


@bp.post("/<channel_key>/events")
def events(channel_key: str) -> Response:
    """One webhook event from the phone: an inbound SMS, or the fate of one we sent."""
    ch = _channel(channel_key)
    envelope = parse_envelope(_verified_body(ch))
    if envelope.event == "sms:received":
        return _received(ch, envelope)
    if envelope.event in DELIVERY_STATUS:
        return _status(ch, envelope)
    if envelope.event not in IGNORED_EVENTS:
        log.warning("android %s: unknown event %s ignored", ch.id, envelope.event[:40])
    return Response("ignored\n", status=200, mimetype="text/plain")


def _received(ch: ChannelInfo, envelope: Envelope) -> Response:
    services = _services()
    payload = envelope.payload
    # Versions before 2026-02 send only phoneNumber (deprecated, = sender for inbound).
    raw_sender = payload.get("sender") or payload.get("phoneNumber")
    if not isinstance(raw_sender, str) or not raw_sender or len(raw_sender) > 32:
        raise WebhookError(400, "payload has no sender (or phoneNumber)")
    text = _text_field(payload, "message", max_len=10_000)
    received_ms = _instant(_text_field(payload, "receivedAt", max_len=40))
    try:
        phone = to_e164(raw_sender, services.settings.default_region)
    except BadPhoneNumber:
        # A carrier's or a bank's alphanumeric sender: not a respondent. 200, or the phone
        # would retry it for two days.
        log.warning("android %s: SMS from %r is not from a phone number; ignored", ch.id,
                    raw_sender[:4] + "***")
        return Response("ignored: sender is not a phone number\n", status=200,
                        mimetype="text/plain")
    message_id = "a:" + content_key(envelope.device_id, phone, received_ms, text)
    # The envelope id is read with the conversation's state and marked only after the
    # commit: if we die in between, the content key still catches the retry.
    outcome = converse(services, ch, Inbound(phone, text, message_id), reply_by_queue=True,
                       seen_key=_envelope_key(ch, envelope.id))
    if outcome.duplicate:
        log.info("android %s: SMS from %s delivered again (envelope %s); nothing changed",
                 ch.id, mask_phone(phone), envelope.id[:8])
    return Response("duplicate\n" if outcome.duplicate else "OK\n", status=200,
                    mimetype="text/plain")


def _status(ch: ChannelInfo, envelope: Envelope) -> Response:
    """sms:sent / sms:delivered (once per part) / sms:failed for a message we sent: its
    messageId is our id for it. Applied forward only, so repeats and reordering are
    harmless."""
    payload = envelope.payload
    message_id = _text_field(payload, "messageId", max_len=100)
    if not message_id:
        raise WebhookError(400, "empty payload field messageId")
    reason = payload.get("reason") if envelope.event == "sms:failed" else ""
    if envelope.event == "sms:cancelled":
        reason = "cancelled on the phone"
    _services().store.append([delivery_event(
        ch.id, message_id, DELIVERY_STATUS[envelope.event],
        str(reason or "")[:300])])
    return Response("OK\n", status=200, mimetype="text/plain")


# -- the phone's REST API ---------------------------------------------------------------


@dataclass(frozen=True)
class PhoneConfig:
    url: str
    username: str
    password: str
    timeout: float = 10.0


def phone_config(config: dict[str, Any]) -> PhoneConfig:
    url, username, password = (config.get(k) for k in ("url", "username", "password"))
    if not all(isinstance(v, str) and v for v in (url, username, password)):
        raise SendError(Failure.CONFIG, "channel config needs url, username and password")
    assert isinstance(url, str) and isinstance(username, str) and isinstance(password, str)
    return PhoneConfig(url.rstrip("/"), username, password,
                       float(config.get("timeout", 10)))


class _TimedSession(requests.Session):
    """The client's requests.Session has no timeout: a phone that stops answering would
    hold a worker forever."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = (CONNECT_TIMEOUT, timeout)

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs.setdefault("timeout", self.timeout)
        return super().request(*args, **kwargs)


def api_client(phone: PhoneConfig) -> asg_client.APIClient:
    """The android-sms-gateway client, with a timeout (use it as a context manager)."""
    return asg_client.APIClient(phone.username, phone.password, base_url=phone.url,
                                http=RequestsHttpClient(_TimedSession(phone.timeout)))


def rate_per_second(config: dict[str, Any]) -> float:
    """The channel's limit for the shared token bucket: rate_per_hour (default 100)."""
    return float(config.get("rate_per_hour", DEFAULT_RATE_PER_HOUR)) / 3600


@dataclass(frozen=True)
class Outgoing:
    id: str  # ours; the phone refuses a second message with it (409)
    to: str  # E.164
    body: str
    interactive: bool  # a reply to someone waiting: expedited on the phone


def message_request(config: dict[str, Any], msg: Outgoing) -> asg_domain.Message:
    """Checked before sending: the app answers 500 to a request without phoneNumbers and
    only reports a bad number later (sms:failed)."""
    if not msg.to or not msg.to.startswith("+") or not msg.to[1:].isdigit():
        raise SendError(Failure.REJECTED, "recipient is not an E.164 number")
    if not msg.body:
        raise SendError(Failure.REJECTED, "empty message body")
    sim = config.get("sim_number")
    if sim is not None and (not isinstance(sim, int) or isinstance(sim, bool) or sim < 1):
        raise SendError(Failure.CONFIG, "sim_number must be a whole number from 1")
    return asg_domain.Message(
        id=msg.id, phone_numbers=[msg.to],
        text_message=asg_domain.TextMessage(text=msg.body), with_delivery_report=True,
        sim_number=sim, priority=asg_domain.MessagePriority(PRIORITY_EXPEDITED)
        if msg.interactive and config.get("expedite_replies", True) else None)


def send_sms(config: dict[str, Any], msg: Outgoing) -> Sent:
    """Hand one SMS to the phone (POST /messages). 202: queued on the phone; 409: the
    phone already has this id from an earlier attempt, so it is sent all the same."""
    phone = phone_config(config)
    request_body = message_request(config, msg)
    try:
        with api_client(phone) as c:
            c.send(request_body)
    except asg_errors.APIError as exc:
        status = exc.status_code or 0
        if status == 409:
            return Sent(provider_id=msg.id)
        raise classify_http(status, f"{status} {exc.response or exc}"[:300]) from None
    except requests.RequestException as exc:
        # A read timeout too: the id makes the retry safe (409 if it got through).
        raise SendError(Failure.TEMPORARY, f"{type(exc).__name__}: {exc}"[:300]) from None
    except (ValueError, KeyError, TypeError):
        pass  # a 2xx whose body the client cannot read: the phone has the message
    return Sent(provider_id=msg.id)


# -- setting the phone up (`civicdial channels add|check`) ------------------------------

MIN_APP_VERSION = (1, 66, 2)  # 1.65.2-1.66.1 drop a repeated answer ("1" twice) at the phone
CLOCK_WARN_SECONDS = 60


class PhoneError(Exception):
    """The phone could not be reached, or refused: the message says what to do."""


@dataclass(frozen=True)
class PhoneCheck:
    status: str  # the app's health: pass | warn | fail
    version: str
    version_ok: bool
    clock_skew: float | None  # seconds the phone is ahead of us (Date header)
    pending: int | None  # messages waiting on the phone
    webhooks: list[dict[str, Any]]
    health: dict[str, Any]


def webhook_id(channel_key: str, event: str) -> str:
    """A stable id per channel and event: registering again replaces, never duplicates."""
    return f"civicdial-{channel_key[:10]}-{event.replace(':', '-')}"


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.lstrip("v").split("-")[0].split("."))
    except ValueError:
        return ()


def _get(phone: PhoneConfig, path: str, auth: bool = True) -> requests.Response:
    try:
        resp = requests.get(phone.url + path, timeout=(CONNECT_TIMEOUT, phone.timeout),
                            auth=(phone.username, phone.password) if auth else None)
    except requests.RequestException as exc:
        raise PhoneError(
            f"cannot reach the phone at {phone.url} ({type(exc).__name__}). Is SMS Gateway "
            "running with Local Server on, and is the phone reachable (same network, or "
            "`adb forward tcp:8080 tcp:8080` with the phone on USB)?") from None
    if resp.status_code == 401:
        raise PhoneError(f"the phone at {phone.url} refused the username/password: use "
                         "the ones shown in the app under Local Server")
    return resp


def health(phone: PhoneConfig) -> tuple[dict[str, Any], float | None]:
    """GET /health (no auth) and the clock skew its Date header shows."""
    before = time.time()
    resp = _get(phone, "/health", auth=False)
    after = time.time()
    try:
        body = resp.json()
    except ValueError:
        raise PhoneError(f"{phone.url}/health did not answer JSON (HTTP {resp.status_code}):"
                         " is this SMS Gateway for Android?") from None
    if not isinstance(body, dict):
        raise PhoneError(f"{phone.url}/health answered something unexpected")
    skew = None
    if resp.headers.get("Date"):
        try:
            phone_time = parsedate_to_datetime(resp.headers["Date"]).timestamp()
            skew = phone_time - (before + after) / 2
        except (TypeError, ValueError):
            pass
    return body, skew


def check_phone(config: dict[str, Any]) -> PhoneCheck:
    """Everything `channels check` reports: health, version, clock, queue, webhooks."""
    phone = _phone(config)
    body, skew = health(phone)
    version = str(body.get("version", ""))
    pending_resp = _get(phone, "/messages?state=Pending&limit=1")
    pending = None
    if pending_resp.ok:
        try:
            pending = int(pending_resp.headers.get("X-Total-Count", ""))
        except ValueError:
            pending = None
    return PhoneCheck(status=str(body.get("status", "")), version=version,
                      version_ok=_version_tuple(version) >= MIN_APP_VERSION,
                      clock_skew=skew, pending=pending, webhooks=list_webhooks(config),
                      health=body)


def _phone(config: dict[str, Any]) -> PhoneConfig:
    try:
        return phone_config(config)
    except SendError as exc:
        raise PhoneError(exc.detail) from None


def list_webhooks(config: dict[str, Any]) -> list[dict[str, Any]]:
    phone = _phone(config)
    try:
        with api_client(phone) as c:
            return [{"id": w.id, "url": w.url, "event": str(w.event.value)}
                    for w in c.get_webhooks()]
    except asg_errors.UnauthorizedError:
        raise PhoneError(f"the phone at {phone.url} refused the username/password: use "
                         "the ones shown in the app under Local Server") from None
    except (asg_errors.APIError, requests.RequestException, ValueError, KeyError) as exc:
        raise PhoneError(f"could not list the phone's webhooks: {exc}"[:300]) from None


def register_webhooks(config: dict[str, Any], channel_key: str,
                      url: str) -> list[dict[str, Any]]:
    """POST /webhooks for each event we handle, all to `url` (201 each)."""
    phone = _phone(config)
    done: list[dict[str, Any]] = []
    try:
        with api_client(phone) as c:
            for event in EVENTS:
                hook = c.create_webhook(asg_domain.Webhook(
                    id=webhook_id(channel_key, event), url=url,
                    event=asg_domain.WebhookEvent(event)))
                done.append({"id": hook.id, "url": hook.url, "event": event})
    except asg_errors.BadRequestError as exc:
        detail = (exc.response or {}).get("message") or str(exc)
        raise PhoneError(
            f"the phone refused the webhook URL {url}: {detail}. The standard app accepts "
            "only https:// (a certificate the phone trusts) or http://127.0.0.1: connect "
            "the phone by USB, run `adb reverse tcp:8000 tcp:8000` and use --base-url "
            "http://127.0.0.1:8000 (README, 'Offline field kit')") from None
    except asg_errors.UnauthorizedError:
        raise PhoneError(f"the phone at {phone.url} refused the username/password: use "
                         "the ones shown in the app under Local Server") from None
    except (asg_errors.APIError, requests.RequestException) as exc:
        raise PhoneError(f"could not register webhooks on the phone: {exc}"[:300]) from None
    return done


def unregister_webhooks(config: dict[str, Any], channel_key: str) -> None:
    """Best effort: remove what register_webhooks made (after a failed `channels add`)."""
    try:
        with api_client(_phone(config)) as c:
            for event in EVENTS:
                c.delete_webhook(webhook_id(channel_key, event))
    except (PhoneError, asg_errors.APIError, requests.RequestException):
        pass


def set_up_phone(config: dict[str, Any], channel_key: str, events_url: str) -> dict[str, Any]:
    """Check the phone, then point its four webhooks at the channel's events URL (`channels
    add` and the console's channel form): what the phone reported, for the operator. On
    PhoneError, what was registered is removed again."""
    try:
        check = check_phone(config)
        hooks = register_webhooks(config, channel_key, events_url)
    except PhoneError:
        unregister_webhooks(config, channel_key)
        raise
    ours = {h["id"] for h in hooks}
    others = [w for w in check.webhooks if w["event"] in EVENTS and w["id"] not in ours]
    skew = None if check.clock_skew is None else round(check.clock_skew, 1)
    return {"status": check.status, "version": check.version,
            "version_ok": check.version_ok, "clock_skew_seconds": skew,
            "pending": check.pending, "webhooks": hooks, "other_webhooks": others}
