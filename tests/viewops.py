"""A worker for the isolation tests: random operations on one file, each checked against a model of what this
process must see of it (its own view, or the bytes on disk), through read, write, mmap (shared and private),
truncate, stat, a listing, and closing and reopening.

Run as ``python viewops.py PATH SEED STEPS`` after a line on stdin (the test registers the process first); the
initial contents of the model are read from the file at the start. Prints one JSON line: {"ok", "steps",
"message", "model_sha1", "counts"}.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import sys

MAX = 96 * 1024


def main(path: str, seed: int, steps: int) -> dict[str, object]:
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDWR)
    model = bytearray(os.pread(fd, 1 << 20, 0))
    counts: dict[str, int] = {}
    directory, name = os.path.split(path)

    def fail(step: int, what: str, got: object, want: object) -> dict[str, object]:
        return {"ok": False, "steps": step, "message": f"step {step} {what}: got {got!r:.200} want {want!r:.200}",
                "model_sha1": hashlib.sha1(model).hexdigest(), "counts": counts}

    for step in range(steps):
        kind = rng.choices(["pwrite", "pread", "truncate", "fstat", "stat", "listing", "mmap_read", "mmap_write",
                            "private", "reopen", "append"], [10, 12, 3, 4, 3, 2, 3, 3, 2, 2, 3])[0]
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "pwrite":
            offset = rng.randrange(0, MAX)
            data = rng.randbytes(rng.randrange(1, 9000))
            assert os.pwrite(fd, data, offset) == len(data)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset:offset + len(data)] = data
        elif kind == "append":
            data = rng.randbytes(rng.randrange(1, 3000))
            os.pwrite(fd, data, len(model))
            model.extend(data)
        elif kind == "pread":
            offset = rng.randrange(0, MAX + 4096)
            size = rng.randrange(1, 70000)
            got = os.pread(fd, size, offset)
            if got != bytes(model[offset:offset + size]):
                return fail(step, f"pread({size}, {offset})", hashlib.sha1(got).hexdigest()[:12] + f"/{len(got)}",
                            hashlib.sha1(model[offset:offset + size]).hexdigest()[:12]
                            + f"/{len(model[offset:offset + size])}")
        elif kind == "truncate":
            size = rng.randrange(0, MAX)
            os.ftruncate(fd, size)
            del model[size:]
            model.extend(bytes(size - len(model)))
        elif kind == "fstat":
            if os.fstat(fd).st_size != len(model):
                return fail(step, "fstat size", os.fstat(fd).st_size, len(model))
        elif kind == "stat":
            if os.stat(path).st_size != len(model):
                return fail(step, "stat size", os.stat(path).st_size, len(model))
        elif kind == "listing":
            sizes = {e.name: e.stat(follow_symlinks=False).st_size for e in os.scandir(directory)}
            if sizes.get(name) != len(model):
                return fail(step, "listing size", sizes.get(name), len(model))
        elif kind in ("mmap_read", "mmap_write", "private") and model:
            length = len(model)
            flags = mmap.MAP_PRIVATE if kind == "private" else mmap.MAP_SHARED
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if kind != "mmap_read" else 0)
            with mmap.mmap(fd, length, flags=flags, prot=prot) as m:
                if m[:] != bytes(model):
                    return fail(step, f"{kind} contents", hashlib.sha1(m[:]).hexdigest(),
                                hashlib.sha1(model).hexdigest())
                if kind != "mmap_read":
                    offset = rng.randrange(0, length)
                    data = rng.randbytes(min(length - offset, rng.randrange(1, 5000)))
                    m[offset:offset + len(data)] = data
                    if kind == "mmap_write":
                        m.flush()
                        model[offset:offset + len(data)] = data
        elif kind == "reopen":
            os.close(fd)
            fd = os.open(path, os.O_RDWR)
    os.close(fd)
    final = open(path, "rb").read()
    if final != bytes(model):
        return fail(steps, "contents after close and reopen", hashlib.sha1(final).hexdigest(),
                    hashlib.sha1(model).hexdigest())
    return {"ok": True, "steps": steps, "message": "", "model_sha1": hashlib.sha1(model).hexdigest(),
            "counts": counts}


if __name__ == "__main__":
    sys.stdin.readline()
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))), flush=True)
