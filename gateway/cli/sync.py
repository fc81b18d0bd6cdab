"""`civicdial sync ...`: on an edge, its sync with central (status, now, export to USB);
on central, `sync import` of a USB file."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import click

from gateway.cli.context import cannot_write, check_writable, emit, open_engine, settings_of
from gateway.store.redis_conn import connect
from workers.sync_central import SyncRefused, receive_batch
from workers.sync_edge import SyncError, export_pending, read_export, status, sync_once


@click.group()
def sync() -> None:
    """Edge sync: what waits for central, and moving it by link or USB stick."""


@sync.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """On the edge: events waiting, last success, last error, what central acknowledged."""
    report = status(open_engine(settings_of(ctx)))
    if as_json:
        emit(True, report, "")
        return
    if not report["enrolled"]:
        raise click.ClickException("this node is not an edge (civicdial edge join BUNDLE)")
    acknowledged = ", ".join(f"{n} {r}" for r, n in sorted(report["acknowledged"].items()))
    lines = [
        f"edge {report['edge']} (campaign {report['campaign']}) -> {report['central_url']}",
        f"events waiting:     {report['events_waiting']} (of {report['last_seq']} numbered)",
        f"central holds:      every event up to #{report['central_acked_seq']}",
        f"acknowledged:       {acknowledged or 'nothing yet'}",
        f"last success:       {report['last_success_at'] or 'never'}",
        _last_error(report),
        f"failures in a row:  {report['failures']}"
        + (f", next attempt {report['next_attempt_at']}" if report["next_attempt_at"] else ""),
        f"clock skew:         {report['skew_seconds']} s (central minus this node)"
        if report["skew_seconds"] is not None else "clock skew:         not measured yet",
    ]
    click.echo("\n".join(lines))


@sync.command("now")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def now_cmd(ctx: click.Context, as_json: bool) -> None:
    """On the edge: pull central's changes and push what waits, once, now."""
    settings = settings_of(ctx)
    result = sync_once(settings, open_engine(settings), connect(settings))
    emit(as_json, result, _synced(result) if result["ok"] else "")
    if not result["ok"]:
        raise click.ClickException(f"sync failed: {result['error']}")


@sync.command("export")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def export_cmd(ctx: click.Context, path: Path) -> None:
    """On the edge: write every pending batch, signed, for `sync import` on central."""
    settings = settings_of(ctx)
    check_writable(path)  # a USB stick not mounted: said before the batches are signed
    try:
        done = export_pending(settings, open_engine(settings), path)
    except SyncError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # the stick full or pulled out
        # export_pending writes PATH.part and renames it: a failed write leaves that.
        with contextlib.suppress(OSError):
            path.with_name(path.name + ".part").unlink(missing_ok=True)
        raise cannot_write(path, exc) from None
    click.echo(f"{done['events']} events in {done['batches']} signed batches written to "
               f"{path}; they stay pending here until central acknowledges them over a "
               "link (sending them again then changes nothing)")


@sync.command("import")
@click.argument("path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def import_cmd(ctx: click.Context, path: Path, as_json: bool) -> None:
    """On central: apply an edge's exported batches, through the endpoint's own checks.
    Importing a file twice changes nothing."""
    settings = settings_of(ctx)
    engine = open_engine(settings)
    client = connect(settings)
    try:
        batches = read_export(path)
    except SyncError as exc:
        raise click.ClickException(str(exc)) from None
    totals = {"accepted": 0, "duplicate": 0, "conflict": 0, "rejected": 0,
              "already_imported": 0}
    for headers, body in batches:
        try:
            result = receive_batch(engine, client, settings, headers, body, live=False)
        except SyncRefused as exc:
            if exc.replay:  # this very batch was imported (or sent) before
                totals["already_imported"] += 1
                continue
            raise click.ClickException(f"{path}: batch refused ({exc.status}): "
                                       f"{exc.reason}") from None
        for key in ("accepted", "duplicate", "conflict", "rejected"):
            totals[key] += result.counts.get(key, 0)
    if as_json:
        click.echo(json.dumps({"batches": len(batches), **totals}))
        return
    click.echo(f"{len(batches)} batches: {totals['accepted']} events accepted, "
               f"{totals['duplicate']} duplicates, {totals['conflict']} conflicts, "
               f"{totals['rejected']} rejected; {totals['already_imported']} batches were "
               "already imported")


def _last_error(report: dict[str, Any]) -> str:
    error, at, ok_at = report["last_error"], report["last_error_at"], report["last_success_at"]
    if not error:
        return "last error:         -"
    if ok_at and at and ok_at >= at:  # ISO 8601 UTC to the second: they sort as text
        return f"last error:         none since the last success (before it: {error}, {at})"
    return f"last error:         {error}" + (f" ({at})" if at else "")


def _synced(result: dict[str, Any]) -> str:
    pushed = ", ".join(f"{n} {kind}" for kind, n in sorted(result["pushed"].items()))
    return (f"synced: {result['pulled']} changes from central applied; "
            f"events sent: {pushed or 'none waiting'}")
