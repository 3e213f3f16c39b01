"""PassthroughFilter: a directory served through fsfilter's FUSE daemon, changing nothing.

It is the foundation CBFilter grows from: it mounts over a directory (or at another mount point),
serves every request on the lower directory, and leaves reads and writes to kernel passthrough
unless ``io_policy`` says a file's I/O must go through the daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import subprocess
import threading
import types
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from fsfilter._abi import fuse as abi
from fsfilter._abi import linux
from fsfilter._sessions import keeper
from fsfilter._sessions.fuse_session import Negotiated, Session, SessionOptions, SessionStats
from fsfilter._sessions.journal import Journal
from fsfilter._sessions.lower_fs import IoPolicy, LowerFS, LowerOptions
from fsfilter._system import fuse_device, libc
from fsfilter._wire import fuse as wire
from fsfilter._wire.fuse import Request
from fsfilter.errors import CBFSFilterError

__all__ = ["PassthroughFilter", "check_filterable"]

log = logging.getLogger("fsfilter")

# What a mount's watchdog does should this process die (see _system/watchdog.py): "drain" (serve the programs still
# inside, detached, as the plain pass-through until they leave), "hold:SOCKET" (fsfilterd: keep it attached, hold
# other processes' requests, for the next fsfilterd), "" (nothing: the mount is detached, as before).
rescue_mode = "" if os.environ.get("FSFILTER_RESCUE", "1") == "0" else "drain"
_SRC = str(Path(__file__).resolve().parents[2])  # where the rescuer imports fsfilter from

# Mount points this process serves. A filter mounted inside one of them would have its daemon wait for itself.
_served: set[str] = set()
_served_lock = threading.Lock()


def check_filterable(path: str, what: str = "directory to filter") -> None:
    """Refuse, with a CBFSFilterError that says why, a directory no filter can stand on: one on a pseudo file system
    (procfs, sysfs, cgroup …, whose content the kernel makes up), or one inside a mount this process serves itself."""
    try:
        kind = libc.statfs_type(path)
    except OSError as exc:
        raise CBFSFilterError.from_os_error(exc, f"cannot use {path} as the {what}") from exc
    name = linux.PSEUDO_FS_MAGIC.get(kind)
    if name is not None:
        raise CBFSFilterError(errno.EINVAL, f"{path} is on {name}, whose files the kernel makes up: filter a directory "
                                            "of a real file system (ext4, xfs, btrfs, tmpfs …)")
    if kind == linux.FUSE_SUPER_MAGIC:
        real = os.path.realpath(path)
        with _served_lock:
            inside = [p for p in _served if real == p or real.startswith(p.rstrip("/") + "/")]
        if inside:
            raise CBFSFilterError(errno.EDEADLK, f"{path} lies inside {inside[0]}, which this process filters: its "
                                                 "requests would wait for this process itself; attach one filter "
                                                 "to the outer directory, or filter from another process")


class PassthroughFilter:
    """Serve ``lower`` at ``mountpoint`` (over ``lower`` itself when it is None) until stopped.

    ``workers``: reader threads (each on a cloned /dev/fuse fd); ``pool``: threads for requests that
    can block; ``passthrough``: use kernel passthrough where the kernel allows it; ``io_policy``:
    a callable given a file's path (bytes, relative to the mount, starting with "/") that returns True
    when the daemon must see that file's reads and writes. Timeouts are in seconds. ``request_timeout``:
    the kernel aborts the connection (callers get ECONNABORTED/ENOTCONN) when any request stays unanswered
    that long, e.g. while this process is stopped (SIGSTOP); 0 = wait forever (kernel 6.14+).
    """

    def __init__(self, lower: str | os.PathLike[str], mountpoint: str | os.PathLike[str] | None = None, *,
                 workers: int = 1, pool: int = 4, passthrough: bool = True, io_policy: IoPolicy | None = None,
                 entry_timeout: float = 60.0, attr_timeout: float = 60.0, negative_timeout: float = 10.0,
                 allow_other: bool | None = None, spin: float = 0.0002, locks: bool = False,
                 request_timeout: int = 45, resolve: bool = True) -> None:
        if workers < 1 or workers > 64:
            raise CBFSFilterError(errno.EINVAL, f"workers must be between 1 and 64, not {workers}")
        if pool < 1 or pool > 256:
            raise CBFSFilterError(errno.EINVAL, f"pool must be between 1 and 256, not {pool}")
        for name, value in (("entry_timeout", entry_timeout), ("attr_timeout", attr_timeout),
                            ("negative_timeout", negative_timeout), ("spin", spin)):
            if not 0 <= value <= 86400:
                raise CBFSFilterError(errno.EINVAL, f"{name} must be between 0 and 86400 seconds, not {value}")
        if isinstance(request_timeout, bool) or not isinstance(request_timeout, int) \
                or not 0 <= request_timeout <= 0xFFFF:
            raise CBFSFilterError(errno.EINVAL, f"request_timeout must be whole seconds from 0 (none) to 65535, "
                                                f"not {request_timeout!r}")
        # ``resolve=False``: the paths are canonical already (a mount taken over from another process, whose paths
        # must not be walked before this process serves them).
        real = os.path.realpath if resolve else os.path.normpath
        self.lower = real(os.fspath(lower))
        self.mountpoint = real(os.fspath(mountpoint)) if mountpoint is not None else self.lower
        self.in_place = self.mountpoint == self.lower
        self.session_options = SessionOptions(workers=workers, pool=pool, passthrough=passthrough, spin=spin,
                                              locks=locks, request_timeout=request_timeout)
        self.lower_options = LowerOptions(entry_timeout, attr_timeout, negative_timeout, io_policy, locks)
        self.allow_other = (os.geteuid() == 0) if allow_other is None else allow_other
        self.session: Session | None = None
        self.fs: LowerFS | None = None
        self._dev_fd = -1
        self._lower_fd = -1
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._fusermount: tuple[subprocess.Popen[bytes], socket.socket] | None = None
        self._trace: Callable[[Request], None] | None = None
        self._stop_lock = threading.Lock()
        self._mount_id = -1
        self._journal: Journal | None = None  # the tables, for a rescuer should this process die (journal.py)
        # Why the filter stopped on its own ("" while it has not): its mount was unmounted from outside, or its
        # connection aborted (``/sys/fs/fuse/connections/N/abort``, the kernel's request timeout).
        self.lost = ""
        # Called with that reason, from a thread of its own, before the filter cleans up after the loss.
        self.on_lost: Callable[[str], None] | None = None

    # -- lifecycle

    @property
    def active(self) -> bool:
        return self.session is not None and not self.session.finished.is_set()

    def start(self) -> None:
        """Mount and start serving. Raises CBFSFilterError, leaving nothing mounted, when that fails."""
        if self.session is not None:
            raise CBFSFilterError(errno.EALREADY, "the filter is already started; stop it first")
        self._check_paths()
        fuse_device.raise_fd_limit()
        libc.keep_large_buffers()
        try:
            self._lower_fd = os.open(self.lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            fs = self._make_fs(self._lower_fd)
            if os.geteuid() == 0 and rescue_mode:
                fs.journal = self._journal = Journal.create()
            root_mode = os.fstat(self._lower_fd).st_mode
            self._mount(root_mode)
            session = Session(self._dev_fd, fs.handlers(), self.session_options)
            session.trace = self._trace
            session.on_lost = self._connection_lost
            self.lost = ""
            self._configure_session(session, fs)
            negotiated = session.negotiate()
            fs.session_fd = self._dev_fd
            fs.passthrough = negotiated.passthrough
            fs.defer = session.defer
            fs.interruptible = session.interruptible
            fs.notify = session.notify
            fuse_device.widen_readahead(getattr(self, "_device", ""), negotiated.max_write)
            if self.lower_options.locks and not negotiated.has(abi.InitFlag.POSIX_LOCKS):
                log.warning("the kernel did not offer FUSE_POSIX_LOCKS: locks stay in the kernel, unseen")
            self._write_journal_header(session)
            session.start()
            self.fs, self.session = fs, session
            with _served_lock:
                _served.add(self.mountpoint)
        except OSError as exc:
            self._teardown()
            raise CBFSFilterError.from_os_error(exc, f"could not mount {self.mountpoint}") from exc
        except BaseException:
            self._teardown()
            raise

    def start_adopted(self, dev_fd: int, lower_fd: int, mount_id: int, negotiated: Negotiated,
                      fill: Callable[[LowerFS], None]) -> None:
        """Serve a mount another process made and served until now (see api/_handover.py): its connection
        ``dev_fd``, its lower directory ``lower_fd``, tables filled by ``fill``. Requests of other processes are held
        (Session.hold_requests) until the caller has put its layers in and released them."""
        fuse_device.raise_fd_limit()
        self._dev_fd, self._lower_fd, self._mount_id = dev_fd, lower_fd, mount_id
        fs = self._make_fs(lower_fd)
        fill(fs)
        session = Session(dev_fd, fs.handlers(), self.session_options)
        session.trace = self._trace
        session.on_lost = self._connection_lost
        self._configure_session(session, fs)
        session.adopt(negotiated)
        fs.session_fd = dev_fd
        fs.defer = session.defer
        fs.interruptible = session.interruptible
        fs.notify = session.notify
        if rescue_mode and os.geteuid() == 0:
            fs.journal = self._journal = Journal.create()
            fs.journal_everything()
            self._write_journal_header(session)
        session.hold_requests()
        # Before reading anything: what the predecessor read and never answered is sent again (resent now, a request
        # this process has read already would come twice).
        code = session.resend()
        if code and code not in (errno.ENOSYS, errno.EINVAL):
            log.warning("%s: asking the kernel to resend requests failed: %s", self.mountpoint, os.strerror(code))
        session.start()
        self.fs, self.session = fs, session
        with _served_lock:
            _served.add(self.mountpoint)

    def _write_journal_header(self, session: Session) -> None:
        if self._journal is not None:
            self._journal.write_header({
                "path": self.mountpoint, "lower": self.lower, "allow_other": self.allow_other,
                "draining": bool(getattr(self, "draining", False)),
                "session": asdict(self.session_options), "negotiated": asdict(session.negotiated),
                "options": {k: v for k, v in asdict(self.lower_options).items() if k != "io_policy"}})

    def rescue_fds(self) -> tuple[int, int, int, str, str] | None:
        """What the watchdog holds so that it can rescue the mount should this process die (None: no rescue)."""
        if self._journal is None or self._dev_fd < 0 or self._lower_fd < 0:
            return None
        return self._dev_fd, self._lower_fd, self._journal.fd, _SRC, rescue_mode

    def _make_fs(self, lower_fd: int) -> LowerFS:
        """The request handlers; subclasses return a LowerFS subclass to change what is served."""
        return LowerFS(lower_fd, self.lower_options)

    def _configure_session(self, session: Session, fs: LowerFS) -> None:
        """A hook for subclasses, called before the session starts serving."""

    def _check_paths(self) -> None:
        for what, path in (("lower directory", self.lower), ("mount point", self.mountpoint)):
            try:
                st = os.stat(path)
            except OSError as exc:
                raise CBFSFilterError.from_os_error(exc, f"cannot use {path} as the {what}") from exc
            if not stat.S_ISDIR(st.st_mode):
                raise CBFSFilterError(errno.ENOTDIR, f"{path} is not a directory: give a directory as the {what}")
        if not os.path.exists(fuse_device.DEVICE):
            raise CBFSFilterError(errno.ENODEV, "/dev/fuse is missing: load the fuse module (modprobe fuse)")
        if not self.in_place and self.mountpoint.startswith(self.lower + os.sep):
            raise CBFSFilterError(errno.EINVAL, "the mount point must not lie inside the lower directory")
        check_filterable(self.lower, "lower directory")
        if not self.in_place:
            check_filterable(self.mountpoint, "mount point")

    def _mount(self, root_mode: int) -> None:
        fsname = f"fsfilter:{self.lower}"[:200].replace(",", "_")
        if os.geteuid() == 0:
            self._dev_fd = fuse_device.open_device()
            self._watchdog = fuse_device.start_watchdog(self.mountpoint, self.rescue_fds())  # before: see there
            fuse_device.kernel_mount(self._dev_fd, self.mountpoint, root_mode=root_mode,
                                     allow_other=self.allow_other, fsname=fsname)
            entry = fuse_device.find_mount(self.mountpoint)
            if entry is None:
                raise OSError(errno.EIO, "the new mount is not in /proc/self/mountinfo")
            self._mount_id = entry.mount_id
            self._device = entry.device
            fuse_device.watch_mount(self._watchdog, entry.mount_id)
        else:
            fd, proc, sock = fuse_device.fusermount_mount(self.mountpoint, fsname=fsname, allow_other=self.allow_other)
            self._dev_fd = fd
            self._fusermount = (proc, sock)
            entry = fuse_device.find_mount(self.mountpoint)
            self._mount_id = entry.mount_id if entry is not None else -1

    def _connection_lost(self) -> None:
        entry = fuse_device.find_mount(self.mountpoint)
        if entry is not None and entry.mount_id == self._mount_id:
            self.lost = (f"the FUSE connection of {self.mountpoint} was aborted (the kernel's request timeout, or "
                         "/sys/fs/fuse/connections/N/abort): the filter stopped and its dead mount was removed")
        else:
            self.lost = f"{self.mountpoint} was unmounted from outside: the filter stopped"
        log.warning("%s", self.lost)
        # Stopping waits for the readers, and this runs on one of them.
        threading.Thread(target=self._after_loss, name="fsfilter-lost", daemon=True).start()

    def _after_loss(self) -> None:
        if self.on_lost is not None:
            try:
                self.on_lost(self.lost)
            except Exception:
                log.exception("the on_lost handler raised")
        self.stop()  # the dead mount, when aborted, must not stay behind answering ENOTCONN

    def stop(self, timeout: float = 10.0) -> None:
        """Unmount (lazily if the mount is busy) and stop serving. Safe to call more than once."""
        with self._stop_lock:
            if self.session is None and self._dev_fd < 0:
                return
            if self.session is not None:
                self.session.stopping()
            self._unmount()
            self._teardown(timeout)
            if self._ours(fuse_device.find_mount(self.mountpoint)):
                log.warning("%s is still mounted after stop: unmount it with umount -l (or fusermount3 -u -z)",
                            self.mountpoint)

    def hand_to_keeper(self, timeout: float = 5.0, covered: bool = False) -> int:
        """Hand a detached (draining) mount to a forked keeper process that serves it as the plain pass-through
        until nothing uses it, then let go of it here. Returns the keeper's pid, or -1 when it could not be handed
        over (a request handler did not return in time): the mount then drains in this process. ``covered``: the
        mount is still attached under another one; the keeper detaches it once it is on top again."""
        with self._stop_lock:
            session, fs = self.session, self.fs
            if session is None or fs is None or self._dev_fd < 0:
                return -1
            if self._watchdog is not None:
                fuse_device.release_watchdog(self._watchdog)  # the keeper serves it: no rescuer beside it, ever
            # No thread of ours may hold a lock the child inherits, or read the connection after the fork.
            if not session.quiesce(timeout):
                session.resume()
                return -1
            keep = keeper.fds_of(fs, {self._dev_fd, self._lower_fd, *session.fds})
            with fs.quiet():  # nothing else of this process may be inside the tables while they are copied
                pid = os.fork()
            if pid == 0:
                keeper.serve_forked(session, keep, (self.mountpoint, self._mount_id) if covered else None)
            session.stopping()
        log.info("%s: programs still inside are served by keeper pid %d until they leave", self.mountpoint, pid)
        _reap_later(pid)
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:  # the mount is not dead: it must not detach it when we let go (it is ours, by pid)
            watchdog.kill()
            watchdog.wait()
            if watchdog.stdin is not None:
                watchdog.stdin.close()
        self.stop(timeout)  # our copies only: the keeper holds the connection, so closing ours aborts nothing
        return pid

    def _ours(self, entry: fuse_device.MountEntry | None) -> bool:
        return entry is not None and (self._mount_id < 0 or entry.mount_id == self._mount_id)

    def _unmount(self) -> None:
        if not self._ours(fuse_device.find_mount(self.mountpoint)):
            return  # gone already, or a later mount at the same place that is not ours to touch
        try:
            if self._fusermount is not None:
                fuse_device.fusermount_unmount(self.mountpoint)
            else:
                fuse_device.unmount(self.mountpoint)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("unmounting %s failed: %s", self.mountpoint, exc)

    def _teardown(self, timeout: float = 10.0) -> None:
        if self._watchdog is not None:
            fuse_device.release_watchdog(self._watchdog)  # a stop on purpose: no rescue; what ends here ends
        with _served_lock:
            _served.discard(self.mountpoint)
        session, self.session = self.session, None
        lingering = 0
        if session is not None:
            session.close(timeout)
            lingering = session.lingering
        # Closing the last /dev/fuse fd aborts the connection: anyone still holding a file of a lazily
        # detached mount gets ENOTCONN at once instead of waiting for a daemon that is gone.
        if self._dev_fd >= 0:
            if lingering:
                fuse_device.retire_fd(self._dev_fd)  # a late reply must not reach a file opened later
            else:
                os.close(self._dev_fd)
            self._dev_fd = -1
        if lingering:
            # Handlers that did not return may still use the lower fds: leave them open rather than let
            # them act on whatever file reuses their numbers.
            log.warning("%d request handler(s) still running %s s after stop: leaving their fds open",
                        lingering, timeout)
            self.fs = None
            self._lower_fd = -1
        if self.fs is not None:
            self.fs.close()
            self.fs.journal = None
            self.fs = None
        if self._journal is not None and not lingering:
            self._journal.close()
        self._journal = None
        if self._lower_fd >= 0:
            os.close(self._lower_fd)
            self._lower_fd = -1
        if self._watchdog is not None:
            if self._watchdog.stdin is not None:
                self._watchdog.stdin.close()  # EOF: it detaches the mount if it is still there, then exits
            try:
                self._watchdog.wait(timeout)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None
        if self._fusermount is not None:
            proc, sock = self._fusermount
            sock.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._fusermount = None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the session ends (unmounted from outside or stopped); True if it has."""
        session = self.session
        return True if session is None else session.finished.wait(timeout)

    def __enter__(self) -> PassthroughFilter:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: types.TracebackType | None) -> None:
        self.stop()

    # -- observation and invalidation

    @property
    def stats(self) -> SessionStats | None:
        return self.session.stats if self.session is not None else None

    @property
    def passthrough_active(self) -> bool:
        """Whether reads and writes of unfiltered files currently go through kernel passthrough."""
        return self.fs is not None and self.fs.passthrough

    def set_trace(self, trace: Callable[[Request], None] | None) -> None:
        """Call ``trace(request)`` for every request before it is served (from the serving thread)."""
        self._trace = trace
        if self.session is not None:
            self.session.trace = trace

    def path_of(self, nodeid: int) -> bytes:
        return self.fs.path_of(nodeid) if self.fs is not None else b""

    def notify_changed(self, path: str | os.PathLike[str]) -> None:
        """Tell the kernel that ``path`` (relative to the mount, or absolute under it) changed in the lower
        directory behind the filter's back: its cached name, attributes and data are dropped."""
        if self.session is None or self.fs is None:
            raise CBFSFilterError(errno.ENOTCONN, "the filter is not started")
        rel = os.fsencode(os.fspath(path))
        for base in (os.fsencode(self.mountpoint), os.fsencode(self.lower)):
            if rel == base or rel.startswith(base + b"/"):
                rel = rel[len(base):]
                break
        for parent, name, child in self.fs.resolve(rel):
            self.session.notify(wire.encode_inval_entry(parent.nodeid, name))
            if child is not None:
                self.session.notify(wire.encode_inval_inode(child.nodeid, 0, 0))


def _reap_later(pid: int) -> None:
    """Collect the keeper's exit status when it ends (it is our child), so it does not linger as a zombie."""
    def wait() -> None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    threading.Thread(target=wait, name=f"fsfilter-keeper-{pid}", daemon=True).start()
