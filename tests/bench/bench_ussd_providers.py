"""The USSD hop per provider: `python tests/bench/bench_ussd_providers.py` (see README.md).

Africa's Talking's hop and Hubtel's hop on the same gunicorn server, under the same load
(loadgen.py's citizens; hubtel_loadgen.py sends them in Hubtel's JSON shape), then the bare
Flask endpoint (bare_app.py) in both shapes with the same settings, replaying the recorded
interviews. With --rounds N the two providers alternate which goes first. After each real
run its events are drained into SQL and the answer rows checked (exact). Nothing is
asserted; the exit status is non-zero only when setup fails.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from harness import (
    BENCH_DIR,
    BUSY_CORES,
    CPU_LEGEND,
    Backends,
    BaseRun,
    SetupError,
    Where,
    add_citizen_options,
    add_run_options,
    attempter,
    bench_env,
    bench_parser,
    choose_backends,
    clear_redis,
    connect,
    fmt,
    gunicorn,
    header,
    hop_header,
    hop_row,
    key_prefix,
    redis_pid,
    run_bench,
    run_loadgen,
    say,
    server_log_summary,
    statuses,
    stream_events,
    table,
    timing_defaults,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway.coordination.bootstrap import bootstrap
from gateway.coordination.channels import channel_urls
from gateway.store.models import Answer, Campaign, Channel
from workers import persist

BENCH_DATABASE = "civicdial_ussdbench"  # created fresh on harness.DEFAULT_PG's server
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"
WHERE = Where(DEFAULT_REDIS, BENCH_DATABASE, from_env=True)
HUBTEL_CODE = "*713*20#"
PROVIDERS = ("africastalking", "hubtel")
SCRIPTS = {"africastalking": "loadgen.py", "hubtel": "hubtel_loadgen.py"}
WALK_PHONES = {"africastalking": 0, "hubtel": 3_000_000}
REPLAY_PHONES = {"africastalking": 6_000_000, "hubtel": 8_000_000}
ROUND_PHONES = 200_000  # each round's citizens get numbers of their own


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__, "target", WHERE)
    p.add_argument("--rounds", type=int, default=1,
                   help="real runs per provider, alternating which goes first")
    add_citizen_options(p)
    add_run_options(p)
    args = p.parse_args(argv)
    timing_defaults(args)
    args.rounds = max(1, args.rounds)
    return args


def setup(args: argparse.Namespace, tmp: Path, backends: Backends) -> tuple[BaseRun,
                                                                            dict[str, str]]:
    """The default campaign with its Africa's Talking channel, plus a Hubtel channel."""
    (tmp / "data").mkdir()
    try:
        choose_backends(args, tmp, backends, WHERE)
        prefix = key_prefix(backends, "cdussd")
        env = bench_env(backends, tmp / "data", prefix)
        settings, client, engine = connect(backends, env,
                                           lambda c: clear_redis(c, backends, prefix))
        at = bootstrap(engine)  # runs the migrations first
        with Session(engine) as db, db.begin():
            campaign = db.get(Campaign, at.campaign_id)
            assert campaign is not None
            hubtel = Channel(key=secrets.token_urlsafe(18), provider="hubtel", kind="ussd",
                             address=HUBTEL_CODE, campaign_id=campaign.id, config="{}")
            db.add(hubtel)
            db.flush()
            db.expunge(hubtel)
    except SetupError:
        raise
    except Exception as exc:  # noqa: BLE001 - any setup failure is reported plainly
        raise SetupError(f"{type(exc).__name__}: {exc}") from exc
    paths = {p: urlsplit(channel_urls(ch, "http://127.0.0.1")["ussd"]).path
             for p, ch in (("africastalking", at), ("hubtel", hubtel))}
    return BaseRun(args, tmp, env, settings, client, engine), paths


def config(args: argparse.Namespace, url: str, mode: str, **extra: Any) -> dict[str, Any]:
    return {"url": url, "mode": mode, "connections": args.connections, "warmup": args.warmup,
            "duration": args.duration, "seed": args.seed, "retry_rate": args.retry_rate,
            "drop_rate": args.drop_rate, "typo_rate": args.typo_rate} | extra


def drain_check(run: BaseRun) -> dict[str, Any]:
    """The run's events into SQL: is every answer there exactly once?"""
    pairs = {(e["i"], e["q"]) for e in stream_events(run.client, run.stream)
             if e.get("k") == "answer"}
    with run.engine.connect() as conn:
        before = conn.scalar(select(func.count()).select_from(Answer)) or 0
    start = time.perf_counter()
    persist.drain(run.client, run.engine, run.stream, batch=run.settings.stream_batch)
    seconds = time.perf_counter() - start
    with run.engine.connect() as conn:
        after = conn.scalar(select(func.count()).select_from(Answer)) or 0
    return {"expected": len(pairs), "rows": after - before, "seconds": seconds,
            "waiting": int(run.client.xlen(run.stream))}


def bench(run: BaseRun, paths: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    results: dict[str, Any] = {}
    notes: list[str] = []
    attempt = attempter(results, notes)
    args, tmp = run.args, run.tmp
    redis_server = redis_pid(run.client)
    with gunicorn("gateway.web.app:create_app()", args, run.env, tmp / "real.log") as (
            base, pid):
        watch = {"gunicorn": [pid], "redis": [redis_server]}
        for r in range(args.rounds):
            for provider in PROVIDERS if r % 2 == 0 else PROVIDERS[::-1]:
                say(f"round {r + 1}: {provider} hop, {args.warmup:g} s warm-up + "
                    f"{args.duration:g} s load")
                traces = {"traces_out": str(tmp / f"{provider}-traces.json")} if r == 0 else {}
                attempt(f"{provider}:{r}", lambda p=provider, t=traces, r=r: run_loadgen(
                    SCRIPTS[p], f"{p}-{r}", config(
                        args, base + paths[p], "walk",
                        phone_base=WALK_PHONES[p] + r * ROUND_PHONES, watch=watch,
                        # A round's own seed: its session ids must not be the last round's.
                        seed=args.seed + r, **t),
                    tmp, run.load_limit))
                attempt(f"{provider}:{r}:drain", lambda: drain_check(run))
    results["real_log"] = server_log_summary(tmp / "real.log")
    with gunicorn("bare_app:create_app()", args, run.env, tmp / "bare.log",
                  pythonpath=BENCH_DIR) as (base, pid):
        watch = {"gunicorn": [pid], "redis": [redis_server]}
        for provider in PROVIDERS:
            traces_in = tmp / f"{provider}-traces.json"
            if not traces_in.exists() or not json.loads(traces_in.read_text()):
                notes.append(f"no {provider} interview completed: its bare run is skipped")
                continue
            say(f"bare app, {provider} shape")
            attempt(f"bare:{provider}", lambda p=provider, t=traces_in: run_loadgen(
                SCRIPTS[p], f"bare-{p}", config(
                    args, base + paths[p], "replay", traces_in=str(t),
                    phone_base=REPLAY_PHONES[p], watch=watch), tmp, run.load_limit))
    results["bare_log"] = server_log_summary(tmp / "bare.log")
    return results, notes


def per_request_us(r: dict[str, Any] | None) -> float | None:
    """gunicorn CPU per request, in µs: steadier between runs than req/s."""
    if not r or not r.get("rps") or "gunicorn" not in r.get("cores", {}):
        return None
    return float(r["cores"]["gunicorn"]) / float(r["rps"]) * 1e6


def mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


def report(args: argparse.Namespace, backends: Backends, results: dict[str, Any],
           notes: list[str]) -> str:
    lines = [*header("CivicDial USSD hop per provider", args, backends), ""]
    rows = [hop_header("target") + ["gunicorn µs/req"]]
    runs: list[tuple[str, dict[str, Any] | None]] = []
    for r in range(args.rounds):
        for provider in PROVIDERS:
            runs.append((f"{provider} hop" + (f" #{r + 1}" if args.rounds > 1 else ""),
                         results.get(f"{provider}:{r}")))
    for provider in PROVIDERS:
        runs.append((f"bare flask ({provider} shape)", results.get(f"bare:{provider}")))
    for label, r in runs:
        rows.append(hop_row(label, r) + [fmt(per_request_us(r))])
    lines += [table(rows), CPU_LEGEND, ""]

    def rps(key: str) -> float | None:
        r = results.get(key)
        return float(r["rps"]) if r else None

    at = mean([rps(f"africastalking:{r}") for r in range(args.rounds)])
    hub = mean([rps(f"hubtel:{r}") for r in range(args.rounds)])
    at_us = mean([per_request_us(results.get(f"africastalking:{r}"))
                  for r in range(args.rounds)])
    hub_us = mean([per_request_us(results.get(f"hubtel:{r}")) for r in range(args.rounds)])
    bare_at, bare_hub = rps("bare:africastalking"), rps("bare:hubtel")

    def ratio(a: float | None, b: float | None) -> str:
        return fmt(a / b, ".2f") + "x" if a and b else "n/a"

    lines += [
        f"hubtel / africastalking: throughput {ratio(hub, at)}, gunicorn CPU per request "
        f"{ratio(hub_us, at_us)} (means over {args.rounds} round(s))",
        f"africastalking / bare (its shape): {ratio(at, bare_at)}; "
        f"hubtel / bare (its shape): {ratio(hub, bare_hub)}",
        "",
    ]
    for key in sorted(k for k in results if k.endswith(":drain")):
        d = results[key]
        same = d["rows"] == d["expected"]
        lines.append(f"{key.rsplit(':', 1)[0]}: answers in SQL {d['rows']:,}, expected "
                     f"{d['expected']:,} ({'exact' if same else 'MISMATCH'}), drained in "
                     f"{d['seconds']:.1f} s, left in stream {d['waiting']:,}")
    for label, r in runs:
        if r is None:
            continue
        lines.append(f"{label}: HTTP statuses {statuses(r)}; "
                     + ", ".join(f"{k} {v:,}" for k, v in sorted(r["events"].items())))
        for sample in r["error_samples"][:3]:
            lines.append(f"{label}:   error sample {sample}")
        other = r.get("cores", {}).get("other", 0.0)
        if other > BUSY_CORES:
            lines.append(f"note: during '{label}' other processes used {other:.2f} cores: "
                         "not a clean window, run again on a quiet machine")
    lines.append(f"server logs: real {results.get('real_log')}; bare {results.get('bare_log')}")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run_all(tmp: Path, backends: Backends) -> str:
        run, paths = setup(args, tmp, backends)
        results, notes = bench(run, paths)
        return report(args, backends, results, notes)

    return run_bench("civicdial-ussd-bench-", run_all)


if __name__ == "__main__":
    sys.exit(main())
