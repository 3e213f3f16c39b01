"""File masks: the SDK's mask syntax, parsed once and matched against paths and processes.

Forms (the product's documented rules)::

    MASK              path mask, for requests from every process
    ||MASK            inverted: every path that MASK does not match
    PROC|MASK         only requests from processes PROC matches (MASK may itself be ``||MASK``)
    ~PROC|MASK        requests from every process PROC does not match

``PROC`` is a pid when it is all decimal digits; otherwise a pattern with ``?``/``*`` matched against
the executable's full path when it contains ``/``, else against the process name (comm) or the
executable's basename.

The path part is case-sensitive. Without ``/`` it is a name mask, matched against the last component
of the path at any depth. With ``/`` it must start with ``/`` or ``*`` and is matched against the whole
absolute path: ``*`` matches any run of characters including ``/`` (so rules are recursive), ``?``
exactly one character other than ``/``. A component ending in ``.*`` also matches the same text
without the dot (``foo.*`` matches ``foo``; ``*.*`` matches every name), as on DOS. A trailing ``/``
is dropped. Every other character is literal: there is no escape character.

Matching compiles each mask once to a regular expression whose wildcards cannot backtrack into each
other (atomic groups), so a match costs O(len(path) * len(mask)) at worst, never exponential time.
"""

from __future__ import annotations

import errno
import functools
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "FileMask",
    "MaskError",
    "ProcessLike",
    "ProcessSpec",
    "compile_mask",
    "file_matches_mask",
    "moves_with_directory",
]

# Beyond this many spellings (2 per component ending in ".*") a mask is matched by a position-set
# simulation instead of one regex per spelling, to keep the cost linear in the mask's size.
_MAX_ALTERNATIVES = 8

#: A compiled path-part matcher: truthy when the whole subject matches.
Matcher = Callable[[str], object]


class MaskError(ValueError):
    """A mask that cannot be parsed; ``code`` is EINVAL, ``message`` says what to change."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = errno.EINVAL
        self.message = message


class ProcessLike(Protocol):
    """What a process mask needs to know about the requesting process.

    ``name`` and ``exe`` may be computed lazily (they cost a /proc read): they are only read when a
    name pattern needs them, never for a pid-only mask.
    """

    @property
    def pid(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def exe(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """The process part of a mask: a pid or a name/path pattern, possibly negated with ``~``."""

    negate: bool
    pid: int | None
    pattern: str | None

    def matches(self, pid: int, info: ProcessLike) -> bool:
        """Whether a request from process ``pid`` (described by ``info``) is concerned by this spec."""
        if self.pid is not None:
            return (pid == self.pid) != self.negate
        pattern = self.pattern or ""
        match = _process_matcher(pattern)
        if "/" in pattern:
            exe = info.exe
            hit = bool(exe) and bool(match(exe))
        else:
            # comm is the cheaper fact and usually enough; the exe basename covers names longer than comm's 15
            hit = bool(match(info.name))
            if not hit:
                exe = info.exe
                hit = bool(exe) and bool(match(exe[exe.rfind("/") + 1:]))
        return hit != self.negate

    def __str__(self) -> str:
        body = str(self.pid) if self.pid is not None else (self.pattern or "")
        return ("~" if self.negate else "") + body


@dataclass(frozen=True, slots=True)
class FileMask:
    """A parsed mask. Build it with :func:`compile_mask`.

    ``path_mask`` is the normalised path part (no inversion, no trailing ``/``); ``prefix`` is the
    directory whose subtree the mask can concern (None when it can match anywhere); ``literal`` is true
    when the path part has no wildcard.
    """

    text: str
    inverted: bool
    process: ProcessSpec | None
    path_mask: str
    prefix: str | None
    name_only: bool
    literal: bool
    _match: Matcher = field(repr=False, compare=False)

    def matches_path(self, path: str) -> bool:
        """Whether the path part (inversion applied) matches the absolute, normalised ``path``."""
        subject = path[path.rfind("/") + 1:] if self.name_only else path
        return bool(self._match(subject)) != self.inverted

    def matches_process(self, process: ProcessLike | None) -> bool:
        """Whether the process part admits ``process`` (None: unknown or the kernel itself)."""
        spec = self.process
        if spec is None:
            return True
        if process is None:
            # an unknown process is no particular process: only "all but X" masks take it in
            return spec.negate
        return spec.matches(process.pid, process)

    def matches(self, path: str, process: ProcessLike | None) -> bool:
        """Whether a request on ``path`` from ``process`` is concerned by this mask."""
        # path first: it never touches the process's lazily read name and exe
        return self.matches_path(path) and self.matches_process(process)

    def __str__(self) -> str:
        return self.text


def compile_mask(text: str) -> FileMask:
    """Parse ``text`` into a :class:`FileMask` (cached); raise :class:`MaskError` when it is not valid."""
    if not isinstance(text, str):
        raise MaskError(f"a mask must be a str, not {type(text).__name__}: decode bytes paths first")
    return _compile_mask(text)


def file_matches_mask(mask: str, file_name: str, case_sensitive: bool = True) -> bool:
    """Whether the path part of ``mask`` (inversion applied) matches ``file_name``.

    A name mask is matched against the last component of ``file_name``, an absolute mask against the
    whole of it. ``case_sensitive=False`` folds case on both sides. The process part is ignored.
    """
    fm = compile_mask(mask)
    if case_sensitive:
        return fm.matches_path(file_name)
    subject = file_name[file_name.rfind("/") + 1:] if fm.name_only else file_name
    return bool(_folded_matcher(fm.path_mask)(subject)) != fm.inverted



def moves_with_directory(fm: FileMask, old: str, new: str) -> bool:
    """Whether moving the directory ``old`` to ``new`` (absolute, normalised) leaves the mask's verdict on
    every path below it unchanged: ``old/r`` matches exactly when ``new/r`` does, for every non-empty ``r``.

    Decided from the mask's text alone, conservatively: True only when it provably holds. It does for name
    masks (the names below do not change), for masks that can match nothing below either place, and for a
    mask whose fixed part lies above both places and whose rest is ``*`` followed by at most one
    component's worth of text (``/data/*``, ``/data/*.csv``, ``*/report.pdf``): those look only at the
    end of the path. Inversion does not change the answer (the complement moves with the mask).
    """
    if fm.name_only:
        return True
    return all(_spelling_moves(spelling, old, new) for spelling in _spellings(fm.path_mask, True))


def _spelling_moves(pattern: str, old: str, new: str) -> bool:
    wild = [i for i in (pattern.find("*"), pattern.find("?")) if i >= 0]
    if not wild:  # a literal path: below one of the places, it names a file in one place only
        return not (pattern.startswith(old + "/") or pattern.startswith(new + "/"))
    head = pattern[: min(wild)]  # every path the mask matches starts with this text
    reach = []
    for place in (old, new):
        below = place + "/"
        if head.startswith(below):
            return False  # the mask is anchored inside one of the places
        reach.append(below.startswith(head))
    if not any(reach):
        return True  # nothing below either place can match
    if not all(reach):
        return False  # paths below one place can match, below the other none can
    tail = pattern[len(head):]
    if tail == "*":
        return True
    # "*S": whether a path matches depends on its last len(S) characters only, and those lie in the last
    # component (S has no "/", or only one in front: "?" never matches "/").
    if not tail.startswith("*") or "*" in tail[1:]:
        return False
    rest = tail[1:]
    return "/" not in (rest[1:] if rest.startswith("/") else rest)

# ---------------------------------------------------------------------------------------------- parsing


@functools.lru_cache(maxsize=16384)
def _compile_mask(text: str) -> FileMask:
    if not text:
        raise MaskError("empty mask: give a path mask such as '/data/*' or '*.txt'")
    if "\0" in text:
        raise MaskError(f"mask {text!r} contains a NUL character, which no path can contain: remove it")
    process: ProcessSpec | None = None
    if text.startswith("||"):
        inverted, rest = True, text[2:]
    elif "|" in text:
        proc, rest = text.split("|", 1)
        process = _parse_process(proc, text)
        inverted = rest.startswith("||")
        if inverted:
            rest = rest[2:]
    else:
        inverted, rest = False, text
    path_mask, name_only = _parse_path(rest, text)
    literal = "*" not in path_mask and "?" not in path_mask
    prefix = None if inverted or name_only or not path_mask.startswith("/") else _fixed_prefix(path_mask, literal)
    match: Matcher = path_mask.__eq__ if literal else _compile_glob(path_mask)
    return FileMask(text, inverted, process, path_mask, prefix, name_only, literal, match)


def _parse_process(proc: str, text: str) -> ProcessSpec:
    if not proc:
        raise MaskError(
            f"mask {text!r} has an empty process part before '|': name a process ('bash|/a/*'), "
            "a pid ('123|/a/*'), or start with '||' for an inverted mask ('||/a/*')"
        )
    negate = proc.startswith("~")
    body = proc[1:] if negate else proc
    if not body:
        raise MaskError(f"mask {text!r} has '~' with no process after it: write '~NAME|MASK' or '~PID|MASK'")
    if body.isascii() and body.isdigit():
        return ProcessSpec(negate, int(body), None)
    return ProcessSpec(negate, None, body)


def _parse_path(part: str, text: str) -> tuple[str, bool]:
    """Validate and normalise the path part; return it and whether it is a name-only mask."""
    if not part:
        raise MaskError(f"mask {text!r} has an empty path part: add one, e.g. '{text}*' to match everything")
    if "/" not in part:
        if part in (".", ".."):
            raise MaskError(f"mask {text!r} names {part!r}, which is never a file name: use a real name or '*'")
        return part, True
    if not part.startswith(("/", "*")):
        raise MaskError(
            f"mask {text!r} has a relative path part {part!r}: start it with '/' (absolute) or '*' "
            f"('*/{part}' for any depth), or drop the directories to match a name anywhere"
        )
    if "//" in part:
        raise MaskError(f"mask {text!r} has an empty path component ('//'): write one '/' between components")
    if part == "/":
        return part, False
    if part.endswith("/"):
        part = part[:-1]
    for comp in part.split("/"):
        if comp in (".", ".."):
            raise MaskError(
                f"mask {text!r} has a {comp!r} component: paths are matched as given, normalised; "
                "write the directory it stands for"
            )
    return part, False


def _fixed_prefix(path_mask: str, literal: bool) -> str:
    """The directory before the first wildcard (a literal mask: its parent), on a '/' boundary."""
    if path_mask == "/":
        return "/"
    head = path_mask
    if not literal:
        head = path_mask[: min(i for i in (path_mask.find("*"), path_mask.find("?")) if i >= 0)]
    return head[: head.rfind("/")] or "/"


# --------------------------------------------------------------------------------------------- matching


def _spellings(pattern: str, dos: bool) -> list[str]:
    """Plain globs whose union is ``pattern``: each component ending in ``.*`` also without it."""
    choices: list[tuple[str, ...]] = []
    for comp in pattern.split("/"):
        if dos and comp.endswith(".*"):
            stem = comp[:-2]
            # "X*.*" is contained in "X*", so only the shorter spelling is needed
            choices.append((stem,) if stem.endswith("*") else (comp, stem))
        else:
            choices.append((comp,))
    return list(dict.fromkeys("/".join(c) for c in itertools.product(*choices)))


def _segment_regex(segment: str) -> str:
    return "".join("[^/]" if ch == "?" else re.escape(ch) for ch in segment)


def _glob_regex(glob: str) -> str:
    """One glob as a regex where each ``*`` commits to the leftmost next segment.

    Committing is safe because a later ``*`` can absorb whatever a later choice would have skipped;
    it makes the match linear instead of exploring every split between consecutive stars. The last
    segment has to end the subject, so it is left to ordinary (bounded) backtracking.
    """
    segments = [_segment_regex(s) for s in re.split(r"\*+", glob)]
    if len(segments) == 1:
        return segments[0]
    middle = "".join(f"(?>.*?{s})" for s in segments[1:-1])
    return f"{segments[0]}{middle}.*{segments[-1]}"


def _compile_glob(pattern: str, ignore_case: bool = False, dos: bool = True,
                  max_alternatives: int = _MAX_ALTERNATIVES) -> Matcher:
    """Compile a path part (or process pattern) to a matcher of whole subjects."""
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)  # DOTALL: names may contain newlines
    spellings = _spellings(pattern, dos)
    if len(spellings) <= max_alternatives:
        regex = "|".join(f"(?:{_glob_regex(s)})" for s in spellings)
        return re.compile(regex, flags).fullmatch
    return _Simulation(pattern, flags, dos)


class _Simulation:
    """Matcher for masks with many ``.*`` components: walks the mask once over sets of string positions.

    After any ``*`` the reachable positions are "every position from p on", kept as one number, so each
    step costs O(len(subject) * len(segment)) whatever the number of optional ``.*`` groups.
    """

    __slots__ = ("_steps",)

    _STAR = 0
    _OPTIONAL_DOT_STAR = 1

    def __init__(self, pattern: str, flags: int, dos: bool = True) -> None:
        # steps: (regex of a fixed-length segment, its length) or one of the two markers
        self._steps: list[tuple[re.Pattern[str], int] | int] = []
        text = ""
        for i, comp in enumerate(pattern.split("/")):
            if i:
                text += "/"
            if not (dos and comp.endswith(".*")):
                text += comp
            elif comp[:-2].endswith("*"):
                text += comp[:-2]  # "X*.*" is "X*", as in _spellings
            else:
                self._add(text + comp[:-2], flags)
                self._steps.append(self._OPTIONAL_DOT_STAR)
                text = ""
        self._add(text, flags)

    def _add(self, glob: str, flags: int) -> None:
        for i, segment in enumerate(re.split(r"(\*+)", glob)):
            if i % 2:
                self._steps.append(self._STAR)
            elif segment:
                self._steps.append((re.compile(_segment_regex(segment), flags), len(segment)))

    def __call__(self, subject: str) -> bool:
        n = len(subject)
        exact: set[int] = {0}
        floor: int | None = None  # every position >= floor is reachable
        for step in self._steps:
            if isinstance(step, tuple):
                regex, length = step
                starts = set(exact)
                if floor is not None:
                    starts.update(range(floor, n - length + 1))
                exact = {q + length for q in starts if regex.match(subject, q)}
                floor = None
                if not exact:
                    return False
            elif step == self._STAR:
                lowest = min(exact, default=n + 1)
                floor = lowest if floor is None else min(floor, lowest)
                exact = set()
            elif step == self._OPTIONAL_DOT_STAR:
                dots = [q for q in exact if q < n and subject[q] == "."]
                if dots:
                    after = min(dots) + 1
                    floor = after if floor is None else min(floor, after)
        return n in exact or (floor is not None and floor <= n)


@functools.lru_cache(maxsize=4096)
def _process_matcher(pattern: str) -> Matcher:
    # process patterns are plain globs: the ".*" convention is about file names
    return _compile_glob(pattern, dos=False)


@functools.lru_cache(maxsize=4096)
def _folded_matcher(path_mask: str) -> Matcher:
    return _compile_glob(path_mask, ignore_case=True)
