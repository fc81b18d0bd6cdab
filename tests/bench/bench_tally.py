"""Tally benchmark: `python tests/bench/bench_tally.py` from the repo root (see README.md).

Loads 1,000,000 answers (about 40,000 interviews, 16 regions, partial interviews too) into
a PostgreSQL database of its own, `civicdial_tallybench` (dropped and created), then times
in the same run: a bare `SELECT count(*) FROM answers`, the SQL aggregation alone, the
statistics alone, and the full tally (aggregation, raking, CIs, bootstrap, suppression,
snapshot). Nothing is asserted; the goal (full tally <= 3 s) is printed with PASS/MISS.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.cli import bootstrap, shipped_questionnaire  # noqa: E402
from gateway.indicator import AREAS, Params, estimate  # noqa: E402
from gateway.tally import default_margins, fetch_patterns, run_tally  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default=SERVER, help="PostgreSQL server URL (any database)")
    ap.add_argument("--answers", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--replicates", type=int, default=Params.replicates,
                    help="bootstrap replicates for the attribute index")
    ap.add_argument("--seed", type=int, default=1662)
    args = ap.parse_args(argv)

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
