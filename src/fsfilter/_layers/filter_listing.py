"""A CBFilter layer's directory listings.
"""

from __future__ import annotations

import os
from typing import Any

from fsfilter._engine.dispatch import Origin
from fsfilter._engine.rules import Flags, attributes_from_stat
from fsfilter._layers.filter_base import (
    FilterBase,
    Handle,
)
from fsfilter._sessions.nodes import Inode
from fsfilter._wire import ops
from fsfilter._wire.replies import (
    DirEntry,
    Listing,
    Reply,
    StatView,
)
from fsfilter.api import constants as c
from fsfilter.api import params as ev


class ListingOps(FilterBase):
    """Directory listings: the Before event at the start of a listing, each entry's After event on its way up."""

    def readdir(self, op: ops.Read) -> Reply:
        """READDIR and READDIRPLUS: the Before event at the start of a listing; each entry's After event comes
        in ``listed``, as the bottom passes the entry up."""
        if not self.reaches(op.nodeid):
            return self.down.readdir(op)
        node = self.lower.inode(op.nodeid)
        m = self.match_node(node.nodeid)
        flags = self.effective(m, op.pid, node)
        handle = self.handle(op.fh)
        origin = self.origin(op)
        op.remember((self, "listing"), (flags, origin, handle))
        if handle is not None and (flags.control & (c.FS_CE_BEFORE_ENUMERATE_DIRECTORY
                                                    | c.FS_CE_AFTER_ENUMERATE_DIRECTORY)
                                   or flags.notify & c.FS_NE_ENUMERATE_DIRECTORY):
            if op.offset == 0:
                before = self.fire(ev.CBFilterBeforeEnumerateDirectoryEventParams, c.FS_CE_BEFORE_ENUMERATE_DIRECTORY,
                                   flags, origin, directory_name=handle.path, file_name_mask="*",
                                   directory_context=self.file_context(node.nodeid), handle_context=handle.context,
                                   enumeration_context=handle.enum_context, restart=handle.enumerated)
                if before is not None:
                    handle.enum_context = int(before.enumeration_context)
                    if not before.process_request:
                        return Listing([], op.plus)
            handle.enumerated = True
        return self.down.readdir(op)

    def listed(self, op: ops.Read, parent: Inode, entry: DirEntry) -> DirEntry | None:
        policy = getattr(self.core, "encryption", None)
        if policy is not None and entry.entry is not None and policy.applies(self.child_path(parent.nodeid,
                                                                                             entry.name)):
            entry.entry = None  # (an encrypted file's size depends on who asks: the kernel looks each name up)
        state: tuple[Flags, Origin, Handle | None] | None = op.recall((self, "listing"))
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

    def _enumerated(self, handle: Handle | None, parent: Inode, entry: DirEntry, flags: Flags,
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
        after = self.fire(ev.CBFilterAfterEnumerateDirectoryEventParams, c.FS_CE_AFTER_ENUMERATE_DIRECTORY, flags,
                          origin, directory_context=self.file_context(parent.nodeid),
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
        self.notify(ev.CBFilterNotifyEnumerateDirectoryEventParams, c.FS_NE_ENUMERATE_DIRECTORY, flags, origin,
                    **fields)
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
