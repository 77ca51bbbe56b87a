"""Shared by the benchmark programs: where and how their JSON reports are saved."""

from __future__ import annotations

import json
from pathlib import Path


def save_report(report: dict, out: str | None, default_name: str, *,
                partial: bool = False) -> Path:
    """Write `report` as JSON to `out` (or results/<default_name>.json); return the path.

    `partial`: the run goes on. The file is rewritten as each part is measured, marked
    `"partial": true`, so a run cut off (a device call's time limit, a crash) leaves what
    it measured; the final write drops the mark.
    """
    path = Path(out or f"results/{default_name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {**report, "partial": True} if partial else report
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(body, indent=2))
    part.replace(path)  # readers never see half a file
    if not partial:
        print(f"saved {path}")
    return path
