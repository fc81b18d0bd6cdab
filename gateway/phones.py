"""Phone numbers: parse whatever a provider or a CSV gives us into E.164."""

from __future__ import annotations

import phonenumbers


class BadPhoneNumber(ValueError):
    pass


def to_e164(raw: str, default_region: str = "GH") -> str:
    """'+233 24 123 4567', '0241234567', '233241234567' -> '+233241234567'."""
    text = raw.strip()
    if not text or len(text) > 32:
        raise BadPhoneNumber(f"not a phone number: {raw[:32]!r}")
    if text[0].isdigit() and not text.startswith("0") and len(text) > 10:
        text = "+" + text  # providers often drop the '+'
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException as exc:
        raise BadPhoneNumber(f"not a phone number: {raw[:32]!r} ({exc})") from None
    if not phonenumbers.is_possible_number(number):
        raise BadPhoneNumber(f"not a possible phone number: {raw[:32]!r}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
