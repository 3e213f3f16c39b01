"""fsfilterd: the service that runs filter stacks with no application — default rules from boot, and the layers of
applications that attach to it (service/remote.py).

Each product's default rules file becomes one filter at the lowest altitude ("0") in the stack of its directories,
so every application's layer sees a request before the defaults do. An application's access rule takes precedence
over the defaults on the files it matches (its masks become passthrough rules of the default filters, withdrawing
their access flags there) and the defaults return when it goes. A reload starts the new filter before it stops the
old one: no window without the rules.
"""

from __future__ import annotations

import argparse
import errno
import glob
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fsfilter._system import fuse_device
from fsfilter.api import _control, _deployment, _handover, _rulesfiles, passthrough
from fsfilter.api import _stacks as stacks
from fsfilter.api import constants as c
from fsfilter.api._denials import DenialLog
from fsfilter.api._rulesfiles import RuleFile, RulesError
from fsfilter.api.cbfilter import CBFilter
from fsfilter.errors import CBFSFilterError
from fsfilter.service import handover, remote
from fsfilter.service.peers import Peer

__all__ = ["Service", "main"]

log = logging.getLogger("fsfilterd")

DEFAULT_ALTITUDE = "0"  # below every application's filter
REPARSE_ALTITUDE = "1"  # kept reparse rules: above the defaults (whose rules then judge the target), below applications
MAX_CLIENTS = 256
MAX_CLIENTS_PER_USER = 8  # for users other than root
ROOT_RESERVE = 32  # connections only root may take


def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify) about readiness, reloads and watchdog pings; False when not under systemd."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return False
    address = "\0" + where[1:] if where.startswith("@") else where
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False
    return True


class DefaultRules:
    """One product's default rules, enforced by a filter of the service's."""

    def __init__(self, rules: RuleFile, denial_log: DenialLog) -> None:
        self.file = rules
        self.key = (tuple((r.mask, r.access) for r in rules.rules), rules.permissive)
        self.filter = f = CBFilter()
        f.altitude = DEFAULT_ALTITUDE
        f.config("Service=off")  # the service runs its stacks itself
        f.label = f"default rules {rules.product} ({rules.path})"
        f.denial_log = denial_log
        f.config("Permissive=" + ("true" if rules.permissive else "false"))
        for rule in rules.rules:
            f.add_filter_rule(rule.mask, rule.access, 0, 0)

    def set_overrides(self, masks: set[str]) -> None:
        """Application access rules take precedence over these defaults on the files they match."""
        f = self.filter
        present = {r.mask for r in f.passthrough_rules}
        for mask in present - masks:
            f.delete_passthrough_rule(mask, c.ACCESS_KNOWN, 0, 0)
        for mask in masks - present:
            try:
                f.add_passthrough_rule(mask, c.ACCESS_KNOWN, 0, 0)
            except CBFSFilterError as exc:
                log.warning("cannot let %s override the default rules: %s", mask, exc)


class ReparseStore:
    """Reparse rules the service keeps for products until they are deleted or the machine reboots (the SDK's
    driver keeps them so): one filter per product at altitude REPARSE_ALTITUDE, its rules also written to
    /run/fsfilter/reparse.d/<product>.json, so a restarted service has them again, and a reboot has none."""

    def __init__(self, denial_log: DenialLog) -> None:
        self.denial_log = denial_log
        self.filters: dict[str, CBFilter] = {}
        self.errors: dict[str, str] = {}

    @staticmethod
    def directory() -> Path:
        return Path(_rulesfiles.root() + "/run/fsfilter/reparse.d")

    def _filter(self, product: str) -> CBFilter:
        f = self.filters.get(product)
        if f is None:
            f = self.filters[product] = CBFilter()
            f.altitude = REPARSE_ALTITUDE
            f.label = f"reparse rules {product}"
            f.denial_log = self.denial_log
            f.config("Service=off")
        return f

    def load(self) -> None:
        try:
            names = sorted(os.listdir(self.directory()))
        except FileNotFoundError:
            return
        for name in names:
            if not name.endswith(".json"):
                continue
            product = name[:-5]
            try:
                rules = json.loads((self.directory() / name).read_text())
                for mask, target, flags in rules:
                    self.add(product, str(mask), str(target), int(flags), save=False)
            except (OSError, ValueError, TypeError, CBFSFilterError) as exc:
                self.errors[product] = f"reparse rules of {product} not restored: {exc}"
                log.error("%s", self.errors[product])

    def add(self, product: str, mask: str, target: str, flags: int, save: bool = True) -> bool:
        f = self._filter(product)
        changed = f.add_reparse_rule(mask, target, product, flags)
        if not f.active:
            try:
                f.start_filter(0)
            except CBFSFilterError:
                f.delete_reparse_rule(mask, product)
                raise
        if save:
            self._save(product)
        return changed

    def delete(self, product: str, mask: str | None) -> bool:
        f = self.filters.get(product)
        if f is None:
            return False
        changed = f.delete_all_reparse_rules(product) if mask is None else f.delete_reparse_rule(mask, product)
        if not len(f.reparse):
            f.stop_filter(True)
            del self.filters[product]
        self._save(product)
        return changed

    def rules(self, product: str) -> list[dict[str, Any]]:
        out = []
        for name, f in sorted(self.filters.items()):
            if not product or name == product:
                out += [{"product": name, "mask": r.mask.text, "target": r.target, "flags": r.flags}
                        for r in f.reparse.rules()]
        return out

    def _save(self, product: str) -> None:
        path = self.directory() / f"{product}.json"
        f = self.filters.get(product)
        if f is None:
            path.unlink(missing_ok=True)
            return
        _rulesfiles.write_text_atomic(path, json.dumps([[r.mask.text, r.target, r.flags] for r in f.reparse.rules()]))

    def stop(self) -> None:
        for f in self.filters.values():
            f.stop_filter(True)
        self.filters = {}


class Service:
    def __init__(self, socket_path: str | None = None) -> None:
        self.socket_path = socket_path or _control.socket_path()
        self.denial_log = DenialLog()
        self.started = time.time()
        self.defaults: dict[str, DefaultRules] = {}
        self.rule_errors: list[RulesError] = []
        self.start_errors: dict[str, str] = {}
        self.reloads = 0
        self.apps = remote.Applications(self)
        self.reparse = ReparseStore(self.denial_log)
        self._lock = threading.RLock()  # rules and applications; taken before any CBFilter's lock
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._clients: set[Peer] = set()
        self._owns_socket = False
        self._socket_ino = 0
        # A holder (service/handover.py): until when (monotonic) it keeps the mounts for the next fsfilterd; 0 when
        # it has let them go; None in fsfilterd proper.
        self.holding_until: float | None = None
        self._handing = threading.Lock()  # held while the mounts are handed over (see give)
        self._handed = False  # they were: what applications ask from now on is for the next fsfilterd

    # -- default rules

    def reload(self) -> dict[str, Any]:
        """Read the rules.d directories again and bring the default filters in step, each changed product's new
        filter started before its old one stops."""
        files, errors = _rulesfiles.load_rule_files()
        with self._lock:
            self.rule_errors = errors
            wanted = {f.product: f for f in files}
            overrides = self.apps.access_masks()
            for product, rules in wanted.items():
                old = self.defaults.get(product)
                fresh = DefaultRules(rules, self.denial_log)
                if old is not None and old.key == fresh.key:
                    old.file = rules
                    continue
                try:
                    if fresh.file.rules:
                        fresh.filter.start_filter(0)
                except CBFSFilterError as exc:
                    self.start_errors[product] = str(exc)
                    log.error("default rules of %s not enforced: %s", product, exc)
                    continue
                # After the start: a passthrough rule's directory would otherwise become an attach point too.
                # Until then the defaults also hold on what an application overrides (closed, not open).
                fresh.set_overrides(overrides)
                self.start_errors.pop(product, None)
                self.defaults[product] = fresh
                if old is not None:
                    old.filter.stop_filter(True)
            broken = {Path(e.path).stem for e in errors}
            for product in set(self.defaults) - set(wanted) - broken:  # a file with errors keeps its rules in force
                self.defaults.pop(product).filter.stop_filter(True)
                self.start_errors.pop(product, None)
            self.reloads += 1  # counted once done: a caller waiting for the count sees the new rules in force
        for error in errors:
            log.error("rules file skipped: %s", error)
        return {"products": sorted(self.defaults), "rules": self.default_rule_count(),
                "errors": [str(e) for e in errors] + [f"{p}: {m}" for p, m in self.start_errors.items()]}

    def default_rule_count(self) -> int:
        return sum(len(d.file.rules) for d in self.defaults.values())

    def overrides_changed(self) -> None:
        with self._lock:
            masks = self.apps.access_masks()
            for d in self.defaults.values():
                d.set_overrides(masks)

    # -- status

    def status(self) -> dict[str, Any]:
        with self._lock:
            defaults = list(self.defaults.values())
        filters: dict[int, dict[str, Any]] = {}
        for d in defaults:
            filters[id(d.filter)] = {"kind": "default", "product": d.file.product, "file": d.file.path,
                                     "permissive": d.file.permissive, "pid": os.getpid()}
        for product, f in list(self.reparse.filters.items()):
            filters[id(f)] = {"kind": "reparse", "product": product, "pid": os.getpid()}
        filters.update(self.apps.describe())
        directories = []
        counters = {"requests": 0, "events": 0, "lost_events": 0, "denials": 0, "expired_events": 0}
        seen: set[int] = set()
        for mount in stacks.snapshot():
            counters["requests"] += mount["requests"]
            layers = []
            for layer in mount["layers"]:
                f = layer["filter"]
                about = filters.get(id(f), {"kind": "service"})
                layers.append({"altitude": layer["altitude"], "scope": layer["scope"], "label": getattr(f, "label", ""),
                               "rules": len(f.rules), "denials": getattr(f, "denials", 0), **about})
                if id(f) not in seen:
                    seen.add(id(f))
                    st = f.stats if isinstance(f, CBFilter) else {}
                    counters["events"] += st.get("control_events", 0) + st.get("notifications_delivered", 0)
                    counters["lost_events"] += st.get("shed", 0) + st.get("failed", 0)
                    counters["expired_events"] += st.get("expired", 0)
                    counters["denials"] += getattr(f, "denials", 0)
            directories.append({"path": mount["path"], "layers": layers})
        counters["denials_logged"] = self.denial_log.logged
        counters["denials_suppressed"] = self.denial_log.suppressed_total
        counters.update(self.apps.counters())
        return {
            "state": "running", "version": _deployment.package_version(), "pid": os.getpid(),
            "holder": None if self.holding_until is None else {
                "keeps_for_s": round(max(0.0, self.holding_until - time.monotonic()), 1),
                "handover_socket": handover.socket_path_for(self.socket_path)},
            "uptime": round(time.time() - self.started, 1), "socket": self.socket_path,
            "directories": directories,
            "default_rules": {"count": self.default_rule_count(), "products": sorted(d.file.product for d in defaults),
                              "reloads": self.reloads,
                              "errors": [str(e) for e in self.rule_errors]
                              + [f"{p}: {m}" for p, m in self.start_errors.items()]},
            "applications": self.apps.count(),
            "reparse_rules": {"count": len(self.reparse.rules("")), "errors": list(self.reparse.errors.values())},
            "counters": counters,
            "recent_denials": [vars(d) for d in list(self.denial_log.recent)[-20:]],
            "kernel": _deployment.kernel_features(),
            "installed_products": _deployment.installed_products(),
        }

    # -- the control socket

    def listen(self) -> None:
        inherited = _socket_from_systemd()
        if inherited is not None:
            if self._listener is not None:
                self._listener.close()  # the predecessor's copy: systemd's is the one that stays
            self._listener = inherited
            self._owns_socket = False
            return
        if self._listener is not None:
            return  # the predecessor's, handed over with its mounts
        path = Path(self.socket_path)
        if not path.parent.exists():
            path.parent.mkdir(mode=0o755, parents=True)
        probe = _control.connect(str(path), timeout=1.0)
        if probe is not None:
            probe.close()
            raise CBFSFilterError(errno.EADDRINUSE, f"another fsfilterd listens on {path}: stop it first")
        try:
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # a stale socket of a service that died
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        mask = os.umask(0o111)  # 0666 from the start: anyone may ask for the status; changes need root
        try:
            sock.bind(str(path))
        finally:
            os.umask(mask)
        sock.listen(64)
        self._listener = sock
        self._owns_socket = True
        self._socket_ino = os.stat(path).st_ino

    def serve_forever(self) -> None:
        listener = self._listener
        assert listener is not None
        listener.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            conn.settimeout(None)
            try:
                peer = Peer(conn)
            except OSError:
                conn.close()
                continue
            with self._lock:
                mine = sum(1 for p in self._clients if p.uid == peer.uid)
                others = sum(1 for p in self._clients if not p.privileged)
                if len(self._clients) >= MAX_CLIENTS or not peer.privileged and (
                        mine >= MAX_CLIENTS_PER_USER or others >= MAX_CLIENTS - ROOT_RESERVE):
                    refused = True  # one user must not take every connection from the others (and root)
                else:
                    refused = False
                    self._clients.add(peer)
            if refused:
                _send(peer, {"id": None, "error": {"code": errno.EMFILE, "message": "too many connections"}})
                peer.close()
                continue
            threading.Thread(target=self._serve_peer, args=(peer,), name=f"fsfilterd-peer-{peer.pid}",
                             daemon=True).start()

    def _serve_peer(self, peer: Peer) -> None:
        try:
            while not self._stop.is_set():
                try:
                    message = peer.channel.receive()
                except _control.ProtocolError as exc:
                    _send(peer, {"id": None, "error": {"code": exc.code, "message": str(exc)}})
                    continue
                except OSError:
                    return
                if message is None:
                    return
                if self.apps.takes(peer, message):
                    continue  # an answer to an event the service sent
                answer = self.handle(peer, message)
                if answer is not None:
                    _send(peer, answer)
                if self.apps.is_event_line(peer):
                    return  # from now on the threads waiting for answers read this connection
        finally:
            with self._lock:
                self._clients.discard(peer)
            if not self.apps.is_event_line(peer):
                self.apps.gone(peer)
                peer.close()

    def handle(self, peer: Peer, message: dict[str, Any]) -> dict[str, Any] | None:
        ident = message.get("id")
        if not isinstance(ident, int) or isinstance(ident, bool):
            return {"id": None, "error": {"code": errno.EBADMSG, "message": "a request needs an integer \"id\""}}
        method = message.get("method")
        params = message.get("params", {})
        try:
            if not isinstance(method, str) or method not in _control.METHODS:
                raise _control.ProtocolError(errno.ENOSYS, f"unknown method {method!r}; known: "
                                             f"{', '.join(sorted(_control.METHODS))}")
            if not isinstance(params, dict):
                raise _control.ProtocolError(errno.EINVAL, "\"params\" must be an object")
            if _control.METHODS[method] and not peer.privileged:
                raise _control.ProtocolError(errno.EPERM, f"{method} changes rules that bind every user's processes: "
                                             f"only root (CAP_SYS_ADMIN) may call it, and pid {peer.pid} runs as uid "
                                             f"{peer.uid}")
            result = self._dispatch(peer, method, params)
        except _control.ProtocolError as exc:
            return {"id": ident, "error": {"code": exc.code, "message": str(exc)}}
        except CBFSFilterError as exc:
            return {"id": ident, "error": {"code": exc.code, "message": str(exc)}}
        except Exception as exc:  # a bug must not take the service down: answer it, log it
            log.exception("%s from pid %d failed", method, peer.pid)
            return {"id": ident, "error": {"code": errno.EIO, "message": f"{method} failed: {exc}"}}
        return {"id": ident, "result": result}

    def _dispatch(self, peer: Peer, method: str, params: dict[str, Any]) -> Any:
        if method == "hello":
            return {"version": _deployment.package_version(), "protocol": _control.PROTOCOL_VERSION,
                    "pid": os.getpid(), "privileged": peer.privileged}
        if method == "status":
            status = self.status()
            if not peer.privileged:
                status["recent_denials"] = []  # other users' paths and processes are root's business
            return status
        if method == "reload":
            return self.reload()
        if method == "list_default_rules":
            with self._lock:
                return [{"product": d.file.product, "file": d.file.path, "permissive": d.file.permissive,
                         "mask": r.mask, "access_flags": r.access, "flags": _rulesfiles.flags_text(r.access)}
                        for d in self.defaults.values() for r in d.file.rules]
        if method in ("add_default_rule", "delete_default_rule"):
            mask = _text(params, "mask")
            product = params.get("product", "")
            if not isinstance(product, str):
                raise _control.ProtocolError(errno.EINVAL, "\"product\" must be a string")
            if method == "add_default_rule":
                access = params.get("access_flags")
                if not isinstance(access, int) or isinstance(access, bool):
                    raise _control.ProtocolError(errno.EINVAL, "\"access_flags\" must be an integer")
                changed = _rulesfiles.edit_default_rules(product, mask, access)
            else:
                changed = _rulesfiles.edit_default_rules(product, mask, None)
            self.reload()
            return changed
        if method in ("add_reparse_rule", "delete_reparse_rule", "list_reparse_rules"):
            product = params.get("product", "")
            if not isinstance(product, str):
                raise _control.ProtocolError(errno.EINVAL, "\"product\" must be a string")
            product = _rulesfiles.product_file(product).stem if product else "default"
            with self._lock:
                if method == "list_reparse_rules":
                    return self.reparse.rules(product if params.get("product") else "")
                if method == "delete_reparse_rule":
                    which = params.get("mask")
                    if which is not None and not isinstance(which, str):
                        raise _control.ProtocolError(errno.EINVAL, "\"mask\" must be a string, or absent for all")
                    return self.reparse.delete(product, which)
                flags = params.get("flags", 0)
                if not isinstance(flags, int) or isinstance(flags, bool):
                    raise _control.ProtocolError(errno.EINVAL, "\"flags\" must be an integer")
                return self.reparse.add(product, _text(params, "mask"), _text(params, "target"), flags)
        if method == "events":
            return self.apps.request(peer, method, params)
        with self._handing:  # not while the mounts are being handed over (see give)
            if self._handed:
                raise _control.ProtocolError(errno.ENOTCONN, "fsfilterd handed its mounts to its successor: attach "
                                                             "again there")
            return self.apps.request(peer, method, params)

    def has_mounts(self) -> bool:
        with stacks._registry_lock:
            return bool(stacks._stacks or stacks._draining)

    def stop(self, hand_over: bool = False) -> None:
        """Stop serving. ``hand_over``: the mounts, the application filters on them and the control socket go to a
        holder process (service/handover.py) that keeps them, with the default rules, for the next fsfilterd; what
        cannot go there drains in keeper processes. Else (a holder letting go) busy mounts are detached and drain in
        this process (the caller waits for them)."""
        self._stop.set()
        listener, self._listener = self._listener, None
        handed = hand_over and self.has_mounts() and self._hand_to_holder(listener)
        if listener is not None:
            listener.close()
            if self._owns_socket and not handed:
                handover.unlink_if_ours(self.socket_path, self._socket_ino)
        self.apps.stop(flush=2.0)  # what the applications are owed is sent before their connections close
        with self._lock:
            clients = list(self._clients)
        for peer in clients:
            peer.channel.close()  # attached applications attach again: to the holder, whose filters kept their rules
        self.apps.stop()
        if hand_over:
            stacks.keep_in_process = False  # this process ends: a mount left busy goes to a keeper, not down with it
        self.reparse.stop()
        with self._lock:
            defaults, self.defaults = list(self.defaults.values()), {}
        for d in defaults:
            d.filter.stop_filter(True)

    def handover_state(self, listener: socket.socket | None, fds: list[int]) -> dict[str, Any]:
        """What the next fsfilterd needs besides the mounts: the application filters on them (it keeps them until
        their applications attach again) and the control socket (applications reconnect at once, to it)."""
        state: dict[str, Any] = {"apps": self.apps.export(), "listener": None, "owns_socket": self._owns_socket}
        if listener is not None:
            fds.append(listener.fileno())
            state["listener"] = len(fds) - 1
        return state

    def _hand_to_holder(self, listener: socket.socket | None) -> bool:
        try:
            proc, sock = handover.spawn_holder(self.socket_path)
        except OSError as exc:
            log.warning("could not start a holder for the mounts (%s): they drain in keeper processes", exc)
            return False
        try:
            if self.give(sock, listener):
                log.info("the mounts, default rules and application filters are kept by holder pid %d for the next "
                         "fsfilterd (%s)", proc.pid, handover.socket_path_for(self.socket_path))
                return True
            if proc.poll() is None:
                proc.kill()
            return False
        finally:
            sock.close()

    def give(self, sock: socket.socket, listener: socket.socket | None = None) -> bool:
        """Hand everything to the taker at the other end of ``sock`` (handover.give). Attaching, detaching and
        changing an application's rules wait meanwhile: what the taker gets must be what holds."""
        with self._handing:
            self._handed = handover.give(sock, lambda fds: self.handover_state(listener or self._listener, fds))
            return self._handed

    def take_over(self, state: dict[str, Any], fds: list[int]) -> None:
        """The service part of a handover: the control socket (when this process has none of systemd's) and the
        application filters to keep."""
        index = state.get("listener")
        if isinstance(index, int):
            handed = socket.socket(fileno=fds[index])
            if self._listener is None:
                handed.setblocking(True)
                self._listener = handed
                self._owns_socket = bool(state.get("owns_socket"))
                try:
                    self._socket_ino = os.stat(self.socket_path).st_ino if self._owns_socket else 0
                except OSError:
                    self._socket_ino = 0
            else:
                handed.close()
        self.apps.keep(state.get("apps"))


def _send(peer: Peer, message: dict[str, Any]) -> None:
    try:
        peer.channel.send(message)
    except OSError:
        pass


def _text(params: dict[str, Any], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise _control.ProtocolError(errno.EINVAL, f"\"{name}\" must be a non-empty string")
    return value


def _socket_from_systemd() -> socket.socket | None:
    """The control socket systemd passed (socket activation: LISTEN_FDS, the first at fd 3), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    os.set_inheritable(3, False)
    return socket.socket(fileno=3)


def _watchdog(service: Service, interval: float) -> None:
    while not service._stop.wait(interval):
        if service._listener is not None:
            sd_notify("WATCHDOG=1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fsfilterd", description=(
        "The fsfilter service: enforces the default rules of /usr/lib, /run and /etc/fsfilter/rules.d with no "
        "application running, and runs the filters of applications that attach to it. Normally started by "
        "systemd (fsfilterd.service); --foreground runs it in this terminal or container."))
    parser.add_argument("--foreground", action="store_true", help="run in the foreground (what systemd runs too)")
    parser.add_argument("--socket", help="control socket path (default /run/fsfilter/control.sock)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    parser.add_argument("--hold-fd", type=int, help=argparse.SUPPRESS)  # the holder fsfilterd starts on stopping
    parser.add_argument("--grace", type=float, default=float(os.environ.get("FSFILTER_HANDOVER_GRACE", "30")),
                        help="seconds the mounts wait, served, for the next fsfilterd after this one stops (default "
                             "30; FSFILTER_HANDOVER_GRACE); then they are let go")
    args = parser.parse_args(argv)
    holding = args.hold_fd is not None
    # The journal stamps each line itself; a terminal or a log file needs the time in the line.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format=f"{stamp}fsfilterd{' holder' if holding else ''}[%(process)d]: %(levelname)s "
                               "%(message)s")
    if not args.foreground:
        parser.error("fsfilterd does not fork: run it under systemd (systemctl start fsfilterd) or with --foreground")
    if os.geteuid() != 0:
        print("fsfilterd: needs root (it mounts over directories and answers for every user)", file=sys.stderr)
        return 1
    fuse_device.raise_fd_limit()  # before a handover: its fds (one per node and open file) come in at once
    stacks.keep_in_process = True  # the service outlives its filters: a mount left busy drains here
    service = Service(args.socket)
    # Should this process die, each mount's watchdog keeps it, other processes' requests held, for the next one.
    if passthrough.rescue_mode:  # (FSFILTER_RESCUE=0 turns it off)
        passthrough.rescue_mode = f"hold:{service.socket_path}"
    if holding:
        return _hold(service, socket.socket(fileno=args.hold_fd), args.grace)
    taken = _take_from_holder(service)
    try:
        try:
            service.listen()
        except (CBFSFilterError, OSError) as exc:
            if not taken:
                print(f"fsfilterd: {exc}", file=sys.stderr)
                return 1
            log.error("%s: serving the mounts taken over without a control socket", exc)
        summary = service.reload()
        service.reparse.load()
    finally:
        _handover.open_all(taken)  # whatever happened: held requests must not wait for ever
    log.info("enforcing %d default rule(s) of %s; listening on %s%s", summary["rules"],
             ", ".join(summary["products"]) or "no product", service.socket_path,
             f"; serving {len(taken)} mount(s) taken over from the previous fsfilterd" if taken else "")

    def on_hup(signum: int, frame: object) -> None:
        threading.Thread(target=_reload_by_signal, args=(service,), name="fsfilterd-reload", daemon=True).start()

    def on_term(signum: int, frame: object) -> None:
        service._stop.set()

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if service._listener is not None:
        threading.Thread(target=service.serve_forever, name="fsfilterd-accept", daemon=True).start()
    watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if watchdog_usec:
        threading.Thread(target=_watchdog, args=(service, watchdog_usec / 2e6), daemon=True).start()
    problems = f"; {len(summary['errors'])} problem(s): fsfilter status" if summary["errors"] else ""
    sd_notify(f"READY=1\nSTATUS=enforcing {summary['rules']} default rule(s){problems}\nMAINPID={os.getpid()}")
    print(f"fsfilterd: ready (pid {os.getpid()})", file=sys.stderr, flush=True)
    try:
        while not service._stop.wait(1.0):
            pass
    finally:
        sd_notify("STOPPING=1")
        service.stop(hand_over=True)
    log.info("stopped")
    return 0


def _safe_directory(path: str) -> bool:
    """Whether only root can put a socket in ``path``'s directory (else another user could offer us mounts)."""
    try:
        st = os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or bool(st.st_mode & stat.S_ISVTX)


def _take_from_holder(service: Service) -> list[stacks.MountStack]:
    """The mounts a holder keeps for this fsfilterd (the previous one stopped), and those rescuers keep (it died:
    each mount's watchdog rescued it, service/rescue.py)."""
    base = handover.socket_path_for(service.socket_path)
    taken: list[stacks.MountStack] = []
    for path in [base, *sorted(glob.glob(glob.escape(base) + ".*"))]:
        taken += _take_from(service, path)
    return taken


def _take_from(service: Service, path: str) -> list[stacks.MountStack]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return []
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != 0 or not _safe_directory(path):
        log.warning("ignoring %s: not a socket of root's in a directory only root may change", path)
        return []
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(path)
        except ConnectionRefusedError:
            log.info("%s: left by a holder or rescuer that is gone; removing it", path)
            handover.unlink_if_ours(path, st.st_ino)
            return []
        mounts, state, fds = handover.take(sock)
    except (OSError, handover.HandoverError) as exc:
        log.warning("could not take the mounts kept at %s (%s): starting afresh", path, exc,
                    exc_info=log.isEnabledFor(logging.DEBUG))
        return []
    finally:
        sock.close()
    try:
        service.take_over(state, fds)
    except Exception:  # the mounts are ours now: serve them, with what could be taken
        log.exception("taking over the control socket and application filters failed")
    return mounts


def _hold(service: Service, giver: socket.socket, grace: float) -> int:
    """The holder's life: take the mounts of the fsfilterd that stops, serve them with the default rules, and give
    them to the next fsfilterd; with none within ``grace`` seconds (or on SIGTERM), let them go: detached, they
    drain here, and the holder exits when the last one ends (a successor may still take them meanwhile)."""
    # Listening before the mounts are taken: a successor started meanwhile waits for them instead of mounting anew.
    path = handover.socket_path_for(service.socket_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    mask = os.umask(0o177)
    try:
        listener.bind(path)
    except OSError as exc:
        log.error("cannot listen on %s (%s): the mounts stay with the stopping fsfilterd", path, exc)
        giver.close()
        return 1
    finally:
        os.umask(mask)
    listener.listen(4)
    listener.settimeout(0.5)
    mine = os.stat(path).st_ino
    try:
        return _serve_held(service, giver, listener, grace)
    finally:
        listener.close()
        handover.unlink_if_ours(path, mine)


def _serve_held(service: Service, giver: socket.socket, listener: socket.socket, grace: float) -> int:
    try:
        taken, state, fds = handover.take(giver)
    except (OSError, handover.HandoverError) as exc:
        log.error("taking the mounts failed: %s", exc)
        return 1
    finally:
        giver.close()
    try:
        service.take_over(state, fds)
        service.reload()
        service.reparse.load()
    except Exception:
        log.exception("putting the rules in failed: serving the mounts with those that are in")
    finally:
        _handover.open_all(taken)
    if service._listener is not None:  # applications attach again here, and may ask for the status
        threading.Thread(target=service.serve_forever, name="fsfilterd-accept", daemon=True).start()
    log.info("keeping %d mount(s) for the next fsfilterd (%s), for %g s", len(taken),
             handover.socket_path_for(service.socket_path), grace)
    signal.signal(signal.SIGTERM, lambda signum, frame: service._stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    deadline = service.holding_until = time.monotonic() + grace
    let_go = False
    while True:
        if not let_go and (service._stop.is_set() or time.monotonic() >= deadline):
            log.info("no fsfilterd took the mounts: letting them go (what is inside them stays served until it "
                     "leaves)")
            service.holding_until = 0.0
            service.stop()
            let_go = True
        if let_go and not service.has_mounts():
            break
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            if handover.peer_is_root(conn) and service.give(conn):
                # The mounts are the successor's: the filters here leave them untouched; a mount that could not go
                # (a handler that did not return) goes to a keeper rather than down with this process.
                stacks.keep_in_process = False
                service._owns_socket = False  # the control socket is the successor's now
                service.stop()
                break
    log.info("holder done")
    return 0


def _reload_by_signal(service: Service) -> None:
    sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        summary = service.reload()
        log.info("reloaded: %d default rule(s)%s", summary["rules"],
                 f"; {len(summary['errors'])} error(s)" if summary["errors"] else "")
    finally:
        sd_notify(f"READY=1\nSTATUS=enforcing {service.default_rule_count()} default rule(s)")


if __name__ == "__main__":
    sys.exit(main())
