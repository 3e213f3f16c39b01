"""Real programs through a pass-through mount: tar, git, sqlite3 (WAL, concurrent readers), compileall and
imports, rsync -aHAX, cp, and mmap readers and writers.

Each test works on a tmpfs lower directory mounted at a separate mount point, once with kernel passthrough
("passthrough", the default) and once with the daemon serving every read and write ("daemon"); tar and git
also run on a mount over the lower directory itself ("in-place"). The programs run in processes of their
own: the daemon serves from threads of this process, which must never fault on pages the mount serves, so
everything that maps a file of the mount runs elsewhere. This process makes at most plain system calls on the
mount (to set up inputs) and checks what the programs left behind by reading the lower directory natively.

A few checks make sure the comparisons can fail: a change made through the mount must show in ``tar
--compare`` and in ``rsync --checksum --itemize-changes``; the daemon variant must really have served reads
and writes, the others must really have used kernel passthrough.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import select
import shlex
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SRC, end_processes, is_mounted, needs_root

from fsfilter import PassthroughFilter
from fsfilter._abi import fuse as abi

pytestmark = [needs_root]
Factory = Callable[..., PassthroughFilter]
StrPath = str | os.PathLike[str]

KINDS = ["passthrough", "daemon"]
KINDS_IN_PLACE = [*KINDS, "in-place"]
MiB = 1 << 20


# -- helpers


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"not installed on this machine: {', '.join(missing)} (scripts/setup.sh installs them)")


def run(argv: Sequence[StrPath], *, cwd: StrPath | None = None, env: dict[str, str] | None = None,
        timeout: float = 30, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    args = [os.fspath(a) for a in argv]
    proc = subprocess.run(args, cwd=cwd, env=env, input=stdin, capture_output=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (f"{shlex.join(args)} exited with {proc.returncode}\n"
                                      f"stdout: {proc.stdout.decode(errors='replace')[-3000:]}\n"
                                      f"stderr: {proc.stderr.decode(errors='replace')[-3000:]}")
    return proc


def py(code: str, *args: StrPath, timeout: float = 30, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a new Python process (no site packages) and return what it printed."""
    return run([sys.executable, "-S", "-c", code, *args], timeout=timeout, env=env).stdout.decode()


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def tool_env(scratch: Path) -> dict[str, str]:
    home = scratch / "home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "HOME": str(home), "LC_ALL": "C.UTF-8", "TZ": "UTC", "GIT_CONFIG_NOSYSTEM": "1"}


@dataclass
class Mount:
    kind: str
    lower: Path  # where the data is stored
    view: Path  # where the programs see it: the mount point (the lower directory itself when in place)
    filt: PassthroughFilter

    def check_io_path(self) -> None:
        """The variant really used the I/O path it names (call while mounted)."""
        if self.kind == "daemon":
            assert not self.filt.passthrough_active
            stats = self.filt.stats
            assert stats is not None
            assert stats.requests[abi.Opcode.READ] + stats.requests[abi.Opcode.WRITE] > 0, stats.by_opcode()
        else:
            assert self.filt.passthrough_active, "kernel passthrough should be in use"

    def native(self) -> Path:
        """The lower directory as seen without the filter: an in-place mount is stopped first."""
        if self.filt.in_place:
            self.filt.stop()
            assert not is_mounted(self.lower)
        return self.lower


def make_mount(kind: str, scratch: Path, factory: Factory, **options: object) -> Mount:
    lower = scratch / "lower"
    lower.mkdir()
    if kind == "in-place":
        filt = factory(lower, **options)
        assert filt.in_place and is_mounted(lower)
        return Mount(kind, lower, lower, filt)
    mnt = scratch / "mnt"
    mnt.mkdir()
    filt = factory(lower, mnt, passthrough=kind == "passthrough", **options)
    assert is_mounted(mnt)
    return Mount(kind, lower, mnt, filt)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Helper processes a test starts; killed if still running. Request it after ``filter_factory`` so that
    it is torn down first, while the mount still answers."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        end_processes(started)


def spawn(procs: list[subprocess.Popen[bytes]], code: str, *args: StrPath) -> subprocess.Popen[bytes]:
    """A helper process talking in lines; its stdout is unbuffered here, so ``line`` can wait with select."""
    p = subprocess.Popen([sys.executable, "-S", "-c", code, *[os.fspath(a) for a in args]], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    procs.append(p)
    return p


def line(p: subprocess.Popen[bytes], timeout: float = 30) -> str:
    """The helper's next line, within ``timeout`` seconds."""
    assert p.stdout is not None
    fd = p.stdout.fileno()
    got = b""
    deadline = time.monotonic() + timeout
    while not got.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 1) if ready else b""
        if not chunk:
            p.kill()
            _, err = p.communicate(timeout=10)
            why = "ended" if ready else f"said nothing for {timeout} s"
            raise AssertionError(f"helper {why} after {got!r}: {err.decode(errors='replace')}")
        got += chunk
    return got.decode().strip()


def expect_line(p: subprocess.Popen[bytes], want: str, timeout: float = 30) -> None:
    got = line(p, timeout)
    assert got == want, f"helper said {got!r}, not {want!r}"


def tell(p: subprocess.Popen[bytes], line: str) -> None:
    assert p.stdin is not None
    p.stdin.write(line.encode() + b"\n")
    p.stdin.flush()


def finish(p: subprocess.Popen[bytes], timeout: float = 30) -> str:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"helper exited with {p.returncode}: {err.decode(errors='replace')}"
    return out.decode()


# -- trees: a varied one to copy around, and a walker that records everything the copies must keep

ACL_NAMES = ("system.posix_acl_access", "system.posix_acl_default")


def build_tree(root: Path, *, sparse_size: int = 8 * MiB) -> dict[str, bytes]:
    """Files of every size and kind, links, modes, owners, xattrs, ACLs (when setfacl exists) and
    nanosecond mtimes. Returns the regular files' contents by relative path."""
    root.mkdir()
    contents: dict[str, bytes] = {
        "empty": b"",
        "small.txt": b"hello, world\n",
        "big.bin": os.urandom(3 * MiB // 2 + 7),
        "exec.sh": b"#!/bin/sh\necho hi\n",
        "private": b"secret\n",
        "suid-prog": b"\x7fELF not really\n",
        "owned": b"someone else's\n",
        "naïve ☃ name.txt": "unicode ✓\n".encode(),
        "sub/deep/er/note.md": b"# note\n" * 500,
        "sub/sticky/x": b"x",
        "long/" + "d" * 120 + "/" + "f" * 150: b"a long path\n",
        "hard-a": b"three names, one inode\n",
        "acl-dir/f": b"inherits\n",
        "closed/inside": b"in a 0700 directory\n",
    }
    for rel, data in contents.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with open(root / "sparse.img", "wb") as f:
        f.truncate(sparse_size)
        os.pwrite(f.fileno(), b"S" * 4096, 0)
        os.pwrite(f.fileno(), os.urandom(4096), sparse_size // 2)
        os.pwrite(f.fileno(), b"E", sparse_size - 1)
    contents["sparse.img"] = (root / "sparse.img").read_bytes()
    os.link(root / "big.bin", root / "sub" / "big-hard")
    os.link(root / "hard-a", root / "sub" / "deep" / "hard-b")
    os.link(root / "hard-a", root / "hard-c")
    for rel in ("sub/big-hard", "sub/deep/hard-b", "hard-c"):
        contents[rel] = (root / rel).read_bytes()
    os.symlink("small.txt", root / "link-rel")
    os.symlink("../big.bin", root / "sub" / "link-up")
    os.symlink("nowhere/at/all", root / "dangling")
    os.symlink("sub", root / "link-dir")
    os.mkfifo(root / "fifo", 0o640)
    (root / "empty-dir").mkdir()
    os.chmod(root / "exec.sh", 0o755)
    os.chmod(root / "private", 0o600)
    os.chmod(root / "suid-prog", 0o4755)
    os.chmod(root / "sub" / "sticky", 0o1777)
    os.chmod(root / "sub" / "deep", 0o2775)
    os.chmod(root / "closed", 0o700)
    os.chown(root / "owned", 1234, 5678)
    os.chown(root / "sub" / "deep" / "er", 4321, 8765)
    os.chown(root / "link-rel", 1234, 5678, follow_symlinks=False)
    os.setxattr(root / "small.txt", "user.comment", b"a comment")
    os.setxattr(root / "big.bin", "user.binary", bytes(range(256)) * 2)
    os.setxattr(root / "sub", "user.dir", b"on a directory")
    if shutil.which("setfacl"):
        run(["setfacl", "-m", "u:1234:rw,g:5678:r", root / "small.txt"])
        run(["setfacl", "-m", "u:4321:rx", "-d", "-m", "u:1234:rwx", root / "acl-dir"])
    # times last, deepest first, as creating entries changes their directory's mtime
    paths = sorted((p for p in root.rglob("*")), key=lambda p: -len(p.parts))
    for i, path in enumerate([*paths, root]):
        mtime = 1_600_000_000_123_456_789 + i * 1_000_003_007
        os.utime(path, ns=(mtime - 5_000_000_000, mtime), follow_symlinks=False)
    return contents


Record = dict[str, object]


def snapshot(root: Path) -> dict[str, Record]:
    """Every object under ``root`` (included, as ".") with type, mode, owner, mtime, content digest, link
    target, xattrs and ACLs, and the other names of its inode in the tree. Not atime, ctime, inode numbers,
    directory sizes or allocation."""
    out: dict[str, Record] = {}
    by_inode: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        names = [here] if here == root else []
        names += [here / n for n in sorted(dirnames + filenames)]
        for path in names:
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            rec: Record = {"mode": oct(st.st_mode), "owner": (st.st_uid, st.st_gid), "mtime": st.st_mtime_ns}
            if stat.S_ISREG(st.st_mode):
                rec["size"] = st.st_size
                rec["sha256"] = sha(path.read_bytes())
                rec["nlink"] = st.st_nlink
                by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                rec["rdev"] = st.st_rdev
            if not stat.S_ISLNK(st.st_mode):
                xattrs = {}
                for name in sorted({*os.listxattr(path), *ACL_NAMES}):
                    try:
                        xattrs[name] = os.getxattr(path, name).hex()
                    except OSError:
                        pass
                rec["xattrs"] = xattrs
            out[rel] = rec
    for group in by_inode.values():
        for rel in group:
            out[rel]["links"] = sorted(group)
    return out


def assert_same_tree(want: dict[str, Record], got: dict[str, Record], what: str) -> None:
    problems = [f"only in the expected tree: {n}" for n in sorted(want.keys() - got.keys())]
    problems += [f"only in {what}: {n}" for n in sorted(got.keys() - want.keys())]
    for name in sorted(want.keys() & got.keys()):
        a, b = want[name], got[name]
        for key in sorted(a.keys() | b.keys()):
            if a.get(key) != b.get(key):
                problems.append(f"{name}: {key} is {b.get(key)!r} in {what}, expected {a.get(key)!r}")
    assert not problems, f"{what} differs ({len(problems)}):\n" + "\n".join(problems[:40])


def allocated(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


# -- 1. tar

TAR_META = ["--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", KINDS_IN_PLACE)
def test_tar_extracts_and_compares(kind: str, scratch: Path, filter_factory: Factory) -> None:
    need("tar")
    src = scratch / "src"
    contents = build_tree(src)
    archive = scratch / "tree.tar"
    run(["tar", "--format=posix", *TAR_META, "--sparse", "-cpf", archive, "-C", src, "."])
    reference = scratch / "reference"  # the same archive extracted natively: what the mount must give too
    reference.mkdir()
    run(["tar", *TAR_META, "-xpf", archive, "-C", reference])
    want = snapshot(src)
    assert_same_tree(want, snapshot(reference), "the native extraction")  # the archive holds everything

    m = make_mount(kind, scratch, filter_factory)
    target = m.view / "x"
    target.mkdir()
    run(["tar", *TAR_META, "-xpf", archive, "-C", target])
    compared = run(["tar", *TAR_META, "--compare", "-f", archive, "-C", target], check=False)
    assert compared.returncode == 0 and not compared.stdout, compared.stdout.decode() + compared.stderr.decode()
    # a change through the mount is something tar --compare must see (so the comparison above means something)
    with open(target / "small.txt", "r+b") as f:
        f.write(b"J")
    compared = run(["tar", *TAR_META, "--compare", "-f", archive, "-C", target], check=False)
    assert compared.returncode == 1 and b"small.txt: Contents differ" in compared.stdout, compared
    with open(target / "small.txt", "r+b") as f:
        f.write(b"h")
    os.utime(target / "small.txt", ns=(0, os.stat(src / "small.txt").st_mtime_ns))
    m.check_io_path()

    lower = m.native() / "x"
    assert_same_tree(want, snapshot(lower), "the lower tree")
    for rel, data in contents.items():
        assert (lower / rel).read_bytes() == data, rel
    assert allocated(lower / "sparse.img") < MiB, "the holes of the sparse file were filled"
    assert stat.S_ISFIFO(os.lstat(lower / "fifo").st_mode)


# -- 2. git


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", KINDS_IN_PLACE)
def test_git_repository(kind: str, scratch: Path, filter_factory: Factory) -> None:
    need("git")
    env = tool_env(scratch)
    m = make_mount(kind, scratch, filter_factory)
    repo = m.view / "repo"

    def git(*args: StrPath, cwd: Path = repo) -> str:
        argv = ["git", "-c", "user.name=Tester", "-c", "user.email=tester@example.com", "-c", "gc.auto=0", *args]
        return run(argv, cwd=cwd, env=env).stdout.decode()

    git("init", "-q", "-b", "main", repo, cwd=m.view)
    files: dict[str, bytes] = {
        "README": b"fsfilter test repository\n",
        "src/app.py": b"print('hello')\n" * 40,
        "data/blob.bin": os.urandom(MiB + 333),
        "bin/run.sh": b"#!/bin/sh\nexec true\n",
    }
    files.update({f"many/f{i:03d}.txt": f"file {i}\n".encode() * (i + 1) for i in range(120)})
    for rel, data in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(data)
    os.chmod(repo / "bin" / "run.sh", 0o755)
    os.symlink("README", repo / "readme-link")
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    assert git("status", "--porcelain") == ""
    assert len(git("log", "--format=%H").split()) == 1
    git("fsck", "--full", "--strict")
    show = run(["git", "show", "HEAD:data/blob.bin"], cwd=repo, env=env).stdout
    assert show == files["data/blob.bin"]

    # a second commit: change, delete, add, rename, mode change
    files["README"] += b"second line\n"
    (repo / "README").write_bytes(files["README"])
    for i in range(10):
        del files[f"many/f{i:03d}.txt"]
    git("rm", "-q", *[f"many/f{i:03d}.txt" for i in range(10)])
    files["new/added.txt"] = b"added in the second commit\n"
    (repo / "new").mkdir()
    (repo / "new" / "added.txt").write_bytes(files["new/added.txt"])
    git("mv", "src/app.py", "src/main.py")
    files["src/main.py"] = files.pop("src/app.py")
    os.chmod(repo / "bin" / "run.sh", 0o644)
    git("add", "-A")
    git("commit", "-q", "-m", "second")
    assert git("status", "--porcelain", "--untracked-files=all") == ""
    assert git("log", "--format=%s").split() == ["second", "first"]
    stat_out = git("diff", "--name-status", "-M", "HEAD~1", "HEAD").splitlines()
    assert any(line.startswith("R") and "src/app.py" in line for line in stat_out), stat_out
    assert "A\tnew/added.txt" in stat_out and "M\tREADME" in stat_out

    # pack everything (git writes, renames and mmaps pack files), then check again
    git("gc", "-q", "--prune=now")
    counts = dict(line.split(": ") for line in git("count-objects", "-v").splitlines())
    assert counts["count"] == "0" and int(counts["in-pack"]) >= 130, counts
    git("fsck", "--full", "--strict")
    packs = sorted((repo / ".git" / "objects" / "pack").glob("*.idx"))
    assert packs
    git("verify-pack", *packs)
    assert git("status", "--porcelain", "--untracked-files=all") == ""
    head = git("rev-parse", "HEAD").strip()
    tree = git("ls-tree", "-r", "HEAD")
    m.check_io_path()

    # clone natively from the lower directory: the same history and files
    lower_repo = m.native() / "repo"
    clone = scratch / "clone"
    git("clone", "-q", "--no-local", lower_repo, clone, cwd=scratch)
    assert git("rev-parse", "HEAD", cwd=clone).strip() == head
    assert git("ls-tree", "-r", "HEAD", cwd=clone) == tree
    git("fsck", "--full", "--strict", cwd=clone)
    for rel, data in files.items():
        assert (clone / rel).read_bytes() == data, rel
        assert (lower_repo / rel).read_bytes() == data, rel
    assert os.readlink(clone / "readme-link") == "README"
    assert not os.stat(clone / "bin" / "run.sh").st_mode & 0o111
    assert not (clone / "many" / "f000.txt").exists() and not (lower_repo / "many" / "f000.txt").exists()
    assert git("status", "--porcelain", "--untracked-files=all", cwd=lower_repo) == ""


# -- 3. sqlite3 in WAL mode with one writer and concurrent readers

SQL_SETUP = r"""
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
print(con.execute("PRAGMA journal_mode=WAL").fetchone()[0])
con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL, pad BLOB NOT NULL)")
con.execute("CREATE TABLE meta (n INTEGER NOT NULL, done INTEGER NOT NULL)")
con.execute("INSERT INTO meta VALUES (0, 0)")
con.close()
"""

# Every transaction adds a row +x and a row -x and counts them in meta: so sum(v) = 0, count(*) = meta.n =
# max(id), and count(*) is even, in every snapshot a reader can see.
SQL_WRITER = r"""
import os, random, sqlite3, sys
con = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
print("ready", flush=True)
sys.stdin.readline()
for i in range(int(sys.argv[2])):
    x = random.randint(1, 10**9)
    con.execute("BEGIN IMMEDIATE")
    con.execute("INSERT INTO t (v, pad) VALUES (?, ?), (?, ?)", (x, os.urandom(300), -x, os.urandom(300)))
    con.execute("UPDATE meta SET n = n + 2")
    con.execute("COMMIT")
con.execute("UPDATE meta SET done = 1")
con.close()
print("done", flush=True)
"""

SQL_READER = r"""
import json, sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
con.execute(f"PRAGMA mmap_size={int(sys.argv[2])}")  # > 0: SQLite reads the database through a mapping
last, reads, seen, errors = -1, 0, set(), []
print("ready", flush=True)
deadline = time.monotonic() + 40
while time.monotonic() < deadline:
    con.execute("BEGIN")
    count, total, top = con.execute("SELECT count(*), coalesce(sum(v), 0), coalesce(max(id), 0) FROM t").fetchone()
    n, done = con.execute("SELECT n, done FROM meta").fetchone()
    con.execute("COMMIT")
    reads += 1
    seen.add(count)
    if count != n or total != 0 or top != count or count % 2 or count < last:
        errors.append([count, total, top, n, last])
    last = count
    if done:
        break
print(json.dumps({"reads": reads, "seen": len(seen), "last": last, "errors": errors[:10], "done": bool(done)}))
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", [*KINDS, "locks"])
def test_sqlite_wal_writer_and_concurrent_readers(kind: str, scratch: Path, filter_factory: Factory,
                                                  procs: list[subprocess.Popen[bytes]]) -> None:
    # "locks": passthrough I/O, and sqlite's fcntl locks served by the daemon instead of the kernel
    m = make_mount("passthrough" if kind == "locks" else kind, scratch, filter_factory, workers=2,
                   locks=kind == "locks")
    db = m.view / "test.db"
    assert py(SQL_SETUP, db).strip() == "wal"
    transactions = 400
    readers = [spawn(procs, SQL_READER, db, str(mmap_size)) for mmap_size in (0, 0, 64 * MiB)]
    writer = spawn(procs, SQL_WRITER, db, str(transactions))
    for p in [*readers, writer]:
        expect_line(p, "ready")
    tell(writer, "go")
    assert finish(writer, 60).strip() == "done"
    for p in readers:
        result = json.loads(finish(p, 60).strip().splitlines()[-1])
        assert not result["errors"], f"a reader saw an inconsistent snapshot: {result}"
        assert result["done"] and result["last"] == 2 * transactions, result
        assert result["reads"] >= 5 and result["seen"] >= 3, f"the reader did not run alongside the writer: {result}"
    # through the mount, with the sqlite3 program when there is one
    check = "PRAGMA integrity_check; SELECT count(*), sum(v), max(id) FROM t; PRAGMA journal_mode;"
    if shutil.which("sqlite3"):
        out = run(["sqlite3", db, check]).stdout.decode().split()
    else:
        code = ("import sqlite3, sys\ncon = sqlite3.connect(sys.argv[1])\n"
                "for s in sys.argv[2].split(';')[:-1]:\n    print(*con.execute(s).fetchone(), sep='|')")
        out = py(code, db, check).split()
    assert out == ["ok", f"{2 * transactions}|0|{2 * transactions}", "wal"], out
    m.check_io_path()
    assert m.filt.stats is not None
    assert (m.filt.stats.requests[abi.Opcode.SETLK] > 0) == (kind == "locks")
    # natively, once every connection is closed: the last one checkpointed the WAL into the database file
    lower_db = m.native() / "test.db"
    assert not (m.lower / "test.db-wal").exists() or os.path.getsize(m.lower / "test.db-wal") == 0
    native = py("import sqlite3, sys\ncon = sqlite3.connect(sys.argv[1])\n"
                "print(con.execute('PRAGMA integrity_check').fetchone()[0], *con.execute("
                "'SELECT count(*), sum(v) FROM t').fetchone())", lower_db).split()
    assert native == ["ok", str(2 * transactions), "0"], native


# -- 4. compileall, then imports that use the byte code


IMPORTER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import fsfilter, fsfilter.cli, fsfilter._sessions.lower_fs, fsfilter._wire.fuse, extra.mod
assert fsfilter.__file__.startswith(sys.argv[1]), fsfilter.__file__
print(fsfilter.__version__, extra.mod.value())
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_compileall_and_import_from_the_mount(kind: str, scratch: Path, filter_factory: Factory) -> None:
    need("cp")
    package = scratch / "package"  # the sources without any byte code, copied through the mount by cp
    shutil.copytree(SRC / "fsfilter", package / "fsfilter", ignore=shutil.ignore_patterns("__pycache__"))
    (package / "extra").mkdir()
    (package / "extra" / "__init__.py").write_text("")
    (package / "extra" / "mod.py").write_text("def value():\n    return 'one'\n")
    m = make_mount(kind, scratch, filter_factory)
    pkgs = m.view / "pkgs"
    run(["cp", "-a", package, pkgs])
    run([sys.executable, "-m", "compileall", "-q", pkgs])
    sources = sorted(pkgs.rglob("*.py"))
    assert len(sources) >= 15
    for source in sources:
        pyc = Path(importlib.util.cache_from_source(str(source)))
        lower_pyc = m.lower / pyc.relative_to(m.view)
        header = lower_pyc.read_bytes()[:16]
        st = os.stat(m.lower / source.relative_to(m.view))
        # the header records the source's mtime and size as compileall saw them through the mount
        assert header[:4] == importlib.util.MAGIC_NUMBER and header[4:8] == bytes(4), lower_pyc
        assert int.from_bytes(header[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF, lower_pyc
        assert int.from_bytes(header[12:16], "little") == st.st_size, lower_pyc
    again = run([sys.executable, "-m", "compileall", pkgs]).stdout.decode()
    assert "Compiling" not in again, f"compileall found byte code stale that it had just written:\n{again}"

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def import_all() -> tuple[str, str]:
        proc = run([sys.executable, "-S", "-v", "-c", IMPORTER, pkgs], env=env)
        return proc.stdout.decode().strip(), proc.stderr.decode()

    out, verbose = import_all()
    assert out == "0.1.0 one"
    for module in ("fsfilter/__init__.py", "fsfilter/cli.py", "fsfilter/_sessions/lower_fs.py",
                   "fsfilter/_wire/fuse.py", "extra/mod.py"):
        cached = importlib.util.cache_from_source(str(pkgs / module))
        assert f"code object from {cached!r}" in verbose, f"{module} was not loaded from {cached}"
    assert "bytecode is stale" not in verbose and f"# created {str(pkgs)!r}"[:-1] not in verbose

    # a changed source makes the import compile it again and write new byte code through the mount
    mtime = os.stat(pkgs / "extra" / "mod.py").st_mtime_ns
    (pkgs / "extra" / "mod.py").write_text("def value():\n    return 'two, changed'\n")
    os.utime(pkgs / "extra" / "mod.py", ns=(mtime, mtime + 10**10))  # another second even on a fast machine
    out, verbose = import_all()
    assert out == "0.1.0 two, changed"
    mod_pyc = importlib.util.cache_from_source(str(pkgs / "extra" / "mod.py"))
    ours = "\n".join(v for v in verbose.splitlines() if str(pkgs / "extra") in v or "extra.mod" in v)
    assert "bytecode is stale for 'extra.mod'" in verbose and f"# created {mod_pyc!r}" in verbose, ours
    out, verbose = import_all()
    assert out == "0.1.0 two, changed" and f"code object from {mod_pyc!r}" in verbose
    m.check_io_path()


# -- 5. rsync -aHAX in and out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", KINDS)
def test_rsync_in_and_out(kind: str, scratch: Path, filter_factory: Factory) -> None:
    need("rsync")
    src = scratch / "src"
    build_tree(src)
    want = snapshot(src)
    m = make_mount(kind, scratch, filter_factory)
    dst, out = m.view / "dst", scratch / "out"
    run(["rsync", "-aHAX", f"{src}/", dst])
    run(["rsync", "-aHAX", f"{dst}/", out])
    # rsync itself, comparing checksums and every attribute it keeps, must find nothing to do either way
    for a, b in ((src, dst), (dst, out)):
        changes = run(["rsync", "-aHAX", "--checksum", "--delete", "--dry-run", "--itemize-changes", f"{a}/", b])
        assert changes.stdout == b"", f"rsync {a} -> {b} would still change:\n{changes.stdout.decode()}"
    # and one change through the mount is something it does see
    with open(dst / "sub" / "deep" / "er" / "note.md", "r+b") as f:
        f.write(b"!")
    os.utime(dst / "sub" / "deep" / "er" / "note.md", ns=(0, os.lstat(src / "sub/deep/er/note.md").st_mtime_ns))
    changes = run(["rsync", "-aHAX", "--checksum", "--dry-run", "--itemize-changes", f"{src}/", dst])
    assert changes.stdout.decode().split() == [">fc........", "sub/deep/er/note.md"], changes.stdout
    run(["rsync", "-aHAX", "--checksum", f"{src}/", dst])
    m.check_io_path()
    assert_same_tree(want, snapshot(m.lower / "dst"), "the lower tree")
    assert_same_tree(want, snapshot(out), "the copy out of the mount")


# -- 6. cp --reflink=auto and cp -a


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_cp_large_file_and_tree(kind: str, scratch: Path, filter_factory: Factory) -> None:
    need("cp")
    big = scratch / "big.bin"
    data = os.urandom(8 * MiB + 4097)
    big.write_bytes(data)
    src = scratch / "src"
    build_tree(src)
    want = snapshot(src)
    m = make_mount(kind, scratch, filter_factory)
    run(["cp", "--reflink=auto", big, m.view / "big"])  # into the mount
    run(["cp", "--reflink=auto", m.view / "big", m.view / "big2"])  # within it
    run(["cp", "--reflink=auto", m.view / "big2", scratch / "back"])  # out of it
    for path in (m.lower / "big", m.lower / "big2", scratch / "back"):
        assert sha(path.read_bytes()) == sha(data), path
    run(["cp", "-a", src, m.view / "tree"])
    run(["cp", "-a", m.view / "tree", m.view / "tree2"])
    run(["cp", "-a", m.view / "tree2", scratch / "tree-out"])
    m.check_io_path()
    for tree in (m.lower / "tree", m.lower / "tree2", scratch / "tree-out"):
        assert_same_tree(want, snapshot(tree), str(tree))
        assert allocated(tree / "sparse.img") < MiB, f"cp filled the holes of {tree}/sparse.img"


# -- 7. mmap readers and writers in separate processes

MAP_WRITER = r"""
import mmap, os, sys
path, page = sys.argv[1], mmap.PAGESIZE
fd = os.open(path, os.O_RDWR)
size = os.fstat(fd).st_size
mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
print("mapped", flush=True)
sys.stdin.readline()
for k in (0, 5, 17):
    mm[k * page:k * page + 100] = b"W" * 100
mm[size - 3:size] = b"END"
mm.flush()  # msync(MS_SYNC)
print("synced", flush=True)
sys.stdin.readline()
mm[7 * page:8 * page] = b"2" * page  # no msync: other mappings and read() see it through the page cache
print("written", flush=True)
sys.stdin.readline()
mm.close()
os.close(fd)
print("closed", flush=True)
"""

MAP_HOLDER = r"""
import mmap, os, sys
path, page = sys.argv[1], mmap.PAGESIZE
with open(path, "rb") as f:
    mm = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
    assert mm[0:4] == b"aaaa"
    print("mapped", flush=True)
    for line in sys.stdin:
        a, b = map(int, line.split())
        print(mm[a:b].hex(), flush=True)
    mm.close()
"""

READ_BOTH = r"""
import hashlib, mmap, os, sys
with open(sys.argv[1], "rb") as f:
    by_read = f.read()
    mm = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
    by_map = mm[:]
    mm.close()
print(hashlib.sha256(by_read).hexdigest(), hashlib.sha256(by_map).hexdigest(), len(by_read))
"""

EXTENDER = r"""
import mmap, os, sys
path, page = sys.argv[1], mmap.PAGESIZE
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
first = 3 * (1 << 20) + 123
os.ftruncate(fd, first)
mm = mmap.mmap(fd, first, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
mm[0:5] = b"start"
mm[first // 2:first // 2 + page] = b"m" * page
mm[first - 4:first] = b"tail"
mm.flush()
second = first + 5 * page + 77
mm.resize(second)  # ftruncate, then mremap
mm[second - 6:second] = b"longer"
mm.flush()
mm.close()
os.close(fd)
"""

PAGE_WRITER = r"""
import mmap, os, sys
path, which, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
page = mmap.PAGESIZE
fd = os.open(path, os.O_RDWR)
mm = mmap.mmap(fd, 0, mmap.MAP_SHARED)
pages = range(which, len(mm) // page, 2)
for r in range(rounds):
    for p in pages:
        mm[p * page:p * page + 8] = b"%d:%06d" % (which, r)
mm.flush()
mm.close()
os.close(fd)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_mmap_between_processes(kind: str, scratch: Path, filter_factory: Factory,
                                procs: list[subprocess.Popen[bytes]]) -> None:
    m = make_mount(kind, scratch, filter_factory)
    page = os.sysconf("SC_PAGE_SIZE")
    size = 20 * page + 1000
    f = m.view / "shared.bin"
    run(["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' a > {shlex.quote(str(f))}"])
    expect = bytearray(b"a" * size)
    for k in (0, 5, 17):
        expect[k * page:k * page + 100] = b"W" * 100
    expect[size - 3:] = b"END"

    writer = spawn(procs, MAP_WRITER, f)
    holder = spawn(procs, MAP_HOLDER, f)
    expect_line(holder, "mapped")
    expect_line(writer, "mapped")
    tell(writer, "write")  # both have mapped the file before anything is written
    expect_line(writer, "synced")
    assert (m.lower / "shared.bin").read_bytes() == expect, "msync did not write the pages to the lower file"
    readers = [spawn(procs, READ_BOTH, f) for _ in range(2)]
    for r in readers:
        assert finish(r).split() == [sha(expect), sha(expect), str(size)]
    tell(holder, f"{5 * page} {5 * page + 104}")
    assert line(holder) == (b"W" * 100 + b"aaaa").hex()

    tell(writer, "more")
    expect_line(writer, "written")
    expect[7 * page:8 * page] = b"2" * page
    tell(holder, f"{7 * page - 2} {7 * page + 2}")
    assert line(holder) == b"aa22".hex()
    assert finish(spawn(procs, READ_BOTH, f)).split() == [sha(expect), sha(expect), str(size)]
    # write() by another process shows in the existing mappings too
    py("import os, sys\nfd = os.open(sys.argv[1], os.O_WRONLY)\nos.pwrite(fd, b'PWRITE', int(sys.argv[2]))\n"
       "os.close(fd)", f, str(9 * page))
    expect[9 * page:9 * page + 6] = b"PWRITE"
    tell(holder, f"{9 * page} {9 * page + 6}")
    assert line(holder) == b"PWRITE".hex()
    tell(writer, "close")
    expect_line(writer, "closed")
    finish(writer)
    finish(holder)  # closes its stdin: it unmaps and exits
    assert (m.lower / "shared.bin").read_bytes() == expect

    # a new file grown with ftruncate, then mapped, written, and grown again while mapped
    g = m.view / "grown.bin"
    py(EXTENDER, g)
    first = 3 * MiB + 123
    second = first + 5 * page + 77
    grown = bytearray(second)
    grown[0:5] = b"start"
    grown[first // 2:first // 2 + page] = b"m" * page
    grown[first - 4:first] = b"tail"
    grown[second - 6:second] = b"longer"
    assert finish(spawn(procs, READ_BOTH, g)).split() == [sha(grown), sha(grown), str(second)]
    assert (m.lower / "grown.bin").read_bytes() == grown

    # two processes writing their own pages of one file through their own mappings at the same time
    h = m.view / "pages.bin"
    npages = 64
    run(["truncate", "-s", str(npages * page), h])
    rounds = 200
    writers = [spawn(procs, PAGE_WRITER, h, str(which), str(rounds)) for which in (0, 1)]
    for w in writers:
        finish(w)
    pages = bytearray(npages * page)
    for p in range(npages):
        pages[p * page:p * page + 8] = b"%d:%06d" % (p % 2, rounds - 1)
    assert finish(spawn(procs, READ_BOTH, h)).split() == [sha(pages), sha(pages), str(len(pages))]
    m.check_io_path()
    assert (m.lower / "pages.bin").read_bytes() == pages

