"""One mount per filtered directory: the stacks every filter of this process shares.

A filter attached to a directory joins the stack of the mount that serves it: the mount at that directory, or
at a directory above it (the filter's layer then applies below its own directory only). A filter attached above
existing mounts gets a new mount at its directory, the filters of the mounts below it join that one, and the
mounts below are detached lazily: processes already inside them (open files, cwds) keep being served there until
they leave, with the filters they had, and new path walks reach the directory through the new mount. FUSE never
serves FUSE, so kernel passthrough keeps working, and no layer sees another layer's threads as the originator.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from typing import Any, Protocol

from fsfilter._abi import fuse as abi
from fsfilter._abi import linux
from fsfilter._layers.filter import FilterCore, FilterLayer
from fsfilter._sessions import keeper
from fsfilter._sessions.fuse_session import Session, SessionOptions, SessionStats
from fsfilter._sessions.lower_fs import LowerFS, LowerOptions
from fsfilter._sessions.stack import AltitudeTaken, LayerStack
from fsfilter._system import fuse_device, libc, procfs
from fsfilter._wire import fuse as wire
from fsfilter.api.passthrough import PassthroughFilter
from fsfilter.errors import CBFSFilterError


class StackedFilter(FilterCore, Protocol):
    """What a stack needs of a filter on it (a CBFilter) beyond what its layer needs: its mount settings, its
    altitude, and where to report that its mount was lost or moved."""

    tag: int
    altitude: str
    strict_altitude: bool
    _altitude: float
    _start_seq: int  # the order filters were started in: equal altitudes keep it wherever their layers go

    def worker_threads(self) -> int: ...
    def config(self, configuration_string: str) -> str: ...
    def wants_lock_requests(self) -> bool: ...
    def _fire_error(self, code: int, description: str) -> None: ...
    def _attachment_lost(self, path: str, reason: str) -> None: ...
    def _moved_to(self, path: str, attachment: Attachment) -> None: ...

log = logging.getLogger("fsfilter")

_stacks: dict[str, MountStack] = {}  # mount point -> its stack, for every live (not draining) mount
# Lock order: CBFilter._lock, then this, then LayerStack._lock and LowerFS._lock. Never held while waiting for a
# session's threads (a handler running there may attach a filter and need it).
_registry_lock = threading.RLock()


def _below(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def stack_for(path: str) -> MountStack | None:
    """The stack of this process whose mount serves ``path`` (at it or above it), if any."""
    with _registry_lock:
        for point, stack in _stacks.items():
            if _below(path, point):
                return stack
    return None


def parse_altitude(value: object) -> float:
    """The SDK gives altitudes as decimal strings ("360000", "370030.5"); numbers are taken too."""
    try:
        altitude = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else math.nan
    except ValueError:
        altitude = math.nan
    if not math.isfinite(altitude) or altitude < 0:
        raise CBFSFilterError(errno.EINVAL, f"altitude {value!r} is not a decimal number >= 0: give one such as "
                                            "\"360000\" (higher = nearer the application)")
    return altitude


class Attachment:
    """One filter on one directory: its layer in the stack of the mount that serves the directory."""

    def __init__(self, stack: MountStack, layer: FilterLayer, path: str) -> None:
        self.stack = stack
        self.layer = layer
        self.path = path

    @property
    def fs(self) -> FilterLayer:
        return self.layer

    @property
    def mountpoint(self) -> str:
        return self.stack.mountpoint

    @property
    def _lower_fd(self) -> int:
        return self.stack._lower_fd

    @property
    def stats(self) -> SessionStats | None:
        return self.stack.stats

    def rules_changed(self) -> None:
        self.stack.rules_changed()


class MountStack(PassthroughFilter):
    """The FUSE mount of one directory and the stack of layers of the filters on it. Its mount options (timeouts,
    locks, kernel passthrough, request threads) are those of the filter that made it."""

    def __init__(self, path: str, first: StackedFilter) -> None:
        threads = first.worker_threads()
        super().__init__(path, None, pool=max(4, threads), passthrough=first.config_bool("KernelPassthrough"),
                         entry_timeout=float(first.config("EntryTimeout")),
                         attr_timeout=float(first.config("AttrTimeout")),
                         negative_timeout=float(first.config("NegativeTimeout")),
                         locks=first.wants_lock_requests(),
                         request_timeout=min(0xFFFF, math.ceil(float(first.config("RequestTimeout")))))
        self._init_stack()

    @classmethod
    def adopted(cls, path: str, lower: str, session_options: SessionOptions, lower_options: LowerOptions,
                allow_other: bool) -> MountStack:
        """A stack for a mount another process hands over (api/_handover.py); start it with start_adopted."""
        stack = cls.__new__(cls)
        PassthroughFilter.__init__(stack, lower, path, allow_other=allow_other, resolve=False)
        stack.session_options, stack.lower_options = session_options, lower_options
        stack._init_stack()
        return stack

    def _init_stack(self) -> None:
        self.layers: LayerStack | None = None
        self.members: dict[int, tuple[StackedFilter, FilterLayer]] = {}  # id(filter) -> (filter, its layer here)
        self.draining = False  # detached: serving only what was inside it already
        self.report = ""  # what happened to the mount when its last filter stopped (for the command line)
        self._pending: list[tuple[StackedFilter, str, float, bool]] = []  # layers to put in before the first request
        self._stale = False  # the rules changed: the kernel's cached names and attributes may lie
        self._invalidator: threading.Thread | None = None
        self._stale_lock = threading.Lock()  # a leaf: nothing else is taken while it is held
        self.on_lost = self._lost
        self.handed_over = False  # another process serves it now: filters leaving here must not touch it

    # -- mount and session

    def _make_fs(self, lower_fd: int) -> LowerFS:
        fs = LowerFS(lower_fd, self.lower_options)
        self.layers = LayerStack(fs)
        for core, scope, altitude, strict in self._pending:  # before the session serves anything
            self._join(fs, core, scope, altitude, strict)
        self._pending.clear()
        return fs

    def _configure_session(self, session: Session, fs: LowerFS) -> None:
        assert self.layers is not None
        session.router = self.layers.route
        path = self.mountpoint
        session.on_saturated = lambda threads: self._tell_all(
            errno.EAGAIN, f"all {threads} request threads of {path} are busy (event handlers that do not return?): "
                          "requests there now wait for one to come back; fix the handlers or set a timeout")

    def _tell_all(self, code: int, message: str) -> None:
        for core, _ in list(self.members.values()):
            core._fire_error(code, message)

    def _connection_lost(self) -> None:
        if not self.draining:
            super()._connection_lost()
            return
        # The last process inside a detached mount left it: the kernel ended the connection, as it should.
        self.lost = f"{self.mountpoint} (detached) is no longer used"
        log.info("%s: its session ends", self.lost)
        threading.Thread(target=self._after_loss, name="fsfilter-drained", daemon=True).start()

    def _lost(self, reason: str) -> None:
        with _registry_lock:
            if _stacks.get(self.mountpoint) is self:
                del _stacks[self.mountpoint]
            if self in _draining:
                _draining.remove(self)
        if self.draining:
            return  # the last process inside a detached mount left it: nothing was lost
        for core, _ in list(self.members.values()):
            core._attachment_lost(self.mountpoint, reason)

    # -- layers

    def _join(self, fs: LowerFS, core: StackedFilter, scope: str, altitude: float, strict: bool) -> FilterLayer:
        assert self.layers is not None
        layer = FilterLayer(fs, core, self.mountpoint, scope)
        try:
            self.layers.join(layer, altitude, strict, name=f"the filter with tag {core.tag}", seq=core._start_seq)
        except AltitudeTaken as exc:
            raise CBFSFilterError(errno.EEXIST, f"{exc}: on {self.mountpoint}; give this filter another altitude, "
                                                "or set strict_altitude to False on both") from exc
        self.members[id(core)] = (core, layer)
        return layer

    def add(self, core: StackedFilter, scope: str, altitude: float, strict: bool) -> FilterLayer:
        """Put the filter's layer in the stack (the mount is started already)."""
        if id(core) in self.members:
            return self.members[id(core)][1]
        if core.wants_lock_requests() and not self.lower_options.locks:
            raise CBFSFilterError(errno.EBUSY, f"{self.mountpoint} is served by a filter started without lock "
                                               "handlers, so the kernel keeps its locks and no lock event can fire: "
                                               "start the filter with lock handlers first")
        assert self.fs is not None
        layer = self._join(self.fs, core, scope, altitude, strict)
        self.rules_changed()  # names and attributes cached before it joined may be ones its rules change
        return layer

    def remove(self, core: StackedFilter) -> bool:
        """Take the filter's layer out; True when no layer is left."""
        member = self.members.pop(id(core), None)
        if member is not None and self.layers is not None:
            self.layers.leave(member[1])
            self.rules_changed()  # names it hid or made volatile must be looked up again
        return not self.members

    def detach_lazily(self, via: str | None, drains_here: bool = True) -> None:
        """Take the mount out of the namespace while what is inside stays served (MNT_DETACH); the session ends when
        the last open file or cwd inside it goes. ``via`` names the mount's root without crossing the mount that
        took over from it (whose path walks would reach a directory of its own there instead); None when no path
        names it (another mount covers it): it only stops taking new filters. ``drains_here``: listed as draining
        in this process (filters attached above it join it); not when a keeper takes it."""
        self.draining = True
        if self.session is not None:
            self._write_journal_header(self.session)  # a rescuer drains it too, never holds it as the live mount
        with _registry_lock:
            if _stacks.get(self.mountpoint) is self:
                del _stacks[self.mountpoint]
            if drains_here:
                _draining.append(self)
        if via is None:
            return
        try:
            libc.umount2(os.fsencode(via), linux.MNT_DETACH)
        except OSError as exc:
            log.warning("detaching %s failed: %s", self.mountpoint, exc)

    def rules_changed(self) -> None:
        """Make the kernel forget the names and attributes it cached, so that the new rules decide the next
        lookups (hiding, access) at once. Done on a thread of its own: invalidating a name waits for the
        directory's lock, which a request whose handler changed the rules may be holding."""
        if self.layers is not None:
            self.layers.refresh()  # a filter's first rule puts its layer in the path of requests
        with self._stale_lock:
            self._stale = True
            if self._invalidator is None:
                self._invalidator = threading.Thread(target=self._invalidate, name="fsfilter-invalidate",
                                                     daemon=True)
                self._invalidator.start()

    def forget_name(self, rel: bytes) -> None:
        """Make the kernel forget what it knows of the name ``rel`` (below the mount), e.g. that it did not exist.
        On a thread of its own, for the reason rules_changed gives."""
        def forget() -> None:
            try:
                self.notify_changed(os.fsdecode(rel))
            except Exception as exc:  # the mount went meanwhile
                log.debug("forgetting %r: %s", rel, exc)
        threading.Thread(target=forget, name="fsfilter-forget-name", daemon=True).start()

    def _invalidate(self) -> None:
        while True:
            with self._stale_lock:
                if not self._stale:
                    self._invalidator = None
                    return
                self._stale = False
            session, fs = self.session, self.fs
            if session is None or fs is None:
                continue
            for node in list(fs.nodes.values()):
                if node.nodeid == abi.ROOT_ID:
                    continue
                session.notify(wire.encode_inval_entry(node.parent, node.name))
                session.notify(wire.encode_inval_inode(node.nodeid, -1, 0))  # attributes only

    def restricts(self, path: str, but: StackedFilter) -> StackedFilter | None:
        """The filter (other than ``but``) on this mount whose rules restrict ``path`` or below, if any."""
        for core, layer in list(self.members.values()):
            if core is not but and layer.restricts(path):
                return core
        return None

    def describe(self) -> list[dict[str, Any]]:
        """The layers, top first: altitude, the filter's tag, the directory it applies below."""
        if self.layers is None:
            return []
        out = []
        for m in self.layers.members:
            layer = m.layer
            assert isinstance(layer, FilterLayer)
            out.append({"altitude": m.altitude, "tag": getattr(layer.core, "tag", 0), "scope": layer.scope})
        return out


def attach(core: StackedFilter, path: str, altitude: float, strict: bool) -> Attachment:
    """Put ``core``'s layer for the directory ``path`` in the stack that serves it, mounting one if none does."""
    with _registry_lock:
        stack = stack_for(path)
        if stack is not None:
            attachment = Attachment(stack, stack.add(core, path, altitude, strict), path)
            _join_draining(core, path, altitude, strict)
            return attachment
        inner = [s for point, s in _stacks.items() if _below(point, path)]
        stack = MountStack(path, core)
        stack._pending.append((core, path, altitude, strict))
        for s in inner:  # the filters of mounts below join the new one before it serves anything
            for other, layer in list(s.members.values()):
                stack._pending.append((other, layer.scope, other._altitude, bool(other.strict_altitude)))
        stack.start()
        _stacks[path] = stack
        for s in inner:
            for other, layer in list(s.members.values()):
                other._moved_to(layer.scope, Attachment(stack, stack.members[id(other)][1], layer.scope))
            _retire(stack, s)
        _join_draining(core, path, altitude, strict)
        return Attachment(stack, stack.members[id(core)][1], path)


def _join_draining(core: StackedFilter, path: str, altitude: float, strict: bool) -> None:
    """Put the filter's layer in the detached mounts below its directory that still serve processes which were
    inside them: those processes do not escape a filter that started after they went in."""
    for drained in list(_draining):
        if drained.fs is None or id(core) in drained.members or not _below(drained.mountpoint, path):
            continue
        try:
            drained.add(core, path, altitude, strict)
        except CBFSFilterError as exc:
            log.warning("processes still inside the detached %s are not filtered by it: %s", drained.mountpoint,
                        exc.message)


def _retire(outer: MountStack, inner: MountStack) -> None:
    """Detach a mount that a new mount above took over from, and make the new one look its names up again (a
    walk that reached them through the old mount in between would keep it alive)."""
    # The old mount's root, reached below the new mount: through the new one's lower directory.
    inner.detach_lazily(f"/proc/self/fd/{outer._lower_fd}/{os.path.relpath(inner.mountpoint, outer.mountpoint)}")
    try:
        outer.notify_changed(inner.mountpoint)
    except CBFSFilterError:
        pass


def detach(core: StackedFilter, attachment: Attachment) -> None:
    """Take ``core``'s layer out of the stack; the mount goes with its last layer. Layers the filter still has in
    detached mounts being drained leave them too (those mounts then serve what is inside them unfiltered)."""
    with _registry_lock:
        stack = attachment.stack
        if stack.handed_over:
            stack.members.pop(id(core), None)
            return
        last = set(stack.members) == {id(core)} and not stack.draining
        stopped = threading.Event()
        if last and _stacks.get(stack.mountpoint) is stack:
            del _stacks[stack.mountpoint]  # no filter joins it from now on
            _stopping[stack.mountpoint] = stopped
        drained = [s for s in _draining if id(core) in s.members]
    if last:
        # The last layer: unmount first, so that requests already sent (a RELEASE after the last close) still
        # reach it, as they would on a filter of its own. Outside the registry lock: stopping waits for the
        # session's threads, and a handler running there may be attaching another filter.
        try:
            state = _try_unmount(stack)
            if state == "done":
                stack.stop()
            else:
                _keep_serving(stack, core, covered=state == "covered")
        finally:
            with _registry_lock:
                if _stopping.get(stack.mountpoint) is stopped:
                    del _stopping[stack.mountpoint]
            stopped.set()
    stack.remove(core)
    for other in drained:
        other.remove(core)


# Where a mount whose last filter stopped goes on serving the programs still inside it: a forked keeper process (so
# that the application may exit), or this process when it outlives its filters anyway (fsfilterd sets it).
keep_in_process = False


def _try_unmount(stack: MountStack) -> str:
    """Unmount the mount if nothing uses it: "done" (or it was gone already: stop() finishes), "busy" (programs
    have files or cwds inside), or "covered" (another mount was put over ours and uses it; the path names that one,
    which is not ours to touch)."""
    if not stack._ours(fuse_device.find_mount(stack.mountpoint)):
        return "covered" if any(e.mount_id == stack._mount_id for e in procfs.mountinfo()) else "done"
    session = stack.session
    if session is not None:
        session.stopping()  # the end of the connection that follows is ours, not a loss
    try:
        libc.umount2(os.fsencode(stack.mountpoint), linux.UMOUNT_NOFOLLOW)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            return "done"  # not mounted any more, or another failure: stop() deals with it
        if session is not None:
            session.stopping(False)  # it goes on serving what is inside; its end is then noticed
        return "busy"
    return "done"


def _keep_serving(stack: MountStack, core: StackedFilter, covered: bool) -> None:
    """The last filter of a busy mount stops: programs inside keep working. The mount is detached (new path walks
    reach the directory itself) and goes on serving what is inside it as the plain pass-through, with kernel
    passthrough, until they leave: in a keeper process, or here (keep_in_process, or no keeper could take it).
    ``covered``: another mount is on top of ours; ours stays attached under it and is detached once on top again."""
    stack.remove(core)  # nothing of the filter may run after it stopped (nor in a keeper, where its threads are not)
    stack.detach_lazily(None if covered else stack.mountpoint, drains_here=keep_in_process)
    users = "another mount or programs still use it" if covered else "programs still use it"
    if not keep_in_process:
        pid = stack.hand_to_keeper(covered=covered)
        if pid > 0:
            stack.report = f"{stack.mountpoint}: {users}; keeper pid {pid} serves them (pass-through) until they leave"
            log.info("%s", stack.report)
            return
        with _registry_lock:
            _draining.append(stack)  # a request handler did not return: no keeper, it drains here
    stack.report = f"{stack.mountpoint}: {users}; it stays served (pass-through) by this process until they leave"
    if covered and stack.session is not None:
        threading.Thread(target=keeper.detach_when_uncovered, args=(stack.mountpoint, stack._mount_id,
                         stack.session.finished), name="fsfilter-uncover", daemon=True).start()
    log.info("%s", stack.report)


_draining: list[MountStack] = []  # detached mounts still serving what was inside them (under _registry_lock)
_stopping: dict[str, threading.Event] = {}  # mounts whose last filter is unmounting them, set when they are gone


def wait_stopped(path: str, timeout: float = 30.0) -> None:
    """Wait until no mount of this process at, above or below ``path`` is still being taken down: a filter started
    meanwhile must mount on the directory itself, not on a mount that is going away."""
    deadline = time.monotonic() + timeout
    while True:
        with _registry_lock:
            busy = [e for p, e in _stopping.items() if _below(p, path) or _below(path, p)]
        if not busy:
            return
        for event in busy:
            event.wait(max(0.0, deadline - time.monotonic()))
        if time.monotonic() >= deadline:
            return


def snapshot() -> list[dict[str, Any]]:
    """Every live mount of this process and its layers, top first (for fsfilter status): the filter of each layer
    is under "filter"."""
    with _registry_lock:
        stacks = list(_stacks.values())
    out: list[dict[str, Any]] = []
    for stack in stacks:
        layers = []
        if stack.layers is not None:
            for m in stack.layers.members:
                layer = m.layer
                if isinstance(layer, FilterLayer):
                    layers.append({"altitude": m.altitude, "scope": layer.scope, "filter": layer.core})
        stats = stack.stats
        out.append({"path": stack.mountpoint, "layers": layers,
                    "requests": sum(stats.requests) if stats is not None else 0,
                    "errors": stats.errors if stats is not None else 0})
    return out
