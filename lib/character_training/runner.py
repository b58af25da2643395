"""Headless runs: execute notebooks with papermill per persona x size, render HTML reports.

For each (persona, size) the runner merges the parameters, executes the chosen notebooks in
order with papermill (``cwd`` = repository root; the executed copy goes to
``runs/<persona>/<size>/notebooks/``), renders each executed notebook to
``reports/<persona>/<size>/<notebook>.html`` with its code hidden and figures inlined, and
rewrites ``reports/index.html`` with a link to every report and the headline numbers each
notebook saved (`write_summary`).

No failure stops the matrix. Whatever goes wrong in a notebook (an exception in a cell, a cell
or the whole notebook running past its time limit, a kernel that dies, papermill refusing the
notebook) becomes a ``failed`` row with a one-line error, the cell it happened in where one is
known, and a report: the HTML of whatever executed, with a banner naming the failure, or a
short error page when nothing executed. The rest of the matrix goes on. Later notebooks of the
same persona x size are skipped by default (they read the failed notebook's artifacts, and old
artifacts from an earlier run would be silently stale); ``keep_going=True`` runs them anyway.
A skipped notebook's report is replaced by a short page saying why, so the index never shows a
report from an earlier run as if it were current.

Chains run concurrently with ``jobs`` > 1 (the CLI's ``--jobs``): a chain is one persona x
size, its notebooks always in order, and each chain holds the lock file of its run folder
(`locks`) while it runs, so no two processes run stages of one chain at once. One chain
failing does not stop the others; the index lists every chain with its state, the report of
the notebook it failed at, and its spend (`chain_status`). The live table is
`live_table.MatrixTable`.

Time limits: ``runner.notebook_timeout_s`` (parameters) bounds a notebook's cells together,
wall clock; the optional per-cell ``timeout`` (the CLI's ``--timeout``) bounds each cell.

Status files and the executed copy's papermill metadata name files relative to the run folder
(`store.portable_path`), so a run folder copied elsewhere carries no path of this machine.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from . import engine_record
from .chain_status import _read_json, chain_summaries, format_usd
from .config import REPO_ROOT, RunParams, load_params
from .errors import ConfigError
from .live_table import MatrixTable
from .locks import ChainLock
from .notebook_progress import kernel_manager
from .store import json_safe, portable_path

logger = logging.getLogger(__name__)

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


@dataclass
class NotebookResult:
    persona: str
    size: str
    notebook: str
    status: str  # "ok" | "failed" | "skipped"
    executed_path: str = ""
    html_path: str = ""
    seconds: float = 0.0
    failed_cell: int | None = None
    error: str = ""
    # why it failed: "cell-error" | "timeout" | "kernel-died" | "papermill"; for a skipped
    # notebook, the notebook whose failure skipped it
    failure: str = ""
    # the kernel's peak resident memory up to its last cell (MiB), as its summary states it;
    # None when the notebook wrote no summary in this run (failed, or Tinker-only platforms)
    peak_rss_mb: int | None = None

    def describe(self) -> str:
        head = f"{self.persona}/{self.size}/{self.notebook}: {self.status}"
        if self.status == "failed":
            cell = (
                f" in cell {self.failed_cell} of the executed copy"
                if self.failed_cell is not None
                else ""
            )
            return (
                f"{head} ({self.failure}){cell}: {self.error} "
                f"(executed copy: {self.executed_path or 'none'}; report: {self.html_path})"
            )
        if self.status == "ok":
            peak = f", peak {self.peak_rss_mb:,} MiB" if self.peak_rss_mb is not None else ""
            return f"{head} in {self.seconds:.0f}s{peak} -> {self.html_path}"
        return f"{head} ({self.error})" if self.error else head


def available_notebooks(directory: Path = NOTEBOOKS_DIR) -> list[str]:
    """Notebook names (``01_prompts`` ...) in execution order."""
    return sorted(p.stem for p in directory.glob("[0-9][0-9]_*.ipynb"))


def resolve_notebooks(
    selection: str | Sequence[str] | None, directory: Path = NOTEBOOKS_DIR
) -> list[str]:
    """``None``/"all" -> every notebook; "01,03" or ["01_prompts"] -> those, validated."""
    names = available_notebooks(directory)
    if selection is None or selection == "all":
        return names
    wanted = selection.split(",") if isinstance(selection, str) else list(selection)
    chosen = []
    for item in (w.strip() for w in wanted if w.strip()):
        matches = [n for n in names if n == item or n.split("_", 1)[0] == item]
        if not matches:
            raise ConfigError(f"unknown notebook {item!r}: expected one of {names}")
        chosen += matches
    return sorted(set(chosen))


# -- summaries and the index ---------------------------------------------------------------------
def summary_path(params: RunParams, notebook: str) -> Path:
    return params.run_dir / "summaries" / f"{notebook}.json"


def write_summary(params: RunParams, notebook: str, headline: dict[str, Any]) -> Path:
    """Called by each notebook's last cell: the numbers shown next to its report link, and
    the peak memory of the notebook's kernel up to then (``peak_rss_mb``). A stage manifest's
    peak stops at its stage's end; the last cell sees every cell's work."""
    path = summary_path(params, notebook)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "persona": params.persona,
        "size": params.size,
        "notebook": notebook,
        "fingerprint": params.fingerprint(),
        "written": time.time(),
        "peak_rss_mb": engine_record.peak_rss_mb(),
        "headline": headline,
    }
    text = json.dumps(json_safe(record), indent=2, sort_keys=True, default=str, allow_nan=False)
    _write_whole(path, text)
    return path


def _write_whole(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so that the index, rebuilt by another
    chain's thread at any moment, never reads half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


# Pages written next to the index by other commands, linked from it when present.
INDEX_EXTRA_PAGES = (
    ("summary.html", "Cross-run summary: personas x model sizes"),
    ("provenance.html", "Provenance: commits, parameters, versions, costs"),
)


def build_index(reports_dir: Path, runs_dir: Path) -> Path:
    """Rewrite ``reports/index.html`` from the reports and summaries on disk."""
    rows = []
    extra = " | ".join(
        f'<a href="{name}">{html.escape(label)}</a>'
        for name, label in INDEX_EXTRA_PAGES
        if (reports_dir / name).is_file()
    )
    for report in sorted(reports_dir.glob("*/*/*.html")):
        persona, size, notebook = report.parts[-3], report.parts[-2], report.stem
        summary_file = runs_dir / persona / size / "summaries" / f"{notebook}.json"
        status_file = runs_dir / persona / size / "notebooks" / f"{notebook}.status.json"
        headline = {}
        if summary_file.is_file():
            headline = json.loads(summary_file.read_text()).get("headline", {})
        status = (
            json.loads(status_file.read_text()).get("status", "") if status_file.is_file() else ""
        )
        numbers = ", ".join(f"{k}: {_fmt(v)}" for k, v in headline.items())
        rows.append(
            f"<tr><td>{html.escape(persona)}</td><td>{html.escape(size)}</td>"
            f'<td><a href="{html.escape(str(report.relative_to(reports_dir)))}">'
            f'{html.escape(notebook)}</a></td><td class="{html.escape(status)}">'
            f"{html.escape(status)}</td><td>{html.escape(numbers)}</td></tr>"
        )
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>Character training reports'
        "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}.failed,.chain-failed"
        "{color:#b00}.ok,.chain-ok{color:#070}</style></head><body>"
        "<h1>Character training reports</h1>"
        f"<p>Generated {time.strftime('%Y-%m-%d %H:%M')}. One row per executed notebook.</p>"
        + (f"<p>{extra}</p>" if extra else "")
        + _chain_table(reports_dir, runs_dir)
        + "<h2>Notebooks</h2><table><tr><th>persona</th><th>size</th><th>report</th>"
        "<th>status</th><th>headline numbers</th></tr>" + "".join(rows) + "</table></body></html>"
    )
    reports_dir.mkdir(parents=True, exist_ok=True)
    index = reports_dir / "index.html"
    _write_whole(index, page)  # a browser never sees half a page
    return index


def _chain_table(reports_dir: Path, runs_dir: Path) -> str:
    """One row per persona x size: running (pid, stage), failed at which notebook (its report
    and error), incomplete or ok, and what its ledger says it spent."""
    rows = []
    for chain in chain_summaries(runs_dir):
        state = html.escape(chain.describe_state())
        report = reports_dir / chain.persona / chain.size / f"{chain.failed_notebook}.html"
        if chain.state == "failed" and report.is_file():
            link = html.escape(str(report.relative_to(reports_dir)))
            state = f'{state}: <a href="{link}">report</a> ({html.escape(chain.error)})'
        rows.append(
            f"<tr><td>{html.escape(chain.persona)}</td><td>{html.escape(chain.size)}</td>"
            f'<td class="chain-{html.escape(chain.state.replace(" ", "-"))}">{state}</td>'
            f"<td>{chain.notebooks_ok}/{chain.notebooks}</td>"
            f"<td>{format_usd(chain.spend_usd)}</td></tr>"
        )
    if not rows:
        return ""
    return (
        "<h2>Chains</h2><table><tr><th>persona</th><th>size</th><th>state</th>"
        "<th>notebooks ok</th><th>spent (USD)</th></tr>" + "".join(rows) + "</table>"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# -- execution ------------------------------------------------------------------------------------
def render_html(executed: Path, target: Path, banner: str = "") -> Path:
    """HTML with code cells hidden (outputs and markdown kept, figures inlined).

    ``banner``, when given, is shown as a first markdown cell (the executed copy itself is not
    changed): how a notebook that stopped early says why at the top of its report. The footer
    says what the stage spent and the local engine's prefill (`spend.with_footer`).
    """
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True
    )
    nb = nbformat.read(str(executed), as_version=4)
    if banner:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(banner))
    body, _ = exporter.from_notebook_node(nb)
    from .spend import with_footer

    # the stage's spend from the run's ledger and the local engine's prefill, if any
    prefill = engine_record.footer_html(executed.parent.parent, executed.stem)
    body = with_footer(body, executed, extra=prefill)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body, encoding="utf-8")
    return target


def write_notice_page(target: Path, title: str, lines: Sequence[str]) -> Path:
    """A short stand-alone report page (nothing executed, or the notebook was skipped)."""
    items = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        "<style>body{font-family:sans-serif;margin:2em}h1{color:#b00}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{items}"
        f"<p><small>{time.strftime('%Y-%m-%d %H:%M')}</small></p></body></html>"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target


class _Deadline:
    """Per-cell timeouts for nbclient that also enforce a limit on all cells together.

    nbclient asks ``timeout_func(cell)`` before each cell; answering with the time left until
    the notebook's deadline (never below one second: nbclient reads 0 as "no limit") turns its
    per-cell timeout into a whole-notebook one. The clock starts at the first cell, so kernel
    start-up (bounded by its own timeout) does not eat into the notebook's budget.
    """

    def __init__(self, notebook_limit: float, cell_limit: float | None):
        self.notebook_limit = notebook_limit
        self.cell_limit = cell_limit
        self.started: float | None = None

    def __call__(self, cell: Any) -> int:
        now = time.monotonic()
        if self.started is None:
            self.started = now
        left = self.notebook_limit - (now - self.started)
        limit = min(left, self.cell_limit) if self.cell_limit else left
        return max(1, math.ceil(limit))

    def notebook_limit_hit(self) -> bool:
        elapsed = time.monotonic() - (self.started or time.monotonic())
        return elapsed >= self.notebook_limit - 1


def _running_cell(executed: Path) -> int | None:
    """Number of the code cell that failed or was running when execution stopped.

    Counted among the executed copy's code cells from 1, which is the execution count in a
    linear run; the count itself can be missing when the kernel died before acknowledging the
    cell.
    """
    import nbformat

    try:
        nb = nbformat.read(str(executed), as_version=4)
    except Exception:  # a half-written copy: no cell to name
        return None
    code = [c for c in nb.cells if c.cell_type == "code"]
    started = [
        number
        for number, c in enumerate(code, start=1)
        if (c.metadata.get("papermill") or {}).get("start_time")
    ]
    failed = [n for n in started if (code[n - 1].metadata.get("papermill") or {}).get("exception")]
    if failed:
        return failed[0]
    return started[-1] if started else None


def _classify(exc: Exception, deadline: _Deadline) -> tuple[str, str]:
    """(failure kind, one-line error) for anything papermill or the kernel raised."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        return "cell-error", f"{exc.ename}: {exc.evalue}"
    if isinstance(exc, CellTimeoutError):
        if deadline.notebook_limit_hit():
            return "timeout", (
                f"the notebook ran past its limit of {deadline.notebook_limit:.0f}s "
                "(runner.notebook_timeout_s) and was stopped"
            )
        return "timeout", f"a cell ran past the per-cell limit of {deadline.cell_limit:.0f}s"
    if isinstance(exc, DeadKernelError):
        return "kernel-died", (
            "the kernel died (out of memory, a crash in native code, or os._exit); "
            "outputs up to that cell are kept"
        )
    return "papermill", f"{type(exc).__name__}: {exc}"


def _one_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return (lines[0] if lines else "")[:limit]


def run_notebook(
    params: RunParams,
    notebook: str,
    extra: dict[str, Any] | None = None,
    timeout: int | None = None,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    notebook_timeout: float | None = None,
) -> NotebookResult:
    """Execute one notebook for ``params``; never raises for anything that goes wrong in it.

    ``timeout`` bounds each cell (seconds, None: no per-cell limit); ``notebook_timeout``
    bounds all cells together and defaults to ``params.runner.notebook_timeout_s``. Every
    outcome gets a status file and a report (see the module docstring).
    """
    import papermill

    source = notebooks_dir / f"{notebook}.ipynb"
    executed = params.run_dir / "notebooks" / f"{notebook}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    executed.unlink(missing_ok=True)  # never report an earlier run's copy as this one
    report = params.report_dir / f"{notebook}.html"
    result = NotebookResult(params.persona, params.size, notebook, "ok", str(executed), str(report))
    limit = notebook_timeout if notebook_timeout is not None else params.runner.notebook_timeout_s
    deadline = _Deadline(float(limit), float(timeout) if timeout else None)
    started, wall_start = time.perf_counter(), time.time()
    try:
        papermill.execute_notebook(
            str(source),
            str(executed),
            parameters={**params.papermill_parameters(), **(extra or {})},
            cwd=str(REPO_ROOT),
            kernel_name="python3",
            progress_bar=False,
            request_save_on_cell_execute=True,
            timeout_func=deadline,
            kernel_manager_class=kernel_manager(f"{params.persona}/{params.size} {notebook}"),
        )
    except Exception as exc:  # the boundary: every failure becomes a reported row
        from papermill.exceptions import PapermillExecutionError

        result.status = "failed"
        result.failure, message = _classify(exc, deadline)
        result.error = _one_line(message)
        if isinstance(exc, PapermillExecutionError):
            result.failed_cell = exc.exec_count
        elif executed.is_file():
            result.failed_cell = _running_cell(executed)
    result.seconds = time.perf_counter() - started
    if result.status == "ok":
        result.peak_rss_mb = _summary_peak(summary_path(params, notebook), since=wall_start)
    if executed.is_file():
        _portable_metadata(executed, params.run_dir)
    _write_report(result, executed, report)
    _write_status(result, executed.parent)
    return result


def _summary_peak(path: Path, since: float) -> int | None:
    """The kernel peak a notebook's summary records, if the summary was written after
    ``since`` (an older one belongs to an earlier run of the notebook)."""
    record = _read_json(path)
    peak, written = record.get("peak_rss_mb"), record.get("written")
    fresh = isinstance(written, (int, float)) and written >= since
    return int(peak) if fresh and isinstance(peak, (int, float)) else None


def _write_report(result: NotebookResult, executed: Path, report: Path) -> None:
    """The executed copy as HTML (with a banner when it stopped early), else a notice page."""
    banner = ""
    if result.status == "failed" and result.failure != "cell-error":  # papermill adds its own
        where = f" in cell {result.failed_cell}" if result.failed_cell is not None else ""
        banner = f"**This notebook did not finish ({result.failure}{where}):** {result.error}"
    if executed.is_file():
        try:
            render_html(executed, report, banner)
            return
        except Exception as exc:  # a half-written copy must not lose the row
            logger.warning("could not render %s (%s); writing a short page", executed, exc)
    else:
        result.executed_path = ""
    if result.status == "ok":  # papermill returned without writing a copy: not a success
        result.status, result.failure = "failed", "papermill"
        result.error = "papermill finished but the executed copy could not be read"
    write_notice_page(
        report,
        f"{result.notebook}: failed ({result.failure})",
        [
            f"{result.persona} / {result.size} / {result.notebook}",
            result.error,
            "Nothing executed that could be shown; see the runner's log.",
        ],
    )


def _write_status(result: NotebookResult, directory: Path) -> None:
    """``<run>/notebooks/<notebook>.status.json``, its paths relative to the run folder."""
    directory.mkdir(parents=True, exist_ok=True)
    record = asdict(result)
    for key in ("executed_path", "html_path"):
        record[key] = portable_path(directory.parent, record[key])
    _write_whole(directory / f"{result.notebook}.status.json", json.dumps(record, indent=2))


def _portable_metadata(executed: Path, run_dir: Path) -> None:
    """Record papermill's input and output paths in the executed copy relative to the run
    folder (papermill writes them absolute, which ties the copy to this machine)."""
    import nbformat

    try:
        nb = nbformat.read(str(executed), as_version=4)
    except Exception:  # a half-written copy: left as it is, the report says what happened
        return
    recorded = nb.metadata.get("papermill") or {}
    changed = False
    for key in ("input_path", "output_path"):
        if isinstance(recorded.get(key), str):
            portable = portable_path(run_dir, recorded[key])
            changed |= portable != recorded[key]
            recorded[key] = portable
    if changed:
        try:
            nbformat.write(nb, str(executed))
        except Exception as exc:  # the copy keeps papermill's paths; the run is not at stake
            logger.warning("could not rewrite the paths in %s: %s", executed, exc)


def _not_run(
    params: RunParams, notebook: str, status: str, error: str, failure: str
) -> NotebookResult:
    """A row for a notebook that did not execute, with its status file and a notice page."""
    report = params.report_dir / f"{notebook}.html"
    result = NotebookResult(
        params.persona, params.size, notebook, status, html_path=str(report), error=error
    )
    result.failure = failure
    title = f"{notebook}: {status}" + (f" ({failure})" if status == "failed" else "")
    write_notice_page(report, title, [f"{params.persona} / {params.size} / {notebook}", error])
    _write_status(result, params.run_dir / "notebooks")
    return result


def _skip(params: RunParams, notebook: str, because: str) -> NotebookResult:
    """A notebook not run because an earlier one failed: row, status file and notice page."""
    error = f"not run: {because} failed first (keep_going=True runs it anyway)"
    return _not_run(params, notebook, "skipped", error, because)


NotebookExecutor = Callable[[RunParams, str], NotebookResult]


@dataclass
class _Chain:
    persona: str
    size: str
    params: RunParams

    @property
    def label(self) -> str:
        return f"{self.persona}/{self.size}"


def _plan_chains(
    personas: Iterable[str], sizes: Iterable[str], overrides: dict[str, Any] | None
) -> list[_Chain]:
    """Every persona x size once, in order, its parameters validated before any runs."""
    sizes = list(dict.fromkeys(sizes))
    return [
        _Chain(persona, size, load_params(size, persona, overrides))
        for persona in dict.fromkeys(personas)
        for size in sizes
    ]


def _warn_shared_cpu(chains: Sequence[_Chain], workers: int) -> None:
    local = [c.label for c in chains if c.params.backend == "local"]
    if workers > 1 and len(local) > 1:
        logger.warning(
            "--jobs %d: %d chains run on the local backend (%s) and share this machine's %s "
            "CPU core(s) and memory; each runs slower than alone, and together they finish "
            "no sooner than one after another. --jobs pays off on Tinker, where chains wait "
            "on the service",
            workers,
            len(local),
            ", ".join(local[:4]) + (" ..." if len(local) > 4 else ""),
            os.cpu_count() or "?",
        )


def omp_wait_policy(workers: int) -> str:
    """How torch's idle OpenMP workers wait in the notebook kernels (they inherit the variable;
    a value already in the environment wins).

    One chain at a time has the CPU to itself: workers spin between parallel regions
    (``ACTIVE``), which made notebook 06 take 57 s instead of 63 s (twice each, 2-core CPU,
    AVX2 regime; a decode step has dozens of short regions). Chains that share the CPU sleep
    (``PASSIVE``): a spinning worker holds a core that another chain's thread waits for, and on
    a shared CPU that made decode steps up to 10x slower (measured).
    """
    return "ACTIVE" if workers == 1 else "PASSIVE"


@contextlib.contextmanager
def _kernel_wait_policy(workers: int) -> Iterator[None]:
    """`omp_wait_policy` in the environment the kernels inherit, for one matrix only: a later
    matrix in the same process (a notebook, the tests) picks its own from its ``workers``."""
    if "OMP_WAIT_POLICY" in os.environ:  # the user's choice
        yield
        return
    os.environ["OMP_WAIT_POLICY"] = omp_wait_policy(workers)
    try:
        yield
    finally:
        os.environ.pop("OMP_WAIT_POLICY", None)


def run_matrix(
    personas: Iterable[str],
    sizes: Iterable[str],
    notebooks: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    timeout: int | None = None,
    keep_going: bool = False,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    on_result: Callable[[NotebookResult], None] | None = None,
    jobs: int = 1,
    execute: NotebookExecutor | None = None,
    table: MatrixTable | None = None,
) -> list[NotebookResult]:
    """Run the notebooks for every persona x size; returns one result per notebook.

    Parameters of every combination are validated, and every chain's lock taken
    (`locks.ChainLock`: a chain another process runs is refused in one line), before anything
    runs. ``jobs`` chains run at once, each in its own thread (a notebook is a kernel process;
    the thread only waits on it); a chain's notebooks run in order. After that nothing stops
    the matrix: a failed notebook is a row, and by default the later notebooks of its persona
    x size are skipped (``keep_going`` runs them); the other chains go on. ``on_result`` is
    called with each row as it is made (default: printed through ``table``, the live table
    of `live_table.MatrixTable`). ``execute`` runs one notebook (default `run_notebook` with
    ``extra``, ``timeout`` and ``notebooks_dir``; tests and benches pass their own). Results
    come back grouped by chain, in the order the chains were given. Ctrl-C stops the chains
    that have not started and, after the notebooks running now, the rest; rerunning resumes.
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs {jobs!r}: expected a whole number of chains >= 1")
    names = resolve_notebooks(notebooks, notebooks_dir)
    chains = _plan_chains(personas, sizes, overrides)
    workers = min(jobs, len(chains)) or 1
    _warn_shared_cpu(chains, workers)
    if execute is None:

        def execute(params: RunParams, name: str) -> NotebookResult:
            return run_notebook(params, name, extra, timeout, notebooks_dir)

    table = table or MatrixTable()
    for chain in chains:
        table.add_chain(chain.persona, chain.size, chain.params.run_dir, len(names))

    def report(result: NotebookResult) -> None:
        table.result(result, show=on_result is None)
        if on_result is not None:
            on_result(result)

    stop = threading.Event()
    with contextlib.ExitStack() as held:
        held.enter_context(_kernel_wait_policy(workers))
        locks = [
            held.enter_context(ChainLock(chain.params.run_dir, chain.label)) for chain in chains
        ]  # refuse before running any

        def one_chain(index: int) -> list[NotebookResult]:
            chain = chains[index]
            table.chain_started(chain.persona, chain.size)
            try:
                results = run_chain(
                    chain.params, names, execute, locks[index], keep_going, report, table, stop
                )
            finally:
                locks[index].release()  # the chain is done: free it for others at once
                refresh_index(chain.params)  # no longer listed as running
            table.chain_finished(chain.persona, chain.size, stopped=stop.is_set())
            return results

        table.start(workers)
        try:
            per_chain = _run_all(one_chain, len(chains), workers, stop)
        finally:
            table.stop()
    return [result for results in per_chain for result in results]


def _run_all(
    one_chain: Callable[[int], list[NotebookResult]], count: int, workers: int, stop: Any
) -> list[list[NotebookResult]]:
    """Chains ``0..count-1``: in this thread one after another (``workers`` 1, as before
    ``--jobs``), else on a pool of ``workers`` threads; a Ctrl-C sets ``stop``."""
    if workers == 1:
        try:
            return [one_chain(index) for index in range(count)]
        except KeyboardInterrupt:
            stop.set()
            raise
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chain")
    try:
        futures = [pool.submit(one_chain, index) for index in range(count)]
        return [future.result() for future in futures]
    except KeyboardInterrupt:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_chain(
    params: RunParams,
    names: Sequence[str],
    execute: NotebookExecutor,
    lock: ChainLock | None = None,
    keep_going: bool = False,
    report: Callable[[NotebookResult], None] = lambda result: None,
    table: MatrixTable | None = None,
    stop: Any = None,
) -> list[NotebookResult]:
    """One persona x size: its notebooks in order (see `run_matrix`); never raises for a
    notebook, so a chain that breaks, even in the executor itself, is rows, not an exception
    in the other chains' way. ``lock`` records the stage running; ``stop`` (an Event) ends the
    chain before its next notebook."""
    results: list[NotebookResult] = []
    failed_first = ""
    for name in names:
        if stop is not None and stop.is_set():
            break
        if failed_first and not keep_going:
            result = _skip(params, name, failed_first)
        else:
            logger.debug("running %s for %s/%s", name, params.persona, params.size)
            if lock is not None:
                lock.set_stage(name)
            if table is not None:
                table.stage_started(params.persona, params.size, name)
            try:
                result = execute(params, name)
            except Exception as exc:  # the executor's own failure is this chain's row
                result = _runner_failure(params, name, exc)
            if result.status == "failed" and not failed_first:
                failed_first = name
        results.append(result)
        report(result)
        refresh_index(params)
    if lock is not None:
        lock.set_stage("")
    return results


def _runner_failure(params: RunParams, notebook: str, exc: Exception) -> NotebookResult:
    """A notebook the runner itself could not run: a failed row, status file and notice."""
    logger.exception("%s/%s/%s: the runner failed", params.persona, params.size, notebook)
    error = _one_line(f"{type(exc).__name__}: {exc}")
    return _not_run(params, notebook, "failed", error, "runner")


_INDEX_LOCK = threading.Lock()


def refresh_index(params: RunParams) -> None:
    """Rebuild the index after a notebook (the chains share it: one writer at a time)."""
    try:
        with _INDEX_LOCK:
            build_index(params.report_dir.parent.parent, params.run_dir.parent.parent)
    except Exception as exc:  # the index is a convenience; the rows are the result
        logger.warning("could not rebuild the report index: %s", exc)
