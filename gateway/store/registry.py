"""In-process cache of channels, campaigns and questionnaire versions.

SQL is the source of truth; the webhook hop reads this cache so that it makes no SQL
query. The cache refreshes every few seconds, and at once (throttled) when a request
names a channel key it does not know, so a new channel works without a restart.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from gateway.interview.engine import Rules
from gateway.interview.questionnaire import Questionnaire, load_questionnaire
from gateway.interview.quota import Quota
from gateway.store.db import stored_utc
from gateway.store.models import Campaign, Channel, QuestionnaireVersion

log = logging.getLogger("civicdial.registry")

# GSM 03.90 caps a USSD screen at 182 characters; below ~64 no question fits.
MAX_SCREEN = 182
MIN_SCREEN = 64


@dataclass(frozen=True)
class ChannelInfo:
    id: int
    key: str
    provider: str
    kind: str
    address: str
    campaign_id: int
    campaign_slug: str
    state: str
    questionnaire_version: str
    rules: Rules
    config: dict[str, Any] = field(default_factory=dict)
    keyword: str = "SURVEY"
    sms_handover: bool = False
    opens_at: float | None = None  # epoch seconds
    closes_at: float | None = None
    reminder_seconds: int = 12 * 3600
    reminder_max: int = 1
    airtime: bool = False  # a completed interview earns an airtime thank-you

    def rules_for(self, full_cells: frozenset[str]) -> Rules:
        """The rules with the campaign's quota cells that are full right now."""
        return replace(self.rules, full_cells=full_cells) if self.rules.quota_on \
            else self.rules

    @property
    def campaign_open(self) -> bool:
        """Open, and inside its schedule if it has one (checked per request: the cache
        may be seconds old, the clock is not)."""
        now = time.time()
        return (self.state == "open" and (self.opens_at is None or now >= self.opens_at)
                and (self.closes_at is None or now < self.closes_at))


def _epoch(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    return stored_utc(moment).timestamp()


class Registry:
    def __init__(self, engine: Engine, refresh_seconds: float = 10.0,
                 miss_throttle_seconds: float = 2.0) -> None:
        self.engine = engine
        self.refresh_seconds = refresh_seconds
        self.miss_throttle_seconds = miss_throttle_seconds
        self._channels: dict[str, ChannelInfo] = {}
        self._unbound: dict[str, str] = {}  # key -> provider of channels unbound since
        self._forms: dict[str, Questionnaire] = {}
        self._loaded_at = 0.0
        self._failing = False  # the last refresh on a hop's path failed
        self._lock = threading.Lock()

    def channel(self, key: str) -> ChannelInfo | None:
        now = time.monotonic()
        age = now - self._loaded_at
        if age > self.refresh_seconds or (
                key not in self._channels and key not in self._unbound
                and age > self.miss_throttle_seconds):
            self._refresh_for_hop()
        return self._channels.get(key)

    def _refresh_for_hop(self, wait: bool = False) -> None:
        """Refresh on a hop's path. A hop needs only Redis, so once something is cached,
        SQL failing (the server down, a migration half done) must not fail hops: they go
        on with the cache, one thread at a time tries SQL again, and the others do not
        queue behind it (unless `wait`: they want a refresh of their own)."""
        if not self._loaded_at:
            self.refresh()  # nothing to answer from yet: wait for it, errors included
            return
        if not self._lock.acquire(blocking=wait):
            return  # another thread is refreshing
        try:
            self._load()
        except SQLAlchemyError as exc:
            self._loaded_at = time.monotonic()  # try again after refresh_seconds
            if not self._failing:
                log.warning("SQL refresh of the channel cache failed (%s: %s); answering "
                            "from the cache", type(exc).__name__, str(exc).splitlines()[0])
            self._failing = True
        else:
            if self._failing:
                log.warning("SQL answers again; the channel cache is fresh")
            self._failing = False
        finally:
            self._lock.release()

    def cached(self, key: str) -> ChannelInfo | None:
        """The channel with this key as last loaded, never touching SQL (for metrics)."""
        return self._channels.get(key)

    def unbound_provider(self, key: str) -> str | None:
        """The provider of an unbound channel with this key (its webhooks answer 410),
        or None; as fresh as the last refresh, which channel() just made."""
        return self._unbound.get(key)

    def channels(self) -> list[ChannelInfo]:
        """Every channel, freshly read (an erasure forgets state in every campaign), or
        the cached ones while SQL fails."""
        self._refresh_for_hop(wait=True)
        return sorted(self._channels.values(), key=lambda c: c.id)

    def channel_by_id(self, channel_id: int) -> ChannelInfo | None:
        if time.monotonic() - self._loaded_at > self.refresh_seconds:
            self._refresh_for_hop()
        return next((c for c in self._channels.values() if c.id == channel_id), None)

    def sms_channel(self, campaign_id: int) -> ChannelInfo | None:
        """The campaign's first SMS channel (for hand-overs from USSD)."""
        sms = [c for c in self._channels.values()
               if c.campaign_id == campaign_id and c.kind == "sms"]
        return min(sms, key=lambda c: c.id) if sms else None

    def refresh(self) -> None:
        with self._lock:
            self._load()

    def _load(self) -> None:
        with Session(self.engine) as db:
            rows = db.execute(select(Channel, Campaign).join(
                Campaign, Channel.campaign_id == Campaign.id)).all()
            unbound = {ch.key: ch.provider for ch, _ in rows if ch.unbound_at is not None}
            rows = [(ch, camp) for ch, camp in rows if ch.unbound_at is None]
            # Campaigns that can answer RESULTS by SMS: the last screen offers it only there.
            with_sms = {camp.id for ch, camp in rows if ch.kind == "sms"}
            channels = {}
            for ch, camp in rows:
                config = json.loads(ch.config or "{}")
                quota = Quota.decode(camp.quotas)
                quota_on = quota.on if quota else ()
                languages = tuple(filter(None, camp.languages.split(",")))
                if ch.kind == "sms":
                    rules = Rules.sms(keyword=camp.sms_keyword, max_invalid=camp.max_invalid,
                                      resume_window=camp.sms_idle_seconds,
                                      fold=bool(config.get("fold", False)), quota_on=quota_on,
                                      languages=languages)
                else:
                    rules = Rules(
                        screen_limit=max(MIN_SCREEN, min(MAX_SCREEN, ch.screen_limit)),
                        budget_seconds=camp.budget_seconds,
                        budget_screens=camp.budget_screens, resume_window=camp.resume_window,
                        max_invalid=camp.max_invalid, dial=ch.address, quota_on=quota_on,
                        languages=languages, results_by_sms=camp.id in with_sms,
                        erase_on_resume=True,
                    )
                channels[ch.key] = ChannelInfo(
                    id=ch.id, key=ch.key, provider=ch.provider, kind=ch.kind,
                    address=ch.address, campaign_id=camp.id, campaign_slug=camp.slug,
                    state=camp.state,
                    opens_at=_epoch(camp.opens_at), closes_at=_epoch(camp.closes_at),
                    questionnaire_version=camp.questionnaire_version,
                    rules=rules, config=config,
                    keyword=camp.sms_keyword, sms_handover=camp.sms_handover,
                    reminder_seconds=camp.reminder_hours * 3600,
                    reminder_max=camp.reminder_max,
                    airtime=camp.airtime_amount is not None,
                )
            self._channels = channels
            self._unbound = unbound
            self._loaded_at = time.monotonic()

    def preload(self) -> None:
        """Parse every campaign's questionnaire now (the web app calls this once per
        process, so that no hop pays for it); the channel cache is left as it was."""
        with Session(self.engine) as db:
            versions = db.scalars(select(Campaign.questionnaire_version).distinct()).all()
        for version in versions:
            self.questionnaire(version)

    def questionnaire(self, version: str) -> Questionnaire:
        form = self._forms.get(version)
        if form is None:
            with Session(self.engine) as db:
                row = db.get(QuestionnaireVersion, version)
                if row is None:
                    raise LookupError(f"questionnaire version {version} is not stored")
                form = load_questionnaire(row.source, row.filename)
            self._forms[version] = form
        return form
