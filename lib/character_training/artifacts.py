"""Reading what earlier stages wrote: the one place a stage learns another stage's files.

Stages never import each other (each notebook loads only its own stage). When a stage needs
a previous stage's artefacts (stage 03 and 09 read 02's pairs, stage 05 reads 04's
transcripts), the reader lives here, next to the names of the stage folders, and fails in one
line naming the notebook to run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError
from .prompts import Message, assistant_name_for, self_interaction_sft_system
from .store import read_jsonl

PROMPTS_STAGE = "01_prompts"
DISTILL_STAGE = "02_distillation"
DPO_STAGE = "03_dpo"
INTROSPECTION_STAGE = "04_introspection"
SFT_STAGE = "05_sft"
SAMPLES_STAGE = "06_samples"
PREFERENCES_STAGE = "07_preferences"
ROBUSTNESS_STAGE = "08_robustness"
RLAIF_STAGE = "09_rlaif"  # notebook 09_rlaif_compare writes this folder

# the names later stages find the trained models under in the run's checkpoints.json
DPO_CHECKPOINT = "dpo"  # written by stage 03, continued by stage 05
SFT_CHECKPOINT = "final"  # written by stage 05: the character-trained model

INTROSPECTION_FILES = ("reflections.jsonl", "interactions.jsonl")


def assistant_name(params: Any) -> str:
    """The NAME the persona prompts use (``assistant_name`` or the student's family)."""
    return params.assistant_name or assistant_name_for(params.student)


# -- stage 02: DPO pairs ---------------------------------------------------------------------------
def load_pairs(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / DISTILL_STAGE / "pairs.jsonl"
    if not path.is_file():
        raise DataError(f"{path} is missing: run notebook 02_distillation first")
    pairs = read_jsonl(path)
    if not pairs:
        raise DataError(f"{path} holds no pairs: nothing to train on")
    return pairs


# -- stage 04: introspection transcripts, as stage 05 trains on them ------------------------------
def _load_outputs(
    source: Path | str | tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]],
) -> tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]:
    if isinstance(source, tuple):
        return source
    path = Path(source)
    folder = path if (path / INTROSPECTION_FILES[0]).is_file() else path / INTROSPECTION_STAGE
    for name in INTROSPECTION_FILES:
        if not (folder / name).is_file():
            raise DataError(f"{folder / name} is missing: run notebook 04_introspection first")
    return read_jsonl(folder / INTROSPECTION_FILES[0]), read_jsonl(folder / INTROSPECTION_FILES[1])


def _build_sft(
    reflections: Sequence[Mapping[str, Any]],
    interactions: Sequence[Mapping[str, Any]],
    name: str,
) -> tuple[list[list[Message]], dict[str, int]]:
    system = self_interaction_sft_system(name)
    out: list[list[Message]] = []
    counts = dict.fromkeys(
        (
            "reflections",
            "reflections_dropped_incomplete",
            "reflections_dropped_empty",
            "interactions",
            "interactions_cut",
            "interactions_dropped",
            "interaction_assistant_turns",
        ),
        0,
    )
    for row in reflections:
        if not row["complete"]:
            counts["reflections_dropped_incomplete"] += 1
        elif not row["reply"].strip():
            counts["reflections_dropped_empty"] += 1
        else:
            out.append(
                [
                    {"role": "user", "content": row["instruction"]},
                    {"role": "assistant", "content": row["reply"]},
                ]
            )
            counts["reflections"] += 1
    for row in interactions:
        messages: list[Message] = [
            {"role": "system", "content": system},
            {"role": "user", "content": row["opener"]},
        ]
        for turn in row["turns"]:
            is_a = turn["speaker"] == "A"
            if is_a and (not turn["complete"] or not turn["text"].strip()):
                counts["interactions_cut"] += 1
                break
            messages.append({"role": "assistant" if is_a else "user", "content": turn["text"]})
        if messages[-1]["role"] == "user":
            messages.pop()  # never end on a turn nothing is trained on
        if messages[-1]["role"] != "assistant":
            counts["interactions_dropped"] += 1
            continue
        out.append(messages)
        counts["interactions"] += 1
        counts["interaction_assistant_turns"] += sum(m["role"] == "assistant" for m in messages)
    counts["transcripts"] = counts["reflections"] + counts["interactions"]
    return out, counts


def sft_conversations(
    source: Path | str | tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]],
    name: str,
) -> list[list[Message]]:
    """The chat transcripts stage 05 trains on, without the constitution.

    ``source`` is a run directory (or this stage's folder), or the pair (reflection records,
    interaction records). ``name`` is the assistant name (stage 04's ``assistant_name``).
    Returns reflections first, in file order, then interactions:

    * a reflection is ``[user: instruction, assistant: reply]``; replies cut at the token limit
      or empty are left out (a cut reply would teach stopping mid-sentence);
    * a self-interaction is seen from instance A: ``[system: the neutral line of
      prompts.self_interaction_sft_system(name), user: B's opener, assistant: A, user: B, ...]``.
      It stops before A's first cut or empty turn (B's turns are kept as sampled: they are
      only context, and A answered exactly that text), and a trailing user turn is dropped, so
      every transcript ENDS WITH AN ASSISTANT TURN (the paper's code trained on conversations
      ending with a user turn). One left without any A turn is dropped.

    No message holds a template placeholder: the name is filled in, and an empty name or one
    with braces is refused.
    """
    reflections, interactions = _load_outputs(source)
    return _build_sft(reflections, interactions, name)[0]


def sft_counts(
    source: Path | str | tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]],
    name: str,
) -> dict[str, int]:
    """What `sft_conversations` keeps and leaves out, by reason (for manifests and notebooks)."""
    reflections, interactions = _load_outputs(source)
    return _build_sft(reflections, interactions, name)[1]


def load_outputs(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(reflections, interactions) of a finished stage 04, or a one-line `DataError`."""
    reflections, interactions = _load_outputs(Path(run_dir))
    return list(reflections), list(interactions)
