"""Read and validate a site's data manifest (CSV or JSONL), one row per recording session.

Validation never stops at the first problem: every row is checked, each problem is kept
with its line number and field, and rows with errors are skipped while the rest are used.
Only a file that cannot be read or trusted as a whole (missing, empty, not UTF-8, no rows,
broken CSV quoting) raises :class:`DataError`; its message names the file and line but
never a row's content, because a training site passes it on to the coordinator.
See ``docs/data-manifest.md`` for the schema.
"""

from __future__ import annotations

import csv
import datetime as dt
import errno
import io
import json
import os
import re
import stat
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from shared.errors import DataError

REQUIRED = ("patient_id", "session_id", "recorded_at", "audio_path", "language")
OPTIONAL = ("transcript_path", "transcript", "label", "relapse_onset")
_BCP47 = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the manifest or a file it names."""

    line: int | None  # 1-based line in the manifest; None for whole-file problems
    field: str
    message: str
    severity: str = "error"  # "error": row skipped; "warning": row kept; "info": fixed (e.g. resampled)

    def render(self, manifest: Path) -> str:
        where = f"{manifest.name}:{self.line}" if self.line else manifest.name
        return f"{where} [{self.field}] {self.message}"


@dataclass(frozen=True)
class SessionRow:
    """A validated manifest row; paths are absolute and inside the manifest's folder."""

    line: int
    patient_id: str
    session_id: str
    recorded_at: dt.datetime
    audio_path: Path
    language: str
    label: int | None
    transcript: str | None
    relapse_onset: bool = False  # the clinically recorded start of an acute relapse (evaluation only)
    transcript_path: Path | None = None  # the transcript's file, if it came from one (a site worker watches it for edits)


@dataclass
class Manifest:
    """The usable rows and every problem found (rows with errors are not in ``rows``)."""

    path: Path
    rows: list[SessionRow] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    total_rows: int = 0

    @property
    def skipped_rows(self) -> int:
        return self.total_rows - len(self.rows)


_READERS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def read_manifest(path: str | Path) -> Manifest:
    """Parse and validate ``path``; raise :class:`DataError` only if nothing can be read."""
    p = Path(path)
    kind = _READERS.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"Manifest {p} must end in .csv, .jsonl or .ndjson, not {p.suffix!r}; rename it after the format it holds (see docs/data-manifest.md).")
    text = _manifest_text(p)
    records, problems, broken = _read_csv(text, p) if kind == "csv" else _read_jsonl(text)  # broken: rows skipped before validation
    if not records and not broken and not any(pr.severity == "error" for pr in problems):
        raise DataError(f"Manifest {p} has a header row but no session rows; add one row per recording session (see docs/data-manifest.md).")
    manifest = Manifest(path=p, problems=problems, total_rows=len(records) + broken)
    base = p.resolve().parent
    seen: dict[str, int] = {}
    for line, rec in records:
        row = _validate_row(line, rec, base, manifest.problems, seen)
        if row is not None:
            manifest.rows.append(replace(row, transcript_path=_transcript_file(rec, base)))
    manifest.problems += _case_variants(manifest.rows)
    return manifest


def _manifest_text(p: Path) -> str:
    """The manifest's text (UTF-8, byte-order mark dropped); DataError if it is missing, unreadable or empty."""
    if not p.is_file():
        raise DataError(f"Manifest {p} does not exist or is not a file; check the path (`manifest:` in site.yaml).")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(f"Manifest {p} cannot be read ({exc.strerror}); let the user that runs fedrelapse read it.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"Manifest {p} is not UTF-8 (bad byte at line {line}); re-export it as UTF-8."
        ) from exc
    if not text.strip():
        raise DataError(f"Manifest {p} is empty; export the manifest again (see docs/data-manifest.md).")
    return text


# A CSV value (a transcript, say) may be this many characters long; the csv module's own
# default, 131072, is smaller than a long transcript.
MAX_VALUE_CHARS = 16 * 1024 * 1024
_ONE_LINE_FIELDS = tuple(c for c in REQUIRED + OPTIONAL if c != "transcript")  # a line break in these means broken quoting
_QUOTING = ' A value that holds a quote must be quoted as a whole, with the quote doubled ("say ""hi"""); remove or double the stray quote.'
_REFUSED = " The whole manifest is refused, because no row after that point can be trusted; fix it, then run `fedrelapse site check` again."


@dataclass(frozen=True)
class _CsvRow:
    first: int  # line of the file where the row starts
    last: int  # line where it ends (after a quoted value over several lines); rows are reported here
    values: list[str]


def _read_csv(text: str, path: Path) -> tuple[list[tuple[int, dict[str, str]]], list[Problem], int]:
    rows = _csv_rows(text, path)
    if not rows:
        return [], [], 0
    columns = [name.strip() for name in rows[0].values]  # trimmed like values: "patient_id, session_id" is fine
    problems = _header_problems(columns)
    if any(p.severity == "error" for p in problems):
        return [], problems, 0
    records = []
    for row in rows[1:]:
        rec = {name: value.strip() for name, value in zip(columns, row.values, strict=False)}
        _refuse_line_breaks(path, row, rec)
        records.append((row.last, rec))
        if len(row.values) > len(columns):
            problems.append(Problem(row.last, "row", "has more values than the header has columns; extra values ignored", "warning"))
    return records, problems, 0


_SEPARATORS = {";": "';'", "\t": "a tab"}  # what spreadsheet exports use instead of ',' (Excel in a Norwegian locale: ';')


def _header_problems(names: list[str]) -> list[Problem]:
    """Problems of a CSV header, names already trimmed; any error means no row is read."""
    column_problems = _column_problems(names)
    named = _other_separator(names) if any(p.severity == "error" for p in column_problems) else None
    if named:
        return [Problem(1, "header", (
            f"seems to use {named} between values, not ','; no row is read. Save it as comma-separated:"
            " in Excel choose 'CSV UTF-8 (Comma delimited)' (its plain CSV export in a Norwegian or other"
            " European locale uses ';')"
        ))]
    twice = sorted({n for n in names if n and names.count(n) > 1})
    duplicates = [Problem(1, "header", f"column(s) {', '.join(twice)} appear more than once; no row is read. Keep one of each")] if twice else []
    return duplicates + column_problems


def _other_separator(names: list[str]) -> str | None:
    """How the header seems to separate its values, when that is not ','."""
    joined = ",".join(names)
    return next((named for separator, named in _SEPARATORS.items() if joined.count(separator) > joined.count(",")), None)


def _csv_rows(text: str, path: Path) -> list[_CsvRow]:
    """Every non-blank CSV row with its lines; any csv.Error refuses the manifest (DataError)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # strict: a stray quote is an error, not a merged row
    rows: list[_CsvRow] = []
    last = 0
    previous_limit = csv.field_size_limit(MAX_VALUE_CHARS)
    try:
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return rows
            except csv.Error as exc:
                raise DataError(_csv_error(path, last + 1, reader.line_num, exc) + _REFUSED) from None
            if values:
                rows.append(_CsvRow(last + 1, reader.line_num, values))
            last = reader.line_num
    finally:
        csv.field_size_limit(previous_limit)


def _csv_error(path: Path, first: int, at: int, exc: csv.Error) -> str:
    """What went wrong, in words, for the row that starts at line ``first`` (no row content: the
    message may reach the coordinator when a training site refuses its manifest)."""
    reason = str(exc)
    if "unexpected end of data" in reason:
        return f'Manifest {path}: the row at line {first} opens a quote (") that is never closed, so every later line would be read into that one value.' + _QUOTING
    if "expected after" in reason:
        if at == first:
            return f'Manifest {path}: line {first} has text right after a closing quote (").' + _QUOTING
        return f'Manifest {path}: the row at line {first} opens a quote (") that runs on to line {at}, where text follows the closing quote.' + _QUOTING
    if "field larger than field limit" in reason:
        return (
            f"Manifest {path}: a value in the row at line {first} is longer than {MAX_VALUE_CHARS} characters"
            f' (read up to line {at}). If that row opens a quote (") by mistake, fix it; a transcript'
            " that long belongs in a file named by transcript_path."
        )
    return f"Manifest {path} cannot be read as CSV at line {at} (in the row starting at line {first}): {reason}."


def _refuse_line_breaks(path: Path, row: _CsvRow, rec: dict[str, str]) -> None:
    """A line break in a one-line field means a stray quote swallowed the following lines."""
    broken = [c for c in _ONE_LINE_FIELDS if "\n" in rec.get(c, "") or "\r" in rec.get(c, "")]
    if broken:
        raise DataError(
            f'Manifest {path}: the row at line {row.first} runs on to line {row.last}, because its {broken[0]} value holds a line break: a quote (")'
            f" probably opened a value by mistake at line {row.first}, and lines {row.first + 1}-{row.last} were read into it." + _QUOTING + _REFUSED
        )


def _read_jsonl(text: str) -> tuple[list[tuple[int, dict[str, str]]], list[Problem], int]:
    records, problems, columns, skipped = [], [], set(), 0
    unknown: dict[str, int] = {}  # key -> the line of the first record that has it
    first_record: int | None = None  # its line
    # Only "\n" ends a JSONL line (str.splitlines would also split at U+2028, U+0085, ...
    # inside a transcript); a "\r" before it is JSON whitespace and is tolerated.
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_JsonObject.from_pairs)
        except json.JSONDecodeError as exc:
            problems.append(Problem(i, "row", f"is not valid JSON ({exc.msg}); row skipped"))
            skipped += 1
            continue
        if not isinstance(obj, _JsonObject):
            problems.append(Problem(i, "row", "must be a JSON object; row skipped"))
            skipped += 1
            continue
        if first_record is None:
            first_record = i
        columns |= set(obj)
        for key in obj:
            if key not in REQUIRED + OPTIONAL:
                unknown.setdefault(key, i)
        rec, row_problems = _jsonl_record(i, obj)
        problems += row_problems
        if rec is None:
            skipped += 1
        else:
            records.append((i, rec))
    for first_line in sorted(set(unknown.values())):  # JSONL has no header: each unknown key at the first record that has it
        keys = ", ".join(sorted(k for k, first in unknown.items() if first == first_line))
        problems.append(Problem(first_line, "row", f"unknown key(s) {keys} are ignored (here and in every later record)", "warning"))
    if first_record is not None and not columns & {"transcript", "transcript_path"}:  # no header to report it at: the first record
        problems.append(Problem(first_record, "row", "has no transcript_path or transcript key, and no later record has one; language markers will be unavailable", "warning"))
    return records, problems, skipped


class _JsonObject(dict[str, object]):
    """A JSON object that remembers which keys it was given more than once."""

    repeated: tuple[str, ...] = ()

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, object]]) -> _JsonObject:
        obj = cls(pairs)
        obj.repeated = tuple(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        return obj


# JSON numbers accepted as the text they spell, per field (true/false never is): label and
# relapse_onset are numbers in the docs, and a whole-number id is unambiguous.
_NUMBERS = {"label": (int, float), "relapse_onset": (int, float), "patient_id": (int,), "session_id": (int,)}


def _jsonl_record(line: int, obj: _JsonObject) -> tuple[dict[str, str] | None, list[Problem]]:
    """The known fields of one JSONL object as text, or None and the errors that skip the row."""
    errors = [Problem(line, k, "is given more than once in this JSON object; row skipped (keep one)") for k in obj.repeated]
    rec: dict[str, str] = {}
    for key, value in obj.items():
        if key not in REQUIRED + OPTIONAL:
            continue  # unknown keys are ignored (reported once, at the first record with each: _read_jsonl)
        text = _json_text(key, value)
        if text is None:
            errors.append(Problem(line, key, f"must be {_json_allowed(key)}, not {_json_kind(value)}; row skipped"))
        else:
            rec[key] = text
    return (None, errors) if errors else (rec, [])


def _json_text(key: str, value: object) -> str | None:
    """``value`` as manifest text, or None when its JSON type is wrong for ``key``."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, _NUMBERS.get(key, ())) and not isinstance(value, bool):
        return str(value)
    return None


def _json_allowed(key: str) -> str:
    numbers = _NUMBERS.get(key, ())
    if float in numbers:
        return "text or a number (1, 0)"
    return "text or a whole number" if numbers else "text (a JSON string in quotes)"


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    return "a list" if isinstance(value, list) else "an object"


def _column_problems(columns: list[str]) -> list[Problem]:
    out = []
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        out.append(Problem(1, "header", f"missing required column(s) {', '.join(missing)}; add them (see docs/data-manifest.md)"))
    unknown = [c for c in columns if c not in REQUIRED + OPTIONAL]
    if unknown:
        out.append(Problem(1, "header", f"unknown column(s) {', '.join(unknown)} are ignored", "warning"))
    if "transcript_path" not in columns and "transcript" not in columns:
        out.append(Problem(1, "header", "no transcript_path or transcript column; language markers will be unavailable", "warning"))
    return out


def _validate_row(line: int, rec: dict[str, str], base: Path, problems: list[Problem], seen: dict[str, int]) -> SessionRow | None:
    errors: list[Problem] = []

    def err(fieldname: str, message: str) -> None:
        errors.append(Problem(line, fieldname, message))

    for col in REQUIRED:
        if not rec.get(col):
            err(col, "is empty; row skipped")
    if errors:
        problems.extend(errors)
        return None
    for col in ("patient_id", "session_id"):  # the privacy unit: one person must have one id
        rec[col] = unicodedata.normalize("NFC", rec[col])  # 'Å' typed as one character or as 'A' + ring
        hidden = _hidden_character(rec[col])
        if hidden:
            err(col, f"holds {hidden}; row skipped. An id with such a character looks like another id but counts as another patient or session: retype it")
    sid = rec["session_id"]
    if sid in seen:
        err("session_id", f"{sid!r} duplicates line {seen[sid]}; row skipped")
    else:
        seen[sid] = line
    try:
        when = dt.datetime.fromisoformat(rec["recorded_at"].replace("Z", "+00:00"))
    except ValueError:
        err("recorded_at", f"{rec['recorded_at']!r} is not an ISO 8601 date-time (e.g. 2026-03-01T09:30); row skipped")
        when = dt.datetime.min
    if when.tzinfo is None and when != dt.datetime.min:
        when = when.replace(tzinfo=dt.UTC)
    audio = _inside(base, rec["audio_path"], "audio_path", line, errors) if _path_text(rec["audio_path"], "audio_path", line, errors) else None
    unusable = _not_a_file(audio) if audio is not None else None
    if unusable:
        err("audio_path", f"{rec['audio_path']!r} {unusable}; row skipped")
    if not _BCP47.match(rec["language"]):
        err("language", f"{rec['language']!r} is not a BCP-47 tag such as 'nb' or 'en'; row skipped")
    label: int | None = None
    raw_label = rec.get("label", "")
    if raw_label in ("1", "0", "1.0", "0.0"):
        label = int(float(raw_label))
    elif raw_label != "":
        err("label", f"{raw_label!r} must be 1 (worsening window), 0 (stable) or empty (unlabelled); row skipped")
    onset_raw = rec.get("relapse_onset", "") or ""
    if onset_raw not in ("", "0", "1"):
        err("relapse_onset", f"{onset_raw!r} must be 1 (this session is the recorded start of a relapse), 0 or empty; row skipped")
    transcript = _transcript(rec, base, line, errors, problems)
    if errors:
        problems.extend(errors)
        return None
    assert audio is not None  # no errors implies the path resolved  # noqa: S101
    return SessionRow(line, rec["patient_id"], sid, when, audio, rec["language"], label, transcript, onset_raw == "1")


def _path_text(rel: str, fieldname: str, line: int, errors: list[Problem]) -> bool:
    """Whether ``rel`` is free of control characters (a NUL, say), which no file name at a site
    should hold and which pathlib refuses with a ValueError; an error of the row if not."""
    bad = next((i for i, ch in enumerate(rel) if unicodedata.category(ch) == "Cc"), None)
    if bad is None:
        return True
    errors.append(Problem(line, fieldname, (
        f"holds the control character U+{ord(rel[bad]):04X} at position {bad + 1}; row skipped"
        " (a file name has none: fix the path where the manifest was exported)"
    )))
    return False


# Unicode categories of characters an id may not hold: control, format (zero-width space, joiners,
# direction marks), surrogate, private-use and unassigned characters, line and paragraph
# separators; spaces other than the ordinary one (no-break, thin, ...) are refused separately.
_HIDDEN = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _hidden_character(text: str) -> str | None:
    """The first character of an id that cannot be seen or told apart, in words, or None."""
    for i, ch in enumerate(text, start=1):
        category = unicodedata.category(ch)
        if category in _HIDDEN or (category == "Zs" and ch != " "):
            name = unicodedata.name(ch, "")
            kind = "a control character" if category == "Cc" else "an invisible character"
            return f"{kind} (U+{ord(ch):04X}{' ' + name if name else ''} at position {i})"
    return None


def _case_variants(rows: list[SessionRow]) -> list[Problem]:
    """A warning for each patient_id that differs from an earlier one only in upper/lower case
    (given at the first row that spells it so): they count as two patients."""
    first: dict[str, SessionRow] = {}
    warned: set[str] = set()
    out = []
    for r in rows:
        earlier = first.setdefault(r.patient_id.casefold(), r)
        if earlier.patient_id != r.patient_id and r.patient_id not in warned:
            warned.add(r.patient_id)
            out.append(Problem(r.line, "patient_id", (
                f"{r.patient_id!r} differs from {earlier.patient_id!r} (line {earlier.line}) only in upper/lower case,"
                " so the two count as two patients; if they are one person, spell the id the same way in every row"
            ), "warning"))
    return out


def _inside(base: Path, rel: str, fieldname: str, line: int, errors: list[Problem]) -> Path | None:
    """Resolve ``rel`` against the manifest folder, refusing paths that escape it."""
    candidate = Path(rel)
    try:
        resolved = (base / candidate).resolve()
    except (OSError, RuntimeError, ValueError):  # a symbolic-link loop (RuntimeError before Python 3.13); a character the system refuses
        errors.append(Problem(line, fieldname, f"{rel!r} cannot be followed to a file (a symbolic-link loop, or a character the system refuses); row skipped"))
        return None
    if candidate.is_absolute() or not resolved.is_relative_to(base):
        errors.append(Problem(line, fieldname, f"{rel!r} points outside the manifest's folder; refused (use a path relative to {base.name}/)"))
        return None
    return resolved


def _transcript(rec: dict[str, str], base: Path, line: int, errors: list[Problem], problems: list[Problem]) -> str | None:
    if rec.get("transcript"):
        return rec["transcript"]
    rel = rec.get("transcript_path", "")
    if not rel:
        problems.append(Problem(line, "transcript_path", "no transcript; language markers unavailable for this session", "warning"))
        return None
    path = _inside(base, rel, "transcript_path", line, errors) if _path_text(rel, "transcript_path", line, errors) else None
    if path is None:
        return None
    unusable = _not_a_file(path)
    try:
        raw = _small_file(path, MAX_TRANSCRIPT_BYTES) if unusable is None else None
    except OSError as exc:
        unusable = _why_unreadable(exc)
    if unusable is not None or raw is None:
        why = unusable or f"is larger than {MAX_TRANSCRIPT_BYTES // 2**20} MiB, too large for a transcript (is it the right file?)"
        problems.append(Problem(line, "transcript_path", f"{rel!r} {why}; session kept without language markers", "warning"))
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(Problem(line, "transcript_path", f"{rel!r} is not UTF-8 (byte {exc.start}); session kept without language markers; re-save as UTF-8", "warning"))
    return None


MAX_TRANSCRIPT_BYTES = 16 * 1024 * 1024  # as a transcript in the CSV itself (MAX_VALUE_CHARS)


def _small_file(path: Path, limit: int) -> bytes | None:
    """The bytes of the regular file ``path``, or None if it holds more than ``limit``. Opened
    without blocking, so a named pipe swapped in after the check cannot hang the caller."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "is not a regular file")
        data = fh.read(limit + 1)
    return data if len(data) <= limit else None


def _transcript_file(rec: dict[str, str], base: Path) -> Path | None:
    """The file a valid row's transcript was read from (None for an inline transcript or none)."""
    rel = rec.get("transcript_path", "")
    return (base / rel).resolve() if rel and not rec.get("transcript") else None


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (words to follow its name), or None if it can be."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return _why_unreadable(exc)
    except ValueError as exc:  # a character the system refuses in a file name
        return f"cannot be used as a file name ({exc})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    return None if stat.S_ISREG(mode) else "is not a regular file"


def _why_unreadable(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return "does not exist"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    return f"cannot be read ({exc.strerror or exc})"


def label_balance(rows: list[SessionRow]) -> Counter[str]:
    """Counts of labels: '1', '0' and 'unlabelled'."""
    return Counter("unlabelled" if r.label is None else str(r.label) for r in rows)
