"""The bottom of every filter stack: FUSE operations served on a lower directory, the node and handle
tables, file backends and passthrough backing ids.

Every lower object is reached through an fd: an ``O_PATH`` fd per inode (opened before the mount
for the root), ``*at()`` calls relative to it, and ``/proc/self/fd/N`` to reopen it. So the daemon
works when it is mounted over the lower directory itself, and never resolves a path it serves.

Permissions: the mount uses ``default_permissions``, so the kernel checks mode bits and POSIX ACLs
against the caller before a request arrives (with the caller's own groups, which FUSE does not send).
The daemon, as root, then acts on the lower objects; only objects it creates take the caller's
fsuid, fsgid, group and umask, so that ownership, setgid directories and default ACLs come out as
they would natively.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fsfilter._abi import fuse as abi
from fsfilter._abi import linux
from fsfilter._sessions.fuse_session import Deferred, Handler
from fsfilter._sessions.layer import NO_HOOKS, Layer, StackHooks
from fsfilter._sessions.locks import F_RDLCK, F_UNLCK, F_WRLCK, LockTable
from fsfilter._sessions.nodes import Inode, OpenDir, OpenFile
from fsfilter._system import fuse_device, libc, procfs
from fsfilter._wire import fuse as wire
from fsfilter._wire import ops
from fsfilter._wire.fuse import StatLike
from fsfilter._wire.replies import (
    EMPTY,
    Attr,
    Created,
    Data,
    DirEntry,
    Entry,
    IoctlOut,
    Listing,
    LockOut,
    Offset,
    Opened,
    Reply,
    Statfs,
    Written,
    xattr_reply,
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


class LowerFS(Layer):
    """The bottom of a filter stack: every operation served on the directory ``root_fd`` refers to.

    ``hooks`` asks the layers above what the bottom cannot decide alone (see sessions/layer.py); ``handlers``
    builds the session's table, entering the stack at its top layer."""

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
        # The session's, around waits for an application's handler (see Session.interruptible).
        self.interruptible: Callable[[], contextlib.AbstractContextManager[Callable[[], bool]]] = _not_interruptible
        self.locks = LockTable()
        self.passthrough = False  # set from the INIT negotiation; cleared if the kernel refuses backing ids
        self.hooks: StackHooks = NO_HOOKS
        self.top: Layer = self  # where the session enters the stack

    # -- tables

    def handlers(self) -> dict[int, Handler]:
        """The session's table: each opcode served by the top of the stack (looked up per request, so that layers
        join and leave while the session runs); an open's I/O mode is settled once the whole stack answered."""
        table: dict[int, Handler] = {}
        for opcode, spec in ops.OPS.items():
            if opcode in (abi.Opcode.GETLK, abi.Opcode.SETLK, abi.Opcode.SETLKW) and not self.options.locks:
                continue  # the kernel keeps locks itself
            if spec.method in ("open", "create", "tmpfile", "opendir"):
                table[opcode] = self._settled(spec.method)
            else:
                table[opcode] = self._entering(spec.method)
        return table

    def _entering(self, method: str) -> Handler:
        def serve(op: ops.Op) -> Reply | None:
            return getattr(self.top, method)(op)  # type: ignore[no-any-return]
        return serve

    def _settled(self, method: str) -> Handler:
        def serve(op: ops.Op) -> Reply | None:
            try:
                reply = getattr(self.top, method)(op)
            except BaseException:
                self._undo_open(op, method == "opendir")
                raise
            opened = reply.opened if isinstance(reply, Created) else reply
            if isinstance(opened, Opened) and method != "opendir":
                self.settle_open(opened)
            return reply  # type: ignore[no-any-return]
        return serve

    def _undo_open(self, op: ops.Op, is_dir: bool) -> None:
        """An open the bottom granted and a layer above then failed: close it through the whole stack, so that
        every layer that saw it opened sees it closed (the others pass the release down)."""
        opened: tuple[int, object] | None = op.recall(_OPENED)
        if opened is None:
            return  # refused before the bottom opened anything
        fh, record = opened
        if (self.dirs if is_dir else self.files).get(fh) is not record:
            return  # closed already by the layer that refused (and the number perhaps reused since)
        release = ops.Release.undoing(op, fh)
        try:
            if is_dir:
                self.top.releasedir(release)
            else:
                self.top.release(release)
        except Exception:
            log.exception("closing an open that a layer refused failed")

    def inode(self, nodeid: int) -> Inode:
        node = self.nodes.get(nodeid)
        if node is None:
            raise OSError(errno.ESTALE, "unknown node id")
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

    def _remember(self, fd: int, st: os.stat_result, parent: int, name: bytes) -> Inode:
        """Count one more kernel reference to the object ``fd`` (an O_PATH fd we now own) refers to."""
        key = (st.st_dev, st.st_ino)
        with self._lock:
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
        self.hooks.remembered(node)
        return node

    def entry(self, node: Inode, st: StatLike) -> Entry:
        return Entry(node.nodeid, self.hooks.shown(node.nodeid, st), self.options.entry_timeout,
                     self.options.attr_timeout)

    def _entry(self, fd: int, parent: int, name: bytes) -> Entry:
        """The entry of a freshly opened O_PATH fd, which the tables then own."""
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self.entry(self._remember(fd, st, parent, name), st)

    def locate(self, op: ops.Op | None, parent: Inode, name: bytes) -> tuple[int, bytes, bool]:
        """The directory fd and name that a request naming ``name`` in ``parent`` acts on, and whether the
        caller must close that fd: the name itself, unless a layer redirects it (reparse rules)."""
        return self.hooks.where(op, parent, name)

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
        return self.hooks.shown(nodeid, st)

    def forget_one(self, nodeid: int, count: int) -> None:
        with self._lock:
            node = self.nodes.get(nodeid)
            if node is None or nodeid == abi.ROOT_ID:
                return
            node.nlookup -= count
            if node.nlookup > 0:
                return
            del self.nodes[nodeid]
            if self.by_key.get(node.key) is node:
                del self.by_key[node.key]
        os.close(node.fd)
        self.hooks.dropped(nodeid)

    # -- identity of the caller, for objects we create

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

    # -- names

    def lookup(self, op: ops.Lookup) -> Reply:
        parent = self.inode(op.nodeid)
        try:
            fd = self._open_path(op, parent, op.name)
        except FileNotFoundError:
            if self.options.negative_timeout > 0:
                return Entry(0, None, self.options.negative_timeout, 0.0)
            raise
        return self._entry(fd, parent.nodeid, op.name)

    def forget(self, op: ops.Forget) -> None:
        self.forget_one(op.nodeid, op.count)

    def batch_forget(self, op: ops.BatchForget) -> None:
        for nodeid, nlookup in op.items:
            self.forget_one(nodeid, nlookup)

    def getattr(self, op: ops.Getattr) -> Reply:
        node = self.inode(op.nodeid)
        f = self.files.get(op.fh) if op.fh is not None else None
        st = os.fstat(f.fd if f is not None else node.fd)
        return Attr(self.attributes(node.nodeid, st), self.options.attr_timeout)

    def setattr(self, op: ops.Setattr) -> Reply:
        valid = op.valid
        node = self.inode(op.nodeid)
        f = self.files.get(op.fh) if op.fh is not None else None
        if not valid & ~(abi.FATTR_FH | abi.FATTR_LOCKOWNER):
            # No attribute at all: a chown(-1, -1), or a change by a caller without CAP_FSETID that must drop
            # set-id bits (HANDLE_KILLPRIV_V2 leaves that to us). A chown that changes nothing, as the caller,
            # drops exactly what the caller's would natively (and updates ctime).
            switched = self._as_caller(op, None)
            try:
                libc.fchown_fd(node.fd, -1, -1)
            finally:
                self._restore_identity(switched)
        if valid & abi.FATTR_MODE:
            if f is not None:
                os.fchmod(f.fd, stat.S_IMODE(op.mode))
            else:
                if stat.S_ISLNK(os.fstat(node.fd).st_mode):
                    raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
                os.chmod(procfs.fd_path(node.fd), stat.S_IMODE(op.mode))
        if valid & (abi.FATTR_UID | abi.FATTR_GID):
            libc.fchown_fd(node.fd, op.uid_to if valid & abi.FATTR_UID else -1,
                           op.gid_to if valid & abi.FATTR_GID else -1)
        if valid & abi.FATTR_SIZE:
            if f is not None:
                f.backend.truncate(op.size)
            else:
                os.truncate(procfs.fd_path(node.fd), op.size)
            if valid & abi.FATTR_KILL_SUIDGID:
                self.kill_privileges(f.fd if f is not None else node.fd)
        if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW):
            libc.utimensat_fd(node.fd,
                              _time_arg(valid, abi.FATTR_ATIME, abi.FATTR_ATIME_NOW, op.atime, op.atime_ns),
                              _time_arg(valid, abi.FATTR_MTIME, abi.FATTR_MTIME_NOW, op.mtime, op.mtime_ns))
        return Attr(self.attributes(node.nodeid, os.fstat(node.fd)), self.options.attr_timeout)

    def readlink(self, op: ops.Plain) -> Reply:
        return Data(libc.readlink_fd(self.inode(op.nodeid).fd))

    def _make(self, op: ops.Op, name: bytes, umask: int | None, make: Callable[[int, bytes], None]) -> Entry:
        parent = self.inode(op.nodeid)
        dfd, at, owned = self.locate(op, parent, name)
        try:
            switched = self._as_caller(op, umask)
            try:
                make(dfd, at)
            finally:
                self._restore_identity(switched)
            fd = os.open(at, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            if owned:
                os.close(dfd)
        return self._entry(fd, parent.nodeid, name)

    def mknod(self, op: ops.Mknod) -> Reply:
        dev = wire.decode_rdev(op.rdev)
        return self._make(op, op.name, op.umask, lambda dfd, at: os.mknod(at, op.mode, dev, dir_fd=dfd))

    def mkdir(self, op: ops.Mkdir) -> Reply:
        return self._make(op, op.name, op.umask, lambda dfd, at: os.mkdir(at, op.mode, dir_fd=dfd))

    def symlink(self, op: ops.Symlink) -> Reply:
        return self._make(op, op.name, None, lambda dfd, at: os.symlink(op.target, at, dir_fd=dfd))

    def link(self, op: ops.Link) -> Reply:
        node = self.inode(op.target)
        parent = self.inode(op.nodeid)
        if self._is_root:
            libc.link_fd(node.fd, parent.fd, op.name)
        else:
            os.link(procfs.fd_path(node.fd), op.name, dst_dir_fd=parent.fd, follow_symlinks=True)
        fd = os.open(op.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        return self._entry(fd, parent.nodeid, op.name)

    def unlink(self, op: ops.Remove) -> Reply:
        dfd, at, owned = self.locate(op, self.inode(op.nodeid), op.name)
        try:
            os.unlink(at, dir_fd=dfd)
        finally:
            if owned:
                os.close(dfd)
        return EMPTY

    def rmdir(self, op: ops.Remove) -> Reply:
        dfd, at, owned = self.locate(op, self.inode(op.nodeid), op.name)
        try:
            os.rmdir(at, dir_fd=dfd)
        finally:
            if owned:
                os.close(dfd)
        return EMPTY

    def rename(self, op: ops.Rename) -> Reply:
        src, dst = self.inode(op.nodeid), self.inode(op.new_dir)
        flags = op.flags
        if flags & ~(linux.RENAME_NOREPLACE | linux.RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        if flags:
            libc.renameat2(src.fd, op.name, dst.fd, op.new_name, flags)
        else:
            os.rename(op.name, op.new_name, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        self.moved(dst, op.new_name)
        if flags & linux.RENAME_EXCHANGE:
            self.moved(src, op.name)
        return EMPTY

    def moved(self, parent: Inode, name: bytes) -> None:
        """Keep the remembered name of a renamed object current (for path_of)."""
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except OSError:
            return
        node = self.by_key.get((st.st_dev, st.st_ino))
        if node is not None:
            node.parent, node.name = parent.nodeid, name

    # -- files

    def _needs_daemon(self, f: OpenFile) -> bool:
        """Whether this open's reads and writes must go through the daemon rather than kernel passthrough."""
        node = f.inode
        if not self.passthrough or f.backend.passthrough_fd() is None:
            return True
        lower = f.st
        if not stat.S_ISREG(lower.st_mode):
            return True
        if _writes_drop_privileges(node.fd, lower):
            # A passthrough write runs with the daemon's credentials and so would keep set-id bits and
            # capabilities that the caller's write must clear; the daemon clears them itself.
            return True
        policy = self.options.io_policy
        if policy is not None and policy(self.path_of(node.nodeid)):
            return True
        return self.hooks.needs_io(node, lower)

    def settle_open(self, opened: Opened) -> None:
        """Decide, once the whole stack has answered an OPEN/CREATE, how the open's reads and writes are served:
        kernel passthrough when its backend offers an fd and no layer needs them, else the daemon. One mode per
        inode while it has opens (the kernel refuses to mix them)."""
        f = self.files.get(opened.fh)
        if f is None or f.passthrough is not None:
            return
        node = f.inode
        with self._lock:
            if node.backing_refs:
                daemon = False
            elif node.daemon_opens:
                daemon = True
            else:
                daemon = self._needs_daemon(f)
            if not daemon and not node.backing_refs:
                fd = f.backend.passthrough_fd()
                try:
                    node.backing_id = fuse_device.backing_open(self.session_fd, fd)
                except OSError as exc:
                    log.warning("kernel passthrough refused (%s); the daemon serves all reads and writes", exc)
                    self.passthrough = False
                    daemon = True
            if daemon:
                node.daemon_opens += 1
                f.passthrough = False
                flags = opened.flags | abi.OpenReplyFlag.NOFLUSH
                sig = (f.st.st_mtime_ns, f.st.st_size)
                if node.cache_sig == sig:
                    flags |= abi.OpenReplyFlag.KEEP_CACHE
                node.cache_sig = sig
                opened.flags = self._reply_flags(node, int(flags), False)
                return
            node.backing_refs += 1
            f.passthrough = True
            flags = opened.flags | abi.OpenReplyFlag.NOFLUSH | abi.OpenReplyFlag.PASSTHROUGH
            opened.flags = self._reply_flags(node, int(flags), True)
            opened.backing_id = node.backing_id

    def _reply_flags(self, node: Inode, flags: int, passthrough: bool) -> int:
        flags = self.hooks.open_reply_flags(node, flags, passthrough)
        if self.options.locks:
            # close(2) drops the caller's POSIX locks; the kernel tells the daemon so only with a FLUSH.
            flags &= ~abi.OpenReplyFlag.NOFLUSH
        return flags

    def _registered(self, op: ops.Op, fd: int, node: Inode, st: os.stat_result) -> Opened:
        record = OpenFile(fd, node, st)
        with self._lock:
            self.files[fd] = record
        op.remember(_OPENED, (fd, record))
        return Opened(fd)

    def open(self, op: ops.Open) -> Reply:
        node = self.inode(op.nodeid)
        st = os.fstat(node.fd)
        fd = os.open(procfs.fd_path(node.fd), (op.flags & ~_LOWER_STRIP) | os.O_CLOEXEC)
        try:
            if op.flags & os.O_TRUNC and op.open_flags & abi.FUSE_OPEN_KILL_SUIDGID:
                self.kill_privileges(fd)
            if op.flags & os.O_TRUNC:
                st = os.fstat(fd)
            return self._registered(op, fd, node, st)
        except BaseException:
            self.files.pop(fd, None)
            os.close(fd)
            raise

    def _created(self, op: ops.Op, fd: int, parent: Inode, name: bytes) -> Reply:
        """Reply to CREATE/TMPFILE: the new object's entry, then its open."""
        try:
            path_fd = os.open(procfs.fd_path(fd), os.O_PATH | os.O_CLOEXEC)
            st = os.fstat(path_fd)
            node = self._remember(path_fd, st, parent.nodeid, name)
            entry = Entry(node.nodeid, st, self.options.entry_timeout, self.options.attr_timeout)
            return Created(entry, self._registered(op, fd, node, st))
        except BaseException:
            os.close(fd)
            raise

    def create(self, op: ops.Create) -> Reply:
        flags = op.flags
        parent = self.inode(op.nodeid)
        lower = (flags & ~_LOWER_STRIP) | (flags & (os.O_EXCL | os.O_NOFOLLOW)) | os.O_CREAT | os.O_CLOEXEC
        dfd, at, owned = self.locate(op, parent, op.name)
        try:
            switched = self._as_caller(op, op.umask)
            try:
                fd = os.open(at, lower, op.mode & 0o7777, dir_fd=dfd)  # permission bits only: a top bit overflows
            finally:
                self._restore_identity(switched)
        finally:
            if owned:
                os.close(dfd)
        return self._created(op, fd, parent, op.name)

    def tmpfile(self, op: ops.Create) -> Reply:
        parent = self.inode(op.nodeid)
        switched = self._as_caller(op, op.umask)
        try:
            fd = os.open(procfs.fd_path(parent.fd), (op.flags & ~_LOWER_STRIP) | os.O_CLOEXEC, op.mode & 0o7777)
        finally:
            self._restore_identity(switched)
        return self._created(op, fd, parent, b"")

    def read(self, op: ops.Read) -> Reply:
        return Data(self.file(op.fh).backend.read(op.size, op.offset))

    def write(self, op: ops.Write) -> Reply:
        f = self.file(op.fh)
        written = f.backend.write(op.data, op.offset)
        if op.write_flags & abi.FUSE_WRITE_KILL_SUIDGID:
            self.kill_privileges(f.fd)
        return Written(written)

    def flush(self, op: ops.Flush) -> Reply:
        f = self.file(op.fh)
        if self.options.locks:
            self.locks.release_owner(f.inode.nodeid, op.owner)
        return EMPTY

    def release(self, op: ops.Release) -> Reply:
        self.release_file(op.fh)
        return EMPTY

    def release_file(self, fh: int) -> None:
        """Forget an open file and close its lower fd (also used to undo an open a handler refused)."""
        with self._lock:
            f = self.files.pop(fh, None)
            if f is None:
                raise OSError(errno.EBADF, "unknown file handle")
            node = f.inode
            if f.passthrough:
                node.backing_refs -= 1
                if node.backing_refs == 0:
                    # The kernel keeps the backing file of each open itself; the id only has to last
                    # until the last open of the inode is released.
                    fuse_device.backing_close(self.session_fd, node.backing_id)
                    node.backing_id = 0
            elif f.passthrough is False:
                node.daemon_opens -= 1
        if self.options.locks:
            self.locks.release_fh(node.nodeid, fh)  # flock and OFD locks belong to the open file
        os.close(fh)

    # -- locks (only with LowerOptions.locks; otherwise the kernel keeps them on its own inodes)

    def getlk(self, op: ops.Lock) -> Reply:
        node = self.file(op.fh).inode
        found = self.locks.test(node.nodeid, op.owner, op.start, op.end, op.kind == F_WRLCK, op.flock)
        if found is None:
            return LockOut(op.start, op.end, F_UNLCK, 0)
        return LockOut(found.start, found.end, F_WRLCK if found.exclusive else F_RDLCK, found.pid)

    def setlk(self, op: ops.Lock) -> Reply | None:
        return self.lock(op, False, *_lock_finish(op))

    def setlkw(self, op: ops.Lock) -> Reply | None:
        return self.lock(op, True, *_lock_finish(op))

    def lock(self, lk: ops.Lock, wait: bool, finish: LockFinish | None = None,
             finish_in_thread: bool = False) -> Reply | None:
        """Take or release a lock. A lock that must wait is answered later (returns None): when a release
        grants it, or with EINTR when the caller is interrupted. ``finish`` sees the outcome and says what the
        caller gets; when it turns a granted lock into a failure, the lock is let go again. With
        ``finish_in_thread`` a late outcome is finished on a thread of its own (``finish`` may block), not on
        the thread of the request whose release granted it."""
        node = self.file(lk.fh).inode
        if lk.kind not in (F_RDLCK, F_WRLCK, F_UNLCK):
            raise OSError(errno.EINVAL, "bad lock type")

        def settle(error: int) -> int:
            final = finish(error) if finish is not None else error
            if error == 0 and final and lk.kind != F_UNLCK:
                self.locks.set(node.nodeid, lk.owner, lk.start, lk.end, F_UNLCK, 0, lk.fh, flock=lk.flock)
            return final

        deferred: Deferred | None = None
        if wait:
            if self.defer is None:
                raise OSError(errno.ENOLCK, "lock waits need the session")
            deferred = self.defer(lk)
            if deferred.interrupted:
                raise OSError(errno.EINTR, "interrupted")

        def complete() -> None:
            assert deferred is not None
            try:
                final = settle(0)
            except Exception:  # never leave the caller waiting for an answer
                log.exception("finishing a granted lock failed")
                self.locks.set(node.nodeid, lk.owner, lk.start, lk.end, F_UNLCK, 0, lk.fh, flock=lk.flock)
                final = errno.EIO
            if final:
                deferred.fail(final)
            else:
                deferred.reply(b"")

        def granted(_: int) -> None:
            if finish_in_thread:
                threading.Thread(target=complete, name="fsfilter-lock-granted", daemon=True).start()
            else:
                complete()

        result = self.locks.set(node.nodeid, lk.owner, lk.start, lk.end, lk.kind, lk.lock_pid, lk.fh,
                                flock=lk.flock, key=lk.unique, granted=granted if wait else None)
        if result is None:
            assert deferred is not None
            if not deferred.on_interrupt(lambda: self.locks.cancel(lk.unique)) and self.locks.cancel(lk.unique):
                raise OSError(errno.EINTR, "interrupted")  # the interrupt came before the canceller was set
            return None
        final = settle(result)
        if final:
            raise OSError(final, os.strerror(final))
        return EMPTY

    def fsync(self, op: ops.Fsync) -> Reply:
        self.file(op.fh).backend.fsync(op.datasync)
        return EMPTY

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

    # -- directories

    def opendir(self, op: ops.Open) -> Reply:
        node = self.inode(op.nodeid)
        fd = os.open(procfs.fd_path(node.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        record = self.dirs[fd] = OpenDir(fd)
        op.remember(_OPENED, (fd, record))
        return Opened(fd)

    def readdir(self, op: ops.Read) -> Reply:
        """READDIR and READDIRPLUS: the names that fit, each passed up through the layers (which may hide it or
        change it) before the next is taken, so that hidden names never end a listing early."""
        d = self.directory(op.fh)
        plus = op.plus
        out: list[DirEntry] = []
        used = 0
        parent = self.inode(op.nodeid)
        hooks = self.hooks
        with d.lock:
            if op.offset != d.pos:  # a seekdir/rewinddir, or a reply the kernel did not take whole
                os.lseek(d.fd, op.offset, os.SEEK_SET)
                d.pending = []
                d.pos = op.offset
            while True:
                if not d.pending:
                    d.pending = d.reader.read(d.fd)
                    if not d.pending:
                        break
                ino, next_off, dtype, name = d.pending[0]
                entry = DirEntry(name, ino, next_off, dtype)
                need = entry.size(plus)
                if used + need > op.size:
                    break
                d.pending.pop(0)
                d.pos = next_off
                nodeid = 0
                if plus and name not in (b".", b".."):
                    try:
                        node, st = self.lookup_child(parent, name)
                    except FileNotFoundError:
                        continue  # gone since it was listed
                    nodeid = node.nodeid
                    entry.attr = st
                    entry.entry = self.entry(node, st)
                kept: DirEntry | None = entry
                try:
                    if hooks.lists:
                        kept = hooks.listed(op, parent, entry)
                finally:
                    if nodeid and (kept is None or kept.entry is None):
                        self.forget_one(nodeid, 1)  # the kernel never hears of the node: give its lookup back
                if kept is not None:
                    out.append(kept)
                    used += need
        return Listing(out, plus)

    def releasedir(self, op: ops.Release) -> Reply:
        self.release_dir(op.fh)
        return EMPTY

    def release_dir(self, fh: int) -> None:
        d = self.dirs.pop(fh, None)
        if d is None:
            raise OSError(errno.EBADF, "unknown directory handle")
        os.close(d.fd)

    def fsyncdir(self, op: ops.Fsync) -> Reply:
        os.fsync(self.directory(op.fh).fd)
        return EMPTY

    # -- the rest

    def statfs(self, op: ops.Plain) -> Reply:
        return Statfs(os.fstatvfs(self.inode(op.nodeid).fd))

    def access(self, op: ops.Access) -> Reply:
        node = self.inode(op.nodeid)
        switched = self._as_caller(op, None)
        try:
            ok = os.access(procfs.fd_path(node.fd), op.mask, effective_ids=True)
        finally:
            self._restore_identity(switched)
        if not ok:
            raise OSError(errno.EACCES, "access denied")
        return EMPTY

    def setxattr(self, op: ops.Setxattr) -> Reply:
        node = self.inode(op.nodeid)
        os.setxattr(procfs.fd_path(node.fd), op.name, op.value, op.flags)
        if op.xflags & abi.FUSE_SETXATTR_ACL_KILL_SGID:
            mode = os.fstat(node.fd).st_mode
            os.chmod(procfs.fd_path(node.fd), stat.S_IMODE(mode) & ~stat.S_ISGID)
        return EMPTY

    def getxattr(self, op: ops.Getxattr) -> Reply:
        """GETXATTR and LISTXATTR (``op.name`` empty)."""
        return xattr_reply(self.xattr_value(op), op.size)

    def xattr_value(self, op: ops.Getxattr) -> bytes:
        """The whole value a GETXATTR asks for, or the NUL-terminated names a LISTXATTR lists (the reply is cut
        to the caller's size from it)."""
        where = procfs.fd_path(self.inode(op.nodeid).fd)
        if op.opcode == abi.Opcode.GETXATTR:
            return os.getxattr(where, op.name)
        names = os.listxattr(where)
        if op.uid != 0:
            # Listed natively only to callers with CAP_SYS_ADMIN (we list as root): uid 0 stands for that.
            names = [n for n in names if not n.startswith("trusted.")]
        return b"".join(os.fsencode(n) + b"\0" for n in names)

    def removexattr(self, op: ops.Removexattr) -> Reply:
        os.removexattr(procfs.fd_path(self.inode(op.nodeid).fd), op.name)
        return EMPTY

    def fallocate(self, op: ops.Fallocate) -> Reply:
        self.file(op.fh).backend.allocate(op.mode, op.offset, op.length)
        return EMPTY

    def lseek(self, op: ops.Lseek) -> Reply:
        return Offset(os.lseek(self.file(op.fh).fd, op.offset, op.whence))

    def copy_file_range(self, op: ops.CopyFileRange) -> Reply:
        if op.flags:
            raise OSError(errno.EINVAL, "copy_file_range flags must be 0")
        n = os.copy_file_range(self.file(op.fh_in).fd, self.file(op.fh_out).fd, min(op.length, 1 << 30), op.off_in,
                               op.off_out)
        return Written(n)

    def ioctl(self, op: ops.Ioctl) -> Reply:
        if op.flags & abi.FUSE_IOCTL_COMPAT:
            raise OSError(errno.ENOSYS, "32-bit ioctls are not served")
        f = self.files.get(op.fh)
        fd = f.fd if f is not None else self.directory(op.fh).fd
        if op.cmd == linux.FS_IOC_GETFLAGS:
            buf = bytearray(max(op.out_size, 8))
            fcntl.ioctl(fd, op.cmd, buf, True)
            return IoctlOut(0, bytes(buf[:op.out_size]))
        if op.cmd == linux.FS_IOC_SETFLAGS:
            fcntl.ioctl(fd, op.cmd, op.data.ljust(8, b"\0"))
            return IoctlOut(0)
        raise OSError(errno.ENOTTY, "ioctl not served")

    def syncfs(self, op: ops.Plain) -> Reply:
        fd = os.open(procfs.fd_path(self.root.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            libc.syncfs(fd)
        finally:
            os.close(fd)
        return EMPTY

    def destroy(self, op: ops.Plain) -> Reply:
        return EMPTY

    # -- invalidation and shutdown

    def resolve(self, relpath: bytes) -> list[tuple[Inode, bytes, Inode | None]]:
        """The known nodes along a path below the root: (parent, name, child or None) per component."""
        out: list[tuple[Inode, bytes, Inode | None]] = []
        parent = self.root
        for name in [p for p in relpath.split(b"/") if p]:
            try:
                st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
            except OSError:
                out.append((parent, name, None))
                break
            child = self.by_key.get((st.st_dev, st.st_ino))
            out.append((parent, name, child))
            if child is None:
                break
            parent = child
        return out

    def close(self) -> None:
        """Close every fd the tables hold (after the session has stopped)."""
        for f in list(self.files.values()):
            try:
                os.close(f.fd)
            except OSError:
                pass
        for d in list(self.dirs.values()):
            try:
                os.close(d.fd)
            except OSError:
                pass
        for node in list(self.nodes.values()):
            if node is not self.root:
                try:
                    os.close(node.fd)
                except OSError:
                    pass
        self.files.clear()
        self.dirs.clear()
        self.nodes = {abi.ROOT_ID: self.root}
        self.by_key = {self.root.key: self.root}


_LOCK_FINISH = "lock-finish"
_OPENED = "opened"  # memo of an OPEN/CREATE/OPENDIR: the handle the bottom made for it


def add_lock_finish(op: ops.Lock, finish: LockFinish, in_thread: bool) -> None:
    """A layer's After work on a lock request's outcome, run by the bottom once the outcome is known; layers
    add theirs on the way down, and they run from the lowest up."""
    finishes: list[tuple[LockFinish, bool]] | None = op.recall(_LOCK_FINISH)
    if finishes is None:
        finishes = op.remember(_LOCK_FINISH, [])
    finishes.append((finish, in_thread))


def _lock_finish(op: ops.Lock) -> tuple[LockFinish | None, bool]:
    finishes: list[tuple[LockFinish, bool]] | None = op.recall(_LOCK_FINISH)
    if not finishes:
        return None, False

    def finish(error: int) -> int:
        for step, _ in reversed(finishes):
            error = step(error)
        return error
    return finish, any(in_thread for _, in_thread in finishes)


def _time_arg(valid: int, set_flag: int, now_flag: int, sec: int, nsec: int) -> tuple[int, int]:
    if valid & now_flag:
        return (0, linux.UTIME_NOW)
    if valid & set_flag:
        return (sec, nsec)
    return (0, linux.UTIME_OMIT)


def _writes_drop_privileges(fd: int, st: os.stat_result) -> bool:
    mode = st.st_mode
    if mode & stat.S_ISUID or (mode & stat.S_ISGID and mode & stat.S_IXGRP):
        return True
    if not mode & 0o111:
        return False
    try:
        os.getxattr(procfs.fd_path(fd), "security.capability")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _not_interruptible() -> Iterator[Callable[[], bool]]:
    yield lambda: False
