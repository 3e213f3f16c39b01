"""Default rules on disk: the rules.d directories, the file format, and where each product's file lives.

A default rule is an access rule the service (fsfilterd) enforces with no application running. They live in one
file per product (``<product>.rules``) in three directories; a file in a later one replaces the file of the same
name in an earlier one, as systemd's configuration directories do:

    /usr/lib/fsfilter/rules.d/   vendor defaults (shipped by a package)
    /run/fsfilter/rules.d/       runtime (gone at reboot)
    /etc/fsfilter/rules.d/       the administrator's; ``add_default_rule`` writes here

An empty file, or a symlink to /dev/null, in a later directory masks the earlier file. The format is documented
in docs/service.md: one rule per line, ``FLAGS MASK``; ``#`` starts a comment; a ``permissive`` line makes the file
log what it would refuse and refuse nothing (for rollouts).

``FSFILTER_ROOT`` (an environment variable) puts all of fsfilter's system directories under another root: for
tests and containers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fsfilter._engine.masks import MaskError, compile_mask
from fsfilter.api import constants as c
from fsfilter.errors import CBFSFilterError

__all__ = ["ACCESS_NAMES", "FORBIDDEN_ATTACH", "RuleFile", "RuleLine", "RulesError", "flags_text", "load_rule_files",
           "edit_default_rules", "parse_rules", "product_file", "root", "rules_dirs", "write_rules",
           "write_text_atomic"]

# Directories a filter never mounts over: the system would stop working, or the directory is virtual.
FORBIDDEN_ATTACH = frozenset({"/", "/proc", "/sys", "/dev", "/usr", "/etc", "/boot", "/bin", "/sbin", "/lib",
                              "/lib64", "/run", "/var", "/tmp"})

# The access flags by the names the format takes: the SDK's constant names and short spellings.
ACCESS_NAMES: dict[str, int] = {
    "read-only": c.ACCESS_READ_ONLY, "write-only": c.ACCESS_WRITE_ONLY, "delete-protect": c.ACCESS_DELETE_PROTECT,
    "execute-protect": c.ACCESS_EXECUTE_PROTECT, "no-change-dac": c.ACCESS_NO_CHANGE_DAC,
    "no-change-owner": c.ACCESS_NO_CHANGE_OWNER, "rename-protect": c.ACCESS_RENAME_PROTECT,
    "delete-only-protect": c.ACCESS_DELETE_ONLY_PROTECT, "remote-access-protect": c.ACCESS_REMOTE_ACCESS_PROTECT,
    "deny-all": c.ACCESS_DENY_ALL,
}
_SDK_NAMES = {"ACCESS_" + name.upper().replace("-", "_"): bit for name, bit in ACCESS_NAMES.items()}

_PRODUCT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_FILE_BYTES = 1 << 20  # a rules file larger than this is refused, not read
MAX_RULES = 4096  # per file
_EDIT_LOCK = threading.Lock()  # read-modify-write of a product's file, one at a time in a process


def root() -> str:
    return os.environ.get("FSFILTER_ROOT", "").rstrip("/")


def rules_dirs() -> list[Path]:
    """The rules.d directories, lowest precedence first."""
    base = root()
    return [Path(base + d) for d in ("/usr/lib/fsfilter/rules.d", "/run/fsfilter/rules.d", "/etc/fsfilter/rules.d")]


class RulesError(Exception):
    """A rules file that cannot be used: ``problems`` are (line number, message)."""

    def __init__(self, path: str, problems: list[tuple[int, str]]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}:{n}: {msg}" for n, msg in problems))


@dataclass(frozen=True)
class RuleLine:
    """One default rule: an absolute mask and its access flags (never 0)."""

    mask: str
    access: int
    line: int = 0


@dataclass
class RuleFile:
    """The rules of one product (one file name), as the highest-precedence directory has it."""

    product: str
    path: str
    rules: list[RuleLine] = field(default_factory=list)
    permissive: bool = False


def flags_text(access: int) -> str:
    """Access flags in the format's spelling (``read-only,delete-protect``)."""
    names = [name for name, bit in ACCESS_NAMES.items() if access & bit]
    rest = access & ~c.ACCESS_KNOWN
    return ",".join(names + ([f"0x{rest:x}"] if rest else []))


def _parse_flags(text: str) -> int:
    access = 0
    for word in re.split(r"[,|]", text):
        word = word.strip()
        bit = ACCESS_NAMES.get(word.lower()) if word.lower() in ACCESS_NAMES else _SDK_NAMES.get(word.upper())
        if bit is None:
            raise ValueError(f"unknown access flag {word!r}: use {', '.join(ACCESS_NAMES)} (or the SDK's ACCESS_* "
                             "names), joined by commas")
        access |= bit
    return access


def check_mask(mask: str) -> None:
    """A default rule's mask must be absolute, valid and under a directory a filter may mount over."""
    try:
        compiled = compile_mask(mask)
    except MaskError as exc:
        raise ValueError(f"bad mask {mask!r}: {exc}") from None
    if compiled.inverted or compiled.process or compiled.name_only or compiled.prefix is None:
        raise ValueError(f"mask {mask!r} does not name a directory: a default rule needs an absolute mask such as "
                         "/srv/data/* (no process part, no inversion)")
    directory = compiled.prefix.rstrip("/") or "/"
    if directory in FORBIDDEN_ATTACH:
        raise ValueError(f"mask {mask!r} would put a filter over {directory}, which fsfilter never mounts over: "
                         "name a directory below it")


def parse_rules(text: str, path: str = "<text>") -> tuple[list[RuleLine], bool]:
    """The rules and the permissive flag of a rules file; RulesError lists every bad line with its number."""
    rules: list[RuleLine] = []
    permissive = False
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower() == "permissive":
            permissive = True
            continue
        flags_part, _, mask = line.partition(" ")
        mask = mask.strip()
        if not mask:
            problems.append((number, f"expected 'FLAGS MASK' (e.g. 'read-only /srv/data/*'), got {line!r}"))
            continue
        try:
            access = _parse_flags(flags_part)
            check_mask(mask)
        except ValueError as exc:
            problems.append((number, str(exc)))
            continue
        if mask in seen:
            problems.append((number, f"mask {mask!r} is already on line {seen[mask]}: put all its flags on one line"))
            continue
        seen[mask] = number
        rules.append(RuleLine(mask, access, number))
        if len(rules) > MAX_RULES:
            problems.append((number, f"more than {MAX_RULES} rules in one file"))
            break
    if problems:
        raise RulesError(path, problems)
    return rules, permissive


def read_rules_file(path: Path) -> RuleFile:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise RulesError(str(path), [(0, f"larger than {MAX_FILE_BYTES} bytes")])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError(str(path), [(0, f"not UTF-8 text: {exc}")]) from None
    rules, permissive = parse_rules(text, str(path))
    return RuleFile(path.stem, str(path), rules, permissive)


def load_rule_files() -> tuple[list[RuleFile], list[RulesError]]:
    """Every product's rules, the later directory winning per file name; files that fail to parse are returned
    apart (the service keeps enforcing the others, and says which files it skipped)."""
    chosen: dict[str, Path] = {}
    for directory in rules_dirs():
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        for name in names:
            if name.endswith(".rules") and not name.startswith("."):
                chosen[name] = directory / name
    files: list[RuleFile] = []
    errors: list[RulesError] = []
    for name in sorted(chosen):
        path = chosen[name]
        try:
            if path.is_symlink() and os.readlink(path) == "/dev/null":
                continue  # masked
            files.append(read_rules_file(path))
        except RulesError as exc:
            errors.append(exc)
        except OSError as exc:
            errors.append(RulesError(str(path), [(0, exc.strerror or str(exc))]))
    return files, errors


def product_file(product_guid: str) -> Path:
    """The administrator's rules file of a product (where add_default_rule writes)."""
    name = product_guid.strip().strip("{}") or "default"
    if not _PRODUCT.fullmatch(name):
        raise CBFSFilterError(errno.EINVAL, f"product_guid {product_guid!r} cannot name a rules file: use letters, "
                                            "digits, '.', '_' and '-' (braces are dropped)")
    return rules_dirs()[-1] / f"{name}.rules"


def write_rules(path: Path, rules: list[RuleLine], permissive: bool = False) -> None:
    """Replace a rules file atomically."""
    lines = ["# fsfilter default rules: FLAGS MASK per line (see docs/service.md). Written by add_default_rule."]
    if permissive:
        lines.append("permissive")
    lines += [f"{flags_text(r.access)} {r.mask}" for r in rules]
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a file so that a reader sees the old one or the new one, never half of one (a temporary file of a
    name no one else can take, synced, then renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # O_EXCL, 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def edit_default_rules(product_guid: str, mask: str, access: int | None) -> bool:
    """Add (``access``) or delete (None) one default rule in the product's file under /etc/fsfilter/rules.d.
    Adding to a mask that has a rule ORs the flags in, as add_filter_rule does."""
    path = product_file(product_guid)
    try:
        check_mask(mask)
    except ValueError as exc:
        raise CBFSFilterError(errno.EINVAL, str(exc)) from None
    if access is not None and (access <= 0 or access & ~c.ACCESS_KNOWN):
        raise CBFSFilterError(errno.EINVAL, f"access_flags 0x{access:x} are not ACCESS_* flags (a default rule needs "
                                            "at least one)")
    with _EDIT_LOCK:
        return _edit_locked(path, mask, access)


def _edit_locked(path: Path, mask: str, access: int | None) -> bool:
    # Start from the file in force for the product: /etc's copy replaces a vendor or runtime file of the same
    # name, so it must keep their rules.
    source = next((d / path.name for d in reversed(rules_dirs()) if (d / path.name).is_file()), path)
    try:
        current = read_rules_file(source)
        rules, permissive = list(current.rules), current.permissive
    except FileNotFoundError:
        rules, permissive = [], False
    except RulesError as exc:
        raise CBFSFilterError(errno.EINVAL, f"{path} has errors; fix them first:\n{exc}") from None
    old = {r.mask: r for r in rules}
    if access is None:
        if mask not in old:
            return False
        rules = [r for r in rules if r.mask != mask]
    else:
        merged = (old[mask].access if mask in old else 0) | access
        if mask in old and merged == old[mask].access:
            return False
        rules = [r for r in rules if r.mask != mask] + [RuleLine(mask, merged)]
    write_rules(path, rules, permissive)
    return True
