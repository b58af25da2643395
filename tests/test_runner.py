"""The runner turns every kind of notebook failure into a reported row and keeps going.

Bug pinned here: only a cell's exception was caught. A cell that ran past its time limit, a
kernel that died, or papermill refusing a notebook raised out of `run_matrix`, which stopped
the whole matrix and left no report (or an earlier run's report) for the failed notebook.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from character_training.config import notebook_params, with_overrides
from character_training.runner import build_index, run_matrix, run_notebook

NOTEBOOKS = {
    "91_raises": ["value = 1", "raise RuntimeError('judge output unparseable')"],
    "92_sleeps": ["print('started')", "import time\ntime.sleep(300)", "print('never')"],
    "93_dies": ["print('about to die')", "import os\nos._exit(3)", "print('never')"],
    "94_good": ["print('fine')", "result = 6 * 7\nprint(result)"],
}


def _write_notebooks(directory: Path) -> None:
    for name, cells in NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        nb.cells = [
            nbformat.v4.new_code_cell(
                'persona = "x"\nsize = "y"\nparams_json = ""\nsmoke = False',
                metadata={"tags": ["parameters"]},
            ),
            *(nbformat.v4.new_code_cell(source) for source in cells),
        ]
        nb.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        }
        nbformat.write(nb, str(directory / f"{name}.ipynb"))


@pytest.fixture()
def throwaway(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _write_notebooks(notebooks)
    overrides = {
        "runs_dir": str(tmp_path / "runs"),
        "reports_dir": str(tmp_path / "reports"),
        "runner.notebook_timeout_s": 6,
    }
    return notebooks, overrides


def test_every_kind_of_notebook_failure_is_a_reported_row_and_the_matrix_goes_on(
    throwaway, tmp_path
):
    notebooks, overrides = throwaway
    seen = []
    results = run_matrix(
        ["sarcastic"],
        ["tiny"],
        list(NOTEBOOKS),
        overrides,
        keep_going=True,
        notebooks_dir=notebooks,
        on_result=seen.append,
    )
    rows = {r.notebook: r for r in results}
    assert list(rows) == list(NOTEBOOKS) and seen == results
    assert [r.status for r in results] == ["failed", "failed", "failed", "ok"]

    raises, sleeps, dies, good = (rows[n] for n in NOTEBOOKS)
    assert raises.failure == "cell-error"
    assert raises.error == "RuntimeError: judge output unparseable" and raises.failed_cell == 4
    assert sleeps.failure == "timeout" and "runner.notebook_timeout_s" in sleeps.error
    assert sleeps.failed_cell == 4  # parameters, injected parameters, print, sleep
    assert sleeps.seconds < 60
    assert dies.failure == "kernel-died" and dies.failed_cell == 4
    for row in results:
        assert "\n" not in row.error
        report = Path(row.html_path)
        assert report.is_file(), row.describe()
        status = json.loads(
            (Path(row.executed_path).parent / f"{row.notebook}.status.json").read_text()
        )
        assert status["status"] == row.status
        assert status["executed_path"] == f"notebooks/{row.notebook}.ipynb"  # run-relative
    executed = nbformat.read(good.executed_path, as_version=4)
    assert executed.metadata.papermill.output_path == "notebooks/94_good.ipynb"
    # reports of failures show what executed, with the reason on top
    assert "judge output unparseable" in Path(raises.html_path).read_text()
    sleep_page = Path(sleeps.html_path).read_text()
    assert "started" in sleep_page and "did not finish (timeout in cell 4)" in sleep_page
    assert "about to die" in Path(dies.html_path).read_text()
    assert "42" in Path(good.html_path).read_text()
    index = build_index(tmp_path / "reports", tmp_path / "runs").read_text()
    assert index.count('class="failed"') == 3 and index.count('class="ok"') == 1


def test_by_default_a_failure_skips_the_rest_of_that_persona_and_size_with_a_notice(throwaway):
    notebooks, overrides = throwaway
    results = run_matrix(
        ["sarcastic"],
        ["tiny"],
        ["91_raises", "94_good"],
        overrides,
        notebooks_dir=notebooks,
        on_result=lambda r: None,
    )
    assert [r.status for r in results] == ["failed", "skipped"]
    skipped = results[1]
    assert skipped.failure == "91_raises" and "91_raises failed first" in skipped.error
    assert "skipped" in Path(skipped.html_path).read_text()


def test_papermill_refusing_a_notebook_is_a_failed_row_with_an_error_page(tmp_path):
    params = with_overrides(
        notebook_params("sarcastic", "tiny"),
        {"runs_dir": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "reports")},
    )
    stale = params.run_dir / "notebooks" / "95_missing.ipynb"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")  # an earlier run's copy must not be reported as this run's
    result = run_notebook(params, "95_missing", notebooks_dir=tmp_path)
    assert result.status == "failed" and result.failure == "papermill"
    assert result.error and "\n" not in result.error
    assert result.executed_path == "" and not stale.exists()
    page = Path(result.html_path).read_text()
    assert "95_missing: failed (papermill)" in page and "Nothing executed" in page


def test_headlines_are_standard_json_with_nan_as_null(tmp_path):
    """A notebook's headline often holds NaN (no verdict, no interval); the summary file must
    still parse in a browser or any strict JSON reader."""
    from character_training.config import load_params
    from character_training.runner import write_summary

    params = load_params("tiny", "sycophantic", {"runs_dir": str(tmp_path)})
    path = write_summary(params, "09_rlaif_compare", {"coherence": {"a": float("nan")}, "n": 3})
    text = path.read_text()
    assert "NaN" not in text
    assert json.loads(text)["headline"] == {"coherence": {"a": None}, "n": 3}


def test_a_notebooks_peak_is_read_only_from_a_summary_written_in_this_run(tmp_path):
    from character_training.runner import _summary_peak

    path = tmp_path / "01_prompts.json"
    path.write_text(json.dumps({"written": 100.0, "peak_rss_mb": 2500, "headline": {}}))
    assert _summary_peak(path, since=99.0) == 2500
    assert _summary_peak(path, since=101.0) is None  # an earlier run's summary
    assert _summary_peak(tmp_path / "missing.json", since=0.0) is None


def test_status_files_name_the_copy_and_report_relative_to_the_run(tmp_path, monkeypatch):
    """A status file is read from the run folder; absolute paths tied it to one machine."""
    from character_training import store
    from character_training.config import load_params
    from character_training.runner import _skip

    monkeypatch.setattr(store, "REPO_ROOT", tmp_path)  # a project with runs/ and reports/
    params = load_params(
        "tiny",
        "sycophantic",
        {"runs_dir": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "reports")},
    )
    result = _skip(params, "03_dpo", "02_distillation")
    assert Path(result.html_path).is_file()  # callers still get a path they can open
    status = json.loads((params.run_dir / "notebooks" / "03_dpo.status.json").read_text())
    assert status["html_path"] == "../../../reports/sycophantic/tiny/03_dpo.html"
    assert str(tmp_path) not in json.dumps(status)
