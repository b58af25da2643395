"""When a remote checkpoint is gone: one line naming the stage to rerun.

Tinker deletes saved weights after a while (or when their ``ttl_seconds`` run out), and the
service then answers ``tinker.NotFoundError`` for the path. A run folder still names that path:
in ``checkpoints.json`` (a stage's finished model, recorded with its creation time) or in a
stage's ``progress.json`` (its last resume point). `gone_error` turns the service's answer into
a `CheckpointGoneError` that says which checkpoint it was, when it was made, which stage made
it and the command that makes it again, instead of a traceback from deep inside the SDK.
`metering.MeteredService` applies it to every call that opens a client from a path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .errors import BackendError
from .store import list_checkpoints, resolve_path


class CheckpointGoneError(BackendError):
    """A checkpoint this run recorded is no longer on the service."""


def is_not_found(exc: BaseException) -> bool:
    """Whether ``exc`` is the service's "no such checkpoint" answer."""
    import tinker

    return isinstance(exc, tinker.NotFoundError)


def _same(run_dir: Path, recorded: str, path: str) -> bool:
    return bool(recorded) and resolve_path(run_dir, recorded) == resolve_path(run_dir, path)


def _age(created: float) -> str:
    if not created:
        return "at an unrecorded time"
    days = (time.time() - created) / 86400
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(created))
    return f"on {when} ({days:.1f} days ago)"


def _rerun(run_dir: Path, stage: str) -> str:
    number = stage.split("_", 1)[0]
    persona, size = Path(run_dir).parent.name, Path(run_dir).name
    return (
        f"python -m character_training run --persona {persona} --size {size} "
        f"--notebooks {number} --on-existing overwrite"
    )


def describe_gone(run_dir: Path, path: str) -> str:
    """The one-line explanation for ``path`` (see the module docstring)."""
    run_dir = Path(run_dir)
    for name, checkpoint in list_checkpoints(run_dir).items():
        if _same(run_dir, checkpoint.sampler_path, path) or _same(
            run_dir, checkpoint.state_path, path
        ):
            stage = checkpoint.stage.split("/", 1)[0]
            kept = _kept_note(run_dir, name)
            return (
                f"checkpoint {name!r} ({path}), made by {stage} {_age(checkpoint.created)}, is "
                f"gone from the service (expired or deleted); rerun {stage} and the stages after "
                f"it: {_rerun(run_dir, stage)}{kept}"
            )
    for progress in sorted(run_dir.rglob("progress.json")):
        try:
            data = json.loads(progress.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and _same(run_dir, str(data.get("state_path", "")), path):
            stage = progress.parent.relative_to(run_dir).parts[0]
            return (
                f"the resume point of {stage} (step {data.get('step')}, {path}), saved "
                f"{_age(progress.stat().st_mtime)}, is gone from the service (expired or "
                f"deleted); rerun {stage} from its start: {_rerun(run_dir, stage)}"
            )
    return (
        f"checkpoint {path} is gone from the service (expired or deleted) and no stage of "
        f"{run_dir.parent.name}/{run_dir.name} recorded it; rerun the stage that made it"
    )


def _kept_note(run_dir: Path, name: str) -> str:
    from .weights_archive import kept_weights

    entry = kept_weights(run_dir).get(name, {})
    if entry.get("status") == "kept":
        return f" (its sampler weights are kept locally in {entry.get('path')})"
    return ""


def gone_error(run_dir: Path, path: str, exc: BaseException) -> CheckpointGoneError:
    """`CheckpointGoneError` for the service's "not found" answer about ``path``."""
    error = CheckpointGoneError(describe_gone(run_dir, str(path)))
    error.__cause__ = exc
    return error


__all__ = ["CheckpointGoneError", "describe_gone", "gone_error", "is_not_found"]
