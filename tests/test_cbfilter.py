"""CBFilter on a real mount: every event fired once by a real operation of another process, with its
parameters; denials give that process the intended errno; handlers change what it sees."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import end_processes, is_mounted, needs_root, wait_for

from fsfilter import CBFilter, CBFSFilterError
from fsfilter.api import constants as c

pytestmark = [needs_root, pytest.mark.timeout(120)]


def run(code: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run Python code in a separate process (the filter ignores its own process's requests)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed: {proc.stderr}")
    return proc


def errno_of(code: str, *args: str) -> int:
    """Run code that is expected to fail with OSError in a child; return the errno it got (0 = no error)."""
    wrapped = ("import os, sys, errno\ntry:\n" + textwrap.indent(textwrap.dedent(code), "    ")
               + "\nexcept OSError as e:\n    print(e.errno)\nelse:\n    print(0)\n")
    out = run(wrapped, *args).stdout.strip().splitlines()
    return int(out[-1])


class Recorder:
    """Collects event params (copied to dicts) from handlers, thread-safely."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def handler(self, name: str, action: Callable[[Any], None] | None = None) -> Callable[[Any], None]:
        def handle(p: Any) -> None:
            fields = {n: getattr(p, n) for n in type(p).__slots__ if n not in ("buffer", "buffer_view")}
            with self.lock:
                self.events.append((name, fields))
            if action is not None:
                action(p)
        return handle

    def named(self, name: str, **match: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [f for n, f in self.events if n == name and all(f.get(k) == v for k, v in match.items())]


@pytest.fixture
def data(scratch: Path) -> Path:
    d = scratch / "data"
    d.mkdir()
    (d / "a.txt").write_bytes(b"hello world\n")
    (d / "sub").mkdir()
    (d / "sub" / "b.log").write_bytes(b"x" * 5000)
    return d


def test_attach_and_detach_follow_the_rules(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    f = cbfilter()
    rec = Recorder()
    f.fire_volume_events = c.FS_MOUNT_BOTH
    f.on_after_filter_attach_to_volume = rec.handler("attach")
    f.on_after_filter_detach_from_volume = rec.handler("detach")
    f.add_filter_rule(f"{data}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_OPEN)
    f.start_filter(0)
    assert f.active and is_mounted(data)
    f.stop_filter()
    assert not is_mounted(data) and not f.active
    assert rec.named("attach", volume_name=str(data)) and rec.named("detach", volume_name=str(data))


def test_before_attach_can_skip(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    f = cbfilter()
    f.fire_volume_events = c.FS_MOUNT_CONTROL

    def skip(p: Any) -> None:
        p.skip_volume = True

    f.on_before_filter_attach_to_volume = skip
    f.add_filter_rule(f"{data}/*", 0, 0, c.FS_NE_OPEN)
    f.start_filter()
    assert not is_mounted(data)


def test_bad_input_changes_nothing(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    f = cbfilter()
    for mask in ("", "a//b", "/a/../b", "~|/x"):
        with pytest.raises(CBFSFilterError) as e:
            f.add_filter_rule(mask, 0, 0, c.FS_NE_OPEN)
        assert e.value.code == errno.EINVAL
    with pytest.raises(CBFSFilterError):
        f.add_filter_rule(f"{data}/*", 0x7FFFFFFF, 0, 0)
    assert f.filter_rule_count == 0
    with pytest.raises(CBFSFilterError) as e:
        f.add_filter_rule("/*", 0, 0, c.FS_NE_OPEN)
        f.start_filter()
    assert e.value.code in (errno.EPERM, errno.EINVAL)
    assert not f.active
    with pytest.raises(CBFSFilterError):
        f.config("NoSuchSetting=1")
    for bad in ("MaxWorkerThreadCount=2.5", "MinWorkerThreadCount=-1", "EntryTimeout=nan", "AttrTimeout=inf"):
        with pytest.raises(CBFSFilterError) as e:
            f.config(bad)
        assert e.value.code == errno.EINVAL
    assert f.config("MaxWorkerThreadCount") == "0"
    with pytest.raises(CBFSFilterError):
        f.on_no_such_event = print  # type: ignore[attr-defined]
    assert not hasattr(f, "on_no_such_event")
    with pytest.raises(CBFSFilterError):
        f.on_notify_open_file = "not a function"
    assert f.on_notify_open_file is None
    with pytest.raises(CBFSFilterError) as e:
        f.delete_filter_rule("a//b", 0, 0, c.FS_NE_OPEN)
    assert e.value.code == errno.EINVAL
    f.delete_all_filter_rules()  # "/*" above was added (only start_filter refuses it)
    with pytest.raises(CBFSFilterError) as e:
        f.get_attach_point(0)
    assert e.value.code == errno.EINVAL
    f.add_filter_rule(f"{data}/*", 0, 0, c.FS_NE_OPEN)
    assert f.attach_point_count == 1 and f.get_attach_point(0) == str(data)  # what start_filter would mount
    assert f.delete_filter_rule(f"{data}/*", -1, -1, -1) and f.filter_rule_count == 0


def test_rule_aggregation_and_getters(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    f = cbfilter()
    mask = f"{data}/*.txt"
    assert f.add_filter_rule(mask, c.ACCESS_READ_ONLY, c.FS_CE_BEFORE_OPEN, 0)
    assert f.add_filter_rule(mask, 0, c.FS_CE_AFTER_OPEN, c.FS_NE_READ)
    assert f.filter_rule_count == 1
    assert f.get_filter_rule_mask(0) == mask
    assert f.get_filter_rule_access_flags(0) == c.ACCESS_READ_ONLY
    assert f.get_filter_rule_control_flags(0) == c.FS_CE_BEFORE_OPEN | c.FS_CE_AFTER_OPEN
    assert f.get_filter_rule_notify_flags(0) == c.FS_NE_READ
    assert f.delete_filter_rule(mask, 0, c.FS_CE_BEFORE_OPEN, 0)
    assert f.get_filter_rule_control_flags(0) == c.FS_CE_AFTER_OPEN
    assert f.is_file_filtered(f"{data}/a.txt") and not f.is_file_filtered(f"{data}/a.log")
    assert f.delete_filter_rule(mask, c.ACCESS_ALL_FLAGS, c.FS_CE_ALL, c.FS_NE_ALL)
    assert f.filter_rule_count == 0
    assert f.file_matches_mask("*.*", "/x/noext") and not f.file_matches_mask("/a/b/*", "/a/b")
    f.set_process_failed_requests(True)  # the SDK's accessor style works next to plain attributes
    assert f.process_failed_requests and f.get_process_failed_requests() and f.get_filter_rule_count() == 0


def test_notifications_for_common_operations(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    f = cbfilter()
    rec = Recorder()
    for event in ("create_file", "open_file", "read_file", "write_file", "cleanup_file", "close_file",
                  "rename_or_move_file", "delete_file", "can_file_be_deleted", "set_file_size",
                  "enumerate_directory", "create_hard_link", "set_file_attributes", "set_file_security",
                  "set_ea", "query_ea", "get_file_sizes"):
        setattr(f, "on_notify_" + event, rec.handler(event))
    f.add_filter_rule(f"{data}/*", 0, 0, c.FS_NE_ALL)
    f.add_filter_rule(str(data), 0, 0, c.FS_NE_ENUMERATE_DIRECTORY)
    f.start_filter()
    child = run(f"""
        import os
        d = {str(data)!r}
        fd = os.open(d + "/new.txt", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640)
        os.write(fd, b"abc")
        os.close(fd)
        with open(d + "/a.txt", "rb") as fh:
            fh.read()
        os.truncate(d + "/new.txt", 1)
        os.utime(d + "/new.txt", ns=(1_000_000_000, 2_000_000_000))
        os.chmod(d + "/new.txt", 0o600)
        os.setxattr(d + "/new.txt", "user.k", b"v")
        os.getxattr(d + "/new.txt", "user.k")
        os.link(d + "/new.txt", d + "/hard.txt")
        os.rename(d + "/new.txt", d + "/moved.txt")
        os.unlink(d + "/moved.txt")
        os.listdir(d)
        print(os.getpid())
    """)
    pid = int(child.stdout.split()[-1])
    f.stop_filter()  # delivers every queued notification
    new, moved = f"{data}/new.txt", f"{data}/moved.txt"
    created = rec.named("create_file", file_name=new)
    assert len(created) == 1 and created[0]["create_disposition"] == c.FILE_DISPOSITION_CREATE_NEW
    assert rec.named("open_file", file_name=f"{data}/a.txt")
    writes = rec.named("write_file", file_name=new)
    assert writes and writes[0]["bytes_written"] == 3 and writes[0]["position"] == 0
    reads = rec.named("read_file", file_name=f"{data}/a.txt")
    assert reads and reads[0]["bytes_read"] == 12
    assert rec.named("cleanup_file", file_name=new) and rec.named("close_file", file_name=new)
    assert rec.named("set_file_size", file_name=new, size=1)
    assert rec.named("set_file_attributes", file_name=new, last_write_time=2_000_000_000)
    assert rec.named("set_file_security", file_name=new, mode=0o600)
    assert rec.named("set_ea", file_name=new, ea_name="user.k")
    assert rec.named("query_ea", file_name=new, ea_name="user.k")
    assert rec.named("create_hard_link", file_name=new, link_name=f"{data}/hard.txt")
    assert len(rec.named("rename_or_move_file", file_name=new, new_file_name=moved)) == 1
    assert rec.named("can_file_be_deleted", file_name=moved, can_delete=True)
    assert len(rec.named("delete_file", file_name=moved)) == 1
    names = {e["file_name"] for e in rec.named("enumerate_directory", directory_name=str(data))}
    assert {"a.txt", "sub", "hard.txt"} <= names
    assert pid > 0


def test_origin_of_events(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    f = cbfilter()
    seen: list[tuple[int, str]] = []

    def on_open(p: Any) -> None:
        seen.append((f.get_originator_process_id(), f.get_originator_process_name()))

    f.on_before_open_file = on_open
    f.add_filter_rule(f"{data}/a.txt", 0, c.FS_CE_BEFORE_OPEN, 0)
    f.start_filter()
    child = run(f"import os\nopen({str(data / 'a.txt')!r}).read()\nprint(os.getpid())")
    pid = int(child.stdout.split()[-1])
    # The SDK's process name is the program's full path.
    assert (pid, os.path.realpath(sys.executable)) in seen, (pid, seen)
    # The filter's own process is not filtered unless it asks.
    seen.clear()
    (data / "a.txt").read_bytes()
    assert seen == []


def test_deny_open_and_hide(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    f = cbfilter()

    def before_open(p: Any) -> None:
        if p.file_name.endswith("/a.txt") and p.desired_access & c.DESIRED_ACCESS_FILE_WRITE_DATA:
            p.result_code = errno.EACCES
        if p.file_name.endswith("/sub"):
            p.result_code = errno.ENOENT

    def after_enum(p: Any) -> None:
        if p.file_name == "sub":
            p.process_request = False

    f.on_before_open_file = before_open
    f.on_after_enumerate_directory = after_enum
    f.add_filter_rule(f"{data}/*", 0, c.FS_CE_BEFORE_OPEN, 0)
    f.add_filter_rule(str(data), 0, c.FS_CE_AFTER_ENUMERATE_DIRECTORY, 0)
    f.start_filter()
    a, sub = str(data / "a.txt"), str(data / "sub")
    assert errno_of(f"open({a!r}, 'a')") == errno.EACCES
    assert errno_of(f"open({a!r}).read()") == 0
    assert errno_of(f"os.stat({sub!r})") == errno.ENOENT
    assert errno_of(f"os.stat({sub + '/b.log'!r})") == errno.ENOENT
    assert errno_of(f"os.listdir({sub!r})") == errno.ENOENT
    listing = run(f"import os; print(sorted(os.listdir({str(data)!r})))").stdout
    assert "sub" not in listing and "a.txt" in listing
    assert (data / "sub" / "b.log").exists()  # the filter's own process still sees it


def test_hidden_file_cannot_be_opened_with_o_creat(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    """open(O_CREAT) of an uncached name reaches the daemon as CREATE even when the file exists. Of a hidden
    name it is refused with EACCES (ENOENT or EEXIST would tell that something is there)."""
    f = cbfilter()
    rec = Recorder()

    def hide(p: Any) -> None:
        if p.file_name.endswith("/a.txt"):
            p.result_code = errno.ENOENT

    f.on_before_open_file = rec.handler("before_open", hide)
    f.on_notify_create_file = rec.handler("create")
    f.on_notify_open_file = rec.handler("open")
    f.add_filter_rule(f"{data}/*", 0, c.FS_CE_BEFORE_OPEN, c.FS_NE_CREATE | c.FS_NE_OPEN)
    f.start_filter()
    a, log = str(data / "a.txt"), str(data / "sub" / "b.log")
    assert errno_of(f"open({a!r}, 'a').write('x')") == errno.EACCES
    assert errno_of(f"os.close(os.open({a!r}, os.O_RDWR | os.O_CREAT, 0o644))") == errno.EACCES
    assert errno_of(f"os.close(os.open({a!r}, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))") == errno.EACCES
    # An existing file opened with O_CREAT fires open events, a new one create events.
    assert errno_of(f"os.close(os.open({log!r}, os.O_WRONLY | os.O_CREAT, 0o644))") == 0
    new = str(data / "sub" / "new.txt")
    assert errno_of(f"os.close(os.open({new!r}, os.O_WRONLY | os.O_CREAT, 0o644))") == 0
    f.stop_filter()
    assert (data / "a.txt").read_bytes() == b"hello world\n"
    assert rec.named("open", file_name=log)
    assert not rec.named("create", file_name=log)
    assert rec.named("create", file_name=new, create_disposition=c.FILE_DISPOSITION_OPEN_ALWAYS)
    assert not rec.named("open", file_name=new)


def test_tmpfile_is_refused_where_rules_apply(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    """An O_TMPFILE file would be written before it has a name any rule could match: refused with
    EOPNOTSUPP (callers fall back to named files) where a rule could match a file of the directory."""
    (data / "free").mkdir()
    f = cbfilter()
    f.add_attach_point(str(data))
    f.add_filter_rule(f"{data}/sub/*", 0, 0, c.FS_NE_WRITE)
    f.on_notify_write_file = lambda p: None
    f.start_filter()
    tmp = "os.close(os.open({!r}, os.O_TMPFILE | os.O_RDWR, 0o600))"
    assert errno_of(tmp.format(str(data / "sub"))) == errno.EOPNOTSUPP
    assert errno_of(tmp.format(str(data / "free"))) == 0
    assert errno_of(tmp.format(str(data))) == 0


def test_subtrees_no_rule_reaches_are_served_plain(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    """Directories no rule can concern cost no matching; a rule added later applies to them at once."""
    (data / "free").mkdir()
    (data / "free" / "f.dat").write_bytes(b"data")
    f = cbfilter()
    rec = Recorder()
    f.on_notify_open_file = rec.handler("open")
    f.add_attach_point(str(data))
    for i in range(100):
        f.add_filter_rule(f"{data}/nomatch{i}/*.dat", 0, 0, c.FS_NE_OPEN)
    f.start_filter()
    target = str(data / "free" / "f.dat")
    run(f"open({target!r}).read()")
    fs = f._attached[str(data)].fs  # type: ignore[attr-defined]
    (free,) = [n.nodeid for n in fs.nodes.values() if n.name == b"free" and n.parent == 1]
    assert fs.reaches(1) and not fs.reaches(free)
    f.add_filter_rule(f"{data}/free/*.dat", 0, 0, c.FS_NE_OPEN)
    assert fs.reaches(free)
    run(f"open({target!r}).read()")
    f.stop_filter()
    assert len(rec.named("open", file_name=target)) == 1


def test_read_handler_supplies_data_and_write_is_changed(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    import ctypes
    f = cbfilter()

    def before_read(p: Any) -> None:
        payload = b"served by the handler"[: p.bytes_to_read]
        ctypes.memmove(p.buffer, payload, len(payload))
        p.bytes_to_read = len(payload)
        p.process_request = False

    def before_write(p: Any) -> None:
        p.buffer_view[:] = bytes(p.buffer_view).upper()

    f.on_before_read_file = before_read
    f.on_before_write_file = before_write
    f.process_cached_io_requests = True
    f.add_filter_rule(f"{data}/*.txt", 0, c.FS_CE_BEFORE_READ | c.FS_CE_BEFORE_WRITE, 0)
    f.start_filter()
    a = str(data / "a.txt")
    out = run(f"print(open({a!r}, 'rb').read(100))").stdout
    assert "served by the handler" in out
    run(f"open({str(data / 'w.txt')!r}, 'wb').write(b'quiet words')")
    f.stop_filter()
    assert (data / "w.txt").read_bytes() == b"QUIET WORDS"
    assert (data / "a.txt").read_bytes() == b"hello world\n"


def test_access_rules(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    (data / "ro").mkdir()
    (data / "ro" / "f").write_bytes(b"data")
    (data / "nodel").mkdir()
    (data / "nodel" / "f").write_bytes(b"data")
    (data / "wo").mkdir()
    (data / "wo" / "f").write_bytes(b"data")
    (data / "noexec").mkdir()
    (data / "noexec" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(data / "noexec" / "run.sh", 0o755)
    f = cbfilter()
    f.add_attach_point(str(data))  # one mount for all four rules, so that links and renames stay possible
    f.add_filter_rule(f"{data}/ro/*", c.ACCESS_READ_ONLY, 0, 0)
    f.add_filter_rule(f"{data}/nodel/*", c.ACCESS_DELETE_PROTECT, 0, 0)
    f.add_filter_rule(f"{data}/wo/*", c.ACCESS_WRITE_ONLY, 0, 0)
    f.add_filter_rule(f"{data}/noexec/*", c.ACCESS_EXECUTE_PROTECT, 0, 0)
    f.start_filter()
    ro, nodel, wo = str(data / "ro" / "f"), str(data / "nodel" / "f"), str(data / "wo" / "f")
    assert errno_of(f"open({ro!r}, 'r+b')") == errno.EACCES
    assert errno_of(f"open({ro!r}, 'rb').read()") == 0
    assert errno_of(f"os.unlink({ro!r})") == errno.EACCES
    assert errno_of(f"os.truncate({ro!r}, 0)") == errno.EACCES
    assert errno_of(f"open({str(data / 'ro' / 'new')!r}, 'w')") == errno.EACCES
    assert errno_of(f"os.unlink({nodel!r})") == errno.EACCES
    assert errno_of(f"os.rename({nodel!r}, {nodel + '2'!r})") == errno.EACCES
    assert errno_of(f"open({nodel!r}, 'ab').write(b'more')") == 0
    assert errno_of(f"open({wo!r}, 'rb')") == errno.EACCES
    assert errno_of(f"open({wo!r}, 'wb').write(b'x')") == 0
    assert errno_of(f"os.link({ro!r}, {str(data / 'escape')!r})") == errno.EACCES
    # A rename must not carry a restricted file out of its rule, nor replace a protected one.
    assert errno_of(f"os.rename({ro!r}, {str(data / 'escape')!r})") == errno.EACCES
    assert errno_of(f"os.rename({wo!r}, {str(data / 'escape')!r})") == errno.EACCES
    (data / "other").write_bytes(b"other")
    assert errno_of(f"os.rename({str(data / 'other')!r}, {nodel!r})") == errno.EACCES
    assert (data / "nodel" / "f").read_bytes() == b"datamore"  # appended to above, never replaced
    with pytest.raises(PermissionError):
        subprocess.run([str(data / "noexec" / "run.sh")], capture_output=True)
    assert errno_of(f"open({str(data / 'noexec' / 'run.sh')!r}).read()") == 0
    # Passthrough rules lift access rules.
    f.add_passthrough_rule(f"{data}/nodel/*", c.ACCESS_DELETE_PROTECT, 0, 0)
    assert errno_of(f"os.unlink({nodel!r})") == 0


def test_qualified_rules_apply_to_requests_by_name(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    """Size and attribute qualifiers are checked for requests that name a file (unlink, rename) too."""
    (data / "big").write_bytes(b"x" * 10000)
    (data / "small").write_bytes(b"x")
    (data / "dir").mkdir()
    f = cbfilter()
    f.add_filter_rule_ex(f"{data}/*", "", c.ACCESS_DELETE_PROTECT, 0, 0, 4096, -1, 0, 0)
    f.add_filter_rule_ex(f"{data}/*", "", c.ACCESS_RENAME_PROTECT, 0, 0, -1, -1, c.FILE_SYS_ATTR_DIRECTORY, 0)
    f.start_filter()
    assert errno_of(f"os.unlink({str(data / 'big')!r})") == errno.EACCES
    assert errno_of(f"os.unlink({str(data / 'small')!r})") == 0
    assert errno_of(f"os.rename({str(data / 'dir')!r}, {str(data / 'dir2')!r})") == errno.EACCES
    assert errno_of(f"os.rename({str(data / 'a.txt')!r}, {str(data / 'b.txt')!r})") == 0


def test_attribute_qualifiers_apply_to_creates(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    """A rule with attribute qualifiers judges a create by the attributes the new object will have: a rule for
    non-directories fires on_before_create_file for a new file and not for a new directory; one for directories the
    other way round; and a read-only rule qualified by directory refuses mkdir but lets files be created."""
    f = cbfilter()
    seen: list[str] = []
    f.on_before_create_file = lambda p: seen.append(os.path.basename(p.file_name))
    f.add_filter_rule_ex(f"{data}/f*", "", 0, c.FS_CE_BEFORE_CREATE, 0, -1, -1, 0, c.FILE_SYS_ATTR_DIRECTORY)
    f.add_filter_rule_ex(f"{data}/d*", "", 0, c.FS_CE_BEFORE_CREATE, 0, -1, -1, c.FILE_SYS_ATTR_DIRECTORY, 0)
    f.add_filter_rule_ex(f"{data}/ro*", "", c.ACCESS_READ_ONLY, 0, 0, -1, -1, c.FILE_SYS_ATTR_DIRECTORY, 0)
    f.start_filter()
    run(f"open({str(data / 'fnew')!r}, 'w').close()")
    run(f"import os\nos.mkdir({str(data / 'fdir')!r})")
    run(f"open({str(data / 'dnew')!r}, 'w').close()")
    run(f"import os\nos.mkdir({str(data / 'ddir')!r})")
    assert wait_for(lambda: sorted(seen) == ["ddir", "fnew"], 5), seen
    assert errno_of(f"os.mkdir({str(data / 'rodir')!r})") == errno.EACCES
    assert errno_of(f"open({str(data / 'rofile')!r}, 'w').close()") == 0


def test_contexts_follow_the_sdk_lifetimes(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    """Open by A, open by B, close B, open by C, close A, close C: one file context for the whole time,
    one handle context per open, each cleaned up when its handle (and for the file, the last) closes."""
    f = cbfilter()
    counter = iter(range(1, 1000))
    log: list[tuple[str, int, int]] = []
    lock = threading.Lock()

    def after_open(p: Any) -> None:
        with lock:
            if not p.file_context:
                p.file_context = 1000 + next(counter)
            p.handle_context = next(counter)
            log.append(("open", p.file_context, p.handle_context))

    def cleanup(p: Any) -> None:
        with lock:
            log.append(("cleanup", p.file_context, p.handle_context))

    f.on_after_open_file = after_open
    f.on_cleanup_context = cleanup
    f.add_filter_rule(f"{data}/a.txt", 0, c.FS_CE_AFTER_OPEN, 0)
    f.start_filter()
    a = str(data / "a.txt")
    holder = textwrap.dedent(f"""
        import sys
        fh = open({a!r}, 'rb')
        print('open', flush=True)
        sys.stdin.readline()
        fh.close()
        print('closed', flush=True)
        sys.stdin.readline()
    """)
    procs = {k: subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True) for k in ()}
    try:
        def start(k: str) -> None:
            procs[k] = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
            assert procs[k].stdout is not None and procs[k].stdout.readline().strip() == "open"

        def close(k: str) -> None:
            p = procs[k]
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == "closed"

        start("A")
        start("B")
        close("B")
        start("C")
        close("A")
        close("C")
        assert wait_for(lambda: len([e for e in log if e[0] == "cleanup"]) == 3, 10)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)
    opens = [e for e in log if e[0] == "open"]
    cleanups = [e for e in log if e[0] == "cleanup"]
    assert len(opens) == 3
    fx = opens[0][1]
    assert all(o[1] == fx for o in opens)  # one file context while any handle is open
    hxa, hxb, hxc = (o[2] for o in opens)
    assert cleanups[0] == ("cleanup", 0, hxb)  # B closed: only its handle context ends
    assert cleanups[1] == ("cleanup", 0, hxa)
    assert cleanups[2] == ("cleanup", fx, hxc)  # the last close ends the file context too


def test_handler_exception_and_timeouts(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    f = cbfilter()
    errors: list[tuple[int, str]] = []
    release = threading.Event()

    def before_open(p: Any) -> None:
        if p.file_name.endswith("a.txt") and p.flags != os.O_PATH:
            raise RuntimeError("handler bug")
        if p.file_name.endswith("b.log") and p.flags != os.O_PATH:
            release.wait(5)

    f.on_error = lambda p: errors.append((p.error_code, p.description))
    f.on_before_open_file = before_open
    f.config("DenyExpiredEvents=true")
    f.add_filter_rule(f"{data}/*", 0, c.FS_CE_BEFORE_OPEN, 0)
    f.start_filter(300)
    assert errno_of(f"open({str(data / 'a.txt')!r})") == errno.EIO
    assert any("handler bug" in d for _, d in errors)
    t0 = time.monotonic()
    assert errno_of(f"open({str(data / 'sub' / 'b.log')!r})") == errno.ETIMEDOUT
    assert time.monotonic() - t0 < 4
    release.set()
    # The filter still works after both.
    assert errno_of(f"os.stat({str(data / 'sub')!r})") == 0


def test_serialize_events_runs_handlers_on_one_thread(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    f = cbfilter()
    threads: set[int] = set()
    f.serialize_events = c.SERIALIZE_EVENTS_ON_ONE_WORKER_THREAD
    f.on_before_open_file = lambda p: threads.add(threading.get_ident())
    f.on_notify_open_file = lambda p: threads.add(threading.get_ident())
    f.add_filter_rule(f"{data}/*", 0, c.FS_CE_BEFORE_OPEN, c.FS_NE_OPEN)
    f.start_filter()
    run(f"""
        import threading
        def work():
            for _ in range(20):
                open({str(data / 'a.txt')!r}).read()
        ts = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
    """)
    f.stop_filter()
    assert len(threads) == 1


def test_filter_own_requests(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    f = cbfilter()
    seen: list[str] = []
    f.on_notify_open_file = lambda p: seen.append(p.file_name)
    f.config("FilterOwnRequests=true")
    f.add_filter_rule(f"{data}/*", 0, 0, c.FS_NE_OPEN)
    f.start_filter()
    (data / "a.txt").read_bytes()
    assert wait_for(lambda: str(data / "a.txt") in seen, 5)


def test_passthrough_stays_for_unfiltered_files(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    f = cbfilter()
    f.on_notify_read_file = lambda p: None
    f.add_filter_rule(f"{data}/*.log", 0, 0, c.FS_NE_READ)
    f.start_filter()
    (fs,) = [m.fs for m in f._attached.values()]
    assert fs is not None
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        a = open({str(data / 'a.txt')!r}, 'rb'); b = open({str(data / 'sub' / 'b.log')!r}, 'rb')
        a.read(); b.read(); print('ok', flush=True); sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        kinds = {fs.path_of(o.inode.nodeid): o.passthrough for o in fs.files.values()}
        assert kinds[b"/a.txt"] is True and kinds[b"/sub/b.log"] is False
    finally:
        holder.kill()
        holder.communicate(timeout=10)


def test_reset_timeout_extends_the_deadline(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    f = cbfilter()
    done: list[bool] = []

    def slow(p: Any) -> None:
        if p.flags == os.O_PATH:
            return
        assert f.reset_timeout(3000)
        time.sleep(0.6)
        done.append(True)

    f.on_before_open_file = slow
    f.config("DenyExpiredEvents=true")
    f.add_filter_rule(f"{data}/a.txt", 0, c.FS_CE_BEFORE_OPEN, 0)
    f.start_filter(200)
    assert errno_of(f"open({str(data / 'a.txt')!r}).read()") == 0
    assert done == [True]


def test_sizes_symlinks_and_security_events(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    os.symlink("a.txt", data / "link")
    f = cbfilter()
    rec = Recorder()

    def bigger(p: Any) -> None:
        if p.file_name.endswith("/a.txt"):
            p.size = 4242

    f.on_after_get_file_sizes = rec.handler("sizes", bigger)
    f.on_after_get_reparse_point = rec.handler("readlink")
    f.on_notify_set_allocation_size = rec.handler("alloc")
    f.on_notify_get_file_security = rec.handler("getacl")
    f.on_before_set_file_security = rec.handler("chmod", lambda p: setattr(p, "result_code", errno.EPERM))
    f.process_failed_requests = True  # the file has no ACL: reading it fails with ENODATA
    f.add_filter_rule(f"{data}/*", 0, c.FS_CE_AFTER_GET_SIZES | c.FS_CE_AFTER_GET_REPARSE_POINT
                      | c.FS_CE_BEFORE_SET_SECURITY, c.FS_NE_SET_SIZES | c.FS_NE_GET_SECURITY)
    f.start_filter()
    a = str(data / "a.txt")
    assert run(f"import os; print(os.stat({a!r}).st_size)").stdout.strip() == "4242"
    assert run(f"import os; print(os.readlink({str(data / 'link')!r}))").stdout.strip() == "a.txt"
    run(f"import os\nfd = os.open({a!r}, os.O_RDWR)\nos.posix_fallocate(fd, 0, 65536)\nos.close(fd)")
    errno_of(f"os.getxattr({a!r}, 'system.posix_acl_access')")
    assert errno_of(f"os.chmod({a!r}, 0o600)") == errno.EPERM
    f.stop_filter()
    assert rec.named("readlink", file_name=str(data / "link"), reparse_buffer=b"a.txt")
    assert rec.named("alloc", file_name=a, allocation_size=65536)
    assert rec.named("getacl", file_name=a, status=errno.ENODATA)
    assert rec.named("chmod", file_name=a, mode=0o600)
    assert os.stat(a).st_mode & 0o777 == 0o644


def test_handlers_complete_or_change_requests(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    """process_request = False completes deletes, renames and xattr queries in the handler; an After
    handler changes a write's status; the close After event fires even when Before set a result_code."""
    f = cbfilter()
    rec = Recorder()

    def keep(p: Any) -> None:
        if p.file_name.endswith("/keep"):
            p.process_request = False  # reported deleted, left in place

    def fake_rename(p: Any) -> None:
        if p.file_name.endswith("/stay"):
            p.process_request = False

    def answer_ea(p: Any) -> None:
        if p.ea_name == "user.virtual":
            p.buffer_view[:5] = b"hello"
            p.valid_bytes = 5
            p.process_request = False

    def fail_write(p: Any) -> None:
        if p.file_name.endswith("/a.txt"):
            p.status = errno.ENOSPC

    f.on_before_delete_file = keep
    f.on_before_rename_or_move_file = fake_rename
    f.on_before_query_ea = answer_ea
    f.on_after_write_file = fail_write
    f.on_before_close_file = rec.handler("before_close", lambda p: setattr(p, "result_code", errno.EIO))
    f.on_after_close_file = rec.handler("after_close")
    f.add_filter_rule(f"{data}/*", 0, c.FS_CE_ALL, 0)
    f.start_filter()
    (data / "keep").write_bytes(b"k")
    (data / "stay").write_bytes(b"s")
    keep_path, stay = str(data / "keep"), str(data / "stay")
    assert errno_of(f"os.unlink({keep_path!r})") == 0
    assert errno_of(f"os.rename({stay!r}, {stay + '2'!r})") == 0
    out = run(f"""
        import os
        print(os.getxattr({str(data / 'a.txt')!r}, "user.virtual"))
    """).stdout.strip()
    assert out == "b'hello'"
    a = str(data / "a.txt")
    assert errno_of(f"fd = os.open({a!r}, os.O_WRONLY)\ntry:\n    os.write(fd, b'x')\nfinally:\n    os.close(fd)"
                    ) == errno.ENOSPC
    f.stop_filter()
    assert (data / "keep").exists() and (data / "stay").exists()
    assert rec.named("before_close", file_name=a) and rec.named("after_close", file_name=a)


def test_rules_added_while_active_apply_to_cached_names(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    """The kernel caches names and attributes for a minute: a rule added while the filter runs must still
    decide the next stat at once (the cache is invalidated), and deleting it makes the name visible."""
    f = cbfilter()
    f.add_attach_point(str(data))
    f.add_filter_rule(f"{data}/sub/*", 0, 0, c.FS_NE_OPEN)
    f.on_notify_open_file = lambda p: None
    f.on_before_open_file = lambda p: setattr(p, "result_code", errno.ENOENT)
    f.start_filter()
    a = str(data / "a.txt")
    assert errno_of(f"os.stat({a!r})") == 0  # now cached
    f.add_filter_rule(a, 0, c.FS_CE_BEFORE_OPEN, 0)
    assert wait_for(lambda: errno_of(f"os.stat({a!r})") == errno.ENOENT, 5)
    f.delete_filter_rule(a, 0, -1, 0)
    assert wait_for(lambda: errno_of(f"os.stat({a!r})") == 0, 5)


def test_suspend_file_events_until_the_last_close(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    f = cbfilter()
    rec = Recorder()
    suspend = [True]

    def after_open(p: Any) -> None:
        if suspend[0] and p.file_name.endswith("/a.txt"):
            f.suspend_file_events()

    f.on_after_open_file = rec.handler("after_open", after_open)
    f.on_notify_read_file = rec.handler("read")
    f.on_notify_close_file = rec.handler("close")
    f.process_cached_io_requests = True  # every read reaches the filter, none is served from the page cache
    f.add_filter_rule(f"{data}/*", 0, c.FS_CE_AFTER_OPEN, c.FS_NE_READ | c.FS_NE_CLOSE)
    f.start_filter()
    with pytest.raises(CBFSFilterError):
        f.suspend_file_events()  # not inside an after-open handler
    a = str(data / "a.txt")
    run(f"open({a!r}, 'rb').read()")
    suspend[0] = False
    run(f"open({a!r}, 'rb').read()")
    f.stop_filter()
    assert len(rec.named("after_open", file_name=a)) == 2
    assert len(rec.named("read", file_name=a)) >= 1 and len(rec.named("close", file_name=a)) == 1


def test_handle_creator_is_the_opener(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    """A file opened by one process and written by its child after the opener exited: the write's
    handle creator is the opener, its originator the writer."""
    f = cbfilter()
    seen: list[tuple[int, int, int]] = []

    def on_write(p: Any) -> None:
        seen.append((f.get_originator_process_id(), f.get_handle_creator_process_id(), p.direction))

    f.on_before_write_file = on_write
    f.process_cached_io_requests = True
    f.add_filter_rule(f"{data}/*", 0, c.FS_CE_BEFORE_WRITE, 0)
    f.start_filter()
    out = run(f"""
        import os
        fd = os.open({str(data / 'a.txt')!r}, os.O_WRONLY)
        pid = os.fork()
        if pid == 0:
            os.write(fd, b"child")
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.getpid(), pid)
    """).stdout.split()
    f.stop_filter()
    opener, writer = int(out[0]), int(out[1])
    # The application's write, then the write that reaches storage inside it (process_cached_io_requests)
    assert seen == [(writer, opener, c.FS_REQUEST_DIR_USER_CACHED), (writer, opener, c.FS_REQUEST_DIR_SYSTEM_NONCACHED)]


def test_copy_file_range_does_not_bypass_write_events(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    f = cbfilter()
    rec = Recorder()
    f.on_notify_write_file = rec.handler("write")
    f.on_notify_read_file = rec.handler("read")
    f.add_filter_rule(f"{data}/*", 0, 0, c.FS_NE_READ | c.FS_NE_WRITE)
    f.start_filter()
    src, dst = str(data / "sub" / "b.log"), str(data / "copy.log")
    run(f"""
        import os
        a = os.open({src!r}, os.O_RDONLY); b = os.open({dst!r}, os.O_WRONLY | os.O_CREAT, 0o644)
        left = 5000
        while left:
            n = os.copy_file_range(a, b, left)
            assert n > 0
            left -= n
        os.close(a); os.close(b)
    """)
    f.stop_filter()
    assert (data / "copy.log").read_bytes() == b"x" * 5000
    assert sum(e["bytes_written"] for e in rec.named("write", file_name=dst)) >= 5000


def test_lock_events(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    from test_locks import Locker  # a process that takes fcntl/flock locks on command

    f = cbfilter()
    rec = Recorder()
    origins: list[int] = []

    def before_lock(p: Any) -> None:
        origins.append(f.get_originator_process_id())
        if p.offset == 99:
            p.result_code = errno.EACCES  # refused
        elif p.offset == 77:
            p.process_request = False  # completed by the handler: nothing is locked
        elif p.offset == 200:
            p.offset = 300  # the lock lands elsewhere

    def after_lock(p: Any) -> None:
        if p.offset == 400:
            p.status = errno.EPERM  # the caller is told it failed, and the lock is let go

    f.on_before_lock = rec.handler("before_lock", before_lock)
    f.on_after_lock = rec.handler("after_lock", after_lock)
    f.on_notify_lock = rec.handler("notify_lock")
    for kind in ("before", "after", "notify"):
        for what in ("unlock_single", "unlock_all"):
            setattr(f, f"on_{kind}_{what}", rec.handler(f"{kind}_{what}"))
    f.add_filter_rule(f"{data}/*.txt", c.ACCESS_NONE, c.FS_CE_BEFORE_LOCK_CONTROL | c.FS_CE_AFTER_LOCK_CONTROL,
                      c.FS_NE_LOCK_CONTROL)
    f.start_filter()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        a, b = Locker(procs), Locker(procs)
        path = str(data / "a.txt")
        for p in (a, b):
            assert p.do(f"open 1 {path}") == "ok"
        assert a.do("setlk 1 w 10 5") == "ok"
        (ev,) = rec.named("before_lock", offset=10)
        assert ev["file_name"] == path and ev["length"] == 5 and ev["exclusive_lock"] and ev["fail_immediately"]
        assert ev["key"] != 0 and origins[-1] == a.pid
        assert rec.named("after_lock", offset=10, status=0)
        assert wait_for(lambda: bool(rec.named("notify_lock", offset=10, status=0)))
        # a wait: Before at once, After when an unlock grants it
        b.send("setlkw 1 r 0 20")
        assert b.pending()
        (ev,) = rec.named("before_lock", offset=0, length=20)
        assert not ev["fail_immediately"] and not ev["exclusive_lock"]
        assert not rec.named("after_lock", offset=0)
        assert a.do("setlk 1 u 10 5") == "ok"
        assert rec.named("before_unlock_single", offset=10, length=5) and rec.named("after_unlock_single", offset=10)
        assert b.line() == "ok"
        assert rec.named("after_lock", offset=0, length=20, status=0)
        # handlers refuse, complete or move a lock
        assert a.do("setlk 1 w 99 1") == "error EACCES"
        assert a.do("setlk 1 w 77 1") == "ok" and b.do("setlk 1 w 77 1") == "ok"
        assert a.do("setlk 1 w 200 1") == "ok"
        assert b.do("getlk 1 w 200 1").startswith("u ") and b.do("getlk 1 w 300 1") == f"w 300 1 {a.pid}"
        assert a.do("setlk 1 w 400 0") == "error EPERM" and b.do("getlk 1 w 400 1").startswith("u ")
        assert wait_for(lambda: bool(rec.named("notify_lock", offset=400, length=0, status=errno.EPERM)))
        # a flock is a lock of the whole file (length 0: to the end)
        assert b.do(f"open 2 {path}") == "ok" and b.do("flock 2 ex nb") == "ok"
        assert rec.named("before_lock", offset=0, length=0, exclusive_lock=True)
        # closing drops locks: the caller's fcntl locks at the close (cleanup), the flock with its open file
        count = len(rec.named("after_unlock_all"))
        assert b.do("close 1") == "ok"
        assert wait_for(lambda: len(rec.named("after_unlock_all", file_name=path)) == count + 1)
        assert rec.named("before_unlock_all", file_name=path)
        assert a.do("setlk 1 w 0 30") == "ok"  # b's fcntl locks are gone
        assert a.do("flock 1 sh nb") == "error EAGAIN"  # its flock stays while open file 2 is open
        assert b.do("close 2") == "ok"
        assert wait_for(lambda: len(rec.named("after_unlock_all", file_name=path)) == count + 2)
        assert a.do("flock 1 sh nb") == "ok"
        assert wait_for(lambda: len(rec.named("notify_unlock_all", file_name=path)) == count + 2)
        a.proc.kill()  # its fcntl locks (at the FLUSH of its exit) and its flock (at RELEASE) go
        assert wait_for(lambda: len(rec.named("notify_unlock_all", file_name=path)) == count + 4)
    finally:
        end_processes(procs)
    # files no lock rule covers: locks work, and fire nothing
    before = len(rec.events)
    run("""
        import fcntl, sys
        with open(sys.argv[1], "r+") as f:
            fcntl.lockf(f, fcntl.LOCK_EX)
            fcntl.flock(f, fcntl.LOCK_EX)
    """, str(data / "sub" / "b.log"))
    assert len(rec.events) == before


def test_lock_requests_stay_in_the_kernel_without_a_lock_handler(cbfilter: Callable[[], CBFilter],
                                                                 data: Path) -> None:
    f = cbfilter()
    f.on_notify_open_file = lambda p: None
    f.add_filter_rule(f"{data}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_LOCK_CONTROL | c.FS_NE_OPEN)
    f.start_filter()
    assert not f.wants_lock_requests()
    (mount,) = f._attached.values()
    assert mount.fs is not None and not mount.fs.options.locks


def test_direct_file_methods_work_below_the_filter(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    import struct

    from fsfilter.api import fileinfo

    f = cbfilter()
    f.add_filter_rule(f"{data}/*.txt", c.ACCESS_DENY_ALL, c.FS_CE_NONE, c.FS_NE_NONE)
    f.start_filter()
    assert errno_of("open(sys.argv[1]).read()", str(data / "a.txt")) == errno.EACCES
    holder: list[int] = [-1]
    rw = c.DESIRED_ACCESS_FILE_READ_DATA | c.DESIRED_ACCESS_FILE_WRITE_DATA
    with f.create_file_direct_as_stream(str(data / "a.txt"), desired_access=rw, handle_holder=holder) as stream:
        assert stream.read() == b"hello world\n" and holder == [stream.fileno()]  # element 0, as the SDK's
        assert stream.length == 12 and stream.tell() == 12
        stream.write(b"more\n")
        fd = stream.fileno()
        buf = bytearray(64)
        written: list[int] = []
        f.query_file_information_direct(fd, buf, fileinfo.FILE_STANDARD_INFORMATION, written)
        allocation, eof, links, _, is_dir = struct.unpack_from("<qqIBB", buf)
        assert written == [24] and eof == 17 and links == 1 and not is_dir
        f.query_file_information_direct(fd, buf, fileinfo.FILE_BASIC_INFORMATION, written)
        mtime = struct.unpack_from("<q", buf, 16)[0]
        assert abs(fileinfo.ns_from_filetime(mtime) - os.stat(fd).st_mtime_ns) < 100
        f.set_file_size_direct(fd, 5)
        assert os.fstat(fd).st_size == 5
        f.set_file_information_direct(fd, fileinfo.FILE_END_OF_FILE_INFORMATION, struct.pack("<q", 3))
        basic = struct.pack("<qqqqI4x", 0, fileinfo.filetime(10**18), fileinfo.filetime(2 * 10**18), 0, 0)
        f.set_file_information_direct(fd, fileinfo.FILE_BASIC_INFORMATION, basic)
        st = os.fstat(fd)
        assert st.st_size == 3 and st.st_atime_ns == 10**18 and st.st_mtime_ns == 2 * 10**18
        with pytest.raises(CBFSFilterError) as info:
            f.query_file_information_direct(fd, bytearray(4), fileinfo.FILE_BASIC_INFORMATION)
        assert info.value.code == errno.ERANGE
        with pytest.raises(CBFSFilterError) as info:
            f.query_file_information_direct(fd, buf, 9999)
        assert info.value.code == errno.EINVAL
        # a rename through the handle, as the SDK's samples do it; refused when the target exists
        (data / "taken.txt").write_bytes(b"")
        with pytest.raises(CBFSFilterError) as info:
            f.set_file_information_direct(fd, fileinfo.FILE_RENAME_INFORMATION,
                                          fileinfo.rename_information("taken.txt"))
        assert info.value.code == errno.EEXIST
        f.set_file_information_direct(fd, fileinfo.FILE_RENAME_INFORMATION, fileinfo.rename_information("c.txt"))
        # the POSIX ACL as the security events carry it
        subprocess.run(["setfacl", "-m", "u:65534:r", f"/proc/{os.getpid()}/fd/{fd}"], check=True)
        needed: list[int] = []
        f.query_file_security_direct(fd, c.DACL_SECURITY_INFORMATION, None, needed)
        acl = bytearray(needed[0])
        f.query_file_security_direct(fd, c.DACL_SECURITY_INFORMATION, acl, needed)
        assert acl and acl == os.getxattr(fd, "system.posix_acl_access")
        f.set_file_security_direct(fd, c.DACL_SECURITY_INFORMATION, b"")
        f.query_file_security_direct(fd, c.DACL_SECURITY_INFORMATION, None, needed)
        assert needed == [0]
        f.set_file_security_direct(fd, c.DACL_SECURITY_INFORMATION, bytes(acl))
        assert os.getxattr(fd, "system.posix_acl_access") == bytes(acl)
        f.set_file_information_direct(fd, fileinfo.FILE_DISPOSITION_INFORMATION, b"\x01")
    f.stop_filter()
    assert sorted(p.name for p in data.iterdir()) == ["sub", "taken.txt"]


def test_reparse_rules_redirect_names(cbfilter: Callable[[], CBFilter], data: Path, scratch: Path) -> None:
    store, logs = scratch / "store", scratch / "logs"
    store.mkdir()
    logs.mkdir()
    (store / "x.txt").write_text("from the store\n")
    (data / "virtual").mkdir()  # its own content is hidden behind the redirect
    (data / "virtual" / "shadowed").write_text("never seen\n")
    f = cbfilter()
    f.add_reparse_rule(f"{data}/virtual", str(store))
    assert f.get_attach_point(0) == str(data)  # the parent of a redirected directory: where its name resolves
    f.add_reparse_rule(f"{data}/*.log", f"{logs}/*.log")
    f.add_reparse_rule(f"{data}/loop", str(data / "sub"))  # a directory redirected into itself: refused
    f.add_reparse_rule(f"{data}/sub/up", str(data))
    assert f.reparse_rule_count == 4 and f.get_reparse_rule_target(1) == f"{logs}/*.log"
    assert f.get_reparse_rule_by_mask(f"{data}/virtual") == str(store)
    f.start_filter()
    assert is_mounted(data)
    out = run("""
        import os, sys
        d = sys.argv[1]
        print(open(f"{d}/virtual/x.txt").read(), end="")
        print(sorted(os.listdir(f"{d}/virtual")))
        with open(f"{d}/virtual/new.txt", "w") as w:
            w.write("made through the redirect")
        os.mkdir(f"{d}/virtual/dir")
        with open(f"{d}/app.log", "a") as w:
            w.write("logged\\n")
        print(os.path.exists(f"{d}/virtual/shadowed"))
        for name in ("sub/up", "loop"):
            try:
                print(name, sorted(os.listdir(f"{d}/{name}")))
            except OSError as e:
                print(name, e.errno)
    """, str(data)).stdout.splitlines()
    assert out[0] == "from the store" and out[1] == "['x.txt']" and out[2] == "False"
    assert out[3:] == [f"sub/up {errno.ELOOP}", "loop ['b.log']"], out  # loop -> sub is no cycle: it lists sub
    assert (store / "new.txt").read_text() == "made through the redirect" and (store / "dir").is_dir()
    assert (logs / "app.log").read_text() == "logged\n"
    # deleting and renaming redirected names: the delete acts on the target; a rename copies (EXDEV for mv)
    run("""
        import os, shutil, sys
        d = sys.argv[1]
        os.unlink(f"{d}/virtual/new.txt")
        try:
            os.rename(f"{d}/app.log", f"{d}/kept.txt")
        except OSError as e:
            assert e.errno == 18, e  # EXDEV
        shutil.move(f"{d}/app.log", f"{d}/kept.txt")
    """, str(data))
    assert not (store / "new.txt").exists() and not (logs / "app.log").exists()
    assert (data / "kept.txt").read_text() == "logged\n"
    # rules removed while running stop redirecting at once
    assert f.delete_reparse_rule(f"{data}/virtual")
    out = run("import os, sys; print(sorted(os.listdir(sys.argv[1])))", str(data / "virtual")).stdout.strip()
    assert out == "['shadowed']"
    f.create_reparse_rules_snapshot()
    assert f.delete_all_reparse_rules() and f.reparse_rule_count == 3  # the snapshot still shows them
    f.close_reparse_rules_snapshot()
    assert f.reparse_rule_count == 0
    f.stop_filter()
    assert not (data / "app.log").exists() and (data / "kept.txt").exists()
    with pytest.raises(CBFSFilterError) as info:
        f.add_reparse_rule("*.txt", "/x/*.txt")
    assert info.value.code == errno.EINVAL


def test_on_reparse_file_name_chooses_the_target(cbfilter: Callable[[], CBFilter], data: Path,
                                                 scratch: Path) -> None:
    store = scratch / "store"
    store.mkdir()
    (store / "settings.cfg").write_text("redirected\n")
    (data / "a.cfg").write_text("original\n")
    f = cbfilter()
    seen: list[str] = []

    def reparse(p: Any) -> None:
        seen.append(p.file_name)
        if p.file_name.endswith("/a.cfg"):
            p.reparsed_name = str(store / "settings.cfg")
        elif p.file_name.endswith("/denied.cfg"):
            p.result_code = errno.EACCES

    f.on_reparse_file_name = reparse
    f.add_filter_rule(f"{data}/*.cfg", c.ACCESS_NONE, c.FS_CE_REPARSE_FILENAME, c.FS_NE_NONE)
    f.start_filter()
    assert run("import sys; print(open(sys.argv[1]).read(), end='')", str(data / "a.cfg")).stdout == "redirected\n"
    assert errno_of("open(sys.argv[1])", str(data / "denied.cfg")) == errno.EACCES
    assert errno_of("open(sys.argv[1])", str(data / "missing.cfg")) == errno.ENOENT
    assert str(data / "a.cfg") in seen and str(data / "a.txt") not in seen


def test_direct_opens_take_the_sdks_desired_access(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    """create_file_direct takes the access mask the events carry (DESIRED_ACCESS_*, and Windows' GENERIC_*), not
    open(2) flags: FILE_READ_DATA reads and cannot write, FILE_WRITE_DATA writes and cannot read, FILE_APPEND_DATA
    alone appends, attributes only reads no data; the stream's length can be set."""
    f = cbfilter()
    f.add_filter_rule(f"{data}/*.txt", c.ACCESS_DENY_ALL, c.FS_CE_NONE, c.FS_NE_NONE)
    f.start_filter()
    path = str(data / "a.txt")
    fd = f.create_file_direct(path, desired_access=c.DESIRED_ACCESS_FILE_READ_DATA)
    try:
        assert os.read(fd, 5) == b"hello"
        with pytest.raises(OSError):
            os.write(fd, b"x")
    finally:
        os.close(fd)
    fd = f.create_file_direct(path, desired_access=c.DESIRED_ACCESS_FILE_WRITE_DATA)
    try:
        with pytest.raises(OSError):
            os.read(fd, 1)
        os.pwrite(fd, b"J", 0)
    finally:
        os.close(fd)
    fd = f.create_file_direct(path, desired_access=c.DESIRED_ACCESS_FILE_APPEND_DATA)
    try:
        os.write(fd, b"tail\n")
    finally:
        os.close(fd)
    assert (data / "a.txt").read_bytes() == b"Jello world\ntail\n"
    fd = f.create_file_direct(path, desired_access=c.DESIRED_ACCESS_FILE_READ_ATTRIBUTES)
    try:
        assert os.fstat(fd).st_size == 17
        with pytest.raises(OSError):
            os.read(fd, 1)
    finally:
        os.close(fd)
    generic = 0x80000000 | 0x40000000  # GENERIC_READ | GENERIC_WRITE
    with f.create_file_direct_as_stream(str(data / "new.txt"), desired_access=generic,
                                        creation_disposition=c.FILE_DISPOSITION_CREATE_NEW) as stream:
        stream.write(b"0123456789")
        stream.length = 4
        stream.seek(0)
        assert stream.read() == b"0123" and stream.length == 4
    with pytest.raises(CBFSFilterError) as bad:
        f.create_file_direct(path, desired_access=-1)
    assert bad.value.code == errno.EINVAL


def test_synchronized_direct_opens_act_as_the_originator(cbfilter: Callable[[], CBFilter], data: Path) -> None:
    """Inside a handler, create_file_direct(synchronize=True) (or with CheckFileAccessInDirectIO) opens with the
    originator's credentials: a file the originator may not read is refused; without it the filter's own rights
    apply (root here)."""
    os.chmod(data.parent, 0o755)
    os.chmod(data, 0o777)
    secret = data / "secret"
    secret.write_bytes(b"root only\n")
    os.chmod(secret, 0o600)
    (data / "door.txt").write_text("door\n")
    f = cbfilter()
    outcomes: list[object] = []

    def on_open(p: Any) -> None:
        for synchronize in (True, False):
            try:
                fd = f.create_file_direct(str(secret), synchronize, c.DESIRED_ACCESS_FILE_READ_DATA)
            except CBFSFilterError as exc:
                outcomes.append(exc.code)
            else:
                outcomes.append(os.read(fd, 4))
                os.close(fd)

    f.on_before_open_file = on_open
    f.add_filter_rule(f"{data}/door.txt", 0, c.FS_CE_BEFORE_OPEN, 0)
    f.start_filter()

    def as_nobody() -> None:
        os.setgid(65534)
        os.setuid(65534)

    subprocess.run(["cat", str(data / "door.txt")], preexec_fn=as_nobody, capture_output=True, timeout=30)
    assert outcomes[:2] == [errno.EACCES, b"root"], outcomes
