"""docs/api.md §4 lists every CBFilter member of the reference with its status: each must exist here, with one of
the three statuses the document defines (no member is missing or merely planned)."""

from __future__ import annotations

import re
from pathlib import Path

from fsfilter import CBFilter

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
STATUSES = {"implemented", "Linux meaning", "not applicable"}


def section(title: str) -> list[list[str]]:
    text = DOC.read_text()
    start = text.index(title)
    end = text.find("\n### ", start + len(title))
    rows = []
    for line in text[start:end].splitlines():
        if line.startswith("| `"):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def name_of(cell: str) -> str:
    return re.match(r"`([A-Za-z_0-9]+)", cell).group(1)  # type: ignore[union-attr]


def test_every_method_and_property_in_the_table_exists() -> None:
    f = CBFilter()
    rows = section("### 4.1 Methods") + section("### 4.2 Properties")
    assert len(rows) > 60
    for row in rows:
        name, status = name_of(row[0]), row[1]
        assert status in STATUSES, row
        assert hasattr(f, name), f"docs/api.md lists {name}, which CBFilter lacks"


def test_every_event_in_the_table_exists_and_has_a_status() -> None:
    f = CBFilter()
    rows = section("### 4.3 Events")
    assert len(rows) == 103
    for row in rows:
        name, status = name_of(row[0]), row[2]
        assert status in STATUSES, row
        assert name.startswith("on_") and hasattr(f, name), name
