"""The ``fsfilter`` command line."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from fsfilter._engine.masks import MaskError, file_matches_mask
from fsfilter._system import procfs
from fsfilter.api import constants as c
from fsfilter.api.cbfilter import NOTIFY_BITS, CBFilter
from fsfilter.api.cbmonitor import MONITOR_PARAMS, CBMonitor
from fsfilter.api.cbprocess import CBProcess
from fsfilter.api.params import FILTER_PARAMS
from fsfilter.api.passthrough import PassthroughFilter
from fsfilter.errors import CBFSFilterError

__all__ = ["main"]  # the `fsfilter` command


def _count(high: int) -> Callable[[str], int]:
    """An argparse type for an integer from 1 to ``high``: out of range is a usage error (exit 2)."""
    def parse(text: str) -> int:
        value = int(text)
        if not 1 <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between 1 and {high}, not {value}")
        return value
    parse.__name__ = "integer"  # argparse says "invalid integer value" for what int() refuses
    return parse


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds, not {text}")
    return value


def _whole_seconds(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 (none) and 65535 seconds, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsfilter", description="Watch, allow, deny and hide file operations.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the daemon does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("passthrough", help="serve a directory through fsfilter, changing nothing",
                       description="Serve LOWER at MOUNTPOINT (or over LOWER itself) in the foreground until "
                                   "Ctrl-C or SIGTERM, then unmount and exit 0.")
    p.add_argument("lower", metavar="LOWER", help="the directory to serve")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", help="where to serve it (default: over LOWER)")
    p.add_argument("--workers", type=_count(64), default=1, help="reader threads on /dev/fuse (default 1)")
    p.add_argument("--pool", type=_count(256), default=4, help="threads for blocking requests (default 4)")
    p.add_argument("--no-kernel-passthrough", action="store_true",
                   help="serve every read and write in the daemon instead of kernel passthrough")
    p.add_argument("--entry-timeout", type=_seconds, default=60.0, help="seconds the kernel caches names")
    p.add_argument("--attr-timeout", type=_seconds, default=60.0, help="seconds the kernel caches attributes")
    p.add_argument("--negative-timeout", type=_seconds, default=10.0, help="seconds the kernel caches misses")
    p.add_argument("--spin", type=_seconds, default=0.0002, help="seconds a reader polls before sleeping")
    p.add_argument("--request-timeout", type=_whole_seconds, default=45,
                   help="seconds after which the kernel gives up on a daemon that does not answer (stopped, "
                        "wedged) and aborts the mount (default 45; the kernel checks every 15 s)")
    p.add_argument("--stats", action="store_true", help="print request counts when stopping")

    m = sub.add_parser("monitor", help="print the file operations below a directory, with process names",
                       description="Watch PATH (everything below it) and print one line per operation: time, "
                                   "process (pid), event, path and details. Ctrl-C stops and unmounts. With "
                                   "--system nothing is mounted: fanotify watches the file systems of the given "
                                   "directories or masks (e.g. '/home/*.docx', or '*.key' anywhere).")
    m.add_argument("paths", metavar="PATH_OR_MASK", nargs="+",
                   help="the directory to watch; with --system, directories or masks, one or more")
    m.add_argument("--system", action="store_true",
                   help="watch with fanotify (CBMonitor): no mount, every process, whole file systems")
    m.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    m.add_argument("--mask", default="*", help="only names matching this mask (default *)")
    m.add_argument("--events", default="all",
                   help="comma-separated: " + ",".join(sorted(MONITOR_EVENTS)) + " (default all)")
    m.add_argument("--own", action="store_true", help="also show this process's own operations")

    h = sub.add_parser("hide", help="hide entries below a directory from listings and from opening by name",
                       description="Entries below PATH whose names match a PATTERN vanish from directory listings, "
                                   "and opening, stat or walking through them fails with ENOENT, for every process "
                                   "but this one. Ctrl-C stops and they are back.")
    h.add_argument("path", metavar="PATH", help="the directory to hide entries in (recursively)")
    h.add_argument("patterns", metavar="PATTERN", nargs="+", help="a name mask with ? and *, e.g. 'secret*'")

    sb = sub.add_parser("sandbox", help="let matching programs change private copies of files, not the originals",
                        description="Copy-on-write sandbox: a process whose program matches --program (a name mask "
                                    "like 'python*', or a full path mask) sees, below PATH, a private copy of every "
                                    "file it opens for writing (made in --store on its first such open; later "
                                    "opens of the file, reading too, see the copy); every other process sees the "
                                    "originals, which never change. Sandboxed processes may not create, delete or "
                                    "rename files below PATH (EACCES). Ctrl-C stops; the copies stay in the store.")
    sb.add_argument("path", metavar="PATH", help="the directory whose files are protected (recursively)")
    sb.add_argument("--program", "-p", metavar="MASK", action="append", required=True,
                    help="a program whose processes are sandboxed: a name mask (python3, 'vi*'; matched against the "
                         "program's file name and the process name) or a path mask (/usr/bin/*); repeat for several")
    sb.add_argument("--store", metavar="DIR",
                    help="where the private copies go (made if missing; outside PATH); default: a new directory "
                         "in /var/tmp")

    en = sub.add_parser("encrypt", help="serve a directory encrypted: trusted programs see plaintext, others the "
                                        "stored bytes",
                        description="Transparent encryption below PATH until Ctrl-C: files that trusted programs "
                                    "create are encrypted from their first byte, and trusted programs read and write "
                                    "the plaintext of every encrypted file; every other process sees the files as "
                                    "stored (backup tools copy ciphertext) and may not write into encrypted ones. "
                                    "Existing plain files stay plain (convert them with encrypt-file). The password "
                                    "comes from --password-file, --password-env or standard input.")
    en.add_argument("path", metavar="PATH", help="the directory (recursively)")
    en.add_argument("--trusted", "-t", metavar="MASK", action="append", required=True,
                    help="a program that sees plaintext: a name mask (vim, 'python3*') or a path mask; repeat")
    en.add_argument("--children", action="store_true", help="trust the trusted programs' descendants too")
    en.add_argument("--password-file", metavar="FILE")
    en.add_argument("--password-env", metavar="VAR")
    en.add_argument("--global-salt", metavar="HEX", help="32 hex digits (default zeros)")
    en.add_argument("--allow-untrusted-writes", action="store_true",
                    help="let other processes write into encrypted files (which corrupts them)")

    for name, what in (("encrypt-file", "encrypt files in place (docs/file-format.md)"),
                       ("decrypt-file", "turn encrypted files back into plain ones, in place"),
                       ("rekey", "change the password of encrypted files (their header only)")):
        e = sub.add_parser(name, help=what,
                           description=what[0].upper() + what[1:] + ". Each file is replaced whole or not at all "
                                       "(a crash leaves the old file or the new one). The password comes from "
                                       "--password-file, --password-env or standard input (a prompt, not echoed, "
                                       "on a terminal): never from the command line.")
        e.add_argument("files", metavar="FILE", nargs="+", help="the files")
        e.add_argument("--password-file", metavar="FILE", help="read the password from the first line of FILE")
        e.add_argument("--password-env", metavar="VAR", help="read the password from environment variable VAR")
        e.add_argument("--global-salt", metavar="HEX", help="CBEncrypt's global_salt, 32 hex digits (default zeros)")
        e.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
        if name == "encrypt-file":
            e.add_argument("--chunk-size", type=int, default=65536, metavar="BYTES",
                           help="plaintext chunk size, a power of two from 4096 to 1048576 (default 65536)")
            e.add_argument("--algorithm", choices=["aes-256-gcm", "chacha20-poly1305"], default="aes-256-gcm")
        if name == "rekey":
            e.add_argument("--new-password-file", metavar="FILE", help="the new password's file")
            e.add_argument("--new-password-env", metavar="VAR", help="the new password's environment variable")

    pr = sub.add_parser("protect", help="enforce access rules below a directory",
                        description="Enforce access rules on everything below PATH until Ctrl-C. Denied "
                                    "operations fail with EACCES.")
    pr.add_argument("path", metavar="PATH", help="the directory to protect (recursively)")
    for flag, help_text in PROTECT_FLAGS_HELP.items():
        pr.add_argument(flag, action="store_true", help=help_text)
    pr.add_argument("--fanotify", action="store_true",
                    help="enforce with fanotify permission events instead of a mount (only --deny-all, --read-only "
                         "and --no-exec; denied opens fail with EPERM)")

    pm = sub.add_parser("procmon", help="print process and thread creation and termination as they happen",
                        description="One line per event: time, event, pid, parent, image and command line. "
                                    "Ctrl-C stops.")
    pm.add_argument("--threads", action="store_true", help="also thread creation and termination")
    pm.add_argument("--json", action="store_true", help="one JSON object per line instead of text")

    de = sub.add_parser("deny-exec", help="refuse to start matching programs until stopped",
                        description="Programs whose path (a mask with '/') or name matches are refused: their "
                                    "execve fails with EPERM. The file systems of the given paths are watched "
                                    "(fanotify exec permission); a name mask watches every local file system. "
                                    "Ctrl-C stops, and nothing is refused any more.")
    de.add_argument("masks", metavar="PATH_OR_NAME_MASK", nargs="+", help="e.g. /opt/tools/* or 'nc*'")

    d = sub.add_parser("demo", help="a short live demonstration on a temporary directory")
    d.add_argument("--quiet", action="store_true", help="print only the summary")

    st = sub.add_parser("status", help="fsfilterd's state: filtered directories and their stacks, counters, "
                                       "default rules, kernel features")
    st.add_argument("--json", action="store_true", help="print the status as JSON")

    ru = sub.add_parser("rules", help="check and list default rules (/etc, /run, /usr/lib/fsfilter/rules.d)")
    rsub = ru.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    rc = rsub.add_parser("check", help="validate rules files; bad lines are reported with their numbers")
    rc.add_argument("files", metavar="FILE", nargs="+")
    rl = rsub.add_parser("list", help="the default rules the files define, product by product")
    rl.add_argument("--json", action="store_true", help="print them as JSON")
    return parser


def run_rules(args: argparse.Namespace) -> int:
    from fsfilter.api import _rulesfiles
    if args.rules_command == "check":
        bad = 0
        for name in args.files:
            try:
                rules, permissive = _rulesfiles.parse_rules(open(name, encoding="utf-8").read(), name)
            except _rulesfiles.RulesError as exc:
                bad += 1
                print(exc, file=sys.stderr)
                continue
            except (OSError, UnicodeDecodeError) as exc:
                bad += 1
                print(f"{name}: {exc}", file=sys.stderr)
                continue
            print(f"{name}: {len(rules)} rule(s){' (permissive)' if permissive else ''}: ok")
        return 1 if bad else 0
    files, errors = _rulesfiles.load_rule_files()
    rows = [{"product": f.product, "file": f.path, "permissive": f.permissive, "mask": r.mask,
             "flags": _rulesfiles.flags_text(r.access), "access_flags": r.access} for f in files for r in f.rules]
    if args.json:
        print(json.dumps({"rules": rows, "errors": [str(e) for e in errors]}, indent=1))
    else:
        for row in rows:
            mode = " (permissive)" if row["permissive"] else ""
            print(f"{row['product']:<20} {row['flags']:<28} {row['mask']}{mode}")
        if not rows:
            print("no default rules (" + ", ".join(str(d) for d in _rulesfiles.rules_dirs()) + ")")
    for error in errors:
        print(f"skipped: {error}", file=sys.stderr)
    return 1 if errors else 0


def run_status(args: argparse.Namespace) -> int:
    from fsfilter.api import _control, _deployment
    try:
        status = _control.call("status", timeout=5.0)
    except CBFSFilterError as exc:
        status = {"state": "not running", "detail": exc.message, "version": _deployment.package_version(),
                  "installed_products": _deployment.installed_products(), "kernel": _deployment.kernel_features()}
    if args.json:
        print(json.dumps(status, indent=1, default=str))
        return 0 if status["state"] == "running" else 3
    print(f"fsfilterd: {status['state']} (version {status['version']})")
    if status["state"] != "running":
        print(f"  {status['detail']}")
    else:
        print(f"  pid {status['pid']}, up {status['uptime']} s, socket {status['socket']}")
        holder = status.get("holder")
        if holder:
            print(f"  a holder: fsfilterd stopped and this process keeps its mounts and rules for the next one "
                  f"({holder['keeps_for_s']} s left; then they are let go)")
        d = status["default_rules"]
        print(f"  default rules: {d['count']} from {', '.join(d['products']) or 'no product'}"
              f" ({d['reloads']} load(s))")
        for error in d["errors"]:
            print(f"    error: {error}")
        print(f"  applications attached: {status['applications']}")
        for directory in status["directories"]:
            print(f"  {directory['path']}")
            for layer in directory["layers"]:
                who = f"pid {layer.get('pid', '?')}"
                extra = " permissive" if layer.get("permissive") else ""
                print(f"    altitude {layer['altitude']:<10g} {layer.get('kind', '?'):<12} {who:<10} "
                      f"{layer['rules']} rule(s), {layer['denials']} denial(s){extra}  {layer['label']}")
        counters = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in status["counters"].items())
        print(f"  counters: {counters}")
    products = status.get("installed_products") or []
    print(f"  installed products: {', '.join(products) or 'none'}")
    kernel = status.get("kernel", {})
    print("  kernel: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in kernel.items()))
    return 0 if status["state"] == "running" else 3


def _stop_on_signals() -> threading.Event:
    """An event that SIGINT, SIGTERM and SIGHUP set. Installed before mounting, so that a signal arriving
    while the filter starts still ends in a clean stop and exit 0 rather than a kill or KeyboardInterrupt."""
    stop = threading.Event()

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    return stop


def _serve_until_signal(filt: PassthroughFilter, stop: threading.Event) -> None:
    while not stop.is_set():
        if filt.wait(0.2):  # unmounted from outside
            break
        stop.wait(0.05)


def run_passthrough(args: argparse.Namespace) -> int:
    filt = PassthroughFilter(args.lower, args.mountpoint, workers=args.workers, pool=args.pool,
                             passthrough=not args.no_kernel_passthrough, entry_timeout=args.entry_timeout,
                             attr_timeout=args.attr_timeout, negative_timeout=args.negative_timeout,
                             spin=args.spin, request_timeout=args.request_timeout)
    stop = _stop_on_signals()
    filt.start()
    try:
        mode = "kernel passthrough" if filt.passthrough_active else "daemon-served I/O"
        print(f"fsfilter: serving {filt.lower} at {filt.mountpoint} ({mode}); Ctrl-C to stop", file=sys.stderr)
        _serve_until_signal(filt, stop)
    finally:
        stats = filt.stats
        filt.stop()
    if args.stats and stats is not None:
        for name, count in sorted(stats.by_opcode().items()):
            print(f"{name:16} {count}", file=sys.stderr)
    if "aborted" in filt.lost:  # unmounting it is a way to stop a pass-through; an abort is a failure
        print(f"fsfilter: error: {filt.lost}", file=sys.stderr)
        return 1
    print("fsfilter: unmounted", file=sys.stderr)
    return 0


MONITOR_EVENTS: dict[str, int] = {
    "create": c.FS_NE_CREATE, "open": c.FS_NE_OPEN, "read": c.FS_NE_READ, "write": c.FS_NE_WRITE,
    "cleanup": c.FS_NE_CLEANUP, "close": c.FS_NE_CLOSE, "delete": c.FS_NE_DELETE | c.FS_NE_CAN_DELETE,
    "rename": c.FS_NE_RENAME, "link": c.FS_NE_CREATE_HARD_LINK, "size": c.FS_NE_SET_SIZES,
    "attributes": c.FS_NE_SET_ATTRIBUTES, "security": c.FS_NE_SET_SECURITY | c.FS_NE_GET_SECURITY,
    "ea": c.FS_NE_SET_EA | c.FS_NE_QUERY_EA, "list": c.FS_NE_ENUMERATE_DIRECTORY, "ioctl": c.FS_NE_IOCTL,
    "readlink": c.FS_NE_GET_REPARSE_POINT, "lock": c.FS_NE_LOCK_CONTROL,
}
PROTECT_FLAGS: dict[str, int] = {
    "--read-only": c.ACCESS_READ_ONLY, "--write-only": c.ACCESS_WRITE_ONLY, "--no-delete": c.ACCESS_DELETE_PROTECT,
    "--no-delete-only": c.ACCESS_DELETE_ONLY_PROTECT, "--no-rename": c.ACCESS_RENAME_PROTECT,
    "--no-exec": c.ACCESS_EXECUTE_PROTECT, "--no-chmod": c.ACCESS_NO_CHANGE_DAC,
    "--no-chown": c.ACCESS_NO_CHANGE_OWNER, "--deny-all": c.ACCESS_DENY_ALL,
}
PROTECT_FLAGS_HELP: dict[str, str] = {
    "--read-only": "no writing, truncating, creating or deleting", "--write-only": "no reading",
    "--no-delete": "no deleting or renaming", "--no-delete-only": "no deleting (renaming allowed)",
    "--no-rename": "no renaming", "--no-exec": "no executing", "--no-chmod": "no mode or ACL changes",
    "--no-chown": "no owner changes", "--deny-all": "no access at all",
}


def _directory(path: str) -> str:
    if not path.strip():
        raise CBFSFilterError(errno.EINVAL, "the directory is an empty string: give the directory to filter")
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise CBFSFilterError(errno.ENOTDIR, f"{path} is not a directory: give the directory to filter")
    return real


def _describe(event: str, p: Any) -> str:
    details = []
    for name in ("new_file_name", "link_name", "size", "position", "bytes_read", "bytes_written", "mode",
                 "ea_name", "io_control_code"):
        if name in type(p).__slots__:
            value = getattr(p, name)
            if value not in (None, "", -1) and not (name == "mode" and value == 0):
                details.append(f"{name}={oct(value) if name == 'mode' else value}")
    if "offset" in type(p).__slots__ and "key" in type(p).__slots__:  # lock events
        details.append(f"range={p.offset}+{p.length or 'EOF'}")
        if "exclusive_lock" in type(p).__slots__:
            details.append("exclusive" if p.exclusive_lock else "shared")
    if getattr(p, "status", 0):
        details.append(f"error={errno.errorcode.get(p.status, p.status)}")
    path = p.file_name if "directory_name" not in type(p).__slots__ else f"{p.directory_name}/{p.file_name}"
    return f"{event:<12} {path}" + (f"  {' '.join(details)}" if details else "")


def _wanted_events(spec: str) -> int:
    wanted = 0
    for name in (spec.split(",") if spec != "all" else MONITOR_EVENTS):
        if name.strip() not in MONITOR_EVENTS:
            raise CBFSFilterError(errno.EINVAL, f"unknown event {name!r}; choose from {', '.join(MONITOR_EVENTS)}")
        wanted |= MONITOR_EVENTS[name.strip()]
    return wanted


_clock: dict[str, tuple[int, str]] = {}


def _now(fmt: str) -> str:
    """time.strftime(fmt), formatted once a second."""
    second = int(time.time())
    hit = _clock.get(fmt)
    if hit is None or hit[0] != second:
        hit = (second, time.strftime(fmt, time.localtime(second)))
        _clock[fmt] = hit
    return hit[1]


_C_ESCAPES = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r",
              "\\": "\\\\"}


def escape_text(text: str) -> str:
    """``text`` safe to print as one line, as ``ls -b`` prints names: C escapes for control characters and the
    backslash, ``\\ooo`` (octal) for the bytes of a name that are not valid UTF-8 and for other unprintable
    characters (bidi overrides, line separators …), so that a file name or command line can neither start a
    forged line nor send terminal escapes."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch in _C_ESCAPES:
            out.append(_C_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif "\udc80" <= ch <= "\udcff":  # a byte os.fsdecode could not decode
            out.append(f"\\{ord(ch) - 0xDC00:03o}")
        else:
            out.extend(f"\\{b:03o}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def _printer(event: str, originator: Callable[[], tuple[str, int]], as_json: bool,
             lock: threading.Lock) -> Callable[[Any], None]:
    def show(p: Any) -> None:
        name, pid = originator()
        if as_json:
            record: dict[str, Any] = {"time": _now("%Y-%m-%dT%H:%M:%S"), "event": event, "pid": pid,
                                      "process": name}
            for field in type(p).__slots__:
                value = getattr(p, field)
                if field in ("result_code", "process_request") or value in (None, "", -1):
                    continue
                if isinstance(value, (int, str, bool)):
                    record["path" if field in ("file_name", "directory_name") and "path" not in record
                           else field] = value
            line = json.dumps(record)
        else:
            line = escape_text(f"{_now('%H:%M:%S')} {name or '?'}({pid}) {_describe(event, p)}")
        with lock:
            # Line by line to a terminal; to a file or a pipe, in blocks (the serving loops flush every 0.2 s):
            # a write(2) per event would cost the watched workload more than the event itself.
            write(line + "\n")
            if interactive:
                flush()
    interactive = sys.stdout.isatty()
    write, flush = sys.stdout.write, sys.stdout.flush
    return show


def run_monitor(args: argparse.Namespace) -> int:
    wanted = _wanted_events(args.events)
    lock = threading.Lock()
    if args.system:
        return _run_system_monitor(args, wanted, lock)
    if len(args.paths) != 1:
        raise CBFSFilterError(errno.EINVAL, "give one directory (or use --system for several paths and masks)")
    path = _directory(args.paths[0])
    filt = CBFilter()
    if args.own:
        filt.config("FilterOwnRequests=true")

    def originator() -> tuple[str, int]:
        # The short name, as fatrace prints it: the SDK's name is the program's full path.
        return os.path.basename(filt.get_originator_process_name()), filt.get_originator_process_id()

    for event in FILTER_PARAMS:
        if event.startswith("notify_") and event in NOTIFY_BITS and NOTIFY_BITS[event] & wanted:
            label = event[len("notify_"):].replace("_file", "").replace("_", "-")
            setattr(filt, "on_" + event, _printer(label, originator, args.json, lock))
    mask = path.rstrip("/") + "/" + args.mask if args.mask != "*" else path.rstrip("/") + "/*"
    filt.add_filter_rule(mask, c.ACCESS_NONE, c.FS_CE_NONE, wanted)
    if wanted & c.FS_NE_ENUMERATE_DIRECTORY:
        filt.add_filter_rule(path, c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_ENUMERATE_DIRECTORY)
    return _serve_cbfilter(filt, f"monitoring {path}")


def _run_system_monitor(args: argparse.Namespace, wanted: int, lock: threading.Lock) -> int:
    mon = CBMonitor()
    if args.own:
        mon.config("FilterOwnRequests=true")

    def originator() -> tuple[str, int]:
        return mon.get_originator_process_name(), mon.get_originator_process_id()

    for event in MONITOR_PARAMS:
        if event.startswith("notify_") and event in NOTIFY_BITS and NOTIFY_BITS[event] & wanted:
            label = event[len("notify_"):].replace("_file", "").replace("_", "-")
            setattr(mon, "on_" + event, _printer(label, originator, args.json, lock))
    mon.on_error = lambda p: print(f"fsfilter: error {p.error_code}: {p.description}", file=sys.stderr, flush=True)
    for target in args.paths:
        real = os.path.realpath(target) if target.startswith("/") or os.path.isdir(target) else target
        if os.path.isdir(real):
            mon.add_filter_rule(real.rstrip("/") + "/" + args.mask if args.mask != "*" else real.rstrip("/") + "/*",
                                wanted)
            if wanted & c.FS_NE_ENUMERATE_DIRECTORY:
                mon.add_filter_rule(real, c.FS_NE_ENUMERATE_DIRECTORY)
        else:
            mon.add_filter_rule(target, wanted)
    _serve(mon, f"monitoring {', '.join(args.paths)} with fanotify")
    lost = mon.lost_events
    print(f"fsfilter: stopped{f'; {lost} overflow(s): events were lost' if lost else ''}", file=sys.stderr)
    return 0


def run_hide(args: argparse.Namespace) -> int:
    path = _directory(args.path)
    filt = CBFilter()
    for pattern in args.patterns:
        if "/" in pattern:
            raise CBFSFilterError(errno.EINVAL, f"{pattern!r}: a pattern is a name mask, without '/'")
        filt.file_matches_mask(pattern, "x")  # validates it

    def hidden(name: str) -> bool:
        return any(filt.file_matches_mask(pattern, name) for pattern in args.patterns)

    def on_open(p: Any) -> None:
        if hidden(os.path.basename(p.file_name)):
            p.result_code = errno.ENOENT

    def on_list(p: Any) -> None:
        if hidden(p.file_name):
            p.process_request = False

    filt.on_before_open_file = on_open
    filt.on_before_create_file = on_open
    filt.on_after_enumerate_directory = on_list
    # Name masks, on the one attach point: what they match does not depend on where a directory is, so moving
    # directories below PATH stays possible and cannot uncover anything.
    filt.add_attach_point(path)
    for pattern in args.patterns:
        filt.add_filter_rule(pattern, c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN | c.FS_CE_BEFORE_CREATE, c.FS_NE_NONE)
    filt.add_filter_rule(path, c.ACCESS_NONE, c.FS_CE_AFTER_ENUMERATE_DIRECTORY, c.FS_NE_NONE)
    filt.add_filter_rule(path.rstrip("/") + "/*", c.ACCESS_NONE, c.FS_CE_AFTER_ENUMERATE_DIRECTORY, c.FS_NE_NONE)
    return _serve_cbfilter(filt, f"hiding {', '.join(args.patterns)} below {path}")


class Sandbox:
    """The handlers of ``fsfilter sandbox``: copy-on-write views of files for the processes of chosen programs."""

    def __init__(self, filt: CBFilter, path: str, store: str, programs: list[str]) -> None:
        self.filt, self.path, self.store, self.programs = filt, path, store, programs
        self._lock = threading.Lock()
        self.copies: dict[str, str] = {}  # original -> private copy

    def sandboxed(self) -> bool:
        """Whether the request's process runs a chosen program: its image path for a path mask, else the image's
        name or the process's own name (``sh`` is ``dash`` on Debian)."""
        image = self.filt.get_originator_process_name()
        names = (os.path.basename(image), procfs.comm(self.filt.get_originator_thread_id()))
        return any(self.filt.file_matches_mask(mask, image) if "/" in mask else
                   any(self.filt.file_matches_mask(mask, name) for name in names if name) for mask in self.programs)

    def copy_of(self, original: str, make: bool) -> str | None:
        """The private copy of ``original`` (made from it now when ``make``), or None."""
        rel = os.path.relpath(original, self.path)
        copy = os.path.join(self.store, rel)
        with self._lock:
            if os.path.exists(copy):
                return copy
            if not make:
                return None
            os.makedirs(os.path.dirname(copy), exist_ok=True)
            src = self.filt.create_file_direct(original, False, c.DESIRED_ACCESS_FILE_GENERIC_READ)
            try:
                mode = os.fstat(src).st_mode & 0o7777
                part = copy + ".fsfilter-part"
                dst = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
                try:
                    while os.copy_file_range(src, dst, 1 << 30):
                        pass
                finally:
                    os.close(dst)
                os.rename(part, copy)
            finally:
                os.close(src)
            self.copies[original] = copy
        print(f"sandbox: {os.path.basename(self.filt.get_originator_process_name())} "
              f"(pid {self.filt.get_originator_process_id()}) changes {original} in {copy}", flush=True)
        return copy

    def before_open(self, p: Any) -> None:
        if p.attributes & c.FILE_SYS_ATTR_DIRECTORY or not self.sandboxed():
            return
        writes = p.desired_access & (c.DESIRED_ACCESS_FILE_WRITE_DATA | c.DESIRED_ACCESS_FILE_APPEND_DATA) or \
            p.create_disposition == c.FILE_DISPOSITION_TRUNCATE_EXISTING
        if p.flags & os.O_PATH:
            return  # a name resolved, not a file opened
        copy = self.copy_of(p.file_name, bool(writes))
        if copy is not None:
            p.isolate = True
            p.backend_file_name = copy

    def refuse(self, p: Any) -> None:
        if self.sandboxed():
            p.result_code = errno.EACCES


def _password(file: str | None, env: str | None, prompt: str) -> str:
    """A password from a file's first line, an environment variable, or standard input (prompted without echo on a
    terminal). Never from the command line, where every user could read it in /proc."""
    if file is not None:
        try:
            with open(file) as f:
                value = f.readline().rstrip("\n")
        except OSError as exc:
            raise CBFSFilterError.from_os_error(exc, f"cannot read the password file {file}") from exc
    elif env is not None:
        value = os.environ.get(env, "")
        if not value:
            raise CBFSFilterError(errno.EINVAL, f"the environment variable {env} is not set or empty")
    elif sys.stdin.isatty():
        import getpass
        value = getpass.getpass(prompt)
    else:
        value = sys.stdin.readline().rstrip("\n")
    if not value:
        raise CBFSFilterError(errno.EINVAL, "the password is empty")
    return value


def run_encrypt(args: argparse.Namespace) -> int:
    from fsfilter.api.cbencrypt import CBEncrypt

    path = _directory(args.path)
    e = CBEncrypt()
    if args.global_salt is not None:
        e.global_salt = args.global_salt
    if args.allow_untrusted_writes:
        e.config("RefuseUntrustedWrites=false")
    for mask in args.trusted:
        e.add_trusted_process(mask, args.children)
    e.add_encrypt_rule(path.rstrip("/") + "/*", _password(args.password_file, args.password_env, "Password: "))
    stop = _stop_on_signals()
    e.on_error = lambda p: print(f"fsfilter: {p.description}", file=sys.stderr, flush=True)
    e.start_filter()
    try:
        print(f"fsfilter: encrypting below {path} for {', '.join(args.trusted)}; Ctrl-C to stop", file=sys.stderr,
              flush=True)
        while not stop.is_set() and e.active:
            stop.wait(0.2)
    finally:
        e.stop_filter()
    print("fsfilter: stopped and unmounted", file=sys.stderr)
    return 0


def run_file_encryption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fsfilter._crypto import fileformat as ff
    from fsfilter.api import encryption

    salt = bytes(16)
    if args.global_salt is not None:
        try:
            salt = bytes.fromhex(args.global_salt)
        except ValueError:
            salt = b""
        if len(salt) != 16:
            raise CBFSFilterError(errno.EINVAL, "--global-salt is 16 bytes: 32 hex digits")
    secret = ff.Secret.password(_password(args.password_file, args.password_env, "Password: "), salt)
    new_secret = None
    if args.command == "rekey":
        new_secret = ff.Secret.password(_password(args.new_password_file, args.new_password_env, "New password: "),
                                        salt)
    elif args.command == "encrypt-file" and args.password_file is None and args.password_env is None \
            and sys.stdin.isatty() and _password(None, None, "Again: ") != secret.value.decode():
        raise CBFSFilterError(errno.EINVAL, "the two passwords differ")
    if args.command == "encrypt-file":
        shift = args.chunk_size.bit_length() - 1
        if args.chunk_size != 1 << shift or not 12 <= shift <= 20:
            raise CBFSFilterError(errno.EINVAL, f"--chunk-size {args.chunk_size} is not a power of two from 4096 "
                                                "to 1048576")
    files = [os.path.abspath(f) for f in args.files]
    total = 0
    for path in files:
        try:
            total += os.stat(path).st_size
        except OSError as exc:
            raise CBFSFilterError.from_os_error(exc, f"cannot read {path}") from exc
    done, failed, start = 0, 0, time.monotonic()
    with tqdm(total=total, unit="B", unit_scale=True, disable=args.quiet or args.command == "rekey",
              file=sys.stderr, leave=False) as bar:
        def progress(count: int) -> None:
            bar.update(count)
        for path in files:
            try:
                if args.command == "encrypt-file":
                    algorithm = ff.AES_256_GCM if args.algorithm == "aes-256-gcm" else ff.CHACHA20_POLY1305
                    encryption.encrypt_file(path, [secret], algorithm, shift, progress)
                elif args.command == "decrypt-file":
                    encryption.decrypt_file(path, [secret], progress)
                else:
                    assert new_secret is not None
                    encryption.change_password(path, [secret], new_secret)
                done += 1
            except CBFSFilterError as exc:
                failed += 1
                bar.write(f"fsfilter: error: {exc.message}", file=sys.stderr)
    verb = {"encrypt-file": "encrypted", "decrypt-file": "decrypted", "rekey": "re-keyed"}[args.command]
    print(f"fsfilter: {verb} {done} file{'s' if done != 1 else ''} ({total / (1 << 20):.1f} MiB) in "
          f"{time.monotonic() - start:.1f} s" + (f"; {failed} failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def run_sandbox(args: argparse.Namespace) -> int:
    path = _directory(args.path)
    store = os.path.realpath(args.store) if args.store else None
    if store is not None and (store == path or store.startswith(path.rstrip("/") + "/")):
        raise CBFSFilterError(errno.EINVAL, f"the store {store} is inside {path}: choose a directory outside it")
    filt = CBFilter()
    for mask in args.program:
        filt.file_matches_mask(mask, "x")  # validates it
    if store is None:
        import tempfile
        store = tempfile.mkdtemp(prefix="fsfilter-sandbox-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    os.makedirs(store, exist_ok=True)
    sandbox = Sandbox(filt, path, store, args.program)
    filt.on_before_open_file = sandbox.before_open
    filt.on_before_create_file = filt.on_before_delete_file = filt.on_before_rename_or_move_file = sandbox.refuse
    every = path.rstrip("/") + "/*"
    filt.add_filter_rule(every, c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN | c.FS_CE_BEFORE_CREATE | c.FS_CE_BEFORE_DELETE
                         | c.FS_CE_BEFORE_RENAME, c.FS_NE_NONE)
    code = _serve_cbfilter(filt, f"sandboxing {', '.join(args.program)} below {path}; private copies in {store}")
    print(f"fsfilter: {len(sandbox.copies)} private cop{'y' if len(sandbox.copies) == 1 else 'ies'} in {store}",
          file=sys.stderr)
    return code


def run_protect(args: argparse.Namespace) -> int:
    path = _directory(args.path)
    access = 0
    chosen = []
    for flag, bit in PROTECT_FLAGS.items():
        if getattr(args, flag[2:].replace("-", "_")):
            access |= bit
            chosen.append(flag[2:])
    if not access:
        raise CBFSFilterError(errno.EINVAL, "choose at least one protection, e.g. --read-only or --no-delete")
    filt = CBFilter()
    if args.fanotify:
        allowed = c.ACCESS_DENY_ALL | c.ACCESS_READ_ONLY | c.ACCESS_EXECUTE_PROTECT
        if access & ~allowed:
            raise CBFSFilterError(errno.EINVAL, "--fanotify enforces only --deny-all, --read-only and --no-exec")
        filt.config("AccessViaFanotify=true")
    filt.add_filter_rule(path.rstrip("/") + "/*", access, c.FS_CE_NONE, c.FS_NE_NONE)
    how = " with fanotify" if args.fanotify else ""
    return _serve_cbfilter(filt, f"protecting {path} ({', '.join(chosen)}){how}")


def run_procmon(args: argparse.Namespace) -> int:
    proc = CBProcess()
    lock = threading.Lock()
    interactive = sys.stdout.isatty()

    def printer(event: str) -> Callable[[Any], None]:
        def show(e: Any) -> None:
            fields = {k: getattr(e, k) for k in type(e).__slots__ if k != "result_code"}
            if args.json:
                line = json.dumps({"time": _now("%Y-%m-%dT%H:%M:%S"), "event": event, **fields})
            elif event == "process-start":
                line = (f"{_now('%H:%M:%S')} start  {fields['process_id']:>7} parent {fields['parent_process_id']:>7} "
                        f"{fields['image_file_name'] or '?'}  {fields['command_line']}")
            elif event == "process-exit":
                line = (f"{_now('%H:%M:%S')} exit   {fields['process_id']:>7} {fields['process_name']} "
                        f"status {fields['exit_status']}")
            else:
                line = f"{_now('%H:%M:%S')} {event} {fields['process_id']:>7} thread {fields['thread_id']}"
            if not args.json:
                line = escape_text(line)
            with lock:
                sys.stdout.write(line + "\n")
                if interactive:
                    sys.stdout.flush()
        return show

    proc.on_process_creation = printer("process-start")
    proc.on_process_termination = printer("process-exit")
    if args.threads:
        proc.on_thread_creation = printer("thread-start")
        proc.on_thread_termination = printer("thread-exit")
    proc.on_error = lambda e: print(f"fsfilter: error {e.error_code}: {e.description}", file=sys.stderr, flush=True)
    return _serve_process_filter(proc, "watching processes")


def run_deny_exec(args: argparse.Namespace) -> int:
    proc = CBProcess()
    paths: list[str] = []
    for mask in args.masks:
        try:
            file_matches_mask(mask, "x")
        except MaskError as exc:
            raise CBFSFilterError(errno.EINVAL, f"bad mask {mask!r}: {exc}") from exc
        if "/" in mask:  # the file system the mask's fixed part lies on
            head = mask[:min((i for i in (mask.find("*"), mask.find("?")) if i >= 0), default=len(mask))]
            while head != "/" and not os.path.isdir(head):
                head = os.path.dirname(head.rstrip("/")) or "/"
            paths.append(head)
        else:
            paths.append("/")  # a name can be anywhere: every local file system

    def creation(e: Any) -> None:
        for mask in args.masks:
            target = e.image_file_name if "/" in mask else os.path.basename(e.image_file_name)
            if file_matches_mask(mask, target):
                e.result_code = errno.EPERM
                print(escape_text(f"{_now('%H:%M:%S')} refused {e.image_file_name} (pid {e.process_id}): "
                                  f"{e.command_line}"), flush=True)
                return

    proc.on_process_creation = creation
    proc.config("ExecPermissionPaths=" + ",".join(sorted({os.path.realpath(p) for p in paths})))
    return _serve_process_filter(proc, f"refusing {', '.join(args.masks)}")


def _serve_process_filter(proc: CBProcess, what: str) -> int:
    _serve(proc, what)
    print("fsfilter: stopped", file=sys.stderr)
    return 0


def _serve_cbfilter(filt: CBFilter, what: str) -> int:
    lost: list[str] = []

    def on_error(p: Any) -> None:
        if p.error_code == errno.ENOTCONN:  # the mount was lost: said once, as the exit message
            lost.append(p.description)
        else:
            print(f"fsfilter: error {p.error_code}: {p.description}", file=sys.stderr, flush=True)

    filt.on_error = on_error
    if not _serve(filt, what):
        # The mount went away under it: what it enforced no longer holds, which is a failure, not a stop.
        print(f"fsfilter: error: {lost[-1] if lost else 'the filter stopped on its own'}", file=sys.stderr)
        return 1
    print("fsfilter: stopped and unmounted", file=sys.stderr)
    return 0


def _serve(target: CBFilter | CBMonitor | CBProcess, what: str) -> bool:
    """Run a filter until SIGINT/SIGTERM/SIGHUP, flushing what its handlers printed every 0.2 s. False when
    the filter stopped on its own first (its mount was lost)."""
    stop = _stop_on_signals()
    _say_who_is_inside(target)
    target.start_filter()
    try:
        print(f"fsfilter: {what}; Ctrl-C to stop", file=sys.stderr, flush=True)
        marks = getattr(target, "permission_marks", [])
        if marks:  # a name-only mask marks every local file system: say which, every open there waits for us
            print(f"fsfilter: permission marks on the file systems of: {', '.join(marks)}", file=sys.stderr,
                  flush=True)
        while not stop.is_set():
            stop.wait(0.2)
            sys.stdout.flush()
            if not target.active:
                return False
        return True
    finally:
        target.stop_filter()
        sys.stdout.flush()
        report = getattr(target, "stop_report", "")
        if report:  # programs were still inside: say where they are served now
            print(f"fsfilter: {report}", file=sys.stderr, flush=True)


def _say_who_is_inside(target: CBFilter | CBMonitor | CBProcess) -> None:
    """Before mounting: processes already inside the directories keep reaching them past the filter (their cwd
    and open files are below the mount, not through it). Say so, rather than let them look filtered."""
    if not isinstance(target, CBFilter):
        return
    try:
        points = [target.get_attach_point(i) for i in range(target.attach_point_count)]
    except CBFSFilterError:
        return
    for point in points:
        users = procfs.users_of(point, skip=os.getpid())
        if users:
            listed = ", ".join(f"{pid} {name} ({what})" for pid, name, what in users[:10])
            more = f" and {len(users) - 10} more" if len(users) > 10 else ""
            print(f"fsfilter: note: {len(users)} process(es) already inside {point} are not filtered until they "
                  f"leave it: {listed}{more}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="fsfilter: %(levelname)s: %(message)s")
    try:
        if args.command == "passthrough":
            return run_passthrough(args)
        if args.command == "monitor":
            return run_monitor(args)
        if args.command == "hide":
            return run_hide(args)
        if args.command == "protect":
            return run_protect(args)
        if args.command == "sandbox":
            return run_sandbox(args)
        if args.command in ("encrypt-file", "decrypt-file", "rekey"):
            return run_file_encryption(args)
        if args.command == "encrypt":
            return run_encrypt(args)
        if args.command == "procmon":
            return run_procmon(args)
        if args.command == "deny-exec":
            return run_deny_exec(args)
        if args.command == "status":
            return run_status(args)
        if args.command == "rules":
            return run_rules(args)
        if args.command == "demo":
            from fsfilter.demo import run_demo
            return run_demo(quiet=args.quiet)
    except CBFSFilterError as exc:
        print(f"fsfilter: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
