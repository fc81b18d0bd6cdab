"""The next hop of a USSD session on the process that committed the last one starts from
that commit (one round trip, no read), and still answers exactly what a fresh read would:
whatever changed in Redis meanwhile (another worker's answer, an erasure, an expiry, a
quota filling, the limits) is seen."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine
from test_limits import LIMITED
from test_quotas import FULL, Dialler, run

from gateway.config import Settings
from gateway.store import sessions
from gateway.store.models import Channel
from gateway.store.sessions import pseudonym, quota_key
from gateway.web.app import create_app
from workers.persist import drain

FORM = "application/x-www-form-urlencoded"
PHONE = "+233241230001"


def _calls(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats").get(f"cmdstat_{command}")
    return int(stats["calls"]) if stats else 0


def _hop(client: FlaskClient, url: str, text: str, session: str = "ATUid_w1",
         phone: str = PHONE) -> str:
    resp = client.post(url, content_type=FORM, data={
        "sessionId": session, "serviceCode": "*920*16#", "phoneNumber": phone,
        "networkCode": "62001", "text": text})
    assert resp.status_code == 200, resp.text
    return resp.text


def _events(client: redis.Redis) -> list[dict[str, object]]:
    return [json.loads(fields[b"e"]) for _, fields in client.xrange("cd:events")]


@pytest.fixture
def other(settings: Settings, app: Flask) -> FlaskClient:
    """A second web worker: an app of its own, with its own store, on the same Redis."""
    second = create_app(settings)
    yield second.test_client()
    second.extensions["civicdial"].engine.dispose()


def test_the_next_hop_reads_nothing_and_a_retry_elsewhere_is_seen(
        client: FlaskClient, other: FlaskClient, ussd_url: str,
        redis_client: redis.Redis) -> None:
    assert "Language" in _hop(client, ussd_url, "")
    reads = _calls(redis_client, "mget")
    consent = _hop(client, ussd_url, "1")
    assert _calls(redis_client, "mget") == reads  # from this worker's own commit
    # The next hop lands on the other worker, which reads, and answers it.
    sex = _hop(other, ussd_url, "1*1")
    assert _calls(redis_client, "mget") == reads + 1
    assert sex != consent
    # The provider retries that hop on the first worker, whose last commit is now stale:
    # it must replay the other worker's answer, not answer the question again.
    assert _hop(client, ussd_url, "1*1") == sex
    # And the next input goes on from there, on either worker.
    assert _hop(client, ussd_url, "1*1*1") == _hop(other, ussd_url, "1*1*1")
    answers = [(e["q"], e["v"]) for e in _events(redis_client) if e["k"] == "answer"]
    assert sorted(answers) == [("consent", "yes"), ("sex", "female")]  # once each


def test_an_erasure_between_hops_is_seen(client: FlaskClient, ussd_url: str,
                                         redis_client: redis.Redis, settings: Settings,
                                         channel: Channel) -> None:
    _hop(client, ussd_url, "")
    _hop(client, ussd_url, "1")
    respondent = pseudonym(settings.pseudonym_key, PHONE)
    # What an erasure (or the keys' expiry) leaves: no state, no session record.
    redis_client.delete(f"cd:st:{channel.campaign_id}:{respondent}",
                        f"cd:ps:{channel.id}:ATUid_w1")
    # Unknown session again: it opens as a new one, as on a worker that never saw it.
    assert "Language" in _hop(client, ussd_url, "1*1")
    assert not [e for e in _events(redis_client) if e["k"] == "answer"]  # no consent


def test_a_session_record_that_expired_between_hops_is_seen(
        client: FlaskClient, other: FlaskClient, ussd_url: str, redis_client: redis.Redis,
        channel: Channel) -> None:
    """The provider session's record lives shorter than the interview's state: once it
    has gone, the same session id is a new dial, which offers to resume."""
    for text in ("", "1", "1*1"):
        _hop(client, ussd_url, text)
    redis_client.delete(f"cd:ps:{channel.id}:ATUid_w1")
    resumed = _hop(client, ussd_url, "1*1*1")
    assert resumed.startswith("CON Welcome back"), resumed
    # What a worker that never saw the session answers for the same request.
    redis_client.delete(f"cd:ps:{channel.id}:ATUid_w1")
    assert _hop(other, ussd_url, "1*1*1") == resumed


def test_a_quota_that_fills_between_hops_is_seen(
        client: FlaskClient, ussd_url: str, env: dict[str, str], engine: Engine,
        redis_client: redis.Redis, channel: Channel, tmp_path: Path) -> None:
    quota_file = tmp_path / "quotas.csv"
    quota_file.write_text("region,sex,target\ngreater_accra,female,1\n")
    assert run(env, "campaign", "quota", "set", "sdg1662", str(quota_file))[0] == 0
    waiting = Dialler(client, ussd_url, "+233240000011")
    assert "Language" in waiting.dial()
    for answer in ("1", "1", "1", "2"):  # English, consent, female, 18-24
        waiting.send(answer)
    # Meanwhile a woman in Greater Accra completes and the worker fills the cell.
    first = Dialler(client, ussd_url, "+233240000012")
    first.to_region("1")
    first.finish()
    drain(redis_client, engine, "cd:events")
    assert json.loads(redis_client.get(quota_key("cd:", channel.campaign_id))) == [
        "greater_accra|female"]
    ended = waiting.send("1")  # Greater Accra
    assert ended.startswith("END ") and FULL in ended


def test_the_limits_hold_within_one_session(settings: Settings, engine: Engine,
                                            channel: Channel, ussd_url: str,
                                            redis_client: redis.Redis,
                                            caplog: pytest.LogCaptureFixture) -> None:
    client = create_app(settings.with_(limit_window_seconds=3600, limit_per_respondent=3,
                                       limit_per_channel=0)).test_client()
    assert "Language" in _hop(client, ussd_url, "")
    assert _hop(client, ussd_url, "1").startswith("CON ")
    assert _hop(client, ussd_url, "1*1").startswith("CON ")
    stored = redis_client.xlen("cd:events")
    respondent = pseudonym(settings.pseudonym_key, PHONE)
    state = redis_client.get(f"cd:st:{channel.campaign_id}:{respondent}")
    with caplog.at_level(logging.WARNING, logger="gateway.webhooks"):
        assert _hop(client, ussd_url, "1*1*1") == LIMITED
        assert _hop(client, ussd_url, "1*1*1*1") == LIMITED
    assert redis_client.xlen("cd:events") == stored
    assert redis_client.get(f"cd:st:{channel.campaign_id}:{respondent}") == state
    told = [r for r in caplog.records if "over the per-number limit" in r.getMessage()]
    assert len(told) == 1
    counter = next(k for k in redis_client.keys("cd:lim:*"))
    assert int(redis_client.get(counter)) == 5  # every hop counted once


def test_a_process_remembers_a_bounded_number_of_sessions(
        app: Flask, client: FlaskClient, ussd_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "RECALLED_SESSIONS", 3)
    for n in range(6):
        assert "Language" in _hop(client, ussd_url, "", f"ATUid_b{n}", f"+23324123100{n}")
    assert len(app.extensions["civicdial"].store._recalled) == 3


def _alternate(workers: tuple[FlaskClient, FlaskClient], url: str, citizens: int,
               first: int) -> int:
    """Citizens whose hops go to the two workers in turn (a proxy spreading them at
    random at its worst); the hops sent."""
    hops = 0
    for n in range(first, first + citizens):
        phone, session, inputs = f"+2332412350{n:02d}", f"ATUid_m{n}", []
        assert "Language" in _hop(workers[hops % 2], url, "", session, phone)
        hops += 1
        for answer in ("1", "1", "1", "2", "1", "1"):  # English ... region, urban
            inputs.append(answer)
            assert _hop(workers[hops % 2], url, "*".join(inputs), session, phone).startswith(
                "CON ")
            hops += 1
    return hops


def test_a_session_moving_between_workers_is_read_after_one_failed_warm_hop(
        client: FlaskClient, other: FlaskClient, ussd_url: str, redis_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "WARM_FAILURES", 1.0)  # the process-wide gate off
    commits = _calls(redis_client, "evalsha")
    hops = _alternate((client, other), ussd_url, 4, 0)
    wasted = _calls(redis_client, "evalsha") - commits - hops  # every hop commits once
    # One failed warm hop per worker and session at most, not one on every hop (20).
    assert 0 < wasted <= 2 * 4
    answers = [(e["r"], e["q"]) for e in _events(redis_client) if e["k"] == "answer"]
    assert len(answers) == len(set(answers)) == 4 * 5  # consent, sex, age, region, urban


def test_a_process_whose_warm_hops_mostly_fail_stops_trying(
        client: FlaskClient, other: FlaskClient, ussd_url: str,
        redis_client: redis.Redis) -> None:
    commits = _calls(redis_client, "evalsha")
    hops = _alternate((client, other), ussd_url, 12, 10)
    wasted = _calls(redis_client, "evalsha") - commits - hops
    # Each worker's third failure or so closes its gate; with it open this would be 24.
    assert wasted <= 8
