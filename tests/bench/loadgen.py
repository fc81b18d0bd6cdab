"""Load generator: virtual citizens dial the USSD endpoint over loopback (asyncio + aiohttp).

Run as its own process (`python loadgen.py CONFIG.json RESULT.json`) so that it shares no
GIL with the orchestrator. Modes:

- walk:   citizens walk the shipped questionnaire by reading each screen, with the
          Africa's Talking request shape (cumulative `text`, a new sessionId after every END
          that is not the end of the interview); the request sequences are recorded.
- replay: the recorded sequences are replayed (fresh phones and sessionIds) against an
          endpoint whose replies carry no meaning (the bare Flask app).
- park:   `park` citizens each stop at a random point mid-interview and stay live in Redis.

Every loop is bounded in count and time; only loopback URLs are accepted.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import loadkit
from loadkit import (
    ALREADY,
    COMPLETED,
    HEADERS,
    IMPROVE,
    NETWORK,
    LoadConfig,
    phone,
    pick,
    racing_retry,
    services_used,
)

from gateway.coordination.bootstrap import DEFAULT_SERVICE_CODE, shipped_questionnaire
from gateway.interview.questionnaire import Question
from gateway.interview.render import BACK, MORE, fold

MAX_HOPS_PER_CITIZEN = 400  # a full interview is well under 100 screens


@dataclass
class Config(LoadConfig):
    """The shared options (mode: walk | replay | park) and the USSD citizens' own."""

    drop_rate: float = 0.01  # per hop: the network drops the session, the citizen redials
    park: int = 0  # park mode: how many citizens to leave mid-interview


def _judge(status: str, reply: str) -> tuple[bool, str]:
    return status == "200" and reply.startswith(("CON ", "END ")) and len(reply) <= 182, reply


class Client(loadkit.Client):
    """The shared client, posting in Africa's Talking's USSD request shape."""

    async def post(self, session_id: str, phone: str, text: str) -> tuple[bool, str]:
        body = urlencode({"sessionId": session_id, "serviceCode": DEFAULT_SERVICE_CODE,
                          "phoneNumber": phone, "networkCode": NETWORK, "text": text})
        return await self.send(body, HEADERS, _judge)


def _question(screen: str, by_label: dict[str, Question]) -> Question | None:
    """The question on a screen: its label is the first line, or the second after an
    error line, and may be clipped with '...' to make room."""
    for line in screen.splitlines()[:3]:  # the consent screen opens with its parts note
        if line in by_label:
            return by_label[line]
        if line.endswith("...") and len(line) > 20:
            for label, question in by_label.items():
                if label.startswith(line[:-3]):
                    return question
    return None


def _session_id(rng: random.Random) -> str:
    # Africa's Talking's shape: ATUid_ and 32 hex digits.
    return f"ATUid_{rng.getrandbits(128):032x}"


def _phone(number: int) -> str:
    return f"+23324{number % 10_000_000:07d}"


class Citizen:
    """Walks the questionnaire by reading each screen, as a person would."""

    def __init__(self, number: int, rng: random.Random, cfg: Config,
                 by_label: dict[str, Question]) -> None:
        self.rng = rng
        self.cfg = cfg
        self.by_label = by_label
        self.phone = phone(cfg.phone_base + number)
        self.used = services_used(rng)
        self.session_id = ""
        self.session_no = 0
        self.history: list[str] = []
        self.trace: list[tuple[int, str]] = []
        self.picked: dict[str, int] = {}  # one answer per question, however often asked

    def new_session(self) -> None:
        self.session_no += 1
        self.session_id = _session_id(self.rng)
        self.history = []

    def answer(self, screen: str) -> str | None:
        """The next input for this screen; None for a screen we do not recognise."""
        if screen.startswith("Language"):
            return "1"  # English
        if screen.startswith("Welcome back"):
            return "1"  # Continue
        question = _question(screen, self.by_label)
        if question is None:
            return None
        if self.rng.random() < self.cfg.typo_rate:
            return self.rng.choice(("99", "x"))
        if question.type == "text":
            return self.rng.choice(IMPROVE)
        if question.type == "note" or not question.choices:
            return "1"
        index = self.picked.get(question.name)
        if index is None:
            index = pick(question, self.rng, self.used)
            self.picked[question.name] = index
        shown = {line.split(" ", 1)[0] for line in screen.splitlines()}
        if str(index + 1) not in shown and MORE in shown:
            return MORE  # the option is on a later page (region)
        if str(index + 1) not in shown and BACK in shown:
            return BACK
        return str(index + 1)

    async def hop(self, client: Client, text: str | None) -> tuple[bool, str]:
        if text is None:
            self.new_session()
        else:
            self.history.append(text)
        cumulative = "*".join(self.history)
        self.trace.append((self.session_no, cumulative))
        if self.rng.random() >= self.cfg.retry_rate:
            return await client.post(self.session_id, self.phone, cumulative)
        self.trace.append((self.session_no, cumulative))  # the replay sends it twice too
        return await racing_retry(client.stats,
                                  client.post(self.session_id, self.phone, cumulative),
                                  client.post(self.session_id, self.phone, cumulative))

    async def walk(self, client: Client, stop_after: int | None = None) -> str:
        """Walk until the interview is complete, time is up, or `stop_after` hops."""
        ok, reply = await self.hop(client, None)
        for hops in range(1, MAX_HOPS_PER_CITIZEN):
            if not ok:
                return "error"
            if client.stopping:
                return "cut by the clock"
            if reply.startswith("END "):
                if COMPLETED in reply:
                    return "completed"
                if ALREADY in reply:
                    return "already completed"
                client.stats.events["END, redial (part break or too many typos)"] += 1
                ok, reply = await self.hop(client, None)
                continue
            screen = reply[4:]
            if ALREADY in screen:  # the menu after completing
                return "already completed"
            if stop_after is not None and (hops >= stop_after or screen.startswith("Optional")):
                return "parked"
            if self.rng.random() < self.cfg.drop_rate:
                client.stats.events["network drops, redial"] += 1
                ok, reply = await self.hop(client, None)
                continue
            text = self.answer(screen)
            if text is None:
                client.stats.events["unrecognised screens"] += 1
                client.stats.sample(f"unrecognised: {reply[:120]!r}")
                return "error"
            ok, reply = await self.hop(client, text)
        return "too many hops"


# What a replayer posts for one recorded step (the step less its session number).
Send = Callable[[Any, str, str, list[Any]], Awaitable[tuple[bool, str]]]


async def walkers(cfg: Config, client: Any, traces: list[list[Any]],
                  citizen: type[Citizen] = Citizen) -> None:
    """Citizens (of class `citizen`: a provider's request shape) walk the questionnaire,
    one after another on every connection; completed interviews' steps go to `traces`."""
    form = shipped_questionnaire()
    by_label = {fold(q.label(form.default_language)): q for q in form.questions
                if q.type != "calculate"}
    next_number = 0
    lock = asyncio.Lock()

    async def worker(rng: random.Random) -> None:
        nonlocal next_number
        for _ in range(1_000_000):
            if client.stopping:
                return
            async with lock:
                number = next_number
                next_number += 1
                if cfg.mode == "park" and number >= cfg.park:
                    return
            walker = citizen(number, rng, cfg, by_label)
            stop_after = rng.randint(3, 40) if cfg.mode == "park" else None
            outcome = await walker.walk(client, stop_after)
            client.stats.events[f"citizens {outcome}"] += 1
            if outcome == "completed" and len(traces) < cfg.max_traces:
                traces.append(walker.trace)

    await loadkit.per_connection(cfg, worker)


async def replayers(cfg: Config, client: Any, new_session_id: Callable[[random.Random], str],
                    send: Send) -> None:
    """The recorded interviews again, with fresh numbers and session ids: each step is
    [session number, *what `send` posts]."""

    async def play(rng: random.Random, citizen: str, trace: list[Any]) -> None:
        session_no, session_id = -1, ""
        for number, *step in trace:
            if client.stopping:
                return
            if number != session_no:
                session_no, session_id = number, new_session_id(rng)
            ok, _ = await send(client, session_id, citizen, step)
            if not ok:
                break
        client.stats.events["sequences replayed"] += 1

    await loadkit.replay(cfg, client, play)


async def run_citizens(cfg: Config, client_class: type[loadkit.Client],
                       citizen: type[Citizen], new_session_id: Callable[[random.Random], str],
                       send: Send) -> dict[str, Any]:
    """The load of `cfg.mode` in a provider's shape: its client, citizen and replay step."""
    traces: list[list[Any]] = []

    def load(client: Any) -> Awaitable[None]:
        if cfg.mode == "replay":
            return replayers(cfg, client, new_session_id, send)
        return walkers(cfg, client, traces, citizen)

    return await loadkit.run_load(
        cfg, lambda session, stats, stop_at: client_class(session, cfg.url, stats, stop_at),
        load, traces, timed=cfg.mode != "park")


def _send(client: Client, session_id: str, citizen: str,
          step: list[Any]) -> Awaitable[tuple[bool, str]]:
    return client.post(session_id, citizen, step[0])


async def run(cfg: Config) -> dict[str, Any]:
    return await run_citizens(cfg, Client, Citizen, _session_id, _send)


if __name__ == "__main__":
    sys.exit(loadkit.main(sys.argv, Config, run))
