"""Pen uploads that wait for a supervisor with no return: the OCR could not tell which bureau they are for,
or could not read them at all.

When a page has no readable QR or printed identity, its upload no `bureau` field and its pen a
serial the registry does not know, the `ocr` job (pen_gateway/recognition/job.py) has nothing
to journal: the upload row goes to `review`, the reason in `error`, no return and so no review
item. This module lists those uploads apart from the review items, and a supervisor decides:
- **assign** a registered bureau: in one transaction the row gets the bureau, goes back to
  `queued` and loses its OCR outbox mark, so the pen gateway's OCR relay (pen_gateway/ocr_relay.py)
  enqueues the job again, which reads the page as that bureau's (`upload.bureau`) and journals
  its return, accepted or for review;
- **reject** it, with a reason.

When recognition itself broke (the job raised: stored bytes that no longer match their hash, an
artefact directory that stayed full, a bug), the row is `failed`, the exception in `error`, and
RQ's retries did not mend it. Reading it again would likely fail again, so a supervisor reads the
page (or the station's paper) and either **enters the counts by hand** with the bureau: one journal
transaction holds the return (channel `pen`, the upload and the supervisor in its source, checked
like any return: a figure that breaks the form's arithmetic is refused, a conflict with the phone
becomes a review item), the upload row's new status and return, and the audit row; or **rejects** it.

Claims and decisions follow review_items.py: opening an upload claims it for a few minutes (a
conditional UPDATE, in a table of its own, `upload_claims`: the uploads table is the pen
gateway's); a decision is one transaction whose conditional UPDATE (still `review`, still
without a return) lets exactly one decision through, with its audit row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
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

from forms import load_election
from pen_gateway.uploads import create_tables, uploads
from registry import Registry
from returns_queue.journal import Journal, Submission, audit
from review.review_items import CLAIM_SECONDS, Claimable, ItemUnavailable, audit_view, claimed
from validation import Finding, Return, check_return, new_return, utc_now
from validation.normalize import normalize_bureau_code

# The audit trail's actions, subject the upload id.
ASSIGN, REJECT, ENTER = "assign_bureau", "reject_upload", "enter_upload_counts"
# The upload's status once the return typed for it is journaled (as the OCR job maps its own).
UPLOAD_STATUS_FOR = {"accepted": "accepted", "review": "review", "rejected": "rejected"}
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


def _unassigned() -> Any:
    """What the OCR job leaves when it found no bureau: `review` and no return (with a return, it is a review item)."""
    return and_(uploads.c.status == "review", uploads.c.return_id.is_(None))


def _failed() -> Any:
    """What the OCR job leaves when recognition itself broke."""
    return uploads.c.status == "failed"


def _waiting() -> Any:
    """Every upload a supervisor has to decide about."""
    return or_(_unassigned(), _failed())


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
        return (self.status == "review" and self.return_id is None) or self.failed

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass(frozen=True)
class UploadDecision:
    """The audit row of what a supervisor decided about an upload."""

    actor: str
    action: str
    at: float
    bureau: str | None
    note: str | None
    return_id: str | None = None
    receipt: str | None = None


@dataclass
class HandEntry:
    """What came of counts typed for a failed upload: the journal's answer, or the findings that stopped it."""

    ret: Return
    findings: list[Finding] = field(default_factory=list)
    submission: Submission | None = None


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
        journal.create_tables(metadata)

    # --- reading ---

    def list(self, limit: int = 100, offset: int = 0, *, failed: bool = False) -> tuple[list[UploadEntry], int]:
        """Uploads waiting for a bureau (or, `failed`, whose recognition broke), oldest first, and how many in all."""
        which = _failed() if failed else _unassigned()
        with self.journal.read() as conn:
            total = conn.execute(select(func.count()).select_from(uploads).where(which)).scalar_one()
            rows = conn.execute(
                _query().where(which).order_by(uploads.c.received_at, uploads.c.upload_id)
                .limit(limit).offset(offset)
            ).all()
        return [_entry(r) for r in rows], total

    def count(self, *, failed: bool = False) -> int:
        """How many uploads wait for a bureau (or, `failed`, for their counts typed by hand)."""
        with self.journal.read() as conn:
            return conn.execute(
                select(func.count()).select_from(uploads).where(_failed() if failed else _unassigned())
            ).scalar_one()

    def get(self, upload_id: str) -> UploadEntry | None:
        with self.journal.read() as conn:
            row = conn.execute(_query().where(uploads.c.upload_id == upload_id)).first()
        return _entry(row) if row else None

    def decision(self, upload_id: str) -> UploadDecision | None:
        """The last decision taken here about the upload, from the audit trail."""
        with self.journal.read() as conn:
            row = conn.execute(
                select(audit).where(audit.c.subject == upload_id, audit.c.action.in_((ASSIGN, REJECT, ENTER)))
                .order_by(audit.c.id.desc()).limit(1)
            ).first()
        if row is None:
            return None
        after = json.loads(row.after) if row.after else {}
        return UploadDecision(row.actor, row.action, row.at, after.get("bureau"), after.get("note"),
                              after.get("return_id"), after.get("receipt"))

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
            if decided is not None and decided.action == ENTER:
                return (f"les chiffres de cet envoi ont déjà été saisis pour le bureau {decided.bureau} "
                        f"par {decided.actor}")
            if decided is not None:
                return f"cet envoi a déjà été rejeté par {decided.actor}"
            return f"cet envoi n'attend plus de décision ({UPLOAD_STATUS_LABELS.get(entry.status, entry.status)})"
        if entry.held_by_other(username):
            return f"cet envoi est en cours de traitement par {entry.claimed_by}"
        return "cet envoi n'est pas disponible"

    # --- decisions ---

    def _decide(self, conn: Connection, entry: UploadEntry, username: str, values: dict[str, Any],
                waiting: Any = None) -> None:
        """Change the upload if it still waits (`waiting`: how) and nobody else holds it, or abort the transaction."""
        now = time.time()
        held = not self._take(conn, entry.upload_id, username, now)  # ours, ending now: released by the decision
        done = 0 if held else conn.execute(
            update(uploads).where(uploads.c.upload_id == entry.upload_id, _waiting() if waiting is None else waiting)
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
        code = _registered(bureau, registry)
        entry = self.get(upload_id)
        if entry is None:
            raise ItemUnavailable("envoi inconnu")
        with self.journal.write() as conn:
            # `queued` with no OCR outbox mark: the OCR relay enqueues its job again. The old reason goes:
            # the station's status read would otherwise show it beside the new outcome.
            self._decide(conn, entry, username,
                         {"bureau": code, "status": "queued", "ocr_enqueued_at": None, "error": None}, _unassigned())
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

    def enter_counts(self, upload_id: str, username: str, bureau: str, raw_counts: Mapping[str, object],
                     registry: Registry | None, election_id: str, note: str = "") -> HandEntry:
        """Journal the counts a supervisor typed for a failed upload, as its return; what the journal said.

        BureauRefused (nothing written) for a bureau the registry does not know; findings (nothing
        written) when the figures break the form's arithmetic or are unreadable; ItemUnavailable when
        the upload is no longer failed (a retry read it meanwhile) or another supervisor holds it.
        """
        code = _registered(bureau, registry)
        assert registry is not None
        entry = self.get(upload_id)
        if entry is None:
            raise ItemUnavailable("envoi inconnu")
        if not entry.failed or entry.held_by_other(username):
            raise ItemUnavailable(self._why_unavailable(entry, username))
        election = load_election(election_id)
        source = {"upload_id": upload_id, "station_id": entry.station_id, "supervisor": username}
        if entry.pen_serial:
            source["pen_serial"] = entry.pen_serial
        ret = new_return(election, code, raw_counts, "pen", source, received_at=utc_now(entry.received_at))
        findings = check_return(ret, election, registry.get(code))
        if findings:
            return HandEntry(ret, findings)
        note = note.strip()

        def also(conn: Connection, submission: Submission) -> None:
            status = UPLOAD_STATUS_FOR.get(submission.status, "review")
            # The exception goes from the row as the assignment's reason does (the audit row keeps it): the
            # station's status read would otherwise show it beside the return.
            self._decide(conn, entry, username, {"bureau": code, "status": status, "return_id": submission.return_id,
                                                 "receipt": submission.receipt, "error": None}, _failed())
            after = {**audit_view(ret), "receipt": submission.receipt, "status": submission.status}
            if note:
                after["note"] = note
            Journal.record_audit(conn, username, ENTER, upload_id,
                                 {"status": entry.status, "error": entry.error, "bureau": entry.bureau}, after)

        return HandEntry(ret, [], self.journal.submit(ret, (), also=also))


def _registered(bureau: str, registry: Registry | None) -> str:
    """The code of the registered bureau typed, or BureauRefused."""
    code = normalize_bureau_code(bureau)
    if code is None:
        raise BureauRefused(f"« {bureau.strip()} » n'est pas un code de bureau (des chiffres seulement)")
    if registry is None or registry.get(code) is None:
        raise BureauRefused(f"le bureau {code} est inconnu du registre")
    return code
