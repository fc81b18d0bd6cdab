"""Campaign lifecycle, questionnaire versions, API tokens and the audit log.

Every change is one transaction that also writes its audit entry, so an action is
either applied and recorded, or neither.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.models import ApiToken, AuditEntry, Campaign, Channel, QuestionnaireVersion
from gateway.questionnaire import Questionnaire

ROLES = ("admin", "coordinator", "viewer")
# state -> states it may move to
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "draft": ("open", "closed"),
    "open": ("paused", "closed"),
    "paused": ("open", "closed"),
    "closed": (),
}
VERBS = {"open": "open", "paused": "pause", "closed": "close"}
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{1,62}$")


class CampaignError(ValueError):
    """A request that cannot be applied, with what to fix."""


def cli_actor() -> str:
    """Who runs the CLI, for the audit log."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry in some containers
        return "cli"


def audit(db: Session, actor: str, action: str, target: str,
          before: dict[str, Any] | None = None, after: dict[str, Any] | None = None) -> None:
    db.add(AuditEntry(at=datetime.now(UTC), actor=actor, action=action, target=target,
                      before=json.dumps(before, default=str) if before is not None else "",
                      after=json.dumps(after, default=str) if after is not None else ""))


def campaign_view(c: Campaign) -> dict[str, Any]:
    return {"slug": c.slug, "name": c.name, "state": c.state,
            "questionnaire_version": c.questionnaire_version, "target_size": c.target_size,
            "sms_keyword": c.sms_keyword, "sms_handover": c.sms_handover,
            "opens_at": c.opens_at.isoformat() if c.opens_at else None,
            "closes_at": c.closes_at.isoformat() if c.closes_at else None}


def load_version(db: Session, form: Questionnaire,
                 actor: str | None) -> tuple[QuestionnaireVersion, bool]:
    """Store a validated questionnaire version; the same bytes again is the same version.
    actor None: the shipped form loaded at start-up, not a coordinator's action."""
    row = db.get(QuestionnaireVersion, form.version)
    if row is not None:
        return row, False
    row = QuestionnaireVersion(
        version=form.version, form_id=form.form_id, title=form.title,
        form_version=form.form_version, filename=form.filename,
        languages=",".join(lang.key for lang in form.languages), question_count=form.asked,
        source=form.source)
    db.add(row)
    if actor is not None:
        audit(db, actor, "questionnaire.load", form.version,
              after={"form_id": form.form_id, "title": form.title, "filename": form.filename})
    return row, True


def get_campaign(db: Session, slug: str) -> Campaign:
    # A malformed slug (say, with a NUL byte) names no campaign; never send it to SQL.
    campaign = db.scalar(select(Campaign).where(Campaign.slug == slug)) \
        if _SLUG.match(slug) else None
    if campaign is None:
        raise CampaignError(f"no campaign {slug!r}")
    return campaign


def set_schedule(db: Session, actor: str, slug: str, opens_at: datetime | None,
                 closes_at: datetime | None) -> Campaign:
    """When an open campaign answers; outside the window it says it is not open."""
    campaign = get_campaign(db, slug)
    if opens_at and closes_at and closes_at <= opens_at:
        raise CampaignError("closes_at must be after opens_at")
    before = campaign_view(campaign)
    campaign.opens_at, campaign.closes_at = opens_at, closes_at
    audit(db, actor, "campaign.schedule", slug, before=before, after=campaign_view(campaign))
    return campaign


def create_campaign(db: Session, actor: str, slug: str, name: str, version: str,
                    target_size: int | None = None) -> Campaign:
    if not _SLUG.match(slug):
        raise CampaignError(f"slug {slug!r}: use 2-63 lower-case letters, digits, - or _")
    if db.scalar(select(Campaign.id).where(Campaign.slug == slug)) is not None:
        raise CampaignError(f"campaign {slug!r} already exists")
    if db.get(QuestionnaireVersion, version) is None:
        raise CampaignError(f"no questionnaire version {version!r}: load it first "
                            "(civicdial questionnaire load FILE)")
    if target_size is not None and target_size < 1:
        raise CampaignError("target size must be a positive number")
    campaign = Campaign(slug=slug, name=name, questionnaire_version=version, state="draft",
                        target_size=target_size)
    db.add(campaign)
    db.flush()
    audit(db, actor, "campaign.create", slug, after=campaign_view(campaign))
    return campaign


def transition(db: Session, actor: str, slug: str, to: str) -> Campaign:
    campaign = get_campaign(db, slug)
    if to not in TRANSITIONS.get(campaign.state, ()):
        allowed = ", ".join(TRANSITIONS.get(campaign.state, ())) or "nothing (it is final)"
        raise CampaignError(f"campaign {slug} is {campaign.state}: it can go to {allowed}, "
                            f"not {to}")
    if to == "open":
        _check_codes_free(db, campaign)
    before = campaign_view(campaign)
    campaign.state = to
    audit(db, actor, f"campaign.{VERBS[to]}", slug, before=before,
          after=campaign_view(campaign))
    return campaign


def _check_codes_free(db: Session, campaign: Campaign) -> None:
    """A USSD code or SMS number can serve one open campaign at a time."""
    mine = db.scalars(select(Channel).where(Channel.campaign_id == campaign.id)).all()
    for ch in mine:
        clash = db.scalar(
            select(Campaign.slug).join(Channel, Channel.campaign_id == Campaign.id).where(
                Campaign.state == "open", Campaign.id != campaign.id,
                Channel.kind == ch.kind, Channel.provider == ch.provider,
                Channel.address == ch.address))
        if clash:
            raise CampaignError(f"{ch.kind} {ch.address} is bound to open campaign {clash}: "
                                "close or pause it first")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(db: Session, actor: str, name: str, role: str) -> str:
    """A new API token; returned once, only its hash is kept."""
    if role not in ROLES:
        raise CampaignError(f"role must be one of {', '.join(ROLES)}")
    token = "cd_" + secrets.token_urlsafe(32)
    db.add(ApiToken(name=name, role=role, token_hash=hash_token(token),
                    created_at=datetime.now(UTC)))
    audit(db, actor, "token.create", name, after={"role": role})
    return token
