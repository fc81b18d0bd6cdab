"""The SMS conversation, whatever the provider: keywords, the engine, the reply.

Each inbound message is one input. The provider's message id plays the part a USSD
sessionId plays: the first delivery is processed, a redelivery (provider retry, same id)
gets the stored reply and changes nothing. State is keyed by (campaign, respondent), the
same key as USSD, so an interview started on USSD continues by SMS from the same question.
"""

from __future__ import annotations

import secrets
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from gateway.channels.webhook import WebhookError, log
from gateway.interview.engine import Input, Stage, step
from gateway.interview.messages import CONFIRM_WORDS, KEYWORDS, message
from gateway.interview.segments import count_segments
from gateway.store.crypto import NumberBox
from gateway.store.registry import ChannelInfo
from gateway.store.sessions import (
    ProviderSession,
    SessionStore,
    decode_state,
    encode_state,
    mask_phone,
    pseudonym,
    state_conductor,
    stream_event,
)

MAX_BODY = 1600  # Twilio's limit, and more than any answer needs
COMMIT_ATTEMPTS = 5
MESSAGE_TTL = 3 * 86400  # providers retry for up to ~2 days (SMS Gateway for Android)


@dataclass(frozen=True)
class Inbound:
    phone: str  # E.164
    text: str
    message_id: str


@dataclass(frozen=True)
class Outcome:
    reply: str | None  # None: say nothing (opted out, or the provider handles it)
    duplicate: bool = False


def keyword(text: str, campaign_keyword: str) -> str | None:
    """'stop' | 'help' | 'lang' | 'start' | 'results' | 'delete' for a keyword in any
    shipped language."""
    word = unicodedata.normalize("NFKC", text).strip().strip(".!").upper()
    if word == campaign_keyword.upper():
        return "start"
    for name, words in KEYWORDS.items():
        if word in words:
            return name
    return None


def send_event(ch: ChannelInfo, respondent: str, phone: str, body: str, key: str,
               box: NumberBox, kind: str = "reply", priority: int = 0) -> dict[str, Any]:
    """An outbound SMS, queued through the event stream (the worker persists and sends)."""
    return {"id": key, "k": "send", "ch": ch.id, "r": respondent, "to": box.seal(phone),
            "body": body, "kind": kind, "prio": priority,
            "seg": count_segments(body).segments, "t": time.time()}


def idle_key(prefix: str) -> str:
    """Unfinished interviews, scored by when something is next due for them (a reminder,
    or expiry), so the worker reads only what is due."""
    return f"{prefix}sms:idle"


def number_key(prefix: str) -> str:
    return f"{prefix}sms:to"


def member(campaign: int, respondent: str, channel: int) -> str:
    return f"{campaign}|{respondent}|{channel}"


def next_due(ch: ChannelInfo, last_activity: float, reminders_sent: int = 0,
             last_reminder: float = 0.0) -> float:
    """When a waiting interview next needs the worker: a reminder after reminder_seconds
    of silence (from the last answer or the last reminder; at most reminder_max), else
    the end of its resume window, when it expires."""
    window_end = last_activity + ch.rules.resume_window
    if reminders_sent < ch.reminder_max:
        return min(max(last_activity, last_reminder) + ch.reminder_seconds, window_end)
    return window_end


def track_commands(prefix: str, ch: ChannelInfo, respondent: str, sealed_number: str,
                   last_activity: float) -> list[tuple[Any, ...]]:
    """After a hop that leaves an interview unfinished: it now waits for the respondent."""
    key = member(ch.campaign_id, respondent, ch.id)
    return [("ZADD", idle_key(prefix), next_due(ch, last_activity), key),
            ("HSET", number_key(prefix), key, sealed_number)]


def untrack_commands(prefix: str, key: str) -> list[tuple[Any, ...]]:
    return [("ZREM", idle_key(prefix), key), ("HDEL", number_key(prefix), key)]


def _pipelined(client: redis.Redis, commands: list[tuple[Any, ...]]) -> None:
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)
    pipe.execute()


def track(client: redis.Redis, prefix: str, ch: ChannelInfo, respondent: str,
          sealed_number: str, last_activity: float) -> None:
    _pipelined(client, track_commands(prefix, ch, respondent, sealed_number, last_activity))


def untrack(client: redis.Redis, prefix: str, key: str) -> None:
    _pipelined(client, untrack_commands(prefix, key))


def delivery_event(channel: int, provider_id: str, status: str, error: str) -> dict[str, Any]:
    """A delivery report or status callback, for the worker to apply to the message."""
    return {"id": f"dlr:{channel}:{provider_id}:{status}", "k": "dlr", "ch": channel,
            "pid": provider_id, "st": status, "err": error}


FEEDBACK_QUESTION = "feedback"  # "send me the results by SMS", last in the shipped form


def attach_airtime(events: list[dict[str, Any]], ch: ChannelInfo, phone: str,
                   box: NumberBox) -> None:
    """A completion in a campaign that thanks with airtime carries the (encrypted) number
    to pay; the worker keeps it only on the payment row."""
    if ch.airtime:
        for e in events:
            if e["k"] == "completed" and e.get("r"):
                e["to"] = box.seal(phone)


def attach_subscription(events: list[dict[str, Any]], phone: str, box: NumberBox,
                        sms_channel: int | None) -> None:
    """A 'yes' to the results opt-in carries the (encrypted) number it will be sent to:
    the only place a number is kept beyond the outbound queue."""
    for e in events:
        if e["k"] == "answer" and e.get("q") == FEEDBACK_QUESTION and e.get("v") == "yes":
            e["to"], e["sch"] = box.seal(phone), sms_channel


# -- erasure on request (DELETE by SMS, or the USSD menu after completing) ---------------
# After a confirmation step, one `erased` event with the respondent's pseudonym goes through
# the event stream like every other event (an edge node forwards it as it forwards
# answers); the worker then erases in SQL every answer of that respondent in every
# campaign, their contact number and results subscription, and records in the audit log
# that an erasure happened (no identity). Here, at once: the interview state in every
# campaign and the reminder tracking (which holds the sealed number). A published tally
# snapshot is not rewritten.

PENDING_TTL = 15 * 60  # how long a DELETE waits for its YES


def pending_key(prefix: str, respondent: str) -> str:
    return f"{prefix}erase:{respondent}"


def erased_event(respondent: str, key: str, channel: int) -> dict[str, Any]:
    """The stream entry that erases a respondent everywhere (kind `erased`)."""
    return {"id": f"erased:{key}", "k": "erased", "r": respondent, "ch": channel,
            "t": time.time()}


def forget_in_redis(services: Any, respondent: str) -> None:
    """Drop the respondent's interview state in every campaign and the reminder tracking
    on every channel. The opt-out flag stays: erasing must not let anyone contact them."""
    forget(services.store.r, services.settings.redis_prefix,
           [(ch.id, ch.campaign_id) for ch in services.registry.channels()], [respondent])


def forget(client: redis.Redis, prefix: str, channels: list[tuple[int, int]],
           respondents: Iterable[str]) -> None:
    """The Redis half of erasing these respondents, given the (channel, campaign) pairs
    there are: interview state in every campaign, a pending DELETE, reminder tracking."""
    store = SessionStore(client, prefix)
    commands: list[tuple[Any, ...]] = []
    for respondent in respondents:
        commands += [("DEL", store.state_key(campaign, respondent))
                     for campaign in {campaign for _, campaign in channels}]
        commands.append(("DEL", pending_key(prefix, respondent)))
        for channel, campaign in channels:
            commands += untrack_commands(prefix, member(campaign, respondent, channel))
    if commands:
        _pipelined(client, commands)


def converse(services: Any, ch: ChannelInfo, msg: Inbound, *,
             reply_by_queue: bool, provider_stop: bool = False,
             seen_key: str = "") -> Outcome:
    """Run one inbound SMS through keywords and the engine, commit, return the reply.

    With reply_by_queue, the reply is also queued for sending (providers that cannot
    answer inline); otherwise the caller puts it in its HTTP response.
    provider_stop: the provider already handled a STOP (Twilio Advanced Opt-Out).
    seen_key: a key that marks this delivery as handled (the Android envelope id), read
    with the state and set once the message is committed: present, it is a duplicate.
    """
    settings = services.settings
    store = services.store
    respondent = pseudonym(settings.pseudonym_key, msg.phone)
    if len(msg.text) > MAX_BODY:
        raise WebhookError(400, f"message body is longer than {MAX_BODY} characters")
    # Binary junk from a handset becomes an invalid answer, not a refused request.
    msg = Inbound(msg.phone, "".join(c for c in msg.text if c >= " " or c in "\n\t"),
                  msg.message_id)
    word = "stop" if provider_stop else keyword(msg.text, ch.keyword)
    confirms = unicodedata.normalize("NFKC", msg.text).strip().strip(".!").upper() \
        in CONFIRM_WORDS
    pending = pending_key(settings.redis_prefix, respondent)

    for _ in range(COMMIT_ATTEMPTS):
        loaded = store.load(ch.campaign_id, respondent, ch.id, f"m:{msg.message_id}",
                            quotas=bool(ch.rules.quota_on),
                            extra=(pending, seen_key) if seen_key else (pending,))
        erase_pending = bool(loaded.extra[0])
        erase = False
        if loaded.provider is not None or (seen_key and loaded.extra[1]):
            return Outcome(loaded.provider.reply or None if loaded.provider else None,
                           duplicate=True)
        state = loaded.state
        now = time.time()
        lang_code = "en"
        if state is not None:
            lang_code = services.registry.questionnaire(state.version).language(state.lang).code
        events: list[dict[str, Any]] = []
        optout = ""
        new_state_raw = loaded.state_raw  # unchanged unless the engine runs
        conductor = state_conductor(loaded.state_raw)
        moved_on = (state is not None and state.stage is not Stage.DONE
                    and conductor is not None and conductor.is_other(ch.id, ""))
        forget = None
        ttl = ch.rules.resume_window + 60
        reply: str | None
        if word == "stop":
            optout = "set"
            reply = None if (loaded.opted_out or provider_stop) else message(lang_code, "stopped")
            events.append({"id": f"optout:{respondent}:{msg.message_id}", "k": "optout",
                           "ch": ch.id, "r": respondent, "t": now})
        elif loaded.limited:
            # One number flooding the channel: told once per window, nothing streamed.
            reply = message(lang_code, "rate_limited") if loaded.first_limited else None
        elif word == "delete":
            # Erasure asks first; the YES must be the next message, within PENDING_TTL.
            reply = message(lang_code, "erase_confirm")
        elif erase_pending and confirms:
            erase = True
            reply = message(lang_code, "erased")
            events.append(erased_event(respondent, f"{ch.id}:{msg.message_id}", ch.id))
            new_state_raw = ""
        elif loaded.opted_out and word != "start":
            reply = None  # no further messages after STOP, until they text START
        elif word == "help":
            reply = message(lang_code, "help", keyword=ch.keyword)
        elif word == "results":
            region = state.answer_map().get("region") if state else None
            reply = (store.results(ch.campaign_id, lang_code, region)
                     or message(lang_code, "results_none"))
        elif not ch.campaign_open:
            reply = message(lang_code, "closed")
        elif state is None and word not in ("start", "lang"):
            reply = message("en", "intro", keyword=ch.keyword)
        else:
            if word == "start":
                optout = "del" if loaded.opted_out else ""
                inp = Input.open(now, secrets.token_hex(8))
            elif word == "lang":
                inp = Input.switch_language(now, secrets.token_hex(8))
            elif moved_on:
                # The interview went on elsewhere since this conversation's last question
                # (a dial on USSD, another SMS channel): this text answers a screen the
                # citizen no longer has, so it opens again, as a new dial would ("Welcome
                # back ... 1 Continue") instead of answering the question shown elsewhere.
                inp = Input.open(now, secrets.token_hex(8))
            else:
                inp = Input.answer(msg.text, now, secrets.token_hex(8))
            version = state.version if state else ch.questionnaire_version
            result = step(services.registry.questionnaire(version), state, inp,
                          ch.rules_for(loaded.full_cells))
            reply = result.reply.text
            events.extend(stream_event(e, ch.campaign_id, ch.id, respondent, version)
                          for e in result.events)
            attach_subscription(events, msg.phone, services.box, ch.id)
            attach_airtime(events, ch, msg.phone, services.box)
            new_state_raw = encode_state(result.state, channel=ch.id) if result.state else ""
            # Where it went on before is over: that session's next input gets a 409.
            forget = conductor if moved_on else None
        if new_state_raw and decode_state(new_state_raw).stage is Stage.DONE:
            ttl = settings.completed_ttl
        if reply and reply_by_queue:
            events.append(send_event(
                ch, respondent, msg.phone, reply, f"reply:{ch.id}:{msg.message_id}",
                services.box, kind="optout_confirm" if word == "stop" else "reply"))
        committed = store.commit(
            campaign=ch.campaign_id, respondent=respondent, channel=ch.id,
            session_id=f"m:{msg.message_id}", expected=loaded.state_raw, state=new_state_raw,
            state_ttl=ttl, provider=ProviderSession("", reply or "", ch.campaign_id, respondent),
            provider_ttl=MESSAGE_TTL, events=events, optout=optout, forget=forget)
        if committed:
            # What follows the commit, in one round trip: the pending erasure, the
            # reminder tracking, the delivery marked handled.
            after: list[tuple[Any, ...]] = []
            if word == "delete":
                after.append(("SET", pending, "1", "EX", PENDING_TTL))
            elif erase:
                forget_in_redis(services, respondent)
            elif erase_pending:
                after.append(("DEL", pending))  # anything but YES keeps the answers
            waiting = bool(new_state_raw) and decode_state(new_state_raw).stage in (
                Stage.QUESTION, Stage.RESUME, Stage.LANGUAGE) and word != "stop"
            if waiting:
                after += track_commands(settings.redis_prefix, ch, respondent,
                                        services.box.seal(msg.phone), now)
            else:
                after += untrack_commands(settings.redis_prefix,
                                          member(ch.campaign_id, respondent, ch.id))
            if seen_key:
                after.append(("SET", seen_key, "1", "EX", MESSAGE_TTL))
            store.run(after)
            return Outcome(reply)
    log.warning("sms %s %s: state kept changing under us", ch.id, mask_phone(msg.phone))
    raise WebhookError(409, "concurrent messages for this conversation; retry")
