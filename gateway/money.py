"""Amounts in minor units (pesewas): what the database stores and providers are sent."""

from __future__ import annotations


def minor_to_text(minor: int | None) -> str | None:
    """Pesewas as a decimal amount: 250 -> '2.50'."""
    return None if minor is None else f"{minor // 100}.{minor % 100:02d}"
