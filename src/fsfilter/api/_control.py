"""The control channel of fsfilterd: JSON lines over a UNIX stream socket (documented in docs/service.md).

Each message is one JSON object on one line, at most MAX_MESSAGE bytes. A request is ``{"id": N, "method": NAME,
"params": {...}}``; its answer ``{"id": N, "result": ...}`` or ``{"id": N, "error": {"code": ERRNO, "message":
TEXT}}``. The service identifies a peer by SO_PEERCRED (taken when it connects) and holds a pidfd of it.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import json
import os
import socket
import threading
from typing import Any

from fsfilter.api import _rulesfiles
from fsfilter.api._params_base import EventParamsBase
from fsfilter.errors import CBFSFilterError

__all__ = ["MAX_MESSAGE", "METHODS", "Channel", "ProtocolError", "call", "changed_fields", "connect", "decode",
           "decode_params", "encode", "encode_params", "socket_path"]

MAX_MESSAGE = 8 << 20  # bytes per line: an event carries at most a 4 MiB buffer, base64-encoded
PROTOCOL_VERSION = 1

# Methods and whether they need root (CAP_SYS_ADMIN): changing rules binds other users' processes.
METHODS: dict[str, bool] = {
    "hello": False, "status": False, "list_default_rules": False,
    "reload": True, "add_default_rule": True, "delete_default_rule": True,
    "attach": True, "detach": True, "set_rules": True, "events": True,
    "add_reparse_rule": True, "delete_reparse_rule": True, "list_reparse_rules": True,
}


class ProtocolError(ValueError):
    """A message that breaks the protocol: its answer is an error, never a crash."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def socket_path() -> str:
    return os.environ.get("FSFILTER_SOCKET") or (_rulesfiles.root() + "/run/fsfilter/control.sock")


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_MESSAGE:
        raise ProtocolError(errno.EMSGSIZE, f"message of {len(line)} bytes: at most {MAX_MESSAGE}")
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(errno.EBADMSG, f"not a JSON object on one line: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(errno.EBADMSG, "a message is a JSON object")
    return message


class Channel:
    """One end of a connection: whole lines in, whole lines out (a lock per direction)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = encode(message)
        with self._send_lock:
            self.sock.sendall(data)

    def receive(self) -> dict[str, Any] | None:
        """The next message; None at end of stream. ProtocolError for a malformed or oversized one (an
        oversized line is skipped to its end, so the stream stays in step)."""
        skipping = False
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                if skipping:
                    raise ProtocolError(errno.EMSGSIZE, f"message longer than {MAX_MESSAGE} bytes")
                return decode(line)
            if len(self._buffer) > MAX_MESSAGE:
                self._buffer.clear()
                skipping = True
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self._buffer += chunk

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def connect(path: str | None = None, timeout: float = 5.0) -> Channel | None:
    """A channel to the service, or None when no service listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path or socket_path())
    except OSError:
        sock.close()
        return None
    return Channel(sock)


def call(method: str, params: dict[str, Any] | None = None, path: str | None = None, timeout: float = 10.0) -> Any:
    """One request to the service and its result. CBFSFilterError with the service's errno when it refuses,
    ECONNREFUSED when no service runs."""
    channel = connect(path, timeout)
    if channel is None:
        raise CBFSFilterError(errno.ECONNREFUSED, f"fsfilterd is not running (no socket at {path or socket_path()}):"
                                                  " start it with 'systemctl start fsfilterd' or 'fsfilterd "
                                                  "--foreground'")
    try:
        channel.send({"id": 1, "method": method, "params": params or {}})
        answer = channel.receive()
    except (OSError, ProtocolError) as exc:
        raise CBFSFilterError(errno.EIO, f"fsfilterd did not answer {method}: {exc}") from exc
    finally:
        channel.close()
    if answer is None:
        raise CBFSFilterError(errno.EIO, f"fsfilterd closed the connection without answering {method}")
    error = answer.get("error")
    if isinstance(error, dict):
        raise CBFSFilterError(int(error.get("code", errno.EIO)), str(error.get("message", "")))
    return answer.get("result")


# -- event parameters on the channel: buffers as base64, pointers rebuilt on the receiving side


def encode_value(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b64": base64.b64encode(bytes(value)).decode()}
    return None  # pointers (ctypes) and objects: rebuilt on the other side


def encode_params(params: EventParamsBase) -> dict[str, object]:
    return {name: encode_value(getattr(params, name)) for name in type(params).__slots__ if name != "buffer"}


def decode_params(cls: type[EventParamsBase], fields: dict[str, Any]) -> EventParamsBase:
    """An event's parameters from the channel: buffers become writable bytearrays (``buffer`` points into
    ``buffer_view``'s storage, as it does for an embedded filter)."""
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in cls._fields:
            raise ProtocolError(errno.EBADMSG, f"{cls.__name__} has no parameter {name!r}")
        if isinstance(value, dict):
            value = memoryview(bytearray(base64.b64decode(str(value.get("b64", "")))))
        values[name] = value
    view = values.get("buffer_view")
    if "buffer" in cls._fields and isinstance(view, memoryview) and len(view):
        # The address of the bytearray's storage, which the view (and so the parameters) keeps alive.
        values["buffer"] = ctypes.c_void_p(ctypes.addressof((ctypes.c_char * len(view)).from_buffer(view.obj)))
    return cls(**values)


def changed_fields(params: EventParamsBase, before: dict[str, object]) -> dict[str, object]:
    now = encode_params(params)
    return {k: v for k, v in now.items() if before.get(k) != v}
