"""`civicdial channels [add]`: provider channels and the webhook URLs to give them."""

from __future__ import annotations

import json
from typing import Any

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.channels import android
from gateway.cli.context import open_engine, settings_of
from gateway.config import Settings
from gateway.coordination.bootstrap import DEFAULT_CAMPAIGN
from gateway.coordination.campaigns import CampaignError, audit, cli_actor
from gateway.coordination.channels import (
    PROVIDER_KINDS,
    PROVIDERS,
    bind_channel,
    channel_urls,
    check_config,
    find_channel,
    unbind_channel,
)
from gateway.phones import BadPhoneNumber, to_e164
from gateway.store.models import Campaign, Channel


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--base-url", default=None,
              help="Public base URL [env CIVICDIAL_PUBLIC_BASE_URL; default the one "
                   "`up` last served on this data dir, else http://127.0.0.1:8000].")
@click.pass_context
def channels(ctx: click.Context, as_json: bool, base_url: str | None) -> None:
    """List channels with the webhook URLs to give each provider (or: channels add)."""
    if ctx.invoked_subcommand is not None:
        return
    settings = settings_of(ctx)
    engine = open_engine(settings)
    base = _base_url(ctx, settings, base_url)
    with Session(engine) as db:
        rows = db.execute(select(Channel, Campaign).join(
            Campaign, Channel.campaign_id == Campaign.id).order_by(Channel.id)).all()
        listing = [{
            "id": ch.id, "provider": ch.provider, "kind": ch.kind, "address": ch.address,
            "campaign": camp.slug, "screen_limit": ch.screen_limit,
            "urls": channel_urls(ch, base),
            "unbound_at": ch.unbound_at.isoformat() if ch.unbound_at else None,
        } for ch, camp in rows]
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    if not listing:
        click.echo("no channels yet: `civicdial up` creates the default USSD channel")
    for item in listing:
        if item["unbound_at"]:
            click.echo(f"#{item['id']} {item['provider']} {item['kind']} {item['address']} "
                       f"(campaign {item['campaign']}) UNBOUND {item['unbound_at'][:16]}: "
                       "its URLs answer 410 Gone")
            continue
        click.echo(f"#{item['id']} {item['provider']} {item['kind']} {item['address']} "
                   f"(campaign {item['campaign']})")
        for name, url in item["urls"].items():
            click.echo(f"    {name:<9} {url}")


# A channel key may begin with '-' (keys made before new_channel_key could): read as the
# KEY argument, not refused as an unknown option.
KEY_ARGUMENT = {"ignore_unknown_options": True}


@channels.command("add")
@click.option("--provider", type=click.Choice(sorted(PROVIDERS)), required=True)
@click.option("--kind", type=click.Choice(sorted({k for _, k in PROVIDER_KINDS})), required=True)
@click.option("--address", required=True,
              help="USSD service code, or the SMS short code / number people text.")
@click.option("--campaign", "slug", default=DEFAULT_CAMPAIGN, show_default=True)
@click.option("--config", "config_json", default="{}",
              help='Provider settings as JSON, e.g. {"username": "...", "api_key": "...", '
                   '"sender_id": "..."} (Africa\'s Talking) or {"account_sid": "...", '
                   '"auth_token": "...", "from": "+1..."} (Twilio) or {"url": '
                   '"http://PHONE:8080", "username": "...", "password": "...", '
                   '"signing_key": "..."} (SMS Gateway for Android). Optional: base_url, '
                   'rate_per_second, reply ("inline"/"queue", Twilio), label (the screen '
                   'title Hubtel shows in its app); rate_per_hour, sim_number, burst '
                   '(Android).')
@click.option("--screen-limit", default=160, show_default=True, type=click.IntRange(64, 182))
@click.option("--json", "as_json", is_flag=True)
@click.option("--base-url", default=None,
              help="Public base URL the provider calls [env CIVICDIAL_PUBLIC_BASE_URL; "
                   "default the one `up` last served on this data dir, else "
                   "http://127.0.0.1:8000]; for Android, what the phone reaches.")
@click.pass_context
def channels_add(ctx: click.Context, provider: str, kind: str, address: str, slug: str,
                 config_json: str, screen_limit: int, as_json: bool,
                 base_url: str | None) -> None:
    """Bind a provider channel to a campaign; prints its secret webhook URLs. An Android
    phone is checked and its webhooks registered."""
    if (provider, kind) not in PROVIDER_KINDS:
        raise click.BadParameter(f"{provider} has no {kind} channel", param_hint="--kind")
    config = _json_object(config_json)
    settings = settings_of(ctx)
    base = _base_url(ctx, settings, base_url)
    if provider == "android":
        address = _android_address(address, settings.default_region)
    engine = open_engine(settings, with_defaults=True)
    phone = None
    with Session(engine) as db, db.begin():
        try:
            bound = bind_channel(db, cli_actor(), provider=provider, kind=kind,
                                 address=address, slug=slug, config=config,
                                 screen_limit=screen_limit)
        except CampaignError as exc:
            raise click.ClickException(str(exc)) from None
        channel = bound.channel
        if provider == "android":
            # Before the commit: a phone that cannot be set up leaves no channel behind.
            phone = _set_up_phone(config, channel.key, channel_urls(channel, base)["events"])
        db.expunge(channel)
    if bound.note:
        click.echo(f"note: {bound.note}", err=True)
    urls = channel_urls(channel, base)
    if as_json:
        out: dict[str, Any] = {"id": channel.id, "urls": urls}
        if phone is not None:
            out["phone"] = phone
        click.echo(json.dumps(out))
        return
    click.echo(f"channel #{channel.id}: {provider} {kind} {address} -> campaign {slug}")
    for name, url in urls.items():
        click.echo(f"    {name:<9} {url}")
    if phone is not None:
        _print_phone_setup(phone, config)


def _json_object(text: str) -> dict[str, Any]:
    """--config: a JSON object, or a clear usage error."""
    try:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise click.BadParameter(f"must be a JSON object ({exc})",
                                 param_hint="--config") from None
    return value


def _base_url(ctx: click.Context, settings: Settings, given: str | None) -> str:
    """The public base URL: this command's --base-url, the group's, the setting, what
    `up` last served on this data dir, local."""
    return (given or (ctx.parent.params.get("base_url") if ctx.parent else None)
            or settings.public_base_url or settings.served_url()
            or "http://127.0.0.1:8000")


def _channel(db: Session, ref: str) -> Channel:
    """A channel by its key or #id, or a clear error."""
    channel = find_channel(db, ref)
    if channel is None:
        raise click.ClickException(f"no channel {ref!r} (give its key or #id; "
                                   "`civicdial channels` lists them)")
    return channel


def _android_address(address: str, region: str) -> str:
    try:
        return to_e164(address, region)
    except BadPhoneNumber as exc:
        raise click.BadParameter(f"the phone's SIM number: {exc}",
                                 param_hint="--address") from None


def _set_up_phone(config: dict[str, Any], key: str, events_url: str) -> dict[str, Any]:
    try:
        return android.set_up_phone(config, key, events_url)
    except android.PhoneError as exc:
        raise click.ClickException(str(exc)) from None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _print_phone_setup(phone: dict[str, Any], config: dict[str, Any]) -> None:
    click.echo(f"phone: SMS Gateway {phone['version'] or '?'} (health {phone['status']}); "
               f"registered {', '.join(h['event'] for h in phone['webhooks'])}")
    for w in phone["other_webhooks"]:
        click.echo(f"  warning: the phone also sends {w['event']} to {w['url']} (id "
                   f"{w['id']}): remove it in the app if it is an old channel", err=True)
    for line in _warnings(phone):
        click.echo(f"  warning: {line}", err=True)
    click.echo("Set on the phone (SMS Gateway app -> Settings):")
    click.echo("  Messages -> Processing order: FIFO (the default, LIFO, sends a person's "
               "questions out of order)")
    click.echo("  Messages -> leave delivery reports on (each message asks for one)")
    click.echo("  Webhooks -> Signing Key: the signing_key of this channel's --config")
    click.echo("  Messages -> Limits: off, or above rate_per_hour "
               f"({config.get('rate_per_hour', android.DEFAULT_RATE_PER_HOUR)}/hour): "
               "the node paces sends")
    click.echo("  App version " + ".".join(map(str, android.MIN_APP_VERSION))
               + " or newer (1.65.2-1.66.1 drop a repeated answer)")


def _warnings(phone: dict[str, Any]) -> list[str]:
    out = []
    if not phone["version_ok"]:
        out.append(f"app version {phone['version'] or 'unknown'} is older than "
                   + ".".join(map(str, android.MIN_APP_VERSION))
                   + ": update it (older versions can drop a repeated answer)")
    skew = phone["clock_skew_seconds"]
    if skew is not None and abs(skew) > android.CLOCK_WARN_SECONDS:
        out.append(f"the phone's clock is {skew:+.0f} s from this node's: webhook "
                   f"signatures more than {android.SIGNATURE_WINDOW} s off are refused; "
                   "set both clocks")
    if phone["status"] not in ("pass", "warn"):
        out.append(f"the phone reports its health as {phone['status']!r}")
    return out


@channels.command("check", context_settings=KEY_ARGUMENT)
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--base-url", default=None,
              help="Public base URL the phone should call [env CIVICDIAL_PUBLIC_BASE_URL].")
@click.pass_context
def channels_check(ctx: click.Context, key: str, as_json: bool,
                   base_url: str | None) -> None:
    """Check an Android channel's phone: health, queue, webhooks, clock."""
    settings = settings_of(ctx)
    engine = open_engine(settings)
    with Session(engine) as db:
        channel = _channel(db, key)
        db.expunge(channel)
    if channel.provider != "android":
        raise click.ClickException(f"channel #{channel.id} is {channel.provider}: only "
                                   "Android channels can be checked")
    config = json.loads(channel.config or "{}")
    base = _base_url(ctx, settings, base_url)
    expected = channel_urls(channel, base)["events"]
    try:
        check = android.check_phone(config)
    except android.PhoneError as exc:
        if as_json:
            click.echo(json.dumps({"id": channel.id, "ok": False, "error": str(exc)}))
            ctx.exit(1)
        raise click.ClickException(str(exc)) from None
    registered = {w["event"]: w for w in check.webhooks
                  if w["url"].rstrip("/") == expected}
    missing = [e for e in android.EVENTS if e not in registered]
    report: dict[str, Any] = {
        "id": channel.id, "address": channel.address, "phone_url": config.get("url"),
        "status": check.status, "version": check.version, "version_ok": check.version_ok,
        "clock_skew_seconds": _round(check.clock_skew), "pending": check.pending,
        "webhooks": check.webhooks, "expected_url": expected, "missing_webhooks": missing,
        "health": check.health,
    }
    warnings = _warnings({**report, "status": check.status})
    if missing:
        warnings.append(f"no webhook for {', '.join(missing)} to {expected}: run "
                        "`channels add` again, or check --base-url")
    report["warnings"] = warnings
    report["ok"] = not warnings
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    skew = report["clock_skew_seconds"]
    click.echo(f"channel #{channel.id} android {channel.address} -> {config.get('url')}")
    click.echo(f"  health    {check.status} (app {check.version or '?'})")
    click.echo(f"  queue     {check.pending if check.pending is not None else '?'} "
               "message(s) pending on the phone")
    click.echo("  clock     " + ("unknown (no Date header)" if skew is None
                                 else f"phone {skew:+.1f} s from this node"))
    for w in check.webhooks:
        mark = "ok " if w["url"].rstrip("/") == expected else "   "
        click.echo(f"  webhook {mark}{w['event']:<14} {w['url']}")
    for line in warnings:
        click.echo(f"  warning: {line}", err=True)


# -- channels set: edit a channel's config after `channels add` ---------------------------

@channels.command("set", context_settings=KEY_ARGUMENT)
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
    changes = _json_object(config_json)
    engine = open_engine(settings_of(ctx))
    with Session(engine) as db, db.begin():
        channel = _channel(db, channel_ref)
        before = json.loads(channel.config or "{}")
        after = {k: v for k, v in {**before, **changes}.items() if v is not None}
        try:
            check_config(channel.provider, channel.kind, after)
        except CampaignError as exc:
            raise click.ClickException(f"not changed: {exc}") from None
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


# -- channels remove: unbind (the row stays, marked unbound) ------------------------------

@channels.command("remove", context_settings=KEY_ARGUMENT)
@click.argument("channel_ref", metavar="KEY")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def channels_remove(ctx: click.Context, channel_ref: str, as_json: bool) -> None:
    """Unbind a channel (KEY: its key or #id): its webhooks answer 410 Gone, its queued
    and held messages stop with "channel unbound"; the address can be bound again."""
    engine = open_engine(settings_of(ctx))
    with Session(engine) as db, db.begin():
        channel = _channel(db, channel_ref)
        try:
            done = unbind_channel(db, cli_actor(), channel.id)
        except CampaignError as exc:
            raise click.ClickException(str(exc)) from None
        ch = done.channel
        view = {"id": ch.id, "provider": ch.provider, "kind": ch.kind, "address": ch.address,
                "unbound_at": ch.unbound_at.isoformat() if ch.unbound_at else None,
                "messages_stopped": done.stopped}
    if as_json:
        click.echo(json.dumps(view))
        return
    click.echo(f"channel #{view['id']} {view['provider']} {view['kind']} {view['address']} "
               f"unbound; {view['messages_stopped']} queued or held message(s) stopped "
               "(web processes answer 410 within 10 s)")
