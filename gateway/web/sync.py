"""Central's sync endpoints for edge nodes: signed batches up, the change feed down.

Authenticated by the edge's HMAC signature, not an API token (see workers/sync_central.py).
A refused request is one WARNING line and a JSON error; nothing of it is applied.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from gateway.channels.webhook import read_body
from workers.sync_central import (
    BATCHES_PATH,
    CHANGES_PATH,
    MAX_BODY_BYTES,
    SyncRefused,
    read_changes,
    receive_batch,
)

log = logging.getLogger("civicdial.sync")

bp = Blueprint("sync", __name__)


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, default=str), status=status, mimetype="application/json")


def _refused(exc: SyncRefused) -> Response:
    log.warning("%s %s -> %d %s", request.method, request.path, exc.status, exc.reason)
    return _json({"error": exc.reason}, exc.status)


@bp.post(BATCHES_PATH)
def batches() -> Response:
    """Apply one signed, gzipped batch of an edge's events; per-event results."""
    services = current_app.extensions["civicdial"]
    try:
        body = read_body(request, MAX_BODY_BYTES)
    except RequestEntityTooLarge:
        return _refused(SyncRefused(413, f"batch over {MAX_BODY_BYTES} bytes"))
    try:
        result = receive_batch(services.engine, services.redis, services.settings,
                               request.headers, body)
    except SyncRefused as exc:
        return _refused(exc)
    return _json(result.as_dict())


@bp.get(CHANGES_PATH)
def changes() -> Response:
    """What changed on central since the edge's cursor (a number central gave it)."""
    services = current_app.extensions["civicdial"]
    raw = request.args.get("since", "0")
    path = request.full_path if request.query_string else request.path
    if not raw.isdigit() or len(raw) > 18:
        return _refused(SyncRefused(400, "since must be a cursor central gave (an integer)"))
    try:
        feed = read_changes(services.engine, services.settings, request.headers, path,
                            int(raw))
    except SyncRefused as exc:
        return _refused(exc)
    return _json(feed)
