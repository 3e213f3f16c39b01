"""The plaintext of an encrypted file as a file backend (fsfilter._layers.encrypted_file), on plain files: random
operations against a model, and writers killed at random points, after which every byte an fsync made durable is
still there and the file never fails to open. No mount, no root."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsfilter._crypto import fileformat as ff
from fsfilter._layers.encrypted_file import ChunkJournal, EncryptedFile, journal_path, recover

SRC = Path(__file__).resolve().parent.parent / "src"
PASSWORD = ff.Secret.password("test password")


def new_file(path: Path, shift: int = 12) -> ff.Header:
    header = ff.new_header([PASSWORD], ff.AES_256_GCM, shift, log2_n=10)
    path.write_bytes(header.encode() + b"".join(ff.ChunkCipher(header).encrypt(b"")))
    return header


def whole(path: Path) -> bytes:
    raw = path.read_bytes()
    header = ff.Header.decode(raw)
    header.unlock(PASSWORD)
    return ff.ChunkCipher(header).decrypt(raw[ff.HEADER_SIZE:])


OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 40000), st.binary(min_size=1, max_size=9000)),
    st.tuples(st.just("truncate"), st.integers(0, 40000), st.just(b"")),
    st.tuples(st.just("read"), st.integers(0, 45000), st.integers(0, 20000)),
), max_size=40)


@settings(max_examples=80, deadline=None)
@given(ops=OPS)
def test_random_operations_match_a_plain_model(tmp_path_factory: pytest.TempPathFactory,
                                               ops: list[tuple[str, int, object]]) -> None:
    path = tmp_path_factory.mktemp("enc") / "f.fse"
    header = new_file(path)
    fd = os.open(path, os.O_RDWR)
    try:
        f = EncryptedFile(fd, header, ChunkJournal(journal_path(str(path))))
        model = bytearray()
        for kind, at, arg in ops:
            if kind == "write":
                assert isinstance(arg, bytes)
                f.write(arg, at)
                if at > len(model):
                    model.extend(bytes(at - len(model)))
                model[at:at + len(arg)] = arg
            elif kind == "truncate":
                f.truncate(at)
                del model[at:]
                model.extend(bytes(at - len(model)))
            else:
                assert isinstance(arg, int)
                assert f.read(arg, at) == bytes(model[at:at + arg])
            assert f.size() == len(model)
        assert whole(path) == bytes(model)  # every chunk opens, the last one marked last
        f.fsync(False)
    finally:
        os.close(fd)



def drained(fd: int) -> tuple[list[str], threading.Thread]:
    """The lines a child writes to ``fd``, read as they come (a full pipe would stop the child at its reports)."""
    lines: list[str] = []

    def read() -> None:
        with os.fdopen(fd) as f:
            lines.extend(f)
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return lines, thread


WRITER = r"""
import json, os, random, sys
sys.path.insert(0, sys.argv[4])
from fsfilter._crypto import fileformat as ff
from fsfilter._layers.encrypted_file import ChunkJournal, EncryptedFile, journal_path
path, seed, shift = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
header = ff.Header.decode(open(path, "rb").read(ff.HEADER_SIZE))
header.unlock(ff.Secret.password("test password"))
fd = os.open(path, os.O_RDWR)
f = EncryptedFile(fd, header, None if os.environ.get("NOJOURNAL") else ChunkJournal(journal_path(path)))
rng = random.Random(seed)
if int(sys.argv[6]):
    # A torn write, as a power cut makes one: one write of the file's chunks stops at a random byte, and the
    # process dies there.
    real_pwrite = os.pwrite
    def pwrite(target, data, offset):
        if target == fd and len(data) > 1 and rng.random() < 0.15:
            real_pwrite(target, data[:rng.randrange(1, len(data))], offset)
            os.kill(os.getpid(), 9)
        return real_pwrite(target, data, offset)
    os.pwrite = pwrite
model = bytearray(f.read(1 << 30, 0))
report = os.fdopen(int(sys.argv[5]), "w", buffering=1)
touched = []
while True:
    kind = rng.choices(["write", "truncate", "fsync"], [8, 1, 2])[0]
    if kind == "fsync":
        f.fsync(False)
        touched = []
        report.write(json.dumps({"durable": model.hex()}) + "\n")
        continue
    if kind == "write":
        at, data = rng.randrange(0, 300000), rng.randbytes(rng.randrange(1, 200000))
        lo, hi = min(at, len(model)), at + len(data)
    else:
        at, data = rng.randrange(0, 300000), b""
        lo, hi = min(at, len(model)), max(at, len(model))
    report.write(json.dumps({"touch": [lo, hi]}) + "\n")  # before: the parent may kill us any time after
    if kind == "write":
        f.write(data, at)
        model.extend(bytes(max(0, at - len(model))))
        model[at:at + len(data)] = data
    else:
        f.truncate(at)
        del model[at:]
        model.extend(bytes(at - len(model)))
"""


@pytest.mark.timeout(300)
def test_a_writer_killed_at_random_points_loses_nothing_an_fsync_made_durable(tmp_path: Path) -> None:
    """100 kills of a writer, at random moments, and half of them inside a write of chunks (which stops at a random
    byte, as a power cut would make it): afterwards the file always opens whole after recover(), and every byte that
    the last completed fsync made durable and that no later write or truncate touched is still there. (Without the
    journal, NOJOURNAL=1, the torn writes make it fail.)"""
    rng = random.Random(1234)
    kills = int(os.environ.get("KILLS", 100))
    for round_ in range(kills):
        path = tmp_path / f"f{round_ % 3}.fse"
        shift = rng.choice([12, 16])
        if not path.exists() or round_ % 10 == 0:
            new_file(path, shift)
        header = ff.Header.decode(path.read_bytes()[:ff.HEADER_SIZE])
        header.unlock(PASSWORD)
        try:
            durable = bytearray(whole(path))
        except ff.CorruptChunk:
            assert os.environ.get("NOJOURNAL"), "a file was left that does not open"
            raise
        read_end, write_end = os.pipe()
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(round_), str(header.chunk_shift),
                                  str(SRC), str(write_end), str(int(round_ % 2 == 0))], pass_fds=(write_end,),
                                 stdin=subprocess.DEVNULL)
        os.close(write_end)
        lines, drain = drained(read_end)
        try:
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        touched: list[tuple[int, int]] = []
        drain.join(30)
        for line in lines:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                break  # the last line, cut by the kill
            if "durable" in item:
                durable, touched = bytearray.fromhex(item["durable"]), []
            else:
                touched.append(tuple(item["touch"]))
        fd = os.open(path, os.O_RDWR)
        try:
            recover(fd, header, journal_path(str(path)))
        finally:
            os.close(fd)
        got = whole(path)  # never fails: no torn chunk survives recovery
        for pos in range(0, len(durable), 509):  # sampled, with a stride that crosses chunk boundaries
            if not any(lo <= pos < hi for lo, hi in touched):
                assert pos < len(got) and got[pos] == durable[pos], (round_, pos, touched)
