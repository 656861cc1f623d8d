"""The benchmarks' output: the report as JSON, and its rows as a table on the terminal."""

from __future__ import annotations

import json
from pathlib import Path


def write_and_show(out: Path, report: object, rows: list[dict], columns: list[tuple[str, str, int]]) -> None:
    """Write `report` to `out`; print `rows` under `columns`: (title, key, width) each."""
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(" ".join(f"{title:>{width}}" for title, _, width in columns))
    for r in rows:
        print(" ".join(f"{r[key]:>{width}}" for _, key, width in columns))
