"""Provider channels: binding one to a campaign, and the webhook URLs each one is given."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.coordination.campaigns import CampaignError, audit, open_campaign_holding
from gateway.store.models import Campaign, Channel

PROVIDER_KINDS = {("africastalking", "ussd"), ("africastalking", "sms"), ("twilio", "sms"),
                  ("hubtel", "ussd"), ("arkesel", "ussd")}


@dataclass(frozen=True)
class Bound:
    """A channel just bound; `note` says what stands in the way of its campaign opening."""

    channel: Channel
    note: str = ""


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
    if not address:
        raise CampaignError("the channel needs an address (USSD code or SMS number)")
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
    channel = Channel(key=secrets.token_urlsafe(18), provider=provider, kind=kind,
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
    if channel.provider == "twilio":
        return {"sms": f"{root}/sms", "status": f"{root}/status"}
    # The account's airtime callbacks are set once; any Africa's Talking channel serves.
    return {"sms": f"{root}/sms", "delivery": f"{root}/sms/delivery",
            "airtime_status": f"{root}/airtime/status",
            "airtime_validation": f"{root}/airtime/validation"}
