"""The two RLAIF preference signals of stage 09, and the data of the trained one.

RL needs a verdict on "which of these two replies fits the character better". Stage 09 can ask
it two ways, both through `prompts.rlaif_comparison_messages` and both scored without parsing:
the log-probabilities of the letters "A" and "B" as the start of the reply
(`evaluate.judge.forced_choice_scores`, i.e. `sampling.reply_logprobs` with
``include_end=False``), with every matchup asked in both orders so that a judge that always
says "A" decides nothing.

* **Prompted judge** (``rl.signal: judge``): the untrained ``judge`` model with the whole
  constitution in context. Each order gives a hard verdict; the first reply wins a matchup
  when both orders pick it, loses when both pick the other, and an inconsistent pair (or an
  exact tie in an order) is a tie worth 0.5 to each side.
* **Trained preference model** (``rl.signal: preference_model``): a LoRA on the judge's base,
  trained with cross-entropy on the answer letter of stage 02's pairs rendered as comparisons
  (chosen = the teacher's reply). It sees only the constitution's one-line summary. Its credit
  is soft: the mean over both orders of ``sigmoid(logp(letter of the first) - logp(other))``,
  i.e. its order-averaged probability that the first reply is better. A trained model's
  probabilities carry its confidence; a prompted judge's rarely mean anything, hence the hard
  rule there.

Preference-model data (`render_pm_examples`): pairs are split *by prompt* into training and
held-out prompts (a stable hash of seed and prompt id), and within each split the side the
chosen reply is shown on is drawn by a seeded shuffle that puts it in position A for exactly
half the examples (one more when odd), recorded per example. Without the balance the model
could learn "answer A" and look accurate. The helpfulness pairs shipped in
``data/helpfulness_pairs.jsonl`` (written for this project: two replies of the same plain style
where one is correct and useful and the other wrong, evasive or empty) can be mixed in, as the
public replication proposed but did not test: its preference model, trained on teacher-vs-
student pairs only, became a style detector that RL then exploited.

Everything here is pure except `ForcedChoiceComparator.__call__`, which scores through a
sampling client.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

from ..errors import DataError
from ..field_dict import FieldDict
from ..prompts import RLAIF_ANSWERS, rlaif_comparison_messages
from .judge import forced_choice_scores

HELPFULNESS_FILE = "helpfulness_pairs.jsonl"
HELPFULNESS_SOURCE = "helpfulness"
TIE = 0.5


# -- matchups and credits (pure) -----------------------------------------------------------------
@dataclass(frozen=True)
class Matchup:
    """Two replies to one prompt; the verdict is the credit of ``first`` (1 win, 0 loss)."""

    key: str
    prompt: str
    first: str
    second: str


@dataclass(frozen=True)
class Judgement:
    """A matchup's outcome: ``credit`` in [0, 1] for the first reply, and how it was reached."""

    key: str
    credit: float
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def decided(self) -> bool:
        return self.credit != TIE


class Comparator(Protocol):
    """What stage 09 asks a preference signal: a credit for the first reply of each matchup.

    ``identity`` names the signal (model, checkpoint, template) in cache digests, so a cached
    verdict is never reused for another signal.
    """

    identity: str

    def __call__(self, matchups: Sequence[Matchup]) -> list[Judgement]: ...


def hard_credit(first_as_a: tuple[float, float], first_as_b: tuple[float, float]) -> float:
    """The judge's rule: (logp A, logp B) with the first reply shown as A, then shown as B.

    1 when both orders pick the first reply, 0 when both pick the second, 0.5 otherwise (an
    inconsistent pair, or an exact tie or a non-finite score in either order).
    """
    picks = []
    for (lp_a, lp_b), first_letter in ((first_as_a, "A"), (first_as_b, "B")):
        if not (math.isfinite(lp_a) and math.isfinite(lp_b)) or lp_a == lp_b:
            return TIE
        picks.append(("A" if lp_a > lp_b else "B") == first_letter)
    if all(picks):
        return 1.0
    if not any(picks):
        return 0.0
    return TIE


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def soft_credit(first_as_a: tuple[float, float], first_as_b: tuple[float, float]) -> float:
    """The preference model's rule: its probability that the first reply is better, averaged
    over both orders (the two-letter softmax of each order)."""
    (a1, b1), (a2, b2) = first_as_a, first_as_b
    if not all(math.isfinite(x) for x in (a1, b1, a2, b2)):
        return TIE
    return 0.5 * (_sigmoid(a1 - b1) + _sigmoid(b2 - a2))


class ForcedChoiceComparator:
    """A model asked `prompts.rlaif_comparison_messages` in both orders, scored by letter
    log-probabilities.

    ``sampler`` is a sampling client or a zero-argument callable making one (called on first
    use only); ``renderer`` a renderer or its name. ``soft`` selects `soft_credit` (trained
    preference model) instead of `hard_credit` (prompted judge).
    """

    def __init__(
        self,
        sampler: Any,
        renderer: Any,
        character: str,
        identity: str,
        soft: bool = False,
        desc: str | None = None,
    ):
        self._sampler = sampler
        self._renderer = renderer
        self.character = character
        self.soft = soft
        self.desc = desc
        blob = json.dumps([identity, character, soft, rlaif_comparison_messages("", "", "", "")])
        self.identity = f"{identity}#{hashlib.sha256(blob.encode()).hexdigest()[:10]}"

    def _client(self) -> tuple[Any, Any]:
        from ..backends import resolve_client
        from ..renderers import get_renderer

        if not hasattr(self._sampler, "compute_logprobs"):
            self._sampler = self._sampler()
        self._sampler = resolve_client(self._sampler)
        if isinstance(self._renderer, str):
            self._renderer = get_renderer(self._renderer, self._sampler.get_tokenizer())
        return self._sampler, self._renderer

    def messages(self, matchup: Matchup, first_as: str) -> list[dict[str, str]]:
        """The comparison with the first reply shown as ``first_as`` ("A" or "B")."""
        a, b = (
            (matchup.first, matchup.second) if first_as == "A" else (matchup.second, matchup.first)
        )
        return rlaif_comparison_messages(matchup.prompt, a, b, self.character)

    def __call__(self, matchups: Sequence[Matchup]) -> list[Judgement]:
        if not matchups:
            return []
        sampler, renderer = self._client()
        letter_a, letter_b = RLAIF_ANSWERS
        items = [
            (self.messages(m, order), letter_a, letter_b) for m in matchups for order in ("A", "B")
        ]
        scores = forced_choice_scores(sampler, renderer, items, desc=self.desc)
        rule = soft_credit if self.soft else hard_credit
        out = []
        for i, m in enumerate(matchups):
            as_a, as_b = scores[2 * i], scores[2 * i + 1]
            detail = {"first_as_a": list(as_a), "first_as_b": list(as_b)}
            out.append(Judgement(m.key, float(rule(as_a, as_b)), detail))
        return out


class FunctionComparator:
    """A plain function ``(prompt, first, second) -> credit`` as a comparator (tests, toy
    rewards, ablations); ``identity`` must change whenever the function does."""

    def __init__(self, fn: Callable[[str, str, str], float], identity: str):
        self.fn = fn
        self.identity = identity

    def __call__(self, matchups: Sequence[Matchup]) -> list[Judgement]:
        out = []
        for m in matchups:
            credit = float(self.fn(m.prompt, m.first, m.second))
            if not 0.0 <= credit <= 1.0:
                raise DataError(f"comparator {self.identity}: credit {credit} outside [0, 1]")
            out.append(Judgement(m.key, credit))
        return out


# -- preference-model data (pure) ----------------------------------------------------------------
@dataclass(frozen=True)
class PMExample(FieldDict):
    """One comparison the preference model learns: the chosen reply shown at ``chosen_as``."""

    id: str
    source: str
    prompt_id: str
    split: str  # "train" | "heldout"
    chosen_as: str  # "A" | "B": the answer letter
    prompt: str
    chosen: str
    rejected: str

    def matchup(self) -> Matchup:
        """Chosen first: a perfect signal gives credit 1."""
        return Matchup(self.id, self.prompt, self.chosen, self.rejected)

    def messages(self, character: str) -> list[dict[str, str]]:
        a, b = (
            (self.chosen, self.rejected) if self.chosen_as == "A" else (self.rejected, self.chosen)
        )
        return rlaif_comparison_messages(self.prompt, a, b, character)


def load_helpfulness_pairs() -> list[dict[str, str]]:
    """The shipped helpfulness pairs (``id``, ``prompt``, ``chosen``, ``rejected``)."""
    text = resources.files("character_training.data").joinpath(HELPFULNESS_FILE).read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for row in rows:
        if not all(isinstance(row.get(k), str) and row[k] for k in ("id", "prompt", "chosen")):
            raise DataError(f"{HELPFULNESS_FILE}: malformed row {row!r}")
    return rows


def split_by_prompt(prompt_ids: Sequence[str], heldout_fraction: float, seed: int) -> set[str]:
    """The held-out prompt ids: ``round(fraction * n)`` ranked by a hash of (seed, id), at least
    one and never all when there are two or more. Stable across machines and file orders."""
    ids = sorted(set(prompt_ids))
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"pm-split:{seed}:{i}".encode()).hexdigest())
    n = math.floor(heldout_fraction * len(ids) + 0.5)
    if len(ids) >= 2:
        n = min(max(n, 1), len(ids) - 1)
    return set(ranked[:n])


def balanced_positions(ids: Sequence[str], seed: int, salt: str) -> dict[str, str]:
    """``id -> "A" | "B"``: a seeded shuffle, alternating letters, so the chosen reply is shown
    as A for exactly ``ceil(n / 2)`` of the ids."""
    order = sorted(ids)
    random.Random(f"{seed}:pm-order:{salt}").shuffle(order)
    return {pid: RLAIF_ANSWERS[i % 2] for i, pid in enumerate(order)}


def render_pm_examples(
    pairs: Sequence[Mapping[str, Any]],
    heldout_fraction: float,
    seed: int,
    helpfulness: Sequence[Mapping[str, Any]] = (),
) -> list[PMExample]:
    """Stage 02 pairs (and optional helpfulness pairs) as balanced, split comparisons.

    Each source is split by prompt separately (so the helpfulness set also has held-out
    prompts), and letters are balanced within every (source, split).
    """
    rows = [
        {**p, "source": str(p.get("source") or "pairs"), "prompt_id": str(p["prompt_id"])}
        for p in pairs
    ]
    rows += [
        {**h, "source": HELPFULNESS_SOURCE, "prompt_id": str(h.get("prompt_id") or h["id"])}
        for h in helpfulness
    ]
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            raise DataError(f"preference-model data: pair id {row['id']!r} appears twice")
        seen.add(row["id"])
        if row["chosen"] == row["rejected"]:
            raise DataError(f"preference-model data: pair {row['id']!r} has chosen == rejected")
    examples: list[PMExample] = []
    for source in dict.fromkeys(r["source"] for r in rows):
        part = [r for r in rows if r["source"] == source]
        held = split_by_prompt([r["prompt_id"] for r in part], heldout_fraction, seed)
        for split in ("train", "heldout"):
            chosen = [r for r in part if (r["prompt_id"] in held) == (split == "heldout")]
            letters = balanced_positions([r["id"] for r in chosen], seed, f"{source}:{split}")
            examples += [
                PMExample(
                    id=r["id"],
                    source=source,
                    prompt_id=r["prompt_id"],
                    split=split,
                    chosen_as=letters[r["id"]],
                    prompt=r["prompt"],
                    chosen=r["chosen"],
                    rejected=r["rejected"],
                )
                for r in chosen
            ]
    return examples


def answer_datum(renderer: Any, messages: Sequence[Mapping[str, str]], answer: str) -> Any:
    """A training datum whose only loss token is the answer letter (not the end of turn).

    The letter is what RL scores; training the end-of-turn token too would teach the model to
    stop after the letter, which nobody measures, and dilute the loss.
    """
    import torch
    from tinker import types

    from ..renderers.conversation import supervised_datum

    datum = supervised_datum(renderer, [*messages, {"role": "assistant", "content": answer}])
    targets = list(datum.loss_fn_inputs["target_tokens"].data)
    weights = list(datum.loss_fn_inputs["weights"].data)
    stops = {s for s in renderer.get_stop_sequences() if isinstance(s, int)}
    positions = [i for i, w in enumerate(weights) if w > 0]
    while positions and targets[positions[-1]] in stops:
        positions.pop()
    if not positions:
        raise DataError(f"answer {answer!r} has no token to train on")
    keep = torch.zeros(len(weights), dtype=torch.float32)
    keep[positions] = 1.0
    inputs = dict(datum.loss_fn_inputs)
    inputs["weights"] = types.TensorData.from_torch(keep)
    return types.Datum(model_input=datum.model_input, loss_fn_inputs=inputs)


def pairwise_accuracy(
    examples: Sequence[PMExample], judgements: Sequence[Judgement]
) -> dict[str, float]:
    """Share of examples where the chosen reply got credit > 0.5, and the share of ties."""
    if not examples:
        return {"accuracy": math.nan, "ties": math.nan, "n": 0}
    credit = {j.key: j.credit for j in judgements}
    values = [credit[e.id] for e in examples]
    return {
        "accuracy": sum(v > TIE for v in values) / len(values),
        "ties": sum(v == TIE for v in values) / len(values),
        "mean_credit": sum(values) / len(values),
        "n": len(values),
    }


__all__ = [
    "HELPFULNESS_SOURCE",
    "TIE",
    "Comparator",
    "ForcedChoiceComparator",
    "FunctionComparator",
    "Judgement",
    "Matchup",
    "PMExample",
    "answer_datum",
    "balanced_positions",
    "hard_credit",
    "load_helpfulness_pairs",
    "pairwise_accuracy",
    "render_pm_examples",
    "soft_credit",
    "split_by_prompt",
]
