"""A CBFilter layer's opens and closes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

from fsfilter._abi import fuse as abi
from fsfilter._engine.rules import Flags, attributes_from_stat
from fsfilter._layers.filter_base import (
    CLEANUP_BITS,
    FMODE_EXEC,
    RW_BITS,
    Handle,
)
from fsfilter._layers.filter_isolation import ENCRYPTED, VIRTUAL_CONTROL, IsolationOps
from fsfilter._layers.filter_naming import FilterNaming
from fsfilter._sessions.nodes import Inode
from fsfilter._wire import ops
from fsfilter._wire.replies import (
    EMPTY,
    Created,
    Entry,
    Opened,
    Reply,
)
from fsfilter.api import constants as c
from fsfilter.api import params as ev
from fsfilter.api.params import FILTER_PARAMS


class OpenOps(FilterNaming, IsolationOps):
    """Opens and closes: access checks, the create/open events and their contexts, cleanup and close events,
    and how an open's reads and writes are served (the daemon, direct I/O, FLUSH)."""

    def _untrusted_open(self, op: ops.Open, node: Inode) -> None:
        """An untrusted process opens a file under an encryption rule: it reads the file as stored; writing into an
        encrypted one is refused unless the policy allows it."""
        policy = self.encryption()
        if policy is None or not policy.refuse_untrusted_writes:
            return
        if (op.flags & os.O_ACCMODE != os.O_RDONLY or op.flags & os.O_TRUNC) and self.is_encrypted(node):
            self._refuse(op, "encrypted: only trusted processes write it")

    def _check_open_access(self, op: ops.Op, flags: Flags, open_flags: int, creating: bool) -> None:
        access = flags.access
        if not access:
            return
        handled = c.FS_CE_BEFORE_CREATE if creating else c.FS_CE_BEFORE_OPEN
        if flags.control & handled and self.core.handler("before_create_file" if creating else "before_open_file"):
            return  # a create/open callback decides instead of the access rule (the SDK's precedence)
        mode = open_flags & os.O_ACCMODE
        writes = mode in (os.O_WRONLY, os.O_RDWR) or bool(open_flags & os.O_TRUNC) or creating
        if access & c.ACCESS_DENY_ALL:
            self._refuse(op, "deny all")
        if access & c.ACCESS_READ_ONLY and writes:
            self._refuse(op, "read-only")
        if access & c.ACCESS_WRITE_ONLY and mode in (os.O_RDONLY, os.O_RDWR) and not creating:
            self._refuse(op, "write-only")
        if access & c.ACCESS_EXECUTE_PROTECT and open_flags & FMODE_EXEC:
            self._refuse(op, "execute-protect")

    def open(self, op: ops.Open) -> Reply:
        if not self.reaches(op.nodeid):
            return self.down.open(op)
        node = self.lower.inode(op.nodeid)
        m = self.match_node(node.nodeid)
        flags = self.effective(m, op.pid, node)
        if self.owns_view(node) and node.view is not None and node.view.of[0] == 0:
            flags = Flags(flags.access, flags.control | VIRTUAL_CONTROL, flags.notify)
        self._check_open_access(op, flags, op.flags, False)
        return self._open_with_events(op, node, op.flags, flags, lambda: self.down.open(op), created=False)

    def _open_fields(self, path: str, open_flags: int, mode: int, created: bool, is_dir: bool,
                     node: Inode | None = None) -> dict[str, Any]:
        attributes = c.FILE_SYS_ATTR_DIRECTORY if is_dir else 0
        virtual = node is not None and self.owns_view(node) and node.view is not None and node.view.of[0] == 0
        if virtual:
            attributes |= c.FILE_ATTRIBUTE_VIRTUAL_FILE
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
        bits = (c.FS_CE_BEFORE_CREATE, c.FS_CE_AFTER_CREATE, c.FS_NE_CREATE) if created else (
            c.FS_CE_BEFORE_OPEN, c.FS_CE_AFTER_OPEN, c.FS_NE_OPEN)
        fields = self._open_fields(path, open_flags, mode, created, is_dir, None if created else node)
        # (an isolated open's own context starts empty: see Handle.own_context)
        file_context = 0 if created or node.view is not None else self.file_context(context_node or node.nodeid)
        handle_context = 0
        before_event = FILTER_PARAMS["before_create_file" if created else "before_open_file"]  # picked by name
        isolating = isinstance(op, ops.Open) and not is_dir  # (an existing file opened by CREATE: after it)
        pending = self.take_pending(op.pid, node) if isolating else None
        if pending is not None:
            before = pending.before  # the handler decided this open before the kernel walked its name again
        else:
            # The backend is the file's own name unless a handler changes it (an isolated open then reads that).
            virtual = bool(fields["attributes"] & c.FILE_ATTRIBUTE_VIRTUAL_FILE)
            before = self.fire(before_event, bits[0], flags, origin, file_context=file_context, isolate=virtual,
                               backend_file_name="" if virtual else path, **fields)
        if before is not None:
            if not before.process_request:
                raise OSError(errno.EACCES, "the event handler completed the open without a file")
            file_context, handle_context = int(before.file_context), int(before.handle_context)
        encrypted = self.encryption_wanted(op, node, path) if isolating and self.encryption() is not None else None
        if encrypted is not None and not encrypted[0] and isinstance(op, ops.Open):
            self._untrusted_open(op, node)
        if isolating and (before is not None and before.isolate or node.view is not None or encrypted is not None):
            # (a decision kept for a retried open holds as made: the name may have changed since)
            isolate, backend = (pending.isolate, pending.backend) if pending is not None else \
                encrypted if encrypted is not None else self.wanted_view(before, path, node)
            if not self.view_fits(node, isolate, backend, op.pid):
                if pending is None:
                    self.reroute(op, node, isolate, backend, before, path)  # raises ESTALE: the kernel walks again
                # The walk led back to the same node: an open that names no path (/proc/PID/fd/N). It is served
                # there only if it would read what that node does; a view's cache must not reach another process.
                if not self.same_data(node, isolate, backend):
                    raise OSError(errno.EACCES, "an isolated view is opened only by its process, through its name")
            if isinstance(op, ops.Open) and self.handled(node) and op.flags & os.O_TRUNC:
                self.truncate_view(op, node)
        error = 0
        try:
            reply = serve()
        except OSError as exc:
            error = exc.errno or errno.EIO
            if self.after_ok(error):
                self._after_open(created, bits, flags, origin, fields, error, file_context, handle_context)
            raise
        encrypt: tuple[bool, bool] | None = op.recall((self, "encrypt")) if isinstance(reply, Created) else None
        if encrypt is not None and isinstance(reply, Created):
            new, truncate = encrypt
            if not new or self.encrypt_new(self.lower.inode(reply.entry.nodeid), path):
                reply = self.isolate_created(op, reply, None, path, ENCRYPTED, truncate)
        elif isinstance(reply, Created) and before is not None and before.isolate and not is_dir:
            reply = self.isolate_created(op, reply, before, path)
        opened = reply.opened if isinstance(reply, Created) else reply
        assert isinstance(opened, Opened)
        fh = opened.fh
        # A CREATE reply starts with the new object's entry: its node id is the one the handle is on.
        nodeid = reply.entry.nodeid if isinstance(reply, Created) else node.nodeid
        try:
            file_context, handle_context = self._after_open(created, bits, flags, origin, fields, 0, file_context,
                                                            handle_context, (self, nodeid))
        except BaseException:
            # The bottom closes the open through the whole stack (LowerFS._undo_open): the layers below that saw it
            # opened see it closed; this one never registered it.
            state = self._state(nodeid)
            if state is not None and not state.opens:
                state.suspended = False
            raise
        handle = Handle(path, origin, open_flags, is_dir)
        handle.context = handle_context
        opened_node = self.lower.nodes.get(nodeid)
        if opened_node is not None and opened_node.view is not None:
            handle.own_context = file_context  # an isolated open: its file context is its own
            file_context = 0
        self._node_opened(nodeid, file_context)
        self._keep_handle(fh, handle)
        return reply

    def create(self, op: ops.Create) -> Reply:
        if not self.reaches(op.nodeid):
            return self.down.create(op)
        open_flags, mode, name = op.flags, op.mode, op.name
        parent = self.lower.inode(op.nodeid)
        path = self.child_path(parent.nodeid, name)
        m = self.name_match(op, name)
        planned = attributes_from_stat(stat.S_IFREG | (mode & 0o7777), 0, 0, os.fsdecode(name))
        flags = self.effective(m, op.pid, parent=parent, name=name, planned=planned)
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
        if self.encryption() is not None:
            self._encryption_at_create(op, parent, name, path, existing)
        open_flags = op.flags
        created = existing is None or bool(open_flags & os.O_EXCL)
        self._check_open_access(op, flags, open_flags, created)
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

    def _encryption_at_create(self, op: ops.Create, parent: Inode, name: bytes, path: str,
                              existing: os.stat_result | None) -> None:
        """CBEncrypt: what a CREATE under an encryption rule becomes (kept in the op's memo for _open_with_events): a
        trusted process's new file is encrypted and opened through its plaintext view, as is an encrypted file it
        opens with O_CREAT (O_TRUNC then truncates the plaintext, not the stored file); an untrusted process may not
        write into an encrypted file unless the policy allows it."""
        policy = self.encryption()
        assert policy is not None
        if not policy.applies(path):
            return
        trusted = self.trusted_for_encryption(op.pid)
        if existing is None:
            if trusted:
                op.remember((self, "encrypt"), (True, False))
            return
        if not stat.S_ISREG(existing.st_mode):
            return
        dfd, at, owned = self.lower.locate(None, parent, name)
        try:
            fd = os.open(at, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        finally:
            if owned:
                os.close(dfd)
        try:
            encrypted = self.is_encrypted(Inode(0, fd, (existing.st_dev, existing.st_ino), parent.nodeid, name))
        finally:
            os.close(fd)
        if not encrypted:
            if trusted and existing.st_size == 0 and op.flags & os.O_ACCMODE != os.O_RDONLY:
                op.remember((self, "encrypt"), (True, False))  # an empty plain file: encrypted before it is written
            return
        if trusted:
            op.remember((self, "encrypt"), (False, bool(op.flags & os.O_TRUNC)))
            op.flags &= ~os.O_TRUNC  # the plaintext is truncated through the view; the stored file keeps its header
        elif policy.refuse_untrusted_writes and (op.flags & os.O_ACCMODE != os.O_RDONLY or op.flags & os.O_TRUNC):
            self._refuse(op, "encrypted: only trusted processes write it")

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
        policy = self.encryption()
        if policy is not None and stat.S_ISREG(mode) and policy.applies(path) and self.trusted_for_encryption(op.pid):
            # mknod makes a plain file no create event encrypts: a trusted program gets its files through open()
            self._refuse(op, "encrypted: a regular file under an encryption rule is made with open(O_CREAT)")
        m = self.name_match(op, name)
        flags = self.effective(m, op.pid, parent=self.lower.inode(op.nodeid), name=name, planned=attributes)
        if flags.access & (c.ACCESS_DENY_ALL | c.ACCESS_READ_ONLY) and not (
                flags.control & c.FS_CE_BEFORE_CREATE and self.core.handler("before_create_file")):
            self._refuse(op, "read-only")
        self._check_not_hidden(op, self.lower.inode(op.nodeid), name)
        origin = self.origin(op)
        fields: dict[str, Any] = dict(file_name=path, desired_access=c.DESIRED_ACCESS_FILE_WRITE_DATA,
                                      attributes=attributes, options=0, flags=0, mode=mode,
                                      create_disposition=c.FILE_DISPOSITION_CREATE_NEW)
        before = self.fire(ev.CBFilterBeforeCreateFileEventParams, c.FS_CE_BEFORE_CREATE, flags, origin, **fields)
        if before is not None and not before.process_request:
            raise OSError(errno.EACCES, "the event handler completed the create")
        file_context = int(before.file_context) if before is not None else 0
        try:
            reply = make()
        except OSError as exc:
            if self.after_ok(exc.errno or errno.EIO):
                self._after_open(True, (0, c.FS_CE_AFTER_CREATE, c.FS_NE_CREATE), flags, origin, fields,
                                 exc.errno or errno.EIO, file_context, 0)
            raise
        file_context, handle_context = self._after_open(True, (0, c.FS_CE_AFTER_CREATE, c.FS_NE_CREATE), flags,
                                                        origin, fields, 0, file_context, 0)
        if file_context or handle_context:  # nothing stays open: the contexts end here
            handler = self.core.handler("cleanup_context")
            if handler is not None:
                self.core.dispatcher.call(handler, ev.CBFilterCleanupContextEventParams(
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
            self._refuse(op, "deny all")
        open_flags = os.O_RDONLY | os.O_DIRECTORY
        return self._open_with_events(op, node, open_flags, flags, lambda: self.down.opendir(op),
                                      created=False, is_dir=True)

    def needs_io(self, node: Inode, st: os.stat_result) -> bool:
        if self.handled(node):
            return True
        m = self.match_node(node.nodeid)
        if m is None:
            return False
        # Any process may be the one a read/write rule is about: decided on the upper bound of the flags.
        return bool(m.upper.control & RW_BITS[0] & self.core.control_handlers
                    or m.upper.notify & RW_BITS[1] & self.core.notify_handlers)

    def open_reply_flags(self, node: Inode, flags: int, passthrough: bool) -> int:
        if self.handled(node):
            # What the handlers give may differ from one open to the next: the view's cache starts empty each time.
            flags &= ~abi.OpenReplyFlag.KEEP_CACHE
            if self.core.process_cached_io_requests or not self.core.handler("before_query_file_info"):
                # Every application read and write reaches the handlers: asked for, or the view's size is unknown
                # (the backend's, which the page cache would cut reads at; direct reads go past it).
                flags |= abi.OpenReplyFlag.DIRECT_IO
        m = self.match_node(node.nodeid)
        if m is None:
            return flags
        up = m.upper
        if up.control & CLEANUP_BITS[0] & self.core.control_handlers or up.notify & CLEANUP_BITS[1]:
            flags &= ~abi.OpenReplyFlag.NOFLUSH  # cleanup events need every close(2) to send FLUSH
        if not passthrough and self.core.process_cached_io_requests and (
                up.control & RW_BITS[0] or up.notify & RW_BITS[1]):
            flags |= abi.OpenReplyFlag.DIRECT_IO  # every application read/write reaches the daemon
            flags &= ~abi.OpenReplyFlag.KEEP_CACHE
        return flags

    def flush(self, op: ops.Flush) -> Reply:
        fh, owner = op.fh, op.owner
        handle = self.handle(fh)
        f = self.lower.file(fh)
        if self.lower.options.locks and self.lower.locks.owner_holds(f.inode.nodeid, owner):
            # close(2) of any descriptor drops the caller's POSIX locks on the file
            self._unlock_all(op, f.inode, handle, lambda: self.lower.locks.release_owner(f.inode.nodeid, owner))
        if handle is None:
            return self.down.flush(op)
        flags, origin = self._io_flags(op, f.inode, handle)
        ctx = self._handle_ctx(f.inode.nodeid, handle)
        before = self.fire(ev.CBFilterBeforeCleanupFileEventParams, c.FS_CE_BEFORE_CLEANUP, flags, origin,
                           handle.origin, None, file_name=handle.path, **ctx)
        reply = self.down.flush(op) if before is None or before.process_request else EMPTY
        after = self.fire(ev.CBFilterAfterCleanupFileEventParams, c.FS_CE_AFTER_CLEANUP, flags, origin,
                          handle.origin, None, file_name=handle.path, **ctx)
        if after is not None:
            handle.context = int(after.handle_context)
            self._set_file_context(f.inode.nodeid, int(after.file_context), handle)
        self.notify(ev.CBFilterNotifyCleanupFileEventParams, c.FS_NE_CLEANUP, flags, origin, handle.origin,
                    file_name=handle.path)
        return reply

    def release(self, op: ops.Release) -> Reply:
        fh = op.fh
        handle = self._drop_handle(fh)
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

    def _close_events(self, op: ops.Op, node: Inode, handle: Handle, is_dir: bool) -> None:
        m = self.match_node(node.nodeid)
        # RELEASE comes from the kernel (pid 0) after the last reference went: the handle's opener stands in.
        origin = handle.origin
        flags = self.effective(m, origin.tid, node)
        ctx = self._handle_ctx(node.nodeid, handle)
        if is_dir and handle.enumerated and flags.control & (c.FS_CE_BEFORE_CLOSE | c.FS_CE_AFTER_ENUMERATE_DIRECTORY):
            handler = self.core.handler("after_close_enumeration")
            if handler is not None:
                self.core.dispatcher.call(handler, ev.CBFilterAfterCloseEnumerationEventParams(
                    directory_name=handle.path, directory_context=ctx["file_context"],
                    enumeration_context=handle.enum_context), origin)
        # A close cannot fail: a result_code or a handler error is reported (on_error) and changes nothing,
        # and the After event fires whatever the Before handler did.
        try:
            self.fire(ev.CBFilterBeforeCloseFileEventParams, c.FS_CE_BEFORE_CLOSE, flags, origin, handle.origin, None,
                      file_name=handle.path, **ctx)
        except OSError:
            pass
        try:
            after = self.fire(ev.CBFilterAfterCloseFileEventParams, c.FS_CE_AFTER_CLOSE, flags, origin, handle.origin,
                              None, file_name=handle.path, **ctx)
            if after is not None:
                handle.context = int(after.handle_context)
                self._set_file_context(node.nodeid, int(after.file_context), handle)
        except OSError:
            pass
        self.notify(ev.CBFilterNotifyCloseFileEventParams, c.FS_NE_CLOSE, flags, origin, file_name=handle.path)

    def releasedir(self, op: ops.Release) -> Reply:
        fh = op.fh
        handle = self._drop_handle(fh)
        if handle is None:
            return self.down.releasedir(op)
        node = self.lower.nodes.get(op.nodeid)
        if node is not None:
            self._close_events(op, node, handle, True)
        try:
            return self.down.releasedir(op)
        finally:
            self._node_closed(op.nodeid, handle)


def _desired_access(open_flags: int) -> int:
    mode = open_flags & os.O_ACCMODE
    access = 0
    if mode in (os.O_RDONLY, os.O_RDWR):
        access |= c.DESIRED_ACCESS_FILE_READ_DATA
    if mode in (os.O_WRONLY, os.O_RDWR):
        access |= c.DESIRED_ACCESS_FILE_WRITE_DATA
    if open_flags & os.O_APPEND:
        access |= c.DESIRED_ACCESS_FILE_APPEND_DATA
    if open_flags & FMODE_EXEC:
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
