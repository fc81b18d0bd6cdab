"""Unfinished interviews: reminders every N hours of silence (at most M), then expiry.

The hops keep a sorted set of interviews waiting for the respondent, scored by when the
worker next has something to do for them: SMS conversations after every message, USSD
interviews when a session ends unfinished (a part break, a dropped call). A reminder goes
by SMS: the current question for an SMS interview, "dial again" for a USSD one.
"""

from __future__ import annotations

import logging
import time

import redis

from gateway.channels.sms import idle_key, next_due, number_key, send_event, untrack
from gateway.config import Settings
from gateway.interview.engine import Event, SessionState, Stage, hand_over
from gateway.interview.messages import message
from gateway.store.crypto import NumberBox
from gateway.store.registry import ChannelInfo, Registry
from gateway.store.sessions import SessionStore, decode_state, stream_event

log = logging.getLogger(__name__)
KEEP_COUNT = 60 * 86400  # a reminder count outlives any resume window
RECHECK_PAUSED = 600


def reminders_key(prefix: str, interview: str) -> str:
    return f"{prefix}reminders:{interview}"


def remind_idle(settings: Settings, client: redis.Redis, registry: Registry,
                now: float | None = None, limit: int = 1000) -> dict[str, int]:
    """Send the reminders that are due and expire interviews idle past their window."""
    now = time.time() if now is None else now
    prefix = settings.redis_prefix
    store = SessionStore(client, prefix)
    box = NumberBox(settings.encryption_key)
    done = {"reminded": 0, "expired": 0, "forgotten": 0}
    for raw in client.zrangebyscore(idle_key(prefix), "-inf", now, start=0, num=limit):
        key = raw.decode()
        campaign_s, respondent, channel_s = key.split("|")
        campaign, channel = int(campaign_s), int(channel_s)
        ch = registry.channel_by_id(channel)
        state_raw = client.get(store.state_key(campaign, respondent))
        state = decode_state(state_raw.decode()) if state_raw else None
        if ch is None or state is None or not state.consented or state.stage is Stage.DONE:
            untrack(client, prefix, key)
            done["forgotten"] += 1
            continue
        if now - state.updated >= ch.rules.resume_window:
            if _expire(store, ch, respondent, state, state_raw.decode(), now):
                untrack(client, prefix, key)
                done["expired"] += 1
            continue
        counter = reminders_key(prefix, state.interview)
        sent_raw, last_raw = client.hmget(counter, "n", "at")
        sent, last_reminder = int(sent_raw or 0), float(last_raw or 0)
        # A paused or closed campaign reminds nobody (it could not take the answer); the
        # reminder is not spent, so it goes if the campaign reopens within the window.
        if ch.campaign_open and sent < ch.reminder_max \
                and now >= max(state.updated, last_reminder) + ch.reminder_seconds:
            if _remind(settings, client, registry, box, ch, key, respondent, state, sent + 1):
                done["reminded"] += 1
            # Counted even when it could not be sent (no SMS channel, number unknown):
            # trying every minute would not help.
            sent, last_reminder = sent + 1, now
            pipe = client.pipeline(transaction=False)
            pipe.hset(counter, mapping={"n": sent, "at": now})
            pipe.expire(counter, KEEP_COUNT)
            pipe.execute()
        due = next_due(ch, state.updated, sent, last_reminder)
        # Still due (the campaign is paused): look again later, not at every pass.
        client.zadd(idle_key(prefix), {key: due if due > now else now + RECHECK_PAUSED})
    return done


def _expire(store: SessionStore, ch: ChannelInfo, respondent: str, state: SessionState,
            state_raw: str, now: float) -> bool:
    """Abandon the interview and forget its state (unless it moved meanwhile)."""
    abandoned = Event(id=f"{state.interview}-{state.seq + 1}", kind="abandoned",
                      interview=state.interview, at=now)
    return store.commit(campaign=ch.campaign_id, respondent=respondent, channel=ch.id,
                        session_id="expired", expected=state_raw, state="", state_ttl=1,
                        provider=None, provider_ttl=1,
                        events=[stream_event(abandoned, ch.campaign_id, ch.id, respondent,
                                             state.version)])


def _remind(settings: Settings, client: redis.Redis, registry: Registry, box: NumberBox,
            ch: ChannelInfo, key: str, respondent: str, state: SessionState, n: int) -> bool:
    sms = ch if ch.kind == "sms" else registry.sms_channel(ch.campaign_id)
    sealed = client.hget(number_key(settings.redis_prefix), key)
    if sms is None or sealed is None:
        log.info("no reminder for %s: %s", key, "no SMS channel" if sms is None
                 else "number unknown")
        return False
    form = registry.questionnaire(state.version)
    code = form.language(state.lang).code
    if ch.kind == "sms":
        _, question = hand_over(form, state, ch.rules)
        text = message(code, "reminder") + "\n" + question
    else:
        text = message(code, "reminder_ussd", dial=ch.address)
    # The key makes a repeated run (a crash before the count was saved) send nothing new.
    SessionStore(client, settings.redis_prefix).append([send_event(
        sms, respondent, box.open(sealed.decode()), text, f"reminder:{state.interview}:{n}",
        box, kind="reminder", priority=1)])
    return True

