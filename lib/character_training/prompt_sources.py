"""General (persona-neutral) prompts: the shipped pool, tinker-cookbook's examples, hub sets.

The paper mixed LIMA into DPO training and used WildChat (Elo) and Pure-Dove (robustness) for
evaluation. Those live on the Hugging Face hub, which an offline machine cannot reach, so
every loader here has an offline answer: the project's own pool of general prompts
(``data/general_prompts.jsonl``, written for this project) plus the 128 real conversations
that ship inside the tinker-cookbook wheel. Hub sets are only tried when named in
``prompts.hub_datasets``. A run that names one and cannot reach it stops with a one-line error
(it asked for that data; training on something else without saying so would be a silent
substitution), unless ``prompts.hub_offline_fallback`` allows continuing with the offline
sources. Either way `describe_pool` records what the pool really held (per-source counts and a
content hash) for the stage's config and fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError
from .field_dict import FieldDict
from .store import read_jsonl

logger = logging.getLogger(__name__)

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
DATA_DIR = Path(__file__).resolve().parent / "data"

# Hub identifiers and how to read a user turn from a row of each.
HUB_DATASETS = {
    "lima": ("GAIR/lima", "train", lambda row: row["conversations"][0]),
    "wildchat": ("allenai/WildChat-1M", "train", lambda row: row["conversation"][0]["content"]),
    "pure-dove": ("LDJnr/Pure-Dove", "train", lambda row: row["conversation"][0]["input"]),
}


@dataclass(frozen=True)
class PromptRecord(FieldDict):
    """One prompt with a stable id and where it came from."""

    id: str
    prompt: str
    source: str
    category: str = ""


def check_prompt_records(
    rows: Sequence[Mapping[str, Any]], where: Path | str, fields: Sequence[str] = ("id", "prompt")
) -> None:
    """Refuse, in one line naming ``where`` and the row, a record lacking a non-empty string in
    one of ``fields``: what every stage reading stage 01's prompt files needs of a row."""
    for number, row in enumerate(rows, start=1):
        missing = [k for k in fields if not isinstance(row.get(k), str) or not row[k]]
        if missing:
            raise DataError(f"{where}:{number}: expected a non-empty string {missing[0]!r} field")


def read_prompt_file(path: Path, fields: Sequence[str] = ("id", "prompt")) -> list[dict]:
    """The records of a prompt file notebook 01 wrote (`PromptRecord` rows, such as
    ``general_eval.jsonl`` or ``qualitative.jsonl``), checked by `check_prompt_records`; a
    missing or empty file is a one-line `DataError` naming the notebook to run."""
    if not path.is_file():
        raise DataError(f"{path} is missing: run notebook 01_prompts first")
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path} holds no prompts: run notebook 01_prompts first")
    check_prompt_records(rows, path, fields)
    return rows


def _read_pool(path: Path, source: str) -> list[PromptRecord]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            records.append(PromptRecord(row["id"], row["prompt"], source, row.get("category", "")))
        except (json.JSONDecodeError, KeyError) as exc:
            raise DataError(
                f"{path}:{number}: expected a JSON object with id and prompt ({exc})"
            ) from None
    return records


def shipped_general_prompts() -> list[PromptRecord]:
    """The project's own pool of persona-neutral prompts (see data/README.md)."""
    return _read_pool(DATA_DIR / "general_prompts.jsonl", "shipped")


def qualitative_prompts() -> list[PromptRecord]:
    """The fixed side-by-side set (trait-relevant and neutral), never used for training."""
    return _read_pool(DATA_DIR / "qualitative_prompts.jsonl", "qualitative")


def cookbook_conversation_prompts() -> list[PromptRecord]:
    """First user turns of tinker-cookbook's bundled example conversations (offline, real)."""
    try:
        import tinker_cookbook
    except ImportError:
        return []
    path = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        messages = json.loads(line).get("messages", [])
        first = next((m for m in messages if m.get("role") == "user"), None)
        if first and isinstance(first.get("content"), str):
            records.append(PromptRecord(f"cookbook-{number:04d}", first["content"], "cookbook"))
    return records


def hub_prompts(name: str, limit: int, offline_fallback: bool = False) -> list[PromptRecord]:
    """Up to ``limit`` first user turns from a hub dataset.

    Unreachable (offline variables set, no network, no access, ``datasets`` missing): a
    one-line `DataError` naming the fixes, or, with ``offline_fallback``, a warning and [].
    """
    if name not in HUB_DATASETS:
        raise DataError(f"unknown hub dataset {name!r}: expected one of {sorted(HUB_DATASETS)}")
    repo, split, first_turn = HUB_DATASETS[name]
    offline = [v for v in _OFFLINE_VARIABLES if os.environ.get(v, "").lower() in ("1", "true")]
    if offline:
        return _unreachable(name, repo, f"{offline[0]} is set", offline_fallback)
    try:
        import datasets

        rows = datasets.load_dataset(repo, split=split, streaming=True)
        records = []
        for index, row in enumerate(rows):
            if len(records) >= limit:
                break
            text = first_turn(row)
            if isinstance(text, str) and text.strip():
                records.append(PromptRecord(f"{name}-{index:06d}", text.strip(), name))
        return records
    except Exception as exc:  # network, auth, a missing package or a changed format alike
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return _unreachable(name, repo, reason, offline_fallback)


def _unreachable(name: str, repo: str, reason: str, offline_fallback: bool) -> list[PromptRecord]:
    if not offline_fallback:
        raise DataError(
            f"hub dataset {name} ({repo}) is unreachable ({reason}): connect to the hub, drop "
            f"{name!r} from prompts.hub_datasets, or set prompts.hub_offline_fallback=true to "
            "continue with the offline prompt pool"
        )
    logger.warning(
        "hub dataset %s (%s) unavailable (%s); continuing with the offline prompt pool "
        "(prompts.hub_offline_fallback=true)",
        name,
        repo,
        reason,
    )
    return []


def general_prompt_pool(
    hub_datasets: tuple[str, ...] = (), hub_limit: int = 2000, offline_fallback: bool = False
) -> list[PromptRecord]:
    """All general prompts available here, offline sources first, in a stable order."""
    pool = shipped_general_prompts() + cookbook_conversation_prompts()
    for name in hub_datasets:
        pool += hub_prompts(name, hub_limit, offline_fallback=offline_fallback)
    return pool


def describe_pool(pool: list[PromptRecord], hub_datasets: tuple[str, ...] = ()) -> dict:
    """What a pool actually held: size, prompts per source, and a hash of its content.

    Requested hub sets appear even with 0 prompts (an offline fallback), so a run's config
    shows the substitution; the hash changes whenever any id or text changes, so it can go into
    a stage fingerprint.
    """
    sources = {name: 0 for name in hub_datasets}
    digest = hashlib.sha256()
    for record in pool:
        sources[record.source] = sources.get(record.source, 0) + 1
        digest.update(json.dumps([record.id, record.prompt], ensure_ascii=False).encode())
        digest.update(b"\n")
    return {"size": len(pool), "sources": sources, "sha256": digest.hexdigest()[:16]}
