"""Tests that pin what planted one-line bugs once slipped past: the CI through estimate()
with unequal weights, the suppression boundaries, the STOP gate."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import Engine
from test_sms import SmsChannels, fake, sms, tw_sms, twiml_text  # noqa: F401 - fixtures

from gateway.indicator.estimates import (
    Cell,
    Margins,
    Params,
    Patterns,
    estimate,
    read_margins,
    suppress,
    wilson,
)

MARGINS = read_margins(resources.files("gateway.indicator").joinpath(
    "data/ghana_margins.csv").read_text())
VARIABLES = ("region", "sex", "residence", "age")


def population(margins: Margins) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """Every region x sex x residence x age cell: its categories, population share and the
    true probability of 'satisfied' there (which differs by region, sex and residence)."""
    cats = [[r.category for r in margins.categories(v)] for v in VARIABLES]
    shares = [np.array([r.population for r in margins.categories(v)], dtype=float)
              for v in VARIABLES]
    shares = [s / s.sum() for s in shares]
    grid = np.array(np.meshgrid(*[np.arange(len(c)) for c in cats], indexing="ij")).reshape(
        4, -1)
    pop = np.prod([shares[i][grid[i]] for i in range(4)], axis=0)
    region_effect = np.linspace(-1.2, 1.2, len(cats[0]))
    male, urban = grid[1] == 0, grid[2] == 0
    logit = -0.2 + region_effect[grid[0]] + np.where(male, -0.6, 0.4) + np.where(urban, -0.4, 0)
    labels = [[cats[i][grid[i][k]] for i in range(4)] for k in range(grid.shape[1])]
    return labels, pop, 1 / (1 + np.exp(-logit))


def sample_patterns(labels: list[list[str]], counts: np.ndarray, yes: np.ndarray) -> Patterns:
    """Interview patterns as SQL would hand them to estimate(): one per cell and answer."""
    from gateway.indicator.estimates import choice_name

    rows: list[tuple[list[str], str, int]] = []
    for k, cell in enumerate(labels):
        if yes[k]:
            rows.append((cell, "s", int(yes[k])))
        if counts[k] - yes[k]:
            rows.append((cell, "d", int(counts[k] - yes[k])))
    n = len(rows)
    return Patterns(
        count=np.array([c for _, _, c in rows], dtype=np.int64),
        completed=np.ones(n, dtype=bool),
        profile={"region": [choice_name(c[0]) for c, _, _ in rows],
                 "sex": [choice_name(c[1]) for c, _, _ in rows],
                 "urban": [choice_name(c[2]) for c, _, _ in rows],
                 "age": [choice_name(c[3]) for c, _, _ in rows],
                 "income": ["coping"] * n, "disability": ["no"] * n},
        answers={"h_sat": [v for _, v, _ in rows]},
    )


def test_estimate_ci_uses_kish_neff_with_unequal_weights() -> None:
    """A biased sample gets unequal raked weights: the published CI is Wilson at Kish's
    effective n (smaller than n), and covers the truth in >= 93% of samples."""
    labels, pop, p_cell = population(MARGINS)
    truth = float((pop * p_cell).sum())
    urban = np.array([c[2] == MARGINS.categories("residence")[0].category for c in labels])
    male = np.array([c[1] == MARGINS.categories("sex")[0].category for c in labels])
    select = pop * np.where(urban, 2.5, 1.0) * np.where(male, 2.0, 1.0)
    select /= select.sum()
    rng = np.random.default_rng(20261201)
    reps, n, covered = 120, 1500, 0
    for rep in range(reps):
        counts = rng.multinomial(n, select)
        yes = rng.binomial(counts, p_cell)
        tally = estimate(sample_patterns(labels, counts, yes), MARGINS, Params(replicates=0))
        cell = tally.cell("health", "satisfied")
        assert cell.n == n and cell.estimate is not None and cell.n_eff is not None
        if rep == 0:
            assert cell.n_eff < 0.95 * n  # the weights really are unequal
            assert (cell.ci_low, cell.ci_high) == pytest.approx(wilson(cell.estimate,
                                                                       cell.n_eff))
            assert cell.ci_high - cell.ci_low > (lambda lo, hi: hi - lo)(
                *wilson(cell.estimate, n)) * 1.02  # wider than raw n would give
        assert cell.ci_low is not None and cell.ci_high is not None
        covered += cell.ci_low <= truth <= cell.ci_high
    assert covered / reps >= 0.93


def _cell(n: int, n_eff: float) -> Cell:
    return Cell("health", "satisfied", "total", "_T", n, 0, 0.5, 0.5, 0.4, 0.6, n_eff, 1.0)


@pytest.mark.parametrize("n,n_eff,status", [
    (9, 200.0, "suppressed"),  # n below 10
    (10, 200.0, "published"),  # n at 10
    (60, 29.9, "suppressed"),  # effective n just below 30
    (60, 30.0, "flagged"),  # effective n at 30: published, flagged (< 50)
    (60, 49.9, "flagged"),
    (60, 50.0, "published"),
], ids=lambda v: str(v))
def test_suppression_boundaries(n: int, n_eff: float, status: str) -> None:
    """The thresholds sit exactly at n = 10 and n_eff = 30 (and the flag at 50)."""
    cell = _cell(n, n_eff)
    suppress([cell], Params())
    assert cell.status == status


def _sex_tally(female: int) -> Cell:
    base = {"region": "ashanti", "urban": "urban", "age": "25_34", "income": "coping",
            "disability": "no"}
    rows = [("female", "s", female - female // 2), ("female", "d", female // 2),
            ("male", "s", 300), ("male", "d", 300)]
    p = Patterns(count=np.array([c for *_, c in rows], dtype=np.int64),
                 completed=np.ones(len(rows), dtype=bool),
                 profile={**{k: [v] * len(rows) for k, v in base.items()},
                          "sex": [s for s, _, _ in rows]},
                 answers={"h_sat": [a for _, a, _ in rows]})
    tally = estimate(p, MARGINS, Params(replicates=0, min_neff=0, flag_neff=0))
    return tally.cell("health", "satisfied", "sex", "female")


@pytest.mark.parametrize("female,status", [(9, "suppressed"), (10, "published")])
def test_suppression_boundary_through_estimate(female: int, status: str) -> None:
    """Through estimate(): 9 answers in a group hide it, 10 publish it."""
    cell = _sex_tally(female)
    assert (cell.n, cell.status) == (female, status)


def test_a_message_after_stop_gets_an_empty_reply_and_changes_nothing(
        client: FlaskClient, sms: SmsChannels, redis_client: redis.Redis,  # noqa: F811
        engine: Engine) -> None:
    """The STOP gate: after STOP, Twilio's inline reply is empty and no state moves."""
    tw_sms(client, sms.tw, "SURVEY", "G0")
    tw_sms(client, sms.tw, "1", "G1")
    assert twiml_text(tw_sms(client, sms.tw, "STOP", "G2")[1]).startswith(
        "You will get no more messages")
    states = {k: redis_client.get(k) for k in redis_client.keys("cd:st:*")}
    waiting = redis_client.xlen("cd:events")
    for n, text in enumerate(["1", "HELP", "RESULTS", "LANG", "hello"]):
        code, body = tw_sms(client, sms.tw, text, f"G{3 + n}")
        assert code == 200
        assert twiml_text(body) == "", text
    assert {k: redis_client.get(k) for k in redis_client.keys("cd:st:*")} == states
    assert redis_client.xlen("cd:events") == waiting
