"""Strict JSON webhook bodies (Hubtel, Arkesel): one object, typed fields, 4xx otherwise.

The form parser's rules carry over: the body size is capped before it is read (413), the
content type must say JSON (415), text must be UTF-8 without control characters, and a
field of the wrong type is refused by name (400) rather than coerced.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Request, current_app

from gateway.channels.webhook import WebhookError, field

MAX_DIGITS = 9  # a numeric field sent as text: '1', '12'; never anything like a long id


def parse_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object."""
    mimetype = request.mimetype or ""
    if mimetype != "application/json":
        raise WebhookError(415, f"expected application/json, got {mimetype or 'no type'}")
    request.max_content_length = current_app.extensions["civicdial"].settings.max_body_bytes
    raw = request.get_data(cache=False)
    try:
        # utf-8-sig: a leading byte-order mark is harmless, not a reason to refuse.
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise WebhookError(400, "body is not valid UTF-8") from None
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise WebhookError(400, "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise WebhookError(400, "expected a JSON object")
    return data


def text(data: dict[str, Any], name: str, *, max_len: int = 200, required: bool = True,
         allow_empty: bool = False) -> str:
    """A text field; a missing or null optional one is ''."""
    value = data.get(name)
    if value is None:
        if required:
            raise WebhookError(400, f"missing field {name}")
        return ""
    if not isinstance(value, str):
        raise WebhookError(400, f"field {name} must be text, not {_kind(value)}")
    return field({name: value}, name, max_len=max_len, required=required,
                 allow_empty=allow_empty)


def whole_number(data: dict[str, Any], name: str) -> int:
    """A required non-negative whole number, sent as a number (1) or as text ('1')."""
    value = data.get(name)
    if value is None:
        raise WebhookError(400, f"missing field {name}")
    if isinstance(value, str) and value.isascii() and value.isdigit() \
            and len(value) <= MAX_DIGITS:
        return int(value)
    # bool is an int in Python, not in JSON.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**MAX_DIGITS:
        return value
    raise WebhookError(400, f"field {name} must be a whole number, not {_kind(value)}")


def boolean(data: dict[str, Any], name: str) -> bool:
    """A required JSON true/false."""
    value = data.get(name)
    if value is None:
        raise WebhookError(400, f"missing field {name}")
    if not isinstance(value, bool):
        raise WebhookError(400, f"field {name} must be true or false, not {_kind(value)}")
    return value


def optional_object(data: dict[str, Any], name: str) -> dict[str, Any]:
    """An object field that may be missing or null (e.g. Hubtel's ExtraData)."""
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebhookError(400, f"field {name} must be an object, not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    """The JSON type of a refused value; never the value (it may be a phone number)."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "an object" if isinstance(value, dict) else "a list"
