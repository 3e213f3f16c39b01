"""The shared part of a CBFilter's layer in the stack of a mount (see filter.py).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeVar

from fsfilter._abi import fuse as abi
from fsfilter._engine.dispatch import Dispatcher, Origin, Outcome
from fsfilter._engine.reparse import ReparseRules
from fsfilter._engine.rules import NO_FLAGS, Flags, PathMatch, RuleSet, attributes_from_stat, match_path
from fsfilter._sessions.layer import Layer
from fsfilter._sessions.lower_fs import LowerFS
from fsfilter._sessions.nodes import Inode, OpenFile
from fsfilter._system import libc, procfs
from fsfilter._system.procfs import ProcessInfo
from fsfilter._wire import ops
from fsfilter._wire.replies import (
    Entry,
    Reply,
)
from fsfilter.api import constants as c
from fsfilter.api import events
from fsfilter.api import params as ev
from fsfilter.api._params_base import EventParamsBase
from fsfilter.api.params import FILTER_PARAMS


class FilterCore(Protocol):
    """What a filter layer needs of the filter it serves (CBFilter): its rules, handlers and settings."""

    rules: RuleSet
    passthrough_rules: RuleSet
    reparse: ReparseRules
    control_handlers: int
    notify_handlers: int
    dispatcher: Dispatcher
    process_cached_io_requests: bool
    process_failed_requests: bool
    owner_pid: int  # the application that runs the handlers, when not this process (a service's stack); else 0

    @property
    def has_rules(self) -> bool: ...
    @property
    def rules_generation(self) -> int: ...
    @property
    def filter_own_requests(self) -> bool: ...
    @property
    def deny_expired_events(self) -> bool: ...
    def handler(self, event: str) -> Callable[[Any], object] | None: ...
    def config_bool(self, name: str) -> bool: ...
    def contains_attach_point(self, path: str) -> bool: ...
    def is_attach_point(self, path: str) -> bool: ...
    def open_below(self, path: str, flags: int) -> int: ...
    def check_redirect(self, target: str) -> None: ...
    def access_denied(self, path: str, opcode: int, pid: int, uid: int, what: str) -> bool:
        """An access rule refuses a request: log it; False when the rules are permissive (let it through)."""
        ...


P = ParamSpec("P")
T = TypeVar("T", bound=EventParamsBase)

# The event a parameter class belongs to, for the handler lookup (``on_<event>``).
EVENT_OF: dict[object, str] = {cls: name for name, cls in FILTER_PARAMS.items()}

log = logging.getLogger("fsfilter.filter")


FMODE_EXEC = 0x20  # in the open flags of execve's open

ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")

XATTR_SIZE_MAX = 65536  # the largest xattr value Linux allows

# Control bits that make a path's names and attributes volatile: their answer can differ per request.
VOLATILE = c.FS_CE_BEFORE_OPEN | c.FS_CE_BEFORE_CREATE | c.FS_CE_AFTER_GET_SIZES | c.FS_CE_REPARSE_FILENAME

# For each opcode, the control bits whose events it may fire: such a request is served on a pool thread.
OP_CONTROL: dict[int, int] = {}
for _event in events.events_of("CBFilter").values():
    for _opcode in _event.fuse if _event.control else ():
        OP_CONTROL[abi.Opcode[_opcode]] = OP_CONTROL.get(abi.Opcode[_opcode], 0) | _event.control

RW_BITS = (c.FS_CE_BEFORE_READ | c.FS_CE_AFTER_READ | c.FS_CE_BEFORE_WRITE | c.FS_CE_AFTER_WRITE, c.FS_NE_READ
            | c.FS_NE_WRITE)

CLEANUP_BITS = (c.FS_CE_BEFORE_CLEANUP | c.FS_CE_AFTER_CLEANUP, c.FS_NE_CLEANUP)

LOCK_BITS = (c.FS_CE_BEFORE_LOCK_CONTROL | c.FS_CE_AFTER_LOCK_CONTROL, c.FS_NE_LOCK_CONTROL)



class Facts:
    """What size/attribute/xattr qualifiers of rules look at, read lazily from the lower object: an open
    node (``fd``) or a name in a lower directory (``dir_fd``, ``name``) that may not exist yet."""

    __slots__ = ("fd", "dir_fd", "name", "_st", "planned")

    def __init__(self, fd: int, dir_fd: int, name: bytes, planned: int | None = None) -> None:
        self.fd = fd
        self.dir_fd = dir_fd
        self.name = name
        self._st: os.stat_result | None = None
        # A create: the attributes the new object will have (empty, no extended attributes) while it does not exist.
        self.planned = planned

    def _stat(self) -> os.stat_result | None:
        if self._st is None:
            try:
                self._st = os.fstat(self.fd) if self.fd >= 0 else os.stat(self.name, dir_fd=self.dir_fd,
                                                                            follow_symlinks=False)
            except OSError:
                return None
        return self._st

    def size(self) -> int | None:
        st = self._stat()
        return st.st_size if st is not None else (0 if self.planned is not None else None)

    def attributes(self) -> int | None:
        st = self._stat()
        return attributes_from_stat(st.st_mode, st.st_size, st.st_blocks, os.fsdecode(self.name)) \
            if st is not None else self.planned

    def has_xattr(self, name: str) -> bool:
        where = procfs.fd_path(self.fd) if self.fd >= 0 else procfs.fd_path(self.dir_fd) + "/" + os.fsdecode(self.name)
        try:
            os.getxattr(where, name, follow_symlinks=False)
        except OSError:
            return False
        return True



class NodeState:
    """A filter layer's slot in a node record: cached decisions and the node's contexts while it has opens."""

    __slots__ = ("match", "reach", "suspended", "file_context", "opens")

    def __init__(self) -> None:
        self.match: tuple[int, PathMatch | None] | None = None  # (rules generation, what the rules say)
        self.reach: tuple[int, bool] | None = None  # (rules generation, can a rule concern the node or below)
        self.suspended = False  # suspend_file_events: no events until the last handle is closed
        self.file_context = 0  # while the node has opens
        self.opens = 0  # opens (files and directories) with events


class Handle:
    """One open of a file or directory: its handle context and who opened it."""

    __slots__ = ("path", "context", "origin", "flags", "direct", "enum_context", "enumerated", "is_dir", "own_context")

    def __init__(self, path: str, origin: Origin, flags: int, is_dir: bool = False) -> None:
        self.path = path
        self.context = 0
        self.origin = origin
        self.flags = flags
        self.direct = False
        self.enum_context = 0
        self.enumerated = False
        self.is_dir = is_dir
        # An isolated open's file context: its own, not its node's (None for other opens). The SDK keeps contexts per
        # open for isolated files.
        self.own_context: int | None = None



class FilterBase(Layer):
    """What every part of a filter's layer shares: where it applies, what its rules say about a node or a name
    (cached per node and rules generation), the originator, firing events, contexts and the names handlers hide."""

    def __init__(self, lower: LowerFS, core: FilterCore, base: str, scope: str | None = None) -> None:
        super().__init__()
        self.lower = lower
        self.core = core
        self.base = base.rstrip("/") or "/"
        # The directory this filter is attached to: the mount's own, or one below it when the filter joined the
        # stack of an outer attach point. Nothing outside it (but the way to it) is this filter's business.
        self.scope = (scope or self.base).rstrip("/") or "/"
        # What the layer keeps per node (NodeState) and per open (Handle) lives in the node's and the open's slot
        # for this layer, and goes with them (FORGET, RELEASE).
        self._access_rules = (-1, False)  # (rules generation, whether any rule has access flags)
        self._epoch = 0  # bumped on renames: cached matches of moved subtrees are then stale
        self._ctx_lock = threading.Lock()  # a leaf: the node slots' open counts and contexts
        self._naming = threading.local()  # (parent, name, match) of the name this thread is creating
        self._had_rules = False
        # The layer made a view or a virtual file (their requests may need its handlers), or serves CBEncrypt's views.
        self.serves_views = getattr(core, "encryption", None) is not None

    def takes_requests(self) -> bool:
        """In the path of requests once the filter has had a rule (never out again: its handles and contexts need
        the closes). A filter with no rule at all can act on no request."""
        if not self._had_rules and self.core.has_rules:
            self._had_rules = True
        return self._had_rules

    @property
    def nodes(self) -> dict[int, Inode]:
        return self.lower.nodes

    @property
    def files(self) -> dict[int, OpenFile]:
        return self.lower.files

    @property
    def options(self) -> Any:
        return self.lower.options

    def path_of(self, nodeid: int) -> bytes:
        return self.lower.path_of(nodeid)

    def in_scope(self, path: str) -> bool:
        scope = self.scope
        return scope == self.base or path == scope or path.startswith(scope + "/") or scope == "/"

    def _on_way_to_scope(self, path: str) -> bool:
        return self.scope.startswith(path.rstrip("/") + "/")

    def abspath(self, nodeid: int) -> str:
        rel = self.lower.path_of(nodeid)
        return self.base if rel == b"/" else (self.base.rstrip("/") + os.fsdecode(rel))

    def child_path(self, parent: int, name: bytes) -> str:
        return self.abspath(parent).rstrip("/") + "/" + os.fsdecode(name)

    def _generation(self) -> int:
        """Cached per-node decisions hold while this is unchanged (rules changed or something was renamed)."""
        return self.core.rules_generation + self._epoch

    def reaches(self, nodeid: int) -> bool:
        """Whether some rule could concern this node or anything below it.

        When not, every request on the node (and, for a directory, on the names in it) is served as the
        plain pass-through: no path is built and no rule is matched. Decided once per node and rules
        generation; a node below one that no rule reaches is not reached either, without a check.
        """
        core = self.core
        gen = self._generation()
        nodes = self.lower.nodes
        node = nodes.get(nodeid)
        if node is None:
            return True  # an unknown or detached node: do not skip the rules
        if node.view is not None and node.view.layer is self:
            return True  # a view this layer's decision made: its handlers may serve it, rule or no rule
        state: NodeState | None = node.slots.get(self)
        hit = state.reach if state is not None else None
        if hit is not None and hit[0] == gen:
            return hit[1]
        # Walk up to the nearest node decided in this generation, then decide downwards.
        chain: list[Inode] = []
        above = True
        current: Inode | None = node
        while current is not None:
            chain.append(current)
            if current.nodeid == abi.ROOT_ID:
                break
            parent = nodes.get(current.parent)
            state = parent.slots.get(self) if parent is not None else None
            hit = state.reach if state is not None else None
            if hit is not None and hit[0] == gen:
                above = hit[1]
                break
            current = parent
        if current is None:
            return True  # a detached node: do not skip the rules
        reparse = core.reparse
        for n in reversed(chain):
            if above:
                path = self.abspath(n.nodeid)
                above = (self.in_scope(path) or self._on_way_to_scope(path)) and (
                    core.rules.may_reach(path) or (len(reparse) > 0 and reparse.may_reach(path)))
            self.state_of(n).reach = (gen, above)
        return above

    def state_of(self, node: Inode) -> NodeState:
        """This layer's slot in a node record."""
        state: NodeState | None = node.slots.get(self)
        if state is None:
            state = node.slots.setdefault(self, NodeState())
        return state

    def _state(self, nodeid: int) -> NodeState | None:
        node = self.lower.nodes.get(nodeid)
        return self.state_of(node) if node is not None else None

    def handle(self, fh: int) -> Handle | None:
        """This layer's slot in an open file's or directory's record (None: it did not register the open)."""
        record = self.lower.files.get(fh) or self.lower.dirs.get(fh)
        return record.slots.get(self) if record is not None else None

    def _keep_handle(self, fh: int, handle: Handle) -> None:
        record = self.lower.files.get(fh) or self.lower.dirs.get(fh)
        if record is not None:
            record.slots[self] = handle

    def _drop_handle(self, fh: int) -> Handle | None:
        record = self.lower.files.get(fh) or self.lower.dirs.get(fh)
        return record.slots.pop(self, None) if record is not None else None

    def handles(self) -> list[Handle]:
        """This layer's handles of every open file and directory."""
        records = list(self.lower.files.values()) + list(self.lower.dirs.values())
        return [h for h in (r.slots.get(self) for r in records) if h is not None]

    def left(self) -> None:
        """The layer left its stack: its views and virtual files go, and its slots are emptied (the records outlive
        it)."""
        if self.serves_views:
            self.lower.drop_views(self)
        for record in list(self.lower.nodes.values()) + list(self.lower.files.values()) + list(
                self.lower.dirs.values()):
            record.slots.pop(self, None)

    def match_node(self, nodeid: int) -> PathMatch | None:
        core = self.core
        if not self.reaches(nodeid):
            return None
        gen = self._generation()
        state = self._state(nodeid)
        hit = state.match if state is not None else None
        if hit is not None and hit[0] == gen:
            return hit[1]
        path = self.abspath(nodeid)
        m = match_path(core.rules, core.passthrough_rules, path) if self.in_scope(path) else None
        if state is not None:
            state.match = (gen, m)
        return m

    def restricts(self, path: str) -> bool:
        """Whether this filter's access rules or control events could apply at ``path`` or below it: a redirect
        into it by another filter would take requests past them. Coarse on purpose (any rule that restricts and
        may reach the subtree counts): it is asked only when a name is redirected."""
        core = self.core
        if not (self.in_scope(path) or self._on_way_to_scope(path)):
            return False
        if not any(rule.access or rule.control & core.control_handlers for rule in core.rules):
            return False
        return core.rules.may_reach(path)

    def match_name(self, path: str) -> PathMatch | None:
        core = self.core
        if not core.has_rules or not self.in_scope(path):
            return None
        return match_path(core.rules, core.passthrough_rules, path)

    def is_own(self, tid: int) -> bool:
        """Whether the request comes from the filter's own application: this process, or the process that attached
        the filter to a service's stack (its requests are the application's own, as they are embedded)."""
        if libc.is_own_thread(tid):
            return True
        owner = self.core.owner_pid
        return owner != 0 and (tid == owner or libc.is_thread_of(owner, tid))

    def effective(self, m: PathMatch | None, tid: int, node: Inode | None = None, parent: Inode | None = None,
                  name: bytes = b"", planned: int | None = None) -> Flags:
        """What the rules ask for this request: exact, with the process and the facts of the file (an open
        ``node``, or ``name`` in the directory ``parent``) that size/attribute/xattr qualifiers look at.
        ``planned``: a create's attributes for the object it makes (qualifiers see those while it does not exist)."""
        if m is None:
            return NO_FLAGS
        up = m.upper
        if not (up.access or up.control or up.notify):
            return NO_FLAGS
        if m.unconditional:
            f = up
        else:
            facts = Facts(node.fd, -1, node.name) if node is not None else (
                Facts(-1, parent.fd, name, planned) if parent is not None else None)
            f = m.flags(ProcessInfo(tid) if tid else None, facts)
        if (f.access or f.control or f.notify) and not self.core.filter_own_requests and self.is_own(tid):
            return NO_FLAGS
        state = node.slots.get(self) if node is not None else None
        if state is not None and state.suspended and (f.control or f.notify):
            return Flags(f.access, 0, 0)  # events suspended; access rules still hold
        return f

    def suspend_events(self, nodeid: int) -> None:
        """suspend_file_events: no events for this node until all its handles are closed."""
        state = self._state(nodeid)
        if state is not None:
            state.suspended = True

    def route(self, op: ops.Op) -> bool | None:
        """Session router: requests that may fire a control event of this filter go to the pool (True); our own
        stay on the reader (False); None: this layer does not care."""
        core = self.core
        if self.serves_views:
            # A name may resolve to a handler-served view, whose attributes its handlers give; its other requests
            # fire handlers whatever the rules say.
            node = self.lower.nodes.get(op.nodeid)
            if op.opcode == abi.Opcode.LOOKUP or (node is not None and node.view is not None
                                                  and node.view.layer is self):
                return not self.is_own(op.pid)
        if not core.has_rules:
            return None
        opcode = op.opcode
        bits = OP_CONTROL.get(opcode)
        if not bits or not (core.control_handlers & bits):
            return None
        if isinstance(op, ops.Rename | ops.Link):
            if op.nodeid not in self.lower.nodes:
                return None
            return not self.is_own(op.pid)  # two names, either may match: the pool, to be safe
        if not self.reaches(op.nodeid):
            return None
        m: PathMatch | None
        if isinstance(op, ops.Lookup | ops.Create | ops.Mkdir | ops.Mknod | ops.Symlink | ops.Remove):
            if op.nodeid not in self.lower.nodes:
                return None
            m = self.name_match(op, op.name)
        else:
            m = self.match_node(op.nodeid)
        if m is None or not (m.upper.control & bits):
            return None
        return not self.is_own(op.pid)

    def name_match(self, op: ops.Op, name: bytes, parent: int | None = None) -> PathMatch | None:
        """The match of ``name`` in the node of ``op`` (or in ``parent``), decided once per request."""
        key = (self, parent, name)
        if op.memo is not None and key in op.memo:
            known: PathMatch | None = op.memo[key]
            return known
        m = self.match_name(self.child_path(op.nodeid if parent is None else parent, name))
        op.remember(key, m)
        return m

    def origin(self, op: ops.Op) -> Origin:
        return Origin(op.pid, op.pid, op.uid, op.gid)

    def fire(self, event: Callable[P, T], bit: int, flags: Flags, origin: Origin, creator: Origin | None = None,
             subject: object = None, /, *args: P.args, **fields: P.kwargs) -> T | None:
        """Fire the control event whose parameter class is ``event``, if the rules ask for it (``bit``) and a handler
        is set; its fields are checked against the class by mypy. Raises OSError when the handler fails the request
        (result_code), when it raised, or when it expired with DenyExpiredEvents. ``creator``: who opened the handle
        the event is about; ``subject``: what suspend_file_events acts on."""
        if not flags.control & bit:
            return None
        handler = self.core.handler(EVENT_OF[event])
        if handler is None:
            return None
        params = event(*args, **fields)
        with self.lower.interruptible() as interrupted:
            outcome = self.core.dispatcher.call(handler, params, origin, creator, subject)
        if interrupted():
            # The caller was interrupted (killed, as a rule) while the handler ran, and has had EINTR: the
            # request must have no effect now, whatever the handler decided.
            raise OSError(errno.EINTR, "the caller was interrupted while the event handler ran")
        if outcome is Outcome.EXPIRED:
            if self.core.deny_expired_events:
                raise OSError(errno.ETIMEDOUT, "the event handler did not answer in time")
            return None
        if outcome is Outcome.FAILED:
            raise OSError(errno.EIO, "the event handler raised")
        code = params.result_code
        if code:
            raise OSError(int(code), os.strerror(int(code)))
        return params

    def notify(self, event: Callable[P, EventParamsBase], bit: int, flags: Flags, origin: Origin,
               creator: Origin | None = None, /, *args: P.args, **fields: P.kwargs) -> None:
        """Queue the notification whose parameter class is ``event`` if the rules ask for it and a handler is set."""
        if not flags.notify & bit:
            return
        handler = self.core.handler(EVENT_OF[event])
        if handler is None:
            return
        for who in (origin, creator):  # the process may be gone when the handler runs: read it now
            if who is not None and who.name is None:
                info = ProcessInfo(who.tid)
                who.name, who.pid = info.image, info.pid
        self.core.dispatcher.post(handler, event(*args, **fields), origin, creator)

    def after_ok(self, error: int) -> bool:
        return error == 0 or self.core.process_failed_requests

    def _served(self, serve: Callable[[], Reply]) -> tuple[Reply | None, int]:
        """The reply of the layers below, or their errno when After events see failed requests (else it is
        raised at once)."""
        try:
            return serve(), 0
        except OSError as exc:
            error = exc.errno or errno.EIO
            if not self.after_ok(error):
                raise
            return None, error

    def _refuse(self, op: ops.Op, what: str) -> None:
        """An access rule refuses ``op``: raise EACCES, unless the filter's rules are permissive (they log what they
        would refuse and let it through). Logged once per request and layer."""
        key = (self, "refused")
        refuse = op.recall(key)
        if refuse is None:
            name = getattr(op, "name", None)
            path = self.child_path(op.nodeid, name) if isinstance(name, bytes) and name else self.abspath(op.nodeid)
            refuse = op.remember(key, self.core.access_denied(path, op.opcode, op.pid, op.uid, what))
        if not refuse:
            return
        raise OSError(errno.EACCES, f"denied by an access rule: {what}")

    def _node_opened(self, nodeid: int, file_context: int) -> None:
        state = self._state(nodeid)
        if state is None:
            return
        with self._ctx_lock:
            state.opens += 1
            if file_context:
                state.file_context = file_context

    def _node_closed(self, nodeid: int, handle: Handle) -> None:
        state = self._state(nodeid)
        file_context = 0
        if state is not None:
            with self._ctx_lock:
                state.opens = max(0, state.opens - 1)
                if not state.opens:
                    state.suspended = False
                    file_context, state.file_context = state.file_context, 0
        if handle.own_context is not None:
            file_context = handle.own_context  # an isolated open's own (its node keeps none)
        if file_context or handle.context:
            handler = self.core.handler("cleanup_context")
            if handler is not None:
                params = ev.CBFilterCleanupContextEventParams(file_context=file_context, handle_context=handle.context)
                self.core.dispatcher.call(handler, params, handle.origin)

    def file_context(self, nodeid: int) -> int:
        node = self.lower.nodes.get(nodeid)
        state = node.slots.get(self) if node is not None else None
        return state.file_context if state is not None else 0

    def _handle_ctx(self, nodeid: int, handle: Handle | None) -> dict[str, Any]:
        """The context fields of an event about an open handle."""
        if handle is not None and handle.own_context is not None:
            return dict(file_context=handle.own_context, handle_context=handle.context)
        return dict(file_context=self.file_context(nodeid), handle_context=handle.context if handle else 0)

    def _set_file_context(self, nodeid: int, value: int, handle: Handle | None = None) -> None:
        if handle is not None and handle.own_context is not None:
            handle.own_context = value
            return
        state = self._state(nodeid)
        if state is None:
            return
        with self._ctx_lock:
            if state.opens:
                state.file_context = value

    def _io_flags(self, op: ops.Op, node: Inode, handle: Handle | None) -> tuple[Flags, Origin]:
        m = self.match_node(node.nodeid)
        if op.pid == 0 and handle is not None:  # write-back and read-ahead run without a caller
            origin = handle.origin
            return self.effective(m, origin.tid, node), origin
        return self.effective(m, op.pid, node), self.origin(op)

    def _direction(self, handle: Handle | None, direct: bool) -> int:
        if not direct:
            return c.FS_REQUEST_DIR_SYSTEM_NONCACHED
        if handle is not None and handle.flags & os.O_DIRECT:
            return c.FS_REQUEST_DIR_USER_NONCACHED
        return c.FS_REQUEST_DIR_USER_CACHED

    def _any_volatile(self) -> bool:
        """Whether any path can be volatile (see _volatile): a handler for a volatile bit, or an access rule."""
        core = self.core
        if core.control_handlers & VOLATILE:
            return True
        gen = core.rules.generation
        if self._access_rules[0] != gen:
            self._access_rules = (gen, any(rule.access for rule in core.rules))
        return self._access_rules[1]

    def _volatile(self, m: PathMatch) -> bool:
        up = m.upper
        return bool(up.control & VOLATILE & self.core.control_handlers) or bool(
            up.access and not m.unconditional)

    def _keep_match(self, entry: Entry, m: PathMatch) -> None:
        """Cache the match of the path an entry reply just named, under the node id it gave."""
        state = self._state(entry.nodeid) if entry.nodeid else None
        if state is not None:
            state.match = (self._generation(), m)

    def _after_open(self, created: bool, bits: tuple[int, int, int], flags: Flags, origin: Origin,
                    fields: dict[str, Any], error: int, file_context: int, handle_context: int,
                    subject: tuple[FilterBase, int] | None = None) -> tuple[int, int]:
        # Picked by name (the kind decides), so typed as some event's parameters: mypy cannot know the fields.
        kind = "create" if created else "open"
        after_event = FILTER_PARAMS[f"after_{kind}_file"]
        after = self.fire(after_event, bits[1], flags, origin, None, subject, status=error, file_context=file_context,
                          handle_context=handle_context, **fields)
        if after is not None:
            file_context, handle_context = after.file_context, after.handle_context
        notice = FILTER_PARAMS[f"notify_{kind}_file"]
        self.notify(notice, bits[2], flags, origin, status=error, **fields)
        return file_context, handle_context

    def _unlock_all(self, op: ops.Op, node: Inode, handle: Handle | None, drop: Callable[[], bool]) -> None:
        """Locks that go with a close (FLUSH: the caller's POSIX locks; RELEASE: the open file's flock and OFD
        locks). They go whatever the handlers say: a close cannot fail, and a lock kept past it would be
        kept forever."""
        flags, origin = self._io_flags(op, node, handle)
        if not (flags.control & LOCK_BITS[0] or flags.notify & LOCK_BITS[1]):
            drop()
            return
        path = handle.path if handle is not None else self.abspath(node.nodeid)
        ctx = self._handle_ctx(node.nodeid, handle)
        creator = handle.origin if handle else None
        try:
            self.fire(ev.CBFilterBeforeUnlockAllEventParams, c.FS_CE_BEFORE_LOCK_CONTROL, flags, origin, creator, None,
                      file_name=path, **ctx)
        except OSError:
            pass  # reported through on_error where it was a handler failure; the unlock happens anyway
        drop()
        try:
            self.fire(ev.CBFilterAfterUnlockAllEventParams, c.FS_CE_AFTER_LOCK_CONTROL, flags, origin, creator, None,
                      file_name=path, **ctx)
        except OSError:
            pass
        self.notify(ev.CBFilterNotifyUnlockAllEventParams, c.FS_NE_LOCK_CONTROL, flags, origin, creator, file_name=path)
