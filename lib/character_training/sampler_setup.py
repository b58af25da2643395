"""What a stage needs to call the shared sampler: its settings and its sampling clients.

Every sampling stage used to spell out the same five keyword settings of
`sampling.sample_chat` from `config.SamplingParams`, and two stages each had a private "make
the client on first use" wrapper. Both live here once:

* `sampler_settings`: the keyword settings (``max_tokens``, ``temperature``, ``top_p``,
  ``top_k``, ``seed``). Each stage has its own reply budget (``prompts.max_tokens``,
  ``distill.max_tokens``, ...), so the budget is an argument; the rest comes from the run's
  ``sampling`` section. A stage that names its log files after the settings hashes this dict,
  so its keys must stay what they are (a renamed key renames every log and resamples).
  `SAMPLING_PREFIXES` names the ``sampling`` fields it reads besides the budget.
* `LazySampler`: a sampling client made on first use only, so a rerun whose logs already hold
  every reply loads no model.
* `model_sampler`: the client factory for "the base model, or a checkpoint's sampler
  weights", the two kinds of model the evaluation stages compare.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import SamplingParams

SAMPLING_PREFIXES = ("temperature", "top_")
"""The ``sampling`` fields `sampler_settings` reads when a stage brings its own reply budget.
Such a stage's ``Config`` declares ``SECTION_PREFIXES = {"sampling": SAMPLING_PREFIXES}``
(`stage_config.StageConfig`), so ``sampling.max_tokens``, the budget of stage 06 only, is not
in its fingerprint: changing it would otherwise refuse that stage's finished folder."""


def sampler_settings(sampling: SamplingParams, max_tokens: int, seed: int) -> dict[str, Any]:
    """The keyword settings of `sampling.sample_chat` for replies of at most ``max_tokens``."""
    return {
        "max_tokens": max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "seed": seed,
    }


class LazySampler:
    """A sampling client made on first call (and resolved if the SDK returns a future)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._client: Any = None

    def __call__(self) -> Any:
        if self._client is None:
            from .backends import resolve_client

            self._client = resolve_client(self._make())
        return self._client


def model_sampler(
    service_client: Any, base_model: str, sampler_path: str | None
) -> Callable[[], Any]:
    """A factory of the sampling client for ``base_model`` itself (``sampler_path`` None) or
    for a checkpoint's sampler weights; `sample_chat` calls it only when a reply is missing."""

    def make() -> Any:
        if sampler_path is None:
            return service_client.create_sampling_client(base_model=base_model)
        return service_client.create_sampling_client(model_path=sampler_path)

    return make
