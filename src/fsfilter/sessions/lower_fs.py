"""Serving FUSE requests on a lower directory: the inode and handle tables, passthrough backing ids.

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
from typing import Any

from fsfilter.abi import fuse as abi
from fsfilter.abi import linux
from fsfilter.sessions.fuse_session import Deferred
from fsfilter.sessions.locks import F_RDLCK, F_UNLCK, F_WRLCK, LockTable
from fsfilter.system import fuse_device, libc
from fsfilter.wire import fuse as wire
from fsfilter.wire.fuse import Request, WireError

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


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


class Inode:
    __slots__ = ("nodeid", "fd", "key", "nlookup", "parent", "name", "backing_id", "backing_refs", "daemon_opens",
                 "cache_sig")

    def __init__(self, nodeid: int, fd: int, key: tuple[int, int], parent: int, name: bytes) -> None:
        self.nodeid = nodeid
        self.fd = fd  # O_PATH
        self.key = key
        self.nlookup = 0
        self.parent = parent
        self.name = name
        self.backing_id = 0
        self.backing_refs = 0  # passthrough opens
        self.daemon_opens = 0  # opens whose I/O the daemon serves
        self.cache_sig: tuple[int, int] | None = None  # (mtime_ns, size) when the page cache was last filled


class OpenFile:
    __slots__ = ("fd", "inode", "passthrough")

    def __init__(self, fd: int, inode: Inode, passthrough: bool) -> None:
        self.fd = fd
        self.inode = inode
        self.passthrough = passthrough


class OpenDir:
    __slots__ = ("fd", "pos", "pending", "lock", "reader")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0  # the offset the next entry in ``pending`` starts at
        self.pending: list[tuple[int, int, int, bytes]] = []
        self.lock = threading.Lock()
        self.reader = libc.DirentReader(32768)


@dataclass
class LowerOptions:
    entry_timeout: float = 60.0
    attr_timeout: float = 60.0
    negative_timeout: float = 10.0
    io_policy: IoPolicy | None = None
    locks: bool = False  # the daemon serves fcntl/flock locks (the session asks for them at INIT)


@dataclass
class LockRequest:
    """A GETLK/SETLK/SETLKW request: range [start, end] (end inclusive), kind F_RDLCK/F_WRLCK/F_UNLCK."""

    fh: int
    owner: int
    start: int
    end: int
    kind: int
    pid: int
    flock: bool

    @classmethod
    def decode(cls, req: Request) -> LockRequest:
        fh, owner, start, end, kind, pid, lk_flags, _ = wire.fixed(req.body, abi.LK_IN)
        return cls(fh, owner, start, end, kind, pid, bool(lk_flags & abi.FUSE_LK_FLOCK))


# Decides what the caller of a lock request gets: called with the outcome (0 or an errno), returns the errno
# to answer (0: success).
LockFinish = Callable[[int], int]


class LowerFS:
    """Request handlers for a pass-through of the directory ``root_fd`` refers to."""

    def __init__(self, root_fd: int, options: LowerOptions) -> None:
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
        self._lock = threading.Lock()
        self._is_root = os.geteuid() == 0
        self.session_fd = -1  # set when the session exists: needed for backing ids
        self.defer: Callable[[Request], Deferred] | None = None  # the session's, for lock waits
        # The session's, around waits for an application's handler (see Session.interruptible).
        self.interruptible: Callable[[], contextlib.AbstractContextManager[Callable[[], bool]]] = _not_interruptible
        self.locks = LockTable()
        self.passthrough = False  # set from the INIT negotiation; cleared if the kernel refuses backing ids

    # -- tables

    def handlers(self) -> dict[int, Callable[[Request], bytes | None]]:
        op = abi.Opcode
        table: dict[int, Callable[[Request], bytes | None]] = {
            op.LOOKUP: self.lookup, op.FORGET: self.forget, op.BATCH_FORGET: self.batch_forget,
            op.GETATTR: self.getattr, op.SETATTR: self.setattr, op.READLINK: self.readlink,
            op.SYMLINK: self.symlink, op.MKNOD: self.mknod, op.MKDIR: self.mkdir, op.UNLINK: self.unlink,
            op.RMDIR: self.rmdir, op.RENAME: self.rename, op.RENAME2: self.rename2, op.LINK: self.link,
            op.OPEN: self.open, op.CREATE: self.create, op.TMPFILE: self.tmpfile, op.READ: self.read,
            op.WRITE: self.write, op.FLUSH: self.flush, op.RELEASE: self.release, op.FSYNC: self.fsync,
            op.OPENDIR: self.opendir, op.READDIR: self.readdir, op.READDIRPLUS: self.readdirplus,
            op.RELEASEDIR: self.releasedir, op.FSYNCDIR: self.fsyncdir, op.STATFS: self.statfs,
            op.ACCESS: self.access, op.SETXATTR: self.setxattr, op.GETXATTR: self.getxattr,
            op.LISTXATTR: self.listxattr, op.REMOVEXATTR: self.removexattr, op.FALLOCATE: self.fallocate,
            op.LSEEK: self.lseek, op.COPY_FILE_RANGE: self.copy_file_range, op.IOCTL: self.ioctl,
            op.SYNCFS: self.syncfs, op.DESTROY: self.destroy,
        }
        if self.options.locks:
            table.update({op.GETLK: self.getlk, op.SETLK: self.setlk, op.SETLKW: self.setlkw})
        return table

    def inode(self, nodeid: int) -> Inode:
        node = self.nodes.get(nodeid)
        if node is None:
            raise OSError(errno.ESTALE, "unknown node id")
        return node

    def _file(self, fh: int) -> OpenFile:
        f = self.files.get(fh)
        if f is None:
            raise OSError(errno.EBADF, "unknown file handle")
        return f

    def _dir(self, fh: int) -> OpenDir:
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
        return node

    def _entry(self, fd: int, parent: int, name: bytes) -> bytes:
        """Reply with the entry of a freshly opened O_PATH fd, which the tables then own."""
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        node = self._remember(fd, st, parent, name)
        return wire.encode_entry(node.nodeid, self.shown(node.nodeid, st), self.options.entry_timeout,
                                 self.options.attr_timeout)

    def where(self, req: Request | None, parent: Inode, name: bytes) -> tuple[int, bytes, bool]:
        """The directory fd and name that a request naming ``name`` in ``parent`` acts on, and whether the
        caller must close that fd. Here the name itself; a subclass may redirect it (reparse rules)."""
        return parent.fd, name, False

    def _open_path(self, req: Request | None, parent: Inode, name: bytes) -> int:
        """An O_PATH fd of the object ``name`` in ``parent`` resolves to."""
        dfd, at, owned = self.where(req, parent, name)
        try:
            return os.open(at, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            if owned:
                os.close(dfd)

    def _lookup_child(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """Like LOOKUP, for READDIRPLUS."""
        fd = self._open_path(None, parent, name)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._remember(fd, st, parent.nodeid, name), st

    def shown(self, nodeid: int, st: os.stat_result) -> Any:
        """The attributes replies show for node ``nodeid`` (a subclass may change them)."""
        return st

    def hides(self, parent: Inode, name: bytes) -> bool:
        """Whether a listing leaves this name out (for subclasses; LOOKUP must then refuse it too)."""
        return False

    def _forget_one(self, nodeid: int, count: int) -> None:
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
        self.node_dropped(nodeid)

    def node_dropped(self, nodeid: int) -> None:
        """Hook: the kernel forgot the node and its id is gone (subclasses drop what they keep per node)."""

    # -- identity of the caller, for objects we create

    def _as_caller(self, req: Request, umask: int | None) -> bool:
        if umask is not None:
            os.umask(umask)  # per thread: readers unshare CLONE_FS
        if not self._is_root or (req.uid == 0 and req.gid == 0):
            return False
        group = wire.supplementary_group(req.ext)
        libc.setgroups_thread([group] if group is not None else [])
        libc.setfsgid(req.gid)
        libc.setfsuid(req.uid)
        return True

    @staticmethod
    def _restore_identity(switched: bool) -> None:
        if switched:
            libc.setfsuid(0)
            libc.setfsgid(0)
            libc.setgroups_thread([])

    # -- names

    def lookup(self, req: Request) -> bytes:
        parent = self.inode(req.nodeid)
        name, _ = wire.name_at(req.body)
        try:
            fd = self._open_path(req, parent, name)
        except FileNotFoundError:
            if self.options.negative_timeout > 0:
                return wire.encode_negative_entry(self.options.negative_timeout)
            raise
        return self._entry(fd, parent.nodeid, name)

    def forget(self, req: Request) -> None:
        (count,) = wire.fixed(req.body, abi.FORGET_IN)
        self._forget_one(req.nodeid, count)

    def batch_forget(self, req: Request) -> None:
        count, _ = wire.fixed(req.body, abi.BATCH_FORGET_IN)
        pos = abi.BATCH_FORGET_IN.size
        for _ in range(count):
            nodeid, nlookup = wire.fixed(req.body, abi.FORGET_ONE, pos)
            self._forget_one(nodeid, nlookup)
            pos += abi.FORGET_ONE.size

    def getattr(self, req: Request) -> bytes:
        flags, _, fh = wire.fixed(req.body, abi.GETATTR_IN)
        node = self.inode(req.nodeid)
        f = self.files.get(fh) if flags & abi.FUSE_GETATTR_FH else None
        st = os.fstat(f.fd if f is not None else node.fd)
        return wire.encode_attr_out(self.shown(node.nodeid, st), self.options.attr_timeout)

    def setattr(self, req: Request) -> bytes:
        (valid, _, fh, size, _owner, atime, mtime, _ctime, atime_ns, mtime_ns, _ctime_ns, mode, _, uid, gid,
         _) = wire.fixed(req.body, abi.SETATTR_IN)
        node = self.inode(req.nodeid)
        f = self.files.get(fh) if valid & abi.FATTR_FH else None
        if not valid & ~(abi.FATTR_FH | abi.FATTR_LOCKOWNER):
            # No attribute at all: a chown(-1, -1), or a change by a caller without CAP_FSETID that must drop
            # set-id bits (HANDLE_KILLPRIV_V2 leaves that to us). A chown that changes nothing, as the caller,
            # drops exactly what the caller's would natively (and updates ctime).
            switched = self._as_caller(req, None)
            try:
                libc.fchown_fd(node.fd, -1, -1)
            finally:
                self._restore_identity(switched)
        if valid & abi.FATTR_MODE:
            if f is not None:
                os.fchmod(f.fd, stat.S_IMODE(mode))
            else:
                if stat.S_ISLNK(os.fstat(node.fd).st_mode):
                    raise OSError(errno.EOPNOTSUPP, "symlinks have no mode")
                os.chmod(_proc(node.fd), stat.S_IMODE(mode))
        if valid & (abi.FATTR_UID | abi.FATTR_GID):
            libc.fchown_fd(node.fd, uid if valid & abi.FATTR_UID else -1, gid if valid & abi.FATTR_GID else -1)
        if valid & abi.FATTR_SIZE:
            if f is not None:
                os.ftruncate(f.fd, size)
            else:
                os.truncate(_proc(node.fd), size)
            if valid & abi.FATTR_KILL_SUIDGID:
                self._kill_privileges(f.fd if f is not None else node.fd)
        if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW):
            libc.utimensat_fd(node.fd, _time_arg(valid, abi.FATTR_ATIME, abi.FATTR_ATIME_NOW, atime, atime_ns),
                              _time_arg(valid, abi.FATTR_MTIME, abi.FATTR_MTIME_NOW, mtime, mtime_ns))
        return wire.encode_attr_out(self.shown(node.nodeid, os.fstat(node.fd)), self.options.attr_timeout)

    def readlink(self, req: Request) -> bytes:
        return libc.readlink_fd(self.inode(req.nodeid).fd)

    def _make(self, req: Request, name: bytes, umask: int | None, make: Callable[[int, bytes], None]) -> bytes:
        parent = self.inode(req.nodeid)
        dfd, at, owned = self.where(req, parent, name)
        try:
            switched = self._as_caller(req, umask)
            try:
                make(dfd, at)
            finally:
                self._restore_identity(switched)
            fd = os.open(at, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            if owned:
                os.close(dfd)
        return self._entry(fd, parent.nodeid, name)

    def mknod(self, req: Request) -> bytes:
        mode, rdev, umask, _ = wire.fixed(req.body, abi.MKNOD_IN)
        name, _ = wire.name_at(req.body, abi.MKNOD_IN.size)
        dev = wire.decode_rdev(rdev)
        return self._make(req, name, umask, lambda dfd, at: os.mknod(at, mode, dev, dir_fd=dfd))

    def mkdir(self, req: Request) -> bytes:
        mode, umask = wire.fixed(req.body, abi.MKDIR_IN)
        name, _ = wire.name_at(req.body, abi.MKDIR_IN.size)
        return self._make(req, name, umask, lambda dfd, at: os.mkdir(at, mode, dir_fd=dfd))

    def symlink(self, req: Request) -> bytes:
        name, pos = wire.name_at(req.body)
        target, _ = wire.cstring(req.body, pos)
        return self._make(req, name, None, lambda dfd, at: os.symlink(target, at, dir_fd=dfd))

    def link(self, req: Request) -> bytes:
        (old,) = wire.fixed(req.body, abi.LINK_IN)
        name, _ = wire.name_at(req.body, abi.LINK_IN.size)
        node = self.inode(old)
        parent = self.inode(req.nodeid)
        if self._is_root:
            libc.link_fd(node.fd, parent.fd, name)
        else:
            os.link(_proc(node.fd), name, dst_dir_fd=parent.fd, follow_symlinks=True)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        return self._entry(fd, parent.nodeid, name)

    def unlink(self, req: Request) -> bytes:
        name, _ = wire.name_at(req.body)
        dfd, at, owned = self.where(req, self.inode(req.nodeid), name)
        try:
            os.unlink(at, dir_fd=dfd)
        finally:
            if owned:
                os.close(dfd)
        return b""

    def rmdir(self, req: Request) -> bytes:
        name, _ = wire.name_at(req.body)
        dfd, at, owned = self.where(req, self.inode(req.nodeid), name)
        try:
            os.rmdir(at, dir_fd=dfd)
        finally:
            if owned:
                os.close(dfd)
        return b""

    def _rename(self, req: Request, newdir: int, flags: int, offset: int) -> bytes:
        old, pos = wire.name_at(req.body, offset)
        new, _ = wire.name_at(req.body, pos)
        src, dst = self.inode(req.nodeid), self.inode(newdir)
        if flags & ~(linux.RENAME_NOREPLACE | linux.RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        if flags:
            libc.renameat2(src.fd, old, dst.fd, new, flags)
        else:
            os.rename(old, new, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        self._moved(dst, new)
        if flags & linux.RENAME_EXCHANGE:
            self._moved(src, old)
        return b""

    def _moved(self, parent: Inode, name: bytes) -> None:
        """Keep the remembered name of a renamed object current (for path_of)."""
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except OSError:
            return
        node = self.by_key.get((st.st_dev, st.st_ino))
        if node is not None:
            node.parent, node.name = parent.nodeid, name

    def rename(self, req: Request) -> bytes:
        (newdir,) = wire.fixed(req.body, abi.RENAME_IN)
        return self._rename(req, newdir, 0, abi.RENAME_IN.size)

    def rename2(self, req: Request) -> bytes:
        newdir, flags, _ = wire.fixed(req.body, abi.RENAME2_IN)
        return self._rename(req, newdir, flags, abi.RENAME2_IN.size)

    # -- files

    def _wants_daemon(self, node: Inode, st: os.stat_result) -> bool:
        """Whether this file's reads and writes must go through the daemon rather than kernel passthrough."""
        if not self.passthrough or not stat.S_ISREG(st.st_mode):
            return True
        if _writes_drop_privileges(node.fd, st):
            # A passthrough write runs with the daemon's credentials and so would keep set-id bits and
            # capabilities that the caller's write must clear; the daemon clears them itself.
            return True
        policy = self.options.io_policy
        return policy is not None and policy(self.path_of(node.nodeid))

    def _open_reply(self, fd: int, node: Inode, st: os.stat_result) -> bytes:
        """Register an open lower fd and pick passthrough or the daemon for its I/O."""
        with self._lock:
            if node.backing_refs:
                daemon = False
            elif node.daemon_opens:
                daemon = True
            else:
                daemon = self._wants_daemon(node, st)
            if not daemon and not node.backing_refs:
                try:
                    node.backing_id = fuse_device.backing_open(self.session_fd, fd)
                except OSError as exc:
                    log.warning("kernel passthrough refused (%s); the daemon serves all reads and writes", exc)
                    self.passthrough = False
                    daemon = True
            if daemon:
                node.daemon_opens += 1
                sig = (st.st_mtime_ns, st.st_size)
                flags = abi.OpenReplyFlag.NOFLUSH
                if node.cache_sig == sig:
                    flags |= abi.OpenReplyFlag.KEEP_CACHE
                node.cache_sig = sig
                self.files[fd] = OpenFile(fd, node, False)
                return wire.encode_open_out(fd, self._reply_flags(node, int(flags), False))
            node.backing_refs += 1
            self.files[fd] = OpenFile(fd, node, True)
            flags = abi.OpenReplyFlag.NOFLUSH | abi.OpenReplyFlag.PASSTHROUGH
            return wire.encode_open_out(fd, self._reply_flags(node, int(flags), True), node.backing_id)

    def _reply_flags(self, node: Inode, flags: int, passthrough: bool) -> int:
        flags = self.open_reply_flags(node, flags, passthrough)
        if self.options.locks:
            # close(2) drops the caller's POSIX locks; the kernel tells the daemon so only with a FLUSH.
            flags &= ~abi.OpenReplyFlag.NOFLUSH
        return flags

    def open_reply_flags(self, node: Inode, flags: int, passthrough: bool) -> int:
        """The FOPEN_* flags of an open's reply (for subclasses: e.g. direct I/O, or FLUSH wanted)."""
        return flags

    def open(self, req: Request) -> bytes:
        flags, open_flags = wire.fixed(req.body, abi.OPEN_IN)
        flags = wire.open_flags(flags)
        node = self.inode(req.nodeid)
        st = os.fstat(node.fd)
        fd = os.open(_proc(node.fd), (flags & ~_LOWER_STRIP) | os.O_CLOEXEC)
        try:
            if flags & os.O_TRUNC and open_flags & abi.FUSE_OPEN_KILL_SUIDGID:
                self._kill_privileges(fd)
            if flags & os.O_TRUNC:
                st = os.fstat(fd)
            return self._open_reply(fd, node, st)
        except BaseException:
            self.files.pop(fd, None)
            os.close(fd)
            raise

    def _created(self, fd: int, parent: Inode, name: bytes) -> bytes:
        """Reply to CREATE/TMPFILE: the new object's entry, then its open."""
        try:
            path_fd = os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC)
            st = os.fstat(path_fd)
            node = self._remember(path_fd, st, parent.nodeid, name)
            entry = wire.encode_entry(node.nodeid, st, self.options.entry_timeout, self.options.attr_timeout)
            return entry + self._open_reply(fd, node, st)
        except BaseException:
            os.close(fd)
            raise

    def create(self, req: Request) -> bytes:
        flags, mode, umask, _ = wire.fixed(req.body, abi.CREATE_IN)
        flags = wire.open_flags(flags)
        name, _ = wire.name_at(req.body, abi.CREATE_IN.size)
        parent = self.inode(req.nodeid)
        lower = (flags & ~_LOWER_STRIP) | (flags & (os.O_EXCL | os.O_NOFOLLOW)) | os.O_CREAT | os.O_CLOEXEC
        dfd, at, owned = self.where(req, parent, name)
        try:
            switched = self._as_caller(req, umask)
            try:
                fd = os.open(at, lower, mode & 0o7777, dir_fd=dfd)  # permission bits only: a top bit overflows C int
            finally:
                self._restore_identity(switched)
        finally:
            if owned:
                os.close(dfd)
        return self._created(fd, parent, name)

    def tmpfile(self, req: Request) -> bytes:
        flags, mode, umask, _ = wire.fixed(req.body, abi.CREATE_IN)
        flags = wire.open_flags(flags)
        parent = self.inode(req.nodeid)
        switched = self._as_caller(req, umask)
        try:
            fd = os.open(_proc(parent.fd), (flags & ~_LOWER_STRIP) | os.O_CLOEXEC, mode & 0o7777)
        finally:
            self._restore_identity(switched)
        return self._created(fd, parent, b"")

    def read(self, req: Request) -> bytes:
        fh, offset, size, *_ = wire.fixed(req.body, abi.READ_IN)
        return os.pread(self._file(fh).fd, size, offset)

    def write(self, req: Request) -> bytes:
        fh, offset, size, write_flags, *_ = wire.fixed(req.body, abi.WRITE_IN)
        data = req.body[abi.WRITE_IN.size:abi.WRITE_IN.size + size]
        if len(data) != size:
            raise WireError(errno.EINVAL, "write data shorter than its size")
        f = self._file(fh)
        written = os.pwrite(f.fd, data, offset)
        if write_flags & abi.FUSE_WRITE_KILL_SUIDGID:
            self._kill_privileges(f.fd)
        return wire.encode_write_out(written)

    def flush(self, req: Request) -> bytes:
        fh, _, _, owner = wire.fixed(req.body, abi.FLUSH_IN)
        f = self._file(fh)
        if self.options.locks:
            self.locks.release_owner(f.inode.nodeid, owner)
        return b""

    def release(self, req: Request) -> bytes:
        self.release_file(wire.fixed(req.body, abi.RELEASE_IN)[0])
        return b""

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
            else:
                node.daemon_opens -= 1
        if self.options.locks:
            self.locks.release_fh(node.nodeid, fh)  # flock and OFD locks belong to the open file
        os.close(fh)

    # -- locks (only with LowerOptions.locks; otherwise the kernel keeps them on its own inodes)

    def getlk(self, req: Request) -> bytes:
        lk = LockRequest.decode(req)
        node = self._file(lk.fh).inode
        found = self.locks.test(node.nodeid, lk.owner, lk.start, lk.end, lk.kind == F_WRLCK, lk.flock)
        if found is None:
            return abi.LK_OUT.pack(lk.start, lk.end, F_UNLCK, 0)
        return abi.LK_OUT.pack(found.start, found.end, F_WRLCK if found.exclusive else F_RDLCK, found.pid)

    def setlk(self, req: Request) -> bytes | None:
        return self.lock(req, LockRequest.decode(req), False)

    def setlkw(self, req: Request) -> bytes | None:
        return self.lock(req, LockRequest.decode(req), True)

    def lock(self, req: Request, lk: LockRequest, wait: bool, finish: LockFinish | None = None,
             finish_in_thread: bool = False) -> bytes | None:
        """Take or release a lock. A lock that must wait is answered later (returns None): when a release
        grants it, or with EINTR when the caller is interrupted. ``finish`` sees the outcome and says what the
        caller gets; when it turns a granted lock into a failure, the lock is let go again. With
        ``finish_in_thread`` a late outcome is finished on a thread of its own (``finish`` may block), not on
        the thread of the request whose release granted it."""
        node = self._file(lk.fh).inode
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
            deferred = self.defer(req)
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

        result = self.locks.set(node.nodeid, lk.owner, lk.start, lk.end, lk.kind, lk.pid, lk.fh, flock=lk.flock,
                                key=req.unique, granted=granted if wait else None)
        if result is None:
            assert deferred is not None
            if not deferred.on_interrupt(lambda: self.locks.cancel(req.unique)) and self.locks.cancel(req.unique):
                raise OSError(errno.EINTR, "interrupted")  # the interrupt came before the canceller was set
            return None
        final = settle(result)
        if final:
            raise OSError(final, os.strerror(final))
        return b""

    def fsync(self, req: Request) -> bytes:
        fh, flags, _ = wire.fixed(req.body, abi.FSYNC_IN)
        fd = self._file(fh).fd
        if flags & abi.FUSE_FSYNC_FDATASYNC:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
        return b""

    def _kill_privileges(self, fd: int) -> None:
        """What a write, truncate or chown by an unprivileged caller does to set-id bits and capabilities."""
        st = os.fstat(fd)
        mode = st.st_mode
        kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if mode & kill:
            os.chmod(_proc(fd), stat.S_IMODE(mode) & ~kill)
        if mode & 0o111:
            try:
                os.removexattr(_proc(fd), "security.capability")
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise

    # -- directories

    def opendir(self, req: Request) -> bytes:
        node = self.inode(req.nodeid)
        fd = os.open(_proc(node.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dirs[fd] = OpenDir(fd)
        return wire.encode_open_out(fd, 0)

    def _listing(self, req: Request, plus: bool) -> bytes:
        fh, offset, size, *_ = wire.fixed(req.body, abi.READ_IN)
        d = self._dir(fh)
        out: list[bytes] = []
        used = 0
        parent = self.inode(req.nodeid)
        with d.lock:
            if offset != d.pos:  # a seekdir/rewinddir, or a reply the kernel did not take whole
                os.lseek(d.fd, offset, os.SEEK_SET)
                d.pending = []
                d.pos = offset
            while True:
                if not d.pending:
                    d.pending = d.reader.read(d.fd)
                    if not d.pending:
                        break
                ino, next_off, dtype, name = d.pending[0]
                if self.hides(parent, name):
                    d.pending.pop(0)
                    d.pos = next_off
                    continue
                need = wire.dirent_size(name) + (abi.ENTRY_OUT_SIZE if plus else 0)
                if used + need > size:
                    break
                d.pending.pop(0)
                d.pos = next_off
                record = self.dir_record(req, fh, parent, name, ino, next_off, dtype, plus)
                if record is None:
                    continue
                out.append(record)
                used += need
        return b"".join(out)

    def dir_record(self, req: Request, fh: int, parent: Inode, name: bytes, ino: int, next_off: int, dtype: int,
                   plus: bool) -> bytes | None:
        """The record of one listed name (None leaves it out; the caller checks it fits)."""
        if not plus:
            return wire.encode_dirent(ino, next_off, dtype, name)
        if name in (b".", b".."):
            return bytes(abi.ENTRY_OUT_SIZE) + wire.encode_dirent(ino, next_off, dtype, name)
        try:
            node, st = self._lookup_child(parent, name)
        except FileNotFoundError:
            return None  # gone since it was listed
        entry = wire.encode_entry(node.nodeid, self.shown(node.nodeid, st), self.options.entry_timeout,
                                  self.options.attr_timeout)
        return entry + wire.encode_dirent(st.st_ino, next_off, dtype, name)

    def readdir(self, req: Request) -> bytes:
        return self._listing(req, False)

    def readdirplus(self, req: Request) -> bytes:
        return self._listing(req, True)

    def releasedir(self, req: Request) -> bytes:
        self.release_dir(wire.fixed(req.body, abi.RELEASE_IN)[0])
        return b""

    def release_dir(self, fh: int) -> None:
        d = self.dirs.pop(fh, None)
        if d is None:
            raise OSError(errno.EBADF, "unknown directory handle")
        os.close(d.fd)

    def fsyncdir(self, req: Request) -> bytes:
        fh, _, _ = wire.fixed(req.body, abi.FSYNC_IN)
        os.fsync(self._dir(fh).fd)
        return b""

    # -- the rest

    def statfs(self, req: Request) -> bytes:
        return wire.encode_statfs(os.fstatvfs(self.inode(req.nodeid).fd))

    def access(self, req: Request) -> bytes:
        (mask, _) = wire.fixed(req.body, abi.ACCESS_IN)
        node = self.inode(req.nodeid)
        switched = self._as_caller(req, None)
        try:
            ok = os.access(_proc(node.fd), mask, effective_ids=True)
        finally:
            self._restore_identity(switched)
        if not ok:
            raise OSError(errno.EACCES, "access denied")
        return b""

    def setxattr(self, req: Request) -> bytes:
        size, flags, xflags, _ = wire.fixed(req.body, abi.SETXATTR_IN)
        name, pos = wire.cstring(req.body, abi.SETXATTR_IN.size)
        value = bytes(req.body[pos:pos + size])
        if len(value) != size:
            raise WireError(errno.EINVAL, "xattr value shorter than its size")
        node = self.inode(req.nodeid)
        os.setxattr(_proc(node.fd), name, value, flags)
        if xflags & abi.FUSE_SETXATTR_ACL_KILL_SGID:
            mode = os.fstat(node.fd).st_mode
            os.chmod(_proc(node.fd), stat.S_IMODE(mode) & ~stat.S_ISGID)
        return b""

    def getxattr(self, req: Request) -> bytes:
        size, _ = wire.fixed(req.body, abi.GETXATTR_IN)
        return _sized(self.xattr_value(req), size)

    def xattr_value(self, req: Request) -> bytes:
        """The whole value a GETXATTR asks for (the reply is cut to the caller's size from it)."""
        name, _ = wire.cstring(req.body, abi.GETXATTR_IN.size)
        return os.getxattr(_proc(self.inode(req.nodeid).fd), name)

    def listxattr(self, req: Request) -> bytes:
        size, _ = wire.fixed(req.body, abi.GETXATTR_IN)
        return _sized(self.xattr_names(req), size)

    def xattr_names(self, req: Request) -> bytes:
        """The NUL-terminated names a LISTXATTR lists."""
        names = os.listxattr(_proc(self.inode(req.nodeid).fd))
        if req.uid != 0:
            # Listed natively only to callers with CAP_SYS_ADMIN (we list as root): uid 0 stands for that.
            names = [n for n in names if not n.startswith("trusted.")]
        return b"".join(os.fsencode(n) + b"\0" for n in names)

    def removexattr(self, req: Request) -> bytes:
        name, _ = wire.cstring(req.body)
        os.removexattr(_proc(self.inode(req.nodeid).fd), name)
        return b""

    def fallocate(self, req: Request) -> bytes:
        fh, offset, length, mode, _ = wire.fixed(req.body, abi.FALLOCATE_IN)
        libc.fallocate(self._file(fh).fd, mode, offset, length)
        return b""

    def lseek(self, req: Request) -> bytes:
        fh, offset, whence, _ = wire.fixed(req.body, abi.LSEEK_IN)
        return abi.LSEEK_OUT.pack(os.lseek(self._file(fh).fd, offset, whence))

    def copy_file_range(self, req: Request) -> bytes:
        fh_in, off_in, _node_out, fh_out, off_out, length, flags = wire.fixed(req.body, abi.COPY_FILE_RANGE_IN)
        if flags:
            raise OSError(errno.EINVAL, "copy_file_range flags must be 0")
        n = os.copy_file_range(self._file(fh_in).fd, self._file(fh_out).fd, min(length, 1 << 30), off_in, off_out)
        return wire.encode_write_out(n)

    def ioctl(self, req: Request) -> bytes:
        fh, flags, cmd, _arg, in_size, out_size = wire.fixed(req.body, abi.IOCTL_IN)
        if flags & abi.FUSE_IOCTL_COMPAT:
            raise OSError(errno.ENOSYS, "32-bit ioctls are not served")
        f = self.files.get(fh)
        fd = f.fd if f is not None else self._dir(fh).fd
        if cmd == linux.FS_IOC_GETFLAGS:
            buf = bytearray(max(out_size, 8))
            fcntl.ioctl(fd, cmd, buf, True)
            return abi.IOCTL_OUT.pack(0, 0, 0, 0) + bytes(buf[:out_size])
        if cmd == linux.FS_IOC_SETFLAGS:
            data = bytes(req.body[abi.IOCTL_IN.size:abi.IOCTL_IN.size + in_size]).ljust(8, b"\0")
            fcntl.ioctl(fd, cmd, data)
            return abi.IOCTL_OUT.pack(0, 0, 0, 0)
        raise OSError(errno.ENOTTY, "ioctl not served")

    def syncfs(self, req: Request) -> bytes:
        fd = os.open(_proc(self.root.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            libc.syncfs(fd)
        finally:
            os.close(fd)
        return b""

    def destroy(self, req: Request) -> bytes:
        return b""

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


def _time_arg(valid: int, set_flag: int, now_flag: int, sec: int, nsec: int) -> tuple[int, int]:
    if valid & now_flag:
        return (0, linux.UTIME_NOW)
    if valid & set_flag:
        return (sec, nsec)
    return (0, linux.UTIME_OMIT)


def _sized(value: bytes, size: int) -> bytes:
    """The reply to a size probe (size 0) or to a read of an xattr value or list."""
    if size == 0:
        return abi.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    return value


def _writes_drop_privileges(fd: int, st: os.stat_result) -> bool:
    mode = st.st_mode
    if mode & stat.S_ISUID or (mode & stat.S_ISGID and mode & stat.S_IXGRP):
        return True
    if not mode & 0o111:
        return False
    try:
        os.getxattr(_proc(fd), "security.capability")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _not_interruptible() -> Iterator[Callable[[], bool]]:
    yield lambda: False
