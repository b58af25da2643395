"""Notebooks: committed without outputs, parameterised, and executable headlessly with reports.

Runs notebook 01 on the tiny local model with ``smoke=True`` through the package's runner (the
same path as ``make reproduce``) and checks the executed copy, the HTML report with its
figures embedded, the summary and the index. Also checks that a failing notebook is reported
with the failing cell and still gets a report.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from character_training.config import REPO_ROOT, notebook_params, with_overrides
from character_training.runner import available_notebooks, build_index, run_notebook

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
    stage = params.run_dir / "01_prompts"
    ids = [
        json.loads(line)["id"]
        for line in (stage / "constitution_prompts.jsonl").read_text().splitlines()
    ]
    assert len(ids) == len(set(ids))
    index = build_index(tmp_path / "reports", tmp_path / "runs").read_text()
    assert "sarcastic/tiny/01_prompts.html" in index and "constitution_prompts" in index


def test_a_failing_notebook_names_the_cell_and_still_gets_a_report(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            'persona = "x"\nsize = "y"\nparams_json = ""\nsmoke = False',
            metadata={"tags": ["parameters"]},
        ),
        nbformat.v4.new_code_cell("value = 1 + 1"),
        nbformat.v4.new_code_cell("raise ValueError('constitution file is broken')"),
    ]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, str(tmp_path / "99_broken.ipynb"))
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
