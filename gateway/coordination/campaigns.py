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
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.interview.questionnaire import Questionnaire, load_questionnaire
from gateway.interview.quota import Quota, QuotaError, define
from gateway.money import minor_to_text
from gateway.store.models import ApiToken, AuditEntry, Campaign, Channel, QuestionnaireVersion

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
    quota = Quota.decode(c.quotas)
    return {"slug": c.slug, "name": c.name, "state": c.state,
            "questionnaire_version": c.questionnaire_version, "target_size": c.target_size,
            "sms_keyword": c.sms_keyword, "sms_handover": c.sms_handover,
            "opens_at": c.opens_at.isoformat() if c.opens_at else None,
            "closes_at": c.closes_at.isoformat() if c.closes_at else None,
            # None: all of the questionnaire's languages.
            "languages": c.languages.split(",") if c.languages else None,
            "quotas": {"on": list(quota.on), "targets": quota.targets} if quota else None,
            "reminder_hours": c.reminder_hours, "reminder_max": c.reminder_max,
            "airtime": {"currency": c.airtime_currency, "amount": minor_to_text(c.airtime_amount),
                        "budget": minor_to_text(c.airtime_budget)}
            if c.airtime_amount is not None else None}


def parse_money(text: str, what: str) -> int:
    """'2', '2.5', '2.50' -> minor units (250); anything else is refused."""
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise CampaignError(f"{what}: {text!r} is not an amount like 2.50") from None
    # The range first: quantize() of a huge value (1e999999) raises InvalidOperation.
    if not value.is_finite() or value <= 0 or value > 10**7 \
            or value != value.quantize(Decimal("0.01")):
        raise CampaignError(f"{what}: give a positive amount with at most 2 decimals")
    return int(value * 100)


def set_airtime(db: Session, actor: str, slug: str, currency: str | None,
                amount: str | None = None, budget: str | None = None) -> Campaign:
    """Turn the airtime thank-you on (currency, amount per completed interview, budget cap
    for the campaign) or, with currency None, off. Lowering the budget below what is
    already spent only stops further payments."""
    campaign = get_campaign(db, slug)
    before = campaign_view(campaign)
    if currency is None:
        # The currency and budget stay: payments made while it was on are still shown.
        campaign.airtime_amount = None
    else:
        if not re.fullmatch(r"[A-Z]{3}", currency.strip().upper()):
            raise CampaignError("airtime currency: a 3-letter ISO code such as GHS, KES")
        if amount is None or budget is None:
            raise CampaignError("airtime needs an amount and a budget")
        campaign.airtime_currency = currency.strip().upper()
        campaign.airtime_amount = parse_money(amount, "airtime amount")
        campaign.airtime_budget = parse_money(budget, "airtime budget")
        if campaign.airtime_budget < campaign.airtime_amount:
            raise CampaignError("airtime budget is smaller than one payment")
    audit(db, actor, "campaign.airtime", slug, before=before, after=campaign_view(campaign))
    return campaign


def set_version(db: Session, actor: str, slug: str, version: str) -> Campaign:
    """Move a draft or paused campaign to another questionnaire version. Interviews under
    way finish on the version they started on; new ones take this one when it opens."""
    campaign = get_campaign(db, slug)
    if campaign.state not in ("draft", "paused"):
        raise CampaignError(f"campaign {slug} is {campaign.state}: pause it (or create a new "
                            "campaign) before changing its questionnaire")
    if db.get(QuestionnaireVersion, version) is None:
        raise CampaignError(f"no questionnaire version {version!r}: load it first "
                            "(civicdial questionnaire load FILE)")
    before = campaign_view(campaign)
    campaign.questionnaire_version = version
    form = campaign_form(db, campaign)
    if campaign.languages:
        try:
            campaign.languages = _offered(form, campaign.languages.split(","))
        except CampaignError as exc:
            raise CampaignError(f"{exc}: change the campaign's languages first") from None
    quota = Quota.decode(campaign.quotas)
    if quota is not None:
        # The quotas must still name questions and choices of the new version.
        try:
            define(form, quota.on, [(quota.cell(key), target)
                                    for key, target in quota.targets.items()])
        except QuotaError as exc:
            raise CampaignError(f"the campaign's quotas do not fit version {version}: {exc}; "
                                "clear or replace them first") from None
    audit(db, actor, "campaign.questionnaire", slug, before=before,
          after=campaign_view(campaign))
    return campaign


def _offered(form: Questionnaire, wanted: list[str]) -> str:
    """Language keys of `form` for codes, names or keys ('tw', 'Twi', 'Twi (tw)')."""
    keys = []
    for text in wanted:
        typed = text.strip().casefold()
        match = next((lang.key for lang in form.languages
                      if typed in (lang.key.casefold(), lang.code.casefold(),
                                   lang.name.casefold())), None)
        if match is None:
            offered = ", ".join(f"{lang.code} ({lang.name})" for lang in form.languages)
            raise CampaignError(f"language {text!r} is not in questionnaire {form.version}; "
                                f"it has {offered}")
        if match not in keys:
            keys.append(match)
    return ",".join(keys)


def set_languages(db: Session, actor: str, slug: str, wanted: list[str] | None) -> Campaign:
    """Offer only these of the questionnaire's languages (None or []: all of them)."""
    campaign = get_campaign(db, slug)
    before = campaign_view(campaign)
    campaign.languages = _offered(campaign_form(db, campaign), wanted) if wanted else ""
    audit(db, actor, "campaign.languages", slug, before=before, after=campaign_view(campaign))
    return campaign


def set_reminders(db: Session, actor: str, slug: str, hours: int | None,
                  at_most: int | None) -> Campaign:
    """Remind people who started but did not finish every `hours`, at most `at_most`
    times (0: never)."""
    campaign = get_campaign(db, slug)
    before = campaign_view(campaign)
    if hours is not None:
        if not 1 <= hours <= 24 * 60:
            raise CampaignError("reminder hours: between 1 and 1440")
        campaign.reminder_hours = hours
    if at_most is not None:
        if not 0 <= at_most <= 10:
            raise CampaignError("reminders at most: between 0 and 10")
        campaign.reminder_max = at_most
    audit(db, actor, "campaign.reminders", slug, before=before, after=campaign_view(campaign))
    return campaign


def campaign_form(db: Session, campaign: Campaign) -> Questionnaire:
    row = db.get(QuestionnaireVersion, campaign.questionnaire_version)
    if row is None:
        raise CampaignError(f"questionnaire version {campaign.questionnaire_version} is gone")
    return load_questionnaire(row.source, row.filename)


def set_quotas(db: Session, actor: str, slug: str,
               define_quota: Callable[[Questionnaire], Quota] | None) -> Campaign:
    """Set (or with None, remove) a campaign's quotas; `define_quota` builds them from the
    campaign's questionnaire (e.g. quotas.read_csv), raising QuotaError if they do not fit."""
    campaign = get_campaign(db, slug)
    before = campaign_view(campaign)
    try:
        quota = define_quota(campaign_form(db, campaign)) if define_quota else None
    except QuotaError as exc:
        raise CampaignError(f"quotas: {exc}") from None
    campaign.quotas = quota.encode() if quota else ""
    audit(db, actor, "campaign.quotas", slug, before=before, after=campaign_view(campaign))
    return campaign


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


def check_name(name: str) -> None:
    """A campaign name: 1-300 characters (the column's size, and what the console and
    dashboard headings show), no control characters; CampaignError says which is wrong."""
    if not name.strip():
        raise CampaignError("give the campaign a name")
    if len(name) > 300:
        raise CampaignError(f"at most 300 characters (not {len(name)})")
    if any(ord(c) < 32 for c in name):
        raise CampaignError("no control characters (tabs, line breaks, escapes)")


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
    check_name(name)
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
    mine = db.scalars(select(Channel).where(Channel.campaign_id == campaign.id,
                                            Channel.unbound_at.is_(None))).all()
    for ch in mine:
        clash = open_campaign_holding(db, ch.provider, ch.kind, ch.address, campaign.id)
        if clash:
            raise CampaignError(f"{ch.kind} {ch.address} is bound to open campaign {clash}: "
                                "close or pause it first")


def same_address(kind: str, a: str, b: str) -> bool:
    """Whether two channel addresses are one: operators differ on a USSD code's '#'."""
    if kind == "ussd":
        return a.strip().rstrip("#") == b.strip().rstrip("#")
    return a.strip() == b.strip()


def open_campaign_holding(db: Session, provider: str, kind: str, address: str,
                          other_than: int | None) -> str | None:
    """The slug of an open campaign (other than `other_than`) with a channel on this
    provider, kind and address, or None."""
    rows = db.execute(
        select(Campaign.slug, Channel.address).join(Channel, Channel.campaign_id == Campaign.id)
        .where(Campaign.state == "open", Channel.kind == kind, Channel.provider == provider,
               Channel.unbound_at.is_(None),
               Campaign.id != (other_than if other_than is not None else -1))
        .order_by(Campaign.id)).all()
    return next((slug for slug, held in rows if same_address(kind, held, address)), None)


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


def set_part_budget(db: Session, actor: str, slug: str, seconds: int | None,
                    screens: int | None) -> Campaign:
    """The USSD per-session budget: a session ends at the next question boundary after this
    many seconds or screens ("Part 1 of 3 done"), before the operator cuts it (~180 s)."""
    campaign = get_campaign(db, slug)
    before = campaign_view(campaign)
    if seconds is not None:
        if not 30 <= seconds <= 170:
            raise CampaignError("part budget seconds: between 30 and 170 (operators cut "
                                "sessions at about 180)")
        campaign.budget_seconds = seconds
    if screens is not None:
        if not 3 <= screens <= 100:
            raise CampaignError("part budget screens: between 3 and 100")
        campaign.budget_screens = screens
    audit(db, actor, "campaign.part_budget", slug, before=before,
          after={**campaign_view(campaign), "budget_seconds": campaign.budget_seconds,
                 "budget_screens": campaign.budget_screens})
    return campaign
