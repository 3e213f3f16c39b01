"""The request loop fed malformed and random requests over a socket that keeps message boundaries,
as /dev/fuse does: every request gets a well-formed answer and the loop keeps serving."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsfilter._abi import fuse as abi
from fsfilter._sessions.fuse_session import Session, SessionOptions
from fsfilter._sessions.lower_fs import LowerFS, LowerOptions

SENTINEL = 1 << 40


class Loop:
    def __init__(self, lower: Path) -> None:
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.theirs = theirs
        self.lower_fd = os.open(lower, os.O_PATH | os.O_DIRECTORY)
        self.fs = LowerFS(self.lower_fd, LowerOptions())
        self.session = Session(theirs.fileno(), self.fs.handlers(), SessionOptions(pool=2, passthrough=False))
        self.session.start()

    def send(self, raw: bytes) -> None:
        self.ours.send(raw)

    def replies_until_sentinel(self, timeout: float = 5.0) -> list[tuple[int, int, bytes]]:
        """Send a GETATTR of the root and collect replies up to and including its answer."""
        self.send(struct.pack("<IIQQIIIHH", 56, abi.Opcode.GETATTR, SENTINEL, 1, 0, 0, 1, 0, 0) + bytes(16))
        out = []
        while True:
            ready, _, _ = select.select([self.ours], [], [], timeout)
            assert ready, "the loop stopped answering"
            raw = self.ours.recv(1 << 21)
            length, error, unique = struct.unpack_from("<IiQ", raw)
            assert length == len(raw), "reply length field does not match the message"
            assert -4096 < error <= 0
            out.append((unique, error, raw[16:]))
            if unique == SENTINEL:
                assert error == 0 and len(raw) == 16 + abi.ATTR_OUT_SIZE
                return out

    def close(self) -> None:
        self.session.close()
        self.ours.close()
        self.theirs.close()
        self.fs.close()
        os.close(self.lower_fd)


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    (tmp_path / "lower").mkdir()
    (tmp_path / "lower" / "file").write_bytes(b"data")
    lp = Loop(tmp_path / "lower")
    try:
        yield lp
    finally:
        lp.close()


def header(length: int, opcode: int, unique: int, nodeid: int = 1, extlen: int = 0) -> bytes:
    return struct.pack("<IIQQIIIHH", length, opcode, unique, nodeid, 0, 0, 1, extlen, 0)


@pytest.mark.timeout(60)
def test_truncated_and_inconsistent_messages_get_error_replies(loop: Loop) -> None:
    loop.send(header(100, abi.Opcode.LOOKUP, 11))  # header claims more than was sent
    loop.send(header(40, abi.Opcode.LOOKUP, 12))  # LOOKUP without a name
    loop.send(header(43, abi.Opcode.LOOKUP, 13) + b"abc")  # name without NUL
    loop.send(header(40, abi.Opcode.READ, 14))  # READ without read_in
    loop.send(header(40, 200, 15))  # unknown opcode
    loop.send(b"\x01\x02")  # too short to carry a unique: dropped
    replies: dict[int, int] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # READ goes through the I/O pool: its answer may come after a sentinel's
        replies.update({u: e for u, e, _ in loop.replies_until_sentinel()})
        if {11, 12, 13, 14, 15} <= replies.keys():
            break
        time.sleep(0.01)
    assert replies[11] == -errno.EIO
    assert replies[12] == -errno.EINVAL
    assert replies[13] == -errno.EINVAL
    assert replies[14] == -errno.EINVAL
    assert replies[15] == -errno.ENOSYS
    assert loop.session.stats.malformed >= 4


@pytest.mark.timeout(60)
def test_forget_gets_no_reply_even_when_malformed(loop: Loop) -> None:
    loop.send(header(40, abi.Opcode.FORGET, 21, nodeid=999))
    loop.send(header(48, abi.Opcode.BATCH_FORGET, 22) + struct.pack("<II", 1000, 0))
    uniques = [u for u, _, _ in loop.replies_until_sentinel()]
    assert uniques == [SENTINEL]


@pytest.mark.timeout(60)
def test_real_requests_over_the_loop(loop: Loop) -> None:
    loop.send(header(45, abi.Opcode.LOOKUP, 31) + b"file\0")
    replies = {u: (e, p) for u, e, p in loop.replies_until_sentinel()}
    error, payload = replies[31]
    assert error == 0
    nodeid = abi.ENTRY_OUT_HEAD.unpack_from(payload)[0]
    attr = abi.ATTR.unpack_from(payload, abi.ENTRY_OUT_HEAD.size)
    assert nodeid > 1 and attr[1] == 4
    loop.send(header(48, abi.Opcode.FORGET, 32, nodeid=nodeid) + struct.pack("<Q", 1))
    loop.replies_until_sentinel()
    assert nodeid not in loop.fs.nodes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opcode=st.integers(0, 60), nodeid=st.sampled_from([0, 1, 2, 3, 2**63]), body=st.binary(max_size=200),
       extlen=st.integers(0, 3), lie=st.integers(-8, 8))
@pytest.mark.timeout(300)
def test_random_requests_never_stop_the_loop(loop: Loop, opcode: int, nodeid: int, body: bytes, extlen: int,
                                             lie: int) -> None:
    if opcode in (abi.Opcode.INIT, abi.Opcode.DESTROY):
        return
    length = max(0, 40 + len(body) + lie)
    loop.send(header(length, opcode, 77, nodeid, extlen) + body)
    loop.replies_until_sentinel()
    assert loop.session.stats.failures == 0, "a handler raised something other than OSError/WireError"


def negotiate_with(init_body: bytes, passthrough: bool = True) -> tuple[tuple[int, ...], int]:
    """Run INIT negotiation against a fake kernel; returns the init_out fields and the reply size."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        ours.send(header(40 + len(init_body), abi.Opcode.INIT, 1) + init_body)
        session = Session(theirs.fileno(), {}, SessionOptions(passthrough=passthrough))
        negotiated = session.negotiate(timeout=5)
        raw = ours.recv(4096)
        length, error, unique = struct.unpack_from("<IiQ", raw)
        assert (length, error, unique) == (len(raw), 0, 1)
        payload = raw[16:].ljust(abi.INIT_OUT.size, b"\0")
        assert negotiated.passthrough == bool(abi.INIT_OUT.unpack(payload)[10] & (1 << 5))
        return abi.INIT_OUT.unpack(payload), len(raw) - 16
    finally:
        ours.close()
        theirs.close()


@pytest.mark.timeout(30)
def test_init_takes_what_a_new_kernel_offers() -> None:
    offered = 0xFFFFFFFF
    fields, size = negotiate_with(abi.INIT_IN.pack(7, 45, 131072, offered, 0xFFFFFFFF))
    assert size == 64 and fields[:2] == (7, 45)
    flags = fields[3] | fields[10] << 32
    assert flags & abi.InitFlag.PASSTHROUGH and fields[11] == 1  # max_stack_depth
    assert not flags & abi.InitFlag.WRITEBACK_CACHE  # it would turn passthrough off
    assert fields[6] >= 128 * 1024  # max_write


@pytest.mark.timeout(30)
def test_init_degrades_on_an_older_kernel() -> None:
    # 7.31: no INIT_EXT, so no flags2 and no passthrough; the daemon serves reads and writes
    old_flags = int(abi.InitFlag.ASYNC_READ | abi.InitFlag.MAX_PAGES | abi.InitFlag.DO_READDIRPLUS)
    fields, size = negotiate_with(abi.INIT_IN_OLD.pack(7, 31, 65536, old_flags) + bytes(48))
    assert fields[1] == 31 and fields[10] == 0 and fields[11] == 0
    assert fields[3] == old_flags & fields[3] and fields[3] & abi.InitFlag.MAX_PAGES
    # a kernel that does not offer passthrough, or a daemon told not to use it
    fields, _ = negotiate_with(abi.INIT_IN.pack(7, 45, 131072, int(abi.InitFlag.INIT_EXT), 0))
    assert fields[10] == 0
    fields, _ = negotiate_with(abi.INIT_IN.pack(7, 45, 131072, int(abi.InitFlag.INIT_EXT), 1 << 5), passthrough=False)
    assert fields[10] == 0
