"""Hostile-user suite: hangs (issue 11, items 7, 8, 10, 11, 12).

Each test reproduces an attack or an accident that used to leave a caller hanging, a filter running without
its mount, or a dead mount behind, and checks that it now ends at once (bounds here are hang detectors, not
timings). Everything a test starts is ended by pid and every mount undone in ``finally``."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SRC, end_processes, force_unmount, is_mounted, needs_root, wait_for
from hostile import SYSTEM_PYTHON

from fsfilter import CBFilter
from fsfilter.api import constants as c

pytestmark = [needs_root]
ENV = {**os.environ, "PYTHONPATH": str(SRC)}
# What a caller of a mount whose daemon is stopped, gone or cut off may see; never a hang.
GONE = {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO}

# Prints the errno of a stat of argv[1] (0 when it succeeded) and how long it took.
STAT = ("import os, sys, time\nt = time.monotonic()\ntry:\n    os.stat(sys.argv[1]); e = 0\n"
        "except OSError as exc:\n    e = exc.errno\nprint(e, time.monotonic() - t, flush=True)\n")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[Any]]]:
    started: list[subprocess.Popen[Any]] = []
    try:
        yield started
    finally:
        for p in started:  # a stopped process cannot die of SIGKILL until it is continued
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
        end_processes(started)


def cli_daemon(procs: list[subprocess.Popen[Any]], *args: str) -> subprocess.Popen[str]:
    """``python -m fsfilter ARGS`` in the background; returns once it says it is serving."""
    p = subprocess.Popen([sys.executable, "-m", "fsfilter", *args], env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stderr is not None
    line = p.stderr.readline()
    assert "Ctrl-C to stop" in line, line + (p.stderr.read() if p.poll() is not None else "")
    return p


# -- item 8: a stopped filter blocks its callers only until the kernel's request timeout


@pytest.mark.timeout(90)
def test_stopped_filter_is_cut_off_by_the_request_timeout(scratch: Path, procs: list[subprocess.Popen[Any]]
                                                          ) -> None:
    lower = scratch / "lower"
    lower.mkdir()
    (lower / "f").write_text("x")
    daemon = cli_daemon(procs, "passthrough", str(lower), "--request-timeout", "3")
    try:
        os.kill(daemon.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        caller = subprocess.Popen([SYSTEM_PYTHON, "-S", "-c", STAT, str(lower / "new")], stdout=subprocess.PIPE,
                                  text=True)
        procs.append(caller)
        # The kernel looks for expired requests every 15 s or so: 3 s + that period + slack.
        out, _ = caller.communicate(timeout=60)
        took = time.monotonic() - stopped
        code = int(out.split()[0])
        print(f"\nstopped filter, request timeout 3 s: the caller got {errno.errorcode.get(code)} after {took:.1f} s")
        assert code in GONE, out
        os.kill(daemon.pid, signal.SIGCONT)
        # The daemon, continued, finds its connection aborted: it says so, cleans up and exits non-zero.
        rc = daemon.wait(10)
        err = daemon.stderr.read() if daemon.stderr else ""
        assert rc != 0 and "aborted" in err, err
        assert not is_mounted(lower)
        assert (lower / "f").read_text() == "x"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon.pid, signal.SIGCONT)
        force_unmount(lower)


# -- item 12: an unprivileged passthrough (fusermount3) unmounts for real on Ctrl-C


@contextlib.contextmanager
def fuse_device_for(uid: int) -> Iterator[None]:
    """Let ``uid`` open /dev/fuse (0600 root here) for the duration of the block."""
    if shutil.which("setfacl") is None or shutil.which("fusermount3") is None:
        pytest.skip("setfacl and fusermount3 are needed")
    subprocess.run(["setfacl", "-m", f"u:{uid}:rw", "/dev/fuse"], check=True)
    try:
        yield
    finally:
        subprocess.run(["setfacl", "-x", f"u:{uid}", "/dev/fuse"], check=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["int", "term"])
def test_unprivileged_passthrough_unmounts_on_ctrl_c(scratch: Path, attacker: Any,
                                                     procs: list[subprocess.Popen[Any]], sig: signal.Signals
                                                     ) -> None:
    lower = scratch / "lower"
    lower.mkdir()
    attacker.give(lower)
    with fuse_device_for(attacker.uid):
        p = subprocess.Popen(attacker.argv("env", f"PYTHONPATH={SRC}", SYSTEM_PYTHON, "-m", "fsfilter",
                                           "passthrough", str(lower)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                             start_new_session=True)  # its own group, as at a terminal
        procs.append(p)
        try:
            assert p.stderr is not None
            line = p.stderr.readline()
            assert "Ctrl-C to stop" in line, line + p.stderr.read()
            assert is_mounted(lower)
            assert attacker.sh(f"echo hi > {lower}/x").returncode == 0
            # Ctrl-C signals the terminal's whole foreground group: the daemon and whatever it started.
            os.killpg(p.pid, sig)
            rc = p.wait(20)
            err = p.stderr.read()
            assert rc == 0, err
            assert "unmounted" in err, err
            assert not is_mounted(lower), "fsfilter said unmounted, but the mount is still there"
            assert (lower / "x").read_text() == "hi\n"
        finally:
            force_unmount(lower)


# -- item 10: a filter whose mount is gone stops, says so, and is no longer active


def abort_connection(path: Path) -> None:
    """Write 1 to the fusectl ``abort`` file of the fsfilter mount at ``path`` (its connection number is the
    mount's device minor, read from mountinfo so that the mount itself is not touched). fusectl is not
    mounted on this machine: it is mounted for the moment on a directory of our own."""
    minor = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path) and fields[fields.index("-") + 1] == "fuse.fsfilter":
                minor = fields[2].split(":")[1]
    assert minor is not None, f"{path} is not an fsfilter mount"
    ctl = Path(path).parent / ".fusectl"
    ctl.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "fusectl", "fusectl", str(ctl)], check=True)
    try:
        (ctl / minor / "abort").write_text("1")
    finally:
        subprocess.run(["umount", str(ctl)], check=True)
        ctl.rmdir()


def cut_off(path: Path, how: str) -> None:
    if how == "abort":
        abort_connection(path)
    else:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["abort", "umount"])
def test_cbfilter_notices_its_mount_is_gone(scratch: Path, how: str) -> None:
    d = scratch / "protected"
    d.mkdir()
    (d / "f").write_text("keep")
    filt = CBFilter()
    errors: list[tuple[int, str]] = []
    stops: list[bool] = []
    filt.on_error = lambda p: errors.append((p.error_code, p.description))
    filt.on_filter_stop = lambda p: stops.append(True)
    filt.add_filter_rule(f"{d}/*", c.ACCESS_READ_ONLY, c.FS_CE_NONE, c.FS_NE_NONE)
    filt.start_filter()
    try:
        assert filt.active
        write = ["/bin/sh", "-c", f"echo changed > {d}/f"]
        assert subprocess.run(write, capture_output=True).returncode != 0  # read-only for other processes
        cut_off(d, how)
        assert wait_for(lambda: not filt.active, 5), "the filter still says it is active without its mount"
        assert [code for code, _ in errors] == [errno.ENOTCONN], errors
        assert ("aborted" if how == "abort" else "unmounted") in errors[0][1], errors
        assert stops == [True]
        assert wait_for(lambda: not is_mounted(d), 5), "the dead mount is still there"
        assert (d / "f").read_text() == "keep"  # the directory is usable again (unfiltered)
        filt.stop_filter()  # a no-op now
    finally:
        filt.stop_filter()
        force_unmount(d)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["abort", "umount"])
def test_cli_protect_exits_non_zero_when_its_mount_is_gone(scratch: Path, procs: list[subprocess.Popen[Any]],
                                                          how: str) -> None:
    d = scratch / "protected"
    d.mkdir()
    daemon = cli_daemon(procs, "protect", "--read-only", str(d))
    try:
        cut_off(d, how)
        rc = daemon.wait(10)
        err = daemon.stderr.read() if daemon.stderr else ""
        assert rc == 1, err
        assert ("aborted" if how == "abort" else "unmounted") in err and "Traceback" not in err, err
        assert not is_mounted(d)
    finally:
        force_unmount(d)


@pytest.mark.timeout(30)
def test_cli_passthrough_exits_non_zero_when_aborted(scratch: Path, procs: list[subprocess.Popen[Any]]) -> None:
    lower = scratch / "lower"
    lower.mkdir()
    daemon = cli_daemon(procs, "passthrough", str(lower))
    try:
        cut_off(lower, "abort")
        rc = daemon.wait(10)
        err = daemon.stderr.read() if daemon.stderr else ""
        assert rc == 1 and "aborted" in err, err
        assert not is_mounted(lower)
    finally:
        force_unmount(lower)
