"""The phone channel's operations: its Prometheus listener scraped over HTTP after scripted calls, the call id
on every log line of a call, and context variables kept per call by Twisted's coroutines and our threads.

The FastAGI server runs on a real reactor and TCP port with a real Redis and journal; the scripted
Asterisk peer plays the callers. Counters are process-wide, so each check compares two scrapes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agi_peer import HANGUP, AsteriskPeer, CallRecord, press
from redis import Redis
from rq import Queue
from telemetry_helpers import fields_of, scrape, value
from twisted.internet import defer, reactor, task
from twisted.internet.threads import blockingCallFromThread

from conftest import RedisServer
from ivr import prompts as P
from ivr.server import PhoneService
from settings import Settings
from telemetry import logs

CATALOG = frozenset(P.catalog())
GOOD_T1 = {"votants": 250, "blancs_nuls": 5, "exprimes": 245, "aubry": 70, "baylet": 5, "hollande": 90,
           "montebourg": 40, "royal": 25, "valls": 15}
FIELDS = ("votants", "blancs_nuls", "exprimes", "aubry", "baylet", "hollande", "montebourg", "royal", "valls")


@pytest.fixture(scope="module")
def phone(running_reactor: Any, tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer,
          demo_registry_files: tuple[Path, Path]) -> Iterator[tuple[PhoneService, int, str]]:
    tmp = tmp_path_factory.mktemp("ivr-metrics")
    settings = Settings(var_dir=tmp, redis_url=redis_server.url, db_url=f"sqlite:///{tmp / 'journal.sqlite3'}",
                        election="primaire-2011-t1", registry=demo_registry_files[0], bind="127.0.0.1")
    service = PhoneService(settings, relay=False)  # the outbox keeps what the relay would take: a backlog to see
    port = blockingCallFromThread(reactor, service.start, 0).getHost().port
    listener = service.start_metrics(0)
    yield service, port, listener.url
    blockingCallFromThread(reactor, lambda: defer.ensureDeferred(service.stop(1.0)))
    service.close()


def _happy(code: str, pin: str) -> list[Any]:
    return [press(code + "#"), press(pin + "#"), *[press(f"{GOOD_T1[f]}#") for f in FIELDS], press("1")]


def _call(port: int, script: list[Any], **options: Any) -> CallRecord:
    record = AsteriskPeer(script, sounds=CATALOG, **options).call_sync("127.0.0.1", port)
    assert record.missing == [] and record.ended == "server closed"
    return record


def test_listener_counts_calls_by_outcome_lockouts_and_agi_latency(
    phone: tuple[PhoneService, int, str], pins: dict[str, str], redis: Redis,
) -> None:
    service, port, url = phone
    codes = sorted(pins)[:3]
    before = scrape(url)

    accepted = _call(port, _happy(codes[0], pins[codes[0]]), callerid="0611111111")
    hung_up = _call(port, [press(codes[1] + "#"), HANGUP], callerid="0622222222")
    wrong = "000000" if pins[codes[2]] != "000000" else "111111"
    locked = _call(port, [press(codes[2] + "#"), *[press(wrong + "#")] * 3], callerid="0633333333")
    assert (accepted.outcome, hung_up.caller_hung_up, locked.outcome) == ("accepted", True, "operator")
    Queue("returns", connection=redis).enqueue("os.getcwd")  # a job waiting on `returns`, no worker to take it

    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("remontee_ivr_calls_total", outcome="accepted") == 1
    assert delta("remontee_ivr_calls_total", outcome="hangup") == 1
    assert delta("remontee_ivr_calls_total", outcome="operator") == 1
    assert delta("remontee_ivr_calls_started_total") == 3
    assert value(after, "remontee_ivr_calls_in_progress", default=None) == 0
    assert delta("remontee_ivr_handoffs_total", reason="bureau-locked") == 1
    assert delta("remontee_ivr_pin_checks_total", result="wrong") == 3
    assert delta("remontee_ivr_pin_checks_total", result="right") == 1
    assert delta("remontee_ivr_pin_lockouts_total", kind="bureau") == 1
    assert delta("remontee_ivr_returns_total", status="accepted") == 1
    # One turnaround per command the server sent, split by what preceded it; the buckets add up to the count.
    commands = sum(len(r.commands) for r in (accepted, hung_up, locked))
    counts = {a: delta("remontee_ivr_agi_turnaround_seconds_count", after=a) for a in ("reply", "thread")}
    assert sum(counts.values()) == commands and counts["thread"] >= 3  # at least the PIN checks
    assert delta("remontee_ivr_agi_turnaround_seconds_bucket", after="reply", le="+Inf") == counts["reply"]
    assert delta("remontee_ivr_agi_commands_total") == commands
    # The state this server owns, read from the real journal and Redis at scrape time.
    assert value(after, "remontee_returns_outbox_backlog", default=None) == service.journal.outbox_backlog() >= 1
    assert value(after, "remontee_rq_queued_jobs", default=None, queue="returns") == 1
    assert value(after, "remontee_state_up", default=None, source="redis") == 1
    assert value(after, "remontee_state_up", default=None, source="journal") == 1


def test_every_log_line_of_a_call_carries_its_call_id(
    phone: tuple[PhoneService, int, str], pins: dict[str, str], caplog: pytest.LogCaptureFixture,
) -> None:
    _, port, _ = phone
    caplog.handler.addFilter(logs.ContextFilter("ivr"))  # what configure_logging puts on the real handler
    caplog.set_level(logging.DEBUG)
    code_a, code_b = sorted(pins)[3:5]
    wrong = "000000" if pins[code_b] != "000000" else "111111"
    peers = {
        "1700000000.901": AsteriskPeer(_happy(code_a, pins[code_a]), sounds=CATALOG, uniqueid="1700000000.901",
                                       callerid="0644444444"),
        "1700000000.902": AsteriskPeer([press(code_b + "#"), press(wrong + "#"), HANGUP], sounds=CATALOG,
                                       uniqueid="1700000000.902", callerid="0655555555"),
    }

    async def both() -> list[CallRecord]:
        return list(await asyncio.gather(*(p.call("127.0.0.1", port) for p in peers.values())))

    records = asyncio.run(both())
    assert [r.outcome for r in records] == ["accepted", "hangup"]
    ours = [r for r in caplog.records if r.name.startswith(("ivr", "returns_queue"))]
    assert len(ours) >= 3  # journaled, wrong PIN, hung up
    for record, call_id in zip(ours, fields_of(ours, "call_id"), strict=True):
        assert call_id in peers, f"a line without its call id: {record.name}: {record.getMessage()}"
        message = record.getMessage()
        other = next(c for c in peers if c != call_id)
        assert other not in message, f"{message!r} logged with the other call's id {call_id}"
    said = {(c, r.getMessage()) for r, c in zip(ours, fields_of(ours, "call_id"), strict=True)}
    assert any(c == "1700000000.901" and "journaled" in m for c, m in said)
    assert any(c == "1700000000.902" and "wrong PIN" in m for c, m in said)
    assert any(c == "1700000000.902" and "hung up" in m for c, m in said)


def test_context_variables_stay_with_each_twisted_coroutine() -> None:
    """Twisted runs a coroutine in its own copy of the context (since 21.2): ids bound in one call are never
    seen by another, even when their Deferreds fire interleaved from the reactor's context."""
    clock = task.Clock()
    seen: dict[str, list[str | None]] = {"a": [], "b": []}

    async def call(name: str, delay: float) -> None:
        with logs.bound(call_id=name):
            for _ in range(3):
                await task.deferLater(clock, delay, lambda: None)
                seen[name].append(logs.current().get("call_id"))
                waited: defer.Deferred[None] = defer.Deferred()
                clock.callLater(delay / 2, waited.callback, None)
                await waited
                seen[name].append(logs.current().get("call_id"))

    done = [defer.ensureDeferred(call("a", 1.0)), defer.Deferred.fromCoroutine(call("b", 0.7))]
    for _ in range(20):
        clock.advance(0.25)
    assert all(d.called for d in done)
    for d in done:
        d.addErrback(lambda f: pytest.fail(f.getTraceback()))  # `bound` reset its token in the same context
    assert seen == {"a": ["a"] * 6, "b": ["b"] * 6}
    assert logs.current().get("call_id") is None  # the caller's context never saw them


def test_work_handed_to_a_thread_keeps_the_ids() -> None:
    seen: list[str | None] = []
    with logs.bound(call_id="1700000000.77", bureau="750120"):
        work = logs.in_context(lambda: seen.append(logs.current().get("call_id")))
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    plain = threading.Thread(target=lambda: seen.append(logs.current().get("call_id")))
    plain.start()
    plain.join()
    assert seen == ["1700000000.77", None]
