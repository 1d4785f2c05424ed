"""The French results call end to end: the FastAGI server on a real reactor and TCP port, a real Redis,
a real journal, and the scripted Asterisk peer playing the caller.

Every call checks that each sound the server played is in the prompt catalog (the peer answers a
missing file with `result=-1`, as Asterisk does, and records it).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agi_peer import HANGUP, SILENCE, AsteriskPeer, CallRecord, Gate, barge, press
from redis import Redis
from twisted.internet import defer, reactor
from twisted.internet.threads import blockingCallFromThread

from conftest import PostgresServer, RedisServer
from forms import Election
from ivr import prompts as P
from ivr.call_flow import HOLD_EVERY
from ivr.call_state import CallState
from ivr.server import PhoneService
from registry import hash_pin
from returns_queue.journal import Journal
from settings import Settings

CATALOG = frozenset(P.catalog())
# Figures that add up; votants stays under every demo bureau's inscrits (at least 300).
GOOD_T1 = {"votants": 250, "blancs_nuls": 5, "exprimes": 245, "aubry": 70, "baylet": 5, "hollande": 90,
           "montebourg": 40, "royal": 25, "valls": 15}
GOOD_T2 = {"votants": 250, "blancs_nuls": 5, "exprimes": 245, "hollande": 140, "aubry": 105}


@dataclass
class Phone:
    service: PhoneService
    port: int
    election: Election
    pins: dict[str, str]
    codes: Iterator[str]

    @property
    def journal(self) -> Journal:
        return self.service.journal

    def next_bureau(self) -> tuple[str, str]:
        code = next(self.codes)
        return code, self.pins[code]

    def call(self, script: list[Any], **options: Any) -> CallRecord:
        options.setdefault("sounds", CATALOG)
        record = AsteriskPeer(script, **options).call_sync("127.0.0.1", self.port)
        assert record.missing == [], f"sounds not in the catalog: {record.missing}"
        assert record.ended == "server closed"
        return record

    def counts_script(self, counts: dict[str, int]) -> list[Any]:
        return [press(f"{counts[f.id]}#") for f in self.election.fields]

    def happy_script(self, code: str, pin: str, counts: dict[str, int]) -> list[Any]:
        return [press(code + "#"), press(pin + "#"), *self.counts_script(counts), press("1")]

    def entries(self, code: str) -> list[Any]:
        return self.journal.entries(self.election.id, code)


def _phone(election_id: str, tmp: Path, redis_server: RedisServer, registry_files: tuple[Path, Path],
           pins: dict[str, str], codes: list[str], db_url: str | None = None) -> Iterator[Phone]:
    db_url = db_url or f"sqlite:///{tmp / 'journal.sqlite3'}"
    settings = Settings(var_dir=tmp, redis_url=redis_server.url, db_url=db_url,
                        election=election_id, registry=registry_files[0], bind="127.0.0.1")
    service = PhoneService(settings, relay=False)
    port = blockingCallFromThread(reactor, service.start, 0).getHost().port
    yield Phone(service, port, service.election, pins, iter(codes))
    blockingCallFromThread(reactor, lambda: defer.ensureDeferred(service.stop(1.0)))
    service.close()


@pytest.fixture(scope="module")
def phone(running_reactor: Any, tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
          demo_registry_files: tuple[Path, Path], pins: dict[str, str]) -> Iterator[Phone]:
    codes = sorted(pins)[:59]  # the demo registry has 60 bureaux; the second round needs one
    yield from _phone("primaire-2011-t1", tmp_path_factory.mktemp("ivr-t1"), redis_server, demo_registry_files,
                      pins, codes)


@pytest.fixture(scope="module")
def phone_t2(running_reactor: Any, tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
             demo_registry_files: tuple[Path, Path], pins: dict[str, str]) -> Iterator[Phone]:
    codes = sorted(pins)[59:]
    yield from _phone("primaire-2011-t2", tmp_path_factory.mktemp("ivr-t2"), redis_server, demo_registry_files,
                      pins, codes)


@pytest.fixture
def state(redis: Redis) -> CallState:
    return CallState(redis)


def heard(record: CallRecord) -> list[str]:
    """What the caller heard, without the holds (silence, "Veuillez patienter.") that cover work still going on."""
    return [f for f in record.played if f not in (P.SILENCE, P.HOLD)]


def said(record: CallRecord, *files: str) -> bool:
    """`files` were played one after the other (holds aside)."""
    played, n = heard(record), len(files)
    return any(tuple(played[i:i + n]) == files for i in range(len(played) - n + 1))


# --- the happy paths ---

def test_first_round_happy_path(phone: Phone, state: CallState) -> None:
    code, pin = phone.next_bureau()
    record = phone.call(phone.happy_script(code, pin, GOOD_T1), callerid="0611223344")
    assert record.outcome == "accepted" and record.variables["REMONTEE_STATUS"] == "accepted"
    assert record.variables["REMONTEE_BUREAU"] == code
    [entry] = phone.entries(code)
    assert entry.status == "accepted" and entry.receipt == record.receipt
    assert dict(entry.ret.counts) == GOOD_T1 and entry.ret.channel == "ivr"
    assert entry.ret.source == {"call_id": record.env["agi_uniqueid"], "caller_id": "0611223344"}
    # The questions, in the form's order, with DESIGN.md's names.
    assert record.prompts_asked() == [P.ASK_BUREAU, P.ASK_PIN, P.ask_field(phone.election.field("votants")),
                                      "remontee/ask-blancs_nuls", "remontee/ask-exprimes",
                                      *[f"remontee/ask-votes-{c}" for c in phone.election.candidate_ids],
                                      P.ASK_CONFIRM_SEND]
    # Each count said back as a French number as soon as it is keyed: 250, then 245 ...
    assert said(record, "remontee/nombres/deux", "remontee/nombres/cents", "remontee/nombres/cinquante") is False
    assert said(record, "remontee/nombres/deux", "remontee/nombres/cent", "remontee/nombres/cinquante")
    assert said(record, "remontee/nombres/soixante-dix", P.ask_field(phone.election.field("baylet")))
    # The receipt, digit by digit, twice, after the journal write.
    digits = P.digit_files(record.receipt or "")
    assert said(record, P.RECORDED, P.RECEIPT_IS, *digits, P.I_REPEAT, *digits, P.GOODBYE)
    assert state.load_partial(phone.election.id, code) is None  # nothing left to resume
    assert record.unused == [] and record.silent_past_script == 0
    assert all(t >= 0 for t in record.turnarounds)


def test_second_round_happy_path(phone_t2: Phone) -> None:
    code, pin = phone_t2.next_bureau()
    record = phone_t2.call(phone_t2.happy_script(code, pin, GOOD_T2))
    assert record.outcome == "accepted"
    [entry] = phone_t2.entries(code)
    assert dict(entry.ret.counts) == GOOD_T2 and entry.ret.election == "primaire-2011-t2"
    assert record.prompts_asked()[2:7] == ["remontee/ask-votants", "remontee/ask-blancs_nuls", "remontee/ask-exprimes",
                                           "remontee/ask-votes-hollande", "remontee/ask-votes-aubry"]
    assert P.election_title(phone_t2.election) in record.played


def test_experienced_caller_barges_in_and_skips_the_read_back(phone: Phone) -> None:
    code, pin = phone.next_bureau()
    fields = phone.election.fields
    script = [barge(code + "#"), press(pin + "#"), press(f"{GOOD_T1['votants']}#")]
    # Typing the next count while the previous one is said back: the digit is kept.
    script += [barge(f"{GOOD_T1[f.id]}#") for f in fields[1:]]
    script += [barge("#"), barge("1")]  # '#' cuts the last say-back, 1 during the read-back confirms at once
    record = phone.call(script)
    assert record.outcome == "accepted", "\n".join(record.commands)
    assert dict(phone.entries(code)[0].ret.counts) == GOOD_T1
    assert P.ASK_BUREAU not in record.prompts_asked()  # the code was typed during the welcome
    assert P.ASK_CONFIRM_SEND not in record.prompts_asked()
    assert record.prompts_asked().count(P.SILENCE) == len(fields)  # bureau + 8 barged counts


def test_star_restarts_an_entry_and_during_the_say_back_keys_the_count_again(phone: Phone) -> None:
    code, pin = phone.next_bureau()
    script = [press("99*" + code + "#"), press(pin + "#"), press("205#"), barge("*"),
              *phone.counts_script(GOOD_T1), barge("#"), press("1")]
    record = phone.call(script)
    assert record.outcome == "accepted"
    assert dict(phone.entries(code)[0].ret.counts) == GOOD_T1
    assert record.prompts_asked().count("remontee/ask-votants") == 2
    assert record.prompts_asked()[-1] == P.ASK_CONFIRM_SEND  # '#' skipped the read-back to the question


# --- bureau, PIN, lockouts ---

def test_unknown_bureau_is_said_back_three_tries_then_operator(phone: Phone) -> None:
    record = phone.call([press("999901#"), press("42#"), press("0#")])
    assert record.outcome == "operator" and record.variables["REMONTEE_HANDOFF"].endswith("bureau")
    assert said(record, P.BUREAU, *P.digit_files("999901"), P.UNKNOWN)
    assert said(record, P.BUREAU, *P.digit_files("42"), P.UNKNOWN)
    assert record.prompts_asked() == [P.ASK_BUREAU] * 3
    assert record.played[-1] == P.TO_OPERATOR


def test_unknown_then_known_bureau_goes_on(phone: Phone) -> None:
    code, pin = phone.next_bureau()
    record = phone.call([press("999901#"), *phone.happy_script(code, pin, GOOD_T1)])
    assert record.outcome == "accepted"


def test_three_wrong_pins_lock_the_bureau_across_calls(phone: Phone, state: CallState) -> None:
    code, pin = phone.next_bureau()
    wrong = "000000" if pin != "000000" else "111111"
    record = phone.call([press(code + "#"), press(wrong + "#"), press(wrong + "#"), press(wrong + "#")],
                        callerid="0600000001")
    assert record.outcome == "operator" and record.variables["REMONTEE_HANDOFF"] == "bureau-locked"
    assert said(record, P.PIN_WRONG, P.BUREAU_LOCKED)
    assert 0 < state.locked_for("bureau", code) <= 15 * 60
    # Another caller, with the right PIN: the bureau is locked for every call.
    record = phone.call([press(code + "#"), press(pin + "#")], callerid="0600000002")
    assert record.outcome == "operator" and P.BUREAU_LOCKED in record.played
    assert P.ASK_PIN not in record.prompts_asked()
    assert phone.entries(code) == []


def test_two_wrong_pins_then_the_right_one_is_accepted(phone: Phone, state: CallState) -> None:
    code, pin = phone.next_bureau()
    wrong = "000000" if pin != "000000" else "111111"
    script = [press(code + "#"), press(wrong + "#"), press(wrong + "#"), press(pin + "#"),
              *phone.counts_script(GOOD_T1), press("1")]
    record = phone.call(script, callerid="0600000003")
    assert record.outcome == "accepted" and record.played.count(P.PIN_WRONG) == 2
    assert state.locked_for("bureau", code) == 0


def test_a_caller_trying_pins_on_several_bureaux_is_locked_and_told_so(phone: Phone, state: CallState) -> None:
    caller = "0699999999"
    for attempt in range(3):
        code, pin = phone.next_bureau()
        wrong = "000000" if pin != "000000" else "111111"
        hangs_up = [HANGUP] if attempt < 2 else []  # one wrong PIN per bureau, on three bureaux
        record = phone.call([press(code + "#"), press(wrong + "#"), *hangs_up], callerid=caller)
    assert record.outcome == "operator" and record.variables["REMONTEE_HANDOFF"] == "caller-locked"
    assert state.locked_for("caller", caller) > 0
    code, pin = phone.next_bureau()
    record = phone.call(phone.happy_script(code, pin, GOOD_T1), callerid=caller)
    assert record.outcome == "operator"
    assert heard(record) == [P.WELCOME, P.election_title(phone.election), P.CALLER_LOCKED, *P.minutes_files(15 * 60),
                             P.TO_OPERATOR]
    assert record.prompts_asked() == [] and phone.entries(code) == []


def test_the_lock_message_says_the_lockout_duration(own_phone: Phone, redis: Redis) -> None:
    """The caller hears how long the lockout lasts, as configured (not always "quinze minutes"); a lock met at the
    start of a call is said for the time it has left, in whole minutes."""
    phone = own_phone
    phone.service.line.state = state = CallState(redis, lock_seconds=21 * 60)
    lasts = [P.NUMBERS + "vingt-et-une", P.MINUTES]  # minutes are feminine: vingt et une
    code, pin = phone.next_bureau()
    wrong = "000000" if pin != "000000" else "111111"
    record = phone.call([press(code + "#"), *[press(wrong + "#")] * 3], callerid="0600000071")
    assert record.variables["REMONTEE_HANDOFF"] == "bureau-locked"
    assert said(record, P.PIN_WRONG, P.BUREAU_LOCKED, *lasts, P.TO_OPERATOR)
    assert 20 * 60 < state.locked_for("bureau", code) <= 21 * 60
    record = phone.call([press(code + "#"), press(pin + "#")], callerid="0600000072")
    assert heard(record)[-4:] == [P.BUREAU_LOCKED, *lasts, P.TO_OPERATOR]
    # A caller id locked with a minute left hears "une minute".
    caller = "0600000073"
    for attempt in range(3):  # one wrong PIN on each of three bureaux
        code, pin = phone.next_bureau()
        hangs_up = [HANGUP] if attempt < 2 else []
        record = phone.call([press(code + "#"), press(("000000" if pin != "000000" else "111111") + "#"),
                             *hangs_up], callerid=caller)
    assert record.variables["REMONTEE_HANDOFF"] == "caller-locked"
    redis.expire(state._lock_key("caller", caller), 50)
    code, pin = phone.next_bureau()
    record = phone.call(phone.happy_script(code, pin, GOOD_T1), callerid=caller)
    assert heard(record) == [P.WELCOME, P.election_title(phone.election), P.CALLER_LOCKED, P.NUMBERS + "une",
                             P.MINUTE, P.TO_OPERATOR]


def test_withheld_numbers_are_never_locked_together(phone: Phone, state: CallState) -> None:
    for _ in range(3):
        code, pin = phone.next_bureau()
        wrong = "000000" if pin != "000000" else "111111"
        phone.call([press(code + "#"), press(wrong + "#"), HANGUP], callerid="unknown")
    assert state.locked_for("caller", "unknown") == 0
    code, pin = phone.next_bureau()
    assert phone.call(phone.happy_script(code, pin, GOOD_T1), callerid="unknown").outcome == "accepted"


def test_a_pin_keyed_wrong_is_never_written_to_the_log(phone: Phone, caplog: pytest.LogCaptureFixture) -> None:
    code, pin = phone.next_bureau()
    caplog.set_level(logging.DEBUG)
    # The PIN keyed twice (the caller did not hear the first), then a PIN cut short, then the right one.
    script = [press(code + "#"), press(pin + pin + "#"), press(pin[:3] + "#"), press(pin + "#"),
              *phone.counts_script(GOOD_T1), press("1")]
    record = phone.call(script, callerid="0600000031")
    assert record.outcome == "accepted"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "pin: invalid entry" in logged  # the invalid entries are logged, without their digits
    assert pin not in logged and pin[:3] + "'" not in logged


def _wrong_pin(pin: str, n: int = 0) -> str:
    wrong = f"{n:06d}"
    return wrong if wrong != pin else f"{n + 1:06d}"


def _while_waiting_at_the_pin_question(phone: Phone, waiting: list[Any], meanwhile: Callable[[], Any],
                                       callerid: str) -> tuple[CallRecord, Any]:
    """A call that has keyed its bureau code and hears the PIN question; `meanwhile` runs; then it keys `waiting`."""
    async def run() -> tuple[CallRecord, Any]:
        gate = Gate()
        peer = AsteriskPeer(waiting, sounds=CATALOG, callerid=callerid, hold={f"GET DATA {P.ASK_PIN}": gate},
                            io_timeout=30)
        call = asyncio.create_task(peer.call("127.0.0.1", phone.port))
        await asyncio.wait_for(gate.reached.wait(), 10)
        other = await asyncio.to_thread(meanwhile)
        gate.opened.set()
        return await call, other

    return asyncio.run(run())


@pytest.mark.parametrize("keys", ["right", "wrong, wrong, right"])
def test_a_call_at_the_pin_question_when_the_bureau_is_locked_gets_no_more_tries(
        phone: Phone, state: CallState, keys: str) -> None:
    """The lock is read at every attempt: not only when the bureau code is keyed, or M calls would get 3 × M tries."""
    code, pin = phone.next_bureau()
    wrong = _wrong_pin(pin)
    pins = [pin] if keys == "right" else [_wrong_pin(pin, 1), _wrong_pin(pin, 1), pin]
    script = [press(code + "#"), *[press(p + "#") for p in pins], *phone.counts_script(GOOD_T1), press("1")]
    record, locking = _while_waiting_at_the_pin_question(
        phone, script, lambda: phone.call([press(code + "#"), *[press(wrong + "#")] * 3], callerid="0600000021"),
        callerid="0600000022")
    assert locking.variables["REMONTEE_HANDOFF"] == "bureau-locked" and state.locked_for("bureau", code) > 0
    # Even the right PIN is refused while the bureau is locked, unchecked: the caller is not told it is wrong.
    assert record.outcome == "operator" and record.variables["REMONTEE_HANDOFF"] == "bureau-locked"
    assert record.prompts_asked() == [P.ASK_BUREAU, P.ASK_PIN] and P.PIN_WRONG not in record.played
    assert heard(record)[-4:] == [P.BUREAU_LOCKED, P.NUMBERS + "quinze", P.MINUTES, P.TO_OPERATOR]
    assert phone.entries(code) == [] and state.locked_for("bureau", code) > 14 * 60


def test_a_call_at_the_pin_question_when_its_caller_id_is_locked_gets_no_more_tries(
        phone: Phone, state: CallState) -> None:
    caller = "0600000023"
    code, pin = phone.next_bureau()
    other, other_pin = phone.next_bureau()
    wrong = _wrong_pin(other_pin)
    script = phone.happy_script(code, pin, GOOD_T1)
    record, _ = _while_waiting_at_the_pin_question(
        phone, script, lambda: phone.call([press(other + "#"), *[press(wrong + "#")] * 3], callerid=caller),
        callerid=caller)
    assert state.locked_for("caller", caller) > 0
    assert record.outcome == "operator" and record.variables["REMONTEE_HANDOFF"] == "caller-locked"
    assert heard(record)[-4:] == [P.CALLER_LOCKED, P.NUMBERS + "quinze", P.MINUTES, P.TO_OPERATOR]
    assert P.PIN_WRONG not in record.played
    assert phone.entries(code) == []


def test_a_third_wrong_pin_that_locks_nothing_is_said_wrong_before_the_operator(own_phone: Phone) -> None:
    """A withheld number keys three wrong PINs while another line of the bureau keys the right one (which forgives
    the bureau's failures): the third locks nothing, and the caller is told it was wrong, as for the first two,
    before being put through to an operator."""
    phone = own_phone
    code, pin = phone.next_bureau()

    async def run() -> tuple[CallRecord, CallRecord]:
        gate = Gate()  # after the first wrong PIN, as "Code secret incorrect." is about to play
        peer = AsteriskPeer([press(code + "#"), *[press(_wrong_pin(pin) + "#")] * 3], sounds=CATALOG,
                            callerid="anonymous", hold={f"STREAM FILE {P.PIN_WRONG}": gate}, io_timeout=30)
        call = asyncio.create_task(peer.call("127.0.0.1", phone.port))
        await asyncio.wait_for(gate.reached.wait(), 10)
        other = await asyncio.to_thread(phone.call, phone.happy_script(code, pin, GOOD_T1), callerid="0600000051")
        gate.opened.set()
        return await call, other

    record, other = asyncio.run(run())
    assert other.outcome == "accepted"
    assert record.outcome == "operator" and record.variables["REMONTEE_HANDOFF"] == "wrong-pin"
    assert record.prompts_asked().count(P.ASK_PIN) == 3
    assert heard(record)[-3:] == [P.CHECKING_PIN, P.PIN_WRONG, P.TO_OPERATOR]


def test_pins_being_checked_for_a_bureau_count_as_its_tries(phone: Phone, state: CallState) -> None:
    """Three wrong PINs keyed at the same moment on three lines, and a fourth call: no fourth try is checked."""
    code, pin = phone.next_bureau()
    wrong = _wrong_pin(pin)
    checkers = phone.service.pin_checker
    release = threading.Event()
    for _ in range(checkers.max):
        checkers.callInThread(release.wait)  # the PIN checkers busy: the three wrong PINs wait together
    later = threading.Timer(5.0, release.set)  # whatever happens, the checks end
    later.start()

    async def run() -> tuple[list[CallRecord], CallRecord]:
        trying = [asyncio.create_task(AsteriskPeer([press(code + "#"), press(wrong + "#"), HANGUP], sounds=CATALOG,
                                                   callerid=f"06000000{30 + i}", io_timeout=30)
                                      .call("127.0.0.1", phone.port)) for i in range(3)]
        deadline = asyncio.get_running_loop().time() + 10
        while checkers.q.qsize() < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert checkers.q.qsize() == 3  # the three wrong PINs are queued to be checked, none counted yet
        # Prompts of 10 ms: a fourth PIN waiting for a checker would hear holds, not thousands of them.
        fourth = await AsteriskPeer(phone.happy_script(code, pin, GOOD_T1), sounds=CATALOG, callerid="0600000039",
                                    answer_delay=0.01, io_timeout=30).call("127.0.0.1", phone.port)
        release.set()
        return list(await asyncio.gather(*trying)), fourth

    try:
        tried, fourth = asyncio.run(run())
    finally:
        release.set()
        later.cancel()
    assert all(r.caller_hung_up for r in tried)
    assert fourth.outcome == "operator" and fourth.variables["REMONTEE_HANDOFF"] == "bureau-locked"
    assert P.PIN_WRONG not in fourth.played and phone.entries(code) == []
    assert state.locked_for("bureau", code) > 0  # the three wrong PINs, counted once checked


# --- silence ---

def test_silence_reprompts_three_times_then_operator(phone: Phone) -> None:
    record = phone.call([SILENCE, SILENCE, SILENCE, SILENCE])
    assert record.outcome == "operator" and record.variables["REMONTEE_HANDOFF"] == "NoInput:bureau"
    assert record.prompts_asked() == [P.ASK_BUREAU] * 4 and record.played.count(P.NOTHING_HEARD) == 3


def test_silence_during_the_counts_keeps_what_was_typed(phone: Phone, state: CallState) -> None:
    code, pin = phone.next_bureau()
    record = phone.call([press(code + "#"), press(pin + "#"), press("250#"), SILENCE, SILENCE, SILENCE, SILENCE])
    assert record.outcome == "operator"
    partial = state.load_partial(phone.election.id, code)
    assert partial is not None and partial.counts == {"votants": 250}


# --- arithmetic ---

def test_sum_mismatch_is_said_then_one_count_corrected(phone: Phone) -> None:
    code, pin = phone.next_bureau()
    wrong = {**GOOD_T1, "hollande": 93}  # three votes too many
    rank = [f.id for f in phone.election.fields].index("hollande") + 1
    script = [press(code + "#"), press(pin + "#"), *phone.counts_script(wrong),
              press("1"), press(f"{rank}#"), press("90#"), press("1")]
    record = phone.call(script)
    assert said(record, P.SUM_MISMATCH, P.GAP_OF, "remontee/nombres/trois", P.TOO_MANY)
    assert P.TOTAL_MISMATCH not in record.played
    assert record.outcome == "accepted"
    [entry] = phone.entries(code)
    assert entry.status == "accepted" and dict(entry.ret.counts) == GOOD_T1
    assert record.prompts_asked().count("remontee/ask-votes-hollande") == 2


def test_total_mismatch_then_everything_keyed_again(phone: Phone) -> None:
    code, pin = phone.next_bureau()
    wrong = {**GOOD_T1, "votants": 260}  # blancs_nuls + exprimes = 250: ten short
    script = [press(code + "#"), press(pin + "#"), *phone.counts_script(wrong), press("2"),
              *phone.counts_script(GOOD_T1), press("1")]
    record = phone.call(script)
    assert said(record, P.TOTAL_MISMATCH, P.GAP_OF, "remontee/nombres/dix", P.TOO_FEW)
    assert record.outcome == "accepted" and dict(phone.entries(code)[0].ret.counts) == GOOD_T1


@pytest.fixture
def own_phone(running_reactor: Any, tmp_path: Path, redis_server: RedisServer, redis: Redis,
              demo_registry_files: tuple[Path, Path], pins: dict[str, str]) -> Iterator[Phone]:
    """A server with a journal of its own and Redis emptied: `phone` has a bureau for each test of its module."""
    yield from _phone("primaire-2011-t1", tmp_path, redis_server, demo_registry_files, pins, sorted(pins)[:5])


def test_a_gap_of_one_is_said_in_french(own_phone: Phone) -> None:
    """"L'écart est d'un", not "de un": a gap of one ballot is the commonest slip of all."""
    phone = own_phone
    code, pin = phone.next_bureau()
    wrong = {**GOOD_T1, "votants": 249, "hollande": 91}  # one short of the votants, one too many votes
    record = phone.call([press(code + "#"), press(pin + "#"), *phone.counts_script(wrong), press("3"), press("1")])
    assert not said(record, P.GAP_OF, "remontee/nombres/un")
    assert said(record, P.TOTAL_MISMATCH, P.GAP_OF_ONE, P.TOO_MANY, P.SUM_MISMATCH, P.GAP_OF_ONE, P.TOO_MANY)
    assert record.outcome == "accepted" and record.variables["REMONTEE_STATUS"] == "review"


def test_mismatch_sent_as_is_goes_to_a_supervisor_with_a_receipt(phone: Phone) -> None:
    code, pin = phone.next_bureau()
    wrong = {**GOOD_T1, "valls": 10}
    record = phone.call([press(code + "#"), press(pin + "#"), *phone.counts_script(wrong), press("3"), press("1")])
    assert record.outcome == "accepted" and record.variables["REMONTEE_STATUS"] == "review"
    [entry] = phone.entries(code)
    assert entry.status == "review" and {f.code for f in entry.findings} == {"SUM_MISMATCH"}
    assert said(record, P.TO_SUPERVISOR, P.RECEIPT_IS)


def test_more_votants_than_inscrits_is_said(phone: Phone) -> None:
    code, pin = phone.next_bureau()
    inscrits = phone.service.registry.get(code).inscrits  # type: ignore[union-attr]
    counts = {**GOOD_T1, "votants": inscrits + 5, "blancs_nuls": inscrits + 5 - 245}
    record = phone.call([press(code + "#"), press(pin + "#"), *phone.counts_script(counts), press("3"), press("1")])
    assert P.OVER_REGISTERED in record.played and record.variables["REMONTEE_STATUS"] == "review"


# --- hang-ups and resume ---

def test_a_hang_up_at_every_step_accepts_nothing_and_keeps_the_partial(phone: Phone, redis: Redis,
                                                                     state: CallState) -> None:
    code, pin = phone.next_bureau()
    happy = phone.happy_script(code, pin, GOOD_T1)
    fields = [f.id for f in phone.election.fields]
    for step in range(len(happy)):
        redis.flushdb()
        record = phone.call([*happy[:step], HANGUP])
        assert record.caller_hung_up and record.outcome == "hangup", step
        assert phone.entries(code) == [], step
        # After the hang-up only dead-safe commands reached the channel.
        assert record.hung_up_at is not None
        assert all(c.split()[0] in ("SET", "VERBOSE", "EXEC") for c in record.commands[record.hung_up_at:]), step
        partial = state.load_partial(phone.election.id, code)
        typed = max(0, step - 2)  # the counts keyed before the hang-up
        if typed == 0:
            assert partial is None, step
        else:
            assert partial is not None and partial.counts == {f: GOOD_T1[f] for f in fields[:typed]}, step
    # Hanging up while the return is being journaled ("Enregistrement en cours."): it is journaled all
    # the same, and the channel says so for the dialplan.
    redis.flushdb()
    record = phone.call([*happy, HANGUP])
    assert record.caller_hung_up and record.outcome == "accepted"
    assert record.played[-1] == P.SAVING
    [entry] = phone.entries(code)
    assert entry.status == "accepted" and record.variables["REMONTEE_RECEIPT"] == entry.receipt


def test_only_dead_safe_commands_follow_a_hang_up(phone: Phone) -> None:
    code, pin = phone.next_bureau()
    record = phone.call([press(code + "#"), press(pin + "#"), press("250#"), HANGUP])
    hung_up_at = next(i for i, c in enumerate(record.commands) if c.startswith("STREAM FILE remontee/nombres"))
    later = [c.split()[0] + " " + c.split()[1] for c in record.commands[hung_up_at + 1:]]
    assert later and set(later) <= {"SET VARIABLE"}


def test_hang_up_while_the_pin_is_checked(phone: Phone, state: CallState) -> None:
    code, pin = phone.next_bureau()
    # The HANGUP line arrives right after the PIN's answer, while the PIN is being checked: at most the
    # "checking" prompt or a hold reaches the channel (Asterisk answers it 511), nothing is asked again.
    record = phone.call(phone.happy_script(code, pin, GOOD_T1), inject_after={f"GET DATA {P.ASK_PIN}": b"HANGUP\n"})
    assert record.outcome == "hangup" and phone.entries(code) == []
    assert record.hung_up_at is not None and record.commands[record.hung_up_at - 1].startswith(f"GET DATA {P.ASK_PIN}")
    later = [c for c in record.commands[record.hung_up_at:] if c.startswith(("GET DATA", "STREAM FILE"))]
    assert all(c.split()[2] in (P.CHECKING_PIN, P.SILENCE, P.HOLD) for c in later), later


def test_a_511_without_hangup_line_is_a_hang_up(phone: Phone) -> None:
    code, pin = phone.next_bureau()
    script = phone.happy_script(code, pin, GOOD_T1)
    record = phone.call(script, tamper={"GET DATA remontee/ask-votants": b"511 Command Not Permitted on a dead "
                                                                          b"channel or intercept routine\n"})
    assert any(c.startswith("GET DATA remontee/ask-votants") for c in record.commands)
    assert record.outcome == "hangup" and phone.entries(code) == []


def test_resume_after_a_dropped_call(phone: Phone, state: CallState) -> None:
    code, pin = phone.next_bureau()
    fields = [f.id for f in phone.election.fields]
    happy = phone.happy_script(code, pin, GOOD_T1)
    phone.call([*happy[:6], HANGUP])  # bureau, PIN and four counts
    assert state.load_partial(phone.election.id, code).counts == {f: GOOD_T1[f] for f in fields[:4]}  # type: ignore[union-attr]
    rest = [press(f"{GOOD_T1[f]}#") for f in fields[4:]]
    record = phone.call([press(code + "#"), press(pin + "#"), press("1"), *rest, press("1")])
    assert said(record, P.RESUME_OFFER) and P.ASK_CONFIRM_RESUME in record.prompts_asked()
    assert record.prompts_asked()[3:-1] == [f"remontee/ask-votes-{c}" for c in fields[4:]]
    assert record.outcome == "accepted" and dict(phone.entries(code)[0].ret.counts) == GOOD_T1


def test_resume_declined_starts_again(phone: Phone, state: CallState) -> None:
    code, pin = phone.next_bureau()
    happy = phone.happy_script(code, pin, GOOD_T1)
    phone.call([*happy[:4], HANGUP])
    record = phone.call([press(code + "#"), press(pin + "#"), press("2"), *phone.counts_script(GOOD_T1), press("1")])
    assert record.prompts_asked()[3] == "remontee/ask-votants" and record.outcome == "accepted"


def test_figures_refused_at_the_read_back_are_not_offered_to_resume(phone: Phone, state: CallState) -> None:
    """The caller asks to key everything again (3), then the line drops: a call-back starts from nothing."""
    code, pin = phone.next_bureau()
    record = phone.call([*phone.happy_script(code, pin, GOOD_T1)[:-1], press("3"), HANGUP])
    assert record.prompts_asked()[-1] == "remontee/ask-votants" and record.outcome == "hangup"
    assert state.load_partial(phone.election.id, code) is None
    again = phone.call([press(code + "#"), press(pin + "#"), *phone.counts_script(GOOD_T1), press("1")])
    assert P.ASK_CONFIRM_RESUME not in again.prompts_asked() and again.outcome == "accepted"


def test_resume_is_kept_thirty_minutes(phone: Phone, redis: Redis) -> None:
    code, pin = phone.next_bureau()
    phone.call([*phone.happy_script(code, pin, GOOD_T1)[:3], HANGUP])
    ttl = redis.ttl(f"remontee:ivr:partial:{phone.election.id}:{code}")
    assert 29 * 60 < ttl <= 30 * 60


# --- a bureau that already reported ---

def test_second_call_for_a_bureau_that_reported(phone: Phone) -> None:
    code, pin = phone.next_bureau()
    first = phone.call(phone.happy_script(code, pin, GOOD_T1))
    assert first.outcome == "accepted"
    # Leaves.
    record = phone.call([press(code + "#"), press(pin + "#"), press("2")])
    assert said(record, P.ALREADY_REPORTED) and record.outcome == "declined"
    assert len(phone.entries(code)) == 1
    # Corrects: journaled, sent to a supervisor as a CORRECTION, and the caller still gets a receipt.
    corrected = {**GOOD_T1, "aubry": 71, "hollande": 89}
    record = phone.call([press(code + "#"), press(pin + "#"), press("1"), *phone.counts_script(corrected),
                         press("1")])
    assert record.outcome == "accepted" and record.variables["REMONTEE_STATUS"] == "review"
    assert said(record, P.CORRECTION_TO_SUPERVISOR, P.RECEIPT_IS)
    entries = phone.entries(code)
    assert [e.status for e in entries] == ["accepted", "review"]
    assert "CORRECTION" in {f.code for f in entries[1].findings} and entries[1].receipt == record.receipt
    assert record.receipt != first.receipt
    # The same figures again: a duplicate, answered with the first receipt.
    record = phone.call([press(code + "#"), press(pin + "#"), press("1"), *phone.counts_script(GOOD_T1),
                         press("1")])
    assert record.receipt == first.receipt and record.variables["REMONTEE_STATUS"] == "accepted"
    assert said(record, P.ALREADY_RECEIVED, P.RECEIPT_IS)


def test_a_caller_cut_off_before_the_receipt_hears_it_on_calling_back(own_phone: Phone) -> None:
    """The return is journaled, then the line drops before the receipt is said: the president calling back is told
    the bureau has reported and given its receipt, before being offered a correction."""
    phone = own_phone
    code, pin = phone.next_bureau()
    cut_off = phone.call([*phone.happy_script(code, pin, GOOD_T1), HANGUP])
    assert cut_off.outcome == "accepted" and P.RECEIPT_IS not in cut_off.played
    [entry] = phone.entries(code)
    digits = P.digit_files(entry.receipt or "")
    record = phone.call([press(code + "#"), press(pin + "#"), press("2")])
    assert said(record, P.ALREADY_REPORTED, P.RECEIPT_IS, *digits, P.I_REPEAT, *digits)
    assert record.prompts_asked()[-1] == P.ASK_CONFIRM_CORRECTION and record.outcome == "declined"
    # A correction sent since is the receipt a later call-back hears: the bureau's latest return.
    phone.call([press(code + "#"), press(pin + "#"), press("1"), *phone.counts_script({**GOOD_T1, "aubry": 71,
                                                                                         "valls": 14}), press("1")])
    latest = phone.entries(code)[-1]
    assert latest.status == "review" and latest.receipt != entry.receipt
    record = phone.call([press(code + "#"), press(pin + "#"), press("2")])
    assert said(record, P.ALREADY_REPORTED, P.RECEIPT_IS, *P.digit_files(latest.receipt or ""))
    assert record.outcome == "declined" and len(phone.entries(code)) == 2


# --- the wire: garbage, long lines, missing sounds, Redis away, many calls ---

def _concurrently(*calls: Callable[[], Any]) -> list[CallRecord]:
    async def run() -> list[CallRecord]:
        return list(await asyncio.gather(*(c() for c in calls)))

    return asyncio.run(run())


@pytest.mark.parametrize("garbage", [b"\x00\xff\xfe garbage\n", b"200 result=1" + b"9" * 20_000,
                                     b"HTTP/1.1 400 Bad Request\r\n\r\n"])
def test_garbage_from_one_peer_closes_that_call_only(phone: Phone, garbage: bytes) -> None:
    code, pin = phone.next_bureau()
    other_code, other_pin = phone.next_bureau()
    violations = phone.service.stats.violations
    bad = AsteriskPeer(phone.happy_script(code, pin, GOOD_T1), sounds=CATALOG, tamper={4: garbage})
    good = AsteriskPeer(phone.happy_script(other_code, other_pin, GOOD_T1), sounds=CATALOG)
    bad_record, good_record = _concurrently(lambda: bad.call("127.0.0.1", phone.port),
                                            lambda: good.call("127.0.0.1", phone.port))
    assert bad_record.ended == "server closed" and len(bad_record.commands) == 4
    assert bad_record.outcome is None and phone.entries(code) == []
    assert good_record.outcome == "accepted" and len(phone.entries(other_code)) == 1
    assert phone.service.stats.violations == violations + 1


@pytest.mark.parametrize("answer", [b"200 result=999 endpos=100\n", b"200 result=abc endpos=100\n"])
def test_an_unreadable_result_is_a_violation_said_and_counted(phone: Phone, answer: bytes,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A key code no keypad sends, or no number at all, where a STREAM FILE's result is read: the line is FastAGI,
    its value is not; the call is closed like any other violation, with a log line and the count."""
    violations = phone.service.stats.violations
    caplog.set_level(logging.WARNING, logger="ivr.agi")
    record = AsteriskPeer([press("999901#")], sounds=CATALOG,
                          tamper={"STREAM FILE remontee/bienvenue": answer}).call_sync("127.0.0.1", phone.port)
    assert record.ended == "server closed" and record.commands[-1].startswith("STREAM FILE remontee/bienvenue")
    assert record.outcome is None and len(record.commands) == 2  # ANSWER, the welcome: nothing after it
    assert phone.service.stats.violations == violations + 1
    [line] = [r.getMessage() for r in caplog.records if r.name == "ivr.agi"]
    assert "unreadable answer to STREAM FILE" in line and answer.split()[1].decode() in line
    assert "closing this connection" in line and record.env["agi_uniqueid"] in line


def test_garbage_environment_is_refused(phone: Phone) -> None:
    record = phone.call([], extra_env={"agi_network_script": "results\nnot an environment line"})
    assert record.commands == [] and record.ended == "server closed"


def test_unknown_script_gets_nothing(phone: Phone) -> None:
    record = phone.call([], script_name="admin")
    assert record.commands == []


def test_a_missing_sound_file_hands_the_caller_to_an_operator(phone: Phone) -> None:
    code, pin = phone.next_bureau()
    sounds = CATALOG - {P.ASK_PIN}
    record = AsteriskPeer(phone.happy_script(code, pin, GOOD_T1), sounds=sounds).call_sync("127.0.0.1", phone.port)
    assert record.missing == [P.ASK_PIN] * 3  # -1 at once, the channel stays up, three attempts
    assert record.outcome == "operator" and not record.caller_hung_up


def test_redis_away_the_call_is_still_journaled(phone: Phone, redis_server: RedisServer, redis: Redis) -> None:
    code, pin = phone.next_bureau()
    redis_server.stop()
    try:
        record = phone.call(phone.happy_script(code, pin, GOOD_T1))
    finally:
        redis_server.start()
    assert record.outcome == "accepted" and [e.status for e in phone.entries(code)] == ["accepted"]


def test_redis_away_the_pin_lockout_holds_in_this_server(phone: Phone, redis_server: RedisServer, redis: Redis,
                                                         state: CallState) -> None:
    """Phone reporting goes on without Redis, and so does the lockout: the server counts the failures itself."""
    code, pin = phone.next_bureau()
    other, other_pin = phone.next_bureau()
    fresh, fresh_pin = phone.next_bureau()
    caller, wrong = "0600000041", _wrong_pin(pin)
    redis_server.stop()
    try:
        tried = phone.call([press(code + "#"), *[press(wrong + "#")] * 3], callerid=caller)
        right_pin = phone.call(phone.happy_script(code, pin, GOOD_T1), callerid="0600000042")
        same_caller = phone.call(phone.happy_script(other, other_pin, GOOD_T1), callerid=caller)
        nobody_tried = phone.call(phone.happy_script(fresh, fresh_pin, GOOD_T1), callerid="0600000043")
    finally:
        redis_server.start()
    assert tried.outcome == "operator" and tried.variables["REMONTEE_HANDOFF"] == "bureau-locked"
    assert said(tried, P.PIN_WRONG, P.BUREAU_LOCKED)
    # The bureau is locked for every call, the caller id for every bureau, as with Redis.
    assert right_pin.variables["REMONTEE_HANDOFF"] == "bureau-locked" and P.ASK_PIN not in right_pin.prompts_asked()
    assert same_caller.variables["REMONTEE_HANDOFF"] == "caller-locked" and same_caller.prompts_asked() == []
    assert phone.entries(code) == [] and phone.entries(other) == []
    assert nobody_tried.outcome == "accepted" and len(phone.entries(fresh)) == 1
    # Redis back knows nothing of it (the server counted alone), and the lock still holds in this server.
    assert state.locked_for("bureau", code) == 0 and 14 * 60 < phone.service.state.locked_for("bureau", code) <= 15 * 60
    again = phone.call(phone.happy_script(code, pin, GOOD_T1), callerid="0600000044")
    assert again.variables["REMONTEE_HANDOFF"] == "bureau-locked" and phone.entries(code) == []


def test_a_stalled_redis_does_not_hold_the_caller_handed_to_an_operator(
        phone: Phone, redis_server: RedisServer, redis: Redis, caplog: pytest.LogCaptureFixture) -> None:
    """Redis stops answering while the counts are keyed (stopped, not gone: each write waits out its socket
    timeout). The counts kept for a call-back are written one after the other; once one has failed, the caller
    handed to an operator is put through, not held in silence until every write still queued has failed too."""
    code, pin = phone.next_bureau()
    process = redis_server.process
    assert process is not None
    caplog.set_level(logging.WARNING, logger="ivr.call_flow")

    async def run() -> CallRecord:
        gate = Gate()
        script = [press(code + "#"), press(pin + "#"), *phone.counts_script(GOOD_T1), *[SILENCE] * 4]
        peer = AsteriskPeer(script, sounds=CATALOG, hold={f"GET DATA {P.ask_field(phone.election.fields[0])}": gate},
                            io_timeout=30)
        call = asyncio.create_task(peer.call("127.0.0.1", phone.port))
        await asyncio.wait_for(gate.reached.wait(), 10)
        process.send_signal(signal.SIGSTOP)
        gate.opened.set()
        return await call

    try:
        record = asyncio.run(run())
        failed = [r for r in caplog.records if "Redis write failed" in r.getMessage()]
    finally:
        process.send_signal(signal.SIGCONT)
    assert record.ended == "server closed", "the server kept the line after the handoff"
    assert record.outcome == "operator" and record.variables["REMONTEE_HANDOFF"] == "NoInput:envoi"
    assert 1 <= len(failed) < len(phone.election.fields)  # put through at the first failed write


def test_many_calls_at_once_each_get_their_own_receipt(phone: Phone) -> None:
    bureaux = [phone.next_bureau() for _ in range(12)]
    peers = [AsteriskPeer(phone.happy_script(code, pin, GOOD_T1), sounds=CATALOG, callerid=f"06{i:08d}")
             for i, (code, pin) in enumerate(bureaux)]
    records = _concurrently(*(lambda p=p: p.call("127.0.0.1", phone.port) for p in peers))
    assert all(r.outcome == "accepted" and r.missing == [] for r in records)
    assert len({r.receipt for r in records}) == len(records)
    for (code, _), record in zip(bureaux, records, strict=True):
        assert [e.receipt for e in phone.entries(code)] == [record.receipt]


def test_every_input_prompt_is_in_the_catalog(phone: Phone) -> None:
    from ivr.call_flow import flow_inputs

    inputs = flow_inputs(phone.service.line)
    for spec in [inputs.bureau, inputs.pin, *inputs.counts, *inputs.menus]:
        assert spec.prompt in CATALOG
        if not callable(spec.error_prompt):
            assert set(spec.error_prompt) <= CATALOG
    assert all(p.startswith("remontee/ask-confirm") for p in [m.prompt for m in inputs.menus[:4]])


# --- work in threads: the caller hears speech or a hold, never dead air ---

def test_the_caller_is_held_while_the_pin_checkers_are_all_busy(phone: Phone) -> None:
    """A thousand PINs keyed in the same second queue for scrypt: the caller hears a hold, not silence."""
    code, pin = phone.next_bureau()

    def held_calls() -> int:
        return int(phone.service.stats.snapshot()["work"].get("pin", {}).get("held_calls", 0))

    held_before = held_calls()
    release = threading.Event()
    checkers = phone.service.pin_checker
    for _ in range(checkers.max):
        checkers.callInThread(release.wait)  # every PIN checker busy with the callers ahead
    later = threading.Timer(0.3, release.set)
    later.start()
    try:
        # Prompts that take 10 ms to play: 0.3 s of queue is a few dozen holds.
        record = phone.call(phone.happy_script(code, pin, GOOD_T1), answer_delay=0.01)
    finally:
        release.set()
        later.cancel()
    assert record.outcome == "accepted" and [e.receipt for e in phone.entries(code)] == [record.receipt]
    checking = record.played.index(P.CHECKING_PIN)
    first_count = record.played.index(P.ask_field(phone.election.fields[0]))
    held = record.played[checking + 1:first_count]
    assert set(held) == {P.SILENCE, P.HOLD}, held  # short silences, and "Veuillez patienter." every few
    assert held[:HOLD_EVERY - 1] == [P.SILENCE] * (HOLD_EVERY - 1) and held[HOLD_EVERY - 1] == P.HOLD
    assert held_calls() == held_before + 1  # the server knows it held this caller


def test_a_journal_that_refuses_the_return_hands_the_caller_to_an_operator(
        running_reactor: Any, tmp_path: Path, redis_server: RedisServer, demo_registry_files: tuple[Path, Path],
        pins: dict[str, str]) -> None:
    codes = sorted(pins)[:1]
    phones = _phone("primaire-2011-t1", tmp_path, redis_server, demo_registry_files, pins, codes)
    phone = next(phones)
    try:
        with phone.journal.write() as conn:  # a real failure of the insert, as a full disk would give
            conn.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON returns "
                                 "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
        code, pin = phone.next_bureau()
        record = phone.call(phone.happy_script(code, pin, GOOD_T1))
        assert record.outcome == "operator" and record.variables["REMONTEE_HANDOFF"] == "journal-error"
        assert heard(record)[-3:] == [P.SAVING, P.TECHNICAL_ERROR, P.TO_OPERATOR]
        assert "REMONTEE_RECEIPT" not in record.variables and phone.entries(code) == []
        # What was typed is kept: the president calling back is offered to resume.
        partial = CallState(phone.service.redis).load_partial(phone.election.id, code)
        assert partial is not None and partial.counts == GOOD_T1
    finally:
        next(phones, None)


def test_a_bureau_added_to_the_registry_on_the_night_reports_by_phone_without_a_restart(
        running_reactor: Any, tmp_path: Path, redis_server: RedisServer, demo_registry_files: tuple[Path, Path],
        pins: dict[str, str]) -> None:
    """The operator adds a forgotten bureau to the registry file while the server runs (the pen and review parts
    read it again when it changes): its president is let in by phone at once. An edit that does not load keeps
    the registry as it was, and so does the file removed while it is written again."""
    registry_file = tmp_path / "registry.csv"
    registry_file.write_bytes(demo_registry_files[0].read_bytes())
    phones = _phone("primaire-2011-t1", tmp_path, redis_server, (registry_file, demo_registry_files[1]), pins, [])
    phone = next(phones)
    try:
        code, pin = "999001", "4242"
        assert code not in phone.service.registry
        before = phone.call([press(code + "#")] * 3)
        assert said(before, P.BUREAU, *P.digit_files(code), P.UNKNOWN) and before.outcome == "operator"
        with registry_file.open("a") as f:
            f.write(f"{code},Bureau oublié,Paris,75 Paris,900,{hash_pin(pin, n=2**8)},,\n")
        record = phone.call(phone.happy_script(code, pin, GOOD_T1))
        assert record.outcome == "accepted" and [e.status for e in phone.entries(code)] == ["accepted"]
        with registry_file.open("a") as f:
            f.write("75O102,Bureau mal tapé,Paris,75 Paris,900,x,,\n")
        assert code in phone.service.registry
        registry_file.unlink()
        assert code in phone.service.registry
    finally:
        next(phones, None)


def test_a_phone_service_without_its_registry_does_not_start(tmp_path: Path, redis_server: RedisServer) -> None:
    settings = Settings(var_dir=tmp_path, redis_url=redis_server.url, registry=tmp_path / "nowhere.csv")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.csv"):
        PhoneService(settings, relay=False)


def test_a_journal_away_while_the_pin_is_keyed_does_not_end_the_call(
        running_reactor: Any, tmp_path: Path, redis_server: RedisServer, redis: Redis, postgres_server: PostgresServer,
        demo_registry_files: tuple[Path, Path], pins: dict[str, str]) -> None:
    """The journal (PostgreSQL) restarts as a bureau code is keyed: whether the bureau already reported is then
    unknown. The call goes on (the journal compares the return with the bureau's history when it is written)
    rather than ending with no outcome, and the return is journaled once the journal is back."""
    phones = _phone("primaire-2011-t1", tmp_path, redis_server, demo_registry_files, pins, sorted(pins)[:1],
                    db_url=postgres_server.create_database())
    phone = next(phones)
    pg_ctl = [*postgres_server.as_postgres, str(postgres_server.bin / "pg_ctl"), "-D",
              str(postgres_server.directory / "data"), "-w"]
    start = [*pg_ctl, "-l", str(postgres_server.directory / "log"), "-o",
             f"-p {postgres_server.port} -k {postgres_server.directory} -c listen_addresses=127.0.0.1", "start"]
    try:
        code, pin = phone.next_bureau()

        async def run() -> CallRecord:
            away, back = Gate(), Gate()
            peer = AsteriskPeer(phone.happy_script(code, pin, GOOD_T1), sounds=CATALOG, io_timeout=30,
                                hold={f"GET DATA {P.ASK_BUREAU}": away,
                                      f"GET DATA {P.ask_field(phone.election.fields[0])}": back})
            call = asyncio.create_task(peer.call("127.0.0.1", phone.port))
            await asyncio.wait_for(away.reached.wait(), 10)
            await asyncio.to_thread(subprocess.run, [*pg_ctl, "-m", "fast", "stop"], check=True, capture_output=True)
            away.opened.set()
            at_the_counts = asyncio.create_task(back.reached.wait())
            await asyncio.wait({call, at_the_counts}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            at_the_counts.cancel()
            await asyncio.to_thread(subprocess.run, start, check=True, capture_output=True)
            back.opened.set()
            return await call

        try:
            record = asyncio.run(run())
        finally:
            if subprocess.run([*pg_ctl, "status"], capture_output=True).returncode != 0:
                subprocess.run(start, check=True, capture_output=True)
        assert record.ended == "server closed" and record.outcome == "accepted", record.commands[-3:]
        [entry] = phone.entries(code)
        assert entry.status == "accepted" and entry.receipt == record.receipt
    finally:
        next(phones, None)
