"""Stage 02's held-out prompts with their kept replies, and the split of their ids into
classifier prompts and probe prompts.

``02_distillation/heldout.jsonl`` holds, per held-out prompt, one teacher and one bare-student
reply, each with a drop reason or null; they are never trained on by the character stages.
The adherence measure fits its classifier on some of these prompts and measures models on the
others; stage 08's robustness classifier splits its own prompts with the same function, and
stage 09 takes its RL probe prompts from here. `split_prompt_ids` ranks ids by a hash of
(seed, id), so the split is the same in every notebook, on every machine, whatever the order of
the file.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import DISTILL_STAGE
from ..errors import ConfigError, DataError
from ..store import read_jsonl

HELDOUT_FILE = "heldout.jsonl"
_HELDOUT_KEYS = (
    "prompt_id",
    "prompt",
    "source",
    "assertion_id",
    "teacher_reply",
    "student_reply",
    "teacher_drop_reason",
    "student_drop_reason",
)


@dataclass(frozen=True)
class HeldoutPrompt:
    """One held-out prompt of stage 02 with its kept replies (None when dropped)."""

    prompt_id: str
    prompt: str
    source: str
    assertion_id: str | None
    teacher_reply: str | None
    student_reply: str | None


def _kept(record: Mapping[str, Any], side: str) -> str | None:
    reply = record.get(f"{side}_reply")
    if record.get(f"{side}_drop_reason") is not None:
        return None
    if not isinstance(reply, str) or not reply.strip():
        return None
    return reply


def heldout_path(run_dir: Path) -> Path:
    return Path(run_dir) / DISTILL_STAGE / HELDOUT_FILE


def load_heldout(run_dir: Path) -> list[HeldoutPrompt]:
    """Stage 02's held-out prompts and replies, checked; one-line errors when unusable."""
    path = heldout_path(run_dir)
    if not path.is_file():
        raise DataError(
            f"{path}: not found; run notebook 02 first (02_distillation writes the held-out "
            "teacher and student replies the adherence classifier is trained on)"
        )
    records = read_jsonl(path)
    prompts: list[HeldoutPrompt] = []
    seen: set[str] = set()
    for number, record in enumerate(records, start=1):
        missing = [k for k in _HELDOUT_KEYS if k not in record]
        if missing:
            raise DataError(
                f"{path}: record {number} lacks {missing}; expected keys {list(_HELDOUT_KEYS)}"
            )
        prompt_id = record["prompt_id"]
        if not isinstance(prompt_id, str) or not prompt_id or prompt_id in seen:
            raise DataError(
                f"{path}: record {number}: prompt_id {prompt_id!r} is empty or repeated; each "
                "held-out prompt needs its own id (rerun notebook 02)"
            )
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise DataError(f"{path}: record {number}: expected a non-empty prompt string")
        seen.add(prompt_id)
        prompts.append(
            HeldoutPrompt(
                prompt_id=prompt_id,
                prompt=record["prompt"],
                source=str(record["source"]),
                assertion_id=record["assertion_id"],
                teacher_reply=_kept(record, "teacher"),
                student_reply=_kept(record, "student"),
            )
        )
    return prompts


def split_prompt_ids(
    prompt_ids: Iterable[str], classifier_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(classifier ids, probe ids): disjoint, deterministic, each in the input order.

    Ids are ranked by a hash of (seed, id) and the first ``round(fraction * n)`` go to the
    classifier, clamped so that both sides keep at least one prompt when there are two or more.
    The ranking is the same on every machine and Python run (no ``hash()`` randomisation), so
    every notebook that measures adherence splits the same way.
    """
    if not 0 < classifier_fraction < 1:
        raise ConfigError(f"classifier_fraction={classifier_fraction!r}: expected in (0, 1)")
    ids = list(dict.fromkeys(prompt_ids))
    ranked = sorted(
        ids, key=lambda i: hashlib.sha256(f"adherence-split:{seed}:{i}".encode()).hexdigest()
    )
    n_classifier = math.floor(classifier_fraction * len(ids) + 0.5)
    if len(ids) >= 2:
        n_classifier = min(max(n_classifier, 1), len(ids) - 1)
    chosen = set(ranked[:n_classifier])
    return [i for i in ids if i in chosen], [i for i in ids if i not in chosen]
