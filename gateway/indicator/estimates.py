"""SDG 16.6.2 statistics: shares, attribute index, raking, confidence intervals, disclosure
control. Pure numpy, no I/O: gateway/tally.py feeds it cell counts from SQL.

Method: /work/shared/spec/sdg1662.md; choices the spec leaves open are written down in
gateway/data/METHODOLOGY.md.

Raking is written here rather than taken from a library: samplics pulls pandas, statsmodels
and matplotlib into a gateway that otherwise needs none of them, and ipfn rakes a dense
table but has neither trimming nor a convergence report. What we need is small (IPF on a
few hundred weighting cells, trimming, re-raking) and it has to run once per bootstrap
replicate, so a cell-level IPF of ~40 lines is both faster and easier to check.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gateway import csvfiles

Z95 = 1.959963984540054

# -- the indicator's definitions -------------------------------------------------------
# service area -> (label, the five attribute questions, the overall question)
AREAS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "health": ("Health care", ("h_acc", "h_aff", "h_fac", "h_eq", "h_court"), "h_sat"),
    "primary": ("Primary school", ("p_acc", "p_aff", "p_fac", "p_eq", "p_teach"), "p_sat"),
    "secondary": ("Secondary school", ("s_acc", "s_aff", "s_fac", "s_eq", "s_teach"), "s_sat"),
    "govt": ("ID and civil registration", ("g_acc", "g_aff", "g_eq", "g_eff", "g_time"),
             "g_sat"),
}
# Agreement scale (attributes) and satisfaction scale (overall). Anything else that was
# answered (dk = don't know/skip) is excluded from the denominator and counted.
AGREE_POSITIVE, AGREE_NEGATIVE = frozenset({"sa", "a"}), frozenset({"d", "sd"})
SAT_POSITIVE, SAT_NEGATIVE = frozenset({"vs", "s"}), frozenset({"d", "vd"})

# Disaggregation variables (one at a time, plus region x sex).
BREAKDOWNS = ("sex", "age", "region", "urban", "income", "disability")
UNKNOWN = "unknown"  # refused / don't know / not answered: a group of its own, never dropped
WG_QUESTIONS = ("wg_see", "wg_hear", "wg_walk", "wg_mem", "wg_care", "wg_comm")
# Raking variables: margins file variable -> questionnaire question.
RAKING = {"region": "region", "sex": "sex", "residence": "urban", "age": "age"}
# Regions created in 2018 fold back into the region they were split from when too few
# respondents answer from them: a merge that keeps neighbours together.
REGION_PARENT = {"Western North": "Western", "Oti": "Volta", "Savannah": "Northern",
                 "North East": "Northern", "Bono East": "Bono", "Ahafo": "Bono"}


def choice_name(category: str) -> str:
    """Margins category -> questionnaire choice name ("Greater Accra" -> greater_accra,
    "18-24" -> 18_24, "65+" -> 65p)."""
    return re.sub(r"[^a-z0-9]+", "_", category.lower().replace("+", "p")).strip("_")


def disability_status(wg_values: Sequence[str | None]) -> str:
    """Washington Group Short Set: 'a lot of difficulty' or 'cannot do at all' in any of
    the six domains = disability; all six answered otherwise = none; else unknown."""
    if any(v in ("alot", "cannot") for v in wg_values):
        return "yes"
    if len(wg_values) == 6 and all(v in ("none", "some") for v in wg_values):
        return "no"
    return UNKNOWN


# -- formulas ------------------------------------------------------------------------
def share(positive: float, valid: float) -> float | None:
    """(strongly agree + agree) / valid answers, weighted or not."""
    return positive / valid if valid > 0 else None


def attribute_index(shares: Sequence[float | None]) -> float | None:
    """Simple unweighted mean of the five attribute shares (None if one is missing)."""
    if len(shares) == 0 or any(s is None for s in shares):
        return None
    return float(sum(s for s in shares if s is not None) / len(shares))


def kish(sum_w: float, sum_w2: float, n: float) -> tuple[float, float]:
    """Effective n = (sum w)^2 / sum w^2 and design effect deff = n sum w^2 / (sum w)^2."""
    if sum_w <= 0 or sum_w2 <= 0:
        return 0.0, float("nan")
    n_eff = sum_w * sum_w / sum_w2
    return n_eff, n / n_eff


def wilson(p: float, n_eff: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval with the Kish effective sample size in place of n."""
    if n_eff <= 0:
        return 0.0, 1.0
    z2 = z * z
    denom = 1 + z2 / n_eff
    centre = (p + z2 / (2 * n_eff)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p), 0.0) / n_eff + z2 / (4 * n_eff * n_eff))
    return max(0.0, centre - half), min(1.0, centre + half)


# -- margins ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MarginRow:
    variable: str
    category: str
    population: float
    status: str
    source: str


@dataclass(frozen=True)
class Margins:
    rows: tuple[MarginRow, ...]
    sha256: str
    text: str

    def variables(self) -> list[str]:
        return list(dict.fromkeys(r.variable for r in self.rows))

    def categories(self, variable: str) -> list[MarginRow]:
        return [r for r in self.rows if r.variable == variable]

    def adult_total(self) -> float:
        """The population the weights add up to: the age margins (adults 18+) where
        present; the other variables' shares are applied to it."""
        var = "age" if "age" in self.variables() else self.variables()[0]
        return float(sum(r.population for r in self.categories(var)))

    def notes(self) -> list[str]:
        out = []
        for var in self.variables():
            rows = self.categories(var)
            odd = sorted({r.status for r in rows} - {"final"})
            if odd:
                out.append(f"{var} margins are {'/'.join(odd)}: {rows[0].source}")
            total = sum(r.population for r in rows)
            if abs(total - self.adult_total()) > 1e-9 * total:
                out.append(f"{var} margins sum to {total:,.0f} (not the adult total "
                           f"{self.adult_total():,.0f}): their shares are applied to adults")
        return out


class MarginsError(ValueError):
    """A margins file the raking cannot use, with where it is wrong (line and column)."""


MARGINS_COLUMNS = ("variable", "category", "population", "status", "source")


def margins_text(data: bytes) -> str:
    """A margins file's bytes as text: UTF-8 (a spreadsheet's BOM dropped), or a
    MarginsError naming the line and column of the first byte that is not."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        where = f"line {line}"
        if line > 1:  # which column: the cells before the bad byte, as csv reads them
            header = next(csv.reader([data[:data.find(b"\n")].decode("utf-8", "replace")]),
                          [])
            before = next(csv.reader([data[start:exc.start].decode("utf-8", "replace")]),
                          [""])
            if len(before) <= len(header):
                where += f", column {header[len(before) - 1].strip()!r}"
        raise MarginsError(f"{where}: byte 0x{data[exc.start]:02x} is not UTF-8 text; "
                           "save the file as CSV UTF-8") from None


def read_margins(text: str) -> Margins:
    """Parse a margins CSV (variable,category,population,status,source). Anything the
    raking cannot use is refused with its line and column, as a MarginsError: a silently
    wrong weight (a NaN target rakes to NaN and still reports converged) is worse than
    none."""
    need = MARGINS_COLUMNS[:3]
    header: list[str] | None = None
    rows: list[MarginRow] = []
    first_line: dict[tuple[str, str], int] = {}
    ended = 0
    try:
        for end, record in csvfiles.records(text):
            # The line a record starts on: an unclosed quote runs on over the next ones.
            line, ended = ended + 1, end
            if not record:
                continue  # a blank line
            if header is None:
                header = [name.strip() for name in record]
                missing = [name for name in need if name not in header]
                if missing:
                    raise MarginsError(f"line {line}: no column {missing[0]!r}; a margins "
                                       f"file starts with {','.join(MARGINS_COLUMNS)}")
                continue
            values = dict(zip(header, (v.strip() for v in record), strict=False))
            if not any(values.values()):
                continue  # a spreadsheet's empty row (",,,,")
            for name in need:
                if not values.get(name):
                    raise MarginsError(f"line {line}, column {name!r}: no value")
            raw = values["population"]
            try:
                population = float(raw)
            except ValueError:
                raise MarginsError(f"line {line}, column 'population': {raw!r} is not a "
                                   "number") from None
            if not math.isfinite(population):
                raise MarginsError(f"line {line}, column 'population': {raw!r} is not a "
                                   "finite number")
            if population <= 0:
                raise MarginsError(f"line {line}, column 'population': {raw!r} must be "
                                   "above 0")
            variable, category = values["variable"], values["category"]
            # Raking matches categories by choice name: two that map to one would both
            # add to the same target.
            key = (variable, choice_name(category))
            if key in first_line:
                raise MarginsError(f"line {line}, column 'category': {variable}={category} "
                                   f"is given on line {first_line[key]} already")
            first_line[key] = line
            rows.append(MarginRow(variable, category, population,
                                  values.get("status") or "final", values.get("source", "")))
    except csvfiles.UnreadableCsv as exc:  # a NUL byte, an overlong field
        raise MarginsError(str(exc)) from None
    if header is None:
        raise MarginsError("the file is empty")
    if not rows:
        raise MarginsError("no margins: the file has a header and no rows")
    for variable in dict.fromkeys(r.variable for r in rows):
        if not math.isfinite(sum(r.population for r in rows if r.variable == variable)):
            raise MarginsError(f"the {variable} margins add up to more than a number holds")
    return Margins(tuple(rows), hashlib.sha256(text.encode()).hexdigest(), text)


# -- collapsing ------------------------------------------------------------------------
def collapse(variable: str, categories: Sequence[str], counts: Sequence[int],
             min_n: int) -> tuple[dict[str, str], list[str]]:
    """Merge raking categories with fewer than min_n respondents, never dropping one.

    Rule, repeated until every group has min_n (or one group is left): the smallest group
    is merged into, for regions split off in 2018, the region it was split from; for age
    bands, the smaller adjacent band; otherwise the smallest other group that has
    respondents (so empty categories do not merge into each other first). Returns
    category -> group label ("Bono+Ahafo") and a note per merge.
    """
    groups: list[list[str]] = [[c] for c in categories]
    n = {c: int(k) for c, k in zip(categories, counts, strict=True)}
    notes: list[str] = []

    def size(g: list[str]) -> int:
        return sum(n[c] for c in g)

    while len(groups) > 1:
        small = min((g for g in groups if size(g) < min_n), key=size, default=None)
        if small is None:
            break
        i = groups.index(small)
        target: list[str] | None = None
        if variable == "region":
            parent = next((REGION_PARENT[c] for c in small if c in REGION_PARENT), None)
            target = next((g for g in groups if parent in g and g is not small), None)
        if target is None and variable == "age":
            near = [groups[j] for j in (i - 1, i + 1) if 0 <= j < len(groups)]
            target = min(near, key=size)
        if target is None:
            others = [g for g in groups if g is not small]
            target = min([g for g in others if size(g) > 0] or others, key=size)
        notes.append(f"{variable}: {'+'.join(small)} (n={size(small)}) merged with "
                     f"{'+'.join(target)} (n={size(target)}) for raking")
        target.extend(small)
        groups.remove(small)
    mapping = {c: "+".join(g) for g in groups for c in g}
    return mapping, notes


# -- raking ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RakeResult:
    weights: NDArray[np.float64]  # per unit in each cell
    converged: bool
    iterations: int
    rounds: int  # sweeps in which the cap trimmed a weight
    max_margin_error: float  # relative, worst category
    cap: float
    trimmed_cells: int
    max_weight_ratio: float  # largest weight / mean weight

    def report(self) -> dict[str, Any]:
        return {"converged": self.converged, "iterations": self.iterations,
                "trimming_sweeps": self.rounds, "max_margin_rel_error": self.max_margin_error,
                "cap": self.cap, "trimmed_cells": self.trimmed_cells,
                "max_weight_ratio": self.max_weight_ratio}


def _margin_error(n: NDArray[np.float64], codes: Sequence[NDArray[np.int64]],
                  targets: Sequence[NDArray[np.float64]], w: NDArray[np.float64]) -> float:
    """Worst relative gap between a weighted category total and what it should be."""
    total = float(targets[0].sum()) if targets else 0.0
    err = 0.0
    nw = n * w
    for code, target in zip(codes, targets, strict=True):
        known = code >= 0
        have = np.bincount(code[known], weights=nw[known], minlength=len(target))
        want = target / target.sum() * max(total - float(nw[~known].sum()), 0.0)
        ok = (have > 0) & (want > 0)
        if ok.any():
            err = max(err, float(np.max(np.abs(have[ok] - want[ok]) / want[ok])))
    return err


def rake(counts: Sequence[float] | NDArray[np.float64],
         codes: Sequence[NDArray[np.int64]], targets: Sequence[NDArray[np.float64]], *,
         cap_ratio: float = 5.0, tol: float = 1e-10, max_iter: int = 5000) -> RakeResult:
    """Raking (IPF) of cell counts to margins with weights trimmed at cap_ratio x the mean
    weight, re-raked until both the margins and the cap hold (or max_iter sweeps).

    counts[c] units share cell c; codes[v][c] is the cell's category index in variable v
    (-1 = unknown); targets[v] are population totals per category, scaled to one total.
    The returned weights are per unit. Cells with no units get weights too (the same
    category factors), so units outside the raking base can be weighted alike.

    The cap is applied after every sweep rather than after full convergence: the same
    fixed point (margins met, no weight above the cap) in far fewer sweeps, which matters
    because every bootstrap replicate is raked again.
    """
    n = np.asarray(counts, dtype=np.float64)
    targets = [np.asarray(t, dtype=np.float64) for t in targets]
    total = float(targets[0].sum()) if targets else float(n.sum())
    targets = [t / t.sum() * total for t in targets]
    units = float(n.sum())
    if units == 0:
        return RakeResult(np.ones_like(n), False, 0, 0, float("inf"), float("nan"), 0,
                          float("nan"))
    known = [code >= 0 for code in codes]
    idx = [np.maximum(code, 0) for code in codes]
    shares = [t / t.sum() for t in targets]
    w = np.full_like(n, total / units)
    cap = float("nan")
    trimmed = capped_sweeps = 0
    sweep = 0
    for sweep in range(1, max_iter + 1):  # noqa: B007 - reported
        moved = 0.0
        for k, share_k, i_k in zip(known, shares, idx, strict=True):
            nw = n * w
            have = np.bincount(i_k[k], weights=nw[k], minlength=len(share_k))
            # Units with this variable unknown keep their weight; the known ones share
            # what is left of the population in the margin's proportions.
            want = share_k * max(total - float(nw[~k].sum()), 0.0)
            factor = np.divide(want, have, out=np.ones_like(want), where=have > 0)
            moved = max(moved, float(np.max(np.abs(factor[have > 0] - 1.0), initial=0.0)))
            w = w * np.where(k, factor[i_k], 1.0)
        over_cap = False
        if cap_ratio and cap_ratio > 0:
            cap = float(cap_ratio * (n * w).sum() / units)
            over = (w > cap * (1 + tol)) & (n > 0)
            if over.any():
                over_cap = True
                capped_sweeps += 1
                trimmed = max(trimmed, int(over.sum()))
                w = np.minimum(w, cap)
        if moved < tol and not over_cap:
            break
    err = _margin_error(n, codes, targets, w) if codes else 0.0
    ratio = float(w[n > 0].max() / ((n * w).sum() / units))
    converged = err < max(tol * 100, 1e-8) and (
        not cap_ratio or ratio <= cap_ratio * (1 + 1e-6))
    return RakeResult(w, bool(converged), sweep, capped_sweeps, err, cap, trimmed, ratio)


# -- the tally -------------------------------------------------------------------------
@dataclass(frozen=True)
class Patterns:
    """Distinct respondent patterns with how many interviews share each (from SQL).

    profile: sex, age, region, urban, income, disability -> category per pattern (None =
    not answered); answers: question -> value per pattern (None = not answered/not asked).
    """
    count: NDArray[np.int64]
    completed: NDArray[np.bool_]
    profile: Mapping[str, Sequence[str | None]]
    answers: Mapping[str, Sequence[str | None]]

    @property
    def size(self) -> int:
        return int(self.count.shape[0])


@dataclass(frozen=True)
class Params:
    min_n: int = 10  # unweighted n below this: suppressed
    min_neff: float = 30.0  # effective n below this: suppressed
    flag_neff: float = 50.0  # effective n below this: published with a flag
    cap_ratio: float = 5.0  # weights trimmed at this multiple of the mean
    collapse_min: int = 20  # raking categories with fewer completed respondents are merged
    replicates: int = 200  # bootstrap replicates for the attribute index
    seed: int = 16062  # bootstrap seed: the same data gives the same intervals

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Cell:
    area: str
    measure: str  # an attribute question, "index" or "satisfied"
    breakdown: str  # total | sex | age | region | urban | income | disability | region_sex
    group: str  # "_T", a choice name, "unknown", or "region|sex"
    n: int = 0
    n_dk: int = 0
    estimate: float | None = None
    unweighted: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n_eff: float | None = None
    deff: float | None = None
    status: str = "published"  # published | flagged | suppressed | suppressed_secondary
    ci_method: str = "wilson-kish"

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.area, self.measure, self.breakdown, self.group)

    @property
    def hidden(self) -> bool:
        return self.status.startswith("suppressed")


@dataclass
class Tally:
    cells: list[Cell]
    weighting: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    n_interviews: int = 0
    n_completed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"cells": [c.__dict__ for c in self.cells], "weighting": self.weighting,
                "notes": self.notes, "n_interviews": self.n_interviews,
                "n_completed": self.n_completed}

    def cell(self, area: str, measure: str, breakdown: str = "total",
             group: str = "_T") -> Cell:
        for c in self.cells:
            if c.key == (area, measure, breakdown, group):
                return c
        raise KeyError((area, measure, breakdown, group))


def _codes(values: Sequence[str | None]) -> tuple[NDArray[np.int64], list[str]]:
    """Category codes (levels sorted); None -> UNKNOWN."""
    labels = [UNKNOWN if v is None else v for v in values]
    levels = sorted(set(labels))
    index = {lv: i for i, lv in enumerate(levels)}
    return np.array([index[lv] for lv in labels], dtype=np.int64), levels


@dataclass
class _Weighting:
    pattern_weights: NDArray[np.float64]
    cell_of: NDArray[np.int64]  # pattern -> weighting cell
    cell_codes: list[NDArray[np.int64]]
    targets: list[NDArray[np.float64]]
    report: dict[str, Any]


def _weighting(p: Patterns, margins: Margins, params: Params,
               notes: list[str]) -> _Weighting:
    """Raking of completed interviews to the margins (collapsed where thin)."""
    per_var_codes: list[NDArray[np.int64]] = []
    targets: list[NDArray[np.float64]] = []
    done = p.completed.astype(np.float64) * p.count
    for var in margins.variables():
        question = RAKING.get(var, var)
        if question not in p.profile:
            notes.append(f"margins variable {var!r} is not asked: not used for raking")
            continue
        rows = margins.categories(var)
        by_choice = {choice_name(r.category): r.category for r in rows}
        values = [by_choice.get(v) if v is not None else None for v in p.profile[question]]
        cats = [r.category for r in rows]
        ci = {c: i for i, c in enumerate(cats)}
        raw = np.array([ci.get(v, -1) if v is not None else -1 for v in values],
                       dtype=np.int64)
        counts = np.bincount(raw[raw >= 0], weights=done[raw >= 0], minlength=len(cats))
        mapping, merged = collapse(var, cats, counts, params.collapse_min)
        notes.extend(merged)
        groups = list(dict.fromkeys(mapping[c] for c in cats))
        if len(groups) < 2:
            notes.append(f"{var}: too few respondents to rake on it")
            continue
        gi = {g: i for i, g in enumerate(groups)}
        code = np.array([gi[mapping[v]] if v is not None else -1 for v in values],
                        dtype=np.int64)
        target = np.zeros(len(groups))
        for r in rows:
            target[gi[mapping[r.category]]] += r.population
        per_var_codes.append(code)
        targets.append(target / target.sum() * margins.adult_total())
    if per_var_codes:
        stacked = np.stack(per_var_codes, axis=1)
        cells, cell_of = np.unique(stacked, axis=0, return_inverse=True)
        cell_of = cell_of.reshape(-1)
    else:
        cells = np.zeros((1, 0), dtype=np.int64)
        cell_of = np.zeros(p.size, dtype=np.int64)
    cell_codes = [cells[:, j] for j in range(cells.shape[1])]
    base = np.bincount(cell_of, weights=done, minlength=cells.shape[0])
    if base.sum() == 0:
        notes.append("no completed interviews: estimates are unweighted")
        return _Weighting(np.ones(p.size), cell_of, cell_codes, targets,
                          {"converged": False, "method": "none"})
    result = rake(base, cell_codes, targets, cap_ratio=params.cap_ratio)
    report = {"method": "raking (IPF), trimmed and re-raked", "cells": int(len(base)),
              "variables": [v for v in margins.variables()
                            if RAKING.get(v, v) in p.profile], **result.report()}
    if not result.converged:
        notes.append("raking did not fully converge: see the weighting report")
    return _Weighting(result.weights[cell_of], cell_of, cell_codes, targets, report)


def _domains(p: Patterns) -> list[tuple[str, NDArray[np.int64], list[str]]]:
    out: list[tuple[str, NDArray[np.int64], list[str]]] = [
        ("total", np.zeros(p.size, dtype=np.int64), ["_T"])]
    for var in BREAKDOWNS:
        if var in p.profile:
            code, levels = _codes(p.profile[var])
            out.append((var, code, levels))
    if "region" in p.profile and "sex" in p.profile:
        both = [f"{UNKNOWN if r is None else r}|{UNKNOWN if s is None else s}"
                for r, s in zip(p.profile["region"], p.profile["sex"], strict=True)]
        code, levels = _codes(both)
        out.append(("region_sex", code, levels))
    return out


NOT_ASKED, POSITIVE, NEGATIVE, DONT_KNOW = 0, 1, 2, 3


def answer_states(p: Patterns) -> dict[str, NDArray[np.int8]]:
    """Per service question and pattern: not answered, positive, negative, or answered
    but not valid (don't know/refuse). One pass over the values per question."""
    states: dict[str, NDArray[np.int8]] = {}
    for _label, attrs, overall in AREAS.values():
        for question in (*attrs, overall):
            values = p.answers.get(question)
            if values is None:
                continue
            pos_set, neg_set = _scale(question, attrs)
            lookup = {v: (NOT_ASKED if v is None else POSITIVE if v in pos_set
                          else NEGATIVE if v in neg_set else DONT_KNOW) for v in set(values)}
            states[question] = np.fromiter((lookup[v] for v in values), dtype=np.int8,
                                           count=len(values))
    return states


def _scale(question: str, attrs: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    if question in attrs:
        return AGREE_POSITIVE, AGREE_NEGATIVE
    return SAT_POSITIVE, SAT_NEGATIVE


def estimate(p: Patterns, margins: Margins, params: Params = Params()) -> Tally:
    """Every cell of the indicator table, weighted, with CIs and disclosure control."""
    notes = ["experimental citizen data: an opt-in phone survey raked to census margins, "
             "not a probability sample", *margins.notes()]
    wt = _weighting(p, margins, params, notes)
    w = wt.pattern_weights
    f = p.count.astype(np.float64)
    domains = _domains(p)
    states = answer_states(p)
    cells: list[Cell] = []
    for area, (_label, attrs, overall) in AREAS.items():
        for question in (*attrs, overall):
            state = states.get(question)
            if state is None:
                continue
            pos = state == POSITIVE
            valid = pos | (state == NEGATIVE)
            dk = state == DONT_KNOW
            measure = question if question in attrs else "satisfied"
            for name, code, levels in domains:
                g = len(levels)
                n = np.bincount(code, f * valid, g)
                ndk = np.bincount(code, f * dk, g)
                sw = np.bincount(code, f * w * valid, g)
                sw2 = np.bincount(code, f * w * w * valid, g)
                swy = np.bincount(code, f * w * pos, g)
                uy = np.bincount(code, f * pos, g)
                for j, level in enumerate(levels):
                    if n[j] == 0 and ndk[j] == 0:
                        continue
                    cell = Cell(area, measure, name, level, int(n[j]), int(ndk[j]))
                    if n[j] > 0:
                        est = float(swy[j] / sw[j])
                        n_eff, deff = kish(float(sw[j]), float(sw2[j]), float(n[j]))
                        lo, hi = wilson(est, n_eff)
                        cell.estimate, cell.unweighted = est, float(uy[j] / n[j])
                        cell.n_eff, cell.deff, cell.ci_low, cell.ci_high = n_eff, deff, lo, hi
                    cells.append(cell)
        _index_cells(p, area, attrs, domains, w, cells, states)
    boot = bootstrap_index(p, wt, domains, params, states)
    for cell in cells:
        if cell.measure == "index" and cell.key in boot:
            cell.ci_low, cell.ci_high = boot[cell.key]
            cell.ci_method = f"bootstrap-reraked-{params.replicates}"
    suppress(cells, params)
    n_int = int(p.count.sum())
    return Tally(cells, wt.report, notes, n_int, int(p.count[p.completed].sum()))


def _index_cells(p: Patterns, area: str, attrs: Sequence[str],
                 domains: list[tuple[str, NDArray[np.int64], list[str]]],
                 w: NDArray[np.float64], cells: list[Cell],
                 states: Mapping[str, NDArray[np.int8]]) -> None:
    """Attribute index per domain: the mean of the five weighted shares; n, n_eff and deff
    are over respondents with at least one valid attribute answer."""
    by_key = {c.key: c for c in cells if c.area == area}
    f = p.count.astype(np.float64)
    any_valid = np.zeros(p.size, dtype=bool)
    for q in attrs:
        if q in states:
            any_valid |= (states[q] == POSITIVE) | (states[q] == NEGATIVE)
    for name, code, levels in domains:
        g = len(levels)
        n = np.bincount(code, f * any_valid, g)
        sw = np.bincount(code, f * w * any_valid, g)
        sw2 = np.bincount(code, f * w * w * any_valid, g)
        for j, level in enumerate(levels):
            parts = [by_key.get((area, q, name, level)) for q in attrs]
            if n[j] == 0 or any(c is None for c in parts):
                continue
            est = attribute_index([c.estimate for c in parts if c is not None])
            unw = attribute_index([c.unweighted for c in parts if c is not None])
            n_eff, deff = kish(float(sw[j]), float(sw2[j]), float(n[j]))
            cells.append(Cell(area, "index", name, level, int(n[j]), 0, est, unw,
                              None, None, n_eff, deff))


def rake_many(base: NDArray[np.float64], codes: Sequence[NDArray[np.int64]],
              targets: Sequence[NDArray[np.float64]], *, cap_ratio: float = 5.0,
              tol: float = 1e-7, max_iter: int = 1000) -> NDArray[np.float64]:
    """`rake` for many replicates at once: base[r, c] units of replicate r in cell c ->
    weights[r, c]. The same sweeps (margins, then the cap), as matrix products."""
    reps, n_cells = base.shape
    total = float(targets[0].sum()) if targets else 1.0
    units = base.sum(axis=1)
    w = np.repeat(np.where(units > 0, total / np.maximum(units, 1e-300), 1.0)[:, None],
                  n_cells, axis=1).astype(np.float64)
    plan = []
    for code, target in zip(codes, targets, strict=True):
        onehot = np.zeros((n_cells, len(target)))
        known = code >= 0
        onehot[np.nonzero(known)[0], code[known]] = 1.0
        plan.append((onehot, np.maximum(code, 0), np.nonzero(~known)[0], target / target.sum()))
    for _sweep in range(max_iter):
        moved = 0.0
        for onehot, idx, unknown, share_k in plan:
            nw = base * w
            have = nw @ onehot
            rest = total - nw[:, unknown].sum(axis=1)
            want = share_k[None, :] * np.maximum(rest, 0)[:, None]
            factor = np.divide(want, have, out=np.ones_like(want), where=have > 0)
            if (have > 0).any():
                moved = max(moved, float(np.abs(factor - 1)[have > 0].max()))
            per_cell = factor[:, idx]
            if len(unknown):
                per_cell[:, unknown] = 1.0  # unknown on this variable: weight kept
            w *= per_cell
        over_cap = False
        if cap_ratio and cap_ratio > 0:
            cap = cap_ratio * (base * w).sum(axis=1) / np.maximum(units, 1e-300)
            over = (w > cap[:, None] * (1 + tol)) & (base > 0)
            if over.any():
                over_cap = True
                np.minimum(w, cap[:, None], out=w)
        if moved < tol and not over_cap:
            break
    return w


def bootstrap_index(p: Patterns, wt: _Weighting,
                    domains: list[tuple[str, NDArray[np.int64], list[str]]],
                    params: Params, states: Mapping[str, NDArray[np.int8]] | None = None,
                    ) -> dict[tuple[str, str, str, str], tuple[float, float]]:
    """Percentile 95% CI of the attribute index per domain: resample interviews with
    replacement, re-rake each replicate to the same (collapsed) margins, recompute.

    Resampling is the Poisson bootstrap (each interview drawn Poisson(1) times), which for
    samples of this size behaves like drawing n with replacement and lets all replicates
    be computed at once as matrix products instead of a Python loop per replicate.
    """
    reps = params.replicates
    if reps <= 0 or p.size == 0:
        return {}
    states = states if states is not None else answer_states(p)
    m = _poisson_counts(np.random.default_rng(params.seed), p.count, reps)
    n_cells = len(wt.cell_codes[0]) if wt.cell_codes else 1
    done = p.completed
    order = np.argsort(wt.cell_of, kind="stable")
    starts = np.searchsorted(wt.cell_of[order], np.arange(n_cells))
    # Every weighting cell holds at least one pattern, so `starts` is strictly increasing.
    done_sorted = (m * done[None, :].astype(np.float32))[:, order]
    base = np.add.reduceat(done_sorted, starts, axis=1).astype(np.float64)
    if wt.targets:
        cell_w = rake_many(base, wt.cell_codes, wt.targets, cap_ratio=params.cap_ratio)
    else:
        cell_w = np.ones((reps, n_cells))
    # replicates x interviews
    weighted = m * np.take(cell_w.astype(np.float32), wt.cell_of, axis=1)
    offsets = np.cumsum([0] + [len(levels) for _, _, levels in domains])
    n_groups = int(offsets[-1])
    out: dict[tuple[str, str, str, str], tuple[float, float]] = {}
    for area, (_label, attrs, _overall) in AREAS.items():
        y = np.zeros((p.size, 2 * len(attrs)), dtype=np.float32)
        for j, q in enumerate(attrs):
            state = states.get(q, np.zeros(p.size, dtype=np.int8))
            y[:, 2 * j] = state == POSITIVE
            y[:, 2 * j + 1] = (state == POSITIVE) | (state == NEGATIVE)
        users = np.nonzero(y[:, 1::2].any(axis=1))[0]
        if len(users) == 0:
            continue
        # (interview, attribute column, domain group) flattened: one matrix product gives
        # every replicate's weighted sums for every domain.
        z3 = np.zeros((len(users), 2 * len(attrs), n_groups), dtype=np.float32)
        rows = np.arange(len(users))
        for d, (_name, code, _levels) in enumerate(domains):
            z3[rows, :, offsets[d] + code[users]] = y[users]
        z = z3.reshape(len(users), -1)
        sums = (weighted[:, users] @ z).reshape(reps, 2 * len(attrs), n_groups)
        pos, val = sums[:, 0::2, :].astype(np.float64), sums[:, 1::2, :].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            index = (pos / val).mean(axis=1)  # replicates x groups (NaN: no answer)
        lo, hi = _percentiles(index, 2.5, 97.5)
        for d, (name, _code, levels) in enumerate(domains):
            for j, level in enumerate(levels):
                g = offsets[d] + j
                if np.isfinite(lo[g]) and np.isfinite(hi[g]):
                    out[(area, "index", name, level)] = (float(lo[g]), float(hi[g]))
    return out


_TABLE_BITS = 20


@functools.cache
def _poisson1_table() -> NDArray[np.float32]:
    cdf = np.cumsum([math.exp(-1) / math.factorial(k) for k in range(16)])
    quantiles = (np.arange(2 ** _TABLE_BITS) + 0.5) / 2 ** _TABLE_BITS
    return np.searchsorted(cdf, quantiles).astype(np.float32)


def _poisson_counts(rng: np.random.Generator, count: NDArray[np.int64],
                   reps: int) -> NDArray[np.float32]:
    """Poisson(count) draws per replicate and pattern. Poisson(1) (nearly every pattern is
    one interview) comes from a 2^20-entry quantile table indexed by random integers:
    several times faster than rng.poisson and exact to 1e-6 in probability."""
    draws = _poisson1_table()[rng.integers(0, 2 ** _TABLE_BITS, (reps, len(count)),
                                           dtype=np.uint32)]
    many = np.nonzero(count != 1)[0]
    if len(many):
        draws[:, many] = rng.poisson(count[many].astype(np.float64), (reps, len(many)))
    return draws


def _percentiles(values: NDArray[np.float64], low: float,
                 high: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Column percentiles ignoring NaN (linear interpolation, as numpy's default), without
    nanpercentile's per-column Python loop; columns with fewer than 20 finite replicates
    get NaN (no interval)."""
    ordered = np.sort(values, axis=0)  # NaN sort last
    finite = np.isfinite(values).sum(axis=0)
    cols = np.arange(values.shape[1])
    out = []
    for q in (low, high):
        pos = (finite - 1) * q / 100
        below = np.floor(pos).astype(np.int64).clip(0)
        above = np.ceil(pos).astype(np.int64).clip(0)
        frac = pos - below
        v = ordered[below, cols] * (1 - frac) + ordered[above, cols] * frac
        out.append(np.where(finite >= 20, v, np.nan))
    return out[0], out[1]


# -- disclosure control ----------------------------------------------------------------
def suppress(cells: list[Cell], params: Params) -> None:
    """Primary suppression (n < min_n or n_eff < min_neff), a flag for min_neff <= n_eff <
    flag_neff, then secondary suppression until no hidden cell can be derived.

    A hidden cell is derivable when it is the only hidden one in a linear relation whose
    other members are published: a total and the cells that partition it (each breakdown
    of an area's measure; each region's and each sex's row of region x sex), and an index
    and its five attribute shares. Each such relation gets a second hidden cell: the
    published member with the smallest n.
    """
    for c in cells:
        n_eff = c.n_eff or 0.0
        if c.n < params.min_n or n_eff < params.min_neff or c.estimate is None:
            c.status = "suppressed"
        elif n_eff < params.flag_neff:
            c.status = "flagged"
    by_key = {c.key: c for c in cells}
    # An index is only as publishable as its five shares.
    for c in cells:
        if c.measure == "index" and not c.hidden:
            attrs = AREAS[c.area][1]
            if any(by_key.get((c.area, q, c.breakdown, c.group)) is None
                   or by_key[(c.area, q, c.breakdown, c.group)].hidden for q in attrs):
                c.status = "suppressed"
    rels = relations(cells)
    changed = True
    while changed:
        changed = False
        for rel in rels:
            # A cell without a valid answer has no value that could be derived.
            members = [by_key[k] for k in rel if k in by_key and by_key[k].n > 0]
            hidden = [c for c in members if c.hidden]
            if len(hidden) == 1:
                shown = [c for c in members if not c.hidden]
                if shown:
                    # In an index relation, hide the index rather than another share.
                    index = [c for c in shown if c.measure == "index"]
                    mixed = any(c.measure != "index" for c in members)
                    pick = index[0] if index and mixed else min(
                        shown, key=lambda c: (c.n, c.group, c.measure))
                    pick.status = "suppressed_secondary"
                    changed = True
    for c in cells:
        if c.hidden:
            c.estimate = c.unweighted = c.ci_low = c.ci_high = None


def relations(cells: Sequence[Cell]) -> list[list[tuple[str, str, str, str]]]:
    """Sets of cells any one of which follows from the others (see suppress)."""
    keys = {c.key for c in cells}
    # Sorted, never in set order: suppression is greedy, so the order relations are
    # visited in decides which cells hide, and a set of strings iterates in an order that
    # changes with the process's hash seed (PYTHONHASHSEED). Same data, same snapshot.
    ordered = sorted(keys)
    rels: list[list[tuple[str, str, str, str]]] = []
    by_measure: dict[tuple[str, str], list[tuple[str, str, str, str]]] = {}
    for k in ordered:
        by_measure.setdefault((k[0], k[1]), []).append(k)
    for (area, measure), ks in by_measure.items():
        total = (area, measure, "total", "_T")
        groups: dict[str, list[tuple[str, str, str, str]]] = {}
        for k in ks:
            groups.setdefault(k[2], []).append(k)
        for name, members in groups.items():
            if name == "total":
                continue
            if name != "region_sex":
                rels.append([total, *sorted(members)])
                continue
            rows: dict[tuple[str, str], list[tuple[str, str, str, str]]] = {}
            for k in members:
                region, sex = k[3].split("|", 1)
                rows.setdefault(("region", region), []).append(k)
                rows.setdefault(("sex", sex), []).append(k)
            for (var, level), part in rows.items():
                parent = (area, measure, var, level)
                if parent in keys:
                    rels.append([parent, *sorted(part)])
    for area, (_label, attrs, _overall) in AREAS.items():
        for k in ordered:
            if k[0] == area and k[1] == "index":
                rels.append([k, *[(area, q, k[2], k[3]) for q in attrs
                                  if (area, q, k[2], k[3]) in keys]])
    return rels
