"""What the citizen is told: how long it takes and who it is for (before consent), how to
skip an optional question, and how to see the results (only what the campaign delivers)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from gateway.coordination.bootstrap import shipped_questionnaire
from gateway.interview.engine import Input, Rules, SessionState, Stage, Step, step
from gateway.interview.questionnaire import load_questionnaire
from gateway.store.models import Channel
from gateway.store.registry import Registry

SHIPPED = shipped_questionnaire()
EN, TW = "English (en)", "Twi (tw)"
DIAL = "*920*16#"


def consent_screen(lang_choice: str, rules: Rules) -> str:
    first = step(SHIPPED, None, Input.open(0, "i"), rules)
    return step(SHIPPED, first.state, Input.answer(lang_choice, 1), rules).reply.text


@dataclass(frozen=True)
class Consent:
    label: str
    lang_choice: str
    rules: Rules
    contains: tuple[str, ...]
    absent: tuple[str, ...] = ()


CONSENTS = [
    Consent("USSD English, default budget", "1", Rules(),
            ("About 3 short parts.", "adults (18+)", "1 Yes, I agree")),
    Consent("USSD Twi, default budget", "2", Rules(),
            ("Ebeye ofa tiawa 3.", "mpanimfoo (18+)", "1 Aane")),
    Consent("USSD, a tighter budget means more parts", "1", Rules(budget_screens=10),
            ("About 5 short parts.",)),
    Consent("USSD, a budget that holds it all: one part, no note", "1",
            Rules(budget_screens=100), ("adults (18+)",), ("short parts",)),
    Consent("SMS: one conversation, no parts", "1", Rules.sms(), ("adults (18+)",),
            ("short parts",)),
]


@pytest.mark.parametrize("case", CONSENTS, ids=lambda c: c.label)
def test_consent_screen_says_adults_and_parts(case: Consent) -> None:
    """Before consent: for adults (18+), about N short parts, within the screen limit."""
    text = consent_screen(case.lang_choice, case.rules)
    for part in case.contains:
        assert part in text, text
    for part in case.absent:
        assert part not in text, text
    assert len(text) <= case.rules.body_limit
    assert not text.endswith("...")  # nothing clipped


def at(question: str, lang: str = EN, form=SHIPPED) -> SessionState:  # type: ignore[no-untyped-def]
    pos = next(q.index for q in form.questions if q.name == question)
    answers = (("consent", "yes"), ("age", "25_34")) if form is SHIPPED else ()
    return SessionState(version=form.version, interview="i", stage=Stage.QUESTION, lang=lang,
                        pos=pos, consented=True, seq=5, updated=10.0, session_started=10.0,
                        answers=answers)


def answer(state: SessionState, text: str, rules: Rules, form=SHIPPED) -> Step:  # type: ignore[no-untyped-def]
    return step(form, state, Input.answer(text, 11.0), rules)


@dataclass(frozen=True)
class Skip:
    label: str
    lang: str
    rules: Rules
    hint: str


SKIPS = [
    Skip("USSD English", EN, Rules(), "\n99 Skip"),
    Skip("USSD Twi", TW, Rules(), "\n99 Twa mu"),
    Skip("SMS English", EN, Rules.sms(), "\n99 Skip"),
    Skip("SMS Twi", TW, Rules.sms(), "\n99 Twa mu"),
]


@pytest.mark.parametrize("case", SKIPS, ids=lambda c: c.label)
def test_optional_question_says_how_to_skip(case: Skip) -> None:
    """The open 'what should improve' question shows its skip key; the key skips it."""
    before = at("g_used", case.lang)
    screen = answer(before, "2", case.rules)
    assert screen.reply.text.endswith(case.hint), screen.reply.text
    assert screen.state is not None
    skipped = answer(screen.state, "99", case.rules)
    assert skipped.events == ()  # nothing stored for 'improve'
    assert skipped.state is not None
    assert SHIPPED.questions[skipped.state.pos].name == "feedback"
    kept = answer(screen.state, "Shorter queues", case.rules)
    assert [(e.question, e.value) for e in kept.events] == [("improve", "Shorter queues")]


OPTIONAL_MD = (
    "| survey | type | name | label | required |\n"
    "| | select_one yn | consent | Join? | yes |\n"
    "| | select_one yn | pet | Do you have a pet? | |\n"
    "| | integer | kids | How many children? | |\n"
    "| | text | end | Anything else? | yes |\n\n"
    "| choices | list_name | name | label |\n| | yn | yes | Yes |\n| | yn | no | No |\n")


def test_optional_select_and_number_say_how_to_skip() -> None:
    """An optional select shows '(99 skips)'; an optional number question cannot use 99
    (it is a value) and says to send an empty reply."""
    form = load_questionnaire(OPTIONAL_MD.encode(), "optional.md")
    rules = Rules(budget_screens=100)
    lang = form.languages[0].key
    pet = answer(at("consent", lang, form), "1", rules, form)
    assert pet.reply.text == "Do you have a pet? (99 skips)\n1 Yes\n2 No"
    assert pet.state is not None
    kids = answer(pet.state, "99", rules, form)
    assert kids.reply.text == "How many children?\n(Optional: send an empty reply to skip.)"
    assert kids.state is not None
    assert [e.question for e in kids.events if e.kind == "answer"] == []
    assert [(e.question, e.value) for e in answer(kids.state, "99", rules, form).events] == [
        ("kids", "99")]
    assert answer(kids.state, "", rules, form).reply.text == "Anything else?"


@dataclass(frozen=True)
class Last:
    label: str
    lang: str
    rules: Rules
    expected: str


LASTS = [
    Last("USSD only, English: dial again", EN, Rules(),
         f"Thank you! Your answers are recorded. Dial {DIAL} later to see what people said."),
    Last("USSD only, Twi: dial again", TW, Rules(),
         f"Meda wo ase! Yeakyerew wo mmuae. Akyiri yi fre {DIAL} hwe nea nkurofo kae."),
    Last("USSD with an SMS channel, English", EN, Rules(results_by_sms=True),
         "Thank you! Your answers are recorded. Text RESULTS to see what people said."),
    Last("USSD with an SMS channel, Twi keyword NEA ABA", TW, Rules(results_by_sms=True),
         "Meda wo ase! Yeakyerew wo mmuae. Kyerew NEA ABA hwe nea nkurofo kae."),
    Last("SMS, Twi", TW, Rules.sms(),
         "Meda wo ase! Yɛakyerɛw wo mmuae. Kyerɛw NEA ABA hwɛ nea nkurɔfo kae."),
]


@pytest.mark.parametrize("case", LASTS, ids=lambda c: c.label)
def test_last_screen_offers_only_what_the_campaign_delivers(case: Last) -> None:
    """RESULTS by SMS only with an SMS channel, in the citizen's language's keyword."""
    done = answer(at("feedback", case.lang), "2", case.rules)
    assert done.reply.end and done.reply.text == case.expected


def test_registry_knows_whether_a_campaign_has_sms(engine: Engine, channel: Channel) -> None:
    """A USSD channel offers RESULTS by SMS once its campaign has an SMS channel."""
    registry = Registry(engine)
    assert registry.channel(channel.key).rules.results_by_sms is False  # type: ignore[union-attr]
    with Session(engine) as db, db.begin():
        db.add(Channel(key="sms-key", provider="africastalking", kind="sms", address="1662",
                       campaign_id=channel.campaign_id, config="{}"))
    registry.refresh()
    assert registry.channel(channel.key).rules.results_by_sms is True  # type: ignore[union-attr]
