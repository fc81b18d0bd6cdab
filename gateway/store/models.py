"""SQL models, shared by the web process and the workers. Schema changes go through Alembic
(gateway/migrations); tests build the schema by running the migrations.

Phone numbers never appear here: respondents are keyed HMAC pseudonyms.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class QuestionnaireVersion(Base):
    __tablename__ = "questionnaire_versions"

    version: Mapped[str] = mapped_column(String(32), primary_key=True)
    form_id: Mapped[str] = mapped_column(String(200))
    title: Mapped[str] = mapped_column(String(500))
    form_version: Mapped[str] = mapped_column(String(100), default="")
    filename: Mapped[str] = mapped_column(String(300))
    languages: Mapped[str] = mapped_column(Text)  # comma-separated language keys
    question_count: Mapped[int] = mapped_column(Integer)
    source: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Campaign(Base):
    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(300))
    questionnaire_version: Mapped[str] = mapped_column(
        ForeignKey("questionnaire_versions.version"))
    state: Mapped[str] = mapped_column(String(20), default="open")
    budget_seconds: Mapped[int] = mapped_column(Integer, default=120)
    budget_screens: Mapped[int] = mapped_column(Integer, default=15)
    resume_window: Mapped[int] = mapped_column(Integer, default=24 * 3600)
    max_invalid: Mapped[int] = mapped_column(Integer, default=3)
    sms_keyword: Mapped[str] = mapped_column(String(40), default="SURVEY")
    # After a dropped USSD session, offer to finish by SMS (needs an SMS channel).
    sms_handover: Mapped[bool] = mapped_column(Boolean, default=False)
    # SMS interviews idle this long get one reminder, then expire.
    sms_idle_seconds: Mapped[int] = mapped_column(Integer, default=24 * 3600)
    target_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    opens_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    closes_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Language keys of the questionnaire offered, comma-separated; '' offers all of them.
    languages: Mapped[str] = mapped_column(Text, default="")
    # JSON {"on": [question, ...], "targets": {"value|value": n}}, or '' for no quotas.
    quotas: Mapped[str] = mapped_column(Text, default="")
    # Interviews started but not finished get a reminder every N hours, at most M times.
    reminder_hours: Mapped[int] = mapped_column(Integer, default=12)
    reminder_max: Mapped[int] = mapped_column(Integer, default=1)
    # Airtime thank-you on completion, in minor units (pesewas); None: off.
    airtime_currency: Mapped[str] = mapped_column(String(3), default="")
    airtime_amount: Mapped[int | None] = mapped_column(Integer, nullable=True)
    airtime_budget: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Channel(Base):
    __tablename__ = "channels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The secret in the webhook URL: providers do not sign USSD callbacks.
    key: Mapped[str] = mapped_column(String(64), unique=True)
    provider: Mapped[str] = mapped_column(String(40))  # africastalking
    kind: Mapped[str] = mapped_column(String(20))  # ussd
    address: Mapped[str] = mapped_column(String(100))  # service code, e.g. *920*16#
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id"))
    screen_limit: Mapped[int] = mapped_column(Integer, default=160)
    # Provider settings as JSON: credentials, sender id, API base URL, rate limit.
    config: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Unbinding keeps the row (messages and interviews name it): its webhooks answer 410
    # and nothing is sent through it; the address may be bound again as a new channel.
    unbound_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                        nullable=True)


class Interview(Base):
    __tablename__ = "interviews"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    campaign_id: Mapped[int] = mapped_column(Integer, index=True)
    channel_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    respondent: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    questionnaire_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    lang: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # started | completed | abandoned | declined | withdrawn
    status: Mapped[str] = mapped_column(String(20), default="started")
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                          nullable=True)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    # Why an interview was screened out: 'quota' or 'ineligible' (outside the population).
    reason: Mapped[str | None] = mapped_column(String(20), nullable=True)


class Answer(Base):
    __tablename__ = "answers"
    __table_args__ = (UniqueConstraint("interview_id", "question", name="uq_answer"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    # Indexed by uq_answer (interview_id, question), whose first column it is.
    interview_id: Mapped[str] = mapped_column(String(64))
    campaign_id: Mapped[int] = mapped_column(Integer, index=True)
    respondent: Mapped[str] = mapped_column(String(64))
    questionnaire_version: Mapped[str] = mapped_column(String(32))
    question: Mapped[str] = mapped_column(String(200))
    # NULL: the answer was withdrawn (the question became irrelevant after a change).
    value: Mapped[str | None] = mapped_column(Text, nullable=True)
    seq: Mapped[int] = mapped_column(Integer)
    event_id: Mapped[str] = mapped_column(String(100))
    answered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class UssdSessionEnd(Base):
    """Africa's Talking's end-of-session notification, as received."""

    __tablename__ = "ussd_session_ends"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(200), unique=True)
    channel_id: Mapped[int] = mapped_column(Integer)
    session_id: Mapped[str] = mapped_column(String(200))
    respondent: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(40))
    network_code: Mapped[str] = mapped_column(String(20), default="")
    duration_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    hops: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cost: Mapped[str] = mapped_column(String(40), default="")
    error: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class UssdPartBreak(Base):
    """A USSD interview that reached the end of a part (the campaign's part budget) and
    was told to dial again: one row per interview and part, written from its event."""

    __tablename__ = "ussd_part_breaks"
    __table_args__ = (UniqueConstraint("interview_id", "part", name="uq_part_break"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    interview_id: Mapped[str] = mapped_column(String(64))
    campaign_id: Mapped[int] = mapped_column(Integer, index=True)
    channel_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    part: Mapped[int] = mapped_column(Integer)  # the part just finished (1, 2, ...)
    seq: Mapped[int] = mapped_column(Integer)  # the event's place in the interview
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class OutboundMessage(Base):
    """One SMS we send: persisted before any attempt, updated by delivery reports."""

    __tablename__ = "outbound_messages"
    # Strict per-recipient ordering asks "is an earlier message to this person pending?"
    __table_args__ = (Index("ix_outbound_order", "channel_id", "respondent", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Idempotency key: the same logical message is queued once whatever retries happen.
    key: Mapped[str] = mapped_column(String(200), unique=True)
    channel_id: Mapped[int] = mapped_column(Integer, index=True)
    respondent: Mapped[str] = mapped_column(String(64), index=True)
    recipient: Mapped[str] = mapped_column(Text)  # Fernet-encrypted E.164 number
    body: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(20), default="reply")  # reply|handover|reminder
    priority: Mapped[int] = mapped_column(Integer, default=0)  # 0 interactive, 1 bulk
    segments: Mapped[int] = mapped_column(Integer, default=1)
    # queued | sending | sent | delivered | failed | rejected | undelivered | unknown | stopped
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    provider_id: Mapped[str | None] = mapped_column(String(100), nullable=True, index=True)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AirtimePayment(Base):
    """One airtime thank-you: at most one per respondent per campaign, whatever retries
    or restarts happen (the unique constraint), reserved against the budget before any
    attempt."""

    __tablename__ = "airtime_payments"
    __table_args__ = (UniqueConstraint("campaign_id", "respondent", name="uq_airtime_once"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(Integer, index=True)
    respondent: Mapped[str] = mapped_column(String(64))
    interview_id: Mapped[str] = mapped_column(String(64))
    channel_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # whose credentials
    recipient: Mapped[str] = mapped_column(Text)  # Fernet-encrypted E.164 number
    currency: Mapped[str] = mapped_column(String(3))
    amount: Mapped[int] = mapped_column(Integer)  # minor units
    # queued | sending | sent | success | failed | unknown | stopped
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    request_id: Mapped[str | None] = mapped_column(String(100), nullable=True, index=True)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OptOut(Base):
    """A respondent who texted STOP: never messaged again, in any campaign."""

    __tablename__ = "opt_outs"

    respondent: Mapped[str] = mapped_column(String(64), primary_key=True)
    channel_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Erasure(Base):
    """A respondent erased on request (DELETE): only the pseudonym and the time, kept so
    that answers given before it and still travelling (an edge's unsynced outbox, a late
    batch) are refused instead of bringing them back, and so every node learns of it."""

    __tablename__ = "erasures"

    respondent: Mapped[str] = mapped_column(String(64), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FeedbackSubscriber(Base):
    """A respondent who asked, at the end of the interview, to get the results by SMS."""

    __tablename__ = "feedback_subscribers"

    campaign_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    respondent: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The campaign's SMS channel at the time (None if it had none: nothing can be sent).
    channel_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    recipient: Mapped[str] = mapped_column(Text)  # Fernet-encrypted E.164 number
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TallySnapshot(Base):
    """One run of the 16.6.2 tally, kept whole so a published figure can be reproduced:
    the margins and parameters it used travel with its result."""

    __tablename__ = "tally_snapshots"
    __table_args__ = (UniqueConstraint("campaign_id", "version", name="uq_tally_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(Integer, index=True)
    version: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per campaign
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    questionnaire_versions: Mapped[str] = mapped_column(Text)  # comma-separated
    margins_sha256: Mapped[str] = mapped_column(String(64))
    margins: Mapped[str] = mapped_column(Text)  # the margins CSV as used
    params: Mapped[str] = mapped_column(Text)  # JSON: thresholds, trimming, bootstrap
    n_interviews: Mapped[int] = mapped_column(Integer)
    n_completed: Mapped[int] = mapped_column(Integer)
    result: Mapped[str] = mapped_column(Text)  # JSON: cells, weighting report, notes
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                          nullable=True)


class Contact(Base):
    """Someone a coordinator may invite: pseudonym, encrypted number, a few attributes."""

    __tablename__ = "contacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    respondent: Mapped[str] = mapped_column(String(64), unique=True)  # HMAC pseudonym
    recipient: Mapped[str] = mapped_column(Text)  # Fernet-encrypted E.164 number
    language: Mapped[str] = mapped_column(String(40), default="")
    region: Mapped[str] = mapped_column(String(100), default="")
    attributes: Mapped[str] = mapped_column(Text, default="{}")  # JSON
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CampaignContact(Base):
    __tablename__ = "campaign_contacts"

    campaign_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiToken(Base):
    """A coordinator API credential; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(20))  # admin | coordinator | viewer
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AuditEntry(Base):
    """Who changed what, when: every coordinator action, before and after."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    target: Mapped[str] = mapped_column(String(200))
    before: Mapped[str] = mapped_column(Text, default="")  # JSON, or '' when not meaningful
    after: Mapped[str] = mapped_column(Text, default="")


# -- Edge nodes and sync (an office with no internet collects, then syncs to central) ----


class EdgeNode(Base):
    """On central: an edge node enrolled for one campaign (`civicdial edge create`)."""

    __tablename__ = "edge_nodes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # random hex
    name: Mapped[str] = mapped_column(String(100), unique=True)
    campaign_id: Mapped[int] = mapped_column(Integer)
    region: Mapped[str] = mapped_column(String(100), default="")
    # The sync secret, sealed with central's encryption key: verifying an HMAC needs it.
    secret: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_contact_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                             nullable=True)
    events_received: Mapped[int] = mapped_column(Integer, default=0)
    # Highest sequence number such that every event up to it has been received.
    acked_seq: Mapped[int] = mapped_column(Integer, default=0)
    # The edge's own newest sequence number, as it said in its last batch.
    edge_seq: Mapped[int] = mapped_column(Integer, default=0)
    # Central's clock minus the edge's, in seconds, at the last batch.
    skew_seconds: Mapped[float | None] = mapped_column(nullable=True)
    # JSON {status: n}: the edge's outbound SMS by delivery outcome (counts, no numbers).
    sms_counts: Mapped[str] = mapped_column(Text, default="{}")
    sms_counts_seq: Mapped[int] = mapped_column(Integer, default=0)


class SyncReceived(Base):
    """On central: one event received from an edge, by its globally unique id, with a
    digest of its content (the same id with other content is a conflict)."""

    __tablename__ = "sync_received"
    __table_args__ = (Index("ix_sync_received_seq", "edge_id", "seq"),)

    event_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    edge_id: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    digest: Mapped[str] = mapped_column(String(64))
    result: Mapped[str] = mapped_column(String(20))  # accepted | rejected
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SyncConflict(Base):
    """On central: an event whose id was already received with other content: kept aside,
    never applied, listed by `civicdial edge list`."""

    __tablename__ = "sync_conflicts"
    __table_args__ = (UniqueConstraint("event_id", "digest", name="uq_sync_conflict"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    edge_id: Mapped[str] = mapped_column(String(32), index=True)
    event_id: Mapped[str] = mapped_column(String(200))
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    digest: Mapped[str] = mapped_column(String(64))
    content: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SyncNonce(Base):
    """On central: every request nonce an edge used; a second use is a replay."""

    __tablename__ = "sync_nonces"

    edge_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(64), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SyncChange(Base):
    """On central: the feed edges pull (`GET /api/v1/sync/changes?since=`). The cursor is
    this table's id, assigned by central, never a clock. (kind, key, digest) is unique:
    the same state is logged once, a changed one again."""

    __tablename__ = "sync_changes"
    __table_args__ = (UniqueConstraint("kind", "key", "digest", name="uq_sync_change"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(30))
    key: Mapped[str] = mapped_column(String(200))
    digest: Mapped[str] = mapped_column(String(64))
    campaign_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    region: Mapped[str] = mapped_column(String(100), default="")
    payload: Mapped[str] = mapped_column(Text)  # JSON
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EdgeEnrolment(Base):
    """On an edge: its enrolment (one row), the sync cursor and what the last attempts
    did. The sync secret is sealed with the edge's encryption key."""

    __tablename__ = "edge_enrolment"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    edge_id: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(100))
    campaign_slug: Mapped[str] = mapped_column(String(100))
    region: Mapped[str] = mapped_column(String(100), default="")
    central_url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(Text)
    cursor: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), default=0)
    acked_seq: Mapped[int] = mapped_column(Integer, default=0)  # what central said it holds
    last_success_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                             nullable=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                             nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    last_error_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                           nullable=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                             nullable=True)
    skew_seconds: Mapped[float | None] = mapped_column(nullable=True)
    conflicts: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    sms_counts: Mapped[str] = mapped_column(Text, default="{}")  # as last queued for central


class SyncOutbox(Base):
    """On an edge: every event its persist worker wrote, in the same transaction, waiting
    for central. seq is the per-edge sequence number."""

    __tablename__ = "sync_outbox"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                     primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(200), unique=True)
    body: Mapped[str] = mapped_column(Text)  # the event as central applies it (JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    acked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True,
                                                      index=True)
    result: Mapped[str] = mapped_column(String(20), default="")


class ConsoleSession(Base):
    """A browser signed in to the dashboard. The cookie holds a random id; only its SHA-256
    is stored, so a database dump signs nobody in. A session ends at its expiry, at sign-out
    (revoked_at) and with its API token (checked on every request)."""

    __tablename__ = "console_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    id_hash: Mapped[str] = mapped_column(String(64), unique=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
