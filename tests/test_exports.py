"""Exports: the indicator table (CSV, XLSX), SDMX-CSV structure and codes, microdata privacy."""

from __future__ import annotations

import csv
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from openpyxl import load_workbook
from sqlalchemy import Engine, insert
from sqlalchemy.orm import Session
from test_tally import load  # the synthetic interviews of the tally tests

from gateway.cli import main
from gateway.config import Settings
from gateway.indicator.estimates import Params
from gateway.indicator.exports import (
    AGE_CODES,
    DISABILITY_CODES,
    LABEL,
    NUMERIC_COLUMNS,
    SDMX_COLUMNS,
    SEX_CODES,
    TABLE_COLUMNS,
    URBAN_CODES,
)
from gateway.indicator.tally import run_tally
from gateway.store.crypto import NumberBox
from gateway.store.models import Channel, FeedbackSubscriber

PHONE = "+233241234567"
DIMENSIONS = ["DATAFLOW", "FREQ", "REPORTING_TYPE", "SERIES", "REF_AREA", "SEX", "AGE",
              "URBANISATION", "INCOME_WEALTH_QUANTILE", "EDUCATION_LEV", "OCCUPATION",
              "CUST_BREAKDOWN", "COMPOSITE_BREAKDOWN", "DISABILITY_STATUS", "ACTIVITY",
              "PRODUCT", "TIME_PERIOD"]


@pytest.fixture
def tallied(env: dict[str, str], engine: Engine, channel: Channel,
            settings: Settings) -> dict[str, str]:
    """A campaign with answers, one subscriber (an encrypted number) and a snapshot."""
    specs = load(engine, channel, 500, seed=11)
    with Session(engine) as db, db.begin():
        db.execute(insert(FeedbackSubscriber).values(
            campaign_id=channel.campaign_id, respondent=specs[0]["respondent"],
            channel_id=channel.id, recipient=NumberBox(settings.encryption_key).seal(PHONE),
            created_at=datetime.now(UTC)))
    run_tally(engine, channel.campaign_id, params=Params(replicates=30))
    return env


def export(env: dict[str, str], fmt: str, path: Path, *extra: str) -> str:
    result = CliRunner().invoke(main, ["export", "sdg1662", "--format", fmt, "-o", str(path),
                                       *extra], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_csv_table(tallied: dict[str, str], tmp_path: Path) -> None:
    """The table has the documented columns; suppressed cells are empty, never 0."""
    export(tallied, "csv", tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == TABLE_COLUMNS
        rows = list(reader)
    statuses = {r["status"] for r in rows}
    assert {"published", "suppressed"} <= statuses
    for r in rows:
        if r["status"].startswith("suppressed"):
            assert r["estimate_pct"] == r["ci_low_pct"] == r["ci_high_pct"] == ""
            assert r["n_eff"] == r["deff"] == ""
        else:
            assert float(r["ci_low_pct"]) <= float(r["estimate_pct"]) <= float(r["ci_high_pct"])
    keys = [(r["area"], r["measure"], r["breakdown"], r["group"]) for r in rows]
    assert len(keys) == len(set(keys))
    index = [r for r in rows if r["measure"] == "index" and r["breakdown"] == "total"]
    assert index and all(r["ci_method"].startswith("bootstrap") for r in index
                         if r["status"] != "suppressed")


def test_xlsx_has_methodology_and_snapshot(tallied: dict[str, str], tmp_path: Path) -> None:
    """XLSX: the table with numbers as numbers, the snapshot facts, methodology, margins."""
    export(tallied, "xlsx", tmp_path / "t.xlsx")
    book = load_workbook(tmp_path / "t.xlsx")
    assert book.sheetnames == ["indicator", "snapshot", "methodology", "margins"]
    table = list(book["indicator"].iter_rows(values_only=True))
    assert list(table[0]) == TABLE_COLUMNS
    est = TABLE_COLUMNS.index("estimate_pct")
    status = TABLE_COLUMNS.index("status")
    for row in table[1:]:
        if str(row[status]).startswith("suppressed"):
            assert row[est] is None
        else:
            assert isinstance(row[est], int | float) and 0 <= row[est] <= 100
    facts = dict(list(book["snapshot"].iter_rows(values_only=True))[1:3])
    assert str(facts["label"]).startswith(LABEL)
    text = "\n".join(str(r[0]) for r in book["methodology"].iter_rows(values_only=True))
    assert "Partial interviews count for the questions they answered" in text
    assert list(book["margins"].iter_rows(values_only=True))[0][0] == "variable"


def test_sdmx_structure_and_codes(tallied: dict[str, str], tmp_path: Path) -> None:
    """SDMX-CSV: the spec's columns in order, one observation per row, SDG codes, 288,
    _T totals, the configured national series, suppressed = empty value + status."""
    export(tallied, "sdmx", tmp_path / "s.csv", "--series-prefix", "NAT_TEST")
    with open(tmp_path / "s.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == SDMX_COLUMNS
        rows = list(reader)
    assert rows
    keys = [tuple(r[d] for d in DIMENSIONS) for r in rows]
    assert len(keys) == len(set(keys)), "one observation per row"
    allowed = {
        "SEX": {"_T", *SEX_CODES.values()}, "AGE": {"_T", *AGE_CODES.values()},
        "URBANISATION": {"_T", *URBAN_CODES.values()},
        "DISABILITY_STATUS": {"_T", *DISABILITY_CODES.values()},
        "INCOME_WEALTH_QUANTILE": {"_T"}, "REF_AREA": {"288"}, "FREQ": {"A"},
        "UNIT_MEASURE": {"PT"}, "OBS_STATUS": {"A", "U", "M"}, "REPORTING_TYPE": {"N"},
    }
    for r in rows:
        for column, codes in allowed.items():
            assert r[column] in codes, (column, r[column])
        assert r["SERIES"].startswith("NAT_TEST_")
        assert "national series id" in r["COMMENT_TS"].lower()
        assert r["COMMENT_TS"].startswith(LABEL + ".")
        assert re.fullmatch(r"\d{4}", r["TIME_PERIOD"])
        if r["OBS_STATUS"] == "M":
            assert r["OBS_VALUE"] == r["LOWER_BOUND"] == r["UPPER_BOUND"] == ""
            assert "suppressed" in r["COMMENT_OBS"]
        else:
            value = float(r["OBS_VALUE"])
            assert float(r["LOWER_BOUND"]) <= value <= float(r["UPPER_BOUND"])
            assert "n_eff=" in r["COMMENT_OBS"] and "deff=" in r["COMMENT_OBS"]
    totals = [r for r in rows if r["SERIES"] == "NAT_TEST_HEALTH_SAT"
              and all(r[d] == "_T" for d in ("SEX", "AGE", "URBANISATION", "CUST_BREAKDOWN",
                                              "DISABILITY_STATUS"))]
    assert len(totals) == 1
    regions = {r["CUST_BREAKDOWN"]: r["CUST_BREAKDOWN_LB"] for r in rows
               if r["CUST_BREAKDOWN"].startswith("GH_")}
    assert regions.get("GH_ASHANTI") == "Ashanti"
    assert {"M"} <= {r["OBS_STATUS"] for r in rows} and "A" in {r["OBS_STATUS"] for r in rows}


def test_sdmx_reads_back_with_pysdmx(tallied: dict[str, str], tmp_path: Path) -> None:
    """A maintained SDMX library (pysdmx) reads our SDMX-CSV 1.0 back: one dataset of the
    configured dataflow, every observation, the same values."""
    from pysdmx.io.csv.sdmx10.reader import read

    export(tallied, "sdmx", tmp_path / "s.csv", "--dataflow", "GH_GSS:DF_TEST(1.0)")
    text = (tmp_path / "s.csv").read_text()
    mine = list(csv.DictReader(text.splitlines()))
    (dataset,) = read(text)
    assert dataset.short_urn == "Dataflow=GH_GSS:DF_TEST(1.0)"
    frame = dataset.data
    assert len(frame) == len(mine)
    key = DIMENSIONS[1:]  # DATAFLOW becomes the dataset's URN
    assert set(key) <= set(frame.columns)
    back = {tuple(str(row[d]) for d in key): str(row["OBS_VALUE"])
            for row in frame.to_dict("records")}
    assert len(back) == len(mine)
    for row in mine:
        value = back[tuple(row[d] for d in key)]
        if row["OBS_VALUE"]:
            assert float(value) == float(row["OBS_VALUE"])
        else:
            assert value in ("", "nan")


def test_microdata_has_pseudonyms_and_no_numbers(tallied: dict[str, str], tmp_path: Path,
                                                 settings: Settings) -> None:
    """Microdata: answers with pseudonyms; no phone number, no encrypted number, no free text."""
    out = export(tallied, "microdata", tmp_path / "m.csv")
    assert "no phone numbers" in out
    raw = (tmp_path / "m.csv").read_text()
    rows = list(csv.DictReader(raw.splitlines()))
    assert rows and rows[0]["respondent_pseudonym"].startswith("resp")
    assert "improve" not in {r["question"] for r in rows}
    assert PHONE not in raw and PHONE[1:] not in raw and "241234567" not in raw
    # A run of 9+ digits that is not part of a hex id (the questionnaire version) would be
    # a number.
    assert not re.search(r"(?<![0-9a-f])\+?\d{9,}(?![0-9a-f])", raw.replace("-", " "))
    assert "gAAAA" not in raw  # Fernet tokens start so
    assert {"sex", "h_sat", "region"} <= {r["question"] for r in rows}


def test_export_without_snapshot_says_what_to_do(env: dict[str, str], channel: Channel,
                                                 tmp_path: Path) -> None:
    """No tally yet: a clear error instead of an empty file."""
    result = CliRunner().invoke(main, ["export", "sdg1662", "--format", "csv", "-o",
                                       str(tmp_path / "x.csv")], env=env)
    assert result.exit_code != 0
    assert "civicdial tally sdg1662" in result.output
    assert not (tmp_path / "x.csv").exists()


def test_publish_cli(tallied: dict[str, str]) -> None:
    """`civicdial publish` reports what it did."""
    result = CliRunner().invoke(main, ["publish", "sdg1662"], env=tallied,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "v1 published" in result.output
    assert "1 result SMS queued" in result.output


def test_publish_json_and_a_missing_version(tallied: dict[str, str], tmp_path: Path) -> None:
    """`publish --json` prints what it did as one object; a snapshot version that does not
    exist is refused by export and publish with the latest there is, not 'run tally'."""
    result = CliRunner().invoke(main, ["publish", "sdg1662", "--json"], env=tallied,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    done = json.loads(result.output)
    assert done == {"campaign": "sdg1662", "snapshot_id": done["snapshot_id"], "version": 1,
                    "results_texts": done["results_texts"], "messages_queued": 1}
    assert isinstance(done["snapshot_id"], int) and done["results_texts"] > 0
    for args in (["publish", "sdg1662", "--snapshot", "7"],
                 ["export", "sdg1662", "--format", "csv", "-o", str(tmp_path / "x.csv"),
                  "--snapshot", "7"]):
        result = CliRunner().invoke(main, args, env=tallied)
        assert result.exit_code == 1, result.output
        assert result.output == "Error: sdg1662: no snapshot v7: the latest is v1\n"
    assert not (tmp_path / "x.csv").exists()


def test_xlsx_table_is_the_csv_table_exactly(tallied: dict[str, str], tmp_path: Path) -> None:
    """Every XLSX cell is the CSV's: text stays text (age band 18_24 is "18_24", not
    1824), numbers are numbers of the same value, empty stays empty."""
    export(tallied, "csv", tmp_path / "t.csv")
    export(tallied, "xlsx", tmp_path / "t.xlsx")
    with open(tmp_path / "t.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    table = list(load_workbook(tmp_path / "t.xlsx")["indicator"].iter_rows(values_only=True))
    assert len(table) == len(rows) + 1
    for row, cells in zip(rows, table[1:], strict=True):
        for column, cell in zip(TABLE_COLUMNS, cells, strict=True):
            text = row[column]
            if text == "":
                assert cell is None, (column, row)
            elif column in NUMERIC_COLUMNS:
                assert isinstance(cell, int | float) and cell == float(text), (column, cell)
            else:
                assert cell == text, (column, cell, text)
    ages = {cells[TABLE_COLUMNS.index("group")] for cells in table[1:]
            if cells[TABLE_COLUMNS.index("breakdown")] == "age"}
    assert {"18_24", "25_34", "65p"} <= ages


def test_every_output_carries_the_label(tallied: dict[str, str], tmp_path: Path) -> None:
    """'Experimental statistics from citizen-generated data' in the CSV (every row), the
    XLSX (table, snapshot sheet, methodology) and the SDMX series comments."""
    assert LABEL == "Experimental statistics from citizen-generated data"
    export(tallied, "csv", tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["label"] == LABEL for r in rows)
    export(tallied, "xlsx", tmp_path / "t.xlsx")
    book = load_workbook(tmp_path / "t.xlsx")
    labels = [r[TABLE_COLUMNS.index("label")]
              for r in list(book["indicator"].iter_rows(values_only=True))[1:]]
    assert labels and set(labels) == {LABEL}
    facts = dict(list(book["snapshot"].iter_rows(values_only=True))[1:])
    assert str(facts["label"]).startswith(LABEL)
    method = "\n".join(str(r[0]) for r in book["methodology"].iter_rows(values_only=True))
    assert LABEL in method
    export(tallied, "sdmx", tmp_path / "s.csv")
    with open(tmp_path / "s.csv", newline="") as fh:
        series = list(csv.DictReader(fh))
    assert series and all(r["COMMENT_TS"].startswith(LABEL + ".") for r in series)
