"""The text of an uploaded CSV (contacts, quotas), whatever a spreadsheet saved it as.

Coordinators upload what Excel, LibreOffice or Numbers gave them: UTF-8 with or without a
BOM, Windows-1252, UTF-16 ("Unicode Text"), Windows, Unix or old-Mac (`\\r`) line endings,
and sometimes the workbook itself. Whatever cannot be read as CSV text is refused here with
what to do about it, before a csv module error or a nonsense header gets out.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator

SAVE_AS = "save it as CSV UTF-8 (in Excel: File > Save As > CSV UTF-8) and use that file"

# Files people pick by mistake, known by their first bytes.
SIGNATURES = (
    (b"PK\x03\x04", "an .xlsx workbook or another zip archive"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an .xls workbook"),
    (b"%PDF-", "a PDF document"),
)

# UTF-32 first: its little-endian BOM starts with UTF-16's.
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)


class UnreadableCsv(ValueError):
    """The file cannot be read as CSV at all; the message says why and what to do."""


def decode(data: bytes) -> str:
    """The file's text: a BOM decides UTF-16/32; else UTF-8, else Windows-1252 (what Excel
    writes), else Latin-1. Workbooks and binary data are refused rather than guessed at."""
    for magic, what in SIGNATURES:
        if data.startswith(magic):
            raise UnreadableCsv(f"the file is not a UTF-8 CSV file (it looks like {what}): "
                                f"{SAVE_AS}")
    text = _text(data)
    # A NUL never occurs in a spreadsheet's CSV text, and the csv module would stop at it.
    if "\x00" in text:
        raise UnreadableCsv("the file is not a UTF-8 CSV file (it holds binary data, or text "
                            f"in an encoding like UTF-16 without a byte-order mark): {SAVE_AS}")
    return text


def _text(data: bytes) -> str:
    for bom, encoding in BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding)  # the codec reads and drops the BOM
            except UnicodeDecodeError:
                raise UnreadableCsv(f"the file starts as {encoding.upper()} text but is not "
                                    f"valid {encoding.upper()}: {SAVE_AS}") from None
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")  # cannot fail: every byte is a character


def delimiter_of(text: str) -> str:
    """',', ';' (Excel in many locales) or a tab (Excel's "Unicode Text"), whichever the
    header has most of: it has no quoted values to confuse the count, unlike the rows
    csv.Sniffer would look at."""
    lines = text.lstrip("\r\n").splitlines()
    return max((",", ";", "\t"), key=lines[0].count) if lines else ","


def records(text: str, delimiter: str = ",") -> Iterator[tuple[int, list[str]]]:
    """Each CSV record of the text with the line it ends on (csv.reader's line_num).

    newline='' hands the csv module each line ending as it is, so `\\r`-only (old Mac)
    files read like any other and a quoted newline stays in its field. A csv error names
    the line its record began on, where the unclosed quote is, not the end of the file
    the field ran on to."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    start = 1
    try:
        for cells in reader:
            yield reader.line_num, cells
            start = reader.line_num + 1
    except csv.Error as exc:
        # With NULs refused and line endings read as they come, what is left is a field
        # running on past the csv module's limit: nearly always a quote never closed.
        raise UnreadableCsv(f"line {start}: {exc}; is a quote (\") opened there and never "
                            f"closed? Fix it, or {SAVE_AS}") from None
