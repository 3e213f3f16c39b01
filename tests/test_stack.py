"""Several filters of one process on one directory: one mount, one stack, layers in altitude order.

Before events run from the highest altitude down and After events from the lowest up; a layer that denies
stops the request there; every layer's rules hold whatever sits above it; filters join and leave without a
remount while other processes work inside; nested attach points share the outer mount."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import end_processes, mounts, needs_root, wait_for
from test_cbfilter import errno_of, run

from fsfilter import CBFilter, CBFSFilterError
from fsfilter.api import constants as c

pytestmark = [needs_root, pytest.mark.timeout(120)]


@pytest.fixture
def data(scratch: Path) -> Path:
    d = scratch / "data"
    d.mkdir()
    (d / "a.txt").write_bytes(b"hello world\n")
    (d / "ro.txt").write_bytes(b"read only\n")
    (d / "hr").mkdir()
    (d / "hr" / "pay.csv").write_bytes(b"name,salary\n")
    return d


@pytest.fixture
def filters(scratch: Path) -> Iterator[Callable[..., CBFilter]]:
    """Make CBFilters; stopped afterwards in the reverse order (the last one takes the mount with it); any mount
    left below this test's directory is detached."""
    made: list[CBFilter] = []

    def make(altitude: str = "360000", tag: int = 0) -> CBFilter:
        f = CBFilter()
        f.altitude = altitude
        f.tag = tag
        made.append(f)
        return f

    try:
        yield make
    finally:
        for f in reversed(made):
            try:
                f.stop_filter()
            except Exception:
                pass
        for point, kind in mounts():
            if kind == "fuse.fsfilter" and point.startswith(str(scratch) + "/"):
                subprocess.run(["umount", "-l", point], capture_output=True)


def fsfilter_mounts(below: Path) -> list[str]:
    return [p for p, kind in mounts() if kind == "fuse.fsfilter" and p.startswith(str(below))]


class Trace:
    """The order in which filters' handlers ran, thread-safely."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, str]] = []

    def hook(self, who: str, event: str, path_end: str = "/a.txt",
             action: Callable[[Any], None] | None = None) -> Callable[[Any], None]:
        def handle(p: Any) -> None:
            if p.file_name.endswith(path_end):
                with self.lock:
                    self.seen.append((who, event, p.file_name))
                if action is not None:
                    action(p)
        return handle

    def order(self, event: str) -> list[str]:
        with self.lock:
            return [who for who, e, _ in self.seen if e == event]


def watch_opens(f: CBFilter, trace: Trace, who: str, data: Path, action: Callable[[Any], None] | None = None
                ) -> None:
    f.on_before_open_file = trace.hook(who, "before", action=action)
    f.on_after_open_file = trace.hook(who, "after")
    f.add_filter_rule(f"{data}/*", c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN | c.FS_CE_AFTER_OPEN, c.FS_NE_NONE)


def test_three_filters_run_in_altitude_order(filters: Callable[..., CBFilter], data: Path) -> None:
    """Before events from the highest altitude down, After events from the lowest up, whatever the start order;
    all three share one mount."""
    trace = Trace()
    mid, low, high = filters("200000", 2), filters("100000", 1), filters("300000", 3)
    for f, who in ((mid, "mid"), (low, "low"), (high, "high")):
        watch_opens(f, trace, who, data)
        f.start_filter()
    assert fsfilter_mounts(data.parent) == [str(data)]
    run(f"open({str(data / 'a.txt')!r}).read()")
    assert wait_for(lambda: len(trace.order("after")) >= 3, 5)
    assert trace.order("before")[:3] == ["high", "mid", "low"]
    assert trace.order("after")[:3] == ["low", "mid", "high"]


def test_a_deny_at_the_top_hides_the_request_from_lower_layers(filters: Callable[..., CBFilter],
                                                                 data: Path) -> None:
    trace = Trace()
    low, high = filters("100000"), filters("300000")
    watch_opens(low, trace, "low", data)
    watch_opens(high, trace, "high", data, action=lambda p: setattr(p, "result_code", errno.EACCES))
    low.start_filter()
    high.start_filter()
    assert errno_of(f"open({str(data / 'a.txt')!r}).read()") == errno.EACCES
    assert trace.order("before") and set(trace.order("before")) == {"high"}
    assert trace.order("after") == []  # the open never happened


def test_the_lowest_filters_access_rule_holds_with_others_above(filters: Callable[..., CBFilter],
                                                                  data: Path) -> None:
    """The measured stacking bypass: A (read-only on ro.txt) below B (open notifications on everything); another
    process's append to ro.txt must be refused, and B still hears of the opens."""
    a, b = filters("100000", 1), filters("300000", 2)
    opened: list[str] = []
    a.add_filter_rule(f"{data}/ro.txt", c.ACCESS_READ_ONLY, c.FS_CE_NONE, c.FS_NE_NONE)
    b.on_notify_open_file = lambda p: opened.append(p.file_name)
    b.add_filter_rule(f"{data}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_OPEN)
    a.start_filter()
    b.start_filter()
    ro = str(data / "ro.txt")
    assert errno_of(f"open({ro!r}, 'a').write('x')") == errno.EACCES
    assert errno_of(f"open({ro!r}, 'r+').write('x')") == errno.EACCES
    assert (data / "ro.txt").read_bytes() == b"read only\n"
    run(f"open({ro!r}).read()")
    assert wait_for(lambda: ro in opened, 5)
    # Stopping the lower filter leaves the upper one working on the same mount (no remount).
    before = fsfilter_mounts(data.parent)
    a.stop_filter()
    assert fsfilter_mounts(data.parent) == before == [str(data)]
    assert errno_of(f"open({ro!r}, 'a').write('x')") == 0
    opened.clear()
    run(f"open({str(data / 'a.txt')!r}).read()")
    assert wait_for(lambda: str(data / "a.txt") in opened, 5)


WORKER = textwrap.dedent("""
    import os, sys, time
    os.chdir(sys.argv[1])
    log = open("log.txt", "a")
    print("ready", flush=True)
    errors, n = 0, 0
    deadline = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        try:
            log.write(f"record {n}\\n"); log.flush(); os.fsync(log.fileno())
            os.listdir(".")
            open("log.txt").read()
            n += 1
        except OSError as e:
            errors += 1
            print("error", e, flush=True)
        time.sleep(0.002)
    print("done", n, errors, flush=True)
""")


def test_filters_join_and_leave_while_others_work_inside(filters: Callable[..., CBFilter], data: Path) -> None:
    """A filter started and stopped while processes hold files open and have their cwd inside joins and leaves
    the stack: the mount stays the same, and those processes see no error."""
    base = filters("100000")
    base.on_notify_write_file = lambda p: None
    base.add_filter_rule(f"{data}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_WRITE)
    base.start_filter()
    (mount_id,) = [line.split()[0] for line in open("/proc/self/mountinfo") if f" {data} " in line
                   and "fuse.fsfilter" in line]
    started: list[subprocess.Popen[str]] = []
    try:
        for _ in range(3):
            p = subprocess.Popen([sys.executable, "-c", WORKER, str(data), "4"], stdout=subprocess.PIPE, text=True)
            started.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        seen: list[str] = []
        for round_ in range(3):
            extra = filters("200000" if round_ % 2 else "50000")
            extra.on_notify_open_file = lambda p: seen.append(p.file_name)
            extra.add_filter_rule(f"{data}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_OPEN)
            extra.start_filter()
            time.sleep(0.3)
            extra.stop_filter()
            time.sleep(0.2)
        outputs = [p.communicate(timeout=30)[0] for p in started]
    finally:
        end_processes(started)
    for out in outputs:
        last = out.strip().splitlines()[-1].split()
        assert last[0] == "done" and int(last[1]) > 0 and last[2] == "0", out
    assert seen, "the joining filters saw the workers' opens"
    now = [line.split()[0] for line in open("/proc/self/mountinfo") if f" {data} " in line
           and "fuse.fsfilter" in line]
    assert now == [mount_id]
    lines = (data / "log.txt").read_text().splitlines()
    assert len(lines) == sum(int(o.strip().splitlines()[-1].split()[1]) for o in outputs)


@pytest.mark.parametrize("outer_first", [True, False])
def test_nested_attach_points_share_the_outer_mount(filters: Callable[..., CBFilter], data: Path,
                                                    outer_first: bool) -> None:
    """A filter on data/ and one on data/hr/: one mount, at data/ (never FUSE over FUSE); the inner filter's rules
    apply below data/hr only, the outer one's everywhere; unfiltered files keep kernel passthrough."""
    outer, inner = filters("300000", 1), filters("100000", 2)
    opened: list[str] = []
    outer.on_notify_open_file = lambda p: opened.append(p.file_name)
    outer.add_filter_rule(f"{data}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_OPEN)
    inner.add_attach_point(str(data / "hr"))
    inner.add_filter_rule("*.csv", c.ACCESS_READ_ONLY, c.FS_CE_NONE, c.FS_NE_NONE)  # unanchored: only below hr
    (data / "top.csv").write_bytes(b"a,b\n")
    holder = None
    for f in (outer, inner) if outer_first else (inner, outer):
        f.start_filter()
        if not outer_first and holder is None:
            # A process inside the inner mount before the outer one starts keeps working there.
            holder = subprocess.Popen([sys.executable, "-c", WORKER, str(data / "hr"), "3"], stdout=subprocess.PIPE,
                                      text=True)
            assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
    try:
        assert fsfilter_mounts(data.parent) == [str(data)]
        pay, top = str(data / "hr" / "pay.csv"), str(data / "top.csv")
        assert errno_of(f"open({pay!r}, 'a').write('x')") == errno.EACCES
        assert errno_of(f"open({top!r}, 'a').write('x')") == 0
        run(f"open({pay!r}).read()")
        assert wait_for(lambda: pay in opened, 5)
        if holder is not None:
            out = holder.communicate(timeout=30)[0]
            last = out.strip().splitlines()[-1].split()
            assert last[0] == "done" and last[2] == "0", out
            # It worked through the detached inner mount (by its cwd), which the outer filter joined as well.
            assert any(p == str(data / "hr" / "log.txt") for p in opened)
        inner.stop_filter()  # the outer filter goes on alone on the same mount
        assert fsfilter_mounts(data.parent) == [str(data)]
        assert errno_of(f"open({pay!r}, 'a').write('x')") == 0
    finally:
        if holder is not None:
            end_processes([holder])


def test_equal_altitudes(filters: Callable[..., CBFilter], data: Path) -> None:
    """Equal altitudes: with strict_altitude the second start fails with a clear error and changes nothing;
    without, both run and the one started first is higher."""
    trace = Trace()
    first, second = filters("200000", 1), filters("200000", 2)
    watch_opens(first, trace, "first", data)
    watch_opens(second, trace, "second", data)
    first.start_filter()
    second.strict_altitude = True
    with pytest.raises(CBFSFilterError) as raised:
        second.start_filter()
    assert raised.value.code == errno.EEXIST and "altitude" in raised.value.message
    assert not second.active and first.active
    run(f"open({str(data / 'a.txt')!r}).read()")
    assert wait_for(lambda: trace.order("after") == ["first"], 5)
    second.strict_altitude = False
    second.start_filter()
    trace.seen.clear()
    run(f"open({str(data / 'a.txt')!r}).read()")
    assert wait_for(lambda: len(trace.order("after")) >= 2, 5)
    assert trace.order("before")[:2] == ["first", "second"]


def test_bad_altitude_is_refused_and_changes_nothing(filters: Callable[..., CBFilter], data: Path) -> None:
    f = filters("not a number")
    f.add_filter_rule(f"{data}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_OPEN)
    with pytest.raises(CBFSFilterError) as raised:
        f.start_filter()
    assert raised.value.code == errno.EINVAL
    assert not f.active and fsfilter_mounts(data.parent) == []


def test_kernel_passthrough_for_files_no_layer_needs(filters: Callable[..., CBFilter], data: Path) -> None:
    """Two filters stacked on one mount: a file whose reads no layer asks for keeps kernel passthrough; a file one
    layer's read events need is served by the daemon (so that layer sees its reads)."""
    (data / "b.log").write_bytes(b"log\n")
    watcher, reader = filters("300000"), filters("100000")
    watcher.on_notify_open_file = lambda p: None
    watcher.add_filter_rule(f"{data}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_OPEN)
    reads: list[str] = []
    reader.on_notify_read_file = lambda p: reads.append(p.file_name)
    reader.add_filter_rule(f"{data}/*.log", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_READ)
    watcher.start_filter()
    reader.start_filter()
    (fs,) = [a.fs for a in watcher._attached.values()]
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        a = open({str(data / 'a.txt')!r}, 'rb'); b = open({str(data / 'b.log')!r}, 'rb')
        a.read(); b.read(); print('ok', flush=True); sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        kinds = {fs.path_of(o.inode.nodeid): o.passthrough for o in list(fs.files.values())}
        assert kinds[b"/a.txt"] is True and kinds[b"/b.log"] is False
        assert wait_for(lambda: str(data / "b.log") in reads, 5)
    finally:
        end_processes([holder])


def test_equal_altitudes_keep_their_start_order_when_a_mount_takes_over(filters: Callable[..., CBFilter],
                                                                         data: Path) -> None:
    """The inner filter, started first, stays above the outer one of the same altitude after the outer mount takes
    the inner one's place."""
    trace = Trace()
    inner, outer = filters("200000", 1), filters("200000", 2)
    inner.on_before_open_file = trace.hook("inner", "before", "/pay.csv")
    inner.add_filter_rule(f"{data}/hr/*", c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN, c.FS_NE_NONE)
    outer.on_before_open_file = trace.hook("outer", "before", "/pay.csv")
    outer.add_filter_rule(f"{data}/*", c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN, c.FS_NE_NONE)
    inner.start_filter()
    outer.start_filter()
    assert fsfilter_mounts(data.parent) == [str(data)]
    run(f"open({str(data / 'hr' / 'pay.csv')!r}).read()")
    assert wait_for(lambda: len(trace.order("before")) >= 2, 5)
    assert trace.order("before")[:2] == ["inner", "outer"]


@pytest.mark.parametrize("same_mount", [True, False])
def test_a_redirect_cannot_carry_requests_past_another_filters_rule(filters: Callable[..., CBFilter], data: Path,
                                                                     scratch: Path, same_mount: bool) -> None:
    """Attack: filter B redirects a name of its own (a reparse rule) to the file filter A protects. The daemon
    reaches the target with its own requests, which A does not judge, so the redirect must be refused, whether A
    shares B's mount or filters another directory of the process."""
    guard, redirector = filters("100000", 1), filters("300000", 2)
    guard.add_filter_rule(f"{data}/ro.txt", c.ACCESS_READ_ONLY, c.FS_CE_NONE, c.FS_NE_NONE)
    if same_mount:
        alias = data / "alias.txt"
        redirector.add_filter_rule(f"{data}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_NONE)
    else:
        (scratch / "app").mkdir()
        alias = scratch / "app" / "alias.txt"
        redirector.add_attach_point(str(scratch / "app"))
    redirector.add_reparse_rule(str(alias), str(data / "ro.txt"))
    guard.start_filter()
    redirector.start_filter()
    assert errno_of(f"open({str(alias)!r}, 'a').write('pwned')") == errno.EACCES
    assert errno_of(f"open({str(alias)!r}, 'w').write('pwned')") == errno.EACCES
    assert (data / "ro.txt").read_bytes() == b"read only\n"
    assert errno_of(f"open({str(data / 'ro.txt')!r}, 'a').write('x')") == errno.EACCES


def test_a_filter_started_while_the_last_one_stops_gets_a_working_mount(filters: Callable[..., CBFilter],
                                                                        data: Path) -> None:
    """Race: the last filter on a directory stops (its mount is being taken down) while another starts on it. The
    new one must not mount over the old mount that is going away (its lower directory would be that dying mount):
    after both, the directory works and the new filter's rule holds."""
    ro = str(data / "ro.txt")
    for _ in range(6):
        old, new = filters("100000"), filters("200000")
        old.on_notify_open_file = lambda p: None
        old.add_filter_rule(f"{data}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_OPEN)
        new.add_filter_rule(ro, c.ACCESS_READ_ONLY, c.FS_CE_NONE, c.FS_NE_NONE)
        old.start_filter()
        stopper = threading.Thread(target=old.stop_filter)
        stopper.start()
        new.start_filter()
        stopper.join(30)
        assert errno_of(f"open({ro!r}, 'a').write('x')") == errno.EACCES
        assert errno_of(f"os.listdir({str(data)!r})") == 0
        new.stop_filter()
        assert fsfilter_mounts(data.parent) == []
