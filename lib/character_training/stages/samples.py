"""Stage 06: the fixed qualitative prompts, answered by base, "dpo" and "final", side by side.

Numbers (adherence, Elo, robustness) say *how much* a persona moved; reading replies says *what*
moved. This stage samples every trained persona of one model size on one fixed prompt set and
lays the replies out with prompts as rows and training stages as columns.

Inputs: ``runs/<persona>/<size>/01_prompts/qualitative.jsonl`` (the fixed set notebook 01
copies from the package: ``category`` is "trait-relevant" for prompts that leave room for a
persona and "neutral" for ordinary tasks where it should show only slightly), and every
``runs/<any persona>/<size>/checkpoints.json`` under ``runs_dir`` that holds "dpo" or "final".
Outputs (``runs/<persona>/<size>/06_samples/``, under the notebook's persona):

* ``logs/<model>-<digest>.jsonl``: each model's replies, written by the shared sampler as they
  arrive (a rerun samples only what is missing; ``<digest>`` hashes the model's identity and the
  sampling settings, so a retrained checkpoint never reuses an old log);
* ``samples.jsonl``: one row per (persona, stage, prompt, sample): the reply, whether it ended
  on its own or was cut at ``max_tokens``, its tokens and words;
* ``lengths.jsonl``: reply-length statistics per persona and stage.

Choices, and why:

* **No system prompt**, as in every evaluation here: the question is what the trained weights do
  on their own.
* **Common random numbers.** A request's seed derives from the run seed and the prompt (not the
  model), so base, dpo and final draw the same random stream on each prompt; differences in the
  table come from the weights, not from luck of the draw.
* **The base model is sampled once** per base model and shown in every persona's table (it has
  no persona; sampling it per persona would only add noise).
* A persona whose run lacks a stage shows an empty cell for it, never another stage's reply.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import PROMPTS_STAGE
from ..config import RunParams, SamplingParams
from ..errors import DataError
from ..evaluate.diversity import word_count
from ..prompt_sources import DATA_DIR, read_prompt_file
from ..prompts import student_messages
from ..sampler_setup import model_sampler, sampler_settings
from ..sampling import SampleRequest, sample_chat
from ..stage_config import StageConfig, renderer_of
from ..store import (
    CHECKPOINTS_FILE,
    Checkpoint,
    list_checkpoints,
    model_identity,
    read_jsonl,
    stage_dir,
    write_jsonl,
)

logger = logging.getLogger(__name__)

STAGE = "06_samples"
QUALITATIVE_FILE = "qualitative.jsonl"
STAGES = ("base", "dpo", "final")
TRAINED_STAGES = STAGES[1:]
CATEGORIES = ("trait-relevant", "neutral")
_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Config(StageConfig):
    """Stage 06 settings: the ``sampling`` section (replies of at most ``sampling.max_tokens``),
    the student (the base model of a checkpoint that records none), every model's chat format
    (``renderers``: a persona's checkpoints may come from another base model), the seed, and
    ``samples_per_prompt`` (one reply per prompt unless asked otherwise)."""

    sampling: SamplingParams
    student: str
    renderers: Mapping[str, str]
    seed: int
    samples_per_prompt: int = 1

    def renderer_for(self, base_model: str) -> str:
        """The chat format of ``base_model``: its ``renderers`` entry, else its default."""
        return renderer_of(self, base_model)

    def settings(self) -> dict[str, Any]:
        """What `sample_chat` takes (and what a log's digest hashes)."""
        return sampler_settings(self.sampling, self.sampling.max_tokens, self.seed)


@dataclass(frozen=True)
class Model:
    """One model to sample: the base (``sampler_path`` None) or a persona's checkpoint."""

    label: str  # "base" or "<persona>/<stage>"
    base_model: str
    sampler_path: str | None
    identity: str  # `store.model_identity`: names its reply log, portable with the run folder


@dataclass(frozen=True)
class Result:
    stage_dir: Path
    rows: list[dict[str, Any]]
    personas: dict[str, dict[str, Checkpoint]]
    prompts: list[dict[str, Any]]
    counts: dict[str, Any] = field(default_factory=dict)


# -- inputs --------------------------------------------------------------------------------------
def discover_trained(runs_dir: Path, size: str) -> dict[str, dict[str, Checkpoint]]:
    """Persona -> {"dpo": ..., "final": ...} for every run of ``size`` under ``runs_dir``.

    A persona counts once it has "dpo" or "final"; the stages it lacks are simply absent.
    """
    found: dict[str, dict[str, Checkpoint]] = {}
    for path in sorted(Path(runs_dir).glob(f"*/{size}/{CHECKPOINTS_FILE}")):
        checkpoints = list_checkpoints(path.parent)
        trained = {s: checkpoints[s] for s in TRAINED_STAGES if s in checkpoints}
        if trained:
            found[path.parent.parent.name] = trained
    return found


def load_qualitative(run_dir: Path) -> list[dict[str, Any]]:
    """Notebook 01's copy of the qualitative set, each prompt with its category."""
    path = Path(run_dir) / PROMPTS_STAGE / QUALITATIVE_FILE
    rows = read_prompt_file(path)
    for number, row in enumerate(rows, start=1):
        if row.get("category") not in CATEGORIES:
            raise DataError(
                f"{path}:{number}: category {row.get('category')!r}, expected one of {CATEGORIES}"
            )
    notes = _package_notes()
    return [{**row, "why": row.get("why") or notes.get(row["id"], "")} for row in rows]


def _package_notes() -> dict[str, str]:
    """What each shipped qualitative prompt probes (``why``), by id; stage 01 keeps no notes."""
    path = DATA_DIR / "qualitative_prompts.jsonl"
    if not path.is_file():
        return {}
    return {row["id"]: row.get("why", "") for row in read_jsonl(path) if "id" in row}


def models_to_sample(
    personas: Mapping[str, Mapping[str, Checkpoint]], student: str, run_dir: Path
) -> list[tuple[Model, list[tuple[str, str]]]]:
    """Each distinct model once, with the (persona, stage) cells it fills.

    The base model of a persona is its checkpoints' ``base_model`` (the student it was trained
    from); personas sharing one base share its replies.
    """
    plan: dict[str, tuple[Model, list[tuple[str, str]]]] = {}
    for persona, checkpoints in personas.items():
        bases = {c.base_model for c in checkpoints.values()}
        if len(bases) != 1:
            raise DataError(
                f"{persona}: checkpoints {sorted(checkpoints)} were trained from different base "
                f"models {sorted(bases)}: retrain the later stage from this run's 'dpo'"
            )
        base_model = bases.pop() or student
        base = Model("base", base_model, None, model_identity(run_dir, None, base_model))
        plan.setdefault(base.identity, (base, []))[1].append((persona, "base"))
        for stage, checkpoint in checkpoints.items():
            path = checkpoint.sampler_path
            model = Model(
                f"{persona}/{stage}", base_model, path, model_identity(run_dir, path, base_model)
            )
            plan.setdefault(model.identity, (model, []))[1].append((persona, stage))
    return list(plan.values())


# -- pure helpers --------------------------------------------------------------------------------
def log_name(model: Model, settings: Mapping[str, Any]) -> str:
    """``<label>-<digest>.jsonl``: a new file whenever the model or the settings change."""
    blob = json.dumps({"model": model.identity, **settings}, sort_keys=True)
    slug = _SLUG.sub("-", model.label).strip("-") or "model"
    return f"{slug}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.jsonl"


def length_stats(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and median words (and the share cut at ``max_tokens``) per persona and stage.

    Rows with persona "(all)" pool every persona per stage, counting the shared base replies
    once.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    pooled: dict[str, dict[tuple[str, str, int], Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["persona"], row["stage"]), []).append(row)
        key = (row["model"], row["prompt_id"], row.get("sample", 0))
        pooled.setdefault(row["stage"], {})[key] = row
    out = []
    items = [((p, s), g) for (p, s), g in groups.items()]
    items += [(("(all)", s), list(g.values())) for s, g in pooled.items()]
    order = {s: i for i, s in enumerate(STAGES)}
    for (persona, stage), group in sorted(
        items, key=lambda kv: (kv[0][0] == "(all)", kv[0][0], order.get(kv[0][1], 99))
    ):
        words = [row["words"] for row in group]
        out.append(
            {
                "persona": persona,
                "stage": stage,
                "replies": len(group),
                "mean_words": statistics.fmean(words),
                "median_words": statistics.median(words),
                "cut_share": sum(not row["complete"] for row in group) / len(group),
            }
        )
    return out


def side_by_side(
    rows: Sequence[Mapping[str, Any]],
    persona: str,
    category: str | None = None,
    stages: Sequence[str] = STAGES,
) -> Any:
    """Prompts as rows, stages as columns: the first reply of each (a pandas DataFrame).

    A stage the persona was not trained to is an empty column, never filled from elsewhere.
    """
    import pandas as pd

    cells: dict[str, dict[str, str]] = {}
    prompts: dict[str, str] = {}
    for row in rows:
        if row["persona"] != persona or (category and row["category"] != category):
            continue
        prompts.setdefault(row["prompt_id"], row["prompt"])
        cells.setdefault(row["prompt_id"], {}).setdefault(row["stage"], _reply_text(row))
    table = [
        {"prompt_id": pid, "prompt": prompts[pid], **{s: cells[pid].get(s, "") for s in stages}}
        for pid in prompts
    ]
    return pd.DataFrame(table, columns=["prompt_id", "prompt", *stages]).set_index("prompt_id")


def _reply_text(row: Mapping[str, Any]) -> str:
    return row["text"] + ("" if row["complete"] else " [cut at max_tokens]")


_TABLE_CSS = (
    "<style>.ct-samples{border-collapse:collapse;table-layout:fixed;width:100%;font-size:12px}"
    ".ct-samples th,.ct-samples td{border:1px solid #ccc;padding:6px;vertical-align:top;"
    "text-align:left;white-space:pre-wrap;word-wrap:break-word}"
    ".ct-samples th{background:#f3f3f3}.ct-samples .why{color:#666;font-size:11px}"
    ".ct-samples .cut{color:#b00}.ct-samples .none{color:#999;font-style:italic}</style>"
)


def side_by_side_html(
    rows: Sequence[Mapping[str, Any]],
    persona: str,
    prompts: Sequence[Mapping[str, Any]],
    stages: Sequence[str] = STAGES,
    caption: str = "",
) -> str:
    """The side-by-side table as self-contained HTML (wrapped text, escaped, cut replies
    marked), for reports: nbconvert keeps it as is, whatever pandas' display width."""
    first: dict[tuple[str, str], Mapping[str, Any]] = {}
    for row in rows:
        if row["persona"] == persona:
            first.setdefault((row["prompt_id"], row["stage"]), row)
    width = f"{70 / max(1, len(stages)):.0f}%"
    head = "".join(f'<th style="width:{width}">{html.escape(s)}</th>' for s in stages)
    body = []
    for prompt in prompts:
        cells = []
        for stage in stages:
            row = first.get((prompt["id"], stage))
            if row is None:
                cells.append('<td class="none">not trained</td>')
                continue
            cut = "" if row["complete"] else ' <span class="cut">[cut at max_tokens]</span>'
            cells.append(f"<td>{html.escape(row['text'])}{cut}</td>")
        why = prompt.get("why") or ""
        why = f'<div class="why">{html.escape(why)}</div>' if why else ""
        body.append(
            f"<tr><td><b>{html.escape(prompt['id'])}</b> "
            f"<i>({html.escape(prompt.get('category', ''))})</i><br>"
            f"{html.escape(prompt['prompt'])}{why}</td>{''.join(cells)}</tr>"
        )
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return (
        f'{_TABLE_CSS}<table class="ct-samples">{cap}<thead><tr><th style="width:30%">prompt</th>'
        f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


class SampleBrowser:
    """An ipywidgets browser (persona, prompt, stages) over the samples.

    Widgets only draw in a live Jupyter front end; in a static report (nbconvert) this object
    shows a one-line note instead, and the static tables carry the same replies.
    """

    NOTE = (
        "Interactive browser: open this notebook in Jupyter with a running kernel to use it. "
        "The tables in this report hold the same replies."
    )

    def __init__(self, rows: Sequence[Mapping[str, Any]], prompts: Sequence[Mapping[str, Any]]):
        import ipywidgets as widgets

        self.rows = list(rows)
        self.prompts = list(prompts)
        personas = list(dict.fromkeys(r["persona"] for r in self.rows))
        self.persona = widgets.Dropdown(options=personas, description="persona")
        self.prompt = widgets.Dropdown(
            options=[
                (f"{p['id']} ({p['category']}): {p['prompt'][:70]}", p["id"]) for p in self.prompts
            ],
            description="prompt",
            layout=widgets.Layout(width="95%"),
        )
        self.stages = [widgets.ToggleButton(value=True, description=s) for s in STAGES]
        self.output = widgets.HTML()
        for control in [self.persona, self.prompt, *self.stages]:
            control.observe(lambda _change: self.refresh(), names="value")
        self.widget = widgets.VBox(
            [widgets.HBox([self.persona, *self.stages]), self.prompt, self.output]
        )
        self.refresh()

    def refresh(self) -> None:
        chosen = [t.description for t in self.stages if t.value]
        prompt = [p for p in self.prompts if p["id"] == self.prompt.value]
        self.output.value = side_by_side_html(self.rows, self.persona.value, prompt, chosen)

    def show(self) -> None:
        """Display the note, then the widget: a static report keeps the note whatever it makes
        of the widget (nbconvert embeds widget state when it finds some, and its view then
        needs scripts from the network and still has no kernel to answer the controls)."""
        from IPython.display import HTML, display

        display(HTML(f"<p><i>{html.escape(self.NOTE)}</i></p>"))
        display(self.widget)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        bundle["text/plain"] = self.NOTE
        bundle["text/html"] = f"<p><i>{html.escape(self.NOTE)}</i></p>"
        return bundle


# -- the stage -----------------------------------------------------------------------------------
def _sample_model(
    service_client: Any,
    config: Config,
    model: Model,
    prompts: Sequence[Mapping[str, Any]],
    log_dir: Path,
) -> dict[str, Any]:
    requests = [
        SampleRequest(
            key=f"{p['id']}:s{k}",
            messages=student_messages(p["prompt"]),
            meta={"prompt_id": p["id"], "sample": k},
        )
        for p in prompts
        for k in range(config.samples_per_prompt)
    ]
    return sample_chat(
        model_sampler(service_client, model.base_model, model.sampler_path),
        config.renderer_for(model.base_model),
        requests,
        **config.settings(),
        log_path=log_dir / log_name(model, config.settings()),
        desc=f"samples: {model.label}",
    )


def run(
    params: RunParams,
    service_client: Any,
    on_existing: str = "resume",
    personas: Sequence[str] | None = None,
) -> Result:
    """Sample base, dpo and final of every trained persona of this size; resumable.

    ``personas`` limits the comparison (default: every persona with a "dpo" or "final" run of
    ``params.size`` under ``runs_dir``). The notebook's own persona must have one: a missing
    "dpo" names notebook 03.
    """
    prompts = load_qualitative(params.run_dir)
    runs_dir = params.run_dir.parent.parent
    trained = discover_trained(runs_dir, params.size)
    if params.persona not in trained:
        raise DataError(
            f"{params.run_dir / CHECKPOINTS_FILE}: no checkpoint 'dpo' or 'final' for "
            f"{params.persona}/{params.size}: run notebook 03_dpo first"
        )
    if personas is not None:
        unknown = sorted(set(personas) - set(trained))
        if unknown:
            raise DataError(
                f"persona(s) {unknown} have no trained run of size {params.size} under "
                f"{runs_dir} (trained: {sorted(trained)})"
            )
    # the notebook's persona first: its table is the full one
    chosen = [params.persona, *(trained if personas is None else personas)]
    trained = {p: trained[p] for p in dict.fromkeys(chosen)}

    config = Config.from_params(params)
    stage = stage_dir(params.run_dir, STAGE)
    stage.prepare(config.fingerprint(), on_existing, config.as_dict())
    log_dir = stage.file("logs")
    rows: list[dict[str, Any]] = []
    by_id = {p["id"]: p for p in prompts}
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for model, slots in models_to_sample(trained, config.student, params.run_dir):
        completions = _sample_model(service_client, config, model, prompts, log_dir)
        for persona, stage_name in slots:
            for completion in completions.values():
                prompt = by_id[completion.meta["prompt_id"]]
                cells.setdefault((persona, stage_name), []).append(
                    {
                        "persona": persona,
                        "stage": stage_name,
                        "model": model.identity,
                        "prompt_id": prompt["id"],
                        "category": prompt["category"],
                        "prompt": prompt["prompt"],
                        "sample": completion.meta["sample"],
                        "text": completion.full_text,
                        "complete": completion.complete,
                        "num_tokens": completion.num_tokens,
                        "words": word_count(completion.full_text),
                    }
                )
    for persona in trained:  # rows in table order: persona, then stage
        for stage_name in STAGES:
            rows += cells.get((persona, stage_name), [])
    write_jsonl(stage.file("samples.jsonl"), rows)
    write_jsonl(stage.file("lengths.jsonl"), length_stats(rows))
    counts = {
        "personas": len(trained),
        "prompts": len(prompts),
        "replies": len(rows),
        "cut": sum(not r["complete"] for r in rows),
    }
    stage.write_manifest(
        status="done",
        counts=counts,
        personas={p: {s: c.sampler_path for s, c in cps.items()} for p, cps in trained.items()},
    )
    return Result(stage.path, rows, trained, prompts, counts)
