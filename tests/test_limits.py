"""Per-number limits: one abusive number cannot fill the stream, and is told so."""

from __future__ import annotations

import json

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from gateway.config import Settings
from gateway.store.models import Campaign, Channel
from gateway.store.sessions import pseudonym
from gateway.web.app import create_app

FORM = "application/x-www-form-urlencoded"
LIMITED = "END Too many requests from your number. Please try again in a few minutes."


def _client(settings: Settings, **limits: int) -> FlaskClient:
    return create_app(settings.with_(limit_window_seconds=3600, **limits)).test_client()


def _hop(client: FlaskClient, url: str, phone: str, session: str, text: str) -> tuple[int, str]:
    resp = client.post(url, content_type=FORM, data={
        "sessionId": session, "serviceCode": "*920*16#", "phoneNumber": phone,
        "networkCode": "62001", "text": text})
    return resp.status_code, resp.get_data(as_text=True)


def test_one_number_over_its_limit_gets_end_and_fills_nothing(
        settings: Settings, engine: Engine, channel: Channel,
        redis_client: redis.Redis, ussd_url: str) -> None:
    """Past CIVICDIAL_LIMIT_PER_RESPONDENT hops in the window, a number gets a clear END
    (200, not a 5xx) and nothing reaches the stream; other numbers go on as before."""
    client = _client(settings, limit_per_respondent=4, limit_per_channel=0)
    flood = "+233241110001"
    for n in range(4):
        code, reply = _hop(client, ussd_url, flood, f"F{n}", "")
        assert (code, reply[:4]) == (200, "CON "), reply
    waiting = redis_client.xlen("cd:events")
    for n in range(4, 40):
        assert _hop(client, ussd_url, flood, f"F{n}", "") == (200, LIMITED)
    assert redis_client.xlen("cd:events") == waiting
    code, reply = _hop(client, ussd_url, "+233241110002", "O1", "")
    assert (code, reply[:4]) == (200, "CON ")


def test_a_channel_over_its_limit_answers_end(settings: Settings, engine: Engine,
                                               channel: Channel, ussd_url: str) -> None:
    """CIVICDIAL_LIMIT_PER_CHANNEL caps everyone on a channel together."""
    client = _client(settings, limit_per_respondent=0, limit_per_channel=3)
    replies = [_hop(client, ussd_url, f"+23324111{n:04d}", f"C{n}", "")[1] for n in range(5)]
    assert [r[:4] for r in replies[:3]] == ["CON "] * 3
    assert replies[3:] == [LIMITED] * 2


@pytest.mark.parametrize("limit", [0])
def test_no_limit_when_off(settings: Settings, engine: Engine, channel: Channel,
                           ussd_url: str, limit: int) -> None:
    """0 turns a limit off."""
    client = _client(settings, limit_per_respondent=limit, limit_per_channel=limit)
    for n in range(50):
        assert _hop(client, ussd_url, "+233241110009", f"N{n}", "")[1].startswith("CON ")


def test_sms_flood_is_told_once_and_streams_nothing(settings: Settings, engine: Engine,
                                                    channel: Channel,
                                                    redis_client: redis.Redis) -> None:
    """By SMS (Africa's Talking, replies through the outbox): the first message over the
    limit queues one reply saying so; the rest get nothing and add nothing to the stream;
    STOP still works."""
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign))
        assert campaign is not None
        db.add(Channel(key="at-limit-key", provider="africastalking", kind="sms",
                       address="1662", campaign_id=campaign.id, config=json.dumps({
                           "username": "sandbox", "api_key": "at-key", "rate_per_second": 0})))
    client = _client(settings, limit_per_respondent=2, limit_per_channel=0)
    url = "/webhooks/africastalking/at-limit-key/sms"

    def sms(text: str, n: int) -> int:
        return client.post(url, content_type=FORM, data={
            "from": "+233241110003", "to": "1662", "text": text, "id": f"m{n}",
            "date": "2026-12-01 10:00:00", "linkId": ""}).status_code

    assert sms("SURVEY", 0) == 200 and sms("1", 1) == 200
    before = redis_client.xlen("cd:events")
    assert sms("1", 2) == 200  # the first one over: told
    told = [json.loads(e[b"e"]) for _, e in redis_client.xrange("cd:events")][before:]
    assert len(told) == 1 and "Too many requests" in json.dumps(told[0]), told
    for n in range(3, 30):
        assert sms("1", n) == 200
    assert redis_client.xlen("cd:events") == before + 1
    assert sms("STOP", 30) == 200
    assert redis_client.exists("cd:optout:" + pseudonym(settings.pseudonym_key,
                                                        "+233241110003"))

