"""The hostile-user suite, bad input: each is refused with a CBFSFilterError (or a CLI error) at the call that is
wrong, and changes nothing (issue 11, item 13)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SRC, force_unmount, is_mounted, mounts, needs_root

from fsfilter import CBFilter, CBFSFilterError, CBMonitor, CBProcess, PassthroughFilter
from fsfilter.api import constants as c

pytestmark = [needs_root, pytest.mark.timeout(60)]


@pytest.fixture
def one(cbfilter: Callable[[], CBFilter]) -> CBFilter:
    return cbfilter()


def fsfilter_mounts(below: Path) -> list[str]:
    return [point for point, kind in mounts() if kind == "fuse.fsfilter" and point.startswith(f"{below}/")]


@pytest.mark.parametrize("path", ["/proc/self", "/proc/sys/kernel", "/sys/kernel", "/dev/pts"])
def test_pseudo_file_systems_are_refused_at_add_attach_point(one: CBFilter, path: str) -> None:
    with pytest.raises(CBFSFilterError) as info:
        one.add_attach_point(path)
    assert info.value.code == errno.EINVAL and "real file system" in info.value.message
    assert one.attach_point_count == 0


def test_a_mask_on_procfs_is_refused_at_start(one: CBFilter) -> None:
    one.add_filter_rule(f"/proc/{os.getpid()}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_ALL)
    with pytest.raises(CBFSFilterError) as info:
        one.start_filter()
    assert info.value.code == errno.EINVAL and "proc" in info.value.message
    assert not one.active


def test_an_attach_point_inside_a_mount_this_process_serves_is_refused(scratch: Path, one: CBFilter) -> None:
    outer = scratch / "outer"
    (outer / "inner").mkdir(parents=True)
    p = PassthroughFilter(outer)
    p.start()
    try:
        with pytest.raises(CBFSFilterError) as info:
            one.add_attach_point(str(outer / "inner"))
        assert info.value.code == errno.EDEADLK
        with pytest.raises(CBFSFilterError) as info:
            PassthroughFilter(outer / "inner").start()
        assert info.value.code == errno.EDEADLK
    finally:
        p.stop()
        force_unmount(outer)
    one.add_attach_point(str(outer / "inner"))  # once the outer one stopped, it is an ordinary directory


@pytest.mark.parametrize("timeout", [-1, 10**13, 2**31, True, 1.5, "10"])
def test_start_filter_refuses_bad_timeouts(scratch: Path, one: CBFilter, timeout: object) -> None:
    one.add_filter_rule(f"{scratch}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_ALL)
    with pytest.raises(CBFSFilterError) as info:
        one.start_filter(timeout)  # type: ignore[arg-type]
    assert info.value.code == errno.EINVAL
    assert not one.active and not is_mounted(scratch)


def test_start_filter_takes_the_largest_timeout(scratch: Path, one: CBFilter) -> None:
    d = scratch / "d"
    d.mkdir()
    one.add_filter_rule(f"{d}/*", c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN, c.FS_NE_NONE)
    one.on_before_open_file = lambda e: None
    one.start_filter(2**31 - 1)
    (d / "x").write_text("ok")  # served, not EIO
    assert (d / "x").read_text() == "ok"


@pytest.mark.parametrize("cls", [CBFilter, CBMonitor, CBProcess])
def test_config_refuses_what_is_not_a_string(cls: type) -> None:
    obj = cls()
    for bad in (None, 3, b"FilterOwnRequests=true"):
        with pytest.raises(CBFSFilterError) as info:
            obj.config(bad)
        assert info.value.code == errno.EINVAL


@pytest.mark.parametrize("cls", [CBFilter, CBMonitor, CBProcess])
def test_worker_counts_are_checked_by_config(cls: type) -> None:
    obj = cls()
    for setting in ("MaxWorkerThreadCount=3000", "MinWorkerThreadCount=100000", "MaxWorkerThreadCount=-1",
                    "MaxWorkerThreadCount=2.5"):
        with pytest.raises(CBFSFilterError) as info:
            obj.config(setting)
        assert info.value.code == errno.EINVAL, setting
    obj.config("MaxWorkerThreadCount=8")
    with pytest.raises(CBFSFilterError):
        obj.config("MinWorkerThreadCount=9")  # above the maximum
    assert obj.config("MinWorkerThreadCount") == "1"
    obj.config("MinWorkerThreadCount=8")
    with pytest.raises(CBFSFilterError):
        obj.config("MaxWorkerThreadCount=4")
    assert obj.config("MaxWorkerThreadCount") == "8"


def test_attach_points_are_bounded(scratch: Path, one: CBFilter) -> None:
    from fsfilter.api.cbfilter import MAX_ATTACH_POINTS

    for i in range(MAX_ATTACH_POINTS + 1):
        (scratch / f"d{i}").mkdir()
    for i in range(MAX_ATTACH_POINTS):
        one.add_attach_point(str(scratch / f"d{i}"))
    with pytest.raises(CBFSFilterError) as info:
        one.add_attach_point(str(scratch / f"d{MAX_ATTACH_POINTS}"))
    assert info.value.code == errno.ENOSPC and one.attach_point_count == MAX_ATTACH_POINTS
    # the same limit for directories named by masks
    other = CBFilter()
    for i in range(MAX_ATTACH_POINTS + 1):
        other.add_filter_rule(f"{scratch}/d{i}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_ALL)
    with pytest.raises(CBFSFilterError) as info:
        other.start_filter()
    assert info.value.code == errno.ENOSPC and not other.active and fsfilter_mounts(scratch) == []


@pytest.mark.parametrize("tool", [["protect", "", "--read-only"], ["hide", "", "x"], ["monitor", ""],
                                  ["protect", " ", "--read-only"]])
def test_cli_refuses_an_empty_directory_argument(tool: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-m", "fsfilter", *tool], capture_output=True, text=True, env=env,
                       timeout=30, cwd=tmp_path)
    assert r.returncode != 0 and "empty" in r.stderr, r.stderr
    assert not is_mounted(tmp_path)
