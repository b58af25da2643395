"""Persona preview: the teacher with the pipeline's own prompt next to the bare student.

`python -m character_training persona preview` samples a few of a constitution's hand-written
prompts twice, through the same `sampling.sample_chat` the pipeline uses: once as stage 02's
teacher sees them (persona system prompt plus ``teacher_few_shot`` demonstrations) and once as
the student sees them (no system prompt), and prints the two side by side. Everything is
planned before any client exists, so a Tinker preview's cost is shown (and confirmed) first.
Kept apart from `authoring` (which writes and checks persona files) because it is the only
part that talks to a model.
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any, Mapping, Sequence

from .authoring import CHARS_PER_TOKEN, PersonaDirs
from .config import RunParams
from .constitutions import Constitution, load_constitution
from .errors import ConfigError
from .prompts import assistant_name_for, student_messages, teacher_messages


# -- preview --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreviewItem:
    assertion_id: str
    prompt: str
    teacher_messages: tuple[Mapping[str, str], ...]
    student_messages: tuple[Mapping[str, str], ...]


@dataclass(frozen=True)
class PreviewPlan:
    """Everything a preview samples, decided before any client exists (so its cost can be
    shown and confirmed first)."""

    params: RunParams
    constitution: Constitution
    assistant_name: str
    few_shot: int
    max_tokens: int
    items: tuple[PreviewItem, ...]


@dataclass(frozen=True)
class PreviewRow:
    assertion_id: str
    prompt: str
    teacher: str
    student: str
    teacher_complete: bool
    student_complete: bool


def preview_prompts(constitution: Constitution, count: int) -> list[tuple[str, str]]:
    """``count`` hand-written prompts spread over the assertions: the first prompt of each
    assertion in order, then the second ones, and so on."""
    if count < 1:
        raise ConfigError(f"--prompts {count}: expected at least 1")
    chosen = []
    depth = max(len(a.prompts) for a in constitution.assertions)
    for j in range(depth):
        for assertion in constitution.assertions:
            if j < len(assertion.prompts) and len(chosen) < count:
                chosen.append((assertion.id, assertion.prompts[j]))
    return chosen


def load_run_constitution(params: RunParams, dirs: PersonaDirs = PersonaDirs()) -> Constitution:
    """The constitution a run of ``params`` uses, loaded with the pipeline's arguments."""
    return load_constitution(
        str(dirs.resolve_ref(params.constitution_ref)), allow_opt_in=params.allow_misaligned
    )


def preview_plan(
    params: RunParams,
    constitution: Constitution,
    count: int = 4,
    max_tokens: int | None = None,
) -> PreviewPlan:
    """The conversations a preview samples: the pipeline's teacher conversation
    (`prompts.teacher_messages` with the run's assistant name and ``teacher_few_shot``
    demonstrations) and the bare student turn, per chosen prompt."""
    name = params.assistant_name or assistant_name_for(params.student)
    limit = params.sampling.max_tokens if max_tokens is None else max_tokens
    if limit < 1:
        raise ConfigError(f"--max-tokens {limit}: expected at least 1")
    items = tuple(
        PreviewItem(
            assertion_id,
            prompt,
            tuple(teacher_messages(constitution, name, prompt, params.teacher_few_shot)),
            tuple(student_messages(prompt)),
        )
        for assertion_id, prompt in preview_prompts(constitution, count)
    )
    return PreviewPlan(params, constitution, name, params.teacher_few_shot, limit, items)


@dataclass(frozen=True)
class PreviewCost:
    prefill_tokens: dict[str, int]
    sample_tokens: dict[str, int]
    usd: float | None
    unpriced: tuple[str, ...]


def estimate_preview_cost(plan: PreviewPlan) -> PreviewCost:
    """An upper bound: prompt tokens estimated at `CHARS_PER_TOKEN`, every reply assumed to
    run to ``max_tokens``, priced with the preset's ``prices.per_million``."""
    params = plan.params
    prefill: dict[str, int] = {}
    sample: dict[str, int] = {}
    for model, conversations in (
        (params.teacher, [i.teacher_messages for i in plan.items]),
        (params.student, [i.student_messages for i in plan.items]),
    ):
        chars = sum(len(m["content"]) + 16 for convo in conversations for m in convo)
        prefill[model] = prefill.get(model, 0) + -(-chars // CHARS_PER_TOKEN)
        sample[model] = sample.get(model, 0) + len(conversations) * plan.max_tokens
    if params.backend == "local":
        return PreviewCost(prefill, sample, 0.0, ())
    usd = 0.0
    unpriced = []
    for model in prefill:
        rates = params.prices.per_million.get(model)
        if rates is None:
            unpriced.append(model)
            continue
        usd += (
            prefill[model] * rates.get("prefill", 0.0) + sample[model] * rates.get("sample", 0.0)
        ) / 1e6
    return PreviewCost(prefill, sample, None if unpriced else usd, tuple(unpriced))


def format_preview_cost(plan: PreviewPlan, cost: PreviewCost) -> str:
    params = plan.params
    n = len(plan.items)
    tokens = sum(cost.prefill_tokens.values()), sum(cost.sample_tokens.values())
    head = (
        f"preview on {params.backend} ({params.size}): {n} teacher + {n} student samples, about "
        f"{tokens[0]:,} prompt tokens and at most {tokens[1]:,} sampled tokens"
    )
    if cost.usd is None:
        models = ", ".join(cost.unpriced)
        return (
            f"{head}; cost unknown: no price for {models} in prices.per_million of "
            f"params/models/{params.size}.yaml"
        )
    basis = [f"rates as of {as_of}"] if (as_of := getattr(params.prices, "as_of", "")) else []
    basis += [params.prices.note] if params.prices.note else []
    note = f" ({'; '.join(basis)})" if basis else ""
    return f"{head}; estimated at most ${cost.usd:.4f}{note}"


def sample_preview(plan: PreviewPlan, service_client: Any) -> list[PreviewRow]:
    """Sample the teacher (with the constitution) and the student (without) for each item,
    through `sampling.sample_chat` (the stages' sampler: seeds derived from each request's key,
    all requests issued before any result is read). Nothing is logged to disk."""
    from .backends import resolve_client
    from .renderers import renderer_for_model
    from .sampling import SampleRequest, sample_chat

    params = plan.params
    clients: dict[str, Any] = {}
    replies: dict[str, list[tuple[str, bool]]] = {}
    for role, model in (("teacher", params.teacher), ("student", params.student)):
        if model not in clients:
            clients[model] = resolve_client(service_client.create_sampling_client(base_model=model))
        requests = [
            SampleRequest(
                key=f"preview:{role}:{index}",
                messages=item.teacher_messages if role == "teacher" else item.student_messages,
            )
            for index, item in enumerate(plan.items)
        ]
        done = sample_chat(
            clients[model],
            params.renderers.get(model) or renderer_for_model(model),
            requests,
            max_tokens=plan.max_tokens,
            temperature=params.sampling.temperature,
            top_p=params.sampling.top_p,
            top_k=params.sampling.top_k,
            seed=params.seed,
            desc=f"preview {role}",
        )
        replies[role] = [(done[r.key].full_text, done[r.key].complete) for r in requests]
    return [
        PreviewRow(item.assertion_id, item.prompt, t[0], s[0], t[1], s[1])
        for item, t, s in zip(plan.items, replies["teacher"], replies["student"])
    ]


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        lines += textwrap.wrap(paragraph, width, replace_whitespace=True) or [""]
    return lines


def format_side_by_side(plan: PreviewPlan, rows: Sequence[PreviewRow], width: int = 0) -> str:
    """A plain-text table, one row per prompt: prompt | teacher reply | student reply."""
    params = plan.params
    width = width or shutil.get_terminal_size((120, 24)).columns
    width = max(width, 72)
    num = max(1, len(str(len(rows))))
    inner = width - num - 9  # three " | " separators
    prompt_w = max(18, inner // 5)
    reply_w = (inner - prompt_w) // 2
    demos = f", {plan.few_shot} example exchanges before the prompt" if plan.few_shot else ""
    intro = [
        f"teacher: {params.teacher} with the {plan.constitution.display_name!r} constitution "
        f"as system prompt (assistant name {plan.assistant_name!r}{demos})",
        f"student: {params.student}, the user turn only",
        f"sampling: temperature {params.sampling.temperature:g}, top_p "
        f"{params.sampling.top_p:g}, max_tokens {plan.max_tokens}, seed {params.seed}",
        "",
    ]

    def render(cells: Sequence[list[str]]) -> list[str]:
        out = []
        for parts in zip_longest(*cells, fillvalue=""):
            line = (
                f"{parts[0]:>{num}} | {parts[1]:<{prompt_w}} | {parts[2]:<{reply_w}} | {parts[3]}"
            )
            out.append(line.rstrip())
        return out

    rule = "-" * width
    body = render(
        [["#"], ["prompt (assertion)"], ["teacher, with constitution"], ["student, without"]]
    )
    for number, row in enumerate(rows, start=1):
        teacher = row.teacher.strip() or "(empty reply)"
        student = row.student.strip() or "(empty reply)"
        if not row.teacher_complete:
            teacher += " [cut at max_tokens]"
        if not row.student_complete:
            student += " [cut at max_tokens]"
        body.append(rule)
        body += render(
            [
                [str(number)],
                _wrap(row.prompt, prompt_w) + [f"({row.assertion_id})"],
                _wrap(teacher, reply_w),
                _wrap(student, reply_w),
            ]
        )
    return "\n".join(intro + body)
