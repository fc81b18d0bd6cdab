"""The coordinator console (issue 12): every page, every role, through the real app."""

from __future__ import annotations

import re

import pytest
from flask.testing import FlaskClient
from test_dashboard import signed_in_client, tokens  # noqa: F401 - the role tokens fixture

PAGES = ["/dashboard/", "/dashboard/questionnaires", "/dashboard/campaigns/sdg1662",
         "/dashboard/campaigns/sdg1662/settings", "/dashboard/campaigns/sdg1662/channels",
         "/dashboard/campaigns/sdg1662/contacts", "/dashboard/campaigns/sdg1662/fieldwork",
         "/dashboard/campaigns/sdg1662/simulator", "/dashboard/campaigns/sdg1662/results"]


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


@pytest.mark.parametrize("path", PAGES)
def test_every_page_answers_a_viewer(client: FlaskClient, tokens: dict[str, str],  # noqa: F811
                                     path: str) -> None:
    """A viewer reads every page, and none offers a button that changes anything."""
    resp = signed_in_client(client, tokens["viewer"]).get(path)
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200, html[:2000]
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    forms = re.findall(r'<form[^>]*method="post"[^>]*action="([^"]+)"', html)
    assert forms == ["/dashboard/logout"], forms
    assert "<script>" not in html  # no inline script anywhere


@pytest.mark.parametrize("path", PAGES)
def test_every_page_answers_a_coordinator(client: FlaskClient,
                                          tokens: dict[str, str], path: str) -> None:  # noqa: F811
    resp = signed_in_client(client, tokens["coordinator"]).get(path)
    assert resp.status_code == 200, resp.get_data(as_text=True)[:2000]
