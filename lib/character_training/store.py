"""Run folders, manifests and JSONL artifacts: how stages talk to each other.

Layout: ``runs/<persona>/<size>/<stage>/`` holds a stage's JSONL files, ``config.json`` (the
resolved parameters), ``metrics.jsonl`` and ``manifest.json`` (git commit, parameter
fingerprint, inputs, row counts, status). Stages never share globals; a notebook re-executed
alone finds everything it needs here.

Resuming: work is appended to ``*.partial.jsonl`` files record by record, each with a stable
``id``; a restarted stage reads what is there and skips finished ids. A stage whose folder
holds results made with *different* parameters is never silently reused: the caller chooses
``resume`` (same fingerprint only), ``overwrite`` or ``raise`` (see `StageDir.prepare`).

Portable folders: what these files record about other files (manifest inputs, stage settings,
``checkpoints.json``, ``progress.json``) is written by `portable_path`, relative to the run
folder, so a run folder copied to another machine or directory still reads (and resumes)
there; `resolve_path` turns a recorded path back into an absolute one when it is read, so
callers always receive paths they can open. ``tinker://`` URIs are kept as they are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import engine_record
from .config import REPO_ROOT
from .errors import ConfigError, DataError
from .field_dict import FieldDict

ON_EXISTING = ("resume", "overwrite", "raise")


def json_safe(value: Any) -> Any:
    """A copy that standard JSON can hold: NaN and infinities become null (``json.dumps``
    would write ``NaN``, which browsers' and most languages' JSON parsers reject)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Write records atomically (temp file + rename); returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record and flush, so an interruption loses at most the record in flight."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a torn last line (crash mid-write) is ignored, others raise."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the write in flight when the process stopped
            raise DataError(f"{path}:{number}: not valid JSON") from None
    return records


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, timeout=5, check=True
    ).stdout.strip()


def git_commit(repo: Path) -> str:
    """The current commit (with a ``+dirty`` mark), or ``unknown`` outside a git checkout."""
    try:
        commit = _git(repo, "rev-parse", "--short", "HEAD")
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- portable paths ------------------------------------------------------------------------------
def _is_uri(text: str) -> bool:
    return "://" in text


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _anchors(run_dir: Path) -> list[Path]:
    """Folders whose files a run records relative to itself: the run folder, the runs folder
    holding it (``<runs>/<persona>/<size>``: another persona's checkpoints) and the project root
    when the run lies inside it (reports, notebooks)."""
    anchors = [run_dir]
    if len(run_dir.parents) >= 3:  # never the file-system root itself
        anchors.append(run_dir.parents[1])
    if _inside(run_dir, REPO_ROOT):
        anchors.append(REPO_ROOT)
    return anchors


def portable_path(run_dir: Path, path: str | Path) -> str:
    """``path`` as a run's files record it, so the run folder can move.

    An absolute path inside the run folder, the runs folder holding it or the project root
    holding it becomes relative to ``run_dir`` (``checkpoints/.../sampler/dpo``,
    ``../../humorous/tiny/checkpoints/...``); anything else is kept as it is: a ``tinker://``
    URI, an empty string, a path already relative, a path elsewhere on the machine.
    """
    text = str(path)
    if not text or _is_uri(text) or not os.path.isabs(text):
        return text
    absolute = Path(os.path.abspath(text))
    run_dir = Path(os.path.abspath(run_dir))
    if any(_inside(absolute, anchor) for anchor in _anchors(run_dir)):
        return Path(os.path.relpath(absolute, run_dir)).as_posix()
    return text


def model_identity(run_dir: Path, sampler_path: str | None, base_model: str) -> str:
    """What a cache of a model's replies is keyed and named by: the checkpoint's sampler path as
    the run folder records it (`portable_path`: relative, so a run folder copied or moved
    elsewhere still finds its logs), or ``base:<base_model>`` for the untrained base."""
    return portable_path(run_dir, sampler_path) if sampler_path else f"base:{base_model}"


def resolve_path(run_dir: Path, stored: str | Path) -> str:
    """The absolute path for a path recorded by `portable_path` (relative to ``run_dir``);
    URIs, empty strings and absolute paths (as older run folders recorded them) unchanged."""
    text = str(stored)
    if not text or _is_uri(text) or os.path.isabs(text):
        return text
    return os.path.normpath(os.path.join(os.path.abspath(run_dir), text))


def portable_values(run_dir: Path, data: Any) -> Any:
    """A copy of JSON-like ``data`` in which every absolute path (a `Path`, or a one-line string
    starting at the file-system root) is made portable by `portable_path`: how manifests and
    stage settings are written."""
    if isinstance(data, Path):
        return portable_path(run_dir, data)
    if isinstance(data, str):
        return portable_path(run_dir, data) if os.path.isabs(data) and "\n" not in data else data
    if isinstance(data, Mapping):
        return {key: portable_values(run_dir, value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [portable_values(run_dir, value) for value in data]
    return data


def display_path(path: str | Path) -> str:
    """A path as a report shows it: relative to the project root when inside it (no home
    folder or machine-specific prefix), else as it is."""
    text = str(path)
    if not os.path.isabs(text):
        return text
    absolute = Path(os.path.abspath(text))
    return absolute.relative_to(REPO_ROOT).as_posix() if _inside(absolute, REPO_ROOT) else text


def without_root(text: str) -> str:
    """``text`` (an error message shown in a report) with paths under the project root written
    relative to it, and the root itself as ``.``."""
    root = re.escape(str(REPO_ROOT))
    text = re.sub(rf"(?<![\w.-]){root}/(?=[\w.-])", "", text)
    return re.sub(rf"(?<![\w.-]){root}(?![\w.-])", ".", text)


@dataclass
class StageDir:
    """One stage's folder under a run (``runs/<persona>/<size>/<stage>``; a stage's parts may
    nest, e.g. ``09_rlaif/rl``, so the run folder is recorded, not guessed from the parent)."""

    path: Path
    run_root: Path | None = None
    # the local engines' prefill counters when `prepare` ran (`engine_record`)
    engine_start: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def run_dir(self) -> Path:
        return self.run_root if self.run_root is not None else self.path.parent

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {}
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def prepare(self, fingerprint: str, on_existing: str, config: dict[str, Any]) -> bool:
        """Create or reuse the folder; returns True when earlier work is being resumed.

        ``resume`` continues a folder made with the same parameter fingerprint and refuses one
        made with different parameters (that would mix two experiments); ``overwrite`` deletes
        it; ``raise`` refuses any existing results.
        """
        if on_existing not in ON_EXISTING:
            raise ConfigError(f"on_existing={on_existing!r}: expected one of {ON_EXISTING}")
        existing = self.manifest()
        if existing:
            if on_existing == "overwrite":
                shutil.rmtree(self.path)
            elif on_existing == "raise":
                raise ConfigError(
                    f"{self.path} already holds results: pass on_existing='resume' or 'overwrite'"
                )
            elif existing.get("fingerprint") != fingerprint:
                raise ConfigError(
                    f"{self.path} was made with different parameters (fingerprint "
                    f"{existing.get('fingerprint')} vs {fingerprint}): use on_existing="
                    "'overwrite' or another runs_dir"
                )
        resumed = bool(existing) and on_existing == "resume"
        self.engine_start = engine_record.snapshot()
        self.path.mkdir(parents=True, exist_ok=True)
        settings = portable_values(self.run_dir, config)
        (self.path / "config.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
        if not resumed:
            self.write_manifest(fingerprint=fingerprint, status="running", started=time.time())
        return resumed

    def write_manifest(self, **updates: Any) -> dict[str, Any]:
        """Merge ``updates`` into ``manifest.json``; paths in them are stored portable.

        When ``status`` becomes "done", what the local engine picked and the stage's prefill
        work (tokens requested vs. computed since `prepare`) are recorded too
        (`engine_record`; nothing on Tinker).
        """
        manifest = self.manifest()
        if updates.get("status") == "done":
            fields = engine_record.manifest_fields(self.engine_start)
            updates = {**engine_record.keep_earlier_work(fields, manifest), **updates}
        manifest.update(portable_values(self.run_dir, updates))
        manifest.setdefault("git_commit", git_commit(REPO_ROOT))
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, self.manifest_path)
        return manifest

    def finish(self, **counts: Any) -> dict[str, Any]:
        return self.write_manifest(status="done", finished=time.time(), counts=counts)


def stage_dir(run_dir: Path, stage: str) -> StageDir:
    return StageDir(Path(run_dir) / stage, Path(run_dir))


# -- checkpoints ---------------------------------------------------------------------------------
CHECKPOINTS_FILE = "checkpoints.json"


@dataclass(frozen=True)
class Checkpoint(FieldDict):
    """A trained model a later stage can sample from or continue training.

    sampler_path: what ``create_sampling_client(model_path=...)`` takes (a local directory or a
        ``tinker://`` URI). state_path: what ``create_training_client_from_state`` takes (weights
        to continue from; empty when only sampler weights were saved). base_model: the model
        the adapter belongs to. stage: the stage that wrote it.
    """

    name: str
    sampler_path: str
    state_path: str
    base_model: str
    stage: str
    created: float = 0.0


def record_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> None:
    """Add or replace ``checkpoint`` in the run manifest ``<run_dir>/checkpoints.json``.

    Its paths are stored relative to the run folder (`portable_path`); `find_checkpoint` and
    `list_checkpoints` give them back absolute.
    """
    path = Path(run_dir) / CHECKPOINTS_FILE
    table = _read_checkpoints(path)
    entry = checkpoint.to_dict()
    entry["created"] = entry["created"] or time.time()
    for key in ("sampler_path", "state_path"):
        entry[key] = portable_path(run_dir, entry[key])
    table[checkpoint.name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=2, sort_keys=True))
    os.replace(tmp, path)


def find_checkpoint(run_dir: Path, name: str) -> Checkpoint:
    """The checkpoint called ``name`` ("dpo", "final", "rlaif"), or a one-line error saying
    which notebook makes it."""
    table = _read_checkpoints(Path(run_dir) / CHECKPOINTS_FILE)
    if name not in table:
        makers = {"dpo": "03_dpo", "final": "05_sft", "rlaif": "09_rlaif_compare"}
        hint = f"run notebook {makers[name]} first" if name in makers else "train it first"
        raise DataError(
            f"{Path(run_dir) / CHECKPOINTS_FILE}: no checkpoint {name!r} "
            f"(have {sorted(table) or 'none'}); {hint}"
        )
    return _checkpoint(run_dir, table[name])


def list_checkpoints(run_dir: Path) -> dict[str, Checkpoint]:
    table = _read_checkpoints(Path(run_dir) / CHECKPOINTS_FILE)
    return {name: _checkpoint(run_dir, entry) for name, entry in table.items()}


def model_label(run_dir: Path, sampler_path: str | None, base_model: str) -> str:
    """How a report table names a model, never by an absolute path of the machine that ran.

    ``base:<base_model>`` for a base model (no sampler path); the checkpoint's name (``dpo``,
    ``final``, ``rlaif``) when this run recorded ``sampler_path``; ``<persona>/<name>`` for
    another persona's checkpoint at the same size (``<persona>/<size>/<name>`` at another size);
    else the path as `portable_path` records it.
    """
    if not sampler_path:
        return f"base:{base_model}"
    run_dir = Path(run_dir)
    found = _recorded_name(run_dir, sampler_path)
    if found:
        return found
    stored = portable_path(run_dir, sampler_path)
    parts = stored.split("/")
    if len(parts) > 4 and parts[:2] == ["..", ".."] and ".." not in parts[2:4]:
        persona, size = parts[2], parts[3]
        other = _recorded_name(run_dir.parents[1] / persona / size, sampler_path)
        if other:
            return f"{persona}/{other}" if size == run_dir.name else f"{persona}/{size}/{other}"
    return stored


def _recorded_name(run_dir: Path, sampler_path: str) -> str:
    """The name under which ``run_dir`` recorded a checkpoint with this sampler path, or ""."""
    target = resolve_path(run_dir, sampler_path)
    for name, checkpoint in list_checkpoints(run_dir).items():
        if checkpoint.sampler_path == target:
            return name
    return ""


def _checkpoint(run_dir: Path, entry: Mapping[str, Any]) -> Checkpoint:
    checkpoint = Checkpoint(**entry)
    return dataclasses.replace(
        checkpoint,
        sampler_path=resolve_path(run_dir, checkpoint.sampler_path),
        state_path=resolve_path(run_dir, checkpoint.state_path),
    )


def _read_checkpoints(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg})") from None
