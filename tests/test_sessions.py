"""SessionStore's own connection per thread: same replies as the client, and it recovers
where the pool would (a flushed script cache, a connection the server closed)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time

import pytest
import redis

from gateway.store.sessions import ProviderSession, SessionStore, _dumps, pseudonym


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


def test_a_server_that_stops_answering_times_out(redis_client: redis.Redis) -> None:
    # The hop's socket blocks with the client's socket_timeout in the kernel: a Redis
    # that stops answering (paused here for longer than the timeout) is an error the
    # webhook answers 503 for, not a hop that hangs; the next hop works again.
    pool = redis_client.connection_pool
    store = SessionStore(redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class,
        **{**pool.connection_kwargs, "socket_timeout": 0.2})))
    assert _commit(store, "", '["v"]')
    redis_client.client_pause(1500)
    try:
        with pytest.raises(redis.TimeoutError):
            store.load(1, "r1", 2, "s1")
    finally:
        redis_client.client_unpause()
    time.sleep(0.05)
    assert store.load(1, "r1", 2, "s1").state_raw == '["v"]'


def test_an_error_reply_is_raised_and_the_connection_stays_in_step(
        redis_client: redis.Redis) -> None:
    store = SessionStore(redis_client)
    with pytest.raises(redis.ResponseError, match="not an integer"):
        store.run([("SET", "k", "v"), ("INCR", "k"), ("GET", "k")])
    assert store.run([("GET", "k"), ("INCR", "n")]) == [b"v", 1]


@pytest.mark.parametrize("value", [
    ["plain", 1, 2.5, None, True, {"q": "1", "free": "More nurses at night"}],
    ["Ɛyɛ adwuma yiye", "café", "line\nbreak\ttab", "\x01\x1f\x7f", "\u2028\u2029", '"\\/'],
    [1796140106.044, 1796140106.0449998, 0.1 + 0.2, 1e16, 0.001, -0.0, 10**18, -(2**63)],
    {"id": "abc-3", "k": "answer", "c": 1, "ch": 2, "i": "abc", "r": None, "v": "", "t": 0.0},
])
def test_the_hot_path_json_is_what_json_dumps_writes(value: object) -> None:
    assert _dumps(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    assert json.loads(_dumps(value)) == value


def test_a_tiny_float_is_the_same_number_in_other_digits() -> None:
    # The one difference found: orjson writes 1e-7 where json writes 1e-07. No state,
    # provider session or event holds such a float (times are seconds since 1970).
    assert _dumps([1e-7]) == "[1e-7]"
    assert json.loads(_dumps([1e-7])) == [1e-7]


def test_pseudonyms_are_what_earlier_versions_stored() -> None:
    # Answers, tombstones and edges' outboxes hold pseudonyms: the function may get
    # faster, never different. HMAC-SHA256 of the number, hex, 32 characters; the
    # simulator's numbers keep their prefix. Two keys, each used again after the other.
    for key in (b"k" * 32, b"another key", b"k" * 32):
        for phone in ("+233241234567", "+233201112222", "+447700900123"):
            digest = hmac.new(key, phone.encode(), hashlib.sha256).hexdigest()
            expected = ("sim-" + digest[:28]) if phone.startswith("+447700900") \
                else digest[:32]
            assert pseudonym(key, phone) == expected
    assert pseudonym(b"k" * 32, "+233241234567") != pseudonym(b"another key", "+233241234567")


def _client_id(conn: redis.connection.AbstractConnection) -> int:
    conn.send_command("CLIENT", "ID")
    return int(conn.read_response())
