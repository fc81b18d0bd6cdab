"""Coordinator JSON API under /api/v1 (bearer tokens, roles), described at
/api/v1/openapi.json. It mirrors the CLI and shares its code (gateway.coordination);
each change is one transaction with its audit entry.

Roles: admin (everything, tokens, audit) > coordinator (campaigns, contacts, invitations) >
viewer (read-only; never a phone number).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import Any

from flask import Blueprint, Response, current_app, g, request
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from gateway.channels.webhook import WebhookError, parse_json_body
from gateway.coordination.campaigns import (
    CampaignError,
    audit,
    campaign_view,
    create_campaign,
    create_token,
    get_campaign,
    hash_token,
    load_version,
    set_airtime,
    set_languages,
    set_quotas,
    set_reminders,
    set_version,
    transition,
)
from gateway.coordination.contacts import ContactFileError, import_contacts
from gateway.coordination.invitations import Audience, InvitationError, invite
from gateway.coordination.quotas import refresh as refresh_quotas
from gateway.coordination.quotas import report as quota_report
from gateway.coordination.status import campaign_status
from gateway.indicator import exports
from gateway.indicator.tally import NoSnapshot, Published, publish, run_tally
from gateway.interview.questionnaire import FormError, load_questionnaire
from gateway.interview.quota import define as define_quota
from gateway.store.db import MAX_INT
from gateway.store.models import (
    ApiToken,
    AuditEntry,
    Campaign,
    CampaignContact,
    Contact,
    OptOut,
    QuestionnaireVersion,
)
from gateway.web.openapi import OPENAPI

bp = Blueprint("api", __name__, url_prefix="/api/v1")
RANK = {"viewer": 0, "coordinator": 1, "admin": 2}
MAX_UPLOAD = 50 * 1024 * 1024  # a 100k-row contact CSV is ~5 MB
MAX_JSON = 1024 * 1024  # a JSON request body (the largest, a quota table, is a few KB)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, default=str), status=status, mimetype="application/json")


@bp.errorhandler(ApiError)
def _api_error(exc: ApiError) -> Response:
    return _json({"error": exc.message}, exc.status)


@bp.errorhandler(CampaignError)
def _campaign_error(exc: CampaignError) -> Response:
    status = 404 if str(exc).startswith("no campaign") else 409
    return _json({"error": str(exc)}, status)


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> Response:
    return _json({"error": exc.description or exc.name}, exc.code or 400)


def _engine() -> Any:
    return current_app.extensions["civicdial"].engine


def requires(role: str) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """Bearer token with at least `role`: 401 without a valid token, 403 below the role."""
    def decorate(view: Callable[..., Response]) -> Callable[..., Response]:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Response:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise ApiError(401, "send Authorization: Bearer <token>")
            with Session(_engine()) as db:
                row = db.scalar(select(ApiToken).where(
                    ApiToken.token_hash == hash_token(token.strip()),
                    ApiToken.revoked_at.is_(None)))
            if row is None:
                raise ApiError(401, "unknown or revoked token")
            if RANK[row.role] < RANK[role]:
                raise ApiError(403, f"this needs the {role} role; the token is {row.role}")
            g.role, g.actor = row.role, f"token:{row.name}"
            return view(*args, **kwargs)
        return wrapped
    return decorate


def _body(fields: dict[str, type | tuple[type, ...]], required: set[str]) -> dict[str, Any]:
    """A JSON object with only these fields, of these types."""
    if not request.is_json:
        raise ApiError(400, "send a JSON object with Content-Type: application/json")
    try:
        data = parse_json_body(request, max_bytes=MAX_JSON)
    except WebhookError as exc:
        raise ApiError(exc.status, exc.reason) from None
    if not isinstance(data, dict):
        raise ApiError(400, "send a JSON object with Content-Type: application/json")
    unknown = set(data) - set(fields)
    if unknown:
        raise ApiError(422, f"unknown field(s): {', '.join(sorted(unknown))}")
    missing = required - set(data)
    if missing:
        raise ApiError(422, f"missing field(s): {', '.join(sorted(missing))}")
    for name, value in data.items():
        expected = fields[name]
        if isinstance(value, bool) and bool not in (
                expected if isinstance(expected, tuple) else (expected,)):
            raise ApiError(422, f"{name} has the wrong type")
        if not isinstance(value, expected):
            raise ApiError(422, f"{name} has the wrong type")
        if isinstance(value, str) and (len(value) > 300 or any(ord(c) < 32 for c in value)):
            raise ApiError(422, f"{name}: at most 300 characters, no control characters")
        if isinstance(value, int) and not 0 <= value <= MAX_INT:
            raise ApiError(422, f"{name} must be between 0 and {MAX_INT}")
    return data


def _upload() -> tuple[bytes, str]:
    """A file from multipart field 'file'."""
    if request.content_length and request.content_length > MAX_UPLOAD:
        raise ApiError(413, "file too large")
    file = request.files.get("file")
    if file is None:
        raise ApiError(400, "send the file as multipart/form-data field 'file'")
    return file.read(), file.filename or "upload"


def _page() -> tuple[int, int]:
    try:
        page = int(request.args.get("page", "1"))
        per_page = int(request.args.get("per_page", "50"))
    except ValueError:
        raise ApiError(422, "page and per_page must be whole numbers") from None
    if not 1 <= page <= 1_000_000 or not 1 <= per_page <= 500:
        raise ApiError(422, "1 <= page <= 1000000 and 1 <= per_page <= 500")
    return page, per_page


@bp.get("/openapi.json")
def openapi() -> Response:
    """The API description (no token needed)."""
    return _json(OPENAPI)


@bp.get("/questionnaires")
@requires("viewer")
def list_questionnaires() -> Response:
    with Session(_engine()) as db:
        rows = db.scalars(select(QuestionnaireVersion).order_by(
            QuestionnaireVersion.created_at)).all()
        return _json([{"version": q.version, "title": q.title, "form_id": q.form_id,
                       "languages": q.languages.split(","), "questions": q.question_count}
                      for q in rows])


@bp.post("/questionnaires")
@requires("coordinator")
def upload_questionnaire() -> Response:
    data, filename = _upload()
    try:
        form = load_questionnaire(data, filename)
    except FormError as exc:
        return _json({"error": exc.message, "sheet": exc.sheet, "row": exc.row,
                      "column": exc.column}, 422)
    with Session(_engine()) as db, db.begin():
        _, new = load_version(db, form, g.actor)
    return _json({"version": form.version, "new": new, "title": form.title,
                  "languages": [lang.key for lang in form.languages],
                  "questions": form.asked}, 201 if new else 200)


@bp.get("/campaigns")
@requires("viewer")
def list_campaigns() -> Response:
    with Session(_engine()) as db:
        return _json([campaign_view(c) for c in db.scalars(
            select(Campaign).order_by(Campaign.id))])


@bp.post("/campaigns")
@requires("coordinator")
def new_campaign() -> Response:
    body = _body({"slug": str, "name": str, "questionnaire_version": str,
                  "target_size": int}, {"slug", "name", "questionnaire_version"})
    with Session(_engine(), expire_on_commit=False) as db, db.begin():
        try:
            campaign = create_campaign(db, g.actor, body["slug"], body["name"],
                                       body["questionnaire_version"], body.get("target_size"))
        except CampaignError as exc:
            raise ApiError(409 if "exists" in str(exc) else 422, str(exc)) from None
        return _json(campaign_view(campaign), 201)


@bp.get("/campaigns/<slug>")
@requires("viewer")
def show_campaign(slug: str) -> Response:
    with Session(_engine()) as db:
        return _json(campaign_view(get_campaign(db, slug)))


@bp.patch("/campaigns/<slug>")
@requires("coordinator")
def update_campaign(slug: str) -> Response:
    """Questionnaire version (draft or paused campaigns), reminder schedule and airtime
    thank-you settings; all or nothing."""
    body = _body({"reminder_hours": int, "reminder_max": int,
                  "airtime": (dict, type(None)), "questionnaire_version": str,
                  "languages": (list, type(None))}, set())
    if not all(isinstance(code, str) for code in body.get("languages") or []):
        raise ApiError(422, 'languages: a list of language codes, e.g. ["en", "tw"], or null '
                            "for all of the questionnaire's")
    airtime = body.get("airtime")
    if isinstance(airtime, dict):
        extra = set(airtime) - {"currency", "amount", "budget"}
        if extra or not all(isinstance(airtime.get(k), str)
                            for k in ("currency", "amount", "budget")):
            raise ApiError(422, "airtime: an object with string fields currency, amount, "
                                "budget (e.g. GHS, 2.00, 500.00), or null to turn it off")
    with Session(_engine(), expire_on_commit=False) as db, db.begin():
        with _unprocessable():
            if "questionnaire_version" in body:
                campaign = get_campaign(db, slug)
                if body["questionnaire_version"] != campaign.questionnaire_version:
                    if "languages" in body:
                        campaign.languages = ""  # chosen anew below, from the new version
                    set_version(db, g.actor, slug, body["questionnaire_version"])
            if "languages" in body:
                set_languages(db, g.actor, slug, body["languages"])
            if "reminder_hours" in body or "reminder_max" in body:
                set_reminders(db, g.actor, slug, body.get("reminder_hours"),
                              body.get("reminder_max"))
            if "airtime" in body:
                if airtime is None:
                    set_airtime(db, g.actor, slug, None)
                else:
                    set_airtime(db, g.actor, slug, airtime["currency"], airtime["amount"],
                                airtime["budget"])
        return _json(campaign_view(get_campaign(db, slug)))


@contextmanager
def _unprocessable() -> Iterator[None]:
    """A setting that does not fit is the request's fault (422); a missing campaign 404."""
    try:
        yield
    except CampaignError as exc:
        if str(exc).startswith("no campaign"):
            raise
        raise ApiError(422, str(exc)) from None


@bp.get("/campaigns/<slug>/quotas")
@requires("viewer")
def show_quotas(slug: str) -> Response:
    with Session(_engine()) as db:
        campaign = get_campaign(db, slug)
        return _json(quota_report(_engine(), campaign) or {"on": [], "cells": []})


@bp.put("/campaigns/<slug>/quotas")
@requires("coordinator")
def put_quotas(slug: str) -> Response:
    """Replace the quotas: {"on": ["region", "sex"], "cells": [{"values": {"region":
    "ashanti", "sex": "female"}, "target": 120}, ...]}."""
    body = _body({"on": list, "cells": list}, {"on", "cells"})
    on, cells = body["on"], body["cells"]
    if not all(isinstance(name, str) for name in on) or not all(
            isinstance(c, dict) and set(c) == {"values", "target"}
            and isinstance(c["values"], dict) and isinstance(c["target"], int)
            and not isinstance(c["target"], bool)
            and all(isinstance(v, str) for v in c["values"].values()) for c in cells):
        raise ApiError(422, 'on: question names; cells: [{"values": {question: choice}, '
                            '"target": whole number}]')
    return _replace_quotas(slug, lambda form: define_quota(
        form, on, [(c["values"], c["target"]) for c in cells]))


@bp.delete("/campaigns/<slug>/quotas")
@requires("coordinator")
def delete_quotas(slug: str) -> Response:
    return _replace_quotas(slug, None)


def _replace_quotas(slug: str, define: Callable[[Any], Any] | None) -> Response:
    services = current_app.extensions["civicdial"]
    with Session(services.engine, expire_on_commit=False) as db, db.begin():
        with _unprocessable():
            campaign = set_quotas(db, g.actor, slug, define)
    # Published at once so the webhooks screen by the new quotas (the worker also would).
    refresh_quotas(services.engine, services.redis, services.settings.redis_prefix,
                   [campaign.id])
    return _json(quota_report(services.engine, campaign) or {"on": [], "cells": []})


@bp.post("/campaigns/<slug>/<any(open, pause, close):verb>")
@requires("coordinator")
def move_campaign(slug: str, verb: str) -> Response:
    to = {"open": "open", "pause": "paused", "close": "closed"}[verb]
    with Session(_engine(), expire_on_commit=False) as db, db.begin():
        return _json(campaign_view(transition(db, g.actor, slug, to)))


@bp.get("/campaigns/<slug>/stats")
@requires("viewer")
def campaign_stats(slug: str) -> Response:
    services = current_app.extensions["civicdial"]
    report = campaign_status(services.engine, services.store, timedelta(
        seconds=services.settings.outbound_overdue_seconds))
    match = [c for c in report["campaigns"] if c["slug"] == slug]
    if not match:
        raise ApiError(404, f"no campaign {slug!r}")
    return _json(match[0])


@bp.post("/campaigns/<slug>/contacts")
@requires("coordinator")
def upload_contacts(slug: str) -> Response:
    services = current_app.extensions["civicdial"]
    with Session(services.engine) as db:
        campaign_id = get_campaign(db, slug).id
    data, _ = _upload()
    try:
        result = import_contacts(services.engine, campaign_id, data,
                                 pseudonym_key=services.settings.pseudonym_key, box=services.box,
                                 default_region=services.settings.default_region)
    except ContactFileError as exc:
        raise ApiError(422, str(exc)) from None
    with Session(services.engine) as db, db.begin():
        audit(db, g.actor, "contacts.import", slug,
              after={"rows": result.rows, "imported": result.imported,
                     "rejected": len(result.rejected)})
    return _json(result.as_dict())


@bp.post("/campaigns/<slug>/invitations")
@requires("coordinator")
def send_invitations(slug: str) -> Response:
    """Invite the campaign's contacts; an optional JSON body narrows who:
    {"region": ..., "language": ..., "attributes": {field: value}, "limit": n}."""
    services = current_app.extensions["civicdial"]
    audience = Audience()
    if request.content_length or request.is_json:
        body = _body({"region": str, "language": str, "attributes": dict, "limit": int},
                     set())
        attributes = body.get("attributes", {})
        if not all(isinstance(v, str) for v in attributes.values()):
            raise ApiError(422, "attributes: an object of field names to text values")
        if body.get("limit") == 0:
            raise ApiError(422, "limit must be at least 1")
        audience = Audience(body.get("region", ""), body.get("language", ""),
                            tuple(attributes.items()), body.get("limit"))
    with Session(services.engine) as db:
        get_campaign(db, slug)
    try:
        result = invite(services.engine, services.redis, slug,
                        prefix=services.settings.redis_prefix,
                        backlog=services.settings.outbox_backlog, audience=audience)
    except InvitationError as exc:
        raise ApiError(409, str(exc)) from None
    with Session(services.engine) as db, db.begin():
        audit(db, g.actor, "campaign.invite", slug,
              after={**result.as_dict(), "audience": audience.as_dict()})
    return _json(result.as_dict(), 202)


EXPORTS = exports.FORMATS


def _run_audited(slug: str, action: str, work: Callable[[Any, int], Any],
                 after: Callable[[Any], dict[str, Any] | None]) -> Any:
    """Run a campaign's long action, then write its audit entry (only if it succeeded)."""
    services = current_app.extensions["civicdial"]
    with Session(services.engine) as db:
        campaign_id = get_campaign(db, slug).id
    result = work(services, campaign_id)
    with Session(services.engine) as db, db.begin():
        audit(db, g.actor, action, slug, after=after(result))
    return result


@bp.post("/campaigns/<slug>/tally")
@requires("coordinator")
def tally(slug: str) -> Response:
    snap = _run_audited(slug, "campaign.tally",
                        lambda services, cid: run_tally(services.engine, cid),
                        lambda snap: {"snapshot": snap.version})
    return _json({"snapshot": snap.version, "n_interviews": snap.n_interviews,
                  "n_completed": snap.n_completed}, 201)


@bp.post("/campaigns/<slug>/publish")
@requires("coordinator")
def publish_tally(slug: str) -> Response:
    def work(services: Any, campaign_id: int) -> Published:
        try:
            return publish(services.settings, services.engine, services.redis, campaign_id)
        except LookupError as exc:
            raise ApiError(409, str(exc)) from None

    done = _run_audited(slug, "campaign.publish", work, lambda _: None)
    return _json({"snapshot": done.version, "results_texts": done.fields,
                  "messages_queued": done.queued})


@bp.get("/campaigns/<slug>/export")
@requires("viewer")
def export(slug: str) -> Response:
    """The indicator table (csv, xlsx, sdmx) of the latest or a given snapshot; the
    pseudonymous microdata needs the coordinator role."""
    fmt = request.args.get("format", "csv")
    if fmt not in EXPORTS:
        raise ApiError(422, f"format must be one of {', '.join(EXPORTS)}")
    if fmt == "microdata" and RANK[g.role] < RANK["coordinator"]:
        raise ApiError(403, "microdata needs the coordinator role")
    version = request.args.get("snapshot")
    # isdigit() alone lets "²" through, which int() refuses.
    if version is not None and (not (version.isascii() and version.isdigit())
                                or int(version) > MAX_INT):
        raise ApiError(422, "snapshot must be a version number")
    engine = _engine()
    with Session(engine) as db:
        campaign = get_campaign(db, slug)
        db.expunge(campaign)
    try:
        data = exports.export_bytes(engine, campaign, fmt, int(version) if version else None)
    except NoSnapshot as exc:
        raise ApiError(404, str(exc)) from None
    return Response(data, mimetype=EXPORTS[fmt][0], headers={
        "Content-Disposition": f'attachment; filename="{slug}-{fmt}.{EXPORTS[fmt][1]}"'})


@bp.get("/contacts")
@requires("viewer")
def list_contacts() -> Response:
    page, per_page = _page()
    services = current_app.extensions["civicdial"]
    with Session(services.engine) as db:
        total = db.scalar(select(func.count()).select_from(Contact)) or 0
        rows = db.execute(
            select(Contact, OptOut.respondent.label("stopped"))
            .outerjoin(OptOut, OptOut.respondent == Contact.respondent)
            .order_by(Contact.id).offset((page - 1) * per_page).limit(per_page)).all()
        campaigns: dict[int, list[int]] = {}
        for cc in db.scalars(select(CampaignContact).where(
                CampaignContact.contact_id.in_([c.id for c, _ in rows]))):
            campaigns.setdefault(cc.contact_id, []).append(cc.campaign_id)
    items = []
    for contact, stopped in rows:
        item = {"id": contact.id, "pseudonym": contact.respondent,
                "language": contact.language, "region": contact.region,
                "attributes": json.loads(contact.attributes or "{}"),
                "opted_out": stopped is not None,
                "campaigns": sorted(campaigns.get(contact.id, []))}
        if g.role != "viewer":  # viewers never see a number
            item["phone"] = services.box.open(contact.recipient)
        items.append(item)
    return _json({"page": page, "per_page": per_page, "total": total, "items": items})


@bp.post("/contacts/<int:contact_id>/opt-out")
@requires("coordinator")
def opt_out(contact_id: int) -> Response:
    services = current_app.extensions["civicdial"]
    with Session(services.engine) as db, db.begin():
        contact = db.get(Contact, contact_id) if contact_id <= MAX_INT else None
        if contact is None:
            raise ApiError(404, f"no contact {contact_id}")
        respondent = contact.respondent
        if db.get(OptOut, respondent) is None:
            db.add(OptOut(respondent=respondent, at=datetime.now(UTC)))
            audit(db, g.actor, "contact.opt_out", str(contact_id))
    # The hop and the send jobs read opt-outs from Redis.
    services.store.r.set(services.store.optout_key(respondent), "1")
    return _json({"id": contact_id, "opted_out": True})


@bp.get("/audit")
@requires("admin")
def audit_log() -> Response:
    page, per_page = _page()
    with Session(_engine()) as db:
        rows = db.scalars(select(AuditEntry).order_by(AuditEntry.id.desc())
                          .offset((page - 1) * per_page).limit(per_page)).all()
        return _json([{"at": a.at, "actor": a.actor, "action": a.action, "target": a.target,
                       "before": json.loads(a.before) if a.before else None,
                       "after": json.loads(a.after) if a.after else None} for a in rows])


@bp.post("/tokens")
@requires("admin")
def new_token() -> Response:
    body = _body({"name": str, "role": str}, {"name", "role"})
    with Session(_engine()) as db, db.begin():
        try:
            token = create_token(db, g.actor, body["name"], body["role"])
        except CampaignError as exc:
            raise ApiError(422, str(exc)) from None
    return _json({"token": token, "name": body["name"], "role": body["role"]}, 201)
