"""FUSE kernel ABI: opcodes, flags and struct layouts from include/uapi/linux/fuse.h (protocol 7.45).

Protocol notes that matter here:
  7.23  time_gran in init_out           7.28  max_pages, CACHE_SYMLINKS
  7.31  HANDLE_KILLPRIV_V2, SETXATTR_EXT (7.33)   7.36  INIT_EXT, flags2
  7.38  CREATE_SUPP_GROUP                7.40  PASSTHROUGH, backing ids
  7.45  request_timeout in init_out
"""

from __future__ import annotations

import enum
import struct

KERNEL_VERSION = 7
MIN_KERNEL_MINOR = 31  # older kernels lack the killpriv semantics we rely on
OUR_MINOR = 45
ROOT_ID = 1


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53


class InitFlag(enum.IntFlag):
    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    # flags2 (shifted by 32 when combined into one 64-bit value)
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41
    REQUEST_TIMEOUT = 1 << 42


class OpenReplyFlag(enum.IntFlag):
    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6
    PASSTHROUGH = 1 << 7


# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

FUSE_GETATTR_FH = 1 << 0
FUSE_OPEN_KILL_SUIDGID = 1 << 0
FUSE_RELEASE_FLUSH = 1 << 0
FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1
FUSE_WRITE_CACHE = 1 << 0
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_WRITE_KILL_SUIDGID = 1 << 2
FUSE_READ_LOCKOWNER = 1 << 1
FUSE_FSYNC_FDATASYNC = 1 << 0
FUSE_LK_FLOCK = 1 << 0
FUSE_SETXATTR_ACL_KILL_SGID = 1 << 0
FUSE_IOCTL_COMPAT = 1 << 0
FUSE_IOCTL_UNRESTRICTED = 1 << 1
FUSE_IOCTL_RETRY = 1 << 2
FUSE_IOCTL_DIR = 1 << 4
FUSE_INT_REQ_BIT = 1 << 0
FUSE_EXPIRE_ONLY = 1 << 0  # fuse_notify_inval_entry_out.flags

FUSE_EXT_GROUPS = 32  # types 0..31 are security contexts


class NotifyCode(enum.IntEnum):
    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7


# Set in the unique of a request the kernel queued again after FUSE_NOTIFY_RESEND: a predecessor read it and may
# have done it before it died without answering.
UNIQUE_RESEND = 1 << 63


# /dev/fuse ioctls
FUSE_DEV_IOC_CLONE = 0x8004E500
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502

# Struct layouts (little-endian, as the kernel writes them on x86_64 and aarch64).
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
INIT_IN = struct.Struct("<IIIII44x")  # major, minor, max_readahead, flags, flags2, unused[11]
INIT_IN_OLD = struct.Struct("<IIII")  # before 7.36
# major, minor, max_readahead, flags, max_background, congestion_threshold, max_write, time_gran,
# max_pages, map_alignment, flags2, max_stack_depth, request_timeout, unused[5]
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
# ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, *_nsec
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags, dummy, fh
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
# valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, unused,
# uid, gid, unused
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")
MKNOD_IN = struct.Struct("<IIII")  # mode, rdev, umask, padding
MKDIR_IN = struct.Struct("<II")  # mode, umask
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")  # newdir, flags, padding
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")  # flags, open_flags
CREATE_IN = struct.Struct("<IIII")  # flags, mode, umask, open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
RELEASE_IN = struct.Struct("<QIIQ")  # fh, flags, release_flags, lock_owner
FLUSH_IN = struct.Struct("<QIIQ")  # fh, unused, padding, lock_owner
READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, pad
FSYNC_IN = struct.Struct("<QII")
SETXATTR_IN = struct.Struct("<IIII")  # size, flags, setxattr_flags, padding (with SETXATTR_EXT)
SETXATTR_IN_OLD = struct.Struct("<II")
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
LK_IN = struct.Struct("<QQQQIIII")  # fh, owner, start, end, type, pid, lk_flags, padding
LK_OUT = struct.Struct("<QQII")
ACCESS_IN = struct.Struct("<II")
INTERRUPT_IN = struct.Struct("<Q")
FALLOCATE_IN = struct.Struct("<QQQII")  # fh, offset, length, mode, padding
LSEEK_IN = struct.Struct("<QQII")  # fh, offset, whence, padding
LSEEK_OUT = struct.Struct("<Q")
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")  # fh_in, off_in, nodeid_out, fh_out, off_out, len, flags
IOCTL_IN = struct.Struct("<QIIQII")  # fh, flags, cmd, arg, in_size, out_size
IOCTL_OUT = struct.Struct("<iIII")  # result, flags, in_iovs, out_iovs
POLL_IN = struct.Struct("<QQII")
POLL_OUT = struct.Struct("<II")
DIRENT_HEAD = struct.Struct("<QQII")  # ino, off, namelen, type
NOTIFY_INVAL_INODE = struct.Struct("<Qqq")  # ino, off, len
NOTIFY_INVAL_ENTRY = struct.Struct("<QII")  # parent, namelen, flags
NOTIFY_DELETE = struct.Struct("<QQII")  # parent, child, namelen, padding
EXT_HEADER = struct.Struct("<II")  # size, type
SUPP_GROUPS_HEAD = struct.Struct("<I")
BACKING_MAP = struct.Struct("<iIQ")  # fd, flags, padding

ENTRY_OUT_SIZE = ENTRY_OUT_HEAD.size + ATTR.size
ATTR_OUT_SIZE = ATTR_OUT_HEAD.size + ATTR.size
