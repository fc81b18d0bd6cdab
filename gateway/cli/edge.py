"""`civicdial edge ...`: enrol edge nodes on central, join one on the edge."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.cli.context import cannot_write, check_writable, emit, open_engine, settings_of
from gateway.config import Settings
from gateway.coordination.campaigns import audit, cli_actor
from gateway.coordination.edges import (
    MIN_PASSPHRASE,
    EdgeError,
    enrol_edge,
    list_edges,
    new_edge,
    open_bundle,
    revoke_edge,
    seal_bundle,
    store_enrolment,
)
from gateway.store.models import EdgeNode
from gateway.store.redis_conn import connect
from workers.sync_central import changes_since, conflicts_of
from workers.sync_edge import SyncError, apply_changes, credentials, load_enrolment, pull


@click.group()
def edge() -> None:
    """Edge nodes: offices that collect with no internet and sync to central later."""


def _passphrase(settings: Settings, passphrase_file: Path | None, confirm: bool) -> str:
    if passphrase_file is not None:
        return passphrase_file.read_text().rstrip("\r\n")
    if settings.bundle_passphrase:
        return settings.bundle_passphrase
    return str(click.prompt("bundle passphrase", hide_input=True,
                            confirmation_prompt=confirm))


_PASSPHRASE_FILE = click.option(
    "--passphrase-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Read the passphrase from this file [else env CIVICDIAL_BUNDLE_PASSPHRASE, "
         "else asked].")


@edge.command("create")
@click.argument("name")
@click.option("--campaign", "slug", required=True, help="The campaign the edge collects for.")
@click.option("--region", default="", help="Only this region's contacts go to the edge.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="Where to write the bundle (e.g. ashanti.cdedge).")
@click.option("--central-url", default=None,
              help="Central's URL as the edge will reach it [default "
                   "CIVICDIAL_PUBLIC_BASE_URL].")
@_PASSPHRASE_FILE
@click.pass_context
def create_cmd(ctx: click.Context, name: str, slug: str, region: str, output: Path,
               central_url: str | None, passphrase_file: Path | None) -> None:
    """Enrol an edge node and write its passphrase-protected bundle."""
    settings = settings_of(ctx)
    url = central_url or settings.public_base_url
    if not url:
        raise click.ClickException("give --central-url (or set CIVICDIAL_PUBLIC_BASE_URL)")
    if output.exists():
        raise click.ClickException(f"{output} exists; not overwriting a bundle")
    check_writable(output)  # before the passphrase is asked (twice) for nothing
    passphrase = _passphrase(settings, passphrase_file, confirm=True)
    if len(passphrase) < MIN_PASSPHRASE:
        raise click.ClickException(f"the passphrase must have at least {MIN_PASSPHRASE} "
                                   "characters")
    engine = open_engine(settings)
    try:
        with Session(engine) as db:
            node, bundle = new_edge(db, settings, name, slug, region, url)
    except EdgeError as exc:
        raise click.ClickException(str(exc)) from None
    # The bundle is written before the edge is stored, and removed if storing it fails:
    # an edge stored with no bundle could never join, and would hold its name against a
    # retry. The file is made first (O_EXCL: never someone else's) so a path that cannot
    # be written is refused before the feed is read.
    try:
        fh = os.fdopen(os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
    except OSError as exc:
        raise cannot_write(output, exc) from None
    stored = False
    try:
        with fh:
            changes, cursor, more = [], 0, True
            while more:  # the edge's feed, read with the node not stored yet
                page = changes_since(engine, settings, node, cursor)
                changes += page["changes"]
                cursor, more = int(page["cursor"]), bool(page["more"])
            sealed = seal_bundle(dataclasses.replace(bundle, changes=changes, cursor=cursor),
                                 passphrase)
            try:
                fh.write(sealed)
                fh.flush()
                os.fsync(fh.fileno())  # on the disk before the edge is enrolled
            except OSError as exc:
                raise cannot_write(output, exc) from None
        with Session(engine) as db, db.begin():
            enrol_edge(db, node)
            audit(db, cli_actor(), "edge.create", name,
                  after={"campaign": slug, "region": region, "central_url": url})
        stored = True
    except EdgeError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if not stored:
            output.unlink(missing_ok=True)
    contacts = sum(1 for c in changes if c["kind"] == "contact")
    click.echo(f"edge {name} enrolled for campaign {slug}"
               f"{f' (region {region})' if region else ''}; bundle written to {output} "
               f"({contacts} contacts).\n"
               f"On the edge: civicdial --data-dir DIR edge join {output.name}\n"
               "The bundle holds the sync secret and the pseudonym key: carry it yourself, "
               "give the passphrase separately, and destroy every copy after joining.")


@edge.command("join")
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@_PASSPHRASE_FILE
@click.pass_context
def join_cmd(ctx: click.Context, bundle: Path, passphrase_file: Path | None) -> None:
    """On the edge: store the bundle's enrolment and take what central sent with it."""
    settings = settings_of(ctx)
    passphrase = _passphrase(settings, passphrase_file, confirm=False)
    engine = open_engine(settings, with_defaults=True)
    try:
        opened = open_bundle(bundle.read_bytes(), passphrase)
        store_enrolment(engine, settings, opened)
    except EdgeError as exc:
        raise click.ClickException(str(exc)) from None
    settings = settings_of(ctx)  # the pseudonym key may have just been written
    if settings.pseudonym_key != opened.pseudonym_key.encode():
        raise click.ClickException("CIVICDIAL_PSEUDONYM_KEY is set to another key than "
                                   "central's; unset it on the edge")
    enrol = load_enrolment(engine)
    assert enrol is not None
    client = connect(settings)
    if enrol.cursor < opened.cursor:
        apply_changes(settings, engine, client, credentials(settings, enrol),
                      opened.changes, opened.cursor)
    click.echo(f"joined as edge {opened.name} for campaign {opened.campaign} "
               f"(central {opened.central_url}); {len(opened.changes)} changes from the "
               "bundle applied")
    try:
        pulled = pull(settings, engine, client)
        click.echo(f"central reached: {pulled} newer changes applied")
    except SyncError as exc:
        if "is revoked" in str(exc):
            # Central will refuse everything this node collects: say so now, not after
            # a day of fieldwork.
            click.echo(f"warning: central says edge {opened.name} is revoked: nothing "
                       "collected here will be accepted. Ask central for a new bundle (`edge "
                       "create`) and join it from a fresh data dir.", err=True)
            ctx.exit(1)
        click.echo(f"central not reached now ({exc}); the worker syncs when it can")
    click.echo(f"now destroy the bundle: shred -u {bundle}")


@edge.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_cmd(ctx: click.Context, as_json: bool) -> None:
    """On central: every edge, its last contact, events received, lag and conflicts."""
    rows = list_edges(open_engine(settings_of(ctx)))
    if as_json:
        emit(True, {"edges": rows}, "")
        return
    click.echo(f"{'edge':<16} {'campaign':<12} {'state':<8} {'last contact':<26} "
               f"{'received':>9} {'acked':>7} {'lag':>6} {'conflicts':>9}")
    for e in rows:
        click.echo(f"{e['name']:<16} {e['campaign'] or '-':<12} {e['state']:<8} "
                   f"{e['last_contact_at'] or 'never':<26} {e['events_received']:>9} "
                   f"{e['acked_seq']:>7} {e['lag_events']:>6} {e['conflicts']:>9}")


@edge.command("revoke")
@click.argument("name")
@click.pass_context
def revoke_cmd(ctx: click.Context, name: str) -> None:
    """On central: refuse everything from this edge from now on (403)."""
    engine = open_engine(settings_of(ctx))
    try:
        with Session(engine) as db, db.begin():
            revoke_edge(db, name)
            audit(db, cli_actor(), "edge.revoke", name)
    except EdgeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"edge {name} revoked: its requests now get 403")


@edge.command("conflicts")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def conflicts_cmd(ctx: click.Context, name: str, as_json: bool) -> None:
    """On central: events an edge sent twice with different content (never applied)."""
    engine = open_engine(settings_of(ctx))
    with Session(engine) as db:
        edge_id = db.scalar(select(EdgeNode.id).where(EdgeNode.name == name))
    if edge_id is None:
        raise click.ClickException(f"no edge named {name!r}")
    rows = conflicts_of(engine, edge_id)
    emit(as_json, {"edge": name, "conflicts": rows},
         "\n".join(f"{c['at']} seq {c['seq']} {c['event_id']}" for c in rows)
         or "no conflicts")
