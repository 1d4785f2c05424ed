"""Review items: the queue supervisors work through, claims, and the two decisions (approve, reject).

A review item is a row of the journal's `review_items` joined to the return it is about.
Opening an item claims it for a few minutes; a claim is a conditional UPDATE, so two
supervisors never both hold one. A decision is one journal transaction: the item's state
changes only if it is still open (otherwise the whole transaction, the corrected return
included, is rolled back: approving twice yields one return), the original return's status
changes, and the audit row is written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Connection, and_, func, or_, select, update

from forms import Election, load_election
from registry import Registry
from returns_queue.journal import Journal, Submission, latest_accepted_row, returns
from returns_queue.journal import review_items as items_table
from validation import Finding, Reason, Return, check_return, new_return

CLAIM_SECONDS = 5 * 60
CHANNEL_LABELS = {"ivr": "téléphone", "pen": "stylo numérique", "review": "correction"}
REASON_LABELS = {
    "UNKNOWN_BUREAU": "bureau inconnu",
    "TOTAL_MISMATCH": "total incohérent",
    "SUM_MISMATCH": "somme des voix incohérente",
    "OVER_REGISTERED": "plus de votants que d'inscrits",
    "LOW_CONFIDENCE": "lecture incertaine",
    "UNREADABLE": "illisible ou absent",
    "CHANNEL_CONFLICT": "conflit entre canaux",
    "CORRECTION": "correction d'un retour accepté",
    "DUPLICATE": "doublon",
}
RETURN_STATUS_LABELS = {
    "accepted": "accepté", "review": "en revue", "duplicate": "doublon", "rejected": "rejeté", "corrected": "corrigé",
}
STATE_LABELS = {"open": "à traiter", "approved": "approuvé", "rejected": "rejeté"}
# Items that compare the return with another one of the same bureau.
COMPARED = (Reason.CHANNEL_CONFLICT, Reason.CORRECTION)


def readable_message(finding: Finding, labels: Mapping[str, str]) -> str:
    """A finding's message as a supervisor reads it. A comparison (CHANNEL_CONFLICT, CORRECTION) names the other
    return's channel and the counts that differ by the journal's codes (« par ivr (aubry, hollande) »): here they are
    the channel's name and the counts' printed labels (`labels`, by field id), as everywhere else on the page."""
    fields, channel = finding.details.get("fields"), finding.details.get("channel")
    if finding.code not in COMPARED or not isinstance(fields, list):
        return finding.message
    text = finding.message
    if isinstance(channel, str):
        text = text.replace(f" par {channel} (", f" par {CHANNEL_LABELS.get(channel, channel)} (", 1)
    if fields:
        text = text.replace(f"({', '.join(fields)}", f"({', '.join(labels.get(f, f) for f in fields)}", 1)
    return text


class ItemUnavailable(Exception):
    """The item cannot be acted on by this supervisor now; the message is French."""


class AcceptedMeanwhile(ItemUnavailable):
    """The bureau's latest accepted return is not the one the supervisor was shown: the approval would replace
    figures nobody compared it with (a return accepted since the page was opened, or another bureau's)."""


C = TypeVar("C", bound="Claimable")


class Claimable:
    """What supervisors claim by opening its page (a review item, an upload): who holds it, until when."""

    claimed_by: str | None
    claimed_until: float | None

    def held_by_other(self, username: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return (
            self.claimed_by is not None
            and self.claimed_by != username
            and self.claimed_until is not None
            and self.claimed_until > now
        )


def claimed(done: bool, entry: C | None, unknown: str, why: Callable[[C], str]) -> C:
    """After a claim: the entry as it is now, or ItemUnavailable saying why the claim did not go through."""
    if entry is None:
        raise ItemUnavailable(unknown)
    if not done:
        raise ItemUnavailable(why(entry))
    return entry


@dataclass(frozen=True)
class QueueEntry(Claimable):
    """A line of the queue: what the list shows, without the return's payload (parsing it costs ~1 ms)."""

    id: int
    return_id: str
    election: str
    bureau: str
    channel: str
    reasons: tuple[str, ...]
    created_at: float
    state: str
    claimed_by: str | None
    claimed_until: float | None
    decided_by: str | None
    decided_at: float | None
    decision_note: str | None
    result_return_id: str | None


@dataclass(frozen=True)
class ReviewItem(QueueEntry):
    """An item with its return and the findings that sent it here."""

    ret: Return
    findings: tuple[Finding, ...]
    receipt: str | None
    return_status: str

    @property
    def compared_return_id(self) -> str | None:
        """The other return a CHANNEL_CONFLICT or CORRECTION is about."""
        for f in self.findings:
            if f.code in COMPARED and f.details.get("return_id"):
                return str(f.details["return_id"])
        return None

    def field_findings(self) -> dict[str, list[Finding]]:
        by_field: dict[str, list[Finding]] = {}
        for f in self.findings:
            if f.field:
                by_field.setdefault(f.field, []).append(f)
        return by_field


@dataclass(frozen=True)
class ItemFilter:
    state: str | None = "open"  # None: every state
    reason: str | None = None
    channel: str | None = None
    bureaux: Collection[str] | None = None  # a department, as the registry's codes


@dataclass
class Approval:
    """What came of an approval: the journal's answer, or the findings that stopped it."""

    ret: Return
    findings: list[Finding] = field(default_factory=list)
    submission: Submission | None = None


def _entry_fields(row: Any) -> dict[str, Any]:
    return {
        "id": row.id, "return_id": row.return_id, "election": row.election, "bureau": row.bureau,
        "channel": row.channel, "reasons": tuple(json.loads(row.reasons)), "created_at": row.created_at,
        "state": row.state, "claimed_by": row.claimed_by, "claimed_until": row.claimed_until,
        "decided_by": row.decided_by, "decided_at": row.decided_at, "decision_note": row.decision_note,
        "result_return_id": row.result_return_id,
    }


def _item(row: Any) -> ReviewItem:
    ret = Return.from_dict(json.loads(row.payload))
    return ReviewItem(
        **_entry_fields(row),
        ret=ret.with_status(row.status),
        findings=tuple(Finding.from_dict(f) for f in json.loads(row.findings)),
        receipt=row.receipt,
        return_status=row.status,
    )


def _joined() -> Any:
    return select(items_table, returns.c.payload, returns.c.findings, returns.c.receipt, returns.c.status).join(
        returns, returns.c.return_id == items_table.c.return_id
    )


def _claimable(username: str, now: float) -> Any:
    """The item is free, already ours, or its claim has run out."""
    return or_(
        items_table.c.claimed_by.is_(None),
        items_table.c.claimed_by == username,
        items_table.c.claimed_until.is_(None),
        items_table.c.claimed_until <= now,
    )


def audit_view(ret: Return) -> dict[str, Any]:
    """A return as the audit trail keeps it: enough to know which figures were replaced by which."""
    return {"return_id": ret.return_id, "bureau": ret.bureau, "channel": ret.channel, "counts": dict(ret.counts)}


class ReviewItems:
    def __init__(self, journal: Journal, claim_seconds: float = CLAIM_SECONDS) -> None:
        self.journal = journal
        self.claim_seconds = claim_seconds

    # --- reading ---

    def _where(self, query: Any, filters: ItemFilter) -> Any:
        if filters.state:
            query = query.where(items_table.c.state == filters.state)
        if filters.reason:
            # `reasons` is a JSON list of codes; a quoted code cannot match a longer one.
            query = query.where(items_table.c.reasons.like(f'%"{Reason(filters.reason)}"%'))
        if filters.channel:
            query = query.where(items_table.c.channel == filters.channel)
        if filters.bureaux is not None:
            query = query.where(items_table.c.bureau.in_(sorted(filters.bureaux)))
        return query

    def list(self, filters: ItemFilter, limit: int = 100, offset: int = 0) -> tuple[list[QueueEntry], int]:
        """Items matching `filters`, oldest first, and how many match in all."""
        query = self._where(select(items_table), filters).order_by(items_table.c.created_at, items_table.c.id)
        count = self._where(select(func.count()).select_from(items_table), filters)
        with self.journal.read() as conn:
            total = conn.execute(count).scalar_one()
            rows = conn.execute(query.limit(limit).offset(offset)).all()
        return [QueueEntry(**_entry_fields(r)) for r in rows], total

    def get(self, item_id: int) -> ReviewItem | None:
        with self.journal.read() as conn:
            row = conn.execute(_joined().where(items_table.c.id == item_id)).first()
        return _item(row) if row else None

    def counts(self) -> dict[str, int]:
        """Open items, and how many of them are claimed now."""
        now = time.time()
        with self.journal.read() as conn:
            open_ = conn.execute(
                select(func.count()).select_from(items_table).where(items_table.c.state == "open")
            ).scalar_one()
            claimed = conn.execute(
                select(func.count())
                .select_from(items_table)
                .where(items_table.c.state == "open", items_table.c.claimed_until > now)
            ).scalar_one()
        return {"open": open_, "claimed": claimed}

    # --- claims ---

    def claim(self, item_id: int, username: str) -> ReviewItem:
        """Claim (or extend our claim on) an open item; ItemUnavailable if another supervisor holds it."""
        now = time.time()
        with self.journal.write() as conn:
            done = conn.execute(
                update(items_table)
                .where(items_table.c.id == item_id, items_table.c.state == "open", _claimable(username, now))
                .values(claimed_by=username, claimed_until=now + self.claim_seconds)
            ).rowcount
        return claimed(bool(done), self.get(item_id), "élément inconnu", lambda i: self._why_unavailable(i, username))

    def release(self, item_id: int, username: str) -> None:
        with self.journal.write() as conn:
            conn.execute(
                update(items_table)
                .where(items_table.c.id == item_id, items_table.c.claimed_by == username)
                .values(claimed_by=None, claimed_until=None)
            )

    @staticmethod
    def _why_unavailable(item: ReviewItem, username: str) -> str:
        if item.state != "open":
            who = f" par {item.decided_by}" if item.decided_by else ""
            return f"cet élément a déjà été {STATE_LABELS.get(item.state, item.state)}{who}"
        if item.held_by_other(username):
            return f"cet élément est en cours de traitement par {item.claimed_by}"
        return "cet élément n'est pas disponible"

    def _close(self, conn: Connection, item: ReviewItem, username: str, values: Mapping[str, Any]) -> None:
        """Close the item if it is still open and not held by someone else, or abort the transaction."""
        now = time.time()
        done = conn.execute(
            update(items_table)
            .where(and_(items_table.c.id == item.id, items_table.c.state == "open", _claimable(username, now)))
            .values(decided_by=username, decided_at=now, claimed_by=None, claimed_until=None, **values)
        ).rowcount
        if done != 1:
            current = conn.execute(_joined().where(items_table.c.id == item.id)).first()
            raise ItemUnavailable(self._why_unavailable(_item(current), username) if current else "élément inconnu")

    # --- decisions ---

    def approve(
        self,
        item_id: int,
        username: str,
        raw_counts: Mapping[str, object],
        registry: Registry | None,
        note: str = "",
        bureau: str | None = None,
        seen_accepted: str | None = None,
    ) -> Approval:
        """Journal a `review` return with the supervisor's figures, superseding the item's return.

        Nothing is written unless every check passes (arithmetic, registry, digits); then the
        return, the item's closing, the original's new status and the audit row are one transaction.
        `seen_accepted`: the return id of the bureau's latest accepted return as the page showed it
        ("" for none); if another is the latest when the approval commits, AcceptedMeanwhile is raised
        and nothing is written. None skips that check (a caller that shows no page).
        """
        item = self.get(item_id)
        if item is None:
            raise ItemUnavailable("élément inconnu")
        if item.state != "open" or item.held_by_other(username):
            raise ItemUnavailable(self._why_unavailable(item, username))
        election: Election = load_election(item.election)
        bureau_code = (bureau or item.bureau).strip()
        # The consolidation keeps the bureau's return whose id sorts last: this one must sort after the figures it
        # replaces, though another process made their id, by a wall clock NTP may have stepped back since.
        known = self.journal.latest_accepted(election.id, bureau_code)
        after = max(item.return_id, known.return_id if known else "")
        ret = new_return(election, bureau_code, raw_counts, "review", {"supervisor": username},
                         supersedes=item.return_id, after=after)
        findings = check_return(ret, election, registry.get(bureau_code) if registry is not None else None)
        if findings:
            return Approval(ret, findings)
        note = note.strip()

        def also(conn: Connection, submission: Submission) -> None:
            if submission.status != "accepted":  # a supervisor's return is the decision itself: never reviewed again
                raise ItemUnavailable("le retour corrigé n'a pas été accepté "
                                      f"({RETURN_STATUS_LABELS.get(submission.status, submission.status)})")
            # The journal locked the bureau approved; the item's may be another (the supervisor changed it).
            self.journal.lock_bureau(conn, item.election, item.bureau)
            # Closed before the check of the latest accepted return: an item decided meanwhile (a double click,
            # another supervisor) is said so, not taken for figures accepted since the page was opened.
            self._close(conn, item, username,
                        {"state": "approved", "decision_note": note or None, "result_return_id": submission.return_id})
            # What the back office counted for the bureau until now: for a conflict or a correction, not the
            # item's return, which was never accepted, but the accepted one the approval replaces.
            replaced = latest_accepted_row(conn, election.id, bureau_code, excluding=submission.return_id)
            if seen_accepted is not None:
                _check_latest_accepted(replaced, bureau_code, seen_accepted)
            if replaced is not None and replaced.return_id >= submission.return_id:  # accepted since `known` was read
                raise AcceptedMeanwhile(f"le bureau {bureau_code} a reçu un retour accepté pendant l'approbation "
                                        f"({CHANNEL_LABELS.get(replaced.channel, replaced.channel)}, reçu "
                                        f"{replaced.receipt}) : approuvez à nouveau")
            conn.execute(
                update(returns)
                .where(returns.c.return_id == item.return_id, returns.c.status == "review")
                .values(status="corrected")
            )
            after = {**audit_view(ret), "receipt": submission.receipt}
            if note:
                after["note"] = note
            before = audit_view(item.ret)
            if replaced is not None:
                before["accepted"] = {**audit_view(Return.from_dict(json.loads(replaced.payload))),
                                      "receipt": replaced.receipt}
            Journal.record_audit(conn, username, "approve", item.return_id, before, after)
            _settle_uploads(conn, item.return_id, "accepted", submission.return_id, submission.receipt)

        submission = self.journal.submit(ret, (), also=also)
        return Approval(ret, [], submission)

    def reject(self, item_id: int, username: str, reason: str) -> None:
        """Refuse the item's figures; a reason is required, for the audit trail and the bureau's callback."""
        reason = reason.strip()
        if not reason:
            raise ValueError("un motif est obligatoire pour rejeter")
        item = self.get(item_id)
        if item is None:
            raise ItemUnavailable("élément inconnu")
        with self.journal.write() as conn:
            self.journal.lock_bureau(conn, item.election, item.bureau)
            self._close(conn, item, username, {"state": "rejected", "decision_note": reason})
            conn.execute(
                update(returns)
                .where(returns.c.return_id == item.return_id, returns.c.status == "review")
                .values(status="rejected")
            )
            Journal.record_audit(conn, username, "reject", item.return_id, audit_view(item.ret), {"note": reason})
            _settle_uploads(conn, item.return_id, "rejected", None, None)


def _check_latest_accepted(latest: Any, bureau: str, seen: str) -> None:
    """Raise AcceptedMeanwhile unless the bureau's latest accepted return (its row, or None) is `seen`."""
    if latest is not None and latest.return_id != seen:
        raise AcceptedMeanwhile(
            f"le bureau {bureau} a un retour accepté que cette page ne montrait pas "
            f"({CHANNEL_LABELS.get(latest.channel, latest.channel)}, reçu "
            f"{latest.receipt}) : comparez-le ci-dessous, puis approuvez à nouveau si vos chiffres doivent le remplacer"
        )


def _settle_uploads(conn: Connection, decided_return_id: str, status: str, return_id: str | None,
                    receipt: str | None) -> None:
    """Keep the rows of the pen uploads whose figures are in the decided return truthful.

    Not only the upload it was read from: a duplicate upload (the same page docked by another
    station) is answered with this return and would otherwise wait in `review` for a decision
    already made. Whatever the decided return's channel: a pen page may repeat a phone return.
    The table exists once pen has run."""
    from pen_gateway.uploads import settle_uploads_of, uploads

    if not conn.dialect.has_table(conn, uploads.name):
        return
    settle_uploads_of(conn, decided_return_id, status, return_id=return_id, receipt=receipt)
