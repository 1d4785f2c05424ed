"""The review UI's doors: every route's permissions, CSRF, login and lockout, sessions, users, the CLI."""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from redis import Redis
from review_support import (
    CHEAP_HASHER,
    GOOD_T1,
    PASSWORDS,
    ReviewEnv,
    build_env,
    bureau_codes,
    csrf_token,
    env,
    item_id_for,
    login,
    record_stray_upload,
    sqlite_journal,
    submit,
    write_pen_artefacts,
)
from sqlalchemy import select, update

from conftest import ROOT, free_port
from forms import Election
from pen_gateway.uploads import uploads
from registry import Registry
from returns_queue.journal import Journal, audit
from review import create_app
from review.accounts import login_attempts, sessions, users
from settings import Settings

__all__ = ["env", "sqlite_journal"]  # the fixtures, imported for pytest

# Every route of the app and who may use it. A route missing here fails test_every_route_is_listed.
GET_ROUTES = {
    "/": "login", "/items": "login", "/items/{item}": "login", "/items/{item}/page": "login",
    "/items/{item}/fields/votants.png": "login", "/progress": "login", "/progress/panel": "login",
    "/progress.json": "login", "/account/password": "login", "/uploads/{upload}": "login",
    "/uploads/{upload}/page": "login", "/uploads/{upload}/raw": "login",
    "/audit": "admin", "/audit.csv": "admin", "/users": "admin",
}
POST_ROUTES = {
    "/items/{item}/claim": "login", "/items/{item}/release": "login", "/items/{item}/approve": "login",
    "/items/{item}/reject": "login", "/uploads/{upload}/claim": "login", "/uploads/{upload}/release": "login",
    "/uploads/{upload}/assign": "login", "/uploads/{upload}/reject": "login", "/uploads/{upload}/counts": "login",
    "/account/password": "login", "/logout": "any",
    "/users": "admin", "/users/bob/role": "admin", "/users/bob/active": "admin", "/users/bob/password": "admin",
    "/login": "any",
}


@pytest.fixture
def pen_item(env: ReviewEnv) -> int:
    code = bureau_codes(env.registry)[0]
    upload_id = "01JPENITEM000000000000000A"
    counts = {**GOOD_T1, "votants": 251}
    write_pen_artefacts(env.settings.var_dir, upload_id, env.election, code, counts, counts,
                        {"votants": 0.55}, {"votants": [(3, 0, 0.4)]}, [("votants", 250)])
    sub = submit(env.journal, env.election, env.registry, code, counts, "pen",
                 {"upload_id": upload_id, "station_id": "st-1", "pen_serial": "AJX-1"})
    return item_id_for(env.journal, sub.return_id)


# A pen upload the OCR could attach to no bureau (review/unassigned_uploads.py), for the /uploads/ routes.
STRAY_UPLOAD = "01JSTRAYUPLOAD00000000000A"


@pytest.fixture
def stray_upload(env: ReviewEnv) -> str:
    record_stray_upload(env.journal, STRAY_UPLOAD, var_dir=env.settings.var_dir)
    raw = env.settings.var_dir / "stray.inkml"  # the station's bytes, for /uploads/<id>/raw
    raw.write_bytes(b"<ink/>")
    with env.journal.write() as conn:
        conn.execute(update(uploads).where(uploads.c.upload_id == STRAY_UPLOAD).values(path=str(raw)))
    return STRAY_UPLOAD


def _path(template: str, item: int) -> str:
    return template.format(item=item, upload=STRAY_UPLOAD)


def test_every_route_is_listed(env: ReviewEnv) -> None:
    rules = {(r.rule, m) for r in env.app.url_map.iter_rules() if r.endpoint != "static"
             for m in r.methods - {"HEAD", "OPTIONS"}}
    listed = {(p.replace("{item}", "<int:item_id>").replace("{upload}", "<upload_id>").replace("votants", "<field_id>")
               .replace("bob", "<username>"), "GET") for p in GET_ROUTES}
    listed |= {(p.replace("{item}", "<int:item_id>").replace("{upload}", "<upload_id>").replace("bob", "<username>"),
                "POST") for p in POST_ROUTES}
    listed |= {("/login", "GET")}
    listed |= {("/metrics", "GET")}  # no login on purpose: Prometheus scrapes it, counts only (test_telemetry_review)
    assert rules == listed


def test_anonymous_is_sent_to_login_everywhere(env: ReviewEnv, pen_item: int, stray_upload: str) -> None:
    client = env.client()
    for template in GET_ROUTES:
        response = client.get(_path(template, pen_item))
        assert response.status_code == 302, template
        assert response.headers["Location"].startswith("/login?next="), template
    token = csrf_token(client.get("/login").get_data(as_text=True))  # an anonymous session's token
    for template, who in POST_ROUTES.items():
        if who == "any":
            continue
        response = client.post(_path(template, pen_item), data={"csrf_token": token})
        assert response.status_code == 302 and response.headers["Location"].startswith("/login"), template


def test_supervisor_gets_403_on_admin_pages_and_admin_gets_them(env: ReviewEnv, pen_item: int,
                                                                stray_upload: str) -> None:
    supervisor, admin = env.client(), env.client()
    s_token, a_token = login(supervisor, "alice"), login(admin, "root")
    for template, who in GET_ROUTES.items():
        path = _path(template, pen_item)
        if path == "/":
            assert supervisor.get(path).headers["Location"] == admin.get(path).headers["Location"] == "/items"
            continue
        expected = 403 if who == "admin" else 200
        assert supervisor.get(path).status_code == expected, path
        assert admin.get(path).status_code == 200, path
    for template, who in POST_ROUTES.items():
        if who == "admin":
            assert supervisor.post(_path(template, pen_item), data={"csrf_token": s_token}).status_code == 403
    # The admin's posts work (here: change bob's role and back, each audited).
    assert admin.post("/users/bob/role", data={"csrf_token": a_token, "role": "admin"}).status_code == 302
    assert env.app.extensions["remontee_review"].accounts.get_user("bob").role == "admin"


def test_a_post_without_csrf_token_is_400_and_changes_nothing(env: ReviewEnv, pen_item: int, stray_upload: str) -> None:
    client = env.client()
    login(client, "root")
    before = _audit_count(env.journal)
    for template in POST_ROUTES:
        response = client.post(_path(template, pen_item), data={"reason": "x", "role": "admin", "active": "0",
                                                                "password": "un-mot-de-passe-long",
                                                                "username": "mallory"})
        assert response.status_code == 400, template
        assert "jeton de sécurité" in response.get_data(as_text=True)
    # A wrong token is refused the same way.
    assert client.post(f"/items/{pen_item}/reject", data={"csrf_token": "forged", "reason": "x"}).status_code == 400
    assert _audit_count(env.journal) == before
    assert env.app.extensions["remontee_review"].items.get(pen_item).state == "open"
    assert env.app.extensions["remontee_review"].uploads.get(stray_upload).waiting
    assert env.app.extensions["remontee_review"].accounts.get_user("bob").active


def _audit_count(journal: Journal, action: str | None = None) -> int:
    query = select(audit)
    if action:
        query = query.where(audit.c.action == action)
    with journal.read() as conn:
        return len(conn.execute(query).all())


def test_login_success_logout_and_the_audit_trail(env: ReviewEnv) -> None:
    client = env.client()
    page = client.get("/login")
    assert page.status_code == 200 and "Connexion des superviseurs" in page.get_data(as_text=True)
    token = csrf_token(page.get_data(as_text=True))
    response = client.post("/login", data={"username": "Alice", "password": PASSWORDS["alice"],
                                           "csrf_token": token, "next": "/progress"})
    assert response.status_code == 302 and response.headers["Location"] == "/progress"
    page = client.get("/progress")
    assert page.status_code == 200 and "alice" in page.get_data(as_text=True)
    # The CSRF token changed at login: the anonymous one no longer works.
    assert client.post("/logout", data={"csrf_token": token}).status_code == 400
    cookie = client.get_cookie("remontee_review")
    assert cookie is not None
    new_token = csrf_token(page.get_data(as_text=True))
    assert client.post("/logout", data={"csrf_token": new_token}).status_code == 302
    assert client.get("/items").status_code == 302
    # The old cookie, replayed, opens nothing: the session is gone on the server.
    thief = env.client()
    thief.set_cookie("remontee_review", cookie.value)
    assert thief.get("/items").status_code == 302
    assert _audit_count(env.journal, "login") == 1
    assert _audit_count(env.journal, "logout") == 1


def test_open_redirect_after_login_is_refused(env: ReviewEnv) -> None:
    client = env.client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    response = client.post("/login", data={"username": "alice", "password": PASSWORDS["alice"],
                                           "csrf_token": token, "next": "//evil.example/"})
    assert response.headers["Location"] == "/items"


# Browsers drop a tab or newline inside a URL (and werkzeug drops the tab from the Location header), so each
# of these would lead off-site once cleaned; a newline used to make the login answer 500.
OFF_SITE_NEXT = ["/\t/evil.example", "/\n/evil.example", "/\r\n/evil.example", "\t//evil.example", "/\x00/evil.example",
                 "/\u00a0/evil.example", "/\u200b/evil.example", "/\\evil.example", "https://evil.example/items"]


def test_a_next_with_control_or_space_characters_is_refused(env: ReviewEnv) -> None:
    client = env.client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    for target in OFF_SITE_NEXT:
        response = client.post("/login", data={"username": "alice", "password": PASSWORDS["alice"],
                                               "csrf_token": token, "next": target})
        assert (response.status_code, response.headers["Location"]) == (302, "/items"), repr(target)
        # Already logged in, the login page redirects at once: the same check applies.
        again = client.get("/login", query_string={"next": target})
        assert (again.status_code, again.headers["Location"]) == (302, "/items"), repr(target)
        client.post("/logout", data={"csrf_token": csrf_token(client.get("/items").get_data(as_text=True))})
        token = csrf_token(client.get("/login").get_data(as_text=True))
    # A path of this site, with its query, is still where the supervisor goes after logging in.
    response = client.post("/login", data={"username": "alice", "password": PASSWORDS["alice"],
                                           "csrf_token": token, "next": "/items?state=all&page=2"})
    assert response.headers["Location"] == "/items?state=all&page=2"


def test_wrong_password_and_unknown_user_get_the_same_answer(env: ReviewEnv) -> None:
    client = env.client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    wrong = client.post("/login", data={"username": "alice", "password": "pas-le-bon", "csrf_token": token})
    unknown = client.post("/login", data={"username": "nobody", "password": "pas-le-bon", "csrf_token": token})
    assert wrong.status_code == unknown.status_code == 401
    assert "Identifiant ou mot de passe incorrect" in wrong.get_data(as_text=True)
    assert "Identifiant ou mot de passe incorrect" in unknown.get_data(as_text=True)
    assert _audit_count(env.journal, "login_failed") == 2


def _try(client, username: str, password: str) -> int:
    token = csrf_token(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token}).status_code


def test_lockout_after_repeated_failures_then_release(env: ReviewEnv) -> None:
    client = env.client()
    for _ in range(5):
        assert _try(client, "alice", "mauvais-mot-de-passe") == 401
    # Locked: even the right password is refused, and says so.
    token = csrf_token(client.get("/login").get_data(as_text=True))
    response = client.post("/login", data={"username": "alice", "password": PASSWORDS["alice"], "csrf_token": token})
    assert response.status_code == 429
    assert "Trop d'échecs" in html.unescape(response.get_data(as_text=True))
    assert _audit_count(env.journal, "login_locked") == 1
    # Another supervisor is not locked by alice's failures.
    assert _try(env.client(), "bob", PASSWORDS["bob"]) == 302
    # Once the failures are older than the window, alice may log in again.
    with env.journal.write() as conn:
        conn.execute(update(login_attempts).values(at=login_attempts.c.at - 16 * 60))
    assert _try(client, "alice", PASSWORDS["alice"]) == 302


def test_a_success_clears_earlier_failures(env: ReviewEnv) -> None:
    client = env.client()
    for _ in range(4):
        assert _try(client, "alice", "mauvais-mot-de-passe") == 401
    assert _try(client, "alice", PASSWORDS["alice"]) == 302
    other = env.client()
    for _ in range(4):
        assert _try(other, "alice", "mauvais-mot-de-passe") == 401
    assert _try(other, "alice", PASSWORDS["alice"]) == 302


def test_an_admin_who_gives_a_locked_supervisor_a_new_password_lets_them_in(env: ReviewEnv) -> None:
    # Someone else's five guesses lock alice's name; the page tells her to wait or ask an administrator.
    guesser = env.client()
    for _ in range(5):
        assert _try(guesser, "alice", "mauvais-mot-de-passe") == 401
    alice = env.client()
    token = csrf_token(alice.get("/login").get_data(as_text=True))
    locked = alice.post("/login", data={"username": "alice", "password": PASSWORDS["alice"], "csrf_token": token})
    assert locked.status_code == 429 and "demandez à un administrateur" in html.unescape(locked.get_data(as_text=True))
    # What an administrator can do for her: a new password, given to her in person. The guesses were at the old one.
    admin = env.client()
    admin_token = login(admin, "root")
    assert admin.post("/users/alice/password", data={"csrf_token": admin_token,
                                                     "password": "nouveau-mot-de-passe"}).status_code == 302
    assert _try(env.client(), "alice", "nouveau-mot-de-passe") == 302
    # Guesses at the new password are counted afresh, and lock her name again at the fifth.
    for _ in range(5):
        assert _try(guesser, "alice", "mauvais-mot-de-passe") == 401
    assert _try(env.client(), "alice", "nouveau-mot-de-passe") == 429


def test_an_address_spraying_many_names_is_locked(env: ReviewEnv) -> None:
    client = env.client()
    for i in range(20):
        assert _try(client, f"nom{i}", "mauvais-mot-de-passe") == 401
    assert _try(client, "bob", PASSWORDS["bob"]) == 429


def _try_through_proxy(client, username: str, password: str, forwarded_for: str) -> int:
    """A login through nginx (docs/deploy.md): the request comes from 127.0.0.1, the browser's address is in
    X-Forwarded-For."""
    environ = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": forwarded_for}
    token = csrf_token(client.get("/login", environ_base=environ).get_data(as_text=True))
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token},
                       environ_base=environ).status_code


def test_behind_a_trusted_proxy_one_address_locked_is_not_everyone_locked(env: ReviewEnv) -> None:
    settings = replace(env.settings, review_trusted_proxies=1)
    app = create_app({"TESTING": True, "SETTINGS": settings, "JOURNAL": env.journal, "PASSWORD_HASHER": CHEAP_HASHER})
    for i in range(20):
        assert _try_through_proxy(app.test_client(), f"nom{i}", "mauvais-mot-de-passe", "203.0.113.7") == 401
    assert _try_through_proxy(app.test_client(), "bob", PASSWORDS["bob"], "203.0.113.7") == 429
    # An address the client wrote before nginx's own entry is not believed: the sprayer stays locked.
    assert _try_through_proxy(app.test_client(), "bob", PASSWORDS["bob"], "198.51.100.9, 203.0.113.7") == 429
    # Supervisors at other workstations log in, and the audit trail and their sessions say where from.
    assert _try_through_proxy(app.test_client(), "root", PASSWORDS["root"], "198.51.100.9") == 302
    with env.journal.read() as conn:
        login_row = conn.execute(select(audit).where(audit.c.action == "login", audit.c.subject == "root")).one()
        session_row = conn.execute(select(sessions).where(sessions.c.username == "root")).one()
    assert json.loads(login_row.after)["address"] == session_row.address == "198.51.100.9"
    # With no proxy trusted (the default), X-Forwarded-For is the client's word and is not believed.
    assert _try_through_proxy(env.client(), "alice", "mauvais-mot-de-passe", "192.0.2.1") == 401
    with env.journal.read() as conn:
        assert conn.execute(select(login_attempts.c.address).where(login_attempts.c.username == "alice")
                            ).scalar_one() == "127.0.0.1"


def test_the_documented_deployment_sends_the_session_cookie_over_tls_only(
        tmp_path: Path, sqlite_journal: Journal, redis_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/deploy.md puts the review UI behind nginx's TLS: its environment file must make the session cookie
    Secure, or a browser sends it in clear to any http:// address of the host a page makes it load."""
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    block = text.split("`/etc/remontee/env`", 1)[1].split("## nginx", 1)[0]
    variables = dict(line.strip().split("=", 1) for line in block.splitlines() if line.startswith("    REMONTEE_"))
    for name, value in variables.items():
        if name.startswith("REMONTEE_REVIEW_"):
            monkeypatch.setenv(name, value)
    settings = Settings(var_dir=tmp_path / "var", redis_url=redis_server.url, db_url=sqlite_journal.url,
                        review_trusted_proxies=int(variables["REMONTEE_REVIEW_TRUSTED_PROXIES"]))
    app = create_app(settings=settings)  # no test_config: the REMONTEE_REVIEW_* environment, as under gunicorn
    app.extensions["remontee_review"].accounts.add_user("alice", PASSWORDS["alice"], "supervisor", "test")
    client = app.test_client()
    environ = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "198.51.100.9"}  # through nginx
    token = csrf_token(client.get("/login", environ_base=environ).get_data(as_text=True))
    response = client.post("/login", data={"username": "alice", "password": PASSWORDS["alice"], "csrf_token": token},
                           environ_base=environ)
    assert response.status_code == 302
    [cookie] = [v for k, v in response.headers.items() if k == "Set-Cookie" and v.startswith("remontee_review=")]
    assert "; Secure" in cookie and "; HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_sessions_expire_when_idle_and_at_their_lifetime(env: ReviewEnv) -> None:
    client = env.client()
    login(client, "alice")
    assert client.get("/items").status_code == 200
    with env.journal.write() as conn:
        conn.execute(update(sessions).values(last_seen=time.time() - 31 * 60))
    response = client.get("/items", follow_redirects=True)
    assert "Votre session a expiré" in response.get_data(as_text=True)
    login(client, "alice")
    with env.journal.write() as conn:
        conn.execute(update(sessions).values(expires_at=time.time() - 1))
    assert client.get("/items").status_code == 302
    with env.journal.read() as conn:
        assert conn.execute(select(sessions)).all() == []  # the expired session was deleted


def _on_an_item_when_the_session_expires(env: ReviewEnv) -> tuple[Any, str, int]:
    """alice logged in, on an item's page; then her session is idle past its limit: (client, CSRF token, item)."""
    code = bureau_codes(env.registry)[0]
    item = item_id_for(env.journal, submit(env.journal, env.election, env.registry, code,
                                           {**GOOD_T1, "votants": 251}).return_id)
    client = env.client()
    token = login(client, "alice")
    client.get(f"/items/{item}")
    with env.journal.write() as conn:
        conn.execute(update(sessions).values(last_seen=time.time() - 31 * 60))
    return client, token, item


def test_a_correction_sent_after_the_session_expired_says_it_was_not_recorded_and_leads_back(
    env: ReviewEnv
) -> None:
    """The session ran out while the supervisor typed: nothing is written, the login says so, and after it the
    supervisor is back on the item's page (the approve action alone answered 405, in English)."""
    client, token, item = _on_an_item_when_the_session_expires(env)
    sent = client.post(f"/items/{item}/approve", headers={"Referer": f"http://localhost/items/{item}"},
                       data={"csrf_token": token, **{f"count-{k}": v for k, v in GOOD_T1.items()}})
    assert sent.status_code == 302
    page = client.get(sent.headers["Location"])
    said = html.unescape(page.get_data(as_text=True))
    assert "Votre session a expiré : ce que vous venez d'envoyer n'a pas été enregistré" in said
    with env.journal.read() as conn:
        assert conn.execute(select(audit).where(audit.c.action == "approve")).all() == []
    back = client.post("/login", data={"username": "alice", "password": PASSWORDS["alice"],
                                       "csrf_token": csrf_token(said), "next": _next_of(sent)})
    assert back.status_code == 302 and back.headers["Location"] == f"/items/{item}"
    assert client.get(back.headers["Location"]).status_code == 200


def test_the_claim_heartbeat_after_the_session_expired_is_told_so_in_json(env: ReviewEnv) -> None:
    """The item page's heartbeat (fetch, JSON) followed the login redirect to an HTML page it could not read and
    said nothing: the supervisor kept typing figures that could no longer be sent."""
    client, token, item = _on_an_item_when_the_session_expires(env)
    beat = client.post(f"/items/{item}/claim", headers={"X-CSRFToken": token, "Accept": "application/json"})
    assert beat.status_code == 401 and beat.json["claimed"] is False
    assert "rien n'est encore enregistré" in beat.json["message"]


def _next_of(response: Any) -> str:
    return parse_qs(urlsplit(response.headers["Location"]).query)["next"][0]


def test_error_pages_say_in_french_what_happened_and_what_to_do(env: ReviewEnv) -> None:
    """A form's action opened as a page (the address bar after a refused approval), a note too long: werkzeug's
    English descriptions were shown as they were."""
    client = env.client()
    token = login(client, "alice")
    opened = client.get("/items/1/approve")
    assert opened.status_code == 405
    assert "ne s'ouvre pas directement" in html.unescape(opened.get_data(as_text=True))
    assert "The method" not in opened.get_data(as_text=True)
    too_long = client.post("/items/1/approve", data={"csrf_token": token, "note": "x" * 300_000})
    assert too_long.status_code == 413
    assert "trop volumineux" in too_long.get_data(as_text=True) and "capacity" not in too_long.get_data(as_text=True)


def test_passwords_are_stored_as_argon2id_hashes(env: ReviewEnv) -> None:
    with env.journal.read() as conn:
        rows = conn.execute(select(users.c.username, users.c.password_hash)).all()
    for name, stored in rows:
        assert stored.startswith("$argon2id$")
        assert PASSWORDS[name] not in stored


def test_admin_manages_users_and_every_change_is_audited(env: ReviewEnv) -> None:
    admin, bob = env.client(), env.client()
    token = login(admin, "root")
    login(bob, "bob")
    assert bob.get("/items").status_code == 200
    response = admin.post("/users", data={"csrf_token": token, "username": "carol", "role": "supervisor",
                                          "password": "carol-mot-de-passe", "confirm_password": "carol-mot-de-passe"})
    assert response.status_code == 302
    assert _try(env.client(), "carol", "carol-mot-de-passe") == 302
    # Too short a password, or an existing name: refused with a reason.
    refused = admin.post("/users", data={"csrf_token": token, "username": "dave", "role": "supervisor",
                                         "password": "court", "confirm_password": "court"})
    assert refused.status_code == 400 and "10 caractères" in refused.get_data(as_text=True)
    again = admin.post("/users", data={"csrf_token": token, "username": "carol", "role": "admin",
                                       "password": "carol-mot-de-passe", "confirm_password": "carol-mot-de-passe"})
    assert again.status_code == 400 and "existe déjà" in again.get_data(as_text=True)
    # Disabling bob ends his session at once.
    assert admin.post("/users/bob/active", data={"csrf_token": token, "active": "0"}).status_code == 302
    assert bob.get("/items").status_code == 302
    assert _try(env.client(), "bob", PASSWORDS["bob"]) == 401
    # A new password for carol; the old one stops working.
    admin.post("/users/carol/password", data={"csrf_token": token, "password": "nouveau-mot-de-passe"})
    assert _try(env.client(), "carol", "carol-mot-de-passe") == 401
    assert _try(env.client(), "carol", "nouveau-mot-de-passe") == 302
    # The admin cannot lock themselves out.
    admin.post("/users/root/active", data={"csrf_token": token, "active": "0"})
    assert env.app.extensions["remontee_review"].accounts.get_user("root").active
    assert admin.post("/users/nobody/role", data={"csrf_token": token, "role": "admin"}).status_code == 404
    with env.journal.read() as conn:
        actions = [r.action for r in conn.execute(select(audit).where(audit.c.actor == "root"))]
    assert {"user_add", "user_disable", "user_password"} <= set(actions)


def test_the_last_admin_cannot_be_demoted(env: ReviewEnv) -> None:
    admin = env.client()
    token = login(admin, "root")
    response = admin.post("/users/root/role", data={"csrf_token": token, "role": "supervisor"}, follow_redirects=True)
    assert "dernier administrateur" in response.get_data(as_text=True)
    assert env.app.extensions["remontee_review"].accounts.get_user("root").role == "admin"


def test_own_password_change(env: ReviewEnv) -> None:
    client = env.client()
    token = login(client, "alice")
    wrong = client.post("/account/password", data={"csrf_token": token, "current_password": "faux",
                                                   "new_password": "encore-un-mot-de-passe",
                                                   "confirm_password": "encore-un-mot-de-passe"})
    assert wrong.status_code == 400
    ok = client.post("/account/password", data={"csrf_token": token, "current_password": PASSWORDS["alice"],
                                                "new_password": "encore-un-mot-de-passe",
                                                "confirm_password": "encore-un-mot-de-passe"})
    assert ok.status_code == 302
    assert _try(env.client(), "alice", "encore-un-mot-de-passe") == 302


def test_guessing_the_current_password_is_locked_out_and_audited(env: ReviewEnv) -> None:
    # A stolen session must not become a way to guess its owner's password, then take the account.
    thief = env.client()
    token = login(thief, "alice")
    new = {"csrf_token": token, "new_password": "volé-volé-volé", "confirm_password": "volé-volé-volé"}
    for n in range(5):
        assert thief.post("/account/password", data={**new, "current_password": f"essai-{n}"}).status_code == 400
    locked = thief.post("/account/password", data={**new, "current_password": PASSWORDS["alice"]})
    assert locked.status_code == 429 and "trop d'échecs" in html.unescape(locked.get_data(as_text=True))
    with env.journal.read() as conn:
        failures = conn.execute(select(login_attempts).where(login_attempts.c.username == "alice",
                                                             login_attempts.c.success.is_(False))).all()
        trail = conn.execute(select(audit).where(audit.c.subject == "alice").order_by(audit.c.id)).all()
    assert len(failures) == 5
    assert [r.action for r in trail] == ["user_add", "login", *["login_failed"] * 5, "login_locked"]
    assert all(json.loads(r.after)["during"] == "password_change" for r in trail[2:])
    # The password is unchanged, and the name is locked at the login form as well.
    assert _try(env.client(), "alice", PASSWORDS["alice"]) == 429
    with env.journal.write() as conn:
        conn.execute(update(login_attempts).values(at=login_attempts.c.at - 16 * 60))
    assert _try(env.client(), "alice", PASSWORDS["alice"]) == 302


def test_security_headers(env: ReviewEnv) -> None:
    response = env.client().get("/login")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Cache-Control"] == "no-store"
    cookie = response.headers.get("Set-Cookie", "")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def _cli(args: list[str], env_vars: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), *args], input=stdin, text=True,
                          capture_output=True, env={**os.environ, **env_vars}, timeout=60, cwd=ROOT)


def test_cli_users_add_from_stdin_then_login(tmp_path: Path, redis: Redis, redis_server, sqlite_journal: Journal,
                                             demo_registry_files: tuple[Path, Path], registry: Registry,
                                             election_t1: Election) -> None:
    variables = {"REMONTEE_DB_URL": sqlite_journal.url, "REMONTEE_VAR_DIR": str(tmp_path / "var")}
    done = _cli(["users", "add", "Carole", "--role", "admin", "--password-stdin"], variables,
                "carole-mot-de-passe\n")
    assert done.returncode == 0, done.stderr
    assert "carole" in done.stdout
    again = _cli(["users", "add", "carole", "--role", "admin", "--password-stdin"], variables, "x" * 12 + "\n")
    assert again.returncode == 1 and "existe déjà" in again.stderr
    listing = _cli(["users", "list"], variables)
    assert "carole" in listing.stdout and "administrateur" in listing.stdout
    review_env = build_env(tmp_path, sqlite_journal, redis, demo_registry_files[0], registry, election_t1,
                           redis_server.url)
    assert _try(review_env.client(), "carole", "carole-mot-de-passe") == 302
    with sqlite_journal.read() as conn:
        row = conn.execute(select(audit).where(audit.c.action == "user_add", audit.c.subject == "carole")).one()
    assert row.actor.startswith("cli:")


def _failed_login_over_http(port: int, forwarded_for: str) -> int:
    import http.cookiejar
    import urllib.error
    import urllib.parse
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    with opener.open(f"http://127.0.0.1:{port}/login", timeout=5) as response:
        token = csrf_token(response.read().decode())
    body = urllib.parse.urlencode({"username": "alice", "password": "mauvais-mot-de-passe", "csrf_token": token})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/login", data=body.encode(),
                                     headers={"X-Forwarded-For": forwarded_for})
    try:
        with opener.open(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_review_subcommand_serves_with_gunicorn(tmp_path: Path, redis_server, sqlite_journal: Journal,
                                                demo_registry_files: tuple[Path, Path]) -> None:
    import urllib.request

    port = free_port()
    var = tmp_path / "var"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "run_gateway.py"), "review", "--review-port", str(port), "--workers", "1",
         "--review-trusted-proxies", "1"],
        env={**os.environ, "REMONTEE_DB_URL": sqlite_journal.url, "REMONTEE_VAR_DIR": str(var),
             "REMONTEE_REDIS_URL": redis_server.url, "REMONTEE_REGISTRY": str(demo_registry_files[0])},
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        body = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=2) as response:
                    body = response.read().decode()
                    break
            except OSError:
                if process.poll() is not None:
                    break
                time.sleep(0.1)
        assert "Connexion des superviseurs" in body
        assert (var / "secret_key").is_file() and oct((var / "secret_key").stat().st_mode)[-3:] == "600"
        # The settings flags reach the app, not only the environment: here, the proxy in front of it is trusted.
        assert _failed_login_over_http(port, "203.0.113.7") == 401
        with sqlite_journal.read() as conn:
            assert conn.execute(select(login_attempts.c.address)).scalar_one() == "203.0.113.7"
    finally:
        process.terminate()
        process.wait(15)
    assert process.returncode == 0


def test_login_page_says_how_to_create_the_first_account(tmp_path: Path, sqlite_journal: Journal, redis: Redis,
                                                         redis_server, demo_registry_files: tuple[Path, Path],
                                                         election_t1: Election) -> None:
    from review import create_app
    from settings import Settings

    settings = Settings(var_dir=tmp_path / "var", redis_url=redis_server.url, db_url=sqlite_journal.url,
                        registry=demo_registry_files[0], secret_key="x")
    app = create_app({"TESTING": True, "SETTINGS": settings, "JOURNAL": sqlite_journal})
    page = app.test_client().get("/login").get_data(as_text=True)
    assert "users add NOM --role admin" in page
    app.extensions["remontee_review"].accounts.add_user("root", "root-mot-de-passe", "admin", "test")
    assert "users add NOM" not in app.test_client().get("/login").get_data(as_text=True)
