"""A filter stack driven without a mount: requests built as the kernel sends them, decoded by the same operation
table the session uses, served by the stack's handlers, typed replies returned (errors as OSError).

Most layer behaviour can be tested this way without root and without /dev/fuse: the bottom serves a temporary
directory, and requests carry the header (pid, uid, gid) a test chooses.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fsfilter._abi import fuse as abi
from fsfilter._sessions.layer import Layer
from fsfilter._sessions.lower_fs import LowerFS, LowerOptions
from fsfilter._sessions.stack import LayerStack
from fsfilter._wire import fuse as wire
from fsfilter._wire import ops
from fsfilter._wire.replies import Created, Data, Entry, Listing, Opened, Reply, Written

OTHER_PID = 1  # requests from another process (the filter skips its own process's requests)


class Harness:
    def __init__(self, lower: Path, options: LowerOptions | None = None) -> None:
        self.root_fd = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.fs = LowerFS(self.root_fd, options or LowerOptions())
        self.fs.passthrough = False  # no /dev/fuse: every open is served by the daemon
        self.stack = LayerStack(self.fs)
        self.handlers = self.fs.handlers()
        self.unique = 0
        self.pid = OTHER_PID
        self.uid = os.getuid()
        self.gid = os.getgid()

    def join(self, layer: Layer, altitude: float, strict: bool = False) -> Layer:
        self.stack.join(layer, altitude, strict)
        return layer

    def close(self) -> None:
        self.fs.close()
        os.close(self.root_fd)

    # -- raw requests

    def op(self, opcode: int, nodeid: int, body: bytes) -> ops.Op:
        """The typed operation of a request, decoded as the session decodes it."""
        self.unique += 1
        raw = abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), opcode, self.unique, nodeid, self.uid, self.gid,
                                 self.pid, 0, 0) + body
        op = ops.decode_op(wire.decode_request(raw))
        assert op is not None, f"opcode {opcode} is not in the table"
        return op

    def call(self, opcode: int, nodeid: int, body: bytes = b"") -> Reply | None:
        reply = self.handlers[opcode](self.op(opcode, nodeid, body))
        spec = ops.OPS[opcode]
        if reply is not None:  # the stack answers with a reply kind the operation table names
            assert isinstance(reply, spec.reply), (spec, reply)
        return reply

    # -- the requests tests use

    def lookup(self, parent: int, name: str) -> Entry:
        reply = self.call(abi.Opcode.LOOKUP, parent, os.fsencode(name) + b"\0")
        assert isinstance(reply, Entry)
        return reply

    def walk(self, path: str) -> int:
        """The node id of a path below the root, looked up component by component."""
        nodeid = abi.ROOT_ID
        for part in [p for p in path.split("/") if p]:
            entry = self.lookup(nodeid, part)
            if not entry.nodeid:
                raise FileNotFoundError(path)
            nodeid = entry.nodeid
        return nodeid

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> int:
        reply = self.call(abi.Opcode.OPEN, nodeid, abi.OPEN_IN.pack(flags, 0))
        assert isinstance(reply, Opened)
        return reply.fh

    def create(self, parent: int, name: str, flags: int = os.O_RDWR | os.O_CREAT, mode: int = 0o644
               ) -> tuple[int, int]:
        reply = self.call(abi.Opcode.CREATE, parent, abi.CREATE_IN.pack(flags, mode, 0o022, 0)
                          + os.fsencode(name) + b"\0")
        assert isinstance(reply, Created)
        return reply.entry.nodeid, reply.opened.fh

    def read(self, nodeid: int, fh: int, size: int, offset: int = 0) -> bytes:
        reply = self.call(abi.Opcode.READ, nodeid, abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0))
        assert isinstance(reply, Data)
        return bytes(reply.data)

    def write(self, nodeid: int, fh: int, data: bytes, offset: int = 0) -> int:
        reply = self.call(abi.Opcode.WRITE, nodeid, abi.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0) + data)
        assert isinstance(reply, Written)
        return reply.size

    def release(self, nodeid: int, fh: int) -> None:
        self.call(abi.Opcode.RELEASE, nodeid, abi.RELEASE_IN.pack(fh, 0, 0, 0))

    def opendir(self, nodeid: int) -> int:
        reply = self.call(abi.Opcode.OPENDIR, nodeid, abi.OPEN_IN.pack(os.O_RDONLY | os.O_DIRECTORY, 0))
        assert isinstance(reply, Opened)
        return reply.fh

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096, plus: bool = False) -> Listing:
        opcode = abi.Opcode.READDIRPLUS if plus else abi.Opcode.READDIR
        reply = self.call(opcode, nodeid, abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0))
        assert isinstance(reply, Listing)
        return reply

    def listdir(self, nodeid: int, plus: bool = False) -> list[str]:
        fh = self.opendir(nodeid)
        names: list[str] = []
        offset = 0
        try:
            while True:
                listing = self.readdir(nodeid, fh, offset, plus=plus)
                if not listing.entries:
                    return names
                names += [os.fsdecode(e.name) for e in listing.entries if e.name not in (b".", b"..")]
                offset = listing.entries[-1].next_offset
        finally:
            self.call(abi.Opcode.RELEASEDIR, nodeid, abi.RELEASE_IN.pack(fh, 0, 0, 0))

    def unlink(self, parent: int, name: str) -> None:
        self.call(abi.Opcode.UNLINK, parent, os.fsencode(name) + b"\0")

    def forget(self, nodeid: int, count: int = 1) -> None:
        self.call(abi.Opcode.FORGET, nodeid, struct.pack("<Q", count))


@contextmanager
def harness(lower: Path, options: LowerOptions | None = None) -> Iterator[Harness]:
    h = Harness(lower, options)
    try:
        yield h
    finally:
        h.close()
