#!/usr/bin/env python3
"""What CBEncrypt costs: sequential writes and reads with dd (1 MiB requests) of a file through a trusted
process's plaintext view, a re-read (the view's page cache), an untrusted process's read of the stored
ciphertext, and the small-file cycle (bench/smallfiles.c) of a trusted program, against the same natively and
through gocryptfs (Debian's package, installed if missing), in the same run. Both derive their password keys
with scrypt N = 2^10.

Rounds are interleaved and rotate; the table gives the median MiB/s and its ratio to native's median from the same
run. A tmpfs holds the files (root is needed).

    sudo .venv/bin/python bench/encrypt_bench.py               # 5 rounds of 256 MiB
    sudo .venv/bin/python bench/encrypt_bench.py --quick --rounds 1
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

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

import passthrough_bench as pb  # noqa: E402

from fsfilter.api.cbencrypt import CBEncrypt  # noqa: E402

ROWS = ["write", "read", "re-read", "untrusted read", "small files"]
SMALL = 1000  # files in the small-file cycle (bench/smallfiles.c: create with a 100-byte write, stat, unlink)


def small_files(directory: Path) -> float:
    """Files per second of the small-file cycle in ``directory`` (its program is trusted where that matters)."""
    out = subprocess.run([str(pb.build_smallfiles()), str(directory), str(SMALL)], check=True, capture_output=True,
                         text=True).stdout.split()
    return SMALL / sum(float(x) for x in out)


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
    return {"write": mib / w, "read": mib / r, "re-read": mib / rr, "untrusted read": mib / u,
            "small files": small_files(top / "plain")}


def encrypted(top: Path, mib: int) -> dict[str, float]:
    data = top / "enc"
    e = CBEncrypt()
    e.config(f"JournalDirectory={top / 'journal'}")
    e.config("ScryptLog2N=10")  # as gocryptfs -scryptn 10
    e.add_encrypt_rule(f"{data}/*", "benchmark password")
    e.add_trusted_process("dd")
    e.add_trusted_process("smallfiles")
    e.start_filter()
    try:
        small = small_files(data)
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
    return {"write": mib / w, "read": mib / r, "re-read": mib / rr, "untrusted read": mib / u, "small files": small}


def gocryptfs(top: Path, mib: int) -> dict[str, float]:
    """The same through gocryptfs (Debian's package, -scryptn 10): its plaintext mount, and its cipher directory read
    by cat for the stored bytes."""
    cipher, plain = top / "gcipher", top / "gplain"
    for d in (cipher, plain):
        d.mkdir(exist_ok=True)
    password = top / "gpass"
    password.write_text("benchmark password\n")
    if not (cipher / "gocryptfs.conf").exists():
        subprocess.run(["gocryptfs", "-init", "-q", "-scryptn", "10", "-passfile", str(password), str(cipher)],
                       check=True, capture_output=True)
    subprocess.run(["gocryptfs", "-q", "-passfile", str(password), str(cipher), str(plain)], check=True)
    try:
        small = small_files(plain)
        path = plain / "big"
        w = dd("if=/dev/zero", f"of={path}", f"count={mib}", "conv=fdatasync")
        r = dd(f"if={path}", "of=/dev/null")
        rr = dd(f"if={path}", "of=/dev/null")
        stored = [p for p in cipher.iterdir() if p.name not in ("gocryptfs.conf", "gocryptfs.diriv")]
        start = time.perf_counter()
        subprocess.run(["sh", "-c", f"cat {stored[0]} > /dev/null"], check=True)
        u = time.perf_counter() - start
        os.unlink(path)
    finally:
        subprocess.run(["fusermount3", "-u", str(plain)], check=False)
    return {"write": mib / w, "read": mib / r, "re-read": mib / rr, "untrusted read": mib / u, "small files": small}


def have_gocryptfs(install: bool) -> bool:
    if shutil.which("gocryptfs") is None and install:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", "gocryptfs"], env=env, capture_output=True)
    return shutil.which("gocryptfs") is not None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="32 MiB")
    ap.add_argument("--no-install", action="store_true", help="do not install gocryptfs (its row is then left out)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("root is needed (a tmpfs and the filter's mount)", file=sys.stderr)
        return 2
    mib = 32 if args.quick else args.mib
    top = Path(tempfile.mkdtemp(prefix="fsfilter-encbench-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={3 * mib + 64}m", "tmpfs", str(top)], check=True)
    systems = ["native", "CBEncrypt"] + (["gocryptfs"] if have_gocryptfs(not args.no_install) else [])
    results: dict[str, list[dict[str, float]]] = {system: [] for system in systems}
    try:
        for d in ("plain", "enc", "journal"):
            (top / d).mkdir()
        for r in range(args.rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            for system in order:
                run = {"native": native, "CBEncrypt": encrypted, "gocryptfs": gocryptfs}[system]
                got = run(top, mib)
                results[system].append(got)
                print(f"round {r + 1} {system}: " + ", ".join(f"{k} {v:.0f}" for k, v in got.items()),
                      file=sys.stderr, flush=True)
    finally:
        subprocess.run(["umount", "-l", str(top)], check=False)
        os.rmdir(top)
    print(f"\nCBEncrypt, dd bs=1M, {mib} MiB, median of {args.rounds} rounds (MiB/s; untrusted read: cat; small "
          f"files: files/s of a create+write, stat, unlink cycle of {SMALL})\n")
    head = f"{'workload':16} {'native':>9}" + "".join(f" {s:>10} {'× native':>9}" for s in systems[1:])
    print(head)
    for row in ROWS:
        n = statistics.median(x[row] for x in results["native"])
        line = f"{row:16} {n:9.0f}"
        for system in systems[1:]:
            v = statistics.median(x[row] for x in results[system])
            line += f" {v:10.0f} {v / n:9.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
