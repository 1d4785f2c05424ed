"""`run_gateway.py ivr` (the FastAGI server and its relay) and `run_gateway.py sounds` (the French prompts)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from settings import Settings

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    ivr = sub.add_parser("ivr", help="the FastAGI server for the results hotline, with its relay", parents=[common])
    ivr.add_argument("--threads", type=int, default=32,
                     help="threads for PIN checks, the journal and Redis (default 32)")
    ivr.add_argument("--stats-interval", type=float, default=0.0,
                     help="log the call and turnaround figures every N seconds (default: only on SIGUSR1)")
    ivr.add_argument("--drain-seconds", type=float, default=8.0,
                     help="at stop, how long calls in progress may go on (default 8)")
    ivr.set_defaults(func=_ivr)
    sounds = sub.add_parser("sounds", help="generate the French prompts (espeak-ng + sox) for Asterisk",
                            parents=[common])
    sounds.add_argument("--out", type=Path, default=None,
                        help="directory for the sounds (default asterisk_conf/sounds/fr)")
    sounds.add_argument("--only", default=None, help="comma-separated sound names (default: the whole catalog)")
    sounds.add_argument("--force", action="store_true", help="render again even what has not changed")
    sounds.add_argument("--list", action="store_true", help="print the catalog (name and text) and stop")
    sounds.set_defaults(func=_sounds)


def _ivr(args: argparse.Namespace) -> int:
    from twisted.internet import defer, reactor, task
    from twisted.internet.error import CannotListenError

    from ivr.server import PhoneService
    from telemetry.logs import route_twisted_logs

    # Every time limit of the server (an answer from Asterisk, the environment, the drain at stop) is a
    # reactor delay, and Twisted measures delays on the wall clock: NTP stepping it on the night would
    # cut every call waiting on a GET DATA (a step forward) or keep dead ones for as long (a step back).
    # The reactor measures them on the monotonic clock, set before anything is scheduled. Timestamps
    # (the logs, the journal, the lockouts in Redis) are wall time still: they do not ask the reactor.
    assert not reactor.getDelayedCalls(), "a delay scheduled on the wall clock would never come"  # type: ignore[attr-defined]
    reactor.seconds = time.monotonic  # type: ignore[attr-defined]

    settings: Settings = args.settings
    if not settings.registry_path.exists():
        raise SystemExit(f"no registry at {settings.registry_path}: `run_gateway.py registry generate` makes one")
    route_twisted_logs()
    service = PhoneService(settings)
    reactor.suggestThreadPoolSize(args.threads)  # type: ignore[attr-defined]

    def print_stats(*_: object) -> None:
        line = service.stats_line()
        try:
            print(line, flush=True)
        except OSError:  # standard output closed (the terminal gone, a pipe's reader dead): the log has it
            log.info("ivr: %s", line)

    def stop(*_: object) -> None:
        async def stopping() -> None:
            try:
                await service.stop(args.drain_seconds)
                print_stats()
            finally:  # whatever failed on the way, the process ends: no server left running without its port
                reactor.stop()  # type: ignore[attr-defined]

        reactor.callFromThread(lambda: defer.ensureDeferred(stopping()))  # type: ignore[attr-defined]

    cannot_listen: list[str] = []

    def start() -> None:
        try:
            service.start()
        except CannotListenError as exc:  # a busy port: end, not a server without its port (nothing restarts that)
            cannot_listen.append(f"ivr: {exc}")
            stop()

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    if settings.ivr_metrics_port > 0:
        try:
            service.start_metrics()
        except OSError as exc:  # calls matter more than their figures: serve them all the same
            log.error("ivr: no metrics listener on %s:%d (%s); serving calls without it", settings.bind,
                      settings.ivr_metrics_port, exc.strerror)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(print_stats))  # type: ignore[attr-defined]
    if args.stats_interval > 0:
        task.LoopingCall(lambda: log.info("ivr: %s", service.stats_line())).start(args.stats_interval, now=False)
    reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined]
    service.close()
    if cannot_listen:
        raise SystemExit(cannot_listen[0])
    return 0


def _sounds(args: argparse.Namespace) -> int:
    from ivr import prompts, sounds

    entries = prompts.catalog()
    if args.list:
        for name, text in entries.items():
            print(f"{name}\t{text if text is not None else '(silence)'}")
        return 0
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    directory = args.out or sounds.SOUNDS_DIR
    started = time.perf_counter()
    try:
        written = sounds.generate(entries, directory, only=only, force=args.force)
    except (sounds.SoundToolMissing, KeyError) as exc:
        print(exc, file=sys.stderr)
        return 2
    total = len(only) if only is not None else len(entries)
    print(f"{len(written)} of {total} sounds written to {directory} ({time.perf_counter() - started:.1f} s)")
    return 0
