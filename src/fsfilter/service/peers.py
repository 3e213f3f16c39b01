"""Peers of the control socket: who is at the other end, as the kernel says (SO_PEERCRED), held by a pidfd."""

from __future__ import annotations

import os
import socket
import struct

from fsfilter.api import _control

__all__ = ["SEND_TIMEOUT", "Peer", "peer_credentials"]

SEND_TIMEOUT = 10  # seconds a send to a peer may block before the connection is given up

def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from SO_PEERCRED (the kernel's, taken at connect: it cannot be forged)."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


class Peer:
    """A connected client: who it is (SO_PEERCRED, and a pidfd that keeps naming that very process)."""

    def __init__(self, sock: socket.socket) -> None:
        # A peer that stops reading (stopped, hung) must not block a thread of the service in a send for ever:
        # the kernel gives up after SEND_TIMEOUT (receiving is not limited: an idle peer is fine).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT, 0))
        self.channel = _control.Channel(sock)
        self.pid, self.uid, self.gid = peer_credentials(sock)
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except OSError:
            self.pidfd = -1
        # uid 0 as the kernel saw it at connect (SO_PEERCRED, mapped into the service's user namespace). Not the
        # capability sets in /proc: a user namespace gives any user a full CapEff, and the process may have
        # exec'd a set-uid program since it connected.
        self.privileged = self.uid == 0

    def close(self) -> None:
        self.channel.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
