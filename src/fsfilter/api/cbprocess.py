"""CBProcess: process and thread creation and termination events, and refusing programs, on Linux.

Notifications come from the kernel's process connector (fork, exec, exit; threads too). Refusing a program
needs a decision before it runs: a fanotify ``FAN_OPEN_EXEC_PERM`` group on the file systems named by
``config("ExecPermissionPaths=...")`` asks ``on_process_creation`` at the moment ``execve`` opens the program,
and a ``result_code`` makes that ``execve`` fail with ``EPERM``. See docs/process.md.

What a "process creation" is here: a new program in a process. ``fork`` + ``execve`` (what a shell, ``system``
or ``posix_spawn`` do) is one creation, reported at the exec with the new image and command line. A child that
forks and never execs is reported as a creation of its parent's program when it exits, or when it has lived
100 ms without an exec, whichever comes first. An exec in a process already reported (a shell that ``exec``s
its last command) is reported as a creation again: same pid, new image.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from fsfilter._abi import cn_proc as cn
from fsfilter._abi import fanotify as fa
from fsfilter._abi import linux
from fsfilter._engine import dispatch
from fsfilter._engine.masks import MaskError, file_matches_mask
from fsfilter._sessions.fanotify_session import MountTable, PermissionGroup, local_mounts, local_path, mount_point_of
from fsfilter._system import libc, netlink, procfs
from fsfilter._wire import cn_proc as wire
from fsfilter._wire.fanotify import Event
from fsfilter.api._deployment import Deployment
from fsfilter.api._event_source import EventSource, check_timeout
from fsfilter.api.constants import (
    PROCESS_EVENT_PROCESS_CREATION,
    PROCESS_EVENT_PROCESS_TERMINATION,
    PROCESS_EVENT_THREAD_CREATION,
    PROCESS_EVENT_THREAD_TERMINATION,
)
from fsfilter.api.process_params import *  # noqa: F403  (the CBProcess<Event>EventParams classes, importable here)
from fsfilter.api.process_params import PROCESS_PARAMS
from fsfilter.errors import CBFSFilterError

log = logging.getLogger("fsfilter.process")

# The class and its event-parameter classes (generated from the event table in process_params.py).
__all__ = ["CBProcess", "PROCESS_PARAMS", *sorted(cls.__name__ for cls in PROCESS_PARAMS.values())]

_CONFIG_DEFAULTS = {"EventsToFire": "-1", "FilterOwnRequests": "false", "MinWorkerThreadCount": "1",
                    "MaxWorkerThreadCount": "0", "ExecPermissionPaths": "", "ForkReportDelay": "0.1",
                    "ExecPermissionTimeout": "5", "ExecPermissionTimeoutDenies": "false"}
_FORK_SWEEP = 0.05
_EXECVE = linux.syscall_numbers().get("execve")
_EXECVEAT = linux.syscall_numbers().get("execveat")


@dataclass
class _Proc:
    pid: int
    parent: int
    start: int  # start time (clock ticks since boot): pid + start time identify a process
    name: str = ""
    image: str = ""
    reported: bool = False  # a creation event was fired for its current program
    forked_at: float = 0.0
    creator: tuple[int, int] = (0, 0)  # the process and thread that forked it


class CBProcess(Deployment, EventSource):
    """Process and thread events (process connector), and refusing programs (fanotify exec permission)."""

    _CLASS = "CBProcess"  # for the kernel features install checks

    PARAMS = PROCESS_PARAMS
    DOC = "docs/process.md"
    UNSUPPORTED = {event: "Linux has no process or thread handles whose access a filter could narrow"
                   for event in ("process_handle_operation", "thread_handle_operation")}

    def __init__(self) -> None:
        self.tag: Any = 0
        self.altitude = "360000"
        self.strict_altitude = False
        self.serialize_events = 0
        self._config = dict(_CONFIG_DEFAULTS)
        self._lock = threading.RLock()
        self._procs: dict[int, _Proc] = {}
        # pid -> (include_children, start time when added): a later process with the same pid is not the same one
        self._filtered_ids: dict[int, tuple[bool, int]] = {}
        self._filtered_names: dict[str, bool] = {}
        self._ignored_ids: dict[int, tuple[bool, int]] = {}
        self._ignored_names: dict[str, bool] = {}
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._perms: PermissionGroup | None = None
        self._mounts = MountTable()
        self.permission_marks: list[str] = []  # mount points (one per file system) the exec permission group marked
        self._exec_seen: dict[int, float] = {}  # tgid -> when its exec was reported from the permission event
        self.lost_events = 0
        self.dispatcher = dispatch.Dispatcher(on_error=self._fire_error)
        self._init_events()

    # -- settings

    def initialize(self, product_guid: str) -> None:
        if not isinstance(product_guid, str):
            raise CBFSFilterError(errno.EINVAL, "product_guid must be a string")

    def _check_setting(self, name: str, value: str) -> str:
        if name == "EventsToFire":
            try:
                int(value, 0)
            except ValueError:
                raise CBFSFilterError(errno.EINVAL, f"{name} takes an int (-1 = all), not {value!r}") from None
            return value
        if name == "ExecPermissionPaths":
            for path in filter(None, value.split(",")):
                if not path.startswith("/") or not os.path.exists(path):
                    raise CBFSFilterError(errno.EINVAL, f"{name}: {path!r} is not an existing absolute path")
            return value
        if name == "ExecPermissionTimeout":
            try:
                if not 0 < float(value) <= 60:
                    raise ValueError
            except ValueError:
                raise CBFSFilterError(errno.EINVAL, f"{name} takes seconds in (0, 60], not {value!r}") from None
            return value
        if name == "ForkReportDelay":
            try:
                if not 0 <= float(value) <= 60:
                    raise ValueError
            except ValueError:
                raise CBFSFilterError(errno.EINVAL, f"{name} takes seconds between 0 and 60, not {value!r}") from None
            return value
        return super()._check_setting(name, value)

    # -- filtered and ignored processes

    def add_filtered_process_by_id(self, process_id: int, include_children: bool = False) -> None:
        self._filtered_ids[_check_pid(process_id)] = (bool(include_children), procfs.start_time(process_id))

    def add_filtered_process_by_name(self, process_name: str, include_children: bool = False) -> None:
        self._filtered_names[_check_name(process_name)] = bool(include_children)

    def add_ignored_process_by_id(self, process_id: int, include_children: bool = False) -> None:
        self._ignored_ids[_check_pid(process_id)] = (bool(include_children), procfs.start_time(process_id))

    def add_ignored_process_by_name(self, process_name: str, include_children: bool = False) -> None:
        self._ignored_names[_check_name(process_name)] = bool(include_children)

    def delete_filtered_process_by_id(self, process_id: int) -> None:
        self._filtered_ids.pop(process_id, None)

    def delete_filtered_process_by_name(self, process_name: str) -> None:
        self._filtered_names.pop(process_name, None)

    def delete_ignored_process_by_id(self, process_id: int) -> None:
        self._ignored_ids.pop(process_id, None)

    def delete_ignored_process_by_name(self, process_name: str) -> None:
        self._ignored_names.pop(process_name, None)

    def delete_all_filtered_processes(self) -> None:
        self._filtered_ids.clear()
        self._filtered_names.clear()

    def delete_all_ignored_processes(self) -> None:
        self._ignored_ids.clear()
        self._ignored_names.clear()

    def _listed(self, pid: int, ids: dict[int, tuple[bool, int]], names: dict[str, bool]) -> bool:
        """Whether ``pid`` (or, where include_children was asked, one of its ancestors) is in the lists."""
        if -1 in ids:
            return True
        with self._lock:
            proc = self._procs.get(pid)
            depth = 0
            while proc is not None and depth < 64:
                direct = depth == 0
                entry = ids.get(proc.pid)
                if entry is not None and (direct or entry[0]) and (not entry[1] or entry[1] == proc.start):
                    return True
                for mask, children in names.items():
                    if (direct or children) and _name_matches(mask, proc):
                        return True
                proc = self._procs.get(proc.parent)
                depth += 1
        return False

    def _wanted(self, pid: int) -> bool:
        if libc.is_own_process(pid) and self._config["FilterOwnRequests"] != "true":
            return False
        if (self._ignored_ids or self._ignored_names) and self._listed(pid, self._ignored_ids, self._ignored_names):
            return False
        if not self._filtered_ids and not self._filtered_names:
            return True
        return self._listed(pid, self._filtered_ids, self._filtered_names)

    def get_process_name(self, process_id: int) -> str:
        with self._lock:
            proc = self._procs.get(process_id)
        if proc is not None and proc.name:
            return proc.name
        return procfs.comm(process_id).strip()

    # -- lifecycle

    @property
    def active(self) -> bool:
        return self._sock is not None

    def start_filter(self, timeout: int = 0) -> None:
        with self._lock:
            if self._sock is not None:
                raise CBFSFilterError(errno.EALREADY, "the process filter is already started; stop it first")
            if os.geteuid() != 0:
                raise CBFSFilterError(errno.EPERM, "CBProcess needs root (the process connector and fanotify)")
            check_timeout(timeout)
            try:
                sock = netlink.open_proc_connector(_FORK_SWEEP)
            except OSError as exc:
                raise CBFSFilterError.from_os_error(exc, "the process connector is not available (a kernel with "
                                                    "CONFIG_PROC_EVENTS, and CAP_NET_ADMIN, are needed)") from exc
            self._snapshot()
            d = self.dispatcher
            d.timeout = timeout / 1000.0
            d.serialize = self.serialize_events == 1
            d.min_threads = max(1, int(self._config["MinWorkerThreadCount"]))
            count = int(self._config["MaxWorkerThreadCount"])
            d.max_threads = max(d.min_threads, count if count > 0 else 4)
            d.start()
            self._stopping = False
            self._sock = sock
            try:
                self._start_exec_permissions()
            except BaseException:
                self._sock = None
                sock.close()
                d.stop()
                raise
            t = threading.Thread(target=self._connector_loop, args=(sock,), name="fsfilter-procevents", daemon=True)
            self._threads.append(t)
            t.start()

    def stop_filter(self, wait: bool = True) -> None:
        with self._lock:
            sock = self._sock
            if sock is None:
                return
            self._stopping = True
        for t in self._threads:
            t.join(5)
        netlink.close_proc_connector(sock)
        if self._perms is not None:
            self._perms.stop()  # closing it makes the kernel allow whatever is pending
            self._perms = None
        self._threads = [t for t in self._threads if t.is_alive()]
        self._sock = None
        self.dispatcher.stop(10.0 if wait else 1.0)

    def __enter__(self) -> CBProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_filter()

    def _snapshot(self) -> None:
        """The processes running now, so that parents and names are known for what follows."""
        procs: dict[int, _Proc] = {}
        for pid in procfs.pids():
            proc = _read_proc(pid)
            if proc is not None:
                    proc.reported = True
                    procs[proc.pid] = proc
        with self._lock:
            self._procs = procs

    # -- notifications (process connector)

    def _events(self) -> int:
        return int(self._config["EventsToFire"], 0)

    def _connector_loop(self, sock: socket.socket) -> None:
        while not self._stopping:
            try:
                datagram = sock.recv(65536)
            except TimeoutError:
                self._sweep_forks()
                continue
            except OSError as exc:
                if self._stopping:
                    return
                if exc.errno == errno.ENOBUFS:
                    self.lost_events += 1
                    self._fire_error(errno.ENOBUFS, "process events were lost (the connector socket overflowed)")
                    continue
                self._fire_error(exc.errno or errno.EIO, f"the process connector failed: {exc}")
                return
            for event in wire.decode(datagram):
                try:
                    self._handle(event)
                except Exception as exc:
                    log.exception("a process event could not be handled")
                    self._fire_error(errno.EIO, f"a process event could not be handled: {exc}")
            self._sweep_forks()

    def _handle(self, ev: wire.ProcEvent) -> None:
        what = ev.what
        events = self._events()
        proc: _Proc | None
        if what == cn.PROC_EVENT_FORK:
            if ev.pid != ev.tgid:  # a new thread
                # The connector names the process's parent here, not the thread that made this one: the
                # creator is the process itself, the creating thread unknown (-1).
                if events & PROCESS_EVENT_THREAD_CREATION and self._wanted(ev.tgid):
                    self._post("thread_creation", ev.tgid, process_id=ev.tgid, thread_id=ev.pid,
                               creating_process_id=ev.tgid, creating_thread_id=-1)
                return
            with self._lock:
                parent = self._procs.get(ev.parent_tgid)
                proc = _Proc(ev.tgid, ev.parent_tgid, procfs.start_time(ev.tgid), parent.name if parent else "",
                             parent.image if parent else "", False, time.monotonic())
                self._procs[ev.tgid] = proc
            proc.creator = (ev.parent_tgid, ev.parent_pid)
        elif what == cn.PROC_EVENT_EXEC:
            if ev.pid != ev.tgid:
                return
            with self._lock:
                proc = self._procs.get(ev.tgid)
                if proc is None:
                    proc = _Proc(ev.tgid, procfs.parent_pid(ev.tgid), procfs.start_time(ev.tgid))
                    self._procs[ev.tgid] = proc
            assert proc is not None
            # Read at once: a short-lived program may be gone in a moment. What could not be read is unknown
            # (""), never the name or image from before the exec.
            proc.image = procfs.exe(ev.tgid)
            proc.name = procfs.comm(ev.tgid).strip() or os.path.basename(proc.image)[:15]
            announced = self._exec_seen.pop(ev.tgid, 0.0)
            if announced and time.monotonic() - announced < 2.0:
                proc.reported = True  # the permission event fired it already, before the program ran
                return
            self._report_creation(proc, events)
        elif what == cn.PROC_EVENT_COMM and ev.pid == ev.tgid:
            with self._lock:
                proc = self._procs.get(ev.tgid)
            if proc is not None:
                proc.name = ev.comm
        elif what == cn.PROC_EVENT_EXIT:
            if ev.pid != ev.tgid:
                if events & PROCESS_EVENT_THREAD_TERMINATION and self._wanted(ev.tgid):
                    self._post("thread_termination", ev.tgid, process_id=ev.tgid, thread_id=ev.pid)
                return
            with self._lock:
                proc = self._procs.get(ev.tgid)
            if proc is not None and not proc.reported:
                self._report_creation(proc, events)  # a fork that never execed: reported before it ends
            self._exec_seen.pop(ev.tgid, None)
            if events & PROCESS_EVENT_PROCESS_TERMINATION and self._wanted(ev.tgid):
                self._post("process_termination", ev.tgid, process_id=ev.tgid,
                           process_name=proc.name if proc else "", exit_status=ev.exit_code)
            with self._lock:
                self._procs.pop(ev.tgid, None)

    def _report_creation(self, proc: _Proc, events: int) -> None:
        proc.reported = True
        if not events & PROCESS_EVENT_PROCESS_CREATION or not self._wanted(proc.pid):
            return
        creator = proc.creator if proc.creator[0] else (proc.parent, proc.parent)
        self._post("process_creation", proc.pid, process_id=proc.pid, parent_process_id=proc.parent,
                   creating_process_id=creator[0], creating_thread_id=creator[1], process_name=proc.name,
                   image_file_name=proc.image, file_open_name_available=bool(proc.image),
                   command_line=procfs.cmdline(proc.pid))

    def _sweep_forks(self) -> None:
        """Report forked children that have not execed within the delay (a fork without exec is a creation)."""
        delay = float(self._config["ForkReportDelay"])
        now = time.monotonic()
        with self._lock:
            due = [p for p in self._procs.values() if not p.reported and p.forked_at and now - p.forked_at >= delay]
        events = self._events()
        for proc in due:
            self._report_creation(proc, events)

    # -- refusing programs (fanotify exec permission)

    def _start_exec_permissions(self) -> None:
        paths = [p for p in self._config["ExecPermissionPaths"].split(",") if p]
        if not paths:
            return
        deny_late = self._config["ExecPermissionTimeoutDenies"] == "true"
        group = PermissionGroup(fa.FAN_OPEN_EXEC_PERM, self._decide_event, self._fire_error, "fsfilter-execperm",
                                deadline=float(self._config["ExecPermissionTimeout"]),
                                late=lambda ev: not deny_late)
        try:
            points = [point for _, point, _ in local_mounts(include_pseudo=True)]
            wanted = {mount_point_of(path, points) for path in paths}
            if "/" in paths:  # "/" stands for every local file system (a program can be anywhere)
                wanted |= {point for root, point, _ in local_mounts(include_pseudo=False) if root == "/"}
            self.permission_marks = group.mark_filesystems(sorted(wanted))
        except BaseException:
            group.stop()
            raise
        self._perms = group
        log.info("fanotify exec permission marks on the file systems of: %s", ", ".join(self.permission_marks))
        group.start()

    def _decide_event(self, ev: Event) -> bool:
        # The filter's own execs never wait for the answering thread. (A handler that starts a program and waits
        # for it needs start_filter(timeout): see docs/process.md.)
        if libc.is_own_thread(ev.pid):
            return True
        return self._decide_exec(ev.fd, ev.pid)

    def _decide_exec(self, fd: int, tid: int) -> bool:
        """on_process_creation for a program about to run (``execve`` has opened it); False refuses it."""
        handler = self.handler("process_creation")
        tgid = procfs.tgid(tid)
        if handler is None or not self._events() & PROCESS_EVENT_PROCESS_CREATION or not self._wanted(tgid):
            return True
        # The program's path as our namespace names it: a bind mount in the caller's own namespace must not give it
        # a name the handler does not recognise.
        image = local_path(fd, self._mounts)
        # The loader or a script's interpreter, which the kernel opens for the exec of the named program, runs too:
        # it is asked about as well (a "#!/path/refused" script or an ELF file naming it as its interpreter must not
        # run it), but only the named program's answer counts as this process's creation. The named program is told
        # from the memory of the caller, which another thread may change: that may only make an exec count as a
        # creation or not, never let a program run unasked.
        target = _exec_target(tid)
        loader = target is not None and target != _identity(fd)
        with self._lock:
            proc = self._procs.get(tgid)
        argv = _exec_argv(tid)
        params = PROCESS_PARAMS["process_creation"](
            process_id=tgid, parent_process_id=proc.parent if proc else procfs.parent_pid(tgid),
            creating_process_id=tgid, creating_thread_id=tid, process_name=os.path.basename(image)[:15],
            image_file_name=image, file_open_name_available=True,
            command_line=" ".join(argv) if argv is not None else "")
        origin = dispatch.Origin(tgid, tid, -1, -1, procfs.comm(tid).strip())
        outcome = self.dispatcher.call(handler, params, origin)
        # a handler error never stops programs (on_error was told)
        allowed = outcome is dispatch.Outcome.FAILED or not params.result_code
        if allowed and not loader:
            self._exec_seen[tgid] = time.monotonic()  # the connector's EXEC for it is not reported again
        return allowed

    @property
    def late_exec_answers(self) -> int:
        """Execs answered by the timeout policy because their decision took longer than ExecPermissionTimeout."""
        perms = self._perms
        return perms.timed_out if perms is not None else 0

    # -- delivery

    def _post(self, event: str, pid: int, **fields: Any) -> None:
        handler = self.handler(event)
        if handler is None:
            return
        self.dispatcher.post(handler, PROCESS_PARAMS[event](**fields), dispatch.Origin(pid, pid, -1, -1, ""))

    def shutdown_system(self, shutdown_prompt: str, timeout: int, force_close_apps: bool, reboot: bool) -> bool:
        raise CBFSFilterError(errno.ENOSYS, "fsfilter does not shut the machine down: use systemctl")


def _check_pid(pid: int) -> int:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < -1 or pid == 0:
        raise CBFSFilterError(errno.EINVAL, f"process_id must be a pid or -1 (all), not {pid!r}")
    return pid


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise CBFSFilterError(errno.EINVAL, "process_name must be a non-empty name, path or mask")
    try:
        file_matches_mask(name if "/" in name else name, "x")
    except MaskError as exc:
        raise CBFSFilterError(errno.EINVAL, f"bad process name mask {name!r}: {exc}") from exc
    return name


def _name_matches(mask: str, proc: _Proc) -> bool:
    """A name mask matches the process name or the image's base name; a mask with '/' matches the image path."""
    try:
        if "/" in mask:
            return bool(proc.image) and file_matches_mask(mask, proc.image)
        return (bool(proc.name) and file_matches_mask(mask, proc.name)) or (
            bool(proc.image) and file_matches_mask(mask, os.path.basename(proc.image)))
    except MaskError:
        return False


def _read_proc(pid: int) -> _Proc | None:
    fields = procfs.stat_fields(pid)
    if len(fields) <= 19:
        return None
    return _Proc(pid, int(fields[1]), int(fields[19]), procfs.comm(pid).strip(), procfs.exe(pid))


def _exec_target(tid: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the program the execve that thread ``tid`` is blocked in was asked to run, looked up
    as the kernel looks it up: in the caller's own root and working directory (its mount namespace, through
    /proc/<tid>/root and cwd), following symbolic links. None when it cannot be told (execveat, unreadable)."""
    fields = procfs.syscall(tid) or []
    if len(fields) < 2 or not fields[0].isdigit() or int(fields[0]) != _EXECVE:
        return None
    try:
        with procfs.TaskMemory(tid) as mem:
            raw = mem.read(int(fields[1], 16), 4096).split(b"\0", 1)[0]
        return _identity_of(os.stat(procfs.task_path(tid, os.fsdecode(raw))))
    except (OSError, ValueError):
        return None


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        return _identity_of(os.fstat(fd))
    except OSError:
        return None


def _identity_of(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _exec_argv(tid: int) -> list[str] | None:
    """The argv of the execve thread ``tid`` is blocked in, read from its memory (the new program's command line
    is not in /proc/<pid>/cmdline until it runs)."""
    fields = procfs.syscall(tid) or []
    if len(fields) < 4:
        return None
    try:
        number, argv_ptr = int(fields[0]), int(fields[2], 16)
    except ValueError:
        return None
    if number not in (_EXECVE, _EXECVEAT):
        return None
    if number == _EXECVEAT:
        argv_ptr = int(fields[3], 16)
    try:
        mem = procfs.TaskMemory(tid)
    except OSError:
        return None
    args: list[str] = []
    try:
        for i in range(256):
            raw = mem.read(argv_ptr + 8 * i, 8)
            if len(raw) < 8:
                break
            ptr = int.from_bytes(raw, "little")
            if not ptr:
                break
            chunk = mem.read(ptr, 4096)
            args.append(chunk.split(b"\0", 1)[0].decode(errors="replace"))
    except OSError:
        return args or None
    finally:
        mem.close()
    return args

