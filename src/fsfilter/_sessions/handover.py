"""What a successor process needs to go on serving a FUSE connection this process served: the bottom layer's node and
handle tables, written as plain data plus the fds they refer to (passed with SCM_RIGHTS next to it).

The kernel names objects by our node ids and opens by our handles, so a successor must give both the same meaning.
Node ids and handles are kept as they are (the successor continues the node counter; its own new opens get a handle
number no adopted handle has, see LowerBase.new_handle), and every fd the tables hold travels with them: the O_PATH
fd of each node (an unlinked file or a renamed directory stays reachable, which a path or even a file handle would
not guarantee), and the lower fd of each open file and directory. Kernel passthrough backing ids belong to the
connection, not the process, so they stay valid as they are. The format is written down in docs/service.md
("Restart and upgrade"); FORMAT changes whenever its meaning does, and a successor refuses a format it does not know
(the predecessor then goes on serving).
"""

from __future__ import annotations

import os
from typing import Any

from fsfilter._abi import fuse as abi
from fsfilter._sessions.lower_base import LowerBase
from fsfilter._sessions.nodes import Inode, LowerFile, OpenDir, OpenFile

__all__ = ["FORMAT", "Unmovable", "export_tables", "import_tables"]

FORMAT = 2


class Unmovable(Exception):
    """The tables hold state no successor could take over (it stays with this process)."""


def export_tables(fs: LowerBase, fds: list[int]) -> dict[str, Any]:
    """The tables of a quiesced bottom layer as plain data; the fds they hold are appended to ``fds`` and named by
    their index there. Raises Unmovable when a lock is held through the daemon or a layer replaced an open's backend
    (their state lives in objects of this process)."""
    def ref(fd: int) -> int:
        fds.append(fd)
        return len(fds) - 1

    if fs.options.locks and (fs.locks.count() or fs.locks.waiting()):
        raise Unmovable("locks are held through the daemon")
    def row(node: Inode, fd_index: int | None = None) -> list[Any]:
        return [node.nodeid, ref(node.fd) if fd_index is None else fd_index, node.key[0], node.key[1], node.nlookup,
                node.parent, node.name.hex(), node.backing_id, node.backing_refs, node.daemon_opens,
                list(node.cache_sig) if node.cache_sig is not None else None]

    nodes = [row(node) for node in fs.nodes.values() if node.nodeid != abi.ROOT_ID]
    # A node the kernel has forgotten while an open of it lives on here: kept for that open only (not in the table).
    # Its O_PATH fd was closed when it was forgotten: the taker's copy stands on the open's own fd (the open is all
    # that uses it, and closing the open closes it).
    unlisted: dict[str, list[Any]] = {}
    files = []
    for fh, f in fs.files.items():
        if type(f.backend) is not LowerFile:
            raise Unmovable(f"an open of {fs.path_of(f.inode.nodeid)!r} is served by a layer's own backend")
        index = ref(f.fd)
        key = ""
        if fs.nodes.get(f.inode.nodeid) is not f.inode and f.inode.nodeid != abi.ROOT_ID:
            key = str(id(f.inode))
            if key not in unlisted:
                unlisted[key] = row(f.inode, index)
        files.append([fh, index, f.inode.nodeid, f.passthrough, key, f.flags])
    dirs = [[fh, ref(d.fd), d.nodeid] for fh, d in fs.dirs.items()]
    return {"next_id": fs._next_id, "root_nlookup": fs.root.nlookup, "passthrough": fs.passthrough,
            "nodes": nodes, "unlisted": unlisted, "files": files, "dirs": dirs, "maybe_done": sorted(fs.maybe_done)}


def import_tables(fs: LowerBase, state: dict[str, Any], fds: list[int]) -> None:
    """Fill a new bottom layer (made on the same lower directory, not yet serving) from export_tables' data; the fds
    are taken over (the tables close them when the kernel forgets or releases what they stand for)."""
    def node_of(row: list[Any]) -> Inode:
        nodeid, fd, dev, ino, nlookup, parent, name, backing_id, backing_refs, daemon_opens, sig = row
        node = Inode(int(nodeid), fds[fd], (int(dev), int(ino)), int(parent), bytes.fromhex(name))
        node.nlookup = int(nlookup)
        node.backing_id, node.backing_refs, node.daemon_opens = int(backing_id), int(backing_refs), int(daemon_opens)
        node.cache_sig = (int(sig[0]), int(sig[1])) if sig is not None else None
        return node

    fs.root.nlookup = int(state["root_nlookup"])
    fs.passthrough = bool(state["passthrough"])
    fs._next_id = int(state["next_id"])
    fs.maybe_done = {int(u) for u in state.get("maybe_done", [])}
    for row in state["nodes"]:
        node = node_of(row)
        fs.nodes[node.nodeid] = node
        fs.by_key[node.key] = node
    unlisted = {key: node_of(row) for key, row in state["unlisted"].items()}
    for fh, fd, nodeid, passthrough, which, flags in state["files"]:
        inode = unlisted[which] if which else fs.nodes[int(nodeid)]
        record = OpenFile(fds[fd], inode, os.fstat(fds[fd]), int(flags))
        record.passthrough = passthrough if passthrough is None else bool(passthrough)
        fs.files[int(fh)] = record
    for fh, fd, nodeid in state["dirs"]:
        d = OpenDir(fds[fd], int(nodeid))
        d.pos = -1  # the fd stands past entries the predecessor had read ahead: seek to what the kernel asks next
        fs.dirs[int(fh)] = d
