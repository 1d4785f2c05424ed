"""A docking station in a few lines: signed uploads and status reads against the pen gateway over real HTTP.

Used by the pen API tests, the upload benchmark and the election-night simulation:

    client = PenClient("http://127.0.0.1:8080", "station-7", secret)
    answer = client.upload(png_bytes, "image/png", pen_serial="PEN-0042", bureau="750120",
                           idempotency_key="page-1")
    answer.status, answer.json  # 202, {"upload_id": ..., "status": "queued", "status_url": ...}
    client.status(answer.json["upload_id"]).json["status"]

`signed_upload(...)` builds the same body and headers for Flask's test client.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageDraw

from pen_gateway.signing import signature_headers


@dataclass
class Answer:
    status: int
    json: Any
    headers: dict[str, str] = field(default_factory=dict)


def encode_multipart(fields: dict[str, str], filename: str, content_type: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with `fields` and the page in the part `file`; returns (body, Content-Type)."""
    boundary = f"remontee-{os.urandom(12).hex()}"
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n".encode()
    )
    parts.append(data)
    parts.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def signed_upload(station_id: str, secret: str, data: bytes, content_type: str, pen_serial: str,
                  bureau: str | None = None, *, idempotency_key: str | None = None, timestamp: int | None = None,
                  station_field: str | None = None, filename: str = "page") -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a signed upload, ready to send."""
    fields = {"station_id": station_id if station_field is None else station_field, "pen_serial": pen_serial}
    if bureau is not None:
        fields["bureau"] = bureau
    body, multipart_type = encode_multipart(fields, filename, content_type, data)
    headers = {"Content-Type": multipart_type, **signature_headers(station_id, secret, body, timestamp)}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return body, headers


class PenClient:
    """One docking station talking to the gateway over one keep-alive HTTP connection (not thread-safe)."""

    def __init__(self, base_url: str, station_id: str, secret: str, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.station_id, self.secret, self.timeout = station_id, secret, timeout
        self._conn: http.client.HTTPConnection | None = None
        self._last_read: dict[str, int] = {}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def send(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=headers)
                response = self._conn.getresponse()
                raw = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The server closed an idle keep-alive connection: one fresh try on a new one.
                self.close()
                if attempt == 2:
                    raise
                continue
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            ctype = response.getheader("Content-Type", "")
            payload = json.loads(raw) if ctype.startswith("application/json") and raw else raw
            return Answer(response.status, payload, {k.lower(): v for k, v in response.getheaders()})
        raise AssertionError("unreachable")

    def upload(self, data: bytes, content_type: str, pen_serial: str, bureau: str | None = None, *,
               idempotency_key: str | None = None, timestamp: int | None = None,
               station_field: str | None = None) -> Answer:
        body, headers = signed_upload(self.station_id, self.secret, data, content_type, pen_serial, bureau,
                                      idempotency_key=idempotency_key, timestamp=timestamp,
                                      station_field=station_field)
        return self.send("POST", "/api/v1/uploads", body, headers)

    def status(self, upload_id: str, timestamp: int | None = None) -> Answer:
        path = f"/api/v1/uploads/{upload_id}"
        if timestamp is None:
            # Reads of one upload sign an empty body: two in the same second would carry the same
            # signature (a replay), so a fast poller signs with the next second (within the window).
            timestamp = max(int(time.time()), self._last_read.get(path, 0) + 1)
            self._last_read[path] = timestamp
        headers = signature_headers(self.station_id, self.secret, b"", timestamp)
        return self.send("GET", path, b"", headers)

    def wait_for_status(self, upload_id: str, wanted: set[str], timeout: float = 30.0) -> Answer:
        deadline = time.monotonic() + timeout
        while True:
            answer = self.status(upload_id)
            if answer.status != 200 or answer.json["status"] in wanted or time.monotonic() > deadline:
                return answer
            time.sleep(0.2)


# --- pages to upload ---

def scribbled_page(width: int = 2480, height: int = 3508, strokes: int = 1500, seed: int = 0,
                   fmt: str = "PNG") -> bytes:
    """A white page with dark pen strokes (a stand-in scan; size grows with `strokes`)."""
    rng = np.random.default_rng(seed)
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    for _ in range(strokes):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        dx, dy = int(rng.integers(-40, 40)), int(rng.integers(-40, 40))
        draw.line([(x, y), (x + dx, y + dy)], fill=int(rng.integers(0, 110)), width=3)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"dpi": (300, 300)} if fmt in ("PNG", "TIFF") else {}))
    return buffer.getvalue()


def inkml_page(strokes: list[list[tuple[float, float]]], units: str | None = "mm") -> bytes:
    """An InkML page whose X/Y channels are in `units` (None: no units declared, i.e. millimetres)."""
    unit_attr = f' units="{units}"' if units else ""
    traces = "\n".join(
        "  <trace>" + ", ".join(f"{x:g} {y:g} {i * 10}" for i, (x, y) in enumerate(points)) + "</trace>"
        for points in strokes
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<ink xmlns="http://www.w3.org/2003/InkML">\n'
        "  <traceFormat>\n"
        f'    <channel name="X" type="decimal"{unit_attr}/>\n'
        f'    <channel name="Y" type="decimal"{unit_attr}/>\n'
        '    <channel name="T" type="integer" units="ms"/>\n'
        "  </traceFormat>\n"
        f"{traces}\n"
        "</ink>\n"
    ).encode()


# --- a real HTTP server around a Flask app, for tests ---

class LiveServer:
    """The app behind Werkzeug's threaded server on a free loopback port, in a thread (tests only)."""

    def __init__(self, app: Any) -> None:
        from werkzeug.serving import make_server

        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.server.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="pen-live-server", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
