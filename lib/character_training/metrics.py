"""Append-only JSONL metrics: one record per step, ``step`` first, flat namespaced keys.

Training stages, evaluations and benchmarks all log through `JsonlLogger`, so a notebook or a
later commit can load any of them with one function (`read_metrics`) and compare runs.
Records are flushed line by line: an interrupted run keeps every step it finished.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


class JsonlLogger:
    """Writes ``{"step": n, "time": t, **metrics}`` lines to ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({str(k): _jsonable(v) for k, v in metrics.items()})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=False) + "\n")
        return record


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics file, in the order they were written."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
