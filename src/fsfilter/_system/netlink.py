"""Netlink sockets: the kernel's process connector, which reports every fork, exec, exit and name change."""

from __future__ import annotations

import socket

from fsfilter._abi import cn_proc as abi
from fsfilter._abi import linux
from fsfilter._wire import cn_proc as wire

RCVBUF = 8 << 20  # room for a burst of records while the reader is busy; an overflow loses them (ENOBUFS)


def open_proc_connector(timeout: float, rcvbuf: int = RCVBUF) -> socket.socket:
    """A netlink socket subscribed to the process connector's events, its reads timing out after ``timeout``
    seconds. OSError without CAP_NET_ADMIN or on a kernel without CONFIG_PROC_EVENTS."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, abi.NETLINK_CONNECTOR)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, linux.SO_RCVBUFFORCE, rcvbuf)  # root may exceed rmem_max
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, abi.CN_IDX_PROC))
        sock.settimeout(timeout)
        sock.send(wire.subscribe(True))
    except BaseException:
        sock.close()
        raise
    return sock


def close_proc_connector(sock: socket.socket) -> None:
    """Unsubscribe, then close. The kernel counts listeners and makes no records while there are none, so every
    subscription is taken back (a failure to send is ignored: closing is what matters then)."""
    try:
        sock.send(wire.subscribe(False))
    except OSError:
        pass
    sock.close()
