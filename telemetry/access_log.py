"""gunicorn's access log with the request's ids: the line of an upload's POST carries its upload id.

gunicorn writes the access line after the app has returned, outside the request's log context;
`install_flask` leaves the ids the request bound in the WSGI environ, and this logger class
(gunicorn's `logger_class`) binds them again around that one line.
"""

from __future__ import annotations

from typing import Any

from gunicorn.glogging import Logger

from telemetry import logs


class AccessLogger(Logger):
    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        with logs.bound(**(environ.get(logs.ENVIRON_KEY) or {})):
            super().access(resp, req, environ, request_time)
