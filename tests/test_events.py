"""The event table (fsfilter/api/events.py) is the one declaration of every event: the generated parameter classes,
CBFilter's EVENT_BITS/NOTIFY_BITS and the handlers each class accepts must agree with it; a misspelt field fails
at construction and under mypy. No root needed."""

from __future__ import annotations

import errno
import importlib
import importlib.util
import inspect
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import fsfilter
from fsfilter import CBFilter, CBMonitor, CBProcess
from fsfilter._abi import cn_proc, fanotify, fuse
from fsfilter.api import cbfilter, cbmonitor, cbprocess, events
from fsfilter.api import constants as c
from fsfilter.api._params_base import EventParams, EventParamsBase
from fsfilter.api.cbmonitor import MONITOR_PARAMS
from fsfilter.api.cbprocess import PROCESS_PARAMS
from fsfilter.api.params import FILTER_PARAMS, CBFilterBeforeOpenFileEventParams

ROOT = Path(__file__).resolve().parent.parent
# Each SDK class: its classes by event, the module users import its parameter classes from, and the SDK object.
SDK: dict[events.SdkClass, tuple[dict[str, type[EventParams]], ModuleType, type[Any]]] = {
    "CBFilter": (FILTER_PARAMS, fsfilter, CBFilter),
    "CBMonitor": (MONITOR_PARAMS, cbmonitor, CBMonitor),
    "CBProcess": (PROCESS_PARAMS, cbprocess, CBProcess),
}


def all_classes() -> list[tuple[events.SdkClass, events.Event, type[EventParams]]]:
    return [(sdk, event, SDK[sdk][0][name]) for sdk in events.SDK_CLASSES
            for name, event in events.events_of(sdk).items()]


# -- the generated classes and the table


@pytest.mark.parametrize("sdk", events.SDK_CLASSES)
def test_every_event_of_each_class_has_a_parameter_class_and_a_handler(sdk: events.SdkClass) -> None:
    params, module, cls = SDK[sdk]
    table = events.events_of(sdk)
    assert list(params) == list(table)
    obj = cls()
    for name, event in table.items():
        klass = params[name]
        assert klass.__name__ == event.class_name(sdk)
        assert getattr(module, klass.__name__) is klass, f"{klass.__name__} is not importable from {module.__name__}"
        assert issubclass(klass, EventParamsBase) and isinstance(klass(), EventParams)
        assert hasattr(obj, "on_" + name) and getattr(obj, "on_" + name) is None
    # and no handler beyond the table's events
    assert {n[3:] for n in dir(obj) if n.startswith("on_")} == set(table)


def test_the_counts_the_docs_give() -> None:
    assert len(FILTER_PARAMS) == 103  # docs/api.md §4.3
    assert len(MONITOR_PARAMS) == 40
    assert len(PROCESS_PARAMS) == 9


@pytest.mark.parametrize(("sdk", "event", "klass"), all_classes(), ids=lambda v: getattr(v, "__name__", None))
def test_class_agrees_with_the_table(sdk: events.SdkClass, event: events.Event, klass: type[EventParams]) -> None:
    names = [f.name for f in event.fields]
    assert list(klass.__slots__) == names
    assert klass.__doc__ == event.doc
    signature = inspect.signature(klass.__init__)
    parameters = list(signature.parameters.values())[1:]  # after self
    assert [p.name for p in parameters] == names
    for p, field in zip(parameters, event.fields, strict=True):
        assert p.kind is inspect.Parameter.KEYWORD_ONLY
        assert p.annotation == field.type, (event.name, field.name)  # annotations are strings (PEP 563)
        assert p.default == field.default and type(p.default) is type(field.default), (event.name, field.name)
    made = klass()
    for field in event.fields:
        assert getattr(made, field.name) == field.default


def test_generated_modules_are_in_step_with_the_table() -> None:
    spec = importlib.util.spec_from_file_location("gen_params", ROOT / "scripts" / "gen_params.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for path, text in gen.render().items():
        assert path.read_text() == text, f"{path.name} is out of date: run python scripts/gen_params.py"


def test_common_fields_follow_the_kind() -> None:
    for event in events.EVENTS.values():
        names = [f.name for f in event.fields]
        assert names[-1] == "result_code"
        assert ("process_request" in names) == (event.kind == "before" or event.name == "after_enumerate_directory")
        assert ("status" in names) == (event.kind in ("after", "notify"))
        if event.kind != "other":
            assert event.name.startswith(event.kind + "_"), event.name
        assert event.classes and set(event.classes) <= set(events.SDK_CLASSES)


def test_a_parameter_has_one_type_and_default_in_every_event() -> None:
    for event in events.EVENTS.values():
        for field in event.fields:
            assert field is events.PARAMETERS[field.name]


def test_defaults_the_handlers_rely_on() -> None:
    p = FILTER_PARAMS["before_open_file"]()
    assert (p.result_code, p.process_request, p.share_mode, p.file_context, p.file_name) == (0, True, 7, 0, "")
    a = FILTER_PARAMS["after_set_file_security"]()
    assert (a.status, a.owner, a.group, a.security_descriptor) == (0, -1, -1, b"")
    assert FILTER_PARAMS["before_set_file_attributes"]().last_write_time is None
    assert FILTER_PARAMS["before_can_file_be_deleted"]().can_delete is True
    assert FILTER_PARAMS["before_rename_or_move_file"]().replace_if_exists is True
    assert FILTER_PARAMS["before_read_file"]().buffer is None


# -- rule flags


def test_event_bits_and_notify_bits_come_from_the_table() -> None:
    table = events.events_of("CBFilter")
    control = {n: e.flag for n, e in table.items() if e.flag and e.kind != "notify"}
    notify = {n: e.flag for n, e in table.items() if e.flag and e.kind == "notify"}
    assert control == cbfilter.EVENT_BITS
    assert notify == cbfilter.NOTIFY_BITS
    assert all(e.kind == "notify" and e.flag for n, e in table.items() if n in cbfilter.NOTIFY_BITS)


def test_every_rule_flag_names_an_event() -> None:
    control = {v for k, v in vars(c).items() if k.startswith("FS_CE_") and k not in ("FS_CE_NONE", "FS_CE_ALL",
                                                                                          "FS_CE_KNOWN")}
    notify = {v for k, v in vars(c).items() if k.startswith("FS_NE_") and k not in ("FS_NE_NONE", "FS_NE_ALL",
                                                                                         "FS_NE_KNOWN")}
    used_control = 0
    for bit in cbfilter.EVENT_BITS.values():
        assert bit & c.FS_CE_KNOWN == bit
        used_control |= bit
    assert {bit for bit in control if bit & used_control} == control
    assert set(cbfilter.NOTIFY_BITS.values()) == notify


def test_an_after_event_needs_the_flag_after_its_before_events() -> None:
    # the filter layer fires some After events with ``bit << 1`` of the Before event's flag.
    for name, event in events.EVENTS.items():
        if event.kind == "before" and f"after_{name[7:]}" in events.EVENTS:
            assert events.EVENTS[f"after_{name[7:]}"].flag == event.flag << 1, name


def test_the_flag_and_status_columns_of_the_docs_agree_with_the_table() -> None:
    """docs/api.md §4.3 names each CBFilter event's flag, and says "not applicable" for events Linux never
    fires: the table has that flag, and no operation for those."""
    rows = [line.split("|")[1:4] for line in (ROOT / "docs" / "api.md").read_text().splitlines()
            if line.startswith("| `on_")]
    table = events.events_of("CBFilter")
    assert len(rows) == len(table)
    for name_cell, flag_cell, status_cell in rows:
        event = table[name_cell.strip().strip("`")[3:]]
        words = [w for w in flag_cell.split() if w.startswith(("CE_", "NE_"))]
        flag = 0
        for word in words:
            flag |= getattr(c, "FS_" + word)
        assert flag == event.flag, (event.name, flag_cell)
        assert all(w.startswith("NE_") == (event.kind == "notify") for w in words), event.name
        if status_cell.strip() == "not applicable":
            assert not event.fuse, f"{event.name}: the docs say Linux never fires it"
        elif event.kind != "other":
            assert event.fuse, f"{event.name}: the table names no operation for it"


def test_handler_bits_follow_the_table() -> None:
    f = CBFilter()
    f.on_before_open_file = lambda p: None
    f.on_notify_unlock_single = lambda p: None
    assert f.control_handlers == c.FS_CE_BEFORE_OPEN
    assert f.notify_handlers == c.FS_NE_LOCK_CONTROL
    f.on_before_open_file = None
    assert f.control_handlers == 0


# -- the operations the table names


def test_operations_are_kernel_names() -> None:
    for event in events.EVENTS.values():
        for op in event.fuse:
            assert op in fuse.Opcode.__members__, (event.name, op)
        for name in event.fanotify:
            assert isinstance(getattr(fanotify, name, None), int), (event.name, name)
        for name in event.connector:
            assert isinstance(getattr(cn_proc, name, None), int), (event.name, name)
        if event.fuse:
            assert "CBFilter" in event.classes, event.name
        if event.connector:
            assert "CBProcess" in event.classes, event.name


def test_fuse_operations_match_what_the_engine_routes() -> None:
    """The engine sends an opcode to the event workers for exactly the control flags of the events the table says
    fire on it (so its routing table could be derived from this one)."""
    from fsfilter._layers import filter_base
    routed: dict[int, int] = filter_base.OP_CONTROL
    derived: dict[str, int] = {}
    for event in events.events_of("CBFilter").values():
        for op in event.fuse if event.control else ():
            derived[op] = derived.get(op, 0) | event.control
    assert {fuse.Opcode(op).name: hex(bits) for op, bits in routed.items()} == \
        {op: hex(bits) for op, bits in derived.items()}


def test_fanotify_events_match_the_monitors_marks() -> None:
    marks: dict[int, int] = cbmonitor._FAN_FOR
    by_flag: dict[int, int] = {}
    for event in events.events_of("CBMonitor").values():
        for name in event.fanotify:
            assert marks.get(event.notify, 0) & getattr(fanotify, name), (event.name, name)
            by_flag[event.notify] = by_flag.get(event.notify, 0) | getattr(fanotify, name)
    for flag, mask in marks.items():
        assert mask & ~fanotify.FAN_ONDIR & ~by_flag.get(flag, 0) == 0, hex(flag)


# -- fields at run time


def test_misspelt_field_raises_at_construction() -> None:
    with pytest.raises(AttributeError, match="CBFilterBeforeOpenFileEventParams has no parameter 'fiel_name'"):
        CBFilterBeforeOpenFileEventParams(fiel_name="/x")  # type: ignore[call-arg]
    with pytest.raises(AttributeError, match="has no parameter 'fiel_name'"):
        FILTER_PARAMS["before_open_file"](file_name="/x", fiel_name="/x")
    with pytest.raises(AttributeError, match="CBMonitorNotifyOpenFileEventParams has no parameter 'status_code'"):
        MONITOR_PARAMS["notify_open_file"](status_code=1)
    with pytest.raises(AttributeError):
        PROCESS_PARAMS["process_creation"](pid=1)
    with pytest.raises(TypeError):
        CBFilterBeforeOpenFileEventParams("/x")  # type: ignore[misc]


def test_misspelt_field_raises_when_read_or_assigned() -> None:
    p = CBFilterBeforeOpenFileEventParams(file_name="/x")
    with pytest.raises(AttributeError, match="has no parameter 'fiel_name'"):
        p.fiel_name  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(AttributeError):
        p.fiel_name = "/y"  # type: ignore[attr-defined]
    assert not hasattr(p, "__dict__")


def test_handlers_set_fields() -> None:
    p = FILTER_PARAMS["before_open_file"](file_name="/x", desired_access=1)
    p.result_code = errno.EACCES
    p.process_request = False
    p.file_context = 5
    assert (p.result_code, p.process_request, p.file_context, p.file_name) == (errno.EACCES, False, 5, "/x")


def test_repr_shows_fields_but_not_buffers() -> None:
    p = FILTER_PARAMS["notify_delete_file"](file_name="/d/x")
    assert repr(p) == "CBFilterNotifyDeleteFileEventParams(file_name='/d/x', status=0, result_code=0)"
    r = repr(FILTER_PARAMS["before_read_file"](buffer_view=memoryview(b"secret")))
    assert "buffer" not in r.replace("buffer_length", "") and "secret" not in r


# -- mypy


def test_mypy_reports_a_misspelt_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = pytest.importorskip("mypy.api")
    snippet = tmp_path / "handlers.py"
    snippet.write_text(textwrap.dedent("""\
        import errno
        from fsfilter import CBFilterBeforeOpenFileEventParams, EventParams
        from fsfilter.api.cbmonitor import CBMonitorNotifyOpenFileEventParams
        from fsfilter.api.cbprocess import CBProcessProcessCreationEventParams

        def on_before_open_file(e: CBFilterBeforeOpenFileEventParams) -> None:
            if e.file_name.endswith(".secret"):
                e.result_code = errno.EACCES
                e.process_request = False
                e.file_context = 5
            print(e.fiel_name)  # line 11

        CBMonitorNotifyOpenFileEventParams(fiel_name="/x")  # line 13
        CBProcessProcessCreationEventParams(process_id="1")  # line 14

        def any_event(e: EventParams) -> int:
            return int(e.whatever)  # by event name: unchecked
        """))
    monkeypatch.setenv("MYPYPATH", str(ROOT / "src"))
    out, err, _ = api.run(["--strict", "--no-error-summary", "--cache-dir", str(tmp_path / "cache"), str(snippet)])
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert [int(line.split(":")[1]) for line in errors] == [11, 13, 14], out + err
    assert "[attr-defined]" in errors[0] and "fiel_name" in errors[0]
    assert "[call-arg]" in errors[1] and "[arg-type]" in errors[2]


def test_mypy_checks_the_fields_the_filter_layer_fires(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer fires an event by its parameter class: a misspelt or mistyped field at the call site, or a field
    read from the returned parameters that the event does not have, is a type error, not an EIO the first time
    the event fires."""
    api = pytest.importorskip("mypy.api")
    snippet = tmp_path / "layer.py"
    snippet.write_text(textwrap.dedent("""\
        from fsfilter._engine.dispatch import Origin
        from fsfilter._engine.rules import Flags
        from fsfilter._layers.filter_base import FilterBase
        from fsfilter.api import constants as c
        from fsfilter.api import params as ev

        class Checked(FilterBase):
            def go(self, flags: Flags, origin: Origin) -> None:
                before = self.fire(ev.CBFilterBeforeReadFileEventParams, c.FS_CE_BEFORE_READ, flags, origin,
                                   file_name="/x", position=0, bytes_to_read=10)
                if before is not None and before.process_request:
                    print(before.bytes_to_read)
                self.fire(ev.CBFilterBeforeReadFileEventParams, c.FS_CE_BEFORE_READ, flags, origin,  # line 13
                          fiel_name="/x")
                self.notify(ev.CBFilterNotifyWriteFileEventParams, c.FS_NE_WRITE, flags, origin,
                            position="0")  # line 16
                if before is not None:
                    print(before.bytes_writen)  # line 18
        """))
    monkeypatch.setenv("MYPYPATH", str(ROOT / "src"))
    out, err, _ = api.run(["--strict", "--no-error-summary", "--cache-dir", str(tmp_path / "cache"), str(snippet)])
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert sorted({int(line.split(":")[1]) for line in errors}) == [13, 16, 18], out + err
