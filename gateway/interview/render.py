"""USSD screens: fit a question and its options into one screen or a few pages.

Pure functions of (text, limit), so the engine can know how many pages a list has
without doing any I/O, and the same inputs always page the same way.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

MORE = "98"
SKIP = "99"  # skips an optional question (not a number question: 99 is a value there)
MIN_LABEL = 12  # characters of the question kept beside an error line
SHORT_ERROR = 17  # "Invalid choice.\n" and its translations
BACK = "0"
ELLIPSIS = "..."

# Twi letters outside GSM 03.38; operators mangle them on USSD, and Twi readers
# commonly write e/o in SMS anyway.
_FOLD = str.maketrans({"ɛ": "e", "Ɛ": "E", "ɔ": "o", "Ɔ": "O", "’": "'", "‘": "'",
                       "“": '"', "”": '"', "–": "-", "—": "-", "…": "..."})


# Cached: a USSD step folds the question and every option label again, and these are the
# same few hundred strings (a pure function of its argument, so nothing can go stale).
@lru_cache(maxsize=8192)
def fold(text: str) -> str:
    """Fold text to plain characters every handset renders on a USSD screen."""
    text = text.translate(_FOLD)
    if text.isascii():
        return text
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c) and c.isascii()
                   or c == "\n")


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    if limit <= len(ELLIPSIS):
        return text[:limit]
    return text[: limit - len(ELLIPSIS)].rstrip() + ELLIPSIS


@lru_cache(maxsize=4096)
def paginate(label: str, options: tuple[str, ...], limit: int, more: str,
             back: str) -> tuple[tuple[int, ...], ...]:
    """Split numbered options into pages that fit `limit` characters with the label.

    Returns, per page, the 0-based option indexes on it. Every page repeats the label
    (clipped if it must be) so the respondent always sees what is asked.
    """
    lines = [f"{i + 1} {text}" for i, text in enumerate(options)]
    if not lines:
        return ((),)
    whole = len(label) + sum(1 + len(line) for line in lines)
    if whole <= limit:
        return (tuple(range(len(lines))),)
    more_line, back_line = f"{MORE} {more}", f"{BACK} {back}"
    # Leave room on every page for the label, or for a short error line ("Invalid
    # choice.") above the start of the label when a wrong entry is re-asked.
    label_room = max(min(len(label), max(20, limit // 3)), MIN_LABEL + SHORT_ERROR)
    pages: list[tuple[int, ...]] = []
    i = 0
    while i < len(lines):
        nav = (1 + len(back_line)) if pages else 0
        room = limit - label_room - nav
        page: list[int] = []
        used = 0
        while i < len(lines):
            cost = 1 + len(lines[i])
            rest_after = len(lines) - i - 1
            need_more = (1 + len(more_line)) if rest_after else 0
            if used + cost + need_more > room and page:
                break
            page.append(i)
            used += cost
            i += 1
        pages.append(tuple(page))
    return tuple(pages)


def select_screen(label: str, options: tuple[str, ...], page: int, limit: int, more: str,
                  back: str, error: str = "") -> str:
    """One page of a select question, never longer than `limit`."""
    pages = paginate(label, options, limit, more, back)
    page = max(0, min(page, len(pages) - 1))
    body = [f"{i + 1} {options[i]}" for i in pages[page]]
    if page + 1 < len(pages):
        body.append(f"{MORE} {more}")
    if page > 0:
        body.append(f"{BACK} {back}")
    return compose(error, label, "\n".join(body), limit)


def compose(error: str, label: str, tail: str, limit: int) -> str:
    """error line + label + tail, within `limit`.

    The options (tail) are never cut. The error line is kept whole when it fits: the
    respondent has just read the question, so its label is what gets clipped first.
    """
    tail_part = f"\n{tail}" if tail else ""
    head = f"{error}\n" if error else ""
    room = limit - len(head) - len(tail_part)
    if head and room < MIN_LABEL:
        head = clip(error, max(0, limit - len(tail_part) - MIN_LABEL - 1)) + "\n"
        room = limit - len(head) - len(tail_part)
    return clip(head + clip(label, max(0, room)) + tail_part, limit)
