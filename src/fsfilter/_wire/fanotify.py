"""Decoding fanotify event records: the fixed metadata, then the info records that follow it."""

from __future__ import annotations

from dataclasses import dataclass, field

from fsfilter._abi import fanotify as abi


class RecordError(ValueError):
    """A record that does not fit the layout the kernel documents."""


@dataclass(frozen=True, slots=True)
class ObjectId:
    """A file system object as a FID record names it: the file system id and a file handle."""

    fsid: tuple[int, int]
    handle_type: int
    handle: bytes


@dataclass(slots=True)
class Event:
    mask: int
    fd: int  # an open fd of the object (fd-mode groups), else FAN_NOFD
    pid: int
    pidfd: int = abi.FAN_NOPIDFD
    object: ObjectId | None = None  # FID: the object itself
    directory: ObjectId | None = None  # DFID(_NAME): the directory of the entry
    name: bytes | None = None  # DFID_NAME: the entry's name ("." for the directory itself)
    old: tuple[ObjectId, bytes] | None = None  # OLD_DFID_NAME of a rename
    new: tuple[ObjectId, bytes] | None = None  # NEW_DFID_NAME of a rename
    error: int = 0  # FS_ERROR: the file system's error
    extra: list[tuple[int, bytes]] = field(default_factory=list)  # info records of other types


def _object(body: memoryview) -> tuple[ObjectId, int]:
    """A FID body (fsid, then a struct file_handle); returns it and where the bytes after it start."""
    if len(body) < abi.FSID.size + abi.FILE_HANDLE.size:
        raise RecordError("FID record too short")
    fsid = abi.FSID.unpack_from(body, 0)
    size, kind = abi.FILE_HANDLE.unpack_from(body, abi.FSID.size)
    start = abi.FSID.size + abi.FILE_HANDLE.size
    if start + size > len(body):
        raise RecordError("file handle longer than its record")
    return ObjectId((fsid[0], fsid[1]), kind, bytes(body[start:start + size])), start + size


def _named(body: memoryview) -> tuple[ObjectId, bytes]:
    obj, end = _object(body)
    rest = bytes(body[end:])
    nul = rest.find(b"\0")
    return obj, rest if nul < 0 else rest[:nul]


def decode(buffer: bytes | bytearray | memoryview) -> list[Event]:
    """Every event record in what one read(2) of a fanotify fd returned."""
    view = memoryview(buffer)
    events: list[Event] = []
    offset = 0
    meta = abi.EVENT_METADATA
    while offset + meta.size <= len(view):
        event_len, vers, _, metadata_len, mask, fd, pid = meta.unpack_from(view, offset)
        if vers != abi.FANOTIFY_METADATA_VERSION:
            raise RecordError(f"fanotify metadata version {vers}, expected {abi.FANOTIFY_METADATA_VERSION}")
        if event_len < metadata_len or metadata_len < meta.size or offset + event_len > len(view):
            raise RecordError(f"bad record lengths: event {event_len}, metadata {metadata_len}")
        event = Event(mask, fd, pid)
        pos, end = offset + metadata_len, offset + event_len
        while pos + abi.INFO_HEADER.size <= end:
            kind, _, length = abi.INFO_HEADER.unpack_from(view, pos)
            if length < abi.INFO_HEADER.size or pos + length > end:
                raise RecordError(f"info record of type {kind} has a bad length {length}")
            body = view[pos + abi.INFO_HEADER.size:pos + length]
            if kind == abi.FAN_EVENT_INFO_TYPE_FID:
                event.object = _object(body)[0]
            elif kind == abi.FAN_EVENT_INFO_TYPE_DFID:
                event.directory = _object(body)[0]
            elif kind == abi.FAN_EVENT_INFO_TYPE_DFID_NAME:
                event.directory, event.name = _named(body)
            elif kind == abi.FAN_EVENT_INFO_TYPE_OLD_DFID_NAME:
                event.old = _named(body)
            elif kind == abi.FAN_EVENT_INFO_TYPE_NEW_DFID_NAME:
                event.new = _named(body)
            elif kind == abi.FAN_EVENT_INFO_TYPE_PIDFD:
                event.pidfd = abi.PIDFD_INFO.unpack_from(body, 0)[0]
            elif kind == abi.FAN_EVENT_INFO_TYPE_ERROR:
                event.error = int.from_bytes(body[:4], "little", signed=True) if len(body) >= 4 else 0
            else:
                event.extra.append((kind, bytes(body)))
            pos += length
        events.append(event)
        offset += event_len
    return events


def encode_response(fd: int, response: int) -> bytes:
    return abi.RESPONSE.pack(fd, response)
