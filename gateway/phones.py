"""Phone numbers: parse whatever a provider or a CSV gives us into E.164."""

from __future__ import annotations

import re

import phonenumbers


class BadPhoneNumber(ValueError):
    pass


# What people write in a number besides digits; letters ("024ABC4567") are not a number,
# though phonenumbers would read them as keypad digits.
_WRITTEN = re.compile(r"^\+?[\d\s().\-/]+$")


def to_e164(raw: str, default_region: str = "GH", *, require_valid: bool = True) -> str:
    """'+233 24 123 4567', '0241234567', '233241234567' -> '+233241234567'.

    By default the number must be valid (phonenumbers.is_valid_number: a number range in
    use), so '0000000' is refused rather than stored as '+2330000000'. Inbound webhooks
    pass require_valid=False: the provider has just carried a message from that number, so
    it is real even where phonenumbers' metadata lags a newly opened range (or a sandbox's
    test numbers); it must still be a possible number."""
    text = raw.strip()
    if not text or len(text) > 32:
        raise BadPhoneNumber(f"not a phone number: {raw[:32]!r}")
    if require_valid and not _WRITTEN.match(text):
        raise BadPhoneNumber(f"not a phone number: {raw[:32]!r}")
    if text[0].isdigit() and not text.startswith("0") and len(text) > 10:
        text = "+" + text  # providers often drop the '+'
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException as exc:
        raise BadPhoneNumber(f"not a phone number: {raw[:32]!r} ({exc})") from None
    if not phonenumbers.is_possible_number(number):
        raise BadPhoneNumber(f"not a possible phone number: {raw[:32]!r}")
    if require_valid and not phonenumbers.is_valid_number(number):
        raise BadPhoneNumber(f"not a valid phone number (no such number range): {raw[:32]!r}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
