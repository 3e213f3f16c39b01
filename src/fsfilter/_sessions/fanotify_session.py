"""A fanotify notification group that names things: marks on whole file systems, records read in bulk,
file handles turned back into paths.

The group reports directory file handles with entry names (``FAN_REPORT_DFID_NAME_TARGET``) and a pidfd
of the process (``FAN_REPORT_PIDFD``). A path is rebuilt as the directory's path (``open_by_handle_at``
through any fd on that file system, then the ``/proc/self/fd`` link) plus the name. Directory paths are
cached by handle; the cache is dropped whenever a directory is renamed, moved or deleted, so a name under a
renamed directory is never given its old path.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from fsfilter._abi import fanotify as abi
from fsfilter._system import fanotify as fan
from fsfilter._system import procfs
from fsfilter._wire import fanotify as wire
from fsfilter._wire.fanotify import Event, ObjectId

log = logging.getLogger("fsfilter.fanotify")

# File systems that hold no user files: never marked for masks without a path.
PSEUDO_FS = frozenset({
    "proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs", "securityfs", "pstore",
    "bpf", "configfs", "fusectl", "hugetlbfs", "binfmt_misc", "autofs", "efivarfs", "rpc_pipefs", "nsfs",
    "selinuxfs", "devtmpfs", "ramfs", "squashfs", "overlay", "nfsd", "fuse.fsfilter",
})
_DIR_CACHE = 65536


def local_mounts(include_pseudo: bool = False) -> list[tuple[str, str, str]]:
    """(root within its file system, mount point, type) of each mount in /proc/self/mountinfo, in order."""
    return [(m.root, m.mountpoint, m.fstype) for m in procfs.mountinfo()
            if include_pseudo or not (m.fstype in PSEUDO_FS or m.fstype.startswith("fuse"))]


class MountTable:
    """A mount point of each file system, by fsid, to reopen handles through. Paths, not fds: an open fd would
    keep the file system busy, and the user could not unmount it."""

    def __init__(self) -> None:
        self._points: dict[tuple[int, int], str] = {}
        self._lock = threading.Lock()
        self._refreshed = -1e9

    def point_for(self, fsid: tuple[int, int]) -> str | None:
        with self._lock:
            point = self._points.get(fsid)
        if point is not None:
            return point
        now = time.monotonic()
        if now - self._refreshed < 1.0:
            return None  # looked a moment ago: do not rescan the mount table for every record
        self.refresh()
        with self._lock:
            return self._points.get(fsid)

    def open_mount(self, fsid: tuple[int, int]) -> int | None:
        """An fd (not O_PATH: open_by_handle_at refuses those) on the file system, for the caller to close."""
        point = self.point_for(fsid)
        if point is None:
            return None
        try:
            return os.open(point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None

    def refresh(self) -> None:
        """Learn the file systems mounted since. A mount of a file system's own root is preferred: paths
        through a bind mount of a subdirectory would miss the rest of it."""
        mounts = local_mounts(include_pseudo=False)
        found: dict[tuple[int, int], str] = {}
        for whole in (True, False):
            for root, mountpoint, _ in mounts:
                if (root == "/") != whole:
                    continue
                try:
                    fd = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    found.setdefault(fan.fsid_of(fd), mountpoint)
                except OSError:
                    pass
                finally:
                    os.close(fd)
        with self._lock:
            self._points = found
            self._refreshed = time.monotonic()

    def close(self) -> None:
        with self._lock:
            self._points.clear()


class PathResolver:
    def __init__(self, mounts: MountTable) -> None:
        self.mounts = mounts
        self._dirs: OrderedDict[ObjectId, str] = OrderedDict()
        self.misses = 0

    def forget_directories(self) -> None:
        self._dirs.clear()

    def object_path(self, obj: ObjectId, directory: bool = False) -> str | None:
        """The path of the object a handle names, or None when it is gone (deleted) or unreachable."""
        if directory:
            hit = self._dirs.get(obj)
            if hit is not None:
                self._dirs.move_to_end(obj)
                return hit
        self.misses += 1
        path = path_by_handle(self.mounts, obj.fsid, obj.handle_type, obj.handle)
        if path is None or path.endswith(" (deleted)") or not path.startswith("/"):
            return None
        if directory:
            self._dirs[obj] = path
            if len(self._dirs) > _DIR_CACHE:
                self._dirs.popitem(last=False)
        return path

    def entry_path(self, directory: ObjectId, name: bytes) -> str | None:
        base = self.object_path(directory, directory=True)
        if base is None:
            return None
        if name in (b".", b""):
            return base
        return (base.rstrip("/") + "/" + os.fsdecode(name)) if base != "/" else "/" + os.fsdecode(name)


class NotifyGroup:
    """A fanotify notification group reporting names and pidfds. ``read`` returns decoded records;
    ``close`` ends a blocked ``read``."""

    FLAGS = (abi.FAN_CLOEXEC | abi.FAN_CLASS_NOTIF | abi.FAN_REPORT_DFID_NAME_TARGET | abi.FAN_REPORT_PIDFD)

    def __init__(self, unlimited_queue: bool = False, buffer_size: int = 1 << 18) -> None:
        flags = self.FLAGS | (abi.FAN_UNLIMITED_QUEUE if unlimited_queue else 0)
        self.fd = fan.init(flags, os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC)
        os.set_blocking(self.fd, False)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # The kernel flags /proc/self/mountinfo (POLLPRI) when the mount table changes: volume events.
        self._mounts_fd = procfs.watch_mounts()
        self.mounts_changed = False
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)
        self._poll.register(self._wake_r, select.POLLIN)
        self._poll.register(self._mounts_fd, select.POLLPRI)
        self._buffer = bytearray(buffer_size)
        self.marked: dict[str, int] = {}  # path marked (a file system) -> mask
        self.closed = False

    def mark_filesystem(self, path: str, mask: int) -> None:
        fan.mark(self.fd, abi.FAN_MARK_ADD | abi.FAN_MARK_FILESYSTEM, mask, path)
        self.marked[path] = mask

    def unmark_filesystem(self, path: str) -> None:
        mask = self.marked.pop(path, 0)
        try:
            fan.mark(self.fd, abi.FAN_MARK_REMOVE | abi.FAN_MARK_FILESYSTEM, mask, path)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EINVAL):
                raise

    def read(self, timeout_ms: int = 1000) -> list[Event] | None:
        """Records available now (waiting up to ``timeout_ms``); None once closed."""
        if self.closed:
            return None
        try:
            size = os.readv(self.fd, (self._buffer,))
        except BlockingIOError:
            ready = self._poll.poll(timeout_ms)
            if self.closed or any(fd == self._wake_r for fd, _ in ready):
                return None
            if any(fd == self._mounts_fd for fd, _ in ready):
                self.mounts_changed = True
                os.pread(self._mounts_fd, 1 << 16, 0)  # reading it re-arms the notice
            if not any(fd == self.fd for fd, _ in ready):
                return []
            try:
                size = os.readv(self.fd, (self._buffer,))
            except BlockingIOError:
                return []
        return wire.decode(memoryview(self._buffer)[:size])

    def wake(self) -> None:
        self.closed = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        self.closed = True
        for fd in (self.fd, self._wake_r, self._wake_w, self._mounts_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def close_fds(events: Iterable[Event]) -> None:
    """Close the pidfds (and fds) records carried."""
    for event in events:
        for fd in (event.pidfd, event.fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def mount_point_of(path: str, points: list[str]) -> str:
    """The mount point whose mount holds ``path`` (the longest of ``points`` that is a prefix of it; a path that
    does not exist yet is taken at its nearest existing ancestor)."""
    real = path
    while not os.path.exists(real) and real != "/":
        real = os.path.dirname(real)
    real = os.path.realpath(real)
    best = "/"
    for point in points:
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best = point
    return best


def local_path(fd: int, mounts: MountTable) -> str:
    """The path of the object ``fd`` refers to, as this process's mount namespace names it.

    ``/proc/self/fd`` gives the path through the mount the opener used. That may be a bind mount in another
    mount namespace (any user can make one in a user namespace of their own), which names the file differently
    or not at all here: then the file is found again by its file handle through our own mount of its file
    system. Falls back to the link's path when that fails (a file system without handles, no mount of it
    here)."""
    path = procfs.fd_target(fd)
    st = os.fstat(fd)
    if _same_object(path, st):
        return path
    try:
        handle_type, handle = fan.handle_of(fd)
        found = path_by_handle(mounts, fan.fsid_of(fd), handle_type, handle)
    except OSError:
        return path
    return found if found is not None and _same_object(found, st) else path


def path_by_handle(mounts: MountTable, fsid: tuple[int, int], handle_type: int, handle: bytes) -> str | None:
    """The path, in our namespace, of the object a file handle names, through our mount of its file system; None
    when there is no such mount or the object is gone (ESTALE)."""
    mount_fd = mounts.open_mount(fsid)
    if mount_fd is None:
        return None
    try:
        obj = fan.open_by_handle(mount_fd, handle_type, handle, os.O_PATH)
    except OSError:
        return None
    finally:
        os.close(mount_fd)
    try:
        return procfs.fd_target(obj)
    except OSError:
        return None
    finally:
        os.close(obj)


def _same_object(path: str, st: os.stat_result) -> bool:
    try:
        here = os.stat(path, follow_symlinks=False)
    except (OSError, ValueError):
        return False
    return here.st_ino == st.st_ino and here.st_dev == st.st_dev


class _Request:
    __slots__ = ("answered", "due", "event", "started")

    def __init__(self, event: Event, due: float) -> None:
        self.event = event
        self.due = due
        self.started = False  # a worker is deciding it (then that worker closes the event fd)
        self.answered = False


class PermissionGroup:
    """A fanotify permission group (``FAN_CLASS_CONTENT``, thread ids) and the threads that answer it.

    Every request gets an answer, and within ``deadline`` seconds: ``decide(event)`` (True allows) runs on a
    worker thread; one that raises allows the request and is reported through ``on_error``; one still running at
    the deadline is answered by the reader thread with ``late(event)`` (the caller's fail policy; allow when it
    raises), reported through ``on_error`` (ETIMEDOUT) and counted in ``timed_out``, while the late decision runs
    on. The kernel has no answer timeout of its own. Workers are added while all are busy, up to
    ``max_workers``; a decision that never returns keeps its worker. The queue is unlimited: when a bounded one is
    full the kernel drops permission events and lets the operation through unasked. Closing the group makes the
    kernel allow whatever is pending, so a stopped (or dead) filter never leaves a caller blocked.

    What this cannot cover: a whole process stopped (SIGSTOP, a debugger) answers nothing, and every request
    waits until it runs again or dies (then the kernel allows them)."""

    def __init__(self, mask: int, decide: Callable[[Event], bool], on_error: Callable[[int, str], None],
                 name: str, deadline: float = 5.0, late: Callable[[Event], bool] | None = None,
                 max_workers: int = 16) -> None:
        self.mask = mask
        self._decide = decide
        self._late = late
        self._report = on_error
        self._name = name
        self.deadline = deadline
        self.max_workers = max(1, max_workers)
        self.fd = fan.init(abi.FAN_CLASS_CONTENT | abi.FAN_CLOEXEC | abi.FAN_NONBLOCK | abi.FAN_REPORT_TID
                           | abi.FAN_UNLIMITED_QUEUE, os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._pending: dict[int, _Request] = {}  # id -> request not answered yet, oldest first
        self._lock = threading.Lock()
        self._idle = 0
        self.answered = 0
        self.denied = 0
        self.timed_out = 0

    def mark_filesystems(self, points: Iterable[str]) -> list[str]:
        """A file-system mark on each of ``points`` (mount points), one per file system; the points marked."""
        marked: list[str] = []
        seen: set[tuple[int, int]] = set()
        for point in points:
            fd = os.open(point, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fsid = fan.fsid_of(fd)
            finally:
                os.close(fd)
            if fsid not in seen:
                seen.add(fsid)
                fan.mark(self.fd, abi.FAN_MARK_ADD | abi.FAN_MARK_FILESYSTEM, self.mask, point)
                marked.append(point)
        return marked

    def on_error(self, code: int, description: str) -> None:
        """Report, never raise: the answering thread must go on answering whatever a handler does."""
        try:
            self._report(code, description)
        except Exception:
            log.exception("on_error raised")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            workers = list(self._workers)
        for _ in workers:
            self._queue.put(None)
        end = time.monotonic() + 1.0
        for w in workers:
            w.join(max(0.0, end - time.monotonic()))
        lingering = (self._thread is not None and self._thread.is_alive()) or any(w.is_alive() for w in workers)
        # A thread still in a decision would later write its answer into whatever file reused the number:
        # then the number is pointed at /dev/null instead of being closed (which also releases the group: the
        # kernel allows what is pending).
        for fd in (self.fd, self._wake_r, self._wake_w):
            try:
                if lingering:
                    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                    os.dup2(null, fd)
                    os.close(null)
                else:
                    os.close(fd)
            except OSError:
                pass

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        buffer = bytearray(1 << 16)
        while not self._stopping:
            self._expire()
            try:
                size = os.readv(self.fd, (buffer,))
            except BlockingIOError:
                poller.poll(self._poll_ms())
                continue
            except OSError as exc:
                if self._stopping:
                    return
                self.on_error(exc.errno or errno.EIO, f"reading permission events failed: {exc}")
                time.sleep(0.05)
                continue
            try:
                events = wire.decode(memoryview(buffer)[:size])
            except wire.RecordError as exc:  # cannot happen with a sane kernel; the fds are unknown then
                self.on_error(errno.EIO, f"a permission record could not be read: {exc}")
                continue
            due = time.monotonic() + self.deadline
            for ev in events:
                if ev.fd < 0:
                    continue
                req = _Request(ev, due)
                with self._lock:
                    self._pending[id(req)] = req
                    spawn = self._idle == 0 and len(self._workers) < self.max_workers
                    if not spawn:
                        self._idle -= 1  # taken by a waiting worker (counted here so that a burst spawns enough)
                    else:
                        w = threading.Thread(target=self._work, name=f"{self._name}-{len(self._workers)}",
                                             daemon=True)
                        self._workers.append(w)
                self._queue.put(req)
                if spawn:
                    w.start()

    def _poll_ms(self) -> int:
        with self._lock:
            oldest = next(iter(self._pending.values()), None)
        if oldest is None:
            return 1000
        return max(1, min(1000, int((oldest.due - time.monotonic()) * 1000) + 1))

    def _expire(self) -> None:
        """Answer the requests whose decision is late, by the fail policy."""
        now = time.monotonic()
        with self._lock:
            late = []
            for req in self._pending.values():
                if req.due > now:
                    break  # in arrival order: the rest are younger
                late.append(req)
        for req in late:
            allow = True
            if self._late is not None:
                try:
                    allow = self._late(req.event)
                except Exception as exc:
                    self.on_error(errno.EIO, f"the late answer's policy failed (allowed): {exc}")
            if self._answer(req, allow, late=True):
                self.timed_out += 1
                self.on_error(errno.ETIMEDOUT, f"a permission decision took over {self.deadline:g} s: "
                                               f"{'allowed' if allow else 'denied'} (pid {req.event.pid})")

    def _work(self) -> None:
        while True:
            req = self._queue.get()
            if req is None:
                return
            with self._lock:
                if req.answered:  # late before it started: the reader answered it and closed its fd
                    self._idle += 1
                    continue
                req.started = True
            allow = True
            try:
                allow = self._decide(req.event)
            except Exception as exc:  # answer anyway: a caller must never wait for an answer that never comes
                self.on_error(errno.EIO, f"deciding a permission request failed (allowed): {exc}")
            self._answer(req, allow)
            with self._lock:
                self._idle += 1

    def _answer(self, req: _Request, allow: bool, late: bool = False) -> bool:
        """Write the answer unless one was written; close the event fd unless a worker still decides with it.
        Whether this call answered."""
        ev = req.event
        with self._lock:
            if req.answered:
                if not late:
                    os.close(ev.fd)  # the worker of a request answered late: its fd is closed now
                return False
            req.answered = True
            self._pending.pop(id(req), None)
            keep_fd = late and req.started
        try:
            os.write(self.fd, wire.encode_response(ev.fd, abi.FAN_ALLOW if allow else abi.FAN_DENY))
        except OSError as exc:
            self.on_error(exc.errno or errno.EIO, f"answering a permission request failed: {exc}")
        finally:
            if not keep_fd:
                os.close(ev.fd)
        self.answered += 1
        self.denied += not allow
        return True
