"""The stack of one mount: its layers in altitude order over the pass-through bottom.

Higher altitude = nearer the application: its pre-operation work runs first and its post-operation work last.
Among equal altitudes (allowed unless a filter asks for a strict one) the layer that joined first is higher.
Joining and leaving relink the layers while requests are served: links are set from the bottom up, so that a
request in flight always finds a complete chain below the layer it is in, and the bottom's hooks are replaced
by a new object, never changed in place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from fsfilter._sessions.layer import Layer, StackHooks
from fsfilter._sessions.lower_fs import LowerFS
from fsfilter._wire import ops


class AltitudeTaken(ValueError):
    """Another layer already holds this altitude and one of the two asks for it alone (strict altitude)."""


@dataclass(frozen=True)
class Member:
    layer: Layer
    altitude: float
    strict: bool
    seq: int  # order of joining: among equal altitudes the earlier one is higher
    name: str = ""


class LayerStack:
    """The layers of one mount, ordered by altitude, over ``bottom``."""

    def __init__(self, bottom: LowerFS) -> None:
        self.bottom = bottom
        self._members: list[Member] = []
        self._seq = 0
        self._routers: tuple[Callable[[ops.Op], bool | None], ...] = ()  # the layers' routers, top first
        self._linked: list[Layer] = []  # the layers in the path of requests, top first
        self._lock = threading.Lock()  # joining and leaving; taken after the registry lock, before LowerFS._lock

    @property
    def layers(self) -> list[Layer]:
        """Top first."""
        return [m.layer for m in self._members]

    @property
    def members(self) -> list[Member]:
        return list(self._members)

    def join(self, layer: Layer, altitude: float, strict: bool = False, name: str = "", seq: int | None = None) -> None:
        """Put a layer in at its altitude. ``seq`` orders equal altitudes (lower = higher in the stack; by default
        the order of joining): a filter moved to another mount keeps its place among equals."""
        with self._lock:
            for m in self._members:
                if m.layer is layer:
                    raise ValueError("the layer is in the stack already")
                if m.altitude == altitude and (strict or m.strict):
                    raise AltitudeTaken(f"altitude {altitude:g} is taken by {m.name or 'another filter'}"
                                        + (" which asked for it alone (strict_altitude)" if m.strict else ""))
            self._seq += 1
            self._members.append(Member(layer, altitude, strict, self._seq if seq is None else seq, name))
            self._members.sort(key=lambda m: (-m.altitude, m.seq))
            self._relink()

    def leave(self, layer: Layer) -> bool:
        """Take a layer out; True when it was in. Requests it is serving finish through the layers below it."""
        with self._lock:
            kept = [m for m in self._members if m.layer is not layer]
            if len(kept) == len(self._members):
                return False
            self._members = kept
            self._relink()
        layer.left()
        return True

    def refresh(self) -> None:
        """A layer's filter changed its rules: link in a layer that now takes requests."""
        with self._lock:
            if [m.layer for m in self._members if m.layer.takes_requests()] != self._linked:
                self._relink()

    def _relink(self) -> None:
        layers = [m.layer for m in self._members if m.layer.takes_requests()]
        self._linked = layers
        below: Layer = self.bottom
        for layer in reversed(layers):  # from the bottom up: a chain is complete before anything enters it
            layer.down = below
            below = layer
        self._routers = tuple(r for r in (getattr(layer, "route", None) for layer in layers) if r is not None)
        self.bottom.set_top(below, StackHooks(layers))

    def route(self, op: ops.Op) -> bool | None:
        """Where the session serves a request: on a pool thread when any layer may wait on an application's
        handler for it (True), on the reader when a layer says it is the filtering process's own (False)."""
        verdict: bool | None = None
        for route in self._routers:
            said = route(op)
            if said:
                return True
            if said is False:
                verdict = False
        return verdict
