"""The log line format (JSON objects, or text for a terminal) and Twisted's own events routed to it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from conftest import ROOT
from telemetry import logs


def _record(message: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("ivr.call_flow")
    exc_info = None
    if exc:
        try:
            raise ValueError("scrypt refused")
        except ValueError:
            exc_info = sys.exc_info()
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message, args, exc_info, extra=extra)
    logs.ContextFilter("ivr").filter(record)  # as the handler does, in the logging thread
    return record


def test_a_json_line_carries_the_bound_ids_and_the_traceback() -> None:
    with logs.bound(call_id="1318190400.42", bureau="750120"):
        record = _record("appel %s : « code erroné »\nligne 2", "1318190400.42", exc=True)
    line = json.loads(logs.JsonFormatter("ivr").format(record))
    assert list(line)[:6] == ["ts", "level", "part", "pid", "logger", "msg"]
    assert line["msg"] == "appel 1318190400.42 : « code erroné »\nligne 2"
    assert (line["level"], line["part"], line["logger"]) == ("warning", "ivr", "ivr.call_flow")
    assert (line["call_id"], line["bureau"]) == ("1318190400.42", "750120")
    assert "ValueError: scrypt refused" in line["exc"]
    assert line["ts"].endswith("Z") and "T" in line["ts"]


def test_extra_ids_win_and_an_unbound_line_has_none() -> None:
    with logs.bound(call_id="a"):
        record = _record("errback", **logs.ids(call_id="b", upload_id=None))
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["call_id"] == "b" and "upload_id" not in line
    assert "call_id" not in json.loads(logs.JsonFormatter().format(_record("plain")))


def test_the_text_format_has_the_same_fields() -> None:
    with logs.bound(upload_id="01JUPLOAD", job_id="ocr-01JUPLOAD"):
        record = _record("read")
    text = logs.TextFormatter("worker").format(record)
    assert text.endswith(" WARNING ivr ivr.call_flow: [upload_id=01JUPLOAD job_id=ocr-01JUPLOAD] read")


def test_only_known_fields_can_be_bound() -> None:
    with pytest.raises(KeyError):
        logs.bind(pin="1234")
    with pytest.raises(ValueError):
        logs.formatter("ivr", "xml")


def test_twisted_events_become_json_lines() -> None:
    """In a process of its own: Twisted's global log can be started only once."""
    script = """
import gc
from twisted.internet import defer
from twisted.logger import Logger
from telemetry.logs import bound, configure_logging, route_twisted_logs
configure_logging("ivr", "json")
route_twisted_logs()
with bound(call_id="1318190400.7"):
    Logger(namespace="ivr.test").warn("twisted says {what}", what="hello")
d = defer.fail(RuntimeError("nobody handled me"))
del d
gc.collect()
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(raw) for raw in result.stderr.splitlines() if raw.strip()]
    said = next(line for line in lines if line["msg"] == "twisted says hello")
    assert (said["level"], said["part"], said["call_id"]) == ("warning", "ivr", "1318190400.7")
    unhandled = next(line for line in lines if "nobody handled me" in line["msg"] + line.get("exc", ""))
    assert unhandled["level"] == "critical"  # Twisted logs an unhandled error in a Deferred as critical
