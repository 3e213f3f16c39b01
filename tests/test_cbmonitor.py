"""CBMonitor on fanotify: real operations of other processes fire events with full paths, pids and names;
masks with and without a path, per-process masks, the monitor's own activity, and a 100,000-file burst
with nothing lost. Every monitor is stopped in ``finally`` (its marks go with its group)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_root, wait_for

from fsfilter import CBFSFilterError, CBMonitor
from fsfilter.api import constants as c
from fsfilter.api.cbmonitor import MONITOR_PARAMS

pytestmark = [needs_root, pytest.mark.timeout(120)]
EVENTS = [e for e in MONITOR_PARAMS if e.startswith("notify_") and "volume" not in e]


class Seen:
    def __init__(self, monitor: CBMonitor) -> None:
        self.items: list[tuple[str, str, int, dict[str, Any]]] = []
        self.lock = threading.Lock()
        for event in EVENTS:
            setattr(monitor, "on_" + event, self._handler(monitor, event))

    def _handler(self, monitor: CBMonitor, event: str) -> Callable[[Any], None]:
        def handle(p: Any) -> None:
            fields = {n: getattr(p, n) for n in type(p).__slots__}
            item = (event, monitor.get_originator_process_name(), monitor.get_originator_process_id(), fields)
            with self.lock:
                self.items.append(item)
        return handle

    def find(self, event: str, **match: Any) -> list[tuple[str, int, dict[str, Any]]]:
        with self.lock:
            return [(name, pid, f) for e, name, pid, f in self.items
                    if e == event and all(f.get(k) == v for k, v in match.items())]

    def wait(self, event: str, timeout: float = 10, **match: Any) -> tuple[str, int, dict[str, Any]]:
        assert wait_for(lambda: bool(self.find(event, **match)), timeout), (event, match, self.items[-20:])
        return self.find(event, **match)[0]


@pytest.fixture
def monitor() -> Iterator[Callable[[], CBMonitor]]:
    made: list[CBMonitor] = []

    def make() -> CBMonitor:
        m = CBMonitor()
        made.append(m)
        return m

    try:
        yield make
    finally:
        for m in made:
            with contextlib.suppress(Exception):
                m.stop_filter()


def sh(script: str, linger: float = 0.3) -> int:
    """Run a shell script (another process); returns the shell's pid. The shell lingers a moment after it:
    a process already gone when its records are read has no name to read (see docs/monitor.md)."""
    proc = subprocess.run(["sh", "-c", f"{script}\necho $$\nsleep {linger}"], capture_output=True, text=True,
                          timeout=30, check=True)
    return int(proc.stdout.split()[-1])


def test_file_operations_fire_events_with_paths_pids_and_names(monitor: Callable[[], CBMonitor],
                                                               scratch: Path) -> None:
    d = scratch / "watched"
    outside = scratch / "outside"
    d.mkdir()
    outside.mkdir()
    (outside / "incoming").write_text("x")
    m = monitor()
    seen = Seen(m)
    m.add_filter_rule(f"{d}/*", c.FS_NE_ALL)
    m.add_filter_rule(str(d), c.FS_NE_ENUMERATE_DIRECTORY)
    m.start_filter()
    assert m.active
    pid = sh(f"echo hello > {d}/a.txt")
    name, got_pid, f = seen.wait("notify_create_file", file_name=f"{d}/a.txt")
    assert (name, got_pid) == ("sh", pid)
    seen.wait("notify_write_file", file_name=f"{d}/a.txt")
    seen.wait("notify_close_file", file_name=f"{d}/a.txt")
    subprocess.run(["cat", str(d / "a.txt")], capture_output=True, check=True)
    name, _, _ = seen.wait("notify_read_file", file_name=f"{d}/a.txt")
    assert name in ("cat", "")  # cat exits at once: its name is there only if it was read in time
    assert seen.find("notify_open_file", file_name=f"{d}/a.txt")
    sh(f"mkdir {d}/sub && mv {d}/a.txt {d}/sub/b.txt && chmod 600 {d}/sub/b.txt && ln {d}/sub/b.txt {d}/sub/c")
    seen.wait("notify_create_file", file_name=f"{d}/sub", attributes=c.FILE_SYS_ATTR_DIRECTORY)
    seen.wait("notify_rename_or_move_file", file_name=f"{d}/a.txt", new_file_name=f"{d}/sub/b.txt")
    seen.wait("notify_set_file_security", file_name=f"{d}/sub/b.txt")
    seen.wait("notify_create_hard_link", link_name=f"{d}/sub/c")
    # a directory renamed: names below it get their new path
    sh(f"mv {d}/sub {d}/moved && echo more >> {d}/moved/b.txt")
    seen.wait("notify_rename_or_move_file", file_name=f"{d}/sub", new_file_name=f"{d}/moved")
    seen.wait("notify_write_file", file_name=f"{d}/moved/b.txt")
    # moves into and out of the watched tree
    sh(f"mv {outside}/incoming {d}/incoming && mv {d}/moved/c {outside}/gone")
    seen.wait("notify_rename_or_move_file", file_name=f"{outside}/incoming", new_file_name=f"{d}/incoming")
    seen.wait("notify_rename_or_move_file", file_name=f"{d}/moved/c", new_file_name=f"{outside}/gone")
    subprocess.run(["sh", "-c", f"ls {d}; sleep 0.3"], capture_output=True, check=True)
    name, _, _ = seen.wait("notify_enumerate_directory", directory_name=str(d))
    assert name in ("ls", "")
    pid = sh(f"rm -r {d}/moved")
    for path in (f"{d}/moved/b.txt", f"{d}/moved"):
        name, got_pid, _ = seen.wait("notify_delete_file", file_name=path)
        assert name in ("rm", "") and got_pid != pid, (name, got_pid, pid)  # rm is a child of the shell
    # a name, when there is one, is the process's own
    with seen.lock:
        names = {(n, p) for _, n, p, _ in seen.items if n}
    for n, p in names:
        assert n in ("sh", "cat", "ls", "rm", "mkdir", "mv", "chmod", "ln"), (n, p)
    # nothing outside the masks reached a handler
    with seen.lock:
        stray = [i for i in seen.items if not any(str(v).startswith(str(d)) for k, v in i[3].items()
                                                   if k in ("file_name", "new_file_name", "link_name",
                                                            "directory_name"))]
    assert not stray, stray[:5]
    m.stop_filter()
    assert not m.active and m.lost_events == 0


def test_per_process_masks_masks_without_a_path_and_own_requests(monitor: Callable[[], CBMonitor],
                                                                 scratch: Path) -> None:
    m = monitor()
    seen = Seen(m)
    m.add_filter_rule(f"sh|{scratch}/*", c.FS_NE_CREATE)  # the shell's own creations, not its children's
    m.add_filter_rule("*.zzz", c.FS_NE_CREATE)  # anywhere: every local file system is watched
    m.start_filter()
    sh(f"echo x > {scratch}/by-sh; {sys.executable} -c 'open(\"{scratch}/by-python\", \"w\")'")
    seen.wait("notify_create_file", file_name=f"{scratch}/by-sh")
    sh(f"echo x > {scratch}/deep.zzz")
    seen.wait("notify_create_file", file_name=f"{scratch}/deep.zzz")
    (scratch / "own.zzz").write_text("mine")  # the monitor's own process: not reported
    sh(f"echo x > {scratch}/after.zzz")
    seen.wait("notify_create_file", file_name=f"{scratch}/after.zzz")
    assert not seen.find("notify_create_file", file_name=f"{scratch}/by-python")
    assert not seen.find("notify_create_file", file_name=f"{scratch}/own.zzz")
    m.stop_filter()
    m.config("FilterOwnRequests=true")
    m.start_filter()
    (scratch / "own2.zzz").write_text("mine")
    seen.wait("notify_create_file", file_name=f"{scratch}/own2.zzz")


def test_bad_input(monitor: Callable[[], CBMonitor]) -> None:
    m = monitor()
    for call in (lambda: m.add_filter_rule("", c.FS_NE_CREATE), lambda: m.add_filter_rule("/x/*", 1 << 60),
                 lambda: m.config("Nope=1"), lambda: m.get_filter_rule_mask(0),
                 lambda: setattr(m, "on_before_open_file", print)):
        with pytest.raises(CBFSFilterError) as info:
            call()
        assert info.value.code == errno.EINVAL
    assert m.filter_rule_count == 0 and not m.active


@pytest.mark.timeout(300)
def test_a_burst_of_100000_files_loses_nothing(monitor: Callable[[], CBMonitor], scratch: Path,
                                               tmp_path: Path) -> None:
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to build bench/smallfiles.c (scripts/setup.sh installs it)")
    binary = tmp_path / "smallfiles"
    source = Path(__file__).resolve().parent.parent / "bench" / "smallfiles.c"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    d = scratch / "burst"
    d.mkdir()
    m = monitor()
    closes = [0]
    lock = threading.Lock()

    def closed(p: Any) -> None:
        with lock:
            closes[0] += 1

    m.on_notify_close_file = closed
    errors: list[int] = []
    m.on_error = lambda p: errors.append(p.error_code)
    m.add_filter_rule(f"{d}/*", c.FS_NE_CLOSE)
    m.start_filter()
    count = int(os.environ.get("BURST_FILES", "100000"))
    start = time.monotonic()
    subprocess.run([str(binary), str(d), str(count)], check=True, capture_output=True, timeout=240)
    assert wait_for(lambda: closes[0] >= count, 120), (closes[0], m.stats)
    elapsed = time.monotonic() - start
    time.sleep(0.5)
    assert closes[0] == count and m.lost_events == 0 and not errors, (closes[0], m.stats, errors)
    print(f"{count} files: {closes[0]} close events in {elapsed:.1f} s, stats {m.stats}", file=sys.stderr)


def test_a_file_system_mounted_after_start_is_watched(monitor: Callable[[], CBMonitor], scratch: Path) -> None:
    target = scratch / "later"
    target.mkdir()
    m = monitor()
    seen = Seen(m)
    volumes: list[tuple[str, str]] = []
    m.fire_volume_events = c.FS_MOUNT_BOTH
    m.on_notify_filter_attach_to_volume = lambda p: volumes.append(("attach", p.volume_name))
    m.on_notify_filter_detach_from_volume = lambda p: volumes.append(("detach", p.volume_name))
    m.add_filter_rule(f"{target}/*", c.FS_NE_CREATE)
    m.start_filter()
    assert ("attach", str(scratch)) in volumes or wait_for(lambda: ("attach", str(scratch)) in volumes, 5)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "fsfilter-later", str(target)], check=True)
    try:
        assert wait_for(lambda: ("attach", str(target)) in volumes, 10), volumes
        sh(f"echo x > {target}/on-the-new-one")
        seen.wait("notify_create_file", file_name=f"{target}/on-the-new-one")
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)
    assert wait_for(lambda: ("detach", str(target)) in volumes, 10), volumes


def test_process_connector_messages_decode() -> None:
    from fsfilter._abi import cn_proc as abi
    from fsfilter._wire import cn_proc as wire

    def message(what: int, body: bytes) -> bytes:
        event = abi.EVENT_HEADER.pack(what, 0, 123) + body
        cn = abi.CN_MSG.pack(abi.CN_IDX_PROC, abi.CN_VAL_PROC, 0, 0, len(event), 0) + event
        return abi.NLMSGHDR.pack(abi.NLMSGHDR.size + len(cn), abi.NLMSG_DONE, 0, 0, 0) + cn

    (fork,) = wire.decode(message(abi.PROC_EVENT_FORK, abi.FORK.pack(10, 10, 11, 11)))
    assert (fork.what, fork.parent_tgid, fork.pid, fork.tgid, fork.timestamp_ns) == (abi.PROC_EVENT_FORK, 10, 11, 11,
                                                                                       123)
    (comm,) = wire.decode(message(abi.PROC_EVENT_COMM, abi.COMM.pack(11, 11, b"worker\0\0")))
    assert comm.comm == "worker"
    (ex,) = wire.decode(message(abi.PROC_EVENT_EXIT, abi.EXIT.pack(11, 11, 256, 17, 10, 10)))
    assert ex.exit_code == 256 and ex.parent_tgid == 10
    assert wire.decode(b"short") == [] and wire.decode(message(abi.PROC_EVENT_EXEC, b"")) == []
    sub = wire.subscribe(True)
    assert len(sub) == abi.NLMSGHDR.unpack_from(sub)[0] == 40


def test_the_process_tracker_names_short_lived_processes() -> None:
    from fsfilter._sessions.process_tracker import tracker_or_none

    tracker = tracker_or_none()
    if tracker is None:
        pytest.skip("the process connector is not available here")
    try:
        time.sleep(0.1)
        pids = [subprocess.Popen(["sleep", "0.2"]).pid for _ in range(5)]
        time.sleep(0.6)
        for p in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p, 0)
        assert wait_for(lambda: sum(tracker.exited_name(p) == "sleep" for p in pids) >= 4, 5), [
            tracker.exited_name(p) for p in pids]
    finally:
        tracker.stop()


def test_size_qualified_rules(monitor: Callable[[], CBMonitor], scratch: Path) -> None:
    m = monitor()
    seen = Seen(m)
    m.add_filter_rule_ex(f"{scratch}/*.bin", "", c.FS_NE_CLOSE, 1000, -1, 0, 0)  # files of 1000 bytes or more
    m.start_filter()
    sh(f"head -c 10 /dev/zero > {scratch}/small.bin; head -c 5000 /dev/zero > {scratch}/big.bin")
    seen.wait("notify_close_file", file_name=f"{scratch}/big.bin")
    time.sleep(0.3)
    assert not seen.find("notify_close_file", file_name=f"{scratch}/small.bin")


@pytest.mark.timeout(200)
def test_an_overflow_is_reported_not_silent(monitor: Callable[[], CBMonitor], scratch: Path, tmp_path: Path) -> None:
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to build bench/smallfiles.c (scripts/setup.sh installs it)")
    binary = tmp_path / "smallfiles"
    subprocess.run(["gcc", "-O2", "-o", str(binary),
                    str(Path(__file__).resolve().parent.parent / "bench" / "smallfiles.c")], check=True)
    d = scratch / "flood"
    d.mkdir()
    m = monitor()
    m.config("UnlimitedQueue=false")  # the kernel's 16,384-event queue
    errors: list[int] = []
    m.on_error = lambda p: errors.append(p.error_code)
    m.on_notify_close_file = lambda p: None
    m.add_filter_rule(f"{d}/*", c.FS_NE_CLOSE | c.FS_NE_CREATE | c.FS_NE_DELETE | c.FS_NE_WRITE)
    m.start_filter()
    # ~120,000 records in well under a second: far faster than the reader takes them
    subprocess.run([str(binary), str(d), "60000"], check=True, capture_output=True, timeout=120)
    assert wait_for(lambda: m.lost_events >= 1, 30), m.stats
    assert errno.ENOBUFS in errors
