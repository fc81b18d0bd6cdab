"""SMS load generator: virtual citizens text the inbound SMS endpoints over loopback.

Run as its own process (`python sms_loadgen.py CONFIG.json RESULT.json`), like loadgen.py,
with which it shares loadkit.py (client, statistics, measured window, CPU marks). Modes:

- twilio: citizens text the campaign keyword to a Twilio SMS channel that replies inline
          (TwiML), read each reply and answer it: the option number mostly, the option
          label sometimes (`agree`, `Urban.`), free text where asked. Every request carries
          a fresh MessageSid and an X-Twilio-Signature computed over the URL the server sees.
          The bodies of completed interviews are recorded.
- replay: the recorded conversations are replayed (fresh numbers and message ids) in one
          provider's request shape (`shape`: twilio, africastalking or android); for the
          bare Flask app, and for the Africa's Talking and Android channels, whose replies
          go out by the queue (the HTTP answer is just `OK`, so there is nothing to read).
          The android shape is SMS Gateway for Android's signed sms:received envelope
          (Gson-style JSON, X-Signature over body + X-Timestamp, a fresh envelope id and
          receivedAt per message).

A small share of messages are delivered twice at once with the same message id (a provider
retry racing the original); both answers must match. Every loop is bounded in count and
time; only loopback URLs are accepted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import loadkit
from loadkit import (
    ALREADY,
    COMPLETED,
    HEADERS,
    IMPROVE,
    NETWORK,
    LoadConfig,
    Stats,
    phone,
    pick,
    racing_retry,
    services_used,
)
from twilio.request_validator import RequestValidator

from gateway.coordination.bootstrap import shipped_questionnaire
from gateway.interview.questionnaire import Question
from gateway.interview.render import fold

SHORT_CODE = "1662"
MAX_MESSAGES_PER_CITIZEN = 200  # a full interview is about 25 messages
TOO_MANY = "Too many invalid"


@dataclass
class Config(LoadConfig):
    """The shared options (mode: twilio | replay) and the SMS citizens' own."""

    shape: str = "twilio"  # request shape: twilio | africastalking
    auth_token: str = ""
    account_sid: str = "AC" + "0" * 32
    to: str = "+15005550006"
    label_rate: float = 0.25  # answer a choice by its label instead of its number
    signing_key: str = ""  # android: the phone's webhook signing key
    device_id: str = "ffffffffceb0b1db0000018e937c815b"


GSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "=": "\\u003d",
                "'": "\\u0027"}


def android_envelope(cfg: Config, phone: str, text: str, message_id: str, now: float) -> str:
    """sms:received as the app's Gson writes it (field order, HTML escapes)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    body = json.dumps({"id": message_id, "webhookId": "bench-hook", "event": "sms:received",
                       "deviceId": cfg.device_id, "payload": {
                           "message": text, "receivedAt": stamp,
                           "messageId": f"{hash((phone, text, now)) & 0xFFFFFFFF:x}",
                           "sender": phone, "recipient": "+233201112222", "simNumber": 1,
                           "phoneNumber": phone}}, separators=(",", ":"), ensure_ascii=False)
    for char, escape in GSON_ESCAPES.items():
        body = body.replace(char, escape)
    return body


def twiml_message(body: str) -> str | None:
    """The <Message> text of a TwiML answer ('' for none), None if it is not TwiML."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    if root.tag != "Response":
        return None
    node = root.find("Message")
    return "" if node is None else (node.text or "")


class Client(loadkit.Client):
    """The shared client, posting in one SMS provider's request shape."""

    def __init__(self, session: aiohttp.ClientSession, cfg: Config, stats: Stats,
                 stop_at: float) -> None:
        super().__init__(session, cfg.url, stats, stop_at)
        self.cfg = cfg
        self.validator = RequestValidator(cfg.auth_token or "unused")
        self.ids = 0
        self.received_at: dict[str, float] = {}

    def new_id(self, rng: random.Random) -> str:
        self.ids += 1
        if self.cfg.shape == "twilio":
            return f"SM{rng.getrandbits(128):032x}"
        if self.cfg.shape == "android":  # a NanoId, 21 characters
            return f"{rng.getrandbits(126):021x}"[:21]
        return f"ATXid_{rng.getrandbits(128):032x}"

    def request(self, phone: str, text: str, message_id: str) -> tuple[str, dict[str, str]]:
        """The body and headers the provider would send for this message."""
        if self.cfg.shape == "android":
            # A retry is the same body (same receivedAt), signed afresh.
            received = self.received_at.setdefault(message_id, time.time())
            body = android_envelope(self.cfg, phone, text, message_id, received)
            timestamp = str(int(time.time()))
            signature = hmac.new(self.cfg.signing_key.encode(),
                                 body.encode() + timestamp.encode(), hashlib.sha256).hexdigest()
            return body, {"Content-Type": "application/json; charset=UTF-8",
                          "X-Timestamp": timestamp, "X-Signature": signature}
        if self.cfg.shape == "africastalking":
            form = {"from": phone, "to": SHORT_CODE, "text": text,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"), "id": message_id,
                    "linkId": f"{message_id[-12:]}", "networkCode": NETWORK}
            return urlencode(form), HEADERS
        # Twilio's inbound SMS parameters, as its webhook sends them.
        form = {"ToCountry": "US", "ToState": "CA", "SmsMessageSid": message_id,
                "NumMedia": "0", "ToCity": "", "FromZip": "", "SmsSid": message_id,
                "FromState": "", "SmsStatus": "received", "FromCity": "", "Body": text,
                "FromCountry": "GH", "To": self.cfg.to, "ToZip": "", "NumSegments": "1",
                "MessageSid": message_id, "AccountSid": self.cfg.account_sid,
                "From": phone, "ApiVersion": "2010-04-01"}
        signature = self.validator.compute_signature(self.cfg.url, form)
        return urlencode(form), {**HEADERS, "X-Twilio-Signature": signature}

    def judge(self, status: str, reply: str) -> tuple[bool, str]:
        """Right answer and what the citizen reads: AT's `OK`, or TwiML's <Message>."""
        if self.cfg.shape in ("africastalking", "android"):
            # "duplicate": the racing retry of a message already committed.
            ok = status == "200" and reply.strip() in ("OK", "duplicate")
            return ok, "OK" if ok else reply
        message = twiml_message(reply) if status == "200" else None
        return message is not None, message if message is not None else reply

    async def post(self, phone: str, text: str, message_id: str) -> tuple[bool, str]:
        body, headers = self.request(phone, text, message_id)
        return await self.send(body, headers, self.judge)

    async def deliver(self, rng: random.Random, phone: str, text: str) -> tuple[bool, str]:
        """One message; now and then delivered twice at once (a racing provider retry)."""
        message_id = self.new_id(rng)
        if rng.random() >= self.cfg.retry_rate:
            return await self.post(phone, text, message_id)
        return await racing_retry(self.stats, self.post(phone, text, message_id),
                                  self.post(phone, text, message_id))


def _question(text: str, by_label: dict[str, Question]) -> Question | None:
    """The question in a reply: its label is the first line, or the second after a hint."""
    for line in text.splitlines()[:2]:
        question = by_label.get(line) or by_label.get(fold(line))
        if question is not None:
            return question
    return None


class Citizen:
    """Walks the questionnaire by SMS, reading every reply."""

    def __init__(self, number: int, rng: random.Random, cfg: Config,
                 by_label: dict[str, Question], language: str) -> None:
        self.rng = rng
        self.cfg = cfg
        self.by_label = by_label
        self.language = language
        self.phone = phone(cfg.phone_base + number)
        self.used = services_used(rng)
        self.picked: dict[str, int] = {}
        self.trace: list[str] = []

    def keyword(self) -> str:
        return self.rng.choice(("SURVEY", "SURVEY", "SURVEY", "survey", "Survey ", "START"))

    def answer(self, reply: str) -> str | None:
        if any(line.startswith("Language") for line in reply.splitlines()[:2]):
            # The language menu takes the number only ("English" gets the hint).
            return "1" if self.rng.random() >= self.cfg.label_rate / 5 else "English"
        if reply.startswith("Welcome back"):
            return "1"
        if TOO_MANY in reply:
            return self.keyword()
        question = _question(reply, self.by_label)
        if question is None:
            return None
        if self.rng.random() < self.cfg.typo_rate:
            return self.rng.choice(("99", "x", "yes please", "👍"))
        if question.type == "text":
            return self.rng.choice(IMPROVE)
        if question.type == "note" or not question.choices:
            return "1"
        index = self.picked.get(question.name)
        if index is None:
            index = pick(question, self.rng, self.used)
            self.picked[question.name] = index
        if self.rng.random() < self.cfg.label_rate:
            choice = question.choices[index]
            label = choice.labels.get(self.language) or next(iter(choice.labels.values()))
            return self.rng.choice((label, label.lower(), label.upper(), f" {label}."))
        return self.rng.choice((f"{index + 1}", f"{index + 1}", f"{index + 1}", f" {index + 1}.",
                                f"{index + 1})"))

    async def walk(self, client: Client) -> str:
        text = self.keyword()
        for _ in range(MAX_MESSAGES_PER_CITIZEN):
            self.trace.append(text)
            ok, reply = await client.deliver(self.rng, self.phone, text)
            if not ok:
                return "error"
            if COMPLETED in reply:
                return "completed"
            if ALREADY in reply:
                return "already completed"
            if client.stopping:
                return "cut by the clock"
            if TOO_MANY in reply:
                client.stats.events["too many typos, keyword again"] += 1
            answer = self.answer(reply)
            if answer is None:
                client.stats.events["unrecognised replies"] += 1
                client.stats.sample(f"unrecognised: {reply[:120]!r}")
                return "error"
            text = answer
        return "too many messages"


async def _walkers(cfg: Config, client: Client, traces: list[list[str]]) -> None:
    form = shipped_questionnaire()
    language = form.default_language
    by_label = {q.label(language): q for q in form.questions if q.type != "calculate"}
    next_number = 0

    async def worker(rng: random.Random) -> None:
        nonlocal next_number
        for _ in range(1_000_000):
            if client.stopping:
                return
            number = next_number
            next_number += 1
            citizen = Citizen(number, rng, cfg, by_label, language)
            outcome = await citizen.walk(client)
            client.stats.events[f"citizens {outcome}"] += 1
            if outcome == "completed" and len(traces) < cfg.max_traces:
                traces.append(citizen.trace)

    await loadkit.per_connection(cfg, worker)


async def _replayers(cfg: Config, client: Client) -> None:
    async def play(rng: random.Random, citizen: str, trace: list[Any]) -> None:
        for text in trace:
            if client.stopping:
                return
            ok, _ = await client.deliver(rng, citizen, text)
            if not ok:
                break
        else:
            client.stats.events["conversations replayed"] += 1

    await loadkit.replay(cfg, client, play)


async def run(cfg: Config) -> dict[str, Any]:
    traces: list[list[str]] = []

    def load(client: Client) -> Awaitable[None]:
        if cfg.mode == "replay":
            return _replayers(cfg, client)
        return _walkers(cfg, client, traces)

    result = await loadkit.run_load(
        cfg, lambda session, stats, stop_at: Client(session, cfg, stats, stop_at), load, traces)
    result["shape"] = cfg.shape
    return result


if __name__ == "__main__":
    sys.exit(loadkit.main(sys.argv, Config, run))
