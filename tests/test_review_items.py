"""Review items through the UI: the queue and its filters, claims, approve and reject, pen and phone items,
side-by-side comparison, and the approved return reaching RQ through the relay."""

from __future__ import annotations

import html
import json
import re
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from review_support import (
    GOOD_T1,
    ReviewEnv,
    bureau_codes,
    env,
    item_id_for,
    login,
    submit,
    write_pen_artefacts,
)
from rq import Queue
from rq.job import Job, JobStatus
from sqlalchemy import select, update

from pen_gateway.uploads import Upload, create_tables, get_upload, record_upload, set_upload_status
from returns_queue.jobs import RETURNS_QUEUE, return_job_id
from returns_queue.journal import audit, returns, review_items
from returns_queue.relay import Relay
from review.review_items import AcceptedMeanwhile, ItemUnavailable
from tests.filled_forms import inkml_upload, read, well_read_seed
from tests.form_fill import consistent_counts, handwriting_available
from validation import Finding, Reason, new_return

__all__ = ["env"]
JOB = "returns_queue.consolidation.consolidate"


def text(response) -> str:
    return html.unescape(response.get_data(as_text=True))


def form(counts: dict[str, object], token: str, **extra: str) -> dict[str, object]:
    return {"csrf_token": token, **{f"count-{k}": v for k, v in counts.items()}, **extra}


def n_returns(env: ReviewEnv) -> int:
    with env.journal.read() as conn:
        return len(conn.execute(select(returns.c.seq)).all())


@pytest.fixture
def total_mismatch(env: ReviewEnv) -> tuple[str, int]:
    """An IVR return whose votants break the arithmetic (251 for 10 + 240)."""
    code = bureau_codes(env.registry)[0]
    sub = submit(env.journal, env.election, env.registry, code, {**GOOD_T1, "votants": 251})
    assert sub.status == "review"
    return sub.return_id, item_id_for(env.journal, sub.return_id)


def test_queue_lists_open_items_oldest_first_with_reason_bureau_commune_channel(env: ReviewEnv) -> None:
    codes = bureau_codes(env.registry)
    first = submit(env.journal, env.election, env.registry, codes[0], {**GOOD_T1, "votants": 251})
    second = submit(env.journal, env.election, env.registry, codes[1], {**GOOD_T1, "aubry": 61}, "pen")
    submit(env.journal, env.election, env.registry, codes[2], GOOD_T1)  # accepted: not in the queue
    client = env.client()
    login(client, "alice")
    page = text(client.get("/items"))
    assert "2 éléments" in page
    assert page.index(codes[0]) < page.index(codes[1])  # oldest first
    assert codes[2] not in page
    assert "total incohérent" in page and "somme des voix incohérente" in page
    assert env.registry.get(codes[0]).commune in page
    assert "téléphone" in page and "stylo numérique" in page
    assert first.status == second.status == "review"


def test_queue_filters_by_reason_channel_department_and_state(env: ReviewEnv) -> None:
    codes = bureau_codes(env.registry)
    b0, b1 = env.registry.get(codes[0]), env.registry.get(codes[1])
    assert b0.department != b1.department
    submit(env.journal, env.election, env.registry, codes[0], {**GOOD_T1, "votants": 251})
    submit(env.journal, env.election, env.registry, codes[1], {**GOOD_T1, "aubry": 61}, "pen")
    client = env.client()
    login(client, "alice")

    def listed(query: str) -> set[str]:
        page = text(client.get(f"/items?{query}"))
        return {c for c in codes[:2] if f">{c}<" in page.replace("<br>", "<")}

    assert listed("") == {codes[0], codes[1]}
    assert listed("reason=TOTAL_MISMATCH") == {codes[0]}
    assert listed("reason=SUM_MISMATCH") == {codes[1]}
    assert listed("channel=pen") == {codes[1]}
    assert listed("channel=ivr") == {codes[0]}
    assert listed(f"department={b1.department}") == {codes[1]}
    assert listed("reason=CHANNEL_CONFLICT") == set()
    assert listed("state=approved") == set()
    assert listed("reason=NONSENSE") == {codes[0], codes[1]}  # an unknown filter value is ignored, not an error


def test_opening_an_item_claims_it_and_a_second_supervisor_only_reads(
    env: ReviewEnv, total_mismatch: tuple[str, int]
) -> None:
    _, item = total_mismatch
    alice, bob = env.client(), env.client()
    login(alice, "alice")
    bob_token = login(bob, "bob")
    page = text(alice.get(f"/items/{item}"))
    assert "Réservé par vous" in page
    assert env.app.extensions["remontee_review"].items.get(item).claimed_by == "alice"
    assert "réservé par alice" in text(bob.get("/items"))
    bob_page = text(bob.get(f"/items/{item}"))
    assert "Consultation seule" in bob_page and "traitement par alice" in bob_page
    votants_input = bob_page.split('id="count-votants"')[1].split(">")[0]
    assert "disabled" in votants_input
    assert "Approuver la correction" not in bob_page
    # Bob's approval is refused while alice holds the item; nothing is journaled.
    before = n_returns(env)
    response = bob.post(f"/items/{item}/approve", data=form(GOOD_T1, bob_token))
    assert response.status_code == 409 and "traitement par alice" in text(response)
    assert bob.post(f"/items/{item}/reject", data={"csrf_token": bob_token, "reason": "non"}).status_code == 409
    assert n_returns(env) == before
    # Bob's heartbeat cannot steal the claim either.
    assert bob.post(f"/items/{item}/claim", data={"csrf_token": bob_token}).status_code == 409
    # When alice's claim runs out, bob may take it.
    with env.journal.write() as conn:
        conn.execute(update(review_items).values(claimed_until=time.time() - 1))
    assert "Réservé par vous" in text(bob.get(f"/items/{item}"))
    assert env.app.extensions["remontee_review"].items.get(item).claimed_by == "bob"


def test_claim_heartbeat_and_release(env: ReviewEnv, total_mismatch: tuple[str, int]) -> None:
    _, item = total_mismatch
    client = env.client()
    token = login(client, "alice")
    client.get(f"/items/{item}")
    first = env.app.extensions["remontee_review"].items.get(item).claimed_until
    response = client.post(f"/items/{item}/claim", data={"csrf_token": token})
    assert response.status_code == 200 and response.json["claimed"] is True
    assert response.json["claimed_until"] >= first
    assert client.post(f"/items/{item}/release", data={"csrf_token": token}).status_code == 303
    assert env.app.extensions["remontee_review"].items.get(item).claimed_by is None


def test_approve_journals_a_review_return_that_reaches_rq(env: ReviewEnv, total_mismatch: tuple[str, int]) -> None:
    original_id, item = total_mismatch
    client = env.client()
    token = login(client, "alice")
    page = text(client.get(f"/items/{item}"))
    assert 'value="251"' in page and "Votants = blancs et nuls + exprimés" in page
    assert "Suggestions" in page  # a one-digit fix of votants makes the sums hold
    response = client.post(f"/items/{item}/approve",
                           data=form({**GOOD_T1, "votants": " 250 "}, token, note="rappel du président"))
    assert response.status_code == 303
    flashed = text(client.get("/items"))
    assert "Correction approuvée" in flashed
    state = env.app.extensions["remontee_review"].items.get(item)
    assert state.state == "approved" and state.decided_by == "alice" and state.decision_note == "rappel du président"
    new = env.journal.get(state.result_return_id)
    assert new.status == "accepted" and new.ret.channel == "review"
    assert new.ret.supersedes == original_id and new.ret.source == {"supervisor": "alice"}
    assert dict(new.ret.counts) == GOOD_T1
    assert env.journal.get(original_id).status == "corrected"
    with env.journal.read() as conn:
        row = conn.execute(select(audit).where(audit.c.action == "approve")).one()
    assert row.actor == "alice" and row.subject == original_id
    assert json.loads(row.before)["counts"]["votants"] == 251
    after = json.loads(row.after)
    assert after["counts"]["votants"] == 250 and after["return_id"] == new.ret.return_id
    assert after["note"] == "rappel du président"
    # The relay (it runs in the ivr and relay processes) puts it on RQ for the back office.
    assert env.journal.outbox_backlog() == 1
    assert Relay(env.journal, env.redis, JOB).relay_once() == 1
    job = Job.fetch(return_job_id(new.ret.return_id), connection=env.redis)
    assert job.func_name == JOB
    assert job.args[0]["channel"] == "review" and job.args[0]["supersedes"] == original_id
    assert job.args[0]["counts"]["votants"] == 250
    assert job.id in Queue(RETURNS_QUEUE, connection=env.redis).job_ids


def test_approving_twice_yields_one_return(env: ReviewEnv, total_mismatch: tuple[str, int]) -> None:
    _, item = total_mismatch
    client = env.client()
    token = login(client, "alice")
    client.get(f"/items/{item}")
    assert client.post(f"/items/{item}/approve", data=form(GOOD_T1, token)).status_code == 303
    count = n_returns(env)
    second = client.post(f"/items/{item}/approve", data=form(GOOD_T1, token))
    assert second.status_code == 409 and "déjà été approuvé" in text(second)
    assert n_returns(env) == count
    with env.journal.read() as conn:
        assert len(conn.execute(select(audit).where(audit.c.action == "approve")).all()) == 1


def test_two_supervisors_approving_at_once_yield_one_return(env: ReviewEnv, total_mismatch: tuple[str, int]) -> None:
    """Both pass the early check; the conditional UPDATE inside the journal transaction lets one through."""
    _, item = total_mismatch
    desk = env.app.extensions["remontee_review"].items
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def approve(who: str) -> None:
        barrier.wait()
        try:
            outcomes[who] = desk.approve(item, who, GOOD_T1, env.registry)
        except ItemUnavailable as exc:
            outcomes[who] = exc

    threads = [threading.Thread(target=approve, args=(who,)) for who in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [o for o in outcomes.values() if not isinstance(o, ItemUnavailable)]
    assert len(winners) == 1 and len(outcomes) == 2
    with env.journal.read() as conn:
        reviewed = conn.execute(select(returns).where(returns.c.channel == "review")).all()
    assert len(reviewed) == 1


class _Held(Exception):
    """Ends the test's own journal request, which held the commit, writing nothing."""


def test_a_double_click_on_approve_says_the_item_is_already_approved(
    env: ReviewEnv, total_mismatch: tuple[str, int]
) -> None:
    """Both clicks pass the early check before either commits: the second is told the item is decided, not that
    figures were accepted meanwhile (its own first click's), which asked the supervisor to approve again."""
    _, item = total_mismatch
    desk = env.app.extensions["remontee_review"].items
    held, release = threading.Event(), threading.Event()

    def hold(conn: object, submission: object) -> None:  # the journal's commit waits here, mid-transaction
        held.set()
        release.wait(30)
        raise _Held

    other = new_return(env.election, bureau_codes(env.registry)[1], GOOD_T1, "ivr", {"call_id": "1.1"})

    def hold_the_commit() -> None:
        with pytest.raises(_Held):
            env.journal.submit(other, (), also=hold)

    holder = threading.Thread(target=hold_the_commit)
    holder.start()
    assert held.wait(30)
    outcomes: list[object] = []

    def click() -> None:
        try:
            outcomes.append(desk.approve(item, "alice", GOOD_T1, env.registry, seen_accepted=""))
        except ItemUnavailable as exc:
            outcomes.append(exc)

    clicks = [threading.Thread(target=click) for _ in range(2)]
    for t in clicks:
        t.start()
    deadline = time.monotonic() + 30
    while env.journal._requests.qsize() < 2 and time.monotonic() < deadline:  # both clicks wait for the commit
        time.sleep(0.01)
    release.set()
    for t in (holder, *clicks):
        t.join(30)
    refused = [o for o in outcomes if isinstance(o, ItemUnavailable)]
    assert len(outcomes) == 2 and len(refused) == 1
    assert not isinstance(refused[0], AcceptedMeanwhile)
    assert "déjà été approuvé par alice" in str(refused[0])
    with env.journal.read() as conn:
        assert len(conn.execute(select(returns).where(returns.c.channel == "review")).all()) == 1


def test_approval_with_broken_arithmetic_is_refused_and_writes_nothing(
    env: ReviewEnv, total_mismatch: tuple[str, int]
) -> None:
    _, item = total_mismatch
    client = env.client()
    token = login(client, "alice")
    client.get(f"/items/{item}")
    before = n_returns(env)
    response = client.post(f"/items/{item}/approve", data=form({**GOOD_T1, "votants": 252}, token))
    assert response.status_code == 422
    page = text(response)
    assert "La correction n'est pas enregistrée" in page and "écart" in page
    assert 'value="252"' in page  # what the supervisor typed is kept for the next try
    blank = client.post(f"/items/{item}/approve", data=form({**GOOD_T1, "valls": ""}, token))
    assert blank.status_code == 422 and "illisible" in text(blank)
    over = client.post(f"/items/{item}/approve", data=form(
        {**GOOD_T1, "votants": 5000, "blancs_nuls": 4760}, token))
    assert over.status_code == 422 and "inscrits" in text(over)
    assert n_returns(env) == before
    assert env.app.extensions["remontee_review"].items.get(item).state == "open"


def test_reject_needs_a_reason_and_is_audited(env: ReviewEnv, total_mismatch: tuple[str, int]) -> None:
    original_id, item = total_mismatch
    client = env.client()
    token = login(client, "alice")
    client.get(f"/items/{item}")
    response = client.post(f"/items/{item}/reject", data={"csrf_token": token, "reason": "   "})
    assert response.status_code == 400 and "motif est obligatoire" in text(response)
    assert env.app.extensions["remontee_review"].items.get(item).state == "open"
    assert client.post(f"/items/{item}/reject",
                       data={"csrf_token": token, "reason": "PV illisible, rappeler le bureau"}).status_code == 303
    state = env.app.extensions["remontee_review"].items.get(item)
    assert state.state == "rejected" and state.decision_note == "PV illisible, rappeler le bureau"
    assert env.journal.get(original_id).status == "rejected"
    assert env.journal.outbox_backlog() == 0
    with env.journal.read() as conn:
        row = conn.execute(select(audit).where(audit.c.action == "reject")).one()
    assert row.actor == "alice" and json.loads(row.after) == {"note": "PV illisible, rappeler le bureau"}
    decided = text(client.get(f"/items/{item}"))
    assert "Rejeté par alice" in decided and "Approuver la correction" not in decided


def test_phone_item_shows_the_call_and_the_caller(env: ReviewEnv) -> None:
    code = bureau_codes(env.registry)[3]
    known = env.registry.get(code).caller_ids[0]
    sub = submit(env.journal, env.election, env.registry, code, {**GOOD_T1, "exprimes": 241},
                 source={"call_id": "1318190400.77", "caller_id": known})
    client = env.client()
    login(client, "alice")
    page = text(client.get(f"/items/{item_id_for(env.journal, sub.return_id)}"))
    assert "1318190400.77" in page and known in page and "connu pour ce bureau" in page


def test_pen_item_shows_the_page_the_crops_the_reading_and_suggestions(env: ReviewEnv) -> None:
    code = bureau_codes(env.registry)[4]
    upload_id = "01JPENPAGE00000000000000AB"
    written = dict(GOOD_T1)
    read = {**GOOD_T1, "hollande": 80}  # the recognizer took a 9 for an 8
    write_pen_artefacts(env.settings.var_dir, upload_id, env.election, code, written, read,
                        {"hollande": 0.52}, {"hollande": [(2, 9, 0.45)]}, [("hollande", 90)])
    sub = submit(env.journal, env.election, env.registry, code, read, "pen",
                 {"upload_id": upload_id, "station_id": "station-12", "pen_serial": "AJX-00C0FE"})
    item = item_id_for(env.journal, sub.return_id)
    client = env.client()
    token = login(client, "alice")
    page = text(client.get(f"/items/{item}"))
    assert f'src="/items/{item}/page"' in page
    assert f"/items/{item}/fields/hollande.png" in page and f"/items/{item}/fields/votants.png" in page
    assert "52 %" in page and "station-12" in page
    assert 'data-apply-field="hollande" data-apply-value="90"' in page  # the alternative and the suggestion
    assert "(45 %)" in page
    png = client.get(f"/items/{item}/page")
    assert png.status_code == 200 and png.mimetype == "image/png"
    assert png.data == (env.settings.var_dir / "uploads" / "artefacts" / upload_id / "page.png").read_bytes()
    scanned = env.settings.var_dir / "uploads" / "artefacts" / upload_id / "page.jpg"  # as the OCR writes a scan's
    scanned.write_bytes(cv2.imencode(".jpg", np.full((40, 30), 250, np.uint8))[1].tobytes())
    jpeg = client.get(f"/items/{item}/page")
    assert jpeg.status_code == 200 and jpeg.mimetype == "image/jpeg" and jpeg.data == scanned.read_bytes()
    crop = client.get(f"/items/{item}/fields/hollande.png")
    assert crop.status_code == 200 and crop.data.startswith(b"\x89PNG")
    assert client.get(f"/items/{item}/fields/nonsense.png").status_code == 404
    # Approving with the suggestion applied.
    assert client.post(f"/items/{item}/approve", data=form(written, token)).status_code == 303
    # A phone item has no page to show.
    other = submit(env.journal, env.election, env.registry, bureau_codes(env.registry)[5],
                   {**GOOD_T1, "votants": 249})
    assert client.get(f"/items/{item_id_for(env.journal, other.return_id)}/page").status_code == 404


def test_pen_upload_row_follows_the_decision(env: ReviewEnv) -> None:
    create_tables(env.journal)
    code = bureau_codes(env.registry)[6]
    upload_id = "01JPENROW000000000000000AB"
    with env.journal.write() as conn:
        record_upload(conn, Upload(upload_id, "0" * 64, Path("/nonexistent"), "image/png", 10, "station-1",
                                   "AJX-1", code, None, "review", None, None, None, time.time()))
    sub = submit(env.journal, env.election, env.registry, code, {**GOOD_T1, "votants": 260}, "pen",
                 {"upload_id": upload_id, "station_id": "station-1"})
    with env.journal.write() as conn:  # as the OCR job leaves it, in the transaction of its return
        set_upload_status(conn, upload_id, "review", return_id=sub.return_id, receipt=sub.receipt)
    client = env.client()
    token = login(client, "alice")
    item = item_id_for(env.journal, sub.return_id)
    client.get(f"/items/{item}")  # no artefacts on disk: the page still opens
    assert client.post(f"/items/{item}/approve", data=form(GOOD_T1, token)).status_code == 303
    upload = get_upload(env.journal, upload_id)
    assert upload.status == "accepted"
    assert upload.return_id == env.app.extensions["remontee_review"].items.get(item).result_return_id


INKML = "application/inkml+xml"


def slipped_page(env: ReviewEnv, bureau: str) -> tuple[bytes, dict[str, int]]:
    """A page the president slipped on (votants one short of blancs_nuls + exprimes), in a hand the model reads as
    written, so its return waits in review; and the true figures, the supervisor's."""
    truth = consistent_counts(env.election, np.random.default_rng(31), inscrits=env.registry.get(bureau).inscrits)
    slipped = {**truth, "votants": truth["votants"] - 1}
    seed = well_read_seed(lambda s: read(inkml_upload(env.election, slipped, s), INKML), slipped)
    return inkml_upload(env.election, slipped, seed), truth


def read_by_a_worker(env: ReviewEnv, monkeypatch: pytest.MonkeyPatch, page: bytes, bureau: str,
                     stations: list[str]) -> list[str]:
    """The page docked by each station in turn, each upload read by the real `ocr` job on a real RQ worker."""
    from tests.test_recognition_job import run_worker, store_upload

    for key, value in {"REMONTEE_VAR_DIR": env.settings.var_dir, "REMONTEE_DB_URL": env.journal.url,
                       "REMONTEE_REGISTRY": env.settings.registry_path, "REMONTEE_ELECTION": env.election.id}.items():
        monkeypatch.setenv(key, str(value))
    upload_ids = [store_upload(env.journal, env.settings.var_dir.parent, page, INKML, bureau=bureau, station_id=s)
                  for s in stations]
    assert [job.get_status() for job in run_worker(env.redis, upload_ids)] == [JobStatus.FINISHED] * len(stations)
    return upload_ids


def decide(env: ReviewEnv, item: int, decision: str, truth: dict[str, int]) -> tuple[str, str, str]:
    """The supervisor's decision through the UI; what every upload of the item's return should now say."""
    client = env.client()
    token = login(client, "alice")
    original = env.app.extensions["remontee_review"].items.get(item)
    if decision == "approve":
        assert client.post(f"/items/{item}/approve", data=form(truth, token)).status_code == 303
        decided = env.journal.get(env.app.extensions["remontee_review"].items.get(item).result_return_id)
        return "accepted", decided.ret.return_id, decided.receipt
    assert client.post(f"/items/{item}/reject",
                       data={"csrf_token": token, "reason": "PV raturé, rappeler le bureau"}).status_code == 303
    return "rejected", original.return_id, original.receipt


def settled(env: ReviewEnv, upload_id: str) -> tuple[str, str | None, str | None]:
    upload = get_upload(env.journal, upload_id)
    return upload.status, upload.return_id, upload.receipt


@pytest.mark.skipif(not handwriting_available(),
                    reason="../shared/data/handwriting is absent: the page is written with real held-out handwriting")
@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_a_page_docked_by_two_stations_follows_the_decision_on_its_return(
    env: ReviewEnv, monkeypatch: pytest.MonkeyPatch, decision: str
) -> None:
    """Station 9 docks the page station 7 docked: a DUPLICATE of the return in review, answered with its fate. The
    supervisor's decision on that return is the second upload's too: no upload waits in review for it."""
    code = bureau_codes(env.registry)[8]
    page, truth = slipped_page(env, code)
    first, second = read_by_a_worker(env, monkeypatch, page, code, ["station-7", "station-9"])
    waiting = settled(env, first)
    assert waiting[0] == "review" and settled(env, second) == waiting
    assert env.journal.get(waiting[1]).ret.source["upload_id"] == first
    item = item_id_for(env.journal, waiting[1])
    assert env.app.extensions["remontee_review"].items.counts()["open"] == 1  # one item for the two uploads

    after = decide(env, item, decision, truth)
    assert settled(env, first) == settled(env, second) == after


def test_channel_conflict_shows_both_returns_side_by_side(env: ReviewEnv) -> None:
    code = bureau_codes(env.registry)[7]
    phone = submit(env.journal, env.election, env.registry, code, GOOD_T1)
    assert phone.status == "accepted"
    pen_counts = {**GOOD_T1, "aubry": 70, "hollande": 80}
    pen = submit(env.journal, env.election, env.registry, code, pen_counts, "pen")
    assert pen.status == "review"
    item = item_id_for(env.journal, pen.return_id)
    client = env.client()
    token = login(client, "alice")
    page = text(client.get(f"/items/{item}"))
    assert "conflit entre canaux" in page
    assert "Retour téléphone (accepté" in page
    differing = [r for r in page.split('<tr class="') if r.startswith("differs")]
    assert {r.split('data-row="')[1].split('"')[0] for r in differing} == {"aubry", "hollande"}
    assert "Reprendre les chiffres du retour téléphone" in page
    # The supervisor keeps the pen's figures: a review return supersedes the pen return and is accepted.
    assert seen_accepted(page) == phone.return_id  # the page says which accepted figures it compared with
    assert client.post(f"/items/{item}/approve",
                       data=form(pen_counts, token, seen_accepted=seen_accepted(page))).status_code == 303
    latest = env.journal.latest_accepted(env.election.id, code)
    assert latest.channel == "review" and dict(latest.counts) == pen_counts


def test_correction_from_the_same_channel_is_compared_too(env: ReviewEnv) -> None:
    code = bureau_codes(env.registry)[8]
    submit(env.journal, env.election, env.registry, code, GOOD_T1)
    again = submit(env.journal, env.election, env.registry, code, {**GOOD_T1, "royal": 35, "valls": 5})
    assert again.status == "review"
    client = env.client()
    login(client, "alice")
    page = text(client.get(f"/items/{item_id_for(env.journal, again.return_id)}"))
    assert "correction d'un retour accepté" in page
    differing = [r for r in page.split('<tr class="') if r.startswith("differs")]
    assert len(differing) == 2


def test_the_item_page_names_channels_and_counts_in_words_not_codes(env: ReviewEnv) -> None:
    """Why a conflict or a correction is in review read « diffère du retour accepté par ivr (aubry, hollande) »:
    the journal's codes, where the page names the channel « téléphone » and each count by its printed label."""
    codes = bureau_codes(env.registry)
    submit(env.journal, env.election, env.registry, codes[7], GOOD_T1)
    conflict = submit(env.journal, env.election, env.registry, codes[7], {**GOOD_T1, "aubry": 70, "hollande": 80},
                      "pen")
    submit(env.journal, env.election, env.registry, codes[8], GOOD_T1)
    correction = submit(env.journal, env.election, env.registry, codes[8], {**GOOD_T1, "royal": 35, "valls": 5})
    client = env.client()
    login(client, "alice")
    findings = text(client.get(f"/items/{item_id_for(env.journal, conflict.return_id)}")).split(
        "Pourquoi ce retour est en revue", 1)[1].split("</section>", 1)[0]
    assert "diffère du retour accepté par téléphone (Martine AUBRY, François HOLLANDE)" in findings
    assert "ivr" not in findings and "aubry" not in findings
    findings = text(client.get(f"/items/{item_id_for(env.journal, correction.return_id)}")).split(
        "Pourquoi ce retour est en revue", 1)[1].split("</section>", 1)[0]
    assert "le bureau avait déjà transmis (Ségolène ROYAL, Manuel VALLS diffèrent)" in findings


def test_unknown_bureau_item_can_be_given_its_bureau(env: ReviewEnv) -> None:
    sub = submit(env.journal, env.election, env.registry, "999999", GOOD_T1, "pen")
    item = item_id_for(env.journal, sub.return_id)
    client = env.client()
    token = login(client, "alice")
    assert 'name="bureau"' in text(client.get(f"/items/{item}"))
    refused = client.post(f"/items/{item}/approve", data=form(GOOD_T1, token, bureau="999999"))
    assert refused.status_code == 422 and "inconnu du registre" in text(refused)
    code = bureau_codes(env.registry)[9]
    assert client.post(f"/items/{item}/approve", data=form(GOOD_T1, token, bureau=code)).status_code == 303
    assert env.journal.latest_accepted(env.election.id, code).channel == "review"


OTHER_T1 = {**GOOD_T1, "votants": 251, "exprimes": 241, "aubry": 61}  # other figures whose sums hold too


def seen_accepted(page: str) -> str:
    return re.search(r'name="seen_accepted" value="([^"]*)"', page).group(1)


def test_approving_over_figures_accepted_since_the_page_was_opened_is_held_until_seen(env: ReviewEnv) -> None:
    """Alice opens a broken return's item; meanwhile Bob approves the bureau's other item (the president called
    back with other figures), so the bureau has accepted figures Alice's page did not show. Her approval would
    replace them unseen: refused with 409, nothing written, her figures kept and the bureau's returns shown;
    approving again from that page replaces them knowingly."""
    code = bureau_codes(env.registry)[10]
    first = submit(env.journal, env.election, env.registry, code, {**GOOD_T1, "votants": 251})
    callback = submit(env.journal, env.election, env.registry, code, OTHER_T1)
    assert first.status == callback.status == "review"
    alice, bob = env.client(), env.client()
    alice_token, bob_token = login(alice, "alice"), login(bob, "bob")
    page = text(alice.get(f"/items/{item_id_for(env.journal, first.return_id)}"))
    assert seen_accepted(page) == ""
    second = item_id_for(env.journal, callback.return_id)
    bob.get(f"/items/{second}")
    assert bob.post(f"/items/{second}/approve", data=form(OTHER_T1, bob_token, seen_accepted="")).status_code == 303
    by_bob = env.journal.latest_accepted(env.election.id, code)
    count = n_returns(env)
    item = item_id_for(env.journal, first.return_id)
    held = alice.post(f"/items/{item}/approve", data=form(GOOD_T1, alice_token, seen_accepted=""))
    assert held.status_code == 409
    page = text(held)
    receipt = env.journal.get(by_bob.return_id).receipt
    assert f"un retour accepté que cette page ne montrait pas (correction, reçu {receipt})" in page
    assert 'value="250"' in page and by_bob.return_id in page and seen_accepted(page) == by_bob.return_id
    assert n_returns(env) == count and env.journal.latest_accepted(env.election.id, code) == by_bob
    assert alice.post(f"/items/{item}/approve",
                      data=form(GOOD_T1, alice_token, seen_accepted=by_bob.return_id)).status_code == 303
    assert env.journal.latest_accepted(env.election.id, code).source == {"supervisor": "alice"}


def test_an_unknown_bureau_given_a_bureau_that_reported_shows_its_figures_before_replacing_them(
    env: ReviewEnv,
) -> None:
    code = bureau_codes(env.registry)[11]
    phone = submit(env.journal, env.election, env.registry, code, GOOD_T1)
    assert phone.status == "accepted"
    misread = submit(env.journal, env.election, env.registry, "999999", OTHER_T1, "pen")
    item = item_id_for(env.journal, misread.return_id)
    client = env.client()
    token = login(client, "alice")
    page = text(client.get(f"/items/{item}"))
    held = client.post(f"/items/{item}/approve",
                       data=form(OTHER_T1, token, bureau=code, seen_accepted=seen_accepted(page)))
    assert held.status_code == 409
    page = text(held)
    assert f"le bureau {code} a un retour accepté" in page and f"Autres retours du bureau {code}" in page
    assert phone.return_id in page and seen_accepted(page) == phone.return_id
    assert env.journal.latest_accepted(env.election.id, code).return_id == phone.return_id
    assert client.post(f"/items/{item}/approve",
                       data=form(OTHER_T1, token, bureau=code, seen_accepted=phone.return_id)).status_code == 303
    assert env.journal.latest_accepted(env.election.id, code).channel == "review"


def test_unknown_item_is_404(env: ReviewEnv) -> None:
    client = env.client()
    token = login(client, "alice")
    assert client.get("/items/999").status_code == 404
    assert client.post("/items/999/approve", data=form(GOOD_T1, token)).status_code == 404


def test_numbers_beyond_the_database_integers_are_no_item_and_an_empty_page(
    env: ReviewEnv, total_mismatch: tuple[str, int]
) -> None:
    # SQLite refuses a Python int above 2**63 - 1 with an OverflowError: each of these answered 500.
    _, item = total_mismatch
    client = env.client()
    token = login(client, "alice")
    for number in (2**31, 2**63 - 1, 2**63, 10**20):
        assert client.get(f"/items/{number}").status_code == 404
        assert client.get(f"/items/{number}/page").status_code == 404
        assert client.get(f"/items/{number}/fields/votants.png").status_code == 404
        assert client.post(f"/items/{number}/approve", data=form(GOOD_T1, token)).status_code == 404
    assert f'href="/items/{item}"' in text(client.get("/items?page=1"))
    for page in (999999, 2**63, 10**20):  # a page past the last one is empty, whatever its number
        response = client.get(f"/items?page={page}")
        assert response.status_code == 200 and f'href="/items/{item}"' not in text(response)


@pytest.mark.parametrize("digits", [19, 4301, 5000])
def test_a_count_with_more_digits_than_any_count_is_refused_as_unreadable(
    env: ReviewEnv, total_mismatch: tuple[str, int], digits: int
) -> None:
    # int() refuses more than 4300 digits with a ValueError: a count pasted into the form answered 500.
    _, item = total_mismatch
    client = env.client()
    token = login(client, "alice")
    client.get(f"/items/{item}")
    before = n_returns(env)
    response = client.post(f"/items/{item}/approve", data=form({**GOOD_T1, "aubry": "1" * digits}, token))
    assert response.status_code == 422 and "illisible" in text(response)
    assert n_returns(env) == before
    assert env.app.extensions["remontee_review"].items.get(item).state == "open"


def test_a_correction_approved_after_the_clock_went_back_replaces_the_figures_in_the_consolidation(
    env: ReviewEnv,
) -> None:
    """The phone return was journaled by the FastAGI process while the machine's clock was an hour ahead; NTP then
    stepped it back. The supervisor's approval, made by another process after the step, must still sort after it:
    the consolidation keeps a bureau's return whose id sorts last, so an approval sorting first would leave the
    phone's figures in the totals without a word."""
    from dataclasses import replace as replaced

    from ulid import ULID

    from returns_queue.consolidation import apply_return, latest_returns, totals
    from validation import check_return

    code = bureau_codes(env.registry)[11]
    ahead = replaced(new_return(env.election, code, GOOD_T1, "ivr", {"call_id": "1318190400.7"}),
                     return_id=str(ULID.from_timestamp(time.time() + 3600)))
    assert env.journal.submit(ahead, check_return(ahead, env.election, env.registry.get(code))).status == "accepted"
    pen = submit(env.journal, env.election, env.registry, code, OTHER_T1, "pen")
    assert pen.status == "review"
    item = item_id_for(env.journal, pen.return_id)
    client = env.client()
    token = login(client, "alice")
    page = text(client.get(f"/items/{item}"))
    assert client.post(f"/items/{item}/approve",
                       data=form(OTHER_T1, token, seen_accepted=seen_accepted(page))).status_code == 303
    approved = env.journal.latest_accepted(env.election.id, code)
    assert approved.channel == "review" and approved.return_id > ahead.return_id
    for payload in env.journal.outbox():  # what the relay hands the back office, in the journal's order
        apply_return(env.redis, payload)
    assert latest_returns(env.redis, env.election.id)[code]["return_id"] == approved.return_id
    assert totals(env.redis, env.election.id)["votants"] == OTHER_T1["votants"]


def test_a_pen_reading_flagged_uncertain_is_never_shown_as_100_percent_sure(env: ReviewEnv) -> None:
    """The pen flags a field whose reading is under 0.9999 sure; its least sure box at 0.9987 was shown as
    « 100 % » in the reading column, beside the finding « lecture incertaine »: the figure a tired supervisor
    trusts without looking at the crop."""
    code = bureau_codes(env.registry)[4]
    upload_id = "01JPENSURE00000000000000AB"
    write_pen_artefacts(env.settings.var_dir, upload_id, env.election, code, GOOD_T1, GOOD_T1,
                        {"hollande": 0.9987, "votants": 0.29}, {}, [])
    unsure = Finding(Reason.LOW_CONFIDENCE, "hollande", "François HOLLANDE : lecture incertaine (90, confiance 0.9987)")
    sub = submit(env.journal, env.election, env.registry, code, GOOD_T1, "pen",
                 {"upload_id": upload_id, "station_id": "station-12"}, [unsure])
    assert sub.status == "review"
    client = env.client()
    login(client, "alice")
    page = text(client.get(f"/items/{item_id_for(env.journal, sub.return_id)}"))
    reading = re.search(r'data-row="hollande".*?<td class="reading">(.*?)</td>', page, re.S).group(1)
    assert "99 %" in reading and "100 %" not in reading
    assert "29 %" in page  # a whole percent, not a float's 28.999…
