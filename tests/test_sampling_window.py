"""`sample_chat` keeps a bounded window of requests in flight (issue 18, section 1).

* on the local engine its replies, their log-probabilities and their order are exactly those
  of the chunked loop it replaces (every chunk issued, then read, then the next), because the
  engine decodes the same batches;
* on the simulated service it is bound by the slots, not by a barrier per chunk: 12 requests
  on 3 slots with a window of 4 take ceil(12 / 3) = 4 latencies, where chunks of 4 took 6.
"""

from __future__ import annotations

import pytest
from character_training.backends.local import TINY_RANDOM_NAME
from character_training.renderers.conversation import generation_prompt
from character_training.sampling import SampleRequest, derive_seed, sample_chat
from character_training.testing import SimulatedService
from tinker import types

SETTINGS = dict(max_tokens=5, temperature=1.0, top_p=1.0, seed=3)


def requests(count: int) -> list[SampleRequest]:
    return [
        SampleRequest(key=f"k{i}", messages=[{"role": "user", "content": f"Tell me {i} things."}])
        for i in range(count)
    ]


def chunked(sampler, renderer, items, chunk: int) -> list:
    """The loop `sample_chat` had before: a chunk issued whole, read whole, then the next."""
    sequences = []
    for start in range(0, len(items), chunk):
        futures = [
            sampler.sample(
                generation_prompt(renderer, item.messages),
                1,
                types.SamplingParams(
                    max_tokens=SETTINGS["max_tokens"],
                    temperature=1.0,
                    top_p=1.0,
                    seed=derive_seed(SETTINGS["seed"], item.key),
                    stop=renderer.get_stop_sequences(),
                ),
            )
            for item in items[start : start + chunk]
        ]
        sequences += [future.result().sequences[0] for future in futures]
    return sequences


def test_the_window_samples_exactly_what_the_chunks_did(tiny_sampler, renderer):
    items = requests(7)
    before = chunked(tiny_sampler, renderer, items, chunk=3)
    after = sample_chat(tiny_sampler, renderer, items, **SETTINGS, chunk_size=3, return_tokens=True)
    assert list(after) == [item.key for item in items]
    assert [c.tokens for c in after.values()] == [list(s.tokens) for s in before]
    assert [c.token_logprobs for c in after.values()] == [list(s.logprobs) for s in before]


@pytest.mark.parametrize("window, latencies", [(4, 4), (12, 4), (2, 6)])
def test_the_window_is_bound_by_the_slots_not_by_round_trips(
    tiny_service, renderer, window, latencies
):
    service = SimulatedService(tiny_service, sampling_slots=3, sample_latency_s=3.0)
    sampler = service.create_sampling_client(base_model=TINY_RANDOM_NAME).result()
    sample_chat(sampler, renderer, requests(12), **SETTINGS, chunk_size=window)
    assert service.now() == pytest.approx(latencies * 3.0)  # window 2 < 3 slots: 6 rounds
