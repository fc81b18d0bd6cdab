"""Encryption at rest for the few places that must keep a phone number (outbound SMS)."""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken


class NumberBox:
    """Fernet with a key derived from the configured secret (any length, any format)."""

    def __init__(self, secret: bytes) -> None:
        key = base64.urlsafe_b64encode(hashlib.sha256(b"civicdial-numbers:" + secret).digest())
        self._fernet = Fernet(key)

    def seal(self, number: str) -> str:
        return self._fernet.encrypt(number.encode()).decode()

    def open(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise ValueError("cannot decrypt: wrong CIVICDIAL_ENCRYPTION_KEY?") from None
