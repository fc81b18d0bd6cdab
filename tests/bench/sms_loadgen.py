"""SMS load generator: virtual citizens text the inbound SMS endpoints over loopback.

Run as its own process (`python sms_loadgen.py CONFIG.json RESULT.json`), like loadgen.py,
whose statistics, percentiles and CPU marks it reuses. Modes:

- twilio: citizens text the campaign keyword to a Twilio SMS channel that replies inline
          (TwiML), read each reply and answer it: the option number mostly, the option
          label sometimes (`agree`, `Urban.`), free text where asked. Every request carries
          a fresh MessageSid and an X-Twilio-Signature computed over the URL the server sees.
          The bodies of completed interviews are recorded.
- replay: the recorded conversations are replayed (fresh numbers and message ids) in one
          provider's request shape (`shape`: twilio or africastalking); for the bare Flask
          app, and for the Africa's Talking channel, whose replies go out by the queue (the
          HTTP answer is just `OK`, so there is nothing to read).

A small share of messages are delivered twice at once with the same message id (a provider
retry racing the original); both answers must match. Every loop is bounded in count and
time; only loopback URLs are accepted.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
from loadgen import MAX_REQUESTS, CpuMark, Stats, _children, _percentile, _phone, cores_used
from twilio.request_validator import RequestValidator

from gateway.cli import shipped_questionnaire
from gateway.questionnaire import Question
from gateway.render import fold

HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}
NETWORK = "62001"  # MTN Ghana
SHORT_CODE = "1662"
MAX_MESSAGES_PER_CITIZEN = 200  # a full interview is about 25 messages
COMPLETED = "Your answers are recorded"
ALREADY = "already completed"
TOO_MANY = "Too many invalid"
IMPROVE = ("Fewer queues at the clinic", "Open the ID office on Saturdays",
           "Cheaper school uniforms", "More nurses at night", "Answer the phone")


@dataclass
class Config:
    url: str
    mode: str  # twilio | replay
    shape: str = "twilio"  # request shape: twilio | africastalking
    auth_token: str = ""
    account_sid: str = "AC" + "0" * 32
    to: str = "+15005550006"
    connections: int = 32
    warmup: float = 3.0
    duration: float = 20.0
    seed: int = 1662
    phone_base: int = 0
    retry_rate: float = 0.01  # the same message delivered twice at once
    typo_rate: float = 0.02
    label_rate: float = 0.25  # answer a choice by its label instead of its number
    traces_in: str = ""
    traces_out: str = ""
    max_traces: int = 5000
    timeout: float = 10.0
    watch: dict[str, list[int]] = field(default_factory=dict)


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


class Client:
    """One keep-alive HTTP client shared by all citizens, with a request budget."""

    def __init__(self, session: aiohttp.ClientSession, cfg: Config, stats: Stats,
                 stop_at: float) -> None:
        self.session = session
        self.cfg = cfg
        self.stats = stats
        self.stop_at = stop_at
        self.sent = 0
        self.validator = RequestValidator(cfg.auth_token or "unused")
        self.ids = 0

    @property
    def stopping(self) -> bool:
        return time.monotonic() >= self.stop_at or self.sent >= MAX_REQUESTS

    def new_id(self, rng: random.Random) -> str:
        self.ids += 1
        if self.cfg.shape == "twilio":
            return f"SM{rng.getrandbits(128):032x}"
        return f"ATXid_{rng.getrandbits(128):032x}"

    def request(self, phone: str, text: str, message_id: str) -> tuple[str, dict[str, str]]:
        """The body and headers the provider would send for this message."""
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

    async def post(self, phone: str, text: str, message_id: str) -> tuple[bool, str]:
        body, headers = self.request(phone, text, message_id)
        self.sent += 1
        start = time.monotonic()
        try:
            async with self.session.post(self.cfg.url, data=body, headers=headers) as resp:
                reply = await resp.text()
                status = str(resp.status)
        except (TimeoutError, aiohttp.ClientError) as exc:
            reply, status = type(exc).__name__, "exc"
        latency = time.monotonic() - start
        if self.cfg.shape == "africastalking":
            ok, text_out = status == "200" and reply == "OK", reply
        else:
            message = twiml_message(reply) if status == "200" else None
            ok, text_out = message is not None, message if message is not None else reply
        self.stats.add(start, latency, ok, status, reply)
        return ok, text_out

    async def deliver(self, rng: random.Random, phone: str, text: str) -> tuple[bool, str]:
        """One message; now and then delivered twice at once (a racing provider retry)."""
        message_id = self.new_id(rng)
        if rng.random() >= self.cfg.retry_rate:
            return await self.post(phone, text, message_id)
        self.stats.events["provider retries racing the original"] += 1
        (ok, reply), (ok2, again) = await asyncio.gather(
            self.post(phone, text, message_id), self.post(phone, text, message_id))
        if ok and ok2 and again != reply:
            self.stats.events["retry got a different reply"] += 1
            if len(self.stats.error_samples) < 10:
                self.stats.error_samples.append(f"retry differs: {reply!r} / {again!r}")
        if not ok and ok2:
            return ok2, again
        return ok, reply


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
        self.phone = _phone(cfg.phone_base + number)
        self.used = {s: rng.random() < 0.5 for s in ("h_used", "p_used", "s_used", "g_used")}
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
            index = self.pick(question)
            self.picked[question.name] = index
        if self.rng.random() < self.cfg.label_rate:
            choice = question.choices[index]
            label = choice.labels.get(self.language) or next(iter(choice.labels.values()))
            return self.rng.choice((label, label.lower(), label.upper(), f" {label}."))
        return self.rng.choice((f"{index + 1}", f"{index + 1}", f"{index + 1}", f" {index + 1}.",
                                f"{index + 1})"))

    def pick(self, question: Question) -> int:
        """0-based option: consent yes, adults only, some services used."""
        if question.name == "consent":
            return 0
        if question.name == "age":
            return self.rng.randrange(1, len(question.choices))
        if question.name in self.used:
            return 0 if self.used[question.name] else self.rng.choice((1, 1, 1, 2))
        return self.rng.randrange(len(question.choices))

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
                if len(client.stats.error_samples) < 10:
                    client.stats.error_samples.append(f"unrecognised: {reply[:120]!r}")
                return "error"
            text = answer
        return "too many messages"


async def _walkers(cfg: Config, client: Client, stats: Stats, traces: list[list[str]]) -> None:
    form = shipped_questionnaire()
    language = form.default_language
    by_label = {q.label(language): q for q in form.questions if q.type != "calculate"}
    next_number = 0

    async def worker(w: int) -> None:
        nonlocal next_number
        rng = random.Random(cfg.seed * 1000 + w)
        for _ in range(1_000_000):
            if client.stopping:
                return
            number = next_number
            next_number += 1
            citizen = Citizen(number, rng, cfg, by_label, language)
            outcome = await citizen.walk(client)
            stats.events[f"citizens {outcome}"] += 1
            if outcome == "completed" and len(traces) < cfg.max_traces:
                traces.append(citizen.trace)

    await asyncio.gather(*(worker(w) for w in range(cfg.connections)))


async def _replayers(cfg: Config, client: Client, stats: Stats) -> None:
    traces: list[list[str]] = json.loads(Path(cfg.traces_in).read_text())
    if not traces:
        raise SystemExit("no traces to replay")
    counter = 0

    async def worker(w: int) -> None:
        nonlocal counter
        rng = random.Random(cfg.seed * 1000 + w)
        for _ in range(1_000_000):
            counter += 1
            trace = traces[counter % len(traces)]
            phone = _phone(cfg.phone_base + counter)
            for text in trace:
                if client.stopping:
                    return
                ok, _ = await client.deliver(rng, phone, text)
                if not ok:
                    break
            else:
                stats.events["conversations replayed"] += 1

    await asyncio.gather(*(worker(w) for w in range(cfg.connections)))


async def run(cfg: Config) -> dict[str, Any]:
    host = urlsplit(cfg.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load a non-loopback host: {host}")
    stats = Stats()
    traces: list[list[str]] = []
    begin = time.monotonic()
    measure_from = begin + cfg.warmup
    stop_at = measure_from + cfg.duration
    connector = aiohttp.TCPConnector(limit=cfg.connections, limit_per_host=cfg.connections)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout)
    watch = {name: [p for pid in pids for p in (pid, *_children(pid))]
             for name, pids in cfg.watch.items()}
    cpu_marks: dict[str, CpuMark] = {}

    async def mark(at: float, name: str) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        cpu_marks[name] = CpuMark.take(watch)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = Client(session, cfg, stats, stop_at)
        marks = [asyncio.create_task(mark(measure_from, "from")),
                 asyncio.create_task(mark(stop_at, "to"))]
        if cfg.mode == "replay":
            await _replayers(cfg, client, stats)
        else:
            await _walkers(cfg, client, stats, traces)
        await asyncio.wait(marks, timeout=2.0)
        for task in marks:
            task.cancel()
    if cfg.traces_out:
        Path(cfg.traces_out).write_text(json.dumps(traces))
    window = [i for i, s in enumerate(stats.starts) if measure_from <= s < stop_at]
    latencies = sorted(stats.latencies[i] for i in window)
    result: dict[str, Any] = {
        "mode": cfg.mode, "shape": cfg.shape, "requests": len(window),
        "seconds": cfg.duration, "rps": len(window) / cfg.duration if cfg.duration else 0.0,
        "p50_ms": _percentile(latencies, 0.50) * 1000,
        "p90_ms": _percentile(latencies, 0.90) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "max_ms": (latencies[-1] * 1000) if latencies else float("nan"),
        "errors": sum(1 for i in window if not stats.oks[i]),
        "statuses": dict(stats.statuses), "error_samples": stats.error_samples,
        "events": dict(stats.events), "all_requests": len(stats.starts),
        "traces": len(traces),
    }
    if "from" in cpu_marks and "to" in cpu_marks:
        result["cores"] = cores_used(cpu_marks["from"], cpu_marks["to"])
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: sms_loadgen.py CONFIG.json RESULT.json", file=sys.stderr)
        return 2
    cfg = Config(**json.loads(Path(argv[1]).read_text()))
    result = asyncio.run(run(cfg))
    Path(argv[2]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
