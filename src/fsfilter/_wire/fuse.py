"""Pure codecs for the FUSE protocol: request bytes in, reply bytes out. No syscalls.

Every decoder checks lengths before it reads; a malformed request raises ``WireError`` with the errno
its reply should carry, so the request loop answers it and goes on.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Protocol

from fsfilter._abi import fuse as abi

NAME_MAX = 255


class WireError(Exception):
    """A request that cannot be decoded; ``code`` is the errno to answer it with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Request:
    """One decoded request: header fields, the argument bytes and the extension bytes."""

    __slots__ = ("opcode", "unique", "nodeid", "uid", "gid", "pid", "body", "ext")

    def __init__(self, opcode: int, unique: int, nodeid: int, uid: int, gid: int, pid: int,
                 body: memoryview, ext: memoryview) -> None:
        self.opcode = opcode
        self.unique = unique
        self.nodeid = nodeid
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.body = body
        self.ext = ext

    def __repr__(self) -> str:
        try:
            name = abi.Opcode(self.opcode).name
        except ValueError:
            name = str(self.opcode)
        return f"<Request {name} unique={self.unique} node={self.nodeid} pid={self.pid} {len(self.body)}B>"


def decode_request(buf: bytes | bytearray | memoryview) -> Request:
    """Split one message read from /dev/fuse into header, arguments and extensions."""
    size = len(buf)
    if size < abi.IN_HEADER.size:
        raise WireError(errno.EIO, f"short request: {size} bytes")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = abi.IN_HEADER.unpack_from(buf, 0)
    if length != size:
        raise WireError(errno.EIO, f"header says {length} bytes, message has {size}")
    ext_bytes = extlen * 8
    if abi.IN_HEADER.size + ext_bytes > size:
        raise WireError(errno.EIO, f"extensions ({ext_bytes} B) overrun the request")
    view = memoryview(buf)
    end = size - ext_bytes
    return Request(opcode, unique, nodeid, uid, gid, pid, view[abi.IN_HEADER.size:end], view[end:])


def request_unique(buf: bytes | bytearray | memoryview) -> int | None:
    """The unique id of a message too broken to decode, if it can be read at all (so it can be answered)."""
    if len(buf) < 16:
        return None
    return int(struct.unpack_from("<Q", buf, 8)[0])


def fixed(body: memoryview, layout: struct.Struct, offset: int = 0) -> tuple[int, ...]:
    """The fixed-size argument struct at ``offset`` of a request body."""
    if len(body) < offset + layout.size:
        raise WireError(errno.EINVAL, f"argument needs {layout.size} bytes, has {len(body) - offset}")
    return layout.unpack_from(body, offset)


def open_flags(value: int) -> int:
    """The open(2) flags of an OPEN/CREATE request: a C int, so a value with the top bit set is no set of flags."""
    if value >= 1 << 31:
        raise WireError(errno.EINVAL, f"open flags 0x{value:x} are not valid")
    return value


def cstring(body: memoryview, offset: int = 0) -> tuple[bytes, int]:
    """A NUL-terminated string at ``offset``; returns it and the offset after its NUL."""
    raw = bytes(body[offset:])
    end = raw.find(b"\0")
    if end < 0:
        raise WireError(errno.EINVAL, "string argument is not NUL-terminated")
    return raw[:end], offset + end + 1


def check_name(name: bytes) -> bytes:
    """A directory entry name as the kernel must send it: one component, not . or .., at most NAME_MAX."""
    if not name or b"/" in name or name in (b".", b".."):
        raise WireError(errno.EINVAL, f"bad entry name {name!r}")
    if len(name) > NAME_MAX:
        raise WireError(errno.ENAMETOOLONG, "entry name longer than NAME_MAX")
    return name


def name_at(body: memoryview, offset: int = 0) -> tuple[bytes, int]:
    name, nxt = cstring(body, offset)
    return check_name(name), nxt


def supplementary_group(ext: memoryview) -> int | None:
    """The group the kernel sends with creating requests (FUSE_EXT_GROUPS), if any."""
    pos = 0
    while pos + abi.EXT_HEADER.size <= len(ext):
        size, kind = abi.EXT_HEADER.unpack_from(ext, pos)
        if size < abi.EXT_HEADER.size or pos + size > len(ext):
            raise WireError(errno.EINVAL, "malformed request extension")
        if kind == abi.FUSE_EXT_GROUPS:
            start = pos + abi.EXT_HEADER.size
            if size < abi.EXT_HEADER.size + 4:
                raise WireError(errno.EINVAL, "short group extension")
            (count,) = abi.SUPP_GROUPS_HEAD.unpack_from(ext, start)
            if count < 1 or 8 + 4 * count > size:
                return None
            return int(struct.unpack_from("<I", ext, start + 4)[0])
        pos += size
    return None


# -- device numbers: the kernel's "new" 32-bit encoding in fuse_attr.rdev and fuse_mknod_in.rdev


def encode_rdev(dev: int) -> int:
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_rdev(value: int) -> int:
    major = (value & 0xFFF00) >> 8
    minor = (value & 0xFF) | ((value >> 12) & 0xFFF00)
    return os.makedev(major, minor)


# -- replies


class StatLike(Protocol):
    """What a reply needs of a file's attributes: an ``os.stat_result``, or a view with some fields changed."""

    @property
    def st_ino(self) -> int: ...
    @property
    def st_mode(self) -> int: ...
    @property
    def st_nlink(self) -> int: ...
    @property
    def st_uid(self) -> int: ...
    @property
    def st_gid(self) -> int: ...
    @property
    def st_rdev(self) -> int: ...
    @property
    def st_size(self) -> int: ...
    @property
    def st_blocks(self) -> int: ...
    @property
    def st_blksize(self) -> int: ...
    @property
    def st_atime_ns(self) -> int: ...
    @property
    def st_mtime_ns(self) -> int: ...
    @property
    def st_ctime_ns(self) -> int: ...


def timeout_parts(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def encode_attr(st: StatLike) -> bytes:
    a_s, a_ns = divmod(st.st_atime_ns, 1_000_000_000)
    m_s, m_ns = divmod(st.st_mtime_ns, 1_000_000_000)
    c_s, c_ns = divmod(st.st_ctime_ns, 1_000_000_000)
    return abi.ATTR.pack(
        st.st_ino, st.st_size, st.st_blocks, a_s, m_s, c_s, a_ns, m_ns, c_ns, st.st_mode,
        st.st_nlink & 0xFFFFFFFF, st.st_uid, st.st_gid, encode_rdev(st.st_rdev), st.st_blksize & 0xFFFFFFFF, 0,
    )


def encode_entry(nodeid: int, st: StatLike, entry_timeout: float, attr_timeout: float) -> bytes:
    e_s, e_ns = timeout_parts(entry_timeout)
    a_s, a_ns = timeout_parts(attr_timeout)
    return abi.ENTRY_OUT_HEAD.pack(nodeid, 0, e_s, a_s, e_ns, a_ns) + encode_attr(st)


def encode_negative_entry(timeout: float) -> bytes:
    """A LOOKUP answer of "no such name" that the kernel may cache for ``timeout`` seconds."""
    e_s, e_ns = timeout_parts(timeout)
    return abi.ENTRY_OUT_HEAD.pack(0, 0, e_s, 0, e_ns, 0) + bytes(abi.ATTR.size)


def encode_attr_out(st: StatLike, attr_timeout: float) -> bytes:
    a_s, a_ns = timeout_parts(attr_timeout)
    return abi.ATTR_OUT_HEAD.pack(a_s, a_ns, 0) + encode_attr(st)


def encode_open_out(fh: int, flags: int, backing_id: int = 0) -> bytes:
    return abi.OPEN_OUT.pack(fh, flags, backing_id)


def encode_write_out(size: int) -> bytes:
    return abi.WRITE_OUT.pack(size, 0)


def encode_statfs(sv: os.statvfs_result) -> bytes:
    return abi.STATFS_OUT.pack(sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree, sv.f_bsize,
                               sv.f_namemax, sv.f_frsize, 0)


def dirent_size(name: bytes) -> int:
    return (abi.DIRENT_HEAD.size + len(name) + 7) & ~7


def encode_dirent(ino: int, offset: int, dtype: int, name: bytes) -> bytes:
    raw = abi.DIRENT_HEAD.pack(ino, offset, len(name), dtype) + name
    return raw + b"\0" * (-len(raw) % 8)


def encode_direntplus(entry: bytes, ino: int, offset: int, dtype: int, name: bytes) -> bytes:
    """One READDIRPLUS record: an entry_out (all zero for names the kernel must not look up) and a dirent."""
    return entry + encode_dirent(ino, offset, dtype, name)


def encode_reply_header(unique: int, error: int, payload_size: int) -> bytes:
    """``error`` is a positive errno or 0; the wire carries it negated."""
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size + payload_size, -error, unique)


def encode_reply(unique: int, payload: bytes = b"", error: int = 0) -> bytes:
    return encode_reply_header(unique, error, len(payload)) + payload


def encode_notify(code: int, payload: bytes) -> bytes:
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(payload), code, 0) + payload


def encode_inval_inode(nodeid: int, offset: int = 0, length: int = 0) -> bytes:
    return encode_notify(abi.NotifyCode.INVAL_INODE, abi.NOTIFY_INVAL_INODE.pack(nodeid, offset, length))


def encode_inval_entry(parent: int, name: bytes, flags: int = 0) -> bytes:
    body = abi.NOTIFY_INVAL_ENTRY.pack(parent, len(name), flags) + name + b"\0"
    return encode_notify(abi.NotifyCode.INVAL_ENTRY, body)


def encode_delete(parent: int, child: int, name: bytes) -> bytes:
    return encode_notify(abi.NotifyCode.DELETE, abi.NOTIFY_DELETE.pack(parent, child, len(name), 0) + name + b"\0")


def decode_init(body: memoryview) -> tuple[int, int, int, int]:
    """major, minor, max_readahead and the 64-bit flags of an INIT request."""
    major, minor, readahead, flags = fixed(body, abi.INIT_IN_OLD)
    flags2 = 0
    if flags & abi.InitFlag.INIT_EXT and len(body) >= abi.INIT_IN.size:
        flags2 = fixed(body, abi.INIT_IN)[4]
    return major, minor, readahead, flags | (flags2 << 32)


def encode_init_out(minor: int, max_readahead: int, flags: int, max_background: int, congestion_threshold: int,
                    max_write: int, max_pages: int, max_stack_depth: int, request_timeout: int = 0) -> bytes:
    """``request_timeout``: seconds (0 = none) after which the kernel aborts the connection when a request is
    still unanswered; only honoured with FUSE_REQUEST_TIMEOUT in ``flags``."""
    return abi.INIT_OUT.pack(
        abi.KERNEL_VERSION, minor, max_readahead, flags & 0xFFFFFFFF, max_background, congestion_threshold,
        max_write, 1, max_pages, 0, flags >> 32, max_stack_depth, min(max(0, request_timeout), 0xFFFF),
    )
