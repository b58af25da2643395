"""The robustness replies: which prompts, which adversarial splits, which sampling settings.

Stage 08 (robustness) samples every method's replies to stage 01's held-out general prompts,
plainly and under each adversarial instruction; stage 09 (RLAIF comparison) asks the same
question of its own models and must use exactly the same requests, seeds and settings, so that
its logs can start from stage 08's (a log is named by the model and the settings). Both read
what they share from here instead of from each other: the settings (`ReplySettings`, derived
from `RunParams`), the prompts (`load_eval_prompts`), the requests (`reply_requests`,
`prefill_requests`), the log names (`log_name`) and the resumable sampling of one model's
replies into its log (`sample_replies`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import PROMPTS_STAGE
from ..config import EngineParams, EvalParams, SamplingParams
from ..errors import DataError
from ..prompts import ADVERSARIAL_INSTRUCTIONS, prefill_attack_messages, robustness_messages
from ..sampler_setup import sampler_settings
from ..sampling import Completion, SampleRequest, sample_chat
from ..stage_config import StageConfig, section_setting
from ..store import read_jsonl
from .robustness import NONE_SPLIT, PREFILL_SPLIT, ClassifierSettings

EVAL_FILE = "general_eval.jsonl"
INDEX_FILE = "index.json"  # per reply folder: which model and settings each log holds


@dataclass(frozen=True)
class ReplySettings(StageConfig):
    """What the robustness replies and their scores depend on, from `RunParams`.

    The ``evals`` section holds the prompt count, the number of adversarial splits, the
    classifier and the bootstrap (see `config.EvalParams`); ``sampling`` the temperature,
    top-p and top-k; ``engine`` the device the classifier trains on. Stage 08's ``Config``
    extends this with what only it needs (the judge, the persona's name); stage 09 uses it as
    is, via ``ReplySettings.from_params(params)``.
    """

    SECTION_PREFIXES = {
        "evals": ("robustness_", "classifier_", "coherence_", "judge_"),
        "engine": ("device", "precision"),
    }

    evals: EvalParams
    sampling: SamplingParams
    engine: EngineParams
    student: str
    student_renderer: str
    seed: int

    prompt_count = section_setting(
        "evals", "robustness_prompts", "How many of stage 01's held-out general prompts are used."
    )
    train_fraction = section_setting("evals", "robustness_train_fraction")
    bootstrap = section_setting("evals", "robustness_bootstrap")

    @property
    def splits(self) -> tuple[str, ...]:
        """The adversarial instructions' keys, the first ``evals.robustness_splits``."""
        return tuple(list(ADVERSARIAL_INSTRUCTIONS)[: self.evals.robustness_splits])

    def reply_sampling(self) -> dict[str, Any]:
        """The keyword settings of `sampling.sample_chat` for every reply (and its log name)."""
        return sampler_settings(self.sampling, self.evals.robustness_max_tokens, self.seed)

    def classifier(self) -> ClassifierSettings:
        e = self.evals
        return ClassifierSettings(
            model=e.classifier_model,
            epochs=e.classifier_epochs,
            batch_size=e.classifier_batch_size,
            learning_rate=e.classifier_lr,
            seed=self.seed,
            device=self.engine.device,
        )


def load_eval_prompts(run_dir: Path, count: int) -> tuple[list[dict[str, str]], list[str]]:
    """The first ``count`` prompts of stage 01's ``general_eval.jsonl``, and any warning.

    Fails in one line when the file is missing or has fewer than two usable prompts (a split
    needs one on each side).
    """
    path = Path(run_dir) / PROMPTS_STAGE / EVAL_FILE
    if not path.is_file():
        raise DataError(
            f"{path}: not found; run notebook 01 first (it writes the held-out general prompts "
            "stage 08 evaluates on)"
        )
    prompts, seen = [], set()
    for number, row in enumerate(read_jsonl(path), start=1):
        pid, text = row.get("id"), row.get("prompt")
        if not isinstance(pid, str) or not pid or pid in seen:
            raise DataError(f"{path}: record {number}: id {pid!r} is missing or repeated")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: record {number}: expected a non-empty prompt")
        seen.add(pid)
        prompts.append({"id": pid, "prompt": text})
    warnings = []
    if len(prompts) < count:
        warnings.append(
            f"evals.robustness_prompts={count} but {path} holds {len(prompts)} prompts; using "
            "them all (raise prompts.eval_prompts and rerun notebook 01 for more)"
        )
    prompts = prompts[:count]
    if len(prompts) < 2:
        raise DataError(
            f"{path}: {len(prompts)} prompt(s) to use; stage 08 needs at least 2 (one to train "
            "the classifier, one to evaluate): raise evals.robustness_prompts or "
            "prompts.eval_prompts"
        )
    return prompts, warnings


def reply_requests(
    prompts: Sequence[Mapping[str, str]],
    heldout_ids: set[str],
    splits: Sequence[str],
    system: str | None = None,
) -> list[SampleRequest]:
    """Every prompt plainly (split "none"); held-out prompts also under each adversarial split.

    Keys are ``<prompt_id>:<split>``: the same key (hence the same seed) for every method, so
    methods are compared on common random numbers.
    """
    requests = []
    for row in prompts:
        for split in [NONE_SPLIT, *(splits if row["id"] in heldout_ids else ())]:
            instruction = None if split == NONE_SPLIT else split
            requests.append(
                SampleRequest(
                    key=f"{row['id']}:{split}",
                    messages=robustness_messages(row["prompt"], instruction, system),
                    meta={"prompt_id": row["id"], "split": split},
                )
            )
    return requests


def prefill_requests(
    prompts: Sequence[Mapping[str, str]],
    first_replies: Mapping[str, str],
    system: str | None = None,
) -> list[SampleRequest]:
    """Turn two of the prefill attack for every prompt that has a first (base) reply."""
    return [
        SampleRequest(
            key=f"{row['id']}:{PREFILL_SPLIT}",
            messages=prefill_attack_messages(row["prompt"], first_replies[row["id"]], system),
            meta={"prompt_id": row["id"], "split": PREFILL_SPLIT},
        )
        for row in prompts
        if row["id"] in first_replies
    ]


def log_name(method: str, identity: str, settings: Mapping[str, Any]) -> str:
    """``<method>-<digest>.jsonl``: the digest names the model and the sampling settings, so a
    retrained checkpoint or a changed setting starts a new log, and a stage sampling the same
    model with the same settings (stage 09 after stage 08) finds the other's log by name."""
    blob = json.dumps({"model": identity, **settings}, sort_keys=True)
    return f"{method}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.jsonl"


def sample_replies(
    make_client: Callable[[], Any],
    settings: ReplySettings,
    folder: Path,
    method: str,
    identity: str,
    requests: Sequence[SampleRequest],
    desc: str,
) -> dict[str, Completion]:
    """One model's replies to ``requests``, resumable from ``folder/<log_name>``.

    The folder's ``index.json`` records, per log, the method, the model and the settings, so a
    reader can tell the logs apart without recomputing their digests.
    """
    sampling = settings.reply_sampling()
    name = log_name(method, identity, sampling)
    index_path = folder / INDEX_FILE
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if index.get(name, {}).get("model") != identity:
        index[name] = {"method": method, "model": identity, **sampling}
        folder.mkdir(parents=True, exist_ok=True)
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    return sample_chat(
        make_client,
        settings.student_renderer,
        requests,
        **sampling,
        log_path=folder / name,
        desc=desc,
    )
