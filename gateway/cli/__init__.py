"""The `civicdial` command: the group in main.py, one module per command family."""

from gateway.cli import campaigns, channels, contacts, edge, indicator, sync, up
from gateway.cli.main import main

main.add_command(up.up)
main.add_command(channels.channels)
main.add_command(campaigns.campaign)
main.add_command(campaigns.questionnaire)
main.add_command(campaigns.token)
main.add_command(campaigns.audit_cmd)
main.add_command(contacts.contacts)
main.add_command(contacts.invite_cmd)
main.add_command(edge.edge)
main.add_command(sync.sync)
for command in indicator.COMMANDS:  # tally, export, publish
    main.add_command(command)

__all__ = ["main"]
