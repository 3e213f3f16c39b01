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

The bottom is one class made of parts: lower_base (the tables, the caller's identity, name resolution),
lower_files (opens, passthrough, reads, writes, locks) and this module (names, attributes, directories, the rest,
and the session's entry points into the stack).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable

from fsfilter._abi import fuse as abi
from fsfilter._abi import linux
from fsfilter._sessions.fuse_session import Handler
from fsfilter._sessions.layer import Layer, StackHooks
from fsfilter._sessions.lower_base import _OPENED, IoPolicy, LowerOptions, log
from fsfilter._sessions.lower_files import LowerFiles, add_lock_finish
from fsfilter._sessions.nodes import Inode, OpenDir
from fsfilter._system import libc, procfs
from fsfilter._wire import fuse as wire
from fsfilter._wire import ops
from fsfilter._wire.replies import (
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
    Statfs,
    xattr_reply,
)

__all__ = ["IoPolicy", "LowerFS", "LowerOptions", "add_lock_finish"]

# Listing offsets of virtual files: after the lower directory's names, in a range no lower directory gives in practice
# (tmpfs, xfs and btrfs count up from small numbers; ext4's hash cookies reach it only for the top 2**20 of 2**63
# values, its end-of-directory marker 2**63 - 1 lies above it) and below 2**63, so that telldir/seekdir work.
VIRTUAL_OFFSETS = (1 << 63) - (1 << 21)
VIRTUAL_LIMIT = 1 << 20  # virtual files listed per directory

_SETTLED = frozenset({"open", "create", "tmpfile", "opendir"})  # the stack's answer is settled by the bottom
_LOCK_OPS = frozenset({abi.Opcode.GETLK, abi.Opcode.SETLK, abi.Opcode.SETLKW})


class LowerFS(LowerFiles):
    """The bottom of a filter stack: every operation served on the directory ``root_fd`` refers to.

    ``hooks`` asks the layers above what the bottom cannot decide alone (see sessions/layer.py); ``handlers``
    builds the session's table, entering the stack at its top layer."""

    def handlers(self) -> dict[int, Handler]:
        """The session's table: each opcode served by the top of the stack; an open's I/O mode is settled once the
        whole stack answered. The table is the session's own dict, which ``set_top`` updates in place when layers
        join or leave, so that a request costs one call into the top layer's method and no lookup."""
        table: dict[int, Handler] = {}
        for opcode, spec in ops.OPS.items():
            if spec.method in _SETTLED:
                table[opcode] = self._settled(spec.method)
        self._tables.append(table)
        self._bind(table)
        return table

    def set_top(self, top: Layer, hooks: StackHooks) -> None:
        """The stack's new top and hooks (a layer joined or left): requests read from now on enter there."""
        self.hooks = hooks
        self.top = top
        for table in self._tables:
            self._bind(table)

    def _bind(self, table: dict[int, Handler]) -> None:
        top = self.top
        for opcode, spec in ops.OPS.items():
            if spec.method in _SETTLED or (opcode in _LOCK_OPS and not self.options.locks):
                continue  # the kernel keeps locks itself unless the daemon serves them
            table[opcode] = getattr(top, spec.method)  # one item at a time: each is atomic under the GIL

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

    def lookup(self, op: ops.Lookup) -> Reply:
        parent = self.inode(op.nodeid)
        try:
            fd = self._open_path(op, parent, op.name)
        except FileNotFoundError:
            virtual = self.virtual_at(parent, op.name)
            if virtual is not None:
                return self._virtual_entry(virtual, parent, op.name, op.pid)
            if self.options.negative_timeout > 0 and not self.virtuals:
                return Entry(0, None, self.options.negative_timeout, 0.0)
            raise
        return self._entry(fd, parent.nodeid, op.name, op.pid)

    def forget(self, op: ops.Forget) -> None:
        self.forget_one(op.nodeid, op.count)

    def batch_forget(self, op: ops.BatchForget) -> None:
        for nodeid, nlookup in op.items:
            self.forget_one(nodeid, nlookup)

    def getattr(self, op: ops.Getattr) -> Reply:
        node = self.inode(op.nodeid)
        f = self.files.get(op.fh) if op.fh is not None else None
        st = os.fstat(f.fd if f is not None else node.fd)
        return Attr(self.attributes(node.nodeid, st), self.attr_timeout(node))

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
            elif node.view is not None and node.view.transform is not None:
                self._truncate_transformed(node, op.size)
            else:
                os.truncate(procfs.fd_path(node.fd), op.size)
            if valid & abi.FATTR_KILL_SUIDGID:
                self.kill_privileges(f.fd if f is not None else node.fd)
        if valid & (abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW):
            libc.utimensat_fd(node.fd,
                              _time_arg(valid, abi.FATTR_ATIME, abi.FATTR_ATIME_NOW, op.atime, op.atime_ns),
                              _time_arg(valid, abi.FATTR_MTIME, abi.FATTR_MTIME_NOW, op.mtime, op.mtime_ns))
        return Attr(self.attributes(node.nodeid, os.fstat(node.fd)), self.attr_timeout(node))

    def _truncate_transformed(self, node: Inode, size: int) -> None:
        """truncate(2) by name of a transformed view: through its backend (the stored file's size is not the view's)."""
        assert node.view is not None
        fd = os.open(procfs.fd_path(node.fd), os.O_RDWR | os.O_CLOEXEC)
        try:
            backend = node.view.transform.backend(fd, os.O_RDWR)
            try:
                backend.truncate(size)
            finally:
                close = getattr(backend, "close", None)
                if close is not None:
                    close()
        finally:
            os.close(fd)

    def readlink(self, op: ops.Plain) -> Reply:
        return Data(libc.readlink_fd(self.inode(op.nodeid).fd))

    def _make(self, op: ops.Op, name: bytes, umask: int | None, make: Callable[[int, bytes], None]) -> Entry:
        parent = self.inode(op.nodeid)
        dfd, at, owned = self.locate(op, parent, name)
        try:
            switched = self._as_caller(op, umask)
            self.intend(op)
            try:
                make(dfd, at)
            except FileExistsError:
                if not self.may_be_done(op):
                    raise
                # Sent again after a predecessor died while making it (see may_be_done): it made it before it could
                # answer.
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
        self.intend(op)
        try:
            if self._is_root:
                libc.link_fd(node.fd, parent.fd, op.name)
            else:
                os.link(procfs.fd_path(node.fd), op.name, dst_dir_fd=parent.fd, follow_symlinks=True)
        except FileExistsError:
            if not self.may_be_done(op):
                raise
        fd = os.open(op.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        if self.may_be_done(op):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != node.key:
                os.close(fd)  # what is at the name is not the linked object: the link was never made
                raise FileExistsError(errno.EEXIST, "file exists")
        return self._entry(fd, parent.nodeid, op.name, op.pid)

    def unlink(self, op: ops.Remove) -> Reply:
        return self._remove(op, os.unlink)

    def rmdir(self, op: ops.Remove) -> Reply:
        if self.virtuals:
            dfd, at, owned = self.locate(op, self.inode(op.nodeid), op.name)
            try:
                st = os.stat(at, dir_fd=dfd, follow_symlinks=False)
            finally:
                if owned:
                    os.close(dfd)
            if any(key == (st.st_dev, st.st_ino) for key, _ in list(self.virtuals)):
                raise OSError(errno.ENOTEMPTY, "the directory holds virtual files")
        return self._remove(op, os.rmdir)

    def _remove(self, op: ops.Remove, remove: Callable[..., None]) -> Reply:
        dfd, at, owned = self.locate(op, self.inode(op.nodeid), op.name)
        self.intend(op)
        try:
            remove(at, dir_fd=dfd)
        except FileNotFoundError:
            if not self.may_be_done(op):
                raise  # (else: a predecessor removed the name before it could answer)
        finally:
            if owned:
                os.close(dfd)
        return EMPTY

    def rename(self, op: ops.Rename) -> Reply:
        src, dst = self.inode(op.nodeid), self.inode(op.new_dir)
        flags = op.flags
        if flags & ~(linux.RENAME_NOREPLACE | linux.RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        if self.virtuals and (self.virtual_at(src, op.name) or self.virtual_at(dst, op.new_name)):
            return self._rename_virtual(op, src, dst)
        self.intend(op)
        try:
            if flags:
                libc.renameat2(src.fd, op.name, dst.fd, op.new_name, flags)
            else:
                os.rename(op.name, op.new_name, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        except FileNotFoundError:
            # A predecessor renamed before it could answer (the new name is there).
            if not self.may_be_done(op) or not self._exists_at(dst.fd, op.new_name):
                raise
        self.moved(dst, op.new_name)
        if flags & linux.RENAME_EXCHANGE:
            self.moved(src, op.name)
        return EMPTY

    def moved(self, parent: Inode, name: bytes) -> None:
        """Keep the remembered name of a renamed object current (for path_of), its views' too."""
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except OSError:
            return
        key = (st.st_dev, st.st_ino)
        node = self.by_key.get(key)
        with self._lock:
            if node is not None:
                node.parent, node.name = parent.nodeid, name
                self.journal_node(node)
            for view in self.routes.get(key, ()):
                if view.node is not None:
                    view.node.parent, view.node.name = parent.nodeid, name

    def _rename_virtual(self, op: ops.Rename, src: Inode, dst: Inode) -> Reply:
        """A rename from or onto a virtual file's name: virtual files move between names; a real file is never
        replaced by a virtual one, nor a virtual one by a real one (EEXIST), nor are they exchanged (EINVAL)."""
        if op.flags & linux.RENAME_EXCHANGE:
            raise OSError(errno.EINVAL, "a virtual file cannot be exchanged")
        with self._lock:
            virtual = self.virtuals.get((src.key, op.name))
            if virtual is None or (dst.key, op.new_name) in self.virtuals and op.flags & linux.RENAME_NOREPLACE:
                raise OSError(errno.EEXIST if virtual is not None else errno.EXDEV,
                              "a virtual file's name is taken" if virtual is not None else
                              "a real file cannot replace a virtual one")
            if self._exists_at(dst.fd, op.new_name):
                raise FileExistsError(errno.EEXIST, "a real file has that name")
            replaced = self.virtuals.pop((dst.key, op.new_name), None)
            del self.virtuals[(src.key, op.name)]
            virtual.parent_key, virtual.name = dst.key, op.new_name
            self.virtuals[(dst.key, op.new_name)] = virtual
            if replaced is not None and replaced is not virtual:
                for view in replaced.views.values():
                    self._unroute(view)
            for view in virtual.views.values():
                if view.node is not None:
                    view.node.parent, view.node.name = dst.nodeid, op.new_name
        return EMPTY

    def opendir(self, op: ops.Open) -> Reply:
        node = self.inode(op.nodeid)
        fd = os.open(procfs.fd_path(node.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        record = OpenDir(fd, node.nodeid)
        with self._lock:
            fh = self.new_handle(fd)
            self.dirs[fh] = record
            if self.journal is not None:
                self.journal.opened(fh, node.nodeid, os.O_RDONLY | os.O_DIRECTORY, True)
        op.remember(_OPENED, (fh, record))
        return Opened(fh)

    def readdir(self, op: ops.Read) -> Reply:
        """READDIR and READDIRPLUS: the names that fit, each passed up through the layers (which may hide it or
        change it) before the next is taken, so that hidden names never end a listing early."""
        d = self.directory(op.fh)
        plus = op.plus
        out: list[DirEntry] = []
        used = 0
        parent = self.inode(op.nodeid)
        hooks = self.hooks
        routed = self._routed_names(parent) if plus and self.routes else ()
        with d.lock:
            if VIRTUAL_OFFSETS <= op.offset < VIRTUAL_OFFSETS + VIRTUAL_LIMIT:
                # the lower directory was listed whole: virtual names follow
                return self._list_virtuals(op, parent, op.offset - VIRTUAL_OFFSETS, out, used)
            if op.offset != d.pos:  # a seekdir/rewinddir, or a reply the kernel did not take whole
                os.lseek(d.fd, op.offset, os.SEEK_SET)
                d.pending = []
                d.pos = op.offset
            while True:
                if not d.pending:
                    d.pending = d.reader.read(d.fd)
                    if not d.pending:
                        if self.virtuals:
                            return self._list_virtuals(op, parent, 0, out, used)
                        break
                ino, next_off, dtype, name = d.pending[0]
                entry = DirEntry(name, ino, next_off, dtype)
                need = entry.size(plus)
                if used + need > op.size:
                    break
                d.pending.pop(0)
                d.pos = next_off
                nodeid = 0
                if plus and name not in (b".", b"..") and name not in routed:
                    # (a name whose node depends on who asks gets no entry: the kernel looks it up when used)
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

    def _routed_names(self, parent: Inode) -> set[bytes]:
        """The names in ``parent`` of the objects with views, as last seen."""
        names = set()
        for views in list(self.routes.values()):
            for view in views:
                node = view.node
                if node is not None and node.parent == parent.nodeid:
                    names.add(node.name)
        return names

    def _list_virtuals(self, op: ops.Read, parent: Inode, start: int, out: list[DirEntry], used: int) -> Reply:
        """The virtual files of a directory, after its lower names: offsets from VIRTUAL_OFFSETS up (no lower
        directory's offset reaches them), in a fixed order; a name a real file has now is left out."""
        listed = sorted((name, v.store) for (key, name), v in list(self.virtuals.items()) if key == parent.key)
        for index in range(start, min(len(listed), VIRTUAL_LIMIT)):
            name, store = listed[index]
            try:
                ino = os.fstat(store).st_ino
            except OSError:
                continue  # removed meanwhile
            entry = DirEntry(name, ino, VIRTUAL_OFFSETS + index + 1, stat.S_IFREG >> 12)
            need = entry.size(op.plus)
            if used + need > op.size:
                break
            if self._exists_at(parent.fd, name):
                continue
            kept: DirEntry | None = entry
            if self.hooks.lists:
                kept = self.hooks.listed(op, parent, entry)
            if kept is not None:
                out.append(kept)
                used += need
        return Listing(out, op.plus)

    def releasedir(self, op: ops.Release) -> Reply:
        self.release_dir(op.fh)
        return EMPTY

    def release_dir(self, fh: int) -> None:
        with self._lock:
            d = self.dirs.pop(fh, None)
            if d is not None and self.journal is not None:
                self.journal.closed(fh)
        if d is None:
            raise OSError(errno.EBADF, "unknown directory handle")
        os.close(d.fd)

    def fsyncdir(self, op: ops.Fsync) -> Reply:
        os.fsync(self.directory(op.fh).fd)
        return EMPTY

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
