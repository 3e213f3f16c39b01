#!/usr/bin/env python3
"""Run one benchmark from two checkouts of fsfilter, alternately, and compare them.

Each round is a separate invocation of the benchmark script of one checkout (``--rounds 1 --json FILE``),
with that checkout's own virtual environment; the sides alternate in the order before, after, after,
before, before, after, ... so that a slow stretch of this shared machine falls on both sides alike. The
table gives, per workload and system (passthrough_bench) or configuration (cbfilter_bench): each side's
median, after/before of the medians, the median of the after/before ratios of adjacent invocation pairs,
each side's median ratio to native measured in the same invocation, each side's spread, and the two-sided
p value of a Mann-Whitney U test of the two sides' samples.

    # two checkouts, each with its own venv (bash scripts/setup.sh inside each)
    git -C /work/main worktree add /work/bench-before e714d29 && (cd /work/bench-before && bash scripts/setup.sh)
    git -C /work/main worktree add --detach /work/bench-after main && (cd /work/bench-after && bash scripts/setup.sh)

    sudo python3 bench/compare_checkouts.py --bench cbfilter --before /work/bench-before --after /work/bench-after \\
        --rounds 6 --out /tmp/cmp-cbfilter -- --configs a,b,c --workloads small,tree,seq
    sudo python3 bench/compare_checkouts.py --bench passthrough --before /work/bench-before \\
        --after /work/bench-after --rounds 6 --out /tmp/cmp-passthrough -- --systems native,fsfilter,fsfilter-daemon
    python3 bench/compare_checkouts.py --bench cbfilter --report /tmp/cmp-cbfilter    # the table again

With ``--cpu`` each invocation also records the CPU seconds (user and system) of the benchmark's own process
(its threads, not its children): under cbfilter_bench the CBFilter runs in that process, so for one
configuration and one workload that is the filter daemon's work plus a constant start-up. The readers'
busy-poll is CPU time too, so the total follows the wall-clock time; the user part is the steadier sign of
more Python work per request.

Everything after ``--`` goes to the benchmark script unchanged (``--quick``, ``--seq-mib N``, ...). Every
invocation's JSON and stderr are kept in ``--out``, with ``manifest.json`` (order, exit codes, seconds).
After each invocation the script checks that the benchmark left nothing mounted under /tmp/fsfilter-bench-*
and no process of its own (a descendant of this script, or an orphan) running from either checkout, and stops
if it did; ``--resume`` with the same arguments continues such a comparison where it stopped. Standard library
only; root is needed for the benchmarks themselves.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIDES = ("before", "after")
# --cpu: the benchmark runs under this wrapper, which records the CPU seconds of the benchmark's own process
# (all its threads, none of its children): with cbfilter_bench that is the filter daemon's work plus a
# constant start-up.
CPU_WRAPPER = """
import json, resource, runpy, sys
out = sys.argv[1]
sys.argv = sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    r = resource.getrusage(resource.RUSAGE_SELF)
    with open(out, "w") as f:
        json.dump({"user": r.ru_utime, "sys": r.ru_stime}, f)
"""
SCRIPTS = {"cbfilter": "cbfilter_bench.py", "passthrough": "passthrough_bench.py"}
BENCH_MOUNT_PREFIX = "/tmp/fsfilter-bench-"  # both benchmarks' workspace (tempfile.mkdtemp(prefix=...))
BENCH_TMPFS_SOURCE = "fsfilter-bench"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- what a benchmark's JSON holds


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    vs_native: bool = True  # whether a ratio to native means something


# passthrough_bench.METRICS, spelled out so that this script needs neither checkout's code.
PASSTHROUGH_METRICS = [
    Metric("seq_write", "seq write, new file, 1 MiB blocks", "MiB/s", True),
    Metric("seq_overwrite", "seq overwrite, 1 MiB blocks", "MiB/s", True),
    Metric("seq_read", "seq read, 1 MiB blocks", "MiB/s", True),
    Metric("small_cycle", "small files: create+write, stat, unlink", "files/s", True),
    Metric("small_create", "  of which create+write+close", "files/s", True),
    Metric("small_stat", "  of which stat", "files/s", True),
    Metric("small_unlink", "  of which unlink", "files/s", True),
    Metric("tree_total", "tree: cp -a, ls -lR, rm -rf", "s", False),
    Metric("tree_copy", "  of which cp -a", "s", False),
    Metric("tree_list", "  of which ls -lR", "s", False),
    Metric("tree_remove", "  of which rm -rf", "s", False),
    Metric("rand_read", "random 4 KiB reads (fio, O_DIRECT)", "IOPS", True),
]

CBFILTER_WORKLOADS = {
    "small": [("small_total", "small files: create+write, stat, unlink"), ("small_create", "  of which create"),
              ("small_stat", "  of which stat"), ("small_unlink", "  of which unlink")],
    "tree": [("tree_total", "tree: cp -a, ls -lR, rm -rf"), ("tree_copy", "  of which cp -a"),
             ("tree_list", "  of which ls -lR"), ("tree_remove", "  of which rm -rf")],
    "seq": [("seq_total", "seq dd: write, overwrite, read"), ("seq_write", "  of which write (new file)"),
            ("seq_overwrite", "  of which overwrite"), ("seq_read", "  of which read")],
}
CBFILTER_CONFIGS = ["native", "a", "b", "c", "d", "e"]
CPU_METRICS = [Metric("cpu_self", "CPU of the benchmark's own process (--cpu)", "s", False, False),
               Metric("cpu_user", "  of which user", "s", False, False),
               Metric("cpu_sys", "  of which system", "s", False, False)]

# One sample: (value, ratio to native's value in the same invocation, or None).
Sample = tuple[float, float | None]
Samples = dict[tuple[str, str], list[Sample]]  # (metric key, system) -> samples, in invocation order


def passthrough_samples(data: dict[str, Any]) -> Samples:
    results: dict[str, dict[str, list[float]]] = data["results"]
    native = results.get("native", {})
    out: Samples = {}
    for system, metrics in results.items():
        for key, values in metrics.items():
            if not values:
                continue
            value = statistics.median(values)
            base = native.get(key)
            ratio = value / statistics.median(base) if base and statistics.median(base) else None
            out[(key, system)] = [(value, ratio)]
    return out


def cbfilter_samples(data: dict[str, Any]) -> Samples:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = data["runs"]
    native = runs.get("native", {})
    out: Samples = {}
    for config, by_workload in runs.items():
        for workload, rs in by_workload.items():
            for run in rs:  # one with --rounds 1
                times: dict[str, float] = run["times"]
                base_runs = native.get(workload) or []
                base_times: dict[str, float] = base_runs[0]["times"] if base_runs else {}
                for key, value in times.items():
                    base = base_times.get(key)
                    out.setdefault((key, config), []).append((value, value / base if base else None))
                if config == "native":
                    continue
                out.setdefault((f"{workload}_start", config), []).append((run["setup"], None))
                out.setdefault((f"{workload}_stop", config), []).append((run["stop"], None))
                delivered = run["stats"].get("notifications_delivered", 0)
                total = times.get(f"{workload}_total")
                if delivered and total:
                    out.setdefault((f"{workload}_evs", config), []).append((delivered / total, None))
                    out.setdefault((f"{workload}_events", config), []).append((float(delivered), None))
    return out


def cbfilter_metrics() -> list[tuple[Metric, str]]:
    """(metric, workload) in table order."""
    out: list[tuple[Metric, str]] = []
    for workload, rows in CBFILTER_WORKLOADS.items():
        for key, label in rows:
            out.append((Metric(key, label, "s", False), workload))
        out.append((Metric(f"{workload}_evs", "  notifications delivered / workload time", "ev/s", True, False),
                    workload))
        out.append((Metric(f"{workload}_events", "  notifications delivered", "count", True, False), workload))
        out.append((Metric(f"{workload}_start", "  CBFilter build + start_filter", "s", False, False), workload))
        out.append((Metric(f"{workload}_stop", "  stop_filter", "s", False, False), workload))
    return out


# -- statistics


def mann_whitney_p(xs: list[float], ys: list[float]) -> float | None:
    """Two-sided p of the Mann-Whitney U test (exact by enumeration for small samples; ties count 1/2)."""
    n, m = len(xs), len(ys)
    if n < 2 or m < 2:
        return None

    def u_of(a: list[float], b: list[float]) -> float:
        return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b)

    observed = u_of(xs, ys)
    centre = n * m / 2
    pooled = xs + ys
    if math.comb(n + m, n) <= 200_000:
        extreme = total = 0
        for chosen in itertools.combinations(range(n + m), n):
            picked = set(chosen)
            a = [pooled[i] for i in chosen]
            b = [pooled[i] for i in range(n + m) if i not in picked]
            total += 1
            if abs(u_of(a, b) - centre) >= abs(observed - centre) - 1e-9:
                extreme += 1
        return extreme / total
    sd = math.sqrt(n * m * (n + m + 1) / 12)
    z = (abs(observed - centre) - 0.5) / sd
    return math.erfc(z / math.sqrt(2))


def spread(values: list[float]) -> float | None:
    """Median absolute deviation relative to the median, in percent."""
    if len(values) < 2:
        return None
    med = statistics.median(values)
    if not med:
        return None
    return 100 * statistics.median(abs(v - med) for v in values) / abs(med)


def paired_ratio(order: list[str], per_invocation: list[Sample | None]) -> float | None:
    """Median over adjacent (before, after) invocation pairs of after/before: 0-1, 2-3, ... of the run order."""
    ratios: list[float] = []
    for i in range(0, len(order) - 1, 2):
        pair = {order[i]: per_invocation[i], order[i + 1]: per_invocation[i + 1]}
        b, a = pair.get("before"), pair.get("after")
        if b is not None and a is not None and b[0]:
            ratios.append(a[0] / b[0])
    return statistics.median(ratios) if ratios else None


# -- running


def checkout_python(checkout: Path) -> Path:
    python = checkout / ".venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} is missing: run bash scripts/setup.sh in {checkout}")
    return python


def bench_mounts() -> list[str]:
    left: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point, fstype, source = fields[4], fields[sep + 1], fields[sep + 2]
            if point.startswith(BENCH_MOUNT_PREFIX) or source == BENCH_TMPFS_SOURCE:
                left.append(f"{point} ({fstype})")
    return left


def parent_of(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2:].split()[1])


def processes_from(paths: list[Path]) -> list[str]:
    """Processes left by a benchmark: ones whose command line names one of the checkouts and that descend from
    this process or were orphaned (reparented to init). Others that merely use a checkout are not ours."""
    marks = [str(p).encode() for p in paths]
    me = os.getpid()
    found: list[str] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if not any(m in cmdline for m in marks):
            continue
        pid, ours = int(entry), False
        for _ in range(64):
            parent = parent_of(pid)
            if parent in (me, 1) or parent == 0:
                ours = parent != 0
                break
            pid = parent
        if ours:
            text = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry}: {text[:200]}")
    return found


def schedule(rounds: int) -> Iterator[str]:
    """before, after, after, before, before, after, ...: each side first in every other pair."""
    for r in range(rounds):
        yield from (SIDES if r % 2 == 0 else SIDES[::-1])


def run_all(args: argparse.Namespace, extra: list[str]) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    checkouts = {"before": args.before.resolve(), "after": args.after.resolve()}
    pythons = {side: checkout_python(path) for side, path in checkouts.items()}
    script = SCRIPTS[args.bench]
    for path in checkouts.values():
        if not (path / "bench" / script).exists():
            raise SystemExit(f"{path / 'bench' / script} is missing")
    manifest: dict[str, Any] = {"bench": args.bench, "checkouts": {k: str(v) for k, v in checkouts.items()},
                                "commits": {}, "extra": extra, "cpu": bool(args.cpu), "invocations": []}
    for side, path in checkouts.items():
        manifest["commits"][side] = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], text=True,
                                                   capture_output=True).stdout.strip()
    earlier = out / "manifest.json"
    done = 0
    if args.resume and earlier.exists():
        kept = json.loads(earlier.read_text())
        if (kept["bench"], kept["checkouts"], kept["extra"], kept.get("cpu", False)) != (
                manifest["bench"], manifest["checkouts"], manifest["extra"], manifest["cpu"]):
            raise SystemExit(f"{earlier} is of another comparison: not resuming it")
        manifest["invocations"] = kept["invocations"]
        done = len(kept["invocations"])
        log(f"resuming after {done} invocation(s)")
    started = time.monotonic()
    plan = list(schedule(args.rounds))
    for i, side in enumerate(plan):
        if i < done:
            continue
        path = checkouts[side]
        result = out / f"{i:02d}-{side}.json"
        errlog = out / f"{i:02d}-{side}.stderr"
        cmd = [str(pythons[side]), str(path / "bench" / script), "--rounds", "1", "--json", str(result), *extra]
        if args.cpu:
            cmd[1:1] = ["-c", CPU_WRAPPER, str(out / f"{i:02d}-{side}.cpu.json")]
        shown = " ".join(cmd[:1] + ["-c", "<cpu wrapper>", *cmd[3:]] if args.cpu else cmd)
        log(f"[{i + 1}/{len(plan)}] {side}: {shown} (load {os.getloadavg()[0]:.2f})")
        t0 = time.monotonic()
        with open(errlog, "w") as err, open(out / f"{i:02d}-{side}.stdout", "w") as stdout:
            proc = subprocess.Popen(cmd, cwd=path, stdout=stdout, stderr=err)
            try:
                rc = proc.wait(args.timeout)
            except BaseException:
                # Both benchmarks clean up (unmount, remove their tmpfs) on SIGINT.
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
        seconds = time.monotonic() - t0
        manifest["invocations"].append({"index": i, "side": side, "json": result.name, "rc": rc,
                                        "seconds": round(seconds, 1), "load": os.getloadavg()[0]})
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
        log(f"    rc={rc} in {seconds:.0f} s")
        if rc != 0:
            log(f"    the benchmark failed; its stderr ends:\n{errlog.read_text()[-2000:]}")
        left = bench_mounts()
        stray = processes_from(list(checkouts.values()))
        if left or stray:
            raise SystemExit(f"left behind after invocation {i}: mounts {left}, processes {stray}")
    log(f"all {len(plan)} invocations in {time.monotonic() - started:.0f} s")


# -- reporting


def load(out: Path) -> tuple[dict[str, Any], list[str], list[Samples | None]]:
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    parse = cbfilter_samples if manifest["bench"] == "cbfilter" else passthrough_samples
    order: list[str] = []
    samples: list[Samples | None] = []
    for inv in manifest["invocations"]:
        order.append(inv["side"])
        path = out / inv["json"]
        parsed = parse(json.loads(path.read_text())) if path.exists() else None
        cpu = out / inv["json"].replace(".json", ".cpu.json")
        if parsed is not None and cpu.exists():
            used = json.loads(cpu.read_text())
            parsed[("cpu_self", "bench process")] = [(used["user"] + used["sys"], None)]
            parsed[("cpu_user", "bench process")] = [(used["user"], None)]
            parsed[("cpu_sys", "bench process")] = [(used["sys"], None)]
        samples.append(parsed)
    return manifest, order, samples


def first(inv: Samples | None, key: str, system: str) -> Sample | None:
    samples = inv.get((key, system)) if inv else None
    return samples[0] if samples else None


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f}"
    return f"{value:,.0f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(out: Path) -> str:
    manifest, order, per_invocation = load(out)
    if manifest["bench"] == "cbfilter":
        metrics = cbfilter_metrics()
        present = {s for inv in per_invocation if inv for (_k, s) in inv}
        systems = [c for c in [*CBFILTER_CONFIGS, "bench process"] if c in present]
    else:
        metrics = [(m, "") for m in PASSTHROUGH_METRICS]
        present = {s for inv in per_invocation if inv for (_k, s) in inv}
        preferred = ["native", "fsfilter", "fsfilter-daemon", "bindfs", "pyfuse3", "bench process"]
        systems = [s for s in preferred if s in present] + sorted(present - set(preferred))
    metrics += [(m, "") for m in CPU_METRICS]
    counts = {side: sum(1 for i, s in enumerate(order) if s == side and per_invocation[i] is not None)
              for side in SIDES}
    head = (f"{'workload':42} {'system':15} {'unit':7} {'before':>10} {'after':>10} {'aft/bef':>8} {'paired':>7} "
            f"{'bef×nat':>8} {'aft×nat':>8} {'±bef%':>6} {'±aft%':>6} {'p':>6}  verdict")
    lines = [f"{manifest['bench']}_bench: before {manifest['commits'].get('before', '?')[:10]} "
             f"({counts['before']} invocations), after {manifest['commits'].get('after', '?')[:10]} "
             f"({counts['after']} invocations), order {' '.join(s[0].upper() for s in order)}; "
             f"benchmark arguments: {' '.join(manifest['extra']) or '(defaults)'}", head, "-" * len(head)]
    for metric, _workload in metrics:
        for system in systems:
            invs = [first(inv, metric.key, system) for inv in per_invocation]
            side_vals = {side: [s for s, o in zip(invs, order, strict=True) if o == side and s is not None]
                         for side in SIDES}
            if not side_vals["before"] and not side_vals["after"]:
                continue
            med = {side: statistics.median(v[0] for v in vals) if vals else None for side, vals in side_vals.items()}
            nat: dict[str, float | None] = {}
            for side, vals in side_vals.items():
                ratios = [r for _v, r in vals if r is not None]
                nat[side] = statistics.median(ratios) if ratios and metric.vs_native and system != "native" else None
            b, a = med["before"], med["after"]
            change = a / b if a is not None and b else None
            p = mann_whitney_p([v for v, _r in side_vals["before"]], [v for v, _r in side_vals["after"]])
            verdict = ""
            if change is not None and p is not None:
                worse = change < 1 if metric.higher_is_better else change > 1
                if metric.unit == "count":
                    verdict = "same" if abs(change - 1) < 0.01 else "differs"
                elif p < 0.05:
                    verdict = "WORSE" if worse else "better"
                elif p < 0.2:
                    verdict = "worse?" if worse else "better?"
            sb, sa = spread([v for v, _r in side_vals["before"]]), spread([v for v, _r in side_vals["after"]])
            lines.append(
                f"{metric.label[:42]:42} {system[:15]:15} {metric.unit:7} {fmt(b, metric.unit):>10} "
                f"{fmt(a, metric.unit):>10} {fmt_ratio(change):>8} {fmt_ratio(paired_ratio(order, invs)):>7} "
                f"{fmt_ratio(nat['before']):>8} {fmt_ratio(nat['after']):>8} "
                f"{'-' if sb is None else f'{sb:.1f}':>6} {'-' if sa is None else f'{sa:.1f}':>6} "
                f"{'-' if p is None else f'{p:.3f}':>6}  {verdict}")
    lines += [
        "before/after: medians over each side's invocations (one round each); aft/bef = after median / before "
        "median (for s: above 1 is slower; for MiB/s, files/s, IOPS, ev/s: below 1 is slower);",
        "paired: median of after/before over adjacent invocation pairs; ×nat: median of the ratio to native in "
        "the same invocation; ±%: median absolute deviation / median;",
        "p: two-sided Mann-Whitney U of the two sides' values; verdict: WORSE/better at p < 0.05, worse?/better? "
        "at p < 0.2 (no correction for the many rows).",
    ]
    return "\n".join(lines)


def main() -> int:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--bench", choices=sorted(SCRIPTS), required=True)
    parser.add_argument("--before", type=Path, help="the older checkout (with its .venv)")
    parser.add_argument("--after", type=Path, help="the newer checkout (with its .venv)")
    parser.add_argument("--rounds", type=int, default=5, help="invocations per side (default 5)")
    parser.add_argument("--out", type=Path, help="directory for every invocation's JSON and logs")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one invocation may take")
    parser.add_argument("--report", type=Path, metavar="DIR", help="only print the table of an earlier --out")
    parser.add_argument("--resume", action="store_true",
                        help="continue the comparison in --out from where it stopped (same arguments)")
    parser.add_argument("--cpu", action="store_true",
                        help="also record the CPU seconds of the benchmark's own process (threads, not children)")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report))
        return 0
    if args.before is None or args.after is None:
        parser.error("--before and --after are needed (or --report DIR)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if os.geteuid() != 0:
        parser.error("run as root: the benchmarks mount file systems")
    if args.out is None:
        args.out = Path(f"/tmp/compare-{args.bench}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_all(args, extra)
    print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
