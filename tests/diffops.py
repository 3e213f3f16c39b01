"""Differential file-operation sequences: the same random operations on a native directory and on one seen
through fsfilter, with every result compared.

An operation is a tuple of JSON-able values (so a failing one can be printed and replayed, and workers
can be handed their parameters); ``Tree.run`` applies one to a tree and gives back ``("ok", value)`` or
``("err", "ENAME")``. ``OpGen`` draws the next operation from a seeded ``random.Random`` and the state of
the native tree. ``run_sequence`` drives both trees step by step and raises ``Mismatch`` at the first
difference. Run as a script, this module is the worker that runs sequences:
``python diffops.py '<json config>'`` prints one JSON line with the outcome. Sequences always run in a
process of their own, never in the one that serves the mount: a page fault on a mapping of the mount
taken while holding the GIL would wait for a daemon thread that needs the GIL.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import random
import stat
import struct
import sys
from collections.abc import Callable
from typing import Any

from fsfilter._abi import linux
from fsfilter._system import libc

Op = tuple[Any, ...]
Result = tuple[str, Any]

NAMES = ("a", "b", "q", "ab", "qa")  # few names, so collisions (EEXIST, ENOENT, ENOTDIR, EISDIR) are common
POLICY_LETTER = b"q"  # the mixed variant serves I/O of files whose name holds this letter in the daemon
MODES = (0o644, 0o600, 0o755, 0o000, 0o666, 0o777, 0o444, 0o2755, 0o4755, 0o1777, 0o6711, 0o2644, 0o1700, 0o3775)
UMASKS = (0o022, 0o002, 0o077, 0o000, 0o027)
UIDS = (-1, 0, 1000, 65534)
GIDS = (-1, 0, 100, 65534)
XATTRS = ("user.a", "user.b", "user.qq", "trusted.t", "system.posix_acl_access")
ACL_NAMES = ("system.posix_acl_access", "system.posix_acl_default")
# POSIX ACL xattr entry tags (linux/posix_acl_xattr.h); "no id" for the entries that carry none.
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
ACL_NO_ID = 0xFFFFFFFF
# Explicit times are set in 1998..2008; anything later is "recent" (set by the kernel to now). Times are
# compared exactly when explicit and only as "recent" otherwise: both trees never agree on "now".
EXPLICIT_BELOW = 1_300_000_000 * 10**9
KIB = 1024
MAX_IO = 300 * KIB

FALLOC_ZERO_RANGE = 0x10
SEEK_NAMES = {os.SEEK_SET: "SET", os.SEEK_CUR: "CUR", os.SEEK_END: "END", os.SEEK_DATA: "DATA",
              os.SEEK_HOLE: "HOLE"}
OPEN_FLAGS = [("O_WRONLY", os.O_WRONLY), ("O_RDWR", os.O_RDWR), ("O_CREAT", os.O_CREAT), ("O_EXCL", os.O_EXCL),
              ("O_TRUNC", os.O_TRUNC), ("O_APPEND", os.O_APPEND), ("O_NONBLOCK", os.O_NONBLOCK),
              ("O_DIRECT", os.O_DIRECT), ("O_TMPFILE", os.O_TMPFILE), ("O_DIRECTORY", os.O_DIRECTORY),
              ("O_NOFOLLOW", os.O_NOFOLLOW)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]


for _fn in ("getxattr", "lgetxattr"):
    getattr(_libc, _fn).argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    getattr(_libc, _fn).restype = ctypes.c_ssize_t
for _fn in ("listxattr", "llistxattr"):
    getattr(_libc, _fn).argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    getattr(_libc, _fn).restype = ctypes.c_ssize_t


def xattr_sized(path: str, name: str | None, size: int, follow: bool) -> tuple[int, bytes]:
    """getxattr(2) (or listxattr(2) when ``name`` is None) with a buffer of exactly ``size`` bytes: the size
    probe (0), ERANGE for a short buffer, the value otherwise."""
    buf = ctypes.create_string_buffer(max(size, 1))
    if name is None:
        fn = _libc.listxattr if follow else _libc.llistxattr
        n = fn(os.fsencode(path), buf if size else None, size)
    else:
        fn = _libc.getxattr if follow else _libc.lgetxattr
        n = fn(os.fsencode(path), name.encode(), buf if size else None, size)
    if n < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return (n, buf.raw[:n] if size else b"")


def utimensat(path: str, atime: int | str, mtime: int | str, follow: bool) -> None:
    """utimensat(2) with a time in ns, or "now" (UTIME_NOW) or "omit" (UTIME_OMIT) for each."""
    def spec(t: int | str) -> _Timespec:
        if t == "now":
            return _Timespec(0, linux.UTIME_NOW)
        if t == "omit":
            return _Timespec(0, linux.UTIME_OMIT)
        assert isinstance(t, int)
        return _Timespec(*divmod(t, 10**9))

    times = (_Timespec * 2)(spec(atime), spec(mtime))
    flags = 0 if follow else linux.AT_SYMLINK_NOFOLLOW
    if _libc.utimensat(linux.AT_FDCWD, os.fsencode(path), ctypes.byref(times), flags) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    if stat.S_ISFIFO(mode):
        return "p"
    if stat.S_ISSOCK(mode):
        return "s"
    return "?"


def time_class(ns: int) -> int | str:
    return ns if ns < EXPLICIT_BELOW else "recent"


def summary(st: os.stat_result) -> tuple[Any, ...]:
    """The stat fields both trees must agree on (st_ino, st_dev, st_blocks, atime, ctime legitimately differ)."""
    # Data through a fifo never reaches the filter (the kernel handles fifos itself), so neither do the times
    # it sets.
    mtime = time_class(st.st_mtime_ns) if not stat.S_ISFIFO(st.st_mode) else None
    return (kind(st.st_mode), oct(stat.S_IMODE(st.st_mode)), st.st_size, st.st_nlink, st.st_uid, st.st_gid, mtime)


class Tree:
    """Applies operations to the directory ``root``; file descriptors live in numbered slots."""

    def __init__(self, root: str) -> None:
        self.root = os.fspath(root)
        self.slots: dict[int, int] = {}
        self.slot_kind: dict[int, str] = {}

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def fd(self, slot: int) -> int:
        fd = self.slots.get(slot)
        if fd is None:
            raise OSError(errno.EBADF, f"slot {slot} is not open")
        return fd

    def run(self, op: Op) -> Result:
        name, *args = op
        try:
            return ("ok", getattr(self, "do_" + name)(*args))
        except OSError as exc:
            return ("err", errno.errorcode.get(exc.errno or 0, str(exc.errno)))

    def close_all(self) -> None:
        for slot in list(self.slots):
            self.do_close(slot)

    # -- state the generator looks at (on the native tree)

    def entries(self) -> list[tuple[str, str]]:
        """(relative path, kind) of everything below the root that can be listed, sorted."""
        out: list[tuple[str, str]] = []
        stack = [""]
        while stack:
            d = stack.pop()
            try:
                listing = list(os.scandir(self.path(d)))
            except OSError:
                continue
            for e in listing:
                rel = f"{d}/{e.name}" if d else e.name
                try:
                    k = kind(e.stat(follow_symlinks=False).st_mode)
                except OSError:
                    continue
                out.append((rel, k))
                if k == "d":
                    stack.append(rel)
        out.sort()
        return out

    def slot_size(self, slot: int) -> int:
        try:
            return os.fstat(self.slots[slot]).st_size
        except (OSError, KeyError):
            return 0

    def follows_to(self, rel: str) -> str | None:
        try:
            return kind(os.stat(self.path(rel)).st_mode)
        except OSError:
            return None

    # -- operations on open files

    def do_open(self, slot: int, rel: str, flags: int, mode: int) -> tuple[Any, ...]:
        if slot in self.slots:
            self.do_close(slot)
        fd = os.open(self.path(rel), flags | os.O_CLOEXEC, mode)
        st = os.fstat(fd)
        self.slots[slot] = fd
        self.slot_kind[slot] = kind(st.st_mode)
        return summary(st)

    def do_close(self, slot: int) -> None:
        fd = self.fd(slot)
        del self.slots[slot]
        del self.slot_kind[slot]
        os.close(fd)

    def do_read(self, slot: int, size: int) -> bytes:
        return os.read(self.fd(slot), size)

    def do_pread(self, slot: int, size: int, offset: int) -> bytes:
        return os.pread(self.fd(slot), size, offset)

    def do_write(self, slot: int, seed: int, size: int) -> int:
        return os.write(self.fd(slot), data(seed, size))

    def do_pwrite(self, slot: int, seed: int, size: int, offset: int) -> int:
        return os.pwrite(self.fd(slot), data(seed, size), offset)

    def do_lseek(self, slot: int, offset: int, whence: int) -> int:
        return os.lseek(self.fd(slot), offset, whence)

    def do_ftruncate(self, slot: int, size: int) -> None:
        os.ftruncate(self.fd(slot), size)

    def do_fsync(self, slot: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(self.fd(slot))

    def do_fstat(self, slot: int) -> tuple[Any, ...]:
        return summary(os.fstat(self.fd(slot)))

    def do_fallocate(self, slot: int, mode: int, offset: int, length: int) -> tuple[Any, ...]:
        fd = self.fd(slot)
        libc.fallocate(fd, mode, offset, length)
        return summary(os.fstat(fd))

    def do_copy(self, src: int, dst: int, size: int, off_in: int | None, off_out: int | None) -> int:
        return os.copy_file_range(self.fd(src), self.fd(dst), size, off_in, off_out)

    def do_mmap(self, slot: int, offset: int, length: int, seed: int, wlen: int, woff: int) -> tuple[Any, ...]:
        """Map part of the file (clamped to its size, which must not fault), read it, write into it through
        the mapping and msync; the digests before and after."""
        fd = self.fd(slot)
        length = min(length, os.fstat(fd).st_size - offset)
        if length <= 0:
            return ("beyond the end",)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if wlen else 0)
        with mmap.mmap(fd, length, mmap.MAP_SHARED, prot, offset=offset) as m:
            before = hashlib.sha1(m[:]).hexdigest()
            if wlen:
                woff = min(woff, length - 1)
                chunk = data(seed, min(wlen, length - woff))
                m[woff:woff + len(chunk)] = chunk
                m.flush()
            after = hashlib.sha1(m[:]).hexdigest()
        if wlen:
            # tmpfs leaves mtime alone on writes through a mapping; the filter's daemon writes the pages back
            # with pwrite, which sets it. Both are right for their file system: make mtime "recent" on both.
            try:
                os.utime(fd)
            except OSError:
                pass
        return (length, before, after)

    def do_sendfile(self, src: int, dst: int, offset: int | None, size: int) -> int:
        return os.sendfile(self.fd(dst), self.fd(src), offset, size)

    def do_fdlist(self, slot: int) -> list[str]:
        return sorted(os.listdir(self.fd(slot)))

    def do_linkfd(self, slot: int, rel: str) -> tuple[Any, ...]:
        # linkat(fd, "", AT_EMPTY_PATH): gives an O_TMPFILE file its name (here /proc/self/fd/N gets EXDEV).
        libc.link_fd(self.fd(slot), linux.AT_FDCWD, os.fsencode(self.path(rel)))
        return summary(os.lstat(self.path(rel)))

    # -- operations on names

    def do_stat(self, rel: str, follow: bool) -> tuple[Any, ...]:
        return summary(os.stat(self.path(rel), follow_symlinks=follow))

    def do_truncate(self, rel: str, size: int) -> None:
        os.truncate(self.path(rel), size)

    def do_chmod(self, rel: str, mode: int) -> tuple[Any, ...]:
        os.chmod(self.path(rel), mode)
        return summary(os.stat(self.path(rel)))

    def do_chown(self, rel: str, uid: int, gid: int, follow: bool) -> tuple[Any, ...]:
        os.chown(self.path(rel), uid, gid, follow_symlinks=follow)
        return summary(os.stat(self.path(rel), follow_symlinks=follow))

    def do_utime(self, rel: str, atime: int | str, mtime: int | str, follow: bool, via_os: bool
                 ) -> tuple[Any, ...]:
        path = self.path(rel)
        if via_os:
            os.utime(path, ns=(atime, mtime), follow_symlinks=follow)
        else:
            utimensat(path, atime, mtime, follow)
        st = os.stat(path, follow_symlinks=follow)
        # atime is compared only right after it was set: reads and listings move it under relatime, and the
        # filter's cached attributes legitimately do not follow that.
        return (*summary(st), time_class(st.st_atime_ns) if atime != "omit" else None)

    def do_access(self, rel: str, mode: int) -> bool:
        return os.access(self.path(rel), mode)

    def do_mkdir(self, rel: str, mode: int) -> tuple[Any, ...]:
        os.mkdir(self.path(rel), mode)
        return summary(os.lstat(self.path(rel)))

    def do_rmdir(self, rel: str) -> None:
        os.rmdir(self.path(rel))

    def do_unlink(self, rel: str) -> None:
        os.unlink(self.path(rel))

    def do_rename(self, src: str, dst: str) -> None:
        os.rename(self.path(src), self.path(dst))

    def do_renameat2(self, src: str, dst: str, flags: int) -> None:
        libc.renameat2(linux.AT_FDCWD, os.fsencode(self.path(src)), linux.AT_FDCWD, os.fsencode(self.path(dst)),
                       flags)

    def do_link(self, src: str, dst: str, follow: bool) -> tuple[Any, ...]:
        os.link(self.path(src), self.path(dst), follow_symlinks=follow)
        return summary(os.lstat(self.path(dst)))

    def do_symlink(self, target: str, rel: str) -> tuple[Any, ...]:
        os.symlink(target, self.path(rel))
        return summary(os.lstat(self.path(rel)))

    def do_readlink(self, rel: str) -> str:
        return os.readlink(self.path(rel))

    def do_listdir(self, rel: str) -> list[str]:
        return sorted(os.listdir(self.path(rel)))

    def do_mknod(self, rel: str, mode: int) -> tuple[Any, ...]:
        os.mknod(self.path(rel), mode)
        return summary(os.lstat(self.path(rel)))

    def do_setxattr(self, rel: str, name: str, seed: int, size: int, flags: int, follow: bool) -> None:
        os.setxattr(self.path(rel), name, data(seed, size), flags, follow_symlinks=follow)

    def do_getxattr(self, rel: str, name: str, follow: bool) -> bytes:
        return os.getxattr(self.path(rel), name, follow_symlinks=follow)

    def do_xattr_sized(self, rel: str, name: str | None, size: int, follow: bool) -> tuple[int, bytes]:
        return xattr_sized(self.path(rel), name, size, follow)

    def do_listxattr(self, rel: str, follow: bool) -> list[str]:
        return sorted(os.listxattr(self.path(rel), follow_symlinks=follow))

    def do_removexattr(self, rel: str, name: str, follow: bool) -> None:
        os.removexattr(self.path(rel), name, follow_symlinks=follow)

    def do_umask(self, mask: int) -> None:
        os.umask(mask)

    def do_flock(self, slot: int, operation: int) -> None:
        fcntl.flock(self.fd(slot), operation)

    def do_lockf(self, slot: int, cmd: int, length: int, start: int) -> None:
        fcntl.lockf(self.fd(slot), cmd, length, start)

    def do_setacl(self, rel: str, name: str, entries: list[list[int]]) -> tuple[Any, ...]:
        blob = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)
        os.setxattr(self.path(rel), name, blob)
        st = os.stat(self.path(rel))
        return (*summary(st), os.getxattr(self.path(rel), name))

    def do_statfs(self, rel: str) -> tuple[int, int, int]:
        st = os.statvfs(self.path(rel))
        return (st.f_bsize, st.f_frsize, st.f_namemax)


class OpGen:
    """Draws random operations for a root caller (``NobodyGen`` tunes them for an unprivileged one)."""

    WEIGHTS = {
        "open": 12, "close": 5, "read": 4, "pread": 5, "write": 6, "pwrite": 8, "lseek": 3, "ftruncate": 3,
        "fsync": 2, "fstat": 3, "fallocate": 3, "copy": 2, "linkfd": 1, "stat": 5, "truncate": 2, "chmod": 3,
        "chown": 2, "utime": 4, "access": 1, "mkdir": 4, "rmdir": 3, "unlink": 4, "rename": 6, "renameat2": 3,
        "link": 3, "symlink": 3, "readlink": 2, "listdir": 3, "mknod": 1, "setxattr": 4, "getxattr": 2,
        "listxattr": 2, "removexattr": 2, "umask": 1, "mmap": 3, "fdlist": 1, "sendfile": 1, "xattr_sized": 2,
        "flock": 2, "lockf": 2, "setacl": 2, "statfs": 1,
    }
    SLOTS = 4
    TMPFILE = True  # draw O_TMPFILE opens (a filter with rules on the directory refuses them: EOPNOTSUPP)
    # draw SEEK_DATA/SEEK_HOLE (a file system may store no holes, as POSIX allows: encrypted files report none)
    HOLES = True
    FALLOCATE_MODES = (0, linux.FALLOC_FL_KEEP_SIZE, linux.FALLOC_FL_PUNCH_HOLE | linux.FALLOC_FL_KEEP_SIZE,
                       linux.FALLOC_FL_PUNCH_HOLE | linux.FALLOC_FL_KEEP_SIZE, linux.FALLOC_FL_PUNCH_HOLE,
                       FALLOC_ZERO_RANGE)

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.kinds = list(self.WEIGHTS)
        self.weights = list(self.WEIGHTS.values())

    def next(self, tree: Tree) -> Op:
        self.entries = tree.entries()
        self.tree = tree
        op: str = self.rng.choices(self.kinds, self.weights)[0]
        return getattr(self, "g_" + op)()  # type: ignore[no-any-return]

    # -- helpers

    def new_path(self) -> str:
        depth = self.rng.choices((1, 2, 3), (4, 3, 2))[0]
        parts = [self.rng.choice(NAMES) for _ in range(depth)]
        if self.rng.random() < 0.02:
            parts.insert(self.rng.randrange(len(parts) + 1), ".")
        return "/".join(parts)

    def path(self, kinds: str = "fdlp", existing: float = 0.75) -> str:
        cands = [rel for rel, k in self.entries if k in kinds]
        if cands and self.rng.random() < existing:
            return self.rng.choice(cands)
        return self.new_path()

    def target_path(self) -> str:
        """A name to create: mostly a new name in an existing directory, sometimes an existing one."""
        r = self.rng.random()
        if r < 0.6:
            dirs = [rel for rel, k in self.entries if k == "d"]
            d = self.rng.choice(dirs) if dirs and self.rng.random() < 0.7 else ""
            name = self.rng.choice(NAMES)
            return f"{d}/{name}" if d else name
        if r < 0.8:
            return self.path()
        return self.new_path()

    def open_slot(self, want_file: bool = False) -> int | None:
        slots = sorted(self.tree.slots)
        if want_file:
            slots = [s for s in slots if self.tree.slot_kind[s] != "d"] or slots
        return self.rng.choice(slots) if slots else None

    def size(self) -> int:
        r = self.rng.random()
        if r < 0.08:
            return 0
        if r < 0.4:
            return self.rng.randint(1, 200)
        if r < 0.65:
            return max(0, self.rng.choice((4096, 8192, 65536, 131072, 12288)) + self.rng.randint(-2, 2))
        if r < 0.67:  # past the filter's largest WRITE (max_write, 1 MiB): the kernel splits it
            return self.rng.randint(1 << 20, (1 << 20) + 300 * KIB)
        return self.rng.randint(1, MAX_IO)

    def offset(self, current: int) -> int:
        r = self.rng.random()
        if r < 0.15:
            return 0
        if r < 0.4:
            return max(0, current + self.rng.randint(-5000, 5000))
        if r < 0.65:
            return max(0, self.rng.randint(0, 80) * 4096 + self.rng.choice((-1, 0, 0, 1)))
        return self.rng.randint(0, MAX_IO)

    def seed(self) -> int:
        return self.rng.getrandbits(32)

    def explicit_time(self) -> int:
        return self.rng.randint(900_000_000, 1_200_000_000) * 10**9 + self.rng.choice((0, self.rng.randrange(10**9)))

    def uid(self) -> int:
        return self.rng.choice(UIDS)

    def gid(self) -> int:
        return self.rng.choice(GIDS)

    # -- open files

    def g_open(self) -> Op:
        free = [s for s in range(self.SLOTS) if s not in self.tree.slots]
        if not free:
            return ("close", self.rng.choice(sorted(self.tree.slots)))
        slot = self.rng.choice(free)
        rng = self.rng
        if rng.random() < 0.04 and self.TMPFILE:
            flags = os.O_TMPFILE | rng.choice((os.O_RDWR, os.O_WRONLY, os.O_RDWR, os.O_RDONLY))
            if rng.random() < 0.3:
                flags |= os.O_EXCL
            return ("open", slot, self.path("d", 0.9) if rng.random() < 0.9 else "", flags, rng.choice(MODES))
        flags = rng.choice((os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR))
        create = rng.random() < 0.45
        path = self.target_path() if create else self.path("fdlp")
        for flag, p in ((os.O_CREAT, 0.8 if create else 0.1), (os.O_EXCL, 0.15), (os.O_TRUNC, 0.12),
                        (os.O_APPEND, 0.2), (os.O_DIRECTORY, 0.06), (os.O_NOFOLLOW, 0.1), (os.O_NONBLOCK, 0.15),
                        (os.O_DIRECT, 0.04)):
            if rng.random() < p:
                flags |= flag
        if self.tree.follows_to(path) == "p":
            flags |= os.O_NONBLOCK  # a fifo would block the open (the same on both trees, but forever)
        return ("open", slot, path, flags, rng.choice(MODES))

    def g_close(self) -> Op:
        slot = self.open_slot()
        return ("close", slot) if slot is not None else self.g_open()

    def g_read(self) -> Op:
        slot = self.open_slot(True)
        return ("read", slot, self.size()) if slot is not None else self.g_open()

    def g_pread(self) -> Op:
        slot = self.open_slot(True)
        if slot is None:
            return self.g_open()
        return ("pread", slot, self.size(), self.offset(self.tree.slot_size(slot)))

    def g_write(self) -> Op:
        slot = self.open_slot(True)
        return ("write", slot, self.seed(), self.size()) if slot is not None else self.g_open()

    def g_pwrite(self) -> Op:
        slot = self.open_slot(True)
        if slot is None:
            return self.g_open()
        return ("pwrite", slot, self.seed(), self.size(), self.offset(self.tree.slot_size(slot)))

    def g_lseek(self) -> Op:
        # Directory offsets are the file system's own cookies: only files are compared.
        slots = [s for s in sorted(self.tree.slots) if self.tree.slot_kind[s] != "d"]
        if not slots:
            return self.g_open()
        slot = self.rng.choice(slots)
        whence = self.rng.choice((os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE, os.SEEK_DATA,
                                  os.SEEK_HOLE) if self.HOLES else (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END))
        if whence in (os.SEEK_CUR, os.SEEK_END):
            off = self.rng.randint(-5000, 5000)
        else:
            off = self.offset(self.tree.slot_size(slot))
        return ("lseek", slot, off, whence)

    def g_ftruncate(self) -> Op:
        slot = self.open_slot(True)
        if slot is None:
            return self.g_open()
        size = self.rng.choice((0, self.offset(self.tree.slot_size(slot)), self.tree.slot_size(slot)))
        return ("ftruncate", slot, size)

    def g_fsync(self) -> Op:
        slot = self.open_slot()
        return ("fsync", slot, self.rng.random() < 0.5) if slot is not None else self.g_open()

    def g_fstat(self) -> Op:
        slot = self.open_slot()
        return ("fstat", slot) if slot is not None else self.g_open()

    def g_fallocate(self) -> Op:
        slot = self.open_slot(True)
        if slot is None:
            return self.g_open()
        mode = self.rng.choice(self.FALLOCATE_MODES)
        length = 0 if self.rng.random() < 0.05 else self.rng.randint(1, MAX_IO)
        return ("fallocate", slot, mode, self.offset(self.tree.slot_size(slot)), length)

    def g_copy(self) -> Op:
        src, dst = self.open_slot(True), self.open_slot(True)
        if src is None or dst is None:
            return self.g_open()
        off_in = self.offset(self.tree.slot_size(src)) if self.rng.random() < 0.7 else None
        off_out = self.offset(self.tree.slot_size(dst)) if self.rng.random() < 0.7 else None
        return ("copy", src, dst, self.size(), off_in, off_out)

    def g_mmap(self) -> Op:
        slots = [s for s in sorted(self.tree.slots) if self.tree.slot_kind[s] == "f"]
        if not slots:
            return self.g_open()
        slot = self.rng.choice(slots)
        # Only pages that hold data (natively): a fault on a hole makes tmpfs allocate the page, which
        # SEEK_DATA then reports, while the filter's daemon reads the hole without allocating anything.
        fd, page = self.tree.slots[slot], mmap.PAGESIZE
        offset = page * self.rng.randint(0, max(0, self.tree.slot_size(slot) - 1) // page)
        pos = os.lseek(fd, 0, os.SEEK_CUR)  # the file offset is part of the state under test: keep it
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except OSError:
            start = end = 0
        os.lseek(fd, pos, os.SEEK_SET)
        offset = start - start % page
        if start % page or end - offset <= 0:
            return self.g_fstat()
        length = min(self.size() or 1, end - offset)
        wlen = self.size() if self.rng.random() < 0.6 else 0
        return ("mmap", slot, offset, length, self.seed(), wlen, self.rng.randint(0, 3 * page))

    def g_sendfile(self) -> Op:
        src, dst = self.open_slot(True), self.open_slot(True)
        if src is None or dst is None:
            return self.g_open()
        offset = self.offset(self.tree.slot_size(src)) if self.rng.random() < 0.7 else None
        return ("sendfile", src, dst, offset, self.size())

    def g_fdlist(self) -> Op:
        slots = [s for s in sorted(self.tree.slots) if self.tree.slot_kind[s] == "d"] or sorted(self.tree.slots)
        return ("fdlist", self.rng.choice(slots)) if slots else self.g_open()

    def g_linkfd(self) -> Op:
        slot = self.open_slot(True)
        return ("linkfd", slot, self.target_path()) if slot is not None else self.g_open()

    # -- names

    def g_stat(self) -> Op:
        return ("stat", self.path() if self.rng.random() < 0.95 else "", self.rng.random() < 0.6)

    def g_truncate(self) -> Op:
        return ("truncate", self.path("fl"), self.offset(self.rng.randint(0, MAX_IO)))

    def g_chmod(self) -> Op:
        return ("chmod", self.path(), self.rng.choice(MODES))

    def g_chown(self) -> Op:
        return ("chown", self.path(), self.uid(), self.gid(), self.rng.random() < 0.6)

    def g_utime(self) -> Op:
        rng = self.rng
        via_os = rng.random() < 0.3
        if via_os:
            atime, mtime = self.explicit_time(), self.explicit_time()
        else:
            atime = rng.choice((self.explicit_time(), "now", "omit"))
            mtime = rng.choice((self.explicit_time(), "now", "omit"))
        return ("utime", self.path(), atime, mtime, rng.random() < 0.7, via_os)

    def g_access(self) -> Op:
        return ("access", self.path(), self.rng.choice((os.F_OK, os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK)))

    def g_mkdir(self) -> Op:
        return ("mkdir", self.target_path(), self.rng.choice((0o755, 0o700, 0o777, 0o2775, 0o1777, 0o555)))

    def g_rmdir(self) -> Op:
        return ("rmdir", self.path("d", 0.85))

    def g_unlink(self) -> Op:
        return ("unlink", self.path("flpd" if self.rng.random() < 0.1 else "flp"))

    def g_rename(self) -> Op:
        src = self.path("fdlp", 0.9)
        r = self.rng.random()
        if r < 0.05:
            dst = src  # onto itself
        elif r < 0.15 and "/" not in src:
            dst = f"{src}/{self.rng.choice(NAMES)}"  # into itself, when it is a directory
        else:
            dst = self.target_path()
        return ("rename", src, dst)

    def g_renameat2(self) -> Op:
        flags = self.rng.choice((linux.RENAME_NOREPLACE, linux.RENAME_EXCHANGE, linux.RENAME_EXCHANGE,
                                 linux.RENAME_NOREPLACE | linux.RENAME_EXCHANGE))
        dst = self.path() if flags == linux.RENAME_EXCHANGE and self.rng.random() < 0.7 else self.target_path()
        return ("renameat2", self.path("fdlp", 0.9), dst, flags)

    def g_link(self) -> Op:
        return ("link", self.path("flpd" if self.rng.random() < 0.1 else "flp", 0.9), self.target_path(),
                self.rng.random() < 0.3)

    def g_symlink(self) -> Op:
        target = self.rng.choice(("", "/".join(self.rng.choice(NAMES) for _ in range(self.rng.randint(1, 2)))))
        if target == "" and self.rng.random() < 0.7:
            target = self.rng.choice(NAMES)
        return ("symlink", target, self.target_path())

    def g_readlink(self) -> Op:
        return ("readlink", self.path("l" if self.rng.random() < 0.8 else "fdp"))

    def g_listdir(self) -> Op:
        return ("listdir", self.path("d") if self.rng.random() < 0.85 else "")

    def g_mknod(self) -> Op:
        kind = stat.S_IFIFO if self.rng.random() < 0.7 else stat.S_IFSOCK
        return ("mknod", self.target_path(), kind | self.rng.choice((0o644, 0o600, 0o666)))

    def xattr_path(self) -> str:
        return self.path("fdl") if self.rng.random() < 0.95 else ""

    def xattr_name(self, rel: str) -> str:
        """Half the time a name the object has (natively), if it has any."""
        if self.rng.random() < 0.5:
            try:
                names = sorted(os.listxattr(self.tree.path(rel)))
            except OSError:
                names = []
            if names:
                return self.rng.choice(names)
        return self.rng.choice(XATTRS)

    def g_setxattr(self) -> Op:
        size = self.rng.choice((0, self.rng.randint(1, 64), self.rng.randint(1, 64), 1000, 4000, 65536, 65537))
        flags = self.rng.choice((0, 0, os.XATTR_CREATE, os.XATTR_REPLACE))
        rel = self.xattr_path()
        return ("setxattr", rel, self.xattr_name(rel), self.seed(), size, flags, self.rng.random() < 0.8)

    def g_getxattr(self) -> Op:
        rel = self.xattr_path()
        return ("getxattr", rel, self.xattr_name(rel), self.rng.random() < 0.8)

    def g_xattr_sized(self) -> Op:
        rel = self.xattr_path()
        name = self.xattr_name(rel) if self.rng.random() < 0.7 else None
        return ("xattr_sized", rel, name, self.rng.choice((0, 0, 1, 7, 16, 64, 4096)), self.rng.random() < 0.8)

    def g_listxattr(self) -> Op:
        return ("listxattr", self.xattr_path(), self.rng.random() < 0.8)

    def g_removexattr(self) -> Op:
        rel = self.xattr_path()
        return ("removexattr", rel, self.xattr_name(rel), self.rng.random() < 0.8)

    def g_umask(self) -> Op:
        return ("umask", self.rng.choice(UMASKS))

    def g_flock(self) -> Op:
        # Slots open on the same file are separate open file descriptions: their flocks conflict.
        slot = self.open_slot()
        if slot is None:
            return self.g_open()
        op = self.rng.choice((fcntl.LOCK_SH, fcntl.LOCK_EX, fcntl.LOCK_UN)) | fcntl.LOCK_NB
        return ("flock", slot, op)

    def g_lockf(self) -> Op:
        slot = self.open_slot(True)
        if slot is None:
            return self.g_open()
        cmd = self.rng.choice((fcntl.LOCK_SH | fcntl.LOCK_NB, fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_UN))
        return ("lockf", slot, cmd, self.rng.choice((0, 1, 4096, 100000)), self.rng.randint(0, 8192))

    def g_setacl(self) -> Op:
        """A POSIX ACL: mostly valid (with named entries and a mask), sometimes missing its mask (EINVAL)."""
        rng = self.rng

        def perm() -> int:
            return rng.randrange(8)

        entries = [[ACL_USER_OBJ, perm(), ACL_NO_ID]]
        named = rng.random() < 0.6
        if named:
            entries.append([ACL_USER, perm(), rng.choice((1000, 65534))])
        entries.append([ACL_GROUP_OBJ, perm(), ACL_NO_ID])
        if named and rng.random() < 0.5:
            entries.append([ACL_GROUP, perm(), 100])
        if named and rng.random() < 0.93:
            entries.append([ACL_MASK, perm(), ACL_NO_ID])
        entries.append([ACL_OTHER, perm(), ACL_NO_ID])
        name = ACL_NAMES[0] if rng.random() < 0.7 else ACL_NAMES[1]
        return ("setacl", self.path("fd" if name == ACL_NAMES[0] else "d", 0.95), name, entries)

    def g_statfs(self) -> Op:
        return ("statfs", self.path("fd") if self.rng.random() < 0.8 else "")


class NobodyGen(OpGen):
    """For an unprivileged caller: chown to its own ids too, and more permission-checked operations."""

    WEIGHTS = {**OpGen.WEIGHTS, "chown": 4, "chmod": 5, "utime": 5, "access": 3, "open": 14}
    # Not FALLOC_FL_ZERO_RANGE, which tmpfs refuses: through FUSE the kernel drops an unprivileged caller's
    # set-id bits before it sends FALLOCATE (file_modified), so they are gone even though the call fails;
    # natively tmpfs refuses first. The daemon cannot know in advance.
    FALLOCATE_MODES = OpGen.FALLOCATE_MODES[:-1]

    def __init__(self, rng: random.Random, uid: int) -> None:
        super().__init__(rng)
        self.me = uid

    def uid(self) -> int:
        return self.rng.choice((-1, -1, self.me, 0, 1000))

    def gid(self) -> int:
        return self.rng.choice((-1, self.me, self.me, 0, 100))


# -- describing operations and results


def describe(op: Op) -> str:
    name, *args = op
    if name == "open":
        slot, rel, flags, mode = args
        names = [n for n, bit in OPEN_FLAGS if flags & bit == bit and bit] or ["O_RDONLY"]
        if "O_TMPFILE" in names:
            names.remove("O_DIRECTORY")
        return f"open(slot={slot}, {rel!r}, {'|'.join(names)}, {mode:#o})"
    if name == "lseek":
        return f"lseek(slot={args[0]}, {args[1]}, SEEK_{SEEK_NAMES.get(args[2], args[2])})"
    if name in ("chmod", "mkdir", "mknod", "umask"):
        return f"{name}({', '.join(repr(a) for a in args[:-1])}{', ' if len(args) > 1 else ''}{args[-1]:#o})"
    return f"{name}{tuple(args)!r}"


def show(result: Result) -> str:
    status, value = result
    if isinstance(value, bytes) and len(value) > 48:
        return f"{status} <{len(value)} bytes, sha1 {hashlib.sha1(value).hexdigest()[:12]}>"
    return f"{status} {value!r}"


def explain(a: Result, b: Result) -> str:
    if isinstance(a[1], bytes) and isinstance(b[1], bytes):
        x, y = a[1], b[1]
        first = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
        return f"  data: lengths {len(x)} vs {len(y)}, first difference at byte {first}\n"
    return ""


class Mismatch(AssertionError):
    pass


def run_sequence(native: str, filtered: str, seed: int, steps: int, *, label: str = "", replay: str = "",
                 gen_factory: Callable[[random.Random], OpGen] | None = None,
                 check: Callable[[int], str | None] | None = None, verbose: bool = False) -> dict[str, int]:
    """Apply ``steps`` random operations to both trees, comparing every result; returns how many of each
    kind of operation ran and how many succeeded ("open" and "open ok", ...).

    ``check`` (optional) is called after each step and may return a description of a difference the
    results did not show. Every slot is closed at the end, on both trees."""
    rng = random.Random(seed)
    gen = gen_factory(rng) if gen_factory is not None else OpGen(rng)
    a_tree, b_tree = Tree(native), Tree(filtered)
    history: list[str] = []
    counts: dict[str, int] = {}
    try:
        for i in range(steps):
            op = gen.next(a_tree)
            a = a_tree.run(op)
            b = b_tree.run(op)
            history.append(f"  {i:4d} {describe(op)} -> {show(a)}")
            if verbose:
                print(history[-1] + ("" if a == b else f"   <<< filtered: {show(b)}"), file=sys.stderr, flush=True)
            counts[op[0]] = counts.get(op[0], 0) + 1
            if a[0] == "ok":
                counts[op[0] + " ok"] = counts.get(op[0] + " ok", 0) + 1
            extra = check(i) if check is not None else None
            if a != b or extra:
                recent = "\n".join(history[-30:])
                raise Mismatch(
                    f"differential mismatch {label} (seed {seed}) at step {i}: {describe(op)}\n"
                    f"  native:   {show(a)}\n  filtered: {show(b)}\n{explain(a, b)}"
                    f"{'  ' + extra + chr(10) if extra else ''}"
                    f"last operations (native results):\n{recent}\n"
                    f"replay: {replay or f'seed {seed}'} (DIFF_VERBOSE=1 and -s print every step)")
    finally:
        a_tree.close_all()
        b_tree.close_all()
    return counts


# -- whole-tree comparison


def snapshot(root: str) -> dict[str, tuple[Any, ...]]:
    """Everything comparable below ``root``: stat summary, content or link target, xattrs."""
    out: dict[str, tuple[Any, ...]] = {}
    stack = [""]
    while stack:
        d = stack.pop()
        for name in sorted(os.listdir(os.path.join(root, d) if d else root)):
            rel = f"{d}/{name}" if d else name
            path = os.path.join(root, rel)
            st = os.lstat(path)
            k = kind(st.st_mode)
            if k == "f":
                with open(path, "rb") as f:
                    body: Any = hashlib.sha1(f.read()).hexdigest()
            elif k == "l":
                body = os.readlink(path)
            else:
                body = None
            xattrs: tuple[tuple[str, bytes], ...] = ()
            if k != "l":
                xattrs = tuple(sorted((n, os.getxattr(path, n)) for n in os.listxattr(path)))
            out[rel] = (summary(st), body, xattrs)
            if k == "d":
                stack.append(rel)
    return out


def diff_snapshots(names: tuple[str, str], a: dict[str, Any], b: dict[str, Any]) -> str | None:
    lines = []
    for rel in sorted(set(a) | set(b)):
        if a.get(rel) != b.get(rel):
            lines.append(f"  {rel!r}:\n    {names[0]}: {a.get(rel)!r}\n    {names[1]}: {b.get(rel)!r}")
    if not lines:
        return None
    return f"the trees differ ({names[0]} vs {names[1]}):\n" + "\n".join(lines[:20])


# -- the initial trees


def build_tree(root: str, profile: str = "root", owner: int = 65534) -> None:
    """The starting content, made the same way in every tree (natively, in the lower directory)."""
    def p(rel: str) -> str:
        return os.path.join(root, rel)

    def write(rel: str, body: bytes, mode: int) -> None:
        with open(p(rel), "wb") as f:
            f.write(body)
        os.chmod(p(rel), mode)

    if profile == "root":
        os.makedirs(p("a/q"))
        write("a/b", data(1, 5000), 0o644)
        write("b", data(2, 70000), 0o644)
        os.setxattr(p("b"), "user.a", b"1")
        os.utime(p("b"), ns=(1_000_000_000_000_000_000, 1_100_000_000_123_456_789))
        write("q", b"", 0o600)
        os.truncate(p("q"), 1 << 20)
        with open(p("q"), "r+b") as f:
            f.seek(512 * KIB)
            f.write(data(3, 10000))
        os.mkfifo(p("qa"), 0o644)
        os.symlink("a", p("ab"))
        os.symlink("b", p("a/q/ab"))  # no "..": a link moved to the top must not point out of the tree
        return
    # An unprivileged caller's directory: its own files and some that are not its own.
    os.chown(root, owner, owner)
    write("a", data(4, 9000), 0o644)  # root's, readable
    write("b", data(5, 3000), 0o000)  # its own, no permissions
    os.chown(p("b"), owner, owner)
    write("qq", data(6, 100), 0o2775)  # its own, group root: chmod g+s drops the bit
    os.chown(p("qq"), owner, 0)
    write("qa", data(7, 20000), 0o666)  # root's, writable by all
    os.makedirs(p("q/a"))  # root's directory
    write("q/b", data(8, 100), 0o644)
    os.mkdir(p("ab"), 0o1777)  # sticky, writable by all
    os.chmod(p("ab"), 0o1777)
    write("ab/a", data(9, 100), 0o666)  # root's in a sticky directory
    write("ab/b", data(10, 100), 0o644)
    os.chown(p("ab/b"), owner, owner)
    os.setxattr(p("qa"), "user.a", b"root")
    os.setxattr(p("qa"), "trusted.t", b"hidden")


# -- worker processes


def shared_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Write this worker's disjoint region of one file in random chunks, and append fixed-size records to
    another, on both trees, interleaved; then read the region back."""
    rng = random.Random(cfg["seed"])
    index, region = cfg["index"], cfg["region"]
    body = data(cfg["seed"], region)
    fds = [os.open(path, os.O_WRONLY) for path in cfg["pwrite"]]
    afds = [os.open(path, os.O_WRONLY | os.O_APPEND) for path in cfg["append"]]
    rfds = [os.open(path, os.O_RDONLY) for path in cfg["pwrite"]]
    try:
        cuts = sorted({0, region, *(rng.randrange(region) for _ in range(cfg["chunks"]))})
        pieces = list(zip(cuts, cuts[1:], strict=False))
        rng.shuffle(pieces)
        for n, (lo, hi) in enumerate(pieces):
            for fd in fds:
                if os.pwrite(fd, body[lo:hi], index * region + lo) != hi - lo:
                    return {"ok": False, "message": f"short pwrite of [{lo}, {hi})"}
            record = f"<{index:02d}:{n:06d}:".encode().ljust(cfg["record"] - 1, b".") + b">"
            for fd in afds:
                if os.write(fd, record) != len(record):
                    return {"ok": False, "message": "short append"}
        for fd, path in zip(rfds, cfg["pwrite"], strict=True):
            got = os.pread(fd, region, index * region)
            if got != body:
                return {"ok": False, "message": f"{path}: region {index} reads back wrong"}
        return {"ok": True, "pieces": len(pieces)}
    finally:
        for fd in fds + afds + rfds:
            os.close(fd)


def seq_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    uid = cfg.get("drop")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    os.umask(0o022)
    tmpfile = cfg.get("tmpfile", True)

    def factory(rng: random.Random) -> OpGen:
        gen = NobodyGen(rng, uid) if uid is not None else OpGen(rng)
        gen.TMPFILE = tmpfile
        gen.HOLES = cfg.get("holes", True)
        return gen
    try:
        counts = run_sequence(cfg["native"], cfg["filtered"], cfg["seed"], cfg["steps"], label=cfg["label"],
                              replay=cfg.get("replay", ""), gen_factory=factory, verbose=cfg.get("verbose", False))
    except Mismatch as exc:
        return {"ok": False, "message": str(exc)}
    return {"ok": True, "counts": counts}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    result = shared_worker(cfg) if cfg["mode"] == "shared" else seq_worker(cfg)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
