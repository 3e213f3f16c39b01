"""Whole-file encryption: fsfilter.api.encryption and the encrypt-file, decrypt-file and rekey commands. No mount."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SRC

from fsfilter._crypto import fileformat as ff
from fsfilter.api import encryption

pytestmark = pytest.mark.timeout(120)
ENV = {**os.environ, "PYTHONPATH": str(SRC), "PW": "a long passphrase", "NEWPW": "another passphrase"}
FAST = 10


def fsfilter(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsfilter", *args], capture_output=True, text=True, env=ENV,
                          input=stdin, timeout=60)


def test_encrypt_and_decrypt_in_place_keep_contents_mode_and_times(tmp_path: Path) -> None:
    files = [tmp_path / "a.bin", tmp_path / "b.txt", tmp_path / "empty"]
    contents = [os.urandom(300000), b"hello\n" * 1000, b""]
    for path, data in zip(files, contents, strict=True):
        path.write_bytes(data)
        os.chmod(path, 0o640)
        os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    r = fsfilter("encrypt-file", *map(str, files), "--password-env", "PW", "--chunk-size", "4096", "-q")
    assert r.returncode == 0, r.stderr
    assert "encrypted 3 files" in r.stderr
    for path, data in zip(files, contents, strict=True):
        raw = path.read_bytes()
        assert encryption.is_encrypted(str(path)) and data[:64] not in raw[ff.HEADER_SIZE:] or not data
        assert b"".join(encryption.read_plaintext(str(path), [ff.Secret.password(ENV["PW"])])) == data
        st = path.stat()
        assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o640, 2_000_000_000)
    r = fsfilter("decrypt-file", *map(str, files), "--password-env", "PW", "-q")
    assert r.returncode == 0, r.stderr
    for path, data in zip(files, contents, strict=True):
        assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "empty"]  # no side files left


def test_wrong_password_fails_with_one_line_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"secret data")
    assert fsfilter("encrypt-file", str(path), "--password-env", "PW", "-q").returncode == 0
    before = path.read_bytes()
    r = fsfilter("decrypt-file", str(path), "--password-env", "NEWPW", "-q")
    assert r.returncode == 1 and "wrong password" in r.stderr and "Traceback" not in r.stderr
    assert path.read_bytes() == before
    r = fsfilter("encrypt-file", str(path), "--password-env", "PW", "-q")
    assert r.returncode == 1 and "encrypted already" in r.stderr


def test_rekey_rewrites_the_header_only(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(100000))
    plain = path.read_bytes()
    assert fsfilter("encrypt-file", str(path), "--password-env", "PW", "-q").returncode == 0
    body = path.read_bytes()[ff.HEADER_SIZE:]
    r = fsfilter("rekey", str(path), "--password-env", "PW", "--new-password-env", "NEWPW")
    assert r.returncode == 0, r.stderr
    assert path.read_bytes()[ff.HEADER_SIZE:] == body  # the data untouched
    with pytest.raises(Exception, match="wrong password"):
        list(encryption.read_plaintext(str(path), [ff.Secret.password(ENV["PW"])]))
    assert b"".join(encryption.read_plaintext(str(path), [ff.Secret.password(ENV["NEWPW"])])) == plain


def test_passwords_come_from_stdin_or_a_file_never_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    assert fsfilter("encrypt-file", str(path), "-q", stdin="from stdin\n").returncode == 0
    secret_file = tmp_path / "pw"
    secret_file.write_text("from stdin\n")
    assert fsfilter("decrypt-file", str(path), "--password-file", str(secret_file), "-q").returncode == 0
    assert path.read_bytes() == b"data"
    r = fsfilter("encrypt-file", str(path), "--password", "x")
    assert r.returncode == 2  # no such option: a password on the command line is readable by every user


def test_a_conversion_killed_midway_leaves_the_whole_old_file(tmp_path: Path) -> None:
    path = tmp_path / "big"
    data = os.urandom(64 << 20)
    path.write_bytes(data)
    env = {**ENV}
    for delay in (0.3, 0.6, 0.9):
        proc = subprocess.Popen([sys.executable, "-m", "fsfilter", "encrypt-file", str(path), "--password-env", "PW",
                                 "-q"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        raw = path.read_bytes()
        if encryption.is_encrypted(str(path)):  # finished before the kill: the whole new file
            assert b"".join(encryption.read_plaintext(str(path), [ff.Secret.password(ENV["PW"])])) == data
            encryption.decrypt_file(str(path), [ff.Secret.password(ENV["PW"])])
        else:
            assert raw == data


def test_a_password_change_torn_by_a_crash_is_finished_before_use(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10000)
    old, new = ff.Secret.password("old one"), ff.Secret.password("new one")
    encryption.encrypt_file(str(path), [old], log2_n=FAST)
    header = encryption.file_header(str(path))
    header.unlock(old)
    header.replace_slots(ff.KIND_PASSWORD, new, FAST)
    (tmp_path / "f.fsfilter-header").write_bytes(header.encode())  # the side copy was written ...
    raw = bytearray(path.read_bytes())
    raw[100:2000] = header.encode()[100:2000]  # ... and the header in the file half overwritten when it crashed
    path.write_bytes(bytes(raw))
    assert b"".join(encryption.read_plaintext(str(path), [new])) == b"x" * 10000  # repaired first
    assert not (tmp_path / "f.fsfilter-header").exists()
