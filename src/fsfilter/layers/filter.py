"""The layer of one CBFilter in the stack of a mount: rules, access checks, events, contexts.

For each operation it finds what its filter's rules say about the path (cached per node, keyed by the rules'
generation), enforces access rules, fires the Before event (which may deny, change or complete the request),
has the layers below serve the request, fires the After event (which may change what the caller gets) and
queues the notification. A request this filter's rules cannot concern passes down untouched.

Paths in events are absolute paths as applications see them (the attach point plus the path below it).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import Any, Protocol

from fsfilter.abi import fuse as abi
from fsfilter.api import constants as c
from fsfilter.api.params import FILTER_PARAMS, EventParams
from fsfilter.engine.dispatch import Dispatcher, Origin, Outcome
from fsfilter.engine.reparse import ReparseRules
from fsfilter.engine.rules import NO_FLAGS, Flags, PathMatch, RuleSet, attributes_from_stat, match_path
from fsfilter.sessions.layer import Layer
from fsfilter.sessions.locks import F_UNLCK, F_WRLCK, OFFSET_MAX
from fsfilter.sessions.lower_fs import LowerFS, add_lock_finish
from fsfilter.sessions.nodes import Inode, OpenFile
from fsfilter.system import libc, procfs
from fsfilter.system.procfs import ProcessInfo
from fsfilter.wire import ops
from fsfilter.wire.fuse import StatLike
from fsfilter.wire.replies import (
    EMPTY,
    Attr,
    Created,
    Data,
    DirEntry,
    Entry,
    IoctlOut,
    Listing,
    Opened,
    Reply,
    StatView,
    Written,
    xattr_reply,
)


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


log = logging.getLogger("fsfilter.filter")

_FMODE_EXEC = 0x20  # in the open flags of execve's open
_ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
_XATTR_SIZE_MAX = 65536  # the largest xattr value Linux allows

# Control bits that make a path's names and attributes volatile: their answer can differ per request.
_VOLATILE = c.FS_CE_BEFORE_OPEN | c.FS_CE_BEFORE_CREATE | c.FS_CE_AFTER_GET_SIZES | c.FS_CE_REPARSE_FILENAME

# For each opcode, the control bits whose events it may fire: such a request is served on a pool thread.
_OP_CONTROL: dict[int, int] = {
    abi.Opcode.LOOKUP: c.FS_CE_BEFORE_OPEN | c.FS_CE_REPARSE_FILENAME,
    abi.Opcode.OPEN: c.FS_CE_BEFORE_OPEN | c.FS_CE_AFTER_OPEN,
    abi.Opcode.OPENDIR: c.FS_CE_BEFORE_OPEN | c.FS_CE_AFTER_OPEN,
    abi.Opcode.CREATE: c.FS_CE_BEFORE_CREATE | c.FS_CE_AFTER_CREATE | c.FS_CE_BEFORE_OPEN | c.FS_CE_AFTER_OPEN
    | c.FS_CE_REPARSE_FILENAME,
    abi.Opcode.MKDIR: c.FS_CE_BEFORE_CREATE | c.FS_CE_AFTER_CREATE | c.FS_CE_REPARSE_FILENAME,
    abi.Opcode.MKNOD: c.FS_CE_BEFORE_CREATE | c.FS_CE_AFTER_CREATE | c.FS_CE_REPARSE_FILENAME,
    abi.Opcode.SYMLINK: c.FS_CE_BEFORE_CREATE | c.FS_CE_AFTER_CREATE | c.FS_CE_REPARSE_FILENAME,
    abi.Opcode.READ: c.FS_CE_BEFORE_READ | c.FS_CE_AFTER_READ,
    abi.Opcode.WRITE: c.FS_CE_BEFORE_WRITE | c.FS_CE_AFTER_WRITE,
    abi.Opcode.FLUSH: c.FS_CE_BEFORE_CLEANUP | c.FS_CE_AFTER_CLEANUP | c.FS_CE_BEFORE_LOCK_CONTROL
    | c.FS_CE_AFTER_LOCK_CONTROL,
    abi.Opcode.RELEASE: c.FS_CE_BEFORE_CLOSE | c.FS_CE_AFTER_CLOSE | c.FS_CE_BEFORE_LOCK_CONTROL
    | c.FS_CE_AFTER_LOCK_CONTROL,
    abi.Opcode.SETLK: c.FS_CE_BEFORE_LOCK_CONTROL | c.FS_CE_AFTER_LOCK_CONTROL,
    abi.Opcode.SETLKW: c.FS_CE_BEFORE_LOCK_CONTROL | c.FS_CE_AFTER_LOCK_CONTROL,
    abi.Opcode.RELEASEDIR: c.FS_CE_BEFORE_CLOSE | c.FS_CE_AFTER_CLOSE | c.FS_CE_AFTER_ENUMERATE_DIRECTORY,
    abi.Opcode.READDIR: c.FS_CE_BEFORE_ENUMERATE_DIRECTORY | c.FS_CE_AFTER_ENUMERATE_DIRECTORY,
    abi.Opcode.READDIRPLUS: c.FS_CE_BEFORE_ENUMERATE_DIRECTORY | c.FS_CE_AFTER_ENUMERATE_DIRECTORY,
    abi.Opcode.UNLINK: c.FS_CE_BEFORE_CAN_DELETE | c.FS_CE_AFTER_CAN_DELETE | c.FS_CE_BEFORE_DELETE
    | c.FS_CE_AFTER_DELETE | c.FS_CE_REPARSE_FILENAME,
    abi.Opcode.RMDIR: c.FS_CE_BEFORE_CAN_DELETE | c.FS_CE_AFTER_CAN_DELETE | c.FS_CE_BEFORE_DELETE
    | c.FS_CE_AFTER_DELETE | c.FS_CE_REPARSE_FILENAME,
    abi.Opcode.RENAME: c.FS_CE_BEFORE_RENAME | c.FS_CE_AFTER_RENAME | c.FS_CE_REPARSE_FILENAME,
    abi.Opcode.RENAME2: c.FS_CE_BEFORE_RENAME | c.FS_CE_AFTER_RENAME | c.FS_CE_REPARSE_FILENAME,
    abi.Opcode.LINK: c.FS_CE_BEFORE_CREATE_HARD_LINK | c.FS_CE_AFTER_CREATE_HARD_LINK | c.FS_CE_REPARSE_FILENAME,
    abi.Opcode.SETATTR: c.FS_CE_BEFORE_SET_SIZES | c.FS_CE_AFTER_SET_SIZES | c.FS_CE_BEFORE_SET_ATTRIBUTES
    | c.FS_CE_AFTER_SET_ATTRIBUTES | c.FS_CE_BEFORE_SET_SECURITY | c.FS_CE_AFTER_SET_SECURITY,
    abi.Opcode.GETATTR: c.FS_CE_AFTER_GET_SIZES,
    abi.Opcode.FALLOCATE: c.FS_CE_BEFORE_SET_SIZES | c.FS_CE_AFTER_SET_SIZES,
    abi.Opcode.GETXATTR: c.FS_CE_BEFORE_GET_SECURITY | c.FS_CE_AFTER_GET_SECURITY | c.FS_CE_BEFORE_QUERY_EA
    | c.FS_CE_AFTER_QUERY_EA,
    abi.Opcode.LISTXATTR: c.FS_CE_BEFORE_QUERY_EA | c.FS_CE_AFTER_QUERY_EA,
    abi.Opcode.SETXATTR: c.FS_CE_BEFORE_SET_SECURITY | c.FS_CE_AFTER_SET_SECURITY | c.FS_CE_BEFORE_SET_EA
    | c.FS_CE_AFTER_SET_EA,
    abi.Opcode.REMOVEXATTR: c.FS_CE_BEFORE_SET_SECURITY | c.FS_CE_AFTER_SET_SECURITY | c.FS_CE_BEFORE_SET_EA
    | c.FS_CE_AFTER_SET_EA,
    abi.Opcode.READLINK: c.FS_CE_BEFORE_GET_REPARSE_POINT | c.FS_CE_AFTER_GET_REPARSE_POINT,
    abi.Opcode.IOCTL: c.FS_CE_BEFORE_IOCTL | c.FS_CE_AFTER_IOCTL,
}
_RW_BITS = (c.FS_CE_BEFORE_READ | c.FS_CE_AFTER_READ | c.FS_CE_BEFORE_WRITE | c.FS_CE_AFTER_WRITE, c.FS_NE_READ
            | c.FS_NE_WRITE)
_CLEANUP_BITS = (c.FS_CE_BEFORE_CLEANUP | c.FS_CE_AFTER_CLEANUP, c.FS_NE_CLEANUP)
_LOCK_BITS = (c.FS_CE_BEFORE_LOCK_CONTROL | c.FS_CE_AFTER_LOCK_CONTROL, c.FS_NE_LOCK_CONTROL)


class _Facts:
    """What size/attribute/xattr qualifiers of rules look at, read lazily from the lower object: an open
    node (``fd``) or a name in a lower directory (``dir_fd``, ``name``) that may not exist yet."""

    __slots__ = ("fd", "dir_fd", "name", "_st")

    def __init__(self, fd: int, dir_fd: int, name: bytes) -> None:
        self.fd = fd
        self.dir_fd = dir_fd
        self.name = name
        self._st: os.stat_result | None = None

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
        return st.st_size if st is not None else None

    def attributes(self) -> int | None:
        st = self._stat()
        return attributes_from_stat(st.st_mode, st.st_size, st.st_blocks, os.fsdecode(self.name)) \
            if st is not None else None

    def has_xattr(self, name: str) -> bool:
        where = procfs.fd_path(self.fd) if self.fd >= 0 else procfs.fd_path(self.dir_fd) + "/" + os.fsdecode(self.name)
        try:
            os.getxattr(where, name, follow_symlinks=False)
        except OSError:
            return False
        return True


class _Handle:
    """One open of a file or directory: its handle context and who opened it."""

    __slots__ = ("path", "context", "origin", "flags", "direct", "enum_context", "enumerated", "is_dir")

    def __init__(self, path: str, origin: Origin, flags: int, is_dir: bool = False) -> None:
        self.path = path
        self.context = 0
        self.origin = origin
        self.flags = flags
        self.direct = False
        self.enum_context = 0
        self.enumerated = False
        self.is_dir = is_dir


class FilterLayer(Layer):
    """The layer of one filter (``core``) in the stack of the mount at ``base``, whose bottom is ``lower``."""

    def __init__(self, lower: LowerFS, core: FilterCore, base: str, scope: str | None = None) -> None:
        super().__init__()
        self.lower = lower
        self.core = core
        self.base = base.rstrip("/") or "/"
        # The directory this filter is attached to: the mount's own, or one below it when the filter joined the
        # stack of an outer attach point. Nothing outside it (but the way to it) is this filter's business.
        self.scope = (scope or self.base).rstrip("/") or "/"
        self._matches: dict[int, tuple[int, PathMatch | None]] = {}
        self._access_rules = (-1, False)  # (rules generation, whether any rule has access flags)
        self._reach: dict[int, tuple[int, bool]] = {}  # nodeid -> (generation, can a rule concern its subtree)
        self._suspended: set[int] = set()  # nodes whose events suspend_file_events stopped until the last close
        self._file_contexts: dict[int, int] = {}  # nodeid -> file context, while the node has opens
        self._node_opens: dict[int, int] = {}  # nodeid -> opens (files and directories) with events
        self._handles: dict[int, _Handle] = {}
        self._epoch = 0  # bumped on renames: cached matches of moved subtrees are then stale
        self._ctx_lock = threading.Lock()
        self._naming = threading.local()  # (parent, name, match) of the name this thread is creating

    # -- what the tests and tools look at: the stack's tables

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

    # -- paths and matching

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
        hit = self._reach.get(nodeid)
        if hit is not None and hit[0] == gen:
            return hit[1]
        # Walk up to the nearest node decided in this generation, then decide downwards.
        chain: list[int] = []
        node = self.lower.nodes.get(nodeid)
        above = True
        while node is not None:
            chain.append(node.nodeid)
            if node.nodeid == abi.ROOT_ID:
                break
            hit = self._reach.get(node.parent)
            if hit is not None and hit[0] == gen:
                above = hit[1]
                break
            node = self.lower.nodes.get(node.parent)
        if node is None:
            return True  # an unknown or detached node: do not skip the rules
        reparse = core.reparse
        for n in reversed(chain):
            if above:
                path = self.abspath(n)
                above = (self.in_scope(path) or self._on_way_to_scope(path)) and (
                    core.rules.may_reach(path) or (len(reparse) > 0 and reparse.may_reach(path)))
            self._reach[n] = (gen, above)
        return above

    def match_node(self, nodeid: int) -> PathMatch | None:
        core = self.core
        if not self.reaches(nodeid):
            return None
        gen = self._generation()
        hit = self._matches.get(nodeid)
        if hit is not None and hit[0] == gen:
            return hit[1]
        path = self.abspath(nodeid)
        m = match_path(core.rules, core.passthrough_rules, path) if self.in_scope(path) else None
        self._matches[nodeid] = (gen, m)
        return m

    def match_name(self, path: str) -> PathMatch | None:
        core = self.core
        if not core.has_rules or not self.in_scope(path):
            return None
        return match_path(core.rules, core.passthrough_rules, path)

    @staticmethod
    def is_own(tid: int) -> bool:
        return libc.is_own_thread(tid)

    def effective(self, m: PathMatch | None, tid: int, node: Inode | None = None, parent: Inode | None = None,
                  name: bytes = b"") -> Flags:
        """What the rules ask for this request: exact, with the process and the facts of the file (an open
        ``node``, or ``name`` in the directory ``parent``) that size/attribute/xattr qualifiers look at."""
        if m is None:
            return NO_FLAGS
        up = m.upper
        if not (up.access or up.control or up.notify):
            return NO_FLAGS
        if m.unconditional:
            f = up
        else:
            facts = _Facts(node.fd, -1, node.name) if node is not None else (
                _Facts(-1, parent.fd, name) if parent is not None else None)
            f = m.flags(ProcessInfo(tid) if tid else None, facts)
        if (f.access or f.control or f.notify) and not self.core.filter_own_requests and self.is_own(tid):
            return NO_FLAGS
        if node is not None and node.nodeid in self._suspended and (f.control or f.notify):
            return Flags(f.access, 0, 0)  # events suspended; access rules still hold
        return f

    def suspend_events(self, nodeid: int) -> None:
        """suspend_file_events: no events for this node until all its handles are closed."""
        self._suspended.add(nodeid)

    def route(self, op: ops.Op) -> bool | None:
        """Session router: requests that may fire a control event of this filter go to the pool (True); our own
        stay on the reader (False); None: this layer does not care."""
        core = self.core
        if not core.has_rules:
            return None
        opcode = op.opcode
        bits = _OP_CONTROL.get(opcode)
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

    # -- firing

    def origin(self, op: ops.Op) -> Origin:
        return Origin(op.pid, op.pid, op.uid, op.gid)

    def fire(self, event: str, bit: int, flags: Flags, origin: Origin, /, *, creator: Origin | None = None,
             subject: object = None, **fields: Any) -> EventParams | None:
        """Fire a control event if the rules ask for it and a handler is set. Raises OSError when the handler
        fails the request (result_code), when it raised, or when it expired with DenyExpiredEvents.
        ``creator``: who opened the handle the event is about; ``subject``: what suspend_file_events acts on."""
        if not flags.control & bit:
            return None
        handler = self.core.handler(event)
        if handler is None:
            return None
        params = FILTER_PARAMS[event](**fields)
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

    def notify(self, event: str, bit: int, flags: Flags, origin: Origin, /, *, creator: Origin | None = None,
               **fields: Any) -> None:
        if not flags.notify & bit:
            return
        handler = self.core.handler(event)
        if handler is None:
            return
        for who in (origin, creator):  # the process may be gone when the handler runs: read it now
            if who is not None and who.name is None:
                info = ProcessInfo(who.tid)
                who.name, who.pid = info.name, info.pid
        self.core.dispatcher.post(handler, FILTER_PARAMS[event](**fields), origin, creator)

    def after_ok(self, error: int) -> bool:
        return error == 0 or self.core.process_failed_requests

    def _deny(self, what: str) -> OSError:
        return OSError(errno.EACCES, f"denied by an access rule: {what}")

    # -- contexts

    def _node_opened(self, nodeid: int, file_context: int) -> None:
        with self._ctx_lock:
            self._node_opens[nodeid] = self._node_opens.get(nodeid, 0) + 1
            if file_context:
                self._file_contexts[nodeid] = file_context

    def _node_closed(self, nodeid: int, handle: _Handle) -> None:
        with self._ctx_lock:
            left = self._node_opens.get(nodeid, 1) - 1
            if left > 0:
                self._node_opens[nodeid] = left
                file_context = 0
            else:
                self._node_opens.pop(nodeid, None)
                self._suspended.discard(nodeid)
                file_context = self._file_contexts.pop(nodeid, 0)
        if file_context or handle.context:
            handler = self.core.handler("cleanup_context")
            if handler is not None:
                params = FILTER_PARAMS["cleanup_context"](file_context=file_context, handle_context=handle.context)
                self.core.dispatcher.call(handler, params, handle.origin)

    def file_context(self, nodeid: int) -> int:
        return self._file_contexts.get(nodeid, 0)

    # -- names

    def where(self, op: ops.Op | None, parent: Inode, name: bytes) -> tuple[int, bytes, bool] | None:
        """Reparse: a name that a reparse rule (or an on_reparse_file_name handler) redirects is served from
        its target, resolved below the filter: looked up, created and deleted there."""
        core = self.core
        if not (len(core.reparse) or core.control_handlers & c.FS_CE_REPARSE_FILENAME) \
                or not self.reaches(parent.nodeid):
            return None
        target = self.reparse_target(op, parent, name)
        if target is None:
            return None
        if core.contains_attach_point(target):
            # Served from there, the filter's own mount would be reached through the redirect: a loop.
            raise OSError(errno.ELOOP, f"{target}, where {self.child_path(parent.nodeid, name)} is redirected, "
                                       "contains a directory this filter is attached to")
        head, tail = os.path.split(target)
        if core.is_attach_point(target):
            dfd, tail = core.open_below(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), "."
        else:
            dfd = core.open_below(head, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.stat(tail, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        except BaseException:
            os.close(dfd)
            raise
        if st is not None and stat.S_ISDIR(st.st_mode) and self._is_ancestor(parent, (st.st_dev, st.st_ino)):
            os.close(dfd)
            raise OSError(errno.ELOOP, f"{self.child_path(parent.nodeid, name)} is redirected to its own ancestor "
                                       f"{target}")
        return dfd, os.fsencode(tail), True

    def reparse_target(self, op: ops.Op | None, parent: Inode, name: bytes) -> str | None:
        """Where a name is redirected (an absolute path), or None."""
        core = self.core
        path = self.child_path(parent.nodeid, name)
        if not self.in_scope(path):
            return None
        hit = core.reparse.resolve(path) if len(core.reparse) else None
        target = hit[0] if hit is not None else None
        if op is not None and core.control_handlers & c.FS_CE_REPARSE_FILENAME:
            flags = self.effective(self.match_name(path), op.pid, parent=parent, name=name)
            params = self.fire("reparse_file_name", c.FS_CE_REPARSE_FILENAME, flags, self.origin(op),
                               file_name=path, reparsed_name=target or "")
            if params is not None:
                chosen = params.reparsed_name
                if chosen and (not isinstance(chosen, str) or not chosen.startswith("/")):
                    raise OSError(errno.EINVAL, f"on_reparse_file_name gave {chosen!r}: give an absolute path")
                target = os.path.normpath(chosen) if chosen else None
        if target is None or target == path or target == "/":
            return None
        return target

    def _is_ancestor(self, node: Inode, key: tuple[int, int]) -> bool:
        seen = 0
        current: Inode | None = node
        while current is not None and seen < 4096:
            if current.key == key:
                return True
            if current.nodeid == abi.ROOT_ID:
                return False
            current = self.lower.nodes.get(current.parent)
            seen += 1
        return False

    def _redirected(self, op: ops.Op, parent: Inode, name: bytes) -> bool:
        core = self.core
        if not (len(core.reparse) or core.control_handlers & c.FS_CE_REPARSE_FILENAME):
            return False
        return self.reaches(parent.nodeid) and self.reparse_target(op, parent, name) is not None

    def lookup(self, op: ops.Lookup) -> Reply:
        if not self.reaches(op.nodeid):
            return self.down.lookup(op)
        parent = self.lower.inode(op.nodeid)
        name = op.name
        path = self.child_path(parent.nodeid, name)
        m = self.name_match(op, name)
        flags = self.effective(m, op.pid, parent=parent, name=name)
        if flags.access & c.ACCESS_DENY_ALL and not (flags.control & c.FS_CE_BEFORE_OPEN
                                                     and self.core.handler("before_open_file")):
            raise self._deny("deny all")
        if flags.control & c.FS_CE_BEFORE_OPEN:
            # Resolving a name is Linux's equivalent of Windows opening a file to read its attributes: a
            # before-open handler sees it (desired_access FILE_READ_ATTRIBUTES, flags O_PATH) and can refuse
            # it, so that a hidden name stays hidden from stat and path walks, not only from open.
            self._fire_lookup(op, flags, path)
        reply = self.down.lookup(op)
        if m is not None and isinstance(reply, Entry):
            self._keep_match(reply, m)
            if self._volatile(m):
                reply.uncached()
        return reply

    # -- hidden names: absent for every operation that names them

    def _fire_lookup(self, op: ops.Op, flags: Flags, path: str) -> None:
        """The before-open event a LOOKUP fires (raises OSError when the handler refuses the name)."""
        self.fire("before_open_file", c.FS_CE_BEFORE_OPEN, flags, self.origin(op), file_name=path,
                  desired_access=c.DESIRED_ACCESS_FILE_READ_ATTRIBUTES, options=os.O_PATH, flags=os.O_PATH,
                  create_disposition=c.FILE_DISPOSITION_OPEN_EXISTING)

    def _lookup_refusal(self, op: ops.Op, parent: Inode, name: bytes, path: str | None = None) -> int:
        """The errno a LOOKUP of this *existing* name would get from the before-open handler (0: none, or the
        name does not exist). A name hidden that way must behave as absent for every request naming it."""
        core = self.core
        if not core.control_handlers & c.FS_CE_BEFORE_OPEN or core.handler("before_open_file") is None:
            return 0
        path = self.child_path(parent.nodeid, name) if path is None else path
        flags = self.effective(self.match_name(path), op.pid, parent=parent, name=name)
        if not flags.control & c.FS_CE_BEFORE_OPEN:
            return 0
        dfd, at, owned = self.lower.locate(None, parent, name)
        try:
            os.stat(at, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return 0
        finally:
            if owned:
                os.close(dfd)
        try:
            self._fire_lookup(op, flags, path)
        except OSError as exc:
            return exc.errno or errno.EACCES
        return 0

    def _check_not_hidden(self, op: ops.Op, parent: Inode, name: bytes) -> None:
        """Refuse to create, link or rename over a name a handler hides. Doing it would destroy the hidden object
        (or fail with EEXIST, which reveals it): EACCES says neither."""
        if self._lookup_refusal(op, parent, name):
            raise OSError(errno.EACCES, "the name is hidden by an event handler")

    def _hidden_emptiness(self, op: ops.Op, parent: Inode, name: bytes, serve: Callable[[], Reply]) -> Reply:
        """Serve an rmdir of, or a rename over, the directory ``name``; its ENOTEMPTY becomes EACCES when every
        entry left in it is hidden (ENOTEMPTY would reveal them)."""
        try:
            return serve()
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY and self._only_hidden_inside(op, parent, name):
                raise OSError(errno.EACCES, "the directory holds hidden names") from exc
            raise

    def _only_hidden_inside(self, op: ops.Op, parent: Inode, name: bytes) -> bool:
        """Whether the directory ``name`` holds entries, all of them hidden. Stops at the first visible entry."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        except OSError:
            return False
        try:
            inside = Inode(-1, fd, (0, 0), parent.nodeid, name)  # only its fd is used: rules' facts and the names
            path = self.child_path(parent.nodeid, name)
            seen = False
            for entry in os.scandir(fd):
                seen = True
                if not self._lookup_refusal(op, inside, os.fsencode(entry.name), f"{path}/{entry.name}"):
                    return False
            return seen
        finally:
            os.close(fd)

    def _hiding_children(self, nodeid: int) -> bool:
        """Whether a handler may hide names in this directory (then its link count, which counts
        subdirectories, would give hidden ones away)."""
        core = self.core
        if not core.control_handlers & (c.FS_CE_BEFORE_OPEN | c.FS_CE_AFTER_ENUMERATE_DIRECTORY) or \
                not core.config_bool("HideDirectoryLinkCounts"):
            return False
        return self.reaches(nodeid) and core.rules.may_match_child(self.abspath(nodeid))

    def shown(self, nodeid: int, st: StatLike) -> StatLike:
        if stat.S_ISDIR(st.st_mode) and self._hiding_children(nodeid):
            # A directory's link count counts its subdirectories, and its size grows with its entries (tmpfs: 20
            # bytes each): both would give hidden names away. Link count 1 is what file systems without
            # subdirectory counts (btrfs) report, and find(1) copes with it; the size shown is one block's.
            return StatView(st, size=4096, blocks=8, nlink=1)
        return st

    def _keep_match(self, entry: Entry, m: PathMatch) -> None:
        """Cache the match of the path an entry reply just named, under the node id it gave."""
        if entry.nodeid:
            self._matches[entry.nodeid] = (self._generation(), m)

    def _any_volatile(self) -> bool:
        """Whether any path can be volatile (see _volatile): a handler for a volatile bit, or an access rule."""
        core = self.core
        if core.control_handlers & _VOLATILE:
            return True
        gen = core.rules.generation
        if self._access_rules[0] != gen:
            self._access_rules = (gen, any(rule.access for rule in core.rules))
        return self._access_rules[1]

    def _volatile(self, m: PathMatch) -> bool:
        up = m.upper
        return bool(up.control & _VOLATILE & self.core.control_handlers) or bool(
            up.access and not m.unconditional)

    def remembered(self, node: Inode) -> None:
        naming = getattr(self._naming, "entry", None)
        if naming is not None and naming[0] == node.parent and naming[1] == node.name:
            # The new node's path was just matched: cache it before the open reply asks for it.
            self._matches[node.nodeid] = (self._generation(), naming[2])

    def dropped(self, nodeid: int) -> None:
        self._matches.pop(nodeid, None)
        self._reach.pop(nodeid, None)

    def getattr(self, op: ops.Getattr) -> Reply:
        reply = self.down.getattr(op)
        m = self.match_node(op.nodeid)
        if m is None or not (m.upper.control & c.FS_CE_AFTER_GET_SIZES or m.upper.notify & c.FS_NE_GET_SIZES):
            return reply
        flags = self.effective(m, op.pid, self.lower.inode(op.nodeid))
        if not (flags.control & c.FS_CE_AFTER_GET_SIZES or flags.notify & c.FS_NE_GET_SIZES):
            return reply
        st = os.fstat(self.lower.inode(op.nodeid).fd)
        path = self.abspath(op.nodeid)
        origin = self.origin(op)
        size, alloc = st.st_size, st.st_blocks * 512
        p = self.fire("after_get_file_sizes", c.FS_CE_AFTER_GET_SIZES, flags, origin, file_name=path, size=size,
                      allocation_size=alloc, file_context=self.file_context(op.nodeid))
        timeout = self.lower.options.attr_timeout
        if p is not None:
            size, alloc, timeout = int(p.size), int(p.allocation_size), 0.0
        self.notify("notify_get_file_sizes", c.FS_NE_GET_SIZES, flags, origin, file_name=path, size=size,
                    allocation_size=alloc)
        if p is None:
            return reply
        return Attr(self.lower.attributes(op.nodeid, StatView(st, size=size, blocks=(alloc + 511) // 512)), timeout)

    # -- create and open

    def _check_open_access(self, flags: Flags, open_flags: int, creating: bool) -> None:
        access = flags.access
        if not access:
            return
        handled = c.FS_CE_BEFORE_CREATE if creating else c.FS_CE_BEFORE_OPEN
        if flags.control & handled and self.core.handler("before_create_file" if creating else "before_open_file"):
            return  # a create/open callback decides instead of the access rule (the SDK's precedence)
        mode = open_flags & os.O_ACCMODE
        writes = mode in (os.O_WRONLY, os.O_RDWR) or bool(open_flags & os.O_TRUNC) or creating
        if access & c.ACCESS_DENY_ALL:
            raise self._deny("deny all")
        if access & c.ACCESS_READ_ONLY and writes:
            raise self._deny("read-only")
        if access & c.ACCESS_WRITE_ONLY and mode in (os.O_RDONLY, os.O_RDWR) and not creating:
            raise self._deny("write-only")
        if access & c.ACCESS_EXECUTE_PROTECT and open_flags & _FMODE_EXEC:
            raise self._deny("execute-protect")

    def open(self, op: ops.Open) -> Reply:
        if not self.reaches(op.nodeid):
            return self.down.open(op)
        node = self.lower.inode(op.nodeid)
        m = self.match_node(node.nodeid)
        flags = self.effective(m, op.pid, node)
        self._check_open_access(flags, op.flags, False)
        return self._open_with_events(op, node, op.flags, flags, lambda: self.down.open(op), created=False)

    def _open_fields(self, path: str, open_flags: int, mode: int, created: bool, is_dir: bool) -> dict[str, Any]:
        attributes = c.FILE_SYS_ATTR_DIRECTORY if is_dir else 0
        return dict(file_name=path, desired_access=_desired_access(open_flags), attributes=attributes,
                    options=open_flags, flags=open_flags, mode=mode,
                    create_disposition=_disposition(open_flags, created))

    def _open_with_events(self, op: ops.Op, node: Inode, open_flags: int, flags: Flags,
                          serve: Callable[[], Reply], created: bool, mode: int = 0, path: str | None = None,
                          is_dir: bool = False, context_node: int = 0) -> Reply:
        """Fire before/after/notify open (or create) around ``serve`` and register the new handle.

        ``node`` is the object opened, or for CREATE the directory (``context_node``: the existing object
        it opens, if known)."""
        path = path if path is not None else self.abspath(node.nodeid)
        origin = self.origin(op)
        kind = "create" if created else "open"
        bits = (c.FS_CE_BEFORE_CREATE, c.FS_CE_AFTER_CREATE, c.FS_NE_CREATE) if created else (
            c.FS_CE_BEFORE_OPEN, c.FS_CE_AFTER_OPEN, c.FS_NE_OPEN)
        fields = self._open_fields(path, open_flags, mode, created, is_dir)
        file_context = 0 if created else self.file_context(context_node or node.nodeid)
        handle_context = 0
        before = self.fire(f"before_{kind}_file", bits[0], flags, origin, file_context=file_context, **fields)
        if before is not None:
            if not before.process_request:
                raise OSError(errno.EACCES, "the event handler completed the open without a file")
            file_context, handle_context = int(before.file_context), int(before.handle_context)
        error = 0
        try:
            reply = serve()
        except OSError as exc:
            error = exc.errno or errno.EIO
            if self.after_ok(error):
                self._after_open(kind, bits, flags, origin, fields, error, file_context, handle_context)
            raise
        opened = reply.opened if isinstance(reply, Created) else reply
        assert isinstance(opened, Opened)
        fh = opened.fh
        # A CREATE reply starts with the new object's entry: its node id is the one the handle is on.
        nodeid = reply.entry.nodeid if isinstance(reply, Created) else node.nodeid
        try:
            file_context, handle_context = self._after_open(kind, bits, flags, origin, fields, 0, file_context,
                                                            handle_context, (self, nodeid))
        except BaseException:
            self._undo_open(op, fh, is_dir)
            if nodeid not in self._node_opens:
                self._suspended.discard(nodeid)
            raise
        handle = _Handle(path, origin, open_flags, is_dir)
        handle.context = handle_context
        self._node_opened(nodeid, file_context)
        self._handles[fh] = handle
        return reply

    def _after_open(self, kind: str, bits: tuple[int, int, int], flags: Flags, origin: Origin,
                    fields: dict[str, Any], error: int, file_context: int, handle_context: int,
                    subject: tuple[FilterLayer, int] | None = None) -> tuple[int, int]:
        after = self.fire(f"after_{kind}_file", bits[1], flags, origin, status=error, file_context=file_context,
                          handle_context=handle_context, subject=subject, **fields)
        if after is not None:
            file_context, handle_context = int(after.file_context), int(after.handle_context)
        self.notify(f"notify_{kind}_file", bits[2], flags, origin, status=error, **fields)
        return file_context, handle_context

    def _undo_open(self, op: ops.Op, fh: int, is_dir: bool) -> None:
        """Close an open the layers below granted and this layer's After handler refused: they see it closed."""
        release = ops.Release.undoing(op, fh)
        try:
            if is_dir:
                self.down.releasedir(release)
            else:
                self.down.release(release)
        except OSError:
            pass

    def create(self, op: ops.Create) -> Reply:
        if not self.reaches(op.nodeid):
            return self.down.create(op)
        open_flags, mode, name = op.flags, op.mode, op.name
        parent = self.lower.inode(op.nodeid)
        path = self.child_path(parent.nodeid, name)
        m = self.name_match(op, name)
        flags = self.effective(m, op.pid, parent=parent, name=name)
        # The kernel sends CREATE for open(O_CREAT) whenever the name is not in its cache, whether or not
        # the file exists. Opening an existing file is an open (with the events and access checks of one,
        # and a hiding before-open handler refuses it), a new one a create.
        existing: os.stat_result | None = None
        if flags:  # with no rule on the name the kind of open decides nothing: save the syscall
            dfd, at, owned = self.lower.locate(None, parent, name)  # reparse rules apply (no event fired here)
            try:
                existing = os.stat(at, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                pass
            finally:
                if owned:
                    os.close(dfd)
        if existing is not None:
            self._check_not_hidden(op, parent, name)
        created = existing is None or bool(open_flags & os.O_EXCL)
        self._check_open_access(flags, open_flags, created)
        known = self.lower.by_key.get((existing.st_dev, existing.st_ino)) if existing is not None else None
        self._naming.entry = (parent.nodeid, name, m) if m is not None else None
        try:
            reply = self._open_with_events(op, parent, open_flags, flags, lambda: self.down.create(op),
                                           created=created, mode=mode, path=path,
                                           context_node=known.nodeid if known is not None else 0)
        finally:
            self._naming.entry = None
        if m is not None and self._volatile(m) and isinstance(reply, Created):
            reply.entry.uncached()
        return reply

    def tmpfile(self, op: ops.Create) -> Reply:
        if self.reaches(op.nodeid) and self.core.rules.may_match_child(self.abspath(op.nodeid)):
            # An unnamed file would be written before any rule could see a name for it, then linked in
            # under one: refuse, and callers fall back to a named temporary file, which the rules see.
            raise OSError(errno.EOPNOTSUPP, "O_TMPFILE is not available where filter rules apply")
        return self.down.tmpfile(op)

    def _make_with_events(self, op: ops.Op, name: bytes, mode: int, attributes: int,
                          make: Callable[[], Reply]) -> Reply:
        if not self.reaches(op.nodeid):
            return make()
        path = self.child_path(op.nodeid, name)
        m = self.name_match(op, name)
        flags = self.effective(m, op.pid, parent=self.lower.inode(op.nodeid), name=name)
        if flags.access & (c.ACCESS_DENY_ALL | c.ACCESS_READ_ONLY) and not (
                flags.control & c.FS_CE_BEFORE_CREATE and self.core.handler("before_create_file")):
            raise self._deny("read-only")
        self._check_not_hidden(op, self.lower.inode(op.nodeid), name)
        origin = self.origin(op)
        fields: dict[str, Any] = dict(file_name=path, desired_access=c.DESIRED_ACCESS_FILE_WRITE_DATA,
                                      attributes=attributes, options=0, flags=0, mode=mode,
                                      create_disposition=c.FILE_DISPOSITION_CREATE_NEW)
        before = self.fire("before_create_file", c.FS_CE_BEFORE_CREATE, flags, origin, **fields)
        if before is not None and not before.process_request:
            raise OSError(errno.EACCES, "the event handler completed the create")
        file_context = int(before.file_context) if before is not None else 0
        try:
            reply = make()
        except OSError as exc:
            if self.after_ok(exc.errno or errno.EIO):
                self._after_open("create", (0, c.FS_CE_AFTER_CREATE, c.FS_NE_CREATE), flags, origin, fields,
                                 exc.errno or errno.EIO, file_context, 0)
            raise
        file_context, handle_context = self._after_open("create", (0, c.FS_CE_AFTER_CREATE, c.FS_NE_CREATE), flags,
                                                        origin, fields, 0, file_context, 0)
        if file_context or handle_context:  # nothing stays open: the contexts end here
            handler = self.core.handler("cleanup_context")
            if handler is not None:
                self.core.dispatcher.call(handler, FILTER_PARAMS["cleanup_context"](
                    file_context=file_context, handle_context=handle_context), origin)
        if m is not None and self._volatile(m) and isinstance(reply, Entry):
            reply.uncached()
        return reply

    def mkdir(self, op: ops.Mkdir) -> Reply:
        return self._make_with_events(op, op.name, op.mode | stat.S_IFDIR, c.FILE_SYS_ATTR_DIRECTORY,
                                      lambda: self.down.mkdir(op))

    def mknod(self, op: ops.Mknod) -> Reply:
        attributes = c.FILE_SYS_ATTR_ARCHIVE if stat.S_ISREG(op.mode) else c.FILE_SYS_ATTR_SYSTEM
        return self._make_with_events(op, op.name, op.mode, attributes, lambda: self.down.mknod(op))

    def symlink(self, op: ops.Symlink) -> Reply:
        return self._make_with_events(op, op.name, stat.S_IFLNK | 0o777, c.FILE_SYS_ATTR_REPARSE_POINT,
                                      lambda: self.down.symlink(op))

    def opendir(self, op: ops.Open) -> Reply:
        if not self.reaches(op.nodeid):
            return self.down.opendir(op)
        node = self.lower.inode(op.nodeid)
        m = self.match_node(node.nodeid)
        flags = self.effective(m, op.pid, node)
        if flags.access & c.ACCESS_DENY_ALL and not (
                flags.control & c.FS_CE_BEFORE_OPEN and self.core.handler("before_open_file")):
            raise self._deny("deny all")
        open_flags = os.O_RDONLY | os.O_DIRECTORY
        return self._open_with_events(op, node, open_flags, flags, lambda: self.down.opendir(op),
                                      created=False, is_dir=True)

    # -- open reply flags: daemon I/O, direct I/O, FLUSH

    def needs_io(self, node: Inode, st: os.stat_result) -> bool:
        m = self.match_node(node.nodeid)
        if m is None:
            return False
        # Any process may be the one a read/write rule is about: decided on the upper bound of the flags.
        return bool(m.upper.control & _RW_BITS[0] & self.core.control_handlers
                    or m.upper.notify & _RW_BITS[1] & self.core.notify_handlers)

    def open_reply_flags(self, node: Inode, flags: int, passthrough: bool) -> int:
        m = self.match_node(node.nodeid)
        if m is None:
            return flags
        up = m.upper
        if up.control & _CLEANUP_BITS[0] & self.core.control_handlers or up.notify & _CLEANUP_BITS[1]:
            flags &= ~abi.OpenReplyFlag.NOFLUSH  # cleanup events need every close(2) to send FLUSH
        if not passthrough and self.core.process_cached_io_requests and (
                up.control & _RW_BITS[0] or up.notify & _RW_BITS[1]):
            flags |= abi.OpenReplyFlag.DIRECT_IO  # every application read/write reaches the daemon
            flags &= ~abi.OpenReplyFlag.KEEP_CACHE
        return flags

    # -- read and write

    def _io_flags(self, op: ops.Op, node: Inode, handle: _Handle | None) -> tuple[Flags, Origin]:
        m = self.match_node(node.nodeid)
        if op.pid == 0 and handle is not None:  # write-back and read-ahead run without a caller
            origin = handle.origin
            return self.effective(m, origin.tid, node), origin
        return self.effective(m, op.pid, node), self.origin(op)

    def _direction(self, handle: _Handle | None, direct: bool) -> int:
        if not direct:
            return c.FS_REQUEST_DIR_SYSTEM_NONCACHED
        if handle is not None and handle.flags & os.O_DIRECT:
            return c.FS_REQUEST_DIR_USER_NONCACHED
        return c.FS_REQUEST_DIR_USER_CACHED

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

    def read(self, op: ops.Read) -> Reply:
        fh, offset, size = op.fh, op.offset, op.size
        f = self.lower.file(fh)
        if not self.reaches(f.inode.nodeid):
            return self.down.read(op)
        handle = self._handles.get(fh)
        flags, origin = self._io_flags(op, f.inode, handle)
        control = flags.control & (c.FS_CE_BEFORE_READ | c.FS_CE_AFTER_READ)
        if not (control or flags.notify & c.FS_NE_READ):
            return self.down.read(op)
        direct = bool(self.core.process_cached_io_requests)
        direction = self._direction(handle, direct)
        path = handle.path if handle is not None else self.abspath(f.inode.nodeid)
        if not control:  # a notification only: no buffer for handlers to see
            reply, error = self._served(lambda: self.down.read(op))
            got = len(reply.data) if isinstance(reply, Data) else 0
            self.notify("notify_read_file", c.FS_NE_READ, flags, origin, creator=handle.origin if handle else None,
                        file_name=path, position=offset,
                        bytes_to_read=size, direction=direction, bytes_read=got, status=error)
            if error or reply is None:
                raise OSError(error, os.strerror(error))
            return reply
        ctx = self._handle_ctx(f.inode.nodeid, handle)
        buf = ctypes.create_string_buffer(max(size, 1))
        view = memoryview(buf).cast("B")[:size]
        pointer = ctypes.c_void_p(ctypes.addressof(buf))
        position, count = offset, size
        before = self.fire("before_read_file", c.FS_CE_BEFORE_READ, flags, origin, file_name=path, position=offset,
                           buffer=pointer, buffer_length=size, buffer_view=view, bytes_to_read=size,
                           direction=direction, **ctx)
        error = 0
        done = 0
        if before is not None:
            position = int(before.position)
            count = max(0, min(size, int(before.bytes_to_read)))
        if before is not None and not before.process_request:
            done = count  # the handler put the data in the buffer
        elif count:
            op.offset, op.size = position, count  # what the Before handler asked for is what the layers below see
            reply, error = self._served(lambda: self.down.read(op))
            if isinstance(reply, Data):
                done = min(count, len(reply.data))
                view[:done] = reply.data[:done]
        after = self.fire("after_read_file", c.FS_CE_AFTER_READ, flags, origin, file_name=path, position=position,
                          buffer=pointer, buffer_length=size, buffer_view=view, bytes_to_read=count,
                          direction=direction, bytes_read=done, status=error, **ctx)
        if after is not None:
            done = max(0, min(size, int(after.bytes_read)))
            error = int(after.status or 0)  # the handler may set or clear the error
        self.notify("notify_read_file", c.FS_NE_READ, flags, origin, creator=ctx["creator"], file_name=path,
                    position=position,
                    bytes_to_read=count, direction=direction, bytes_read=done, status=error)
        if error:
            raise OSError(error, os.strerror(error))
        return Data(bytes(view[:done]))

    def write(self, op: ops.Write) -> Reply:
        fh, offset, size = op.fh, op.offset, op.size
        f = self.lower.file(fh)
        if not self.reaches(f.inode.nodeid):
            return self.down.write(op)
        handle = self._handles.get(fh)
        flags, origin = self._io_flags(op, f.inode, handle)
        control = flags.control & (c.FS_CE_BEFORE_WRITE | c.FS_CE_AFTER_WRITE)
        if not (control or flags.notify & c.FS_NE_WRITE):
            return self.down.write(op)
        direct = bool(self.core.process_cached_io_requests)
        direction = self._direction(handle, direct)
        path = handle.path if handle is not None else self.abspath(f.inode.nodeid)
        if not control:  # a notification only: no buffer for handlers to see
            reply, error = self._served(lambda: self.down.write(op))
            written = reply.size if isinstance(reply, Written) else 0
            self.notify("notify_write_file", c.FS_NE_WRITE, flags, origin,
                        creator=handle.origin if handle else None, file_name=path, position=offset,
                        bytes_to_write=size, direction=direction, bytes_written=written, status=error)
            if error or reply is None:
                raise OSError(error, os.strerror(error))
            return reply
        ctx = self._handle_ctx(f.inode.nodeid, handle)
        buf = ctypes.create_string_buffer(bytes(op.data), max(size, 1))
        view = memoryview(buf).cast("B")[:size]
        pointer = ctypes.c_void_p(ctypes.addressof(buf))
        position, count = offset, size
        before = self.fire("before_write_file", c.FS_CE_BEFORE_WRITE, flags, origin, file_name=path,
                           position=offset, buffer=pointer, buffer_length=size, buffer_view=view, bytes_to_write=size,
                           direction=direction, **ctx)
        error = 0
        done = 0
        if before is not None:
            position = int(before.position)
            count = max(0, min(size, int(before.bytes_to_write)))
        if before is not None and not before.process_request:
            done = count
        elif count:
            try:
                if position < 0:  # -1: append, as the SDK defines it
                    position = f.backend.size()
            except OSError as exc:
                error = exc.errno or errno.EIO
            else:
                # The (possibly changed) buffer, position and count are what the layers below write.
                op.offset, op.size, op.data = position, count, view[:count]
                reply, error = self._served(lambda: self.down.write(op))
                done = reply.size if isinstance(reply, Written) else 0
        after = self.fire("after_write_file", c.FS_CE_AFTER_WRITE, flags, origin, file_name=path, position=position,
                          buffer=pointer, buffer_length=size, buffer_view=view, bytes_to_write=count,
                          direction=direction, bytes_written=done, status=error, **ctx)
        if after is not None:
            done = max(0, min(count, int(after.bytes_written)))
            error = int(after.status or 0)  # the handler may set or clear the error
        self.notify("notify_write_file", c.FS_NE_WRITE, flags, origin, creator=ctx["creator"], file_name=path,
                    position=position,
                    bytes_to_write=count, direction=direction, bytes_written=done, status=error)
        if error:
            raise OSError(error, os.strerror(error))
        # A handler that shortened the write still owes the kernel the full count it asked for, or the
        # page cache and the file disagree; the SDK semantics are kept by what reached the file.
        return Written(size if before is not None and not before.process_request else done)

    def copy_file_range(self, op: ops.CopyFileRange) -> Reply:
        src, dst = self.lower.file(op.fh_in), self.lower.file(op.fh_out)
        if not (self.reaches(src.inode.nodeid) or self.reaches(dst.inode.nodeid)):
            return self.down.copy_file_range(op)
        f_in, _ = self._io_flags(op, src.inode, self._handles.get(op.fh_in))
        f_out, _ = self._io_flags(op, dst.inode, self._handles.get(op.fh_out))
        if (f_in.control & (c.FS_CE_BEFORE_READ | c.FS_CE_AFTER_READ) or f_in.notify & c.FS_NE_READ
                or f_out.control & (c.FS_CE_BEFORE_WRITE | c.FS_CE_AFTER_WRITE) or f_out.notify & c.FS_NE_WRITE):
            # A copy done below the filter would bypass the read/write events: the kernel then copies
            # through READ and WRITE requests, which fire them.
            raise OSError(errno.EOPNOTSUPP, "copied through read and write so that events fire")
        return self.down.copy_file_range(op)

    # -- cleanup and close

    def flush(self, op: ops.Flush) -> Reply:
        fh, owner = op.fh, op.owner
        handle = self._handles.get(fh)
        f = self.lower.file(fh)
        if self.lower.options.locks and self.lower.locks.owner_holds(f.inode.nodeid, owner):
            # close(2) of any descriptor drops the caller's POSIX locks on the file
            self._unlock_all(op, f.inode, handle, lambda: self.lower.locks.release_owner(f.inode.nodeid, owner))
        if handle is None:
            return self.down.flush(op)
        flags, origin = self._io_flags(op, f.inode, handle)
        ctx = self._handle_ctx(f.inode.nodeid, handle)
        before = self.fire("before_cleanup_file", c.FS_CE_BEFORE_CLEANUP, flags, origin, file_name=handle.path,
                           **ctx)
        reply = self.down.flush(op) if before is None or before.process_request else EMPTY
        after = self.fire("after_cleanup_file", c.FS_CE_AFTER_CLEANUP, flags, origin, file_name=handle.path,
                          **ctx)
        if after is not None:
            handle.context = int(after.handle_context)
            self._set_file_context(f.inode.nodeid, int(after.file_context))
        self.notify("notify_cleanup_file", c.FS_NE_CLEANUP, flags, origin, creator=handle.origin,
                    file_name=handle.path)
        return reply

    def _handle_ctx(self, nodeid: int, handle: _Handle | None) -> dict[str, Any]:
        """The context fields of an event about an open handle, and who opened it."""
        return dict(file_context=self.file_context(nodeid), handle_context=handle.context if handle else 0,
                    creator=handle.origin if handle else None)

    def _set_file_context(self, nodeid: int, value: int) -> None:
        with self._ctx_lock:
            if nodeid in self._node_opens:
                if value:
                    self._file_contexts[nodeid] = value
                else:
                    self._file_contexts.pop(nodeid, None)

    def release(self, op: ops.Release) -> Reply:
        fh = op.fh
        handle = self._handles.pop(fh, None)
        if handle is None:
            return self.down.release(op)
        f = self.lower.file(fh)
        nodeid = f.inode.nodeid
        if self.lower.options.locks and self.lower.locks.fh_holds(nodeid, fh):  # flock and OFD locks of this open file
            self._unlock_all(op, f.inode, handle, lambda: self.lower.locks.release_fh(nodeid, fh))
        self._close_events(op, f.inode, handle, False)
        try:
            return self.down.release(op)
        finally:
            self._node_closed(nodeid, handle)

    # -- locks (served when a lock handler was set at start: LowerOptions.locks)

    def setlk(self, op: ops.Lock) -> Reply | None:
        return self._lock_with_events(op, False)

    def setlkw(self, op: ops.Lock) -> Reply | None:
        return self._lock_with_events(op, True)

    def _lock_with_events(self, lk: ops.Lock, wait: bool) -> Reply | None:
        node = self.lower.file(lk.fh).inode
        serve = self.down.setlkw if wait else self.down.setlk
        if not self.reaches(node.nodeid):
            return serve(lk)
        handle = self._handles.get(lk.fh)
        flags, origin = self._io_flags(lk, node, handle)
        if not (flags.control & _LOCK_BITS[0] or flags.notify & _LOCK_BITS[1]):
            return serve(lk)
        path = handle.path if handle is not None else self.abspath(node.nodeid)
        ctx = self._handle_ctx(node.nodeid, handle)
        kind = "unlock_single" if lk.kind == F_UNLCK else "lock"
        fields: dict[str, Any] = dict(file_name=path, offset=lk.start, length=_lock_length(lk.start, lk.end),
                                      key=lk.owner)
        if lk.kind != F_UNLCK:
            fields.update(fail_immediately=not wait, exclusive_lock=lk.kind == F_WRLCK)
        before = self.fire(f"before_{kind}", c.FS_CE_BEFORE_LOCK_CONTROL, flags, origin, **fields, **ctx)
        if before is not None:
            if not before.process_request:
                return EMPTY  # the handler completed the request: nothing is locked or unlocked here
            start, length = int(before.offset), int(before.length)
            if start < 0 or length < 0 or start > OFFSET_MAX:
                raise OSError(errno.EINVAL, "a lock handler gave a negative offset or length")
            lk.start, lk.end = start, _lock_end(start, length)
            fields.update(offset=start, length=_lock_length(lk.start, lk.end))

        def finish(error: int) -> int:
            if error and not self.after_ok(error):
                return error
            try:
                after = self.fire(f"after_{kind}", c.FS_CE_AFTER_LOCK_CONTROL, flags, origin, status=error,
                                  **fields, **ctx)
                if after is not None:
                    error = int(after.status or 0)  # the handler may set or clear the error
            except OSError as exc:
                error = exc.errno or errno.EIO
            self.notify(f"notify_{kind}", c.FS_NE_LOCK_CONTROL, flags, origin, creator=ctx["creator"],
                        status=error, **fields)
            return error

        # The outcome reaches this layer's After work once the bottom knows it (at once, or when a wait is
        # granted); a wait granted later is finished on a thread of its own: the After handler must not run on
        # the thread of the request (an unlock, a close) whose release granted it.
        add_lock_finish(lk, finish, bool(flags.control & c.FS_CE_AFTER_LOCK_CONTROL))
        return serve(lk)

    def _unlock_all(self, op: ops.Op, node: Inode, handle: _Handle | None, drop: Callable[[], bool]) -> None:
        """Locks that go with a close (FLUSH: the caller's POSIX locks; RELEASE: the open file's flock and OFD
        locks). They go whatever the handlers say: a close cannot fail, and a lock kept past it would be
        kept forever."""
        flags, origin = self._io_flags(op, node, handle)
        if not (flags.control & _LOCK_BITS[0] or flags.notify & _LOCK_BITS[1]):
            drop()
            return
        path = handle.path if handle is not None else self.abspath(node.nodeid)
        ctx = self._handle_ctx(node.nodeid, handle)
        try:
            self.fire("before_unlock_all", c.FS_CE_BEFORE_LOCK_CONTROL, flags, origin, file_name=path, **ctx)
        except OSError:
            pass  # reported through on_error where it was a handler failure; the unlock happens anyway
        drop()
        try:
            self.fire("after_unlock_all", c.FS_CE_AFTER_LOCK_CONTROL, flags, origin, file_name=path, **ctx)
        except OSError:
            pass
        self.notify("notify_unlock_all", c.FS_NE_LOCK_CONTROL, flags, origin, creator=ctx["creator"],
                    file_name=path)

    def _close_events(self, op: ops.Op, node: Inode, handle: _Handle, is_dir: bool) -> None:
        m = self.match_node(node.nodeid)
        # RELEASE comes from the kernel (pid 0) after the last reference went: the handle's opener stands in.
        origin = handle.origin
        flags = self.effective(m, origin.tid, node)
        ctx = self._handle_ctx(node.nodeid, handle)
        if is_dir and handle.enumerated and flags.control & (c.FS_CE_BEFORE_CLOSE | c.FS_CE_AFTER_ENUMERATE_DIRECTORY):
            handler = self.core.handler("after_close_enumeration")
            if handler is not None:
                self.core.dispatcher.call(handler, FILTER_PARAMS["after_close_enumeration"](
                    directory_name=handle.path, directory_context=ctx["file_context"],
                    enumeration_context=handle.enum_context), origin)
        # A close cannot fail: a result_code or a handler error is reported (on_error) and changes nothing,
        # and the After event fires whatever the Before handler did.
        try:
            self.fire("before_close_file", c.FS_CE_BEFORE_CLOSE, flags, origin, file_name=handle.path, **ctx)
        except OSError:
            pass
        try:
            after = self.fire("after_close_file", c.FS_CE_AFTER_CLOSE, flags, origin, file_name=handle.path, **ctx)
            if after is not None:
                handle.context = int(after.handle_context)
                self._set_file_context(node.nodeid, int(after.file_context))
        except OSError:
            pass
        self.notify("notify_close_file", c.FS_NE_CLOSE, flags, origin, file_name=handle.path)

    def releasedir(self, op: ops.Release) -> Reply:
        fh = op.fh
        handle = self._handles.pop(fh, None)
        if handle is None:
            return self.down.releasedir(op)
        node = self.lower.nodes.get(op.nodeid)
        if node is not None:
            self._close_events(op, node, handle, True)
        try:
            return self.down.releasedir(op)
        finally:
            self._node_closed(op.nodeid, handle)

    # -- directory listings

    def readdir(self, op: ops.Read) -> Reply:
        """READDIR and READDIRPLUS: the Before event at the start of a listing; each entry's After event comes
        in ``listed``, as the bottom passes the entry up."""
        if not self.reaches(op.nodeid):
            return self.down.readdir(op)
        node = self.lower.inode(op.nodeid)
        m = self.match_node(node.nodeid)
        flags = self.effective(m, op.pid, node)
        handle = self._handles.get(op.fh)
        origin = self.origin(op)
        op.remember((self, "listing"), (flags, origin, handle))
        if handle is not None and (flags.control & (c.FS_CE_BEFORE_ENUMERATE_DIRECTORY
                                                    | c.FS_CE_AFTER_ENUMERATE_DIRECTORY)
                                   or flags.notify & c.FS_NE_ENUMERATE_DIRECTORY):
            if op.offset == 0:
                before = self.fire("before_enumerate_directory", c.FS_CE_BEFORE_ENUMERATE_DIRECTORY, flags,
                                   origin, directory_name=handle.path, file_name_mask="*",
                                   directory_context=self.file_context(node.nodeid), handle_context=handle.context,
                                   enumeration_context=handle.enum_context, restart=handle.enumerated)
                if before is not None:
                    handle.enum_context = int(before.enumeration_context)
                    if not before.process_request:
                        return Listing([], op.plus)
            handle.enumerated = True
        return self.down.readdir(op)

    def listed(self, op: ops.Read, parent: Inode, entry: DirEntry) -> DirEntry | None:
        state: tuple[Flags, Origin, _Handle | None] | None = op.recall((self, "listing"))
        if state is None or entry.name in (b".", b".."):
            return entry  # a listing this filter's rules cannot concern
        flags, origin, handle = state
        if flags.control & c.FS_CE_AFTER_ENUMERATE_DIRECTORY or flags.notify & c.FS_NE_ENUMERATE_DIRECTORY:
            if entry.attr is None:
                try:
                    entry.attr = os.stat(entry.name, dir_fd=parent.fd, follow_symlinks=False)
                except OSError:
                    return None  # gone since it was listed
            if not self._enumerated(handle, parent, entry, flags, origin):
                return None
        return self._volatile_child(parent, entry, op.plus)

    def _enumerated(self, handle: _Handle | None, parent: Inode, entry: DirEntry, flags: Flags,
                    origin: Origin) -> bool:
        """Fire the enumeration events of one entry (changing it as the handler says); False when it hid it."""
        st = entry.attr
        assert st is not None
        name = os.fsdecode(entry.name)
        dirname = handle.path if handle is not None else self.abspath(parent.nodeid)
        fields: dict[str, Any] = dict(
            directory_name=dirname, file_name=name, creation_time=None,
            last_access_time=st.st_atime_ns, last_write_time=st.st_mtime_ns, change_time=st.st_ctime_ns,
            size=st.st_size, allocation_size=st.st_blocks * 512, file_id=st.st_ino,
            attributes=attributes_from_stat(st.st_mode, st.st_size, st.st_blocks, name))
        after = self.fire("after_enumerate_directory", c.FS_CE_AFTER_ENUMERATE_DIRECTORY, flags, origin,
                          directory_context=self.file_context(parent.nodeid),
                          handle_context=handle.context if handle else 0,
                          enumeration_context=handle.enum_context if handle else 0, **fields)
        if after is not None:
            if handle is not None:
                handle.enum_context = int(after.enumeration_context)
            if not after.process_request:
                return False  # the handler hid the entry
            if (int(after.size) != st.st_size or int(after.allocation_size) != st.st_blocks * 512) \
                    and entry.entry is not None and entry.entry.attr is not None:
                entry.entry.attr = StatView(entry.entry.attr, size=int(after.size),
                                            blocks=(int(after.allocation_size) + 511) // 512)
                entry.entry.uncached()
            for key in ("size", "allocation_size", "attributes"):
                fields[key] = getattr(after, key)
        self.notify("notify_enumerate_directory", c.FS_NE_ENUMERATE_DIRECTORY, flags, origin, **fields)
        return True

    def _volatile_child(self, parent: Inode, entry: DirEntry, plus: bool) -> DirEntry:
        """A READDIRPLUS entry must not put a name in the cache that a per-request rule may refuse: the name
        goes up without its entry (the bottom gives back the lookup it counted)."""
        if not plus or entry.entry is None or not self._any_volatile():
            return entry
        m = self.match_name(self.child_path(parent.nodeid, entry.name))
        if m is not None and self._volatile(m):
            entry.entry = None
        return entry

    # -- delete, rename, link

    def _delete(self, op: ops.Remove, is_dir: bool) -> Reply:
        name = op.name
        serve: Callable[[ops.Remove], Reply] = self.down.rmdir if is_dir else self.down.unlink
        if not self.reaches(op.nodeid):
            return serve(op)
        path = self.child_path(op.nodeid, name)
        m = self.name_match(op, name)
        flags = self.effective(m, op.pid, parent=self.lower.inode(op.nodeid), name=name)
        if flags.access & (c.ACCESS_DENY_ALL | c.ACCESS_DELETE_PROTECT | c.ACCESS_DELETE_ONLY_PROTECT
                           | c.ACCESS_READ_ONLY | c.ACCESS_WRITE_ONLY):
            raise self._deny("delete-protect")
        origin = self.origin(op)
        before = self.fire("before_can_file_be_deleted", c.FS_CE_BEFORE_CAN_DELETE, flags, origin, file_name=path,
                           can_delete=True)
        can_delete = True if before is None else bool(before.can_delete)
        after_can = self.fire("after_can_file_be_deleted", c.FS_CE_AFTER_CAN_DELETE, flags, origin,
                              file_name=path, can_delete=can_delete)
        if after_can is not None:
            can_delete = bool(after_can.can_delete)
        self.notify("notify_can_file_be_deleted", c.FS_NE_CAN_DELETE, flags, origin, file_name=path,
                    can_delete=can_delete)
        if not can_delete:
            raise OSError(errno.EACCES, "an event handler refused the delete")
        before = self.fire("before_delete_file", c.FS_CE_BEFORE_DELETE, flags, origin, file_name=path)
        # process_request = False: the handler completed the delete (or chose to report it done).
        handled = before is not None and not before.process_request
        try:
            reply = EMPTY if handled else self._hidden_emptiness(op, self.lower.inode(op.nodeid), name,
                                                                 lambda: serve(op))
        except OSError as exc:
            if self.after_ok(exc.errno or errno.EIO):
                self.fire("after_delete_file", c.FS_CE_AFTER_DELETE, flags, origin, file_name=path,
                          status=exc.errno)
            raise
        self.fire("after_delete_file", c.FS_CE_AFTER_DELETE, flags, origin, file_name=path)
        self.notify("notify_delete_file", c.FS_NE_DELETE, flags, origin, file_name=path)
        return reply

    def unlink(self, op: ops.Remove) -> Reply:
        return self._delete(op, False)

    def rmdir(self, op: ops.Remove) -> Reply:
        return self._delete(op, True)

    def rename(self, op: ops.Rename) -> Reply:
        newdir, flags_in = op.new_dir, op.flags
        if not (self.reaches(op.nodeid) or self.reaches(newdir)):
            return self.down.rename(op)
        old, new = op.name, op.new_name
        old_path = self.child_path(op.nodeid, old)
        new_path = self.child_path(newdir, new)
        m_old, m_new = self.name_match(op, old), self.name_match(op, new, newdir)
        old_dir, new_dir = self.lower.inode(op.nodeid), self.lower.inode(newdir)
        if self._redirected(op, old_dir, old) or self._redirected(op, new_dir, new):
            # The two names live in different places: callers such as mv then copy and delete, which the
            # reparse rules send to the right place.
            raise OSError(errno.EXDEV, "a redirected name is renamed by copying")
        f_old = self.effective(m_old, op.pid, parent=old_dir, name=old)
        f_new = self.effective(m_new, op.pid, parent=new_dir, name=new)
        self._check_rename_access(f_old, f_new, new_dir, new, flags_in)
        self._check_subtree_move(op.pid, old_dir, old, new_dir, new, old_path, new_path, flags_in)
        self._check_not_hidden(op, new_dir, new)
        flags = Flags(f_old.access | f_new.access, f_old.control | f_new.control, f_old.notify | f_new.notify)
        origin = self.origin(op)
        replace = not flags_in & 1  # RENAME_NOREPLACE
        fields: dict[str, Any] = dict(file_name=old_path, new_file_name=new_path, replace_if_exists=replace,
                                      flags=flags_in)
        before = self.fire("before_rename_or_move_file", c.FS_CE_BEFORE_RENAME, flags, origin, **fields)
        try:
            if before is not None and not before.process_request:
                # The handler completed the rename: the caller is told it succeeded, and the names
                # remembered for paths follow whatever the lower directory now holds.
                reply: Reply = EMPTY
                self.lower.moved(new_dir, new)
                if flags_in & 2:
                    self.lower.moved(old_dir, old)
            else:
                reply = self._hidden_emptiness(op, new_dir, new, lambda: self.down.rename(op))
        except OSError as exc:
            if self.after_ok(exc.errno or errno.EIO):
                self.fire("after_rename_or_move_file", c.FS_CE_AFTER_RENAME, flags, origin, status=exc.errno,
                          **fields)
                self.notify("notify_rename_or_move_file", c.FS_NE_RENAME, flags, origin, status=exc.errno, **fields)
            raise
        self._epoch += 1
        for h in self._handles.values():  # open handles keep naming the object by its new path
            if h.path == old_path or h.path.startswith(old_path + "/"):
                h.path = new_path + h.path[len(old_path):]
        self.fire("after_rename_or_move_file", c.FS_CE_AFTER_RENAME, flags, origin, **fields)
        self.notify("notify_rename_or_move_file", c.FS_NE_RENAME, flags, origin, **fields)
        return reply

    def _check_rename_access(self, f_old: Flags, f_new: Flags, new_dir: Inode, new: bytes, flags_in: int) -> None:
        moving = c.ACCESS_DENY_ALL | c.ACCESS_RENAME_PROTECT | c.ACCESS_DELETE_PROTECT
        if f_old.access & moving:
            raise self._deny("rename-protect")
        if f_new.access & (c.ACCESS_DENY_ALL | c.ACCESS_READ_ONLY):
            raise self._deny("read-only destination")
        if f_old.access & ~f_new.access:
            raise self._deny("the new name would escape an access rule")  # as for hard links
        exchange = flags_in & 2  # RENAME_EXCHANGE: the destination moves to the old name
        if exchange and (f_new.access & moving or f_new.access & ~f_old.access):
            raise self._deny("rename-protect (exchange)")
        if not exchange and f_new.access & (c.ACCESS_DELETE_PROTECT | c.ACCESS_DELETE_ONLY_PROTECT
                                            | c.ACCESS_WRITE_ONLY):
            try:
                os.stat(new, dir_fd=new_dir.fd, follow_symlinks=False)
            except OSError:
                return
            raise self._deny("delete-protect: the rename would replace a protected file")

    def _check_subtree_move(self, tid: int, old_dir: Inode, old: bytes, new_dir: Inode, new: bytes, old_path: str,
                            new_path: str, flags_in: int) -> None:
        """Moving a directory moves every path below it: refuse the move when a rule that restricts access or
        asks for control events could judge something below it differently in the new place than in the old
        (a protected file would be carried out of its rule, or an unprotected one into it). Decided from the
        rules' masks, never by walking the tree."""
        if not self.core.filter_own_requests and self.is_own(tid):
            return
        names = [(old_dir, old)] + ([(new_dir, new)] if flags_in & 2 else [])  # RENAME_EXCHANGE moves both
        if not any(_is_dir(d.fd, n) for d, n in names):
            return
        core = self.core
        for rules in (core.rules, core.passthrough_rules):
            rule = rules.relocation_rule(old_path, new_path, c.ACCESS_KNOWN, _ALL_CONTROL) if rules else None
            if rule is not None:
                raise self._deny(f"moving the directory {old_path} to {new_path} would change what the rule "
                                 f"{rule.mask!r} covers below it")

    def link(self, op: ops.Link) -> Reply:
        old = op.target
        if not (self.reaches(old) or self.reaches(op.nodeid)):
            return self.down.link(op)
        name = op.name
        src_path = self.abspath(old)
        link_path = self.child_path(op.nodeid, name)
        if self._redirected(op, self.lower.inode(op.nodeid), name):
            raise OSError(errno.EXDEV, "a hard link cannot be made under a redirected name")
        f_src = self.effective(self.match_node(old), op.pid, self.lower.inode(old))
        f_new = self.effective(self.name_match(op, name), op.pid, parent=self.lower.inode(op.nodeid), name=name)
        if f_src.access and not f_new.access & f_src.access == f_src.access:
            # A second name outside the rule would escape it: refuse it.
            raise self._deny("a hard link would bypass an access rule")
        if f_new.access & (c.ACCESS_DENY_ALL | c.ACCESS_READ_ONLY):
            raise self._deny("read-only")
        self._check_not_hidden(op, self.lower.inode(op.nodeid), name)
        flags = Flags(f_src.access | f_new.access, f_src.control | f_new.control, f_src.notify | f_new.notify)
        origin = self.origin(op)
        fields: dict[str, Any] = dict(file_name=src_path, link_name=link_path, replace_if_exists=False)
        before = self.fire("before_create_hard_link", c.FS_CE_BEFORE_CREATE_HARD_LINK, flags, origin, **fields)
        try:
            if before is not None and not before.process_request:
                # The handler completed it: the reply needs the new name's entry, so it must exist now.
                parent = self.lower.inode(op.nodeid)
                node, st = self.lower.lookup_child(parent, name)
                reply: Reply = self.lower.entry(node, st)
            else:
                reply = self.down.link(op)
        except OSError as exc:
            if self.after_ok(exc.errno or errno.EIO):
                self.fire("after_create_hard_link", c.FS_CE_AFTER_CREATE_HARD_LINK, flags, origin,
                          status=exc.errno, **fields)
            raise
        self.fire("after_create_hard_link", c.FS_CE_AFTER_CREATE_HARD_LINK, flags, origin, **fields)
        self.notify("notify_create_hard_link", c.FS_NE_CREATE_HARD_LINK, flags, origin, **fields)
        return reply

    # -- attributes, sizes, security

    def setattr(self, op: ops.Setattr) -> Reply:
        if not self.reaches(op.nodeid):
            return self.down.setattr(op)
        valid, fh, size, mode, uid, gid = op.valid, op.fh, op.size, op.mode, op.uid_to, op.gid_to
        atime, mtime, atime_ns, mtime_ns = op.atime, op.mtime, op.atime_ns, op.mtime_ns
        node = self.lower.inode(op.nodeid)
        m = self.match_node(node.nodeid)
        flags = self.effective(m, op.pid, node)
        if not (flags.access or flags.control or flags.notify):
            return self.down.setattr(op)
        access = flags.access
        if access & c.ACCESS_DENY_ALL:
            raise self._deny("deny all")
        if valid & abi.FATTR_SIZE and access & c.ACCESS_READ_ONLY:
            raise self._deny("read-only")
        if valid & abi.FATTR_MODE and access & c.ACCESS_NO_CHANGE_DAC:
            raise self._deny("no-change-dac")
        if valid & (abi.FATTR_UID | abi.FATTR_GID) and access & c.ACCESS_NO_CHANGE_OWNER:
            raise self._deny("no-change-owner")
        path = self.abspath(node.nodeid)
        origin = self.origin(op)
        handle = self._handles.get(fh) if fh is not None else None
        ctx = self._handle_ctx(node.nodeid, handle)
        events: list[tuple[str, int, int, dict[str, Any]]] = []
        if valid & abi.FATTR_SIZE:
            events.append(("set_file_size", c.FS_CE_BEFORE_SET_SIZES, c.FS_NE_SET_SIZES,
                           dict(file_name=path, size=size)))
        if valid & (abi.FATTR_MODE | abi.FATTR_UID | abi.FATTR_GID):
            info = ((c.DACL_SECURITY_INFORMATION if valid & abi.FATTR_MODE else 0)
                    | (c.OWNER_SECURITY_INFORMATION if valid & abi.FATTR_UID else 0)
                    | (c.GROUP_SECURITY_INFORMATION if valid & abi.FATTR_GID else 0))
            events.append(("set_file_security", c.FS_CE_BEFORE_SET_SECURITY, c.FS_NE_SET_SECURITY,
                           dict(file_name=path, security_information=info,
                                mode=stat.S_IMODE(mode) if valid & abi.FATTR_MODE else -1,
                                owner=uid if valid & abi.FATTR_UID else -1,
                                group=gid if valid & abi.FATTR_GID else -1)))
        if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW):
            events.append(("set_file_attributes", c.FS_CE_BEFORE_SET_ATTRIBUTES, c.FS_NE_SET_ATTRIBUTES,
                           dict(file_name=path, creation_time=None,
                                last_access_time=atime * 1_000_000_000 + atime_ns if valid & abi.FATTR_ATIME else None,
                                last_write_time=mtime * 1_000_000_000 + mtime_ns if valid & abi.FATTR_MTIME else None,
                                change_time=None, attributes=0)))
        for event, bit, _nbit, fields in events:
            before = self.fire(f"before_{event}", bit, flags, origin, **ctx, **fields)
            if before is not None and not before.process_request:
                return Attr(self.lower.attributes(node.nodeid, os.fstat(node.fd)), 0.0)
        reply, error = self._served(lambda: self.down.setattr(op))
        for event, bit, nbit, fields in events:
            self.fire(f"after_{event}", bit << 1, flags, origin, status=error, **ctx, **fields)
            self.notify(f"notify_{event}", nbit, flags, origin, status=error, **fields)
        if error or reply is None:
            raise OSError(error, os.strerror(error))
        return reply

    def fallocate(self, op: ops.Fallocate) -> Reply:
        fh, offset, length = op.fh, op.offset, op.length
        f = self.lower.file(fh)
        if not self.reaches(f.inode.nodeid):
            return self.down.fallocate(op)
        handle = self._handles.get(fh)
        flags, origin = self._io_flags(op, f.inode, handle)
        if flags.access & (c.ACCESS_READ_ONLY | c.ACCESS_DENY_ALL):
            raise self._deny("read-only")
        path = handle.path if handle else self.abspath(f.inode.nodeid)
        fields: dict[str, Any] = dict(file_name=path, allocation_size=offset + length)
        ctx = self._handle_ctx(f.inode.nodeid, handle)
        before = self.fire("before_set_allocation_size", c.FS_CE_BEFORE_SET_SIZES, flags, origin, **ctx, **fields)
        if before is not None and not before.process_request:
            return EMPTY
        reply = self.down.fallocate(op)
        self.fire("after_set_allocation_size", c.FS_CE_AFTER_SET_SIZES, flags, origin, **ctx, **fields)
        self.notify("notify_set_allocation_size", c.FS_NE_SET_SIZES, flags, origin, creator=ctx["creator"],
                    **fields)
        return reply

    def _xattr_events(self, op: ops.Op, name: bytes, setting: bool, value: bytes = b"", size: int = 0) -> Reply:
        """Events around an xattr request: a set/remove (``setting``), or a query whose whole value (or name
        list) the events see and the reply then cuts to the caller's ``size`` (0: a size probe)."""
        node = self.lower.inode(op.nodeid)
        m = self.match_node(node.nodeid)
        flags = self.effective(m, op.pid, node)
        serve = self._xattr_server(op, setting)
        if not (flags.access or flags.control or flags.notify):
            return serve() if setting else xattr_reply(self._whole(serve), size)
        acl = name in _ACL_NAMES
        if setting and flags.access & c.ACCESS_DENY_ALL:
            raise self._deny("deny all")
        if setting and acl and flags.access & c.ACCESS_NO_CHANGE_DAC:
            raise self._deny("no-change-dac")
        if setting and not acl and flags.access & c.ACCESS_READ_ONLY:
            raise self._deny("read-only")
        path = self.abspath(node.nodeid)
        origin = self.origin(op)
        ctx: dict[str, Any] = dict(file_context=self.file_context(node.nodeid))
        if acl:
            kind = "set_file_security" if setting else "get_file_security"
            bit = c.FS_CE_BEFORE_SET_SECURITY if setting else c.FS_CE_BEFORE_GET_SECURITY
            nbit = c.FS_NE_SET_SECURITY if setting else c.FS_NE_GET_SECURITY
            fields: dict[str, Any] = dict(file_name=path, security_information=c.DACL_SECURITY_INFORMATION,
                                          security_descriptor=value, length=len(value))
        else:
            kind = "set_ea" if setting else "query_ea"
            bit = c.FS_CE_BEFORE_SET_EA if setting else c.FS_CE_BEFORE_QUERY_EA
            nbit = c.FS_NE_SET_EA if setting else c.FS_NE_QUERY_EA
            fields = dict(file_name=path, ea_name=os.fsdecode(name), buffer_length=len(value) if setting else size,
                          buffer_view=memoryview(value))
        out = bytearray()
        if not setting and not acl and flags.control & bit and self.core.handler(f"before_{kind}") is not None:
            # A Before handler that completes a query writes the value into the buffer and sets
            # valid_bytes (for ACLs: sets security_descriptor); the buffer holds the largest value Linux allows.
            out = bytearray(_XATTR_SIZE_MAX)
            fields.update(buffer_view=memoryview(out), valid_bytes=0)
        before = self.fire(f"before_{kind}", bit, flags, origin, **ctx, **fields)
        if before is not None and not before.process_request:
            if setting:
                return EMPTY
            if acl:
                return xattr_reply(bytes(before.security_descriptor or b""), size)
            return xattr_reply(bytes(out[:max(0, min(len(out), int(before.valid_bytes)))]), size)
        reply, error = self._served(serve)
        raw = b""
        if not setting:
            raw = bytes(reply.data) if isinstance(reply, Data) else b""
            if acl:
                fields.update(security_descriptor=raw, length=len(raw))
            else:
                fields.update(buffer_length=size, buffer_view=memoryview(raw), valid_bytes=len(raw))
        self.fire(f"after_{kind}", bit << 1, flags, origin, status=error, **ctx, **fields)
        self.notify(f"notify_{kind}", nbit, flags, origin, status=error, **fields)
        if error or reply is None:
            raise OSError(error, os.strerror(error))
        return reply if setting else xattr_reply(raw, size)

    def _xattr_server(self, op: ops.Op, setting: bool) -> Callable[[], Reply]:
        """The layers below, asked for a set/remove, or for a query's whole value (whatever the caller's size)."""
        if isinstance(op, ops.Setxattr):
            return lambda: self.down.setxattr(op)
        if isinstance(op, ops.Removexattr):
            return lambda: self.down.removexattr(op)
        assert isinstance(op, ops.Getxattr)

        def whole() -> Reply:
            asked = op.size
            op.size = _XATTR_SIZE_MAX
            try:
                return self.down.getxattr(op)
            finally:
                op.size = asked
        return whole

    @staticmethod
    def _whole(serve: Callable[[], Reply]) -> bytes:
        reply = serve()
        return bytes(reply.data) if isinstance(reply, Data) else b""

    def getxattr(self, op: ops.Getxattr) -> Reply:
        """GETXATTR and LISTXATTR (``op.name`` empty)."""
        if not self.reaches(op.nodeid):
            return self.down.getxattr(op)
        return self._xattr_events(op, op.name, False, size=op.size)

    def setxattr(self, op: ops.Setxattr) -> Reply:
        if not self.reaches(op.nodeid):
            return self.down.setxattr(op)
        return self._xattr_events(op, op.name, True, op.value)

    def removexattr(self, op: ops.Removexattr) -> Reply:
        if not self.reaches(op.nodeid):
            return self.down.removexattr(op)
        return self._xattr_events(op, op.name, True)

    def readlink(self, op: ops.Plain) -> Reply:
        if not self.reaches(op.nodeid):
            return self.down.readlink(op)
        node = self.lower.inode(op.nodeid)
        flags = self.effective(self.match_node(node.nodeid), op.pid, node)
        if not (flags.control or flags.notify):
            return self.down.readlink(op)
        path = self.abspath(node.nodeid)
        origin = self.origin(op)
        before = self.fire("before_get_reparse_point", c.FS_CE_BEFORE_GET_REPARSE_POINT, flags, origin,
                           file_name=path)
        if before is not None and not before.process_request:
            return Data(_link_target(before.reparse_buffer))
        served = self.down.readlink(op)
        target = bytes(served.data) if isinstance(served, Data) else b""
        after = self.fire("after_get_reparse_point", c.FS_CE_AFTER_GET_REPARSE_POINT, flags, origin,
                          file_name=path, reparse_buffer=target, reparse_buffer_length=len(target),
                          valid_bytes=len(target))
        if after is not None and after.reparse_buffer != target:
            target = _link_target(after.reparse_buffer)
        self.notify("notify_get_reparse_point", c.FS_NE_GET_REPARSE_POINT, flags, origin, file_name=path,
                    reparse_buffer=target, reparse_buffer_length=len(target), valid_bytes=len(target))
        return Data(target)

    def ioctl(self, op: ops.Ioctl) -> Reply:
        if not self.reaches(op.nodeid):
            return self.down.ioctl(op)
        fh, cmd, in_size, out_size = op.fh, op.cmd, op.in_size, op.out_size
        handle = self._handles.get(fh)
        node = self.lower.inode(op.nodeid)
        flags = self.effective(self.match_node(node.nodeid), op.pid, node)
        if not (flags.control or flags.notify):
            return self.down.ioctl(op)
        path = handle.path if handle else self.abspath(node.nodeid)
        origin = self.origin(op)
        data = op.data
        fields: dict[str, Any] = dict(file_name=path, io_control_code=cmd, input_buffer=data,
                                      input_buffer_length=in_size, output_buffer_length=out_size)
        before = self.fire("before_ioctl", c.FS_CE_BEFORE_IOCTL, flags, origin, **fields)
        if before is not None and not before.process_request:
            return IoctlOut(0, bytes(before.output_buffer or b"")[:out_size])
        reply, error = self._served(lambda: self.down.ioctl(op))
        self.fire("after_ioctl", c.FS_CE_AFTER_IOCTL, flags, origin, status=error, **fields)
        self.notify("notify_ioctl", c.FS_NE_IOCTL, flags, origin, status=error, **fields)
        if error or reply is None:
            raise OSError(error, os.strerror(error))
        return reply


_ALL_CONTROL = (1 << 64) - 1


def _is_dir(dir_fd: int, name: bytes) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _lock_length(start: int, end: int) -> int:
    """A lock's length as fcntl gives it: 0 means "to the end of the file, however far it grows"."""
    return 0 if end >= OFFSET_MAX else end - start + 1


def _lock_end(start: int, length: int) -> int:
    return OFFSET_MAX if length == 0 else min(OFFSET_MAX, start + length - 1)


def _link_target(value: object) -> bytes:
    """A symlink target a handler supplied: str (file system encoding), bytes-like, or None/empty."""
    if not value:
        raise OSError(errno.EIO, "the event handler completed readlink without a target")
    if isinstance(value, str):
        return os.fsencode(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise OSError(errno.EIO, f"the event handler gave a {type(value).__name__} as the link target")


def _desired_access(open_flags: int) -> int:
    mode = open_flags & os.O_ACCMODE
    access = 0
    if mode in (os.O_RDONLY, os.O_RDWR):
        access |= c.DESIRED_ACCESS_FILE_READ_DATA
    if mode in (os.O_WRONLY, os.O_RDWR):
        access |= c.DESIRED_ACCESS_FILE_WRITE_DATA
    if open_flags & os.O_APPEND:
        access |= c.DESIRED_ACCESS_FILE_APPEND_DATA
    if open_flags & _FMODE_EXEC:
        access |= c.DESIRED_ACCESS_FILE_EXECUTE
    return access


def _disposition(open_flags: int, created: bool) -> int:
    if open_flags & os.O_CREAT:
        if open_flags & os.O_EXCL:
            return c.FILE_DISPOSITION_CREATE_NEW
        if open_flags & os.O_TRUNC:
            return c.FILE_DISPOSITION_CREATE_ALWAYS
        return c.FILE_DISPOSITION_OPEN_ALWAYS
    if open_flags & os.O_TRUNC:
        return c.FILE_DISPOSITION_TRUNCATE_EXISTING
    return c.FILE_DISPOSITION_OPEN_EXISTING
