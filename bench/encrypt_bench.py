#!/usr/bin/env python3
"""What CBEncrypt costs: sequential writes and reads with dd (1 MiB requests) of a file through a trusted
process's plaintext view, a re-read (the view's page cache), and an untrusted process's read of the stored
ciphertext, against dd on a plain file natively, in the same run.

Rounds are interleaved and rotate; the table gives the median MiB/s and its ratio to native's median from the same
run. A tmpfs holds the files (root is needed).

    sudo .venv/bin/python bench/encrypt_bench.py               # 5 rounds of 256 MiB
    sudo .venv/bin/python bench/encrypt_bench.py --quick --rounds 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))

from fsfilter.api.cbencrypt import CBEncrypt  # noqa: E402

ROWS = ["write", "read", "re-read", "untrusted read"]


def dd(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run(["dd", *args, "bs=1M", "status=none"], check=True)
    return time.perf_counter() - start


def native(top: Path, mib: int) -> dict[str, float]:
    path = top / "plain" / "big"
    w = dd("if=/dev/zero", f"of={path}", f"count={mib}", "conv=fdatasync")
    r = dd(f"if={path}", "of=/dev/null")
    rr = dd(f"if={path}", "of=/dev/null")
    start = time.perf_counter()  # the same reader as the untrusted one below
    subprocess.run(["sh", "-c", f"cat {path} > /dev/null"], check=True)
    u = time.perf_counter() - start
    os.unlink(path)
    return {"write": mib / w, "read": mib / r, "re-read": mib / rr, "untrusted read": mib / u}


def encrypted(top: Path, mib: int) -> dict[str, float]:
    data = top / "enc"
    e = CBEncrypt()
    e.config(f"JournalDirectory={top / 'journal'}")
    e.add_encrypt_rule(f"{data}/*", "benchmark password")
    e.add_trusted_process("dd")
    e.start_filter()
    try:
        path = data / "big"
        w = dd("if=/dev/zero", f"of={path}", f"count={mib}", "conv=fdatasync")  # dd is trusted: plaintext
        r = dd(f"if={path}", "of=/dev/null")
        rr = dd(f"if={path}", "of=/dev/null")
        start = time.perf_counter()  # an untrusted reader (cat) of the stored bytes
        subprocess.run(["sh", "-c", f"cat {path} > /dev/null"], check=True)
        u = time.perf_counter() - start
    finally:
        e.stop_filter()
    os.unlink(data / "big")
    return {"write": mib / w, "read": mib / r, "re-read": mib / rr, "untrusted read": mib / u}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="32 MiB")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("root is needed (a tmpfs and the filter's mount)", file=sys.stderr)
        return 2
    mib = 32 if args.quick else args.mib
    top = Path(tempfile.mkdtemp(prefix="fsfilter-encbench-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={3 * mib + 64}m", "tmpfs", str(top)], check=True)
    results: dict[str, list[dict[str, float]]] = {"native": [], "CBEncrypt": []}
    try:
        for d in ("plain", "enc", "journal"):
            (top / d).mkdir()
        for r in range(args.rounds):
            order = ["native", "CBEncrypt"] if r % 2 == 0 else ["CBEncrypt", "native"]
            for system in order:
                got = native(top, mib) if system == "native" else encrypted(top, mib)
                results[system].append(got)
                print(f"round {r + 1} {system}: " + ", ".join(f"{k} {v:.0f}" for k, v in got.items()),
                      file=sys.stderr, flush=True)
    finally:
        subprocess.run(["umount", "-l", str(top)], check=False)
        os.rmdir(top)
    print(f"\nCBEncrypt, dd bs=1M, {mib} MiB, median of {args.rounds} rounds (MiB/s; untrusted read: cat)\n")
    print(f"{'workload':16} {'native':>9} {'CBEncrypt':>10} {'× native':>9}")
    for row in ROWS:
        n = statistics.median(x[row] for x in results["native"])
        e = statistics.median(x[row] for x in results["CBEncrypt"])
        print(f"{row:16} {n:9.0f} {e:10.0f} {e / n:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
