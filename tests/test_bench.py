"""The benchmark script still works: one quick round of every workload, native against fsfilter, and a
table with a ratio for each. It asserts that the figures exist, never what they are."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_root

BENCH = Path(__file__).resolve().parent.parent / "bench" / "passthrough_bench.py"


@needs_root
@pytest.mark.timeout(180)
def test_bench_quick_round_prints_a_table() -> None:
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to build bench/smallfiles.c (scripts/setup.sh installs it)")
    workloads = "seq,small,tree,rand" if shutil.which("fio") else "seq,small,tree"
    before = set(_bench_mounts())  # another benchmark may be running on this machine: only ours count
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--rounds", "1", "--systems", "native,fsfilter",
                           "--workloads", workloads, "--no-install"], capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("  ")[0]: line for line in proc.stdout.splitlines()}
    for label in ("sequential write", "sequential read", "small files", "tree"):
        row = next((line for key, line in rows.items() if key.startswith(label)), None)
        assert row is not None, f"no {label!r} row in:\n{proc.stdout}"
        assert "1.000×" in row and row.count("×") == 2, row  # native's own ratio, then fsfilter's
    left = set(_bench_mounts()) - before
    assert not left, f"the benchmark left mounts behind: {left}"


def _bench_mounts() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if "fsfilter-bench" in line]
