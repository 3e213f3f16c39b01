#!/usr/bin/env python3
"""Count the daemon's work per filtered READ: request-body decodes, rule decisions and syscalls.

One CBFilter is started over a directory on a tmpfs of our own, with a rule that makes reads of ``*.dat``
filtered (FS_CE_BEFORE_READ | FS_CE_AFTER_READ and FS_NE_READ, an empty handler each) and
process_cached_io_requests = True, so that the filter opens the file with FOPEN_DIRECT_IO and every 4 KiB
read(2) of the application reaches the daemon as one READ. A child process (CBFilter does not filter its
own process) reads the file in 4 KiB reads, pass after pass.

Before start_filter, functions are wrapped at run time (every module attribute of the package and of os that
is the original function is replaced by a counting wrapper):

* decodes: fsfilter.wire.fuse.decode_request (the header), fixed, cstring, name_at, and where they exist
  fsfilter.wire.ops.decode_op and the Op constructors (each row of the operation table's ``decode``);
* rule decisions: fsfilter.engine.rules.match_path and the filter class's ``effective`` and ``match_node``
  (FilterFS of fsfilter.api.filter_fs before the refactor, FilterLayer of fsfilter.layers.filter after),
  plus, for information, ``reaches``, ``route``, ``match_name`` and the events fired (``fire``, ``notify``);
* syscalls: os.pread, preadv, pwrite, pwritev, fstat, stat, lstat, open, close, readlink, read, readv,
  write, writev, lseek, and the tgkill of fsfilter.system.libc.is_thread_of (the own-thread check).

The modules are looked up under both layouts (fsfilter.wire, ... and the private fsfilter._wire, ... that
came later), and a method is wrapped on the class of the filter's MRO that defines it.

Each count is attributed to the opcode of the request the thread is serving (Session._handle on the reader,
Session._run wherever the request is served), and divided by the number of READ requests the session
served in the same phase (SessionStats.requests). The readv calls of a reader between requests (the one
that fetches a request and its busy-poll EAGAINs) belong to no request and are given apart. A second phase,
with --strace, reads the same again with ``strace -c -f -p <this process>`` attached (all threads: the
readers, the pool, the event threads) and gives every syscall of the daemon per READ; strace slows every
syscall, so the readers' busy-poll count there is not that of an untraced run.

    # one checkout (its src/ goes first on sys.path), as root:
    sudo /work/bench-after/.venv/bin/python bench/read_work.py --checkout /work/bench-after --strace
    # both, side by side (each in a process of its own, with its checkout's .venv python):
    sudo python3 bench/read_work.py --before /work/bench-before --after /work/bench-after --strace
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

READ_OPCODE = 15  # FUSE_READ
PAGE = 4096

CHILD = r"""
import os, sys
path, passes = sys.argv[1], int(sys.argv[2])
sys.stdin.readline()  # go
calls = 0
fd = os.open(path, os.O_RDONLY)
for _ in range(passes):
    offset = 0
    while True:
        n = len(os.pread(fd, 4096, offset))
        calls += 1
        if n == 0:
            break
        offset += n
os.close(fd)
print(calls, flush=True)
"""

SYSCALLS = ["pread", "preadv", "pwrite", "pwritev", "fstat", "stat", "lstat", "open", "close", "readlink", "read",
            "readv", "write", "writev", "lseek"]


# -- counting


class Tally:
    """Counts of named calls, keyed by the opcode of the request the calling thread is serving (None: none)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[int | None, str]] = Counter()
        self.local = threading.local()
        self.lock = threading.Lock()

    def hit(self, name: str) -> None:
        key = (getattr(self.local, "opcode", None), name)
        with self.lock:
            self.counts[key] += 1

    def snapshot(self) -> Counter[tuple[int | None, str]]:
        with self.lock:
            return Counter(self.counts)

    @contextlib.contextmanager
    def serving(self, opcode: int) -> Iterator[None]:
        previous = getattr(self.local, "opcode", None)
        self.local.opcode = opcode
        try:
            yield
        finally:
            self.local.opcode = previous


def replace_everywhere(owner: Any, attr: str, make: Callable[[Any], Any]) -> bool:
    """Replace ``owner.attr`` by ``make(original)``, and so every attribute of a loaded fsfilter module that is
    the same object (names imported with ``from ... import``). False when ``owner`` has no such attribute."""
    original = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
    if original is None:
        return False
    wrapper = make(original)
    setattr(owner, attr, wrapper)
    if not isinstance(owner, type):
        for name, module in list(sys.modules.items()):
            if module is None or not (name == "fsfilter" or name.startswith("fsfilter.")):
                continue
            for key, value in list(vars(module).items()):
                if value is original:
                    setattr(module, key, wrapper)
    return True


def counting(tally: Tally, name: str) -> Callable[[Any], Any]:
    def make(original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tally.hit(name)
            return original(*args, **kwargs)
        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        return wrapper
    return make


def counting_readv(tally: Tally) -> Callable[[Any], Any]:
    """os.readv, with the EAGAINs of a non-blocking fd (a reader's busy-poll) counted apart."""
    def make(original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                result = original(*args, **kwargs)
            except BlockingIOError:
                tally.hit("os.readv (EAGAIN)")
                raise
            tally.hit("os.readv")
            return result
        return wrapper
    return make


def first_module(*names: str) -> Any:
    """The first of these modules that imports (the package's layout changed: fsfilter.wire before the
    machinery became private, fsfilter._wire after)."""
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def replace_method(cls: Any, attr: str, make: Callable[[Any], Any]) -> bool:
    """Wrap a method where ``cls`` finds it (the class itself or a base in its MRO)."""
    for klass in cls.__mro__:
        if attr in klass.__dict__:
            return replace_everywhere(klass, attr, make)
    return False


def instrument(tally: Tally) -> dict[str, list[str]]:
    """Wrap everything counted; returns what was found, by category."""
    rules = first_module("fsfilter._engine.rules", "fsfilter.engine.rules")
    fuse_session = first_module("fsfilter._sessions.fuse_session", "fsfilter.sessions.fuse_session")
    libc = first_module("fsfilter._system.libc", "fsfilter.system.libc")
    wire = first_module("fsfilter._wire.fuse", "fsfilter.wire.fuse")
    ops = first_module("fsfilter._wire.ops", "fsfilter.wire.ops")  # None before the refactor: no typed operations
    layer_module = first_module("fsfilter._layers.filter", "fsfilter.layers.filter")
    # The filter class: FilterLayer after the refactor, FilterFS (a LowerFS subclass) before it.
    filter_cls: Any = (layer_module.FilterLayer if layer_module is not None
                       else importlib.import_module("fsfilter.api.filter_fs").FilterFS)
    found: dict[str, list[str]] = {"decode": [], "rule": [], "event": [], "syscall": [], "filter_class": [
        f"{filter_cls.__module__}.{filter_cls.__name__}"]}
    for attr in ("decode_request", "fixed", "cstring", "name_at"):
        if replace_everywhere(wire, attr, counting(tally, f"wire.{attr}")):
            found["decode"].append(f"wire.{attr}")
    if ops is not None:
        if replace_everywhere(ops, "decode_op", counting(tally, "ops.decode_op")):
            found["decode"].append("ops.decode_op")
        # The Op constructors, as the operation table calls them (some no longer call Op.__init__).
        for spec in ops.OPS.values():
            object.__setattr__(spec, "decode", counting(tally, "ops.Op()")(spec.decode))  # a frozen dataclass
        found["decode"].append("ops.Op()")
    if replace_everywhere(rules, "match_path", counting(tally, "rules.match_path")):
        found["rule"].append("rules.match_path")
    for method in ("effective", "match_node", "reaches", "route", "match_name"):
        if replace_method(filter_cls, method, counting(tally, f"filter.{method}")):
            found["rule"].append(f"filter.{method}")
    for method in ("fire", "notify"):
        if replace_method(filter_cls, method, counting(tally, f"filter.{method}")):
            found["event"].append(f"filter.{method}")
    for name in SYSCALLS:
        make = counting_readv(tally) if name == "readv" else counting(tally, f"os.{name}")
        if replace_everywhere(os, name, make):
            found["syscall"].append(f"os.{name}")
    if replace_everywhere(libc, "is_thread_of", counting(tally, "tgkill (libc.is_thread_of)")):
        found["syscall"].append("tgkill (libc.is_thread_of)")

    # Which request a thread serves: the reader in _handle (decode, routing), any thread in _run (serving).
    session_cls = fuse_session.Session
    handle, run = session_cls._handle, session_cls._run

    def _handle(self: Any, fd: int, buf: bytes) -> None:
        with tally.serving(int.from_bytes(buf[4:8], "little") if len(buf) >= 8 else -1):
            handle(self, fd, buf)

    def _run(self: Any, op: Any, fd: int) -> None:
        with tally.serving(op.opcode):
            run(self, op, fd)

    session_cls._handle = _handle
    session_cls._run = _run
    return found


# -- strace


def strace_attach(pid: int, out: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["strace", "-c", "-f", "-q", "-o", str(out), "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # attached when every thread of ours has a tracer
        tids = os.listdir(f"/proc/{pid}/task")
        traced = 0
        for tid in tids:
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
                if re.search(r"^TracerPid:\s+[1-9]", status, re.M):
                    traced += 1
        if traced == len(tids):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(10)
    raise RuntimeError(f"strace did not attach: {proc.stderr.read().decode() if proc.stderr else ''}")


def strace_detach(proc: subprocess.Popen[bytes], out: Path) -> dict[str, int]:
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    calls: dict[str, int] = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(fields) >= 5 and fields[-1] != "total" and re.fullmatch(r"[\d.]+", fields[0]):
            calls[fields[-1]] = int(fields[3])
    return calls


# -- one checkout


def read_stats(f: Any) -> list[Any]:
    """The SessionStats of each mount of the filter (an attachment's .stats, or its .session.stats)."""
    out: list[Any] = []
    for attachment in f._attached.values():
        stats = getattr(attachment, "stats", None)
        if stats is None or not hasattr(stats, "requests"):
            session = getattr(attachment, "session", None)
            stats = session.stats if session is not None else None
        if stats is not None and all(stats is not s for s in out):
            out.append(stats)
    return out


def served_reads(stats: list[Any]) -> int:
    return sum(s.requests[READ_OPCODE] for s in stats)


def child_reads(path: Path, passes: int) -> tuple[subprocess.Popen[str], Callable[[], int]]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(passes)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd="/")

    def go() -> int:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        out = proc.stdout.read()
        if proc.wait(300) != 0:
            raise RuntimeError(f"the reading child failed (exit {proc.returncode})")
        return int(out)
    return proc, go


def measure(checkout: Path, passes: int, pages: int, use_strace: bool) -> dict[str, Any]:
    sys.path.insert(0, str(checkout / "src"))
    import fsfilter
    from fsfilter import CBFilter
    from fsfilter.api import constants as c

    if not Path(fsfilter.__file__).resolve().is_relative_to(checkout.resolve()):
        raise SystemExit(f"fsfilter came from {fsfilter.__file__}, not from {checkout}")
    tally = Tally()
    found = instrument(tally)

    def ignore(params: object) -> None:
        """The empty handler."""

    top = Path(tempfile.mkdtemp(prefix="fsfilter-readwork-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "fsfilter-readwork", str(top)], check=True)
    result: dict[str, Any] = {"checkout": str(checkout), "found": found}
    try:
        d = top / "data"
        d.mkdir()
        target = d / "file.dat"
        target.write_bytes(os.urandom(pages * PAGE))
        f = CBFilter()
        f.add_attach_point(str(d))
        f.add_filter_rule(f"{d}/*.dat", c.ACCESS_NONE, c.FS_CE_BEFORE_READ | c.FS_CE_AFTER_READ, c.FS_NE_READ)
        f.on_before_read_file = ignore
        f.on_after_read_file = ignore
        f.on_notify_read_file = ignore
        f.process_cached_io_requests = True
        f.start_filter(0)
        try:
            stats = read_stats(f)
            if not stats:
                raise RuntimeError("no session stats found in the filter's attachments")
            # Phase 1: the wrapped counts.
            proc, go = child_reads(target, passes)
            try:
                before_counts, before_reads = tally.snapshot(), served_reads(stats)
                calls = go()
                after_counts, after_reads = tally.snapshot(), served_reads(stats)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            reads = after_reads - before_reads
            diff = after_counts - before_counts
            result["phase1"] = {
                "child_read_calls": calls, "served_reads": reads,
                "per_read": {name: n / reads for (op, name), n in sorted(diff.items(), key=lambda kv: kv[0][1])
                             if op == READ_OPCODE} if reads else {},
                "between_requests": {name: n / reads for (op, name), n in diff.items() if op is None} if reads else {},
                "requests": {str(i): n for i, n in enumerate(stats[0].requests) if n},
            }
            # Phase 2: every syscall of the process, with strace attached.
            if use_strace:
                if shutil.which("strace") is None:
                    raise SystemExit("strace is not installed (apt-get install -y strace)")
                trace = top.parent / f"{top.name}.strace"
                proc, go = child_reads(target, passes)
                try:
                    time.sleep(0.2)  # the child's start-up is not the daemon's work
                    tracer = strace_attach(os.getpid(), trace)
                    try:
                        r0 = served_reads(stats)
                        calls = go()
                        r1 = served_reads(stats)
                    finally:
                        syscalls = strace_detach(tracer, trace)
                        trace.unlink(missing_ok=True)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                reads = r1 - r0
                result["phase2"] = {"child_read_calls": calls, "served_reads": reads,
                                    "per_read": {k: v / reads for k, v in sorted(syscalls.items())} if reads else {},
                                    "total_per_read": sum(syscalls.values()) / reads if reads else 0.0}
            result["filter_stats"] = f.stats
        finally:
            f.stop_filter()
    finally:
        if subprocess.run(["umount", str(top)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(top)], capture_output=True)
        with contextlib.suppress(OSError):
            top.rmdir()
    return result


# -- both checkouts, and the table


# (section, rows, whether the section gets a total row)
ROWS: list[tuple[str, list[str], bool]] = [
    ("header decodes", ["wire.decode_request"], False),
    ("body decodes", ["wire.fixed", "wire.cstring", "wire.name_at", "ops.Op()"], True),
    ("  (the table lookup that calls the Op constructor)", ["ops.decode_op"], False),
    ("rule decisions", ["rules.match_path", "filter.effective", "filter.match_node"], True),
    ("  (other rule work: cached reach checks, the session router)", ["filter.reaches", "filter.route",
                                                                      "filter.match_name"], False),
    ("events fired (Before/After control events, notifications)", ["filter.fire", "filter.notify"], False),
    ("syscalls while serving the READ (wrapped functions)", [f"os.{n}" for n in SYSCALLS if n != "readv"]
     + ["os.readv", "os.readv (EAGAIN)", "tgkill (libc.is_thread_of)"], True),
]
SHOWN_MIN = 0.005  # rows below this in every column are left out (e.g. the /proc opens of the first READ)


def wrapped_names(found: dict[str, list[str]]) -> set[str]:
    names = {n for key, listed in found.items() if key != "filter_class" for n in listed}
    if "os.readv" in names:
        names.add("os.readv (EAGAIN)")
    return names


def table(results: dict[str, dict[str, Any]]) -> str:
    sides = list(results)
    lines: list[str] = []
    head = f"{'per READ request':46}" + "".join(f"{s:>12}" for s in sides)
    lines += [head, "-" * len(head)]
    for side_key, label in (("child_read_calls", "read(2) calls of the child"), ("served_reads", "READs served")):
        lines.append(f"{label:46}" + "".join(f"{results[s]['phase1'][side_key]:>12,}" for s in sides))
    wrapped = {s: wrapped_names(results[s]["found"]) for s in sides}
    for title, names, totalled in ROWS:
        lines.append(title)
        subtotal = {s: 0.0 for s in sides}
        for name in names:
            # None: the function does not exist in that checkout; 0: it does, and no READ called it.
            vals = [results[s]["phase1"]["per_read"].get(name, 0.0) if name in wrapped[s] else None for s in sides]
            for s, v in zip(sides, vals, strict=True):
                subtotal[s] += v or 0.0
            if title.startswith("syscalls") and all(v is None or v < SHOWN_MIN for v in vals):
                continue  # of the many syscalls wrapped, only those a READ makes
            lines.append(f"  {name:44}" + "".join(f"{'-' if v is None else f'{v:.2f}':>12}" for v in vals))
        if totalled:
            lines.append(f"  {'= total':44}" + "".join(f"{subtotal[s]:>12.2f}" for s in sides))
    lines.append("between requests (a reader's loop, per READ served: the readv that fetched a request, and the")
    lines.append("busy-poll's EAGAINs, which depend on timing; not part of any request)")
    for name in ("os.readv", "os.readv (EAGAIN)"):
        vals = [results[s]["phase1"]["between_requests"].get(name, 0.0) for s in sides]
        lines.append(f"  {name:44}" + "".join(f"{v:>12.2f}" for v in vals))
    if all("phase2" in results[s] for s in sides):
        lines.append("strace -c -f on the daemon process (all threads, every syscall), per READ served")
        lines.append(f"  {'READs served in this phase':44}"
                     + "".join(f"{results[s]['phase2']['served_reads']:>12,}" for s in sides))
        names = sorted({n for s in sides for n in results[s]["phase2"]["per_read"]},
                       key=lambda n: -max(results[s]["phase2"]["per_read"].get(n, 0.0) for s in sides))
        for name in names:
            traced: list[float] = [results[s]["phase2"]["per_read"].get(name, 0.0) for s in sides]
            if max(traced) < SHOWN_MIN:
                continue
            lines.append(f"  {name:44}" + "".join(f"{v:>12.2f}" for v in traced))
        lines.append(f"  {'= total':44}" + "".join(f"{results[s]['phase2']['total_per_read']:>12.2f}"
                                                   for s in sides))
    lines.append("Counts are per READ the session served, of calls made on the thread serving it (reader: decode,")
    lines.append("routing; pool thread: the layers and the reply). '-': no such function in that checkout;")
    lines.append(f"syscall rows below {SHOWN_MIN} per READ in both columns are left out (first READ's /proc opens).")
    for s in sides:
        lines.append(f"{s}: {results[s]['checkout']}, filter class {results[s]['found']['filter_class'][0]}")
    return "\n".join(lines)


def run_side(checkout: Path, args: argparse.Namespace) -> dict[str, Any]:
    python = checkout / ".venv" / "bin" / "python"
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [str(python if python.exists() else sys.executable), str(Path(__file__).resolve()), "--checkout",
               str(checkout), "--passes", str(args.passes), "--pages", str(args.pages), "--json", out.name]
        if args.strace:
            cmd.append("--strace")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # its own one-column table: not wanted here
        data: dict[str, Any] = json.loads(Path(out.name).read_text())
        return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkout", type=Path, help="measure this checkout in this process")
    parser.add_argument("--before", type=Path, help="with --after: measure both, each in a process of its own")
    parser.add_argument("--after", type=Path)
    parser.add_argument("--passes", type=int, default=200, help="times the child reads the file (default 200)")
    parser.add_argument("--pages", type=int, default=16, help="the file's size in 4 KiB pages (default 16)")
    parser.add_argument("--strace", action="store_true", help="also count every syscall with strace -c -f")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: it mounts a tmpfs and a FUSE file system")
    if args.checkout:
        result = measure(args.checkout, args.passes, args.pages, args.strace)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        print(table({args.checkout.name: result}))
        return 0
    if not (args.before and args.after):
        parser.error("give --checkout DIR, or --before DIR and --after DIR")
    results = {"before": run_side(args.before, args), "after": run_side(args.after, args)}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
