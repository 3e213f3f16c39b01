"""Byte-range (POSIX and OFD) and whole-file (flock) locks, kept by the daemon for a FUSE mount.

When the daemon asks the kernel for FUSE_POSIX_LOCKS/FUSE_FLOCK_LOCKS at INIT, every ``fcntl`` and
``flock`` lock request on the mount comes to it and the kernel keeps none itself. This table gives
those requests the Linux semantics:

- POSIX locks belong to an owner (the kernel's id of the caller's file table, so all threads of a
  process share it; an OFD lock's owner is its open file). An owner's locks never conflict with each
  other: a new lock replaces, splits or merges what the owner held in its range.
- flock locks are a separate name space (they never conflict with POSIX locks), one per open file.
- A blocking request (SETLKW) waits without holding a thread: it is queued with a callback, granted
  when a release makes room (in arrival order among those that fit), or cancelled (interrupt). A wait
  that would close a cycle of POSIX owners waiting on each other fails with EDEADLK, as in the kernel.
- Releases: FLUSH drops the owner's POSIX locks on the file (close(2) of any descriptor does that on
  Linux); RELEASE drops whatever was locked through that open file (flock and OFD locks).

Pure Python, no system calls: one mutex guards the table; callbacks run after it is released.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass

OFFSET_MAX = (1 << 63) - 1  # the end of a lock "to the end of the file"
F_RDLCK = 0
F_WRLCK = 1
F_UNLCK = 2

_DEADLOCK_DEPTH = 10  # the kernel follows at most this many waiting owners too

Granted = Callable[[int], None]  # called with 0 when a queued lock is granted


@dataclass
class Lock:
    owner: int
    start: int
    end: int  # inclusive
    exclusive: bool
    pid: int
    fh: int  # the open file it was taken through

    def overlaps(self, start: int, end: int) -> bool:
        return self.start <= end and start <= self.end


@dataclass
class _Waiter:
    key: int  # the request's unique id
    node: int
    flock: bool
    lock: Lock
    granted: Granted


class LockTable:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._posix: dict[int, list[Lock]] = {}
        self._flock: dict[int, list[Lock]] = {}
        self._waiters: dict[int, list[_Waiter]] = {}  # node -> waiters in arrival order
        self._by_key: dict[int, _Waiter] = {}

    # -- queries

    def _space(self, flock: bool) -> dict[int, list[Lock]]:
        return self._flock if flock else self._posix

    @staticmethod
    def _conflict(locks: list[Lock], owner: int, start: int, end: int, exclusive: bool) -> Lock | None:
        for held in locks:
            if held.owner != owner and held.overlaps(start, end) and (exclusive or held.exclusive):
                return held
        return None

    def test(self, node: int, owner: int, start: int, end: int, exclusive: bool, flock: bool = False) -> Lock | None:
        """GETLK: a lock of another owner that would block this one, or None."""
        with self._mutex:
            found = self._conflict(self._space(flock).get(node, []), owner, start, end, exclusive)
            return None if found is None else Lock(found.owner, found.start, found.end, found.exclusive,
                                                    found.pid, found.fh)

    def held(self, node: int, flock: bool = False) -> list[Lock]:
        """A copy of the locks held on a node (for tests and diagnostics)."""
        with self._mutex:
            return [Lock(x.owner, x.start, x.end, x.exclusive, x.pid, x.fh) for x in self._space(flock).get(node, [])]

    def owner_holds(self, node: int, owner: int) -> bool:
        with self._mutex:
            return any(x.owner == owner for x in self._posix.get(node, []))

    def fh_holds(self, node: int, fh: int) -> bool:
        with self._mutex:
            return any(x.fh == fh for space in (self._posix, self._flock) for x in space.get(node, []))

    def count(self) -> int:
        """How many locks are held, on all nodes."""
        with self._mutex:
            return sum(len(x) for space in (self._posix, self._flock) for x in space.values())

    def waiting(self) -> int:
        with self._mutex:
            return len(self._by_key)

    # -- changes

    def set(self, node: int, owner: int, start: int, end: int, kind: int, pid: int, fh: int, *,
            flock: bool = False, key: int = 0, granted: Granted | None = None) -> int | None:
        """SETLK/SETLKW. ``kind`` is F_RDLCK, F_WRLCK or F_UNLCK. Returns 0 (done), an errno (EAGAIN: held
        by another owner; EDEADLK: waiting would deadlock; EINVAL: a bad range or type), or None when the
        request was queued (only with ``granted``): ``granted(0)`` is called once it holds the lock,
        unless ``cancel(key)`` takes it back first."""
        if kind not in (F_RDLCK, F_WRLCK, F_UNLCK) or start < 0 or end < start or end > OFFSET_MAX:
            return errno.EINVAL
        woken: list[_Waiter] = []
        with self._mutex:
            space = self._space(flock)
            locks = space.setdefault(node, [])
            result = self._set(node, locks, owner, start, end, kind, pid, fh, flock, key, granted)
            if result is None or result == 0:
                # an unlock, a downgrade, a shrink or a flock conversion (even one that now waits) can make room
                woken = self._wake(node)
            if not locks:
                space.pop(node, None)
        self._notify(woken)
        return result

    def _set(self, node: int, locks: list[Lock], owner: int, start: int, end: int, kind: int, pid: int, fh: int,
             flock: bool, key: int, granted: Granted | None) -> int | None:
        if flock and kind != F_UNLCK and any(x.owner == owner and x.exclusive != (kind == F_WRLCK) for x in locks):
            # Converting a flock drops the old one first, as Linux does: two holders of a shared lock that both
            # ask for it exclusively would otherwise wait for each other forever.
            self._apply(locks, owner, start, end, None, pid, fh)
        if kind == F_UNLCK:
            self._apply(locks, owner, start, end, None, pid, fh)
            return 0
        exclusive = kind == F_WRLCK
        blocker = self._conflict(locks, owner, start, end, exclusive)
        if blocker is None:
            self._apply(locks, owner, start, end, exclusive, pid, fh)
            return 0
        if granted is None:
            return errno.EAGAIN
        if not flock and self._would_deadlock(owner, blocker.owner):
            return errno.EDEADLK
        waiter = _Waiter(key, node, flock, Lock(owner, start, end, exclusive, pid, fh), granted)
        self._waiters.setdefault(node, []).append(waiter)
        self._by_key[key] = waiter
        return None

    def cancel(self, key: int) -> bool:
        """Take back a queued request (its caller was interrupted). False when it is not queued (any more):
        it was granted, or never waited."""
        with self._mutex:
            waiter = self._by_key.pop(key, None)
            if waiter is None:
                return False
            queue = self._waiters[waiter.node]
            queue.remove(waiter)
            if not queue:
                del self._waiters[waiter.node]
            return True

    def release_owner(self, node: int, owner: int) -> bool:
        """FLUSH: drop the owner's POSIX locks on the node. True when it held any."""
        return self._release(node, lambda x: x.owner == owner, flock_too=False)

    def release_fh(self, node: int, fh: int) -> bool:
        """RELEASE: drop every lock taken through this open file (flock and OFD locks)."""
        return self._release(node, lambda x: x.fh == fh, flock_too=True)

    def _release(self, node: int, match: Callable[[Lock], bool], flock_too: bool) -> bool:
        dropped = False
        with self._mutex:
            for space in ((self._posix, self._flock) if flock_too else (self._posix,)):
                locks = space.get(node)
                if not locks:
                    continue
                kept = [x for x in locks if not match(x)]
                if len(kept) != len(locks):
                    dropped = True
                    if kept:
                        space[node] = kept
                    else:
                        del space[node]
            woken = self._wake(node) if dropped else []
        self._notify(woken)
        return dropped

    def clear(self) -> None:
        with self._mutex:
            self._posix.clear()
            self._flock.clear()
            self._waiters.clear()
            self._by_key.clear()

    # -- internals (the mutex is held)

    @staticmethod
    def _apply(locks: list[Lock], owner: int, start: int, end: int, exclusive: bool | None, pid: int,
               fh: int) -> None:
        """Set [start, end] of ``owner`` to a lock of the given kind (None: unlocked): what the owner held
        there is replaced, what it held beside is kept (split where needed), and same-kind neighbours merge."""
        kept: list[Lock] = []
        for held in locks:
            if held.owner != owner:
                kept.append(held)
                continue
            touches = held.start <= end + 1 and start <= held.end + 1  # overlapping or adjacent
            if exclusive is not None and held.exclusive == exclusive and touches:
                start, end = min(start, held.start), max(end, held.end)  # merge into the new lock
                continue
            if not held.overlaps(start, end):
                kept.append(held)
                continue
            if held.start < start:
                kept.append(Lock(owner, held.start, start - 1, held.exclusive, held.pid, held.fh))
            if held.end > end:
                kept.append(Lock(owner, end + 1, held.end, held.exclusive, held.pid, held.fh))
        if exclusive is not None:
            kept.append(Lock(owner, start, end, exclusive, pid, fh))
        kept.sort(key=lambda x: (x.start, x.owner))
        locks[:] = kept

    def _wake(self, node: int) -> list[_Waiter]:
        """Grant the queued requests of a node that now fit, in arrival order."""
        queue = self._waiters.get(node)
        if not queue:
            return []
        woken: list[_Waiter] = []
        for waiter in list(queue):
            space = self._space(waiter.flock)
            locks = space.setdefault(node, [])
            want = waiter.lock
            if self._conflict(locks, want.owner, want.start, want.end, want.exclusive) is None:
                self._apply(locks, want.owner, want.start, want.end, want.exclusive, want.pid, want.fh)
                queue.remove(waiter)
                del self._by_key[waiter.key]
                woken.append(waiter)
            if not locks:
                del space[node]
        if not queue:
            del self._waiters[node]
        return woken

    def _would_deadlock(self, owner: int, blocker: int) -> bool:
        """Whether ``blocker`` (transitively, through the POSIX locks it waits for) waits for ``owner``."""
        seen = {blocker}
        frontier = [blocker]
        for _ in range(_DEADLOCK_DEPTH):
            following: list[int] = []
            for who in frontier:
                for waiter in self._by_key.values():
                    if waiter.flock or waiter.lock.owner != who:
                        continue
                    want = waiter.lock
                    for held in self._posix.get(waiter.node, []):
                        if held.owner != who and held.overlaps(want.start, want.end) and (
                                want.exclusive or held.exclusive):
                            if held.owner == owner:
                                return True
                            if held.owner not in seen:
                                seen.add(held.owner)
                                following.append(held.owner)
            if not following:
                return False
            frontier = following
        return False

    @staticmethod
    def _notify(woken: list[_Waiter]) -> None:
        for waiter in woken:
            waiter.granted(0)
