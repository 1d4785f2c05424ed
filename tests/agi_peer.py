"""A scripted Asterisk: connects to a FastAGI server over TCP and behaves as Asterisk 22 does for one call.

It sends a realistic `agi_*` environment, answers each command as res_agi answers it (DESIGN.md,
"What a real Asterisk answers"), and plays a caller's script of key presses, silences and a
hang-up. It reports what the channel played, the channel variables set, and the commands it was
sent. Tests use it one call at a time (`call_sync`); the load benchmark and the election-night
simulation run many at once (`await peer.call(...)` under asyncio).

The script is consumed by the commands that listen:
- `press("412#")`: keys typed for the next reading command (GET DATA, WAIT FOR DIGIT). GET DATA
  stops at `#` (not returned) or at its maximum; keys after that are dropped, as Asterisk's AGI
  loop drops keys pressed between commands. Keys without `#` end in `(timeout)`.
- `barge("4")`: keys typed while something plays: the first interrupts a STREAM FILE or SAY whose
  escape digits hold it (the rest goes to the next reading command); a key that is not an escape
  digit is ignored by the playback, as Asterisk ignores it.
- `SILENCE`: the caller says nothing: `200 result= (timeout)`, `200 result=0`.
- `HANGUP`: the caller hangs up during the next playing command: `200 result=-1`, then the bare
  `HANGUP` line; from then on every command but the dead-safe ones is answered 511.
`tamper` (answer a command with these bytes instead), `inject_after` (send these bytes after
the answer) and `hold` (answer only once a `Gate` is opened: the caller thinks, another call goes
on meanwhile) name a command by its number from 1, or by how its line starts (the first such).
The peer does not wait out prompts or timeouts unless told to (`answer_delay`): a test's
silence costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

DEAD_SAFE = {"ASYNCAGI BREAK", "DATABASE DEL", "DATABASE DELTREE", "DATABASE GET", "DATABASE PUT", "EXEC",
             "GET FULL VARIABLE", "GET VARIABLE", "HANGUP", "NOOP", "SET VARIABLE", "VERBOSE"}
# command → (minimum, maximum) number of arguments, and the usage Asterisk prints for it.
COMMANDS: dict[str, tuple[int, int, str]] = {
    "ANSWER": (0, 0, "Usage: ANSWER\n Answers channel if not already in answer state."),
    "CHANNEL STATUS": (0, 1, "Usage: CHANNEL STATUS [<channelname>]\n Returns the status of the channel."),
    "CONTROL STREAM FILE": (2, 7, "Usage: CONTROL STREAM FILE <filename> <escape digits> [<skipms>] [<ffchar>] "
                                  "[<rewchr>] [<pausechr>] [<offsetms>]"),
    "EXEC": (1, 1_000, "Usage: EXEC <application> <options>\n Executes application with given options."),
    "GET DATA": (1, 3, "Usage: GET DATA <file to be streamed> [timeout] [maxdigits]\n"
                       " Stream the given file, and receive DTMF data."),
    "GET FULL VARIABLE": (1, 2, "Usage: GET FULL VARIABLE <variablename> [<channel name>]"),
    "GET VARIABLE": (1, 1, "Usage: GET VARIABLE <variablename>\n Returns 0 if variablename is not set."),
    "HANGUP": (0, 1, "Usage: HANGUP [<channelname>]\n Hangs up the specified channel."),
    "NOOP": (0, 1_000, "Usage: NOOP\n Does nothing."),
    "SAY DIGITS": (2, 2, "Usage: SAY DIGITS <number> <escape digits>\n Say a given digit string."),
    "SAY NUMBER": (2, 3, "Usage: SAY NUMBER <number> <escape digits> [gender]\n Say a given number."),
    "SET VARIABLE": (2, 2, "Usage: SET VARIABLE <variablename> <value>\n Sets a variable to the given value."),
    "STREAM FILE": (2, 3, "Usage: STREAM FILE <filename> <escape digits> [sample offset]\n"
                          " Send the given file, allowing playback to be interrupted by the given digits."),
    "VERBOSE": (1, 2, "Usage: VERBOSE <message> <level>\n Sends <message> to the console via verbose message system."),
    "WAIT FOR DIGIT": (1, 1, "Usage: WAIT FOR DIGIT <timeout>\n Waits up to <timeout> milliseconds for a DTMF digit."),
}
_BY_LENGTH = sorted(COMMANDS, key=lambda c: -len(c.split()))
PLAYED_ENDPOS = 16_000  # samples: 2 s at 8 kHz, what a prompt played to its end reports
ANSWER_511 = b"511 Command Not Permitted on a dead channel or intercept routine\n"
ANSWER_510 = b"510 Invalid or unknown command\n"
_uniqueids = itertools.count(1)
R = TypeVar("R")


def _rule(rules: dict[int | str, R], number: int, line: str) -> R | None:
    """The bytes a test put at this command: keyed by its number (from 1) or, once, by how it starts."""
    if number in rules:
        return rules[number]
    for key in rules:
        if isinstance(key, str) and line.startswith(key):
            return rules.pop(key)
    return None


@dataclass
class Gate:
    """A command held: `reached` is set when it comes, and it is answered once `opened` is set."""

    reached: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class Press:
    keys: str
    during_playback: bool = False


@dataclass(frozen=True)
class Silence:
    pass


@dataclass(frozen=True)
class HangUp:
    pass


Action = Press | Silence | HangUp
SILENCE, HANGUP = Silence(), HangUp()


def press(keys: str) -> Press:
    return Press(keys)


def barge(keys: str) -> Press:
    return Press(keys, during_playback=True)


@dataclass
class CallRecord:
    """What happened on the channel, as Asterisk saw it."""

    env: dict[str, str]
    commands: list[str] = field(default_factory=list)
    played: list[str] = field(default_factory=list)  # sound names, in order (also those missing)
    missing: list[str] = field(default_factory=list)  # sound names the server asked for that do not exist
    variables: dict[str, str] = field(default_factory=dict)
    caller_hung_up: bool = False
    hung_up_at: int | None = None  # the number of the command (from 1) during which the caller hung up
    dropped_keys: str = ""
    unused: list[Action] = field(default_factory=list)  # the script left when the call ended
    silent_past_script: int = 0  # reading commands answered with silence because the script was done
    ended: str = ""  # "server closed", "peer timeout", "too many commands"
    turnarounds: list[float] = field(default_factory=list)  # seconds from our answer to the next command

    @property
    def outcome(self) -> str | None:
        return self.variables.get("REMONTEE_OUTCOME")

    @property
    def receipt(self) -> str | None:
        return self.variables.get("REMONTEE_RECEIPT")

    def prompts_asked(self) -> list[str]:
        """The first file of each GET DATA: the questions the caller heard."""
        return [parse_args(c)[2] for c in self.commands if c.upper().startswith("GET DATA")]


def parse_args(line: str) -> list[str]:
    """Split a command line as res_agi does: blanks separate, double quotes group, a backslash escapes."""
    args: list[str] = []
    current: list[str] = []
    quoted = escaped = started = False
    for ch in line:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = started = True
        elif ch == '"':
            quoted, started = not quoted, True
        elif ch in " \t" and not quoted:
            if started:
                args.append("".join(current))
                current, started = [], False
        else:
            current.append(ch)
            started = True
    if started:
        args.append("".join(current))
    return args


class AsteriskPeer:
    """One call placed on a FastAGI server, as Asterisk would place it."""

    def __init__(
        self,
        script: Iterable[Action] = (),
        *,
        callerid: str = "0612345678",
        sounds: Collection[str] | None = None,
        channel_type: str = "PJSIP",
        uniqueid: str | None = None,
        script_name: str = "results",
        extra_env: Mapping[str, str] | None = None,
        tamper: Mapping[int | str, bytes] | None = None,
        inject_after: Mapping[int | str, bytes] | None = None,
        hold: Mapping[int | str, Gate] | None = None,
        trying_before_exec: bool = True,
        answer_delay: float = 0.0,
        io_timeout: float = 10.0,
        max_commands: int = 5_000,
    ) -> None:
        self.script: list[Action] = list(script)
        self.callerid, self.sounds, self.channel_type = callerid, sounds, channel_type
        self.uniqueid = uniqueid or f"{int(time.time())}.{next(_uniqueids)}"
        self.script_name = script_name
        self.extra_env = dict(extra_env or {})
        self.tamper: dict[int | str, bytes] = dict(tamper or {})
        self.inject_after: dict[int | str, bytes] = dict(inject_after or {})
        self.hold: dict[int | str, Gate] = dict(hold or {})
        self.trying_before_exec, self.answer_delay = trying_before_exec, answer_delay
        self.io_timeout, self.max_commands = io_timeout, max_commands
        self.dead = False

    def environment(self, host: str, port: int) -> list[tuple[str, str]]:
        if self.channel_type == "Local":
            channel = "Local/s@hotline-00000000;2"
        else:
            channel = f"{self.channel_type}/trunk-{int(self.uniqueid.split('.')[-1]):08x}"
        env = {
            "agi_network": "yes",
            "agi_network_script": self.script_name,
            "agi_request": f"agi://{host}:{port}/{self.script_name}",
            "agi_channel": channel,
            "agi_language": "fr",
            "agi_type": self.channel_type,
            "agi_uniqueid": self.uniqueid,
            "agi_version": "22.10.0",
            "agi_callerid": self.callerid,
            "agi_calleridname": "unknown",
            "agi_callingpres": "0",
            "agi_callingani2": "0",
            "agi_callington": "0",
            "agi_callingtns": "0",
            "agi_dnid": "0800102011",
            "agi_rdnis": "unknown",
            "agi_context": "hotline",
            "agi_extension": "s",
            "agi_priority": "5",
            "agi_enhanced": "0.0",
            "agi_accountcode": "",
            "agi_threadid": "139872354150080",
            **self.extra_env,
        }
        return list(env.items())

    def call_sync(self, host: str, port: int) -> CallRecord:
        return asyncio.run(self.call(host, port))

    async def call(self, host: str, port: int) -> CallRecord:
        reader, writer = await asyncio.open_connection(host, port)
        env = self.environment(host, port)
        record = CallRecord(env=dict(env))
        answered_at: float | None = None
        try:
            writer.write("".join(f"{k}: {v}\n" for k, v in env).encode() + b"\n")
            try:
                await writer.drain()
            except ConnectionError:
                record.ended = "server closed"
                return record
            while True:
                try:
                    raw = await asyncio.wait_for(reader.readline(), self.io_timeout)
                except TimeoutError:
                    record.ended = "peer timeout"
                    break
                except ConnectionError:  # the server aborted the connection (a reset)
                    record.ended = "server closed"
                    break
                if not raw:
                    record.ended = "server closed"
                    break
                if answered_at is not None:
                    record.turnarounds.append(time.perf_counter() - answered_at)
                line = raw.decode("utf-8").rstrip("\n")
                record.commands.append(line)
                number = len(record.commands)
                if number > self.max_commands:
                    record.ended = "too many commands"
                    break
                gate = _rule(self.hold, number, line)
                if gate is not None:
                    gate.reached.set()
                    await gate.opened.wait()
                tampered = _rule(self.tamper, number, line)
                if tampered is not None:
                    writer.write(tampered)
                else:
                    answer = await self._answer(line, record)
                    writer.write(answer)
                extra = _rule(self.inject_after, number, line)
                if extra is not None:
                    writer.write(extra)
                    if b"HANGUP\n" in extra:
                        self.dead = record.caller_hung_up = True
                        record.hung_up_at = number
                try:
                    await writer.drain()
                except ConnectionError:
                    record.ended = "server closed"
                    break
                answered_at = time.perf_counter()
        finally:
            record.unused = list(self.script)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        return record

    # --- answering as Asterisk ---

    def _next(self, record: CallRecord, reading: bool) -> Action:
        if self.script:
            return self.script[0]
        if reading:
            record.silent_past_script += 1
        return SILENCE

    def _hang_up(self, record: CallRecord) -> None:
        self.script.pop(0)
        self.dead = record.caller_hung_up = True
        record.hung_up_at = len(record.commands)

    def commands_after_hangup(self, record: CallRecord) -> list[str]:
        return [] if record.hung_up_at is None else record.commands[record.hung_up_at:]

    def _play(self, name: str, record: CallRecord) -> bool:
        record.played.append(name)
        if self.sounds is not None and name not in self.sounds:
            record.missing.append(name)
            return False
        return True

    async def _answer(self, line: str, record: CallRecord) -> bytes:
        args = parse_args(line)
        words = [a.upper() for a in args]
        name = next((c for c in _BY_LENGTH if words[: len(c.split())] == c.split()), None)
        if name is None:
            return ANSWER_510
        if self.dead and name not in DEAD_SAFE:
            return ANSWER_511
        arguments = args[len(name.split()):]
        low, high, usage = COMMANDS[name]
        if not low <= len(arguments) <= high:
            return ("520-Invalid command syntax.  Proper usage follows:\n" + usage + "\n520 End of proper usage.\n"
                    ).encode()
        if self.answer_delay and name in ("STREAM FILE", "GET DATA", "SAY DIGITS", "SAY NUMBER", "WAIT FOR DIGIT"):
            await asyncio.sleep(self.answer_delay)  # the prompt being heard
        return getattr(self, "_cmd_" + name.lower().replace(" ", "_"))(arguments, record)

    def _cmd_answer(self, arguments: list[str], record: CallRecord) -> bytes:
        return b"200 result=0\n"

    def _cmd_noop(self, arguments: list[str], record: CallRecord) -> bytes:
        return b"200 result=0\n"

    def _cmd_channel_status(self, arguments: list[str], record: CallRecord) -> bytes:
        return b"200 result=6\n"  # AST_STATE_UP

    def _cmd_verbose(self, arguments: list[str], record: CallRecord) -> bytes:
        return b"200 result=1\n"

    def _cmd_set_variable(self, arguments: list[str], record: CallRecord) -> bytes:
        record.variables[arguments[0]] = arguments[1]
        return b"200 result=1\n"

    def _cmd_get_variable(self, arguments: list[str], record: CallRecord) -> bytes:
        value = record.variables.get(arguments[0])
        return b"200 result=0\n" if value is None else f"200 result=1 ({value})\n".encode()

    _cmd_get_full_variable = _cmd_get_variable

    def _cmd_hangup(self, arguments: list[str], record: CallRecord) -> bytes:
        was_dead, self.dead = self.dead, True
        return b"200 result=1\n" if was_dead else b"200 result=1\nHANGUP\n"

    def _cmd_exec(self, arguments: list[str], record: CallRecord) -> bytes:
        application = arguments[0].lower()
        trying = b"100 result=0 Trying...\n" if self.trying_before_exec else b""
        if application == "playback":
            for name in (arguments[1] if len(arguments) > 1 else "").split(",")[0].split("&"):
                self._play(name, record)
            return trying + b"200 result=0\n"
        if application in ("noop", "set", "verbose", "wait", "queue", "goto"):
            return trying + b"200 result=0\n"
        return trying + b"200 result=-2\n"

    def _cmd_stream_file(self, arguments: list[str], record: CallRecord) -> bytes:
        if not self._play(arguments[0], record):
            return b"200 result=-1 endpos=0\n"
        return self._playing(arguments[1], record, "endpos")

    _cmd_control_stream_file = _cmd_stream_file

    def _cmd_say_digits(self, arguments: list[str], record: CallRecord) -> bytes:
        record.played.append(f"digits:{arguments[0]}")
        return self._playing(arguments[1], record, None)

    def _cmd_say_number(self, arguments: list[str], record: CallRecord) -> bytes:
        record.played.append(f"number:{arguments[0]}")
        return self._playing(arguments[1], record, None)

    def _playing(self, escape: str, record: CallRecord, endpos: str | None) -> bytes:
        """A playback the caller may interrupt with an escape digit, or hang up during."""
        action = self._next(record, reading=False)
        tail = f" endpos={PLAYED_ENDPOS // 2}" if endpos else ""
        if isinstance(action, HangUp):
            self._hang_up(record)
            return f"200 result=-1{tail}\nHANGUP\n".encode()
        if isinstance(action, Press) and action.during_playback and action.keys:
            key, rest = action.keys[0], action.keys[1:]
            if key in escape:
                # The keys typed after the one that stopped the playback go to the next reading command.
                if rest:
                    self.script[0] = Press(rest)
                else:
                    self.script.pop(0)
                return f"200 result={ord(key)}{tail}\n".encode()
            record.dropped_keys += key  # not an escape digit: the playback ignores it
            if rest:
                self.script[0] = Press(rest, during_playback=True)
            else:
                self.script.pop(0)
        full = f" endpos={PLAYED_ENDPOS}" if endpos else ""
        return f"200 result=0{full}\n".encode()

    def _nothing_typed(self, action: Action, record: CallRecord, silence: bytes) -> bytes:
        """A reading command's answer when the caller hangs up or says nothing (`silence`: its timeout answer)."""
        if isinstance(action, HangUp):
            self._hang_up(record)
            return b"200 result=-1\nHANGUP\n"
        if self.script:
            self.script.pop(0)
        return silence

    def _cmd_get_data(self, arguments: list[str], record: CallRecord) -> bytes:
        if not self._play(arguments[0], record):
            return b"200 result=-1\n"  # a missing file: an error at once, the channel stays up
        max_digits = int(arguments[2]) if len(arguments) > 2 and arguments[2].isdigit() else 1024
        action = self._next(record, reading=True)
        if not isinstance(action, Press):
            return self._nothing_typed(action, record, b"200 result= (timeout)\n")
        self.script.pop(0)
        digits = ""
        for i, key in enumerate(action.keys):
            if key == "#":
                record.dropped_keys += action.keys[i + 1:]
                return f"200 result={digits}\n".encode()
            digits += key
            if len(digits) >= max_digits:
                record.dropped_keys += action.keys[i + 1:]
                return f"200 result={digits}\n".encode()
        return f"200 result={digits} (timeout)\n".encode()

    def _cmd_wait_for_digit(self, arguments: list[str], record: CallRecord) -> bytes:
        action = self._next(record, reading=True)
        if not isinstance(action, Press):
            return self._nothing_typed(action, record, b"200 result=0\n")
        self.script.pop(0)
        if not action.keys:
            return b"200 result=0\n"
        record.dropped_keys += action.keys[1:]
        return f"200 result={ord(action.keys[0])}\n".encode()
