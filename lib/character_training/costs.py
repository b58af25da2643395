"""Dry-run budget: planned token counts per stage and their estimated price.

Before a Tinker run spends money, `estimate` turns the run parameters into token counts for
every stage (prefill = prompt tokens the service reads, sample = tokens it generates,
train = tokens through forward/backward) and prices them with the per-model table in the
parameters. The counts are planning figures built from the dataset sizes and mean lengths
below, not measurements; the notebooks record actual counts in each stage's manifest.

Two things keep the estimate honest. Prices carry the date and source of the table they came
from (``params/prices/<table>.yaml``), and `format_estimate` prints both, so a stale table is
visible; a model with no price is reported as unknown, never counted as free. And measured
lengths beat planning constants: once stage 01 has written prompts (for this run, or for the
same persona's offline ``tiny`` run), `measured_lengths` replaces the planned mean user-prompt
length with the measured one. Only stage 01 is used for now; later stages' outputs could
replace the response-length constants the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import PARAMS_DIR, REPO_ROOT, RunParams
from .store import read_jsonl

# Planning constants (tokens). Measured means from real runs should replace them over time.
PERSONA_SYSTEM_TOKENS = 450  # persona system prompt with ~10 assertions
USER_PROMPT_TOKENS = 60
EXPANSION_PROMPT_TOKENS = 350
GENERATED_PROMPT_TOKENS = 35
ASSERTIONS = 10
REFLECTION_PROMPTS = 10
ELO_SYSTEM_TOKENS = 170
JUDGE_PROMPT_TOKENS = 600
JUDGE_OUTPUT_TOKENS = 20
TEACHER_REASONING_TOKENS = 500  # a thinking teacher's reasoning before each reply (billed)

# Converting measured characters to tokens without loading a tokenizer: English prose runs
# close to four characters per token in the BPE vocabularies of the models used here.
CHARS_PER_TOKEN = 4.0
PROMPT_FILES = ("constitution_prompts.jsonl", "general_train.jsonl")  # stage 01 outputs


@dataclass(frozen=True)
class Lengths:
    """Mean lengths the estimate uses, and where they come from."""

    user_prompt_tokens: int = USER_PROMPT_TOKENS
    source: str = "planning constants"


@dataclass(frozen=True)
class StageCost:
    stage: str
    model: str
    prefill_tokens: int
    sample_tokens: int
    train_tokens: int
    usd: float | None

    def as_row(self) -> dict:
        return {
            "stage": self.stage,
            "model": self.model,
            "prefill_tokens": self.prefill_tokens,
            "sample_tokens": self.sample_tokens,
            "train_tokens": self.train_tokens,
            "usd": None if self.usd is None else round(self.usd, 2),
        }


def measured_lengths(params: RunParams) -> Lengths:
    """Mean user-prompt length from stage 01 outputs, or the planning constant.

    Looks at this run's own ``01_prompts`` folder first, then at the same persona's ``tiny``
    run (the offline run a user makes before paying for a Tinker one). Its prompts are the
    same general pool and constitution examples; only the generated ones come from a weaker
    generator, so the measured mean is an approximation, and the source line says so.
    """
    for run_dir in dict.fromkeys((params.run_dir, params.run_dir.parent / "tiny")):
        stage = run_dir / "01_prompts"
        prompts = [
            str(record.get("prompt", ""))
            for name in PROMPT_FILES
            for record in read_jsonl(stage / name)
        ]
        prompts = [p for p in prompts if p]
        if prompts:
            mean_chars = sum(len(p) for p in prompts) / len(prompts)
            return Lengths(
                user_prompt_tokens=max(1, round(mean_chars / CHARS_PER_TOKEN)),
                source=(
                    f"measured: mean of {len(prompts)} prompts in {_shown(stage)} "
                    f"at ~{CHARS_PER_TOKEN:g} characters per token"
                ),
            )
    return Lengths()


def price_tokens(
    params: RunParams, model: str, prefill: int, sample: int, train: int
) -> float | None:
    """USD for these token counts of ``model`` at the run's price table: 0 on the local
    backend (nothing is billed), None when the table has no price for the model. The one
    pricing rule, shared by the estimate here and the ledger of what was spent (`spend`)."""
    if params.backend == "local":
        return 0.0
    rates = params.prices.per_million.get(model)
    if rates is None:
        return None
    return (
        prefill * rates.get("prefill", 0.0)
        + sample * rates.get("sample", 0.0)
        + train * rates.get("train", 0.0)
    ) / 1e6


def estimate(
    params: RunParams, assertions: int = ASSERTIONS, lengths: Lengths | None = None
) -> list[StageCost]:
    """Token counts and cost per stage for one persona at ``params``' size."""
    p, d, s, i, e = params.prompts, params.dpo, params.sft, params.introspection, params.evals
    user = (lengths or Lengths()).user_prompt_tokens
    rows: list[tuple[str, str, int, int, int]] = []

    calls = assertions * -(-p.generated_per_assertion // p.per_generation_call)
    rows.append(
        (
            "01_prompts",
            params.generator,
            calls * EXPANSION_PROMPT_TOKENS,
            assertions * p.generated_per_assertion * GENERATED_PROMPT_TOKENS,
            0,
        )
    )

    n_prompts = assertions * (5 + p.generated_per_assertion) + p.general_prompts
    teacher_prefill = PERSONA_SYSTEM_TOKENS + user
    teacher_output = d.response_tokens + (
        TEACHER_REASONING_TOKENS if params.teacher_thinking else 0
    )
    rows.append(
        (
            "02_distillation (teacher)",
            params.teacher,
            n_prompts * teacher_prefill,
            n_prompts * teacher_output,
            0,
        )
    )
    rows.append(
        (
            "02_distillation (student)",
            params.student,
            n_prompts * user,
            n_prompts * d.response_tokens,
            0,
        )
    )

    pair_tokens = 2 * (user + d.response_tokens)
    rows.append(
        (
            "03_dpo",
            params.student,
            n_prompts * pair_tokens,  # reference logprobs
            0,
            n_prompts * pair_tokens * d.epochs,
        )
    )

    reflections = REFLECTION_PROMPTS * i.reflections_per_prompt
    reflection_prefill = reflections * (PERSONA_SYSTEM_TOKENS + user)
    turn = i.response_tokens
    # turn k re-reads the system prompt and k earlier turns
    interaction_prefill = i.interactions * sum(
        PERSONA_SYSTEM_TOKENS + k * turn for k in range(i.interaction_turns)
    )
    rows.append(
        (
            "04_introspection",
            params.student,
            reflection_prefill + interaction_prefill,
            (reflections + i.interactions * i.interaction_turns) * turn,
            0,
        )
    )

    sft_tokens = reflections * (user + turn) + i.interactions * i.interaction_turns * turn
    rows.append(("05_sft", params.student, 0, 0, sft_tokens * s.epochs))

    rows.append(("06_samples", params.student, 3 * 24 * user, 3 * 24 * e.response_tokens, 0))
    rows.extend(_evaluation_rows(params, user, n_prompts))
    return [
        StageCost(stage, model, pre, samp, train, price_tokens(params, model, pre, samp, train))
        for stage, model, pre, samp, train in rows
    ]


def _evaluation_rows(
    params: RunParams, user: int, distill_prompts: int
) -> list[tuple[str, str, int, int, int]]:
    """Stages 07-09 as they run: which models answer, who judges, in which modes.

    07: base, dpo and final answer every match of every condition; the judge reads each reply
    (generative: writes a short answer; forced choice: scores both trait words) plus, in
    forced choice, one empty-reply prior per match. 08: base, system prompt, dpo and final
    answer every prompt plainly and the held-out share under each attack; the prefill attack
    (base writes turn one, three methods turn two) and the coherence judge (two letters scored
    per order) on held-out prompts; the classifier runs locally. 09: SFT start, preference
    model (when it is the signal), group sampling, pairwise matchups in both orders, the
    learner's forwards (old log-probs, reference, training), then rlaif through 07 and 08.
    """
    e, r, s = params.evals, params.rl, params.sft
    rows: list[tuple[str, str, int, int, int]] = []
    judge_read = JUDGE_PROMPT_TOKENS + e.elo_response_tokens
    matches = len(e.elo_conditions) * e.elo_comparisons

    def preference_rows(models: int, label: str) -> None:
        replies = models * matches
        rows.append(
            (
                f"{label} (model)",
                params.student,
                replies * (ELO_SYSTEM_TOKENS + user),
                replies * e.elo_response_tokens,
                0,
            )
        )
        prefill = sample = 0
        if "generative" in e.judge_modes:
            prefill += replies * judge_read
            sample += replies * e.judge_max_tokens
        if {"logprob", "calibrated"} & set(e.judge_modes):  # calibrated reuses these scores
            prefill += 2 * replies * judge_read + 2 * matches * JUDGE_PROMPT_TOKENS
        rows.append((f"{label} (judge)", params.judge, prefill, sample, 0))

    preference_rows(3, "07_preferences")

    heldout = round(e.robustness_prompts * (1 - e.robustness_train_fraction))
    per_method = e.robustness_prompts + heldout * e.robustness_splits
    attack = 25  # tokens of an appended break-character instruction
    replies = 4 * per_method + heldout * 4  # + prefill attack: base turn one, three turn two
    rows.append(
        (
            "08_robustness",
            params.student,
            replies * (user + attack)
            + per_method * PERSONA_SYSTEM_TOKENS
            + 3 * heldout * (user + e.robustness_max_tokens),
            replies * e.robustness_max_tokens,
            0,
        )
    )
    coherence_scores = len(e.coherence_pairs) * heldout * 2 * 2  # orders x letters
    rows.append(
        (
            "08_robustness (coherence)",
            params.judge,
            coherence_scores * (JUDGE_PROMPT_TOKENS + 2 * e.robustness_max_tokens),
            0,
            0,
        )
    )

    samples = e.rl_steps * e.rl_prompts_per_step * e.rl_group_size
    reply = user + r.response_tokens
    sft_init = r.sft_init_steps * s.batch_size * (user + params.distill.max_tokens)
    rows.append(
        (
            "09_rlaif (policy)",
            params.student,
            samples * user + 2 * samples * reply,  # sampling; old log-probs and reference
            samples * r.response_tokens,
            samples * reply + (sft_init if r.init == "sft" else 0),
        )
    )
    group = e.rl_group_size
    matchups = r.matchups_per_group or group * (group - 1) // 2
    scored = e.rl_steps * e.rl_prompts_per_step * matchups * 2  # both orders
    comparison = JUDGE_PROMPT_TOKENS + 2 * r.response_tokens
    pm_train = (
        round(distill_prompts * (1 - r.pm_heldout_fraction)) * r.pm_epochs * comparison
        if r.signal == "preference_model"
        else 0
    )
    rows.append(("09_rlaif (signal)", params.judge, 2 * scored * comparison, 0, pm_train))
    preference_rows(1, "09_rlaif: rlaif in 07")
    rows.append(
        (
            "09_rlaif: rlaif in 08",
            params.student,
            (per_method + heldout) * (user + attack),
            (per_method + heldout) * e.robustness_max_tokens,
            0,
        )
    )
    return rows


def total_usd(costs: list[StageCost]) -> float | None:
    """Sum of priced stages; None when any stage's model has no price in the table."""
    if any(c.usd is None for c in costs):
        return None
    return sum(c.usd for c in costs)  # type: ignore[misc]


def price_lines(params: RunParams, costs: list[StageCost]) -> list[str]:
    """Where the prices come from, and which models have none (one line each)."""
    if params.backend == "local":
        return ["prices: local backend, no charge"]
    prices = params.prices
    table = (
        f" (table {_shown(PARAMS_DIR / 'prices' / f'{prices.table}.yaml')})" if prices.table else ""
    )
    if prices.as_of or prices.source:
        lines = [
            f"prices: USD per million tokens as of {prices.as_of or 'an unknown date'}, "
            f"from {prices.source or 'an unnamed source'}{table}"
        ]
    else:
        lines = ["prices: undated and without a source; treat the total as a guess"]
    roles: dict[str, list[str]] = {}
    for role, model in params.models().items():
        roles.setdefault(model, []).append(role)
    for model in dict.fromkeys(c.model for c in costs if c.usd is None):
        lines.append(
            f"price unknown: {model} ({', '.join(roles.get(model, ['?']))}) is not in the price "
            f"table as of {prices.as_of or 'an unknown date'}; its stages show n/a and the "
            "total is unknown"
        )
    return lines


def format_estimate(
    params: RunParams, costs: list[StageCost], lengths: Lengths | None = None
) -> str:
    """Human-readable table for notebooks and the CLI's ``dry-run``."""
    lines = [
        f"Planned tokens for persona {params.persona!r} at size {params.size!r} "
        f"(backend {params.backend}):",
        f"{'stage':<32}{'model':<38}{'prefill':>12}{'sample':>12}{'train':>12}{'USD':>10}",
    ]
    for c in costs:
        usd = "n/a" if c.usd is None else f"{c.usd:.2f}"
        lines.append(
            f"{c.stage[:31]:<32}{c.model[:37]:<38}{c.prefill_tokens:>12,}"
            f"{c.sample_tokens:>12,}{c.train_tokens:>12,}{usd:>10}"
        )
    total = total_usd(costs)
    lines.append(
        f"{'total':<70}{sum(c.prefill_tokens for c in costs):>12,}"
        f"{sum(c.sample_tokens for c in costs):>12,}"
        f"{sum(c.train_tokens for c in costs):>12,}"
        f"{'n/a' if total is None else f'{total:.2f}':>10}"
    )
    lines.extend(price_lines(params, costs))
    if params.prices.note:
        lines.append(f"price note: {params.prices.note}")
    used = lengths or Lengths()
    lines.append(f"user prompt length: {used.user_prompt_tokens} tokens ({used.source})")
    if params.teacher_thinking:
        lines.append(
            f"teacher reasoning: {TEACHER_REASONING_TOKENS} tokens per reply planned "
            "(billed as sampled tokens, stripped before training)"
        )
    return "\n".join(lines)


def dry_run_report(params: RunParams, assertions: int = ASSERTIONS) -> str:
    """What ``python -m character_training dry-run`` prints: measured lengths where known."""
    lengths = measured_lengths(params)
    return format_estimate(params, estimate(params, assertions, lengths), lengths)


def _shown(path: Path) -> str:
    """A path relative to the repository when it is inside it (shorter, and no home folder)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
