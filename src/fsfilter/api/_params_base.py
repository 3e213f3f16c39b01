"""The base of the event-parameter classes (generated from fsfilter.api.events into params.py, monitor_params.py
and process_params.py).

Fields are slots set in ``__init__``; a handler reads and assigns them (``e.result_code = errno.EACCES``). A field
the event does not have raises ``AttributeError`` when it is read, assigned or given to the constructor; mypy
reports all three for the generated classes.

``EventParams`` is the type of "some event's parameters" for code that picks the event by its name
(``FILTER_PARAMS[event](**fields)``) and so cannot name its fields statically: for mypy, any field goes there.
At run time it is the same class as ``EventParamsBase``, the base of every generated class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self, cast

# Not shown by repr: large, and valid only inside the handler.
_NOT_SHOWN = frozenset({"buffer", "buffer_view", "security_descriptor", "input_buffer", "output_buffer",
                        "reparse_buffer"})


__all__ = ["EventParams", "EventParamsBase", "by_event"]


class EventParamsBase:
    """Base of every event-parameter class."""

    __slots__: tuple[str, ...] = ()
    _fields: ClassVar[frozenset[str]] = frozenset()
    result_code: int  # every event has it; declared here for code that holds only the base

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls._fields = frozenset(cls.__slots__)

    def __new__(cls, /, **fields: object) -> Self:
        # A field the event does not have is an AttributeError naming the class, as reading or assigning one is
        # (and not the TypeError the generated __init__ would raise).
        if not fields.keys() <= cls._fields:
            unknown = sorted(fields.keys() - cls._fields)
            raise AttributeError(f"{cls.__name__} has no parameter {unknown[0]!r}")
        return super().__new__(cls)

    if not TYPE_CHECKING:  # hidden from mypy, which would otherwise accept any attribute of every subclass
        def __getattr__(self, name):  # only reached for names the class does not have
            raise AttributeError(f"{type(self).__name__} has no parameter {name!r}")

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__ if n not in _NOT_SHOWN)
        return f"{type(self).__name__}({shown})"


if TYPE_CHECKING:
    class EventParams(EventParamsBase):
        """Some event's parameters, for code that chooses the event by name: any field, of any type."""

        def __getattr__(self, name: str) -> Any: ...

        def __setattr__(self, name: str, value: Any) -> None: ...
else:
    EventParams = EventParamsBase


def by_event(classes: Mapping[str, type[EventParamsBase]]) -> dict[str, type[EventParams]]:
    """The classes by event name, typed for code that picks one by name (see EventParams): mypy cannot know
    which class a name gives, so what it builds takes any field."""
    return cast("dict[str, type[EventParams]]", dict(classes))
