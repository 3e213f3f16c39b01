"""Locks served by the daemon (``PassthroughFilter(locks=True)``): the lock table against a byte-by-byte model,
then fcntl, OFD and flock locks from real processes on a mount — conflicts, waits granted by an unlock, a
close or the holder's death, waits interrupted by signals, deadlock detection, and nothing left behind."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import end_processes, needs_root, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from fsfilter import PassthroughFilter
from fsfilter._abi import fuse as abi
from fsfilter._sessions.locks import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX, LockTable

Factory = Callable[..., PassthroughFilter]

# -- the table alone


def test_an_owner_never_conflicts_with_itself_and_ranges_split_and_merge() -> None:
    t = LockTable()
    assert t.set(1, owner=10, start=0, end=99, kind=F_WRLCK, pid=1, fh=5) == 0
    assert t.set(1, owner=10, start=10, end=19, kind=F_RDLCK, pid=1, fh=5) == 0  # a downgrade inside
    assert [(x.start, x.end, x.exclusive) for x in t.held(1)] == [(0, 9, True), (10, 19, False), (20, 99, True)]
    assert t.set(1, owner=11, start=12, end=15, kind=F_RDLCK, pid=2, fh=6) == 0  # readers share
    assert t.set(1, owner=11, start=12, end=25, kind=F_RDLCK, pid=2, fh=6) == errno.EAGAIN
    assert t.set(1, owner=10, start=10, end=19, kind=F_WRLCK, pid=1, fh=5) == errno.EAGAIN  # 11 reads there
    assert t.set(1, owner=10, start=0, end=99, kind=F_UNLCK, pid=0, fh=5) == 0
    assert [(x.owner, x.start, x.end) for x in t.held(1)] == [(11, 12, 15)]
    assert t.set(1, owner=11, start=16, end=OFFSET_MAX, kind=F_RDLCK, pid=2, fh=6) == 0  # adjacent: merged
    assert [(x.start, x.end) for x in t.held(1)] == [(12, OFFSET_MAX)]
    assert t.set(1, owner=10, start=5, end=4, kind=F_WRLCK, pid=1, fh=5) == errno.EINVAL


def test_flock_and_posix_locks_are_separate_name_spaces() -> None:
    t = LockTable()
    assert t.set(1, 10, 0, OFFSET_MAX, F_WRLCK, 1, 5) == 0
    assert t.set(1, 20, 0, OFFSET_MAX, F_WRLCK, 2, 6, flock=True) == 0
    assert t.set(1, 21, 0, OFFSET_MAX, F_RDLCK, 2, 7, flock=True) == errno.EAGAIN
    assert t.release_fh(1, 6)  # the flock went with its open file; the POSIX lock of fh 5 stays
    assert t.set(1, 21, 0, OFFSET_MAX, F_RDLCK, 2, 7, flock=True) == 0
    assert t.test(1, 11, 0, 0, False) is not None


def test_waits_are_granted_in_order_and_can_be_cancelled() -> None:
    t = LockTable()
    got: list[str] = []
    assert t.set(1, 10, 0, 9, F_WRLCK, 1, 5) == 0
    assert t.set(1, 11, 0, 9, F_RDLCK, 2, 6, key=100, granted=lambda _: got.append("r1")) is None
    assert t.set(1, 12, 0, 9, F_RDLCK, 3, 7, key=101, granted=lambda _: got.append("r2")) is None
    assert t.set(1, 13, 5, 5, F_WRLCK, 4, 8, key=102, granted=lambda _: got.append("w")) is None
    assert t.cancel(101) and not t.cancel(101)
    assert t.waiting() == 2
    assert t.release_owner(1, 10)
    assert got == ["r1"]  # the writer still waits for the reader
    assert t.set(1, 11, 0, 9, F_UNLCK, 0, 6) == 0
    assert got == ["r1", "w"] and t.waiting() == 0
    assert not t.release_owner(1, 10)


def test_a_wait_that_would_close_a_cycle_is_a_deadlock() -> None:
    t = LockTable()
    assert t.set(1, 10, 0, 0, F_WRLCK, 1, 5) == 0
    assert t.set(1, 20, 1, 1, F_WRLCK, 2, 6) == 0
    assert t.set(2, 30, 0, 0, F_WRLCK, 3, 7) == 0
    assert t.set(1, 10, 1, 1, F_WRLCK, 1, 5, key=1, granted=lambda _: None) is None  # 10 waits for 20
    assert t.set(2, 20, 0, 0, F_WRLCK, 2, 6, key=2, granted=lambda _: None) is None  # 20 waits for 30
    assert t.set(1, 30, 0, 0, F_WRLCK, 3, 7, key=3, granted=lambda _: None) == errno.EDEADLK  # 30 -> 10
    assert t.set(1, 40, 0, 0, F_WRLCK, 4, 8, key=4, granted=lambda _: None) is None  # no cycle: waits
    # flock waits are never deadlocks (the kernel does not look for them either)
    assert t.set(3, 10, 0, OFFSET_MAX, F_WRLCK, 1, 5, flock=True) == 0
    assert t.set(3, 20, 0, OFFSET_MAX, F_WRLCK, 2, 6, flock=True, key=5, granted=lambda _: None) is None


SIZE = 12  # the model covers bytes 0..SIZE-1 one by one, and cell SIZE stands for every byte from SIZE on

range_st = st.tuples(st.integers(0, SIZE - 1), st.integers(0, SIZE)).map(
    lambda p: (p[0], OFFSET_MAX if p[1] == SIZE else max(p[0], p[1])))
op_st = st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from([F_RDLCK, F_WRLCK, F_UNLCK]), range_st)


def cells(start: int, end: int) -> range:
    return range(min(start, SIZE), (SIZE if end == OFFSET_MAX else end) + 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, max_size=25))
def test_the_table_matches_a_byte_by_byte_model(ops: list[tuple[int, int, tuple[int, int]]]) -> None:
    t = LockTable()
    model: list[dict[int, bool]] = [{} for _ in range(SIZE + 1)]  # cell -> owner -> exclusive
    for owner, kind, (start, end) in ops:
        want_x = kind == F_WRLCK
        conflict = kind != F_UNLCK and any(o != owner and (want_x or x) for b in cells(start, end)
                                          for o, x in model[b].items())
        found = t.test(1, owner, start, end, want_x) if kind != F_UNLCK else None
        assert (found is not None) == conflict
        if found is not None:
            assert found.owner != owner and found.start <= end and start <= found.end
        result = t.set(1, owner, start, end, kind, owner, owner)
        assert result == (errno.EAGAIN if conflict else 0)
        if not conflict:
            for b in cells(start, end):
                if kind == F_UNLCK:
                    model[b].pop(owner, None)
                else:
                    model[b][owner] = want_x
        # the table's ranges are exactly the model's maximal runs per owner and kind
        held = t.held(1)
        for x in held:
            assert all(model[b].get(x.owner) == x.exclusive for b in cells(x.start, x.end))
        for o in (1, 2, 3):
            mine = sorted((x.start, x.end, x.exclusive) for x in held if x.owner == o)
            for (_, e1, x1), (s2, _, x2) in zip(mine, mine[1:], strict=False):
                assert e1 < s2 and (x1 != x2 or e1 + 1 < s2), mine  # disjoint, and same kinds not adjacent
            covered = {b for s, e, _ in mine for b in cells(s, e)}
            assert covered == {b for b in range(SIZE + 1) if o in model[b]}


# -- real processes on a mount

# A helper process taking commands on stdin, one per line, answering one line each.
LOCKER = r"""
import errno, fcntl, os, signal, struct, sys, threading
F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38
FMT = "hhqqi4x"
fds = {}
def flock_struct(kind, start, length):
    return struct.pack(FMT, {"r": fcntl.F_RDLCK, "w": fcntl.F_WRLCK, "u": fcntl.F_UNLCK}[kind], 0, start, length, 0)
class Interrupted(Exception):
    pass
def on_alarm(signum, frame):
    raise Interrupted()
signal.signal(signal.SIGALRM, on_alarm)
signal.signal(signal.SIGUSR1, lambda s, f: None)  # a handler that returns: the wait is restarted
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    cmd, *a = line.split()
    try:
        if cmd == "open":
            fds[a[0]] = os.open(a[1], os.O_RDWR)
            out = "ok"
        elif cmd == "close":
            os.close(fds.pop(a[0]))
            out = "ok"
        elif cmd in ("setlk", "setlkw", "ofd", "ofdw"):
            op = {"setlk": fcntl.F_SETLK, "setlkw": fcntl.F_SETLKW, "ofd": F_OFD_SETLK, "ofdw": F_OFD_SETLKW}[cmd]
            if len(a) > 4:
                signal.setitimer(signal.ITIMER_REAL, float(a[4]))
            fcntl.fcntl(fds[a[0]], op, flock_struct(a[1], int(a[2]), int(a[3])))
            signal.setitimer(signal.ITIMER_REAL, 0)
            out = "ok"
        elif cmd == "thread-setlk":  # from another thread of the same process: the same owner
            box = []
            t = threading.Thread(target=lambda: box.append(fcntl.fcntl(fds[a[0]], fcntl.F_SETLK,
                                                                       flock_struct(a[1], int(a[2]), int(a[3])))))
            t.start(); t.join()
            out = "ok" if box else "failed"
        elif cmd in ("getlk", "ofdget"):
            op = fcntl.F_GETLK if cmd == "getlk" else F_OFD_GETLK
            answer = fcntl.fcntl(fds[a[0]], op, flock_struct(a[1], int(a[2]), int(a[3])))
            kind, _, start, length, pid = struct.unpack(FMT, answer)
            out = f"{ {fcntl.F_RDLCK: 'r', fcntl.F_WRLCK: 'w', fcntl.F_UNLCK: 'u'}[kind]} {start} {length} {pid}"
        elif cmd == "flock":
            fcntl.flock(fds[a[0]], {"sh": fcntl.LOCK_SH, "ex": fcntl.LOCK_EX, "un": fcntl.LOCK_UN}[a[1]]
                        | (fcntl.LOCK_NB if a[2:] == ["nb"] else 0))
            out = "ok"
        else:
            out = "unknown command"
    except Interrupted:
        out = "interrupted"
    except OSError as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        out = "error " + errno.errorcode.get(e.errno, str(e.errno))
    print(out, flush=True)
"""


class Locker:
    """A process that takes locks on command (see LOCKER)."""

    def __init__(self, procs: list[subprocess.Popen[bytes]]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", LOCKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        procs.append(self.proc)
        first = self.line(10).split()
        assert first[0] == "ready", first
        self.pid = int(first[1])

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")

    def line(self, timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        out = b""
        deadline = time.monotonic() + timeout
        while not out.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"no answer from the locker in {timeout} s (so far {out!r})")
            chunk = os.read(self.proc.stdout.fileno(), 1)
            if not chunk:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise EOFError(f"the locker exited: {err}")
            out += chunk
        return out.decode().strip()

    def do(self, command: str, timeout: float = 10.0) -> str:
        self.send(command)
        return self.line(timeout)

    def pending(self, wait: float = 0.3) -> bool:
        """True when the last command has not answered within ``wait`` seconds (it is blocked)."""
        assert self.proc.stdout is not None
        return not select.select([self.proc.stdout], [], [], wait)[0]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        end_processes(started)


@pytest.fixture(params=["passthrough", "daemon-io"])
def locking(request: pytest.FixtureRequest, lower_and_mount: tuple[Path, Path], filter_factory: Factory
            ) -> tuple[Path, PassthroughFilter]:
    lower, mnt = lower_and_mount
    filt = filter_factory(lower, mnt, locks=True, passthrough=request.param == "passthrough", workers=2)
    (mnt / "f").write_bytes(b"x" * 100)
    return mnt / "f", filt


def served(filt: PassthroughFilter, opcode: int) -> int:
    assert filt.stats is not None
    return filt.stats.requests[opcode]


@needs_root
@pytest.mark.timeout(60)
def test_fcntl_locks_conflict_and_getlk_names_the_holder(locking: tuple[Path, PassthroughFilter],
                                                         procs: list[subprocess.Popen[bytes]]) -> None:
    path, filt = locking
    a, b = Locker(procs), Locker(procs)
    for p in (a, b):
        assert p.do(f"open 1 {path}") == "ok"
    assert a.do("setlk 1 w 10 20") == "ok"
    assert b.do("setlk 1 r 0 11") in ("error EAGAIN", "error EACCES")
    assert b.do("setlk 1 r 0 10") == "ok"  # bytes 0-9 are free
    assert b.do("getlk 1 w 15 1") == f"w 10 20 {a.pid}"
    assert a.do("getlk 1 w 0 0") == f"r 0 10 {b.pid}"
    assert a.do("thread-setlk 1 w 12 2") == "ok"  # threads share their process's locks
    assert served(filt, abi.Opcode.SETLK) >= 4 and served(filt, abi.Opcode.GETLK) == 2
    # closing any descriptor of the file drops the process's locks on it
    assert a.do(f"open 2 {path}") == "ok"
    assert a.do("close 2") == "ok"
    assert b.do("setlk 1 w 10 20") == "ok"
    assert a.do("getlk 1 r 0 0") == f"w 10 20 {b.pid}"  # a reader is only kept out of b's write lock


@needs_root
@pytest.mark.timeout(60)
def test_a_waiting_lock_is_granted_by_an_unlock_a_close_or_the_holders_death(
        locking: tuple[Path, PassthroughFilter], procs: list[subprocess.Popen[bytes]]) -> None:
    path, filt = locking
    a, b, c = Locker(procs), Locker(procs), Locker(procs)
    for p in (a, b, c):
        assert p.do(f"open 1 {path}") == "ok"
    assert a.do("setlk 1 w 0 0") == "ok"
    b.send("setlkw 1 w 0 1")
    assert b.pending()
    assert a.do("setlk 1 u 0 0") == "ok"  # unlock
    assert b.line() == "ok"
    c.send("setlkw 1 r 0 0")
    assert c.pending()
    assert b.do("close 1") == "ok"  # close
    assert c.line() == "ok"
    a.send("setlkw 1 w 50 10")
    assert a.pending()
    c.proc.kill()  # death: its files are closed, which drops its locks
    assert a.line() == "ok"
    assert filt.fs is not None and filt.fs.locks.waiting() == 0


@needs_root
@pytest.mark.timeout(60)
def test_a_wait_interrupted_by_a_signal_is_taken_back(locking: tuple[Path, PassthroughFilter],
                                                      procs: list[subprocess.Popen[bytes]]) -> None:
    path, filt = locking
    a, b, c = Locker(procs), Locker(procs), Locker(procs)
    for p in (a, b, c):
        assert p.do(f"open 1 {path}") == "ok"
    assert a.do("setlk 1 w 0 0") == "ok"
    assert b.do("setlkw 1 w 0 0 0.3") == "interrupted"  # SIGALRM's handler raises: EINTR reaches the caller
    assert filt.fs is not None
    assert wait_for(lambda: filt.fs is not None and filt.fs.locks.waiting() == 0, 5)
    # a handler that returns: the kernel restarts the wait, which is granted later
    c.send("setlkw 1 r 0 1")
    assert c.pending()
    os.kill(c.pid, signal.SIGUSR1)
    assert c.pending()
    assert a.do("setlk 1 u 0 0") == "ok"
    assert c.line() == "ok"
    # the interrupted b holds nothing and waits for nothing: a can lock what c does not hold
    assert a.do("setlk 1 w 1 10") == "ok"
    assert filt.fs.locks.waiting() == 0
    # and a SETLK of the same range fails at once rather than waiting
    assert b.do("setlk 1 w 0 0") in ("error EAGAIN", "error EACCES")


@needs_root
@pytest.mark.timeout(60)
def test_a_wait_that_would_deadlock_fails_with_edeadlk(locking: tuple[Path, PassthroughFilter],
                                                       procs: list[subprocess.Popen[bytes]]) -> None:
    path, _ = locking
    a, b = Locker(procs), Locker(procs)
    for p in (a, b):
        assert p.do(f"open 1 {path}") == "ok"
    assert a.do("setlk 1 w 0 1") == "ok"
    assert b.do("setlk 1 w 1 1") == "ok"
    a.send("setlkw 1 w 1 1")
    assert a.pending()
    assert b.do("setlkw 1 w 0 1") in ("error EDEADLK", "error EDEADLOCK")  # one errno, two names
    assert b.do("setlk 1 u 1 1") == "ok"
    assert a.line() == "ok"


@needs_root
@pytest.mark.timeout(60)
def test_ofd_and_flock_locks_belong_to_the_open_file(locking: tuple[Path, PassthroughFilter],
                                                     procs: list[subprocess.Popen[bytes]]) -> None:
    path, filt = locking
    a, b = Locker(procs), Locker(procs)
    assert a.do(f"open 1 {path}") == "ok" and a.do(f"open 2 {path}") == "ok"
    assert b.do(f"open 1 {path}") == "ok"
    # OFD locks: two open files of one process conflict with each other
    assert a.do("ofd 1 w 0 10") == "ok"
    assert a.do("ofd 2 w 5 1") == "error EAGAIN"
    assert a.do("ofdget 2 w 0 0") == "w 0 10 -1"  # an OFD query shows no pid, as natively
    b.send("ofdw 1 r 0 1")
    assert b.pending()
    assert a.do("close 1") == "ok"  # the last close of an open file drops its OFD locks (at RELEASE)
    assert b.line() == "ok"
    # flock: one lock per open file, independent of fcntl locks
    assert a.do("flock 2 ex nb") == "ok"
    assert b.do(f"open 2 {path}") == "ok"
    assert b.do("flock 2 sh nb") == "error EAGAIN"
    assert b.do("setlk 2 w 20 5") == "ok"  # fcntl locks do not see flocks
    b.send("flock 2 ex")
    assert b.pending()
    assert a.do("flock 2 sh") == "ok"  # a downgrade lets nobody in yet: b wants it exclusively
    assert b.pending(0.2)
    assert a.do("close 2") == "ok"
    assert b.line() == "ok"
    assert served(filt, abi.Opcode.SETLKW) >= 2
    assert filt.fs is not None and filt.fs.locks.waiting() == 0


@needs_root
@pytest.mark.timeout(60)
def test_without_the_option_locks_stay_in_the_kernel(lower_and_mount: tuple[Path, Path], filter_factory: Factory,
                                                     procs: list[subprocess.Popen[bytes]]) -> None:
    lower, mnt = lower_and_mount
    filt = filter_factory(lower, mnt)
    (mnt / "f").write_bytes(b"x")
    a, b = Locker(procs), Locker(procs)
    for p in (a, b):
        assert p.do(f"open 1 {mnt / 'f'}") == "ok"
    assert a.do("setlk 1 w 0 0") == "ok"
    assert b.do("setlk 1 w 0 0") in ("error EAGAIN", "error EACCES")
    assert served(filt, abi.Opcode.SETLK) == 0 and served(filt, abi.Opcode.FLUSH) == 0


@needs_root
@pytest.mark.timeout(60)
def test_many_waiters_on_one_lock_take_turns(locking: tuple[Path, PassthroughFilter]) -> None:
    path, filt = locking
    # threads in this process only make lock calls (no file data is touched), each on its own open file (OFD)
    order: list[int] = []
    errors: list[BaseException] = []
    fds = [os.open(path, os.O_RDWR) for _ in range(8)]
    try:
        fcntl.fcntl(fds[0], 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))

        def worker(i: int) -> None:
            try:
                fcntl.fcntl(fds[i], 38, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
                order.append(i)
                time.sleep(0.01)
                fcntl.fcntl(fds[i], 37, struct.pack("hhqqi4x", fcntl.F_UNLCK, 0, 0, 0, 0))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(1, 8)]
        for t in threads:
            t.start()
        assert wait_for(lambda: filt.fs is not None and filt.fs.locks.waiting() == 7, 10)
        fcntl.fcntl(fds[0], 37, struct.pack("hhqqi4x", fcntl.F_UNLCK, 0, 0, 0, 0))
        for t in threads:
            t.join(20)
        assert not errors and sorted(order) == list(range(1, 8))
    finally:
        for fd in fds:
            os.close(fd)
    assert filt.fs is not None and filt.fs.locks.count() == 0


@needs_root
@pytest.mark.timeout(60)
def test_a_killed_waiter_is_taken_back_and_holds_nothing(locking: tuple[Path, PassthroughFilter],
                                                         procs: list[subprocess.Popen[bytes]]) -> None:
    path, filt = locking
    a, b, c = Locker(procs), Locker(procs), Locker(procs)
    for p in (a, b, c):
        assert p.do(f"open 1 {path}") == "ok"
    assert a.do("setlk 1 w 0 0") == "ok"
    b.send("setlkw 1 w 0 0")
    assert b.pending()
    b.proc.kill()
    b.proc.wait(10)
    assert filt.fs is not None
    assert wait_for(lambda: filt.fs is not None and filt.fs.locks.waiting() == 0, 5)
    assert a.do("setlk 1 u 0 0") == "ok"
    assert c.do("setlk 1 w 0 0") == "ok"  # nothing went to the dead waiter


def test_two_shared_flocks_both_upgrading_do_not_deadlock() -> None:
    t = LockTable()
    got: list[int] = []
    assert t.set(1, 10, 0, OFFSET_MAX, F_RDLCK, 1, 5, flock=True) == 0
    assert t.set(1, 20, 0, OFFSET_MAX, F_RDLCK, 2, 6, flock=True) == 0
    # 10 asks for it exclusively: its shared lock goes first (as Linux does), and it waits for 20's
    assert t.set(1, 10, 0, OFFSET_MAX, F_WRLCK, 1, 5, flock=True, key=1, granted=got.append) is None
    # 20 asks too: nothing of 10's is held any more, so 20 gets it; 10 waits for 20 to let go
    assert t.set(1, 20, 0, OFFSET_MAX, F_WRLCK, 2, 6, flock=True, key=2, granted=got.append) == 0
    assert t.release_fh(1, 6)
    assert got == [0] and [(x.owner, x.exclusive) for x in t.held(1, flock=True)] == [(10, True)]
