"""Layers of a filter stack: the base every layer above the pass-through derives from.

A mount has one stack: the pass-through (``LowerFS``) at the bottom, then layers in altitude order. The
session hands each typed operation to the top layer. A layer's method for an operation does its
pre-operation work, calls the same method of ``self.down`` (the layer below, or the bottom) to have the
request served, does its post-operation work on the typed reply, and returns it; a layer that denies or
completes a request returns or raises without calling down, and the layers below never see it. Methods a
layer does not override pass the operation down unchanged.

Some questions are asked by the bottom while it serves a request, of every layer (``hooks``): where a name
really lives (reparse), what attributes a node shows, whether a file's reads and writes must reach the daemon,
which FOPEN_* flags an open gets, and what becomes of each listed name. ``StackHooks`` asks them of a list of
layers; a bottom without a stack asks nobody.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from fsfilter._sessions.nodes import Inode
from fsfilter._wire import ops
from fsfilter._wire.fuse import StatLike
from fsfilter._wire.replies import DirEntry, Reply


class Layer:
    """A layer of a filter stack. ``down`` is set when the layer joins a stack (and changes as others join or
    leave); an operation already passed down keeps the layer it was passed to."""

    def takes_requests(self) -> bool:
        """Whether the layer is in the path of requests now. One that is not (a filter with no rule yet) is left
        out of the chain, so it costs nothing; the stack asks again when its filter's rules change."""
        return True

    def __init__(self) -> None:
        self.down: Layer = self  # until the layer joins a stack; the bottom (LowerFS) keeps it so

    # -- operations: by default, served below unchanged

    def lookup(self, op: ops.Lookup) -> Reply:
        return self.down.lookup(op)

    def forget(self, op: ops.Forget) -> Reply | None:
        return self.down.forget(op)

    def batch_forget(self, op: ops.BatchForget) -> Reply | None:
        return self.down.batch_forget(op)

    def getattr(self, op: ops.Getattr) -> Reply:
        return self.down.getattr(op)

    def setattr(self, op: ops.Setattr) -> Reply:
        return self.down.setattr(op)

    def readlink(self, op: ops.Plain) -> Reply:
        return self.down.readlink(op)

    def symlink(self, op: ops.Symlink) -> Reply:
        return self.down.symlink(op)

    def mknod(self, op: ops.Mknod) -> Reply:
        return self.down.mknod(op)

    def mkdir(self, op: ops.Mkdir) -> Reply:
        return self.down.mkdir(op)

    def unlink(self, op: ops.Remove) -> Reply:
        return self.down.unlink(op)

    def rmdir(self, op: ops.Remove) -> Reply:
        return self.down.rmdir(op)

    def rename(self, op: ops.Rename) -> Reply:
        return self.down.rename(op)

    def link(self, op: ops.Link) -> Reply:
        return self.down.link(op)

    def open(self, op: ops.Open) -> Reply:
        return self.down.open(op)

    def create(self, op: ops.Create) -> Reply:
        return self.down.create(op)

    def tmpfile(self, op: ops.Create) -> Reply:
        return self.down.tmpfile(op)

    def read(self, op: ops.Read) -> Reply:
        return self.down.read(op)

    def write(self, op: ops.Write) -> Reply:
        return self.down.write(op)

    def flush(self, op: ops.Flush) -> Reply:
        return self.down.flush(op)

    def release(self, op: ops.Release) -> Reply:
        return self.down.release(op)

    def fsync(self, op: ops.Fsync) -> Reply:
        return self.down.fsync(op)

    def opendir(self, op: ops.Open) -> Reply:
        return self.down.opendir(op)

    def readdir(self, op: ops.Read) -> Reply:
        return self.down.readdir(op)

    def releasedir(self, op: ops.Release) -> Reply:
        return self.down.releasedir(op)

    def fsyncdir(self, op: ops.Fsync) -> Reply:
        return self.down.fsyncdir(op)

    def statfs(self, op: ops.Plain) -> Reply:
        return self.down.statfs(op)

    def access(self, op: ops.Access) -> Reply:
        return self.down.access(op)

    def setxattr(self, op: ops.Setxattr) -> Reply:
        return self.down.setxattr(op)

    def getxattr(self, op: ops.Getxattr) -> Reply:
        return self.down.getxattr(op)

    def removexattr(self, op: ops.Removexattr) -> Reply:
        return self.down.removexattr(op)

    def fallocate(self, op: ops.Fallocate) -> Reply:
        return self.down.fallocate(op)

    def lseek(self, op: ops.Lseek) -> Reply:
        return self.down.lseek(op)

    def copy_file_range(self, op: ops.CopyFileRange) -> Reply:
        return self.down.copy_file_range(op)

    def ioctl(self, op: ops.Ioctl) -> Reply:
        return self.down.ioctl(op)

    def getlk(self, op: ops.Lock) -> Reply:
        return self.down.getlk(op)

    def setlk(self, op: ops.Lock) -> Reply | None:
        return self.down.setlk(op)

    def setlkw(self, op: ops.Lock) -> Reply | None:
        return self.down.setlkw(op)

    def syncfs(self, op: ops.Plain) -> Reply:
        return self.down.syncfs(op)

    def destroy(self, op: ops.Plain) -> Reply:
        return self.down.destroy(op)

    # -- what the bottom asks every layer while it serves (see StackHooks)

    def where(self, op: ops.Op | None, parent: Inode, name: bytes) -> tuple[int, bytes, bool] | None:
        """Where the name ``name`` in ``parent`` really lives: (directory fd, name, whether the caller closes
        the fd), or None when this layer does not redirect it. ``op`` is None for names the bottom resolves
        on its own (READDIRPLUS entries): then no event may fire."""
        return None

    def shown(self, nodeid: int, st: StatLike) -> StatLike:
        """The attributes replies show for a node (e.g. a directory's link count, which would reveal hidden
        subdirectories)."""
        return st

    def remembered(self, node: Inode) -> None:
        """The bottom gave the kernel a (new or known) node for a name."""

    def dropped(self, nodeid: int) -> None:
        """The kernel forgot a node: drop what the layer keeps about it (beyond its slot, which goes anyway)."""

    def left(self) -> None:
        """The layer left its stack (requests it was serving may still finish): let go of what it keeps."""

    def needs_io(self, node: Inode, st: os.stat_result) -> bool:
        """Whether this layer must see the reads and writes of the file (no kernel passthrough for it)."""
        return False

    def open_reply_flags(self, node: Inode, flags: int, passthrough: bool) -> int:
        """The FOPEN_* flags of an open of ``node`` (e.g. direct I/O, or FLUSH wanted on every close)."""
        return flags

    def listed(self, op: ops.Read, parent: Inode, entry: DirEntry) -> DirEntry | None:
        """One name of a listing, on its way up (from the lowest layer up): the entry as this layer shows it,
        or None to leave it out."""
        return entry


class StackHooks:
    """Asks the bottom's questions of the layers of a stack (top first). Replaced, not mutated, when a layer
    joins or leaves, so that a request always sees one consistent list."""

    __slots__ = ("layers", "_where", "_shown", "_io", "_flags", "_listed", "_remembered", "_dropped", "redirects",
                 "shows", "remembers")

    def __init__(self, layers: Sequence[Layer] = ()) -> None:
        self.layers = tuple(layers)
        # Only layers that override a hook are asked it: most stacks have few, and most hooks are on hot paths.
        self._where = self._overriding("where")
        self._shown = self._overriding("shown")
        self._io = self._overriding("needs_io")
        self._flags = tuple(reversed(self._overriding("open_reply_flags")))  # from the bottom up
        self._listed = tuple(reversed(self._overriding("listed")))
        self._remembered = self._overriding("remembered")
        self._dropped = self._overriding("dropped")
        # Whether any layer asks the hooks on the hottest paths (a name resolved, a node given, attributes shown):
        # the bottom skips the call when none does.
        self.redirects = bool(self._where)
        self.shows = bool(self._shown)
        self.remembers = bool(self._remembered)

    def _overriding(self, method: str) -> tuple[Layer, ...]:
        base = getattr(Layer, method)
        return tuple(layer for layer in self.layers if getattr(type(layer), method) is not base)

    def where(self, op: ops.Op | None, parent: Inode, name: bytes) -> tuple[int, bytes, bool]:
        for layer in self._where:  # the highest layer that redirects a name decides where it lives
            found = layer.where(op, parent, name)
            if found is not None:
                return found
        return parent.fd, name, False

    def shown(self, nodeid: int, st: StatLike) -> StatLike:
        for layer in self._shown:
            st = layer.shown(nodeid, st)
        return st

    def needs_io(self, node: Inode, st: os.stat_result) -> bool:
        return any(layer.needs_io(node, st) for layer in self._io)

    def open_reply_flags(self, node: Inode, flags: int, passthrough: bool) -> int:
        for layer in self._flags:
            flags = layer.open_reply_flags(node, flags, passthrough)
        return flags

    @property
    def lists(self) -> bool:
        return bool(self._listed)

    def listed(self, op: ops.Read, parent: Inode, entry: DirEntry) -> DirEntry | None:
        for layer in self._listed:
            kept = layer.listed(op, parent, entry)
            if kept is None:
                return None
            entry = kept
        return entry

    def remembered(self, node: Inode) -> None:
        for layer in self._remembered:
            layer.remembered(node)

    def dropped(self, nodeid: int) -> None:
        for layer in self._dropped:
            layer.dropped(nodeid)


NO_HOOKS = StackHooks()
