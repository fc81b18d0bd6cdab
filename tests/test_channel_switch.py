"""One interview, two channels at once: a person who redials on another aggregator, or
texts while a USSD session is open, goes on in the session they used last; the session
they left answers nothing more (a retry of its last hop aside), so no input lands on a
question it was not typed for."""

from __future__ import annotations

from urllib.parse import urlencode

import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from test_ended_sessions import _redis_snapshot
from test_hubtel import add_hubtel_channel, request_json
from test_sms import PHONE, SmsChannels, fake, sms, tw_sms, twiml_text  # noqa: F401

from gateway.store.models import Answer, Channel
from workers.persist import drain

FORM = "application/x-www-form-urlencoded"


def at_hop(client: FlaskClient, channel: Channel, session: str, text: str) -> tuple[int, str]:
    resp = client.post(f"/webhooks/africastalking/{channel.key}/ussd", data=urlencode({
        "sessionId": session, "serviceCode": "*920*16#", "phoneNumber": PHONE,
        "networkCode": "62001", "text": text}), content_type=FORM)
    return resp.status_code, resp.get_data(as_text=True)


def answers(engine: Engine, redis_client: redis.Redis) -> dict[str, str | None]:
    drain(redis_client, engine, "cd:events")
    with Session(engine) as db:
        return {a.question: a.value for a in db.scalars(select(Answer))}


def test_a_redial_on_another_aggregator_closes_the_first_session(
        client: FlaskClient, engine: Engine, redis_client: redis.Redis, app: Flask,
        channel: Channel) -> None:
    """Hubtel's session shows the sex question; the person redials through Africa's
    Talking ('Welcome back'). Hubtel's next input (the '2' typed on the old screen) gets
    409 and changes nothing; a retry of its last hop still gets its own screen; the new
    session goes on from the resume screen."""
    ch = add_hubtel_channel(engine)
    app.extensions["civicdial"].registry.refresh()
    url = f"/webhooks/hubtel/{ch.key}/ussd"
    mobile = PHONE.lstrip("+")
    client.post(url, json=request_json(mobile=mobile))
    client.post(url, json=request_json(type_="Response", message="1", sequence=2,
                                       mobile=mobile))
    last = client.post(url, json=request_json(type_="Response", message="1", sequence=3,
                                              mobile=mobile))
    assert "sex" in last.get_json()["Message"].lower(), last.get_json()
    status, welcome = at_hop(client, channel, "AT1", "")
    assert status == 200 and welcome.startswith("CON Welcome back"), welcome
    before = _redis_snapshot(redis_client)
    late = client.post(url, json=request_json(type_="Response", message="2", sequence=4,
                                              mobile=mobile))
    assert late.status_code == 409 and "ended" in late.get_data(as_text=True)
    again = client.post(url, json=request_json(type_="Response", message="1", sequence=3,
                                               mobile=mobile))
    assert again.get_data() == last.get_data()
    assert _redis_snapshot(redis_client) == before
    status, question = at_hop(client, channel, "AT1", "1")  # 1 Continue
    assert status == 200 and "sex" in question.lower(), question
    assert "sex" not in answers(engine, redis_client)


def test_a_text_after_the_interview_moved_to_ussd_answers_nothing(
        client: FlaskClient, sms: SmsChannels, channel: Channel, engine: Engine,  # noqa: F811
        redis_client: redis.Redis) -> None:
    """By SMS up to the sex question, then a USSD dial goes on to the region list. A late
    text ('3', meant for sex) is not taken as a region: it gets the resume screen. The
    USSD session it took over answers 409, and the text conversation goes on from there."""
    for n, body in enumerate(("SURVEY", "1", "1")):
        status, reply = tw_sms(client, sms.tw, body, f"SM{n:032d}")
        assert status == 200
    assert "sex" in twiml_text(reply).lower(), reply
    for text in ("", "1", "1*1", "1*1*2"):  # Welcome back: 1 Continue, female, 25-34
        status, screen = at_hop(client, channel, "U1", text)
        assert status == 200, screen
    assert "region" in screen.lower(), screen
    status, reply = tw_sms(client, sms.tw, "3", "SM" + "9" * 32)
    assert status == 200 and "Welcome back" in twiml_text(reply), reply
    stored = answers(engine, redis_client)
    assert "region" not in stored and stored["sex"] == "female", stored
    status, body = at_hop(client, channel, "U1", "1*1*2*1")
    assert status == 409 and "ended" in body, body
    status, reply = tw_sms(client, sms.tw, "1", "SM" + "8" * 32)  # 1 Continue
    assert status == 200 and "region" in twiml_text(reply).lower(), reply
    assert "region" not in answers(engine, redis_client)
