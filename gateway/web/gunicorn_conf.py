"""gunicorn settings that `civicdial up` passes (`--config python:gateway.web.gunicorn_conf`):
an access log with channel keys masked (in the configured log format), and the clean-up
prometheus_client's multiprocess mode needs when a worker exits."""

from __future__ import annotations

import logging
from typing import Any

from gunicorn.glogging import Logger
from prometheus_client import multiprocess

from gateway.config import load_settings
from gateway.logformat import JsonFormatter, mask_channel_keys

_settings = load_settings()


class MaskingLogger(Logger):
    """gunicorn's logger; every access-log atom that can hold a URL is masked."""

    def atoms(self, resp: Any, req: Any, environ: dict[str, Any],
              request_time: Any) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        for name in ("r", "U", "f", "{raw_uri}"):
            value = atoms.get(name)
            if isinstance(value, str):
                atoms[name] = mask_channel_keys(value)
        return atoms

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        if _settings.log_format == "json":
            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    handler.setFormatter(JsonFormatter())


logger_class = MaskingLogger


def child_exit(server: Any, worker: Any) -> None:
    """A dead worker's live gauges leave the metrics; its counters stay."""
    if _settings.metrics_dir:
        multiprocess.mark_process_dead(worker.pid)


logging.captureWarnings(True)
