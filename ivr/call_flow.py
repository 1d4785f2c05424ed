"""The French results call: a coroutine that reads top to bottom like the script the caller hears.

`ResultsLine` is the FastAGI application for `agi://.../results`: it holds what every call needs
(the election, the registry, the journal, the Redis-held call state) and runs `results_call` for
each connection. The inputs are declared as data below (`BUREAU`, `PIN`, the menus, `count_input`)
next to the election definition that orders the counts.

Blocking work (the PIN's scrypt, the journal's fsync, Redis) runs in threads; the reactor only
ever waits on Deferreds. And the caller never hears dead air while it runs: work starts as soon as
its inputs are known (the bureau's lock, history and interrupted entry while the PIN prompt plays)
and is collected behind speech ("Vérification du code.", "Enregistrement en cours."), with a hold
(short silences, then "Veuillez patienter.") only for as long as it is still not done, as when a
thousand callers key their PIN in the same second. What must happen whatever the caller does (a
wrong PIN counted, a return journaled) is part of the work, not of the speech: hanging up during
"Vérification du code." does not skip counting the failure.
The journal write is durable before the receipt is spoken.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from twisted.internet import defer, threads
from twisted.python.failure import Failure

from forms.definitions import CountField, Election
from ivr import prompts as P
from ivr.agi import AGIChannel, ChannelHungUp, CommandFailed
from ivr.call_state import ANONYMOUS, CallState, Partial
from ivr.inputs import DIGITS, DigitInput, NoInput, TooManyErrors, menu, read_input
from registry import Bureau, Registry, RegistryFile, verify_pin
from returns_queue.journal import Journal, JournalEntry, Submission
from telemetry import metrics
from telemetry.logs import bound, ids, in_context
from validation import Reason, check_arithmetic, check_return, new_return

log = logging.getLogger(__name__)
T = TypeVar("T")

# Channel variables (DESIGN.md): what the dialplan reads after the AGI.
RECEIPT_VARIABLE, OUTCOME_VARIABLE = "REMONTEE_RECEIPT", "REMONTEE_OUTCOME"
ACCEPTED, OPERATOR, DECLINED, HUNG_UP = "accepted", "operator", "declined", "hangup"

# --- the inputs, as data ---

BUREAU = DigitInput("bureau", P.ASK_BUREAU, min_digits=1, max_digits=10, first_digit_timeout_ms=6000,
                    inter_digit_timeout_ms=6000)  # the validator (the registry) is bound per server
PIN = DigitInput("pin", P.ASK_PIN, min_digits=4, max_digits=8, secret=True)
CONFIRM_CORRECTION = menu("correction", P.ASK_CONFIRM_CORRECTION, "12")
CONFIRM_RESUME = menu("reprise", P.ASK_CONFIRM_RESUME, "12")
CONFIRM_MISMATCH = menu("ecart", P.ASK_CONFIRM_MISMATCH, "123")
CONFIRM_SEND = menu("envoi", P.ASK_CONFIRM_SEND, "123")
PIN_ATTEMPTS = 3


def count_input(field: CountField) -> DigitInput:
    """A count: up to the form's digits, ended by `#`."""
    return DigitInput(field.id, P.ask_field(field), min_digits=1, max_digits=field.max_digits)


def line_input(election: Election) -> DigitInput:
    """Which count to correct, by its rank in the form (1 = votants)."""
    n = len(election.fields)
    return DigitInput("ligne", P.ASK_LINE, 1, len(str(n)), validator=lambda v: 1 <= int(v) <= n)


class Handoff(Exception):
    """The call goes to an operator; `reason` is set on the channel for the operator's screen."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


HOLD_EVERY = 8  # hold steps: seven short silences (0.3 s each), then "Veuillez patienter."


class Work(Generic[T]):
    """Work a call started in threads: its Deferred, and when it started and ended (for the figures)."""

    def __init__(self, kind: str, result: defer.Deferred[T], started_at: float) -> None:
        self.kind, self.result, self.started_at = kind, result, started_at
        self.done_at: float | None = None
        self.collected = False  # its result went to the script (which then handles a failure)
        result.addBoth(self._ended)

    def _ended(self, outcome: Any) -> Any:
        self.done_at = time.perf_counter()
        return outcome


class ResultsLine:
    """The `results` FastAGI application: one per server, one `results_call` per connection."""

    def __init__(
        self,
        election: Election,
        registry: RegistryFile,
        journal: Journal,
        state: CallState,
        *,
        on_accepted: Callable[[], None] = lambda: None,
        run_blocking: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
        run_pin_check: Callable[..., defer.Deferred[Any]] | None = None,
    ) -> None:
        self.election, self.registry_file, self.journal, self.state = election, registry, journal, state
        self.on_accepted, self.run_blocking = on_accepted, run_blocking
        # scrypt is CPU- and memory-bound (16 MiB a hash): as many at once as there are cores, on
        # their own threads, so Redis and journal reads never queue behind a burst of PIN checks.
        self.run_pin_check = run_pin_check or run_blocking
        self.bureau_input = replace(BUREAU, validator=lambda code: code in self.registry,
                                    error_prompt=lambda code: [P.BUREAU, *P.digit_files(code), P.UNKNOWN])
        self.count_inputs = {f.id: count_input(f) for f in election.fields}
        self.line_input = line_input(election)

    @property
    def registry(self) -> Registry:
        """The registry as its file now is: a bureau added on the night can report by phone without a restart."""
        registry = self.registry_file.get()
        assert registry is not None, "the service loaded it at start, and a file removed keeps it"
        return registry

    async def __call__(self, agi: AGIChannel) -> None:
        call = Call(self, agi)
        # The coroutine runs in its own copy of the context (Twisted's ensureDeferred): every line
        # logged while this call is served, here or in the threads it hands work to, has its id.
        with bound(call_id=call.call_id):
            failed = True
            try:
                await results_call(call)
                failed = False
            finally:
                metrics.IVR_CALLS.labels(call.outcome or ("error" if failed else HUNG_UP)).inc()


class Call:
    """One call: what the caller said so far, and the helpers the script speaks and listens with."""

    def __init__(self, line: ResultsLine, agi: AGIChannel) -> None:
        self.line, self.agi, self.election = line, agi, line.election
        caller_id = agi.callerid.strip()
        self.caller_id = "" if caller_id.lower() in ANONYMOUS else caller_id
        self.call_id = agi.uniqueid
        self.bureau: Bureau | None = None
        self.counts: dict[str, int] = {}
        self.pending_key: str | None = None  # a digit pressed during a read-back: the next entry's first
        self.outcome: str | None = None  # the REMONTEE_OUTCOME set on the channel
        self._saves: defer.Deferred[None] = defer.succeed(None)  # Redis writes, in order, not waited for
        self._save_failed: defer.Deferred[None] = defer.Deferred()  # fires at this call's first failed Redis write
        self._work: list[Work[Any]] = []  # work started for this call, all ended before the call ends

    # --- speaking and listening ---

    async def play(self, *files: str, escape: str = "") -> str | None:
        """Play `files` in order; the key that interrupted them (one of `escape`), else None."""
        self.pending_key = None
        for name in files:
            try:
                playback = await self.agi.stream_file(name, escape)
            except CommandFailed as exc:  # a missing file; a hang-up shows on the next command
                log.warning("call %s: %s", self.call_id, exc)
                continue
            if playback.digit is not None:
                return playback.digit
        return None

    async def ask(self, spec: DigitInput, preface: Sequence[str] = ()) -> str:
        first_key, self.pending_key = self.pending_key, None
        return await read_input(self.agi, spec, preface=preface, first_key=first_key)

    # --- work in threads, started early, collected behind speech ---

    def start(self, kind: str, work: Coroutine[Any, Any, T]) -> Work[T]:
        """Run `work` (a coroutine of thread hops) from now on, whatever the caller does meanwhile."""
        started = Work(kind, defer.ensureDeferred(work), time.perf_counter())
        self._work.append(started)
        return started

    async def finish(self, work: Work[T], *speech: str, escape: str = "") -> T:
        """`work`'s result, the caller hearing `speech` meanwhile, then a hold for as long as it is not done.

        A key of `escape` interrupts the speech and starts the next entry (`pending_key`); a caller
        who is typing is not held (a hold would swallow the keys): the call then just waits.
        """
        key = await self.play(*speech, escape=escape) if speech else None
        spoken = time.perf_counter()
        for step in itertools.count():
            if key is not None or work.result.called:
                break
            # Short silences first (most waits end within one), "Veuillez patienter." every few seconds.
            await self.play(P.HOLD if step % HOLD_EVERY == HOLD_EVERY - 1 else P.SILENCE)
        self.agi.note_thread_hop()  # the next command is the one the work's result decides
        work.collected = True
        try:
            return await work.result
        finally:
            self.pending_key = key
            done = work.done_at if work.done_at is not None else time.perf_counter()
            self.agi.factory.stats.record_work(work.kind, done - work.started_at, max(0.0, done - spoken))

    async def in_thread(self, f: Callable[..., T], *args: Any) -> T:
        """Run `f(*args)` in a thread: the reactor keeps serving the other calls."""
        return await self.line.run_blocking(in_context(f), *args)

    async def redis(self, what: str, f: Callable[..., T], *args: Any, default: T) -> T:
        """A Redis call the call can live without: when Redis is away the call goes on with `default`."""
        try:
            return await self.in_thread(f, *args)
        except RedisError as exc:
            log.warning("call %s: Redis unavailable for %s (%s); going on without it", self.call_id, what, exc)
            return default

    async def work_done(self) -> None:
        """Wait for the work this call started; log the failures of work whose result the script never took."""
        results = await defer.DeferredList([w.result for w in self._work], consumeErrors=True)
        for work, (ok, failure) in zip(self._work, results, strict=True):
            if not ok and not work.collected:
                log.warning("call %s: %s failed (the call ended without needing it): %s", self.call_id, work.kind,
                            failure.getErrorMessage())

    def save_partial(self) -> None:
        """Keep the counts so far for a call-back, without making the caller wait for Redis."""
        assert self.bureau is not None
        snapshot = dict(self.counts)
        args = (self.election.id, self.bureau.code, snapshot, self.caller_id, self.call_id)
        self._after_saves(self.line.state.save_partial, *args)

    def clear_partial(self) -> None:
        assert self.bureau is not None
        self._after_saves(self.line.state.clear_partial, self.election.id, self.bureau.code)

    def _after_saves(self, f: Callable[..., None], *args: Any) -> None:
        work = in_context(f)  # bound now: `run` is called back from whichever context fires the chain

        def failed(failure: Failure) -> None:
            log.warning("call %s: Redis write failed: %s", self.call_id, failure.getErrorMessage(),
                        extra=ids(call_id=self.call_id))
            if not self._save_failed.called:
                self._save_failed.callback(None)

        def run(_: object) -> defer.Deferred[None]:
            return self.line.run_blocking(work, *args).addErrback(failed)

        self._saves = self._saves.addBoth(run)

    async def saves_done(self) -> None:
        """Wait for this call's Redis writes, or for the first of them to fail.

        Once one has failed Redis is away or stalled: each write still queued would hold the call
        for a socket timeout, so the caller (handed to an operator) would wait in silence for all
        of them. They go on after the call has ended.
        """
        await defer.DeferredList([self._saves, self._save_failed], fireOnOneCallback=True)

    async def set_outcome(self, outcome: str, **variables: str) -> None:
        """Channel variables for the dialplan; SET VARIABLE runs even after a hang-up."""
        for name, value in variables.items():
            await self.agi.set_variable(name, value)
        await self.agi.set_variable(OUTCOME_VARIABLE, outcome)
        self.outcome = outcome

    async def say_number(self, n: int, escape: str = "") -> str | None:
        return await self.play(*P.number_files(n), escape=escape)


# --- the script ---

async def results_call(call: Call) -> None:
    agi = call.agi
    state, election = call.line.state, call.election
    try:
        caller_lock = call.start("caller-lock", caller_locked(call))
        await agi.answer()
        # The welcome can be cut by typing the bureau code (barge-in).
        caller_locked_for = await call.finish(caller_lock, P.WELCOME, P.election_title(election), escape=DIGITS)
        if caller_locked_for:
            await call.play(P.CALLER_LOCKED, *P.minutes_files(caller_locked_for))
            raise Handoff("caller-locked")

        # 1. The bureau: its code, three tries; an unknown code is said back.
        code = await call.ask(call.line.bureau_input)
        call.bureau = call.line.registry.get(code)
        assert call.bureau is not None
        # What the call needs once the PIN is right, fetched while the caller keys it (nothing of
        # it is said before the PIN is right).
        bureau_lock = call.start("bureau-lock", call.in_thread(state.locked_for, "bureau", code))
        history = call.start("history", already_reported(call))
        resume = call.start("resume", call.redis("resume", state.load_partial, election.id, code, default=None))
        await agi.set_variable("REMONTEE_BUREAU", code)

        # 2. The PIN, with lockout per bureau and per caller id.
        await check_pin(call, bureau_lock)

        # 3. A bureau that already reported hears its receipt (a caller cut off before hearing it calls back
        # for it), then may send a correction (a supervisor decides) or leave.
        reported = await call.finish(history)
        if reported is not None:
            receipt = P.digit_files(reported.receipt) if reported.receipt else []
            heard_again = [P.RECEIPT_IS, *receipt, P.I_REPEAT, *receipt] if receipt else []
            choice = await call.ask(CONFIRM_CORRECTION, preface=[P.ALREADY_REPORTED, *heard_again])
            if choice == "2":
                await call.play(P.GOODBYE)
                await call.set_outcome(DECLINED)
                return

        # 9. An entry interrupted within 30 minutes may be resumed.
        partial: Partial | None = await call.finish(resume)
        if partial is not None and partial.counts:
            choice = await call.ask(CONFIRM_RESUME, preface=[P.RESUME_OFFER])
            if choice == "1":
                call.counts = {k: v for k, v in partial.counts.items() if k in call.line.count_inputs}
                await call.play(P.RESUMED)

        # 4. Each count in the form's order, said back as soon as it is keyed.
        await enter_counts(call)

        # 5 and 6. The arithmetic, then the read-back and the confirmation.
        while True:
            if not await arithmetic_holds(call):
                choice = await call.ask(CONFIRM_MISMATCH)
                if choice == "1":
                    await correct_one(call)
                    continue
                if choice == "2":
                    await start_again(call)
                    continue
            choice = await read_back(call)
            if choice == "1":
                break
            if choice == "2":
                await correct_one(call)
            else:
                await start_again(call)

        # 7. Journal durably, then the receipt.
        saving = call.start("journal", submit(call))
        try:
            submission = await call.finish(saving, P.SAVING)
        except ChannelHungUp:
            # Hung up while it was being journaled: it is journaled all the same, and the channel says so.
            journaled = await saving.result
            if journaled is not None:
                await _quietly(call.set_outcome(ACCEPTED, **receipt_variables(journaled)))
            raise
        if submission is None:
            await call.play(P.TECHNICAL_ERROR)
            raise Handoff("journal-error")
        await announce(call, submission)
    except (NoInput, TooManyErrors, Handoff) as exc:
        reason = exc.reason if isinstance(exc, Handoff) else f"{type(exc).__name__}:{exc.name}"
        log.info("call %s: to an operator (%s)", call.call_id, reason)
        metrics.IVR_HANDOFFS.labels(reason).inc()
        with contextlib.suppress(ChannelHungUp):
            await call.play(P.TO_OPERATOR)
        await call.set_outcome(OPERATOR, REMONTEE_HANDOFF=reason)
    except ChannelHungUp:
        if call.outcome == ACCEPTED:  # during the receipt: the return is journaled all the same
            log.info("call %s: the caller hung up before hearing the receipt", call.call_id)
        else:
            log.info("call %s: the caller hung up (bureau %s, %d counts kept)", call.call_id,
                     call.bureau.code if call.bureau else "-", len(call.counts))
            await _quietly(call.set_outcome(HUNG_UP))
    finally:
        await call.work_done()
        await call.saves_done()


async def _quietly(coroutine: Any) -> None:
    try:
        await coroutine
    except Exception as exc:  # the connection itself may be gone; nothing left to tell anyone
        log.debug("after the hang-up: %s", exc)


# --- the work the script starts, each a coroutine of thread hops ---

async def caller_locked(call: Call) -> int:
    if not call.caller_id:
        return 0
    return await call.in_thread(call.line.state.locked_for, "caller", call.caller_id)


async def already_reported(call: Call) -> JournalEntry | None:
    """The bureau's latest return accepted or in review; None when it has none, or when the journal cannot be read.

    Only the question "a correction, or leave?" hangs on it: the journal compares the return with the
    bureau's history again as it writes it (DUPLICATE, CORRECTION), so a journal away for a moment (a
    PostgreSQL restart) costs the caller that question, not the call.
    """
    assert call.bureau is not None
    try:
        entries = await call.in_thread(call.line.journal.entries, call.election.id, call.bureau.code)
    except SQLAlchemyError as exc:
        log.warning("call %s: the journal cannot say whether bureau %s reported (%s); going on", call.call_id,
                    call.bureau.code, exc)
        return None
    reported = [e for e in entries if e.status in ("accepted", "review")]  # in the journal's order
    return reported[-1] if reported else None


@dataclass(frozen=True)
class PinVerdict:
    right: bool
    locked: tuple[str, ...] = ()  # what this wrong PIN locked, or what refused the attempt: "bureau", "caller"
    refused: bool = False  # the bureau or the caller id was locked when the PIN was keyed: it was not checked


async def pin_verdict(call: Call, pin: str) -> PinVerdict:
    """Let the attempt in, check the PIN, count the outcome: all of it happens even if the caller hangs up meanwhile.

    The locks are read again at every attempt, atomically with letting it in: a call that was asked
    for its PIN before the bureau or the caller id was locked by another call gets no more tries,
    and a right PIN keyed while locked is refused without being checked.
    """
    assert call.bureau is not None
    state, code = call.line.state, call.bureau.code
    # Not `call.redis`: the lockout does not go away with Redis, CallState keeps it in this process then.
    attempt = await call.in_thread(state.begin_pin_attempt, code, call.caller_id)
    if attempt.refused is not None:
        log.info("call %s: PIN attempt for bureau %s from %r refused: %s locked", call.call_id, code,
                 call.caller_id, attempt.refused)
        return PinVerdict(False, (attempt.refused,), refused=True)
    right = bool(await call.line.run_pin_check(in_context(verify_pin), pin, call.bureau.pin_hash))
    if right:
        metrics.IVR_PIN_CHECKS.labels("right").inc()
        await call.redis("pin accepted", state.pin_right, attempt, default=None)
        return PinVerdict(True)
    log.info("call %s: wrong PIN for bureau %s from %r", call.call_id, code, call.caller_id)
    metrics.IVR_PIN_CHECKS.labels("wrong").inc()
    locked = await call.in_thread(state.pin_wrong, attempt)
    for kind in locked:
        metrics.IVR_PIN_LOCKOUTS.labels(kind).inc()
    return PinVerdict(False, tuple(locked))


async def submit(call: Call) -> Submission | None:
    """Journal the return (durable when this returns); None when the journal refused it."""
    assert call.bureau is not None
    bureau, election = call.bureau, call.election
    source = {"call_id": call.call_id, "caller_id": call.caller_id or "anonymous"}

    def journal_it() -> Submission:
        ret = new_return(election, bureau.code, call.counts, "ivr", source)
        return call.line.journal.submit(ret, check_return(ret, election, bureau))

    try:
        # On the shared pool: the journal commits the submissions of concurrent threads together.
        submission = await call.in_thread(journal_it)
    except Exception:
        log.exception("call %s: the journal refused bureau %s", call.call_id, bureau.code)
        return None
    log.info("call %s: bureau %s journaled as %s, receipt %s", call.call_id, bureau.code, submission.status,
             submission.receipt)
    metrics.IVR_RETURNS.labels(submission.status).inc()
    if submission.status == "accepted":
        call.line.on_accepted()
    call.clear_partial()
    return submission


# --- the steps ---

async def check_pin(call: Call, bureau_lock: Work[int]) -> None:
    locked_for = await call.finish(bureau_lock)
    if locked_for:
        await call.play(P.BUREAU_LOCKED, *P.minutes_files(locked_for))
        raise Handoff("bureau-locked")
    lock = P.minutes_files(call.line.state.lock_seconds)  # a lock taken now, by this call or another
    preface: list[str] = []
    for _ in range(PIN_ATTEMPTS):
        pin = await call.ask(PIN, preface=preface)
        verdict = await call.finish(call.start("pin", pin_verdict(call, pin)), P.CHECKING_PIN)
        if verdict.right:
            return
        wrong = [] if verdict.refused else [P.PIN_WRONG]  # a refused PIN was not checked: nobody knows
        if "bureau" in verdict.locked:
            await call.play(*wrong, P.BUREAU_LOCKED, *lock)
            raise Handoff("bureau-locked")
        if "caller" in verdict.locked:
            await call.play(*wrong, P.CALLER_LOCKED, *lock)
            raise Handoff("caller-locked")
        preface = [P.PIN_WRONG]
    # Three wrong PINs that locked nothing (a right PIN on another line forgave some): the caller is told this
    # one was wrong too, not put through as if the PIN had been refused for no reason.
    await call.play(P.PIN_WRONG)
    raise Handoff("wrong-pin")


async def enter_counts(call: Call) -> None:
    """Ask every count not yet keyed, in the form's order; each is said back at once."""
    for field in call.election.fields:
        if field.id not in call.counts:
            await enter_count(call, field)


async def start_again(call: Call) -> None:
    """Every count keyed again. The figures kept for a call-back go too: the caller has just refused them, and a
    call dropped before the first new count must not be offered them to resume."""
    call.counts.clear()
    call.clear_partial()
    await enter_counts(call)


async def enter_count(call: Call, field: CountField) -> None:
    spec = call.line.count_inputs[field.id]
    while True:
        value = int(await call.ask(spec))
        # Kept at once: a caller who hangs up while hearing it back finds it on resuming.
        call.counts[field.id] = value
        call.save_partial()
        # Said back at once; a digit starts the next count, `*` keys this one again, `#` skips.
        key = await call.say_number(value, escape=DIGITS + "*#")
        if key == "*":
            del call.counts[field.id]
            call.save_partial()
            continue
        call.pending_key = key if key not in (None, "#") else None
        return


async def arithmetic_holds(call: Call) -> bool:
    """Say which totals disagree and by how much; True when nothing is wrong."""
    assert call.bureau is not None
    findings = check_arithmetic(call.counts, call.election)
    inscrits = call.bureau.inscrits
    over = inscrits is not None and call.counts["votants"] > inscrits
    if not findings and not over:
        return True
    speech: list[str] = []
    for finding in findings:
        difference = int(finding.details["difference"])
        speech.append(P.TOTAL_MISMATCH if finding.code == Reason.TOTAL_MISMATCH else P.SUM_MISMATCH)
        gap = min(abs(difference), P.MAX_SPOKEN_NUMBER)
        speech += [P.GAP_OF_ONE] if gap == 1 else [P.GAP_OF, *P.number_files(gap)]
        speech.append(P.TOO_MANY if difference > 0 else P.TOO_FEW)
    if over:
        speech.append(P.OVER_REGISTERED)
    call.pending_key = await call.play(*speech, escape="123")
    return False


async def correct_one(call: Call) -> None:
    """Which count to key again: the menu says each one's rank; then that count alone."""
    speech = [P.WHICH_LINE]
    for rank, field in enumerate(call.election.fields, start=1):
        speech += [P.field_name(field), P.LINE_FOR, *P.number_files(rank)]
    call.pending_key = await call.play(*speech, escape=DIGITS)
    rank = int(await call.ask(call.line.line_input))
    field = call.election.fields[rank - 1]
    del call.counts[field.id]
    await enter_count(call, field)
    call.pending_key = None


async def read_back(call: Call) -> str:
    """The figures, skippable with `#`, confirmable at once with `1`; then 1 send, 2 correct one, 3 all."""
    speech = [P.READ_BACK]
    for field in call.election.fields:
        speech += [P.field_name(field), *P.number_files(call.counts[field.id])]
    key = await call.play(*speech, escape="1#")
    if key == "1":
        return "1"
    return await call.ask(CONFIRM_SEND)


def receipt_variables(submission: Submission) -> dict[str, str]:
    return {RECEIPT_VARIABLE: submission.receipt, "REMONTEE_STATUS": submission.status}


async def announce(call: Call, submission: Submission) -> None:
    # The variables first: they are on the channel even if the caller hangs up during the receipt.
    await call.set_outcome(ACCEPTED, **receipt_variables(submission))
    codes = {f.code for f in submission.findings}
    if Reason.DUPLICATE in codes:  # answered with the first return's receipt and status
        message = P.ALREADY_RECEIVED
    elif submission.status == "accepted":
        message = P.RECORDED
    elif codes & {Reason.CORRECTION, Reason.CHANNEL_CONFLICT}:
        message = P.CORRECTION_TO_SUPERVISOR
    else:
        message = P.TO_SUPERVISOR
    receipt = P.digit_files(submission.receipt)
    await call.play(message, P.RECEIPT_IS, *receipt, P.I_REPEAT, *receipt, P.GOODBYE)


@dataclass(frozen=True)
class FlowInputs:
    """Every input of the flow for one election, for the tests and the documentation."""

    bureau: DigitInput
    pin: DigitInput
    counts: tuple[DigitInput, ...]
    menus: tuple[DigitInput, ...]


def flow_inputs(line: ResultsLine) -> FlowInputs:
    return FlowInputs(line.bureau_input, PIN, tuple(line.count_inputs.values()),
                      (CONFIRM_CORRECTION, CONFIRM_RESUME, CONFIRM_MISMATCH, CONFIRM_SEND, line.line_input))
