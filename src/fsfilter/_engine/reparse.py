"""Reparse rules: paths matching a mask resolve to another path (name redirection).

A rule is ``mask -> reparse_mask``, both absolute path masks. What the mask's wildcards matched, in order,
replaces the wildcards of the reparse mask: ``/data/in/* -> /srv/store/*`` sends ``/data/in/a/b.txt`` to
``/srv/store/a/b.txt``; ``/data/*.log -> /var/log/app/*.log`` keeps the stem; a reparse mask without
wildcards sends every matching path to one place. The first rule added that matches wins. Pure: no I/O.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from fsfilter._engine.masks import FileMask, MaskError, compile_mask

_WILDCARD = re.compile(r"[*?]")


@dataclass(frozen=True)
class ReparseRule:
    mask: FileMask
    target: str
    flags: int
    _capture: re.Pattern[str]

    def resolve(self, path: str) -> str | None:
        """The path ``path`` is sent to, or None when the rule does not match it."""
        if not self.mask.matches_path(path):
            return None
        found = self._capture.fullmatch(path)
        parts: list[str] = list(found.groups()) if found else []
        if not found:
            # The SDK's DOS-style matching ("*.*" matching a name without a dot) matched where plain
            # wildcards do not: the first wildcard of the target takes the rest after the fixed prefix.
            prefix = self.mask.prefix or "/"
            parts = [path[len(prefix.rstrip("/")) + 1:]]
        pieces = iter(parts)
        return _WILDCARD.sub(lambda _: next(pieces, ""), self.target)


class ReparseRules:
    def __init__(self) -> None:
        self._rules: list[ReparseRule] = []
        self._lock = threading.Lock()
        self.generation = 0

    def add(self, mask: str, target: str, flags: int = 0) -> None:
        fm = compile_mask(mask)
        if fm.process is not None or fm.inverted or fm.name_only or not fm.path_mask.startswith("/"):
            raise MaskError(f"reparse mask {mask!r} must be an absolute path mask, without process part or '||'")
        if not isinstance(target, str) or not target.startswith("/") or "//" in target or "\0" in target:
            raise MaskError(f"reparse target {target!r} must be an absolute path (wildcards allowed)")
        if any(part in (".", "..") for part in target.split("/")):
            raise MaskError(f"reparse target {target!r} must be normalised: no '.' or '..' components")
        wanted = len(_WILDCARD.findall(target))
        have = len(_WILDCARD.findall(fm.path_mask))
        if wanted > have:
            raise MaskError(f"reparse target {target!r} has {wanted} wildcard(s) but mask {mask!r} only {have}")
        capture = re.compile("".join("(.*)" if ch == "*" else "(.)" if ch == "?" else re.escape(ch)
                                     for ch in fm.path_mask), re.DOTALL)
        rule = ReparseRule(fm, target.rstrip("/") or "/", flags, capture)
        with self._lock:
            self._rules = [r for r in self._rules if r.mask.text != mask] + [rule]
            self.generation += 1

    def delete(self, mask: str) -> bool:
        with self._lock:
            kept = [r for r in self._rules if r.mask.text != mask]
            if len(kept) == len(self._rules):
                return False
            self._rules = kept
            self.generation += 1
            return True

    def clear(self) -> bool:
        with self._lock:
            had = bool(self._rules)
            self._rules = []
            self.generation += 1
            return had

    def __len__(self) -> int:
        return len(self._rules)

    def rules(self) -> list[ReparseRule]:
        return list(self._rules)

    def target_of(self, mask: str) -> str:
        return next((r.target for r in self._rules if r.mask.text == mask), "")

    def resolve(self, path: str) -> tuple[str, ReparseRule] | None:
        """Where ``path`` is sent by the first matching rule, with that rule."""
        for rule in self._rules:
            target = rule.resolve(path)
            if target is not None:
                return target, rule
        return None

    def prefixes(self) -> set[str]:
        return {r.mask.prefix or "/" for r in self._rules}

    def may_reach(self, path: str) -> bool:
        """Whether a rule could match ``path`` or something below it."""
        for rule in self._rules:
            prefix = rule.mask.prefix or "/"
            if path == prefix or path.startswith(prefix.rstrip("/") + "/") or prefix.startswith(path.rstrip("/") + "/"):
                return True
        return False
