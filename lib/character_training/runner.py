"""Headless runs: execute notebooks with papermill per persona x size, render HTML reports.

For each (persona, size) the runner merges the parameters, executes the chosen notebooks in
order with papermill (``cwd`` = repository root; the executed copy goes to
``runs/<persona>/<size>/notebooks/``), renders each executed notebook to
``reports/<persona>/<size>/<notebook>.html`` with its code hidden and figures inlined, and
rewrites ``reports/index.html`` with a link to every report and the headline numbers each
notebook saved (`write_summary`). A failing notebook keeps its executed copy (with the
traceback in the failing cell), still gets an HTML report, and the runner names the cell.
Later notebooks of that persona x size are skipped, since they read its artifacts.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .config import REPO_ROOT, RunParams, load_params
from .errors import ConfigError

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

    def describe(self) -> str:
        head = f"{self.persona}/{self.size}/{self.notebook}: {self.status}"
        if self.status == "failed":
            cell = (
                f" in cell {self.failed_cell} of the executed copy"
                if self.failed_cell is not None
                else ""
            )
            return f"{head}{cell}: {self.error} (executed copy: {self.executed_path})"
        if self.status == "ok":
            return f"{head} in {self.seconds:.0f}s -> {self.html_path}"
        return head


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
    """Called by each notebook's last cell: the numbers shown next to its report link."""
    path = summary_path(params, notebook)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "persona": params.persona,
        "size": params.size,
        "notebook": notebook,
        "fingerprint": params.fingerprint(),
        "written": time.time(),
        "headline": headline,
    }
    path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    return path


def build_index(reports_dir: Path, runs_dir: Path) -> Path:
    """Rewrite ``reports/index.html`` from the reports and summaries on disk."""
    rows = []
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
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}.failed{color:#b00}"
        ".ok{color:#070}</style></head><body><h1>Character training reports</h1>"
        f"<p>Generated {time.strftime('%Y-%m-%d %H:%M')}. One row per executed notebook.</p>"
        "<table><tr><th>persona</th><th>size</th><th>report</th><th>status</th>"
        "<th>headline numbers</th></tr>" + "".join(rows) + "</table></body></html>"
    )
    reports_dir.mkdir(parents=True, exist_ok=True)
    index = reports_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# -- execution ------------------------------------------------------------------------------------
def render_html(executed: Path, target: Path) -> Path:
    """HTML with code cells hidden (outputs and markdown kept, figures inlined)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True
    )
    body, _ = exporter.from_notebook_node(nbformat.read(str(executed), as_version=4))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body, encoding="utf-8")
    return target


def run_notebook(
    params: RunParams,
    notebook: str,
    extra: dict[str, Any] | None = None,
    timeout: int | None = None,
    notebooks_dir: Path = NOTEBOOKS_DIR,
) -> NotebookResult:
    """Execute one notebook for ``params``; never raises for a failure inside the notebook."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = notebooks_dir / f"{notebook}.ipynb"
    executed = params.run_dir / "notebooks" / f"{notebook}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    report = params.report_dir / f"{notebook}.html"
    result = NotebookResult(params.persona, params.size, notebook, "ok", str(executed), str(report))
    started = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source),
            str(executed),
            parameters={**params.papermill_parameters(), **(extra or {})},
            cwd=str(REPO_ROOT),
            kernel_name="python3",
            progress_bar=False,
            execution_timeout=timeout,
            request_save_on_cell_execute=True,
        )
    except PapermillExecutionError as exc:
        result.status = "failed"
        result.failed_cell = exc.exec_count
        result.error = f"{exc.ename}: {exc.evalue}".splitlines()[0][:300]
    result.seconds = time.perf_counter() - started
    if executed.is_file():
        render_html(executed, report)
    (executed.parent / f"{notebook}.status.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def run_matrix(
    personas: Iterable[str],
    sizes: Iterable[str],
    notebooks: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    timeout: int | None = None,
) -> list[NotebookResult]:
    """Run the notebooks for every persona x size; returns one result per notebook."""
    # Kernels inherit this: torch's OpenMP threads otherwise busy-wait, and on a shared CPU
    # that made decode steps up to 10x slower (measured); sleeping threads cost little here.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    names = resolve_notebooks(notebooks)
    plans = [
        (persona, size, load_params(size, persona, overrides))
        for persona in personas
        for size in sizes
    ]  # validate every combination before running any
    results: list[NotebookResult] = []
    for persona, size, params in plans:
        failed = False
        for name in names:
            if failed:
                results.append(NotebookResult(persona, size, name, "skipped"))
                continue
            logger.info("running %s for %s/%s", name, persona, size)
            result = run_notebook(params, name, extra, timeout)
            results.append(result)
            print(result.describe(), flush=True)
            failed = result.status == "failed"
        build_index(params.report_dir.parent.parent, params.run_dir.parent.parent)
    return results
