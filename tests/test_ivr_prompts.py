"""The prompt catalog, French number speech, and the generated sounds (real espeak-ng and sox)."""

from __future__ import annotations

import re
import subprocess
import sys
import wave
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from num2words import num2words

from forms import Election
from ivr import prompts as P
from ivr import sounds

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zéro"), (1, "un"), (17, "dix-sept"), (21, "vingt et un"), (71, "soixante et onze"),
        (80, "quatre-vingts"), (81, "quatre-vingt-un"), (91, "quatre-vingt-onze"), (100, "cent"),
        (101, "cent un"), (200, "deux cents"), (201, "deux cent un"), (1000, "mille"), (1001, "mille un"),
        (2000, "deux mille"), (80_000, "quatre-vingt mille"), (99_999, "quatre-vingt-dix-neuf mille neuf cent "
                                                                        "quatre-vingt-dix-neuf"),
    ],
)
def test_numbers_are_said_in_correct_french(n: int, words: str) -> None:
    assert " ".join(P.number_words(n)) == words


def test_every_count_up_to_99999_can_be_said_from_the_catalog() -> None:
    catalog = P.catalog()
    sample = [*range(0, 2000), *range(2000, 100_000, 97), 99_999, 80_000, 71_071, 21_000]
    for n in sample:
        assert set(P.number_files(n)) <= catalog.keys(), n
    assert len(P.number_prompts()) == 127  # every distinct file of 0..99,999, and une, vingt et une, quatre-vingt-une


def test_thousands_are_said_as_the_thousands_then_the_rest() -> None:
    # number_prompts relies on it to collect the words without asking num2words 100,000 times.
    for n in range(1000, 100_000, 173):
        thousands, rest = divmod(n, 1000)
        expected = num2words(thousands * 1000, lang="fr") + (f" {num2words(rest, lang='fr')}" if rest else "")
        assert num2words(n, lang="fr") == expected


# How each number is said, file by file. A file is one word said alone, but some words sound otherwise before
# the next one: six, dix and huit lose their final consonant before cent and mille ("six cents" is /si sɑ̃/,
# "dix mille" /di mil/), and vingt is linked to "et" (/vɛ̃t e œ̃/). Those are said in one file with the next word.
@pytest.mark.parametrize(
    ("n", "files"),
    [
        (0, "zero"), (6, "six"), (10, "dix"), (8, "huit"), (21, "vingt-et-un"), (80, "quatre-vingts"),
        (81, "quatre-vingt-un"), (100, "cent"), (200, "deux cents"), (201, "deux cent un"), (500, "cinq cents"),
        (600, "six-cents"), (606, "six-cent six"), (610, "six-cent dix"), (800, "huit-cents"), (808, "huit-cent huit"),
        (1000, "mille"), (1006, "mille six"), (2000, "deux mille"), (6000, "six-mille"), (8000, "huit-mille"),
        (10_000, "dix-mille"), (10_600, "dix-mille six-cents"), (10_010, "dix-mille dix"),
        (18_000, "dix-huit-mille"), (21_000, "vingt-et-un mille"), (26_000, "vingt-six-mille"),
        (66_666, "soixante-six-mille six-cent soixante-six"), (70_000, "soixante-dix-mille"),
        (80_000, "quatre-vingt mille"), (90_000, "quatre-vingt-dix-mille"), (98_000, "quatre-vingt-dix-huit-mille"),
        (99_999, "quatre-vingt-dix-neuf mille neuf cent quatre-vingt-dix-neuf"),
    ],
)
def test_the_files_that_say_a_number(n: int, files: str) -> None:
    assert P.number_files(n) == [P.NUMBERS + f for f in files.split()]
    catalog = P.catalog()
    assert " ".join(catalog[f] or "" for f in P.number_files(n)) == num2words(n, lang="fr")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("seconds", "said"),
    [(15 * 60, "quinze minutes"), (5 * 60, "cinq minutes"), (60, "une minute"), (1, "une minute"),
     (61, "deux minutes"), (21 * 60, "vingt et une minutes"), (81 * 60, "quatre-vingt-une minutes"),
     (101 * 60, "cent une minutes"), (3600, "soixante minutes"), (600, "dix minutes")],
)
def test_a_lock_duration_is_said_in_minutes(seconds: int, said: str) -> None:
    catalog = P.catalog()
    files = P.minutes_files(seconds)
    assert set(files) <= catalog.keys()
    assert " ".join(catalog[f] or "" for f in files) == said + "."


def test_no_number_word_sounds_otherwise_before_the_next_one() -> None:
    """Each file is said alone: every two files that follow each other in a number, 0 to 99,999, sound as espeak-ng
    says their texts together. `cinq` keeps its k before a consonant, as many French speakers say it (/sɛ̃k sɑ̃/)."""
    catalog = P.catalog()
    pairs = sorted({pair for n in range(P.MAX_SPOKEN_NUMBER + 1) for pair in pairwise(P.number_files(n))})
    texts = sorted({catalog[f] or "" for pair in pairs for f in pair})
    together = [f"{catalog[a]} {catalog[b]}" for a, b in pairs]
    said = [line.replace("'", "").replace(",", "").split()
            for line in _phonemes("".join(f"{t}.\n" for t in texts + together)).splitlines()]
    alone = dict(zip(texts, said[:len(texts)], strict=True))
    wrong = {}
    for (a, b), heard in zip(pairs, said[len(texts):], strict=True):
        if heard != alone[catalog[a] or ""] + alone[catalog[b] or ""] and not a.endswith("cinq"):
            wrong[a, b] = heard, alone[catalog[a] or ""] + alone[catalog[b] or ""]
    assert wrong == {}


def test_numbers_outside_the_spoken_range_are_refused() -> None:
    with pytest.raises(ValueError):
        P.number_words(100_000)
    with pytest.raises(ValueError):
        P.number_words(-1)


def test_receipts_are_said_digit_by_digit() -> None:
    zero, sept, un = (P.NUMBERS + w for w in ("zero", "sept", "un"))
    assert P.digit_files("0071") == [zero, P.PAUSE, zero, P.PAUSE, sept, P.PAUSE, un]


def test_the_digits_of_a_receipt_as_generated_are_heard_apart(tmp_path: Path) -> None:
    """The number words are trimmed of their silence so that a number's words run together: the digits of a
    receipt, played one after the other, must not ("zérozérozérozéro": how many zeros did the caller hear?)."""
    receipt = "0000018"
    files = P.digit_files(receipt)
    sounds.generate(P.catalog(), tmp_path, only=set(files))
    played = []
    for name in files:
        with wave.open(str(sounds.path_for(name, tmp_path))) as w:
            played.append(np.frombuffer(w.readframes(w.getnframes()), dtype="<i2"))
    samples = np.concatenate(played)
    frames = samples[: len(samples) // 80 * 80].reshape(-1, 80)  # 10 ms each
    quiet = np.abs(frames.astype(np.int32)).max(axis=1) < 0.02 * 32767
    gaps, run = 0, 0
    for q in quiet[1:-1]:
        if not q and run >= 20:  # 200 ms of quiet, then speech again
            gaps += 1
        run = run + 1 if q else 0
    assert gaps == len(receipt) - 1


def test_design_prompt_names(election_t1: Election, election_t2: Election) -> None:
    catalog = P.catalog()
    for name in ("remontee/ask-bureau", "remontee/ask-pin", "remontee/ask-votants", "remontee/ask-blancs_nuls",
                 "remontee/ask-exprimes"):
        assert name in catalog
    for election in (election_t1, election_t2):
        for candidate in election.candidates:
            assert f"remontee/ask-votes-{candidate.id}" in catalog
            assert candidate.spoken_name in catalog[f"remontee/ask-votes-{candidate.id}"]  # type: ignore[operator]
    confirm = [n for n in catalog if "tapez 1" in (catalog[n] or "").lower() and "confirm" in (catalog[n] or "")]
    assert confirm and all(n.startswith("remontee/ask-confirm") for n in confirm)


def test_de_is_elided_before_a_candidate_whose_name_starts_with_a_vowel(election_t1: Election) -> None:
    catalog = P.catalog([election_t1])
    assert catalog["remontee/ask-votes-montebourg"] == ("Tapez le nombre de voix d'Arnaud Montebourg, "
                                                         "puis la touche dièse.")
    assert catalog["remontee/ask-votes-aubry"] == "Tapez le nombre de voix de Martine Aubry, puis la touche dièse."
    assert [P.of(n) for n in ("Éric Zemmour", "Anne Hidalgo", "Yannick Jadot", "François Hollande")] == [
        "d'Éric Zemmour", "d'Anne Hidalgo", "de Yannick Jadot", "de François Hollande"]


def test_catalog_names_are_plain_paths_and_texts_are_french() -> None:
    for name, text in P.catalog().items():
        assert name.startswith(P.PREFIX) and name.isascii() and " " not in name, name
        assert text is None or text.strip(), name


def _phonemes(text: str) -> str:
    return subprocess.run(["espeak-ng", "-v", sounds.VOICE, "-q", "-x", "--stdin"], input=text, capture_output=True,
                          text=True, timeout=60, check=True).stdout


def test_every_prompt_is_read_with_the_french_voice() -> None:
    """espeak-ng reads a word its French dictionary marks as foreign with that language's voice, mid-sentence: the
    caller would hear a candidate's name in an English accent. `-x` shows such a switch as `(en)`."""
    switch = re.compile(r"\([a-z]{2,3}(-[a-z]+)?\)")
    texts = {name: text for name, text in P.catalog().items() if text is not None}
    if switch.search(_phonemes("\n".join(texts.values()))):  # one run for all; each alone only to name them
        switched = {name: _phonemes(text).strip() for name, text in texts.items() if switch.search(_phonemes(text))}
        assert switched == {}


def _check_wav(path: Path) -> float:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        return w.getnframes() / w.getframerate()


def test_generate_writes_8khz_mono_16bit_wav_and_skips_what_did_not_change(tmp_path: Path) -> None:
    names = [P.ASK_BUREAU, "remontee/nombres/quatre-vingts", P.SILENCE]
    written = sounds.generate(P.catalog(), tmp_path, only=names)
    assert sorted(written) == sorted(names)
    assert _check_wav(sounds.path_for(P.ASK_BUREAU, tmp_path)) > 2.0  # a sentence
    assert 0.2 < _check_wav(sounds.path_for("remontee/nombres/quatre-vingts", tmp_path)) < 2.0  # a trimmed word
    assert _check_wav(sounds.path_for(P.SILENCE, tmp_path)) == pytest.approx(sounds.SILENCE_SECONDS)
    assert sounds.generate(P.catalog(), tmp_path, only=names) == []
    changed = {**P.catalog(), P.ASK_BUREAU: "Tapez le code du bureau."}
    assert sounds.generate(changed, tmp_path, only=names) == [P.ASK_BUREAU]
    with pytest.raises(KeyError):
        sounds.generate(P.catalog(), tmp_path, only=["remontee/no-such-prompt"])


def test_sounds_command(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "run_gateway.py"), "sounds", "--out", str(tmp_path), "--only",
         "remontee/au-revoir,remontee/nombres/soixante"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert "2 of 2 sounds written" in out.stdout
    assert _check_wav(tmp_path / "remontee" / "au-revoir.wav") > 0.3
