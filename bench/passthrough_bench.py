#!/usr/bin/env python3
"""What a pass-through file system costs: native tmpfs against fsfilter (kernel passthrough, and with every
read and write served by the daemon), bindfs and pyfuse3's passthrough example, over the same tmpfs lower
directory.

Rounds are interleaved (round 1 runs every system, then round 2 ...) and the order of the systems rotates
from round to round, so a noisy moment on this shared machine hurts each system alike. The table gives the
median of the rounds and its ratio to native's median from the same run.

    sudo .venv/bin/python bench/passthrough_bench.py             # 5 rounds, everything (about 10 minutes)
    sudo .venv/bin/python bench/passthrough_bench.py --quick --rounds 1 --systems native,fsfilter

Root is needed (it mounts a tmpfs and the FUSE file systems, and drops the page cache before the sequential
read). fio, bindfs and gcc come from Debian's packages and pyfuse3 from PyPI (into bench/.cache); the script
installs what is missing unless --no-install is given, and leaves out a system whose tool it cannot get.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".cache"
MIB = 1 << 20


@dataclass
class Sizes:
    seq_mib: int = 1024
    small_files: int = 10_000
    tree_source: str = "/usr/include"
    rand_mib: int = 256
    rand_seconds: int = 10


QUICK = Sizes(seq_mib=64, small_files=1000, tree_source="/usr/include/linux", rand_mib=16, rand_seconds=1)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


# -- getting the tools


def apt_install(packages: list[str], allowed: bool) -> None:
    missing = [p for p in packages if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return
    if not allowed:
        log(f"not installing {' '.join(missing)} (--no-install)")
        return
    log(f"installing {' '.join(missing)} from Debian's packages ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env,
                      capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env,
                       capture_output=True)


def build_smallfiles() -> Path:
    CACHE.mkdir(exist_ok=True)
    binary, source = CACHE / "smallfiles", BENCH / "smallfiles.c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source)])
    return binary


def pyfuse3_example(allowed: bool) -> list[str] | None:
    """A venv with pyfuse3 (built against libfuse3) and the passthroughfs.py example from its sdist."""
    venv, example = CACHE / "pyfuse3-venv", CACHE / "passthroughfs.py"
    python = venv / "bin" / "python"
    if python.exists() and example.exists():
        return [str(python), str(example)]
    if not allowed:
        return None
    log("installing pyfuse3 from PyPI into bench/.cache ...")
    try:
        run([sys.executable, "-m", "venv", str(venv)], capture_output=True)
        run([str(python), "-m", "pip", "install", "-q", "pyfuse3"], capture_output=True)
        sdist = CACHE / "sdist"
        run([str(python), "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", "pyfuse3", "-d",
             str(sdist)], capture_output=True)
        archive = next(sdist.glob("pyfuse3-*.tar.gz"))
        with tempfile.TemporaryDirectory() as tmp:
            run(["tar", "-xzf", str(archive), "-C", tmp, "--wildcards", "*/examples/passthroughfs.py"])
            shutil.copy(next(Path(tmp).glob("*/examples/passthroughfs.py")), example)
    except (subprocess.CalledProcessError, StopIteration) as exc:
        log(f"pyfuse3 unavailable: {exc}")
        return None
    return [str(python), str(example)]


# -- the systems under test


def fuse_mounted(path: Path) -> bool:
    want = str(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == want and fields[sep + 1].startswith("fuse"):
                return True
    return False


@dataclass
class System:
    name: str
    command: Callable[[Path, Path], list[str]] | None  # None: native, used in place
    note: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, lower: Path, mnt: Path) -> Path:
        if self.command is None:
            return lower
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen(self.command(lower, mnt), env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not fuse_mounted(mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.stop(mnt)
                raise RuntimeError(f"{self.name} did not mount: {err.strip()[-500:]}")
            time.sleep(0.02)
        return mnt

    def stop(self, mnt: Path) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if self.name.startswith("fsfilter"):
                proc.send_signal(signal.SIGTERM)  # it unmounts itself and exits 0
            else:
                subprocess.run(["umount", str(mnt)], capture_output=True)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if fuse_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def systems(wanted: list[str], install: bool) -> list[System]:
    fsfilter = [sys.executable, "-m", "fsfilter", "passthrough"]
    out: list[System] = []
    for name in wanted:
        if name == "native":
            out.append(System("native", None))
        elif name == "fsfilter":
            out.append(System("fsfilter", lambda lo, mnt: [*fsfilter, str(lo), str(mnt)], "kernel passthrough"))
        elif name == "fsfilter-daemon":
            out.append(System("fsfilter-daemon", lambda lo, mnt: [*fsfilter, "--no-kernel-passthrough", str(lo),
                                                                  str(mnt)], "reads and writes in the daemon"))
        elif name == "bindfs":
            apt_install(["bindfs"], install)
            if shutil.which("bindfs"):
                out.append(System("bindfs", lambda lo, mnt: ["bindfs", "-f", str(lo), str(mnt)]))
            else:
                log("bindfs unavailable: left out")
        elif name == "pyfuse3":
            apt_install(["libfuse3-dev", "pkg-config", "gcc"], install)
            example = pyfuse3_example(install)
            if example is not None:
                out.append(System("pyfuse3", lambda lo, mnt, ex=example: [*ex, str(lo), str(mnt)],  # type: ignore[misc]
                                  "pyfuse3 examples/passthroughfs.py"))
            else:
                log("pyfuse3 unavailable: left out")
        else:
            raise SystemExit(f"unknown system {name!r}")
    return out


# -- the workloads: each returns {metric: value}


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool


METRICS = [
    Metric("seq_write", "sequential write of a new file, 1 MiB blocks", "MiB/s", True),
    Metric("seq_overwrite", "sequential overwrite, 1 MiB blocks", "MiB/s", True),
    Metric("seq_read", "sequential read, 1 MiB blocks", "MiB/s", True),
    Metric("small_cycle", "small files: create+write 100 B, stat, unlink", "files/s", True),
    Metric("small_create", "  of which create+write+close", "files/s", True),
    Metric("small_stat", "  of which stat", "files/s", True),
    Metric("small_unlink", "  of which unlink", "files/s", True),
    Metric("tree_total", "tree: cp -a, ls -lR, rm -rf", "s", False),
    Metric("tree_copy", "  of which cp -a", "s", False),
    Metric("tree_list", "  of which ls -lR", "s", False),
    Metric("tree_remove", "  of which rm -rf", "s", False),
    Metric("rand_read", "random 4 KiB reads (fio, O_DIRECT)", "IOPS", True),
]


def timed(cmd: list[str], **kw: object) -> float:
    start = time.perf_counter()
    run(cmd, **kw)
    return time.perf_counter() - start


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def seq(root: Path, lower: Path, sizes: Sizes) -> dict[str, float]:
    # Every system starts from the same memory state: a file of the same size written natively and
    # removed just before, so the blocks its write allocates are ones the hypervisor already backs.
    warm = lower / "warm.bin"
    run(["dd", "if=/dev/zero", f"of={warm}", "bs=1M", f"count={sizes.seq_mib}", "status=none"])
    warm.unlink()
    big = root / "seq.bin"
    w = timed(["dd", "if=/dev/zero", f"of={big}", "bs=1M", f"count={sizes.seq_mib}", "conv=fsync",
               "status=none"])
    # The same again over the blocks now allocated: on these VMs a new file's time is mostly the
    # hypervisor backing fresh memory (it varies several-fold from run to run), this one is the copy.
    o = timed(["dd", "if=/dev/zero", f"of={big}", "bs=1M", f"count={sizes.seq_mib}", "conv=fsync,notrunc",
               "status=none"])
    drop_caches()
    r = timed(["dd", f"if={big}", "of=/dev/null", "bs=1M", "status=none"])
    if big.stat().st_size != sizes.seq_mib * MIB:
        raise RuntimeError(f"{big}: wrong size after the write")
    big.unlink()
    return {"seq_write": sizes.seq_mib / w, "seq_overwrite": sizes.seq_mib / o, "seq_read": sizes.seq_mib / r}


def small(root: Path, sizes: Sizes, binary: Path) -> dict[str, float]:
    d = root / "small"
    d.mkdir()
    out = run([str(binary), str(d), str(sizes.small_files)], capture_output=True).stdout
    create, stat_, unlink = (float(x) for x in out.split())
    d.rmdir()
    n = sizes.small_files
    return {"small_cycle": n / (create + stat_ + unlink), "small_create": n / create, "small_stat": n / stat_,
            "small_unlink": n / unlink}


def tree(root: Path, sizes: Sizes) -> dict[str, float]:
    dest = root / "tree"
    copy = timed(["cp", "-a", sizes.tree_source, str(dest)])
    listing = timed(["ls", "-lR", str(dest)], stdout=subprocess.DEVNULL)
    remove = timed(["rm", "-rf", str(dest)])
    return {"tree_total": copy + listing + remove, "tree_copy": copy, "tree_list": listing, "tree_remove": remove}


def rand(root: Path, sizes: Sizes) -> dict[str, float]:
    out = run(["fio", "--name=randread", f"--filename={root / 'rand.bin'}", "--rw=randread", "--bs=4k",
               f"--size={sizes.rand_mib}M", f"--runtime={sizes.rand_seconds}", "--time_based", "--ioengine=psync",
               "--direct=1", "--numjobs=1", "--output-format=json"], capture_output=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio failed: error {job['error']}")
    return {"rand_read": float(job["read"]["iops"])}


# -- running and reporting


@contextlib.contextmanager
def workspace() -> Iterator[tuple[Path, Path, Path]]:
    """A tmpfs of our own holding the lower directory, and an empty mount point outside it."""
    top = Path(tempfile.mkdtemp(prefix="fsfilter-bench-"))
    os.chmod(top, 0o755)
    fs, mnt = top / "tmpfs", top / "mnt"
    fs.mkdir()
    mnt.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=6g,mode=0755", "fsfilter-bench", str(fs)])
    try:
        lower = fs / "lower"
        lower.mkdir()
        yield top, lower, mnt
    finally:
        for path in (mnt, fs):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


def machine_line() -> str:
    halt = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    halt_text = f", guest_halt_poll_ns={halt.read_text().strip()}" if halt.exists() else ""
    load = os.getloadavg()[0]
    return f"kernel {os.uname().release}, {os.cpu_count()} CPUs, load {load:.2f} at start{halt_text}"


def report(results: dict[str, dict[str, list[float]]], names: list[str], rounds: int) -> str:
    width = 16
    head = f"{'workload':48} {'unit':8}" + "".join(f"{n:>{width}} {'ratio':>7}" for n in names)
    lines = [head, "-" * len(head)]
    for m in METRICS:
        native = results.get("native", {}).get(m.key)
        base = statistics.median(native) if native else None
        row = f"{m.label:48} {m.unit:8}"
        for n in names:
            vals = results[n].get(m.key)
            if not vals:
                row += f"{'-':>{width}} {'':>7}"
                continue
            med = statistics.median(vals)
            shown = f"{med:.3f}" if m.unit == "s" else f"{med:,.0f}"
            ratio = "" if base is None else f"{med / base:.3f}" + ("×" if m.higher_is_better else "×t")
            row += f"{shown:>{width}} {ratio:>7}"
        lines.append(row)
    lines.append(f"medians of {rounds} interleaved rounds; ratio = median / native median in this run "
                 "(×: throughput ratio, higher is better; ×t: time ratio, lower is better)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--systems", default="native,fsfilter,fsfilter-daemon,bindfs,pyfuse3",
                        help="comma-separated, from: native, fsfilter, fsfilter-daemon, bindfs, pyfuse3")
    parser.add_argument("--workloads", default="seq,small,tree,rand", help="comma-separated: seq, small, tree, rand")
    parser.add_argument("--quick", action="store_true", help="small sizes, for checking that the script works")
    parser.add_argument("--no-install", action="store_true", help="do not install missing tools")
    parser.add_argument("--json", type=Path, help="also write every round's figures to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("passthrough_bench: run as root (it mounts file systems and drops the page cache)", file=sys.stderr)
        return 1
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    sizes = QUICK if args.quick else Sizes()
    workloads = args.workloads.split(",")
    unknown = set(workloads) - {"seq", "small", "tree", "rand"}
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    install = not args.no_install
    apt_install(["fio", "gcc", "libc6-dev"], install)
    if "rand" in workloads and not shutil.which("fio"):
        log("fio unavailable: random reads left out")
        workloads.remove("rand")
    binary = build_smallfiles() if "small" in workloads else None
    chosen = systems(args.systems.split(","), install)
    names = [s.name for s in chosen]
    results: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    machine = machine_line()
    log(machine)
    with workspace() as (_top, lower, mnt):
        if "rand" in workloads:  # one file every system reads, laid down natively once
            run(["dd", "if=/dev/urandom", f"of={lower / 'rand.bin'}", "bs=1M", f"count={sizes.rand_mib}",
                 "status=none"])
        for r in range(args.rounds):
            order = chosen[r % len(chosen):] + chosen[:r % len(chosen)]
            for system in order:
                root = system.start(lower, mnt)
                try:
                    figures: dict[str, float] = {}
                    if "seq" in workloads:
                        figures |= seq(root, lower, sizes)
                    if "small" in workloads:
                        assert binary is not None
                        figures |= small(root, sizes, binary)
                    if "tree" in workloads:
                        figures |= tree(root, sizes)
                    if "rand" in workloads:
                        figures |= rand(root, sizes)
                finally:
                    system.stop(mnt)
                for key, value in figures.items():
                    results[system.name].setdefault(key, []).append(value)
                log(f"round {r + 1}/{args.rounds} {system.name}: "
                    + ", ".join(f"{k}={v:,.3f}" for k, v in figures.items()))
    print(machine)
    print(report(results, names, args.rounds))
    for s in chosen:
        if s.note:
            print(f"  {s.name}: {s.note}")
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes.__dict__, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
