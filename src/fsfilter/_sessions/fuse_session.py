"""The FUSE session: INIT negotiation, the request loop, dispatch, replies, interrupts and notices.

Threads: one reader per /dev/fuse fd (the session fd plus ``workers - 1`` clones). A reader answers
cheap requests itself; requests that can block for long (fsync, large I/O, fallocate, ...) go to a
small pool so one slow request never holds up lookups. Readers briefly busy-poll their non-blocking fd
after each request: on these VMs a sleeping thread takes ~30 µs to wake, more than most requests take.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from queue import SimpleQueue

from fsfilter._abi import fuse as abi
from fsfilter._abi import linux
from fsfilter._system import fuse_device, libc, procfs
from fsfilter._wire import fuse as wire
from fsfilter._wire.fuse import Request, WireError
from fsfilter._wire.ops import DEFERRABLE, MAY_BLOCK, NO_REPLY, SIDE_EFFECT_FREE, Op, decode_op
from fsfilter._wire.replies import Reply

log = logging.getLogger("fsfilter.session")

# A handler serves one typed operation and returns its typed reply, or None when it sends no reply itself
# (FORGET) or answers later (a deferred lock wait).
Handler = Callable[[Op], Reply | None]

LOCK_FLAGS = abi.InitFlag.POSIX_LOCKS | abi.InitFlag.FLOCK_LOCKS

WANTED_FLAGS = (
    abi.InitFlag.ASYNC_READ | abi.InitFlag.ATOMIC_O_TRUNC | abi.InitFlag.BIG_WRITES | abi.InitFlag.DONT_MASK
    | abi.InitFlag.AUTO_INVAL_DATA | abi.InitFlag.DO_READDIRPLUS | abi.InitFlag.READDIRPLUS_AUTO
    | abi.InitFlag.ASYNC_DIO | abi.InitFlag.PARALLEL_DIROPS | abi.InitFlag.HANDLE_KILLPRIV_V2
    | abi.InitFlag.POSIX_ACL | abi.InitFlag.MAX_PAGES | abi.InitFlag.CACHE_SYMLINKS | abi.InitFlag.SETXATTR_EXT
    | abi.InitFlag.INIT_EXT | abi.InitFlag.CREATE_SUPP_GROUP | abi.InitFlag.HAS_IOCTL_DIR
    | abi.InitFlag.DIRECT_IO_ALLOW_MMAP
)


@dataclass
class SessionOptions:
    workers: int = 1  # reader threads, each on its own /dev/fuse fd
    pool: int = 4  # threads for requests that may block, at first
    # The pool grows when every pool thread is busy (handlers that do not return must not hold up requests
    # no such handler is about), up to this many threads.
    pool_max: int = 256
    passthrough: bool = True  # ask the kernel for FUSE_PASSTHROUGH
    max_write: int = 1 << 20
    spin: float = 0.0002  # seconds a reader busy-polls for the next request before it sleeps
    max_stack_depth: int = 1
    locks: bool = False  # serve fcntl/flock locks (FUSE_POSIX_LOCKS, FUSE_FLOCK_LOCKS) instead of the kernel
    # Seconds after which the kernel aborts the whole connection when a request is still unanswered
    # (FUSE_REQUEST_TIMEOUT, kernel 6.14+): a dead man's switch for a stopped or wedged daemon, not a
    # per-request deadline (those are the dispatcher's). 0 = none.
    # The kernel looks every 15 s, so a caller waits up to request_timeout + 15 s: 45 keeps that within a minute.
    request_timeout: int = 45


@dataclass
class Negotiated:
    minor: int = 0
    flags: int = 0
    max_write: int = 0
    passthrough: bool = False
    request_timeout: int = 0  # seconds the kernel waits for any answer before it aborts the connection; 0 = never

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


class SessionStats:
    """Counters a caller can read at any time (plain ints; the GIL keeps them consistent enough)."""

    def __init__(self) -> None:
        self.requests = [0] * 64
        self.errors = 0
        self.malformed = 0
        self.interrupts = 0
        self.failures = 0  # handler bugs answered with EIO
        self.abandoned = 0  # interrupted while their handler ran: answered EINTR at once, late result dropped
        self.pool_threads = 0
        self.pool_saturated = 0  # requests that had to queue because the pool was at pool_max, all busy

    def by_opcode(self) -> dict[str, int]:
        out = {}
        for code, count in enumerate(self.requests):
            if count:
                try:
                    out[abi.Opcode(code).name] = count
                except ValueError:
                    out[str(code)] = count
        return out


class Deferred:
    """A request its handler answers later (returned None): ``reply``/``fail`` once, from any thread.

    An INTERRUPT for it sets ``interrupted`` and calls the canceller given to ``on_interrupt``; when that
    returns True (the wait was taken back) the session answers EINTR itself."""

    def __init__(self, session: Session, unique: int, fd: int) -> None:
        self._session = session
        self.unique = unique
        self.fd = fd
        self.interrupted = False
        self._cancel: Callable[[], bool] | None = None
        self._mutex = threading.Lock()

    def on_interrupt(self, cancel: Callable[[], bool]) -> bool:
        """Install the canceller. False when an interrupt came first: the handler must give up itself."""
        with self._mutex:
            if self.interrupted:
                return False
            self._cancel = cancel
            return True

    def interrupt(self) -> None:
        with self._mutex:
            self.interrupted = True
            cancel = self._cancel
        if cancel is not None and cancel():
            self.fail(errno.EINTR)

    def reply(self, payload: bytes = b"") -> None:
        self._session.finish_deferred(self, 0, payload)

    def fail(self, code: int) -> None:
        self._session.finish_deferred(self, code, b"")


class _Waiting:
    """A request whose handler is inside :meth:`Session.interruptible` (waiting on an application's code)."""

    __slots__ = ("unique", "fd", "answered")

    def __init__(self, unique: int, fd: int) -> None:
        self.unique = unique
        self.fd = fd
        self.answered = False


_current = threading.local()  # .request: the (unique, fd) a thread is serving; .abandoned: answered already
_EARLY_MAX = 4096  # interrupts remembered for requests not yet inside an interruptible section
RESEND_MINOR = 40  # FUSE_NOTIFY_RESEND: protocol 7.40, kernel 6.9
GATE_MAX = 30.0  # seconds a request waits for a successor's rules (hold_requests); then it is refused (EAGAIN)


class Session:
    """Serves one FUSE connection with a table of opcode handlers."""

    def __init__(self, fd: int, handlers: dict[int, Handler], options: SessionOptions) -> None:
        self.fd = fd
        self.handlers = handlers
        self.options = options
        self.negotiated = Negotiated()
        self.stats = SessionStats()
        self.trace: Callable[[Request], None] | None = None
        self._bufsize = options.max_write + 4096 * 2
        self._fds: list[int] = [fd]
        self._threads: list[threading.Thread] = []
        self._readers: list[threading.Thread] = []
        self._pool: SimpleQueue[tuple[Op, int] | None] = SimpleQueue()
        # Requests queued for the pool and not yet started, with their fd; a reader that answers one
        # (interrupted) removes it, and the pool then skips it.
        self._inflight: dict[int, tuple[Op, int]] = {}
        self._lock = threading.Lock()
        # Deferrable requests (lock waits) from the moment they are read until they are answered, so that an
        # INTERRUPT finds them whether they are queued, being handled, or waiting.
        self._deferrable: dict[int, Deferred] = {}
        # Pool requests being run (unique -> fd), those waiting in an interruptible section, and interrupts
        # that came for a running request before it got there (all under _lock).
        self._started: dict[int, tuple[int, int]] = {}  # unique -> (opcode, fd)
        self._answered: set[int] = set()  # running requests answered EINTR already: their reply is dropped
        self._waiting: dict[int, _Waiting] = {}
        self._early: dict[int, None] = {}
        self._pool_threads = 0
        self._pool_idle = 0
        self._saturated = False
        # Told (on a thread of its own) when requests start queueing because the pool is at pool_max.
        self.on_saturated: Callable[[int], None] | None = None
        self._running = False
        self.finished = threading.Event()
        self.lingering = 0  # threads still busy in a handler when close() gave up waiting for them
        self.thread_setup: Callable[[], None] | None = None
        # Says where a request is served: True = a pool thread (its handler may wait on an application's
        # event handler), False = the reader itself (e.g. requests made by the filtering process, which
        # must never wait for a pool thread that may be waiting on them), None = by opcode.
        self.router: Callable[[Op], bool | None] | None = None
        # Called once, on a reader thread, when the connection ends without close() (unmounted or aborted).
        # It must not wait for the session's threads (hand the clean-up to a thread of its own).
        self.on_lost: Callable[[], None] | None = None
        self.lost = False
        self._stopping = False
        # While set and not open: requests of other processes wait at it (see hold_requests).
        self._gate: threading.Event | None = None
        # Set by quiesce: the requests waiting at the gate are dropped unanswered (whoever serves next has the kernel
        # resend them).
        self._gate_dropped = False

    def stopping(self, expected: bool = True) -> None:
        """Say that the end of the connection that follows (an unmount by the owner) is no loss; False takes it back
        (the unmount did not happen)."""
        with self._lock:
            self._stopping = expected

    # -- INIT

    def negotiate(self, timeout: float = 10.0) -> Negotiated:
        """Read and answer INIT. Raises OSError if the kernel does not send it in time."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            if not poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise OSError(errno.ETIMEDOUT, "the kernel sent no FUSE INIT request")
            try:
                buf = os.read(self.fd, self._bufsize)
            except (BlockingIOError, InterruptedError):
                continue
            req = wire.decode_request(buf)
            if req.opcode != abi.Opcode.INIT:
                self._reply_error(req.unique, errno.EIO)
                continue
            major, minor, readahead, offered = wire.decode_init(req.body)
            if major != abi.KERNEL_VERSION:
                # A newer major: answer with ours and the kernel sends INIT again (or gives up).
                self._write([wire.encode_reply(req.unique, wire.encode_init_out(abi.OUR_MINOR, 0, 0, 0, 0, 0, 0, 0))])
                continue
            return self._answer_init(req, minor, readahead, offered)

    def _answer_init(self, req: Request, minor: int, readahead: int, offered: int) -> Negotiated:
        wanted = int(WANTED_FLAGS)
        if self.options.passthrough:
            wanted |= abi.InitFlag.PASSTHROUGH
        if self.options.locks:
            wanted |= LOCK_FLAGS
        # Not while serving locks: a blocking lock request stays unanswered for as long as the lock is held,
        # and the kernel would abort the whole connection for it.
        if self.options.request_timeout > 0 and not self.options.locks:
            wanted |= abi.InitFlag.REQUEST_TIMEOUT
        flags = offered & wanted
        max_pages = min(self.options.max_write // 4096, _max_pages_limit())
        max_write = max_pages * 4096 if flags & abi.InitFlag.MAX_PAGES else min(self.options.max_write, 128 * 1024)
        our_minor = min(minor, abi.OUR_MINOR)
        timeout = self.options.request_timeout if flags & abi.InitFlag.REQUEST_TIMEOUT else 0
        reply = wire.encode_init_out(our_minor, readahead, flags, 64, 48, max_write, max_pages,
                                     self.options.max_stack_depth if flags & abi.InitFlag.PASSTHROUGH else 0, timeout)
        if our_minor < 23:
            reply = reply[:24]
        self._write([wire.encode_reply(req.unique, reply)])
        self.negotiated = Negotiated(our_minor, flags, max_write, bool(flags & abi.InitFlag.PASSTHROUGH), timeout)
        return self.negotiated

    def adopt(self, negotiated: Negotiated) -> None:
        """Serve a connection another process negotiated (a handover, see _sessions/handover.py): no INIT comes."""
        self.negotiated = negotiated

    def resend(self) -> int:
        """Ask the kernel to queue again every request it sent on this connection and has no answer for
        (FUSE_NOTIFY_RESEND, kernel 6.9+): those a predecessor read and never answered. 0 or the kernel's errno."""
        return self.notify(wire.encode_notify(abi.NotifyCode.RESEND, b""))

    def hold_requests(self) -> None:
        """Until release_requests(): requests of other processes wait (on pool threads; after GATE_MAX seconds they
        are refused with EAGAIN rather than decided without the rules)
        while this process's own requests are served, so that a successor puts its rules in place (which may walk
        paths under the mount) before anyone else's request is decided."""
        self._gate = threading.Event()

    def release_requests(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    # -- threads

    def start(self) -> None:
        fds = [self.fd]
        for _ in range(1, max(1, self.options.workers)):
            fd = fuse_device.clone_device(self.fd)
            os.set_blocking(fd, False)
            self._fds.append(fd)
            fds.append(fd)
        self._start_threads(fds)

    def _start_threads(self, fds: list[int]) -> None:
        self._running = True
        os.set_blocking(self.fd, False)
        readers = [threading.Thread(target=self._reader, args=(fd,), name=f"fsfilter-reader-{i}", daemon=True)
                   for i, fd in enumerate(fds)]
        self._readers = readers
        self._threads += readers
        # Only these: a reader may already have started a pool thread (requests waiting when a keeper takes over).
        for t in readers:
            t.start()
        with self._lock:
            for _ in range(max(1, self.options.pool)):
                self._spawn_pool_thread()

    @property
    def fds(self) -> list[int]:
        """The connection's fds this session reads: the session fd and its clones."""
        return list(self._fds)

    def quiesce(self, timeout: float = 5.0) -> bool:
        """Stop serving and end nothing: the readers stop (what the kernel holds stays queued there), every request
        already read is answered, the pool threads end. The connection, its cloned fds, deferred lock waits and the
        tables stay as they are, for resume() here or serve_again() in a forked keeper. False when a request
        handler did not return within ``timeout`` (its thread is left running)."""
        self._running = False
        gate = self._gate
        if gate is not None and self.negotiated.minor >= RESEND_MINOR:
            # Only where the next server can have them resent: else they wait (and quiesce may time out).
            self._gate_dropped = True
            gate.set()
        deadline = time.monotonic() + timeout
        for t in self._readers:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._readers):
            return False
        # No reader queues anything now; a pool thread may still start another while it works: repeat until none.
        while True:
            with self._lock:
                alive = [t for t in self._threads if t.is_alive()]
            if not alive:
                return True
            for _ in alive:
                self._pool.put(None)
            for t in alive:
                t.join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline and any(t.is_alive() for t in alive):
                return False

    def _fresh_threads(self) -> None:
        self._threads = []
        self._pool = SimpleQueue()
        self._pool_threads = self._pool_idle = 0
        self._saturated = False
        for unique, item in list(self._inflight.items()):  # read, not started: served by the new pool
            self._pool.put(item)
            self._inflight[unique] = item

    def resume(self) -> None:
        """After quiesce(): serve again with new threads, on the same fds (a handover that did not happen). Requests
        it dropped at the gate come again once the caller has the kernel resend them."""
        if self._gate_dropped:
            self._gate = threading.Event()
            self._gate_dropped = False
        self.finished.clear()
        self._fresh_threads()
        self._start_threads(list(self._fds))

    def serve_again(self) -> None:
        """In a forked keeper, after quiesce() in the parent: the parent's threads do not exist here. Serve the same
        connection with threads of this process (new readers on the same fds, cloned ones included: deferred lock
        waits answer on the fd their request came from)."""
        self._lock = threading.Lock()
        self._fresh_threads()
        self.finished = threading.Event()
        self.lost = self._stopping = False
        self.on_lost = None
        self.on_saturated = None
        self._start_threads(list(self._fds))

    def _spawn_pool_thread(self) -> None:
        # Under _lock.
        t = threading.Thread(target=self._pool_worker, name=f"fsfilter-io-{self._pool_threads}", daemon=True)
        self._pool_threads += 1
        self._pool_idle += 1
        self.stats.pool_threads = self._pool_threads
        self._threads.append(t)
        t.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop every thread and close cloned fds (the session fd belongs to the caller).

        Threads still in a handler after ``timeout`` seconds are left running and counted in ``lingering``;
        the fds they may still reply on are then retired instead of closed, so that a late reply cannot
        land in a file opened later under the same fd number."""
        self._running = False
        with self._lock:
            self._deferrable.clear()  # the connection is going: late answers must not be written
            self._waiting.clear()
            threads = list(self._threads)
            pool_threads = self._pool_threads
        for _ in range(pool_threads):
            self._pool.put(None)
        me = threading.current_thread()
        deadline = time.monotonic() + timeout
        for t in threads:
            if t is not me:
                t.join(max(0.0, deadline - time.monotonic()))
        self.lingering = sum(1 for t in threads if t is not me and t.is_alive())
        for fd in self._fds[1:]:
            if self.lingering:
                fuse_device.retire_fd(fd)
            else:
                os.close(fd)
        self._fds = [self.fd]
        self.finished.set()

    def _reader(self, fd: int) -> None:
        # A per-thread fs_struct lets handlers set the caller's umask for the objects they create.
        libc.unshare(linux.CLONE_FS)
        if self.thread_setup is not None:
            self.thread_setup()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        # One buffer per reader, filled with readv: os.read would allocate (and the allocator map and unmap)
        # a max_write-sized object for every request, which cost ~15 µs a request here. Each request is
        # copied out, so a request handed to the pool never sees the next one.
        buffer = bytearray(self._bufsize)
        view = memoryview(buffer)
        spin = self.options.spin
        spin_until = 0.0
        readv = os.readv
        monotonic = time.monotonic
        while self._running:
            try:
                buf = bytes(view[:readv(fd, (buffer,))])
            except BlockingIOError:
                if monotonic() < spin_until:
                    continue
                poller.poll(500)
                continue
            except OSError as exc:
                if exc.errno == errno.ENODEV:  # unmounted or aborted
                    self._connection_lost()
                    break
                if exc.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                    continue
                log.error("reading /dev/fuse failed: %s", exc)
                break
            self._handle(fd, buf)
            spin_until = monotonic() + spin
        self._running = False
        self.finished.set()

    def _connection_lost(self) -> None:
        # Unmounted or aborted from outside while serving (close() clears _running first, so a stop is not
        # a loss). Told once, before ``finished`` is set, so that whoever waits for it can read why.
        with self._lock:
            if not self._running or self._stopping or self.lost:
                return
            self.lost = True
            callback = self.on_lost
        if callback is not None:
            try:
                callback()
            except Exception:
                log.exception("the on_lost callback failed")

    def _handle(self, fd: int, buf: bytes) -> None:
        try:
            req = wire.decode_request(buf)
        except WireError as exc:
            self.stats.malformed += 1
            unique = wire.request_unique(buf)
            if unique:
                self._reply_error(unique, exc.code, fd)
            return
        opcode = req.opcode
        if opcode < 64:
            self.stats.requests[opcode] += 1
        if opcode == abi.Opcode.INTERRUPT:
            self._interrupt(req, fd)
            return
        try:
            op = decode_op(req)  # once: the router and every layer read the same typed operation
        except WireError as exc:
            self.stats.malformed += 1
            if opcode not in NO_REPLY:
                self._reply_error(req.unique, exc.code, fd)
            return
        if op is None:
            self._trace(req)
            self._reply_error(req.unique, errno.ENOSYS, fd)
            return
        if opcode in DEFERRABLE:
            with self._lock:
                self._deferrable[req.unique] = Deferred(self, req.unique, fd)
        pooled = opcode in MAY_BLOCK
        if self._gate is not None:
            # Another process's request waits at the gate, on a pool thread; this process's own is served at once
            # on the reader (never queued behind those that wait: it may be what the gate waits for).
            pooled = not libc.is_own_thread(op.pid)
        elif self.router is not None:
            routed = self.router(op)
            if routed is not None:
                pooled = routed
        if pooled:
            saturated = False
            with self._lock:
                self._inflight[req.unique] = (op, fd)
                if len(self._inflight) > self._pool_idle:  # no idle thread left for this one
                    if self._pool_threads < self.options.pool_max:
                        self._spawn_pool_thread()
                    else:
                        self.stats.pool_saturated += 1
                        saturated, self._saturated = not self._saturated, True
            self._pool.put((op, fd))
            if saturated and self.on_saturated is not None:
                threading.Thread(target=self.on_saturated, args=(self._pool_threads,), name="fsfilter-saturated",
                                 daemon=True).start()
            return
        self._run(op, fd)

    def _pool_worker(self) -> None:
        # Pool threads serve creates too when a router sends them here: they need their own umask as well,
        # or setting the caller's would change the umask of the whole process that runs the filter.
        libc.unshare(linux.CLONE_FS)
        if self.thread_setup is not None:
            self.thread_setup()
        while True:
            item = self._pool.get()
            if item is None:
                return
            op, fd = item  # a reply must go back on the fd its request came from
            with self._lock:
                if self._inflight.pop(op.unique, None) is None:
                    continue  # interrupted while queued, and already answered
                self._pool_idle -= 1
                self._started[op.unique] = (op.opcode, fd)
                if len(self._inflight) > self._pool_idle and self._pool_threads < self.options.pool_max:
                    self._spawn_pool_thread()  # a request queued while this thread still counted as idle
            try:
                gate = self._gate
                if gate is not None and not libc.is_own_thread(op.pid):
                    opened = gate.wait(GATE_MAX)
                    if self._gate_dropped and op.opcode not in NO_REPLY:
                        continue  # quiesced while it waited: left unanswered, to be resent to whoever serves next
                    if not opened and op.opcode not in NO_REPLY:
                        # The rules never came: refuse rather than decide without them (fail closed).
                        self._reply_error(op.unique, errno.EAGAIN, fd)
                        continue
                self._run(op, fd)
            finally:
                with self._lock:
                    self._pool_idle += 1
                    self._started.pop(op.unique, None)
                    self._answered.discard(op.unique)
                    self._early.pop(op.unique, None)
                    if self._saturated and self._pool_idle > 0:
                        self._saturated = False

    def _interrupt(self, req: Request, fd: int) -> None:
        self.stats.interrupts += 1
        try:
            (target,) = wire.fixed(req.body, abi.INTERRUPT_IN)
        except WireError:
            return
        with self._lock:
            queued = self._inflight.get(target)
            cancel = queued is not None and queued[0].opcode in SIDE_EFFECT_FREE
            if cancel:
                del self._inflight[target]
            deferred = self._deferrable.get(target)
            waiting = self._waiting.get(target)
            answer_now = waiting is not None and not waiting.answered
            if waiting is not None and answer_now:
                # Its handler is off in the application's code and may never come back: answer now (a killed
                # caller is in uninterruptible sleep until we do) and drop whatever the handler returns later.
                waiting.answered = True
                self.stats.abandoned += 1
            elif waiting is None and self._started.get(target, (-1, fd))[0] in SIDE_EFFECT_FREE:
                # Running, but its effect is nothing but its answer: answer now, drop the late reply.
                self._answered.add(target)
                answer_now = True
                fd = self._started[target][1]  # a reply goes back on the fd its request came from
            elif waiting is None and deferred is None and not cancel and (queued is not None
                                                                         or target in self._started):
                self._early[target] = None  # not waiting yet: it is answered as soon as it starts to
                while len(self._early) > _EARLY_MAX:
                    del self._early[next(iter(self._early))]
                return
        if waiting is not None:
            if answer_now:
                self._reply_error(target, errno.EINTR, waiting.fd)
            return
        if answer_now:
            self._reply_error(target, errno.EINTR, fd)
            return
        if deferred is not None:
            deferred.interrupt()
            return
        if queued is not None:
            if cancel:
                # Nothing done yet and nothing to undo: answer now rather than after the requests ahead
                # of it in the pool queue. Others run to the end: their effect cannot be taken back.
                self._reply_error(target, errno.EINTR, queued[1])
            return
        if len(self._fds) > 1:
            # Another reader may not have registered the request yet: ask the kernel to send it again.
            self._reply_error(req.unique, errno.EAGAIN, fd)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[Callable[[], bool]]:
        """Around a wait for code that may never return (an application's event handler): an INTERRUPT for the
        request being served on this thread is then answered EINTR at once. Yields a function that says
        whether that happened; when it did, the caller must undo or skip the request's effects, and whatever
        the request's handler returns or raises afterwards is dropped."""
        current = getattr(_current, "request", None)
        if current is None:
            yield _never
            return
        unique, fd = current
        waiting = _Waiting(unique, fd)
        with self._lock:
            early = self._early.pop(unique, None) is not None or unique in self._waiting
            if not early:
                self._waiting[unique] = waiting
        if early:  # interrupted before it got here: answer now, before waiting at all
            waiting.answered = True
            self.stats.abandoned += 1
            self._reply_error(unique, errno.EINTR, fd)
            _current.abandoned = True
            yield _always
            return
        try:
            yield lambda: waiting.answered
        finally:
            with self._lock:
                self._waiting.pop(unique, None)
            if waiting.answered:
                _current.abandoned = True

    def _dropped(self, unique: int) -> bool:
        """Whether the request was answered already (interrupted): then its own reply must not be written."""
        return bool(_current.abandoned) or unique in self._answered

    def _run(self, op: Op, fd: int) -> None:
        _current.request = (op.unique, fd)
        _current.abandoned = False
        try:
            self._serve(op, fd)
        finally:
            _current.request = None

    def _trace(self, req: Request) -> None:
        if self.trace is not None:
            try:
                self.trace(req)
            except Exception:  # a tracing bug must not fail the request
                log.exception("trace hook failed")

    def _serve(self, op: Op, fd: int) -> None:
        req = op.req
        if self.trace is not None:
            self._trace(req)
        handler = self.handlers.get(req.opcode)
        try:
            if handler is None:
                raise OSError(errno.ENOSYS, "not implemented")
            reply = handler(op)
            payload = reply.encode() if reply is not None else None
        except OSError as exc:
            if req.opcode in DEFERRABLE:
                self._forget_deferred(req.unique)
            if req.opcode not in NO_REPLY and not self._dropped(req.unique):
                self.stats.errors += 1
                self._reply_error(req.unique, exc.errno or errno.EIO, fd)
            return
        except WireError as exc:
            self.stats.malformed += 1
            if req.opcode in DEFERRABLE:
                self._forget_deferred(req.unique)
            if req.opcode not in NO_REPLY and not self._dropped(req.unique):
                self._reply_error(req.unique, exc.code, fd)
            return
        except Exception:
            self.stats.failures += 1
            log.exception("handler for %r failed", op)
            if req.opcode in DEFERRABLE:
                self._forget_deferred(req.unique)
            if req.opcode not in NO_REPLY and not self._dropped(req.unique):
                self._reply_error(req.unique, errno.EIO, fd)
            return
        if payload is None or req.opcode in NO_REPLY or self._dropped(req.unique):
            return  # no reply (FORGET), or a deferred request that its Deferred answers
        if req.opcode in DEFERRABLE:
            self._forget_deferred(req.unique)
        self._write([wire.encode_reply_header(req.unique, 0, len(payload)), payload], fd)

    # -- deferred replies

    def defer(self, req: Request | Op) -> Deferred:
        """For a handler of a DEFERRABLE request that will answer later: return None from the handler, then
        call ``reply``/``fail`` on this object exactly once."""
        with self._lock:
            deferred = self._deferrable.get(req.unique)
        if deferred is None:
            raise OSError(errno.EINVAL, f"request {req.unique} cannot be deferred")
        return deferred

    def finish_deferred(self, deferred: Deferred, code: int, payload: bytes) -> None:
        with self._lock:
            if self._deferrable.get(deferred.unique) is not deferred:
                return  # answered already
            del self._deferrable[deferred.unique]
        if code:
            self._reply_error(deferred.unique, code, deferred.fd)
        else:
            self._write([wire.encode_reply_header(deferred.unique, 0, len(payload)), payload], deferred.fd)

    def _forget_deferred(self, unique: int) -> None:
        with self._lock:
            self._deferrable.pop(unique, None)

    # -- replies and notices

    def _reply_error(self, unique: int, code: int, fd: int | None = None) -> None:
        self._write([wire.encode_reply_header(unique, code, 0)], fd)

    def _write(self, parts: list[bytes], fd: int | None = None) -> None:
        try:
            os.writev(self.fd if fd is None else fd, parts)
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # the request was interrupted and is gone
                return
            if exc.errno != errno.ENODEV:
                log.error("writing a reply failed: %s", exc)

    def notify(self, message: bytes) -> int:
        """Send an unsolicited notice (invalidation); returns 0 or the errno the kernel gave."""
        try:
            os.write(self.fd, message)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0


def _never() -> bool:
    return False


def _always() -> bool:
    return True


def _max_pages_limit() -> int:
    limit = procfs.sysctl_int("fs/fuse/max_pages_limit")
    return max(32, limit) if limit is not None else 256


