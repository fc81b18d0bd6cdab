"""The airtime thank-you as the coordinator sees it: what was paid, what is committed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from gateway.money import minor_to_text
from gateway.store.models import AirtimePayment, Campaign

# Statuses whose amount is (or may be) spent; failed and skipped ones free their share.
COMMITTED = ("queued", "sending", "sent", "success", "unknown")


def summary(engine: Engine, campaign: Campaign) -> dict[str, Any] | None:
    """What the coordinator sees: amount, budget, spent so far, payments by status."""
    if campaign.airtime_amount is None:
        with Session(engine) as db:
            paid = db.scalar(select(func.count()).select_from(AirtimePayment).where(
                AirtimePayment.campaign_id == campaign.id))
        if not paid:
            return None
    with Session(engine) as db:
        rows = db.execute(select(AirtimePayment.status, func.count(),
                                 func.coalesce(func.sum(AirtimePayment.amount), 0))
                          .where(AirtimePayment.campaign_id == campaign.id)
                          .group_by(AirtimePayment.status)).all()
    counts = {status: n for status, n, _ in rows}
    amounts = {status: total for status, _, total in rows}
    currency = campaign.airtime_currency
    paid = amounts.get("sent", 0) + amounts.get("success", 0)

    def money(minor: int | None) -> str | None:
        return None if minor is None else f"{currency} {minor_to_text(minor)}"

    return {
        "enabled": campaign.airtime_amount is not None,
        "amount": money(campaign.airtime_amount), "budget": money(campaign.airtime_budget),
        # Paid: accepted by Africa's Talking. Committed also counts payments in flight
        # and unknown ones, which the budget treats as spent.
        "spent": money(paid),
        "spent_percent": 100 * paid / campaign.airtime_budget
        if campaign.airtime_budget else None,
        "committed": money(sum(amounts.get(s, 0) for s in COMMITTED)),
        "payments": {"pending": counts.get("queued", 0) + counts.get("sending", 0),
                     "sent": counts.get("sent", 0) + counts.get("success", 0),
                     "confirmed": counts.get("success", 0),
                     "failed": counts.get("failed", 0), "unknown": counts.get("unknown", 0),
                     "skipped_over_budget": counts.get("skipped", 0)},
    }
