"""The records of a mount's stack: one node per kernel inode, one handle per open, each with a slot per layer,
and the file backend a handle reads and writes through."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import Any

from fsfilter._system import libc


class Inode:
    """One node the kernel knows: an O_PATH fd of the lower object, its lookup count, its last known name (for
    paths), its passthrough state, and a slot per layer (``slots``, keyed by the layer) dropped with the node."""

    __slots__ = ("nodeid", "fd", "key", "nlookup", "parent", "name", "backing_id", "backing_refs", "daemon_opens",
                 "cache_sig", "slots", "view")

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
        self.view: View | None = None  # set on a node that is one process's own view of an object (see View)


class View:
    """One process's own node for a lower object (isolation) or for a virtual file.

    The kernel keeps page cache, attributes and the I/O mode (passthrough or not) per node; a view is a node of its
    own, so what one process sees of a file never leaks into what another sees. LOOKUPs by the ``owner``'s threads
    return the view's node (see LowerBase.routed), everybody else's the object's own; entries of routed objects
    are never cached, so that each path walk asks again. The view's node reads and writes ``fd`` (an O_PATH fd of
    the object itself, of another file it is redirected to, or a virtual file's memfd); ``handled``: the handlers of
    ``layer`` serve its requests (``fd`` is then where what they leave undone goes)."""

    __slots__ = ("owner", "pidfd", "fd", "backend", "handled", "of", "layer", "node", "origin_fd", "gone", "transform",
                 "admits")

    def __init__(self, owner: int, pidfd: int, fd: int, backend: str, handled: bool, of: tuple[int, int],
                 layer: object, origin_fd: int = -1) -> None:
        self.owner = owner  # a process (tgid)
        self.pidfd = pidfd  # the owner's pidfd: a reused pid is not the owner
        self.fd = fd  # owned by the view; a node gets a dup of it
        self.backend = backend  # what the handler asked for: "" (handlers), a path, or SELF
        self.handled = handled
        self.of = of  # the (st_dev, st_ino) of the object this is a view of (a virtual file's own key)
        self.layer = layer  # the layer whose decision made the view
        self.node: Inode | None = None  # the node the kernel knows for the view now (None: none yet)
        self.origin_fd = origin_fd  # an O_PATH fd of the object itself (-1 for a virtual file), owned
        self.gone = False  # the layer left: requests on the view's node fail
        # A view that shows its file transformed (an encrypted file's plaintext): ``backend(fd, flags)`` gives the
        # file backend of an open of it from a read-write fd of the stored file, ``shown(st)`` its attributes.
        self.transform: Any = None
        # A view shared by every process this says yes to (owner 0, no pidfd): all trusted processes share one
        # plaintext view of an encrypted file, and so its page cache.
        self.admits: Callable[[int], bool] | None = None

    SELF = "\0self"  # backend: the object itself, in a node (and cache) of the view's own

    def close(self) -> None:
        for fd in (self.fd, self.origin_fd, self.pidfd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self.origin_fd = self.pidfd = -1


class Virtual:
    """A file that exists in no lower directory: a name the bottom adds to a directory (LOOKUP and listings), whose
    data lives in a memfd (``store``) unless the handlers of ``layer`` serve it. Every process gets a view of its
    own (``views``, by tgid)."""

    __slots__ = ("key", "parent_key", "name", "store", "layer", "views", "mode")

    def __init__(self, key: tuple[int, int], parent_key: tuple[int, int], name: bytes, store: int, layer: object,
                 mode: int) -> None:
        self.key = key
        self.parent_key = parent_key
        self.name = name
        self.store = store
        self.layer = layer
        self.views: dict[int, View] = {}
        self.mode = mode


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


class GoneFile:
    """The backend of an open whose view's layer left: every request fails (never waits for handlers that are gone)."""

    def _gone(self, *args: object) -> Any:
        raise OSError(errno.EIO, "the filter that served this file has stopped")

    read = readinto = write = size = truncate = fsync = allocate = _gone

    def passthrough_fd(self) -> int | None:
        return None


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
