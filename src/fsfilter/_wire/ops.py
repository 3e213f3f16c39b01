"""Typed FUSE operations: each request body decoded once, by one table row per opcode.

The session decodes a request into an operation with the row of its opcode, routes it by the row's
``may_block`` and ``side_effect_free``, and hands the operation to the filter stack; every layer reads
the same typed fields, and none parses the request bytes again. Pure codecs: no syscalls.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from fsfilter._abi import fuse as abi
from fsfilter._wire import replies
from fsfilter._wire.fuse import Request, WireError, cstring, fixed, name_at, open_flags


class Op:
    """One request: its header (``req``: opcode, unique, node id and the caller's pid, uid and gid) and the
    decoded arguments in the subclass's fields. ``memo`` holds what a layer computed about this request
    (keyed by the layer), so that a decision made while routing is not made again while serving."""

    __slots__ = ("req", "memo", "opcode", "unique", "nodeid", "pid", "uid", "gid")
    memo: dict[object, Any] | None
    names: tuple[str, ...] = ()  # the fields that are entry names (for tracing and name-based routing)

    # The header's fields are copied once: the session and every layer read them several times per request, and
    # a slot costs less to read than a property.
    def __init__(self, req: Request) -> None:
        (self.req, self.memo, self.opcode, self.unique, self.nodeid, self.pid, self.uid,
         self.gid) = req, None, req.opcode, req.unique, req.nodeid, req.pid, req.uid, req.gid

    def remember(self, key: object, value: Any) -> Any:
        if self.memo is None:
            self.memo = {}
        self.memo[key] = value
        return value

    def recall(self, key: object, default: Any = None) -> Any:
        return default if self.memo is None else self.memo.get(key, default)

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in type(self).__slots__ if n not in ("data", "value"))
        return f"<{type(self).__name__} node={self.nodeid} pid={self.pid} {fields}>"


class Plain(Op):
    """An operation with no arguments (READLINK, STATFS, SYNCFS, DESTROY)."""

    __slots__ = ()


class Lookup(Op):
    __slots__ = ("name",)
    names = ("name",)

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.name, _ = name_at(req.body)


class Forget(Op):
    __slots__ = ("count",)

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        (self.count,) = fixed(req.body, abi.FORGET_IN)


class BatchForget(Op):
    __slots__ = ("items",)

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        count, _ = fixed(req.body, abi.BATCH_FORGET_IN)
        pos = abi.BATCH_FORGET_IN.size
        if len(req.body) < pos + count * abi.FORGET_ONE.size:
            raise WireError(errno.EINVAL, f"BATCH_FORGET of {count} entries is short")
        self.items = [abi.FORGET_ONE.unpack_from(req.body, pos + i * abi.FORGET_ONE.size) for i in range(count)]


class Getattr(Op):
    __slots__ = ("fh",)

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        flags, _, fh = fixed(req.body, abi.GETATTR_IN)
        self.fh: int | None = fh if flags & abi.FUSE_GETATTR_FH else None


class Setattr(Op):
    __slots__ = ("valid", "fh", "size", "atime", "mtime", "atime_ns", "mtime_ns", "mode", "uid_to", "gid_to")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        (self.valid, _, fh, self.size, _owner, self.atime, self.mtime, _ctime, self.atime_ns, self.mtime_ns,
         _ctime_ns, self.mode, _, self.uid_to, self.gid_to, _) = fixed(req.body, abi.SETATTR_IN)
        self.fh: int | None = fh if self.valid & abi.FATTR_FH else None


class Symlink(Op):
    __slots__ = ("name", "target")
    names = ("name",)

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.name, pos = name_at(req.body)
        self.target, _ = cstring(req.body, pos)


class Mknod(Op):
    __slots__ = ("name", "mode", "rdev", "umask")
    names = ("name",)

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.mode, self.rdev, self.umask, _ = fixed(req.body, abi.MKNOD_IN)
        self.name, _ = name_at(req.body, abi.MKNOD_IN.size)


class Mkdir(Op):
    __slots__ = ("name", "mode", "umask")
    names = ("name",)

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.mode, self.umask = fixed(req.body, abi.MKDIR_IN)
        self.name, _ = name_at(req.body, abi.MKDIR_IN.size)


class Remove(Op):
    """UNLINK and RMDIR."""

    __slots__ = ("name",)
    names = ("name",)

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.name, _ = name_at(req.body)


class Rename(Op):
    """RENAME and RENAME2: ``name`` in the node to ``new_name`` in ``new_dir``; ``flags``: RENAME_NOREPLACE,
    RENAME_EXCHANGE (0 for RENAME)."""

    __slots__ = ("name", "new_dir", "new_name", "flags")
    names = ("name", "new_name")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        if req.opcode == abi.Opcode.RENAME:
            (self.new_dir,) = fixed(req.body, abi.RENAME_IN)
            self.flags = 0
            pos = abi.RENAME_IN.size
        else:
            self.new_dir, self.flags, _ = fixed(req.body, abi.RENAME2_IN)
            pos = abi.RENAME2_IN.size
        self.name, pos = name_at(req.body, pos)
        self.new_name, _ = name_at(req.body, pos)


class Link(Op):
    """A new name ``name`` in the node for the existing node ``target``."""

    __slots__ = ("target", "name")
    names = ("name",)

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        (self.target,) = fixed(req.body, abi.LINK_IN)
        self.name, _ = name_at(req.body, abi.LINK_IN.size)


class Open(Op):
    """OPEN and OPENDIR: ``flags`` are open(2)'s; ``open_flags`` FUSE_OPEN_* (e.g. KILL_SUIDGID)."""

    __slots__ = ("flags", "open_flags")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        flags, self.open_flags = fixed(req.body, abi.OPEN_IN)
        self.flags = open_flags(flags)

    @classmethod
    def synthetic(cls, op: Op, nodeid: int, flags: int) -> Open:
        """An OPEN of ``nodeid`` on behalf of ``op``'s caller, which a layer sends down itself (an isolated create
        opens the caller's view of the file it made)."""
        made = cls.__new__(cls)
        Op.__init__(made, op.req)
        made.nodeid, made.opcode, made.flags, made.open_flags = nodeid, abi.Opcode.OPEN, flags, 0
        return made


class Create(Op):
    """CREATE (open with O_CREAT of a name not in the kernel's cache) and TMPFILE (``name`` empty)."""

    __slots__ = ("name", "flags", "mode", "umask", "open_flags")
    names = ("name",)

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        flags, self.mode, self.umask, self.open_flags = fixed(req.body, abi.CREATE_IN)
        self.flags = open_flags(flags)
        self.name = name_at(req.body, abi.CREATE_IN.size)[0] if req.opcode == abi.Opcode.CREATE else b""


class Read(Op):
    """READ, READDIR and READDIRPLUS (``plus``)."""

    __slots__ = ("fh", "offset", "size", "plus")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.fh, self.offset, self.size, *_ = fixed(req.body, abi.READ_IN)
        self.plus = req.opcode == abi.Opcode.READDIRPLUS


class Write(Op):
    __slots__ = ("fh", "offset", "size", "write_flags", "data")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.fh, self.offset, self.size, self.write_flags, *_ = fixed(req.body, abi.WRITE_IN)
        self.data = req.body[abi.WRITE_IN.size:abi.WRITE_IN.size + self.size]
        if len(self.data) != self.size:
            raise WireError(errno.EINVAL, "write data shorter than its size")


class Flush(Op):
    __slots__ = ("fh", "owner")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.fh, _, _, self.owner = fixed(req.body, abi.FLUSH_IN)


class Release(Op):
    """RELEASE and RELEASEDIR."""

    __slots__ = ("fh", "flags", "release_flags", "owner")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.fh, self.flags, self.release_flags, self.owner = fixed(req.body, abi.RELEASE_IN)

    @classmethod
    def undoing(cls, op: Op, fh: int) -> Release:
        """The release a layer sends down to undo an open the layers below granted and it refused afterwards
        (its After handler failed the open): every layer below sees the handle closed, as for a real close."""
        release = cls.__new__(cls)
        Op.__init__(release, op.req)
        release.fh, release.flags, release.release_flags, release.owner = fh, 0, 0, 0
        return release


class Fsync(Op):
    """FSYNC and FSYNCDIR."""

    __slots__ = ("fh", "datasync")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        fh, flags, _ = fixed(req.body, abi.FSYNC_IN)
        self.fh, self.datasync = fh, bool(flags & abi.FUSE_FSYNC_FDATASYNC)


class Access(Op):
    __slots__ = ("mask",)

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.mask, _ = fixed(req.body, abi.ACCESS_IN)


class Setxattr(Op):
    __slots__ = ("name", "value", "flags", "xflags")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        size, self.flags, self.xflags, _ = fixed(req.body, abi.SETXATTR_IN)
        self.name, pos = cstring(req.body, abi.SETXATTR_IN.size)
        self.value = bytes(req.body[pos:pos + size])
        if len(self.value) != size:
            raise WireError(errno.EINVAL, "xattr value shorter than its size")


class Getxattr(Op):
    """GETXATTR (``name``) and LISTXATTR (``name`` empty); ``size`` 0 asks for the size only."""

    __slots__ = ("name", "size")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.size, _ = fixed(req.body, abi.GETXATTR_IN)
        self.name = cstring(req.body, abi.GETXATTR_IN.size)[0] if req.opcode == abi.Opcode.GETXATTR else b""


class Removexattr(Op):
    __slots__ = ("name",)

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.name, _ = cstring(req.body)


class Fallocate(Op):
    __slots__ = ("fh", "offset", "length", "mode")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.fh, self.offset, self.length, self.mode, _ = fixed(req.body, abi.FALLOCATE_IN)


class Lseek(Op):
    __slots__ = ("fh", "offset", "whence")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.fh, self.offset, self.whence, _ = fixed(req.body, abi.LSEEK_IN)


class CopyFileRange(Op):
    __slots__ = ("fh_in", "off_in", "node_out", "fh_out", "off_out", "length", "flags")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        (self.fh_in, self.off_in, self.node_out, self.fh_out, self.off_out, self.length,
         self.flags) = fixed(req.body, abi.COPY_FILE_RANGE_IN)


class Ioctl(Op):
    __slots__ = ("fh", "flags", "cmd", "arg", "in_size", "out_size", "data")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.fh, self.flags, self.cmd, self.arg, self.in_size, self.out_size = fixed(req.body, abi.IOCTL_IN)
        self.data = bytes(req.body[abi.IOCTL_IN.size:abi.IOCTL_IN.size + self.in_size])


class Lock(Op):
    """GETLK, SETLK and SETLKW: the range [start, end] (end inclusive) of kind F_RDLCK/F_WRLCK/F_UNLCK; ``flock``
    for flock(2) locks (whole file, owned by the open file)."""

    __slots__ = ("fh", "owner", "start", "end", "kind", "lock_pid", "flock")

    def __init__(self, req: Request) -> None:
        Op.__init__(self, req)
        self.fh, self.owner, self.start, self.end, self.kind, self.lock_pid, lk_flags, _ = fixed(req.body, abi.LK_IN)
        self.flock = bool(lk_flags & abi.FUSE_LK_FLOCK)


@dataclass(frozen=True)
class OpSpec:
    """One row of the operation table: how a request of ``opcode`` is decoded and treated.

    ``method``: the name of the layer method that serves it; ``decode``: the typed operation it becomes (its
    ``names``: the fields that are entry names); ``reply``: the kinds of typed reply it answers with (none: the
    kernel expects no answer); ``may_block``: served on a pool thread, never by a reader (it can take long);
    ``side_effect_free``: its effect is nothing but its answer, so an interrupted one may be answered EINTR at
    once; ``deferrable``: may be answered later from another thread (a lock wait)."""

    opcode: int
    method: str
    decode: type[Op]
    reply: tuple[type[replies.Reply], ...]
    may_block: bool = False
    side_effect_free: bool = False
    deferrable: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return self.decode.names

    @property
    def no_reply(self) -> bool:
        return not self.reply


_O = abi.Opcode
_R = replies
_ENTRY = (_R.Entry,)
_EMPTY = (_R.Empty,)
_XATTR = (_R.Data, _R.XattrSize)
OPS: dict[int, OpSpec] = {spec.opcode: spec for spec in (
    OpSpec(_O.LOOKUP, "lookup", Lookup, _ENTRY),
    OpSpec(_O.FORGET, "forget", Forget, ()),
    OpSpec(_O.BATCH_FORGET, "batch_forget", BatchForget, ()),
    OpSpec(_O.GETATTR, "getattr", Getattr, (_R.Attr,)),
    OpSpec(_O.SETATTR, "setattr", Setattr, (_R.Attr,)),
    OpSpec(_O.READLINK, "readlink", Plain, (_R.Data,)),
    OpSpec(_O.SYMLINK, "symlink", Symlink, _ENTRY),
    OpSpec(_O.MKNOD, "mknod", Mknod, _ENTRY),
    OpSpec(_O.MKDIR, "mkdir", Mkdir, _ENTRY),
    OpSpec(_O.UNLINK, "unlink", Remove, _EMPTY),
    OpSpec(_O.RMDIR, "rmdir", Remove, _EMPTY),
    OpSpec(_O.RENAME, "rename", Rename, _EMPTY),
    OpSpec(_O.RENAME2, "rename", Rename, _EMPTY),
    OpSpec(_O.LINK, "link", Link, _ENTRY),
    OpSpec(_O.OPEN, "open", Open, (_R.Opened,)),
    OpSpec(_O.CREATE, "create", Create, (_R.Created,)),
    OpSpec(_O.TMPFILE, "tmpfile", Create, (_R.Created,)),
    OpSpec(_O.READ, "read", Read, (_R.Data,), may_block=True, side_effect_free=True),
    OpSpec(_O.WRITE, "write", Write, (_R.Written,), may_block=True),
    OpSpec(_O.FLUSH, "flush", Flush, _EMPTY),
    OpSpec(_O.RELEASE, "release", Release, _EMPTY),
    OpSpec(_O.FSYNC, "fsync", Fsync, _EMPTY, may_block=True, side_effect_free=True),
    OpSpec(_O.OPENDIR, "opendir", Open, (_R.Opened,)),
    OpSpec(_O.READDIR, "readdir", Read, (_R.Listing,)),
    OpSpec(_O.READDIRPLUS, "readdir", Read, (_R.Listing,)),
    OpSpec(_O.RELEASEDIR, "releasedir", Release, _EMPTY),
    OpSpec(_O.FSYNCDIR, "fsyncdir", Fsync, _EMPTY, may_block=True, side_effect_free=True),
    OpSpec(_O.STATFS, "statfs", Plain, (_R.Statfs,)),
    OpSpec(_O.ACCESS, "access", Access, _EMPTY),
    OpSpec(_O.SETXATTR, "setxattr", Setxattr, _EMPTY),
    OpSpec(_O.GETXATTR, "getxattr", Getxattr, _XATTR),
    OpSpec(_O.LISTXATTR, "getxattr", Getxattr, _XATTR),
    OpSpec(_O.REMOVEXATTR, "removexattr", Removexattr, _EMPTY),
    OpSpec(_O.FALLOCATE, "fallocate", Fallocate, _EMPTY, may_block=True),
    OpSpec(_O.LSEEK, "lseek", Lseek, (_R.Offset,)),
    OpSpec(_O.COPY_FILE_RANGE, "copy_file_range", CopyFileRange, (_R.Written,), may_block=True),
    OpSpec(_O.IOCTL, "ioctl", Ioctl, (_R.IoctlOut,), may_block=True),
    OpSpec(_O.GETLK, "getlk", Lock, (_R.LockOut,)),
    OpSpec(_O.SETLK, "setlk", Lock, _EMPTY),
    OpSpec(_O.SETLKW, "setlkw", Lock, _EMPTY, deferrable=True),
    OpSpec(_O.SYNCFS, "syncfs", Plain, _EMPTY, may_block=True, side_effect_free=True),
    OpSpec(_O.DESTROY, "destroy", Plain, _EMPTY),
)}

# Requests that are not in the table but still get no answer, and requests the kernel may send that we do
# not serve: answered ENOSYS, which the kernel remembers for most of them.
NO_REPLY = frozenset(spec.opcode for spec in OPS.values() if spec.no_reply)
MAY_BLOCK = frozenset(spec.opcode for spec in OPS.values() if spec.may_block) | {_O.COPY_FILE_RANGE_64}
SIDE_EFFECT_FREE = frozenset(spec.opcode for spec in OPS.values() if spec.side_effect_free)
DEFERRABLE = frozenset(spec.opcode for spec in OPS.values() if spec.deferrable)


def decode_op(req: Request) -> Op | None:
    """The typed operation of a request, or None for an opcode the table does not serve (ENOSYS).
    Raises WireError for a malformed body."""
    spec = OPS.get(req.opcode)
    return spec.decode(req) if spec is not None else None
