"""`civicdial channels [add]`: provider channels and the webhook URLs to give them."""

from __future__ import annotations

import json

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.cli.context import open_engine, settings_of
from gateway.coordination.bootstrap import DEFAULT_CAMPAIGN
from gateway.coordination.campaigns import CampaignError, audit, cli_actor
from gateway.coordination.channels import PROVIDER_KINDS, bind_channel, channel_urls
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
@click.option("--provider", required=True,
              type=click.Choice(["africastalking", "twilio", "hubtel", "arkesel"]))
@click.option("--kind", type=click.Choice(["ussd", "sms"]), required=True)
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
            bound = bind_channel(db, cli_actor(), provider=provider, kind=kind,
                                 address=address, slug=slug, config=config,
                                 screen_limit=screen_limit)
        except CampaignError as exc:
            raise click.ClickException(str(exc)) from None
        channel = bound.channel
        db.expunge(channel)
    if bound.note:
        click.echo(f"note: {bound.note}", err=True)
    urls = channel_urls(channel, settings.public_base_url or "http://127.0.0.1:8000")
    if as_json:
        click.echo(json.dumps({"id": channel.id, "urls": urls}))
        return
    click.echo(f"channel #{channel.id}: {provider} {kind} {address} -> campaign {slug}")
    for name, url in urls.items():
        click.echo(f"    {name:<9} {url}")


# -- channels set: edit a channel's config after `channels add` ---------------------------

@channels.command("set")
@click.argument("channel_ref", metavar="KEY")
@click.option("--config", "config_json", required=True,
              help='JSON object merged into the channel\'s config, key by key: '
                   '{"reply": "queue"} changes one setting and keeps the rest; a key set '
                   'to null is removed.')
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def channels_set(ctx: click.Context, channel_ref: str, config_json: str,
                 as_json: bool) -> None:
    """Change a channel's provider config (KEY: its key, as in its URLs, or its #id)."""
    try:
        changes = json.loads(config_json)
        if not isinstance(changes, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise click.BadParameter(f"must be a JSON object ({exc})",
                                 param_hint="--config") from None
    settings = settings_of(ctx)
    engine = open_engine(settings)
    ref = channel_ref.lstrip("#")
    with Session(engine) as db, db.begin():
        channel = db.scalar(select(Channel).where(Channel.key == channel_ref))
        if channel is None and ref.isdecimal():
            channel = db.get(Channel, int(ref))
        if channel is None:
            raise click.ClickException(f"no channel {channel_ref!r} (give its key or #id; "
                                       "`civicdial channels` lists them)")
        before = json.loads(channel.config or "{}")
        after = {k: v for k, v in {**before, **changes}.items() if v is not None}
        channel.config = json.dumps(after)
        # The config holds provider secrets: the audit names keys, never values.
        audit(db, cli_actor(), "channel.set",
              f"{channel.provider}/{channel.kind}/{channel.address}",
              before={"config_keys": sorted(before)},
              after={"config_keys": sorted(after),
                     "changed": sorted(k for k in changes if before.get(k) != changes[k])})
        view = {"id": channel.id, "provider": channel.provider, "kind": channel.kind,
                "address": channel.address, "config_keys": sorted(after)}
    if as_json:
        click.echo(json.dumps(view))
        return
    click.echo(f"channel #{view['id']} {view['provider']} {view['kind']} {view['address']}: "
               f"config keys {', '.join(view['config_keys']) or '(none)'} "
               "(web processes pick it up within 10 s)")
