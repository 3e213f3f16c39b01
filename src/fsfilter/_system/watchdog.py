"""Unmounts a FUSE mount when the daemon that serves it dies, however it dies.

Run as ``python -S -I watchdog.py MOUNTPOINT FSTYPE`` with a pipe on stdin whose write end only the daemon
holds, *before* the daemon mounts: once the mount is there, starting a process may need files below it (the
interpreter, its libraries), which only the daemon can serve, and it cannot while it waits for us. So this
loads everything it will ever need first, says "ready" on stdout, and then needs nothing from any file
system. The daemon then writes the new mount's id as a line. EOF on stdin means the daemon is gone (stopped or
killed); if the mount is still there, it is detached at once so that the directory is usable again. The mount
id makes sure a later mount at the same place is never touched; when the daemon died before it could send
the id, the one fsfilter mount at MOUNTPOINT that was not there when we started is taken to be its. Standard
library only; imports nothing from fsfilter so that it starts fast and does not hold the daemon's /dev/fuse
descriptor. The one exception is procfs.py beside it (standard library only too), loaded by its path for the
mountinfo parser.

With ``--rescue DEV LOWER JOURNAL SRC MODE`` it also holds the mount's /dev/fuse connection, its lower directory and
its journal (fds inherited from the daemon), so that the daemon's death does not end the connection. The daemon
writes "release" before it stops on purpose (the fds are then closed at once, and EOF means what it always meant).
EOF without "release" is a death: instead of detaching, the watchdog becomes the rescuer (service/rescue.py, imported
from SRC), which rebuilds the tables from the journal and serves the mount on (MODE "drain": as the plain
pass-through, detached, until unused; "hold:SOCKET": attached, other processes' requests held, until the next
fsfilterd takes it over). A rescuer is not started when the interpreter or SRC lies under the mount (it could not
start while nobody serves it).
"""

import ctypes
import ctypes.util
import importlib.util
import os
import signal
import sys
from types import ModuleType

MNT_DETACH = 2


def _load_procfs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_fsfilter_watchdog_procfs",
                                                  os.path.join(os.path.dirname(os.path.abspath(__file__)), "procfs.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks the module of a class up there
    spec.loader.exec_module(module)
    return module


procfs = _load_procfs()


def release(rescue: list[str]) -> None:
    """Close the fds held for a rescue (the daemon stops on purpose: a connection it ends must end)."""
    for fd in rescue[:3]:
        try:
            os.close(int(fd))
        except OSError:
            pass


def offer(path: str) -> int:
    """A listening socket at ``path`` (root's only) for the rescuer to hand the mount over on; -1 if none."""
    import socket
    import stat
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mask = os.umask(0o177)
    try:
        sock.bind(path)
        sock.listen(4)
    except OSError:
        sock.close()
        return -1
    finally:
        os.umask(mask)
    fd = sock.detach()
    os.set_inheritable(fd, True)
    return fd


def mounts_at(mountpoint: str, fstype: str) -> set[int]:
    return {m.mount_id for m in procfs.mountinfo() if m.mountpoint == mountpoint and m.fstype == fstype}


def _under(path: str, top: str) -> bool:
    path = os.path.realpath(path)
    return path == top or path.startswith(top.rstrip("/") + "/")


def main() -> int:
    mountpoint, fstype = sys.argv[1], sys.argv[2]
    rescue: list[str] = []
    if len(sys.argv) == 9 and sys.argv[3] == "--rescue":
        rescue = sys.argv[4:9]  # dev, lower, journal, src, mode
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    before = mounts_at(mountpoint, fstype)
    # The rescuer starts a Python program: the interpreter, its libraries, the dynamic loader's cache and fsfilter
    # must not lie under the mount, which nobody serves while it starts.
    needs = [sys.executable, rescue[3] if rescue else "", os.path.dirname(os.__file__), sys.base_prefix,
             "/etc/ld.so.cache", "/usr/lib", "/lib"]
    if rescue and any(p and (_under(p, mountpoint) or p == sys.executable and os.path.abspath(p).startswith(
            mountpoint.rstrip("/") + "/")) for p in needs):
        release(rescue)
        rescue = []
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    stdin = sys.stdin.buffer
    line = stdin.readline()
    mount_id = int(line) if line.strip().isdigit() else -1
    while True:
        line = stdin.readline()
        if not line:
            break
        if line.strip() == b"release" and rescue:
            release(rescue)
            rescue = []
    if rescue and mount_id >= 0:
        # The daemon died: become the rescuer, with the fds it left us.
        dev, lower, journal, src, mode = rescue
        listener = -1
        if mode.startswith("hold:"):
            # Offered at once, so that an fsfilterd restarted right away finds it while the rescuer starts.
            listener = offer(f"{mode[5:]}.handover.{mount_id}")
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from fsfilter.service.rescue import main; "
                "sys.exit(main(sys.argv[2:]))")
        try:
            os.execv(sys.executable, [sys.executable, "-S", "-c", code, src, mountpoint, str(mount_id), dev, lower,
                                      journal, mode, str(listener)])
        except OSError as exc:
            print(f"fsfilter watchdog: could not start the rescuer: {exc}", file=sys.stderr)
            release(rescue)
    now = mounts_at(mountpoint, fstype)
    # Without an id, the daemon died before it could say which (or it never mounted: then nothing is new).
    ours = {mount_id} & now if mount_id >= 0 else now - before
    if len(ours) != 1:
        return 0
    # The path names the topmost mount there: when another was put over ours, detaching by the path would take
    # that one away instead. Ours stays (it fails with ENOTCONN under the other, which its owner sees).
    top = [m.mount_id for m in procfs.mountinfo() if m.mountpoint == mountpoint and m.fstype == fstype]
    if not top or top[-1] not in ours:
        return 0
    if libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        print(f"fsfilter watchdog: could not detach {mountpoint}: {os.strerror(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
