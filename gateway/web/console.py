"""The coordinator console: the dashboard's pages that act. Every form goes through the
same domain functions as the API and the CLI (gateway.coordination, gateway.indicator),
needs the session's CSRF token and a role (viewer reads, coordinator acts, admin manages
tokens and reads the audit log), and is audited. Long work (contact import, invitations,
the tally) runs as RQ jobs whose progress the page polls from our own static script."""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from sqlalchemy import case, exists, func, or_, select
from sqlalchemy.orm import Session
from twilio.request_validator import RequestValidator
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from gateway.channels import android
from gateway.coordination.campaigns import (
    CampaignError,
    audit,
    campaign_form,
    campaign_view,
    create_campaign,
    get_campaign,
    load_version,
    set_airtime,
    set_languages,
    set_part_budget,
    set_quotas,
    set_reminders,
    set_schedule,
    transition,
)
from gateway.coordination.channels import (
    PROVIDERS,
    bind_channel,
    channel_health,
    channel_urls,
    unbind_channel,
)
from gateway.coordination.invitations import Audience, InvitationError, preview
from gateway.coordination.quotas import refresh as refresh_quotas
from gateway.coordination.status import campaign_status
from gateway.indicator import exports
from gateway.indicator.estimates import AREAS, BREAKDOWNS
from gateway.indicator.tally import cells_of, latest_snapshot, publish
from gateway.interview.engine import Rules, cell_key, longest_path_screens
from gateway.interview.questionnaire import FormError, Questionnaire, collect_form_errors
from gateway.interview.quota import Quota
from gateway.interview.quota import define as define_quota
from gateway.interview.quota import read_csv as read_quota_csv
from gateway.interview.segments import count_segments, interview_cost
from gateway.phones import BadPhoneNumber, to_e164
from gateway.store.models import (
    Answer,
    AuditEntry,
    Campaign,
    CampaignContact,
    Channel,
    Contact,
    Interview,
    OptOut,
    OutboundMessage,
    QuestionnaireVersion,
    TallySnapshot,
    UssdPartBreak,
)
from gateway.store.sessions import (
    SIMULATOR_NUMBERS,
    mask_phone,
    pseudonym,
    real_respondent,
)
from gateway.web.charts import bar_chart, bar_of, count_chart
from gateway.web.dashboard import actor, acts, quota_table, refused_page, signed_in
from workers import console_jobs

bp = Blueprint("console", __name__, url_prefix="/dashboard", template_folder="templates")
bp.register_error_handler(HTTPException, refused_page)
MAX_FIELD = 300
MAX_GRID = 200  # quota cells shown for editing: beyond, only the cells already set
EXPORTS = exports.FORMATS
# Providers the phone simulator speaks (each in its own wire format); Android's SMS comes
# from a phone on the LAN and is not simulated here.
SIMULATED = ("africastalking", "twilio", "hubtel", "arkesel")
MEASURE_LABELS = {"index": "Attribute index", "satisfied": "Satisfied overall"}
ATTRIBUTE_LABELS = {"acc": "Accessibility", "aff": "Affordability", "fac": "Facilities",
                    "eq": "Equal treatment", "court": "Courtesy", "teach": "Teaching",
                    "eff": "Effectiveness", "time": "Timeliness"}


def _services() -> Any:
    return current_app.extensions["civicdial"]


def _text(name: str, required: bool = False, limit: int = MAX_FIELD) -> str:
    value = request.form.get(name, "").strip()
    if required and not value:
        abort(422, f"{name.replace('_', ' ')} is required")
    if len(value) > limit or any(ord(c) < 32 for c in value):
        abort(422, f"{name.replace('_', ' ')}: at most {limit} characters, no control "
                   "characters")
    return value


def _int(name: str) -> int | None:
    value = _text(name)
    if not value:
        return None
    if not value.isdigit() or len(value) > 9:
        abort(422, f"{name.replace('_', ' ')} must be a whole number")
    return int(value)


def _campaign(db: Session, slug: str) -> Campaign:
    """The campaign a page's URL names, or a 404 page that says so."""
    try:
        return get_campaign(db, slug)
    except CampaignError:
        abort(404, f"No campaign {slug}.")


def _refused(message: str, back: str, status: int = 409) -> tuple[str, int]:
    return render_template("dashboard_refused.html", message=message, back=back), status


def _act(work: Callable[[Session], Any], *, refused: str, back: str, done: str,
         status: int = 422, after: Callable[[Any], None] | None = None
         ) -> BaseResponse | tuple[str, int]:
    """A form's domain action in one transaction: a CampaignError keeps nothing and shows
    `refused: <why>` with a link back; otherwise the webhooks' registry is refreshed (and
    `after` gets what the work returned, once committed) and the browser goes to `done`."""
    with Session(_services().engine, expire_on_commit=False) as db:
        try:
            with db.begin():
                result = work(db)
        except CampaignError as exc:
            return _refused(f"{refused}: {exc}", back, status)
    if after is not None:
        after(result)
    _services().registry.refresh()
    return redirect(done, 303)


# -- questionnaires -----------------------------------------------------------------------

@bp.get("/questionnaires")
@signed_in
def questionnaires() -> str:
    with Session(_services().engine) as db:
        rows = db.scalars(select(QuestionnaireVersion)
                          .order_by(QuestionnaireVersion.created_at.desc())).all()
        return render_template("console_questionnaires.html", forms=rows, errors=None)


@bp.post("/questionnaires")
@acts("coordinator")
def upload_questionnaire() -> BaseResponse | tuple[str, int]:
    file = request.files.get("file")
    if file is None or not file.filename:
        abort(422, "choose an XLSForm file (.xlsx, .csv or .md) to upload")
    data, filename = file.read(), file.filename
    form, errors = collect_form_errors(data, filename)
    if form is None:
        with Session(_services().engine) as db:
            rows = db.scalars(select(QuestionnaireVersion)
                              .order_by(QuestionnaireVersion.created_at.desc())).all()
            return render_template("console_questionnaires.html", forms=rows, errors=errors,
                                   filename=filename), 422
    with Session(_services().engine) as db, db.begin():
        _, new = load_version(db, form, actor())
        if not new:  # the same bytes again: nothing stored, but the upload is recorded
            audit(db, actor(), "questionnaire.load", form.version,
                  after={"filename": form.filename, "already_loaded": True})
    return redirect(url_for("console.questionnaire", version=form.version), 303)


@bp.get("/questionnaires/<version>")
@signed_in
def questionnaire(version: str) -> str | tuple[str, int]:
    registry = _services().registry
    with Session(_services().engine) as db:
        row = db.get(QuestionnaireVersion, version) if len(version) <= 32 else None
    if row is None:
        return _refused(f"No questionnaire version {version}.",
                        url_for("console.questionnaires"), 404)
    form = registry.questionnaire(version)
    limit = request.args.get("limit", "160")
    screen_limit = int(limit) if limit.isdigit() and 64 <= int(limit) <= 182 else 160
    languages = []
    for lang in form.languages:
        ussd = [{"text": s, "chars": len(s), "over": len(s) > screen_limit}
                for s in longest_path_screens(form, lang.key, Rules(screen_limit=screen_limit))]
        sms = []
        for text in longest_path_screens(form, lang.key, Rules.sms()):
            seg = count_segments(text)
            sms.append({"text": text, "chars": len(text), "segments": seg.segments,
                        "encoding": seg.encoding})
        languages.append({"key": lang.key, "name": lang.name, "ussd": ussd, "sms": sms,
                          "sms_cost": interview_cost([m["text"] for m in sms]),
                          "over": sum(1 for s in ussd if s["over"])})
    return render_template("console_questionnaire.html", form=form, row=row,
                           languages=languages, limit=screen_limit)


# -- campaigns ---------------------------------------------------------------------------

@bp.post("/campaigns")
@acts("coordinator")
def new_campaign() -> BaseResponse | tuple[str, int]:
    slug, name = _text("slug", True), _text("name", True)
    version = _text("questionnaire_version", True)
    with Session(_services().engine) as db, db.begin():
        try:
            create_campaign(db, actor(), slug, name, version, _int("target_size"))
        except CampaignError as exc:
            return _refused(str(exc), url_for("dashboard.index"), 422)
    return redirect(url_for("dashboard.campaign", slug=slug), 303)


@bp.post("/campaigns/<slug>/<any(open, pause, close):verb>")
@acts("coordinator")
def move(slug: str, verb: str) -> BaseResponse | tuple[str, int]:
    to = {"open": "open", "pause": "paused", "close": "closed"}[verb]
    back = url_for("dashboard.campaign", slug=slug)
    done = {"open": "opened", "pause": "paused", "close": "closed"}[verb]
    return _act(lambda db: transition(db, actor(), slug, to), refused=f"Not {done}",
                back=back, done=back, status=409)


def _when(name: str) -> datetime | None:
    value = _text(name)
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        abort(422, f"{name.replace('_', ' ')}: a date and time like 2026-03-01T08:00")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@bp.post("/campaigns/<slug>/settings")
@acts("coordinator")
def settings(slug: str) -> BaseResponse | tuple[str, int]:
    """Languages, schedule, reminders, airtime and the USSD part budget, all or nothing."""
    languages = [x for x in request.form.getlist("languages") if x]

    def save(db: Session) -> None:
        set_languages(db, actor(), slug, languages or None)
        set_schedule(db, actor(), slug, _when("opens_at"), _when("closes_at"))
        set_reminders(db, actor(), slug, _int("reminder_hours"), _int("reminder_max"))
        set_part_budget(db, actor(), slug, _int("budget_seconds"), _int("budget_screens"))
        if request.form.get("airtime") == "on":
            set_airtime(db, actor(), slug, _text("airtime_currency", True),
                        _text("airtime_amount", True), _text("airtime_budget", True))
        elif get_campaign(db, slug).airtime_amount is not None:
            set_airtime(db, actor(), slug, None)

    page = url_for("console.campaign_settings", slug=slug)
    return _act(save, refused="Settings not saved", back=page, done=page)


@bp.post("/campaigns/<slug>/quotas")
@acts("coordinator")
def quotas(slug: str) -> BaseResponse | tuple[str, int]:
    """Replace the quotas with an uploaded CSV (question columns, then target), or clear
    them; published to the webhooks at once, as the CLI and the API do."""
    file = request.files.get("file")
    data = file.read() if file is not None and file.filename else None
    if data is None and not request.form.get("clear"):
        abort(422, "choose a quota CSV (e.g. region,sex,target) or clear the quotas")
    return _replace_quotas(slug, None if data is None else
                           (lambda form: read_quota_csv(data, form)))


@bp.post("/campaigns/<slug>/quotas/cells")
@acts("coordinator")
def quota_cells(slug: str) -> BaseResponse | tuple[str, int]:
    """The cells edited in the page: one target per cell (blank: no such cell), on the
    quota's questions. Checked by the same rule as the API's PUT .../quotas
    (gateway.interview.quota.define), which names a cell it refuses."""
    with Session(_services().engine) as db:
        quota = Quota.decode(_campaign(db, slug).quotas)
    if quota is None:
        abort(422, "No quotas to edit yet: upload a quota CSV first (it names the questions).")
    cells = []
    for name, raw in request.form.items():
        if name.startswith("target:") and raw.strip():
            values = name.removeprefix("target:").split("|")
            # A forged field with too few or many values is named as it came.
            cell = dict(zip(quota.on, values, strict=True)) if len(values) == len(
                quota.on) else {f"value {k + 1}": v for k, v in enumerate(values)}
            cells.append((cell, _text(name, limit=12)))
    return _replace_quotas(slug, lambda form: define_quota(form, quota.on, cells))


def _replace_quotas(slug: str, define: Callable[[Questionnaire], Quota] | None
                    ) -> BaseResponse | tuple[str, int]:
    services = _services()
    with Session(services.engine) as db:
        _campaign(db, slug)
    # Published at once so the webhooks screen by the new quotas, as the API and CLI do.
    return _act(lambda db: set_quotas(db, actor(), slug, define), refused="Quotas not set",
                back=url_for("console.campaign_settings", slug=slug),
                done=url_for("dashboard.campaign", slug=slug),
                after=lambda campaign: refresh_quotas(
                    services.engine, services.redis, services.settings.redis_prefix,
                    [campaign.id]))


def quota_grid(form: Questionnaire, quota: Quota | None) -> list[dict[str, Any]]:
    """The cells to edit: every combination of the quota questions' choices (a blank
    target: not a quota cell), or only the set cells when that would be too many."""
    if quota is None:
        return []
    questions = {q.name: q for q in form.questions}
    choices = [[c.name for c in questions[name].choices] if name in questions else []
               for name in quota.on]
    combos = [list(values) for values in itertools.product(*choices)]
    if len(combos) > MAX_GRID or not combos:
        combos = [key.split("|") for key in sorted(quota.targets)]
    return [{"key": cell_key(values), "values": values,
             "target": quota.targets.get(cell_key(values), "")} for values in combos]


@bp.get("/campaigns/<slug>/settings")
@signed_in
def campaign_settings(slug: str) -> str | tuple[str, int]:
    with Session(_services().engine) as db:
        campaign = _campaign(db, slug)
        form = campaign_form(db, campaign)
        view = campaign_view(campaign)
        view["budget_seconds"], view["budget_screens"] = (campaign.budget_seconds,
                                                          campaign.budget_screens)
        grid = quota_grid(form, Quota.decode(campaign.quotas))
    return render_template("console_settings.html", c=view, form=form, grid=grid)


# -- channels ----------------------------------------------------------------------------

def _base_url() -> str:
    return _services().settings.public_base_url or request.host_url.rstrip("/")


@bp.get("/campaigns/<slug>/channels")
@signed_in
def channels(slug: str) -> str | tuple[str, int]:
    with Session(_services().engine) as db:
        campaign = _campaign(db, slug)
        rows = db.scalars(select(Channel).where(Channel.campaign_id == campaign.id)
                          .order_by(Channel.id)).all()
        health = channel_health(_services().engine, [ch.id for ch in rows])
        listing = [{"id": ch.id, "provider": PROVIDERS[ch.provider].label
                    if ch.provider in PROVIDERS else ch.provider, "kind": ch.kind,
                    "address": ch.address, "screen_limit": ch.screen_limit,
                    "unbound_at": ch.unbound_at.strftime("%Y-%m-%d %H:%M UTC")
                    if ch.unbound_at else None,
                    "urls": channel_urls(ch, _base_url()), **health[ch.id]} for ch in rows]
        name = campaign.name
    return render_template("console_channels.html", slug=slug, name=name, channels=listing,
                           providers=list(PROVIDERS.values()))


@bp.post("/campaigns/<slug>/channels")
@acts("coordinator")
def bind(slug: str) -> BaseResponse | tuple[str, int]:
    provider, kind = _text("provider", True), _text("kind", True)
    raw = _text("config", limit=4000) or "{}"
    try:
        config = json.loads(raw)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        return _refused("Provider settings must be a JSON object, e.g. "
                        + (PROVIDERS[provider].config_hint if provider in PROVIDERS else "{}"),
                        url_for("console.channels", slug=slug), 422)
    address, screen_limit = _text("address", True), _int("screen_limit") or 160
    page = url_for("console.channels", slug=slug)

    def work(db: Session) -> None:
        number = address
        if provider == "android":
            try:
                number = to_e164(address, _services().settings.default_region)
            except BadPhoneNumber as exc:
                raise CampaignError(f"the phone's SIM number: {exc}") from None
        bound = bind_channel(db, actor(), slug=slug, provider=provider, kind=kind,
                             address=number, config=config, screen_limit=screen_limit)
        if provider == "android":
            # As `channels add` does, before the commit: a phone that cannot be reached or
            # refuses its webhooks leaves no channel behind, and one bound here reports to
            # this node from its first message.
            # The phone reaches this node where `up` serves it (through `adb reverse`, at
            # 127.0.0.1), not always at the host name this browser used.
            settings = _services().settings
            base = settings.public_base_url or settings.served_url() or _base_url()
            try:
                android.set_up_phone(config, bound.channel.key,
                                     channel_urls(bound.channel, base)["events"])
            except android.PhoneError as exc:
                raise CampaignError(str(exc)) from None

    return _act(work, refused="Channel not added", back=page, done=page)


@bp.post("/campaigns/<slug>/channels/<int:channel_id>/unbind")
@acts("coordinator")
def unbind(slug: str, channel_id: int) -> BaseResponse | tuple[str, int]:
    def work(db: Session) -> None:
        channel = db.get(Channel, channel_id) if channel_id < 2**31 else None
        if channel is None or channel.campaign_id != _campaign(db, slug).id:
            abort(404, f"No channel {channel_id} on {slug}.")
        unbind_channel(db, actor(), channel_id)

    page = url_for("console.channels", slug=slug)
    return _act(work, refused="Not unbound", back=page, done=page, status=409)


# -- long actions: RQ jobs with progress ---------------------------------------------------

def _queue() -> Queue:
    return Queue(console_jobs.QUEUE, connection=_services().redis)


def _job(job_id: str, slug: str) -> Job:
    try:
        uuid.UUID(job_id)
        job = Job.fetch(job_id, connection=_services().redis)
    except (ValueError, NoSuchJobError):
        abort(404, "No such job (finished jobs are kept for a week).")
    if job.meta.get("campaign") != slug or "console" not in job.meta:
        abort(404, "No such job.")
    return job


def job_state(job: Job) -> dict[str, Any]:
    try:
        status = job.get_status(refresh=True)
    except InvalidJobOperation:  # expired between the fetch and this read
        abort(404, "No such job (finished jobs are kept for a week).")
    result = job.return_value() if status == "finished" else None
    meta = job.meta
    done, total = int(meta.get("done") or 0), int(meta.get("total") or 0)
    if status == "finished":
        done = total = max(total, 1)
    return {"id": job.id, "kind": meta.get("console"), "status": str(status.value if hasattr(
        status, "value") else status), "done": done, "total": total,
            "percent": round(100 * done / total) if total else 0, "result": result,
            "error": (result or {}).get("error") if isinstance(result, dict) else None}


@bp.get("/campaigns/<slug>/jobs/<job_id>")
@signed_in
def job_page(slug: str, job_id: str) -> str:
    job = _job(job_id, slug)
    return render_template("console_job.html", slug=slug, job=job_state(job))


@bp.get("/campaigns/<slug>/jobs/<job_id>.json")
@signed_in
def job_json(slug: str, job_id: str) -> Response:
    state = job_state(_job(job_id, slug))
    state.pop("result", None)  # the page shows it after a reload; it may be long
    return Response(json.dumps(state), mimetype="application/json")


@bp.get("/campaigns/<slug>/jobs/<job_id>/rejected.csv")
@signed_in
def rejected_rows(slug: str, job_id: str) -> Response:
    """The rows a contact import refused, with line number and reason, to fix and re-import."""
    if not g.viewer.may("coordinator"):
        abort(403, "The rejected-rows report needs the coordinator role.")
    state = job_state(_job(job_id, slug))
    result = state["result"] or {}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["line", "reason"])
    for row in result.get("rejected", []):
        writer.writerow([row["line"], row["reason"]])
    return Response(out.getvalue(), mimetype="text/csv", headers={
        "Content-Disposition": f'attachment; filename="{slug}-rejected-rows.csv"'})


def _to_job(slug: str, job_id: str) -> BaseResponse:
    return redirect(url_for("console.job_page", slug=slug, job_id=job_id), 303)


# -- contacts and invitations ------------------------------------------------------------

def _audience(source: Any) -> Audience:
    where = {}
    for number, line in enumerate((source.get("where") or "").splitlines(), start=1):
        field, sep, value = line.partition("=")
        if not line.strip():
            continue
        if not (sep and field.strip()):
            # Dropping it would widen the audience: everyone would be invited.
            abort(422, f"other fields, line {number} ({line.strip()[:60]!r}): write "
                       "field=value, e.g. district=Kumasi")
        where[field.strip()] = value.strip()
    limit = source.get("limit") or ""
    if limit and (not limit.isdigit() or int(limit) < 1 or len(limit) > 9):
        abort(422, "limit: a whole number of at least 1")
    return Audience((source.get("region") or "").strip()[:MAX_FIELD],
                    (source.get("language") or "").strip()[:MAX_FIELD],
                    tuple(where.items()), int(limit) if limit else None)


@bp.get("/campaigns/<slug>/contacts")
@signed_in
def contacts(slug: str) -> str | tuple[str, int]:
    services = _services()
    q = request.args.get("q", "").strip()[:100]
    with Session(services.engine) as db:
        campaign = _campaign(db, slug)
        base = (select(Contact, OptOut.respondent.label("stopped"))
                .join(CampaignContact, CampaignContact.contact_id == Contact.id)
                .outerjoin(OptOut, OptOut.respondent == Contact.respondent)
                .where(CampaignContact.campaign_id == campaign.id))
        if q:
            like = f"%{q}%"
            base = base.where(Contact.region.ilike(like) | Contact.language.ilike(like)
                              | Contact.attributes.ilike(like)
                              | Contact.respondent.startswith(q, autoescape=True))
        total = db.scalar(select(func.count()).select_from(
            select(CampaignContact.contact_id).where(
                CampaignContact.campaign_id == campaign.id).subquery())) or 0
        rows = db.execute(base.order_by(Contact.id).limit(100)).all()
        listing = []
        for contact, stopped in rows:
            item = {"id": contact.id, "pseudonym": contact.respondent[:12],
                    "language": contact.language, "region": contact.region,
                    "attributes": json.loads(contact.attributes or "{}"),
                    "opted_out": stopped is not None}
            if g.viewer.may("coordinator"):  # a viewer never sees a number
                item["phone"] = mask_phone(services.box.open(contact.recipient))
            listing.append(item)
        outbound = db.execute(
            select(OutboundMessage.status, func.count())
            .join(Channel, Channel.id == OutboundMessage.channel_id)
            .where(Channel.campaign_id == campaign.id, OutboundMessage.kind == "invitation",
                   real_respondent(OutboundMessage.respondent))
            .group_by(OutboundMessage.status).order_by(OutboundMessage.status)).all()
        state, name = campaign.state, campaign.name
    count = None
    refusal = None
    if request.args.get("preview"):
        try:
            count = preview(services.engine, slug, _audience(request.args)).as_dict()
        except InvitationError as exc:
            refusal = str(exc)
    return render_template("console_contacts.html", slug=slug, name=name, state=state,
                           contacts=listing, total=total, q=q, preview=count,
                           refusal=refusal, filters=request.args, invitations=outbound)


@bp.post("/campaigns/<slug>/contacts")
@acts("coordinator")
def import_file(slug: str) -> BaseResponse:
    file = request.files.get("file")
    if file is None or not file.filename:
        abort(422, "choose a CSV file of contacts to upload")
    data = file.read()
    with Session(_services().engine) as db:
        campaign_id = _campaign(db, slug).id
    job_id = console_jobs.enqueue(_queue(), "import", slug, console_jobs.import_job,
                                  campaign_id, slug, data, actor())
    return _to_job(slug, job_id)


@bp.post("/campaigns/<slug>/invitations")
@acts("coordinator")
def send_invitations(slug: str) -> BaseResponse | tuple[str, int]:
    audience = _audience(request.form)
    try:
        total = preview(_services().engine, slug, audience).queued
    except InvitationError as exc:
        return _refused(f"No invitations sent: {exc}",
                        url_for("console.contacts", slug=slug))
    job_id = console_jobs.enqueue(_queue(), "invite", slug, console_jobs.invite_job, slug,
                                  audience.as_dict(), actor(), max(total, 1))
    return _to_job(slug, job_id)


@bp.post("/campaigns/<slug>/contacts/<int:contact_id>/opt-out")
@acts("coordinator")
def opt_out(slug: str, contact_id: int) -> BaseResponse | tuple[str, int]:
    services = _services()
    with Session(services.engine) as db, db.begin():
        contact = db.get(Contact, contact_id) if contact_id < 2**31 else None
        if contact is None:
            return _refused(f"No contact {contact_id}.", url_for("console.contacts", slug=slug),
                            404)
        respondent = contact.respondent
        if db.get(OptOut, respondent) is None:
            db.add(OptOut(respondent=respondent, at=datetime.now(UTC)))
            audit(db, actor(), "contact.opt_out", str(contact_id))
    services.store.r.set(services.store.optout_key(respondent), "1")
    return redirect(url_for("console.contacts", slug=slug), 303)


# -- fieldwork ---------------------------------------------------------------------------

def _channel_labels(db: Session, campaign_id: int) -> dict[int, str]:
    return {ch.id: f"{PROVIDERS[ch.provider].label if ch.provider in PROVIDERS else ch.provider}"
                   f" {ch.kind.upper()} {ch.address}{' (unbound)' if ch.unbound_at else ''}"
            for ch in db.scalars(select(Channel).where(Channel.campaign_id == campaign_id))}


def part_breaks(db: Session, campaign_id: int, labels: dict[int, str]) -> list[dict[str, Any]]:
    """Per part break (the part budget ended part k and told the citizen to dial again),
    channel and language: how many interviews reached it, how many went on (answered
    again after it, or completed) and how many stopped there. From ussd_part_breaks,
    real respondents only."""
    went_on = or_(Interview.status == "completed", exists().where(
        Answer.interview_id == UssdPartBreak.interview_id, Answer.seq > UssdPartBreak.seq))
    rows = db.execute(
        select(UssdPartBreak.part, UssdPartBreak.channel_id, Interview.lang,
               func.count(), func.sum(case((went_on, 1), else_=0)))
        .join(Interview, Interview.id == UssdPartBreak.interview_id)
        .where(UssdPartBreak.campaign_id == campaign_id,
               real_respondent(Interview.respondent))
        .group_by(UssdPartBreak.part, UssdPartBreak.channel_id, Interview.lang)
        .order_by(UssdPartBreak.part, UssdPartBreak.channel_id, Interview.lang)).all()
    return [{"part": f"after part {part}", "channel": labels.get(channel_id, "unknown")
             if channel_id is not None else "unknown", "language": lang or "unknown",
             "reached": n, "went_on": int(on or 0), "stopped": n - int(on or 0),
             "next_part": f"part {part + 1}"} for part, channel_id, lang, n, on in rows]


def fieldwork(slug: str) -> dict[str, Any]:
    """Completions per day, where unfinished interviews stopped, by language and channel,
    part breaks and quota fill: real respondents only. The page and its JSON (polled by
    console.js to redraw the tables and the chart) are both made from this."""
    services = _services()
    with Session(services.engine) as db:
        campaign = get_campaign(db, slug)
        labels = _channel_labels(db, campaign.id)
        real = real_respondent(Interview.respondent)
        days: dict[str, int] = {}
        for (moment,) in db.execute(select(Interview.completed_at).where(
                Interview.campaign_id == campaign.id, Interview.status == "completed",
                real)):
            if moment is not None:
                day = moment.date().isoformat()
                days[day] = days.get(day, 0) + 1
        by = {}
        for name, column in (("language", Interview.lang), ("channel", Interview.channel_id)):
            by[name] = [{"group": (labels.get(group, str(group)) if name == "channel"
                                   else str(group)) if group is not None else "unknown",
                         "status": status, "n": n} for group, status, n in db.execute(
                select(column, Interview.status, func.count())
                .where(Interview.campaign_id == campaign.id, real)
                .group_by(column, Interview.status).order_by(column, Interview.status))]
        last = (select(Answer.interview_id, func.max(Answer.seq).label("seq"))
                .join(Interview, Interview.id == Answer.interview_id)
                .where(Interview.campaign_id == campaign.id,
                       Interview.status.in_(("started", "abandoned")), real)
                .group_by(Answer.interview_id).subquery())
        dropoff = [{"question": q, "n": n} for q, n in db.execute(
            select(Answer.question, func.count())
            .join(last, (last.c.interview_id == Answer.interview_id)
                  & (last.c.seq == Answer.seq))
            .group_by(Answer.question).order_by(func.count().desc(), Answer.question)
            .limit(20))]
        breaks = part_breaks(db, campaign.id, labels)
    report = campaign_status(services.engine, services.store)
    entry = next(c for c in report["campaigns"] if c["slug"] == slug)
    quotas = quota_table(entry["quotas"])
    per_day = sorted(days.items())
    return {"completed": entry["interviews_completed"], "started": entry["interviews_started"],
            "waiting": entry["events_waiting"],
            "per_day": [{"day": day, "n": n} for day, n in per_day],
            "per_day_svg": str(count_chart("Completed interviews per day (UTC)", per_day,
                                           "chart-per-day")),
            "by_language": by["language"], "by_channel": by["channel"], "dropoff": dropoff,
            "part_breaks": breaks,
            "quotas": [{"cell": " × ".join(c["values"]), "target": c["target"],
                        "completed": c["completed"],
                        "pct": "—" if c["pct"] is None else f"{c['pct']:.0f}%",
                        "full": "full" if c["full"] else ""}
                       for c in (quotas["cells"] if quotas else [])],
            "as_of": datetime.now(UTC).strftime("%H:%M:%S UTC")}


@bp.get("/campaigns/<slug>/fieldwork")
@signed_in
def fieldwork_page(slug: str) -> str | tuple[str, int]:
    try:
        data = fieldwork(slug)
    except CampaignError:
        return _refused(f"No campaign {slug}.", url_for("dashboard.index"), 404)
    return render_template("console_fieldwork.html", slug=slug, f=data)


@bp.get("/campaigns/<slug>/fieldwork.json")
@signed_in
def fieldwork_json(slug: str) -> Response:
    try:
        return Response(json.dumps(fieldwork(slug), default=str), mimetype="application/json")
    except CampaignError:
        abort(404, f"No campaign {slug}.")


# -- the phone simulator -----------------------------------------------------------------

def _sim_key(slug: str) -> str:
    prefix = _services().settings.redis_prefix
    return f"{prefix}console:sim:{g.viewer.token_id}:{slug}"


def _sim_state(slug: str) -> dict[str, Any]:
    raw = _services().redis.get(_sim_key(slug))
    if raw:
        return dict(json.loads(raw))
    return _sim_reset(slug)


def _sim_reset(slug: str) -> dict[str, Any]:
    """A new simulated phone: a fictional number (its own respondent) and no session."""
    state = {"phone": f"{SIMULATOR_NUMBERS}{random.randrange(1000):03d}", "session": "",
             "text": [], "transcript": [], "channel": None}
    _sim_save(slug, state)
    return state


def _sim_save(slug: str, state: dict[str, Any]) -> None:
    _services().redis.set(_sim_key(slug), json.dumps(state), ex=86400)


@bp.get("/campaigns/<slug>/simulator")
@signed_in
def simulator(slug: str) -> str | tuple[str, int]:
    services = _services()
    with Session(services.engine) as db:
        campaign = _campaign(db, slug)
        chans = db.scalars(select(Channel).where(
            Channel.campaign_id == campaign.id, Channel.unbound_at.is_(None),
            Channel.provider.in_(SIMULATED)).order_by(Channel.id)).all()
        options = [{"id": ch.id, "label": f"{PROVIDERS[ch.provider].label} "
                    f"{ch.kind.upper()} {ch.address}"} for ch in chans]
        state = _sim_state(slug)
        respondent = pseudonym(services.settings.pseudonym_key, state["phone"])
        answers = db.execute(
            select(Answer.question, Answer.value).join(
                Interview, Interview.id == Answer.interview_id)
            .where(Interview.respondent == respondent, Interview.campaign_id == campaign.id,
                   Answer.value.is_not(None)).order_by(Answer.seq)).all()
        # SMS replies that go through the outbound queue (Africa's Talking cannot answer
        # inline), as the phone would receive them; the worker never sends them.
        texts = [{"body": m.body, "segments": count_segments(m.body).segments,
                  "status": m.status} for m in db.scalars(
            select(OutboundMessage).where(OutboundMessage.respondent == respondent)
            .order_by(OutboundMessage.id.desc()).limit(30))]
        interview = db.execute(select(Interview.status, Interview.lang).where(
            Interview.respondent == respondent,
            Interview.campaign_id == campaign.id)).first()
        name = campaign.name
    waiting = services.store.waiting()
    return render_template("console_simulator.html", slug=slug, name=name, channels=options,
                           state=state, answers=answers, interview=interview,
                           waiting=waiting, respondent=respondent[:12], texts=texts)


@bp.post("/campaigns/<slug>/simulator")
@acts("coordinator")
def simulate(slug: str) -> BaseResponse | tuple[str, int]:
    """One key press or message from the simulated phone, sent to the real webhook in the
    provider's wire format; the reply is what a citizen would see."""
    services = _services()
    if request.form.get("reset"):
        _sim_reset(slug)
        with Session(services.engine) as db, db.begin():
            audit(db, actor(), "simulator.reset", slug)
        return redirect(url_for("console.simulator", slug=slug), 303)
    typed = _text("input", limit=160)
    channel_id = _int("channel")
    with Session(services.engine) as db:
        campaign = _campaign(db, slug)
        channel = db.get(Channel, channel_id) if channel_id is not None and \
            channel_id < 2**31 else None
        if channel is None or channel.campaign_id != campaign.id or \
                channel.provider not in SIMULATED or channel.unbound_at is not None:
            return _refused("Choose one of the campaign's channels for the simulated phone.",
                            url_for("console.simulator", slug=slug), 422)
        db.expunge(channel)
    state = _sim_state(slug)
    if state.get("channel") != channel.id:
        state.update(channel=channel.id, session="", text=[])
    client = current_app.test_client()
    root = f"/webhooks/{channel.provider}/{channel.key}"
    phone = state["phone"]
    if channel.kind == "ussd":
        if not state["session"]:
            state["session"] = f"sim-{secrets.token_hex(8)}"
            state["text"] = []
            typed_now = None  # a dial: the first hop has an empty text
            # Each dial is recorded (not each key: the stored answers say the rest).
            with Session(services.engine) as db, db.begin():
                audit(db, actor(), "simulator.dial", slug,
                      after={"channel": channel.id, "respondent": pseudonym(
                          services.settings.pseudonym_key, phone)[:12]})
        else:
            typed_now = typed
            state["text"].append(typed)
        resp = client.post(f"{root}/ussd", **_ussd_request(channel, state, typed_now))
        screen, ended, wire = _ussd_screen(channel.provider, resp.get_data(as_text=True))
        if typed_now is not None:
            state["transcript"].append({"from": "phone", "text": typed_now})
        else:
            state["transcript"].append({"from": "phone", "text": f"dial {channel.address}"})
        state["transcript"].append({"from": "network", "text": screen, "chars": len(screen),
                                    "status": resp.status_code, "end": ended, "wire": wire})
        if ended or resp.status_code != 200:
            state["session"] = ""
    else:
        if not typed:
            return _refused("Type a message to send.", url_for("console.simulator", slug=slug),
                            422)
        state["transcript"].append({"from": "phone", "text": typed})
        message_id = f"sim-{secrets.token_hex(8)}"
        if channel.provider == "africastalking":
            form = {"from": phone, "to": channel.address, "text": typed,
                    "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"), "id": message_id,
                    "linkId": "", "networkCode": "62001"}
            resp = client.post(f"{root}/sms", data=urlencode(form),
                               content_type="application/x-www-form-urlencoded")
        else:
            # Twilio signs every webhook: sign this one as Twilio would, with the
            # channel's auth token over the URL the app will check.
            form = {"ToCountry": "GH", "SmsMessageSid": message_id, "NumMedia": "0",
                    "SmsSid": message_id, "SmsStatus": "received", "Body": typed,
                    "To": channel.address, "NumSegments": "1", "MessageSid": message_id,
                    "AccountSid": json.loads(channel.config or "{}").get("account_sid", ""),
                    "From": phone, "ApiVersion": "2010-04-01", "FromCountry": "GB"}
            base = services.settings.public_base_url or "http://localhost"
            token = str(json.loads(channel.config or "{}").get("auth_token", ""))
            signature = RequestValidator(token).compute_signature(
                base.rstrip("/") + f"{root}/sms", form)
            resp = client.post(f"{root}/sms", data=urlencode(form),
                               content_type="application/x-www-form-urlencoded",
                               headers={"X-Twilio-Signature": signature})
        reply = _twiml_text(resp.get_data(as_text=True).strip())
        if reply:
            state["transcript"].append({"from": "network", "text": reply,
                                        "status": resp.status_code})
    state["transcript"] = state["transcript"][-80:]
    _sim_save(slug, state)
    return redirect(url_for("console.simulator", slug=slug), 303)


def _ussd_request(channel: Channel, state: dict[str, Any],
                  typed: str | None) -> dict[str, Any]:
    """One hop in the provider's own wire format (typed None: the dial). Africa's Talking
    posts a form with the cumulative text; Hubtel and Arkesel post JSON with the latest
    input only (Hubtel numbers its requests with Sequence, Arkesel flags the first)."""
    phone, session = state["phone"], state["session"]
    if channel.provider == "hubtel":
        state["seq"] = 1 if typed is None else int(state.get("seq") or 0) + 1
        return {"json": {"Type": "Initiation" if typed is None else "Response",
                         "Mobile": phone.lstrip("+"), "SessionId": session,
                         "ServiceCode": channel.address.strip("*#"),
                         "Message": channel.address if typed is None else typed,
                         "Operator": "mtn", "Sequence": state["seq"], "ClientState": "",
                         "Platform": "USSD", "ExtraData": {}}}
    if channel.provider == "arkesel":
        return {"json": {"sessionID": session, "userID": "civicdial-simulator",
                         "newSession": typed is None, "msisdn": phone.lstrip("+"),
                         "userData": "" if typed is None else typed, "network": "MTN"}}
    form = {"sessionId": session, "serviceCode": channel.address, "phoneNumber": phone,
            "networkCode": "62001", "text": "*".join(state["text"])}
    return {"data": urlencode(form), "content_type": "application/x-www-form-urlencoded"}


def _ussd_screen(provider: str, body: str) -> tuple[str, bool, str]:
    """(what the phone shows, whether the session ended, the wire reply when it is not
    the screen itself). Africa's Talking's CON/END text is shown as it is."""
    if provider not in ("hubtel", "arkesel"):
        return body, body.startswith("END"), ""
    try:
        data = json.loads(body)
    except ValueError:
        return body, True, ""  # a refusal (4xx) is plain text
    if not isinstance(data, dict):
        return body, True, ""
    if provider == "hubtel":
        return str(data.get("Message", "")), data.get("Type") != "response", body
    return str(data.get("message", "")), data.get("continueSession") is not True, body


def _twiml_text(body: str) -> str:
    """The messages of a TwiML reply, as the phone shows them; other bodies as they are."""
    if not body.startswith("<"):
        return body
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return body
    return "\n\n".join("".join(m.itertext()) for m in root.iter("Message"))


# -- results -----------------------------------------------------------------------------

def _label(measure: str) -> str:
    if measure in MEASURE_LABELS:
        return MEASURE_LABELS[measure]
    return ATTRIBUTE_LABELS.get(measure.split("_", 1)[-1], measure)


@bp.get("/campaigns/<slug>/results")
@signed_in
def results(slug: str) -> str | tuple[str, int]:
    services = _services()
    with Session(services.engine) as db:
        campaign = _campaign(db, slug)
        name, campaign_id = campaign.name, campaign.id
        published = db.scalar(select(TallySnapshot.version).where(
            TallySnapshot.campaign_id == campaign_id, TallySnapshot.published_at.is_not(None))
            .order_by(TallySnapshot.version.desc()).limit(1))
    snap = latest_snapshot(services.engine, campaign_id)
    areas = []
    if snap is not None:
        cells = cells_of(snap)
        index = {(c["area"], c["measure"], c["breakdown"], c["group"]): c for c in cells}
        for area, (label, attrs, _overall) in AREAS.items():
            measures = [*attrs, "index", "satisfied"]
            total = [bar_of(_label(m), index[(area, m, "total", "_T")])
                     for m in measures if (area, m, "total", "_T") in index]
            multiples = []
            for breakdown in BREAKDOWNS:
                groups = [c for c in cells if c["area"] == area and c["measure"] == "satisfied"
                          and c["breakdown"] == breakdown]
                if groups:
                    multiples.append({"breakdown": breakdown, "svg": bar_chart(
                        f"{label}: satisfied overall by {breakdown}",
                        [bar_of(c["group"], c) for c in groups], f"{area}-{breakdown}"),
                        "bars": [bar_of(c["group"], c) for c in groups]})
            areas.append({"area": area, "label": label, "bars": total,
                          "svg": bar_chart(f"{label}: share positive, 95% intervals", total,
                                           f"chart-{area}"),
                          "multiples": multiples})
    return render_template("console_results.html", slug=slug, name=name, snap=snap,
                           areas=areas, published=published)


@bp.post("/campaigns/<slug>/tally")
@acts("coordinator")
def tally(slug: str) -> BaseResponse:
    with Session(_services().engine) as db:
        campaign_id = _campaign(db, slug).id
    job_id = console_jobs.enqueue(_queue(), "tally", slug, console_jobs.tally_job,
                                  campaign_id, slug, actor())
    return _to_job(slug, job_id)


@bp.post("/campaigns/<slug>/publish")
@acts("coordinator")
def publish_results(slug: str) -> BaseResponse | tuple[str, int]:
    services = _services()
    with Session(services.engine) as db:
        campaign_id = _campaign(db, slug).id
    try:
        done = publish(services.settings, services.engine, services.redis, campaign_id)
    except LookupError as exc:
        return _refused(f"Not published: {exc}", url_for("console.results", slug=slug))
    with Session(services.engine) as db, db.begin():
        audit(db, actor(), "campaign.publish", slug, after={"snapshot": done.version})
    return redirect(url_for("console.results", slug=slug), 303)


@bp.get("/campaigns/<slug>/export.<fmt>")
@signed_in
def download(slug: str, fmt: str) -> Response:
    """The indicator table (csv, xlsx, sdmx) of the latest snapshot; microdata for
    coordinators only. Downloads are audited: they carry the campaign's results away."""
    if fmt not in EXPORTS:
        abort(404, f"Format must be one of {', '.join(EXPORTS)}.")
    if fmt == "microdata" and not g.viewer.may("coordinator"):
        abort(403, "Microdata needs the coordinator role.")
    engine = _services().engine
    with Session(engine) as db:
        campaign = _campaign(db, slug)
        db.expunge(campaign)
    try:
        data = exports.export_bytes(engine, campaign, fmt)
    except LookupError:
        abort(404, "No tally yet: run the tally first.")
    with Session(engine) as db, db.begin():
        audit(db, actor(), "campaign.export", slug, after={"format": fmt})
    return Response(data, mimetype=EXPORTS[fmt][0], headers={
        "Content-Disposition": f'attachment; filename="{slug}-{fmt}.{EXPORTS[fmt][1]}"'})


# -- audit (admin) -----------------------------------------------------------------------

@bp.get("/audit")
@signed_in
def audit_log() -> str:
    if not g.viewer.may("admin"):
        abort(403, "The audit log needs the admin role.")
    page = request.args.get("page", "1")
    number = int(page) if page.isdigit() and 0 < int(page) < 10**6 else 1
    with Session(_services().engine) as db:
        rows = db.scalars(select(AuditEntry).order_by(AuditEntry.id.desc())
                          .offset((number - 1) * 100).limit(100)).all()
        entries = [{"at": a.at.strftime("%Y-%m-%d %H:%M:%S"), "actor": a.actor,
                    "action": a.action, "target": a.target, "before": a.before,
                    "after": a.after} for a in rows]
    return render_template("console_audit.html", entries=entries, page=number)


def campaign_list() -> list[Campaign]:
    with Session(_services().engine) as db:
        return list(db.scalars(select(Campaign).order_by(Campaign.id)).all())


def form_versions() -> list[str]:
    with Session(_services().engine) as db:
        return list(db.scalars(select(QuestionnaireVersion.version)
                               .order_by(QuestionnaireVersion.created_at)).all())


__all__ = ["bp", "FormError"]
