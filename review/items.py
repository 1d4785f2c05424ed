"""The `items` blueprint: the queue of review items, one item (claimed on opening), approve and reject,
and the pen artefacts (page and field crops), served only to a logged-in supervisor.

The queue also lists, in a section of their own, the pen uploads the OCR could not attach to any
bureau (review/unassigned_uploads.py): an upload's page, claimed on opening like an item, where a
supervisor assigns the bureau (the upload is read again) or rejects it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)
from werkzeug.wrappers import Response

from forms import Election, load_election
from pen_gateway.artefacts import field_crop_path, load_reading, page_path
from pen_gateway.uploads import get_upload
from review import context, requested_page
from review.auth import require_login
from review.review_items import (
    CHANNEL_LABELS,
    REASON_LABELS,
    RETURN_STATUS_LABELS,
    STATE_LABELS,
    AcceptedMeanwhile,
    ItemFilter,
    ItemUnavailable,
    ReviewItem,
)
from review.unassigned_uploads import ENTER, UPLOAD_STATUS_LABELS, BureauRefused, UploadEntry
from telemetry import logs, metrics
from validation import Finding, Reason, check_arithmetic, suggest_single_digit_fixes

bp = Blueprint("items", __name__)
bp.before_request(require_login)

MAX_SUGGESTIONS = 4
Claimed = TypeVar("Claimed", ReviewItem, UploadEntry)  # what a supervisor claims by opening its page


@dataclass
class FieldRow:
    """One count of the item page: what the channel captured, what the reviewer types, what else we know."""

    id: str
    label: str
    candidate: bool
    max_digits: int
    original: int | None
    value: str
    other: int | None = None
    differs: bool = False
    findings: list[Finding] = field(default_factory=list)
    invalid: bool = False
    read_value: int | None = None
    confidence: float | None = None
    alternative: tuple[int, float] | None = None
    crop: bool = False


@bp.get("/")
def index() -> Response:
    return redirect(url_for("items.queue"))


def _filters() -> tuple[ItemFilter, dict[str, str]]:
    args = request.args
    state = args.get("state", "open")
    state = state if state in (*STATE_LABELS, "all") else "open"
    reason = args.get("reason", "")
    reason = reason if reason in REASON_LABELS else ""
    channel = args.get("channel", "")
    channel = channel if channel in CHANNEL_LABELS else ""
    department = args.get("department", "")
    registry = context().registry()
    bureaux = None
    if department and registry is not None:
        bureaux = [b.code for b in registry.bureaux.values() if b.department == department]
    chosen = {"state": state, "reason": reason, "channel": channel, "department": department if bureaux else ""}
    return ItemFilter(None if state == "all" else state, reason or None, channel or None, bureaux), chosen


@bp.get("/items")
def queue() -> str:
    filters, chosen = _filters()
    per_page = int(current_app.config["ITEMS_PER_PAGE"])
    page = requested_page()
    items, total = context().items.list(filters, limit=per_page, offset=(page - 1) * per_page)
    registry = context().registry()
    now = time.time()
    # Uploads without a bureau have no reason code, department or decision yet: a filter on those hides them.
    show_uploads = (chosen["state"] in ("open", "all") and chosen["channel"] in ("", "pen")
                    and not chosen["department"] and chosen["reason"] in ("", Reason.UNKNOWN_BUREAU))
    # Each section of uploads has its pages, as the items do: its own argument, so paging one keeps the others.
    uploads_page, failed_page = requested_page("uploads_page"), requested_page("failed_page")
    uploads, uploads_total = (context().uploads.list(limit=per_page, offset=(uploads_page - 1) * per_page)
                              if show_uploads else ([], 0))
    # Uploads whose recognition broke: never hidden by a filter that could match them, so none is forgotten.
    show_failed = chosen["state"] in ("open", "all") and chosen["channel"] in ("", "pen") and not chosen["department"]
    failed, failed_total = (context().uploads.list(limit=per_page, offset=(failed_page - 1) * per_page, failed=True)
                            if show_failed else ([], 0))
    paging = {"page": page, "uploads_page": uploads_page, "failed_page": failed_page}

    def queue_url(**changes: int) -> str:
        """This queue with the filters chosen and every list at its page, but for `changes`."""
        pages = {k: v for k, v in {**paging, **changes}.items() if v != 1}
        return url_for("items.queue", **pages, **chosen)

    return render_template(
        "queue.html",
        items=items,
        total=total,
        uploads=uploads,
        uploads_total=uploads_total,
        uploads_page=uploads_page,
        uploads_pages=max(1, math.ceil(uploads_total / per_page)),
        failed=failed,
        failed_total=failed_total,
        failed_page=failed_page,
        failed_pages=max(1, math.ceil(failed_total / per_page)),
        queue_url=queue_url,
        page=page,
        pages=max(1, math.ceil(total / per_page)),
        chosen=chosen,
        registry=registry,
        departments=registry.departments() if registry else {},
        reasons=[r for r in REASON_LABELS if r != Reason.DUPLICATE],
        channels=[c for c in CHANNEL_LABELS if c != "review"],
        states=STATE_LABELS,
        now=now,
    )


# The largest id a review item can have: its column is an INTEGER, 32 bits on PostgreSQL, which answers a larger
# number with "integer out of range" (and SQLite refuses one above 2**63 - 1 outright). Beyond it, no item.
MAX_ITEM_ID = 2**31 - 1


def _get(item_id: int) -> ReviewItem:
    if item_id > MAX_ITEM_ID:
        abort(404)
    item = context().items.get(item_id)
    if item is None:
        abort(404)
    # The rest of the request's lines carry the return (and the upload, for a pen return) it is about.
    logs.bind(return_id=item.return_id, bureau=item.bureau,
              upload_id=item.ret.source.get("upload_id") if item.channel == "pen" else None)
    return item


def _alternative(reading_field: dict[str, Any]) -> tuple[int, float] | None:
    """The other reading of a field the OCR found likeliest: its least sure digit replaced by its best rival.

    `digits` are the field's boxes, an empty one as digit null (a right-aligned number leaves the first boxes
    empty): the value is the non-empty boxes read left to right, as the pipeline reads it (field_reading)."""
    digits = reading_field.get("digits") or []
    best: tuple[float, int, int] | None = None
    for pos, d in enumerate(digits):
        for alt in d.get("alternatives") or []:
            digit, p = int(alt[0]), float(alt[1])
            if digit != d.get("digit") and (best is None or p > best[0]):
                best = (p, pos, digit)
    if best is None:
        return None
    p, pos, digit = best
    boxes = [d.get("digit") for d in digits]
    boxes[pos] = digit
    return int("".join(str(b) for b in boxes if b is not None)), p


def _item_page(
    item: ReviewItem,
    *,
    submitted: dict[str, str] | None = None,
    approve_findings: list[Finding] | None = None,
    bureau_value: str | None = None,
    status: int = 200,
) -> tuple[str, int]:
    ctx = context()
    election: Election = load_election(item.election)
    registry = ctx.registry()
    bureau = registry.get(item.bureau) if registry else None
    other_id = item.compared_return_id
    other = ctx.journal.get(other_id) if other_id else None
    reading = None
    upload_id = item.ret.source.get("upload_id") if item.channel == "pen" else None
    page_exists = False
    if upload_id:
        try:
            reading = load_reading(ctx.settings.var_dir, upload_id)
            page_exists = page_path(ctx.settings.var_dir, upload_id).is_file()
        except ValueError:  # an upload id that is not ours to read
            upload_id = None
    by_field = item.field_findings()
    invalid_fields = {f.field for f in approve_findings or [] if f.field}
    rows = []
    for f in election.fields:
        original = item.ret.counts.get(f.id)
        row = FieldRow(
            id=f.id, label=f.label, candidate=f.candidate, max_digits=f.max_digits, original=original,
            value=(submitted or {}).get(f.id, "" if original is None else str(original)),
            findings=by_field.get(f.id, []), invalid=f.id in invalid_fields,
        )
        if other is not None:
            row.other = other.ret.counts.get(f.id)
            row.differs = row.other != original
        if reading is not None:
            rf = (reading.get("fields") or {}).get(f.id) or {}
            row.read_value = rf.get("value")
            row.confidence = rf.get("confidence")
            row.alternative = _alternative(rf)
        if upload_id:
            row.crop = field_crop_path(ctx.settings.var_dir, upload_id, f.id).is_file()
        rows.append(row)
    suggestions: list[tuple[str, int, str]] = []
    if reading is not None:
        suggestions += [(str(s[0]), int(s[1]), "lecture") for s in reading.get("suggestions") or []]
    # Only a broken sum has one-digit fixes worth showing (and the search costs a few ms).
    fixes = suggest_single_digit_fixes(item.ret.counts, election) if check_arithmetic(item.ret.counts, election) else []
    if 0 < len(fixes) <= MAX_SUGGESTIONS:  # many fixes say nothing: the form's checksum cannot choose
        suggestions += [(f, v, "arithmétique") for f, v in fixes if (f, v) not in {(s[0], s[1]) for s in suggestions}]
    labels = {f.id: f.label for f in election.fields}
    # The bureau the approval is for: the item's, or the one the supervisor typed (an unknown bureau's item).
    target = (bureau_value or item.bureau).strip() or item.bureau
    history = [e for e in ctx.journal.entries(item.election, target) if e.ret.return_id != item.return_id]
    latest = ctx.journal.latest_accepted(item.election, target)
    editable = item.state == "open" and not item.held_by_other(g.user.username)
    return render_template(
        "item.html",
        item=item,
        election=election,
        bureau=bureau,
        rows=rows,
        other=other,
        reading=reading,
        upload_id=upload_id,
        page_exists=page_exists,
        suggestions=[(f, v, src, labels.get(f, f)) for f, v, src in suggestions],
        labels=labels,
        approve_findings=approve_findings or [],
        history=history,
        history_bureau=target,
        seen_accepted=latest.return_id if latest else "",
        editable=editable,
        unknown_bureau=Reason.UNKNOWN_BUREAU in item.reasons,
        bureau_value=bureau_value if bureau_value is not None else item.bureau,
        known_caller=bureau is not None and item.ret.source.get("caller_id") in bureau.caller_ids,
        now=time.time(),
    ), status


def _claim_on_opening(entry: Claimed, open_: bool, claim: Callable[[], Claimed],
                      reread: Callable[[], Claimed]) -> Claimed:
    """Opening the page of an item or upload still to decide claims it; a reload within the claim costs no write."""
    fresh = (entry.claimed_by == g.user.username and entry.claimed_until is not None
             and entry.claimed_until - time.time() > current_app.config["CLAIM_SECONDS"] / 2)
    if not open_ or fresh:
        return entry
    try:
        return claim()
    except ItemUnavailable as exc:
        flash(f"Consultation seule : {exc}.", "warning")
        return reread()


def _renew(claim: Callable[[], Claimed]) -> Any:
    """Called by a page every few minutes while it stays open, so the claim lasts as long as the work."""
    try:
        entry = claim()
    except ItemUnavailable as exc:
        return jsonify(claimed=False, message=str(exc)), 409
    until = datetime.fromtimestamp(entry.claimed_until or 0, context().tz).strftime("%H:%M")
    return jsonify(claimed=True, claimed_until=entry.claimed_until, until=until)


def _reject(entry: Claimed, decide: Callable[[str], None], page: Callable[..., tuple[str, int]],
            reread: Callable[[], Claimed]) -> tuple[str, int] | None:
    """Refuse `entry` with the reason typed; None once done, else the page to answer with."""
    reason = request.form.get("reason", "")
    if not reason.strip():
        flash("Un motif est obligatoire pour rejeter.", "error")
        return page(entry, status=400)
    try:
        decide(reason)
    except ItemUnavailable as exc:
        flash(f"Rejet impossible : {exc}.", "error")
        return page(reread(), status=409)
    return None


def _typed_counts(election: Election) -> dict[str, str]:
    """The counts as the supervisor typed them in the form, by field id."""
    return {f.id: request.form.get(f"count-{f.id}", "") for f in election.fields}


def _image(path: Path) -> Response:
    """An artefact picture: a page (a scan's JPEG, an ink page's PNG) or a field's crop (PNG)."""
    if not path.is_file():
        abort(404)
    return send_file(path, mimetype="image/jpeg" if path.suffix == ".jpg" else "image/png", max_age=300,
                     conditional=True)


@bp.get("/items/<int:item_id>")
def show(item_id: int) -> Any:
    item = _get(item_id)
    item = _claim_on_opening(item, item.state == "open", lambda: context().items.claim(item_id, g.user.username),
                             lambda: _get(item_id))
    return _item_page(item)


@bp.post("/items/<int:item_id>/claim")
def renew_claim(item_id: int) -> Any:
    _get(item_id)
    return _renew(lambda: context().items.claim(item_id, g.user.username))


@bp.post("/items/<int:item_id>/release")
def release(item_id: int) -> Response:
    _get(item_id)
    context().items.release(item_id, g.user.username)
    flash("Élément libéré : un autre superviseur peut le prendre.", "info")
    return redirect(url_for("items.queue"), 303)


@bp.post("/items/<int:item_id>/approve")
def approve(item_id: int) -> Any:
    item = _get(item_id)
    election = load_election(item.election)
    submitted = _typed_counts(election)
    # The bureau can be chosen only when the channel's one is unknown to the registry.
    bureau = request.form.get("bureau", "").strip() if Reason.UNKNOWN_BUREAU in item.reasons else None
    try:
        outcome = context().items.approve(
            item_id, g.user.username, submitted, context().registry(), request.form.get("note", ""), bureau,
            seen_accepted=request.form.get("seen_accepted", ""),
        )
    except AcceptedMeanwhile as exc:
        # Nothing written: the page again, the supervisor's figures kept, with the bureau's returns to compare.
        flash(f"Approbation suspendue : {exc}.", "error")
        return _item_page(_get(item_id), submitted=submitted, bureau_value=bureau, status=409)
    except ItemUnavailable as exc:
        flash(f"Approbation impossible : {exc}.", "error")
        return _item_page(_get(item_id), status=409)
    if outcome.submission is None:
        flash("Correction non enregistrée : les chiffres ne sont pas cohérents (voir ci-dessous).", "error")
        return _item_page(item, submitted=submitted, approve_findings=outcome.findings, bureau_value=bureau,
                          status=422)
    metrics.REVIEW_DECISIONS.labels("approve").inc()
    if item.channel == "pen" and item.ret.source.get("upload_id"):
        metrics.UPLOADS.labels("accepted").inc()
    flash(
        f"Correction approuvée pour le bureau {outcome.ret.bureau} : retour {outcome.submission.return_id} "
        f"accepté, reçu {outcome.submission.receipt}.",
        "success",
    )
    return redirect(url_for("items.queue"), 303)


@bp.post("/items/<int:item_id>/reject")
def reject(item_id: int) -> Any:
    item = _get(item_id)
    refused = _reject(item, lambda reason: context().items.reject(item_id, g.user.username, reason), _item_page,
                      lambda: _get(item_id))
    if refused is not None:
        return refused
    metrics.REVIEW_DECISIONS.labels("reject").inc()
    if item.channel == "pen" and item.ret.source.get("upload_id"):
        metrics.UPLOADS.labels("rejected").inc()
    flash(f"Retour du bureau {item.bureau} rejeté.", "success")
    return redirect(url_for("items.queue"), 303)


def _upload_id(item: ReviewItem) -> str:
    upload_id = item.ret.source.get("upload_id") if item.channel == "pen" else None
    if not upload_id or not upload_id.isalnum():
        abort(404)
    return upload_id


@bp.get("/items/<int:item_id>/page")
def page_image(item_id: int) -> Response:
    return _image(page_path(context().settings.var_dir, _upload_id(_get(item_id))))


@bp.get("/items/<int:item_id>/fields/<field_id>.png")
def field_image(item_id: int, field_id: str) -> Response:
    item = _get(item_id)
    if field_id not in {f.id for f in load_election(item.election).fields}:
        abort(404)
    return _image(field_crop_path(context().settings.var_dir, _upload_id(item), field_id))


# --- pen uploads the OCR could not attach to a bureau ---

def _get_upload(upload_id: str) -> UploadEntry:
    if not upload_id.isalnum() or len(upload_id) > 40:
        abort(404)
    entry = context().uploads.get(upload_id)
    if entry is None:
        abort(404)
    logs.bind(upload_id=upload_id)
    return entry


def _upload_page(entry: UploadEntry, *, bureau_value: str = "", submitted: dict[str, str] | None = None,
                 findings: list[Finding] | None = None, status: int = 200) -> tuple[str, int]:
    ctx = context()
    rows: list[FieldRow] = []
    reading = None
    if entry.failed:
        # What the OCR made of the page before it broke, if it got that far: a hint, never a figure typed for them.
        reading = load_reading(ctx.settings.var_dir, entry.upload_id)
        invalid = {f.field for f in findings or [] if f.field}
        for f in load_election(ctx.settings.election).fields:
            rf = ((reading or {}).get("fields") or {}).get(f.id) or {}
            rows.append(FieldRow(id=f.id, label=f.label, candidate=f.candidate, max_digits=f.max_digits,
                                 original=None, value=(submitted or {}).get(f.id, ""), invalid=f.id in invalid,
                                 read_value=rf.get("value"), confidence=rf.get("confidence")))
    return render_template(
        "upload.html",
        upload=entry,
        page_exists=page_path(ctx.settings.var_dir, entry.upload_id).is_file(),
        decision=None if entry.waiting else ctx.uploads.decision(entry.upload_id),
        editable=entry.waiting and not entry.held_by_other(g.user.username),
        bureau_value=bureau_value,
        rows=rows,
        reading=reading,
        findings=findings or [],
        status_labels=UPLOAD_STATUS_LABELS,
        now=time.time(),
    ), status


@bp.get("/uploads/<upload_id>")
def upload(upload_id: str) -> Any:
    entry = _get_upload(upload_id)
    entry = _claim_on_opening(entry, entry.waiting, lambda: context().uploads.claim(upload_id, g.user.username),
                              lambda: _get_upload(upload_id))
    return _upload_page(entry)


@bp.post("/uploads/<upload_id>/claim")
def renew_upload_claim(upload_id: str) -> Any:
    _get_upload(upload_id)
    return _renew(lambda: context().uploads.claim(upload_id, g.user.username))


@bp.post("/uploads/<upload_id>/release")
def release_upload(upload_id: str) -> Response:
    _get_upload(upload_id)
    context().uploads.release(upload_id, g.user.username)
    flash("Envoi libéré : un autre superviseur peut le prendre.", "info")
    return redirect(url_for("items.queue"), 303)


@bp.post("/uploads/<upload_id>/assign")
def assign_bureau(upload_id: str) -> Any:
    entry = _get_upload(upload_id)
    bureau = request.form.get("bureau", "")
    try:
        code = context().uploads.assign(upload_id, g.user.username, bureau, context().registry())
    except BureauRefused as exc:
        flash(f"Bureau refusé : {exc}. Rien n'a été modifié.", "error")
        return _upload_page(entry, bureau_value=bureau.strip(), status=422)
    except ItemUnavailable as exc:
        flash(f"Attribution impossible : {exc}.", "error")
        return _upload_page(_get_upload(upload_id), status=409)
    metrics.REVIEW_DECISIONS.labels("assign_bureau").inc()
    metrics.UPLOADS.labels("queued").inc()
    flash(f"Envoi {upload_id} rattaché au bureau {code} : il repart à la lecture automatique ; "
          "son retour arrivera dans la file s'il faut le vérifier.", "success")
    return redirect(url_for("items.queue"), 303)


@bp.post("/uploads/<upload_id>/counts")
def enter_upload_counts(upload_id: str) -> Any:
    """The counts of an upload whose recognition failed, typed by the supervisor from its page."""
    entry = _get_upload(upload_id)
    election = load_election(context().settings.election)
    submitted = _typed_counts(election)
    bureau = request.form.get("bureau", "")
    try:
        outcome = context().uploads.enter_counts(upload_id, g.user.username, bureau, submitted, context().registry(),
                                                 election.id, request.form.get("note", ""))
    except BureauRefused as exc:
        flash(f"Bureau refusé : {exc}. Rien n'a été modifié.", "error")
        return _upload_page(entry, bureau_value=bureau.strip(), submitted=submitted, status=422)
    except ItemUnavailable as exc:
        flash(f"Saisie impossible : {exc}.", "error")
        return _upload_page(_get_upload(upload_id), status=409)
    if outcome.submission is None:
        flash("Chiffres non enregistrés : ils ne sont pas cohérents (voir ci-dessous).", "error")
        return _upload_page(entry, bureau_value=bureau.strip(), submitted=submitted, findings=outcome.findings,
                            status=422)
    metrics.REVIEW_DECISIONS.labels(ENTER).inc()
    submission = outcome.submission
    metrics.UPLOADS.labels("accepted" if submission.status == "accepted" else "review").inc()
    if submission.status == "accepted":
        flash(f"Chiffres de l'envoi {upload_id} enregistrés pour le bureau {outcome.ret.bureau} : retour "
              f"{submission.return_id} accepté, reçu {submission.receipt}.", "success")
    else:
        flash(f"Chiffres de l'envoi {upload_id} enregistrés pour le bureau {outcome.ret.bureau} (retour "
              f"{submission.return_id}, {RETURN_STATUS_LABELS.get(submission.status, submission.status)}) : "
              "ils diffèrent de ce que le bureau a déjà transmis, le retour attend dans la file.", "warning")
    return redirect(url_for("items.queue"), 303)


@bp.post("/uploads/<upload_id>/reject")
def reject_upload(upload_id: str) -> Any:
    entry = _get_upload(upload_id)
    refused = _reject(entry, lambda reason: context().uploads.reject(upload_id, g.user.username, reason),
                      _upload_page, lambda: _get_upload(upload_id))
    if refused is not None:
        return refused
    metrics.REVIEW_DECISIONS.labels("reject_upload").inc()
    metrics.UPLOADS.labels("rejected").inc()
    flash(f"Envoi {upload_id} rejeté.", "success")
    return redirect(url_for("items.queue"), 303)


@bp.get("/uploads/<upload_id>/page")
def upload_page_image(upload_id: str) -> Response:
    return _image(page_path(context().settings.var_dir, _get_upload(upload_id).upload_id))


@bp.get("/uploads/<upload_id>/raw")
def upload_raw(upload_id: str) -> Response:
    """The bytes the station sent, for a supervisor reading an upload the OCR could not: always a download,
    never shown inline (they are a station's, not ours to vouch for)."""
    _get_upload(upload_id)
    stored = get_upload(context().journal, upload_id)
    if stored is None or not stored.path.is_file():
        abort(404)
    extension = {"image/png": "png", "image/jpeg": "jpg", "application/inkml+xml": "inkml"}.get(stored.content_type,
                                                                                               "bin")
    response = send_file(stored.path, mimetype="application/octet-stream", as_attachment=True,
                         download_name=f"{upload_id}.{extension}", max_age=0)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
