"""What CIVICDIAL_REDIS_FSYNC costs: the hop's commit (the Lua compare-and-set + XADD that
acknowledges an answer) against the embedded redis-server, with appendfsync everysec and
always, on this machine's disk.

    python tests/bench/bench_fsync.py [--seconds 5] [--threads 1,8] [--dir DIR]

Each run starts the embedded server the way `civicdial up` does (EmbeddedRedis, AOF in a
fresh data dir under --dir, default the system temp dir: put it on the disk the data dir
will live on) and commits hops from N threads for --seconds; it prints commits/s and the
commit latency's median and 99th percentile.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from gateway.config import load_settings
from gateway.store.redis_conn import EmbeddedRedis, connect
from gateway.store.sessions import SessionStore


def run(fsync: str, threads: int, seconds: float, base: Path) -> tuple[float, float, float]:
    data = Path(tempfile.mkdtemp(prefix=f"fsync-{fsync}-", dir=base))
    run_dir = Path(tempfile.mkdtemp(prefix="fsync-run-"))
    settings = load_settings({"CIVICDIAL_DATA_DIR": str(data), "CIVICDIAL_REDIS_FSYNC": fsync})
    server = EmbeddedRedis(settings, run_dir)
    server.start()
    try:
        store = SessionStore(connect(settings.with_(redis_url=server.url)))
        latencies: list[list[float]] = [[] for _ in range(threads)]
        stop = time.monotonic() + seconds

        def commits(n: int) -> None:
            state = ""
            i = 0
            while time.monotonic() < stop:
                new = f'["v","i{n}","ask","en",{i},0,{{}},1,{i},0,1,0,0,0,0]'
                t0 = time.perf_counter()
                assert store.commit(
                    campaign=1, respondent=f"r{n}", channel=1, session_id=f"s{n}",
                    expected=state, state=new, state_ttl=3600, provider=None,
                    provider_ttl=60, events=[{"id": f"e{n}:{i}", "k": "answer", "v": "1"}])
                latencies[n].append(time.perf_counter() - t0)
                state, i = new, i + 1

        workers = [threading.Thread(target=commits, args=(n,)) for n in range(threads)]
        started = time.monotonic()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.monotonic() - started
        every = sorted(x for per in latencies for x in per)
        p99 = every[int(len(every) * 0.99)]
        return len(every) / elapsed, statistics.median(every) * 1000, p99 * 1000
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--threads", default="1,8")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    print(f"AOF on {args.dir}; {args.seconds:g} s per run")
    print(f"{'appendfsync':<12} {'threads':>7} {'commits/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for threads in (int(t) for t in args.threads.split(",")):
        for fsync in ("everysec", "always"):
            rate, p50, p99 = run(fsync, threads, args.seconds, args.dir)
            print(f"{fsync:<12} {threads:>7} {rate:>10.0f} {p50:>8.2f} {p99:>8.2f}")


if __name__ == "__main__":
    main()
