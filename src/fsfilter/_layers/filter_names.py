"""A CBFilter layer's name operations: lookups, reparse rules, the attributes a node shows.
"""

from __future__ import annotations

import errno
import os
import stat

from fsfilter._layers.filter_isolation import IsolationOps
from fsfilter._layers.filter_naming import FilterNaming
from fsfilter._sessions.nodes import Inode
from fsfilter._wire import ops
from fsfilter._wire.fuse import StatLike
from fsfilter._wire.replies import (
    Attr,
    Entry,
    Reply,
    StatView,
)
from fsfilter.api import constants as c
from fsfilter.api import params as ev


class NameOps(FilterNaming, IsolationOps):
    """Names: lookups (a before-open handler may hide a name), reparse rules, the attributes shown."""

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
        # Another filter of this process whose rules restrict the target would never see the requests that reach it
        # through the redirect (the daemon's own requests pass unfiltered): refuse them, as its rules would.
        core.check_redirect(target)
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

    def lookup(self, op: ops.Lookup) -> Reply:
        if not self.reaches(op.nodeid):
            return self._viewed(op, self.down.lookup(op))
        parent = self.lower.inode(op.nodeid)
        name = op.name
        path = self.child_path(parent.nodeid, name)
        m = self.name_match(op, name)
        flags = self.effective(m, op.pid, parent=parent, name=name)
        if flags.access & c.ACCESS_DENY_ALL and not (flags.control & c.FS_CE_BEFORE_OPEN
                                                     and self.core.handler("before_open_file")):
            self._refuse(op, "deny all")
        if flags.control & c.FS_CE_BEFORE_OPEN:
            # Resolving a name is Linux's equivalent of Windows opening a file to read its attributes: a
            # before-open handler sees it (desired_access FILE_READ_ATTRIBUTES, flags O_PATH) and can refuse
            # it, so that a hidden name stays hidden from stat and path walks, not only from open.
            self._fire_lookup(op, flags, path)
        policy = self.encryption()
        encrypting = policy is not None and policy.applies(path)
        if encrypting and self.trusted_for_encryption(op.pid):
            self.route_encrypted(op, parent, name, path)
        reply = self._viewed(op, self.down.lookup(op))
        if encrypting and isinstance(reply, Entry):
            reply.uncached()  # trusted and untrusted processes see different sizes: never cached for all
        if m is not None and isinstance(reply, Entry):
            self._keep_match(reply, m)
            if self._volatile(m):
                reply.uncached()
        return reply

    def _viewed(self, op: ops.Op, reply: Reply) -> Reply:
        """A LOOKUP that gave a handler-served view of this layer's: the attributes its handlers give."""
        if isinstance(reply, Entry) and reply.attr is not None and reply.nodeid in self.lower.nodes:
            node = self.lower.nodes[reply.nodeid]
            if self.handled(node):
                reply.attr = self.query_view(op, node, reply.attr)
        return reply

    def shown(self, nodeid: int, st: StatLike) -> StatLike:
        if stat.S_ISDIR(st.st_mode) and self._hiding_children(nodeid):
            # A directory's link count counts its subdirectories, and its size grows with its entries (tmpfs: 20
            # bytes each): both would give hidden names away. Link count 1 is what file systems without
            # subdirectory counts (btrfs) report, and find(1) copes with it; the size shown is one block's.
            return StatView(st, size=4096, blocks=8, nlink=1)
        return st

    def remembered(self, node: Inode) -> None:
        naming = getattr(self._naming, "entry", None)
        if naming is not None and naming[0] == node.parent and naming[1] == node.name:
            # The new node's path was just matched: cache it before the open reply asks for it.
            self.state_of(node).match = (self._generation(), naming[2])

    def getattr(self, op: ops.Getattr) -> Reply:
        reply = self.down.getattr(op)
        node = self.lower.nodes.get(op.nodeid)
        if node is not None and self.handled(node) and isinstance(reply, Attr):
            reply.attr = self.query_view(op, node, reply.attr)
            return reply
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
        p = self.fire(ev.CBFilterAfterGetFileSizesEventParams, c.FS_CE_AFTER_GET_SIZES, flags, origin, file_name=path,
                      size=size, allocation_size=alloc, file_context=self.file_context(op.nodeid))
        timeout = self.lower.attr_timeout(self.lower.inode(op.nodeid))
        if p is not None:
            size, alloc, timeout = int(p.size), int(p.allocation_size), 0.0
        self.notify(ev.CBFilterNotifyGetFileSizesEventParams, c.FS_NE_GET_SIZES, flags, origin, file_name=path,
                    size=size, allocation_size=alloc)
        if p is None:
            return reply
        return Attr(self.lower.attributes(op.nodeid, StatView(st, size=size, blocks=(alloc + 511) // 512)), timeout)
