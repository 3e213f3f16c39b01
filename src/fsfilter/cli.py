"""The ``fsfilter`` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import types
from collections.abc import Callable

from fsfilter.api.passthrough import PassthroughFilter
from fsfilter.errors import CBFSFilterError


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
    p.add_argument("--stats", action="store_true", help="print request counts when stopping")

    d = sub.add_parser("demo", help="a short live demonstration on a temporary directory")
    d.add_argument("--quiet", action="store_true", help="print only the summary")
    return parser


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
                             spin=args.spin)
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
    print("fsfilter: unmounted", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="fsfilter: %(levelname)s: %(message)s")
    try:
        if args.command == "passthrough":
            return run_passthrough(args)
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
