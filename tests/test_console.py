"""The coordinator console (issue 12): every page, every role, through the real app."""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fake_providers import FakeProvider, fake_provider
from flask import Flask
from flask.testing import FlaskClient
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from test_dashboard import signed_in_client, tokens  # noqa: F401 - the role tokens fixture
from test_sms import work
from test_tally import load
from werkzeug.serving import make_server

from gateway.store.models import (
    Answer,
    AuditEntry,
    Campaign,
    Channel,
    Interview,
    OutboundMessage,
)

PAGES = ["/dashboard/", "/dashboard/questionnaires", "/dashboard/campaigns/sdg1662",
         "/dashboard/campaigns/sdg1662/settings", "/dashboard/campaigns/sdg1662/channels",
         "/dashboard/campaigns/sdg1662/contacts", "/dashboard/campaigns/sdg1662/fieldwork",
         "/dashboard/campaigns/sdg1662/simulator", "/dashboard/campaigns/sdg1662/results"]


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


@pytest.mark.parametrize("path", PAGES)
def test_every_page_answers_a_viewer(client: FlaskClient, tokens: dict[str, str],  # noqa: F811
                                     path: str) -> None:
    """A viewer reads every page, and none offers a button that changes anything."""
    resp = signed_in_client(client, tokens["viewer"]).get(path)
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200, html[:2000]
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    forms = re.findall(r'<form[^>]*method="post"[^>]*action="([^"]+)"', html)
    assert forms == ["/dashboard/logout"], forms
    assert "<script>" not in html  # no inline script anywhere


@pytest.mark.parametrize("path", PAGES)
def test_every_page_answers_a_coordinator(client: FlaskClient,
                                          tokens: dict[str, str], path: str) -> None:  # noqa: F811
    resp = signed_in_client(client, tokens["coordinator"]).get(path)
    assert resp.status_code == 200, resp.get_data(as_text=True)[:2000]


# -- the whole journey in a real browser ---------------------------------------------------

CHROMIUM = shutil.which("chromium")
SHIPPED = Path(__file__).resolve().parents[1] / "questionnaires" / "sdg1662.md"
BAD_FORM = """\
| survey | type | name | label::English (en) |
| | select_one yesno | consent | Join? |
| | select_one nolist | q1 | First |
| | integer | | Second |
| | select_one yesno | q1 | Third |

| choices | list_name | name | label::English (en) |
| | yesno | yes | Yes |
| | yesno | yes | Yes again |
"""
CONTACTS = """phone,language,region,district
0241234001,en,Ashanti,Kumasi
+233241234002,tw,Ashanti,Kumasi
024 123 4003,en,Volta,Ho
not-a-number,en,Ashanti,Kumasi
0241234004,en,Ashanti,Kumasi,extra
"""
XSS = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with sync_playwright() as pw:
        # Never a downloaded browser: offline machines have only the distribution's.
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def live(app: Flask, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The app on a real port; jobs read their settings from the environment, as a worker
    process does."""
    for name, value in {**env, "CIVICDIAL_SEND_BACKOFF_SECONDS": "0"}.items():
        monkeypatch.setenv(name, value)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)
    server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with fake_provider() as provider:
        yield provider


@pytest.fixture
def page(browser: Browser, live: str) -> Iterator[Page]:
    context = browser.new_context(base_url=live, accept_downloads=True)
    context.set_default_timeout(20_000)
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.dialogs = dialogs  # type: ignore[attr-defined]
    yield page
    assert not dialogs, f"a script ran: {dialogs}"  # nothing user-written ever executes
    context.close()


def sign_in(page: Page, token: str) -> None:
    page.goto("/dashboard/login")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("Signed in as")).to_be_visible()


class Shots:
    def __init__(self, page: Page, folder: Path) -> None:
        self.page, self.folder, self.n = page, folder, 0
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str) -> None:
        self.n += 1
        self.page.screenshot(path=str(self.folder / f"{self.n:02d}-{name}.png"), full_page=True)


def finish_job(page: Page, engine: Engine, client: redis.Redis) -> None:
    """The job page shows progress; the worker runs it; the page reloads by itself."""
    expect(page.locator("progress")).to_be_visible()
    work(engine, client)
    expect(page.locator("#job-status")).to_have_text("finished")


def phone_screen(page: Page) -> str:
    return page.locator("#phone pre.screen").last.inner_text()


def test_a_coordinator_runs_a_campaign_end_to_end(
        page: Page, live: str, engine: Engine, redis_client: redis.Redis, fake: FakeProvider,
        tokens: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """Upload the form -> create -> bind -> import (bad rows) -> invite (fake provider) ->
    simulator interview -> tally -> chart with intervals -> publish -> SDMX read back."""
    shot = Shots(page, tmp_path / "screens")
    sign_in(page, tokens["coordinator"])
    shot("signed-in")

    # 1. Questionnaires: a broken form lists every problem; the shipped one previews.
    page.get_by_role("link", name="Questionnaires").click()
    bad = tmp_path / "broken.md"
    bad.write_text(BAD_FORM)
    page.set_input_files("#file", str(bad))
    page.get_by_role("button", name="Upload and check").click()
    rows = page.locator("#form-error-table tbody tr")
    expect(rows).to_have_count(4)  # all of them, not only the first
    text = page.locator("#form-error-table").inner_text()
    assert "appears twice" in text and "nolist" in text and "has no name" in text
    assert "already used" in text
    shot("form-errors")
    page.set_input_files("#file", str(SHIPPED))
    page.get_by_role("button", name="Upload and check").click()
    expect(page.locator("section.lang")).to_have_count(2)
    expect(page.locator("section.lang").first.locator(".sms-cost")).to_contain_text("segments")
    assert "/ 160 characters" in page.locator("section.lang").first.inner_text()
    shot("preview")

    # 2. A new campaign, from the campaign list.
    page.goto("/dashboard/")
    page.fill("#slug", "journey")
    page.fill("#name", "Journey pilot")
    page.fill("#target_size", "300")
    page.get_by_role("button", name="Create campaign").click()
    expect(page).to_have_url(f"{live}/dashboard/campaigns/journey")
    # A refused move says why.
    page.get_by_role("button", name="Pause").click()
    expect(page.locator("#refused")).to_contain_text("it can go to open, closed, not paused")
    shot("refused")

    # 3. Channels: a USSD code and an SMS number (to the stand-in provider).
    page.goto("/dashboard/campaigns/journey/channels")
    page.select_option("#provider", "africastalking")
    page.select_option("#kind", "ussd")
    page.fill("#address", "*920*77#")
    page.get_by_role("button", name="Bind channel").click()
    page.select_option("#kind", "sms")
    page.fill("#address", "1663")
    page.fill("#config", json.dumps({"username": "sandbox", "api_key": "at-key",
                                     "base_url": fake.base_url, "rate_per_second": 0}))
    page.get_by_role("button", name="Bind channel").click()
    expect(page.locator("section.channel")).to_have_count(2)
    assert "/webhooks/africastalking/" in page.locator("section.channel").first.inner_text()
    shot("channels")
    page.goto("/dashboard/campaigns/journey")
    page.get_by_role("button", name="Open").click()
    expect(page.locator("#state")).to_have_text("open")

    # Real citizens' interviews (written as the worker writes them) for the tally.
    with Session(engine) as db:
        ussd = db.scalar(select(Channel).join(Campaign).where(
            Campaign.slug == "journey", Channel.kind == "ussd"))
        assert ussd is not None
        db.expunge(ussd)
    specs = load(engine, ussd, 300, seed=7)
    real_completed = sum(1 for s in specs if s["status"] == "completed")

    # 4. Contacts: two bad rows reported, downloadable.
    page.goto("/dashboard/campaigns/journey/contacts")
    csv_file = tmp_path / "contacts.csv"
    csv_file.write_text(CONTACTS)
    page.set_input_files("#contacts-file", str(csv_file))
    page.get_by_role("button", name="Import").click()
    finish_job(page, engine, redis_client)
    expect(page.locator("#rejected-count")).to_have_text("2")
    expect(page.locator("#rejected tbody tr")).to_have_count(2)
    with page.expect_download() as download:
        page.locator("#rejected-report").click()
    report = Path(download.value.path()).read_text().splitlines()
    assert report[0] == "line,reason" and len(report) == 3
    shot("import")

    # 5. Invitations: filters, a preview count, then the sends.
    page.goto("/dashboard/campaigns/journey/contacts")
    assert page.locator("#contacts tbody tr").count() == 3
    page.fill("#region", "ashanti")
    page.get_by_role("button", name="Preview how many").click()
    expect(page.locator("#preview-count")).to_contain_text("Would send 2 invitations")
    shot("invite-preview")
    page.get_by_role("button", name="Send 2 invitations").click()
    finish_job(page, engine, redis_client)
    assert sorted(m["to"] for m in fake.accepted) == ["+233241234001", "+233241234002"]
    page.goto("/dashboard/campaigns/journey/contacts")
    expect(page.locator("#invitation-status")).to_contain_text("sent")

    # 6. The phone simulator: a whole USSD interview, as a citizen sees it.
    page.goto("/dashboard/campaigns/journey/simulator")
    page.select_option("#sim-channel", label="Africa's Talking USSD *920*77#")
    page.get_by_role("button", name="Send").click()  # dial
    expect(page.locator("#phone pre.screen").first).to_contain_text("CON ")
    saw_part_break = False
    for _ in range(200):
        screen = phone_screen(page)
        if screen.startswith("END"):
            if "Thank you" in screen and "Part" not in screen:
                break
            saw_part_break = saw_part_break or "Part" in screen
            page.get_by_role("button", name="Send").click()  # dial again
            continue
        assert len(screen) <= 160, screen
        if "How old" in screen:
            key = "2"
        elif "improve" in screen:
            key = XSS
        else:
            key = "1"
        page.fill("#sim-input", key)
        page.get_by_role("button", name="Send").click()
    else:
        raise AssertionError("the simulated interview did not finish")
    assert saw_part_break  # the part budget cut the interview into parts
    shot("simulator-done")
    work(engine, redis_client)
    page.reload()
    expect(page.locator("#sim-interview")).to_have_text("completed")
    expect(page.locator("#sim-answers")).to_contain_text(XSS)  # shown as text
    shot("simulator-answers")
    # Test data: not counted, not sent.
    with Session(engine) as db:
        sim = db.scalar(select(Interview).where(Interview.respondent.startswith("sim-")))
        assert sim is not None and sim.status == "completed"
        assert db.scalar(select(func.count()).select_from(Answer).where(
            Answer.respondent == sim.respondent)) > 20
        assert not db.scalar(select(func.count()).select_from(OutboundMessage).where(
            OutboundMessage.respondent == sim.respondent, OutboundMessage.status == "sent"))

    # 7. Fieldwork counts real completions only, live.
    page.goto("/dashboard/campaigns/journey/fieldwork")
    expect(page.locator("#fw-completed")).to_have_text(str(real_completed))
    shot("fieldwork")

    # 8. Results: the tally as a job, charts with intervals, the numbers in a table.
    page.goto("/dashboard/campaigns/journey/results")
    expect(page.locator("#no-tally")).to_be_visible()
    page.get_by_role("button", name="Run the tally").click()
    finish_job(page, engine, redis_client)
    page.get_by_role("link", name="See the results").click()
    chart = page.locator("#chart-health")
    expect(chart).to_be_visible()
    assert chart.locator("line.ci").count() >= 3 * 7  # a whisker and two ends per bar
    expect(page.locator("#table-health tbody tr")).to_have_count(7)
    assert page.locator("svg.chart .na").count() >= 1  # some small groups are suppressed
    assert "not enough answers" in page.locator("svg.chart").nth(1).inner_html() or \
        page.locator("g.suppressed").count() >= 1
    shot("results")
    page.get_by_role("button", name="Publish snapshot 1").click()
    expect(page.locator("#published")).to_have_text("Published: snapshot 1.")
    shot("published")

    # 9. SDMX download, read back with pysdmx.
    from pysdmx.io.csv.sdmx10.reader import read

    with page.expect_download() as download:
        page.locator("#download-sdmx").click()
    text = Path(download.value.path()).read_text()
    (dataset,) = read(text)
    assert len(dataset.data) == len(text.strip().splitlines()) - 1 > 50

    # Every action is in the audit log, which the admin reads.
    with Session(engine) as db:
        actions = set(db.scalars(select(AuditEntry.action).where(
            AuditEntry.actor == "token:coordinator person")))
    assert {"questionnaire.load", "campaign.create", "channel.add", "campaign.open",
            "contacts.import", "campaign.invite", "campaign.tally", "campaign.publish",
            "campaign.export"} <= actions, actions
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, tokens["admin"])
    page.get_by_role("link", name="Audit log").click()
    expect(page.locator("#audit")).to_contain_text("campaign.publish")
    shot("audit")


# -- roles, CSRF, XSS, small screens -------------------------------------------------------

ACTIONS = [("/dashboard/campaigns", {"slug": "forged", "name": "F",
                                     "questionnaire_version": "x"}),
           ("/dashboard/campaigns/sdg1662/close", {}),
           ("/dashboard/campaigns/sdg1662/settings", {"reminder_hours": "2"}),
           ("/dashboard/campaigns/sdg1662/channels", {"provider": "twilio", "kind": "sms",
                                                      "address": "+15005550006"}),
           ("/dashboard/campaigns/sdg1662/tally", {}),
           ("/dashboard/campaigns/sdg1662/publish", {}),
           ("/dashboard/campaigns/sdg1662/invitations", {}),
           ("/dashboard/campaigns/sdg1662/simulator", {"reset": "1"})]


def _audit_count(engine: Engine) -> int:
    with Session(engine) as db:
        return db.scalar(select(func.count()).select_from(AuditEntry)) or 0


@pytest.mark.parametrize(("path", "form"), ACTIONS, ids=[a[0] for a in ACTIONS])
def test_a_viewer_forged_post_is_refused(client: FlaskClient, engine: Engine,
                                         tokens: dict[str, str],  # noqa: F811
                                         path: str, form: dict[str, str]) -> None:
    """A viewer who posts a form anyway (with their own valid CSRF token) gets 403 and
    nothing changes."""
    signed_in_client(client, tokens["viewer"])
    csrf = csrf_of(client.get("/dashboard/").get_data(as_text=True))
    before = _audit_count(engine)
    resp = client.post(path, data={**form, "csrf": csrf})
    assert resp.status_code == 403, resp.get_data(as_text=True)[:500]
    assert "needs the coordinator role" in resp.get_data(as_text=True)
    assert _audit_count(engine) == before
    with Session(engine) as db:
        campaign = db.scalar(select(Campaign).where(Campaign.slug == "sdg1662"))
        assert campaign is not None and campaign.state == "open"
        assert campaign.reminder_hours == 12


@pytest.mark.parametrize("csrf", [None, "", "0" * 64, "other-session"])
def test_a_post_without_this_sessions_csrf_token_is_refused(
        app: Flask, client: FlaskClient, engine: Engine, tokens: dict[str, str],  # noqa: F811
        csrf: str | None) -> None:
    """A coordinator's browser tricked into posting (no token, a guessed one, another
    session's) gets 400 and nothing changes."""
    signed_in_client(client, tokens["coordinator"])
    if csrf == "other-session":
        other = signed_in_client(app.test_client(), tokens["coordinator"])
        csrf = csrf_of(other.get("/dashboard/").get_data(as_text=True))
    before = _audit_count(engine)
    data = {} if csrf is None else {"csrf": csrf}
    resp = client.post("/dashboard/campaigns/sdg1662/close", data=data)
    assert resp.status_code == 400
    assert "form had expired" in resp.get_data(as_text=True)
    assert _audit_count(engine) == before
    # With the page's own token the same post works.
    csrf = csrf_of(client.get("/dashboard/campaigns/sdg1662").get_data(as_text=True))
    assert client.post("/dashboard/campaigns/sdg1662/close",
                       data={"csrf": csrf}).status_code == 303
    with Session(engine) as db:
        assert db.scalar(select(Campaign.state).where(Campaign.slug == "sdg1662")) == "closed"


def test_microdata_and_audit_need_their_roles(client: FlaskClient,
                                              tokens: dict[str, str]) -> None:  # noqa: F811
    signed_in_client(client, tokens["viewer"])
    assert client.get("/dashboard/campaigns/sdg1662/export.microdata").status_code == 403
    assert client.get("/dashboard/audit").status_code == 403
    html = client.get("/dashboard/").get_data(as_text=True)
    assert "Audit log" not in html


def test_a_viewer_sees_no_control_in_the_browser(page: Page, tokens: dict[str, str],  # noqa: F811
                                                 tmp_path: Path) -> None:
    """Every page, as a viewer: no button but Sign out, and no number."""
    sign_in(page, tokens["viewer"])
    for path in PAGES:
        page.goto(path)
        buttons = page.locator("button:visible").all_inner_texts()
        assert [b.strip() for b in buttons if b.strip() not in (
            "Preview how many", "Search", "Preview at this limit")] == ["Sign out"], (
            path, buttons)
        assert not re.search(r"\+?233\d{9}", page.content())
    page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)


def test_script_in_a_campaign_name_and_an_open_answer_is_text(
        page: Page, engine: Engine, redis_client: redis.Redis,
        tokens: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """<script> typed as a campaign name and as an open answer (through the simulator)
    shows as text on every page, and never runs (the page fixture fails on any dialog)."""
    sign_in(page, tokens["coordinator"])
    page.fill("#slug", "xss")
    page.fill("#name", XSS)
    page.get_by_role("button", name="Create campaign").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(XSS)
    page.goto("/dashboard/")
    expect(page.locator('#campaigns tr[data-slug="xss"] td').nth(1)).to_have_text(XSS)
    for path in ("/dashboard/campaigns/xss/results", "/dashboard/campaigns/xss/contacts",
                 "/dashboard/campaigns/xss/channels"):
        page.goto(path)
        assert XSS not in page.content()  # escaped in the markup
    # An open answer, typed on the simulated phone of the shipped campaign.
    page.goto("/dashboard/campaigns/sdg1662/simulator")
    page.get_by_role("button", name="Send").click()
    for _ in range(120):
        screen = phone_screen(page)
        if "improve" in screen:
            page.fill("#sim-input", XSS)
            page.get_by_role("button", name="Send").click()
            break
        if screen.startswith("END"):
            page.get_by_role("button", name="Send").click()
            continue
        page.fill("#sim-input", "2" if "How old" in screen else "1")
        page.get_by_role("button", name="Send").click()
    else:
        raise AssertionError("never reached the open question")
    work(engine, redis_client)
    page.reload()
    expect(page.locator("#sim-answers")).to_contain_text(XSS)
    expect(page.locator("#phone")).to_contain_text(XSS)
    assert page.locator("#sim-answers script").count() == 0
    page.goto("/dashboard/audit")  # coordinator: refused, the message escaped too
    page.screenshot(path=str(tmp_path / "xss.png"), full_page=True)


def test_every_page_fits_a_phone(browser: Browser, live: str,
                                 tokens: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    """At 360 pixels nothing runs off the side (charts scale, tables become cards)."""
    context = browser.new_context(base_url=live, viewport={"width": 360, "height": 740})
    try:
        page = context.new_page()
        sign_in(page, tokens["admin"])
        for n, path in enumerate([*PAGES, "/dashboard/audit",
                                  "/dashboard/questionnaires/" + _shipped_version()]):
            page.goto(path)
            width = page.evaluate("document.documentElement.scrollWidth")
            page.screenshot(path=str(tmp_path / f"phone-{n:02d}.png"), full_page=True)
            assert width <= 360, (path, width)
    finally:
        context.close()


def _shipped_version() -> str:
    from gateway.coordination.bootstrap import shipped_questionnaire

    return shipped_questionnaire().version


# -- every form error at once --------------------------------------------------------------

def test_every_form_error_is_collected_and_the_first_is_still_raised() -> None:
    from gateway.interview.questionnaire import FormError, collect_form_errors, load_questionnaire

    form, errors = collect_form_errors(BAD_FORM.encode(), "broken.md")
    assert form is None
    found = [(e.sheet, e.row, e.column) for e in errors]
    assert found == [("choices", 3, "name"), ("survey", 3, "type"), ("survey", 4, "name"),
                     ("survey", 5, "name")], [str(e) for e in errors]
    with pytest.raises(FormError) as first:
        load_questionnaire(BAD_FORM.encode(), "broken.md")
    assert (first.value.sheet, first.value.row) == ("choices", 3)
    shipped, none = collect_form_errors(SHIPPED.read_bytes(), SHIPPED.name)
    assert shipped is not None and none == []


# -- the simulator's respondents are test data ---------------------------------------------

def test_simulator_interviews_are_left_out_everywhere(
        app: Flask, engine: Engine, channel: Channel, tmp_path: Path,
        redis_client: redis.Redis, settings: Any) -> None:
    """One real and one simulated completed interview with the same answers: status,
    quotas, the tally's patterns, microdata and airtime see only the real one."""
    from test_dashboard import interview_events

    from gateway.coordination.campaigns import set_airtime, set_quotas
    from gateway.coordination.quotas import counts
    from gateway.coordination.status import campaign_status
    from gateway.indicator.exports import write_microdata
    from gateway.indicator.tally import fetch_patterns
    from gateway.interview.quota import define as define_quota
    from gateway.store.crypto import NumberBox
    from gateway.store.models import AirtimePayment
    from gateway.store.sessions import SessionStore, is_simulated, pseudonym
    from workers.persist import write_events

    sim = pseudonym(settings.pseudonym_key, "+447700900123")
    real = pseudonym(settings.pseudonym_key, "+233241234567")
    assert is_simulated(sim) and not is_simulated(real) and len(sim) == len(real) == 32
    with Session(engine) as db, db.begin():
        set_quotas(db, "test", "sdg1662", lambda form: define_quota(
            form, ["region", "sex"], [({"region": "ashanti", "sex": "female"}, 5)]))
        set_airtime(db, "test", "sdg1662", "GHS", "2.00", "50.00")
    box = NumberBox(settings.encryption_key)
    events = []
    for name, respondent in (("real", real), ("sim", sim)):
        for e in interview_events(channel, name, "ashanti", "female", "completed",
                                  box.seal("+233240000001")):
            events.append({**e, "r": respondent})
    write_events(engine, events)

    entry = campaign_status(engine, SessionStore(redis_client))["campaigns"][0]
    assert entry["interviews_started"] == entry["interviews_completed"] == 1
    assert entry["answers_stored"] == 2
    with Session(engine) as db:
        campaign = db.scalar(select(Campaign))
        assert campaign is not None
        from gateway.interview.quota import Quota

        quota = Quota.decode(campaign.quotas)
        assert quota is not None
        assert sum(counts(engine, campaign.id, quota).values()) == 1
        payments = db.scalars(select(AirtimePayment.respondent)).all()
    assert payments == [real]
    assert int(fetch_patterns(engine, channel.campaign_id).count.sum()) == 1
    write_microdata(engine, channel.campaign_id, tmp_path / "m.csv")
    text = (tmp_path / "m.csv").read_text()
    assert real in text and sim not in text


# -- settings, channels, opt-outs, live fieldwork ------------------------------------------

def test_settings_are_saved_all_or_nothing(client: FlaskClient, engine: Engine,
                                           tokens: dict[str, str]) -> None:  # noqa: F811
    signed_in_client(client, tokens["coordinator"])
    csrf = csrf_of(client.get("/dashboard/campaigns/sdg1662/settings").get_data(as_text=True))
    good = {"csrf": csrf, "languages": "en", "reminder_hours": "6", "reminder_max": "3",
            "budget_seconds": "100", "budget_screens": "12", "airtime": "on",
            "airtime_currency": "GHS", "airtime_amount": "2.00", "airtime_budget": "100.00",
            "opens_at": "2026-03-01T08:00", "closes_at": ""}
    assert client.post("/dashboard/campaigns/sdg1662/settings", data=good).status_code == 303
    with Session(engine) as db:
        c = db.scalar(select(Campaign).where(Campaign.slug == "sdg1662"))
        assert c is not None
        assert (c.languages, c.reminder_hours, c.reminder_max, c.budget_seconds,
                c.budget_screens, c.airtime_amount) == ("English (en)", 6, 3, 100, 12, 200)
    bad = {**good, "reminder_hours": "2", "airtime_budget": "1.00"}  # budget < one payment
    resp = client.post("/dashboard/campaigns/sdg1662/settings", data=bad)
    assert resp.status_code == 422
    assert "smaller than one payment" in resp.get_data(as_text=True)
    with Session(engine) as db:
        assert db.scalar(select(Campaign.reminder_hours).where(Campaign.slug == "sdg1662")) == 6


def test_bind_and_unbind_a_channel(client: FlaskClient, engine: Engine,
                                   tokens: dict[str, str]) -> None:  # noqa: F811
    signed_in_client(client, tokens["coordinator"])
    csrf = csrf_of(client.get("/dashboard/campaigns/sdg1662/channels").get_data(as_text=True))
    resp = client.post("/dashboard/campaigns/sdg1662/channels", data={
        "csrf": csrf, "provider": "twilio", "kind": "ussd", "address": "*1#"})
    assert resp.status_code == 422 and "twilio has no ussd channel" in resp.get_data(
        as_text=True)
    resp = client.post("/dashboard/campaigns/sdg1662/channels", data={
        "csrf": csrf, "provider": "twilio", "kind": "sms", "address": "+15005550006",
        "config": '{"account_sid": "AC1", "auth_token": "secret-token", "from": "+1500"}'})
    assert resp.status_code == 303
    html = client.get("/dashboard/campaigns/sdg1662/channels").get_data(as_text=True)
    assert "/webhooks/twilio/" in html and "secret-token" not in html
    with Session(engine) as db:
        tw = db.scalar(select(Channel).where(Channel.provider == "twilio"))
        assert tw is not None
        tw_id, key = tw.id, tw.key
        entry = db.scalar(select(AuditEntry).where(AuditEntry.action == "channel.add"))
        assert entry is not None and "secret-token" not in entry.after
    assert client.post(f"/dashboard/campaigns/sdg1662/channels/{tw_id}/unbind",
                       data={"csrf": csrf}).status_code == 303
    html = client.get("/dashboard/campaigns/sdg1662/channels").get_data(as_text=True)
    assert key not in html  # no URL of an unbound channel is shown
    unbound = html[html.index(f'class="channel unbound" data-channel="{tw_id}"'):]
    assert "answer 410 Gone" in unbound[:unbound.index("</section>")]
    assert client.post(f"/webhooks/twilio/{key}/sms", data="Body=hi",
                       content_type="application/x-www-form-urlencoded").status_code == 410
    resp = client.post(f"/dashboard/campaigns/sdg1662/channels/{tw_id}/unbind",
                       data={"csrf": csrf})
    assert resp.status_code == 409 and "already unbound" in resp.get_data(as_text=True)
    overview = client.get("/dashboard/campaigns/sdg1662").get_data(as_text=True)
    assert "was unbound" in overview
    assert '0 queued or held message(s) stopped, "channel unbound"' in overview
    # The same number binds again: a new channel with a new key.
    assert client.post("/dashboard/campaigns/sdg1662/channels", data={
        "csrf": csrf, "provider": "twilio", "kind": "sms", "address": "+15005550006",
        "config": '{"account_sid": "AC1", "auth_token": "secret-token"}'}).status_code == 303
    with Session(engine) as db:
        rows = db.scalars(select(Channel).where(Channel.provider == "twilio")).all()
        assert [(r.id == tw_id, r.unbound_at is None) for r in rows] == [(True, False),
                                                                         (False, True)]


def test_binding_an_android_phone_sets_it_up_or_leaves_nothing(
        client: FlaskClient, engine: Engine, settings: Any,
        tokens: dict[str, str]) -> None:  # noqa: F811
    """The console binds an SMS Gateway for Android phone as `channels add` does: the
    phone is checked and its four webhooks point at the new channel; a phone that cannot
    be reached, or a SIM number that is no number, is refused with why and no channel."""
    from fake_android import fake_phone

    signed_in_client(client, tokens["coordinator"])
    page = "/dashboard/campaigns/sdg1662/channels"
    csrf = csrf_of(client.get(page).get_data(as_text=True))
    with fake_phone(signing_key="k" * 32) as ph:
        form = {"csrf": csrf, "provider": "android", "kind": "sms", "address": "024 111 2233",
                "config": json.dumps(ph.channel_config())}
        for bad, why in ((dict(address="not a number"), "the phone&#39;s SIM number"),
                         (dict(config=json.dumps({**ph.channel_config(),
                                                  "url": "http://127.0.0.1:9"})),
                          "cannot reach the phone")):
            resp = client.post(page, data={**form, **bad})
            assert resp.status_code == 422 and why in resp.get_data(as_text=True), bad
        assert ph.webhooks == {}
        with Session(engine) as db:
            assert db.scalar(select(func.count()).select_from(Channel).where(
                Channel.provider == "android")) == 0
        # Without `up` having served this data dir, the browser's host is all there is,
        # and the standard app refuses an http URL other than 127.0.0.1's: it says so.
        resp = client.post(page, data=form)
        assert resp.status_code == 422, resp.get_data(as_text=True)
        assert "refused the webhook URL http://localhost/" in resp.get_data(as_text=True)
        assert ph.webhooks == {}
        settings.served_url_file.write_text("http://127.0.0.1:8000\n")  # as `up` writes it
        assert client.post(page, data=form).status_code == 303
        with Session(engine) as db:
            ch = db.scalar(select(Channel).where(Channel.provider == "android"))
            assert ch is not None and ch.address == "+233241112233"
        assert sorted(h["event"] for h in ph.webhooks.values()) == [
            "sms:delivered", "sms:failed", "sms:received", "sms:sent"]
        assert {h["url"] for h in ph.webhooks.values()} == {
            f"http://127.0.0.1:8000/webhooks/android/{ch.key}/events"}


def test_opt_out_from_the_contact_list(client: FlaskClient, engine: Engine,
                                       redis_client: redis.Redis, settings: Any,
                                       tokens: dict[str, str]) -> None:  # noqa: F811
    from gateway.coordination.contacts import import_contacts
    from gateway.store.crypto import NumberBox

    with Session(engine) as db:
        campaign_id = db.scalar(select(Campaign.id))
    import_contacts(engine, campaign_id, CONTACTS.encode(), pseudonym_key=settings.pseudonym_key,
                    box=NumberBox(settings.encryption_key))
    viewer = signed_in_client(client, tokens["viewer"])
    html = viewer.get("/dashboard/campaigns/sdg1662/contacts").get_data(as_text=True)
    # No number at all (a '+', as numbers are shown: random tokens on the page may hold
    # '233' followed by digits).
    assert "Kumasi" in html and not re.search(r"\+233\s?\d{2}", html)
    assert "24123" not in html
    coordinator = signed_in_client(app_client := client.application.test_client(),
                                   tokens["coordinator"])
    html = coordinator.get("/dashboard/campaigns/sdg1662/contacts?q=volta").get_data(
        as_text=True)
    assert "Volta" in html and "Kumasi" not in html and "+23324***4003" in html
    contact_id = re.search(r"/contacts/(\d+)/opt-out", html).group(1)  # type: ignore[union-attr]
    assert coordinator.post(f"/dashboard/campaigns/sdg1662/contacts/{contact_id}/opt-out",
                            data={"csrf": csrf_of(html)}).status_code == 303
    html = app_client.get("/dashboard/campaigns/sdg1662/contacts?q=volta").get_data(
        as_text=True)
    assert "<td data-label=\"Opted out\">yes</td>" in html


def test_fieldwork_updates_without_a_reload(page: Page, engine: Engine, channel: Channel,
                                            tokens: dict[str, str]) -> None:  # noqa: F811
    from test_dashboard import interview_events

    from workers.persist import write_events

    sign_in(page, tokens["viewer"])
    page.goto("/dashboard/campaigns/sdg1662/fieldwork")
    expect(page.locator("#fw-completed")).to_have_text("0")
    page.evaluate("window.notReloaded = true")
    write_events(engine, interview_events(channel, "live", "ashanti", "male", "completed"))
    expect(page.locator("#fw-completed")).to_have_text("1", timeout=15_000)
    assert page.evaluate("window.notReloaded") is True


def test_simulator_by_sms_shows_the_queued_replies(page: Page, engine: Engine,
                                                   redis_client: redis.Redis,
                                                   tokens: dict[str, str]) -> None:  # noqa: F811
    """Africa's Talking SMS in its wire format: the replies come through the outbound
    queue; the worker marks them simulated instead of sending them."""
    with Session(engine) as db, db.begin():
        campaign_id = db.scalar(select(Campaign.id))
        db.add(Channel(key="sim-at-sms", provider="africastalking", kind="sms",
                       address="1662", campaign_id=campaign_id,
                       config=json.dumps({"username": "sandbox", "api_key": "k",
                                          "base_url": "http://127.0.0.1:9",
                                          "rate_per_second": 0})))
    sign_in(page, tokens["coordinator"])
    page.goto("/dashboard/campaigns/sdg1662/simulator")
    page.select_option("#sim-channel", label="Africa's Talking SMS 1662")
    page.fill("#sim-input", "SURVEY")
    page.get_by_role("button", name="Send").click()
    work(engine, redis_client)
    page.reload()
    expect(page.locator("#sim-texts")).to_contain_text("1")  # the language question
    expect(page.locator("#sim-texts")).to_contain_text("simulated")
    with Session(engine) as db:
        statuses = set(db.scalars(select(OutboundMessage.status)))
    assert statuses == {"simulated"}


def test_quotas_from_a_csv_then_cleared(client: FlaskClient, engine: Engine,
                                        tokens: dict[str, str]) -> None:  # noqa: F811
    import io

    signed_in_client(client, tokens["coordinator"])
    csrf = csrf_of(client.get("/dashboard/campaigns/sdg1662/settings").get_data(as_text=True))
    bad = client.post("/dashboard/campaigns/sdg1662/quotas", data={
        "csrf": csrf, "file": (io.BytesIO(b"region,colour,target\nashanti,red,5\n"), "q.csv")})
    assert bad.status_code == 422 and "colour" in bad.get_data(as_text=True)
    good = client.post("/dashboard/campaigns/sdg1662/quotas", data={
        "csrf": csrf, "file": (io.BytesIO(b"region,sex,target\nashanti,female,120\n"),
                               "q.csv")})
    assert good.status_code == 303
    html = client.get("/dashboard/campaigns/sdg1662").get_data(as_text=True)
    assert 'id="quotas"' in html and "120" in html
    assert client.post("/dashboard/campaigns/sdg1662/quotas",
                       data={"csrf": csrf, "clear": "1"}).status_code == 303
    assert "No quotas configured." in client.get("/dashboard/campaigns/sdg1662").get_data(
        as_text=True)
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.action == "campaign.quotas")) == 2


def test_simulator_by_twilio_sms_is_signed_and_shows_the_twiml_reply(
        client: FlaskClient, engine: Engine, tokens: dict[str, str]) -> None:  # noqa: F811
    """Twilio's webhook checks X-Twilio-Signature: the simulator signs as Twilio does, and
    the inline TwiML reply is shown as the text the phone receives."""
    with Session(engine) as db, db.begin():
        campaign_id = db.scalar(select(Campaign.id))
        tw = Channel(key="sim-tw-sms", provider="twilio", kind="sms", address="+15005550006",
                     campaign_id=campaign_id, config=json.dumps(
                         {"account_sid": "AC123", "auth_token": "tw-secret",
                          "from": "+15005550006"}))
        db.add(tw)
        db.flush()
        tw_id = tw.id
    signed_in_client(client, tokens["coordinator"])
    csrf = csrf_of(client.get("/dashboard/campaigns/sdg1662/simulator").get_data(as_text=True))
    resp = client.post("/dashboard/campaigns/sdg1662/simulator",
                       data={"csrf": csrf, "channel": str(tw_id), "input": "SURVEY"})
    assert resp.status_code == 303
    html = client.get("/dashboard/campaigns/sdg1662/simulator").get_data(as_text=True)
    phone = html[html.index('id="phone"'):html.index('id="sim-form"')]
    assert "English" in phone and "&lt;Response" not in phone and "HTTP 403" not in phone


# -- fieldwork: chart, part breaks, live tables ------------------------------------------

def _hop(client: FlaskClient, channel: Channel, session: str, text: str) -> str:
    """One Africa's Talking USSD hop (cumulative text) on the real webhook."""
    from urllib.parse import urlencode

    resp = client.post(f"/webhooks/africastalking/{channel.key}/ussd",
                       content_type="application/x-www-form-urlencoded",
                       data=urlencode({"sessionId": session, "serviceCode": channel.address,
                                       "phoneNumber": "+233241234567", "networkCode": "62001",
                                       "text": text}))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_data(as_text=True)


def test_part_breaks_are_counted_from_a_real_ussd_interview(
        app: Flask, client: FlaskClient, engine: Engine, channel: Channel,
        redis_client: redis.Redis, tokens: dict[str, str]) -> None:  # noqa: F811
    """A budget of 3 screens: the interview breaks after part 1 (stored from its event);
    fieldwork says 1 reached the break and 1 stopped there, then, once the citizen dials
    again and answers, 1 went on and none stopped."""
    from gateway.coordination.campaigns import set_part_budget
    from gateway.store.models import UssdPartBreak

    with Session(engine) as db, db.begin():
        set_part_budget(db, "test", "sdg1662", None, 3)
    app.extensions["civicdial"].registry.refresh()
    assert _hop(client, channel, "P1", "").startswith("CON")  # language
    _hop(client, channel, "P1", "1")  # consent
    _hop(client, channel, "P1", "1*1")  # sex
    assert _hop(client, channel, "P1", "1*1*1").startswith("END Part 1 of")
    work(engine, redis_client)
    with Session(engine) as db:
        assert [(b.part, b.channel_id) for b in db.scalars(select(UssdPartBreak))] == [
            (1, channel.id)]
    viewer = signed_in_client(app.test_client(), tokens["viewer"])
    rows = viewer.get("/dashboard/campaigns/sdg1662/fieldwork.json").get_json()["part_breaks"]
    assert rows == [{"part": "after part 1", "channel": "Africa's Talking USSD *920*16#",
                     "language": "English (en)", "reached": 1, "went_on": 0, "stopped": 1,
                     "next_part": "part 2"}]
    assert "How old" in _hop(client, channel, "P2", "")  # dials again: part 2 goes on
    _hop(client, channel, "P2", "2")
    work(engine, redis_client)
    html = viewer.get("/dashboard/campaigns/sdg1662/fieldwork").get_data(as_text=True)
    table = html[html.index('id="part-breaks"'):]
    table = table[:table.index("</table>")]
    assert re.findall(r'class="n">(\d+)<', table) == ["1", "1", "0"]  # reached, on, stopped


def test_fieldwork_tables_and_chart_update_without_a_reload(
        page: Page, engine: Engine, channel: Channel, tokens: dict[str, str]) -> None:  # noqa: F811
    """With the page open, interviews are written: the completions chart (SVG, drawn by
    the server), its table, drop-off, language, channel and quota tables all change, and
    the page was never reloaded."""
    from test_dashboard import interview_events

    from gateway.coordination.campaigns import set_quotas
    from gateway.interview.quota import define as define_quota
    from workers.persist import write_events

    with Session(engine) as db, db.begin():
        set_quotas(db, "test", "sdg1662", lambda form: define_quota(
            form, ["region", "sex"], [({"region": "ashanti", "sex": "male"}, 4)]))
    sign_in(page, tokens["viewer"])
    page.goto("/dashboard/campaigns/sdg1662/fieldwork")
    expect(page.locator("#per-day tbody")).to_have_text("None yet.")
    expect(page.locator("#dropoff tbody")).to_have_text("None.")
    expect(page.locator("#fw-quotas tbody")).to_contain_text("ashanti × male")
    assert page.locator("#per-day-chart svg g.col").count() == 0
    page.evaluate("window.notReloaded = true")
    write_events(engine, [
        *interview_events(channel, "done", "ashanti", "male", "completed"),
        *interview_events(channel, "stopped", "ashanti", "female", "started")[:-1]])
    # (the "None yet." row is one row too: wait for the day's count itself)
    expect(page.locator("#per-day tbody td").nth(1)).to_have_text("1", timeout=15_000)
    expect(page.locator("#per-day tbody tr")).to_have_count(1)
    chart = page.locator("#per-day-chart svg.chart")
    expect(chart.locator("g.col")).to_have_count(1)
    assert chart.locator("g.col").get_attribute("data-n") == "1"
    assert chart.locator("title").text_content() == "Completed interviews per day (UTC)"
    expect(page.locator("#dropoff tbody")).to_contain_text("sex")
    expect(page.locator("#by-language tbody")).to_contain_text("completed")
    expect(page.locator("#by-channel tbody")).to_contain_text("Africa's Talking USSD")
    expect(page.locator("#fw-quotas tbody td").nth(2)).to_have_text("1")  # completed
    expect(page.locator("#fw-quotas tbody td").nth(3)).to_have_text("25%")
    assert page.evaluate("window.notReloaded") is True


def test_quota_cells_are_edited_in_the_page(page: Page, engine: Engine,
                                            tokens: dict[str, str]) -> None:  # noqa: F811
    """Settings shows one input per cell (every region × sex); a changed target and a new
    cell are saved through the API's rule and shown on the Overview; a bad value is
    refused naming the cell, and nothing changes."""
    from gateway.coordination.campaigns import set_quotas
    from gateway.interview.quota import Quota
    from gateway.interview.quota import define as define_quota

    with Session(engine) as db, db.begin():
        set_quotas(db, "test", "sdg1662", lambda form: define_quota(
            form, ["region", "sex"], [({"region": "ashanti", "sex": "female"}, 120)]))
    sign_in(page, tokens["coordinator"])
    page.goto("/dashboard/campaigns/sdg1662/settings")
    from gateway.interview.questionnaire import load_questionnaire

    shipped = {q.name: len(q.choices) for q in load_questionnaire(
        SHIPPED.read_bytes(), SHIPPED.name).questions}
    cells = page.locator("#quota-cells-table tbody tr")
    assert cells.count() == shipped["region"] * shipped["sex"]  # every region × sex
    page.set_viewport_size({"width": 360, "height": 740})  # the grid fits a phone too
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    page.set_viewport_size({"width": 1280, "height": 800})
    page.get_by_label("Target for ashanti × female").fill("150")
    page.get_by_label("Target for volta × male").fill("40")
    page.get_by_role("button", name="Save the cells").click()
    expect(page).to_have_url(re.compile(r"/dashboard/campaigns/sdg1662$"))
    expect(page.locator("#quotas")).to_contain_text("150")
    expect(page.locator("#quotas")).to_contain_text("40")

    def targets() -> dict[str, int]:
        with Session(engine) as db:
            campaign = db.scalar(select(Campaign).where(Campaign.slug == "sdg1662"))
            assert campaign is not None
            quota = Quota.decode(campaign.quotas)
            assert quota is not None
            return quota.targets

    assert targets() == {"ashanti|female": 150, "volta|male": 40}
    page.goto("/dashboard/campaigns/sdg1662/settings")
    page.get_by_label("Target for volta × male").fill("forty")
    page.get_by_role("button", name="Save the cells").click()
    expect(page.locator("#refused")).to_contain_text(
        "(region=volta, sex=male): target 'forty' is not a whole number")
    assert targets() == {"ashanti|female": 150, "volta|male": 40}
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.action == "campaign.quotas",
            AuditEntry.actor == "token:coordinator person")) == 1


def test_quota_cells_refuse_a_forged_post(client: FlaskClient, engine: Engine,
                                          tokens: dict[str, str]) -> None:  # noqa: F811
    """Without this session's CSRF token, or as a viewer, the cells form changes nothing."""
    from gateway.coordination.campaigns import set_quotas
    from gateway.interview.quota import define as define_quota

    with Session(engine) as db, db.begin():
        set_quotas(db, "test", "sdg1662", lambda form: define_quota(
            form, ["sex"], [({"sex": "female"}, 5)]))
    coordinator = signed_in_client(client, tokens["coordinator"])
    assert coordinator.post("/dashboard/campaigns/sdg1662/quotas/cells",
                            data={"target:female": "9"}).status_code == 400
    viewer = signed_in_client(client.application.test_client(), tokens["viewer"])
    csrf = csrf_of(viewer.get("/dashboard/").get_data(as_text=True))
    assert viewer.post("/dashboard/campaigns/sdg1662/quotas/cells",
                       data={"csrf": csrf, "target:female": "9"}).status_code == 403
    with Session(engine) as db:
        assert '"female": 5' in (db.scalar(select(Campaign.quotas)) or "")


# -- the simulator speaks Hubtel and Arkesel -----------------------------------------------

@pytest.mark.parametrize(("provider", "address", "label", "wire"), [
    ("hubtel", "*713*20#", "Hubtel USSD *713*20#", '"Type":"response"'),
    ("arkesel", "*928*1#", "Arkesel USSD *928*1#", '"continueSession":true'),
])
def test_simulator_by_hubtel_and_arkesel_ussd(page: Page, engine: Engine,
                                              redis_client: redis.Redis,
                                              tokens: dict[str, str], provider: str,  # noqa: F811
                                              address: str, label: str, wire: str) -> None:
    """The simulated phone dials the provider's real webhook in its JSON wire format: the
    screens come back, the wire reply is shown, and the answers are stored on that
    channel under the simulator's respondent."""
    with Session(engine) as db, db.begin():
        campaign_id = db.scalar(select(Campaign.id))
        ch = Channel(key=f"sim-{provider}", provider=provider, kind="ussd", address=address,
                     campaign_id=campaign_id)
        db.add(ch)
        db.flush()
        channel_id = ch.id
    sign_in(page, tokens["coordinator"])
    page.goto("/dashboard/campaigns/sdg1662/simulator")
    page.select_option("#sim-channel", label=label)
    page.get_by_role("button", name="Send").click()  # dial
    expect(page.locator("#phone pre.screen").last).to_contain_text("Language")
    expect(page.locator("#phone details.wire").last).to_contain_text(wire)
    page.fill("#sim-input", "1")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#phone pre.screen").last).to_contain_text("Join?")
    page.fill("#sim-input", "1")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#phone pre.screen").last).to_contain_text("What is your sex?")
    work(engine, redis_client)
    page.reload()
    expect(page.locator("#sim-answers")).to_contain_text("consent")
    with Session(engine) as db:
        sim = db.scalar(select(Interview).where(Interview.respondent.startswith("sim-")))
        assert sim is not None and sim.channel_id == channel_id


@pytest.mark.parametrize("where", ["district: Kumasi", "nodistrict", "=Kumasi",
                                   "district=Kumasi\nnodistrict"])
def test_an_invitation_filter_that_is_not_field_value_is_refused(
        client: FlaskClient, engine: Engine, redis_client: redis.Redis, settings: Any,
        tokens: dict[str, str], where: str) -> None:  # noqa: F811
    """A filter line the form cannot read is refused, in the preview and at Send: left out,
    it would have widened the audience to everyone."""
    from gateway.coordination.contacts import import_contacts
    from gateway.store.crypto import NumberBox

    with Session(engine) as db:
        campaign_id = db.scalar(select(Campaign.id))
    import_contacts(engine, campaign_id, CONTACTS.encode(), pseudonym_key=settings.pseudonym_key,
                    box=NumberBox(settings.encryption_key))
    coordinator = signed_in_client(client, tokens["coordinator"])
    page = "/dashboard/campaigns/sdg1662/contacts"
    preview = coordinator.get(page, query_string={"preview": "1", "where": where})
    assert preview.status_code == 422 and "field=value" in preview.get_data(as_text=True)
    html = coordinator.get(page).get_data(as_text=True)
    sent = coordinator.post("/dashboard/campaigns/sdg1662/invitations",
                            data={"csrf": csrf_of(html), "where": where})
    assert sent.status_code == 422 and "field=value" in sent.get_data(as_text=True)
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(OutboundMessage)) == 0

