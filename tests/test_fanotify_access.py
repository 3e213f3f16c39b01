"""CBFilter's deny-only access rules through fanotify permission events (config AccessViaFanotify=true): nothing
is mounted; denied opens, write opens of read-only files and execs get EPERM in the calling process; allowed
opens are cached; a directory moved under a rule loses its cache; the filter's own opens pass; and a killed
filter leaves no caller blocked. Permission marks go only on the test's own tmpfs."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SRC, is_mounted, needs_root, wait_for

from fsfilter import CBFilter
from fsfilter.api import constants as c

pytestmark = [needs_root, pytest.mark.timeout(120)]


def errno_of(code: str, *args: str) -> int:
    """Run ``code`` in a child; the errno of the OSError it raised, or 0."""
    wrapped = ("import os, sys\ntry:\n" + textwrap.indent(textwrap.dedent(code), "    ")
               + "\nexcept OSError as e:\n    print(e.errno)\nelse:\n    print(0)\n")
    out = subprocess.run([sys.executable, "-c", wrapped, *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.fixture
def tree(scratch: Path) -> Path:
    d = scratch / "data"
    for sub in ("ro", "bin", "plain", "secretdir"):
        (d / sub).mkdir(parents=True)
    (d / "secret.txt").write_text("top secret")
    (d / "ro" / "file").write_text("read me")
    (d / "plain" / "file").write_text("anyone")
    shutil.copy("/bin/true", d / "bin" / "true")
    shutil.copy("/bin/true", d / "plain" / "true")
    return d


def test_deny_read_only_and_execute_protect_without_a_mount(guarded: Callable[[], CBFilter], tree: Path) -> None:
    f = guarded()
    f.add_filter_rule(f"{tree}/secret*", c.ACCESS_DENY_ALL, c.FS_CE_NONE, c.FS_NE_NONE)
    f.add_filter_rule(f"{tree}/ro/*", c.ACCESS_READ_ONLY, c.FS_CE_NONE, c.FS_NE_NONE)
    f.add_filter_rule(f"{tree}/bin/*", c.ACCESS_EXECUTE_PROTECT, c.FS_CE_NONE, c.FS_NE_NONE)
    f.start_filter()
    assert f.active and not is_mounted(tree) and f.attach_point_count == 0
    assert errno_of("open(sys.argv[1]).read()", str(tree / "secret.txt")) == errno.EPERM
    assert errno_of("open(sys.argv[1]).read()", str(tree / "ro" / "file")) == 0
    for mode in ("'r+'", "'w'", "'a'"):
        assert errno_of(f"open(sys.argv[1], {mode})", str(tree / "ro" / "file")) == errno.EPERM, mode
    assert errno_of("os.open(sys.argv[1], os.O_RDONLY | os.O_TRUNC)", str(tree / "ro" / "file")) == errno.EPERM
    assert (tree / "ro" / "file").read_text() == "read me"
    assert errno_of("open(sys.argv[1], 'rb').read()", str(tree / "bin" / "true")) == 0  # reading it is fine
    assert errno_of("import subprocess; subprocess.run([sys.argv[1]])", str(tree / "bin" / "true")) == errno.EPERM
    assert errno_of("import subprocess; subprocess.run([sys.argv[1]], check=True)", str(tree / "plain" / "true")) == 0
    # the filter's own process is never refused (nor blocked) by its own rules
    assert (tree / "secret.txt").read_text() == "top secret"
    guard = f._fanotify
    assert guard is not None and guard.denied >= 5
    f.stop_filter()
    assert errno_of("open(sys.argv[1]).read()", str(tree / "secret.txt")) == 0


def test_allowed_opens_are_cached_and_the_cache_follows_rules_and_renames(guarded: Callable[[], CBFilter],
                                                                          tree: Path) -> None:
    f = guarded()
    f.add_filter_rule(f"{tree}/secretdir/*", c.ACCESS_DENY_ALL, c.FS_CE_NONE, c.FS_NE_NONE)
    f.start_filter()
    guard = f._fanotify
    assert guard is not None
    assert errno_of("open(sys.argv[1]).read()", str(tree / "plain" / "file")) == 0
    assert wait_for(lambda: guard.ignored >= 1, 5)  # plain/ is outside every rule: its children are cached
    answered = guard.answered
    for _ in range(3):
        assert errno_of("open(sys.argv[1]).read()", str(tree / "plain" / "file")) == 0
    # the three opens of plain/file reached no Python (the interpreters' own opens elsewhere may)
    # a directory moved under the rule takes no cached "allow" with it
    subprocess.run(["mv", str(tree / "plain"), str(tree / "secretdir" / "inner")], check=True)
    assert wait_for(lambda: guard.ignored == 0, 5)
    assert errno_of("open(sys.argv[1]).read()", str(tree / "secretdir" / "inner" / "file")) == errno.EPERM
    # a rule added while running applies at once (the cache is dropped)
    (tree / "other").mkdir()
    (tree / "other" / "f").write_text("x")
    assert errno_of("open(sys.argv[1]).read()", str(tree / "other" / "f")) == 0
    f.add_filter_rule(f"{tree}/other/*", c.ACCESS_DENY_ALL, c.FS_CE_NONE, c.FS_NE_NONE)
    assert errno_of("open(sys.argv[1]).read()", str(tree / "other" / "f")) == errno.EPERM
    assert guard.answered > answered


FILTER_PROCESS = """
import sys, time
sys.path.insert(0, sys.argv[2])
from fsfilter import CBFilter, ACCESS_DENY_ALL
f = CBFilter()
f.config("AccessViaFanotify=true")
f.add_filter_rule(sys.argv[1] + "/secret*", ACCESS_DENY_ALL, 0, 0)
f.start_filter()
print("ready", flush=True)
time.sleep(600)
"""


def test_a_killed_filter_leaves_no_caller_blocked(tree: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", FILTER_PROCESS, str(tree), str(SRC)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert errno_of("open(sys.argv[1]).read()", str(tree / "secret.txt")) == errno.EPERM
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        start = time.monotonic()
        assert errno_of("open(sys.argv[1]).read()", str(tree / "secret.txt")) == 0  # fail-open: not blocked
        assert time.monotonic() - start < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_protect_command_with_fanotify(tree: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "fsfilter", "protect", str(tree / "ro"), "--read-only",
                             "--fanotify"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None and "protecting" in proc.stderr.readline()
        assert not is_mounted(tree / "ro")
        assert errno_of("open(sys.argv[1], 'w')", str(tree / "ro" / "file")) == errno.EPERM
        assert errno_of("open(sys.argv[1]).read()", str(tree / "ro" / "file")) == 0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    bad = subprocess.run([sys.executable, "-m", "fsfilter", "protect", str(tree), "--no-delete", "--fanotify"],
                         capture_output=True, text=True, env=env, timeout=20)
    assert bad.returncode != 0 and "--fanotify enforces only" in bad.stderr
