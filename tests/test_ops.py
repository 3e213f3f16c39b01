"""The operation table: one row per opcode, every decoder checks lengths (a malformed body is a WireError, never
another exception), and the session's routing sets come from the rows."""

from __future__ import annotations

import errno

from hypothesis import given, settings
from hypothesis import strategies as st

from fsfilter._abi import fuse as abi
from fsfilter._wire import fuse as wire
from fsfilter._wire import ops, replies


def request(opcode: int, body: bytes, nodeid: int = 1) -> wire.Request:
    raw = abi.IN_HEADER.pack(abi.IN_HEADER.size + len(body), opcode, 7, nodeid, 0, 0, 1, 0, 0) + body
    return wire.decode_request(raw)


def test_every_row_is_whole() -> None:
    methods = set()
    for opcode, spec in ops.OPS.items():
        assert spec.opcode == opcode and abi.Opcode(opcode).name
        assert issubclass(spec.decode, ops.Op)
        assert all(issubclass(kind, replies.Reply) for kind in spec.reply)
        assert set(spec.names) <= set(spec.decode.__slots__)
        methods.add(spec.method)
    assert {abi.Opcode.FORGET, abi.Opcode.BATCH_FORGET} == ops.NO_REPLY
    assert {abi.Opcode.SETLKW} == ops.DEFERRABLE
    assert abi.Opcode.READ in ops.SIDE_EFFECT_FREE and abi.Opcode.WRITE not in ops.SIDE_EFFECT_FREE
    assert abi.Opcode.INIT not in ops.OPS and abi.Opcode.INTERRUPT not in ops.OPS  # the session's own
    from fsfilter._sessions.layer import Layer
    assert all(callable(getattr(Layer, m, None)) for m in methods)  # every row has a layer method


def test_decoded_fields() -> None:
    op = ops.decode_op(request(abi.Opcode.RENAME2, abi.RENAME2_IN.pack(5, 1, 0) + b"old\0new\0"))
    assert isinstance(op, ops.Rename) and (op.name, op.new_dir, op.new_name, op.flags) == (b"old", 5, b"new", 1)
    op = ops.decode_op(request(abi.Opcode.WRITE, abi.WRITE_IN.pack(3, 10, 4, 0, 0, 0, 0) + b"data"))
    assert isinstance(op, ops.Write) and (op.fh, op.offset, bytes(op.data)) == (3, 10, b"data")
    op = ops.decode_op(request(abi.Opcode.GETATTR, abi.GETATTR_IN.pack(0, 0, 9)))
    assert isinstance(op, ops.Getattr) and op.fh is None  # no FUSE_GETATTR_FH: the handle is not meant
    assert ops.decode_op(request(abi.Opcode.STATX, b"")) is None  # not served: the session answers ENOSYS


def test_short_and_bad_bodies_are_wire_errors() -> None:
    for opcode, body, code in ((abi.Opcode.WRITE, abi.WRITE_IN.pack(3, 0, 10, 0, 0, 0, 0) + b"short", errno.EINVAL),
                               (abi.Opcode.LOOKUP, b"a/b\0", errno.EINVAL),
                               (abi.Opcode.LOOKUP, b"x" * 300 + b"\0", errno.ENAMETOOLONG),
                               (abi.Opcode.OPEN, abi.OPEN_IN.pack(1 << 31, 0), errno.EINVAL)):
        try:
            ops.decode_op(request(opcode, body))
        except wire.WireError as exc:
            assert exc.code == code
        else:
            raise AssertionError(f"{abi.Opcode(opcode).name} {body!r} decoded")


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(sorted(ops.OPS)), st.binary(max_size=160))
def test_any_body_decodes_or_is_a_wire_error(opcode: int, body: bytes) -> None:
    try:
        op = ops.decode_op(request(opcode, body))
    except wire.WireError:
        return
    assert op is not None and op.opcode == opcode
