"""CBFilter's deny-only access rules on real file systems, through fanotify permission events (no mount).

With ``config("AccessViaFanotify=true")``, rules whose only flags are ``ACCESS_DENY_ALL``,
``ACCESS_READ_ONLY`` and ``ACCESS_EXECUTE_PROTECT`` are enforced by a fanotify permission group
(``FAN_CLASS_CONTENT``) with file-system marks for ``FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM``, instead of by a
FUSE mount. For each open the kernel waits for an answer:

- the path is the event fd's ``/proc/self/fd`` link; the requesting thread is the record's pid
  (``FAN_REPORT_TID``); the rules decide as they do in the FUSE filter (per-process masks included);
- ``ACCESS_READ_ONLY`` needs the open's access mode, which fanotify does not report: it is read from the
  blocked thread's ``/proc/<tid>/syscall`` (``open``, ``openat``, ``creat``; ``openat2`` through
  ``/proc/<tid>/mem``). An open whose mode cannot be read there (io_uring, kernel threads) is refused under a
  read-only rule: the rule then errs on the safe side;
- allowed opens are cached with ignore marks: a file with one name, in a directory where no rule can match
  any name, gets an ignore mark (``FAN_MARK_IGNORE_SURV``), so its further opens reach no Python. A rename
  or a new link could give a cached file a name a rule covers: a notification group watches renames and
  attribute changes (a new link changes the link count), and every ignore mark is dropped when one happens
  (and when the rules change);
- every request is answered, also when deciding fails (then it is allowed and ``on_error`` is told);
- the filtering process's own opens are allowed at once. The reader thread itself opens nothing.

When the filtering process dies, the kernel answers pending and later requests itself (allow) within
milliseconds: callers are never left blocked.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import threading
from collections.abc import Callable

from fsfilter.abi import fanotify as fa
from fsfilter.abi import linux
from fsfilter.api import constants as c
from fsfilter.engine.rules import RuleSet, match_path
from fsfilter.sessions.fanotify_session import NotifyGroup, close_fds, local_mounts
from fsfilter.system import fanotify as fan
from fsfilter.system import libc
from fsfilter.wire import fanotify as wire

log = logging.getLogger("fsfilter.access")

FANOTIFY_ACCESS = c.ACCESS_DENY_ALL | c.ACCESS_READ_ONLY | c.ACCESS_EXECUTE_PROTECT
_PERM = fa.FAN_OPEN_PERM | fa.FAN_OPEN_EXEC_PERM
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_CREAT
_SYSCALLS = linux.syscall_numbers()
# syscall number -> index of the flags argument in /proc/<tid>/syscall (after the number)
_FLAGS_ARG = {n: i for name, i in (("open", 1), ("openat", 2), ("open_by_handle_at", 2))
              if (n := _SYSCALLS.get(name)) is not None}
_CREAT = _SYSCALLS.get("creat")
_OPENAT2 = _SYSCALLS.get("openat2")
# An execve opens the program (and its loader or interpreter) for reading: FAN_OPEN_PERM comes from inside it.
_EXECS = {n for name in ("execve", "execveat") if (n := _SYSCALLS.get(name)) is not None}


class FanotifyAccess:
    """Answers open permission events for the access rules of ``rules``."""

    def __init__(self, rules: RuleSet, passthrough: RuleSet, own_requests: Callable[[], bool],
                 on_error: Callable[[int, str], None]) -> None:
        self.rules = rules
        self.passthrough = passthrough
        self.own_requests = own_requests
        self._report = on_error
        # Unlimited queue: when a bounded queue is full the kernel drops permission events and lets the open
        # through unasked.
        self.group = fan.init(fa.FAN_CLASS_CONTENT | fa.FAN_CLOEXEC | fa.FAN_NONBLOCK | fa.FAN_REPORT_TID
                              | fa.FAN_UNLIMITED_QUEUE, os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC)
        self.renames = NotifyGroup(unlimited_queue=False, buffer_size=1 << 14)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.marked: list[str] = []
        self.ignored = 0  # directories given an ignore mark since the last flush
        self.answered = 0
        self.denied = 0
        self._own = os.getpid()
        self._generation = -1
        self._cache_lock = threading.Lock()
        self._epoch = 0  # bumped by every flush: a decision made before one must not be cached after it

    # -- marks

    def mark(self, paths: list[str]) -> None:
        """Permission marks on the file systems ``paths`` lie on (one mark per file system)."""
        points = [point for _, point, _ in local_mounts(include_pseudo=True)]
        done: set[tuple[int, int]] = set()
        for path in paths:
            point = _mount_of(path, points)
            fd = os.open(point, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fsid = fan.fsid_of(fd)
            finally:
                os.close(fd)
            if fsid in done:
                continue
            done.add(fsid)
            fan.mark(self.group, fa.FAN_MARK_ADD | fa.FAN_MARK_FILESYSTEM, _PERM, point)
            # Whatever could move a cached file under a rule: renames, and new links (which change the
            # file's link count: FAN_ATTRIB).
            self.renames.mark_filesystem(point, fa.FAN_RENAME | fa.FAN_ATTRIB | fa.FAN_ONDIR)
            self.marked.append(point)

    def on_error(self, code: int, description: str) -> None:
        """Report, never raise: the answering thread must go on answering whatever a handler does."""
        try:
            self._report(code, description)
        except Exception:
            log.exception("on_error raised")

    def forget_cache(self) -> None:
        """Drop every ignore mark (the rules changed, or something moved)."""
        with self._cache_lock:
            self._epoch += 1
            try:
                fan.mark(self.group, fa.FAN_MARK_FLUSH, 0, "/")
            except OSError as exc:
                self.on_error(exc.errno or errno.EIO, f"dropping the permission cache failed: {exc}")
            self.ignored = 0

    # -- threads

    def start(self) -> None:
        self._generation = self.rules.generation + self.passthrough.generation
        for target, name in ((self._answer_loop, "fsfilter-permissions"), (self._rename_loop, "fsfilter-renames")):
            t = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        self.renames.wake()
        for t in self._threads:
            t.join(5)
        lingering = any(t.is_alive() for t in self._threads)
        # Closing the group answers whatever is still pending (allow) and removes the marks. A thread still
        # running would write into whatever file reused the number: then the number is pointed at /dev/null.
        for fd in (self.group, self._wake_r, self._wake_w):
            try:
                if lingering:
                    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                    os.dup2(null, fd)
                    os.close(null)
                else:
                    os.close(fd)
            except OSError:
                pass
        self.renames.close()

    def _rename_loop(self) -> None:
        while not self._stopping:
            events = self.renames.read(1000)
            if events is None:
                return
            if events:
                self.forget_cache()
            close_fds(events)

    def _answer_loop(self) -> None:
        poller = select.poll()
        poller.register(self.group, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        buffer = bytearray(1 << 16)
        while not self._stopping:
            try:
                size = os.readv(self.group, (buffer,))
            except BlockingIOError:
                poller.poll(1000)
                continue
            except OSError as exc:
                if self._stopping:
                    return
                self.on_error(exc.errno or errno.EIO, f"reading permission events failed: {exc}")
                continue
            try:
                events = wire.decode(memoryview(buffer)[:size])
            except wire.RecordError as exc:  # cannot happen with a sane kernel; the fds are unknown then
                self.on_error(errno.EIO, f"a permission record could not be read: {exc}")
                continue
            generation = self.rules.generation + self.passthrough.generation
            if generation != self._generation:
                self._generation = generation
                self.forget_cache()
            for ev in events:
                if ev.fd < 0:
                    continue
                allow = True
                try:
                    allow = self._decide(ev.mask, ev.fd, ev.pid)
                except Exception as exc:  # answer anyway: a caller must never wait for an answer that never comes
                    self.on_error(errno.EIO, f"deciding a permission request failed (allowed): {exc}")
                try:
                    os.write(self.group, wire.encode_response(ev.fd, fa.FAN_ALLOW if allow else fa.FAN_DENY))
                except OSError as exc:
                    self.on_error(exc.errno or errno.EIO, f"answering a permission request failed: {exc}")
                finally:
                    os.close(ev.fd)
                self.answered += 1
                self.denied += not allow

    # -- the decision

    def _decide(self, mask: int, fd: int, tid: int) -> bool:
        if (tid == self._own or libc.is_thread_of(self._own, tid)) and not self.own_requests():
            return True
        generation = self._current_generation()
        epoch = self._epoch
        path = os.readlink(f"/proc/self/fd/{fd}")
        m = match_path(self.rules, self.passthrough, path)
        access = m.upper.access & FANOTIFY_ACCESS
        if access and not m.unconditional:
            access = m.flags(_Thread(tid), None).access & FANOTIFY_ACCESS
        if not access:
            # Cache only if no rule could concern any name in the directory, and the rules did not change while
            # deciding (a flush may just have happened).
            if not self.rules.may_match_child(os.path.dirname(path)) and generation == self._current_generation():
                self._ignore(fd, epoch)
            return True
        if access & c.ACCESS_DENY_ALL:
            return False
        if mask & fa.FAN_OPEN_EXEC_PERM and access & c.ACCESS_EXECUTE_PROTECT:
            return False
        if access & c.ACCESS_READ_ONLY and mask & fa.FAN_OPEN_PERM:
            flags = open_flags(tid)
            return flags is not None and not flags & _WRITE_FLAGS
        return True

    def _current_generation(self) -> int:
        return self.rules.generation + self.passthrough.generation

    def _ignore(self, fd: int, epoch: int) -> None:
        """An ignore mark on the file itself: its opens stay in the kernel from now on. Only for a file with one
        name (a second name could be one a rule covers); a new link, a rename or any attribute change on the
        file system drops every mark (the watcher group)."""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                return
            with self._cache_lock:
                if epoch != self._epoch:
                    return  # flushed while deciding: the decision may be stale
                fan.mark_fd(self.group, fa.FAN_MARK_ADD | fa.FAN_MARK_IGNORE_SURV, _PERM, fd)
                self.ignored += 1
        except OSError as exc:
            log.debug("no ignore mark: %s", exc)


class _Thread:
    """The requesting thread as per-process masks see it."""

    __slots__ = ("tid", "_name", "_exe")

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self._name: str | None = None
        self._exe: str | None = None

    @property
    def pid(self) -> int:
        try:
            with open(f"/proc/{self.tid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Tgid:"):
                        return int(line[5:])
        except (OSError, ValueError):
            pass
        return self.tid

    @property
    def name(self) -> str:
        if self._name is None:
            try:
                with open(f"/proc/{self.tid}/comm", "rb") as f:
                    self._name = f.read().rstrip(b"\n").decode(errors="replace")
            except OSError:
                self._name = ""
        return self._name

    @property
    def exe(self) -> str:
        if self._exe is None:
            try:
                self._exe = os.readlink(f"/proc/{self.tid}/exe")
            except OSError:
                self._exe = ""
        return self._exe


def open_flags(tid: int) -> int | None:
    """The open(2) flags of the open thread ``tid`` is blocked in, from /proc/<tid>/syscall; None when it is not
    in a known open call (or the flags cannot be read)."""
    try:
        with open(f"/proc/{tid}/syscall", "rb") as f:
            fields = f.read().split()
    except OSError:
        return None
    if len(fields) < 4 or not fields[0].lstrip(b"-").isdigit():
        return None
    number = int(fields[0])
    args = [int(x, 16) for x in fields[1:7]]
    if number in _EXECS:
        return os.O_RDONLY
    if number in _FLAGS_ARG:
        return args[_FLAGS_ARG[number]] & 0xFFFFFFFF
    if number == _CREAT:
        return os.O_CREAT | os.O_WRONLY | os.O_TRUNC
    if number == _OPENAT2:
        try:
            fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            try:
                raw = os.pread(fd, 8, args[2])
            finally:
                os.close(fd)
        except OSError:
            return None
        return int.from_bytes(raw, "little") if len(raw) == 8 else None
    return None


def _mount_of(path: str, points: list[str]) -> str:
    real = path
    while not os.path.exists(real) and real != "/":
        real = os.path.dirname(real)
    real = os.path.realpath(real)
    best = "/"
    for point in points:
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best = point
    return best
