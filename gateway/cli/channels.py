"""`civicdial channels [add]`: provider channels and the webhook URLs to give them."""

from __future__ import annotations

import json

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.cli.context import open_engine, settings_of
from gateway.coordination.bootstrap import DEFAULT_CAMPAIGN
from gateway.coordination.campaigns import CampaignError, cli_actor
from gateway.coordination.channels import PROVIDER_KINDS, PROVIDERS, bind_channel, channel_urls
from gateway.store.models import Campaign, Channel


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--base-url", default=None,
              help="Public base URL [env CIVICDIAL_PUBLIC_BASE_URL; default "
                   "http://127.0.0.1:8000].")
@click.pass_context
def channels(ctx: click.Context, as_json: bool, base_url: str | None) -> None:
    """List channels with the webhook URLs to give each provider (or: channels add)."""
    if ctx.invoked_subcommand is not None:
        return
    settings = settings_of(ctx)
    engine = open_engine(settings)
    base = base_url or settings.public_base_url or "http://127.0.0.1:8000"
    with Session(engine) as db:
        rows = db.execute(select(Channel, Campaign).join(
            Campaign, Channel.campaign_id == Campaign.id).order_by(Channel.id)).all()
        listing = [{
            "id": ch.id, "provider": ch.provider, "kind": ch.kind, "address": ch.address,
            "campaign": camp.slug, "screen_limit": ch.screen_limit,
            "urls": channel_urls(ch, base),
        } for ch, camp in rows]
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    if not listing:
        click.echo("no channels yet: `civicdial up` creates the default USSD channel")
    for item in listing:
        click.echo(f"#{item['id']} {item['provider']} {item['kind']} {item['address']} "
                   f"(campaign {item['campaign']})")
        for name, url in item["urls"].items():
            click.echo(f"    {name:<9} {url}")




@channels.command("add")
@click.option("--provider", type=click.Choice(sorted(PROVIDERS)), required=True)
@click.option("--kind", type=click.Choice(sorted({k for _, k in PROVIDER_KINDS})), required=True)
@click.option("--address", required=True,
              help="USSD service code, or the SMS short code / number people text.")
@click.option("--campaign", "slug", default=DEFAULT_CAMPAIGN, show_default=True)
@click.option("--config", "config_json", default="{}",
              help='Provider settings as JSON, e.g. {"username": "...", "api_key": "...", '
                   '"sender_id": "..."} (Africa\'s Talking) or {"account_sid": "...", '
                   '"auth_token": "...", "from": "+1..."} (Twilio). Optional: base_url, '
                   'rate_per_second, reply ("inline"/"queue", Twilio), label (the screen '
                   'title Hubtel shows in its app).')
@click.option("--screen-limit", default=160, show_default=True, type=click.IntRange(64, 182))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def channels_add(ctx: click.Context, provider: str, kind: str, address: str, slug: str,
                 config_json: str, screen_limit: int, as_json: bool) -> None:
    """Bind a provider channel to a campaign; prints its secret webhook URLs."""
    if (provider, kind) not in PROVIDER_KINDS:
        raise click.BadParameter(f"{provider} has no {kind} channel", param_hint="--kind")
    try:
        config = json.loads(config_json)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise click.BadParameter(f"must be a JSON object ({exc})",
                                 param_hint="--config") from None
    settings = settings_of(ctx)
    engine = open_engine(settings, with_defaults=True)
    with Session(engine) as db, db.begin():
        try:
            channel = bind_channel(db, cli_actor(), slug, provider, kind, address, config,
                                   screen_limit)
        except CampaignError as exc:
            raise click.ClickException(str(exc)) from None
        db.expunge(channel)
    urls = channel_urls(channel, settings.public_base_url or "http://127.0.0.1:8000")
    if as_json:
        click.echo(json.dumps({"id": channel.id, "urls": urls}))
        return
    click.echo(f"channel #{channel.id}: {provider} {kind} {address} -> campaign {slug}")
    for name, url in urls.items():
        click.echo(f"    {name:<9} {url}")
