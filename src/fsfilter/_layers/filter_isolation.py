"""A CBFilter layer's isolation and virtual files.

A before-open handler that sets ``isolate`` gives the opening process a view of the file of its own: a node of its
own (see sessions/nodes.py, View), so that its page cache, attributes, I/O mode and mmap never mix with what other
processes see of the same path. The kernel chose the node of an OPEN at LOOKUP, before the handler decided; so the
first isolated open of a file by a process is answered ESTALE once, after the view is routed: the kernel walks the
path again with LOOKUP_REVAL, gets the view's node, and opens that (the handler's decision is kept for that retry,
so the handler is not asked twice). When the retry lands on the same node again (a reopen through
/proc/PID/fd, which walks no names), the open is served on that node as it is, with the view's backend and no
page cache.

``backend_file_name`` says what the view reads and writes: the file's own name (the default) = the file itself,
in a cache of the view's own (and kernel passthrough); another path = that file; "" = the handlers
(on_before_read_file, on_before_write_file, on_before_query_file_info, on_before_set_file_info fire for every
request of the view, rule or no rule; what a handler leaves undone acts on the file itself). Virtual files are
views of a memfd, one per process, always handler-served.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from fsfilter._engine.rules import Flags
from fsfilter._layers.filter_base import FilterBase, Handle
from fsfilter._sessions.lower_base import OPENED
from fsfilter._sessions.nodes import Inode, OpenFile, View
from fsfilter._system import libc, procfs
from fsfilter._wire import ops
from fsfilter._wire.fuse import StatLike
from fsfilter._wire.replies import Created, Opened, StatView
from fsfilter.api import constants as c
from fsfilter.api import fileinfo
from fsfilter.api import params as ev

# The control events a handler-served view fires for every request, whatever the rules say.
HANDLED_CONTROL = (c.FS_CE_BEFORE_READ | c.FS_CE_BEFORE_WRITE | c.FS_CE_BEFORE_QUERY_FILE_INFO
                   | c.FS_CE_BEFORE_SET_FILE_INFO | c.FS_CE_BEFORE_GET_SECURITY | c.FS_CE_BEFORE_SET_SECURITY)
VIRTUAL_CONTROL = HANDLED_CONTROL | c.FS_CE_BEFORE_OPEN | c.FS_CE_BEFORE_CREATE | c.FS_CE_BEFORE_DELETE

_PENDING_FOR = 5.0  # seconds a decision waits for the open the kernel retries

# The backend of a view that shows an encrypted file's plaintext (see EncryptionPolicy).
ENCRYPTED = "\0encrypted"


class EncryptionPolicy(Protocol):
    """What CBEncrypt tells the layer of its filter: which paths its rules cover, which processes are trusted, and
    how to read an encrypted file. Trusted processes get a view of each encrypted file under a rule that shows its
    plaintext (View.transform); everyone else gets the file as stored."""

    refuse_untrusted_writes: bool

    def applies(self, path: str) -> bool: ...
    def trusted(self, tid: int) -> bool: ...
    def is_encrypted(self, fd: int) -> bool: ...
    def transform(self, fd: int, path: str) -> Any: ...
    def new_file(self, path: str) -> bytes: ...

_STANDARD = struct.Struct("<qqIBB2x")  # FileStandardInformation: allocation, end of file, links, delete pending, dir
_BASIC = struct.Struct("<qqqqI4x")  # FileBasicInformation: creation, access, write, change (FILETIME); attributes
_INT64 = struct.Struct("<q")


@dataclass
class Pending:
    """A decision a handler made for an open answered ESTALE: the open the kernel retries takes it."""

    before: Any  # the before-open parameters
    isolate: bool
    backend: str
    until: float


class IsolationOps(FilterBase):
    """Isolation decisions, handler-served views and virtual files."""

    _pending_lock = threading.Lock()

    @property
    def _pending(self) -> dict[tuple[int, tuple[int, int]], Pending]:
        pending: dict[tuple[int, tuple[int, int]], Pending] | None = self.__dict__.get("_pending_opens")
        if pending is None:
            pending = self.__dict__.setdefault("_pending_opens", {})
        return pending

    # -- which node an open must be on

    def owns_view(self, node: Inode) -> bool:
        view = node.view
        return view is not None and view.layer is self

    def handled(self, node: Inode) -> bool:
        """Whether this layer's handlers serve every request of the node (a handler-served view or virtual file)."""
        view = node.view
        return view is not None and view.handled and view.layer is self

    def take_pending(self, tid: int, node: Inode) -> Pending | None:
        """The decision kept for the open thread ``tid`` retries on ``node`` (or on another node of its object)."""
        if not self._pending:
            return None
        key = node.view.of if node.view is not None else node.key
        with self._pending_lock:
            pending = self._pending.pop((tid, key), None)
            now = time.monotonic()
            for stale in [k for k, p in self._pending.items() if p.until < now]:
                del self._pending[stale]
        return pending if pending is not None and pending.until >= now else None

    def wanted_view(self, before: Any, path: str, node: Inode) -> tuple[bool, str]:
        """What an open's before-open parameters ask for: (isolate, backend), backend View.SELF for the file itself."""
        if node.view is not None and node.view.layer is self and node.view.of[0] == 0:
            return True, ""  # a virtual file: always a handler-served view
        if before is None or not before.isolate:
            return False, ""
        backend = str(before.backend_file_name)
        if backend and (os.path.normpath(backend) == path or self._names_itself(backend, node)):
            backend = View.SELF
        return True, backend

    def _names_itself(self, backend: str, node: Inode) -> bool:
        """Whether the path ``backend`` names the very file being opened (another of its names)."""
        try:
            fd = self.core.open_below(backend, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return (st.st_dev, st.st_ino) == (node.view.of if node.view is not None else node.key)

    def view_fits(self, node: Inode, isolate: bool, backend: str, tid: int) -> bool:
        """Whether ``node`` is the node an open by thread ``tid`` with this decision must be on."""
        view = node.view
        if not isolate:
            return view is None
        if view is None or view.layer is not self or view.backend != backend:
            return False
        if view.admits is not None:
            return view.admits(tid)
        return view.owner == tid or libc.is_thread_of(view.owner, tid)

    @staticmethod
    def same_data(node: Inode, isolate: bool, backend: str) -> bool:
        """Whether an open with this decision would read and write what ``node`` does: both the file itself, in its
        own node or a view of it (only their caches differ, and passthrough uses none)."""
        wanted_itself = not isolate or backend == View.SELF
        view = node.view
        return wanted_itself and (view is None or (view.backend == View.SELF and view.of[0] != 0))

    def reroute(self, op: ops.Op, node: Inode, isolate: bool, backend: str, before: Any, path: str) -> None:
        """Route the caller's LOOKUPs of the object to the view it asked for (or back to the object's node), keep the
        decision for the retried open, and make the kernel walk the path again (ESTALE)."""
        lower = self.lower
        key = node.view.of if node.view is not None else node.key
        owner = procfs.tgid(op.pid)
        if key[0] == 0:
            pass  # a virtual file: every process's LOOKUP gets a view of its own already
        elif backend == ENCRYPTED:
            lower.route(self.make_view(0, node, ENCRYPTED, path))
        elif isolate:
            view = self.make_view(owner, node, backend, path)
            lower.route(view)
        else:
            lower.unroute(key, owner)
        with self._pending_lock:
            self._pending[(op.pid, key)] = Pending(before, isolate, backend, time.monotonic() + _PENDING_FOR)
        raise OSError(errno.ESTALE, "isolated: the kernel walks the name again and opens the view's node")

    def make_view(self, owner: int, node: Inode, backend: str, path: str) -> View:
        """A view of ``node``'s object for process ``owner``: its fds opened now (a backend that cannot be opened
        fails the open)."""
        origin = node.view.origin_fd if node.view is not None else node.fd
        if origin < 0:
            raise OSError(errno.EINVAL, "a virtual file has no file of its own to isolate")
        fd = self.backend_fd(backend, origin)
        try:
            origin_fd = os.dup(origin)
            pidfd = os.pidfd_open(owner) if owner else -1
        except BaseException:
            os.close(fd)
            raise
        key = node.view.of if node.view is not None else node.key
        self.serves_views = True
        view = View(owner, pidfd, fd, backend, backend == "", key, self, origin_fd)
        if backend == ENCRYPTED:
            # One plaintext view of the file for every trusted process (owner 0): they share its page cache.
            view.admits = self.trusted_for_encryption
            try:
                view.transform = self._transform(origin, path)
            except BaseException:
                view.close()
                raise
        return view

    # -- encryption (CBEncrypt): views of encrypted files for trusted processes

    def encryption(self) -> EncryptionPolicy | None:
        policy: EncryptionPolicy | None = getattr(self.core, "encryption", None)
        return policy

    def trusted_for_encryption(self, tid: int) -> bool:
        """Whether thread ``tid`` gets plaintext: a trusted process, and not the filter's own (its requests pass
        unfiltered, as for every filter, unless FilterOwnRequests)."""
        policy = self.encryption()
        if policy is None or not policy.trusted(tid):
            return False
        return self.core.filter_own_requests or not self.is_own(tid)

    def _readable(self, path_fd: int) -> int:
        return os.open(procfs.fd_path(path_fd), os.O_RDONLY | os.O_CLOEXEC)

    def _transform(self, path_fd: int, path: str) -> Any:
        policy = self.encryption()
        assert policy is not None
        fd = self._readable(path_fd)
        try:
            transform = policy.transform(fd, path)
        finally:
            os.close(fd)
        if transform is None:
            raise OSError(errno.EIO, f"{path} is not an encrypted file any more")
        return transform

    def is_encrypted(self, node: Inode) -> bool:
        policy = self.encryption()
        if policy is None:
            return False
        origin = node.view.origin_fd if node.view is not None else node.fd
        if origin < 0 or not stat.S_ISREG(os.fstat(origin).st_mode):
            return False
        fd = self._readable(origin)
        try:
            return policy.is_encrypted(fd)
        finally:
            os.close(fd)

    def encryption_wanted(self, op: ops.Op, node: Inode, path: str) -> tuple[bool, str] | None:
        """What CBEncrypt's rules ask for an open of ``node`` at ``path``: the plaintext view (a trusted process, an
        encrypted file), the file as stored (False), or nothing to say (None: no encryption rule covers it)."""
        policy = self.encryption()
        if policy is None or not policy.applies(path):
            return None
        if not self.trusted_for_encryption(op.pid):
            return False, ""
        if node.view is not None and node.view.backend == ENCRYPTED:
            return True, ENCRYPTED
        if self.is_encrypted(node):
            return True, ENCRYPTED
        # An empty plain file (another process may have made it there, waiting for a trusted program to save into
        # it) is encrypted before the trusted process writes: it is never filled with plaintext.
        empty = node.view is None and isinstance(op, ops.Open) and op.flags & os.O_ACCMODE != os.O_RDONLY \
            and stat.S_ISREG(os.fstat(node.fd).st_mode) and os.fstat(node.fd).st_size == 0
        if empty and self.encrypt_new(node, path):
            return True, ENCRYPTED
        return False, ""

    def route_encrypted(self, op: ops.Op, parent: Inode, name: bytes, path: str) -> None:
        """A trusted process looks up an encrypted file under a rule: route its lookups to its plaintext view now, so
        that stat and listings show plaintext sizes before any open."""
        lower = self.lower
        dfd, at, owned = lower.locate(None, parent, name)
        try:
            fd = os.open(at, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return  # (the lookup itself says what is wrong)
        finally:
            if owned:
                os.close(dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return
            key = (st.st_dev, st.st_ino)
            existing = lower.view_for(key, op.pid)
            if existing is not None and existing.backend == ENCRYPTED:
                return
            probe = Inode(0, fd, key, parent.nodeid, name)
            if not self.is_encrypted(probe):
                return
            lower.route(self.make_view(0, probe, ENCRYPTED, path))
        finally:
            os.close(fd)

    def encrypt_new(self, node: Inode, path: str) -> bool:
        """A file a trusted process created under a rule: encrypted from its first byte (a header and an empty last
        chunk). False when the file turned out to be another's with data in it (created meanwhile), left alone
        unless it is encrypted already."""
        policy = self.encryption()
        assert policy is not None
        fd = os.open(procfs.fd_path(node.fd), os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size:
                return policy.is_encrypted(fd)
            os.pwrite(fd, policy.new_file(path), 0)
        finally:
            os.close(fd)
        return True

    def backend_fd(self, backend: str, origin: int) -> int:
        """An O_PATH fd of what a view reads and writes."""
        if backend in ("", View.SELF, ENCRYPTED):
            return os.dup(origin)
        if not os.path.isabs(backend) or "\0" in backend:
            raise OSError(errno.EINVAL, f"backend_file_name {backend!r} is not an absolute path")
        fd = self.core.open_below(backend, os.O_PATH | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"backend_file_name {backend!r} is not a regular file")
            if st.st_dev == self._mount_device():
                # Reached through this very mount (a symlink into it): the daemon would serve its own requests.
                raise OSError(errno.ELOOP, f"backend_file_name {backend!r} leads back into {self.base}, which this "
                                           "filter serves: name a file outside it, or its real path")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _mount_device(self) -> int:
        """The st_dev of the mount this layer serves (the files applications see through it)."""
        dev: int | None = self.__dict__.get("_mount_dev")
        if dev is None:
            dev = self.__dict__.setdefault("_mount_dev", os.stat(self.base).st_dev)
        return dev

    def isolate_created(self, op: ops.Op, reply: Created, before: Any, path: str, backend: str | None = None,
                        truncate: bool = False) -> Created:
        """A create a handler isolated (or an encrypted file's, ``backend`` ENCRYPTED): the new file's own node is
        swapped for the creating process's view of it in the reply (a CREATE reply names the node, so no second walk
        is needed), and the open is made on the view (``truncate``: with O_TRUNC, kept from the lower open)."""
        lower = self.lower
        own = lower.inode(reply.entry.nodeid)
        if backend is None:
            _, backend = self.wanted_view(before, path, own)
        owner = 0 if backend == ENCRYPTED else procfs.tgid(op.pid)  # (encrypted files: one view for all trusted)
        view = self.make_view(owner, own, backend, path)
        lower.route(view)
        flags = getattr(op, "flags", os.O_RDWR) & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
        if truncate:
            flags |= os.O_TRUNC
        # The open on the file's own node is closed below this layer (which never registered it).
        self.down.release(ops.Release.undoing(op, reply.opened.fh))
        node = lower.adopt_view(view, own)
        try:
            reopen = ops.Open.synthetic(op, node.nodeid, flags)
            opened = self.down.open(reopen)
            op.remember(OPENED, reopen.recall(OPENED))  # what the bottom undoes if a layer above refuses the create
        except BaseException:
            lower.forget_one(node.nodeid, 1)
            raise
        assert isinstance(opened, Opened)
        return Created(lower.entry(node, os.fstat(node.fd)), opened)

    def handled_open(self, f: OpenFile) -> bool:
        """Whether this layer's handlers serve the reads and writes of this open (an open of a handler-served view:
        only its owner's opens are ever on it)."""
        return self.handled(f.inode)

    # -- what a handler-served view fires

    def handled_flags(self, flags: Flags) -> Flags:
        return Flags(flags.access, flags.control | HANDLED_CONTROL, flags.notify)

    def query_view(self, op: ops.Op, node: Inode, st: StatLike, handle: Handle | None = None) -> StatLike:
        """The attributes of a handler-served view: what on_before_query_file_info gives for FileStandardInformation
        (size, allocation, links) and FileBasicInformation (times), else the file's (its own, or the memfd's)."""
        if self.core.handler("before_query_file_info") is None:
            return st
        path = self.abspath(node.nodeid)
        origin = self.origin(op)
        flags = Flags(0, c.FS_CE_BEFORE_QUERY_FILE_INFO, 0)
        ctx = self._handle_ctx(node.nodeid, handle)
        size, blocks, nlink = st.st_size, st.st_blocks, st.st_nlink
        times = [st.st_ctime_ns, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns]
        standard = _STANDARD.pack(blocks * 512, size, nlink, 0, 0)
        got = self._query(flags, origin, path, fileinfo.FILE_STANDARD_INFORMATION, standard, ctx)
        if got is not None and len(got) >= 16:
            alloc, size = struct.unpack_from("<qq", got)
            blocks = (max(alloc, 0) + 511) // 512
            if len(got) >= 20:
                nlink = max(1, struct.unpack_from("<I", got, 16)[0])
        basic = _BASIC.pack(*(fileinfo.filetime(t) for t in times), 0)
        got = self._query(flags, origin, path, fileinfo.FILE_BASIC_INFORMATION, basic, ctx)
        if got is not None and len(got) >= 32:
            for i, ft in enumerate(struct.unpack_from("<qqqq", got)):
                if ft > 0:
                    times[i] = fileinfo.ns_from_filetime(ft)
        return StatView(st, size=max(size, 0), blocks=blocks, nlink=nlink, atime_ns=times[1], mtime_ns=times[2],
                        ctime_ns=times[3])

    def _query(self, flags: Flags, origin: Any, path: str, info_class: int, prefill: bytes,
               ctx: dict[str, Any]) -> bytes | None:
        buf = ctypes.create_string_buffer(prefill, len(prefill))
        view = memoryview(buf).cast("B")
        p = self.fire(ev.CBFilterBeforeQueryFileInfoEventParams, c.FS_CE_BEFORE_QUERY_FILE_INFO, flags, origin, None,
                      None, file_name=path, file_information_class=info_class,
                      buffer=ctypes.c_void_p(ctypes.addressof(buf)), buffer_length=len(prefill), buffer_view=view,
                      valid_bytes=0, **ctx)
        if p is None or p.process_request:
            return None
        return bytes(view[:max(0, min(len(prefill), int(p.valid_bytes) or len(prefill)))])

    def set_view_info(self, op: ops.Op, node: Inode, info_class: int, data: bytes, handle: Handle | None) -> bool:
        """Fire on_before_set_file_info for a handler-served view; True when the handler completed the change."""
        if self.core.handler("before_set_file_info") is None:
            return False
        buf = ctypes.create_string_buffer(data, len(data))
        view = memoryview(buf).cast("B")
        p = self.fire(ev.CBFilterBeforeSetFileInfoEventParams, c.FS_CE_BEFORE_SET_FILE_INFO,
                      Flags(0, c.FS_CE_BEFORE_SET_FILE_INFO, 0), self.origin(op), None, None,
                      file_name=self.abspath(node.nodeid), file_information_class=info_class,
                      buffer=ctypes.c_void_p(ctypes.addressof(buf)), buffer_length=len(data), buffer_view=view,
                      valid_bytes=len(data), **self._handle_ctx(node.nodeid, handle))
        return p is not None and not p.process_request

    def truncate_view(self, op: ops.Open, node: Inode) -> None:
        """open(O_TRUNC) of a handler-served view: a size of 0 is the handlers' to set (FileEndOfFileInformation); one
        they complete is taken out of the open."""
        if self.set_view_info(op, node, fileinfo.FILE_END_OF_FILE_INFORMATION, _INT64.pack(0), None):
            op.flags &= ~os.O_TRUNC

    # -- virtual files

    def add_virtual_file(self, relpath: bytes, mode: int) -> None:
        """Add the virtual file at ``relpath`` (below the mount); its directory must exist."""
        head, name = os.path.split(relpath.rstrip(b"/"))
        if not name or name in (b".", b".."):
            raise OSError(errno.EINVAL, "a virtual file needs a name")
        self.serves_views = True
        self._had_rules = True  # in the path of requests from now on: its virtual files need its handlers
        fd = os.open(head.lstrip(b"/") or b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.lower.root.fd)
        try:
            st = os.fstat(fd)
            self.lower.add_virtual(Inode(0, fd, (st.st_dev, st.st_ino), 0, b""), name, self, mode)
        finally:
            os.close(fd)

    def remove_virtual_file(self, relpath: bytes) -> bool:
        """Take the virtual file at ``relpath`` away; False when there is none."""
        head, name = os.path.split(relpath.rstrip(b"/"))
        try:
            st = os.stat(head.lstrip(b"/") or b".", dir_fd=self.lower.root.fd)
        except OSError:
            return False
        virtual = self.lower.virtuals.get(((st.st_dev, st.st_ino), name))
        if virtual is None or virtual.layer is not self:
            return False
        return self.lower.remove_virtual((st.st_dev, st.st_ino), name) is not None

