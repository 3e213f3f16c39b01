"""What CBMonitor and CBProcess share: handlers assigned as ``on_<event>`` attributes (checked when set), the
``config("Name=Value")`` form over a table of settings, and an ``on_error`` that never raises into the thread
that reports."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any

from fsfilter._engine.rules import Rule, RuleSet
from fsfilter.api._params_base import EventParams
from fsfilter.errors import CBFSFilterError

__all__ = ["MAX_TIMEOUT_MS", "MAX_WORKER_THREADS", "EventSource", "RuleTables", "check_thread_count", "check_timeout",
           "split_setting"]

log = logging.getLogger("fsfilter")

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


class EventSource:
    """Base of the classes whose events are ``on_*`` attributes. Subclasses set ``PARAMS`` (event -> params
    class), ``DOC`` (where their events are described) and may set ``UNSUPPORTED`` (event -> why a handler
    cannot be set on Linux), then call ``_init_events`` at the end of ``__init__``."""

    PARAMS: dict[str, type[EventParams]] = {}
    DOC = "docs/api.md"
    UNSUPPORTED: dict[str, str] = {}
    _ready = False
    _config: dict[str, str]

    def _init_events(self) -> None:
        for name in self.PARAMS:
            object.__setattr__(self, "on_" + name, None)
        object.__setattr__(self, "_ready", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("on_") and self._ready:
            kind = type(self).__name__
            if name[3:] not in self.PARAMS:
                raise CBFSFilterError(errno.EINVAL, f"{kind} has no event {name[3:]!r}: see {self.DOC}")
            if value is not None and not callable(value):
                raise CBFSFilterError(errno.EINVAL, f"{name} takes a function of one argument or None")
            if value is not None and name[3:] in self.UNSUPPORTED:
                raise CBFSFilterError(errno.ENOSYS, f"{name}: {self.UNSUPPORTED[name[3:]]} (see {self.DOC})")
        object.__setattr__(self, name, value)

    def handler(self, event: str) -> Callable[[Any], object] | None:
        h: Callable[[Any], object] | None = getattr(self, "on_" + event, None)
        return h

    def _fire_error(self, code: int, description: str) -> None:
        handler = self.handler("error")
        if handler is None:
            log.error("%s", description)
            return
        try:
            handler(self.PARAMS["error"](error_code=code, description=description))
        except Exception:
            log.exception("on_error raised")

    def config(self, configuration_string: str) -> str:
        """``"Name=Value"`` sets a setting (checked by ``_check_setting``), ``"Name"`` reads it."""
        name, sep, value = split_setting(configuration_string)
        if name not in self._config:
            raise CBFSFilterError(errno.EINVAL, f"unknown setting {name!r}; known: {', '.join(sorted(self._config))}")
        if not sep:
            return self._config[name]
        self._config[name] = self._check_setting(name, value)
        return ""

    def _check_setting(self, name: str, value: str) -> str:
        """The value to store for a setting, or CBFSFilterError(EINVAL). Here: booleans and counts."""
        if self._config[name] in ("true", "false"):
            if value.lower() not in _TRUE + _FALSE:
                raise CBFSFilterError(errno.EINVAL, f"{name} takes true or false, not {value!r}")
            return "true" if value.lower() in _TRUE else "false"
        if name.endswith("WorkerThreadCount"):
            return check_thread_count(name, value, self._config)
        if not value.isdigit():
            raise CBFSFilterError(errno.EINVAL, f"{name} takes a whole number >= 0, not {value!r}")
        return value


MAX_WORKER_THREADS = 256
MAX_TIMEOUT_MS = 2**31 - 1  # about 24.8 days: what the SDK's 32-bit timeout can say, and what threads can wait


def check_timeout(timeout: object) -> int:
    """A ``start_filter`` timeout: whole milliseconds from 0 (no limit) to MAX_TIMEOUT_MS."""
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 0 <= timeout <= MAX_TIMEOUT_MS:
        raise CBFSFilterError(errno.EINVAL, f"timeout must be milliseconds from 0 (no limit) to {MAX_TIMEOUT_MS}, "
                                            f"not {timeout!r}")
    return timeout


def split_setting(configuration_string: object) -> tuple[str, str, str]:
    """``"Name=Value"`` or ``"Name"`` as (name, "=" or "", value), names and values stripped."""
    if not isinstance(configuration_string, str):
        raise CBFSFilterError(errno.EINVAL, f"config takes a string 'Name' or 'Name=Value', not "
                                            f"{type(configuration_string).__name__}")
    name, sep, value = configuration_string.partition("=")
    return name.strip(), sep, value.strip()


def check_thread_count(name: str, value: str, config: dict[str, str]) -> str:
    """A Min/MaxWorkerThreadCount value, checked here rather than at start: a whole number up to
    MAX_WORKER_THREADS (0 for Max = the default), and Min not above a Max that is set."""
    if not value.isdigit() or int(value) > MAX_WORKER_THREADS:
        raise CBFSFilterError(errno.EINVAL, f"{name} takes a whole number from 0 to {MAX_WORKER_THREADS}, "
                                            f"not {value!r}")
    count = int(value)
    low = count if name.startswith("Min") else int(config.get("MinWorkerThreadCount", "0"))
    high = count if name.startswith("Max") else int(config.get("MaxWorkerThreadCount", "0"))
    if high and low > high:
        raise CBFSFilterError(errno.EINVAL, f"MinWorkerThreadCount {low} would be above MaxWorkerThreadCount {high}: "
                                            "raise the maximum first")
    return str(count)


class RuleTables:
    """The SDK's rule getters over ``rules`` and ``passthrough_rules`` (CBFilter and CBMonitor): a count property
    and ``get_<table>_rule_<field>(i)`` for each field; a bad index raises EINVAL."""

    rules: RuleSet
    passthrough_rules: RuleSet

    @property
    def filter_rule_count(self) -> int:
        return len(self.rules)

    @property
    def passthrough_rule_count(self) -> int:
        return len(self.passthrough_rules)

    def _rule(self, rules: RuleSet, index: int) -> Rule:
        if not isinstance(index, int) or not 0 <= index < len(rules):
            raise CBFSFilterError(errno.EINVAL, f"no rule at index {index!r} (there are {len(rules)})")
        return rules[index]

    def get_filter_rule_mask(self, i: int) -> str:
        return str(self._rule(self.rules, i).mask)

    def get_filter_rule_access_flags(self, i: int) -> int:
        return int(self._rule(self.rules, i).access)

    def get_filter_rule_control_flags(self, i: int) -> int:
        return int(self._rule(self.rules, i).control)

    def get_filter_rule_notify_flags(self, i: int) -> int:
        return int(self._rule(self.rules, i).notify)

    def get_filter_rule_ea_name(self, i: int) -> str:
        return str(self._rule(self.rules, i).ea_name)

    def get_filter_rule_min_size(self, i: int) -> int:
        return int(self._rule(self.rules, i).min_size)

    def get_filter_rule_max_size(self, i: int) -> int:
        return int(self._rule(self.rules, i).max_size)

    def get_filter_rule_included_attributes(self, i: int) -> int:
        return int(self._rule(self.rules, i).included_attributes)

    def get_filter_rule_excluded_attributes(self, i: int) -> int:
        return int(self._rule(self.rules, i).excluded_attributes)

    def get_passthrough_rule_mask(self, i: int) -> str:
        return str(self._rule(self.passthrough_rules, i).mask)

    def get_passthrough_rule_access_flags(self, i: int) -> int:
        return int(self._rule(self.passthrough_rules, i).access)

    def get_passthrough_rule_control_flags(self, i: int) -> int:
        return int(self._rule(self.passthrough_rules, i).control)

    def get_passthrough_rule_notify_flags(self, i: int) -> int:
        return int(self._rule(self.passthrough_rules, i).notify)

    def get_passthrough_rule_ea_name(self, i: int) -> str:
        return str(self._rule(self.passthrough_rules, i).ea_name)

    def get_passthrough_rule_min_size(self, i: int) -> int:
        return int(self._rule(self.passthrough_rules, i).min_size)

    def get_passthrough_rule_max_size(self, i: int) -> int:
        return int(self._rule(self.passthrough_rules, i).max_size)

    def get_passthrough_rule_included_attributes(self, i: int) -> int:
        return int(self._rule(self.passthrough_rules, i).included_attributes)

    def get_passthrough_rule_excluded_attributes(self, i: int) -> int:
        return int(self._rule(self.passthrough_rules, i).excluded_attributes)
