"""CBEncrypt: transparent per-file encryption (docs/file-format.md, docs/encrypt.md).

Files under an encryption rule are stored encrypted, each with its own data key wrapped by the rule's password.
Trusted processes see and write plaintext (plaintext sizes in ``stat`` and listings), through a view of each file
of their own whose backend decrypts and encrypts chunks (``fsfilter._layers.encrypted_file``); every other process
sees the file exactly as stored, through kernel passthrough, and may not write into an encrypted file unless
``RefuseUntrustedWrites=false``. Files trusted processes create under a rule are encrypted from their first byte.

CBEncrypt runs on a CBFilter of its own (rules, mounts, altitude, the service), whose layer serves the views.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from fsfilter._crypto import fileformat as ff
from fsfilter._engine.masks import MaskError, file_matches_mask
from fsfilter._layers.encrypted_file import ChunkJournal, EncryptedFile, recover
from fsfilter._system import libc, procfs
from fsfilter._wire.fuse import StatLike
from fsfilter._wire.replies import StatView
from fsfilter.api import constants as c
from fsfilter.api import encryption
from fsfilter.api.cbfilter import CBFilter
from fsfilter.errors import CBFSFilterError

__all__ = ["CBEncrypt", "ENCRYPTION_AES256_GCM", "ENCRYPTION_CHACHA20_POLY1305"]

log = logging.getLogger("fsfilter.encrypt")

ENCRYPTION_AES256_GCM = ff.AES_256_GCM
ENCRYPTION_CHACHA20_POLY1305 = ff.CHACHA20_POLY1305
_OWN_SETTINGS = {"RefuseUntrustedWrites": "true", "JournalDirectory": "/var/lib/fsfilter/journal",
                 "ChunkSize": "65536", "ScryptLog2N": str(ff.SCRYPT_LOG2_N)}


class _Plaintext:
    """A view's transform (see sessions/nodes.py View.transform): the plaintext of one encrypted file."""

    def __init__(self, header: ff.Header, journal: str, sole_writer: bool, path: str,
                 report: Callable[[int, str], None]) -> None:
        self.header = header
        self.journal = journal
        self.path = path
        self.report = report
        # Whether only this view writes the file (untrusted writes refused): its attributes may then be cached, and
        # reads from its page cache need no round trip to the daemon.
        self.sole_writer = sole_writer

    def backend(self, fd: int, flags: int) -> EncryptedFile:
        return EncryptedFile(fd, self.header, ChunkJournal(self.journal), self._damaged)

    def _damaged(self, what: str) -> None:
        message = f"{self.path}: {what}"
        log.error("%s", message)
        self.report(errno.EIO, message)

    def shown(self, st: StatLike) -> StatLike:
        try:
            size = ff.plain_size(st.st_size, self.header.chunk_size)
        except ff.FormatError as exc:
            raise OSError(errno.EIO, str(exc)) from exc
        return StatView(st, size=size, blocks=(size + 511) // 512)


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""  # a kernel thread, or gone


def _exe_identity(pid: int) -> tuple[int, int]:
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return (0, 0)
    return (st.st_dev, st.st_ino)


class _Trusted:
    __slots__ = ("mask", "pid", "children")

    def __init__(self, mask: str, pid: int, children: bool) -> None:
        self.mask, self.pid, self.children = mask, pid, children


class CBEncrypt:
    """Transparent encryption of the files under its rules, for trusted processes only."""

    def __init__(self) -> None:
        self._filter = CBFilter()
        self._filter.encryption = self  # its layer asks us (EncryptionPolicy)
        self._rules: list[tuple[str, str]] = []  # (mask, password; "" = default_file_password)
        self._trusted: list[_Trusted] = []
        self._settings = dict(_OWN_SETTINGS)
        self._lock = threading.Lock()
        self._verdicts: dict[int, tuple[int, bool, tuple[int, int]]] = {}  # tgid -> (its pidfd, trusted, program)
        self._thread_pids: dict[int, int] = {}  # tid -> tgid, as last seen
        self.default_encryption = ENCRYPTION_AES256_GCM
        self.default_file_password = ""
        self._global_salt = bytes(16)
        self.on_error: Callable[[Any], object] | None = None

    # -- properties

    @property
    def active(self) -> bool:
        return self._filter.active

    @property
    def altitude(self) -> str:
        return str(self._filter.altitude)

    @altitude.setter
    def altitude(self, value: str) -> None:
        self._filter.altitude = value

    @property
    def tag(self) -> int:
        return int(self._filter.tag)

    @tag.setter
    def tag(self, value: int) -> None:
        self._filter.tag = value

    @property
    def global_salt(self) -> bytes:
        """16 bytes mixed into every password's key (choose one per installation): a file opens only with the global
        salt it was written with."""
        return self._global_salt

    @global_salt.setter
    def global_salt(self, value: bytes | str) -> None:
        raw = bytes.fromhex(value) if isinstance(value, str) else bytes(value)
        if len(raw) != 16:
            raise CBFSFilterError(errno.EINVAL, "global_salt is 16 bytes (or 32 hex digits)")
        self._global_salt = raw

    @property
    def refuse_untrusted_writes(self) -> bool:
        return self._settings["RefuseUntrustedWrites"] == "true"

    def config(self, configuration_string: str) -> str:
        """``Name=value`` sets, ``Name`` reads: RefuseUntrustedWrites (true), JournalDirectory, ChunkSize (a power
        of two, 4096-1048576), ScryptLog2N (10-22), and CBFilter's own settings."""
        name, eq, value = configuration_string.partition("=")
        name = name.strip()
        if name not in self._settings:
            return self._filter.config(configuration_string)
        if not eq:
            return self._settings[name]
        value = value.strip()
        if name == "RefuseUntrustedWrites" and value.lower() not in ("true", "false"):
            raise CBFSFilterError(errno.EINVAL, "RefuseUntrustedWrites is true or false")
        if name == "ChunkSize" and (not value.isdigit() or int(value) & (int(value) - 1) or
                                    not 4096 <= int(value) <= 1 << 20):
            raise CBFSFilterError(errno.EINVAL, "ChunkSize is a power of two from 4096 to 1048576")
        if name == "ScryptLog2N" and (not value.isdigit() or not 10 <= int(value) <= 22):
            raise CBFSFilterError(errno.EINVAL, "ScryptLog2N is from 10 to 22")
        self._settings[name] = value.lower() if name == "RefuseUntrustedWrites" else value
        return ""

    # -- rules and trusted processes

    def add_encrypt_rule(self, mask: str, password: str = "", flags: int = 0) -> bool:
        """Encrypt the files matching ``mask`` (an absolute path mask) with ``password`` (default_file_password when
        empty). Returns whether the rules changed."""
        try:
            file_matches_mask(mask, "/")
        except MaskError as exc:
            raise CBFSFilterError(errno.EINVAL, f"bad mask {mask!r}: {exc}") from exc
        if not mask.startswith("/"):
            raise CBFSFilterError(errno.EINVAL, f"an encryption rule needs an absolute mask, not {mask!r}")
        with self._lock:
            if any(m == mask for m, _ in self._rules):
                return False
            self._rules.append((mask, password))
        self._filter.add_filter_rule(mask, c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN | c.FS_CE_BEFORE_CREATE, c.FS_NE_NONE)
        return True

    def delete_encrypt_rule(self, mask: str) -> bool:
        with self._lock:
            kept = [r for r in self._rules if r[0] != mask]
            changed = len(kept) != len(self._rules)
            self._rules = kept
        if changed:
            self._filter.delete_filter_rule(mask, c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN | c.FS_CE_BEFORE_CREATE,
                                            c.FS_NE_NONE)
        return changed

    @property
    def encrypt_rule_count(self) -> int:
        return len(self._rules)

    def get_encrypt_rule_mask(self, index: int) -> str:
        return self._rules[index][0]

    def add_trusted_process(self, process: str | int, include_children: bool = False) -> bool:
        """Trust a process: a pid, a program path mask (``/usr/bin/vim``: the executable's resolved path), or a name
        mask (``vim``, ``python3*``: the executable's file name, wherever it is; anyone who can write a file can run a
        program of that name, so use path masks where that matters). ``include_children``: its descendants too."""
        if isinstance(process, int):
            entry = _Trusted("", process, include_children)
        else:
            try:
                file_matches_mask(process, "x")
            except MaskError as exc:
                raise CBFSFilterError(errno.EINVAL, f"bad process mask {process!r}: {exc}") from exc
            entry = _Trusted(process, 0, include_children)
        with self._lock:
            if any((t.mask, t.pid) == (entry.mask, entry.pid) for t in self._trusted):
                return False
            self._trusted.append(entry)
            self._forget_verdicts()
        return True

    def remove_trusted_process(self, process: str | int) -> bool:
        with self._lock:
            kept = [t for t in self._trusted if (t.pid if isinstance(process, int) else t.mask) != process]
            changed = len(kept) != len(self._trusted)
            self._trusted = kept
            self._forget_verdicts()
        return changed

    # -- running

    def start_filter(self, timeout: int = 0) -> None:
        if not self._rules:
            raise CBFSFilterError(errno.EINVAL, "no encryption rule: add_encrypt_rule(mask, password) first")
        if not self.default_file_password and any(not pw for _, pw in self._rules):
            raise CBFSFilterError(errno.EINVAL, "a rule has no password and default_file_password is empty")
        os.makedirs(self._settings["JournalDirectory"], mode=0o700, exist_ok=True)
        self._filter.start_filter(timeout)

    def stop_filter(self, wait: bool = True) -> None:
        self._filter.stop_filter(wait)
        with self._lock:
            self._forget_verdicts()
            self._thread_pids.clear()

    def __enter__(self) -> CBEncrypt:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self.stop_filter()

    # -- what the layer asks (EncryptionPolicy)

    def applies(self, path: str) -> bool:
        return self._password_for(path) is not None

    def _password_for(self, path: str) -> str | None:
        for mask, password in self._rules:
            if file_matches_mask(mask, path):
                return password or self.default_file_password
        return None

    def _secret(self, path: str) -> ff.Secret:
        password = self._password_for(path)
        if not password:
            raise OSError(errno.EACCES, f"no password for {path}")
        return ff.Secret.password(password, self._global_salt)

    def trusted(self, tid: int) -> bool:
        """Whether thread ``tid``'s process is trusted. Asked several times per request: the verdict is kept per process
        with a pidfd (a reused pid is not the process judged), and each thread's process is checked with one tgkill
        (a reused thread id is looked up again), so that a known thread costs two syscalls, not /proc reads."""
        if not self._trusted:
            return False
        with self._lock:
            pid = self._thread_pids.get(tid)
        if pid is None or not libc.is_thread_of(pid, tid):
            pid = procfs.tgid(tid)
            with self._lock:
                if len(self._thread_pids) > 16384:
                    self._thread_pids.clear()
                self._thread_pids[tid] = pid
        program = _exe_identity(pid)  # an exec changes the program, and with it the verdict
        with self._lock:
            known = self._verdicts.get(pid)
        if known is not None and known[2] == program and procfs.pidfd_alive(known[0]):
            return known[1]
        verdict = self._judge(pid)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return verdict  # gone already: judged, not kept
        with self._lock:
            old = self._verdicts.pop(pid, None)
            if len(self._verdicts) > 4096:
                self._forget_verdicts()
            self._verdicts[pid] = (pidfd, verdict, program)
        if old is not None:
            os.close(old[0])
        return verdict

    def _forget_verdicts(self) -> None:
        """Drop every kept verdict (under _lock): the trusted list changed, or there are too many."""
        for pidfd, _, _ in self._verdicts.values():
            os.close(pidfd)
        self._verdicts.clear()

    def _judge(self, pid: int) -> bool:
        chain, current = [pid], pid
        while current > 1 and len(chain) < 64:  # the ancestors, for include_children
            current = procfs.parent_pid(current)
            if current:
                chain.append(current)
        for depth, candidate in enumerate(chain):
            # The program the process runs, by its executable's path (never the process name, which any process
            # sets for itself with prctl or /proc/self/comm).
            image = _exe(candidate)
            for t in self._trusted:
                if depth and not t.children:
                    continue
                if t.pid:
                    if t.pid == candidate:
                        return True
                elif image and (file_matches_mask(t.mask, image) if "/" in t.mask else
                                file_matches_mask(t.mask, os.path.basename(image))):
                    return True
        return False

    def is_encrypted(self, fd: int) -> bool:
        """Whether the file is one of ours: it starts with the format's magic. A damaged header still counts (its
        opens then fail with EIO and on_error), so that damage never turns a file into a plain one."""
        try:
            return os.pread(fd, len(ff.MAGIC), 0) == ff.MAGIC
        except OSError:
            return False

    def _journal(self, st: os.stat_result, header: ff.Header) -> str:
        return os.path.join(self._settings["JournalDirectory"],
                            f"{st.st_dev:x}-{st.st_ino:x}-{header.file_id.hex()}")

    def transform(self, fd: int, path: str) -> _Plaintext | None:
        try:
            header = ff.Header.decode(os.pread(fd, ff.HEADER_SIZE, 0))
        except ff.FormatError as exc:
            self._report(errno.EIO, f"{path}: {exc}")
            raise OSError(errno.EIO, f"{path}: {exc}") from exc
        try:
            header.unlock(self._secret(path))
        except ff.FormatError as exc:
            self._report(errno.EACCES, f"{path}: {exc}")
            raise OSError(errno.EACCES, f"{path}: {exc}") from exc
        st = os.fstat(fd)
        journal = self._journal(st, header)
        if os.path.exists(journal):
            rw = os.open(procfs.fd_path(fd), os.O_RDWR | os.O_CLOEXEC)
            try:
                repaired = recover(rw, header, journal)
            finally:
                os.close(rw)
            if repaired:
                self._report(0, f"{path}: chunks {repaired} repaired after a crash")
        return _Plaintext(header, journal, self.refuse_untrusted_writes, path, self._report)

    def new_file(self, path: str) -> bytes:
        shift = int(self._settings["ChunkSize"]).bit_length() - 1
        header = ff.new_header([self._secret(path)], self.default_encryption, shift,
                               int(self._settings["ScryptLog2N"]))
        return header.encode() + ff.ChunkCipher(header).seal(0, b"", True)

    def _report(self, code: int, description: str) -> None:
        handler = self.on_error
        if handler is not None:
            try:
                handler(type("ErrorParams", (), {"error_code": code, "description": description})())
            except Exception:  # an error handler's own failure must not fail the request
                pass

    # -- whole files

    def _below(self, file_name: str) -> str:
        """A path that reaches the file below this filter's mount while it runs (through the lower directory's fd)."""
        path = os.path.abspath(file_name)
        if self.active:
            for point, attachment in list(self._filter._attached.items()):
                if path == point or path.startswith(point.rstrip("/") + "/"):
                    rel = os.path.relpath(path, attachment.mountpoint)
                    return f"/proc/{os.getpid()}/fd/{attachment._lower_fd}/{rel}"
        return path

    def _forget(self, file_name: str) -> None:
        path = os.path.abspath(file_name)
        for point, attachment in list(self._filter._attached.items()):
            if path.startswith(point.rstrip("/") + "/"):
                attachment.stack.forget_name(os.fsencode(os.path.relpath(path, attachment.mountpoint)))

    def encrypt_file(self, file_name: str, password: str = "") -> None:
        """Encrypt a plain file in place (crash-safe: the whole old file or the whole new one)."""
        secret = ff.Secret.password(password or self._password_for(os.path.abspath(file_name)) or
                                    self.default_file_password, self._global_salt)
        shift = int(self._settings["ChunkSize"]).bit_length() - 1
        encryption.encrypt_file(self._below(file_name), [secret], self.default_encryption, shift,
                                log2_n=int(self._settings["ScryptLog2N"]))
        self._forget(file_name)

    def decrypt_file(self, file_name: str, password: str = "") -> None:
        """Turn an encrypted file back into a plain one, in place."""
        secret = ff.Secret.password(password or self._password_for(os.path.abspath(file_name)) or
                                    self.default_file_password, self._global_salt)
        encryption.decrypt_file(self._below(file_name), [secret])
        self._forget(file_name)

    def change_encryption(self, file_name: str, old_password: str, new_password: str) -> None:
        """Change a file's password (its header only)."""
        encryption.change_password(self._below(file_name), [ff.Secret.password(old_password, self._global_salt)],
                                   ff.Secret.password(new_password, self._global_salt),
                                   int(self._settings["ScryptLog2N"]))

    def get_file_header(self, file_name: str) -> dict[str, Any]:
        """What a file's header says (nothing secret): format version, algorithm, chunk size, file id, key slots."""
        header = encryption.file_header(self._below(file_name))
        return {"version": header.version, "algorithm": header.algorithm, "chunk_size": header.chunk_size,
                "file_id": header.file_id.hex(), "slots": [s.kind for s in header.slots]}
