"""What every fuzz target shares: a deterministic reader over the fuzzer's bytes, and the atheris entry point.

atheris is imported only when a target runs as `python -m fuzz.<target>`: the property tests import
the same `check_*` functions without it. Coverage comes from instrumenting the modules under test
as they are first imported (`instrumenting`), so a target imports them inside that block, and this
package imports none of them itself.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "corpus"


class ByteReader:
    """Decisions taken from the fuzzer's bytes, front to back; an exhausted input reads as zeros.

    Used instead of atheris' FuzzedDataProvider so that the same decoding runs in the property
    tests, where atheris is not installed.
    """

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        value = self.data[self.pos]
        self.pos += 1
        return value

    def int_in(self, low: int, high: int) -> int:
        """An integer in [low, high] from as many bytes as the range needs."""
        span = high - low
        if span <= 0:
            return low
        value, size = 0, 0
        while (1 << (8 * size)) <= span:
            value = (value << 8) | self.byte()
            size += 1
        return low + value % (span + 1)

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def pick(self, options: Sequence[object]) -> object:
        return options[self.int_in(0, len(options) - 1)]

    def mostly(self, usual: object, others: Sequence[object]) -> object:
        """`usual` for about five bytes in eight (and for an exhausted input), else one of `others`."""
        b = self.byte()
        return usual if b < 160 else others[b % len(others)]

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)


@contextlib.contextmanager
def instrumenting(enabled: bool, include: Sequence[str]) -> Iterator[None]:
    """Instrument `include` (module name prefixes) for coverage while importing, when running under atheris."""
    if not enabled:
        yield
        return
    import atheris

    with atheris.instrument_imports(include=list(include)):
        yield


def fuzz_main(test_one_input: Callable[[bytes], None], argv: list[str] | None = None) -> None:
    """Hand `test_one_input` to libFuzzer; argv are libFuzzer's (corpus dirs, -max_total_time=...)."""
    import atheris

    atheris.Setup(list(argv if argv is not None else sys.argv), test_one_input)
    atheris.Fuzz()
