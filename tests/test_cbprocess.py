"""CBProcess: creation and termination of processes and threads from the process connector, refusing programs
with fanotify exec permission (marks only on the test's own tmpfs), filtered and ignored processes."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_root, wait_for

from fsfilter import CBFSFilterError
from fsfilter.api.cbprocess import CBProcess

pytestmark = [needs_root, pytest.mark.timeout(120)]


class Seen:
    def __init__(self, p: CBProcess) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        for event in ("process_creation", "process_termination", "thread_creation", "thread_termination"):
            setattr(p, "on_" + event, self._handler(event))

    def _handler(self, event: str) -> Callable[[Any], None]:
        def handle(e: Any) -> None:
            with self.lock:
                self.items.append((event, {k: getattr(e, k) for k in type(e).__slots__}))
        return handle

    def find(self, event: str, **match: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [f for e, f in self.items if e == event and all(f.get(k) == v for k, v in match.items())]


def test_fork_exec_is_one_creation_with_image_and_command_line(process_filter: Callable[[], CBProcess]) -> None:
    p = process_filter()
    seen = Seen(p)
    p.start_filter()
    out = subprocess.run(["sh", "-c", "echo $$; /bin/sleep 0.05; (exit 3)"], capture_output=True, text=True)
    sh = int(out.stdout.split()[0])
    assert wait_for(lambda: bool(seen.find("process_termination", process_id=sh)), 10)
    children = seen.find("process_creation", parent_process_id=sh)
    (sleep,) = [f for f in children if f["image_file_name"].endswith("/sleep")]  # once, at the exec
    assert sleep["image_file_name"].endswith("/sleep") and sleep["command_line"] == "/bin/sleep 0.05"
    assert sleep["process_name"] == "sleep" and sleep["creating_process_id"] == sh
    assert seen.find("process_termination", process_id=sleep["process_id"], process_name="sleep")
    # the subshell forks and never execs: one creation (the shell's image), then its exit status
    subshells = [f for f in children if f is not sleep]
    assert len(subshells) == 1 and subshells[0]["image_file_name"] == os.path.realpath("/bin/sh"), children
    assert wait_for(lambda: any(f["exit_status"] == 3 << 8 for f in seen.find("process_termination")), 5)


def test_threads_are_reported(process_filter: Callable[[], CBProcess]) -> None:
    p = process_filter()
    seen = Seen(p)
    p.start_filter()
    code = "import threading, os\nts=[threading.Thread(target=lambda: None) for _ in range(3)]\n" \
           "[t.start() for t in ts]; [t.join() for t in ts]; print(os.getpid())"
    pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    assert wait_for(lambda: len(seen.find("thread_termination", process_id=pid)) >= 3, 10)
    assert len(seen.find("thread_creation", process_id=pid)) >= 3


def test_filtered_and_ignored_processes(process_filter: Callable[[], CBProcess]) -> None:
    p = process_filter()
    seen = Seen(p)
    marker = subprocess.Popen(["sleep", "30"])
    try:
        p.add_filtered_process_by_name("sh", include_children=True)
        p.add_ignored_process_by_name("env", include_children=False)
        p.start_filter()
        subprocess.run(["sh", "-c", "/bin/true; /usr/bin/env true"], check=True)
        subprocess.run(["/bin/true"], check=True)  # not a child of sh: not reported
        assert wait_for(lambda: bool(seen.find("process_creation", process_name="true")), 10)
        time.sleep(0.3)
        trues = seen.find("process_creation", process_name="true")
        assert trues and all(f["parent_process_id"] != os.getpid() for f in trues), trues  # only sh's children
        assert not seen.find("process_creation", process_name="env")  # ignored by name
        assert not seen.find("process_creation", process_id=marker.pid)  # started before, not a child of sh
        with pytest.raises(CBFSFilterError):
            p.add_filtered_process_by_id(0)
    finally:
        marker.kill()
        marker.wait()


def test_refusing_a_program(process_filter: Callable[[], CBProcess], scratch: Path) -> None:
    bin_dir = scratch / "bin"
    bin_dir.mkdir()
    shutil.copy("/bin/true", bin_dir / "forbidden")
    shutil.copy("/bin/true", bin_dir / "allowed")
    p = process_filter()
    asked: list[str] = []

    def creation(e: Any) -> None:
        asked.append(e.command_line)
        if e.image_file_name.endswith("/forbidden"):
            e.result_code = errno.EPERM

    p.on_process_creation = creation
    p.config(f"ExecPermissionPaths={bin_dir}")
    p.start_filter()
    r = subprocess.run([sys.executable, "-c", "import os, sys\ntry:\n    os.execv(sys.argv[1], [sys.argv[1], 'x'])\n"
                        "except OSError as e:\n    print(e.errno)", str(bin_dir / "forbidden")],
                       capture_output=True, text=True)
    assert r.stdout.strip() == str(errno.EPERM)
    assert f"{bin_dir}/forbidden x" in asked  # the command line of the program that was refused
    assert subprocess.run([str(bin_dir / "allowed")]).returncode == 0
    p.stop_filter()
    assert subprocess.run([str(bin_dir / "forbidden")]).returncode == 0  # nothing refused after stop


def test_handle_operations_are_not_offered() -> None:
    p = CBProcess()
    with pytest.raises(CBFSFilterError) as info:
        p.on_process_handle_operation = lambda e: None
    assert info.value.code == errno.ENOSYS


FORK_EXEC_LOOP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    printf("%d\n", getpid());
    fflush(stdout);
    for (int i = 0; i < n; i++) {
        char arg[32];
        snprintf(arg, sizeof arg, "run%d", i);
        pid_t pid = fork();
        if (pid == 0) {
            execl(argv[2], "true", arg, (char *)NULL);
            _exit(127);
        }
        int status;
        waitpid(pid, &status, 0);
    }
    return 0;
}
"""


@pytest.mark.timeout(180)
def test_a_thousand_fork_execs_each_reported_once(process_filter: Callable[[], CBProcess], tmp_path: Path) -> None:
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed (scripts/setup.sh installs it)")
    source, binary = tmp_path / "loop.c", tmp_path / "loop"
    source.write_text(FORK_EXEC_LOOP)
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source)], check=True)
    p = process_filter()
    seen = Seen(p)
    errors: list[int] = []
    p.on_error = lambda e: errors.append(e.error_code)
    p.start_filter()
    true = os.path.realpath("/bin/true")
    out = subprocess.run([str(binary), "1000", true], capture_output=True, text=True, check=True)
    loop = int(out.stdout.split()[0])
    assert wait_for(lambda: bool(seen.find("process_termination", process_id=loop)), 30)
    time.sleep(0.5)
    created = seen.find("process_creation", parent_process_id=loop)
    pids = [f["process_id"] for f in created]
    assert len(created) == 1000 and len(set(pids)) == 1000, (len(created), len(set(pids)))  # each exactly once
    # image, name and command line where the program was still there to be read; never a wrong one
    assert all(f["image_file_name"] in (true, "") and f["process_name"] in ("true", "") for f in created)
    # (a program that ends within a millisecond is often gone before it can be read: most, not all, are named)
    assert sum(f["image_file_name"] == true for f in created) >= 500
    assert sum(f["command_line"].startswith("true run") for f in created) >= 500
    ended = [f for f in seen.find("process_termination") if f["process_id"] in set(pids)]
    assert len(ended) == 1000 and {f["process_id"] for f in ended} == set(pids)
    assert all(f["process_name"] in ("true", "") for f in ended)
    assert p.lost_events == 0 and not errors


def test_filtered_by_id_follows_real_children(process_filter: Callable[[], CBProcess]) -> None:
    p = process_filter()
    seen = Seen(p)
    parent = subprocess.Popen(["sh", "-c", "read x; /bin/sleep 0.2; read y"], stdin=subprocess.PIPE, text=True)
    other = subprocess.Popen(["sh", "-c", "read x; /bin/sleep 0.2; read y"], stdin=subprocess.PIPE, text=True)
    try:
        p.add_filtered_process_by_id(parent.pid, include_children=True)
        p.start_filter()
        for proc in (parent, other):
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        assert wait_for(lambda: bool(seen.find("process_creation", parent_process_id=parent.pid)), 10)
        time.sleep(0.5)
        assert not seen.find("process_creation", parent_process_id=other.pid)
    finally:
        for proc in (parent, other):
            proc.kill()
            proc.wait()


KILLABLE_DENY = """
import sys, errno, time
sys.path.insert(0, sys.argv[2])
from fsfilter.api.cbprocess import CBProcess
p = CBProcess()
def creation(e):
    if e.image_file_name.endswith("/forbidden"):
        e.result_code = errno.EPERM
p.on_process_creation = creation
p.config("ExecPermissionPaths=" + sys.argv[1])
p.start_filter()
print("ready", flush=True)
time.sleep(600)
"""


def test_a_killed_process_filter_refuses_nothing(scratch: Path) -> None:
    from conftest import SRC

    bin_dir = scratch / "bin"
    bin_dir.mkdir()
    shutil.copy("/bin/true", bin_dir / "forbidden")
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_DENY, str(bin_dir), str(SRC)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with pytest.raises(PermissionError):  # the execve failed with EPERM
            subprocess.run([str(bin_dir / "forbidden")], capture_output=True)
        proc.kill()
        proc.wait(10)
        start = time.monotonic()
        assert subprocess.run([str(bin_dir / "forbidden")], timeout=10).returncode == 0
        assert time.monotonic() - start < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
