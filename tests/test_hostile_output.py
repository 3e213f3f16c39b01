"""The hostile-user suite, output: a file name or command line chosen by an attacker must not forge a line or
reach the terminal as an escape sequence in the tools' text output (issue 11, item 14)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SRC, force_unmount, is_mounted, needs_root, wait_for
from hostile import Attacker

from fsfilter.cli import escape_text

FORGED = "x\n12:00:00 root(1) delete shadow"
ESCAPE = "y\x1b]0;owned\x07\x1b[2J"


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain name.txt", "plain name.txt"),
    ("a\nb", "a\\nb"),
    ("tab\there\r", "tab\\there\\r"),
    ("\x1b[31mred", "\\033[31mred"),
    ("back\\slash", "back\\\\slash"),  # so that an escape in the output is never ambiguous
    (os.fsdecode(b"bad\xffbyte"), "bad\\377byte"),
    ("bidi\u202eevil", "bidi\\342\\200\\256evil"),
    ("line\u2028sep", "line\\342\\200\\250sep"),
    ("ünïcödé", "ünïcödé"),
])
def test_escape_text(raw: str, shown: str) -> None:
    assert escape_text(raw) == shown
    assert "\n" not in escape_text(raw) and "\x1b" not in escape_text(raw)


@needs_root
@pytest.mark.timeout(60)
def test_monitor_text_output_cannot_be_forged_by_a_file_name(scratch: Path, attacker: Attacker) -> None:
    d = scratch / "w"
    d.mkdir()
    attacker.give(d)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "fsfilter", "monitor", str(d)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert wait_for(lambda: is_mounted(d) or proc.poll() is not None, 20) and proc.poll() is None
        code = "import sys\nfor n in sys.argv[1:]:\n    open(n, 'w').write('z')\n"
        r = attacker.python(code, str(d / FORGED), str(d / ESCAPE))
        assert r.returncode == 0, r.stderr
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=10)
        force_unmount(d)
    lines = out.splitlines()
    assert not any(line.startswith("12:00:00 root(1)") for line in lines), out
    assert "\x1b" not in out and "\x07" not in out
    assert any("x\\n12:00:00 root(1) delete shadow" in line for line in lines), out
    assert any("y\\033]0;owned\\a\\033[2J" in line for line in lines), out
