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
from typing import Any

import loadkit
from loadgen import Citizen, Config, run_citizens
from loadkit import racing_retry

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


def _send(client: Client, session_id: str, citizen: str,
          step: list[Any]) -> Awaitable[tuple[bool, str]]:
    sequence, type_, message = step
    return client.post(session_id, citizen[1:], type_, sequence, message)


async def run(cfg: Config) -> dict[str, Any]:
    return await run_citizens(cfg, Client, HubtelCitizen, _session_id, _send)


if __name__ == "__main__":
    sys.exit(loadkit.main(sys.argv, Config, run))
