"""CBFilter: the SDK's file-system filter class on Linux.

Rules say which paths matter and what for; the filter mounts itself (FUSE, over the directory itself)
on the directories the rules name — the attach points — and serves every request there, firing the
events the rules ask for. Files no rule's read/write flags can match keep kernel passthrough I/O.
"""

from __future__ import annotations

import errno
import io
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from fsfilter._engine import dispatch
from fsfilter._engine.masks import MaskError, file_matches_mask
from fsfilter._engine.reparse import ReparseRules
from fsfilter._engine.rules import RuleSet
from fsfilter._layers.filter import FilterLayer
from fsfilter._sessions.fanotify_session import local_mounts
from fsfilter._system import libc, procfs
from fsfilter._system.procfs import ProcessInfo
from fsfilter.api import _control, _rulesfiles, events, fileinfo
from fsfilter.api import _stacks as stacks
from fsfilter.api import constants as c
from fsfilter.api import params as ev
from fsfilter.api._attached import RemoteSubject, ServiceLink, rule_list
from fsfilter.api._denials import DenialLog
from fsfilter.api._deployment import Deployment
from fsfilter.api._event_source import RuleTables, check_thread_count, check_timeout, split_setting
from fsfilter.api._fanotify_access import FANOTIFY_ACCESS, FanotifyAccess
from fsfilter.api._rulesfiles import FORBIDDEN_ATTACH
from fsfilter.api.params import FILTER_PARAMS
from fsfilter.api.passthrough import check_filterable
from fsfilter.errors import CBFSFilterError

__all__ = ["CBFSFilterStream", "CBFilter", "EVENT_BITS", "NOTIFY_BITS"]  # its event-parameter classes are in params.py

log = logging.getLogger("fsfilter")

MAX_ATTACH_POINTS = 64

# Which rule flag each event needs (control flags for before/after events, notify flags for notify events), from
# the event table.
EVENT_BITS: dict[str, int] = events.control_bits()
NOTIFY_BITS: dict[str, int] = events.notify_bits()
_CONFIG_DEFAULTS: dict[str, str] = {
    "FilterOwnRequests": "false", "MinWorkerThreadCount": "1", "MaxWorkerThreadCount": "0",
    "DenyExpiredEvents": "false", "ModifiableReadWriteBuffers": "true", "AllowFileAccessInBeforeOpen": "true",
    "EntryTimeout": "60", "AttrTimeout": "60", "NegativeTimeout": "10", "KernelPassthrough": "true",
    "AccessViaFanotify": "false", "HideDirectoryLinkCounts": "true", "RequestTimeout": "45",
    "Permissive": "false", "LogDenials": "true", "Service": "auto", "ServiceReconnect": "60",
    "CheckFileAccessInDirectIO": "false",
}
# Service=auto: run in fsfilterd's stack when the service runs (and the filter can run there), else in this process;
# on: only in the service (start_filter fails without it); off: always in this process.
_SERVICE_MODES = ("auto", "on", "off")
_START_ORDER = itertools.count(1)
_LOCAL = object()  # a rule kept by this object, not by fsfilterd
# Events of the filter itself: fired in the application whether it runs embedded or in the service.
_LOCAL_EVENTS = frozenset({"error", "filter_start", "filter_stop", "worker_thread_creation",
                           "worker_thread_termination"})
_COUNT_SETTINGS = {"MinWorkerThreadCount", "MaxWorkerThreadCount"}
_BOOL_SETTINGS = {"FilterOwnRequests", "DenyExpiredEvents", "ModifiableReadWriteBuffers",
                  "AllowFileAccessInBeforeOpen", "KernelPassthrough", "AccessViaFanotify", "HideDirectoryLinkCounts",
                  "Permissive", "LogDenials", "CheckFileAccessInDirectIO"}
# Refusals of every filter of the process that has no log of its own go here (one rate limit per process).
_PROCESS_DENIALS = DenialLog()


def _check_flags(name: str, value: int, known: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CBFSFilterError(errno.EINVAL, f"{name} must be an int, not {type(value).__name__}")
    if value < 0:  # -1 (the SDK's "all flags"), or all but some: FS_NE_ALL & ~FS_NE_READ
        return value & known
    if value & ~known:
        raise CBFSFilterError(errno.EINVAL, f"{name} 0x{value:x} has bits no flag defines (known: 0x{known:x}); "
                                            "combine the module's constants with |")
    return value


_SETTABLE = frozenset({"altitude", "strict_altitude", "serialize_events", "tag", "fire_volume_events",
                       "process_cached_io_requests", "process_failed_requests", "serialize_access",
                       "file_flushing_behavior"})
_PROPERTIES = _SETTABLE | {"active", "filter_rule_count", "passthrough_rule_count", "attach_point_count"}

# The SDK's desired access (a Windows access mask, as the events carry it) in open(2) terms.
_READ_ACCESS = (c.DESIRED_ACCESS_FILE_READ_DATA | c.DESIRED_ACCESS_FILE_EXECUTE | 0x80000000  # GENERIC_READ
                | 0x20000000 | 0x10000000 | 0x02000000)  # GENERIC_EXECUTE, GENERIC_ALL, MAXIMUM_ALLOWED
_WRITE_ACCESS = (c.DESIRED_ACCESS_FILE_WRITE_DATA | c.DESIRED_ACCESS_FILE_APPEND_DATA | 0x40000000  # GENERIC_WRITE
                 | 0x10000000 | 0x02000000)


def _open_flags_of(desired_access: int) -> int:
    """open(2) access flags for an SDK desired-access mask: data read and/or write; append-only when only
    FILE_APPEND_DATA asks for writing; O_PATH when no data access is asked (attributes, delete, synchronize)."""
    if isinstance(desired_access, bool) or not isinstance(desired_access, int) or not 0 <= desired_access <= 0xFFFFFFFF:
        raise CBFSFilterError(errno.EINVAL, f"desired_access {desired_access!r} is not an access mask: give "
                                            "DESIRED_ACCESS_* values (as the events carry them), or-ed together")
    reads, writes = bool(desired_access & _READ_ACCESS), bool(desired_access & _WRITE_ACCESS)
    if reads and writes:
        flags = os.O_RDWR
    elif writes:
        flags = os.O_WRONLY
    elif reads:
        return os.O_RDONLY
    else:
        return os.O_PATH
    only_append = desired_access & c.DESIRED_ACCESS_FILE_APPEND_DATA and not desired_access & (
        c.DESIRED_ACCESS_FILE_WRITE_DATA | 0x40000000 | 0x10000000 | 0x02000000)
    return flags | (os.O_APPEND if only_append else 0)


_DISPOSITION_FLAGS = {
    c.FILE_DISPOSITION_CREATE_NEW: os.O_CREAT | os.O_EXCL,
    c.FILE_DISPOSITION_CREATE_ALWAYS: os.O_CREAT | os.O_TRUNC,
    c.FILE_DISPOSITION_OPEN_EXISTING: 0,
    c.FILE_DISPOSITION_OPEN_ALWAYS: os.O_CREAT,
    c.FILE_DISPOSITION_TRUNCATE_EXISTING: os.O_TRUNC,
}


class CBFSFilterStream(io.FileIO):
    """The stream create_file_direct_as_stream returns: an unbuffered binary file on the direct fd (read, write,
    seek, tell, flush, close, a context manager), with the SDK's ``length``: the file's size, which setting changes
    (truncating or extending it)."""

    @property
    def length(self) -> int:
        return os.fstat(self.fileno()).st_size

    @length.setter
    def length(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CBFSFilterError(errno.EINVAL, f"length must be a size in bytes, not {value!r}")
        try:
            os.ftruncate(self.fileno(), value)
        except OSError as exc:
            raise CBFSFilterError.from_os_error(exc, "cannot set the length of the direct stream") from exc


def _real_parent(file_name: str) -> str:
    """An absolute path whose directory has no symlink left (what attach points are compared with)."""
    path = os.path.abspath(file_name)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


class CBFilter(Deployment, RuleTables):
    """Filters file operations below the directories its rules name. See docs/api.md for every member."""

    _handlers_ready = False
    # CBEncrypt's policy when this filter serves a CBEncrypt (its layer then gives trusted processes plaintext views:
    # see _layers/filter_isolation.py EncryptionPolicy); None for a plain CBFilter.
    encryption: Any = None

    def __init__(self) -> None:
        object.__setattr__(self, "_handlers_ready", False)
        self.rules = RuleSet()
        self.passthrough_rules = RuleSet()
        self.reparse = ReparseRules()
        self._fanotify: FanotifyAccess | None = None
        self._reparse_snapshot: list[tuple[str, str]] | None = None
        self.control_handlers = 0
        self.notify_handlers = 0
        self.tag = 0
        self.altitude = "360000"
        self._altitude = 360000.0  # parsed at start
        self._start_seq = 0  # when it was started, among all filters of the process (equal altitudes keep this order)
        self.strict_altitude = False
        self.serialize_events = c.SERIALIZE_EVENTS_ON_MULTIPLE_THREADS
        self.fire_volume_events = c.FS_MOUNT_IGNORE
        self.process_cached_io_requests = False
        self.process_failed_requests = False
        self.serialize_access = False
        self.file_flushing_behavior = 0
        self._config = dict(_CONFIG_DEFAULTS)
        self._attach_points: list[str] = []
        self._attached: dict[str, stacks.Attachment] = {}  # attach point -> the filter's layer in its mount's stack
        self._virtual_files: dict[str, int] = {}  # path -> mode: the virtual files the application added
        self._product_guid = ""
        self._timeout_ms = 0
        self.denial_log = _PROCESS_DENIALS  # the service gives its filters the service's log
        self.label = f"CBFilter of pid {os.getpid()}"  # names the filter in the denial log and fsfilter status
        self._default_snapshot: list[tuple[str, int]] | None = None
        # What became of mounts that programs still used when the filter stopped (served by a keeper until they
        # leave): for the command line to tell. Empty when the mounts simply went.
        self.stop_report = ""
        self._service_link: ServiceLink | None = None  # attached to fsfilterd's stack
        self._resume_token = ""  # given by fsfilterd: takes back the filter it keeps across its restart
        self._reattaching = False
        self.owner_pid = 0  # set by the service for an application's filter it runs
        self.denials = 0  # requests its access rules refused (or, when permissive, would have refused)
        # Start, stop and attach points; taken before the stacks' registry lock (api/_stacks.py), never while a
        # stack's lock is held (a lost mount tells its filters on a thread of its own, after letting go).
        self._lock = threading.RLock()
        self._active = False
        self.dispatcher = dispatch.Dispatcher(self._fire_error, self._thread_event)
        for name in list(FILTER_PARAMS):
            object.__setattr__(self, "on_" + name, None)
        object.__setattr__(self, "_handlers_ready", True)

    # Handlers are plain attributes (``f.on_before_open_file = fn``); keep the bit masks of assigned ones,
    # which decide routing and caching, in step.
    def __setattr__(self, name: str, value: Any) -> None:
        handler = name.startswith("on_") and self._handlers_ready
        if handler:
            if name[3:] not in FILTER_PARAMS:
                raise CBFSFilterError(errno.EINVAL, f"CBFilter has no event {name[3:]!r}: see docs/api.md")
            if value is not None and not callable(value):
                raise CBFSFilterError(errno.EINVAL, f"{name} takes a function of one argument or None")
        object.__setattr__(self, name, value)
        if handler:
            self._recompute_handler_bits()

    def _recompute_handler_bits(self) -> None:
        control = notify = 0
        for event, bit in EVENT_BITS.items():
            if getattr(self, "on_" + event, None) is not None:
                control |= bit
        for event, bit in NOTIFY_BITS.items():
            if getattr(self, "on_" + event, None) is not None:
                notify |= bit
        object.__setattr__(self, "control_handlers", control)
        object.__setattr__(self, "notify_handlers", notify)

    def handler(self, event: str) -> Callable[[Any], object] | None:
        h: Callable[[Any], object] | None = getattr(self, "on_" + event, None)
        return h

    # -- state used by the request handlers

    @property
    def has_rules(self) -> bool:
        return bool(len(self.rules) or len(self.passthrough_rules) or len(self.reparse))

    @property
    def rules_generation(self) -> int:
        return self.rules.generation + self.passthrough_rules.generation + self.reparse.generation

    @property
    def filter_own_requests(self) -> bool:
        return self.config_bool("FilterOwnRequests")

    @property
    def deny_expired_events(self) -> bool:
        return self.config_bool("DenyExpiredEvents")

    def wants_lock_requests(self) -> bool:
        """Whether attach points serve fcntl/flock locks themselves (so that lock events can fire): when a lock
        handler is set as the filter starts. Otherwise the kernel keeps locks and the daemon never sees them
        (and closes cost no FLUSH round trip)."""
        return bool(self.control_handlers & (c.FS_CE_BEFORE_LOCK_CONTROL | c.FS_CE_AFTER_LOCK_CONTROL)
                    or self.notify_handlers & c.FS_NE_LOCK_CONTROL)

    def worker_threads(self) -> int:
        count = int(self._config["MaxWorkerThreadCount"])
        return count if count > 0 else max(4, 4 * (os.cpu_count() or 1))

    # -- SDK lifecycle

    def initialize(self, product_guid: str) -> None:
        """Records the product id (Linux needs no driver binding). Checks that FUSE is usable."""
        if not isinstance(product_guid, str):
            raise CBFSFilterError(errno.EINVAL, "product_guid must be a string")
        self._product_guid = product_guid

    @property
    def active(self) -> bool:
        return self._active

    def get_active(self) -> bool:
        return self._active

    # The SDK's accessor style, next to the plain attributes: f.get_tag(), f.set_tag(7), ...
    def __getattr__(self, name: str) -> Any:  # only reached for names that are not attributes
        prop = name[4:]
        if name.startswith("get_") and prop in _PROPERTIES:
            return lambda: getattr(self, prop)
        if name.startswith("set_") and prop in _SETTABLE:
            return lambda value: setattr(self, prop, value)
        raise AttributeError(f"CBFilter has no attribute {name!r}")

    def start_filter(self, timeout: int = 0) -> None:
        """Mount on every attach point and start firing events. ``timeout``: ms a control event may take
        (0 = no limit)."""
        with self._lock:
            if self._active:
                raise CBFSFilterError(errno.EALREADY, "the filter is already started; call stop_filter first")
            if os.geteuid() != 0:
                raise CBFSFilterError(errno.EPERM, "CBFilter mounts over directories and needs root (CAP_SYS_ADMIN)")
            check_timeout(timeout)
            self._altitude = stacks.parse_altitude(self.altitude)
            self._start_seq = next(_START_ORDER)
            points = self._wanted_attach_points()
            guarded = [r for r in self.rules if self._via_fanotify(r)]
            if not points and not guarded:
                raise CBFSFilterError(errno.EINVAL, "no rule names a directory to filter: add a rule with an "
                                                    "absolute mask (e.g. /srv/data/*) or call add_attach_point")
            self._timeout_ms = timeout
            link = self._service_link_for(points, guarded)
            if link is not None:
                self._start_attached(link, timeout)
                return
            d = self.dispatcher
            d.timeout = timeout / 1000.0
            d.serialize = self.serialize_events == c.SERIALIZE_EVENTS_ON_ONE_WORKER_THREAD
            d.min_threads = max(1, int(self._config["MinWorkerThreadCount"]))
            d.max_threads = max(d.min_threads, self.worker_threads())
            d.start()
            self._active = True
            try:
                if guarded:
                    self._start_fanotify_access(guarded)
                for path in points:
                    self._attach(path)
            except BaseException:
                self._detach_all()
                self._stop_fanotify_access()
                d.stop(1.0)
                self._active = False
                raise
            self._fire_simple("filter_start")

    def _service_link_for(self, points: list[str], guarded: list[Any]) -> ServiceLink | None:
        """A connection to fsfilterd when this filter is to run in its stack (Service setting), else None."""
        mode = self._config["Service"]
        if mode == "off":
            return None
        why_not = ("reparse rules" if len(self.reparse) else "AccessViaFanotify rules" if guarded else
                   "FilterOwnRequests" if self.filter_own_requests else "")
        if why_not:
            if mode == "on":
                raise CBFSFilterError(errno.EINVAL, f"a filter with {why_not} runs in the application only: set "
                                                    "Service=auto or off")
            return None
        channel = _control.connect(timeout=5.0)
        if channel is None:
            if mode == "on":
                raise CBFSFilterError(errno.ECONNREFUSED, f"Service=on, but fsfilterd is not running (no socket at "
                                                          f"{_control.socket_path()}): start it, or set Service=auto")
            return None
        return ServiceLink(self, channel)

    def _start_attached(self, link: ServiceLink, timeout: int) -> None:
        d = self.dispatcher
        d.timeout = 0.0  # the service keeps each event's deadline
        d.serialize = self.serialize_events == c.SERIALIZE_EVENTS_ON_ONE_WORKER_THREAD
        d.min_threads = max(1, int(self._config["MinWorkerThreadCount"]))
        d.max_threads = max(d.min_threads, self.worker_threads())
        d.start()
        try:
            points = self._attach_over(link, timeout)
        except BaseException:
            link.close()
            d.stop(1.0)
            raise
        self._active = True
        log.info("filter attached to fsfilterd's stack on %s", ", ".join(points))
        self._fire_simple("filter_start")

    def _attach_over(self, link: ServiceLink, timeout: int) -> list[str]:
        """Send the filter to fsfilterd (again, after a restart of the service: with the token that takes back the
        filter it kept meanwhile); returns the attach points."""
        handlers = [event for event in FILTER_PARAMS if self.handler(event) is not None
                    and event not in _LOCAL_EVENTS]
        spec = {"altitude": self.altitude, "strict_altitude": self.strict_altitude, "tag": self.tag,
                "timeout_ms": timeout, "label": self.label, "handlers": handlers,
                "rules": rule_list(self.rules), "passthrough_rules": rule_list(self.passthrough_rules),
                "attach_points": list(self._attach_points),
                "process_failed_requests": self.process_failed_requests,
                "process_cached_io_requests": self.process_cached_io_requests,
                "config": {k: v for k, v in self._config.items() if k != "Service"}}
        if self._resume_token:
            spec["resume"] = self._resume_token
        result = link.request("attach", spec)
        link.handle = int(result["handle"])
        self._resume_token = str(result.get("resume_token") or "")
        if isinstance(result.get("events_token"), str):
            link.open_event_line(result["events_token"])
        self._service_link = link
        return list(result.get("attach_points", []))

    def _service_lost(self) -> None:
        """fsfilterd closed the connection while the filter ran. A restarting service hands its filter to the next
        one, which keeps the rules in force and the events waiting: attach again, to whichever fsfilterd now
        listens, for up to ServiceReconnect seconds; then the filter stops and says why."""
        with self._lock:
            if not self._active or self._service_link is None or self._reattaching:
                return  # stopped, or a reattach is under way (and this was a connection it tried)
            self._reattaching = True
        threading.Thread(target=self._reattach, name="fsfilter-reattach", daemon=True).start()

    def _reattach(self) -> None:
        try:
            self._attach_again()
        finally:
            self._reattaching = False

    def _attach_again(self) -> None:
        lost = self._service_link
        deadline = time.monotonic() + float(self._config["ServiceReconnect"])
        why = "no fsfilterd listens"
        while time.monotonic() < deadline:
            if not self._active or self._service_link is not lost:
                return  # stopped meanwhile
            channel = _control.connect(timeout=2.0)
            if channel is not None:
                link = ServiceLink(self, channel)
                try:
                    points = self._attach_over(link, self._timeout_ms)
                except Exception as exc:
                    link.close()
                    why = exc.message if isinstance(exc, CBFSFilterError) else f"{type(exc).__name__}: {exc}"
                else:
                    with self._lock:
                        stopped = not self._active
                    if stopped:  # stop_filter ran meanwhile: the service must not keep the filter
                        try:
                            link.request("detach", {"handle": link.handle}, timeout=10.0)
                        except CBFSFilterError:
                            pass
                        link.close()
                        return
                    if lost is not None:
                        lost.close()
                    log.info("fsfilterd restarted: filter attached again on %s", ", ".join(points))
                    return
            time.sleep(0.1)
        self._fire_error(errno.ENOTCONN, f"fsfilterd went away and did not come back within "
                                         f"{self._config['ServiceReconnect']} s ({why}); the filter stopped: start "
                                         "it again")
        self.stop_filter(wait=False)

    @property
    def attached_to_service(self) -> bool:
        """Whether the filter runs in fsfilterd's stack (else in this process)."""
        return self._service_link is not None

    def _attachment_lost(self, path: str, reason: str) -> None:
        """An attach point's mount went away under the filter (unmounted, or its connection aborted): the rules
        no longer hold there, so the filter stops as a whole, says why through on_error, and is no longer
        active — rather than run on, looking active, over a directory that answers ENOTCONN."""
        with self._lock:
            if not self._active or path not in self._attached:
                return
            self._fire_error(errno.ENOTCONN, f"{reason}; the filter stopped: start it again to filter {path}")
            self.stop_filter(wait=False)

    def _start_fanotify_access(self, rules: list[Any]) -> None:
        try:
            guard = FanotifyAccess(self.rules, self.passthrough_rules, lambda: self.filter_own_requests,
                                   self._fire_error)
        except OSError as exc:
            raise CBFSFilterError.from_os_error(exc, "fanotify permission events are not available (a kernel "
                                                "with CONFIG_FANOTIFY_ACCESS_PERMISSIONS is needed)") from exc
        self._fanotify = guard
        paths = [r.compiled.prefix for r in rules if r.compiled.prefix]
        if any(r.compiled.prefix is None for r in rules):
            paths += [point for root, point, _ in local_mounts(include_pseudo=False) if root == "/"]
        try:
            guard.mark(paths)
        except OSError as exc:
            raise CBFSFilterError.from_os_error(exc, "cannot put fanotify permission marks on the file systems "
                                                "of the rules") from exc
        log.info("fanotify permission marks on the file systems of: %s", ", ".join(guard.marked))
        guard.start()

    def _stop_fanotify_access(self) -> None:
        guard, self._fanotify = self._fanotify, None
        if guard is not None:
            guard.stop()

    def stop_filter(self, wait: bool = True) -> None:
        """Unmount every attach point, deliver queued notifications, fire on_filter_stop."""
        with self._lock:
            if not self._active:
                return
            link, self._service_link = self._service_link, None
            if link is not None:
                try:
                    link.request("detach", {"handle": link.handle}, timeout=10.0)
                except CBFSFilterError:
                    pass  # the service is gone: so is the layer
                link.close()
            mounts = [a.stack for a in self._attached.values()]
            self._detach_all()
            self.stop_report = "; ".join(m.report for m in mounts if m.report)
            self._stop_fanotify_access()
            self.dispatcher.stop(10.0 if wait else 1.0)
            self._active = False
            self._fire_simple("filter_stop")

    def __enter__(self) -> CBFilter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_filter()

    # -- attach points

    def add_attach_point(self, path: str) -> None:
        """A directory to filter besides those the rules' masks name (needed for masks without a path,
        like ``*.doc``). Linux extension."""
        real = self._check_attach_path(path)
        with self._lock:
            if real not in self._attach_points:
                if len(self._attach_points) >= MAX_ATTACH_POINTS:
                    raise CBFSFilterError(errno.ENOSPC, f"a filter has at most {MAX_ATTACH_POINTS} attach points (each "
                                                        "is a mount with its own threads): attach a common parent")
                self._attach_points.append(real)
            if self._active:
                self._sync_attachments()

    def delete_attach_point(self, path: str) -> bool:
        real = os.path.realpath(path)
        with self._lock:
            if real in self._attach_points:
                self._attach_points.remove(real)
                return True
        return False

    def _attach_point_list(self) -> list[str]:
        """While active, the directories mounted over; before, those start_filter would mount over."""
        with self._lock:
            return sorted(self._attached) if self._active else self._wanted_attach_points()

    @property
    def permission_marks(self) -> list[str]:
        """The mount points (one per file system) the fanotify permission group of the AccessViaFanotify rules
        marked at start; empty when none. A rule without a fixed prefix marks every local file system."""
        guard = self._fanotify
        return list(guard.marked) if guard is not None else []

    @property
    def attach_point_count(self) -> int:
        return len(self._attach_point_list())

    def get_attach_point(self, index: int) -> str:
        points = self._attach_point_list()
        if not isinstance(index, int) or not 0 <= index < len(points):
            raise CBFSFilterError(errno.EINVAL, f"attach point index {index!r} is out of range: there are "
                                                f"{len(points)} (attach_point_count)")
        return points[index]

    def _check_attach_path(self, path: str) -> str:
        if not isinstance(path, str) or not path.startswith("/"):
            raise CBFSFilterError(errno.EINVAL, f"an attach point must be an absolute path, not {path!r}")
        real = os.path.realpath(path)
        if real in FORBIDDEN_ATTACH:
            raise CBFSFilterError(errno.EPERM, f"fsfilter does not mount over {real}: name a directory below it")
        if not os.path.isdir(real):
            raise CBFSFilterError(errno.ENOTDIR, f"{real} is not an existing directory")
        if not self._covered(real) and stacks.stack_for(real) is None:
            check_filterable(real)  # a directory inside a mount of this process joins its stack instead
        return real

    def _covered(self, path: str) -> bool:
        """Whether ``path`` is one of this filter's mounted attach points or lies below one (it needs no mount)."""
        return any(path == q or path.startswith(q.rstrip("/") + "/") for q in self._attached)

    def _wanted_attach_points(self) -> list[str]:
        wanted: set[str] = set(self._attach_points)
        wanted.update(os.path.realpath(os.path.dirname(p)) for p in self._virtual_files)  # their directories
        masks = [(r.compiled, False) for r in list(self.rules) + list(self.passthrough_rules)
                 if not self._via_fanotify(r)]
        masks += [(r.mask, True) for r in self.reparse.rules()]  # a redirected name is resolved in its parent
        for compiled, redirect in masks:
            prefix = compiled.prefix
            if prefix is None:
                continue
            if compiled.literal and not compiled.inverted and not redirect and os.path.isdir(compiled.path_mask):
                # A rule on a directory itself (e.g. its listing): mounted over that directory, whose
                # root the filter then serves. Renaming or deleting the directory itself is not seen.
                prefix = compiled.path_mask
            existing = prefix
            while not os.path.isdir(existing) and existing != "/":
                existing = os.path.dirname(existing)
            real = os.path.realpath(existing)
            if real in FORBIDDEN_ATTACH:
                raise CBFSFilterError(errno.EPERM, f"the mask {compiled.text!r} would make fsfilter mount over {real}: "
                                                   "use a mask below it, or add_attach_point")
            wanted.add(real)
        if not self._attach_points and not wanted and (self.rules.has_unanchored()
                                                        or self.passthrough_rules.has_unanchored()):
            raise CBFSFilterError(errno.EINVAL, "masks without a path (e.g. *.doc) need add_attach_point(dir)")
        # An attach point inside another is covered by it.
        out: list[str] = []
        for p in sorted(wanted):
            if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
                out.append(p)
        for p in out:
            stacks.wait_stopped(p)  # a mount of this process still going away there is no mount to stand on
            if not self._covered(p) and stacks.stack_for(p) is None:
                check_filterable(p)
        if len(out) > MAX_ATTACH_POINTS:
            raise CBFSFilterError(errno.ENOSPC, f"the rules name {len(out)} directories to mount over, more than "
                                                f"{MAX_ATTACH_POINTS}: use masks below a common parent, or "
                                                "add_attach_point(parent)")
        return out

    def _via_fanotify(self, rule: Any) -> bool:
        """Whether a rule is enforced by fanotify permission events (AccessViaFanotify) instead of a mount."""
        return (self._config["AccessViaFanotify"] == "true" and bool(rule.access)
                and not rule.access & ~FANOTIFY_ACCESS and not rule.control and not rule.notify)

    def _sync_attachments(self) -> None:
        for path in self._wanted_attach_points():
            covered = any(path == q or path.startswith(q.rstrip("/") + "/") for q in self._attached)
            if not covered:
                self._attach(path)

    def _attach(self, path: str) -> None:
        volume_control = self.fire_volume_events & c.FS_MOUNT_CONTROL
        volume_notify = self.fire_volume_events & c.FS_MOUNT_NOTIFY
        if volume_control:
            params = self._fire_simple("before_filter_attach_to_volume", volume_name=path)
            if params is not None and params.skip_volume:
                return
        if any(q.startswith(path.rstrip("/") + "/") for q in self._attached):
            raise CBFSFilterError(errno.EBUSY, f"{path} contains an attach point that is already mounted: stop the "
                                               "filter, add the rule, and start it again")
        self._attached[path] = stacks.attach(self, path, self._altitude, bool(self.strict_altitude))
        for name, mode in list(self._virtual_files.items()):
            if name.startswith(path.rstrip("/") + "/"):
                self._place_virtual(name, mode)
        if volume_control:
            self._fire_simple("after_filter_attach_to_volume", volume_name=path)
        if volume_notify:
            self._post_simple("notify_filter_attach_to_volume", volume_name=path)

    def _moved_to(self, path: str, attachment: stacks.Attachment) -> None:
        """The mount serving this filter's attach point ``path`` was taken over by one mounted above it."""
        with self._lock:
            if path in self._attached:
                self._attached[path] = attachment

    def _detach_all(self) -> None:
        for path, mount in sorted(self._attached.items(), reverse=True):
            try:
                stacks.detach(self, mount)
            except Exception as exc:
                log.warning("detaching %s failed: %s", path, exc)
            if self.fire_volume_events & c.FS_MOUNT_CONTROL:
                self._fire_simple("after_filter_detach_from_volume", volume_name=path)
            if self.fire_volume_events & c.FS_MOUNT_NOTIFY:
                self._post_simple("notify_filter_detach_from_volume", volume_name=path)
        self._attached.clear()

    # -- rules

    def _add(self, rules: RuleSet, mask: str, access: int, control: int, notify: int, ea_name: str = "",
             min_size: int = -1, max_size: int = -1, included: int = 0, excluded: int = 0) -> bool:
        access = _check_flags("access_flags", access, c.ACCESS_KNOWN)
        control = _check_flags("control_flags", control, c.FS_CE_KNOWN)
        notify = _check_flags("notify_flags", notify, c.FS_NE_KNOWN)
        if not isinstance(mask, str):
            raise CBFSFilterError(errno.EINVAL, "mask must be a string")
        for name, value in (("min_size", min_size), ("max_size", max_size)):
            if not isinstance(value, int) or value < -1:
                raise CBFSFilterError(errno.EINVAL, f"{name} must be -1 (unused) or a size in bytes, not {value!r}")
        try:
            changed = rules.add(mask, access, control, notify, ea_name, min_size, max_size, included, excluded)
        except MaskError as exc:
            raise CBFSFilterError(errno.EINVAL, f"bad mask {mask!r}: {exc}") from exc
        except ValueError as exc:
            raise CBFSFilterError(errno.EINVAL, str(exc)) from exc
        if self._active:
            try:
                with self._lock:
                    self._sync_attachments()
            except CBFSFilterError:
                rules.delete(mask, access, control, notify)
                raise
            if changed:
                self._rules_changed()
        return changed

    def _rules_changed(self) -> None:
        link = self._service_link
        if link is not None:
            try:
                link.request("set_rules", {"handle": link.handle, "rules": rule_list(self.rules),
                                           "passthrough_rules": rule_list(self.passthrough_rules)})
            except CBFSFilterError as exc:
                if exc.code != errno.ENOTCONN:
                    raise
                # fsfilterd is restarting: attaching again sends every rule as it is now.
                self._service_lost()
            return
        guard = self._fanotify
        if guard is not None:
            guard.forget_cache()  # cached "allow" decisions were made under the old rules
        with self._lock:
            mounts = list(self._attached.values())
        for mount in mounts:
            mount.rules_changed()

    def add_filter_rule(self, mask: str, access_flags: int, control_flags: int, notify_flags: int) -> bool:
        return self._add(self.rules, mask, access_flags, control_flags, notify_flags)

    def add_filter_rule_ex(self, mask: str, ea_name: str, access_flags: int, control_flags: int, notify_flags: int,
                           min_size: int, max_size: int, included_attributes: int, excluded_attributes: int) -> bool:
        return self._add(self.rules, mask, access_flags, control_flags, notify_flags, ea_name or "", min_size,
                         max_size, included_attributes, excluded_attributes)

    def add_passthrough_rule(self, mask: str, access_flags: int, control_flags: int, notify_flags: int) -> bool:
        return self._add(self.passthrough_rules, mask, access_flags, control_flags, notify_flags)

    def add_passthrough_rule_ex(self, mask: str, ea_name: str, access_flags: int, control_flags: int,
                                notify_flags: int, min_size: int, max_size: int, included_attributes: int,
                                excluded_attributes: int) -> bool:
        return self._add(self.passthrough_rules, mask, access_flags, control_flags, notify_flags, ea_name or "",
                         min_size, max_size, included_attributes, excluded_attributes)

    def _delete(self, rules: RuleSet, mask: str, access: int, control: int, notify: int) -> bool:
        access = _check_flags("access_flags", access, c.ACCESS_KNOWN)
        control = _check_flags("control_flags", control, c.FS_CE_KNOWN)
        notify = _check_flags("notify_flags", notify, c.FS_NE_KNOWN)
        if not isinstance(mask, str):
            raise CBFSFilterError(errno.EINVAL, "mask must be a string")
        try:
            changed = rules.delete(mask, access, control, notify)
        except MaskError as exc:
            raise CBFSFilterError(errno.EINVAL, f"bad mask {mask!r}: {exc}") from exc
        if changed and self._active:
            self._rules_changed()
        return changed

    def delete_filter_rule(self, mask: str, access_flags: int, control_flags: int, notify_flags: int) -> bool:
        return self._delete(self.rules, mask, access_flags, control_flags, notify_flags)

    def delete_passthrough_rule(self, mask: str, access_flags: int, control_flags: int, notify_flags: int) -> bool:
        return self._delete(self.passthrough_rules, mask, access_flags, control_flags, notify_flags)

    def delete_all_filter_rules(self) -> bool:
        changed = self.rules.clear()
        if changed and self._active:
            self._rules_changed()
        return changed

    # -- reparse rules: name redirection (engine/reparse.py; they live as long as this object, see docs/api.md)

    def _kept_by_service(self, method: str, params: dict[str, Any]) -> Any:
        """Reparse rules of a root program go to fsfilterd when it runs (Service not off): it keeps them until they
        are deleted or the machine reboots, as the SDK's driver does. _LOCAL when they stay in this object."""
        if self._config["Service"] == "off" or os.geteuid() != 0:
            return _LOCAL
        try:
            return _control.call(method, params)
        except CBFSFilterError as exc:
            if exc.code == errno.ECONNREFUSED and self._config["Service"] == "auto":
                return _LOCAL
            raise

    def add_reparse_rule(self, mask: str, reparse_mask: str, product_guid: str = "", flags: int = 0) -> bool:
        """Paths matching ``mask`` resolve to ``reparse_mask`` (the mask's wildcards fill the target's). Kept by
        fsfilterd when it runs, in this object otherwise (docs/service.md)."""
        if not isinstance(mask, str) or not isinstance(reparse_mask, str):
            raise CBFSFilterError(errno.EINVAL, "mask and reparse_mask must be strings")
        if not isinstance(flags, int):
            raise CBFSFilterError(errno.EINVAL, f"flags must be an int, not {flags!r}")
        kept = self._kept_by_service("add_reparse_rule", {"mask": mask, "target": reparse_mask, "flags": flags,
                                                          "product": product_guid or self._product_guid})
        if kept is not _LOCAL:
            return bool(kept)
        previous = self.reparse.target_of(mask)
        try:
            self.reparse.add(mask, reparse_mask, flags)
        except MaskError as exc:
            raise CBFSFilterError(errno.EINVAL, f"bad reparse rule {mask!r} -> {reparse_mask!r}: {exc}") from exc
        if self._active:
            try:
                with self._lock:
                    self._sync_attachments()
            except CBFSFilterError:
                if previous:
                    self.reparse.add(mask, previous)
                else:
                    self.reparse.delete(mask)
                raise
            self._rules_changed()
        return True

    def delete_reparse_rule(self, mask: str, product_guid: str = "") -> bool:
        kept = self._kept_by_service("delete_reparse_rule", {"mask": mask,
                                                             "product": product_guid or self._product_guid})
        if kept is not _LOCAL:
            return bool(kept)
        changed = self.reparse.delete(mask)
        if changed and self._active:
            self._rules_changed()
        return changed

    def delete_all_reparse_rules(self, product_guid: str = "") -> bool:
        kept = self._kept_by_service("delete_reparse_rule", {"product": product_guid or self._product_guid})
        if kept is not _LOCAL:
            return bool(kept)
        changed = self.reparse.clear()
        if changed and self._active:
            self._rules_changed()
        return changed

    def create_reparse_rules_snapshot(self, product_guid: str = "") -> bool:
        """Freeze the list that reparse_rule_count and get_reparse_rule_* read."""
        self._reparse_snapshot = self._reparse_now(product_guid)
        return True

    def close_reparse_rules_snapshot(self) -> None:
        self._reparse_snapshot = None

    def _reparse_now(self, product_guid: str = "") -> list[tuple[str, str]]:
        if len(self.reparse):  # added while no service ran: this object's
            return [(r.mask.text, r.target) for r in self.reparse.rules()]
        kept = self._kept_by_service("list_reparse_rules", {"product": product_guid})
        if kept is not _LOCAL:
            return [(str(r["mask"]), str(r["target"])) for r in kept]
        return [(r.mask.text, r.target) for r in self.reparse.rules()]

    def _reparse_list(self) -> list[tuple[str, str]]:
        snap = self._reparse_snapshot
        return snap if snap is not None else self._reparse_now()

    @property
    def reparse_rule_count(self) -> int:
        return len(self._reparse_list())

    def get_reparse_rule_mask(self, index: int) -> str:
        return self._reparse_item(index)[0]

    def get_reparse_rule_target(self, index: int) -> str:
        return self._reparse_item(index)[1]

    def _reparse_item(self, index: int) -> tuple[str, str]:
        items = self._reparse_list()
        if not isinstance(index, int) or not 0 <= index < len(items):
            raise CBFSFilterError(errno.EINVAL, f"reparse rule index {index!r} out of range (0..{len(items) - 1})")
        return items[index]

    def get_reparse_rule_by_mask(self, mask: str, product_guid: str = "") -> str:
        if len(self.reparse):
            return self.reparse.target_of(mask)
        return dict(self._reparse_now(product_guid)).get(mask, "")

    def is_attach_point(self, path: str) -> bool:
        return os.path.normpath(path) in self._attached

    def contains_attach_point(self, path: str) -> bool:
        """Whether a mounted attach point lies strictly below ``path``."""
        top = os.path.normpath(path).rstrip("/") + "/"
        return any(point.startswith(top) for point in list(self._attached))

    def check_redirect(self, target: str) -> None:
        """Refuse (EACCES) a redirect of this filter's into a path another filter of this process restricts: the
        daemon reaches the target with requests of its own, which that filter does not judge."""
        real = os.path.normpath(target)
        stack = stacks.stack_for(real)
        other = stack.restricts(real, self) if stack is not None else None
        if other is not None:
            raise OSError(errno.EACCES, f"a reparse rule redirects a name to {real}, which the filter with tag "
                                        f"{other.tag} restricts")

    def access_denied(self, path: str, opcode: int, pid: int, uid: int, what: str) -> bool:
        """A layer of this filter refuses a request by an access rule: count and log it (LogDenials); False when
        the filter is Permissive (the request goes on)."""
        self.denials += 1
        refuse = self._config["Permissive"] != "true"
        if self._config["LogDenials"] == "true":
            masks = [r.mask for r in self.rules.candidates(path) if r.access] or ["?"]
            self.denial_log.record(path, opcode, pid, uid, ", ".join(masks), what, refuse, self.label)
        return refuse

    def open_below(self, path: str, flags: int) -> int:
        """Open ``path`` below this filter's mounts (an attach point's lower directory), else natively."""
        real = os.path.normpath(path)
        for point, mount in list(self._attached.items()):
            if real == point or real.startswith(point.rstrip("/") + "/"):
                rel = os.path.relpath(real, mount.mountpoint)
                return os.open(rel, flags, dir_fd=mount._lower_fd)
        return os.open(real, flags)

    def delete_all_passthrough_rules(self) -> bool:
        changed = self.passthrough_rules.clear()
        if changed and self._active:
            self._rules_changed()
        return changed

    def is_file_filtered(self, file_name: str) -> bool:
        """Whether a standard rule's path part matches ``file_name`` (process and qualifiers not checked)."""
        path = os.path.normpath(file_name) if file_name else file_name
        return bool(self.rules.candidates(path))

    def file_matches_mask(self, mask: str, file_name: str, case_sensitive: bool = True) -> bool:
        try:
            return file_matches_mask(mask, file_name, case_sensitive)
        except MaskError as exc:
            raise CBFSFilterError(errno.EINVAL, f"bad mask {mask!r}: {exc}") from exc

    # -- configuration

    def config(self, configuration_string: str) -> str:
        """``"Name=Value"`` sets a setting, ``"Name"`` reads it. Unknown names raise."""
        name, sep, value = split_setting(configuration_string)
        if name not in self._config:
            raise CBFSFilterError(errno.EINVAL, f"unknown setting {name!r}; known: {', '.join(sorted(self._config))}")
        if not sep:
            return self._config[name]
        if name in _BOOL_SETTINGS:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise CBFSFilterError(errno.EINVAL, f"{name} takes true or false, not {value!r}")
            value = "true" if value.lower() in ("true", "1", "yes") else "false"
        elif name in _COUNT_SETTINGS:
            value = check_thread_count(name, value, self._config)
        elif name == "Service":
            if value.lower() not in _SERVICE_MODES:
                raise CBFSFilterError(errno.EINVAL, f"Service takes auto, on or off, not {value!r}")
            if self._active:
                raise CBFSFilterError(errno.EBUSY, "Service is read at start_filter: stop the filter first")
            value = value.lower()
        else:
            try:
                number = float(value)
            except ValueError:
                raise CBFSFilterError(errno.EINVAL, f"{name} takes a number of seconds, not {value!r}") from None
            if not number >= 0 or number == float("inf"):
                raise CBFSFilterError(errno.EINVAL, f"{name} must be a finite number >= 0, not {value!r}")
        self._config[name] = value
        return ""

    def config_bool(self, name: str) -> bool:
        return self._config[name] == "true"

    # -- inside handlers

    def _origin(self, creator: bool = False) -> dispatch.Origin:
        job = dispatch.current_job()
        if job is None or job.origin is None:
            what = "get_handle_creator_*" if creator else "get_originator_*"
            raise CBFSFilterError(errno.EINVAL, f"{what} works only inside an event handler")
        if creator and job.creator is not None:
            return job.creator
        return job.origin

    def _process_id(self, origin: dispatch.Origin) -> int:
        if origin.name is None:
            self._fill(origin)
        return origin.pid

    def _process_name(self, creator: bool) -> str:
        try:
            origin = self._origin(creator)
        except CBFSFilterError:
            return ""
        if origin.name is None:
            self._fill(origin)
        return origin.name or ""

    def _token(self, origin: dispatch.Origin) -> dict[str, Any]:
        return {"uid": origin.uid, "gid": origin.gid, "pid": self._process_id(origin),
                "groups": procfs.groups(origin.tid)}

    def get_originator_process_id(self) -> int:
        return self._process_id(self._origin())

    def get_originator_thread_id(self) -> int:
        return self._origin().tid

    def get_originator_process_name(self) -> str:
        return self._process_name(False)

    def get_originator_token(self) -> dict[str, Any]:
        """The requester's credentials (Linux meaning of the token): uid, gid, pid and supplementary groups."""
        return self._token(self._origin())

    # The process that opened the handle an event is about (read, write, cleanup, close, ...): for a
    # RELEASE or write-back that is not the process the kernel names. Events without a handle: the originator.
    def get_handle_creator_process_id(self) -> int:
        return self._process_id(self._origin(True))

    def get_handle_creator_thread_id(self) -> int:
        return self._origin(True).tid

    def get_handle_creator_process_name(self) -> str:
        return self._process_name(True)

    def get_handle_creator_token(self) -> dict[str, Any]:
        return self._token(self._origin(True))

    @staticmethod
    def _fill(origin: dispatch.Origin) -> None:
        info = ProcessInfo(origin.tid)
        origin.name, origin.pid = info.image, info.pid

    def reset_timeout(self, timeout: int) -> bool:
        """Give the event being handled ``timeout`` more milliseconds (0 = no limit)."""
        return dispatch.reset_timeout(max(0, timeout) / 1000.0)

    def create_file_direct(self, file_name: str, synchronize: bool = False,
                           desired_access: int = c.DESIRED_ACCESS_FILE_GENERIC_READ, share_mode: int = 0,
                           creation_disposition: int = c.FILE_DISPOSITION_OPEN_EXISTING,
                           flags_and_attributes: int = 0, isolate: bool = False,
                           close_immediately: bool = False) -> int:
        """Open a filtered file below the filter (no events): returns an OS fd the caller closes.
        ``desired_access`` is the SDK's access mask (DESIRED_ACCESS_*, GENERIC_READ/WRITE accepted)."""
        if not isinstance(file_name, str) or not file_name.startswith("/"):
            raise CBFSFilterError(errno.EINVAL, f"create_file_direct takes an absolute path, not {file_name!r}")
        if creation_disposition not in _DISPOSITION_FLAGS:
            raise CBFSFilterError(errno.EINVAL, f"unknown creation_disposition {creation_disposition!r}: use a "
                                                "FILE_DISPOSITION_* constant")
        access = _open_flags_of(desired_access)
        if access == os.O_PATH and _DISPOSITION_FLAGS[creation_disposition]:
            access = os.O_RDONLY  # creating or truncating needs a real open
        real = os.path.abspath(file_name)
        flags = access | os.O_CLOEXEC | _DISPOSITION_FLAGS[creation_disposition]
        where, dir_fd = real, None
        for path, mount in self._attached.items():
            if real == path or real.startswith(path.rstrip("/") + "/"):
                where, dir_fd = os.path.relpath(real, mount.mountpoint), mount._lower_fd
                break
        job = dispatch.current_job()
        opening = job.params if job is not None and isinstance(
            job.params, ev.CBFilterBeforeOpenFileEventParams | ev.CBFilterBeforeCreateFileEventParams) else None
        if opening is not None and os.path.normpath(opening.file_name) == real \
                and not self.config_bool("AllowFileAccessInBeforeOpen"):
            raise CBFSFilterError(errno.EACCES, f"{real} is the file being opened: set config('AllowFileAccess"
                                                "InBeforeOpen=true') to open it in a before-open handler")
        # Inside a handler, synchronize (or CheckFileAccessInDirectIO) opens with the originator's credentials: the
        # kernel then checks the originator's access, and what is created is the originator's.
        origin = job.origin if job is not None else None
        as_origin = origin is not None and os.geteuid() == 0 and origin.uid >= 0 and (
            synchronize or self.config_bool("CheckFileAccessInDirectIO"))
        restore = os.getgroups() if as_origin else []
        try:
            if as_origin:
                assert origin is not None
                libc.setgroups_thread(procfs.groups(origin.tid))
                libc.setfsgid(origin.gid)
                libc.setfsuid(origin.uid)
            try:
                fd = os.open(where, flags, 0o666, dir_fd=dir_fd)
            finally:
                if as_origin:
                    libc.setfsuid(os.geteuid())
                    libc.setfsgid(os.getegid())
                    libc.setgroups_thread(restore)
        except OSError as exc:
            raise CBFSFilterError.from_os_error(exc, f"cannot open {real} below the filter") from exc
        if close_immediately:
            os.close(fd)
            return -1
        return fd

    def create_file_direct_as_stream(self, file_name: str, synchronize: bool = False,
                                     desired_access: int = c.DESIRED_ACCESS_FILE_GENERIC_READ, share_mode: int = 0,
                                     creation_disposition: int = c.FILE_DISPOSITION_OPEN_EXISTING,
                                     flags_and_attributes: int = 0, isolate: bool = False,
                                     handle_holder: list[int] | None = None) -> CBFSFilterStream:
        """create_file_direct, returned as a CBFSFilterStream that closes the fd with it; ``handle_holder`` (a list)
        receives the fd in its element 0, as the SDK's does."""
        if _open_flags_of(desired_access) == os.O_PATH:
            desired_access |= c.DESIRED_ACCESS_FILE_READ_DATA  # a stream reads or writes data
        fd = self.create_file_direct(file_name, synchronize, desired_access, share_mode, creation_disposition,
                                     flags_and_attributes, isolate)
        access = _open_flags_of(desired_access)
        mode = "rb" if access & os.O_ACCMODE == os.O_RDONLY else ("ab" if access & os.O_APPEND else
                                                                  ("wb" if access & os.O_ACCMODE == os.O_WRONLY
                                                                   else "r+b"))
        stream = CBFSFilterStream(fd, mode, closefd=True)
        if handle_holder is not None:
            if handle_holder:
                handle_holder[0] = fd
            else:
                handle_holder.append(fd)
        return stream

    def query_file_information_direct(self, handle: int, buffer: bytearray, file_information_class: int,
                                      bytes_written: list[int] | None = None) -> None:
        """NtQueryInformationFile on a direct fd: fills ``buffer`` with the Windows structure of the class
        (FileBasic/Standard/Internal/Position/EndOfFile/AttributeTagInformation; see fsfilter.api.fileinfo)."""
        try:
            data = fileinfo.query(handle, file_information_class)
        except OSError as exc:
            raise CBFSFilterError.from_os_error(exc, f"cannot query information class {file_information_class} "
                                                "of the direct handle") from exc
        if len(buffer) < len(data):
            raise CBFSFilterError(errno.ERANGE, f"the buffer holds {len(buffer)} bytes; the structure needs "
                                                f"{len(data)}")
        buffer[:len(data)] = data
        if bytes_written is not None:
            bytes_written[:] = [len(data)]

    def set_file_information_direct(self, handle: int, file_information_class: int, buffer: bytes) -> None:
        """NtSetInformationFile on a direct fd: FileBasic (times, READONLY), FileRename (see
        fileinfo.rename_information), FileDisposition (removes the name now), FilePosition, FileAllocation,
        FileEndOfFileInformation. Below the filter: no events fire."""
        try:
            fileinfo.apply(handle, file_information_class, bytes(buffer))
        except OSError as exc:
            raise CBFSFilterError.from_os_error(exc, f"cannot set information class {file_information_class} "
                                                "on the direct handle") from exc

    def query_file_security_direct(self, handle: int, security_information: int, buffer: bytearray | None,
                                   length_needed: list[int] | None = None) -> None:
        """The security events' representation on Linux: with DACL_SECURITY_INFORMATION, the bytes of the
        ``system.posix_acl_access`` attribute (empty when the file has no ACL beyond its mode bits).
        ``length_needed`` receives the size; a ``buffer`` too small raises ERANGE (give None to ask the size)."""
        value = b""
        if security_information & c.DACL_SECURITY_INFORMATION:
            try:
                value = os.getxattr(handle, "system.posix_acl_access")
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise CBFSFilterError.from_os_error(exc, "cannot read the ACL of the direct handle") from exc
        if length_needed is not None:
            length_needed[:] = [len(value)]
        if buffer is None:
            return
        if len(buffer) < len(value):
            raise CBFSFilterError(errno.ERANGE, f"the buffer holds {len(buffer)} bytes; the ACL needs {len(value)}")
        buffer[:len(value)] = value

    def set_file_security_direct(self, handle: int, security_information: int, buffer: bytes) -> None:
        """With DACL_SECURITY_INFORMATION: ``buffer`` becomes the ``system.posix_acl_access`` attribute (empty:
        the ACL is removed). Owner and mode: use os.fchown/os.fchmod on the fd."""
        if not security_information & c.DACL_SECURITY_INFORMATION:
            raise CBFSFilterError(errno.EINVAL, "only DACL_SECURITY_INFORMATION (the POSIX ACL) is set here; "
                                                "use os.fchown/os.fchmod for owner and mode")
        try:
            if buffer:
                os.setxattr(handle, "system.posix_acl_access", bytes(buffer))
            else:
                try:
                    os.removexattr(handle, "system.posix_acl_access")
                except OSError as exc:
                    if exc.errno != errno.ENODATA:
                        raise
        except OSError as exc:
            raise CBFSFilterError.from_os_error(exc, "cannot set the ACL of the direct handle") from exc

    def set_file_size_direct(self, handle: int, size: int) -> None:
        try:
            os.ftruncate(handle, size)
        except OSError as exc:
            raise CBFSFilterError.from_os_error(exc, f"cannot set the size of the direct handle to {size}") from exc

    # -- virtual files

    def add_virtual_file(self, file_name: str, attributes: int = 0, mode: int = 0o644) -> None:
        """Add a file that exists on no disk: it appears in listings, ``stat`` and open of ``file_name`` (whose
        directory must exist); its data, size and times come from the handlers (on_before_open_file sees
        FILE_ATTRIBUTE_VIRTUAL_FILE in ``attributes`` and ``isolate`` True; on_before_read_file,
        on_before_write_file, on_before_query_file_info, on_before_set_file_info fire for every request of it, and
        what they leave undone acts on a store in memory). Every process has a view of its own; it goes with
        remove_virtual_file, with stop_filter, or when the application ends."""
        path = _real_parent(file_name)
        if attributes & c.FILE_SYS_ATTR_DIRECTORY:
            raise CBFSFilterError(errno.EINVAL, "virtual directories are not supported: create a real directory "
                                                "and add virtual files in it")
        if not 0 <= mode <= 0o7777:
            raise CBFSFilterError(errno.EINVAL, f"mode {mode:#o} is not a permission mode")
        if attributes & c.FILE_SYS_ATTR_READ_ONLY:
            mode &= ~0o222
        head = os.path.dirname(path)
        if not os.path.isdir(head):
            raise CBFSFilterError(errno.ENOENT, f"{head}, the directory of the virtual file, does not exist: create "
                                                "it first")
        if os.path.lexists(path):
            raise CBFSFilterError(errno.EEXIST, f"{path} exists: a virtual file needs a name no file has")
        with self._lock:
            if path in self._virtual_files and not self._active:
                raise CBFSFilterError(errno.EEXIST, f"{path} is a virtual file already")
            # (while active, the mount's table says whether it exists: a process may have deleted or renamed it)
            self._virtual_files[path] = mode
            active = self._active
        if not active:
            return  # placed when the filter starts
        try:
            with self._lock:
                if not self._covered(path):
                    self._attach(os.path.realpath(head))
                else:
                    self._place_virtual(path, mode)
        except BaseException:
            with self._lock:
                self._virtual_files.pop(path, None)
            raise

    def _place_virtual(self, path: str, mode: int) -> None:
        """Add the virtual file to the layer of the mount that serves its directory, and make the kernel forget that
        the name did not exist."""
        for point, attachment in self._attached.items():
            if path.startswith(point.rstrip("/") + "/"):
                rel = os.fsencode(os.path.relpath(path, attachment.mountpoint))
                try:
                    attachment.layer.add_virtual_file(b"/" + rel, mode)
                except OSError as exc:
                    raise CBFSFilterError.from_os_error(exc, f"cannot add the virtual file {path}") from exc
                attachment.stack.forget_name(b"/" + rel)
                attachment.stack.rules_changed()  # puts the layer in the path of requests
                return
        raise CBFSFilterError(errno.ENOENT, f"no mount of this filter serves {path}")

    def remove_virtual_file(self, file_name: str) -> bool:
        """Take a virtual file away; True when there was one. Processes that have it open keep it open (as an
        unlinked file) until they close it."""
        path = _real_parent(file_name)
        with self._lock:
            known = self._virtual_files.pop(path, None) is not None
            if not self._active:
                return known
            removed = False  # what the mount holds now (a process may have renamed or deleted it)
            for point, attachment in self._attached.items():
                if path.startswith(point.rstrip("/") + "/"):
                    rel = b"/" + os.fsencode(os.path.relpath(path, attachment.mountpoint))
                    removed = attachment.layer.remove_virtual_file(rel) or removed
                    attachment.stack.forget_name(rel)
        return removed

    def suspend_file_events(self) -> None:
        """Inside on_after_create_file / on_after_open_file: no more events (control or notification) for
        this file until all its handles are closed. Access rules still apply."""
        job = dispatch.current_job()
        subject = job.subject if job is not None else None
        if isinstance(subject, RemoteSubject):
            subject.suspend = True  # the service suspends the node when the answer arrives
            return
        if not (isinstance(subject, tuple) and len(subject) == 2 and isinstance(subject[0], FilterLayer)):
            raise CBFSFilterError(errno.EINVAL, "suspend_file_events works only inside on_after_create_file or "
                                                "on_after_open_file")
        fs, nodeid = subject
        fs.suspend_events(nodeid)

    # -- SDK members with no Linux meaning (documented in docs/api.md)

    # Default rules: access rules fsfilterd enforces with no application running, kept per product in
    # /etc/fsfilter/rules.d (docs/service.md). Changing them needs root; the running service reloads at once.

    def add_default_rule(self, mask: str, access_flags: int, product_guid: str = "") -> bool:
        """Add a persistent access rule (ORed into the product's rule with the same mask). Returns whether the
        rules changed. Enforced by fsfilterd from now on (and from boot), below every application's rules."""
        access = _check_flags("access_flags", access_flags, c.ACCESS_KNOWN)
        return self._edit_default_rule(mask, access, product_guid or self._product_guid)

    def delete_default_rule(self, mask: str, product_guid: str = "") -> bool:
        return self._edit_default_rule(mask, None, product_guid or self._product_guid)

    def _edit_default_rule(self, mask: str, access: int | None, product_guid: str) -> bool:
        if not isinstance(mask, str) or not mask:
            raise CBFSFilterError(errno.EINVAL, "mask must be a non-empty string")
        if os.geteuid() != 0:
            raise CBFSFilterError(errno.EPERM, "default rules bind every user's processes: only root may change "
                                               "them (run as root, or ask an administrator)")
        params = {"mask": mask, "product": product_guid}
        method = "delete_default_rule" if access is None else "add_default_rule"
        if access is not None:
            params["access_flags"] = access  # type: ignore[assignment]
        try:
            return bool(_control.call(method, params))
        except CBFSFilterError as exc:
            if exc.code != errno.ECONNREFUSED:
                raise
        # No service runs: edit the file; the service reads it when it starts.
        return _rulesfiles.edit_default_rules(product_guid, mask, access)

    def create_default_rules_snapshot(self, product_guid: str = "") -> bool:
        """Read the default rules (of ``product_guid``, or of every product when empty) for default_rule_count and
        get_default_rule_*; the list stays as it was read until close_default_rules_snapshot."""
        files, errors = _rulesfiles.load_rule_files()
        product = _rulesfiles.product_file(product_guid).stem if product_guid else ""
        self._default_snapshot = [(r.mask, r.access) for f in files if not product or f.product == product
                                  for r in f.rules]
        return not errors

    def close_default_rules_snapshot(self) -> None:
        self._default_snapshot = None

    def _snapshot(self) -> list[tuple[str, int]]:
        if self._default_snapshot is None:
            raise CBFSFilterError(errno.EINVAL, "call create_default_rules_snapshot first")
        return self._default_snapshot

    @property
    def default_rule_count(self) -> int:
        return len(self._default_snapshot) if self._default_snapshot is not None else 0

    def get_default_rule_mask(self, index: int) -> str:
        return self._snapshot_item(index)[0]

    def get_default_rule_access_flags(self, index: int) -> int:
        return self._snapshot_item(index)[1]

    def _snapshot_item(self, index: int) -> tuple[str, int]:
        items = self._snapshot()
        if not isinstance(index, int) or not 0 <= index < len(items):
            raise CBFSFilterError(errno.EINVAL, f"default rule index {index!r} out of range: there are {len(items)} "
                                                "(default_rule_count)")
        return items[index]

    def shutdown_system(self, shutdown_prompt: str, timeout: int, force_close_apps: bool, reboot: bool) -> bool:
        raise CBFSFilterError(errno.ENOSYS, "fsfilter does not shut the machine down: use systemctl")

    def nt_status_to_win_32_error(self, status: int) -> int:
        """Statuses here are already errno values: returned as they are."""
        return status

    nt_status_to_win32_error = nt_status_to_win_32_error

    def get_volume_guid(self) -> str:
        return ""

    # -- events of the filter itself

    def _fire_simple(self, event: str, **fields: Any) -> Any:
        handler = self.handler(event)
        if handler is None:
            return None
        params = FILTER_PARAMS[event](**fields)
        try:
            handler(params)
        except Exception as exc:
            self._fire_error(errno.EIO, f"on_{event} raised {type(exc).__name__}: {exc}")
        return params

    def _post_simple(self, event: str, **fields: Any) -> None:
        handler = self.handler(event)
        if handler is not None:
            self.dispatcher.post(handler, FILTER_PARAMS[event](**fields), None)

    def _fire_error(self, code: int, description: str) -> None:
        handler = self.handler("error")
        if handler is None:
            log.error("%s", description)
            return
        handler(FILTER_PARAMS["error"](error_code=code, description=description))

    def _thread_event(self, starting: bool) -> None:
        self._fire_simple("worker_thread_creation" if starting else "worker_thread_termination")

    # -- statistics (Linux extension)

    @property
    def stats(self) -> dict[str, int]:
        d = self.dispatcher.stats
        out = {"control_events": d.control, "notifications_posted": d.notifications_posted,
               "notifications_delivered": d.notifications_delivered, "expired": d.expired, "failed": d.failed,
               "notifications_queued": self.dispatcher.queued_notifications, "overdue": d.overdue, "shed": d.shed,
               "event_threads": d.threads, "event_threads_peak": d.peak_threads,
               "abandoned": 0, "request_threads": 0, "request_pool_saturated": 0}
        for mount in list(self._attached.values()):
            s = mount.stats
            if s is not None:
                out["abandoned"] += s.abandoned
                out["request_threads"] += s.pool_threads
                out["request_pool_saturated"] += s.pool_saturated
        return out
