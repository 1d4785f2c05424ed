"""The supervisors' review UI: a Flask app of its own (own port, own process), never the upload API's.

`create_app(test_config=None, settings=None)` builds it: configuration from the defaults below, then the
`test_config` mapping (tests) or `REMONTEE_REVIEW_*` environment variables, and the `Settings` (journal,
Redis, registry, election, trusted proxies) from `settings` (`run_gateway.py review`: the environment and
the flags), `test_config["SETTINGS"]` or the environment. Blueprints: `auth` (login, logout, users),
`items` (the queue and decisions, and the pen uploads the OCR could not attach to a bureau), `audit` (the
trail and its CSV export), `progress` (the dashboard).

`/metrics` (telemetry/) needs no login: Prometheus scrapes it, and it holds counts only (request
durations, decisions, queue depths, backlogs, review items and uploads by status).
"""

from __future__ import annotations

import math
import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from flask import Flask, current_app, render_template, request
from flask_wtf.csrf import CSRFError, CSRFProtect
from redis import Redis
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from registry import Registry, RegistryFile
from returns_queue.journal import Journal
from review.accounts import Accounts, LockoutPolicy, SessionPolicy
from review.review_items import ReviewItems
from review.unassigned_uploads import UnassignedUploads
from settings import Settings, make_var_dir

csrf = CSRFProtect()

DEFAULTS: dict[str, Any] = {
    "SESSION_COOKIE_NAME": "remontee_review",
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Lax",
    "SESSION_COOKIE_SECURE": False,  # True behind TLS: set REMONTEE_REVIEW_SESSION_COOKIE_SECURE=true
    # The CSRF token lives as long as the session: a supervisor may keep an item open a while.
    "WTF_CSRF_TIME_LIMIT": None,
    "MAX_CONTENT_LENGTH": 256 * 1024,  # forms only: counts and a note
    "TIMEZONE": "Europe/Paris",
    "CLAIM_SECONDS": 5 * 60,
    "SESSION_IDLE_SECONDS": 30 * 60,
    "SESSION_LIFETIME_SECONDS": 12 * 3600,
    "LOCKOUT_MAX_FAILURES": 5,
    "LOCKOUT_MAX_ADDRESS_FAILURES": 20,
    "LOCKOUT_WINDOW_SECONDS": 15 * 60,
    "PROGRESS_REFRESH_SECONDS": 10,
    "ITEMS_PER_PAGE": 50,
    "AUDIT_PER_PAGE": 100,
    "PASSWORD_HASHER": None,  # an argon2.PasswordHasher; None: argon2-cffi's defaults (RFC 9106 low-memory)
    "JOURNAL": None,  # a Journal to share (tests); None: one on settings.db_url_resolved
}


def secret_key_for(settings: Settings) -> str:
    """`settings.secret_key`, else one generated once into var/secret_key (0600) and shared by every worker."""
    if settings.secret_key:
        return settings.secret_key
    path = settings.var_dir / "secret_key"
    if not path.exists():
        make_var_dir(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret_key.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
                f.flush()
                os.fsync(f.fileno())
            # link() fails if another worker won the race: then everyone reads the winner's key.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return path.read_text().strip()


@dataclass
class ReviewContext:
    settings: Settings
    journal: Journal
    accounts: Accounts
    items: ReviewItems
    uploads: UnassignedUploads
    redis: Redis
    registry_file: RegistryFile
    tz: ZoneInfo
    progress_cache: dict[str, Any] = field(default_factory=dict)

    def registry(self) -> Registry | None:
        return self.registry_file.get()


def context() -> ReviewContext:
    return current_app.extensions["remontee_review"]


# Far beyond the pages of any night's queue or audit trail, and small enough that a page's OFFSET fits the
# databases' 64-bit integers (SQLite refuses a larger Python int outright).
MAX_PAGE = 1_000_000


def requested_page(name: str = "page") -> int:
    """The `page` query argument (or `name`, for a list of its own on the page): 1 when absent, not a number or
    below 1, and never above MAX_PAGE; a page past the last one is empty, as it always was, whatever its number."""
    page = request.args.get(name, 1, type=int) or 1
    return min(max(1, page), MAX_PAGE)


def trust_proxies(app: Flask, count: int) -> None:
    """Take the client's address from X-Forwarded-For as `count` reverse proxies in front of the app wrote it.

    The lockout counts failures by address, and the audit trail and sessions keep it: behind a proxy every
    request would come from the proxy's address. Only X-Forwarded-For is believed, not X-Forwarded-Proto: a
    request seen as HTTPS makes Flask-WTF compare the Referer with the Host, which the documented nginx
    does not pass on, and every form would be refused.
    """
    if count < 0:
        raise ValueError(f"REMONTEE_REVIEW_TRUSTED_PROXIES must be 0 or more, not {count}")
    if count:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=count, x_proto=0)  # type: ignore[method-assign]


def create_app(test_config: Mapping[str, Any] | None = None, settings: Settings | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    if test_config is None:
        app.config.from_prefixed_env("REMONTEE_REVIEW")
    else:
        app.config.update(test_config)
    settings = settings or app.config.get("SETTINGS") or Settings.from_env()
    app.config["SETTINGS"] = settings
    trust_proxies(app, settings.review_trusted_proxies)
    app.config["SECRET_KEY"] = secret_key_for(settings)
    app.config["PERMANENT_SESSION_LIFETIME"] = app.config["SESSION_LIFETIME_SECONDS"]

    journal = app.config["JOURNAL"] or Journal(settings.db_url_resolved)
    accounts = Accounts(
        journal,
        hasher=app.config["PASSWORD_HASHER"],
        lockout=LockoutPolicy(
            app.config["LOCKOUT_MAX_FAILURES"],
            app.config["LOCKOUT_MAX_ADDRESS_FAILURES"],
            app.config["LOCKOUT_WINDOW_SECONDS"],
        ),
        session_policy=SessionPolicy(app.config["SESSION_IDLE_SECONDS"], app.config["SESSION_LIFETIME_SECONDS"]),
    )
    # Short timeouts: a dashboard must say "Redis injoignable", not hang, when Redis is away.
    redis = Redis.from_url(settings.redis_url_resolved, socket_connect_timeout=1, socket_timeout=2)
    tz = ZoneInfo(app.config["TIMEZONE"])
    app.extensions["remontee_review"] = ReviewContext(
        settings, journal, accounts, ReviewItems(journal, app.config["CLAIM_SECONDS"]),
        UnassignedUploads(journal, app.config["CLAIM_SECONDS"]), redis, RegistryFile(settings.registry_path), tz,
    )
    csrf.init_app(app)

    # Imported here, not at the top: run_gateway.py imports this package before gunicorn's
    # multiprocess mode is set up, and prometheus_client must not be loaded before that.
    from telemetry.exposition import install_flask
    from telemetry.state import StateCollector

    # Before the blueprints: its timer starts ahead of their before_request hooks (the login check).
    install_flask(app, "review", [StateCollector(journal, redis)])

    from review import audit, auth, items, progress
    from review.review_items import (
        CHANNEL_LABELS,
        REASON_LABELS,
        RETURN_STATUS_LABELS,
        STATE_LABELS,
        readable_message,
    )

    app.register_blueprint(auth.bp)
    app.register_blueprint(items.bp)
    app.register_blueprint(audit.bp)
    app.register_blueprint(progress.bp)

    def clock(ts: float | None, fmt: str = "%H:%M:%S") -> str:
        return "" if ts is None else datetime.fromtimestamp(ts, tz).strftime(fmt)

    def age(seconds: float) -> str:
        seconds = max(0, int(seconds))
        if seconds < 60:
            return f"{seconds} s"
        if seconds < 3600:
            return f"{seconds // 60} min"
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d}"

    def pairs(value: Any) -> str:
        """An audit value for people: `clé : valeur, …` for a mapping, the JSON text otherwise."""
        if isinstance(value, dict):
            return ", ".join(f"{k} : {'—' if v is None else v}" for k, v in value.items())
        return "" if value is None else str(value)

    def percent(probability: float) -> str:
        """A confidence as a whole percent, rounded down: a reading the pen flags as uncertain (under 0.9999) is
        never shown as « 100 % » beside its finding."""
        return f"{math.floor(round(probability * 100, 6))} %"  # round first: 0.29 * 100 is 28.999999999999996

    app.jinja_env.filters.update(
        pairs=pairs,
        percent=percent,
        clock=clock,
        age=age,
        channel_label=lambda c: CHANNEL_LABELS.get(c, c),
        reason_label=lambda r: REASON_LABELS.get(r, r),
        state_label=lambda s: STATE_LABELS.get(s, s),
        return_status=lambda s: RETURN_STATUS_LABELS.get(s, s),
        finding_message=readable_message,
        number=lambda n: "—" if n is None else f"{n:,}".replace(",", "\u202f"),
    )

    @app.errorhandler(CSRFError)
    def csrf_error(exc: CSRFError) -> tuple[str, int]:
        return render_template("error.html", code=400, title="Formulaire expiré ou invalide",
                               message="Le jeton de sécurité du formulaire manque ou a expiré. "
                                       "Rechargez la page et recommencez."), 400

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        if exc.code is None or exc.code < 400:
            return exc
        titles = {403: "Accès refusé", 404: "Page introuvable", 405: "Méthode non permise",
                  409: "Conflit", 413: "Requête trop volumineuse"}
        # werkzeug's descriptions are English: a supervisor reads what happened and what to do, in French.
        messages = {403: "Cette page est réservée aux administrateurs.",
                    404: "Cette page n'existe pas ou plus.",
                    405: "Cette adresse reçoit un formulaire et ne s'ouvre pas directement : rien n'a été "
                         "enregistré. Revenez à la file d'attente et rouvrez l'élément.",
                    413: "Le formulaire envoyé est trop volumineux (une note trop longue ?) : rien n'a été "
                         "enregistré. Raccourcissez-le et recommencez."}
        message = messages.get(exc.code, "La requête n'a pas pu être traitée : rien n'a été enregistré. "
                                         "Revenez à la file d'attente et recommencez.")
        return render_template("error.html", code=exc.code, title=titles.get(exc.code, "Erreur"),
                               message=message), exc.code

    @app.after_request
    def security_headers(response: Any) -> Any:
        # Everything is served from here: no CDN, no inline script or style.
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
        )
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if response.mimetype in ("text/html", "application/json"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    return app
