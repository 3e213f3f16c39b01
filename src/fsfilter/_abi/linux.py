"""Linux constants that the Python standard library does not export (x86_64 and aarch64)."""

from __future__ import annotations

import platform

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_REMOVEDIR = 0x200
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_RDONLY = 1
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21

MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 0x8  # umount2: do not follow a symlink at the target

SO_RCVBUFFORCE = 33  # SO_RCVBUF beyond net.core.rmem_max, for CAP_NET_ADMIN

CLONE_FS = 0x200

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

XATTR_CREATE = 1
XATTR_REPLACE = 2

STATFS_SIZE = 120  # sizeof(struct statfs) on x86_64 and aarch64

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602

_SYSCALLS = {
    "x86_64": {"tgkill": 234, "setgroups": 116, "renameat2": 316, "syncfs": 306, "utimensat": 280, "getdents64": 217,
               "open": 2, "creat": 85, "openat": 257, "openat2": 437, "open_by_handle_at": 304, "execve": 59,
               "execveat": 322},
    "aarch64": {"tgkill": 131, "setgroups": 159, "renameat2": 276, "syncfs": 267, "utimensat": 88, "getdents64": 61,
                "openat": 56, "openat2": 437, "open_by_handle_at": 265, "execve": 221, "execveat": 281},
}


def syscall_numbers() -> dict[str, int]:
    """This architecture's syscall numbers that fsfilter knows (a name missing here has no such syscall)."""
    table = _SYSCALLS.get(platform.machine())
    if table is None:
        raise OSError(f"unsupported architecture {platform.machine()}: fsfilter knows x86_64 and aarch64")
    return dict(table)


def syscall_number(name: str) -> int:
    """The number of a syscall on this machine's architecture."""
    machine = platform.machine()
    table = _SYSCALLS.get(machine)
    if table is None:
        raise OSError(f"unsupported architecture {machine}: fsfilter knows x86_64 and aarch64")
    return table[name]

# statfs f_type of file systems a filter cannot stand on: kernel-generated content, no real files (linux/magic.h)
PSEUDO_FS_MAGIC = {
    0x9FA0: "proc", 0x62656572: "sysfs", 0x0027E0EB: "cgroup", 0x63677270: "cgroup2", 0x64626720: "debugfs",
    0x74726163: "tracefs", 0x73636673: "securityfs", 0x1CD1: "devpts", 0xCAFE4A11: "bpf", 0x62656570: "configfs",
    0x65735543: "fusectl", 0x6165676C: "pstore", 0xDE5E81E4: "efivarfs", 0xF97CFF8C: "selinuxfs",
    0x19800202: "mqueue", 0x6E736673: "nsfs", 0x42494E4D: "binfmt_misc", 0x0187: "autofs", 0x958458F6: "hugetlbfs",
}
FUSE_SUPER_MAGIC = 0x65735546
