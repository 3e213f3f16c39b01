"""Peers of the control socket: who is at the other end, as the kernel says (SO_PEERCRED), held by a pidfd."""

from __future__ import annotations

import os
import socket
import struct

from fsfilter.api import _control

__all__ = ["Peer", "has_cap_sys_admin", "peer_credentials"]

CAP_SYS_ADMIN = 21


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from SO_PEERCRED (the kernel's, taken at connect: it cannot be forged)."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


def has_cap_sys_admin(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return False


class Peer:
    """A connected client: who it is (SO_PEERCRED, and a pidfd that keeps naming that very process)."""

    def __init__(self, sock: socket.socket) -> None:
        self.channel = _control.Channel(sock)
        self.pid, self.uid, self.gid = peer_credentials(sock)
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except OSError:
            self.pidfd = -1
        self.privileged = self.uid == 0 or has_cap_sys_admin(self.pid)

    def close(self) -> None:
        self.channel.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
