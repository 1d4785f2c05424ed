"""`run_gateway.py forms layout|print`: the paper form's geometry as JSON, and the blank form for a bureau."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from forms.definitions import Election, ElectionDefinitionError, load_election
from forms.layout import form_layout
from settings import Settings
from validation.normalize import normalize_bureau_code


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    forms = sub.add_parser("forms", help="the paper results form", parents=[common])
    actions = forms.add_subparsers(dest="forms_command", required=True)
    layout = actions.add_parser(
        "layout", help="print the form's geometry as JSON (millimetres, cells in reading order)", parents=[common]
    )
    layout.set_defaults(func=_layout)
    printer = actions.add_parser("print", help="render the blank form of one bureau at 300 dpi", parents=[common])
    printer.add_argument("--bureau", required=True, help="the bureau code printed in the QR code")
    printer.add_argument("--out", type=Path, required=True, help="FILE.png or FILE.pdf")
    printer.set_defaults(func=_print)


def _election(settings: Settings) -> Election:
    try:
        return load_election(settings.election)
    except ElectionDefinitionError as exc:
        raise SystemExit(f"forms: {exc}") from exc


def _layout(args: argparse.Namespace) -> int:
    election = _election(args.settings)
    json.dump(form_layout(election).to_json(), sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


def _print(args: argparse.Namespace) -> int:
    from forms.render import render_form, save_form  # Pillow and OpenCV only for this command

    settings: Settings = args.settings
    election = _election(settings)
    bureau = normalize_bureau_code(args.bureau)
    if bureau is None or len(bureau) > 10:
        raise SystemExit(f"forms print: bureau {args.bureau!r} must be 1 to 10 digits")
    if args.out.suffix.lower() not in (".png", ".pdf"):
        raise SystemExit(f"forms print: {args.out} must end in .png or .pdf")
    if not args.out.parent.is_dir():
        raise SystemExit(f"forms print: no directory {args.out.parent} to write {args.out.name} in")
    lines: tuple[str, ...] = ()
    if settings.registry_path.is_file():
        from registry import load_registry

        entry = load_registry(settings.registry_path).get(bureau)
        if entry is None:
            raise SystemExit(f"forms print: bureau {bureau} is not in the registry {settings.registry_path}")
        lines = (entry.name, f"{entry.commune} ({entry.department})")
    save_form(render_form(election, bureau, bureau_lines=lines), args.out)
    print(f"form for bureau {bureau} ({election.id}) written to {args.out}")
    return 0
