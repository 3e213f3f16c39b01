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
        # A successor of another format is refused; one that goes away midway leaves the holder serving.
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(handover_path)
            s.send(json.dumps({"op": "take", "format": 999}).encode())
            assert json.loads(s.recv(65536))["op"] == "refused"
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(handover_path)
            s.send(json.dumps({"op": "take", "format": 1}).encode())
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
