"""What a run actually spent: the ledger ``runs/<persona>/<size>/spend.jsonl``.

`costs` plans; this module records. Every request a stage puts to the service is counted where
it is made, in the service-client wrapper `metering.MeteredService` that
`backends.service_client_for` hands every notebook: prompt tokens the service reads (``sample``
and ``compute_logprobs`` prompts, ``forward`` inputs), tokens it samples (the replies it
returned) and tokens it trains (``forward_backward`` and ``forward_backward_custom`` inputs).
The same wrapper sits on both backends, so a local run's ledger has the same token counts a
Tinker run of the same parameters would bill.

Pricing is `costs.price_tokens`, the dry-run's rule and dated table, so estimate and ledger can
be compared line by line. A local run is recorded at 0 USD with the label "local backend, no
charge" (its models are not Tinker's, and Tinker's price of another model would be a made-up
number); its token counts are still there. A Tinker model missing from the price table is
recorded with ``usd: null`` and shown as "price unknown", never as free.

The ledger is append-only JSONL. A row is what one stage asked of one model since the previous
row (deltas): ``stage`` (the notebook, e.g. ``07_preferences``), ``model``, ``prefill_tokens``,
``sample_tokens``, ``train_tokens``, ``usd``, ``priced`` (``table <as_of>``, ``local`` or
``unknown``) and ``time``. Rows are written every few seconds while a stage runs and when it
stops, so an interruption loses at most those seconds of counts; totals are sums of rows, so a
resumed stage simply adds to what its first attempt spent.

Which stage a request belongs to: ``CHARACTER_TRAINING_STAGE`` when set (a script, a notebook
run by hand), else the stage the runner's lock file of the run folder names (`locks`), else
the notebook whose executed copy in ``notebooks/`` is newer than its status file (papermill
saves it after every cell; the runner writes the status file last), else ``interactive``.
"""

from __future__ import annotations

import html
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import append_jsonl, read_jsonl

LEDGER_FILE = "spend.jsonl"
STAGE_ENV = "CHARACTER_TRAINING_STAGE"
LOCAL_LABEL = "local backend, no charge"
UNATTRIBUTED = "interactive"
FLUSH_EVERY_S = 5.0  # the most counts an interruption can lose, in seconds of requests


@dataclass
class Tokens:
    """Token counts of one kind of work: read (prefill), generated (sample), trained."""

    prefill: int = 0
    sample: int = 0
    train: int = 0

    def add(self, prefill: int = 0, sample: int = 0, train: int = 0) -> None:
        self.prefill += int(prefill)
        self.sample += int(sample)
        self.train += int(train)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.sample or self.train)


@dataclass
class StageSpend:
    """A stage's (or a run's) recorded tokens and price; ``usd`` counts only priced rows and
    ``unpriced`` names the models whose price is unknown."""

    tokens: Tokens
    usd: float = 0.0
    unpriced: tuple[str, ...] = ()
    local: bool = False

    def usd_text(self) -> str:
        if self.local:
            return f"0.00 USD ({LOCAL_LABEL})"
        text = f"{self.usd:.2f} USD"
        if self.unpriced:
            text += f" + unknown ({', '.join(self.unpriced)} not in the price table)"
        return text

    def line(self) -> str:
        t = self.tokens
        return (
            f"{self.usd_text()}: {t.prefill:,} prefill, {t.sample:,} sampled, "
            f"{t.train:,} trained tokens"
        )


# -- pricing -------------------------------------------------------------------------------------
def price(params: Any, model: str, tokens: Tokens) -> float | None:
    """USD of ``tokens`` of ``model`` under the run's price table (`costs.price_tokens`)."""
    from .costs import price_tokens

    return price_tokens(params, model, tokens.prefill, tokens.sample, tokens.train)


def price_label(params: Any, model: str) -> str:
    if params.backend == "local":
        return "local"
    if model not in params.prices.per_million:
        return "unknown"
    return f"table {params.prices.as_of or 'undated'}"


# -- reading -------------------------------------------------------------------------------------
def ledger_path(run_dir: Path) -> Path:
    return Path(run_dir) / LEDGER_FILE


def read_ledger(run_dir: Path) -> list[dict[str, Any]]:
    """The ledger's rows (a torn last line, from a process stopped mid-write, is skipped)."""
    return [row for row in read_jsonl(ledger_path(run_dir)) if isinstance(row, dict)]


def summarize(rows: Sequence[Mapping[str, Any]]) -> StageSpend:
    """Tokens and price of ``rows`` together."""
    tokens = Tokens()
    usd = 0.0
    unpriced: dict[str, None] = {}
    local = bool(rows)
    for row in rows:
        tokens.add(
            row.get("prefill_tokens", 0), row.get("sample_tokens", 0), row.get("train_tokens", 0)
        )
        local = local and row.get("priced") == "local"
        if row.get("usd") is None:
            unpriced[str(row.get("model", "?"))] = None
        else:
            usd += float(row["usd"])
    return StageSpend(tokens, usd, tuple(unpriced), local)


def by_stage(rows: Sequence[Mapping[str, Any]]) -> dict[str, StageSpend]:
    """Per stage (in the order stages first appear), what it spent."""
    stages: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        stages.setdefault(str(row.get("stage", UNATTRIBUTED)), []).append(row)
    return {stage: summarize(found) for stage, found in stages.items()}


def ledger_total_usd(run_dir: Path) -> float:
    """Priced USD a run has spent so far (what ``--max-usd`` counts and the matrix shows)."""
    return summarize(read_ledger(run_dir)).usd


# -- recording -----------------------------------------------------------------------------------
class Ledger:
    """Counts of one stage's requests, appended to the run's ledger as it runs.

    `charge` adds counts in memory (thread-safe: a matrix's threads and the SDK's callbacks may
    charge at once); `flush` appends one row per model with new counts and is called every
    ``flush_every_s`` seconds by `charge`, by `metering` when a stage stops, and at exit.
    `spent_usd` is what this run had spent when the ledger was opened plus everything charged
    since, flushed or not.
    """

    def __init__(
        self, run_dir: Path, params: Any, stage: str, flush_every_s: float = FLUSH_EVERY_S
    ):
        self.run_dir = Path(run_dir)
        self.params = params
        self.stage = stage
        self.flush_every_s = float(flush_every_s)
        self._pending: dict[str, Tokens] = {}
        self._lock = threading.Lock()
        self._earlier_usd = ledger_total_usd(self.run_dir)
        self._flushed_usd = 0.0
        self._last_flush = time.monotonic()

    @property
    def path(self) -> Path:
        return ledger_path(self.run_dir)

    def charge(self, model: str, prefill: int = 0, sample: int = 0, train: int = 0) -> None:
        with self._lock:
            self._pending.setdefault(model, Tokens()).add(prefill, sample, train)
            due = time.monotonic() - self._last_flush >= self.flush_every_s
        if due:
            self.flush()

    def pending_usd(self) -> float:
        with self._lock:
            return sum(price(self.params, m, t) or 0.0 for m, t in self._pending.items())

    def spent_usd(self) -> float:
        return self._earlier_usd + self._flushed_usd + self.pending_usd()

    def flush_if_run_exists(self) -> None:
        """`flush`, unless the run folder is gone (what the exit hook calls: a test's or a
        deleted run's folder is not made again just to hold a ledger)."""
        if self.run_dir.is_dir():
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._last_flush = time.monotonic()
            for model, tokens in pending.items():
                if not tokens:
                    continue
                usd = price(self.params, model, tokens)
                self._flushed_usd += usd or 0.0
                append_jsonl(
                    self.path,
                    {
                        "time": time.time(),
                        "stage": self.stage,
                        "model": model,
                        "prefill_tokens": tokens.prefill,
                        "sample_tokens": tokens.sample,
                        "train_tokens": tokens.train,
                        "usd": None if usd is None else round(usd, 6),
                        "priced": price_label(self.params, model),
                    },
                )


# -- which stage is running ----------------------------------------------------------------------
def current_stage(run_dir: Path) -> str:
    """The label of the stage now charging this run (see the module docstring)."""
    named = os.environ.get(STAGE_ENV, "").strip()
    if named:
        return named
    try:
        from .locks import holder

        running = holder(Path(run_dir))
        if running is not None and running.stage:
            return running.stage
    except (ImportError, OSError, AttributeError):
        pass
    folder = Path(run_dir) / "notebooks"
    running = []
    for executed in folder.glob("[0-9][0-9]_*.ipynb"):
        status = executed.with_suffix(".status.json")
        mtime = executed.stat().st_mtime
        if not status.is_file() or status.stat().st_mtime < mtime:
            running.append((mtime, executed.stem))
    return max(running)[1] if running else UNATTRIBUTED


# -- showing -------------------------------------------------------------------------------------
def stage_line(run_dir: Path, stage: str) -> str | None:
    """``spend of <stage>: ...; run total ...`` for a report's footer; None without a ledger."""
    rows = read_ledger(run_dir)
    if not rows:
        return None
    mine = [row for row in rows if row.get("stage") == stage]
    total = summarize(rows)
    head = f"spend of {stage}: {summarize(mine).line()}" if mine else f"{stage}: no spend recorded"
    return f"{head}; run total {total.usd_text()}{_as_of(rows)}, from {LEDGER_FILE}"


def run_line(run_dir: Path) -> str:
    """The run's total for the index, the summary and the provenance page."""
    rows = read_ledger(run_dir)
    if not rows:
        return "no spend recorded (no spend.jsonl)"
    return f"{summarize(rows).line()}{_as_of(rows)}"


def stage_lines(run_dir: Path) -> list[str]:
    """One line per stage and model: the run's bill (``07_preferences, <judge>: ...``)."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in read_ledger(run_dir):
        key = (str(row.get("stage", UNATTRIBUTED)), str(row.get("model", "?")))
        groups.setdefault(key, []).append(row)
    return [
        f"{stage}, {model}: {summarize(rows).line()}" for (stage, model), rows in groups.items()
    ]


def _as_of(rows: Sequence[Mapping[str, Any]]) -> str:
    """`` (prices table 2026-06-26)``: which price tables the rows were priced with; empty for
    a local run (its amounts already say "no charge")."""
    labels = sorted({str(row.get("priced", "?")) for row in rows} - {"local"})
    return f" (prices {', '.join(labels)})" if labels else ""


def footer_html(run_dir: Path, stage: str) -> str:
    line = stage_line(run_dir, stage)
    if line is None:
        return ""
    return (
        '<footer class="spend" style="margin:2em 0 1em;font-size:small;color:#555">'
        f"<p>{html.escape(line)}</p></footer>"
    )


def with_footer(page: str, executed_notebook: Path, extra: str = "") -> str:
    """``page`` (a report rendered from ``runs/<p>/<s>/notebooks/<stage>.ipynb``) with the
    stage's spend, then ``extra`` (other footer HTML), before ``</body>``; unchanged when the
    run has no ledger and there is no ``extra``."""
    executed_notebook = Path(executed_notebook)
    footer = footer_html(executed_notebook.parent.parent, executed_notebook.stem) + extra
    if not footer:
        return page
    at = page.rfind("</body>")
    return page[:at] + footer + page[at:] if at >= 0 else page + footer


__all__ = [
    "LEDGER_FILE",
    "LOCAL_LABEL",
    "Ledger",
    "StageSpend",
    "Tokens",
    "by_stage",
    "current_stage",
    "footer_html",
    "read_ledger",
    "run_line",
    "ledger_total_usd",
    "stage_line",
    "stage_lines",
    "summarize",
    "with_footer",
]
