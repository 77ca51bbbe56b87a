"""Shared by the benchmark programs: where and how their JSON reports are saved."""

from __future__ import annotations

import json
from pathlib import Path


def save_report(report: dict, out: str | None, default_name: str) -> Path:
    """Write `report` as JSON to `out` (or results/<default_name>.json); return the path."""
    path = Path(out or f"results/{default_name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"saved {path}")
    return path
