"""What every channel handler shares: strict form parsing and 4xx errors with a log line."""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import unquote

from flask import Request, Response, current_app
from werkzeug.exceptions import RequestEntityTooLarge

from gateway.store.registry import ChannelInfo, Registry

log = logging.getLogger("civicdial.webhooks")

_PHONE = re.compile(r"^\+?[1-9]\d{5,14}$")
# C0 control characters other than tab, line feed and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


class WebhookError(Exception):
    """A request we refuse: becomes a 4xx text/plain response and one log line."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def response(self) -> Response:
        return Response(self.reason + "\n", status=self.status, mimetype="text/plain")


def bound_channel(registry: Registry, provider: str, channel_key: str,
                  kind: str | None) -> ChannelInfo:
    """The channel a webhook URL names (kind None: any of the provider's kinds). An
    unbound channel's URL answers 410 Gone, so a provider still calling it (and whoever
    reads the log line) learns that it was unbound on purpose; any other unknown key 404."""
    ch = registry.channel(channel_key)
    if ch is None and registry.unbound_provider(channel_key) == provider:
        raise WebhookError(410, "channel unbound: bind the address again to use it")
    if ch is None or ch.provider != provider or kind not in (None, ch.kind):
        raise WebhookError(404, "unknown channel")
    return ch


def parse_form(request: Request) -> dict[str, str]:
    """Decode an application/x-www-form-urlencoded body strictly (UTF-8, no guessing);
    a repeated field keeps its first value."""
    form: dict[str, str] = {}
    for name, value in parse_pairs(request):
        form.setdefault(name, value)
    return form


def parse_form_or_json(request: Request) -> dict[str, str]:
    """A callback whose provider documents form fields but shows JSON samples: either body,
    as flat text fields (a JSON body must be an object of strings and numbers)."""
    if not request.is_json:
        return parse_form(request)
    data = parse_json_body(request)
    if not isinstance(data, dict) or not all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in data.values()):
        raise WebhookError(400, "expected a JSON object of text and number fields")
    return {str(k): str(v) for k, v in data.items()}


# Deeper than any body we accept; far below where the parser (or code walking the result)
# would hit Python's recursion limit.
MAX_JSON_DEPTH = 32


def parse_json_body(request: Request, *, max_bytes: int | None = None,
                    max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The request's JSON body, strictly, for every JSON endpoint (webhooks and the API):
    Content-Type application/json (else 415), at most `max_bytes` (413; default the
    webhook limit, CIVICDIAL_MAX_BODY_BYTES), UTF-8, valid JSON without NaN or Infinity
    or unpaired surrogates, arrays and objects nested at most `max_depth` deep (else 400).
    Returns what json.loads returns; checking its shape is the caller's."""
    if not request.is_json:
        raise WebhookError(415, f"expected application/json, got {request.mimetype or 'none'}")
    if max_bytes is None:
        max_bytes = current_app.extensions["civicdial"].settings.max_body_bytes
    return json_from_body(read_body(request, max_bytes), max_depth)


def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, at most `max_bytes` (else 413), however it is framed. Werkzeug
    refuses a Content-Length over its limit but stops reading a chunked body at the limit
    without a word (the rest would be cut off and the start processed), so one byte more
    is asked for: a body that has it is too large."""
    request.max_content_length = max_bytes + 1
    body = request.get_data(cache=False)
    if len(body) > max_bytes:
        raise RequestEntityTooLarge()
    return body


def json_from_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """parse_json_body for a body already read (gateway.web.fastpath reads it itself)."""
    try:
        # utf-8-sig: a leading byte-order mark is harmless, not a reason to refuse.
        data = json.loads(raw.decode("utf-8-sig"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise WebhookError(400, "body is not valid UTF-8") from None
    except RecursionError:  # nested deeper than the parser can follow
        raise WebhookError(400, f"JSON nested more than {max_depth} levels deep") from None
    except ValueError:
        raise WebhookError(400, "body is not valid JSON") from None
    _check_values(data, max_depth)
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# "\ud800" is valid JSON but no character: it cannot be encoded as UTF-8 (Redis, SQL).
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _check_values(data: Any, max_depth: int) -> None:
    """Arrays and objects nested at most max_depth deep (a scalar is depth 0), and no text
    (values or keys) with lone surrogates; iterative, so depth cannot exhaust the stack."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise WebhookError(400, "JSON text holds an unpaired surrogate (\\ud800-"
                                        "\\udfff), which is not a character")
            continue
        if isinstance(value, dict):
            value = [*value.keys(), *value.values()]
        elif not isinstance(value, list):
            continue
        if depth > max_depth:
            raise WebhookError(400, f"JSON nested more than {max_depth} levels deep")
        stack.extend((item, depth + 1) for item in value)


def parse_pairs(request: Request) -> list[tuple[str, str]]:
    """Every (name, value) of a form-encoded body, strictly UTF-8."""
    mimetype = request.mimetype or "application/x-www-form-urlencoded"
    if mimetype != "application/x-www-form-urlencoded":
        raise WebhookError(415, f"expected application/x-www-form-urlencoded, got {mimetype}")
    # Webhook bodies are small; refuse big ones before reading them (413).
    return pairs_from_body(read_body(
        request, current_app.extensions["civicdial"].settings.max_body_bytes))


def pairs_from_body(raw: bytes) -> list[tuple[str, str]]:
    """Every (name, value) of a form body already read, strictly UTF-8."""
    try:
        return _parse_qsl(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise WebhookError(400, "body is not valid UTF-8") from None


def form_from_body(raw: bytes) -> dict[str, str]:
    """parse_form for a body already read (gateway.web.fastpath reads it itself): the same
    strict decoding, the same first-value-wins."""
    form: dict[str, str] = {}
    for name, value in pairs_from_body(raw):
        form.setdefault(name, value)
    return form


def _parse_qsl(body: str) -> list[tuple[str, str]]:
    """urllib.parse.parse_qsl(body, keep_blank_values=True, errors="strict"), the same
    pairs, for every webhook hop: parse_qsl unquotes every name and value through two
    function calls each; here only those with a '+' or '%' pay for it."""
    pairs = []
    for chunk in body.split("&"):
        if chunk:
            name, _, value = chunk.partition("=")
            pairs.append((_unquote_plus(name), _unquote_plus(value)))
    return pairs


def _unquote_plus(text: str) -> str:
    if "+" in text:
        text = text.replace("+", " ")
    return unquote(text, errors="strict") if "%" in text else text


def field(form: dict[str, str], name: str, *, max_len: int = 200, required: bool = True,
          allow_empty: bool = False) -> str:
    if name not in form:
        if required:
            raise WebhookError(400, f"missing field {name}")
        return ""
    value = form[name]
    if not value and required and not allow_empty:
        raise WebhookError(400, f"empty field {name}")
    if len(value) > max_len:
        raise WebhookError(400, f"field {name} is longer than {max_len} characters")
    if _CONTROL.search(value):
        raise WebhookError(400, f"field {name} contains control characters")
    return value


def phone_number(form: dict[str, str], name: str) -> str:
    value = field(form, name, max_len=32).replace(" ", "")
    if not _PHONE.match(value):
        raise WebhookError(400, f"field {name} is not a phone number in international format")
    return value if value.startswith("+") else f"+{value}"
