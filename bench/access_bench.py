#!/usr/bin/env python3
"""What an open costs under CBFilter's access rules enforced through fanotify (config AccessViaFanotify=true):
native opens, first opens (each file's first: one permission event answered in Python), and cached opens (the
same files again: the file's ignore mark answers in the kernel).

An opener process (not the filtering one) opens and closes every file of a tree of D directories with F files
each on a tmpfs of its own, timing itself; the filter has one deny-all rule elsewhere on that tmpfs. Medians
of several rounds, ratios to the native median of the same run.

    sudo .venv/bin/python bench/access_bench.py                 # 2,000 directories x 5 files, 5 rounds
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import passthrough_bench as pb  # noqa: E402

from fsfilter import ACCESS_DENY_ALL, CBFilter  # noqa: E402

OPENER = r"""
import os, sys, time
paths = sys.argv[1:]
t = time.perf_counter()
for p in paths:
    os.close(os.open(p, os.O_RDONLY))
print((time.perf_counter() - t) / len(paths) * 1e6)
"""


def open_all(paths: list[str]) -> float:
    """µs per open+close, measured in a child process."""
    out = subprocess.run([sys.executable, "-S", "-c", OPENER, *paths], capture_output=True, text=True, check=True)
    return float(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dirs", type=int, default=2000)
    parser.add_argument("--files", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: fanotify permission marks need it")
    top = Path(tempfile.mkdtemp(prefix="fsfilter-accessbench-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "fsfilter-accessbench", str(top)], check=True)
    results: dict[str, list[float]] = {"native": [], "first": [], "cached": []}
    started = time.monotonic()
    try:
        (top / "protected").mkdir()
        (top / "protected" / "secret").write_text("x")
        for r in range(args.rounds):
            tree = top / f"round{r}"
            paths = []
            for d in range(args.dirs):
                (tree / f"d{d}").mkdir(parents=True)
                for i in range(args.files):
                    p = tree / f"d{d}" / f"f{i}"
                    p.write_bytes(b"x")
                    paths.append(str(p))
            native_before = open_all(paths)
            f = CBFilter()
            f.config("AccessViaFanotify=true")
            f.add_filter_rule(f"{top}/protected/*", ACCESS_DENY_ALL, 0, 0)
            f.start_filter()
            try:
                results["first"].append(open_all(paths))  # each file's first open: a permission event
                results["cached"].append(open_all(paths))
                guard = f._fanotify
                events = guard.answered if guard else 0
            finally:
                f.stop_filter()
            # native measured on both sides of the filtered runs: this VM drifts by tens of percent
            results["native"].append((native_before + open_all(paths)) / 2)
            pb.log(f"round {r + 1}/{args.rounds}: native {results['native'][-1]:.2f} µs, first "
                   f"{results['first'][-1]:.2f} µs, cached {results['cached'][-1]:.2f} µs ({events} events answered)")
            shutil.rmtree(tree)
    finally:
        subprocess.run(["umount", str(top)], check=False)
        shutil.rmtree(top, ignore_errors=True)
    native = statistics.median(results["native"])
    print(pb.machine_line())
    print(f"{args.rounds} round(s) in {time.monotonic() - started:.0f} s; {args.dirs:,} directories x {args.files} "
          "files, opened by a separate process")
    print(f"{'open':10} {'µs per open+close':>18} {'x native':>9}")
    for name in ("native", "first", "cached"):
        value = statistics.median(results[name])
        print(f"{name:10} {value:18.2f} {value / native:9.2f}")
    print("medians of rounds; first = each file's first open (one permission event answered in Python); "
          "cached = every file again (answered by the file's ignore mark in the kernel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
