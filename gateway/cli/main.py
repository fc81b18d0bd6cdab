"""The `civicdial` group and the commands that run or inspect the whole node."""

from __future__ import annotations

from datetime import timedelta

import click

from gateway.cli.context import emit, open_engine, session_store, settings_of
from gateway.coordination.bootstrap import DEFAULT_CAMPAIGN, bootstrap
from gateway.coordination.retention import oldest_kept
from gateway.coordination.status import campaign_status
from gateway.store.db import make_engine, migrate
from workers.jobs import run_worker


@click.group()
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where the embedded SQLite file, Redis and keys live "
                   "[env CIVICDIAL_DATA_DIR; default ./civicdial-data].")
@click.pass_context
def main(ctx: click.Context, data_dir: str | None) -> None:
    """CivicDial: SMS/USSD survey gateway for SDG 16.6.2."""
    ctx.obj = {"data_dir": data_dir}


@main.command()
@click.option("--burst", is_flag=True, help="Drain what is waiting, then exit.")
@click.pass_context
def worker(ctx: click.Context, burst: bool) -> None:
    """Run an RQ worker that persists events to SQL (and later jobs)."""
    run_worker(settings_of(ctx), burst=burst)


@main.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Schema, shipped questionnaire, default campaign and USSD channel (idempotent)."""
    settings = settings_of(ctx, create=True)
    channel = bootstrap(make_engine(settings))
    click.echo(f"ready: campaign {DEFAULT_CAMPAIGN}, USSD {channel.address} "
               f"(`civicdial channels` shows the callback URLs)")


@main.command("migrate")
@click.pass_context
def migrate_cmd(ctx: click.Context) -> None:
    """Create or upgrade the SQL schema."""
    engine = make_engine(settings_of(ctx))
    migrate(engine)
    click.echo("schema is up to date")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Per campaign: interviews started and completed, answers in SQL, events waiting."""
    settings = settings_of(ctx)
    engine = open_engine(settings)
    report = campaign_status(engine, session_store(settings),
                             timedelta(seconds=settings.outbound_overdue_seconds))
    report["retention"] = oldest_kept(settings, engine)
    if as_json:
        emit(True, report, "")
        return
    header = f"{'campaign':<20} {'state':<8} {'started':>8} {'completed':>9} " \
             f"{'declined':>8} {'ineligible':>10} {'answers':>8} {'waiting':>8}"
    click.echo(header)
    for c in report["campaigns"]:
        click.echo(f"{c['slug']:<20} {c['state']:<8} {c['interviews_started']:>8} "
                   f"{c['interviews_completed']:>9} {c['declined']:>8} {c['ineligible']:>10} "
                   f"{c['answers_stored']:>8} {c['events_waiting']:>8}")
    for c in report["campaigns"]:
        for ch in c["channels_unbound"]:
            click.echo(f"{c['slug']}: channel #{ch['id']} {ch['provider']} {ch['kind']} "
                       f"{ch['address']} unbound {ch['unbound_at'][:16]}; "
                       f"{ch['messages_stopped']} message(s) stopped: {ch['error']}")
    click.echo(f"events waiting in the stream (all campaigns): {report['events_waiting']}")
    kept = report["retention"]
    click.echo(f"retention {kept['retention_days'] or 'off'} days: oldest contact number "
               f"{kept['oldest_contact_number'] or 'none'}, oldest message body "
               f"{kept['oldest_message_body'] or 'none'}")
