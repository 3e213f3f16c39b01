"""Layers of a filter stack on the mount-free harness: typed operations in, typed replies out, no root needed.

What the stack guarantees, one layer at a time: Before work from the top down and After work from the bottom up,
a layer that denies or completes ends the request there, listings filtered on the way up never end early, an
open refused above is closed below, a layer may replace a handle's file backend, and the decision a router made
is not made again while serving."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stack_harness import Harness, harness

from fsfilter import CBFilter
from fsfilter._engine import rules as engine_rules
from fsfilter._layers.filter import FilterLayer
from fsfilter._sessions.layer import Layer
from fsfilter._sessions.nodes import Inode
from fsfilter._sessions.stack import AltitudeTaken
from fsfilter._wire import ops
from fsfilter._wire.replies import DirEntry, Entry, Reply
from fsfilter.api import constants as c

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.txt").write_bytes(b"hello world\n")
    (d / "ro.txt").write_bytes(b"read only\n")
    return d


@pytest.fixture
def h(lower: Path) -> Iterator[Harness]:
    with harness(lower) as stack:
        yield stack


class Recording(Layer):
    """Records the operations that reach it, before and after the layers below serve them."""

    def __init__(self, name: str, log: list[str], deny: str = "") -> None:
        super().__init__()
        self.name, self.log, self.deny = name, log, deny

    def open(self, op: ops.Open) -> Reply:
        self.log.append(f"{self.name} before")
        if self.deny:
            raise OSError(errno.EACCES, self.deny)
        reply = self.down.open(op)
        self.log.append(f"{self.name} after")
        return reply

    def release(self, op: ops.Release) -> Reply:
        self.log.append(f"{self.name} release")
        return self.down.release(op)


def test_layers_run_in_altitude_order_and_a_deny_ends_the_request(h: Harness) -> None:
    log: list[str] = []
    h.join(Recording("mid", log), 200)
    h.join(Recording("low", log), 100)
    h.join(Recording("high", log), 300)
    node = h.walk("a.txt")
    fh = h.open(node)
    assert log == ["high before", "mid before", "low before", "low after", "mid after", "high after"]
    h.release(node, fh)
    log.clear()
    top = h.join(Recording("top", log, deny="no"), 400)
    with pytest.raises(OSError) as raised:
        h.open(node)
    assert raised.value.errno == errno.EACCES and log == ["top before"]  # nobody below saw it
    h.stack.leave(top)
    log.clear()
    h.release(node, h.open(node))
    assert log[0] == "high before"


def test_equal_altitudes_order_by_joining_unless_strict(h: Harness) -> None:
    log: list[str] = []
    h.join(Recording("first", log), 100)
    h.join(Recording("second", log), 100)
    with pytest.raises(AltitudeTaken):
        h.join(Recording("third", log), 100, strict=True)
    h.release(h.walk("a.txt"), h.open(h.walk("a.txt")))
    assert [e for e in log if e.endswith("before")] == ["first before", "second before"]


class RefuseAfterOpen(Layer):
    """An After step that fails the open the layers below granted."""

    def open(self, op: ops.Open) -> Reply:
        self.down.open(op)
        raise OSError(errno.EPERM, "refused after the open")


def test_an_open_refused_above_is_closed_below(h: Harness, lower: Path) -> None:
    """A layer whose After handler refuses the open: the layers below see the handle closed (their close events
    and contexts end), and the bottom holds no open file."""
    log: list[str] = []
    core = filter_core(lower)
    closes: list[str] = []
    core.on_after_close_file = lambda p: closes.append(p.file_name)
    core.add_filter_rule(f"{lower}/*", c.ACCESS_NONE, c.FS_CE_AFTER_CLOSE, c.FS_NE_NONE)
    h.join(FilterLayer(h.fs, core, str(lower)), 100)
    h.join(Recording("mid", log), 200)
    h.join(RefuseAfterOpen(), 300)
    try:
        with pytest.raises(OSError):
            h.open(h.walk("a.txt"))
        assert "mid release" in log and closes == [f"{lower}/a.txt"]
        assert h.fs.files == {}
    finally:
        core.dispatcher.stop(1.0)


class HideAllBut(Layer):
    def __init__(self, keep: bytes) -> None:
        super().__init__()
        self.keep = keep

    def listed(self, op: ops.Read, parent: Inode, entry: DirEntry) -> DirEntry | None:
        return entry if entry.name in (self.keep, b".", b"..") else None


@pytest.mark.parametrize("plus", [False, True])
def test_hidden_entries_never_end_a_listing_early(h: Harness, lower: Path, plus: bool) -> None:
    """A layer that hides almost every name: the one it keeps still comes, however many hidden names precede it
    (an empty reply would tell the kernel the directory ended); READDIRPLUS gives back the lookups of hidden names."""
    for i in range(500):
        (lower / f"hidden{i:03}").write_bytes(b"")
    (lower / "zz-visible").write_bytes(b"")
    h.join(HideAllBut(b"zz-visible"), 100)
    assert h.listdir(1, plus=plus) == ["zz-visible"]
    assert len([n for n in h.fs.nodes.values() if n.name.startswith(b"hidden")]) == 0


class Shouting:
    """A file backend that serves the lower file in capitals (what isolation or encryption layers do at OPEN)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def read(self, size: int, offset: int) -> bytes:
        return bytes(self.inner.read(size, offset)).upper()

    def passthrough_fd(self) -> int | None:
        return None  # every read must reach the daemon

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class ShoutingLayer(Layer):
    def __init__(self, lower_fs: Any) -> None:
        super().__init__()
        self.lower_fs = lower_fs

    def open(self, op: ops.Open) -> Reply:
        reply = self.down.open(op)
        f = self.lower_fs.file(reply.fh)  # type: ignore[attr-defined]
        f.backend = Shouting(f.backend)
        return reply


def test_a_layer_replaces_the_file_backend_at_open(h: Harness) -> None:
    h.fs.passthrough = True  # kernel passthrough would be possible, but the backend offers no fd
    h.join(ShoutingLayer(h.fs), 100)
    node = h.walk("a.txt")
    fh = h.open(node)
    assert h.read(node, fh, 100) == b"HELLO WORLD\n"
    assert h.fs.files[fh].passthrough is False


def filter_core(lower: Path) -> CBFilter:
    core = CBFilter()
    core.dispatcher.start()
    return core


def test_a_filter_layer_enforces_its_access_rule_under_another(h: Harness, lower: Path) -> None:
    low, high = filter_core(lower), filter_core(lower)
    opened: list[str] = []
    try:
        low.add_filter_rule(f"{lower}/ro.txt", c.ACCESS_READ_ONLY, c.FS_CE_NONE, c.FS_NE_NONE)
        high.on_before_open_file = lambda p: opened.append(p.file_name)
        high.add_filter_rule(f"{lower}/*", c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN, c.FS_NE_NONE)
        h.join(FilterLayer(h.fs, low, str(lower)), 100)
        h.join(FilterLayer(h.fs, high, str(lower)), 300)
        node = h.walk("ro.txt")
        for flags in (os.O_WRONLY | os.O_APPEND, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(OSError) as raised:
                h.open(node, flags)
            assert raised.value.errno == errno.EACCES
        h.release(node, h.open(node))
        assert opened.count(f"{lower}/ro.txt") >= 4  # the upper filter saw every attempt first
    finally:
        low.dispatcher.stop(1.0)
        high.dispatcher.stop(1.0)


def test_a_scoped_layer_leaves_other_directories_alone(h: Harness, lower: Path) -> None:
    """A filter attached to data/hr that joined the stack of data/: its unanchored rule applies below hr only."""
    (lower / "hr").mkdir()
    (lower / "hr" / "pay.csv").write_bytes(b"x")
    (lower / "top.csv").write_bytes(b"y")
    core = filter_core(lower)
    try:
        core.add_attach_point(str(lower / "hr"))
        core.add_filter_rule("*.csv", c.ACCESS_READ_ONLY, c.FS_CE_NONE, c.FS_NE_NONE)
        h.join(FilterLayer(h.fs, core, str(lower), scope=str(lower / "hr")), 100)
        with pytest.raises(OSError):
            h.open(h.walk("hr/pay.csv"), os.O_WRONLY)
        h.release(h.walk("top.csv"), h.open(h.walk("top.csv"), os.O_WRONLY))
    finally:
        core.dispatcher.stop(1.0)


def test_the_rule_decision_for_a_name_is_made_once(h: Harness, lower: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    """Routing a LOOKUP matches its name; serving it must not match the same name again."""
    core = filter_core(lower)
    calls: list[str] = []
    real = engine_rules.match_path

    def counting(*args: Any) -> Any:
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr("fsfilter._layers.filter_base.match_path", counting)
    try:
        core.on_before_open_file = lambda p: None
        core.add_filter_rule(f"{lower}/*", c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN, c.FS_NE_NONE)
        layer = FilterLayer(h.fs, core, str(lower))
        h.join(layer, 100)
        op = h.op(1, 1, b"a.txt\0")  # LOOKUP
        assert isinstance(op, ops.Lookup)
        assert h.stack.route(op) is True  # may wait on a handler: a pool thread
        reply = h.handlers[1](op)
        assert isinstance(reply, Entry) and reply.nodeid
        assert calls.count(f"{lower}/a.txt") == 1
        assert reply.entry_timeout == 0  # a per-request rule answers it: the kernel must ask every time
    finally:
        core.dispatcher.stop(1.0)


def test_malformed_requests_are_refused_before_any_layer(h: Harness) -> None:
    from fsfilter._wire.fuse import WireError
    log: list[str] = []
    h.join(Recording("only", log), 100)
    with pytest.raises(WireError):
        h.op(14, 2, b"\x01")  # OPEN with a short body
    assert log == []


def test_a_request_resent_after_its_server_died_is_not_failed_for_having_been_done(h: Harness, lower: Path) -> None:
    """FUSE_NOTIFY_RESEND (a rescuer or successor taking over) sends again what the dead process had read: it may
    have done it already. A resent exclusive create, mkdir, unlink or rename that the dead process's journal says it
    had begun, and that finds its work done, succeeds; not resent, or never begun, it still fails as it must."""
    from fsfilter._abi import fuse as abi

    def resent(opcode: int, nodeid: int, body: bytes, started: bool = True) -> Reply | None:
        op = h.op(opcode, nodeid, body)
        if started:  # the dead predecessor's journal says it had begun this one
            h.fs.maybe_done.add(op.unique)
        op.unique |= abi.UNIQUE_RESEND
        return h.handlers[opcode](op)

    (lower / "made.txt").write_bytes(b"")
    with pytest.raises(FileExistsError):
        h.create(abi.ROOT_ID, "made.txt", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    body = abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644, 0o022, 0) + b"made.txt\0"
    assert resent(abi.Opcode.CREATE, abi.ROOT_ID, body) is not None
    (lower / "dir").mkdir()
    mkdir = abi.MKDIR_IN.pack(0o755, 0o022) + b"dir\0"
    with pytest.raises(FileExistsError):
        h.call(abi.Opcode.MKDIR, abi.ROOT_ID, mkdir)
    assert isinstance(resent(abi.Opcode.MKDIR, abi.ROOT_ID, mkdir), Entry)
    with pytest.raises(FileNotFoundError):
        h.unlink(abi.ROOT_ID, "gone.txt")
    resent(abi.Opcode.UNLINK, abi.ROOT_ID, b"gone.txt\0")
    (lower / "new.txt").write_bytes(b"x")  # as if "old.txt" had been renamed to it already
    rename = abi.RENAME_IN.pack(abi.ROOT_ID) + b"old.txt\0new.txt\0"
    with pytest.raises(FileNotFoundError):
        h.call(abi.Opcode.RENAME, abi.ROOT_ID, rename)
    resent(abi.Opcode.RENAME, abi.ROOT_ID, rename)
    with pytest.raises(FileNotFoundError):  # resent, but nothing says it was done: still an error
        resent(abi.Opcode.RENAME, abi.ROOT_ID, abi.RENAME_IN.pack(abi.ROOT_ID) + b"old.txt\0other.txt\0")
    with pytest.raises(FileExistsError):  # resent, but never begun (it waited at a gate): the name is someone else's
        resent(abi.Opcode.CREATE, abi.ROOT_ID, body, started=False)
    with pytest.raises(FileExistsError):
        resent(abi.Opcode.MKDIR, abi.ROOT_ID, mkdir, started=False)
