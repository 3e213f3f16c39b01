"""Handing this process's mounts to another process that goes on serving them: fsfilterd's restart and upgrade.

The giver stops serving (quiesce: every request it read is answered, nothing more is read), writes down each mount
(its settings, what the kernel negotiated, the bottom layer's tables) and passes it with its fds; the taker builds the
same mounts around them, holds other processes' requests while its own rules join the stacks, then serves. Nothing is
unmounted or remounted: the kernel sees one connection answered first by one process, then by the other. The layers
are not carried: the taker puts in its own (default rules from the rules files; applications attach again).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import asdict
from typing import Any

from fsfilter._sessions import handover, keeper
from fsfilter._sessions.fuse_session import Negotiated, SessionOptions
from fsfilter._sessions.lower_fs import LowerFS, LowerOptions
from fsfilter._system import fuse_device
from fsfilter.api import _stacks as stacks
from fsfilter.api._stacks import MountStack

__all__ = ["Exported", "abandon", "adopt", "export_all", "open_all"]

log = logging.getLogger("fsfilter")


class Exported:
    """The mounts a giver quiesced and wrote down: ``state`` (plain data) and ``fds`` (its indexes name them)."""

    def __init__(self, mounts: list[MountStack], state: dict[str, Any], fds: list[int]) -> None:
        self.mounts = mounts
        self.state = state
        self.fds = fds

    def resume(self) -> None:
        """The taker did not take them: serve them again here, with whatever it read and did not answer sent again."""
        for stack in self.mounts:
            if stack.session is not None:
                stack.session.resend()
                stack.session.resume()

    def release(self) -> None:
        """The taker serves them now: let go of them without unmounting or ending anything (the taker holds the
        connection and its own copies of every fd). Filters still on them here leave without touching the mount."""
        with stacks._registry_lock:
            for stack in self.mounts:
                stack.handed_over = True
                if stacks._stacks.get(stack.mountpoint) is stack:
                    del stacks._stacks[stack.mountpoint]
                if stack in stacks._draining:
                    stacks._draining.remove(stack)
        for stack in self.mounts:
            watchdog, stack._watchdog = stack._watchdog, None
            if watchdog is not None:  # killed, not told: told, it would detach the mount the taker serves
                watchdog.kill()
                watchdog.wait()
                if watchdog.stdin is not None:
                    watchdog.stdin.close()
            if stack.session is not None:
                stack.session.stopping()
            stack._teardown(1.0)


def export_all(timeout: float = 5.0) -> Exported:
    """Quiesce every mount of this process (live and draining) and write them down. A mount that cannot move (a
    request handler did not return, locks held through the daemon) is resumed here and left out; it is listed in
    the state's "left" with the reason."""
    with stacks._registry_lock:
        candidates = list(stacks._stacks.values()) + list(stacks._draining)
    mounts: list[MountStack] = []
    described: list[dict[str, Any]] = []
    left: list[dict[str, str]] = []
    fds: list[int] = []
    for stack in candidates:
        session, fs = stack.session, stack.fs
        if session is None or fs is None or stack._dev_fd < 0:
            continue
        if stack._watchdog is not None:
            # From here on, should this process die, the mount is the taker's or lost; never rescued beside it.
            fuse_device.release_watchdog(stack._watchdog)
        if not session.quiesce(timeout):
            session.resume()
            left.append({"path": stack.mountpoint, "why": f"a request handler did not return within {timeout} s"})
            continue
        mark = len(fds)
        try:
            with fs.quiet():
                tables = handover.export_tables(fs, fds)
        except handover.Unmovable as exc:
            del fds[mark:]
            session.resume()
            left.append({"path": stack.mountpoint, "why": str(exc)})
            continue
        covered = stack._mount_id >= 0 and not stack._ours(fuse_device.find_mount(stack.mountpoint))
        fds.append(stack._dev_fd)
        fds.append(stack._lower_fd)
        described.append({
            "path": stack.mountpoint, "lower": stack.lower, "mount_id": stack._mount_id, "draining": stack.draining,
            "covered": covered, "allow_other": stack.allow_other, "dev": len(fds) - 2, "lower_fd": len(fds) - 1,
            "session": asdict(stack.session_options), "negotiated": asdict(session.negotiated),
            "options": {k: v for k, v in asdict(stack.lower_options).items() if k != "io_policy"},
            "tables": tables})
        mounts.append(stack)
    return Exported(mounts, {"format": handover.FORMAT, "mounts": described, "left": left}, fds)


def adopt(state: dict[str, Any], fds: list[int]) -> list[MountStack]:
    """Build the mounts a giver wrote down, around the fds it passed; they are registered (filters started here
    join them) and read requests, but hold other processes' until :func:`open_all`. Raises ValueError on a format
    this code does not know (nothing is kept then: the caller closes the fds)."""
    if state.get("format") != handover.FORMAT:
        raise ValueError(f"handover format {state.get('format')!r}; this fsfilterd reads format {handover.FORMAT}")
    made: list[MountStack] = []
    try:
        for m in state["mounts"]:
            made.append(_adopt_one(m, fds))
    except BaseException:
        abandon(made)
        raise
    return made


def _check(m: dict[str, Any], fds: list[int]) -> None:
    """What the giver says must be what the fds are: a FUSE connection, a directory, and (unless detached) our mount
    at the path it names."""
    dev = os.fstat(fds[m["dev"]])
    if not stat.S_ISCHR(dev.st_mode) or (os.major(dev.st_rdev), os.minor(dev.st_rdev)) != (10, 229):
        raise ValueError(f"{m['path']}: the connection fd is not /dev/fuse")
    if not stat.S_ISDIR(os.fstat(fds[m["lower_fd"]]).st_mode):
        raise ValueError(f"{m['path']}: the lower fd is not a directory")
    if not m["draining"] and not m["covered"]:
        entry = fuse_device.find_mount(m["path"])
        if entry is None or entry.mount_id != int(m["mount_id"]):
            raise ValueError(f"{m['path']}: mount {m['mount_id']} is not there")


def _adopt_one(m: dict[str, Any], fds: list[int]) -> MountStack:
    _check(m, fds)
    stack = MountStack.adopted(m["path"], m["lower"], SessionOptions(**m["session"]),
                               LowerOptions(**m["options"]), bool(m["allow_other"]))
    tables: dict[str, Any] = m["tables"]

    def fill(fs: LowerFS, tables: dict[str, Any] = tables) -> None:
        handover.import_tables(fs, tables, fds)

    stack.start_adopted(fds[m["dev"]], fds[m["lower_fd"]], int(m["mount_id"]), Negotiated(**m["negotiated"]), fill)
    with stacks._registry_lock:
        if m["draining"]:
            stack.draining = True
            stacks._draining.append(stack)
        else:
            stacks._stacks[stack.mountpoint] = stack
    if m["covered"] and stack.session is not None:
        threading.Thread(target=keeper.detach_when_uncovered, args=(stack.mountpoint, stack._mount_id,
                         stack.session.finished), name="fsfilter-uncover", daemon=True).start()
    try:  # from now on, should this process die, the mount is detached rather than left answering ENOTCONN
        stack._watchdog = fuse_device.start_watchdog(stack.mountpoint, stack.rescue_fds())
        fuse_device.watch_mount(stack._watchdog, stack._mount_id)
    except OSError as exc:
        log.warning("%s: no watchdog (%s): should this process die, the mount stays until unmounted by hand",
                    stack.mountpoint, exc)
    return stack


def abandon(mounts: list[MountStack]) -> None:
    """Undo adopt(): the sessions stop reading, the stacks leave the registry, their watchdogs go without detaching
    anything (the giver serves on). The fds are the caller's to close."""
    for stack in mounts:
        with stacks._registry_lock:
            if stacks._stacks.get(stack.mountpoint) is stack:
                del stacks._stacks[stack.mountpoint]
            if stack in stacks._draining:
                stacks._draining.remove(stack)
        watchdog, stack._watchdog = stack._watchdog, None
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()
        session, stack.session = stack.session, None
        if session is not None:
            session.stopping()
            session.close(1.0)
        stack.fs = None
        stack._dev_fd = stack._lower_fd = -1


def open_all(mounts: list[MountStack]) -> None:
    """The taker's rules are in place: serve everyone."""
    for stack in mounts:
        if stack.session is not None:
            stack.session.release_requests()
