"""Exports of a tally snapshot (CSV, XLSX with a methodology sheet, SDMX-CSV) and of the
answers as pseudonymous microdata.

SDMX: there is no SDG global series code for 16.6.2, so the series id is national and
configurable (never dressed up as an official one); region goes in CUST_BREAKDOWN.
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select

from gateway.indicator.estimates import AREAS, UNKNOWN, read_margins
from gateway.indicator.tally import cells_of, region_names, snapshot_of
from gateway.store.models import Answer, Campaign, Interview, TallySnapshot
from gateway.store.sessions import real_respondent

# What the method requires every output to say it is.
LABEL = "Experimental statistics from citizen-generated data"
TABLE_COLUMNS = ["area", "measure", "breakdown", "group", "estimate_pct", "ci_low_pct",
                 "ci_high_pct", "ci_method", "n", "n_dk", "n_eff", "deff",
                 "unweighted_pct", "status", "label"]
# The table's numeric columns; every other column is text and stays text in XLSX
# (float() would read the age band "18_24" as 1824).
NUMERIC_COLUMNS = frozenset({"estimate_pct", "ci_low_pct", "ci_high_pct", "n", "n_dk",
                             "n_eff", "deff", "unweighted_pct"})

SDMX_COLUMNS = (
    "DATAFLOW,FREQ,REPORTING_TYPE,SERIES,REF_AREA,SEX,AGE,URBANISATION,"
    "INCOME_WEALTH_QUANTILE,EDUCATION_LEV,OCCUPATION,CUST_BREAKDOWN,COMPOSITE_BREAKDOWN,"
    "DISABILITY_STATUS,ACTIVITY,PRODUCT,TIME_PERIOD,OBS_VALUE,OBS_STATUS,UNIT_MULT,"
    "UNIT_MEASURE,BASE_PER,NATURE,TIME_DETAIL,COMMENT_OBS,TIME_COVERAGE,UPPER_BOUND,"
    "LOWER_BOUND,SOURCE_DETAIL,COMMENT_TS,GEO_INFO_URL,GEO_INFO_TYPE,CUST_BREAKDOWN_LB,"
    "DATA_LAST_UPDATE").split(",")
REF_AREA_GHANA = "288"  # UN M49
DEFAULT_SERIES_PREFIX = "GH_CD1662"  # national, not an SDG global code
DEFAULT_DATAFLOW = "GH_GSS:DF_CIVICDIAL_SDG1662(1.0)"  # a national dataflow
SEX_CODES = {"female": "F", "male": "M"}
AGE_CODES = {"18_24": "Y18T24", "25_34": "Y25T34", "35_44": "Y35T44", "45_54": "Y45T54",
             "55_64": "Y55T64", "65p": "Y_GE65"}
URBAN_CODES = {"urban": "U", "rural": "R"}
# Disability by the Washington Group Short Set. Check against the SDG codelist in force
# before submitting: these are the codes we understand it to use.
DISABILITY_CODES = {"yes": "PD", "no": "NONPD"}
MEASURE_CODES = {"satisfied": "SAT", "index": "IDX"}
# OBS_STATUS: A normal, U low reliability (flagged), M missing (suppressed).
OBS_STATUS = {"published": "A", "flagged": "U", "suppressed": "M",
              "suppressed_secondary": "M"}
# Open text can carry names or numbers: never in the microdata.
FREE_TEXT = frozenset({"improve"})


def _pct(value: Any) -> str:
    return "" if value is None else f"{value * 100:.1f}"


def _num(value: Any, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table_rows(snap: TallySnapshot) -> list[dict[str, Any]]:
    """The indicator table: one row per cell, percentages, suppressed values empty."""
    rows = []
    for c in cells_of(snap):
        hidden = str(c["status"]).startswith("suppressed")
        rows.append({
            "area": c["area"], "measure": c["measure"], "breakdown": c["breakdown"],
            "group": c["group"], "estimate_pct": _pct(c["estimate"]),
            "ci_low_pct": _pct(c["ci_low"]), "ci_high_pct": _pct(c["ci_high"]),
            "ci_method": "" if hidden else c["ci_method"], "n": c["n"], "n_dk": c["n_dk"],
            "n_eff": "" if hidden else _num(c["n_eff"]),
            "deff": "" if hidden else _num(c["deff"], 3),
            "unweighted_pct": _pct(c["unweighted"]), "status": c["status"], "label": LABEL,
        })
    return rows


def methodology_text() -> str:
    return resources.files("gateway.indicator").joinpath("data/METHODOLOGY.md").read_text(
        encoding="utf-8")


def snapshot_header(snap: TallySnapshot, campaign: Campaign) -> list[tuple[str, str]]:
    result = json.loads(snap.result)
    return [
        ("label", f"{LABEL} (SDG 16.6.2, opt-in SMS/USSD survey)"),
        ("campaign", campaign.slug),
        ("snapshot", f"version {snap.version}, {snap.created_at:%Y-%m-%d %H:%M} UTC"),
        ("published", f"{snap.published_at:%Y-%m-%d %H:%M} UTC" if snap.published_at
         else "no"),
        ("questionnaire versions", snap.questionnaire_versions),
        ("interviews (completed)", f"{snap.n_interviews} ({snap.n_completed})"),
        ("margins sha256", snap.margins_sha256),
        ("parameters", snap.params),
        ("weighting", json.dumps(result["weighting"], sort_keys=True)),
        *[("note", note) for note in result["notes"]],
    ]


def write_csv(snap: TallySnapshot, path: Path) -> int:
    rows = table_rows(snap)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def write_xlsx(snap: TallySnapshot, campaign: Campaign, path: Path) -> int:
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "indicator"
    sheet.append(TABLE_COLUMNS)
    rows = table_rows(snap)
    for row in rows:
        # Numbers as numbers, suppressed cells empty (never 0).
        sheet.append([_cell_value(c, row[c]) for c in TABLE_COLUMNS])
    about = book.create_sheet("snapshot")
    about.append(["item", "value"])
    for item, value in snapshot_header(snap, campaign):
        about.append([item, value])
    method = book.create_sheet("methodology")
    for line in methodology_text().splitlines():
        method.append([line])
    margins = book.create_sheet("margins")
    for line in csv.reader(snap.margins.splitlines()):
        margins.append(line)
    book.save(path)
    return len(rows)


def _cell_value(column: str, value: Any) -> Any:
    """A table value as an XLSX cell: numeric columns as numbers, text as text, empty as
    an empty cell."""
    if value == "" or value is None:
        return None
    if column in NUMERIC_COLUMNS and isinstance(value, str):
        return float(value)
    return value


def sdmx_rows(snap: TallySnapshot, campaign: Campaign, *,
              series_prefix: str = DEFAULT_SERIES_PREFIX,
              dataflow: str = DEFAULT_DATAFLOW) -> Iterator[dict[str, str]]:
    """One observation per cell with SDG-coded dimensions; cells whose group has no code
    (not stated) are left out: they stay in the CSV/XLSX table."""
    labels = region_names(read_margins(snap.margins))
    year = f"{snap.created_at:%Y}"
    updated = f"{snap.created_at:%Y-%m-%d}"
    for c in cells_of(snap):
        dims = _dimensions(c["breakdown"], c["group"], labels)
        if dims is None:
            continue
        area = c["area"]
        measure = MEASURE_CODES.get(c["measure"]) or c["measure"].split("_", 1)[1].upper()
        status = str(c["status"])
        hidden = status.startswith("suppressed")
        if hidden:
            comment = ("suppressed (secondary, so that no hidden cell can be derived)"
                       if status == "suppressed_secondary"
                       else "suppressed (unweighted n < threshold or effective n < threshold)")
        else:
            comment = (f"{'low precision (effective n < 50); ' if status == 'flagged' else ''}"
                       f"raked to census margins, trimmed; 95% CI {c['ci_method']}; "
                       f"n={c['n']}, n_eff={c['n_eff']:.1f}, deff={c['deff']:.3f}; "
                       f"don't know/refuse={c['n_dk']}")
        row = dict.fromkeys(SDMX_COLUMNS, "")
        row.update({
            "DATAFLOW": dataflow, "FREQ": "A", "REPORTING_TYPE": "N",
            "SERIES": f"{series_prefix}_{area.upper()}_{measure}",
            "REF_AREA": REF_AREA_GHANA, "SEX": "_T", "AGE": "_T", "URBANISATION": "_T",
            "INCOME_WEALTH_QUANTILE": "_T", "EDUCATION_LEV": "_T", "OCCUPATION": "_T",
            "CUST_BREAKDOWN": "_T", "COMPOSITE_BREAKDOWN": "_Z", "DISABILITY_STATUS": "_T",
            "ACTIVITY": "_T", "PRODUCT": "_T", "TIME_PERIOD": year,
            "OBS_VALUE": "" if hidden else _pct(c["estimate"]),
            "OBS_STATUS": OBS_STATUS.get(status, "A"), "UNIT_MULT": "0",
            "UNIT_MEASURE": "PT", "NATURE": "C", "COMMENT_OBS": comment,
            "UPPER_BOUND": "" if hidden else _pct(c["ci_high"]),
            "LOWER_BOUND": "" if hidden else _pct(c["ci_low"]),
            "SOURCE_DETAIL": (f"CivicDial opt-in SMS/USSD survey, campaign {campaign.slug}, "
                              f"tally snapshot {snap.version}"),
            "COMMENT_TS": (f"{LABEL}. {AREAS[area][0]}. National series id "
                           "(no SDG global series code exists for 16.6.2); "
                           "income is a self-reported proxy, not quintiles."),
            "DATA_LAST_UPDATE": updated,
        })
        row.update(dims)
        yield row


def _dimensions(breakdown: str, group: str, regions: dict[str, str]) -> dict[str, str] | None:
    if breakdown == "total":
        return {}
    if UNKNOWN in group.split("|"):
        return None
    if breakdown == "sex":
        return {"SEX": SEX_CODES[group]} if group in SEX_CODES else None
    if breakdown == "age":
        return {"AGE": AGE_CODES[group]} if group in AGE_CODES else None
    if breakdown == "urban":
        return {"URBANISATION": URBAN_CODES[group]} if group in URBAN_CODES else None
    if breakdown == "disability":
        return ({"DISABILITY_STATUS": DISABILITY_CODES[group]}
                if group in DISABILITY_CODES else None)
    if breakdown == "income":
        return {"CUST_BREAKDOWN": f"INCPROXY_{group.upper()}",
                "CUST_BREAKDOWN_LB": f"Household income feeling (proxy): {group}"}
    if breakdown == "region":
        return {"CUST_BREAKDOWN": f"GH_{group.upper()}",
                "CUST_BREAKDOWN_LB": regions.get(group, group)}
    if breakdown == "region_sex":
        region, sex = group.split("|", 1)
        if sex not in SEX_CODES:
            return None
        return {"SEX": SEX_CODES[sex], "CUST_BREAKDOWN": f"GH_{region.upper()}",
                "CUST_BREAKDOWN_LB": regions.get(region, region)}
    return None


def write_sdmx(snap: TallySnapshot, campaign: Campaign, path: Path, *,
               series_prefix: str = DEFAULT_SERIES_PREFIX,
               dataflow: str = DEFAULT_DATAFLOW) -> int:
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=SDMX_COLUMNS)
        writer.writeheader()
        for row in sdmx_rows(snap, campaign, series_prefix=series_prefix, dataflow=dataflow):
            writer.writerow(row)
            n += 1
    return n


def write_microdata(engine: Engine, campaign_id: int, path: Path) -> int:
    """Answers in long form with the respondent pseudonym, for the NSO's own analysis.
    No phone number exists in these tables; open text is left out (it can hold names)."""
    a = Answer.__table__.c
    i = Interview.__table__.c
    stmt = (select(a.interview_id, a.respondent, i.status, i.lang, a.questionnaire_version,
                   a.question, a.value, a.answered_at)
            .select_from(Answer.__table__.join(Interview.__table__, i.id == a.interview_id))
            .where(a.campaign_id == campaign_id, a.value.is_not(None),
                   a.question.not_in(FREE_TEXT), real_respondent(a.respondent))
            .order_by(a.interview_id, a.seq))
    n = 0
    with engine.connect() as conn, open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["interview_id", "respondent_pseudonym", "interview_status", "lang",
                         "questionnaire_version", "question", "value", "answered_at"])
        for row in conn.execute(stmt):
            writer.writerow([row.interview_id, row.respondent, row.status, row.lang or "",
                             row.questionnaire_version, row.question, row.value,
                             row.answered_at.isoformat() if row.answered_at else ""])
            n += 1
    return n


# A download's media type and file ending, per format (the API and the console).
FORMATS = {"csv": ("text/csv", "csv"), "xlsx": (
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "xlsx"),
    "sdmx": ("text/csv", "csv"), "microdata": ("text/csv", "csv")}


def export_bytes(engine: Engine, campaign: Campaign, fmt: str,
                 version: int | None = None) -> bytes:
    """One download: the indicator table of a snapshot (the latest, or `version`) as csv,
    xlsx or sdmx, or the microdata. LookupError when there is no such snapshot."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"export.{FORMATS[fmt][1]}"
        if fmt == "microdata":
            write_microdata(engine, campaign.id, path)
            return path.read_bytes()
        snap = snapshot_of(engine, campaign.id, version, then="POST .../tally first")
        if fmt == "csv":
            write_csv(snap, path)
        elif fmt == "xlsx":
            write_xlsx(snap, campaign, path)
        else:
            write_sdmx(snap, campaign, path)
        return path.read_bytes()
