"""End to end over the shared USSD hop: citizens complete over Hubtel with every request
sent twice and every answer lands once in SQL; a citizen starts on Hubtel and finishes on
Africa's Talking (same campaign, same person)."""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

import redis
from flask.testing import FlaskClient
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.orm import Session
from test_e2e import screen_question
from test_hubtel import add_hubtel_channel

from gateway.coordination.bootstrap import shipped_questionnaire
from gateway.coordination.status import campaign_status
from gateway.interview.questionnaire import Question
from gateway.store.models import Answer, Channel, Interview, UssdSessionEnd
from gateway.store.sessions import SessionStore
from workers.persist import drain

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
IMPROVE = "Fewer queues at the clinic"


@dataclass
class Citizen:
    """Answers each question the same way every time it is asked."""

    number: int
    rng: random.Random
    expected: dict[str, str] = field(default_factory=dict)
    sessions: int = 0
    part_breaks: int = 0
    hops: int = 0
    session_id: str = ""
    sequence: int = 0  # Hubtel: the last request's Sequence in this session
    history: list[str] = field(default_factory=list)  # Africa's Talking: inputs so far

    @property
    def phone(self) -> str:
        return f"+2332471{self.number:05d}"

    def choice(self, question: Question) -> int:
        if question.name == "consent":
            return 0
        if question.name == "age":
            return 1 + (self.number % 6)
        if question.name.endswith("_used"):
            return self.number % 2 if question.name == "h_used" else (self.number + 1) % 3
        return random.Random(f"{self.number}:{question.name}").randrange(len(question.choices))


@dataclass(frozen=True)
class Shown:
    text: str
    end: bool
    field_type: str = ""  # Hubtel's FieldType


class Dialler(Protocol):
    def dial(self, citizen: Citizen) -> Shown: ...
    def answer(self, citizen: Citizen, text: str) -> Shown: ...
    def drop(self, citizen: Citizen) -> None: ...


@dataclass
class Hubtel:
    """Hubtel's requests (SDK shape), each sent twice like a retrying aggregator."""

    client: FlaskClient
    url: str

    def _send(self, citizen: Citizen, type_: str, message: str) -> Shown:
        body = json.dumps({
            "Type": type_, "Mobile": citizen.phone[1:], "SessionId": citizen.session_id,
            "ServiceCode": "713*20", "Message": message, "Operator": "mtn",
            "Sequence": citizen.sequence, "ClientState": "", "Platform": "USSD",
            "ExtraData": {}})
        first = self.client.post(self.url, data=body, content_type=JSON)
        again = self.client.post(self.url, data=body, content_type=JSON)
        assert first.status_code == again.status_code == 200, first.get_data(as_text=True)
        assert first.get_data() == again.get_data()
        reply = json.loads(first.get_data())
        assert reply["SessionId"] == citizen.session_id
        assert reply["DataType"] == ("display" if reply["Type"] == "release" else "input")
        assert len(reply["Message"]) <= 160
        citizen.hops += 1
        return Shown(reply["Message"], reply["Type"] == "release", reply["FieldType"])

    def dial(self, citizen: Citizen) -> Shown:
        citizen.sessions += 1
        citizen.session_id = f"hubtel-{citizen.number}-{citizen.sessions}"
        citizen.sequence = 1
        return self._send(citizen, "initiation", "*713*20#")

    def answer(self, citizen: Citizen, text: str) -> Shown:
        citizen.sequence += 1
        return self._send(citizen, "response", text)

    def drop(self, citizen: Citizen) -> None:
        """The session ends under the citizen: sometimes Hubtel says so (timeout)."""
        if citizen.rng.random() < 0.5:
            citizen.sequence += 1
            self._send(citizen, "timeout", "")


@dataclass
class AfricasTalking:
    client: FlaskClient
    url: str

    def _send(self, citizen: Citizen) -> Shown:
        data = {"sessionId": citizen.session_id, "serviceCode": "*920*16#",
                "phoneNumber": citizen.phone, "networkCode": "62001",
                "text": "*".join(citizen.history)}
        first = self.client.post(self.url, data=data, content_type=FORM)
        again = self.client.post(self.url, data=data, content_type=FORM)
        assert first.status_code == again.status_code == 200, first.get_data(as_text=True)
        body = first.get_data(as_text=True)
        assert again.get_data(as_text=True) == body and len(body) <= 160
        citizen.hops += 1
        return Shown(body[4:], body.startswith("END "))

    def dial(self, citizen: Citizen) -> Shown:
        citizen.sessions += 1
        citizen.session_id = f"ATUid_{citizen.number}_{citizen.sessions}"
        citizen.history = []
        return self._send(citizen)

    def answer(self, citizen: Citizen, text: str) -> Shown:
        citizen.history.append(text)
        return self._send(citizen)

    def drop(self, citizen: Citizen) -> None:
        pass


def by_label() -> dict[str, Question]:
    form = shipped_questionnaire()
    return {q.labels["English (en)"]: q for q in form.questions if q.type != "calculate"}


def play(dialler: Dialler, citizen: Citizen, labels: dict[str, Question],
         switch: tuple[int, Dialler] | None = None) -> None:
    """Walk the interview to its end: drops, typos, paging, part breaks. With `switch`
    (hops, other), the session is dropped after that many hops and the citizen dials
    again on the other provider."""
    shown = dialler.dial(citizen)
    question: Question | None = None
    for _ in range(400):  # bounded: a full interview is well under 100 screens
        if switch and citizen.hops >= switch[0] and not shown.end:
            dialler.drop(citizen)
            dialler, switch = switch[1], None
            shown = dialler.dial(citizen)
            assert shown.text.startswith("Welcome back"), shown
            continue
        if shown.end:
            if "Thank you! Your answers" in shown.text:
                return
            assert "Dial " in shown.text, shown
            citizen.part_breaks += shown.text.startswith("Part ")
            shown = dialler.dial(citizen)
            continue
        screen = shown.text
        if citizen.rng.random() < 0.05:  # the network drops the session
            dialler.drop(citizen)
            shown = dialler.dial(citizen)
            continue
        if screen.startswith(("Language", "Welcome back")):
            assert shown.field_type in ("", "number")
            shown = dialler.answer(citizen, "1")
            continue
        question = screen_question(screen, labels, question)
        assert question is not None, screen
        assert shown.field_type in ("", "text" if question.type == "text" else "number")
        if question.is_select and citizen.rng.random() < 0.08:
            shown = dialler.answer(citizen, citizen.rng.choice(["99", "abc", ""]))
            continue
        if question.type == "text":
            citizen.expected[question.name] = IMPROVE
            shown = dialler.answer(citizen, IMPROVE)
            continue
        if question.type == "note":
            shown = dialler.answer(citizen, "1")
            continue
        index = citizen.choice(question)
        if index + 1 not in {int(m) for m in re.findall(r"^(\d+) ", screen, re.M)}:
            shown = dialler.answer(citizen, "98")
            continue
        citizen.expected[question.name] = question.choices[index].name
        shown = dialler.answer(citizen, str(index + 1))
    raise AssertionError(f"citizen {citizen.number} never finished")


def stored_answers(engine: Engine) -> tuple[dict[str, Interview], dict[str, dict[str, str]]]:
    """Interviews by id, and each one's answers; fails if any answer is stored twice."""
    stored: dict[str, dict[str, str]] = defaultdict(dict)
    with Session(engine) as db:
        interviews = {iv.id: iv for iv in db.scalars(select(Interview))}
        for row in db.scalars(select(Answer)):
            assert row.question not in stored[row.interview_id], "answer stored twice"
            stored[row.interview_id][row.question] = row.value or ""
    return interviews, stored


def test_citizens_complete_over_hubtel_and_every_answer_lands_once(
        client: FlaskClient, engine: Engine, channel: Channel,
        redis_client: redis.Redis) -> None:
    """12 citizens over Hubtel, every request sent twice, with drops (some reported as
    timeouts), bad entries, paging and part breaks."""
    hubtel = add_hubtel_channel(engine)
    dialler = Hubtel(client, f"/webhooks/hubtel/{hubtel.key}/ussd")
    labels = by_label()
    rng = random.Random(713)
    citizens = [Citizen(n, random.Random(rng.random())) for n in range(12)]
    for citizen in citizens:
        play(dialler, citizen, labels)
    assert sum(c.part_breaks >= 1 for c in citizens) >= len(citizens) // 2
    store = SessionStore(redis_client)
    drain(redis_client, engine, store.stream, batch=150)
    assert store.waiting() == 0

    interviews, stored = stored_answers(engine)
    completed = [iv for iv in interviews.values() if iv.status == "completed"]
    assert len(completed) == len(citizens)
    assert {iv.channel_id for iv in completed} == {hubtel.id}
    assert sorted(tuple(sorted(stored[iv.id].items())) for iv in completed) == sorted(
        tuple(sorted(c.expected.items())) for c in citizens)
    report = campaign_status(engine, store)["campaigns"][0]
    assert report["interviews_completed"] == len(citizens)
    assert report["answers_stored"] == sum(len(c.expected) for c in citizens)
    with Session(engine) as db:
        ends = db.scalars(select(UssdSessionEnd)).all()
    assert ends and {e.status for e in ends} == {"timeout"}
    assert len({e.session_id for e in ends}) == len(ends)  # each recorded once
    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            dump = " ".join(str(r) for r in conn.execute(text(f"SELECT * FROM {table}")))
            for citizen in citizens:
                assert citizen.phone[1:] not in dump


def test_start_on_hubtel_and_finish_on_africastalking(
        client: FlaskClient, engine: Engine, channel: Channel, ussd_url: str,
        redis_client: redis.Redis) -> None:
    """One person, one campaign, two aggregators: the interview started on Hubtel is
    offered to continue on Africa's Talking and finishes there, each answer once."""
    hubtel = add_hubtel_channel(engine)
    labels = by_label()
    citizen = Citizen(7, random.Random(16))
    citizen.rng.random = lambda: 0.3  # type: ignore[method-assign]  # no drops or typos; a timeout at the switch
    play(Hubtel(client, f"/webhooks/hubtel/{hubtel.key}/ussd"), citizen, labels,
         switch=(6, AfricasTalking(client, ussd_url)))
    assert citizen.session_id.startswith("ATUid_")
    drain(redis_client, engine, SessionStore(redis_client).stream)
    interviews, stored = stored_answers(engine)
    (interview,) = interviews.values()
    assert interview.status == "completed"
    assert stored[interview.id] == citizen.expected
    assert {"consent", "sex", "age"} <= stored[interview.id].keys()
