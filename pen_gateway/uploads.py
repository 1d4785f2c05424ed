"""The journal of pen uploads: one row per stored upload, its status, and the return it became.

Shares the journal's database (and its durability): a row is committed before the 202.
Statuses: queued → recognized → accepted | review | rejected; `failed` when recognition
itself broke (the raw bytes stay, a supervisor or a retry picks it up). `review` with no return
means no bureau was found: a supervisor assigns one in the review UI and the upload is `queued`
again, its outbox mark cleared (review/unassigned_uploads.py), or rejects it. An upload answered as a
DUPLICATE carries the return it repeats, and takes the supervisor's decision on it with its original.

It is also the OCR outbox: `ocr_enqueued_at` stays NULL until the OCR relay has seen the upload's
`ocr` job on RQ, so an upload acknowledged while Redis was down is enqueued when Redis is back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    update,
)

from returns_queue.journal import Journal

metadata = MetaData()

uploads = Table(
    "uploads",
    metadata,
    Column("upload_id", String(40), primary_key=True),
    Column("sha256", String(64), nullable=False, index=True),
    Column("path", Text, nullable=False),  # content-addressed under var/uploads/
    Column("content_type", String(64), nullable=False),
    Column("size", Integer, nullable=False),
    Column("station_id", String(64), nullable=False),
    Column("pen_serial", String(64)),
    # As given in the upload's form field, if any; or assigned by a supervisor when the page named none (audited).
    Column("bureau", String(10)),
    Column("idempotency_key", String(128)),
    Column("status", String(12), nullable=False),
    Column("return_id", String(40)),
    Column("receipt", String(16)),
    Column("error", Text),
    Column("received_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("ocr_enqueued_at", Float),  # the OCR outbox mark: NULL until its job was seen on RQ
    Index("ix_uploads_idempotency", "station_id", "idempotency_key", unique=True),
    Index("ix_uploads_ocr_outbox", "status", "ocr_enqueued_at", "received_at"),
)


@dataclass(frozen=True)
class Upload:
    upload_id: str
    sha256: str
    path: Path
    content_type: str
    size: int
    station_id: str
    pen_serial: str | None
    bureau: str | None
    idempotency_key: str | None
    status: str
    return_id: str | None
    receipt: str | None
    error: str | None
    received_at: float


def create_tables(journal: Journal) -> None:
    journal.create_tables(metadata)


def upload_values(upload: Upload, now: float | None = None) -> dict[str, object]:
    """The row of a new upload (received now, unless the upload says when)."""
    received = upload.received_at or (time.time() if now is None else now)
    return {
        "upload_id": upload.upload_id, "sha256": upload.sha256, "path": str(upload.path),
        "content_type": upload.content_type, "size": upload.size, "station_id": upload.station_id,
        "pen_serial": upload.pen_serial, "bureau": upload.bureau, "idempotency_key": upload.idempotency_key,
        "status": upload.status, "received_at": received, "updated_at": received,
    }


def record_upload(conn: Connection, upload: Upload) -> None:
    conn.execute(insert(uploads).values(**upload_values(upload)))


def upload_from_row(row: Any) -> Upload:
    return Upload(
        upload_id=row.upload_id, sha256=row.sha256, path=Path(row.path), content_type=row.content_type,
        size=row.size, station_id=row.station_id, pen_serial=row.pen_serial, bureau=row.bureau,
        idempotency_key=row.idempotency_key, status=row.status, return_id=row.return_id,
        receipt=row.receipt, error=row.error, received_at=row.received_at,
    )


def get_upload(journal: Journal, upload_id: str) -> Upload | None:
    with journal.read() as conn:
        row = conn.execute(select(uploads).where(uploads.c.upload_id == upload_id)).first()
    return None if row is None else upload_from_row(row)


def find_by_idempotency_key(conn: Connection, station_id: str, key: str) -> Upload | None:
    """The upload a station already made under `key` (keys are scoped per station)."""
    row = conn.execute(
        select(uploads).where(uploads.c.station_id == station_id, uploads.c.idempotency_key == key)
    ).first()
    return None if row is None else upload_from_row(row)


def ocr_outbox(journal: Journal, received_before: float, limit: int = 500) -> list[str]:
    """Queued uploads whose OCR job the relay has not yet seen on RQ, oldest first."""
    with journal.read() as conn:
        rows = conn.execute(
            select(uploads.c.upload_id)
            .where(uploads.c.status == "queued", uploads.c.ocr_enqueued_at.is_(None),
                   uploads.c.received_at < received_before)
            .order_by(uploads.c.received_at)
            .limit(limit)
        )
        return [r.upload_id for r in rows]


def queued_among(journal: Journal, upload_ids: Sequence[str]) -> set[str]:
    """Those of `upload_ids` that are `queued` now."""
    if not upload_ids:
        return set()
    with journal.read() as conn:
        rows = conn.execute(
            select(uploads.c.upload_id).where(uploads.c.upload_id.in_(list(upload_ids)), uploads.c.status == "queued")
        )
        return {r.upload_id for r in rows}


def mark_ocr_enqueued(journal: Journal, upload_ids: Sequence[str]) -> None:
    if not upload_ids:
        return
    with journal.write() as conn:
        mark_ocr_enqueued_in(conn, upload_ids)


def mark_ocr_enqueued_in(conn: Connection, upload_ids: Sequence[str]) -> None:
    """Inside the caller's transaction."""
    conn.execute(update(uploads).where(uploads.c.upload_id.in_(list(upload_ids))).values(ocr_enqueued_at=time.time()))


def ocr_backlog(journal: Journal) -> int:
    """Uploads acknowledged but not yet seen on the `ocr` queue (the relay's to-do)."""
    with journal.read() as conn:
        return conn.execute(
            select(func.count()).select_from(uploads)
            .where(uploads.c.status == "queued", uploads.c.ocr_enqueued_at.is_(None))
        ).scalar_one()


def set_upload_status(
    conn: Connection, upload_id: str, status: str, *, return_id: str | None = None,
    receipt: str | None = None, error: str | None = None,
) -> None:
    values = _status_values(status, return_id=return_id, receipt=receipt, error=error)
    conn.execute(update(uploads).where(uploads.c.upload_id == upload_id).values(**values))


def _status_values(status: str, **known: str | None) -> dict[str, object]:
    """The columns a new status sets: itself, when, and whichever of return id, receipt and error are known."""
    return {"status": status, "updated_at": time.time(), **{k: v for k, v in known.items() if v is not None}}


def fail_queued_in(conn: Connection, upload_ids: Sequence[str], error: str) -> None:
    """Mark `failed`, with why, those of the uploads still `queued` (one a job has just read stays as it is)."""
    conn.execute(update(uploads).where(uploads.c.upload_id.in_(list(upload_ids)), uploads.c.status == "queued")
                 .values(status="failed", error=error, updated_at=time.time()))


def settle_uploads_of(conn: Connection, decided_return_id: str, status: str, *, return_id: str | None = None,
                      receipt: str | None = None) -> None:
    """Every upload whose figures are in `decided_return_id` takes the decision on it, inside the caller's transaction.

    That is the upload the return was read from and every upload answered as its DUPLICATE (the same
    page docked by another station): each carries the return's id since it was journaled."""
    values = _status_values(status, return_id=return_id, receipt=receipt)
    conn.execute(update(uploads).where(uploads.c.return_id == decided_return_id).values(**values))


def uploads_with_bytes(conn: Connection, sha256: str) -> bool:
    """Whether a journaled upload is stored under `sha256` (the raw file is shared by identical bytes)."""
    return conn.execute(select(uploads.c.upload_id).where(uploads.c.sha256 == sha256).limit(1)).first() is not None
