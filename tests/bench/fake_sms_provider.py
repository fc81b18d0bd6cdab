"""The test suite's fake Africa's Talking / Twilio send API (tests/fake_providers.py), served
in a process of its own so that it shares no GIL with the workers it answers.

`python fake_sms_provider.py READY_FILE [DELAY]` binds a free loopback port, writes its base
URL to READY_FILE and serves until SIGTERM (or a time limit), answering every send after
DELAY seconds (default 0: a provider on the same machine). `GET /_stats` answers what it has
seen: requests, accepted messages per number, and when each was accepted
(time.monotonic(), the same clock in every process on the machine).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import Counter
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fake_providers

from fake_providers import FakeProvider, _handler  # noqa: E402

MAX_SECONDS = 3600  # serve at most this long, whatever happens to the parent


class TimedFake(FakeProvider):
    """Also remembers when each message was accepted."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.accepted_at: list[float] = []

    def record(self, to: str, body: str, sender: str, **extra: str) -> str:
        message_id = super().record(to, body, sender, **extra)
        with self.lock:
            self.accepted_at.append(time.monotonic())
        return message_id

    def stats(self) -> dict[str, Any]:
        with self.lock:
            per_number = Counter(m["to"] for m in self.accepted)
            return {"requests": self.requests, "accepted": len(self.accepted),
                    "distinct": len(per_number),
                    "twice_or_more": sum(1 for n in per_number.values() if n > 1),
                    "numbers": sorted(per_number), "times": list(self.accepted_at)}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: workers open a connection per message


def serve(ready_file: Path, delay: float = 0.0) -> None:
    fake = TimedFake(delay=delay)
    base = _handler(fake)

    class Handler(base):  # type: ignore[valid-type,misc]
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/_stats":
                self._reply(200, fake.stats())
            else:
                self._reply(404, {"error": "no such endpoint"})

    server = _Server(("127.0.0.1", 0), Handler)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    tmp = ready_file.with_suffix(".tmp")
    tmp.write_text(f"http://127.0.0.1:{server.server_address[1]}")
    tmp.rename(ready_file)
    stop.wait(MAX_SECONDS)
    server.shutdown()
    server.server_close()


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        print("usage: fake_sms_provider.py READY_FILE [DELAY]", file=sys.stderr)
        sys.exit(2)
    serve(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) == 3 else 0.0)
