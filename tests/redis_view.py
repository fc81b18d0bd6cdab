"""What a test compares of Redis when a request must change nothing."""

from __future__ import annotations


def counted_out(keys: list[bytes]) -> list[bytes]:
    """Keys apart from the per-number limit counters, which count every hop, refused or not."""
    return [k for k in keys if b":lim:" not in k]
