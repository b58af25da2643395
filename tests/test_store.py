"""Run folders: resume never mixes experiments, interruptions lose at most one record, and a
run folder copied elsewhere still reads and resumes.

Bug pinned here: manifests, ``checkpoints.json`` and ``progress.json`` recorded absolute paths of
the machine that ran, so a copied run folder pointed back at the original (or at nothing).
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from character_training.config import REPO_ROOT
from character_training.errors import ConfigError, DataError
from character_training.store import (
    CHECKPOINTS_FILE,
    Checkpoint,
    append_jsonl,
    display_path,
    find_checkpoint,
    list_checkpoints,
    model_label,
    portable_path,
    read_jsonl,
    record_checkpoint,
    resolve_path,
    stage_dir,
    without_root,
    write_jsonl,
)
from character_training.training import read_progress, save_progress


def test_append_then_read_returns_records_in_order_and_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "x.partial.jsonl"
    for i in range(3):
        append_jsonl(path, {"id": i})
    with path.open("a") as handle:
        handle.write('{"id": 3, "te')  # the process died mid-write
    assert [r["id"] for r in read_jsonl(path)] == [0, 1, 2]


def test_a_corrupt_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_write_jsonl_replaces_atomically_and_counts(tmp_path):
    path = tmp_path / "out.jsonl"
    assert write_jsonl(path, ({"i": i} for i in range(4))) == 4
    assert write_jsonl(path, [{"i": 9}]) == 1
    assert read_jsonl(path) == [{"i": 9}]
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_continues_the_same_parameters_and_refuses_different_ones(tmp_path):
    stage = stage_dir(tmp_path, "01_prompts")
    assert stage.prepare("abc", "resume", {"k": 1}) is False
    append_jsonl(stage.file("work.partial.jsonl"), {"id": "done-1"})
    assert stage.prepare("abc", "resume", {"k": 1}) is True
    assert read_jsonl(stage.file("work.partial.jsonl")) == [{"id": "done-1"}]
    with pytest.raises(
        ConfigError, match=r"made with different parameters \(fingerprint abc vs xyz\)"
    ):
        stage.prepare("xyz", "resume", {"k": 2})


def test_overwrite_clears_old_results_and_raise_refuses_them(tmp_path):
    stage = stage_dir(tmp_path, "s")
    stage.prepare("a", "resume", {})
    append_jsonl(stage.file("old.jsonl"), {"x": 1})
    with pytest.raises(ConfigError, match="already holds results"):
        stage.prepare("a", "raise", {})
    stage.prepare("b", "overwrite", {})
    assert not stage.file("old.jsonl").exists()
    with pytest.raises(ConfigError, match="on_existing='maybe': expected one of"):
        stage.prepare("b", "maybe", {})


def test_manifest_records_fingerprint_status_counts_and_commit(tmp_path):
    stage = stage_dir(tmp_path, "s")
    stage.prepare("f1", "resume", {"a": 1})
    manifest = stage.finish(rows=7)
    assert manifest["fingerprint"] == "f1" and manifest["status"] == "done"
    assert manifest["counts"] == {"rows": 7}
    assert manifest["git_commit"]
    assert json.loads(stage.file("config.json").read_text()) == {"a": 1}


# -- portable run folders --------------------------------------------------------------------------
def _run(root, persona="sycophantic", size="tiny"):
    run = root / "runs" / persona / size
    run.mkdir(parents=True)
    return run


def test_paths_inside_the_run_or_its_runs_folder_are_stored_relative_and_resolve_back(tmp_path):
    run = _run(tmp_path)
    own = run / "checkpoints" / "abc" / "sampler" / "dpo"
    other = tmp_path / "runs" / "humorous" / "tiny" / "checkpoints" / "x" / "sampler" / "final"
    assert portable_path(run, own) == "checkpoints/abc/sampler/dpo"
    assert portable_path(run, str(other)) == "../../humorous/tiny/checkpoints/x/sampler/final"
    for path in (own, other):
        assert resolve_path(run, portable_path(run, path)) == str(path)
    uri = "tinker://run-123/sampler_weights/dpo"
    elsewhere = "/opt/models/encoder"  # outside the run, its runs folder and the project
    for kept in (uri, "", elsewhere, "checkpoints/already/relative"):
        assert portable_path(run, kept) == kept
    for kept in (uri, "", elsewhere):
        assert resolve_path(run, kept) == kept
    assert resolve_path(run, "checkpoints/a") == str(run / "checkpoints" / "a")


def test_a_run_inside_the_project_records_project_files_relative_to_itself():
    run = REPO_ROOT / "runs" / "sycophantic" / "tiny"
    report = REPO_ROOT / "reports" / "sycophantic" / "tiny" / "01_prompts.html"
    assert portable_path(run, report) == "../../../reports/sycophantic/tiny/01_prompts.html"
    assert resolve_path(run, portable_path(run, report)) == str(report)
    assert display_path(report) == "reports/sycophantic/tiny/01_prompts.html"
    assert display_path("/opt/x") == "/opt/x"
    assert without_root(f"{report}: file not found") == (
        "reports/sycophantic/tiny/01_prompts.html: file not found"
    )


def test_checkpoints_are_recorded_portable_and_found_absolute_wherever_the_run_is(tmp_path):
    run = _run(tmp_path / "a")
    sampler, state = run / "checkpoints" / "s" / "dpo", run / "checkpoints" / "t" / "dpo-final"
    record_checkpoint(run, Checkpoint("dpo", str(sampler), str(state), "Base/Model", "03_dpo"))
    record_checkpoint(run, Checkpoint("rlaif", "tinker://r/rlaif", "", "Base/Model", "09"))
    stored = json.loads((run / CHECKPOINTS_FILE).read_text())
    assert stored["dpo"]["sampler_path"] == "checkpoints/s/dpo"
    assert stored["dpo"]["state_path"] == "checkpoints/t/dpo-final"
    assert stored["rlaif"]["sampler_path"] == "tinker://r/rlaif"
    assert str(tmp_path) not in (run / CHECKPOINTS_FILE).read_text()
    assert find_checkpoint(run, "dpo").sampler_path == str(sampler)

    moved = tmp_path / "b" / "runs" / "sycophantic" / "tiny"
    shutil.copytree(run, moved)
    shutil.rmtree(tmp_path / "a")
    found = find_checkpoint(moved, "dpo")
    assert found.sampler_path == str(moved / "checkpoints" / "s" / "dpo")
    assert found.state_path == str(moved / "checkpoints" / "t" / "dpo-final")
    assert list_checkpoints(moved)["rlaif"].sampler_path == "tinker://r/rlaif"


def test_old_run_folders_with_absolute_checkpoint_paths_still_read(tmp_path):
    run = _run(tmp_path)
    entry = Checkpoint("dpo", "/old/machine/sampler", "/old/machine/state", "M", "03_dpo")
    (run / CHECKPOINTS_FILE).write_text(json.dumps({"dpo": entry.to_dict()}))
    assert find_checkpoint(run, "dpo") == entry


def test_reports_name_models_by_label_never_by_path(tmp_path):
    run = _run(tmp_path)
    other = _run(tmp_path, "humorous")
    bigger = _run(tmp_path, "humorous", "qwen3.5-4b")
    for folder, name in ((run, "final"), (other, "dpo"), (bigger, "final")):
        path = folder / "checkpoints" / name
        record_checkpoint(folder, Checkpoint(name, str(path), "", "M", "s"))
    assert model_label(run, None, "HuggingFaceTB/SmolLM2") == "base:HuggingFaceTB/SmolLM2"
    assert model_label(run, str(run / "checkpoints" / "final"), "M") == "final"
    assert model_label(run, str(other / "checkpoints" / "dpo"), "M") == "humorous/dpo"
    bigger_final = str(bigger / "checkpoints" / "final")
    assert model_label(run, bigger_final, "M") == "humorous/qwen3.5-4b/final"
    unrecorded = run / "checkpoints" / "rl-step-4"
    assert model_label(run, str(unrecorded), "M") == "checkpoints/rl-step-4"
    assert model_label(run, "tinker://x/y", "M") == "tinker://x/y"


def test_manifest_inputs_and_stage_settings_hold_paths_relative_to_the_run(tmp_path):
    run = _run(tmp_path)
    stage = stage_dir(run, "02_distillation")
    prompts = run / "01_prompts" / "general_train.jsonl"
    stage.prepare("f", "resume", {"start_state": str(run / "checkpoints" / "st"), "beta": 0.1})
    stage.write_manifest(inputs={"general_train.jsonl": str(prompts)}, note="/ not a path")
    manifest = stage.manifest()
    assert manifest["inputs"] == {"general_train.jsonl": "01_prompts/general_train.jsonl"}
    assert manifest["note"] == "/ not a path"
    config = json.loads(stage.file("config.json").read_text())
    assert config == {"start_state": "checkpoints/st", "beta": 0.1}
    assert str(tmp_path) not in stage.manifest_path.read_text()


class _SavingClient:
    """Stands in for a training client's save_state: returns where the state was written."""

    def __init__(self, root):
        self.root = root

    def save_state(self, name):
        path = self.root / "checkpoints" / "state" / name
        return SimpleNamespace(result=lambda: SimpleNamespace(path=str(path)))


def test_progress_holds_a_portable_state_path_and_resumes_from_a_copied_run(tmp_path):
    run = _run(tmp_path / "a")
    stage = stage_dir(run, "03_dpo")
    stage.prepare("f", "resume", {})
    progress = save_progress(_SavingClient(run), stage, 5)
    assert progress.state_path == str(run / "checkpoints" / "state" / "03_dpo-step-000005")
    stored = json.loads(stage.file("progress.json").read_text())
    assert stored == {"step": 5, "state_path": "checkpoints/state/03_dpo-step-000005"}
    moved = tmp_path / "b" / "sycophantic" / "tiny"
    shutil.copytree(run, moved)
    resumed = read_progress(stage_dir(moved, "03_dpo"))
    assert resumed.step == 5
    assert resumed.state_path == str(moved / "checkpoints" / "state" / "03_dpo-step-000005")
