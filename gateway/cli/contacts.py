"""`civicdial contacts import` and `civicdial invite`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.cli.context import open_engine, settings_of
from gateway.coordination.campaigns import audit, cli_actor
from gateway.coordination.contacts import ContactFileError, count_lines, import_contacts, read_file
from gateway.coordination.invitations import Audience, InvitationError, invite
from gateway.phones import BadPhoneNumber, to_e164
from gateway.store.crypto import NumberBox
from gateway.store.models import Campaign, CampaignContact
from gateway.store.redis_conn import connect
from gateway.store.sessions import pseudonym
from workers.persist import erase_on_request


@click.group()
def contacts() -> None:
    """Contact lists."""


@contacts.command("import")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--campaign", "slug", required=True, help="Campaign to enrol the contacts in.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def contacts_import(ctx: click.Context, path: Path, slug: str, as_json: bool) -> None:
    """Import a CSV (a phone/number/msisdn column; optional language, region, any other
    columns kept as attributes). Bad rows are reported; re-importing changes nothing."""
    settings = settings_of(ctx)
    engine = open_engine(settings, with_defaults=True)
    with Session(engine) as db:
        campaign_id = db.scalar(select(Campaign.id).where(Campaign.slug == slug))
    if campaign_id is None:
        raise click.ClickException(f"no campaign {slug!r}")
    try:
        data = read_file(path)
        with click.progressbar(length=count_lines(data), label="importing",
                               file=sys.stderr) as bar:
            result = import_contacts(engine, campaign_id, data,
                                     pseudonym_key=settings.pseudonym_key,
                                     box=NumberBox(settings.encryption_key),
                                     default_region=settings.default_region,
                                     progress=bar.update)
    except ContactFileError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    with Session(engine) as db, db.begin():
        audit(db, cli_actor(), "contacts.import", slug,
              after={"file": path.name, "rows": result.rows, "imported": result.imported,
                     "rejected": len(result.rejected)})
    if as_json:
        click.echo(json.dumps(result.as_dict()))
        return
    click.echo(f"{result.rows} rows: {result.imported} imported, {result.already} already "
               f"in the campaign, {len(result.rejected)} rejected")
    for r in result.rejected[:50]:
        click.echo(f"  line {r.line}: {r.reason}")
    if len(result.rejected) > 50:
        click.echo(f"  ... and {len(result.rejected) - 50} more (use --json for all)")


@click.command("invite")
@click.argument("slug")
@click.option("--region", default="", help="Only contacts in this region.")
@click.option("--language", default="", help="Only contacts with this language.")
@click.option("--where", "where", multiple=True, metavar="FIELD=VALUE",
              help="Only contacts whose extra CSV field has this value (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most this many new invitations (e.g. a pilot batch).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def invite_cmd(ctx: click.Context, slug: str, region: str, language: str,
               where: tuple[str, ...], limit: int | None, as_json: bool) -> None:
    """Invite the campaign's contacts (or those matching the filters) by SMS. Opted-out
    contacts are skipped; inviting again queues nothing twice."""
    attributes = []
    for item in where:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r}: use FIELD=VALUE", param_hint="--where")
        attributes.append((name.strip(), value.strip()))
    audience = Audience(region, language, tuple(attributes), limit)
    settings = settings_of(ctx)
    engine = open_engine(settings, with_defaults=True)
    with Session(engine) as db:
        total = db.scalar(select(func.count()).select_from(CampaignContact).join(
            Campaign, Campaign.id == CampaignContact.campaign_id).where(Campaign.slug == slug))
    try:
        with click.progressbar(length=max(1, total or 0), label="queueing invitations",
                               file=sys.stderr) as bar:
            result = invite(engine, connect(settings), slug, progress=bar.update,
                            prefix=settings.redis_prefix, backlog=settings.outbox_backlog,
                            audience=audience)
    except InvitationError as exc:
        raise click.ClickException(str(exc)) from None
    with Session(engine) as db, db.begin():
        audit(db, cli_actor(), "campaign.invite", slug,
              after={**result.as_dict(), "audience": audience.as_dict()})
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    else:
        click.echo(f"{result.queued} invitations queued, {result.held} held until the outbox "
                   f"drains, {result.already_invited} already "
                   f"invited, {result.skipped_opted_out} skipped (opted out)")


@contacts.command("erase")
@click.argument("phone")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def contacts_erase(ctx: click.Context, phone: str, yes: bool, as_json: bool) -> None:
    """Erase a citizen who asked by letter or phone call (as their DELETE by SMS does):
    every answer in every campaign, their number and results request. Published
    snapshots are not rewritten. On an edge, central learns it at the next sync."""
    settings = settings_of(ctx)
    try:
        number = to_e164(phone, settings.default_region)
    except BadPhoneNumber as exc:
        raise click.ClickException(f"{exc} (give the number the citizen wrote from)"
                                   ) from None
    if not yes and as_json:
        # A script cannot answer the question, and silence must not mean yes: erasure
        # cannot be undone.
        raise click.UsageError("--json does not ask: add --yes to erase (it cannot be undone)")
    if not yes:
        click.confirm(f"Erase everything held about {number}?", abort=True)
    engine = open_engine(settings)
    client = connect(settings)
    held = erase_on_request(engine, client, settings.redis_prefix,
                            pseudonym(settings.pseudonym_key, number), cli_actor())
    if as_json:
        click.echo(json.dumps({"erased": True, **held}))
        return
    click.echo(f"erased: {held['interviews']} interviews, {held['answers']} answers, "
               f"{held['contacts']} contact rows")
