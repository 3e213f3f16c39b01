"""The rescuer: what a mount's watchdog becomes when the process that served the mount dies without stopping it
(SIGKILL, a crash). It has the connection, the lower directory and the journal the dead process kept (see
_sessions/journal.py), rebuilds the node and handle tables from the journal, has the kernel send again what the dead
process read and never answered, and serves the mount on, so that no program inside gets ENOTCONN:

* "drain" (an application's own filter): the application and its rules are gone, as after stop_filter. The mount is
  detached (new path walks reach the directory itself) and serves the programs still inside, as the plain
  pass-through, until they leave.
* "hold:SOCKET" (fsfilterd): the mount stays where it is and other processes' requests wait, so that no request is
  decided without the rules; the next fsfilterd (systemd restarts it) takes the mount over on
  SOCKET.handover.<mount id>, as from a holder, and puts its rules in. With none within HOLD_GRACE seconds, the mount
  is let go as in "drain".

Nodes are reopened by the names the journal has for them, from the lower directory down; a node whose name no longer
leads to it (renamed or removed behind the mount) is dropped, and so is an open of it that the kernel did not pass
through (its next read or write fails with EBADF). Opens served by kernel passthrough go on in the kernel either way.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from typing import Any

from fsfilter._abi import fuse as abi
from fsfilter._abi import linux
from fsfilter._sessions import handover, journal
from fsfilter._sessions.fuse_session import RESEND_MINOR, Negotiated, SessionOptions
from fsfilter._sessions.lower_fs import LowerFS, LowerOptions
from fsfilter._system import fuse_device, libc
from fsfilter.api import _stacks as stacks
from fsfilter.api import passthrough
from fsfilter.api._stacks import MountStack
from fsfilter.service import handover as service_handover

__all__ = ["HOLD_GRACE", "main", "tables_from_journal"]

log = logging.getLogger("fsfilter.rescue")

# Longer than the gate's own limit (fuse_session.GATE_MAX, 30 s): with no fsfilterd to take the mount, the requests
# held are refused (EAGAIN) rather than decided without the rules; then the mount is let go.
HOLD_GRACE = 35.0


def tables_from_journal(entries: dict[str, Any], lower_fd: int, fds: list[int]) -> dict[str, Any]:
    """The tables in the handover's form (_sessions/handover.py), with every node and open reopened; the fds are
    appended to ``fds``. A node is taken back only when its name still leads to the very object (st_dev, st_ino)
    the journal recorded; an open only of a regular file or directory."""
    nodes = {row[0]: row for row in entries["nodes"]}
    opened: dict[int, int] = {abi.ROOT_ID: lower_fd}  # node id -> its O_PATH fd
    failed: set[int] = set()

    def fd_of(nodeid: int, depth: int = 0) -> int | None:
        if nodeid in opened:
            return opened[nodeid]
        row = nodes.get(nodeid)
        if row is None or nodeid in failed or depth > 4096:
            return None
        parent = fd_of(row[1], depth + 1)
        if parent is None or not row[2]:
            failed.add(nodeid)
            return None
        try:
            fd = os.open(row[2], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except OSError:
            failed.add(nodeid)
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (row[7], row[8]):
            os.close(fd)  # renamed or removed behind the mount, something else there now: not ours to serve
            failed.add(nodeid)
            return None
        opened[nodeid] = fd
        return fd

    rows = []
    for nodeid, parent, name, nlookup, backing_id, backing_refs, daemon_opens, dev, ino in entries["nodes"]:
        fd = fd_of(nodeid)
        if fd is None:
            continue
        fds.append(fd)
        rows.append([nodeid, len(fds) - 1, dev, ino, nlookup, parent, name.hex(), backing_id, backing_refs,
                     daemon_opens, None])
    files, dirs = [], []
    for fh, nodeid, flags, is_dir, through in entries["opens"]:
        node_fd = opened.get(nodeid)
        if node_fd is None:
            continue
        mode = os.fstat(node_fd).st_mode
        if not (stat.S_ISDIR(mode) if is_dir else stat.S_ISREG(mode)):
            continue
        try:  # through the verified node: the same object, whatever its name leads to meanwhile
            fd = os.open(f"/proc/self/fd/{node_fd}",
                         (os.O_RDONLY | os.O_DIRECTORY if is_dir else flags) | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        fds.append(fd)
        if is_dir:
            dirs.append([fh, len(fds) - 1, nodeid])
        else:
            files.append([fh, len(fds) - 1, nodeid, through, "", flags])
    highest = max([abi.ROOT_ID, *nodes])
    return {"next_id": highest + 1, "root_nlookup": 1, "passthrough": True, "nodes": rows, "unlisted": {},
            "files": files, "dirs": dirs, "maybe_done": sorted(entries.get("intents", ()))}


def _detach(stack: MountStack) -> None:
    entry = fuse_device.find_mount(stack.mountpoint)
    if entry is not None and entry.mount_id == stack._mount_id:
        stack.detach_lazily(stack.mountpoint)
    else:
        stack.draining = True


def _detach_if_ours(mountpoint: str, mount_id: int) -> None:
    """Detach the mount at ``mountpoint`` if the topmost one there is the one we were given (else leave it)."""
    entry = fuse_device.find_mount(mountpoint)
    if entry is not None and entry.mount_id == mount_id:
        try:
            libc.umount2(os.fsencode(mountpoint), linux.MNT_DETACH | linux.UMOUNT_NOFOLLOW)
        except OSError as exc:
            log.error("detaching %s failed: %s", mountpoint, exc)


def main(argv: list[str]) -> int:
    mountpoint, mount_id, dev, lower, journal_fd, mode = argv[0], int(argv[1]), *map(int, argv[2:5]), argv[5]
    listener_fd = int(argv[6]) if len(argv) > 6 else -1
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s fsfilter rescuer[%(process)d]: %(levelname)s %(message)s")
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    try:
        return _rescue(mountpoint, mount_id, dev, lower, journal_fd, mode, listener_fd)
    except BaseException:
        # The last resort failed: the directory must not stay a dead mount.
        log.exception("%s: the rescue failed; detaching the mount", mountpoint)
        _detach_if_ours(mountpoint, mount_id)
        return 1


def _rescue(mountpoint: str, mount_id: int, dev: int, lower: int, journal_fd: int, mode: str,
            listener_fd: int) -> int:
    fuse_device.raise_fd_limit()
    entries = journal.read(journal_fd)
    os.close(journal_fd)
    header = entries["header"]
    why = ("the journal ran out of room" if entries["full"] else "the journal is of another version"
           if header.get("journal") != journal.VERSION else "the kernel cannot resend requests (FUSE 7.40)"
           if int(header.get("negotiated", {}).get("minor", 0)) < RESEND_MINOR else "")
    if why:
        log.error("%s: cannot rescue it (%s); detaching it", mountpoint, why)
        _detach_if_ours(mountpoint, mount_id)
        return 1
    fds: list[int] = []
    tables = tables_from_journal(entries, lower, fds)
    tables["passthrough"] = bool(header["negotiated"].get("passthrough"))
    stacks.keep_in_process = True
    stack = MountStack.adopted(header["path"], header["lower"], SessionOptions(**header["session"]),
                               LowerOptions(**header["options"]), bool(header["allow_other"]))

    def fill(fs: LowerFS) -> None:
        handover.import_tables(fs, tables, fds)

    passthrough.rescue_mode = ""  # the rescuer is the last resort: should it die, its watchdog detaches the mount
    stack.start_adopted(dev, lower, mount_id, Negotiated(**header["negotiated"]), fill)
    try:
        stack._watchdog = fuse_device.start_watchdog(stack.mountpoint)
        fuse_device.watch_mount(stack._watchdog, mount_id)
    except OSError as exc:
        log.warning("%s: no watchdog for the rescuer (%s)", mountpoint, exc)
    log.info("%s: the process serving it died; rescued %d node(s), %d open(s) of %d", mountpoint,
             len(tables["nodes"]), len(tables["files"]) + len(tables["dirs"]), len(entries["opens"]))
    with stacks._registry_lock:
        stacks._stacks[stack.mountpoint] = stack
    if mode.startswith("hold:") and not header.get("draining") and listener_fd >= 0:
        if _hold(stack, socket.socket(fileno=listener_fd), f"{mode[5:]}.handover.{mount_id}"):
            return 0
    elif listener_fd >= 0:
        os.close(listener_fd)
    # Drain: the application (its rules with it) is gone, as after stop_filter; what waited is served without them.
    if stack.session is not None:
        stack.session.release_requests()
    _detach(stack)
    if stack.session is not None:
        stack.session.finished.wait()
    log.info("%s: no longer used; rescuer done", mountpoint)
    return 0


def _hold(stack: MountStack, listener: socket.socket, path: str) -> bool:
    """Keep the mount, requests held, for the next fsfilterd, on ``listener`` (bound at ``path`` by the watchdog
    within moments of the death, so that an fsfilterd restarted at once finds it); True when it took the mount."""
    listener.settimeout(0.5)
    try:
        mine = os.stat(path).st_ino
    except OSError:
        mine = 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    deadline = time.monotonic() + HOLD_GRACE
    log.info("%s: held for the next fsfilterd on %s", stack.mountpoint, path)
    try:
        while time.monotonic() < deadline and not stop.is_set() and stack.session is not None \
                and not stack.session.finished.is_set():  # (unmounted meanwhile: nothing left to keep)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                if service_handover.peer_is_root(conn) and service_handover.give(
                        conn, lambda fds: {"apps": [], "listener": None, "owns_socket": False}) \
                        and stack.handed_over:
                    return True  # (a mount that could not move stays here, held)
    finally:
        listener.close()
        if mine:
            service_handover.unlink_if_ours(path, mine)
    log.warning("%s: no fsfilterd took the mount over; letting it go", stack.mountpoint)
    return False
