"""SMS details real providers hit: every delivery status mapped (an unknown one logged and
accepted), Twilio status callbacks from the channel itself, `channels set`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlencode

import pytest
import redis
from click.testing import CliRunner
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from test_sms import (  # noqa: F401 - fixtures
    FORM,
    TWILIO_SID,
    SmsChannels,
    fake,
    queue_messages,
    signed_post,
    sms,
    work,
)

from gateway.cli import main
from gateway.store.models import AuditEntry, Campaign, Channel, OutboundMessage
from gateway.store.outbox import sweep


@dataclass(frozen=True)
class Report:
    label: str
    provider: str
    status: str  # as the provider sends it
    expected: str  # the message's status afterwards
    http: int = 200


REPORTS = [
    Report("AT Sent", "africastalking", "Sent", "sent"),
    Report("AT Submitted", "africastalking", "Submitted", "sent"),
    Report("AT Buffered", "africastalking", "Buffered", "sent"),
    Report("AT Success", "africastalking", "Success", "delivered"),
    Report("AT Failed", "africastalking", "Failed", "failed"),
    Report("AT Rejected", "africastalking", "Rejected", "rejected"),
    Report("AT Expired (courier: failed)", "africastalking", "Expired", "failed"),
    Report("AT AbsentSubscriber", "africastalking", "AbsentSubscriber", "failed"),
    Report("AT unknown: logged, accepted, message unchanged", "africastalking", "Lost", "sent"),
    Report("Twilio accepted", "twilio", "accepted", "sent", 204),
    Report("Twilio scheduled", "twilio", "scheduled", "sent", 204),
    Report("Twilio delivered", "twilio", "delivered", "delivered", 204),
    Report("Twilio read", "twilio", "read", "delivered", 204),
    Report("Twilio undelivered", "twilio", "undelivered", "undelivered", 204),
    Report("Twilio partially_delivered", "twilio", "partially_delivered", "undelivered", 204),
    Report("Twilio failed", "twilio", "failed", "failed", 204),
    Report("Twilio canceled", "twilio", "canceled", "failed", 204),
    Report("Twilio unknown: logged, accepted, message unchanged", "twilio", "lost", "sent"),
]


@pytest.mark.parametrize("case", REPORTS, ids=lambda c: c.label)
def test_delivery_status(case: Report, client: FlaskClient, sms: SmsChannels,  # noqa: F811
                         engine: Engine, redis_client: redis.Redis, settings,  # type: ignore[no-untyped-def]
                         caplog: pytest.LogCaptureFixture) -> None:
    """A report for a message we sent moves it to the mapped status."""
    ch = sms.at if case.provider == "africastalking" else sms.tw
    queue_messages(engine, settings, ch, 1)
    sweep(settings, engine, redis_client, older_than=timedelta(0))
    work(engine, redis_client)
    with Session(engine) as db:
        sid = db.scalar(select(OutboundMessage.provider_id))
        assert db.scalar(select(OutboundMessage.status)) == "sent"
    caplog.set_level("WARNING", logger="civicdial.webhooks")
    if case.provider == "africastalking":
        resp = client.post(f"/webhooks/africastalking/{ch.key}/sms/delivery",
                           content_type=FORM, data=urlencode({
                               "id": sid, "status": case.status, "phoneNumber": "+23320000000",
                               "networkCode": "62001", "retryCount": "0"}))
        code = resp.status_code
    else:
        code, _ = signed_post(client, f"/webhooks/twilio/{ch.key}/status", {
            "MessageSid": sid, "MessageStatus": case.status, "AccountSid": TWILIO_SID,
            "From": "+15005550006", "To": "+23320000000", "ApiVersion": "2010-04-01"})
    assert code == case.http
    work(engine, redis_client)
    with Session(engine) as db:
        assert db.scalar(select(OutboundMessage.status)) == case.expected
    unknown = "unknown" in case.label
    assert any("unknown" in r.getMessage() and case.status in r.getMessage()
               for r in caplog.records) is unknown


def test_twilio_status_callback_comes_from_the_channel(
        sms: SmsChannels, engine: Engine, redis_client: redis.Redis, settings,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """With a public base URL, every Twilio send asks for status callbacks at the
    channel's own status URL; an explicit config value still wins."""
    monkeypatch.setenv("CIVICDIAL_PUBLIC_BASE_URL", "https://survey.example.org")
    queue_messages(engine, settings, sms.tw, 1)
    sweep(settings, engine, redis_client, older_than=timedelta(0))
    work(engine, redis_client)
    assert sms.fake.accepted[-1]["status_callback"] == (
        f"https://survey.example.org/webhooks/twilio/{sms.tw.key}/status")
    with Session(engine) as db, db.begin():
        ch = db.get(Channel, sms.tw.id)
        assert ch is not None
        ch.config = json.dumps({**json.loads(ch.config), "status_callback": "https://x/cb"})
    with Session(engine) as db, db.begin():
        db.execute(OutboundMessage.__table__.update().values(key="bulk:done"))
    queue_messages(engine, settings, sms.tw, 1, prefix="+23321")
    sweep(settings, engine, redis_client, older_than=timedelta(0))
    work(engine, redis_client)
    assert sms.fake.accepted[-1]["status_callback"] == "https://x/cb"


def test_channels_set_merges_config_and_audits_key_names(
        env: dict[str, str], engine: Engine, sms: SmsChannels) -> None:  # noqa: F811
    """`channels set KEY --config` merges keys (null removes one); the audit log names
    the keys, never their values."""
    result = CliRunner().invoke(main, ["channels", "set", sms.tw.key, "--config",
                                       '{"reply": "queue", "auth_token": "new-secret", '
                                       '"rate_per_second": null}'], env=env)
    assert result.exit_code == 0, result.output
    with Session(engine) as db:
        config = json.loads(db.get(Channel, sms.tw.id).config)  # type: ignore[union-attr]
        entry = db.scalars(select(AuditEntry).where(AuditEntry.action == "channel.set")).one()
    assert config["reply"] == "queue" and config["auth_token"] == "new-secret"
    assert config["account_sid"] == TWILIO_SID and "rate_per_second" not in config
    assert "new-secret" not in entry.before + entry.after
    assert json.loads(entry.after)["changed"] == ["auth_token", "rate_per_second", "reply"]
    result = CliRunner().invoke(main, ["channels", "set", f"#{sms.at.id}", "--config",
                                       '{"sender_id": "GSS2"}', "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert "sender_id" in json.loads(result.output)["config_keys"]
    for bad in (["nope", "--config", "{}"], [sms.at.key, "--config", "[1]"],
                ["#99999999999999999999", "--config", "{}"]):  # an id no column holds
        result = CliRunner().invoke(main, ["channels", "set", *bad], env=env)
        assert result.exit_code in (1, 2) and "Traceback" not in result.output
        assert "no channel" in result.output or "JSON object" in result.output


def test_outbound_by_status_in_campaign_status_and_status_json(
        env: dict[str, str], engine: Engine, sms: SmsChannels, settings) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    """`campaign status [--json]` and `status --json` count outbound SMS by status."""
    queue_messages(engine, settings, sms.at, 3)
    with Session(engine) as db, db.begin():
        db.execute(OutboundMessage.__table__.update()
                   .where(OutboundMessage.key == "bulk:0").values(status="failed"))
    runner = CliRunner()
    result = runner.invoke(main, ["campaign", "status", "sdg1662", "--json"], env=env)
    assert json.loads(result.output)["outbound_by_status"] == {"failed": 1, "queued": 2}
    result = runner.invoke(main, ["campaign", "status", "sdg1662"], env=env)
    assert "outbound SMS: 1 failed, 2 queued" in result.output
    result = runner.invoke(main, ["status", "--json"], env=env)
    assert json.loads(result.output)["campaigns"][0]["outbound_by_status"] == {
        "failed": 1, "queued": 2}


@pytest.mark.parametrize(("keyword", "why"), [
    ("STOP", "'stop'"), ("gyae", "'stop'"), ("HELP", "'help'"), ("RESULTS", "'results'"),
    ("DELETE", "'delete'"), ("YES", "confirms"), ("two words", "one word"), ("", "one word"),
])
def test_the_survey_keyword_cannot_be_a_command_word(env: dict[str, str], engine: Engine,
                                                    channel: Channel, keyword: str,
                                                    why: str) -> None:
    """STOP as the keyword would start the survey where a citizen asked to opt out."""
    result = CliRunner().invoke(main, ["campaign", "set", "sdg1662", "--sms-keyword", keyword],
                                env=env)
    assert result.exit_code == 2 and why in result.output, result.output
    assert "Traceback" not in result.output
    with Session(engine) as db:
        assert db.scalar(select(Campaign.sms_keyword)) == "SURVEY"
    assert CliRunner().invoke(main, ["campaign", "set", "sdg1662", "--sms-keyword", "kasa2"],
                              env=env).exit_code == 0


BAD_CONFIGS = [
    ("twilio", '{"account_sid": "AC1"}', "needs auth_token"),
    ("twilio", '{"account_sid": "AC1", "auth_token": " "}', "needs auth_token"),
    ("africastalking", '{"username": "sandbox"}', "needs api_key"),
    ("africastalking", '{"username": "s", "api_key": "k", "rate_per_second": "fast"}',
     "rate_per_second must be a number"),
    ("africastalking", '{"username": "s", "api_key": "k", "rate_per_second": -1}',
     "rate_per_second must be a number of at least 0"),
    ("africastalking", '{"username": "s", "api_key": "k", "batch_size": 2.5}',
     "batch_size must be a whole number"),
    ("africastalking", '{"username": "s", "api_key": "k", "timeout": 0}', "timeout"),
    ("twilio", '{"account_sid": "AC1", "auth_token": "t", "reply": "later"}', "reply is"),
]


@pytest.mark.parametrize(("provider", "config", "why"), BAD_CONFIGS)
def test_a_channel_config_its_sends_cannot_use_is_refused(
        env: dict[str, str], engine: Engine, sms: SmsChannels, provider: str,  # noqa: F811
        config: str, why: str) -> None:
    """At `channels add` and `channels set`: a Twilio channel with no auth_token refused
    every inbound message (403), a rate_per_second of "fast" failed every send."""
    with Session(engine) as db:
        before = db.scalar(select(func.count()).select_from(Channel))
    add = CliRunner().invoke(main, ["channels", "add", "--provider", provider, "--kind",
                                    "sms", "--address", "+233200000999", "--campaign",
                                    "sdg1662", "--config", config], env=env)
    assert add.exit_code == 1 and why in add.output and "Traceback" not in add.output
    target = sms.tw if provider == "twilio" else sms.at
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(Channel)) == before
        kept = db.get(Channel, target.id).config  # type: ignore[union-attr]
    changes = json.loads(config)
    if why.startswith("needs ") and why.split()[-1] not in changes:
        changes[why.split()[-1]] = None  # set removes it
    set_ = CliRunner().invoke(main, ["channels", "set", target.key, "--config",
                                     json.dumps(changes)], env=env)
    assert set_.exit_code == 1 and why in set_.output, set_.output
    with Session(engine) as db:
        assert db.get(Channel, target.id).config == kept  # type: ignore[union-attr]

