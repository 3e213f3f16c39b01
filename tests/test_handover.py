"""fsfilterd restarts without disruption: the mounts go to a holder and on to the next fsfilterd with their
connection, tables and open files, the default rules hold throughout, and programs inside never see an error."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import end_pids, end_processes, force_unmount, is_mounted, needs_root, pids_whose_argv, wait_for
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


class Scene:
    """A directory (``data``, with data.txt and ro.txt) under a fsfilterd of the test's own whose default rule makes
    ro.txt read-only, and what a test starts inside it: the four workers, a prober, other processes."""

    def __init__(self, scratch: Path, rule: bool = True) -> None:
        self.scratch = scratch
        self.data = scratch / "data"
        self.data.mkdir()
        (self.data / "data.txt").write_text("data\n")
        (self.data / "ro.txt").write_text("ro\n")
        self.service = Service(scratch)
        if rule:
            _write_rules(self.service, "acme", f"read-only {self.data}/ro.txt\n")
        self.workers: Workers | None = None
        self.prober: Prober | None = None
        self.procs: list[subprocess.Popen[str]] = []

    def start_workers(self) -> None:
        self.workers = Workers(self.data, self.scratch / "out")

    def probe(self, target: Path) -> None:
        self.prober = Prober(self.scratch, target)

    def restart(self, fd_limit: int | None = None) -> None:
        """Start the next fsfilterd (its log in a file of its own)."""
        self.service.log = self.scratch / "fsfilterd-2.log"
        self.service.start(fd_limit)

    def results(self) -> dict[str, dict[str, Any]]:
        """Stop the workers; their figures, checked (no error, nothing lost, no wait of a second)."""
        assert self.workers is not None
        results = self.workers.finish()
        self.workers = None
        _check(results, self.data)
        return results

    def probed(self) -> tuple[int, int]:
        assert self.prober is not None
        tries, got_in = self.prober.finish()
        self.prober = None
        return tries, got_in


@contextlib.contextmanager
def scene(scratch: Path, rule: bool = True) -> Iterator[Scene]:
    """A Scene; on the way out everything it started is ended (rescuers and holders too) and its mount removed, and
    when the test failed the services' logs are printed."""
    sc = Scene(scratch, rule)
    try:
        yield sc
    except BaseException:
        for log in sorted(scratch.glob("fsfilterd*.log")):
            print(log.name, log.read_text()[-4000:])
        raise
    finally:
        if sc.workers is not None:
            end_processes(sc.workers.procs)
        if sc.prober is not None:
            end_processes([sc.prober.proc])
        end_processes(sc.procs)
        sc.service.stop()
        data = os.fsencode(sc.data)
        end_pids(lambda: pids_whose_argv(lambda argv: any(b"service.rescue" in a for a in argv) and data in argv))
        force_unmount(sc.data)


def test_restart_hands_the_mounts_over(scratch: Path) -> None:
    """SIGTERM, then a new fsfilterd: the same mount (no remount) serves on; 4 programs inside see no error and no
    wait over a second; the read-only default rule never lets a write through; a taker that refuses or goes away
    midway changes nothing."""
    with scene(scratch) as sc:
        data, service = sc.data, sc.service
        service.start()
        assert is_mounted(data)
        before = _mount_id(data)
        sc.start_workers()
        sc.probe(data / "ro.txt")
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
        sc.restart()
        assert "taken over" in service.log.read_text(), service.log.read_text()
        assert wait_for(lambda: _gone(holder), 10), "the holder outlived the handover"
        time.sleep(1.0)
        assert _mount_id(data) == before  # the same mount throughout: nothing was unmounted or remounted
        sc.results()
        tries, got_in = sc.probed()
        assert tries > 100 and got_in == 0, (tries, got_in)
        assert (data / "ro.txt").read_text() == "ro\n"
        status = service.call("status")
        assert any(m["path"] == str(data) for m in status["directories"]), status


def test_stop_without_successor_lets_go(scratch: Path) -> None:
    """SIGTERM and no new fsfilterd: after the grace time the mount is detached (new path walks reach the directory
    itself) while the programs inside go on without an error; the holder exits once they leave."""
    with scene(scratch) as sc:
        data, service = sc.data, sc.service
        service.env["FSFILTER_HANDOVER_GRACE"] = "1"
        service.start()
        sc.start_workers()
        time.sleep(0.3)
        service.stop(holder=True)
        assert wait_for(lambda: len(service.holders()) == 1, 10), service.log.read_text()
        holder = service.holders()[0]
        assert wait_for(lambda: not is_mounted(data), 15), service.log.read_text()
        assert not _gone(holder)  # still serving the programs inside
        time.sleep(0.5)
        sc.results()
        assert wait_for(lambda: _gone(holder), 15), "the holder outlived the programs inside"


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
    with scene(scratch, rule=False) as sc:
        data, service = sc.data, sc.service
        (data / "app-ro.txt").write_text("ro\n")
        script = scratch / "app.py"
        script.write_text(ATTACHED_APP)
        service.start()
        app = subprocess.Popen([sys.executable, str(script), str(data)], env=service.env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=open(scratch / "fsfilterd-app.log", "w"), text=True)
        sc.procs.append(app)
        assert app.stdout is not None and app.stdin is not None
        assert app.stdout.readline().strip() == "started"
        before = _mount_id(data)
        sc.start_workers()
        sc.probe(data / "app-ro.txt")
        time.sleep(0.5)
        service.stop(holder=True)
        assert wait_for(lambda: len(service.holders()) == 1, 10), service.log.read_text()
        holder = service.holders()[0]
        time.sleep(1.0)  # the application attaches again to the holder meanwhile
        sc.restart()
        assert wait_for(lambda: _gone(holder), 10), "the holder outlived the handover"
        assert wait_for(lambda: any(f.get("kind") == "application" and f.get("attached")
                                    for d in service.call("status")["directories"] for f in d["layers"]), 15)
        time.sleep(1.0)
        assert _mount_id(data) == before
        results = sc.results()
        tries, got_in = sc.probed()
        assert tries > 100 and got_in == 0, (tries, got_in)
        app.stdin.write("report\n")
        app.stdin.flush()
        covered, overlaps, attached, errors = app.stdout.readline().split(" ", 3)
        assert attached == "True" and errors.strip() == "[]", (attached, errors)
        size = (data / f"log-{results['writer']['pid']}.txt").stat().st_size
        assert int(covered) == size and int(overlaps) == 0, (covered, overlaps, size)  # none lost, none twice
        assert app.wait(20) == 0


def test_restart_with_thousands_of_nodes_and_open_files(scratch: Path) -> None:
    """More fds than a default soft limit (1024) and than one message carries: 3000 nodes the kernel remembers (a
    listing with attributes) and 40 files held open, by services started with systemd's soft limit. Every open file
    still reads and writes after two handovers, and the listing is whole."""
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
    with scene(scratch) as sc:
        data, service = sc.data, sc.service
        many = data / "many"
        many.mkdir()
        for i in range(3000):
            (many / f"f{i:04d}").write_text(f"{i}\n")
        script = scratch / "holdopen.py"
        script.write_text(holder)
        service.start(fd_limit=1024)
        user = subprocess.Popen([sys.executable, str(script), str(many)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        sc.procs.append(user)
        assert user.stdout is not None and user.stdin is not None
        assert user.stdout.readline().strip() == "ready"
        before = _mount_id(data)
        service.stop(holder=True)
        sc.restart(fd_limit=1024)
        assert "taken over" in service.log.read_text(), service.log.read_text()
        assert wait_for(lambda: not service.holders(), 10)
        assert _mount_id(data) == before
        user.stdin.write("go\n")
        user.stdin.flush()
        bad, listing = user.stdout.readline().split()
        assert (int(bad), int(listing)) == (0, 3000)
        assert (many / "f0007").read_text() == "7\nmore\n"
        assert subprocess.run(["sh", "-c", f"echo x >> {data}/ro.txt"], capture_output=True).returncode != 0


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
    with scene(scratch) as sc:
        data, service = sc.data, sc.service
        service.start()
        before = _mount_id(data)
        sc.start_workers()
        sc.probe(data / "ro.txt")
        time.sleep(0.5)
        assert service.proc is not None
        service.proc.kill()
        service.proc.wait(10)
        assert wait_for(lambda: os.path.exists(f"{service.socket}.handover.{before}"), 20), "no rescuer holds it"
        assert _mount_id(data) == before
        sc.restart()
        assert "taken over" in service.log.read_text(), service.log.read_text()
        assert wait_for(lambda: not os.path.exists(f"{service.socket}.handover.{before}"), 10)
        time.sleep(1.0)
        assert _mount_id(data) == before
        sc.results()
        tries, got_in = sc.probed()
        assert tries > 100 and got_in == 0, (tries, got_in)
        assert (data / "ro.txt").read_text() == "ro\n"


def test_holder_killed_its_mounts_are_rescued_and_taken_over(scratch: Path) -> None:
    """fsfilterd stops (its mounts go to the holder), then the holder is killed: each mount's watchdog rescues it
    and the next fsfilterd takes it over; the programs inside see no error."""
    with scene(scratch) as sc:
        data, service = sc.data, sc.service
        service.start()
        before = _mount_id(data)
        sc.start_workers()
        time.sleep(0.3)
        service.stop(holder=True)
        assert wait_for(lambda: len(service.holders()) == 1, 10), service.log.read_text()
        holder = service.holders()[0]
        assert wait_for(lambda: os.path.exists(service.socket + ".handover"), 20)
        os.kill(holder, 9)
        assert wait_for(lambda: os.path.exists(f"{service.socket}.handover.{before}"), 20), "no rescuer holds it"
        sc.restart()
        assert "taken over" in service.log.read_text(), service.log.read_text()
        time.sleep(1.0)
        assert _mount_id(data) == before
        sc.results()


def test_a_kept_filter_is_taken_back_only_by_its_user_with_its_token(scratch: Path) -> None:
    """A filter the next fsfilterd keeps for an application that is attaching again: another user who learnt the
    token, or anyone with another token, attaches afresh; only the same user with the token takes it back."""
    from fsfilter.service import remote
    from fsfilter.service.peers import Peer

    class NoService:
        def overrides_changed(self) -> None:
            pass

    data = scratch / "data"
    data.mkdir()
    apps = remote.Applications(NoService())  # rule below: ACCESS_READ_ONLY (1) on data/x
    ends: list[socket.socket] = []

    def peer(uid: int) -> Peer:
        ours, theirs = socket.socketpair()
        ends.append(theirs)
        p = Peer(ours)
        p.uid, p.privileged = uid, uid == 0  # as SO_PEERCRED would say for a process of that user
        return p

    spec = {"altitude": "360000", "tag": 7, "timeout_ms": 1000, "label": "kept", "handlers": [],
            "rules": [[f"{data}/x", "", 1, 0, 0, -1, -1, 0, 0]], "passthrough_rules": [], "attach_points": [],
            "config": {}}
    try:
        apps.keep([{"pid": os.getpid(), "uid": 0, "resume": "a" * 32, "label": "kept", "spec": spec}])
        assert apps.count() == 1
        assert apps._reclaim(peer(65534), "a" * 32, {**spec, "resume": "a" * 32}) is None  # the token, not the user
        assert apps._reclaim(peer(0), "b" * 32, {**spec, "resume": "b" * 32}) is None  # the user, not the token
        taken = apps._reclaim(peer(0), "a" * 32, {**spec, "resume": "a" * 32})
        assert taken is not None and taken["resume_token"] == "a" * 32
        assert apps._reclaim(peer(0), "a" * 32, {**spec, "resume": "a" * 32}) is None  # taken back once only
    finally:
        apps.stop()
        for end in ends:
            end.close()
        force_unmount(data)


def test_a_rescue_takes_back_only_the_very_objects(tmp_path: Path) -> None:
    """The rescuer reopens nodes by their names: a name that now leads to another object (a file renamed over it
    while nobody served the mount) is not served as the old node, and an open is taken back only of a regular file
    (a FIFO put where a file was would hang the rescuer's open)."""
    from fsfilter._sessions.journal import Journal, read
    from fsfilter.service.rescue import tables_from_journal

    lower = tmp_path / "lower"
    lower.mkdir()
    for name in ("a", "b", "other"):
        (lower / name).write_text(name)
    os.mkfifo(lower / "p")
    key = {name: (st.st_dev, st.st_ino) for name in ("a", "b", "p") for st in [os.lstat(lower / name)]}
    journal = Journal.create()
    lower_fd = os.open(lower, os.O_PATH | os.O_DIRECTORY)
    fds: list[int] = []
    try:
        journal.write_header({"journal-test": True})
        for nodeid, name in ((2, "a"), (3, "b"), (4, "p")):
            journal.node(nodeid, 1, name.encode(), 1, key[name])
            journal.opened(10 + nodeid, nodeid, os.O_RDONLY, False, False)
        os.rename(lower / "other", lower / "a")  # behind the mount: "a" is another file now
        tables = tables_from_journal(read(journal.fd), lower_fd, fds)
        assert sorted(row[0] for row in tables["nodes"]) == [3, 4]  # "a" is not the node the kernel knows
        assert [f[0] for f in tables["files"]] == [13]  # "b"'s open; none of the FIFO (nor of the dropped "a")
    finally:
        for fd in fds:
            os.close(fd)
        os.close(lower_fd)
        journal.close()
