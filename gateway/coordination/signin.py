"""Dashboard sign-in sessions: the browser keeps a random session id, never the API token.

Signing in with a token opens a session (its id's SHA-256 stored, an expiry); every page
looks the session up together with its token, so sign-out, expiry and a revoked token each
end it at the next click, and a copied cookie is worth nothing afterwards.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from gateway.coordination.campaigns import audit, hash_token
from gateway.store.models import ApiToken, ConsoleSession

RANK = {"viewer": 0, "coordinator": 1, "admin": 2}
MAX_TOKEN = 200  # issued tokens are 46 characters; anything far longer is not one
MAX_SESSION_ID = 100


@dataclass(frozen=True)
class SignedIn:
    """Who a session belongs to."""

    name: str
    role: str
    token_id: int
    csrf: str  # the form token of this session (derived from its id, never stored)

    def may(self, role: str) -> bool:
        return RANK.get(self.role, -1) >= RANK[role]


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def csrf_for(session_id: str) -> str:
    """The session's form token: unguessable without the id, and not derivable from the
    stored hash (a different message)."""
    return hashlib.sha256(b"csrf:" + session_id.encode()).hexdigest()


def token_row(db: Session, token: str) -> ApiToken | None:
    """A known, unrevoked token of a known role, or None."""
    token = token.strip()
    if not token or len(token) > MAX_TOKEN:
        return None
    row = db.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token),
                                           ApiToken.revoked_at.is_(None)))
    if row is None or row.role not in RANK:
        return None
    return row


def open_session(db: Session, token: str, hours: int) -> str | None:
    """A new session for a valid token; returns the id for the cookie (shown once)."""
    row = token_row(db, token)
    if row is None:
        return None
    session_id = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    db.add(ConsoleSession(id_hash=_hash(session_id), token_id=row.id, created_at=now,
                          expires_at=now + timedelta(hours=hours)))
    audit(db, f"token:{row.name}", "console.sign_in", row.name)
    return session_id


def check_session(db: Session, session_id: str) -> SignedIn | None:
    """The session's owner while it is unexpired, not signed out, and its token valid."""
    if not session_id or len(session_id) > MAX_SESSION_ID:
        return None
    found = db.execute(
        select(ConsoleSession, ApiToken)
        .join(ApiToken, ApiToken.id == ConsoleSession.token_id)
        .where(ConsoleSession.id_hash == _hash(session_id),
               ConsoleSession.revoked_at.is_(None), ApiToken.revoked_at.is_(None))).first()
    if found is None:
        return None
    session, token = found
    expires = session.expires_at
    if expires.tzinfo is None:  # SQLite gives naive UTC
        expires = expires.replace(tzinfo=UTC)
    if expires <= datetime.now(UTC) or token.role not in RANK:
        return None
    return SignedIn(token.name, token.role, token.id, csrf_for(session_id))


def csrf_ok(session_id: str, sent: str) -> bool:
    return bool(session_id) and hmac.compare_digest(csrf_for(session_id).encode(),
                                                    sent.encode())


def close_session(db: Session, session_id: str) -> bool:
    """Sign out: the session stops working everywhere its cookie was copied to."""
    if not session_id or len(session_id) > MAX_SESSION_ID:
        return False
    done = db.execute(update(ConsoleSession)
                      .where(ConsoleSession.id_hash == _hash(session_id),
                             ConsoleSession.revoked_at.is_(None))
                      .values(revoked_at=datetime.now(UTC)))
    return bool(done.rowcount)


@dataclass(frozen=True)
class Revoked:
    """What revoking took away: the tokens (id, name, role) and their open sessions."""

    tokens: tuple[tuple[int, str, str], ...]
    sessions: int


def revoke_tokens(db: Session, actor: str, ref: str) -> Revoked:
    """Revoke the unrevoked tokens named `ref` (or the one numbered '#7'), and end every
    console session opened with them: a browser signed in with a revoked token is signed
    out at its next click, and its cookie is worth nothing afterwards."""
    now = datetime.now(UTC)
    digits = ref.lstrip("#")
    which = (ApiToken.id == int(digits)) if ref.startswith("#") and digits.isdecimal() \
        and len(digits) < 10 else (ApiToken.name == ref)
    rows = db.scalars(select(ApiToken).where(which, ApiToken.revoked_at.is_(None))
                      .order_by(ApiToken.id)).all()
    sessions = 0
    for row in rows:
        row.revoked_at = now
        sessions += db.execute(update(ConsoleSession).where(
            ConsoleSession.token_id == row.id, ConsoleSession.revoked_at.is_(None),
            ConsoleSession.expires_at > now).values(revoked_at=now)).rowcount
        db.execute(update(ConsoleSession).where(ConsoleSession.token_id == row.id,
                                                ConsoleSession.revoked_at.is_(None))
                   .values(revoked_at=now))  # expired ones too: nothing stays open
        audit(db, actor, "token.revoke", row.name, after={"role": row.role, "id": row.id})
    return Revoked(tuple((r.id, r.name, r.role) for r in rows), sessions)


def revoke_token(db: Session, actor: str, name: str) -> int:
    """Revoke a token by name, and every session opened with it; returns how many tokens."""
    return len(revoke_tokens(db, actor, name).tokens)
