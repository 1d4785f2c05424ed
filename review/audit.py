"""The `audit` blueprint (admins): the append-only audit trail, filtered, paged and exported as CSV.

The trail is the journal's `audit` table; nothing here updates or deletes a row.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from flask import Blueprint, Response, current_app, render_template, request, stream_with_context
from sqlalchemy import func, select

from forms import load_election
from returns_queue.journal import audit
from review import context, requested_page
from review.auth import require_admin

bp = Blueprint("audit", __name__)
bp.before_request(require_admin)

ACTION_LABELS = {
    "approve": "approbation",
    "reject": "rejet",
    "assign_bureau": "bureau attribué à un envoi",
    "reject_upload": "rejet d'un envoi",
    "enter_upload_counts": "chiffres saisis pour un envoi illisible",
    "login": "connexion",
    "login_failed": "échec de connexion",
    "login_locked": "connexion bloquée",
    "logout": "déconnexion",
    "user_add": "création d'utilisateur",
    "user_role": "changement de rôle",
    "user_disable": "désactivation",
    "user_enable": "réactivation",
    "user_password": "mot de passe changé",
    "station_add": "station d'envoi enregistrée",
    "station_revoke": "station d'envoi révoquée",
}
CSV_COLUMNS = ("id", "at_utc", "actor", "action", "subject", "before", "after")
EXPORT_BATCH = 1000  # audit rows the CSV export reads at a time


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: float
    actor: str
    action: str
    subject: str | None
    before: Any
    after: Any
    before_text: str | None
    after_text: str | None

    @property
    def changes(self) -> list[tuple[str, Any, Any]]:
        """For a correction, the bureau and the counts that changed: (field, before, after)."""
        return _changes(self.before, self.after)

    @property
    def accepted(self) -> dict[str, Any] | None:
        """For an approval, the bureau's accepted return it replaced (a conflict's, a correction's), if any."""
        accepted = self.before.get("accepted") if isinstance(self.before, dict) else None
        return accepted if isinstance(accepted, dict) else None

    @property
    def accepted_changes(self) -> list[tuple[str, Any, Any]]:
        """The counts the approval changed in what the back office had counted for the bureau."""
        return _changes(self.accepted, self.after) if self.accepted else []


def _changes(before: Any, after: Any) -> list[tuple[str, Any, Any]]:
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return []
    # Counts typed for an upload whose reading failed replace none: each is listed from « — ».
    b, a = before.get("counts", {} if "counts" in after else None), after.get("counts")
    if not (isinstance(b, dict) and isinstance(a, dict)):
        return []
    moved = before.get("bureau") != after.get("bureau")  # an unknown bureau's figures given their bureau
    bureau = [("bureau", before.get("bureau"), after.get("bureau"))] if moved else []
    return bureau + [(k, b.get(k), a.get(k)) for k in a if b.get(k) != a.get(k)]


def _row(r: Any) -> AuditRow:
    return AuditRow(
        r.id, r.at, r.actor, r.action, r.subject,
        json.loads(r.before) if r.before else None, json.loads(r.after) if r.after else None,
        r.before, r.after,
    )


def _day(text: str, end: bool) -> float | None:
    """A YYYY-MM-DD date in the UI's time zone, as the start (or end) of that day in unix seconds."""
    try:
        day = datetime.strptime(text, "%Y-%m-%d").date()
    except ValueError:
        return None
    start = datetime.combine(day, time.min, tzinfo=context().tz)
    try:
        return (start + timedelta(days=1) if end else start).timestamp()
    except OverflowError:  # the end of 31/12/9999 is past what a date holds: no end at all
        return None


def _filtered(query: Any) -> tuple[Any, dict[str, str]]:
    args = request.args
    chosen = {k: args.get(k, "").strip() for k in ("actor", "action", "subject", "since", "until")}
    if chosen["actor"]:
        query = query.where(audit.c.actor == chosen["actor"].lower())
    if chosen["action"]:
        query = query.where(audit.c.action == chosen["action"])
    if chosen["subject"]:
        query = query.where(audit.c.subject.contains(chosen["subject"], autoescape=True))
    since = _day(chosen["since"], end=False) if chosen["since"] else None
    until = _day(chosen["until"], end=True) if chosen["until"] else None
    if since is not None:
        query = query.where(audit.c.at >= since)
    if until is not None:
        query = query.where(audit.c.at < until)
    return query, chosen


@bp.get("/audit")
def trail() -> str:
    per_page = int(current_app.config["AUDIT_PER_PAGE"])
    page = requested_page()
    query, chosen = _filtered(select(audit))
    count, _ = _filtered(select(func.count()).select_from(audit))
    with context().journal.read() as conn:
        total = conn.execute(count).scalar_one()
        rows = [_row(r) for r in conn.execute(
            query.order_by(audit.c.id.desc()).limit(per_page).offset((page - 1) * per_page)
        )]
    # Counts by their printed labels (the ids a return keeps them by are the definition's, not the supervisors').
    labels = {f.id: f.label for f in load_election(context().settings.election).fields}
    return render_template("audit.html", rows=rows, total=total, page=page,
                           pages=max(1, math.ceil(total / per_page)), chosen=chosen, actions=ACTION_LABELS,
                           labels=labels)


def _cell(value: str | None) -> str:
    """Spreadsheets run a cell that starts with = + - @ as a formula: neutralize it (OWASP CSV injection)."""
    if value is None:
        return ""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


@bp.get("/audit.csv")
def export() -> Response:
    query, _ = _filtered(select(audit))
    journal = context().journal

    def lines() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(CSV_COLUMNS)
        # Read in batches, each in a read of its own, never across a yield: the client takes the download at
        # its pace (or stops reading it, a laptop put to sleep), and a read held open meanwhile keeps SQLite from
        # resetting its WAL, which then grows with every write of the night and stays that size. The trail is
        # append-only, so the rows up to the last id at the start are the trail as it stood then.
        with journal.read() as conn:
            last = conn.execute(select(func.max(audit.c.id))).scalar() or 0
        after = 0
        while after < last:
            with journal.read() as conn:
                rows = conn.execute(query.where(audit.c.id > after, audit.c.id <= last)
                                    .order_by(audit.c.id).limit(EXPORT_BATCH)).all()
            if not rows:
                break
            after = rows[-1].id
            for r in rows:
                at = datetime.fromtimestamp(r.at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                writer.writerow([r.id, at, _cell(r.actor), r.action, _cell(r.subject), _cell(r.before),
                                 _cell(r.after)])
                if buffer.tell() > 64 * 1024:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
        yield buffer.getvalue()

    stamp = datetime.now(context().tz).strftime("%Y%m%d-%H%M%S")
    return Response(
        stream_with_context(lines()),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.csv"'},
    )
