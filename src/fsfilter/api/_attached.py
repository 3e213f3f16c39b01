"""A CBFilter attached to fsfilterd: its layer runs in the service's stack, its handlers here.

The application's end of the channel: a few threads take turns reading the service's messages; a control event
runs on the thread that read it (each answered as soon as its handler returns, in any order), notifications go to
the filter's own dispatcher as an embedded filter's do (its serialisation and ordering rules hold). Requests
are numbered and matched to their answers.
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
from typing import Any, Protocol

from fsfilter._engine import dispatch
from fsfilter._engine.dispatch import Origin, Outcome
from fsfilter._engine.rules import RuleSet
from fsfilter.api import _control
from fsfilter.api._control import changed_fields, decode_params
from fsfilter.api.params import FILTER_PARAMS
from fsfilter.errors import CBFSFilterError

__all__ = ["RemoteSubject", "ServiceLink", "rule_list"]

log = logging.getLogger("fsfilter")


class AttachedFilter(Protocol):
    dispatcher: dispatch.Dispatcher

    def handler(self, event: str) -> Any: ...
    def worker_threads(self) -> int: ...
    def _fire_error(self, code: int, description: str) -> None: ...
    def _service_lost(self) -> None: ...


class RemoteSubject:
    """The subject of an event handled for the service: suspend_file_events marks it, the answer carries it."""

    __slots__ = ("suspend",)

    def __init__(self) -> None:
        self.suspend = False


def rule_list(rules: RuleSet) -> list[list[Any]]:
    return [[r.mask, r.ea_name, r.access, r.control, r.notify, r.min_size, r.max_size, r.included_attributes,
             r.excluded_attributes] for r in rules]


def _origin(fields: object) -> Origin | None:
    if not isinstance(fields, list) or len(fields) != 5:
        return None
    pid, tid, uid, gid, name = fields
    return Origin(int(pid), int(tid), int(uid), int(gid), name if isinstance(name, str) else None)


class ServiceLink:
    """Leader and followers: whichever of a few threads holds the read lock reads the next message; an event's
    handler then runs on that very thread while another takes over reading, so no hand-over to a pool sits between
    the service's question and the handler. Notifications and answers are dispatched before the lock is let go,
    which keeps them in the order they came."""

    def __init__(self, core: AttachedFilter, channel: _control.Channel) -> None:
        self.core = core
        self.channel = channel
        self.handle = 0
        self._ids = itertools.count(1)
        self._waiting: dict[int, list[Any]] = {}
        self._lock = threading.Lock()  # _waiting
        self._read_lock = threading.Lock()  # held by the thread reading the channel; taken before _lock
        self._closing = False
        self._ended_channels: set[_control.Channel] = set()  # seen to end (under their read locks)
        self._events: _control.Channel | None = None  # the event line, once opened
        self._event_lock = threading.Lock()  # held by the thread reading the event line
        channel.sock.settimeout(None)  # connected with a timeout; an idle filter waits for events indefinitely
        # Several readers in turn: events come on this connection too when the event line cannot be opened.
        self._threads = [threading.Thread(target=self._take_turns, args=(channel, self._read_lock, True),
                                          name=f"fsfilter-service-link-{i}", daemon=True)
                         for i in range(max(4, core.worker_threads()) + 1)]
        for thread in self._threads:
            thread.start()

    def open_event_line(self, token: str) -> None:
        """A second connection for control events only, read by a few threads in turn (see remote.EventLine for
        the service's end). Without it (an older service) events come on the first connection."""
        channel = _control.connect(timeout=10.0)
        if channel is None:
            return
        try:
            channel.send({"id": 1, "method": "events", "params": {"token": token}})
            answer = channel.receive()
        except (OSError, _control.ProtocolError):
            channel.close()
            return
        if answer is None or "result" not in answer:
            channel.close()
            return
        channel.sock.settimeout(None)
        self._events = channel
        threads = [threading.Thread(target=self._take_turns, args=(channel, self._event_lock, False),
                                    name=f"fsfilter-service-event-{i}", daemon=True)
                   for i in range(max(4, self.core.worker_threads()))]
        self._threads += threads
        for thread in threads:
            thread.start()

    def request(self, method: str, params: dict[str, Any], timeout: float = 60.0) -> Any:
        ident = next(self._ids)
        waiter: list[Any] = [threading.Event(), None]
        with self._lock:
            self._waiting[ident] = waiter
        try:
            self.channel.send({"id": ident, "method": method, "params": params})
            if not waiter[0].wait(timeout):
                raise CBFSFilterError(errno.ETIMEDOUT, f"fsfilterd did not answer {method} in {timeout:.0f} s")
        except OSError as exc:
            raise CBFSFilterError(errno.ENOTCONN, f"fsfilterd went away: {exc}") from exc
        finally:
            with self._lock:
                self._waiting.pop(ident, None)
        answer = waiter[1]
        if answer is None:
            raise CBFSFilterError(errno.ENOTCONN, f"fsfilterd closed the connection before answering {method}")
        error = answer.get("error")
        if isinstance(error, dict):
            raise CBFSFilterError(int(error.get("code", errno.EIO)), f"fsfilterd: {error.get('message', '')}")
        return answer.get("result")

    def _take_turns(self, channel: _control.Channel, lock: threading.Lock, first: bool) -> None:
        """Read ``channel`` in turn with the other threads on it. Notifications and answers are dispatched while
        the lock is held (in the order they came); an event's handler runs once it is let go, while another thread
        reads. ``first``: the first connection, whose end stops the filter (the event line's end says nothing the
        first connection will not)."""
        ended = self._ended_channels
        while True:
            event: dict[str, Any] | None = None
            with lock:
                if channel in ended:
                    return
                try:
                    message = channel.receive()
                except _control.ProtocolError as exc:
                    log.error("fsfilterd sent a malformed message: %s", exc)
                    continue
                except OSError:
                    message = None
                if message is None:
                    ended.add(channel)
                elif "event" in message:
                    event = message
                elif first and "notify" in message:
                    self._notifications(message["notify"])
                elif first and "id" in message:
                    with self._lock:
                        waiter = self._waiting.get(message["id"])
                    if waiter is not None:
                        waiter[1] = message
                        waiter[0].set()
            if message is None:
                if first:
                    self._end()
                return
            if event is not None:
                self._control_event(event, channel)

    def _end(self) -> None:
        with self._lock:
            waiting = list(self._waiting.values())
        for waiter in waiting:
            waiter[0].set()
        if not self._closing:
            self.core._service_lost()

    def _notifications(self, batch: object) -> None:
        if not isinstance(batch, list):
            return
        core = self.core
        for note in batch:
            try:
                event, fields, origin, creator = note
                handler = core.handler(event)
                if handler is None:
                    continue
                params = decode_params(FILTER_PARAMS[event], fields)
            except (ValueError, TypeError, KeyError) as exc:
                log.error("fsfilterd sent a bad notification: %s", exc)
                continue
            core.dispatcher.post(handler, params, _origin(origin), _origin(creator))

    def _control_event(self, message: dict[str, Any], channel: _control.Channel) -> None:
        call_id = message.get("call")
        answer: dict[str, Any] = {"answer": call_id}
        try:
            event = str(message["event"])
            before = message.get("params") or {}  # as the service encoded them: what the handler changed differs
            params = decode_params(FILTER_PARAMS[event], before)
            handler = self.core.handler(event)
            subject = RemoteSubject()
            if handler is not None:
                outcome = self.core.dispatcher.call(handler, params, _origin(message.get("origin")),
                                                    _origin(message.get("creator")), subject)
                if outcome is Outcome.FAILED:
                    answer["failed"] = True
            answer["params"] = changed_fields(params, before)
            answer["suspend"] = subject.suspend
        except (ValueError, TypeError, KeyError) as exc:
            log.error("fsfilterd sent a bad event: %s", exc)
            answer["failed"] = True
        try:
            channel.send(answer)
        except OSError:
            pass

    def close(self) -> None:
        self._closing = True
        self.channel.close()
        if self._events is not None:
            self._events.close()
        me = threading.current_thread()
        for thread in self._threads:
            if thread is not me:  # a reader itself stops the filter when the service goes
                thread.join(5.0)
