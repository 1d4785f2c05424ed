"""Keyed inputs declared as data, the way PAGI declares its input nodes, and the one routine that reads them.

A `DigitInput` says what to ask and how to judge the answer: the prompt, the minimum and
maximum number of digits, the end key (`#`) and the cancel key (`*`), the first-digit and
inter-digit timeouts, a validator with its own error prompt, the number of wrong attempts and
of re-prompts on silence. `read_input` plays it with `GET DATA` and applies those rules; the
call flow only sees a valid entry, `NoInput` (the caller stayed silent) or `TooManyErrors`.

Why one `GET DATA` per attempt: Asterisk drops the keys pressed between two AGI commands (its
AGI loop reads and frees the channel's frames while it waits for the next command), so an
entry read in two commands can lose a digit. A `GET DATA` takes one timeout for both waits, or
`0` for Asterisk's own pair (6 s, then 2 s between keys); only an input that declares another
pair is read in two commands, the first key then the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ivr import prompts
from ivr.agi import AGIChannel, CommandFailed

log = logging.getLogger(__name__)

DIGITS = "0123456789"
# Keys read by a GET DATA that ends on `#`: room for a few `*` restarts within one entry.
CAPTURE = 24
ASTERISK_DEFAULT_TIMEOUTS = (6000, 2000)  # what GET DATA does with a timeout of 0

ErrorPrompt = Sequence[str] | Callable[[str], Sequence[str]]


class NoInput(Exception):
    """The caller stayed silent through the prompt and every re-prompt."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no input for {name}")
        self.name = name


class TooManyErrors(Exception):
    """The caller keyed an invalid entry as many times as the input allows."""

    def __init__(self, name: str, last: str) -> None:
        super().__init__(f"too many invalid entries for {name} (last {last!r})")
        self.name, self.last = name, last


@dataclass(frozen=True)
class DigitInput:
    name: str
    prompt: str  # the sound of the GET DATA that reads it (DESIGN.md's prompt names)
    min_digits: int = 1
    max_digits: int = 1
    end_key: str | None = "#"  # None: the entry ends at max_digits (a one-key menu)
    cancel_key: str | None = "*"  # keys before the last cancel key are dropped; alone, it restarts the entry
    first_digit_timeout_ms: int = 5000
    inter_digit_timeout_ms: int = 5000
    validator: Callable[[str], bool] | None = None
    error_prompt: ErrorPrompt = (prompts.INVALID,)
    max_attempts: int = 3  # invalid entries before TooManyErrors
    silence_reprompts: int = 3  # re-prompts after a silence before NoInput
    # A PIN: what was keyed is never logged nor put in an exception (a PIN keyed twice, or cut short, is the
    # PIN or part of it); only its length is.
    secret: bool = False

    def __post_init__(self) -> None:
        if self.end_key not in ("#", None):
            raise ValueError("GET DATA ends an entry on # only")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"{self.name}: need 1 <= min_digits <= max_digits")

    def errors_for(self, entry: str) -> list[str]:
        return list(self.error_prompt(entry) if callable(self.error_prompt) else self.error_prompt)

    @property
    def capture(self) -> int:
        """How many keys GET DATA reads: the entry itself for a menu, more when `#` ends it."""
        return self.max_digits if self.end_key is None else max(CAPTURE, self.max_digits + 1)


def menu(name: str, prompt: str, choices: str, **options: object) -> DigitInput:
    """A one-key question: the entry is one of `choices`."""
    return DigitInput(name, prompt, 1, 1, end_key=None, validator=lambda v: v in choices, **options)  # type: ignore[arg-type]


async def read_input(
    agi: AGIChannel,
    spec: DigitInput,
    *,
    preface: Sequence[str] = (),
    first_key: str | None = None,
) -> str:
    """Ask `spec` until a valid entry; `preface` plays first (interruptible), `first_key` was already pressed.

    A key pressed during the preface (or `first_key`, pressed during what came before) starts the
    entry: the question is then not played, the rest is read after a short silence.
    """
    silences = errors = 0
    to_play = list(preface)
    while True:
        if first_key is None and to_play:
            first_key = await _play_interruptible(agi, to_play)
        to_play = []
        if first_key is not None and spec.cancel_key is not None and first_key == spec.cancel_key:
            first_key = None  # a cancel key before the entry starts it afresh
        try:
            raw, timed_out = await _get_keys(agi, spec, first_key)
        except CommandFailed as exc:  # a missing prompt file, or a hang-up the next command will see
            log.warning("%s: %s; counted as a failed attempt", spec.name, exc)
            errors += 1
            if errors >= spec.max_attempts:
                raise TooManyErrors(spec.name, "") from exc
            continue
        first_key = None
        entry = raw
        if spec.cancel_key and spec.cancel_key in entry:
            entry = entry.rsplit(spec.cancel_key, 1)[1]
            if not entry:  # "*" alone: the caller starts again
                continue
        if entry == "" and timed_out:
            silences += 1
            if silences > spec.silence_reprompts:
                raise NoInput(spec.name)
            to_play = [prompts.NOTHING_HEARD]
            continue
        problem = _problem(spec, entry)
        if problem is None:
            return entry
        errors += 1
        shown = f"of {len(entry)} keys" if spec.secret else repr(entry)
        log.info("%s: invalid entry %s (%s), attempt %d of %d", spec.name, shown, problem, errors, spec.max_attempts)
        if errors >= spec.max_attempts:
            raise TooManyErrors(spec.name, "" if spec.secret else entry)
        to_play = [prompts.TOO_LONG] if problem == "too long" else spec.errors_for(entry)


def _problem(spec: DigitInput, entry: str) -> str | None:
    if not entry.isdigit() or not entry.isascii():
        return "not digits"
    if len(entry) < spec.min_digits:
        return "too short"
    if len(entry) > spec.max_digits:
        return "too long"
    if spec.validator is not None and not spec.validator(entry):
        return "refused"
    return None


async def _play_interruptible(agi: AGIChannel, files: Sequence[str]) -> str | None:
    for name in files:
        try:
            playback = await agi.stream_file(name, DIGITS + "*#")
        except CommandFailed as exc:
            log.warning("%s", exc)
            continue
        if playback.digit is not None:
            return None if playback.digit == "#" else playback.digit
    return None


async def _get_keys(agi: AGIChannel, spec: DigitInput, first_key: str | None) -> tuple[str, bool]:
    """The keys of one attempt and whether it ended on a timeout."""
    first_ms, inter_ms = spec.first_digit_timeout_ms, spec.inter_digit_timeout_ms
    if first_key is not None:
        if spec.end_key is None and spec.capture == 1:
            return first_key, False
        rest, timed_out = await agi.get_data(prompts.SILENCE, inter_ms, spec.capture - 1)
        return first_key + rest, timed_out
    if first_ms == inter_ms:
        return await agi.get_data(spec.prompt, first_ms, spec.capture)
    if (first_ms, inter_ms) == ASTERISK_DEFAULT_TIMEOUTS:
        return await agi.get_data(spec.prompt, 0, spec.capture)
    # Another pair: the first key with its own timeout, then the rest (see the module's docstring).
    first, timed_out = await agi.get_data(spec.prompt, first_ms, 1)
    if timed_out or first == "" or spec.capture == 1:
        return first, timed_out
    rest, timed_out = await agi.get_data(prompts.SILENCE, inter_ms, spec.capture - 1)
    return first + rest, timed_out
