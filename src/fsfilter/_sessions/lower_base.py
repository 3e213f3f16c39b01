"""The state every part of the bottom layer shares: the node and handle tables, the caller's identity for
objects it creates, and how names are resolved (see lower_fs.py)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fsfilter._abi import fuse as abi
from fsfilter._sessions.fuse_session import Deferred, Handler
from fsfilter._sessions.journal import Journal
from fsfilter._sessions.layer import NO_HOOKS, Layer, StackHooks
from fsfilter._sessions.locks import LockTable
from fsfilter._sessions.nodes import GoneFile, Inode, OpenDir, OpenFile, View, Virtual
from fsfilter._system import libc, procfs
from fsfilter._wire import fuse as wire
from fsfilter._wire import ops
from fsfilter._wire.fuse import StatLike
from fsfilter._wire.replies import (
    Entry,
    StatView,
)

log = logging.getLogger("fsfilter.lower")

# Tells whether the reads and writes of the file at this path (relative to the mount, starting with
# "/") must be seen by the daemon; None asks for every file to be served by the daemon.
IoPolicy = Callable[[bytes], bool]

# Our lower fds serve daemon I/O at the explicit offsets the kernel sends (O_APPEND would move them) with
# buffers of any alignment (O_DIRECT would refuse them). A passthrough open does not use our fd's flags:
# the kernel opens its own backing file for each open, with the caller's flags. O_NOFOLLOW has been
# applied by the kernel already, and would make reopening through /proc/self/fd (a symlink) fail with ELOOP.
_LOWER_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT | os.O_NOFOLLOW
_SETID = stat.S_ISUID | stat.S_ISGID


@dataclass
class LowerOptions:
    entry_timeout: float = 60.0
    attr_timeout: float = 60.0
    negative_timeout: float = 10.0
    io_policy: IoPolicy | None = None
    locks: bool = False  # the daemon serves fcntl/flock locks (the session asks for them at INIT)


# Decides what the caller of a lock request gets: called with the outcome (0 or an errno), returns the errno
# to answer (0: success).
LockFinish = Callable[[int], int]

OPENED = _OPENED = "opened"  # memo of an OPEN/CREATE/OPENDIR: the handle the bottom made for it


class LowerBase(Layer):
    """The bottom layer's tables and the helpers its operations share."""

    def __init__(self, root_fd: int, options: LowerOptions) -> None:
        super().__init__()
        st = os.fstat(root_fd)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "the lower object is not a directory")
        self.options = options
        self.root = Inode(abi.ROOT_ID, root_fd, (st.st_dev, st.st_ino), abi.ROOT_ID, b"")
        self.root.nlookup = 1
        self.nodes: dict[int, Inode] = {abi.ROOT_ID: self.root}
        self.by_key: dict[tuple[int, int], Inode] = {self.root.key: self.root}
        self.files: dict[int, OpenFile] = {}
        self.dirs: dict[int, OpenDir] = {}
        self._next_id = abi.ROOT_ID + 1
        # The node and handle tables and each node's passthrough state. Taken last of the stack's locks; while it is
        # held the layers' needs_io/open_reply_flags hooks run, which take only their own leaf locks.
        self._lock = threading.Lock()
        self._is_root = os.geteuid() == 0
        self.session_fd = -1  # set when the session exists: needed for backing ids
        self.defer: Callable[[ops.Op], Deferred] | None = None  # the session's, for lock waits
        self.notify: Callable[[bytes], int] | None = None  # the session's: invalidations
        # The session's, around waits for an application's handler (see Session.interruptible).
        self.interruptible: Callable[[], contextlib.AbstractContextManager[Callable[[], bool]]] = _not_interruptible
        self.locks = LockTable()
        self.passthrough = False  # set from the INIT negotiation; cleared if the kernel refuses backing ids
        self.hooks: StackHooks = NO_HOOKS
        # Where the tables are written as they change, for a rescuer should this process die (see journal.py).
        self.journal: Journal | None = None
        self._intents = threading.local()  # .slot: this thread's intent slot in the journal
        # Uniques of changes a dead predecessor had started (its journal's intents): resent, one that finds its work
        # done (the name there already, or gone already) succeeds (see may_be_done).
        self.maybe_done: set[int] = set()
        self.top: Layer = self  # where the session enters the stack
        # Isolation: the views of each lower object (by key) whose owners' LOOKUPs get a node of their own, and the
        # virtual files, by (directory key, name). Changed under _lock; read without it on the hot path only to see
        # whether there are any.
        self.routes: dict[tuple[int, int], list[View]] = {}
        self.virtuals: dict[tuple[tuple[int, int], bytes], Virtual] = {}
        self._virtual_ids = 0
        self._swept = 0.0  # when dead processes' views were last dropped
        self._tables: list[dict[int, Handler]] = []  # the sessions' handler tables, bound to the top's methods

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Hold the tables' lock (around a fork: the copy must not inherit it held by a thread it lacks)."""
        with self._lock:
            yield

    def journal_node(self, node: Inode) -> None:
        """Write a node's record (under _lock). A view's node is not written: its handlers, or the decision that made
        it, do not outlive the process (a rescuer answers its requests with ESTALE)."""
        if self.journal is not None and node.nodeid != abi.ROOT_ID and node.view is None:
            self.journal.node(node.nodeid, node.parent, node.name, node.nlookup, node.key, node.backing_id,
                              node.backing_refs, node.daemon_opens)

    def intend(self, op: ops.Op) -> None:
        """Journal that this thread starts the change ``op`` asks for (before making it)."""
        journal = self.journal
        if journal is None:
            return
        slot = getattr(self._intents, "slot", None)
        if slot is None:
            with self._lock:
                slot = self._intents.slot = journal.intent_slot()
        journal.intend(slot, op.unique & ~abi.UNIQUE_RESEND)

    def may_be_done(self, op: ops.Op) -> bool:
        """Whether ``op`` is a change a predecessor started and may have made before it died without answering: the
        kernel resent it, and the predecessor's journal says it had begun it."""
        return bool(op.unique & abi.UNIQUE_RESEND) and (op.unique & ~abi.UNIQUE_RESEND) in self.maybe_done

    def journal_everything(self) -> None:
        """Write the whole tables (a journal started on tables that exist already: a mount taken over)."""
        journal = self.journal
        if journal is None:
            return
        with self._lock:
            for node in self.nodes.values():
                self.journal_node(node)
            for fh, f in self.files.items():
                journal.opened(fh, f.inode.nodeid, f.flags, False, f.passthrough)
            for fh, d in self.dirs.items():
                journal.opened(fh, d.nodeid, os.O_RDONLY | os.O_DIRECTORY, True)

    def new_handle(self, fd: int) -> int:
        """The handle the kernel will name a new open by (under _lock): its fd's number, unless a handle taken over
        from a predecessor process already has that number (see _sessions/handover.py)."""
        fh = fd
        while fh in self.files or fh in self.dirs:
            fh += 1 << 32
        return fh

    def inode(self, nodeid: int) -> Inode:
        node = self.nodes.get(nodeid)
        if node is None:
            raise OSError(errno.ESTALE, "unknown node id")
        if node.view is not None and node.view.gone:
            raise OSError(errno.EIO, "the filter that served this file has stopped")
        return node

    def file(self, fh: int) -> OpenFile:
        f = self.files.get(fh)
        if f is None:
            raise OSError(errno.EBADF, "unknown file handle")
        return f

    def directory(self, fh: int) -> OpenDir:
        d = self.dirs.get(fh)
        if d is None:
            raise OSError(errno.EBADF, "unknown directory handle")
        return d

    def path_of(self, nodeid: int) -> bytes:
        """The path of a node relative to the mount ("/" for the root), as last seen by lookups and renames."""
        parts = []
        node = self.nodes.get(nodeid)
        depth = 0
        while node is not None and node.nodeid != abi.ROOT_ID and depth < 4096:
            parts.append(node.name)
            node = self.nodes.get(node.parent)
            depth += 1
        return b"/" + b"/".join(reversed(parts))

    def _remember(self, fd: int, st: os.stat_result, parent: int, name: bytes, tid: int = 0) -> Inode:
        """Count one more kernel reference to the object ``fd`` (an O_PATH fd we now own) refers to: its own node, or
        the node of thread ``tid``'s view of it (isolation)."""
        key = (st.st_dev, st.st_ino)
        with self._lock:
            if tid and self.routes:
                view = self._view_of(key, tid)
                if view is not None:
                    os.close(fd)
                    return self._view_node(view, parent, name)
            node = self.by_key.get(key)
            if node is None:
                node = Inode(self._next_id, fd, key, parent, name)
                self._next_id += 1
                self.nodes[node.nodeid] = node
                self.by_key[key] = node
            else:
                os.close(fd)
                node.parent, node.name = parent, name
            node.nlookup += 1
            self.journal_node(node)
        if self.hooks.remembers:
            self.hooks.remembered(node)
        return node

    def entry(self, node: Inode, st: StatLike) -> Entry:
        hooks = self.hooks
        if node.view is not None:
            st = _view_stat(node.view, st)
        shown = hooks.shown(node.nodeid, st) if hooks.shows else st
        if node.view is not None or (self.routes and node.key in self.routes):
            # A name whose node depends on who asks: every path walk asks again. And one file behind several
            # nodes: what is written through one changes the attributes of the others, which are never cached.
            return Entry(node.nodeid, shown, 0.0, self.attr_timeout(node))
        return Entry(node.nodeid, shown, self.options.entry_timeout, self.options.attr_timeout)

    def attr_timeout(self, node: Inode) -> float:
        """How long the kernel may keep a node's attributes: not at all for a file with views (see entry), unless the
        view is the only node the file is written through (its transform says so: an encrypted file that only
        trusted processes may write), whose attributes then change only through it."""
        view = node.view
        if view is not None and view.transform is not None and getattr(view.transform, "sole_writer", False):
            return self.options.attr_timeout
        if view is not None or (self.routes and node.key in self.routes):
            return 0.0
        return self.options.attr_timeout

    def _entry(self, fd: int, parent: int, name: bytes, tid: int = 0) -> Entry:
        """The entry of a freshly opened O_PATH fd, which the tables then own (the node of ``tid``'s view, if any)."""
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        node = self._remember(fd, st, parent, name, tid)
        if node.view is not None:
            st = os.fstat(node.fd)
        return self.entry(node, st)

    # -- isolation: views and virtual files

    def view_for(self, key: tuple[int, int], tid: int) -> View | None:
        """Thread ``tid``'s view of the object ``key``, if it has one."""
        if not self.routes:
            return None
        with self._lock:
            return self._view_of(key, tid)

    def _view_of(self, key: tuple[int, int], tid: int) -> View | None:
        """Thread ``tid``'s view of the object ``key`` (under _lock); views whose owner is gone are dropped."""
        views = self.routes.get(key)
        if not views:
            return None
        for view in list(views):
            if view.admits is not None:
                if view.admits(tid):
                    return view
            elif view.owner == tid or libc.is_thread_of(view.owner, tid):
                if procfs.pidfd_alive(view.pidfd):
                    return view
                self._unroute(view)
        return None

    def _view_node(self, view: View, parent: int, name: bytes) -> Inode:
        """The node of ``view``, made if the kernel knows none now; one more lookup counted (under _lock)."""
        node = view.node
        if node is None or self.nodes.get(node.nodeid) is not node:
            node = Inode(self._next_id, os.dup(view.fd), view.of, parent, name)
            node.view = view
            self._next_id += 1
            self.nodes[node.nodeid] = node
            view.node = node
        node.parent, node.name = parent, name
        node.nlookup += 1
        return node

    def adopt_view(self, view: View, own: Inode) -> Inode:
        """The kernel gets the node of ``view`` where it was about to get ``own`` (a create's reply): the lookup
        counted on ``own`` moves to the view's node."""
        with self._lock:
            node = self._view_node(view, own.parent, own.name)
        self.forget_one(own.nodeid, 1)
        return node

    def route(self, view: View) -> None:
        """From now on the LOOKUPs of ``view.owner`` for the object ``view.of`` get the view's node; a view the owner
        had of it before stops being routed (its node lives on while the kernel knows it)."""
        with self._lock:
            self._sweep()
            for old in list(self.routes.get(view.of, ())):
                if old.owner == view.owner and (old.admits is None) == (view.admits is None):
                    self._unroute(old)
            self.routes.setdefault(view.of, []).append(view)
            own = self.by_key.get(view.of)
        if own is not None and self.notify is not None:
            # The file's own node may have attributes cached for long: from now on writes through the view change
            # them behind its back (an attributes-only invalidation takes no lock a request may hold).
            self.notify(wire.encode_inval_inode(own.nodeid, -1, 0))

    def unroute(self, key: tuple[int, int], owner: int) -> None:
        """The owner's LOOKUPs of the object get its own node again."""
        with self._lock:
            for old in list(self.routes.get(key, ())):
                if old.owner == owner:
                    self._unroute(old)

    def _sweep(self) -> None:
        """Drop the views whose process has ended (under _lock): at most once a second, when a view is made, so that
        short-lived processes leave nothing behind (fds, routes, uncached names) while the number of views stays
        bounded by the processes alive."""
        now = time.monotonic()
        if now - self._swept < 1.0:
            return
        self._swept = now
        for views in list(self.routes.values()):
            for view in list(views):
                if view.admits is not None:
                    if view.node is None:
                        self._unroute(view)  # a shared view the kernel knows no node of: made again when needed
                elif not procfs.pidfd_alive(view.pidfd):
                    self._unroute(view)
        for virtual in self.virtuals.values():
            for owner, view in list(virtual.views.items()):
                if view.pidfd < 0 or not procfs.pidfd_alive(view.pidfd):
                    del virtual.views[owner]

    def _unroute(self, view: View) -> None:
        views = self.routes.get(view.of)
        if views is not None and view in views:
            views.remove(view)
            if not views:
                del self.routes[view.of]
        if view.node is None or self.nodes.get(view.node.nodeid) is not view.node:
            view.close()  # no node uses its fds (a node holds a dup of fd; the view's own go with the route)

    def views_of(self, layer: object) -> list[View]:
        """Every view ``layer``'s decisions made (routed, or with a node the kernel still knows)."""
        with self._lock:
            found = {id(v): v for views in self.routes.values() for v in views if v.layer is layer}
            for node in self.nodes.values():
                if node.view is not None and node.view.layer is layer:
                    found[id(node.view)] = node.view
            for virtual in self.virtuals.values():
                if virtual.layer is layer:
                    for v in virtual.views.values():
                        found[id(v)] = v
            return list(found.values())

    def drop_views(self, layer: object) -> list[Inode]:
        """``layer`` left: its views and virtual files go; the opens of its handled views fail from now on (never
        wait for handlers that are gone). Returns the nodes the kernel should forget the names of."""
        views = self.views_of(layer)
        stale: list[Inode] = []
        with self._lock:
            for view in views:
                view.gone = True
                self._unroute(view)
                if view.node is not None:
                    stale.append(view.node)
            for where, virtual in list(self.virtuals.items()):
                if virtual.layer is layer:
                    del self.virtuals[where]
                    os.close(virtual.store)
            for f in self.files.values():
                seen = f.inode.view
                if seen is not None and seen.gone and seen.handled:
                    f.backend = GoneFile()
        return stale

    def add_virtual(self, parent: Inode, name: bytes, layer: object, mode: int) -> Virtual:
        """A virtual file ``name`` in the directory ``parent``, its data in a new memfd."""
        if self._exists_at(parent.fd, name):
            raise FileExistsError(errno.EEXIST, "a file of that name exists")
        store = os.memfd_create("fsfilter-virtual:" + os.fsdecode(name)[:200], os.MFD_CLOEXEC)
        os.fchmod(store, mode & 0o7777)
        with self._lock:
            where = (parent.key, name)
            if where in self.virtuals:
                os.close(store)
                raise FileExistsError(errno.EEXIST, "a virtual file of that name exists")
            self._virtual_ids += 1
            virtual = Virtual((0, self._virtual_ids), parent.key, name, store, layer, mode)
            self.virtuals[where] = virtual
        return virtual

    def remove_virtual(self, parent_key: tuple[int, int], name: bytes) -> Virtual | None:
        """Take a virtual file out of its directory; its views' nodes live on (as an unlinked file's would)."""
        with self._lock:
            virtual = self.virtuals.pop((parent_key, name), None)
            if virtual is None:
                return None
            for view in virtual.views.values():
                self._unroute(view)
        os.close(virtual.store)  # (each view and node holds a dup of its own)
        return virtual

    def virtual_at(self, parent: Inode, name: bytes) -> Virtual | None:
        return self.virtuals.get((parent.key, name)) if self.virtuals else None

    def _virtual_entry(self, virtual: Virtual, parent: Inode, name: bytes, tid: int) -> Entry:
        """LOOKUP of a virtual file: the node of the caller's process's own view of it."""
        owner = procfs.tgid(tid) if tid else 0
        if owner <= 0:
            raise FileNotFoundError(errno.ENOENT, "no process to show the virtual file to")
        with self._lock:
            view = virtual.views.get(owner)
            if view is not None and not procfs.pidfd_alive(view.pidfd):
                self._unroute(view)
                del virtual.views[owner]
                view = None
            if view is None:
                self._sweep()
                pidfd = os.pidfd_open(owner)
                view = View(owner, pidfd, os.dup(virtual.store), "", True, virtual.key, virtual.layer)
                virtual.views[owner] = view
                self.routes.setdefault(virtual.key, []).append(view)
            node = self._view_node(view, parent.nodeid, name)
        if self.hooks.remembers:
            self.hooks.remembered(node)
        return self.entry(node, os.fstat(node.fd))

    @staticmethod
    def _exists_at(dfd: int, name: bytes) -> bool:
        try:
            os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return False
        return True

    def locate(self, op: ops.Op | None, parent: Inode, name: bytes) -> tuple[int, bytes, bool]:
        """The directory fd and name that a request naming ``name`` in ``parent`` acts on, and whether the
        caller must close that fd: the name itself, unless a layer redirects it (reparse rules)."""
        hooks = self.hooks
        return hooks.where(op, parent, name) if hooks.redirects else (parent.fd, name, False)

    def _open_path(self, op: ops.Op | None, parent: Inode, name: bytes) -> int:
        """An O_PATH fd of the object ``name`` in ``parent`` resolves to."""
        dfd, at, owned = self.locate(op, parent, name)
        try:
            return os.open(at, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            if owned:
                os.close(dfd)

    def lookup_child(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """Like LOOKUP, for READDIRPLUS (no event fires): the node and its attributes; one more lookup counted."""
        fd = self._open_path(None, parent, name)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._remember(fd, st, parent.nodeid, name), st

    def attributes(self, nodeid: int, st: StatLike) -> StatLike:
        """The attributes replies show for node ``nodeid`` (layers may change them)."""
        if self.virtuals or self.routes:
            node = self.nodes.get(nodeid)
            if node is not None and node.view is not None:
                st = _view_stat(node.view, st)
        hooks = self.hooks
        return hooks.shown(nodeid, st) if hooks.shows else st

    def forget_one(self, nodeid: int, count: int) -> None:
        with self._lock:
            node = self.nodes.get(nodeid)
            if node is None or nodeid == abi.ROOT_ID:
                return
            node.nlookup -= count
            journal = self.journal
            if node.nlookup > 0:
                if journal is not None:
                    journal.count(nodeid, node.nlookup)
                return
            del self.nodes[nodeid]
            if self.by_key.get(node.key) is node:
                del self.by_key[node.key]
            view = node.view
            if view is not None and view.node is node:
                view.node = None
                if view.admits is not None:
                    self._unroute(view)  # a shared view is made again when next looked up: its fds go now
                if view not in self.routes.get(view.of, ()):
                    view.close()  # no longer routed, and now no node: nothing will use it again
            if journal is not None and view is None:
                journal.forget(nodeid)
        os.close(node.fd)
        self.hooks.dropped(nodeid)

    def _as_caller(self, op: ops.Op, umask: int | None) -> bool:
        if umask is not None:
            os.umask(umask)  # per thread: readers unshare CLONE_FS
        if not self._is_root or (op.uid == 0 and op.gid == 0):
            return False
        group = wire.supplementary_group(op.req.ext)
        libc.setgroups_thread([group] if group is not None else [])
        libc.setfsgid(op.gid)
        libc.setfsuid(op.uid)
        return True

    @staticmethod
    def _restore_identity(switched: bool) -> None:
        if switched:
            libc.setfsuid(0)
            libc.setfsgid(0)
            libc.setgroups_thread([])

    def kill_privileges(self, fd: int) -> None:
        """What a write, truncate or chown by an unprivileged caller does to set-id bits and capabilities."""
        st = os.fstat(fd)
        mode = st.st_mode
        kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if mode & kill:
            os.chmod(procfs.fd_path(fd), stat.S_IMODE(mode) & ~kill)
        if mode & 0o111:
            try:
                os.removexattr(procfs.fd_path(fd), "security.capability")
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise


def _view_stat(view: View, st: StatLike) -> StatLike:
    """A virtual file's memfd has no name, so no link: it shows one. A transformed view shows its transform's."""
    if view.transform is not None:
        return view.transform.shown(st)  # type: ignore[no-any-return]
    return StatView(st, nlink=1) if view.of[0] == 0 and st.st_nlink == 0 else st


@contextlib.contextmanager
def _not_interruptible() -> Iterator[Callable[[], bool]]:
    yield lambda: False
