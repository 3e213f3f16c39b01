"""The command-line tools built on CBFilter: monitor, hide, protect, and the demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SRC, force_unmount, is_mounted, needs_root, wait_for

pytestmark = [needs_root, pytest.mark.timeout(60)]
ENV = {**os.environ, "PYTHONPATH": str(SRC)}


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fsfilter", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def stop(proc: subprocess.Popen[str], path: Path) -> tuple[str, str]:
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        force_unmount(path)
    assert proc.returncode == 0, err
    assert not is_mounted(path)
    return out, err


@pytest.mark.parametrize("tool", ["monitor", "hide", "protect", "sandbox", "encrypt"])
def test_help(tool: str) -> None:
    r = subprocess.run([sys.executable, "-m", "fsfilter", tool, "--help"], capture_output=True, text=True, env=ENV,
                       timeout=20)
    assert r.returncode == 0 and r.stdout.startswith("usage: fsfilter") and "PATH" in r.stdout


def test_monitor_prints_events_with_process_names(scratch: Path) -> None:
    d = scratch / "watched"
    d.mkdir()
    (d / "a.txt").write_text("hello\n")
    proc = start("monitor", str(d))
    try:
        assert wait_for(lambda: is_mounted(d), 20)
        subprocess.run(["cat", str(d / "a.txt")], check=True, capture_output=True)
        subprocess.run(["flock", str(d / "a.txt"), "true"], check=True)
        subprocess.run(["sh", "-c", f"echo more >> {d}/a.txt; mv {d}/a.txt {d}/b.txt; rm {d}/b.txt"], check=True)
    finally:
        out, err = stop(proc, d)
    assert "monitoring" in err
    assert any(" cat(" in line and " open " in line and line.endswith("/a.txt") for line in out.splitlines()), out
    assert any(" read " in line and "bytes_read=6" in line for line in out.splitlines()), out
    assert any(" rename" in line and "new_file_name=" in line for line in out.splitlines()), out
    assert any(" rm(" in line and " delete " in line for line in out.splitlines()), out
    assert any(" flock(" in line and " lock " in line and "range=0+EOF exclusive" in line
               for line in out.splitlines()), out


def test_hide_removes_entries_from_listings_and_lookups(scratch: Path) -> None:
    d = scratch / "h"
    (d / "deep").mkdir(parents=True)
    (d / "secret.txt").write_text("x")
    (d / "deep" / "secret.key").write_text("x")
    (d / "public.txt").write_text("x")
    proc = start("hide", str(d), "secret*")
    try:
        assert wait_for(lambda: is_mounted(d), 20)
        ls = subprocess.run(["ls", "-a", str(d), str(d / "deep")], capture_output=True, text=True).stdout
        assert "secret" not in ls and "public.txt" in ls
        for p in (d / "secret.txt", d / "deep" / "secret.key"):
            r = subprocess.run(["stat", str(p)], capture_output=True, text=True)
            assert r.returncode != 0 and "No such file" in r.stderr
    finally:
        stop(proc, d)
    assert (d / "secret.txt").exists()


def test_protect_read_only_and_no_delete(scratch: Path) -> None:
    d = scratch / "p"
    d.mkdir()
    (d / "f").write_text("keep")
    proc = start("protect", str(d), "--read-only", "--no-delete")
    try:
        assert wait_for(lambda: is_mounted(d), 20)
        w = subprocess.run(["sh", "-c", f"echo x > {d}/f"], capture_output=True, text=True)
        assert w.returncode != 0 and "Permission denied" in w.stderr
        r = subprocess.run(["rm", "-f", str(d / "f")], capture_output=True, text=True)
        assert r.returncode != 0
        assert subprocess.run(["cat", str(d / "f")], capture_output=True, text=True).stdout == "keep"
    finally:
        stop(proc, d)


def test_sandbox_gives_matching_programs_private_copies(scratch: Path) -> None:
    d, store = scratch / "project", scratch / "store"
    d.mkdir()
    (d / "notes.txt").write_text("original\n")
    proc = start("sandbox", str(d), "--program", "sh", "--store", str(store))
    try:
        assert wait_for(lambda: is_mounted(d), 20)
        # sh is sandboxed: its append lands in its copy, and it reads the copy back; cat (not sandboxed) and the
        # disk keep the original
        out = subprocess.run(["sh", "-c", f"echo sandboxed >> {d}/notes.txt; while read l; do echo $l; done "
                                          f"< {d}/notes.txt; : > {d}/new.txt"], capture_output=True, text=True)
        assert out.stdout == "original\nsandboxed\n", out
        assert "Permission denied" in out.stderr  # no new files from the sandbox
        assert subprocess.run(["cat", str(d / "notes.txt")], capture_output=True, text=True).stdout == "original\n"
    finally:
        out_text, err = stop(proc, d)
    assert (d / "notes.txt").read_text() == "original\n" and not (d / "new.txt").exists()
    assert (store / "notes.txt").read_text() == "original\nsandboxed\n"
    assert "changes" in out_text and "1 private copy" in err


def test_encrypt_serves_plaintext_to_trusted_programs_only(scratch: Path) -> None:
    d = scratch / "docs"
    d.mkdir()
    env = {**ENV, "PW": "a password"}
    proc = subprocess.Popen([sys.executable, "-m", "fsfilter", "encrypt", str(d), "--trusted", "python3*",
                             "--password-env", "PW"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "PYTHONPATH": str(SRC)})
    try:
        assert wait_for(lambda: is_mounted(d), 20)
        code = f"open({str(d / 'n.txt')!r}, 'w').write('plain words'); print(open({str(d / 'n.txt')!r}).read())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert out.stdout.strip() == "plain words", out.stderr
        stored = subprocess.run(["cat", str(d / "n.txt")], capture_output=True).stdout
        assert stored.startswith(b"FSFENC") and b"plain words" not in stored
    finally:
        stop(proc, d)
    assert (d / "n.txt").read_bytes().startswith(b"FSFENC")


def test_bad_arguments_give_one_line_errors(scratch: Path) -> None:
    for args in (["protect", str(scratch)], ["monitor", str(scratch / "missing")], ["hide", str(scratch), "a/b"],
                 ["monitor", str(scratch), "--events", "nonsense"],
                 ["sandbox", str(scratch), "--program", "sh", "--store", str(scratch / "in")]):
        r = subprocess.run([sys.executable, "-m", "fsfilter", *args], capture_output=True, text=True, env=ENV,
                           timeout=20)
        assert r.returncode == 1, (args, r)
        assert r.stderr.startswith("fsfilter: error: ") and "Traceback" not in r.stderr


def test_demo_runs_clean() -> None:
    r = subprocess.run([sys.executable, "-m", "fsfilter", "demo"], capture_output=True, text=True, env=ENV,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "write denied" in r.stdout and "hidden: exit status 1" in r.stdout
    assert "unmounted cleanly: True" in r.stdout and " 0 lost" in r.stdout
    assert " open " in r.stdout and "cat(" in r.stdout


def test_system_monitor_prints_json_lines(scratch: Path) -> None:
    import json

    d = scratch / "sys"
    d.mkdir()
    proc = start("monitor", "--system", "--json", str(d), f"{scratch}/*.zzz")
    try:
        assert wait_for(lambda: proc.stderr is not None and "monitoring" in (proc.stderr.readline() or ""), 20)
        subprocess.run(["sh", "-c", f"echo hi > {d}/a.txt; mv {d}/a.txt {d}/b.txt; echo x > {scratch}/c.zzz; "
                                    "sleep 0.3"], check=True)
        time.sleep(1)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert any(r["event"] == "create" and r["path"] == f"{d}/a.txt" and r["process"] == "sh" for r in records), out
    assert any(r["event"] == "rename-or-move" and r["new_file_name"] == f"{d}/b.txt" for r in records), out
    assert any(r["event"] == "create" and r["path"] == f"{scratch}/c.zzz" for r in records), out
    assert all(isinstance(r["pid"], int) and r["time"] for r in records)


def test_system_monitor_refuses_bad_input() -> None:
    r = subprocess.run([sys.executable, "-m", "fsfilter", "monitor", "--system", "--events", "nope", "/tmp"],
                       capture_output=True, text=True, env=ENV, timeout=20)
    assert r.returncode != 0 and "unknown event" in r.stderr


def test_procmon_and_deny_exec(scratch: Path) -> None:
    import shutil as _shutil

    bin_dir = scratch / "bin"
    bin_dir.mkdir()
    _shutil.copy("/bin/true", bin_dir / "forbidden-tool")
    mon = start("procmon")
    deny = start("deny-exec", f"{bin_dir}/forbidden*")
    try:
        for proc in (mon, deny):
            assert proc.stderr is not None and "Ctrl-C" in proc.stderr.readline()
        r = subprocess.run([sys.executable, "-c", "import os,sys\ntry: os.execv(sys.argv[1], [sys.argv[1]])\n"
                            "except OSError as e: print(e.errno)", str(bin_dir / "forbidden-tool")],
                           capture_output=True, text=True)
        assert r.stdout.strip() == "1"  # EPERM
        subprocess.run(["sh", "-c", "/bin/sleep 0.01"], check=True)
        time.sleep(0.5)
    finally:
        for proc in (mon, deny):
            proc.send_signal(signal.SIGINT)
        out, _ = mon.communicate(timeout=20)
        refused, _ = deny.communicate(timeout=20)
    assert mon.returncode == 0 and deny.returncode == 0
    assert any(" start " in line and "/bin/sleep 0.01" in line for line in out.splitlines()), out[-2000:]
    assert any(" exit " in line and "sleep" in line for line in out.splitlines()), out[-2000:]
    assert "refused" in refused and "forbidden-tool" in refused
    assert subprocess.run([str(bin_dir / "forbidden-tool")]).returncode == 0  # stopped: allowed again


def test_protect_says_who_was_inside_and_keeps_them_working_after_ctrl_c(scratch: Path) -> None:
    """At start, processes already inside are named (they are not filtered); at Ctrl-C, a shell whose cwd is inside
    the directory keeps working (a keeper serves it), and the command says so."""
    d = scratch / "p"
    d.mkdir()
    (d / "f").write_text("keep")
    before = subprocess.Popen(["sleep", "60"], cwd=d)  # inside before the mount
    proc = start("protect", str(d), "--no-delete")
    inside: subprocess.Popen[str] | None = None
    try:
        assert wait_for(lambda: is_mounted(d), 20)
        inside = subprocess.Popen(["sh", "-c", "read line; ls; cat f"], cwd=d, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert f"1 process(es) already inside {d} are not filtered" in err and f"{before.pid} sleep (cwd)" in err
        assert "keeper pid" in err and "programs still use it" in err, err
        assert not is_mounted(d)
        shell_out, shell_err = inside.communicate("go\n", timeout=20)
        assert inside.returncode == 0 and shell_out.split() == ["f", "keep"], shell_err
    finally:
        for p in (before, inside):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        force_unmount(d)
