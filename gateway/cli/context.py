"""What every command needs: the settings (with --data-dir), a migrated database, one
transaction with domain errors turned into clean exits, --json or text output, and output
files that are checked before the work and never left half-written."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from gateway.config import Settings, data_dir_of, load_settings, uses_embedded
from gateway.coordination.bootstrap import bootstrap
from gateway.coordination.campaigns import CampaignError
from gateway.store.db import make_engine, migrate
from gateway.store.redis_conn import connect
from gateway.store.sessions import SessionStore


def settings_of(ctx: click.Context, *, create: bool = False) -> Settings:
    """The settings; only `create` (up, init) may make a data dir that is not there: any
    other command run from the wrong folder would otherwise start on an empty one."""
    root = ctx.find_root()
    data_dir = root.obj.get("data_dir") if root.obj else None
    if not create and uses_embedded() and not data_dir_of(data_dir=data_dir).is_dir():
        raise click.ClickException(
            f"no data dir at {data_dir_of(data_dir=data_dir)}: run this where `civicdial up` "
            "runs, or pass --data-dir (or CIVICDIAL_DATA_DIR); `civicdial init` makes a new one")
    return load_settings(data_dir=data_dir) if data_dir else load_settings()


def open_engine(settings: Settings, *, with_defaults: bool = False) -> Engine:
    """A database at the current schema; with_defaults also makes the default campaign."""
    engine = make_engine(settings)
    if with_defaults:
        bootstrap(engine)
    else:
        migrate(engine)
    return engine


def session_store(settings: Settings) -> SessionStore:
    return SessionStore(connect(settings), settings.redis_prefix)


def in_transaction(ctx: click.Context, work: Callable[[Session], Any]) -> Any:
    """Run `work` in one transaction on a migrated database; CampaignError -> exit 1."""
    engine = open_engine(settings_of(ctx))
    try:
        with Session(engine, expire_on_commit=False) as db, db.begin():
            return work(db)
    except CampaignError as exc:
        raise click.ClickException(str(exc)) from None


def emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


def cannot_write(path: Path, exc: OSError) -> click.ClickException:
    """'cannot write /x/y.csv: no such directory': the operator's words, not a traceback."""
    why = ("no such directory" if exc.errno == errno.ENOENT
           else (exc.strerror or str(exc)).lower())
    return click.ClickException(f"cannot write {path}: {why}")


def check_writable(path: Path) -> None:
    """Refuse an output path whose folder is missing or read-only before any work is done
    or anything stored: found only at the end, the command would be left half-done (an
    edge enrolled with no bundle, a tally computed for nothing)."""
    folder = path.absolute().parent
    code = (errno.ENOENT if not folder.exists() else errno.ENOTDIR if not folder.is_dir()
            else None if os.access(folder, os.W_OK | os.X_OK) else errno.EACCES)
    if code is not None:
        raise cannot_write(path, OSError(code, os.strerror(code)))


@contextmanager
def output_file(path: Path) -> Iterator[Path]:
    """A path next to `path` for the block to write; moved onto `path` only when the block
    ends without an error, so a failed write (disk full) leaves no half-written file where
    a script would take it for the export. OSError -> one line, exit 1."""
    check_writable(path)
    part = path.with_name(f".{path.name}.part")
    try:
        yield part
        os.replace(part, path)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    finally:
        part.unlink(missing_ok=True)
