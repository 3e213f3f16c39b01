"""CBFilter's deny-only access rules on real file systems, through fanotify permission events (no mount).

With ``config("AccessViaFanotify=true")``, rules whose only flags are ``ACCESS_DENY_ALL``,
``ACCESS_READ_ONLY`` and ``ACCESS_EXECUTE_PROTECT`` are enforced by a fanotify permission group
(``FAN_CLASS_CONTENT``) with file-system marks for ``FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM``, instead of by a
FUSE mount. For each open the kernel waits for an answer:

- the path is the one our mount namespace gives the file (the event fd's ``/proc/self/fd`` link, or, when that
  names another inode here — a bind mount in the opener's own namespace — the path found again from the file
  handle through our mount of its file system); a file with several names is also decided by a name under a
  restricting rule, from an index (LinkIndex) of the multi-named files below the rules' fixed prefixes; the
  requesting thread is the record's pid
  (``FAN_REPORT_TID``); the rules decide as they do in the FUSE filter (per-process masks included);
- ``ACCESS_READ_ONLY`` needs the open's access mode, which fanotify does not report (the event fd is a new
  open by the group, with the group's flags). It is read from the blocked thread's ``/proc/<tid>/syscall``:
  the arguments there are the thread's saved registers, which no other thread can change while it waits
  (the wait is killable only, so ptrace cannot stop it there). That covers ``open``, ``openat``, ``creat``,
  ``open_by_handle_at`` and the program an ``execve`` opens. ``openat2``'s flags are in the caller's memory,
  which another thread may change after the kernel copied them: an ``openat2`` of a file under a read-only
  rule is refused, whatever flags it seems to carry (nothing in memory can prove the absence of ``O_TRUNC``,
  which truncates after this event). So is an open whose mode cannot be read (io_uring workers, kernel
  threads). A waiting thread is woken for a moment by every answer the group gives (one wait queue), and
  ``/proc/<tid>/syscall`` then says ``running``: it is read again until the thread sleeps (bounded);
- allowed opens are cached with ignore marks: a file with one name, in a directory where no rule can match
  any name, gets an ignore mark (``FAN_MARK_IGNORE_SURV``), so its further opens reach no Python. A rename
  or a new link could give a cached file a name a rule covers: a notification group watches renames and
  attribute changes (a new link changes the link count), and every ignore mark is dropped when one happens
  (and when the rules change);
- every request is answered, also when deciding fails (then it is allowed and ``on_error`` is told), and within
  a deadline (5 s): a decision still running then is answered by the opener's path alone (refused if a rule
  restricts it, allowed otherwise), with ``on_error`` (ETIMEDOUT);
- the filtering process's own opens are allowed at once. The reader thread itself opens nothing.

When the filtering process dies, the kernel answers pending and later requests itself (allow) within
milliseconds: callers are never left blocked.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable

from fsfilter._abi import fanotify as fa
from fsfilter._abi import linux
from fsfilter._engine.rules import RuleSet, match_path
from fsfilter._sessions.fanotify_session import (
    MountTable,
    NotifyGroup,
    PermissionGroup,
    close_fds,
    local_mounts,
    local_path,
    mount_point_of,
)
from fsfilter._system import fanotify as fan
from fsfilter._system import libc, procfs
from fsfilter._wire.fanotify import Event
from fsfilter.api import constants as c

__all__ = ["FANOTIFY_ACCESS", "FanotifyAccess", "LinkIndex", "open_flags"]

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
                 on_error: Callable[[int, str], None], deadline: float = 5.0) -> None:
        self.rules = rules
        self.passthrough = passthrough
        self.own_requests = own_requests
        self.perms = PermissionGroup(_PERM, self._decide_event, on_error, "fsfilter-permissions",
                                     deadline=deadline, late=self._late)
        self.renames = NotifyGroup(unlimited_queue=False, buffer_size=1 << 14)
        self._renames_thread: threading.Thread | None = None
        self.marked: list[str] = []
        self.ignored = 0  # files given an ignore mark since the last flush
        self._generation = -1
        self._cache_lock = threading.Lock()
        self._epoch = 0  # bumped by every flush: a decision made before one must not be cached after it
        self.mounts = MountTable()
        self.links = LinkIndex(self)

    @property
    def answered(self) -> int:
        return self.perms.answered

    @property
    def denied(self) -> int:
        return self.perms.denied

    def mark(self, paths: list[str]) -> None:
        """Permission marks on the file systems ``paths`` lie on (one mark per file system)."""
        points = [point for _, point, _ in local_mounts(include_pseudo=True)]
        self.marked = self.perms.mark_filesystems(mount_point_of(path, points) for path in paths)
        for point in self.marked:
            # Whatever could move a cached file under a rule: renames, and new links (which change the
            # file's link count: FAN_ATTRIB).
            self.renames.mark_filesystem(point, fa.FAN_RENAME | fa.FAN_ATTRIB | fa.FAN_ONDIR)

    def forget_cache(self) -> None:
        """Drop every ignore mark (the rules changed, or something moved)."""
        self.links.stale = True
        with self._cache_lock:
            self._epoch += 1
            try:
                fan.mark(self.perms.fd, fa.FAN_MARK_FLUSH, 0, "/")
            except OSError as exc:
                self.perms.on_error(exc.errno or errno.EIO, f"dropping the permission cache failed: {exc}")
            self.ignored = 0

    def start(self) -> None:
        self._generation = self._current_generation()
        self.perms.start()
        self._renames_thread = threading.Thread(target=self._rename_loop, name="fsfilter-renames", daemon=True)
        self._renames_thread.start()

    def stop(self) -> None:
        self.renames.wake()
        if self._renames_thread is not None:
            self._renames_thread.join(5)
        self.perms.stop()  # closing the group answers whatever is still pending (allow) and removes the marks
        self.renames.close()

    def _rename_loop(self) -> None:
        while True:
            events = self.renames.read(1000)
            if events is None:
                return
            if events:
                self.forget_cache()
            close_fds(events)

    # -- the decision

    def _decide_event(self, ev: Event) -> bool:
        generation = self._current_generation()
        if generation != self._generation:  # the rules changed: what was cached was decided under the old ones
            self._generation = generation
            self.forget_cache()
        return self._decide(ev.mask, ev.fd, ev.pid, generation)

    def _decide(self, mask: int, fd: int, tid: int, generation: int) -> bool:
        if libc.is_own_thread(tid) and not self.own_requests():
            return True
        epoch = self._epoch
        path = local_path(fd, self.mounts)
        access = self.access_of(path, tid)
        if not access:
            # Another name of the same file may be under a rule (a hard link made outside it).
            st = os.fstat(fd)
            if st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
                other = self.links.restricted_name(st)
                if other is not None:
                    access = self.access_of(other, tid)
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

    def access_of(self, path: str, tid: int) -> int:
        """The fanotify-enforced access flags the rules give ``path`` for a request from thread ``tid``."""
        m = match_path(self.rules, self.passthrough, path)
        access = m.upper.access & FANOTIFY_ACCESS
        if access and not m.unconditional:
            access = m.flags(procfs.ProcessInfo(tid), None).access & FANOTIFY_ACCESS
        return access

    def _late(self, ev: Event) -> bool:
        """The answer to a request whose decision missed the deadline: refused if a rule restricts the path it
        was opened by (fail closed for the rules' files), allowed otherwise (the rest of the file system must
        not stop because the filter is slow)."""
        return not self.access_of(local_path(ev.fd, self.mounts), ev.pid)

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
                fan.mark_fd(self.perms.fd, fa.FAN_MARK_ADD | fa.FAN_MARK_IGNORE_SURV, _PERM, fd)
                self.ignored += 1
        except OSError as exc:
            log.debug("no ignore mark: %s", exc)


# A new link changes the file's ctime, taken from a coarse clock that may lag ours by a tick: a file whose ctime
# is this close to (or after) the start of the last walk may have a link the walk did not see.
_CTIME_SLACK_NS = 50_000_000


class LinkIndex:
    """The files with several names (st_nlink > 1) that a restricting rule covers by one of them, by (st_dev,
    st_ino), found by walking the fixed-prefix directories of those rules.

    Rebuilt lazily, on the first decision about a multi-named file after it went stale: on a rename or
    attribute change on a watched file system (the watcher group), a rule change, or when the file's ctime is
    no older than the last walk (a link made since; this closes the race with the watcher). Rules without a
    fixed prefix (name-only masks) cannot be walked: a hard link under another name escapes those."""

    def __init__(self, owner: FanotifyAccess) -> None:
        self.owner = owner
        self.stale = True
        self.walks = 0
        self._inodes: dict[tuple[int, int], str] = {}
        self._walked_at = 0
        self._lock = threading.Lock()

    def restricted_name(self, st: os.stat_result) -> str | None:
        """A name of the file ``st`` describes that a restricting rule covers, if one is known."""
        with self._lock:
            if self.stale or st.st_ctime_ns >= self._walked_at - _CTIME_SLACK_NS:
                self._rebuild()
            return self._inodes.get((st.st_dev, st.st_ino))

    def _rebuild(self) -> None:
        self.stale = False
        self._walked_at = time.time_ns()
        self.walks += 1
        found: dict[tuple[int, int], str] = {}
        owner = self.owner
        tops = {r.compiled.prefix for r in owner.rules if r.access & FANOTIFY_ACCESS and r.compiled.prefix}
        pending = [t for t in tops if not any(t != o and t.startswith(o.rstrip("/") + "/") for o in tops)]
        while pending:
            directory = pending.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_nlink > 1 and match_path(owner.rules, owner.passthrough, entry.path).upper.access \
                        & FANOTIFY_ACCESS:
                    found[(st.st_dev, st.st_ino)] = entry.path
        self._inodes = found


# How long a thread woken in its permission wait may take to go back to sleep. All waiters of a group share one
# wait queue, so every answer wakes them all for a moment; /proc/<tid>/syscall then says "running".
_SYSCALL_PATIENCE = 0.5


def open_flags(tid: int) -> int | None:
    """The open(2) flags of the open thread ``tid`` is blocked in, from /proc/<tid>/syscall; None when they
    cannot be trusted: not a known open call, ``openat2`` (its flags are in memory other threads can change),
    an io_uring worker (its registers are a copy of its creator's), or unreadable."""
    fields = procfs.syscall(tid, settle=_SYSCALL_PATIENCE)
    if fields is None or len(fields) < 9:
        return None
    try:
        number = int(fields[0])
        args = [int(x, 16) for x in fields[1:9]]
    except ValueError:
        return None
    if args[6] == 0 and args[7] == 0:
        # sp and pc 0: an io_uring worker (copy_thread copies its creator's registers and clears these two),
        # so the syscall shown is not the one that opens.
        return None
    if number in _EXECS:
        return os.O_RDONLY
    if number in _FLAGS_ARG:
        return args[_FLAGS_ARG[number]] & 0xFFFFFFFF
    if number == _CREAT:
        return os.O_CREAT | os.O_WRONLY | os.O_TRUNC
    # openat2: how.flags is in the caller's memory, read by the kernel before this event and changeable by any
    # thread sharing it since, so what we would read proves nothing. None: refused under a read-only rule.
    return None
