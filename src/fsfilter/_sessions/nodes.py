"""The records of a mount's stack: one node per kernel inode, one handle per open, each with a slot per layer,
and the file backend a handle reads and writes through."""

from __future__ import annotations

import os
import threading
from typing import Any

from fsfilter._system import libc


class Inode:
    """One node the kernel knows: an O_PATH fd of the lower object, its lookup count, its last known name (for
    paths), its passthrough state, and a slot per layer (``slots``, keyed by the layer) dropped with the node."""

    __slots__ = ("nodeid", "fd", "key", "nlookup", "parent", "name", "backing_id", "backing_refs", "daemon_opens",
                 "cache_sig", "slots")

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
        self.slots: dict[object, Any] = {}


class LowerFile:
    """The file backend the bottom installs on every open: the lower file's own fd. A layer may replace a handle's
    backend at OPEN (isolation, encryption, virtual files) with any object that has these methods;
    ``passthrough_fd`` says which fd the kernel may read and write directly (None: every read and write must
    reach the daemon)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def readinto(self, buf: memoryview, offset: int) -> int:
        return os.preadv(self.fd, [buf], offset)

    def write(self, data: bytes | memoryview, offset: int) -> int:
        return os.pwrite(self.fd, data, offset)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def fsync(self, datasync: bool) -> None:
        if datasync:
            os.fdatasync(self.fd)
        else:
            os.fsync(self.fd)

    def allocate(self, mode: int, offset: int, length: int) -> None:
        libc.fallocate(self.fd, mode, offset, length)

    def passthrough_fd(self) -> int | None:
        return self.fd


class OpenFile:
    """One open of a file: the lower fd (its number is the handle), its node, its backend, how its reads and
    writes are served (None until the whole stack has answered the OPEN), and a slot per layer."""

    __slots__ = ("fd", "inode", "passthrough", "backend", "st", "slots", "flags")

    def __init__(self, fd: int, inode: Inode, st: os.stat_result, flags: int = os.O_RDONLY) -> None:
        self.fd = fd
        self.flags = flags  # as the lower file was opened (what a rescuer opens it with again)
        self.inode = inode
        self.passthrough: bool | None = None
        self.backend: Any = LowerFile(fd)
        self.st = st  # the lower file's attributes at open (mtime and size say whether the page cache is good)
        self.slots: dict[object, Any] = {}


class OpenDir:
    """One open of a directory: its fd (the handle), where the listing stands, and a slot per layer."""

    __slots__ = ("fd", "pos", "pending", "lock", "reader", "slots", "nodeid")

    def __init__(self, fd: int, nodeid: int = 0) -> None:
        self.nodeid = nodeid
        self.slots: dict[object, Any] = {}
        self.fd = fd
        self.pos = 0  # the offset the next entry in ``pending`` starts at
        self.pending: list[tuple[int, int, int, bytes]] = []
        self.lock = threading.Lock()
        self.reader = libc.DirentReader(32768)
