"""What every start makes sure of: the schema, the shipped questionnaire, the default
campaign and its Africa's Talking USSD channel (idempotent)."""

from __future__ import annotations

from importlib import resources

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from gateway.coordination.campaigns import load_version
from gateway.coordination.channels import new_channel_key
from gateway.interview.questionnaire import Questionnaire, load_questionnaire
from gateway.store.db import migrate
from gateway.store.models import Campaign, Channel

DEFAULT_CAMPAIGN = "sdg1662"
DEFAULT_SERVICE_CODE = "*920*16#"
SHIPPED_FORM = "sdg1662.md"


def shipped_questionnaire() -> Questionnaire:
    source = resources.files("questionnaires").joinpath(SHIPPED_FORM).read_bytes()
    return load_questionnaire(source, SHIPPED_FORM)


def bootstrap(engine: Engine) -> Channel:
    """Schema, shipped questionnaire, default campaign and its USSD channel (idempotent)."""
    migrate(engine)
    form = shipped_questionnaire()
    with Session(engine) as db, db.begin():
        load_version(db, form, actor=None)
        campaign = db.scalar(select(Campaign).where(Campaign.slug == DEFAULT_CAMPAIGN))
        if campaign is None:
            campaign = Campaign(slug=DEFAULT_CAMPAIGN, name=form.title,
                                questionnaire_version=form.version, state="open")
            db.add(campaign)
            db.flush()
        else:
            # New interviews take the newest shipped form; running ones keep theirs.
            campaign.questionnaire_version = form.version
        # A bound one first; one the coordinator unbound is not made again behind them.
        channel = db.scalar(select(Channel).where(
            Channel.campaign_id == campaign.id, Channel.provider == "africastalking",
            Channel.kind == "ussd").order_by(Channel.unbound_at.is_not(None), Channel.id))
        if channel is None:
            channel = Channel(key=new_channel_key(), provider="africastalking",
                              kind="ussd", address=DEFAULT_SERVICE_CODE,
                              campaign_id=campaign.id, screen_limit=160)
            db.add(channel)
            db.flush()
        db.expunge(channel)
    return channel
