"""What every channel's `send` returns or raises: one result type, a closed set of errors."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Failure(StrEnum):
    CONFIG = "config"  # our settings are wrong: no retry until fixed
    REJECTED = "rejected"  # the provider refused this message (4xx, bad number): no retry
    THROTTLED = "throttled"  # slow down and retry
    TEMPORARY = "temporary"  # timeout, connection error, 5xx: retry with backoff
    # An answer we cannot read, or none after the request reached the provider: the
    # message may be out, so it is not retried (no duplicates); marked 'unknown'.
    BAD_RESPONSE = "bad_response"


RETRYABLE = {Failure.THROTTLED, Failure.TEMPORARY}


@dataclass(frozen=True)
class Sent:
    provider_id: str
    status: str = "sent"


class SendError(Exception):
    def __init__(self, failure: Failure, detail: str) -> None:
        super().__init__(f"{failure.value}: {detail}")
        self.failure = failure
        self.detail = detail

    @property
    def retry(self) -> bool:
        return self.failure in RETRYABLE


def after_failure(exc: SendError, attempts: int, retries: int,
                  backoff: float) -> tuple[str, float]:
    """What a failed attempt leaves its row as: 'queued' with the delay before the retry
    (exponential backoff), else final: 'unknown' if it may have gone out, 'failed'."""
    if exc.retry and attempts <= retries:
        return "queued", backoff * 2 ** (attempts - 1)
    return ("unknown" if exc.failure is Failure.BAD_RESPONSE else "failed"), 0.0


def classify_http(status: int, detail: str) -> SendError:
    if status == 429:
        return SendError(Failure.THROTTLED, detail)
    if status in (401, 403):
        return SendError(Failure.CONFIG, detail)
    if 400 <= status < 500:
        return SendError(Failure.REJECTED, detail)
    return SendError(Failure.TEMPORARY, detail)
