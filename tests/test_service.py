"""fsfilterd in the foreground: default rules with no application, reload, the control channel (root only for
changes, malformed input answered, never a crash), applications attached to its stack in altitude order, an
application's rule overriding a default, denials logged, status, install/uninstall, the unit files."""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SRC, end_pids, end_processes, force_unmount, is_mounted, needs_root, pids_whose_argv, wait_for

from fsfilter.api import _control, _rulesfiles

pytestmark = [needs_root, pytest.mark.timeout(120)]
NOBODY = 65534


class Service:
    """A fsfilterd of the test's own: its root (FSFILTER_ROOT) and socket under the scratch directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.socket = str(base / "control.sock")
        self.rules_dir = self.root / "etc/fsfilter/rules.d"
        self.rules_dir.mkdir(parents=True)
        self.env = dict(os.environ, FSFILTER_ROOT=str(self.root), FSFILTER_SOCKET=self.socket,
                        PYTHONPATH=str(SRC))
        self.env.pop("NOTIFY_SOCKET", None)
        self.proc: subprocess.Popen[str] | None = None
        self.log = base / "fsfilterd.log"

    def start(self, fd_limit: int | None = None) -> None:
        """``fd_limit``: start it with that soft limit on open fds (as systemd does: 1024)."""
        def limit() -> None:
            if fd_limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        self.proc = subprocess.Popen([sys.executable, "-m", "fsfilter.service", "--foreground", "-v", "--socket",
                                      self.socket], env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "w"), text=True, preexec_fn=limit)
        assert wait_for(lambda: "ready" in self.log.read_text() or self.proc is None or
                        self.proc.poll() is not None, 30), self.log.read_text()
        assert self.proc.poll() is None, self.log.read_text()

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return _control.call(method, params, path=self.socket)

    def stop(self, holder: bool = False) -> None:
        """SIGTERM, as systemd stops it. Its mounts go to a holder (service/handover.py), which this then tells to let
        go too (SIGTERM) unless ``holder``: a test that wants the holder ends it with end_holders."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not holder:
            self.end_holders()

    def holders(self) -> list[int]:
        """The holder processes of this fsfilterd (started by it; found by their command line)."""
        return pids_whose_argv(lambda argv: b"--hold-fd" in argv and self.socket.encode() in argv)

    def end_holders(self, timeout: float = 10.0) -> None:
        """Tell each holder to let go (SIGTERM: its mounts detach and drain), and kill those still there after
        ``timeout`` (their mounts then die: force_unmount removes them)."""
        end_pids(self.holders, timeout)

    def hup(self) -> None:
        assert self.proc is not None
        before = self.call("status")["default_rules"]["reloads"]
        self.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: self.call("status")["default_rules"]["reloads"] > before, 15)


@pytest.fixture
def service(scratch: Path) -> Iterator[Service]:
    s = Service(scratch)
    data = scratch / "data"
    data.mkdir()
    try:
        yield s
    finally:
        s.stop()
        force_unmount(data)
        assert not is_mounted(data)


def _try(*argv: str, user: int | None = None) -> int:
    """Run a tiny shell command as another process (the filter ignores its own); return its exit status."""
    pre = (lambda: (os.setgid(user), os.setuid(user))) if user is not None else None  # type: ignore[func-returns-value]
    return subprocess.run(["sh", "-c", *argv], preexec_fn=pre, capture_output=True, timeout=30).returncode


def _write_rules(s: Service, product: str, text: str) -> Path:
    path = s.rules_dir / f"{product}.rules"
    path.write_text(textwrap.dedent(text))
    return path


def test_default_rules_hold_with_no_application(service: Service) -> None:
    data = service.base / "data"
    (data / "ro.txt").write_text("original\n")
    (data / "keep.txt").write_text("keep\n")
    _write_rules(service, "acme", f"""\
        # acme's defaults
        read-only {data}/ro.txt
        delete-protect {data}/keep.txt
        """)
    service.start()
    assert is_mounted(data)
    assert _try(f"echo x >> {data}/ro.txt") != 0
    assert (data / "ro.txt").read_text() == "original\n"
    assert _try(f"cat {data}/ro.txt") == 0
    assert _try(f"rm {data}/keep.txt") != 0 and (data / "keep.txt").exists()
    assert _try(f"echo new > {data}/other.txt") == 0  # no rule: untouched
    # another way to the same file: a hard link made elsewhere would take it out of the rule
    assert _try(f"ln {data}/ro.txt {data}/alias.txt") != 0
    st = service.call("status")
    assert st["default_rules"]["count"] == 2 and st["default_rules"]["products"] == ["acme"]
    [directory] = [d for d in st["directories"] if d["path"] == str(data)]
    assert [layer["kind"] for layer in directory["layers"]] == ["default"]
    assert st["counters"]["denials"] >= 3


def test_reload_picks_up_edited_file_and_masking(service: Service) -> None:
    data = service.base / "data"
    (data / "f.txt").write_text("v1\n")
    rules = _write_rules(service, "acme", f"read-only {data}/*\n")
    service.start()
    assert _try(f"echo x >> {data}/f.txt") != 0
    rules.write_text(f"delete-protect {data}/*\n")
    service.hup()
    assert _try(f"echo x >> {data}/f.txt") == 0
    assert _try(f"rm {data}/f.txt") != 0
    # a bad file is reported and skipped; the rules in force stay
    (service.rules_dir / "broken.rules").write_text("no-such-flag /x/*\n")
    service.hup()
    st = service.call("status")
    assert any("broken.rules:1:" in e for e in st["default_rules"]["errors"])
    assert _try(f"rm {data}/f.txt") != 0
    # a typo in a file in force keeps its last good rules, it does not lift them
    rules.write_text(f"delete-protect {data}/*\nread-onyl {data}/x\n")
    service.hup()
    assert any("acme.rules:2:" in e for e in service.call("status")["default_rules"]["errors"])
    assert _try(f"rm {data}/f.txt") != 0
    rules.write_text(f"delete-protect {data}/*\n")
    # the runtime directory's file of the same name is overridden by /etc's; an empty /etc file masks /usr/lib's
    vendor = service.root / "usr/lib/fsfilter/rules.d"
    vendor.mkdir(parents=True)
    (vendor / "acme.rules").write_text(f"deny-all {data}/*\n")
    service.hup()
    assert _try(f"cat {data}/f.txt") == 0
    (service.rules_dir / "broken.rules").unlink()
    rules.unlink()
    service.hup()
    assert _try(f"cat {data}/f.txt") != 0  # only the vendor file remains: deny-all
    rules.write_text("")
    service.hup()
    assert _try(f"cat {data}/f.txt") == 0 and _try(f"rm {data}/f.txt") == 0


def test_rules_check_reports_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "good.rules"
    good.write_text("# fine\npermissive\nread-only,delete-protect /srv/data/*\nACCESS_DENY_ALL /srv/secret/*\n")
    bad = tmp_path / "bad.rules"
    bad.write_text("read-only /srv/a/*\nbogus /srv/b/*\nread-only\nread-only /etc/passwd\nread-only *.txt\n")
    env = dict(os.environ, PYTHONPATH=str(SRC))
    ok = subprocess.run([sys.executable, "-m", "fsfilter", "rules", "check", str(good)], env=env,
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "2 rule(s) (permissive): ok" in ok.stdout
    out = subprocess.run([sys.executable, "-m", "fsfilter", "rules", "check", str(good), str(bad)], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    for n in (2, 3, 4, 5):
        assert f"{bad}:{n}:" in out.stderr
    assert f"{bad}:1:" not in out.stderr


def test_non_root_is_refused_changes_but_may_read_status(service: Service) -> None:
    service.start()
    os.chmod(service.base, 0o755)
    code = textwrap.dedent(f"""
        import json, os, socket, sys
        os.setgid({NOBODY}); os.setuid({NOBODY})
        s = socket.socket(socket.AF_UNIX); s.connect({service.socket!r}); f = s.makefile("rwb")
        out = []
        for i, m in enumerate(["reload", "add_default_rule", "attach", "status"]):
            f.write(json.dumps({{"id": i, "method": m, "params": {{"mask": "/srv/x/*", "access_flags": 1}}}})
                    .encode() + b"\\n"); f.flush()
            out.append(json.loads(f.readline()))
        print(json.dumps(out))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env=service.env)
    assert run.returncode == 0, run.stderr
    answers = json.loads(run.stdout)
    for answer in answers[:3]:
        assert answer["error"]["code"] == errno.EPERM
        assert "only root" in answer["error"]["message"]
    assert answers[3]["result"]["state"] == "running"
    assert not list(service.rules_dir.glob("*.rules"))


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("setpriv") is None, reason="util-linux missing")
def test_root_of_a_user_namespace_is_not_root(service: Service) -> None:
    """Any user can be "root" with a full CAP_SYS_ADMIN in a user namespace of their own: the service must not
    take that for root."""
    service.start()
    os.chmod(service.base, 0o755)
    code = (f"import json, socket; s = socket.socket(socket.AF_UNIX); s.connect({service.socket!r}); "
            "f = s.makefile('rwb'); f.write(b'{\"id\": 1, \"method\": \"reload\"}\\n'); f.flush(); "
            "print(f.readline().decode())")
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable  # one the nobody user may run
    run = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "unshare", "-Ur",
                          python, "-c", code], capture_output=True, text=True, timeout=30)
    if "unshare failed" in run.stderr or "Operation not permitted" in run.stderr:
        pytest.skip(f"no unprivileged user namespaces here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["error"]["code"] == errno.EPERM


def test_fuzzed_control_messages_never_crash(service: Service) -> None:
    service.start()
    rng = random.Random(1234)
    messages: list[object] = [
        {}, [], None, {"id": 1}, {"id": "x", "method": 3}, {"id": 2, "method": "nope"},
        {"id": 3, "method": "attach", "params": 5}, {"id": 4, "method": "attach", "params": {"rules": [[1, 2, 3]]}},
        {"id": 5, "method": "attach", "params": {"handlers": ["nope"], "rules": []}},
        {"id": 51, "method": "attach", "params": {"handlers": [], "rules": [["*.x", "", 1, 0, 0, -1, -1, 0, 0]]}},
        {"id": 6, "method": "detach", "params": {"handle": 99}}, {"id": 61, "method": "set_rules", "params": {}},
        {"id": 7, "method": "add_default_rule", "params": {"mask": "*.x", "access_flags": 1}},
        {"id": 71, "method": "add_default_rule", "params": {"mask": "/srv/x/*", "access_flags": True}},
        {"answer": 5, "params": {}}, {"id": 8, "method": "hello", "params": []}, {"notify": 1},
        {"id": 9, "method": "status", "params": {"deep": [1] * 1000}}, {"id": True, "method": "status"}]
    samples: list[bytes] = [b"\n", b"[" * 100000 + b"\n", b"\xff\xfe\x00garbage\n"]
    samples += [json.dumps(m).encode() + b"\n" for m in messages]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\n" for _ in range(60)]
    samples.append(b"x" * (_control.MAX_MESSAGE + 10) + b"\n")
    for sample in samples:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(service.socket)
            try:
                sock.sendall(sample)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
            except OSError:
                pass
        assert service.proc is not None and service.proc.poll() is None, service.log.read_text()
    with pytest.raises(Exception) as info:
        service.call("add_default_rule", {"mask": "*.x", "access_flags": 1})
    assert getattr(info.value, "code", None) == errno.EINVAL
    assert service.call("hello")["protocol"] == _control.PROTOCOL_VERSION
    assert "Traceback" not in service.log.read_text()


APP = textwrap.dedent("""
    import os, sys, time, signal
    from fsfilter import CBFilter
    from fsfilter.api import constants as c
    name, altitude, data, log, access = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    f = CBFilter()
    f.config("Service=on")
    f.altitude = altitude
    def before_open(e):
        if e.flags == os.O_PATH:
            return  # the LOOKUP of the name (an open for attributes), fired before the OPEN itself
        with open(log, "a") as out:
            out.write(f"{name} before {os.path.basename(e.file_name)}\\n")
    def after_open(e):
        with open(log, "a") as out:
            out.write(f"{name} after {os.path.basename(e.file_name)}\\n")
    f.on_before_open_file = before_open
    f.on_after_open_file = after_open
    f.add_filter_rule(data + "/*", access, c.FS_CE_BEFORE_OPEN | c.FS_CE_AFTER_OPEN, 0)
    f.start_filter(10000)
    assert f.attached_to_service
    print("started", flush=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    try:
        sys.stdin.read()
    finally:
        f.stop_filter()
""")


def _app(service: Service, name: str, altitude: str, log: Path, access: int = 0) -> subprocess.Popen[str]:
    script = service.base / "app.py"
    script.write_text(APP)
    p = subprocess.Popen([sys.executable, str(script), name, altitude, str(service.base / "data"), str(log),
                          str(access)], env=service.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "started", p.stderr.read() if p.stderr else ""
    return p


def test_two_processes_filters_in_altitude_order(service: Service) -> None:
    data = service.base / "data"
    (data / "f.txt").write_text("x\n")
    service.start()
    log = service.base / "events.log"
    apps: list[subprocess.Popen[str]] = []
    try:
        apps.append(_app(service, "low", "100000", log))
        apps.append(_app(service, "high", "300000", log))
        st = service.call("status")
        [directory] = [d for d in st["directories"] if d["path"] == str(data)]
        assert [(layer["kind"], layer["altitude"]) for layer in directory["layers"]] == [
            ("application", 300000.0), ("application", 100000.0)]
        assert {layer["pid"] for layer in directory["layers"]} == {apps[0].pid, apps[1].pid}
        time.sleep(6)  # idle longer than any connect timeout: the attached filters must still be there
        assert _try(f"cat {data}/f.txt") == 0
        lines = log.read_text().splitlines()
        assert lines == ["high before f.txt", "low before f.txt", "low after f.txt", "high after f.txt"], lines
        # one application dies: its layer leaves, the other goes on, nobody hangs
        apps[1].kill()
        apps[1].wait(10)
        assert wait_for(lambda: service.call("status")["applications"] == 1, 10)
        log.write_text("")
        assert _try(f"cat {data}/f.txt") == 0
        assert log.read_text().splitlines() == ["low before f.txt", "low after f.txt"]
    finally:
        end_processes(apps)
    assert wait_for(lambda: service.call("status")["applications"] == 0, 10)


def test_application_rule_overrides_default_and_default_returns(service: Service) -> None:
    from fsfilter.api import constants as c
    data = service.base / "data"
    (data / "f.txt").write_text("x\n")
    _write_rules(service, "acme", f"read-only {data}/*\n")
    service.start()
    assert _try(f"echo y >> {data}/f.txt") != 0
    log = service.base / "events.log"
    app = _app(service, "app", "360000", log, access=c.ACCESS_DELETE_PROTECT)
    try:
        assert _try(f"echo y >> {data}/f.txt") == 0  # the application's rule, not the default, governs the file
        assert _try(f"rm {data}/f.txt") != 0
        st = service.call("status")
        [directory] = [d for d in st["directories"] if d["path"] == str(data)]
        assert [layer["kind"] for layer in directory["layers"]] == ["application", "default"]
        assert app.stdin is not None
        app.stdin.close()  # the application stops its filter
        assert app.wait(20) == 0
    finally:
        end_processes([app])
    assert wait_for(lambda: service.call("status")["applications"] == 0, 10)
    assert _try(f"echo z >> {data}/f.txt") != 0  # the default is back
    assert (data / "f.txt").read_text() == "x\ny\n"


def test_a_permissive_application_filter_does_not_lift_defaults(service: Service) -> None:
    from fsfilter.api import constants as c
    data = service.base / "data"
    (data / "f.txt").write_text("x\n")
    _write_rules(service, "acme", f"read-only {data}/*\n")
    service.start()
    rule = [f"{data}/*", "", c.ACCESS_NO_CHANGE_OWNER, 0, 0, -1, -1, 0, 0]
    for spec in ({"rules": [rule], "config": {"Permissive": "true"}},):  # it enforces nothing: it lifts nothing
        channel = _control.connect(service.socket)
        assert channel is not None
        try:
            channel.send({"id": 1, "method": "attach", "params": {"handlers": [], **spec}})
            answer = channel.receive()
            assert answer is not None and "result" in answer, answer
            assert _try(f"echo y >> {data}/f.txt") != 0
        finally:
            channel.close()
    assert wait_for(lambda: service.call("status")["applications"] == 0, 10)


def test_denial_logged_with_fields_and_permissive_mode(service: Service) -> None:
    data = service.base / "data"
    (data / "f.txt").write_text("x\n")
    (data / "g.txt").write_text("x\n")
    _write_rules(service, "acme", f"read-only {data}/f.txt\n")
    _write_rules(service, "rollout", f"permissive\nread-only {data}/g.txt\n")
    service.start()
    writer = subprocess.Popen(["sh", "-c", f"echo y >> {data}/f.txt"], stderr=subprocess.DEVNULL)
    writer.wait(10)
    assert writer.returncode != 0
    assert _try(f"echo y >> {data}/g.txt") == 0  # permissive: logged, not refused
    assert (data / "g.txt").read_text() == "x\ny\n"
    assert wait_for(lambda: "denied:" in service.log.read_text(), 5)
    text = service.log.read_text()
    assert f"denied: OPEN {data}/f.txt by pid {writer.pid} (/usr/bin/dash, uid 0): rule {data}/f.txt (read-only)" \
           f" -> EACCES" in text.replace("/bin/dash", "/usr/bin/dash").replace("/usr/usr/", "/usr/"), text
    assert f"{data}/g.txt" in text and "allowed (permissive)" in text
    recent = service.call("status")["recent_denials"]
    assert {(d["path"], d["op"], d["result"]) for d in recent} >= {(f"{data}/f.txt", "OPEN", "EACCES"),
                                                                   (f"{data}/g.txt", "OPEN", "allowed (permissive)")}
    assert any(d["pid"] == writer.pid and d["uid"] == 0 and d["image"].endswith("dash") for d in recent)


def test_denials_are_rate_limited(service: Service) -> None:
    data = service.base / "data"
    (data / "f.txt").write_text("x\n")
    _write_rules(service, "acme", f"deny-all {data}/f.txt\n")
    service.start()
    _try(f"for i in $(seq 400); do cat {data}/f.txt 2>/dev/null; done")
    st = service.call("status")["counters"]
    assert st["denials"] >= 400
    assert st["denials_logged"] <= 150 and st["denials_suppressed"] >= 250
    assert service.log.read_text().count("denied:") == st["denials_logged"]


def test_status_command(service: Service) -> None:
    data = service.base / "data"
    _write_rules(service, "acme", f"read-only {data}/*\n")
    service.start()
    env = service.env
    out = subprocess.run([sys.executable, "-m", "fsfilter", "status", "--json"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["state"] == "running" and st["default_rules"]["count"] == 1
    assert {"requests", "events", "lost_events", "denials", "expired_events"} <= set(st["counters"])
    assert "fuse_passthrough" in st["kernel"]
    text = subprocess.run([sys.executable, "-m", "fsfilter", "status"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert text.returncode == 0 and str(data) in text.stdout and "default" in text.stdout
    service.stop()
    down = subprocess.run([sys.executable, "-m", "fsfilter", "status"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert down.returncode == 3 and "not running" in down.stdout


def test_add_default_rule_through_the_api(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsfilter import CBFilter
    from fsfilter.api import constants as c
    data = service.base / "data"
    (data / "f.txt").write_text("x\n")
    monkeypatch.setenv("FSFILTER_ROOT", str(service.root))
    monkeypatch.setenv("FSFILTER_SOCKET", service.socket)
    f = CBFilter()
    # no service yet: the file is written, enforced once the service starts
    assert f.add_default_rule(f"{data}/*", c.ACCESS_READ_ONLY, "{ACME-1}")
    assert not f.add_default_rule(f"{data}/*", c.ACCESS_READ_ONLY, "{ACME-1}")
    assert "read-only" in (service.rules_dir / "ACME-1.rules").read_text()
    service.start()
    assert _try(f"echo y >> {data}/f.txt") != 0
    assert f.add_default_rule(f"{data}/*", c.ACCESS_DELETE_PROTECT, "{ACME-1}")  # the running service reloads
    assert f.create_default_rules_snapshot("{ACME-1}")
    assert f.default_rule_count == 1 and f.get_default_rule_mask(0) == f"{data}/*"
    assert f.get_default_rule_access_flags(0) == c.ACCESS_READ_ONLY | c.ACCESS_DELETE_PROTECT
    f.close_default_rules_snapshot()
    assert f.delete_default_rule(f"{data}/*", "{ACME-1}")
    assert _try(f"echo y >> {data}/f.txt") == 0
    with pytest.raises(Exception) as info:
        f.add_default_rule("*.txt", c.ACCESS_READ_ONLY, "{ACME-1}")
    assert getattr(info.value, "code", None) == errno.EINVAL
    # a vendor file's rules survive an administrator's change to the same product
    vendor = service.root / "usr/lib/fsfilter/rules.d"
    vendor.mkdir(parents=True)
    (vendor / "vendor.rules").write_text(f"deny-all {data}/secret\n")
    assert f.add_default_rule(f"{data}/other", c.ACCESS_READ_ONLY, "vendor")
    assert f.create_default_rules_snapshot("vendor")
    assert sorted(f.get_default_rule_mask(i) for i in range(f.default_rule_count)) == [f"{data}/other",
                                                                                      f"{data}/secret"]


def test_install_and_uninstall_two_products(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsfilter import CBFilter, CBMonitor, CBProcess
    from fsfilter.api import constants as c
    root = scratch / "root"
    monkeypatch.setenv("FSFILTER_ROOT", str(root))
    monkeypatch.setenv("FSFILTER_SOCKET", str(scratch / "none.sock"))
    units = root / "etc/systemd/system"
    f, m, p = CBFilter(), CBMonitor(), CBProcess()
    assert f.get_driver_status("{A}") == c.MODULE_STATUS_RUNNING  # embedded: nothing to install
    assert f.install("fsfilter.cab", "{A}", None, "360000", c.INSTALL_REMOVE_OLD_VERSIONS, None) is False
    assert m.install("fsfilter.cab", "{B}", None, "360000", 0) is False
    assert (units / "fsfilterd.service").exists() and (units / "fsfilterd.socket").exists()
    assert sorted(x.name for x in (root / "var/lib/fsfilter/products").iterdir()) == ["A.json", "B.json"]
    assert p.get_driver_status("{A}") == c.MODULE_STATUS_STOPPED  # installed, service not running
    assert f.get_driver_version("{A}") >> 48 == 0 and f.get_driver_version("{A}") >> 32 & 0xFFFF == 1
    assert f.uninstall("fsfilter.cab", "{A}", None, c.UNINSTALL_VERSION_ALL) is False
    assert (units / "fsfilterd.service").exists()  # B still needs the service
    assert m.uninstall("fsfilter.cab", "{B}", None, c.UNINSTALL_VERSION_ALL) is False
    assert not (units / "fsfilterd.service").exists() and not (units / "fsfilterd.socket").exists()
    assert f.get_driver_status("{A}") == c.MODULE_STATUS_RUNNING
    with pytest.raises(Exception) as info:
        f.install("x.cab", "bad/guid", None, "360000", 0)
    assert getattr(info.value, "code", None) == errno.EINVAL


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_files_verify(tmp_path: Path) -> None:
    from fsfilter.api._deployment import unit_text
    for name, socket_unit in (("fsfilterd.service", False), ("fsfilterd.socket", True)):
        (tmp_path / name).write_text(unit_text(socket_unit).replace("@FSFILTERD@", sys.executable))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "fsfilterd.service"),
                          str(tmp_path / "fsfilterd.socket")], capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "fsfilterd" in line and "Failed to" not in line or "Unknown" in line]
    assert out.returncode == 0 or not problems, out.stdout + out.stderr
    assert not [line for line in out.stderr.splitlines() if "Unknown key" in line or "Invalid" in line], out.stderr


def test_rules_format_round_trip(tmp_path: Path) -> None:
    rules = [_rulesfiles.RuleLine("/srv/a b/*", 0x5), _rulesfiles.RuleLine("/srv/c/*.conf", 0x200)]
    path = tmp_path / "p.rules"
    _rulesfiles.write_rules(path, rules, permissive=True)
    back, permissive = _rulesfiles.parse_rules(path.read_text())
    assert permissive and [(r.mask, r.access) for r in back] == [(r.mask, r.access) for r in rules]


REPARSE_APP = textwrap.dedent("""
    import sys
    from fsfilter import CBFilter
    data = sys.argv[1]
    f = CBFilter()
    assert f.add_reparse_rule(data + "/alias.txt", data + "/real.txt", "{ACME-2}")
    f.create_reparse_rules_snapshot("{ACME-2}")
    assert f.reparse_rule_count == 1 and f.get_reparse_rule_target(0) == data + "/real.txt"
    print("kept", flush=True)
""")


def test_reparse_rules_are_kept_by_the_service_until_deleted(service: Service) -> None:
    """The SDK's driver keeps reparse rules after the application that added them exits, until they are deleted
    or the machine reboots: here fsfilterd keeps them (in /run, so across its own restart, not a reboot)."""
    data = service.base / "data"
    (data / "real.txt").write_text("real\n")
    service.start()
    script = service.base / "reparse_app.py"
    script.write_text(REPARSE_APP)
    run = subprocess.run([sys.executable, str(script), str(data)], env=service.env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "kept" in run.stdout, run.stderr
    # the program is gone; the redirect holds, for every process
    assert subprocess.run(["cat", f"{data}/alias.txt"], capture_output=True, text=True).stdout == "real\n"
    assert service.call("status")["reparse_rules"]["count"] == 1
    service.stop()
    force_unmount(data)
    service.start()  # a restart of the service (not a reboot) has them again
    assert subprocess.run(["cat", f"{data}/alias.txt"], capture_output=True, text=True).stdout == "real\n"
    assert service.call("delete_reparse_rule", {"mask": f"{data}/alias.txt", "product": "{ACME-2}"}) is True
    assert subprocess.run(["cat", f"{data}/alias.txt"], capture_output=True).returncode != 0
    assert service.call("list_reparse_rules") == []


def test_denials_reach_the_journal_with_structured_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under systemd the records go to the journal's native socket; here a socket of the test stands in for it."""
    from fsfilter.api import _denials
    journal = tmp_path / "journal.socket"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(journal))
    sink.settimeout(5)
    monkeypatch.setattr(_denials, "JOURNAL_SOCKET", str(journal))
    try:
        log = _denials.DenialLog(journal=True)
        log.record("/srv/data/a\nb.txt", 14, os.getpid(), 1000, "/srv/data/*", "read-only", True, "default rules acme")
        datagram = sink.recv(65536)
    finally:
        sink.close()
    fields: dict[bytes, bytes] = {}
    rest = datagram
    while rest:
        line, _, rest = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key] = value
        else:  # a value with a newline: KEY, newline, 64-bit little-endian length, the value, newline
            size = int.from_bytes(rest[:8], "little")
            fields[line] = rest[8:8 + size]
            rest = rest[8 + size + 1:]
    assert fields[b"FSFILTER_EVENT"] == b"denial" and fields[b"SYSLOG_IDENTIFIER"] == b"fsfilter"
    assert fields[b"FSFILTER_PATH"] == b"/srv/data/a\nb.txt" and fields[b"FSFILTER_OP"] == b"OPEN"
    assert fields[b"FSFILTER_PID"] == str(os.getpid()).encode() and fields[b"FSFILTER_UID"] == b"1000"
    assert fields[b"FSFILTER_RULE"] == b"/srv/data/*" and fields[b"FSFILTER_RESULT"] == b"EACCES"
    assert fields[b"FSFILTER_IMAGE"] == os.readlink("/proc/self/exe").encode()
    assert fields[b"PRIORITY"] == b"4" and b"denied: OPEN" in fields[b"MESSAGE"]


STOPPABLE_APP = textwrap.dedent("""
    import sys
    from fsfilter import CBFilter
    from fsfilter.api import constants as c
    f = CBFilter()
    f.config("Service=on")
    f.config("RequestTimeout=12")  # its events then expire after 2 s
    f.on_before_open_file = lambda e: None
    f.add_filter_rule(sys.argv[1] + "/*", c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN, 0)
    f.start_filter(0)  # no deadline asked for
    print("started", flush=True)
    sys.stdin.readline()
""")


def test_a_stopped_application_cannot_hold_a_shared_mount(service: Service) -> None:
    """An attached application that stops answering (SIGSTOP) with start_filter(0): its events expire below the
    mount's request timeout, rather than hold the request until the kernel aborts the service's connection."""
    data = service.base / "data"
    (data / "f.txt").write_text("x\n")
    service.start()
    script = service.base / "stoppable.py"
    script.write_text(STOPPABLE_APP)
    app = subprocess.Popen([sys.executable, str(script), str(data)], env=service.env, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout is not None and app.stdout.readline().strip() == "started"
        os.kill(app.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        done = subprocess.run(["cat", f"{data}/f.txt"], capture_output=True, text=True, timeout=30)
        took = time.monotonic() - t0
        assert done.returncode == 0 and done.stdout == "x\n"
        assert 1.5 < took < 10, took
        assert service.proc is not None and service.proc.poll() is None
    finally:
        os.kill(app.pid, signal.SIGCONT)
        end_processes([app])


def test_default_rules_hold_against_other_ways_to_the_file(service: Service) -> None:
    """A user tries other ways to reach a file a default rule protects: moving its parent directory, a symlink from
    elsewhere, a relative path from inside, a hard link. Each is refused, or reaches the file under its rule."""
    data = service.base / "data"
    sub = data / "sub"
    sub.mkdir()
    (sub / "f.txt").write_text("keep\n")
    _write_rules(service, "acme", f"read-only {sub}/*\n")
    service.start()
    os.chmod(service.base, 0o755)
    _try(f"mv {sub} {data}/moved; echo x >> {data}/moved/f.txt; echo x >> {sub}/f.txt")
    link = service.base / "elsewhere"
    link.symlink_to(sub)
    assert _try(f"echo x >> {link}/f.txt") != 0
    assert _try(f"cd {sub} && echo x >> ./f.txt") != 0
    assert _try(f"ln {sub}/f.txt {data}/alias.txt") != 0
    assert _try(f"ln -s {sub}/f.txt {data}/soft.txt && echo x >> {data}/soft.txt") != 0
    found = [p for p in data.rglob("f.txt")]
    assert [p.read_text() for p in found] == ["keep\n"], found
