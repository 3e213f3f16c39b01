#!/usr/bin/env python3
"""What running a filter in fsfilterd's stack costs against running it in the application, in the same run.

* control: a C loop opens and closes one file N times; the filter has an empty ``on_before_open_file`` on
  ``DIR/*``. µs per event = (loop time − native loop time) / N. Embedded (the filter in this process) vs attached
  (the layer in a fsfilterd started for the run, the handler here: one round trip per open over the channel).
* notify: the same loop with an ``on_notify_open_file`` counting handler; notifications per second from the loop's
  start to the last delivery, and how many arrived (of N).
* channel: the channel alone, no FUSE: the service's end posts N notifications as fast as it can, the application's
  end decodes them and runs the handler through the filter's dispatcher (what the channel can carry).
* read: a 256 MiB file whose reads no rule needs, read through the mount from the page cache (kernel passthrough):
  embedded vs service-owned.

    sudo .venv/bin/python bench/service_bench.py             # 5 rounds, N = 20,000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from fsfilter import CBFilter  # noqa: E402
from fsfilter.api import _control  # noqa: E402
from fsfilter.api import constants as c  # noqa: E402
from fsfilter.api._attached import ServiceLink  # noqa: E402
from fsfilter.api.params import CBFilterNotifyOpenFileEventParams  # noqa: E402
from fsfilter.service import remote  # noqa: E402

LOOP = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[2]);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++) {
        int fd = open(argv[1], O_RDONLY);
        if (fd < 0) { perror("open"); return 1; }
        close(fd);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.6f\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
"""


def build(scratch: Path) -> Path:
    source = scratch / "openloop.c"
    source.write_text(LOOP)
    binary = scratch / "openloop"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def loop(binary: Path, path: Path, n: int) -> float:
    out = subprocess.run([str(binary), str(path), str(n)], capture_output=True, text=True, check=True, timeout=600)
    return float(out.stdout)


def read_all(path: Path) -> float:
    """The best of three reads of the whole file from the page cache (one read first warms it): what the path
    through the mount costs, without the disk's noise."""
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], capture_output=True, check=True)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return min(times)


@contextlib.contextmanager
def service(scratch: Path) -> Iterator[str]:
    sock = str(scratch / "control.sock")
    env = dict(os.environ, FSFILTER_ROOT=str(scratch / "root"), PYTHONPATH=str(ROOT / "src"))
    log = open(scratch / "fsfilterd.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "fsfilter.service", "--foreground", "--socket", sock], env=env,
                            stderr=log, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while "ready" not in (scratch / "fsfilterd.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fsfilterd did not start: " + (scratch / "fsfilterd.log").read_text())
            time.sleep(0.05)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@contextlib.contextmanager
def filtered(data: Path, mode: str, notify: bool, counter: list[int]) -> Iterator[CBFilter]:
    f = CBFilter()
    f.config(f"Service={'on' if mode == 'attached' else 'off'}")
    if notify:
        def note(e: object) -> None:
            counter[0] += 1
        f.on_notify_open_file = note
        f.add_filter_rule(f"{data}/*", 0, 0, c.FS_NE_OPEN)
    else:
        f.on_before_open_file = lambda e: None
        f.add_filter_rule(f"{data}/*", 0, c.FS_CE_BEFORE_OPEN, 0)
    f.start_filter(0)
    try:
        assert f.attached_to_service == (mode == "attached")
        yield f
    finally:
        f.stop_filter()


def channel_capacity(n: int) -> tuple[float, int]:
    """Notifications per second through the channel alone (socketpair), and how many arrived."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer = types.SimpleNamespace(channel=_control.Channel(a), pid=os.getpid())
    link = remote.Link(peer)  # type: ignore[arg-type]
    got = [0]
    done = threading.Event()
    f = CBFilter()

    def note(e: object) -> None:
        got[0] += 1
        if got[0] == n:
            done.set()
    f.on_notify_open_file = note
    f.dispatcher.start()
    app = ServiceLink(f, _control.Channel(b))
    params = CBFilterNotifyOpenFileEventParams(file_name="/srv/data/some-file.txt", desired_access=1,
                                               create_disposition=1, flags=0, mode=0o644)
    t0 = time.perf_counter()
    for _ in range(n):
        link.post("notify_open_file", params)
    done.wait(120)
    elapsed = time.perf_counter() - t0
    link.close()
    app._closing = True
    app.close()
    f.dispatcher.stop(5)
    return n / elapsed, got[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-n", type=int, default=20000, help="opens per loop")
    parser.add_argument("--read-mib", type=int, default=256)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (it mounts)", file=sys.stderr)
        return 1
    scratch = Path(tempfile.mkdtemp(prefix="fsfilter-svcbench-"))
    data = scratch / "data"
    data.mkdir()
    target = data / "f.txt"
    target.write_text("x\n")
    big = data / "big.bin"
    with open(big, "wb") as out:
        block = os.urandom(1 << 20)
        for _ in range(args.read_mib):
            out.write(block)
    binary = build(scratch)
    results: dict[str, list[float]] = {}
    delivered: dict[str, list[int]] = {}

    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    try:
        with service(scratch) as sock:
            os.environ["FSFILTER_SOCKET"] = sock
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
                add("native", loop(binary, target, args.n))
                for mode in ("embedded", "attached"):
                    counter = [0]
                    with filtered(data, mode, False, counter):
                        add(f"control {mode}", loop(binary, target, args.n))
                        add(f"read {mode}", read_all(big))
                    counter = [0]
                    with filtered(data, mode, True, counter):
                        t0 = time.perf_counter()
                        loop(binary, target, args.n)
                        deadline = time.monotonic() + 60
                        while counter[0] < args.n and time.monotonic() < deadline:
                            time.sleep(0.001)
                        add(f"notify {mode}", args.n / (time.perf_counter() - t0))
                        delivered.setdefault(mode, []).append(counter[0])
                rate, got = channel_capacity(max(args.n * 5, 100000))
                add("channel", rate)
                delivered.setdefault("channel", []).append(got)
                add("read native", read_all(big))
    finally:
        subprocess.run(["umount", "-l", str(data)], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    n = args.n
    per = {m: (med[f"control {m}"] - med["native"]) / n * 1e6 for m in ("embedded", "attached")}
    print(f"\nmedians of {args.rounds} interleaved round(s), N = {n:,} opens per loop; ratios from this run")
    print(f"{'measure':<34}{'embedded':>14}{'attached':>14}{'attached/embedded':>20}")
    print(f"{'control event, us per open':<34}{per['embedded']:>14.1f}{per['attached']:>14.1f}"
          f"{per['attached'] / per['embedded']:>20.2f}")
    print(f"{'open loop, x native':<34}{med['control embedded'] / med['native']:>14.2f}"
          f"{med['control attached'] / med['native']:>14.2f}"
          f"{med['control attached'] / med['control embedded']:>20.2f}")
    print(f"{'notifications per second':<34}{med['notify embedded']:>14,.0f}{med['notify attached']:>14,.0f}"
          f"{med['notify attached'] / med['notify embedded']:>20.2f}")
    print(f"{'  delivered (min of rounds, of N)':<34}{min(delivered['embedded']):>14,}"
          f"{min(delivered['attached']):>14,}")
    print(f"{'read 256 MiB, x native':<34}{med['read embedded'] / med['read native']:>14.2f}"
          f"{med['read attached'] / med['read native']:>14.2f}"
          f"{med['read attached'] / med['read embedded']:>20.2f}")
    print(f"channel alone (no FUSE): {med['channel']:,.0f} notifications per second, "
          f"{min(delivered['channel']):,} of {max(n * 5, 100000):,} delivered (min of rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
