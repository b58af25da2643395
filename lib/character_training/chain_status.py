"""Where each persona x size chain stands, read from its run folder: for the index and the table.

A chain is the notebooks of one run folder, run in order. Its state is read from what the
runner leaves there: the status file of every notebook (``notebooks/<nb>.status.json``), the
lock file of a process running it now (`locks.holder`), the executed copy papermill saves after
every cell (how far the running notebook is) and the spend ledger (``spend.jsonl``, `spend`;
"-" for a chain without one). Nothing here writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .locks import LockInfo, holder


@dataclass(frozen=True)
class ChainSummary:
    """One chain as the index shows it."""

    persona: str
    size: str
    state: str  # "running" | "failed" | "incomplete" | "ok" | "not run"
    notebooks_ok: int
    notebooks: int
    failed_notebook: str = ""
    error: str = ""
    running: LockInfo | None = None
    spend_usd: float | None = None

    @property
    def label(self) -> str:
        return f"{self.persona}/{self.size}"

    def describe_state(self) -> str:
        if self.state == "running" and self.running is not None:
            return f"running: {self.running.describe()}"
        if self.state == "failed":
            return f"failed at {self.failed_notebook}"
        return self.state


def _read_json(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def summarize_chain(run_dir: Path) -> ChainSummary:
    """The chain of ``run_dir`` (``runs/<persona>/<size>``) from its status files and lock.

    A notebook that failed makes the chain "failed" (the first failure in notebook order
    is named, with its error: the others were skipped because of it); a skipped notebook
    without a failure (a failure fixed by a later partial run) leaves it "incomplete"."""
    run_dir = Path(run_dir)
    statuses = [_read_json(path) for path in sorted((run_dir / "notebooks").glob("*.status.json"))]
    ok = sum(s.get("status") == "ok" for s in statuses)
    failed = [s for s in statuses if s.get("status") == "failed"]
    running = holder(run_dir)
    if running is not None:
        state = "running"
    elif failed:
        state = "failed"
    elif any(s.get("status") == "skipped" for s in statuses):
        state = "incomplete"
    elif statuses:
        state = "ok"
    else:
        state = "not run"
    first = failed[0] if failed else {}
    return ChainSummary(
        persona=run_dir.parent.name,
        size=run_dir.name,
        state=state,
        notebooks_ok=ok,
        notebooks=len(statuses),
        failed_notebook=str(first.get("notebook", "")),
        error=str(first.get("error", "")),
        running=running,
        spend_usd=spend_usd(run_dir),
    )


def chain_summaries(runs_dir: Path) -> list[ChainSummary]:
    """Every chain under ``runs_dir`` that the runner has touched (a status file or a lock)."""
    found = {path.parent.parent for path in Path(runs_dir).glob("*/*/notebooks/*.status.json")} | {
        path.parent for path in Path(runs_dir).glob("*/*/running.lock")
    }
    return [summarize_chain(run_dir) for run_dir in sorted(found)]


# -- spend ---------------------------------------------------------------------------------------
def spend_usd(run_dir: Path) -> float | None:
    """What the chain has spent so far by its ledger (`spend.ledger_total_usd`: priced USD,
    0 on the local backend), or None when it has no ledger yet."""
    from .spend import ledger_path, ledger_total_usd

    if not ledger_path(run_dir).is_file():
        return None
    try:
        return float(ledger_total_usd(Path(run_dir)))
    except (OSError, ValueError, TypeError):  # a ledger that cannot be read must not stop a table
        return None


def format_usd(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


# -- the running notebook ------------------------------------------------------------------------
def cell_progress(executed: Path) -> tuple[int, int] | None:
    """(code cells finished, code cells) of an executed copy papermill is writing, or None
    when there is no copy yet or it is being rewritten at this instant."""
    try:
        notebook = json.loads(Path(executed).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    cells = [c for c in notebook.get("cells", []) if c.get("cell_type") == "code"]
    done = sum(
        ((c.get("metadata") or {}).get("papermill") or {}).get("status") == "completed"
        for c in cells
    )
    return done, len(cells)
