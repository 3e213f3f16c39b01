"""Rule sets, path matches and the per-request decision, without a kernel."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsfilter._engine.masks import MaskError
from fsfilter._engine.rules import (
    FILE_SYS_ATTR_ARCHIVE,
    FILE_SYS_ATTR_DIRECTORY,
    FILE_SYS_ATTR_HIDDEN,
    FILE_SYS_ATTR_NORMAL,
    FILE_SYS_ATTR_READ_ONLY,
    FILE_SYS_ATTR_REPARSE_POINT,
    FILE_SYS_ATTR_SPARSE_FILE,
    FILE_SYS_ATTR_SYSTEM,
    Flags,
    PathMatch,
    RuleSet,
    attributes_from_stat,
    match_path,
)

pytestmark = pytest.mark.timeout(60)


class Proc:
    def __init__(self, pid: int, name: str = "", exe: str = "") -> None:
        self.pid = pid
        self.name = name
        self.exe = exe


class Facts:
    """File facts that count how often each is asked for."""

    def __init__(self, size: int | None = None, attributes: int | None = None, xattrs: tuple[str, ...] = ()) -> None:
        self._size = size
        self._attributes = attributes
        self._xattrs = xattrs
        self.asked: list[str] = []

    def size(self) -> int | None:
        self.asked.append("size")
        return self._size

    def attributes(self) -> int | None:
        self.asked.append("attributes")
        return self._attributes

    def has_xattr(self, name: str) -> bool:
        self.asked.append("xattr")
        return name in self._xattrs


# ------------------------------------------------------------------------------------------ changes


def test_same_mask_and_qualifiers_aggregate() -> None:
    rules = RuleSet()
    assert rules.add("/a/*", 0x1, 0x10, 0)
    g = rules.generation
    assert rules.add("/a/*", 0x2, 0, 0x100)
    assert rules.generation == g + 1
    assert len(rules) == 1
    rule = rules[0]
    assert (rule.access, rule.control, rule.notify) == (0x3, 0x10, 0x100)
    assert rule.mask == "/a/*" and rule.compiled.path_mask == "/a/*"
    # nothing new: no change, no new generation
    assert not rules.add("/a/*", 0x1, 0x10, 0)
    assert rules.generation == g + 1


def test_different_qualifiers_or_text_make_new_rules_in_order() -> None:
    rules = RuleSet()
    assert rules.add("/a/*", 1, 0, 0)
    assert rules.add("/a/*", 1, 0, 0, min_size=10)
    assert rules.add("/a/*", 1, 0, 0, ea_name="user.x")
    assert rules.add("/a/*", 1, 0, 0, included_attributes=FILE_SYS_ATTR_HIDDEN)
    assert rules.add("/a/*", 1, 0, 0, excluded_attributes=FILE_SYS_ATTR_HIDDEN)
    assert rules.add("/a/*", 1, 0, 0, max_size=10)
    assert rules.add("/a/", 1, 0, 0)  # the same paths, another text
    assert len(rules) == 7
    assert [r.mask for r in rules] == ["/a/*"] * 6 + ["/a/"]
    assert rules[1].min_size == 10 and rules[2].ea_name == "user.x" and rules[-1].mask == "/a/"
    assert rules.add("/a/*", 2, 0, 0, min_size=10)
    assert len(rules) == 7 and rules[1].access == 3 and rules[0].access == 1


def test_a_rule_without_flags_is_not_stored() -> None:
    rules = RuleSet()
    assert not rules.add("/a/*", 0, 0, 0)
    assert len(rules) == 0 and rules.generation == 0


@pytest.mark.parametrize(("args", "kwargs", "error"), [
    (("/a//b", 1, 0, 0), {}, MaskError),
    (("a/b", 1, 0, 0), {}, MaskError),
    (("/a/*", -1, 0, 0), {}, ValueError),
    (("/a/*", 0, -2, 0), {}, ValueError),
    (("/a/*", 0, 0, 1 << 64), {}, ValueError),
    (("/a/*", 1, 0, 0), {"min_size": -2}, ValueError),
    (("/a/*", 1, 0, 0), {"max_size": -5}, ValueError),
    (("/a/*", 1, 0, 0), {"min_size": 10, "max_size": 5}, ValueError),
    (("/a/*", 1, 0, 0), {"included_attributes": -1}, ValueError),
    (("/a/*", 1, 0, 0), {"excluded_attributes": -1}, ValueError),
    (("/a/*", 1, 0, 0), {"ea_name": "a\0b"}, ValueError),
])
def test_add_validates(args: tuple[str, int, int, int], kwargs: dict[str, int | str], error: type[Exception]) -> None:
    rules = RuleSet()
    with pytest.raises(error):
        rules.add(*args, **kwargs)  # type: ignore[arg-type]
    assert len(rules) == 0 and rules.generation == 0


def test_add_accepts_edge_values() -> None:
    rules = RuleSet()
    assert rules.add("/a/*", (1 << 64) - 1, 1 << 63, 0, min_size=0, max_size=0)
    assert rules.add("/a/*", 1, 0, 0, min_size=5, max_size=5)


def test_delete_some_flags() -> None:
    rules = RuleSet()
    rules.add("/a/*", 0x7, 0x30, 0x100)
    g = rules.generation
    assert rules.delete("/a/*", 0x1, 0x10, 0)
    assert rules.generation == g + 1
    assert (rules[0].access, rules[0].control, rules[0].notify) == (0x6, 0x20, 0x100)
    assert not rules.delete("/a/*", 0x1, 0x10, 0)  # already clear
    assert rules.generation == g + 1
    assert rules.delete("/a/*", -1, 0, 0)
    assert (rules[0].access, rules[0].control, rules[0].notify) == (0, 0x20, 0x100)


def test_delete_to_zero_removes_the_rule_and_its_index_entries() -> None:
    rules = RuleSet()
    rules.add("/a/b/*", 1, 0, 0)
    rules.add("/a/b/*", 1, 0, 0, min_size=3)
    rules.add("*.txt", 0, 2, 0)
    rules.add("/c/*", 4, 0, 0)
    assert rules.prefixes() == {"/a/b", "/c"} and rules.has_unanchored()
    assert rules.delete("/a/b/*", -1, -1, -1)  # every rule with that text, whatever its qualifiers
    assert [r.mask for r in rules] == ["*.txt", "/c/*"]
    assert rules.prefixes() == {"/c"}
    assert rules.candidates("/a/b/x") == []
    assert rules.delete("*.txt", 0, 2, 0)
    assert not rules.has_unanchored()
    assert [r.mask for r in rules] == ["/c/*"]
    # the freed key can be used again
    assert rules.add("/a/b/*", 8, 0, 0)
    assert [r.mask for r in rules] == ["/c/*", "/a/b/*"] and rules[1].access == 8


def test_delete_of_unknown_mask_or_bad_arguments() -> None:
    rules = RuleSet()
    rules.add("/a/*", 1, 0, 0)
    assert not rules.delete("/b/*", -1, -1, -1)
    assert not rules.delete("/a/", -1, -1, -1)  # texts, not meanings, identify rules
    with pytest.raises(MaskError):
        rules.delete("/a//*", -1, -1, -1)
    with pytest.raises(ValueError):
        rules.delete("/a/*", -2, 0, 0)
    assert len(rules) == 1 and rules.generation == 1


def test_clear() -> None:
    rules = RuleSet()
    assert not rules.clear()
    assert rules.generation == 0
    rules.add("/a/*", 1, 0, 0)
    rules.add("x", 1, 0, 0)
    g = rules.generation
    assert rules.clear()
    assert rules.generation == g + 1
    assert len(rules) == 0 and list(rules) == [] and rules.prefixes() == set() and not rules.has_unanchored()
    assert rules.candidates("/a/x") == []
    with pytest.raises(IndexError):
        rules[0]
    assert rules.add("/a/*", 1, 0, 0) and rules.generation == g + 2


# ------------------------------------------------------------------------------------------ lookup


def test_candidates_of_every_kind_in_rule_order() -> None:
    rules = RuleSet()
    for mask in ["/a/*", "report.doc", "/a/b/report.doc", "*.doc", "||*.txt", "*/b/*", "/a/b?/*", "/*",
                 "/a/b/report.doc/*", "/z/*", "bash|/a/b/*", "~1|||/q/*", "/a/b", "report.txt", "/"]:
        rules.add(mask, 1, 0, 0)
    found = [r.mask for r in rules.candidates("/a/b/report.doc")]
    assert found == ["/a/*", "report.doc", "/a/b/report.doc", "*.doc", "||*.txt", "*/b/*", "/*",
                     "bash|/a/b/*", "~1|||/q/*"]
    assert [r.mask for r in rules.candidates("/")] == ["||*.txt", "/*", "~1|||/q/*", "/"]
    assert rules.prefixes() == {"/", "/a", "/a/b", "/a/b/report.doc", "/z"}
    assert rules.has_unanchored()


_MASKS = st.sampled_from([
    "/a/*", "/a/b", "/a/b/*", "/a/b/c", "/a/?", "/a?/*", "/*", "/", "b", "*.c", "c.*", "||/a/*", "||b",
    "*/b/*", "*/b", "p|/a/*", "p|||b", "/a/b.*", "/b/a/*", "?", "/a/b/c/*",
])
_PATHS = st.lists(st.sampled_from(["a", "b", "c", "b.c", "a.b"]), max_size=4).map(lambda c: "/" + "/".join(c))


@settings(max_examples=300, deadline=None)
@given(st.lists(_MASKS, max_size=12), st.lists(_MASKS, max_size=4), _PATHS)
def test_candidates_equal_a_full_scan(added: list[str], deleted: list[str], path: str) -> None:
    rules = RuleSet()
    for i, mask in enumerate(added):
        rules.add(mask, 1 << (i % 3), 0, 0, min_size=i % 2)
    for mask in deleted:
        rules.delete(mask, 1, -1, -1)
    assert rules.candidates(path) == [r for r in rules if r.compiled.matches_path(path)]
    assert rules.prefixes() == {r.compiled.prefix for r in rules if r.compiled.prefix is not None}
    assert rules.has_unanchored() == any(r.compiled.prefix is None for r in rules)


@settings(max_examples=300, deadline=None)
@given(st.lists(_MASKS, max_size=12), _PATHS, _PATHS)
def test_may_reach_false_means_nothing_below_can_match(added: list[str], path: str, below: str) -> None:
    rules = RuleSet()
    for i, mask in enumerate(added):
        rules.add(mask, 1 << (i % 3), 0, 0)
    if not rules.may_reach(path):
        for sub in (path, path.rstrip("/") + below):
            assert not [r for r in rules if r.compiled.matches_path(sub)], (path, sub)
    for name in ("a", "b", "c", "b.c", "zz"):
        child = path.rstrip("/") + "/" + name
        if [r for r in rules if r.compiled.matches_path(child)]:
            assert rules.may_match_child(path), (path, child)


def test_may_reach_excludes_unrelated_subtrees() -> None:
    rules = RuleSet()
    for i in range(1000):
        rules.add(f"/d/nomatch{i}/*.dat", 1, 0, 0)
    rules.add("/d/lit/file", 1, 0, 0)
    rules.add("/e/*", 1, 0, 0)
    assert rules.may_reach("/") and rules.may_reach("/d") and rules.may_reach("/d/nomatch7")
    assert rules.may_reach("/d/lit") and rules.may_reach("/d/lit/file") and rules.may_reach("/e/x/y")
    assert not rules.may_reach("/d/small") and not rules.may_reach("/d/nomatch7x")
    assert not rules.may_reach("/d/lit/file2") and not rules.may_reach("/f")
    assert rules.may_match_child("/d/lit") and rules.may_match_child("/e/x") and rules.may_match_child("/d/nomatch3")
    assert not rules.may_match_child("/d") and not rules.may_match_child("/d/small")
    rules.add("*.dat", 1, 0, 0)  # a name mask can match anywhere
    assert rules.may_reach("/d/small")


# ------------------------------------------------------------------------------------------ decisions


def test_flags_operators() -> None:
    a = Flags(0b011, 0b1, 0)
    b = Flags(0b110, 0, 0b1)
    assert a | b == Flags(0b111, 0b1, 0b1)
    assert a - b == Flags(0b001, 0b1, 0)
    assert not Flags() and Flags(notify=1) and Flags(control=1)


def test_unconditional_match_is_exact_and_passthrough_cancels() -> None:
    std, pt = RuleSet(), RuleSet()
    std.add("/a/*", 0b0011, 0b01, 0)
    std.add("*.txt", 0b0100, 0, 0b1)
    pt.add("/a/b/*", 0b0001, 0, 0)
    m = match_path(std, pt, "/a/b/x.txt")
    assert m.unconditional
    assert m.upper == Flags(0b0110, 0b01, 0b1)
    assert m.flags(None, None) == m.upper
    assert m.flags(Proc(5, "bash"), Facts()) == m.upper
    assert [r.mask for r in m.standard] == ["/a/*", "*.txt"] and [r.mask for r in m.passthrough] == ["/a/b/*"]
    # elsewhere the passthrough rule does not apply
    assert match_path(std, pt, "/a/x.txt").upper == Flags(0b0111, 0b01, 0b1)
    assert not match_path(std, pt, "/elsewhere").upper


def test_flags_are_taken_when_the_match_is_made() -> None:
    std, pt = RuleSet(), RuleSet()
    std.add("/a/*", 1, 0, 0)
    m = match_path(std, pt, "/a/x")
    std.add("/a/*", 2, 0, 0)
    assert m.upper == Flags(1) and m.flags(None, None) == Flags(1)
    assert match_path(std, pt, "/a/x").upper == Flags(3)


def test_per_process_rules() -> None:
    std, pt = RuleSet(), RuleSet()
    std.add("/a/*", 0b001, 0, 0)
    std.add("bash|/a/*", 0b010, 0, 0)
    std.add("~123|/a/*", 0b100, 0, 0)
    pt.add("backup|/a/*", 0b111, 0, 0)
    m = match_path(std, pt, "/a/x")
    assert not m.unconditional
    assert m.upper == Flags(0b111)  # conditional passthrough does not lower the bound
    assert m.flags(Proc(1, "bash", "/bin/bash"), None) == Flags(0b111)
    assert m.flags(Proc(123, "bash", "/bin/bash"), None) == Flags(0b011)
    assert m.flags(Proc(2, "vim", "/usr/bin/vim"), None) == Flags(0b101)
    assert m.flags(Proc(2, "backup", "/usr/sbin/backup"), None) == Flags()
    assert m.flags(None, None) == Flags(0b101)  # unknown process: only "all but X" rules take it


def test_unconditional_passthrough_lowers_upper_but_conditional_only_cancels_per_request() -> None:
    std, pt = RuleSet(), RuleSet()
    std.add("/a/*", 0b11, 0, 0)
    pt.add("/a/*", 0b01, 0, 0)
    pt.add("/a/*", 0b10, 0, 0, min_size=100)
    m = match_path(std, pt, "/a/x")
    assert m.upper == Flags(0b10) and not m.unconditional
    assert m.flags(None, Facts(size=100)) == Flags()
    assert m.flags(None, Facts(size=99)) == Flags(0b10)
    assert m.flags(None, None) == Flags(0b10)


@pytest.mark.parametrize(("qualifiers", "facts", "applies"), [
    ({"min_size": 10}, Facts(size=10), True),
    ({"min_size": 10}, Facts(size=9), False),
    ({"max_size": 10}, Facts(size=10), True),
    ({"max_size": 10}, Facts(size=11), False),
    ({"min_size": 0}, Facts(size=0), True),
    ({"min_size": 5, "max_size": 7}, Facts(size=6), True),
    ({"min_size": 5, "max_size": 7}, Facts(size=8), False),
    ({"min_size": 0}, Facts(size=None), False),  # unknown size: the qualifier fails
    ({"included_attributes": FILE_SYS_ATTR_HIDDEN | FILE_SYS_ATTR_ARCHIVE},
     Facts(attributes=FILE_SYS_ATTR_HIDDEN | FILE_SYS_ATTR_ARCHIVE | FILE_SYS_ATTR_READ_ONLY), True),
    ({"included_attributes": FILE_SYS_ATTR_HIDDEN | FILE_SYS_ATTR_ARCHIVE}, Facts(attributes=FILE_SYS_ATTR_HIDDEN),
     False),
    ({"excluded_attributes": FILE_SYS_ATTR_HIDDEN}, Facts(attributes=FILE_SYS_ATTR_ARCHIVE), True),
    ({"excluded_attributes": FILE_SYS_ATTR_HIDDEN}, Facts(attributes=FILE_SYS_ATTR_HIDDEN), False),
    ({"excluded_attributes": FILE_SYS_ATTR_HIDDEN}, Facts(attributes=None), False),
    ({"ea_name": "user.tag"}, Facts(xattrs=("user.tag",)), True),
    ({"ea_name": "user.tag"}, Facts(xattrs=("user.other",)), False),
    ({"ea_name": "user.tag", "min_size": 1}, Facts(size=1, xattrs=("user.tag",)), True),
    ({"ea_name": "user.tag", "min_size": 1}, Facts(size=0, xattrs=("user.tag",)), False),
    ({"min_size": 1}, None, False),  # no facts: rules with qualifiers do not apply
])
def test_qualifiers(qualifiers: dict[str, int | str], facts: Facts | None, applies: bool) -> None:
    std, pt = RuleSet(), RuleSet()
    std.add("/a/*", 0b01, 0, 0)
    std.add("/a/*", 0b10, 0, 0, **qualifiers)  # type: ignore[arg-type]
    m = match_path(std, pt, "/a/x")
    assert not m.unconditional and m.upper == Flags(0b11)
    assert m.flags(None, facts) == (Flags(0b11) if applies else Flags(0b01))


def test_facts_are_asked_only_when_needed() -> None:
    std, pt = RuleSet(), RuleSet()
    std.add("/a/*", 1, 0, 0)
    facts = Facts(size=5, attributes=0, xattrs=("user.x",))
    assert match_path(std, pt, "/a/x").flags(None, facts) == Flags(1)
    assert facts.asked == []
    std.add("/a/*", 2, 0, 0, ea_name="user.x")
    assert match_path(std, pt, "/a/x").flags(None, facts) == Flags(3)
    assert facts.asked == ["xattr"]
    facts.asked.clear()
    std.add("/a/*", 4, 0, 0, min_size=100, ea_name="user.x")  # size fails first: no xattr call for it
    assert match_path(std, pt, "/a/x").flags(None, facts) == Flags(3)
    assert facts.asked == ["xattr", "size"]
    facts.asked.clear()
    std.add("bash|/a/*", 8, 0, 0, min_size=1)  # the process fails first: no facts asked for it
    assert match_path(std, pt, "/a/x").flags(Proc(1, "vim"), facts) == Flags(3)
    assert facts.asked == ["xattr", "size"]


def test_path_match_of_nothing() -> None:
    m = PathMatch()
    assert m.upper == Flags() and m.unconditional and m.flags(None, None) == Flags()
    assert m.standard == () and m.passthrough == ()


# ------------------------------------------------------------------------------------------ attributes

_REG, _DIR, _LNK = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK


@pytest.mark.parametrize(("mode", "size", "blocks", "name", "expected"), [
    (_REG | 0o644, 100, 8, "a.txt", FILE_SYS_ATTR_ARCHIVE | FILE_SYS_ATTR_NORMAL),
    (_REG | 0o444, 100, 8, "a.txt", FILE_SYS_ATTR_ARCHIVE | FILE_SYS_ATTR_READ_ONLY),
    (_REG | 0o200, 100, 8, "a.txt", FILE_SYS_ATTR_ARCHIVE | FILE_SYS_ATTR_NORMAL),  # owner may write
    (_REG | 0o644, 100, 8, ".a", FILE_SYS_ATTR_ARCHIVE | FILE_SYS_ATTR_HIDDEN),
    (_REG | 0o644, 100, 8, "/d/.a", FILE_SYS_ATTR_ARCHIVE | FILE_SYS_ATTR_HIDDEN),
    (_REG | 0o644, 1 << 20, 8, "big", FILE_SYS_ATTR_ARCHIVE | FILE_SYS_ATTR_SPARSE_FILE),
    (_REG | 0o644, 4096, 8, "full", FILE_SYS_ATTR_ARCHIVE | FILE_SYS_ATTR_NORMAL),
    (_REG | 0o644, 0, 0, "empty", FILE_SYS_ATTR_ARCHIVE | FILE_SYS_ATTR_NORMAL),
    (_DIR | 0o755, 4096, 8, "d", FILE_SYS_ATTR_DIRECTORY),
    (_DIR | 0o555, 4096, 8, ".d", FILE_SYS_ATTR_DIRECTORY | FILE_SYS_ATTR_READ_ONLY | FILE_SYS_ATTR_HIDDEN),
    (_DIR | 0o755, 1 << 20, 0, "d", FILE_SYS_ATTR_DIRECTORY),  # sparse is for regular files only
    (_LNK | 0o777, 10, 0, "l", FILE_SYS_ATTR_REPARSE_POINT),
    (stat.S_IFCHR | 0o666, 0, 0, "null", FILE_SYS_ATTR_SYSTEM),
    (stat.S_IFBLK | 0o660, 0, 0, "sda", FILE_SYS_ATTR_SYSTEM),
    (stat.S_IFIFO | 0o600, 0, 0, "fifo", FILE_SYS_ATTR_SYSTEM),
    (stat.S_IFSOCK | 0o755, 0, 0, "sock", FILE_SYS_ATTR_SYSTEM),
    (stat.S_IFSOCK | 0o444, 0, 0, ".sock", FILE_SYS_ATTR_SYSTEM | FILE_SYS_ATTR_READ_ONLY | FILE_SYS_ATTR_HIDDEN),
])
def test_attributes_from_stat(mode: int, size: int, blocks: int, name: str, expected: int) -> None:
    assert attributes_from_stat(mode, size, blocks, name) == expected


def test_reparse_rules_fill_the_target_with_what_the_wildcards_matched() -> None:
    from fsfilter._engine.reparse import ReparseRules

    r = ReparseRules()
    r.add("/data/in/*", "/srv/store/*")
    r.add("/data/*.log", "/var/log/app/*.log")
    r.add("/data/one", "/elsewhere/two")
    r.add("/data/??.cfg", "/etc/app/?-?.cfg")
    assert r.resolve("/data/in/a/b.txt") == ("/srv/store/a/b.txt", r.rules()[0])
    assert r.resolve("/data/x.log")[0] == "/var/log/app/x.log"  # type: ignore[index]
    assert r.resolve("/data/one")[0] == "/elsewhere/two"  # type: ignore[index]
    assert r.resolve("/data/ab.cfg")[0] == "/etc/app/a-b.cfg"  # type: ignore[index]
    assert r.resolve("/data/in") is None and r.resolve("/other/x.log") is None
    assert r.may_reach("/data") and r.may_reach("/") and r.may_reach("/data/in/deep") and not r.may_reach("/srv")
    assert r.target_of("/data/one") == "/elsewhere/two" and r.delete("/data/one") and not r.delete("/data/one")
    for mask, target in (("*.txt", "/x/*.txt"), ("/a/*", "relative/*"), ("/a/b", "/x/*"), ("||/a/*", "/b/*"),
                         ("bash|/a/*", "/b/*"), ("/a/*", "/b/../c/*")):
        with pytest.raises(MaskError):
            r.add(mask, target)
