"""The bottom layer's operations on open files: opens and creates, when kernel passthrough is granted, reads,
writes, locks, sync and allocation (see lower_fs.py)."""

from __future__ import annotations

import errno
import os
import stat
import threading

from fsfilter._abi import fuse as abi
from fsfilter._sessions.fuse_session import Deferred
from fsfilter._sessions.locks import F_RDLCK, F_UNLCK, F_WRLCK
from fsfilter._sessions.lower_base import _LOWER_STRIP, _OPENED, LockFinish, LowerBase, log
from fsfilter._sessions.nodes import Inode, LowerFile, OpenFile
from fsfilter._system import fuse_device, procfs
from fsfilter._wire import ops
from fsfilter._wire.replies import (
    EMPTY,
    Created,
    Data,
    Entry,
    LockOut,
    Offset,
    Opened,
    Reply,
    Written,
)


class LowerFiles(LowerBase):
    """Open files, their I/O mode and their locks."""

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
                self._journal_mode(opened.fh, f)
                flags = opened.flags | abi.OpenReplyFlag.NOFLUSH
                sig = (f.st.st_mtime_ns, f.st.st_size)
                if node.cache_sig == sig:
                    flags |= abi.OpenReplyFlag.KEEP_CACHE
                node.cache_sig = sig
                opened.flags = self._reply_flags(node, int(flags), False)
                return
            node.backing_refs += 1
            f.passthrough = True
            self._journal_mode(opened.fh, f)
            flags = opened.flags | abi.OpenReplyFlag.NOFLUSH | abi.OpenReplyFlag.PASSTHROUGH
            opened.flags = self._reply_flags(node, int(flags), True)
            opened.backing_id = node.backing_id

    def _journal_mode(self, fh: int, f: OpenFile) -> None:
        if self.journal is not None and f.inode.view is None:
            self.journal_node(f.inode)
            self.journal.opened(fh, f.inode.nodeid, f.flags, False, f.passthrough)

    def _reply_flags(self, node: Inode, flags: int, passthrough: bool) -> int:
        flags = self.hooks.open_reply_flags(node, flags, passthrough)
        if self.options.locks:
            # close(2) drops the caller's POSIX locks; the kernel tells the daemon so only with a FLUSH.
            flags &= ~abi.OpenReplyFlag.NOFLUSH
        return flags

    def _registered(self, op: ops.Op, fd: int, node: Inode, st: os.stat_result, flags: int) -> Opened:
        record = OpenFile(fd, node, st, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
        with self._lock:
            fh = self.new_handle(fd)
            self.files[fh] = record  # journaled once its I/O mode is settled (settle_open)
        op.remember(_OPENED, (fh, record))
        return Opened(fh)

    def open(self, op: ops.Open) -> Reply:
        node = self.inode(op.nodeid)
        if node.view is not None and node.view.transform is not None:
            return self._open_transformed(op, node)
        st = os.fstat(node.fd)
        flags = (op.flags & ~_LOWER_STRIP) | os.O_CLOEXEC
        fd = os.open(procfs.fd_path(node.fd), flags)
        try:
            if op.flags & os.O_TRUNC and op.open_flags & abi.FUSE_OPEN_KILL_SUIDGID:
                self.kill_privileges(fd)
            if op.flags & os.O_TRUNC:
                st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._registered(op, fd, node, st, flags)

    def _open_transformed(self, op: ops.Open, node: Inode) -> Reply:
        """An open of a transformed view (an encrypted file's plaintext): the stored file is opened read-write (every
        write reads, patches and seals whole chunks), and its backend is the transform's; O_TRUNC truncates the
        plaintext, never the stored file (its header would go)."""
        assert node.view is not None
        fd = os.open(procfs.fd_path(node.fd), os.O_RDWR | os.O_CLOEXEC)
        try:
            backend = node.view.transform.backend(fd, op.flags)
            if op.flags & os.O_TRUNC:
                backend.truncate(0)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        opened = self._registered(op, fd, node, st, op.flags & ~(os.O_TRUNC | os.O_CREAT | os.O_EXCL) | os.O_CLOEXEC)
        self.files[opened.fh].backend = backend
        return opened

    def _created(self, op: ops.Create, fd: int, parent: Inode, name: bytes) -> Reply:
        """Reply to CREATE/TMPFILE: the new object's entry, then its open."""
        try:
            path_fd = os.open(procfs.fd_path(fd), os.O_PATH | os.O_CLOEXEC)
            st = os.fstat(path_fd)
            node = self._remember(path_fd, st, parent.nodeid, name)
            entry = Entry(node.nodeid, st, self.options.entry_timeout, self.options.attr_timeout)
            return Created(entry, self._registered(op, fd, node, st, (op.flags & ~_LOWER_STRIP) | os.O_CLOEXEC))
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
            self.intend(op)
            try:
                fd = os.open(at, lower, op.mode & 0o7777, dir_fd=dfd)  # permission bits only: a top bit overflows
            except FileExistsError:
                if not self.may_be_done(op):
                    raise
                # A predecessor created the file before it could answer (see may_be_done): open that one.
                fd = os.open(at, (lower & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)) | os.O_NOFOLLOW, dir_fd=dfd)
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
            if self.journal is not None:
                self.journal.closed(fh)
                if self.nodes.get(node.nodeid) is node:  # (not one the kernel forgot while this open lived on)
                    self.journal_node(node)
        if self.options.locks:
            self.locks.release_fh(node.nodeid, fh)  # flock and OFD locks belong to the open file
        close = getattr(f.backend, "close", None)
        if close is not None:
            close()
        os.close(f.fd)

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

    def fallocate(self, op: ops.Fallocate) -> Reply:
        self.file(op.fh).backend.allocate(op.mode, op.offset, op.length)
        return EMPTY

    def lseek(self, op: ops.Lseek) -> Reply:
        f = self.file(op.fh)
        if type(f.backend) is not LowerFile:
            # SEEK_DATA/SEEK_HOLE of a backend that is not the lower file as it is (an encrypted file's plaintext):
            # all data up to its size; the stored file's holes are not its.
            size = f.backend.size()
            if op.offset >= size:
                raise OSError(errno.ENXIO, "past the end of the file")
            return Offset(op.offset if op.whence == os.SEEK_DATA else size)
        return Offset(os.lseek(f.fd, op.offset, op.whence))

    def copy_file_range(self, op: ops.CopyFileRange) -> Reply:
        if op.flags:
            raise OSError(errno.EINVAL, "copy_file_range flags must be 0")
        if type(self.file(op.fh_in).backend) is not LowerFile or type(self.file(op.fh_out).backend) is not LowerFile:
            raise OSError(errno.EOPNOTSUPP, "copied through read and write (a backend that transforms the file)")
        n = os.copy_file_range(self.file(op.fh_in).fd, self.file(op.fh_out).fd, min(op.length, 1 << 30), op.off_in,
                               op.off_out)
        return Written(n)


_LOCK_FINISH = "lock-finish"


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
