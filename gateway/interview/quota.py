"""A quota's definition: the single-choice questions that make a cell and a target per
cell, checked against the questionnaire. Pure: the fill lives in coordination.quotas."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway import csvfiles
from gateway.interview.engine import cell_key
from gateway.interview.questionnaire import Questionnaire

MAX_DIMENSIONS = 3


class QuotaError(ValueError):
    """A quota definition that cannot be used, with what to fix."""


@dataclass(frozen=True)
class Quota:
    on: tuple[str, ...]  # question names, in cell-key order
    targets: dict[str, int]  # cell key ("ashanti|female") -> completed interviews wanted

    def encode(self) -> str:
        return json.dumps({"on": list(self.on), "targets": self.targets}, sort_keys=True)

    @classmethod
    def decode(cls, raw: str) -> Quota | None:
        if not raw:
            return None
        data = json.loads(raw)
        return cls(tuple(data["on"]), {k: int(v) for k, v in data["targets"].items()})

    def cell(self, key: str) -> dict[str, str]:
        return dict(zip(self.on, key.split("|"), strict=True))


def define(form: Questionnaire, on: Iterable[str],
           cells: Iterable[tuple[dict[str, str], Any]]) -> Quota:
    """Check a quota against the campaign's questionnaire: every variable a single-choice
    question, every cell value one of its choices, every target a whole number >= 0."""
    names = tuple(on)
    if not names:
        raise QuotaError("name at least one question to set quotas on")
    if len(set(names)) != len(names) or len(names) > MAX_DIMENSIONS:
        raise QuotaError(f"quota questions must be distinct, at most {MAX_DIMENSIONS}")
    questions = {q.name: q for q in form.questions}
    choices: dict[str, set[str]] = {}
    for name in names:
        question = questions.get(name)
        if question is None or question.type != "select_one":
            raise QuotaError(f"{name!r} is not a single-choice question of questionnaire "
                             f"{form.version}")
        choices[name] = {c.name for c in question.choices}
    targets: dict[str, int] = {}
    for n, (cell, target) in enumerate(cells, start=1):
        if set(cell) != set(names):
            raise QuotaError(f"{_named(n, cell)}: give a value for each of {', '.join(names)}")
        for name in names:
            if cell[name] not in choices[name]:
                raise QuotaError(f"{_named(n, cell)}: {cell[name]!r} is not a choice of {name} "
                                 f"({', '.join(sorted(choices[name]))})")
        if isinstance(target, bool) or not isinstance(target, int | str):
            raise QuotaError(f"{_named(n, cell)}: target must be a whole number")
        try:
            value = int(target)
        except ValueError:
            raise QuotaError(f"{_named(n, cell)}: target {target!r} is not a whole "
                             "number") from None
        if not 0 <= value <= 2**31 - 1:  # what the SQL column holds
            raise QuotaError(f"{_named(n, cell)}: target must be from 0 to {2**31 - 1}")
        key = cell_key([cell[name] for name in names])
        if key in targets:
            raise QuotaError(f"{_named(n, cell)}: {key} is given twice")
        targets[key] = value
    if not targets:
        raise QuotaError("give at least one cell with its target")
    return Quota(names, targets)


def _named(n: int, cell: dict[str, str]) -> str:
    """'cell 3 (region=ashanti, sex=female)': the error names the cell, not only its place."""
    values = ", ".join(f"{name}={value}" for name, value in cell.items())
    return f"cell {n} ({values})" if values else f"cell {n}"


def read_csv(data: bytes, form: Questionnaire) -> Quota:
    """A quota file: one column per quota question, then `target`; one row per cell
    (separated by commas, semicolons or tabs, as gateway.csvfiles reads them).

        region,sex,target
        ashanti,female,120
    """
    try:
        header, rows = _cells(csvfiles.decode(data))
    except csvfiles.UnreadableCsv as exc:  # an .xlsx, binary data, an unclosed quote
        raise QuotaError(str(exc)) from None
    if "target" not in header:
        raise QuotaError("the first row must name the quota questions and then 'target', "
                         "e.g. region,sex,target")
    on = [h for h in header if h != "target"]
    cells = [({name: row.get(name, "") for name in on}, row.get("target", "")) for row in rows]
    try:
        return define(form, on, cells)
    except QuotaError as exc:  # cell n is data line n+1 (blank lines aside)
        raise QuotaError(f"{exc} (cells are counted from the first data line)") from None


def _cells(text: str) -> tuple[list[str], list[dict[str, str]]]:
    """The header and each non-blank row by column name, values stripped (as csv.DictReader
    would give them: a short row's missing values are empty, a long row's extras dropped).
    The whole file is read first, so a broken last line refuses all of it."""
    records = csvfiles.records(text, csvfiles.delimiter_of(text))
    header = [h.strip() for h in next(records, (0, []))[1]]
    rows = []
    for _, values in records:
        if any(v.strip() for v in values):
            rows.append({name: value.strip() for name, value in zip(header, values, strict=False)})
    return header, rows
