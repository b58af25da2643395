"""A stage's final sampler weights kept in the run folder (issue 18, section 5).

A fake rest client serves a small tar archive from a ``file://`` URL (the SDK hands out a
signed URL; ``urllib`` fetches both alike). Pinned: the archive lands in ``weights/<name>``
byte for byte and is recorded; an SDK without an archive URL, an unsafe archive and a local
checkpoint are recorded as what they are, never raised; `publish` lists each checkpoint as
kept locally or remote only.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from character_training.store import Checkpoint, record_checkpoint
from character_training.weights_archive import (
    ArchiveError,
    archive_url,
    keep_sampler_weights,
    kept_lines,
    kept_weights,
    unpack,
)

REMOTE = "tinker://run-7/sampler_weights/final"
FILES = {
    "adapter/adapter_config.json": b'{"r": 4}',
    "adapter/adapter_model.safetensors": b"\0" * 64,
}


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


class Answer:
    """What the SDK's call returns: a future of a response with a ``url``."""

    def __init__(self, url: str):
        self.url = url

    def result(self):
        return SimpleNamespace(url=self.url)


class RestByPath:
    def __init__(self, archive: Path):
        self.asked: list[str] = []
        self.archive = archive

    def get_checkpoint_archive_url_from_tinker_path(self, path: str) -> Answer:
        self.asked.append(path)
        return Answer(self.archive.as_uri())


class RestByIds:
    def __init__(self, archive: Path):
        self.asked: list[tuple[str, str]] = []
        self.archive = archive

    def get_checkpoint_archive_url(self, run_id: str, checkpoint_id: str) -> Answer:
        self.asked.append((run_id, checkpoint_id))
        return Answer(self.archive.as_uri())


def checkpoint(run: Path, sampler_path: str = REMOTE, name: str = "final") -> Checkpoint:
    made = Checkpoint(
        name,
        sampler_path,
        "tinker://run-7/weights/final",
        "Qwen/Qwen3.5-9B",
        "05_sft",
        created=1_780_000_000.0,
    )
    record_checkpoint(run, made)
    return made


def test_the_archive_is_downloaded_into_the_run_folder(tmp_path):
    run = tmp_path / "runs" / "p" / "s"
    rest = RestByPath(make_tar(tmp_path / "a.tar", FILES))
    entry = keep_sampler_weights(run, checkpoint(run), rest)
    assert rest.asked == [REMOTE]
    assert entry["status"] == "kept" and entry["path"] == "weights/final"
    assert (entry["files"], entry["bytes"]) == (2, sum(len(b) for b in FILES.values()))
    for name, payload in FILES.items():
        assert (run / "weights" / "final" / name).read_bytes() == payload
    assert kept_weights(run)["final"]["source"] == REMOTE
    assert kept_lines(run) == [
        "final (made by 05_sft on 2026-05-28): kept locally in weights/final (2 files, 0.0 MB)"
    ]


def test_the_older_call_by_run_and_checkpoint_id_works_too(tmp_path):
    rest = RestByIds(make_tar(tmp_path / "a.tar", FILES))
    assert archive_url(rest, REMOTE) == (tmp_path / "a.tar").as_uri()
    assert rest.asked == [("run-7", "sampler_weights/final")]  # the SDK's checkpoint id


def test_without_an_archive_url_the_checkpoint_is_recorded_as_remote_only(tmp_path):
    run = tmp_path / "run"
    entry = keep_sampler_weights(run, checkpoint(run), rest_client=object())
    assert entry["status"] == "remote only"
    assert not (run / "weights" / "final").exists()
    assert kept_lines(run)[0].endswith(
        "remote only: the installed tinker SDK offers no checkpoint archive URL"
    )


def test_an_unsafe_archive_is_refused_and_nothing_lands_outside(tmp_path):
    run = tmp_path / "run"
    bad = make_tar(tmp_path / "bad.tar", {"../escaped.txt": b"x", "ok.txt": b"y"})
    entry = keep_sampler_weights(run, checkpoint(run), RestByPath(bad))
    assert entry["status"] == "failed" and "outside the folder" in entry["reason"]
    assert not (run / "escaped.txt").exists() and not (run / "weights" / "final").exists()
    with pytest.raises(ArchiveError, match="outside"):
        unpack(bad, tmp_path / "target")
    assert not (tmp_path / "target").exists()


def test_a_local_checkpoint_is_already_kept(tmp_path):
    run = tmp_path / "run"
    folder = run / "checkpoints" / "x" / "sampler" / "dpo"
    entry = keep_sampler_weights(run, checkpoint(run, str(folder), "dpo"))
    assert entry["status"] == "local" and entry["path"] == "checkpoints/x/sampler/dpo"
    assert kept_lines(run)[0].endswith("kept locally (local backend)")


def test_publish_lists_which_checkpoints_are_kept(tmp_path):
    from character_training.publish import collect_provenance

    run = tmp_path / "runs" / "p" / "s"
    keep_sampler_weights(run, checkpoint(run), RestByPath(make_tar(tmp_path / "a.tar", FILES)))
    checkpoint(run, "tinker://run-7/sampler_weights/dpo", "dpo")  # never downloaded
    lines = collect_provenance(tmp_path / "runs", "p", "s").checkpoints
    assert any(
        line.startswith("final") and "kept locally in weights/final" in line for line in lines
    )
    assert any(line.startswith("dpo") and "remote only" in line for line in lines)
