"""A CBFilter layer's changes to names and metadata.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from fsfilter._abi import fuse as abi
from fsfilter._engine.rules import Flags
from fsfilter._layers.filter_base import (
    ACL_NAMES,
    XATTR_SIZE_MAX,
)
from fsfilter._layers.filter_isolation import IsolationOps
from fsfilter._layers.filter_naming import FilterNaming
from fsfilter._sessions.nodes import Inode
from fsfilter._wire import ops
from fsfilter._wire.replies import (
    EMPTY,
    Attr,
    Data,
    IoctlOut,
    Reply,
    xattr_reply,
)
from fsfilter.api import constants as c
from fsfilter.api import fileinfo
from fsfilter.api import params as ev
from fsfilter.api.params import FILTER_PARAMS

_TIMES = abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW


class ChangeOps(FilterNaming, IsolationOps):
    """Changes to names and metadata: delete, rename, hard links, attributes, extended attributes and ACLs,
    symlink targets, ioctls."""

    def _delete(self, op: ops.Remove, is_dir: bool) -> Reply:
        name = op.name
        serve: Callable[[ops.Remove], Reply] = self.down.rmdir if is_dir else self.down.unlink
        if self.lower.virtuals and not is_dir:
            virtual = self.lower.virtual_at(self.lower.inode(op.nodeid), name)
            if virtual is not None and virtual.layer is self:
                return self._delete_virtual(op, virtual.parent_key)
        if not self.reaches(op.nodeid):
            return serve(op)
        path = self.child_path(op.nodeid, name)
        m = self.name_match(op, name)
        flags = self.effective(m, op.pid, parent=self.lower.inode(op.nodeid), name=name)
        if flags.access & (c.ACCESS_DENY_ALL | c.ACCESS_DELETE_PROTECT | c.ACCESS_DELETE_ONLY_PROTECT
                           | c.ACCESS_READ_ONLY | c.ACCESS_WRITE_ONLY):
            self._refuse(op, "delete-protect")
        origin = self.origin(op)
        before = self.fire(ev.CBFilterBeforeCanFileBeDeletedEventParams, c.FS_CE_BEFORE_CAN_DELETE, flags, origin,
                           file_name=path, can_delete=True)
        can_delete = True if before is None else bool(before.can_delete)
        after_can = self.fire(ev.CBFilterAfterCanFileBeDeletedEventParams, c.FS_CE_AFTER_CAN_DELETE, flags, origin,
                              file_name=path, can_delete=can_delete)
        if after_can is not None:
            can_delete = bool(after_can.can_delete)
        self.notify(ev.CBFilterNotifyCanFileBeDeletedEventParams, c.FS_NE_CAN_DELETE, flags, origin, file_name=path,
                    can_delete=can_delete)
        if not can_delete:
            raise OSError(errno.EACCES, "an event handler refused the delete")
        deleting = self.fire(ev.CBFilterBeforeDeleteFileEventParams, c.FS_CE_BEFORE_DELETE, flags, origin,
                             file_name=path)
        # process_request = False: the handler completed the delete (or chose to report it done).
        handled = deleting is not None and not deleting.process_request
        try:
            reply = EMPTY if handled else self._hidden_emptiness(op, self.lower.inode(op.nodeid), name,
                                                                 lambda: serve(op))
        except OSError as exc:
            if self.after_ok(exc.errno or errno.EIO):
                self.fire(ev.CBFilterAfterDeleteFileEventParams, c.FS_CE_AFTER_DELETE, flags, origin, file_name=path,
                          status=exc.errno or errno.EIO)
            raise
        self.fire(ev.CBFilterAfterDeleteFileEventParams, c.FS_CE_AFTER_DELETE, flags, origin, file_name=path)
        self.notify(ev.CBFilterNotifyDeleteFileEventParams, c.FS_NE_DELETE, flags, origin, file_name=path)
        return reply

    def _delete_virtual(self, op: ops.Remove, parent_key: tuple[int, int]) -> Reply:
        """unlink(2) of a virtual file: on_before_delete_file decides (result_code refuses); the file goes unless the
        handler completed the delete itself (process_request = False: it calls remove_virtual_file, or keeps it)."""
        path = self.child_path(op.nodeid, op.name)
        origin = self.origin(op)
        flags = Flags(0, c.FS_CE_BEFORE_DELETE, 0)
        deleting = self.fire(ev.CBFilterBeforeDeleteFileEventParams, c.FS_CE_BEFORE_DELETE, flags, origin,
                             file_name=path)
        if deleting is None or deleting.process_request:
            self.lower.remove_virtual(parent_key, op.name)
        return EMPTY

    def _keep_encrypted(self, op: ops.Op, parent: Inode | None, name: bytes, src: str, dst: str,
                        node: Inode | None = None) -> None:
        """CBEncrypt: an untrusted process may not give an encrypted file a name no encryption rule covers (a rename or
        a hard link): there it could write into it and corrupt it, as RefuseUntrustedWrites forbids."""
        policy = self.encryption()
        if policy is None or not policy.refuse_untrusted_writes or not policy.applies(src) or policy.applies(dst):
            return
        if self.trusted_for_encryption(op.pid) or self.is_own(op.pid):
            return
        if node is None:
            assert parent is not None
            dfd, at, owned = self.lower.locate(None, parent, name)
            try:
                fd = os.open(at, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                return  # (the rename says what is wrong)
            finally:
                if owned:
                    os.close(dfd)
            try:
                st = os.fstat(fd)
                probe = Inode(0, fd, (st.st_dev, st.st_ino), 0, name)
                encrypted = stat.S_ISREG(st.st_mode) and self.is_encrypted(probe)
            finally:
                os.close(fd)
        else:
            encrypted = self.is_encrypted(node)
        if encrypted:
            self._refuse(op, "encrypted: only trusted processes move it out of its rules")

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
        self._keep_encrypted(op, old_dir, old, old_path, new_path)
        if self._redirected(op, old_dir, old) or self._redirected(op, new_dir, new):
            # The two names live in different places: callers such as mv then copy and delete, which the
            # reparse rules send to the right place.
            raise OSError(errno.EXDEV, "a redirected name is renamed by copying")
        f_old = self.effective(m_old, op.pid, parent=old_dir, name=old)
        f_new = self.effective(m_new, op.pid, parent=new_dir, name=new)
        self._check_rename_access(op, f_old, f_new, new_dir, new, flags_in)
        self._check_subtree_move(op, op.pid, old_dir, old, new_dir, new, old_path, new_path, flags_in)
        self._check_not_hidden(op, new_dir, new)
        flags = Flags(f_old.access | f_new.access, f_old.control | f_new.control, f_old.notify | f_new.notify)
        origin = self.origin(op)
        replace = not flags_in & 1  # RENAME_NOREPLACE
        fields: dict[str, Any] = dict(file_name=old_path, new_file_name=new_path, replace_if_exists=replace,
                                      flags=flags_in)
        before = self.fire(ev.CBFilterBeforeRenameOrMoveFileEventParams, c.FS_CE_BEFORE_RENAME, flags, origin, **fields)
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
                self.fire(ev.CBFilterAfterRenameOrMoveFileEventParams, c.FS_CE_AFTER_RENAME, flags, origin,
                          status=exc.errno or errno.EIO, **fields)
                self.notify(ev.CBFilterNotifyRenameOrMoveFileEventParams, c.FS_NE_RENAME, flags, origin,
                            status=exc.errno or errno.EIO, **fields)
            raise
        self._epoch += 1
        for h in self.handles():  # open handles keep naming the object by its new path
            if h.path == old_path or h.path.startswith(old_path + "/"):
                h.path = new_path + h.path[len(old_path):]
        self.fire(ev.CBFilterAfterRenameOrMoveFileEventParams, c.FS_CE_AFTER_RENAME, flags, origin, **fields)
        self.notify(ev.CBFilterNotifyRenameOrMoveFileEventParams, c.FS_NE_RENAME, flags, origin, **fields)
        return reply

    def _check_rename_access(self, op: ops.Op, f_old: Flags, f_new: Flags, new_dir: Inode, new: bytes,
                             flags_in: int) -> None:
        moving = c.ACCESS_DENY_ALL | c.ACCESS_RENAME_PROTECT | c.ACCESS_DELETE_PROTECT
        if f_old.access & moving:
            self._refuse(op, "rename-protect")
        if f_new.access & (c.ACCESS_DENY_ALL | c.ACCESS_READ_ONLY):
            self._refuse(op, "read-only destination")
        if f_old.access & ~f_new.access:
            self._refuse(op, "the new name would escape an access rule")  # as for hard links
        exchange = flags_in & 2  # RENAME_EXCHANGE: the destination moves to the old name
        if exchange and (f_new.access & moving or f_new.access & ~f_old.access):
            self._refuse(op, "rename-protect (exchange)")
        if not exchange and f_new.access & (c.ACCESS_DELETE_PROTECT | c.ACCESS_DELETE_ONLY_PROTECT
                                            | c.ACCESS_WRITE_ONLY):
            try:
                os.stat(new, dir_fd=new_dir.fd, follow_symlinks=False)
            except OSError:
                return
            self._refuse(op, "delete-protect: the rename would replace a protected file")

    def _check_subtree_move(self, op: ops.Op, tid: int, old_dir: Inode, old: bytes, new_dir: Inode, new: bytes,
                            old_path: str, new_path: str, flags_in: int) -> None:
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
                self._refuse(op, f"moving the directory {old_path} to {new_path} would change what the rule "
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
        target = self.lower.inode(old)
        if target.view is None:
            self._keep_encrypted(op, None, b"", src_path, link_path, target)
        f_src = self.effective(self.match_node(old), op.pid, self.lower.inode(old))
        f_new = self.effective(self.name_match(op, name), op.pid, parent=self.lower.inode(op.nodeid), name=name)
        if f_src.access and f_new.access & f_src.access != f_src.access:
            # A second name outside the rule would escape it: refuse it.
            self._refuse(op, "a hard link would bypass an access rule")
        if f_new.access & (c.ACCESS_DENY_ALL | c.ACCESS_READ_ONLY):
            self._refuse(op, "read-only")
        self._check_not_hidden(op, self.lower.inode(op.nodeid), name)
        flags = Flags(f_src.access | f_new.access, f_src.control | f_new.control, f_src.notify | f_new.notify)
        origin = self.origin(op)
        fields: dict[str, Any] = dict(file_name=src_path, link_name=link_path, replace_if_exists=False)
        before = self.fire(ev.CBFilterBeforeCreateHardLinkEventParams, c.FS_CE_BEFORE_CREATE_HARD_LINK, flags, origin,
                           **fields)
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
                self.fire(ev.CBFilterAfterCreateHardLinkEventParams, c.FS_CE_AFTER_CREATE_HARD_LINK, flags, origin,
                          status=exc.errno or errno.EIO, **fields)
            raise
        self.fire(ev.CBFilterAfterCreateHardLinkEventParams, c.FS_CE_AFTER_CREATE_HARD_LINK, flags, origin, **fields)
        self.notify(ev.CBFilterNotifyCreateHardLinkEventParams, c.FS_NE_CREATE_HARD_LINK, flags, origin, **fields)
        return reply

    def setattr(self, op: ops.Setattr) -> Reply:
        if not self.reaches(op.nodeid):
            return self.down.setattr(op)
        valid, fh, size, mode, uid, gid = op.valid, op.fh, op.size, op.mode, op.uid_to, op.gid_to
        atime, mtime, atime_ns, mtime_ns = op.atime, op.mtime, op.atime_ns, op.mtime_ns
        node = self.lower.inode(op.nodeid)
        policy = self.encryption()
        if policy is not None and valid & abi.FATTR_SIZE and node.view is None and policy.refuse_untrusted_writes \
                and policy.applies(self.abspath(node.nodeid)) and self.is_encrypted(node) \
                and not self.trusted_for_encryption(op.pid) and not self.is_own(op.pid):
            self._refuse(op, "encrypted: only trusted processes write it")
        if node.view is not None and self.handled(node) and valid & (abi.FATTR_SIZE | _TIMES):
            # A handler-served view's size and times are its handlers' (FileEndOfFileInformation,
            # FileBasicInformation): what a handler completes is taken out of the request.
            handle = self.handle(fh) if fh is not None else None
            if valid & abi.FATTR_SIZE and self.set_view_info(op, node, fileinfo.FILE_END_OF_FILE_INFORMATION,
                                                             struct.pack("<q", size), handle):
                op.valid &= ~abi.FATTR_SIZE
            if valid & _TIMES:
                now = time.time_ns()
                atime_ft = fileinfo.filetime(now if valid & abi.FATTR_ATIME_NOW else atime * 10**9 + atime_ns) \
                    if valid & (abi.FATTR_ATIME | abi.FATTR_ATIME_NOW) else 0
                mtime_ft = fileinfo.filetime(now if valid & abi.FATTR_MTIME_NOW else mtime * 10**9 + mtime_ns) \
                    if valid & (abi.FATTR_MTIME | abi.FATTR_MTIME_NOW) else 0
                if self.set_view_info(op, node, fileinfo.FILE_BASIC_INFORMATION,
                                      struct.pack("<qqqqI4x", 0, atime_ft, mtime_ft, 0, 0), handle):
                    op.valid &= ~_TIMES
            if op.valid != valid:
                valid = op.valid
                if not valid & ~(abi.FATTR_FH | abi.FATTR_LOCKOWNER | abi.FATTR_KILL_SUIDGID):
                    return Attr(self.query_view(op, node, os.fstat(node.fd), handle), 0.0)  # all done by handlers
        m = self.match_node(node.nodeid)
        flags = self.effective(m, op.pid, node)
        if node.view is not None and self.handled(node):
            flags = self.handled_flags(flags)  # chmod/chown of a handler-served view: its handlers' (set security)
        if not (flags.access or flags.control or flags.notify):
            return self.down.setattr(op)
        access = flags.access
        if access & c.ACCESS_DENY_ALL:
            self._refuse(op, "deny all")
        if valid & abi.FATTR_SIZE and access & c.ACCESS_READ_ONLY:
            self._refuse(op, "read-only")
        if valid & abi.FATTR_MODE and access & c.ACCESS_NO_CHANGE_DAC:
            self._refuse(op, "no-change-dac")
        if valid & (abi.FATTR_UID | abi.FATTR_GID) and access & c.ACCESS_NO_CHANGE_OWNER:
            self._refuse(op, "no-change-owner")
        path = self.abspath(node.nodeid)
        origin = self.origin(op)
        handle = self.handle(fh) if fh is not None else None
        ctx = self._handle_ctx(node.nodeid, handle)
        creator = handle.origin if handle else None
        # One SETATTR may change several things, each with its own events (picked by name: their fields differ).
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
            before = self.fire(FILTER_PARAMS[f"before_{event}"], bit, flags, origin, creator, None, **ctx, **fields)
            if before is not None and not before.process_request:
                return Attr(self.lower.attributes(node.nodeid, os.fstat(node.fd)), 0.0)
        reply, error = self._served(lambda: self.down.setattr(op))
        for event, bit, nbit, fields in events:
            self.fire(FILTER_PARAMS[f"after_{event}"], bit << 1, flags, origin, creator, None, status=error, **ctx,
                      **fields)
            self.notify(FILTER_PARAMS[f"notify_{event}"], nbit, flags, origin, creator, status=error, **fields)
        if error or reply is None:
            raise OSError(error, os.strerror(error))
        return reply

    def _xattr_events(self, op: ops.Op, name: bytes, setting: bool, value: bytes = b"", size: int = 0) -> Reply:
        """Events around an xattr request: a set/remove (``setting``), or a query whose whole value (or name
        list) the events see and the reply then cuts to the caller's ``size`` (0: a size probe)."""
        node = self.lower.inode(op.nodeid)
        m = self.match_node(node.nodeid)
        flags = self.effective(m, op.pid, node)
        if node.view is not None and self.handled(node):
            flags = self.handled_flags(flags)  # a handler-served view's security is its handlers' (ACLs)
        serve = self._xattr_server(op, setting)
        if not (flags.access or flags.control or flags.notify):
            return serve() if setting else xattr_reply(self._whole(serve), size)
        acl = name in ACL_NAMES
        if setting and flags.access & c.ACCESS_DENY_ALL:
            self._refuse(op, "deny all")
        if setting and acl and flags.access & c.ACCESS_NO_CHANGE_DAC:
            self._refuse(op, "no-change-dac")
        if setting and not acl and flags.access & c.ACCESS_READ_ONLY:
            self._refuse(op, "read-only")
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
            out = bytearray(XATTR_SIZE_MAX)
            fields.update(buffer_view=memoryview(out), valid_bytes=0)
        before = self.fire(FILTER_PARAMS[f"before_{kind}"], bit, flags, origin, **ctx, **fields)
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
        self.fire(FILTER_PARAMS[f"after_{kind}"], bit << 1, flags, origin, status=error, **ctx, **fields)
        self.notify(FILTER_PARAMS[f"notify_{kind}"], nbit, flags, origin, status=error, **fields)
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
            op.size = XATTR_SIZE_MAX
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
        before = self.fire(ev.CBFilterBeforeGetReparsePointEventParams, c.FS_CE_BEFORE_GET_REPARSE_POINT, flags, origin,
                           file_name=path)
        if before is not None and not before.process_request:
            return Data(_link_target(before.reparse_buffer))
        served = self.down.readlink(op)
        target = bytes(served.data) if isinstance(served, Data) else b""
        after = self.fire(ev.CBFilterAfterGetReparsePointEventParams, c.FS_CE_AFTER_GET_REPARSE_POINT, flags, origin,
                          file_name=path, reparse_buffer=target, reparse_buffer_length=len(target),
                          valid_bytes=len(target))
        if after is not None and after.reparse_buffer != target:
            target = _link_target(after.reparse_buffer)
        self.notify(ev.CBFilterNotifyGetReparsePointEventParams, c.FS_NE_GET_REPARSE_POINT, flags, origin,
                    file_name=path, reparse_buffer=target, reparse_buffer_length=len(target), valid_bytes=len(target))
        return Data(target)

    def ioctl(self, op: ops.Ioctl) -> Reply:
        if not self.reaches(op.nodeid):
            return self.down.ioctl(op)
        fh, cmd, in_size, out_size = op.fh, op.cmd, op.in_size, op.out_size
        handle = self.handle(fh)
        node = self.lower.inode(op.nodeid)
        flags = self.effective(self.match_node(node.nodeid), op.pid, node)
        if not (flags.control or flags.notify):
            return self.down.ioctl(op)
        path = handle.path if handle else self.abspath(node.nodeid)
        origin = self.origin(op)
        data = op.data
        fields: dict[str, Any] = dict(file_name=path, io_control_code=cmd, input_buffer=data,
                                      input_buffer_length=in_size, output_buffer_length=out_size)
        before = self.fire(ev.CBFilterBeforeIoctlEventParams, c.FS_CE_BEFORE_IOCTL, flags, origin, **fields)
        if before is not None and not before.process_request:
            return IoctlOut(0, bytes(before.output_buffer or b"")[:out_size])
        reply, error = self._served(lambda: self.down.ioctl(op))
        self.fire(ev.CBFilterAfterIoctlEventParams, c.FS_CE_AFTER_IOCTL, flags, origin, status=error, **fields)
        self.notify(ev.CBFilterNotifyIoctlEventParams, c.FS_NE_IOCTL, flags, origin, status=error, **fields)
        if error or reply is None:
            raise OSError(error, os.strerror(error))
        return reply


_ALL_CONTROL = (1 << 64) - 1


def _is_dir(dir_fd: int, name: bytes) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _link_target(value: object) -> bytes:
    """A symlink target a handler supplied: str (file system encoding), bytes-like, or None/empty."""
    if not value:
        raise OSError(errno.EIO, "the event handler completed readlink without a target")
    if isinstance(value, str):
        return os.fsencode(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise OSError(errno.EIO, f"the event handler gave a {type(value).__name__} as the link target")
