"""Fuzz target: the FastAGI protocol (`ivr.agi`) fed arbitrary byte streams from a fake Asterisk.

One input is a scenario: the bytes the peer sends (the `agi_*` environment block, then answers),
how they are cut into packets, how far the clock moves between packets, the line limit, and what
the application asks (a list of typed commands, awaited one by one or fired without waiting).
The channel runs on a `StringTransport` with a `task.Clock`: no socket, no sleep.

Invariants checked for every scenario (`check_scenario` raises `AssertionError` when one breaks):
- nothing raises out of `dataReceived`;
- every command's Deferred fires with its typed value (a `get_data` is `(str, bool)`, a key is
  one character or None, ...) or fails with an `AGIError`, never another exception;
- a protocol violation or a timeout closes that connection (`transport.disconnecting`), and
  nothing is written after the connection was closed;
- no line longer than the limit reaches the parser, and the unparsed buffer stays under it;
- after a hang-up (the HANGUP line, a 511) only dead-safe commands are written;
- after `connectionLost`, every pending Deferred has fired and no timer is left on the clock.

Input layout: byte 0 picks the mode (odd: the stream is built from FastAGI tokens; even: the rest
of the input, after the scenario bytes, is the stream as is), then the scenario's own bytes.

Run: `.venv/bin/python -m fuzz.agi -max_total_time=600 var/fuzz/corpus/agi fuzz/corpus/agi`
(or `fuzz/run.py --target agi --seconds 600`).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

from fuzz._harness import ByteReader, fuzz_main, instrumenting

with instrumenting(__name__ == "__main__", ["ivr.agi", "twisted.protocols.basic"]):
    from twisted.internet import defer
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from ivr.agi import DEAD_SAFE, AGIChannel, AGIError, FastAGIFactory, Playback, Reply, parse_reply, quote

# --- the scenario ---

# What the application may ask: (name, whether it is dead-safe), the call made in `_issue`.
OPERATIONS = ("answer", "get_data", "stream_file", "wait_for_digit", "set_variable", "get_variable", "exec",
              "hangup", "verbose", "say_digits", "noop", "when_hung_up", "get_data_zero")
MAX_LINES = (16, 64, 256, 8192)


@dataclass
class Scenario:
    stream: bytes
    cuts: list[int] = field(default_factory=lambda: [1 << 20])  # packet sizes, cycled
    advances: list[float] = field(default_factory=lambda: [0.0])  # seconds after each packet, cycled
    plan: list[tuple[str, bool]] = field(default_factory=list)  # (operation, awaited)
    max_line: int = 8192
    final_advance: float = 0.0  # seconds after the last packet, before the connection is lost


ENV_NAMES = (b"agi_network", b"agi_network_script", b"agi_request", b"agi_channel", b"agi_language",
             b"agi_type", b"agi_uniqueid", b"agi_version", b"agi_callerid", b"agi_accountcode",
             b"agi_enhanced", b"agi_arg_1", b"AGI_BAD", b"agi_", b"agi_x-y")
ENV_VALUES = (b"yes", b"results", b"agi://127.0.0.1:4573/results", b"Local/s@hotline-00000000;2", b"fr",
              b"Local", b"1318183200.7", b"22.10.0", b"0612345678", b"", b"0.0", b"/results/", b"other",
              b"caf\xe9", b"\xc3\xa9t\xc3\xa9", b"a: b: c")
RESULTS = (b"0", b"1", b"-1", b"55", b"42", b"35", b"48", b"1234", b"", b"12", b"-2", b"0x10", b"1114112",
           b"99999999999999999999", b"\xc2\xb2", b"\xd9\xa3", b"\xb2", b"1_000", b" 1", b"+5", b"-0")
SUFFIXES = (b"", b" (timeout)", b" (a value)", b" endpos=16000", b" (timeout) endpos=-5", b" (unclosed",
            b" endpos=", b" endpos=\xc2\xb2", b" endpos=--1", b" (x) (y)", b" endpos=1 endpos=2", b")",
            b" (\xff\xfe)")
ANSWERS = (b"100 result=0 Trying...", b"100", b"510 Invalid or unknown command",
           b"511 Command Not Permitted on a dead channel or intercept routine", b"HANGUP", b"HANGUP ",
           b"520-Invalid command syntax.  Proper usage follows:", b"Usage: GET DATA <file> [timeout] [maxdigits]",
           b"520 End of proper usage.", b"520", b"200", b"200 result", b"", b"2000 result=1", b"hangup")
TERMINATORS = (b"\n", b"\r\n", b"\r", b"", b"\n\n", b"\r\r\n")


def _built_stream(reader: ByteReader, max_line: int) -> bytes:
    """A stream from FastAGI tokens: an environment block (mostly well-formed), then answers."""
    out: list[bytes] = []
    for _ in range(reader.int_in(0, 14)):
        kind = reader.int_in(0, 7)
        name = reader.pick(ENV_NAMES)
        if kind == 0:  # a value of arbitrary bytes
            value = reader.take(reader.int_in(0, 24))
            out.append(name + b": " + value + b"\n")  # type: ignore[operator]
        elif kind == 1:  # no space after the colon, or no colon at all
            out.append(name + reader.pick((b":", b"", b" : ")) + reader.pick(ENV_VALUES) + b"\n")  # type: ignore[operator]
        else:
            out.append(name + b": " + reader.pick(ENV_VALUES) + reader.pick((b"\n", b"\r\n")))  # type: ignore[operator]
    if reader.int_in(0, 7):
        out.append(b"agi_network_script: results\n")
    if reader.int_in(0, 15):
        out.append(reader.pick((b"\n", b"\r\n", b"\r")))  # type: ignore[arg-type]
    while not reader.exhausted:
        kind = reader.int_in(0, 9)
        if kind <= 4:
            line = b"200 result=" + reader.pick(RESULTS) + reader.pick(SUFFIXES)  # type: ignore[operator]
        elif kind <= 6:
            line = reader.pick(ANSWERS)  # type: ignore[assignment]
        elif kind == 7:
            line = reader.take(reader.int_in(0, 32))
        elif kind == 8:  # a long line: at, just over, or far over the limit
            line = b"200 result=" + b"7" * (max_line + reader.int_in(0, 3) * 2 - 13)
        else:
            line = b"200 result=0 endpos=" + b"9" * reader.int_in(4000, 5000)  # int() has a digit limit
        out.append(line + reader.pick(TERMINATORS))  # type: ignore[operator]
    return b"".join(out)


def scenario_from_bytes(data: bytes) -> Scenario:
    reader = ByteReader(data)
    mode = reader.byte()
    max_line = reader.pick(MAX_LINES)
    cuts = [reader.int_in(1, 300) for _ in range(reader.int_in(1, 4))]
    advances = [float(reader.pick((0.0, 0.0, 0.5, 5.0, 11.0, 16.0, 200.0))) for _ in range(reader.int_in(1, 3))]
    plan = [(str(reader.pick(OPERATIONS)), reader.flag()) for _ in range(reader.int_in(0, 8))]
    final_advance = float(reader.pick((0.0, 0.0, 20.0, 400.0)))
    stream = _built_stream(reader, int(max_line)) if mode & 1 else reader.rest()  # type: ignore[arg-type]
    return Scenario(stream, cuts, advances, plan, int(max_line), final_advance)  # type: ignore[arg-type]


# --- running it ---

class _Watched(AGIChannel):
    """The real channel, noting every line it parses and every line it writes (and whether hung up then)."""

    longest_line = 0
    written: list[tuple[bool, str]]

    def lineReceived(self, raw: bytes) -> None:
        self.longest_line = max(self.longest_line, len(raw))
        super().lineReceived(raw)

    def sendLine(self, line: bytes) -> None:
        self.written.append((self.hung_up, line.decode("utf-8")))
        super().sendLine(line)


class _Factory(FastAGIFactory):
    def buildProtocol(self, addr: Any) -> AGIChannel:
        channel = _Watched(self)
        channel.written = []
        self.channels.add(channel)
        return channel


def _check_value(operation: str, value: object) -> None:
    """The typed value each command promises."""
    def key(v: object) -> bool:
        return v is None or (isinstance(v, str) and len(v) == 1)

    ok = {
        "answer": value is None, "set_variable": value is None, "hangup": value is None, "verbose": value is None,
        "when_hung_up": value is None,
        "get_data": isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
        and isinstance(value[1], bool),
        "stream_file": isinstance(value, Playback) and key(value.digit)
        and (value.endpos is None or isinstance(value.endpos, int)),
        "wait_for_digit": key(value),
        "get_variable": value is None or isinstance(value, str),
        "exec": isinstance(value, int),
        "noop": isinstance(value, Reply),
    }
    ok["get_data_zero"] = ok["get_data"]
    ok["say_digits"] = ok["stream_file"]
    assert ok[operation], f"{operation} gave {value!r}, not its typed value"


def _issue(channel: AGIChannel, operation: str) -> defer.Deferred[Any]:
    calls = {
        "answer": lambda: channel.answer(),
        "get_data": lambda: channel.get_data("remontee/ask-pin", 5000, 4),
        "get_data_zero": lambda: channel.get_data("remontee/ask-bureau", 0, 6),
        "stream_file": lambda: channel.stream_file("remontee/welcome", "0123456789*#"),
        "wait_for_digit": lambda: channel.wait_for_digit(5000),
        "set_variable": lambda: channel.set_variable("REMONTEE_OUTCOME", "accepted"),
        "get_variable": lambda: channel.get_variable("CALLERID(num)"),
        "exec": lambda: channel.exec("Playback", "beep"),
        "hangup": lambda: channel.hangup(),
        "verbose": lambda: channel.verbose('a "quoted" message', 3),
        "say_digits": lambda: channel.say_digits("0123", "#"),
        "noop": lambda: channel.send_command("NOOP"),
        "when_hung_up": lambda: channel.when_hung_up(),
    }
    return calls[operation]()


@dataclass
class Outcome:
    """What one scenario did, for the property tests to look at."""

    started: bool = False
    closed: bool = False
    violations: int = 0
    values: list[tuple[str, object]] = field(default_factory=list)
    errors: list[tuple[str, type[BaseException]]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)


def check_scenario(scenario: Scenario) -> Outcome:
    """Play the scenario against a real AGIChannel; AssertionError names the invariant that broke."""
    clock = Clock()
    outcome = Outcome()
    issued: list[tuple[str, defer.Deferred[Any]]] = []
    app_done: list[defer.Deferred[Any]] = []

    broken: list[str] = []  # invariants broken inside callbacks, where an exception would be swallowed

    def settle(operation: str, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        def ok(value: object) -> None:
            try:
                _check_value(operation, value)
            except AssertionError as exc:
                broken.append(str(exc))
            outcome.values.append((operation, value))

        def failed(failure: Failure) -> None:
            if not failure.check(AGIError):
                broken.append(f"{operation} failed with {failure.type.__name__}: {failure.getErrorMessage()} "
                              f"(only AGIError may come out)\n{failure.getTraceback()}")
            outcome.errors.append((operation, failure.type))

        return d.addCallbacks(ok, failed)

    async def application(channel: AGIChannel) -> None:
        outcome.started = True
        for operation, awaited in scenario.plan:
            d = settle(operation, _issue(channel, operation))
            issued.append((operation, d))
            if awaited:
                await d  # an AssertionError from `settle` ends the application: seen below

    def run_application(channel: AGIChannel) -> defer.Deferred[Any]:
        d = defer.ensureDeferred(application(channel))
        app_done.append(d)
        return d

    factory = _Factory({"results": run_application}, clock=clock, command_timeout=15.0, playback_timeout=60.0,
                       env_timeout=10.0, max_line=scenario.max_line)
    channel = factory.buildProtocol(None)
    assert isinstance(channel, _Watched)
    transport = StringTransport()
    channel.makeConnection(transport)

    written_when_closed: int | None = None
    position, packet = 0, 0
    stream = scenario.stream
    while position < len(stream) and not transport.disconnecting:
        size = max(1, scenario.cuts[packet % len(scenario.cuts)])
        chunk = stream[position : position + size]
        position += len(chunk)
        try:
            channel.dataReceived(chunk)
        except Exception as exc:
            raise AssertionError(f"dataReceived raised {type(exc).__name__}: {exc}") from exc
        assert transport.disconnecting or len(channel._buffer) <= scenario.max_line + 1, (
            f"{len(channel._buffer)} unparsed bytes kept on a live connection with a {scenario.max_line}-byte limit")
        clock.advance(scenario.advances[packet % len(scenario.advances)])
        packet += 1
        if transport.disconnecting and written_when_closed is None:
            written_when_closed = len(transport.value())
    clock.advance(scenario.final_advance)
    if transport.disconnecting and written_when_closed is None:
        written_when_closed = len(transport.value())

    stats = factory.stats
    outcome.violations = stats.violations + stats.timeouts
    if outcome.violations:
        assert transport.disconnecting, "a protocol violation or a timeout left the connection open"
    assert channel.longest_line <= scenario.max_line, (
        f"a {channel.longest_line}-byte line reached the parser; the limit is {scenario.max_line}")

    outcome.closed = bool(transport.disconnecting)
    channel.connectionLost(Failure(ConnectionDone()))
    if written_when_closed is not None:
        assert len(transport.value()) == written_when_closed, "a command was written after the connection closed"
    for operation, d in issued:
        assert d.called, f"{operation}: its Deferred never fired, even after connectionLost"
    assert not broken, broken[0]
    for d in app_done:
        assert d.called, "the application never finished after connectionLost"
    leftover = [call for call in clock.getDelayedCalls() if call.active()]
    assert not leftover, f"timers left on the clock after connectionLost: {leftover}"
    for hung_up, line in channel.written:
        dead_safe = any(line == name or line.startswith(name + " ") for name in DEAD_SAFE)
        assert not hung_up or dead_safe, f"{line!r} was written after the caller hung up"
    outcome.written = [line for _, line in channel.written]
    return outcome


def check_reply_line(data: bytes) -> None:
    """The pure helpers on one line: parse_reply never raises; quote refuses only line breaks and NUL."""
    text = data.decode("latin-1")
    reply = parse_reply(text)
    if reply is not None:
        assert reply.raw == text and (reply.endpos is None or isinstance(reply.endpos, int))
    try:
        quoted = quote(text)
    except ValueError:
        assert any(ch in text for ch in "\r\n\0")
    else:
        assert not any(ch in quoted for ch in "\r\n\0")


def test_one_input(data: bytes) -> None:
    check_scenario(scenario_from_bytes(data))
    check_reply_line(data[:200])


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)  # a violation logs a warning; thousands a second would drown the output
    fuzz_main(test_one_input, sys.argv)
