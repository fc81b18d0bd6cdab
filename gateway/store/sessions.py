"""Redis session store: the only storage on the webhook hot path.

A hop costs two round trips: MGET (interview state + provider session record) and one
Lua call that compare-and-sets the state, stores the provider session record (with the
reply, for replays) and XADDs the events to the stream, atomically. The next hop of a USSD
session that this process committed costs one: it starts from what was committed, and the
commit compares every value the hop relied on (SessionStore.load's `warm`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import hiredis
import orjson
import redis
from redis._parsers.base import BaseParser
from redis.connection import AbstractConnection
from redis.exceptions import NoScriptError
from sqlalchemy import or_

from gateway.interview.engine import Event, SessionState, Stage
from gateway.interview.messages import message
from gateway.interview.questionnaire import INELIGIBLE

STREAM = "events"
GROUP = "persist"


def _dumps(value: Any) -> str:
    """Compact JSON, non-ASCII as UTF-8: what json.dumps(value, separators=(",", ":"),
    ensure_ascii=False) writes, at a tenth of its cost (a float under 1e-4 is spelt 1e-7,
    not 1e-07: the same number). A hop encodes its state, its provider session and every
    event, and decodes the state and provider session it loaded, so the JSON of the hot
    path is orjson's (tests/test_sessions.py checks the two agree)."""
    return orjson.dumps(value).decode()


# How long a provider session's record outlives its end (END, the provider's own end, a
# new dial): the operator has closed the session, so only quick retries can follow.
ENDED_SESSION_TTL = 300

# A provider session's record marked ended (ProviderSession's fifth field) in place: a
# retry of its last hop still gets its reply, anything else SessionEnded.
_CLOSE = f"""
local function close(key)
  local old = redis.call('GET', key)
  if old then
    local f = cjson.decode(old)
    f[5], f[6] = 1, f[6] or ''
    local ttl = redis.call('TTL', key)
    if ttl < 1 or ttl > {ENDED_SESSION_TTL} then ttl = {ENDED_SESSION_TTL} end
    redis.call('SET', key, cjson.encode(f), 'EX', ttl)
  end
end
"""

# Compare-and-set: a concurrent hop for the same interview (a provider retry racing
# the original) makes this return 0 and the caller reloads, so no event is doubled.
# A hop that did not read (a warm load) also has every other value it relied on compared
# (KEYS[5..4+g] against ARGV[11..10+g]: nil compares as ''), and is counted against the
# per-number limits here (KEYS[5+g..4+g+l], at most ARGV[11+g..]; each counter expires
# after ARGV[10] s): over a limit, nothing is written and it returns -1, or -2 for the
# first hop over it. Counted only once the values hold, so a hop that goes on to read
# afresh and count there is counted once.
_COMMIT = _CLOSE + """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return 0 end
local g, l = tonumber(ARGV[8]), tonumber(ARGV[9])
for i = 1, g do
  if (redis.call('GET', KEYS[4 + i]) or '') ~= ARGV[10 + i] then return 0 end
end
local over = 0
for i = 1, l do
  local key, limit = KEYS[4 + g + i], tonumber(ARGV[10 + g + i])
  local n = redis.call('INCR', key)
  redis.call('EXPIRE', key, ARGV[10])
  if n == limit + 1 then over = 2 elseif n > limit and over == 0 then over = 1 end
end
if over > 0 then return -over end
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
  close(ARGV[7])
end
for i = 11 + g + l, #ARGV do
  redis.call('XADD', KEYS[3], '*', 'e', ARGV[i])
end
return 1
"""

# How many sessions a process remembers its last commit of (SessionStore.load's `warm`):
# more than a worker has under way at once, and at most a few MB.
RECALLED_SESSIONS = 4096
# A failed warm hop costs about a hop (its step and commit are lost), a good one saves a
# round trip: worth it only while nearly all succeed. Above this share of failures (over
# roughly the last 50 tries) a process stops trying, as when a proxy spreads a session's
# hops over the workers at random, and tries one hop in WARM_PROBE to see if that changed.
WARM_FAILURES = 0.2
WARM_PROBE = 32
_DECAY = 0.98


# A field of the results hash that `publish` always writes (the snapshot's version), so
# RESULTS can tell "published, too few answers for a figure" from "not published".
RESULTS_PUBLISHED = "_published"


def quota_key(prefix: str, campaign: int) -> str:
    """Where the worker publishes a campaign's full quota cells (a JSON list)."""
    return f"{prefix}quota:{campaign}:full"


# The console's phone simulator dials from Ofcom's range reserved for drama (+44 7700
# 900000-900999): numbers no citizen can have. Their respondents get a pseudonym prefix of
# their own, so simulator interviews are test data everywhere: left out of status counts,
# tallies, exports, quotas and airtime, and never sent an SMS.
SIMULATOR_NUMBERS = "+447700900"
SIMULATOR_PREFIX = "sim-"


# HMAC-SHA256 keyed once per key: a copy starts from the key's pads, where hmac.digest
# looks the digest up in OpenSSL and hashes the key again on every call (about half the
# cost of a pseudonym in a hop). Installations have one key; tests make a few.
_KEYED: dict[bytes, Any] = {}


def pseudonym(key: bytes, phone: str) -> str:
    """Keyed HMAC of a phone number: stable per installation, useless without the key."""
    keyed = _KEYED.get(key)
    if keyed is None:
        keyed = _KEYED.setdefault(key, hmac.new(key, digestmod=hashlib.sha256))
    mac = keyed.copy()
    mac.update(phone.encode())
    digest = mac.hexdigest()
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
    """An engine event as a stream entry. Declining, withdrawing and being ineligible
    (under 18) carry no pseudonym: nothing links them to a person."""
    anonymous = e.kind in ("declined", "withdrawn") or (
        e.kind == "screened_out" and e.value == INELIGIBLE)
    record: dict[str, Any] = {"id": e.id, "k": e.kind, "c": campaign, "ch": channel,
                              "i": e.interview, "r": None if anonymous else respondent,
                              "ver": version, "t": e.at}
    if e.kind == "answer":
        record["q"], record["v"] = e.question, e.value
    if e.kind == "started":
        record["l"] = e.lang
    if e.kind == "screened_out" and e.value:
        record["why"] = e.value
    if e.kind == "part_break":
        record["part"] = int(e.value or 0)
    return record


def encode_state(state: SessionState, provider_session: str = "", channel: int = 0) -> str:
    """The state as stored, with where it is being conducted: the channel and, for USSD,
    the provider session. So the next session, on any channel, can close the last one's
    replay record, and input from a session the interview has since left is not taken as
    an answer to the question it now shows."""
    fields = [state.version, state.interview, state.stage.value, state.lang, state.pos,
              state.page, dict(state.answers), int(state.consented), state.seq, state.invalid,
              state.part, int(state.part_break), round(state.session_started, 3),
              state.session_screens, round(state.updated, 3)]
    if provider_session or channel:
        fields += [provider_session, channel]
    return _dumps(fields)


@dataclass(frozen=True)
class Conductor:
    """Where a state was last conducted: its channel (0: not recorded, a state stored
    before the channel was) and its provider session ('' for SMS)."""

    channel: int
    session: str

    def is_other(self, channel: int, session: str) -> bool:
        """Another channel or session than (channel, session), as far as is recorded."""
        if self.channel == 0:
            return bool(self.session) and self.session != session
        return (self.channel, self.session) != (channel, session)


def state_conductor(raw: str) -> Conductor | None:
    """Where encode_state says the state was last conducted, or None."""
    fields = orjson.loads(raw) if raw else []
    if len(fields) <= 15:
        return None
    return Conductor(int(fields[16]) if len(fields) > 16 else 0, str(fields[15]))


def decode_state(raw: str) -> SessionState:
    (version, interview, stage, lang, pos, page, answers, consented, seq, invalid, part,
     part_break, started, screens, updated) = orjson.loads(raw)[:15]
    # Every field, set as SessionState's own __init__ would (it has no __post_init__),
    # without its fifteen frozen-dataclass object.__setattr__ calls: a hop decodes one.
    state = object.__new__(SessionState)
    state.__dict__.update(
        version=version, interview=interview, stage=Stage(stage), lang=lang, pos=pos,
        page=page, answers=tuple(answers.items()), consented=bool(consented), seq=seq,
        invalid=invalid, part=part, part_break=bool(part_break), session_started=started,
        session_screens=screens, updated=updated,
    )
    return state


class OverLimit(Exception):
    """A hop from a warm load was over a per-number limit (HopLimits) when it came to
    commit: nothing was written. `first`: the first hop over it (the one to log)."""

    def __init__(self, first: bool) -> None:
        super().__init__("over the per-number limit")
        self.first = first


class SessionEnded(Exception):
    """A hop on a provider session that has already ended, and not a retry of its last
    hop: the provider (or someone replaying its requests) must get 409, and nothing may
    change."""


@dataclass(frozen=True)
class ProviderSession:
    """What we remember of one provider session (e.g. one USSD dial)."""

    # Where the session stands, as the provider counts: AT the inputs so far as it sends
    # them (1*2*3), Hubtel the last Sequence, Arkesel the hops we counted.
    history: str
    reply: str  # the last reply, returned as-is to a replayed request
    campaign: int
    respondent: str
    # The last reply closed the session (END, Hubtel "Release"): only a retry of that
    # hop may follow. Kept as a flag, not read from the reply, so it holds whatever
    # shape a provider's replies take.
    ended: bool = False
    # The entries so far in the menu after completion ('2' = chose to erase), if any.
    menu: str = ""

    def encode(self) -> str:
        fields: list[Any] = [self.history, self.reply, self.campaign, self.respondent]
        if self.ended or self.menu:
            fields += [int(self.ended), self.menu]
        return _dumps(fields)

    @classmethod
    def decode(cls, raw: str) -> ProviderSession:
        history, reply, campaign, respondent, *rest = orjson.loads(raw)
        return cls(history, reply, campaign, respondent, bool(rest and rest[0]),
                   rest[1] if len(rest) > 1 else "")

    def answer_to(self, retry: bool) -> str | None:
        """The rule for every provider's hop on a session we know: a retry of the last hop
        gets the stored reply; once the session has ended, anything else raises
        SessionEnded (hops after END once stored answers for questions nobody saw);
        None: a new hop to process."""
        if retry:
            return self.reply
        if self.ended:
            raise SessionEnded("this session has ended")
        return None


@dataclass(frozen=True)
class HopLimits:
    """At most `per_respondent` hops per `window` seconds from one respondent on one
    channel, and `per_channel` from everyone on it (0: no limit)."""

    window: int = 10
    per_respondent: int = 0
    per_channel: int = 0

    @property
    def on(self) -> bool:
        return bool(self.per_respondent or self.per_channel)


@dataclass(frozen=True)
class Loaded:
    state_raw: str  # '' when there is no state
    provider: ProviderSession | None
    opted_out: bool = False
    full_cells: frozenset[str] = frozenset()  # the campaign's full quota cells
    extra: tuple[str, ...] = ()  # the values of the extra keys asked for ('' if unset)
    # Over a per-number limit (HopLimits) in this window; `first_limited`: this is the
    # first hop over it (the one that gets told, so a flood gets one answer).
    limited: bool = False
    first_limited: bool = False
    # The full quota cells as read (their JSON, '' if unset); None: not asked for.
    quota_raw: str | None = None
    # Not read from Redis: what this process committed for the session last. Only a
    # commit may follow (it compares `guards`, (key, value) pairs, and counts the limits);
    # a hop that would answer without committing loads again first.
    warm: bool = False
    guards: tuple[tuple[str, str], ...] = ()

    @property
    def state(self) -> SessionState | None:
        return decode_state(self.state_raw) if self.state_raw else None


# Bumped in a forked child: a connection a thread had in the parent is not the child's.
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)

_READ_SIZE = 16384
# A reply error (-NOSCRIPT, -ERR ...) as redis-py's exception (NoScriptError,
# ResponseError, BusyLoadingError ...), made by hiredis as it parses the reply.
_ERROR = BaseParser.parse_error


class _Link(threading.local):
    """This thread's connection for the hop's commands (see SessionStore._exchange)."""

    conn: AbstractConnection | None = None
    sock: socket.socket | None = None  # conn's socket, blocking with kernel timeouts
    reader: Any = None  # a hiredis.Reader of this connection's replies
    buffer: bytearray = bytearray()
    used = False  # has carried a command since it connected
    forks = -1


class _Closed(Exception):
    """The server closed the connection, or reset it, before any byte of the reply."""


@dataclass(frozen=True)
class _Recalled:
    """What this process last committed for a session (see SessionStore.load)."""

    provider_key: str
    state: str
    provider: ProviderSession
    provider_raw: str
    quota_raw: str | None
    # Whether the session's next hop here may start from this. A warm hop whose commit
    # failed (another worker had answered since) stops it, so a session whose hops go to
    # every worker in turn wastes at most one attempt a worker; a read that finds this
    # state unchanged (the last hop was ours after all) brings it back.
    trusted: bool = True


class SessionStore:
    def __init__(self, client: redis.Redis, prefix: str = "cd:",
                 limits: HopLimits | None = None) -> None:
        self.r = client
        self.prefix = prefix
        self.limits = limits or HopLimits()
        self.stream = f"{prefix}{STREAM}"
        self._commit = client.register_script(_COMMIT)
        self._close = client.register_script(_CLOSE + "close(KEYS[1])")
        self._own = _Link()
        # state key -> its last commit by this process (insertion order: oldest first)
        self._recalled: dict[str, _Recalled] = {}
        # Warm hops tried and failed, decayed (see WARM_FAILURES); races between threads
        # only blur them. Ten good tries to start with, so that one early failure (a
        # racing retry) does not close the gate.
        self._warm_tries, self._warm_fails = 10.0, 0.0
        self._warm_skipped = 0

    def _execute(self, *args: Any) -> Any:
        """One command of the hop (MGET, EVALSHA) in one round trip; its reply."""
        return self._execute_many([args])[0]

    def _execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Several commands in one round trip (pipelined, not a transaction); the replies
        in order. An error reply is raised (as redis-py's exception) once every reply is
        read, so the connection stays in step."""
        replies = self._exchange(commands)
        error = next((r for r in replies if isinstance(r, redis.RedisError)), None)
        if error is not None:
            raise error
        return replies

    def run(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Plain commands (no response callbacks) in one round trip, as the hop's own."""
        return self._execute_many(commands) if commands else []

    def _exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send `commands` on this thread's own connection and read their replies (error
        replies as values).

        Why not the client's execute_command: it borrows a pooled connection, wraps the
        call in metrics and locking bookkeeping and gives it back, and its socket has a
        Python-level timeout, which makes CPython poll() before every send and every
        recv; the pool also polls once more on lending to catch a closed connection.
        Per hop that was six poll() calls and half as much CPU again as the round trips
        themselves (tests/bench/README.md). Here the socket blocks, with the client's
        socket_timeout set in the kernel (SO_SNDTIMEO, SO_RCVTIMEO), commands are packed
        and replies parsed by hiredis directly, and a connection the server closed while
        it sat idle (EOF or reset before any reply byte) is replaced and the commands
        sent once more at once, which is what the pool's check on lending achieved: a
        hop's commands are safe to send again (MGET reads; the commit is a
        compare-and-set). Any other failure drops the connection and raises, as the
        client does; gunicorn's threads live as long as their worker, so the connection
        does too."""
        packed = b"".join([hiredis.pack_command(c) for c in commands])
        for _ in range(2):
            link = self._link()
            try:
                replies = _send_and_read(link, packed, len(commands))
            except _Closed:
                reused = link.used
                self._drop(link)
                if reused:
                    continue  # closed while idle: once more on a new connection
                raise redis.ConnectionError("Connection closed by server.") from None
            except BlockingIOError:  # SO_RCVTIMEO / SO_SNDTIMEO ran out
                self._drop(link)
                raise redis.TimeoutError("Timeout reading from socket") from None
            except OSError as exc:
                self._drop(link)
                raise redis.ConnectionError(f"Error while talking to Redis: {exc}") from None
            except BaseException:
                self._drop(link)  # may be mid-reply: never reuse it
                raise
            link.used = True
            return replies
        raise redis.ConnectionError("Connection closed by server.")

    def _link(self) -> _Link:
        link = self._own
        if link.conn is None or link.forks != _forks:
            pool = self.r.connection_pool
            link.conn = pool.connection_class(**pool.connection_kwargs)
            link.forks, link.sock = _forks, None
        if link.sock is None:
            conn = link.conn
            conn.connect()  # redis-py's connect and handshake (AUTH, SELECT, ...)
            sock = conn._sock  # type: ignore[attr-defined]
            timeout = conn.socket_timeout  # type: ignore[attr-defined]
            sock.settimeout(None)
            if timeout:
                seconds = int(timeout)
                micros = int((timeout - seconds) * 1_000_000)
                timeval = struct.pack("ll", seconds, micros)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            link.sock, link.used = sock, False
            link.reader = hiredis.Reader(replyError=_ERROR)
            if len(link.buffer) != _READ_SIZE:
                link.buffer = bytearray(_READ_SIZE)
        return link

    @staticmethod
    def _drop(link: _Link) -> None:
        if link.conn is not None:
            link.conn.disconnect()
        link.sock = link.reader = None

    def state_key(self, campaign: int, respondent: str) -> str:
        return f"{self.prefix}st:{campaign}:{respondent}"

    def provider_key(self, channel: int, session_id: str) -> str:
        return f"{self.prefix}ps:{channel}:{session_id}"

    def optout_key(self, respondent: str) -> str:
        return f"{self.prefix}optout:{respondent}"

    def load(self, campaign: int, respondent: str, channel: int, session_id: str,
             quotas: bool = False, extra: tuple[str, ...] = (), warm: bool = False) -> Loaded:
        """State, provider session (or message) record, opt-out flag, for a campaign with
        quotas its full cells, and any `extra` keys (e.g. a pending erasure): one round
        trip.

        `warm`: if this process's last commit of the state was with `remember` and for this
        provider session, no round trip: the Loaded holds what that commit wrote, and the
        commit that follows compares the provider session record, the opt-out flag and the
        quota cells with it as well as the state, so a change made anywhere else (a retry
        answered by another worker, an erasure, an expiry, a quota filled) fails it and
        the caller reads afresh. Over kept-alive connections the next hop of a session
        often reaches the worker that answered the last (82-90% of hops in the bench)."""
        state_key = self.state_key(campaign, respondent)
        provider_key = self.provider_key(channel, session_id)
        hit = self._recalled.get(state_key) if warm and not extra else None
        # The gate last: a hop that could not start warm anyway is not one of its probes.
        if (hit is not None and hit.trusted and hit.provider_key == provider_key
                and (hit.quota_raw is not None) == quotas and self._warm_worth_it()):
            guards = [(provider_key, hit.provider_raw), (self.optout_key(respondent), "")]
            if hit.quota_raw is not None:
                guards.append((quota_key(self.prefix, campaign), hit.quota_raw))
            return Loaded(state_raw=hit.state, provider=hit.provider,
                          full_cells=_cells(hit.quota_raw), quota_raw=hit.quota_raw,
                          warm=True, guards=tuple(guards))
        keys = [state_key, provider_key, self.optout_key(respondent), *extra]
        if quotas:
            keys.append(quota_key(self.prefix, campaign))
        commands: list[tuple[Any, ...]] = [("MGET", *keys)]
        counted = self._limit_commands(channel, respondent) if self.limits.on else []
        replies = self._execute_many(commands + counted)
        state_raw, provider_raw, optout, *rest = replies[0]
        more, full = rest[:len(extra)], rest[len(extra):]
        limited = first = False
        if counted:
            # Replies: INCR, EXPIRE per counter, respondent's first.
            limits = [n for n in (self.limits.per_respondent, self.limits.per_channel) if n]
            for limit, count in zip(limits, replies[1::2], strict=True):
                if count > limit:
                    limited = True
                    first = first or count == limit + 1
        quota_raw = _text(full[0]) if full else None
        state_text = _text(state_raw)
        if hit is not None and not hit.trusted and hit.state == state_text:
            self._recalled[state_key] = replace(hit, trusted=True)
        return Loaded(
            state_raw=state_text,
            provider=ProviderSession.decode(_text(provider_raw)) if provider_raw else None,
            opted_out=optout is not None,
            full_cells=_cells(quota_raw),
            extra=tuple(_text(v) for v in more),
            limited=limited, first_limited=first, quota_raw=quota_raw,
        )

    def _warm_worth_it(self) -> bool:
        if self._warm_fails <= WARM_FAILURES * self._warm_tries:
            return True
        self._warm_skipped += 1
        return self._warm_skipped % WARM_PROBE == 0

    def _count_warm(self, failed: bool) -> None:
        self._warm_tries = self._warm_tries * _DECAY + 1
        self._warm_fails = self._warm_fails * _DECAY + failed

    def _limit_commands(self, channel: int, respondent: str) -> list[tuple[Any, ...]]:
        """Count this hop in the current window (fixed windows: the key names the window,
        so counting needs no read-modify-write and old windows expire by themselves)."""
        commands: list[tuple[Any, ...]] = []
        for key, _ in self._limit_keys(channel, respondent):
            commands += [("INCR", key), ("EXPIRE", key, 2 * self.limits.window)]
        return commands

    def _limit_keys(self, channel: int, respondent: str) -> list[tuple[str, int]]:
        """(counter key, limit) of each limit that is on, in the current window."""
        slot = int(time.time()) // self.limits.window
        keys = []
        if self.limits.per_respondent:
            keys.append((f"{self.prefix}lim:{channel}:{respondent}:{slot}",
                         self.limits.per_respondent))
        if self.limits.per_channel:
            keys.append((f"{self.prefix}lim:{channel}:{slot}", self.limits.per_channel))
        return keys

    def commit(self, *, campaign: int, respondent: str, channel: int, session_id: str,
               expected: str, state: str, state_ttl: int, provider: ProviderSession | None,
               provider_ttl: int, events: list[dict[str, Any]], optout: str = "",
               forget: Conductor | None = None, loaded: Loaded | None = None,
               remember: bool = False) -> bool:
        """Atomically replace the state (if still `expected`), remember the provider
        session/message and its reply, set or clear the opt-out flag ('set'/'del'), close
        an earlier provider session's record (`forget`, the state's last conductor, on
        this channel or another: marked ended, so a late retry of its last hop still gets
        its reply and anything else a 409, never a new dial's screen), and append events.

        `loaded`: the load the hop started from; a warm one's values are compared too and
        the hop is counted against the limits (OverLimit if over one). `remember`: the next
        load of this state for this provider session may be warm (see load)."""
        forget_key = (self.provider_key(forget.channel or channel, forget.session)
                      if forget is not None and forget.session
                      and forget.is_other(channel, session_id) else "")
        state_key = self.state_key(campaign, respondent)
        provider_key = self.provider_key(channel, session_id)
        provider_raw = provider.encode() if provider else ""
        warm = loaded is not None and loaded.warm
        guards = loaded.guards if warm else ()  # type: ignore[union-attr]
        limits = self._limit_keys(channel, respondent) if warm and self.limits.on else []
        keys = [state_key, provider_key, self.stream, self.optout_key(respondent),
                *(k for k, _ in guards), *(k for k, _ in limits)]
        args: list[Any] = [expected, state, max(1, state_ttl), provider_raw,
                           max(1, provider_ttl), optout, forget_key, len(guards), len(limits),
                           2 * self.limits.window, *(v for _, v in guards),
                           *(n for _, n in limits)]
        args.extend(_dumps(e) for e in events)
        recalled = self._recalled
        prior = recalled.pop(state_key, None)
        try:
            done = int(self._execute("EVALSHA", self._commit.sha, len(keys), *keys, *args))
        except NoScriptError:  # a restarted or flushed server: load it, as Script does
            done = int(self._commit(keys=keys, args=args))
        if warm:
            self._count_warm(failed=not done)
        if done < 0:
            raise OverLimit(first=done == -2)
        # Not for an opted-out number: its warm loads would fail their opt-out guard.
        if done and remember and provider is not None and state and not (
                loaded is not None and loaded.opted_out):
            recalled[state_key] = _Recalled(provider_key, state, provider, provider_raw,
                                            loaded.quota_raw if loaded else None,
                                            trusted=prior is None or prior.trusted)
        elif warm and not done and prior is not None:
            recalled[state_key] = replace(prior, trusted=False)
        elif prior is not None and not prior.trusted:
            recalled[state_key] = prior  # keep the mistrust until a read clears it
        while len(recalled) > RECALLED_SESSIONS:
            try:
                del recalled[next(iter(recalled))]  # the oldest
            except (RuntimeError, KeyError, StopIteration):
                break  # another thread changed it meanwhile: trimmed next time
        return bool(done)

    def results(self, campaign: int, lang_code: str, region: str | None) -> str | None:
        """What RESULTS answers: the published summary for a region (else the nation), in
        the language asked (else English), written by `civicdial publish`; when a tally is
        published but too few answered for a figure (every cell suppressed), says so, for
        the region and for the nation. None: nothing is published yet."""
        codes = tuple(dict.fromkeys((lang_code, "en")))
        known_region = bool(region) and region != "refuse"
        regional = [f"{code}:{region}" for code in codes] if known_region else []
        national = [f"{code}:_national" for code in codes]
        values = [_text(v) for v in self.r.hmget(f"{self.prefix}results:{campaign}",
                                                 [*regional, *national, RESULTS_PUBLISHED])]
        mine = next((v for v in values[:len(regional)] if v), "")
        nation = next((v for v in values[len(regional):-1] if v), "")
        if mine:
            return mine
        if not values[-1]:  # not published (or published before the marker existed)
            return nation or None
        if nation:
            return (message(lang_code, "results_region_too_few") + " " + nation
                    if known_region else nation)
        return message(lang_code, "results_too_few")

    def opted_out(self, respondent: str) -> bool:
        return bool(self.r.exists(self.optout_key(respondent)))

    def close(self, channel: int, session_id: str) -> None:
        """The provider says this session is over (Hubtel's Release or Timeout, Africa's
        Talking's end-of-session notification): from now on only a retry of its last hop
        is answered, and any other hop on it gets 409."""
        self._close(keys=[self.provider_key(channel, session_id)])

    def append(self, events: list[dict[str, Any]]) -> None:
        """Append events that belong to no interview state (e.g. provider notifications)."""
        pipe = self.r.pipeline(transaction=True)
        for e in events:
            pipe.xadd(self.stream, {"e": json.dumps(e, separators=(",", ":"))})
        pipe.execute()

    def waiting(self) -> int:
        """Events not yet in SQL: persisted entries are deleted from the stream."""
        return int(self.r.xlen(self.stream))


def _send_and_read(link: _Link, packed: bytes, count: int) -> list[Any]:
    sock, reader, buffer = link.sock, link.reader, link.buffer
    assert sock is not None
    try:
        sock.sendall(packed)
    except (BrokenPipeError, ConnectionResetError):
        raise _Closed() from None
    replies: list[Any] = []
    started = False
    while len(replies) < count:
        reply = reader.gets()
        if reply is not False:
            replies.append(reply)
            continue
        try:
            size = sock.recv_into(buffer)
        except ConnectionResetError:
            if started:
                raise
            raise _Closed() from None
        if not size:
            if started:
                raise redis.ConnectionError("Connection closed by server mid-reply.")
            raise _Closed()
        started = True
        reader.feed(buffer, 0, size)
    return replies


def _cells(quota_raw: str | None) -> frozenset[str]:
    return frozenset(json.loads(quota_raw)) if quota_raw else frozenset()


def _text(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    return raw.decode() if isinstance(raw, bytes) else raw
