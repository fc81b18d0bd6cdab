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
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import wraps
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response as BaseResponse

from gateway.coordination.campaigns import CampaignError, campaign_view, get_campaign, hash_token
from gateway.coordination.status import campaign_status
from gateway.store.models import ApiToken, Channel, OutboundMessage
from gateway.web.api import RANK

bp = Blueprint("dashboard", __name__, url_prefix="/dashboard", template_folder="templates")

COOKIE = "civicdial_dashboard"
CSRF_COOKIE = "civicdial_dashboard_csrf"
COOKIE_PATH = "/dashboard"  # the API authenticates by header; it never needs this cookie
MAX_TOKEN = 200  # issued tokens are 46 characters; anything far longer is not one
# Messages are chosen by code so that a crafted link cannot put words on the login page.
ERRORS = {
    "bad-token": "That token is unknown or has been revoked. Check it and try again.",
    "expired": "Your token is no longer valid (it may have been revoked). Sign in again.",
    "csrf": "The sign-in form had expired. Paste your token again.",
}
# Where a successful sign-in may return to: a dashboard page, never another site.
_NEXT = re.compile(r"/dashboard/[A-Za-z0-9_/-]*")  # used with fullmatch: "$" allows "\n"
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


@dataclass(frozen=True)
class Viewer:
    name: str
    role: str


def _engine() -> Engine:
    return current_app.extensions["civicdial"].engine


def check_token(token: str) -> Viewer | None:
    """The same test as the API's requires('viewer'): a known, unrevoked token whose role
    is viewer or above."""
    token = token.strip()
    if not token or len(token) > MAX_TOKEN:
        return None
    with Session(_engine()) as db:
        row = db.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token),
                                               ApiToken.revoked_at.is_(None)))
    if row is None or RANK.get(row.role, -1) < RANK["viewer"]:
        return None
    return Viewer(row.name, row.role)


def _safe_next(target: str | None) -> str:
    if target and _NEXT.fullmatch(target) and "//" not in target:
        return target
    return url_for("dashboard.index")


def _to_login(error: str | None) -> BaseResponse:
    args: dict[str, str] = {}
    if error:
        args["error"] = error
    if request.path != url_for("dashboard.index"):
        args["next"] = request.path
    return redirect(url_for("dashboard.login", **args), 303)


def signed_in(view: Callable[..., Any]) -> Callable[..., Any]:
    """Every page checks its cookie again: a revoked token stops working at once."""
    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        token = request.cookies.get(COOKIE)
        if not token:
            return _to_login(None)
        viewer = check_token(token)
        if viewer is None:
            response = _to_login("expired")
            response.delete_cookie(COOKIE, path=COOKIE_PATH)
            return response
        g.viewer = viewer
        return view(*args, **kwargs)
    return wrapped


@bp.after_request
def _headers(response: BaseResponse) -> BaseResponse:
    # Shared office computers: nothing behind the sign-in may be kept in a cache, and the
    # pages may not be framed (clickjacking) or load anything from elsewhere.
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
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
    token = request.cookies.get(COOKIE)
    if token and check_token(token):
        return redirect(_safe_next(request.args.get("next")), 303)
    return _login_page(request.args.get("error"))


@bp.post("/login")
def login_post() -> BaseResponse:
    sent = request.form.get("csrf", "").encode()
    kept = request.cookies.get(CSRF_COOKIE, "").encode()
    if not kept or not hmac.compare_digest(sent, kept):
        return _login_page("csrf", 400)
    token = request.form.get("token", "").strip()
    if check_token(token) is None:
        return _login_page("bad-token", 403)
    response = redirect(_safe_next(request.form.get("next")), 303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="Strict",
                        secure=request.is_secure, path=COOKIE_PATH)
    response.delete_cookie(CSRF_COOKIE, path=url_for("dashboard.login"))
    return response


@bp.post("/logout")
def logout() -> BaseResponse:
    # No CSRF check: a forged sign-out only signs someone out, and the cookie it clears
    # is SameSite=Strict, so a cross-site post never carried it anyway.
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
    return render_template("dashboard_index.html", campaigns=rows,
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
            .where(Channel.campaign_id == row.id)
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
