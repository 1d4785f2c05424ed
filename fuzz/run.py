"""Run one coverage-guided fuzz target for a while and print what it did (execs, coverage, crashes).

    .venv/bin/python fuzz/run.py --target agi --seconds 600
    .venv/bin/python fuzz/run.py --target image --seconds 300 --rss-limit-mb 1536

It starts `python -m fuzz.<target>` (atheris/libFuzzer) with the committed seeds under
fuzz/corpus/<target>/ and a working corpus under var/fuzz/corpus/<target>/ (git-ignored, kept
between runs, so a second run goes on where the first stopped). Crashing inputs land in
var/fuzz/crashes/<target>/; libFuzzer stops at the first one, whose path this prints. The full
libFuzzer log is var/fuzz/<target>.log. Exit status: 0 clean, 1 a crash (or a timeout, or out of
memory), 2 the fuzzer could not start.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("agi", "inkml", "image", "upload")


def summary(log: str) -> dict[str, str]:
    """The last status line's figures (`#N ... cov: C ft: F corp: K/S exec/s: E`) and the final stats."""
    figures: dict[str, str] = {}
    for line in log.splitlines():
        m = re.match(r"#(\d+)\s+\w+\s+(.*)$", line)
        if m:
            figures["execs"] = m.group(1)
            for key, value in re.findall(r"(cov|ft|corp|exec/s|rss): (\S+)", m.group(2)):
                figures[key] = value
        m = re.match(r"stat::(\w+):\s+(\d+)", line)
        if m:
            figures[m.group(1)] = m.group(2)
    crashes = re.findall(r"Test unit written to (\S+)", log)
    if crashes:
        figures["crash"] = " ".join(crashes)
    if "ERROR: libFuzzer: timeout" in log:
        figures["failure"] = "timeout"
    elif "out-of-memory" in log:
        figures["failure"] = "out-of-memory"
    elif "Uncaught Python exception" in log or "crash" in figures:
        figures["failure"] = "crash"
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=TARGETS, required=True)
    parser.add_argument("--seconds", type=int, default=600, help="total fuzzing time (libFuzzer -max_total_time)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take before it is a crash")
    parser.add_argument("--rss-limit-mb", type=int, default=2048, help="memory one process may use (bombs)")
    parser.add_argument("--max-len", type=int, default=0, help="largest input libFuzzer makes (0: its default)")
    parser.add_argument("--fresh", action="store_true", help="start from the seeds alone (forget var/ corpus)")
    parser.add_argument("extra", nargs="*", help="more libFuzzer flags, after --")
    args = parser.parse_args(argv)

    work = ROOT / "var" / "fuzz"
    corpus = work / "corpus" / args.target
    crashes = work / "crashes" / args.target
    if args.fresh and corpus.exists():
        for path in corpus.iterdir():
            path.unlink()
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    seeds = ROOT / "fuzz" / "corpus" / args.target
    command = [
        sys.executable, "-m", f"fuzz.{args.target}",
        f"-max_total_time={args.seconds}", f"-timeout={args.timeout}", f"-rss_limit_mb={args.rss_limit_mb}",
        f"-artifact_prefix={crashes}/", "-print_final_stats=1", "-print_pcs=0",
        *([f"-max_len={args.max_len}"] if args.max_len else []),
        *args.extra, str(corpus), *([str(seeds)] if seeds.is_dir() else []),
    ]
    log_path = work / f"{args.target}.log"
    print("$", " ".join(command), flush=True)
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    elapsed = time.monotonic() - started
    figures = summary(log_path.read_text(errors="replace"))
    if "execs" not in figures and "number_of_executed_units" not in figures:
        print(f"the fuzzer did not run (exit {process.returncode}); see {log_path}")
        return 2
    execs = figures.get("number_of_executed_units", figures.get("execs"))
    print(f"target {args.target}: {elapsed:.0f} s, {execs} inputs tried, "
          f"cov {figures.get('cov', '?')} edges, ft {figures.get('ft', '?')} features, "
          f"corpus {figures.get('corp', '?')}, {figures.get('exec/s', '?')} exec/s, "
          f"peak rss {figures.get('peak_rss_mb', '?')} MB")
    if "failure" in figures:
        print(f"{figures['failure']}: {figures.get('crash', '(no artifact)')}; log {log_path}")
        return 1
    print(f"no crash; log {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
