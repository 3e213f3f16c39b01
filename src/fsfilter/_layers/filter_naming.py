"""The part of a CBFilter layer about names: where a reparse rule sends a name, and names a before-open handler hides,
which must behave as absent for every operation that names them (see filter.py)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from fsfilter._abi import fuse as abi
from fsfilter._engine.rules import Flags
from fsfilter._layers.filter_base import FilterBase
from fsfilter._sessions.nodes import Inode
from fsfilter._wire import ops
from fsfilter._wire.replies import Reply
from fsfilter.api import constants as c
from fsfilter.api import params as ev


class FilterNaming(FilterBase):
    """Reparse targets and hidden names, for every part that resolves, creates or removes a name."""

    def reparse_target(self, op: ops.Op | None, parent: Inode, name: bytes) -> str | None:
        """Where a name is redirected (an absolute path), or None."""
        core = self.core
        path = self.child_path(parent.nodeid, name)
        if not self.in_scope(path):
            return None
        hit = core.reparse.resolve(path) if len(core.reparse) else None
        target = hit[0] if hit is not None else None
        if op is not None and core.control_handlers & c.FS_CE_REPARSE_FILENAME:
            flags = self.effective(self.match_name(path), op.pid, parent=parent, name=name)
            params = self.fire(ev.CBFilterReparseFileNameEventParams, c.FS_CE_REPARSE_FILENAME, flags, self.origin(op),
                               file_name=path, reparsed_name=target or "")
            if params is not None:
                chosen = params.reparsed_name
                if chosen and (not isinstance(chosen, str) or not chosen.startswith("/")):
                    raise OSError(errno.EINVAL, f"on_reparse_file_name gave {chosen!r}: give an absolute path")
                target = os.path.normpath(chosen) if chosen else None
        if target is None or target == path or target == "/":
            return None
        return target

    def _is_ancestor(self, node: Inode, key: tuple[int, int]) -> bool:
        seen = 0
        current: Inode | None = node
        while current is not None and seen < 4096:
            if current.key == key:
                return True
            if current.nodeid == abi.ROOT_ID:
                return False
            current = self.lower.nodes.get(current.parent)
            seen += 1
        return False

    def _redirected(self, op: ops.Op, parent: Inode, name: bytes) -> bool:
        core = self.core
        if not (len(core.reparse) or core.control_handlers & c.FS_CE_REPARSE_FILENAME):
            return False
        return self.reaches(parent.nodeid) and self.reparse_target(op, parent, name) is not None

    def _fire_lookup(self, op: ops.Op, flags: Flags, path: str) -> None:
        """The before-open event a LOOKUP fires (raises OSError when the handler refuses the name)."""
        self.fire(ev.CBFilterBeforeOpenFileEventParams, c.FS_CE_BEFORE_OPEN, flags, self.origin(op), file_name=path,
                  desired_access=c.DESIRED_ACCESS_FILE_READ_ATTRIBUTES, options=os.O_PATH, flags=os.O_PATH,
                  create_disposition=c.FILE_DISPOSITION_OPEN_EXISTING)

    def _lookup_refusal(self, op: ops.Op, parent: Inode, name: bytes, path: str | None = None) -> int:
        """The errno a LOOKUP of this *existing* name would get from the before-open handler (0: none, or the
        name does not exist). A name hidden that way must behave as absent for every request naming it."""
        core = self.core
        if not core.control_handlers & c.FS_CE_BEFORE_OPEN or core.handler("before_open_file") is None:
            return 0
        path = self.child_path(parent.nodeid, name) if path is None else path
        flags = self.effective(self.match_name(path), op.pid, parent=parent, name=name)
        if not flags.control & c.FS_CE_BEFORE_OPEN:
            return 0
        dfd, at, owned = self.lower.locate(None, parent, name)
        try:
            os.stat(at, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            return 0
        finally:
            if owned:
                os.close(dfd)
        try:
            self._fire_lookup(op, flags, path)
        except OSError as exc:
            return exc.errno or errno.EACCES
        return 0

    def _check_not_hidden(self, op: ops.Op, parent: Inode, name: bytes) -> None:
        """Refuse to create, link or rename over a name a handler hides. Doing it would destroy the hidden object
        (or fail with EEXIST, which reveals it): EACCES says neither."""
        if self._lookup_refusal(op, parent, name):
            raise OSError(errno.EACCES, "the name is hidden by an event handler")

    def _hidden_emptiness(self, op: ops.Op, parent: Inode, name: bytes, serve: Callable[[], Reply]) -> Reply:
        """Serve an rmdir of, or a rename over, the directory ``name``; its ENOTEMPTY becomes EACCES when every
        entry left in it is hidden (ENOTEMPTY would reveal them)."""
        try:
            return serve()
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY and self._only_hidden_inside(op, parent, name):
                raise OSError(errno.EACCES, "the directory holds hidden names") from exc
            raise

    def _only_hidden_inside(self, op: ops.Op, parent: Inode, name: bytes) -> bool:
        """Whether the directory ``name`` holds entries, all of them hidden. Stops at the first visible entry."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        except OSError:
            return False
        try:
            inside = Inode(-1, fd, (0, 0), parent.nodeid, name)  # only its fd is used: rules' facts and the names
            path = self.child_path(parent.nodeid, name)
            seen = False
            for entry in os.scandir(fd):
                seen = True
                if not self._lookup_refusal(op, inside, os.fsencode(entry.name), f"{path}/{entry.name}"):
                    return False
            return seen
        finally:
            os.close(fd)

    def _hiding_children(self, nodeid: int) -> bool:
        """Whether a handler may hide names in this directory (then its link count, which counts
        subdirectories, would give hidden ones away)."""
        core = self.core
        if not core.control_handlers & (c.FS_CE_BEFORE_OPEN | c.FS_CE_AFTER_ENUMERATE_DIRECTORY) or \
                not core.config_bool("HideDirectoryLinkCounts"):
            return False
        return self.reaches(nodeid) and core.rules.may_match_child(self.abspath(nodeid))
