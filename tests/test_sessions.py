"""SessionStore's own connection per thread: same replies as the client, and it recovers
where the pool would (a flushed script cache, a connection the server closed)."""

from __future__ import annotations

import threading

import redis

from gateway.store.sessions import ProviderSession, SessionStore


def _commit(store: SessionStore, expected: str, state: str) -> bool:
    return store.commit(campaign=1, respondent="r1", channel=2, session_id="s1",
                        expected=expected, state=state, state_ttl=60,
                        provider=ProviderSession("1", "CON next", 1, "r1"), provider_ttl=60,
                        events=[{"id": "i-1", "k": "started"}])


def test_load_and_commit_round_trip(redis_client: redis.Redis) -> None:
    store = SessionStore(redis_client)
    assert store.load(1, "r1", 2, "s1").state_raw == ""
    assert _commit(store, "", '["v"]')
    assert not _commit(store, "", '["w"]')  # compare-and-set: the state is no longer ''
    loaded = store.load(1, "r1", 2, "s1")
    assert loaded.state_raw == '["v"]'
    assert loaded.provider == ProviderSession("1", "CON next", 1, "r1")
    assert redis_client.mget([store.state_key(1, "r1")]) == [b'["v"]']
    assert store.waiting() == 1


def test_commit_after_the_script_cache_is_flushed(redis_client: redis.Redis) -> None:
    store = SessionStore(redis_client)
    assert _commit(store, "", '["v"]')
    redis_client.script_flush()
    assert _commit(store, '["v"]', '["w"]')
    assert store.load(1, "r1", 2, "s1").state_raw == '["w"]'


def test_a_connection_the_server_closed_is_replaced(redis_client: redis.Redis) -> None:
    store = SessionStore(redis_client)
    store.load(1, "r1", 2, "s1")
    own = store._own.conn
    assert own is not None
    redis_client.client_kill_filter(_id=_client_id(own))
    assert _commit(store, "", '["v"]')
    assert store.load(1, "r1", 2, "s1").state_raw == '["v"]'


def test_each_thread_has_its_own_connection(redis_client: redis.Redis) -> None:
    store = SessionStore(redis_client)
    store.load(1, "r1", 2, "s1")
    seen: list[object] = []

    def other() -> None:
        store.load(1, "r1", 2, "s1")
        seen.append(store._own.conn)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen and seen[0] is not None and seen[0] is not store._own.conn


def _client_id(conn: redis.connection.AbstractConnection) -> int:
    conn.send_command("CLIENT", "ID")
    return int(conn.read_response())
