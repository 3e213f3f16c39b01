#!/usr/bin/env python3
"""What watching costs, and what each watcher sees: a burst of small files (bench/smallfiles.c: create, write
100 bytes and close N files, stat them, unlink them, at C speed) in a directory on a tmpfs of its own, with no
watcher and under each of

    fsfilter   fsfilter monitor --system DIR --events close   (CBMonitor on fanotify, one line per event)
    fatrace    fatrace --current-mount --filter=C              (fanotify, mount mark)
    inotify    inotifywait -m -r -e close_write --format %w%f DIR
    watchdog   a watchdog Observer (inotify) printing each FileClosedEvent

Each watcher writes one line per close to a file; a file counts as seen when its name appears there. The table
gives the workload's median time and its ratio to the unwatched median of the same run, the files seen (of
N, with the fraction lost), and events per second: files seen / (last line written - workload start).
Rounds are interleaved (the watchers' order rotates); medians over rounds.

    sudo .venv/bin/python bench/cbmonitor_bench.py                 # 100,000 files, 3 rounds
    sudo .venv/bin/python bench/cbmonitor_bench.py --files 20000 --rounds 1 --watchers fsfilter,fatrace
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
import passthrough_bench as pb  # noqa: E402  (the shared tool helpers)

ALL_WATCHERS = ["fsfilter", "fatrace", "inotify", "watchdog"]
NAME = re.compile(rb"/(f\d{7})\b")

WATCHDOG_SCRIPT = r"""
import sys, time
from watchdog.observers import Observer
from watchdog.events import FileSystemEventHandler
out = open(sys.argv[2], "w", buffering=1 << 16)
class H(FileSystemEventHandler):
    def on_closed(self, event):
        out.write(event.src_path + "\n")
o = Observer(); o.schedule(H(), sys.argv[1], recursive=True); o.start()
print("ready", flush=True)
try:
    while True:
        time.sleep(0.2)
        out.flush()
except KeyboardInterrupt:
    pass
o.stop(); o.join(); out.flush()
"""


@dataclass
class Result:
    seconds: float
    seen: int
    span: float  # from the workload's start to the watcher's last line


def watcher_command(name: str, directory: Path, out: Path) -> tuple[list[str], dict[str, str] | None, Path | None]:
    """The command, its environment, and its working directory."""
    if name == "fsfilter":
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        return [sys.executable, "-m", "fsfilter", "monitor", "--system", str(directory), "--events", "close"], env, None
    if name == "fatrace":
        return ["fatrace", "--current-mount", "--filter=C", "-o", str(out)], None, directory
    if name == "inotify":
        return ["inotifywait", "-m", "-r", "-q", "-e", "close_write", "--format", "%w%f", "-o", str(out),
                str(directory)], None, None
    return [sys.executable, "-c", WATCHDOG_SCRIPT, str(directory), str(out)], None, None


def seen_names(out: Path) -> set[bytes]:
    try:
        return set(NAME.findall(out.read_bytes()))
    except FileNotFoundError:
        return set()


@contextlib.contextmanager
def watcher(name: str, directory: Path, out: Path) -> Iterator[subprocess.Popen[bytes]]:
    cmd, env, cwd = watcher_command(name, directory, out)
    stdout = open(out, "wb") if name == "fsfilter" else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=stdout, stderr=subprocess.DEVNULL)
    try:
        # Ready when a probe file's close shows up in its output.
        deadline = time.monotonic() + 30
        probe = directory / "f9999999"
        while time.monotonic() < deadline:
            probe.write_bytes(b"probe")
            if b"f9999999" in seen_names(out):
                break
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}")
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{name} did not report a probe file within 30 s")
        probe.unlink()
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if stdout is not subprocess.DEVNULL:
            stdout.close()  # type: ignore[union-attr]


def one_run(name: str | None, directory: Path, binary: Path, files: int, scratch: Path) -> Result:
    out = scratch / f"{name}.out"
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    context = watcher(name, directory, out) if name else contextlib.nullcontext()
    with context:
        start = time.monotonic()
        wall = time.time()
        done = subprocess.run([str(binary), str(directory), str(files)], check=True, capture_output=True, text=True)
        create, stat_, unlink = (float(x) for x in done.stdout.split())
        seconds = create + stat_ + unlink
        if name is None:
            return Result(seconds, 0, 0.0)
        # wait until the watcher has been quiet for 2 s (or has reported everything)
        last_size, quiet_since = -1, time.monotonic()
        while time.monotonic() - quiet_since < 2.0 and time.monotonic() - start < 300:
            size = out.stat().st_size if out.exists() else 0
            if size != last_size:
                last_size, quiet_since = size, time.monotonic()
            time.sleep(0.1)
    seen = len(seen_names(out) - {b"f9999999"})
    span = (out.stat().st_mtime - wall) if out.exists() else 0.0
    return Result(seconds, seen, max(span, seconds))


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="fsfilter-monbench-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g", "fsfilter-monbench", str(top)], check=True)
    try:
        yield top
    finally:
        if subprocess.run(["umount", str(top)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(top)], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--watchers", default=",".join(ALL_WATCHERS))
    parser.add_argument("--no-install", action="store_true", help="use only the tools already installed")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: fanotify watchers need it")
    names = [w for w in args.watchers.split(",") if w]
    if set(names) - set(ALL_WATCHERS):
        parser.error(f"--watchers takes some of {','.join(ALL_WATCHERS)}")
    pb.apt_install([p for p, w in (("fatrace", "fatrace"), ("inotify-tools", "inotify")) if w in names],
                   not args.no_install)
    if "watchdog" in names and subprocess.run([sys.executable, "-c", "import watchdog"]).returncode != 0:
        if args.no_install:
            names.remove("watchdog")
        else:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "watchdog"], check=False)
    names = [n for n in names if n in ("fsfilter", "watchdog") or shutil.which({"fatrace": "fatrace",
                                                                                  "inotify": "inotifywait"}[n])]
    binary = pb.build_smallfiles()
    results: dict[str, list[Result]] = {n: [] for n in ["none", *names]}
    started = time.monotonic()
    with workspace() as top:
        directory = top / "watched"
        directory.mkdir()
        scratch = Path(tempfile.mkdtemp(prefix="fsfilter-monbench-out-"))
        try:
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)] if names else []
                for name in [None, *order]:
                    result = one_run(name, directory, binary, args.files, scratch)
                    results[name or "none"].append(result)
                    pb.log(f"round {r + 1}/{args.rounds} {name or 'none':9}: {result.seconds:.3f} s, "
                           f"{result.seen:,} seen, span {result.span:.2f} s")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    base = statistics.median(x.seconds for x in results["none"])
    print(f"{pb.machine_line()}")
    print(f"{args.rounds} round(s) in {time.monotonic() - started:.0f} s; {args.files:,} files "
          "(create+write+close, stat, unlink)")
    print(f"{'watcher':10} {'workload s':>10} {'x none':>7} {'files seen':>11} {'lost':>7} {'events/s':>10}")
    for name, runs in results.items():
        seconds = statistics.median(x.seconds for x in runs)
        if name == "none":
            print(f"{name:10} {seconds:10.3f} {1.0:7.2f} {'-':>11} {'-':>7} {'-':>10}")
            continue
        seen = statistics.median(x.seen for x in runs)
        rate = statistics.median(x.seen / x.span for x in runs if x.span > 0)
        lost = 1 - seen / args.files
        print(f"{name:10} {seconds:10.3f} {seconds / base:7.2f} {int(seen):11,} {lost:7.1%} {rate:10,.0f}")
    print("medians of interleaved rounds; x none = workload time / unwatched median in this run; events/s = files "
          "seen / (last line written - workload start)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
