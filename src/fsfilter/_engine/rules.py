"""Rule sets and the decision of which flags a request on a path carries.

A :class:`RuleSet` holds filter rules (mask + access/control/notify flags + optional qualifiers) in
insertion order, indexed so that finding the rules that can match a path costs O(depth of the path),
not O(number of rules). :func:`match_path` matches one path against a standard and a passthrough set
once; the resulting :class:`PathMatch` is cheap to keep per inode and answers per request.

Attribute qualifiers keep the SDK's ``FILE_SYS_ATTR_*`` names; on Linux they mean:

=====================================  ======  ===================================================
name                                   value   set when
=====================================  ======  ===================================================
FILE_SYS_ATTR_READ_ONLY                0x1     no write permission bit is set for anyone
FILE_SYS_ATTR_HIDDEN                   0x2     the name starts with ``.``
FILE_SYS_ATTR_SYSTEM                   0x4     not a regular file, directory or symlink (device,
                                               fifo, socket)
FILE_SYS_ATTR_DIRECTORY                0x10    a directory
FILE_SYS_ATTR_ARCHIVE                  0x20    a regular file
FILE_SYS_ATTR_NORMAL                   0x80    a regular file with none of READ_ONLY, HIDDEN,
                                               SPARSE_FILE (ARCHIVE, always set on regular files,
                                               does not count)
FILE_SYS_ATTR_TEMPORARY                0x100   never (Linux has no such flag)
FILE_SYS_ATTR_SPARSE_FILE              0x200   a regular file with st_blocks * 512 < st_size
FILE_SYS_ATTR_REPARSE_POINT            0x400   a symlink
FILE_SYS_ATTR_COMPRESSED               0x800   never
FILE_SYS_ATTR_OFFLINE                  0x1000  never
FILE_SYS_ATTR_NOT_CONTENT_INDEXED      0x2000  never
FILE_SYS_ATTR_ENCRYPTED                0x4000  never
=====================================  ======  ===================================================
"""

from __future__ import annotations

import itertools
import stat
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Protocol

from fsfilter._engine.masks import FileMask, ProcessLike, compile_mask, moves_with_directory

__all__ = [
    "FILE_SYS_ATTR_ARCHIVE",
    "FILE_SYS_ATTR_COMPRESSED",
    "FILE_SYS_ATTR_DIRECTORY",
    "FILE_SYS_ATTR_ENCRYPTED",
    "FILE_SYS_ATTR_HIDDEN",
    "FILE_SYS_ATTR_NORMAL",
    "FILE_SYS_ATTR_NOT_CONTENT_INDEXED",
    "FILE_SYS_ATTR_OFFLINE",
    "FILE_SYS_ATTR_READ_ONLY",
    "FILE_SYS_ATTR_REPARSE_POINT",
    "FILE_SYS_ATTR_SPARSE_FILE",
    "FILE_SYS_ATTR_SYSTEM",
    "FILE_SYS_ATTR_TEMPORARY",
    "FileFacts",
    "Flags",
    "PathMatch",
    "Rule",
    "RuleSet",
    "attributes_from_stat",
    "match_path",
]

FILE_SYS_ATTR_READ_ONLY = 0x1
FILE_SYS_ATTR_HIDDEN = 0x2
FILE_SYS_ATTR_SYSTEM = 0x4
FILE_SYS_ATTR_DIRECTORY = 0x10
FILE_SYS_ATTR_ARCHIVE = 0x20
FILE_SYS_ATTR_NORMAL = 0x80
FILE_SYS_ATTR_TEMPORARY = 0x100
FILE_SYS_ATTR_SPARSE_FILE = 0x200
FILE_SYS_ATTR_REPARSE_POINT = 0x400
FILE_SYS_ATTR_COMPRESSED = 0x800
FILE_SYS_ATTR_OFFLINE = 0x1000
FILE_SYS_ATTR_NOT_CONTENT_INDEXED = 0x2000
FILE_SYS_ATTR_ENCRYPTED = 0x4000

_FLAG_LIMIT = 1 << 64  # control flags are 64-bit; no flag word is wider


def attributes_from_stat(mode: int, size: int, blocks: int, name: str) -> int:
    """The ``FILE_SYS_ATTR_*`` bits of a file from its stat fields and name (see the module's table).

    ``name`` may be a path: only its last component counts.
    """
    attrs = 0
    if not mode & 0o222:
        attrs |= FILE_SYS_ATTR_READ_ONLY
    if name[name.rfind("/") + 1:].startswith("."):
        attrs |= FILE_SYS_ATTR_HIDDEN
    if stat.S_ISDIR(mode):
        attrs |= FILE_SYS_ATTR_DIRECTORY
    elif stat.S_ISREG(mode):
        attrs |= FILE_SYS_ATTR_ARCHIVE
        if blocks * 512 < size:
            attrs |= FILE_SYS_ATTR_SPARSE_FILE
        if not attrs & (FILE_SYS_ATTR_READ_ONLY | FILE_SYS_ATTR_HIDDEN | FILE_SYS_ATTR_SPARSE_FILE):
            attrs |= FILE_SYS_ATTR_NORMAL
    elif stat.S_ISLNK(mode):
        attrs |= FILE_SYS_ATTR_REPARSE_POINT
    else:
        attrs |= FILE_SYS_ATTR_SYSTEM
    return attrs


@dataclass(frozen=True, slots=True)
class Flags:
    """The three flag words of a rule or a decision."""

    access: int = 0
    control: int = 0
    notify: int = 0

    def __or__(self, other: Flags) -> Flags:
        return Flags(self.access | other.access, self.control | other.control, self.notify | other.notify)

    def __sub__(self, other: Flags) -> Flags:
        """The bits of ``self`` that ``other`` does not have."""
        return Flags(self.access & ~other.access, self.control & ~other.control, self.notify & ~other.notify)

    def __bool__(self) -> bool:
        return bool(self.access or self.control or self.notify)


NO_FLAGS = Flags()


class FileFacts(Protocol):
    """Facts about the file a request concerns, computed lazily: asked only when a rule has qualifiers.

    Implementations should cache: several rules may ask for the same fact.
    """

    def size(self) -> int | None: ...

    def attributes(self) -> int | None: ...

    def has_xattr(self, name: str) -> bool: ...


@dataclass(eq=False)
class Rule:
    """One filter rule. Flags change in place when rules with the same mask and qualifiers aggregate."""

    mask: str
    compiled: FileMask
    access: int
    control: int
    notify: int
    ea_name: str = ""
    min_size: int = -1
    max_size: int = -1
    included_attributes: int = 0
    excluded_attributes: int = 0
    seq: int = field(default=0, repr=False)  # insertion order, to report candidates in rule order

    @property
    def flags(self) -> Flags:
        return Flags(self.access, self.control, self.notify)

    @property
    def has_qualifiers(self) -> bool:
        return bool(self.ea_name or self.min_size >= 0 or self.max_size >= 0
                    or self.included_attributes or self.excluded_attributes)

    @property
    def conditional(self) -> bool:
        """Whether applying depends on more than the path (a process part or qualifiers)."""
        return self.compiled.process is not None or self.has_qualifiers

    def qualifiers_hold(self, facts: FileFacts | None) -> bool:
        """Whether the size, attribute and extended-attribute qualifiers hold for the file."""
        if not self.has_qualifiers:
            return True
        if facts is None:
            return False
        # cheapest facts first: size and attributes come from one stat, an xattr needs its own call
        if self.min_size >= 0 or self.max_size >= 0:
            size = facts.size()
            if size is None or (self.min_size >= 0 and size < self.min_size) or \
                    (self.max_size >= 0 and size > self.max_size):
                return False
        if self.included_attributes or self.excluded_attributes:
            attrs = facts.attributes()
            if attrs is None or attrs & self.included_attributes != self.included_attributes or \
                    attrs & self.excluded_attributes:
                return False
        return not self.ea_name or facts.has_xattr(self.ea_name)

    def applies(self, process: ProcessLike | None, facts: FileFacts | None) -> bool:
        """Whether the rule applies to a request from ``process`` on a file it already matches by path."""
        return self.compiled.matches_process(process) and self.qualifiers_hold(facts)


def _check_flag(name: str, value: int, allow_all: bool = False) -> None:
    if allow_all and value == -1:
        return
    if not isinstance(value, int) or not 0 <= value < _FLAG_LIMIT:
        also = " or -1 for all bits" if allow_all else ""
        raise ValueError(f"{name} flags must be a mask of bits between 0 and 2**64-1{also}, not {value!r}")


_Key = tuple[str, str, int, int, int, int]
_set_serials = itertools.count()
_Bucket = dict[int, Rule]  # seq -> rule, in insertion order, O(1) removal


class RuleSet:
    """Filter rules in insertion order, indexed for lookup by path.

    ``generation`` grows on every change, so callers can cache decisions keyed by it.
    """

    def __init__(self) -> None:
        self.generation = 0
        self.serial = next(_set_serials)  # unique for the life of the process, unlike id()
        self._reset()

    def _reset(self) -> None:
        self._rules: _Bucket = {}
        self._listed: list[Rule] | None = None  # self._rules as a list, for indexing; rebuilt lazily
        self._next_seq = 0
        self._by_key: dict[_Key, Rule] = {}
        self._by_text: dict[str, _Bucket] = {}
        # the indexes: every rule is in exactly one of them
        self._exact: dict[str, _Bucket] = {}  # literal absolute masks, by path
        self._by_name: dict[str, _Bucket] = {}  # literal name masks, by name
        self._by_prefix: dict[str, _Bucket] = {}  # other absolute masks, by fixed prefix
        self._unanchored: _Bucket = {}  # inverted, "*/..." and wildcard name masks
        self._prefix_counts: dict[str, int] = {}
        self._unanchored_count = 0
        self._anchors: list[str] | None = None  # sorted keys of _exact and _by_prefix; rebuilt lazily

    # ------------------------------------------------------------------------------------ changes

    def add(self, mask: str, access: int, control: int, notify: int, ea_name: str = "", min_size: int = -1,
            max_size: int = -1, included_attributes: int = 0, excluded_attributes: int = 0) -> bool:
        """Add a rule, or OR the flags into the rule with the same mask text and qualifiers.

        Return whether anything changed. Raise MaskError for a bad mask, ValueError for bad flags or
        qualifiers. A rule with no flags at all is validated but not stored.
        """
        compiled = compile_mask(mask)
        _check_flag("access", access)
        _check_flag("control", control)
        _check_flag("notify", notify)
        _check_flag("included attribute", included_attributes)
        _check_flag("excluded attribute", excluded_attributes)
        if not isinstance(ea_name, str) or "\0" in ea_name:
            raise ValueError(f"ea_name must be an extended attribute name without NUL, not {ea_name!r}")
        for what, size in (("min_size", min_size), ("max_size", max_size)):
            if not isinstance(size, int) or size < -1:
                raise ValueError(f"{what} must be -1 (unused) or a size in bytes >= 0, not {size!r}")
        if min_size >= 0 and max_size >= 0 and min_size > max_size:
            raise ValueError(f"min_size {min_size} is above max_size {max_size}: no file could match; swap them")
        key: _Key = (mask, ea_name, min_size, max_size, included_attributes, excluded_attributes)
        rule = self._by_key.get(key)
        if rule is not None:
            new = (rule.access | access, rule.control | control, rule.notify | notify)
            if new == (rule.access, rule.control, rule.notify):
                return False
            rule.access, rule.control, rule.notify = new
        else:
            if not (access or control or notify):
                return False
            rule = Rule(mask, compiled, access, control, notify, ea_name, min_size, max_size,
                        included_attributes, excluded_attributes, seq=self._next_seq)
            self._next_seq += 1
            self._insert(rule, key)
        self._changed()
        return True

    def delete(self, mask: str, access: int, control: int, notify: int) -> bool:
        """Clear the given flags (-1: all bits) in every rule with this mask text; drop rules left empty.

        Return whether a rule changed or was removed.
        """
        compile_mask(mask)
        _check_flag("access", access, allow_all=True)
        _check_flag("control", control, allow_all=True)
        _check_flag("notify", notify, allow_all=True)
        changed = False
        for rule in list(self._by_text.get(mask, {}).values()):
            # ~(-1) == 0, so -1 clears every bit without a special case
            new = (rule.access & ~access, rule.control & ~control, rule.notify & ~notify)
            if new == (rule.access, rule.control, rule.notify):
                continue
            changed = True
            rule.access, rule.control, rule.notify = new
            if new == (0, 0, 0):
                self._remove(rule)
        if changed:
            self._changed()
        return changed

    def clear(self) -> bool:
        """Remove every rule; return whether there was any."""
        if not self._rules:
            return False
        self._reset()
        self._changed()
        return True

    # ------------------------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._rules)

    def __getitem__(self, index: int) -> Rule:
        if self._listed is None:
            self._listed = list(self._rules.values())
        return self._listed[index]

    def __iter__(self) -> Iterator[Rule]:
        return iter(list(self._rules.values()))

    def candidates(self, path: str) -> list[Rule]:
        """The rules whose path part matches ``path`` (absolute, normalised), in rule order.

        Process parts and qualifiers are not checked. Only the index entries of ``path`` itself, its
        name and its ancestors are looked at, plus the rules that can match anywhere.
        """
        found: list[Rule] = []
        exact = self._exact.get(path)
        if exact:
            found.extend(exact.values())
        named = self._by_name.get(path[path.rfind("/") + 1:])
        if named:
            found.extend(named.values())
        if self._by_prefix:
            # a fixed prefix P concerns only paths under P, so only the ancestors' entries can hold matches
            end = 0
            while end != -1:
                bucket = self._by_prefix.get(path[:end] or "/")
                if bucket:
                    found.extend(r for r in bucket.values() if r.compiled.matches_path(path))
                end = path.find("/", end + 1)
        for rule in self._unanchored.values():
            if rule.compiled.matches_path(path):
                found.append(rule)
        if len(found) > 1:
            found.sort(key=attrgetter("seq"))
        return found

    def may_reach(self, path: str) -> bool:
        """Whether some rule could match ``path`` (absolute, normalised) or a path below it.

        False lets a caller treat a whole subtree as unfiltered after one check of its top. Process parts
        and qualifiers are not looked at: a rule that could match for some process or file counts.
        """
        if self._unanchored or self._by_name or self._prefix_at_or_above(path) or path in self._exact:
            return True
        below = path if path.endswith("/") else path + "/"
        anchors = self._sorted_anchors()
        i = bisect_left(anchors, below)
        return i < len(anchors) and anchors[i].startswith(below)  # a rule anchored below the path

    def may_match_child(self, directory: str) -> bool:
        """Whether some rule could match a name directly in ``directory`` (absolute, normalised)."""
        if self._unanchored or self._by_name or self._prefix_at_or_above(directory):
            return True
        below = directory if directory.endswith("/") else directory + "/"
        anchors = self._sorted_anchors()
        for i in range(bisect_left(anchors, below), len(anchors)):
            key = anchors[i]
            if not key.startswith(below):
                break
            if "/" not in key[len(below):] and key in self._exact:
                return True
        return False

    def relocation_rule(self, old: str, new: str, access: int, control: int) -> Rule | None:
        """A rule with any of the ``access`` or ``control`` flags whose verdict on some path below the directory
        ``old`` could differ from its verdict on the same relative path below ``new``: moving the directory would
        carry files into or out of the rule. None when every such rule judges both places alike.

        Decided from the masks (their fixed parts and what follows them), never by walking the tree; only
        index entries at, above or below the two places are looked at, plus the rules that can match anywhere.
        """
        for rule in self._relocation_candidates(old, new):
            if (rule.access & access or rule.control & control) and not moves_with_directory(rule.compiled, old, new):
                return rule
        return None

    def _relocation_candidates(self, old: str, new: str) -> Iterator[Rule]:
        yield from list(self._unanchored.values())  # literal name masks (_by_name) always move with a directory
        anchors = self._sorted_anchors()
        for place in (old, new):
            below = place + "/"
            for i in range(bisect_left(anchors, below), len(anchors)):
                key = anchors[i]
                if not key.startswith(below):
                    break
                yield from list(self._exact.get(key, {}).values())
                yield from list(self._by_prefix.get(key, {}).values())
            end = 0
            while end != -1:  # prefixes at the place and above it
                yield from list(self._by_prefix.get(place[:end] or "/", {}).values())
                end = place.find("/", end + 1)
            yield from list(self._by_prefix.get(place, {}).values())

    def _prefix_at_or_above(self, path: str) -> bool:
        """Whether a fixed prefix is ``path`` or one of its ancestors (prefix keys are directories)."""
        if path in self._by_prefix:
            return True
        end = 0
        while end != -1 and end < len(path):
            if (path[:end] or "/") in self._by_prefix:
                return True
            end = path.find("/", end + 1)
        return False

    def _sorted_anchors(self) -> list[str]:
        """The keys of the exact and prefix indexes, sorted (rebuilt after a change)."""
        anchors = self._anchors
        if anchors is None:
            anchors = self._anchors = sorted(self._exact.keys() | self._by_prefix.keys())
        return anchors

    def prefixes(self) -> set[str]:
        """The fixed prefixes of the non-inverted absolute masks."""
        return set(self._prefix_counts)

    def has_unanchored(self) -> bool:
        """Whether some rule can match anywhere (its mask has no fixed prefix)."""
        return self._unanchored_count > 0

    # ------------------------------------------------------------------------------------ internals

    def _changed(self) -> None:
        self.generation += 1
        self._listed = None
        self._anchors = None

    def _index_of(self, fm: FileMask) -> tuple[dict[str, _Bucket] | None, str]:
        """Which index holds a rule with this mask, and under which key (None: the unanchored list)."""
        if fm.inverted:
            return None, ""
        if fm.literal:
            return (self._by_name, fm.path_mask) if fm.name_only else (self._exact, fm.path_mask)
        if fm.prefix is not None:
            return self._by_prefix, fm.prefix
        return None, ""

    def _insert(self, rule: Rule, key: _Key) -> None:
        self._rules[rule.seq] = rule
        self._by_key[key] = rule
        self._by_text.setdefault(rule.mask, {})[rule.seq] = rule
        index, where = self._index_of(rule.compiled)
        if index is None:
            self._unanchored[rule.seq] = rule
        else:
            index.setdefault(where, {})[rule.seq] = rule
        prefix = rule.compiled.prefix
        if prefix is None:
            self._unanchored_count += 1
        else:
            self._prefix_counts[prefix] = self._prefix_counts.get(prefix, 0) + 1

    def _remove(self, rule: Rule) -> None:
        del self._rules[rule.seq]
        del self._by_key[(rule.mask, rule.ea_name, rule.min_size, rule.max_size, rule.included_attributes,
                          rule.excluded_attributes)]
        _discard(self._by_text, rule.mask, rule.seq)
        index, where = self._index_of(rule.compiled)
        if index is None:
            del self._unanchored[rule.seq]
        else:
            _discard(index, where, rule.seq)
        prefix = rule.compiled.prefix
        if prefix is None:
            self._unanchored_count -= 1
        elif self._prefix_counts[prefix] == 1:
            del self._prefix_counts[prefix]
        else:
            self._prefix_counts[prefix] -= 1


def _discard(index: dict[str, _Bucket], where: str, seq: int) -> None:
    bucket = index[where]
    del bucket[seq]
    if not bucket:
        del index[where]  # empty buckets would make every later lookup of this key pay for nothing


class PathMatch:
    """The rules of a standard and a passthrough set that match one path, and what they can grant.

    ``upper`` bounds every decision on the path: the standard rules' flags less those of passthrough
    rules that always apply. When ``unconditional`` (no rule depends on the process or the file's
    facts) it is the decision itself. Flags are taken when the match is made: rebuild it when a rule
    set's ``generation`` changes.
    """

    __slots__ = ("_passthrough", "_standard", "passthrough", "standard", "unconditional", "upper")

    def __init__(self, standard: tuple[Rule, ...] = (), passthrough: tuple[Rule, ...] = ()) -> None:
        self.standard = standard
        self.passthrough = passthrough
        self._standard = tuple((rule, rule.flags) for rule in standard)
        self._passthrough = tuple((rule, rule.flags) for rule in passthrough)
        granted = NO_FLAGS
        for _, flags in self._standard:
            granted |= flags
        withdrawn = NO_FLAGS
        for rule, flags in self._passthrough:
            if not rule.conditional:
                withdrawn |= flags
        self.upper = granted - withdrawn
        self.unconditional = not any(rule.conditional for rule in standard + passthrough)

    def flags(self, process: ProcessLike | None, facts: FileFacts | None) -> Flags:
        """The flags of a request on this path from ``process`` on a file with these ``facts``."""
        if self.unconditional or not self.upper:
            return self.upper
        granted = NO_FLAGS
        for rule, flags in self._standard:
            if rule.applies(process, facts):
                granted |= flags
        if not granted:
            return granted
        withdrawn = NO_FLAGS
        for rule, flags in self._passthrough:
            if rule.applies(process, facts):
                withdrawn |= flags
        return granted - withdrawn

    def __repr__(self) -> str:
        return f"PathMatch(upper={self.upper}, unconditional={self.unconditional}, " \
               f"standard={len(self.standard)}, passthrough={len(self.passthrough)})"


_SHARED_MATCHES = 4096  # distinct (rule sets, candidates) combinations kept; the set is cleared when full
_shared: dict[tuple[int, int, int, int, tuple[int, ...], tuple[int, ...]], PathMatch] = {}


def match_path(standard: RuleSet, passthrough: RuleSet, path: str) -> PathMatch:
    """Match ``path`` against both rule sets once.

    Paths with the same matching rules share one PathMatch (it is immutable): most paths of a tree have
    the same few, and building the flags is most of a match's cost.
    """
    std = standard.candidates(path)
    pt = passthrough.candidates(path) if passthrough else []
    key = (standard.serial, standard.generation, passthrough.serial, passthrough.generation,
           tuple(r.seq for r in std), tuple(r.seq for r in pt))
    m = _shared.get(key)
    if m is None:
        if len(_shared) >= _SHARED_MATCHES:
            _shared.clear()
        m = _shared[key] = PathMatch(tuple(std), tuple(pt))
    return m
