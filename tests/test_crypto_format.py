"""The encrypted file format (docs/file-format.md) alone: the frozen files of every version still decrypt, random
contents round-trip, and every kind of damage is reported (never garbage plaintext). No mount, no root."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsfilter._crypto import fileformat as ff

FROZEN = Path(__file__).resolve().parent / "data" / "crypto"
INDEX = json.loads((FROZEN / "frozen.json").read_text())
SECRETS = INDEX["_secrets"]
GLOBAL_SALT = bytes.fromhex(SECRETS["global_salt_hex"])
PASSWORD = ff.Secret.password(SECRETS["password"], GLOBAL_SALT)
MACHINE = ff.Secret.key(bytes.fromhex(SECRETS["machine_key_hex"]), ff.KIND_MACHINE)
RECOVERY = ff.Secret.key(bytes.fromhex(SECRETS["recovery_key_hex"]), ff.KIND_RECOVERY)
FAST = 10  # scrypt log2(N) for tests: the parameters travel in the slot


def decrypt(raw: bytes, secret: ff.Secret) -> bytes:
    header = ff.Header.decode(raw[:ff.HEADER_SIZE])
    header.unlock(secret)
    return ff.ChunkCipher(header).decrypt(raw[ff.HEADER_SIZE:])


def encrypt(data: bytes, secret: ff.Secret = PASSWORD, shift: int = 12, algorithm: int = ff.AES_256_GCM
            ) -> tuple[bytes, ff.Header]:
    header = ff.new_header([secret], algorithm, shift, log2_n=FAST)
    return header.encode() + b"".join(ff.ChunkCipher(header).encrypt(data)), header


@pytest.mark.parametrize("name", sorted(k for k in INDEX if not k.startswith("_")))
def test_frozen_files_decrypt_forever(name: str) -> None:
    raw = (FROZEN / f"{name}.fse").read_bytes()
    meta = INDEX[name]
    for kind in meta["slots"]:
        secret = {"password": PASSWORD, "machine": MACHINE, "recovery": RECOVERY}[kind]
        plain = decrypt(raw, secret)
        assert len(plain) == meta["plaintext_size"]
        assert hashlib.sha256(plain).hexdigest() == meta["plaintext_sha256"]
    header = ff.Header.decode(raw)
    assert (header.algorithm, header.chunk_shift) == (meta["algorithm"], meta["chunk_shift"])
    assert len(raw) == ff.stored_size(meta["plaintext_size"], header.chunk_size)


def test_wrong_password_and_wrong_global_salt_are_wrong_keys() -> None:
    raw = (FROZEN / "v1-three-slots.fse").read_bytes()
    for secret in (ff.Secret.password("wrong", GLOBAL_SALT), ff.Secret.password(SECRETS["password"]),
                   ff.Secret.key(os.urandom(32))):
        with pytest.raises(ff.WrongKey):
            ff.Header.decode(raw).unlock(secret)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=20000), shift=st.sampled_from([12, 13]),
       algorithm=st.sampled_from([ff.AES_256_GCM, ff.CHACHA20_POLY1305]))
def test_random_contents_round_trip(data: bytes, shift: int, algorithm: int) -> None:
    raw, header = encrypt(data, shift=shift, algorithm=algorithm)
    assert len(raw) == ff.stored_size(len(data), header.chunk_size)
    assert ff.plain_size(len(raw), header.chunk_size) == len(data)
    assert decrypt(raw, PASSWORD) == data


def test_sizes_map_both_ways_and_impossible_sizes_are_corrupt() -> None:
    c = 4096
    for plain in (0, 1, c - 1, c, c + 1, 5 * c, 5 * c + 7):
        assert ff.plain_size(ff.stored_size(plain, c), c) == plain
    for stored in (ff.HEADER_SIZE, ff.HEADER_SIZE + 27, ff.stored_size(c, c) + 5):
        with pytest.raises(ff.CorruptChunk):
            ff.plain_size(stored, c)


def test_cut_swapped_moved_and_flipped_chunks_never_decrypt() -> None:
    data = os.urandom(3 * 4096 + 10)
    raw, header = encrypt(data)
    size = header.chunk_size + ff.CHUNK_OVERHEAD
    chunks = [raw[ff.HEADER_SIZE + i * size:ff.HEADER_SIZE + (i + 1) * size] for i in range(4)]
    head = raw[:ff.HEADER_SIZE]
    damaged = {
        "cut at a chunk boundary": head + b"".join(chunks[:3]),
        "cut inside a chunk": raw[:-5],
        "two chunks swapped": head + chunks[1] + chunks[0] + chunks[2] + chunks[3],
        "a bit flipped": raw[:ff.HEADER_SIZE + 100] + bytes([raw[ff.HEADER_SIZE + 100] ^ 1]) + raw[
            ff.HEADER_SIZE + 101:],
        "a chunk zeroed (no holes)": head + chunks[0] + bytes(size) + chunks[2] + chunks[3],
    }
    other, _ = encrypt(data)  # another file's chunk in its place: a different file id
    damaged["a chunk from another file"] = head + other[ff.HEADER_SIZE:ff.HEADER_SIZE + size] + b"".join(chunks[1:])
    for what, bad in damaged.items():
        with pytest.raises(ff.CorruptChunk):
            decrypt(bad, PASSWORD)
            pytest.fail(what)


def test_an_empty_file_cut_to_its_header_is_corrupt() -> None:
    raw, _ = encrypt(b"")
    assert decrypt(raw, PASSWORD) == b""
    with pytest.raises(ff.CorruptChunk):
        decrypt(raw[:ff.HEADER_SIZE], PASSWORD)


def test_a_tampered_header_is_refused() -> None:
    raw = (FROZEN / "v1-three-slots.fse").read_bytes()
    header = bytearray(raw[:ff.HEADER_SIZE])
    # Drop the machine-key slot by rewriting the slot count: the slot bytes past it make the header invalid, and
    # zeroing them changes the MAC'd bytes.
    header[32] = 2
    header[40 + 2 * 128:40 + 3 * 128] = bytes(128)
    with pytest.raises(ff.TamperedHeader):
        ff.Header.decode(bytes(header)).unlock(PASSWORD)
    # A slot moved to another file does not open there.
    victim, _ = encrypt(b"secret", ff.Secret.password("other"))
    grafted = bytearray(victim[:ff.HEADER_SIZE])
    grafted[40:40 + 128] = raw[40:40 + 128]
    with pytest.raises(ff.WrongKey):
        ff.Header.decode(bytes(grafted)).unlock(PASSWORD)


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(min_size=0, max_size=ff.HEADER_SIZE + 64), at=st.integers(0, 1100), value=st.integers(0, 255))
def test_fuzzed_headers_fail_cleanly(junk: bytes, at: int, value: int) -> None:
    raw = bytearray((FROZEN / "v1-empty.fse").read_bytes())
    raw[at] = value
    for candidate in (bytes(junk), bytes(raw)):
        try:
            header = ff.Header.decode(candidate)
            header.unlock(PASSWORD)
            ff.ChunkCipher(header).decrypt(candidate[ff.HEADER_SIZE:])
        except ff.FormatError:
            pass  # what every failure must be


def test_password_change_rewrites_the_header_only() -> None:
    data = os.urandom(10000)
    raw, header = encrypt(data)
    header.replace_slots(ff.KIND_PASSWORD, ff.Secret.password("new password"), FAST)
    rewritten = header.encode() + raw[ff.HEADER_SIZE:]
    assert decrypt(rewritten, ff.Secret.password("new password")) == data
    with pytest.raises(ff.WrongKey):
        decrypt(rewritten, PASSWORD)
    assert struct.unpack_from("<H", rewritten, 8)[0] == ff.VERSION
