"""The plaintext of an encrypted file (docs/file-format.md), as a file backend: what a trusted process's view of an
encrypted file reads and writes.

Reads decrypt the chunks a range touches (one pread for the whole stored range). Writes re-seal every chunk they
touch: read, patch, seal with a fresh nonce, write back; growing the file reseals the old last chunk as "not last"
and fills any gap with encrypted zeros; truncation reseals the new last chunk.

**Torn writes.** A chunk rewritten in place can be half written when the machine stops, and a half-written chunk
no longer opens: the data it held before would be lost, even if an fsync had made it durable. So the first time a
chunk that held data is rewritten after the last fsync, its old stored bytes go to a journal first (with the old
stored size), and the journal is made durable before the chunk is overwritten (one fdatasync for all the chunks
of one write). fsync makes the file durable, then empties the journal. ``recover`` (run before a file is used)
puts back the journaled chunks and size when the file does not open as a whole. Writes between two fsyncs are not
promised to survive a crash (as for any file), but they never cost what an fsync made durable.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from collections.abc import Callable

from fsfilter._crypto import fileformat as ff

__all__ = ["ChunkJournal", "EncryptedFile", "journal_path", "recover"]

_KEEP_SIZE, _PUNCH_HOLE = 0x01, 0x02  # fallocate(2) modes
_ENTRY = struct.Struct("<4sQQI")  # magic, chunk index, old stored file size, length of the old chunk that follows
_ENTRY_MAGIC = b"FSJE"


def journal_path(path: str) -> str:
    """Where the journal of the encrypted file ``path`` lives: beside it."""
    return path + ".fsfilter-journal"


class ChunkJournal:
    """The old stored chunks of one encrypted file, kept until the next fsync: a file of its own (``path``), made
    when first needed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self.saved: set[int] = set()  # chunk indexes journaled since the last fsync
        # How many chunks the file had when the first change since the last fsync came (None: none came yet).
        # Chunks from there on are new since that fsync: they hold nothing it made durable, and are never journaled
        # (so that appending costs no journal write).
        self.durable_count: int | None = None
        self.guards = False  # it holds a durable copy a crash may need (not only markers)

    def save(self, entries: list[tuple[int, int, bytes]], durable: bool = True) -> None:
        """Journal (index, old stored size, old stored chunk) entries before their chunks are rewritten, durably
        unless told the entries guard nothing durable."""
        if not entries:
            return
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.write(self._fd, b"".join(_ENTRY.pack(_ENTRY_MAGIC, i, size, len(old)) + old for i, size, old in entries))
        if durable:
            os.fdatasync(self._fd)
            self.guards = True
        self.saved.update(i for i, _, _ in entries)

    def clear(self) -> None:
        """The file is durable as it is: nothing to put back any more."""
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)
            os.fdatasync(self._fd)
        self.saved.clear()
        self.durable_count = None
        self.guards = False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            # Kept while it guards data an fsync made durable (the next open repairs or drops it); markers of writes
            # to a new file guard nothing once they are done.
            if not self.guards or os.stat(self.path).st_size == 0:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def _entries(path: str) -> list[tuple[int, int, bytes]]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return []
    out, pos = [], 0
    while pos + _ENTRY.size <= len(raw):
        magic, index, size, length = _ENTRY.unpack_from(raw, pos)
        if magic != _ENTRY_MAGIC or pos + _ENTRY.size + length > len(raw):
            break  # a torn last entry: its chunk was never overwritten (the journal is made durable first)
        out.append((index, size, raw[pos + _ENTRY.size:pos + _ENTRY.size + length]))
        pos += _ENTRY.size + length
    return out


def recover(fd: int, header: ff.Header, journal_path: str) -> list[int]:
    """Repair what a crash may have torn, when the file's journal says writes were under way (run before the file
    is used; a file without a journal is left alone, so that real corruption stays visible). Returns the chunks
    repaired.

    After a crash each chunk is whole-old, whole-new or torn, and the size old, new or cut inside a chunk. The
    repair makes every chunk open with the flag its place gives it: a size cut inside a chunk's overhead loses that
    partial chunk; a chunk sealed for another place (last or not) is sealed again; a torn chunk takes its journaled
    copy (the one an fsync made durable: journaled on its first rewrite since), cut or padded with zeros to its
    place's length; a torn chunk with no copy held nothing durable (it was new since the last fsync) and becomes
    zeros. Bytes no write touched since the last fsync keep their durable value."""
    entries = _entries(journal_path)
    repaired: list[int] = []
    if entries:
        cipher = ff.ChunkCipher(header)
        c = header.chunk_size
        step = c + ff.CHUNK_OVERHEAD
        copies: dict[int, list[bytes]] = {}
        for index, _, old in entries:
            copies.setdefault(index, []).append(old)  # oldest first
        stored = os.fstat(fd).st_size
        full, rest = divmod(max(0, stored - ff.HEADER_SIZE), step)
        if rest and rest < ff.CHUNK_OVERHEAD:
            stored = ff.HEADER_SIZE + full * step  # a chunk cut inside its nonce or tag: nothing of it opens
            os.ftruncate(fd, stored)
        plain = ff.plain_size(stored, c) if stored - ff.HEADER_SIZE >= ff.CHUNK_OVERHEAD else 0
        count = max(1, -(-plain // c))
        for i in range(count):
            last = i == count - 1
            length = (plain - i * c) if last else c
            raw = os.pread(fd, step, ff.chunk_offset(i, c))
            try:
                cipher.open(i, raw, last)
                continue
            except ff.CorruptChunk:
                pass
            data = _open_either(cipher, i, [raw, *copies.get(i, [])])
            if data is None:
                data = b""  # no copy: it held nothing an fsync made durable
            data = data[:length] + bytes(max(0, length - len(data)))
            os.pwrite(fd, cipher.seal(i, bytes(data), last), ff.chunk_offset(i, c))
            repaired.append(i)
        os.ftruncate(fd, ff.stored_size(plain, c))
        os.fsync(fd)
    try:
        os.unlink(journal_path)
    except FileNotFoundError:
        pass
    return repaired


def _open_either(cipher: ff.ChunkCipher, index: int, candidates: list[bytes]) -> bytes | None:
    """The plaintext of the first candidate that opens as chunk ``index``, sealed as last or not."""
    for raw in candidates:
        for last in (False, True):
            try:
                return cipher.open(index, raw, last)
            except ff.CorruptChunk:
                continue
    return None


class _Shared:
    """What every open of one stored file shares: the lock a chunk's read-patch-seal holds, and the journal."""

    def __init__(self, journal: ChunkJournal | None) -> None:
        self.lock = threading.Lock()
        self.journal = journal
        self.users = 0


_shared: dict[tuple[int, int], _Shared] = {}
_shared_lock = threading.Lock()


class EncryptedFile:
    """The plaintext of the encrypted file open at ``fd`` (read-write), whose header is unlocked. Opens of one stored
    file (by st_dev, st_ino) share one lock and one journal (``journal`` is used by the first, and closed by the
    last ``close``)."""

    def __init__(self, fd: int, header: ff.Header, journal: ChunkJournal | None = None,
                 on_damage: Callable[[str], None] | None = None) -> None:
        self.fd = fd
        # Told what a read or write found damaged (corrupt, cut, tampered chunks) before the request fails with EIO.
        self.on_damage = on_damage
        self.cipher = ff.ChunkCipher(header)
        self.chunk = header.chunk_size
        st = os.fstat(fd)
        self._key = (st.st_dev, st.st_ino)
        with _shared_lock:
            shared = _shared.get(self._key)
            if shared is None:
                shared = _shared[self._key] = _Shared(journal)
            elif journal is not None and journal is not shared.journal:
                journal.close()  # (another open's journal serves this file)
            shared.users += 1
        self._shared = shared
        self.journal = shared.journal
        self._lock = shared.lock  # a chunk is read, patched and sealed again by one request at a time

    def close(self) -> None:
        """This open is done (the fd is the caller's to close)."""
        with _shared_lock:
            shared = self._shared
            shared.users -= 1
            if shared.users <= 0:
                _shared.pop(self._key, None)
                if shared.journal is not None:
                    shared.journal.close()

    # -- sizes and chunks

    def size(self) -> int:
        return ff.plain_size(os.fstat(self.fd).st_size, self.chunk)

    def _count(self, plain: int) -> int:
        return max(1, -(-plain // self.chunk))

    def _stored(self, index: int) -> bytes:
        return os.pread(self.fd, self.chunk + ff.CHUNK_OVERHEAD, ff.chunk_offset(index, self.chunk))

    def _plain_chunk(self, index: int, plain: int) -> bytes:
        """Chunk ``index`` of a file of plaintext size ``plain`` (empty past its end)."""
        count = self._count(plain)
        if index >= count:
            return b""
        return self.cipher.open(index, self._stored(index), index == count - 1)

    # -- reads

    def _damaged(self, exc: ff.FormatError) -> OSError:
        if self.on_damage is not None:
            self.on_damage(str(exc))
        return OSError(errno.EIO, str(exc))

    def read(self, size: int, offset: int) -> bytes:
        try:
            return self._read(size, offset)
        except ff.FormatError as exc:
            raise self._damaged(exc) from exc

    def _read(self, size: int, offset: int) -> bytes:
        with self._lock:
            plain = self.size()
            if offset >= plain or size <= 0:
                return b""
            end = min(plain, offset + size)
            first, last = offset // self.chunk, (end - 1) // self.chunk
            count = self._count(plain)
            start = ff.chunk_offset(first, self.chunk)
            raw = os.pread(self.fd, ff.chunk_offset(last + 1, self.chunk) - start, start)
            step = self.chunk + ff.CHUNK_OVERHEAD
            parts = [self.cipher.open(i, raw[(i - first) * step:(i - first + 1) * step], i == count - 1)
                     for i in range(first, last + 1)]
        data = b"".join(parts)
        skip = offset - first * self.chunk
        return data[skip:skip + (end - offset)]

    def readinto(self, buf: memoryview, offset: int) -> int:
        data = self.read(len(buf), offset)
        buf[:len(data)] = data
        return len(data)

    # -- writes

    def _journal(self, indexes: list[int], plain: int) -> None:
        """Save the stored bytes of the chunks about to be rewritten that held data and were not saved since the
        last fsync (see the module docstring)."""
        journal = self.journal
        if journal is None:
            return
        count = self._count(plain)
        if journal.durable_count is None:
            journal.durable_count = count
        limit = min(count, journal.durable_count)
        stored_size = os.fstat(self.fd).st_size
        entries = []
        for i in indexes:
            if i < limit and i not in journal.saved:
                old = self._stored(i)
                # An empty chunk (a new file's) holds nothing to lose: only a marker that writes are under way (so
                # that a crash is repaired), not made durable at once (a power cut may lose the new file's data).
                entries.append((i, stored_size, old if len(old) > ff.CHUNK_OVERHEAD else b""))
        journal.save(entries, durable=any(old for _, _, old in entries))

    def _rewrite(self, plain: int, new_plain: int, start: int, data: bytes | memoryview) -> None:
        """Write ``data`` at plaintext ``start`` of a file of size ``plain`` that becomes ``new_plain``."""
        c = self.chunk
        old_count, new_count = self._count(plain), self._count(new_plain)
        end = start + len(data)
        first = min(start // c, old_count - 1) if new_plain > plain else start // c
        last = max((end - 1) // c if end > start else first, new_count - 1 if new_plain != plain else first)
        indexes = list(range(first, last + 1))
        self._journal(indexes, plain)
        sealed = []
        for i in indexes:
            old = bytearray(self._plain_chunk(i, plain)) if i < old_count else bytearray()
            lo, hi = i * c, min((i + 1) * c, new_plain)
            old.extend(bytes(max(0, hi - lo - len(old))))  # a gap, or growth: encrypted zeros
            del old[hi - lo:]
            a, b = max(start, lo), min(end, hi)
            if a < b:
                old[a - lo:b - lo] = data[a - start:b - start]
            sealed.append(self.cipher.seal(i, old, i == new_count - 1))
        offset = ff.chunk_offset(first, c)
        os.pwrite(self.fd, b"".join(sealed), offset)
        if new_plain < plain:
            os.ftruncate(self.fd, ff.stored_size(new_plain, c))

    def write(self, data: bytes | memoryview, offset: int) -> int:
        try:
            return self._write(data, offset)
        except ff.FormatError as exc:
            raise self._damaged(exc) from exc

    def _write(self, data: bytes | memoryview, offset: int) -> int:
        if not data:
            return 0
        with self._lock:
            plain = self.size()
            if offset > plain:  # a hole: stored as encrypted zeros (the format has no holes)
                self._zeros(plain, offset)
                plain = offset
            self._rewrite(plain, max(plain, offset + len(data)), offset, data)
        return len(data)

    def _zeros(self, plain: int, end: int) -> None:
        """Grow the file from ``plain`` to ``end`` with encrypted zeros, a few chunks at a time (a 10 GiB truncate
        must not need 10 GiB of memory)."""
        step = max(self.chunk, 1 << 20)
        zeros = bytes(step)
        while plain < end:
            n = min(step, end - plain)
            self._rewrite(plain, plain + n, plain, memoryview(zeros)[:n])
            plain += n

    def truncate(self, size: int) -> None:
        try:
            self._truncate(size)
        except ff.FormatError as exc:
            raise self._damaged(exc) from exc

    def _truncate(self, size: int) -> None:
        if size < 0:
            raise OSError(errno.EINVAL, "negative size")
        with self._lock:
            plain = self.size()
            if size == plain:  # nothing to change, but a truncate counts as a modification (as natively)
                st = os.fstat(self.fd)
                os.utime(self.fd, ns=(st.st_atime_ns, time.time_ns()))
            elif size > plain:
                self._zeros(plain, size)
            elif size < plain:
                keep = self._count(size) - 1  # the new last chunk, resealed as last with what it keeps
                self._rewrite(plain, size, keep * self.chunk, self._plain_chunk(keep, plain)[:size - keep * self.chunk])

    def fsync(self, datasync: bool) -> None:
        with self._lock:
            if datasync:
                os.fdatasync(self.fd)
            else:
                os.fsync(self.fd)
            if self.journal is not None:
                self.journal.clear()  # what it held is superseded by what is now durable

    def allocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the plaintext. The format stores no holes, so space is zeros written: plain allocation
        extends the file with zeros (KEEP_SIZE: nothing to do), PUNCH_HOLE writes zeros over the range (within the
        size); the other modes (zero range, collapse, insert) are refused, as many file systems do."""
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "bad range")
        size = self.size()
        if mode == 0 and offset + length > size:
            with self._lock:
                self._zeros(size, offset + length)
            return
        if mode in (0, _KEEP_SIZE):
            st = os.fstat(self.fd)  # nothing to write; the file counts as modified, as natively
            os.utime(self.fd, ns=(st.st_atime_ns, time.time_ns()))
            return
        if mode == _PUNCH_HOLE | _KEEP_SIZE:
            end = min(offset + length, size)
            while offset < end:
                n = min(end - offset, 1 << 20)
                self.write(bytes(n), offset)
                offset += n
            return
        raise OSError(errno.EOPNOTSUPP, "this fallocate mode has no meaning for an encrypted file")

    def passthrough_fd(self) -> int | None:
        return None  # every byte is decrypted by the daemon
