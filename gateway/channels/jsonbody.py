"""Strict JSON webhook bodies (Hubtel, Arkesel): one object, typed fields, 4xx otherwise.

The form parser's rules carry over: the body size is capped before it is read (413), the
content type must say JSON (415), text must be UTF-8 without control characters, and a
field of the wrong type is refused by name (400) rather than coerced.
"""

from __future__ import annotations

from typing import Any

from flask import Request

from gateway.channels.webhook import WebhookError, field, json_from_body, parse_json_body

MAX_DIGITS = 9  # a numeric field sent as text: '1', '12'; never anything like a long id


def parse_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, by the strict rules every JSON endpoint shares
    (gateway.channels.webhook.parse_json_body: size, UTF-8, depth, no NaN, no unpaired
    surrogates)."""
    mimetype = request.mimetype or ""
    if mimetype != "application/json":
        raise WebhookError(415, f"expected application/json, got {mimetype or 'no type'}")
    return _an_object(parse_json_body(request))


def object_from_body(raw: bytes) -> dict[str, Any]:
    """parse_json for a body already read, of a request that said application/json
    (gateway.web.fastpath reads it itself)."""
    return _an_object(json_from_body(raw))


def _an_object(data: Any) -> dict[str, Any]:
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
    if isinstance(value, int | float) and not isinstance(value, bool):
        # Say which way a number is wrong (never the number: it may be a phone number).
        why = ("a negative number" if value < 0 else "a larger number"
               if value >= 10**MAX_DIGITS else "a fraction")
        raise WebhookError(400, f"field {name} must be a whole number from 0 to "
                                f"{10**MAX_DIGITS - 1}, not {why}")
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
