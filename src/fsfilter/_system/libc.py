"""ctypes wrappers for the libc and raw syscalls the standard library lacks.

Identity switches (setfsuid, setfsgid, setgroups) and umask after ``unshare(CLONE_FS)`` act on the
calling thread only; glibc's setgroups() would change every thread, so the raw syscall is used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import struct

from fsfilter._abi import linux


@functools.cache
def _libc_name() -> str:
    return ctypes.util.find_library("c") or "libc.so.6"  # find_library runs ldconfig: once is enough


def load(*, keep_gil: bool = False) -> ctypes.CDLL:
    """A handle on the C library of its own: its function objects, and the argtypes set on them, are not shared
    with another module's. Errors are read with ``ctypes.get_errno()`` (see :func:`check`). ``keep_gil``: called
    through PyDLL, which keeps the GIL over the call (for short, non-blocking syscalls on hot paths; no errno)."""
    return ctypes.PyDLL(_libc_name()) if keep_gil else ctypes.CDLL(_libc_name(), use_errno=True)


def check(result: int, what: str) -> int:
    """``result`` of a libc call, or OSError with the call's errno when it failed (negative)."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


_libc = load()
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsgid.argtypes = [ctypes.c_uint]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def mount(source: bytes, target: bytes, fstype: bytes, flags: int, data: bytes) -> None:
    check(_libc.mount(source, target, fstype, flags, data), "mount")


def umount2(target: bytes, flags: int = 0) -> None:
    check(_libc.umount2(target, flags), "umount2")


def setfsuid(uid: int) -> None:
    _libc.setfsuid(uid)


def setfsgid(gid: int) -> None:
    _libc.setfsgid(gid)


def setgroups_thread(groups: list[int]) -> None:
    """setgroups(2) for the calling thread only."""
    array = (ctypes.c_uint * max(len(groups), 1))(*groups)
    check(_syscall(linux.syscall_number("setgroups"), len(groups), array), "setgroups")


_TGKILL = linux.syscall_number("tgkill")
# Called on every filtered request: through PyDLL, which keeps the GIL over this non-blocking syscall
# instead of handing it to another thread and queueing to get it back.
_syscall_keep_gil = load(keep_gil=True).syscall
_syscall_keep_gil.restype = ctypes.c_long
_syscall_keep_gil.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long]


def is_thread_of(tgid: int, tid: int) -> bool:
    """Whether thread ``tid`` belongs to process ``tgid``: tgkill with signal 0 checks without sending
    anything, in one syscall and no /proc lookup."""
    return tid > 0 and _syscall_keep_gil(_TGKILL, tgid, tid, 0) == 0


# This process's id, kept (getpid is a syscall, and these checks run per request) and renewed in a forked child.
_own_pid = os.getpid()


def _forked() -> None:
    global _own_pid
    _own_pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def is_own_process(pid: int) -> bool:
    """Whether ``pid`` (a process id: a thread-group id) is this process."""
    return pid == _own_pid


def is_own_thread(tid: int) -> bool:
    """Whether thread ``tid`` is one of this process's threads, the main one included: a request the filter makes
    itself (a handler's, a worker's), which must never wait for the filter's own answer."""
    own = _own_pid
    return tid == own or is_thread_of(own, tid)


def unshare(flags: int) -> None:
    check(_libc.unshare(flags), "unshare")


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int) -> None:
    check(_syscall(linux.syscall_number("renameat2"), olddirfd, oldname, newdirfd, newname, flags), "renameat2")


def syncfs(fd: int) -> None:
    check(_syscall(linux.syscall_number("syncfs"), fd), "syncfs")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    check(_libc.fallocate(fd, mode, offset, length), "fallocate")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat_fd(fd: int, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """Set times on an fd (O_PATH ones included) with (sec, nsec) pairs; nsec may be UTIME_NOW or UTIME_OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    check(_syscall(linux.syscall_number("utimensat"), fd, b"", times, linux.AT_EMPTY_PATH), "utimensat")


_DIRENT_HEAD = struct.Struct("<QqHB")  # d_ino, d_off, d_reclen, d_type


class DirentReader:
    """getdents64(2) on a directory fd, keeping the file system's own offsets (for READDIR cookies)."""

    def __init__(self, size: int = 65536) -> None:
        self._buf = ctypes.create_string_buffer(size)
        self._size = size

    def read(self, fd: int) -> list[tuple[int, int, int, bytes]]:
        """The next batch of (ino, next_offset, type, name); an empty list at the end of the directory."""
        n = check(_syscall(linux.syscall_number("getdents64"), fd, self._buf, self._size), "getdents64")
        raw = self._buf.raw[:n]
        out = []
        pos = 0
        while pos < n:
            ino, off, reclen, dtype = _DIRENT_HEAD.unpack_from(raw, pos)
            name = raw[pos + 19:pos + reclen]
            out.append((ino, off, dtype, name[:name.index(b"\0")]))
            pos += reclen
        return out


_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]


def fchown_fd(fd: int, uid: int, gid: int) -> None:
    """Change owner and group of the object an fd (O_PATH ones included, symlinks too) refers to; -1 keeps."""
    check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, linux.AT_EMPTY_PATH), "fchownat")


_libc.readlinkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
_libc.readlinkat.restype = ctypes.c_ssize_t


def readlink_fd(fd: int) -> bytes:
    """The target of the symlink an O_PATH fd refers to."""
    size = 4096
    while True:
        buf = ctypes.create_string_buffer(size)
        n = check(_libc.readlinkat(fd, b"", buf, size), "readlinkat")
        if n < size:
            return buf.raw[:n]
        size *= 4


_libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


def link_fd(fd: int, newdirfd: int, newname: bytes) -> None:
    """A new name for the object an fd refers to (an O_TMPFILE file too); needs CAP_DAC_READ_SEARCH."""
    check(_libc.linkat(fd, b"", newdirfd, newname, linux.AT_EMPTY_PATH), "linkat")


_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_char_p]


def statfs_type(path: str) -> int:
    """statfs(2)'s f_type (the file system's magic number) of the file system ``path`` lies on."""
    buf = ctypes.create_string_buffer(linux.STATFS_SIZE)  # f_type is its first long
    check(_libc.statfs(os.fsencode(path), buf), f"statfs {path}")
    return int(struct.unpack_from("=q", buf.raw, 0)[0]) & 0xFFFFFFFF


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_tuned = False


def keep_large_buffers() -> None:
    """Serve buffers up to 4 MiB from the heap and keep up to 32 MiB of freed heap: glibc otherwise maps and unmaps
    every buffer of 128 KiB or more, so each 1 MiB READ, decrypted chunk run or handler buffer page-faults its way
    in again (measured: an encrypted file's reads went from 400 to 2,400 MiB/s). Once per process."""
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    try:
        _libc.mallopt(_M_MMAP_THRESHOLD, 4 << 20)
        _libc.mallopt(_M_TRIM_THRESHOLD, 32 << 20)
    except AttributeError:  # not glibc
        pass
