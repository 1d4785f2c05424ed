"""Structured logs: one JSON object a line, with the call id or the upload id on every line of its work.

Why JSON lines rather than logfmt: every value is escaped by a standard library (a French message
with quotes, a traceback over many lines, a caller name from an old PBX all stay one parseable
line), and every log stack reads it without a custom grammar (journald, Loki's `| json`, jq).
`REMONTEE_LOG_FORMAT=text` gives the same fields as a human-readable line, for a terminal.

What a line carries: `ts` (UTC, ms), `level`, `part` (ivr, pen, review, worker, relay, all),
`pid`, `logger`, `msg`, the fields of the work in progress (`call_id`, `upload_id`, `job_id`,
`return_id`, `bureau`, `request_id`) and `exc` (the traceback) when there is one.

The work in progress is a context variable (`bound(call_id=...)`): asyncio tasks, Twisted
coroutines run by `ensureDeferred` (each in a copy of the context since Twisted 21.2) and the
threads that `in_context` wraps each see their own. A line logged outside that context (a
Deferred's errback, the protocol's own warnings) passes the ids with `extra=ids(call_id=...)`.

`configure_logging(part)` is called once by every entry point: `run_gateway.py` main (so the
IVR, the relay and the RQ workers), and gunicorn's master and workers through `gunicorn_logconfig`.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import logging.config
import os
import time
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

T = TypeVar("T")

# The ids a line may carry, in the order a text line shows them.
FIELDS = ("call_id", "upload_id", "job_id", "return_id", "bureau", "request_id")
FORMATS = ("json", "text")
ENVIRON_KEY = "remontee.log_fields"  # where a WSGI request leaves its ids for the server's access line

_NOTHING: Mapping[str, str] = MappingProxyType({})
_work: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("remontee_log_fields", default=_NOTHING)


def current() -> Mapping[str, str]:
    """The ids of the work in progress in this context."""
    return _work.get()


def bind(**fields: str | None) -> contextvars.Token[Mapping[str, str]]:
    """Add ids to this context's work (None removes one); `unbind(token)` puts the previous ones back."""
    merged = dict(_work.get())
    for key, value in fields.items():
        if key not in FIELDS:
            raise KeyError(f"not a log field: {key!r} (known: {', '.join(FIELDS)})")
        if value is None or value == "":
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    return _work.set(merged)


def unbind(token: contextvars.Token[Mapping[str, str]]) -> None:
    _work.reset(token)


@contextlib.contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def ids(**fields: str | None) -> dict[str, Any]:
    """`extra=` for a line logged outside the work's context: `log.warning(..., extra=ids(call_id=c))`."""
    return {f"remontee_{k}": str(v) for k, v in fields.items() if k in FIELDS and v}


def in_context(f: Callable[..., T]) -> Callable[..., T]:
    """`f` run in a copy of the caller's context: for work handed to a thread, whose lines keep the ids."""
    context = contextvars.copy_context()

    def run(*args: Any, **kwargs: Any) -> T:
        return context.copy().run(f, *args, **kwargs)

    return run


def record_fields(record: logging.LogRecord) -> dict[str, str]:
    """The ids of a record: the context's when it was made, overridden by `extra=ids(...)`."""
    captured = getattr(record, "remontee_fields", None)  # by ContextFilter, in the thread that logged
    fields = dict(_work.get() if captured is None else captured)
    for key in FIELDS:
        value = getattr(record, f"remontee_{key}", None)
        if value:
            fields[key] = value
    return fields


class ContextFilter(logging.Filter):
    """Captures the context's ids on the record where it is made (a handler may format it elsewhere)."""

    def __init__(self, part: str = "") -> None:
        super().__init__()
        self.part = part

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "remontee_fields"):
            record.remontee_fields = dict(_work.get())
        if not hasattr(record, "remontee_part"):
            record.remontee_part = self.part
        return True


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object a line; keys in a fixed order so lines line up when read raw."""

    def __init__(self, part: str = "") -> None:
        super().__init__()
        self.part = part

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "part": getattr(record, "remontee_part", "") or self.part,
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(record_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The same fields for a person at a terminal: `ts LEVEL part logger [call_id=…] message`."""

    def __init__(self, part: str = "") -> None:
        super().__init__()
        self.part = part

    def format(self, record: logging.LogRecord) -> str:
        fields = record_fields(record)
        tags = " ".join(f"{k}={fields[k]}" for k in FIELDS if k in fields)
        part = getattr(record, "remontee_part", "") or self.part
        text = f"{_timestamp(record)} {record.levelname} {part} {record.name}: " + (f"[{tags}] " if tags else "")
        text += record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def formatter(part: str, log_format: str = "json") -> logging.Formatter:
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: one of {', '.join(FORMATS)}")
    return JsonFormatter(part) if log_format == "json" else TextFormatter(part)


def logging_dict(part: str, log_format: str = "json", level: str = "INFO") -> dict[str, Any]:
    """The `logging.config.dictConfig` of a part: one handler on standard error, on the root logger.

    gunicorn takes it as `logconfig_dict` (its own `gunicorn.error` and `gunicorn.access` loggers
    then write through it too)."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: one of {', '.join(FORMATS)}")
    handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "remontee",
               "filters": ["context"]}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter, "part": part}},
        "formatters": {"remontee": {"()": JsonFormatter if log_format == "json" else TextFormatter, "part": part}},
        "handlers": {"stderr": handler},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            # gunicorn's loggers keep their own handlers otherwise; through ours they are lines like the others.
            "gunicorn.error": {"level": level, "handlers": [], "propagate": True},
            "gunicorn.access": {"level": level, "handlers": [], "propagate": True},
        },
    }


def configure_logging(part: str, log_format: str | None = None, level: str | None = None) -> None:
    """Install the handler on the root logger (again when called again, as run_gateway.py main may be)."""
    log_format = log_format or os.environ.get("REMONTEE_LOG_FORMAT") or "json"
    level = level or os.environ.get("REMONTEE_LOG_LEVEL") or "INFO"
    logging.config.dictConfig(logging_dict(part, log_format, level))
    logging.captureWarnings(True)


def route_twisted_logs() -> None:
    """Twisted's own events (an unhandled error in a Deferred, a listening port) through stdlib logging.

    Without it they would stay in Twisted's start-up buffer and never be seen."""
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    globalLogBeginner.beginLoggingTo([STDLibLogObserver()], discardBuffer=False, redirectStandardIO=False)
