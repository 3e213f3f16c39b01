"""Applications' filters run by the service: the layer lives in the service's stack, the handlers in the application.

An application that attaches sends its rules, altitude and the events it handles; the service starts a CBFilter of
its own with those rules (so matching, access rules and the decision whether a request concerns the application at
all happen here, and requests no rule concerns never cross the channel) whose handlers are proxies: a control event
is one round trip (the service's dispatcher keeps the request's deadline), notifications are batched. When the
application's connection closes — it stopped, or died — its filter leaves the stack at once and every event it
still owed is failed, so no caller waits on a process that is gone.
"""

from __future__ import annotations

import base64
import errno
import itertools
import logging
import os
import secrets
import threading
import time
from typing import Any, Protocol

from fsfilter._engine import dispatch
from fsfilter._system import procfs
from fsfilter.api import _control
from fsfilter.api._attached import rule_list
from fsfilter.api._control import encode_params
from fsfilter.api._params_base import EventParamsBase
from fsfilter.api.cbfilter import CBFilter
from fsfilter.api.params import FILTER_PARAMS
from fsfilter.errors import CBFSFilterError
from fsfilter.service.peers import Peer


class Service(Protocol):
    """What the applications' registry needs of the service: to hear that application rules changed."""

    def overrides_changed(self) -> None: ...

__all__ = ["Applications"]

log = logging.getLogger("fsfilterd")

# Events of the filter itself, fired in the application and never sent over the channel.
LOCAL_EVENTS = frozenset({"error", "filter_start", "filter_stop", "worker_thread_creation",
                          "worker_thread_termination"})
MAX_RULES = 100_000
APP_EVENT_CEILING_MS = 120_000  # the longest an attached application's event may wait, with no request timeout
NOTIFY_BATCH = 512
KEEP_WAIT = 30.0  # seconds an event of a kept filter with no deadline waits for its application to come back
KEEP_MAX = 60.0  # seconds a kept filter waits for its application to attach again before it leaves the stack
KEEP_QUEUE = 65536  # notifications queued for an application that is attaching again; more are lost (and counted)


class _Waiter:
    """One call waiting for its answer: a lock taken at creation and released by the answer (or the end of the
    connection), or to make the waiter the reader of an event line; cheaper to wake than an Event, on the path of
    every control event."""

    __slots__ = ("lock", "answer", "done", "lead", "released")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.answer: dict[str, Any] | None = None
        self.done = False
        self.lead = False
        self.released = False  # the lock was let go: whoever waits on it goes on (once)

    def _release(self) -> None:
        if not self.released:
            self.released = True
            self.lock.release()

    def wake(self, answer: dict[str, Any] | None) -> None:  # under its owner's lock: once only
        if not self.done:
            self.done = True
            self.answer = answer
            self._release()

    def make_reader(self) -> None:  # under its owner's lock, while not done
        self.lead = True
        self._release()


class EventLine:
    """The application's second connection, which carries only control events and their answers. No thread of the
    service sits on it: the threads waiting for answers read it themselves, one at a time (leader and followers).
    With one event in flight the request's own thread sends the question and reads the answer, with no hand-over
    between threads; with several, the reader passes each answer to its waiter and, once it has its own, makes
    another waiter the reader."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self._lock = threading.Lock()
        self._calls: dict[int, _Waiter] = {}
        self._reading = False
        self.dead = False

    def call(self, call_id: int, message: dict[str, Any]) -> dict[str, Any] | None:
        """Send an event and wait for its answer; None when the line is gone."""
        waiter = _Waiter()
        with self._lock:
            if self.dead:
                return None
            self._calls[call_id] = waiter
            waiter.lead = not self._reading
            self._reading = True
        try:
            self.peer.channel.send(message)
        except OSError:
            self.end()
            return None
        while True:
            if not waiter.lead:
                waiter.lock.acquire()
                if not waiter.lead:
                    return waiter.answer  # answered, or the line ended
            if self._read_until(waiter):
                return waiter.answer

    def _read_until(self, mine: _Waiter) -> bool:
        while True:
            try:
                message = self.peer.channel.receive()
            except _control.ProtocolError:
                continue  # a malformed answer: its waiter is failed when the line ends
            except OSError:
                message = None
            if message is None:
                self.end()
                return True
            call_id = message.get("answer")
            with self._lock:
                target = self._calls.pop(call_id, None) if isinstance(call_id, int) else None
                if target is None:
                    continue
                if target is not mine:
                    target.wake(message)
                    continue
                mine.lead = False
                mine.done = True
                mine.answer = message
                following = next(iter(self._calls.values()), None)
                if following is None:
                    self._reading = False
                else:
                    following.make_reader()
                return True

    def end(self) -> None:
        with self._lock:
            self.dead = True
            self._reading = False
            waiting, self._calls = list(self._calls.values()), {}
            for waiter in waiting:
                # Every waiter ends with no answer: a follower is woken; a reader (or a thread about to read, or to
                # wait) finds its lock free and lead gone, and returns.
                waiter.lead = False
                waiter.done = True
                waiter._release()
        self.peer.channel.close()


class Link:
    """The service's end of one application's connection: calls waiting for answers, and notifications waiting to
    be sent (one sender thread, so a slow application never blocks the thread that posts them)."""

    def __init__(self, peer: Peer | None, pid: int = 0, uid: int = 0) -> None:
        # None: a link kept across a restart of the service (Applications.keep) whose application has not come back
        # yet; its events wait for it (within their deadline) and its notifications queue.
        self.peer: Peer = peer  # type: ignore[assignment]
        self.pid = peer.pid if peer is not None else pid
        self.uid = peer.uid if peer is not None else uid
        self.bound = threading.Event()
        # Kept: a pidfd taken when the link is kept tells whether its application is still the process it names.
        self.pidfd = -1
        if peer is not None:
            self.bound.set()
        else:
            try:
                self.pidfd = os.pidfd_open(pid)
            except OSError:
                pass  # gone already: Applications lets the kept filter go at its next look
        self.kept_since = time.monotonic()
        self._calls: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._outbox: list[list[Any]] = []
        self._wake = threading.Condition(self._lock)
        self.closed = False
        self.sent_notifications = 0
        self.lost_notifications = 0
        self.round_trips = 0
        self.orphaned = 0  # events whose application went away before it answered
        self.token = secrets.token_hex(16)  # names this link when the application opens its event line
        self.events: EventLine | None = None
        self._sender = threading.Thread(target=self._send_notifications, name=f"fsfilterd-notify-{self.pid}",
                                        daemon=True)
        self._sender.start()

    def bind(self, peer: Peer) -> None:
        """The application of a kept link came back on ``peer``: its waiting events and queued notifications go
        there."""
        with self._lock:
            self.peer = peer
            self.bound.set()
            self._wake.notify_all()

    def _drop_pidfd(self) -> None:
        pidfd, self.pidfd = self.pidfd, -1
        if pidfd >= 0:
            os.close(pidfd)

    def call(self, event: str, params: EventParamsBase, deny_when_gone: bool = False) -> None:
        job = dispatch.current_job()
        if not self.bound.is_set():
            # Kept across a restart: the application is reconnecting. Its event waits for it as it would for a slow
            # handler, until the event's deadline; then it expires like one.
            deadline = job.deadline if job is not None and job.deadline else time.monotonic() + KEEP_WAIT
            if not self.bound.wait(max(0.0, deadline - time.monotonic())):
                self.orphaned += 1
                if deny_when_gone:
                    raise OSError(errno.ETIMEDOUT, "the application that handles this event has not come back")
                return
        line = self.events
        waiter = _Waiter() if line is None else None  # the event line has waiters of its own
        with self._lock:
            if self.closed:  # gone, and its layer not out of the stack yet: as below
                self.orphaned += 1
                if deny_when_gone:
                    raise OSError(errno.ETIMEDOUT, "the application that handles this event is gone")
                return
            call_id = next(self._ids)
            if waiter is not None:
                self._calls[call_id] = waiter
        message = {"event": event, "call": call_id, "params": encode_params(params),
                   "origin": _origin(job.origin if job else None), "creator": _origin(job.creator if job else None)}
        if line is not None:
            answer = line.call(call_id, message)
        else:
            assert waiter is not None
            answer = self._call_on_first_connection(call_id, message, waiter)
        if answer is None:
            # The application stopped or died with the event in flight: its filter is gone, and the request goes on
            # as the requests after it will, without it; as an expired event, unless the filter denies those.
            self.orphaned += 1
            if deny_when_gone:
                raise OSError(errno.ETIMEDOUT, "the application that handles this event went away")
            return
        self.round_trips += 1
        if answer.get("failed"):
            raise RuntimeError(f"the application's on_{event} handler raised (see its on_error)")
        fields = answer.get("params") or {}
        if not isinstance(fields, dict):
            raise OSError(errno.EBADMSG, "the application's answer is malformed")
        for name, value in fields.items():
            if name not in type(params)._fields or name == "buffer":
                continue
            if isinstance(value, dict):
                data = base64.b64decode(str(value.get("b64", "")))
                view = getattr(params, name)
                if isinstance(view, memoryview) and not view.readonly and len(view) == len(data):
                    view[:] = data  # a modifiable buffer: changed in place, where the layer reads it
                continue
            setattr(params, name, value)
        if answer.get("suspend") and job is not None and isinstance(job.subject, tuple):
            layer, nodeid = job.subject
            layer.suspend_events(nodeid)

    def _call_on_first_connection(self, call_id: int, message: dict[str, Any],
                                  waiter: _Waiter) -> dict[str, Any] | None:
        """Before the application's event line is open (the moment between attach and its events request), an event
        goes on the first connection, whose reader hands its answer over."""
        try:
            try:
                self.peer.channel.send(message)
            except OSError:
                self.peer.channel.close()  # a line cut short (a send that timed out): the stream is lost
                return None
            waiter.lock.acquire()
            return waiter.answer
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    def post(self, event: str, params: EventParamsBase) -> None:
        job = dispatch.current_job()
        note = [event, encode_params(params), _origin(job.origin if job else None),
                _origin(job.creator if job else None)]
        with self._lock:
            if self.closed:
                self.lost_notifications += 1
                return
            if len(self._outbox) >= KEEP_QUEUE:
                self.lost_notifications += 1  # an application that does not come back must not fill the memory
                return
            self._outbox.append(note)
            if len(self._outbox) == 1:
                self._wake.notify()

    def _send_notifications(self) -> None:
        while True:
            with self._lock:
                while (not self._outbox or not self.bound.is_set()) and not self.closed:
                    self._wake.wait()
                if self.closed and (not self._outbox or self.peer is None):
                    self.lost_notifications += len(self._outbox)  # kept for an application that never came back
                    self._outbox = []
                    return
                batch, self._outbox = self._outbox[:NOTIFY_BATCH], self._outbox[NOTIFY_BATCH:]
            try:
                self.peer.channel.send({"notify": batch})
                self.sent_notifications += len(batch)
            except OSError:
                with self._lock:
                    self.lost_notifications += len(batch) + len(self._outbox)
                    self._outbox = []
                    self.closed = True
                self.peer.channel.close()  # a stopped application, or one cut short: it sees its link end
                return

    def answer(self, message: dict[str, Any]) -> None:
        call_id = message.get("answer")
        with self._lock:
            waiter = self._calls.get(call_id) if isinstance(call_id, int) else None
            if waiter is not None:
                waiter.wake(message)

    def close(self, flush: float = 2.0) -> None:
        """The application left: fail every call still waiting; send what notifications can still be sent."""
        with self._lock:
            self.closed = True
            for waiter in self._calls.values():
                waiter.wake(None)
            self._wake.notify_all()
        self.bound.set()  # events waiting for a kept link's application go on (it is not coming back)
        self._drop_pidfd()
        if self.events is not None:
            self.events.end()
        self._sender.join(flush)


def _origin(origin: dispatch.Origin | None) -> list[Any] | None:
    if origin is None:
        return None
    return [origin.pid, origin.tid, origin.uid, origin.gid, origin.name]


class AppFilter(CBFilter):
    """An application's filter, run by the service with proxies for the application's handlers."""

    def __init__(self, link: Link, spec: dict[str, Any], resume: str = "") -> None:
        super().__init__()
        self.link = link
        self.owner_pid = link.pid
        self.config("Service=off")  # the service runs its stacks itself
        self.label = str(spec.get("label") or f"application pid {link.pid}")[:200]
        self.handle_id = 0
        self.spec = spec
        # Names this filter when its application attaches again after a restart of the service (the next fsfilterd
        # keeps the filter, rules in force, until it does): known only to the application.
        self.resume_token = resume or secrets.token_hex(16)

    def current_spec(self) -> dict[str, Any]:
        """What the application attached with, with the rules it has now."""
        return {**self.spec, "rules": rule_list(self.rules), "passthrough_rules": rule_list(self.passthrough_rules)}

    def set_handlers(self, handlers: object) -> None:
        if not isinstance(handlers, list) or not all(isinstance(h, str) for h in handlers):
            raise _control.ProtocolError(errno.EINVAL, "\"handlers\" must be a list of event names")
        for event in handlers:
            if event not in FILTER_PARAMS or event in LOCAL_EVENTS:
                raise _control.ProtocolError(errno.EINVAL, f"no event {event!r} can be handled over the channel")
        for event in FILTER_PARAMS:
            if event in LOCAL_EVENTS:
                continue
            if event not in handlers:
                setattr(self, "on_" + event, None)
            elif event.startswith("notify_"):
                setattr(self, "on_" + event, _proxy_post(self.link, event))
            else:
                setattr(self, "on_" + event, _proxy_call(self.link, event, self))


def _proxy_call(link: Link, event: str, f: CBFilter) -> Any:
    return lambda params: link.call(event, params, f.deny_expired_events)


def _proxy_post(link: Link, event: str) -> Any:
    return lambda params: link.post(event, params)


def _rule_args(entry: object) -> tuple[str, str, int, int, int, int, int, int, int]:
    if not isinstance(entry, list) or len(entry) != 9 or not isinstance(entry[0], str) or \
            not isinstance(entry[1], str) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                     for v in entry[2:]):
        raise _control.ProtocolError(errno.EINVAL, "a rule is [mask, ea_name, access, control, notify, min_size, "
                                                   "max_size, included_attributes, excluded_attributes]")
    return (entry[0], entry[1], entry[2], entry[3], entry[4], entry[5], entry[6], entry[7], entry[8])


def apply_rules(f: CBFilter, rules: object, passthrough: object) -> None:
    """Replace the filter's rules; every entry is checked first (a bad one changes nothing)."""
    checked = []
    for name, entries in (("rules", rules), ("passthrough_rules", passthrough)):
        if not isinstance(entries, list) or len(entries) > MAX_RULES:
            raise _control.ProtocolError(errno.EINVAL, f"\"{name}\" must be a list of at most {MAX_RULES} rules")
        checked.append([_rule_args(entry) for entry in entries])
    trial = CBFilter()  # masks, flags and qualifiers are validated here before the live filter changes
    for args in checked[0]:
        trial.add_filter_rule_ex(*args)
    for args in checked[1]:
        trial.add_passthrough_rule_ex(*args)
    f.delete_all_filter_rules()
    f.delete_all_passthrough_rules()
    for args in checked[0]:
        f.add_filter_rule_ex(*args)
    for args in checked[1]:
        f.add_passthrough_rule_ex(*args)


class Applications:
    """The applications attached to the service and their filters."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._links: dict[Peer, Link] = {}
        self._filters: dict[int, AppFilter] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._event_lines: set[Peer] = set()  # connections that became an application's event line

    def is_event_line(self, peer: Peer) -> bool:
        """The connection now belongs to a link's callers: its own reader must stop reading it (and not close it)."""
        with self._lock:
            return peer in self._event_lines

    def takes(self, peer: Peer, message: dict[str, Any]) -> bool:
        """An answer to an event the service sent this peer: handled here."""
        if "answer" not in message:
            return False
        with self._lock:
            link = self._links.get(peer)
        if link is not None:
            link.answer(message)
        return True

    def request(self, peer: Peer, method: str, params: dict[str, Any]) -> Any:
        if method == "attach":
            return self._attach(peer, params)
        if method == "events":
            token = params.get("token")
            with self._lock:
                link = next((k for k in self._links.values() if isinstance(token, str) and
                             secrets.compare_digest(k.token, token) and k.peer.uid == peer.uid), None)
                if link is None or link.events is not None:
                    raise _control.ProtocolError(errno.EBADF, "no attached filter has that token, or it has its "
                                                              "event line already")
                link.events = EventLine(peer)
                self._event_lines.add(peer)
            return True
        handle = params.get("handle")
        with self._lock:
            f = self._filters.get(handle) if isinstance(handle, int) else None
        if f is None or f.link.peer is not peer:
            raise _control.ProtocolError(errno.EBADF, f"no filter {handle!r} of this connection")
        if method == "detach":
            # Not on this (the peer's reader) thread: stopping waits for the filter's events, whose answers this
            # thread reads.
            with self._lock:
                self._filters.pop(f.handle_id, None)
            self.service.overrides_changed()
            threading.Thread(target=self._detach, args=(f,), name="fsfilterd-detach", daemon=True).start()
            return True
        if method == "set_rules":
            apply_rules(f, params.get("rules"), params.get("passthrough_rules"))
            self.service.overrides_changed()
            return True
        raise _control.ProtocolError(errno.ENOSYS, f"unknown method {method!r}")

    def _attach(self, peer: Peer, spec: dict[str, Any]) -> dict[str, Any]:
        resume = spec.get("resume")
        if isinstance(resume, str) and resume:
            kept = self._reclaim(peer, resume, spec)
            if kept is not None:
                return kept
        with self._lock:
            link = self._links.get(peer)
            if link is None:
                link = self._links[peer] = Link(peer)
        f = AppFilter(link, spec)
        f.set_handlers(spec.get("handlers", []))
        self._start(f, spec)
        with self._lock:
            f.handle_id = next(self._ids)
            self._filters[f.handle_id] = f
        self.service.overrides_changed()
        log.info("pid %d attached %s at altitude %s on %s", peer.pid, f.label, f.altitude,
                 ", ".join(f._attach_point_list()))
        return self._attached(f)

    @staticmethod
    def _attached(f: AppFilter) -> dict[str, Any]:
        return {"handle": f.handle_id, "attach_points": f._attach_point_list(), "events_token": f.link.token,
                "resume_token": f.resume_token}

    def _start(self, f: AppFilter, spec: dict[str, Any]) -> None:
        try:
            for key in ("altitude", "tag"):
                if key in spec:
                    setattr(f, key, spec[key] if key == "altitude" else int(spec[key]))
            f.strict_altitude = bool(spec.get("strict_altitude", False))
            f.process_failed_requests = bool(spec.get("process_failed_requests", False))
            f.process_cached_io_requests = bool(spec.get("process_cached_io_requests", False))
            config = spec.get("config", {})
            if not isinstance(config, dict):
                raise _control.ProtocolError(errno.EINVAL, "\"config\" must be an object")
            for name, value in config.items():
                if name in ("AccessViaFanotify", "FilterOwnRequests", "Service"):
                    continue
                f.config(f"{name}={value}")
            points = spec.get("attach_points", [])
            if not isinstance(points, list) or not all(isinstance(p, str) for p in points):
                raise _control.ProtocolError(errno.EINVAL, "\"attach_points\" must be a list of paths")
            for p in points:
                f.add_attach_point(p)
            apply_rules(f, spec.get("rules"), spec.get("passthrough_rules", []))
            timeout = spec.get("timeout_ms", 0)
            if not isinstance(timeout, int) or isinstance(timeout, bool):
                raise _control.ProtocolError(errno.EINVAL, "\"timeout_ms\" must be an integer")
            # A mount of the service is shared: an application that stops answering (SIGSTOP, a hung handler) must
            # not hold a request until the kernel's request timeout aborts the whole connection, default rules and
            # every other filter with it. Its events expire first, as with an explicit timeout.
            ceiling = int(max(1.0, float(f.config("RequestTimeout")) - 10.0) * 1000) if \
                float(f.config("RequestTimeout")) > 0 else APP_EVENT_CEILING_MS
            f.start_filter(min(timeout, ceiling) if timeout > 0 else ceiling)
        except (ValueError, TypeError) as exc:
            raise _control.ProtocolError(errno.EINVAL, str(exc)) from None

    def _reclaim(self, peer: Peer, token: str, spec: dict[str, Any]) -> dict[str, Any] | None:
        """An application attaches again after a restart of the service: it takes back the filter kept for it (its
        rules held meanwhile; its waiting events and queued notifications go to it now), with the rules and handlers
        it sends. None when nothing is kept under that token for this user (it then attaches afresh)."""
        with self._lock:
            f = next((k for k in self._filters.values() if not k.link.bound.is_set() and k.link.uid == peer.uid
                      and secrets.compare_digest(k.resume_token, token)), None)
            if f is None or peer in self._links:
                return None
            self._links[peer] = f.link
        f.owner_pid = peer.pid
        f.spec = {k: v for k, v in spec.items() if k != "resume"}
        f.set_handlers(spec.get("handlers", []))
        f.link.bind(peer)  # the events waiting for it go to it now
        rules, passthrough = spec.get("rules"), spec.get("passthrough_rules", [])
        if rules != rule_list(f.rules) or passthrough != rule_list(f.passthrough_rules):
            # Not on this thread: changing rules looks at the attach points (path walks into the mount), which can
            # wait for a request whose event waits for an answer this thread must read from the application.
            threading.Thread(target=self._set_rules, args=(f, rules, passthrough), name="fsfilterd-rules",
                             daemon=True).start()
        self.service.overrides_changed()
        log.info("pid %d attached again: %s took back its filter at altitude %s", peer.pid, f.label, f.altitude)
        return self._attached(f)

    def _set_rules(self, f: AppFilter, rules: object, passthrough: object) -> None:
        try:
            apply_rules(f, rules, passthrough)
        except (CBFSFilterError, _control.ProtocolError) as exc:
            log.warning("%s attached again with rules that could not be applied (it keeps those it had): %s",
                        f.label, exc)
            return
        self.service.overrides_changed()

    def export(self) -> list[dict[str, Any]]:
        """Every application filter, for the next fsfilterd to keep until its application attaches again."""
        with self._lock:
            filters = list(self._filters.values())
        return [{"pid": f.owner_pid, "uid": f.link.uid, "resume": f.resume_token, "label": f.label,
                 "spec": f.current_spec()} for f in filters]

    def keep(self, kept: object) -> None:
        """Start the filters a previous fsfilterd exported, rules in force, each waiting for its application (events
        wait within their deadline, notifications queue) for up to KEEP_MAX seconds."""
        if not isinstance(kept, list):
            return
        for entry in kept:
            try:
                link = Link(None, int(entry["pid"]), int(entry["uid"]))
                f = AppFilter(link, dict(entry["spec"]), str(entry["resume"]))
                f.label = str(entry.get("label") or f.label)
                f.set_handlers(f.spec.get("handlers", []))
                self._start(f, f.spec)
            except (KeyError, TypeError, ValueError, CBFSFilterError, _control.ProtocolError) as exc:
                log.warning("a filter of pid %s could not be kept: %s", entry.get("pid") if isinstance(entry, dict)
                            else "?", exc)
                continue
            with self._lock:
                f.handle_id = next(self._ids)
                self._filters[f.handle_id] = f
            log.info("keeping %s (pid %d) until it attaches again", f.label, f.owner_pid)
        if kept:
            self.service.overrides_changed()
            threading.Thread(target=self._expire_kept, name="fsfilterd-kept", daemon=True).start()

    def _expire_kept(self) -> None:
        """Kept filters whose application is gone, or has not attached again in KEEP_MAX seconds, leave."""
        while True:
            time.sleep(0.5)
            with self._lock:
                waiting = [f for f in self._filters.values() if not f.link.bound.is_set()]
            if not waiting:
                return
            for f in waiting:
                if time.monotonic() - f.link.kept_since < KEEP_MAX and f.link.pidfd >= 0 and \
                        procfs.pidfd_alive(f.link.pidfd):
                    continue
                with self._lock:
                    self._filters.pop(f.handle_id, None)
                f.link.close(0.0)
                self._detach(f)
                log.info("pid %d did not attach again: %s left the stack", f.owner_pid, f.label)

    def _detach(self, f: AppFilter) -> None:
        with self._lock:
            self._filters.pop(f.handle_id, None)
        self.service.overrides_changed()  # the defaults hold again before the filter goes: no moment without rules
        try:
            f.stop_filter(True)
        except CBFSFilterError as exc:
            log.warning("stopping %s: %s", f.label, exc)

    def gone(self, peer: Peer, flush: float = 0.0) -> None:
        """The peer's connection closed: its filters leave their stacks, its pending events fail."""
        with self._lock:
            self._event_lines.discard(peer)
            link = self._links.pop(peer, None)
            mine = [f for f in self._filters.values() if f.link.peer is peer]
        if link is None:
            return
        link.close(flush)
        for f in mine:
            self._detach(f)
            log.info("pid %d is gone: %s left the stack", peer.pid, f.label)

    def access_masks(self) -> set[str]:
        """The masks of every attached application's access rules: they override the default rules."""
        with self._lock:
            filters = list(self._filters.values())
        # A Permissive filter enforces nothing: it cannot stand in for the defaults.
        return {r.mask for f in filters if not f.config_bool("Permissive") for r in list(f.rules) if r.access}

    def describe(self) -> dict[int, dict[str, Any]]:
        with self._lock:
            filters = list(self._filters.values())
        return {id(f): {"kind": "application", "pid": f.owner_pid, "uid": f.link.uid, "handle": f.handle_id,
                        "attached": f.link.bound.is_set()} for f in filters}

    def count(self) -> int:
        with self._lock:
            return len(self._filters)

    def counters(self) -> dict[str, int]:
        with self._lock:
            links = list(self._links.values())
        return {"channel_round_trips": sum(link.round_trips for link in links),
                "channel_notifications": sum(link.sent_notifications for link in links),
                "channel_notifications_lost": sum(link.lost_notifications for link in links),
                "channel_events_orphaned": sum(link.orphaned for link in links)}

    def stop(self, flush: float = 0.0) -> None:
        """Let every application go; ``flush``: seconds to go on sending the notifications still queued for it."""
        with self._lock:
            peers = list(self._links)
            kept = [f for f in self._filters.values() if not f.link.bound.is_set()]
        for peer in peers:
            self.gone(peer, flush)
        for f in kept:
            with self._lock:
                self._filters.pop(f.handle_id, None)
            f.link.close(0.0)
            self._detach(f)
