"""Broken HTTP framing over a real socket: malformed chunks and bodies shorter than their
Content-Length get a 400 and change nothing, under gunicorn (as `civicdial up` serves the
app) and the development server. The WSGI test client cannot send such requests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
from flask import Flask
from node import free_port
from redis_view import counted_out
from werkzeug.serving import make_server

from gateway.store.models import Channel

HOP = (b"sessionId=S1&serviceCode=%2A920%2A16%23&phoneNumber=%2B233241234567"
       b"&networkCode=62001&text=")


@pytest.fixture(params=["gunicorn", "werkzeug"])
def server(request: pytest.FixtureRequest, app: Flask, env: dict[str, str],
           channel: Channel) -> Iterator[int]:
    """The app on a real port; yields the port."""
    if request.param == "werkzeug":
        srv = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        yield srv.server_port
        srv.shutdown()
        return
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "1", "--worker-class", "gthread",
         "--threads", "2", "--bind", f"127.0.0.1:{port}", "--log-level", "warning",
         "gateway.web.app:create_app()"], env={**os.environ, **env}, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no gunicorn"
                time.sleep(0.2)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its own process group: it and its worker
        proc.wait()


def send(port: int, head: bytes, body: bytes) -> bytes:
    """One request on a fresh connection; the client stops sending after `body`. Returns
    the response's status line."""
    return exchange(port, head, body).split(b"\r\n", 1)[0]


def exchange(port: int, head: bytes, body: bytes) -> bytes:
    """One request (Connection: close); the whole response as it came."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head + b"Connection: close\r\n\r\n" + body)
        with contextlib.suppress(OSError):  # a server that refused early may reset
            s.shutdown(socket.SHUT_WR)
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                reply += chunk
    return reply


@dataclass(frozen=True)
class Case:
    label: str
    headers: bytes
    body: bytes
    status: bytes


FORM = b"application/x-www-form-urlencoded"


def _head(path: bytes, mimetype: bytes, extra: bytes) -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + mimetype
            + b"\r\n" + extra + b"\r\n")


def _chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


CHUNKED = b"Transfer-Encoding: chunked"
AIRTIME = (b'{"transactionId": "T1", "phoneNumber": "+233241234567", "currencyCode": "GHS", '
           b'"amount": 2.0, "sourceIpAddress": "203.0.113.7"}')


def framings(body: bytes, pad: bytes) -> list[Case]:
    """The same complete body, framed well and badly; `pad` lengthens it harmlessly (a
    form's extra field, JSON's trailing space)."""
    limit = 16 * 1024  # CIVICDIAL_MAX_BODY_BYTES's default
    return [
        Case("well-formed chunked", CHUNKED, _chunked(body[:30], body[30:]), b"200"),
        Case("chunk size not hex", CHUNKED, b"zz\r\n" + body + b"\r\n0\r\n\r\n", b"400"),
        Case("chunk without its terminator", CHUNKED,
             b"%x\r\n%sXX0\r\n\r\n" % (len(body), body), b"400"),
        Case("chunked body cut off mid-chunk", CHUNKED, b"%x\r\n%s" % (len(body) + 40, body),
             b"400"),
        # A complete-looking body (every field), 40 bytes short of what was announced.
        Case("body shorter than Content-Length", b"Content-Length: %d" % (len(body) + 40),
             body, b"400"),
        Case("exact Content-Length", b"Content-Length: %d" % len(body), body, b"200"),
        # Over CIVICDIAL_MAX_BODY_BYTES (16 KiB) in chunks: refused, not cut at the limit
        # and processed (the fields come first, so a cut body would still make a hop).
        Case("chunked, over the body limit", CHUNKED,
             _chunked(body, *[(pad * limit)[:limit // 4]] * 4), b"413"),
        Case("chunked, at the body limit", CHUNKED,
             _chunked(body, (pad * limit)[:limit - len(body)]), b"200"),
    ]


def test_broken_framing_is_refused_and_changes_nothing(server: int, channel: Channel,
                                                       redis_client: redis.Redis) -> None:
    """A 400 for a body the server cannot decode or that ends early, on a form webhook
    (a USSD hop) and a JSON one (airtime validation); nothing is stored."""
    ussd = f"/webhooks/africastalking/{channel.key}/ussd".encode()
    airtime = f"/webhooks/africastalking/{channel.key}/airtime/validation".encode()
    for path, body, mimetype, pad in ((ussd, HOP, FORM, b"&pad=aaaaa"),
                                      (airtime, AIRTIME, b"application/json", b" ")):
        for case in framings(body, pad):
            before = sorted(counted_out(redis_client.keys("cd:*")))
            status = send(server, _head(path, mimetype, case.headers), case.body)
            assert status.split(b" ")[1] == case.status, (path, case.label, status)
            if case.status != b"200":
                assert sorted(counted_out(redis_client.keys("cd:*"))) == before, case.label
    assert len(redis_client.keys("cd:ps:*")) == 1  # the well-framed hops: one session


def test_a_short_body_is_refused_with_the_reason(server: int, channel: Channel) -> None:
    """The 400 for a body that ended before its Content-Length says so, not only 'Bad
    Request'."""
    path = f"/webhooks/africastalking/{channel.key}/ussd".encode()
    reply = exchange(server, _head(path, FORM, b"Content-Length: %d" % (len(HOP) + 40)),
                     HOP)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b"the body ended after %d of the %d bytes" % (len(HOP), len(HOP) + 40) in reply
