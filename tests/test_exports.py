"""The public face: ``from fsfilter import *`` gives the SDK's names and nothing else, and every public module says
what it offers in ``__all__``. Checked against docs/api.md and, where it is on this machine, the SDK reference."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import types
from pathlib import Path

import pytest

import fsfilter
from fsfilter.api import constants
from fsfilter.api.cbmonitor import MONITOR_PARAMS
from fsfilter.api.cbprocess import PROCESS_PARAMS
from fsfilter.api.params import FILTER_PARAMS, EventParams

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "api.md"
REFERENCE = Path(os.environ.get("FSFILTER_REFERENCE", "/work/shared/reference/cbfs-api.md"))

CLASSES = {"CBFilter", "CBMonitor", "CBProcess", "CBEncrypt", "PassthroughFilter", "CBFSFilterError",
           "CBFSFilterStream", "EventParams"}
PARAMS = {cls.__name__ for table in (FILTER_PARAMS, MONITOR_PARAMS, PROCESS_PARAMS) for cls in table.values()}

# Public modules that have no __all__ yet: their files belong to another change, which adds it. May only shrink.
MISSING_ALL: set[str] = set()


def star() -> dict[str, object]:
    namespace: dict[str, object] = {}
    exec("from fsfilter import *", namespace)
    del namespace["__builtins__"]
    return namespace


def camel(event: str) -> str:
    return "".join(part.capitalize() for part in event.split("_"))


def modules() -> dict[str, types.ModuleType]:
    found = {"fsfilter": fsfilter}
    for info in pkgutil.walk_packages(fsfilter.__path__, "fsfilter."):
        if not info.name.endswith(".__main__"):  # runs a command line when imported
            found[info.name] = importlib.import_module(info.name)
    return found


def public(name: str) -> bool:
    """Modules whose names users (and the command line) import: the package, the API, the tools on top."""
    return name in ("fsfilter", "fsfilter.errors", "fsfilter.cli", "fsfilter.demo", "fsfilter.service",
                    "fsfilter.service.daemon", "fsfilter.service.remote") or (
        name.startswith("fsfilter.api.") and not name.endswith("__init__") and "._" not in name)


def test_star_gives_exactly_the_sdk_names() -> None:
    names = set(star())
    assert names == CLASSES | set(constants.__all__) | PARAMS
    assert len(PARAMS) == len(FILTER_PARAMS) + len(MONITOR_PARAMS) + len(PROCESS_PARAMS)  # no two alike


def test_star_gives_no_helper_module_or_typing_name() -> None:
    for name, value in star().items():
        assert not name.startswith("_"), name
        assert not isinstance(value, types.ModuleType), name
        if isinstance(value, type):
            assert value.__module__.startswith("fsfilter."), name  # typing.Any and the like are not ours
        else:
            assert type(value) is int and name.isupper(), name  # a constant, never a function or a table


def test_every_exported_class_is_what_its_name_says() -> None:
    namespace = star()
    for name in PARAMS:
        cls = namespace[name]
        assert isinstance(cls, type) and issubclass(cls, EventParams) and name.endswith("EventParams")
        assert name.startswith(("CBFilter", "CBMonitor", "CBProcess")), name
    assert issubclass(namespace["CBFSFilterError"], Exception)  # type: ignore[arg-type]


def test_the_package_lists_the_constants_as_the_constants_module_does() -> None:
    # spelled out in both (type checkers read only a literal __all__): kept equal here
    # (the event-parameter classes, EventParams among them, come after them from the generated modules' __all__)
    classes = CLASSES - {"EventParams"}
    static = [name for name in fsfilter.__all__ if name not in PARAMS and name != "EventParams"]
    assert static == [*static[:len(classes)], *constants.__all__] and set(static[:len(classes)]) == classes


def test_constants_all_is_every_constant_the_module_defines() -> None:
    defined = {name for name, value in vars(constants).items()
               if not name.startswith("_") and not isinstance(value, types.ModuleType) and name.isupper()}
    assert set(constants.__all__) == defined
    assert len(constants.__all__) == len(set(constants.__all__))


def test_every_all_names_what_its_module_has() -> None:
    for name, module in modules().items():
        listed = getattr(module, "__all__", None)
        if listed is None:
            continue
        assert all(isinstance(entry, str) for entry in listed), name
        assert len(listed) == len(set(listed)), f"{name}.__all__ lists a name twice"
        missing = [entry for entry in listed if not hasattr(module, entry)]
        assert not missing, f"{name}.__all__ names what it lacks: {missing}"
        assert not [entry for entry in listed if entry.startswith("_")], name


def test_every_public_module_has_all() -> None:
    found = modules()
    without = {name for name, module in found.items() if public(name) and not hasattr(module, "__all__")}
    assert without == MISSING_ALL, (
        f"public modules without __all__: {sorted(without - MISSING_ALL)}; "
        f"have one now, remove from MISSING_ALL: {sorted(MISSING_ALL - without)}")


def test_every_constant_and_event_of_the_docs_is_exported() -> None:
    text = DOC.read_text()
    namespace = star()
    families = r"(?:ACCESS|FS_CE|FS_NE|FS_MOUNT|FS_REQUEST_DIR|FS_REPARSE|DESIRED_ACCESS|FILE_SYS_ATTR|" \
               r"FILE_DISPOSITION|FILESYS_SHARE)"
    named = set(re.findall(rf"`({families}_[A-Z0-9_]*[A-Z0-9])`", text))
    assert len(named) > 20
    assert not named - set(namespace), sorted(named - set(namespace))
    # §5.3: the attribute values the docs promise
    for name, value in re.findall(r"^\| `(FILE_SYS_ATTR_[A-Z_]+)` \| (0x[0-9a-fA-F]+) \|", text, re.M):
        assert namespace[name] == int(value, 16), name
    # §4.3: every event's flag, and its parameter class
    events = re.findall(r"^\| `on_([a-z_]+)` \| ([^|]*) \|", text, re.M)
    assert len(events) == 103
    for event, flags in events:
        assert f"CBFilter{camel(event)}EventParams" in namespace, event
        for flag in re.findall(r"\b((?:CE|NE)_[A-Z_]+)", flags):
            assert f"FS_{flag}" in namespace, (event, flag)


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"the SDK reference ({REFERENCE}) is not on this machine")
def test_the_reference_flags_and_events_are_exported() -> None:
    text = REFERENCE.read_text()
    namespace = star()
    # the flag families, each name as the reference spells it (fragments such as FS_CE_BEFORE/AFTER_X skipped)
    flags = set(re.findall(r"\b((?:ACCESS|FS_CE|FS_NE)_[A-Z0-9_]*[A-Z0-9])\b(?!/)", text))
    assert len(flags) > 60
    assert not flags - set(namespace), sorted(flags - set(namespace))
    # §4.3: CBMonitor's 40 events
    block = text[text.index("### 4.3 Events (40"):]
    listed = block[block.index("\n") + 1:block.index("\n(C:")]
    monitor = [event.strip(" .\n") for event in listed.replace("\n", " ").split(",")]
    assert len(monitor) == 40
    assert not [e for e in monitor if f"CBMonitor{camel(e)}EventParams" not in namespace]
    # §5.3: CBProcess's events (handle operations included: the class exists, its handler is refused on Linux)
    block = text[text.index("### 5.3 Events"):text.index("### 5.4")]
    process = re.findall(r"\bon_([a-z_]+)", block)
    assert len(set(process)) == 9
    assert not [e for e in process if f"CBProcess{camel(e)}EventParams" not in namespace]
