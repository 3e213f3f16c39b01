"""Zero disruption: programs using a directory keep working — no error, nothing acknowledged lost, no call waiting
more than a second — while the filter on it stops, its application exits, or its application is killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SRC, end_processes, force_unmount, is_mounted, needs_root, wait_for
from test_service import Service, _try, _write_rules

pytestmark = [needs_root, pytest.mark.timeout(120)]
WORKER = Path(__file__).resolve().parent / "disruption.py"
ROLES = ("writer", "reader", "lister", "cwd")


class Workers:
    def __init__(self, data: Path, out: Path) -> None:
        self.data, self.out = data, out
        out.mkdir(exist_ok=True)
        self.procs = [subprocess.Popen([sys.executable, str(WORKER), role, str(data), "60", str(out / f"{role}.json")])
                      for role in ROLES]
        assert wait_for(lambda: all((out / f"{role}.json.ready").exists() for role in ROLES), 20)

    def finish(self) -> dict[str, dict[str, Any]]:
        for role in ROLES:
            (self.out / f"{role}.json.stop").touch()
        for p in self.procs:
            p.wait(30)
        return {role: json.loads((self.out / f"{role}.json").read_text()) for role in ROLES}


def _check(results: dict[str, dict[str, Any]], data: Path) -> None:
    # The worst wait of each role, for the record (pytest -s shows it): "WORST role=seconds ...".
    print("WORST", " ".join(f"{role}={r['worst']:.4f}" for role, r in results.items()))
    for role, r in results.items():
        assert r["error_count"] == 0, (role, r["errors"])
        assert r["worst"] < 1.0, (role, r["worst"])
        assert r["rounds"] > 10, (role, r["rounds"])
    writer = results["writer"]
    lines = (data / f"log-{writer['pid']}.txt").read_text().splitlines()
    assert lines == [f"record {i}" for i in range(writer["acknowledged"])]


EMBEDDED_APP = textwrap.dedent("""
    import sys
    from fsfilter import CBFilter
    from fsfilter.api import constants as c
    f = CBFilter()
    f.config("Service=off")
    f.on_notify_write_file = lambda e: None
    f.add_filter_rule(sys.argv[1] + "/*", c.ACCESS_NONE, 0, c.FS_NE_WRITE)
    f.start_filter(5000)
    print("started", flush=True)
    sys.stdin.readline()
    f.stop_filter()
    print("stopped:", f.stop_report, flush=True)
""")


def _embedded_app(scratch: Path, data: Path, stderr: Path | None = None) -> subprocess.Popen[str]:
    """``data`` (made, with data.txt) under EMBEDDED_APP's filter, running in a process of its own."""
    data.mkdir()
    (data / "data.txt").write_text("data\n")
    script = scratch / "app.py"
    script.write_text(EMBEDDED_APP)
    env = dict(os.environ, PYTHONPATH=str(SRC))
    return subprocess.Popen([sys.executable, str(script), str(data)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=open(stderr, "w") if stderr is not None else None, text=True)


def test_embedded_stop_with_programs_inside(scratch: Path) -> None:
    """stop_filter of an embedded filter, then the application exits: programs inside go on, served by a keeper
    until they leave; then the keeper and the mount go."""
    data = scratch / "data"
    app = _embedded_app(scratch, data)
    workers: Workers | None = None
    try:
        assert app.stdout is not None and app.stdin is not None
        assert app.stdout.readline().strip() == "started"
        assert is_mounted(data)
        workers = Workers(data, scratch / "out")
        time.sleep(0.5)
        app.stdin.write("stop\n")
        app.stdin.flush()
        report = app.stdout.readline()
        assert app.wait(20) == 0
        assert not is_mounted(data)  # new path walks reach the directory itself
        time.sleep(1.0)  # the application is gone; the programs inside go on
        results = workers.finish()
        workers = None
        _check(results, data)
        assert "keeper pid" in report, report
        keeper = int(report.split("keeper pid ")[1].split()[0])
        assert wait_for(lambda: not os.path.exists(f"/proc/{keeper}") or
                        open(f"/proc/{keeper}/stat").read().split()[2] == "Z", 10), "the keeper outlived its users"
    finally:
        if workers is not None:
            end_processes(workers.procs)
        end_processes([app])
        force_unmount(data)


SERVICE_APP = textwrap.dedent("""
    import sys
    from fsfilter import CBFilter
    from fsfilter.api import constants as c
    f = CBFilter()
    f.config("Service=on")
    f.on_notify_write_file = lambda e: None
    f.on_before_open_file = lambda e: None
    f.add_filter_rule(sys.argv[1] + "/*", c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN, c.FS_NE_WRITE)
    f.start_filter(5000)
    assert f.attached_to_service
    print("started", flush=True)
    sys.stdin.readline()
    f.stop_filter()
    print("stopped", flush=True)
    sys.stdin.readline()
""")


@pytest.mark.parametrize("how", ["stop", "kill"])
@pytest.mark.parametrize("defaults", [True, False], ids=["with-default-rule", "last-layer"])
def test_service_application_stops_or_dies_with_programs_inside(scratch: Path, how: str, defaults: bool) -> None:
    data = scratch / "data"
    data.mkdir()
    (data / "data.txt").write_text("data\n")
    (data / "ro.txt").write_text("ro\n")
    service = Service(scratch)
    if defaults:
        _write_rules(service, "acme", f"read-only {data}/ro.txt\n")
    script = scratch / "app.py"
    script.write_text(SERVICE_APP)
    app: subprocess.Popen[str] | None = None
    workers: Workers | None = None
    try:
        service.start()
        app = subprocess.Popen([sys.executable, str(script), str(data)], env=service.env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        assert app.stdout is not None and app.stdin is not None
        assert app.stdout.readline().strip() == "started"
        workers = Workers(data, scratch / "out")
        time.sleep(0.5)
        if how == "stop":
            app.stdin.write("stop\n")
            app.stdin.flush()
            assert app.stdout.readline().strip() == "stopped"
        else:
            app.kill()
            app.wait(10)
        assert wait_for(lambda: service.call("status")["applications"] == 0, 10)
        time.sleep(1.0)
        results = workers.finish()
        workers = None
        _check(results, data)
        if defaults:
            assert is_mounted(data)
            assert _try(f"echo x >> {data}/ro.txt") != 0  # what remains is still enforced
            assert (data / "ro.txt").read_text() == "ro\n"
    except BaseException:
        print(service.log.read_text() if service.log.exists() else "no service log")  # shown when the test fails
        raise
    finally:
        if workers is not None:
            end_processes(workers.procs)
        if app is not None:
            end_processes([app])
        service.stop()
        force_unmount(data)


PROTECTING_APP = textwrap.dedent("""
    import sys
    from fsfilter import CBFilter
    from fsfilter.api import constants as c
    f = CBFilter()
    f.config("Service=off")
    f.add_filter_rule(sys.argv[1] + "/ro.txt", c.ACCESS_READ_ONLY, 0, 0)
    f.start_filter(5000)
    print("started", flush=True)
    sys.stdin.readline()
    f.stop_filter()
    print("stopped", flush=True)
""")


def test_stopping_never_detaches_another_process_mount(scratch: Path) -> None:
    """A's filter mounted the directory first, B's (another process) mounted over it. A stops while a program is
    inside: B's mount, and its rule, must stay where they are."""
    data = scratch / "data"
    data.mkdir()
    (data / "data.txt").write_text("data\n")
    (data / "ro.txt").write_text("ro\n")
    (scratch / "a.py").write_text(EMBEDDED_APP)
    (scratch / "b.py").write_text(PROTECTING_APP)
    env = dict(os.environ, PYTHONPATH=str(SRC))
    apps: list[subprocess.Popen[str]] = []
    inside = None
    try:
        for name in ("a.py", "b.py"):
            app = subprocess.Popen([sys.executable, str(scratch / name), str(data)], env=env, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
            apps.append(app)
            assert app.stdout is not None and app.stdout.readline().strip() == "started"
        inside = subprocess.Popen(["sleep", "60"], cwd=data)
        assert _try(f"echo x >> {data}/ro.txt") != 0  # B's rule holds
        a = apps[0]
        assert a.stdin is not None and a.stdout is not None
        a.stdin.write("stop\n")
        a.stdin.flush()
        a.stdout.readline()
        assert a.wait(20) == 0
        assert is_mounted(data)
        assert _try(f"echo x >> {data}/ro.txt") != 0  # B's rule still holds
        assert (data / "ro.txt").read_text() == "ro\n"
    finally:
        if inside is not None:
            inside.kill()
            inside.wait(10)
        end_processes(apps)
        force_unmount(data)


def test_stop_with_nothing_inside_unmounts_quietly(scratch: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The plain case: nothing inside, the mount simply goes, and the filter reports no loss on the way."""
    import logging

    from fsfilter import CBFilter
    caplog.set_level(logging.WARNING, logger="fsfilter")
    data = scratch / "data"
    data.mkdir()
    f = CBFilter()
    f.config("Service=off")
    errors: list[str] = []
    f.on_error = lambda e: errors.append(e.description)
    f.add_attach_point(str(data))
    f.on_notify_open_file = lambda e: None
    f.add_filter_rule(f"{data}/*", 0, 0, 2)  # FS_NE_OPEN
    f.start_filter(0)
    try:
        assert is_mounted(data)
    finally:
        f.stop_filter()
        force_unmount(data)
    time.sleep(0.3)  # a reader that saw the connection end would have reported it by now
    assert not is_mounted(data)
    assert errors == [] and f.stop_report == ""
    assert not [r.getMessage() for r in caplog.records if "unmounted from outside" in r.getMessage()]


def test_embedded_application_killed_with_programs_inside(scratch: Path) -> None:
    """SIGKILL of an application whose filter runs in it: the mount's watchdog rescues the mount from the journal
    and serves the programs inside (detached, plain pass-through) until they leave; none sees an error."""
    data = scratch / "data"
    app = _embedded_app(scratch, data, stderr=scratch / "app.log")
    workers: Workers | None = None
    try:
        assert app.stdout is not None
        assert app.stdout.readline().strip() == "started"
        workers = Workers(data, scratch / "out")
        time.sleep(0.5)
        app.kill()
        app.wait(10)
        assert wait_for(lambda: "rescued" in (scratch / "app.log").read_text(), 10), (scratch / "app.log").read_text()
        assert wait_for(lambda: not is_mounted(data), 10)  # detached: new path walks reach the directory itself
        time.sleep(1.0)
        results = workers.finish()
        workers = None
        _check(results, data)
        assert wait_for(lambda: "rescuer done" in (scratch / "app.log").read_text(), 15), \
            (scratch / "app.log").read_text()
    finally:
        if workers is not None:
            end_processes(workers.procs)
        end_processes([app])
        force_unmount(data)
