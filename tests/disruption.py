"""Workers for the zero-disruption tests: programs that use a directory while its filter stops, crashes or is handed
over, each timing every call and counting errors. Run as ``python disruption.py ROLE DIR SECONDS OUT.json``; the
worker is ready once OUT.json.ready exists, works until OUT.json.stop exists (or SECONDS pass), then writes its
figures to OUT.json.

Roles: ``writer`` appends fsync'ed numbered records to DIR/log-<pid>.txt and counts those acknowledged; ``reader``
opens, reads and closes DIR/data.txt by path; ``lister`` lists DIR; ``cwd`` has its working directory in DIR and
lists ".", stats and reads a file by a relative name. Each keeps the worst latency of one round.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    role, directory, seconds, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    errors: list[str] = []
    worst = 0.0
    rounds = acknowledged = 0
    log = None
    if role == "writer":
        log = open(os.path.join(directory, f"log-{os.getpid()}.txt"), "a")  # opened once, kept open
    if role == "cwd":
        os.chdir(directory)
    open(out + ".ready", "w").close()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not os.path.exists(out + ".stop"):
        t0 = time.monotonic()
        try:
            if role == "writer":
                assert log is not None
                log.write(f"record {acknowledged}\n")
                log.flush()
                os.fsync(log.fileno())
                acknowledged += 1
            elif role == "reader":
                with open(os.path.join(directory, "data.txt")) as f:
                    if f.read() != "data\n":
                        errors.append("reader: wrong content")
            elif role == "lister":
                if "data.txt" not in os.listdir(directory):
                    errors.append("lister: data.txt missing from the listing")
            elif role == "cwd":
                if "data.txt" not in os.listdir("."):
                    errors.append("cwd: data.txt missing from the listing of .")
                os.stat("data.txt")
                with open("data.txt") as f:
                    f.read()
        except OSError as exc:
            errors.append(f"{role}: {exc}")
        worst = max(worst, time.monotonic() - t0)
        rounds += 1
        time.sleep(0.002)
    if log is not None:
        try:
            log.close()
        except OSError as exc:
            errors.append(f"writer close: {exc}")
    with open(out, "w") as f:
        json.dump({"role": role, "errors": errors[:20], "error_count": len(errors), "worst": worst,
                   "rounds": rounds, "acknowledged": acknowledged, "pid": os.getpid()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
