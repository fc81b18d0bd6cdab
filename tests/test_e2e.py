"""Simulated citizens complete the questionnaire over HTTP; every answer lands once."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass, field

import redis
from flask.testing import FlaskClient
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.orm import Session

from gateway.config import Settings
from gateway.coordination.bootstrap import shipped_questionnaire
from gateway.coordination.status import campaign_status
from gateway.interview.questionnaire import Question
from gateway.store.models import Answer, Interview
from gateway.store.sessions import SessionStore, pseudonym
from workers.persist import drain

FORM = "application/x-www-form-urlencoded"
IMPROVE = "Fewer queues at the clinic"


@dataclass
class Citizen:
    """Answers each question the same way every time it is asked, so the expected
    answers are known whatever path (drops, retries, re-asks) the interview takes."""

    number: int
    rng: random.Random
    expected: dict[str, str] = field(default_factory=dict)
    sessions: int = 0
    part_breaks: int = 0
    session_id: str = ""
    history: list[str] = field(default_factory=list)

    @property
    def phone(self) -> str:
        return f"+2332470{self.number:05d}"

    def choice(self, question: Question) -> int:
        """0-based option index, fixed per (citizen, question)."""
        if question.name == "consent":
            return 0
        if question.name == "age":
            return 1 + (self.number % 6)  # adults only
        if question.name.endswith("_used"):
            return self.number % 2 if question.name == "h_used" else (self.number + 1) % 3
        seeded = random.Random(f"{self.number}:{question.name}")
        return seeded.randrange(len(question.choices))


def screen_question(body: str, by_label: dict[str, Question],
                    last: Question | None) -> Question | None:
    """The question on screen; after an error line the label may be clipped ('...'),
    and then it is the question just asked, asked again."""
    for line in body.splitlines()[:3]:  # an error line, the consent screen's parts note
        if line in by_label:
            return by_label[line]
    for line in body.splitlines()[1:3]:
        if not line.endswith("..."):
            continue
        if last is not None and last.labels["English (en)"].startswith(line[:-3]):
            return last
        if line.startswith("GSS asks adults"):  # the consent screen, after an error
            return by_label.get(next(k for k in by_label if k.startswith(line[:-3])))
    return None


def hop(client: FlaskClient, url: str, citizen: Citizen, text_in: str | None) -> str:
    """One hop, sent twice like an impatient provider; both replies must match."""
    if text_in is None:
        citizen.sessions += 1
        citizen.session_id = f"ATUid_{citizen.number}_{citizen.sessions}"
        citizen.history = []
    else:
        citizen.history.append(text_in)
    data = {"sessionId": citizen.session_id, "serviceCode": "*920*16#",
            "phoneNumber": citizen.phone, "networkCode": "62001",
            "text": "*".join(citizen.history)}
    first = client.post(url, data=data, content_type=FORM)
    again = client.post(url, data=data, content_type=FORM)
    assert first.status_code == again.status_code == 200, first.get_data(as_text=True)
    body = first.get_data(as_text=True)
    assert again.get_data(as_text=True) == body
    assert len(body) <= 160
    return body


def play(client: FlaskClient, url: str, citizen: Citizen,
         by_label: dict[str, Question]) -> None:
    body = hop(client, url, citizen, None)
    question: Question | None = None
    for _ in range(400):  # bounded: a full interview is well under 100 screens
        if body.startswith("END "):
            if "Thank you! Your answers" in body:
                return
            assert "Dial *920*16#" in body, body
            citizen.part_breaks += body.startswith("END Part ")
            body = hop(client, url, citizen, None)  # next part / resume
            continue
        screen = body[4:]
        if citizen.rng.random() < 0.05:  # the network drops the session
            body = hop(client, url, citizen, None)
            continue
        if screen.startswith("Language"):
            body = hop(client, url, citizen, "1")
            continue
        if screen.startswith("Welcome back"):
            body = hop(client, url, citizen, "1")
            continue
        question = screen_question(screen, by_label, question)
        assert question is not None, screen
        if question.is_select and citizen.rng.random() < 0.08:
            body = hop(client, url, citizen, citizen.rng.choice(["99", "abc", ""]))
            continue
        if question.type == "text":
            citizen.expected[question.name] = IMPROVE
            body = hop(client, url, citizen, IMPROVE)
            continue
        if question.type == "note":
            body = hop(client, url, citizen, "1")
            continue
        index = citizen.choice(question)
        shown = {int(m) for m in re.findall(r"^(\d+) ", screen, re.M)}
        if index + 1 not in shown:
            body = hop(client, url, citizen, "98")
            continue
        citizen.expected[question.name] = question.choices[index].name
        body = hop(client, url, citizen, str(index + 1))
    raise AssertionError(f"citizen {citizen.number} never finished")


def test_citizens_complete_and_every_answer_lands_once(
        client: FlaskClient, ussd_url: str, engine: Engine,
        redis_client: redis.Redis, settings: Settings) -> None:
    """20 citizens, drops, bad entries, part breaks and duplicate deliveries."""
    form = shipped_questionnaire()
    by_label = {q.labels["English (en)"]: q for q in form.questions if q.type != "calculate"}
    rng = random.Random(1662)
    citizens = [Citizen(n, random.Random(rng.random())) for n in range(20)]
    for citizen in citizens:
        play(client, ussd_url, citizen, by_label)
    # The questionnaire is longer than one USSD session's budget: everyone had parts.
    assert sum(c.part_breaks >= 1 for c in citizens) >= len(citizens) // 2
    store = SessionStore(redis_client)
    assert store.waiting() > 0
    drain(redis_client, engine, store.stream, batch=150)
    assert store.waiting() == 0

    stored: dict[str, dict[str, str | None]] = defaultdict(dict)
    with Session(engine) as db:
        by_interview = {iv.id: iv for iv in db.scalars(select(Interview))}
        for row in db.scalars(select(Answer)):
            assert row.question not in stored[row.interview_id], "answer stored twice"
            stored[row.interview_id][row.question] = row.value
    completed = [iv for iv in by_interview.values() if iv.status == "completed"]
    assert len(completed) == len(citizens)
    # One interview per citizen, nothing else (no stray or doubled interview), and each
    # citizen's interview holds exactly what that citizen chose.
    assert len(by_interview) == len(citizens)
    by_respondent = {iv.respondent: iv for iv in by_interview.values()}
    for citizen in citizens:
        iv = by_respondent[pseudonym(settings.pseudonym_key, citizen.phone)]
        assert iv.status == "completed"
        assert stored[iv.id] == citizen.expected, citizen.number
    report = campaign_status(engine, store)["campaigns"][0]
    assert report["interviews_completed"] == len(citizens)
    assert report["answers_stored"] == sum(len(c.expected) for c in citizens)
    assert report["events_waiting"] == 0
    # Skip logic reached SQL: services not used have no attribute answers.
    for citizen in citizens:
        if citizen.expected["h_used"] != "yes":
            assert "h_acc" not in citizen.expected
    # No phone number is stored anywhere in SQL.
    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            dump = " ".join(str(r) for r in conn.execute(text(f"SELECT * FROM {table}")))
            for citizen in citizens:
                assert citizen.phone[1:] not in dump
