"""Helpers and fixtures for the review UI's tests: an app on the test journal and Redis, accounts, items,
and pen artefacts written by the documented contract (pen_gateway/artefacts.py).

The PNGs are drawn here with zlib alone (seven-segment digits in boxes), so the tests need no imaging
library and the pages have something a person can look at in the screenshots.
"""

from __future__ import annotations

import json
import re
import struct
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis

from forms import Election
from pen_gateway.artefacts import artefact_dir, field_crop_path, page_path, reading_path
from pen_gateway.digits.recognizer import DigitReading
from pen_gateway.recognition.pipeline import field_reading
from pen_gateway.uploads import Upload, create_tables, record_upload, set_upload_status
from registry import Registry
from returns_queue.journal import Journal, Submission
from review import create_app
from settings import Settings
from validation import Return, check_return, new_return

PASSWORDS = {"alice": "alice-mot-de-passe", "bob": "bob-mot-de-passe", "root": "root-mot-de-passe"}
ROLES = {"alice": "supervisor", "bob": "supervisor", "root": "admin"}
# The cheapest Argon2id the library accepts: the tests exercise the logic, production pays the cost.
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
GOOD_T1 = {"votants": 250, "blancs_nuls": 10, "exprimes": 240, "aubry": 60, "baylet": 10, "hollande": 90,
           "montebourg": 40, "royal": 25, "valls": 15}


@dataclass
class ReviewEnv:
    app: Flask
    journal: Journal
    redis: Redis
    registry: Registry
    election: Election
    settings: Settings

    def client(self) -> FlaskClient:
        return self.app.test_client()


def build_env(tmp_path: Path, journal: Journal, redis: Redis, registry_csv: Path, registry: Registry,
              election: Election, redis_url: str, **config: Any) -> ReviewEnv:
    settings = Settings(
        var_dir=tmp_path / "var", redis_url=redis_url, db_url=journal.url, election=election.id,
        registry=registry_csv, secret_key="secret-de-test",
    )
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    app = create_app({"TESTING": True, "SETTINGS": settings, "JOURNAL": journal, "PASSWORD_HASHER": CHEAP_HASHER,
                      **config})
    accounts = app.extensions["remontee_review"].accounts
    for name, password in PASSWORDS.items():
        accounts.add_user(name, password, ROLES[name], "test")
    return ReviewEnv(app, journal, redis, registry, election, settings)


@pytest.fixture
def env(tmp_path: Path, journal: Journal, redis: Redis, redis_server: Any, demo_registry_files: tuple[Path, Path],
        registry: Registry, election_t1: Election) -> Iterator[ReviewEnv]:
    yield build_env(tmp_path, journal, redis, demo_registry_files[0], registry, election_t1, redis_server.url)


@pytest.fixture
def sqlite_journal(tmp_path: Path) -> Iterator[Journal]:
    """For tests whose subject is not the database (the browser, the CLI): SQLite only, to keep the suite fast;
    the logic they drive runs on both databases through `env`."""
    j = Journal(f"sqlite:///{tmp_path / 'journal.sqlite3'}")
    yield j
    j.dispose()


def csrf_token(html: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def login(client: FlaskClient, username: str, password: str | None = None) -> str:
    """Log in through the form; returns a CSRF token valid for the new session."""
    page = client.get("/login")
    token = csrf_token(page.get_data(as_text=True))
    response = client.post("/login", data={"username": username, "password": password or PASSWORDS[username],
                                           "csrf_token": token})
    assert response.status_code == 302, response.get_data(as_text=True)[:500]
    return csrf_token(client.get("/items").get_data(as_text=True))


def bureau_codes(registry: Registry) -> list[str]:
    return sorted(registry.bureaux)


def submit(journal: Journal, election: Election, registry: Registry, bureau: str, counts: Mapping[str, object],
           channel: str = "ivr", source: Mapping[str, str] | None = None, extra_findings: list[Any] = ()) -> Submission:
    """A channel's return, checked and journaled as the channel would."""
    if source is None:
        source = {"call_id": "1318190400.42", "caller_id": "0612345678"} if channel == "ivr" else {
            "upload_id": "01JUPLOAD0000000000000000", "station_id": "station-1", "pen_serial": "AJX-000001"}
    ret: Return = new_return(election, bureau, counts, channel, source)
    return journal.submit(ret, [*check_return(ret, election, registry.get(bureau)), *extra_findings])


def item_id_for(journal: Journal, return_id: str) -> int:
    from sqlalchemy import select

    from returns_queue.journal import review_items

    with journal.read() as conn:
        return conn.execute(select(review_items.c.id).where(review_items.c.return_id == return_id)).scalar_one()


# --- PNG drawing with zlib alone ---

SEGMENTS = {  # a, b, c, d, e, f, g
    0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg",
    9: "abcdfg",
}


class Canvas:
    def __init__(self, width: int, height: int, background: int = 255) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray([background]) * (width * height)

    def rect(self, x: int, y: int, w: int, h: int, value: int = 0) -> None:
        for yy in range(max(0, y), min(self.height, y + h)):
            start = yy * self.width
            self.pixels[start + max(0, x): start + min(self.width, x + w)] = bytes([value]) * (
                min(self.width, x + w) - max(0, x))

    def frame(self, x: int, y: int, w: int, h: int, thickness: int = 2, value: int = 60) -> None:
        self.rect(x, y, w, thickness, value)
        self.rect(x, y + h - thickness, w, thickness, value)
        self.rect(x, y, thickness, h, value)
        self.rect(x + w - thickness, y, thickness, h, value)

    def digit(self, d: int, x: int, y: int, w: int, h: int, stroke: int = 4, value: int = 20) -> None:
        """A handwritten-looking seven-segment digit (slightly slanted) in the box (x, y, w, h)."""
        half = h // 2
        spans = {
            "a": (x, y, w, stroke), "d": (x, y + h - stroke, w, stroke), "g": (x, y + half - stroke // 2, w, stroke),
            "f": (x, y, stroke, half), "b": (x + w - stroke, y, stroke, half),
            "e": (x, y + half, stroke, half), "c": (x + w - stroke, y + half, stroke, half),
        }
        for segment in SEGMENTS[d]:
            sx, sy, sw, sh = spans[segment]
            for row in range(sh):
                slant = (h - (sy - y + row)) // 8  # the top leans right, as a hand writes
                self.rect(sx + slant, sy + row, sw, 1, value)

    def crop(self, x: int, y: int, w: int, h: int) -> Canvas:
        out = Canvas(w, h)
        for row in range(h):
            src = (y + row) * self.width + x
            out.pixels[row * w:(row + 1) * w] = self.pixels[src:src + w]
        return out

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[r * self.width:(r + 1) * self.width]) for r in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 0, 0, 0, 0)  # 8-bit grayscale
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(
            b"IEND", b"")


def write_pen_artefacts(var_dir: Path, upload_id: str, election: Election, bureau: str,
                        written: Mapping[str, int], read: Mapping[str, int | None],
                        confidence: Mapping[str, float], alternatives: Mapping[str, list[tuple[int, int, float]]],
                        suggestions: list[tuple[str, int]]) -> None:
    """The straightened page with `written` figures, one crop per field, and reading.json with `read` values.

    `alternatives[field]` lists (box, from 0 on the left; other digit; probability) the recognizer hesitated on.
    """
    box_w, box_h, gap = 34, 46, 6
    page = Canvas(620, 120 + 62 * len(election.fields))
    page.rect(30, 24, 560, 8, 40)  # the form's header band
    page.rect(30, 44, 220, 6, 120)
    fields: dict[str, Any] = {}
    for i, f in enumerate(election.fields):
        y = 80 + i * 62
        page.rect(40, y + 20, 8 + len(f.label) * 5, 4, 150)  # the printed label, as a grey line
        x0 = 600 - 30 - f.max_digits * (box_w + gap)
        text = f"{written[f.id]:0{f.max_digits}d}"
        for pos, ch in enumerate(text):
            bx = x0 + pos * (box_w + gap)
            page.frame(bx, y, box_w, box_h)
            page.digit(int(ch), bx + 8, y + 7, box_w - 16, box_h - 14)
        value = read.get(f.id)
        # What the recognizer made of each box, right-aligned as the form asks: the boxes before the number are
        # empty (digit None), as the pipeline writes them.
        boxes = ([None] * f.max_digits if value is None else
                 [None] * (f.max_digits - len(str(value))) + [int(ch) for ch in str(value)])
        digits = [DigitReading(digit, confidence.get(f.id, 0.99),
                               tuple((other, p) for (at, other, p) in alternatives.get(f.id, []) if at == pos))
                  for pos, digit in enumerate(boxes)]
        crop = page.crop(x0 - 4, y - 4, f.max_digits * (box_w + gap) + 4, box_h + 8)
        directory = artefact_dir(var_dir, upload_id)
        directory.mkdir(parents=True, exist_ok=True)
        field_crop_path(var_dir, upload_id, f.id).write_bytes(crop.png())
        fields[f.id] = field_reading(f.id, digits).to_dict()
    page_path(var_dir, upload_id).write_bytes(page.png())
    reading_path(var_dir, upload_id).write_text(json.dumps({
        "fields": fields, "suggestions": [list(s) for s in suggestions], "bureau": bureau,
        "election": election.id, "qr": f"remontee:{election.id}:{bureau}",
    }), encoding="utf-8")


def record_stray_upload(journal: Journal, upload_id: str, *, var_dir: Path | None = None, received_at: float = 0.0,
                        station_id: str = "station-3", pen_serial: str | None = "PEN-INCONNU",
                        error: str = "bureau introuvable : ni QR lisible, ni bureau dans l'envoi, "
                                     "ni stylo enregistré") -> None:
    """An upload as the OCR job leaves it when it found no bureau: `review`, the reason in `error`, no return.

    With `var_dir`, its page.png too (a blank form, as the reviewer would see it).
    """
    create_tables(journal)
    with journal.write() as conn:
        record_upload(conn, Upload(upload_id, "0" * 64, Path("/nonexistent"), "application/inkml+xml", 10,
                                   station_id, pen_serial, None, None, "queued", None, None, None,
                                   received_at or time.time()))
        set_upload_status(conn, upload_id, "review", error=error)
    if var_dir is not None:
        page = Canvas(300, 420)
        page.rect(20, 20, 260, 8, 40)
        artefact_dir(var_dir, upload_id).mkdir(parents=True, exist_ok=True)
        page_path(var_dir, upload_id).write_bytes(page.png())
