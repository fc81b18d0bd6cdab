"""CivicDial SMS benchmark: `python tests/bench/bench_sms.py` from the repo root (README.md).

1. Inbound SMS hop under gunicorn (run.py's settings): the real app with a Twilio SMS channel
   (signed requests, inline TwiML replies) and an Africa's Talking SMS channel (replies by
   the queue), against bare Flask endpoints of the same shapes (bare_app.py), driven by
   sms_loadgen.py in its own process: req/s, p50, p99, errors, ratio.
2. Outbound queue: N message rows queued and enqueued (gateway.store.outbox.sweep), drained by
   1 and by 2 real `civicdial worker` processes against the fake provider HTTP server
   (fake_sms_provider.py, its own process): messages/s unthrottled and at a configured
   rate_per_second; no message sent twice, none lost.

Goals are printed with the measured values and PASS/MISS; nothing is asserted. The exit
status is non-zero only when setup fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import redis
from harness import (
    BENCH_DIR,
    BUSY_CORES,
    CPU_LEGEND,
    NO_PROXY,
    Backends,
    BaseRun,
    SetupError,
    Where,
    add_run_options,
    attempter,
    bench_env,
    bench_parser,
    choose_backends,
    connect,
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
    stop,
    stream_events,
    table,
    timing_defaults,
    verdict,
)
from loadkit import CpuMark, children, cores_used
from sqlalchemy import Engine, delete, func, insert, select, update
from sqlalchemy.orm import Session

from gateway.config import load_settings
from gateway.coordination.bootstrap import bootstrap
from gateway.coordination.channels import channel_urls
from gateway.store.crypto import NumberBox
from gateway.store.models import Campaign, Channel, OutboundMessage
from gateway.store.outbox import sweep

BENCH_DATABASE = "civicdial_smsbench"  # created fresh on DEFAULT_PG's server
DEFAULT_REDIS = "redis://127.0.0.1:6379/13"  # flushed before and after
WHERE = Where(DEFAULT_REDIS, BENCH_DATABASE)
TWILIO_TOKEN = "bench-twilio-auth-token"
TWILIO_SID = "AC" + "b" * 32
TWILIO_NUMBER = "+15005550006"
AT_SHORT_CODE = "1662"
INBOUND_PHONES = 0  # Twilio citizens; AT replays and the bare runs get numbers of their own
AT_PHONES = 3_000_000
BARE_PHONES = 6_000_000
OUTBOUND_PREFIX = "+23320"  # + 7 digits: one number per queued message
INVITATION = ("Ghana Statistical Service asks about your experience of public services. "
              "Reply SURVEY to take part (free). HELP for info, STOP to opt out.")
OPEN = ("queued", "sending")
GOAL_RATE_ERROR = 0.10  # throttled: steady rate within 10% of the configured one
GOAL_HEADROOM = 2.0  # unthrottled, 1 worker: at least twice the configured rate
GOAL_SCALING = 1.5  # 2 workers vs 1, unthrottled
GOAL_BULK_PER_WORKER = 1000  # invitations/s per worker in Africa's Talking batches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__, "inbound target", WHERE)
    p.add_argument("--messages", type=int, default=None,
                   help="messages per unthrottled outbound run [5000; --quick: 1000]")
    p.add_argument("--rate", type=float, default=50.0,
                   help="rate_per_second configured for the throttled outbound runs")
    p.add_argument("--rate-seconds", type=float, default=None,
                   help="the throttled runs send rate x this many messages [20; --quick: 8]")
    p.add_argument("--twilio-outbound", action=argparse.BooleanOptionalAction, default=True,
                   help="also drain an unthrottled run through the Twilio sender (1 worker)")
    p.add_argument("--provider-delay", type=float, default=0.1,
                   help="also drain 1 worker against a provider answering after this many "
                        "seconds (0: skip)")
    p.add_argument("--delay-seconds", type=float, default=None,
                   help="...sending about this many seconds' worth at that delay [10; "
                        "--quick: 4]")
    p.add_argument("--phase-limit", type=float, default=600.0,
                   help="give up on an outbound run after this many seconds")
    p.add_argument("--retry-rate", type=float, default=0.01,
                   help="share of inbound messages the provider delivers twice at once")
    p.add_argument("--typo-rate", type=float, default=0.02, help="share of answers typed wrong")
    p.add_argument("--label-rate", type=float, default=0.25,
                   help="share of choice answers given by label instead of number")
    p.add_argument("--skip-inbound", action="store_true")
    p.add_argument("--skip-outbound", action="store_true")
    add_run_options(p)
    args = p.parse_args(argv)
    quick = args.quick
    timing_defaults(args)
    args.messages = args.messages or (1000 if quick else 5000)
    args.rate_seconds = args.rate_seconds or (8.0 if quick else 20.0)
    args.delay_seconds = args.delay_seconds or (4.0 if quick else 10.0)
    return args


# -- back-ends -----------------------------------------------------------------------------
@dataclass
class Run(BaseRun):
    channels: dict[str, Channel]  # tw_in, at_in, at_out, at_rate, tw_out


def add_channel(engine: Engine, provider: str, address: str, config: dict[str, Any]) -> Channel:
    with Session(engine) as db, db.begin():
        campaign = db.scalar(select(Campaign))
        if campaign is None:
            raise SetupError("bootstrap created no campaign")
        ch = Channel(key=secrets.token_urlsafe(18), provider=provider, kind="sms",
                     address=address, campaign_id=campaign.id, config=json.dumps(config))
        db.add(ch)
        db.flush()
        db.expunge(ch)
    return ch


def setup(args: argparse.Namespace, tmp: Path, backends: Backends) -> Run:
    data_dir = tmp / "data"
    data_dir.mkdir()
    try:
        choose_backends(args, tmp, backends, WHERE)
        env = bench_env(backends, data_dir, "cd:",
                        CIVICDIAL_ENCRYPTION_KEY=secrets.token_hex(32))
        settings, client, engine = connect(backends, env, lambda client: client.flushdb())
        bootstrap(engine)  # migrations, questionnaire, campaign
        at_sender = {"username": "sandbox", "api_key": "at-key", "sender_id": "GSS"}
        tw_sender = {"account_sid": TWILIO_SID, "auth_token": TWILIO_TOKEN,
                     "from": TWILIO_NUMBER}
        channels = {
            # Inbound: Twilio answers inline (TwiML); AT replies go out by the queue.
            "tw_in": add_channel(engine, "twilio", TWILIO_NUMBER,
                                 {**tw_sender, "reply": "inline", "rate_per_second": 0}),
            "at_in": add_channel(engine, "africastalking", AT_SHORT_CODE,
                                 {**at_sender, "rate_per_second": 0}),
            # Outbound runs: base_url is set to the fake provider of each run.
            "at_out": add_channel(engine, "africastalking", "GSS-BULK",
                                  {**at_sender, "rate_per_second": 0}),
            "at_rate": add_channel(engine, "africastalking", "GSS-RATE",
                                   {**at_sender, "rate_per_second": args.rate}),
            "tw_out": add_channel(engine, "twilio", "+15005550007",
                                  {**tw_sender, "from": "+15005550007", "rate_per_second": 0}),
        }
    except SetupError:
        raise
    except Exception as exc:  # noqa: BLE001 - any setup failure is reported plainly
        raise SetupError(f"{type(exc).__name__}: {exc}") from exc
    return Run(args, tmp, env, settings, client, engine, channels)


# -- inbound --------------------------------------------------------------------------------
def sms_path(ch: Channel) -> str:
    return channel_urls(ch, "")["sms"]


def sms_loadgen(name: str, config: dict[str, Any], run: Run) -> dict[str, Any]:
    """Run sms_loadgen.py in its own process (no shared GIL) and return its result."""
    return run_loadgen("sms_loadgen.py", name, config, run.tmp, run.load_limit)


def load_config(run: Run, url: str, mode: str, shape: str, **extra: Any) -> dict[str, Any]:
    a = run.args
    return {"url": url, "mode": mode, "shape": shape, "auth_token": TWILIO_TOKEN,
            "account_sid": TWILIO_SID, "to": TWILIO_NUMBER, "connections": a.connections,
            "warmup": a.warmup, "duration": a.duration, "seed": a.seed,
            "retry_rate": a.retry_rate, "typo_rate": a.typo_rate, "label_rate": a.label_rate,
            **extra}


def stream_counts(client: redis.Redis, stream: str) -> Counter[tuple[int, str]]:
    """(channel id, event kind) -> events in the stream."""
    counts: Counter[tuple[int, str]] = Counter()
    for e in stream_events(client, stream):
        counts[(int(e.get("ch") or 0), str(e.get("k")))] += 1
    return counts


def inbound(run: Run, results: dict[str, Any], attempt: Callable[..., None]) -> None:
    args = run.args
    redis_server = redis_pid(run.client)
    traces = run.tmp / "sms-traces.json"
    tw_path, at_path = sms_path(run.channels["tw_in"]), sms_path(run.channels["at_in"])
    with gunicorn("gateway.web.app:create_app()", args, run.env, run.tmp / "real.log") as (
            base, pid):
        watch = {"gunicorn": [pid], "redis": [redis_server]}
        say(f"real app up at {base}; Twilio SMS: {args.warmup:g} s warm-up + "
            f"{args.duration:g} s load")
        attempt("tw", lambda: sms_loadgen("tw", load_config(
            run, base + tw_path, "twilio", "twilio", traces_out=str(traces),
            phone_base=INBOUND_PHONES, watch=watch), run))
        if traces.exists() and json.loads(traces.read_text()):
            say("real app: Africa's Talking SMS, the recorded conversations")
            attempt("at", lambda: sms_loadgen("at", load_config(
                run, base + at_path, "replay", "africastalking", traces_in=str(traces),
                phone_base=AT_PHONES, watch=watch), run))
        counts = stream_counts(run.client, run.stream)
        results["stream"] = {name: {k: n for (ch, k), n in counts.items()
                                    if ch == run.channels[name].id}
                             for name in ("tw_in", "at_in")}
    results["real_log"] = server_log_summary(run.tmp / "real.log")
    if not (traces.exists() and json.loads(traces.read_text())):
        results["notes"].append("no Twilio conversation completed: nothing to replay, AT and "
                                "bare runs skipped")
        return
    with gunicorn("bare_app:create_app()", args, run.env, run.tmp / "bare.log",
                  pythonpath=BENCH_DIR) as (base, pid):
        watch = {"gunicorn": [pid], "redis": [redis_server]}
        say(f"bare app up at {base}; Twilio shape, then AT shape")
        attempt("bare_tw", lambda: sms_loadgen("bare_tw", load_config(
            run, base + tw_path, "replay", "twilio", traces_in=str(traces),
            phone_base=BARE_PHONES, watch=watch), run))
        attempt("bare_at", lambda: sms_loadgen("bare_at", load_config(
            run, base + at_path, "replay", "africastalking", traces_in=str(traces),
            phone_base=BARE_PHONES, watch=watch), run))
    results["bare_log"] = server_log_summary(run.tmp / "bare.log")


# -- outbound -------------------------------------------------------------------------------

@contextlib.contextmanager
def fake_provider_process(tmp: Path, name: str, delay: float) -> Iterator[tuple[str, int]]:
    """fake_sms_provider.py in its own process: yields its base URL and pid."""
    ready = tmp / f"fake-{name}.url"
    log = tmp / f"fake-{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(BENCH_DIR / "fake_sms_provider.py"),
                                 str(ready), str(delay)], stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):  # 20 s
            if ready.exists():
                break
            if proc.poll() is not None:
                raise RuntimeError(f"fake provider exited: {log.read_text()[-1000:]}")
            time.sleep(0.1)
        else:
            raise RuntimeError("fake provider not ready after 20 s")
        yield ready.read_text().strip(), proc.pid
    finally:
        stop(proc, 10)


def fake_stats(base: str) -> dict[str, Any]:
    with NO_PROXY.open(f"{base}/_stats", timeout=10) as resp:
        return cast(dict[str, Any], json.loads(resp.read()))


def start_workers(run: Run, count: int, log: Path,
                  env: dict[str, str] | None = None) -> list[subprocess.Popen[bytes]]:
    procs = []
    with open(log, "ab") as out:
        for _ in range(count):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "worker"], env={**run.env, **(env or {})},
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:  # each worker leads a process group of its own
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def queue_rows(run: Run, channel: Channel, count: int, tag: str) -> list[str]:
    box = NumberBox(run.settings.encryption_key)
    numbers = [f"{OUTBOUND_PREFIX}{i:07d}" for i in range(count)]
    rows = [{"key": f"bench:{tag}:{i}", "channel_id": channel.id, "respondent": f"{tag}-{i}",
             "recipient": box.seal(number), "body": INVITATION, "kind": "invitation",
             "priority": 1, "segments": 1} for i, number in enumerate(numbers)]
    with run.engine.begin() as conn:
        for i in range(0, len(rows), 1000):
            conn.execute(insert(OutboundMessage), rows[i:i + 1000])
    return numbers


def status_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {s: int(n) for s, n in conn.execute(
            select(OutboundMessage.status, func.count()).group_by(OutboundMessage.status))}


def steady_rate(times: list[float]) -> float | None:
    """Messages/s over the second half of the messages (50th to 95th percentile accept
    times): past the token bucket's initial burst, which lasts until the bucket is empty
    (burst x fastest / (fastest - limit) messages: about 125 for 50/s sent at 85/s)."""
    if len(times) < 20:
        return None
    ordered = sorted(times)
    lo, hi = len(ordered) // 2, len(ordered) * 19 // 20
    span = ordered[hi] - ordered[lo]
    return (hi - lo) / span if span > 0 else None


def peak_second(times: list[float]) -> int:
    """Most messages accepted in any 1-second window."""
    ordered, best, j = sorted(times), 0, 0
    for i, t in enumerate(ordered):
        while ordered[j] < t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


def sql_transactions(run: Run) -> int | None:
    """Committed transactions in this database so far (PostgreSQL's statistics)."""
    if run.engine.dialect.name != "postgresql":
        return None
    with run.engine.connect() as conn:
        conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        return int(conn.exec_driver_sql(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).scalar() or 0)


def redis_connections(run: Run) -> int:
    return int(cast(dict[str, Any], run.client.info("stats"))["total_connections_received"])


def outbound_run(run: Run, name: str, channel_name: str, workers: int,
                 count: int, delay: float = 0.0,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Queue `count` messages, enqueue them with sweep(), drain them with `workers` real
    `civicdial worker` processes against a fresh fake provider process."""
    channel = run.channels[channel_name]
    with run.engine.begin() as conn:
        conn.execute(delete(OutboundMessage))
    run.client.flushdb()  # queues, token buckets, worker registrations of earlier runs
    with fake_provider_process(run.tmp, name, delay) as (base, fake_pid):
        config = json.loads(channel.config or "{}")
        config["base_url"] = base
        with run.engine.begin() as conn:
            conn.execute(update(Channel).where(Channel.id == channel.id)
                         .values(config=json.dumps(config)))
        start = time.perf_counter()
        numbers = queue_rows(run, channel, count, name)
        insert_s = time.perf_counter() - start
        start = time.perf_counter()
        enqueued = sweep(run.settings, run.engine, run.client, older_than=timedelta(0))
        sweep_s = time.perf_counter() - start
        log = run.tmp / f"workers-{name}.log"
        spawned = time.monotonic()
        procs = start_workers(run, workers, log, env)
        try:
            watch = {"workers": [p.pid for p in procs], "fake": [fake_pid]}
            first = CpuMark.take(watch)
            xacts, conns = sql_transactions(run), redis_connections(run)
            open_rows, done_at = count, None
            deadline = spawned + run.args.phase_limit
            while time.monotonic() < deadline:  # bounded by --phase-limit
                time.sleep(0.25)
                if any(p.poll() is not None for p in procs):
                    break
                with run.engine.connect() as conn:
                    open_rows = int(conn.scalar(
                        select(func.count()).select_from(OutboundMessage)
                        .where(OutboundMessage.status.in_(OPEN))) or 0)
                if open_rows == 0:
                    done_at = time.monotonic()
                    break
            # Children (none expected: SimpleWorker runs jobs in-process) count too.
            watch = {k: [q for p in pids for q in (p, *children(p))]
                     for k, pids in watch.items()}
            last = CpuMark.take(watch)
            xacts_after, conns_after = sql_transactions(run), redis_connections(run)
            stats = fake_stats(base)
        finally:
            stop_workers(procs)
    exits = [p.returncode for p in procs]
    times = stats["times"]
    span = (max(times) - min(times)) if len(times) > 1 else 0.0
    accepted = set(stats["numbers"])
    cores = cores_used(first, last)
    cpu_s = {k: (last.groups[k] - first.groups[k]) for k in first.groups}
    return {
        "name": name, "provider": channel.provider, "workers": workers, "count": count,
        "delay": delay,
        # Whole machine's Redis server: other clients' connections count too.
        "redis_conns_per_msg": (conns_after - conns) / max(1, stats["accepted"]),
        # Includes this script's polling, about 4 a second.
        "sql_xacts_per_msg": ((xacts_after - xacts) / max(1, stats["accepted"])
                              if xacts is not None and xacts_after is not None else None),
        "rate": float(config.get("rate_per_second", 10)), "insert_s": insert_s,
        "enqueued": enqueued, "sweep_s": sweep_s, "open_rows": open_rows,
        "wall_s": (done_at - spawned) if done_at else None,
        "first_accept_after_s": (min(times) - spawned) if times else None,
        "span_s": span, "rate_overall": (len(times) - 1) / span if span > 0 else None,
        "rate_steady": steady_rate(times), "peak_second": peak_second(times) if times else 0,
        "requests": stats["requests"], "accepted": stats["accepted"],
        "distinct": stats["distinct"], "twice": stats["twice_or_more"],
        "lost": sum(1 for n in numbers if n not in accepted),
        "statuses": status_counts(run.engine), "cores": cores,
        "worker_cpu_ms": 1000 * cpu_s["workers"] / max(1, stats["accepted"]),
        "fake_cpu_ms": 1000 * cpu_s["fake"] / max(1, stats["accepted"]),
        "log": server_log_summary(log), "exits": exits,
    }


def outbound(run: Run, results: dict[str, Any], attempt: Callable[..., None]) -> None:
    args = run.args
    throttled = max(1, round(args.rate * args.rate_seconds))
    plan = [("at-1w", "at_out", 1, args.messages), ("at-2w", "at_out", 2, args.messages),
            ("at-rate-1w", "at_rate", 1, throttled), ("at-rate-2w", "at_rate", 2, throttled)]
    if args.twilio_outbound:
        plan.append(("tw-1w", "tw_out", 1, args.messages))
    run.client.flushdb()  # the inbound runs' stream and sessions: no worker drains them here
    # The baseline in the same run: Africa's Talking one message per call, as before
    # batching (and as Twilio still is), on fewer messages (it is ~15x slower).
    single = max(100, args.messages // 5)
    say(f"outbound at-1w-single: {single:,} messages, 1 worker, CIVICDIAL_SEND_BATCH=1")
    attempt("at-1w-single", lambda: outbound_run(run, "at-1w-single", "at_out", 1, single,
                                                 env={"CIVICDIAL_SEND_BATCH": "1"}))
    for name, channel_name, workers, count in plan:
        say(f"outbound {name}: {count:,} messages, {workers} worker(s)")
        attempt(name, lambda c=channel_name, w=workers, n=count, k=name: outbound_run(
            run, k, c, w, n))
    if args.provider_delay > 0:
        # A provider across the Internet: each send waits for its answer.
        name = f"at-1w-{args.provider_delay * 1000:g}ms"
        # About delay_seconds' worth of round trips, each carrying a full batch: sized by
        # one message a call, the run was a single batch and its rate (its first to its
        # last acceptance, all in one request) meaningless.
        batch = load_settings().send_batch
        count = max(20, round(args.delay_seconds / args.provider_delay) * batch)
        say(f"outbound {name}: {count:,} messages, 1 worker, provider answers after "
            f"{args.provider_delay * 1000:g} ms")
        attempt(name, lambda: outbound_run(run, name, "at_out", 1, count,
                                           args.provider_delay))
        results["delayed"] = name


# -- report ---------------------------------------------------------------------------------
def report(run: Run, backends: Backends, results: dict[str, Any]) -> str:
    args = run.args
    lines = [
        *header("CivicDial SMS benchmark", args, backends),
        f"before    other processes used {results.get('idle_cores', 0.0):.2f} cores in the "
        "2 s before the first run (0 on a quiet machine)",
        "",
    ]
    ratios: dict[str, float | None] = {}
    if not args.skip_inbound:
        rows = [hop_header("inbound SMS hop")]
        for key, label in (("tw", "twilio real (TwiML)"), ("bare_tw", "twilio bare flask"),
                           ("at", "at real (queued)"), ("bare_at", "at bare flask")):
            rows.append(hop_row(label, results.get(key)))
        for key, bare, label in (("tw", "bare_tw", "ratio twilio real/bare"),
                                 ("at", "bare_at", "ratio at real/bare")):
            ratios[key] = hop_ratio(results.get(key), results.get(bare))
            rows.append([label, "", fmt(ratios[key], ".2f") + "x"])
        lines += [table(rows), CPU_LEGEND]
        for key, log in (("tw", "real_log"), ("at", "real_log"), ("bare_tw", "bare_log"),
                         ("bare_at", "bare_log")):
            r = results.get(key)
            if r is None:
                continue
            lines.append(f"{key}: HTTP statuses (incl. warm-up) {statuses(r)}; {flow(r)}; "
                         f"server log: {results.get(log)}")
            for sample in r["error_samples"][:5]:
                lines.append(f"{key}:   error sample {sample}")
        for name, label in (("tw_in", "twilio"), ("at_in", "at")):
            s = results.get("stream", {}).get(name)
            if s:
                lines.append(f"stream, {label} channel: " + ", ".join(
                    f"{k} {v:,}" for k, v in sorted(s.items())))
        lines.append("")

    outs = [results[k] for k in ("at-1w-single", "at-1w", "at-2w", "at-rate-1w",
                                 "at-rate-2w", "tw-1w",
                                 results.get("delayed", "")) if k in results]
    if not args.skip_outbound:
        rows = [["outbound queue", "msgs", "workers", "limit/s", "msgs/s", "steady/s",
                 "peak 1s", "spawn->done s", "sent", "twice", "lost", "worker cpu ms/msg",
                 "fake cpu ms/msg", "other cpu", "sql xacts/msg", "redis conns/msg"]]
        for o in outs:
            sent = o["statuses"].get("sent", 0)
            rows.append([f"{o['name']} ({o['provider']})", f"{o['count']:,}", str(o["workers"]),
                         "none" if o["rate"] <= 0 else f"{o['rate']:g}",
                         fmt(o["rate_overall"], ",.1f"), fmt(o["rate_steady"], ",.1f"),
                         str(o["peak_second"]), fmt(o["wall_s"], ".1f"), f"{sent:,}",
                         str(o["twice"]), str(o["lost"]), f"{o['worker_cpu_ms']:.1f}",
                         f"{o['fake_cpu_ms']:.1f}", fmt(o["cores"].get("other"), ".2f"),
                         fmt(o["sql_xacts_per_msg"], ".1f"),
                         fmt(o["redis_conns_per_msg"], ".2f")])
        lines += [table(rows),
                  "(msgs/s: accepted by the fake provider, first to last; steady/s: over the "
                  "second half of the messages (50th-95th percentile), past the token "
                  "bucket's initial burst of max(1, rate) tokens; peak 1s: most accepted in "
                  "any second; spawn->done: from starting the workers until no row is queued "
                  "or sending; other cpu: cores used by all but the workers, the fake provider "
                  "and this script: the SQL server, Redis, anything else running; sql "
                  "xacts/msg: PostgreSQL commits in the bench database per message, this "
                  "script's polling included; redis conns/msg: connections the Redis server "
                  "accepted per message, from any client)"]
        for o in outs:
            rows_by_status = ", ".join(f"{k} {v:,}" for k, v in sorted(o["statuses"].items()))
            if o["rate"] > 0:
                lines.append(
                    f"{o['name']}: achieved {fmt(o['rate_overall'], '.1f')}/s first to last, "
                    f"{fmt(o['rate_steady'], '.1f')}/s steady, against the configured "
                    f"rate_per_second {o['rate']:g}: "
                    f"{fmt((o['rate_steady'] or 0) / o['rate'], '.2f')}x steady")
            lines.append(
                f"{o['name']}: rows inserted in {o['insert_s']:.2f} s; sweep enqueued "
                f"{o['enqueued']:,} in {o['sweep_s']:.2f} s "
                f"({o['enqueued'] / o['sweep_s'] if o['sweep_s'] else 0:,.0f}/s); first "
                f"message at the provider {fmt(o['first_accept_after_s'], '.2f')} s after "
                f"spawning; provider requests {o['requests']:,}, accepted {o['accepted']:,} "
                f"to {o['distinct']:,} numbers; rows: {rows_by_status}; worker exits {o['exits']}; "
                f"worker log: {o['log']}")
        lines.append("")

    rows = [["goal", "measured", "result"]]
    if not args.skip_inbound:
        for key, label in (("tw", "Twilio"), ("at", "AT")):
            r = results.get(key)
            rows += goal_rows(f"{label} SMS hop", ratios.get(key), r["p99_ms"] if r else None)
            errors = r["errors"] if r else None
            rows.append([f"{label} SMS hop: no errors", fmt(errors, ",d"),
                         verdict(None if errors is None else errors == 0)])
    if not args.skip_outbound:
        by = {o["name"]: o for o in outs}
        one = (by.get("at-1w") or {}).get("rate_overall")
        two = (by.get("at-2w") or {}).get("rate_overall")
        need = GOAL_HEADROOM * args.rate
        rows.append([f"unthrottled, 1 worker >= {GOAL_HEADROOM:g}x the limit ({need:g}/s)",
                     fmt(one, ",.1f") + "/s", verdict(None if one is None else one >= need)])
        rows.append([f"unthrottled, 1 worker, batches >= {GOAL_BULK_PER_WORKER:,}/s",
                     fmt(one, ",.1f") + "/s",
                     verdict(None if one is None else one >= GOAL_BULK_PER_WORKER)])
        scale = two / one if one and two else None
        rows.append([f"unthrottled, 2 workers >= {GOAL_SCALING:g}x 1 worker",
                     fmt(scale, ".2f") + "x",
                     verdict(None if scale is None else scale >= GOAL_SCALING)])
        for name in ("at-rate-1w", "at-rate-2w"):
            o = by.get(name)
            steady = o["rate_steady"] if o else None
            off = abs(steady / args.rate - 1) if steady else None
            rows.append([f"{name}: steady rate within {GOAL_RATE_ERROR:.0%} of {args.rate:g}/s",
                         fmt(steady, ",.1f") + "/s",
                         verdict(None if off is None else off <= GOAL_RATE_ERROR)])
        slow = by.get(results.get("delayed", ""))
        if slow:
            got = slow["rate_overall"]
            rows.append([f"1 worker, provider answering in {slow['delay'] * 1000:g} ms >= "
                         f"the limit ({args.rate:g}/s)", fmt(got, ",.1f") + "/s",
                         verdict(None if got is None else got >= args.rate)])
        twice = sum(o["twice"] for o in outs) if outs else None
        lost = sum(o["lost"] for o in outs) if outs else None
        unsent = sum(o["count"] - o["statuses"].get("sent", 0) for o in outs) if outs else None
        rows.append(["outbound: no message sent twice", fmt(twice, ",d"),
                     verdict(None if twice is None else twice == 0)])
        rows.append(["outbound: none lost (provider got it, row 'sent')",
                     f"{fmt(lost, ',d')} / {fmt(unsent, ',d')}",
                     verdict(None if lost is None or unsent is None
                             else lost == 0 and unsent == 0)])
    lines.append(table(rows))
    for key in ("tw", "at", "bare_tw", "bare_at"):
        other = (results.get(key) or {}).get("cores", {}).get("other", 0.0)
        if other > BUSY_CORES:
            lines.append(f"note: during the {key} window other processes used {other:.2f} "
                         "cores: its figures are not clean, run again on a quiet machine")
    for o in outs:
        other = o["cores"].get("other", 0.0)
        if other > 2 * BUSY_CORES:  # the SQL server and Redis belong here, up to a point
            lines.append(f"note: during outbound {o['name']} processes other than the "
                         f"workers and the fake provider used {other:.2f} cores (the SQL "
                         "server and Redis, and anything else running)")
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
        if not args.skip_inbound:
            inbound(run, results, attempt)
        if not args.skip_outbound:
            outbound(run, results, attempt)
        return report(run, backends, results)

    return run_bench("civicdial-smsbench-", run_all)


if __name__ == "__main__":
    sys.exit(main())
