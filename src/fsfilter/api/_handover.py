"""Handing this process's mounts to another process that goes on serving them: fsfilterd's restart and upgrade.

The giver stops serving (quiesce: every request it read is answered, nothing more is read), writes down each mount
(its settings, what the kernel negotiated, the bottom layer's tables) and passes it with its fds; the taker builds the
same mounts around them, holds other processes' requests while its own rules join the stacks, then serves. Nothing is
unmounted or remounted: the kernel sees one connection answered first by one process, then by the other. The layers
are not carried: the taker puts in its own (default rules from the rules files; applications attach again).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict
from typing import Any

from fsfilter._sessions import handover, keeper
from fsfilter._sessions.fuse_session import Negotiated, SessionOptions
from fsfilter._sessions.lower_fs import LowerFS, LowerOptions
from fsfilter._system import fuse_device
from fsfilter.api import _stacks as stacks
from fsfilter.api._stacks import MountStack

__all__ = ["Exported", "adopt", "export_all"]

log = logging.getLogger("fsfilter")


class Exported:
    """The mounts a giver quiesced and wrote down: ``state`` (plain data) and ``fds`` (its indexes name them)."""

    def __init__(self, mounts: list[MountStack], state: dict[str, Any], fds: list[int]) -> None:
        self.mounts = mounts
        self.state = state
        self.fds = fds

    def resume(self) -> None:
        """The taker did not take them: serve them again here."""
        for stack in self.mounts:
            if stack.session is not None:
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
    for m in state["mounts"]:
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
        made.append(stack)
    return made


def open_all(mounts: list[MountStack]) -> None:
    """The taker's rules are in place: serve everyone, and watch the mounts (a watchdog detaches them should this
    process die)."""
    for stack in mounts:
        session = stack.session
        if session is None:
            continue
        session.release_requests()
        try:
            stack._watchdog = fuse_device.start_watchdog(stack.mountpoint)
            fuse_device.watch_mount(stack._watchdog, stack._mount_id)
        except OSError as exc:
            log.warning("%s: no watchdog (%s): should this process die, the mount stays until unmounted by hand",
                        stack.mountpoint, exc)
