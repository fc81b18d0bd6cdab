"""Contact import and invitations, as a coordinator runs them from the CLI."""

from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path

import openpyxl
import pytest
import redis
from click.testing import CliRunner
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from test_console import csrf_of
from test_dashboard import signed_in_client, tokens  # noqa: F401 - the role tokens fixture

from gateway.cli import main
from gateway.store.crypto import NumberBox
from gateway.store.models import Campaign, Channel, Contact, OptOut, OutboundMessage
from gateway.store.sessions import pseudonym


def run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout


@pytest.fixture
def sms_channel(engine: Engine, channel: Channel) -> int:
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign))
        assert campaign is not None
        ch = Channel(key="at-sms", provider="africastalking", kind="sms", address="1662",
                     campaign_id=campaign.id, config=json.dumps({"rate_per_second": 0}))
        db.add(ch)
        db.flush()
        return ch.id


CSV = (
    "\ufeffPhone Number;Language;Region;District\r\n"   # Excel: BOM, semicolons, CRLF
    "024 123 4567;Twi;Ashanti;Kumasi\r\n"
    "+233 20 111 2222;English;Greater Accra;\"Accra; Metro\"\r\n"
    "not a number;;;\r\n"
    "\r\n"
    "0241234567;;;\r\n"                                  # the first number again
    "12;;;\r\n"
    "233501112222;tw;;;extra\r\n"
)


def test_import_reports_bad_rows_and_is_idempotent(env: dict[str, str], engine: Engine,
                                                   tmp_path: Path, settings) -> None:  # type: ignore[no-untyped-def]
    """Good rows in (numbers normalised, stored encrypted), bad rows named by line;
    importing the same file again adds nothing."""
    path = tmp_path / "contacts.csv"
    path.write_bytes(CSV.encode("utf-8"))
    code, out = run(env, "contacts", "import", str(path), "--campaign", "sdg1662", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert (result["imported"], result["already_present"]) == (2, 1)
    assert [r["line"] for r in result["rejected"]] == [4, 7, 8]
    assert "not a phone number" in result["rejected"][0]["reason"]
    assert "fields" in result["rejected"][2]["reason"]
    with Session(engine) as db:
        contacts = {c.respondent: c for c in db.scalars(select(Contact))}
    box = NumberBox(settings.encryption_key)
    numbers = sorted(box.open(c.recipient) for c in contacts.values())
    assert numbers == ["+233201112222", "+233241234567"]
    kumasi = contacts[pseudonym(settings.pseudonym_key, "+233241234567")]
    assert (kumasi.language, kumasi.region) == ("Twi", "Ashanti")
    assert json.loads(kumasi.attributes) == {"district": "Kumasi"}
    assert all("233" not in c.recipient for c in contacts.values())
    code, out = run(env, "contacts", "import", str(path), "--campaign", "sdg1662", "--json")
    again = json.loads(out)
    assert (again["imported"], again["already_present"]) == (0, 3)


INVALID = (
    "phone,district\n"
    "0000000,a\n"              # possible, but no such number: was stored as +2330000000
    "+2330000000,b\n"
    "0590000000,c\n"           # a Ghana number range not in use
    "024ABC4567,d\n"           # letters are not keypad digits here
    "0241234567,e\n"
)


def test_import_requires_valid_numbers_and_names_the_line(env: dict[str, str],
                                                          engine: Engine,
                                                          tmp_path: Path) -> None:
    """Only valid numbers (phonenumbers.is_valid_number) are imported; each other row is
    reported with its line, in the text and the --json output."""
    path = tmp_path / "contacts.csv"
    path.write_text(INVALID)
    code, out = run(env, "contacts", "import", str(path), "--campaign", "sdg1662", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["imported"] == 1
    assert [(r["line"], "not a" in r["reason"]) for r in result["rejected"]] == [
        (2, True), (3, True), (4, True), (5, True)]
    assert "not a valid phone number" in result["rejected"][0]["reason"]
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(Contact)) == 1
    code, out = run(env, "contacts", "import", str(path), "--campaign", "sdg1662")
    assert code == 0 and "line 2: not a valid phone number" in out and "'0000000'" in out


def test_a_number_in_another_column_is_not_stored(env: dict[str, str], engine: Engine,
                                                  tmp_path: Path) -> None:
    """Columns other than the phone's are stored as they are (the console shows them to
    viewers): a row with a phone number in one is refused, naming the line and column."""
    path = tmp_path / "contacts.csv"
    path.write_text("phone,district,notes\n0241234600,Kumasi,call 024 123 4699 after 5pm\n"
                    "0241234601,Kumasi,prefers Twi\n0241234602,Tamale,+233 (20) 123-4602\n")
    code, out = run(env, "contacts", "import", str(path), "--campaign", "sdg1662", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["imported"] == 1
    assert [(r["line"], r["reason"]) for r in result["rejected"]] == [
        (line, "column 'notes' holds what looks like a phone number; other columns are "
               "stored unencrypted: remove it") for line in (2, 4)]
    with Session(engine) as db:
        stored = db.scalars(select(Contact.attributes)).all()
    assert stored == ['{"district": "Kumasi", "notes": "prefers Twi"}'], stored


@pytest.mark.parametrize("content,error", [
    (b"", "empty"),
    (b"name,district\nKofi,Kumasi\n", "no phone number column"),
    (b"phone,Mobile,notes\n0241234600,0201234600,x\n",
     "2 phone number columns (phone, Mobile): keep one"),
    (b"phone,district,phone\n0241234600,Kumasi,0201234600\n", "2 phone number columns"),
], ids=["empty file", "no phone column", "two phone columns", "the same name twice"])
def test_import_refuses_unusable_files(env: dict[str, str], engine: Engine, tmp_path: Path,
                                       content: bytes, error: str) -> None:
    """A file that cannot be used at all says why and imports nothing."""
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["contacts", "import", str(path), "--campaign",
                                       "sdg1662"], env=env)
    assert result.exit_code == 1 and error in result.output


def test_windows_1252_file(env: dict[str, str], engine: Engine, tmp_path: Path) -> None:
    """Excel's Windows-1252 export (é in an attribute) is read, not refused."""
    path = tmp_path / "cp1252.csv"
    path.write_bytes("msisdn,community\n0241234567,Ahafo Ano Séfwi\n".encode("cp1252"))
    code, out = run(env, "contacts", "import", str(path), "--campaign", "sdg1662", "--json")
    assert json.loads(out)["imported"] == 1
    with Session(engine) as db:
        assert json.loads(db.scalar(select(Contact.attributes))) == {
            "community": "Ahafo Ano Séfwi"}


def xlsx_workbook() -> bytes:
    """A real Excel workbook holding a valid contact list: picked instead of its CSV."""
    book = openpyxl.Workbook()
    book.active.append(["phone", "region"])
    book.active.append(["0241234567", "Ashanti"])
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


# A full chunk of good rows, then a quote never closed: refused as a whole, not half-stored.
OPEN_QUOTE = ("phone,district\n" + "".join(f"02410{n:05d},a\n" for n in range(2500))
              + '0241234567,"Kumasi\n' + "x" * 140_000 + "\n").encode()
SAVE_AS = "save it as CSV UTF-8"
UNREADABLE = pytest.mark.parametrize("content,error", [
    (xlsx_workbook(), "not a UTF-8 CSV file (it looks like an .xlsx workbook"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(512), "(it looks like an .xls workbook)"),
    (bytes(range(256)) * 4, "not a UTF-8 CSV file (it holds binary data"),
    ("phone\n0241234567\n".encode("utf-16-le"), "UTF-16 without a byte-order mark"),
    (b"\xff\xfep\x00h\x00\x00\xd8", "starts as UTF-16 text but is not valid UTF-16"),
    (OPEN_QUOTE, 'line 2502: field larger than field limit (131072); is a quote (")'),
], ids=["xlsx", "xls", "binary", "utf-16 without BOM", "broken utf-16", "unclosed quote"])


def stored_contacts(engine: Engine) -> int:
    with Session(engine) as db:
        return db.scalar(select(func.count()).select_from(Contact)) or 0


@UNREADABLE
def test_cli_refuses_a_file_that_is_not_csv_text(env: dict[str, str], engine: Engine,
                                                 tmp_path: Path, content: bytes,
                                                 error: str) -> None:
    """One line naming the file, what is wrong and the fix; exit 1, no traceback (the
    runner lets any other exception through), nothing imported."""
    path = tmp_path / "contacts.csv"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["contacts", "import", str(path), "--campaign",
                                       "sdg1662"], env=env, catch_exceptions=False)
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 1, result.output
    assert last.startswith(f"Error: {path}: ") and error in last and SAVE_AS in last, last
    assert stored_contacts(engine) == 0


@UNREADABLE
def test_api_refuses_a_file_that_is_not_csv_text(client: FlaskClient, engine: Engine,
                                                 tokens: dict[str, str],  # noqa: F811
                                                 content: bytes, error: str) -> None:
    """422 with the same message as the CLI's, as for a file with no phone column."""
    resp = client.post("/api/v1/campaigns/sdg1662/contacts",
                       headers={"Authorization": f"Bearer {tokens['coordinator']}"},
                       data={"file": (io.BytesIO(content), "contacts.csv")})
    assert resp.status_code == 422, resp.get_data(as_text=True)[:500]
    assert error in resp.get_json()["error"] and SAVE_AS in resp.get_json()["error"]
    assert stored_contacts(engine) == 0


@UNREADABLE
def test_console_import_job_shows_why_a_file_is_refused(
        client: FlaskClient, engine: Engine, redis_client: redis.Redis, env: dict[str, str],
        tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        content: bytes, error: str) -> None:
    """The console's import job ends with the message on its page, not a failed job."""
    from rq import SimpleWorker

    from workers.console_jobs import QUEUE

    for name, value in env.items():  # the job reads its settings as a worker does
        monkeypatch.setenv(name, value)
    signed_in_client(client, tokens["coordinator"])
    csrf = csrf_of(client.get("/dashboard/campaigns/sdg1662/contacts").get_data(as_text=True))
    resp = client.post("/dashboard/campaigns/sdg1662/contacts", data={
        "csrf": csrf, "file": (io.BytesIO(content), "contacts.csv")})
    assert resp.status_code == 303
    SimpleWorker([QUEUE], connection=redis_client).work(burst=True, logging_level="WARNING")
    page = client.get(resp.headers["Location"]).get_data(as_text=True)
    shown = re.search(r'<p class="error" role="alert" id="job-error">([^<]*)</p>', page)
    assert shown is not None, page
    assert error in html.unescape(shown.group(1)) and "The job failed" not in page
    assert stored_contacts(engine) == 0


@pytest.mark.parametrize("content", [
    b"phone,region\r0241234567,Ashanti\r0201112222,Volta\r",
    "phone\tregion\r\n0241234567\tAshanti\r\n0201112222\tVolta\r\n".encode("utf-16"),
    "phone,region\n0241234567,Ashanti\n0201112222,Volta\n".encode("utf-32"),
], ids=["old-mac line endings", "utf-16 unicode text", "utf-32 with BOM"])
def test_other_spreadsheet_csvs_are_read(env: dict[str, str], engine: Engine,
                                         tmp_path: Path, content: bytes) -> None:
    """`\\r`-only line endings and Excel's UTF-16 "Unicode Text" import like any CSV."""
    path = tmp_path / "contacts.csv"
    path.write_bytes(content)
    code, out = run(env, "contacts", "import", str(path), "--campaign", "sdg1662", "--json")
    assert code == 0, out
    assert (json.loads(out)["imported"], json.loads(out)["rejected"]) == (2, [])
    with Session(engine) as db:
        assert sorted(db.scalars(select(Contact.region))) == ["Ashanti", "Volta"]


def test_invite_skips_opted_out_and_never_doubles(env: dict[str, str], engine: Engine,
                                                  redis_client: redis.Redis, tmp_path: Path,
                                                  sms_channel: int, settings) -> None:  # type: ignore[no-untyped-def]
    """Invitations go to enrolled contacts in their language, never to one who texted
    STOP, and inviting again queues nothing new."""
    path = tmp_path / "c.csv"
    path.write_text("phone,language\n0241234567,twi\n0201112222,\n0501112222,\n")
    run(env, "contacts", "import", str(path), "--campaign", "sdg1662")
    from datetime import UTC, datetime

    with Session(engine) as db, db.begin():
        db.add(OptOut(respondent=pseudonym(settings.pseudonym_key, "+233501112222"),
                      at=datetime.now(UTC)))
    code, out = run(env, "invite", "sdg1662", "--json")
    assert code == 0, out
    assert json.loads(out) == {"queued": 2, "held": 0, "skipped_opted_out": 1,
                               "already_invited": 0}
    assert redis_client.llen("rq:queue:civicdial-sms-bulk") == 2
    with Session(engine) as db:
        bodies = db.scalars(select(OutboundMessage.body).order_by(OutboundMessage.id)).all()
    assert bodies[0].startswith("Ghana Statistical Service pɛ") and "SURVEY" in bodies[0]
    assert bodies[1].startswith("Ghana Statistical Service asks")
    assert json.loads(run(env, "invite", "sdg1662", "--json")[1]) == {
        "queued": 0, "held": 0, "skipped_opted_out": 1, "already_invited": 2}
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(OutboundMessage)) == 2


def test_invite_needs_an_sms_channel(env: dict[str, str], engine: Engine,
                                     channel: Channel) -> None:
    """Without an SMS channel, invite says what to do."""
    result = CliRunner().invoke(main, ["invite", "sdg1662"], env=env)
    assert result.exit_code == 1 and "no SMS channel" in result.output


def test_invitations_past_the_backlog_wait(env: dict[str, str], engine: Engine,
                                          redis_client: redis.Redis, tmp_path: Path,
                                          sms_channel: int) -> None:
    """With a backlog of 2, five invitations: two queued, three held; the worker releases
    held ones only as room frees up, oldest first."""
    from sqlalchemy import update

    from gateway.config import load_settings
    from workers.outbound import release_held

    path = tmp_path / "c.csv"
    path.write_text("phone\n" + "".join(f"02011100{i:02d}\n" for i in range(5)))
    run(env, "contacts", "import", str(path), "--campaign", "sdg1662")
    code, out = run({**env, "CIVICDIAL_OUTBOX_BACKLOG": "2"}, "invite", "sdg1662", "--json")
    assert json.loads(out)["queued"] == 2 and json.loads(out)["held"] == 3
    settings = load_settings({**env, "CIVICDIAL_OUTBOX_BACKLOG": "2"})
    assert release_held(settings, engine, redis_client) == 0  # still full
    with Session(engine) as db, db.begin():  # the first one went out
        first = db.scalar(select(func.min(OutboundMessage.id)))
        db.execute(update(OutboundMessage).where(OutboundMessage.id == first)
                   .values(status="sent"))
    assert release_held(settings, engine, redis_client) == 1
    with Session(engine) as db:
        statuses = db.scalars(select(OutboundMessage.status).order_by(OutboundMessage.id)).all()
    assert statuses == ["sent", "queued", "queued", "held", "held"]
    assert redis_client.llen("rq:queue:civicdial-sms-bulk") == 3


def test_invite_a_filtered_subset(env: dict[str, str], engine: Engine,
                                  redis_client: redis.Redis, tmp_path: Path,
                                  sms_channel: int, client) -> None:  # type: ignore[no-untyped-def]
    """--region/--language/--where FIELD=VALUE/--limit pick who is invited (case and
    spaces aside); the rest can be invited later; the API takes the same filters."""
    path = tmp_path / "c.csv"
    path.write_text("phone,language,region,district\n"
                    "0241000001,twi,Ashanti,Kumasi\n0241000002,en,Ashanti,Obuasi\n"
                    "0241000003,en,ashanti ,Kumasi\n0241000004,en,Volta,Ho\n"
                    "0241000005,twi,Volta,Keta\n")
    assert run(env, "contacts", "import", str(path), "--campaign", "sdg1662")[0] == 0
    code, out = run(env, "invite", "sdg1662", "--region", "Ashanti", "--where",
                    "District=kumasi", "--json")
    assert code == 0, out
    assert json.loads(out) == {"queued": 2, "held": 0, "skipped_opted_out": 0,
                               "already_invited": 0}
    with Session(engine) as db:
        invited = db.execute(select(Contact.region, Contact.attributes).join(
            OutboundMessage, OutboundMessage.respondent == Contact.respondent)).all()
    assert sorted((region.strip(), json.loads(attributes)) for region, attributes in invited) \
        == [("Ashanti", {"district": "Kumasi"}), ("ashanti", {"district": "Kumasi"})]
    code, out = run(env, "invite", "sdg1662", "--where", "district")
    assert code != 0
    code, out = run(env, "invite", "sdg1662", "--language", "TWI", "--limit", "1", "--json")
    assert json.loads(out)["queued"] == 1

    from gateway.coordination.campaigns import create_token

    with Session(engine) as db, db.begin():
        token = create_token(db, "test", "c", "coordinator")
    headers = {"Authorization": f"Bearer {token}"}
    bad = client.post("/api/v1/campaigns/sdg1662/invitations", headers=headers,
                      json={"region": "Volta", "colour": "red"})
    assert bad.status_code == 422 and "colour" in bad.json["error"]
    resp = client.post("/api/v1/campaigns/sdg1662/invitations", headers=headers,
                       json={"region": "volta"})
    assert resp.status_code == 202, resp.json
    assert resp.json["queued"] == 1 and resp.json["already_invited"] == 1
    resp = client.post("/api/v1/campaigns/sdg1662/invitations", headers=headers)
    assert resp.json == {"queued": 1, "held": 0, "skipped_opted_out": 0,
                         "already_invited": 4}


def test_pausing_a_campaign_holds_its_invitations(env: dict[str, str], engine: Engine,
                                                  redis_client: redis.Redis, tmp_path: Path,
                                                  sms_channel: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Invitations queued before a pause are not sent while it lasts (held), and go out
    once the campaign is open again."""
    from rq import SimpleWorker

    for name, value in env.items():  # send jobs read their settings as a worker does
        monkeypatch.setenv(name, value)

    from gateway.store.outbox import BULK_QUEUE
    from workers.outbound import release_held

    path = tmp_path / "c.csv"
    path.write_text("phone\n0241000011\n0241000012\n")
    run(env, "contacts", "import", str(path), "--campaign", "sdg1662")
    assert json.loads(run(env, "invite", "sdg1662", "--json")[1])["queued"] == 2
    assert run(env, "campaign", "pause", "sdg1662")[0] == 0
    SimpleWorker([BULK_QUEUE], connection=redis_client).work(burst=True)
    with Session(engine) as db:
        assert set(db.scalars(select(OutboundMessage.status))) == {"held"}
    from gateway.config import load_settings

    settings = load_settings(env)
    assert release_held(settings, engine, redis_client) == 0  # still paused
    assert run(env, "campaign", "open", "sdg1662")[0] == 0
    assert release_held(settings, engine, redis_client) == 2
    with Session(engine) as db:
        assert set(db.scalars(select(OutboundMessage.status))) == {"queued"}
