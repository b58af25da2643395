"""The matrix's live table: each chain's state, stage, progress, time and spend.

On a terminal the table is redrawn in place every ``refresh_s`` seconds and on every event,
with the runner's result lines (and log records) printed above it, so the screen shows what
finished and what is running now. Anywhere else (a pipe, a log file, CI) redrawing would fill
the log, so only the events are printed, one line each ("sarcastic/qwen3.5-9b: 03_dpo started
(3/9)", then the result line), and the table once at the end.

Progress inside a notebook is read from the executed copy papermill saves after every cell
(`chain_status.cell_progress`); spend from the chain's ledger (`chain_status.spend_usd`, "-"
without one). The runner calls `chain_started`, `stage_started`, `result` and
`chain_finished` from its worker threads; every method is safe to call from any thread.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from .chain_status import cell_progress, format_usd, spend_usd

STATES = ("queued", "running", "ok", "failed", "stopped")


@dataclass
class ChainRow:
    persona: str
    size: str
    run_dir: Path
    notebooks: int
    state: str = "queued"
    stage: str = ""
    done: int = 0  # notebooks finished (ok, failed or skipped)
    failed: str = ""  # the first notebook that failed
    started: float | None = None
    finished: float | None = None

    @property
    def label(self) -> str:
        return f"{self.persona}/{self.size}"


def _clock_text(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class MatrixTable:
    """See the module docstring. ``live=None`` decides by whether ``stream`` is a terminal."""

    def __init__(
        self,
        stream: TextIO | None = None,
        live: bool | None = None,
        refresh_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stream = stream or sys.stdout
        self.live = bool(self.stream.isatty()) if live is None else live
        self.refresh_s = refresh_s
        self.clock = clock
        self.rows: dict[tuple[str, str], ChainRow] = {}
        self.jobs = 1
        self._lock = threading.RLock()
        self._drawn = 0  # lines of the table now on screen (live mode)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handlers: list[tuple[logging.Handler, logging.Handler]] = []

    # -- events (from the runner's threads) ------------------------------------------------------
    def add_chain(self, persona: str, size: str, run_dir: Path, notebooks: int) -> None:
        with self._lock:
            self.rows[(persona, size)] = ChainRow(persona, size, Path(run_dir), notebooks)

    def chain_started(self, persona: str, size: str) -> None:
        with self._lock:
            row = self.rows[(persona, size)]
            row.state, row.started = "running", self.clock()
            self._redraw()

    def stage_started(self, persona: str, size: str, notebook: str) -> None:
        with self._lock:
            row = self.rows[(persona, size)]
            row.stage = notebook
            if not self.live:
                self._write(f"{row.label}: {notebook} started ({row.done + 1}/{row.notebooks})")
            self._redraw()

    def result(self, result: Any, show: bool = True) -> None:
        """A notebook's row (`runner.NotebookResult`): counted in its chain and, with
        ``show``, printed."""
        with self._lock:
            row = self.rows.get((result.persona, result.size))
            if row is not None:
                row.done += 1
                if result.status == "failed" and not row.failed:
                    row.failed = result.notebook
            if show:
                self.log(result.describe())
            else:
                self._redraw()

    def chain_finished(self, persona: str, size: str, stopped: bool = False) -> None:
        with self._lock:
            row = self.rows[(persona, size)]
            row.finished = self.clock()
            row.stage = ""
            row.state = "stopped" if stopped else ("failed" if row.failed else "ok")
            self._redraw()

    def log(self, line: str) -> None:
        """Print a line above the table (live) or on its own (plain)."""
        with self._lock:
            self._clear()
            self._write(line)
            self._redraw()

    # -- rendering ---------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self._lock:
            return {state: sum(r.state == state for r in self.rows.values()) for state in STATES}

    def render(self) -> str:
        """The table as text (what a terminal shows; `stop` prints it at the end)."""
        with self._lock:
            now = self.clock()
            counts = self.counts()
            head = f"matrix: {len(self.rows)} chain(s), --jobs {self.jobs}: " + ", ".join(
                f"{n} {state}" for state, n in counts.items() if n
            )
            lines = [
                head,
                f"{'chain':<34}{'state':<9}{'stage':<24}{'progress':<28}{'time':>9}{'USD':>10}",
            ]
            for row in self.rows.values():
                lines.append(
                    f"{row.label[:33]:<34}{row.state:<9}{self._stage_text(row)[:23]:<24}"
                    f"{self._progress_text(row)[:27]:<28}{self._time_text(row, now):>9}"
                    f"{format_usd(spend_usd(row.run_dir)):>10}"
                )
            return "\n".join(lines)

    def _stage_text(self, row: ChainRow) -> str:
        if row.state == "failed":
            return f"failed at {row.failed}"
        return row.stage or "-"

    def _progress_text(self, row: ChainRow) -> str:
        text = f"{row.done}/{row.notebooks} notebooks"
        if row.state == "running" and row.stage:
            cells = cell_progress(row.run_dir / "notebooks" / f"{row.stage}.ipynb")
            if cells is not None and cells[1]:
                text += f", cell {cells[0]}/{cells[1]}"
        return text

    def _time_text(self, row: ChainRow, now: float) -> str:
        if row.started is None:
            return "-"
        return _clock_text((row.finished or now) - row.started)

    # -- output ------------------------------------------------------------------------------------
    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _clear(self) -> None:
        if self.live and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # up to the table's top, erase down
            self._drawn = 0

    def _redraw(self) -> None:
        if not self.live or self._thread is None:
            return
        self._clear()
        # clipped to the terminal: a wrapped row would take two lines, and the next redraw,
        # which moves up one line per row, would leave half of the table behind
        width = max(20, shutil.get_terminal_size().columns - 1)
        lines = [line[:width] for line in self.render().splitlines()]
        self._write("\n".join(lines))
        self._drawn = len(lines)

    def start(self, jobs: int) -> MatrixTable:
        """Begin showing the table; in live mode log records go above it too."""
        self.jobs = jobs
        if self.live and self._thread is None:
            self._route_logging()
            self._thread = threading.Thread(target=self._tick, name="matrix-table", daemon=True)
            self._thread.start()
            self._redraw()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(self.refresh_s):
            with self._lock:
                self._redraw()

    def stop(self) -> None:
        """Stop redrawing and leave the final table on screen (printed once in plain mode)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._clear()
            self._write(self.render())
            self._thread = None
        for ours, theirs in self._handlers:
            logging.getLogger().removeHandler(ours)
            logging.getLogger().addHandler(theirs)
        self._handlers = []

    def _route_logging(self) -> None:
        """Terminal handlers of the root logger write through `log` while the table is live
        (a record printed straight to the terminal would be drawn over)."""
        root = logging.getLogger()
        for handler in list(root.handlers):
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and stream is not None:
                if getattr(stream, "isatty", lambda: False)():
                    ours = _TableHandler(self)
                    ours.setFormatter(handler.formatter)
                    ours.setLevel(handler.level)
                    root.removeHandler(handler)
                    root.addHandler(ours)
                    self._handlers.append((ours, handler))


class _TableHandler(logging.Handler):
    def __init__(self, table: MatrixTable):
        super().__init__()
        self.table = table

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.table.log(self.format(record))
        except Exception:  # logging must never break the run
            self.handleError(record)
