"""Wall time and peak RSS of `ham-hf prepare` on a HAM10000 folder (a subprocess, as a user runs it).

    .venv/bin/python benchmarks/prepare.py --data-dir "$HAM10000_DIR" [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit


def run_once(data_dir: str) -> tuple[float, float]:
    """Run prepare once in a fresh process; return (seconds, peak RSS in MB of that process)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "ham_hf.cli", "prepare", "--data-dir", data_dir, "--output", f"{tmp}/out"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        seconds = time.perf_counter() - start
        # ru_maxrss of children is the max over all waited-for children: run each repeat in a fresh
        # interpreter so the figure is this run's (it can only grow, so report the running max).
        peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
        return seconds, peak


def main() -> None:
    """Measure and log the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = [run_once(args.data_dir) for _ in range(args.repeats)]
    seconds = sorted(r[0] for r in runs)
    figures = {"data": Path(args.data_dir).name, "runs": len(runs), "median_s": round(seconds[len(seconds) // 2], 2),
               "min_s": round(seconds[0], 2), "max_s": round(seconds[-1], 2),
               "peak_rss_mb": round(max(r[1] for r in runs))}
    emit(figures, args.json)


if __name__ == "__main__":
    main()
