"""Restart and upgrade without a gap: one fsfilterd hands its mounts to the next over a UNIX socket.

On SIGTERM fsfilterd does not unmount. It starts a *holder* (``fsfilterd --hold-fd N``: the same program, without a
control socket) and gives it every mount; the holder loads the default rules, serves, and offers the mounts on
``<control socket>.handover`` to the next fsfilterd, which takes them when it starts. Nobody's request goes
unanswered in between for longer than one handover (the giver stops reading, the taker starts): no ENOTCONN, no
remount, and the default rules hold throughout (the taker holds other processes' requests until its rules are in).
With no successor within the grace time, the holder lets go: the mounts are detached (new path walks reach the
directories themselves) and serve what is still inside them until it leaves; then the holder exits.

Why a holder and not systemd's file-descriptor store: with the fds parked in the store nobody reads the connection
while the new service starts (a Python interpreter and its imports: about a second), so every caller waits that long
and a permission request waits with it; the holder answers them all the while. See docs/service.md.

The protocol (SOCK_SEQPACKET, one JSON object per packet): the taker sends {"op": "take", "format": F}; the giver
answers {"op": "state", "fds": N} with a memfd holding the state (api/_handover.py) attached, then ceil(N/250)
packets {"op": "fds"} carrying the fds in order; the taker answers {"op": "adopted"} (the giver then lets go) or
{"op": "refused", "why": ...} (the giver serves on). A giver that gets no answer serves on as well.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from fsfilter._sessions.handover import FORMAT
from fsfilter.api import _handover
from fsfilter.api._stacks import MountStack
from fsfilter.service.peers import peer_credentials

__all__ = ["HandoverError", "give", "peer_is_root", "socket_path_for", "spawn_holder", "take", "unlink_if_ours"]

log = logging.getLogger("fsfilterd")

CHUNK = 250  # fds per packet (the kernel takes at most 253 per message)
PACKET = 65536


class HandoverError(Exception):
    pass


def socket_path_for(control: str) -> str:
    return control + ".handover"


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, flags, _ = socket.recv_fds(sock, PACKET, CHUNK + 3)
    try:
        if flags & socket.MSG_CTRUNC:
            raise HandoverError("fds were cut off in transit (the fd limit is too low?)")
        if not data:
            raise HandoverError("the other side closed the connection")
        try:
            message = json.loads(data)
        except ValueError as exc:
            raise HandoverError(f"not a handover message: {exc}") from exc
        if not isinstance(message, dict):
            raise HandoverError("not a handover message")
    except HandoverError:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds


def peer_is_root(sock: socket.socket) -> bool:
    """Whether the process at the other end is root's (SO_PEERCRED, the kernel's word): only root gives or takes."""
    return peer_credentials(sock)[1] == 0


def unlink_if_ours(path: str, ino: int) -> None:
    """Remove the socket at ``path`` if it is still the one we bound (``ino``): a later process may have bound its
    own there."""
    try:
        if ino and os.lstat(path).st_ino != ino:
            return
        os.unlink(path)
    except OSError:
        pass


def give(sock: socket.socket, service_state: Callable[[list[int]], dict[str, Any]], timeout: float = 30.0) -> bool:
    """Hand every mount of this process to the taker at the other end of ``sock``, with ``service_state(fds)``: what
    the service passes besides (it appends its own fds to ``fds``). True when the taker took them (they are no longer
    this process's); False when it refused or went away (they are served here again)."""
    sock.settimeout(timeout)
    try:
        ask, extra = _receive(sock)
    except (OSError, HandoverError) as exc:
        log.warning("no successor took the mounts: %s", exc)
        return False
    for fd in extra:
        os.close(fd)
    if ask.get("op") != "take" or ask.get("format") != FORMAT:
        _send(sock, {"op": "refused", "why": f"this fsfilterd gives handover format {FORMAT}"})
        log.warning("the successor reads handover format %r, this fsfilterd writes %d: it keeps the mounts",
                    ask.get("format"), FORMAT)
        return False
    exported = _handover.export_all()
    try:
        exported.state["service"] = service_state(exported.fds)
        memfd = os.memfd_create("fsfilter-handover", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(memfd), "wb") as f:
                f.write(json.dumps(exported.state).encode())
            _send(sock, {"op": "state", "fds": len(exported.fds)}, [memfd])
        finally:
            os.close(memfd)
        for i in range(0, len(exported.fds), CHUNK):
            _send(sock, {"op": "fds"}, exported.fds[i:i + CHUNK])
        answer, extra = _receive(sock)
        for fd in extra:
            os.close(fd)
    except Exception as exc:  # whatever went wrong, the mounts must not stay quiesced
        answer = {"op": "refused", "why": f"{type(exc).__name__}: {exc}"}
    if answer.get("op") != "adopted":
        exported.resume()
        log.warning("the successor did not take the mounts (%s): serving them on", answer.get("why", answer))
        return False
    exported.release()
    for left in exported.state["left"]:
        log.warning("%s stays with this process: %s", left["path"], left["why"])
    log.info("handed %d mount(s) to the successor", len(exported.mounts))
    return True


def take(sock: socket.socket, timeout: float = 30.0) -> tuple[list[MountStack], dict[str, Any], list[int]]:
    """Take every mount the giver at the other end of ``sock`` has. They hold other processes' requests until
    api._handover.open_all (put the rules in first). Returns them, the service's part of the state and the fds it
    names by index. On any failure nothing is kept (the giver serves on) and HandoverError is raised."""
    if not peer_is_root(sock):
        raise HandoverError("the process offering mounts is not root's")
    sock.settimeout(timeout)
    _send(sock, {"op": "take", "format": FORMAT})
    fds: list[int] = []
    mounts: list[MountStack] = []
    try:
        head, attached = _receive(sock)
        if head.get("op") != "state" or len(attached) != 1:
            for fd in attached:
                os.close(fd)
            raise HandoverError(f"the giver refused: {head.get('why', head)}")
        with os.fdopen(attached[0], "rb") as f:
            f.seek(0)
            state = json.loads(f.read())
        while len(fds) < int(head["fds"]):
            more, got = _receive(sock)
            fds += got
            if more.get("op") != "fds" or not got:
                raise HandoverError("the giver sent fewer fds than it said")
        if not isinstance(state, dict):
            raise HandoverError("the state is not an object")
        mounts = _handover.adopt(state, fds)
        _send(sock, {"op": "adopted"})
    except Exception as exc:
        _handover.abandon(mounts)  # their sessions stop; the fds are closed below, once
        for fd in fds:
            os.close(fd)
        try:
            _send(sock, {"op": "refused", "why": f"{type(exc).__name__}: {exc}"})
        except OSError:
            pass
        if isinstance(exc, HandoverError):
            raise
        raise HandoverError(f"{type(exc).__name__}: {exc}") from exc
    service = state.get("service")
    return mounts, service if isinstance(service, dict) else {}, fds


def spawn_holder(control_socket: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start the holder (this program, ``--hold-fd``) with one end of a socket pair; give() on the other end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                        "LISTEN_FDNAMES")}  # the holder is not the unit's main process: systemd hears from it nothing
    try:
        proc = subprocess.Popen([sys.executable, "-m", "fsfilter.service", "--foreground", "--socket", control_socket,
                                 "--hold-fd", str(theirs.fileno())], pass_fds=(theirs.fileno(),), env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    finally:
        theirs.close()
    return proc, ours
