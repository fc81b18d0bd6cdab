"""SDG 16.6.2 formulas, raking, bootstrap and disclosure control against hand-computed values."""

from __future__ import annotations

import math
import re
from importlib import resources

import numpy as np
import pytest

from gateway.indicator.estimates import (
    AREAS,
    Cell,
    Margins,
    MarginsError,
    Params,
    Patterns,
    attribute_index,
    choice_name,
    collapse,
    disability_status,
    estimate,
    kish,
    margins_text,
    rake,
    rake_many,
    read_margins,
    share,
    suppress,
    wilson,
)
from gateway.interview.questionnaire import load_questionnaire


def shipped_margins() -> Margins:
    return read_margins(resources.files("gateway.indicator").joinpath(
        "data/ghana_margins.csv").read_text())


def test_metadata_worked_example_attribute_index() -> None:
    """(50+60+73+55+42)/5 = 56%, the metadata's example."""
    assert attribute_index([0.50, 0.60, 0.73, 0.55, 0.42]) == pytest.approx(0.56)
    assert attribute_index([0.5, None, 0.7, 0.5, 0.4]) is None


def test_metadata_worked_example_satisfied() -> None:
    """Very satisfied 23% + satisfied 37% = 60% of valid answers."""
    assert share(23 + 37, 23 + 37 + 25 + 15) == pytest.approx(0.60)
    assert share(0, 0) is None


def test_wilson_by_hand() -> None:
    """p = 0.6, n = 100: (0.6 + z²/200)/(1 + z²/100) ± z/(1 + z²/100)·√(.24/100 + z²/40000)."""
    lo, hi = wilson(0.6, 100)
    assert lo == pytest.approx(0.50200, abs=5e-5)
    assert hi == pytest.approx(0.69060, abs=5e-5)
    # Fewer effective respondents: a wider interval around the same share.
    lo2, hi2 = wilson(0.6, 25)
    assert lo2 < lo and hi2 > hi
    assert wilson(0.0, 10)[0] == 0.0


def test_kish_by_hand() -> None:
    """Weights 1, 1, 2, 2: Σw = 6, Σw² = 10, n_eff = 3.6, deff = 4/3.6."""
    n_eff, deff = kish(6.0, 10.0, 4)
    assert n_eff == pytest.approx(3.6)
    assert deff == pytest.approx(4 / 3.6)
    assert kish(5.0, 5.0, 5) == (5.0, 1.0)


@pytest.mark.parametrize(("values", "status"), [
    (["none"] * 6, "no"),
    (["none", "some", "none", "none", "none", "alot"], "yes"),
    (["cannot", "refuse", None, None, None, None], "yes"),
    (["none", "refuse", "none", "none", "none", "none"], "unknown"),
    (["some"] * 5, "unknown"),
])
def test_disability_washington_group_rule(values: list[str | None], status: str) -> None:
    """WG-SS: 'a lot' or 'cannot' in any domain = disability; refusals leave it unknown."""
    assert disability_status(values) == status


def test_margin_categories_match_the_questionnaire_choices() -> None:
    """Every margins category is a choice name of the question it rakes."""
    form = load_questionnaire(resources.files("questionnaires").joinpath(
        "sdg1662.md").read_bytes(), "sdg1662.md")
    margins = shipped_margins()
    questions = {"region": "region", "sex": "sex", "residence": "urban", "age": "age"}
    for var, question in questions.items():
        q = next(q for q in form.questions if q.name == question)
        names = {c.name for c in q.choices}
        for row in margins.categories(var):
            assert choice_name(row.category) in names, (var, row.category)


def test_margins_notes_flag_approximate_and_rescaled() -> None:
    """The age figures are approximate and the others are whole-population: both noted."""
    notes = " ".join(shipped_margins().notes())
    assert "age margins are approximate" in notes
    assert "region margins sum to 30,832,019" in notes
    assert shipped_margins().adult_total() == pytest.approx(17931673)


def test_collapse_rules() -> None:
    """Thin categories merge into their 2018 parent region / adjacent age band, never dropped."""
    mapping, notes = collapse("region", ["Volta", "Oti", "Ashanti"], [40, 3, 100], 20)
    assert mapping == {"Volta": "Volta+Oti", "Oti": "Volta+Oti", "Ashanti": "Ashanti"}
    assert "Oti (n=3) merged with Volta" in notes[0]
    mapping, _ = collapse("age", ["18-24", "25-34", "55-64", "65+"], [50, 60, 25, 5], 20)
    assert mapping["65+"] == mapping["55-64"] == "55-64+65+"
    assert mapping["18-24"] == "18-24"
    mapping, _ = collapse("sex", ["male", "female"], [100, 100], 20)
    assert mapping == {"male": "male", "female": "female"}


def _raking_problem(seed: int, missing: bool = False):  # type: ignore[no-untyped-def]
    margins = shipped_margins()
    rng = np.random.default_rng(seed)
    variables = ["region", "sex", "residence", "age"]
    sizes = [len(margins.categories(v)) for v in variables]
    grid = np.array(np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij")).reshape(4, -1)
    counts = rng.poisson(3.0, grid.shape[1]).astype(float)
    codes = [grid[i].astype(np.int64) for i in range(4)]
    if missing:
        codes[1] = np.where(rng.random(grid.shape[1]) < 0.05, -1, codes[1])
    total = margins.adult_total()
    targets = []
    for v in variables:
        pops = np.array([r.population for r in margins.categories(v)])
        targets.append(pops / pops.sum() * total)
    return counts, codes, targets


def test_raked_weights_reproduce_every_margin() -> None:
    """After trimming and re-raking, every margin holds to 1e-6 relative."""
    counts, codes, targets = _raking_problem(1)
    result = rake(counts, codes, targets, cap_ratio=5.0)
    assert result.converged
    for code, target in zip(codes, targets, strict=True):
        got = np.bincount(code, weights=counts * result.weights, minlength=len(target))
        assert np.max(np.abs(got - target) / target) < 1e-6
    mean = (counts * result.weights).sum() / counts.sum()
    assert result.weights[counts > 0].max() <= 5.0 * mean * 1.001


def test_trimming_caps_extreme_weights() -> None:
    """A nearly empty category forces large weights: the cap brings them to 3x the mean."""
    counts = np.array([1.0, 99.0, 50.0, 50.0])
    codes = [np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])]
    targets = [np.array([50.0, 50.0]), np.array([50.0, 50.0])]
    loose = rake(counts, codes, targets, cap_ratio=0)
    assert loose.max_weight_ratio > 3
    capped = rake(counts, codes, targets, cap_ratio=3.0)
    assert capped.trimmed_cells >= 1
    assert capped.converged
    assert capped.max_weight_ratio <= 3.0 * 1.001
    assert capped.max_margin_error < 1e-6


def test_batched_raking_equals_one_at_a_time() -> None:
    """rake_many (all bootstrap replicates at once) gives each replicate rake's weights."""
    counts, codes, targets = _raking_problem(3, missing=True)
    rng = np.random.default_rng(5)
    base = np.stack([rng.poisson(counts).astype(float) for _ in range(4)])
    many = rake_many(base, codes, targets, cap_ratio=4.0, tol=1e-10)
    for r in range(4):
        one = rake(base[r], codes, targets, cap_ratio=4.0)
        assert one.converged and one.trimmed_cells > 0
        seen = base[r] > 0
        assert np.allclose(many[r][seen], one.weights[seen], rtol=1e-6)


def test_raking_with_unknown_sex_keeps_the_share_among_the_known() -> None:
    """Respondents who did not say their sex keep their weight; the known follow the margin."""
    counts, codes, targets = _raking_problem(2, missing=True)
    result = rake(counts, codes, targets)
    known = codes[1] >= 0
    got = np.bincount(codes[1][known], weights=(counts * result.weights)[known], minlength=2)
    assert got[0] / got.sum() == pytest.approx(targets[1][0] / targets[1].sum(), rel=1e-6)
    assert (counts * result.weights).sum() == pytest.approx(targets[0].sum(), rel=1e-6)


# -- the whole table from respondent patterns -------------------------------------------
def patterns(rows: list[tuple[dict[str, str | None], int, bool]]) -> Patterns:
    profile_vars = ("sex", "age", "region", "urban", "income", "disability")
    questions = [q for _, (_l, attrs, overall) in AREAS.items() for q in (*attrs, overall)]
    return Patterns(
        count=np.array([n for _, n, _ in rows], dtype=np.int64),
        completed=np.array([c for _, _, c in rows], dtype=bool),
        profile={v: [r.get(v) for r, _, _ in rows] for v in profile_vars},
        answers={q: [r.get(q) for r, _, _ in rows] for q in questions},
    )


BASE = {"sex": "female", "age": "25_34", "region": "ashanti", "urban": "urban",
        "income": "coping", "disability": "no"}


def test_satisfied_overall_through_the_table() -> None:
    """One weighting cell (equal weights): 23 vs + 37 s of 100 valid = 60%, dk counted."""
    rows = [({**BASE, "h_sat": v}, n, True)
            for v, n in (("vs", 23), ("s", 37), ("d", 25), ("vd", 15), ("dk", 7))]
    tally = estimate(patterns(rows), shipped_margins(), Params(replicates=0))
    cell = tally.cell("health", "satisfied")
    assert (cell.n, cell.n_dk) == (100, 7)
    assert cell.estimate == pytest.approx(0.60)
    assert cell.n_eff == pytest.approx(100) and cell.deff == pytest.approx(1.0)
    assert (cell.ci_low, cell.ci_high) == pytest.approx(wilson(0.6, 100))
    assert tally.cell("health", "satisfied", "sex", "female").estimate == pytest.approx(0.6)


def test_index_is_the_mean_of_the_five_weighted_shares() -> None:
    """Index per domain = mean of the attribute shares; its CI comes from the bootstrap."""
    attrs = AREAS["health"][1]
    rows = []
    # share positive 50%, 60%, 70%, 50%, 40% over 100 respondents each
    for i in range(100):
        ans = {q: ("a" if i < k else "d") for q, k in zip(attrs, (50, 60, 70, 50, 40),
                                                          strict=True)}
        rows.append(({**BASE, **ans}, 1, True))
    tally = estimate(patterns(rows), shipped_margins(), Params(replicates=200, seed=7))
    index = tally.cell("health", "index")
    assert index.estimate == pytest.approx(0.54)
    assert index.ci_method == "bootstrap-reraked-200"
    assert index.ci_low is not None and index.ci_high is not None
    assert index.ci_low < 0.54 < index.ci_high
    assert 0.02 < index.ci_high - index.ci_low < 0.2
    again = estimate(patterns(rows), shipped_margins(), Params(replicates=200, seed=7))
    assert again.cell("health", "index").ci_low == index.ci_low  # seeded: reproducible


def test_primary_and_secondary_suppression() -> None:
    """n < 10 hides a cell; the smallest other cell of its partition hides with it."""
    def c(group: str, n: int, breakdown: str = "sex") -> Cell:
        return Cell("health", "satisfied", breakdown, group, n, 0, 0.5, 0.5, 0.4, 0.6,
                    float(n), 1.0)

    cells = [c("_T", 400, "total"), c("female", 8), c("male", 300), c("unknown", 92)]
    suppress(cells, Params())
    status = {x.group: x.status for x in cells}
    assert status == {"_T": "published", "female": "suppressed",
                      "unknown": "suppressed_secondary", "male": "published"}
    hidden = [x for x in cells if x.hidden]
    assert all(x.estimate is None and x.ci_low is None for x in hidden)


def test_flag_and_neff_threshold() -> None:
    """n_eff < 30 hides even with n >= 10; 30 <= n_eff < 50 is published with a flag."""
    low = Cell("health", "satisfied", "total", "_T", 60, 0, 0.5, 0.5, 0.4, 0.6, 25.0, 2.4)
    mid = Cell("govt", "satisfied", "total", "_T", 60, 0, 0.5, 0.5, 0.4, 0.6, 40.0, 1.5)
    suppress([low, mid], Params())
    assert low.status == "suppressed" and mid.status == "flagged"
    custom = Cell("govt", "satisfied", "total", "_T", 60, 0, 0.5, 0.5, 0.4, 0.6, 40.0, 1.5)
    suppress([custom], Params(min_neff=45, flag_neff=60))
    assert custom.status == "suppressed"


def test_region_by_sex_secondary_suppression_is_not_derivable() -> None:
    """In region x sex no hidden cell is alone in its row or column of published totals."""
    rows = []
    for region, n_f, n_m in (("ashanti", 40, 60), ("volta", 5, 45), ("bono", 30, 50)):
        for sex, n in (("female", n_f), ("male", n_m)):
            for i in range(n):
                rows.append(({**BASE, "region": region, "sex": sex,
                              "h_sat": "s" if i % 3 else "d"}, 1, True))
    tally = estimate(patterns(rows), shipped_margins(), Params(replicates=0, min_neff=0,
                                                               flag_neff=0))
    grid = {c.group: c for c in tally.cells
            if c.measure == "satisfied" and c.breakdown == "region_sex"}
    assert grid["volta|female"].status == "suppressed"
    from gateway.indicator.estimates import relations
    by_key = {c.key: c for c in tally.cells}
    for rel in relations(tally.cells):
        hidden = [k for k in rel if k in by_key and by_key[k].hidden]
        assert len(hidden) != 1, rel
    assert grid["volta|male"].hidden or grid["bono|female"].hidden


def test_index_hidden_when_a_share_is_hidden() -> None:
    """An attribute with too few valid answers hides the index of its domain."""
    attrs = AREAS["health"][1]
    rows = [({**BASE, **{q: "a" for q in attrs[:4]}, attrs[4]: "dk"}, 95, True),
            ({**BASE, **{q: "a" for q in attrs}}, 5, True)]
    tally = estimate(patterns(rows), shipped_margins(), Params(replicates=20))
    assert tally.cell("health", attrs[4]).status == "suppressed"
    assert tally.cell("health", attrs[4]).n_dk == 95
    assert tally.cell("health", "index").hidden
    assert tally.cell("health", attrs[0]).status == "published"


# -- simulation ---------------------------------------------------------------------------
def test_simulation_raking_reduces_bias_and_ci_covers() -> None:
    """Biased (over-urban, over-male) samples from a synthetic population whose satisfaction
    differs by region and sex: the raked estimate is nearer the truth than the unweighted
    one, and the Wilson/Kish 95% CI covers the truth in >= 93% of samples."""
    margins = shipped_margins()
    variables = ["region", "sex", "residence", "age"]
    shares = [np.array([r.population for r in margins.categories(v)]) for v in variables]
    shares = [s / s.sum() for s in shares]
    sizes = [len(s) for s in shares]
    grid = np.array(np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij")).reshape(4, -1)
    pop = np.prod([shares[i][grid[i]] for i in range(4)], axis=0)
    region_effect = np.linspace(-1.2, 1.2, sizes[0])
    male = grid[1] == 0  # margins order: male, female
    urban = grid[2] == 0
    logit = -0.2 + region_effect[grid[0]] + np.where(male, -0.6, 0.4) + np.where(urban, -0.4, 0)
    p_cell = 1 / (1 + np.exp(-logit))
    truth = float((pop * p_cell).sum())
    select = pop * np.where(urban, 2.5, 1.0) * np.where(male, 2.0, 1.0)
    select /= select.sum()
    total = margins.adult_total()
    targets = [s * total for s in shares]
    codes = [grid[i].astype(np.int64) for i in range(4)]
    rng = np.random.default_rng(20261125)
    reps, n = 400, 1500
    covered = 0
    err_raked, err_unw = [], []
    for _ in range(reps):
        counts = rng.multinomial(n, select).astype(float)
        yes = rng.binomial(counts.astype(np.int64), p_cell).astype(float)
        w = rake(counts, codes, targets, cap_ratio=5.0).weights
        sw, sw2 = float((counts * w).sum()), float((counts * w * w).sum())
        p_hat = float((yes * w).sum()) / sw
        n_eff, _ = kish(sw, sw2, n)
        lo, hi = wilson(p_hat, n_eff)
        covered += lo <= truth <= hi
        err_raked.append(p_hat - truth)
        err_unw.append(yes.sum() / n - truth)
    assert abs(np.mean(err_unw)) > 0.03  # the sample really is biased
    assert abs(np.mean(err_raked)) < abs(np.mean(err_unw)) / 5
    assert math.sqrt(np.mean(np.square(err_raked))) < math.sqrt(np.mean(np.square(err_unw)))
    assert covered / reps >= 0.93


def test_a_cell_with_only_dont_knows_does_not_force_secondary_suppression() -> None:
    """A group that answered only "don't know" has no share to protect: nothing else hides."""
    def c(group: str, n: int, n_dk: int = 0, breakdown: str = "sex") -> Cell:
        est = 0.5 if n else None
        return Cell("health", "satisfied", breakdown, group, n, n_dk, est, est, est, est,
                    float(n), 1.0)

    cells = [c("_T", 400, 3, "total"), c("female", 200), c("male", 200), c("unknown", 0, 3)]
    suppress(cells, Params())
    assert {x.group: x.status for x in cells} == {
        "_T": "published", "female": "published", "male": "published", "unknown": "suppressed"}


HEADER = "variable,category,population,status,source\n"


@pytest.mark.parametrize(("text", "expected"), [
    ("variable,category\nregion,Ashanti\n", "line 1: no column 'population'"),
    (" variable , category , population \nregion,Ashanti,5\n", None),  # headers stripped
    (HEADER + "region,Ashanti,5\nregion,Volta,0\n", "line 3, column 'population': '0' must"),
    (HEADER + "region,Ashanti,nan\n", "line 2, column 'population': 'nan' is not a finite"),
    (HEADER + "region,Ashanti,-inf\n", "line 2, column 'population': '-inf' is not a finite"),
    (HEADER + "region,Ashanti,1e999\n", "'1e999' is not a finite number"),
    (HEADER + "region,Ashanti,5 people\n", "'5 people' is not a number"),
    (HEADER + ",Ashanti,5\n", "line 2, column 'variable': no value"),
    (HEADER + "region,,5\n", "line 2, column 'category': no value"),
    (HEADER + "region,Greater Accra,5\nregion,greater accra,6\n",
     "line 3, column 'category': region=greater accra is given on line 2 already"),
    (HEADER + "region,Ashanti,1e308\nregion,Volta,1e308\n", "region margins add up to more"),
    # An unclosed quote runs on to the end: the line it opens on is named.
    (HEADER + 'region,Ashanti,5\nregion,"Volta,6\nregion,Oti,7\n',
     "line 3, column 'population': no value"),
    ("\n" + HEADER + "\nregion,Ashanti,5\n\nregion,Volta,x\n",
     "line 6, column 'population': 'x' is not a number"),
    (HEADER + "\n,,,,\n", "has a header and no rows"),
    ("", "the file is empty"),
])
def test_read_margins_refuses_what_raking_cannot_use(text: str, expected: str | None) -> None:
    """Each refusal says the line and column; a NaN or infinite target would rake every
    weight to NaN and still report converged."""
    if expected is None:
        assert read_margins(text).rows[0].population == 5
        return
    with pytest.raises(MarginsError, match=re.escape(expected)):
        read_margins(text)


@pytest.mark.parametrize(("data", "expected"), [
    (b"variable,category,population\nregion,Ashanti,5\nregion,Sav\xe1nnah,6\n",
     "line 3, column 'category': byte 0xe1 is not UTF-8 text"),
    (b"variable,category,population,status,source\nregion,A,5,final,\"r\xe9f, 2021\"\n",
     "line 2, column 'source': byte 0xe9"),
    (b"vari\xe1ble,category,population\n", "line 1: byte 0xe1"),
])
def test_margins_text_names_the_line_and_column_of_a_byte_not_utf8(data: bytes,
                                                                   expected: str) -> None:
    with pytest.raises(MarginsError, match=re.escape(expected)):
        margins_text(data)


def test_margins_text_drops_a_spreadsheet_bom() -> None:
    shipped = resources.files("gateway.indicator").joinpath("data/ghana_margins.csv")
    data = shipped.read_bytes()
    assert read_margins(margins_text(b"\xef\xbb\xbf" + data)).rows == shipped_margins().rows
