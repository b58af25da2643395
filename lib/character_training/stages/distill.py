"""Stage 02: distillation, the chosen/rejected pairs that DPO (stage 03) trains on.

The paper's first training step: a teacher shown the constitution answers a prompt (chosen), the
student answers the same prompt without it (rejected), and DPO makes the student prefer the
former. Inputs are stage 01's files in ``runs/<persona>/<size>/01_prompts/``
(``constitution_prompts.jsonl``, ``general_train.jsonl``, ``general_eval.jsonl``). Outputs
(``runs/<persona>/<size>/02_distillation/``):

* ``split.jsonl``: every prompt this stage uses and its side, ``train`` or ``heldout``.
  Constitution prompts are split per assertion by a stable hash of (seed, prompt id), so the
  split never depends on file order or on the machine; ``distill.heldout_fraction`` of each
  assertion's prompts (at least one, and never all, when the fraction is positive) are held out.
  Training also gets ``round(general_share * constitution training prompts)`` general prompts,
  the first ones of ``general_train.jsonl`` that are not near-duplicates of a held-out prompt;
  held-out prompts also get the first ``adherence.probe_general_prompts`` of
  ``general_eval.jsonl``. A file holding fewer than asked for is used whole and the shortfall is
  a warning in the manifest and the `Result`.
* ``pairs.jsonl``: one row per kept pair (fields in `pair_row`). Only a user prompt and two
  replies: no system prompt, demonstration or reasoning ever reaches it.
* ``heldout.jsonl``: one teacher and one student reply per held-out prompt, each with its drop
  reason (or null), for the adherence classifier and its probes; never trained on.
* ``dropped.jsonl``: every pair that failed a check (`character_training.distill_filters`),
  with the reasons. Counts by reason are in the manifest and the `Result`.
* ``teacher.partial.jsonl`` / ``student.partial.jsonl``: the shared sampler's logs
  (`character_training.sampling.sample_chat`). Each reply's seed derives from the run seed and
  its key (``teacher:<prompt_id>:s<k>``, ``student:<prompt_id>:heldout``, ...), so a stage killed
  part-way and run again samples only what is missing and writes exactly the files an
  uninterrupted run writes. The output files are rebuilt from the logs at the end of every run.

A thinking teacher (``teacher_thinking``) has its reply prefilled with the start of a
reflection on how its traits bear on the message (`prompts.teacher_reasoning_prefill`); its
sampled tokens are kept in the log so the reasoning can be found and removed exactly, and a
reply whose reasoning never closes is dropped, never trained on.

Best-of-n (``distill.teacher_best_of`` = n > 1): every teacher reply, for training and
held-out prompts alike (the classifier's teacher side must come from the distribution DPO's
chosen side does), is sampled n times (keys ``...:c1`` to ``...:c<n-1>`` next to the n = 1 key)
and the candidate that passes the checks and is closest to the prompt's assertion is kept
(`character_training.teacher_ranking`, which says why that scorer is not the adherence
classifier). Rows then hold ``teacher_best_of``, ``teacher_pick`` and ``teacher_candidates``
(each candidate's score and drop reason); the manifest's ``ranking`` names the encoder and the
mean score of the kept vs the first candidates. At n = 1 nothing of this is sampled or written.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import distill_filters, prompt_filters, teacher_ranking
from ..artifacts import PROMPTS_STAGE, assistant_name
from ..config import AdherenceParams, DistillParams, RunParams, SamplingParams
from ..constitutions import Constitution, load_constitution
from ..errors import ConfigError, DataError
from ..probe_sets import CLASSIFIER_SOURCE, UNSEEN_SOURCE
from ..prompt_sources import check_prompt_records
from ..prompts import (
    REASONING_CLOSE,
    REASONING_OPEN,
    TEACHER_REFLECTION,
    persona_system_prompt,
    student_messages,
    teacher_messages,
    teacher_reasoning_prefill,
)
from ..renderers import get_renderer
from ..renderers.conversation import generation_prompt
from ..sampler_setup import SAMPLING_PREFIXES, LazySampler, model_sampler, sampler_settings
from ..sampling import Completion, SampleRequest, sample_chat
from ..stage_config import StageConfig, digest
from ..store import StageDir, read_jsonl, stage_dir, write_jsonl
from ..teacher_ranking import Score, candidate_key, rank_candidates

logger = logging.getLogger(__name__)

STAGE = "02_distillation"
INPUT_FILES = ("constitution_prompts.jsonl", "general_train.jsonl", "general_eval.jsonl")
SOURCES = (CLASSIFIER_SOURCE, UNSEEN_SOURCE, "general")
UNSEEN = UNSEEN_SOURCE  # held-out prompts of assertions held out whole (never trained on)
HELDOUT_OVERLAP = 0.9
"""Similarity (`prompt_filters.similarity`) at which a general training prompt counts as the
same as a held-out prompt and is left out of training; stage 01 splits its pool at 0.9 too."""


@dataclass(frozen=True)
class Config(StageConfig):
    """Stage 02 settings: the ``distill`` section (see `config.DistillParams`), the ``sampling``
    section (the budget is ``distill.max_tokens``), teacher and student with their chat
    formats, how the teacher is prompted (``teacher_few_shot``, ``teacher_thinking``, the
    constitution, ``assistant_name``: empty means the student's family name, see
    `artifacts.assistant_name`), the seed, and what is only known from the inputs.

    Of the ``adherence`` section only ``probe_general_prompts`` is read (and fingerprinted):
    the general evaluation prompts the adherence measure probes with, which need teacher and
    student replies from here. Its other settings (encoder, bootstrap, ...) only the measure
    uses; in the fingerprint they would make a changed classifier refuse this folder and
    sample every reply again.

    ``inputs_digest`` hashes stage 01's files and ``context_digest`` the teacher's hidden
    context (`hidden_context`): re-running stage 01 or editing the constitution gives another
    fingerprint, so the old folder is refused instead of silently mixed with new replies.
    """

    distill: DistillParams
    sampling: SamplingParams
    constitution_ref: str
    allow_misaligned: bool
    teacher: str
    teacher_renderer: str
    teacher_thinking: bool
    teacher_few_shot: int
    student: str
    student_renderer: str
    assistant_name: str
    seed: int
    adherence: AdherenceParams
    inputs_digest: str = ""
    context_digest: str = ""

    SECTION_PREFIXES = {"sampling": SAMPLING_PREFIXES, "adherence": ("probe_general_prompts",)}

    def fingerprint(self, **extra: Any) -> str:
        """As `StageConfig.fingerprint`, but ``distill.teacher_best_of`` counts only above 1: at
        1 the stage samples exactly what it did before the setting existed, so such a folder
        resumes instead of being sampled again."""
        data = self.as_dict()
        if self.distill.teacher_best_of == 1:
            del data["distill"]["teacher_best_of"]
        return digest({**data, **({"_extra": extra} if extra else {})})


@dataclass(frozen=True)
class DistillPrompt:
    """A prompt of this stage: its stage-01 id, text, source and assertion (constitution only)."""

    prompt_id: str
    prompt: str
    source: str  # "constitution" | "unseen" (an assertion held out whole) | "general"
    assertion_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PromptPlan:
    """Training and held-out prompts, with what was asked for and any shortfall warnings."""

    train: list[DistillPrompt]
    heldout: list[DistillPrompt]
    counts: dict[str, int]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Result:
    """Where the stage wrote, its counts, the dropped replies by ``<side>:<reason>``, and the
    warnings a reader must see (also in the manifest)."""

    stage_dir: Path
    counts: dict[str, int]
    drops: dict[str, int]
    warnings: list[str] = field(default_factory=list)


# -- pure helpers: the split ---------------------------------------------------------------------
def heldout_rank(prompt_id: str, seed: int) -> str:
    """A prompt's place in its assertion's held-out order: a stable hash of (seed, id)."""
    return hashlib.sha256(f"{seed}:distill-heldout:{prompt_id}".encode()).hexdigest()


def heldout_count(n: int, fraction: float) -> int:
    """How many of an assertion's ``n`` prompts are held out.

    ``round(fraction * n)``, but with a positive fraction at least one and at most ``n - 1``,
    so every assertion is both probed and trained on whenever it has two prompts.
    """
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(fraction * n)))


def unseen_assertions(assertion_ids: Sequence[str], count: int, seed: int) -> set[str]:
    """The ``count`` assertions held out whole, ranked by a stable hash of (seed, id)."""
    ranked = sorted(
        dict.fromkeys(assertion_ids),
        key=lambda a: hashlib.sha256(f"{seed}:distill-unseen:{a}".encode()).hexdigest(),
    )
    return set(ranked[:count])


def split_constitution_prompts(
    records: Sequence[Mapping[str, Any]], fraction: float, seed: int, unseen: int = 0
) -> tuple[list[DistillPrompt], list[DistillPrompt]]:
    """(train, held-out) constitution prompts; both keep file order.

    ``unseen`` whole assertions are held out entirely (source "unseen": no sibling prompt is
    ever trained on, so they test whether the persona generalises beyond the wording it was
    trained on); of every other assertion ``fraction`` of the prompts is held out (source
    "constitution": probes whose sibling prompts were trained on).
    """
    by_assertion: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_assertion.setdefault(record["assertion_id"], []).append(record)
    whole = unseen_assertions(list(by_assertion), unseen, seed)
    heldout_ids: set[str] = set()
    for assertion, group in by_assertion.items():
        if assertion in whole:
            heldout_ids |= {r["id"] for r in group}
            continue
        ranked = sorted(group, key=lambda r: heldout_rank(r["id"], seed))
        heldout_ids |= {r["id"] for r in ranked[: heldout_count(len(group), fraction)]}
    train, heldout = [], []
    for record in records:
        source = UNSEEN if record["assertion_id"] in whole else CLASSIFIER_SOURCE
        prompt = DistillPrompt(record["id"], record["prompt"], source, record["assertion_id"])
        (heldout if record["id"] in heldout_ids else train).append(prompt)
    return train, heldout


def plan_prompts(
    constitution_records: Sequence[Mapping[str, Any]],
    general_train: Sequence[Mapping[str, Any]],
    general_eval: Sequence[Mapping[str, Any]],
    config: Config,
    source_dir: Path | str = PROMPTS_STAGE,
) -> PromptPlan:
    """Every prompt the stage samples for, and the counts and shortfalls behind the choice."""
    share, fraction = config.distill.general_share, config.distill.heldout_fraction
    unseen = config.distill.heldout_assertions
    train, heldout = split_constitution_prompts(constitution_records, fraction, config.seed, unseen)
    if not train:
        raise DataError(
            f"{Path(source_dir) / INPUT_FILES[0]}: no constitution prompt is left for training "
            f"(distill.heldout_fraction={fraction}, distill.heldout_assertions={unseen}); "
            "expected at least one"
        )
    wanted_general = round(share * len(train))
    wanted_probes = config.adherence.probe_general_prompts
    probes = [DistillPrompt(r["id"], r["prompt"], "general") for r in general_eval[:wanted_probes]]
    # A general training prompt (near-)identical to a held-out one would train on the probe.
    candidates = prompt_filters.distinct_records(
        general_train,
        lambda r: r["prompt"],
        threshold=HELDOUT_OVERLAP,
        against=[p.prompt for p in heldout + probes],
    )
    general = [DistillPrompt(r["id"], r["prompt"], "general") for r in candidates[:wanted_general]]
    warnings = []
    if len(general) < wanted_general:
        warnings.append(
            f"distill.general_share={share} asks for {wanted_general} general "
            f"training prompts ({share} x {len(train)} constitution training "
            f"prompts), but {Path(source_dir) / INPUT_FILES[1]} holds {len(candidates)} usable "
            f"({len(general_train) - len(candidates)} overlap held-out prompts): training on "
            f"{len(general)} (raise prompts.general_prompts and rerun notebook 01)"
        )
    if len(probes) < wanted_probes:
        warnings.append(
            f"adherence.probe_general_prompts={wanted_probes}, but "
            f"{Path(source_dir) / INPUT_FILES[2]} holds {len(general_eval)}: holding out "
            f"{len(probes)} general prompts (raise prompts.eval_prompts and rerun notebook 01)"
        )
    counts = {
        "constitution_prompts": len(constitution_records),
        "constitution_train": len(train),
        "constitution_heldout": sum(p.source == "constitution" for p in heldout),
        "unseen_heldout": sum(p.source == UNSEEN for p in heldout),
        "unseen_assertions": len({p.assertion_id for p in heldout if p.source == UNSEEN}),
        "general_requested": wanted_general,
        "general_train": len(general),
        "general_shortfall": wanted_general - len(general),
        "general_overlapping_heldout": len(general_train) - len(candidates),
        "heldout_general_requested": wanted_probes,
        "heldout_general": len(probes),
        "heldout_general_shortfall": wanted_probes - len(probes),
        "training_prompts": len(train) + len(general),
        "heldout_prompts": len(heldout) + len(probes),
    }
    ids = [p.prompt_id for p in train + general + heldout + probes]
    if len(ids) != len(set(ids)):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise DataError(
            f"{source_dir}: prompt id {twice[0]!r} appears more than once across "
            f"{', '.join(INPUT_FILES)}; expected unique ids (rerun notebook 01_prompts)"
        )
    return PromptPlan(train + general, heldout + probes, counts, warnings)


# -- pure helpers: requests and pairs ------------------------------------------------------------
def hidden_context(
    constitution: Constitution, name: str, few_shot: int, thinking: bool = False
) -> list[str]:
    """What the teacher sees and the student never does: the persona system prompt, the
    demonstrations and, for a thinking teacher, the reflection its reasoning starts with. A
    chosen reply that copies from it is dropped (``context_echo``)."""
    texts = [persona_system_prompt(constitution, name)]
    if thinking:
        texts.append(TEACHER_REFLECTION)
    for example in constitution.examples[:few_shot]:
        texts += [example.prompt, example.reply]
    return texts


def sample_key(role: str, prompt_id: str, sample: int | None) -> str:
    """The sampler key of one reply: ``<role>:<prompt_id>:s<k>``, or ``...:heldout``."""
    return f"{role}:{prompt_id}:" + ("heldout" if sample is None else f"s{sample}")


def plan_requests(
    plan: PromptPlan,
    constitution: Constitution,
    config: Config,
    teacher_prefill: str = "",
) -> tuple[list[SampleRequest], list[SampleRequest]]:
    """(teacher requests, student requests): ``samples_per_prompt`` of each per training
    prompt, then one of each per held-out prompt; each teacher request comes
    ``distill.teacher_best_of`` times, the candidates of one reply next to each other (they
    share their whole prompt, which the engine's prefix reuse computes once)."""
    slots: list[tuple[DistillPrompt, int | None]] = [
        (p, k) for p in plan.train for k in range(config.distill.samples_per_prompt)
    ] + [(p, None) for p in plan.heldout]
    teacher, student = [], []
    for prompt, sample in slots:
        meta = {"prompt_id": prompt.prompt_id, "sample_index": sample}
        messages = teacher_messages(
            constitution, assistant_name(config), prompt.prompt, few_shot=config.teacher_few_shot
        )
        key = sample_key("teacher", prompt.prompt_id, sample)
        teacher += [
            SampleRequest(candidate_key(key, c), messages, prefill=teacher_prefill, meta=meta)
            for c in range(config.distill.teacher_best_of)
        ]
        student.append(
            SampleRequest(
                sample_key("student", prompt.prompt_id, sample),
                student_messages(prompt.prompt),
                meta=meta,
            )
        )
    return teacher, student


@dataclass(frozen=True)
class Reply:
    """One sampled reply as the filters see it: full text (reasoning included) and flags."""

    text: str
    complete: bool
    num_tokens: int
    seed: int


def settings(config: Config, role: str, seed: int) -> dict[str, Any]:
    """The sampling settings of one reply, as recorded next to it in ``pairs.jsonl``."""
    record: dict[str, Any] = {
        "temperature": config.sampling.temperature,
        "top_p": config.sampling.top_p,
        "top_k": config.sampling.top_k,
        "max_tokens": config.distill.max_tokens,
        "seed": seed,
        "renderer": config.teacher_renderer if role == "teacher" else config.student_renderer,
    }
    if role == "teacher":
        record["few_shot"] = config.teacher_few_shot
        record["thinking"] = config.teacher_thinking
        if config.distill.teacher_best_of > 1:
            record["best_of"] = config.distill.teacher_best_of
    return record


def pair_row(
    prompt: DistillPrompt,
    sample: int,
    chosen: str,
    rejected: str,
    teacher: Reply,
    student: Reply,
    config: Config,
) -> dict[str, Any]:
    """One line of ``pairs.jsonl``.

    Fields: id (``<prompt_id>:s<k>``), prompt_id, prompt, source, assertion_id, sample_index,
    chosen, rejected, teacher, student, chosen_settings, rejected_settings, chosen_tokens,
    rejected_tokens (tokens the sampler produced, end-of-turn included; a thinking teacher's
    count includes its reasoning).
    """
    return {
        "id": f"{prompt.prompt_id}:s{sample}",
        "prompt_id": prompt.prompt_id,
        "prompt": prompt.prompt,
        "source": prompt.source,
        "assertion_id": prompt.assertion_id,
        "sample_index": sample,
        "chosen": chosen,
        "rejected": rejected,
        "teacher": config.teacher,
        "student": config.student,
        "chosen_settings": settings(config, "teacher", teacher.seed),
        "rejected_settings": settings(config, "student", student.seed),
        "chosen_tokens": teacher.num_tokens,
        "rejected_tokens": student.num_tokens,
    }


@dataclass
class Assembly:
    """What `assemble` builds from the replies: the three output files and their counts."""

    pairs: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    drops: Counter
    name_replacements: int
    trimmed: Counter = field(default_factory=Counter)  # cut replies kept up to a sentence end
    picks: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)


def teacher_slots(plan: PromptPlan, config: Config) -> list[tuple[DistillPrompt, str]]:
    """Every teacher reply the plan needs, as (prompt, key at n = 1), in request order."""
    per_prompt = range(config.distill.samples_per_prompt)
    return [(p, sample_key("teacher", p.prompt_id, k)) for p in plan.train for k in per_prompt] + [
        (p, sample_key("teacher", p.prompt_id, None)) for p in plan.heldout
    ]


def pick_teacher_replies(
    plan: PromptPlan,
    teacher: Mapping[str, Reply],
    config: Config,
    context: Sequence[str],
    score: Score | None = None,
) -> dict[str, tuple[str, dict[str, Any]]]:
    """For each teacher reply (keyed as at n = 1): the key of the candidate kept, and what a
    row records about the choice (nothing at n = 1).

    Only candidates passing `distill_filters.check_teacher_reply` are ranked, by ``score``
    (`teacher_ranking.AssertionSimilarity.score`); when none passes, candidate 0 stands and is
    dropped for its own reason.
    """
    n = config.distill.teacher_best_of
    slots = teacher_slots(plan, config)
    if n == 1:
        return {key: (key, {}) for _, key in slots}
    if score is None:
        raise ValueError(f"distill.teacher_best_of={n} needs a score function to rank replies")
    groups, reasons = [], []
    for prompt, key in slots:
        checked = [
            distill_filters.check_teacher_reply(
                reply.text,
                reply.complete,
                context,
                user_prompt=prompt.prompt,
                truncated=config.distill.truncated,
            )
            for reply in (teacher[candidate_key(key, c)] for c in range(n))
        ]
        groups.append([text if reason is None else None for text, reason in checked])
        reasons.append([reason for _, reason in checked])
    ranked = rank_candidates(groups, [p.assertion_id for p, _ in slots], score)
    picks = {}
    for (_, key), (best, scores), why in zip(slots, ranked, reasons, strict=True):
        pick = 0 if best is None else best
        candidates = [
            {"score": None if v is None else round(v, 6), "drop_reason": r}
            for v, r in zip(scores, why, strict=True)
        ]
        picks[key] = (
            candidate_key(key, pick),
            {"teacher_best_of": n, "teacher_pick": pick, "teacher_candidates": candidates},
        )
    return picks


def assemble(
    plan: PromptPlan,
    teacher: Mapping[str, Reply],
    student: Mapping[str, Reply],
    config: Config,
    context: Sequence[str],
    score: Score | None = None,
) -> Assembly:
    """Filter every reply, pair what passes, and record what does not (pure but for
    ``score``, which best-of-n needs: `pick_teacher_replies`).

    A pair is kept only when both replies pass and differ. The teacher's self-introductions
    under its own family name become the student's assistant name in kept chosen replies and
    held-out teacher replies (`distill_filters.replace_self_name`).
    """
    names = distill_filters.model_self_names(config.teacher)
    truncated = config.distill.truncated
    picks = pick_teacher_replies(plan, teacher, config, context, score)
    out = Assembly([], [], [], Counter(), 0, picks=picks)

    def judge(prompt: DistillPrompt, t: Reply, s: Reply) -> tuple[str, str | None, str, str | None]:
        chosen, t_reason = distill_filters.check_teacher_reply(
            t.text, t.complete, context, user_prompt=prompt.prompt, truncated=truncated
        )
        rejected, s_reason = distill_filters.check_student_reply(s.text, s.complete, truncated)
        for side, ok, reply_ in (
            ("chosen", t_reason is None, t),
            ("rejected", s_reason is None, s),
        ):
            if ok and not reply_.complete:
                out.trimmed[side] += 1
        if t_reason is None:
            chosen, replaced = distill_filters.replace_self_name(
                chosen, names, assistant_name(config)
            )
            out.name_replacements += replaced
        return chosen, t_reason, rejected, s_reason

    for prompt in plan.train:
        for k in range(config.distill.samples_per_prompt):
            kept, ranking = picks[sample_key("teacher", prompt.prompt_id, k)]
            t = teacher[kept]
            s = student[sample_key("student", prompt.prompt_id, k)]
            chosen, t_reason, rejected, s_reason = judge(prompt, t, s)
            reasons = [f"chosen:{t_reason}"] if t_reason else []
            reasons += [f"rejected:{s_reason}"] if s_reason else []
            if not reasons and chosen == rejected:
                reasons = [f"pair:{distill_filters.IDENTICAL}"]
            if reasons:
                out.drops.update(reasons)
                out.dropped.append(
                    {
                        "id": f"{prompt.prompt_id}:s{k}",
                        **prompt.to_dict(),
                        "sample_index": k,
                        "reasons": reasons,
                        "chosen_reason": t_reason,
                        "rejected_reason": s_reason,
                        "chosen": chosen,
                        "rejected": rejected,
                        "chosen_tokens": t.num_tokens,
                        "rejected_tokens": s.num_tokens,
                        **ranking,
                    }
                )
                continue
            out.pairs.append({**pair_row(prompt, k, chosen, rejected, t, s, config), **ranking})

    for prompt in plan.heldout:
        kept, ranking = picks[sample_key("teacher", prompt.prompt_id, None)]
        t = teacher[kept]
        s = student[sample_key("student", prompt.prompt_id, None)]
        chosen, t_reason, rejected, s_reason = judge(prompt, t, s)
        out.heldout.append(
            {
                **prompt.to_dict(),
                "teacher_reply": chosen,
                "teacher_drop_reason": t_reason,
                "student_reply": rejected,
                "student_drop_reason": s_reason,
                "teacher": config.teacher,
                "student": config.student,
                "teacher_tokens": t.num_tokens,
                "student_tokens": s.num_tokens,
                **ranking,
            }
        )
    return out


# -- reasoning plumbing (needs a renderer) -------------------------------------------------------
def prompt_opens_reasoning(renderer: Any, renderer_name: str = "") -> bool:
    """Whether ``renderer``'s generation prompt already ends inside an open reasoning block.

    Raises `ConfigError` when it ends with a closed, empty block (a renderer that switches
    thinking off, contradicting ``teacher_thinking``) or when the renderer marks reasoning some
    other way than ``<think>...</think>`` (gpt-oss's Harmony channels).
    """
    if "gpt_oss" in renderer_name:
        raise ConfigError(
            f"renderers: {renderer_name!r} marks reasoning with Harmony channels; "
            f"teacher_thinking=true expects a renderer using {REASONING_OPEN}...{REASONING_CLOSE}"
        )
    tokens = generation_prompt(renderer, [{"role": "user", "content": "Hello."}]).to_ints()
    tail = str(renderer.tokenizer.decode(tokens)).rstrip()
    if tail.endswith(REASONING_CLOSE):
        raise ConfigError(
            f"renderers: {renderer_name or type(renderer).__name__!r} closes the reasoning block "
            "in its generation prompt (thinking off), but teacher_thinking is true; pick the "
            "model's thinking renderer or set teacher_thinking=false"
        )
    return tail.endswith(REASONING_OPEN)


def raw_reply_text(renderer: Any, completion: Completion, opened: bool) -> str:
    """The whole reply as the model wrote it: reasoning opener, prefill, sampled text.

    Parsing a reply (`renderers.conversation.parse_reply`) already drops reasoning, which hides
    whether the reasoning was ever closed; decoding the logged tokens keeps everything.
    """
    if completion.tokens is None:
        raise DataError(
            f"sampled reply {completion.key!r} has no tokens in its log; a thinking teacher's "
            "log needs them (delete teacher.partial.jsonl to sample again)"
        )
    tokens = list(completion.tokens)
    stops = renderer.get_stop_sequences()
    if stops and all(isinstance(s, int) for s in stops):
        cut = next((i for i, t in enumerate(tokens) if t in stops), None)
        tokens = tokens if cut is None else tokens[:cut]
    text = str(renderer.tokenizer.decode(tokens))
    for stop in (s for s in stops if isinstance(s, str)):
        if stop in text:
            text = text[: text.index(stop)]
    return (REASONING_OPEN if opened else "") + completion.prefill + text


# -- inputs --------------------------------------------------------------------------------------
def load_prompt_files(run_dir: Path) -> tuple[list[dict], list[dict], list[dict], str]:
    """Stage 01's three files and a digest of their contents, or a one-line `DataError`."""
    source = Path(run_dir) / PROMPTS_STAGE
    for name in INPUT_FILES:
        if not (source / name).is_file():
            raise DataError(f"{source / name} is missing: run notebook 01_prompts first")
    status = StageDir(source).manifest().get("status")
    if status != "done":
        raise DataError(
            f"{source / 'manifest.json'}: stage 01 status is {status!r}, expected 'done': "
            "run notebook 01_prompts first (it resumes where it stopped)"
        )
    hasher = hashlib.sha256()
    loaded = []
    for name in INPUT_FILES:
        hasher.update((source / name).read_bytes())
        loaded.append(read_jsonl(source / name))
    constitution_records, general_train, general_eval = loaded
    if not constitution_records:
        raise DataError(
            f"{source / INPUT_FILES[0]} holds no prompts: expected constitution prompts; "
            "run notebook 01_prompts first"
        )
    for name, rows in zip(INPUT_FILES, loaded, strict=True):
        needed = ("id", "prompt", "assertion_id") if name == INPUT_FILES[0] else ("id", "prompt")
        check_prompt_records(rows, source / name, needed)
    return constitution_records, general_train, general_eval, hasher.hexdigest()[:16]


# -- the stage -----------------------------------------------------------------------------------
def run(params: RunParams, service_client: Any, on_existing: str = "resume") -> Result:
    """Sample, filter and pair teacher and student replies; resumable (see the module docstring)."""
    config = Config.from_params(params)
    constitution = load_constitution(config.constitution_ref, allow_opt_in=config.allow_misaligned)
    records, general_train, general_eval, inputs_digest = load_prompt_files(params.run_dir)
    plan = plan_prompts(
        records, general_train, general_eval, config, params.run_dir / PROMPTS_STAGE
    )
    context = hidden_context(
        constitution, assistant_name(config), config.teacher_few_shot, config.teacher_thinking
    )
    for warning in plan.warnings:
        logger.warning("%s", warning)

    config = replace(config, inputs_digest=inputs_digest, context_digest=digest(context))
    stage: StageDir = stage_dir(params.run_dir, STAGE)
    ranker, ranking = None, {}
    if config.distill.teacher_best_of > 1:
        ranker, ranking = teacher_ranking.assertion_ranker(
            params.adherence.encoder, params.engine.device, constitution, stage.path / "embeddings"
        )
    stage.prepare(config.fingerprint(**ranking), on_existing, config.as_dict())
    stage.write_manifest(
        inputs={name: str(params.run_dir / PROMPTS_STAGE / name) for name in INPUT_FILES},
        warnings=plan.warnings,
    )
    write_jsonl(
        stage.file("split.jsonl"),
        [{**p.to_dict(), "split": "train"} for p in plan.train]
        + [{**p.to_dict(), "split": "heldout"} for p in plan.heldout],
    )

    teacher_client = LazySampler(model_sampler(service_client, config.teacher, None))
    student_client = LazySampler(model_sampler(service_client, config.student, None))
    teacher_renderer: Any = config.teacher_renderer
    opened, prefill = False, ""
    if config.teacher_thinking:  # the prefill depends on the chat format: needs the tokenizer
        teacher_renderer = get_renderer(config.teacher_renderer, teacher_client().get_tokenizer())
        opened = prompt_opens_reasoning(teacher_renderer, config.teacher_renderer)
        prefill = teacher_reasoning_prefill(opened)
    teacher_requests, student_requests = plan_requests(plan, constitution, config, prefill)
    common = sampler_settings(config.sampling, config.distill.max_tokens, config.seed)
    teacher_done = sample_chat(
        teacher_client,
        teacher_renderer,
        teacher_requests,
        log_path=stage.file("teacher.partial.jsonl"),
        desc="teacher (chosen)",
        return_tokens=config.teacher_thinking,
        **common,
    )
    student_done = sample_chat(
        student_client,
        config.student_renderer,
        student_requests,
        log_path=stage.file("student.partial.jsonl"),
        desc="student (rejected)",
        **common,
    )

    def reply(completion: Completion, thinking: bool) -> Reply:
        text = raw_reply_text(teacher_renderer, completion, opened) if thinking else completion.text
        return Reply(text, completion.complete, completion.num_tokens, completion.seed)

    teacher = {k: reply(c, config.teacher_thinking) for k, c in teacher_done.items()}
    student = {k: reply(c, False) for k, c in student_done.items()}
    built = assemble(plan, teacher, student, config, context, ranker)

    write_jsonl(stage.file("pairs.jsonl"), built.pairs)
    write_jsonl(stage.file("heldout.jsonl"), built.heldout)
    write_jsonl(stage.file("dropped.jsonl"), built.dropped)
    by_source = Counter(p["source"] for p in built.pairs)
    counts = {
        **plan.counts,
        "teacher_samples": len(teacher_requests),
        "student_samples": len(student_requests),
        "pairs": len(built.pairs),
        "pairs_constitution": by_source["constitution"],
        "pairs_general": by_source["general"],
        "pairs_dropped": len(built.dropped),
        "heldout_teacher_kept": sum(r["teacher_drop_reason"] is None for r in built.heldout),
        "heldout_student_kept": sum(r["student_drop_reason"] is None for r in built.heldout),
        "name_replacements": built.name_replacements,
        "trimmed_chosen": built.trimmed["chosen"],
        "trimmed_rejected": built.trimmed["rejected"],
        "teacher_best_of": config.distill.teacher_best_of,
    }
    drops = dict(sorted(built.drops.items()))
    stage.write_manifest(drops=drops)
    if ranker is not None:
        summary = teacher_ranking.summary(r for _, r in built.picks.values())
        stage.write_manifest(ranking={**ranking, **summary})
    stage.finish(**counts)
    return Result(stage.path, counts, drops, list(plan.warnings))


__all__ = [
    "STAGE",
    "Config",
    "DistillPrompt",
    "PromptPlan",
    "Reply",
    "Result",
    "assemble",
    "heldout_count",
    "heldout_rank",
    "hidden_context",
    "load_prompt_files",
    "pair_row",
    "pick_teacher_replies",
    "plan_prompts",
    "plan_requests",
    "prompt_opens_reasoning",
    "raw_reply_text",
    "run",
    "sample_key",
    "split_constitution_prompts",
    "teacher_slots",
]
