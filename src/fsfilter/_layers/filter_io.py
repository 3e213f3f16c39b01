"""A CBFilter layer's reads, writes and locks.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from typing import Any

from fsfilter._engine.dispatch import Origin
from fsfilter._engine.rules import Flags
from fsfilter._layers.filter_base import LOCK_BITS, Handle
from fsfilter._layers.filter_isolation import IsolationOps
from fsfilter._sessions.locks import F_UNLCK, F_WRLCK, OFFSET_MAX
from fsfilter._sessions.lower_fs import add_lock_finish
from fsfilter._sessions.nodes import OpenFile
from fsfilter._wire import ops
from fsfilter._wire.replies import (
    EMPTY,
    Data,
    Offset,
    Reply,
    Written,
)
from fsfilter.api import constants as c
from fsfilter.api import params as ev
from fsfilter.api.params import FILTER_PARAMS


class IoOps(IsolationOps):
    """Reads, writes, allocation and locks of open files."""

    def read(self, op: ops.Read) -> Reply:
        fh = op.fh
        f = self.lower.file(fh)
        if not self.reaches(f.inode.nodeid):
            return self.down.read(op)
        handle = self.handle(fh)
        flags, origin = self._io_flags(op, f.inode, handle)
        if f.inode.view is not None and self.handled_open(f):
            flags = self.handled_flags(flags)
        control = flags.control & (c.FS_CE_BEFORE_READ | c.FS_CE_AFTER_READ)
        if not (control or flags.notify & c.FS_NE_READ):
            return self.down.read(op)
        direct = bool(self.core.process_cached_io_requests)
        direction = self._direction(handle, direct)
        path = handle.path if handle is not None else self.abspath(f.inode.nodeid)
        if direction == c.FS_REQUEST_DIR_USER_CACHED:
            # The application's read (the open has no page cache). What reaches storage is a request of its own,
            # fired as non-cached I/O inside it, as the SDK has it: a filter that transforms only non-cached I/O
            # (an encryptor) sees every byte the application gets.
            def below() -> Reply:
                return self._read_events(op, f, handle, flags, origin, path, control,
                                         c.FS_REQUEST_DIR_SYSTEM_NONCACHED, lambda: self.down.read(op))
        else:
            def below() -> Reply:
                return self.down.read(op)
        return self._read_events(op, f, handle, flags, origin, path, control, direction, below)

    def _read_events(self, op: ops.Read, f: OpenFile, handle: Handle | None, flags: Flags, origin: Origin,
                     path: str, control: int, direction: int, serve: Callable[[], Reply]) -> Reply:
        """The read events of one kind of read (``direction``) around ``serve``, which reads ``op.offset`` and
        ``op.size`` as the Before handler left them."""
        offset, size = op.offset, op.size
        if not control:  # a notification only: no buffer for handlers to see
            reply, error = self._served(serve)
            got = len(reply.data) if isinstance(reply, Data) else 0
            self.notify(ev.CBFilterNotifyReadFileEventParams, c.FS_NE_READ, flags, origin,
                        handle.origin if handle else None, file_name=path, position=offset,
                        bytes_to_read=size, direction=direction, bytes_read=got, status=error)
            if error or reply is None:
                raise OSError(error, os.strerror(error))
            return reply
        ctx = self._handle_ctx(f.inode.nodeid, handle)
        creator = handle.origin if handle else None
        buf = ctypes.create_string_buffer(max(size, 1))
        view = memoryview(buf).cast("B")[:size]
        pointer = ctypes.c_void_p(ctypes.addressof(buf))
        position, count = offset, size
        before = self.fire(ev.CBFilterBeforeReadFileEventParams, c.FS_CE_BEFORE_READ, flags, origin, creator, None,
                           file_name=path, position=offset, buffer=pointer, buffer_length=size, buffer_view=view,
                           bytes_to_read=size, direction=direction, **ctx)
        error = 0
        done = 0
        if before is not None:
            position = int(before.position)
            count = max(0, min(size, int(before.bytes_to_read)))
        if before is not None and not before.process_request:
            done = count  # the handler put the data in the buffer
        elif count:
            op.offset, op.size = position, count  # what the Before handler asked for is what the layers below see
            reply, error = self._served(serve)
            if isinstance(reply, Data):
                done = min(count, len(reply.data))
                view[:done] = reply.data[:done]
        after = self.fire(ev.CBFilterAfterReadFileEventParams, c.FS_CE_AFTER_READ, flags, origin, creator, None,
                          file_name=path, position=position, buffer=pointer, buffer_length=size, buffer_view=view,
                          bytes_to_read=count, direction=direction, bytes_read=done, status=error, **ctx)
        if after is not None:
            done = max(0, min(size, int(after.bytes_read)))
            error = int(after.status or 0)  # the handler may set or clear the error
        self.notify(ev.CBFilterNotifyReadFileEventParams, c.FS_NE_READ, flags, origin, creator, file_name=path,
                    position=position, bytes_to_read=count, direction=direction, bytes_read=done, status=error)
        if error:
            raise OSError(error, os.strerror(error))
        return Data(view[:done])  # (the view keeps its buffer alive until the reply is written)

    def write(self, op: ops.Write) -> Reply:
        fh = op.fh
        f = self.lower.file(fh)
        if not self.reaches(f.inode.nodeid):
            return self.down.write(op)
        handle = self.handle(fh)
        flags, origin = self._io_flags(op, f.inode, handle)
        if f.inode.view is not None and self.handled_open(f):
            flags = self.handled_flags(flags)
        control = flags.control & (c.FS_CE_BEFORE_WRITE | c.FS_CE_AFTER_WRITE)
        if not (control or flags.notify & c.FS_NE_WRITE):
            return self.down.write(op)
        direct = bool(self.core.process_cached_io_requests)
        direction = self._direction(handle, direct)
        path = handle.path if handle is not None else self.abspath(f.inode.nodeid)
        if direction == c.FS_REQUEST_DIR_USER_CACHED:
            def below() -> Reply:  # what reaches storage, as non-cached I/O (see read)
                return self._write_events(op, f, handle, flags, origin, path, control,
                                          c.FS_REQUEST_DIR_SYSTEM_NONCACHED, lambda: self.down.write(op))
        else:
            def below() -> Reply:
                return self.down.write(op)
        return self._write_events(op, f, handle, flags, origin, path, control, direction, below)

    def _write_events(self, op: ops.Write, f: OpenFile, handle: Handle | None, flags: Flags, origin: Origin,
                      path: str, control: int, direction: int, serve: Callable[[], Reply]) -> Reply:
        """The write events of one kind of write (``direction``) around ``serve``, which writes ``op.data`` at
        ``op.offset`` as the Before handler left them."""
        offset, size = op.offset, op.size
        if not control:  # a notification only: no buffer for handlers to see
            reply, error = self._served(serve)
            written = reply.size if isinstance(reply, Written) else 0
            self.notify(ev.CBFilterNotifyWriteFileEventParams, c.FS_NE_WRITE, flags, origin,
                        handle.origin if handle else None, file_name=path, position=offset,
                        bytes_to_write=size, direction=direction, bytes_written=written, status=error)
            if error or reply is None:
                raise OSError(error, os.strerror(error))
            return reply
        ctx = self._handle_ctx(f.inode.nodeid, handle)
        creator = handle.origin if handle else None
        buf = ctypes.create_string_buffer(bytes(op.data), max(size, 1))
        view = memoryview(buf).cast("B")[:size]
        pointer = ctypes.c_void_p(ctypes.addressof(buf))
        position, count = offset, size
        before = self.fire(ev.CBFilterBeforeWriteFileEventParams, c.FS_CE_BEFORE_WRITE, flags, origin, creator, None,
                           file_name=path, position=offset, buffer=pointer, buffer_length=size, buffer_view=view,
                           bytes_to_write=size, direction=direction, **ctx)
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
                reply, error = self._served(serve)
                done = reply.size if isinstance(reply, Written) else 0
        after = self.fire(ev.CBFilterAfterWriteFileEventParams, c.FS_CE_AFTER_WRITE, flags, origin, creator, None,
                          file_name=path, position=position, buffer=pointer, buffer_length=size, buffer_view=view,
                          bytes_to_write=count, direction=direction, bytes_written=done, status=error, **ctx)
        if after is not None:
            done = max(0, min(count, int(after.bytes_written)))
            error = int(after.status or 0)  # the handler may set or clear the error
        self.notify(ev.CBFilterNotifyWriteFileEventParams, c.FS_NE_WRITE, flags, origin, creator, file_name=path,
                    position=position, bytes_to_write=count, direction=direction, bytes_written=done, status=error)
        if error:
            raise OSError(error, os.strerror(error))
        # A handler that shortened the write still owes the kernel the full count it asked for, or the
        # page cache and the file disagree; the SDK semantics are kept by what reached the file.
        return Written(size if before is not None and not before.process_request else done)

    def copy_file_range(self, op: ops.CopyFileRange) -> Reply:
        src, dst = self.lower.file(op.fh_in), self.lower.file(op.fh_out)
        if self.handled_open(src) or self.handled_open(dst):
            # Below the handlers the copy would read or write the view's backend file itself: the kernel copies
            # through READ and WRITE instead, which the handlers serve.
            raise OSError(errno.EOPNOTSUPP, "a handler-served view is copied through read and write")
        if not (self.reaches(src.inode.nodeid) or self.reaches(dst.inode.nodeid)):
            return self.down.copy_file_range(op)
        f_in, _ = self._io_flags(op, src.inode, self.handle(op.fh_in))
        f_out, _ = self._io_flags(op, dst.inode, self.handle(op.fh_out))
        if (f_in.control & (c.FS_CE_BEFORE_READ | c.FS_CE_AFTER_READ) or f_in.notify & c.FS_NE_READ
                or f_out.control & (c.FS_CE_BEFORE_WRITE | c.FS_CE_AFTER_WRITE) or f_out.notify & c.FS_NE_WRITE):
            # A copy done below the filter would bypass the read/write events: the kernel then copies
            # through READ and WRITE requests, which fire them.
            raise OSError(errno.EOPNOTSUPP, "copied through read and write so that events fire")
        return self.down.copy_file_range(op)

    def fallocate(self, op: ops.Fallocate) -> Reply:
        fh, offset, length = op.fh, op.offset, op.length
        f = self.lower.file(fh)
        if self.handled_open(f):
            # The handlers keep the view's data: space below them means nothing (posix_fallocate then writes zeros,
            # which they serve); a hole punched below them would change the backend file behind their back.
            raise OSError(errno.EOPNOTSUPP, "a handler-served view has no space to allocate")
        if not self.reaches(f.inode.nodeid):
            return self.down.fallocate(op)
        handle = self.handle(fh)
        flags, origin = self._io_flags(op, f.inode, handle)
        if flags.access & (c.ACCESS_READ_ONLY | c.ACCESS_DENY_ALL):
            self._refuse(op, "read-only")
        path = handle.path if handle else self.abspath(f.inode.nodeid)
        ctx = self._handle_ctx(f.inode.nodeid, handle)
        creator = handle.origin if handle else None
        size = offset + length
        before = self.fire(ev.CBFilterBeforeSetAllocationSizeEventParams, c.FS_CE_BEFORE_SET_SIZES, flags, origin,
                           creator, None, file_name=path, allocation_size=size, **ctx)
        if before is not None and not before.process_request:
            return EMPTY
        reply = self.down.fallocate(op)
        self.fire(ev.CBFilterAfterSetAllocationSizeEventParams, c.FS_CE_AFTER_SET_SIZES, flags, origin, creator, None,
                  file_name=path, allocation_size=size, **ctx)
        self.notify(ev.CBFilterNotifySetAllocationSizeEventParams, c.FS_NE_SET_SIZES, flags, origin, creator,
                    file_name=path, allocation_size=size)
        return reply

    def lseek(self, op: ops.Lseek) -> Reply:
        f = self.lower.file(op.fh)
        if not self.handled_open(f):
            return self.down.lseek(op)
        # SEEK_DATA/SEEK_HOLE (the only ones the kernel asks) of a handler-served view: all data up to its size, as
        # the handlers give it; the backend file's holes are not the view's.
        size = self.query_view(op, f.inode, os.fstat(f.inode.fd), self.handle(op.fh)).st_size
        if op.offset >= size:
            raise OSError(errno.ENXIO, "past the end of the file")
        return Offset(op.offset if op.whence == os.SEEK_DATA else size)

    def setlk(self, op: ops.Lock) -> Reply | None:
        return self._lock_with_events(op, False)

    def setlkw(self, op: ops.Lock) -> Reply | None:
        return self._lock_with_events(op, True)

    def _lock_with_events(self, lk: ops.Lock, wait: bool) -> Reply | None:
        node = self.lower.file(lk.fh).inode
        serve = self.down.setlkw if wait else self.down.setlk
        if not self.reaches(node.nodeid):
            return serve(lk)
        handle = self.handle(lk.fh)
        flags, origin = self._io_flags(lk, node, handle)
        if not (flags.control & LOCK_BITS[0] or flags.notify & LOCK_BITS[1]):
            return serve(lk)
        path = handle.path if handle is not None else self.abspath(node.nodeid)
        ctx = self._handle_ctx(node.nodeid, handle)
        creator = handle.origin if handle else None
        unlock = lk.kind == F_UNLCK
        kind = "unlock_single" if unlock else "lock"  # picked by name: typed as some event's parameters
        events = (FILTER_PARAMS[f"before_{kind}"], FILTER_PARAMS[f"after_{kind}"], FILTER_PARAMS[f"notify_{kind}"])
        fields: dict[str, Any] = dict(file_name=path, offset=lk.start, length=_lock_length(lk.start, lk.end),
                                      key=lk.owner)
        if lk.kind != F_UNLCK:
            fields.update(fail_immediately=not wait, exclusive_lock=lk.kind == F_WRLCK)
        before = self.fire(events[0], c.FS_CE_BEFORE_LOCK_CONTROL, flags, origin, creator, None, **fields, **ctx)
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
                after = self.fire(events[1], c.FS_CE_AFTER_LOCK_CONTROL, flags, origin, creator, None,
                                  status=error, **fields, **ctx)
                if after is not None:
                    error = int(after.status or 0)  # the handler may set or clear the error
            except OSError as exc:
                error = exc.errno or errno.EIO
            self.notify(events[2], c.FS_NE_LOCK_CONTROL, flags, origin, creator, status=error, **fields)
            return error

        # The outcome reaches this layer's After work once the bottom knows it (at once, or when a wait is
        # granted); a wait granted later is finished on a thread of its own: the After handler must not run on
        # the thread of the request (an unlock, a close) whose release granted it.
        add_lock_finish(lk, finish, bool(flags.control & c.FS_CE_AFTER_LOCK_CONTROL))
        return serve(lk)


def _lock_length(start: int, end: int) -> int:
    """A lock's length as fcntl gives it: 0 means "to the end of the file, however far it grows"."""
    return 0 if end >= OFFSET_MAX else end - start + 1


def _lock_end(start: int, length: int) -> int:
    return OFFSET_MAX if length == 0 else min(OFFSET_MAX, start + length - 1)
