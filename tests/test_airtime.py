"""Airtime thank-you through the Africa's Talking Airtime API (a local stand-in)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
import redis
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session
from test_quotas import Dialler
from test_sms import FORM, SmsChannels, fake, sms, work  # noqa: F401 - fixtures

from gateway.config import Settings
from gateway.store.crypto import NumberBox
from gateway.store.models import AirtimePayment, Channel
from gateway.store.sessions import pseudonym
from workers.airtime import _pay, sweep
from workers.persist import write_events


def run(env: dict[str, str], *args: str) -> tuple[int, str]:
    from gateway.cli import main

    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.output


def airtime_on(env: dict[str, str], app: Flask, amount: str = "2.00",
               budget: str = "500.00") -> None:
    code, out = run(env, "campaign", "set", "sdg1662", "--airtime-currency", "GHS",
                    "--airtime-amount", amount, "--airtime-budget", budget)
    assert code == 0, out
    assert f"airtime GHS {amount} (budget {budget})" in out
    app.extensions["civicdial"].registry.refresh()


def completions(settings: Settings, channel: Channel, phones: list[str],
                tag: str = "iv") -> list[dict]:
    """Completion events as the hops write them to the stream for an airtime campaign."""
    box = NumberBox(settings.encryption_key)
    return [{"id": f"{tag}{n}-40", "k": "completed", "c": channel.campaign_id,
             "ch": channel.id, "i": f"{tag}{n}",
             "r": pseudonym(settings.pseudonym_key, phone), "ver": "v", "t": time.time(),
             "to": box.seal(phone)} for n, phone in enumerate(phones)]


def payments(engine: Engine) -> list[AirtimePayment]:
    with Session(engine) as db:
        return list(db.scalars(select(AirtimePayment).order_by(AirtimePayment.id)))


def test_completed_ussd_interview_is_thanked_once(
        client: FlaskClient, sms: SmsChannels, channel: Channel, engine: Engine,  # noqa: F811
        redis_client: redis.Redis, env: dict[str, str], app: Flask,
        settings: Settings) -> None:
    """Airtime on: a citizen who completes gets GHS 2.00 once, with an idempotency key;
    dialling again, a replayed stream batch and a repeated status callback change
    nothing; the coordinator sees the spend."""
    airtime_on(env, app)
    phone = "+233240001111"
    citizen = Dialler(client, f"/webhooks/africastalking/{channel.key}/ussd", phone)
    assert "Thank you!" in citizen.finish()
    work(engine, redis_client)
    assert [(p["to"], p["amount"]) for p in sms.fake.airtime] == [(phone, "GHS 2.00")]
    assert sms.fake.airtime[0]["key"]
    (paid,) = payments(engine)
    assert (paid.status, paid.amount, paid.currency) == ("sent", 200, "GHS")
    assert paid.request_id == "ATQid_000001" and phone not in paid.recipient

    assert "already completed" in citizen.dial()
    with Session(engine) as db:
        interview = db.scalar(select(AirtimePayment.interview_id))
    write_events(engine, [{**completions(settings, channel, [phone])[0], "i": interview,
                           "id": f"{interview}-99"}])
    work(engine, redis_client)
    assert len(sms.fake.airtime) == 1 and len(payments(engine)) == 1

    callback = {"phoneNumber": phone, "description": "Airtime Delivered Successfully",
                "status": "Success", "requestId": "ATQid_000001", "discount": "GHS 0.0600",
                "value": "GHS 2.0000"}
    url = f"/webhooks/africastalking/{sms.at.key}/airtime/status"
    assert client.post(url, data=callback, content_type=FORM).status_code == 200
    # Africa's Talking's samples show the same fields as JSON: taken too (and a retry).
    assert client.post(url, json=callback).status_code == 200
    failed_late = {**callback, "status": "Failed", "description": "late and wrong"}
    work(engine, redis_client)
    assert payments(engine)[0].status == "success"
    client.post(url, data=failed_late, content_type=FORM)
    work(engine, redis_client)
    assert payments(engine)[0].status == "success"  # a final status is never undone

    code, out = run(env, "campaign", "status", "sdg1662", "--json")
    airtime = json.loads(out)["airtime"]
    assert airtime["spent"] == "GHS 2.00" and airtime["budget"] == "GHS 500.00"
    assert airtime["payments"]["confirmed"] == 1
    assert "GHS 2.00 paid of GHS 500.00 budget" in run(env, "campaign", "status", "sdg1662")[1]


@pytest.mark.parametrize("form, error", [
    ({"requestId": "ATQid_1", "status": "Maybe"}, 400),
    ({"status": "Success"}, 400),
    ({"requestId": "x" * 500, "status": "Success"}, 400),
])
def test_bad_airtime_callbacks_are_refused(client: FlaskClient, sms: SmsChannels,  # noqa: F811
                                           form: dict[str, str], error: int) -> None:
    url = f"/webhooks/africastalking/{sms.at.key}/airtime/status"
    assert client.post(url, data=form, content_type=FORM).status_code == error
    assert client.post(url, json=form).status_code == error
    for body in ("[1, 2]", "{not json", '{"requestId": {"a": 1}, "status": "Success"}'):
        assert client.post(url, data=body, content_type="application/json").status_code == 400
    assert client.post(url, data="<x/>", content_type="text/xml").status_code == 415
    assert client.post("/webhooks/africastalking/nokey/airtime/status", data=form,
                       content_type=FORM).status_code == 404


def test_off_by_default(client: FlaskClient, sms: SmsChannels, channel: Channel,  # noqa: F811
                        engine: Engine, redis_client: redis.Redis) -> None:
    citizen = Dialler(client, f"/webhooks/africastalking/{channel.key}/ussd", "+233240002222")
    assert "Thank you!" in citizen.finish()
    work(engine, redis_client)
    assert payments(engine) == [] and sms.fake.airtime == []


def test_budget_caps_spend_and_failures_free_it(
        sms: SmsChannels, channel: Channel, engine: Engine, redis_client: redis.Redis,  # noqa: F811
        env: dict[str, str], app: Flask, settings: Settings, client: FlaskClient) -> None:
    """Budget 5.00 at 2.00 each: two are paid, the third is recorded as over budget.
    A payment the network reports failed frees its share for the next completion."""
    airtime_on(env, app, budget="5.00")
    phones = ["+233240000101", "+233240000102", "+233240000103"]
    write_events(engine, completions(settings, channel, phones))
    assert [p.status for p in payments(engine)] == ["queued", "queued", "skipped"]
    sweep(engine, redis_client, older_than=timedelta(0))
    work(engine, redis_client)
    assert sorted(p["to"] for p in sms.fake.airtime) == phones[:2]
    client.post(f"/webhooks/africastalking/{sms.at.key}/airtime/status", content_type=FORM,
                data={"phoneNumber": phones[0], "status": "Failed", "requestId": "ATQid_000001",
                      "description": "Subscriber not found", "value": "GHS 2.0000",
                      "discount": "GHS 0.0000"})
    work(engine, redis_client)
    write_events(engine, completions(settings, channel, ["+233240000104"], tag="later"))
    sweep(engine, redis_client, older_than=timedelta(0))
    work(engine, redis_client)
    assert [p.status for p in payments(engine)] == ["failed", "sent", "skipped", "sent"]
    assert payments(engine)[0].error == "Subscriber not found"
    code, out = run(env, "campaign", "status", "sdg1662", "--json")
    airtime = json.loads(out)["airtime"]
    assert airtime["spent"] == "GHS 4.00"
    assert airtime["payments"]["skipped_over_budget"] == 1


def test_flaky_provider_pays_each_once(sms: SmsChannels, channel: Channel,  # noqa: F811
                                       engine: Engine, redis_client: redis.Redis,
                                       env: dict[str, str], app: Flask,
                                       settings: Settings) -> None:
    """Half the requests fail with 503 before anything is paid: retried, each paid once."""
    airtime_on(env, app)
    sms.fake.fail_rate = 0.5
    phones = [f"+2332400003{n:02d}" for n in range(10)]
    write_events(engine, completions(settings, channel, phones))
    sweep(engine, redis_client, older_than=timedelta(0))
    work(engine, redis_client)
    assert sorted(p["to"] for p in sms.fake.airtime) == phones
    assert sms.fake.requests > 10
    assert {p.status for p in payments(engine)} == {"sent"}


def test_no_answer_from_the_provider_is_never_retried(
        sms: SmsChannels, channel: Channel, engine: Engine, redis_client: redis.Redis,  # noqa: F811
        env: dict[str, str], app: Flask, settings: Settings) -> None:
    """A read timeout may hide a payment made: 'unknown', for a person to check, and
    neither the sweeper nor a second job pays again. A row a dead worker left 'sending'
    becomes 'unknown' too."""
    airtime_on(env, app)
    with Session(engine) as db, db.begin():
        at = db.get(Channel, sms.at.id)
        assert at is not None
        at.config = json.dumps({**json.loads(at.config), "timeout": 0.3})
    sms.fake.delay = 1.0
    write_events(engine, completions(settings, channel, ["+233240000401", "+233240000402"]))
    (first, second) = [p.id for p in payments(engine)]
    assert _pay(settings, engine, redis_client, first) == "unknown"
    time.sleep(1.0)  # the stand-in finishes the request it was slow to answer
    sweep(engine, redis_client, older_than=timedelta(0))
    assert _pay(settings, engine, redis_client, first) == "unknown"
    assert len(sms.fake.airtime) == 1

    with Session(engine) as db, db.begin():
        db.execute(update(AirtimePayment).where(AirtimePayment.id == second).values(
            status="sending", updated_at=datetime.now(UTC) - timedelta(seconds=10)))
    assert _pay(settings, engine, redis_client, second) == "taken"  # may still be in flight
    assert sweep(engine, redis_client, older_than=timedelta(seconds=5)) == 0
    assert payments(engine)[1].status == "unknown"  # the sweeper gave up on it
    assert len(sms.fake.airtime) == 1


def test_airtime_settings_are_checked(env: dict[str, str], channel: Channel) -> None:
    for args, error in [
        (["--airtime-currency", "cedi", "--airtime-amount", "2", "--airtime-budget", "9"],
         "3-letter ISO code"),
        (["--airtime-currency", "GHS", "--airtime-amount", "-2", "--airtime-budget", "9"],
         "positive amount"),
        (["--airtime-currency", "GHS", "--airtime-amount", "2.001", "--airtime-budget", "9"],
         "at most 2 decimals"),
        (["--airtime-currency", "GHS", "--airtime-amount", "5", "--airtime-budget", "1"],
         "smaller than one payment"),
        (["--airtime-currency", "GHS"], "needs an amount and a budget"),
        (["--airtime-amount", "2"], "need --airtime-currency"),
    ]:
        code, out = run(env, "campaign", "set", "sdg1662", *args)
        assert code != 0 and error in out, (args, out)
    code, out = run(env, "campaign", "set", "sdg1662", "--no-airtime", "--json")
    assert code == 0 and json.loads(out)["airtime"] is None


def test_validation_callback_confirms_only_our_payment_in_flight(
        client: FlaskClient, sms: SmsChannels, channel: Channel, engine: Engine,  # noqa: F811
        redis_client: redis.Redis, env: dict[str, str], app: Flask,
        settings: Settings) -> None:
    """Africa's Talking's validation request (JSON) is answered Validated only while our
    payment to that number, for that amount, is in flight; anything else Failed."""
    import threading

    airtime_on(env, app)
    phone = "+233240000501"
    write_events(engine, completions(settings, channel, [phone]))
    (payment,) = payments(engine)
    url = f"/webhooks/africastalking/{sms.at.key}/airtime/validation"
    ask = {"transactionId": "SomeTransactionID", "phoneNumber": phone,
           "sourceIpAddress": "203.0.113.7", "currencyCode": "GHS", "amount": 2.0}
    assert client.post(url, json=ask).json == {"status": "Failed"}  # not yet sending
    sms.fake.delay = 1.5  # the provider call is in flight while AT asks
    paying = threading.Thread(target=_pay, args=(settings, engine, redis_client, payment.id))
    paying.start()
    try:
        deadline = time.monotonic() + 10
        while payments(engine)[0].status != "sending" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.post(url, json=ask).json == {"status": "Validated"}
        assert client.post(url, data={**ask, "amount": "2.00"},
                           content_type=FORM).json == {"status": "Validated"}
        for wrong in ({"amount": 20}, {"currencyCode": "KES"},
                      {"phoneNumber": "+233240000599"}):
            assert client.post(url, json={**ask, **wrong}).json == {"status": "Failed"}
    finally:
        paying.join()
    assert payments(engine)[0].status == "sent"
    assert client.post(url, json=ask).json == {"status": "Failed"}  # already paid
    assert client.post(url, json={**ask, "amount": "two"}).status_code == 400
    for absurd in ("Infinity", "-Infinity", "inf", "NaN", "sNaN", "1e18", "1e999999",
                   "-2.00", "21474836.48"):
        for resp in (client.post(url, json={**ask, "amount": absurd}),
                     client.post(url, data={**ask, "amount": absurd}, content_type=FORM)):
            assert resp.status_code == 400, (absurd, resp.status_code)
            assert "amount" in resp.get_data(as_text=True)
    assert client.post(url, json={"phoneNumber": phone}).status_code == 400
