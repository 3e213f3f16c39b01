"""The hostile-user suite, mount-backed rules: attacks an unprivileged user can make on CBFilter's access rules
and on ``fsfilter hide``, each refused (issue 11, items 1 and 5).

The attacker owns the files it attacks: file permissions would let it do everything, so only the rule stands
in the way."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import SRC, force_unmount, is_mounted, needs_root, wait_for
from hostile import Attacker

from fsfilter import CBFilter
from fsfilter.api import constants as c

pytestmark = [needs_root, pytest.mark.timeout(120)]

# renameat2(AT_FDCWD, old, AT_FDCWD, new, flags) through ctypes, as the attacker's Python; prints the errno
RENAMEAT2 = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
flags = {"exchange": 2, "noreplace": 1, "plain": 0}[sys.argv[3]]
r = libc.syscall(316, -100, sys.argv[1].encode(), -100, sys.argv[2].encode(), flags)
print(0 if r == 0 else ctypes.get_errno())
"""


@pytest.fixture
def payroll(scratch: Path, attacker: Attacker) -> Path:
    """/data with hr/pay.csv, everything owned by the attacker."""
    data = scratch / "data"
    (data / "hr").mkdir(parents=True)
    (data / "hr" / "pay.csv").write_text("alice,100\n")
    (data / "pub").mkdir()
    (data / "pub" / "notes.txt").write_text("notes\n")
    for p in (data, data / "hr", data / "hr" / "pay.csv", data / "pub", data / "pub" / "notes.txt"):
        attacker.give(p)
    return data


def protect(f: CBFilter, data: Path, mask: str, access: int) -> None:
    f.add_filter_rule(f"{data}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_ALL)  # "any flags" on the whole tree
    f.add_filter_rule(mask, access, c.FS_CE_NONE, c.FS_NE_NONE)
    f.start_filter()


@pytest.mark.parametrize("access", [c.ACCESS_READ_ONLY | c.ACCESS_DELETE_PROTECT, c.ACCESS_DENY_ALL,
                                    c.ACCESS_READ_ONLY])
@pytest.mark.parametrize("rule", ["subtree", "file"])
def test_renaming_a_parent_does_not_carry_a_file_out_of_its_rule(cbfilter: Callable[[], CBFilter], payroll: Path,
                                                                attacker: Attacker, access: int,
                                                                rule: str) -> None:
    f = cbfilter()
    protect(f, payroll, f"{payroll}/hr/*" if rule == "subtree" else f"{payroll}/hr/pay.csv", access)
    r = attacker.sh(f"cd {payroll} && mv hr hr2; echo PWNED >> hr2/pay.csv; mv hr2 hr")
    assert "PWNED" not in (payroll / "hr" / "pay.csv").read_text(), r.stderr
    assert (payroll / "hr").is_dir() and not (payroll / "hr2").exists()
    # the same with the grandparent: the attacker makes a new level and moves the tree under it
    r = attacker.sh(f"cd {payroll} && mkdir box && mv hr box/hr; echo PWNED >> box/hr/pay.csv")
    assert "PWNED" not in (payroll / "hr" / "pay.csv").read_text(), r.stderr
    # what the rule does not cover still moves freely
    assert attacker.sh(f"cd {payroll} && mv pub pub2 && mv pub2 pub").returncode == 0


def test_exchanging_a_parent_is_refused(cbfilter: Callable[[], CBFilter], payroll: Path, attacker: Attacker) -> None:
    f = cbfilter()
    protect(f, payroll, f"{payroll}/hr/*", c.ACCESS_READ_ONLY | c.ACCESS_DELETE_PROTECT)
    r = attacker.python(RENAMEAT2, f"{payroll}/hr", f"{payroll}/pub", "exchange")
    assert int(r.stdout) in (errno.EACCES, errno.EPERM), r.stderr
    assert (payroll / "hr" / "pay.csv").read_text() == "alice,100\n"
    assert (payroll / "pub" / "notes.txt").exists()
    # into the rule's place: a tree of the attacker's moved where the rule would now cover it (the reverse)
    (payroll / "pub" / "in").mkdir()
    attacker.give(payroll / "pub" / "in")
    r = attacker.python(RENAMEAT2, f"{payroll}/pub/in", f"{payroll}/hr/in", "noreplace")
    assert int(r.stdout) in (errno.EACCES, errno.EPERM), r.stderr


def test_moving_a_directory_under_a_tree_wide_rule_still_works(cbfilter: Callable[[], CBFilter], payroll: Path,
                                                               attacker: Attacker) -> None:
    """A rule whose verdict depends only on names (``*.csv`` anywhere below /data) judges every place in the
    tree alike: directories move as usual, and the file stays protected in its new place."""
    f = cbfilter()
    protect(f, payroll, f"{payroll}/*.csv", c.ACCESS_READ_ONLY)
    r = attacker.sh(f"cd {payroll} && mv hr hr2")
    assert r.returncode == 0, r.stderr
    r = attacker.sh(f"echo PWNED >> {payroll}/hr2/pay.csv")
    assert r.returncode != 0
    assert (payroll / "hr2" / "pay.csv").read_text() == "alice,100\n"


def test_control_event_rules_are_not_escaped_by_moving_a_parent(cbfilter: Callable[[], CBFilter], payroll: Path,
                                                                attacker: Attacker) -> None:
    """A DLP handler (Before-open) on /data/hr/*: a moved parent would take the files out of its sight."""
    f = cbfilter()
    opened: list[str] = []

    def before_open(e: object) -> None:
        opened.append(e.file_name)  # type: ignore[attr-defined]
        e.result_code = errno.EACCES  # type: ignore[attr-defined]

    f.on_before_open_file = before_open
    f.add_filter_rule(f"{payroll}/*", c.ACCESS_NONE, c.FS_CE_NONE, c.FS_NE_ALL)  # attach point: /data
    f.add_filter_rule(f"{payroll}/hr/*", c.ACCESS_NONE, c.FS_CE_BEFORE_OPEN, c.FS_NE_NONE)
    f.start_filter()
    r = attacker.sh(f"cd {payroll} && mv hr hr2; cat hr2/pay.csv")
    assert "alice" not in r.stdout
    assert os.path.isdir(payroll / "hr") and "mv:" in r.stderr
    assert f"{payroll}/hr2/pay.csv" not in opened


# ------------------------------------------------------------------------------------------ fsfilter hide (item 5)


@pytest.fixture
def hidden_tree(scratch: Path, attacker: Attacker) -> Iterator[tuple[Path, Path]]:
    """``fsfilter hide DIR 'secret*'`` on a tree the attacker owns: a hidden file, a hidden directory (with a
    file in it), and a directory whose only entry is hidden. Yields DIR and the lower directory below the mount
    (through an fd opened before it), where the test sees what is really there."""
    d = scratch / "h"
    (d / "secretdir").mkdir(parents=True)
    (d / "secretdir" / "inner.txt").write_text("inner\n")
    (d / "secret4.txt").write_text("the hidden data\n")
    (d / "only").mkdir()
    (d / "only" / "secret.key").write_text("key\n")
    (d / "attacker.txt").write_text("attacker\n")
    for p in (d, d / "secretdir", d / "secretdir" / "inner.txt", d / "secret4.txt", d / "only",
              d / "only" / "secret.key", d / "attacker.txt"):
        attacker.give(p)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    below = os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    proc = subprocess.Popen([sys.executable, "-m", "fsfilter", "hide", str(d), "secret*"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert wait_for(lambda: is_mounted(d) or proc.poll() is not None, 20) and proc.poll() is None
        yield d, Path(f"/proc/{os.getpid()}/fd/{below}")
    finally:
        os.close(below)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
        force_unmount(d)


def _errno(attacker: Attacker, code: str) -> int:
    r = attacker.python("import os, sys, errno\ntry:\n    " + code.replace("\n", "\n    ")
                        + "\nexcept OSError as e:\n    print(e.errno)\nelse:\n    print(0)\n")
    assert r.stdout.strip(), r.stderr
    return int(r.stdout.split()[-1])


def test_hidden_names_cannot_be_replaced_or_probed(hidden_tree: tuple[Path, Path], attacker: Attacker) -> None:
    d, lower = hidden_tree
    # every operation that would create or replace a hidden name fails, and with EACCES (not EEXIST: that would
    # say the name exists)
    attacks = {
        "rename over it": f"os.rename({str(d / 'attacker.txt')!r}, {str(d / 'secret4.txt')!r})",
        "hard link to it": f"os.link({str(d / 'attacker.txt')!r}, {str(d / 'secret4.txt')!r})",
        "symlink at it": f"os.symlink('x', {str(d / 'secret4.txt')!r})",
        "mkdir at it": f"os.mkdir({str(d / 'secretdir')!r})",
        "create with O_EXCL": f"os.close(os.open({str(d / 'secret4.txt')!r}, os.O_WRONLY | os.O_CREAT | os.O_EXCL))",
        "create with O_TRUNC": f"os.close(os.open({str(d / 'secret4.txt')!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))",
        "rename a directory over it": f"os.mkdir({str(d / 'dd')!r}); os.rename({str(d / 'dd')!r}, "
                                      f"{str(d / 'secretdir')!r})",
    }
    for what, code in attacks.items():
        assert _errno(attacker, code) == errno.EACCES, what
    r = attacker.python(RENAMEAT2, str(d / "attacker.txt"), str(d / "secret4.txt"), "noreplace")
    assert int(r.stdout) == errno.EACCES, r.stderr
    # removing or replacing a directory whose entries are all hidden: not ENOTEMPTY (which reveals them)
    assert _errno(attacker, f"os.rmdir({str(d / 'only')!r})") == errno.EACCES
    assert _errno(attacker, f"os.mkdir({str(d / 'empty')!r}); os.rename({str(d / 'empty')!r}, "
                            f"{str(d / 'only')!r})") == errno.EACCES
    # a directory with visible entries still says ENOTEMPTY, as it would natively
    assert _errno(attacker, f"os.mkdir({str(d / 'vis')!r}); open({str(d / 'vis' / 'f')!r}, 'w').close(); "
                            f"os.rmdir({str(d / 'vis')!r})") == errno.ENOTEMPTY
    # the link count of the parent does not count the hidden directory
    r = attacker.python(f"import os; s = os.stat({str(d)!r}); print(s.st_nlink, s.st_size)")
    assert r.stdout.split() == ["1", "4096"], r.stderr
    before = attacker.python(f"import os; s = os.stat({str(d / 'only')!r}); print(s.st_nlink, s.st_size)").stdout
    (lower / "only" / "secret.more").write_text("more")  # another hidden entry: nothing changes
    (lower / "only" / "secret.sub").mkdir()
    after = attacker.python(f"import os; s = os.stat({str(d / 'only')!r}); print(s.st_nlink, s.st_size)").stdout
    assert before == after == "1 4096\n"
    # nothing hidden was changed
    assert (lower / "secret4.txt").read_text() == "the hidden data\n"
    assert (lower / "secretdir" / "inner.txt").read_text() == "inner\n"
    assert (lower / "only" / "secret.key").read_text() == "key\n"
    # and the names stay absent for the attacker
    r = attacker.sh(f"ls -a {d} {d}/only; cat {d}/secret4.txt")
    assert "secret" not in r.stdout and "No such file" in r.stderr


def test_moving_directories_under_a_hide_still_works(hidden_tree: tuple[Path, Path], attacker: Attacker) -> None:
    """Hiding is by name: a moved directory keeps its hidden names hidden, so moving is allowed."""
    d, lower = hidden_tree
    r = attacker.sh(f"cd {d} && mv only elsewhere && ls -a elsewhere && cat elsewhere/secret.key")
    assert "secret" not in r.stdout and "No such file" in r.stderr
    assert (lower / "elsewhere" / "secret.key").read_text() == "key\n"
