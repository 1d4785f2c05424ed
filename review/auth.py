"""The `auth` blueprint: login, logout, the current user on every request, users' administration.

Anonymous requests to any page but the login are sent to the login; pages for admins answer
403 to supervisors. The Flask session cookie carries only the session token (signed); the
session itself, its expiry and its user's role are read from the database on every request.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Callable
from math import ceil
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from flask import Blueprint, abort, flash, g, jsonify, redirect, render_template, request, session, url_for
from werkzeug.wrappers import Response

from review import context
from review.accounts import ROLE_LABELS, ROLES, AccountError, AccountLocked

bp = Blueprint("auth", __name__)
F = TypeVar("F", bound=Callable[..., Any])
# Requests an open page makes by itself: the claim heartbeats every 90 s (they keep the item's claim), the
# dashboard's refresh of its panel every 10 s. They are nobody's activity. Were they to keep the session alive too,
# a tab forgotten on an item would hold it, and a logged-in session on an unattended desk (an item's page, the
# dashboard), for the session's whole lifetime (12 h) instead of its 30 min idle.
HEARTBEATS = ("items.renew_claim", "items.renew_upload_claim", "progress.panel")


@bp.before_app_request
def load_user() -> None:
    g.user = None
    token = session.get("sid")
    if token:
        g.user = context().accounts.session_user(token, touch=request.endpoint not in HEARTBEATS)
        if g.user is None:
            session.pop("sid", None)
            g.session_expired = True


def login_redirect() -> Response:
    if request.method == "GET":
        if getattr(g, "session_expired", False):
            flash("Votre session a expiré : reconnectez-vous.", "warning")
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    if request.accept_mimetypes.best == "application/json":  # the item page's claim heartbeat: the page says it
        response = jsonify(claimed=False, message="rien n'est encore enregistré ; notez les chiffres tapés, "
                                                  "reconnectez-vous, puis rouvrez l'élément")
        response.status_code = 401
        return response
    # A form sent without a live session (a correction typed while the session ran out) is not recorded: say so,
    # and come back after the login to the page it was sent from, not to its action, which answers only a POST.
    flash("Votre session a expiré : ce que vous venez d'envoyer n'a pas été enregistré. "
          "Reconnectez-vous, puis recommencez.", "warning")
    referrer = urlsplit(request.referrer or "")
    target = referrer.path + (f"?{referrer.query}" if referrer.query else "")
    return redirect(url_for("auth.login", next=target if _is_local_path(target) else url_for("items.queue")))


def require_login() -> Response | None:
    """A blueprint's `before_request`: anonymous → the login page."""
    if g.user is None:
        return login_redirect()
    return None


def require_admin() -> Response | None:
    if g.user is None:
        return login_redirect()
    if not g.user.is_admin:
        abort(403)
    return None


def login_required(view: F) -> F:
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return require_login() or view(*args, **kwargs)

    return cast(F, wrapped)


def admin_required(view: F) -> F:
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return require_admin() or view(*args, **kwargs)

    return cast(F, wrapped)


def _is_local_path(target: str) -> bool:
    """A path on this site and nothing else: no scheme, no host, nothing a browser would read as either.

    Browsers drop tabs and newlines from a URL and read a backslash as a slash, so `/<TAB>/evil.example`
    and `/\\evil.example` lead off-site; werkzeug drops the tab from the Location header too, and a newline
    there is an error. Any control or space character is therefore refused, not cleaned.
    """
    if any(ch.isspace() or unicodedata.category(ch)[0] in "CZ" for ch in target):
        return False
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return False
    parts = urlsplit(target)
    return not parts.scheme and not parts.netloc


def _safe_next(target: str | None) -> str:
    # Only a path on this site: an open redirect after login would be a phishing aid.
    if target and _is_local_path(target):
        return target
    return url_for("items.queue")


def _minutes(seconds: float) -> int:
    return max(1, ceil(seconds / 60))


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    next_url = request.values.get("next", "")
    if request.method == "GET":
        if g.user is not None:
            return redirect(_safe_next(next_url))
        return render_template("login.html", next=next_url, username="",
                               no_users=not context().accounts.list_users())
    username = request.form.get("username", "")
    password = request.form.get("password", "")
    if not username.strip() or not password:
        flash("Saisissez votre identifiant et votre mot de passe.", "error")
        return render_template("login.html", next=next_url, username=username), 400
    result = context().accounts.authenticate(username, password, request.remote_addr)
    if result.locked:
        flash(f"Trop d'échecs de connexion : réessayez dans {_minutes(result.retry_after)} min, "
              "ou demandez à un administrateur.", "error")
        return render_template("login.html", next=next_url, username=username), 429
    if result.user is None:
        flash("Identifiant ou mot de passe incorrect.", "error")
        return render_template("login.html", next=next_url, username=username), 401
    token = context().accounts.open_session(result.user.username, request.remote_addr)
    session.clear()  # a fresh session (and CSRF token) at login: no fixation
    session.permanent = True
    session["sid"] = token
    return redirect(_safe_next(next_url))


@bp.post("/logout")
def logout() -> Response:
    token = session.get("sid")
    if token:
        context().accounts.close_session(token, actor=g.user.username if g.user else None)
    session.clear()
    flash("Vous êtes déconnecté.", "info")
    return redirect(url_for("auth.login"))


@bp.route("/account/password", methods=["GET", "POST"])
@login_required
def own_password() -> Any:
    if request.method == "GET":
        return render_template("password.html")
    new = request.form.get("new_password", "")
    if new != request.form.get("confirm_password", ""):
        flash("Les deux saisies du nouveau mot de passe diffèrent.", "error")
        return render_template("password.html"), 400
    try:
        context().accounts.change_own_password(g.user.username, request.form.get("current_password", ""), new,
                                               request.remote_addr)
    except AccountLocked as exc:
        flash(f"Mot de passe inchangé : {exc} ; réessayez dans {_minutes(exc.retry_after)} min, "
              "ou demandez à un administrateur.", "error")
        return render_template("password.html"), 429
    except AccountError as exc:
        flash(f"Mot de passe inchangé : {exc}.", "error")
        return render_template("password.html"), 400
    session.clear()
    flash("Mot de passe changé : reconnectez-vous avec le nouveau.", "info")
    return redirect(url_for("auth.login"))


# --- users' administration (admins) ---


@bp.get("/users")
@admin_required
def users() -> str:
    return render_template("users.html", users=context().accounts.list_users(), roles=ROLES, role_labels=ROLE_LABELS)


@bp.post("/users")
@admin_required
def add_user() -> Any:
    form = request.form
    try:
        if form.get("password", "") != form.get("confirm_password", ""):
            raise AccountError("les deux saisies du mot de passe diffèrent")
        user = context().accounts.add_user(form.get("username", ""), form.get("password", ""),
                                           form.get("role", ""), g.user.username)
    except AccountError as exc:
        flash(f"Utilisateur non créé : {exc}.", "error")
        return render_template("users.html", users=context().accounts.list_users(), roles=ROLES,
                               role_labels=ROLE_LABELS, draft=form), 400
    flash(f"Utilisateur {user.username} créé ({user.role_label}).", "success")
    return redirect(url_for("auth.users"))


def _existing(username: str) -> str:
    if context().accounts.get_user(username) is None:
        abort(404)
    return username


@bp.post("/users/<username>/role")
@admin_required
def set_role(username: str) -> Response:
    try:
        context().accounts.set_role(_existing(username), request.form.get("role", ""), g.user.username)
        flash(f"Rôle de {username} : {ROLE_LABELS.get(request.form.get('role', ''), '?')}.", "success")
    except AccountError as exc:
        flash(f"Rôle inchangé : {exc}.", "error")
    return redirect(url_for("auth.users"))


@bp.post("/users/<username>/active")
@admin_required
def set_active(username: str) -> Response:
    active = request.form.get("active") == "1"
    if username == g.user.username and not active:
        flash("Vous ne pouvez pas désactiver votre propre compte.", "error")
        return redirect(url_for("auth.users"))
    try:
        context().accounts.set_active(_existing(username), active, g.user.username)
        flash(f"Compte {username} {'réactivé' if active else 'désactivé'}.", "success")
    except AccountError as exc:
        flash(f"Compte inchangé : {exc}.", "error")
    return redirect(url_for("auth.users"))


@bp.post("/users/<username>/password")
@admin_required
def reset_password(username: str) -> Response:
    try:
        context().accounts.set_password(_existing(username), request.form.get("password", ""), g.user.username)
        flash(f"Mot de passe de {username} remplacé ; ses sessions sont fermées.", "success")
    except AccountError as exc:
        flash(f"Mot de passe inchangé : {exc}.", "error")
    return redirect(url_for("auth.users"))
