"""Unbinding a channel (CLI `channels remove`, the console): the row stays, marked unbound;
its webhooks answer 410 Gone; its queued and held messages stop with "channel unbound",
counted in campaign status; the address can be bound again."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from urllib.parse import urlencode

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from test_campaigns import run
from test_sms import add_channel

from gateway.store.models import AuditEntry, Channel, OutboundMessage

FORM = "application/x-www-form-urlencoded"


def _message(engine: Engine, channel_id: int, key: str, status: str) -> int:
    now = datetime.now(UTC)
    with Session(engine) as db, db.begin():
        row = OutboundMessage(key=key, channel_id=channel_id, respondent="r-" + key,
                              recipient="sealed", body="Invitation", kind="invitation",
                              status=status, created_at=now, updated_at=now)
        db.add(row)
        db.flush()
        return row.id


def _sms(client: FlaskClient, key: str, msg_id: str) -> int:
    return client.post(f"/webhooks/africastalking/{key}/sms", content_type=FORM,
                       data=urlencode({"from": "+233241234567", "to": "1662", "text": "SURVEY",
                                       "date": "2026-11-25 12:00:00", "id": msg_id,
                                       "linkId": "", "networkCode": "62001"})).status_code


def test_channels_remove_keeps_the_row_and_stops_its_messages(
        env: dict[str, str], app: Flask, client: FlaskClient, engine: Engine,
        channel: Channel, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """channels remove: queued and held messages fail with "channel unbound" (sent ones
    are left alone), status and the channel list say so, the webhook answers 410 with a
    log line, a message queued later fails the same way, and the address binds again."""
    sms = add_channel(engine, "africastalking", "1662", {"username": "sandbox",
                                                        "api_key": "k", "rate_per_second": 0})
    registry = app.extensions["civicdial"].registry
    registry.refresh()
    assert _sms(client, sms.key, "m0") == 200
    queued = _message(engine, sms.id, "q", "queued")
    held = _message(engine, sms.id, "h", "held")
    sent = _message(engine, sms.id, "s", "sent")

    code, out = run(env, "channels", "remove", f"#{sms.id}", "--json")
    assert code == 0, out
    view = json.loads(out)
    assert (view["id"], view["messages_stopped"]) == (sms.id, 2) and view["unbound_at"]
    with Session(engine) as db:
        kept = db.get(Channel, sms.id)
        assert kept is not None and kept.unbound_at is not None  # the row stays
        status = {m.id: (m.status, m.error) for m in db.scalars(select(OutboundMessage))}
        entry = db.scalar(select(AuditEntry).where(AuditEntry.action == "channel.remove"))
        assert entry is not None and '"messages_stopped": 2' in entry.after
    assert status[queued] == status[held] == ("failed", "channel unbound")
    assert status[sent] == ("sent", "")

    report = json.loads(run(env, "status", "--json")[1])["campaigns"][0]
    assert [(c["id"], c["messages_stopped"], c["error"]) for c in report[
        "channels_unbound"]] == [(sms.id, 2, "channel unbound")]
    assert "2 message(s) stopped: channel unbound" in run(env, "status")[1]
    listing = {c["id"]: c for c in json.loads(run(env, "channels", "--json")[1])}
    assert listing[sms.id]["unbound_at"] and listing[channel.id]["unbound_at"] is None
    assert "UNBOUND" in run(env, "channels")[1]

    registry.refresh()
    caplog.set_level("WARNING", logger="civicdial.webhooks")
    assert _sms(client, sms.key, "m1") == 410
    lines = [r.getMessage() for r in caplog.records if r.name == "civicdial.webhooks"]
    assert len(lines) == 1 and "410 channel unbound" in lines[0] and sms.key not in lines[0]
    assert _sms(client, "no-such-key", "m2") == 404  # unknown stays 404

    # Queued afterwards (a results broadcast to a subscriber of this channel): the worker
    # stops it with the same words instead of calling the provider.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from workers.outbound import send_message

    late = _message(engine, sms.id, "late", "queued")
    assert send_message(late) == "failed"
    with Session(engine) as db:
        row = db.get(OutboundMessage, late)
        assert row is not None and row.error == "channel unbound"

    code, out = run(env, "channels", "remove", f"#{sms.id}")
    assert code == 1 and "already unbound" in out
    code, out = run(env, "channels", "add", "--provider", "africastalking", "--kind", "sms",
                    "--address", "1662", "--json", "--config",
                    json.dumps({"username": "sandbox", "api_key": "k"}))
    assert code == 0, out
    with Session(engine) as db:
        again = db.scalar(select(Channel).where(Channel.address == "1662",
                                                Channel.unbound_at.is_(None)))
        assert again is not None and again.id != sms.id and again.key != sms.key
    registry.refresh()
    assert _sms(client, again.key, "m3") == 200


def test_an_unbound_ussd_code_answers_410_and_frees_the_code(
        env: dict[str, str], app: Flask, client: FlaskClient, channel: Channel) -> None:
    """While sdg1662 holds *920*16#, another campaign bound to it cannot open; once the
    code is unbound from sdg1662 (still open), the old URL says Gone and the other
    campaign opens on the code."""
    hop = {"sessionId": "S1", "serviceCode": channel.address, "phoneNumber": "+233241234567",
           "networkCode": "62001", "text": ""}
    url = f"/webhooks/africastalking/{channel.key}/ussd"
    assert client.post(url, data=urlencode(hop), content_type=FORM).status_code == 200
    version = json.loads(run(env, "campaign", "list", "--json")[1])[0]["questionnaire_version"]
    assert run(env, "campaign", "create", "volta-2027", "--name", "Volta",
               "--questionnaire", version)[0] == 0
    assert run(env, "channels", "add", "--provider", "africastalking", "--kind", "ussd",
               "--address", channel.address, "--campaign", "volta-2027")[0] == 0
    code, out = run(env, "campaign", "open", "volta-2027")
    assert code == 1 and "bound to open campaign sdg1662" in out
    assert run(env, "channels", "remove", channel.key)[0] == 0
    app.extensions["civicdial"].registry.refresh()
    resp = client.post(url, data=urlencode(hop), content_type=FORM)
    assert resp.status_code == 410 and b"channel unbound" in resp.data
    code, out = run(env, "campaign", "open", "volta-2027")
    assert code == 0, out


def test_new_channel_keys_never_begin_with_a_dash() -> None:
    """A leading '-' reads as an option on a command line (one key in 64 did)."""
    from gateway.coordination.channels import new_channel_key

    keys = [new_channel_key() for _ in range(3000)]
    assert not [k for k in keys if k.startswith("-")]
    assert all(len(k) == 24 for k in keys) and len(set(keys)) == len(keys)


def test_a_key_that_begins_with_a_dash_still_works_on_the_command_line(
        env: dict[str, str], engine: Engine, app: Flask, client: FlaskClient,
        channel: Channel) -> None:
    """Keys made before new_channel_key may begin with '-': set and remove take them."""
    key = "-" + channel.key[1:]
    with Session(engine) as db, db.begin():
        db.get(Channel, channel.id).key = key  # type: ignore[union-attr]
    code, out = run(env, "channels", "set", key, "--config", '{"note": "x"}', "--json")
    assert code == 0, out
    assert json.loads(out)["config_keys"] == ["note"]
    code, out = run(env, "channels", "remove", key, "--json")
    assert code == 0, out
    app.extensions["civicdial"].registry.refresh()
    resp = client.post(f"/webhooks/africastalking/{key}/ussd", content_type=FORM,
                       data=urlencode({"sessionId": "S1", "serviceCode": channel.address,
                                       "phoneNumber": "+233241234567",
                                       "networkCode": "62001", "text": ""}))
    assert resp.status_code == 410
