"""`run_gateway.py worker|relay|totals`: the RQ workers, the outbox relay and the consolidated totals."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from redis import Redis
from redis.exceptions import RedisError
from rq import Worker

from registry import RegistryError, load_registry
from returns_queue.consolidation import totals
from returns_queue.jobs import OCR_QUEUE, RETURNS_QUEUE
from returns_queue.journal import Journal
from returns_queue.relay import Relay
from settings import Settings, make_var_dir, without_password

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    worker = sub.add_parser("worker", help="an RQ worker for the ocr and returns queues", parents=[common])
    # In priority order: a return's job takes milliseconds and is what the back office counts, an OCR
    # job a good part of a second; OCR first kept every phone return waiting behind the pen backlog.
    worker.add_argument("--queues", type=_queue_names, default=[RETURNS_QUEUE, OCR_QUEUE],
                        help="comma-separated queue names, in priority order (default returns,ocr)")
    worker.add_argument("--burst", action="store_true", help="stop when the queues are empty")
    worker.set_defaults(func=_worker)
    relay = sub.add_parser("relay", help="relay accepted returns from the journal to RQ", parents=[common])
    relay.add_argument("--replay", action="store_true",
                       help="enqueue again every return ever relayed, then exit: for a Redis that lost its data "
                            "(the consolidation counts each return once)")
    relay.set_defaults(func=_relay)
    tot = sub.add_parser("totals", help="print the consolidated totals", parents=[common])
    tot.add_argument("--json", action="store_true", help="machine-readable output")
    tot.set_defaults(func=_totals)


def _queue_names(text: str) -> list[str]:
    """`--queues`: the names, spaces around them dropped; a name this worker has no job for is a usage error."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    # A worker on a queue nothing fills (a typo, " ocr") would run and serve nothing, saying nothing.
    unknown = [name for name in names if name not in (RETURNS_QUEUE, OCR_QUEUE)]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: the queues are {RETURNS_QUEUE} and {OCR_QUEUE}")
    return names


def _worker(args: argparse.Namespace) -> int:
    from telemetry import multiprocess

    settings: Settings = args.settings
    make_var_dir(settings.var_dir)
    # The work horses RQ forks write their metrics under var/metrics/worker/, shared by this machine's
    # workers (not emptied: another worker may be running); telemetry.worker measures each job.
    directory = multiprocess.enable(multiprocess.directory_for(settings.var_dir, "worker"), wipe=False)
    multiprocess.absorb_dead_processes(directory)

    from returns_queue.worker import HorseDiesWithWorker, StopsPromptly
    from telemetry.exposition import RetryingListener
    from telemetry.state import StateCollector
    from telemetry.worker import MeasuredWorker

    class GatewayWorker(HorseDiesWithWorker, StopsPromptly, MeasuredWorker):
        """Measured (telemetry/worker.py), no work horse outlives it and it stops promptly (returns_queue/worker.py)."""

    redis = Redis.from_url(settings.redis_url_resolved)
    if OCR_QUEUE in args.queues:
        # Load the OCR pipeline once, here: each job's forked work horse inherits it instead of paying seconds.
        from pen_gateway.recognition.job import preload

        preload(settings)
    listener = None
    if settings.worker_metrics_port > 0:
        # Whichever of the machine's workers binds the port serves every queue's depth, not only its own queues'.
        # A client of its own, with timeouts: the worker's blocks for minutes on purpose (RQ's BLPOP), and a scrape
        # on it would hang as long as Redis does not answer, instead of saying state_up{source="redis"} 0.
        scraped = Redis.from_url(settings.redis_url_resolved, socket_timeout=2, socket_connect_timeout=1)
        listener = RetryingListener(settings.bind, settings.worker_metrics_port,
                                    [StateCollector(None, scraped, queues=[RETURNS_QUEUE, OCR_QUEUE], parts=())])
    worker: Worker = GatewayWorker(args.queues, connection=redis)
    try:
        # An `ocr` job's retries wait minutes (pen_gateway/ocr_relay.py): RQ's scheduler enqueues them when due,
        # one scheduler per queue among all the workers (a Redis lock), the others taking over if it dies.
        worker.work(burst=args.burst, logging_level="INFO", with_scheduler=OCR_QUEUE in args.queues)
    finally:
        if listener is not None:
            listener.close()
    return 0


def _relay(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    relay = Relay(Journal(settings.db_url_resolved), Redis.from_url(settings.redis_url_resolved),
                  settings.consolidate_job)
    if args.replay:
        print(f"{relay.replay()} relayed returns enqueued again")
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("relay: journal %s → RQ %s", without_password(settings.db_url_resolved),
             without_password(settings.redis_url_resolved))
    relay.run(stop)
    return 0


def _totals(args: argparse.Namespace) -> int:
    from forms import ElectionDefinitionError, load_election

    settings: Settings = args.settings
    try:
        load_election(settings.election)  # a mistyped id has no figures: zeros would read as nothing reported
    except ElectionDefinitionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        figures = totals(Redis.from_url(settings.redis_url_resolved), settings.election)
    except RedisError as exc:
        print(f"error: the consolidation's Redis ({without_password(settings.redis_url_resolved)}) does not answer: "
              f"{exc}",
              file=sys.stderr)
        return 1
    try:
        registry = load_registry(settings.registry_path) if settings.registry_path.exists() else None
    except (RegistryError, OSError) as exc:
        # The registry only adds the bureaux and inscrits registered: a bad edit of it must not hide the figures.
        print(f"warning: the registry does not load ({exc}): figures without it", file=sys.stderr)
        registry = None
    if registry is not None:
        figures["bureaux_registered"] = len(registry)
        figures["inscrits_registered"] = registry.inscrits_total
    if args.json:
        print(json.dumps({"election": settings.election, **figures}, indent=2))
        return 0
    print(f"Élection {settings.election}")
    print(f"  bureaux remontés : {figures['bureaux']}" + (f" / {len(registry)}" if registry else ""))
    print(f"  votants          : {figures['votants']}")
    if registry and registry.inscrits_total:
        print(f"  participation    : {100 * figures['votants'] / registry.inscrits_total:.2f} % des inscrits")
    print(f"  blancs et nuls   : {figures['blancs_nuls']}")
    print(f"  exprimés         : {figures['exprimes']}")
    for candidate, votes in sorted(figures["candidates"].items(), key=lambda kv: -kv[1]):
        share = 100 * votes / figures["exprimes"] if figures["exprimes"] else 0.0
        print(f"  {candidate:<16} : {votes:>8}  ({share:.2f} %)")
    return 0
