"""How log lines look: text or one JSON object per line (CIVICDIAL_LOG_FORMAT), and the
channel keys (webhook secrets) masked in anything that logs a URL."""

from __future__ import annotations

import json
import logging
import re
import time

from gateway.config import Settings

# /webhooks/<provider>/<channel key>/...: the key is the only credential of a callback.
_CHANNEL_KEY = re.compile(r"(/webhooks/[^/\s?]+/)([^/\s?\"]+)")


def mask_channel_keys(text: str) -> str:
    """Every webhook URL in `text` with its channel key cut to 4 characters and ***."""
    if "/webhooks/" not in text:
        return text
    return _CHANNEL_KEY.sub(lambda m: m.group(1) + m.group(2)[:4] + "***", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, and the
    traceback when there is one. Messages are what the code logged (numbers masked)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def formatter(settings: Settings) -> logging.Formatter:
    return JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(settings: Settings) -> None:
    """The root logger's one handler, on stderr, in the configured format."""
    root = logging.getLogger()
    if not any(getattr(h, "_civicdial", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler._civicdial = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for h in root.handlers:
        if getattr(h, "_civicdial", False):
            h.setFormatter(formatter(settings))
    root.setLevel(settings.log_level)
