"""The XLSForm loader: the shipped 16.6.2 form, its USSD screens, bad forms, and versions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.interview import render
from gateway.interview.messages import MESSAGES, message
from gateway.interview.questionnaire import (
    FormError,
    Question,
    Questionnaire,
    load_questionnaire,
    load_questionnaire_file,
)

FORM_PATH = Path(__file__).resolve().parent.parent / "questionnaires" / "sdg1662.md"
SCREEN_LIMIT = 160  # what operators safely render, including the "CON " prefix
PREFIX = "CON "

AREAS = {
    # screening question prefix: the five attribute statements, then the overall question
    "h": ("h_acc", "h_aff", "h_fac", "h_eq", "h_court", "h_sat"),
    "p": ("p_acc", "p_aff", "p_fac", "p_eq", "p_teach", "p_sat"),
    "s": ("s_acc", "s_aff", "s_fac", "s_eq", "s_teach", "s_sat"),
    "g": ("g_acc", "g_aff", "g_eq", "g_eff", "g_time", "g_sat"),
}
WG_SS = ("wg_see", "wg_hear", "wg_walk", "wg_mem", "wg_care", "wg_comm")
DISAGGREGATION = ("sex", "age", "region", "urban", "income", *WG_SS)
ADULT = {"consent": "yes", "age": "25_34"}


FORM = load_questionnaire_file(FORM_PATH)


@pytest.fixture
def form() -> Questionnaire:
    return FORM


def by_name(form: Questionnaire) -> dict[str, Question]:
    return {q.name: q for q in form.questions}


# -- (a) the shipped form ---------------------------------------------------------------------

def test_languages_english_first_then_twi(form: Questionnaire) -> None:
    """The respondent is offered English (default) then Twi."""
    assert [(lang.code, lang.name) for lang in form.languages] == [("en", "English"),
                                                                   ("tw", "Twi")]
    assert form.default_language == "English (en)"
    assert form.form_id == "sdg1662_gh"
    assert form.filename == "sdg1662.md"


def test_twi_is_marked_as_a_draft_for_native_review(form: Questionnaire) -> None:
    """The form says its Twi labels await review by a native speaker."""
    text = form.source.decode("utf-8")
    assert "DRAFT" in text and "native Twi speaker" in text


def test_consent_is_first(form: Questionnaire) -> None:
    """The first screen after the language is a required yes/no consent question."""
    first = form.questions[0]
    assert (first.name, first.type, first.required) == ("consent", "select_one", True)
    assert [c.name for c in first.choices] == ["yes", "no"]
    assert first.relevant == ()


def test_every_spec_question_is_present_in_order(form: Questionnaire) -> None:
    """Disaggregation, then each service (screening, 5 attributes, overall), then improve,
    then the opt-in to receive the results."""
    names = [q.name for q in form.questions]
    expected = ["consent", *DISAGGREGATION, "improve"]
    for area, questions in AREAS.items():
        expected += [f"{area}_used", *questions]
    assert set(expected) <= set(names)
    position = {name: i for i, name in enumerate(names)}
    assert max(position[n] for n in DISAGGREGATION) < min(position[f"{a}_used"] for a in AREAS)
    for area, questions in AREAS.items():
        indexes = [position[f"{area}_used"], *(position[n] for n in questions)]
        assert indexes == sorted(indexes), area
    assert names[-2:] == ["improve", "feedback"]
    improve = by_name(form)["improve"]
    assert (improve.type, improve.required) == ("text", False)
    feedback = by_name(form)["feedback"]
    assert [c.name for c in feedback.choices] == ["yes", "no"] and feedback.required


@pytest.mark.parametrize("area", AREAS)
def test_scales_end_with_dont_know(form: Questionnaire, area: str) -> None:
    """Attributes use the 4-point agreement scale, overall the 4-point satisfaction scale,
    each with don't know/skip last; screening is yes/no/don't know."""
    questions = by_name(form)
    *attributes, overall = AREAS[area]
    assert len(attributes) == 5
    for name in attributes:
        assert [c.name for c in questions[name].choices] == ["sa", "a", "d", "sd", "dk"], name
    assert [c.name for c in questions[overall].choices] == ["vs", "s", "d", "vd", "dk"]
    for name in (*attributes, overall):
        last = questions[name].choices[-1]
        assert last.labels["English (en)"] == "Don't know/skip", name
    screening = questions[f"{area}_used"]
    assert [c.name for c in screening.choices] == ["yes", "no", "dk"]


def test_disaggregation_lists(form: Questionnaire) -> None:
    """Sex, age bands, the 16 regions, residence, income proxy and WG-SS levels."""
    questions = by_name(form)
    choices = {name: [c.name for c in questions[name].choices] for name in DISAGGREGATION}
    assert choices["sex"] == ["female", "male", "refuse"]
    assert choices["age"] == ["u18", "18_24", "25_34", "35_44", "45_54", "55_64", "65p"]
    assert len(choices["region"]) == 17 and choices["region"][-1] == "refuse"
    assert choices["urban"] == ["urban", "rural", "dk"]
    assert choices["income"][-1] == "refuse" and len(choices["income"]) == 5
    for name in WG_SS:
        assert choices[name] == ["none", "some", "alot", "cannot", "refuse"], name


@pytest.mark.parametrize("area", AREAS)
@pytest.mark.parametrize("used", ["yes", "no", "dk", ""])
def test_service_block_only_for_users(form: Questionnaire, area: str, used: str) -> None:
    """A service's questions are relevant only when its screening answer is yes."""
    questions = by_name(form)
    env = {**ADULT, f"{area}_used": used}
    assert all(e.truth(env) for e in questions[f"{area}_used"].relevant)
    for name in AREAS[area]:
        relevant = questions[name].relevant
        assert any(f"{area}_used" in e.refs for e in relevant), name
        assert all(e.truth(env) for e in relevant) is (used == "yes"), name


def test_under_18_skips_everything_after_age(form: Questionnaire) -> None:
    """An under-18 respondent sees the goodbye note and no further question."""
    env = {"consent": "yes", "age": "u18", **{f"{a}_used": "yes" for a in AREAS}}
    shown = [q.name for q in form.questions[3:] if all(e.truth(env) for e in q.relevant)]
    assert shown == ["u18_end", *(n for a in AREAS for n in AREAS[a])]
    # ...and since no screening question is asked to them, no service block is either.
    env = {"consent": "yes", "age": "u18"}
    shown = [q.name for q in form.questions[3:] if all(e.truth(env) for e in q.relevant)]
    assert shown == ["u18_end"]


def test_every_label_is_translated(form: Questionnaire) -> None:
    """Every question and option has both an English and a Twi label."""
    for q in form.questions:
        if q.type == "calculate":
            continue
        assert {"English (en)", "Twi (tw)"} <= q.labels.keys(), q.name
        for c in q.choices:
            assert {"English (en)", "Twi (tw)"} <= c.labels.keys(), (q.name, c.name)


# -- (b) every screen fits the USSD limit -----------------------------------------------------

ERROR_KEYS = ("invalid_choice", "required", "invalid_integer", "invalid_decimal",
              "invalid_multi", "invalid_constraint")
# The line the engine puts above a question when the typed answer cannot be parsed.
PARSE_ERROR = {"select_one": "invalid_choice", "select_multiple": "invalid_multi",
               "integer": "invalid_integer", "decimal": "invalid_decimal"}


def longest_error(code: str) -> str:
    return max((MESSAGES[code][k] for k in ERROR_KEYS), key=len)


def all_errors(q: Question, lang_key: str, code: str) -> list[str]:
    """No error, the longest error line in messages.py, and the question's own lines."""
    own = [m[lang_key] for m in (q.required_messages, q.constraint_messages) if lang_key in m]
    return ["", longest_error(code), message(code, "required"), *own]


def parse_error(q: Question, lang_key: str, code: str) -> list[str]:
    return [message(code, PARSE_ERROR[q.type])] if q.type in PARSE_ERROR else []


def screens(form: Questionnaire, errors=all_errors):
    """Every (language, question, page, error, label, last lines, screen) the engine can
    show, rendered as the engine does with Rules(fold=True)."""
    limit = SCREEN_LIMIT - len(PREFIX)
    for lang in form.languages:
        more, back = message(lang.code, "more"), message(lang.code, "back")
        for q in form.questions:
            if q.type == "calculate":
                continue
            label = render.fold(q.label(lang.key))
            options = tuple(render.fold(c.labels[lang.key]) for c in q.choices)
            for error in map(render.fold, errors(q, lang.key, lang.code)):
                if not q.is_select:
                    tail = [f"1 {message(lang.code, 'ok')}"] if q.type == "note" else []
                    screen = render.compose(error, label, "\n".join(tail), limit)
                    yield lang.code, q.name, 0, error, label, tail, screen
                    continue
                pages = render.paginate(label, options, limit, more, back)
                for page in range(len(pages)):
                    screen = render.select_screen(label, options, page, limit, more, back, error)
                    lines = [f"{i + 1} {options[i]}" for i in pages[page]]
                    if page + 1 < len(pages):
                        lines.append(f"{render.MORE} {more}")
                    if page > 0:
                        lines.append(f"{render.BACK} {back}")
                    yield lang.code, q.name, page, error, label, lines, screen


def is_cut_from(line: str, text: str, at_least: int = 0) -> bool:
    """`line` is `text`, or a start of it (maybe ending in an ellipsis) of `at_least` chars."""
    if line == text:
        return True
    start = line.removesuffix(render.ELLIPSIS)
    return text.startswith(start) and len(start) >= at_least


def test_every_screen_fits_and_loses_nothing(form: Questionnaire) -> None:
    """Each screen with CON fits 160 characters and keeps every option of its page and the
    navigation whole; without an error the question is whole, with one (even the longest
    in messages.py) the question keeps at least its first characters (render.MIN_LABEL)."""
    seen = 0
    for code, name, page, error, label, lines, screen in screens(form):
        where = (code, name, page, error)
        seen += 1
        assert len(PREFIX + screen) <= SCREEN_LIMIT, where
        assert screen.isascii(), where
        shown = screen.split("\n")
        if lines:
            assert shown[-len(lines):] == lines, where
        if not error:
            assert shown[0] == label, where
            continue
        assert is_cut_from(shown[0], error), where
        keep = min(len(label), render.MIN_LABEL - len(render.ELLIPSIS))
        assert is_cut_from(shown[1], label, at_least=keep), where
    # 2 languages x (41 questions + the region's second page) x at least 3 error variants
    assert seen >= 2 * 42 * 3


PARSE_SCREENS = [
    pytest.param(code, name, page, error, label, lines, screen, id=f"{code}-{name}-p{page + 1}")
    for code, name, page, error, label, lines, screen in screens(FORM, parse_error)
]


@pytest.mark.parametrize("code,name,page,error,label,lines,screen", PARSE_SCREENS)
def test_wrong_entry_error_is_shown_whole(code: str, name: str, page: int, error: str,
                                          label: str, lines: list[str], screen: str) -> None:
    """A wrong entry re-asks with the whole short error line above the question."""
    shown = screen.split("\n")
    assert shown[0] == error
    assert is_cut_from(shown[1], label,
                       at_least=min(len(label), render.MIN_LABEL - len(render.ELLIPSIS)))
    assert shown[-len(lines):] == lines
    assert len(PREFIX + screen) <= SCREEN_LIMIT


def test_language_screen_fits(form: Questionnaire) -> None:
    """The first screen, the language choice, fits whole even with an error line."""
    names = tuple(lang.name for lang in form.languages)
    for error in ("", message("en", "invalid_choice")):
        screen = render.select_screen(message("en", "language"), names, 0,
                                      SCREEN_LIMIT - len(PREFIX), "More", "Back", error)
        assert screen.endswith("Language / Kasa:\n1 English\n2 Twi")
        assert len(PREFIX + screen) <= SCREEN_LIMIT


def test_only_region_needs_paging(form: Questionnaire) -> None:
    """The long region list is paged; every other list fits one screen in both languages."""
    paged = {(code, name) for code, name, page, *_ in screens(form) if page > 0}
    assert paged == {("en", "region"), ("tw", "region")}


# -- (c) bad forms ----------------------------------------------------------------------------

SURVEY = "| survey | type | name | label | relevant | constraint | calculation | required |\n"
CONSENT = "|        | select_one yn | consent | Join? | | | | yes |\n"  # row 2
CHOICES = """
| choices | list_name | name | label |
|         | yn        | yes  | Yes   |
|         | yn        | no   | No    |
"""


def form_md(*rows: str, choices: str = CHOICES, survey: str = SURVEY,
            consent: str = CONSENT) -> str:
    """A small markdown XLSForm: consent on row 2, then `rows` from row 3."""
    return survey + consent + "".join(f"{row}\n" for row in rows) + choices


GOOD = form_md("| | text | t | T | | | | |")


@dataclass(frozen=True)
class Bad:
    label: str
    source: str
    sheet: str | None
    row: int | None
    column: str | None
    contains: str = ""
    filename: str = "bad.md"


BAD = [
    # types and columns outside the subset
    Bad("geopoint", form_md("| | geopoint | where | Where? | | | | |"), "survey", 3, "type",
        "'geopoint'"),
    Bad("begin_repeat", form_md("| | text | t | T | | | | |",
                                "| | begin_repeat | r | R | | | | |",
                                "| | text | u | U | | | | |",
                                "| | end_repeat | r | | | | | |"), "survey", 4, "type",
        "begin_repeat"),
    Bad("begin repeat, spelled with a space", form_md("| | begin repeat | r | R | | | | |",
                                                      "| | text | u | U | | | | |",
                                                      "| | end repeat | r | | | | | |"),
        "survey", 3, "type", "begin_repeat"),
    Bad("select_one_from_file", form_md("| | select_one_from_file a.csv | f | F | | | | |"),
        "survey", 3, "type", "select_one_from_file"),
    Bad("media::image column",
        "| survey | type | name | label | media::image |\n"
        "| | select_one yn | consent | Join? | |\n"
        "| | text | t | T | |\n"
        "| | note | n | N | logo.png |\n" + CHOICES, "survey", 4, "media::image"),
    Bad("unsupported settings column",
        GOOD + "\n| settings | form_id | style |\n| | f | pages |\n", "settings", 2, "style"),
    # select lists
    Bad("select list missing from choices", form_md("| | select_one colors | c | C | | | | |"),
        "survey", 3, "type", "'colors'"),
    Bad("select_one without a list", form_md("| | select_one | c | C | | | | |"),
        "survey", 3, "type"),
    Bad("select_one with or_other", form_md("| | select_one yn or_other | c | C | | | | |"),
        "survey", 3, "type"),
    Bad("list name on a text question", form_md("| | text yn | c | C | | | | |"),
        "survey", 3, "type"),
    # names and labels
    Bad("duplicate name", form_md("| | text | t | T | | | | |", "| | integer | t | N | | | | |"),
        "survey", 4, "name", "row 3"),
    Bad("group named like a question", form_md("| | text | t | T | | | | |",
                                               "| | begin_group | t | G | | | | |",
                                               "| | text | u | U | | | | |",
                                               "| | end_group | | | | | | |"),
        "survey", 4, "name"),
    Bad("missing name", form_md("| | text | | T | | | | |"), "survey", 3, "name"),
    Bad("name with a space", form_md("| | text | my q | T | | | | |"), "survey", 3, "name"),
    Bad("name starting with a digit", form_md("| | text | 1q | T | | | | |"),
        "survey", 3, "name"),
    Bad("missing label", form_md("| | text | t | | | | | |"), "survey", 3, "label"),
    Bad("row without a type", form_md("| | | t | T | | | | |"), "survey", 3, "type"),
    Bad("calculate without calculation", form_md("| | calculate | c | | | | | |"),
        "survey", 3, "calculation"),
    # expressions
    Bad("bad relevant syntax", form_md("| | text | t | T | ${consent} = | | | |"),
        "survey", 3, "relevant"),
    Bad("bad constraint syntax", form_md("| | integer | n | N | | . >= | | |"),
        "survey", 3, "constraint"),
    Bad("bad calculation syntax", form_md("| | calculate | c | | | | 1 + | |"),
        "survey", 3, "calculation"),
    Bad("unsupported function in constraint",
        form_md("| | text | t | T | | regex(., '[0-9]+') | | |"), "survey", 3, "constraint",
        "regex() is not supported"),
    Bad("unsupported function in calculation", form_md("| | calculate | c | | | | today() | |"),
        "survey", 3, "calculation", "today() is not supported"),
    Bad("bare name in relevant", form_md("| | text | t | T | consent = 'yes' | | | |"),
        "survey", 3, "relevant", "${consent}"),
    Bad("unknown question in relevant", form_md("| | text | t | T | ${nope} = 'x' | | | |"),
        "survey", 3, "relevant", "${nope}"),
    Bad("unknown question in constraint", form_md("| | integer | n | N | | . < ${nope} | | |"),
        "survey", 3, "constraint", "${nope}"),
    Bad("unknown question in calculation", form_md("| | calculate | c | | | | ${nope} * 2 | |"),
        "survey", 3, "calculation", "${nope}"),
    Bad("relevant refers to a later question", form_md("| | text | t | T | ${u} = 'x' | | | |",
                                                       "| | text | u | U | | | | |"),
        "survey", 3, "relevant", "later"),
    Bad("relevant refers to itself", form_md("| | text | t | T | ${t} = 'x' | | | |"),
        "survey", 3, "relevant", "later"),
    Bad("group relevant names an unknown question",
        form_md("| | begin_group | g | G | ${nope} = 'x' | | | |",
                "| | text | t | T | | | | |",
                "| | end_group | | | | | | |"), "survey", 3, "relevant", "${nope}"),
    Bad("group relevant unknown, inner question has its own relevant",
        form_md("| | begin_group | g | G | ${nope} = 'x' | | | |",
                "| | text | t | T | ${consent} = 'yes' | | | |",
                "| | end_group | | | | | | |"), "survey", 3, "relevant", "${nope}"),
    Bad("group relevant refers to a question inside it",
        form_md("| | begin_group | g | G | ${t} = 'x' | | | |",
                "| | text | t | T | | | | |",
                "| | end_group | | | | | | |"), "survey", 3, "relevant", "later"),
    # groups
    Bad("unclosed group", form_md("| | begin_group | g | G | | | | |",
                                  "| | text | t | T | | | | |"), "survey", 3, "type", "'g'"),
    # end_group closes the innermost group, so it is the outer one that stays open.
    Bad("unclosed outer group", form_md("| | begin_group | outer | O | | | | |",
                                        "| | begin_group | inner | I | | | | |",
                                        "| | text | t | T | | | | |",
                                        "| | end_group | | | | | | |"),
        "survey", 3, "type", "'outer'"),
    Bad("end_group without begin", form_md("| | text | t | T | | | | |",
                                           "| | end_group | g | | | | | |"),
        "survey", 4, "type"),
    # choices
    Bad("choice without label", form_md("| | text | t | T | | | | |",
                                        choices=CHOICES + "| | yn | maybe | |\n"),
        "choices", 4, "label", "'maybe'"),
    Bad("duplicate choice", form_md("| | text | t | T | | | | |",
                                    choices=CHOICES + "| | yn | no | Nope |\n"),
        "choices", 4, "name", "'no'"),
    Bad("choice without name", form_md("| | text | t | T | | | | |",
                                       choices=CHOICES + "| | yn | | Maybe |\n"),
        "choices", 4, "name"),
    Bad("choice without list_name", form_md("| | text | t | T | | | | |",
                                            choices=CHOICES + "| | | maybe | Maybe |\n"),
        "choices", 4, "list_name"),
    # consent
    Bad("first question is not consent", SURVEY + "| | text | t | T | | | | |\n" + CONSENT
        + CHOICES, "survey", 2, "name", "consent"),
    Bad("consent is not a select_one", SURVEY + "| | text | consent | Join? | | | | |\n"
        + CHOICES, "survey", 2, "name", "consent"),
    Bad("consent has no 'yes' choice", form_md(
        "| | text | t | T | | | | |",
        choices="\n| choices | list_name | name | label |\n"
                "| | yn | ok | OK |\n| | yn | no | No |\n"),
        "survey", 2, "name", "'yes'"),
    Bad("consent with a relevant",
        SURVEY + "| | select_one yn | consent | Join? | 1 = 2 | | | yes |\n" + CHOICES,
        "survey", 2, "relevant", "always be asked"),
    Bad("consent inside a group with a relevant",
        SURVEY + "| | begin_group | g | G | 1 = 2 | | | |\n" + CONSENT
        + "| | end_group | | | | | | |\n" + CHOICES, "survey", 3, "relevant", "always be asked"),
    # other columns and settings
    Bad("required is an expression", form_md("| | text | t | T | | | | ${consent} = 'yes' |"),
        "survey", 3, "required"),
    Bad("required is not yes/no", form_md("| | text | t | T | | | | maybe |"),
        "survey", 3, "required", "'maybe'"),
    Bad("default_language without labels",
        GOOD + "\n| settings | form_id | default_language |\n| | f | French (fr) |\n",
        "settings", 2, "default_language"),
    # files
    Bad("unsupported extension .txt", GOOD, None, None, None, "'.txt'", "bad.txt"),
    Bad("unsupported extension .json", GOOD, None, None, None, "'.json'", "form.json"),
    Bad("no extension", GOOD, None, None, None, "(none)", "form"),
    Bad("empty file", "", None, None, None),
    Bad("garbage", "this is not\na spreadsheet\n\x00\x01", None, None, None),
    Bad("no survey sheet", CHOICES, "survey", None, None, "survey"),
    Bad("survey with only a group", SURVEY + "| | begin_group | g | G | | | | |\n"
        "| | end_group | | | | | | |\n" + CHOICES, "survey", None, None, "no questions"),
]


def test_good_form_template_loads() -> None:
    """The template the bad forms are made from is itself a valid form."""
    q = load_questionnaire(GOOD.encode(), "good.md")
    assert [(x.name, x.type, x.row) for x in q.questions] == [("consent", "select_one", 2),
                                                              ("t", "text", 3)]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.label)
def test_bad_form_is_refused(case: Bad) -> None:
    """A bad form raises FormError naming the sheet, row and column to fix."""
    with pytest.raises(FormError) as info:
        load_questionnaire(case.source.encode(), case.filename)
    err = info.value
    assert (err.sheet, err.row, err.column) == (case.sheet, case.row, case.column), str(err)
    assert case.contains in str(err)
    if case.sheet:
        assert f"sheet '{case.sheet}'" in str(err)
    if case.row:
        assert f"row {case.row}" in str(err)


def test_missing_file_is_a_form_error(tmp_path: Path) -> None:
    """A path that cannot be read is a FormError, not an OSError."""
    with pytest.raises(FormError):
        load_questionnaire_file(tmp_path / "missing.md")


# -- (d) versions -----------------------------------------------------------------------------

def test_same_bytes_same_version(form: Questionnaire) -> None:
    """The version is a content hash: loading the same bytes again gives the same version."""
    again = load_questionnaire(FORM_PATH.read_bytes(), "other-name.md")
    assert again.version == form.version
    assert len(form.version) == 16 and int(form.version, 16) >= 0


def test_one_changed_character_changes_the_version(form: Questionnaire) -> None:
    """Any edit to the source, even one character in a label, is a new version."""
    source = FORM_PATH.read_bytes()
    edited = source.replace(b"Join?", b"Join!", 1)
    assert edited != source
    changed = load_questionnaire(edited, "sdg1662.md")
    assert changed.version != form.version
    assert by_name(changed)["consent"].labels["English (en)"].endswith("Join!")


def test_questionnaire_is_frozen(form: Questionnaire) -> None:
    """A loaded version is immutable: its attributes cannot be reassigned."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        form.version = "tampered"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        form.questions[0].name = "tampered"  # type: ignore[misc]
    assert isinstance(form.questions, tuple)
    assert isinstance(form.questions[0].choices, tuple)
