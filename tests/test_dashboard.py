"""The coordinators' dashboard, used as a person uses it: Debian's chromium (headless, driven
by Playwright) against the real app served over HTTP, with counts that come from simulated
citizens answering over the real Africa's Talking USSD and SMS webhooks."""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session
from test_e2e import Citizen, hop, play  # the e2e tests' simulated USSD citizens
from test_sms import fake, sms, work  # noqa: F401 - the SMS provider stand-in fixtures
from werkzeug.serving import make_server

from gateway.coordination.bootstrap import shipped_questionnaire
from gateway.coordination.campaigns import create_token, set_airtime, set_quotas
from gateway.interview.quota import define as define_quota
from gateway.store.models import ApiToken, Campaign, Channel, OutboundMessage
from gateway.store.sessions import SessionStore
from workers.persist import drain

CHROMIUM = shutil.which("chromium")
FORM = "application/x-www-form-urlencoded"
SMS_PHONE = "+233201112233"
# Anything that looks like a Ghanaian number, with or without the +.
PHONE_LIKE = re.compile(r"\+?233\d{9}|\b0[235]\d{8}\b")
TARGET = 8
PILOT_NAME = 'Accra <b>pilot</b> & "friends"'  # must show as text, never as markup


# -- the browser and the served app -----------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; "
                    ".ci/run installs it)")
    with sync_playwright() as pw:
        # Never a downloaded browser: offline machines have only the distribution's.
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def live(app: Flask) -> Iterator[str]:
    """The app on a real port, as gunicorn would serve it."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)
    server.server_close()


@pytest.fixture
def page(browser: Browser, live: str) -> Iterator[Page]:
    context = browser.new_context(base_url=live)
    context.set_default_timeout(15_000)
    page = context.new_page()
    yield page
    context.close()


# -- real data -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Survey:
    started: int
    completed: int
    waiting: int
    outbound: dict[str, int]
    phones: list[str]
    answers: list[dict[str, str]]  # each completed interview's answers


@pytest.fixture
def tokens(engine: Engine, channel: Channel) -> dict[str, str]:
    with Session(engine) as db, db.begin():
        return {role: create_token(db, "test", f"{role} person", role)
                for role in ("admin", "coordinator", "viewer")}


@pytest.fixture
def survey(client: FlaskClient, app: Flask, ussd_url: str, engine: Engine,
           redis_client: redis.Redis, channel: Channel, tokens: dict[str, str]) -> Survey:
    """Three citizens finish over USSD, one stops after consenting, one starts by SMS (so
    a reply waits in the outbox); after the worker drains, one more dials in, so some
    events are still waiting. A second campaign comes from the API, as a coordinator
    makes one."""
    form = shipped_questionnaire()
    resp = client.post("/api/v1/campaigns", json={
        "slug": "accra-pilot", "name": PILOT_NAME, "questionnaire_version": form.version,
        "target_size": 40}, headers={"Authorization": f"Bearer {tokens['coordinator']}"})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    with Session(engine) as db, db.begin():
        # The shipped campaign is made at start-up, without a target size.
        db.execute(update(Campaign).where(Campaign.slug == "sdg1662")
                   .values(target_size=TARGET))

    by_label = {q.labels["English (en)"]: q for q in form.questions if q.type != "calculate"}
    citizens = [Citizen(n, random.Random(n)) for n in range(3)]
    for citizen in citizens:
        play(client, ussd_url, citizen, by_label)
    quitter = Citizen(50, random.Random(50))
    hop(client, ussd_url, quitter, None)
    hop(client, ussd_url, quitter, "1")  # English
    hop(client, ussd_url, quitter, "1")  # consents, then hangs up

    with Session(engine) as db, db.begin():
        campaign_id = db.scalar(select(Campaign.id).where(Campaign.slug == "sdg1662"))
        sms = Channel(key="dash-at-sms", provider="africastalking", kind="sms",
                      address="1662", campaign_id=campaign_id, config=json.dumps(
                          {"username": "sandbox", "api_key": "k", "rate_per_second": 0}))
        db.add(sms)
    app.extensions["civicdial"].registry.refresh()
    resp = client.post("/webhooks/africastalking/dash-at-sms/sms", content_type=FORM,
                       data=urlencode({"from": SMS_PHONE, "to": "1662", "text": "SURVEY",
                                       "date": "2026-11-25 12:00:00", "id": "dash-m1",
                                       "linkId": "", "networkCode": "62001"}))
    assert resp.status_code == 200, resp.get_data(as_text=True)

    store = SessionStore(redis_client)
    drain(redis_client, engine, store.stream, batch=500)
    assert store.waiting() == 0
    late = Citizen(60, random.Random(60))
    for text_in in (None, "1", "1", "1"):  # language, consent, first answer
        hop(client, ussd_url, late, text_in)
    waiting = store.waiting()
    assert waiting > 0
    with Session(engine) as db:
        outbound = Counter(db.scalars(select(OutboundMessage.status)))
    assert sum(outbound.values()) >= 1  # the SMS respondent's first question
    # Started means consented: the SMS respondent has only been asked for a language.
    return Survey(started=len(citizens) + 1, completed=len(citizens), waiting=waiting,
                  outbound=dict(outbound),
                  phones=[c.phone for c in [*citizens, quitter, late]] + [SMS_PHONE],
                  answers=[c.expected for c in citizens])


def sign_in(page: Page, token: str) -> None:
    page.goto("/dashboard/login")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def assert_no_numbers(page: Page, survey: Survey | None = None) -> None:
    html = page.content()
    assert not PHONE_LIKE.search(html), PHONE_LIKE.search(html)
    for phone in survey.phones if survey else []:
        assert phone[1:] not in html and phone[-9:] not in html


def facts(page: Page, selector: str) -> dict[str, str]:
    """A <dl> as the reader sees it: term -> definition."""
    terms = page.locator(f"{selector} dt").all_inner_texts()
    values = page.locator(f"{selector} dd").all_inner_texts()
    assert len(terms) == len(values)
    return {t.strip(): v.strip() for t, v in zip(terms, values, strict=True)}


def cell(page: Page, slug: str, column: str) -> str:
    return page.locator(f'#campaigns tr[data-slug="{slug}"] td.{column}').inner_text().strip()


# -- the browser tests -------------------------------------------------------------------

def test_viewer_signs_in_and_sees_real_counts(page: Page, live: str, survey: Survey,
                                              tokens: dict[str, str]) -> None:
    """Sign in with a viewer token through the form, read the campaign table, click
    through to the campaign: every number is the one the simulated citizens produced."""
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto("/dashboard/")
    expect(page).to_have_url(f"{live}/dashboard/login")
    assert_no_numbers(page)
    sign_in(page, tokens["viewer"])
    expect(page).to_have_url(f"{live}/dashboard/")
    expect(page.get_by_text("Signed in as viewer person (viewer)")).to_be_visible()

    assert cell(page, "sdg1662", "started") == str(survey.started)
    assert cell(page, "sdg1662", "completed") == str(survey.completed)
    assert cell(page, "sdg1662", "target") == str(TARGET)
    assert cell(page, "sdg1662", "pct") == f"{100 * survey.completed / TARGET:.0f}%"
    assert cell(page, "sdg1662", "waiting") == str(survey.waiting)
    # The campaign made over the API, its name shown as text, not markup.
    assert cell(page, "accra-pilot", "started") == "0"
    assert cell(page, "accra-pilot", "target") == "40"
    assert cell(page, "accra-pilot", "pct") == "0%"
    expect(page.locator('#campaigns tr[data-slug="accra-pilot"] td').nth(1)).to_have_text(
        PILOT_NAME)
    assert page.locator("#campaigns b").count() == 0
    expect(page.locator("#waiting-total")).to_have_text(str(survey.waiting))
    assert_no_numbers(page, survey)

    page.get_by_role("link", name="sdg1662").click()
    expect(page).to_have_url(f"{live}/dashboard/campaigns/sdg1662")
    expect(page.locator("#started")).to_have_text(str(survey.started))
    expect(page.locator("#completed")).to_have_text(str(survey.completed))
    expect(page.locator("#target")).to_contain_text(
        f"{TARGET}: {100 * survey.completed / TARGET:.0f}%")
    expect(page.locator("#waiting")).to_have_text(str(survey.waiting))
    expect(page.locator("#schedule")).to_contain_text("no start set")
    rows = page.locator("#outbound tbody tr")
    shown = {rows.nth(i).locator("td").nth(0).inner_text():
             int(rows.nth(i).locator("td").nth(1).inner_text()) for i in range(rows.count())}
    assert shown == survey.outbound
    expect(page.locator("#quotas-none")).to_be_visible()  # the shipped campaign has none
    expect(page.locator("#airtime-none")).to_be_visible()
    assert_no_numbers(page, survey)

    # Back to the list; then a campaign that does not exist is a page saying so.
    page.get_by_role("link", name="All campaigns").click()
    expect(page).to_have_url(f"{live}/dashboard/")
    response = page.goto("/dashboard/campaigns/nope")
    assert response is not None and response.status == 404
    expect(page.get_by_role("heading", name="No such campaign")).to_be_visible()
    # Offline offices: nothing is fetched from anywhere but the app itself.
    assert requests and all(url.startswith((live + "/", "data:")) for url in requests), requests


def test_schedule_is_shown(page: Page, live: str, engine: Engine, survey: Survey,
                           tokens: dict[str, str]) -> None:
    """The window set with `campaign schedule` is on the campaign page, in UTC."""
    from gateway.coordination.campaigns import set_schedule

    with Session(engine) as db, db.begin():
        set_schedule(db, "test", "accra-pilot", datetime(2026, 3, 1, 8, 0, tzinfo=UTC),
                     datetime(2026, 3, 31, 18, 30, tzinfo=UTC))
    sign_in(page, tokens["viewer"])
    page.goto("/dashboard/campaigns/accra-pilot")
    expect(page.locator("#schedule")).to_contain_text("2026-03-01 08:00 UTC")
    expect(page.locator("#schedule")).to_contain_text("2026-03-31 18:30 UTC")
    expect(page.get_by_role("heading", level=1)).to_contain_text(PILOT_NAME)
    expect(page.locator("#outbound-none")).to_be_visible()


def test_quota_fill_from_real_interviews(page: Page, engine: Engine, survey: Survey,
                                        tokens: dict[str, str]) -> None:
    """Quotas set on region x sex after the interviews: each cell's completed count is
    the citizens who answered that way; a cell at its target is marked full."""
    seen = Counter((a["region"], a["sex"]) for a in survey.answers)
    empty = next((r, x) for r in ("oti", "volta", "savannah") for x in ("female", "male")
                 if (r, x) not in seen)
    cells = [({"region": r, "sex": x}, 1) for r, x in seen] + [
        ({"region": empty[0], "sex": empty[1]}, 5)]
    with Session(engine) as db, db.begin():
        set_quotas(db, "test", "sdg1662",
                   lambda form: define_quota(form, ["region", "sex"], cells))
    sign_in(page, tokens["viewer"])
    page.goto("/dashboard/campaigns/sdg1662")
    table = page.locator("#quotas")
    expect(table.locator("thead th")).to_have_text(
        ["region", "sex", "Target", "Completed", "Fill", "Full", "Screened out"])
    for (region, sex), n in seen.items():
        row = table.locator("tbody tr").filter(has_text=region).filter(
            has=page.locator("td", has_text=re.compile(f"^{sex}$")))
        expect(row.locator("td")).to_have_text(
            [region, sex, "1", str(n), f"{100 * n:.0f}%", "full", "0"])
    row = table.locator("tbody tr").filter(has_text=empty[0]).filter(
        has=page.locator("td", has_text=re.compile(f"^{empty[1]}$")))
    expect(row.locator("td")).to_have_text([empty[0], empty[1], "5", "0", "0%", "—", "0"])
    expect(table.locator("tfoot td").nth(4)).to_have_text(
        f"{len(seen)} of {len(seen) + 1}")
    assert_no_numbers(page, survey)


def test_airtime_spend_from_real_interviews(page: Page, client: FlaskClient, app: Flask,
                                            ussd_url: str, engine: Engine,
                                            redis_client: redis.Redis, survey: Survey,
                                            tokens: dict[str, str]) -> None:
    """Airtime turned on with room for two payments, then three more citizens finish: the
    worker reserves two against the budget and skips the third, and the page says so."""
    with Session(engine) as db, db.begin():
        set_airtime(db, "test", "sdg1662", "GHS", "2.00", "5.00")
    app.extensions["civicdial"].registry.refresh()
    form = shipped_questionnaire()
    by_label = {q.labels["English (en)"]: q for q in form.questions if q.type != "calculate"}
    for n in (20, 21, 22):
        play(client, ussd_url, Citizen(n, random.Random(n)), by_label)
    drain(redis_client, engine, SessionStore(redis_client).stream, batch=500)

    sign_in(page, tokens["viewer"])
    page.goto("/dashboard/campaigns/sdg1662")
    shown = facts(page, "#airtime")
    assert shown["Per completed interview"] == "GHS 2.00"
    assert shown["Budget"] == "GHS 5.00"
    # Nothing has reached Africa's Talking yet (no worker sends here): reserved, not spent.
    assert re.sub(r"\s+", " ", shown["Spent so far"]) == "GHS 0.00 of GHS 5.00: 0%"
    assert shown["Committed (with payments in flight)"] == "GHS 4.00"
    assert shown["Payments pending"] == "2" and shown["Payments sent"] == "0"
    assert shown["Payments skipped over budget"] == "1"
    assert_no_numbers(page)


def test_bad_token_shows_an_error_and_no_data(page: Page, live: str, survey: Survey) -> None:
    sign_in(page, "cd_not-a-real-token")
    expect(page.get_by_role("alert")).to_contain_text("unknown or has been revoked")
    expect(page).to_have_url(f"{live}/dashboard/login")
    assert "sdg1662" not in page.content()
    assert not [c for c in page.context.cookies() if c["name"] == "civicdial_dashboard"]
    page.goto("/dashboard/campaigns/sdg1662")
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next="))
    assert "sdg1662" not in page.locator("main").inner_text()


def test_cookie_is_http_only_and_same_site_strict(page: Page, survey: Survey,
                                                  tokens: dict[str, str]) -> None:
    sign_in(page, tokens["viewer"])
    page.wait_for_url("**/dashboard/")
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "civicdial_dashboard"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/dashboard"
    assert not cookie["secure"]  # plain HTTP here; Secure when served over HTTPS
    assert page.evaluate("document.cookie") == ""  # scripts cannot read the token


def test_sign_out_then_every_page_asks_to_sign_in(page: Page, live: str, survey: Survey,
                                                  tokens: dict[str, str]) -> None:
    sign_in(page, tokens["viewer"])
    page.goto("/dashboard/campaigns/sdg1662")
    expect(page.locator("#completed")).to_have_text(str(survey.completed))
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{live}/dashboard/login")
    assert not [c for c in page.context.cookies() if c["name"] == "civicdial_dashboard"]
    for path in ("/dashboard/", "/dashboard/campaigns/sdg1662"):
        page.goto(path)
        expect(page).to_have_url(re.compile(r"/dashboard/login"))
        expect(page.locator("#campaigns")).to_have_count(0)
    # The login form sends the person back where they were going.
    page.get_by_label("API token").fill(tokens["viewer"])
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{live}/dashboard/campaigns/sdg1662")


def test_revoked_token_is_refused(page: Page, live: str, engine: Engine, survey: Survey,
                                  tokens: dict[str, str]) -> None:
    """Revoking a token locks its browser out at the next page, and it cannot sign in
    again."""
    sign_in(page, tokens["viewer"])
    expect(page.locator("#campaigns")).to_be_visible()
    with Session(engine) as db, db.begin():
        db.execute(update(ApiToken).where(ApiToken.name == "viewer person")
                   .values(revoked_at=datetime.now(UTC)))
    page.reload()
    expect(page).to_have_url(re.compile(r"/dashboard/login\?error=expired"))
    expect(page.get_by_role("alert")).to_contain_text("no longer valid")
    expect(page.locator("#campaigns")).to_have_count(0)
    assert not [c for c in page.context.cookies() if c["name"] == "civicdial_dashboard"]
    sign_in(page, tokens["viewer"])
    expect(page.get_by_role("alert")).to_contain_text("unknown or has been revoked")
    expect(page.locator("#campaigns")).to_have_count(0)


def test_cross_site_sign_in_is_refused(page: Page, live: str, survey: Survey,
                                       tokens: dict[str, str]) -> None:
    """A form on another site posting a token to our login (to sign the visitor in as
    someone else) does not carry our SameSite=Strict form cookie, so it fails."""
    page.goto("/dashboard/login")  # the visitor has our form cookie
    other = live.replace("127.0.0.1", "localhost")  # another site to the browser
    page.goto(f"{other}/healthz")
    page.set_content(
        f'<form method="post" action="{live}/dashboard/login">'
        f'<input name="token" value="{tokens["admin"]}"><input name="csrf" value="guess">'
        '<button>go</button></form>')
    page.get_by_role("button", name="go").click()
    expect(page.get_by_role("alert")).to_contain_text("form had expired")
    assert not [c for c in page.context.cookies() if c["name"] == "civicdial_dashboard"]


def test_readable_on_a_small_screen(browser: Browser, live: str, survey: Survey,
                                    tokens: dict[str, str]) -> None:
    """On a 360-pixel phone the tables become cards: nothing runs off the side."""
    context = browser.new_context(base_url=live, viewport={"width": 360, "height": 740})
    try:
        page = context.new_page()
        sign_in(page, tokens["viewer"])
        expect(page.locator("#campaigns")).to_be_visible()
        for path in ("/dashboard/", "/dashboard/campaigns/sdg1662"):
            page.goto(path)
            assert page.evaluate("document.documentElement.scrollWidth") <= 360, path
        page.goto("/dashboard/")
        expect(page.locator('#campaigns tr[data-slug="sdg1662"] td.completed')).to_be_visible()
    finally:
        context.close()


# -- without a browser ---------------------------------------------------------------------

@pytest.mark.parametrize("role", ["viewer", "coordinator", "admin"])
def test_every_role_may_read(client: FlaskClient, tokens: dict[str, str], role: str) -> None:
    client.get("/dashboard/login")
    csrf = client.get_cookie("civicdial_dashboard_csrf", path="/dashboard/login")
    assert csrf is not None
    resp = client.post("/dashboard/login", data={"token": tokens[role], "csrf": csrf.value})
    assert resp.status_code == 303 and resp.headers["Location"] == "/dashboard/"
    page = client.get("/dashboard/")
    assert page.status_code == 200 and "sdg1662" in page.get_data(as_text=True)
    assert page.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]


def test_sign_in_without_the_form_cookie_is_refused(client: FlaskClient,
                                                    tokens: dict[str, str]) -> None:
    resp = client.post("/dashboard/login", data={"token": tokens["viewer"], "csrf": "x" * 43})
    assert resp.status_code == 400
    assert client.get_cookie("civicdial_dashboard", path="/dashboard") is None


def test_next_never_leaves_the_dashboard(app: Flask, tokens: dict[str, str]) -> None:
    """After sign-in the form returns to a dashboard page, never to another site."""
    for target in ("https://evil.example/", "//evil.example/dashboard/", "/api/v1/audit",
                   "/dashboard/\\evil", "/dashboard//evil.example", "/dashboard/\n"):
        client = app.test_client()
        client.get("/dashboard/login")
        csrf = client.get_cookie("civicdial_dashboard_csrf", path="/dashboard/login")
        assert csrf is not None
        resp = client.post("/dashboard/login", data={
            "token": tokens["viewer"], "csrf": csrf.value, "next": target})
        assert resp.headers["Location"] == "/dashboard/", target


def signed_in_client(client: FlaskClient, token: str) -> FlaskClient:
    client.get("/dashboard/login")
    csrf = client.get_cookie("civicdial_dashboard_csrf", path="/dashboard/login")
    assert csrf is not None
    assert client.post("/dashboard/login",
                       data={"token": token, "csrf": csrf.value}).status_code == 303
    return client


def interview_events(channel: Channel, name: str, region: str, sex: str, end: str,
                     to: str | None = None) -> list[dict[str, Any]]:
    """One interview's stream events as the hops write them: started, region, sex, end."""
    base = {"c": channel.campaign_id, "ch": channel.id, "i": name, "r": f"resp-{name}",
            "ver": "v", "t": 1_790_000_000.0}
    events = [{**base, "id": f"{name}-1", "k": "started", "l": "English (en)"},
              {**base, "id": f"{name}-2", "k": "answer", "q": "region", "v": region},
              {**base, "id": f"{name}-3", "k": "answer", "q": "sex", "v": sex},
              {**base, "id": f"{name}-4", "k": end}]
    if to:
        events[-1]["to"] = to
    return events


def page_text(html: str, start: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html[html.index(start):]))


def test_quota_and_airtime_tables(client: FlaskClient, tokens: dict[str, str],
                                  engine: Engine, channel: Channel, sms: Any,  # noqa: F811
                                  redis_client: redis.Redis, settings: Any) -> None:
    """The quota table (one column per quota question, fill, full, screened out, totals)
    and the airtime spend against the budget, from interviews the worker persisted and
    payments made to the Africa's Talking stand-in; then airtime turned off."""
    from gateway.store.crypto import NumberBox
    from workers.airtime import sweep
    from workers.persist import write_events

    with Session(engine) as db, db.begin():
        set_quotas(db, "test", "sdg1662", lambda form: define_quota(form, ["region", "sex"], [
            ({"region": "ashanti", "sex": "female"}, 100),
            ({"region": "ashanti", "sex": "male"}, 0),
            ({"region": "greater_accra", "sex": "female"}, 1)]))
        set_airtime(db, "test", "sdg1662", "GHS", "2.00", "5.00")
    box = NumberBox(settings.encryption_key)
    write_events(engine, [
        *interview_events(channel, "a", "greater_accra", "female", "completed",
                          box.seal("+233240000701")),
        *interview_events(channel, "b", "ashanti", "male", "screened_out"),
        *interview_events(channel, "c", "ashanti", "female", "completed",
                          box.seal("+233240000702")),
        *interview_events(channel, "d", "ashanti", "female", "completed",
                          box.seal("+233240000703"))])
    sweep(engine, redis_client, older_than=timedelta(0))
    work(engine, redis_client)
    html = signed_in_client(client, tokens["viewer"]).get(
        "/dashboard/campaigns/sdg1662").get_data(as_text=True)
    table = html[html.index('<table class="cards" id="quotas">'):]
    table = table[:table.index("</table>")]
    headers = re.findall(r"<th scope=\"col\"[^>]*>([^<]*)</th>", table)
    assert headers == ["region", "sex", "Target", "Completed", "Fill", "Full", "Screened out"]
    rows = [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", r)).strip()
            for r in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
    assert rows[1:] == ["ashanti female 100 2 2% — 0",
                        "ashanti male 0 0 — full 1",  # a zero target has no fill %
                        "greater_accra female 1 1 100% full 0",
                        "All cells 101 3 3% 2 of 3 1"]
    spend = page_text(html, 'id="airtime"')
    assert "Per completed interview GHS 2.00" in spend
    assert "Spent so far GHS 4.00 of GHS 5.00: 80%" in spend
    assert "Payments sent 2" in spend and "Payments skipped over budget 1" in spend

    with Session(engine) as db, db.begin():
        set_airtime(db, "test", "sdg1662", None)
    html = client.get("/dashboard/campaigns/sdg1662").get_data(as_text=True)
    text = page_text(html, "<h2>Airtime thank-you</h2>")
    assert "Airtime thank-you is off; payments made while it was on:" in text
    assert "Spent so far GHS 4.00 of GHS 5.00: 80%" in text and "Per completed" not in text


def test_nothing_configured(client: FlaskClient, tokens: dict[str, str]) -> None:
    html = signed_in_client(client, tokens["viewer"]).get(
        "/dashboard/campaigns/sdg1662").get_data(as_text=True)
    assert "Airtime thank-you not configured." in html and "No quotas configured." in html


# -- server-side sessions (issue 15: the cookie was the raw token, valid forever) -----------

def _session_cookie(client: FlaskClient) -> str:
    cookie = client.get_cookie("civicdial_dashboard", path="/dashboard")
    assert cookie is not None
    return cookie.value


def _with_cookie(app: Flask, value: str) -> FlaskClient:
    """Another browser that was handed a copy of the cookie."""
    other = app.test_client()
    other.set_cookie("civicdial_dashboard", value, path="/dashboard")
    return other


def test_cookie_is_a_session_id_not_the_token(client: FlaskClient,
                                              tokens: dict[str, str]) -> None:
    value = _session_cookie(signed_in_client(client, tokens["viewer"]))
    assert value != tokens["viewer"] and tokens["viewer"] not in value
    # The token itself in the cookie signs nobody in.
    assert _with_cookie(client.application, tokens["viewer"]).get(
        "/dashboard/").status_code == 303


def test_copied_cookie_stops_working_after_sign_out(app: Flask, client: FlaskClient,
                                                   tokens: dict[str, str]) -> None:
    value = _session_cookie(signed_in_client(client, tokens["coordinator"]))
    copy = _with_cookie(app, value)
    assert copy.get("/dashboard/").status_code == 200  # a copy works while signed in
    assert client.post("/dashboard/logout").status_code == 303
    resp = copy.get("/dashboard/")
    assert resp.status_code == 303 and "/dashboard/login" in resp.headers["Location"]
    assert copy.get("/dashboard/campaigns/sdg1662").status_code == 303


def test_session_expires(app: Flask, client: FlaskClient, engine: Engine,
                         tokens: dict[str, str]) -> None:
    from gateway.store.models import ConsoleSession

    value = _session_cookie(signed_in_client(client, tokens["viewer"]))
    cookie = client.get_cookie("civicdial_dashboard", path="/dashboard")
    assert cookie is not None and cookie.expires is not None  # not a forever cookie
    assert client.get("/dashboard/").status_code == 200
    with Session(engine) as db, db.begin():
        db.execute(update(ConsoleSession).values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    resp = _with_cookie(app, value).get("/dashboard/")
    assert resp.status_code == 303 and "error=expired" in resp.headers["Location"]


def test_revoking_the_token_ends_its_sessions(app: Flask, client: FlaskClient,
                                              engine: Engine,
                                              tokens: dict[str, str]) -> None:
    from gateway.coordination.signin import revoke_token
    from gateway.store.models import ConsoleSession

    value = _session_cookie(signed_in_client(client, tokens["viewer"]))
    with Session(engine) as db, db.begin():
        assert revoke_token(db, "test", "viewer person") == 1
    assert _with_cookie(app, value).get("/dashboard/").status_code == 303
    with Session(engine) as db:
        assert all(s.revoked_at is not None for s in db.scalars(select(ConsoleSession)))
    # Only a hash of the id is stored.
    with Session(engine) as db:
        assert value not in {s.id_hash for s in db.scalars(select(ConsoleSession))}
