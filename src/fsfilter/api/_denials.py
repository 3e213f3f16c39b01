"""The denial log: each refusal by an access or default rule, with who asked for what, rate-limited.

Under systemd the records go to the journal with structured fields (``FSFILTER_PATH``, ``FSFILTER_OP``, ``_PID`` is
the service's own, so the caller is ``FSFILTER_PID``…), sent as datagrams on the journal's native socket; elsewhere
to the ``fsfilter.denials`` logger (stderr unless the program configures logging). A burst beyond the rate limit
is counted and summarised in one line when logging resumes, so a process hammering a protected file cannot flood
the log or slow the filter.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

from fsfilter._abi import fuse as abi
from fsfilter._system.procfs import ProcessInfo

__all__ = ["Denial", "DenialLog", "JOURNAL_SOCKET"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
MAX_BUCKETS = 4096
log = logging.getLogger("fsfilter.denials")


@dataclass
class Denial:
    """One refusal (or, for permissive rules, one request that would have been refused)."""

    time: float
    path: str
    op: str
    pid: int
    image: str
    uid: int
    rule: str
    reason: str
    result: str  # "EACCES", or "allowed (permissive)"
    filter: str

    def text(self) -> str:
        return (f"denied: {self.op} {self.path} by pid {self.pid} ({self.image}, uid {self.uid}): rule {self.rule} "
                f"({self.reason}) -> {self.result} [{self.filter}]")


def op_name(opcode: int) -> str:
    try:
        return abi.Opcode(opcode).name
    except ValueError:
        return str(opcode)


class DenialLog:
    """Where a filter's refusals go. ``rate`` records a second on average per uid, up to ``burst`` at once; the rest
    is counted (``suppressed``) and reported in the next record that gets through."""

    def __init__(self, rate: float = 20.0, burst: int = 100, keep: int = 200, journal: bool | None = None) -> None:
        self.rate = rate
        self.burst = burst
        # One bucket per uid: a user hammering a protected file uses up their own records, not everyone's.
        self._buckets: dict[int, tuple[float, float]] = {}  # uid -> (tokens, when last filled)
        self._lock = threading.Lock()
        self.logged = 0
        self.suppressed = 0  # since the last record that got through
        self.suppressed_total = 0
        self.recent: collections.deque[Denial] = collections.deque(maxlen=keep)
        if journal is None:
            journal = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID")) and os.path.exists(
                JOURNAL_SOCKET)
        self._journal: socket.socket | None = None
        if journal:
            try:
                self._journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._journal.connect(JOURNAL_SOCKET)
            except OSError:
                self._journal = None

    def record(self, path: str, opcode: int, pid: int, uid: int, rule: str, reason: str, refused: bool,
               filter_name: str) -> None:
        with self._lock:
            now = time.monotonic()
            tokens, stamp = self._buckets.get(uid, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - stamp) * self.rate)
            if len(self._buckets) >= MAX_BUCKETS and uid not in self._buckets:
                self._buckets.clear()  # many users at once: start over rather than grow without bound
            if tokens < 1.0:
                self._buckets[uid] = (tokens, now)
                self.suppressed += 1
                self.suppressed_total += 1
                return
            self._buckets[uid] = (tokens - 1.0, now)
            suppressed, self.suppressed = self.suppressed, 0
            self.logged += 1
        image = ProcessInfo(pid).exe if pid else ""
        denial = Denial(time.time(), path, op_name(opcode), pid, image or "?", uid, rule, reason,
                        "EACCES" if refused else "allowed (permissive)", filter_name)
        self.recent.append(denial)
        self._emit(denial, suppressed)

    def _emit(self, denial: Denial, suppressed: int) -> None:
        text = denial.text()
        if suppressed:
            text += f" ({suppressed} earlier denial(s) not logged: rate limit)"
        if self._journal is not None:
            fields = {"MESSAGE": text, "PRIORITY": "4" if denial.result == "EACCES" else "5",
                      "SYSLOG_IDENTIFIER": "fsfilter", "FSFILTER_EVENT": "denial",
                      "FSFILTER_SUPPRESSED": str(suppressed)}
            fields.update({f"FSFILTER_{k.upper()}": str(v) for k, v in asdict(denial).items() if k != "time"})
            try:
                self._journal.send(_journal_datagram(fields), socket.MSG_DONTWAIT)  # never wait on journald
                return
            except OSError:
                pass  # the journal went away: fall back to the logger
        log.warning("%s", text)


def _journal_datagram(fields: dict[str, str]) -> bytes:
    """The journal's native protocol: KEY=value lines; a value with a newline is KEY, newline, 64-bit LE length."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "surrogateescape")
        if b"\n" in data:
            out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)
