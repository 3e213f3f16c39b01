"""/dev/fuse: opening and cloning the device, backing ids, mounting and unmounting."""

from __future__ import annotations

import array
import errno
import fcntl
import os
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from fsfilter._abi import fuse as abi
from fsfilter._abi import linux
from fsfilter._system import libc, procfs
from fsfilter._system.procfs import MountEntry as MountEntry  # passthrough.py names it here

DEVICE = "/dev/fuse"
FSTYPE = "fuse.fsfilter"
WATCHDOG = Path(__file__).with_name("watchdog.py")


def raise_fd_limit() -> int:
    """Raise the soft limit on open fds to the hard limit: the daemon holds one fd per inode the kernel
    remembers, which is many more than the usual soft limit of 1024. Returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft


def open_device() -> int:
    return os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)


def clone_device(session_fd: int) -> int:
    """A new /dev/fuse fd attached to the same connection, so another thread can read requests from it."""
    fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, abi.FUSE_DEV_IOC_CLONE, array.array("I", [session_fd]))
    except OSError:
        os.close(fd)
        raise
    return fd


def retire_fd(fd: int) -> None:
    """Close the file behind ``fd`` but keep the number taken (by /dev/null), for when a thread that cannot be
    stopped may still use it: what it writes then goes nowhere instead of into a file opened later."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


def backing_open(session_fd: int, fd: int) -> int:
    """Register ``fd`` as the backing file of a passthrough open; returns the backing id."""
    arg = bytearray(abi.BACKING_MAP.pack(fd, 0, 0))
    return int(fcntl.ioctl(session_fd, abi.FUSE_DEV_IOC_BACKING_OPEN, arg, True))


def backing_close(session_fd: int, backing_id: int) -> None:
    fcntl.ioctl(session_fd, abi.FUSE_DEV_IOC_BACKING_CLOSE, array.array("i", [backing_id]))


def find_mount(mountpoint: str, fstype: str = FSTYPE) -> MountEntry | None:
    """The topmost mount of ``fstype`` at ``mountpoint`` (mountinfo lists later mounts last)."""
    found = None
    for entry in procfs.mountinfo():
        if entry.mountpoint == mountpoint and entry.fstype == fstype:
            found = entry
    return found


def kernel_mount(session_fd: int, target: str, *, root_mode: int, allow_other: bool, fsname: str) -> None:
    """mount(2) as root. The kernel checks permissions itself (default_permissions), as the lower file system
    would: the daemon runs as root and so does not depend on its own identity for access checks."""
    options = f"fd={session_fd},rootmode={root_mode & 0o170000:o},user_id={os.getuid()},group_id={os.getgid()}"
    options += ",default_permissions"
    if allow_other:
        options += ",allow_other"
    libc.mount(os.fsencode(fsname), os.fsencode(target), FSTYPE.encode(), linux.MS_NOSUID | linux.MS_NODEV,
               options.encode())


def fusermount_mount(target: str, *, fsname: str, allow_other: bool
                     ) -> tuple[int, subprocess.Popen[bytes], socket.socket]:
    """Mount without privileges through fusermount3, which passes back the /dev/fuse fd over a socket.

    With ``auto_unmount`` fusermount3 stays alive and unmounts when our end of the socket closes, which
    is what the watchdog does for root mounts. Returns the device fd and the fusermount3 process.
    """
    tool = shutil.which("fusermount3")
    if tool is None:
        raise OSError(errno.ENOENT, "fusermount3 not found: install the fuse3 package, or run as root")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    options = f"default_permissions,auto_unmount,fsname={fsname},subtype=fsfilter"
    if allow_other:
        options += ",allow_other"
    env = {**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}
    # A session of its own: a Ctrl-C at the terminal signals the whole foreground group, and fusermount3
    # killed by it could no longer unmount for us.
    proc = subprocess.Popen([tool, "-o", options, "--", target], env=env, start_new_session=True,
                            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    theirs.close()
    try:
        msg, ancdata, _flags, _addr = ours.recvmsg(1, socket.CMSG_SPACE(4))
        fds = [int.from_bytes(data[:4], sys.byteorder) for level, kind, data in ancdata
               if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS]
        if not fds:
            proc.wait(timeout=10)
            detail = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise OSError(errno.EPERM, f"fusermount3 refused to mount {target}: {detail or 'no reason given'}")
        os.set_inheritable(fds[0], False)
        return fds[0], proc, ours
    except BaseException:
        ours.close()
        raise


def fusermount_unmount(target: str) -> None:
    """Unmount a mount fusermount3 made (lazily, so a busy one goes too). auto_unmount alone is not enough:
    fusermount3 unmounts on our socket's EOF only if it then finds the connection dead, which it did not
    here (the mount stayed, answering EACCES/ENOTCONN)."""
    tool = shutil.which("fusermount3")
    if tool is None:
        raise OSError(errno.ENOENT, "fusermount3 not found: install the fuse3 package")
    r = subprocess.run([tool, "-u", "-z", "-q", "--", target], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=30)
    if r.returncode != 0:
        detail = r.stderr.decode(errors="replace").strip()
        raise OSError(errno.EBUSY, f"fusermount3 -u {target} failed: {detail or f'exit {r.returncode}'}")


def unmount(target: str) -> bool:
    """Unmount ``target``; detach lazily if it is busy. Returns False if it was not mounted."""
    path = os.fsencode(target)
    try:
        libc.umount2(path, 0)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            libc.umount2(path, linux.MNT_DETACH)
        elif exc.errno in (errno.EINVAL, errno.ENOENT):
            return False
        else:
            raise
    return True


def start_watchdog(target: str, rescue: tuple[int, int, int, str, str] | None = None) -> subprocess.Popen[bytes]:
    """A separate process that detaches the mount at ``target`` when this process dies (see watchdog.py).
    Started before mounting, and returned once it is ready: afterwards, starting it could need files under
    the mount (this interpreter, its libraries) that nobody serves yet. Tell it the mount id with
    :func:`watch_mount` once mounted. ``rescue``: (connection fd, lower directory fd, journal fd, the directory
    fsfilter is imported from, mode): it holds them, and on this process's death rescues the mount instead
    (tell it :func:`release_watchdog` before stopping on purpose)."""
    args = [sys.executable, "-S", "-I", str(WATCHDOG), target, FSTYPE]
    fds: tuple[int, ...] = ()
    if rescue is not None:
        fds = rescue[:3]
        args += ["--rescue", *(str(x) for x in rescue)]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, pass_fds=fds,
                            start_new_session=True)
    assert proc.stdout is not None
    if proc.stdout.readline() != b"ready\n":
        proc.kill()
        proc.wait()
        raise OSError(errno.ECHILD, "the watchdog process did not start")
    proc.stdout.close()
    return proc


def watch_mount(watchdog: subprocess.Popen[bytes], mount_id: int) -> None:
    assert watchdog.stdin is not None
    watchdog.stdin.write(b"%d\n" % mount_id)
    watchdog.stdin.flush()


def release_watchdog(watchdog: subprocess.Popen[bytes]) -> None:
    """This process stops serving on purpose: the watchdog lets go of the fds it held for a rescue."""
    try:
        if watchdog.stdin is not None and not watchdog.stdin.closed:
            watchdog.stdin.write(b"release\n")
            watchdog.stdin.flush()
    except OSError:
        pass


def widen_readahead(device: str, max_read: int) -> None:
    """Let the kernel read ahead up to one largest READ on the mount of ``device`` ("major:minor"): FUSE caps its
    readahead at the default 128 KiB whatever INIT says, so sequential reads the daemon serves (a file a handler
    reads, a view its handlers serve) would otherwise come in 128 KiB requests, each a round trip. Files under kernel
    passthrough read ahead on their backing file and are unaffected. Best effort (root only)."""
    if not device or max_read <= 0:
        return
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(max_read // 1024))
    except OSError:
        pass  # (not root, or no such device info: the default stays)
