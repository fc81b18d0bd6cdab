"""The coordinators' read-only dashboard: campaign counts, quotas, airtime and outbound SMS.

Sign-in is with an API token (`civicdial token create --role viewer --name WHO`), checked
like the API's bearer tokens, kept in an HttpOnly SameSite=Strict cookie and checked again
on every page, so revoking a token locks its browser out at the next click. Pages are
server-rendered Jinja with no scripts and no external resources: district offices may be
offline, and a page that runs no code cannot leak a token. Nothing here shows a phone
number: the viewer role must never see one, and the tables read here hold none.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from typing import Any

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
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from gateway.coordination.campaigns import CampaignError, campaign_view, get_campaign
from gateway.coordination.signin import (
    SignedIn,
    check_session,
    close_session,
    csrf_ok,
    open_session,
    token_row,
)
from gateway.coordination.status import campaign_status
from gateway.store.models import Channel, OutboundMessage, QuestionnaireVersion
from gateway.store.sessions import real_respondent

bp = Blueprint("dashboard", __name__, url_prefix="/dashboard", template_folder="templates",
               static_folder="static")

COOKIE = "civicdial_dashboard"
CSRF_COOKIE = "civicdial_dashboard_csrf"
COOKIE_PATH = "/dashboard"  # the API authenticates by header; it never needs this cookie
# Messages are chosen by code so that a crafted link cannot put words on the login page.
ERRORS = {
    "bad-token": "That token is unknown or has been revoked. Check it and try again.",
    "expired": "Your token is no longer valid (it may have been revoked). Sign in again.",
    "csrf": "The sign-in form had expired. Paste your token again.",
}
# Where a successful sign-in may return to: a dashboard page, never another site.
_NEXT = re.compile(r"/dashboard/[A-Za-z0-9_/-]*")  # used with fullmatch: "$" allows "\n"
CSP = ("default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
       "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def _engine() -> Engine:
    return current_app.extensions["civicdial"].engine


def check_token(token: str) -> SignedIn | None:
    """The same test as the API's requires('viewer'): a known, unrevoked token whose role
    is viewer or above (no session is opened)."""
    with Session(_engine()) as db:
        row = token_row(db, token)
    return None if row is None else SignedIn(row.name, row.role, row.id, "")


def _safe_next(target: str | None) -> str:
    if target and _NEXT.fullmatch(target) and "//" not in target:
        return target
    return url_for("dashboard.index")


def _to_login(error: str | None) -> BaseResponse:
    args: dict[str, str] = {}
    if error:
        args["error"] = error
    if request.method == "GET" and request.path != url_for("dashboard.index"):
        args["next"] = request.path
    return redirect(url_for("dashboard.login", **args), 303)


def current() -> SignedIn | None:
    """The signed-in browser's session owner (cached for the request), or None."""
    if "viewer" not in g:
        session_id = request.cookies.get(COOKIE, "")
        viewer = None
        if session_id:
            with Session(_engine()) as db:
                viewer = check_session(db, session_id)
        g.viewer = viewer
    return g.viewer


def signed_in(view: Callable[..., Any]) -> Callable[..., Any]:
    """Every page checks its session again: sign-out, expiry or a revoked token stop it at
    once."""
    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not request.cookies.get(COOKIE):
            return _to_login(None)
        if current() is None:
            response = _to_login("expired")
            response.delete_cookie(COOKIE, path=COOKIE_PATH)
            return response
        return view(*args, **kwargs)
    return wrapped


def acts(role: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A form that changes something: signed in, at least `role`, and the session's CSRF
    token in the form (or the X-CSRF-Token header of the console's own script). A viewer's
    forged POST gets 403 and changes nothing."""
    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        @signed_in
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            sent = request.form.get("csrf") or request.headers.get("X-CSRF-Token", "")
            if not csrf_ok(request.cookies.get(COOKIE, ""), sent):
                abort(400, "The form had expired or did not come from this console: "
                           "reload the page and try again.")
            if not g.viewer.may(role):
                abort(403, f"This needs the {role} role; you are signed in as "
                           f"{g.viewer.role}.")
            return view(*args, **kwargs)
        return wrapped
    return decorate


def actor() -> str:
    """Who is acting, for the audit log: the token's name, as the API records it."""
    return f"token:{g.viewer.name}"


@bp.errorhandler(HTTPException)
def refused_page(exc: HTTPException) -> tuple[str, int]:
    return render_template("dashboard_refused.html", code=exc.code,
                           message=exc.description), exc.code or 400


@bp.after_app_request
def _headers(response: BaseResponse) -> BaseResponse:
    # Shared office computers: nothing behind the sign-in may be kept in a cache, and the
    # pages may not be framed (clickjacking) or load anything from elsewhere. Scripts only
    # from our own static files: no inline script runs, so injected markup cannot act.
    if not request.path.startswith(COOKIE_PATH):
        return response
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    if not request.path.startswith(f"{COOKIE_PATH}/static/"):
        response.headers["Cache-Control"] = "no-store"
    return response


def _login_page(error: str | None, status: int = 200) -> Response:
    # Double-submit token: a cross-site form cannot read or send our SameSite=Strict
    # cookie, so a forged sign-in (logging someone into another person's token) fails.
    csrf = request.cookies.get(CSRF_COOKIE, "")
    if not re.fullmatch(r"[A-Za-z0-9_-]{32,64}", csrf):
        csrf = secrets.token_urlsafe(32)
    nxt = request.values.get("next", "")
    body = render_template("dashboard_login.html", error=ERRORS.get(error or ""),
                           csrf=csrf, next=nxt if _NEXT.fullmatch(nxt) else "")
    response = Response(body, status=status, mimetype="text/html")
    response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="Strict",
                        secure=request.is_secure, path=url_for("dashboard.login"))
    return response


@bp.get("/login")
def login() -> BaseResponse:
    if request.cookies.get(COOKIE) and current() is not None:
        return redirect(_safe_next(request.args.get("next")), 303)
    g.viewer = None
    return _login_page(request.args.get("error"))


@bp.post("/login")
def login_post() -> BaseResponse:
    g.viewer = None
    sent = request.form.get("csrf", "").encode()
    kept = request.cookies.get(CSRF_COOKIE, "").encode()
    if not kept or not hmac.compare_digest(sent, kept):
        return _login_page("csrf", 400)
    services = current_app.extensions["civicdial"]
    with Session(services.engine) as db, db.begin():
        session_id = open_session(db, request.form.get("token", ""),
                                  services.settings.console_session_hours)
    if session_id is None:
        return _login_page("bad-token", 403)
    response = redirect(_safe_next(request.form.get("next")), 303)
    # The cookie holds the session id, never the token; it lasts as long as the session.
    response.set_cookie(COOKIE, session_id, httponly=True, samesite="Strict",
                        secure=request.is_secure, path=COOKIE_PATH,
                        max_age=services.settings.console_session_hours * 3600)
    response.delete_cookie(CSRF_COOKIE, path=url_for("dashboard.login"))
    return response


@bp.post("/logout")
def logout() -> BaseResponse:
    # No CSRF check: a forged sign-out only signs someone out, and the cookie it clears
    # is SameSite=Strict, so a cross-site post never carried it anyway. The session ends
    # on the server too: a copy of the cookie stops working.
    session_id = request.cookies.get(COOKIE, "")
    if session_id:
        with Session(_engine()) as db, db.begin():
            close_session(db, session_id)
    response = redirect(url_for("dashboard.login"), 303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="Strict",
                           secure=request.is_secure)
    return response


def _report() -> dict[str, Any]:
    # gateway.cli.main imports the app factory, which imports this module.
    services = current_app.extensions["civicdial"]
    return campaign_status(services.engine, services.store)


def percent(part: int, whole: int | None) -> float | None:
    """part of whole in %, or None when there is no whole to compare with."""
    if not whole or whole <= 0:
        return None
    return 100.0 * part / whole


@bp.get("/")
@signed_in
def index() -> str:
    report = _report()
    rows = [{**entry, "pct": percent(entry["interviews_completed"], entry["target_size"])}
            for entry in report["campaigns"]]
    with Session(_engine()) as db:
        versions = db.scalars(select(QuestionnaireVersion)
                              .order_by(QuestionnaireVersion.created_at.desc())).all()
    return render_template("dashboard_index.html", campaigns=rows, versions=versions,
                           waiting=report["events_waiting"],
                           parked=report["events_parked"], now=_now())


@bp.get("/campaigns/<slug>")
@signed_in
def campaign(slug: str) -> tuple[str, int] | str:
    report = _report()
    entry = next((c for c in report.get("campaigns", []) if c.get("slug") == slug), None)
    with Session(_engine()) as db:
        try:
            row = get_campaign(db, slug)
        except CampaignError:
            row = None
        if row is None or entry is None:
            return render_template("dashboard_not_found.html", slug=slug), 404
        view = campaign_view(row)
        outbound = db.execute(
            select(OutboundMessage.status, func.count())
            .join(Channel, Channel.id == OutboundMessage.channel_id)
            .where(Channel.campaign_id == row.id, real_respondent(OutboundMessage.respondent))
            .group_by(OutboundMessage.status).order_by(OutboundMessage.status)).all()
    target = entry["target_size"]
    completed = entry["interviews_completed"]
    return render_template(
        "dashboard_campaign.html", c=entry, target=target, pct=percent(completed, target),
        opens_at=_when(view.get("opens_at")), closes_at=_when(view.get("closes_at")),
        outbound=[(status, n) for status, n in outbound],
        outbound_total=sum(n for _, n in outbound),
        quotas=quota_table(entry.get("quotas")), airtime=airtime_view(entry.get("airtime")),
        now=_now())


def quota_table(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """campaign_status's quotas as table rows with fill, plus totals; None without quotas."""
    if raw is None:
        return None
    on = raw["on"]
    cells = [{"values": [cell["cell"][name] for name in on], "target": cell["target"],
              "completed": cell["completed"], "screened_out": cell["screened_out"],
              "full": cell["full"], "pct": percent(cell["completed"], cell["target"])}
             for cell in raw["cells"]]
    totals = {key: sum(c[key] for c in cells) for key in ("target", "completed", "screened_out")}
    totals["pct"] = percent(totals["completed"], totals["target"])
    totals["full"] = sum(c["full"] for c in cells)
    return {"on": on, "cells": cells, "totals": totals}


def airtime_view(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """campaign_status's airtime, its payment counts as (status, n) rows."""
    if raw is None:
        return None
    return {**raw, "pct": raw["spent_percent"], "payments": list(raw["payments"].items())}


def _when(iso: str | None) -> str | None:
    """An ISO timestamp as 'YYYY-MM-DD HH:MM UTC'; SQLite gives naive UTC."""
    if not iso:
        return None
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
