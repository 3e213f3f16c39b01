"""CBMonitor: the SDK's monitoring-only class, on fanotify.

Nothing is mounted. One fanotify group marks whole file systems (the ones the rules' paths live on, or every
local one for masks without a path); a reader thread decodes its records, rebuilds paths from the file
handles, matches them against the same rules as CBFilter, and queues notification events for the handlers.
What fanotify can and cannot tell, per event, is in docs/monitor.md.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from typing import Any

from fsfilter._abi import fanotify as fa
from fsfilter._engine import dispatch
from fsfilter._engine.masks import MaskError, file_matches_mask
from fsfilter._engine.rules import RuleSet, attributes_from_stat, match_path
from fsfilter._sessions.fanotify_session import (
    MountTable,
    NotifyGroup,
    PathResolver,
    close_fds,
    local_mounts,
    mount_point_of,
)
from fsfilter._sessions.process_tracker import ProcessTracker, tracker_or_none
from fsfilter._system import fanotify as fan
from fsfilter._system import libc, procfs
from fsfilter._system.procfs import TaskStatusReader
from fsfilter._wire.fanotify import Event
from fsfilter.api import constants as c
from fsfilter.api._deployment import Deployment
from fsfilter.api._event_source import EventSource, RuleTables, check_timeout
from fsfilter.api.monitor_params import *  # noqa: F403  (the CBMonitor<Event>EventParams classes, importable here)
from fsfilter.api.monitor_params import MONITOR_PARAMS
from fsfilter.errors import CBFSFilterError

log = logging.getLogger("fsfilter.monitor")

# The class and its event-parameter classes (generated from the event table in monitor_params.py).
__all__ = ["CBMonitor", "MONITOR_PARAMS", "UNKNOWN", *sorted(cls.__name__ for cls in MONITOR_PARAMS.values())]

# The fanotify events each FS_NE_* flag needs in the group's marks.
_FAN_FOR: dict[int, int] = {
    c.FS_NE_CREATE: fa.FAN_CREATE | fa.FAN_ONDIR,
    c.FS_NE_CREATE_HARD_LINK: fa.FAN_CREATE,
    c.FS_NE_OPEN: fa.FAN_OPEN | fa.FAN_OPEN_EXEC | fa.FAN_ONDIR,
    c.FS_NE_READ: fa.FAN_ACCESS,
    c.FS_NE_WRITE: fa.FAN_MODIFY,
    c.FS_NE_CLOSE: fa.FAN_CLOSE_WRITE | fa.FAN_CLOSE_NOWRITE | fa.FAN_ONDIR,
    c.FS_NE_RENAME: fa.FAN_RENAME | fa.FAN_ONDIR,
    c.FS_NE_DELETE: fa.FAN_DELETE | fa.FAN_ONDIR,
    c.FS_NE_SET_ATTRIBUTES: fa.FAN_ATTRIB | fa.FAN_ONDIR,
    c.FS_NE_SET_SECURITY: fa.FAN_ATTRIB | fa.FAN_ONDIR,
    c.FS_NE_ENUMERATE_DIRECTORY: fa.FAN_ACCESS | fa.FAN_ONDIR,
}
# Renames and deletions of directories make cached directory paths stale.
_DIRECTORY_CHANGES = fa.FAN_RENAME | fa.FAN_MOVED_FROM | fa.FAN_MOVED_TO | fa.FAN_DELETE | fa.FAN_MOVE_SELF
_NOTIFY_KNOWN = c.FS_NE_KNOWN
UNKNOWN = -1  # a value fanotify does not report: sizes, offsets, counts

_CONFIG_DEFAULTS: dict[str, str] = {"FilterOwnRequests": "false", "UnlimitedQueue": "true",
                                    "MinWorkerThreadCount": "1", "MaxWorkerThreadCount": "0"}
_PROPERTIES = frozenset({"active", "altitude", "fire_volume_events", "process_cached_io_requests",
                         "process_failed_requests", "serialize_events", "strict_altitude", "tag",
                         "filter_rule_count", "passthrough_rule_count", "lost_events"})


class _Process:
    """The originator of a record (ProcessLike for per-process masks): name read when the record is read."""

    __slots__ = ("pid", "name", "_exe")

    def __init__(self, pid: int, name: str) -> None:
        self.pid = pid
        self.name = name
        self._exe: str | None = None

    @property
    def exe(self) -> str:
        if self._exe is None:
            self._exe = procfs.exe(self.pid)
        return self._exe


class _PathFacts:
    """What size/attribute/EA qualifiers of rules look at, read from the path when a qualified rule asks
    (a deleted file has none: such a rule then does not apply)."""

    __slots__ = ("path", "_st")

    def __init__(self, path: str) -> None:
        self.path = path
        self._st: os.stat_result | None = None

    def _stat(self) -> os.stat_result | None:
        if self._st is None:
            try:
                self._st = os.lstat(self.path)
            except OSError:
                return None
        return self._st

    def size(self) -> int | None:
        st = self._stat()
        return st.st_size if st is not None else None

    def attributes(self) -> int | None:
        st = self._stat()
        return attributes_from_stat(st.st_mode, st.st_size, st.st_blocks, self.path) if st is not None else None

    def has_xattr(self, name: str) -> bool:
        try:
            os.getxattr(self.path, name, follow_symlinks=False)
        except OSError:
            return False
        return True


class _Names:
    """Process names by pid, read as records arrive through kept /proc/<pid>/comm descriptors (procfs: a kept
    descriptor fails once its process is gone, so a reused pid never lends its name). A pid seen for the first
    time is checked against the record's pidfd after its name is read. A process gone before its first record
    was read keeps the name it had when an earlier record of it was read (within a few seconds), or none: a
    name is never guessed."""

    def __init__(self, keep: float = 5.0) -> None:
        self._reader = TaskStatusReader(kept=512)
        self._seen: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self._keep = keep
        self.tracker: ProcessTracker | None = None

    def name(self, pid: int, pidfd: int) -> str:
        now = time.monotonic()
        if pidfd >= 0:  # the process still exists: /proc/<pid> is its own
            status = self._reader.read(pid)
            if status is not None and procfs.pidfd_alive(pidfd):
                self._remember(pid, status[0], now)
                return status[0]
        tracker = self.tracker
        if tracker is not None:
            # Gone before its record was read: the process connector saw it start (and end). Its answer is
            # final: a name read earlier may be the one from before an exec.
            name = tracker.exited_name(pid) if pidfd == fa.FAN_NOPIDFD else (
                tracker.live_name(pid) or tracker.exited_name(pid))
            return name or ""
        hit = self._seen.get(pid)
        if hit is not None and now - hit[1] <= self._keep:
            return hit[0]
        return ""

    def _remember(self, pid: int, name: str, now: float) -> None:
        self._seen[pid] = (name, now)
        self._seen.move_to_end(pid)
        if len(self._seen) > 4096:
            self._seen.popitem(last=False)

    def close(self) -> None:
        self._reader.close()


class CBMonitor(Deployment, EventSource, RuleTables):
    """Notification events for file operations anywhere on the machine's local file systems (fanotify)."""

    _CLASS = "CBMonitor"  # for the kernel features install checks

    PARAMS = MONITOR_PARAMS
    DOC = "docs/monitor.md"

    def __init__(self) -> None:
        self.rules = RuleSet()
        self.passthrough_rules = RuleSet()
        self.tag: Any = 0
        self.altitude = "360000"
        self.strict_altitude = False
        self.serialize_events = c.SERIALIZE_EVENTS_ON_MULTIPLE_THREADS
        self.fire_volume_events = c.FS_MOUNT_IGNORE
        self.process_cached_io_requests = False
        self.process_failed_requests = False
        self._config = dict(_CONFIG_DEFAULTS)
        self._lock = threading.RLock()
        self._group: NotifyGroup | None = None
        self._reader: threading.Thread | None = None
        self._mounts = MountTable()
        self._resolver = PathResolver(self._mounts)
        self._names = _Names()
        self._marked: dict[str, tuple[tuple[int, int], int]] = {}  # mount point -> (fsid, mask)
        self.lost_events = 0
        self.records = 0
        self.dispatcher = dispatch.Dispatcher(on_error=self._fire_error)
        self._init_events()

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("get_", "set_")) and name[4:] in _PROPERTIES:
            prop = name[4:]
            if name.startswith("get_"):
                return lambda: getattr(self, prop)
            return lambda value: setattr(self, prop, value)
        raise AttributeError(f"CBMonitor has no attribute {name!r}")

    # -- lifecycle

    def initialize(self, product_guid: str) -> None:
        if not isinstance(product_guid, str):
            raise CBFSFilterError(errno.EINVAL, "product_guid must be a string")

    @property
    def active(self) -> bool:
        return self._group is not None

    def start_filter(self, timeout: int = 0) -> None:
        """Mark the file systems the rules need and start delivering events."""
        with self._lock:
            if self._group is not None:
                raise CBFSFilterError(errno.EALREADY, "the monitor is already started; stop it first")
            check_timeout(timeout)
            if os.geteuid() != 0:
                raise CBFSFilterError(errno.EPERM, "CBMonitor needs root (fanotify file-system marks)")
            try:
                group = NotifyGroup(unlimited_queue=self._config["UnlimitedQueue"] == "true")
            except OSError as exc:
                raise CBFSFilterError.from_os_error(exc, "fanotify is not available: a kernel with "
                                                    "CONFIG_FANOTIFY and FID reporting (5.9+) is needed") from exc
            self._group = group
            self._names.tracker = tracker_or_none()
            d = self.dispatcher
            d.serialize = self.serialize_events == c.SERIALIZE_EVENTS_ON_ONE_WORKER_THREAD
            d.min_threads = max(1, int(self._config["MinWorkerThreadCount"]))
            count = int(self._config["MaxWorkerThreadCount"])
            d.max_threads = max(d.min_threads, count if count > 0 else 4)
            d.start()
            try:
                self._mounts.refresh()
                self._resolver.forget_directories()  # a previous run's paths may have moved since
                self._sync_marks()
            except BaseException:
                self._group = None
                group.close()
                d.stop()
                if self._names.tracker is not None:
                    self._names.tracker.stop()
                    self._names.tracker = None
                raise
            self._reader = threading.Thread(target=self._read_loop, args=(group,), name="fsfilter-fanotify",
                                            daemon=True)
            self._reader.start()
        self._fire_simple("filter_start")

    def stop_filter(self, wait: bool = True) -> None:
        with self._lock:
            group, reader = self._group, self._reader
            if group is None:
                return
            group.wake()
            self._group = None
        if reader is not None:
            reader.join(10)
        group.close()
        for point in sorted(self._marked):
            if self.fire_volume_events & c.FS_MOUNT_NOTIFY:
                self._post_simple("notify_filter_detach_from_volume", volume_name=point)
        self._marked.clear()
        self.dispatcher.stop()
        self._names.close()
        tracker, self._names.tracker = self._names.tracker, None
        if tracker is not None:
            tracker.stop()
        self._fire_simple("filter_stop")

    def __enter__(self) -> CBMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_filter()

    # -- marks

    def _wanted_mask(self) -> int:
        notify = 0
        for rule in self.rules:
            notify |= rule.notify
        mask = 0
        for flag, bits in _FAN_FOR.items():
            if notify & flag:
                mask |= bits
        if mask:
            # Directory renames keep the directory-path cache true, whatever the rules report. (A deleted
            # directory's handle is never reused for another one: its stale entry does no harm.)
            mask |= fa.FAN_RENAME | fa.FAN_ONDIR
        return mask

    def _wanted_mounts(self) -> list[str]:
        """Mount points whose file systems the rules concern: the mount each rule's fixed prefix lies on;
        every local file system for a rule without a path."""
        mounts = [(root, point) for root, point, _ in local_mounts(include_pseudo=False)]
        points = [point for _, point in mounts]
        wanted: set[str] = set()
        anywhere = False
        for rule in self.rules:
            prefix = rule.compiled.prefix
            if prefix is None:
                anywhere = True
                continue
            wanted.add(mount_point_of(prefix, points))
        if anywhere:
            wanted.update(points)
        return sorted(wanted)

    def _sync_marks(self) -> None:
        group = self._group
        if group is None:
            return
        mask = self._wanted_mask()
        if not mask:
            return
        seen_fsids = {fsid for fsid, _ in self._marked.values()}
        for point in self._wanted_mounts():
            if point in self._marked and self._marked[point][1] == mask:
                continue
            try:
                fd = os.open(point, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fsid = fan.fsid_of(fd)
            finally:
                os.close(fd)
            if fsid in seen_fsids and point not in self._marked:
                continue  # another mount of a file system already marked: a file-system mark covers it
            if self.fire_volume_events & c.FS_MOUNT_CONTROL and point not in self._marked:
                params = self._fire_simple("before_filter_attach_to_volume", volume_name=point)
                if params is not None and params.skip_volume:
                    continue
            try:
                group.mark_filesystem(point, mask)
            except OSError as exc:
                if point in [p for p in self._explicit_mounts()]:
                    raise CBFSFilterError.from_os_error(exc, f"cannot watch the file system of {point} with "
                                                        "fanotify (it may lack file handles)") from exc
                log.info("not watching %s: %s", point, exc)
                continue
            new = point not in self._marked
            self._marked[point] = (fsid, mask)
            seen_fsids.add(fsid)
            if new:
                if self.fire_volume_events & c.FS_MOUNT_CONTROL:
                    self._fire_simple("after_filter_attach_to_volume", volume_name=point)
                if self.fire_volume_events & c.FS_MOUNT_NOTIFY:
                    self._post_simple("notify_filter_attach_to_volume", volume_name=point)

    def _explicit_mounts(self) -> set[str]:
        points = [point for _, point, _ in local_mounts(include_pseudo=True)]
        return {mount_point_of(rule.compiled.prefix, points) for rule in self.rules if rule.compiled.prefix}

    def _mounts_changed(self) -> None:
        current = {point for _, point, _ in local_mounts(include_pseudo=True)}
        gone = [p for p in self._marked if p not in current]
        for point in gone:
            del self._marked[point]
            if self.fire_volume_events & c.FS_MOUNT_CONTROL:
                self._fire_simple("after_filter_detach_from_volume", volume_name=point)
            if self.fire_volume_events & c.FS_MOUNT_NOTIFY:
                self._post_simple("notify_filter_detach_from_volume", volume_name=point)
        self._mounts.refresh()
        self._resolver.forget_directories()
        with self._lock:
            self._sync_marks()

    # -- rules

    def _check_notify(self, flags: int) -> int:
        if not isinstance(flags, int) or isinstance(flags, bool):
            raise CBFSFilterError(errno.EINVAL, f"notify_flags must be an int, not {type(flags).__name__}")
        if flags < 0:
            return flags & _NOTIFY_KNOWN
        if flags & ~_NOTIFY_KNOWN:
            raise CBFSFilterError(errno.EINVAL, f"notify_flags 0x{flags:x} has bits no FS_NE_* flag defines")
        return flags

    def _add(self, rules: RuleSet, mask: str, notify: int, ea_name: str = "", min_size: int = -1,
             max_size: int = -1, included: int = 0, excluded: int = 0) -> bool:
        notify = self._check_notify(notify)
        if not isinstance(mask, str):
            raise CBFSFilterError(errno.EINVAL, "mask must be a string")
        try:
            changed = rules.add(mask, 0, 0, notify, ea_name, min_size, max_size, included, excluded)
        except (MaskError, ValueError) as exc:
            raise CBFSFilterError(errno.EINVAL, f"bad mask {mask!r}: {exc}") from exc
        if self._group is not None:
            with self._lock:
                self._sync_marks()
        return changed

    def add_filter_rule(self, mask: str, notify_flags: int) -> bool:
        return self._add(self.rules, mask, notify_flags)

    def add_filter_rule_ex(self, mask: str, ea_name: str, notify_flags: int, min_size: int, max_size: int,
                           included_attributes: int, excluded_attributes: int) -> bool:
        return self._add(self.rules, mask, notify_flags, ea_name or "", min_size, max_size, included_attributes,
                         excluded_attributes)

    def add_passthrough_rule(self, mask: str, notify_flags: int) -> bool:
        return self._add(self.passthrough_rules, mask, notify_flags)

    def add_passthrough_rule_ex(self, mask: str, ea_name: str, notify_flags: int, min_size: int, max_size: int,
                                included_attributes: int, excluded_attributes: int) -> bool:
        return self._add(self.passthrough_rules, mask, notify_flags, ea_name or "", min_size, max_size,
                         included_attributes, excluded_attributes)

    def _delete(self, rules: RuleSet, mask: str, notify: int) -> bool:
        notify = self._check_notify(notify)
        try:
            return rules.delete(mask, 0, 0, notify)
        except MaskError as exc:
            raise CBFSFilterError(errno.EINVAL, f"bad mask {mask!r}: {exc}") from exc

    def delete_filter_rule(self, mask: str, notify_flags: int) -> bool:
        return self._delete(self.rules, mask, notify_flags)

    def delete_passthrough_rule(self, mask: str, notify_flags: int) -> bool:
        return self._delete(self.passthrough_rules, mask, notify_flags)

    def delete_all_filter_rules(self) -> bool:
        return self.rules.clear()

    def delete_all_passthrough_rules(self) -> bool:
        return self.passthrough_rules.clear()

    def is_file_filtered(self, file_name: str) -> bool:
        m = match_path(self.rules, self.passthrough_rules, os.path.abspath(file_name))
        return bool(m.upper.notify)

    def file_matches_mask(self, mask: str, file_name: str, case_sensitive: bool = True) -> bool:
        try:
            return file_matches_mask(mask, file_name, case_sensitive)
        except MaskError as exc:
            raise CBFSFilterError(errno.EINVAL, f"bad mask {mask!r}: {exc}") from exc

    # -- inside handlers

    def _origin(self) -> dispatch.Origin:
        job = dispatch.current_job()
        if job is None or job.origin is None:
            raise CBFSFilterError(errno.EINVAL, "get_originator_* works only inside an event handler")
        return job.origin

    def get_originator_process_id(self) -> int:
        return self._origin().pid

    def get_originator_thread_id(self) -> int:
        return self._origin().tid

    def get_originator_process_name(self) -> str:
        return self._origin().name or ""

    def get_handle_creator_process_id(self) -> int:
        return self.get_originator_process_id()

    def get_handle_creator_thread_id(self) -> int:
        return self.get_originator_thread_id()

    def get_handle_creator_process_name(self) -> str:
        return self.get_originator_process_name()

    def get_volume_guid(self) -> str:
        return ""

    # -- the reader

    def _read_loop(self, group: NotifyGroup) -> None:
        while True:
            try:
                events = group.read(1000)
            except OSError as exc:
                if group.closed:
                    return
                self._fire_error(exc.errno or errno.EIO, f"reading fanotify events failed: {exc}")
                time.sleep(0.1)
                continue
            if events is None:
                return
            if group.mounts_changed:
                group.mounts_changed = False
                try:
                    self._mounts_changed()
                except Exception as exc:  # a volume event must not end the reader
                    self._fire_error(errno.EIO, f"following a mount change failed: {exc}")
            try:
                # Names first, for the whole batch: a short-lived process may be gone by the time its
                # record's path is rebuilt.
                names = {ev.pid: self._names.name(ev.pid, ev.pidfd) for ev in events if ev.pid > 0}
                for event in events:
                    self.records += 1
                    try:
                        self._deliver(event, names.get(event.pid, ""))
                    except Exception as exc:
                        log.exception("an event record could not be delivered")
                        self._fire_error(errno.EIO, f"an event record could not be delivered: {exc}")
            finally:
                close_fds(events)

    def _deliver(self, ev: Event, name: str) -> None:
        mask = ev.mask
        if mask & fa.FAN_Q_OVERFLOW:
            self.lost_events += 1
            self._resolver.forget_directories()  # a rename may be among what was lost
            self._fire_error(errno.ENOBUFS, "the fanotify queue overflowed: events were lost (raise the consumer's "
                                            "speed or config('UnlimitedQueue=true'))")
            return
        if mask & fa.FAN_FS_ERROR:
            self._fire_error(ev.error or errno.EIO, "a watched file system reported an error")
            return
        if libc.is_own_process(ev.pid) and self._config["FilterOwnRequests"] != "true":
            if mask & _DIRECTORY_CHANGES and mask & fa.FAN_ONDIR:
                self._resolver.forget_directories()
            return
        is_dir = bool(mask & fa.FAN_ONDIR)
        resolver = self._resolver
        if mask & fa.FAN_RENAME:
            old = resolver.entry_path(*ev.old) if ev.old else None
            new = resolver.entry_path(*ev.new) if ev.new else None
            if is_dir:
                resolver.forget_directories()
            if old is not None or new is not None:
                self._rename(old or "", new or "", _Process(ev.pid, name))
            mask &= ~fa.FAN_RENAME
        if not mask & ~fa.FAN_ONDIR:
            return
        if ev.directory is not None and ev.name is not None:
            path = resolver.entry_path(ev.directory, ev.name)
        elif ev.object is not None:
            path = resolver.object_path(ev.object, directory=is_dir)
        else:
            path = None
        if mask & fa.FAN_DELETE and is_dir:
            resolver.forget_directories()
        if path is None:
            return
        m = match_path(self.rules, self.passthrough_rules, path)
        if not m.upper.notify:
            return  # most records end here: nothing below is built for them
        process = _Process(ev.pid, name)
        notify = (m.flags(process, _PathFacts(path)) if not m.unconditional else m.upper).notify
        if not notify:
            return
        origin = dispatch.Origin(ev.pid, ev.pid, -1, -1, name)
        post = self._post
        if mask & fa.FAN_CREATE:
            if notify & c.FS_NE_CREATE_HARD_LINK and not is_dir and self._is_new_link(ev):
                post("notify_create_hard_link", c.FS_NE_CREATE_HARD_LINK, notify, origin, file_name="",
                     link_name=path)
            else:
                attrs = c.FILE_SYS_ATTR_DIRECTORY if is_dir else 0
                post("notify_create_file", c.FS_NE_CREATE, notify, origin, file_name=path, attributes=attrs,
                     desired_access=UNKNOWN, create_disposition=c.FILE_DISPOSITION_CREATE_NEW, options=UNKNOWN)
        if mask & (fa.FAN_OPEN | fa.FAN_OPEN_EXEC):
            access = c.DESIRED_ACCESS_FILE_EXECUTE if mask & fa.FAN_OPEN_EXEC else UNKNOWN
            post("notify_open_file", c.FS_NE_OPEN, notify, origin, file_name=path, desired_access=access,
                 attributes=c.FILE_SYS_ATTR_DIRECTORY if is_dir else 0, options=UNKNOWN,
                 create_disposition=c.FILE_DISPOSITION_OPEN_EXISTING)
        if mask & fa.FAN_ACCESS:
            if is_dir:
                post("notify_enumerate_directory", c.FS_NE_ENUMERATE_DIRECTORY, notify, origin, directory_name=path,
                     file_name="", size=UNKNOWN, allocation_size=UNKNOWN, file_id=UNKNOWN, attributes=UNKNOWN)
            else:
                post("notify_read_file", c.FS_NE_READ, notify, origin, file_name=path, position=UNKNOWN,
                     bytes_to_read=UNKNOWN, direction=UNKNOWN)
        if mask & fa.FAN_MODIFY:
            post("notify_write_file", c.FS_NE_WRITE, notify, origin, file_name=path, position=UNKNOWN,
                 bytes_to_write=UNKNOWN, bytes_written=UNKNOWN, direction=UNKNOWN)
        if mask & fa.FAN_ATTRIB:
            post("notify_set_file_attributes", c.FS_NE_SET_ATTRIBUTES, notify, origin, file_name=path,
                 attributes=UNKNOWN)
            post("notify_set_file_security", c.FS_NE_SET_SECURITY, notify, origin, file_name=path,
                 security_information=UNKNOWN)
        if mask & fa.FAN_DELETE:
            post("notify_delete_file", c.FS_NE_DELETE, notify, origin, file_name=path)
        if mask & fa.FAN_CLOSE:
            post("notify_close_file", c.FS_NE_CLOSE, notify, origin, file_name=path)

    def _rename(self, old: str, new: str, process: _Process) -> None:
        notify = 0
        for path in (old, new):
            if path:
                m = match_path(self.rules, self.passthrough_rules, path)
                if m.upper.notify:
                    notify |= (m.flags(process, _PathFacts(path)) if not m.unconditional else m.upper).notify
        if notify:
            origin = dispatch.Origin(process.pid, process.pid, -1, -1, process.name)
            self._post("notify_rename_or_move_file", c.FS_NE_RENAME, notify, origin, file_name=old,
                       new_file_name=new, replace_if_exists=True)

    def _is_new_link(self, ev: Event) -> bool:
        """A created name of an object that has other names: a hard link (the record carries the object)."""
        if ev.object is None:
            return False
        mount_fd = self._mounts.open_mount(ev.object.fsid)
        if mount_fd is None:
            return False
        try:
            fd = fan.open_by_handle(mount_fd, ev.object.handle_type, ev.object.handle)
        except OSError:
            return False
        finally:
            os.close(mount_fd)
        try:
            st = os.fstat(fd)
        except OSError:
            return False
        finally:
            os.close(fd)
        return stat.S_ISREG(st.st_mode) and st.st_nlink > 1

    def _post(self, event: str, bit: int, notify: int, origin: dispatch.Origin, **fields: Any) -> None:
        if not notify & bit:
            return
        handler = self.handler(event)
        if handler is None:
            return
        self.dispatcher.post(handler, MONITOR_PARAMS[event](**fields), origin)

    # -- the monitor's own events

    def _fire_simple(self, event: str, **fields: Any) -> Any:
        handler = self.handler(event)
        if handler is None:
            return None
        params = MONITOR_PARAMS[event](**fields)
        try:
            handler(params)
        except Exception as exc:
            self._fire_error(errno.EIO, f"on_{event} raised {type(exc).__name__}: {exc}")
        return params

    def _post_simple(self, event: str, **fields: Any) -> None:
        handler = self.handler(event)
        if handler is not None:
            self.dispatcher.post(handler, MONITOR_PARAMS[event](**fields), None)

    @property
    def stats(self) -> dict[str, int]:
        d = self.dispatcher.stats
        return {"records": self.records, "lost_events": self.lost_events,
                "notifications_posted": d.notifications_posted, "notifications_delivered": d.notifications_delivered,
                "notifications_queued": self.dispatcher.queued_notifications,
                "directory_lookups": self._resolver.misses}

