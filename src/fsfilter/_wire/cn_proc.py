"""Process-connector messages: the subscription request, and the events received."""

from __future__ import annotations

from dataclasses import dataclass

from fsfilter._abi import cn_proc as abi


@dataclass(frozen=True, slots=True)
class ProcEvent:
    what: int
    timestamp_ns: int
    pid: int  # the thread the event is about (for fork: the child)
    tgid: int  # its process
    parent_pid: int = 0  # fork: the parent thread; exit: the parent
    parent_tgid: int = 0
    comm: str = ""  # comm events
    exit_code: int = 0  # a wait status


def subscribe(listen: bool = True, seq: int = 0) -> bytes:
    """A netlink message asking the connector to start (or stop) sending process events."""
    op = abi.PROC_CN_MCAST_LISTEN if listen else abi.PROC_CN_MCAST_IGNORE
    payload = op.to_bytes(4, "little")
    cn = abi.CN_MSG.pack(abi.CN_IDX_PROC, abi.CN_VAL_PROC, seq, 0, len(payload), 0) + payload
    return abi.NLMSGHDR.pack(abi.NLMSGHDR.size + len(cn), abi.NLMSG_DONE, 0, seq, 0) + cn


def decode(datagram: bytes) -> list[ProcEvent]:
    """The events in one datagram (usually one); malformed or foreign messages are skipped."""
    out: list[ProcEvent] = []
    offset = 0
    while offset + abi.NLMSGHDR.size <= len(datagram):
        length = abi.NLMSGHDR.unpack_from(datagram, offset)[0]
        if length < abi.NLMSGHDR.size or offset + length > len(datagram):
            break
        msg = datagram[offset:offset + length]
        offset += (length + 3) & ~3
        if len(msg) < abi.BODY_OFFSET:
            continue
        idx, val = abi.CN_MSG.unpack_from(msg, abi.NLMSGHDR.size)[:2]
        if (idx, val) != (abi.CN_IDX_PROC, abi.CN_VAL_PROC):
            continue
        what, _, stamp = abi.EVENT_HEADER.unpack_from(msg, abi.NLMSGHDR.size + abi.CN_MSG.size)
        body = abi.BODY_OFFSET
        try:
            if what == abi.PROC_EVENT_FORK:
                ppid, ptgid, pid, tgid = abi.FORK.unpack_from(msg, body)
                out.append(ProcEvent(what, stamp, pid, tgid, ppid, ptgid))
            elif what == abi.PROC_EVENT_EXEC:
                pid, tgid = abi.EXEC.unpack_from(msg, body)
                out.append(ProcEvent(what, stamp, pid, tgid))
            elif what == abi.PROC_EVENT_EXIT:
                pid, tgid, code, _, ppid, ptgid = abi.EXIT.unpack_from(msg, body)
                out.append(ProcEvent(what, stamp, pid, tgid, ppid, ptgid, exit_code=code))
            elif what == abi.PROC_EVENT_COMM:
                pid, tgid, comm = abi.COMM.unpack_from(msg, body)
                out.append(ProcEvent(what, stamp, pid, tgid, comm=comm.split(b"\0", 1)[0].decode(errors="replace")))
            else:
                pid, tgid = abi.EXEC.unpack_from(msg, body)
                out.append(ProcEvent(what, stamp, pid, tgid))
        except Exception:  # struct.error on a short message: skip it
            continue
    return out
