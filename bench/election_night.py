#!/usr/bin/env python3
"""Election night on 10,000 bureaux against the running system: `run_gateway.py all`, every fault, the reckoning.

    .venv/bin/python bench/election_night.py                       # 10,000 bureaux, the hour in 20 minutes
    .venv/bin/python bench/election_night.py --bureaux 1000 --window 30 --disk-full-seconds 4

Half the bureaux report by phone (scripted Asterisk peers, several hundred calls at once at the
peak), half by digital pen (signed uploads of forms filled with real held-out handwriting, InkML or
scans); presidents slip and correct, drop calls and resume, report by both channels; stations
retry and re-dock. Redis is killed, a work horse is killed mid-job, the pen gateway is killed, the
upload directory is full for a minute. Prints the figures and the verdict (exit status 1 on FAIL);
the logic is tests/election_night.py. Needs root for the tmpfs that the disk-full fault fills.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from election_night import NightPlan, run_night  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bureaux", type=int, default=10_000)
    parser.add_argument("--window", type=float, default=1200.0, help="seconds the night's hour is compressed into")
    parser.add_argument("--prompt-seconds", type=float, default=0.5, help="the caller's time over each prompt")
    parser.add_argument("--scan-share", type=float, default=0.05, help="share of pen pages sent as scans")
    parser.add_argument("--stations", type=int, default=8)
    parser.add_argument("--disk-full-seconds", type=float, default=60.0)
    parser.add_argument("--tmpfs-mb", type=int, default=3072,
                        help="the upload directory: room for ~5,000 raw pages and their artefacts (~1.5 GB)")
    parser.add_argument("--drain-timeout", type=float, default=1800.0)
    parser.add_argument("--seed", type=int, default=2011)
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures and the verdict here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("rq").setLevel(logging.WARNING)
    plan = NightPlan(bureaux=args.bureaux, window=args.window, prompt_seconds=args.prompt_seconds,
                     scan_share=args.scan_share, stations=args.stations, disk_full_seconds=args.disk_full_seconds,
                     tmpfs_mb=args.tmpfs_mb, drain_timeout=args.drain_timeout, seed=args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="election-night-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run_night(plan, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(result.summary())
    if args.json:
        args.json.write_text(json.dumps({
            "plan": asdict(plan), "figures": result.figures,
            "faults": [asdict(e) for e in result.faults],
            "verdict": {"ok": result.verdict.ok, "problems": result.verdict.problems, "notes": result.verdict.notes},
        }, indent=1, default=str))
    return 0 if result.verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
