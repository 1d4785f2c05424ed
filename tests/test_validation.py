"""The normalized return and its checks: consistent returns pass, any single changed count is caught."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forms import Election, load_election
from registry import Bureau
from validation import (
    Reason,
    Return,
    ReturnSchemaError,
    check_arithmetic,
    check_history,
    check_return,
    decide,
    new_return,
    new_return_id,
    normalize_bureau_code,
    parse_count,
    suggest_single_digit_fixes,
)

T1 = load_election("primaire-2011-t1")
T2 = load_election("primaire-2011-t2")
BUREAU = Bureau("750120", "Bureau 20", "Paris", "75 Paris", 1400, "scrypt$256$8$1$AA$BB", (), ())


@st.composite
def consistent_counts(draw: st.DrawFn, election: Election) -> dict[str, int]:
    votes = {c: draw(st.integers(0, 1000 // len(election.candidates))) for c in election.candidate_ids}
    exprimes = sum(votes.values())
    blancs_nuls = draw(st.integers(0, min(200, 1400 - exprimes)))
    return {"votants": exprimes + blancs_nuls, "blancs_nuls": blancs_nuls, "exprimes": exprimes, **votes}


def make(election: Election, counts: dict[str, Any], channel: str = "ivr") -> Return:
    return new_return(election, BUREAU.code, counts, channel, {"call_id": "c1"})


@settings(max_examples=300, deadline=None)
@given(data=st.data(), election=st.sampled_from([T1, T2]))
def test_every_consistent_return_passes(data: st.DataObject, election: Election) -> None:
    ret = make(election, data.draw(consistent_counts(election)))
    assert check_return(ret, election, BUREAU) == []
    assert decide([]) == "accepted"


@settings(max_examples=500, deadline=None)
@given(data=st.data(), election=st.sampled_from([T1, T2]))
def test_any_single_changed_count_is_caught(data: st.DataObject, election: Election) -> None:
    counts = data.draw(consistent_counts(election))
    field = data.draw(st.sampled_from([f.id for f in election.fields]))
    delta = data.draw(st.integers(-counts[field], 500).filter(lambda d: d != 0))
    ret = make(election, {**counts, field: counts[field] + delta})
    findings = check_return(ret, election, BUREAU)
    codes = {f.code for f in findings}
    assert codes & {Reason.TOTAL_MISMATCH, Reason.SUM_MISMATCH}, (field, delta, findings)
    assert decide(findings) == "review"


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_a_single_misread_digit_is_suggested_back(data: st.DataObject) -> None:
    counts = data.draw(consistent_counts(T1))
    field = data.draw(st.sampled_from([f.id for f in T1.fields]))
    text = f"{counts[field]:04d}"
    pos = data.draw(st.integers(0, 3))
    digit = data.draw(st.sampled_from([d for d in "0123456789" if d != text[pos]]))
    misread = {**counts, field: int(text[:pos] + digit + text[pos + 1 :])}
    assert check_arithmetic(misread, T1)
    assert (field, counts[field]) in suggest_single_digit_fixes(misread, T1)


def test_the_findings_say_which_totals_disagree_and_by_how_much() -> None:
    counts = {"votants": 412, "blancs_nuls": 7, "exprimes": 400, "hollande": 250, "aubry": 160}
    findings = check_return(make(T2, counts), T2, BUREAU)
    by_code = {f.code: f for f in findings}
    assert by_code[Reason.TOTAL_MISMATCH].details["difference"] == -5
    assert by_code[Reason.SUM_MISMATCH].details == {"exprimes": 400, "candidates_sum": 410, "difference": 10}
    assert "écart +10" in by_code[Reason.SUM_MISMATCH].message


def test_unknown_bureau_over_registered_and_unreadable() -> None:
    counts = {"votants": 1500, "blancs_nuls": 0, "exprimes": 1500, "hollande": 1500, "aubry": 0}
    findings = check_return(make(T2, counts), T2, BUREAU)
    assert [f.code for f in findings] == [Reason.OVER_REGISTERED]
    assert [f.code for f in check_return(make(T2, counts), T2, None)] == [Reason.UNKNOWN_BUREAU]
    blank = {**counts, "aubry": "  ", "hollande": "12a"}
    unreadable = check_return(make(T2, blank), T2, None)
    assert {(f.code, f.field) for f in unreadable} >= {(Reason.UNREADABLE, "aubry"), (Reason.UNREADABLE, "hollande")}
    too_long = check_return(make(T2, {**counts, "votants": 12345}), T2, BUREAU)
    assert (Reason.UNREADABLE, "votants") in {(f.code, f.field) for f in too_long}


@pytest.mark.parametrize(
    ("raw", "value"),
    [("0042", 42), (" 1 204 ", 1204), ("1\u202f204", 1204), ("", None), ("  ", None), (None, None),
     ("-3", None), ("4.5", None), ("١٢", None), (True, None), (7, 7), (-1, None), ("1\u2009204", 1204),
     ("1\xa0204", 1204), ("\u00b250", None), ("\u2461\u246450", None), ("\uff12\uff15\uff10", None)],
)
def test_parse_count(raw: object, value: int | None) -> None:
    assert parse_count(raw) == value


def test_a_digit_string_longer_than_any_count_is_unreadable() -> None:
    # int() refuses more than 4300 digits with a ValueError: a count pasted into the review form answered 500.
    assert parse_count("1" * 4301) is None
    assert parse_count("1" * 5000) is None
    assert parse_count("9" * 19) is None
    assert parse_count("9" * 18) == 10**18 - 1
    assert parse_count("0" * 40 + "42") == 42  # leading zeros are no digits too many
    counts = {"votants": "1" * 5000, "blancs_nuls": 0, "exprimes": 10, "hollande": 6, "aubry": 4}
    findings = check_return(make(T2, counts), T2, BUREAU)
    assert [(f.code, f.field, f.message) for f in findings] == [
        (Reason.UNREADABLE, "votants", "Nombre de votants (émargements) : valeur absente ou illisible")]


def test_normalize_bureau_code_keeps_leading_zeros() -> None:
    assert normalize_bureau_code(" 01 0101 ") == "010101"
    assert normalize_bureau_code("75A") is None
    assert normalize_bureau_code("") is None


def test_history_duplicate_correction_and_conflict() -> None:
    counts = {"votants": 10, "blancs_nuls": 0, "exprimes": 10, "hollande": 6, "aubry": 4}
    first = make(T2, counts)
    assert [f.code for f in check_history(make(T2, counts), first)] == [Reason.DUPLICATE]
    assert [f.code for f in check_history(make(T2, counts, "pen"), first)] == [Reason.DUPLICATE]
    changed = {**counts, "hollande": 5, "aubry": 5}
    correction = check_history(make(T2, changed), first)
    assert [f.code for f in correction] == [Reason.CORRECTION]
    assert correction[0].details["fields"] == ["aubry", "hollande"]
    assert [f.code for f in check_history(make(T2, changed, "pen"), first)] == [Reason.CHANNEL_CONFLICT]
    assert [f.code for f in check_history(make(T2, changed), None, [make(T2, changed)])] == [Reason.DUPLICATE]
    assert check_history(make(T2, changed), None) == []
    supervisor = new_return(T2, BUREAU.code, changed, "review", {"supervisor": "ana"}, supersedes=first.return_id)
    assert check_history(supervisor, first) == []


def test_other_figures_from_a_bureau_whose_figures_wait_in_review_wait_too() -> None:
    """Nothing accepted yet, a first return in review (its sums broke): figures sent again, otherwise, are
    a correction of it (a conflict from the other channel), for a human: accepted alone, they used to be
    overwritten by the supervisor's later decision on the first."""
    counts = {"votants": 10, "blancs_nuls": 0, "exprimes": 10, "hollande": 6, "aubry": 5}
    waiting = make(T2, counts)
    fixed = {**counts, "aubry": 4}
    correction = check_history(make(T2, fixed), None, [waiting])
    assert [f.code for f in correction] == [Reason.CORRECTION]
    assert correction[0].details == {"return_id": waiting.return_id, "channel": "ivr", "fields": ["aubry"]}
    assert "en attente" in correction[0].message
    assert [f.code for f in check_history(make(T2, fixed, "pen"), None, [waiting])] == [Reason.CHANNEL_CONFLICT]
    # Against the latest of several waiting (the journal gives them latest first).
    later = make(T2, {**counts, "hollande": 7})
    assert check_history(make(T2, fixed), None, [later, waiting])[0].details["return_id"] == later.return_id


def test_other_figures_after_a_supervisors_decision_are_a_correction_not_a_conflict() -> None:
    """A supervisor's return (channel `review`) is the bureau's figures as decided, not a third reporting channel:
    a president who sends other figures afterwards, by either channel, corrects them (DESIGN.md: CHANNEL_CONFLICT
    is a difference with the other channel's accepted return)."""
    counts = {"votants": 10, "blancs_nuls": 0, "exprimes": 10, "hollande": 6, "aubry": 4}
    phoned = make(T2, counts)
    decided = new_return(T2, BUREAU.code, {**counts, "hollande": 5, "aubry": 5}, "review", {"supervisor": "ana"},
                         supersedes=phoned.return_id)
    for channel in ("ivr", "pen"):
        findings = check_history(make(T2, {**counts, "hollande": 7, "aubry": 3}, channel), decided)
        assert [f.code for f in findings] == [Reason.CORRECTION]
        assert findings[0].details == {"return_id": decided.return_id, "channel": "review",
                                       "fields": ["aubry", "hollande"]}
        assert findings[0].message.startswith("un superviseur avait déjà arrêté les chiffres du bureau")
    assert [f.code for f in check_history(make(T2, decided.counts, "pen"), decided)] == [Reason.DUPLICATE]


def test_decide() -> None:
    counts = {"votants": 10, "blancs_nuls": 0, "exprimes": 10, "hollande": 6, "aubry": 4}
    dup = check_history(make(T2, counts), make(T2, counts))
    assert decide(dup) == "duplicate"
    assert decide([*check_return(make(T2, {**counts, "aubry": 5}), T2, BUREAU), *dup]) == "duplicate"


def test_the_return_round_trips_through_its_json_schema() -> None:
    ret = make(T1, {"votants": 3, "blancs_nuls": 0, "exprimes": 3, "aubry": 3})
    data = ret.to_dict()
    assert data["schema"] == "remontee.return/1"
    assert data["counts"]["candidates"] == {"aubry": 3, "baylet": None, "hollande": None, "montebourg": None,
                                            "royal": None, "valls": None}
    assert Return.from_dict(data) == ret
    with pytest.raises(ReturnSchemaError, match="counts/votants"):
        Return.from_dict({**data, "counts": {**data["counts"], "votants": -1}})
    with pytest.raises(ReturnSchemaError, match="bureau"):
        Return.from_dict({**data, "bureau": "75A"})
    with pytest.raises(ReturnSchemaError, match="channel"):
        Return.from_dict({**data, "channel": "fax"})


def test_new_return_drops_unknown_fields_and_ids_sort_by_time() -> None:
    a = make(T1, {"votants": 1, "intrus": 5})
    b = make(T1, {"votants": 1})  # same millisecond, most likely: monotonic all the same
    assert "intrus" not in a.counts and a.counts["baylet"] is None
    assert a.return_id < b.return_id
    ids = [new_return_id() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    with pytest.raises(ValueError, match="unknown channel"):
        make(T1, {}, channel="fax")
