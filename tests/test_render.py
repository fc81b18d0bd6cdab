"""USSD screen rendering: folding to plain characters, clipping, and paging long lists."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.interview import render


@dataclass(frozen=True)
class Fold:
    label: str
    text: str
    expected: str


FOLD = [
    Fold("plain ascii unchanged", "Which region? 1 Yes", "Which region? 1 Yes"),
    Fold("open e", "Wobɛka ho?", "Wobeka ho?"),
    Fold("open o", "Kɔla bɛn", "Kola ben"),
    Fold("capital open e and o", "Ɛyɛ Ɔbaa", "Eye Obaa"),
    Fold("accents stripped", "café crème à Ségou", "cafe creme a Segou"),
    Fold("tilde and cedilla", "Ñoño façade", "Nono facade"),
    Fold("precomposed vs combining", "e\u0301", "e"),
    Fold("curly quotes and apostrophes", "“Don’t” ‘x’", "\"Don't\" 'x'"),
    Fold("dashes", "18–24 — yes", "18-24 - yes"),
    Fold("ellipsis", "wait…", "wait..."),
    Fold("newlines kept", "Mmuae\nɛyɛ", "Mmuae\neye"),
    Fold("unfoldable dropped", "Aane ✓", "Aane "),
]


@pytest.mark.parametrize("case", FOLD, ids=lambda c: c.label)
def test_fold(case: Fold) -> None:
    """fold() leaves only characters every handset renders."""
    folded = render.fold(case.text)
    assert folded == case.expected
    assert folded.isascii()


@dataclass(frozen=True)
class Clip:
    label: str
    text: str
    limit: int
    expected: str


CLIP = [
    Clip("shorter than the limit", "hello", 10, "hello"),
    Clip("exactly the limit", "hello", 5, "hello"),
    Clip("one over: ellipsis", "hello world", 10, "hello w..."),
    Clip("trailing space before the ellipsis is dropped", "hello world", 9, "hello..."),
    Clip("limit too small for an ellipsis", "hello", 3, "hel"),
    Clip("limit zero", "hello", 0, ""),
    Clip("empty text", "", 5, ""),
]


@pytest.mark.parametrize("case", CLIP, ids=lambda c: c.label)
def test_clip(case: Clip) -> None:
    """clip() never exceeds the limit and marks a cut with an ellipsis."""
    clipped = render.clip(case.text, case.limit)
    assert clipped == case.expected
    assert len(clipped) <= case.limit


REGIONS = ("Greater Accra", "Ashanti", "Eastern", "Central", "Northern", "Western", "Volta",
           "Upper East", "Bono", "Bono East", "Upper West", "Western North", "Oti",
           "North East", "Savannah", "Ahafo", "Prefer not to say")


@dataclass(frozen=True)
class Page:
    label: str
    question: str
    options: tuple[str, ...]
    limit: int
    pages: int  # expected number of pages


PAGINATE = [
    Page("two options fit", "Join?", ("Yes", "No"), 156, 1),
    Page("exactly fills the screen", "Q" * 150, ("Yes",), 156, 1),
    Page("long label is clipped, not paged", "Q" * 151, ("Yes", "No"), 156, 1),
    Page("no options", "A note", (), 156, 1),
    Page("16 regions on a USSD screen", "Which region do you live in?", REGIONS, 156, 2),
    Page("16 regions on a tiny screen", "Which region do you live in?", REGIONS, 80, 7),
    Page("long labels, 30 options", "Pick one of these long options please",
         tuple(f"Option number {i} with a long description" for i in range(1, 31)), 156, 15),
    Page("182-character channel", "Which region do you live in?", REGIONS, 178, 2),
]


@pytest.mark.parametrize("case", PAGINATE, ids=lambda c: c.label)
def test_paginate(case: Page) -> None:
    """Every option lands on exactly one page, in order, and every page fits the limit."""
    pages = render.paginate(case.question, case.options, case.limit, "More", "Back")
    assert len(pages) == case.pages
    flat = [i for page in pages for i in page]
    assert flat == list(range(len(case.options)))
    assert all(pages) or case.options == ()
    for n, page in enumerate(pages):
        screen = render.select_screen(case.question, case.options, n, case.limit, "More", "Back")
        assert len(screen) <= case.limit
        lines = screen.split("\n")
        shown = [f"{i + 1} {case.options[i]}" for i in page]
        nav = ([f"{render.MORE} More"] if n + 1 < len(pages) else []) + (
            [f"{render.BACK} Back"] if n > 0 else [])
        # Options keep their global numbers and are never clipped; navigation comes last.
        assert lines[len(lines) - len(shown) - len(nav):] == shown + nav
        # The question is on every page, clipped only if it must be.
        label_line = lines[0]
        assert label_line == case.question or (
            label_line.endswith(render.ELLIPSIS)
            and case.question.startswith(label_line[: -len(render.ELLIPSIS)])
            and len(label_line) >= 20)


def test_single_page_has_no_navigation() -> None:
    """A list that fits is shown whole, with no More/Back lines."""
    screen = render.select_screen("Join?", ("Yes", "No"), 0, 156, "More", "Back")
    assert screen == "Join?\n1 Yes\n2 No"


def test_page_number_out_of_range_is_clamped() -> None:
    """Asking for a page past the end shows the last page rather than failing."""
    pages = render.paginate("Which region?", REGIONS, 80, "More", "Back")
    final = render.select_screen("Which region?", REGIONS, len(pages) - 1, 80, "More", "Back")
    assert render.select_screen("Which region?", REGIONS, 99, 80, "More", "Back") == final
    assert render.select_screen("Which region?", REGIONS, -5, 80, "More", "Back") == \
        render.select_screen("Which region?", REGIONS, 0, 80, "More", "Back")


@dataclass(frozen=True)
class Compose:
    label: str
    error: str
    question: str
    tail: str
    limit: int
    expected: str


COMPOSE = [
    Compose("no error, no tail", "", "How old are you?", "", 156, "How old are you?"),
    Compose("error line first", "Invalid choice.", "Join?", "1 Yes", 156,
            "Invalid choice.\nJoin?\n1 Yes"),
    Compose("label clipped to keep the options", "Invalid choice.", "A" * 40, "1 Yes\n2 No", 50,
            "Invalid choice.\n" + "A" * 20 + "...\n1 Yes\n2 No"),
    Compose("short error kept whole, label clipped", "Invalid choice.", "A" * 40,
            "1 Yes\n2 No", 40, "Invalid choice.\n" + "A" * 10 + "...\n1 Yes\n2 No"),
    Compose("long error clipped to leave the label 12 chars", "E" * 40, "L" * 30, "1 Yes", 50,
            "E" * 28 + "...\n" + "L" * 9 + "...\n1 Yes"),
]


@pytest.mark.parametrize("case", COMPOSE, ids=lambda c: c.label)
def test_compose(case: Compose) -> None:
    """compose() keeps the options whole and clips the label, then the error, to fit."""
    text = render.compose(case.error, case.question, case.tail, case.limit)
    assert text == case.expected
    assert len(text) <= case.limit
