"""What an operator reads: health, metrics, stuck messages, and commands that refuse to
start on a data dir that is not there."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from fake_providers import fake_provider
from flask.testing import FlaskClient
from node import embedded_env
from sqlalchemy import Engine, make_url, select, text
from sqlalchemy.orm import Session

from gateway.cli import main
from gateway.config import Settings, load_settings
from gateway.coordination.campaigns import create_token
from gateway.interview.messages import message
from gateway.logformat import mask_channel_keys
from gateway.store.crypto import NumberBox
from gateway.store.models import Campaign, Channel, OutboundMessage
from gateway.store.redis_conn import EmbeddedRedis
from gateway.web.app import create_app
from workers.outbound import send_message

FORM = "application/x-www-form-urlencoded"


def _hop(client: FlaskClient, url: str, text: str, session: str = "M1") -> int:
    return client.post(url, content_type=FORM, data={
        "sessionId": session, "serviceCode": "*920*16#", "phoneNumber": "+233241234567",
        "networkCode": "62001", "text": text}).status_code


def _sample(metrics: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.splitlines():
        found = re.match(r"^(\w+)(?:\{(.*)\})? ([\d.e+-]+)$", line)
        if found and found.group(1) == name:
            have = ",".join(sorted((found.group(2) or "").split(","))) if found.group(2) else ""
            if have == wanted:
                return float(found.group(3))
    return 0.0


def test_healthz_and_readyz(client: FlaskClient) -> None:
    """/healthz: the process answers; /readyz: Redis and SQL answer too."""
    assert client.get("/healthz").get_data(as_text=True) == "ok\n"
    resp = client.get("/readyz")
    assert (resp.status_code, resp.get_data(as_text=True)) == (200, "ready\n")


def test_readyz_and_hops_when_redis_is_down(settings: Settings, engine: Engine,
                                            channel: Channel, tmp_path: Path) -> None:
    """Redis unreachable: /readyz says 503 and why, /healthz still 200, and a hop gets
    503 with Retry-After (the provider retries), never a 500."""
    app = create_app(settings.with_(redis_url=f"unix://{tmp_path}/no-redis.socket"))
    client = app.test_client()
    resp = client.get("/readyz")
    assert resp.status_code == 503
    assert resp.get_data(as_text=True) == "not ready: redis: ConnectionError\n"
    assert client.get("/healthz").status_code == 200
    hop = client.post(f"/webhooks/africastalking/{channel.key}/ussd", content_type=FORM, data={
        "sessionId": "R1", "serviceCode": "*920*16#", "phoneNumber": "+233241234567",
        "networkCode": "62001", "text": ""})
    assert hop.status_code == 503 and hop.headers["Retry-After"] == "1"


def test_metrics_count_hops_and_replies_per_channel(client: FlaskClient, ussd_url: str,
                                                    channel: Channel,
                                                    redis_client: redis.Redis) -> None:
    """Each hop is one observation of the latency histogram of its channel and one reply
    of its kind; waiting events and restarts are read from Redis at scrape time."""
    before = client.get("/metrics").get_data(as_text=True)
    ch = str(channel.id)
    assert _hop(client, ussd_url, "") == 200
    assert _hop(client, ussd_url, "1") == 200
    assert _hop(client, ussd_url, "1*2") == 200  # declines: END
    client.post(ussd_url, content_type=FORM, data={"text": ""})  # refused: 400
    redis_client.hset("cd:up:restarts", "worker", 2)
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    after = resp.get_data(as_text=True)

    def delta(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert delta("civicdial_replies_total", channel=ch, kind="con") == 2
    assert delta("civicdial_replies_total", channel=ch, kind="end") == 1
    assert delta("civicdial_replies_total", channel=ch, kind="refused") == 1
    assert delta("civicdial_hop_seconds_count", channel=ch) == 4  # the refused one too
    assert delta("civicdial_hop_seconds_count", channel="unknown") == 0
    assert _sample(after, "civicdial_events_waiting") == redis_client.xlen("cd:events") > 0
    assert _sample(after, "civicdial_restarts_total", process="worker") == 2
    assert _sample(after, "civicdial_campaigns", state="open") == 1
    assert channel.key not in after


def test_status_shows_outbound_by_status_and_overdue(env: dict[str, str], engine: Engine,
                                                     channel: Channel, client: FlaskClient,
                                                     settings: Settings) -> None:
    """`campaign status --json` and /stats: invitations and outbound SMS by status, and
    the messages still queued long past their due time (the oldest one's due time)."""
    now = datetime.now(UTC)
    long_ago = now - timedelta(hours=2)
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign))
        assert campaign is not None
        sms = Channel(key="at-ops-key", provider="africastalking", kind="sms", address="1662",
                      campaign_id=campaign.id, config="{}")
        db.add(sms)
        db.flush()
        rows = [("invitation", "queued", now), ("invitation", "queued", long_ago),
                ("invitation", "sent", long_ago), ("reply", "delivered", now),
                ("reply", "sending", now - timedelta(minutes=10)), ("reply", "queued", now)]
        for i, (kind, status, at) in enumerate(rows):
            db.add(OutboundMessage(key=f"ops:{i}", channel_id=sms.id, respondent=f"r{i}",
                                   recipient="x", body="b", kind=kind, status=status,
                                   created_at=at, updated_at=at))
        token = create_token(db, "test", "viewer", "viewer")
    result = CliRunner().invoke(main, ["campaign", "status", "sdg1662", "--json"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    stats = client.get("/api/v1/campaigns/sdg1662/stats",
                       headers={"Authorization": f"Bearer {token}"}).get_json()
    for shown in (report, stats):
        assert shown["invitations_by_status"] == {"queued": 2, "sent": 1}
        assert shown["outbound_by_status"] == {"queued": 3, "sent": 1, "delivered": 1,
                                               "sending": 1}
        overdue = shown["outbound_overdue"]
        assert (overdue["count"], overdue["after_seconds"]) == (2, 300)
        assert datetime.fromisoformat(overdue["oldest_due_at"]) == long_ago
    text = CliRunner().invoke(main, ["campaign", "status", "sdg1662"], env=env).output
    assert "2 outbound messages overdue (queued over 5 min past due; oldest due " in text
    # A paused campaign holds its invitations on purpose: those are not stuck.
    with engine.begin() as conn:
        conn.execute(Campaign.__table__.update().values(state="paused"))
    paused = json.loads(CliRunner().invoke(
        main, ["campaign", "status", "sdg1662", "--json"], env=env).output)
    assert paused["outbound_overdue"]["count"] == 1


def test_commands_refuse_to_create_a_data_dir(tmp_path: Path) -> None:
    """`status` from the wrong folder (embedded SQLite/Redis) names the data dir it
    looked for and creates nothing; `init` makes one."""
    missing = tmp_path / "nowhere" / "civicdial-data"
    for args in (["status"], ["--data-dir", str(missing), "status", "--json"],
                 ["--data-dir", str(missing), "campaign", "list"],
                 ["--data-dir", str(missing), "worker", "--burst"]):
        out = subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=tmp_path,
                             env={**embedded_env(), "CIVICDIAL_DATA_DIR": str(missing)},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert out.stderr.startswith(f"Error: no data dir at {missing}: "), out.stderr
        assert "Traceback" not in out.stderr
    assert not missing.exists() and not (tmp_path / "civicdial-data").exists()
    made = subprocess.run([sys.executable, "-m", "gateway.cli", "--data-dir", str(missing),
                           "init"], env=embedded_env(), capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr
    assert (missing / "civicdial.db").exists()


def test_channel_keys_are_masked_in_urls() -> None:
    """Every webhook URL in a log line loses its key but for 4 characters."""
    line = ('127.0.0.1 - - "POST /webhooks/africastalking/3kqAbCdEfGh/ussd/events?x=1 HTTP/1.1"'
            ' 200 "https://h/webhooks/twilio/TwKey123/sms"')
    assert mask_channel_keys(line) == (
        '127.0.0.1 - - "POST /webhooks/africastalking/3kqA***/ussd/events?x=1 HTTP/1.1"'
        ' 200 "https://h/webhooks/twilio/TwKe***/sms"')
    assert mask_channel_keys("GET /dashboard/ 200") == "GET /dashboard/ 200"


def test_redis_fsync_setting_reaches_the_embedded_server(tmp_path: Path) -> None:
    """CIVICDIAL_REDIS_FSYNC=always is the embedded server's appendfsync (AOF on); other
    values are refused when the settings are read."""
    settings = load_settings({"CIVICDIAL_DATA_DIR": str(tmp_path / "data"),
                              "CIVICDIAL_REDIS_FSYNC": "always"})
    server = EmbeddedRedis(settings, tmp_path)
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        server.stop()
    try:
        load_settings({"CIVICDIAL_DATA_DIR": str(tmp_path), "CIVICDIAL_REDIS_FSYNC": "never"})
    except ValueError as exc:
        assert "CIVICDIAL_REDIS_FSYNC must be one of everysec, always" in str(exc)
    else:
        raise AssertionError("an unknown fsync policy was accepted")


def test_metrics_count_sends_by_result(client: FlaskClient, engine: Engine, channel: Channel,
                                       settings: Settings, env: dict[str, str],
                                       redis_client: redis.Redis,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each send job counts its result: sent (the provider took it) and stopped (the
    recipient had opted out)."""
    with fake_provider() as fake:
        with Session(engine) as db, db.begin():
            campaign = db.scalar(select(Campaign))
            assert campaign is not None
            sms = Channel(key="at-sends-key", provider="africastalking", kind="sms",
                          address="1662", campaign_id=campaign.id, config=json.dumps({
                              "username": "sandbox", "api_key": "at-key",
                              "base_url": fake.base_url, "rate_per_second": 0}))
            db.add(sms)
            db.flush()
            box = NumberBox(settings.encryption_key)
            sent = OutboundMessage(key="s:1", channel_id=sms.id, respondent="r-ok",
                                   recipient=box.seal("+233200000011"), body="b")
            stopped = OutboundMessage(key="s:2", channel_id=sms.id, respondent="r-stop",
                                      recipient=box.seal("+233200000012"), body="b")
            db.add_all([sent, stopped])
            db.flush()
            ids = (sent.id, stopped.id)
        redis_client.set("cd:optout:r-stop", "1")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        before = client.get("/metrics").get_data(as_text=True)
        assert [send_message(i) for i in ids] == ["sent", "stopped"]
        after = client.get("/metrics").get_data(as_text=True)
    for result in ("sent", "stopped"):
        assert (_sample(after, "civicdial_sends_total", result=result)
                - _sample(before, "civicdial_sends_total", result=result)) == 1


def test_hops_go_on_from_the_cache_while_sql_fails(settings: Settings, engine: Engine,
                                                   redis_client: redis.Redis,
                                                   channel: Channel,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A hop needs only Redis. When the channel cache's periodic refresh from SQL fails
    (here the channels table is gone: a real error from the real database), hops are
    answered from the cache, with one warning rather than one per hop, and the next
    refresh once SQL answers again picks up what changed meanwhile."""
    app = create_app(settings.with_(registry_refresh_seconds=0.2))
    client = app.test_client()
    url = f"/webhooks/africastalking/{channel.key}/ussd"

    def hop(text: str) -> tuple[int, str]:
        resp = client.post(url, content_type=FORM, data={
            "sessionId": "SQL1", "serviceCode": "*920*16#", "phoneNumber": "+233241234567",
            "networkCode": "62001", "text": text})
        return resp.status_code, resp.get_data(as_text=True)

    assert hop("")[0] == 200
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE channels RENAME TO channels_away"))
    try:
        with caplog.at_level("WARNING", logger="civicdial.registry"):
            for typed in ("1", "1*1", "1*1*1"):
                time.sleep(0.25)  # past the refresh interval: every hop tries SQL
                status, body = hop(typed)
                assert status == 200 and body.startswith("CON "), body
        failures = [r for r in caplog.records if r.name == "civicdial.registry"]
        assert len(failures) == 1 and "answering from the cache" in failures[0].getMessage()
        with engine.begin() as conn:
            conn.execute(text("UPDATE campaigns SET state = 'paused'"))
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE channels_away RENAME TO channels"))
    time.sleep(0.25)
    status, body = hop("1*1*1*1")
    assert (status, body) == (200, "END " + message("en", "closed"))
    app.extensions["civicdial"].engine.dispose()


@pytest.mark.parametrize("raw", ["0", "-5", "ten", "nan", "1e9"])
def test_registry_refresh_must_be_seconds_above_zero(tmp_path: Path, raw: str) -> None:
    with pytest.raises(ValueError, match="CIVICDIAL_REGISTRY_REFRESH_SECONDS must be a number"):
        load_settings({"CIVICDIAL_DATA_DIR": str(tmp_path),
                       "CIVICDIAL_REGISTRY_REFRESH_SECONDS": raw})
    assert load_settings({"CIVICDIAL_DATA_DIR": str(tmp_path),
                          "CIVICDIAL_REGISTRY_REFRESH_SECONDS": "2.5"}
                         ).registry_refresh_seconds == 2.5


class _Outage:
    """A database the app cannot reach until `restore()`: for SQLite a file in a folder
    that does not exist yet (restore copies the test database there), for PostgreSQL a
    loopback port nobody listens on (restore starts a TCP relay there to the server).
    Either way the driver's own error (OperationalError), as when a server is down."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.source = make_url(settings.database_url)
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        if self.source.get_backend_name() == "sqlite":
            self.target = tmp_path / "later" / "test.db"
            self.url = f"sqlite:///{self.target}"
        else:
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
            probe.close()
            self.url = self.source.set(host="127.0.0.1", port=self.port).render_as_string(
                hide_password=False)

    def restore(self) -> None:
        if self.source.get_backend_name() == "sqlite":
            self.target.parent.mkdir()
            with sqlite3.connect(self.source.database or "") as src, \
                    sqlite3.connect(self.target) as dst:
                src.backup(dst)
            return
        listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets.append(listener)
        upstream = (self.source.host or "127.0.0.1", self.source.port or 5432)

        def pipe(a: socket.socket, b: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := a.recv(65536):
                    b.sendall(data)
            for end in (a, b):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

        def relay() -> None:
            with contextlib.suppress(OSError):
                while True:
                    client, _ = listener.accept()
                    server = socket.create_connection(upstream)
                    self._sockets += [client, server]
                    for a, b in ((client, server), (server, client)):
                        threading.Thread(target=pipe, args=(a, b), daemon=True).start()

        thread = threading.Thread(target=relay, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_sql_down_before_the_cache_is_loaded_is_a_503(
        settings: Settings, engine: Engine, redis_client: redis.Redis, channel: Channel,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A web process whose first hop finds SQL down (nothing cached yet to answer from)
    says 503 with Retry-After, as for Redis down, on the USSD fast path and on a Flask
    route alike; never a 500. Once SQL answers, the retried hop is served."""
    outage = _Outage(settings, tmp_path)
    app = create_app(settings.with_(database_url=outage.url))
    client = app.test_client()
    base = f"/webhooks/africastalking/{channel.key}/ussd"
    form = {"sessionId": "SQL2", "serviceCode": "*920*16#", "phoneNumber": "+233241234567",
            "networkCode": "62001", "text": ""}
    end_of_session = {"sessionId": "SQL2", "phoneNumber": "+233241234567",
                      "serviceCode": "*920*16#", "networkCode": "62001",
                      "status": "Success", "input": "", "durationInMillis": "1000",
                      "cost": "KES 0.0000", "date": "2026-12-01 10:00:00"}
    try:
        with caplog.at_level("WARNING", logger="civicdial.webhooks"):
            for url, data in ((base, form), (base + "/events", end_of_session)):
                resp = client.post(url, content_type=FORM, data=data)
                assert (resp.status_code, resp.get_data(as_text=True),
                        resp.headers.get("Retry-After")) == (
                    503, "temporarily unavailable\n", "1")
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "civicdial.webhooks" and " -> " in r.getMessage()]
        assert len(lines) == 2 and all(" -> 503 sql unavailable: " in m for m in lines)
        assert channel.key not in " ".join(lines)
        outage.restore()
        resp = client.post(base, content_type=FORM, data=form)
        assert resp.status_code == 200 and resp.get_data(as_text=True).startswith("CON ")
    finally:
        app.extensions["civicdial"].engine.dispose()
        outage.close()


def test_a_database_that_never_answers_fails_a_connect_by_its_timeout(
        tmp_path: Path) -> None:
    """A PostgreSQL behind a link that drops packets: connecting gives up at the connect
    timeout (a hop refreshing the channel cache would otherwise hang for minutes). The
    server here is a socket whose accept queue is full, so the SYNs are dropped, as on a
    dead link."""
    from sqlalchemy.exc import OperationalError

    from gateway.store.db import make_engine

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue; further SYNs go unanswered
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.2)
    settings = load_settings({"DATABASE_URL": f"postgresql+psycopg://u@127.0.0.1:{port}/db",
                              "REDIS_URL": "redis://127.0.0.1:1/0",
                              "CIVICDIAL_DATA_DIR": str(tmp_path),
                              "CIVICDIAL_PSEUDONYM_KEY": "k"})
    engine = make_engine(settings)
    try:
        # psycopg's own error for its connect_timeout; without it, the connect would wait
        # for the kernel's SYN retries and end, minutes later, with another message.
        with pytest.raises(OperationalError, match="connection timeout expired"):
            engine.connect()
    finally:
        engine.dispose()
        for s in (*fillers, listener):
            s.close()
