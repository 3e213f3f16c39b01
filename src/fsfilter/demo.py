"""``fsfilter demo``: a short live demonstration on a temporary directory.

It starts a CBFilter on a temporary directory with three rules — every notification event on every
file, a read-only access rule on one file, and a handler that hides another — then lets ordinary
programs work there, prints the events as they stream in, and stops the filter, which unmounts.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from fsfilter._system import procfs
from fsfilter.api import constants as c
from fsfilter.api.cbfilter import NOTIFY_BITS, CBFilter
from fsfilter.errors import CBFSFilterError

__all__ = ["run_demo"]

PROTECTED = "protected.txt"
HIDDEN = "hidden.txt"


def run_demo(quiet: bool = False) -> int:
    if os.geteuid() != 0:
        raise CBFSFilterError(errno.EPERM, "the demo mounts with mount(2): run it as root (sudo fsfilter demo)")
    base = tempfile.mkdtemp(prefix="fsfilter-demo-")
    say = (lambda *a: None) if quiet else print
    lines: list[str] = []
    lines_lock = threading.Lock()
    filt = CBFilter()
    try:
        with open(os.path.join(base, PROTECTED), "w") as f:
            f.write("this file may be read but not changed\n")
        with open(os.path.join(base, HIDDEN), "w") as f:
            f.write("nobody sees this\n")
        with open(os.path.join(base, "notes.txt"), "w") as f:
            f.write("hello from the lower directory\n")
        print(f"== fsfilter demo on {base}")
        print("   files before the filter starts:", ", ".join(sorted(os.listdir(base))))

        def show(event: str) -> Callable[[Any], None]:
            def handler(p: Any) -> None:
                name = p.file_name if event != "enumerate" else f"{p.directory_name}/{p.file_name}"
                extra = ""
                for field in ("new_file_name", "bytes_read", "bytes_written", "size"):
                    if field in type(p).__slots__ and getattr(p, field) not in (None, ""):
                        extra = f" {field}={getattr(p, field)}"
                        break
                if getattr(p, "status", 0):
                    extra += f" error={errno.errorcode.get(p.status, p.status)}"
                who = f"{os.path.basename(filt.get_originator_process_name())}({filt.get_originator_process_id()})"
                with lines_lock:
                    lines.append(f"   {event:<10} {os.path.relpath(name, base):<16} {who}{extra}")
            return handler

        for event in NOTIFY_BITS:
            short = event[len("notify_"):].replace("_file", "").replace("_directory", "").replace("_or_move", "")
            setattr(filt, "on_" + event, show(short))

        def hide_open(p: Any) -> None:
            if os.path.basename(p.file_name) == HIDDEN:
                p.result_code = errno.ENOENT

        def hide_listing(p: Any) -> None:
            if p.file_name == HIDDEN:
                p.process_request = False

        filt.on_before_open_file = hide_open
        filt.on_after_enumerate_directory = hide_listing
        filt.add_filter_rule(f"{base}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_ALL & ~c.FS_NE_GET_SIZES)
        filt.add_filter_rule(base, c.ACCESS_NONE, c.FS_CE_AFTER_ENUMERATE_DIRECTORY, c.FS_NE_NONE)
        filt.add_filter_rule(f"{base}/{PROTECTED}", c.ACCESS_READ_ONLY, c.FS_CE_NONE, c.FS_NE_NONE)
        filt.add_filter_rule(f"{base}/{HIDDEN}", c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN, c.FS_NE_NONE)
        filt.start_filter(5000)
        print(f"== CBFilter started on {base} (mounted over the directory itself); "
              "events as applications cause them:")

        def step(title: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
            with lines_lock:
                lines.clear()
            result = subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=30)
            deadline = time.monotonic() + 2
            while filt.dispatcher.queued_notifications and time.monotonic() < deadline:
                time.sleep(0.01)
            print(f"-- {title}: $ {' '.join(argv)}")
            for out in (result.stdout.strip(), result.stderr.strip()):
                if out:
                    print("   | " + out.replace("\n", "\n   | "))
            with lines_lock:
                for line in lines[:12]:
                    say(line)
                if len(lines) > 12:
                    say(f"   ... and {len(lines) - 12} more events")
            return result

        step("list the directory", ["ls", "-l", base])
        step("read a file", ["cat", os.path.join(base, "notes.txt")])
        step("append to a file", ["sh", "-c", f"echo appended >> {base}/notes.txt && tail -n 1 {base}/notes.txt"])
        denied = step("write to the protected file", ["sh", "-c", f"echo changed > {base}/{PROTECTED}"])
        print(f"   => write denied: exit status {denied.returncode}, file still says: "
              f"{open(os.path.join(base, PROTECTED)).read().strip()!r}")
        hidden = step("open the hidden file by name", ["cat", os.path.join(base, HIDDEN)])
        print(f"   => hidden: exit status {hidden.returncode}")
        step("make, move and remove a directory",
             ["sh", "-c", f"mkdir {base}/d && mv {base}/d {base}/e && rmdir {base}/e"])
        stats = filt.stats
        filt.stop_filter()
        still = any(m.mountpoint == base for m in procfs.mountinfo())
        print(f"== {stats['notifications_delivered']} notifications delivered, "
              f"{stats['notifications_posted'] - stats['notifications_delivered']} lost")
        print(f"== unmounted cleanly: {not still}; files after: {', '.join(sorted(os.listdir(base)))}")
        return 0 if not still and denied.returncode != 0 and hidden.returncode != 0 else 1
    finally:
        filt.stop_filter()
        shutil.rmtree(base, ignore_errors=True)
        sys.stdout.flush()
