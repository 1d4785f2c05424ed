"""The reference consolidation job, run by a real RQ worker process against a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy import update

from conftest import free_port
from forms import Election
from returns_queue.consolidation import apply_return, latest_returns, totals
from returns_queue.journal import Journal, returns
from returns_queue.relay import Relay
from validation import new_return

ROOT = Path(__file__).resolve().parents[1]
JOB = "returns_queue.consolidation.consolidate"


def counts(hollande: int, aubry: int, blancs: int = 3) -> dict[str, int]:
    return {"votants": hollande + aubry + blancs, "blancs_nuls": blancs, "exprimes": hollande + aubry,
            "hollande": hollande, "aubry": aubry}


def run_gateway(*args: str, redis_url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REMONTEE_REDIS_URL": redis_url, "REMONTEE_ELECTION": "primaire-2011-t2",
           "REMONTEE_VAR_DIR": str(tmp_path / "var")}
    return subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, check=True, timeout=60)


def test_a_worker_consolidates_relayed_returns_and_totals_prints_them(
    journal: Journal, redis: Redis, redis_server, election_t2: Election, tmp_path: Path
) -> None:
    for bureau, (h, a) in {"1": (100, 50), "2": (10, 20), "3": (7, 0)}.items():
        journal.submit(new_return(election_t2, bureau, counts(h, a), "ivr", {"call_id": bureau}))
    assert Relay(journal, redis, JOB).relay_once() == 3
    run_gateway("worker", "--burst", "--queues", "returns", redis_url=redis_server.url, tmp_path=tmp_path)
    assert totals(redis, election_t2.id) == {
        "bureaux": 3, "votants": 196, "blancs_nuls": 9, "exprimes": 187, "candidates": {"hollande": 117, "aubry": 70},
    }
    out = run_gateway("totals", "--json", redis_url=redis_server.url, tmp_path=tmp_path).stdout
    assert json.loads(out)["candidates"] == {"hollande": 117, "aubry": 70}
    text = run_gateway("totals", redis_url=redis_server.url, tmp_path=tmp_path).stdout
    assert "bureaux remontés : 3" in text and "hollande" in text and "62.57 %" in text


def test_totals_of_an_election_that_does_not_exist_is_an_error_not_zeros(redis_server, tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as refused:
        run_gateway("totals", "--election", "primaire-2011-T2", redis_url=redis_server.url, tmp_path=tmp_path)
    assert refused.value.returncode == 1 and refused.value.stdout == ""
    assert refused.value.stderr.startswith("error: ") and "primaire-2011-T2" in refused.value.stderr
    assert "no such election" in refused.value.stderr and "Traceback" not in refused.value.stderr


def test_totals_without_redis_says_so_in_one_line(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(subprocess.CalledProcessError) as refused:
        run_gateway("totals", redis_url=url, tmp_path=tmp_path)
    assert refused.value.returncode == 1 and refused.value.stdout == ""
    assert refused.value.stderr.startswith(f"error: the consolidation's Redis ({url}) does not answer: ")
    assert len(refused.value.stderr.splitlines()) == 1


def test_a_return_applied_twice_counts_once(redis: Redis, election_t2: Election) -> None:
    ret = new_return(election_t2, "1", counts(5, 5), "ivr", {}).to_dict()
    assert apply_return(redis, ret) is True
    assert apply_return(redis, ret) is False
    assert totals(redis, election_t2.id)["candidates"] == {"hollande": 5, "aubry": 5}


def test_the_latest_return_of_a_bureau_replaces_the_earlier_one(redis: Redis, election_t2: Election) -> None:
    first = new_return(election_t2, "1", counts(5, 5), "ivr", {})
    other = new_return(election_t2, "2", counts(1, 1), "pen", {})
    fixed = new_return(election_t2, "1", counts(6, 4), "review", {"supervisor": "ana"}, supersedes=first.return_id)
    # Workers may run jobs out of order: the newer return wins whatever the order.
    for ret in (fixed, other, first):
        apply_return(redis, ret.to_dict())
    figures = totals(redis, election_t2.id)
    assert figures["bureaux"] == 2
    assert figures["candidates"] == {"hollande": 7, "aubry": 5}
    assert figures["votants"] == (6 + 4 + 3) + (1 + 1 + 3)
    assert latest_returns(redis, election_t2.id)["1"]["return_id"] == fixed.return_id


def test_returns_whose_job_path_did_not_import_are_consolidated_once_it_is_fixed(
    journal: Journal, redis: Redis, redis_server, election_t2: Election, tmp_path: Path
) -> None:
    for bureau, (h, a) in {"1": (100, 50), "2": (10, 20)}.items():
        journal.submit(new_return(election_t2, bureau, counts(h, a), "ivr", {"call_id": bureau}))
    typo = "returns_queue.consolidation.consolidat"
    assert Relay(journal, redis, typo).relay_once() == 2
    run_gateway("worker", "--burst", "--queues", "returns", redis_url=redis_server.url, tmp_path=tmp_path)
    assert totals(redis, election_t2.id)["bureaux"] == 0 and journal.outbox_backlog() == 0
    assert Relay(journal, redis, typo).reconcile() == 0  # still the typo: the failures are the back office's to see
    # The operator fixes REMONTEE_CONSOLIDATE_JOB and restarts: the returns reach the consolidation.
    assert Relay(journal, redis, JOB).reconcile() == 2
    run_gateway("worker", "--burst", "--queues", "returns", redis_url=redis_server.url, tmp_path=tmp_path)
    assert totals(redis, election_t2.id)["candidates"] == {"hollande": 110, "aubry": 70}
    assert Relay(journal, redis, JOB).reconcile() == 0


def test_a_redis_that_lost_its_data_gets_the_totals_back_from_a_replay_of_the_journal(
    journal: Journal, redis: Redis, redis_server, election_t2: Election, tmp_path: Path
) -> None:
    first = journal.submit(new_return(election_t2, "1", counts(100, 50), "ivr", {"call_id": "a"}))
    journal.submit(new_return(election_t2, "2", counts(10, 20), "ivr", {"call_id": "b"}))
    journal.submit(new_return(election_t2, "1", counts(101, 49), "review", {"supervisor": "ana"},
                              supersedes=first.return_id))
    assert Relay(journal, redis, JOB).relay_once() == 3
    run_gateway("worker", "--burst", "--queues", "returns", redis_url=redis_server.url, tmp_path=tmp_path)
    before = totals(redis, election_t2.id)
    assert before["candidates"] == {"hollande": 111, "aubry": 69} and before["bureaux"] == 2
    redis.flushdb()  # restarted without its append-only file: jobs and totals gone
    for payload in journal.relayed_since(0.0):  # relayed more than an hour ago: beyond the reconciliation
        with journal.write() as conn:
            conn.execute(update(returns).where(returns.c.return_id == payload["return_id"])
                         .values(enqueued_at=time.time() - 7200))
    assert Relay(journal, redis, JOB).reconcile() == 0
    replay = ("relay", "--replay", "--db-url", journal.url)
    out = run_gateway(*replay, redis_url=redis_server.url, tmp_path=tmp_path).stdout
    assert out == "3 relayed returns enqueued again\n"
    run_gateway("worker", "--burst", "--queues", "returns", redis_url=redis_server.url, tmp_path=tmp_path)
    assert totals(redis, election_t2.id) == before
    run_gateway(*replay, redis_url=redis_server.url, tmp_path=tmp_path)  # again: counted once
    run_gateway("worker", "--burst", "--queues", "returns", redis_url=redis_server.url, tmp_path=tmp_path)
    assert totals(redis, election_t2.id) == before


def test_totals_with_a_registry_that_does_not_load_still_prints_the_figures(
    redis: Redis, redis_server, election_t2: Election, tmp_path: Path
) -> None:
    apply_return(redis, new_return(election_t2, "1", counts(5, 4), "ivr", {}).to_dict())
    registry = tmp_path / "registry.csv"
    registry.write_text("bureau;inscrits\n1;300\n")  # a bad edit of the registry during the night
    out = run_gateway("totals", "--json", "--registry", str(registry), redis_url=redis_server.url, tmp_path=tmp_path)
    assert json.loads(out.stdout)["candidates"] == {"hollande": 5, "aubry": 4}
    assert out.stderr.startswith("warning: the registry does not load (") and "Traceback" not in out.stderr
    text = run_gateway("totals", "--registry", str(registry), redis_url=redis_server.url, tmp_path=tmp_path).stdout
    assert "bureaux remontés : 1\n" in text and "hollande" in text


def test_a_worker_on_a_queue_nothing_fills_is_a_usage_error_and_spaces_around_names_are_dropped(
    journal: Journal, redis: Redis, redis_server, election_t2: Election, tmp_path: Path
) -> None:
    journal.submit(new_return(election_t2, "1", counts(5, 4), "ivr", {"call_id": "1"}))
    assert Relay(journal, redis, JOB).relay_once() == 1
    for queues in ("returns,orc", "return", " , "):
        with pytest.raises(subprocess.CalledProcessError) as refused:
            run_gateway("worker", "--burst", "--queues", queues, redis_url=redis_server.url, tmp_path=tmp_path)
        assert refused.value.returncode == 2 and "the queues are returns and ocr" in refused.value.stderr
    assert totals(redis, election_t2.id)["bureaux"] == 0
    # "returns, ocr" in a unit file: the name after the space is the ocr queue, not a queue " ocr" nothing fills.
    run_gateway("worker", "--burst", "--queues", " returns ", redis_url=redis_server.url, tmp_path=tmp_path)
    assert totals(redis, election_t2.id)["candidates"] == {"hollande": 5, "aubry": 4}
