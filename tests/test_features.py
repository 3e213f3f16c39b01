"""Mounts for real and checks each kind of request a real file system needs, with the caller's semantics."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SRC, is_mounted, needs_root, wait_for

from fsfilter import CBFSFilterError, PassthroughFilter
from fsfilter._abi import fuse as abi
from fsfilter._abi import linux
from fsfilter._system import fuse_device, libc

pytestmark = [needs_root, pytest.mark.timeout(60)]
NOBODY = 65534
Factory = Callable[..., PassthroughFilter]


def as_nobody(*argv: str, groups: str = "--clear-groups") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", groups, "--", *argv],
                          capture_output=True, text=True, timeout=30)


def requests(filt: PassthroughFilter, op: abi.Opcode) -> int:
    assert filt.stats is not None
    return filt.stats.requests[op]


# -- data


@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "daemon-io"])
def test_read_write_and_who_serves_it(lower_and_mount: tuple[Path, Path], filter_factory: Factory,
                                      passthrough: bool) -> None:
    lower, mnt = lower_and_mount
    filt = filter_factory(lower, mnt, passthrough=passthrough)
    assert filt.passthrough_active == passthrough
    data = os.urandom(3 * 1024 * 1024 + 123)
    (mnt / "f").write_bytes(data)
    assert (lower / "f").read_bytes() == data
    assert (mnt / "f").read_bytes() == data
    with open(mnt / "f", "r+b") as f:
        f.seek(4095)
        f.write(b"XY")
        f.seek(0, os.SEEK_END)
        f.write(b"tail")
    expect = data[:4095] + b"XY" + data[4097:] + b"tail"
    assert (lower / "f").read_bytes() == expect
    with open(mnt / "f", "ab") as f:  # O_APPEND
        f.write(b"++")
    assert (mnt / "f").read_bytes() == expect + b"++"
    served = requests(filt, abi.Opcode.READ) + requests(filt, abi.Opcode.WRITE)
    if passthrough:
        assert served == 0, "reads and writes should have gone through kernel passthrough"
    else:
        assert requests(filt, abi.Opcode.WRITE) > 0 and requests(filt, abi.Opcode.READ) > 0


def test_io_policy_sends_chosen_files_to_the_daemon(lower_and_mount: tuple[Path, Path],
                                                    filter_factory: Factory) -> None:
    lower, mnt = lower_and_mount
    seen: list[bytes] = []

    def policy(path: bytes) -> bool:
        seen.append(path)
        return path.endswith(b".watched")

    filt = filter_factory(lower, mnt, io_policy=policy)
    (mnt / "sub").mkdir()
    (mnt / "sub" / "a.plain").write_bytes(b"plain")
    assert (mnt / "sub" / "a.plain").read_bytes() == b"plain"
    assert requests(filt, abi.Opcode.READ) + requests(filt, abi.Opcode.WRITE) == 0
    (mnt / "sub" / "b.watched").write_bytes(b"watched")
    assert (mnt / "sub" / "b.watched").read_bytes() == b"watched"
    assert requests(filt, abi.Opcode.WRITE) >= 1 and requests(filt, abi.Opcode.READ) >= 1
    assert b"/sub/b.watched" in seen and b"/sub/a.plain" in seen
    # a second open of an inode follows the first open's choice while it is open
    with open(mnt / "sub" / "a.plain", "rb") as one, open(mnt / "sub" / "a.plain", "r+b") as two:
        two.write(b"P")
        two.flush()
        assert one.read() == b"Plain"


def test_kernel_refusing_passthrough_falls_back_to_the_daemon(lower_and_mount: tuple[Path, Path],
                                                              filter_factory: Factory,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    lower, mnt = lower_and_mount

    def refuse(session_fd: int, fd: int) -> int:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(fuse_device, "backing_open", refuse)
    filt = filter_factory(lower, mnt)
    (mnt / "f").write_bytes(b"still works")
    assert (mnt / "f").read_bytes() == b"still works"
    assert not filt.passthrough_active
    assert requests(filt, abi.Opcode.WRITE) >= 1


def test_several_readers_on_cloned_fds(lower_and_mount: tuple[Path, Path], filter_factory: Factory) -> None:
    lower, mnt = lower_and_mount
    filter_factory(lower, mnt, workers=3)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            d = mnt / f"t{n}"
            d.mkdir()
            for i in range(200):
                (d / f"f{i}").write_text(str(i))
            assert sorted(os.listdir(d)) == sorted(f"f{i}" for i in range(200))
            assert all((d / f"f{i}").read_text() == str(i) for i in range(200))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(os.listdir(lower)) == 4


# -- names


def test_directories_links_and_renames(mounted: tuple[Path, Path, PassthroughFilter]) -> None:
    lower, mnt, _ = mounted
    (mnt / "d1" / "d2").mkdir(parents=True)
    (mnt / "d1" / "a").write_text("a")
    (mnt / "d1" / "b").write_text("b")
    os.link(mnt / "d1" / "a", mnt / "d1" / "d2" / "hard")
    assert os.stat(mnt / "d1" / "a").st_nlink == 2
    os.symlink("../a", mnt / "d1" / "d2" / "sym")
    assert os.readlink(mnt / "d1" / "d2" / "sym") == "../a"
    assert (mnt / "d1" / "d2" / "sym").read_text() == "a"
    assert os.path.islink(lower / "d1" / "d2" / "sym")
    os.rename(mnt / "d1" / "a", mnt / "d1" / "b")  # over an existing file
    assert (mnt / "d1" / "b").read_text() == "a" and not (lower / "d1" / "a").exists()
    with pytest.raises(OSError) as info:
        libc.renameat2(linux.AT_FDCWD, os.fsencode(mnt / "d1" / "b"), linux.AT_FDCWD,
                       os.fsencode(mnt / "d1" / "d2" / "hard"), linux.RENAME_NOREPLACE)
    assert info.value.errno == errno.EEXIST
    (mnt / "d1" / "c").write_text("c")
    libc.renameat2(linux.AT_FDCWD, os.fsencode(mnt / "d1" / "b"), linux.AT_FDCWD, os.fsencode(mnt / "d1" / "c"),
                   linux.RENAME_EXCHANGE)
    assert (mnt / "d1" / "b").read_text() == "c" and (mnt / "d1" / "c").read_text() == "a"
    os.rename(mnt / "d1" / "d2", mnt / "moved")
    assert sorted(os.listdir(mnt / "moved")) == ["hard", "sym"]
    with pytest.raises(OSError) as info:
        os.rmdir(mnt / "moved")
    assert info.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "d1" / "d2")
    os.unlink(mnt / "moved" / "hard")
    os.unlink(mnt / "moved" / "sym")
    os.rmdir(mnt / "moved")
    assert sorted(os.listdir(lower)) == ["d1"]
    with pytest.raises(FileExistsError):
        os.mkdir(mnt / "d1")
    with pytest.raises(NotADirectoryError):
        os.listdir(mnt / "d1" / "b")


def test_large_directory_listing(mounted: tuple[Path, Path, PassthroughFilter]) -> None:
    lower, mnt, _ = mounted
    names = {f"entry-{i:05d}-{'x' * (i % 60)}" for i in range(3000)}
    for name in names:
        (lower / name).touch()
    assert set(os.listdir(mnt)) == names
    with os.scandir(mnt) as it:
        assert {e.name for e in it if e.is_file()} == names
    # seekdir/telldir through the kernel: list in two halves with a reopen in the middle
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        got = {e.name for e in os.scandir(fd)}
    finally:
        os.close(fd)
    assert got == names


def test_special_files(mounted: tuple[Path, Path, PassthroughFilter]) -> None:
    lower, mnt, _ = mounted
    os.mkfifo(mnt / "fifo", 0o640)
    assert stat.S_ISFIFO(os.stat(lower / "fifo").st_mode)
    assert stat.S_IMODE(os.stat(mnt / "fifo").st_mode) == 0o640 & ~os.umask(os.umask(0))
    os.mknod(mnt / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.stat(mnt / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    # the mount is nodev: the device node exists but cannot be opened through it
    with pytest.raises(PermissionError):
        open(mnt / "null", "rb")
    fd = os.open(mnt, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"anonymous")
        libc.link_fd(fd, linux.AT_FDCWD, os.fsencode(mnt / "named"))
    finally:
        os.close(fd)
    assert (lower / "named").read_bytes() == b"anonymous"


# -- attributes


def test_attributes_and_times(mounted: tuple[Path, Path, PassthroughFilter]) -> None:
    lower, mnt, _ = mounted
    f = mnt / "f"
    f.write_bytes(b"0123456789")
    os.chmod(f, 0o2751)
    assert stat.S_IMODE(os.stat(lower / "f").st_mode) == 0o2751
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 5678) == (os.stat(lower / "f").st_uid, os.stat(lower / "f").st_gid)
    os.truncate(f, 4)
    assert os.stat(lower / "f").st_size == 4 and f.read_bytes() == b"0123"
    os.utime(f, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    os.utime(f, ns=(-5_000_000_000, 3_000_000_000))  # before 1970
    assert os.stat(lower / "f").st_atime_ns == -5_000_000_000
    before = time.time_ns()
    libc.utimensat_fd(os.open(f, os.O_PATH), (0, linux.UTIME_OMIT), (0, linux.UTIME_NOW))
    st = os.stat(f)
    assert st.st_atime_ns == -5_000_000_000 and st.st_mtime_ns >= before - 10**9
    os.symlink("nowhere", mnt / "link")
    os.chown(mnt / "link", 42, 43, follow_symlinks=False)
    assert os.lstat(lower / "link").st_uid == 42 and os.lstat(mnt / "link").st_gid == 43
    with open(f, "r+b") as fh:
        os.ftruncate(fh.fileno(), 100)
        os.fchmod(fh.fileno(), 0o600)
    assert os.stat(lower / "f").st_size == 100 and stat.S_IMODE(os.stat(lower / "f").st_mode) == 0o600


def test_xattrs_and_acls(mounted: tuple[Path, Path, PassthroughFilter]) -> None:
    lower, mnt, _ = mounted
    f = mnt / "f"
    f.write_text("x")
    os.setxattr(f, "user.one", b"1")
    os.setxattr(f, "user.big", os.urandom(3000))
    assert os.getxattr(lower / "f", "user.one") == b"1"
    assert set(os.listxattr(f)) >= {"user.one", "user.big"}
    with pytest.raises(FileExistsError):
        os.setxattr(f, "user.one", b"2", os.XATTR_CREATE)
    with pytest.raises(OSError) as info:
        os.setxattr(f, "user.none", b"2", os.XATTR_REPLACE)
    assert info.value.errno == errno.ENODATA
    os.removexattr(f, "user.one")
    with pytest.raises(OSError) as info:
        os.getxattr(f, "user.one")
    assert info.value.errno == errno.ENODATA
    # ACLs: stored in the lower file and enforced by the kernel for other users
    os.chmod(f, 0o600)
    assert as_nobody("cat", str(f)).returncode != 0
    subprocess.run(["setfacl", "-m", f"u:{NOBODY}:r", str(f)], check=True)
    out = subprocess.run(["getfacl", "-pn", str(lower / "f")], capture_output=True, text=True, check=True).stdout
    assert f"user:{NOBODY}:r--" in out
    assert as_nobody("cat", str(f)).stdout == "x"
    (mnt / "d").mkdir()
    subprocess.run(["setfacl", "-d", "-m", f"u:{NOBODY}:rwx", str(mnt / "d")], check=True)
    (mnt / "d" / "inherits").write_text("y")
    out = subprocess.run(["getfacl", "-pn", str(lower / "d" / "inherits")], capture_output=True, text=True).stdout
    assert f"user:{NOBODY}:rw" in out


def test_locks_are_honoured_between_processes(mounted: tuple[Path, Path, PassthroughFilter]) -> None:
    _, mnt, _ = mounted
    f = mnt / "lockfile"
    f.write_text("x")
    probe = ("import fcntl,sys; f=open(sys.argv[1],'r+'); kind=sys.argv[2]\n"
             "try:\n"
             "    (fcntl.lockf if kind=='posix' else fcntl.flock)(f, fcntl.LOCK_EX|fcntl.LOCK_NB); print('got')\n"
             "except OSError as e: print('busy', e.errno)\n")
    with open(f, "r+") as held:
        fcntl.lockf(held, fcntl.LOCK_EX)
        out = subprocess.run([sys.executable, "-c", probe, str(f), "posix"], capture_output=True, text=True).stdout
        assert out.startswith("busy")
        fcntl.lockf(held, fcntl.LOCK_UN)
        fcntl.flock(held, fcntl.LOCK_EX)
        out = subprocess.run([sys.executable, "-c", probe, str(f), "flock"], capture_output=True, text=True).stdout
        assert out.startswith("busy")
    out = subprocess.run([sys.executable, "-c", probe, str(f), "flock"], capture_output=True, text=True).stdout
    assert out.startswith("got")


@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "daemon-io"])
def test_fallocate_holes_and_copy_file_range(lower_and_mount: tuple[Path, Path], filter_factory: Factory,
                                             passthrough: bool) -> None:
    lower, mnt = lower_and_mount
    filter_factory(lower, mnt, passthrough=passthrough)
    results = []
    for path in (lower / "native", mnt / "sparse"):  # the same steps natively and through the filter
        with open(path, "w+b") as f:
            fd = f.fileno()
            libc.fallocate(fd, 0, 0, 1 << 20)
            os.pwrite(fd, b"D" * 8192, 4 << 20)
            os.pwrite(fd, b"E" * 4096, 8 << 20)
            libc.fallocate(fd, linux.FALLOC_FL_PUNCH_HOLE | linux.FALLOC_FL_KEEP_SIZE, 4 << 20, 4096)
            results.append((os.fstat(fd).st_size, os.lseek(fd, 2 << 20, os.SEEK_DATA),
                            os.lseek(fd, 4 << 20, os.SEEK_DATA), os.lseek(fd, (4 << 20) + 4096, os.SEEK_HOLE),
                            os.pread(fd, 8, (4 << 20) + 4092), os.pread(fd, 4, 8 << 20)))
    assert results[0] == results[1]
    assert results[1][0] == (8 << 20) + 4096 and results[1][-1] == b"EEEE"
    assert results[1][-2] == b"\0\0\0\0DDDD"
    (mnt / "src").write_bytes(b"abcdefgh" * 10000)
    with open(mnt / "src", "rb") as src, open(mnt / "dst", "wb") as dst:
        n = os.copy_file_range(src.fileno(), dst.fileno(), 80000, 0, 0)
    assert n == 80000 and (lower / "dst").read_bytes() == (lower / "src").read_bytes()


def test_statfs_and_ioctl(mounted: tuple[Path, Path, PassthroughFilter]) -> None:
    lower, mnt, _ = mounted
    a, b = os.statvfs(mnt), os.statvfs(lower)
    assert (a.f_bsize, a.f_blocks, a.f_files, a.f_namemax) == (b.f_bsize, b.f_blocks, b.f_files, b.f_namemax)
    (mnt / "f").write_text("x")
    with open(mnt / "f", "rb") as f:
        buf = bytearray(8)
        try:
            fcntl.ioctl(f.fileno(), linux.FS_IOC_GETFLAGS, buf, True)
        except OSError as exc:  # the lower file system may not have inode flags: the same answer natively
            with open(lower / "f", "rb") as native, pytest.raises(OSError) as info:
                fcntl.ioctl(native.fileno(), linux.FS_IOC_GETFLAGS, bytearray(8), True)
            assert info.value.errno == exc.errno
        with pytest.raises(OSError) as info2:
            fcntl.ioctl(f.fileno(), 0x5401, bytearray(64), True)  # TCGETS: not a terminal
        assert info2.value.errno == errno.ENOTTY


# -- identity


def test_callers_identity_and_permissions(mounted: tuple[Path, Path, PassthroughFilter]) -> None:
    lower, mnt, _ = mounted
    os.chmod(lower, 0o777)
    (mnt / "root-only").write_text("secret")
    os.chmod(mnt / "root-only", 0o600)
    r = as_nobody("sh", "-c", f"umask 027; echo hi > {mnt}/mine && mkdir {mnt}/mydir && ln -s x {mnt}/myln")
    assert r.returncode == 0, r.stderr
    for name in ("mine", "mydir", "myln"):
        st = os.lstat(lower / name)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
    assert stat.S_IMODE(os.stat(lower / "mine").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(lower / "mydir").st_mode) == 0o750
    r = as_nobody("cat", str(mnt / "root-only"))
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = as_nobody("chown", "0", str(mnt / "mine"))
    assert r.returncode != 0 and "not permitted" in r.stderr
    r = as_nobody("chmod", "777", str(mnt / "root-only"))
    assert r.returncode != 0 and "not permitted" in r.stderr
    os.chmod(lower, 0o755)
    r = as_nobody("touch", str(mnt / "denied"))
    assert r.returncode != 0 and not (lower / "denied").exists()


def test_setgid_directory_and_supplementary_group(mounted: tuple[Path, Path, PassthroughFilter]) -> None:
    lower, mnt, _ = mounted
    (mnt / "shared").mkdir()
    os.chown(mnt / "shared", 0, 4000)
    os.chmod(mnt / "shared", 0o2775)
    # nobody may write there only through supplementary group 4000
    r = as_nobody("sh", "-c", f"echo x > {mnt}/shared/f && mkdir {mnt}/shared/sub", groups="--groups=4000")
    assert r.returncode == 0, r.stderr
    st = os.stat(lower / "shared" / "f")
    assert (st.st_uid, st.st_gid) == (NOBODY, 4000)
    st = os.stat(lower / "shared" / "sub")
    assert st.st_gid == 4000 and st.st_mode & stat.S_ISGID


def test_unprivileged_write_clears_setuid(mounted: tuple[Path, Path, PassthroughFilter]) -> None:
    lower, mnt, filt = mounted
    os.chmod(lower, 0o777)
    r = as_nobody("sh", "-c", f"echo a > {mnt}/prog && chmod 6755 {mnt}/prog")
    assert r.returncode == 0, r.stderr
    assert os.stat(lower / "prog").st_mode & stat.S_ISUID
    writes = requests(filt, abi.Opcode.WRITE)
    r = as_nobody("sh", "-c", f"echo b >> {mnt}/prog")
    assert r.returncode == 0, r.stderr
    mode = os.stat(lower / "prog").st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID), oct(mode)
    assert requests(filt, abi.Opcode.WRITE) > writes  # served by the daemon, which cleared the bits
    assert (lower / "prog").read_text() == "a\nb\n"


# -- caching and lifecycle


def test_in_place_mount(scratch: Path, filter_factory: Factory) -> None:
    d = scratch / "dir"
    d.mkdir()
    (d / "old").write_text("before")
    held = os.open(d, os.O_RDONLY | os.O_DIRECTORY)  # opened before the mount: sees the lower directory
    try:
        filt = filter_factory(d)
        assert is_mounted(d) and filt.in_place
        assert (d / "old").read_text() == "before"
        (d / "new").write_text("through the filter")
        assert filt.stats is not None and filt.stats.requests[abi.Opcode.CREATE] == 1
        assert set(os.listdir(held)) == {"old", "new"}  # the lower directory itself
        filt.stop()
        assert not is_mounted(d)
        assert (d / "new").read_text() == "through the filter"
    finally:
        os.close(held)


def test_notify_changed_drops_cached_state(mounted: tuple[Path, Path, PassthroughFilter]) -> None:
    lower, mnt, filt = mounted
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_text("one")
    assert os.stat(mnt / "d" / "f").st_size == 3
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "d" / "g")
    (lower / "d" / "f").write_text("three")  # behind the filter's back
    (lower / "d" / "g").write_text("new")
    assert os.stat(mnt / "d" / "f").st_size == 3  # cached for attr_timeout
    filt.notify_changed("d/f")
    filt.notify_changed(mnt / "d" / "g")
    assert os.stat(mnt / "d" / "f").st_size == 5
    assert (mnt / "d" / "f").read_text() == "three"
    assert (mnt / "d" / "g").read_text() == "new"


def test_bad_input_gets_clear_errors(scratch: Path) -> None:
    (scratch / "file").write_text("x")
    cases: list[tuple[Callable[[], object], int]] = [
        (lambda: PassthroughFilter(scratch / "missing").start(), errno.ENOENT),
        (lambda: PassthroughFilter(scratch / "file").start(), errno.ENOTDIR),
        (lambda: PassthroughFilter(scratch, scratch / "file").start(), errno.ENOTDIR),
        (lambda: PassthroughFilter(scratch, workers=0), errno.EINVAL),
        (lambda: PassthroughFilter(scratch, attr_timeout=-1), errno.EINVAL),
    ]
    (scratch / "inner").mkdir()
    cases.append((lambda: PassthroughFilter(scratch, scratch / "inner").start(), errno.EINVAL))
    for call, code in cases:
        with pytest.raises(CBFSFilterError) as info:
            call()
        assert info.value.code == code, info.value
        assert info.value.message
    assert not any(is_mounted(p) for p in (scratch, scratch / "inner"))


def test_double_start_and_stop(mounted: tuple[Path, Path, PassthroughFilter]) -> None:
    _, mnt, filt = mounted
    with pytest.raises(CBFSFilterError) as info:
        filt.start()
    assert info.value.code == errno.EALREADY
    filt.stop()
    filt.stop()
    assert not is_mounted(mnt)


def test_interrupted_request_fails_with_eintr(lower_and_mount: tuple[Path, Path], filter_factory: Factory) -> None:
    lower, mnt = lower_and_mount
    filt = filter_factory(lower, mnt, pool=1)
    (mnt / "f").write_text("x")
    (mnt / "g").write_text("y")  # fsync holds the inode lock in the kernel: the second one needs another file
    release, holding = threading.Event(), threading.Event()

    def slow_fsync(req: object) -> None:
        if getattr(req, "opcode", None) == abi.Opcode.FSYNC and not release.is_set():
            holding.set()
            release.wait(30)

    filt.set_trace(slow_fsync)
    # The first fsync holds the only pool thread; the second waits in the queue until its caller is
    # signalled, and must then fail with EINTR at once instead of waiting for the first.
    first = subprocess.Popen([sys.executable, "-c", f"import os; os.fsync(os.open({str(mnt / 'f')!r}, os.O_RDONLY))"])
    code = (
        "import ctypes, os, signal, errno\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "signal.signal(signal.SIGUSR1, lambda *a: None)\n"
        "signal.setitimer(signal.ITIMER_REAL, 0)\n"
        f"fd = os.open({str(mnt / 'g')!r}, os.O_RDONLY)\n"
        "print('ready', flush=True)\n"
        # libc's fsync, not os.fsync: Python retries a system call that a signal interrupted
        "print('ok' if libc.fsync(fd) == 0 else errno.errorcode[ctypes.get_errno()])\n"
    )
    assert holding.wait(10), "the first fsync never reached the daemon"
    second = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert second.stdout is not None and second.stdout.readline().strip() == "ready"
        # Signal only once the second FSYNC is queued behind the first (the reader registers a request
        # before it reads the next one, so the INTERRUPT cannot overtake it).
        assert filt.stats is not None
        assert wait_for(lambda: filt.stats is not None and filt.stats.requests[abi.Opcode.FSYNC] >= 2, 10)
        os.kill(second.pid, signal.SIGUSR1)
        out, _ = second.communicate(timeout=10)
        assert out.strip() == "EINTR"
        # Answered at once, not after the request ahead of it in the pool: the first is still held.
        assert first.poll() is None
        assert filt.stats is not None and filt.stats.interrupts >= 1
    finally:
        release.set()
        first.wait(10)
        if second.poll() is None:
            second.kill()


def test_unprivileged_mount_through_fusermount3(scratch: Path) -> None:
    if subprocess.run(["which", "fusermount3"], capture_output=True).returncode != 0:
        pytest.skip("fusermount3 is not installed")
    lower, mnt = scratch / "lower", scratch / "mnt"
    lower.mkdir()
    mnt.mkdir()
    os.chown(lower, NOBODY, NOBODY)
    os.chown(mnt, NOBODY, NOBODY)
    os.chmod(scratch, 0o755)
    code = (f"import sys, os; sys.path.insert(0, {str(SRC)!r})\n"
            "from fsfilter import PassthroughFilter, CBFSFilterError\n"
            f"f = PassthroughFilter({str(lower)!r}, {str(mnt)!r})\n"
            "try:\n    f.start()\nexcept CBFSFilterError as e:\n    print('refused', e.message); sys.exit(0)\n"
            f"open({str(mnt / 'x')!r}, 'w').write('hi')\n"
            f"print('mounted', open({str(lower / 'x')!r}).read(), f.passthrough_active)\n"
            "f.stop()\n")
    r = as_nobody(sys.executable, "-c", code)
    try:
        if r.stdout.startswith("refused"):
            pytest.skip(f"this machine does not let fusermount3 mount: {r.stdout.strip()}")
        assert r.stdout.split()[:2] == ["mounted", "hi"], r.stderr
        assert r.stdout.split()[2] == "False"  # passthrough needs CAP_SYS_ADMIN: the daemon serves I/O
    finally:
        wait_for(lambda: not is_mounted(mnt), 5)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)

