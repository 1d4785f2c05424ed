"""Pen uploads that wait for a supervisor with no return: the OCR could not tell which bureau they are for.

When a page has no readable QR or printed identity, its upload no `bureau` field and its pen a
serial the registry does not know, the `ocr` job (pen_gateway/recognition/job.py) has nothing
to journal: the upload row goes to `review`, the reason in `error`, no return and so no review
item. This module lists those uploads apart from the review items, and a supervisor decides:
- **assign** a registered bureau: in one transaction the row gets the bureau, goes back to
  `queued` and loses its OCR outbox mark, so the pen gateway's OCR relay (pen_gateway/ocr_relay.py)
  enqueues the job again, which reads the page as that bureau's (`upload.bureau`) and journals
  its return, accepted or for review;
- **reject** it, with a reason.

Claims and decisions follow review_items.py: opening an upload claims it for a few minutes (a
conditional UPDATE, in a table of its own, `upload_claims`: the uploads table is the pen
gateway's); a decision is one transaction whose conditional UPDATE (still `review`, still
without a return) lets exactly one decision through, with its audit row.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Float,
    MetaData,
    String,
    Table,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from pen_gateway.uploads import create_tables, uploads
from registry import Registry
from returns_queue.journal import Journal, audit
from review.review_items import CLAIM_SECONDS, Claimable, ItemUnavailable, claimed
from validation.normalize import normalize_bureau_code

ASSIGN, REJECT = "assign_bureau", "reject_upload"  # the audit trail's actions, subject the upload id
UPLOAD_STATUS_LABELS = {
    "queued": "en attente de lecture", "recognized": "lu", "accepted": "accepté", "review": "en revue",
    "rejected": "rejeté", "failed": "lecture en échec",
}

metadata = MetaData()

upload_claims = Table(
    "upload_claims",
    metadata,
    Column("upload_id", String(40), primary_key=True),
    Column("claimed_by", String(64), nullable=False),
    Column("claimed_until", Float, nullable=False),
)


def _waiting() -> Any:
    """What the OCR job leaves when it found no bureau: `review` and no return (with a return, it is a review item)."""
    return and_(uploads.c.status == "review", uploads.c.return_id.is_(None))


def _claimable(username: str, now: float) -> Any:
    return or_(upload_claims.c.claimed_by == username, upload_claims.c.claimed_until <= now)


class BureauRefused(ValueError):
    """The bureau typed is not a registered bureau's code; the message is French."""


@dataclass(frozen=True)
class UploadEntry(Claimable):
    """An upload as the supervisor sees it: where it came from, why it waits, who holds it."""

    upload_id: str
    station_id: str
    pen_serial: str | None
    bureau: str | None
    content_type: str
    status: str
    error: str | None
    return_id: str | None
    received_at: float
    updated_at: float
    claimed_by: str | None
    claimed_until: float | None

    @property
    def waiting(self) -> bool:
        return self.status == "review" and self.return_id is None


@dataclass(frozen=True)
class UploadDecision:
    """The audit row of what a supervisor decided about an upload."""

    actor: str
    action: str
    at: float
    bureau: str | None
    note: str | None


def _query() -> Any:
    return select(
        uploads.c.upload_id, uploads.c.station_id, uploads.c.pen_serial, uploads.c.bureau, uploads.c.content_type,
        uploads.c.status, uploads.c.error, uploads.c.return_id, uploads.c.received_at, uploads.c.updated_at,
        upload_claims.c.claimed_by, upload_claims.c.claimed_until,
    ).select_from(uploads.outerjoin(upload_claims, upload_claims.c.upload_id == uploads.c.upload_id))


def _entry(row: Any) -> UploadEntry:
    return UploadEntry(**row._asdict())


class UnassignedUploads:
    def __init__(self, journal: Journal, claim_seconds: float = CLAIM_SECONDS) -> None:
        self.journal = journal
        self.claim_seconds = claim_seconds
        # The uploads table is the pen gateway's; created here too (the same definition) so that the
        # review UI can start first.
        create_tables(journal)
        metadata.create_all(journal.engine)

    # --- reading ---

    def list(self, limit: int = 100, offset: int = 0) -> tuple[list[UploadEntry], int]:
        """Uploads waiting for a bureau, oldest first, and how many wait in all."""
        with self.journal.read() as conn:
            total = conn.execute(select(func.count()).select_from(uploads).where(_waiting())).scalar_one()
            rows = conn.execute(
                _query().where(_waiting()).order_by(uploads.c.received_at, uploads.c.upload_id)
                .limit(limit).offset(offset)
            ).all()
        return [_entry(r) for r in rows], total

    def count(self) -> int:
        with self.journal.read() as conn:
            return conn.execute(select(func.count()).select_from(uploads).where(_waiting())).scalar_one()

    def get(self, upload_id: str) -> UploadEntry | None:
        with self.journal.read() as conn:
            row = conn.execute(_query().where(uploads.c.upload_id == upload_id)).first()
        return _entry(row) if row else None

    def decision(self, upload_id: str) -> UploadDecision | None:
        """The last decision taken here about the upload, from the audit trail."""
        with self.journal.read() as conn:
            row = conn.execute(
                select(audit).where(audit.c.subject == upload_id, audit.c.action.in_((ASSIGN, REJECT)))
                .order_by(audit.c.id.desc()).limit(1)
            ).first()
        if row is None:
            return None
        after = json.loads(row.after) if row.after else {}
        return UploadDecision(row.actor, row.action, row.at, after.get("bureau"), after.get("note"))

    # --- claims ---

    def claim(self, upload_id: str, username: str) -> UploadEntry:
        """Claim (or extend our claim on) a waiting upload; ItemUnavailable if it is decided or held by another."""
        now = time.time()
        with self.journal.write() as conn:
            waiting = conn.execute(select(uploads.c.upload_id).where(uploads.c.upload_id == upload_id, _waiting()))
            done = waiting.first() is not None and self._take(conn, upload_id, username, now + self.claim_seconds)
        return claimed(done, self.get(upload_id), "envoi inconnu", lambda e: self._why_unavailable(e, username))

    def release(self, upload_id: str, username: str) -> None:
        with self.journal.write() as conn:
            conn.execute(
                delete(upload_claims).where(upload_claims.c.upload_id == upload_id,
                                            upload_claims.c.claimed_by == username)
            )

    @staticmethod
    def _take(conn: Connection, upload_id: str, username: str, until: float) -> bool:
        """Hold the claim until `until` if it is free, ours or run out; False if another supervisor holds it."""
        now = time.time()
        if conn.execute(
            update(upload_claims).where(upload_claims.c.upload_id == upload_id, _claimable(username, now))
            .values(claimed_by=username, claimed_until=until)
        ).rowcount:
            return True
        if conn.execute(select(upload_claims.c.upload_id).where(upload_claims.c.upload_id == upload_id)).first():
            return False
        try:
            with conn.begin_nested():  # two first claims at once: the unique key lets one in
                conn.execute(insert(upload_claims).values(upload_id=upload_id, claimed_by=username,
                                                          claimed_until=until))
        except IntegrityError:
            return False
        return True

    def _why_unavailable(self, entry: UploadEntry, username: str) -> str:
        if not entry.waiting:
            decided = self.decision(entry.upload_id)
            if decided is not None and decided.action == ASSIGN:
                return f"cet envoi a déjà été rattaché au bureau {decided.bureau} par {decided.actor}"
            if decided is not None:
                return f"cet envoi a déjà été rejeté par {decided.actor}"
            return "cet envoi n'attend plus de bureau"
        if entry.held_by_other(username):
            return f"cet envoi est en cours de traitement par {entry.claimed_by}"
        return "cet envoi n'est pas disponible"

    # --- decisions ---

    def _decide(self, conn: Connection, entry: UploadEntry, username: str, values: dict[str, Any]) -> None:
        """Change the upload if it still waits and nobody else holds it, or abort the transaction."""
        now = time.time()
        held = not self._take(conn, entry.upload_id, username, now)  # ours, ending now: released by the decision
        done = 0 if held else conn.execute(
            update(uploads).where(uploads.c.upload_id == entry.upload_id, _waiting())
            .values(updated_at=now, **values)
        ).rowcount
        if done != 1:
            current = conn.execute(_query().where(uploads.c.upload_id == entry.upload_id)).first()
            raise ItemUnavailable(self._why_unavailable(_entry(current), username) if current else "envoi inconnu")
        conn.execute(delete(upload_claims).where(upload_claims.c.upload_id == entry.upload_id))

    def assign(self, upload_id: str, username: str, bureau: str, registry: Registry | None) -> str:
        """Give the upload a registered bureau and send it back to be read; the bureau's code.

        BureauRefused (nothing written) when the code is not a registered bureau's.
        """
        code = normalize_bureau_code(bureau)
        if code is None:
            raise BureauRefused(f"« {bureau.strip()} » n'est pas un code de bureau (des chiffres seulement)")
        if registry is None or registry.get(code) is None:
            raise BureauRefused(f"le bureau {code} est inconnu du registre")
        entry = self.get(upload_id)
        if entry is None:
            raise ItemUnavailable("envoi inconnu")
        with self.journal.write() as conn:
            # `queued` with no OCR outbox mark: the OCR relay enqueues its job again. The old reason goes:
            # the station's status read would otherwise show it beside the new outcome.
            self._decide(conn, entry, username,
                         {"bureau": code, "status": "queued", "ocr_enqueued_at": None, "error": None})
            Journal.record_audit(conn, username, ASSIGN, upload_id, {"bureau": entry.bureau}, {"bureau": code})
        return code

    def reject(self, upload_id: str, username: str, reason: str) -> None:
        """Refuse the upload; a reason is required, for the audit trail and the bureau's callback."""
        reason = reason.strip()
        if not reason:
            raise ValueError("un motif est obligatoire pour rejeter")
        entry = self.get(upload_id)
        if entry is None:
            raise ItemUnavailable("envoi inconnu")
        with self.journal.write() as conn:
            self._decide(conn, entry, username, {"status": "rejected"})
            Journal.record_audit(conn, username, REJECT, upload_id, {"status": entry.status, "error": entry.error},
                                 {"status": "rejected", "note": reason})
