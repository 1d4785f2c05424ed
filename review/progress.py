"""The `progress` blueprint: the live dashboard, its HTML fragment (refreshed by the page) and its JSON."""

from __future__ import annotations

import threading
import time
from datetime import datetime

from flask import Blueprint, Response, current_app, jsonify, render_template

from review import context
from review.auth import require_login
from review.charts import progress_chart
from review.progress_data import Progress, compute_progress

bp = Blueprint("progress", __name__)
bp.before_request(require_login)

CACHE_SECONDS = 2.0  # many dashboards open at midnight cost one computation every 2 s per process
_lock = threading.Lock()


def current_progress() -> Progress:
    ctx = context()
    election = ctx.settings.election
    with _lock:
        cached = ctx.progress_cache.get(election)
        if cached and time.monotonic() - cached[0] < CACHE_SECONDS:
            return cached[1]
        progress = compute_progress(ctx.journal, ctx.registry(), ctx.redis, election,
                                    uploads_waiting=ctx.uploads.count(),
                                    uploads_failed=ctx.uploads.count(failed=True))
        ctx.progress_cache[election] = (time.monotonic(), progress)
        return progress


def _panel_context(progress: Progress) -> dict[str, object]:
    tz = context().tz

    def clock(ts: float) -> str:
        return datetime.fromtimestamp(ts, tz).strftime("%H:%M")

    return {
        "p": progress,
        "chart": progress_chart(progress.series, progress.registered, progress.bucket_seconds, clock),
        "refresh": current_app.config["PROGRESS_REFRESH_SECONDS"],
    }


@bp.get("/progress")
def dashboard() -> str:
    return render_template("progress.html", **_panel_context(current_progress()))


@bp.get("/progress/panel")
def panel() -> str:
    return render_template("progress_panel.html", **_panel_context(current_progress()))


@bp.get("/progress.json")
def data() -> Response:
    return jsonify(current_progress().to_json())
