"""Unmounts a FUSE mount when the daemon that serves it dies, however it dies.

Run as ``python -S -I watchdog.py MOUNTPOINT MOUNT_ID FSTYPE`` with a pipe on stdin whose write end
only the daemon holds. EOF on stdin means the daemon is gone (stopped or killed); if the mount is
still there, it is detached at once so that the directory is usable again. The mount id check makes
sure a later mount at the same place is never touched. Standard library only; imports nothing from
fsfilter so that it starts fast and does not hold the daemon's /dev/fuse descriptor.
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


def still_mounted(mountpoint: str, mount_id: int, fstype: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if int(fields[0]) == mount_id and unescape(fields[4]) == mountpoint and fields[sep + 1] == fstype:
                return True
    return False


def main() -> int:
    mountpoint, mount_id, fstype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):
        pass
    if not still_mounted(mountpoint, mount_id, fstype):
        return 0
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        print(f"fsfilter watchdog: could not detach {mountpoint}: {os.strerror(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
