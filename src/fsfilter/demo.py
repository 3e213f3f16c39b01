"""``fsfilter demo``: a short live demonstration on a temporary directory.

It mounts fsfilter over a temporary directory in place, streams the requests the kernel sends while
ordinary programs work in it, denies writes to one file, hides another, and unmounts cleanly. The
denying and hiding here are a small policy written directly on the request handlers; CBFilter's
rules give applications the same power through the SDK's API.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from fsfilter.abi import fuse as abi
from fsfilter.api.passthrough import PassthroughFilter
from fsfilter.errors import CBFSFilterError
from fsfilter.sessions.lower_fs import Inode, LowerFS
from fsfilter.wire import fuse as wire
from fsfilter.wire.fuse import Request

PROTECTED = b"protected.txt"
HIDDEN = b"hidden.txt"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC


class DemoFS(LowerFS):
    """A pass-through that refuses to change PROTECTED and acts as if HIDDEN did not exist."""

    def hides(self, parent: Inode, name: bytes) -> bool:
        return parent.nodeid == abi.ROOT_ID and name == HIDDEN

    def _named(self, req: Request, name: bytes) -> bool:
        node = self.nodes.get(req.nodeid)
        return node is not None and node.parent == abi.ROOT_ID and node.name == name

    def lookup(self, req: Request) -> bytes:
        name, _ = wire.name_at(req.body)
        if self.hides(self.inode(req.nodeid), name):
            raise OSError(errno.ENOENT, "hidden")  # invisible to stat and path walks, not only to listings
        return super().lookup(req)

    def open(self, req: Request) -> bytes:
        flags, _ = wire.fixed(req.body, abi.OPEN_IN)
        if flags & _WRITE_FLAGS and self._named(req, PROTECTED):
            raise OSError(errno.EACCES, "protected")
        return super().open(req)

    def setattr(self, req: Request) -> bytes:
        if self._named(req, PROTECTED):
            raise OSError(errno.EACCES, "protected")
        return super().setattr(req)


class DemoFilter(PassthroughFilter):
    def _make_fs(self, lower_fd: int) -> LowerFS:
        return DemoFS(lower_fd, self.lower_options)


_NAME_OFFSET: dict[int, int] = {
    abi.Opcode.LOOKUP: 0, abi.Opcode.UNLINK: 0, abi.Opcode.RMDIR: 0, abi.Opcode.SYMLINK: 0,
    abi.Opcode.MKDIR: abi.MKDIR_IN.size, abi.Opcode.MKNOD: abi.MKNOD_IN.size, abi.Opcode.CREATE: abi.CREATE_IN.size,
    abi.Opcode.RENAME: abi.RENAME_IN.size, abi.Opcode.RENAME2: abi.RENAME2_IN.size, abi.Opcode.LINK: abi.LINK_IN.size,
}


def _named_path(base: bytes, req: Request) -> str:
    """The path a request is about: the node's, plus the entry name for requests that carry one."""
    offset = _NAME_OFFSET.get(req.opcode)
    if offset is not None:
        try:
            name, _ = wire.cstring(req.body, offset)
            base = base.rstrip(b"/") + b"/" + name
        except wire.WireError:
            pass
    return base.decode(errors="replace")


def _comm(pid: int) -> str:
    if pid == 0:
        return "(kernel, last close)"
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def run_demo(quiet: bool = False) -> int:
    if os.geteuid() != 0:
        raise CBFSFilterError(errno.EPERM, "the demo mounts with mount(2): run it as root (sudo fsfilter demo)")
    base = tempfile.mkdtemp(prefix="fsfilter-demo-")
    say = (lambda *a: None) if quiet else print
    lines: list[str] = []
    lines_lock = threading.Lock()
    filt: DemoFilter | None = None
    try:
        with open(os.path.join(base, "protected.txt"), "w") as f:
            f.write("this file may be read but not changed\n")
        with open(os.path.join(base, "hidden.txt"), "w") as f:
            f.write("nobody sees this\n")
        with open(os.path.join(base, "notes.txt"), "w") as f:
            f.write("hello from the lower directory\n")
        print(f"== fsfilter demo on {base}")
        print("   files before the mount:", ", ".join(sorted(os.listdir(base))))
        filt = DemoFilter(base)

        def trace(req: Request) -> None:
            if req.opcode in (abi.Opcode.FORGET, abi.Opcode.BATCH_FORGET, abi.Opcode.INTERRUPT):
                return
            try:
                op = abi.Opcode(req.opcode).name
            except ValueError:
                op = str(req.opcode)
            path = _named_path(filt.path_of(req.nodeid), req) if filt is not None else "?"
            with lines_lock:
                lines.append(f"   {op:<12} {path:<22} pid {req.pid:<7} {_comm(req.pid)}")

        filt.set_trace(trace)
        filt.start()
        mode = "kernel passthrough for reads and writes" if filt.passthrough_active else "daemon-served I/O"
        print(f"== mounted over the directory itself ({mode}); requests as the daemon sees them:")

        def step(title: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
            with lines_lock:
                lines.clear()
            result = subprocess.run(argv, cwd=base, capture_output=True, text=True, timeout=30)
            time.sleep(0.05)
            print(f"-- {title}: $ {' '.join(argv)}")
            for out in (result.stdout.strip(), result.stderr.strip()):
                if out:
                    print("   | " + out.replace("\n", "\n   | "))
            with lines_lock:
                for line in lines[:12]:
                    say(line)
                if len(lines) > 12:
                    say(f"   ... and {len(lines) - 12} more requests")
            return result

        step("list the directory", ["ls", "-l", base])
        step("read a file", ["cat", os.path.join(base, "notes.txt")])
        step("append to a file", ["sh", "-c", f"echo appended >> {base}/notes.txt && tail -n 1 {base}/notes.txt"])
        denied = step("write to the protected file", ["sh", "-c", f"echo changed > {base}/protected.txt"])
        print(f"   => write denied: exit status {denied.returncode}, file still says: "
              f"{open(os.path.join(base, 'protected.txt')).read().strip()!r}")
        hidden = step("open the hidden file by name", ["cat", os.path.join(base, "hidden.txt")])
        print(f"   => hidden: exit status {hidden.returncode}; listing shows: {', '.join(sorted(os.listdir(base)))}")
        step("make, move and remove a directory",
             ["sh", "-c", f"mkdir {base}/d && mv {base}/d {base}/e && rmdir {base}/e"])
        step("write and read back 4 MiB", ["sh", "-c", f"head -c 4194304 /dev/urandom > {base}/big && "
                                                       f"cmp {base}/big {base}/big && rm {base}/big && echo same"])
        stats = filt.stats
        if stats is not None:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(stats.by_opcode().items()))
            print(f"== requests served: {counts}")
        filt.stop()
        filt = None
        still = any(m.split()[1] == base for m in open("/proc/mounts"))
        print(f"== unmounted cleanly: {not still}; files after: {', '.join(sorted(os.listdir(base)))}")
        return 0 if not still and denied.returncode != 0 and hidden.returncode != 0 else 1
    finally:
        if filt is not None:
            filt.stop()
        shutil.rmtree(base, ignore_errors=True)
        sys.stdout.flush()
