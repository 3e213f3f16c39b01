"""The layer of one CBFilter in the stack of a mount: rules, access checks, events, contexts.

For each operation it finds what its filter's rules say about the path (cached per node, keyed by the rules'
generation), enforces access rules, fires the Before event (which may deny, change or complete the request),
has the layers below serve the request, fires the After event (which may change what the caller gets) and
queues the notification. A request this filter's rules cannot concern passes down untouched.

Paths in events are absolute paths as applications see them (the mount point plus the path below it). The
layer is one class made of parts: filter_base (scope, matching, firing, contexts), filter_naming (reparse targets
and hidden names), and by operation group filter_names, filter_open, filter_io, filter_listing and filter_changes.
"""

from __future__ import annotations

from fsfilter._layers.filter_base import FilterBase, FilterCore
from fsfilter._layers.filter_changes import ChangeOps
from fsfilter._layers.filter_io import IoOps
from fsfilter._layers.filter_listing import ListingOps
from fsfilter._layers.filter_names import NameOps
from fsfilter._layers.filter_open import OpenOps

__all__ = ["FilterBase", "FilterCore", "FilterLayer"]


class FilterLayer(NameOps, OpenOps, IoOps, ListingOps, ChangeOps):
    """The layer of one filter (``core``) in the stack of the mount at ``base``, whose bottom is ``lower``;
    ``scope``: the directory the filter is attached to, when it is below the mount's."""
