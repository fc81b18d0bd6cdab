"""The `civicdial` command."""

from gateway.cli import campaigns, contacts, indicator
from gateway.cli.main import main

indicator.register(main)  # tally, export, publish
contacts.register(main)  # contacts import, invite
campaigns.register(main)  # lifecycle, tokens, audit

__all__ = ["main"]
