"""File masks: every documented form, errors, process parts, and properties against a slow reference."""

from __future__ import annotations

import errno
import functools
import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsfilter._engine import masks
from fsfilter._engine.masks import FileMask, MaskError, ProcessSpec, compile_mask, file_matches_mask
from fsfilter._engine.rules import RuleSet

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------------ reference


def ref_glob(pattern: str, subject: str) -> bool:
    """Backtracking over characters: '*' any run (with '/'), '?' one character but '/', the rest literal."""

    @functools.cache
    def go(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(subject)
        c = pattern[i]
        if c == "*":
            return any(go(i + 1, k) for k in range(j, len(subject) + 1))
        if j == len(subject):
            return False
        if c == "?":
            return subject[j] != "/" and go(i + 1, j + 1)
        return subject[j] == c and go(i + 1, j + 1)

    return go(0, 0)


def ref_matches(part: str, path: str) -> bool:
    """The documented rules for a (non-inverted) path part, spelled out the slow way."""
    name_only = "/" not in part
    if len(part) > 1 and part.endswith("/"):
        part = part[:-1]
    # every component ending in ".*" may also be spelled without it
    options = [(c, c[:-2]) if c.endswith(".*") else (c,) for c in part.split("/")]
    subject = path.rsplit("/", 1)[-1] if name_only else path
    return any(ref_glob("/".join(choice), subject) for choice in itertools.product(*options))


# ------------------------------------------------------------------------------------------ tables

MATCHES = [
    # name masks: the last component, at any depth
    ("*.doc", "/x/y/report.doc", True),
    ("*.doc", "/report.doc", True),
    ("*.doc", "/x.doc/y", False),
    ("*.doc", "/x/report.docx", False),
    ("20??_Budget.xls", "/d/2023_Budget.xls", True),
    ("20??_Budget.xls", "/d/e/f/2099_Budget.xls", True),
    ("20??_Budget.xls", "/d/203_Budget.xls", False),
    ("report.doc", "/a/report.doc", True),
    ("report.doc", "/report.doc/x", False),
    ("*", "/", True),
    ("*", "/a/b", True),
    ("*.txt", "/a/b.TXT", False),  # case-sensitive
    # absolute masks: the whole path, '*' crossing '/'
    ("/a/b/*", "/a/b/x", True),
    ("/a/b/*", "/a/b/x/y/z", True),
    ("/a/b/*", "/a/b", False),
    ("/a/b/*", "/a/bc", False),
    ("/a/b/*", "/a/bc/d", False),
    ("/a/b", "/a/b", True),
    ("/a/b/", "/a/b", True),
    ("/a/b", "/a/b/c", False),
    ("/a/b", "/a", False),
    ("/", "/", True),
    ("/", "/a", False),
    ("/*", "/", True),
    ("/*", "/a/b/c", True),
    ("/a/?/c", "/a/x/c", True),
    ("/a/?/c", "/a/xy/c", False),
    ("/a/?", "/a/xy", False),
    ("/a?b", "/a/b", False),  # '?' is never '/'
    ("/a*b", "/a/x/b", True),  # '*' is
    ("/a/*.txt", "/a/b/c.txt", True),
    ("*/Pictures/20??/*.jpg", "/home/u/Pictures/2021/x.jpg", True),
    ("*/Pictures/20??/*.jpg", "/home/u/Pictures/2021/sub/x.jpg", True),
    ("*/Pictures/20??/*.jpg", "/Pictures/2021/x.jpg", True),
    ("*/Pictures/20??/*.jpg", "/home/u/Pictures/21/x.jpg", False),
    ("*/Pictures/20??/*.jpg", "/home/u/MyPictures/2021/x.jpg", False),
    ("*x/y", "/ax/y", True),
    # the DOS ".*" convention
    ("*.*", "/a/README", True),
    ("*.*", "/a/x.y", True),
    ("foo.*", "/a/foo", True),
    ("foo.*", "/a/foo.txt", True),
    ("foo.*", "/a/foo.tar.gz", True),
    ("foo.*", "/a/foox", False),
    ("foo.*", "/a/fo", False),
    ("foo.*.*", "/a/foo.x", True),
    ("foo.*.*", "/a/foo", False),  # only the final ".*" is optional
    (".*", "/a/.hidden", True),
    (".*", "/a/visible", False),
    ("/a/foo.*", "/a/foo", True),
    ("/a/foo.*", "/a/foo.d/x", True),
    ("/a/foo.*", "/a/foo/x", False),
    ("/a/*.*/b", "/a/x/b", True),
    ("/a/*.*/b", "/a/x.y/b", True),
    ("/a/*.*/b", "/a/x/y/b", True),
    ("/a/b.*/c", "/a/b/c", True),
    ("/a/b.*/c", "/a/b.x/c", True),
    ("/a/b.*/c", "/a/bx/c", False),
    # many ".*" components (more spellings than one regex should hold)
    ("/a.*/b.*/c.*/d.*", "/a/b.x/c/d.y/z", True),
    ("/a.*/b.*/c.*/d.*", "/a/b.x/c/d", True),
    ("/a.*/b.*/c.*/d.*", "/a/bx/c/d", False),
    ("/a.*/b.*/c.*/d.*", "/a.1/b/c.2/d", True),
    ("/?.*/?.*/?.*/?.*", "/a/b/c/dd", False),
    # inversion
    ("||*.txt", "/a/b.txt", False),
    ("||*.txt", "/a/b.doc", True),
    ("||/a/*", "/b/c", True),
    ("||/a/*", "/a/x", False),
    ("bash|||/a/*", "/a/x", False),
    ("bash|||/a/*", "/b", True),
    ("||a|b", "/x/a|b", False),  # inverted literal name "a|b"
    ("||a|b", "/x/c", True),
    # everything else is literal; names may hold newlines and any character
    ("/a/[x]", "/a/[x]", True),
    ("/a/[x]", "/a/x", False),
    ("/a/x+(y)", "/a/x+(y)", True),
    ("/a/.^$", "/a/.^$", True),
    ("/a/\\d", "/a/\\d", True),
    ("/a/\\d", "/a/1", False),
    ("*", "/a/b\nc", True),
    ("/a/*", "/a/x\ny", True),
    ("?", "/\n", True),
    ("?.txt", "/é.txt", True),
    ("*a*a*a*b", "/" + "a" * 200, False),
    ("/*a*a*a*a*a*a*a*a*b", "/" + "a" * 3000, False),
]


@pytest.mark.parametrize(("mask", "path", "expected"), MATCHES)
def test_matches_path(mask: str, path: str, expected: bool) -> None:
    fm = compile_mask(mask)
    assert fm.matches_path(path) is expected
    part = fm.path_mask
    sim = masks._compile_glob(part, max_alternatives=0)  # the position-set matcher must agree
    subject = path.rsplit("/", 1)[-1] if fm.name_only else path
    assert (bool(sim(subject)) != fm.inverted) is expected


PARSED = [
    # mask, path_mask, prefix, name_only, literal, inverted
    ("/a/b/*.txt", "/a/b/*.txt", "/a/b", False, False, False),
    ("/a/b/c", "/a/b/c", "/a/b", False, True, False),
    ("/a/b?/x", "/a/b?/x", "/a", False, False, False),
    ("/*", "/*", "/", False, False, False),
    ("/a/b/*", "/a/b/*", "/a/b", False, False, False),
    ("/a/b/", "/a/b", "/a", False, True, False),
    ("/a/b*", "/a/b*", "/a", False, False, False),
    ("/a/b.*", "/a/b.*", "/a", False, False, False),
    ("/a", "/a", "/", False, True, False),
    ("/", "/", "/", False, True, False),
    ("*.doc", "*.doc", None, True, False, False),
    ("report.doc", "report.doc", None, True, True, False),
    ("*/x", "*/x", None, False, False, False),
    ("||/a/*", "/a/*", None, False, False, True),
    ("||/a/b", "/a/b", None, False, True, True),
    ("bash|/a/b/*", "/a/b/*", "/a/b", False, False, False),
    ("bash|||/a/*", "/a/*", None, False, False, True),
    ("123|*.txt", "*.txt", None, True, False, False),
]


@pytest.mark.parametrize(("mask", "path_mask", "prefix", "name_only", "literal", "inverted"), PARSED)
def test_parse(mask: str, path_mask: str, prefix: str | None, name_only: bool, literal: bool,
               inverted: bool) -> None:
    fm = compile_mask(mask)
    assert (fm.text, fm.path_mask, fm.prefix, fm.name_only, fm.literal, fm.inverted) == \
        (mask, path_mask, prefix, name_only, literal, inverted)
    assert str(fm) == mask


@pytest.mark.parametrize(("mask", "spec"), [
    ("/a/*", None),
    ("||/a/*", None),
    ("123|/a/*", ProcessSpec(False, 123, None)),
    ("~123|/a/*", ProcessSpec(True, 123, None)),
    ("0042|/a", ProcessSpec(False, 42, None)),
    ("bash|/a/*", ProcessSpec(False, None, "bash")),
    ("~bash|/a/*", ProcessSpec(True, None, "bash")),
    ("/usr/bin/*|/a/*", ProcessSpec(False, None, "/usr/bin/*")),
    ("~~x|/a", ProcessSpec(True, None, "~x")),
    ("١٢|/a", ProcessSpec(False, None, "١٢")),  # non-ASCII digits are a name, not a pid
    ("bash|a|b", ProcessSpec(False, None, "bash")),  # only the first '|' splits
])
def test_process_part(mask: str, spec: ProcessSpec | None) -> None:
    assert compile_mask(mask).process == spec


def test_first_bar_splits_and_the_rest_is_a_literal_name() -> None:
    fm = compile_mask("bash|a|b")
    assert fm.path_mask == "a|b" and fm.name_only and fm.literal
    assert fm.matches_path("/x/a|b")


ERRORS = [
    "",
    "\0",
    "/a\0b",
    "bash\0|/a",
    "|/a",
    "|",
    "~|/a",
    "bash|",
    "bash|||",
    "||",
    "/a//b",
    "//",
    "/a/b//",
    "/a/./b",
    "/a/../b",
    "/a/.",
    "/a/..",
    "*/../x",
    ".",
    "..",
    "||..",
    "a/b",
    "?a/b",
    "bash|a/b",
    ".a/b",
]


@pytest.mark.parametrize("mask", ERRORS)
def test_invalid_masks(mask: str) -> None:
    with pytest.raises(MaskError) as info:
        compile_mask(mask)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.code == errno.EINVAL
    assert err.message and str(err) == err.message


def test_non_str_mask() -> None:
    with pytest.raises(MaskError):
        compile_mask(b"/a/*")  # type: ignore[arg-type]


def test_many_dot_star_components_use_the_position_set_matcher() -> None:
    assert isinstance(compile_mask("/a.*/b.*/c.*/d.*")._match, masks._Simulation)
    assert not isinstance(compile_mask("/a.*/b.*/c.*")._match, masks._Simulation)


def test_compile_is_cached_and_masks_are_immutable() -> None:
    fm = compile_mask("/cache/me/*")
    assert compile_mask("/cache/me/*") is fm
    with pytest.raises(AttributeError):
        fm.text = "/x"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------ processes


class FakeProcess:
    """A process whose name and exe record being read, as lazily computed ones would cost a /proc read."""

    def __init__(self, pid: int, name: str = "", exe: str = "") -> None:
        self.pid = pid
        self._name = name
        self._exe = exe
        self.touched: set[str] = set()

    @property
    def name(self) -> str:
        self.touched.add("name")
        return self._name

    @property
    def exe(self) -> str:
        self.touched.add("exe")
        return self._exe


PROCESSES = [
    # mask, pid, name, exe, expected, attributes read
    ("123|/a/*", 123, "x", "/x", True, set()),
    ("123|/a/*", 124, "x", "/x", False, set()),
    ("~123|/a/*", 123, "x", "/x", False, set()),
    ("~123|/a/*", 124, "x", "/x", True, set()),
    ("bash|/a/*", 1, "bash", "/usr/bin/bash", True, {"name"}),
    ("bash|/a/*", 1, "b", "/usr/bin/bash", True, {"name", "exe"}),  # exe basename
    ("bash|/a/*", 1, "b", "/usr/bin/zsh", False, {"name", "exe"}),
    ("bash|/a/*", 1, "b", "", False, {"name", "exe"}),
    ("bash|/a/*", 1, "bash5", "/bin/bash5", False, {"name", "exe"}),
    ("ba?h|/a/*", 1, "bash", "", True, {"name"}),
    ("*sh|/a/*", 1, "zsh", "", True, {"name"}),
    ("~bash|/a/*", 1, "bash", "/bin/bash", False, {"name"}),
    ("~bash|/a/*", 1, "b", "/bin/bash", False, {"name", "exe"}),
    ("~bash|/a/*", 1, "vim", "/usr/bin/vim", True, {"name", "exe"}),
    # comm is cut to 15 characters; the exe's basename still has the full name
    ("averyverylongname|/a/*", 1, "averyverylongna", "/opt/averyverylongname", True, {"name", "exe"}),
    # with '/': the executable's full path only
    ("/usr/bin/*|/a/*", 1, "python3", "/usr/bin/python3", True, {"exe"}),
    ("/usr/*|/a/*", 1, "x", "/usr/local/bin/x", True, {"exe"}),  # '*' crosses '/'
    ("/usr/bin/?|/a/*", 1, "x", "/usr/bin/x", True, {"exe"}),
    ("/usr/bin/python3|/a/*", 1, "python3", "/usr/local/bin/python3", False, {"exe"}),
    ("/usr/bin/*|/a/*", 1, "python3", "", False, {"exe"}),  # unknown exe
    ("~/usr/bin/*|/a/*", 1, "python3", "", True, {"exe"}),
    ("Bash|/a/*", 1, "bash", "/bin/bash", False, {"name", "exe"}),  # case-sensitive
    ("*.*|/a/*", 1, "bash", "/bin/bash", False, {"name", "exe"}),  # process patterns are plain globs
]


@pytest.mark.parametrize(("mask", "pid", "name", "exe", "expected", "touched"), PROCESSES)
def test_process_matching(mask: str, pid: int, name: str, exe: str, expected: bool, touched: set[str]) -> None:
    fm = compile_mask(mask)
    proc = FakeProcess(pid, name, exe)
    assert fm.matches("/a/x", proc) is expected
    assert proc.touched == touched
    proc.touched.clear()
    assert fm.matches_process(proc) is expected
    assert fm.process is not None
    assert fm.process.matches(pid, proc) is expected


def test_path_is_checked_before_the_process() -> None:
    proc = FakeProcess(1, "bash", "/bin/bash")
    assert not compile_mask("bash|/a/*").matches("/b/x", proc)
    assert proc.touched == set()


@pytest.mark.parametrize(("mask", "expected"), [
    ("/a/*", True),
    ("bash|/a/*", False),
    ("123|/a/*", False),
    ("~bash|/a/*", True),
    ("~123|/a/*", True),
    ("bash|||/b/*", False),
])
def test_unknown_process(mask: str, expected: bool) -> None:
    assert compile_mask(mask).matches("/a/x", None) is expected


# ------------------------------------------------------------------------------------------ helper


@pytest.mark.parametrize(("mask", "name", "case_sensitive", "expected"), [
    ("*.txt", "a.txt", True, True),
    ("*.TXT", "a.txt", True, False),
    ("*.TXT", "a.txt", False, True),
    ("*.TXT", "/dir/a.txt", False, True),
    ("/A/*", "/a/b", False, True),
    ("/A/*", "/a/b", True, False),
    ("A?C", "abc", False, True),
    ("||*.txt", "X.TXT", False, False),
    ("||*.txt", "X.TXT", True, True),
    ("bash|*.txt", "a.txt", True, True),  # the process part is ignored
    ("FOO.*", "foo", False, True),
    ("report.doc", "REPORT.DOC", False, True),
    ("report.doc", "REPORT.DOC", True, False),
])
def test_file_matches_mask(mask: str, name: str, case_sensitive: bool, expected: bool) -> None:
    assert file_matches_mask(mask, name, case_sensitive) is expected


def test_file_matches_mask_rejects_bad_masks() -> None:
    with pytest.raises(MaskError):
        file_matches_mask("a/b", "a/b")


# ------------------------------------------------------------------------------------------ properties

_COMPONENT = st.one_of(
    st.text(alphabet="ab.*?", min_size=1, max_size=4),
    st.text(alphabet="ab?", max_size=2).map(lambda stem: stem + ".*"),  # the DOS form, more often
).filter(lambda c: c not in (".", ".."))
_ABSOLUTE = st.builds(
    lambda comps, slash: "/" + "/".join(comps) + ("/" if slash else ""),
    st.lists(_COMPONENT, min_size=1, max_size=4), st.booleans(),
)
_STARRED = st.lists(_COMPONENT, min_size=1, max_size=3).map(lambda comps: "*/" + "/".join(comps))
_PATH_PART = st.one_of(_COMPONENT, _ABSOLUTE, _STARRED, st.just("/"))
_PATH = st.lists(
    st.text(alphabet="ab.*", min_size=1, max_size=3).filter(lambda c: c not in (".", "..")), max_size=5,
).map(lambda comps: "/" + "/".join(comps))



@st.composite
def _near_path(draw: st.DrawFn, part: str) -> str:
    """A path made from the mask itself, its wildcards filled in (sometimes with '/'), so that most
    masks nearly match it and the edge cases ('?' against '/', a dropped '.' before '*') come up."""
    out = []
    skip = False
    for i, c in enumerate(part):
        if skip:
            skip = False
        elif c == "." and part[i + 1:i + 2] == "*" and draw(st.booleans()):
            skip = True  # ".*" left out entirely
        elif c == "*":
            out.append(draw(st.text(alphabet="ab./", max_size=4)))
        elif c == "?":
            out.append(draw(st.sampled_from(["/", "/", "a", "."])))
        elif c == "." and draw(st.integers(0, 3)) == 0:
            continue
        else:
            out.append(c)
    text = "".join(out)
    if not text.startswith("/"):
        text = draw(st.sampled_from(["/", "/a/", "/b.a/a/"])) + text
    return "/" + "/".join(c for c in text.split("/") if c not in ("", ".", ".."))


@st.composite
def _mask_and_path(draw: st.DrawFn) -> tuple[str, str]:
    part = draw(_PATH_PART)
    path = draw(_near_path(part)) if draw(st.integers(0, 3)) else draw(_PATH)
    return part, path


_PROPERTY = settings(max_examples=500, deadline=None)


@_PROPERTY
@given(_mask_and_path())
def test_matches_like_the_reference(case: tuple[str, str]) -> None:
    part, path = case
    expected = ref_matches(part, path)
    assert compile_mask(part).matches_path(path) is expected
    assert compile_mask("||" + part).matches_path(path) is (not expected)
    assert compile_mask("p|" + part).matches_path(path) is expected
    assert compile_mask("~1|||" + part).matches_path(path) is (not expected)


@_PROPERTY
@given(_mask_and_path())
def test_position_set_matcher_like_the_reference(case: tuple[str, str]) -> None:
    part, path = case
    fm = compile_mask(part)
    subject = path.rsplit("/", 1)[-1] if fm.name_only else path
    assert bool(masks._compile_glob(fm.path_mask, max_alternatives=0)(subject)) is ref_matches(part, path)


@_PROPERTY
@given(_mask_and_path(), st.data())
def test_case_folding_like_the_reference(case: tuple[str, str], data: st.DataObject) -> None:
    part, path = case

    def mixed(text: str) -> str:
        return "".join(c.upper() if c.isalpha() and data.draw(st.booleans()) else c for c in text)

    assert file_matches_mask(mixed(part), mixed(path), case_sensitive=False) is ref_matches(part, path)


@_PROPERTY
@given(_mask_and_path())
def test_matches_stay_under_the_fixed_prefix(case: tuple[str, str]) -> None:
    part, path = case
    fm = compile_mask(part)
    if fm.prefix is not None and fm.matches_path(path):
        assert fm.prefix == "/" or path.startswith(fm.prefix + "/")


# ------------------------------------------------------------------------------------------ cost


def test_candidates_look_only_at_the_paths_ancestors(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = RuleSet()
    for n in range(10_000):
        rules.add(f"/other/{n}/*", 1, 0, 0)
        rules.add(f"/other/{n}/file{n}", 1, 0, 0)
    rules.add("/data/*", 2, 0, 0)
    rules.add("/data/x/*.y", 4, 0, 0)
    rules.add("/data/x/y", 8, 0, 0)
    calls: list[str] = []
    original: Callable[[FileMask, str], bool] = FileMask.matches_path

    def counting(self: FileMask, path: str) -> bool:
        calls.append(self.text)
        return original(self, path)

    monkeypatch.setattr(FileMask, "matches_path", counting)
    found = rules.candidates("/data/x/y")
    assert [r.mask for r in found] == ["/data/*", "/data/x/y"]
    # one check per wildcard rule under an ancestor ("/data/*", "/data/x/*.y"); the literal is a dict hit
    assert sorted(calls) == ["/data/*", "/data/x/*.y"]
    calls.clear()
    assert rules.candidates("/elsewhere/deep/down/file") == []
    assert calls == []


# ---------------------------------------------------------------- moving a directory under the rules (issue 11)

_DIR = st.lists(st.sampled_from(["a", "b", "ab", "a.b", "hr", "x"]), min_size=1, max_size=3).map(
    lambda comps: "/" + "/".join(comps))
_REL = st.lists(st.sampled_from(["a", "b", "a.b", "b.a", "hr", "x.csv", "ab"]), min_size=1, max_size=3).map(
    "/".join)


@settings(max_examples=3000, deadline=None)
@given(_PATH_PART, _DIR, _DIR, st.lists(_REL, min_size=1, max_size=6))
def test_moves_with_directory_only_when_every_path_below_keeps_its_verdict(part: str, old: str, new: str,
                                                                         below: list[str]) -> None:
    """Where the analysis says a move changes nothing, no path below may change its verdict (soundness:
    a wrong True would let a rename carry files out of a rule)."""
    if old == new or new.startswith(old + "/") or old.startswith(new + "/"):
        return  # the kernel refuses moving a directory into itself
    fm = compile_mask(part)
    if masks.moves_with_directory(fm, old, new):
        for rel in below:
            assert fm.matches_path(f"{old}/{rel}") == fm.matches_path(f"{new}/{rel}"), (part, old, new, rel)


@pytest.mark.parametrize(("mask", "old", "new", "moves"), [
    ("/data/hr/*", "/data/hr", "/data/hr2", False),  # the attack
    ("/data/hr/pay.csv", "/data/hr", "/data/x", False),  # a rule naming one file
    ("/data/*", "/data/hr", "/data/hr2", True),  # the whole tree: any place in it is the same
    ("/data/*.csv", "/data/a", "/data/b", True),
    ("/data/*.csv", "/data/a", "/tmp/b", False),  # out of the rule's tree
    ("/tmp/*.csv", "/data/a", "/tmp/b", False),  # into it
    ("*.csv", "/a", "/b", True),
    ("*/hr/*", "/data/hr", "/data/x", False),
    ("*/pay.csv", "/data/hr", "/data/x", True),
    ("/data/x*", "/data/xa", "/data/yb", False),
    ("||/data/hr/*", "/data/hr", "/data/hr2", False),
    ("/elsewhere/*", "/data/a", "/data/b", True),
])
def test_moves_with_directory_examples(mask: str, old: str, new: str, moves: bool) -> None:
    assert masks.moves_with_directory(compile_mask(mask), old, new) is moves


def test_relocation_rule_finds_the_rule_a_move_escapes() -> None:
    rules = RuleSet()
    rules.add("/data/*", 0, 0, 1)  # notify only: moving does not escape anything
    rules.add("/data/hr/*", 0x05, 0, 0)
    assert rules.relocation_rule("/data/hr", "/data/hr2", -1 & 0xFFFF, 0).mask == "/data/hr/*"  # type: ignore[union-attr]
    assert rules.relocation_rule("/data/a", "/data/b", 0xFFFF, 0) is None
    assert rules.relocation_rule("/data/a", "/data/hr/a", 0xFFFF, 0).mask == "/data/hr/*"  # type: ignore[union-attr]
    rules.add("/data/a/b/c/d.txt", 0x01, 0, 0)  # a single file deep below
    assert rules.relocation_rule("/data/a", "/data/b", 0xFFFF, 0).mask == "/data/a/b/c/d.txt"  # type: ignore[union-attr]
