"""The bureau registry: realistic generation, hashed PINs, fast loading, bad lines named by number."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from review_support import build_env, login, sqlite_journal

from registry import Registry, RegistryError, RegistryFile, hash_pin, load_registry, verify_pin
from registry.bureaux import COLUMNS
from registry.demo import generate

ROOT = Path(__file__).resolve().parents[1]
__all__ = ["sqlite_journal"]


def test_generated_registry_is_realistic_and_never_holds_a_pin_in_clear(
    registry: Registry, demo_registry_files: tuple[Path, Path], pins: dict[str, str]
) -> None:
    assert len(registry) == 60
    assert len(registry.departments()) == 60  # round-robin over departments
    ain = registry.get("010101")
    assert ain is not None and ain.department == "01 Ain" and ain.commune == "Bourg-en-Bresse"
    for b in registry.bureaux.values():
        assert b.code.isdigit() and 300 <= (b.inscrits or 0) <= 1400
        assert b.caller_ids and b.pen_serials
        assert registry.bureau_for_pen(b.pen_serials[0]) == b
    text = demo_registry_files[0].read_text()
    assert set(pins) == set(registry.bureaux)
    some_code, some_pin = next(iter(pins.items()))
    assert f",{some_pin}," not in text
    assert verify_pin(some_pin, registry.bureaux[some_code].pin_hash)
    assert not verify_pin("000000" if some_pin != "000000" else "111111", registry.bureaux[some_code].pin_hash)
    assert demo_registry_files[1].stat().st_mode & 0o077 == 0  # the PINs file is private


def test_pin_hashes_are_salted_and_malformed_hashes_never_match() -> None:
    a, b = hash_pin("1234", n=2**8), hash_pin("1234", n=2**8)
    assert a != b and verify_pin("1234", a) and verify_pin("1234", b)
    assert not verify_pin("1234", "1234")
    assert not verify_pin("1234", "scrypt$x$8$1$AAAA$BBBB")
    assert not verify_pin("1234", "scrypt$3$8$1$AAAA$BBBB")  # n not a power of two: scrypt refuses


def _write(tmp_path: Path, rows: list[list[str]], header: tuple[str, ...] = COLUMNS) -> Path:
    path = tmp_path / "registry.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


PIN_HASH = hash_pin("123456", n=2**8)


def _row(code: str = "750101", inscrits: str = "800", pens: str = "AJX-1") -> list[str]:
    return [code, "Bureau 1", "Paris", "75 Paris", inscrits, PIN_HASH, "0612345678", pens]


@pytest.mark.parametrize(
    ("rows", "line", "why"),
    [
        ([_row(), _row()], 3, "duplicate code 750101"),
        ([_row(), _row(code="75A101")], 3, "must be 1 to 10 digits"),
        ([_row(code="")], 2, "empty code"),
        ([_row(inscrits="huit")], 2, "inscrits"),
        ([_row(inscrits="8²")], 2, "inscrits"),  # a digit to str.isdigit(), not to int()
        ([_row(), _row(code="750102")], 3, "pen serial AJX-1 already belongs to 750101"),
        ([[*_row()[:5], "1234", *_row()[6:]]], 2, "never stored in clear"),
        ([[*_row()[:5], PIN_HASH.replace("$8$", "$⁸$"), *_row()[6:]]], 2, "never stored in clear"),
        ([[*_row(), "extra"]], 2, "more values than columns"),
    ],
)
def test_a_bad_line_fails_the_load_with_its_number(tmp_path: Path, rows, line: int, why: str) -> None:
    with pytest.raises(RegistryError) as err:
        load_registry(_write(tmp_path, rows))
    assert err.value.line == line
    assert why in err.value.why


def test_a_missing_column_fails_on_line_one(tmp_path: Path) -> None:
    header = tuple(c for c in COLUMNS if c != "pin_hash")
    with pytest.raises(RegistryError, match=r":1: missing column\(s\): pin_hash"):
        load_registry(_write(tmp_path, [], header))


def test_optional_columns_may_be_empty(tmp_path: Path) -> None:
    registry = load_registry(_write(tmp_path, [["12", "B", "C", "D", "", PIN_HASH, "", ""]]))
    bureau = registry.get("12")
    assert bureau is not None and bureau.inscrits is None and bureau.caller_ids == () and bureau.pen_serials == ()


def test_registry_generate_command(tmp_path: Path) -> None:
    out, pins = tmp_path / "r.csv", tmp_path / "p.csv"
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_gateway.py"), "registry", "generate", "--bureaux", "25",
         "--out", str(out), "--pins", str(pins), "--scrypt-n", "256"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )
    assert "25 bureaux written" in result.stdout
    assert len(load_registry(out)) == 25
    assert pins.read_text().splitlines()[0] == "bureau,pin"
    assert len(pins.read_text().splitlines()) == 26


def test_the_pins_file_is_never_readable_by_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the umask, and over a PINs file left readable: open to its owner only from its first byte."""
    import registry.demo

    modes: list[int] = []
    real_writer = csv.writer

    class WatchingWriter:
        """csv's writer, noting the mode of the file the PINs' header is about to be written into."""

        def __init__(self, f, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            self.f, self.writer = f, real_writer(f, *args, **kwargs)

        def writerow(self, row):  # type: ignore[no-untyped-def]
            if tuple(row) == ("bureau", "pin"):
                modes.append(os.fstat(self.f.fileno()).st_mode & 0o777)
            return self.writer.writerow(row)

        def writerows(self, rows):  # type: ignore[no-untyped-def]
            return self.writer.writerows(rows)

    monkeypatch.setattr(registry.demo.csv, "writer", WatchingWriter)
    out, pins = tmp_path / "r.csv", tmp_path / "p.csv"
    pins.write_text("bureau,pin\n010101,123456\n")
    pins.chmod(0o644)
    with pins.open() as reader_of_the_old_file:  # opened while it was readable: must not see the new PINs
        previous = os.umask(0o022)
        try:
            generate(5, out, pins, scrypt_n=2**8)
        finally:
            os.umask(previous)
        assert reader_of_the_old_file.read() == "bureau,pin\n010101,123456\n"
    assert modes == [0o600]
    assert pins.stat().st_mode & 0o777 == 0o600
    assert len(pins.read_text().splitlines()) == 6
    assert {p.name for p in tmp_path.iterdir()} == {"r.csv", "p.csv"}  # no temporary file left


def _append(path: Path, row: list[str]) -> None:
    with path.open("a", newline="") as f:
        csv.writer(f).writerow(row)


def test_a_registry_edited_into_a_bad_file_keeps_the_one_loaded_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path, [_row()])
    registry_file = RegistryFile(path)
    assert "750101" in registry_file.get()
    _append(path, _row(code="75O102", pens="AJX-2"))  # the operator mistypes a new bureau's code
    with caplog.at_level("WARNING", logger="registry.bureaux"):
        kept = registry_file.get()
    assert kept is not None and "750101" in kept and len(kept) == 1
    assert ":3: code '75O102'" in caplog.text
    path.write_text(path.read_text().replace("75O102", "750102"))  # fixed: read again
    assert "750102" in registry_file.get()


def test_a_registry_that_never_loaded_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, [_row(code="75O102")])
    with pytest.raises(RegistryError):
        RegistryFile(path).get()
    assert RegistryFile(tmp_path / "none.csv").get() is None


def test_the_review_ui_keeps_working_when_the_registry_is_edited_into_a_bad_file(
    tmp_path: Path, sqlite_journal, redis, redis_server, demo_registry_files: tuple[Path, Path],
    registry: Registry, election_t1
) -> None:
    path = tmp_path / "registry.csv"
    path.write_bytes(demo_registry_files[0].read_bytes())
    env = build_env(tmp_path, sqlite_journal, redis, path, registry, election_t1, redis_server.url)
    client = env.client()
    login(client, "alice")
    assert client.get("/items").status_code == 200
    _append(path, ["75O120", "Bureau 20", "Paris", "75 Paris", "900", PIN_HASH, "", ""])
    page = client.get("/items")
    assert page.status_code == 200
    assert client.get("/progress").status_code == 200


def test_a_spreadsheets_csv_utf8_export_loads_and_another_encoding_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, [_row()])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # the byte-order mark of a "CSV UTF-8" export
    assert "750101" in load_registry(path)
    path.write_bytes(_write(tmp_path, [_row(), _row(code="750102", pens="AJX-2")]).read_text()
                     .replace("Paris", "Évry").encode("cp1252"))
    with pytest.raises(RegistryError) as err:
        load_registry(path)
    assert err.value.line == 2 and "UTF-8" in err.value.why


def test_registry_check_says_what_is_wrong_without_a_traceback(tmp_path: Path) -> None:
    path = _write(tmp_path, [_row(), _row(code="75A101")])
    result = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "registry", "check", str(path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {path}:3: code '75A101' must be 1 to 10 digits"


def test_registry_check_warns_of_codes_a_spreadsheet_shortened(tmp_path: Path) -> None:
    path = _write(tmp_path, [_row(code="010101"), _row(code="10102", pens="AJX-2"), _row(code="750103", pens="AJX-3")])
    result = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "registry", "check", str(path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("3 bureaux")
    assert "1 code(s) are not 6 digits long like the others (10102)" in result.stderr
    path = _write(tmp_path, [_row(code="010101"), _row(code="750103", pens="AJX-3")])
    same = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "registry", "check", str(path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert same.returncode == 0 and same.stderr == ""


def test_a_registry_saved_by_a_french_excel_with_semicolons_loads(tmp_path: Path) -> None:
    """French Excel separates with `;`: the columns are found, and a list column holding `;` comes quoted."""
    path = tmp_path / "registry.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(COLUMNS)
        writer.writerow(["010101", "Bureau 1", "Bourg-en-Bresse", "01 Ain", "800", PIN_HASH,
                         "0612345678;0698765432", "AJX-1"])
        writer.writerow(["010102", "Bureau 2", "Bourg-en-Bresse", "01 Ain", "", PIN_HASH, "", ""])
        writer.writerow(["010102", "Bureau 2", "Bourg-en-Bresse", "01 Ain", "", PIN_HASH, "", ""])
    with pytest.raises(RegistryError) as err:  # bad lines are still named by number
        load_registry(path)
    assert (err.value.line, err.value.why) == (4, "duplicate code 010102")
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))
    registry = load_registry(path)
    ain = registry.get("010101")
    assert ain is not None and ain.inscrits == 800 and ain.caller_ids == ("0612345678", "0698765432")
    assert registry.bureau_for_pen("AJX-1") == ain and registry.get("010102") is not None


def test_lines_of_separators_alone_are_blank_lines(tmp_path: Path) -> None:
    """Excel writes `,,,,,,,` for rows it once touched below the data; like blank lines, they are no bureau."""
    path = _write(tmp_path, [_row(code="750101"), [""] * len(COLUMNS), _row(code="750102", pens="AJX-2")])
    path.write_text(path.read_text() + ",,,,,,,\r\n\r\n" + " ,, ,,,,,\r\n")
    assert sorted(load_registry(path).bureaux) == ["750101", "750102"]
    # A line with something in it is still a bureau, checked as ever.
    path.write_text(path.read_text() + ",Bureau 9,,,,,,\r\n")
    with pytest.raises(RegistryError, match=r":8: empty code"):
        load_registry(path)


def test_a_quote_left_open_does_not_swallow_the_bureaux_below_it(tmp_path: Path) -> None:
    """A bureau typed by hand as `Salle "Le Foyer` opens a quoted value that the next quoted value closes: the
    csv reader read every line between as that bureau's name, and the registry loaded without those bureaux."""
    rows = [_row(code=f"7501{i:02d}", pens=f"AJX-{i}") for i in range(1, 8)]
    rows[5][1] = 'Salle "Le Foyer"'  # quoted by the writer, `"Salle ""Le Foyer"""`: its quote closes the stray one
    path = _write(tmp_path, rows)
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace("Bureau 1", '"Bureau 1', 1)  # the second bureau, on line 3
    path.write_text("".join(lines))
    with pytest.raises(RegistryError) as err:
        print(sorted(load_registry(path).bureaux))  # 750101, 750102, 750107: four bureaux gone, and no error
    assert err.value.line == 3
    assert "quote" in err.value.why and "line 7" in err.value.why
    # A value holding a line break (a spreadsheet cell with Alt+Enter) is no bureau's value either.
    path = _write(tmp_path, [_row(), [*_row(code="750102", pens="AJX-2")[:1], "Bureau\n2", *_row()[2:7], "AJX-2"]])
    with pytest.raises(RegistryError) as err:
        load_registry(path)
    assert err.value.line == 3 and "line 4" in err.value.why


def test_a_quote_left_open_to_the_end_of_a_long_file_is_named_by_its_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past 128 KiB in one value the csv reader raises its own error, which no part took for a registry error:
    `registry check` printed a traceback, and a registry edited so on the night failed every part reading it."""
    rows = [_row(code=f"75{i:04d}", pens=f"AJX-{i}") for i in range(1, 1001)]
    path = _write(tmp_path, rows)
    registry_file = RegistryFile(path)
    assert len(registry_file.get()) == 1000
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace("Bureau 1", '"Bureau 1', 1)  # line 4, with a blank line before it
    path.write_text("".join(lines[:3]) + "\r\n" + "".join(lines[3:]))
    with caplog.at_level("WARNING", logger="registry.bureaux"):
        kept = registry_file.get()
    assert kept is not None and len(kept) == 1000
    assert ":5: a value opened by a quote" in caplog.text
    result = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "registry", "check", str(path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {path}:5: a value opened by a quote") and "Traceback" not in result.stderr


@pytest.mark.parametrize("written", ["1 234", "1\u00a0234", "1\u202f234", " 1\u00a0234 "])
def test_inscrits_with_a_french_thousands_separator_load(tmp_path: Path, written: str) -> None:
    """A French spreadsheet writes 1234 formatted with thousands as `1 234`, with a no-break (or narrow no-break)
    space: every bureau of a thousand inscrits or more failed the load."""
    bureau = load_registry(_write(tmp_path, [_row(inscrits=written)])).get("750101")
    assert bureau is not None and bureau.inscrits == 1234


@pytest.mark.parametrize("written", ["1234,0", "1 23 4", "12 34", "1 2345", "1.234", "1234 ,", "1  234"])
def test_inscrits_that_are_not_plainly_a_whole_number_fail_the_load_saying_how_to_write_them(
    tmp_path: Path, written: str
) -> None:
    with pytest.raises(RegistryError) as err:
        load_registry(_write(tmp_path, [_row(), _row(code="750102", inscrits=written, pens="AJX-2")]))
    assert err.value.line == 3
    assert "is not a whole number" in err.value.why and "digits only" in err.value.why


def test_a_registry_read_again_without_some_bureaux_says_which(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator opens the registry in a spreadsheet to add a forgotten bureau and saves it: 010101 comes back
    as 10101, a file that loads. Every part took it without a word, and bureau 010101 was unknown from then on."""
    path = _write(tmp_path, [_row(code="010101"), _row(code="010102", pens="AJX-2"), _row(code="750103", pens="AJX-3")])
    registry_file = RegistryFile(path)
    assert "010101" in registry_file.get()
    _write(tmp_path, [_row(code="10101"), _row(code="10102", pens="AJX-2"), _row(code="750103", pens="AJX-3"),
                      _row(code="750104", pens="AJX-4")])
    with caplog.at_level("WARNING", logger="registry.bureaux"):
        registry = registry_file.get()
    assert registry is not None and "10101" in registry and "010101" not in registry  # the file is what it says
    assert "without 2 bureau(x) it held before (010101, 010102)" in caplog.text
    caplog.clear()
    _append(path, _row(code="750105", pens="AJX-5"))  # a bureau added, none gone: nothing to say
    with caplog.at_level("WARNING", logger="registry.bureaux"):
        assert "750105" in registry_file.get()
    assert caplog.text == ""


def test_registry_check_warns_of_bureaux_without_inscrits(tmp_path: Path) -> None:
    """A bureau with no inscrits has its votants checked against nothing; one with 0 sends every return to review.
    Both load (inscrits is optional), and `registry check` said only the total."""
    path = _write(tmp_path, [_row(code="750101"), _row(code="750102", inscrits="", pens="AJX-2"),
                             _row(code="750103", inscrits="0", pens="AJX-3")])
    result = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "registry", "check", str(path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("3 bureaux")
    assert "warning: 1 bureau(x) have no inscrits (750102)" in result.stderr
    assert "warning: 1 bureau(x) have 0 inscrits (750103)" in result.stderr


def test_a_registry_with_old_mac_line_ends_loads_and_is_named_by_line(tmp_path: Path) -> None:
    """Excel for Mac's "CSV (Macintosh)" ends lines with CR alone. The separator was chosen from the text up to the
    first LF, the whole file: one comma in a name, and a file separated by `;` failed with 'missing column(s)'
    naming columns that are all there; and a decoding error was always on line 1."""
    path = tmp_path / "registry.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter=";", lineterminator="\r")
        writer.writerow(COLUMNS)
        writer.writerow(_row(code="010101"))
        writer.writerow(["010102", "Bureau 2, annexe", "Évry", *_row()[3:7], "AJX-2"])
    registry = load_registry(path)
    assert sorted(registry.bureaux) == ["010101", "010102"] and registry.get("010102").name == "Bureau 2, annexe"
    path.write_bytes(path.read_text().encode("cp1252"))
    with pytest.raises(RegistryError) as err:
        load_registry(path)
    assert err.value.line == 3 and "UTF-8" in err.value.why


def test_columns_are_found_whatever_their_case_and_spaces(tmp_path: Path) -> None:
    """A spreadsheet user heads a column `Inscrits`: as an unknown column it was ignored, so every bureau loaded
    with no inscrits and no return was checked against them; a `Code` column failed as 'missing column(s): code'."""
    header = tuple(c.capitalize() if c != "pin_hash" else " pin_hash " for c in COLUMNS)
    registry = load_registry(_write(tmp_path, [_row()], header))
    bureau = registry.get("750101")
    assert bureau is not None and bureau.inscrits == 800 and bureau.pen_serials == ("AJX-1",)
