"""FastAGI, the line protocol between Asterisk and our server, on Twisted's `LineReceiver`.

Owns the wire and nothing else: reading the `agi_*` environment block, sending one command at
a time, parsing Asterisk's answers into typed results, the inline `HANGUP` event, per-command
timeouts and line limits. It knows nothing of elections; an application is a callable that is
given the connected `AGIChannel` once its environment is read, and the connection is closed
when that callable's Deferred or coroutine is done.

What Asterisk answers (see DESIGN.md, "What a real Asterisk answers"):
- `200 result=N`, `200 result=N (timeout)`, `200 result=N (value) endpos=M`;
- `100 result=0 Trying...` may precede a `200`: skipped;
- `510 Invalid or unknown command`; `511 Command Not Permitted on a dead channel ...`;
- `520-Invalid command syntax.  Proper usage follows:` then usage lines up to `520 End of proper usage.`;
- a bare `HANGUP` line, sent inline on FastAGI when the caller hangs up: an event, never the
  answer to the pending command. After it only the dead-safe commands run; the others fail at
  once with `ChannelHungUp`, as Asterisk would answer them with 511.

`result=-1` alone does not mean the caller left (a missing sound file answers it too); only the
HANGUP line, a 511 or a closed connection say so.

Anything else from the peer (a line that is not a reply, a reply nobody asked for, a result the
command cannot read such as a key code over 127, a line over `max_line` bytes, an environment
that never ends) is a protocol violation: that one connection
is closed with a log line, its pending commands fail, and no other call notices.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import operator
import re
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from telemetry.logs import ids

log = logging.getLogger(__name__)
T = TypeVar("T")

# Commands res_agi runs on a dead channel (its `dead` flag); every other one is answered 511.
DEAD_SAFE = frozenset({
    "ASYNCAGI BREAK", "DATABASE DEL", "DATABASE DELTREE", "DATABASE GET", "DATABASE PUT", "EXEC",
    "GET FULL VARIABLE", "GET VARIABLE", "HANGUP", "NOOP", "SET VARIABLE", "VERBOSE",
})
# Commands that play to the caller or wait for keys: they can take as long as the prompt lasts.
PLAYING = frozenset({
    "STREAM FILE", "CONTROL STREAM FILE", "GET DATA", "GET OPTION", "WAIT FOR DIGIT", "SAY DIGITS",
    "SAY NUMBER", "SAY ALPHA", "SAY PHONETIC", "RECORD FILE", "EXEC",
})
_REPLY = re.compile(r"^200 result=(?P<result>\S*)(?P<rest>.*)$")
# ASCII digits only (str.isdigit() takes "²" too, which int() refuses), and few enough for int().
_ENDPOS = re.compile(r"-?[0-9]{1,18}")
_ENV_LINE = re.compile(r"^(agi_[a-z0-9_]+):(?: (?P<value>.*))?$")
_MAX_ENV_LINES = 200
_MAX_USAGE_LINES = 100


class AGIError(Exception):
    """A command did not do what was asked."""


class ChannelHungUp(AGIError):
    """The caller is gone (HANGUP line, 511, or the connection closed); only dead-safe commands run."""


class CommandFailed(AGIError):
    """`200 result=-1`: the command failed (a missing sound file, or a hang-up the HANGUP line will confirm)."""

    def __init__(self, command: str, reply: Reply) -> None:
        super().__init__(f"{command}: {reply.raw}")
        self.command, self.reply = command, reply


class InvalidCommand(AGIError):
    """510: Asterisk does not know the command."""


class UsageError(AGIError):
    """520: Asterisk knows the command but not these arguments; `usage` is its explanation."""

    def __init__(self, command: str, usage: str) -> None:
        super().__init__(f"{command}: {usage}")
        self.command, self.usage = command, usage


class CommandTimeout(AGIError):
    """No answer within the command's time limit; the connection is closed (a late answer would be misread)."""


class ProtocolViolation(AGIError):
    """The peer sent something that is not FastAGI; the connection is closed."""


@dataclass(frozen=True)
class Reply:
    """A parsed `200 result=...` line."""

    result: str
    data: str | None  # the parenthesized part: "timeout", a variable's value
    endpos: int | None
    raw: str

    @property
    def number(self) -> int:
        try:
            return int(self.result)
        except ValueError as exc:
            raise ProtocolViolation(f"result {self.result[:20]!r} is not a number") from exc


@dataclass(frozen=True)
class Playback:
    """What a playing command returned: the escape key pressed (None if it played to the end)."""

    digit: str | None
    endpos: int | None


def parse_reply(line: str) -> Reply | None:
    """`200 result=12 (timeout)` → Reply("12", "timeout", None); None when the line is not a 200 reply."""
    m = _REPLY.match(line)
    if m is None:
        return None
    rest, data, endpos = m["rest"].strip(), None, None
    if rest.startswith("("):
        close = rest.rfind(")")
        if close < 0:
            return None
        data, rest = rest[1:close], rest[close + 1 :].strip()
    for token in rest.split():
        key, _, value = token.partition("=")
        if key == "endpos" and _ENDPOS.fullmatch(value):
            endpos = int(value)
    return Reply(m["result"], data, endpos, line)


def quote(argument: str) -> str:
    """One command argument as res_agi parses it: quoted when empty or holding blanks, quotes or backslashes."""
    if any(ch in argument for ch in "\r\n\0"):
        raise ValueError(f"an AGI argument cannot hold a line break or NUL: {argument!r}")
    if argument and not any(ch in argument for ch in ' \t"\\'):
        return argument
    return '"' + argument.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _digit(code: int) -> str | None:
    """A result that is a key's ASCII code (55 → "7"), 0 for none."""
    if code > 127:  # chr() would raise, or make a character no keypad sends
        raise ProtocolViolation(f"result {code} is not a key's ASCII code")
    return chr(code) if code > 0 else None


class Distribution:
    """Durations in seconds, counted in buckets 1 % wide: fixed memory, however many are added.

    A night is millions of commands: kept one by one they took megabytes, and sorting them at each
    snapshot held the reactor. The count and the largest are exact; a percentile is the middle of
    the bucket that holds the sample of that rank once sorted, so within 0.5 % of it (a duration
    under a microsecond counts as 0, one over `HIGH` as `HIGH`, the largest being exact).
    """

    LOW, HIGH, RATIO = 1e-6, 1e4, 1.01
    _LOG_RATIO = math.log(RATIO)
    BUCKETS = 2 + math.ceil(math.log(HIGH / LOW) / _LOG_RATIO)  # [0, LOW), then LOW·RATIO^(i-1) up to LOW·RATIO^i

    def __init__(self) -> None:
        self.buckets = array("q", bytes(8 * self.BUCKETS))
        self.count = self.positive = 0  # positive: how many were over 0
        self.smallest, self.largest = math.inf, 0.0

    def add(self, seconds: float) -> None:
        i = 0 if seconds < self.LOW else min(self.BUCKETS - 1, 1 + int(math.log(seconds / self.LOW) / self._LOG_RATIO))
        self.buckets[i] += 1
        self.count += 1
        self.positive += seconds > 0
        self.smallest, self.largest = min(self.smallest, seconds), max(self.largest, seconds)

    def __add__(self, other: Distribution) -> Distribution:
        both = Distribution()
        both.buckets = array("q", map(operator.add, self.buckets, other.buckets))
        both.count, both.positive = self.count + other.count, self.positive + other.positive
        both.smallest, both.largest = min(self.smallest, other.smallest), max(self.largest, other.largest)
        return both

    def summary(self) -> dict[str, float | int]:
        """The figures the stats line and bench/ivr_load.py print: count, p50, p99 and max in milliseconds."""
        if not self.count:
            return {"count": 0}
        cumulative = list(itertools.accumulate(self.buckets))

        def pick(q: float) -> float:
            rank = min(self.count - 1, int(q * self.count))  # as in the samples sorted: the rank-th
            i = bisect.bisect_right(cumulative, rank)
            middle = 0.0 if i == 0 else self.LOW * self.RATIO ** (i - 0.5)
            return min(max(middle, self.smallest), self.largest) * 1000

        return {"count": self.count, "p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": self.largest * 1000}


class AGIStats:
    """What the server measures about itself: calls, violations, and per-command turnaround.

    Turnaround is the server's own time from receiving an answer (or the environment) to sending
    the next command. Samples that followed work handed to a thread (a PIN check, the journal)
    are kept apart, so the protocol's own latency and the blocking work can be read separately.
    Each is a `Distribution`: the same memory all night, and a snapshot that costs little.
    """

    def __init__(self, timer: Callable[[], float] = time.perf_counter,
                 observer: Callable[[float, bool], None] | None = None,
                 work_observer: Callable[[str, float, float], None] | None = None) -> None:
        self.timer = timer
        self.observer = observer  # also given every sample (telemetry: the turnaround histogram)
        self.work_observer = work_observer  # also given every `record_work` (telemetry)
        self.calls_started = self.calls_finished = self.calls_active = 0
        self.violations = self.timeouts = self.commands = 0
        self.turnaround = Distribution()  # commands that followed the previous answer directly
        self.turnaround_after_thread = Distribution()  # commands that followed a thread hop
        # Per kind of work (pin, journal...): how long it took, and how long the caller was held past
        # the speech that covered it (0 when it was done by the end of that speech).
        self.work: dict[str, tuple[Distribution, Distribution]] = {}

    def record(self, seconds: float, after_thread: bool) -> None:
        self.commands += 1
        (self.turnaround_after_thread if after_thread else self.turnaround).add(seconds)
        if self.observer is not None:
            self.observer(seconds, after_thread)

    def record_work(self, kind: str, seconds: float, held: float) -> None:
        took, held_for = self.work.setdefault(kind, (Distribution(), Distribution()))
        took.add(seconds)
        held_for.add(held)
        if self.work_observer is not None:
            self.work_observer(kind, seconds, held)

    def snapshot(self, reset: bool = False) -> dict[str, Any]:
        figures = {
            "calls_started": self.calls_started,
            "calls_finished": self.calls_finished,
            "calls_active": self.calls_active,
            "commands": self.commands,
            "violations": self.violations,
            "timeouts": self.timeouts,
            "turnaround": self.turnaround.summary(),
            "turnaround_after_thread": self.turnaround_after_thread.summary(),
            "turnaround_all": (self.turnaround + self.turnaround_after_thread).summary(),
            "work": {kind: {"took": took.summary(), "held": held.summary(), "held_calls": held.positive}
                     for kind, (took, held) in sorted(self.work.items())},
        }
        if reset:
            self.turnaround, self.turnaround_after_thread = Distribution(), Distribution()
            self.work = {}
        return figures


@dataclass
class _Command:
    line: str
    name: str
    deferred: defer.Deferred[Reply]
    timeout: float


Application = Callable[["AGIChannel"], Awaitable[Any] | defer.Deferred[Any] | None]


class AGIChannel(LineReceiver):
    """One FastAGI connection: one call's channel, as the typed commands an application awaits."""

    delimiter = b"\n"  # Asterisk ends its lines with a bare LF; a CR before it is stripped

    def __init__(self, factory: FastAGIFactory) -> None:
        self.factory = factory
        self.clock: IReactorTime = factory.clock
        self.MAX_LENGTH = factory.max_line
        self.env: dict[str, str] = {}
        self.hung_up = False
        self._env_done = False
        self._closed = False
        self._queue: deque[_Command] = deque()
        self._inflight: _Command | None = None
        self._timer: IDelayedCall | None = None
        self._usage: list[str] | None = None  # lines of a 520- block being read
        self._hangup_waiters: list[defer.Deferred[None]] = []
        self._idle_since: float | None = None
        self._after_thread = False
        self._receiving: list[tuple[_Command, Reply | Exception]] | None = None  # answers read from this packet
        self._received_at = 0.0
        self.peer = "?"

    # --- what an application uses ---

    @property
    def script(self) -> str:
        """The path of the AGI URL (`results` for agi://host:port/results)."""
        return self.env.get("agi_network_script", "").strip("/")

    @property
    def uniqueid(self) -> str:
        return self.env.get("agi_uniqueid", "")

    @property
    def callerid(self) -> str:
        return self.env.get("agi_callerid", "")

    def when_hung_up(self) -> defer.Deferred[None]:
        """Fires when the caller hangs up (or the connection closes)."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.hung_up:
            d.callback(None)
        else:
            self._hangup_waiters.append(d)
        return d

    def note_thread_hop(self) -> None:
        """Say that the next command follows work done in a thread, for the turnaround figures."""
        self._after_thread = True

    def send_command(self, name: str, *arguments: str | int, timeout: float | None = None) -> defer.Deferred[Reply]:
        """Send `name arguments...` once the commands before it are answered; fires with its Reply.

        Fails with ChannelHungUp at once, without sending, when the channel is known dead and the
        command is not dead-safe: Asterisk would answer 511.
        """
        if self._closed:
            return defer.fail(ChannelHungUp(f"{name}: the connection is closed"))
        if self.hung_up and name not in DEAD_SAFE:
            return defer.fail(ChannelHungUp(f"{name}: the caller hung up"))
        line = " ".join([name, *(quote(str(a)) for a in arguments)])
        if timeout is None:
            timeout = self.factory.playback_timeout if name in PLAYING else self.factory.command_timeout
        command = _Command(line, name, defer.Deferred(), timeout)
        self._queue.append(command)
        self._send_next()
        return command.deferred

    def answer(self) -> defer.Deferred[None]:
        return self._expect_success("ANSWER")

    def hangup(self) -> defer.Deferred[None]:
        d = self.send_command("HANGUP")
        d.addCallback(lambda _: None)
        return d

    def stream_file(
        self, filename: str, escape_digits: str = "", offset: int | None = None
    ) -> defer.Deferred[Playback]:
        arguments: list[str | int] = [filename, escape_digits] + ([offset] if offset is not None else [])
        return self._playback("STREAM FILE", *arguments)

    def say_digits(self, digits: str, escape_digits: str = "") -> defer.Deferred[Playback]:
        return self._playback("SAY DIGITS", digits, escape_digits)

    def wait_for_digit(self, timeout_ms: int) -> defer.Deferred[str | None]:
        """The key pressed within `timeout_ms` (-1: forever), None on silence."""
        d = self.send_command("WAIT FOR DIGIT", timeout_ms, timeout=self._playing_timeout(timeout_ms))
        d.addCallback(self._check_failed, "WAIT FOR DIGIT")
        return d.addCallback(self._decode, "WAIT FOR DIGIT", lambda r: _digit(r.number))

    def get_data(self, filename: str, timeout_ms: int, max_digits: int) -> defer.Deferred[tuple[str, bool]]:
        """Play `filename` and read keys until `#`, `max_digits` or `timeout_ms` of silence: (digits, timed_out).

        Keys typed during the prompt count (it stops playing). A `timeout_ms` of 0 lets Asterisk
        use its own pair: 6 s for the first key, 2 s between keys.
        """
        d = self.send_command("GET DATA", filename, timeout_ms, max_digits, timeout=self._playing_timeout(timeout_ms))
        d.addCallback(self._check_failed, "GET DATA")
        return d.addCallback(lambda r: (r.result, r.data == "timeout"))

    def set_variable(self, name: str, value: str) -> defer.Deferred[None]:
        return self._expect_success("SET VARIABLE", name, value)

    def get_variable(self, name: str) -> defer.Deferred[str | None]:
        d = self.send_command("GET VARIABLE", name)
        return d.addCallback(lambda r: r.data if r.result == "1" else None)

    def verbose(self, message: str, level: int = 1) -> defer.Deferred[None]:
        return self._expect_success("VERBOSE", message, level)

    def exec(self, application: str, options: str = "") -> defer.Deferred[int]:
        """Run a dialplan application; its result (-2 when Asterisk does not know it)."""
        d = self.send_command("EXEC", application, options)
        return d.addCallback(self._decode, "EXEC", lambda r: r.number)

    # --- plumbing for the typed commands ---

    def _playing_timeout(self, timeout_ms: int) -> float:
        return self.factory.playback_timeout + max(0, timeout_ms) / 1000

    def _check_failed(self, reply: Reply, name: str) -> Reply:
        if reply.result == "-1":
            if self.hung_up:  # the HANGUP line came with the -1: say what happened
                raise ChannelHungUp(f"{name}: the caller hung up")
            raise CommandFailed(name, reply)
        return reply

    def _decode(self, reply: Reply, name: str, decode: Callable[[Reply], T]) -> T:
        """`decode(reply)`; a result it cannot read (`result=abc`, a key code over 127) is a protocol violation."""
        try:
            return decode(reply)
        except ProtocolViolation as exc:
            self._violation(f"unreadable answer to {name}: {reply.raw[:80]!r} ({exc})")
            raise

    def _expect_success(self, name: str, *arguments: str | int) -> defer.Deferred[None]:
        d = self.send_command(name, *arguments)
        return d.addCallback(self._check_failed, name).addCallback(lambda _: None)

    def _playback(self, name: str, *arguments: str | int) -> defer.Deferred[Playback]:
        d = self.send_command(name, *arguments)
        d.addCallback(self._check_failed, name)
        return d.addCallback(self._decode, name, lambda r: Playback(_digit(r.number), r.endpos))

    def _send_next(self) -> None:
        if self._inflight is not None or not self._queue or not self._env_done or self._closed:
            return
        command = self._queue.popleft()
        if self.hung_up and command.name not in DEAD_SAFE:  # the HANGUP line came while it was queued
            command.deferred.errback(ChannelHungUp(f"{command.name}: the caller hung up"))
            self._send_next()
            return
        self._inflight = command
        if self._idle_since is not None:
            self.factory.stats.record(self.factory.stats.timer() - self._idle_since, self._after_thread)
            self._idle_since, self._after_thread = None, False
        self._timer = self.clock.callLater(command.timeout, self._command_timed_out, command)
        self.sendLine(command.line.encode("utf-8"))

    def _finish(self, outcome: Reply | Exception) -> None:
        command, self._inflight = self._inflight, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._idle_since = self._received_at if self._receiving is not None else self.factory.stats.timer()
        assert command is not None
        if self._receiving is not None:
            # Fired once the whole packet is read: a HANGUP line right behind a `-1` is then known.
            self._receiving.append((command, outcome))
            return
        self._fire(command, outcome)

    def _fire(self, command: _Command, outcome: Reply | Exception) -> None:
        if isinstance(outcome, Exception):
            command.deferred.errback(outcome)
        else:
            command.deferred.callback(outcome)
        self._send_next()

    def dataReceived(self, data: bytes) -> None:
        outer = self._receiving is None
        if outer:
            self._receiving = []
            self._received_at = self.factory.stats.timer()  # turnaround counts from here, parsing included
        try:
            super().dataReceived(data)
        finally:
            if outer:
                answered, self._receiving = self._receiving or [], None
                for command, outcome in answered:
                    self._fire(command, outcome)

    def _command_timed_out(self, command: _Command) -> None:
        self._timer = None
        self.factory.stats.timeouts += 1
        log.warning("agi %s %s: no answer to %r within %.0f s; closing this connection",
                    self.peer, self.uniqueid, command.line, command.timeout, extra=ids(call_id=self.uniqueid))
        self._close(CommandTimeout(f"{command.name}: no answer within {command.timeout:.0f} s"))

    # --- receiving ---

    def connectionMade(self) -> None:
        address = self.transport.getPeer()
        self.peer = f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"
        self._timer = self.clock.callLater(self.factory.env_timeout, self._env_timed_out)

    def _env_timed_out(self) -> None:
        self._timer = None
        self.factory.stats.timeouts += 1
        self._violation(f"no complete environment within {self.factory.env_timeout:.0f} s")

    def lineReceived(self, raw: bytes) -> None:
        if self._closed:
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("latin-1")  # a caller name from an old PBX; never a reason to drop the call
        line = line.removesuffix("\r")
        if not self._env_done:
            self._environment_line(line)
        elif self._usage is not None:
            self._usage_line(line)
        elif line == "HANGUP":
            self._caller_hung_up()
        else:
            self._reply_line(line)

    def _environment_line(self, line: str) -> None:
        if line == "":
            if not self.env:
                self._violation("empty environment")
                return
            self._env_done = True
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            self._idle_since = self._received_at
            self.factory.start_application(self)
            return
        m = _ENV_LINE.match(line)
        if m is None or len(self.env) >= _MAX_ENV_LINES:
            self._violation(f"not an environment line: {line[:80]!r}")
            return
        self.env[m[1]] = m["value"] or ""

    def _reply_line(self, line: str) -> None:
        command = self._inflight
        if command is None:
            self._violation(f"an answer nobody asked for: {line[:80]!r}")
            return
        code = line[:3]
        if code == "100" and line[3:4] in (" ", ""):
            return  # "100 result=0 Trying...": the 200 follows
        if code == "200":
            reply = parse_reply(line)
            if reply is None:
                self._violation(f"unreadable answer to {command.name}: {line[:80]!r}")
                return
            self._finish(reply)
        elif code == "510":
            self._finish(InvalidCommand(f"{command.line}: {line}"))
        elif code == "511":
            self._caller_hung_up()
            self._finish(ChannelHungUp(f"{command.name}: {line}"))
        elif line.startswith("520-"):
            self._usage = [line[4:]]
        elif line.startswith("520 "):
            self._finish(UsageError(command.name, line[4:]))
        else:
            self._violation(f"not a FastAGI answer to {command.name}: {line[:80]!r}")

    def _usage_line(self, line: str) -> None:
        assert self._usage is not None
        if line.startswith("520 "):
            usage, self._usage = "\n".join(self._usage), None
            self._finish(UsageError(self._inflight.name if self._inflight else "?", usage))
        elif len(self._usage) >= _MAX_USAGE_LINES:
            self._violation("a 520 usage block that does not end")
        else:
            self._usage.append(line)

    def _caller_hung_up(self) -> None:
        if self.hung_up:
            return
        self.hung_up = True
        waiters, self._hangup_waiters = self._hangup_waiters, []
        for d in waiters:
            d.callback(None)
        # Queued commands that may not run on a dead channel fail now rather than wait for their 511.
        if self._inflight is None:
            self._send_next()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._violation(f"a line longer than {self.MAX_LENGTH} bytes")

    def _violation(self, why: str) -> None:
        self.factory.stats.violations += 1
        log.warning("agi %s %s: %s; closing this connection", self.peer, self.uniqueid or "(no uniqueid)", why,
                    extra=ids(call_id=self.uniqueid))
        self._close(ProtocolViolation(why))

    def _close(self, reason: Exception) -> None:
        if self._closed:
            return
        self._closed = True
        self.clearLineBuffer()
        self.transport.abortConnection()
        self._fail_all(reason)

    def _fail_all(self, reason: Exception) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending = ([self._inflight] if self._inflight else []) + list(self._queue)
        self._inflight, self._queue = None, deque()
        for command in pending:
            command.deferred.errback(reason)
        self._caller_hung_up()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed = True
        self._fail_all(ChannelHungUp("the connection closed"))
        self.factory.connection_lost(self)

    # --- the end of the application ---

    def application_done(self) -> None:
        """Close the connection: Asterisk then goes on in the dialplan, AGISTATUS=SUCCESS."""
        if not self._closed:
            self._closed = True
            self.transport.loseConnection()


class FastAGIFactory(ServerFactory):
    """Builds one `AGIChannel` per connection and runs the application the AGI URL names."""

    def __init__(
        self,
        applications: Mapping[str, Application],
        *,
        clock: IReactorTime | None = None,
        command_timeout: float = 15.0,
        playback_timeout: float = 180.0,
        env_timeout: float = 10.0,
        max_line: int = 8192,
        stats: AGIStats | None = None,
    ) -> None:
        self.applications = dict(applications)
        self.clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self.command_timeout, self.playback_timeout = command_timeout, playback_timeout
        self.env_timeout, self.max_line = env_timeout, max_line
        self.stats = stats or AGIStats()
        self.channels: set[AGIChannel] = set()
        self._idle_waiters: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> AGIChannel:
        channel = AGIChannel(self)
        self.channels.add(channel)
        return channel

    def start_application(self, channel: AGIChannel) -> None:
        application = self.applications.get(channel.script)
        if application is None:
            log.warning("agi %s %s: no application for script %r (known: %s); closing",
                        channel.peer, channel.uniqueid, channel.script, ", ".join(sorted(self.applications)),
                        extra=ids(call_id=channel.uniqueid))
            channel.application_done()
            return
        self.stats.calls_started += 1
        self.stats.calls_active += 1
        d = defer.maybeDeferred(application, channel)  # a coroutine is run as a Deferred
        d.addErrback(self._application_failed, channel)
        d.addBoth(self._application_done, channel)

    def _application_failed(self, failure: Failure, channel: AGIChannel) -> None:
        # Errbacks run outside the call's own context: the call id goes with each line.
        extra = ids(call_id=channel.uniqueid)
        if failure.check(ChannelHungUp):
            log.info("agi %s: the caller hung up", channel.uniqueid, extra=extra)
        elif failure.check(ProtocolViolation, CommandTimeout):
            pass  # said when the connection was closed
        elif failure.check(AGIError):
            log.warning("agi %s: %s", channel.uniqueid, failure.getErrorMessage(), extra=extra)
        else:
            log.error("agi %s: the application failed", channel.uniqueid,
                      exc_info=(failure.type, failure.value, failure.getTracebackObject()), extra=extra)

    def _application_done(self, _: object, channel: AGIChannel) -> None:
        self.stats.calls_finished += 1
        self.stats.calls_active -= 1
        channel.application_done()

    def connection_lost(self, channel: AGIChannel) -> None:
        self.channels.discard(channel)
        if not self.channels:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                if not d.called:  # a waiter may have given up (cancelled)
                    d.callback(None)

    def when_idle(self) -> defer.Deferred[None]:
        """Fires when no connection is open (for a graceful stop)."""
        d: defer.Deferred[None] = defer.Deferred()
        if not self.channels:
            d.callback(None)
        else:
            self._idle_waiters.append(d)
        return d
