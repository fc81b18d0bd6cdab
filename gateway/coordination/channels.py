"""Provider channels: the webhook URLs each one is given."""

from __future__ import annotations

from gateway.store.models import Channel


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
