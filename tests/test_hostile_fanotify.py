"""The fanotify permission rules (AccessViaFanotify, CBProcess's exec refusal) attacked as a hostile user would
(issue 11): openat2 with flags flipped by another thread, many concurrent read-only opens, another path to the
same file (a bind mount in a user namespace, a hard link), a handler that never answers, and which file systems
a start marks. The attacks run as a real unprivileged user (the ``attacker`` fixture); permission marks go only on
the test's own tmpfs."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import SRC, needs_root, wait_for

from fsfilter import CBFilter
from fsfilter.api import constants as c
from fsfilter.api.cbprocess import CBProcess

pytestmark = [needs_root, pytest.mark.timeout(300)]

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds the attack programs")

# openat2 with a second thread flipping how.flags between O_RDWR and O_RDONLY; prints "writable opened refused".
OPENAT2_RACE = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/openat2.h>
static struct open_how how;
static volatile int done, started;
static void *flip(void *arg) {
    volatile __u64 *flags = &how.flags;  /* volatile: both stores must happen */
    (void)arg;
    started = 1;
    while (!done) { *flags = O_RDWR; *flags = O_RDONLY; }
    return NULL;
}
int main(int argc, char **argv) {
    int tries = atoi(argv[2]), writable = 0, opened = 0, refused = 0;
    pthread_t t;
    (void)argc;
    memset(&how, 0, sizeof how);
    pthread_create(&t, NULL, flip, NULL);
    while (!started) sched_yield();
    for (int i = 0; i < tries; i++) {
        int fd = syscall(SYS_openat2, AT_FDCWD, argv[1], &how, sizeof how);
        if (fd < 0) { refused++; continue; }
        opened++;
        if ((fcntl(fd, F_GETFL) & O_ACCMODE) != O_RDONLY) writable++;
        close(fd);
    }
    done = 1;
    pthread_join(t, NULL);
    printf("%d %d %d\n", writable, opened, refused);
    return 0;
}
"""

# readers NPROCS OPENS PATH...: NPROCS processes open the paths read-only OPENS times each, in turn;
# prints "opened eperm other".
READERS = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int procs = atoi(argv[1]), opens = atoi(argv[2]), nfiles = argc - 3, fds[2];
    if (pipe(fds) < 0) return 2;
    for (int p = 0; p < procs; p++) {
        if (fork() == 0) {
            long counts[3] = {0, 0, 0};
            for (int i = 0; i < opens; i++) {
                int fd = open(argv[3 + (i + p) % nfiles], O_RDONLY);
                if (fd >= 0) { counts[0]++; close(fd); }
                else if (errno == EPERM) counts[1]++;
                else counts[2]++;
            }
            if (write(fds[1], counts, sizeof counts) != sizeof counts) _exit(3);
            _exit(0);
        }
    }
    close(fds[1]);
    long total[3] = {0, 0, 0}, c[3];
    while (read(fds[0], c, sizeof c) == sizeof c) for (int k = 0; k < 3; k++) total[k] += c[k];
    while (wait(NULL) > 0) {}
    printf("%ld %ld %ld\n", total[0], total[1], total[2]);
    return 0;
}
"""


def build(source: str, where: Path, name: str) -> Path:
    """Compile a C attack program into ``where`` (world-executable, so the attacker can run it)."""
    src = where / f"{name}.c"
    src.write_text(source)
    binary = where / name
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(src)], check=True, capture_output=True)
    binary.chmod(0o755)
    return binary


@pytest.fixture
def area(scratch: Path, attacker: Any) -> Path:
    """scratch/ro (a read-only rule will cover it) with files the attacker owns (DAC lets them write: only the
    rule stops them), scratch/out (no rule), scratch/tools for the attack programs."""
    for sub in ("ro", "out", "tools"):
        (scratch / sub).mkdir()
    for i in range(4):
        (scratch / "ro" / f"f{i}").write_text("original\n")
    attacker.give(scratch / "ro", scratch / "out", *(scratch / "ro").iterdir())
    return scratch


def read_only(guarded: Callable[[], CBFilter], area: Path) -> CBFilter:
    f = guarded()
    f.add_filter_rule(f"{area}/ro/*", c.ACCESS_READ_ONLY, c.FS_CE_NONE, c.FS_NE_NONE)
    f.start_filter()
    return f


# -- item 2: openat2's flags live in the caller's memory


@needs_gcc
def test_openat2_with_flipped_flags_gets_no_writable_open(guarded: Callable[[], CBFilter], area: Path,
                                                         attacker: Any) -> None:
    race = build(OPENAT2_RACE, area / "tools", "race")
    target = area / "ro" / "f0"
    # without a rule the attack program really opens for writing now and then (the race is real)
    # (the kernel copies how.flags at one instant, so unfiltered it may take a few runs to catch an O_RDWR)
    for _ in range(20):
        out = attacker.run(str(race), str(target), "3000", timeout=120)
        assert out.returncode == 0, out.stderr
        writable, opened, _ = map(int, out.stdout.split())
        assert opened == 3000
        if writable:
            break
    assert writable > 0
    read_only(guarded, area)
    out = attacker.run(str(race), str(target), "3000", timeout=120)
    assert out.returncode == 0, out.stderr
    writable, opened, refused = map(int, out.stdout.split())
    assert writable == 0 and opened + refused == 3000
    assert target.read_text() == "original\n"


# -- item 3: concurrent read-only opens must not be refused


@needs_gcc
def test_concurrent_read_only_opens_are_never_refused(guarded: Callable[[], CBFilter], area: Path,
                                                      attacker: Any) -> None:
    readers = build(READERS, area / "tools", "readers")
    f = read_only(guarded, area)
    files = [str(p) for p in sorted((area / "ro").iterdir())]
    total = 0
    for procs, opens in ((32, 1250), (16, 2500), (4, 5000)):  # 40,000 + 40,000 + 20,000 = 100,000
        out = subprocess.run([str(readers), str(procs), str(opens), *files], capture_output=True, text=True,
                             timeout=240)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [str(procs * opens), "0", "0"], (procs, out.stdout)
        total += procs * opens
    assert total == 100_000
    # while refusing what writes, as the attacker too
    for mode in ("'r+'", "'w'", "'a'"):
        r = attacker.python(f"import sys\ntry:\n    open(sys.argv[1], {mode})\n"
                            "except OSError as e:\n    print(e.errno)", files[0])
        assert r.stdout.split() == [str(errno.EPERM)], (mode, r.stdout, r.stderr)
    r = attacker.python("import os, sys\ntry:\n    os.open(sys.argv[1], os.O_RDONLY | os.O_TRUNC)\n"
                        "except OSError as e:\n    print(e.errno)", files[0])
    assert r.stdout.split() == [str(errno.EPERM)]
    assert f.active and (area / "ro" / "f0").read_text() == "original\n"


# -- item 4: another path to the same file


def test_a_bind_mount_in_a_user_namespace_does_not_escape_the_rule(guarded: Callable[[], CBFilter], area: Path,
                                                                   attacker: Any) -> None:
    (area / "out" / "x").mkdir()
    attacker.give(area / "out" / "x")
    read_only(guarded, area)
    script = (f"mount --bind {area}/ro {area}/out/x || exit 9; cat {area}/out/x/f1 || exit 8; "
              f"echo evil >> {area}/out/x/f1 && echo written")
    out = attacker.run("unshare", "-rm", "/bin/sh", "-c", script, timeout=60)
    assert out.returncode not in (8, 9), out.stderr  # the namespace and the mount worked, reading too
    assert "original" in out.stdout and "written" not in out.stdout, (out.stdout, out.stderr)
    assert (area / "ro" / "f1").read_text() == "original\n"


def test_a_hard_link_outside_the_rule_does_not_escape_it(guarded: Callable[[], CBFilter], area: Path,
                                                         attacker: Any) -> None:
    # one link made before the filter starts, one while it runs
    os.link(area / "ro" / "f2", area / "out" / "early")
    read_only(guarded, area)
    for name in ("early", "late"):
        script = (f"[ -e {area}/out/{name} ] || ln {area}/ro/f2 {area}/out/{name} || exit 9; "
                  f"cat {area}/out/{name} || exit 8; echo evil >> {area}/out/{name} && echo written")
        out = attacker.sh(script)
        assert out.returncode not in (8, 9), out.stderr
        assert "original" in out.stdout and "written" not in out.stdout, (name, out.stdout, out.stderr)
    assert (area / "ro" / "f2").read_text() == "original\n"
    # a file with two names both outside every rule is not refused
    (area / "out" / "free").write_text("x")
    os.link(area / "out" / "free", area / "out" / "free2")
    attacker.give(area / "out" / "free")
    assert "written" in attacker.sh(f"echo y >> {area}/out/free2 && echo written").stdout


def test_deny_exec_through_a_bind_mount_in_a_user_namespace(process_filter: Callable[[], CBProcess],
                                                            area: Path, attacker: Any) -> None:
    (area / "tools" / "denied").mkdir()
    shutil.copy("/bin/true", area / "tools" / "denied" / "prog")
    (area / "out" / "x").mkdir()
    attacker.give(area / "out" / "x")
    denied = str(area / "tools" / "denied")
    seen: list[str] = []
    p = process_filter()

    def creation(e: Any) -> None:
        seen.append(e.image_file_name)
        if e.image_file_name.startswith(denied + "/"):
            e.result_code = errno.EPERM

    p.on_process_creation = creation
    p.config(f"ExecPermissionPaths={area}")
    p.start_filter()
    assert attacker.run(f"{denied}/prog").returncode != 0  # refused by its own name
    script = f"mount --bind {denied} {area}/out/x || exit 9; {area}/out/x/prog && echo ran"
    out = attacker.run("unshare", "-rm", "/bin/sh", "-c", script, timeout=60)
    assert out.returncode != 9, out.stderr
    assert "ran" not in out.stdout, (out.stdout, out.stderr, seen)
    assert f"{denied}/prog" in seen


def test_a_refused_program_does_not_run_as_an_interpreter(process_filter: Callable[[], CBProcess], area: Path,
                                                         attacker: Any) -> None:
    """Found in review: the interpreter of a script (and an ELF file's PT_INTERP loader) was let through unasked,
    so ``#!/path/refused`` ran the refused program."""
    (area / "tools" / "denied").mkdir()
    refused = area / "tools" / "denied" / "prog"
    shutil.copy("/bin/echo", refused)
    script = area / "out" / "s.sh"
    script.write_text(f"#!{refused}\n")
    script.chmod(0o755)
    attacker.give(script)
    # an ELF program naming the refused program as its loader: /bin/true with its PT_INTERP string replaced by a
    # short symbolic link to it (the kernel follows it; the path must fit in the 27 characters of the original)
    link = Path(f"/tmp/fsfi{os.getpid()}")
    elf = bytearray((Path("/bin/true")).read_bytes())
    interp = elf.find(b"/lib64/ld-linux-x86-64.so.2\0")
    if interp >= 0:
        link.symlink_to(refused)
        elf[interp:interp + 28] = str(link).encode().ljust(28, b"\0")
        (area / "out" / "crafted").write_bytes(bytes(elf))
        (area / "out" / "crafted").chmod(0o755)
    try:
        _refused_as_interpreter(process_filter, area, attacker, refused, script)
    finally:
        link.unlink(missing_ok=True)


def _refused_as_interpreter(process_filter: Callable[[], CBProcess], area: Path, attacker: Any, refused: Path,
                            script: Path) -> None:
    p = process_filter()
    seen: list[str] = []

    def creation(e: Any) -> None:
        seen.append(e.image_file_name)
        if e.image_file_name == str(refused):
            e.result_code = errno.EPERM

    p.on_process_creation = creation
    p.config(f"ExecPermissionPaths={area}")
    p.start_filter()
    out = attacker.run(str(script), "ran")
    assert "ran" not in out.stdout and out.returncode != 0, (out.stdout, out.stderr, seen)
    assert str(script) in seen and str(refused) in seen
    if (area / "out" / "crafted").exists():
        out = attacker.run(str(area / "out" / "crafted"))
        assert out.returncode != 0, (out.stdout, out.stderr, seen)
    assert attacker.run("/bin/sh", "-c", f"cp /bin/true {area}/out/t && {area}/out/t").returncode == 0


# -- item 9: the start says which file systems it marked


@pytest.mark.parametrize("command", [["deny-exec", "{area}/tools/*"], ["protect", "{area}/ro", "--read-only",
                                                                        "--fanotify"]])
def test_the_cli_says_which_file_systems_it_marked(area: Path, command: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    argv = [sys.executable, "-m", "fsfilter", *(a.format(area=area) for a in command)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert "Ctrl-C" in first, first
        assert proc.stderr.readline().strip() == f"fsfilter: permission marks on the file systems of: {area}"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_the_library_says_which_file_systems_it_marked(guarded: Callable[[], CBFilter],
                                                       process_filter: Callable[[], CBProcess], area: Path) -> None:
    f = read_only(guarded, area)
    assert f.permission_marks == [str(area)]
    p = process_filter()
    p.config(f"ExecPermissionPaths={area}/tools")
    p.start_filter()
    assert p.permission_marks == [str(area)]
    f.stop_filter()
    assert f.permission_marks == []


# -- item 8: a decision that never comes is answered at the deadline


@pytest.mark.parametrize("denies", [False, True])
def test_a_handler_that_never_returns_is_answered_at_the_deadline(process_filter: Callable[[], CBProcess],
                                                                  area: Path, attacker: Any, denies: bool) -> None:
    for name in ("hang", "quick"):
        shutil.copy("/bin/true", area / "tools" / name)
    release, entered = threading.Event(), threading.Event()
    errors: list[int] = []
    p = process_filter()

    def creation(e: Any) -> None:
        if e.image_file_name.endswith("/hang"):
            entered.set()
            release.wait(120)  # "forever": released when the test ends

    p.on_process_creation = creation
    p.on_error = lambda e: errors.append(e.error_code)
    p.config(f"ExecPermissionPaths={area}")
    p.config("ExecPermissionTimeout=8")  # room for the quick exec on a loaded machine
    p.config(f"ExecPermissionTimeoutDenies={'true' if denies else 'false'}")
    p.start_filter()
    hung = attacker.popen(str(area / "tools" / "hang"))
    try:
        assert entered.wait(30)
        quick = attacker.run(str(area / "tools" / "quick"), timeout=30)
        assert quick.returncode == 0, quick.stderr
        assert hung.poll() is None  # still waiting for its answer while another exec was answered
        hung.communicate(timeout=30)  # answered by the timeout policy (a hang detector, not a timing)
        assert (hung.returncode != 0) == denies
        # (the counter and on_error follow the answer that woke the process: wait for them, briefly)
        assert wait_for(lambda: p.late_exec_answers == 1 and errno.ETIMEDOUT in errors, 5), (p.late_exec_answers,
                                                                                            errors)
    finally:
        release.set()
        if hung.poll() is None:
            hung.kill()
            hung.communicate(timeout=10)


def test_an_access_decision_that_never_returns_is_answered_by_the_path(guarded: Callable[[], CBFilter],
                                                                       area: Path) -> None:
    f = guarded()
    f.add_filter_rule(f"{area}/ro/*", c.ACCESS_DENY_ALL, c.FS_CE_NONE, c.FS_NE_NONE)
    f.start_filter()
    guard = f._fanotify
    assert guard is not None
    release = threading.Event()
    decide = guard.perms._decide

    def slow(ev: Any) -> bool:
        if os.readlink(f"/proc/self/fd/{ev.fd}").startswith(f"{area}/"):
            release.wait(120)
        return decide(ev)

    guard.perms._decide = slow
    guard.perms.deadline = 2.0
    (area / "out" / "free").write_text("free")
    try:
        code = "import sys\ntry:\n    print(open(sys.argv[1]).read())\nexcept OSError as e:\n    print(e.errno)"
        for path, expected in ((area / "ro" / "f0", str(errno.EPERM)), (area / "out" / "free", "free")):
            out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=30)
            assert out.stdout.split() == [expected], (path, out.stdout, out.stderr)
        assert guard.perms.timed_out >= 2
    finally:
        release.set()


# -- item 6: a root-only way around the mount, and the remedy docs/api.md §9.0 gives for it

BY_HANDLE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
class Handle(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint), ("type", ctypes.c_int), ("data", ctypes.c_ubyte * 128)]
if sys.argv[1] == "take":
    h, mount_id = Handle(), ctypes.c_int()
    h.size = 128
    if libc.name_to_handle_at(-100, sys.argv[2].encode(), ctypes.byref(h), ctypes.byref(mount_id), 0) != 0:
        sys.exit(f"name_to_handle_at: {os.strerror(ctypes.get_errno())}")
    print(bytes(h).hex())
else:  # write HANDLE DIR: open the handle through DIR's file system for appending
    h = Handle.from_buffer_copy(bytes.fromhex(sys.argv[2]))
    mount_fd = os.open(sys.argv[3], os.O_RDONLY | os.O_DIRECTORY)
    fd = libc.open_by_handle_at(mount_fd, ctypes.byref(h), os.O_WRONLY | os.O_APPEND)
    if fd < 0:
        print(ctypes.get_errno())
    else:
        os.write(fd, b"PWNED\n")
        print(0)
"""


def by_handle(*args: str) -> str:
    out = subprocess.run([sys.executable, "-c", BY_HANDLE, *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("remedy", [False, True], ids=["mount", "fanotify"])
def test_open_by_handle_escapes_the_mount_but_not_a_fanotify_rule(area: Path, remedy: bool) -> None:
    """A handle taken before the filter started opens the lower file below the mount (root only: documented);
    the same rule enforced through fanotify judges the open whatever reached the file."""
    target = area / "ro" / "f0"
    handle = by_handle("take", str(target))
    f = CBFilter()
    if remedy:
        f.config("AccessViaFanotify=true")
    f.add_filter_rule(f"{area}/ro/*", c.ACCESS_READ_ONLY, c.FS_CE_NONE, c.FS_NE_NONE)
    f.start_filter()
    try:
        blocked = subprocess.run(["sh", "-c", f"echo PWNED >> {target}"], capture_output=True).returncode != 0
        assert blocked  # by path, both refuse
        result = int(by_handle("write", handle, str(area)))
    finally:
        f.stop_filter()
    if remedy:
        assert result == errno.EPERM
        assert target.read_text() == "original\n"
    else:
        assert result == 0 and "PWNED" in target.read_text()  # the documented escape, still there
