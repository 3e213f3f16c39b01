"""The one place each for the glue every layer above needs: /proc and mountinfo (system/procfs), the own-process
check and loading the C library (system/libc), the process connector's socket (system/netlink). Root: a tmpfs
is mounted, and the connector needs CAP_NET_ADMIN."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsfilter._abi import cn_proc as cn
from fsfilter._system import fuse_device, libc, netlink, procfs
from fsfilter._wire import cn_proc as wire

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root: mounts and the process connector")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs at a path that mountinfo must escape (space, tab, backslash), unmounted afterwards."""
    point = tmp_path / "a b\tc\\d"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "fsfilter-glue", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_mountinfo_unescapes_and_gives_the_root_of_a_bind_mount(tmpfs: Path, tmp_path: Path) -> None:
    (tmpfs / "sub").mkdir()
    bind = tmp_path / "bind"
    bind.mkdir()
    subprocess.run(["mount", "--bind", str(tmpfs / "sub"), str(bind)], check=True)
    try:
        entries = {m.mountpoint: m for m in procfs.mountinfo()}
        top, below = entries[str(tmpfs)], entries[str(bind)]
        assert (top.fstype, top.source, top.root) == ("tmpfs", "fsfilter-glue", "/")
        assert (below.fstype, below.root) == ("tmpfs", "/sub")
        assert top.mount_id != below.mount_id and top.parent_id > 0 and "rw" in top.options.split(",")
        assert fuse_device.find_mount(str(tmpfs), "tmpfs") == top
    finally:
        subprocess.run(["umount", str(bind)], check=False)


def test_watch_mounts_signals_a_change(tmp_path: Path) -> None:
    import select

    fd = procfs.watch_mounts()
    try:
        os.pread(fd, 1 << 16, 0)
        poll = select.poll()
        poll.register(fd, select.POLLPRI)
        assert not poll.poll(0)
        point = tmp_path / "m"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "x", str(point)], check=True)
        try:
            assert poll.poll(2000)
        finally:
            subprocess.run(["umount", str(point)], check=False)
    finally:
        os.close(fd)


def test_the_watchdog_starts_without_the_package() -> None:
    # as fuse_device.start_watchdog runs it: no site, isolated, so it must load procfs.py by its path
    proc = subprocess.Popen([sys.executable, "-S", "-I", str(fuse_device.WATCHDOG), "/nonexistent", "fuse.fsfilter"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"ready\n", proc.stderr.read()
    proc.stdin.close()  # the "daemon" is gone; nothing of ours is mounted there, so nothing is detached
    assert proc.wait(10) == 0, proc.stderr.read()


def test_task_readers_on_a_child_then_after_it_is_gone() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        pid = child.pid
        deadline = time.monotonic() + 5
        while procfs.comm(pid) != "sleep" and time.monotonic() < deadline:  # until its exec is done
            time.sleep(0.01)
        assert procfs.comm(pid) == "sleep"
        assert procfs.exe(pid) == os.path.realpath(shutil.which("sleep") or "")
        assert procfs.cmdline(pid) == "sleep 30"
        assert procfs.tgid(pid) == pid
        assert procfs.parent_pid(pid) == os.getpid()
        assert procfs.start_time(pid) >= procfs.start_time(os.getpid()) > 0
        assert procfs.stat_fields(pid)[0] in "SR"
        assert pid in procfs.pids()
        fields = procfs.syscall(pid, settle=1.0)
        assert fields is not None and fields[0].isdigit() and len(fields) == 9
        assert procfs.task_path(pid, "/etc") == f"/proc/{pid}/root/etc"
        assert procfs.task_path(pid, "x/y") == f"/proc/{pid}/cwd/x/y"
        assert not libc.is_own_thread(pid) and not libc.is_own_process(pid)
    finally:
        child.kill()
        child.wait()
    assert (procfs.comm(pid), procfs.exe(pid), procfs.cmdline(pid)) == ("", "", "")
    assert (procfs.tgid(pid), procfs.parent_pid(pid), procfs.start_time(pid)) == (pid, 0, 0)
    assert procfs.syscall(pid) is None and procfs.stat_fields(pid) == []


def test_own_threads_groups_and_memory() -> None:
    seen: dict[str, object] = {}

    def worker() -> None:
        tid = threading.get_native_id()
        seen.update(tid=tid, tgid=procfs.tgid(tid), own=libc.is_own_thread(tid), info=procfs.ProcessInfo(tid).pid)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["tid"] != os.getpid()
    assert seen["tgid"] == seen["info"] == os.getpid() and seen["own"] is True
    assert libc.is_own_thread(os.getpid()) and libc.is_own_process(os.getpid())
    assert not libc.is_own_thread(0) and not libc.is_own_thread(1)
    assert sorted(procfs.groups(os.getpid())) == sorted(os.getgroups())
    assert procfs.ProcessInfo(os.getpid()).exe == os.path.realpath(sys.executable)
    data = ctypes.create_string_buffer(b"read through /proc/<tid>/mem")
    with procfs.TaskMemory(os.getpid()) as mem:
        assert mem.read(ctypes.addressof(data), len(data.value)) == data.value


def test_own_pid_is_renewed_in_a_forked_child() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(w, b"1" if libc.is_own_process(os.getpid()) and libc.is_own_thread(os.getpid()) else b"0")
        os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def test_fd_target_and_sysctl(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        assert procfs.fd_target(fd) == str(path)
        assert os.path.samefile(procfs.fd_path(fd), path)
    finally:
        os.close(fd)
    assert procfs.sysctl_int("kernel/pid_max") == int(Path("/proc/sys/kernel/pid_max").read_text())
    assert procfs.sysctl_int("fs/no-such-setting") is None


def test_the_process_connector_reports_a_fork() -> None:
    sock = netlink.open_proc_connector(0.5)
    try:
        child = subprocess.Popen(["true"])
        child.wait()
        deadline = time.monotonic() + 5
        forks: set[int] = set()
        while child.pid not in forks and time.monotonic() < deadline:
            try:
                datagram = sock.recv(65536)
            except TimeoutError:
                continue
            forks |= {ev.tgid for ev in wire.decode(datagram) if ev.what == cn.PROC_EVENT_FORK}
        assert child.pid in forks
    finally:
        netlink.close_proc_connector(sock)
    assert sock.fileno() == -1


def test_libc_handles_are_separate() -> None:
    one, two = libc.load(), libc.load()
    one.getpid.restype = ctypes.c_long
    assert two.getpid.restype is ctypes.c_int  # argtypes/restype set by one module never change another's
    assert one.getpid() == two.getpid() == os.getpid()
    with pytest.raises(OSError) as err:
        libc.check(-1, "what")
    assert "what" in str(err.value)
