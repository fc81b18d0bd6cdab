"""Load an XLSForm (.xlsx, .md or .csv, read by pyxform) into an immutable Questionnaire.

Only a documented subset of XLSForm is accepted (see README, "Questionnaires"). Anything
outside it, or malformed, raises FormError naming the sheet, row and column, so a
coordinator can fix the spreadsheet instead of reading a traceback.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path

from pyxform.errors import PyXFormError
from pyxform.xls2json_backends import get_xlsform
from pyxform.xls2xform import convert

from gateway.interview.expressions import Expression, ExpressionError, compile_expression

INPUT_TYPES = ("select_one", "select_multiple", "integer", "decimal", "text", "note")
SUPPORTED_TYPES = (*INPUT_TYPES, "calculate", "begin_group", "end_group")
SURVEY_COLUMNS = {
    "type", "name", "label", "hint", "guidance_hint", "required", "required_message",
    "constraint", "constraint_message", "relevant", "calculation", "appearance",
}
TRANSLATABLE = {"label", "hint", "guidance_hint", "required_message", "constraint_message"}
CHOICES_COLUMNS = {"list_name", "name", "label"}
SETTINGS_COLUMNS = {"form_title", "form_id", "version", "default_language", "instance_name"}
CONSENT = "consent"
# The appearance of a note that ends the survey for someone outside its population.
INELIGIBLE = "ineligible"
FILE_TYPES = (".md", ".csv", ".xlsx", ".xlsm", ".xls")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_LANG = re.compile(r"^(?P<name>.*?)\s*\((?P<code>[A-Za-z]{2,3}(?:-[A-Za-z0-9]+)*)\)\s*$")
DEFAULT_LANG = "default"


class FormError(ValueError):
    """A questionnaire that cannot be used, with where to look in the spreadsheet."""

    def __init__(self, message: str, sheet: str | None = None, row: int | None = None,
                 column: str | None = None) -> None:
        self.sheet, self.row, self.column, self.message = sheet, row, column, message
        where = ", ".join(
            part for part in (
                f"sheet '{sheet}'" if sheet else "",
                f"row {row}" if row else "",
                f"column '{column}'" if column else "",
            ) if part
        )
        super().__init__(f"{where}: {message}" if where else message)


@dataclass(frozen=True)
class Language:
    key: str  # as written in the form, e.g. "English (en)"
    code: str  # "en"
    name: str  # "English"


@dataclass(frozen=True)
class Choice:
    name: str
    labels: dict[str, str]


@dataclass(frozen=True)
class Question:
    index: int
    name: str
    type: str
    labels: dict[str, str]
    choices: tuple[Choice, ...] = ()
    required: bool = False
    required_messages: dict[str, str] = field(default_factory=dict)
    constraint: Expression | None = None
    constraint_messages: dict[str, str] = field(default_factory=dict)
    # Own `relevant` plus those of enclosing groups; all must hold.
    relevant: tuple[Expression, ...] = ()
    calculation: Expression | None = None
    row: int = 0
    appearance: str = ""

    def label(self, lang: str) -> str:
        return _pick(self.labels, lang) or self.name

    @property
    def is_select(self) -> bool:
        return self.type in ("select_one", "select_multiple")

    @property
    def screens_out(self) -> bool:
        """A note with appearance `ineligible`: whoever reaches it is not in the survey's
        population (the shipped form: under 18). It is the last screen (END), and the
        interview is screened out, never completed."""
        return self.type == "note" and self.appearance == INELIGIBLE


@dataclass(frozen=True)
class Questionnaire:
    version: str  # content hash: identical source, identical version
    form_id: str
    title: str
    form_version: str
    languages: tuple[Language, ...]
    questions: tuple[Question, ...]
    source: bytes = field(repr=False)
    filename: str = ""

    @property
    def default_language(self) -> str:
        return self.languages[0].key

    def language(self, key: str) -> Language:
        for lang in self.languages:
            if lang.key == key:
                return lang
        return self.languages[0]

    @property
    def asked(self) -> int:
        """Questions a respondent can be shown (calculations excluded)."""
        return sum(q.type != "calculate" for q in self.questions)


def _pick(texts: dict[str, str], lang: str) -> str:
    return texts.get(lang) or texts.get(DEFAULT_LANG) or next(iter(texts.values()), "")


def content_version(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()[:16]


def _split_column(column: str) -> tuple[str, str | None]:
    base, sep, lang = column.partition("::")
    return base.strip(), (lang.strip() if sep else None)


def _language(key: str) -> Language:
    if key == DEFAULT_LANG:
        return Language(key, "en", "Default")
    m = _LANG.match(key)
    if m:
        return Language(key, m.group("code").lower(), m.group("name"))
    return Language(key, key.lower()[:2], key)


def _translations(row: dict[str, str], base: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for column, value in row.items():
        name, lang = _split_column(column)
        if name == base and value and value.strip():
            out[lang or DEFAULT_LANG] = value.strip()
    return out


def _yes(value: str | None) -> bool:
    return (value or "").strip().lower() in ("yes", "true", "true()", "1")


def _expr(row: dict[str, str], column: str, sheet: str, rownum: int) -> Expression | None:
    src = (row.get(column) or "").strip()
    if not src:
        return None
    try:
        return compile_expression(src)
    except ExpressionError as exc:
        raise FormError(f"cannot use expression {src!r}: {exc}", sheet, rownum, column) from None


def _check_columns(rows: list[dict[str, str]], sheet: str, allowed: set[str],
                   extra_ok: bool = False, errors: list[FormError] | None = None) -> None:
    for i, row in enumerate(rows):
        try:
            for column in row:
                base, _ = _split_column(column)
                if base not in allowed and not extra_ok:
                    raise FormError(
                        f"column '{column}' is not in the supported XLSForm subset "
                        f"(supported: {', '.join(sorted(allowed))})", sheet, i + 2, column)
        except FormError as exc:
            if errors is None:
                raise
            errors.append(exc)


def load_questionnaire(source: bytes, filename: str = "form.md") -> Questionnaire:
    """Parse and validate an XLSForm; raise FormError naming sheet, row and column."""
    suffix = Path(filename).suffix.lower()
    if suffix not in FILE_TYPES:
        raise FormError(f"unsupported file type {suffix or '(none)'!r}: use .xlsx, .md or .csv")
    try:
        book = get_xlsform(BytesIO(source), file_type=suffix)
    except (PyXFormError, ValueError, KeyError, OSError, UnicodeDecodeError) as exc:
        raise FormError(f"cannot read the file as an XLSForm: {exc}") from None
    survey = list(book.survey or [])
    choices_rows = list(book.choices or [])
    settings_rows = list(book.settings or [])
    if not survey:
        raise FormError("the form has no 'survey' sheet, or it is empty", "survey")
    _check_columns(survey, "survey", SURVEY_COLUMNS)
    # Extra choices columns are filter attributes (choice_filter), which are harmless.
    _check_columns(choices_rows, "choices", CHOICES_COLUMNS, extra_ok=True)
    _check_columns(settings_rows, "settings", SETTINGS_COLUMNS)

    lists = _read_choices(choices_rows)
    questions, relevants = _read_survey(survey, lists)
    languages = _read_languages(survey, choices_rows, settings_rows)
    _check_references(questions, relevants)
    _check_consent(questions)

    # pyxform's own conversion catches what our checks do not (e.g. duplicate names in
    # nested groups, malformed settings), and keeps us honest about "this is an XLSForm".
    try:
        convert(asdict(book), warnings=[])
    except PyXFormError as exc:
        raise FormError(f"pyxform rejected the form: {exc}") from None

    settings = settings_rows[0] if settings_rows else {}
    stem = Path(filename).stem
    return Questionnaire(
        version=content_version(source),
        form_id=(settings.get("form_id") or stem).strip(),
        title=(settings.get("form_title") or stem).strip(),
        form_version=(settings.get("version") or "").strip(),
        languages=languages,
        questions=tuple(questions),
        source=source,
        filename=Path(filename).name,
    )


def collect_form_errors(source: bytes, filename: str = "form.md"
                        ) -> tuple[Questionnaire | None, list[FormError]]:
    """The questionnaire, or every error found in it: each row of every sheet is checked
    on its own, so a coordinator fixes them all in one go (load_questionnaire stops at the
    first). Checks across rows (references, consent, pyxform) run once the rows are clean."""
    suffix = Path(filename).suffix.lower()
    try:
        if suffix not in FILE_TYPES:
            raise FormError(f"unsupported file type {suffix or '(none)'!r}: use .xlsx, .md "
                            "or .csv")
        book = get_xlsform(BytesIO(source), file_type=suffix)
    except FormError as exc:
        return None, [exc]
    except (PyXFormError, ValueError, KeyError, OSError, UnicodeDecodeError) as exc:
        return None, [FormError(f"cannot read the file as an XLSForm: {exc}")]
    errors: list[FormError] = []
    survey, choices_rows = list(book.survey or []), list(book.choices or [])
    _check_columns(survey, "survey", SURVEY_COLUMNS, errors=errors)
    _check_columns(choices_rows, "choices", CHOICES_COLUMNS, extra_ok=True, errors=errors)
    _check_columns(list(book.settings or []), "settings", SETTINGS_COLUMNS, errors=errors)
    lists = _read_choices(choices_rows, errors)
    try:
        _read_survey(survey, lists, errors)
    except FormError as exc:  # the sheet as a whole (an unclosed group, no questions)
        errors.append(exc)
    if errors:
        return None, errors
    try:
        return load_questionnaire(source, filename), []
    except FormError as exc:
        return None, [exc]


def load_questionnaire_file(path: str | Path) -> Questionnaire:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise FormError(f"cannot read {p}: {exc.strerror}") from None
    return load_questionnaire(data, p.name)


def _read_choices(rows: list[dict[str, str]],
                  errors: list[FormError] | None = None) -> dict[str, list[Choice]]:
    lists: dict[str, list[Choice]] = {}
    for i, row in enumerate(rows):
        try:
            rownum = i + 2
            list_name = (row.get("list_name") or "").strip()
            name = (row.get("name") or "").strip()
            if not list_name:
                raise FormError("choice has no list_name", "choices", rownum, "list_name")
            if not name:
                raise FormError("choice has no name", "choices", rownum, "name")
            if " " in name:
                raise FormError(f"choice name {name!r} contains a space", "choices", rownum, "name")
            labels = _translations(row, "label")
            if not labels:
                raise FormError(f"choice {name!r} has no label", "choices", rownum, "label")
            existing = lists.setdefault(list_name, [])
            if any(c.name == name for c in existing):
                raise FormError(f"choice {name!r} appears twice in list {list_name!r}",
                                "choices", rownum, "name")
            existing.append(Choice(name, labels))
        except FormError as exc:
            if errors is None:
                raise
            errors.append(exc)
    return lists


def _read_survey(rows: list[dict[str, str]], lists: dict[str, list[Choice]],
                 errors: list[FormError] | None = None
                 ) -> tuple[list[Question], list[tuple[int, int, Expression]]]:
    """The questions, and each row's own `relevant` (group or question) as (row, index of
    the first question it governs, expression), so references are checked on that row."""
    questions: list[Question] = []
    relevants: list[tuple[int, int, Expression]] = []
    groups: list[tuple[str, Expression | None, int]] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        try:
            rownum = i + 2
            raw_type = " ".join((row.get("type") or "").split())
            if not raw_type:
                if any((v or "").strip() for v in row.values()):
                    raise FormError("row has no type", "survey", rownum, "type")
                continue
            parts = raw_type.split(" ")
            # "begin group" / "begin repeat" are spellings of begin_group / begin_repeat.
            qtype = f"{parts[0]}_{parts[1]}" if parts[0] in ("begin", "end") and len(parts) > 1 \
                else parts[0]
            if qtype not in SUPPORTED_TYPES:
                raise FormError(
                    f"question type {qtype!r} is not supported (supported: "
                    f"{', '.join(SUPPORTED_TYPES)})", "survey", rownum, "type")
            if qtype == "end_group":
                if not groups:
                    raise FormError("end_group without a matching begin_group", "survey",
                                    rownum, "type")
                groups.pop()
                continue
            name = (row.get("name") or "").strip()
            if not name:
                raise FormError("row has no name", "survey", rownum, "name")
            if not _NAME.match(name):
                raise FormError(f"name {name!r} must start with a letter or _ and contain only "
                                "letters, digits, _ . -", "survey", rownum, "name")
            if name in seen:
                raise FormError(f"name {name!r} is already used on row {seen[name]}", "survey",
                                rownum, "name")
            seen[name] = rownum
            relevant = _expr(row, "relevant", "survey", rownum)
            if relevant is not None:
                relevants.append((rownum, len(questions), relevant))
            if qtype == "begin_group":
                groups.append((name, relevant, rownum))
                continue
            choices: tuple[Choice, ...] = ()
            if qtype in ("select_one", "select_multiple"):
                if len(parts) != 2:
                    raise FormError(f"{qtype} needs exactly one list name, e.g. '{qtype} yesno'",
                                    "survey", rownum, "type")
                if parts[1] not in lists:
                    raise FormError(f"list {parts[1]!r} is not in the choices sheet", "survey",
                                    rownum, "type")
                choices = tuple(lists[parts[1]])
            elif len(parts) > 1:
                raise FormError(f"type {raw_type!r}: {qtype} takes no list name", "survey",
                                rownum, "type")
            labels = _translations(row, "label")
            if not labels and qtype != "calculate":
                raise FormError(f"question {name!r} has no label", "survey", rownum, "label")
            calculation = _expr(row, "calculation", "survey", rownum)
            if qtype == "calculate" and calculation is None:
                raise FormError("calculate needs a calculation", "survey", rownum, "calculation")
            constraint = _expr(row, "constraint", "survey", rownum)
            required_raw = (row.get("required") or "").strip()
            if required_raw and required_raw.lower() not in (
                    "yes", "no", "true", "false", "true()", "false()", "1", "0"):
                raise FormError(f"required must be yes or no, got {required_raw!r} "
                                "(expressions are not supported here)", "survey", rownum,
                                "required")
            appearance = (row.get("appearance") or "").strip()
            if appearance == INELIGIBLE and qtype != "note":
                raise FormError(f"appearance {INELIGIBLE!r} is only for a note (the screen "
                                "that ends the survey for someone outside its population)",
                                "survey", rownum, "appearance")
            questions.append(Question(
                index=len(questions),
                name=name,
                type=qtype,
                labels=labels,
                choices=choices,
                required=_yes(required_raw),
                required_messages=_translations(row, "required_message"),
                constraint=constraint,
                constraint_messages=_translations(row, "constraint_message"),
                relevant=tuple(g[1] for g in groups if g[1] is not None)
                + ((relevant,) if relevant else ()),
                calculation=calculation,
                row=rownum,
                appearance=appearance,
            ))
        except FormError as exc:
            if errors is None:
                raise
            errors.append(exc)
    if groups:
        name, _, rownum = groups[-1]
        raise FormError(f"group {name!r} is never closed with end_group", "survey",
                        rownum, "type")
    if not any(q.type in INPUT_TYPES for q in questions):
        raise FormError("the survey has no questions", "survey")
    return questions, relevants


def _read_languages(survey: list[dict[str, str]], choices: list[dict[str, str]],
                    settings: list[dict[str, str]]) -> tuple[Language, ...]:
    keys: list[str] = []
    for row in survey:
        for column in row:
            base, lang = _split_column(column)
            if base == "label" and (lang or DEFAULT_LANG) not in keys:
                keys.append(lang or DEFAULT_LANG)
    if not keys:
        keys = [DEFAULT_LANG]
    default = (settings[0].get("default_language") or "").strip() if settings else ""
    if default:
        if default not in keys:
            raise FormError(f"default_language {default!r} has no label:: column "
                            f"(languages: {', '.join(keys)})", "settings", 2,
                            "default_language")
        keys.remove(default)
        keys.insert(0, default)
    return tuple(_language(k) for k in keys)


def _check_references(questions: list[Question],
                      relevants: list[tuple[int, int, Expression]]) -> None:
    names = {q.name for q in questions}
    position = {q.name: q.index for q in questions}
    checks = [(row, index, "relevant", expr) for row, index, expr in relevants]
    checks += [(q.row, q.index, column, expr) for q in questions
               for column, expr in (("constraint", q.constraint),
                                    ("calculation", q.calculation)) if expr is not None]
    # Report the first problem in sheet order.
    for row, index, column, expr in sorted(checks, key=lambda c: c[0]):
        for ref in sorted(expr.refs):
            if ref not in names:
                raise FormError(f"${{{ref}}} does not name a question", "survey", row, column)
            if column == "relevant" and position[ref] >= index:
                raise FormError(f"relevant refers to ${{{ref}}}, which comes later",
                                "survey", row, column)


def _check_consent(questions: list[Question]) -> None:
    first = next(q for q in questions if q.type != "calculate")
    if first.name != CONSENT or first.type != "select_one" or not any(
            c.name == "yes" for c in first.choices):
        raise FormError(
            "the first question must be the consent screen: a select_one named 'consent' "
            "with a choice named 'yes' (no answer is stored before consent)",
            "survey", first.row, "name")
    if first.relevant:
        # A consent screen that can be skipped would let the interview run without consent.
        raise FormError("the consent question must always be asked: remove its 'relevant' "
                        "(or its group's)", "survey", first.row, "relevant")
