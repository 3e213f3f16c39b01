"""Differential tests: random sequences of file operations on a native tmpfs directory and on the same
kind of directory seen through the filter must give the same results, step by step, and leave the same
trees behind.

Each test uses a fixed seed (``DIFF_SEED`` overrides it, ``DIFF_STEPS`` the number of operations,
``DIFF_VERBOSE=1`` with ``-s`` prints every step); a failure prints the seed, the failing step, the
operations that led to it and the command that replays it. The operations are in ``diffops.py``, which is
also the worker script: every sequence runs in a process of its own, apart from the daemon's.

Differences that are right for each side and so are not compared: atime (relatime moves it natively,
the filter's cached attributes do not follow), the times of fifos (their data never reaches the filter),
st_ino, st_dev and st_blocks. See diffops.py for the few operations shaped to avoid tmpfs-only quirks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffops
import pytest
from conftest import SRC, force_unmount, needs_root

from fsfilter import PassthroughFilter
from fsfilter._abi import fuse as abi

pytestmark = [needs_root]
Factory = Callable[..., PassthroughFilter]
TESTS = Path(__file__).resolve().parent
NOBODY = 65534


def in_policy_name(path: bytes) -> bool:
    return diffops.POLICY_LETTER in path.rsplit(b"/", 1)[-1]


VARIANTS: dict[str, dict[str, object]] = {
    "passthrough": {},
    "daemon-io": {"passthrough": False},
    "mixed": {"io_policy": in_policy_name},
    "uncached": {"entry_timeout": 0, "attr_timeout": 0, "negative_timeout": 0, "io_policy": in_policy_name},
    "locks": {"locks": True, "io_policy": in_policy_name},  # the daemon serves fcntl and flock locks
}
STEPS = 2500  # per sequence: about 2 s each on this machine


def seed_for(default: int) -> int:
    return int(os.environ.get("DIFF_SEED", default))


def steps(default: int) -> int:
    return int(os.environ.get("DIFF_STEPS", default))


def trees(scratch: Path, profile: str = "root", sub: str = "") -> tuple[Path, Path, Path]:
    """native, lower and mount point, with the same starting content in native and lower (in ``sub``)."""
    native, lower, mnt = scratch / "native", scratch / "lower", scratch / "mnt"
    for d in (native, lower, mnt):
        d.mkdir()
    if profile != "none":
        for root in (native, lower):
            top = root / sub if sub else root
            top.mkdir(exist_ok=True)
            diffops.build_tree(str(top), profile)
    return native, lower, mnt


def assert_same_trees(native: Path, mnt: Path, lower: Path) -> None:
    want = diffops.snapshot(str(native))
    for name, root in (("mount", mnt), ("lower", lower)):
        problem = diffops.diff_snapshots(("native", name), want, diffops.snapshot(str(root)))
        assert problem is None, problem


def run_workers(configs: list[dict[str, object]], timeout: float = 120) -> list[dict[str, object]]:
    """Start every worker at once, then collect each one's JSON verdict."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]), "PYTHONDONTWRITEBYTECODE": "1"}
    verbose = bool(os.environ.get("DIFF_VERBOSE"))
    procs = [subprocess.Popen([sys.executable, str(TESTS / "diffops.py"), json.dumps({**cfg, "verbose": verbose})],
                              env=env, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE, text=True)
             for cfg in configs]
    results = []
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{(err or '')[-3000:]}"
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return results


# -- one process, every kind of operation


def sequence(native: Path, mnt: Path, seed: int, count: int, label: str, replay: str, **extra: object
             ) -> dict[str, object]:
    return {"mode": "seq", "seed": seed, "steps": count, "label": label, "native": str(native),
            "filtered": str(mnt), "replay": f"{replay} pytest tests/test_differential.py", **extra}


def assert_exercised(counts: dict[str, int], ops: tuple[str, ...]) -> None:
    """Each of these operations succeeded at least once: the harness compared more than errors."""
    missing = [op for op in ops if not counts.get(op + " ok")]
    assert not missing, f"never succeeded: {missing} ({counts})"


EVERY_OP = ("open", "read", "pread", "write", "pwrite", "lseek", "ftruncate", "fsync", "fstat", "fallocate",
            "copy", "mmap", "stat", "truncate", "chmod", "chown", "utime", "mkdir", "rmdir", "unlink", "rename",
            "renameat2", "link", "symlink", "readlink", "listdir", "mknod", "setxattr", "getxattr", "listxattr",
            "removexattr", "xattr_sized", "sendfile", "flock", "lockf", "setacl", "statfs")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_random_operations_match_native(scratch: Path, filter_factory: Factory, variant: str) -> None:
    native, lower, mnt = trees(scratch)
    filt = filter_factory(lower, mnt, **VARIANTS[variant])
    assert filt.passthrough_active == (variant != "daemon-io")
    seed = seed_for(1000 + list(VARIANTS).index(variant))
    replay = f"DIFF_SEED={seed} DIFF_STEPS={steps(STEPS)} -k 'random_operations and {variant}'"
    (result,) = run_workers([sequence(native, mnt, seed, steps(STEPS), variant, replay)])
    assert result["ok"], result["message"]
    assert_exercised(result["counts"], EVERY_OP)  # type: ignore[arg-type]
    assert_same_trees(native, mnt, lower)
    # The variant served I/O the way it claims to.
    assert filt.stats is not None
    served = filt.stats.requests[abi.Opcode.WRITE] + filt.stats.requests[abi.Opcode.READ]
    if variant in ("daemon-io", "mixed"):
        assert served > 0
    locks_served = filt.stats.requests[abi.Opcode.SETLK]
    assert (locks_served > 0) == (variant == "locks"), filt.stats.by_opcode()


# -- several processes at once


@pytest.mark.timeout(150)
@pytest.mark.parametrize("variant", ["passthrough", "mixed", "locks"])
def test_concurrent_processes_match_native(scratch: Path, filter_factory: Factory, variant: str) -> None:
    native, lower, mnt = trees(scratch, "none")
    workers = 4
    for root in (native, lower):
        for i in range(workers):
            (root / f"w{i}").mkdir()
            diffops.build_tree(str(root / f"w{i}"))
    filter_factory(lower, mnt, workers=2, **VARIANTS[variant])
    base = seed_for(2000 + 10 * ["passthrough", "mixed", "locks"].index(variant))
    configs: list[dict[str, object]] = [
        sequence(native / f"w{i}", mnt / f"w{i}", base + i, steps(STEPS), f"{variant}-w{i}",
                 f"DIFF_SEED={base} DIFF_STEPS={steps(STEPS)} -k 'concurrent and {variant}'  or alone: "
                 f"DIFF_SEED={base + i} DIFF_STEPS={steps(STEPS)} -k 'random_operations and {variant}'")
        for i in range(workers)]
    for i, result in enumerate(run_workers(configs)):
        assert result["ok"], f"worker {i}:\n{result['message']}"
        assert_exercised(result["counts"], ("open", "pwrite", "rename", "mkdir", "setxattr"))  # type: ignore[arg-type]
    assert_same_trees(native, mnt, lower)

    # One file written in disjoint regions and one appended to by every worker at once (in the mixed
    # variant, with names the policy sends to the daemon).
    shared, log = ("shared", "log") if variant == "passthrough" else ("qshared", "qlog")
    region, record = 96 * 1024 + 123, 64
    for root in (native, mnt):
        (root / shared).write_bytes(b"")
        (root / log).write_bytes(b"")
    configs = [{"mode": "shared", "seed": base + 100 + i, "index": i, "region": region, "chunks": 40,
                "record": record, "pwrite": [str(native / shared), str(mnt / shared)],
                "append": [str(native / log), str(mnt / log)]} for i in range(workers)]
    results = run_workers(configs)
    for i, result in enumerate(results):
        assert result["ok"], f"shared worker {i}: {result['message']}"
    expect = b"".join(diffops.data(base + 100 + i, region) for i in range(workers))
    for root in (native, mnt, lower):
        assert (root / shared).read_bytes() == expect, root
    logs = {}
    for root in (native, mnt, lower):
        body = (root / log).read_bytes()
        assert len(body) % record == 0, root
        recs = [body[i:i + record] for i in range(0, len(body), record)]
        assert all(r.startswith(b"<") and r.endswith(b">") for r in recs), f"{root}: torn append"
        logs[root] = sorted(recs)
    assert logs[native] == logs[mnt] == logs[lower]
    assert len(logs[native]) == sum(int(str(r["pieces"])) for r in results)


# -- an unprivileged caller


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", ["passthrough", "daemon-io"])
def test_unprivileged_caller_matches_native(scratch: Path, filter_factory: Factory, variant: str) -> None:
    native, lower, mnt = trees(scratch, "nobody", "u")
    filter_factory(lower, mnt, **VARIANTS[variant])
    seed = seed_for(3000 + ["passthrough", "daemon-io"].index(variant))
    replay = f"DIFF_SEED={seed} DIFF_STEPS={steps(STEPS)} -k 'unprivileged and {variant}'"
    (result,) = run_workers([sequence(native / "u", mnt / "u", seed, steps(STEPS), f"nobody-{variant}", replay,
                                      drop=NOBODY)])
    assert result["ok"], result["message"]
    assert_exercised(result["counts"], ("open", "pwrite", "chmod", "chown", "utime", "setxattr",  # type: ignore[arg-type]
                                        "mkdir", "unlink", "rename"))
    assert_same_trees(native, mnt, lower)
    owners = {v[0][4:6] for v in diffops.snapshot(str(mnt / "u")).values()}
    assert (NOBODY, NOBODY) in owners


def run_in_place(stop: Callable[[], None], native: Path, lower: Path, seed: int, label: str, replay: str,
                 **extra: object) -> dict[str, object]:
    """One worker's sequence on ``lower``, which a filter serves in place; the filter is stopped (``stop``) and its
    mount gone afterwards, whatever happened."""
    try:
        (result,) = run_workers([sequence(native, lower, seed, steps(STEPS), label, replay, tmpfile=False, **extra)])
    finally:
        stop()
        force_unmount(lower)
    return result


# -- CBFilter with rules that fire every event on every file


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", ["notify-all", "control-all"])
def test_random_operations_match_native_with_every_event(scratch: Path, kind: str) -> None:
    """Events must not change what applications get: with a rule firing every notification (or every
    control event, with handlers that change nothing) on every file, the differential still holds, and
    every notification posted is delivered."""
    from fsfilter import CBFilter
    from fsfilter.api import constants as c
    from fsfilter.api.cbfilter import EVENT_BITS, NOTIFY_BITS

    native, lower, _ = trees(scratch)
    filt = CBFilter()
    counts: dict[str, int] = {}

    def count(event: str) -> Callable[[object], None]:
        def handler(params: object) -> None:
            counts[event] = counts.get(event, 0) + 1
        return handler

    events = NOTIFY_BITS if kind == "notify-all" else EVENT_BITS
    for event in events:
        setattr(filt, "on_" + event, count(event))
    if kind == "notify-all":
        filt.add_filter_rule(f"{lower}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_ALL)
        filt.add_filter_rule(str(lower), c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_ALL)
    else:
        filt.process_cached_io_requests = True
        # Where a handler may hide names, directories report link count 1 (hidden subdirectories would show in
        # it); these handlers hide nothing, and the comparison with native wants the real counts.
        filt.config("HideDirectoryLinkCounts=false")
        filt.add_filter_rule(f"{lower}/*", c.ACCESS_NONE, c.FS_CE_ALL, c.FS_NE_NONE)
        filt.add_filter_rule(str(lower), c.ACCESS_NONE, c.FS_CE_ALL, c.FS_NE_NONE)
    seed = seed_for(4000 + ["notify-all", "control-all"].index(kind))
    replay = f"DIFF_SEED={seed} DIFF_STEPS={steps(STEPS)} -k 'every_event and {kind}'"
    # O_TMPFILE is refused where rules apply (EOPNOTSUPP; test_cbfilter checks it): not drawn here.
    filt.start_filter(0)
    result = run_in_place(filt.stop_filter, native, lower, seed, kind, replay)
    assert result["ok"], result["message"]
    assert_exercised(result["counts"], EVERY_OP)  # type: ignore[arg-type]
    assert_same_trees(native, lower, lower)
    stats = filt.stats
    assert stats["failed"] == 0 and stats["expired"] == 0
    if kind == "notify-all":
        assert stats["notifications_posted"] == stats["notifications_delivered"] > 0
        for event in ("notify_open_file", "notify_write_file", "notify_read_file", "notify_rename_or_move_file",
                      "notify_delete_file", "notify_create_file", "notify_set_file_security", "notify_set_ea"):
            assert counts.get(event), f"{event} never fired ({counts})"
    else:
        for event in ("before_open_file", "after_write_file", "before_read_file", "before_rename_or_move_file",
                      "before_delete_file", "before_create_file", "after_enumerate_directory"):
            assert counts.get(event), f"{event} never fired ({counts})"


def test_events_leave_the_filtering_process_umask_alone(scratch: Path) -> None:
    """Creates served on pool threads (because a rule routes them there) set the caller's umask on their
    own thread only."""
    from fsfilter import CBFilter
    from fsfilter.api import constants as c

    d = scratch / "u"
    d.mkdir()
    filt = CBFilter()
    filt.on_before_create_file = lambda p: None
    filt.add_filter_rule(f"{d}/*", c.ACCESS_NONE, c.FS_CE_BEFORE_CREATE, c.FS_NE_NONE)
    before = os.umask(0o022)
    filt.start_filter()
    try:
        subprocess.run(["sh", "-c", f"umask 077; mkdir {d}/x; : > {d}/y"], check=True)
        assert os.umask(0o022) == 0o022
    finally:
        filt.stop_filter()
        os.umask(before)
    assert (d / "x").stat().st_mode & 0o777 == 0o700


# -- every file isolated, each open served from a view of the file itself


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", ["itself", "itself-daemon-io"])
def test_random_operations_match_native_with_every_file_isolated(scratch: Path, backend: str) -> None:
    """Isolation with the file's own name as its backend changes nothing applications can see: every open by the
    worker is isolated (a view of its own of each file: its own node and kernel passthrough), and the differential
    still holds (creates are isolated too). ``itself-daemon-io``: a read/write notification rule makes the daemon
    serve every view's I/O, so each view has a page cache of its own."""
    from fsfilter import CBFilter
    from fsfilter.api import constants as c

    native, lower, _ = trees(scratch)
    filt = CBFilter()
    isolated: list[str] = []

    def before_open(p: Any) -> None:
        p.isolate = True  # backend_file_name stays the file's own name
        isolated.append(p.file_name)

    filt.on_before_open_file = filt.on_before_create_file = before_open
    filt.on_notify_read_file = filt.on_notify_write_file = lambda p: None
    filt.config("HideDirectoryLinkCounts=false")
    io = c.FS_NE_READ | c.FS_NE_WRITE if backend == "itself-daemon-io" else c.FS_NE_NONE
    filt.add_filter_rule(f"{lower}/*", c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN | c.FS_CE_BEFORE_CREATE, io)
    seed = seed_for(4100 + ["itself", "itself-daemon-io"].index(backend))
    replay = f"DIFF_SEED={seed} DIFF_STEPS={steps(STEPS)} -k 'every_file_isolated and {backend}'"
    filt.start_filter(0)
    result = run_in_place(filt.stop_filter, native, lower, seed, backend, replay)
    assert result["ok"], result["message"]
    assert_exercised(result["counts"], EVERY_OP)  # type: ignore[arg-type]
    assert_same_trees(native, lower, lower)
    assert len(isolated) > 100
    assert filt.stats["failed"] == 0


# -- every file encrypted (CBEncrypt), seen by a trusted process


@pytest.mark.timeout(200)
def test_random_operations_through_a_trusted_process_match_native_on_plaintext(scratch: Path) -> None:
    """CBEncrypt changes nothing a trusted process can see: the worker (python3, trusted) creates, writes, maps,
    truncates, links and renames files that are stored encrypted, and every result matches native. The tree is
    built plain and each file encrypted in place first, so that every file the worker meets is encrypted."""
    from fsfilter._crypto import fileformat as ff
    from fsfilter.api import encryption
    from fsfilter.api.cbencrypt import CBEncrypt

    native, lower, _ = trees(scratch)
    secret = ff.Secret.password("differential")
    for root, _dirs, files in os.walk(lower):
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                encryption.encrypt_file(path, [secret], chunk_shift=12, log2_n=10)
    e = CBEncrypt()
    e.config("ScryptLog2N=10")
    e.config("ChunkSize=4096")
    e.config(f"JournalDirectory={scratch / 'journal'}")
    e.config("HideDirectoryLinkCounts=false")
    e.add_encrypt_rule(f"{lower}/*", "differential")
    e.add_trusted_process("python3*")
    seed = seed_for(4200)
    replay = f"DIFF_SEED={seed} DIFF_STEPS={steps(STEPS)} -k 'trusted_process_match_native'"
    e.start_filter()
    result = run_in_place(e.stop_filter, native, lower, seed, "encrypted", replay, holes=False)
    assert result["ok"], result["message"]
    assert_exercised(result["counts"], ("open", "read", "pwrite", "ftruncate", "mmap", "rename",  # type: ignore[arg-type]
                                        "link"))
    # What is stored is encrypted: every regular file left in the lower tree opens as one.
    for root, _dirs, files in os.walk(lower):
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                assert b"".join(encryption.read_plaintext(path, [secret])) == (native / os.path.relpath(
                    path, lower)).read_bytes(), path
