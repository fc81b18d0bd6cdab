"""Provider channels: which providers exist, binding one to a campaign, its webhook URLs
and its health."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from gateway.coordination.campaigns import CampaignError, audit, get_campaign
from gateway.store.models import Channel, Interview, OutboundMessage


@dataclass(frozen=True)
class Provider:
    """A provider a channel can be bound to: the one list the CLI and the console read, so a
    provider added here (Android, Hubtel) appears in both."""

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
)}
PROVIDER_KINDS = {(p.name, kind) for p in PROVIDERS.values() for kind in p.kinds}


def channel_urls(channel: Channel, base_url: str) -> dict[str, str]:
    root = f"{base_url.rstrip('/')}/webhooks/{channel.provider}/{channel.key}"
    if channel.kind == "ussd" and channel.provider == "hubtel":
        # Hubtel's Service Interaction URL, and the fulfilment URL it requires (a stub).
        return {"ussd": f"{root}/ussd", "fulfilment": f"{root}/ussd/fulfilment"}
    if channel.kind == "ussd" and channel.provider == "arkesel":
        return {"ussd": f"{root}/ussd"}
    if channel.kind == "ussd":
        return {"ussd": f"{root}/ussd", "events": f"{root}/ussd/events"}
    if channel.provider == "twilio":
        return {"sms": f"{root}/sms", "status": f"{root}/status"}
    # The account's airtime callbacks are set once; any Africa's Talking channel serves.
    return {"sms": f"{root}/sms", "delivery": f"{root}/sms/delivery",
            "airtime_status": f"{root}/airtime/status",
            "airtime_validation": f"{root}/airtime/validation"}


def bind_channel(db: Session, actor: str, slug: str, provider: str, kind: str, address: str,
                 config: dict[str, Any], screen_limit: int = 160) -> Channel:
    """A new channel of `provider` for campaign `slug`, with a fresh secret key."""
    if (provider, kind) not in PROVIDER_KINDS:
        raise CampaignError(f"{provider} has no {kind} channel")
    address = address.strip()
    if not address or len(address) > 100 or any(ord(c) < 32 for c in address):
        raise CampaignError("address: the USSD code or SMS number, at most 100 characters")
    if not 64 <= screen_limit <= 182:
        raise CampaignError("screen limit: between 64 and 182 characters")
    campaign = get_campaign(db, slug)
    channel = Channel(key=secrets.token_urlsafe(18), provider=provider, kind=kind,
                      address=address, campaign_id=campaign.id, screen_limit=screen_limit,
                      config=json.dumps(config))
    db.add(channel)
    db.flush()
    # The config holds provider secrets: the audit names its keys, not their values.
    audit(db, actor, "channel.add", f"{provider}/{kind}/{address}",
          after={"campaign": slug, "config_keys": sorted(config)})
    return channel


def unbind_channel(db: Session, actor: str, channel_id: int) -> Channel:
    """Remove a channel: its webhook URLs answer 404 from the next registry refresh.
    Messages and interviews that used it keep its id."""
    channel = db.get(Channel, channel_id)
    if channel is None:
        raise CampaignError(f"no channel {channel_id}")
    audit(db, actor, "channel.remove", f"{channel.provider}/{channel.kind}/{channel.address}",
          before={"campaign_id": channel.campaign_id})
    db.delete(channel)
    return channel


def channel_health(engine: Engine, channel_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Per channel: when an interview last started on it, and outbound SMS that failed."""
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
    return {cid: {"last_inbound": last.get(cid), "failed": failed.get(cid, 0),
                  "outbound": sent.get(cid, 0)} for cid in channel_ids}
