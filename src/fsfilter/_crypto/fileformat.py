"""The encrypted file format, version 1 (docs/file-format.md): the header with its key slots, and the chunks.

A file's data key is random and its own; slots wrap it under a key derived from a password (scrypt), a machine key
or a recovery key (HKDF). Chunks are sealed with the data key and bound to the file, their index and whether they
are the last one. Every failure is a FormatError subclass naming what failed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = [
    "AES_256_GCM", "CHACHA20_POLY1305", "CHUNK_OVERHEAD", "HEADER_SIZE", "KIND_MACHINE", "KIND_PASSWORD",
    "KIND_RECOVERY", "MAGIC", "VERSION", "BadHeader", "ChunkCipher", "CorruptChunk", "FormatError", "Header",
    "KeySlot", "Secret", "TamperedHeader", "WrongKey", "chunk_offset", "new_header", "plain_size", "stored_size",
]

MAGIC = b"FSFENC\r\n"
VERSION = 1
HEADER_SIZE = 4096
AES_256_GCM = 1
CHACHA20_POLY1305 = 2
ALGORITHMS = (AES_256_GCM, CHACHA20_POLY1305)
MIN_SHIFT, MAX_SHIFT, DEFAULT_SHIFT = 12, 20, 16
NONCE = 12
TAG = 16
CHUNK_OVERHEAD = NONCE + TAG
KEY = 32
MAX_SLOTS = 8
SLOT_SIZE = 128
KIND_EMPTY, KIND_PASSWORD, KIND_MACHINE, KIND_RECOVERY = 0, 1, 2, 3
KDF_SCRYPT, KDF_HKDF = 1, 2
# scrypt: 32 MiB and about 0.1 s here; travels in each slot, so new slots may use more without breaking old files.
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 15, 8, 1

_FIXED = struct.Struct("<8sHBBI16sB7x")  # magic, version, algorithm, chunk shift, flags, file id, slot count
_SLOT = struct.Struct("<BBBBB3x16s16s12s48s28x")  # kind, kdf, log2 N, r, p, salt, key id, nonce, wrapped key
_SLOTS_AT = 40
_MAC_AT = _SLOTS_AT + MAX_SLOTS * SLOT_SIZE  # 1064
_MAC_INFO = b"fsfilter header mac v1"
_SLOT_INFO = b"fsfilter key slot v1"
_PASSWORD_SALT = b"fsfilter password v1"
_CHUNK_AAD = struct.Struct(">4s16sQB")


class FormatError(ValueError):
    """The file cannot be read as this format says: the subclass says why."""


class BadHeader(FormatError):
    """Not an encrypted file of a version this code knows, or a header with impossible fields."""


class WrongKey(FormatError):
    """No key slot opens with the password or key given."""


class TamperedHeader(FormatError):
    """A slot opened, but the header's MAC fails: the header was changed."""


class CorruptChunk(FormatError):
    """A chunk fails to open (corrupt, moved, swapped, cut short or from another file), or the stored size is one
    no plaintext gives."""

    def __init__(self, index: int, why: str) -> None:
        super().__init__(f"chunk {index}: {why}")
        self.index = index


@dataclass(frozen=True)
class Secret:
    """What opens a slot: a password (kind KIND_PASSWORD, with the application's global salt), or a 32-byte machine
    or recovery key."""

    kind: int
    value: bytes
    global_salt: bytes = bytes(16)

    @classmethod
    def password(cls, password: str | bytes, global_salt: bytes = bytes(16)) -> Secret:
        raw = password.encode() if isinstance(password, str) else password
        if not raw:
            raise ValueError("an empty password protects nothing")
        if len(global_salt) != 16:
            raise ValueError("the global salt is 16 bytes")
        return cls(KIND_PASSWORD, raw, global_salt)

    @classmethod
    def key(cls, key: bytes, kind: int = KIND_MACHINE) -> Secret:
        if len(key) != KEY or kind not in (KIND_MACHINE, KIND_RECOVERY):
            raise ValueError("a machine or recovery key is 32 bytes")
        return cls(kind, key)

    @property
    def key_id(self) -> bytes:
        return bytes(16) if self.kind == KIND_PASSWORD else hashlib.sha256(self.value).digest()[:16]


@dataclass
class KeySlot:
    kind: int
    kdf: int
    log2_n: int
    r: int
    p: int
    salt: bytes
    key_id: bytes
    nonce: bytes
    wrapped: bytes

    def encode(self) -> bytes:
        return _SLOT.pack(self.kind, self.kdf, self.log2_n, self.r, self.p, self.salt, self.key_id, self.nonce,
                          self.wrapped)

    def head(self) -> bytes:
        """Slot bytes 0-39: what the wrap's associated data binds."""
        return self.encode()[:40]


@dataclass
class Header:
    """A parsed header. ``data_key`` is set once a slot has opened it (``unlock``)."""

    algorithm: int
    chunk_shift: int
    file_id: bytes
    slots: list[KeySlot]
    mac: bytes = bytes(32)
    version: int = VERSION
    flags: int = 0
    data_key: bytes | None = field(default=None, repr=False)

    @property
    def chunk_size(self) -> int:
        return 1 << self.chunk_shift

    def fixed(self) -> bytes:
        """Header bytes 0-31 (what every slot's wrap binds)."""
        return _FIXED.pack(MAGIC, self.version, self.algorithm, self.chunk_shift, self.flags, self.file_id,
                           len(self.slots))[:32]

    def _body(self) -> bytes:
        slots = b"".join(s.encode() for s in self.slots).ljust(MAX_SLOTS * SLOT_SIZE, b"\0")
        return _FIXED.pack(MAGIC, self.version, self.algorithm, self.chunk_shift, self.flags, self.file_id,
                           len(self.slots)) + slots

    def encode(self) -> bytes:
        """The 4096 header bytes, with the MAC computed from the data key (which must be known)."""
        if self.data_key is None:
            raise ValueError("the header's data key is not known: unlock it first")
        body = self._body()
        return (body + _mac(self.data_key, self.file_id, body)).ljust(HEADER_SIZE, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        """Parse a header's structure (nothing secret is checked: see unlock)."""
        if len(raw) < HEADER_SIZE:
            raise BadHeader(f"a header is {HEADER_SIZE} bytes, this one {len(raw)}")
        magic, version, algorithm, shift, flags, file_id, count = _FIXED.unpack_from(raw)
        if magic != MAGIC:
            raise BadHeader("not an encrypted file (bad magic)")
        if version != VERSION:
            raise BadHeader(f"format version {version} is not one this release reads (it reads {VERSION})")
        if algorithm not in ALGORITHMS:
            raise BadHeader(f"unknown algorithm {algorithm}")
        if not MIN_SHIFT <= shift <= MAX_SHIFT:
            raise BadHeader(f"chunk shift {shift} is outside {MIN_SHIFT}-{MAX_SHIFT}")
        if flags:
            raise BadHeader(f"unknown flags {flags:#x}")
        if not 1 <= count <= MAX_SLOTS or any(raw[33:40]):
            raise BadHeader(f"{count} key slots")
        slots = []
        for i in range(MAX_SLOTS):
            chunk = raw[_SLOTS_AT + i * SLOT_SIZE:_SLOTS_AT + (i + 1) * SLOT_SIZE]
            if i >= count:
                if any(chunk):
                    raise BadHeader(f"key slot {i} is past the slot count but not empty")
                continue
            kind, kdf, log2_n, r, p, salt, key_id, nonce, wrapped = _SLOT.unpack(chunk)
            if any(chunk[5:8]) or any(chunk[100:]):
                raise BadHeader(f"key slot {i} has bytes set that must be zero")
            if kind == KIND_PASSWORD:
                if kdf != KDF_SCRYPT or not 10 <= log2_n <= 22 or not 1 <= r <= 32 or not 1 <= p <= 16:
                    raise BadHeader(f"key slot {i}: scrypt parameters out of range")
            elif kind in (KIND_MACHINE, KIND_RECOVERY):
                if kdf != KDF_HKDF or log2_n or r or p:
                    raise BadHeader(f"key slot {i}: a key slot derives with HKDF and nothing else")
            else:
                raise BadHeader(f"key slot {i} has unknown kind {kind}")
            slots.append(KeySlot(kind, kdf, log2_n, r, p, salt, key_id, nonce, wrapped))
        if any(raw[_MAC_AT + 32:HEADER_SIZE]):
            raise BadHeader("the header's padding is not zero")
        return cls(algorithm, shift, file_id, slots, raw[_MAC_AT:_MAC_AT + 32], version, flags)

    def unlock(self, secret: Secret) -> bytes:
        """The data key, from the first slot the secret opens; the header's MAC is then checked."""
        candidates = [s for s in self.slots if (s.kind == KIND_PASSWORD) == (secret.kind == KIND_PASSWORD)]
        if secret.kind != KIND_PASSWORD:
            candidates = [s for s in candidates if hmac.compare_digest(s.key_id, secret.key_id)]
        for slot in candidates:
            kek = _kek(secret, slot)
            try:
                key = AESGCM(kek).decrypt(slot.nonce, slot.wrapped, self.fixed() + slot.head())
            except InvalidTag:
                continue
            if not hmac.compare_digest(_mac(key, self.file_id, self._body()), self.mac):
                raise TamperedHeader("the header's MAC does not match: the header was changed")
            self.data_key = key
            return key
        raise WrongKey("no key slot opens with this " + ("password" if secret.kind == KIND_PASSWORD else "key"))

    def add_slot(self, secret: Secret, log2_n: int = SCRYPT_LOG2_N) -> None:
        """Wrap the (known) data key for another secret. The header must be written again (its MAC changes)."""
        if self.data_key is None:
            raise ValueError("unlock the header before adding a slot")
        if len(self.slots) >= MAX_SLOTS:
            raise ValueError(f"a header has at most {MAX_SLOTS} key slots")
        self.slots.append(_wrap(self, secret, self.data_key, log2_n))

    def replace_slots(self, kind: int, secret: Secret, log2_n: int = SCRYPT_LOG2_N) -> None:
        """Wrap the data key for ``secret`` in place of every slot of ``kind`` (a password change). The header must be
        written again; the data, and every other slot, stay as they are."""
        if self.data_key is None:
            raise ValueError("unlock the header before changing its slots")
        kept = [s for s in self.slots if s.kind != kind]
        if len(kept) >= MAX_SLOTS:
            raise ValueError(f"a header has at most {MAX_SLOTS} key slots")
        self.slots = kept + [_wrap(self, secret, self.data_key, log2_n)]


def new_header(secrets: Iterable[Secret], algorithm: int = AES_256_GCM, chunk_shift: int = DEFAULT_SHIFT,
               log2_n: int = SCRYPT_LOG2_N) -> Header:
    """A header for a new file: a random file id and data key, wrapped for each secret."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm}")
    if not MIN_SHIFT <= chunk_shift <= MAX_SHIFT:
        raise ValueError(f"chunk shift {chunk_shift} is outside {MIN_SHIFT}-{MAX_SHIFT}")
    header = Header(algorithm, chunk_shift, os.urandom(16), [], data_key=os.urandom(KEY))
    for secret in secrets:
        header.add_slot(secret, log2_n)
    if not header.slots:
        raise ValueError("a file needs at least one password or key")
    return header


def _kek(secret: Secret, slot: KeySlot) -> bytes:
    """The slot's key-encryption key. A password's memory-hard part depends on the password, the global salt and
    the scrypt parameters only, so that it is paid once per password and not once per file (a directory of small
    files would otherwise cost 0.1 s a file); the slot's own salt then makes each file's key different."""
    base = password_key(secret, slot.log2_n, slot.r, slot.p) if secret.kind == KIND_PASSWORD else secret.value
    return HKDF(algorithm=hashes.SHA256(), length=KEY, salt=slot.salt, info=_SLOT_INFO).derive(base)


_password_keys: dict[tuple[bytes, bytes, int, int, int], bytes] = {}
_password_lock = threading.Lock()


def password_key(secret: Secret, log2_n: int, r: int, p: int) -> bytes:
    """scrypt(password, global salt ‖ "fsfilter password v1", N, r, p), remembered for the life of the process."""
    key = (secret.value, secret.global_salt, log2_n, r, p)
    with _password_lock:
        known = _password_keys.get(key)
    if known is None:
        known = Scrypt(salt=secret.global_salt + _PASSWORD_SALT, length=KEY, n=1 << log2_n, r=r, p=p).derive(
            secret.value)
        with _password_lock:
            if len(_password_keys) > 64:
                _password_keys.clear()
            _password_keys[key] = known
    return known


def _wrap(header: Header, secret: Secret, data_key: bytes, log2_n: int) -> KeySlot:
    if secret.kind == KIND_PASSWORD:
        slot = KeySlot(KIND_PASSWORD, KDF_SCRYPT, log2_n, SCRYPT_R, SCRYPT_P, os.urandom(16), bytes(16),
                       os.urandom(NONCE), b"")
    else:
        slot = KeySlot(secret.kind, KDF_HKDF, 0, 0, 0, os.urandom(16), secret.key_id, os.urandom(NONCE), b"")
    slot.wrapped = AESGCM(_kek(secret, slot)).encrypt(slot.nonce, data_key, header.fixed() + slot.head())
    return slot


def _mac(data_key: bytes, file_id: bytes, body: bytes) -> bytes:
    key = HKDF(algorithm=hashes.SHA256(), length=KEY, salt=file_id, info=_MAC_INFO).derive(data_key)
    return hmac.new(key, body[:_MAC_AT], hashlib.sha256).digest()


# -- chunks


def chunk_offset(index: int, chunk_size: int) -> int:
    return HEADER_SIZE + index * (chunk_size + CHUNK_OVERHEAD)


def stored_size(plain: int, chunk_size: int) -> int:
    chunks = max(1, -(-plain // chunk_size))
    return HEADER_SIZE + chunks * CHUNK_OVERHEAD + plain


def plain_size(stored: int, chunk_size: int) -> int:
    """The plaintext size a stored size means; CorruptChunk when no plaintext gives it."""
    body = stored - HEADER_SIZE
    full, rest = divmod(body, chunk_size + CHUNK_OVERHEAD)
    if body < CHUNK_OVERHEAD or (rest and rest < CHUNK_OVERHEAD):
        raise CorruptChunk(full, f"a stored size of {stored} bytes is no encrypted file's (cut short?)")
    return full * chunk_size + (rest - CHUNK_OVERHEAD if rest else 0)


class ChunkCipher:
    """Seals and opens the chunks of one file."""

    def __init__(self, header: Header) -> None:
        if header.data_key is None:
            raise ValueError("unlock the header first")
        self.file_id = header.file_id
        self.chunk_size = header.chunk_size
        self._aead = AESGCM(header.data_key) if header.algorithm == AES_256_GCM else ChaCha20Poly1305(
            header.data_key)

    def _aad(self, index: int, last: bool) -> bytes:
        return _CHUNK_AAD.pack(b"FSFC", self.file_id, index, int(last))

    def seal(self, index: int, plaintext: bytes | bytearray | memoryview, last: bool) -> bytes:
        if len(plaintext) > self.chunk_size or (not last and len(plaintext) != self.chunk_size):
            raise ValueError(f"chunk {index}: {len(plaintext)} bytes (all but the last hold {self.chunk_size})")
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, bytes(plaintext), self._aad(index, last))

    def open(self, index: int, stored: bytes | memoryview, last: bool) -> bytes:
        if len(stored) < CHUNK_OVERHEAD or len(stored) > self.chunk_size + CHUNK_OVERHEAD:
            raise CorruptChunk(index, f"{len(stored)} bytes is no chunk's size")
        raw = bytes(stored)
        try:
            return self._aead.decrypt(raw[:NONCE], raw[NONCE:], self._aad(index, last))
        except InvalidTag:
            why = "corrupt, tampered, moved or from another file" + (" (or the file was cut short)" if last else "")
            raise CorruptChunk(index, why) from None

    def encrypt(self, plaintext: bytes) -> Iterator[bytes]:
        """The stored chunks of a whole plaintext."""
        size = self.chunk_size
        count = max(1, -(-len(plaintext) // size))
        for i in range(count):
            yield self.seal(i, plaintext[i * size:(i + 1) * size], i == count - 1)

    def decrypt(self, stored_body: bytes) -> bytes:
        """The plaintext of everything after the header."""
        plain = plain_size(HEADER_SIZE + len(stored_body), self.chunk_size)
        size = self.chunk_size + CHUNK_OVERHEAD
        count = max(1, -(-plain // self.chunk_size))
        return b"".join(self.open(i, stored_body[i * size:(i + 1) * size], i == count - 1) for i in range(count))
