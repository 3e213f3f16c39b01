"""CBEncrypt on a real mount: trusted processes read and write plaintext, everyone else the file as stored, at the
same time; new files are encrypted from their first byte; damage gives errors, never garbage."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import SRC, end_processes, force_unmount, is_mounted, needs_root, wait_for

from fsfilter._crypto import fileformat as ff
from fsfilter.api import encryption
from fsfilter.api.cbencrypt import CBEncrypt

pytestmark = [needs_root, pytest.mark.timeout(180)]
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]), "PYTHONDONTWRITEBYTECODE": "1"}
PASSWORD = "correct horse"


@pytest.fixture
def encrypted(scratch: Path) -> Iterator[Callable[..., CBEncrypt]]:
    made: list[CBEncrypt] = []

    def make(trusted: str = "python3*", **settings: str) -> CBEncrypt:
        e = CBEncrypt()
        e.config("ScryptLog2N=10")  # fast for tests; the parameters travel in each file
        e.config(f"JournalDirectory={scratch / 'journal'}")
        for name, value in settings.items():
            e.config(f"{name}={value}")
        e.add_encrypt_rule(f"{scratch / 'data'}/*", PASSWORD)
        e.add_trusted_process(trusted)
        e.start_filter()
        made.append(e)
        return e
    (scratch / "data").mkdir()
    yield make
    for e in made:
        e.stop_filter()


def trusted(code: str, *args: str) -> str:
    """Python (trusted: python3*) running ``code``."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 0, out.stderr
    return out.stdout


def untrusted(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), capture_output=True, timeout=60)


def plaintext_on_disk(path: Path) -> bytes:
    return b"".join(encryption.read_plaintext(str(path), [ff.Secret.password(PASSWORD)]))


def test_trusted_plaintext_and_untrusted_ciphertext_at_once(scratch: Path,
                                                           encrypted: Callable[..., CBEncrypt]) -> None:
    encrypted()
    data = scratch / "data"
    text = b"the plaintext a trusted process wrote\n" * 3000
    trusted(f"open({str(data / 'doc.txt')!r}, 'wb').write({text!r})")
    stored = (data / "doc.txt").read_bytes()  # (this test process is the filter's own: it sees what is stored)
    assert stored.startswith(ff.MAGIC) and text[:40] not in stored  # encrypted from the first byte
    assert plaintext_on_disk(data / "doc.txt") == text
    # the trusted process: plaintext, plaintext sizes in stat and listings, mmap
    out = json.loads(trusted(
        "import json, mmap, os, sys, hashlib\np = sys.argv[1]\nf = open(p, 'rb')\nm = mmap.mmap(f.fileno(), 0, "
        "prot=mmap.PROT_READ)\nprint(json.dumps([hashlib.sha1(f.read()).hexdigest(), hashlib.sha1(m[:]).hexdigest(),"
        " os.stat(p).st_size, {e.name: e.stat().st_size for e in os.scandir(os.path.dirname(p))}]))",
        str(data / "doc.txt")))
    digest = hashlib.sha1(text).hexdigest()
    assert out == [digest, digest, len(text), {"doc.txt": len(text)}]
    # an untrusted process: the file exactly as stored, and its size; writing into it is refused
    assert untrusted("cat", str(data / "doc.txt")).stdout == stored
    assert untrusted("stat", "-c", "%s", str(data / "doc.txt")).stdout.strip() == str(len(stored)).encode()
    refused = untrusted("sh", "-c", f"echo x >> {data / 'doc.txt'}")
    assert refused.returncode != 0 and b"Permission denied" in refused.stderr
    assert (data / "doc.txt").read_bytes() == stored


def test_random_operations_through_a_trusted_process_match_a_model(scratch: Path,
                                                                   encrypted: Callable[..., CBEncrypt]) -> None:
    """The isolation tests' worker (read, write, mmap shared and private, truncate, stat, listing, reopen) as a
    trusted process on an encrypted file: every result matches the plaintext model, and so does the file on disk."""
    encrypted()
    target = scratch / "data" / "model.bin"
    start = os.urandom(30000)
    trusted(f"open({str(target)!r}, 'wb').write({start!r})")
    steps = int(os.environ.get("ENC_STEPS", 3000))
    proc = subprocess.Popen([sys.executable, str(TESTS / "viewops.py"), str(target), "7", str(steps)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        out, err = proc.communicate("go\n", timeout=170)
    finally:
        end_processes([proc])
    result = json.loads(out or "{}")
    assert result.get("ok"), result.get("message") or err[-2000:]
    assert hashlib.sha1(plaintext_on_disk(target)).hexdigest() == result["model_sha1"]


def test_untrusted_writes_may_be_allowed(scratch: Path, encrypted: Callable[..., CBEncrypt]) -> None:
    encrypted(RefuseUntrustedWrites="false")
    data = scratch / "data"
    trusted(f"open({str(data / 'f')!r}, 'wb').write(b'secret')")
    assert untrusted("sh", "-c", f"printf x >> {data / 'f'}").returncode == 0  # (it corrupts the file: allowed)


def test_wrong_password_and_damage_give_errors_never_garbage(scratch: Path,
                                                            encrypted: Callable[..., CBEncrypt]) -> None:
    data = scratch / "data"
    data.mkdir(exist_ok=True)
    good = data / "good"
    good.write_bytes(b"x" * 100000)
    encryption.encrypt_file(str(good), [ff.Secret.password(PASSWORD)], chunk_shift=12, log2_n=10)
    other = data / "other-password"
    other.write_bytes(b"y" * 1000)
    encryption.encrypt_file(str(other), [ff.Secret.password("not the rule's")], chunk_shift=12, log2_n=10)
    raw = bytearray(good.read_bytes())
    raw[ff.HEADER_SIZE + 3 * (4096 + 28) + 50] ^= 1  # one bit of chunk 3
    (data / "damaged").write_bytes(bytes(raw))
    (data / "cut").write_bytes(bytes(good.read_bytes()[:ff.HEADER_SIZE + 2 * (4096 + 28)]))  # at a chunk boundary
    e = encrypted()
    errors: list[str] = []
    e.on_error = lambda p: errors.append(p.description)
    probe = ("import sys\ntry:\n data = open(sys.argv[1], 'rb').read()\n print('read', len(data), data[:1])\n"
             "except OSError as exc:\n print('error', exc.errno)")
    assert trusted(probe, str(good)).strip() == "read 100000 b'x'"
    assert trusted(probe, str(other)).strip() == "error 13"
    assert any("other-password" in m for m in errors)
    assert trusted(probe, str(data / "damaged")).strip() == "error 5"  # EIO: chunk 3 never reaches the reader
    assert any("damaged" in m and "chunk 3" in m for m in errors), errors  # on_error names the file and chunk
    assert trusted(probe, str(data / "cut")).strip() == "error 5"  # cut at a chunk boundary: detected


def test_encrypt_and_decrypt_files_while_running(scratch: Path, encrypted: Callable[..., CBEncrypt]) -> None:
    e = encrypted()
    data = scratch / "data"
    (data / "old.txt").write_bytes(b"was plain\n")  # (this process is the filter's own: written as it is)
    e.encrypt_file(str(data / "old.txt"))
    assert trusted("import sys; print(open(sys.argv[1]).read(), end='')", str(data / "old.txt")) == "was plain\n"
    assert untrusted("head", "-c", "6", str(data / "old.txt")).stdout == b"FSFENC"
    assert e.get_file_header(str(data / "old.txt"))["slots"] == [ff.KIND_PASSWORD]
    e.decrypt_file(str(data / "old.txt"))
    assert untrusted("cat", str(data / "old.txt")).stdout == b"was plain\n"


def test_children_of_a_trusted_process_when_asked(scratch: Path, encrypted: Callable[..., CBEncrypt]) -> None:
    e = encrypted(trusted="nothing-matches")
    e.add_trusted_process(os.getpid(), include_children=True)  # this test process and what it starts
    data = scratch / "data"
    trusted(f"open({str(data / 'k')!r}, 'wb').write(b'child writes plaintext')")
    assert untrusted("cat", str(data / "k")).stdout == b"child writes plaintext"  # cat is our child: trusted
    assert (data / "k").read_bytes().startswith(ff.MAGIC)



FILTER = r"""
import sys, time
from fsfilter.api.cbencrypt import CBEncrypt
e = CBEncrypt()
e.config("ScryptLog2N=10")
e.config("JournalDirectory=" + sys.argv[2])
e.add_encrypt_rule(sys.argv[1] + "/*", "correct horse")
e.add_trusted_process("python3*")
e.start_filter()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(300)
def test_the_filter_killed_during_writes_loses_nothing_an_fsync_made_durable(scratch: Path) -> None:
    """A trusted writer appends, overwrites, truncates and fsyncs through the filter; the filter's process is killed
    (SIGKILL) at a random moment, then the writer. The next CBEncrypt repairs what the kill tore from the file's
    journal when the file is first opened: it opens whole, and every byte the last completed fsync made durable and
    no later write touched is there."""
    from test_encrypted_file import WRITER, drained

    data, journal = scratch / "data", scratch / "journal"
    data.mkdir()
    target = data / "f"
    env = {**ENV, "FSFILTER_RESCUE": "0"}  # the dead filter's mount just goes (no rescuer to hold it)
    rng = random.Random(99)
    rounds = int(os.environ.get("FILTER_KILLS", 8))
    writer_code = WRITER.replace("from fsfilter._layers.encrypted_file import ChunkJournal, EncryptedFile, "
                                 "journal_path\n", "")
    # Through the mount: the same random operations, on the file as a trusted process sees it.
    writer_code = writer_code.replace(
        'header = ff.Header.decode(open(path, "rb").read(ff.HEADER_SIZE))\n'
        'header.unlock(ff.Secret.password("test password"))\n'
        'fd = os.open(path, os.O_RDWR)\n'
        'f = EncryptedFile(fd, header, None if os.environ.get("NOJOURNAL") else ChunkJournal(journal_path(path)))\n',
        "class Plain:\n"
        "    def __init__(self, fd): self.fd = fd\n"
        "    def read(self, n, at): return os.pread(self.fd, n, at)\n"
        "    def write(self, d, at): return os.pwrite(self.fd, d, at)\n"
        "    def truncate(self, n): os.ftruncate(self.fd, n)\n"
        "    def fsync(self, _): os.fsync(self.fd)\n"
        "f = Plain(os.open(path, os.O_RDWR | os.O_CREAT))\n")
    assert "Plain(" in writer_code
    for round_ in range(rounds):
        filt = subprocess.Popen([sys.executable, "-c", FILTER, str(data), str(journal)], stdout=subprocess.PIPE,
                                text=True, env=env)
        writer = None
        try:
            assert filt.stdout is not None and filt.stdout.readline().strip() == "ready"
            durable = bytearray(bytes.fromhex(trusted(
                "import os, sys\np = sys.argv[1]\nprint(open(p, 'rb').read().hex() if os.path.exists(p) else '')",
                str(target)).strip()))
            read_end, write_end = os.pipe()
            writer = subprocess.Popen([sys.executable, "-c", writer_code, str(target), str(round_), "16", str(SRC),
                                       str(write_end), "0"], pass_fds=(write_end,), env=env,
                                      stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            os.close(write_end)
            lines, drain = drained(read_end)
            time.sleep(rng.uniform(0.6, 1.6))  # (the writer takes ~0.4 s to start)
            filt.send_signal(signal.SIGKILL)
            filt.wait(30)
        finally:
            if writer is not None:
                writer.kill()
                writer.wait(30)
            end_processes([filt])
        wait_for(lambda: not is_mounted(data), 10)
        force_unmount(data)
        journaled = [p for p in journal.iterdir() if p.stat().st_size] if journal.exists() else []
        if os.environ.get("FILTER_KILLS_VERBOSE"):
            print(f"round {round_}: journals left by the kill: {len(journaled)} "
                  f"{sorted(journal.iterdir()) if journal.exists() else None}", flush=True)
        touched: list[tuple[int, int]] = []
        drain.join(30)
        for line in lines:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                break
            if "durable" in item:
                durable, touched = bytearray.fromhex(item["durable"]), []
            else:
                touched.append(tuple(item["touch"]))
        if os.environ.get("FILTER_KILLS_VERBOSE"):
            print(f"  durable {len(durable)} bytes, {len(touched)} touches since", flush=True)
        e = CBEncrypt()
        e.config("ScryptLog2N=10")
        e.config(f"JournalDirectory={journal}")
        e.add_encrypt_rule(f"{data}/*", PASSWORD)
        e.add_trusted_process("python3*")
        e.start_filter()
        try:
            got = bytes.fromhex(trusted(
                "import os, sys\np = sys.argv[1]\nprint(open(p, 'rb').read().hex() if os.path.exists(p) else '')",
                str(target)).strip())
        finally:
            e.stop_filter()
        for pos in range(0, len(durable), 509):
            if not any(lo <= pos < hi for lo, hi in touched):
                assert pos < len(got) and got[pos] == durable[pos], (round_, pos, touched)


def test_attacks_found_in_review(scratch: Path, encrypted: Callable[..., CBEncrypt]) -> None:
    """What an attacker's review found, each refused: trust kept across an exec; truncate by name from an untrusted
    process; a plain file made with mknod by a trusted program; an empty plain file planted for a trusted program
    to fill; a header damaged past its magic."""
    e = encrypted()
    data = scratch / "data"
    trusted(f"open({str(data / 'secret')!r}, 'wb').write(b'TOPSECRET' * 100)")
    # a trusted python that execs cat: cat is judged as cat
    after_exec = subprocess.run([sys.executable, "-c", f"import os; open({str(data / 'secret')!r}, 'rb').read(1); "
                                 f"os.execv('/bin/cat', ['cat', {str(data / 'secret')!r}])"],
                                capture_output=True, env=ENV, timeout=60).stdout
    assert after_exec.startswith(b"FSFENC"), after_exec[:20]
    refused = untrusted("truncate", "-s", "100", str(data / "secret"))
    assert refused.returncode != 0 and (data / "secret").stat().st_size > 4096
    made = trusted(f"import os, stat\ntry:\n os.mknod({str(data / 'plain-by-mknod')!r}, stat.S_IFREG | 0o644)\n"
                   "except OSError as exc:\n print(exc.errno)")
    assert made.strip() == "13"
    (data / "planted").write_bytes(b"")  # an empty plain file, waiting (this process is the filter's own)
    trusted(f"open({str(data / 'planted')!r}, 'r+b').write(b'saved by the trusted program')")
    assert (data / "planted").read_bytes().startswith(ff.MAGIC)
    damaged = bytearray((data / "secret").read_bytes())
    damaged[3000] ^= 0xFF  # inside the header (its padding), past the magic
    (data / "damaged").write_bytes(bytes(damaged))
    probe = ("import sys\ntry:\n print(open(sys.argv[1], 'rb').read()[:4])\nexcept OSError as exc:\n"
             " print('error', exc.errno)")
    assert trusted(probe, str(data / "damaged")).strip() == "error 5"
    assert e.active


def test_a_process_name_is_not_a_credential(scratch: Path, encrypted: Callable[..., CBEncrypt]) -> None:
    """Trust goes by the executable (its path, or its file name), never by the process name, which any process sets
    for itself (prctl PR_SET_NAME, /proc/self/comm)."""
    encrypted(trusted="trustedprog")
    secret = scratch / "data" / "s"
    secret.write_bytes(b"TOPSECRET" * 10)
    encryption.encrypt_file(str(secret), [ff.Secret.password(PASSWORD)], log2_n=10)
    code = ("import ctypes, sys\nctypes.CDLL(None).prctl(15, b'trustedprog', 0, 0, 0)\n"
            "print(open('/proc/self/comm').read().strip(), open(sys.argv[1], 'rb').read(6))")
    out = trusted(code, str(secret))  # (python3 is not trusted here)
    assert out.split() == ["trustedprog", repr(b"FSFENC")]


def test_an_untrusted_process_cannot_move_an_encrypted_file_out_of_its_rule(scratch: Path) -> None:
    data = scratch / "data"
    (data / "enc1").mkdir(parents=True)
    (data / "out").mkdir()
    e = CBEncrypt()
    e.config("ScryptLog2N=10")
    e.config(f"JournalDirectory={scratch / 'journal'}")
    e.add_encrypt_rule(f"{data}/enc*/*", PASSWORD)  # one mount over data; data/out is in it, outside the rule
    e.add_trusted_process("python3*")
    e.start_filter()
    try:
        trusted(f"open({str(data / 'enc1' / 'f')!r}, 'wb').write(b'secret')")
        for argv in (["mv", str(data / "enc1" / "f"), str(data / "out" / "f")],
                     ["ln", str(data / "enc1" / "f"), str(data / "out" / "g")]):
            r = untrusted(*argv)
            assert r.returncode != 0 and b"Permission denied" in r.stderr, (argv, r)
        assert not (data / "out" / "f").exists() and not (data / "out" / "g").exists()
        trusted(f"import os; os.rename({str(data / 'enc1' / 'f')!r}, {str(data / 'out' / 'f')!r})")  # trusted may
    finally:
        e.stop_filter()
