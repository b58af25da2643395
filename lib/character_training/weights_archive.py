"""Keep a stage's final sampler weights in the run folder, so results outlive the service.

Tinker deletes saved weights after a while; a run whose ``dpo``/``final``/``rlaif`` exist only
as ``tinker://`` paths can then no longer be sampled or evaluated again. When a stage records
its finished checkpoint (`training.finish_checkpoint`), `keep_sampler_weights` asks the
service for an archive of the sampler weights and unpacks it into
``runs/<persona>/<size>/weights/<name>/``, and notes the outcome in ``weights/kept.json``:

* ``kept``: downloaded (files, bytes, when);
* ``local``: the checkpoint is already a folder on this machine (the local backend);
* ``remote only``: the installed SDK offers no archive URL (``RestClient``'s
  ``get_checkpoint_archive_url_from_tinker_path`` or ``get_checkpoint_archive_url``; the
  installed tinker 0.38 has neither, its successor path being external-weights exports);
* ``failed``: the download or the archive failed (one line why); the stage itself never fails
  for it, the checkpoint stays usable on the service until it expires.

An archive is unpacked into a temporary folder first and refused when a member is a link or
would land outside it; only a complete unpack replaces ``weights/<name>``. `publish` lists the
table (`kept_weights`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from .store import Checkpoint, portable_path

logger = logging.getLogger(__name__)

WEIGHTS_DIR = "weights"
KEPT_FILE = "kept.json"
ARCHIVE_METHODS = ("get_checkpoint_archive_url_from_tinker_path", "get_checkpoint_archive_url")


class ArchiveError(Exception):
    """An archive that cannot be fetched or unpacked safely (reported, never raised out)."""


def kept_weights(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``weights/kept.json``: checkpoint name -> what happened to its sampler weights."""
    path = Path(run_dir) / WEIGHTS_DIR / KEPT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record(run_dir: Path, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    table = kept_weights(run_dir)
    table[name] = entry
    path = Path(run_dir) / WEIGHTS_DIR / KEPT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return entry


def archive_url(rest_client: Any, tinker_path: str) -> str | None:
    """The signed URL of the checkpoint's archive, or None when the SDK offers none."""
    if hasattr(rest_client, ARCHIVE_METHODS[0]):
        answer = getattr(rest_client, ARCHIVE_METHODS[0])(tinker_path)
    elif hasattr(rest_client, ARCHIVE_METHODS[1]):
        import tinker

        parsed = tinker.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        answer = rest_client.get_checkpoint_archive_url(
            parsed.training_run_id, parsed.checkpoint_id
        )
    else:
        return None
    if hasattr(answer, "result"):
        answer = answer.result()
    url = getattr(answer, "url", None)
    if not isinstance(url, str) or not url:
        raise ArchiveError(f"the service answered {type(answer).__name__} without a url")
    return url


def unpack(archive: Path, target: Path) -> tuple[int, int]:
    """Unpack a tar archive into the new folder ``target``; (files, bytes). Links, absolute
    names and names that climb out of ``target`` are refused before anything is written."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        root = target.resolve()
        for member in members:
            if member.issym() or member.islnk() or not (member.isfile() or member.isdir()):
                raise ArchiveError(f"archive member {member.name!r} is not a plain file")
            where = (target / member.name).resolve()
            if where != root and root not in where.parents:
                raise ArchiveError(f"archive member {member.name!r} lies outside the folder")
        target.mkdir(parents=True)
        for member in members:
            destination = target / member.name
            if member.isdir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                raise ArchiveError(f"archive member {member.name!r} has no data")
            with source, destination.open("wb") as out:
                shutil.copyfileobj(source, out)
        files = [m for m in members if m.isfile()]
        return len(files), sum(m.size for m in files)


def download_archive(url: str, run_dir: Path, name: str) -> tuple[Path, int, int]:
    """Fetch ``url`` and unpack it as ``weights/<name>``; (folder, files, bytes)."""
    folder = Path(run_dir) / WEIGHTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder))
    try:
        archive = staging / "archive.tar"
        with urllib.request.urlopen(url) as response, archive.open("wb") as out:
            shutil.copyfileobj(response, out)
        try:
            files, size = unpack(archive, staging / "weights")
        except tarfile.TarError as exc:
            raise ArchiveError(f"not a readable tar archive ({exc})") from None
        target = folder / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / "weights", target)
        return target, files, size
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def keep_sampler_weights(
    run_dir: Path, checkpoint: Checkpoint, rest_client: Any = None
) -> dict[str, Any]:
    """Download ``checkpoint``'s sampler weights into the run folder where the SDK offers an
    archive; returns (and records) the outcome. Never raises for the service or the archive.

    ``rest_client`` answers the archive-URL call; by default a ``tinker.RestClient`` from the
    environment, made only for a ``tinker://`` checkpoint.
    """
    run_dir = Path(run_dir)
    source = checkpoint.sampler_path
    entry: dict[str, Any] = {
        "source": portable_path(run_dir, source),
        "stage": checkpoint.stage,
        "created": checkpoint.created or time.time(),
    }
    if "://" not in source:
        return _record(
            run_dir, checkpoint.name, {**entry, "status": "local", "path": entry["source"]}
        )
    try:
        if rest_client is None:
            from .backends.tinker_backend import create_rest_client

            rest_client = create_rest_client()
        url = archive_url(rest_client, source)
        if url is None:
            return _record(
                run_dir,
                checkpoint.name,
                {
                    **entry,
                    "status": "remote only",
                    "reason": "the installed tinker SDK offers no checkpoint archive URL",
                },
            )
        target, files, size = download_archive(url, run_dir, checkpoint.name)
    except Exception as exc:  # a convenience: the stage's result does not depend on it
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning("could not keep %s's sampler weights locally: %s", checkpoint.name, reason)
        return _record(run_dir, checkpoint.name, {**entry, "status": "failed", "reason": reason})
    return _record(
        run_dir,
        checkpoint.name,
        {
            **entry,
            "status": "kept",
            "path": portable_path(run_dir, target),
            "files": files,
            "bytes": size,
            "downloaded": time.time(),
        },
    )


def kept_lines(run_dir: Path) -> list[str]:
    """One line per recorded checkpoint: kept locally or not (for the provenance page)."""
    from .store import list_checkpoints

    kept = kept_weights(run_dir)
    lines = []
    for name, checkpoint in list_checkpoints(run_dir).items():
        entry = kept.get(name, {})
        lines.append(
            f"{name} (made by {checkpoint.stage} on {_day(checkpoint.created)}): "
            + _where(entry, checkpoint.sampler_path)
        )
    return lines


def _day(created: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(created)) if created else "an unrecorded day"


def _where(entry: dict[str, Any], sampler_path: str) -> str:
    status = entry.get("status")
    if status == "kept":
        size = entry.get("bytes", 0) / 1e6
        return f"kept locally in {entry.get('path')} ({entry.get('files')} files, {size:.1f} MB)"
    if status == "local" or (status is None and "://" not in sampler_path):
        return "kept locally (local backend)"
    if status in ("remote only", "failed"):
        return f"remote only: {entry.get('reason', status)}"
    return "remote only (no download recorded)"


__all__ = [
    "ArchiveError",
    "archive_url",
    "download_archive",
    "keep_sampler_weights",
    "kept_lines",
    "kept_weights",
    "unpack",
]
