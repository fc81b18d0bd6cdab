"""A fake SMS Gateway for Android phone (capcom6 "SMSGate", local-server mode), at the HTTP
boundary: a real HTTP server on 127.0.0.1 with the phone's REST API, and the phone's
webhook sender. Reusable by any test that needs "a phone with a SIM" (the channel tests,
the two-node edge-sync test).

What it implements, as the app does (facts: /work/shared/spec/android-gateway.md, and the
app's source at capcom6/android-sms-gateway@0cdc5d8):

- `GET /health` (no auth): `{"version", "releaseId", "status": "pass", "checks"}` and a
  `Date` header (from the phone's clock, `clock_skew` seconds off ours).
- Basic auth on everything else (401 otherwise).
- `GET|POST /webhooks`, `DELETE /webhooks/<id>` (204): POST answers 201 with the stored
  webhook, upserts an existing id, and refuses (400) a URL that is not `https://` or
  `http://127.0.0.1...` unless the phone runs the "insecure" build (`insecure=True`).
- `POST /messages`: 202 with the message state; 409 for an id it already has (or the same
  number twice); 500 without phoneNumbers (as the app does); `GET /messages?state=Pending`
  with `X-Total-Count`.
- Webhooks: each event goes to every webhook registered for it, in an envelope with a
  fresh NanoId `id`, as Gson writes it (fields in the app's order, nulls dropped, `= < > &
  '` escaped as `\\u003d`...), signed: `X-Signature` = hex HMAC-SHA256(signing key, body +
  `X-Timestamp`). Any non-2xx (or a connection error) is retried, each attempt re-signed
  with a fresh timestamp and the same envelope id, up to 16 attempts.

How a test drives it:

    with fake_phone(signing_key="k3y") as phone:      # phone.url -> channel config "url"
        ... register webhooks (civicdial channels add does), or phone.add_webhook(url, event)
        phone.text("+233241234567", "SURVEY")          # a citizen texting the phone's SIM
        phone.deliver()                                # POST what is due (retries included)
        phone.sent_to("+233241234567")                 # texts the phone was asked to send

Delivery is explicit (`deliver()`), so tests control it; `start_delivering()` runs it in a
background thread instead. `duplicate_deliveries=True` posts every webhook twice (the
second a retry with the same envelope id); `reemit(envelope)` emits an old event again
with a fresh envelope id (inbox export on versions before 1.66.2). After a message is
accepted the phone "sends" it: sms:sent, then sms:delivered, are emitted for it (unless
`auto_send=False`; `fail_numbers` get sms:failed instead). `transport` replaces the HTTP
POST (e.g. `flask_transport(app.test_client())`) when no web server runs; `serve_app(app)`
serves a node's create_app() on 127.0.0.1 over real HTTP instead (what `adb reverse` gives
the phone), so a test can run several nodes, each with a phone of its own:

    with fake_phone() as phone, serve_app(create_app(settings)) as base:
        # civicdial channels add --provider android ... --config json.dumps(
        #     phone.channel_config(rate_per_hour=0)) --base-url base
        phone.start_delivering()      # webhooks flow while the test runs workers

Faults: `fail_sends` (503s), `hang_after_accept` (the phone keeps the message but answers
after the client's timeout: the retry gets 409), `clock_skew`, `legacy_payloads`,
`insecure`, and 401 for wrong credentials.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import requests

APP_VERSION = "1.66.2"
MAX_ATTEMPTS = 16  # the app: 16 attempts over about 45 h
_NANO = "_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Gson's default HTML-safe escaping (JsonWriter.HTML_SAFE_REPLACEMENT_CHARS).
_GSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "=": "\\u003d",
                 "'": "\\u0027", "\u2028": "\\u2028", "\u2029": "\\u2029"}

Transport = Callable[[str, bytes, dict[str, str]], int]


def nanoid(size: int = 21) -> str:
    return "".join(secrets.choice(_NANO) for _ in range(size))


def gson(obj: Any) -> bytes:
    """JSON as the app's Gson writes it: compact, nulls dropped, HTML characters escaped,
    other non-ASCII as UTF-8."""
    text = json.dumps(_drop_nulls(obj), separators=(",", ":"), ensure_ascii=False)
    for char, escape in _GSON_ESCAPES.items():
        text = text.replace(char, escape)  # only ever inside strings in JSON
    return text.encode("utf-8")


def _drop_nulls(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_nulls(v) for v in obj]
    return obj


def gson_date(at: datetime) -> str:
    """The app's date format: yyyy-MM-dd'T'HH:mm:ss.SSSXXX (XXX is 'Z' at offset 0)."""
    text = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}"
    offset = at.utcoffset() or timedelta(0)
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return text + f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def sign(key: str, body: bytes, timestamp: str) -> str:
    return hmac.new(key.encode(), body + timestamp.encode(), hashlib.sha256).hexdigest()


def java_hash_hex(*parts: object) -> str:
    """A 32-bit content hash as the app's messageId for received SMS (not unique)."""
    h = 0
    for ch in "|".join(map(str, parts)):
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    return format(h, "x")


@dataclass
class Delivery:
    """One envelope on its way to one webhook URL."""

    url: str
    envelope: dict[str, Any]
    attempts: int = 0
    done: bool = False
    statuses: list[int] = field(default_factory=list)


@dataclass
class FakePhone:
    signing_key: str = "s1gnKey8"
    username: str = "sms"
    password: str = "gateway-pass"
    device_id: str = "ffffffffceb0b1db0000018e937c815b"
    sim_number: int = 1
    own_number: str = "+233201112222"  # the SIM's number (payload "recipient")
    version: str = APP_VERSION
    insecure: bool = False  # the app's "insecure" build accepts any http:// webhook URL
    clock_skew: float = 0.0  # seconds the phone's clock is ahead of ours
    tz: timezone = UTC  # the phone's time zone, in receivedAt
    legacy_payloads: bool = False  # versions before 2026-02: no sender/recipient fields
    auto_send: bool = True  # emit sms:sent + sms:delivered after accepting a message
    duplicate_deliveries: bool = False  # every webhook posted twice (a retry)
    fail_numbers: set[str] = field(default_factory=set)  # these get sms:failed
    # Fault injection for POST /messages:
    fail_sends: int = 0  # the next N are answered 503 before anything is recorded
    hang_after_accept: int = 0  # the next N are recorded, then answered too late
    hang_seconds: float = 12.0
    transport: Transport | None = None
    url: str = ""  # its REST API base, e.g. http://127.0.0.1:PORT
    webhooks: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)  # by id, in order
    send_requests: int = 0  # POST /messages received, whatever the answer
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self._seq = itertools.count(1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the phone's clock and identity -------------------------------------------------

    def now(self) -> float:
        return time.time() + self.clock_skew

    @property
    def auth(self) -> tuple[str, str]:
        return self.username, self.password

    def channel_config(self, **extra: Any) -> dict[str, Any]:
        """The --config of `civicdial channels add --provider android` for this phone."""
        return {"url": self.url, "username": self.username, "password": self.password,
                "signing_key": self.signing_key, **extra}

    # -- webhooks ----------------------------------------------------------------------

    def add_webhook(self, url: str, event: str, webhook_id: str | None = None) -> dict:
        with self.lock:
            hook = {"id": webhook_id or nanoid(), "url": url, "event": event,
                    "source": "Local"}
            self.webhooks[hook["id"]] = hook
            return hook

    def emit(self, event: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """Queue the event for every webhook registered for it (a fresh envelope id each,
        as WebHooksService.emit does); returns the envelopes."""
        envelopes = []
        with self.lock:
            for hook in list(self.webhooks.values()):
                if hook["event"] != event:
                    continue
                envelope = {"id": nanoid(), "webhookId": hook["id"], "event": event,
                            "deviceId": self.device_id, "payload": payload}
                self.deliveries.append(Delivery(hook["url"], envelope))
                envelopes.append(envelope)
        return envelopes

    def reemit(self, envelope: dict[str, Any]) -> dict[str, Any]:
        """The same event emitted again with a fresh envelope id (an inbox export on app
        versions before 1.66.2, or a second registration of the webhook)."""
        again = {**envelope, "id": nanoid()}
        with self.lock:
            url = self.webhooks[envelope["webhookId"]]["url"]
            self.deliveries.append(Delivery(url, again))
        return again

    def signed_request(self, envelope: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        """Body and headers of one attempt, signed now (each attempt is re-signed)."""
        body = gson(envelope)
        timestamp = str(int(self.now()))
        return body, {"Content-Type": "application/json; charset=UTF-8",
                      "User-Agent": f"me.capcom.smsgateway/{self.version}",
                      "X-Timestamp": timestamp,
                      "X-Signature": sign(self.signing_key, body, timestamp)}

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        if self.transport is not None:
            return self.transport(url, body, headers)
        try:
            # The app's timeouts: 5 s to connect, 5 s of socket silence.
            return requests.post(url, data=body, headers=headers, timeout=(5, 5)).status_code
        except requests.RequestException:
            return 0

    def deliver(self, rounds: int = 1) -> int:
        """Attempt every webhook still due, `rounds` times (a failed one is retried in the
        next round, as the app's backoff would, without the waiting). Returns how many
        are still undelivered."""
        for _ in range(rounds):
            with self.lock:
                due = [d for d in self.deliveries if not d.done and d.attempts < MAX_ATTEMPTS]
            if not due:
                break
            for d in due:
                for _ in range(2 if self.duplicate_deliveries else 1):
                    body, headers = self.signed_request(d.envelope)
                    status = self._post(d.url, body, headers)
                    with self.lock:
                        d.attempts += 1
                        d.statuses.append(status)
                        if 200 <= status < 300:
                            d.done = True
        with self.lock:
            return sum(not d.done and d.attempts < MAX_ATTEMPTS for d in self.deliveries)

    def deliver_all(self, max_rounds: int = MAX_ATTEMPTS) -> None:
        """Deliver until nothing is due, including what deliveries cause (replies sent
        back through the API, their sms:sent...) as far as they have happened."""
        self.deliver(rounds=max_rounds)

    def start_delivering(self, interval: float = 0.05) -> None:
        """Deliver in a background thread until stop_delivering()."""
        def loop() -> None:
            while not self._stop.wait(interval):
                self.deliver()
        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="fake-phone-webhooks",
                                        daemon=True)
        self._thread.start()

    def stop_delivering(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- citizens ------------------------------------------------------------------------

    def text(self, sender: str, message: str,
             received_at: datetime | None = None) -> list[dict[str, Any]]:
        """A citizen texts the phone's SIM: the app emits sms:received (payload fields in
        Gson's order for SmsEventPayload.SmsReceived). Returns the envelopes queued."""
        at = received_at or datetime.fromtimestamp(self.now(), self.tz)
        # Distinct SMS in the same millisecond would be one SMS to anyone.
        at = at + timedelta(milliseconds=next(self._seq) % 1000) if received_at is None \
            else at
        payload: dict[str, Any] = {
            "message": message, "receivedAt": gson_date(at.astimezone(self.tz)),
            "messageId": java_hash_hex(sender, int(at.timestamp() * 1000), self.sim_number,
                                       message),
        }
        if not self.legacy_payloads:
            payload.update(sender=sender, recipient=self.own_number)
        payload.update(simNumber=self.sim_number, phoneNumber=sender)
        return self.emit("sms:received", payload)

    def sent_to(self, number: str) -> list[str]:
        """Texts the phone accepted for one number, in order."""
        with self.lock:
            return [m["text"] for m in self.messages.values() if number in m["phoneNumbers"]]

    def pending(self) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.messages.values() if m["state"] == "Pending"]

    # -- sending -------------------------------------------------------------------------

    def accept(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST /messages, as MessagesRoutes + MessagesService.enqueueMessage answer it."""
        with self.lock:
            self.send_requests += 1
            if self.fail_sends > 0:
                self.fail_sends -= 1
                return 503, {"message": "Service temporarily unavailable"}
            numbers = request.get("phoneNumbers")
            if not numbers:
                return 500, {"message": "Internal server error"}  # what the app does
            text = (request.get("textMessage") or {}).get("text") or request.get("message")
            if not isinstance(text, str) or not text:
                return 400, {"message": "textMessage or message is required"}
            priority = request.get("priority", 0)
            if not isinstance(priority, int) or not -128 <= priority <= 127:
                return 400, {"message": "priority must be a signed byte"}
            message_id = request.get("id") or nanoid()
            if message_id in self.messages or len(set(numbers)) != len(numbers):
                return 409, {"message": "Message with the same ID already exists"}
            state = {"id": message_id, "deviceId": self.device_id, "state": "Pending",
                     "isHashed": False, "isEncrypted": False, "phoneNumbers": list(numbers),
                     "text": text, "priority": priority,
                     "simNumber": request.get("simNumber"),
                     "withDeliveryReport": request.get("withDeliveryReport", True),
                     "recipients": [{"phoneNumber": n, "state": "Pending"} for n in numbers]}
            self.messages[message_id] = state
            if self.auto_send:
                self.transmit(message_id)
            return 202, {k: v for k, v in state.items() if k != "text"}

    def transmit(self, message_id: str) -> None:
        """The phone sends a pending message over the air: sms:sent, then sms:delivered
        (or sms:failed for fail_numbers), per recipient."""
        with self.lock:
            msg = self.messages[message_id]
            for number in msg["phoneNumbers"]:
                now = gson_date(datetime.fromtimestamp(self.now(), self.tz))
                base = {"messageId": message_id, "sender": self.own_number,
                        "recipient": number, "simNumber": msg["simNumber"],
                        "phoneNumber": number}
                if number in self.fail_numbers:
                    msg["state"] = "Failed"
                    self.emit("sms:failed", {"failedAt": now,
                                             "reason": "RESULT_ERROR_GENERIC_FAILURE",
                                             **base})
                    continue
                msg["state"] = "Sent"
                self.emit("sms:sent", {"partsCount": 1, "sentAt": now, **base})
                if msg["withDeliveryReport"]:
                    msg["state"] = "Delivered"
                    self.emit("sms:delivered", {"deliveredAt": now, **base})


def _handler(phone: FakePhone) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def _reply(self, status: int, payload: Any = None,
                   headers: dict[str, str] | None = None) -> None:
            data = b"" if payload is None else gson(payload)
            self.send_response(status)  # with a Date header: date_time_string below
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if payload is not None:
                self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def date_time_string(self, timestamp: float | None = None) -> str:
            # The Date header, as the app's DateHeader plugin sends it: the phone's clock.
            return formatdate(phone.now(), usegmt=True)

        def _authorised(self) -> bool:
            expected = "Basic " + base64.b64encode(
                f"{phone.username}:{phone.password}".encode()).decode()
            if hmac.compare_digest(self.headers.get("Authorization", ""), expected):
                return True
            self._reply(401, {"message": "Unauthorized"})
            return False

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                return json.loads(self.rfile.read(length) or b"null")
            except ValueError:
                return None

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urlparse(self.path)
            if url.path == "/health":
                self._reply(200, {"version": phone.version, "releaseId": 1662,
                                  "status": "pass", "checks": {
                                      "battery:level": {"status": "pass",
                                                        "observedValue": 87,
                                                        "observedUnit": "percent",
                                                        "description": "Battery level"}}})
                return
            if not self._authorised():
                return
            if url.path in ("/webhooks", "/webhook"):
                with phone.lock:
                    self._reply(200, [{k: v for k, v in h.items() if k != "source"}
                                      for h in phone.webhooks.values()])
                return
            if url.path in ("/messages", "/message"):
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                with phone.lock:
                    rows = [m for m in phone.messages.values()
                            if "state" not in query or m["state"] == query["state"]]
                limit, offset = int(query.get("limit", 50)), int(query.get("offset", 0))
                page = [{k: v for k, v in m.items() if k != "text"}
                        for m in rows[offset:offset + limit]]
                self._reply(200, page, {"X-Total-Count": str(len(rows))})
                return
            self._reply(404, {"message": "Not Found"})

        def do_POST(self) -> None:  # noqa: N802
            path = urlparse(self.path).path
            if not self._authorised():
                return
            body = self._body()
            if path in ("/webhooks", "/webhook"):
                if not isinstance(body, dict) or not body.get("url") or not body.get("event"):
                    self._reply(400, {"message": "url and event are required"})
                    return
                target = urlparse(body["url"])
                ok = target.scheme == "https" or (target.scheme == "http" and (
                    phone.insecure or target.hostname == "127.0.0.1"))
                if not ok:
                    self._reply(400, {"message": "url must start with https:// or "
                                                 "http://127.0.0.1"})
                    return
                if body.get("deviceId") not in (None, phone.device_id):
                    self._reply(400, {"message": "Device ID mismatch"})
                    return
                hook = phone.add_webhook(body["url"], body["event"], body.get("id"))
                self._reply(201, {"id": hook["id"], "url": hook["url"],
                                  "event": hook["event"]})
                return
            if path in ("/messages", "/message"):
                if not isinstance(body, dict):
                    self._reply(400, {"message": "invalid JSON"})
                    return
                hang = False
                with phone.lock:
                    if phone.hang_after_accept > 0 and not phone.fail_sends:
                        phone.hang_after_accept -= 1
                        hang = True
                status, payload = phone.accept(body)
                if hang:
                    time.sleep(phone.hang_seconds)  # the client gave up long ago
                try:
                    self._reply(status, payload)
                except OSError:
                    pass
                return
            self._reply(404, {"message": "Not Found"})

        def do_DELETE(self) -> None:  # noqa: N802
            path = urlparse(self.path).path
            if not self._authorised():
                return
            for prefix in ("/webhooks/", "/webhook/"):
                if path.startswith(prefix):
                    with phone.lock:
                        phone.webhooks.pop(path[len(prefix):], None)
                    self._reply(204)
                    return
            self._reply(404, {"message": "Not Found"})

    return Handler


@contextmanager
def fake_phone(**options: Any) -> Iterator[FakePhone]:
    """A FakePhone serving its REST API on 127.0.0.1 (a free port) while in the block."""
    phone = FakePhone(**options)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(phone))
    server.daemon_threads = True
    phone.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield phone
    finally:
        phone.stop_delivering()
        server.shutdown()
        server.server_close()


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Serve a WSGI app (create_app()) on 127.0.0.1 in a thread: the node the phone's
    webhooks reach, as `adb reverse` makes it reachable at the phone's 127.0.0.1.
    Yields its base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def flask_transport(client: Any) -> Transport:
    """Deliver webhooks through a Flask test client instead of HTTP (path of the URL)."""
    def post(url: str, body: bytes, headers: dict[str, str]) -> int:
        parsed = urlparse(url)
        return client.post(parsed.path, data=body, headers=headers).status_code
    return post
