"""The journal: the bottom layer's tables, written as they change into shared memory another process holds, so that
a mount outlives the sudden death (SIGKILL, a crash) of the process that serves it.

The watchdog (a separate process started before the mount) holds the memfd, the /dev/fuse connection and the lower
directory. When the daemon dies without saying goodbye, the watchdog starts a rescuer (service/rescue.py), which reads
the journal, reopens every node by the names it was last known by (from the lower directory down) and every open by
its node, and serves the mount on: nothing the kernel holds names anything the rescuer does not know.

Layout (little-endian): a header page (its length, then JSON: the mount, the session's options and what INIT
negotiated), then NODES fixed slots of NODE (state 1 = in use), then OPENS slots of OPEN (kind 1 = a file, 2 = a
directory; 0 = free). Only what a rescuer needs is written, where the table changes anyway: a new node and its name,
its lookup count, its passthrough counts, a rename, a forget; an open, its I/O mode, its release. A pack_into into a
mapping: no system call. The memfd is sparse: only slots in use take memory.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Any

__all__ = ["Journal"]

VERSION = 1  # in the header ("journal"): a rescuer refuses a journal of another layout
HEADER = 65536
# state, name length, nlookup, node id, parent, backing id, backing refs, daemon opens, st_dev, st_ino, name
NODE = struct.Struct("<BxHiQQIIIQQ256s")
OPEN = struct.Struct("<BbxxiQQ")  # kind, passthrough (-1 unknown, 0, 1), open flags, fh, nodeid
INTENT = struct.Struct("<Q")  # the unique of the change a thread is making (or made last)
NODES = 1 << 20
OPENS = 1 << 18
INTENTS = 1024
_NLOOKUP = struct.Struct("<i")
_NLOOKUP_AT = 4
_OPENS_AT = HEADER + NODES * NODE.size
_INTENTS_AT = _OPENS_AT + OPENS * OPEN.size
_SIZE = _INTENTS_AT + INTENTS * INTENT.size


class _Slots:
    """Which fixed slot each key (a node id, a handle) has: freed slots are taken again first."""

    __slots__ = ("_of", "_free", "_next", "_limit")

    def __init__(self, limit: int) -> None:
        self._of: dict[int, int] = {}
        self._free: list[int] = []
        self._next = 0
        self._limit = limit

    def get(self, key: int) -> int | None:
        return self._of.get(key)

    def take(self, key: int) -> int | None:
        """The key's slot, given one if it has none; None when every slot is in use."""
        slot = self._of.get(key)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            elif self._next < self._limit:
                slot = self._next
                self._next += 1
            else:
                return None
            self._of[key] = slot
        return slot

    def drop(self, key: int) -> int | None:
        """Free the key's slot; returns it (None when it had none)."""
        slot = self._of.pop(key, None)
        if slot is not None:
            self._free.append(slot)
        return slot


class Journal:
    """Writes the tables of one mount. Every method is called with the tables' lock (LowerBase._lock) held, or
    before serving."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, _SIZE)
        self._nodes = _Slots(NODES)  # by node id
        self._opens = _Slots(OPENS)  # by handle
        self._next_intent = 0
        self.full = False  # out of slots: the journal no longer tells the whole truth (a rescue is refused)

    @classmethod
    def create(cls) -> Journal:
        fd = os.memfd_create("fsfilter-journal", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _SIZE)
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)

    def _overflow(self) -> None:
        self.full = True
        self._map[HEADER - 1] = 1  # a rescuer reading it gives up: it would not know every node

    def write_header(self, header: dict[str, Any]) -> None:
        data = json.dumps({**header, "journal": VERSION}).encode()
        if len(data) + 5 > HEADER:
            raise ValueError("journal header too large")
        self._map[4:4 + len(data)] = data
        self._map[0:4] = len(data).to_bytes(4, "little")

    # -- nodes

    def node(self, nodeid: int, parent: int, name: bytes, nlookup: int, key: tuple[int, int], backing_id: int = 0,
             backing_refs: int = 0, daemon_opens: int = 0) -> None:
        """Write a node's whole record (a new node, or its name changed). ``key``: (st_dev, st_ino), so that a rescuer
        takes only the very object back, never what its name leads to now."""
        slot = self._nodes.take(nodeid)
        if slot is None:
            self._overflow()
            return
        at = HEADER + slot * NODE.size
        # In use only once whole: a death in the middle of the copy leaves a slot a rescuer skips.
        NODE.pack_into(self._map, at, 0, len(name), nlookup, nodeid, parent, backing_id, backing_refs, daemon_opens,
                       key[0], key[1], name)
        self._map[at] = 1

    def count(self, nodeid: int, nlookup: int) -> None:
        slot = self._nodes.get(nodeid)
        if slot is not None:
            _NLOOKUP.pack_into(self._map, HEADER + slot * NODE.size + _NLOOKUP_AT, nlookup)

    def forget(self, nodeid: int) -> None:
        slot = self._nodes.drop(nodeid)
        if slot is not None:
            self._map[HEADER + slot * NODE.size] = 0

    # -- opens

    def opened(self, fh: int, nodeid: int, flags: int, is_dir: bool, passthrough: bool | None = None) -> None:
        slot = self._opens.take(fh)
        if slot is None:
            self._overflow()
            return
        at = _OPENS_AT + slot * OPEN.size
        OPEN.pack_into(self._map, at, 0, -1 if passthrough is None else int(passthrough), flags, fh, nodeid)
        self._map[at] = 2 if is_dir else 1

    def intent_slot(self) -> int:
        """A slot for one serving thread's intents (see intend); -1 when none is left."""
        if self._next_intent >= INTENTS:
            return -1
        self._next_intent += 1
        return self._next_intent - 1

    def intend(self, slot: int, unique: int) -> None:
        """The thread with ``slot`` starts a change the kernel asked for with ``unique`` (a create, a removal, a
        rename ...): should the process die before answering, the kernel resends it, and a rescuer knows it may have
        been done (and only then takes "it exists already" for done). Needs no lock: the slot is the thread's."""
        if slot >= 0:
            INTENT.pack_into(self._map, _INTENTS_AT + slot * INTENT.size, unique)

    def closed(self, fh: int) -> None:
        slot = self._opens.drop(fh)
        if slot is not None:
            self._map[_OPENS_AT + slot * OPEN.size] = 0


def read(fd: int) -> dict[str, Any]:
    """What a journal holds: {"header": {...}, "nodes": [(nodeid, parent, name, nlookup, backing_id, backing_refs,
    daemon_opens, st_dev, st_ino)], "opens": [(fh, nodeid, flags, is_dir, passthrough)], "full": bool, "intents": the
    uniques of changes under way or made last}."""
    with mmap.mmap(fd, _SIZE, prot=mmap.PROT_READ) as m:
        size = int.from_bytes(m[0:4], "little")
        header = json.loads(m[4:4 + size]) if size else {}
        nodes = []
        for slot in range(NODES):
            at = HEADER + slot * NODE.size
            if m[at] != 1:
                if not any(m[at:at + NODE.size]):
                    break  # slots are taken in order (a freed one keeps its bytes): past the last ever used
                continue
            (_, length, nlookup, nodeid, parent, backing_id, backing_refs, daemon_opens, dev, ino,
             name) = NODE.unpack_from(m, at)
            nodes.append((nodeid, parent, name[:length], nlookup, backing_id, backing_refs, daemon_opens, dev, ino))
        opens = []
        for slot in range(OPENS):
            at = _OPENS_AT + slot * OPEN.size
            kind = m[at]
            if kind == 0:
                if not any(m[at:at + OPEN.size]):
                    break
                continue
            _, passthrough, flags, fh, nodeid = OPEN.unpack_from(m, at)
            opens.append((fh, nodeid, flags, kind == 2, None if passthrough < 0 else bool(passthrough)))
        full = bool(m[HEADER - 1])
        intents = {INTENT.unpack_from(m, _INTENTS_AT + i * INTENT.size)[0] for i in range(INTENTS)} - {0}
    return {"header": header, "nodes": nodes, "opens": opens, "full": full, "intents": intents}
