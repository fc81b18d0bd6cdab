"""SQL engine and schema migrations."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    ColumnElement,
    Engine,
    String,
    bindparam,
    cast,
    create_engine,
    event,
    func,
    make_url,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from gateway.config import Settings

MIGRATIONS = Path(__file__).parent / "migrations"
CONNECT_TIMEOUT_SECONDS = 5


def make_engine(settings: Settings) -> Engine:
    url = settings.database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL lets the web process read while a worker writes.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql") and "connect_timeout" not in make_url(url).query:
        # A server that drops packets (a link down) would otherwise hold a connect for
        # minutes: the hop refreshing the channel cache, a drain. The URL's own wins.
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def upsert_insert(engine: Engine, table: Any) -> Any:
    """INSERT with ON CONFLICT for this engine's dialect (PostgreSQL or SQLite)."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


_ENGINES: dict[str, Engine] = {}


def set_status(engine: Engine, model: Any, row_id: int, *, if_status: str | None = None,
               untouched_since: datetime | None = None, **values: Any) -> bool:
    """Update one row of a table with `status` and `updated_at` columns (outbound messages,
    airtime payments), stamping updated_at. With if_status (and untouched_since): only if
    the row still has that status (and nobody touched it since), because another worker
    may have claimed it meanwhile. True if the row was updated."""
    query = update(model).where(model.id == row_id)
    if if_status is not None:
        query = query.where(model.status == if_status)
    if untouched_since is not None:
        query = query.where(model.updated_at < untouched_since)
    with engine.begin() as conn:
        return bool(conn.execute(query.values(updated_at=datetime.now(UTC), **values))
                    .rowcount)


def shared_engine(settings: Settings) -> Engine:
    """One engine (and connection pool) per database per process, for jobs that run
    many times in one worker."""
    engine = _ENGINES.get(settings.database_url)
    if engine is None:
        engine = _ENGINES.setdefault(settings.database_url, make_engine(settings))
    return engine


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the latest migration (safe to call on every start)."""
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def in_values(engine: Engine, column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
    """`column IN (values)` for a text column, the values as one JSON parameter: a batch's
    thousand ids cost the driver one string, not a thousand bound parameters to render and
    parse."""
    payload = bindparam(None, json.dumps(list(values)), type_=String)
    if engine.dialect.name == "postgresql":
        rows = func.json_array_elements_text(cast(payload, JSON)).table_valued("value")
    else:
        rows = func.json_each(payload).table_valued("value")
    return column.in_(select(rows.c.value))


MAX_INT = 2**31 - 1  # what an SQL INTEGER holds


def stored_utc(moment: datetime) -> datetime:
    """A time read back from SQL, made aware: SQLite hands back naive datetimes, and every
    stored time is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def stored_iso(moment: datetime | None) -> str | None:
    """A time read back from SQL (or None) as ISO 8601 UTC, to the second."""
    return None if moment is None else stored_utc(moment).isoformat(timespec="seconds")
