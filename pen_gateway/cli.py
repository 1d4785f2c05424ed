"""`run_gateway.py pen` (the upload API under gunicorn) and `run_gateway.py stations add|revoke|list`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from settings import Settings, make_var_dir

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    pen = sub.add_parser("pen", help="the pen upload API, served by gunicorn on bind:pen_port", parents=[common])
    pen.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default 2: one per core)")
    pen.add_argument("--threads", type=int, default=24,
                     help="threads per worker (default 24: requests mostly wait on fsync, not on the CPU)")
    pen.add_argument("--access-log", action="store_true", help="log every request to standard error")
    pen.add_argument("--ocr-relay-grace", type=float, default=5.0, help=argparse.SUPPRESS)  # tests only
    pen.add_argument("--body-timeout", type=float, default=30.0, help=argparse.SUPPRESS)  # tests only
    pen.set_defaults(func=_pen)

    stations = sub.add_parser("stations", help="docking stations allowed to upload", parents=[common])
    actions = stations.add_subparsers(dest="stations_command", required=True)
    add = actions.add_parser("add", help="register a station; prints its new secret once, on the last line",
                             parents=[common])
    add.add_argument("station_id", help="the station's id, as it sends in X-Remontee-Station")
    add.set_defaults(func=_stations_add)
    revoke = actions.add_parser("revoke", help="refuse a station's signatures from now on (a lost or stolen "
                                "station, a secret given away); audited", parents=[common])
    revoke.add_argument("station_id", help="the station's id, as it sends in X-Remontee-Station")
    revoke.set_defaults(func=_stations_revoke)
    listing = actions.add_parser("list", help="the registered stations, revoked ones left out", parents=[common])
    listing.set_defaults(func=_stations_list)


def _registry(settings: Settings) -> Any:
    from pen_gateway.signing import StationRegistry
    from returns_queue.journal import Journal

    make_var_dir(settings.var_dir)
    return StationRegistry(Journal(settings.db_url_resolved), settings.var_dir)


def _stations_add(args: argparse.Namespace) -> int:
    from pen_gateway.signing import StationExists

    registry = _registry(args.settings)
    try:
        secret = registry.add(args.station_id)
    except (StationExists, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"station {args.station_id} registered. Its secret is shown this once: put it in the docking "
          "station's configuration; the gateway keeps it encrypted.")
    print(secret, flush=True)
    return 0


def _stations_revoke(args: argparse.Namespace) -> int:
    from pen_gateway.signing import NoSuchStation

    try:
        _registry(args.settings).revoke(args.station_id)
    except NoSuchStation as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"station {args.station_id} revoked: its uploads and status reads get 401 from now on (from a gateway "
          "already running, within 10 s). Its uploads so far are kept.")
    return 0


def _stations_list(args: argparse.Namespace) -> int:
    for station_id in _registry(args.settings).station_ids():
        print(station_id)
    return 0


def _pen(args: argparse.Namespace) -> int:
    from telemetry import logs, multiprocess

    settings: Settings = args.settings
    make_var_dir(settings.var_dir)
    # Before anything imports prometheus_client: the workers' metrics go to files under var/metrics/pen/,
    # emptied now (a previous run's counts would otherwise be added to this one's).
    multiprocess.enable(multiprocess.directory_for(settings.var_dir, "pen"), wipe=True)

    from gunicorn.app.base import BaseApplication

    from telemetry.access_log import AccessLogger

    class QuietAccessLogger(AccessLogger):  # type: ignore[misc]
        """No access line: with a `logconfig_dict` gunicorn would write one for every request whatever
        `accesslog` says (a formatted line and a locked write per upload, ~3 % of the gateway's CPU)."""

        def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
            return

    class PenServer(BaseApplication):  # type: ignore[misc]
        """gunicorn with our options and our app, loaded in each worker (each gets its own OCR relay thread)."""

        def load_config(self) -> None:
            options = {
                "bind": f"{settings.bind}:{settings.pen_port}",
                "workers": args.workers,
                "worker_class": "gthread",
                "threads": args.threads,
                "timeout": 60,
                "graceful_timeout": 10,
                "keepalive": 5,
                "accesslog": "-" if args.access_log else None,
                "errorlog": "-",
                "proc_name": "remontee-pen",
                "logconfig_dict": logs.logging_dict("pen", settings.log_format),
                "logger_class": AccessLogger if args.access_log else QuietAccessLogger,
                "child_exit": multiprocess.child_exit,
            }
            # gunicorn 27's control socket defaults to one path per user ($HOME/.gunicorn/gunicorn.ctl):
            # the pen and review masters would take it from each other. Nothing here uses it.
            if "control_socket_disable" in self.cfg.settings:
                options["control_socket_disable"] = True
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            from pen_gateway.app import create_app  # in the worker: the master never creates a metric

            return create_app({"SETTINGS": settings, "OCR_RELAY": True, "OCR_RELAY_GRACE": args.ocr_relay_grace,
                               "BODY_TIMEOUT": args.body_timeout})

    log.info("pen upload API on http://%s:%d/api/v1/ (%d workers × %d threads)", settings.bind, settings.pen_port,
             args.workers, args.threads)
    PenServer().run()
    return 0
