"""The audit trail (filters, CSV export) and the progress dashboard (figures from the journal, registry, Redis)."""

from __future__ import annotations

import csv
import html
import io
import json
import re
import sqlite3
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from redis import Redis
from review_support import GOOD_T1, ReviewEnv, build_env, bureau_codes, csrf_token, env, item_id_for, login, submit
from sqlalchemy import func, select, update
from sqlalchemy import text as text_sql

from conftest import free_port
from forms import Election
from pen_gateway.signing import StationRegistry
from registry import Registry
from returns_queue.journal import Journal, audit, returns
from returns_queue.relay import Relay
from review.progress_data import bucket_size, compute_progress

__all__ = ["env"]


def text(response) -> str:
    return html.unescape(response.get_data(as_text=True))


def _approve_one(env: ReviewEnv, who: str = "alice") -> str:
    code = bureau_codes(env.registry)[0]
    sub = submit(env.journal, env.election, env.registry, code, {**GOOD_T1, "votants": 251})
    client = env.client()
    token = login(client, who)
    item = item_id_for(env.journal, sub.return_id)
    response = client.post(f"/items/{item}/approve",
                           data={"csrf_token": token, **{f"count-{k}": v for k, v in GOOD_T1.items()}})
    assert response.status_code == 303
    return sub.return_id


def test_audit_trail_shows_who_when_what_before_after(env: ReviewEnv) -> None:
    original = _approve_one(env)
    admin = env.client()
    login(admin, "root")
    page = text(admin.get("/audit"))
    assert "approbation" in page and original in page
    assert "<del>251</del> → <ins>250</ins>" in page  # before → after, for the count that changed
    assert "connexion" in page and "création d'utilisateur" in page


def _approve(env: ReviewEnv, client: object, token: str, return_id: str, counts: dict[str, int],
             **extra: str) -> None:
    item = item_id_for(env.journal, return_id)
    seen = re.search(r'name="seen_accepted" value="([^"]*)"', text(client.get(f"/items/{item}"))).group(1)
    response = client.post(f"/items/{item}/approve", data={
        "csrf_token": token, "seen_accepted": seen, **{f"count-{k}": v for k, v in counts.items()}, **extra})
    assert response.status_code == 303, text(response)[:300]


def test_audit_of_an_approval_keeps_the_accepted_figures_it_replaced_and_a_new_bureau(env: ReviewEnv) -> None:
    """A conflict approved with the pen's figures replaces the phone's accepted ones: the trail said « chiffres
    confirmés sans changement » and kept nothing of them; an unknown bureau's figures given their bureau, the same."""
    codes = bureau_codes(env.registry)
    phone = submit(env.journal, env.election, env.registry, codes[0], GOOD_T1)
    pen_counts = {**GOOD_T1, "aubry": 61, "hollande": 89}
    pen = submit(env.journal, env.election, env.registry, codes[0], pen_counts, "pen")
    stray = submit(env.journal, env.election, env.registry, "999999", GOOD_T1)
    assert (phone.status, pen.status, stray.status) == ("accepted", "review", "review")
    client = env.client()
    token = login(client, "alice")
    _approve(env, client, token, pen.return_id, pen_counts)
    _approve(env, client, token, stray.return_id, GOOD_T1, bureau=codes[1])
    with env.journal.read() as conn:
        rows = {r.subject: r for r in conn.execute(audit.select().where(audit.c.action == "approve"))}
    before = json.loads(rows[pen.return_id].before)
    assert before["accepted"]["return_id"] == phone.return_id and before["accepted"]["receipt"] == phone.receipt
    assert before["accepted"]["counts"]["aubry"] == 60
    assert "accepted" not in json.loads(rows[stray.return_id].before)  # the bureau had nothing accepted
    admin = env.client()
    login(admin, "root")
    page = text(admin.get("/audit?action=approve"))
    assert "chiffres confirmés sans changement" not in page
    assert f"remplace le retour accepté téléphone (reçu {phone.receipt})" in page
    assert "<del>60</del> → <ins>61</ins>" in page and "<del>90</del> → <ins>89</ins>" in page
    # Each count by its printed label, not the definition's id.
    assert "Martine AUBRY</span> : <del>60</del>" in page and ">aubry<" not in page
    assert f"<del>999999</del> → <ins>{codes[1]}</ins>" in page


def test_a_docking_stations_registration_and_revocation_are_named_in_the_audit_trail(env: ReviewEnv) -> None:
    stations = StationRegistry(env.journal, env.settings.var_dir)
    stations.add("gare-du-nord-1")
    stations.revoke("gare-du-nord-1")
    admin = env.client()
    login(admin, "root")
    page = text(admin.get("/audit?subject=gare-du-nord-1"))
    assert "station d'envoi enregistrée" in page and "station d'envoi révoquée" in page
    assert ">station_add<" not in page and ">station_revoke<" not in page  # the codes are not what a reader sees
    assert "2 lignes" in page
    assert "1 ligne" in text(admin.get("/audit?action=station_revoke"))


def test_audit_filters(env: ReviewEnv) -> None:
    original = _approve_one(env)
    admin = env.client()
    login(admin, "root")
    only_approvals = text(admin.get("/audit?action=approve"))
    assert "1 ligne" in only_approvals and original in only_approvals
    by_actor = text(admin.get("/audit?actor=root"))
    assert "alice" not in by_actor.split("<tbody>")[1]
    assert original in text(admin.get(f"/audit?subject={original[-8:]}"))
    assert "Aucune ligne" in text(admin.get("/audit?subject=%25"))  # a LIKE wildcard is matched literally
    today = datetime.now(ZoneInfo("Europe/Paris")).date()
    assert original in text(admin.get(f"/audit?since={today}&until={today}"))
    tomorrow = today + timedelta(days=1)
    assert "Aucune ligne" in text(admin.get(f"/audit?since={tomorrow}"))
    assert original in text(admin.get("/audit?since=n'importe-quoi"))  # a bad date is ignored


def test_audit_page_beyond_the_database_integers_is_empty(env: ReviewEnv) -> None:
    # SQLite refuses an OFFSET above 2**63 - 1 with an OverflowError: this answered 500.
    original = _approve_one(env)
    admin = env.client()
    login(admin, "root")
    assert original in text(admin.get("/audit?page=1"))
    for page in (999999, 2**63, 10**20):  # a page past the last one is empty, whatever its number
        response = admin.get(f"/audit?page={page}")
        assert response.status_code == 200 and original not in text(response)


def test_audit_csv_export(env: ReviewEnv) -> None:
    original = _approve_one(env)
    # A login attempt whose name looks like a spreadsheet formula.
    client = env.client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    client.post("/login", data={"username": "=HYPERLINK(1)", "password": "x" * 12, "csrf_token": token})
    admin = env.client()
    login(admin, "root")
    response = admin.get("/audit.csv")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    with env.journal.read() as conn:
        assert len(rows) == len(conn.execute(audit.select()).all())
    approval = next(r for r in rows if r["action"] == "approve")
    assert approval["actor"] == "alice" and approval["subject"] == original
    assert json.loads(approval["before"])["counts"]["votants"] == 251
    assert json.loads(approval["after"])["counts"]["votants"] == 250
    assert approval["at_utc"].endswith("Z")
    failed = next(r for r in rows if r["action"] == "login_failed")
    assert failed["actor"] == "'=hyperlink(1)"
    filtered = list(csv.DictReader(io.StringIO(admin.get("/audit.csv?action=approve").get_data(as_text=True))))
    assert [r["action"] for r in filtered] == ["approve"]


def _open_reads(journal: Journal) -> int:
    """Read snapshots held on the journal: what stops SQLite from resetting its WAL (it then grows with every write)
    and PostgreSQL from vacuuming."""
    if journal.sqlite:
        raw = sqlite3.connect(journal.url.removeprefix("sqlite:///"))
        try:  # a TRUNCATE checkpoint is busy while any connection reads an older snapshot
            busy, _, _ = raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            raw.close()
        return busy
    with journal.read() as conn:
        return conn.execute(text_sql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                     "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()")).scalar_one()


def test_audit_csv_export_holds_no_read_while_the_download_waits(env: ReviewEnv) -> None:
    """A download the supervisor's browser reads slowly, or stops reading (a laptop put to sleep), must not hold a
    read of the journal until it ends: SQLite's WAL would grow with every return journaled meanwhile, and stay
    that size. The export reads the trail in batches, each in a read of its own, and is still the trail as it
    stood when the download started."""
    with env.journal.write() as conn:
        conn.execute(audit.insert(), [{"at": time.time(), "actor": "alice", "action": "approve",
                                       "subject": f"item {i}", "before": json.dumps({"note": "x" * 150})}
                                      for i in range(3000)])
    admin = env.client()
    login(admin, "root")
    with env.journal.read() as conn:
        expected = conn.execute(select(func.count()).select_from(audit)).scalar_one()
    response = admin.get("/audit.csv", buffered=False)
    try:
        chunks = iter(response.response)
        received = [next(chunks)]  # the browser has the first part and reads no further for now
        assert _open_reads(env.journal) == 0
        with env.journal.write() as conn:  # the night goes on meanwhile
            Journal.record_audit(conn, "bob", "login", "bob")
        received.extend(chunks)
    finally:
        response.close()
    rows = list(csv.DictReader(io.StringIO(b"".join(received).decode())))
    assert len(rows) == expected and len({r["id"] for r in rows}) == expected
    assert [int(r["id"]) for r in rows] == sorted(int(r["id"]) for r in rows)
    assert "bob" not in {r["actor"] for r in rows}  # appended after the download started


def _accept(env: ReviewEnv, code: str, channel: str = "ivr") -> None:
    assert submit(env.journal, env.election, env.registry, code, GOOD_T1, channel).status == "accepted"


def test_progress_counts_the_items_of_its_own_election(env: ReviewEnv, election_t2: Election) -> None:
    """The panel says « Élection primaire-2011-t1 »: an item of the other election, left open in the same journal,
    was counted among its items waiting while none of its returns or bureaux were."""
    codes = bureau_codes(env.registry)
    submit(env.journal, env.election, env.registry, codes[0], {**GOOD_T1, "votants": 251})
    other = submit(env.journal, election_t2, env.registry, codes[1],
                   {"votants": 100, "blancs_nuls": 0, "exprimes": 100, "hollande": 60, "aubry": 41})
    assert other.status == "review"
    client = env.client()
    login(client, "alice")
    data = client.get("/progress.json").json
    assert data["election"] == env.election.id
    assert data["items_open"] == 1 and data["returns_total"] == 1


def test_progress_figures(env: ReviewEnv) -> None:
    codes = bureau_codes(env.registry)
    for code in codes[:3]:
        _accept(env, code, "ivr")
    for code in codes[3:5]:
        _accept(env, code, "pen")
    submit(env.journal, env.election, env.registry, codes[5], {**GOOD_T1, "votants": 251})  # waiting in review
    submit(env.journal, env.election, env.registry, codes[0], GOOD_T1)  # a duplicate: not a new return
    client = env.client()
    login(client, "alice")
    data = client.get("/progress.json").json
    assert data["registered"] == len(env.registry) == 60
    assert data["reported"] == 5
    assert data["by_channel"] == {"ivr": 3, "pen": 2, "review": 0}
    assert data["items_open"] == 1 and data["returns_total"] == 6 and data["returns_last_minute"] == 6
    assert data["outbox_backlog"] == 5 and data["redis_ok"] is True
    departments = {d["code"]: d for d in data["departments"]}
    assert sum(d["reported"] for d in departments.values()) == 5
    assert departments[env.registry.get(codes[0]).department]["reported"] == 1
    assert sum(d["registered"] for d in departments.values()) == 60
    assert data["series"][-1]["reported"] == 5
    # After the relay, the jobs wait in RQ's `returns` queue.
    Relay(env.journal, env.redis, "returns_queue.consolidation.consolidate").relay_once()
    env.app.extensions["remontee_review"].progress_cache.clear()
    data = client.get("/progress.json").json
    assert data["outbox_backlog"] == 0
    assert {q["name"]: q["waiting"] for q in data["queues"]} == {"returns": 5, "ocr": 0}


def test_progress_page_and_panel(env: ReviewEnv) -> None:
    codes = bureau_codes(env.registry)
    for code in codes[:4]:
        _accept(env, code)
    client = env.client()
    login(client, "alice")
    page = text(client.get("/progress"))
    assert "Bureaux remontés" in page and 'data-figure="reported">4</span> <span class="of">/ 60' in page
    assert '<svg class="chart"' in page and "chart-bar" in page and "chart-line" in page
    assert 'data-refresh-url="/progress/panel"' in page
    panel = text(client.get("/progress/panel"))
    assert "<html" not in panel and "Bureaux remontés" in panel
    assert "Par département" in panel and "téléphone" in panel
    # The queues are named in words, their RQ names beside for whoever operates them.
    assert "retours vers la consolidation" in panel and "envois à lire" in panel


def test_progress_chart_over_a_long_night(env: ReviewEnv) -> None:
    """Returns spread over three hours: the chart keeps at most 120 steps, in whole minutes."""
    codes = bureau_codes(env.registry)
    for code in codes[:30]:
        _accept(env, code)
    now = time.time()
    with env.journal.write() as conn:
        for i, code in enumerate(codes[:30]):
            conn.execute(update(returns).where(returns.c.bureau == code).values(journaled_at=now - 3 * 3600 + i * 360))
    progress = compute_progress(env.journal, env.registry, env.redis, env.election.id, now)
    assert progress.bucket_seconds == bucket_size(3 * 3600 + 60) == 120
    assert len(progress.series) <= 120
    assert sum(p.returns for p in progress.series) == 30
    reported = [p.reported for p in progress.series]
    assert reported == sorted(reported) and reported[-1] == 30
    assert progress.returns_last_minute == 0


def test_progress_says_when_redis_is_away(tmp_path: Path, journal: Journal, redis: Redis,
                                          demo_registry_files: tuple[Path, Path], registry: Registry,
                                          election_t1: Election) -> None:
    away = build_env(tmp_path, journal, redis, demo_registry_files[0], registry, election_t1,
                     f"redis://127.0.0.1:{free_port()}/0")
    client = away.client()
    login(client, "alice")
    response = client.get("/progress")
    assert response.status_code == 200
    assert "Redis injoignable" in text(response)
    assert client.get("/progress.json").json["redis_ok"] is False


def test_audit_until_the_last_day_a_date_picker_offers_lists_everything(env: ReviewEnv) -> None:
    """An admin who wants everything "until far away" picks 31/12/9999: the end of that day is beyond what a date
    holds, and the page and the export answered 500."""
    original = _approve_one(env)
    admin = env.client()
    login(admin, "root")
    page = admin.get("/audit?since=0001-01-01&until=9999-12-31")
    assert page.status_code == 200 and original in text(page)
    export = admin.get("/audit.csv?until=9999-12-31")
    assert export.status_code == 200 and original in export.get_data(as_text=True)
