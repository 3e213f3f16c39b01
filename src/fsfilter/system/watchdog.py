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
descriptor.
"""

import ctypes
import ctypes.util
import os
import re
import signal
import sys

MNT_DETACH = 2


def unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_at(mountpoint: str, fstype: str) -> set[int]:
    found = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if unescape(fields[4]) == mountpoint and fields[sep + 1] == fstype:
                found.add(int(fields[0]))
    return found


def main() -> int:
    mountpoint, fstype = sys.argv[1], sys.argv[2]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    before = mounts_at(mountpoint, fstype)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    stdin = sys.stdin.buffer
    line = stdin.readline()
    mount_id = int(line) if line.strip().isdigit() else -1
    while stdin.read(4096):
        pass
    now = mounts_at(mountpoint, fstype)
    # Without an id, the daemon died before it could say which (or it never mounted: then nothing is new).
    ours = {mount_id} & now if mount_id >= 0 else now - before
    if len(ours) != 1:
        return 0
    if libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        print(f"fsfilter watchdog: could not detach {mountpoint}: {os.strerror(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
