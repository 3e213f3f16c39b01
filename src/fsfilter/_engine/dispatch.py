"""Event dispatch: worker threads, serialisation, timeouts, the notification queue.

Control events are synchronous: the request waits for the handler. Without a timeout the handler runs on
the thread serving the request (no hand-off); with a timeout it runs on an event worker, and the request
waits only until the deadline (which ``reset_timeout`` can move). An expired event releases or denies its
request while the late handler runs on. Notification events go to an unbounded queue that one thread
drains in order; nothing is dropped, and ``stop`` delivers what is still queued.

Pure policy: threads and queues only, no kernel interfaces.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

log = logging.getLogger("fsfilter.dispatch")

Handler = Callable[[Any], object]


class Outcome(enum.Enum):
    DONE = "done"  # the handler returned in time
    EXPIRED = "expired"  # the deadline passed first; the handler may still be running
    FAILED = "failed"  # the handler raised


class Origin:
    """Who made the request an event is about (read by ``get_originator_*`` inside handlers)."""

    __slots__ = ("pid", "tid", "uid", "gid", "name")

    def __init__(self, pid: int, tid: int, uid: int, gid: int, name: str | None = None) -> None:
        self.pid = pid
        self.tid = tid
        self.uid = uid
        self.gid = gid
        self.name = name  # filled in lazily by whoever knows how to read it


class Job:
    __slots__ = ("handler", "params", "origin", "creator", "subject", "done", "deadline", "started", "cancelled",
                 "error", "lock", "overdue")

    def __init__(self, handler: Handler, params: object, origin: Origin | None, deadline: float,
                 waited: bool = True, creator: Origin | None = None, subject: object = None) -> None:
        self.handler = handler
        self.params = params
        self.origin = origin
        self.creator = creator  # who opened the handle the event is about, when it has one
        self.subject = subject  # what the event is about, for calls that act on it (the caller's own use)
        # Only a job another thread waits for needs these (notifications and inline calls do not: an
        # Event and a Lock cost more than the rest of a notification's bookkeeping).
        self.done = threading.Event() if waited else None
        self.lock = threading.Lock() if waited else None
        self.deadline = deadline  # monotonic seconds; 0 = none
        self.started = False
        self.cancelled = False
        self.overdue = False  # its deadline passed while its handler still ran: no longer counted as a worker
        self.error: BaseException | None = None


_current = threading.local()
_GATHER = 0.001  # seconds the notification thread waits, once woken, for more notifications


def current_job() -> Job | None:
    """The event the calling thread is handling, if any."""
    job: Job | None = getattr(_current, "job", None)
    return job


class DispatchStats:
    def __init__(self) -> None:
        self.control = 0
        self.notifications_posted = 0
        self.notifications_delivered = 0
        self.expired = 0
        self.failed = 0
        self.overdue = 0  # handlers running past their event's deadline now
        self.shed = 0  # events that expired before any thread was free to run their handler
        self.threads = 0
        self.peak_threads = 0


class Dispatcher:
    """Runs event handlers. ``on_error(code, description)`` is told about handler exceptions and timeouts."""

    def __init__(self, on_error: Callable[[int, str], None] | None = None,
                 on_thread: Callable[[bool], None] | None = None) -> None:
        self.on_error = on_error
        self.on_thread = on_thread  # called with True on a worker's start, False at its end
        self.serialize = False
        self.timeout = 0.0  # seconds; 0 = control events wait as long as the handler takes
        self.min_threads = 1
        self.max_threads = 8
        # Threads whose handler overran its deadline do not count against max_threads (an attacker who wedges
        # the handlers must not make every later event expire unhandled), but the pool never grows beyond this.
        self.thread_limit = 256
        self.stats = DispatchStats()
        self._work: SimpleQueue[Job | None] = SimpleQueue()
        # Notifications: an unbounded deque, and an event set when it turns non-empty (see _notify_loop).
        self._notes: deque[Job] = deque()
        self._notes_ready = threading.Event()
        self._notes_closing = False
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._running = False
        self._notifier: threading.Thread | None = None
        self._pending_notes = 0
        self._notes_drained = threading.Condition(self._lock)

    # -- lifecycle

    def start(self) -> None:
        self._running = True
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]  # of an earlier start, still in a handler
        count = 1 if self.serialize else max(1, self.min_threads)
        for _ in range(count):
            self._spawn()
        self._notes_closing = False
        if not self.serialize:
            self._notifier = threading.Thread(target=self._notify_loop, name="fsfilter-notify", daemon=True)
            self._notifier.start()

    def stop(self, timeout: float = 10.0) -> int:
        """Deliver queued notifications (up to ``timeout`` s), then end the workers. Returns how many
        notifications could not be delivered in time (reported through on_error too)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending_notes and time.monotonic() < deadline:
                self._notes_drained.wait(max(0.01, deadline - time.monotonic()))
            left = self._pending_notes
        self._running = False
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._work.put(None)
        self._notes_closing = True
        self._notes_ready.set()
        for t in threads + ([self._notifier] if self._notifier else []):
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self._notifier = None
        if left:
            self._report(110, f"{left} notification event(s) were still queued when the filter stopped")
        return left

    def _spawn(self) -> None:
        t = threading.Thread(target=self._worker, name=f"fsfilter-event-{len(self._threads)}", daemon=True)
        self._threads.append(t)
        self.stats.threads = len(self._threads)
        self.stats.peak_threads = max(self.stats.peak_threads, self.stats.threads)
        t.start()

    # -- control events

    def call(self, handler: Handler, params: object, origin: Origin | None, creator: Origin | None = None,
             subject: object = None) -> Outcome:
        """Run a control-event handler for the request being served on this thread."""
        self.stats.control += 1
        timeout = self.timeout
        if not self.serialize and timeout <= 0:
            job = Job(handler, params, origin, 0.0, waited=False, creator=creator, subject=subject)
            job.started = True
            self._run(job)
            return Outcome.FAILED if job.error is not None else Outcome.DONE
        job = Job(handler, params, origin, time.monotonic() + timeout if timeout > 0 else 0.0, creator=creator,
                  subject=subject)
        assert job.done is not None and job.lock is not None
        self._submit(job)
        while True:
            deadline = job.deadline
            if deadline <= 0:
                job.done.wait()
            else:
                job.done.wait(max(0.0, deadline - time.monotonic()))
            if job.done.is_set():
                return Outcome.FAILED if job.error is not None else Outcome.DONE
            with job.lock:
                if job.deadline != deadline:  # reset_timeout moved it
                    continue
                if time.monotonic() < job.deadline:
                    continue
                shed = not job.started
                if shed:
                    job.cancelled = True  # never run a handler whose request is already answered
                elif not job.done.is_set():
                    job.overdue = True
                    with self._lock:
                        self.stats.overdue += 1
                        self._grow()  # its thread no longer counts: events queued behind it get another
                self.stats.expired += 1
            if shed:
                with self._lock:
                    self.stats.shed += 1
                    threads = len(self._threads)
                self._report(110, f"an event expired before its handler ({_name(handler)}) could run: all {threads} "
                                  "event threads are busy (handlers that do not return?); raise the timeout, fix the "
                                  "handlers, or set DenyExpiredEvents to deny such events")
            else:
                self._report(110, f"an event handler ({_name(handler)}) did not return within {timeout:g} s")
            return Outcome.EXPIRED

    def _submit(self, job: Job) -> None:
        with self._lock:
            self._grow(1)
        self._work.put(job)

    def _grow(self, coming: int = 0) -> None:
        # Under _lock: another thread when queued events outnumber idle threads, within the bounds.
        if not self.serialize and self._running and self._idle < self._work.qsize() + coming:
            count = len(self._threads)
            if count - self.stats.overdue < self.max_threads and count < self.thread_limit:
                self._spawn()

    def _worker(self) -> None:
        self._thread_event(True)
        try:
            while True:
                with self._lock:
                    self._idle += 1
                job = self._work.get()
                with self._lock:
                    self._idle -= 1
                    if job is not None:
                        self._grow()  # an event queued while this thread still counted as idle
                if job is None:
                    return
                if job.lock is None:  # a notification (only those are not waited for), when events are serialised
                    self._deliver(job)
                    continue
                assert job.done is not None
                with job.lock:
                    if job.cancelled:
                        job.done.set()
                        continue
                    job.started = True
                self._run(job)
                with job.lock:
                    overdue = job.overdue
                    job.overdue = False
                if overdue:
                    with self._lock:
                        self.stats.overdue -= 1
        finally:
            self._thread_event(False)

    def _run(self, job: Job) -> None:
        _current.job = job
        try:
            job.handler(job.params)
        except BaseException as exc:  # a handler bug must never kill a worker or hang a caller
            job.error = exc
            self.stats.failed += 1
            self._report(getattr(exc, "code", 0) or getattr(exc, "errno", 0) or 5,
                         f"event handler {_name(job.handler)} raised {type(exc).__name__}: {exc}\n"
                         + "".join(traceback.format_exception(exc)[-3:]))
        finally:
            _current.job = None
            if job.done is not None:
                job.done.set()

    # -- notification events

    def post(self, handler: Handler, params: object, origin: Origin | None, creator: Origin | None = None
             ) -> None:
        job = Job(handler, params, origin, -1.0, waited=False, creator=creator)
        with self._lock:
            self._pending_notes += 1
        self.stats.notifications_posted += 1
        if self.serialize:
            self._work.put(job)
        else:
            self._notes.append(job)
            ready = self._notes_ready
            if not ready.is_set():  # any append after the loop's clear() sets it: no wake-up is lost
                ready.set()

    def _notify_loop(self) -> None:
        # Woken when the queue turns non-empty, the thread waits a moment for more before it delivers
        # them all: one wake-up (and one hand-over of the GIL by the request threads) per batch rather
        # than per notification. Notifications stay asynchronous; this adds about a millisecond to them.
        notes = self._notes
        while True:
            self._notes_ready.wait()
            self._notes_ready.clear()
            if not self._notes_closing:
                time.sleep(_GATHER)
            while notes:
                self._deliver(notes.popleft())
            if self._notes_closing and not notes:
                return

    def _deliver(self, job: Job) -> None:
        self._run(job)
        self.stats.notifications_delivered += 1
        with self._lock:
            self._pending_notes -= 1
            if self._pending_notes == 0:
                self._notes_drained.notify_all()

    @property
    def queued_notifications(self) -> int:
        return self._pending_notes

    # -- helpers

    def _report(self, code: int, description: str) -> None:
        if self.on_error is None:
            log.error("%s", description)
            return
        try:
            self.on_error(code, description)
        except Exception:
            log.exception("the on_error handler raised")

    def _thread_event(self, starting: bool) -> None:
        if self.on_thread is not None:
            try:
                self.on_thread(starting)
            except Exception:
                log.exception("a worker-thread event handler raised")


def reset_timeout(timeout: float) -> bool:
    """Move the deadline of the event the calling thread handles to ``timeout`` seconds from now
    (0 = no deadline). False when called outside a control event that has a deadline."""
    job = current_job()
    if job is None or job.deadline <= 0 or job.lock is None:
        return False
    with job.lock:
        job.deadline = time.monotonic() + (timeout if timeout > 0 else 1e9)
    return True


def _name(handler: Handler) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)
