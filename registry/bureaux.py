"""Loading the registry CSV, checking each line, and looking bureaux up by code or pen serial."""

from __future__ import annotations

import csv
import io
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from registry.pins import is_pin_hash

COLUMNS = ("code", "name", "commune", "department", "inscrits", "pin_hash", "caller_ids", "pen_serials")
REQUIRED = ("code", "name", "commune", "department", "pin_hash")
MAX_CODE_DIGITS = 10
# Inscrits as a French spreadsheet writes them with thousands: `1 234`, the space a no-break or narrow no-break one.
_THOUSANDS = re.compile(r"[0-9]{1,3}(?:[ \u00a0\u202f][0-9]{3})+")
# The line ends the csv reader counts lines by (its source is a StringIO with newline="": universal newlines).
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

log = logging.getLogger(__name__)


class RegistryError(ValueError):
    def __init__(self, path: Path | str, line: int, why: str) -> None:
        super().__init__(f"{path}:{line}: {why}")
        self.path, self.line, self.why = str(path), line, why


@dataclass(frozen=True)
class Bureau:
    code: str
    name: str
    commune: str
    department: str
    inscrits: int | None
    pin_hash: str
    caller_ids: tuple[str, ...]
    pen_serials: tuple[str, ...]


class Registry:
    """Bureaux by code, with the pen-serial index; immutable once loaded."""

    def __init__(self, bureaux: dict[str, Bureau]) -> None:
        self.bureaux = bureaux
        self._by_pen = {serial: b.code for b in bureaux.values() for serial in b.pen_serials}

    def __len__(self) -> int:
        return len(self.bureaux)

    def __contains__(self, code: object) -> bool:
        return code in self.bureaux

    def get(self, code: str) -> Bureau | None:
        return self.bureaux.get(code)

    def bureau_for_pen(self, pen_serial: str) -> Bureau | None:
        code = self._by_pen.get(pen_serial)
        return self.bureaux[code] if code else None

    def departments(self) -> dict[str, int]:
        """Number of bureaux per department."""
        counts: dict[str, int] = {}
        for b in self.bureaux.values():
            counts[b.department] = counts.get(b.department, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def inscrits_total(self) -> int:
        return sum(b.inscrits or 0 for b in self.bureaux.values())


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(";") if v.strip())


def _parse_row(row: dict[str, str | None], path: Path, line: int) -> Bureau:
    for column in REQUIRED:
        if not (row.get(column) or "").strip():
            raise RegistryError(path, line, f"empty {column}")
    code = (row["code"] or "").strip()
    if not code.isdigit() or not code.isascii() or len(code) > MAX_CODE_DIGITS:
        raise RegistryError(path, line, f"code {code!r} must be 1 to {MAX_CODE_DIGITS} digits")
    inscrits_text = (row.get("inscrits") or "").strip()
    inscrits: int | None = None
    if inscrits_text:
        if _THOUSANDS.fullmatch(inscrits_text):
            inscrits_text = "".join(inscrits_text.split())
        if not inscrits_text.isascii() or not inscrits_text.isdigit():  # isdigit() alone takes "²"
            raise RegistryError(path, line, f"inscrits {inscrits_text!r} is not a whole number: write it in digits "
                                            "only (1234), or in groups of three (1 234), without decimals")
        inscrits = int(inscrits_text)
    pin_hash = (row["pin_hash"] or "").strip()
    if not is_pin_hash(pin_hash):
        raise RegistryError(path, line, "pin_hash is not a scrypt hash (PINs are never stored in clear)")
    return Bureau(
        code=code,
        name=(row["name"] or "").strip(),
        commune=(row["commune"] or "").strip(),
        department=(row["department"] or "").strip(),
        inscrits=inscrits,
        pin_hash=pin_hash,
        caller_ids=_split(row.get("caller_ids") or ""),
        pen_serials=_split(row.get("pen_serials") or ""),
    )


def _line_breaks(row: dict[str | None, str | list[str] | None]) -> int:
    """How many line ends the row's values hold (the extra values of a row too long included)."""
    values = [v for v in row.values() if isinstance(v, str)] + list(row.get(None) or [])
    text = "\0".join(values)  # not "": a value's final \r and the next one's first \n are two line ends
    return len(_LINE_BREAK.findall(text)) if "\n" in text or "\r" in text else 0


def _rows(reader: csv.DictReader[str], path: Path, text: str) -> Iterator[dict[str | None, str | None]]:
    """The reader's rows; its own error, a value past its field limit (a quote never closed), as a RegistryError."""
    last = 1
    try:
        for row in reader:
            yield row
            last = reader.line_num
    except csv.Error as exc:
        # The line of the row the reader was reading: the first line after the last row that is not blank.
        with io.StringIO(text, newline="") as f:
            start = next((n for n, line in enumerate(f, start=1) if n > last and line.rstrip("\r\n")), last + 1)
        raise RegistryError(path, start, f'a value opened by a quote (") on this line runs on over the lines below '
                                         f'({exc}): close the quote on its line, or write "" for a quote inside a '
                                         'value') from exc


def _delimiter(header: str) -> str:
    """`;` for a file from a French Excel (its list separator), whose header then holds no comma; else `,`."""
    return ";" if ";" in header and "," not in header else ","


def load_registry(path: Path | str) -> Registry:
    """Read and check the registry CSV; any bad line fails the whole load with its line number."""
    path = Path(path)
    bureaux: dict[str, Bureau] = {}
    pens: dict[str, str] = {}
    data = path.read_bytes()
    try:
        # utf-8-sig: a spreadsheet's "CSV UTF-8" export starts with a byte-order mark, which is not part of `code`.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = len(re.findall(rb"\r\n|\r|\n", data[: exc.start])) + 1  # CR alone ends a line too (Excel for Mac)
        raise RegistryError(path, line, "not UTF-8 text (save the file as CSV UTF-8)") from exc
    with io.StringIO(text, newline="") as f:
        header = re.match(r"[^\r\n]*", text)  # up to the first line end, CR alone included (Excel for Mac)
        reader = csv.DictReader(f, delimiter=_delimiter(header.group() if header else ""))
        # `Inscrits`, `code `: a column is found whatever its case and spaces. Unknown columns are ignored, so an
        # `Inscrits` column was, and every bureau loaded with no inscrits to check its votants against.
        reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]
        missing = [c for c in REQUIRED if c not in reader.fieldnames]
        if missing:
            raise RegistryError(path, 1, f"missing column(s): {', '.join(missing)}")
        previous = 1
        for row in _rows(reader, path, text):
            line = reader.line_num
            breaks = _line_breaks(row) if line - previous > 1 else 0  # a row of one line (most) holds none
            previous = line
            if breaks:
                # No column holds a line break: a value running over lines is a quote left open (`"Salle Foyer`),
                # which the reader closes at the next quote it meets, lines below, reading every line between
                # as one value: bureaux gone without a word, had the columns happened to add up.
                raise RegistryError(path, line - breaks,
                                    f'a value opened by a quote (") on this line runs to line {line}: close the '
                                    'quote on its line, or write "" for a quote inside a value')
            if None not in row and not any((v or "").strip() for v in row.values()):
                continue  # `,,,,,,,`: Excel's trace of a row once touched below the data, a blank line like any other
            if None in row:
                raise RegistryError(path, line, "more values than columns")
            bureau = _parse_row(row, path, line)
            if bureau.code in bureaux:
                raise RegistryError(path, line, f"duplicate code {bureau.code}")
            for serial in bureau.pen_serials:
                if serial in pens:
                    raise RegistryError(path, line, f"pen serial {serial} already belongs to {pens[serial]}")
                pens[serial] = bureau.code
            bureaux[bureau.code] = bureau
    return Registry(bureaux)


class RegistryFile:
    """The registry CSV, read again whenever the file changes (an operator adds a bureau or fixes a line on the night).

    A change that does not load (a mistyped line, a file caught half-written) keeps the registry last loaded,
    with a warning naming the line, until the file changes again: one bad edit must not make every pen page
    and every review page fail. The first load has nothing to fall back on, and raises.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._registry: Registry | None = None

    def get(self) -> Registry | None:
        """The registry; None when there is no file and never was (one removed to be written again keeps the last)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return self._registry
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                try:
                    registry = load_registry(self.path)
                except RegistryError as exc:
                    if self._registry is None:
                        raise
                    log.warning("registry %s changed but does not load (%s): the registry loaded before stays "
                                "in use until the file is fixed", self.path, exc)
                else:
                    # A file that loads may still have lost bureaux: a spreadsheet that saved 010101 as 10101, lines
                    # deleted by mistake. Removing a bureau on the night is rare; losing one without a word is not.
                    gone = sorted(set(self._registry.bureaux) - set(registry.bureaux)) if self._registry else []
                    if gone:
                        log.warning("registry %s read again without %d bureau(x) it held before (%s%s): they are "
                                    "unknown from now on (has a spreadsheet dropped their leading zeros? "
                                    "`registry check` says)", self.path, len(gone), ", ".join(gone[:5]),
                                    ", ..." if len(gone) > 5 else "")
                    self._registry = registry
                self._stamp = stamp
            return self._registry


def write_registry(path: Path, bureaux: list[Bureau]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for b in bureaux:
            writer.writerow(
                [
                    b.code,
                    b.name,
                    b.commune,
                    b.department,
                    "" if b.inscrits is None else b.inscrits,
                    b.pin_hash,
                    ";".join(b.caller_ids),
                    ";".join(b.pen_serials),
                ]
            )
