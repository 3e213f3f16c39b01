"""Process names as processes start, from the kernel's process connector.

A fanotify record names its process by pid only, and a short-lived process may be gone (reaped) before the
record is read. The process connector reports every fork, exec, name change and exit as it happens; this
tracker reads the name of a process at once (at exec it has only just started), follows forks and name
changes, and keeps the names of exited processes for a while, so that a record read late can still be named:
``exited_name(pid)`` is the name of the last process with that pid that exited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from fsfilter._abi import cn_proc as abi
from fsfilter._system import netlink, procfs
from fsfilter._wire import cn_proc as wire

log = logging.getLogger("fsfilter.processes")


class ProcessTracker:
    def __init__(self, keep_seconds: float = 10.0, kept: int = 65536) -> None:
        self._keep = keep_seconds
        self._kept = kept
        self._live: dict[int, tuple[str, int]] = {}  # tgid -> (name, timestamp of the event that set it)
        self._confirmed: set[int] = set()  # tgids whose name came from an exec or a name change
        self._exited: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.lost = 0  # datagrams the socket dropped (ENOBUFS)
        self.sock = netlink.open_proc_connector(0.5)  # timing out so that stop() is seen

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fsfilter-processes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        if self._thread is not None:
            self._thread.join(3)
        netlink.close_proc_connector(self.sock)

    def live_name(self, pid: int) -> str | None:
        """The name of a running process, once its exec (or a name change) has been seen: a name inherited
        at fork may be about to change with an exec this thread has not seen yet."""
        with self._lock:
            hit = self._live.get(pid)
            confirmed = pid in self._confirmed
        return hit[0] if hit and hit[0] and confirmed else None

    def exited_name(self, pid: int) -> str | None:
        """The name of the last process with this pid that exited within the keep time."""
        with self._lock:
            hit = self._exited.get(pid)
        if hit is None or not hit[0] or time.monotonic() - hit[1] > self._keep:
            return None
        return hit[0]

    # -- the connector

    def _loop(self) -> None:
        while not self._stopping:
            try:
                datagram = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping:
                    return
                if exc.errno == 105:  # ENOBUFS: the socket overflowed; names of some processes are unknown
                    self.lost += 1
                    continue
                log.warning("the process connector failed: %s", exc)
                return
            for event in wire.decode(datagram):
                self._handle(event)

    def _handle(self, ev: wire.ProcEvent) -> None:
        """Events of different CPUs can arrive out of order (an exec before the fork that made the process):
        each name carries the time of the event that set it, and an older event never replaces a newer one."""
        what = ev.what
        if what == abi.PROC_EVENT_EXEC or what == abi.PROC_EVENT_COMM:
            if ev.pid != ev.tgid:
                return  # a thread's own name: processes are named by their main thread
            # After an exec the name from before it (inherited at fork) is wrong: unknown ("") rather than a
            # guess when the new name could not be read in time.
            self._set(ev.tgid, ev.comm if what == abi.PROC_EVENT_COMM else procfs.comm(ev.tgid), ev.timestamp_ns)
            with self._lock:
                self._confirmed.add(ev.tgid)
        elif what == abi.PROC_EVENT_FORK:
            if ev.pid != ev.tgid:
                return  # a new thread
            with self._lock:
                parent = self._live.get(ev.parent_tgid)
            if self._set(ev.tgid, parent[0] if parent else procfs.comm(ev.tgid), ev.timestamp_ns):
                with self._lock:
                    self._confirmed.discard(ev.tgid)  # a new process: not confirmed until its exec
        elif what == abi.PROC_EVENT_EXIT and ev.pid == ev.tgid:
            with self._lock:
                name, stamp = self._live.pop(ev.tgid, ("", 0))
                if stamp > ev.timestamp_ns:  # the entry belongs to a later process with the same pid
                    self._live[ev.tgid] = (name, stamp)
                    return
                self._confirmed.discard(ev.tgid)
                self._exited[ev.tgid] = (name, time.monotonic())
                self._exited.move_to_end(ev.tgid)
                while len(self._exited) > self._kept:
                    self._exited.popitem(last=False)

    def _set(self, tgid: int, name: str, stamp: int) -> bool:
        """Record a name unless a newer event set one; True when it did."""
        with self._lock:
            current = self._live.get(tgid)
            if current is None or current[1] <= stamp:
                self._live[tgid] = (name, stamp)
                return True
            return False


def tracker_or_none() -> ProcessTracker | None:
    """A started tracker, or None where the process connector is not available (no CAP_NET_ADMIN, or a kernel
    without CONFIG_PROC_EVENTS)."""
    try:
        tracker = ProcessTracker()
    except OSError as exc:
        log.info("process connector not available (%s): names of short-lived processes may be missing", exc)
        return None
    tracker.start()
    return tracker

