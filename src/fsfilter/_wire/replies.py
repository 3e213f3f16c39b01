"""Typed FUSE replies: what the layers of a filter stack return, encoded once by the session.

A layer changes a reply by changing its fields (timeouts, attributes, a listing's entries), never by patching
bytes another layer produced. Pure codecs: no syscalls.
"""

from __future__ import annotations

import errno
import os

from fsfilter._abi import fuse as abi
from fsfilter._wire import fuse as wire
from fsfilter._wire.fuse import StatLike


class StatView:
    """Attributes with some fields changed (sizes an event handler set, a directory's hidden link count)."""

    __slots__ = ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blocks",
                 "st_blksize", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")

    def __init__(self, st: StatLike, *, size: int | None = None, blocks: int | None = None,
                 nlink: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None,
                 ctime_ns: int | None = None) -> None:
        self.st_ino: int = st.st_ino
        self.st_mode: int = st.st_mode
        self.st_nlink: int = st.st_nlink if nlink is None else nlink
        self.st_uid: int = st.st_uid
        self.st_gid: int = st.st_gid
        self.st_rdev: int = st.st_rdev
        self.st_size: int = st.st_size if size is None else size
        self.st_blocks: int = st.st_blocks if blocks is None else blocks
        self.st_blksize: int = st.st_blksize
        self.st_atime_ns: int = st.st_atime_ns if atime_ns is None else atime_ns
        self.st_mtime_ns: int = st.st_mtime_ns if mtime_ns is None else mtime_ns
        self.st_ctime_ns: int = st.st_ctime_ns if ctime_ns is None else ctime_ns


class Reply:
    __slots__ = ()

    def encode(self) -> bytes:
        raise NotImplementedError


class Empty(Reply):
    """A reply with no payload (success of UNLINK, FLUSH, RELEASE, ...)."""

    __slots__ = ()

    def encode(self) -> bytes:
        return b""


EMPTY = Empty()


class Entry(Reply):
    """LOOKUP, MKDIR, MKNOD, SYMLINK, LINK: the node the name resolves to. ``nodeid`` 0 with ``attr`` None is a
    negative entry: "no such name", cached for ``entry_timeout``."""

    __slots__ = ("nodeid", "attr", "entry_timeout", "attr_timeout")

    def __init__(self, nodeid: int, attr: StatLike | None, entry_timeout: float, attr_timeout: float) -> None:
        self.nodeid = nodeid
        self.attr = attr
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout

    def uncached(self) -> None:
        """Make the kernel ask again at every use of the name (a per-request rule may answer differently)."""
        self.entry_timeout = self.attr_timeout = 0.0

    def encode(self) -> bytes:
        if self.attr is None:
            return wire.encode_negative_entry(self.entry_timeout) if self.nodeid == 0 else bytes(abi.ENTRY_OUT_SIZE)
        return wire.encode_entry(self.nodeid, self.attr, self.entry_timeout, self.attr_timeout)


class Attr(Reply):
    __slots__ = ("attr", "timeout")

    def __init__(self, attr: StatLike, timeout: float) -> None:
        self.attr = attr
        self.timeout = timeout

    def encode(self) -> bytes:
        return wire.encode_attr_out(self.attr, self.timeout)


class Opened(Reply):
    """OPEN, OPENDIR: the handle and the FOPEN_* flags; ``backing_id`` for kernel passthrough."""

    __slots__ = ("fh", "flags", "backing_id")

    def __init__(self, fh: int, flags: int = 0, backing_id: int = 0) -> None:
        self.fh = fh
        self.flags = flags
        self.backing_id = backing_id

    def encode(self) -> bytes:
        return wire.encode_open_out(self.fh, self.flags, self.backing_id)


class Created(Reply):
    """CREATE, TMPFILE: the new object's entry, then its open."""

    __slots__ = ("entry", "opened")

    def __init__(self, entry: Entry, opened: Opened) -> None:
        self.entry = entry
        self.opened = opened

    def encode(self) -> bytes:
        return self.entry.encode() + self.opened.encode()


class Data(Reply):
    """READ, READLINK, a GETXATTR value or LISTXATTR names."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = data

    def encode(self) -> bytes:
        # A buffer goes out as it is (os.writev takes any): a READ's megabyte is not copied once more.
        return self.data  # type: ignore[return-value]


class Written(Reply):
    """WRITE, COPY_FILE_RANGE: the count done."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size

    def encode(self) -> bytes:
        return wire.encode_write_out(self.size)


class XattrSize(Reply):
    """The answer to a GETXATTR/LISTXATTR size probe (size 0)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size

    def encode(self) -> bytes:
        return abi.GETXATTR_OUT.pack(self.size, 0)


def xattr_reply(value: bytes, size: int) -> Reply:
    """The reply to a GETXATTR/LISTXATTR: the size when probed (``size`` 0), else the value if it fits."""
    if size == 0:
        return XattrSize(len(value))
    if len(value) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    return Data(value)


class Statfs(Reply):
    __slots__ = ("stat",)

    def __init__(self, stat: os.statvfs_result) -> None:
        self.stat = stat

    def encode(self) -> bytes:
        return wire.encode_statfs(self.stat)


class LockOut(Reply):
    """GETLK: the conflicting lock, or F_UNLCK over the asked range."""

    __slots__ = ("start", "end", "kind", "pid")

    def __init__(self, start: int, end: int, kind: int, pid: int) -> None:
        self.start, self.end, self.kind, self.pid = start, end, kind, pid

    def encode(self) -> bytes:
        return abi.LK_OUT.pack(self.start, self.end, self.kind, self.pid)


class Offset(Reply):
    """LSEEK."""

    __slots__ = ("offset",)

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def encode(self) -> bytes:
        return abi.LSEEK_OUT.pack(self.offset)


class IoctlOut(Reply):
    __slots__ = ("result", "data")

    def __init__(self, result: int, data: bytes = b"") -> None:
        self.result = result
        self.data = data

    def encode(self) -> bytes:
        return abi.IOCTL_OUT.pack(self.result, 0, 0, 0) + self.data


class DirEntry:
    """One listed name. With READDIRPLUS, ``entry`` is its lookup (None: the kernel gets the name alone and
    looks it up when used; ``nodeid`` then says which node's lookup count, if any, must be given back)."""

    __slots__ = ("name", "ino", "next_offset", "dtype", "entry", "attr")

    def __init__(self, name: bytes, ino: int, next_offset: int, dtype: int, entry: Entry | None = None,
                 attr: StatLike | None = None) -> None:
        self.name = name
        self.ino = ino
        self.next_offset = next_offset
        self.dtype = dtype
        self.entry = entry
        self.attr = attr  # the lower object's attributes when known (READDIRPLUS, or read for an event)

    def size(self, plus: bool) -> int:
        return wire.dirent_size(self.name) + (abi.ENTRY_OUT_SIZE if plus else 0)

    def encode(self, plus: bool) -> bytes:
        ino = self.attr.st_ino if (plus and self.entry is not None and self.attr is not None) else self.ino
        dirent = wire.encode_dirent(ino, self.next_offset, self.dtype, self.name)
        if not plus:
            return dirent
        head = self.entry.encode() if self.entry is not None else bytes(abi.ENTRY_OUT_SIZE)
        return head + dirent


class Listing(Reply):
    """READDIR, READDIRPLUS: the entries that fit the caller's buffer (none at the end of the directory)."""

    __slots__ = ("entries", "plus")

    def __init__(self, entries: list[DirEntry], plus: bool) -> None:
        self.entries = entries
        self.plus = plus

    def encode(self) -> bytes:
        return b"".join(e.encode(self.plus) for e in self.entries)
