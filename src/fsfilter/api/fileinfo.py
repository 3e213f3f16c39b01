"""The Windows file-information structures that ``query_file_information_direct`` and
``set_file_information_direct`` take, filled from and applied to Linux files.

Only the classes with a Linux meaning are known (layouts as on 64-bit Windows; times are FILETIMEs, 100 ns
since 1601-01-01 UTC). Linux keeps no birth time in ``stat``: ``CreationTime`` is the change time.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

from fsfilter._abi import linux
from fsfilter._engine.rules import attributes_from_stat
from fsfilter._system import libc, procfs
from fsfilter.api import constants as c

__all__ = [
    "FILE_ALLOCATION_INFORMATION", "FILE_ATTRIBUTE_TAG_INFORMATION", "FILE_BASIC_INFORMATION",
    "FILE_DISPOSITION_INFORMATION", "FILE_END_OF_FILE_INFORMATION", "FILE_INTERNAL_INFORMATION",
    "FILE_POSITION_INFORMATION", "FILE_RENAME_INFORMATION", "FILE_STANDARD_INFORMATION", "IO_REPARSE_TAG_SYMLINK",
    "apply", "filetime", "ns_from_filetime", "query", "rename_information",
]

FILE_BASIC_INFORMATION = 4
FILE_STANDARD_INFORMATION = 5
FILE_INTERNAL_INFORMATION = 6
FILE_RENAME_INFORMATION = 10
FILE_DISPOSITION_INFORMATION = 13
FILE_POSITION_INFORMATION = 14
FILE_ALLOCATION_INFORMATION = 19
FILE_END_OF_FILE_INFORMATION = 20
FILE_ATTRIBUTE_TAG_INFORMATION = 35

_BASIC = struct.Struct("<qqqqI4x")  # creation, last access, last write, change (FILETIME); attributes
_STANDARD = struct.Struct("<qqIBB2x")  # allocation size, end of file, links, delete pending, directory
_INT64 = struct.Struct("<q")
_TAG = struct.Struct("<II")  # attributes, reparse tag
_RENAME_HEAD = struct.Struct("<B7xQI")  # replace if exists, root directory (must be 0), name length (bytes)
_EPOCH_AS_FILETIME = 116444736000000000  # 1970-01-01 in FILETIME units
IO_REPARSE_TAG_SYMLINK = 0xA000000C


def filetime(ns: int) -> int:
    return ns // 100 + _EPOCH_AS_FILETIME


def ns_from_filetime(ft: int) -> int:
    return (ft - _EPOCH_AS_FILETIME) * 100


def query(fd: int, info_class: int) -> bytes:
    """The structure of ``info_class`` for the open file ``fd``."""
    st = os.fstat(fd)
    name = procfs.fd_target(fd)
    attrs = attributes_from_stat(st.st_mode, st.st_size, st.st_blocks, name)
    if info_class == FILE_BASIC_INFORMATION:
        return _BASIC.pack(filetime(st.st_ctime_ns), filetime(st.st_atime_ns), filetime(st.st_mtime_ns),
                           filetime(st.st_ctime_ns), attrs)
    if info_class == FILE_STANDARD_INFORMATION:
        return _STANDARD.pack(st.st_blocks * 512, st.st_size, st.st_nlink, 0, int(stat.S_ISDIR(st.st_mode)))
    if info_class == FILE_INTERNAL_INFORMATION:
        return _INT64.pack(st.st_ino)
    if info_class == FILE_POSITION_INFORMATION:
        return _INT64.pack(os.lseek(fd, 0, os.SEEK_CUR))
    if info_class == FILE_END_OF_FILE_INFORMATION:
        return _INT64.pack(st.st_size)
    if info_class == FILE_ATTRIBUTE_TAG_INFORMATION:
        return _TAG.pack(attrs, IO_REPARSE_TAG_SYMLINK if attrs & c.FILE_SYS_ATTR_REPARSE_POINT else 0)
    raise OSError(errno.EINVAL, f"file information class {info_class} has no Linux meaning here")


def apply(fd: int, info_class: int, data: bytes) -> None:
    """Apply the structure ``data`` of ``info_class`` to the open file ``fd``."""
    if info_class == FILE_BASIC_INFORMATION:
        _need(data, _BASIC.size)
        _, atime, mtime, _, attrs = _BASIC.unpack_from(data)
        st = os.fstat(fd)
        # 0 leaves a time unchanged, as on Windows (-1 too: "do not update it from now on" has no Linux meaning)
        times = (ns_from_filetime(atime) if atime > 0 else st.st_atime_ns,
                 ns_from_filetime(mtime) if mtime > 0 else st.st_mtime_ns)
        if atime > 0 or mtime > 0:
            os.utime(fd, ns=times)
        if attrs:  # READONLY <-> no write bits; the other attributes are facts of the file on Linux
            mode = stat.S_IMODE(st.st_mode)
            new = mode & ~0o222 if attrs & c.FILE_SYS_ATTR_READ_ONLY else mode | ((mode & 0o444) >> 1)
            if new != mode:
                os.fchmod(fd, new)
        return
    if info_class == FILE_END_OF_FILE_INFORMATION:
        _need(data, 8)
        os.ftruncate(fd, _INT64.unpack_from(data)[0])
        return
    if info_class == FILE_ALLOCATION_INFORMATION:
        _need(data, 8)
        size = _INT64.unpack_from(data)[0]
        if size > 0:
            libc.fallocate(fd, linux.FALLOC_FL_KEEP_SIZE, 0, size)  # reserve blocks; the size stays
        return
    if info_class == FILE_POSITION_INFORMATION:
        _need(data, 8)
        os.lseek(fd, _INT64.unpack_from(data)[0], os.SEEK_SET)
        return
    if info_class == FILE_DISPOSITION_INFORMATION:
        _need(data, 1)
        if data[0]:  # Linux removes the name now; the open file lives on until it is closed, as on Windows
            path = procfs.fd_target(fd)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.rmdir(path)
            else:
                os.unlink(path)
        return
    if info_class == FILE_RENAME_INFORMATION:
        _need(data, _RENAME_HEAD.size)
        replace, root, length = _RENAME_HEAD.unpack_from(data)
        if root:
            raise OSError(errno.EINVAL, "a RootDirectory handle is not supported: give an absolute name")
        raw = data[_RENAME_HEAD.size:_RENAME_HEAD.size + length]
        _need(raw, length)
        target = raw.decode("utf-16-le")
        old = procfs.fd_target(fd)
        if not target.startswith("/"):
            target = os.path.join(os.path.dirname(old), target)
        libc.renameat2(linux.AT_FDCWD, os.fsencode(old), linux.AT_FDCWD, os.fsencode(target),
                       0 if replace else linux.RENAME_NOREPLACE)
        return
    raise OSError(errno.EINVAL, f"file information class {info_class} has no Linux meaning here")


def rename_information(new_name: str, replace_if_exists: bool = False) -> bytes:
    """A FILE_RENAME_INFORMATION structure (for set_file_information_direct)."""
    raw = new_name.encode("utf-16-le")
    return _RENAME_HEAD.pack(int(replace_if_exists), 0, len(raw)) + raw


def _need(data: bytes, size: int) -> None:
    if len(data) < size:
        raise OSError(errno.EINVAL, f"the structure needs {size} bytes, got {len(data)}")
