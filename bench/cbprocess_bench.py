#!/usr/bin/env python3
"""What listening to process events costs: a C loop of N fork+exec of /bin/true (each waited for), unwatched,
under ``fsfilter procmon`` (CBProcess, one line per event) and under ``forkstat -e all``, in the same run.

The table gives the loop's median time and its ratio to the unwatched median, and for fsfilter the creations
and terminations it printed for the loop's children (of N each). Rounds are interleaved.

    sudo .venv/bin/python bench/cbprocess_bench.py                 # 1,000 fork+exec, 5 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import passthrough_bench as pb  # noqa: E402

LOOP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid == 0) { execl(argv[2], "true", (char *)NULL); _exit(127); }
        int status;
        waitpid(pid, &status, 0);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%d %.6f\n", getpid(), (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
"""


def build(scratch: Path) -> Path:
    source, binary = scratch / "forkexec.c", scratch / "forkexec"
    source.write_text(LOOP)
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    return binary


@contextlib.contextmanager
def watcher(name: str, out: Path) -> Iterator[None]:
    if name == "none":
        yield
        return
    if name == "fsfilter":
        cmd = [sys.executable, "-m", "fsfilter", "procmon"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    else:
        cmd, env = ["forkstat", "-e", "all"], None
    with open(out, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.PIPE, env=env)
        try:
            if name == "fsfilter":
                assert proc.stderr is not None
                proc.stderr.readline()  # "watching processes; Ctrl-C to stop"
            else:
                time.sleep(1.0)
            yield
            time.sleep(1.0)  # let it print what is queued
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def counted(out: Path, loop_pid: int) -> tuple[int, int]:
    """(creations, terminations) fsfilter printed for the loop's children."""
    starts = ends = 0
    children: set[str] = set()
    for line in out.read_text(errors="replace").splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[1] == "start" and fields[4] == str(loop_pid):
            starts += 1
            children.add(fields[2])
        elif len(fields) >= 3 and fields[1] == "exit" and fields[2] in children:
            ends += 1
    return starts, ends


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-install", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: the process connector needs it")
    pb.apt_install(["forkstat"], not args.no_install)
    names = ["none", "fsfilter"] + (["forkstat"] if subprocess.run(["which", "forkstat"], capture_output=True)
                                      .returncode == 0 else [])
    true = os.path.realpath("/bin/true")
    results: dict[str, list[float]] = {n: [] for n in names}
    seen: list[tuple[int, int]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fsfilter-procbench-") as tmp:
        scratch = Path(tmp)
        binary = build(scratch)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                out = scratch / f"{name}.out"
                with watcher(name, out):
                    done = subprocess.run([str(binary), str(args.count), true], capture_output=True, text=True,
                                          check=True)
                loop_pid, seconds = done.stdout.split()
                results[name].append(float(seconds))
                if name == "fsfilter":
                    seen.append(counted(out, int(loop_pid)))
                pb.log(f"round {r + 1}/{args.rounds} {name:9}: {float(seconds):.3f} s"
                       + (f", {seen[-1][0]} creations, {seen[-1][1]} terminations" if name == "fsfilter" else ""))
    base = statistics.median(results["none"])
    print(pb.machine_line())
    print(f"{args.rounds} round(s) in {time.monotonic() - started:.0f} s; {args.count:,} fork+exec of {true}")
    print(f"{'watcher':10} {'loop s':>8} {'x none':>7}")
    for name in names:
        value = statistics.median(results[name])
        print(f"{name:10} {value:8.3f} {value / base:7.2f}")
    print(f"fsfilter printed, per round (creations, terminations of the {args.count:,} children): {seen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
