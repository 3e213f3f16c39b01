"""Whole-file encryption work (docs/file-format.md): converting files in place, changing passwords, reading
headers. Each change is crash-safe: a conversion writes the new file beside the old one and renames it over it (a
crash leaves the whole old file or the whole new one); a password change writes the new header beside the file
first, so that a header torn by a crash is put back whole (``repair_header``) before the file is used.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable

from fsfilter._crypto import fileformat as ff
from fsfilter.errors import CBFSFilterError

__all__ = ["ProgressFn", "change_password", "decrypt_file", "encrypt_file", "file_header", "is_encrypted",
           "read_plaintext", "repair_header"]

ProgressFn = Callable[[int], None]  # told how many more bytes were done
_STEP = 1 << 20
_HEADER_SIDE = ".fsfilter-header"
_NEW_SIDE = ".fsfilter-new"


def _error(exc: Exception, path: str, doing: str) -> CBFSFilterError:
    if isinstance(exc, ff.WrongKey):
        return CBFSFilterError(errno.EACCES, f"{path}: wrong password or key ({doing})")
    if isinstance(exc, ff.FormatError):
        return CBFSFilterError(errno.EIO, f"{path}: {exc} ({doing})")
    if isinstance(exc, OSError):
        return CBFSFilterError.from_os_error(exc, f"cannot {doing} {path}")
    return CBFSFilterError(errno.EINVAL, f"{path}: {exc}")


def is_encrypted(path: str) -> bool:
    """Whether the file starts with a header of a version this release reads."""
    try:
        with open(path, "rb") as f:
            ff.Header.decode(f.read(ff.HEADER_SIZE))
    except (OSError, ff.FormatError):
        return False
    return True


def file_header(path: str) -> ff.Header:
    """The parsed header of an encrypted file (nothing secret checked)."""
    repair_header(path)
    try:
        with open(path, "rb") as f:
            return ff.Header.decode(f.read(ff.HEADER_SIZE))
    except (OSError, ff.FormatError) as exc:
        raise _error(exc, path, "read the header of") from exc


def repair_header(path: str) -> bool:
    """Finish a password change a crash interrupted: the new header, kept beside the file, is written over the one
    in the file (which may be torn). Returns whether there was one to finish."""
    side = path + _HEADER_SIDE
    try:
        with open(side, "rb") as f:
            new = f.read()
    except FileNotFoundError:
        return False
    try:
        ff.Header.decode(new)
    except ff.FormatError:
        os.unlink(side)  # the side file itself was cut short: the file's own header was never touched
        return False
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, new, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(side)
    return True


def _unlock(path: str, secrets: Iterable[ff.Secret]) -> tuple[ff.Header, bytes]:
    header = file_header(path)
    wrong: Exception | None = None
    for secret in secrets:
        try:
            return header, header.unlock(secret)
        except ff.WrongKey as exc:
            wrong = exc
    raise _error(wrong or ff.WrongKey("no password or key given"), path, "unlock")


def _replace(path: str, write: Callable[[int], None]) -> None:
    """Write a new version of ``path`` beside it (``write`` fills the fd), make it durable, keep the old one's
    mode, owner and times, and rename it over the old one: a crash leaves one whole version or the other."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise CBFSFilterError(errno.EINVAL, f"{path} is not a regular file")
    new = path + _NEW_SIDE
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, stat.S_IMODE(st.st_mode))
    try:
        write(fd)
        _copy_xattrs(path, fd)
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        if os.geteuid() == 0:
            os.fchown(fd, st.st_uid, st.st_gid)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(new)
        raise
    os.close(fd)
    os.rename(new, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _copy_xattrs(path: str, fd: int) -> None:
    """The old file's extended attributes (ACLs, labels, user attributes) on the new one."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        try:
            os.setxattr(fd, name, os.getxattr(path, name, follow_symlinks=False))
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                raise


def encrypt_file(path: str, secrets: Iterable[ff.Secret], algorithm: int = ff.AES_256_GCM,
                 chunk_shift: int = ff.DEFAULT_SHIFT, progress: ProgressFn | None = None,
                 log2_n: int = ff.SCRYPT_LOG2_N) -> None:
    """Encrypt a plain file in place (one key slot per secret)."""
    secrets = list(secrets)
    if is_encrypted(path):
        raise CBFSFilterError(errno.EEXIST, f"{path} is encrypted already")
    try:
        header = ff.new_header(secrets, algorithm, chunk_shift, log2_n)
    except ValueError as exc:
        raise _error(exc, path, "encrypt") from exc
    cipher = ff.ChunkCipher(header)
    c = header.chunk_size

    def write(fd: int) -> None:
        os.write(fd, header.encode())
        with open(path, "rb", buffering=0) as src:
            index, chunk = 0, src.read(c)
            while True:
                following = src.read(c) if len(chunk) == c else b""
                os.write(fd, cipher.seal(index, chunk, not following))
                if progress is not None:
                    progress(len(chunk))
                if not following:
                    break
                index, chunk = index + 1, following
    try:
        _replace(path, write)
    except (OSError, ValueError) as exc:
        raise _error(exc, path, "encrypt") from exc


def read_plaintext(path: str, secrets: Iterable[ff.Secret], progress: ProgressFn | None = None) -> Iterable[bytes]:
    """The plaintext of an encrypted file, chunk by chunk (each chunk checked before it is given)."""
    header, _ = _unlock(path, secrets)
    cipher = ff.ChunkCipher(header)
    c = header.chunk_size
    try:
        stored = os.stat(path).st_size
        plain = ff.plain_size(stored, c)
        count = max(1, -(-plain // c))
        with open(path, "rb", buffering=0) as src:
            src.seek(ff.HEADER_SIZE)
            for i in range(count):
                data = cipher.open(i, src.read(c + ff.CHUNK_OVERHEAD), i == count - 1)
                if progress is not None:
                    progress(len(data))
                yield data
    except (OSError, ff.FormatError) as exc:
        raise _error(exc, path, "decrypt") from exc


def decrypt_file(path: str, secrets: Iterable[ff.Secret], progress: ProgressFn | None = None) -> None:
    """Turn an encrypted file back into a plain one, in place. Nothing is written unless every chunk opens."""
    chunks = read_plaintext(path, list(secrets), progress)

    def write(fd: int) -> None:
        for data in chunks:
            os.write(fd, data)
    try:
        _replace(path, write)
    except OSError as exc:
        raise _error(exc, path, "decrypt") from exc


def change_password(path: str, old: Iterable[ff.Secret], new: ff.Secret, log2_n: int = ff.SCRYPT_LOG2_N) -> None:
    """Replace the file's slots of ``new``'s kind (its password, or its machine/recovery key) with one for ``new``.
    Only the header changes: it is written beside the file first, then over the file's own (repair_header)."""
    header, _ = _unlock(path, old)
    try:
        header.replace_slots(new.kind, new, log2_n)
    except ValueError as exc:
        raise _error(exc, path, "change the password of") from exc
    side = path + _HEADER_SIDE
    fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, header.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    repair_header(path)
