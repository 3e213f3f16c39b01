"""The FUSE codecs against hand-written byte fixtures (no kernel)."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from fsfilter._abi import fuse as abi
from fsfilter._wire import fuse as wire


def header(length: int, opcode: int, unique: int = 7, nodeid: int = 1, uid: int = 1000, gid: int = 100,
           pid: int = 4242, extlen: int = 0) -> bytes:
    return struct.pack("<IIQQIIIHH", length, opcode, unique, nodeid, uid, gid, pid, extlen, 0)


def test_struct_sizes_match_the_kernel() -> None:
    assert abi.IN_HEADER.size == 40
    assert abi.OUT_HEADER.size == 16
    assert abi.INIT_IN.size == 64
    assert abi.INIT_OUT.size == 64
    assert abi.ATTR.size == 88
    assert abi.ENTRY_OUT_SIZE == 128
    assert abi.ATTR_OUT_SIZE == 104
    assert abi.SETATTR_IN.size == 88
    assert abi.STATFS_OUT.size == 80
    assert abi.READ_IN.size == abi.WRITE_IN.size == 40
    assert abi.LK_IN.size == 48
    assert abi.COPY_FILE_RANGE_IN.size == 56
    assert abi.OPEN_OUT.size == 16
    assert abi.BACKING_MAP.size == 16


def test_decode_lookup() -> None:
    body = b"name.txt\0"
    raw = header(40 + len(body), abi.Opcode.LOOKUP, unique=99, nodeid=5) + body
    req = wire.decode_request(raw)
    assert (req.opcode, req.unique, req.nodeid, req.uid, req.gid, req.pid) == (1, 99, 5, 1000, 100, 4242)
    assert wire.name_at(req.body) == (b"name.txt", 9)
    assert len(req.ext) == 0


def test_decode_rejects_bad_lengths() -> None:
    with pytest.raises(wire.WireError):
        wire.decode_request(b"\0" * 39)
    with pytest.raises(wire.WireError) as info:
        wire.decode_request(header(41, abi.Opcode.GETATTR) + b"\0\0")
    assert info.value.code == errno.EIO
    with pytest.raises(wire.WireError):  # extensions longer than the message
        wire.decode_request(header(48, abi.Opcode.CREATE, extlen=2) + b"\0" * 8)


def test_request_unique_of_broken_message() -> None:
    assert wire.request_unique(header(1000, 3, unique=1234)) == 1234
    assert wire.request_unique(b"short") is None


def test_names_are_checked() -> None:
    for bad in (b"", b".", b"..", b"a/b"):
        with pytest.raises(wire.WireError):
            wire.check_name(bad)
    with pytest.raises(wire.WireError) as info:
        wire.check_name(b"x" * 256)
    assert info.value.code == errno.ENAMETOOLONG
    with pytest.raises(wire.WireError):
        wire.cstring(memoryview(b"no terminator"))


def test_fixed_checks_length() -> None:
    body = memoryview(struct.pack("<IIQ", 1, 0, 77))
    assert wire.fixed(body, abi.GETATTR_IN) == (1, 0, 77)
    with pytest.raises(wire.WireError) as info:
        wire.fixed(body[:10], abi.GETATTR_IN)
    assert info.value.code == errno.EINVAL


def test_supplementary_group_extension() -> None:
    ext = struct.pack("<IIII", 16, abi.FUSE_EXT_GROUPS, 1, 4321)
    assert wire.supplementary_group(memoryview(ext)) == 4321
    assert wire.supplementary_group(memoryview(b"")) is None
    with pytest.raises(wire.WireError):
        wire.supplementary_group(memoryview(struct.pack("<II", 64, 1)))
    body = b"f\0"
    raw = header(40 + 4 * 4 + len(body) + 16, abi.Opcode.CREATE, extlen=2) + b"\0" * 16 + body + ext
    req = wire.decode_request(raw)
    assert wire.supplementary_group(req.ext) == 4321
    assert bytes(req.body[16:]) == body


def test_rdev_round_trip() -> None:
    for major, minor in ((0, 0), (1, 3), (8, 17), (259, 70000), (4095, 1048575)):
        dev = os.makedev(major, minor)
        assert wire.decode_rdev(wire.encode_rdev(dev)) == dev
    assert wire.encode_rdev(os.makedev(1, 3)) == 0x103


def test_reply_and_error_headers() -> None:
    assert wire.encode_reply(5, b"abcd") == struct.pack("<IiQ", 20, 0, 5) + b"abcd"
    assert wire.encode_reply(6, error=errno.ENOENT) == struct.pack("<IiQ", 16, -errno.ENOENT, 6)


def make_stat(mode: int, ino: int, nlink: int, uid: int, gid: int, size: int, time_ns: int) -> os.stat_result:
    extra = {"st_atime_ns": time_ns, "st_mtime_ns": time_ns, "st_ctime_ns": time_ns, "st_blksize": 4096,
             "st_blocks": 8, "st_rdev": 0}
    secs = time_ns / 1e9
    return os.stat_result((mode, ino, 99, nlink, uid, gid, size, secs, secs, secs), extra)  # type: ignore[arg-type]


def test_entry_and_attr_encoding() -> None:
    st = make_stat(0o100644, 1234, 2, 1000, 100, 4096, 3_000_000_001)
    entry = wire.encode_entry(17, st, 1.5, 60)
    assert len(entry) == abi.ENTRY_OUT_SIZE
    nodeid, gen, ev, av, evn, avn = abi.ENTRY_OUT_HEAD.unpack_from(entry)
    assert (nodeid, gen, ev, av, evn, avn) == (17, 0, 1, 60, 500_000_000, 0)
    attr = abi.ATTR.unpack_from(entry, abi.ENTRY_OUT_HEAD.size)
    assert attr[0] == 1234 and attr[1] == 4096 and attr[9] == 0o100644 and attr[10] == 2
    assert attr[11:13] == (1000, 100) and attr[4] == 3 and attr[7] == 1
    neg = wire.encode_negative_entry(10)
    assert abi.ENTRY_OUT_HEAD.unpack_from(neg)[:3] == (0, 0, 10) and len(neg) == abi.ENTRY_OUT_SIZE


def test_negative_times_survive() -> None:
    st = make_stat(0o100644, 1, 1, 0, 0, 0, -1_500_000_000)
    attr = abi.ATTR.unpack(wire.encode_attr(st))
    assert attr[3] == -2 and attr[6] == 500_000_000  # -1.5 s = -2 s + 0.5 s


def test_dirent_padding() -> None:
    d = wire.encode_dirent(5, 1, 8, b"abc")
    assert len(d) == 32 and len(d) == wire.dirent_size(b"abc")
    assert abi.DIRENT_HEAD.unpack_from(d) == (5, 1, 3, 8)
    assert d[24:27] == b"abc" and d[27:] == b"\0" * 5
    assert wire.dirent_size(b"12345678") == 32


def test_init_round_trip() -> None:
    body = memoryview(abi.INIT_IN.pack(7, 45, 131072, abi.InitFlag.INIT_EXT | abi.InitFlag.ASYNC_READ, 1 << 5))
    major, minor, readahead, flags = wire.decode_init(body)
    assert (major, minor, readahead) == (7, 45, 131072)
    assert flags & abi.InitFlag.PASSTHROUGH and flags & abi.InitFlag.ASYNC_READ
    old = memoryview(abi.INIT_IN_OLD.pack(7, 31, 4096, abi.InitFlag.ASYNC_READ))
    assert wire.decode_init(old)[3] == abi.InitFlag.ASYNC_READ
    out = wire.encode_init_out(45, 131072, int(abi.InitFlag.PASSTHROUGH | abi.InitFlag.MAX_PAGES), 64, 48, 1 << 20,
                               256, 1)
    fields = abi.INIT_OUT.unpack(out)
    assert fields[0:2] == (7, 45) and fields[6] == 1 << 20 and fields[8] == 256
    assert fields[3] == abi.InitFlag.MAX_PAGES and fields[10] == 1 << 5 and fields[11] == 1


def test_notices() -> None:
    msg = wire.encode_inval_entry(9, b"name")
    assert struct.unpack_from("<IiQ", msg) == (len(msg), abi.NotifyCode.INVAL_ENTRY, 0)
    assert abi.NOTIFY_INVAL_ENTRY.unpack_from(msg, 16) == (9, 4, 0) and msg.endswith(b"name\0")
    msg = wire.encode_inval_inode(3, 0, -1)
    assert abi.NOTIFY_INVAL_INODE.unpack_from(msg, 16) == (3, 0, -1)
    msg = wire.encode_delete(1, 2, b"x")
    assert abi.NOTIFY_DELETE.unpack_from(msg, 16) == (1, 2, 1, 0)
