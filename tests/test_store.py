"""Run folders: resume never mixes experiments, interruptions lose at most one record."""

from __future__ import annotations

import json

import pytest
from character_training.errors import ConfigError, DataError
from character_training.store import append_jsonl, read_jsonl, stage_dir, write_jsonl


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
