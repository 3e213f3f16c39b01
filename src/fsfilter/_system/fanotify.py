"""fanotify system calls, and reopening objects from the file handles its records carry."""

from __future__ import annotations

import ctypes
import os

from fsfilter._abi import fanotify as abi
from fsfilter._abi import linux
from fsfilter._system import libc

_libc = libc.load()
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.open_by_handle_at.restype = ctypes.c_int


def init(flags: int, event_f_flags: int) -> int:
    """fanotify_init(2): a new group's fd."""
    return libc.check(_libc.fanotify_init(flags, event_f_flags), "fanotify_init")


def mark(group: int, flags: int, mask: int, path: str | bytes, dirfd: int = linux.AT_FDCWD) -> None:
    """fanotify_mark(2) on ``path`` (relative to ``dirfd``)."""
    libc.check(_libc.fanotify_mark(group, flags, mask, dirfd, os.fsencode(path)), f"fanotify_mark {os.fsdecode(path)}")


def mark_fd(group: int, flags: int, mask: int, fd: int) -> None:
    """fanotify_mark(2) on the object ``fd`` refers to (path NULL)."""
    libc.check(_libc.fanotify_mark(group, flags, mask, fd, None), "fanotify_mark")


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int = os.O_PATH) -> int:
    """open_by_handle_at(2): an fd of the object a FID record names, through any fd on its file system."""
    raw = abi.FILE_HANDLE.pack(len(handle), handle_type) + handle
    return libc.check(_libc.open_by_handle_at(mount_fd, raw, flags | os.O_CLOEXEC), "open_by_handle_at")


_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_char_p]
_FSID_OFFSET = 56  # after f_type, f_bsize, f_blocks, f_bfree, f_bavail, f_files, f_ffree (8 bytes each)


def fsid_of(fd: int) -> tuple[int, int]:
    """The fsid fanotify reports for the file system ``fd`` is on: statfs's f_fsid, its two ints. (Python's
    statvfs folds them into one number in a way that sign-extends the first.)"""
    buf = ctypes.create_string_buffer(linux.STATFS_SIZE)
    libc.check(_libc.fstatfs(fd, buf), "fstatfs")
    first, second = abi.FSID.unpack_from(buf.raw, _FSID_OFFSET)
    return first, second


_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int),
                                    ctypes.c_int]
_libc.name_to_handle_at.restype = ctypes.c_int
_MAX_HANDLE = 128  # MAX_HANDLE_SZ


def handle_of(fd: int) -> tuple[int, bytes]:
    """name_to_handle_at(fd, "", AT_EMPTY_PATH): the (type, bytes) file handle of the object ``fd`` refers to,
    valid through any mount of its file system."""
    buf = ctypes.create_string_buffer(abi.FILE_HANDLE.size + _MAX_HANDLE)
    abi.FILE_HANDLE.pack_into(buf, 0, _MAX_HANDLE, 0)
    mount_id = ctypes.c_int()
    libc.check(_libc.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), linux.AT_EMPTY_PATH), "name_to_handle_at")
    size, handle_type = abi.FILE_HANDLE.unpack_from(buf.raw, 0)
    return handle_type, buf.raw[abi.FILE_HANDLE.size:abi.FILE_HANDLE.size + size]
