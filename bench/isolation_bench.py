#!/usr/bin/env python3
"""What isolation costs: sequential reads and writes with dd (1 MiB requests) of a file through a view of it,
against the same on the file natively, in the same run.

Rows:
  native           dd on the backend file itself (no filter)
  view→file        a view redirected to another real file (backend_file_name = its path): kernel passthrough
  view→handlers    a handler-served view (backend_file_name = ""): on_before_read_file / on_before_write_file
                   serve every request from an fd of the backend file, in Python; the view has a page cache of
                   its own, so the handlers get the kernel's page-cache fills (non-cached I/O, 1 MiB readahead)
  view→handlers/app  the same with process_cached_io_requests: no page cache, every application request (here
                   1 MiB) reaches the handlers as cached I/O, which complete it

Rounds are interleaved and their order rotates; the table gives the median MiB/s of the rounds and its ratio
to native's median from the same run.

    sudo .venv/bin/python bench/isolation_bench.py               # 5 rounds of 512 MiB
    sudo .venv/bin/python bench/isolation_bench.py --quick --rounds 1

Root is needed (a tmpfs holds the files; the filter mounts over a directory on it).
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
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))

from fsfilter import CBFilter  # noqa: E402
from fsfilter.api import constants as c  # noqa: E402
from fsfilter.api import fileinfo  # noqa: E402

MIB = 1 << 20
SYSTEMS = ["native", "view→file", "view→handlers", "view→handlers/app"]


def dd(args: list[str]) -> float:
    """Seconds dd took (its own count, from the start of the first request to the end of the last)."""
    start = time.perf_counter()
    subprocess.run(["dd", *args, "bs=1M", "status=none"], check=True)
    return time.perf_counter() - start


class HandlerServed:
    """Handlers that serve a view from a file of their own (what an encrypting or caching filter does, minus the
    transformation)."""

    def __init__(self, f: CBFilter, backend: str, redirect: bool) -> None:
        self.fd = os.open(backend, os.O_RDWR)
        self.f = f
        self.redirect = redirect
        self.backend = backend
        f.on_before_open_file = self.before_open
        f.on_before_create_file = self.before_open
        if not redirect:
            f.on_before_read_file = self.before_read
            f.on_before_write_file = self.before_write
            f.on_before_query_file_info = self.before_query
            f.on_before_set_file_info = self.before_set

    def before_open(self, p: Any) -> None:
        p.isolate = True
        p.backend_file_name = self.backend if self.redirect else ""

    def before_read(self, p: Any) -> None:
        p.bytes_to_read = os.preadv(self.fd, [p.buffer_view[:p.bytes_to_read]], p.position)
        p.process_request = False

    def before_write(self, p: Any) -> None:
        os.pwrite(self.fd, p.buffer_view[:p.bytes_to_write], p.position)
        p.process_request = False

    def before_query(self, p: Any) -> None:
        if p.file_information_class == fileinfo.FILE_STANDARD_INFORMATION:
            size = os.fstat(self.fd).st_size
            p.buffer_view[:16] = size.to_bytes(8, "little") * 2
            p.valid_bytes = p.buffer_length
            p.process_request = False

    def before_set(self, p: Any) -> None:
        if p.file_information_class == fileinfo.FILE_END_OF_FILE_INFORMATION:
            os.ftruncate(self.fd, int.from_bytes(p.buffer_view[:8], "little", signed=True))
            p.process_request = False

    def close(self) -> None:
        os.close(self.fd)


def measure(system: str, top: Path, mib: int) -> tuple[float, float]:
    """(read MiB/s, write MiB/s) of one round."""
    backend = top / "backend" / "big.bin"
    data = top / "data"
    if system == "native":
        target = backend
        f = None
        served = None
    else:
        target = data / "big.bin"
        f = CBFilter()
        f.process_cached_io_requests = system == "view→handlers/app"
        served = HandlerServed(f, str(backend), redirect=system == "view→file")
        f.add_filter_rule(f"{data}/*", c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN | c.FS_CE_BEFORE_CREATE, c.FS_NE_NONE)
        f.start_filter()
    try:
        read = dd([f"if={target}", "of=/dev/null"])
        write = dd(["if=/dev/zero", f"of={target}", f"count={mib}", "conv=notrunc,fdatasync"])
    finally:
        if f is not None:
            f.stop_filter()
        if served is not None:
            served.close()
    return mib / read, mib / write


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="64 MiB")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("root is needed (it mounts a tmpfs and the filter)", file=sys.stderr)
        return 2
    mib = 64 if args.quick else args.mib
    systems = [s for s in args.systems.split(",") if s]
    results: dict[str, list[tuple[float, float]]] = {s: [] for s in systems}
    top = Path(tempfile.mkdtemp(prefix="fsfilter-isobench-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={2 * mib + 64}m", "tmpfs", str(top)], check=True)
    try:
        (top / "data").mkdir()
        (top / "backend").mkdir()
        with open(top / "backend" / "big.bin", "wb") as out:
            chunk = os.urandom(MIB)
            for _ in range(mib):
                out.write(chunk)
        (top / "data" / "big.bin").write_bytes(b"the file the view stands for\n")
        for r in range(args.rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            for system in order:
                results[system].append(measure(system, top, mib))
                print(f"round {r + 1} {system}: read {results[system][-1][0]:.0f} MiB/s, "
                      f"write {results[system][-1][1]:.0f} MiB/s", file=sys.stderr, flush=True)
    finally:
        subprocess.run(["umount", "-l", str(top)], check=False)
        os.rmdir(top)
    native = results.get("native")
    base = (statistics.median(x[0] for x in native), statistics.median(x[1] for x in native)) if native else None
    print(f"\nsequential I/O through views, dd bs=1M, {mib} MiB, median of {args.rounds} rounds (MiB/s)\n")
    print(f"{'system':18} {'read':>9} {'× native':>9} {'write':>9} {'× native':>9}")
    for system in systems:
        rd = statistics.median(x[0] for x in results[system])
        wr = statistics.median(x[1] for x in results[system])
        rr = f"{rd / base[0]:.2f}" if base else "-"
        wrr = f"{wr / base[1]:.2f}" if base else "-"
        print(f"{system:18} {rd:9.0f} {rr:>9} {wr:9.0f} {wrr:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
