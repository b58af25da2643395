"""Progress lines for headless notebook runs (`notebook_progress`): tqdm's widget and text
bars become throttled log lines, and the kernel connection is encrypted (no IPKernelApp
warning)."""

from __future__ import annotations

import nbformat
import pytest
from character_training.notebook_progress import StepProgress, kernel_manager


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def comm(kind: str, model: str, state: dict) -> dict:
    data = {"state": state} if kind == "comm_open" else {"method": "update", "state": state}
    return {"header": {"msg_type": kind}, "content": {"comm_id": model, "data": data}}


def widget_bar(progress: StepProgress, box: str, desc: str) -> None:
    """The comm_open messages tqdm.notebook sends for one bar: two texts, a bar, their box."""
    progress.observe(comm("comm_open", box + "l", {"_model_name": "HTMLModel", "value": desc}))
    progress.observe(comm("comm_open", box + "p", {"_model_name": "FloatProgressModel"}))
    progress.observe(comm("comm_open", box + "r", {"_model_name": "HTMLModel", "value": ""}))
    children = [f"IPY_MODEL_{box}{part}" for part in "lpr"]
    progress.observe(comm("comm_open", box, {"_model_name": "HBoxModel", "children": children}))


def show(progress: StepProgress, box: str, left: str, right: str) -> None:
    """One tqdm.notebook display: bar value, then left text, then right text (U+2007 padded)."""
    progress.observe(comm("comm_msg", box + "p", {"value": 1.0}))
    progress.observe(comm("comm_msg", box + "l", {"value": left.replace(" ", "\u2007")}))
    progress.observe(comm("comm_msg", box + "r", {"value": right.replace(" ", "\u2007")}))


def test_widget_bars_print_every_interval_and_when_done_but_quick_bars_stay_quiet():
    lines: list[str] = []
    clock = Clock()
    progress = StepProgress("sarcastic/tiny 02", lines.append, every_s=10, min_s=2, clock=clock)
    widget_bar(progress, "a", "teacher replies")
    show(progress, "a", "teacher replies:   0%", " 0/93 [00:00<?, ?reply/s]")
    clock.now += 4
    show(progress, "a", "teacher replies:  10%", " 9/93 [00:04<00:37, 2.2reply/s]")
    assert lines == []  # running for less than every_s
    clock.now += 7
    show(progress, "a", "teacher replies:  20%", " 19/93 [00:11<00:41, 1.8reply/s]")
    widget_bar(progress, "b", "sampling")  # an inner bar that ends within min_s: no line
    show(progress, "b", "sampling:   0%", " 0/2 [00:00<?, ?seq/s]")
    clock.now += 1
    show(progress, "b", "sampling: 100%", " 2/2 [00:01<00:00, 2.0seq/s]")
    show(progress, "a", "teacher replies:  25%", " 23/93 [00:12<00:37, 1.9reply/s]")
    clock.now += 30
    show(progress, "a", "teacher replies: 100%", " 93/93 [00:42<00:00, 2.2reply/s]")
    assert lines == [
        "sarcastic/tiny 02: teacher replies: 20% 19/93 [00:11<00:41, 1.8reply/s]",
        "sarcastic/tiny 02: teacher replies: 100% 93/93 [00:42<00:00, 2.2reply/s]",
    ]
    progress.observe({"header": {"msg_type": "comm_msg"}, "content": None})  # ignored, no raise


def test_text_bars_on_stderr_are_read_from_carriage_returned_updates():
    lines: list[str] = []
    clock = Clock()
    progress = StepProgress("nb", lines.append, every_s=5, min_s=0, clock=clock)

    def stderr(text):
        progress.observe(
            {"header": {"msg_type": "stream"}, "content": {"name": "stderr", "text": text}}
        )

    stderr("judging:   0%|          | 0/4 [00:00<?, ?it/s]")
    clock.now += 6
    stderr("\rjudging:  50%|█████     | 2/4 [00:06<00:06,  3.0s/it]")
    stderr("\rjudging: 100%|██████████| 4/4 [00:07<00:00,  1.7s/it]\n")
    stderr("an ordinary warning line\n")
    assert lines == [
        "nb: judging: 50% 2/4 [00:06<00:06, 3.0s/it]",
        "nb: judging: 100% 4/4 [00:07<00:00, 1.7s/it]",
    ]


@pytest.mark.slow
def test_papermill_with_the_manager_reports_a_bar_and_the_kernel_warns_of_no_plain_tcp(
    tmp_path, capfd
):
    import papermill

    notebook = nbformat.v4.new_notebook()
    code = "import time\nfrom tqdm.auto import tqdm\n"
    code += "for _ in tqdm(range(3), desc='step'):\n    time.sleep(0.2)"
    notebook.cells = [nbformat.v4.new_code_cell(code)]
    notebook.metadata["kernelspec"] = {"name": "python3", "language": "python"}
    nbformat.write(notebook, tmp_path / "in.ipynb")
    lines: list[str] = []
    progress = StepProgress("p/s 01", lines.append, every_s=60, min_s=0.3)
    papermill.execute_notebook(
        str(tmp_path / "in.ipynb"),
        str(tmp_path / "out.ipynb"),
        kernel_name="python3",
        progress_bar=False,
        kernel_manager_class=kernel_manager("p/s 01", progress),
    )
    assert len(lines) == 1 and lines[0].startswith("p/s 01: step: 100%")
    assert "3/3 [" in lines[0]
    assert "without encryption" not in capfd.readouterr().err
