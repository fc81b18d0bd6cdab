"""RESULTS tells the truth: not published; published but too few answers for a figure
(for the region, for the nation); or the figures."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine
from test_tally import load

from gateway.config import Settings
from gateway.indicator.estimates import Params
from gateway.indicator.tally import cells_of, publish, run_tally
from gateway.interview.engine import SessionState, Stage
from gateway.store.models import Channel
from gateway.store.sessions import RESULTS_PUBLISHED, SessionStore, encode_state, pseudonym


@dataclass(frozen=True)
class Case:
    label: str
    stored: dict[str, str] | None  # the results hash; None: publish a tiny real tally
    lang: str
    region: str | None
    expected: str | None  # None: nothing published (the caller says so)
    startswith: bool = False


NATIONAL = "Ghana, % satisfied: Health care 58%."
CASES = [
    Case("nothing published", {}, "en", "ashanti", None),
    Case("published, all suppressed, English", None, "en", "ashanti",
         "Results are published, but too few have answered yet to show figures for your "
         "region or the nation."),
    Case("published, all suppressed, Twi", None, "tw", "ashanti",
         "Yɛatintim nea yɛahunu, nanso", startswith=True),
    Case("published, all suppressed, no region", None, "en", None,
         "Results are published, but too few", startswith=True),
    Case("published, region suppressed", {"en:_national": NATIONAL, RESULTS_PUBLISHED: "1"},
         "en", "ashanti", f"Not enough answers yet for your region. {NATIONAL}"),
    Case("published, region suppressed, Twi",
         {"tw:_national": "Ghana: 58%.", RESULTS_PUBLISHED: "1"}, "tw", "ashanti",
         "Mmuae a efi wo mantam mu nnɔɔso ɛ. Ghana: 58%."),
    Case("published, region refused", {"en:_national": NATIONAL, RESULTS_PUBLISHED: "1"},
         "en", "refuse", NATIONAL),
    Case("published, region has figures",
         {"en:ashanti": "Ashanti 62%.", "en:_national": NATIONAL, RESULTS_PUBLISHED: "1"},
         "en", "ashanti", "Ashanti 62%."),
    Case("published before the marker existed", {"en:_national": NATIONAL}, "en", "ashanti",
         NATIONAL),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_results_text(case: Case, settings: Settings, engine: Engine,
                      redis_client: redis.Redis, channel: Channel) -> None:
    """What RESULTS answers in each state of publication."""
    store = SessionStore(redis_client)
    key = f"cd:results:{channel.campaign_id}"
    if case.stored is None:
        load(engine, channel, 6, seed=3)
        snap = run_tally(engine, channel.campaign_id, params=Params(replicates=0))
        assert all(str(c["status"]).startswith("suppressed") or c["estimate"] is None
                   for c in cells_of(snap) if c["measure"] == "satisfied")
        publish(settings, engine, redis_client, channel.campaign_id)
    elif case.stored:
        redis_client.hset(key, mapping=case.stored)
    got = store.results(channel.campaign_id, case.lang, case.region)
    if case.startswith:
        assert got is not None and got.startswith(case.expected or ""), got
    else:
        assert got == case.expected


def test_ussd_dial_after_completion_says_published(
        client: FlaskClient, ussd_url: str, app: Flask, settings: Settings, engine: Engine,
        redis_client: redis.Redis, channel: Channel) -> None:
    """The screen after completing, once a tally with every cell suppressed is published."""
    load(engine, channel, 6, seed=3)
    run_tally(engine, channel.campaign_id, params=Params(replicates=0))
    publish(settings, engine, redis_client, channel.campaign_id)
    services = app.extensions["civicdial"]
    ch = services.registry.channel(channel.key)
    done = SessionState(version=ch.questionnaire_version, interview="i1", stage=Stage.DONE,
                        lang="English (en)", consented=True, seq=40, updated=time.time(),
                        answers=(("region", "ashanti"),))
    assert services.store.commit(
        campaign=ch.campaign_id, respondent=pseudonym(settings.pseudonym_key,
                                                      "+233241234567"),
        channel=ch.id, session_id="old", expected="", state=encode_state(done),
        state_ttl=600, provider=None, provider_ttl=1, events=[])
    for text in ("", "1"):
        body = client.post(ussd_url, content_type="application/x-www-form-urlencoded", data={
            "sessionId": "D", "serviceCode": "*920*16#", "phoneNumber": "+233241234567",
            "networkCode": "62001", "text": text}).get_data(as_text=True)
    assert body.startswith("END ")
    assert body.endswith("Results are published, but too few have answered yet to show "
                         "figures for your region or the nation.")
    assert len(body) <= 160
