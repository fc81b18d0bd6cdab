"""The tally over the real database (SQLite or PostgreSQL, as the env selects): SQL
aggregation against a Python reference, snapshots, the CLI, publishing and the RQ job."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from rq import Queue
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from gateway.cli import main
from gateway.config import Settings, load_settings
from gateway.coordination.bootstrap import bootstrap, shipped_questionnaire
from gateway.indicator.estimates import AREAS, Params, disability_status
from gateway.indicator.tally import (
    NOT_STATED,
    OUTCOMES,
    PROFILE,
    fetch_patterns,
    publish,
    reproduce,
    run_tally,
    summary_texts,
)
from gateway.interview.segments import count_segments
from gateway.store.crypto import NumberBox
from gateway.store.db import make_engine
from gateway.store.models import Channel, FeedbackSubscriber, OutboundMessage, TallySnapshot
from gateway.store.outbox import BULK_QUEUE
from workers.persist import write_events

REGIONS = ["greater_accra", "ashanti", "eastern", "central", "northern", "western", "volta",
           "upper_east", "bono", "bono_east", "upper_west", "western_north", "oti",
           "north_east", "savannah", "ahafo"]
AGES = ["18_24", "25_34", "35_44", "45_54", "55_64", "65p"]
WG = ["wg_see", "wg_hear", "wg_walk", "wg_mem", "wg_care", "wg_comm"]


def synth_interview(rng: random.Random) -> dict[str, Any]:
    """One respondent's answers in questionnaire order, and how the interview ended."""
    answers: list[tuple[str, str]] = [
        ("sex", rng.choice(["female", "male", "male", "refuse"])),
        ("age", rng.choice(AGES + ["u18"] if rng.random() < 0.05 else AGES)),
    ]
    if answers[1][1] != "u18":
        answers += [("region", rng.choice(REGIONS[:3] + ["refuse"])),
                    ("urban", rng.choice(["urban", "rural", "dk"])),
                    ("income", rng.choice(["comfortable", "coping", "difficult", "refuse"]))]
        answers += [(q, rng.choice(["none", "none", "some", "alot", "cannot", "refuse"]))
                    for q in WG]
        for area, (_label, attrs, overall) in AREAS.items():
            used = rng.random() < 0.6
            answers.append((f"{area[0]}_used", "yes" if used else "no"))
            if used:
                answers += [(q, rng.choice(["sa", "a", "a", "d", "sd", "dk"])) for q in attrs]
                answers.append((overall, rng.choice(["vs", "s", "s", "d", "vd", "dk"])))
        answers.append(("improve", "Shorter queues"))
    status = rng.choices(["completed", "started", "abandoned", "withdrawn", "declined"],
                         [70, 10, 10, 5, 5])[0]
    if status in ("started", "abandoned"):
        answers = answers[:rng.randrange(0, len(answers))]
    if status == "declined":
        answers = []
    return {"status": status, "answers": answers}


def events_for(iid: str, respondent: str, campaign: int, channel: int, version: str,
               spec: dict[str, Any]) -> list[dict[str, Any]]:
    base = {"c": campaign, "ch": channel, "i": iid, "ver": version}
    if spec["status"] == "declined":
        return [{**base, "id": f"{iid}-1", "k": "declined", "r": None, "t": 1000.0}]
    out = [{**base, "id": f"{iid}-1", "k": "started", "r": respondent, "t": 1000.0,
            "l": "English (en)"}]
    for n, (q, v) in enumerate(spec["answers"], start=2):
        out.append({**base, "id": f"{iid}-{n}", "k": "answer", "r": respondent,
                    "t": 1000.0 + n, "q": q, "v": v})
    end = len(spec["answers"]) + 2
    if spec["status"] != "started":
        out.append({**base, "id": f"{iid}-{end}", "k": spec["status"],
                    "r": None if spec["status"] == "withdrawn" else respondent,
                    "t": 2000.0})
    return out


def load(engine: Engine, channel: Channel, n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    version = shipped_questionnaire().version
    specs, events = [], []
    for k in range(n):
        spec = synth_interview(rng)
        spec["id"], spec["respondent"] = f"iv{seed}-{k}", f"resp{seed}-{k}"
        specs.append(spec)
        events += events_for(spec["id"], spec["respondent"], channel.campaign_id, channel.id,
                             version, spec)
    write_events(engine, events)
    return specs


def reference(specs: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    """The pattern counts computed in Python from what was sent, for comparison."""
    counts: Counter[tuple[Any, ...]] = Counter()
    for spec in specs:
        if spec["status"] in ("declined", "withdrawn") or not spec["answers"]:
            continue
        a = dict(spec["answers"])
        if a.get("age") == "u18":
            continue
        prof = tuple(None if a.get(v) in NOT_STATED else a.get(v) for v in PROFILE)
        dis = disability_status([a.get(q) for q in WG if q in a])
        counts[(*prof, None if dis == "unknown" else dis,
                spec["status"] == "completed", *[a.get(q) for q in OUTCOMES])] += 1
    return counts


def from_patterns(engine: Engine, campaign: int) -> Counter[tuple[Any, ...]]:
    p = fetch_patterns(engine, campaign)
    counts: Counter[tuple[Any, ...]] = Counter()
    for k in range(p.size):
        key = (*[p.profile[v][k] for v in (*PROFILE, "disability")], bool(p.completed[k]),
               *[p.answers[q][k] for q in OUTCOMES])
        counts[key] += int(p.count[k])
    return counts


def _at(events: list[dict[str, Any]], completed_at: float) -> list[dict[str, Any]]:
    return [{**e, "t": completed_at} if e["k"] == "completed" else e for e in events]


def test_one_person_counts_once_across_nodes(engine: Engine, channel: Channel) -> None:
    """Someone who completes twice (once on an edge, once on central: the same pseudonym)
    counts once, by their first completion, whichever arrives first; their other
    interviews, finished or not, do not count; the quota fill counts them once too."""
    from gateway.coordination.quotas import counts
    from gateway.interview.quota import Quota

    rng = random.Random(7)
    version = shipped_questionnaire().version
    specs = load(engine, channel, 300, seed=3)
    done = [s for s in specs if s["status"] == "completed"
            and dict(s["answers"]).get("age") != "u18"][:30]
    assert len(done) == 30
    counted = list(specs)
    events: list[dict[str, Any]] = []
    for n, spec in enumerate(done):
        again = {"status": "completed", "answers": synth_interview(rng)["answers"]}
        while dict(again["answers"]).get("age") == "u18":
            again["answers"] = synth_interview(rng)["answers"]
        partial = {"status": "abandoned", "answers": spec["answers"][:4]}
        # Later than the first (2,000) for the first 20; earlier for the last 10: that one,
        # synced after, is the first completion and replaces the one stored before it.
        at = 3000.0 if n < 20 else 1500.0
        events += _at(events_for(f"again-{n}", spec["respondent"], channel.campaign_id,
                                 channel.id, version, again), at)
        events += events_for(f"partial-{n}", spec["respondent"], channel.campaign_id,
                             channel.id, version, partial)
        if n >= 20:
            counted[counted.index(spec)] = again
    write_events(engine, events)
    assert from_patterns(engine, channel.campaign_id) == reference(counted)
    quota = Quota(("sex",), {"female": 1000, "male": 1000, "refuse": 1000})
    fill = counts(engine, channel.campaign_id, quota)
    want = Counter(dict(s["answers"])["sex"] for s in counted
                   if s["status"] == "completed" and s["answers"])
    assert {cell: n for (cell, status), n in fill.items() if status == "completed"} == want


def test_sql_aggregation_matches_a_python_reference(engine: Engine, channel: Channel) -> None:
    """GROUP BY in SQL gives exactly the counts computed from the interviews in Python
    (partial interviews in, declined/withdrawn/under-18 out) — on either back-end."""
    specs = load(engine, channel, 400, seed=1)
    got = from_patterns(engine, channel.campaign_id)
    assert got == reference(specs)
    assert sum(got.values()) > 300
    assert any(not key[6] for key in got)  # partial interviews are there


def test_denominators_are_per_question(engine: Engine, channel: Channel) -> None:
    """n for health satisfaction counts every valid h_sat answer, partial interviews too,
    and n_dk its don't-knows."""
    specs = load(engine, channel, 300, seed=2)
    snap = run_tally(engine, channel.campaign_id, params=Params(replicates=20))
    cells = {(c["area"], c["measure"], c["breakdown"], c["group"]): c
             for c in json.loads(snap.result)["cells"]}
    kept = [dict(s["answers"]) for s in specs if s["status"] not in ("declined", "withdrawn")
            and dict(s["answers"]).get("age") != "u18"]
    valid = [a["h_sat"] for a in kept if a.get("h_sat") in ("vs", "s", "d", "vd")]
    dk = [a for a in kept if a.get("h_sat") == "dk"]
    total = cells[("health", "satisfied", "total", "_T")]
    assert (total["n"], total["n_dk"]) == (len(valid), len(dk))
    assert total["unweighted"] == pytest.approx(
        sum(v in ("vs", "s") for v in valid) / len(valid))
    assert snap.n_interviews == sum(1 for s in specs if s["status"] not in (
        "declined", "withdrawn") and s["answers"] and dict(s["answers"]).get("age") != "u18")
    assert snap.n_completed < snap.n_interviews


def test_snapshots_are_versioned_and_reproducible(engine: Engine, channel: Channel) -> None:
    """Two tallies of the same data: versions 1 and 2, identical results; a later answer
    makes the old snapshot no longer reproducible."""
    load(engine, channel, 250, seed=3)
    first = run_tally(engine, channel.campaign_id, params=Params(replicates=30))
    second = run_tally(engine, channel.campaign_id, params=Params(replicates=30))
    assert (first.version, second.version) == (1, 2)
    assert first.result == second.result
    assert first.margins_sha256 == second.margins_sha256
    assert first.questionnaire_versions == shipped_questionnaire().version
    assert reproduce(engine, first)
    load(engine, channel, 20, seed=4)
    assert not reproduce(engine, first)


def run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


def test_cli_tally_json_and_custom_margins(env: dict[str, str], engine: Engine,
                                          channel: Channel, tmp_path: Any) -> None:
    """`civicdial tally sdg1662 --json` stores a snapshot and prints its cells; --margins
    takes the coordinator's file."""
    load(engine, channel, 200, seed=5)
    code, out = run(env, "tally", "sdg1662", "--json", "--replicates", "20")
    assert code == 0, out
    report = json.loads(out)
    assert report["version"] == 1 and report["weighting"]["converged"] is True
    assert any("experimental citizen data" in note for note in report["notes"])
    assert any("age margins are approximate" in note for note in report["notes"])
    margins = tmp_path / "m.csv"
    margins.write_text("variable,category,population,status,source\n"
                       "sex,male,500,final,x\nsex,female,500,final,x\n")
    code, out = run(env, "tally", "sdg1662", "--json", "--replicates", "0",
                    "--margins", str(margins))
    assert code == 0, out
    second = json.loads(out)
    assert second["version"] == 2 and second["weighting"]["variables"] == ["sex"]
    code, out = run(env, "tally", "nope")
    assert code != 0 and "no campaign" in out


def test_publish_writes_results_and_queues_subscribers(
        settings: Settings, engine: Engine, redis_client: redis.Redis,
        channel: Channel) -> None:
    """publish: snapshot marked, per-region and national texts in Redis (one GSM-7 SMS,
    published cells only), one queued results SMS per subscriber, not twice."""
    specs = load(engine, channel, 600, seed=6)
    snap = run_tally(engine, channel.campaign_id, params=Params(replicates=0))
    box = NumberBox(settings.encryption_key)
    subscribers = [s for s in specs if s["status"] == "completed"][:3]
    with Session(engine) as db, db.begin():
        sms = Channel(key="k-sms", provider="africastalking", kind="sms", address="1662",
                      campaign_id=channel.campaign_id, config="{}")
        db.add(sms)
        db.flush()
        for s in subscribers:
            db.execute(insert(FeedbackSubscriber).values(
                campaign_id=channel.campaign_id, respondent=s["respondent"],
                channel_id=sms.id, recipient=box.seal("+233241234567"),
                created_at=snap.created_at))
    done = publish(settings, engine, redis_client, channel.campaign_id)
    assert done.queued == 3
    with Session(engine) as db:
        assert db.get(TallySnapshot, snap.id).published_at is not None  # type: ignore[union-attr]
        rows = db.scalars(select(OutboundMessage)).all()
    assert {r.kind for r in rows} == {"results"} and len(rows) == 3
    assert {r.key for r in rows} == {f"results:{snap.id}:{s['respondent']}"
                                     for s in subscribers}
    assert all(box.open(r.recipient) == "+233241234567" for r in rows)
    assert Queue(BULK_QUEUE, connection=redis_client).count == 3
    stored = {k.decode(): v.decode() for k, v in redis_client.hgetall(
        f"{settings.redis_prefix}results:{channel.campaign_id}").items()}
    assert "en:_national" in stored and "tw:_national" in stored
    assert stored["en:ashanti"].startswith("Health care, Ashanti: ")
    for text in stored.values():
        seg = count_segments(text)
        assert seg.encoding == "GSM-7" and seg.units <= 160, text
    cells = json.loads(snap.result)["cells"]
    national = next(c for c in cells if (c["area"], c["measure"], c["breakdown"]) ==
                    ("health", "satisfied", "total"))
    assert f"Ghana: {round(national['estimate'] * 100)}%" in stored["en:ashanti"]
    # Publishing again sends nothing new.
    again = publish(settings, engine, redis_client, channel.campaign_id)
    assert again.queued == 3
    with Session(engine) as db:
        assert len(db.scalars(select(OutboundMessage)).all()) == 3


def test_summary_uses_published_cells_only() -> None:
    """A suppressed region gets no text of its own (RESULTS falls back to the nation)."""
    def cell(area: str, breakdown: str, group: str, est: float | None, status: str,
             n: int) -> dict[str, Any]:
        return {"area": area, "measure": "satisfied", "breakdown": breakdown, "group": group,
                "estimate": est, "status": status, "n": n}

    cells = [cell("health", "total", "_T", 0.58, "published", 900),
             cell("health", "region", "ashanti", 0.62, "published", 412),
             cell("health", "region", "oti", None, "suppressed", 6),
             cell("govt", "total", "_T", None, "suppressed", 8)]
    texts = summary_texts(cells, {"ashanti": "Ashanti", "oti": "Oti"})
    assert texts["en:ashanti"] == "Health care, Ashanti: 62% satisfied (n=412). Ghana: 58%."
    assert "en:oti" not in texts
    assert texts["en:_national"] == "Ghana, % satisfied: Health care 58%."
    assert "ID" not in texts["en:_national"]


def test_tally_job(env: dict[str, str], engine: Engine, channel: Channel,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The RQ job function tallies into a new snapshot (run in-process, as SimpleWorker does)."""
    from workers.tally_job import tally_job

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    load(engine, channel, 120, seed=7)
    out = tally_job(channel.campaign_id, None, {"replicates": 10})
    assert out["version"] == 1 and out["n_interviews"] > 0


def test_same_numbers_as_sqlite(engine: Engine, channel: Channel, tmp_path: Any) -> None:
    """The fixture's back-end (PostgreSQL when DATABASE_URL says so) and a fresh SQLite file
    given the same interviews produce byte-identical tally results."""
    load(engine, channel, 300, seed=12)
    other = make_engine(load_settings({"CIVICDIAL_DATA_DIR": str(tmp_path / "lite"),
                                       "CIVICDIAL_PSEUDONYM_KEY": "k"}))
    lite_channel = bootstrap(other)
    load(other, lite_channel, 300, seed=12)
    params = Params(replicates=50)
    here = run_tally(engine, channel.campaign_id, params=params)
    there = run_tally(other, lite_channel.campaign_id, params=params)
    other.dispose()
    assert here.n_interviews == there.n_interviews
    assert here.result == there.result


def test_cli_tally_in_the_background(env: dict[str, str], engine: Engine, channel: Channel,
                                     redis_client: redis.Redis,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`tally --background` enqueues the RQ job; a worker running it stores the snapshot."""
    from workers.jobs import QUEUE

    load(engine, channel, 150, seed=13)
    code, out = run(env, "tally", "sdg1662", "--background", "--json", "--replicates", "10")
    assert code == 0, out
    queue = Queue(QUEUE, connection=redis_client)
    (job,) = queue.jobs
    assert job.id == json.loads(out)["job_id"]
    assert job.func_name == "workers.tally_job.tally_job"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = job.perform()
    assert result["version"] == 1
    with Session(engine) as db:
        snap = db.scalars(select(TallySnapshot)).one()
    assert json.loads(snap.params)["replicates"] == 10


def test_cli_tally_table(env: dict[str, str], engine: Engine, channel: Channel) -> None:
    """The plain `tally` output: the label, the weighting line and one row per total cell."""
    load(engine, channel, 200, seed=14)
    code, out = run(env, "tally", "sdg1662", "--replicates", "10")
    assert code == 0, out
    lines = out.splitlines()
    assert "Experimental citizen data" in lines[0]
    assert "converged=True" in lines[1] and "max weight/mean=" in lines[1]
    rows = [line for line in lines if line.startswith(("health ", "govt "))]
    assert len(rows) == 14  # 5 attributes + satisfied + index, two areas
    assert any(line.startswith("note: age margins are approximate") for line in lines)


TALLY_SCRIPT = """
import json, sys
from gateway.config import load_settings
from gateway.indicator.estimates import Params
from gateway.indicator.tally import _clean, compute, default_margins
from gateway.store.db import make_engine
params = Params(min_n=int(sys.argv[2]), min_neff=float(sys.argv[3]), flag_neff=0.0,
                replicates=10)
tally = compute(make_engine(load_settings()), int(sys.argv[1]), default_margins(), params)
print(json.dumps(_clean(tally.as_dict()), sort_keys=True))
"""


def test_same_data_same_snapshot_in_every_process(engine: Engine, channel: Channel,
                                                   env: dict[str, str]) -> None:
    """Secondary suppression (and everything else in a tally) does not depend on the
    process's hash seed: processes with different PYTHONHASHSEED give identical results.
    (Thresholds off and a small sample: many hidden cells whose relations overlap, so the
    order relations are visited in decides which cells hide.)"""
    load(engine, channel, 120, seed=2)
    outputs = set()
    for hash_seed in ("1", "4", "7", "12"):
        done = subprocess.run(
            [sys.executable, "-c", TALLY_SCRIPT, str(channel.campaign_id), "0", "0"],
            env={**os.environ, **env, "PYTHONHASHSEED": hash_seed},
            capture_output=True, text=True, timeout=300, check=True)
        outputs.add(done.stdout)
    assert len(outputs) == 1
    cells = json.loads(outputs.pop())["cells"]
    assert sum(c["status"] == "suppressed_secondary" for c in cells) > 10
