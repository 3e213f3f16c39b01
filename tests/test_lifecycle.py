"""Lifecycle: the daemon killed mid-write (its watchdog rescues the mount), stopped by signals, stopped through the
API, unmounted from outside; and the command line's exits. Each test checks that the directory is usable at once
afterwards, that no caller is left hanging, and that nothing (mount, daemon, watchdog, helper) is left behind."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import SRC, Daemon, end_processes, force_unmount, mounts, needs_root, pids_whose_argv, wait_for

from fsfilter import CBFSFilterError, PassthroughFilter
from fsfilter._abi import fuse as abi
from fsfilter._wire.fuse import Request

pytestmark = [needs_root]
Factory = Callable[..., PassthroughFilter]
DaemonFactory = Callable[..., Daemon]
ENV = {**os.environ, "PYTHONPATH": str(SRC)}
# What a caller of a file system whose daemon is gone may see; never a hang.
GONE = {errno.ENOTCONN, errno.EIO, errno.ENOENT, errno.ECONNABORTED}
USABLE_WITHIN = 1.0  # seconds from SIGKILL until the directory is usable again (the bound)


# -- helpers


def fuse_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether an fsfilter mount sits at ``path`` (already resolved): reads mountinfo only, never the path."""
    p = os.fspath(path)
    return any(point == p and kind == "fuse.fsfilter" for point, kind in mounts())


def watchdogs(under: str | os.PathLike[str]) -> list[int]:
    """Pids of fsfilter watchdogs guarding a mount at or below ``under`` (from /proc/*/cmdline)."""
    base = os.fsencode(os.fspath(under))
    # A watchdog, or the rescuer a watchdog became when its daemon died (service/rescue.py).
    return pids_whose_argv(lambda argv: any(a.endswith(b"watchdog.py") or b"service.rescue" in a for a in argv) and any(
        a == base or a.startswith(base + b"/") for a in argv))


def probe(path: Path) -> None:
    """List, create, stat and remove in ``path``: raises OSError (ENOTCONN, ...) while it is not usable."""
    os.listdir(path)
    name = path / f".probe-{os.getpid()}-{time.monotonic_ns()}"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"probe")
    finally:
        os.close(fd)
    assert os.stat(name).st_size == 5
    os.unlink(name)


def time_until_usable(path: Path, since: float, limit: float = 5.0) -> float:
    """Seconds from ``since`` until ``path`` is no longer an fsfilter mount and :func:`probe` succeeds."""
    last: BaseException | None = None
    while time.monotonic() - since < limit:
        if not fuse_mounted(path):
            try:
                probe(path)
                return time.monotonic() - since
            except OSError as exc:
                last = exc
        time.sleep(0.001)
    raise AssertionError(f"{path} still unusable {limit} s later: mounted={fuse_mounted(path)}, last error {last!r}")


def spawn(procs: list[subprocess.Popen[str]], code: str, *args: str | os.PathLike[str]) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-S", "-c", code, *map(str, args)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    procs.append(p)
    return p


def result_of(p: subprocess.Popen[str], timeout: float) -> dict[str, object]:
    """The JSON line a helper printed last, once it exits within ``timeout`` seconds."""
    out, err = p.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    assert lines, f"helper printed nothing (rc {p.returncode}): {err}"
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def errname(code: object) -> str:
    return errno.errorcode.get(code, str(code)) if isinstance(code, int) else str(code)


@pytest.fixture
def procs(scratch: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Helper processes a test starts: killed (by pid) if still running afterwards. Request this fixture
    before ``daemon_factory``/``filter_factory`` so it is torn down after them, when it also makes sure no
    watchdog of a mount in ``scratch`` outlives the test."""
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        end_processes(started)
        if not wait_for(lambda: not watchdogs(scratch), 3):
            for pid in watchdogs(scratch):  # started by a daemon this test started
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# -- SIGKILL in the middle of heavy writes

# A writer: writes numbered, checksummed records and appends each record's number (8 bytes) to its own
# acknowledgement log outside the mount only after the write() has returned in full. Modes: "append"
# (O_APPEND), "pwrite" (each block of 64 records written in a scrambled order at their own offsets) and
# "files" (one new file per record, created through a directory fd of the mount). It stops at the first
# error, when the stop file appears, or at its time limit; its last line says which.
WRITER = r"""
import errno, json, os, struct, sys, time, zlib
mode, target, acklog, stopfile = sys.argv[1:5]
wid, size, limit = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
ack = os.open(acklog, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
deadline = time.monotonic() + limit

def record(seq):
    body = struct.pack("<IQ", wid, seq) + os.urandom(size - 20)
    return b"REC!" + struct.pack("<I", zlib.crc32(body)) + body

def slot(seq):
    return seq - seq % 64 + (seq % 64) * 37 % 64

seq, op, result = 0, "open", None
try:
    if mode == "append":
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    elif mode == "pwrite":
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    else:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    while result is None:
        if seq % 16 == 0 and (os.path.exists(stopfile) or time.monotonic() > deadline):
            result = {"result": "stopped"}
            break
        rec = record(seq)
        op = "write"
        if mode == "append":
            n = os.write(fd, rec)
        elif mode == "pwrite":
            n = os.pwrite(fd, rec, slot(seq) * size)
        else:
            op = "create"
            f = os.open("r%d" % seq, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=fd)
            op = "write"
            try:
                n = os.write(f, rec)
                if n == size:
                    os.write(ack, struct.pack("<Q", seq))
                    seq += 1
            finally:
                op = "close"
                os.close(f)
            if n != size:
                result = {"result": "short write", "n": n}
            continue
        if n != size:
            result = {"result": "short write", "n": n}
            break
        os.write(ack, struct.pack("<Q", seq))
        seq += 1
except OSError as exc:
    result = {"result": "error", "op": op, "errno": exc.errno}
result["acked"] = seq
print(json.dumps(result), flush=True)
"""

WRITERS = [("append", 1024), ("append", 65536), ("pwrite", 4096), ("files", 512)]


def acked(log: Path) -> list[int]:
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        return []
    return [seq for (seq,) in struct.iter_unpack("<Q", data[:len(data) // 8 * 8])]


def check_record(rec: bytes, wid: int, seq: int, where: str) -> None:
    assert len(rec) >= 20 and rec[:4] == b"REC!", f"{where}: record {seq} missing (got {rec[:24]!r})"
    assert struct.unpack("<I", rec[4:8])[0] == zlib.crc32(rec[8:]), f"{where}: record {seq} corrupt"
    assert struct.unpack("<IQ", rec[8:20]) == (wid, seq), f"{where}: record {seq} is {struct.unpack('<IQ', rec[8:20])}"


def check_writer_output(lower: Path, wid: int, mode: str, size: int, seqs: list[int]) -> None:
    """Every acknowledged record is in the lower directory, intact, where its writer put it."""
    assert seqs == list(range(len(seqs))), f"writer {wid}: acknowledgement log out of order"
    n = len(seqs)
    if mode == "files":
        for seq in seqs:
            path = lower / f"w{wid}" / f"r{seq}"
            data = path.read_bytes() if path.exists() else b""
            check_record(data, wid, seq, str(path))
            assert len(data) == size
        return
    path = lower / f"w{wid}"
    with open(path, "rb") as f:
        data = f.read()
    if mode == "append":
        # Only the one write in flight at the kill may have landed (whole or, in theory, in part) beyond them.
        assert n * size <= len(data) <= (n + 1) * size, f"{path}: {len(data)} bytes for {n} acknowledged records"
        for seq in range(n):
            check_record(data[seq * size:(seq + 1) * size], wid, seq, str(path))
    else:
        for seq in range(n):
            off = (seq - seq % 64 + (seq % 64) * 37 % 64) * size
            check_record(data[off:off + size], wid, seq, str(path))


@pytest.mark.timeout(45)
@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "daemon-io"])
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "mount-point"])
def test_sigkill_during_heavy_writes(scratch: Path, procs: list[subprocess.Popen[str]],
                                     daemon_factory: DaemonFactory, in_place: bool, passthrough: bool) -> None:
    lower, logs = scratch / "lower", scratch / "logs"
    lower.mkdir()
    logs.mkdir()
    mnt = None if in_place else scratch / "mnt"
    if mnt is not None:
        mnt.mkdir()
    daemon = daemon_factory(lower, mnt, *([] if passthrough else ["--no-kernel-passthrough"]))
    target = daemon.target
    # The mount shows before the daemon's watchdog has been exec'd (started right after mounting).
    assert wait_for(lambda: len(watchdogs(target)) == 1, 5), watchdogs(target)
    stop = logs / "stop"
    writers = []
    for wid, (mode, size) in enumerate(WRITERS):
        if mode == "files":
            (target / f"w{wid}").mkdir()
        p = spawn(procs, WRITER, mode, target / f"w{wid}", logs / f"ack{wid}", stop, str(wid), str(size), "20")
        writers.append(p)

    # Mid-stream: every writer has had records acknowledged and is still writing.
    assert wait_for(lambda: all(len(acked(logs / f"ack{w}")) >= 100 for w in range(len(WRITERS))), 15), \
        [len(acked(logs / f"ack{w}")) for w in range(len(WRITERS))]
    time.sleep(0.2)
    assert [p.poll() for p in writers] == [None] * len(writers), "a writer ended before the kill"
    before = [len(acked(logs / f"ack{w}")) for w in range(len(WRITERS))]

    killed_at = time.monotonic()
    os.kill(daemon.proc.pid, signal.SIGKILL)
    # (a) the directory is usable again at once: no mount, no ENOTCONN.
    usable_after = time_until_usable(target, killed_at)
    print(f"\nusable {usable_after * 1000:.1f} ms after SIGKILL ({'in place' if in_place else 'mount point'}, "
          f"{'passthrough' if passthrough else 'daemon I/O'}); acknowledged before: {before}")
    assert usable_after < USABLE_WITHIN
    assert daemon.proc.wait(5) == -signal.SIGKILL

    # (b) the writers go on: the watchdog rescued the mount (from the journal of its tables) and serves what is
    # inside it until they leave, kernel passthrough or not. Only one that walks a path into a mount point (not in
    # place) to create files finds, as after a stop, the empty directory there once the mount is detached.
    walks_in = [w for w, (mode, _) in enumerate(WRITERS) if mode == "files" and not in_place]
    going = [w for w in range(len(WRITERS)) if w not in walks_in]
    assert wait_for(lambda: all(len(acked(logs / f"ack{w}")) > before[w] + 20 for w in going), 5), \
        f"writers stalled after the kill: {[(w, before[w], len(acked(logs / f'ack{w}'))) for w in going]}"
    stop.touch()
    results = [result_of(p, 5) for p in writers]
    print("writers:", [(r["result"], r.get("op"), errname(r.get("errno")), r["acked"]) for r in results])
    for w, (mode, _) in enumerate(WRITERS):
        r = results[w]
        if w in walks_in:
            assert r["result"] == "stopped" or (r["result"] == "error" and r["errno"] in GONE), \
                f"writer {w} ({mode}): {r}"
        else:
            assert r["result"] == "stopped", f"writer {w} ({mode}): {r}"

    # (c) every acknowledged record is in the lower directory, intact.
    for w, (mode, size) in enumerate(WRITERS):
        seqs = acked(logs / f"ack{w}")
        assert len(seqs) == results[w]["acked"] and len(seqs) >= before[w]
        check_writer_output(lower, w, mode, size, seqs)

    # (d) the watchdog (the rescuer it became) is gone once the writers left; nothing is mounted in scratch.
    assert wait_for(lambda: not watchdogs(target), 5), f"watchdog still running: {watchdogs(target)}"
    assert not [point for point, _ in mounts() if point.startswith(str(scratch) + "/")]
    probe(target)


# -- signals to the command-line daemon

# Holds the mount busy (its cwd, a directory fd and an open file in it), says "ready", and after a line on
# stdin tries what needs the daemon and what may not; prints what each attempt gave.
HOLDER = r"""
import json, os, sys
target = sys.argv[1]
os.chdir(target)
dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
fd = os.open("held", os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"held open")
print("ready", flush=True)
sys.stdin.readline()
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as exc:
        out[name] = exc.errno
attempt("readdir", lambda: os.listdir(dfd))
attempt("create", lambda: os.close(os.open("new", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd)))
attempt("mkdir", lambda: os.mkdir("newdir", dir_fd=dfd))
attempt("pread", lambda: os.pread(fd, 100, 0))
attempt("close", lambda: os.close(fd))
print(json.dumps(out), flush=True)
"""


def wait_for_line(stream: object, want: str, timeout: float) -> str:
    """Read lines from a helper's pipe until one contains ``want`` (a reader thread keeps this bounded)."""
    got: list[str] = []

    def read() -> None:
        for line in stream:  # type: ignore[attr-defined]
            got.append(line if isinstance(line, str) else line.decode(errors="replace"))
            if want in got[-1]:
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    assert got and want in got[-1], f"no {want!r} within {timeout} s: {got}"
    return got[-1]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("sig", "in_place", "busy"), [
    (signal.SIGTERM, False, False), (signal.SIGINT, True, False), (signal.SIGHUP, False, False),
    (signal.SIGTERM, True, True), (signal.SIGINT, False, True),
], ids=["term", "int-in-place", "hup", "term-busy-in-place", "int-busy"])
def test_signal_stops_the_cli_daemon(scratch: Path, procs: list[subprocess.Popen[str]],
                                     daemon_factory: DaemonFactory, sig: signal.Signals, in_place: bool,
                                     busy: bool) -> None:
    lower = scratch / "lower"
    lower.mkdir()
    mnt = None if in_place else scratch / "mnt"
    if mnt is not None:
        mnt.mkdir()
    daemon = daemon_factory(lower, mnt)
    target = daemon.target
    wait_for_line(daemon.proc.stderr, "Ctrl-C to stop", 10)  # its signal handlers are in place
    (target / "before").write_bytes(b"written before the signal")
    holder = None
    if busy:
        holder = spawn(procs, HOLDER, target)
        assert holder.stdout is not None
        assert holder.stdout.readline() == "ready\n"

    sent = time.monotonic()
    daemon.proc.send_signal(sig)
    rc = daemon.proc.wait(5)
    took = time.monotonic() - sent
    err = daemon.proc.stderr.read().decode() if daemon.proc.stderr else ""
    assert rc == 0, err
    assert took < 3.0
    assert "fsfilter: unmounted" in err and "Traceback" not in err, err
    assert not fuse_mounted(target)
    assert wait_for(lambda: not watchdogs(target), 2)
    probe(target)
    assert (lower / "before").read_bytes() == b"written before the signal"

    if holder is not None:
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        r = result_of(holder, 5)  # no hang: the connection was aborted when the daemon let go of it
        print("\nholder after the stop:", {op: errname(v) for op, v in r.items()})
        for op in ("readdir", "create", "mkdir"):
            assert r[op] in GONE, f"{op} on the detached mount gave {errname(r[op])}, not an error: {r}"
        # The open file was served by kernel passthrough: reading it may still work; it must not hang.
        assert r["pread"] == "ok" or r["pread"] in GONE, r
        assert (lower / "held").read_bytes() == b"held open"
        assert not (lower / "new").exists() and not (lower / "newdir").exists()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["term", "int"])
def test_signal_as_soon_as_the_mount_appears(scratch: Path, procs: list[subprocess.Popen[str]],
                                             sig: signal.Signals) -> None:
    """A signal that comes while the daemon is still starting (mounted, not yet serving) also ends in a
    clean stop and exit 0, not in death by SIGTERM or a KeyboardInterrupt (exit 130)."""
    lower = scratch / "lower"
    lower.mkdir()
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-m", "fsfilter", "passthrough", str(lower)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        try:
            deadline = time.monotonic() + 20
            while not fuse_mounted(lower) and p.poll() is None and time.monotonic() < deadline:
                pass  # poll without sleeping, to signal as early as possible
            p.send_signal(sig)
            _, err = p.communicate(timeout=10)
        finally:
            force_unmount(lower)
        assert p.returncode == 0, err
        assert "fsfilter: unmounted" in err, err
        assert wait_for(lambda: not watchdogs(lower), 2)
        probe(lower)


@pytest.mark.timeout(30)
def test_cli_daemon_exits_when_unmounted_from_outside(scratch: Path, procs: list[subprocess.Popen[str]],
                                                      daemon_factory: DaemonFactory) -> None:
    lower, mnt = scratch / "lower", scratch / "mnt"
    lower.mkdir()
    mnt.mkdir()
    daemon = daemon_factory(lower, mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=True)
    assert daemon.proc.wait(5) == 0
    assert wait_for(lambda: not watchdogs(mnt), 2)
    probe(mnt)


# -- PassthroughFilter.stop() and friends


READER = r"""
import json, os, sys
target, n = sys.argv[1], int(sys.argv[2])
reads, op = 0, "open"
try:
    while True:
        for i in range(n):
            op = "open"
            fd = os.open(os.path.join(target, "f%d" % i), os.O_RDONLY)
            try:
                op = "read"
                while os.read(fd, 65536):
                    pass
            finally:
                os.close(fd)
            reads += 1
            if reads == 20:
                print("reading", flush=True)
except OSError as exc:
    print(json.dumps({"op": op, "errno": exc.errno, "reads": reads}), flush=True)
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "daemon-io"])
def test_stop_with_active_readers_and_open_files(lower_and_mount: tuple[Path, Path],
                                                 procs: list[subprocess.Popen[str]], filter_factory: Factory,
                                                 passthrough: bool) -> None:
    lower, mnt = lower_and_mount
    for i in range(8):
        (lower / f"f{i}").write_bytes(os.urandom(256 * 1024))
    filt = filter_factory(lower, mnt, passthrough=passthrough)
    readers = [spawn(procs, READER, mnt, "8") for _ in range(2)]
    for r in readers:
        assert r.stdout is not None
        assert r.stdout.readline() == "reading\n"
    (lower / "big").write_bytes(b"B" * (8 << 20))
    held = os.open(mnt / "big", os.O_RDONLY)  # files this process holds open through the stop
    held_dir = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.pread(held, 10, 0) == b"B" * 10
        started = time.monotonic()
        filt.stop()
        took = time.monotonic() - started
        assert took < 3.0, f"stop() took {took:.2f} s"
        assert not filt.active and filt.wait(0)
        assert not fuse_mounted(mnt)
        probe(mnt)
        for r in readers:  # each fails (ENOTCONN on the aborted connection, ENOENT in the bare directory)
            res = result_of(r, 5)
            assert res["errno"] in GONE, res
        with pytest.raises(OSError) as exc:
            os.listdir(held_dir)
        assert exc.value.errno in GONE
        if not passthrough:  # far from what was read (and read ahead) before: not in the page cache
            with pytest.raises(OSError) as exc:
                os.pread(held, 10, 6 << 20)
            assert exc.value.errno in GONE
        else:  # kernel passthrough reads the lower file itself
            assert os.pread(held, 10, 6 << 20) == b"B" * 10
    finally:
        os.close(held)
        os.close(held_dir)
    assert wait_for(lambda: not watchdogs(mnt), 2)
    filt.stop()  # a second stop is a no-op


@pytest.mark.timeout(30)
@pytest.mark.parametrize("stuck", ["read", "lookup"])
def test_stop_while_a_request_is_stuck_in_the_daemon(lower_and_mount: tuple[Path, Path], scratch: Path,
                                                     procs: list[subprocess.Popen[str]],
                                                     filter_factory: Factory, stuck: str) -> None:
    """A handler that never returns (a READ in the I/O pool, or a LOOKUP on the only reader thread) must
    not make stop() hang nor leave its caller blocked; and when it does return after stop() gave up on it,
    its late reply must go nowhere."""
    lower, mnt = lower_and_mount
    (lower / "slow").write_bytes(b"slow data")
    filt = filter_factory(lower, mnt, passthrough=False)
    entered, release = threading.Event(), threading.Event()

    def trace(req: Request) -> None:
        if (stuck == "read" and req.opcode == abi.Opcode.READ and filt.path_of(req.nodeid) == b"/slow") or (
                stuck == "lookup" and req.opcode == abi.Opcode.LOOKUP and bytes(req.body).startswith(b"slow\0")):
            entered.set()
            release.wait(20)

    filt.set_trace(trace)
    reader = spawn(procs, "import os, sys, json\ntry:\n    fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                          "    print(json.dumps({'data': os.read(fd, 100).decode()}))\n"
                          "except OSError as exc:\n    print(json.dumps({'errno': exc.errno}))\n", mnt / "slow")
    victims: list[int] = []
    try:
        assert entered.wait(10), "the read never reached the daemon"
        started = time.monotonic()
        filt.stop(timeout=1.0)
        took = time.monotonic() - started
        assert took < 4.0, f"stop() took {took:.2f} s with a stuck handler"
        assert not fuse_mounted(mnt)
        res = result_of(reader, 5)  # the blocked read ends with an error instead of waiting for the handler
        assert res.get("errno") in GONE, res
        probe(mnt)
        # The fd numbers the filter closed get reused (lowest first): the stuck handler's late reply must
        # not land in whatever file now has the number of its /dev/fuse fd.
        for i in range(64):
            victims.append(os.open(scratch / f"victim{i}", os.O_RDWR | os.O_CREAT, 0o644))
    finally:
        release.set()
    time.sleep(0.5)  # let the handler finish and (try to) reply
    try:
        written = {fd: os.fstat(fd).st_size for fd in victims if os.fstat(fd).st_size}
        assert not written, f"late FUSE replies were written into unrelated files (fd: bytes): {written}"
    finally:
        for fd in victims:
            os.close(fd)


@pytest.mark.timeout(30)
def test_context_manager_unmounts_on_exception(lower_and_mount: tuple[Path, Path],
                                               procs: list[subprocess.Popen[str]]) -> None:
    lower, mnt = lower_and_mount
    filt = PassthroughFilter(lower, mnt)
    try:
        with pytest.raises(RuntimeError, match="boom"), filt:
            assert fuse_mounted(mnt) and filt.active
            (mnt / "kept").write_bytes(b"kept")
            raise RuntimeError("boom")
        assert not fuse_mounted(mnt) and not filt.active
        assert (lower / "kept").read_bytes() == b"kept"
        assert wait_for(lambda: not watchdogs(mnt), 2)
        probe(mnt)
        filt.stop()  # stopping again, after the context manager did, is fine
        filt.stop()
    finally:
        with contextlib.suppress(Exception):
            filt.stop()


@pytest.mark.timeout(30)
def test_start_twice_stop_twice_and_restart(lower_and_mount: tuple[Path, Path], procs: list[subprocess.Popen[str]],
                                            filter_factory: Factory) -> None:
    lower, mnt = lower_and_mount
    filt = filter_factory(lower, mnt)
    with pytest.raises(CBFSFilterError) as exc:
        filt.start()
    assert exc.value.code == errno.EALREADY
    assert [p for p, kind in mounts() if p == str(mnt) and kind == "fuse.fsfilter"] == [str(mnt)]  # not twice
    assert len(watchdogs(mnt)) == 1
    (mnt / "a").write_bytes(b"a")
    filt.stop()
    filt.stop()
    assert not fuse_mounted(mnt)
    assert wait_for(lambda: not watchdogs(mnt), 2)
    filt.start()  # a stopped filter can start again
    assert fuse_mounted(mnt)
    assert (mnt / "a").read_bytes() == b"a"
    filt.stop()
    assert not fuse_mounted(mnt)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", ["lower-missing", "mount-missing", "lower-file", "mount-file", "lower-through-file",
                                  "lower-symlink-to-file", "mount-dangling-symlink"])
def test_start_on_a_bad_path_fails_cleanly(scratch: Path, procs: list[subprocess.Popen[str]], case: str) -> None:
    good, afile = scratch / "good", scratch / "afile"
    good.mkdir()
    afile.write_bytes(b"x")
    (scratch / "link-to-file").symlink_to(afile)
    (scratch / "dangling").symlink_to(scratch / "nowhere")
    lower, mountpoint, code = {
        "lower-missing": (scratch / "missing", good, errno.ENOENT),
        "mount-missing": (good, scratch / "missing", errno.ENOENT),
        "lower-file": (afile, good, errno.ENOTDIR),
        "mount-file": (good, afile, errno.ENOTDIR),
        "lower-through-file": (afile / "sub", good, errno.ENOTDIR),
        "lower-symlink-to-file": (scratch / "link-to-file", good, errno.ENOTDIR),
        "mount-dangling-symlink": (good, scratch / "dangling", errno.ENOENT),
    }[case]
    ours = lambda: [m for m in mounts() if m[0].startswith(str(scratch) + "/")]  # noqa: E731
    before = ours()
    filt = PassthroughFilter(lower, mountpoint)
    try:
        with pytest.raises(CBFSFilterError) as exc:
            filt.start()
        assert exc.value.code == code, exc.value
        assert str(exc.value.message) and "\n" not in exc.value.message
        assert not filt.active and filt.wait(0)
        assert ours() == before == []
        assert not watchdogs(scratch)
        filt.stop()  # nothing to stop: fine
    finally:
        with contextlib.suppress(Exception):
            filt.stop()


# -- unmounted from outside


@pytest.mark.timeout(30)
@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "daemon-io"])
def test_unmounted_from_outside(lower_and_mount: tuple[Path, Path], procs: list[subprocess.Popen[str]],
                                filter_factory: Factory, passthrough: bool) -> None:
    lower, mnt = lower_and_mount
    filt = filter_factory(lower, mnt, passthrough=passthrough)
    (mnt / "f").write_bytes(b"data")
    subprocess.run(["umount", "-l", str(mnt)], check=True)
    assert filt.wait(5), "the session did not notice the unmount"
    assert not filt.active
    started = time.monotonic()
    filt.stop()
    assert time.monotonic() - started < 2.0
    filt.stop()
    assert not fuse_mounted(mnt)
    assert wait_for(lambda: not watchdogs(mnt), 2)
    probe(mnt)
    assert (lower / "f").read_bytes() == b"data"


# -- the command line


def cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsfilter", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args", [["--help"], ["passthrough", "--help"], ["demo", "--help"]],
                         ids=["fsfilter", "passthrough", "demo"])
@pytest.mark.parametrize("how", ["module", "script"])
def test_cli_help(args: list[str], how: str) -> None:
    if how == "module":
        r = cli(*args)
    else:  # the console script the package installs
        script = Path(sys.executable).parent / "fsfilter"
        if not script.exists():
            pytest.skip("the fsfilter script is not installed next to this Python")
        r = subprocess.run([str(script), *args], capture_output=True, text=True, env=ENV, timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: fsfilter") and not r.stderr
    if args[0] == "passthrough":
        assert "LOWER" in r.stdout and "--no-kernel-passthrough" in r.stdout


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", ["lower-missing", "lower-file", "mount-missing", "mount-inside-lower"])
def test_cli_bad_paths_exit_1_with_one_line(scratch: Path, case: str) -> None:
    good = scratch / "good"
    good.mkdir()
    (scratch / "afile").write_bytes(b"x")
    args = {
        "lower-missing": [str(scratch / "missing")],
        "lower-file": [str(scratch / "afile"), str(scratch / "mnt")],
        "mount-missing": [str(good), str(scratch / "missing")],
        "mount-inside-lower": [str(scratch), str(good)],
    }[case]
    if case == "lower-file":
        (scratch / "mnt").mkdir()
    r = cli("passthrough", *args)
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsfilter: error: "), r.stderr
    assert "Traceback" not in r.stderr and not r.stdout
    if case in ("lower-missing", "mount-missing"):
        assert "No such file or directory" in lines[0] and "missing" in lines[0]
    assert not [m for m in mounts() if m[0].startswith(str(scratch)) and m[1].startswith("fuse")]
    assert not watchdogs(scratch)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args", [
    ["--workers", "0"], ["--workers", "many"], ["--workers", "65"], ["--pool", "-1"], ["--pool", "1000"],
    ["--spin", "-1"], ["--spin", "nan"], ["--entry-timeout", "soon"], ["--attr-timeout", "100000"],
    ["--no-such-option"],
], ids=lambda a: "=".join(a))
def test_cli_bad_option_value_exits_2(scratch: Path, args: list[str]) -> None:
    r = cli("passthrough", str(scratch), *args)
    assert r.returncode == 2, r
    assert "usage:" in r.stderr and "Traceback" not in r.stderr
    assert not [m for m in mounts() if m[0] == str(scratch) and m[1].startswith("fuse")]


@pytest.mark.timeout(30)
def test_cli_usage_errors_exit_2() -> None:
    for args in ([], ["passthrough"], ["nonsense"]):
        r = cli(*args)
        assert r.returncode == 2, (args, r)
        assert r.stderr.startswith("usage: fsfilter") and "Traceback" not in r.stderr
