"""The USSD hop, whatever the provider: load, step, commit, replay, resume, end of session.

A provider module (africastalking, hubtel, arkesel) parses its request into one UssdInput
(session id, phone, the new input, and where the request stands in its session: the
cumulative text, a sequence number, or neither) and renders a Screen in its own shape.
Everything else is here, once: the per-session budget with "Part k of n", the resume
offer, paging and keywords (the engine's), the replay cache, the 4xx for a request that
does not follow the session, and the end-of-session hand-over and reminders.

The hop is two Redis round trips (SessionStore.load, SessionStore.commit), or one when this
process committed the session's last hop (a warm load: no read, and a commit that compares
everything the hop relied on). A replay returns the body the provider module rendered the
first time, byte for byte.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

from flask import current_app

from gateway.channels.after_completion import RESUME_ERASE, done_menu, resume_menu
from gateway.channels.sms import (
    FEEDBACK_QUESTION,
    attach_airtime,
    attach_subscription,
    forget_in_redis,
    send_event,
    track,
)
from gateway.channels.webhook import WebhookError, bound_channel, log
from gateway.interview.engine import Input, SessionState, Stage, hand_over, step
from gateway.interview.messages import message
from gateway.interview.questionnaire import Questionnaire
from gateway.store.registry import ChannelInfo
from gateway.store.sessions import (
    ENDED_SESSION_TTL,
    Loaded,
    OverLimit,
    ProviderSession,
    SessionEnded,
    decode_state,
    encode_state,
    mask_phone,
    pseudonym,
    state_conductor,
    stream_event,
)

COMMIT_ATTEMPTS = 5


@dataclass(frozen=True)
class UssdInput:
    """One provider request, in our terms."""

    session_id: str
    phone: str  # E.164
    # The new input. With `cumulative`, every input of the session so far joined by '*'
    # (Africa's Talking): the hop takes the part it has not seen.
    text: str
    # Whether the provider says this request opens its session (Hubtel initiation, Arkesel
    # newSession); None: it does not say (Africa's Talking), an unknown session opens.
    opens: bool | None = None
    # The request's number in its session, when the provider numbers them (Hubtel): the
    # same number again is a retry, any other than the next is refused.
    sequence: int | None = None
    cumulative: bool = False
    service_code: str | None = None  # as dialled, '*920*16#'; None: the provider omits it


@dataclass(frozen=True)
class Screen:
    """What the hop answers, for the provider module to render."""

    text: str  # the screen, within the channel's body limit
    end: bool  # the session ends with this screen
    numeric: bool = False  # the answer expected is an option or a number (an input hint)


# A provider module's renderer: the body of its HTTP answer for a screen. The hop stores
# the body for replays, so a retry gets exactly the same bytes.
Render = Callable[[Screen], str]


def services() -> Any:
    return current_app.extensions["civicdial"]


def provider_channel(provider: str, channel_key: str, kind: str | None = "ussd") -> ChannelInfo:
    """The channel a webhook URL names; kind None: any of this provider's channels."""
    return bound_channel(services().registry, provider, channel_key, kind)


def same_service(dialled: str, bound: str) -> bool:
    # '*920*16*5#' is an extension of '*920*16#'; operators differ on the trailing '#'.
    d, b = dialled.rstrip("#"), bound.rstrip("#")
    return d == b or d.startswith(b + "*")


def _new_input(history: str, text: str) -> str | None:
    """The part of `text` this session has not consumed yet, or None if `text` does not
    extend what we have seen (a stale or forged request)."""
    if history == "":
        return text
    if text.startswith(history + "*"):
        return text[len(history) + 1:]
    return None


def _opening(inp: UssdInput) -> str:
    """What a new provider session's record remembers of its first request."""
    if inp.cumulative:
        return inp.text
    return str(inp.sequence) if inp.sequence is not None else "0"


def _follow(history: str, inp: UssdInput) -> tuple[str, str] | None:
    """(the new input, what the record remembers next) for a request in a known provider
    session, or None for a retry of the last request; WebhookError if it does not follow."""
    if inp.cumulative:
        if inp.text == history:
            return None
        new = _new_input(history, inp.text)
        if new is None:
            raise WebhookError(409, "text does not extend this session's inputs")
        return new, inp.text
    last = int(history) if history.isdecimal() else -1
    if inp.sequence is None:
        # Unnumbered (Arkesel): only a repeat of the opening request can be told apart;
        # any other request is the next input.
        if inp.opens:
            if last == 0:
                return None
            raise WebhookError(409, "a new session cannot reuse a session id under way")
        return inp.text, str(last + 1)
    if inp.sequence == last:
        return None
    if inp.opens or inp.sequence != last + 1:
        raise WebhookError(409, f"Sequence {inp.sequence} does not follow {last}")
    return inp.text, str(inp.sequence)


def _numeric(form: Questionnaire, state: SessionState | None) -> bool:
    """Whether the next answer is an option number or a number (a keypad hint)."""
    if state is None:
        return False
    if state.stage is not Stage.QUESTION:
        return True  # the language and resume menus
    question = form.questions[state.pos]
    return question.type in ("select_one", "note", "integer")


def hop(ch: ChannelInfo, inp: UssdInput, draw: Render) -> str:
    """One USSD hop: one input in, the provider's rendered screen out."""
    if inp.service_code is not None and not same_service(inp.service_code, ch.address):
        raise WebhookError(400, f"serviceCode {inp.service_code} is not this channel's "
                                f"{ch.address}")
    if not ch.campaign_open:
        return draw(Screen(message("en", "closed"), end=True))
    svc = services()
    respondent = pseudonym(svc.settings.pseudonym_key, inp.phone)
    # The first attempt may start from this process's own last commit of the session
    # (no read); it then only stands if it commits, else the hop reads afresh.
    for attempt in range(COMMIT_ATTEMPTS + 1):
        loaded = svc.store.load(ch.campaign_id, respondent, ch.id, inp.session_id,
                                quotas=bool(ch.rules.quota_on), warm=attempt == 0)
        try:
            reply, outcome = _attempt(svc, ch, inp, draw, respondent, loaded)
        except WebhookError:
            if loaded.warm:
                continue
            raise
        if outcome is _FINAL or (outcome is _ANSWERED and not loaded.warm):
            return reply
    log.warning("ussd %s %s: state kept changing under us", ch.id, mask_phone(inp.phone))
    raise WebhookError(409, "concurrent requests for this session; retry")


# What one attempt at a hop came to: its commit landed (or it is final without one, as
# over a limit), it answered without a commit (a replay, a flood), or the state changed
# under it (so: again).
_FINAL, _ANSWERED, _CHANGED = "committed", "answered", "changed"
# Where a hop may start from this process's last commit: not the menus after completing
# or on resuming, which act (an erasure) before they commit.
_WARM_STAGES = (Stage.LANGUAGE, Stage.QUESTION)


def _attempt(svc: Any, ch: ChannelInfo, inp: UssdInput, draw: Render, respondent: str,
             loaded: Loaded) -> tuple[str, str]:
    settings, store = svc.settings, svc.store
    phone, session_id = inp.phone, inp.session_id
    if loaded.limited:
        return _over_limit(ch, phone, loaded.first_limited, draw), _ANSWERED
    record = loaded.provider
    state = loaded.state
    now = time.time()
    if record is None:
        if inp.opens is False:
            raise WebhookError(409, "unknown session: it did not start here")
        position = _opening(inp)
        engine_input = Input.open(now, secrets.token_hex(8))
    else:
        if record.respondent != respondent or record.campaign != ch.campaign_id:
            raise WebhookError(409, "sessionId belongs to another phone number")
        follows = _follow(record.history, inp)
        try:
            replayed = record.answer_to(retry=follows is None)
        except SessionEnded:
            raise WebhookError(409, "this session has ended") from None
        if replayed is not None:
            return replayed, _ANSWERED
        assert follows is not None
        if state is not None and state.stage is not Stage.DONE:
            conductor = state_conductor(loaded.state_raw)
            if conductor is not None and conductor.is_other(ch.id, session_id):
                # The interview went on elsewhere (a new dial, on any channel, or by SMS)
                # and this session's screen is out of date: its input answers nothing.
                raise WebhookError(409, "this session has ended: the interview went on "
                                        "in another session")
        new, position = follows
        engine_input = Input.answer(new, now, secrets.token_hex(8))
    menu_of = None
    if state is not None and state.stage is Stage.DONE:
        # A dial after completing: a menu with the results and erasing their answers.
        path = [] if record is None else [*filter(None, record.menu.split("*")), new]
        menu_of, state_ttl = done_menu, settings.completed_ttl
    elif (state is not None and state.stage is Stage.RESUME and record is not None
          and ch.rules.erase_on_resume and (record.menu or new == RESUME_ERASE)):
        # "Delete my answers" on the resume screen of an unfinished interview.
        path = [*filter(None, record.menu.split("*")), new]
        menu_of, state_ttl = resume_menu, ch.rules.resume_window + 60
    if state is not None and menu_of is not None:
        if loaded.warm:  # never remembered: the menus act before they commit
            return "", _CHANGED
        menu = menu_of(svc, ch, state, respondent, path, f"{ch.id}:{session_id}")
        done_reply = draw(Screen(menu.text, menu.end, numeric=not menu.end))
        if store.commit(campaign=ch.campaign_id, respondent=respondent, channel=ch.id,
                        session_id=session_id, expected=loaded.state_raw,
                        state="" if menu.erase else loaded.state_raw,
                        state_ttl=state_ttl,
                        provider=ProviderSession(position, done_reply, ch.campaign_id,
                                                 respondent, ended=menu.end,
                                                 menu="*".join(path)),
                        provider_ttl=ENDED_SESSION_TTL if menu.end
                        else settings.ussd_session_ttl,
                        events=[menu.event] if menu.event else []):
            if menu.erase:
                forget_in_redis(svc, respondent)
            return done_reply, _FINAL
        return "", _CHANGED
    form_version = state.version if state else ch.questionnaire_version
    form = svc.registry.questionnaire(form_version)
    result = step(form, state, engine_input, ch.rules_for(loaded.full_cells))
    end = result.reply.end
    reply = draw(Screen(result.reply.text, end, not end and _numeric(form, result.state)))
    if result.state is None:
        new_state, ttl = "", 1
    elif result.state.stage is Stage.DONE:
        new_state, ttl = encode_state(result.state), settings.completed_ttl
    else:
        new_state = encode_state(result.state, session_id, ch.id)
        ttl = ch.rules.resume_window + 60
    events = [stream_event(e, ch.campaign_id, ch.id, respondent, form_version)
              for e in result.events]
    if any(e.get("q") == FEEDBACK_QUESTION for e in events):
        sms = svc.registry.sms_channel(ch.campaign_id)
        attach_subscription(events, phone, svc.box, sms.id if sms else None)
    attach_airtime(events, ch, phone, svc.box)
    try:
        committed = store.commit(
            campaign=ch.campaign_id, respondent=respondent, channel=ch.id,
            session_id=session_id, expected=loaded.state_raw, state=new_state, state_ttl=ttl,
            provider=ProviderSession(position, reply, ch.campaign_id, respondent, ended=end),
            # After END the operator closes the session: only quick retries can follow.
            provider_ttl=ENDED_SESSION_TTL if end else settings.ussd_session_ttl,
            events=events,
            # A new dial supersedes the last one: its record is closed, not dropped, so a
            # late provider retry of its last hop is still answered as a retry.
            forget=state_conductor(loaded.state_raw) if record is None else None,
            loaded=loaded,
            # The next hop of this session may start from this commit (load's `warm`).
            remember=not end and result.state is not None
            and result.state.stage in _WARM_STAGES,
        )
    except OverLimit as over:  # counted at the commit: a warm load reads no counters
        return _over_limit(ch, phone, over.first, draw), _FINAL
    if not committed:
        return "", _CHANGED
    if end and _unfinished(result.state):
        # A part break or too many invalid entries: a reminder if they do not
        # dial again (rare, so the extra round trip does not weigh on the hop).
        _track_for_reminders(ch, phone, respondent, result.state)
    return reply, _FINAL


def _over_limit(ch: ChannelInfo, phone: str, first: bool, draw: Render) -> str:
    """One number flooding the channel: answered, nothing stored or streamed."""
    if first:
        log.warning("ussd %s %s: over the per-number limit", ch.id, mask_phone(phone))
    return draw(Screen(message("en", "rate_limited"), end=True))


# -- the end of a session ---------------------------------------------------------------

@dataclass(frozen=True)
class SessionEnd:
    """A provider's word that a session is over (AT's notification, Hubtel's release or
    timeout), as recorded in ussd_session_ends."""

    session_id: str
    phone: str  # E.164, or '' when the provider did not say
    status: str  # the provider's word: Success | Incomplete | Failed (AT), release | timeout
    dropped: bool  # cut before we ended it: an unfinished interview may go on by SMS
    network: str = ""
    duration_ms: int | None = None
    hops: int | None = None
    cost: str = ""
    error: str = ""


def session_ended(ch: ChannelInfo, end: SessionEnd) -> None:
    """Record the end, then hand an unfinished interview over to SMS (if the campaign does
    and the session was dropped) or remember it for a reminder to dial again."""
    svc = services()
    respondent = pseudonym(svc.settings.pseudonym_key, end.phone) if end.phone else None
    if respondent is not None:
        raw = svc.store.r.get(svc.store.provider_key(ch.id, end.session_id))
        if raw and ProviderSession.decode(raw).respondent != respondent:
            # As for a hop: a session is one person's; another number cannot end it.
            raise WebhookError(409, "sessionId belongs to another phone number")
    svc.store.close(ch.id, end.session_id)
    svc.store.append([{
        "id": f"ussd_end:{ch.id}:{end.session_id}", "k": "ussd_end", "ch": ch.id,
        "s": end.session_id, "r": respondent, "st": end.status, "n": end.network,
        "d": end.duration_ms, "h": end.hops, "cost": end.cost, "err": end.error,
        "t": time.time(),
    }])
    if respondent and not (end.dropped and ch.sms_handover
                           and _hand_over_to_sms(ch, end.phone, respondent, end.session_id)):
        raw = svc.redis.get(svc.store.state_key(ch.campaign_id, respondent))
        state = decode_state(raw.decode()) if raw else None
        if _unfinished(state):
            _track_for_reminders(ch, end.phone, respondent, state)


def _unfinished(state: SessionState | None) -> TypeGuard[SessionState]:
    return state is not None and state.consented and state.stage in (Stage.QUESTION,
                                                                     Stage.RESUME)


def _track_for_reminders(ch: ChannelInfo, phone: str, respondent: str,
                         state: SessionState) -> None:
    """Remind by SMS to dial again, if the campaign reminds and has an SMS channel."""
    svc = services()
    if ch.reminder_max > 0 and svc.registry.sms_channel(ch.campaign_id) is not None:
        track(svc.redis, svc.settings.redis_prefix, ch, respondent, svc.box.seal(phone),
              state.updated)


def _hand_over_to_sms(ch: ChannelInfo, phone: str, respondent: str, session_id: str) -> bool:
    """The network dropped an unfinished interview: offer to finish it by SMS, once.
    True if it was handed over (now or by an earlier notification)."""
    svc = services()
    sms = svc.registry.sms_channel(ch.campaign_id)
    if sms is None:
        log.warning("campaign %s: sms_handover is on but it has no SMS channel",
                    ch.campaign_slug)
        return False
    key = f"handover:{ch.id}:{session_id}"
    for _ in range(COMMIT_ATTEMPTS):
        loaded = svc.store.load(ch.campaign_id, respondent, sms.id, key)
        state = loaded.state
        if loaded.provider is not None:
            return True
        # A part break is a pause we announced ("Dial ... to continue"), not a drop.
        if loaded.opted_out or not _unfinished(state) or state.part_break:
            return False
        form = svc.registry.questionnaire(state.version)
        moved, question = hand_over(form, state, sms.rules)
        text = message(form.language(state.lang).code, "handover") + "\n" + question
        if svc.store.commit(
                campaign=ch.campaign_id, respondent=respondent, channel=sms.id,
                session_id=key, expected=loaded.state_raw,
                state=encode_state(moved, channel=sms.id),
                state_ttl=sms.rules.resume_window + 60,
                provider=ProviderSession("", text, ch.campaign_id, respondent),
                provider_ttl=svc.settings.ussd_session_ttl,
                events=[send_event(sms, respondent, phone, text, key, svc.box,
                                   kind="handover", priority=1)]):
            # Now an SMS conversation: reminded, and expired, as one.
            track(svc.redis, svc.settings.redis_prefix, sms, respondent,
                  svc.box.seal(phone), moved.updated)
            return True
    return False
