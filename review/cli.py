"""`run_gateway.py review` (the review UI under gunicorn) and `run_gateway.py users ...` (supervisors' accounts)."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from typing import Any

from returns_queue.journal import Journal
from review.accounts import ROLES, AccountError, Accounts
from settings import Settings, make_var_dir

log = logging.getLogger(__name__)


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    review = sub.add_parser("review", help="the supervisors' review UI (gunicorn)", parents=[common])
    review.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    review.add_argument("--threads", type=int, default=4, help="threads per worker (default 4)")
    review.set_defaults(func=_serve)

    users = sub.add_parser("users", help="supervisors' accounts of the review UI", parents=[common])
    actions = users.add_subparsers(dest="users_command", required=True)
    add = actions.add_parser("add", help="create an account (asks for its password)", parents=[common])
    add.add_argument("username")
    add.add_argument("--role", choices=ROLES, required=True)
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input instead of asking")
    add.set_defaults(func=_add_user)
    passwd = actions.add_parser("passwd", help="replace an account's password", parents=[common])
    passwd.add_argument("username")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    passwd.set_defaults(func=_passwd)
    listing = actions.add_parser("list", help="list the accounts", parents=[common])
    listing.set_defaults(func=_list_users)


def _actor() -> str:
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = str(os.getuid())
    return f"cli:{who}"[:64]


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    try:
        first, again = getpass.getpass("Mot de passe : "), getpass.getpass("Mot de passe, encore : ")
    except EOFError:  # no terminal (a script, a pipe): getpass read standard input and found nothing
        raise SystemExit("erreur : pas de terminal pour taper le mot de passe ; donnez-le sur l'entrée standard "
                         "avec --password-stdin ; rien n'est changé") from None
    if first != again:
        raise SystemExit("les deux saisies diffèrent ; rien n'est changé")
    return first


def _accounts(settings: Settings) -> Accounts:
    make_var_dir(settings.var_dir)
    return Accounts(Journal(settings.db_url_resolved))


def _add_user(args: argparse.Namespace) -> int:
    accounts = _accounts(args.settings)
    try:
        user = accounts.add_user(args.username, _read_password(args.password_stdin), args.role, _actor())
    except AccountError as exc:
        print(f"erreur : {exc}", file=sys.stderr)
        return 1
    print(f"utilisateur {user.username} créé ({user.role_label})")
    return 0


def _passwd(args: argparse.Namespace) -> int:
    accounts = _accounts(args.settings)
    try:
        accounts.set_password(args.username, _read_password(args.password_stdin), _actor())
    except AccountError as exc:
        print(f"erreur : {exc}", file=sys.stderr)
        return 1
    print(f"mot de passe de {args.username} remplacé ; ses sessions sont fermées")
    return 0


def _list_users(args: argparse.Namespace) -> int:
    for user in _accounts(args.settings).list_users():
        print(f"{user.username:<24} {user.role_label:<16} {'actif' if user.active else 'désactivé'}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from telemetry import logs, multiprocess

    settings: Settings = args.settings
    make_var_dir(settings.var_dir)
    # Before anything imports prometheus_client (the app is preloaded in this process, then forked).
    multiprocess.enable(multiprocess.directory_for(settings.var_dir, "review"), wipe=True)

    from gunicorn.app.base import BaseApplication

    from review import create_app

    class ReviewServer(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            options: dict[str, Any] = {
                "bind": f"{settings.bind}:{settings.review_port}",
                "workers": args.workers,
                "threads": args.threads,
                "worker_class": "gthread",
                "timeout": 30,
                "graceful_timeout": 10,
                "accesslog": "-",
                "proc_name": "remontee-review",
                # Built before the fork: one secret key, one schema creation, the workers share them.
                "preload_app": True,
                "logconfig_dict": logs.logging_dict("review", settings.log_format),
                "logger_class": "telemetry.access_log.AccessLogger",
                "child_exit": multiprocess.child_exit,
            }
            # gunicorn 27's control socket defaults to one path per user ($HOME/.gunicorn/gunicorn.ctl):
            # the pen and review masters would take it from each other. Nothing here uses it.
            if "control_socket_disable" in self.cfg.settings:
                options["control_socket_disable"] = True
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return create_app(settings=settings)  # the flags too, not only the environment

    log.info("review UI on http://%s:%d/", settings.bind, settings.review_port)
    ReviewServer().run()
    return 0
