"""Turning what a channel captured (keyed digits, OCR text, a form field) into clean values."""

from __future__ import annotations

# More digits than any count on any form (max_digits is 5 at most) and than a 64-bit integer holds: beyond this a
# digit string is not a count. Checked before int(), which refuses more than 4300 digits with a ValueError.
MAX_COUNT_DIGITS = 18


def parse_count(raw: object) -> int | None:
    """A count from keyed or read text: `"0042"` → 42, `" 1 204 "` → 1204; blank, not a number, or more than
    MAX_COUNT_DIGITS significant digits → None.

    Only ASCII digits count: a phone keys them and the OCR reads them; anything else is
    a problem for a human, never guessed at.
    """
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw if raw >= 0 else None
    if not isinstance(raw, str):
        return None
    # Thin and no-break spaces are common thousands separators in French text. No compatibility folding (NFKC):
    # it made a superscript ² (a key of the French keyboard, beside 1) or a circled ② a digit 2.
    text = "".join(ch for ch in raw if not ch.isspace())
    if not text or not text.isascii() or not text.isdigit():
        return None
    if len(text.lstrip("0")) > MAX_COUNT_DIGITS:  # leading zeros are harmless: "0042" is 42, however many
        return None
    return int(text)


def normalize_bureau_code(raw: object) -> str | None:
    """A bureau code as the registry spells it: digits only, leading zeros kept; None if not digits."""
    if not isinstance(raw, str | int) or isinstance(raw, bool):
        return None
    text = "".join(str(raw).split())
    if not text or not text.isascii() or not text.isdigit():
        return None
    return text
