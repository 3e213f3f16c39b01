"""The one exception type of the public API."""

from __future__ import annotations

import errno
import os

__all__ = ["CBFSFilterError"]


class CBFSFilterError(Exception):
    """A failure of an fsfilter call: ``code`` is an errno value, ``message`` says what to do."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} [{errno.errorcode.get(code, code)}]")
        self.code = code
        self.message = message

    @classmethod
    def from_os_error(cls, exc: OSError, what: str) -> CBFSFilterError:
        code = exc.errno or errno.EIO
        return cls(code, f"{what}: {exc.strerror or os.strerror(code)}")
