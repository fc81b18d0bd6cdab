"""`civicdial campaign create|open|pause|close|list`, `questionnaire load|list`,
`token create|list` and `audit`: the coordinator's offline tools on the server itself."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.cli.context import emit, in_transaction, open_engine, session_store, settings_of
from gateway.coordination.campaigns import (
    ROLES,
    CampaignError,
    audit,
    campaign_view,
    check_name,
    cli_actor,
    create_campaign,
    create_token,
    get_campaign,
    hash_token,
    load_version,
    set_airtime,
    set_languages,
    set_quotas,
    set_reminders,
    set_schedule,
    set_version,
    transition,
)
from gateway.coordination.quotas import refresh, report
from gateway.coordination.signin import revoke_tokens
from gateway.coordination.status import campaign_status
from gateway.interview.messages import CONFIRM_WORDS, KEYWORDS
from gateway.interview.questionnaire import FormError, load_questionnaire
from gateway.interview.quota import read_csv
from gateway.store.db import MAX_INT, make_engine
from gateway.store.models import ApiToken, AuditEntry, Campaign, QuestionnaireVersion
from gateway.store.redis_conn import connect


@click.group()
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
    settings = settings_of(ctx)
    engine = open_engine(settings)
    actor = cli_actor()
    try:
        with Session(engine, expire_on_commit=False) as db, db.begin():
            row = get_campaign(db, slug)
            before = campaign_view(row)
            if sms_keyword is not None:
                row.sms_keyword = _keyword(sms_keyword)
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


def _name(ctx: click.Context, param: click.Parameter, given: str) -> str:
    """--name as create_campaign takes it, refused as a usage error before any work."""
    try:
        check_name(given)
    except CampaignError as exc:
        raise click.BadParameter(str(exc)) from None
    return given


@campaign.command("create")
@click.argument("slug")
@click.option("--name", required=True, callback=_name, help="At most 300 characters.")
@click.option("--questionnaire", "version", required=True,
              help="A version loaded with `civicdial questionnaire load`.")
# The column is an SQL INTEGER, as the API bounds it: beyond it the driver raised
# OverflowError, a traceback, instead of a refusal.
@click.option("--target-size", type=click.IntRange(1, MAX_INT), default=None,
              help="Completed interviews wanted.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def campaign_create(ctx: click.Context, slug: str, name: str, version: str,
                    target_size: int | None, as_json: bool) -> None:
    """Create a campaign (in draft) on a questionnaire version."""
    view = in_transaction(ctx, lambda db: campaign_view(
        create_campaign(db, cli_actor(), slug, name, version, target_size)))
    emit(as_json, view, f"campaign {slug} created (draft); `civicdial campaign open {slug}`")


def _transition_command(name: str, to: str) -> click.Command:
    @click.command(name)
    @click.argument("slug")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def command(ctx: click.Context, slug: str, as_json: bool) -> None:
        view = in_transaction(ctx, lambda db: campaign_view(
            transition(db, cli_actor(), slug, to)))
        emit(as_json, view, f"campaign {slug} is {view['state']}")

    command.help = f"Move a campaign to {to}."
    return command


@campaign.command("schedule")
@click.argument("slug")
@click.option("--opens-at", type=click.DateTime(), default=None,
              help="UTC, e.g. 2027-01-15T08:00:00 (default: no start limit).")
@click.option("--closes-at", type=click.DateTime(), default=None,
              help="UTC (default: no end limit).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def campaign_schedule(ctx: click.Context, slug: str, opens_at: datetime | None,
                      closes_at: datetime | None, as_json: bool) -> None:
    """Limit when an open campaign answers (both limits optional; omit both to clear)."""
    view = in_transaction(ctx, lambda db: campaign_view(set_schedule(
        db, cli_actor(), slug, opens_at.replace(tzinfo=UTC) if opens_at else None,
        closes_at.replace(tzinfo=UTC) if closes_at else None)))
    emit(as_json, view, f"{slug}: opens {view['opens_at'] or 'any time'}, "
                         f"closes {view['closes_at'] or 'never'}")


@campaign.command("status")
@click.argument("slug")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def campaign_status_cmd(ctx: click.Context, slug: str, as_json: bool) -> None:
    """One campaign's counts (as `civicdial status`)."""
    settings = settings_of(ctx)
    report = campaign_status(open_engine(settings), session_store(settings),
                             timedelta(seconds=settings.outbound_overdue_seconds))
    match = [c for c in report["campaigns"] if c["slug"] == slug]
    if not match:
        raise click.ClickException(f"no campaign {slug!r}")
    c = match[0]
    target = f" of {c['target_size']}" if c.get("target_size") else ""
    lines = [f"{slug} ({c['state']}): {c['interviews_started']} started, "
             f"{c['interviews_completed']}{target} completed, {c['declined']} declined, "
             f"{c['screened_out'] - c['ineligible']} screened out by quotas, "
             f"{c['ineligible']} ineligible (under 18), "
             f"{c['withdrawn']} withdrawn, {c['erased']} erased on request, "
             f"{c['answers_stored']} answers stored, {c['events_waiting']} waiting"]
    sms = c.get("outbound_by_status") or {}
    lines.append("outbound SMS: " + (", ".join(f"{n} {status}"
                                               for status, n in sorted(sms.items()))
                                     if sms else "none"))
    airtime = c.get("airtime")
    if airtime:
        paid = airtime["payments"]
        lines.append(f"airtime {'on' if airtime['enabled'] else 'off'}: {airtime['amount']} "
                     f"per completed interview, {airtime['spent']} paid of "
                     f"{airtime['budget']} budget ({paid['sent']} sent, {paid['pending']} "
                     f"pending, {paid['failed']} failed, {paid['unknown']} unknown, "
                     f"{paid['skipped_over_budget']} over budget)")
    overdue = c["outbound_overdue"]
    if overdue["count"]:
        lines.append(f"{overdue['count']} outbound messages overdue (queued over "
                     f"{overdue['after_seconds'] // 60} min past due; oldest due "
                     f"{overdue['oldest_due_at']})")
    if c.get("quotas"):
        lines += ["", quota_table(c["quotas"])]
    emit(as_json, c, "\n".join(lines))


def quota_table(report: dict[str, Any]) -> str:
    """Fill per quota cell, as a plain-text table."""
    on = report["on"]
    rows = [[*[cell["cell"][name] for name in on], str(cell["target"]), str(cell["completed"]),
             f"{100 * cell['completed'] / cell['target']:.0f}%" if cell["target"] else "-",
             "FULL" if cell["full"] else "", str(cell["screened_out"])]
            for cell in report["cells"]]
    header = [*on, "target", "completed", "fill", "", "screened out"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


@campaign.group("quota")
def quota() -> None:
    """Quotas per cell (e.g. region x sex): set from a CSV, show fill, clear."""


def _replace_quotas(ctx: click.Context, slug: str,
                    define: Callable[[Any], Any] | None) -> dict[str, Any]:
    """Set or clear the quotas, then tell the running webhooks at once (the worker would
    within a minute)."""
    campaign = in_transaction(ctx, lambda db: set_quotas(db, cli_actor(), slug, define))
    settings = settings_of(ctx)
    refresh(make_engine(settings), connect(settings), settings.redis_prefix, [campaign.id])
    return campaign_view(campaign)


@quota.command("set")
@click.argument("slug")
@click.argument("path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def quota_set(ctx: click.Context, slug: str, path: Path, as_json: bool) -> None:
    """Set a campaign's quotas from a CSV: one column per quota question (choice names as
    values), then `target`, e.g.

    \b
        region,sex,target
        ashanti,female,120
        ashanti,male,110
    """
    data = path.read_bytes()
    view = _replace_quotas(ctx, slug, lambda form: read_csv(data, form))
    quotas = view["quotas"]
    emit(as_json, view, f"{slug}: {len(quotas['targets'])} quota cells on "
                         f"{' x '.join(quotas['on'])}; `civicdial campaign quota show {slug}`")


@quota.command("clear")
@click.argument("slug")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def quota_clear(ctx: click.Context, slug: str, as_json: bool) -> None:
    """Remove a campaign's quotas: nobody is screened out any more."""
    view = _replace_quotas(ctx, slug, None)
    emit(as_json, view, f"{slug}: no quotas")


@quota.command("show")
@click.argument("slug")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def quota_show(ctx: click.Context, slug: str, as_json: bool) -> None:
    """Fill per quota cell: target, completed interviews, people turned away."""
    engine = make_engine(settings_of(ctx))
    campaign = in_transaction(ctx, lambda db: get_campaign(db, slug))
    data = report(engine, campaign)
    if as_json:
        emit(True, data, "")
    else:
        click.echo(quota_table(data) if data else f"{slug} has no quotas")


@campaign.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def campaign_list(ctx: click.Context, as_json: bool) -> None:
    """Campaigns and their states."""
    views = in_transaction(ctx, lambda db: [
        campaign_view(c) for c in db.scalars(select(Campaign).order_by(Campaign.id))])
    emit(as_json, views, "\n".join(
        f"{v['slug']:<20} {v['state']:<8} {v['questionnaire_version']}  {v['name']}"
        for v in views) or "no campaigns")


@click.group()
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


@questionnaire.command("load")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def questionnaire_load(ctx: click.Context, path: Path, as_json: bool) -> None:
    """Validate an XLSForm and store it as an immutable version."""
    try:
        form = load_questionnaire(path.read_bytes(), path.name)
    except FormError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None
    _, new = in_transaction(ctx, lambda db: load_version(db, form, cli_actor()))
    info = {"version": form.version, "new": new, "title": form.title,
            "languages": [lang.key for lang in form.languages], "questions": form.asked}
    emit(as_json, info, f"{'loaded' if new else 'already loaded'}: version {form.version}, "
                         f"{form.asked} questions, {', '.join(info['languages'])}")


@questionnaire.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def questionnaire_list(ctx: click.Context, as_json: bool) -> None:
    """Stored questionnaire versions with their languages and question count."""
    rows = in_transaction(ctx, lambda db: [
        {"version": q.version, "title": q.title, "form_version": q.form_version,
         "languages": q.languages.split(","), "questions": q.question_count,
         "loaded_at": q.created_at.isoformat()}
        for q in db.scalars(select(QuestionnaireVersion).order_by(
            QuestionnaireVersion.created_at))])
    emit(as_json, rows, "\n".join(
        f"{r['version']}  {r['questions']:>3} questions  {','.join(r['languages'])}  "
        f"{r['title']}" for r in rows) or "no questionnaires")


@click.group("token")
def token() -> None:
    """API tokens (stored hashed)."""


@token.command("create")
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--name", required=True, help="Who or what the token is for.")
@click.option("--json", "as_json", is_flag=True,
              help='{"id", "name", "role", "token"} instead of the token alone.')
@click.pass_context
def token_create(ctx: click.Context, role: str, name: str, as_json: bool) -> None:
    """Create a token; it is shown once."""

    def create(db: Session) -> dict[str, Any]:
        value = create_token(db, cli_actor(), name, role)
        db.flush()
        made = db.scalar(select(ApiToken.id).where(ApiToken.token_hash == hash_token(value)))
        return {"id": made, "name": name, "role": role, "token": value}

    made = in_transaction(ctx, create)
    emit(as_json, made, made["token"])


@token.command("revoke")
@click.argument("ref", metavar="NAME")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def token_revoke(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Revoke the tokens named NAME (or '#ID' for one of them), and sign out every console
    session opened with them (the API refuses them at once, browsers at the next click)."""
    done = in_transaction(ctx, lambda db: revoke_tokens(db, cli_actor(), ref))
    view = {"revoked": [{"id": i, "name": n, "role": r} for i, n, r in done.tokens],
            "sessions_ended": done.sessions}
    if not done.tokens:
        if as_json:
            click.echo(json.dumps(view))
            ctx.exit(1)
        raise click.ClickException(f"no unrevoked token {ref!r} (`civicdial token list`)")
    emit(as_json, view, "\n".join(
        f"revoked #{i} {r:<12} {n}" for i, n, r in done.tokens)
        + f"\n{done.sessions} console session(s) signed out")


@token.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def token_list(ctx: click.Context, as_json: bool) -> None:
    """Tokens by name and role (never the token itself)."""
    rows = in_transaction(ctx, lambda db: [
        {"id": t.id, "name": t.name, "role": t.role, "created_at": t.created_at.isoformat(),
         "revoked": t.revoked_at is not None}
        for t in db.scalars(select(ApiToken).order_by(ApiToken.id))])
    emit(as_json, rows, "\n".join(f"#{r['id']} {r['role']:<12} {r['name']}" for r in rows)
          or "no tokens")


@click.command("audit")
@click.option("--limit", type=click.IntRange(1, MAX_INT), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def audit_cmd(ctx: click.Context, limit: int, as_json: bool) -> None:
    """The audit log, newest first."""
    rows = in_transaction(ctx, lambda db: [
        {"at": a.at.isoformat(), "actor": a.actor, "action": a.action, "target": a.target,
         "before": json.loads(a.before) if a.before else None,
         "after": json.loads(a.after) if a.after else None}
        for a in db.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit))])
    emit(as_json, rows, "\n".join(
        f"{r['at'][:19]}  {r['actor']:<16} {r['action']:<20} {r['target']}" for r in rows)
        or "nothing yet")


for _name, _to in (("open", "open"), ("pause", "paused"), ("close", "closed")):
    campaign.add_command(_transition_command(_name, _to))


def _keyword(given: str) -> str:
    """The SMS keyword that starts the survey: one word, not one of the words that do
    something else at any point (STOP would start the survey instead of opting out)."""
    word = given.strip().upper()
    if not word or " " in word or len(word) > 40:
        raise click.BadParameter("one word of at most 40 letters", param_hint="--sms-keyword")
    for command, words in KEYWORDS.items():
        if command != "start" and word in words:
            raise click.BadParameter(f"{word} is the word for {command!r} (citizens text it "
                                     "at any point); choose another", param_hint="--sms-keyword")
    if word in CONFIRM_WORDS:
        raise click.BadParameter(f"{word} confirms an erasure; choose another",
                                 param_hint="--sms-keyword")
    return word

