"""Writing reports: rows of dicts as CSV, values as strict JSON (no Lightning here).

Shared by the calibration callback (`thresholds.json`, `budget_curve.csv`) and `make results`
(`benchmarks/results.py`: demo.json, demo.csv).
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Rows of dicts as CSV, the columns in first-seen order."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None (strict JSON), through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
