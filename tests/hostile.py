"""Support for the hostile-user suite (tests/test_hostile_*.py): a real unprivileged user, created for the test
session and removed after it, who runs the attacks.

The attacker runs the system's Python (/usr/bin/python3), not the test interpreter, which may live under a
directory only root can enter; attacks use only the standard library."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class Attacker:
    """An unprivileged user with no supplementary groups and no home directory."""

    name: str
    uid: int
    gid: int

    def argv(self, *argv: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--reset-env", "--",
                *argv]

    def run(self, *argv: str, timeout: float = 60, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as the attacker; output is captured as text."""
        return subprocess.run(self.argv(*argv), capture_output=True, text=True, timeout=timeout, check=check,
                              input=input, cwd="/")

    def sh(self, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-c", script, timeout=timeout)

    def python(self, code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run(SYSTEM_PYTHON, "-c", code, *args, timeout=timeout)

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd="/")

    def give(self, *paths: str | os.PathLike[str]) -> None:
        """Make the attacker the owner of ``paths`` (what they own, DAC lets them change: only the rule stops
        them)."""
        for p in paths:
            os.lchown(p, self.uid, self.gid)


@contextlib.contextmanager
def temporary_user() -> Iterator[Attacker]:
    """A user made for the duration of the block (useradd), removed afterwards (userdel) even on failure."""
    name = f"fsfatk{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
                    "/usr/sbin/nologin", "--user-group", name], check=True, capture_output=True)
    try:
        out = subprocess.run(["id", "-u", name], check=True, capture_output=True, text=True).stdout
        uid = int(out)
        gid = int(subprocess.run(["id", "-g", name], check=True, capture_output=True, text=True).stdout)
        yield Attacker(name, uid, gid)
    finally:
        # Processes of the user are the test's own (it started them all): end them before the user goes.
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
        subprocess.run(["userdel", name], capture_output=True)
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["groupdel", name], capture_output=True)

