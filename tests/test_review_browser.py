"""The review UI in a real browser: Playwright from PyPI driving Debian's Chromium against the app served
for real on a loopback port. Log in, open an item, correct one count, approve; the job is in Redis and the
audit row exists. A screenshot of each page goes under test-output/screenshots/ (git-ignored)."""

from __future__ import annotations

import math
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import playwright.sync_api as playwright_api
import pytest
from review_support import (
    GOOD_T1,
    PASSWORDS,
    ReviewEnv,
    build_env,
    bureau_codes,
    item_id_for,
    sqlite_journal,
    submit,
    write_pen_artefacts,
)
from rq.job import Job
from sqlalchemy import select, update
from werkzeug.serving import make_server

from conftest import ROOT, free_port
from returns_queue.jobs import return_job_id
from returns_queue.journal import audit, returns, review_items
from returns_queue.relay import Relay
from review.accounts import sessions

__all__ = ["sqlite_journal"]  # the fixture, imported for pytest
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SCREENSHOTS = ROOT / "test-output" / "screenshots"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail("Chromium is not installed: run the tests with `make test`, which installs it")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture
def served(tmp_path: Path, sqlite_journal, redis, redis_server, demo_registry_files, registry,
           election_t1) -> Iterator[tuple[str, ReviewEnv]]:
    env = build_env(tmp_path, sqlite_journal, redis, demo_registry_files[0], registry, election_t1, redis_server.url,
                    PROGRESS_REFRESH_SECONDS=1)
    server = make_server("127.0.0.1", free_port(), env.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="review-ui", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", env
    server.shutdown()
    thread.join(10)


def _watch_console(page: Any) -> list[str]:
    """Console errors, CSP violations included: a page that breaks its own policy fails the test."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def _shot(page: Any, path: Path, full_page: bool = True) -> None:
    page.screenshot(path=str(path), full_page=full_page, animations="disabled")


def _log_in(page: Any, base: str, username: str) -> None:
    page.goto(f"{base}/login")
    page.get_by_label("Identifiant").fill(username)
    page.get_by_label("Mot de passe").fill(PASSWORDS[username])
    page.get_by_role("button", name="Se connecter").click()
    page.wait_for_url(f"{base}/items")


def _seed(env: ReviewEnv) -> dict[str, Any]:
    codes = bureau_codes(env.registry)
    for i, code in enumerate(codes[10:40]):
        channel = "ivr" if i % 3 else "pen"
        submit(env.journal, env.election, env.registry, code, {**GOOD_T1, "aubry": 60 + i % 5, "valls": 15 - i % 5},
               channel)
    # Spread the accepted returns over the last hour, as an evening's curve, for the chart.
    now = time.time()
    with env.journal.write() as conn:
        for i, code in enumerate(codes[10:40]):
            conn.execute(update(returns).where(returns.c.bureau == code)
                         .values(journaled_at=now - 3600 + 3400 * math.sqrt(i / 30)))
    phone = submit(env.journal, env.election, env.registry, codes[0], {**GOOD_T1, "votants": 215})
    upload_id = "01JBROWSERPEN0000000000000"
    read = {**GOOD_T1, "hollande": 80}
    write_pen_artefacts(env.settings.var_dir, upload_id, env.election, codes[1], GOOD_T1, read,
                        {"hollande": 0.52, "votants": 0.97}, {"hollande": [(2, 9, 0.45)]}, [("hollande", 90)])
    pen = submit(env.journal, env.election, env.registry, codes[1], read, "pen",
                 {"upload_id": upload_id, "station_id": "station-12", "pen_serial": "AJX-00C0FE"})
    conflict = submit(env.journal, env.election, env.registry, codes[11],  # accepted by phone above
                      {**GOOD_T1, "aubry": 70, "hollande": 80}, "pen")
    assert phone.status == pen.status == conflict.status == "review"
    return {"phone": phone, "pen": pen, "conflict": conflict, "codes": codes}


def test_log_in_correct_one_count_approve_then_job_in_redis_and_audit_row(
    browser: Any, served: tuple[str, ReviewEnv], screenshots: Path
) -> None:
    base, env = served
    seeded = _seed(env)
    context = browser.new_context(viewport={"width": 1366, "height": 900}, locale="fr-FR")
    page = context.new_page()
    errors = _watch_console(page)

    # Anonymous → the login page.
    page.goto(f"{base}/items")
    assert "/login" in page.url
    _shot(page, screenshots / "01-login.png")
    _log_in(page, base, "alice")
    expect = playwright_api.expect
    expect(page.get_by_role("heading", name="File d'attente")).to_be_visible()
    _shot(page, screenshots / "02-queue.png")

    # Open the phone item (the oldest) from the queue.
    code = seeded["codes"][0]
    page.get_by_role("link", name=f"Ouvrir le retour du bureau {code}").click()
    item = item_id_for(env.journal, seeded["phone"].return_id)
    page.wait_for_url(f"{base}/items/{item}")
    expect(page.get_by_text("Réservé par vous")).to_be_visible()
    total_check = page.locator('[data-check="total"] .check-result')
    expect(total_check).to_contain_text("écart")
    # Correct one count: 215 keyed for 250; the live check turns right.
    votants = page.get_by_label("Nombre de votants (émargements)")
    votants.fill("250")
    expect(total_check).to_have_text("juste (250)")
    expect(page.locator('[data-check="sum"] .check-result')).to_have_text("juste (240)")
    _shot(page, screenshots / "03-item-phone.png")
    page.get_by_role("button", name="Approuver la correction").click()
    page.wait_for_url(f"{base}/items")
    expect(page.get_by_text("Correction approuvée")).to_be_visible()
    _shot(page, screenshots / "04-queue-after-approval.png")

    # The return is journaled, the relay puts it on RQ, the audit row is there.
    decided = env.app.extensions["remontee_review"].items.get(item)
    assert decided.state == "approved" and decided.decided_by == "alice"
    assert Relay(env.journal, env.redis, env.settings.consolidate_job).relay_once() >= 1
    job = Job.fetch(return_job_id(decided.result_return_id), connection=env.redis)
    assert job.args[0]["channel"] == "review" and job.args[0]["counts"]["votants"] == 250
    assert job.args[0]["supersedes"] == seeded["phone"].return_id
    with env.journal.read() as conn:
        row = conn.execute(select(audit).where(audit.c.action == "approve")).one()
    assert row.actor == "alice" and row.subject == seeded["phone"].return_id

    # A pen item: the page, the crops, the reading; the suggestion button fills the field.
    pen_item = item_id_for(env.journal, seeded["pen"].return_id)
    page.goto(f"{base}/items/{pen_item}")
    expect(page.get_by_role("img", name="Procès-verbal du bureau")).to_be_visible()
    natural = page.locator(".page-image img").evaluate("img => img.naturalWidth")
    assert natural == 620  # the PNG was served and decoded
    # Beside the 80 read (its first two boxes empty, as on any form), the reading the model hesitated on.
    hollande = page.locator('tr[data-row="hollande"]')
    expect(hollande.locator(".reading")).to_contain_text("ou 90 (45 %)")
    hollande.locator('.reading [data-apply-field="hollande"]').click()
    expect(page.get_by_label("François HOLLANDE")).to_have_value("90")
    page.get_by_label("François HOLLANDE").fill("80")
    page.locator('.suggestions [data-apply-field="hollande"]').click()
    expect(page.get_by_label("François HOLLANDE")).to_have_value("90")
    expect(total_check).to_have_text("juste (250)")
    _shot(page, screenshots / "05-item-pen.png")

    # A channel conflict: both returns side by side, the differing counts highlighted.
    conflict_item = item_id_for(env.journal, seeded["conflict"].return_id)
    page.goto(f"{base}/items/{conflict_item}")
    expect(page.locator("tr.differs")).to_have_count(3)  # aubry, hollande, and valls (61 and 14 by phone)
    page.get_by_role("button", name="Reprendre les chiffres du retour téléphone").click()
    expect(page.get_by_label("Martine AUBRY")).to_have_value("61")
    _shot(page, screenshots / "06-item-conflict.png")

    # Progress, in the dark theme, refreshing by itself.
    page.emulate_media(color_scheme="dark")
    page.goto(f"{base}/progress")
    reported = page.locator('[data-figure="reported"]')
    before = int(reported.inner_text())
    submit(env.journal, env.election, env.registry, seeded["codes"][50], GOOD_T1)
    expect(reported).to_have_text(str(before + 1), timeout=10_000)
    _shot(page, screenshots / "07-progress-dark.png")
    assert errors == []

    # The admin's pages: the audit trail shows the approval, the users.
    admin = browser.new_context(viewport={"width": 1366, "height": 900}, locale="fr-FR").new_page()
    admin_errors = _watch_console(admin)
    _log_in(admin, base, "root")
    admin.get_by_role("link", name="Journal d'audit").click()
    expect(admin.locator("tr.action-approve")).to_have_count(1)
    expect(admin.locator("tr.action-approve")).to_contain_text("alice")
    _shot(admin, screenshots / "08-audit.png")
    with admin.expect_download() as download:
        admin.get_by_role("link", name="Exporter en CSV").click()
    assert "approve" in Path(download.value.path()).read_text()
    admin.get_by_role("link", name="Utilisateurs").click()
    expect(admin.get_by_role("heading", name="Utilisateurs")).to_be_visible()
    _shot(admin, screenshots / "09-users.png")
    admin.get_by_role("link", name="Progression").click()
    _shot(admin, screenshots / "10-progress-light.png")
    assert admin_errors == []


def test_keyboard_only_login_and_visible_focus(browser: Any, served: tuple[str, ReviewEnv],
                                               screenshots: Path) -> None:
    base, _ = served
    page = browser.new_context(viewport={"width": 1280, "height": 800}, locale="fr-FR").new_page()
    page.goto(f"{base}/login")
    # The name field has the focus on arrival; the rest is typing, Tab and Enter.
    playwright_api.expect(page.get_by_label("Identifiant")).to_be_focused()
    page.keyboard.type("alice")
    page.keyboard.press("Tab")
    playwright_api.expect(page.get_by_label("Mot de passe")).to_be_focused()
    page.keyboard.type(PASSWORDS["alice"])
    page.keyboard.press("Enter")
    page.wait_for_url(f"{base}/items")
    # First Tab: the skip link, with a visible focus ring; Enter on it moves to the content.
    page.keyboard.press("Tab")
    skip = page.locator(".skip-link")
    playwright_api.expect(skip).to_be_focused()
    outline = skip.evaluate("el => getComputedStyle(el).outlineStyle + ' ' + getComputedStyle(el).outlineWidth")
    assert outline == "solid 3px"
    page.keyboard.press("Enter")
    playwright_api.expect(page.locator("main")).to_be_focused()
    # Every form control of the queue page has a label.
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')).map(el => el.name)""")
    assert unlabeled == []
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    _shot(page, screenshots / "11-queue-keyboard-focus.png", full_page=False)


def test_a_tab_left_open_on_an_item_does_not_keep_the_session_nor_the_item(
    browser: Any, served: tuple[str, ReviewEnv]
) -> None:
    """alice opens an item and walks away, the tab left open. The page renews its claim every 90 s; that renewal
    refreshed her session too, so it never went idle: the item stayed « en cours de traitement par alice » for
    everyone, and her session open on an unattended desk, for the session's 12 h. Now the session ends 30 min
    after her last action, the page says so, and the claim runs out behind it."""
    base, env = served
    code = bureau_codes(env.registry)[0]
    item = item_id_for(env.journal, submit(env.journal, env.election, env.registry, code,
                                           {**GOOD_T1, "votants": 251}).return_id)
    page = browser.new_context(locale="fr-FR").new_page()
    page.clock.install()  # the page's timers run when the test says: its heartbeat every 90 s
    _log_in(page, base, "alice")
    page.goto(f"{base}/items/{item}")
    banner = page.locator(".claim")
    playwright_api.expect(banner).to_contain_text("Réservé par vous")

    def walk_away(minutes: float) -> int:
        """alice away `minutes` longer, the tab open (her session and her claim as old); the page's next beat."""
        with env.journal.write() as conn:
            conn.execute(update(sessions).values(last_seen=sessions.c.last_seen - minutes * 60,
                                                 created_at=sessions.c.created_at - minutes * 60))
        with page.expect_response(lambda r: r.url.endswith(f"/items/{item}/claim")) as beat:
            page.clock.run_for(91_000)
        return beat.value.status

    assert walk_away(20) == 200  # 20 min: the session lives, the claim is renewed
    assert walk_away(20) == 401  # 40 min without a click: the session is over, and the page says so
    playwright_api.expect(banner).to_contain_text("Session expirée")
    # Nobody renews the claim any more: once it runs out, bob takes the item.
    with env.journal.write() as conn:
        conn.execute(update(review_items).values(claimed_until=time.time() - 1))
    other = browser.new_context(locale="fr-FR").new_page()
    _log_in(other, base, "bob")
    other.goto(f"{base}/items/{item}")
    playwright_api.expect(other.locator(".claim")).to_contain_text("Réservé par vous")


def test_a_refused_correction_leads_the_keyboard_to_the_count_refused_and_says_why_there(
    browser: Any, served: tuple[str, ReviewEnv]
) -> None:
    """A correction the server refuses comes back with the refused count marked aria-invalid, but the page's
    live check unmarked it at once (it knows nothing of why the server said no), the message stood only in the
    alert above the table, and the focus was nowhere: a keyboard or screen-reader user had to find the field."""
    base, env = served
    codes = bureau_codes(env.registry)
    inscrits = env.registry.get(codes[0]).inscrits
    item = item_id_for(env.journal, submit(env.journal, env.election, env.registry, codes[0],
                                           {**GOOD_T1, "votants": 251}).return_id)
    page = browser.new_context(locale="fr-FR").new_page()
    errors = _watch_console(page)
    _log_in(page, base, "alice")
    page.goto(f"{base}/items/{item}")
    votants = page.get_by_label("Nombre de votants (émargements)")
    # The form's own sums hold, but more votants than the registry's inscrits: only the server knows why.
    others = sum(v for k, v in GOOD_T1.items() if k not in ("votants", "blancs_nuls", "exprimes", "aubry"))
    assert inscrits > others
    over = {"votants": inscrits + 10, "blancs_nuls": 10, "exprimes": inscrits, "aubry": inscrits - others}
    for field_id, value in over.items():
        page.locator(f"#count-{field_id}").fill(str(value))
    page.get_by_role("button", name="Approuver la correction").click()
    page.wait_for_url(f"{base}/items/{item}/approve")
    playwright_api.expect(page.locator(".alert li")).to_have_text([f"{inscrits + 10} votants pour {inscrits} inscrits"])
    playwright_api.expect(votants).to_be_focused()
    playwright_api.expect(votants).to_have_attribute("aria-invalid", "true")
    playwright_api.expect(votants).to_have_accessible_description(
        re.compile(f"{inscrits + 10} votants pour {inscrits} inscrits"))
    # Changed, the count is the live check's again.
    page.keyboard.press("Control+A")
    page.keyboard.type(str(inscrits))
    playwright_api.expect(votants).to_have_attribute("aria-invalid", "false")
    assert [e for e in errors if "422" not in e] == []


def test_enter_in_a_count_moves_to_the_next_count_and_approving_takes_the_button(
    browser: Any, served: tuple[str, ReviewEnv]
) -> None:
    """Enter in a count sent the form: a supervisor pressing Enter to « validate » the count just corrected approved
    the whole item, the counts below it unchecked. Enter now goes to the next count (and does nothing in the last);
    approving takes the button, by the mouse or by the keyboard (Tab to it, then Enter or Space)."""
    base, env = served
    code = bureau_codes(env.registry)[0]
    item = item_id_for(env.journal, submit(env.journal, env.election, env.registry, code,
                                           {**GOOD_T1, "votants": 251}).return_id)
    page = browser.new_context(locale="fr-FR").new_page()
    errors = _watch_console(page)
    _log_in(page, base, "alice")
    page.goto(f"{base}/items/{item}")
    # Count the form's submissions (and hold them) while Enter is pressed: a submit event fires as the key does.
    page.evaluate("""() => { window.sent = 0; window.hold = e => { window.sent++; e.preventDefault(); };
                           document.getElementById('approve-form').addEventListener('submit', window.hold); }""")
    votants = page.get_by_label("Nombre de votants (émargements)")
    votants.fill("250")
    page.keyboard.press("Enter")
    playwright_api.expect(page.get_by_label("Bulletins blancs et nuls")).to_be_focused()
    page.keyboard.press("Enter")
    playwright_api.expect(page.get_by_label("Suffrages exprimés")).to_be_focused()
    last = page.locator("input.count-input").last
    last.focus()
    page.keyboard.press("Enter")
    playwright_api.expect(last).to_be_focused()
    assert page.evaluate("window.sent") == 0
    page.evaluate("() => document.getElementById('approve-form').removeEventListener('submit', window.hold)")
    assert env.app.extensions["remontee_review"].items.get(item).state == "open"
    # The keyboard approves on the button itself.
    approve = page.get_by_role("button", name="Approuver la correction")
    for _ in range(20):
        page.keyboard.press("Tab")
        if approve.evaluate("b => b === document.activeElement"):
            break
    playwright_api.expect(approve).to_be_focused()
    page.keyboard.press("Enter")
    page.wait_for_url(f"{base}/items")
    assert env.app.extensions["remontee_review"].items.get(item).state == "approved"
    assert errors == []


def test_a_dashboard_left_open_does_not_keep_the_session(browser: Any, served: tuple[str, ReviewEnv]) -> None:
    """alice leaves the progress page open and walks away. The page refreshes its panel every few seconds; that
    refresh refreshed her session too, so a dashboard on an unattended desk stayed logged in for the session's
    whole 12 h. Now the session ends 30 min after her last action, and the page goes to the login, saying so."""
    base, env = served
    page = browser.new_context(locale="fr-FR").new_page()
    page.clock.install()  # the page's timers run when the test says: its refresh every second here
    _log_in(page, base, "alice")
    page.goto(f"{base}/progress")
    playwright_api.expect(page.get_by_role("heading", name="Progression de la remontée")).to_be_visible()

    def walk_away(minutes: float) -> int:
        """alice away `minutes` longer, the dashboard open; the page's next refresh of its panel."""
        with env.journal.write() as conn:
            conn.execute(update(sessions).values(last_seen=sessions.c.last_seen - minutes * 60,
                                                 created_at=sessions.c.created_at - minutes * 60))
        with page.expect_response(lambda r: "/progress/panel" in r.url) as refresh:
            page.clock.run_for(1_100)
        return refresh.value.status

    assert walk_away(20) == 200  # 20 min: the session lives, the panel is refreshed
    # 40 min without a click: the refresh finds the session over and the page goes to the login.
    assert walk_away(20) == 302
    page.wait_for_url(re.compile(r"/login\?next=/progress$"))
    playwright_api.expect(page.get_by_text("Votre session a expiré")).to_be_visible()
