"""Fuzzed bodies on every webhook (form and JSON) and every JSON API endpoint: never a 5xx.

Each webhook gets forms built from the provider's own field names with hostile values
(huge and non-finite numbers, control characters, invalid UTF-8 escapes, very long text,
deep JSON), Twilio's signed like Twilio would sign them, so the fuzz reaches past the
signature check. CIVICDIAL_FUZZ_EXAMPLES raises the number of examples per endpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import hypothesis
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import strategies as st
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from twilio.request_validator import RequestValidator

from gateway.coordination.campaigns import create_token
from gateway.store.models import Campaign, Channel

EXAMPLES = int(os.environ.get("CIVICDIAL_FUZZ_EXAMPLES", "60"))
TWILIO_TOKEN = "fuzz-auth-token"

HOSTILE = st.sampled_from([
    "", "0", "-1", "1.5", "2.00", "Infinity", "-Infinity", "NaN", "sNaN", "1e18", "1e999999",
    str(2**63), str(2**64), str(-2**63 - 1), "9" * 40, "0x1f", "1_000", " 12 ", "+233241234567",
    "0241234567", "0000000", "+2330000000", "233241234567", "*920*16#", "*920*16*5#",
    "Success", "Failed", "Incomplete", "Sent", "Buffered", "Rejected", "delivered",
    "undelivered", "STOP", "START", "HELP", "SURVEY", "1*1*2", "\x00", "a\x07b", "\ufeff",
    "ɛɔ", "😀", "%FF", "%", "a" * 3000, "[" * 500, "{}", "null", "true",
])
VALUES = st.one_of(HOSTILE, st.text(max_size=40), st.integers().map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))


# Only JSON can carry a lone surrogate ("\ud800"): no character, unencodable as UTF-8.
SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc80\ud800"])
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              HOSTILE, SURROGATES, st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(HOSTILE, st.text(max_size=8)), inner,
                                            max_size=4)),
    max_leaves=12)


@dataclass(frozen=True)
class Hook:
    label: str
    path: str  # {key} is the channel key
    valid: dict[str, str]  # a real payload; the fuzz replaces and drops its fields
    extra: tuple[str, ...] = ()  # optional fields the provider may add
    json: bool = False  # also fuzzed as a JSON body
    twilio: bool = False
    json_only: bool = False  # the provider posts JSON with typed values (Hubtel, Arkesel)

    @property
    def fields(self) -> tuple[str, ...]:
        return (*self.valid, *self.extra)


PHONE = "+233241234567"
HOOKS = [
    Hook("AT USSD hop", "/webhooks/africastalking/{ussd}/ussd",
         {"sessionId": "ATUid_f1", "serviceCode": "*920*16#", "phoneNumber": PHONE,
          "networkCode": "62001", "text": ""}),
    Hook("AT USSD events", "/webhooks/africastalking/{ussd}/ussd/events",
         {"date": "2026-11-25 12:00:00", "sessionId": "ATUid_f2", "serviceCode": "*920*16#",
          "networkCode": "62001", "phoneNumber": PHONE, "status": "Incomplete",
          "cost": "GHS 0.05", "durationInMillis": "41234", "hopsCount": "9", "input": "1*1",
          "lastAppResponse": "CON x"}, extra=("errorMessage",)),
    Hook("AT SMS", "/webhooks/africastalking/{at}/sms",
         {"from": PHONE, "to": "1662", "text": "SURVEY", "date": "2026-11-25 12:00:00",
          "id": "m1", "linkId": "", "networkCode": "62001"}),
    Hook("AT SMS delivery", "/webhooks/africastalking/{at}/sms/delivery",
         {"id": "ATXid_1", "status": "Success", "phoneNumber": PHONE, "networkCode": "62001",
          "retryCount": "0"}, extra=("failureReason",)),
    Hook("AT airtime status", "/webhooks/africastalking/{at}/airtime/status",
         {"requestId": "ATQid_1", "status": "Success", "phoneNumber": PHONE,
          "value": "GHS 2.0000", "discount": "GHS 0.0600"}, extra=("description",),
         json=True),
    Hook("AT airtime validation", "/webhooks/africastalking/{at}/airtime/validation",
         {"transactionId": "T1", "phoneNumber": PHONE, "sourceIpAddress": "203.0.113.7",
          "currencyCode": "GHS", "amount": "2.00"}, json=True),
    Hook("Twilio SMS", "/webhooks/twilio/{tw}/sms",
         {"MessageSid": "SMf1", "SmsSid": "SMf1", "AccountSid": "AC" + "0" * 32,
          "From": PHONE, "To": "+15005550006", "Body": "SURVEY", "NumSegments": "1",
          "NumMedia": "0", "ApiVersion": "2010-04-01"}, extra=("OptOutType",), twilio=True),
    Hook("Twilio status", "/webhooks/twilio/{tw}/status",
         {"MessageSid": "SMf2", "MessageStatus": "delivered", "AccountSid": "AC" + "0" * 32,
          "From": "+15005550006", "To": PHONE}, extra=("ErrorCode",), twilio=True),
    Hook("Hubtel USSD", "/webhooks/hubtel/{hubtel}/ussd",
         {"Type": "Initiation", "Mobile": "233246912184", "SessionId": "3c4e0e1b9a2f4d6e",
          "ServiceCode": "713*20", "Message": "*713*20#", "Operator": "mtn", "Sequence": 1,
          "ClientState": "", "Platform": "USSD", "ExtraData": {}}, json_only=True),
    Hook("Arkesel USSD", "/webhooks/arkesel/{arkesel}/ussd",
         {"sessionID": "1700000000123", "userID": "GSS_USSD", "newSession": True,
          "msisdn": "233246912184", "userData": "*928*311#", "network": "MTN"},
         json_only=True),
]


@pytest.fixture
def keys(engine: Engine, channel: Channel, app: Flask) -> dict[str, str]:
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign))
        assert campaign is not None
        db.add(Channel(key="fuzz-at", provider="africastalking", kind="sms", address="1662",
                       campaign_id=campaign.id,
                       config=json.dumps({"username": "sandbox", "api_key": "k",
                                          "base_url": "http://127.0.0.1:9",
                                          "rate_per_second": 0})))
        db.add(Channel(key="fuzz-tw", provider="twilio", kind="sms", address="+15005550006",
                       campaign_id=campaign.id,
                       config=json.dumps({"account_sid": "AC" + "0" * 32,
                                          "auth_token": TWILIO_TOKEN, "from": "+15005550006",
                                          "reply": "inline", "rate_per_second": 0})))
        for provider, code in (("hubtel", "*713*20#"), ("arkesel", "*928*311#")):
            db.add(Channel(key=f"fuzz-{provider}", provider=provider, kind="ussd",
                           address=code, campaign_id=campaign.id, config="{}"))
    app.extensions["civicdial"].registry.refresh()
    return {"ussd": channel.key, "at": "fuzz-at", "tw": "fuzz-tw", "hubtel": "fuzz-hubtel",
            "arkesel": "fuzz-arkesel"}


def forms(hook: Hook) -> st.SearchStrategy[dict[str, Any]]:
    """The real payload with some fields replaced by hostile values and some dropped."""
    names = st.sampled_from(hook.fields)
    values = st.one_of(VALUES, JSON_VALUES) if hook.json_only else VALUES
    return st.tuples(st.dictionaries(names, values, max_size=4),
                     st.sets(st.sampled_from(list(hook.valid)), max_size=2)).map(
        lambda t: {**{k: v for k, v in hook.valid.items() if k not in t[1]}, **t[0]})


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.label)
def test_webhook_fuzz_finds_no_server_error(client: FlaskClient, keys: dict[str, str],
                                            hook: Hook) -> None:
    """Forms (and JSON, where the provider may send it) of hostile values: 2xx or 4xx."""
    path = hook.path.format(**keys)
    seen: list[int] = []

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(form=forms(hook), as_json=st.just(True) if hook.json_only
                      else st.booleans() if hook.json else st.just(False),
                      surrogate=st.one_of(st.none(), SURROGATES))
    def check(form: dict[str, Any], as_json: bool, surrogate: str | None) -> None:
        if as_json and surrogate is not None:
            form = {**form, hook.fields[0]: surrogate}
        headers = {}
        if hook.twilio:
            headers["X-Twilio-Signature"] = RequestValidator(TWILIO_TOKEN).compute_signature(
                "http://localhost" + path, form)
        if as_json:
            resp = client.post(path, data=json.dumps(form), content_type="application/json")
        else:
            resp = client.post(path, data=urlencode(form), headers=headers,
                               content_type="application/x-www-form-urlencoded")
        seen.append(resp.status_code)
        assert resp.status_code < 500, (form, as_json, resp.get_data(as_text=True)[:300])

    check()
    assert any(code < 300 for code in seen), seen  # the fuzz got past the checks


JSON_ENDPOINTS = [
    ("POST", "/api/v1/campaigns", {"slug": str, "name": str, "questionnaire_version": str,
                                   "target_size": int}),
    ("PATCH", "/api/v1/campaigns/sdg1662", {"reminder_hours": int, "reminder_max": int,
                                            "airtime": dict, "questionnaire_version": str,
                                            "languages": list}),
    ("PUT", "/api/v1/campaigns/sdg1662/quotas", {"on": list, "cells": list}),
    ("POST", "/api/v1/campaigns/sdg1662/invitations", {"region": str, "language": str,
                                                       "attributes": dict, "limit": int}),
    ("POST", "/api/v1/tokens", {"name": str, "role": str}),
]


@pytest.mark.parametrize("method,path,fields", JSON_ENDPOINTS,
                         ids=[f"{m} {p}" for m, p, _ in JSON_ENDPOINTS])
def test_api_json_fuzz_finds_no_server_error(client: FlaskClient, engine: Engine,
                                             channel: Channel, method: str, path: str,
                                             fields: dict[str, type]) -> None:
    """Objects with the endpoint's field names (and others) holding any JSON value; and
    raw bodies that are barely JSON: never a 5xx."""
    with Session(engine) as db, db.begin():
        token = create_token(db, "fuzz", "fuzz", "admin")
    headers = {"Authorization": f"Bearer {token}"}

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(body=st.one_of(
        st.dictionaries(st.one_of(st.sampled_from(sorted(fields)), st.text(max_size=8)),
                        JSON_VALUES, max_size=5).map(json.dumps),
        st.text(max_size=60), HOSTILE))
    def check(body: str) -> None:
        resp = client.open(path, method=method, data=body, headers=headers,
                           content_type="application/json")
        assert resp.status_code < 500, (body[:300], resp.get_data(as_text=True)[:300])

    check()
