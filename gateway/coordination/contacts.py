"""Contact lists: read a coordinator's CSV, normalise numbers, store them encrypted.

Spreadsheets arrive in every shape: UTF-8 with or without a BOM, Windows-1252 from Excel,
UTF-16, old-Mac line endings, semicolons from French locales, quoted fields, blank lines;
a workbook or binary data is refused (gateway.csvfiles). The number column may be
called phone, number, msisdn or mobile. Good rows are imported, bad rows are reported with
their line number and reason, and importing the same file again changes nothing (contacts
are keyed by their pseudonym).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, select

from gateway import csvfiles
from gateway.phones import BadPhoneNumber, to_e164
from gateway.store.crypto import NumberBox
from gateway.store.db import upsert_insert
from gateway.store.models import CampaignContact, Contact
from gateway.store.sessions import pseudonym

PHONE_COLUMNS = ("phone", "number", "msisdn", "mobile", "phone_number", "telephone", "tel")
# Nine digits or more in a row (spaces, dots, dashes and brackets between them allowed): a
# phone number, national or international, where an attribute should be a category.
_PHONE_LIKE = re.compile(r"\+?\d(?:[\s.()-]*\d){8,}")
KNOWN_COLUMNS = {"language", "lang", "region"}
CHUNK = 2000


class ContactFileError(ValueError):
    """The file as a whole cannot be read (not a single row was imported)."""


@dataclass(frozen=True)
class Rejected:
    line: int
    reason: str


@dataclass
class ImportResult:
    rows: int = 0
    imported: int = 0  # new to this campaign
    already: int = 0  # in the campaign before (a re-import)
    rejected: list[Rejected] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"rows": self.rows, "imported": self.imported, "already_present": self.already,
                "rejected": [{"line": r.line, "reason": r.reason} for r in self.rejected]}


@dataclass(frozen=True)
class ContactRow:
    line: int
    phone: str
    language: str
    region: str
    attributes: dict[str, str]


def read_rows(data: bytes, default_region: str = "GH") -> Iterator[ContactRow | Rejected]:
    """Each data row, a contact or why it is rejected; ContactFileError if the file as a
    whole cannot be read (not CSV text, no header, no phone column)."""
    try:
        yield from _rows(csvfiles.decode(data), default_region)
    except csvfiles.UnreadableCsv as exc:
        raise ContactFileError(str(exc)) from None


def _rows(text: str, default_region: str) -> Iterator[ContactRow | Rejected]:
    if not text.strip():
        raise ContactFileError("the file is empty")
    records = csvfiles.records(text, csvfiles.delimiter_of(text))
    try:
        _, header = next(records)
    except StopIteration:
        raise ContactFileError("the file has no header row") from None
    names = [h.strip().lower().replace(" ", "_") for h in header]
    phone_col = next((names.index(c) for c in PHONE_COLUMNS if c in names), None)
    if phone_col is None:
        raise ContactFileError(
            f"no phone number column in the header {header!r}: name one of "
            f"{', '.join(PHONE_COLUMNS)}")
    phones = [header[i].strip() for i, n in enumerate(names) if n in PHONE_COLUMNS]
    if len(phones) > 1:
        # Only one is sealed; the other would be kept as an attribute, in the clear.
        raise ContactFileError(f"{len(phones)} phone number columns ({', '.join(phones)}): "
                               "keep one, a contact has one number")
    lang_col = next((names.index(c) for c in ("language", "lang") if c in names), None)
    region_col = names.index("region") if "region" in names else None
    for line, cells in records:
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(names):
            yield Rejected(line, f"{len(cells)} fields, the header has {len(names)}")
            continue
        cells = cells + [""] * (len(names) - len(cells))
        try:
            phone = to_e164(cells[phone_col], default_region)
        except BadPhoneNumber as exc:
            yield Rejected(line, str(exc))
            continue
        attributes = {names[i]: v.strip() for i, v in enumerate(cells)
                      if i not in (phone_col, lang_col, region_col) and v.strip()}
        numbered = next((name for name, v in attributes.items() if _PHONE_LIKE.search(v)),
                        None)
        if numbered is not None:
            yield Rejected(line, f"column {numbered!r} holds what looks like a phone number; "
                                 "other columns are stored unencrypted: remove it")
            continue
        yield ContactRow(line, phone,
                         cells[lang_col].strip() if lang_col is not None else "",
                         cells[region_col].strip() if region_col is not None else "",
                         attributes)


def count_lines(data: bytes) -> int:
    """About how many lines the file has, for a progress bar: old-Mac files end theirs
    with `\\r` alone, so counting `\\n` would find none."""
    return max(1, data.count(b"\n"), data.count(b"\r"))


def import_contacts(engine: Engine, campaign_id: int, data: bytes, *, pseudonym_key: bytes,
                    box: NumberBox, default_region: str = "GH",
                    progress: Callable[[int], None] | None = None) -> ImportResult:
    """Import a CSV into a campaign: new contacts created, all good rows enrolled."""
    result = ImportResult()
    batch: dict[str, ContactRow] = {}
    # The whole file is read before the first chunk is stored, so a file refused at its
    # last line (ContactFileError) leaves nothing half-imported.
    for row in list(read_rows(data, default_region)):
        result.rows += 1
        if isinstance(row, Rejected):
            result.rejected.append(row)
            continue
        key = pseudonym(pseudonym_key, row.phone)
        if key in batch:  # the same number twice in one file
            result.already += 1
            continue
        batch[key] = row
        if len(batch) >= CHUNK:
            _store(engine, campaign_id, batch, box, result)
            if progress:
                progress(len(batch))
            batch = {}
    if batch:
        _store(engine, campaign_id, batch, box, result)
        if progress:
            progress(len(batch))
    return result


def _store(engine: Engine, campaign_id: int, batch: dict[str, ContactRow], box: NumberBox,
           result: ImportResult) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(upsert_insert(engine, Contact.__table__).on_conflict_do_nothing(  # type: ignore[attr-defined]
            index_elements=["respondent"]), [{
                "respondent": key, "recipient": box.seal(row.phone),
                "language": row.language, "region": row.region,
                "attributes": json.dumps(row.attributes, ensure_ascii=False),
                "created_at": now,
            } for key, row in batch.items()])
        ids = dict(conn.execute(select(Contact.respondent, Contact.id).where(
            Contact.respondent.in_(list(batch)))).all())
        enrolled = set(conn.scalars(select(CampaignContact.contact_id).where(
            CampaignContact.campaign_id == campaign_id,
            CampaignContact.contact_id.in_(list(ids.values())))).all())
        new = [{"campaign_id": campaign_id, "contact_id": cid, "created_at": now}
               for cid in ids.values() if cid not in enrolled]
        if new:
            conn.execute(upsert_insert(engine, CampaignContact.__table__).on_conflict_do_nothing(  # type: ignore[attr-defined]
                index_elements=["campaign_id", "contact_id"]), new)
    result.imported += len(new)
    result.already += len(batch) - len(new)


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ContactFileError(f"cannot read {path}: {exc.strerror}") from None
