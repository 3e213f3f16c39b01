"""The layers of DESIGN.md §2, checked on the source: no module imports one of a higher layer.

Modules are parsed with ``ast``, never imported, and every import statement counts: at module level, inside a
function, and under ``if TYPE_CHECKING:`` (a type-only import still ties the lower module to the higher one).

Layers by folder, lowest first: ``errors.py`` (0: the one exception type, which every layer may raise; it
imports nothing from fsfilter), ``_abi`` 1, ``_wire`` 2, ``_system`` 3, ``_sessions`` 4, ``_engine`` 5, ``_layers`` 6
(the filter stack's layers, which use the engine's policy and the sessions' tables), ``api`` 7. Inside ``api``
the SDK's classes (cbfilter, cbmonitor, cbprocess) sit above the rest (8): they are the thin compositions on top
of the stack's modules (DESIGN §2, §7), which must not reach back up into them. The package's ``__init__``, the
command line and the demo are above everything (9). A module may import its own layer, as long as the imports make
no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "fsfilter"
SRC = Path(__file__).resolve().parent.parent / "src" / PACKAGE

FOLDERS = {"_abi": 1, "_wire": 2, "_system": 3, "_sessions": 4, "_engine": 5, "_crypto": 5, "_layers": 6, "api": 7,
           "service": 9}
SDK_CLASSES = {"fsfilter.api.cbfilter", "fsfilter.api.cbmonitor", "fsfilter.api.cbprocess", "fsfilter.api.cbencrypt"}
TOP = 9
RANKS = {"fsfilter.errors": 0, "fsfilter": TOP, "fsfilter.cli": TOP, "fsfilter.demo": TOP, "fsfilter.__main__": TOP,
         # The SDK's vocabulary: its constants and event-parameter classes are data every layer of the stack
         # speaks (a layer fires CBFilter's events with CBFilter's flags); they hold no logic and import nothing
         # above the engine, so they rank with it although users find them in the api package. The Windows
         # file-information structures (fileinfo) are the same kind of vocabulary: a layer fills them for the
         # query/set-file-info events of handler-served views.
         "fsfilter.api.constants": 5, "fsfilter.api.params": 5, "fsfilter.api.events": 5,
         "fsfilter.api._params_base": 5, "fsfilter.api.monitor_params": 5, "fsfilter.api.process_params": 5,
         "fsfilter.api.fileinfo": 5}

# The watchdog runs as `python -S -I watchdog.py` before the mount exists and must start without the package;
# it loads procfs.py by its path (the one mountinfo parser), so procfs.py may not import fsfilter either.
STANDALONE = {"fsfilter._system.watchdog", "fsfilter._system.procfs"}

# Engine is pure policy (DESIGN §2): no kernel-facing layer below it.
PURE = {"fsfilter._engine": {"fsfilter._engine", "fsfilter.errors"},
        # The encrypted file format (docs/file-format.md): bytes in, bytes out, testable alone.
        "fsfilter._crypto": {"fsfilter._crypto", "fsfilter.errors"}}

# Imports against the layering in files another change owns; each entry is (importer, imported). This list may
# only shrink: an entry that no longer occurs fails the test, so whoever fixes one removes it here too.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def rank(module: str) -> int:
    if module in RANKS:
        return RANKS[module]
    if module in SDK_CLASSES:
        return 8
    return FOLDERS[module.split(".")[1]]


def nearest_module(name: str) -> str | None:
    """The fsfilter module that defines ``name`` (itself, or the module a name inside it belongs to)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def resolve(importer: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The fsfilter modules an import statement loads; a name imported from a package is its submodule when there
    is one (``from fsfilter.api import constants``)."""
    if isinstance(node, ast.Import):
        found = {nearest_module(alias.name) for alias in node.names}
    else:
        base = node.module or ""
        if node.level:  # relative: from the importer's package, one level up per extra dot
            package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        found = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else nearest_module(base)
                 for alias in node.names}
    return {name for name in found if name is not None}


def imports() -> set[tuple[str, str]]:
    """Every (importer, imported) pair of fsfilter modules, other than a module and itself."""
    edges = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= {(module, target) for target in resolve(module, node) if target != module}
    return edges


def upward(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in edges if rank(b) > rank(a)}


def cycle(edges: set[tuple[str, str]]) -> list[str] | None:
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_every_module_has_a_layer() -> None:
    assert len(MODULES) > 30
    for module in MODULES:
        assert 0 <= rank(module) <= TOP, module


def test_the_parser_sees_every_kind_of_import() -> None:
    # what the other tests rely on: function-level and TYPE_CHECKING imports, packages resolved to submodules
    edges = imports()
    assert ("fsfilter.api.cbfilter", "fsfilter.api.constants") in edges  # from fsfilter.api import constants as c
    assert ("fsfilter.cli", "fsfilter.demo") in edges  # inside a function
    typed = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fsfilter.api import cbfilter\n")
    found = {target for node in ast.walk(typed) if isinstance(node, ast.Import | ast.ImportFrom)
             for target in resolve("fsfilter._sessions.layer", node)}
    assert "fsfilter.api.cbfilter" in found  # under TYPE_CHECKING


def test_no_module_imports_a_higher_layer() -> None:
    found = upward(imports())
    new = found - KNOWN_VIOLATIONS
    assert not new, "imports of a higher layer (move the code down, or the import up):\n" + "\n".join(
        f"  {a} ({rank(a)}) imports {b} ({rank(b)})" for a, b in sorted(new))


def test_known_violations_still_occur() -> None:
    gone = KNOWN_VIOLATIONS - upward(imports())
    assert not gone, f"fixed, remove from KNOWN_VIOLATIONS: {sorted(gone)}"


def test_no_import_cycles() -> None:
    found = cycle(imports() - KNOWN_VIOLATIONS)
    assert found is None, "import cycle: " + " -> ".join(found or [])


def test_standalone_modules_import_nothing_from_fsfilter() -> None:
    edges = imports()
    for module in STANDALONE:
        assert module in MODULES
        assert not {b for a, b in edges if a == module}, module


def test_engine_is_pure() -> None:
    edges = imports()
    for prefix, allowed in PURE.items():
        for a, b in edges:
            if a.startswith(prefix + "."):
                assert any(b == ok or b.startswith(ok + ".") for ok in allowed), f"{a} imports {b}"
