#!/usr/bin/env python3
"""What CBFilter's rules cost: the same workloads natively and under five CBFilter configurations,
all mounted over the workload's directory itself.

    a   add_attach_point(DIR) only, no rules
    b   10,000 notify rules (open, read, write) with handlers set, none of which can match: DIR/nomatch<i>/*.dat
    c   DIR/* with FS_NE_ALL and DIR itself with FS_NE_ENUMERATE_DIRECTORY, an empty handler on every
        on_notify_* event; every notification must be delivered (posted == delivered after stop_filter)
    d   one access rule DIR/protected/* with ACCESS_READ_ONLY (the workloads do not touch protected/)
    e   one lock-notification rule DIR/protected/* with a handler: the daemon then serves every lock of the
        mount, and every close(2) sends a FLUSH (the workloads take no locks)

The workloads are passthrough_bench.py's own (imported from it): the small-file cycle (bench/smallfiles.c),
the tree (cp -a, ls -lR, rm -rf) and sequential dd (new file, overwrite, read). Every one runs in a child
process: CBFilter does not filter the requests of the process that runs it (FilterOwnRequests=false).

Rounds are interleaved: in each round every workload runs under every configuration, the order of the
configurations rotating from round to round. Each run has a fresh CBFilter, started before the workload and
stopped after it; one untimed native pass of each workload comes first. The table gives median times,
their ratio to native's median and to configuration a's.

    sudo .venv/bin/python bench/cbfilter_bench.py                  # 5 rounds, everything
    sudo .venv/bin/python bench/cbfilter_bench.py --quick          # 1 round, small sizes: does it work?
    sudo .venv/bin/python bench/cbfilter_bench.py --configs a,c --workloads tree --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import passthrough_bench as pb  # noqa: E402

from fsfilter import CBFilter  # noqa: E402
from fsfilter.api import constants as c  # noqa: E402
from fsfilter.api.cbfilter import NOTIFY_BITS  # noqa: E402

DEFAULT_SIZES = pb.Sizes()
QUICK_SIZES = pb.QUICK
NOMATCH_RULES = 10_000
ALL_CONFIGS = ["a", "b", "c", "d", "e"]
ALL_WORKLOADS = ["small", "tree", "seq"]
log = pb.log


def _ignore(params: object) -> None:
    """The empty handler."""


# -- the configurations


@dataclass
class Config:
    name: str
    note: str
    build: Callable[[Path], CBFilter] | None  # None: native
    check_zero_events: bool = False  # the workload must fire no event at all
    count_events: bool = False


def build_a(d: Path) -> CBFilter:
    f = CBFilter()
    f.add_attach_point(str(d))
    return f


def build_b(d: Path) -> CBFilter:
    f = CBFilter()
    f.add_attach_point(str(d))
    flags = c.FS_NE_OPEN | c.FS_NE_READ | c.FS_NE_WRITE
    for i in range(NOMATCH_RULES):
        f.add_filter_rule(f"{d}/nomatch{i}/*.dat", c.ACCESS_NONE, c.FS_CE_NONE, flags)
    f.on_notify_open_file = _ignore
    f.on_notify_read_file = _ignore
    f.on_notify_write_file = _ignore
    return f


def build_c(d: Path) -> CBFilter:
    f = CBFilter()
    f.add_filter_rule(f"{d}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_ALL)
    f.add_filter_rule(str(d), c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_ENUMERATE_DIRECTORY)
    for event in NOTIFY_BITS:
        setattr(f, "on_" + event, _ignore)
    return f


def build_d(d: Path) -> CBFilter:
    f = CBFilter()
    # protected/ exists (with a file, for the check that the rule is live), so the rule alone would mount
    # over DIR/protected only and never see the workload: the attach point puts the mount on DIR.
    f.add_attach_point(str(d))
    f.add_filter_rule(f"{d}/protected/*", c.ACCESS_READ_ONLY, c.FS_CE_NONE, c.FS_NE_NONE)
    return f


def build_e(d: Path) -> CBFilter:
    f = CBFilter()
    f.add_attach_point(str(d))
    f.add_filter_rule(f"{d}/protected/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_LOCK_CONTROL)
    f.on_notify_lock = _ignore  # a lock handler at start: the daemon keeps every lock of the mount
    return f


CONFIGS = {
    "native": Config("native", "the plain tmpfs directory", None),
    "a": Config("a", "add_attach_point only, no rules", build_a, check_zero_events=True),
    "b": Config("b", f"{NOMATCH_RULES:,} notify rules DIR/nomatch<i>/*.dat (open, read, write), none matching",
                build_b, check_zero_events=True),
    "c": Config("c", "DIR/* FS_NE_ALL + DIR FS_NE_ENUMERATE_DIRECTORY, empty handler on every notify event",
                build_c, count_events=True),
    "d": Config("d", "access rule DIR/protected/* ACCESS_READ_ONLY, workload outside protected/", build_d,
                check_zero_events=True),
    "e": Config("e", "lock rule DIR/protected/* FS_NE_LOCK_CONTROL with a handler: the daemon serves all locks "
                "(every close sends FLUSH); workload outside protected/", build_e, check_zero_events=True),
}


# -- running one workload under one configuration


@dataclass
class Place:
    data: Path  # DIR: where the workloads run, and what the filters mount over
    warm: Path  # a sibling in the same tmpfs, never filtered (seq's native warm-up file)
    sizes: pb.Sizes
    binary: Path | None


@dataclass
class Run:
    times: dict[str, float]  # seconds of each phase and the workload's total
    setup: float = 0.0  # building the CBFilter (its rules) and start_filter
    stop: float = 0.0  # stop_filter, which delivers what is still queued
    stats: dict[str, int] = field(default_factory=dict)
    queued_at_end: int = 0  # notifications still queued when the workload finished


def workload_times(name: str, place: Place) -> dict[str, float]:
    """Run a workload of passthrough_bench (child processes only) and return the seconds of its phases."""
    s = place.sizes
    if name == "seq":
        fig = pb.seq(place.data, place.warm, s)
        t = {"seq_write": s.seq_mib / fig["seq_write"], "seq_overwrite": s.seq_mib / fig["seq_overwrite"],
             "seq_read": s.seq_mib / fig["seq_read"]}
        t["seq_total"] = t["seq_write"] + t["seq_overwrite"] + t["seq_read"]
    elif name == "small":
        assert place.binary is not None
        fig = pb.small(place.data, s, place.binary)
        n = s.small_files
        t = {"small_create": n / fig["small_create"], "small_stat": n / fig["small_stat"],
             "small_unlink": n / fig["small_unlink"]}
        t["small_total"] = t["small_create"] + t["small_stat"] + t["small_unlink"]
    elif name == "tree":
        t = dict(pb.tree(place.data, s))
    else:
        raise ValueError(name)
    return t


def stop_and_unmount(f: CBFilter, data: Path) -> None:
    """stop_filter, and whatever it takes that nothing stays mounted over ``data``."""
    try:
        f.stop_filter()
    finally:
        if pb.fuse_mounted(data):
            log(f"warning: {data} still mounted after stop_filter: detaching it")
            subprocess.run(["umount", "-l", str(data)], capture_output=True)


def start(config: Config, data: Path) -> CBFilter:
    assert config.build is not None
    f = config.build(data)
    f.start_filter(0)
    try:
        points = [f.get_attach_point(i) for i in range(f.attach_point_count)]
        if points != [str(data)]:
            raise RuntimeError(f"config {config.name}: mounted on {points}, expected only {data}")
    except BaseException:
        stop_and_unmount(f, data)
        raise
    return f


def run_one(config: Config, workload: str, place: Place) -> Run:
    if config.build is None:
        return Run(workload_times(workload, place))
    t0 = time.perf_counter()
    f = start(config, place.data)
    setup = time.perf_counter() - t0
    stopped = False
    try:
        times = workload_times(workload, place)
        queued = f.stats["notifications_queued"]
        t1 = time.perf_counter()
        stop_and_unmount(f, place.data)
        stop = time.perf_counter() - t1
        stopped = True
    finally:
        if not stopped:
            stop_and_unmount(f, place.data)
    stats = f.stats
    run = Run(times, setup, stop, stats, queued)
    if config.check_zero_events and (stats["notifications_posted"] or stats["control_events"]):
        raise RuntimeError(f"config {config.name}: the {workload} workload fired events it should not: {stats}")
    if config.count_events:
        lost = stats["notifications_posted"] - stats["notifications_delivered"]
        if lost or stats["expired"] or stats["failed"] or stats["notifications_queued"]:
            raise RuntimeError(f"config {config.name}: {workload}: {lost} notification(s) lost: {stats}")
        if not stats["notifications_delivered"]:
            raise RuntimeError(f"config {config.name}: {workload}: no notification delivered: {stats}")
    return run


# -- checks that the rules are live (once, before the timed rounds, each in a child process)


def child(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], text=True, capture_output=True)


def verify(config: Config, place: Place) -> str:
    """Show that a configuration's rules do act on the files they name; returns what was seen."""
    d = place.data
    f = start(config, d)
    try:
        if config.name == "b":
            probe = child(f"mkdir {d}/nomatch42 && echo x > {d}/nomatch42/probe.dat && cat {d}/nomatch42/probe.dat"
                          f" >/dev/null && rm -r {d}/nomatch42")
            if probe.returncode:
                raise RuntimeError(f"config b probe failed: {probe.stderr}")
        elif config.name == "c":
            child(f"ls -l {d} >/dev/null && echo x > {d}/probe && cat {d}/probe >/dev/null && rm {d}/probe")
        elif config.name == "d":
            write = child(f"echo y >> {d}/protected/file")
            read = child(f"cat {d}/protected/file")
            if write.returncode == 0 or read.returncode != 0 or read.stdout != "x\n":
                raise RuntimeError(f"config d: the access rule did not act: write rc={write.returncode} "
                                   f"{write.stderr.strip()!r}, read rc={read.returncode} {read.stdout!r}")
            return f"d: a write to protected/file was refused ({write.stderr.strip()}); reading it works"
        elif config.name == "e":
            probe = child(f"flock {d}/protected/file true")
            if probe.returncode:
                raise RuntimeError(f"config e probe failed: {probe.stderr}")
    finally:
        stop_and_unmount(f, d)
    s = f.stats
    if config.name == "b":
        if s["notifications_delivered"] < 2:
            raise RuntimeError(f"config b: a matching file fired no open/write notification: {s}")
        return f"b: a matching file (nomatch42/probe.dat) fired {s['notifications_delivered']} notification(s)"
    if config.name == "c":
        if s["notifications_delivered"] < 5:
            raise RuntimeError(f"config c: too few notifications for ls, write, read, rm: {s}")
        return f"c: ls, write, read, rm of one file fired {s['notifications_delivered']} notification(s)"
    if config.name == "e":
        if s["notifications_delivered"] < 1:
            raise RuntimeError(f"config e: flock on a covered file fired no lock notification: {s}")
        return f"e: flock of protected/file fired {s['notifications_delivered']} lock notification(s)"
    return f"{config.name}: starts and stops"


# -- reporting


@dataclass
class Row:
    key: str
    label: str
    workload: str
    total: bool = False  # the workload's whole time (events/s go here)


def rows(sizes: pb.Sizes) -> list[Row]:
    return [
        Row("small_total", f"small files ({sizes.small_files:,}): create+write 100 B, stat, unlink", "small", True),
        Row("small_create", "  of which create+write+close", "small"),
        Row("small_stat", "  of which stat", "small"),
        Row("small_unlink", "  of which unlink", "small"),
        Row("tree_total", f"tree ({sizes.tree_source}): cp -a, ls -lR, rm -rf", "tree", True),
        Row("tree_copy", "  of which cp -a", "tree"),
        Row("tree_list", "  of which ls -lR", "tree"),
        Row("tree_remove", "  of which rm -rf", "tree"),
        Row("seq_total", f"sequential dd, {sizes.seq_mib} MiB in 1 MiB blocks: all three", "seq", True),
        Row("seq_write", "  of which write of a new file (fsync)", "seq"),
        Row("seq_overwrite", "  of which overwrite (fsync)", "seq"),
        Row("seq_read", "  of which read (page cache dropped)", "seq"),
    ]


def median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def ratio(x: float | None, base: float | None) -> str:
    return f"{x / base:.2f}" if x is not None and base else "-"


def report(runs: dict[str, dict[str, list[Run]]], names: list[str], workloads: list[str], sizes: pb.Sizes,
           rounds: int) -> str:
    def times(config: str, key: str, workload: str) -> list[float]:
        return [r.times[key] for r in runs.get(config, {}).get(workload, []) if key in r.times]

    cols: list[tuple[str, int]] = []  # (header, width)
    for n in names:
        cols.append((f"{n} s", 9))
        if n != "native":
            cols.append((f"{n} ×nat", 7))
            if n != "a" and "a" in names:
                cols.append((f"{n} ×a", 6))
        if CONFIGS[n].count_events:
            cols.append((f"{n} ev/s", 9))
    table_rows = [r for r in rows(sizes) if r.workload in workloads]
    lw = max(len(r.label) for r in table_rows)
    head = f"{'workload (median seconds; ×: time ratio, lower is better)':{lw}}" + "".join(
        f" {h:>{w}}" for h, w in cols)
    lines = [head, "-" * len(head)]
    for r in table_rows:
        nat = median(times("native", r.key, r.workload))
        base_a = median(times("a", r.key, r.workload))
        cells: list[str] = []
        for n in names:
            m = median(times(n, r.key, r.workload))
            cells.append("-" if m is None else f"{m:.3f}")
            if n != "native":
                cells.append(ratio(m, nat))
                if n != "a" and "a" in names:
                    cells.append(ratio(m, base_a))
            if CONFIGS[n].count_events:
                if r.total:
                    rates = [run.stats["notifications_delivered"] / run.times[r.key]
                             for run in runs.get(n, {}).get(r.workload, []) if run.times.get(r.key)]
                    cells.append(f"{statistics.median(rates):,.0f}" if rates else "-")
                else:
                    cells.append("")
        lines.append(f"{r.label:{lw}}" + "".join(f" {cell:>{w}}" for cell, (_, w) in zip(cells, cols, strict=True)))
    lines.append(f"medians of {rounds} interleaved round(s); ×nat = median / native median, ×a = median / "
                 "configuration a's median, both from this run; ev/s = notifications delivered / the workload's time")
    for n in names:
        lines.append(f"  {n}: {CONFIGS[n].note}")
    # What the table leaves out: start-up (rules and mount), stop (draining), the events themselves.
    for n in names:
        if CONFIGS[n].build is None:
            continue
        for w in workloads:
            rs = runs.get(n, {}).get(w, [])
            if not rs:
                continue
            setup = statistics.median(r.setup for r in rs)
            stop = statistics.median(r.stop for r in rs)
            extra = ""
            if CONFIGS[n].count_events:
                delivered = statistics.median(r.stats["notifications_delivered"] for r in rs)
                queued = max(r.queued_at_end for r in rs)
                lost = sum(r.stats["notifications_posted"] - r.stats["notifications_delivered"] for r in rs)
                extra = (f", {delivered:,.0f} notifications delivered (median), at most {queued:,} still queued "
                         f"when the workload ended, {lost} lost in all rounds")
            lines.append(f"  {n} {w}: start {setup:.3f} s, stop {stop:.3f} s (medians){extra}")
    return "\n".join(lines)


# -- main


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def fuse_mounts_under(top: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2].startswith("fuse")
                and line.split()[1].startswith(str(top))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 1 with --quick)")
    parser.add_argument("--configs", default="a,b,c,d,e",
                        help="comma-separated, from a, b, c, d, e (native always runs)")
    parser.add_argument("--workloads", default="small,tree,seq", help="comma-separated: small, tree, seq")
    parser.add_argument("--quick", action="store_true", help="1 round and small sizes, to check that the script works")
    parser.add_argument("--seq-mib", type=int, help=f"size of the sequential file (default {DEFAULT_SIZES.seq_mib}, "
                                                    f"{QUICK_SIZES.seq_mib} with --quick)")
    parser.add_argument("--json", type=Path, help="also write every run's figures to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("cbfilter_bench: run as root (it mounts file systems and drops the page cache)", file=sys.stderr)
        return 1
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    configs = [x for x in args.configs.split(",") if x]
    workloads = [x for x in args.workloads.split(",") if x]
    if set(configs) - set(ALL_CONFIGS) or not configs:
        parser.error(f"--configs takes some of {','.join(ALL_CONFIGS)}")
    if set(workloads) - set(ALL_WORKLOADS) or not workloads:
        parser.error(f"--workloads takes some of {','.join(ALL_WORKLOADS)}")
    configs = [x for x in ALL_CONFIGS if x in configs]
    workloads = [x for x in ALL_WORKLOADS if x in workloads]
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    if args.seq_mib:
        sizes = replace(sizes, seq_mib=args.seq_mib)
    binary = None
    if "small" in workloads:
        pb.apt_install(["gcc", "libc6-dev"], True)
        binary = pb.build_smallfiles()
    names = ["native", *configs]
    machine = pb.machine_line()
    log(machine)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    runs: dict[str, dict[str, list[Run]]] = {n: {} for n in names}
    failed: dict[str, str] = {}
    checks: list[str] = []
    started = time.monotonic()
    top: Path | None = None
    try:
        with pb.workspace() as (top, data, _mnt):
            warm = data.parent / "warm"
            warm.mkdir()
            (data / "protected").mkdir()
            (data / "protected" / "file").write_text("x\n")
            place = Place(data, warm, sizes, binary)
            for n in configs:
                try:
                    checks.append(verify(CONFIGS[n], place))
                    log(f"check {checks[-1]}")
                except Exception:
                    failed[n] = traceback.format_exc()
                    log(f"config {n} failed its check:\n{failed[n]}")
            # One untimed native pass first: the first read of /usr/include and the first write of a
            # large file cost far more than later ones, and would land on whoever runs first in round 1.
            for w in workloads:
                log(f"warm-up {w}: " + ", ".join(f"{k}={v:.3f}" for k, v in workload_times(w, place).items()))
            for r in range(rounds):
                for w in workloads:
                    live = [n for n in names if n not in failed]
                    order = live[r % len(live):] + live[:r % len(live)]
                    for n in order:
                        try:
                            run = run_one(CONFIGS[n], w, place)
                        except Exception:
                            failed[n] = traceback.format_exc()
                            log(f"round {r + 1} {w} {n} FAILED:\n{failed[n]}")
                            subprocess.run(["rm", "-rf", str(data / "small"), str(data / "tree"),
                                            str(data / "seq.bin"), str(warm / "warm.bin")], capture_output=True)
                            if n == "native":
                                raise
                            continue
                        runs[n].setdefault(w, []).append(run)
                        extra = ""
                        if CONFIGS[n].count_events:
                            extra = f", {run.stats['notifications_delivered']:,} notifications"
                        log(f"round {r + 1}/{rounds} {w:5} {n:6}: "
                            + ", ".join(f"{k}={v:.3f}" for k, v in run.times.items()) + extra)
    finally:
        if top is not None:
            left = fuse_mounts_under(top)
            if left:
                log(f"warning: FUSE mounts left behind: {left}")
    print(machine)
    print(f"{rounds} round(s) in {time.monotonic() - started:.0f} s; sizes: {sizes.small_files:,} small files, "
          f"tree {sizes.tree_source}, {sizes.seq_mib} MiB sequential")
    print(report(runs, [n for n in names if runs[n]], workloads, sizes, rounds))
    for line in checks:
        print(f"check {line}")
    for n, tb in failed.items():
        print(f"config {n} FAILED:\n{tb}")
    if args.json:
        out: dict[str, Any] = {"machine": machine, "sizes": sizes.__dict__, "runs": {
            n: {w: [r.__dict__ for r in rs] for w, rs in by_w.items()} for n, by_w in runs.items()}}
        args.json.write_text(json.dumps(out, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
