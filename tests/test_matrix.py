"""A persona x size matrix runs its chains at once, and a chain runs in one place at a time.

Issue 18, section 3. No notebook runs here: a fake executor stands in for papermill, so the
tests count what overlaps (chains at once, stages of one chain at once) and never time it.
Pinned:

* ``--jobs N`` runs N chains at once (all of them meet at a barrier, which a runner that
  serialised chains would never reach), never more, never two stages of one chain, and each
  chain's notebooks in order;
* a chain whose notebook fails (even by the executor raising) is rows, skipped notebooks and a
  "failed at" row in the index with a link to its report; the other chains finish;
* the lock file: a second holder is refused in one line naming the file, the pid and its
  stage, before any notebook runs; a lock left by a dead pid is taken over;
* ``--jobs`` above 1 on the local backend warns; the live table shows stage, progress, spend;
* ``dry-run`` of a matrix prints each chain, the total and where the power table is.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import pytest
from character_training import runner
from character_training.chain_status import cell_progress, chain_summaries
from character_training.cli import main
from character_training.config import load_params
from character_training.costs import estimate, total_usd
from character_training.live_table import MatrixTable
from character_training.locks import ChainLock, LockHeld, holder
from character_training.matrix_budget import matrix_report
from conftest import write_parameterised_notebook

NOTEBOOKS = ("01_first", "02_second", "03_third")
PERSONAS = ("sarcastic", "loving")
SIZES = ("tiny", "qwen3.5-4b")
LIB = Path(__file__).resolve().parents[1] / "lib"


@pytest.fixture()
def matrix_dirs(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for name in NOTEBOOKS:
        nbformat.write(nbformat.v4.new_notebook(), str(notebooks / f"{name}.ipynb"))
    overrides = {"runs_dir": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "reports")}
    return notebooks, overrides


class FakeExecutor:
    """Runs no notebook: writes the status file and report a notebook would, and counts how
    many notebooks (and how many of one chain) are running at the same moment."""

    def __init__(self, meet: int = 0, fail: tuple[str, str, str] | None = None):
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.most_at_once = 0
        self.most_of_one_chain = 0
        self.order: dict[str, list[str]] = {}
        self.barrier = threading.Barrier(meet, timeout=60) if meet > 1 else None
        self.fail = fail

    def __call__(self, params, notebook):
        chain = f"{params.persona}/{params.size}"
        with self.lock:
            self.running[chain] = self.running.get(chain, 0) + 1
            self.most_at_once = max(self.most_at_once, sum(self.running.values()))
            self.most_of_one_chain = max(self.most_of_one_chain, self.running[chain])
            self.order.setdefault(chain, []).append(notebook)
        try:
            if self.barrier is not None and notebook == NOTEBOOKS[0]:
                self.barrier.wait()  # every chain's first notebook running at once
            if self.fail == (params.persona, params.size, notebook):
                raise RuntimeError("the service answered 500")
            report = runner.write_notice_page(
                params.report_dir / f"{notebook}.html", f"{notebook}: ok", ["fake"]
            )
            result = runner.NotebookResult(
                params.persona, params.size, notebook, "ok", html_path=str(report)
            )
            runner._write_status(result, params.run_dir / "notebooks")
            return result
        finally:
            with self.lock:
                self.running[chain] -= 1


def run(matrix_dirs, executor, jobs, table=None, **kwargs):
    notebooks, overrides = matrix_dirs
    return runner.run_matrix(
        PERSONAS,
        SIZES,
        None,
        overrides,
        notebooks_dir=notebooks,
        on_result=lambda result: None,
        jobs=jobs,
        execute=executor,
        table=table or MatrixTable(io.StringIO(), live=False),
        **kwargs,
    )


@pytest.mark.parametrize("jobs", [1, 2, 4])
def test_jobs_chains_run_at_once_each_in_order_and_never_twice(matrix_dirs, jobs):
    executor = FakeExecutor(meet=jobs)
    results = run(matrix_dirs, executor, jobs)
    assert executor.most_at_once == jobs  # the barrier of `jobs` was met: they overlapped
    assert executor.most_of_one_chain == 1
    chains = [f"{p}/{s}" for p in PERSONAS for s in SIZES]
    assert sorted(executor.order) == sorted(chains)
    assert all(order == list(NOTEBOOKS) for order in executor.order.values())
    # results come back grouped by chain, in the order the chains were given
    assert [f"{r.persona}/{r.size}" for r in results] == [c for c in chains for _ in NOTEBOOKS]
    assert all(r.status == "ok" for r in results)
    runs = Path(matrix_dirs[1]["runs_dir"])
    assert not list(runs.glob("*/*/running.lock"))  # every lock released


def test_a_failing_chain_does_not_stop_the_others_and_the_index_names_it(matrix_dirs):
    executor = FakeExecutor(meet=4, fail=("loving", "qwen3.5-4b", "02_second"))
    table = MatrixTable(io.StringIO(), live=False)
    ledger = Path(matrix_dirs[1]["runs_dir"]) / "loving" / "qwen3.5-4b" / "spend.jsonl"
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"stage": "01_first", "model": "m", "usd": 0.5}) + "\n")
    results = run(matrix_dirs, executor, 4, table)
    statuses = {(r.persona, r.size, r.notebook): r for r in results}
    broken = [statuses[("loving", "qwen3.5-4b", n)] for n in NOTEBOOKS]
    assert [r.status for r in broken] == ["ok", "failed", "skipped"]
    assert broken[1].failure == "runner"
    assert broken[1].error == "RuntimeError: the service answered 500"
    others = [r for r in results if (r.persona, r.size) != ("loving", "qwen3.5-4b")]
    assert len(others) == 9 and all(r.status == "ok" for r in others)
    assert table.counts()["ok"] == 3 and table.counts()["failed"] == 1

    runs, reports = (Path(matrix_dirs[1][k]) for k in ("runs_dir", "reports_dir"))
    states = {c.label: c for c in chain_summaries(runs)}
    assert states["loving/qwen3.5-4b"].state == "failed"
    assert states["loving/qwen3.5-4b"].failed_notebook == "02_second"
    assert [states[c].state for c in states if c != "loving/qwen3.5-4b"] == ["ok"] * 3
    index = (reports / "index.html").read_text()
    assert (
        'failed at 02_second: <a href="loving/qwen3.5-4b/02_second.html">report</a> '
        "(RuntimeError: the service answered 500)"
    ) in index
    assert index.count('class="chain-ok"') == 3
    assert "<td>1/3</td><td>0.50</td></tr>" in index  # notebooks ok, and the ledger's spend
    assert "service answered 500" in (reports / "loving/qwen3.5-4b/02_second.html").read_text()


def test_jobs_on_the_local_backend_warn_that_chains_share_the_cpu(matrix_dirs, caplog):
    with caplog.at_level(logging.WARNING, logger="character_training.runner"):
        run(matrix_dirs, FakeExecutor(), 1)
    assert "share this machine" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="character_training.runner"):
        run(matrix_dirs, FakeExecutor(meet=2), 2)
    warning = [r.getMessage() for r in caplog.records if "share this machine" in r.getMessage()]
    assert len(warning) == 1
    assert warning[0].startswith("--jobs 2: 2 chains run on the local backend")
    assert "sarcastic/tiny, loving/tiny" in warning[0]


def test_kernels_spin_when_one_chain_runs_and_sleep_when_chains_share_the_cpu(
    matrix_dirs, monkeypatch
):
    """The kernels inherit OMP_WAIT_POLICY from the runner: what each notebook started with."""
    seen: list[str] = []

    def recording(params, notebook):
        seen.append(os.environ.get("OMP_WAIT_POLICY", "<unset>"))
        return FakeExecutor()(params, notebook)

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    for jobs, expected in ((1, "ACTIVE"), (2, "PASSIVE"), (1, "ACTIVE")):
        seen.clear()
        run(matrix_dirs, recording, jobs)  # one matrix after another in the same process
        assert seen and set(seen) == {expected}
        assert "OMP_WAIT_POLICY" not in os.environ  # set for that matrix only
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the user's choice wins
    seen.clear()
    run(matrix_dirs, recording, 1)
    assert set(seen) == {"PASSIVE"}


def test_jobs_below_one_is_a_one_line_error(capsys):
    assert main(["run", "--persona", "sarcastic", "--size", "tiny", "--jobs", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --jobs 0: expected a whole number of chains >= 1"


# -- the lock ------------------------------------------------------------------------------------
def test_a_second_holder_is_refused_in_one_line_and_the_first_release_frees_it(tmp_path):
    first = ChainLock(tmp_path, "sarcastic/tiny").acquire()
    first.set_stage("03_dpo")
    assert holder(tmp_path).stage == "03_dpo" and holder(tmp_path).pid == os.getpid()
    with pytest.raises(LockHeld) as refused:
        ChainLock(tmp_path, "sarcastic/tiny").acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'running.lock'}: chain sarcastic/tiny is already")
    assert f"pid {os.getpid()} (stage 03_dpo, since " in message
    first.release()
    assert holder(tmp_path) is None and not (tmp_path / "running.lock").exists()
    with ChainLock(tmp_path, "sarcastic/tiny") as again:
        assert again.held and again.took_over is None


def test_a_lock_left_by_a_dead_pid_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "running.lock").write_text(json.dumps({"pid": dead.pid, "stage": "05_sft"}))
    assert holder(tmp_path) is None  # a file nobody holds is not a running chain
    with caplog.at_level(logging.WARNING, logger="character_training.locks"):
        lock = ChainLock(tmp_path, "loving/tiny").acquire()
    assert lock.took_over.pid == dead.pid
    assert f"taking over the lock of pid {dead.pid} (stage 05_sft)" in caplog.text
    assert "no longer running" in caplog.text
    assert json.loads((tmp_path / "running.lock").read_text())["pid"] == os.getpid()
    lock.release()


HOLD = """
import sys
from character_training.locks import ChainLock
lock = ChainLock(sys.argv[1], "sarcastic/qwen3.5-4b").acquire()
lock.set_stage("03_third")
print("held", flush=True)
sys.stdin.read()
"""


def test_a_chain_run_by_another_process_refuses_the_matrix_before_anything_runs(matrix_dirs):
    run_dir = Path(matrix_dirs[1]["runs_dir"]) / "sarcastic" / "qwen3.5-4b"
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(LIB)},
    )
    try:
        assert other.stdout.readline().strip() == "held"
        executor = FakeExecutor()
        with pytest.raises(LockHeld) as refused:
            run(matrix_dirs, executor, 4)
        assert executor.order == {}  # nothing ran
        message = str(refused.value)
        assert message.startswith(f"{run_dir / 'running.lock'}: chain sarcastic/qwen3.5-4b")
        assert f"pid {other.pid} (stage 03_third, since" in message and "\n" not in message
        runs = Path(matrix_dirs[1]["runs_dir"])
        assert [p.parent.name for p in runs.glob("*/*/running.lock")] == ["qwen3.5-4b"]
    finally:
        other.stdin.close()  # the holder exits, and the kernel drops its lock
        other.wait(timeout=30)
    assert len(run(matrix_dirs, FakeExecutor(meet=4), 4)) == 12


# -- the live table ------------------------------------------------------------------------------
def test_the_table_shows_stage_cell_progress_and_spend(tmp_path):
    stream = io.StringIO()
    table = MatrixTable(stream, live=False, clock=lambda: 100.0)
    table.add_chain("sarcastic", "qwen3.5-9b", tmp_path, 9)
    table.add_chain("loving", "qwen3.5-9b", tmp_path / "other", 9)
    table.start(jobs=2)
    table.chain_started("sarcastic", "qwen3.5-9b")
    executed = nbformat.v4.new_notebook()
    executed.cells = [nbformat.v4.new_code_cell(str(i)) for i in range(3)]
    for cell, status in zip(executed.cells, ["completed", "completed", "running"]):
        cell.metadata["papermill"] = {"status": status}
    (tmp_path / "notebooks").mkdir()
    nbformat.write(executed, str(tmp_path / "notebooks" / "03_dpo.ipynb"))
    assert cell_progress(tmp_path / "notebooks" / "03_dpo.ipynb") == (2, 3)
    table.rows[("sarcastic", "qwen3.5-9b")].done = 2
    table.stage_started("sarcastic", "qwen3.5-9b", "03_dpo")
    lines = table.render().splitlines()
    assert lines[0] == "matrix: 2 chain(s), --jobs 2: 1 queued, 1 running"
    running = next(line for line in lines if line.startswith("sarcastic/qwen3.5-9b"))
    assert (
        running.split()
        == "sarcastic/qwen3.5-9b running 03_dpo 2/9 notebooks, cell 2/3 0:00 -".split()
    )
    assert "sarcastic/qwen3.5-9b: 03_dpo started (3/9)" in stream.getvalue()
    ledger = tmp_path / "other" / "spend.jsonl"  # the spend module's ledger: rows of USD
    ledger.parent.mkdir()
    rows = [
        {"stage": "02_distillation", "model": "m", "usd": u, "priced": "t"} for u in (1.25, 2.5)
    ]
    ledger.write_text("".join(json.dumps(row) + "\n" for row in rows))
    queued = next(line for line in table.render().splitlines() if line.startswith("loving/"))
    assert queued.split() == ["loving/qwen3.5-9b", "queued", "-", "0/9", "notebooks", "-", "3.75"]
    table.stop()
    assert stream.getvalue().rstrip().endswith(queued.rstrip())  # the final table


def test_a_live_table_redraws_in_place_and_keeps_result_lines_above(tmp_path):
    stream = io.StringIO()
    table = MatrixTable(stream, live=True, refresh_s=60)
    table.add_chain("sarcastic", "tiny", tmp_path, 1)
    table.start(jobs=1)
    table.chain_started("sarcastic", "tiny")
    table.log("sarcastic/tiny/01_prompts: ok in 3s")
    table.chain_finished("sarcastic", "tiny")
    table.stop()
    text = stream.getvalue()
    assert "\x1b[" in text and "started (" not in text  # redrawn, not one line per event
    tail = text.rsplit("\x1b[J", 1)[1]  # what stays on screen after the last erase
    assert tail.startswith("matrix: 1 chain(s), --jobs 1: 1 ok")
    assert "sarcastic/tiny/01_prompts: ok in 3s" in text


# -- dry-run ------------------------------------------------------------------------------------
def test_dry_run_of_a_matrix_prints_each_chain_the_total_and_the_power_pointer(tmp_path, capsys):
    overrides = ["--set", f"runs_dir={tmp_path}"]
    argv = ["dry-run", "--persona", "sarcastic,loving", "--size", "qwen3.5-4b,qwen3.5-9b"]
    assert main(argv + overrides) == 0
    text = capsys.readouterr().out
    plans = [
        load_params(s, p, {"runs_dir": str(tmp_path)})
        for p in ("sarcastic", "loving")
        for s in ("qwen3.5-4b", "qwen3.5-9b")
    ]
    usd = [total_usd(estimate(p)) for p in plans]
    lines = text.splitlines()
    assert lines[0] == "Planned cost of 4 chains (persona x size):"
    for params, value in zip(plans, usd):
        row = next(line for line in lines if line.startswith(f"{params.persona}/{params.size} "))
        assert row.split()[-1] == f"{value:,.2f}"
    total = next(line for line in lines if line.startswith("total "))
    assert total.split()[-1] == f"{sum(usd):,.2f}"
    subtotal = next(line for line in lines if line.startswith("qwen3.5-9b (2 personas)"))
    assert subtotal.split()[-1] == f"{usd[1] + usd[3]:,.2f}"
    assert sum(line.startswith("prices: USD per million tokens as of") for line in lines) == 1
    for size in ("qwen3.5-4b", "qwen3.5-9b"):
        assert any(
            line.startswith(f"{size}: 07 Elo ")
            and line.endswith(f"python -m character_training calibrate --size {size}")
            for line in lines
        )


def test_dry_run_of_one_chain_is_still_the_stage_table(tmp_path):
    params = load_params("qwen3.5-9b", "sarcastic", {"runs_dir": str(tmp_path)})
    text = matrix_report([params])
    assert text.startswith("Planned tokens for persona 'sarcastic' at size 'qwen3.5-9b'")
    assert "03_dpo" in text


def test_real_notebooks_run_in_chain_threads(tmp_path):
    """The one test here that starts kernels: papermill from two chain threads at once."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_parameterised_notebook(notebooks / "01_hello.ipynb", "print(f'{persona} on {size}')")
    overrides = {"runs_dir": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "reports")}
    results = runner.run_matrix(
        ["sarcastic", "loving"],
        ["qwen3.5-4b"],
        None,
        overrides,
        notebooks_dir=notebooks,
        on_result=lambda result: None,
        jobs=2,
        table=MatrixTable(io.StringIO(), live=False),
    )
    assert [(r.persona, r.status) for r in results] == [("sarcastic", "ok"), ("loving", "ok")]
    for result in results:
        assert f"{result.persona} on qwen3.5-4b" in Path(result.html_path).read_text()
