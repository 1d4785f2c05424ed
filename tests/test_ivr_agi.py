"""The FastAGI protocol alone, driven through a StringTransport with a fake clock: no socket, no sleep."""

from __future__ import annotations

import random
import tracemalloc
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from ivr.agi import (
    AGIChannel,
    AGIStats,
    ChannelHungUp,
    CommandFailed,
    CommandTimeout,
    FastAGIFactory,
    InvalidCommand,
    Playback,
    ProtocolViolation,
    UsageError,
    parse_reply,
    quote,
)

ENV = (
    b"agi_network: yes\n"
    b"agi_network_script: results\n"
    b"agi_request: agi://127.0.0.1:4573/results\n"
    b"agi_channel: Local/s@hotline-00000000;2\n"
    b"agi_language: fr\n"
    b"agi_type: Local\n"
    b"agi_uniqueid: 1318183200.7\n"
    b"agi_version: 22.10.0\n"
    b"agi_callerid: 0612345678\n"
    b"agi_accountcode: \n"
    b"agi_enhanced: 0.0\n"
    b"\n"
)


class Harness:
    """One AGIChannel on a StringTransport; `app` receives the channel once its environment is read."""

    def __init__(self, max_line: int = 8192) -> None:
        self.clock = Clock()
        self.channels: list[AGIChannel] = []
        self.done: defer.Deferred[None] = defer.Deferred()
        self.factory = FastAGIFactory({"results": self._app}, clock=self.clock, command_timeout=15.0,
                                      playback_timeout=60.0, env_timeout=10.0, max_line=max_line)
        self.channel = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def _app(self, channel: AGIChannel) -> defer.Deferred[None]:
        self.channels.append(channel)
        return self.done

    def connect(self) -> AGIChannel:
        self.channel.dataReceived(ENV)
        assert self.channels == [self.channel]
        return self.channel

    def sent(self) -> list[str]:
        lines = self.transport.value().decode().splitlines()
        self.transport.clear()
        return lines

    def answer(self, data: bytes) -> None:
        self.channel.dataReceived(data)


def result(d: defer.Deferred[Any]) -> Any:
    """The value a Deferred already has (the protocol answered synchronously)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def test_environment_is_read_to_the_blank_line_and_names_the_application() -> None:
    h = Harness()
    channel = h.connect()
    assert channel.env["agi_network_script"] == "results"
    assert channel.env["agi_accountcode"] == ""  # an empty value: "agi_accountcode: " then nothing
    assert channel.env["agi_channel"] == "Local/s@hotline-00000000;2"
    assert channel.script == "results" and channel.uniqueid == "1318183200.7" and channel.callerid == "0612345678"
    assert h.factory.stats.calls_started == 1


def test_environment_split_across_packets_and_with_crlf() -> None:
    h = Harness()
    data = ENV.replace(b"\n", b"\r\n")
    for i in range(0, len(data), 7):
        h.channel.dataReceived(data[i:i + 7])
    assert h.channels and h.channel.env["agi_type"] == "Local"


def test_unknown_script_closes_without_a_command() -> None:
    h = Harness()
    h.channel.dataReceived(ENV.replace(b"script: results", b"script: other"))
    assert h.channels == [] and h.transport.disconnecting and h.sent() == []


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("200 result=0", ("0", None, None)),
        ("200 result=1234", ("1234", None, None)),
        ("200 result=12 (timeout)", ("12", "timeout", None)),
        ("200 result= (timeout)", ("", "timeout", None)),
        ("200 result=-1", ("-1", None, None)),
        ("200 result=0 endpos=16000", ("0", None, 16000)),
        ("200 result=55 endpos=4000", ("55", None, 4000)),
        ("200 result=1 (a value (with) brackets)", ("1", "a value (with) brackets", None)),
    ],
)
def test_parse_reply(line: str, expected: tuple[str, str | None, int | None]) -> None:
    reply = parse_reply(line)
    assert reply is not None and (reply.result, reply.data, reply.endpos) == expected


def test_quote_arguments_as_res_agi_parses_them() -> None:
    assert quote("remontee/ask-pin") == "remontee/ask-pin"
    assert quote("") == '""'
    assert quote('il a dit "non"') == '"il a dit \\"non\\""'
    with pytest.raises(ValueError):
        quote("two\nlines")


def test_typed_commands_their_wire_form_and_results() -> None:
    h = Harness()
    agi = h.connect()
    d = agi.answer()
    assert h.sent() == ["ANSWER"]
    h.answer(b"200 result=0\n")
    assert result(d) is None

    d = agi.get_data("remontee/ask-pin", 5000, 4)
    assert h.sent() == ["GET DATA remontee/ask-pin 5000 4"]
    h.answer(b"200 result=1234\n")
    assert result(d) == ("1234", False)
    d = agi.get_data("remontee/ask-pin", 5000, 4)
    h.answer(b"200 result=12 (timeout)\n")
    assert result(d) == ("12", True)
    d = agi.get_data("remontee/ask-pin", 5000, 4)
    h.answer(b"200 result= (timeout)\n")
    assert result(d) == ("", True)
    d = agi.get_data("no/such/file", 2000, 4)
    h.answer(b"200 result=-1\n")
    with pytest.raises(CommandFailed):
        result(d)
    assert not agi.hung_up  # a missing file is not a hang-up

    d = agi.stream_file("remontee/bienvenue", "1#")
    assert h.sent()[-1] == 'STREAM FILE remontee/bienvenue 1#'
    h.answer(b"200 result=0 endpos=16000\n")
    assert result(d) == Playback(None, 16000)
    d = agi.stream_file("remontee/bienvenue", "")
    assert h.sent() == ['STREAM FILE remontee/bienvenue ""']
    h.answer(b"200 result=35 endpos=800\n")
    assert result(d) == Playback("#", 800)

    for answer, digit in ((b"200 result=55\n", "7"), (b"200 result=42\n", "*"), (b"200 result=0\n", None)):
        d = agi.wait_for_digit(5000)
        assert h.sent() == ["WAIT FOR DIGIT 5000"]
        h.answer(answer)
        assert result(d) == digit

    d = agi.say_digits("0071", "")
    assert h.sent() == ['SAY DIGITS 0071 ""']
    h.answer(b"200 result=0\n")
    assert result(d).digit is None

    d = agi.set_variable("REMONTEE_OUTCOME", "accepted")
    assert h.sent() == ["SET VARIABLE REMONTEE_OUTCOME accepted"]
    h.answer(b"200 result=1\n")
    assert result(d) is None
    d = agi.get_variable("CALLERID(num)")
    h.answer(b"200 result=1 (0612345678)\n")
    assert result(d) == "0612345678"
    d = agi.get_variable("NOPE")
    h.answer(b"200 result=0\n")
    assert result(d) is None

    assert h.sent() == ["GET VARIABLE CALLERID(num)", "GET VARIABLE NOPE"]
    d = agi.verbose('bureau "750120" done', 3)
    assert h.sent() == ['VERBOSE "bureau \\"750120\\" done" 3']
    h.answer(b"200 result=1\n")
    d = agi.exec("Playback", "remontee/au-revoir")
    h.answer(b"100 result=0 Trying...\n")  # skipped: the 200 follows
    assert not d.called
    h.answer(b"200 result=0\n")
    assert result(d) == 0
    d = agi.hangup()
    assert h.sent()[-1] == "HANGUP"
    h.answer(b"200 result=1\n")
    assert result(d) is None


def test_one_command_at_a_time() -> None:
    h = Harness()
    agi = h.connect()
    first, second = agi.answer(), agi.set_variable("A", "1")
    assert h.sent() == ["ANSWER"]
    h.answer(b"200 result=0\n")
    assert first.called and h.sent() == ["SET VARIABLE A 1"] and not second.called
    h.answer(b"200 result=1\n")
    assert second.called


def test_invalid_command_and_multiline_usage() -> None:
    h = Harness()
    agi = h.connect()
    d = agi.send_command("FROBNICATE")
    h.answer(b"510 Invalid or unknown command\n")
    with pytest.raises(InvalidCommand):
        result(d)
    d = agi.send_command("GET DATA")
    h.answer(b"520-Invalid command syntax.  Proper usage follows:\n")
    h.answer(b"Usage: GET DATA <file to be streamed> [timeout] [maxdigits]\n")
    assert not d.called
    h.answer(b" Stream the given file, and receive DTMF data.\n520 End of proper usage.\n")
    with pytest.raises(UsageError) as caught:
        result(d)
    assert "Usage: GET DATA" in caught.value.usage and "receive DTMF" in caught.value.usage
    d = agi.answer()  # the connection is still in step
    h.answer(b"200 result=0\n")
    assert result(d) is None


def test_hangup_line_is_an_event_and_only_dead_safe_commands_run_after_it() -> None:
    h = Harness()
    agi = h.connect()
    hung_up = agi.when_hung_up()
    d = agi.stream_file("remontee/ask-bureau", "")
    h.sent()
    h.answer(b"200 result=-1 endpos=1200\nHANGUP\n")  # as Asterisk sends them, in one packet
    with pytest.raises(ChannelHungUp):
        result(d)  # the -1 is the command's answer, told as a hang-up since the HANGUP line came with it
    assert agi.hung_up and hung_up.called
    with pytest.raises(ChannelHungUp):
        result(agi.get_data("remontee/ask-pin", 5000, 6))  # failed at once: Asterisk would answer 511
    assert h.sent() == []
    d = agi.set_variable("REMONTEE_OUTCOME", "hangup")  # dead-safe: still sent
    assert h.sent() == ["SET VARIABLE REMONTEE_OUTCOME hangup"]
    h.answer(b"200 result=1\n")
    assert result(d) is None
    d = agi.verbose("gone")
    h.answer(b"200 result=1\n")
    assert result(d) is None


def test_minus_one_and_hangup_in_two_packets() -> None:
    h = Harness()
    agi = h.connect()
    d = agi.stream_file("remontee/ask-bureau", "")
    h.answer(b"200 result=-1 endpos=1200\n")
    with pytest.raises(CommandFailed):
        result(d)  # alone, -1 may be a missing file
    assert not agi.hung_up
    h.answer(b"HANGUP\n")  # not the answer to anything: an event
    assert agi.hung_up and not h.transport.disconnecting


def test_hangup_while_nothing_is_pending_and_a_511_for_a_command_already_sent() -> None:
    h = Harness()
    agi = h.connect()
    d = agi.get_data("remontee/ask-pin", 5000, 6)
    h.sent()
    h.answer(b"200 result=1234\n")
    assert result(d) == ("1234", False)
    h.answer(b"HANGUP\n")  # while the server checks the PIN in a thread
    assert agi.hung_up

    h2 = Harness()
    agi2 = h2.connect()
    d = agi2.stream_file("remontee/ask-pin", "")  # sent before the HANGUP line arrives
    h2.answer(b"511 Command Not Permitted on a dead channel or intercept routine\n")
    with pytest.raises(ChannelHungUp):
        result(d)
    assert agi2.hung_up


def test_command_timeout_closes_that_connection() -> None:
    h = Harness()
    agi = h.connect()
    d = agi.set_variable("A", "1")
    h.clock.advance(14.9)
    assert not d.called
    h.clock.advance(0.2)
    with pytest.raises(CommandTimeout):
        result(d)
    assert h.transport.disconnecting and h.factory.stats.timeouts == 1
    h.answer(b"200 result=1\n")  # a late answer is not read
    with pytest.raises(ChannelHungUp):
        result(agi.answer())


def test_playing_commands_get_the_prompt_allowance_plus_their_own_timeout() -> None:
    h = Harness()
    agi = h.connect()
    d = agi.get_data("remontee/ask-pin", 5000, 6)
    h.clock.advance(64.0)  # 60 s allowance + 5 s of the GET DATA
    assert not d.called
    h.clock.advance(1.5)
    with pytest.raises(CommandTimeout):
        result(d)


def test_environment_that_never_ends_is_dropped() -> None:
    h = Harness()
    h.channel.dataReceived(b"agi_network: yes\n")
    h.clock.advance(10.5)
    assert h.transport.disconnecting and h.channels == [] and h.factory.stats.timeouts == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\xfe binary noise\n",
        b"HTTP/1.1 200 OK\n",
        b"200 resolt=1\n",
        b"HANGUPX\n",
    ],
)
def test_garbage_answer_closes_only_this_connection(garbage: bytes) -> None:
    h, other = Harness(), Harness()
    agi, agi_other = h.connect(), other.connect()
    d, d_other = agi.answer(), agi_other.answer()
    h.answer(garbage)
    with pytest.raises(ProtocolViolation):
        result(d)
    assert h.transport.disconnecting and h.factory.stats.violations == 1
    other.answer(b"200 result=0\n")
    assert result(d_other) is None and not other.transport.disconnecting


def test_answer_nobody_asked_for_is_a_violation() -> None:
    h = Harness()
    h.connect()
    h.answer(b"200 result=0\n")
    assert h.transport.disconnecting


def test_garbage_in_the_environment_and_over_long_lines() -> None:
    h = Harness()
    h.channel.dataReceived(b"GET / HTTP/1.1\n")
    assert h.transport.disconnecting and h.channels == []

    h = Harness(max_line=1024)
    agi = h.connect()
    d = agi.answer()
    h.answer(b"200 result=" + b"9" * 5000)  # no line end yet, already too long
    with pytest.raises(ProtocolViolation):
        result(d)
    assert h.transport.disconnecting

    h = Harness(max_line=1024)
    h.channel.dataReceived(b"agi_callerid: " + b"x" * 2000 + b"\n")
    assert h.transport.disconnecting


def test_a_usage_block_that_never_ends_is_a_violation() -> None:
    h = Harness()
    agi = h.connect()
    d = agi.send_command("GET DATA")
    h.answer(b"520-Invalid command syntax.  Proper usage follows:\n" + b"more usage\n" * 150)
    with pytest.raises(ProtocolViolation):
        result(d)


def test_connection_lost_fails_pending_commands_and_ends_the_call() -> None:
    h = Harness()
    agi = h.connect()
    d = agi.get_data("remontee/ask-bureau", 5000, 24)
    h.channel.connectionLost(None)
    with pytest.raises(ChannelHungUp):
        result(d)
    assert agi.hung_up
    h.done.callback(None)
    assert h.factory.stats.calls_finished == 1 and h.factory.stats.calls_active == 0


def test_turnaround_is_measured_from_each_answer_to_the_next_command() -> None:
    h = Harness()
    now = [100.0]
    h.factory.stats.timer = lambda: now[0]
    agi = h.connect()
    now[0] += 0.002
    d = agi.answer()
    h.answer(b"200 result=0\n")
    result(d)
    now[0] += 0.050
    agi.note_thread_hop()
    agi.set_variable("A", "1")
    stats = h.factory.stats
    snapshot = stats.snapshot()
    assert snapshot["turnaround"] == pytest.approx({"count": 1, "p50_ms": 2, "p99_ms": 2, "max_ms": 2})
    assert snapshot["turnaround_after_thread"] == pytest.approx({"count": 1, "p50_ms": 50, "p99_ms": 50, "max_ms": 50})
    assert snapshot["turnaround_all"]["count"] == 2


def _sample(n: int, seed: int) -> list[float]:
    """Turnarounds as a night has them: most under a millisecond, a tail of slow ones, a few of seconds."""
    rng = random.Random(seed)
    return [rng.lognormvariate(-8, 1.5) if rng.random() < 0.98 else rng.uniform(0.01, 5.0) for _ in range(n)]


def test_the_figures_keep_their_meaning() -> None:
    """Count and max exact, percentiles those of the samples sorted (the n-th of them) to within 1 %."""
    stats = AGIStats()
    direct, after_thread, held = _sample(50_000, 1), _sample(20_000, 2), [0.0] * 900 + _sample(100, 3)
    for seconds in direct:
        stats.record(seconds, after_thread=False)
    for seconds in after_thread:
        stats.record(seconds, after_thread=True)
    for took, waited in zip(after_thread[:1000], held, strict=True):
        stats.record_work("pin", took, waited)
    figures = stats.snapshot()

    def exact(samples: list[float]) -> dict[str, float]:
        ordered = sorted(samples)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
        return {"count": len(ordered), "p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": ordered[-1] * 1000}

    for key, samples in (("turnaround", direct), ("turnaround_after_thread", after_thread),
                         ("turnaround_all", direct + after_thread)):
        assert figures[key] == pytest.approx(exact(samples), rel=0.01), key
        assert figures[key]["count"] == len(samples) and figures[key]["max_ms"] == max(samples) * 1000
    pin = figures["work"]["pin"]
    assert pin["took"] == pytest.approx(exact(after_thread[:1000]), rel=0.01)
    assert pin["held"] == pytest.approx(exact(held), rel=0.01) and pin["held"]["p50_ms"] == 0
    assert pin["held_calls"] == 100
    assert figures["commands"] == 70_000
    assert AGIStats().snapshot()["turnaround"] == {"count": 0}


def test_the_figures_take_the_same_memory_all_night() -> None:
    """A night is millions of commands: the figures must not keep each one (they did, 8 bytes a sample, and sorted
    them all at every snapshot)."""
    stats = AGIStats()
    samples = _sample(10_000, 4)
    tracemalloc.start()
    try:
        for seconds in samples[:1000]:
            stats.record(seconds, after_thread=False)
            stats.record_work("journal", seconds, 0.0)
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(30):
            for seconds in samples:
                stats.record(seconds, after_thread=seconds > 0.001)
                stats.record_work("journal", seconds, seconds / 2)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.snapshot()["turnaround_all"]["count"] == 301_000
    assert after - before < 64 * 1024  # 300,000 samples more: 2.4 MB each kept
