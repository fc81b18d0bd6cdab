"""The webhook form parser: the same pairs as urllib.parse.parse_qsl, refused the same way."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.channels.webhook import WebhookError, _parse_qsl, field

TRICKY = ["", "&", "a", "a=", "=b", "=", "a=1&a=2", "a=b=c", "x+y=%20%2B+", "&&a=1&&",
          "a=%zz", "a=%", "%", "a%3D=1", ";a=1;b=2", "a=%C3%A9+%E2%82%AC", "+=+"]


@pytest.mark.parametrize("body", TRICKY)
def test_parse_qsl_matches_urllib(body: str) -> None:
    assert _parse_qsl(body) == parse_qsl(body, keep_blank_values=True, errors="strict")


@given(st.lists(st.tuples(st.text(), st.text())))
def test_parse_qsl_round_trips_like_urllib(pairs: list[tuple[str, str]]) -> None:
    body = urlencode(pairs)
    assert _parse_qsl(body) == parse_qsl(body, keep_blank_values=True, errors="strict")


@given(st.text(alphabet="ab=&+%2C3E8"))
def test_parse_qsl_matches_urllib_on_raw_bodies(body: str) -> None:
    try:
        expected = parse_qsl(body, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        with pytest.raises(UnicodeDecodeError):
            _parse_qsl(body)
        return
    assert _parse_qsl(body) == expected


@pytest.mark.parametrize("code", [*range(32), 127])
def test_field_refuses_c0_controls_but_tab_and_newlines(code: int) -> None:
    value = f"a{chr(code)}b"
    if chr(code) in "\t\n\r" or code == 127:
        assert field({"f": value}, "f") == value
    else:
        with pytest.raises(WebhookError, match="control characters"):
            field({"f": value}, "f")
