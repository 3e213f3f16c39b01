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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SRC, end_processes, force_unmount, is_mounted, needs_root, wait_for
from hostile import SYSTEM_PYTHON

from fsfilter import CBFilter, PassthroughFilter
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
    # The device's ACL as it was, to put back exactly (removing the entry alone would leave a mask entry behind).
    saved = subprocess.run(["getfacl", "-p", "/dev/fuse"], check=True, capture_output=True, text=True).stdout
    subprocess.run(["setfacl", "-m", f"u:{uid}:rw", "/dev/fuse"], check=True)
    try:
        yield
    finally:
        subprocess.run(["setfacl", "-b", "/dev/fuse"], check=True)
        subprocess.run(["setfacl", "--restore=-"], input=saved, text=True, check=True)


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
def test_passthrough_filter_notices_its_mount_is_gone(scratch: Path, how: str) -> None:
    lower = scratch / "lower"
    lower.mkdir()
    filt = PassthroughFilter(lower)
    told: list[str] = []
    filt.on_lost = told.append
    filt.start()
    try:
        (lower / "f").write_text("x")
        cut_off(lower, how)
        assert wait_for(lambda: not filt.active, 5)
        assert ("aborted" if how == "abort" else "unmounted") in filt.lost, filt.lost
        assert wait_for(lambda: told == [filt.lost], 5), told
        assert wait_for(lambda: not is_mounted(lower), 5), "the dead mount is still there"
        assert (lower / "f").read_text() == "x"
    finally:
        filt.stop()
        force_unmount(lower)


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


# -- item 7: handlers that never return


# Opens argv[1] with the flags named in argv[2]; prints "opened" or the errno.
OPEN = ("import os, sys\nflags = {'r': os.O_RDONLY, 'trunc': os.O_WRONLY | os.O_TRUNC}[sys.argv[2]]\n"
        "try:\n    os.close(os.open(sys.argv[1], flags)); print('opened', flush=True)\n"
        "except OSError as exc:\n    print(exc.errno, flush=True)\n")


class Wedge:
    """A before-open handler that never returns (until released) for names starting with "stuck", and records
    the other names it saw; ``deny`` names get EACCES."""

    def __init__(self, deny: str = "") -> None:
        self.release = threading.Event()
        self.entered = 0
        self.seen: list[str] = []
        self.deny = deny
        self._lock = threading.Lock()

    def __call__(self, p: Any) -> None:
        name = os.path.basename(p.file_name)
        if name.startswith("stuck"):
            with self._lock:
                self.entered += 1
            self.release.wait(60)
            return
        self.seen.append(name)
        if name == self.deny:
            p.result_code = errno.EACCES


@contextlib.contextmanager
def wedged_filter(d: Path, wedge: Wedge, timeout_ms: int = 0, **config: str) -> Iterator[CBFilter]:
    filt = CBFilter()
    for name, value in config.items():
        filt.config(f"{name}={value}")
    errors: list[tuple[int, str]] = []
    filt.on_error = lambda p: errors.append((p.error_code, p.description))
    filt.on_before_open_file = wedge
    filt.add_filter_rule(f"{d}/*", c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN, c.FS_NE_NONE)
    filt.start_filter(timeout_ms)
    filt.errors = errors  # type: ignore[attr-defined]
    try:
        yield filt
    finally:
        wedge.release.set()
        filt.stop_filter()
        force_unmount(d)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout_ms", [0, 30000], ids=["no-timeout", "timeout"])
def test_sigkilled_caller_of_a_stuck_handler_goes_at_once(scratch: Path, attacker: Any,
                                                         procs: list[subprocess.Popen[Any]], timeout_ms: int
                                                         ) -> None:
    d = scratch / "d"
    d.mkdir()
    for i in range(3):
        (d / f"stuck{i}").write_text("data")
        attacker.give(d / f"stuck{i}")
    wedge = Wedge()
    took: list[float] = []
    with wedged_filter(d, wedge, timeout_ms) as filt:
        for i in range(3):
            caller = attacker.popen(SYSTEM_PYTHON, "-S", "-c", OPEN, str(d / f"stuck{i}"), "trunc")
            procs.append(caller)
            assert wait_for(lambda n=i + 1: wedge.entered == n, 10), "the open never reached the handler"
            killed = time.monotonic()
            caller.kill()
            caller.wait(10)
            took.append(time.monotonic() - killed)
        print(f"\nSIGKILLed callers of a stuck handler gone after {', '.join(f'{t * 1000:.0f} ms' for t in took)}")
        assert max(took) < 1.0, took
        assert filt.stats["abandoned"] == 3
        wedge.release.set()  # the handlers return now: their requests must have no effect (no truncation)
        time.sleep(0.3)
        for i in range(3):
            assert (d / f"stuck{i}").read_text() == "data"
        r = attacker.python(OPEN, str(d / "stuck0"), "r")  # and the filter serves on
        assert r.stdout.strip() == "opened", r


@pytest.mark.timeout(60)
def test_stuck_handlers_do_not_hold_up_other_files(scratch: Path, attacker: Any,
                                                   procs: list[subprocess.Popen[Any]]) -> None:
    d = scratch / "d"
    d.mkdir()
    stuck = 12  # more than the 8 threads of the pool this machine starts with
    for i in range(stuck):
        (d / f"stuck{i}").write_text("x")
    (d / "other").write_text("x")
    wedge = Wedge()
    with wedged_filter(d, wedge) as filt:
        for i in range(stuck):
            procs.append(attacker.popen(SYSTEM_PYTHON, "-S", "-c", OPEN, str(d / f"stuck{i}"), "r"))
        assert wait_for(lambda: wedge.entered >= stuck, 15), f"only {wedge.entered} handlers were entered"
        r = attacker.python(OPEN, str(d / "other"), "r", timeout=10)
        assert r.stdout.strip() == "opened", r
        assert "other" in wedge.seen  # served normally: its handler ran
        assert filt.stats["request_threads"] > stuck


@pytest.mark.timeout(60)
def test_wedged_event_workers_do_not_make_new_events_expire(scratch: Path, attacker: Any,
                                                            procs: list[subprocess.Popen[Any]]) -> None:
    """With a timeout, handlers wedged past it keep their threads: a later event (a deny verdict on malware)
    must still get a thread of its own, not expire unhandled and let the open through."""
    d = scratch / "d"
    d.mkdir()
    stuck = 10  # more than the 8 event threads (MaxWorkerThreadCount) this machine allows
    for i in range(stuck):
        (d / f"stuck{i}").write_text("x")
    (d / "malware").write_text("x")
    wedge = Wedge(deny="malware")
    with wedged_filter(d, wedge, timeout_ms=1000) as filt:
        callers = [attacker.popen(SYSTEM_PYTHON, "-S", "-c", OPEN, str(d / f"stuck{i}"), "r") for i in range(stuck)]
        procs.extend(callers)
        assert wait_for(lambda: wedge.entered >= stuck, 15), f"only {wedge.entered} handlers were entered"
        for caller in callers:  # each expired after 1 s and went ahead, its handler still running
            out, _ = caller.communicate(timeout=10)
            assert out.strip() == "opened", out
        assert filt.stats["overdue"] >= stuck
        shed = filt.stats["shed"]
        r = attacker.python(OPEN, str(d / "malware"), "r", timeout=10)
        assert r.stdout.strip() == str(errno.EACCES), f"the deny verdict was skipped: {r}"
        assert filt.stats["shed"] == shed
        assert any(code == 110 for code, _ in filt.errors)  # type: ignore[attr-defined]  # the overruns


@pytest.mark.timeout(60)
def test_at_the_thread_limit_expired_events_are_denied_when_the_rule_says_so(
        scratch: Path, attacker: Any, procs: list[subprocess.Popen[Any]]) -> None:
    d = scratch / "d"
    d.mkdir()
    for i in range(4):
        (d / f"stuck{i}").write_text("x")
    (d / "malware").write_text("x")
    wedge = Wedge(deny="malware")
    with wedged_filter(d, wedge, timeout_ms=500, DenyExpiredEvents="true") as filt:
        filt.dispatcher.thread_limit = 4  # the bound, made small: 4 wedged handlers reach it
        callers = [attacker.popen(SYSTEM_PYTHON, "-S", "-c", OPEN, str(d / f"stuck{i}"), "r") for i in range(4)]
        procs.extend(callers)
        assert wait_for(lambda: wedge.entered >= 4, 15), f"only {wedge.entered} handlers were entered"
        shed = filt.stats["shed"]
        r = attacker.python(OPEN, str(d / "malware"), "r", timeout=10)
        assert r.stdout.strip() == str(errno.ETIMEDOUT), r  # fails closed, and says why
        assert filt.stats["shed"] == shed + 1
        assert any("could run" in text for _, text in filt.errors)  # type: ignore[attr-defined]


# -- item 11: a filter over the directory that holds its own interpreter and modules


def read_line(stream: Any, timeout: float) -> str:
    """The next line of a pipe, or "" when none comes within ``timeout`` seconds (a reader thread)."""
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return got[0] if got else ""


@pytest.mark.timeout(60)
def test_filter_over_its_own_interpreter_and_modules(scratch: Path, procs: list[subprocess.Popen[Any]]) -> None:
    """The watchdog used to be started after the mount, from this interpreter, below the mount: it waited
    for the mount's INIT, which the daemon answered only once the watchdog had started. Now it starts first,
    so the filter serves, and a SIGKILL leaves no dead mount behind."""
    d = scratch / "d"
    (d / "bin").mkdir(parents=True)
    shutil.copytree(SRC, d / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    python = d / "bin" / "python3"
    shutil.copy2(os.path.realpath(sys.executable), python)  # the interpreter itself, a copy under the mount
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(d / "src"),
           "PYTHONHOME": sys.base_prefix, "PYTHONDONTWRITEBYTECODE": "1"}
    p = subprocess.Popen([str(python), "-m", "fsfilter", "protect", "--no-delete", str(d)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    procs.append(p)
    try:
        line = read_line(p.stderr, 20)
        assert "Ctrl-C to stop" in line, f"the filter did not start (deadlocked?): {line!r}"
        other = subprocess.run(["/bin/rm", str(d / "src" / "fsfilter" / "cli.py")], capture_output=True)
        assert other.returncode != 0  # it protects (another process may not delete)
        p.kill()
        p.wait(10)
        assert wait_for(lambda: not is_mounted(d), 2), "SIGKILL left a dead mount"
        assert (d / "src" / "fsfilter" / "cli.py").exists()
    finally:
        p.kill()
        p.wait(10)
        force_unmount(d)
