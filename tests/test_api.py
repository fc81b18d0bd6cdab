"""The coordinator JSON API: every endpoint and role, bad input, and a schemathesis run."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from gateway.coordination.campaigns import create_token
from gateway.store.models import AuditEntry, Campaign, Channel

SHIPPED = Path(__file__).parents[1] / "questionnaires" / "sdg1662.md"


@pytest.fixture
def tokens(engine: Engine, channel: Channel) -> dict[str, str]:
    with Session(engine) as db, db.begin():
        return {role: create_token(db, "test", f"{role} token", role)
                for role in ("admin", "coordinator", "viewer")}


def auth(tokens: dict[str, str], role: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens[role]}"} if role else {}


@dataclass(frozen=True)
class Access:
    label: str
    method: str
    path: str
    role: str | None
    status: int


ACCESS = [
    Access("no token", "GET", "/api/v1/campaigns", None, 401),
    Access("viewer reads campaigns", "GET", "/api/v1/campaigns", "viewer", 200),
    Access("viewer reads a campaign", "GET", "/api/v1/campaigns/sdg1662", "viewer", 200),
    Access("viewer reads stats", "GET", "/api/v1/campaigns/sdg1662/stats", "viewer", 200),
    Access("viewer reads questionnaires", "GET", "/api/v1/questionnaires", "viewer", 200),
    Access("viewer cannot pause", "POST", "/api/v1/campaigns/sdg1662/pause", "viewer", 403),
    Access("viewer cannot create", "POST", "/api/v1/campaigns", "viewer", 403),
    Access("viewer cannot invite", "POST", "/api/v1/campaigns/sdg1662/invitations", "viewer",
           403),
    Access("coordinator pauses", "POST", "/api/v1/campaigns/sdg1662/pause", "coordinator",
           200),
    Access("coordinator cannot read audit", "GET", "/api/v1/audit", "coordinator", 403),
    Access("coordinator cannot make tokens", "POST", "/api/v1/tokens", "coordinator", 403),
    Access("admin reads audit", "GET", "/api/v1/audit", "admin", 200),
    Access("unknown campaign", "GET", "/api/v1/campaigns/nope", "viewer", 404),
    Access("openapi needs no token", "GET", "/api/v1/openapi.json", None, 200),
]


@pytest.mark.parametrize("case", ACCESS, ids=lambda c: c.label)
def test_roles(client: FlaskClient, tokens: dict[str, str], case: Access) -> None:
    """401 without a token, 403 below the role, JSON either way."""
    resp = client.open(case.path, method=case.method, headers=auth(tokens, case.role))
    assert resp.status_code == case.status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"


def test_wrong_token_is_401(client: FlaskClient, tokens: dict[str, str]) -> None:
    """A token that was never issued is refused like a missing one."""
    resp = client.get("/api/v1/campaigns", headers={"Authorization": "Bearer cd_forged"})
    assert resp.status_code == 401 and "unknown" in resp.get_json()["error"]


def test_campaign_flow_over_the_api(client: FlaskClient, tokens: dict[str, str],
                                    engine: Engine) -> None:
    """Upload a form, create a campaign, move it through its states; clashes and bad
    moves are 409 with a message; each change is audited with the token's name."""
    coord = auth(tokens, "coordinator")
    resp = client.post("/api/v1/questionnaires", headers=coord,
                       data={"file": (io.BytesIO(SHIPPED.read_bytes()), "sdg1662.md")})
    assert resp.status_code == 200 and resp.get_json()["new"] is False  # shipped already
    version = resp.get_json()["version"]
    resp = client.post("/api/v1/campaigns", headers=coord, json={
        "slug": "ashanti", "name": "Ashanti pilot", "questionnaire_version": version,
        "target_size": 400})
    assert resp.status_code == 201 and resp.get_json()["state"] == "draft"
    assert client.post("/api/v1/campaigns", headers=coord, json={
        "slug": "ashanti", "name": "again", "questionnaire_version": version}).status_code == 409
    for name in ("", "   ", "x" * 301, "tab\there"):  # as the CLI refuses them
        resp = client.post("/api/v1/campaigns", headers=coord, json={
            "slug": "named", "name": name, "questionnaire_version": version})
        assert resp.status_code == 422 and "name" in resp.get_json()["error"], name
    assert client.post("/api/v1/campaigns/ashanti/open", headers=coord).status_code == 200
    resp = client.post("/api/v1/campaigns/ashanti/open", headers=coord)
    assert resp.status_code == 409 and "open: it can go to paused, closed" in resp.get_json()[
        "error"]
    assert client.post("/api/v1/campaigns/ashanti/close", headers=coord).status_code == 200
    with Session(engine) as db:
        entries = db.scalars(select(AuditEntry).where(AuditEntry.target == "ashanti")).all()
    assert [e.action for e in entries] == ["campaign.create", "campaign.open", "campaign.close"]
    assert {e.actor for e in entries} == {"token:coordinator token"}


BAD_BODIES = [
    ("not JSON", "this is not json", "text/plain", 400),
    ("JSON array", "[1, 2]", "application/json", 400),
    ("unknown field", json.dumps({"slug": "x1", "name": "n", "questionnaire_version": "v",
                                  "colour": "red"}), "application/json", 422),
    ("missing field", json.dumps({"slug": "x1"}), "application/json", 422),
    ("wrong type", json.dumps({"slug": 5, "name": "n", "questionnaire_version": "v"}),
     "application/json", 422),
    ("bool for an int", json.dumps({"slug": "x1", "name": "n", "questionnaire_version": "v",
                                    "target_size": True}), "application/json", 422),
    ("bad slug", json.dumps({"slug": "Not A Slug!", "name": "n",
                             "questionnaire_version": "v"}), "application/json", 422),
    ("unknown version", json.dumps({"slug": "x1", "name": "n",
                                    "questionnaire_version": "nope"}), "application/json", 422),
]


@pytest.mark.parametrize("label,body,content_type,status", BAD_BODIES,
                         ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_change_nothing(client: FlaskClient, tokens: dict[str, str],
                                   engine: Engine, label: str, body: str, content_type: str,
                                   status: int) -> None:
    """Each bad request says what to fix and nothing is half-applied."""
    resp = client.post("/api/v1/campaigns", headers=auth(tokens, "coordinator"), data=body,
                       content_type=content_type)
    assert resp.status_code == status
    assert resp.get_json()["error"]
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(Campaign)) == 1


def test_bad_form_upload_names_the_cell(client: FlaskClient, tokens: dict[str, str]) -> None:
    """An XLSForm outside the subset comes back with sheet, row and column."""
    form = b"| survey |\n|  | type | name | label |\n|  | geopoint | where | Where? |\n"
    resp = client.post("/api/v1/questionnaires", headers=auth(tokens, "coordinator"),
                       data={"file": (io.BytesIO(form), "bad.md")})
    assert resp.status_code == 422
    assert {k: resp.get_json()[k] for k in ("sheet", "row", "column")} == {
        "sheet": "survey", "row": 2, "column": "type"}


def test_contacts_viewer_never_sees_numbers(client: FlaskClient, tokens: dict[str, str],
                                            engine: Engine) -> None:
    """Import by upload; coordinators see numbers, viewers never; opt-out sticks."""
    csv_data = b"phone,region\n0241234567,Ashanti\n0201112222,Volta\nbad,\n"
    resp = client.post("/api/v1/campaigns/sdg1662/contacts",
                       headers=auth(tokens, "coordinator"),
                       data={"file": (io.BytesIO(csv_data), "c.csv")})
    assert resp.status_code == 200
    assert resp.get_json()["imported"] == 2 and resp.get_json()["rejected"][0]["line"] == 4
    viewer = client.get("/api/v1/contacts?per_page=1&page=2", headers=auth(tokens, "viewer"))
    page = viewer.get_json()
    assert (page["total"], len(page["items"])) == (2, 1)
    body = viewer.get_data(as_text=True)
    assert "phone" not in page["items"][0] and "233" not in body and "0201112222" not in body
    coordinator = client.get("/api/v1/contacts", headers=auth(tokens, "coordinator")).get_json()
    assert [c["phone"] for c in coordinator["items"]] == ["+233241234567", "+233201112222"]
    first = coordinator["items"][0]["id"]
    assert client.post(f"/api/v1/contacts/{first}/opt-out",
                       headers=auth(tokens, "coordinator")).status_code == 200
    again = client.get("/api/v1/contacts", headers=auth(tokens, "viewer")).get_json()
    assert [c["opted_out"] for c in again["items"]] == [True, False]
    assert client.get("/api/v1/contacts?per_page=9999",
                      headers=auth(tokens, "viewer")).status_code == 422
    assert client.post("/api/v1/contacts/999/opt-out",
                       headers=auth(tokens, "coordinator")).status_code == 404


def test_invitations_need_an_sms_channel_then_queue(client: FlaskClient,
                                                    tokens: dict[str, str],
                                                    engine: Engine) -> None:
    """Inviting without an SMS channel is 409 with what to do; with one, 202."""
    coord = auth(tokens, "coordinator")
    client.post("/api/v1/campaigns/sdg1662/contacts", headers=coord,
                data={"file": (io.BytesIO(b"msisdn\n0241234567\n"), "c.csv")})
    resp = client.post("/api/v1/campaigns/sdg1662/invitations", headers=coord)
    assert resp.status_code == 409 and "no SMS channel" in resp.get_json()["error"]
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign))
        assert campaign is not None
        db.add(Channel(key="sms-k", provider="africastalking", kind="sms", address="1662",
                       campaign_id=campaign.id, config="{}"))
    resp = client.post("/api/v1/campaigns/sdg1662/invitations", headers=coord)
    assert resp.status_code == 202 and resp.get_json()["queued"] == 1


def test_admin_makes_tokens(client: FlaskClient, tokens: dict[str, str]) -> None:
    """An admin token makes tokens that work, with their role."""
    resp = client.post("/api/v1/tokens", headers=auth(tokens, "admin"),
                       json={"name": "field team", "role": "viewer"})
    assert resp.status_code == 201
    new = {"Authorization": f"Bearer {resp.get_json()['token']}"}
    assert client.get("/api/v1/campaigns", headers=new).status_code == 200
    assert client.post("/api/v1/campaigns/sdg1662/pause", headers=new).status_code == 403
    assert client.post("/api/v1/tokens", headers=auth(tokens, "admin"),
                       json={"name": "x", "role": "root"}).status_code == 422


def test_schemathesis_finds_no_server_error(app: Flask, tokens: dict[str, str]) -> None:
    """Generated requests against every operation in the OpenAPI document: no 5xx."""
    import schemathesis

    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    failures: list[tuple[str, int]] = []
    calls: list[int] = []
    for result in schema.get_all_operations():
        _check_operation(app, tokens["admin"], result.ok(), calls, failures)
    assert failures == []
    assert len(calls) > 100 and any(code < 300 for code in calls)


def _check_operation(app: Flask, token: str, operation: object, calls: list[int],
                     failures: list[tuple[str, int]]) -> None:
    import hypothesis
    from schemathesis.checks import not_a_server_error

    @hypothesis.settings(max_examples=25, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(case=operation.as_strategy())  # type: ignore[attr-defined]
    def check(case: object) -> None:
        response = case.call(app=app, headers={"Authorization": f"Bearer {token}"})  # type: ignore[attr-defined]
        calls.append(response.status_code)
        if response.status_code >= 500:
            failures.append((operation.label, response.status_code))  # type: ignore[attr-defined]
        case.validate_response(response, checks=[not_a_server_error])  # type: ignore[attr-defined]

    check()


def test_tally_export_publish_over_the_api(client: FlaskClient, tokens: dict[str, str],
                                           engine: Engine) -> None:
    """Tally, download each export, publish; microdata needs the coordinator role."""
    coord, viewer = auth(tokens, "coordinator"), auth(tokens, "viewer")
    assert client.get("/api/v1/campaigns/sdg1662/export?format=csv",
                      headers=viewer).status_code == 404  # nothing tallied yet
    resp = client.post("/api/v1/campaigns/sdg1662/tally", headers=coord)
    assert resp.status_code == 201 and resp.get_json()["snapshot"] == 1
    for fmt, marker in [("csv", b","), ("sdmx", b"DATAFLOW"), ("xlsx", b"PK")]:
        resp = client.get(f"/api/v1/campaigns/sdg1662/export?format={fmt}", headers=viewer)
        assert resp.status_code == 200 and marker in resp.data[:200], fmt
    assert client.get("/api/v1/campaigns/sdg1662/export?format=microdata",
                      headers=viewer).status_code == 403
    assert client.get("/api/v1/campaigns/sdg1662/export?format=microdata",
                      headers=coord).status_code == 200
    assert client.get("/api/v1/campaigns/sdg1662/export?format=pdf",
                      headers=viewer).status_code == 422
    resp = client.post("/api/v1/campaigns/sdg1662/publish", headers=coord)
    assert resp.status_code == 200 and resp.get_json()["snapshot"] == 1


def test_patch_reminders_and_airtime(client: FlaskClient, tokens: dict[str, str]) -> None:
    """PATCH sets the reminder schedule and the airtime thank-you; a viewer may not;
    bad values are 422 and change nothing; each change is audited."""
    url = "/api/v1/campaigns/sdg1662"
    coord, viewer = auth(tokens, "coordinator"), auth(tokens, "viewer")
    assert client.patch(url, json={"reminder_max": 2}, headers=viewer).status_code == 403
    resp = client.patch(url, headers=coord, json={
        "reminder_hours": 6, "reminder_max": 2,
        "airtime": {"currency": "GHS", "amount": "1.50", "budget": "300"}})
    assert resp.status_code == 200, resp.json
    assert (resp.json["reminder_hours"], resp.json["reminder_max"]) == (6, 2)
    assert resp.json["airtime"] == {"currency": "GHS", "amount": "1.50", "budget": "300.00"}
    for body, error in [
        ({"reminder_hours": 0}, "between 1 and 1440"),
        ({"reminder_max": 11}, "between 0 and 10"),
        ({"airtime": {"currency": "GHS", "amount": "abc", "budget": "3"}}, "not an amount"),
        ({"airtime": {"currency": "GHS", "amount": 2, "budget": "3"}}, "string fields"),
        ({"airtime": "on"}, "wrong type"),
        ({"colour": "red"}, "unknown field"),
        ({"questionnaire_version": "0123456789abcdef"}, "is open: pause it"),
        ({"languages": ["fr"]}, "language 'fr' is not in questionnaire"),
        ({"languages": [1]}, "a list of language codes"),
    ]:
        bad = client.patch(url, json=body, headers=coord)
        assert bad.status_code == 422 and error in bad.json["error"], (body, bad.json)
    after = client.get(url, headers=viewer).json
    assert (after["reminder_hours"], after["airtime"]["amount"]) == (6, "1.50")
    resp = client.patch(url, json={"airtime": None}, headers=coord)
    assert resp.json["airtime"] is None
    assert client.patch(url, json={"languages": ["en"]}, headers=coord).json[
        "languages"] == ["English (en)"]
    assert client.patch(url, json={"languages": None}, headers=coord).json["languages"] is None
    assert client.patch("/api/v1/campaigns/nope", json={"reminder_max": 1},
                        headers=coord).status_code == 404
    audit = client.get("/api/v1/audit", headers=auth(tokens, "admin")).json
    assert [e["action"] for e in audit][:5] == ["campaign.languages", "campaign.languages",
                                                "campaign.airtime", "campaign.airtime",
                                                "campaign.reminders"]


def deep(levels: int) -> str:
    """A value nested `levels` deep: [[[...]]] (about 2 KB for 1,000 levels)."""
    return "[" * levels + "]" * levels


# Every JSON endpoint, with a body that is right but for one value nested ~1,000 deep.
DEEP = [
    ("POST", "/api/v1/campaigns", '{"slug": "x1", "name": %s, "questionnaire_version": "v"}'),
    ("PUT", "/api/v1/campaigns/sdg1662/quotas", '{"on": ["sex"], "cells": %s}'),
    ("POST", "/api/v1/campaigns/sdg1662/invitations", '{"attributes": {"a": %s}}'),
    ("PATCH", "/api/v1/campaigns/sdg1662", '{"airtime": {"currency": %s}}'),
    ("POST", "/api/v1/tokens", '{"name": %s, "role": "viewer"}'),
]


@pytest.mark.parametrize("method,path,template", DEEP, ids=[f"{m} {p}" for m, p, _ in DEEP])
@pytest.mark.parametrize("levels", [33, 1000, 100_000])
def test_deeply_nested_json_is_400(client: FlaskClient, tokens: dict[str, str],
                                   engine: Engine, method: str, path: str, template: str,
                                   levels: int) -> None:
    """JSON nested deeper than any body we take is 400 with a reason, never a 500
    (RecursionError), and changes nothing."""
    body = template % deep(levels)
    before = _audit_count(engine)
    resp = client.open(path, method=method, data=body, content_type="application/json",
                       headers=auth(tokens, "admin"))
    assert resp.status_code == 400, resp.data[:200]
    assert "nested" in resp.get_json()["error"]
    assert _audit_count(engine) == before


def test_json_limits_and_constants(client: FlaskClient, tokens: dict[str, str]) -> None:
    """Nesting up to the limit is fine; NaN/Infinity and lone surrogates are refused (400);
    over 1 MiB is 413."""
    admin = auth(tokens, "admin")
    ok = client.post("/api/v1/tokens", headers=admin, content_type="application/json",
                     data='{"name": "n", "role": "viewer", "x": ' + deep(31) + '}')
    assert ok.status_code == 422 and "unknown field" in ok.get_json()["error"]
    for constant in ("NaN", "Infinity", "-Infinity"):
        resp = client.post("/api/v1/campaigns/sdg1662/invitations", headers=admin,
                           content_type="application/json", data='{"limit": ' + constant + '}')
        assert resp.status_code == 400 and "not valid JSON" in resp.get_json()["error"]
    for text in ('"\\ud800"', '"a\\udfffb"'):  # valid JSON, but no character
        resp = client.post("/api/v1/tokens", headers=admin, content_type="application/json",
                           data='{"name": ' + text + ', "role": "viewer"}')
        assert resp.status_code == 400 and "surrogate" in resp.get_json()["error"]
    big = client.post("/api/v1/tokens", headers=admin, content_type="application/json",
                      data=json.dumps({"name": "x" * (1024 * 1024), "role": "viewer"}))
    assert big.status_code == 413


def _audit_count(engine: Engine) -> int:
    with Session(engine) as db:
        return db.scalar(select(func.count()).select_from(AuditEntry)) or 0


@pytest.mark.parametrize("amount", ["1e999999", "9" * 30, "Infinity", "NaN", "1e18", "-2",
                                    "0.001"])
def test_absurd_airtime_amounts_are_422(client: FlaskClient, tokens: dict[str, str],
                                        amount: str) -> None:
    """An airtime amount or budget no payment could have is 422 with what to give, never a
    500 (Decimal.quantize of 1e999999 raised InvalidOperation), and changes nothing."""
    url = "/api/v1/campaigns/sdg1662"
    coord = auth(tokens, "coordinator")
    for airtime in ({"currency": "GHS", "amount": amount, "budget": "300"},
                    {"currency": "GHS", "amount": "2", "budget": amount}):
        resp = client.patch(url, headers=coord, json={"airtime": airtime})
        assert resp.status_code == 422, (airtime, resp.status_code)
        assert "positive amount" in resp.get_json()["error"] or "not an amount" in \
            resp.get_json()["error"]
    assert client.get(url, headers=coord).get_json()["airtime"] is None


@pytest.mark.parametrize("snapshot", ["\u00b2", "1\u00b9", "\u0663", "-1", "1.0", "9" * 20, ""])
def test_export_snapshot_must_be_a_plain_number(client: FlaskClient,
                                                tokens: dict[str, str],
                                                snapshot: str) -> None:
    """?snapshot= takes ASCII digits only: "²" (isdigit, yet not int()-able) was a 500."""
    resp = client.get("/api/v1/campaigns/sdg1662/export",
                      query_string={"format": "csv", "snapshot": snapshot},
                      headers=auth(tokens, "viewer"))
    assert resp.status_code == 422 and "version number" in resp.get_json()["error"]
