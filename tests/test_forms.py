"""Election definitions: the two demo elections load in order, and a bad definition says file, key and why."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from forms import ElectionDefinitionError, available_elections, load_election
from forms.definitions import load_election_file


def test_both_rounds_load_with_their_candidates_in_ballot_order() -> None:
    t1 = load_election("primaire-2011-t1")
    assert t1.candidate_ids == ("aubry", "baylet", "hollande", "montebourg", "royal", "valls")
    assert [f.id for f in t1.fields][:3] == ["votants", "blancs_nuls", "exprimes"]
    assert [f.id for f in t1.fields][3:] == list(t1.candidate_ids)
    assert t1.field("royal").spoken == "Ségolène Royal"
    t2 = load_election("primaire-2011-t2")
    assert t2.candidate_ids == ("hollande", "aubry")
    assert t2.round == 2
    assert {"primaire-2011-t1", "primaire-2011-t2"} <= set(available_elections())


GOOD = """
id = "{id}"
title = "T"
spoken_title = "t"
round = 1
date = "2011-10-09"
form_version = 1
[[counts]]
id = "votants"
label = "V"
spoken = "v"
max_digits = 4
[[counts]]
id = "blancs_nuls"
label = "B"
spoken = "b"
max_digits = 4
[[counts]]
id = "exprimes"
label = "E"
spoken = "e"
max_digits = 4
[[candidates]]
id = "aubry"
ballot_name = "Martine AUBRY"
spoken_name = "Martine Aubry"
max_digits = 4
"""


def write(tmp_path: Path, text: str, name: str = "e1") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text.replace("{id}", name), encoding="utf-8")
    return path


def test_a_good_definition_loads(tmp_path: Path) -> None:
    election = load_election_file(write(tmp_path, GOOD))
    assert election.candidate_ids == ("aubry",)
    assert election.field("votants").max_value == 9999


@pytest.mark.parametrize(
    ("change", "key", "why"),
    [
        (lambda t: t.replace('title = "T"\n', ""), "title", "missing"),
        (lambda t: t.replace("round = 1", 'round = "one"'), "round", "must be int"),
        (lambda t: t.replace("round = 1", "round = 3"), "round", "must be 1 or 2"),
        (lambda t: t.replace('id = "blancs_nuls"', 'id = "nuls"'), "counts", "must be exactly"),
        (lambda t: t.replace('id = "aubry"', 'id = "Aubry!"'), "candidates[0].id", "lowercase"),
        (lambda t: t + '[[candidates]]\nid = "aubry"\nballot_name = "X"\nspoken_name = "x"\nmax_digits = 4\n',
         "candidates", "appears twice"),
        (lambda t: t.replace("max_digits = 4\n[[counts]]", "max_digits = 9\n[[counts]]", 1),
         "counts[0].max_digits", "between 1 and 5"),
        (lambda t: t.replace('spoken_name = "Martine Aubry"', 'spoken_name = "  "'),
         "candidates[0].spoken_name", "must not be empty"),
        (lambda t: t + "\n[[[", "(syntax)", ""),
    ],
)
def test_a_bad_definition_names_file_key_and_why(tmp_path: Path, change, key: str, why: str) -> None:
    path = write(tmp_path, change(GOOD))
    with pytest.raises(ElectionDefinitionError) as err:
        load_election_file(path)
    assert err.value.file == str(path)
    assert err.value.key == key
    assert why in err.value.why
    assert str(path) in str(err.value) and key in str(err.value)


def test_the_id_must_match_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text(GOOD.replace("{id}", "e1"), encoding="utf-8")
    with pytest.raises(ElectionDefinitionError, match="must equal the file name"):
        load_election_file(path)


def test_an_unknown_election_lists_the_known_ones(tmp_path: Path) -> None:
    write(tmp_path, GOOD, "known")
    with pytest.raises(ElectionDefinitionError, match="known: known"):
        load_election("nope", tmp_path)


def _candidates(n: int) -> str:
    return "".join(f'[[candidates]]\nid = "c{i}"\nballot_name = "C{i}"\nspoken_name = "c{i}"\nmax_digits = 4\n'
                   for i in range(n))


def test_an_election_whose_counts_the_paper_form_cannot_hold_is_refused(tmp_path: Path) -> None:
    """Eleven candidates (twelve ran in 2022) shrank the rows to 9.6 mm, under the 10 mm boxes: the form
    printed overlapping boxes, each digit cut into two fields' crops, with no word from any command."""
    from forms.layout import CELL_GAP_MM, CELL_H_MM, form_layout

    fits = load_election_file(write(tmp_path, GOOD.replace(GOOD[GOOD.index("[[candidates]]"):], _candidates(8))))
    tops = [f.cells[0][1] for f in form_layout(fits).fields]
    assert min(b - a for a, b in itertools.pairwise(tops)) >= CELL_H_MM + CELL_GAP_MM
    path = write(tmp_path, GOOD.replace(GOOD[GOOD.index("[[candidates]]"):], _candidates(11)), "e2")
    with pytest.raises(ElectionDefinitionError) as err:
        load_election_file(path)
    assert err.value.key == "candidates" and "at most 8" in err.value.why


def test_a_definition_saved_by_a_windows_editor_loads_or_is_named(tmp_path: Path) -> None:
    """Notepad's UTF-8 starts with a byte-order mark; an ANSI save is cp1252. The first failed as a syntax error
    at line 1, column 1; the second raised a bare UnicodeDecodeError, with neither the file nor the line."""
    text = GOOD.replace("{id}", "e1").replace('ballot_name = "Martine AUBRY"', 'ballot_name = "Ségolène ROYAL"')
    path = tmp_path / "e1.toml"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_election_file(path).candidates[0].ballot_name == "Ségolène ROYAL"
    path.write_bytes(text.encode("cp1252"))
    with pytest.raises(ElectionDefinitionError) as err:
        load_election_file(path)
    line = text[: text.index("Ségolène")].count("\n") + 1
    assert err.value.file == str(path) and err.value.key == "(encoding)"
    assert f"line {line}" in err.value.why and "UTF-8" in err.value.why
