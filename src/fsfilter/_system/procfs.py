"""Everything fsfilter reads from /proc: the mount table, and what a task is (name, thread-group id, ...).

Standard library only: the unmount watchdog loads this file by its path, without the package (see watchdog.py).

Mounts: /proc/self/mountinfo, one line per mount of our mount namespace, parents before children and a later
mount on the same point after the one it covers.

A task's name and thread-group id are read cheaply enough to do it for every request (TaskStatusReader). An
open /proc/<tid>/comm descriptor stays bound to the task it was opened for: reading it at offset 0 gives that
task's current name (after execve or PR_SET_NAME too), and fails with ESRCH once the task is gone, even if its
id has been given to another task since. A task's thread-group id never changes while it lives (a thread that
calls execve takes its leader's id, and its old id's descriptors then fail). So the first request of a thread
reads /proc/<tid>/status once for the thread-group id and keeps the comm descriptor; later ones cost one pread
of comm (about 1 µs, against 12 µs for open+read+close of status). On any failure the entry is dropped and
read again from the paths.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import OrderedDict

MOUNTINFO = "/proc/self/mountinfo"


class MountEntry:
    """One line of mountinfo. A plain class, not a dataclass: the unmount watchdog loads this module at every
    mount, and importing dataclasses (with inspect and ast) made it 13 ms slower to be ready."""

    __slots__ = ("mount_id", "parent_id", "mountpoint", "options", "fstype", "source", "root", "device")

    def __init__(self, mount_id: int, parent_id: int, mountpoint: str, options: str, fstype: str, source: str,
                 root: str, device: str = "") -> None:
        self.mount_id = mount_id
        self.parent_id = parent_id
        self.mountpoint = mountpoint
        self.options = options
        self.fstype = fstype
        self.source = source
        self.root = root  # the directory of its file system the mount shows: "/" unless it is a bind mount of a part
        self.device = device  # "major:minor" of its file system (the name of its backing device info in sysfs)

    def __repr__(self) -> str:
        return (f"MountEntry({self.mount_id}, {self.parent_id}, {self.mountpoint!r}, {self.options!r}, "
                f"{self.fstype!r}, {self.source!r}, {self.root!r}, {self.device!r})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MountEntry) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in self.__slots__))


def unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mountinfo() -> list[MountEntry]:
    """The mounts of our mount namespace, in the kernel's order."""
    entries = []
    with open(MOUNTINFO) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")  # after a variable number of optional fields
            entries.append(MountEntry(int(fields[0]), int(fields[1]), unescape(fields[4]), fields[5],
                                      fields[sep + 1], unescape(fields[sep + 2]), unescape(fields[3]), fields[2]))
    return entries


def watch_mounts() -> int:
    """An fd that polls POLLPRI when the mount table changes (a mount or an unmount); reading it (pread at 0)
    arms the next notice. The caller closes it."""
    return os.open(MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)

# -- files of this process and of the system


def fd_path(fd: int) -> str:
    """A path to what our ``fd`` refers to: opening it opens that object again (an O_PATH fd too), by the
    kernel's link, not by its name."""
    return f"/proc/self/fd/{fd}"


def fd_target(fd: int) -> str:
    """The path of what our ``fd`` refers to, as our mount namespace names it (through the mount the opener
    used; " (deleted)" appended once it is unlinked). OSError when it cannot be read."""
    return os.readlink(fd_path(fd))


def sysctl_int(name: str) -> int | None:
    """An integer kernel setting, /proc/sys/``name`` (``fs/fuse/max_pages_limit``); None when there is none
    (an older kernel, another module) or it cannot be read."""
    try:
        with open(f"/proc/sys/{name}") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


# -- tasks (processes and threads). Each reader returns a neutral value ("", 0, None) when the task is gone or
# its file cannot be read: a task may exit at any moment, and callers go on without what they could not learn.


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def pids() -> list[int]:
    """The processes alive now (their ids; threads other than a process's first are not listed)."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def comm(tid: int) -> str:
    """The task's name (its comm: at most 15 bytes, the program's name unless the task changed it)."""
    return _read(f"/proc/{tid}/comm").rstrip("\n")


def exe(pid: int) -> str:
    """The path of the program the process runs."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def cmdline(pid: int) -> str:
    """The process's arguments, joined by spaces."""
    return _read(f"/proc/{pid}/cmdline").rstrip("\0").replace("\0", " ")


def tgid(tid: int) -> int:
    """The id of the process (thread group) thread ``tid`` belongs to; ``tid`` itself when it cannot be read."""
    return _parse(_read(f"/proc/{tid}/status").encode(), tid)[1]


def pidfd_alive(pidfd: int) -> bool:
    """Whether the process a pidfd pins still exists (so its pid still names it, not a process that reused it)."""
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, we may just not signal it
    return True


def groups(tid: int) -> list[int]:
    """The task's supplementary group ids."""
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the name (which may hold spaces and parentheses, so it is cut at the
    last ")"): [0] is the state, [1] the parent's id, [19] the start time."""
    raw = _read(f"/proc/{pid}/stat")
    end = raw.rfind(")")
    return raw[end + 2:].split() if end > 0 else []


def parent_pid(pid: int) -> int:
    """The id of the process's parent; 0 when unknown."""
    fields = stat_fields(pid)
    return int(fields[1]) if len(fields) > 1 else 0


def start_time(pid: int) -> int:
    """When the process started, in clock ticks since boot: with its id, it names one process (ids are reused);
    0 when unknown."""
    fields = stat_fields(pid)
    return int(fields[19]) if len(fields) > 19 else 0


def syscall(tid: int, settle: float = 0.0) -> list[str] | None:
    """The fields of /proc/<tid>/syscall: the number of the system call thread ``tid`` is blocked in and its
    arguments (hex), then its stack and instruction pointers; None when it cannot be read. A thread that is not
    blocked shows the one field "running"; with ``settle`` it is read again until it blocks (a few yields, then
    short sleeps), and None when it does not within ``settle`` seconds."""
    try:
        fd = os.open(f"/proc/{tid}/syscall", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        deadline = 0.0
        spins = 0
        while True:
            fields = os.pread(fd, 512, 0).decode(errors="replace").split()
            if not settle or (fields and fields[0] != "running"):
                return fields
            spins += 1
            if spins <= 64:
                os.sched_yield()
                continue
            now = time.monotonic()
            if not deadline:
                deadline = now + settle
            elif now > deadline:
                return None
            time.sleep(0.0002)
    except OSError:
        return None
    finally:
        os.close(fd)


def users_of(directory: str, skip: int = 0) -> list[tuple[int, str, str]]:
    """Processes with their cwd, root or an open file at or below ``directory``: (pid, name, what). Read from
    /proc; processes that go away meanwhile are left out. ``skip``: a pid not to report (the caller)."""
    top = directory.rstrip("/") or "/"

    def inside(target: str) -> bool:
        return target == top or target.startswith(top + "/")
    found: list[tuple[int, str, str]] = []
    for pid in pids():
        if pid == skip:
            continue
        what = ""
        try:
            if inside(os.readlink(f"/proc/{pid}/cwd")):
                what = "cwd"
            else:
                for name in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        if inside(os.readlink(f"/proc/{pid}/fd/{name}")):
                            what = "open file"
                            break
                    except OSError:
                        continue
        except OSError:
            continue
        if what:
            found.append((pid, comm(pid), what))
    return found


def task_path(tid: int, path: str) -> str:
    """Where ``path`` leads for thread ``tid``: through its root when absolute, its working directory when
    relative, so in its own mount namespace and chroot."""
    return f"/proc/{tid}/root{path}" if path.startswith("/") else f"/proc/{tid}/cwd/{path}"


class TaskMemory:
    """The memory of thread ``tid``'s process, read at its addresses (/proc/<tid>/mem; a process may read
    another's only with ptrace rights over it: root). OSError when it cannot be opened or read."""

    def __init__(self, tid: int) -> None:
        self.fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def read(self, address: int, size: int) -> bytes:
        return os.pread(self.fd, size, address)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> TaskMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProcessInfo:
    """The requesting thread, read from /proc only when a rule or handler asks (an engine.masks.ProcessLike)."""

    __slots__ = ("tid", "_name", "_exe", "_tgid")

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self._name: str | None = None
        self._exe: str | None = None
        self._tgid: int | None = None

    @property
    def pid(self) -> int:
        if self._tgid is None:
            self._read_status()
        return self._tgid or self.tid

    @property
    def name(self) -> str:
        if self._name is None:
            self._read_status()
        return self._name or ""

    @property
    def exe(self) -> str:
        if self._exe is None:
            self._exe = exe(self.tid)
        return self._exe

    @property
    def image(self) -> str:
        """The program's full path, as the SDK's process names are (cached per thread until it execs); the short
        name when the kernel gives no path (a kernel thread) or the process is gone."""
        info = task_status.image(self.tid)
        if info is None:
            return self.name
        path, self._tgid = info
        return path or self.name

    def _read_status(self) -> None:
        info = task_status.read(self.tid)
        self._name, self._tgid = info if info is not None else ("", self.tid)


_KEPT = 256  # descriptors kept open, least recently used dropped first


class TaskStatusReader:
    def __init__(self, kept: int = _KEPT) -> None:
        self._kept = kept
        self._tasks: OrderedDict[int, tuple[int, int]] = OrderedDict()  # tid -> (comm fd, tgid)
        self._lock = threading.Lock()
        # tid -> (comm, image path) as last read: the path is read again only when comm changes (an exec).
        self._images: dict[int, tuple[str, str]] = {}

    def image(self, tid: int) -> tuple[str, int] | None:
        """(the path of the program thread ``tid`` runs, tgid), or None when it does not exist (any more); the
        path is "" when the kernel does not say (a kernel thread)."""
        info = self.read(tid)
        if info is None:
            return None
        name, tgid = info
        with self._lock:
            known = self._images.get(tid)
        if known is not None and known[0] == name:
            return known[1], tgid
        path = exe(tgid)
        with self._lock:
            if len(self._images) >= 4 * self._kept:
                self._images.clear()
            self._images[tid] = (name, path)
        return path, tgid

    def read(self, tid: int) -> tuple[str, int] | None:
        """(name, tgid) of thread ``tid``, or None when it does not exist (any more)."""
        if tid <= 0:
            return None
        with self._lock:
            fd, tgid = self._tasks.pop(tid, (-1, 0))
        if fd >= 0:
            try:
                name = os.pread(fd, 64, 0).rstrip(b"\n").decode(errors="replace")
            except OSError:
                os.close(fd)
                fd = -1
        if fd < 0:
            with self._lock:
                self._images.pop(tid, None)  # a new (or reused) thread id: its program is read afresh
            try:
                fd = os.open(f"/proc/{tid}/comm", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            try:
                status = os.open(f"/proc/{tid}/status", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    head = os.pread(status, 512, 0)
                finally:
                    os.close(status)
                # Read after the comm descriptor is open: if the id was reused in between, comm fails later.
                name, tgid = _parse(head, tid)
            except OSError:
                os.close(fd)
                return None
        self._keep(tid, fd, tgid)
        return name, tgid

    def _keep(self, tid: int, fd: int, tgid: int) -> None:
        evicted: list[int] = []
        with self._lock:
            old = self._tasks.pop(tid, None)  # another thread may have opened one meanwhile
            if old is not None:
                evicted.append(old[0])
            self._tasks[tid] = (fd, tgid)
            while len(self._tasks) > self._kept:
                evicted.append(self._tasks.popitem(last=False)[1][0])
        for stale in evicted:
            os.close(stale)

    def close(self) -> None:
        with self._lock:
            fds = [fd for fd, _ in self._tasks.values()]
            self._tasks.clear()
        for fd in fds:
            os.close(fd)


def _parse(head: bytes, tid: int) -> tuple[str, int]:
    name, tgid = "", tid
    for line in head.split(b"\n"):  # Name is the first line, Tgid the fourth
        if line.startswith(b"Name:"):
            name = line[5:].strip().decode(errors="replace")
        elif line.startswith(b"Tgid:"):
            try:
                tgid = int(line[5:])
            except ValueError:
                pass
            break
    return name, tgid


task_status = TaskStatusReader()
