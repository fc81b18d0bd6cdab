"""Edge nodes: enrolment (the passphrase-protected bundle), the request signature both
sides compute, and central's list of its edges.

An edge is a node in an office with no internet (`civicdial up`, embedded) that collects
for one campaign and syncs to central later. Central makes it with `civicdial edge create`:
an id, a sync secret (HMAC key of every sync request), central's pseudonym key (one person
has one pseudonym everywhere) and central's URL, written to a bundle encrypted with a key
derived from a passphrase (scrypt, then AES-GCM). `civicdial edge join` opens it on the edge.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from gateway.config import Settings
from gateway.store.crypto import NumberBox
from gateway.store.db import stored_iso, stored_utc
from gateway.store.models import Campaign, EdgeEnrolment, EdgeNode, Interview, SyncConflict

BUNDLE_FORMAT = "civicdial-edge-bundle/1"
# scrypt cost: about 0.1 s and 32 MiB per try on a laptop, so guessing passphrases is slow.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
MIN_PASSPHRASE = 12

# Request headers of the sync protocol.
H_EDGE = "X-CivicDial-Edge"
H_TIMESTAMP = "X-CivicDial-Timestamp"
H_NONCE = "X-CivicDial-Nonce"
H_SIGNATURE = "X-CivicDial-Signature"


class EdgeError(Exception):
    """A refused enrolment step, said plainly to the operator."""


@dataclass(frozen=True)
class Bundle:
    """What an edge needs to join: who it is, its secret, and where central is."""

    edge_id: str
    name: str
    campaign: str
    region: str
    secret: str
    pseudonym_key: str
    central_url: str
    created_at: str
    # Central's change feed as of enrolment (questionnaire, campaign, contacts, ...), so
    # an edge can join with no link at all; `cursor` is where it continues.
    changes: list[dict[str, Any]] = field(default_factory=list)
    cursor: int = 0


def _kdf(salt: bytes) -> Scrypt:
    return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)


def seal_bundle(bundle: Bundle, passphrase: str) -> bytes:
    if len(passphrase) < MIN_PASSPHRASE:
        raise EdgeError(f"the passphrase must have at least {MIN_PASSPHRASE} characters")
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    key = _kdf(salt).derive(passphrase.encode())
    sealed = AESGCM(key).encrypt(nonce, json.dumps(asdict(bundle)).encode(),
                                 BUNDLE_FORMAT.encode())
    b64 = base64.b64encode
    return json.dumps({"format": BUNDLE_FORMAT, "kdf": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R,
                       "p": SCRYPT_P, "salt": b64(salt).decode(), "nonce": b64(nonce).decode(),
                       "ciphertext": b64(sealed).decode()}, indent=1).encode() + b"\n"


def open_bundle(data: bytes, passphrase: str) -> Bundle:
    try:
        outer = json.loads(data)
        if outer.get("format") != BUNDLE_FORMAT:
            raise EdgeError("not a CivicDial edge bundle")
        salt, nonce, sealed = (base64.b64decode(outer[k]) for k in ("salt", "nonce",
                                                                     "ciphertext"))
        kdf = Scrypt(salt=salt, length=32, n=int(outer["n"]), r=int(outer["r"]),
                     p=int(outer["p"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EdgeError(f"not a CivicDial edge bundle ({exc.__class__.__name__})") from None
    try:
        plain = AESGCM(kdf.derive(passphrase.encode())).decrypt(nonce, sealed,
                                                                BUNDLE_FORMAT.encode())
    except InvalidTag:
        raise EdgeError("wrong passphrase, or the bundle was altered") from None
    return Bundle(**json.loads(plain))


def transport_box(secret: str) -> NumberBox:
    """Numbers sent down to an edge are sealed with a key only it and central know; the
    edge re-seals them with its own encryption key at rest."""
    return NumberBox(b"civicdial-edge-contacts:" + secret.encode())


def signature(secret: str, method: str, path: str, edge: str, timestamp: str, nonce: str,
              body: bytes) -> str:
    """Lowercase hex HMAC-SHA256 over the method, the path with its query, the edge, the
    edge's timestamp, the nonce and the body's SHA-256: nothing of a request can be
    changed or moved to another URL without breaking it."""
    message = "\n".join((method.upper(), path, edge, timestamp, nonce,
                         hashlib.sha256(body).hexdigest())).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_headers(edge: str, secret: str, method: str, path: str, body: bytes,
                   now: float | None = None) -> dict[str, str]:
    timestamp = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(16)
    return {H_EDGE: edge, H_TIMESTAMP: timestamp, H_NONCE: nonce,
            H_SIGNATURE: signature(secret, method, path, edge, timestamp, nonce, body)}


# What `edge list`, `edge revoke NAME` and the bundle's file name can all carry as it is.
_EDGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")


def new_edge(db: Session, settings: Settings, name: str, campaign_slug: str, region: str,
             central_url: str) -> tuple[EdgeNode, Bundle]:
    """A new edge node for a campaign and the bundle to seal and hand over, checked but
    not stored: `edge create` writes the bundle first and stores the edge after it
    (enrol_edge), so a bundle that cannot be written leaves no edge nobody can join,
    whose name a retry would find taken."""
    joined = db.get(EdgeEnrolment, 1)
    if joined is not None:
        # Its edges would sync to it, and it to central: a chain nothing here follows.
        raise EdgeError(f"this node is the edge {joined.name!r}: create edges on central")
    if not _EDGE_NAME.fullmatch(name):
        raise EdgeError(f"edge name {name!r}: 1-64 letters, digits, spaces, '.', '-' or '_', "
                        "starting with a letter or digit")
    campaign = db.scalar(select(Campaign).where(Campaign.slug == campaign_slug))
    if campaign is None:
        raise EdgeError(f"no campaign {campaign_slug!r}")
    if db.scalar(select(EdgeNode).where(EdgeNode.name == name)) is not None:
        raise EdgeError(f"an edge named {name!r} exists already")
    if not central_url.startswith(("http://", "https://")):
        raise EdgeError("central's URL must start with https:// (or http:// on a LAN)")
    secret = secrets.token_urlsafe(32)
    edge = EdgeNode(id=secrets.token_hex(16), name=name, campaign_id=campaign.id,
                    region=region, secret=NumberBox(settings.encryption_key).seal(secret))
    return edge, Bundle(edge_id=edge.id, name=name, campaign=campaign_slug, region=region,
                        secret=secret, pseudonym_key=settings.pseudonym_key.decode(),
                        central_url=central_url.rstrip("/"),
                        created_at=datetime.now(UTC).isoformat(timespec="seconds"))


def enrol_edge(db: Session, edge: EdgeNode) -> None:
    """Store an edge made by new_edge; its name is checked again, as another `edge create`
    may have taken it since."""
    if db.scalar(select(EdgeNode.id).where(EdgeNode.name == edge.name)) is not None:
        raise EdgeError(f"an edge named {edge.name!r} exists already")
    db.add(edge)
    db.flush()


def create_edge(db: Session, settings: Settings, name: str, campaign_slug: str, region: str,
                central_url: str) -> Bundle:
    """Enrol a new edge node for a campaign; returns the bundle to seal and hand over."""
    edge, bundle = new_edge(db, settings, name, campaign_slug, region, central_url)
    enrol_edge(db, edge)
    return bundle


def revoke_edge(db: Session, name: str) -> EdgeNode:
    edge = db.scalar(select(EdgeNode).where(EdgeNode.name == name))
    if edge is None:
        raise EdgeError(f"no edge named {name!r}")
    if edge.revoked_at is None:
        edge.revoked_at = datetime.now(UTC)
    return edge


def edge_secret(settings: Settings, edge: EdgeNode) -> str:
    return NumberBox(settings.encryption_key).open(edge.secret)


def list_edges(engine: Engine) -> list[dict[str, Any]]:
    """Central's view of its edges: last contact, events received, lag, conflicts."""
    with Session(engine) as db:
        conflicts = dict(db.execute(select(SyncConflict.edge_id, func.count())
                                    .group_by(SyncConflict.edge_id)).all())
        slugs = dict(db.execute(select(Campaign.id, Campaign.slug)).all())
        rows = db.scalars(select(EdgeNode).order_by(EdgeNode.name)).all()
        return [{
            "name": e.name, "id": e.id, "campaign": slugs.get(e.campaign_id), "region": e.region,
            "state": "revoked" if e.revoked_at else "active",
            "last_contact_at": stored_iso(e.last_contact_at), "events_received": e.events_received,
            "acked_seq": e.acked_seq, "edge_seq": e.edge_seq,
            # Events the edge had numbered at its last contact that central does not
            # hold yet (what it collected since is unknown until it calls again).
            "lag_events": max(0, e.edge_seq - e.acked_seq),
            "lag_seconds": (None if e.last_contact_at is None else
                            round((datetime.now(UTC) - stored_utc(e.last_contact_at))
                                  .total_seconds())),
            "skew_seconds": e.skew_seconds, "conflicts": conflicts.get(e.id, 0),
            "sms": json.loads(e.sms_counts or "{}"),
        } for e in rows]


def store_enrolment(engine: Engine, settings: Settings, bundle: Bundle) -> None:
    """On the edge: keep the enrolment (secret sealed with the edge's own key) and take
    central's pseudonym key, unless this node already collected under another one."""
    key_file = settings.data_dir / "pseudonym.key"
    with Session(engine) as db, db.begin():
        existing = db.get(EdgeEnrolment, 1)
        if db.scalar(select(func.count()).select_from(EdgeNode)):
            # Central syncing with itself would count its own interviews as an edge's.
            raise EdgeError("this node enrols edges (it is central): join on the edge "
                            "machine, from its own data dir")
        if existing is not None and existing.edge_id != bundle.edge_id:
            raise EdgeError(f"this node is already the edge {existing.name!r}")
        if settings.pseudonym_key != bundle.pseudonym_key.encode():
            if db.scalar(select(func.count()).select_from(Interview)):
                raise EdgeError("this node already holds interviews made under another "
                                "pseudonym key; join from a fresh data dir")
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            key_file.write_text(bundle.pseudonym_key)
            key_file.chmod(0o600)
        sealed = NumberBox(settings.encryption_key).seal(bundle.secret)
        if existing is None:
            db.add(EdgeEnrolment(id=1, edge_id=bundle.edge_id, name=bundle.name,
                                 campaign_slug=bundle.campaign, region=bundle.region,
                                 central_url=bundle.central_url, secret=sealed))
        else:
            existing.central_url, existing.secret = bundle.central_url, sealed


def enrolment(engine: Engine) -> EdgeEnrolment | None:
    with Session(engine, expire_on_commit=False) as db:
        return db.get(EdgeEnrolment, 1)
