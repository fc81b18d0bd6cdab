"""Redis session store: the only storage on the webhook hot path.

A hop costs two round trips: MGET (interview state + provider session record) and one
Lua call that compare-and-sets the state, stores the provider session record (with the
reply, for replays) and XADDs the events to the stream, atomically.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import redis
from redis.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError
from sqlalchemy import or_

from gateway.interview.engine import Event, SessionState, Stage

STREAM = "events"
GROUP = "persist"

# json.dumps(obj, separators=..., ensure_ascii=False) builds a new JSONEncoder on every call
# (its keyword arguments rule out the shared default one); a hop encodes its state, its
# provider session and every event, so one encoder is kept. Same output.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

# Compare-and-set: a concurrent hop for the same interview (a provider retry racing
# the original) makes this return 0 and the caller reloads, so no event is doubled.
_COMMIT = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
end
if ARGV[6] == 'set' then
  redis.call('SET', KEYS[4], '1')
elseif ARGV[6] == 'del' then
  redis.call('DEL', KEYS[4])
end
if ARGV[7] ~= '' then
  redis.call('DEL', ARGV[7])
end
for i = 8, #ARGV do
  redis.call('XADD', KEYS[3], '*', 'e', ARGV[i])
end
return 1
"""


def quota_key(prefix: str, campaign: int) -> str:
    """Where the worker publishes a campaign's full quota cells (a JSON list)."""
    return f"{prefix}quota:{campaign}:full"


# The console's phone simulator dials from Ofcom's range reserved for drama (+44 7700
# 900000-900999): numbers no citizen can have. Their respondents get a pseudonym prefix of
# their own, so simulator interviews are test data everywhere: left out of status counts,
# tallies, exports, quotas and airtime, and never sent an SMS.
SIMULATOR_NUMBERS = "+447700900"
SIMULATOR_PREFIX = "sim-"


def pseudonym(key: bytes, phone: str) -> str:
    """Keyed HMAC of a phone number: stable per installation, useless without the key."""
    # hmac.digest is the one-shot C path: the same value as hmac.new(...).hexdigest().
    digest = hmac.digest(key, phone.encode(), hashlib.sha256).hex()
    if phone.startswith(SIMULATOR_NUMBERS):
        return SIMULATOR_PREFIX + digest[:32 - len(SIMULATOR_PREFIX)]
    return digest[:32]


def is_simulated(respondent: str | None) -> bool:
    """A respondent of the console's phone simulator (test data)."""
    return bool(respondent) and respondent.startswith(SIMULATOR_PREFIX)  # type: ignore[union-attr]


def real_respondent(column: Any) -> Any:
    """SQL: rows of real respondents only (NULL respondents, e.g. declined, are real)."""
    return or_(column.is_(None), ~column.startswith(SIMULATOR_PREFIX, autoescape=True))


def mask_phone(phone: str) -> str:
    """+233241234567 -> +23324***4567, for logs."""
    if len(phone) <= 8:
        return "***"
    return f"{phone[:6]}***{phone[-4:]}"


def stream_event(e: Event, campaign: int, channel: int, respondent: str,
                 version: str) -> dict[str, Any]:
    """An engine event as a stream entry. Declining and withdrawing carry no pseudonym."""
    anonymous = e.kind in ("declined", "withdrawn")
    record: dict[str, Any] = {"id": e.id, "k": e.kind, "c": campaign, "ch": channel,
                              "i": e.interview, "r": None if anonymous else respondent,
                              "ver": version, "t": e.at}
    if e.kind == "answer":
        record["q"], record["v"] = e.question, e.value
    if e.kind == "started":
        record["l"] = e.lang
    return record


def encode_state(state: SessionState, provider_session: str = "") -> str:
    """The state as stored, with the provider session it is being conducted in (so the
    next session can drop the last one's replay record instead of keeping it an hour)."""
    fields = [state.version, state.interview, state.stage.value, state.lang, state.pos,
              state.page, dict(state.answers), int(state.consented), state.seq, state.invalid,
              state.part, int(state.part_break), round(state.session_started, 3),
              state.session_screens, round(state.updated, 3)]
    if provider_session:
        fields.append(provider_session)
    return _dumps(fields)


def state_provider_session(raw: str) -> str:
    """The provider session recorded by encode_state, or ''."""
    fields = json.loads(raw) if raw else []
    return fields[15] if len(fields) > 15 else ""


def decode_state(raw: str) -> SessionState:
    (version, interview, stage, lang, pos, page, answers, consented, seq, invalid, part,
     part_break, started, screens, updated) = json.loads(raw)[:15]
    return SessionState(
        version=version, interview=interview, stage=Stage(stage), lang=lang, pos=pos,
        page=page, answers=tuple(answers.items()), consented=bool(consented), seq=seq,
        invalid=invalid, part=part, part_break=bool(part_break), session_started=started,
        session_screens=screens, updated=updated,
    )


@dataclass(frozen=True)
class ProviderSession:
    """What we remember of one provider session (e.g. one USSD dial)."""

    history: str  # the inputs consumed so far, as the provider sends them (AT: 1*2*3)
    reply: str  # the last reply, returned as-is to a replayed request
    campaign: int
    respondent: str

    def encode(self) -> str:
        return _dumps([self.history, self.reply, self.campaign, self.respondent])

    @classmethod
    def decode(cls, raw: str) -> ProviderSession:
        history, reply, campaign, respondent = json.loads(raw)
        return cls(history, reply, campaign, respondent)


@dataclass(frozen=True)
class Loaded:
    state_raw: str  # '' when there is no state
    provider: ProviderSession | None
    opted_out: bool = False
    full_cells: frozenset[str] = frozenset()  # the campaign's full quota cells

    @property
    def state(self) -> SessionState | None:
        return decode_state(self.state_raw) if self.state_raw else None


# Bumped in a forked child: a connection a thread had in the parent is not the child's.
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class _ThreadConnection(threading.local):
    conn: AbstractConnection | None = None
    forks = -1


class SessionStore:
    def __init__(self, client: redis.Redis, prefix: str = "cd:") -> None:
        self.r = client
        self.prefix = prefix
        self.stream = f"{prefix}{STREAM}"
        self._commit = client.register_script(_COMMIT)
        self._own = _ThreadConnection()

    def _execute(self, *args: Any) -> Any:
        """One command of the hop (MGET, EVALSHA) on this thread's own connection.

        redis-py's execute_command borrows a pooled connection, wraps the call in
        metrics and locking bookkeeping and hands the connection back: per command, about
        half as much CPU again as the round trip itself. A thread that keeps a connection
        (of the client's class and settings) needs none of that; gunicorn's threads live
        as long as their worker. What the pool checks on lending, this checks too: a
        connection with a stray reply or an EOF waiting (closed by the server while idle)
        is replaced before use. As in the client, any failure but an error reply drops
        the connection, under the connection's own retry policy; the reply is the one
        the client returns (no response callback applies to these commands)."""
        own = self._own
        conn = own.conn
        if conn is None or own.forks != _forks:
            pool = self.r.connection_pool
            conn = own.conn = pool.connection_class(**pool.connection_kwargs)
            own.forks = _forks
        try:
            stale = conn.can_read()  # connects first if it is not connected
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            stale = True
        if stale:
            conn.disconnect()
            conn.connect()
        return conn.retry.call_with_retry(lambda: _round_trip(conn, args),
                                          lambda _error: conn.disconnect())

    def state_key(self, campaign: int, respondent: str) -> str:
        return f"{self.prefix}st:{campaign}:{respondent}"

    def provider_key(self, channel: int, session_id: str) -> str:
        return f"{self.prefix}ps:{channel}:{session_id}"

    def optout_key(self, respondent: str) -> str:
        return f"{self.prefix}optout:{respondent}"

    def load(self, campaign: int, respondent: str, channel: int, session_id: str,
             quotas: bool = False) -> Loaded:
        """State, provider session (or message) record, opt-out flag and, for a campaign
        with quotas, its full cells: one round trip."""
        keys = [self.state_key(campaign, respondent), self.provider_key(channel, session_id),
                self.optout_key(respondent)]
        if quotas:
            keys.append(quota_key(self.prefix, campaign))
        state_raw, provider_raw, optout, *full = self._execute("MGET", *keys)
        return Loaded(
            state_raw=_text(state_raw),
            provider=ProviderSession.decode(_text(provider_raw)) if provider_raw else None,
            opted_out=optout is not None,
            full_cells=frozenset(json.loads(full[0])) if full and full[0] else frozenset(),
        )

    def commit(self, *, campaign: int, respondent: str, channel: int, session_id: str,
               expected: str, state: str, state_ttl: int, provider: ProviderSession | None,
               provider_ttl: int, events: list[dict[str, Any]], optout: str = "",
               forget_session: str = "") -> bool:
        """Atomically replace the state (if still `expected`), remember the provider
        session/message and its reply, set or clear the opt-out flag ('set'/'del'), drop
        an earlier provider session's record (`forget_session`), and append events."""
        forget = (self.provider_key(channel, forget_session)
                  if forget_session and forget_session != session_id else "")
        args: list[Any] = [expected, state, max(1, state_ttl),
                           provider.encode() if provider else "", max(1, provider_ttl), optout,
                           forget]
        args.extend(_dumps(e) for e in events)
        keys = [self.state_key(campaign, respondent), self.provider_key(channel, session_id),
                self.stream, self.optout_key(respondent)]
        try:
            return bool(self._execute("EVALSHA", self._commit.sha, len(keys), *keys, *args))
        except NoScriptError:  # a restarted or flushed server: load it, as Script does
            return bool(self._commit(keys=keys, args=args))

    def results(self, campaign: int, lang_code: str, region: str | None) -> str | None:
        """The published summary for a region (else the nation), in the language asked
        (else English); written by `civicdial publish`."""
        fields = [f"{code}:{place}" for code in dict.fromkeys((lang_code, "en"))
                  for place in ((region,) if region else ()) + ("_national",)]
        for value in self.r.hmget(f"{self.prefix}results:{campaign}", fields):
            if value:
                return _text(value)
        return None

    def opted_out(self, respondent: str) -> bool:
        return bool(self.r.exists(self.optout_key(respondent)))

    def append(self, events: list[dict[str, Any]]) -> None:
        """Append events that belong to no interview state (e.g. provider notifications)."""
        pipe = self.r.pipeline(transaction=True)
        for e in events:
            pipe.xadd(self.stream, {"e": json.dumps(e, separators=(",", ":"))})
        pipe.execute()

    def waiting(self) -> int:
        """Events not yet in SQL: persisted entries are deleted from the stream."""
        return int(self.r.xlen(self.stream))


def _round_trip(conn: AbstractConnection, args: tuple[Any, ...]) -> Any:
    try:
        conn.send_command(*args)
        return conn.read_response()
    except ResponseError:
        raise  # an error reply: read whole, the connection is still in step
    except BaseException:
        conn.disconnect()  # may be mid-reply: never reuse it
        raise


def _text(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    return raw.decode() if isinstance(raw, bytes) else raw
