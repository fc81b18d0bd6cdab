"""A local HTTP server standing in for Africa's Talking's and Twilio's send APIs.

It speaks their wire formats (AT: form POST /version1/messaging -> SMSMessageData JSON;
Twilio: form POST /2010-04-01/Accounts/<sid>/Messages.json -> message JSON), records
what it accepted, and can be told to fail some requests the way real providers do.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


@dataclass
class FakeProvider:
    base_url: str = ""
    accepted: list[dict[str, str]] = field(default_factory=list)
    requests: int = 0
    # Share of requests answered 503 before anything is recorded (a transient outage).
    fail_rate: float = 0.0
    # Numbers the provider rejects with a 4xx.
    reject: set[str] = field(default_factory=set)
    seed: int = 1662
    # Seconds each request takes before the provider answers.
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Airtime payments accepted: phoneNumber, amount ("GHS 2.00"), idempotency key.
    airtime: list[dict[str, str]] = field(default_factory=list)
    # Africa's Talking: numbers answered statusCode 500 (per recipient) that many times.
    recipient_fail: dict[str, int] = field(default_factory=dict)
    # Africa's Talking SMS requests: how many recipients each had.
    calls: list[int] = field(default_factory=list)
    # Requests received, counted before the delay (so also those still waiting on it).
    posts: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._ids = itertools.count(1)

    def bodies_to(self, number: str) -> list[str]:
        with self.lock:
            return [m["body"] for m in self.accepted if m["to"] == number]

    def decide(self, to: str) -> str:
        with self.lock:
            self.requests += 1
            if to in self.reject:
                return "reject"
            if self._rng.random() < self.fail_rate:
                return "fail"
            return "ok"

    def decide_request(self, numbers: list[str]) -> str:
        """One Africa's Talking request to these numbers: 'fail' (a 503 for all) or 'ok'.
        A request only to rejected numbers is never failed (as decide())."""
        with self.lock:
            self.requests += 1
            self.calls.append(len(numbers))
            if all(n in self.reject for n in numbers):
                return "ok"
            return "fail" if self._rng.random() < self.fail_rate else "ok"

    def recipient_failure(self, to: str) -> bool:
        with self.lock:
            left = self.recipient_fail.get(to, 0)
            if left:
                self.recipient_fail[to] = left - 1
            return bool(left)

    def record(self, to: str, body: str, sender: str, **extra: str) -> str:
        with self.lock:
            message_id = f"{next(self._ids):06d}"
            self.accepted.append({"to": to, "body": body, "from": sender, "id": message_id,
                                  **extra})
            return message_id


def _handler(fake: FakeProvider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            with fake.lock:
                fake.posts += 1  # before the delay: a request in flight shows here
            if fake.delay:
                time.sleep(fake.delay)
            length = int(self.headers.get("Content-Length") or 0)
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            if self.path == "/version1/messaging":
                self._africastalking(form)
            elif self.path == "/version1/airtime/send":
                self._airtime(form)
            elif self.path.startswith("/2010-04-01/Accounts/") and self.path.endswith(
                    "/Messages.json"):
                self._twilio(form)
            else:
                self._reply(404, {"error": "no such endpoint"})

        def _africastalking(self, form: dict[str, str]) -> None:
            """SMS.send: `to` is one number or many, comma-separated (bulk mode); one
            Recipients entry per number. A 503 fails the whole request; a rejected number
            (403) or one in recipient_fail (500, InternalServerError, that many times)
            fails on its own while the others are sent."""
            if self.headers.get("apiKey") != "at-key" or form.get("username") != "sandbox":
                self._reply(401, {"error": "The supplied authentication is invalid"})
                return
            numbers = form.get("to", "").split(",")
            if fake.decide_request(numbers) == "fail":
                self._reply(503, {"error": "Service Unavailable"})
                return
            entries = []
            for to in numbers:
                if to in fake.reject:
                    entries.append({"statusCode": 403, "number": to,
                                    "status": "InvalidPhoneNumber", "cost": "0",
                                    "messageId": "None"})
                elif fake.recipient_failure(to):
                    entries.append({"statusCode": 500, "number": to,
                                    "status": "InternalServerError", "cost": "0",
                                    "messageId": "None"})
                else:
                    message_id = fake.record(to, form.get("message", ""), form.get("from", ""))
                    entries.append({"statusCode": 101, "number": to, "status": "Success",
                                    "cost": "GHS 0.03", "messageId": f"ATXid_{message_id}"})
            sent = sum(1 for e in entries if e["statusCode"] == 101)
            self._reply(201, {"SMSMessageData": {
                "Message": f"Sent to {sent}/{len(entries)} Total Cost: GHS {0.03 * sent:.2f}",
                "Recipients": entries}})

        def _airtime(self, form: dict[str, str]) -> None:
            """Africa's Talking Airtime: recipients as a JSON list; a repeated
            Idempotency-Key is refused as a duplicate rather than paid again."""
            if self.headers.get("apiKey") != "at-key" or form.get("username") != "sandbox":
                self._reply(401, {"error": "The supplied authentication is invalid"})
                return
            (recipient,) = json.loads(form["recipients"])
            to, amount = recipient["phoneNumber"], recipient["amount"]
            key = self.headers.get("Idempotency-Key", "")
            verdict = fake.decide(to)
            if verdict == "fail":
                self._reply(503, {"error": "Service Unavailable"})
                return
            with fake.lock:
                duplicate = bool(key) and any(p["key"] == key for p in fake.airtime)
                if not duplicate and verdict == "ok":
                    fake.airtime.append({"to": to, "amount": amount, "key": key})
                    request_id = f"ATQid_{len(fake.airtime):06d}"
            if duplicate:
                self._reply(200, {"errorMessage": "A duplicate request was received within "
                                                  "the last 5 minutes", "numSent": 0,
                                  "totalAmount": "0", "totalDiscount": "0", "responses": []})
                return
            if verdict == "reject":
                self._reply(201, {"errorMessage": "None", "numSent": 0, "totalAmount": "0",
                                  "totalDiscount": "0", "responses": [{
                                      "phoneNumber": to, "errorMessage": "Invalid phone number",
                                      "amount": amount, "status": "Failed",
                                      "requestId": "None", "discount": "0"}]})
                return
            self._reply(201, {"errorMessage": "None", "numSent": 1, "totalAmount": amount,
                              "totalDiscount": "GHS 0.0600", "responses": [{
                                  "phoneNumber": to, "errorMessage": "None",
                                  "amount": amount, "status": "Sent",
                                  "requestId": request_id, "discount": "GHS 0.0600"}]})

        def _twilio(self, form: dict[str, str]) -> None:
            to = form.get("To", "")
            verdict = fake.decide(to)
            if verdict == "fail":
                self._reply(503, {"code": 20500, "message": "Service unavailable",
                                  "status": 503})
                return
            if verdict == "reject":
                self._reply(400, {"code": 21211, "message": f"Invalid 'To' Phone Number: {to}",
                                  "status": 400})
                return
            message_id = fake.record(to, form.get("Body", ""), form.get("From", ""),
                                     status_callback=form.get("StatusCallback", ""))
            self._reply(201, {"sid": f"SM{message_id:0>32}", "status": "queued", "to": to,
                              "from": form.get("From"), "body": form.get("Body"),
                              "num_segments": "1", "direction": "outbound-api"})

    return Handler


@contextmanager
def fake_provider(**options: object) -> Iterator[FakeProvider]:
    fake = FakeProvider(**options)  # type: ignore[arg-type]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
