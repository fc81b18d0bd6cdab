"""Request bodies whose HTTP framing is broken are refused (400), whatever the server.

The WSGI server decodes the framing while the app reads `wsgi.input`, so a malformed chunk
surfaces as the server's own exception inside `request.get_data()` (gunicorn's
InvalidChunkSize or ChunkMissingTerminator, the development server's OSError), which
Flask turns into a 500. And gunicorn hands over a body that ends before its Content-Length
(the client closed early) as if it were complete, so a truncated form would be processed.
This middleware wraps the input stream: any failure to read it, and a body shorter than
its Content-Length, become a 400 the app's error handlers answer and log.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import IO, Any

from werkzeug.exceptions import BadRequest, HTTPException
from werkzeug.wsgi import get_content_length

WSGIApp = Any  # (environ, start_response) -> iterable of bytes


class BrokenBody(BadRequest):
    """The request body could not be read as its headers announce it."""


class _GuardedInput:
    """`wsgi.input` that raises BrokenBody instead of the server's framing errors and
    when the body ends before its Content-Length."""

    def __init__(self, stream: IO[bytes], length: int | None) -> None:
        self._stream = stream
        self._length = length
        self._got = 0

    def _checked(self, data: bytes, to_end: bool) -> bytes:
        self._got += len(data)
        if self._length is not None and self._got < self._length and (to_end or not data):
            raise BrokenBody(f"the body ended after {self._got} of the {self._length} bytes "
                             "its Content-Length announced")
        return data

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._stream, method)(*args)
        except HTTPException:
            raise
        except Exception as exc:  # the server's framing errors have no common base
            raise BrokenBody(f"the request body is malformed ({type(exc).__name__})") from exc

    def read(self, size: int | None = -1) -> bytes:
        whole = size is None or size < 0
        data = self._call("read") if whole else self._call("read", size)
        return self._checked(data, whole)

    def readline(self, size: int | None = -1) -> bytes:
        data = self._call("readline") if size is None or size < 0 else self._call(
            "readline", size)
        return self._checked(data, False)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return list(self)

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line


class BodyGuard:
    """WSGI middleware: the app reads its body through _GuardedInput."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        stream = environ.get("wsgi.input")
        if stream is not None:
            environ["wsgi.input"] = _GuardedInput(stream, get_content_length(environ))
        return self.app(environ, start_response)
