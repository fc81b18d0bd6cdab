"""Tally benchmark: `python tests/bench/bench_tally.py` from the repo root (see README.md).

Loads 1,000,000 answers (about 40,000 interviews, 16 regions, partial interviews too) into
a PostgreSQL database of its own, `civicdial_tallybench` (dropped and created), then times
in the same run: a bare `SELECT count(*) FROM answers`, the SQL aggregation alone, the
statistics alone, and the full tally (aggregation, raking, CIs, bootstrap, suppression,
snapshot). Nothing is asserted; the goal (full tally <= 3 s) is printed with PASS/MISS.

`--coverage N` instead runs the heavy version of the simulation test: N biased samples
(over-urban, over-male) from a synthetic population whose satisfaction differs by region and
sex, with attribute answers correlated within a person; it reports how often the bootstrap
CI of the attribute index and the Wilson CI of 'satisfied' cover the truth.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.coordination.bootstrap import bootstrap, shipped_questionnaire  # noqa: E402
from gateway.indicator.estimates import AREAS, Params, Patterns, choice_name, estimate  # noqa: E402
from gateway.indicator.tally import default_margins, fetch_patterns, run_tally  # noqa: E402

SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DATABASE = "civicdial_tallybench"
GOAL_SECONDS = 3.0
REGIONS = ["greater_accra", "ashanti", "eastern", "central", "northern", "western", "volta",
           "upper_east", "bono", "bono_east", "upper_west", "western_north", "oti",
           "north_east", "savannah", "ahafo"]
AGES = ["18_24", "25_34", "35_44", "45_54", "55_64", "65p"]
WG = ["wg_see", "wg_hear", "wg_walk", "wg_mem", "wg_care", "wg_comm"]


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def fresh_database(server: str) -> str:
    url = make_url(server)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{DATABASE}"'))
    admin.dispose()
    return url.set(database=DATABASE).render_as_string(hide_password=False)


def interviews(rng: random.Random, target_answers: int):  # type: ignore[no-untyped-def]
    """(id, respondent, status, answers) until target_answers answers; satisfaction
    depends on region and sex, the sample leans urban and male like a phone sample."""
    k = produced = 0
    while produced < target_answers:
        k += 1
        region = rng.choices(REGIONS, weights=[16 - i for i in range(16)])[0]
        sex = rng.choices(["male", "female", "refuse"], [55, 43, 2])[0]
        lean = (REGIONS.index(region) - 8) / 20 + (0.1 if sex == "female" else 0)
        answers = [("sex", sex), ("age", rng.choice(AGES)), ("region", region),
                   ("urban", rng.choices(["urban", "rural", "dk"], [70, 28, 2])[0]),
                   ("income", rng.choice(["comfortable", "coping", "difficult",
                                          "very_difficult", "refuse"]))]
        answers += [(q, rng.choices(["none", "some", "alot", "cannot", "refuse"],
                                    [80, 12, 4, 2, 2])[0]) for q in WG]
        for area, (_label, attrs, overall) in AREAS.items():
            used = rng.random() < 0.4
            answers.append((f"{area[0]}_used", "yes" if used else "no"))
            if used:
                p = min(max(0.55 + lean, 0.05), 0.95)
                answers += [(q, rng.choices(["sa", "a", "d", "sd", "dk"],
                                            [p / 2, p / 2, (1 - p) / 2, (1 - p) / 2, 0.05])[0])
                            for q in attrs]
                answers.append((overall, rng.choices(["vs", "s", "d", "vd", "dk"],
                                                     [p / 2, p / 2, (1 - p) / 2, (1 - p) / 2,
                                                      0.05])[0]))
        answers.append(("improve", "Shorter queues"))
        status = "completed"
        if rng.random() < 0.12:  # partial: stopped somewhere
            answers = answers[:rng.randrange(1, len(answers))]
            status = rng.choice(["started", "abandoned"])
        answers = answers[:target_answers - produced]
        produced += len(answers)
        yield f"bench-{k}", f"r{k:08d}", status, answers


def load(url: str, campaign_id: int, channel_id: int, n_answers: int, seed: int) -> int:
    version = shipped_questionnaire().version
    now = datetime.now(UTC)
    rng = random.Random(seed)
    n_interviews = 0
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as conn, conn.cursor() as cur:
        with cur.copy("COPY answers (interview_id, campaign_id, respondent, "
                      "questionnaire_version, question, value, seq, event_id, answered_at) "
                      "FROM STDIN") as answers_copy:
            rows = []
            for iid, resp, status, answers in interviews(rng, n_answers):
                n_interviews += 1
                rows.append((iid, campaign_id, channel_id, resp, version, "English (en)",
                             status, now, now if status == "completed" else None,
                             len(answers) + 2))
                for seq, (q, v) in enumerate(answers, start=2):
                    answers_copy.write_row((iid, campaign_id, resp, version, q, v, seq,
                                            f"{iid}-{seq}", now))
        with cur.copy("COPY interviews (id, campaign_id, channel_id, respondent, "
                      "questionnaire_version, lang, status, started_at, completed_at, "
                      "last_seq) FROM STDIN") as interviews_copy:
            for row in rows:
                interviews_copy.write_row(row)
        conn.commit()
        cur.execute("ANALYZE answers")
        cur.execute("ANALYZE interviews")
        conn.commit()
    return n_interviews


def timed(fn, repeat: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def coverage(reps: int, n: int, replicates: int, seed: int) -> None:
    """Coverage of the index bootstrap CI and the satisfied Wilson CI over biased samples."""
    margins = default_margins()
    variables = ["region", "sex", "residence", "age"]
    cats = [[r.category for r in margins.categories(v)] for v in variables]
    shares = [np.array([r.population for r in margins.categories(v)]) for v in variables]
    shares = [s / s.sum() for s in shares]
    grid = np.array(np.meshgrid(*[np.arange(len(c)) for c in cats],
                                indexing="ij")).reshape(4, -1)
    pop = np.prod([shares[i][grid[i]] for i in range(4)], axis=0)
    male, urban = grid[1] == 0, grid[2] == 0
    logit = (np.linspace(-1, 1, len(cats[0]))[grid[0]] + np.where(male, -0.5, 0.3)
             + np.where(urban, -0.3, 0))
    offsets = np.array([-0.4, 0.0, 0.3, -0.2, 0.5])
    p_attr = 1 / (1 + np.exp(-(logit[:, None] + offsets[None, :])))
    p_sat = 1 / (1 + np.exp(-logit))
    truth_index = float((pop[:, None] * p_attr).sum(axis=0).mean())
    truth_sat = float((pop * p_sat).sum())
    select = pop * np.where(urban, 2.5, 1) * np.where(male, 2, 1)
    select /= select.sum()
    rng = np.random.default_rng(seed)
    attrs = AREAS["health"][1]
    normal_cdf = np.vectorize(lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2))))
    covered_index = covered_sat = 0
    errors, widths = [], []
    t0 = time.perf_counter()
    for _ in range(reps):
        cell = rng.choice(len(pop), size=n, p=select)
        person = rng.normal(size=n)  # answers of one person go together
        profile = {"region": [choice_name(cats[0][grid[0][c]]) for c in cell],
                   "sex": ["male" if male[c] else "female" for c in cell],
                   "urban": ["urban" if urban[c] else "rural" for c in cell],
                   "age": [choice_name(cats[3][grid[3][c]]) for c in cell],
                   "income": ["coping"] * n, "disability": ["no"] * n}
        answers: dict[str, list[str | None]] = {}
        for j, q in enumerate(attrs):
            u = normal_cdf(0.7 * person + math.sqrt(1 - 0.49) * rng.normal(size=n))
            answers[q] = ["a" if u[k] < p_attr[cell[k], j] else "d" for k in range(n)]
        answers["h_sat"] = ["s" if rng.random() < p_sat[c] else "d" for c in cell]
        sample = Patterns(np.ones(n, dtype=np.int64), np.ones(n, dtype=bool), profile, answers)
        tally = estimate(sample, margins, Params(replicates=replicates,
                                                 seed=int(rng.integers(1 << 30))))
        index, sat = tally.cell("health", "index"), tally.cell("health", "satisfied")
        assert index.ci_low is not None and index.ci_high is not None and index.estimate
        assert sat.ci_low is not None and sat.ci_high is not None
        covered_index += index.ci_low <= truth_index <= index.ci_high
        covered_sat += sat.ci_low <= truth_sat <= sat.ci_high
        errors.append(index.estimate - truth_index)
        widths.append(index.ci_high - index.ci_low)
    print(f"samples {reps} of n={n}, {replicates} bootstrap replicates, "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"attribute index: coverage {covered_index / reps:.3f}, bias {np.mean(errors):+.4f}, "
          f"rmse {math.sqrt(np.mean(np.square(errors))):.4f}, mean CI width "
          f"{np.mean(widths):.4f}")
    print(f"satisfied (Wilson, Kish n_eff): coverage {covered_sat / reps:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default=SERVER, help="PostgreSQL server URL (any database)")
    ap.add_argument("--answers", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--replicates", type=int, default=Params.replicates,
                    help="bootstrap replicates for the attribute index")
    ap.add_argument("--seed", type=int, default=1662)
    ap.add_argument("--coverage", type=int, default=0, metavar="N",
                    help="run the CI coverage simulation with N samples instead")
    ap.add_argument("--sample-size", type=int, default=1500, help="for --coverage")
    args = ap.parse_args(argv)
    if args.coverage:
        coverage(args.coverage, args.sample_size, args.replicates, args.seed)
        return 0

    url = fresh_database(args.server)
    engine = create_engine(url)
    say(f"database {make_url(url).render_as_string(hide_password=True)} (fresh)")
    channel = bootstrap(engine)
    t0 = time.perf_counter()
    n_interviews = load(url, channel.campaign_id, channel.id, args.answers, args.seed)
    say(f"loaded {args.answers:,} answers, {n_interviews:,} interviews in "
        f"{time.perf_counter() - t0:.1f} s")
    margins = default_margins()
    params = Params(replicates=args.replicates)

    def count() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT count(*) FROM answers")).scalar_one()

    patterns = fetch_patterns(engine, channel.campaign_id)
    rows: list[tuple[str, float, float]] = []
    rows.append(("SELECT count(*) FROM answers", *timed(count, args.repeat)))
    rows.append(("SQL aggregation (2 GROUP BYs + fetch)",
                 *timed(lambda: fetch_patterns(engine, channel.campaign_id), args.repeat)))
    rows.append((f"statistics (raking, CIs, {args.replicates} bootstrap reps, suppression)",
                 *timed(lambda: estimate(patterns, margins, params), args.repeat)))
    rows.append(("full tally incl. snapshot",
                 *timed(lambda: run_tally(engine, channel.campaign_id, margins, params),
                        args.repeat)))
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM answers")).scalar_one()
        snaps = conn.execute(text("SELECT count(*) FROM tally_snapshots")).scalar_one()
    print(f"answers {stored:,}, interviews {n_interviews:,}, distinct patterns "
          f"{patterns.size:,}, snapshots written {snaps}")
    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  {'best s':>8}  {'median s':>8}")
    for name, best, median in rows:
        print(f"{name:<{width}}  {best:>8.3f}  {median:>8.3f}")
    full = rows[-1][2]
    ratio = full / rows[0][2] if rows[0][2] else float("nan")
    print(f"full tally / count(*) = {ratio:.1f}x")
    print(f"goal: full tally <= {GOAL_SECONDS:.0f} s: {full:.2f} s "
          f"{'PASS' if full <= GOAL_SECONDS else 'MISS'}")
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
