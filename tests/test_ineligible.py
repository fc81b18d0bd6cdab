"""An under-18 respondent: END at once, screened out (reason ineligible), never completed,
and nothing of theirs kept beyond a count."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from gateway.coordination.status import campaign_status
from gateway.indicator.exports import write_microdata
from gateway.store.models import Answer, Interview
from workers.persist import drain

FORM = "application/x-www-form-urlencoded"


def _hop(client: FlaskClient, url: str, text: str, session: str, phone: str) -> str:
    resp = client.post(url, data=urlencode({
        "sessionId": session, "serviceCode": "*920*16#", "phoneNumber": phone,
        "networkCode": "62001", "text": text}), content_type=FORM)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_data(as_text=True)


def _walk(client: FlaskClient, url: str, inputs: list[str], session: str,
          phone: str) -> str:
    body = _hop(client, url, "", session, phone)
    for k in range(1, len(inputs) + 1):
        body = _hop(client, url, "*".join(inputs[:k]), session, phone)
    return body


def test_under_18_is_screened_out_and_leaves_only_a_count(
        client: FlaskClient, ussd_url: str, app: Flask, engine: Engine,
        redis_client: redis.Redis, tmp_path: Path) -> None:
    """English, consent, male, under 18: the goodbye is the END, without '1 OK'."""
    end = _walk(client, ussd_url, ["1", "1", "2", "1"], "U1", "+233241111111")
    assert end == "END Thank you. This survey is only for people aged 18 or older. Goodbye."
    # Pressing 1 (what '1 OK' used to invite) changes nothing: the session has ended.
    resp = client.post(ussd_url, data=urlencode({
        "sessionId": "U1", "serviceCode": "*920*16#", "phoneNumber": "+233241111111",
        "networkCode": "62001", "text": "1*1*2*1*1"}), content_type=FORM)
    assert resp.status_code == 409
    # An adult on the same campaign, to check the exports still carry adults.
    _walk(client, ussd_url, ["1", "1", "1", "3"], "A1", "+233242222222")
    services = app.extensions["civicdial"]
    assert drain(redis_client, engine, services.store.stream) > 0
    with Session(engine) as db:
        rows = db.execute(select(Interview.status, Interview.reason, Interview.respondent)
                          .order_by(Interview.started_at)).all()
        assert rows[0] == ("screened_out", "ineligible", None)
        assert rows[1][0] == "started"
        kept = db.scalars(select(Answer.question).join(
            Interview, Interview.id == Answer.interview_id)
            .where(Interview.status == "screened_out")).all()
        assert kept == []
        assert db.scalar(select(func.count()).select_from(Answer)) == 3  # the adult's
    report = campaign_status(engine, services.store)["campaigns"][0]
    assert (report["interviews_completed"], report["screened_out"],
            report["ineligible"]) == (0, 1, 1)
    out = tmp_path / "micro.csv"
    write_microdata(engine, report["id"], out)
    text = out.read_text()
    assert "u18" not in text and "screened_out" not in text
    assert "25_34" in text
