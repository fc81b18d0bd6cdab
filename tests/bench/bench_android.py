"""CivicDial Android inbound benchmark: `python tests/bench/bench_android.py` (README.md).

The SMS Gateway for Android webhook hop (`POST /webhooks/android/<key>/events`: signature
check over the raw body, envelope parse, two-key dedup, the SMS conversation, one Redis
commit, `OK`) under gunicorn with run.py's settings, beside the bare Flask endpoint of the
same shape (bare_app.py, a constant `OK`) under the same gunicorn and the same load, in one
run. sms_loadgen.py (its own process, asyncio + aiohttp) replays complete SMS interviews as
signed sms:received envelopes, fresh numbers and envelope ids; 1% are delivered twice at
once (the app retrying with the same envelope id).

Goals are printed with the measured values and PASS/MISS; nothing is asserted. The exit
status is non-zero only when setup fails.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import secrets
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    BENCH_DIR,
    BUSY_CORES,
    CPU_LEGEND,
    NO_PROXY,
    Backends,
    BaseRun,
    SetupError,
    Where,
    add_edge_options,
    add_run_options,
    apply_edge_profile,
    attempter,
    bench_env,
    bench_parser,
    choose_backends,
    connect,
    edge_goal_rows,
    flow,
    fmt,
    goal_rows,
    gunicorn,
    header,
    hop_header,
    hop_ratio,
    hop_row,
    redis_pid,
    run_bench,
    run_loadgen,
    say,
    server_log_summary,
    statuses,
    stream_events,
    table,
    timing_defaults,
    verdict,
)
from loadkit import CpuMark, cores_used
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.coordination.bootstrap import bootstrap
from gateway.coordination.channels import channel_urls
from gateway.store.models import Campaign, Channel

BENCH_DATABASE = "civicdial_androidbench"  # created fresh on the PostgreSQL server
DEFAULT_REDIS = "redis://127.0.0.1:6379/12"  # flushed before and after
WHERE = Where(DEFAULT_REDIS, BENCH_DATABASE)
SIGNING_KEY = "b3nchK3y"
SIM_NUMBER = "+233201112222"
REAL_PHONES = 0
BARE_PHONES = 6_000_000
# A complete English interview of the shipped form (the test suite's), as texted.
TRACE = ["SURVEY", "1", "1", "Female", "3", "2", "urban", "2", "1", "No difficulty", "1",
         "1", "1", "1", "yes", "agree", "1", "2", "3", "Strongly Agree.", "2", "2", "2", "2",
         "Clean water at the clinic", "no"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__, "both targets", WHERE)
    p.add_argument("--retry-rate", type=float, default=0.01,
                   help="share of messages the phone delivers twice at once (same id)")
    add_edge_options(p)
    add_run_options(p)
    args = p.parse_args(argv)
    apply_edge_profile(args, argv)
    timing_defaults(args)
    return args


@dataclass
class Run(BaseRun):
    channel: Channel


def setup(args: argparse.Namespace, tmp: Path, backends: Backends) -> Run:
    data_dir = tmp / "data"
    data_dir.mkdir()
    try:
        choose_backends(args, tmp, backends, WHERE)
        env = bench_env(backends, data_dir, "cd:",
                        CIVICDIAL_ENCRYPTION_KEY=secrets.token_hex(32))
        settings, client, engine = connect(backends, env, lambda client: client.flushdb())
        bootstrap(engine)
        with Session(engine) as db, db.begin():
            campaign = db.scalar(select(Campaign))
            if campaign is None:
                raise SetupError("bootstrap created no campaign")
            # No worker runs: the phone's URL is never called.
            ch = Channel(key=secrets.token_urlsafe(18), provider="android", kind="sms",
                         address=SIM_NUMBER, campaign_id=campaign.id, config=json.dumps({
                             "url": "http://127.0.0.1:9", "username": "sms",
                             "password": "bench", "signing_key": SIGNING_KEY,
                             "rate_per_hour": 0}))
            db.add(ch)
            db.flush()
            db.expunge(ch)
    except SetupError:
        raise
    except Exception as exc:  # noqa: BLE001 - any setup failure is reported plainly
        raise SetupError(f"{type(exc).__name__}: {exc}") from exc
    return Run(args, tmp, env, settings, client, engine, ch)


def load_config(run: Run, url: str, traces: Path, phone_base: int,
                watch: dict[str, list[int]]) -> dict[str, Any]:
    a = run.args
    return {"url": url, "mode": "replay", "shape": "android", "signing_key": SIGNING_KEY,
            "connections": a.connections, "warmup": a.warmup, "duration": a.duration,
            "seed": a.seed, "retry_rate": a.retry_rate, "typo_rate": 0.0,
            "traces_in": str(traces), "phone_base": phone_base, "watch": watch}


def warm(url: str) -> None:
    """A few first texts, so that every gunicorn worker has read the channels and parsed
    the questionnaire (seconds on a busy machine) before the load generator's warm-up."""
    for n in range(12):
        number = f"+23320999{n:04d}"
        body = json.dumps({"id": f"warm{n}", "webhookId": "w", "event": "sms:received",
                           "deviceId": "bench", "payload": {
                               "message": "SURVEY", "receivedAt": "2026-12-01T00:00:00.000Z",
                               "messageId": "0", "sender": number, "phoneNumber": number}},
                          separators=(",", ":")).encode()
        stamp = str(int(time.time()))
        sig = hmac.new(SIGNING_KEY.encode(), body + stamp.encode(), hashlib.sha256).hexdigest()
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "X-Timestamp": stamp, "X-Signature": sig})
        with NO_PROXY.open(request, timeout=60) as resp:
            if resp.status != 200:
                raise SetupError(f"warm-up text answered {resp.status}")


def hops(run: Run, results: dict[str, Any], attempt: Any) -> None:
    args = run.args
    traces = run.tmp / "android-traces.json"
    traces.write_text(json.dumps([TRACE]))
    path = channel_urls(run.channel, "")["events"]
    server = redis_pid(run.client)
    with gunicorn("gateway.web.app:create_app()", args, run.env, run.tmp / "real.log",
                  cpus=args.pin_server) as (base, pid):
        warm(base + path)
        say(f"real app up at {base}: {args.warmup:g} s warm-up + {args.duration:g} s load")
        attempt("real", lambda: run_loadgen("sms_loadgen.py", "real", load_config(
            run, base + path, traces, REAL_PHONES,
            {"gunicorn": [pid], "redis": [server]}), run.tmp, run.load_limit,
            args.pin_client))
    results["real_log"] = server_log_summary(run.tmp / "real.log")
    counts: Counter[str] = Counter(str(e.get("k")) for e in stream_events(run.client,
                                                                            run.stream))
    results["stream"] = dict(counts)
    with gunicorn("bare_app:create_app()", args, run.env, run.tmp / "bare.log",
                  pythonpath=BENCH_DIR, cpus=args.pin_server) as (base, pid):
        say(f"bare app up at {base}")
        attempt("bare", lambda: run_loadgen("sms_loadgen.py", "bare", load_config(
            run, base + path, traces, BARE_PHONES,
            {"gunicorn": [pid], "redis": [server]}), run.tmp, run.load_limit,
            args.pin_client))
    results["bare_log"] = server_log_summary(run.tmp / "bare.log")


def report(run: Run, backends: Backends, results: dict[str, Any]) -> str:
    args = run.args
    lines = header("CivicDial Android inbound benchmark (SMS Gateway for Android webhook)",
                   args, backends)
    lines.append(f"before    other processes used {results['idle_cores']:.2f} cores in the 2 s "
                 "before the first run")
    if args.pin_server:
        lines.append(f"pinned    servers to cores {args.pin_server}, the load generator to "
                     f"{args.pin_client or 'any'} (taskset -c)")
    real, bare = results.get("real"), results.get("bare")
    lines += ["", table([hop_header("target"), hop_row("android hop", real),
                         hop_row("bare flask", bare)]), CPU_LEGEND]
    ratio = hop_ratio(real, bare)
    lines.append(f"ratio real/bare: {fmt(ratio, '.2f')}x")
    for name, r in (("android hop", real), ("bare flask", bare)):
        if r:
            lines.append(f"{name}: statuses {statuses(r)}; {flow(r)}")
            if r["error_samples"]:
                lines.append(f"  errors, e.g. {r['error_samples'][:3]}")
    stream = results.get("stream", {})
    replayed = (real or {}).get("events", {}).get("conversations replayed", 0)
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(stream.items()))
    lines.append(f"stream after the real run: {kinds}")
    lines.append(f"server logs: real {results.get('real_log')}; bare {results.get('bare_log')}")
    lines.append("")
    rows = [["goal", "measured", "result"]]
    rows += goal_rows("android hop", ratio, real["p99_ms"] if real else None)
    if args.pin_server:
        rows += edge_goal_rows("edge android hop", args.pin_server, real)
    errors = real["errors"] if real else None
    rows.append(["android hop: no errors", fmt(errors, ",d"),
                 verdict(None if errors is None else errors == 0)])
    completed = stream.get("completed")
    rows.append(["each replayed interview completed once (completed / replayed)",
                 f"{fmt(completed, ',d')} / {replayed:,}",
                 verdict(None if completed is None or not real else completed == replayed)])
    lines.append(table(rows))
    for key in ("real", "bare"):
        other = (results.get(key) or {}).get("cores", {}).get("other", 0.0)
        if other > BUSY_CORES:
            lines.append(f"note: during the {key} window other processes used {other:.2f} "
                         "cores: its figures are not clean, run again on a quiet machine")
    for note in results["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run_all(tmp: Path, backends: Backends) -> str:
        run = setup(args, tmp, backends)
        results: dict[str, Any] = {"notes": []}
        attempt = attempter(results, results["notes"])
        before = CpuMark.take({})
        time.sleep(2.0)
        results["idle_cores"] = cores_used(before, CpuMark.take({})).get("other", 0.0)
        hops(run, results, attempt)
        return report(run, backends, results)

    return run_bench("civicdial-androidbench-", run_all)


if __name__ == "__main__":
    import sys

    sys.exit(main())
