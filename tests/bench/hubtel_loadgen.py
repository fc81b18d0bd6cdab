"""Load generator for Hubtel's USSD shape: loadgen.py's citizens, Hubtel's requests.

Run as its own process (`python hubtel_loadgen.py CONFIG.json RESULT.json`), with
loadgen.py's Config. The citizens are loadgen.py's (they read each screen and answer it
the same way, with the same drops, typos and racing provider retries); only the requests
differ: JSON as Hubtel's SDK sends it, `Type` initiation then response, `Sequence` 1, 2, ...
per session and `Message` the latest input only. Each reply must be Hubtel's JSON with all
six fields; the citizen reads it as `CON ...` / `END ...` so that loadgen.py's walk applies.

Modes: walk (record the completed sequences) and replay (against the bare app), as in
loadgen.py. Every loop is bounded; only loopback URLs are accepted.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import loadkit
from loadgen import Citizen, Config
from loadkit import phone, racing_retry

from gateway.coordination.bootstrap import shipped_questionnaire
from gateway.interview.render import fold

HEADERS = {"Content-Type": "application/json"}
SERVICE_CODE = "713*20"
DIALLED = "*713*20#"
REPLY_KEYS = {"SessionId", "Type", "Message", "Label", "DataType", "FieldType"}


def _judge(status: str, reply: str) -> tuple[bool, str]:
    """Hubtel's answer, and what the citizen reads of it (as CON/END text)."""
    if status != "200":
        return False, reply
    try:
        data = json.loads(reply)
    except ValueError:
        return False, reply
    ok = (isinstance(data, dict) and set(data) == REPLY_KEYS
          and data["Type"] in ("response", "release") and len(data["Message"]) <= 182)
    if not ok:
        return False, reply
    return True, ("END " if data["Type"] == "release" else "CON ") + data["Message"]


class Client(loadkit.Client):
    """The shared client, posting in Hubtel's request shape."""

    async def post(self, session_id: str, mobile: str, type_: str, sequence: int,
                   message: str) -> tuple[bool, str]:
        body = json.dumps({
            "Type": type_, "Mobile": mobile, "SessionId": session_id,
            "ServiceCode": SERVICE_CODE, "Message": message, "Operator": "mtn",
            "Sequence": sequence, "ClientState": "", "Platform": "USSD", "ExtraData": {}})
        return await self.send(body, HEADERS, _judge)


def _session_id(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"  # Hubtel's: 32 hex digits


class HubtelCitizen(Citizen):
    """loadgen's citizen, dialling through Hubtel: a Sequence, not the cumulative text."""

    sequence = 0

    def new_session(self) -> None:
        super().new_session()
        self.session_id = _session_id(self.rng)
        self.sequence = 0

    async def hop(self, client: Client, text: str | None) -> tuple[bool, str]:  # type: ignore[override]
        if text is None:
            self.new_session()
        type_, message = ("initiation", DIALLED) if text is None else ("response", text)
        self.sequence += 1
        step = (self.session_no, self.sequence, type_, message)
        self.trace.append(step)  # type: ignore[arg-type]
        mobile = self.phone[1:]  # Hubtel sends 233..., without '+'
        if self.rng.random() >= self.cfg.retry_rate:
            return await client.post(self.session_id, mobile, type_, self.sequence, message)
        self.trace.append(step)  # type: ignore[arg-type]  # the replay sends it twice too
        return await racing_retry(
            client.stats,
            client.post(self.session_id, mobile, type_, self.sequence, message),
            client.post(self.session_id, mobile, type_, self.sequence, message))


async def _walkers(cfg: Config, client: Client, traces: list[list[Any]]) -> None:
    form = shipped_questionnaire()
    by_label = {fold(q.label(form.default_language)): q for q in form.questions
                if q.type != "calculate"}
    next_number = 0

    async def worker(rng: random.Random) -> None:
        nonlocal next_number
        for _ in range(1_000_000):
            if client.stopping:
                return
            number, next_number = next_number, next_number + 1
            citizen = HubtelCitizen(number, rng, cfg, by_label)
            outcome = await citizen.walk(client)  # type: ignore[arg-type]
            client.stats.events[f"citizens {outcome}"] += 1
            if outcome == "completed" and len(traces) < cfg.max_traces:
                traces.append(citizen.trace)

    await loadkit.per_connection(cfg, worker)


async def _replayers(cfg: Config, client: Client) -> None:
    traces: list[list[list[Any]]] = json.loads(Path(cfg.traces_in).read_text())
    if not traces:
        raise SystemExit("no traces to replay")
    counter = 0

    async def worker(rng: random.Random) -> None:
        nonlocal counter
        for _ in range(1_000_000):
            counter += 1
            trace = traces[counter % len(traces)]
            mobile = phone(cfg.phone_base + counter)[1:]
            session_no, session_id = -1, ""
            for number, sequence, type_, message in trace:
                if client.stopping:
                    return
                if number != session_no:
                    session_no, session_id = number, _session_id(rng)
                ok, _ = await client.post(session_id, mobile, type_, sequence, message)
                if not ok:
                    break
            client.stats.events["sequences replayed"] += 1

    await loadkit.per_connection(cfg, worker)


async def run(cfg: Config) -> dict[str, Any]:
    traces: list[list[Any]] = []

    def load(client: Client) -> Awaitable[None]:
        if cfg.mode == "replay":
            return _replayers(cfg, client)
        return _walkers(cfg, client, traces)

    return await loadkit.run_load(
        cfg, lambda session, stats, stop_at: Client(session, cfg.url, stats, stop_at), load,
        traces)


if __name__ == "__main__":
    sys.exit(loadkit.main(sys.argv, Config, run))
