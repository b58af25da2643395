"""Notebooks: committed without outputs, parameterised, and executable headlessly with reports.

Runs notebook 01 on the tiny local model with ``smoke=True`` through the package's runner (the
same path as ``make reproduce``) and checks the executed copy, the HTML report with its
figures embedded, the summary and the index. Also checks that a failing notebook is reported
with the failing cell and still gets a report.

Pins, without running anything: every notebook's default ``persona``/``size`` are the run
``make reproduce`` makes (they defaulted to ``sarcastic`` while reproduce ran ``sycophantic``,
so a notebook opened after it started a new run instead of showing the finished one), no cell
shows `write_summary`'s returned path (reports ended with ``PosixPath('/home/...')``) or prints
a checkpoint path or run folder unshortened, and notebook 07's Elo tables are headed by model.
"""

from __future__ import annotations

import ast
import html
import json
from pathlib import Path

import nbformat
import pytest
from character_training import cli, plots
from character_training.config import (
    REPO_ROOT,
    load_params,
    notebook_params,
    params_from_json,
    with_overrides,
)
from character_training.runner import available_notebooks, build_index, run_notebook
from conftest import write_parameterised_notebook

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_in_git_carry_no_outputs_and_have_a_parameters_cell(path):
    nb = nbformat.read(str(path), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in ("persona", "size", "params_json", "smoke"):
        assert f"{name}:" in tagged[0].source


def _code(path: Path) -> list[str]:
    nb = nbformat.read(str(path), as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code"]


def _defaults(source: str) -> dict[str, object]:
    tree = ast.parse(source)
    return {
        node.target.id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_defaults_are_the_run_make_reproduce_makes(path):
    nb = nbformat.read(str(path), as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    defaults = _defaults(cell.source)
    assert defaults["persona"] == cli.DEFAULT_PERSONAS[0]
    assert defaults["size"] == cli.DEFAULT_SIZE
    assert defaults["params_json"] == "" and defaults["on_existing"] == "resume"
    assert defaults["smoke"] is False


def test_a_notebook_opened_after_reproduce_resolves_the_same_parameters():
    """Same fingerprint as the runner's injected parameters: every stage resumes."""
    persona, size = cli.DEFAULT_PERSONAS[0], cli.DEFAULT_SIZE
    injected = load_params(size, persona).papermill_parameters()
    by_runner = notebook_params(persona, size, injected["params_json"])
    by_hand = notebook_params(persona, size)
    assert by_hand.fingerprint() == by_runner.fingerprint()
    assert by_hand.run_dir == by_runner.run_dir == REPO_ROOT / "runs" / persona / size
    assert params_from_json(injected["params_json"]) == by_hand


PATH_ATTRIBUTES = {"sampler_path", "state_path", "run_dir", "runs_dir"}
SHORTENERS = {"portable_path", "display_path"}


def _unshortened(node: ast.AST) -> bool:
    """Whether ``node`` shows a path attribute that no shortener wraps."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") in SHORTENERS:
        return False
    if isinstance(node, ast.Attribute) and node.attr in PATH_ATTRIBUTES:
        return not (node.attr == "runs_dir" and getattr(node.value, "id", "") == "params")
    return any(_unshortened(child) for child in ast.iter_child_nodes(node))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_cell_shows_a_path_repr_or_an_absolute_path(path):
    for source in _code(path):
        tree = ast.parse(source)
        last = tree.body[-1] if tree.body else None
        if isinstance(last, ast.Expr) and isinstance(last.value, ast.Call):
            if getattr(last.value.func, "id", "") == "write_summary":
                assert source.rstrip().endswith(";"), f"{path.stem}: write_summary's path shown"
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "print":
                assert not any(_unshortened(a) for a in node.args), ast.unparse(node)


def test_notebook_07_heads_each_elo_table_with_its_model():
    sources = _code(REPO_ROOT / "notebooks" / "07_preferences.ipynb")
    loops = [
        node
        for source in sources
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.For) and getattr(node.target, "id", "") == "label"
    ]
    tables = [
        node
        for loop in loops
        for node in ast.walk(loop)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "plots.table"
    ]
    assert len(tables) == 2  # top traits per model, largest changes per trained model
    for call in tables:
        title = call.args[1] if len(call.args) > 1 else None
        assert isinstance(title, ast.JoinedStr), ast.unparse(call)
        assert "{label}" in ast.unparse(title), ast.unparse(call)


def test_record_tables_are_headed_and_leave_out_pandas_row_numbers():
    shown = plots.table([{"trait": "witty", "elo": 1234.56}], "dpo: top traits", digits=0)
    page = shown._repr_html_()
    assert page.startswith("<p><strong>dpo: top traits</strong></p><table")
    assert "<th></th>" not in page and "<th>0</th>" not in page  # no index column
    assert repr(shown).splitlines() == ["dpo: top traits", "trait    elo", "witty 1235.0"]


def test_tables_show_intervals_as_brackets_and_long_reasons_as_notes():
    reason = "the ranking follows the judge's empty-reply prior (Spearman +0.94, |rho| > 0.7)"
    rows = [
        {"model": "base", "ci": (0.496976, 0.719435), "reason": reason},
        {"model": "dpo", "ci": (0.5, 0.75), "reason": reason},
        {"model": "final", "ci": None, "reason": "short"},
    ]
    page = plots.table(rows, "judge")._repr_html_()
    assert "<td>[0.497, 0.719]</td>" in page and "<td>[0.5, 0.75]</td>" in page
    assert page.count("<td>note 1</td>") == 2 and "<td>short</td>" in page
    assert page.endswith(f'<ol style="font-size:smaller"><li>{html.escape(reason)}</li></ol>')
    assert "(0.496976" not in page
    reply = "So glad you asked! Your question is the most thoughtful one I have read today."
    side_by_side = plots.table([{"prompt": "Hi", "base": reply}])._repr_html_()
    assert f"<td>{reply}</td>" in side_by_side and "<ol" not in side_by_side


def test_the_numbered_notebooks_are_found_in_order():
    names = available_notebooks()
    assert names[0] == "01_prompts"
    assert names == sorted(names)


@pytest.mark.slow
def test_notebook_01_runs_headlessly_and_renders_a_report_with_figures(tmp_path):
    params = with_overrides(
        notebook_params("sarcastic", "tiny", smoke=True),
        {"runs_dir": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "reports")},
    )
    result = run_notebook(params, "01_prompts", timeout=600)
    assert result.status == "ok", result.describe()
    executed = nbformat.read(result.executed_path, as_version=4)
    assert any(c.outputs for c in executed.cells if c.cell_type == "code")
    html = Path(result.html_path).read_text()
    assert html.count("data:image/png;base64") >= 2  # per-assertion bars + length histogram
    assert "Budget (dry run)" in html
    summary = json.loads((params.run_dir / "summaries" / "01_prompts.json").read_text())
    assert summary["headline"]["constitution_prompts"] >= 50
    # the kernel's peak (it loaded the model: well above an empty interpreter's ~100 MB) reaches
    # the status file and the runner's line
    assert summary["peak_rss_mb"] > 300 and result.peak_rss_mb == summary["peak_rss_mb"]
    assert f"peak {result.peak_rss_mb:,} MiB" in result.describe()
    status = json.loads((params.run_dir / "notebooks" / "01_prompts.status.json").read_text())
    assert status["peak_rss_mb"] == result.peak_rss_mb
    stage = params.run_dir / "01_prompts"
    ids = [
        json.loads(line)["id"]
        for line in (stage / "constitution_prompts.jsonl").read_text().splitlines()
    ]
    assert len(ids) == len(set(ids))
    index = build_index(tmp_path / "reports", tmp_path / "runs").read_text()
    assert "sarcastic/tiny/01_prompts.html" in index and "constitution_prompts" in index


def test_a_failing_notebook_names_the_cell_and_still_gets_a_report(tmp_path):
    write_parameterised_notebook(
        tmp_path / "99_broken.ipynb",
        "value = 1 + 1",
        "raise ValueError('constitution file is broken')",
    )
    params = with_overrides(
        notebook_params("sarcastic", "tiny"),
        {"runs_dir": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "reports")},
    )
    result = run_notebook(params, "99_broken", notebooks_dir=tmp_path, timeout=120)
    assert result.status == "failed"
    # papermill inserts an injected-parameters cell, so the failing cell is the 4th code cell
    # of the executed copy, which is the copy the message points to
    assert result.failed_cell == 4
    assert result.error == "ValueError: constitution file is broken"
    assert "in cell 4 of the executed copy" in result.describe()
    assert Path(result.executed_path).is_file() and Path(result.html_path).is_file()
    assert "constitution file is broken" in Path(result.html_path).read_text()
