"""fsfilterd restarts without disruption: the mounts go to a holder and on to the next fsfilterd with their
connection, tables and open files, the default rules hold throughout, and programs inside never see an error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import end_processes, force_unmount, is_mounted, needs_root, wait_for
from test_disruption import Workers, _check
from test_service import Service, _write_rules

from fsfilter._sessions.handover import FORMAT
from fsfilter._system import fuse_device

pytestmark = [needs_root, pytest.mark.timeout(150)]

# Tries to append to the protected file again and again; counts the tries that got through.
PROBER = textwrap.dedent("""
    import sys, time, os
    path, out = sys.argv[1], sys.argv[2]
    got_in = tries = 0
    open(out + ".ready", "w").close()
    while not os.path.exists(out + ".stop"):
        tries += 1
        try:
            with open(path, "a") as f:
                f.write("breach\\n")
            got_in += 1
        except PermissionError:
            pass
        except OSError as exc:
            print("prober:", exc, file=sys.stderr)
        time.sleep(0.002)
    open(out, "w").write(f"{tries} {got_in}")
""")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


class Prober:
    def __init__(self, scratch: Path, target: Path) -> None:
        script = scratch / "prober.py"
        script.write_text(PROBER)
        self.out = scratch / "prober.out"
        self.proc = subprocess.Popen([sys.executable, str(script), str(target), str(self.out)])
        assert wait_for(lambda: Path(str(self.out) + ".ready").exists(), 20)

    def finish(self) -> tuple[int, int]:
        Path(str(self.out) + ".stop").touch()
        self.proc.wait(30)
        tries, got_in = self.out.read_text().split()
        return int(tries), int(got_in)


def _mount_id(path: Path) -> int:
    entry = fuse_device.find_mount(str(path))
    return entry.mount_id if entry is not None else -1


def test_restart_hands_the_mounts_over(scratch: Path) -> None:
    """SIGTERM, then a new fsfilterd: the same mount (no remount) serves on; 4 programs inside see no error and no
    wait over a second; the read-only default rule never lets a write through; a taker that refuses or goes away
    midway changes nothing."""
    data = scratch / "data"
    data.mkdir()
    (data / "data.txt").write_text("data\n")
    (data / "ro.txt").write_text("ro\n")
    service = Service(scratch)
    _write_rules(service, "acme", f"read-only {data}/ro.txt\n")
    workers: Workers | None = None
    prober: Prober | None = None
    try:
        service.start()
        assert is_mounted(data)
        before = _mount_id(data)
        workers = Workers(data, scratch / "out")
        prober = Prober(scratch, data / "ro.txt")
        time.sleep(0.5)
        service.stop(holder=True)
        assert wait_for(lambda: len(service.holders()) == 1, 10), service.log.read_text()
        holder = service.holders()[0]
        handover_path = service.socket + ".handover"
        assert wait_for(lambda: os.path.exists(handover_path), 20), service.log.read_text()
        assert _mount_id(data) == before
        held = service.call("status")  # the holder answers on the control socket meanwhile
        assert held["pid"] == holder and held["holder"]["keeps_for_s"] > 0, held
        assert held["default_rules"]["count"] == 1, held
        # A successor of another format is refused; one that goes away midway leaves the holder serving.
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(handover_path)
            s.send(json.dumps({"op": "take", "format": 999}).encode())
            assert json.loads(s.recv(65536))["op"] == "refused"
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(handover_path)
            s.send(json.dumps({"op": "take", "format": FORMAT}).encode())
            data_, fds, _, _ = socket.recv_fds(s, 65536, 4)
            assert json.loads(data_)["op"] == "state"
            for fd in fds:
                os.close(fd)
        time.sleep(0.5)
        assert not _gone(holder)
        service.log = scratch / "fsfilterd-2.log"
        service.start()
        assert "taken over" in service.log.read_text(), service.log.read_text()
        assert wait_for(lambda: _gone(holder), 10), "the holder outlived the handover"
        time.sleep(1.0)
        assert _mount_id(data) == before  # the same mount throughout: nothing was unmounted or remounted
        results = workers.finish()
        workers = None
        _check(results, data)
        tries, got_in = prober.finish()
        prober = None
        assert tries > 100 and got_in == 0, (tries, got_in)
        assert (data / "ro.txt").read_text() == "ro\n"
        status = service.call("status")
        assert any(m["path"] == str(data) for m in status["directories"]), status
    except BaseException:
        for log in sorted(scratch.glob("fsfilterd*.log")):
            print(log.name, log.read_text())
        raise
    finally:
        if workers is not None:
            end_processes(workers.procs)
        if prober is not None:
            end_processes([prober.proc])
        service.stop()
        force_unmount(data)


def test_stop_without_successor_lets_go(scratch: Path) -> None:
    """SIGTERM and no new fsfilterd: after the grace time the mount is detached (new path walks reach the directory
    itself) while the programs inside go on without an error; the holder exits once they leave."""
    data = scratch / "data"
    data.mkdir()
    (data / "data.txt").write_text("data\n")
    (data / "ro.txt").write_text("ro\n")
    service = Service(scratch)
    service.env["FSFILTER_HANDOVER_GRACE"] = "1"
    _write_rules(service, "acme", f"read-only {data}/ro.txt\n")
    workers: Workers | None = None
    try:
        service.start()
        workers = Workers(data, scratch / "out")
        time.sleep(0.3)
        service.stop(holder=True)
        assert wait_for(lambda: len(service.holders()) == 1, 10), service.log.read_text()
        holder = service.holders()[0]
        assert wait_for(lambda: not is_mounted(data), 15), service.log.read_text()
        assert not _gone(holder)  # still serving the programs inside
        time.sleep(0.5)
        results = workers.finish()
        workers = None
        _check(results, data)
        assert wait_for(lambda: _gone(holder), 15), "the holder outlived the programs inside"
    except BaseException:
        print(service.log.read_text())
        raise
    finally:
        if workers is not None:
            end_processes(workers.procs)
        service.stop()
        force_unmount(data)


ATTACHED_APP = textwrap.dedent("""
    import logging, sys, threading, time
    logging.basicConfig(level=logging.INFO, format="%(asctime)s app: %(message)s")
    from fsfilter import CBFilter
    from fsfilter.api import constants as c
    data = sys.argv[1]
    f = CBFilter()
    f.config("Service=on")
    errors = []
    lock = threading.Lock()
    spans = []
    def on_write(e):
        if "/log-" in e.file_name:
            with lock:
                spans.append((e.position, e.bytes_to_write))
    f.on_notify_write_file = on_write
    f.on_before_open_file = lambda e: None
    f.on_error = lambda e: errors.append(e.description)
    f.add_filter_rule(data + "/log-*", c.ACCESS_NONE, 0, c.FS_NE_WRITE)
    f.add_filter_rule(data + "/data.txt", c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN, 0)  # the reader's opens: round trips
    f.add_filter_rule(data + "/app-ro.txt", c.ACCESS_READ_ONLY, 0, 0)
    f.start_filter(5000)
    print("started", flush=True)
    sys.stdin.readline()
    last = -1
    while last != len(spans):  # notifications still on their way
        last = len(spans)
        time.sleep(0.5)
    # The kernel splits a write that crosses a page into two WRITE requests: one notification each. So: every byte
    # written is covered by exactly one notification.
    covered, end, overlaps = 0, 0, 0
    for position, size in sorted(spans):
        overlaps += position < end
        covered += size
        end = max(end, position + size)
    print(covered, overlaps, f.attached_to_service, repr(errors), flush=True)
    f.stop_filter()
""")


def test_restart_keeps_an_attached_application(scratch: Path) -> None:
    """An application attached to fsfilterd across its restart: its access rule never lets a write through, it
    attaches again by itself (to the holder, then to the new fsfilterd), and it gets every notification its rule
    asks for: every byte the writer wrote is in exactly one write notification, none lost in the handovers."""
    data = scratch / "data"
    data.mkdir()
    (data / "data.txt").write_text("data\n")
    (data / "app-ro.txt").write_text("ro\n")
    service = Service(scratch)
    script = scratch / "app.py"
    script.write_text(ATTACHED_APP)
    app: subprocess.Popen[str] | None = None
    workers: Workers | None = None
    prober: Prober | None = None
    try:
        service.start()
        app = subprocess.Popen([sys.executable, str(script), str(data)], env=service.env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=open(scratch / "fsfilterd-app.log", "w"), text=True)
        assert app.stdout is not None and app.stdin is not None
        assert app.stdout.readline().strip() == "started"
        before = _mount_id(data)
        workers = Workers(data, scratch / "out")
        prober = Prober(scratch, data / "app-ro.txt")
        time.sleep(0.5)
        service.stop(holder=True)
        assert wait_for(lambda: len(service.holders()) == 1, 10), service.log.read_text()
        holder = service.holders()[0]
        time.sleep(1.0)  # the application attaches again to the holder meanwhile
        service.log = scratch / "fsfilterd-2.log"
        service.start()
        assert wait_for(lambda: _gone(holder), 10), "the holder outlived the handover"
        assert wait_for(lambda: any(f.get("kind") == "application" and f.get("attached")
                                    for d in service.call("status")["directories"] for f in d["layers"]), 15)
        time.sleep(1.0)
        assert _mount_id(data) == before
        results = workers.finish()
        workers = None
        _check(results, data)
        tries, got_in = prober.finish()
        prober = None
        assert tries > 100 and got_in == 0, (tries, got_in)
        app.stdin.write("report\n")
        app.stdin.flush()
        covered, overlaps, attached, errors = app.stdout.readline().split(" ", 3)
        assert attached == "True" and errors.strip() == "[]", (attached, errors)
        size = (data / f"log-{results['writer']['pid']}.txt").stat().st_size
        assert int(covered) == size and int(overlaps) == 0, (covered, overlaps, size)  # none lost, none twice
        assert app.wait(20) == 0
    except BaseException:
        for log in sorted(scratch.glob("fsfilterd*.log")):
            print(log.name, log.read_text())
        raise
    finally:
        if workers is not None:
            end_processes(workers.procs)
        if prober is not None:
            end_processes([prober.proc])
        if app is not None:
            end_processes([app])
        service.stop()
        force_unmount(data)


def test_restart_with_thousands_of_nodes_and_open_files(scratch: Path) -> None:
    """More fds than a default soft limit (1024) and than one message carries: 3000 nodes the kernel remembers (a
    listing with attributes) and 40 files held open, by services started with systemd's soft limit. Every open file
    still reads and writes after two handovers, and the listing is whole."""
    data = scratch / "data"
    data.mkdir()
    (data / "ro.txt").write_text("ro\n")
    many = data / "many"
    many.mkdir()
    for i in range(3000):
        (many / f"f{i:04d}").write_text(f"{i}\n")
    service = Service(scratch)
    _write_rules(service, "acme", f"read-only {data}/ro.txt\n")
    holder = textwrap.dedent("""
        import os, sys, time
        d = sys.argv[1]
        assert len(os.listdir(d)) == 3000
        for name in sorted(os.listdir(d)):
            os.stat(os.path.join(d, name))
        files = [open(os.path.join(d, f"f{i:04d}"), "r+") for i in range(40)]
        print("ready", flush=True)
        sys.stdin.readline()
        bad = 0
        for i, f in enumerate(files):
            f.seek(0)
            bad += f.read() != f"{i}\\n"
            f.seek(0, 2)
            f.write("more\\n")
            f.flush()
            os.fsync(f.fileno())
        listing = len(os.listdir(d))
        print(bad, listing, flush=True)
    """)
    script = scratch / "holdopen.py"
    script.write_text(holder)
    user: subprocess.Popen[str] | None = None
    try:
        service.start(fd_limit=1024)
        user = subprocess.Popen([sys.executable, str(script), str(many)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        assert user.stdout is not None and user.stdin is not None
        assert user.stdout.readline().strip() == "ready"
        before = _mount_id(data)
        service.stop(holder=True)
        service.log = scratch / "fsfilterd-2.log"
        service.start(fd_limit=1024)
        assert "taken over" in service.log.read_text(), service.log.read_text()
        assert wait_for(lambda: not service.holders(), 10)
        assert _mount_id(data) == before
        user.stdin.write("go\n")
        user.stdin.flush()
        bad, listing = user.stdout.readline().split()
        assert (int(bad), int(listing)) == (0, 3000)
        assert (many / "f0007").read_text() == "7\nmore\n"
        assert subprocess.run(["sh", "-c", f"echo x >> {data}/ro.txt"], capture_output=True).returncode != 0
    except BaseException:
        for log in sorted(scratch.glob("fsfilterd*.log")):
            print(log.name, log.read_text()[-3000:])
        raise
    finally:
        if user is not None:
            end_processes([user])
        service.stop()
        force_unmount(data)


def test_a_socket_not_of_root_is_not_taken_from(scratch: Path) -> None:
    """Someone else's socket where the holder's would be: the new fsfilterd ignores it and starts afresh."""
    data = scratch / "data"
    data.mkdir()
    service = Service(scratch)
    _write_rules(service, "acme", f"read-only {data}/x\n")
    fake = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        fake.bind(service.socket + ".handover")
        fake.listen(1)
        os.chown(service.socket + ".handover", 65534, 65534)
        service.start()
        assert "ignoring" in service.log.read_text(), service.log.read_text()
        assert is_mounted(data)
    finally:
        fake.close()
        service.stop()
        force_unmount(data)


def test_fsfilterd_killed_its_mounts_are_rescued_and_taken_over(scratch: Path) -> None:
    """SIGKILL of fsfilterd, then a new one (systemd would restart it): each mount's watchdog rescues it from the
    journal and holds it, other processes' requests waiting, until the new fsfilterd takes it over. The programs
    inside see no error and lose nothing; the read-only default rule never lets a write through; the same mount
    serves throughout."""
    data = scratch / "data"
    data.mkdir()
    (data / "data.txt").write_text("data\n")
    (data / "ro.txt").write_text("ro\n")
    service = Service(scratch)
    _write_rules(service, "acme", f"read-only {data}/ro.txt\n")
    workers: Workers | None = None
    prober: Prober | None = None
    try:
        service.start()
        before = _mount_id(data)
        workers = Workers(data, scratch / "out")
        prober = Prober(scratch, data / "ro.txt")
        time.sleep(0.5)
        assert service.proc is not None
        service.proc.kill()
        service.proc.wait(10)
        assert wait_for(lambda: os.path.exists(f"{service.socket}.handover.{before}"), 20), "no rescuer holds it"
        assert _mount_id(data) == before
        service.log = scratch / "fsfilterd-2.log"
        service.start()
        assert "taken over" in service.log.read_text(), service.log.read_text()
        assert wait_for(lambda: not os.path.exists(f"{service.socket}.handover.{before}"), 10)
        time.sleep(1.0)
        assert _mount_id(data) == before
        results = workers.finish()
        workers = None
        _check(results, data)
        tries, got_in = prober.finish()
        prober = None
        assert tries > 100 and got_in == 0, (tries, got_in)
        assert (data / "ro.txt").read_text() == "ro\n"
    except BaseException:
        for log in sorted(scratch.glob("fsfilterd*.log")):
            print(log.name, log.read_text()[-4000:])
        raise
    finally:
        if workers is not None:
            end_processes(workers.procs)
        if prober is not None:
            end_processes([prober.proc])
        service.stop()
        _end_rescuers(data)
        force_unmount(data)


def _end_rescuers(data: Path) -> None:
    """Rescuers this test's mounts left (found by command line), told to let go, then killed."""
    def rescuers() -> list[int]:
        pids = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if any(b"service.rescue" in a for a in argv) and str(data).encode() in argv:
                    pids.append(int(name))
        return pids
    for pid in rescuers():
        os.kill(pid, 15)
    wait_for(lambda: not rescuers(), 10)
    for pid in rescuers():
        os.kill(pid, 9)


def test_holder_killed_its_mounts_are_rescued_and_taken_over(scratch: Path) -> None:
    """fsfilterd stops (its mounts go to the holder), then the holder is killed: each mount's watchdog rescues it
    and the next fsfilterd takes it over; the programs inside see no error."""
    data = scratch / "data"
    data.mkdir()
    (data / "data.txt").write_text("data\n")
    service = Service(scratch)
    _write_rules(service, "acme", f"read-only {data}/ro.txt\n")
    workers: Workers | None = None
    try:
        service.start()
        before = _mount_id(data)
        workers = Workers(data, scratch / "out")
        time.sleep(0.3)
        service.stop(holder=True)
        assert wait_for(lambda: len(service.holders()) == 1, 10), service.log.read_text()
        holder = service.holders()[0]
        assert wait_for(lambda: os.path.exists(service.socket + ".handover"), 20)
        os.kill(holder, 9)
        assert wait_for(lambda: os.path.exists(f"{service.socket}.handover.{before}"), 20), "no rescuer holds it"
        service.log = scratch / "fsfilterd-2.log"
        service.start()
        assert "taken over" in service.log.read_text(), service.log.read_text()
        time.sleep(1.0)
        assert _mount_id(data) == before
        results = workers.finish()
        workers = None
        _check(results, data)
    except BaseException:
        for log in sorted(scratch.glob("fsfilterd*.log")):
            print(log.name, log.read_text()[-4000:])
        raise
    finally:
        if workers is not None:
            end_processes(workers.procs)
        service.stop()
        _end_rescuers(data)
        force_unmount(data)
