"""Provider channels: which providers exist, binding one to a campaign, its webhook URLs
and its health."""

from __future__ import annotations

import json
import math
import re
import secrets
import string
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from gateway.coordination.campaigns import CampaignError, audit, open_campaign_holding
from gateway.store.models import Campaign, Channel, Interview, OutboundMessage


@dataclass(frozen=True)
class Provider:
    """A provider a channel can be bound to: the one list the CLI and the console read, so a
    provider added here appears in both."""

    name: str
    label: str
    kinds: tuple[str, ...]
    config_hint: str  # the JSON config a coordinator writes


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("africastalking", "Africa's Talking", ("ussd", "sms"),
             '{"username": "...", "api_key": "...", "sender_id": "..."}'),
    Provider("twilio", "Twilio", ("sms",),
             '{"account_sid": "AC...", "auth_token": "...", "from": "+1..."}'),
    Provider("hubtel", "Hubtel", ("ussd",), '{"label": "Survey"} (optional)'),
    Provider("arkesel", "Arkesel", ("ussd",), "{}"),
    Provider("android", "SMS Gateway for Android", ("sms",),
             '{"url": "http://127.0.0.1:8080", "username": "...", "password": "...", '
             '"signing_key": "..."}'),
)}
PROVIDER_KINDS = {(p.name, kind) for p in PROVIDERS.values() for kind in p.kinds}


@dataclass(frozen=True)
class Bound:
    """A channel just bound; `note` says what stands in the way of its campaign opening."""

    channel: Channel
    note: str = ""


# What a provider's sends need (the USSD and inbound routes need nothing more than the
# channel's key): a channel missing one fails every send, or every inbound Twilio message
# (no auth_token, no signature check), long after the coordinator bound it.
REQUIRED: dict[tuple[str, str], tuple[str, ...]] = {
    ("africastalking", "sms"): ("username", "api_key"),
    ("twilio", "sms"): ("account_sid", "auth_token"),
    ("android", "sms"): ("url", "username", "password", "signing_key"),
}
# Settings read as numbers by the workers: (least value, whole numbers only).
NUMBERS: dict[str, tuple[float, bool]] = {
    "rate_per_second": (0, False), "rate_per_hour": (0, False), "timeout": (0.1, False),
    "burst": (1, False), "batch_size": (1, True), "sim_number": (1, True),
}


def check_config(provider: str, kind: str, config: dict[str, Any]) -> None:
    """A channel's config as its provider's code reads it, or CampaignError saying what is
    missing or wrong (bind_channel and `channels set` both check)."""
    missing = [k for k in REQUIRED.get((provider, kind), ())
               if not isinstance(config.get(k), str) or not config[k].strip()]
    if missing:
        raise CampaignError(f"config: {PROVIDERS[provider].label} {kind} needs "
                            f"{', '.join(missing)}")
    for name, (least, whole) in NUMBERS.items():
        value = config.get(name)
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or value < least
                or (whole and value != int(value)) or value > 10**9):
            raise CampaignError(f"config: {name} must be a {'whole ' if whole else ''}number "
                                f"of at least {least:g}, not {json.dumps(value)[:40]}")
    if config.get("reply", "inline") not in ("inline", "queue"):
        raise CampaignError('config: reply is "inline" or "queue"')


_USSD_CODE = re.compile(r"\*?\d{1,8}(\*\d{1,8}){0,6}#?")


def new_channel_key() -> str:
    """A channel's secret URL key: 24 URL-safe characters, never with a leading '-', which
    a command line takes for an option (`civicdial channels remove -Xy...` failed for one
    key in 64)."""
    key = secrets.token_urlsafe(18)
    return key if key[0] != "-" else secrets.choice(string.ascii_letters) + key[1:]


def bind_channel(db: Session, actor: str, *, provider: str, kind: str, address: str,
                 slug: str, config: dict[str, Any], screen_limit: int = 160) -> Bound:
    """Bind a provider channel to a campaign (CLI, API and console share this rule).

    A USSD code or SMS number serves one open campaign at a time: binding it to an open
    campaign while another open campaign holds it is refused (CampaignError). Binding it
    to a draft or paused campaign is allowed, to prepare the next campaign, and says that
    opening will wait for the other to close or pause (opening checks again)."""
    if (provider, kind) not in PROVIDER_KINDS:
        raise CampaignError(f"{provider} has no {kind} channel")
    address = address.strip()
    if not address or len(address) > 100 or any(ord(c) < 32 for c in address):
        raise CampaignError("address: the USSD code or SMS number, at most 100 characters")
    if kind == "ussd" and not _USSD_CODE.fullmatch(address):
        # No hop could ever match another text (its serviceCode is compared with this).
        raise CampaignError(f"address: a USSD code such as *920*16#, not {address[:40]!r}")
    if not 64 <= screen_limit <= 182:
        raise CampaignError("screen limit: between 64 and 182 characters")
    check_config(provider, kind, config)
    campaign = db.scalar(select(Campaign).where(Campaign.slug == slug))
    if campaign is None:
        raise CampaignError(f"no campaign {slug!r}")
    holder = open_campaign_holding(db, provider, kind, address, campaign.id)
    note = ""
    if holder and campaign.state == "open":
        raise CampaignError(f"{kind} {address} is bound to open campaign {holder}: close or "
                            f"pause it first (campaign {slug} is open too)")
    if holder:
        note = (f"{kind} {address} is bound to open campaign {holder}: campaign {slug} can "
                f"open once {holder} is closed or paused")
    channel = Channel(key=new_channel_key(), provider=provider, kind=kind,
                      address=address, campaign_id=campaign.id, screen_limit=screen_limit,
                      config=json.dumps(config))
    db.add(channel)
    db.flush()
    # The config holds provider secrets: the audit names its keys, not their values.
    audit(db, actor, "channel.add", f"{provider}/{kind}/{address}",
          after={"campaign": slug, "config_keys": sorted(config)})
    return Bound(channel, note)


def channel_urls(channel: Channel, base_url: str) -> dict[str, str]:
    root = f"{base_url.rstrip('/')}/webhooks/{channel.provider}/{channel.key}"
    if channel.kind == "ussd" and channel.provider == "hubtel":
        # Hubtel's Service Interaction URL, and the fulfilment URL it requires (a stub).
        return {"ussd": f"{root}/ussd", "fulfilment": f"{root}/ussd/fulfilment"}
    if channel.kind == "ussd" and channel.provider == "arkesel":
        return {"ussd": f"{root}/ussd"}
    if channel.kind == "ussd":
        return {"ussd": f"{root}/ussd", "events": f"{root}/ussd/events"}
    if channel.provider == "android":
        # One URL for every event the phone reports (registered by `channels add`).
        return {"events": f"{root}/events"}
    if channel.provider == "twilio":
        return {"sms": f"{root}/sms", "status": f"{root}/status"}
    # The account's airtime callbacks are set once; any Africa's Talking channel serves.
    return {"sms": f"{root}/sms", "delivery": f"{root}/sms/delivery",
            "airtime_status": f"{root}/airtime/status",
            "airtime_validation": f"{root}/airtime/validation"}


UNBOUND_ERROR = "channel unbound"


@dataclass(frozen=True)
class Unbound:
    """A channel just unbound, and how many of its queued or held messages it stopped."""

    channel: Channel
    stopped: int


def find_channel(db: Session, ref: str) -> Channel | None:
    """A channel by its key (as in its URLs) or its #id."""
    channel = db.scalar(select(Channel).where(Channel.key == ref))
    digits = ref.lstrip("#")
    if channel is None and digits.isdecimal() and len(digits) < 10:
        channel = db.get(Channel, int(digits))
    return channel


def unbind_channel(db: Session, actor: str, channel_id: int) -> Unbound:
    """Unbind a channel (CLI `channels remove`, the console). The row stays, marked
    unbound, because messages and interviews name it: its webhooks answer 410 Gone from
    the next registry refresh, and its queued or held messages are stopped now with
    "channel unbound" (campaign status counts them) instead of failing later for a
    reason nobody can read. The same address can be bound again: a new channel, new key."""
    channel = db.get(Channel, channel_id)
    if channel is None:
        raise CampaignError(f"no channel {channel_id}")
    if channel.unbound_at is not None:
        raise CampaignError(f"channel #{channel_id} ({channel.kind} {channel.address}) is "
                            "already unbound")
    now = datetime.now(UTC)
    channel.unbound_at = now
    stopped = db.execute(
        update(OutboundMessage)
        .where(OutboundMessage.channel_id == channel.id,
               OutboundMessage.status.in_(("queued", "held")))
        .values(status="failed", error=UNBOUND_ERROR, updated_at=now)).rowcount
    audit(db, actor, "channel.remove", f"{channel.provider}/{channel.kind}/{channel.address}",
          before={"campaign_id": channel.campaign_id},
          after={"unbound_at": now.isoformat(), "messages_stopped": stopped})
    return Unbound(channel, stopped)


def channel_health(engine: Engine, channel_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Per channel: when an interview last started on it, outbound SMS that failed, and
    those its unbinding stopped."""
    with Session(engine) as db:
        last = dict(db.execute(select(Interview.channel_id, func.max(Interview.started_at))
                               .where(Interview.channel_id.in_(channel_ids))
                               .group_by(Interview.channel_id)).all())
        failed = dict(db.execute(
            select(OutboundMessage.channel_id, func.count())
            .where(OutboundMessage.channel_id.in_(channel_ids),
                   OutboundMessage.status.in_(("failed", "undelivered", "unknown")))
            .group_by(OutboundMessage.channel_id)).all())
        sent = dict(db.execute(
            select(OutboundMessage.channel_id, func.count())
            .where(OutboundMessage.channel_id.in_(channel_ids))
            .group_by(OutboundMessage.channel_id)).all())
        stopped = dict(db.execute(
            select(OutboundMessage.channel_id, func.count())
            .where(OutboundMessage.channel_id.in_(channel_ids),
                   OutboundMessage.error == UNBOUND_ERROR)
            .group_by(OutboundMessage.channel_id)).all())
    return {cid: {"last_inbound": last.get(cid), "failed": failed.get(cid, 0),
                  "outbound": sent.get(cid, 0), "stopped": stopped.get(cid, 0)}
            for cid in channel_ids}
