"""A citizen's right to erasure: DELETE (ERASE, REMOVE, WITHDRAW, Twi PEPA) by SMS or the
USSD menu after completing, confirmed first; an `erased` event through the stream; every
answer, the contact number and the results subscription gone from SQL and Redis; the
audit log says an erasure happened, without identity; a published snapshot stays."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis
from click.testing import CliRunner
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, insert, select, text
from sqlalchemy.orm import Session
from test_sms import (  # noqa: F401 - fixtures
    ANSWERS,
    FORM,
    PHONE,
    SmsChannels,
    fake,
    sms,
    tw_sms,
    twiml_text,
    work,
)

from gateway.cli import main
from gateway.config import Settings
from gateway.indicator.estimates import Params
from gateway.indicator.exports import write_microdata
from gateway.indicator.tally import latest_snapshot, publish, run_tally
from gateway.interview.messages import message
from gateway.store.crypto import NumberBox
from gateway.store.models import (
    Answer,
    AuditEntry,
    Channel,
    Contact,
    FeedbackSubscriber,
    Interview,
    OutboundMessage,
)
from gateway.store.sessions import pseudonym

OTHER = "+233209999999"


def complete_by_sms(client: FlaskClient, sms: SmsChannels, phone: str, tag: str,  # noqa: F811
                    feedback: str = "yes") -> str:
    tw_sms(client, sms.tw, "SURVEY", f"{tag}0", phone=phone)
    for n, answer in enumerate([*ANSWERS[:-1], feedback], start=1):
        body = twiml_text(tw_sms(client, sms.tw, answer, f"{tag}{n}", phone=phone)[1])
    assert body.startswith("Thank you! Your answers are recorded"), body
    return body


def stream_kinds(r: redis.Redis) -> list[dict]:
    return [json.loads(f[b"e"]) for _, f in r.xrange("cd:events")]


def test_delete_by_sms_erases_everything_but_the_published_snapshot(
        client: FlaskClient, sms: SmsChannels, engine: Engine,  # noqa: F811
        redis_client: redis.Redis, settings: Settings, tmp_path: Path) -> None:
    """DELETE asks first; YES erases answers, subscription, contact and message bodies in
    every campaign; tallies and exports leave them out; the snapshot already published
    is not rewritten; the audit log holds counts, no pseudonym."""
    me = pseudonym(settings.pseudonym_key, PHONE)
    complete_by_sms(client, sms, PHONE, "A")
    complete_by_sms(client, sms, OTHER, "B")
    work(engine, redis_client)
    with Session(engine) as db, db.begin():
        db.execute(insert(Contact).values(respondent=me, recipient=NumberBox(
            settings.encryption_key).seal(PHONE), language="en", region="ashanti"))
        # An answer of theirs in another campaign (the erasure covers every campaign).
        db.execute(insert(Answer).values(
            interview_id="other-campaign-iv", campaign_id=999, respondent=me,
            questionnaire_version="v", question="sex", value="female", seq=2,
            event_id="other-campaign-iv-2", answered_at=func.now()))
        assert db.scalar(select(func.count()).select_from(FeedbackSubscriber)) == 2
    campaign_id = sms.tw.campaign_id
    run_tally(engine, campaign_id, params=Params(replicates=0))
    publish(settings, engine, redis_client, campaign_id)
    published = latest_snapshot(engine, campaign_id)
    assert published is not None

    ask = twiml_text(tw_sms(client, sms.tw, "DELETE", "D1")[1])
    assert ask.startswith("Erase all your answers to every survey")
    assert "published are not changed" in ask and "YES" in ask
    work(engine, redis_client)
    with Session(engine) as db:  # nothing erased before the YES
        assert db.scalar(select(func.count()).select_from(Answer)
                         .where(Answer.respondent == me)) > 0
    done = twiml_text(tw_sms(client, sms.tw, "yes", "D2")[1])
    assert done.startswith("Your answers, number and results request are erased")
    assert "published are not changed" in done
    erased = [e for e in stream_kinds(redis_client) if e["k"] == "erased"]
    assert erased == [{"id": f"erased:{sms.tw.id}:D2", "k": "erased", "r": me,
                       "ch": sms.tw.id, "t": erased[0]["t"]}]
    assert redis_client.get(f"cd:st:{campaign_id}:{me}") is None
    work(engine, redis_client)

    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(Answer)
                         .where(Answer.respondent == me)) == 0
        assert db.scalar(select(func.count()).select_from(Answer)) > 0  # the other's stay
        statuses = sorted(db.execute(select(Interview.status, Interview.respondent)
                                     .where(Interview.campaign_id == campaign_id)).all(),
                          key=str)
        assert [s for s, r in statuses if r is None] == ["erased"]
        assert db.scalars(select(FeedbackSubscriber.respondent)).all() == [
            pseudonym(settings.pseudonym_key, OTHER)]
        assert db.scalar(select(func.count()).select_from(Contact)) == 0
        bodies = db.execute(select(OutboundMessage.body, OutboundMessage.recipient)
                            .where(OutboundMessage.respondent == me)).all()
        assert all(b == "" and rcp == "" for b, rcp in bodies)
        (entry,) = db.scalars(select(AuditEntry).where(
            AuditEntry.action == "respondent.erase")).all()
        assert me not in entry.after + entry.before + entry.target
        assert json.loads(entry.after)["respondents"] == 1
        snapshot = latest_snapshot(engine, campaign_id)
    assert snapshot is not None and snapshot.id == published.id
    assert snapshot.result == published.result  # published figures are not rewritten
    again = run_tally(engine, campaign_id, params=Params(replicates=0))
    assert (again.n_interviews, again.n_completed) == (1, 1)
    out = tmp_path / "micro.csv"
    write_microdata(engine, campaign_id, out)
    assert me not in out.read_text()
    assert pseudonym(settings.pseudonym_key, OTHER) in out.read_text()


@pytest.mark.parametrize("word", ["DELETE", "erase", "Remove", "WITHDRAW", "PEPA"])
def test_every_erase_word_asks_for_confirmation(client: FlaskClient, sms: SmsChannels,  # noqa: F811
                                                word: str) -> None:
    """The English words and the Twi word all lead to the same confirmation step."""
    reply = twiml_text(tw_sms(client, sms.tw, word, f"W{word}")[1])
    assert reply.startswith("Erase all your answers")


def test_anything_but_yes_keeps_the_answers(client: FlaskClient, sms: SmsChannels,  # noqa: F811
                                            redis_client: redis.Redis) -> None:
    """After DELETE, another message cancels it: a later YES erases nothing."""
    tw_sms(client, sms.tw, "SURVEY", "K0")
    tw_sms(client, sms.tw, "1", "K1")
    tw_sms(client, sms.tw, "DELETE", "K2")
    assert twiml_text(tw_sms(client, sms.tw, "1", "K3")[1]).startswith("What is your sex?")
    assert not twiml_text(tw_sms(client, sms.tw, "yes", "K4")[1]).startswith("Your answers")
    assert [e for e in stream_kinds(redis_client) if e["k"] == "erased"] == []


def test_help_mentions_delete(client: FlaskClient, sms: SmsChannels) -> None:  # noqa: F811
    """HELP says how to erase, in English and Twi."""
    assert "DELETE to erase your answers" in twiml_text(tw_sms(client, sms.tw, "HELP", "H1")[1])
    assert "PEPA" in message("tw", "help", keyword="SURVEY")


def ussd(client: FlaskClient, channel: Channel, text: str, session: str) -> str:
    return client.post(f"/webhooks/africastalking/{channel.key}/ussd", content_type=FORM,
                       data=urlencode({"sessionId": session, "serviceCode": "*920*16#",
                                       "phoneNumber": PHONE, "networkCode": "62001",
                                       "text": text})).get_data(as_text=True)


def test_delete_from_the_ussd_menu_after_dialling(
        client: FlaskClient, sms: SmsChannels, channel: Channel, engine: Engine,  # noqa: F811
        redis_client: redis.Redis, settings: Settings) -> None:
    """Dialling after completing: 2 Delete my answers, then 1 Yes (2 No keeps them)."""
    me = pseudonym(settings.pseudonym_key, PHONE)
    complete_by_sms(client, sms, PHONE, "U")
    assert ussd(client, channel, "", "S1").startswith("CON You have already completed")
    confirm = ussd(client, channel, "2", "S1")
    assert confirm.startswith("CON Erase all your answers") and "1 Yes, erase" in confirm
    assert ussd(client, channel, "2*2", "S1") == "END Nothing was erased."
    assert [e for e in stream_kinds(redis_client) if e["k"] == "erased"] == []
    ussd(client, channel, "", "S2")
    ussd(client, channel, "2", "S2")
    done = ussd(client, channel, "2*1", "S2")
    assert done.startswith("END Your answers, number and results request are erased")
    assert len(done) <= 160
    assert [e["r"] for e in stream_kinds(redis_client) if e["k"] == "erased"] == [me]
    assert redis_client.get(f"cd:st:{channel.campaign_id}:{me}") is None
    work(engine, redis_client)
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(Answer)
                         .where(Answer.respondent == me)) == 0
    # Now a new dial is a new interview, not the menu.
    assert ussd(client, channel, "", "S3").startswith("CON Language")


def test_delete_from_the_ussd_menu_while_sql_fails(
        client: FlaskClient, sms: SmsChannels, channel: Channel, engine: Engine,  # noqa: F811
        redis_client: redis.Redis, settings: Settings) -> None:
    """Erasing needs every channel (to forget the state in every campaign in Redis); with
    SQL failing the hop uses the web process's cached list, and the erasure still lands
    in SQL once the worker can write (here the channels table is gone meanwhile: a real
    error from the real database)."""
    me = pseudonym(settings.pseudonym_key, PHONE)
    complete_by_sms(client, sms, PHONE, "V")
    work(engine, redis_client)
    assert ussd(client, channel, "", "S1").startswith("CON You have already completed")
    assert ussd(client, channel, "2", "S1").startswith("CON Erase all your answers")
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE channels RENAME TO channels_away"))
    try:
        done = ussd(client, channel, "2*1", "S1")
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE channels_away RENAME TO channels"))
    assert done.startswith("END Your answers, number and results request are erased")
    assert redis_client.get(f"cd:st:{sms.tw.campaign_id}:{me}") is None
    work(engine, redis_client)
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(Answer)
                         .where(Answer.respondent == me)) == 0


def test_delete_from_the_resume_screen_while_an_interview_is_unfinished(
        client: FlaskClient, channel: Channel, engine: Engine, redis_client: redis.Redis,
        settings: Settings) -> None:
    """USSD has no DELETE keyword: a citizen who dials back into an unfinished interview
    gets "3 Delete my answers" beside Continue / Start again, with the same confirmation
    (2 keeps everything); after YES their partial answers are gone and a new dial starts
    afresh."""
    me = pseudonym(settings.pseudonym_key, PHONE)
    assert ussd(client, channel, "", "P1").startswith("CON Language")
    ussd(client, channel, "1", "P1")
    ussd(client, channel, "1*1", "P1")  # consent
    sex = ussd(client, channel, "1*1*1", "P1")
    assert not sex.startswith("END")  # the session dropped here, mid-interview
    work(engine, redis_client)
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(Answer)
                         .where(Answer.respondent == me)) == 2  # consent, sex
    resume = ussd(client, channel, "", "P2")
    assert resume.startswith("CON Welcome back.\n1 Continue\n2 Start again\n3 Delete my "
                             "answers"), resume
    assert ussd(client, channel, "3", "P2").startswith("CON Erase all your answers")
    assert ussd(client, channel, "3*2", "P2") == "END Nothing was erased."
    assert ussd(client, channel, "", "P3").startswith("CON Welcome back.")
    assert ussd(client, channel, "1", "P3").startswith("CON ")  # continue: the next question
    ussd(client, channel, "", "P4")
    ussd(client, channel, "3", "P4")
    done = ussd(client, channel, "3*1", "P4")
    assert done.startswith("END Your answers, number and results request are erased")
    assert ussd(client, channel, "3*1", "P4") == done  # a retry of the last hop
    assert [e["r"] for e in stream_kinds(redis_client) if e["k"] == "erased"] == [me]
    work(engine, redis_client)
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(Answer)
                         .where(Answer.respondent == me)) == 0
        assert set(db.scalars(select(Interview.status))) == {"erased"}
    assert ussd(client, channel, "", "P5").startswith("CON Language")


def test_contacts_erase_refuses_a_non_number_and_asks_first(
        client: FlaskClient, sms: SmsChannels, engine: Engine, redis_client: redis.Redis,  # noqa: F811
        env: dict[str, str], settings: Settings) -> None:
    me = pseudonym(settings.pseudonym_key, PHONE)
    complete_by_sms(client, sms, PHONE, "C")
    work(engine, redis_client)
    runner = CliRunner()
    bad = runner.invoke(main, ["contacts", "erase", "0000abc"], env=env)
    assert bad.exit_code == 1 and "not a phone number" in bad.output
    kept = runner.invoke(main, ["contacts", "erase", PHONE], input="n\n", env=env)
    assert kept.exit_code == 1 and "Aborted" in kept.output
    # --json asks nothing, so it does nothing without --yes.
    unasked = runner.invoke(main, ["contacts", "erase", PHONE, "--json"], env=env)
    assert unasked.exit_code == 2 and "add --yes to erase" in unasked.output

    def held() -> int:
        with Session(engine) as db:
            return db.scalar(select(func.count()).select_from(Answer)
                             .where(Answer.respondent == me)) or 0

    assert held() == len(ANSWERS) - 1
    done = runner.invoke(main, ["contacts", "erase", PHONE, "--yes"], env=env)
    assert done.exit_code == 0 and f"{len(ANSWERS) - 1} answers" in done.output
    assert held() == 0
    assert redis_client.get(f"cd:st:{sms.tw.campaign_id}:{me}") is None
    with Session(engine) as db:
        (entry,) = db.scalars(select(AuditEntry).where(
            AuditEntry.action == "respondent.erase")).all()
    assert entry.actor.startswith("cli") and me not in entry.after
    # The interview stays an anonymous count: started, no longer completed, erased.
    status = runner.invoke(main, ["status", "--json"], env=env)
    (campaign,) = [c for c in json.loads(status.output)["campaigns"]
                   if c["id"] == sms.tw.campaign_id]
    assert (campaign["interviews_started"], campaign["interviews_completed"],
            campaign["erased"], campaign["withdrawn"]) == (1, 0, 1, 0)
