"""Idle SMS interviews: one reminder halfway through the idle window, then expiry.

The SMS hop keeps a sorted set of interviews waiting for the respondent (scored by their
last message). USSD needs none of this: its sessions are short, and a dropped one is
offered "1 Continue" when the person dials again.
"""

from __future__ import annotations

import logging
import time

import redis

from gateway.channels.sms import idle_key, number_key, send_event, track
from gateway.config import Settings
from gateway.crypto import NumberBox
from gateway.engine import Event, Stage, hand_over
from gateway.messages import message
from gateway.registry import Registry
from gateway.sessions import SessionStore, decode_state, stream_event

log = logging.getLogger(__name__)


def remind_idle(settings: Settings, client: redis.Redis, registry: Registry,
                now: float | None = None, limit: int = 1000) -> dict[str, int]:
    """Send due reminders and expire interviews idle past their window."""
    now = time.time() if now is None else now
    prefix = settings.redis_prefix
    store = SessionStore(client, prefix)
    box = NumberBox(settings.encryption_key)
    done = {"reminded": 0, "expired": 0, "forgotten": 0}
    for raw, score in client.zrangebyscore(idle_key(prefix), "-inf", now - 60, start=0,
                                           num=limit, withscores=True):
        key = raw.decode()
        campaign_s, respondent, channel_s = key.split("|")
        campaign, channel = int(campaign_s), int(channel_s)
        ch = registry.channel_by_id(channel)
        state_raw = client.get(store.state_key(campaign, respondent))
        state = decode_state(state_raw.decode()) if state_raw else None
        if ch is None or state is None or not state.consented or state.stage is Stage.DONE:
            track(client, prefix, campaign, respondent, channel, "", waiting=False)
            done["forgotten"] += 1
            continue
        idle = now - score
        if idle >= ch.sms_idle_seconds:
            abandoned = Event(id=f"{state.interview}-{state.seq + 1}", kind="abandoned",
                              interview=state.interview, at=now)
            if store.commit(campaign=campaign, respondent=respondent, channel=channel,
                            session_id="expired", expected=state_raw.decode(), state="",
                            state_ttl=1, provider=None, provider_ttl=1,
                            events=[stream_event(abandoned, campaign, channel, respondent,
                                                 state.version)]):
                track(client, prefix, campaign, respondent, channel, "", waiting=False)
                done["expired"] += 1
            continue
        flag = f"{prefix}sms:reminded:{state.interview}"
        if idle < ch.sms_idle_seconds / 2 or client.exists(flag):
            continue
        sealed = client.hget(number_key(prefix), key)
        if sealed is None:
            continue
        form = registry.questionnaire(state.version)
        _, question = hand_over(form, state, ch.rules)
        text = message(form.language(state.lang).code, "reminder") + "\n" + question
        phone = box.open(sealed.decode())
        store.append([send_event(ch, respondent, phone, text, f"reminder:{state.interview}",
                                 box, kind="reminder", priority=1)])
        client.set(flag, "1", ex=max(ch.sms_idle_seconds, 86400) * 2)
        done["reminded"] += 1
    return done
