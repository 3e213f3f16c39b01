"""The keeper: a forked process that goes on serving a detached mount, as the plain pass-through, until the last
program inside it leaves.

When the last filter of a mount stops while programs still have files open or their cwd inside, the mount is
detached (new path walks reach the directory itself) and handed to a keeper, so that the application may exit
without breaking them (issue 14; docs/design/decisions.md). The parent has stopped the session's threads first, so
no thread of the parent holds a lock the child inherits, and it removed every filter layer, so nothing in the child
calls into the application. The child keeps only the connection and the lower fds, leaves the parent's session and
process group (a Ctrl-C at the terminal is not for it), serves until the kernel ends the connection, and exits
without running anything of the application's.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from fsfilter._abi import linux
from fsfilter._sessions.fuse_session import Session
from fsfilter._sessions.lower_fs import LowerFS
from fsfilter._system import fuse_device, libc, procfs

__all__ = ["detach_when_uncovered", "fds_of", "serve_forked"]


def fds_of(fs: LowerFS, extra: set[int]) -> set[int]:
    """The fds the tables of ``fs`` hold (nodes, open files and directories), with ``extra``."""
    keep = set(extra)
    keep.update(node.fd for node in fs.nodes.values())
    keep.update(f.fd for f in fs.files.values())
    keep.update(d.fd for d in fs.dirs.values())
    return keep


def detach_when_uncovered(mountpoint: str, mount_id: int, finished: threading.Event) -> None:
    """A mount another mount was put over cannot be detached by its path (that names the upper one): wait until it
    is on top again (the upper one went), then detach it, so that it drains instead of serving the path forever."""
    while not finished.wait(1.0):
        entries = [e for e in procfs.mountinfo() if e.mount_id == mount_id]
        if not entries:
            return  # gone already
        top = fuse_device.find_mount(mountpoint)
        if top is not None and top.mount_id == mount_id:
            try:
                libc.umount2(os.fsencode(mountpoint), linux.MNT_DETACH | linux.UMOUNT_NOFOLLOW)
            except OSError:
                pass
            return


def serve_forked(session: Session, keep: set[int], covered: tuple[str, int] | None = None) -> None:
    """The child's whole life: never returns. ``covered``: (mount point, mount id) of a mount still attached under
    another one, to detach once it is uncovered."""
    code = 0
    try:
        # The application's log handlers write to fds closed below, whose numbers the keeper reuses for lower files:
        # one log line would land in a user's file.
        logging.disable(logging.CRITICAL)
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd not in keep:
                try:
                    os.close(fd)  # the application's sockets, pipes and files are not the keeper's to hold
                except OSError:
                    pass
        session.serve_again()
        if covered is not None:
            detach_when_uncovered(covered[0], covered[1], session.finished)
        session.finished.wait()
    except BaseException:
        code = 1  # nothing to tell it to: stderr is /dev/null, and the application may be gone
    finally:
        os._exit(code)
