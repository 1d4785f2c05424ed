"""The journal of pen uploads: one row per stored upload, its status, and the return it became.

Shares the journal's database (and its durability): a row is committed before the 202.
Statuses: queued → recognized → accepted | review | rejected; `failed` when recognition
itself broke (the raw bytes stay, a supervisor or a retry picks it up).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Column, Connection, Float, Index, Integer, MetaData, String, Table, Text, insert, select, update

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
    Column("bureau", String(10)),  # as given in the upload's form field, if any
    Column("idempotency_key", String(128)),
    Column("status", String(12), nullable=False),
    Column("return_id", String(40)),
    Column("receipt", String(16)),
    Column("error", Text),
    Column("received_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_uploads_idempotency", "station_id", "idempotency_key", unique=True),
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
    metadata.create_all(journal.engine)


def record_upload(conn: Connection, upload: Upload) -> None:
    now = time.time()
    conn.execute(
        insert(uploads).values(
            upload_id=upload.upload_id, sha256=upload.sha256, path=str(upload.path),
            content_type=upload.content_type, size=upload.size, station_id=upload.station_id,
            pen_serial=upload.pen_serial, bureau=upload.bureau, idempotency_key=upload.idempotency_key,
            status=upload.status, received_at=now, updated_at=now,
        )
    )


def get_upload(journal: Journal, upload_id: str) -> Upload | None:
    with journal.read() as conn:
        row = conn.execute(select(uploads).where(uploads.c.upload_id == upload_id)).first()
    if row is None:
        return None
    return Upload(
        upload_id=row.upload_id, sha256=row.sha256, path=Path(row.path), content_type=row.content_type,
        size=row.size, station_id=row.station_id, pen_serial=row.pen_serial, bureau=row.bureau,
        idempotency_key=row.idempotency_key, status=row.status, return_id=row.return_id,
        receipt=row.receipt, error=row.error, received_at=row.received_at,
    )


def set_upload_status(
    conn: Connection, upload_id: str, status: str, *, return_id: str | None = None,
    receipt: str | None = None, error: str | None = None,
) -> None:
    values: dict[str, object] = {"status": status, "updated_at": time.time()}
    if return_id is not None:
        values["return_id"] = return_id
    if receipt is not None:
        values["receipt"] = receipt
    if error is not None:
        values["error"] = error
    conn.execute(update(uploads).where(uploads.c.upload_id == upload_id).values(**values))
