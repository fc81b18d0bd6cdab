"""The interview state machine: step(questionnaire, state, input) -> Step(state, reply, events).

Pure: no I/O, no clock, no randomness (the caller passes `now` and a fresh interview
id in the Input), so every path is testable as a table of inputs and expected screens.
Imports nothing from flask, redis, sqlalchemy or rq (a test checks).

Stages: LANGUAGE (choose language) -> QUESTION (consent first, then the form) -> DONE.
RESUME is the "1 Continue 2 Start again" screen shown when a dropped session is dialled
again. Nothing a respondent says is emitted as an event before consent.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from enum import StrEnum

from gateway.interview import render
from gateway.interview.messages import message
from gateway.interview.questionnaire import (
    CONSENT,
    INELIGIBLE,
    Language,
    Question,
    Questionnaire,
)


class Stage(StrEnum):
    LANGUAGE = "L"
    QUESTION = "Q"
    RESUME = "R"
    DONE = "D"


class InputKind(StrEnum):
    OPEN = "open"  # a new provider session: a dial, or a keyword
    TEXT = "text"  # one answer typed by the respondent
    LANG = "lang"  # the respondent asked to switch language (SMS keyword)


@dataclass(frozen=True)
class Input:
    kind: InputKind
    now: float
    text: str = ""
    # Used only if this step starts a new interview; the engine has no randomness.
    new_interview: str = ""

    @classmethod
    def open(cls, now: float, new_interview: str) -> Input:
        return cls(InputKind.OPEN, now, "", new_interview)

    @classmethod
    def answer(cls, text: str, now: float, new_interview: str = "") -> Input:
        return cls(InputKind.TEXT, now, text, new_interview)

    @classmethod
    def switch_language(cls, now: float, new_interview: str = "") -> Input:
        return cls(InputKind.LANG, now, "", new_interview)


@dataclass(frozen=True)
class Rules:
    """Per-campaign, per-channel settings the engine obeys."""

    # ussd: one short screen at a time, paged; sms: a whole question per message.
    kind: str = "ussd"
    screen_limit: int = 160  # characters, including the 4-char CON/END prefix
    budget_seconds: int = 120
    budget_screens: int = 15
    resume_window: int = 24 * 3600
    max_invalid: int = 3
    dial: str = "*920*16#"  # USSD: the code to dial again; SMS: the keyword to text
    fold: bool = True  # fold to plain characters (USSD)
    # Quotas: the questions that define a cell, and the cells already full ("a|b"). A
    # respondent is screened out when the last of these questions puts them in a full cell.
    quota_on: tuple[str, ...] = ()
    full_cells: frozenset[str] = frozenset()
    # The form's languages this campaign offers (language keys); empty: all of them.
    languages: tuple[str, ...] = ()
    # The campaign has an SMS channel, so RESULTS can be texted (SMS rules always can).
    results_by_sms: bool = False
    # USSD has no DELETE keyword: the resume screen offers "3 Delete my answers", whose
    # confirmation the channel runs (gateway/channels/after_completion.py), never step().
    erase_on_resume: bool = False

    @property
    def body_limit(self) -> int:
        return self.screen_limit - 4 if self.kind == "ussd" else self.screen_limit

    @classmethod
    def sms(cls, keyword: str = "SURVEY", max_invalid: int = 3,
            resume_window: int = 24 * 3600, fold: bool = False,
            quota_on: tuple[str, ...] = (), languages: tuple[str, ...] = ()) -> Rules:
        """SMS: no screen budget (no operator cuts the conversation), no paging. Twi letters
        are kept unless `fold`: they make a message UCS-2 (70 characters a segment instead
        of 160), which roughly doubles the cost of a Twi interview."""
        return cls(kind="sms", screen_limit=1600, budget_seconds=10**9, budget_screens=10**9,
                   resume_window=resume_window, max_invalid=max_invalid, dial=keyword,
                   fold=fold, quota_on=quota_on, languages=languages, results_by_sms=True)


@dataclass(frozen=True)
class SessionState:
    version: str
    interview: str
    stage: Stage
    lang: str
    pos: int = 0
    page: int = 0
    answers: tuple[tuple[str, str], ...] = ()
    consented: bool = False
    seq: int = 0
    invalid: int = 0
    part: int = 1
    part_break: bool = False
    session_started: float = 0.0
    session_screens: int = 0
    updated: float = 0.0

    def answer_map(self) -> dict[str, str]:
        return dict(self.answers)


@dataclass(frozen=True)
class Reply:
    text: str
    end: bool


@dataclass(frozen=True)
class Event:
    id: str
    # started | answer | completed | declined | withdrawn | abandoned | screened_out
    # (value: why, 'quota' or 'ineligible') | part_break (value: the part just finished)
    kind: str
    interview: str
    at: float
    question: str = ""
    value: str | None = None
    lang: str = ""
    version: str = ""


@dataclass(frozen=True)
class Step:
    state: SessionState | None  # None: forget the session (declined)
    reply: Reply
    events: tuple[Event, ...] = ()


_STATE_FIELDS = frozenset(f.name for f in fields(SessionState))


def _evolve(state: SessionState, **changes: object) -> SessionState:
    """dataclasses._evolve(state, **changes) for the hot path: a step makes four to six of
    these, and replace() introspects the fields and re-runs __init__ on every call (about
    5x slower). SessionState has no __post_init__ and no validation, so a copy of its
    attributes with the changes applied is the same value."""
    unknown = changes.keys() - _STATE_FIELDS
    if unknown:
        raise TypeError(f"SessionState has no field {', '.join(sorted(unknown))}")
    new = object.__new__(SessionState)
    new.__dict__.update(state.__dict__)
    new.__dict__.update(changes)
    return new


KEEP_AFTER_COMPLETION = ("region",)
_INT = re.compile(r"^[+-]?\d+$")
_ASIDE = re.compile(r"\([^)]*\)")
_DEC = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


class _Turn:
    """Mutable scratch for one step; the result leaves as frozen values."""

    def __init__(self, q: Questionnaire, state: SessionState, inp: Input, rules: Rules):
        self.q, self.rules, self.inp = q, rules, inp
        self.state = state
        self.answers = state.answer_map()
        self.events: list[Event] = []

    # -- helpers -----------------------------------------------------------------
    @property
    def languages(self) -> tuple[Language, ...]:
        """The languages offered: the campaign's choice among the form's, else all."""
        offered = tuple(lang for lang in self.q.languages
                        if lang.key in self.rules.languages)
        return offered or self.q.languages

    @property
    def code(self) -> str:
        return self.q.language(self.state.lang).code

    def msg(self, key: str, **values: object) -> str:
        return message(self.code, key, **values)

    def bad_choice(self, options: int) -> str:
        if self.rules.kind == "sms":  # room for a hint; a USSD screen has none
            return self.msg("invalid_choice_range", n=options)
        return self.msg("invalid_choice")

    def results_hint(self) -> str:
        """How this respondent can see the results: only what the campaign can deliver
        (text the RESULTS keyword of their language, else dial again), never a promise of
        an SMS channel that does not exist."""
        if self.rules.results_by_sms:
            return self.msg("results_hint_sms", keyword=self.msg("results_keyword"))
        return self.msg("results_hint_dial", target=self.rules.dial)

    def optional(self, question: Question) -> bool:
        """A question the respondent may skip (the screen says how)."""
        return (not question.required and question.name != CONSENT
                and question.type not in ("note", "calculate"))

    def parts(self, pos: int) -> int:
        """Parts an interview from `pos` takes on this channel's budget, counting the
        screens this session has shown: what the consent screen announces."""
        screens = self.state.session_screens + self.remaining(pos)
        return max(1, math.ceil(screens / self.rules.budget_screens))

    def again(self) -> str:
        """How to come back: 'Dial *920*16#' or 'Text SURVEY'."""
        return self.msg(f"again_{self.rules.kind}", target=self.rules.dial)

    def emit(self, kind: str, question: str = "", value: str | None = None) -> None:
        seq = self.state.seq + 1
        self.state = _evolve(self.state, seq=seq)
        self.events.append(Event(
            id=f"{self.state.interview}-{seq}", kind=kind, interview=self.state.interview,
            at=self.inp.now, question=question, value=value,
            lang=self.state.lang if kind == "started" else "",
            version=self.q.version if kind == "started" else "",
        ))

    def set_answer(self, question: Question, value: str | None) -> None:
        if value is None:
            if question.name not in self.answers:
                return
            self.answers.pop(question.name)
        else:
            if self.answers.get(question.name) == value:
                return
            self.answers[question.name] = value
        if self.state.consented:
            self.emit("answer", question.name, value)

    def relevant(self, question: Question) -> bool:
        return all(expr.truth(self.answers) for expr in question.relevant)

    def finish(self, reply: Reply) -> Step:
        state = _evolve(self.state, answers=tuple(self.answers.items()), updated=self.inp.now)
        return Step(state, reply, tuple(self.events))

    def _text(self, text: str) -> str:
        body = render.fold(text) if self.rules.fold else text
        return render.clip(body, self.rules.body_limit)

    def screen(self, text: str) -> Step:
        """Show a screen and wait for input."""
        self.state = _evolve(self.state, session_screens=self.state.session_screens + 1)
        return self.finish(Reply(self._text(text), end=False))

    def end(self, text: str, forget: bool = False) -> Step:
        """Show a last screen; with forget, drop the session state entirely."""
        reply = Reply(self._text(text), end=True)
        if forget:
            return Step(None, reply, tuple(self.events))
        return self.finish(reply)

    # -- screens -------------------------------------------------------------------
    def language_screen(self, error: str = "") -> Step:
        names = tuple(lang.name for lang in self.languages)
        text = render.select_screen(message("en", "language"), names, 0,
                                    self.rules.body_limit, "More", "Back", error)
        return self.screen(text)

    def resume_screen(self, error: str = "") -> Step:
        options: tuple[str, ...] = (self.msg("continue"), self.msg("start_again"))
        if self.rules.erase_on_resume:
            options += (self.msg("done_menu_erase"),)
        text = render.select_screen(self.msg("resume"), options, 0, self.rules.body_limit,
                                    self.msg("more"), self.msg("back"), error)
        return self.screen(text)

    def _texts(self, question: Question) -> tuple[str, tuple[str, ...]]:
        """The question's label and option labels in the session language, as shown."""
        lang = self.state.lang
        shown = render.fold if self.rules.fold else str
        options = tuple(shown(c.labels.get(lang) or next(iter(c.labels.values())))
                        for c in question.choices)
        return shown(question.label(lang)), options

    def question_screen(self, error: str = "") -> Step:
        question = self.q.questions[self.state.pos]
        label, options = self._texts(question)
        limit = self.rules.body_limit
        skippable = self.optional(question)
        numeric = question.type in ("integer", "decimal")
        if question.name == CONSENT and self.rules.kind == "ussd":
            parts = self.parts(question.index)
            if parts > 1:  # before consenting, how long this will take
                label = self._shown(self.msg("parts_note", parts=parts)) + "\n" + label
        if skippable and question.is_select and len(question.choices) < int(render.SKIP):
            label = f"{label} ({self._shown(self.msg('skip_inline', skip=render.SKIP))})"
        if question.is_select and self.rules.kind == "sms":
            lines = "\n".join(f"{i + 1} {option}" for i, option in enumerate(options))
            text = render.compose(error, label, lines, limit)
        elif question.is_select:
            text = render.select_screen(label, options, self.state.page, limit,
                                        self.msg("more"), self.msg("back"), error)
        elif question.type == "note":
            text = render.compose(error, label, f"1 {self.msg('ok')}", limit)
        elif skippable:
            hint = self.msg("skip_empty") if numeric else f"{render.SKIP} {self.msg('skip')}"
            text = render.compose(error, label, self._shown(hint), limit)
        else:
            text = render.compose(error, label, "", limit)
        return self.screen(text)

    def _shown(self, text: str) -> str:
        return render.fold(text) if self.rules.fold else text

    def pages(self, question: Question) -> int:
        if self.rules.kind == "sms":
            return 1
        label, options = self._texts(question)
        return len(render.paginate(label, options, self.rules.body_limit,
                                   self.msg("more"), self.msg("back")))

    # -- navigation ----------------------------------------------------------------
    def next_position(self, start: int) -> int | None:
        """First relevant question at or after `start`, computing calculations on the way
        and clearing answers that a changed answer made irrelevant."""
        for question in self.q.questions[start:]:
            if not self.relevant(question):
                self.set_answer(question, None)
                continue
            if question.type == "calculate":
                assert question.calculation is not None
                self.set_answer(question, question.calculation.text(self.answers))
                continue
            return question.index
        return None

    def previous_position(self, before: int) -> int | None:
        for question in reversed(self.q.questions[:before]):
            if question.type != "calculate" and self.relevant(question):
                return question.index
        return None

    def remaining(self, start: int) -> int:
        """Questions still to ask from `start`, counting ones whose relevance is not yet
        known (it depends on unanswered questions) as to be asked."""
        count = 0
        for question in self.q.questions[start:]:
            if question.type == "calculate":
                continue
            refs = set().union(*(e.refs for e in question.relevant)) if question.relevant \
                else set()
            if refs - self.answers.keys() or self.relevant(question):
                count += 1
        return count

    def go_to(self, pos: int | None) -> Step:
        if pos is None:
            return self.complete()
        question = self.q.questions[pos]
        if question.screens_out:
            # Not in the survey's population (under 18): say goodbye and keep nothing,
            # before any budget check could turn it into a part break.
            label, _ = self._texts(question)
            return self.screen_out(INELIGIBLE, label)
        self.state = _evolve(self.state, stage=Stage.QUESTION, pos=pos, page=0, invalid=0)
        budget_spent = (
            self.state.session_screens >= self.rules.budget_screens
            or self.inp.now - self.state.session_started >= self.rules.budget_seconds
        )
        if budget_spent and self.state.consented:
            part = self.state.part
            parts = part + max(1, math.ceil(self.remaining(pos) / self.rules.budget_screens))
            # Recorded (ussd_part_breaks): fieldwork counts who stops at each break.
            self.emit("part_break", value=str(part))
            self.state = _evolve(self.state, part=part + 1, part_break=True)
            return self.end(self.msg("part_done", part=part, parts=parts, again=self.again()))
        return self.question_screen()

    def complete(self) -> Step:
        self.emit("completed")
        # Forget the answers (they are in the events) but remember the interview is done,
        # and where the respondent lives, to answer RESULTS with their region's figures.
        self.answers = {k: v for k, v in self.answers.items() if k in KEEP_AFTER_COMPLETION}
        self.state = _evolve(self.state, stage=Stage.DONE, pos=0, page=0, invalid=0,
                             part_break=False)
        return self.end(self.msg("completed") + " " + self.results_hint())

    def invalid(self, reason: str) -> Step:
        count = self.state.invalid + 1
        if count >= self.rules.max_invalid:
            self.state = _evolve(self.state, invalid=0, page=0)
            return self.end(self.msg("too_many_invalid", again=self.again()))
        self.state = _evolve(self.state, invalid=count)
        if self.state.stage is Stage.LANGUAGE:
            return self.language_screen(reason)
        if self.state.stage is Stage.RESUME:
            return self.resume_screen(reason)
        return self.question_screen(reason)

    def start_interview(self, reset_session: bool = True) -> Step:
        languages = self.languages
        stage = Stage.LANGUAGE if len(languages) > 1 else Stage.QUESTION
        default = self.q.default_language
        self.answers = {}
        self.state = SessionState(
            version=self.q.version, interview=self.inp.new_interview, stage=stage,
            lang=default if any(lang.key == default for lang in languages)
            else languages[0].key, session_started=self.inp.now, updated=self.inp.now,
        )
        if stage is Stage.LANGUAGE:
            return self.language_screen()
        return self.go_to(self.next_position(0))

    # -- input handling ------------------------------------------------------------
    def on_open(self) -> Step:
        s = self.state
        if s.stage is Stage.DONE:
            return self.end(self.msg("already_done"))
        if self.inp.now - s.updated > self.rules.resume_window:
            if s.consented:
                self.emit("abandoned")
            return self.start_interview()
        self.state = _evolve(s, session_started=self.inp.now, session_screens=0, invalid=0)
        if not s.consented:
            # Nothing was kept before consent: simply start again from the top.
            return self.start_interview()
        if s.part_break:
            self.state = _evolve(self.state, part_break=False, stage=Stage.QUESTION)
            return self.question_screen()
        self.state = _evolve(self.state, stage=Stage.RESUME)
        return self.resume_screen()

    def on_switch_language(self) -> Step:
        if self.state.stage is Stage.DONE:
            return self.end(self.msg("already_done"))
        if len(self.languages) < 2:
            return self.question_screen() if self.state.stage is Stage.QUESTION \
                else self.on_open()
        self.state = _evolve(self.state, stage=Stage.LANGUAGE, invalid=0)
        return self.language_screen()

    def on_text(self, raw: str) -> Step:
        text = raw.strip()
        s = self.state
        if s.stage is Stage.DONE:
            return self.end(self.msg("already_done"))
        if s.stage is Stage.LANGUAGE:
            languages = self.languages
            n = _choice_number(text, len(languages))
            if n is None:  # "English", "twi", "tw"
                typed = _normal(text)
                n = next((i for i, lang in enumerate(languages)
                          if typed in (_normal(lang.name), lang.code)), None)
            if n is None:
                return self.invalid(self.bad_choice(len(languages)))
            self.state = _evolve(s, lang=languages[n].key, invalid=0)
            if s.consented:  # a switch mid-interview: repeat the current question
                self.state = _evolve(self.state, stage=Stage.QUESTION, page=0)
                return self.question_screen()
            return self.go_to(self.next_position(0))
        if s.stage is Stage.RESUME:
            if text == "1":
                self.state = _evolve(s, stage=Stage.QUESTION, invalid=0)
                return self.question_screen()
            if text == "2":
                self.emit("abandoned")
                return self.start_interview()
            return self.invalid(self.bad_choice(2))
        return self.on_answer(text)

    def on_answer(self, text: str) -> Step:
        question = self.q.questions[self.state.pos]
        numeric = question.type in ("integer", "decimal")
        if question.is_select and text == render.MORE:
            if self.state.page + 1 < self.pages(question):
                self.state = _evolve(self.state, page=self.state.page + 1, invalid=0)
                return self.question_screen()
            return self.invalid(self.bad_choice(len(question.choices)))
        if text == render.BACK and not numeric:
            return self.back(question)
        if question.type == "note":
            return self.go_to(self.next_position(question.index + 1))
        if (text == render.SKIP and not numeric and self.optional(question)
                and len(question.choices) < int(render.SKIP)):
            text = ""  # the skip key the screen offers
        if text == "":
            # Consent is always required: skipping it must not lead into the questionnaire.
            if question.required or question.name == CONSENT:
                reason = question.required_messages.get(self.state.lang) or self.msg("required")
                return self.invalid(reason)
            self.set_answer(question, None)
            return self.go_to(self.next_position(question.index + 1))
        value, error = self.parse(question, text)
        if value is None:
            return self.invalid(error)
        if question.constraint is not None and not question.constraint.truth(self.answers,
                                                                             value):
            reason = (question.constraint_messages.get(self.state.lang)
                      or self.msg("invalid_constraint"))
            return self.invalid(reason)
        if question.name == CONSENT:
            return self.on_consent(question, value)
        self.set_answer(question, value)
        if question.name in self.rules.quota_on and self.cell() in self.rules.full_cells:
            # Checked only as a quota question is answered: someone already past them
            # finishes even if their cell fills meanwhile.
            return self.screen_out("quota", self.msg("quota_full", results=self.results_hint()))
        return self.go_to(self.next_position(question.index + 1))

    def screen_out(self, reason: str, text: str) -> Step:
        """End an interview that must not count: screened out (reason 'quota' or
        'ineligible'), the session forgotten."""
        self.emit("screened_out", value=reason)
        return self.end(text, forget=True)

    def cell(self) -> str | None:
        """The respondent's quota cell, once every quota question is answered."""
        values = [self.answers.get(name) for name in self.rules.quota_on]
        return None if None in values else cell_key(values)  # type: ignore[arg-type]

    def on_consent(self, question: Question, value: str) -> Step:
        if value != "yes":
            if self.state.consented:
                self.emit("withdrawn")
            else:
                self.emit("declined")
            return self.end(self.msg("declined"), forget=True)
        if not self.state.consented:
            self.state = _evolve(self.state, consented=True)
            self.emit("started")
            # Calculations before consent were kept but, like everything then, not emitted.
            for name, kept in self.answers.items():
                self.emit("answer", name, kept)
        self.set_answer(question, value)
        return self.go_to(self.next_position(question.index + 1))

    def back(self, question: Question) -> Step:
        if self.state.page > 0:
            self.state = _evolve(self.state, page=self.state.page - 1, invalid=0)
            return self.question_screen()
        prev = self.previous_position(question.index)
        if prev is None:
            if len(self.languages) > 1:
                self.state = _evolve(self.state, stage=Stage.LANGUAGE, invalid=0)
                return self.language_screen()
            return self.question_screen()
        self.state = _evolve(self.state, pos=prev, page=0, invalid=0)
        return self.question_screen()

    def choice_by_label(self, question: Question, text: str) -> int | None:
        """An option typed out ('Agree', 'agree.', 'Urban' for 'Urban (town/city)'), in the
        session's language or the form's default, ignoring case, accents, punctuation
        and a parenthesised aside; or the choice's own name."""
        typed = _normal(text)
        if not typed:
            return None
        for lang in (self.state.lang, self.q.default_language):
            for i, choice in enumerate(question.choices):
                label = choice.labels.get(lang)
                if label and typed in (_normal(label), _normal(_ASIDE.sub("", label))):
                    return i
        for i, choice in enumerate(question.choices):
            if _normal(choice.name) == typed:
                return i
        return None

    def parse(self, question: Question, text: str) -> tuple[str | None, str]:
        if question.type == "select_one":
            n = _choice_number(text, len(question.choices))
            if n is None:
                n = self.choice_by_label(question, text)
            if n is None:
                return None, self.bad_choice(len(question.choices))
            return question.choices[n].name, ""
        if question.type == "select_multiple":
            tokens = re.split(r"[\s,*#]+", text.strip())
            picked: list[str] = []
            for token in tokens:
                n = _choice_number(token, len(question.choices))
                if n is None:
                    return None, self.msg("invalid_multi")
                name = question.choices[n].name
                if name not in picked:
                    picked.append(name)
            return " ".join(picked), ""
        if question.type == "integer":
            return (str(int(text)), "") if _INT.match(text) else (None,
                                                                  self.msg("invalid_integer"))
        if question.type == "decimal":
            return (text, "") if _DEC.match(text) else (None, self.msg("invalid_decimal"))
        return text, ""


def cell_key(values: list[str] | tuple[str, ...]) -> str:
    """A quota cell as stored: its choice names joined, e.g. 'ashanti|female'."""
    return "|".join(values)


def _normal(text: str) -> str:
    text = render.fold(text).casefold()
    return " ".join(re.sub(r"[^\w\s/+-]", " ", text).split())


def _choice_number(text: str, count: int) -> int | None:
    """0-based index of a typed option number ('2', ' 2 ', '2.', '2)'), or None."""
    text = text.strip().rstrip(".)").strip()
    # isdecimal, not isdigit: "²" is a digit that int() refuses.
    if not text.isdecimal():
        return None
    n = int(text)
    return n - 1 if 1 <= n <= count else None


def hand_over(questionnaire: Questionnaire, state: SessionState,
              rules: Rules) -> tuple[SessionState, str]:
    """Move an interview to another channel: the state it continues from there, and its
    current question as that channel shows it (e.g. a dropped USSD session, by SMS)."""
    moved = _evolve(state, stage=Stage.QUESTION, page=0, invalid=0, part_break=False)
    screen = _Turn(questionnaire, moved, Input.answer("", state.updated), rules)
    return moved, screen.question_screen().reply.text


def longest_path_screens(questionnaire: Questionnaire, lang: str,
                         rules: Rules) -> list[str]:
    """Every screen of an interview that is asked every question (all services used),
    as `rules` render them: what an SMS interview costs at most."""
    state = SessionState(version=questionnaire.version, interview="", stage=Stage.QUESTION,
                         lang=lang, consented=True)
    screens = []
    for question in questionnaire.questions:
        if question.type == "calculate":
            continue
        turn = _Turn(questionnaire, _evolve(state, pos=question.index), Input.answer("", 0),
                     rules)
        screens.append(turn.question_screen().reply.text)
    turn = _Turn(questionnaire, state, Input.answer("", 0), rules)
    screens.append(turn.msg("completed") + " " + turn.results_hint())
    return screens


def step(questionnaire: Questionnaire, state: SessionState | None, inp: Input,
         rules: Rules = Rules()) -> Step:
    """Advance one interview by one input; pure."""
    if state is None:
        blank = SessionState(version=questionnaire.version, interview=inp.new_interview,
                             stage=Stage.LANGUAGE, lang=questionnaire.default_language)
        return _Turn(questionnaire, blank, inp, rules).start_interview()
    if state.version != questionnaire.version:
        raise ValueError(f"state is on questionnaire {state.version}, "
                         f"got {questionnaire.version}")
    turn = _Turn(questionnaire, state, inp, rules)
    if inp.kind is InputKind.OPEN:
        return turn.on_open()
    if inp.kind is InputKind.LANG:
        return turn.on_switch_language()
    return turn.on_text(inp.text)
