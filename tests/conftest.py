"""Fixtures for tests that mount for real. Every mount, process and tmpfs a test makes is undone in
``finally``, with a lazy unmount as the last resort, even when the test fails."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fsfilter import CBFilter, CBProcess, PassthroughFilter

SRC = Path(__file__).resolve().parent.parent / "src"
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounting needs root")


def mounts() -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount, from /proc/self/mountinfo, unescaped."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append((point, fields[sep + 1]))
    return out


def is_mounted(path: str | os.PathLike[str], fstype: str = "fuse.fsfilter") -> bool:
    p = os.path.realpath(os.fspath(path))
    return any(point == p and kind == fstype for point, kind in mounts())


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Last-resort cleanup: detach every fsfilter mount at ``path``."""
    for _ in range(8):
        if not is_mounted(path):
            return
        subprocess.run(["umount", "-l", os.fspath(path)], capture_output=True)


def end_processes(started: list[subprocess.Popen[Any]]) -> None:
    """Kill (by pid) the helper processes a test started that are still running, and reap them all."""
    for p in started:
        if p.poll() is None:
            p.kill()
        with contextlib.suppress(Exception):
            p.communicate(timeout=10)


def pids_whose_argv(match: Callable[[list[bytes]], bool]) -> list[int]:
    """Pids of the processes whose command line (/proc/*/cmdline, split at NULs) ``match`` accepts: helper processes
    our daemons start (watchdogs, holders, rescuers), found without a pid to follow."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if match(argv):
                found.append(int(name))
    return found


def end_pids(find: Callable[[], list[int]], timeout: float = 10.0) -> None:
    """SIGTERM what ``find`` lists (they let go cleanly), then SIGKILL what is still there after ``timeout``."""
    first = find()
    for pid in first:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not any(p in find() for p in first), timeout)
    for pid in find():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A private tmpfs, so tests behave the same whatever file system /tmp is on. It lies in a directory
    every user can traverse, so tests can act as other users in it."""
    if not IS_ROOT:
        yield tmp_path
        return
    base = Path(tempfile.mkdtemp(prefix="fsfilter-test-"))
    os.chmod(base, 0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g,mode=0755", "fsfilter-test", str(base)], check=True)
    try:
        yield base
    finally:
        force_unmount(base)
        for _ in range(4):
            if subprocess.run(["umount", str(base)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(base)], capture_output=True)
            if not any(point == str(base) for point, _ in mounts()):
                break
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def lower_and_mount(scratch: Path) -> tuple[Path, Path]:
    lower, mnt = scratch / "lower", scratch / "mnt"
    lower.mkdir()
    mnt.mkdir()
    return lower, mnt


@pytest.fixture
def filter_factory() -> Iterator[Callable[..., PassthroughFilter]]:
    """Start filters with any options; all of them are stopped and unmounted afterwards."""
    made: list[PassthroughFilter] = []

    def make(lower: str | os.PathLike[str], mountpoint: str | os.PathLike[str] | None = None,
             **options: object) -> PassthroughFilter:
        filt = PassthroughFilter(lower, mountpoint, **options)  # type: ignore[arg-type]
        made.append(filt)
        filt.start()
        return filt

    try:
        yield make
    finally:
        for filt in made:
            with contextlib.suppress(Exception):
                filt.stop()
            force_unmount(filt.mountpoint)


@pytest.fixture
def mounted(lower_and_mount: tuple[Path, Path], filter_factory: Callable[..., PassthroughFilter]
            ) -> tuple[Path, Path, PassthroughFilter]:
    """A pass-through of ``lower`` at ``mnt`` with default options."""
    lower, mnt = lower_and_mount
    return lower, mnt, filter_factory(lower, mnt)


class Daemon:
    """``python -m fsfilter passthrough`` as a separate process, for signal and kill tests."""

    def __init__(self, lower: Path, mnt: Path | None, *args: str) -> None:
        self.target = mnt if mnt is not None else lower
        argv = [sys.executable, "-m", "fsfilter", "passthrough", str(lower)]
        if mnt is not None:
            argv.append(str(mnt))
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        self.proc = subprocess.Popen([*argv, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if not wait_for(lambda: is_mounted(self.target) or self.proc.poll() is not None, 20):
            raise TimeoutError("the daemon did not mount in 20 s")
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        force_unmount(self.target)


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(lower: Path, mnt: Path | None = None, *args: str) -> Daemon:
        d = Daemon(lower, mnt, *args)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.stop()


@pytest.fixture(scope="session")
def attacker() -> Iterator[Any]:
    """A real unprivileged user for the hostile-user suite, created for the session and removed after it."""
    if not IS_ROOT:
        pytest.skip("creating a user needs root")
    from hostile import temporary_user

    with temporary_user() as user:
        yield user


@contextlib.contextmanager
def _made(build: Callable[[], Any], stop: Callable[[Any], None]) -> Iterator[Callable[[], Any]]:
    """A factory fixture's body: every object ``build`` made is stopped afterwards, whatever happened."""
    made: list[Any] = []

    def make() -> Any:
        obj = build()
        made.append(obj)
        return obj

    try:
        yield make
    finally:
        for obj in made:
            with contextlib.suppress(Exception):
                stop(obj)


def _stop_cbfilter(f: CBFilter) -> None:
    points = list(f._attached)
    try:
        f.stop_filter()
    finally:
        for p in points:
            force_unmount(p)


def _guarded_filter() -> CBFilter:
    f = CBFilter()
    f.config("AccessViaFanotify=true")
    return f


@pytest.fixture
def cbfilter() -> Iterator[Callable[[], CBFilter]]:
    """Make CBFilters; each is stopped and its attach points unmounted afterwards."""
    with _made(CBFilter, _stop_cbfilter) as make:
        yield make


@pytest.fixture
def guarded() -> Iterator[Callable[[], CBFilter]]:
    """Make CBFilters that enforce deny-only rules through fanotify (AccessViaFanotify); stopped afterwards."""
    with _made(_guarded_filter, _stop_cbfilter) as make:
        yield make


@pytest.fixture
def process_filter() -> Iterator[Callable[[], CBProcess]]:
    """Make CBProcess filters; each is stopped afterwards."""
    with _made(CBProcess, lambda p: p.stop_filter()) as make:
        yield make
