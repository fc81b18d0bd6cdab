"""`civicdial campaign create|open|pause|close|list`, `questionnaire load|list`,
`token create|list` and `audit`: the coordinator's offline tools on the server itself."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.coordination.campaigns import (
    ROLES,
    CampaignError,
    campaign_view,
    cli_actor,
    create_campaign,
    create_token,
    get_campaign,
    load_version,
    set_quotas,
    set_schedule,
    transition,
)
from gateway.interview.questionnaire import FormError, load_questionnaire
from gateway.store.models import ApiToken, AuditEntry, Campaign, QuestionnaireVersion


def _in_transaction(ctx: click.Context, work: Callable[[Session], Any]) -> Any:
    """Run `work` in one transaction on a migrated database; CampaignError -> exit 1."""
    from gateway.cli.main import _settings  # the main CLI module imports this one
    from gateway.store.db import make_engine, migrate

    engine = make_engine(_settings(ctx))
    migrate(engine)
    try:
        with Session(engine, expire_on_commit=False) as db, db.begin():
            return work(db)
    except CampaignError as exc:
        raise click.ClickException(str(exc)) from None


def _emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


@click.command("create")
@click.argument("slug")
@click.option("--name", required=True)
@click.option("--questionnaire", "version", required=True,
              help="A version loaded with `civicdial questionnaire load`.")
@click.option("--target-size", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def campaign_create(ctx: click.Context, slug: str, name: str, version: str,
                    target_size: int | None, as_json: bool) -> None:
    """Create a campaign (in draft) on a questionnaire version."""
    view = _in_transaction(ctx, lambda db: campaign_view(
        create_campaign(db, cli_actor(), slug, name, version, target_size)))
    _emit(as_json, view, f"campaign {slug} created (draft); `civicdial campaign open {slug}`")


def _transition_command(name: str, to: str) -> click.Command:
    @click.command(name)
    @click.argument("slug")
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def command(ctx: click.Context, slug: str, as_json: bool) -> None:
        view = _in_transaction(ctx, lambda db: campaign_view(
            transition(db, cli_actor(), slug, to)))
        _emit(as_json, view, f"campaign {slug} is {view['state']}")

    command.help = f"Move a campaign to {to}."
    return command


@click.command("schedule")
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
    view = _in_transaction(ctx, lambda db: campaign_view(set_schedule(
        db, cli_actor(), slug, opens_at.replace(tzinfo=UTC) if opens_at else None,
        closes_at.replace(tzinfo=UTC) if closes_at else None)))
    _emit(as_json, view, f"{slug}: opens {view['opens_at'] or 'any time'}, "
                         f"closes {view['closes_at'] or 'never'}")


@click.command("status")
@click.argument("slug")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def campaign_status_cmd(ctx: click.Context, slug: str, as_json: bool) -> None:
    """One campaign's counts (as `civicdial status`)."""
    from gateway.cli.main import _settings, campaign_status
    from gateway.store.db import make_engine, migrate
    from gateway.store.redis_conn import connect
    from gateway.store.sessions import SessionStore

    settings = _settings(ctx)
    engine = make_engine(settings)
    migrate(engine)
    report = campaign_status(engine, SessionStore(connect(settings), settings.redis_prefix))
    match = [c for c in report["campaigns"] if c["slug"] == slug]
    if not match:
        raise click.ClickException(f"no campaign {slug!r}")
    c = match[0]
    target = f" of {c['target_size']}" if c.get("target_size") else ""
    lines = [f"{slug} ({c['state']}): {c['interviews_started']} started, "
             f"{c['interviews_completed']}{target} completed, {c['declined']} declined, "
             f"{c['screened_out']} screened out by quotas, "
             f"{c['answers_stored']} answers stored, {c['events_waiting']} waiting"]
    airtime = c.get("airtime")
    if airtime:
        paid = airtime["payments"]
        lines.append(f"airtime {'on' if airtime['enabled'] else 'off'}: {airtime['amount']} "
                     f"per completed interview, {airtime['spent']} paid of "
                     f"{airtime['budget']} budget ({paid['sent']} sent, {paid['pending']} "
                     f"pending, {paid['failed']} failed, {paid['unknown']} unknown, "
                     f"{paid['skipped_over_budget']} over budget)")
    if c.get("quotas"):
        lines += ["", quota_table(c["quotas"])]
    _emit(as_json, c, "\n".join(lines))


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


@click.group("quota")
def quota() -> None:
    """Quotas per cell (e.g. region x sex): set from a CSV, show fill, clear."""


def _replace_quotas(ctx: click.Context, slug: str,
                    define: Callable[[Any], Any] | None) -> dict[str, Any]:
    """Set or clear the quotas, then tell the running webhooks at once (the worker would
    within a minute)."""
    from gateway.cli.main import _settings
    from gateway.coordination.quotas import refresh
    from gateway.store.db import make_engine
    from gateway.store.redis_conn import connect

    campaign = _in_transaction(ctx, lambda db: set_quotas(db, cli_actor(), slug, define))
    settings = _settings(ctx)
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
    from gateway.coordination.quotas import read_csv

    data = path.read_bytes()
    view = _replace_quotas(ctx, slug, lambda form: read_csv(data, form))
    quotas = view["quotas"]
    _emit(as_json, view, f"{slug}: {len(quotas['targets'])} quota cells on "
                         f"{' x '.join(quotas['on'])}; `civicdial campaign quota show {slug}`")


@quota.command("clear")
@click.argument("slug")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def quota_clear(ctx: click.Context, slug: str, as_json: bool) -> None:
    """Remove a campaign's quotas: nobody is screened out any more."""
    view = _replace_quotas(ctx, slug, None)
    _emit(as_json, view, f"{slug}: no quotas")


@quota.command("show")
@click.argument("slug")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def quota_show(ctx: click.Context, slug: str, as_json: bool) -> None:
    """Fill per quota cell: target, completed interviews, people turned away."""
    from gateway.cli.main import _settings
    from gateway.coordination.quotas import report
    from gateway.store.db import make_engine

    engine = make_engine(_settings(ctx))
    campaign = _in_transaction(ctx, lambda db: get_campaign(db, slug))
    data = report(engine, campaign)
    if as_json:
        _emit(True, data, "")
    else:
        click.echo(quota_table(data) if data else f"{slug} has no quotas")


@click.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def campaign_list(ctx: click.Context, as_json: bool) -> None:
    """Campaigns and their states."""
    views = _in_transaction(ctx, lambda db: [
        campaign_view(c) for c in db.scalars(select(Campaign).order_by(Campaign.id))])
    _emit(as_json, views, "\n".join(
        f"{v['slug']:<20} {v['state']:<8} {v['questionnaire_version']}  {v['name']}"
        for v in views) or "no campaigns")


@click.command("load")
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
    _, new = _in_transaction(ctx, lambda db: load_version(db, form, cli_actor()))
    info = {"version": form.version, "new": new, "title": form.title,
            "languages": [lang.key for lang in form.languages], "questions": form.asked}
    _emit(as_json, info, f"{'loaded' if new else 'already loaded'}: version {form.version}, "
                         f"{form.asked} questions, {', '.join(info['languages'])}")


@click.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def questionnaire_list(ctx: click.Context, as_json: bool) -> None:
    """Stored questionnaire versions with their languages and question count."""
    rows = _in_transaction(ctx, lambda db: [
        {"version": q.version, "title": q.title, "form_version": q.form_version,
         "languages": q.languages.split(","), "questions": q.question_count,
         "loaded_at": q.created_at.isoformat()}
        for q in db.scalars(select(QuestionnaireVersion).order_by(
            QuestionnaireVersion.created_at))])
    _emit(as_json, rows, "\n".join(
        f"{r['version']}  {r['questions']:>3} questions  {','.join(r['languages'])}  "
        f"{r['title']}" for r in rows) or "no questionnaires")


@click.group("token")
def token() -> None:
    """API tokens (stored hashed)."""


@token.command("create")
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--name", required=True, help="Who or what the token is for.")
@click.pass_context
def token_create(ctx: click.Context, role: str, name: str) -> None:
    """Create a token; it is shown once."""
    value = _in_transaction(ctx, lambda db: create_token(db, cli_actor(), name, role))
    click.echo(value)


@token.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def token_list(ctx: click.Context, as_json: bool) -> None:
    """Tokens by name and role (never the token itself)."""
    rows = _in_transaction(ctx, lambda db: [
        {"id": t.id, "name": t.name, "role": t.role, "created_at": t.created_at.isoformat(),
         "revoked": t.revoked_at is not None}
        for t in db.scalars(select(ApiToken).order_by(ApiToken.id))])
    _emit(as_json, rows, "\n".join(f"#{r['id']} {r['role']:<12} {r['name']}" for r in rows)
          or "no tokens")


@click.command("audit")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def audit_cmd(ctx: click.Context, limit: int, as_json: bool) -> None:
    """The audit log, newest first."""
    rows = _in_transaction(ctx, lambda db: [
        {"at": a.at.isoformat(), "actor": a.actor, "action": a.action, "target": a.target,
         "before": json.loads(a.before) if a.before else None,
         "after": json.loads(a.after) if a.after else None}
        for a in db.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit))])
    _emit(as_json, rows, "\n".join(
        f"{r['at'][:19]}  {r['actor']:<16} {r['action']:<20} {r['target']}" for r in rows)
        or "nothing yet")


def register(main: click.Group) -> None:
    campaign = main.commands["campaign"]
    questionnaire = main.commands["questionnaire"]
    assert isinstance(campaign, click.Group) and isinstance(questionnaire, click.Group)
    campaign.add_command(campaign_create)
    campaign.add_command(_transition_command("open", "open"))
    campaign.add_command(_transition_command("pause", "paused"))
    campaign.add_command(_transition_command("close", "closed"))
    campaign.add_command(campaign_list)
    campaign.add_command(campaign_status_cmd)
    campaign.add_command(campaign_schedule)
    campaign.add_command(quota)
    questionnaire.add_command(questionnaire_load)
    questionnaire.add_command(questionnaire_list)
    main.add_command(token)
    main.add_command(audit_cmd)
