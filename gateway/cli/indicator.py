"""`civicdial tally | export | publish`: the 16.6.2 indicator from the command line.

Registered on the `civicdial` group by one line at the end of gateway/cli.py. This module
does not import gateway.cli.main (which imports it), so either can be imported first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
from rq import Queue

from gateway.cli.context import check_writable, emit, open_engine, output_file, settings_of
from gateway.config import Settings
from gateway.indicator.estimates import Margins, MarginsError, Params, margins_text, read_margins
from gateway.indicator.exports import (
    DEFAULT_DATAFLOW,
    DEFAULT_SERIES_PREFIX,
    write_csv,
    write_microdata,
    write_sdmx,
    write_xlsx,
)
from gateway.indicator.tally import (
    NoSnapshot,
    campaign_by_slug,
    default_margins,
    publish,
    run_tally,
    snapshot_of,
)
from gateway.store.db import MAX_INT
from gateway.store.models import Campaign
from gateway.store.redis_conn import connect
from workers.jobs import QUEUE
from workers.tally_job import enqueue_tally


def _campaign(settings: Settings, slug: str):  # type: ignore[no-untyped-def]
    engine = open_engine(settings)
    campaign: Campaign | None = campaign_by_slug(engine, slug)
    if campaign is None:
        raise click.ClickException(f"no campaign {slug!r}")
    return engine, campaign


def _margins(path: Path) -> Margins:
    """The --margins file, or one line naming the file, the line and the column of what is
    wrong: a bad file must stop the tally before it stores a snapshot raked to it."""
    try:
        return read_margins(margins_text(path.read_bytes()))
    except MarginsError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from None


# A snapshot version is an SQL INTEGER: a larger number is no version (and the driver
# would raise OverflowError on it rather than find nothing).
_VERSION = click.IntRange(1, MAX_INT)


class _Threshold(click.ParamType):
    """A finite number >= 0: NaN would compare false with every n and so suppress nothing."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or not 0 <= number <= MAX_INT:
            self.fail(f"{value!r} is not a number from 0 to {MAX_INT}", param, ctx)
        return number


def _trim(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if value != 0 and value < 1:
        raise click.BadParameter("0 (no trimming) or a multiple of the mean weight of at "
                                 f"least 1, not {value:g}")
    return value


# More replicates than this add nothing to a 95% interval but memory (replicates x
# interviews floats) and time.
MAX_REPLICATES = 2000


@click.command("tally")
@click.argument("campaign")
@click.option("--margins", "margins_file", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Census margins CSV for this campaign "
                                 "[default: the shipped Ghana 2021 PHC margins].")
@click.option("--min-n", default=Params.min_n, show_default=True,
              type=click.IntRange(0, MAX_INT), help="Suppress cells with fewer valid answers.")
@click.option("--min-neff", default=Params.min_neff, show_default=True, type=_Threshold(),
              help="Suppress cells with a smaller effective n.")
@click.option("--flag-neff", default=Params.flag_neff, show_default=True, type=_Threshold(),
              help="Flag cells with a smaller effective n.")
@click.option("--trim", "cap_ratio", default=Params.cap_ratio, show_default=True,
              type=_Threshold(), callback=_trim,
              help="Trim weights at this multiple of the mean (0: no trimming).")
@click.option("--replicates", default=Params.replicates, show_default=True,
              type=click.IntRange(0, MAX_REPLICATES),
              help="Bootstrap replicates for the attribute index CI.")
@click.option("--seed", default=Params.seed, show_default=True,
              type=click.IntRange(0, 2**32 - 1), help="Bootstrap seed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--background", is_flag=True,
              help="Enqueue the tally for `civicdial worker` instead of running it here.")
@click.pass_context
def tally_cmd(ctx: click.Context, campaign: str, margins_file: str | None, min_n: int,
              min_neff: float, flag_neff: float, cap_ratio: float, replicates: int,
              seed: int, as_json: bool, background: bool) -> None:
    """Tally SDG 16.6.2 for a campaign into a new snapshot."""
    settings = settings_of(ctx)
    engine, camp = _campaign(settings, campaign)
    margins = _margins(Path(margins_file)) if margins_file else default_margins()
    params = Params(min_n=min_n, min_neff=min_neff, flag_neff=flag_neff, cap_ratio=cap_ratio,
                    replicates=replicates, seed=seed)
    if background:
        job_id = enqueue_tally(Queue(QUEUE, connection=connect(settings)), camp.id,
                               margins.text, params.as_dict())
        click.echo(json.dumps({"job_id": job_id}) if as_json else f"queued tally job {job_id}")
        return
    snap = run_tally(engine, camp.id, margins, params)
    result = json.loads(snap.result)
    if as_json:
        click.echo(json.dumps({"campaign": camp.slug, "snapshot_id": snap.id,
                               "version": snap.version, "n_interviews": snap.n_interviews,
                               "n_completed": snap.n_completed,
                               "questionnaire_versions": snap.questionnaire_versions,
                               "margins_sha256": snap.margins_sha256, **result}, indent=2))
        return
    click.echo(f"{camp.slug}: snapshot v{snap.version}, {snap.n_interviews} interviews "
               f"({snap.n_completed} completed). Experimental citizen data.")
    w = result["weighting"]
    ratio = w.get("max_weight_ratio")
    click.echo(f"weighting: {w.get('method')}, converged={w.get('converged')}, "
               f"max weight/mean={'-' if ratio is None else f'{ratio:.2f}'}")
    click.echo(f"{'area':<10} {'measure':<10} {'%':>6} {'95% CI':>13} {'n':>6} "
               f"{'n_eff':>7} {'deff':>5} status")
    for c in result["cells"]:
        if c["breakdown"] != "total":
            continue
        est = "" if c["estimate"] is None else f"{c['estimate'] * 100:.1f}"
        ci = ("" if c["ci_low"] is None
              else f"{c['ci_low'] * 100:.1f}-{c['ci_high'] * 100:.1f}")
        neff = "" if c["n_eff"] is None else f"{c['n_eff']:.1f}"
        deff = "" if c["deff"] is None else f"{c['deff']:.2f}"
        click.echo(f"{c['area']:<10} {c['measure']:<10} {est:>6} {ci:>13} {c['n']:>6} "
                   f"{neff:>7} {deff:>5} {c['status']}")
    for note in result["notes"]:
        click.echo(f"note: {note}")


@click.command("export")
@click.argument("campaign")
@click.option("--format", "fmt", type=click.Choice(["csv", "xlsx", "sdmx", "microdata"]),
              required=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
@click.option("--snapshot", "version", type=_VERSION, default=None,
              help="Snapshot version [default: the latest].")
@click.option("--series-prefix", default=DEFAULT_SERIES_PREFIX, show_default=True,
              help="National SDMX series id prefix (no SDG global code exists).")
@click.option("--dataflow", default=DEFAULT_DATAFLOW, show_default=True,
              help="SDMX DATAFLOW (AGENCY:ID(VERSION)).")
@click.pass_context
def export_cmd(ctx: click.Context, campaign: str, fmt: str, output: str, version: int | None,
               series_prefix: str, dataflow: str) -> None:
    """Export a tally snapshot (csv, xlsx, sdmx) or the pseudonymous answers (microdata)."""
    settings = settings_of(ctx)
    path = Path(output)
    check_writable(path)  # before reading a whole campaign's answers for nothing
    engine, camp = _campaign(settings, campaign)
    if fmt == "microdata":
        with output_file(path) as part:
            n = write_microdata(engine, camp.id, part)
        click.echo(f"{path}: {n} answers (pseudonymous ids, no phone numbers, no open text)")
        return
    try:
        snap = snapshot_of(engine, camp.id, version, then=f"run `civicdial tally {camp.slug}`")
    except NoSnapshot as exc:
        raise click.ClickException(f"{camp.slug}: {exc}") from None
    with output_file(path) as part:
        if fmt == "csv":
            n = write_csv(snap, part)
        elif fmt == "xlsx":
            n = write_xlsx(snap, camp, part)
        else:
            n = write_sdmx(snap, camp, part, series_prefix=series_prefix, dataflow=dataflow)
    click.echo(f"{path}: {n} rows from snapshot v{snap.version}")


@click.command("publish")
@click.argument("campaign")
@click.option("--snapshot", "version", type=_VERSION, default=None,
              help="Snapshot version [default: the latest].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def publish_cmd(ctx: click.Context, campaign: str, version: int | None,
                as_json: bool) -> None:
    """Publish a snapshot: RESULTS answers from it, subscribers get the summary by SMS."""
    settings = settings_of(ctx)
    engine, camp = _campaign(settings, campaign)
    try:
        done = publish(settings, engine, connect(settings), camp.id, version)
    except NoSnapshot as exc:
        raise click.ClickException(f"{camp.slug}: {exc}") from None
    emit(as_json, {"campaign": camp.slug, "snapshot_id": done.snapshot_id,
                   "version": done.version, "results_texts": done.fields,
                   "messages_queued": done.queued},
         f"{camp.slug}: snapshot v{done.version} published; {done.fields} summaries "
         f"for RESULTS; {done.queued} result SMS queued")


COMMANDS = (tally_cmd, export_cmd, publish_cmd)


def register(group: click.Group) -> click.Group:
    for command in COMMANDS:
        group.add_command(command)
    return group
