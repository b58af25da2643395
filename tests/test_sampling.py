"""The shared sampler: resumed runs equal one-go runs, logs survive a crash, scores are exact.

Bugs pinned here:

* seeds derived from how many calls were pending (stage 01 used ``seed * 100003 + index``), so
  a resumed run sampled different text than an uninterrupted one;
* a log whose last line was torn by a crash, which made the next append glue two records into
  one unreadable line;
* a logged reply silently reused for a request whose messages changed under the same key;
* duplicated keys (two requests sharing one log row and one seed).
"""

from __future__ import annotations

import json

import pytest
from character_training.errors import DataError
from character_training.renderers.conversation import generation_prompt
from character_training.sampling import (
    SampleRequest,
    derive_seed,
    read_log,
    reply_logprobs,
    sample_chat,
    sequence_logprobs,
)
from tinker import types

SETTINGS = dict(max_tokens=6, temperature=1.0, top_p=0.95, seed=3)


class CountingSampler:
    """The real tiny sampler, counting its ``sample`` calls."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def sample(self, *args, **kwargs):
        self.calls += 1
        return self.inner.sample(*args, **kwargs)

    def compute_logprobs(self, prompt):
        return self.inner.compute_logprobs(prompt)

    def get_tokenizer(self):
        return self.inner.get_tokenizer()


def _requests() -> list[SampleRequest]:
    questions = ["What is tea?", "Name a river.", "Why is the sky blue?"]
    requests = [
        SampleRequest(f"q{i}:s{s}", [{"role": "user", "content": q}], meta={"q": i})
        for i, q in enumerate(questions)
        for s in range(2)
    ]
    requests.append(
        SampleRequest(
            "prefilled:s0",
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            prefill="Well,",
        )
    )
    return requests


def _records(completions) -> dict[str, dict]:
    """Everything but the float log-probability sum, which batching may move in the 7th digit."""
    return {
        k: {f: v for f, v in c.to_record().items() if f != "logprob_sum"}
        for k, c in completions.items()
    }


def _logprob_sums(completions) -> dict[str, float]:
    return {k: c.logprob_sum for k, c in completions.items()}


def test_an_interrupted_and_resumed_run_equals_one_uninterrupted_run(
    tiny_sampler, renderer, tmp_path
):
    requests = _requests()
    one_go = sample_chat(
        tiny_sampler, renderer, requests, log_path=tmp_path / "b.jsonl", **SETTINGS
    )

    counting = CountingSampler(tiny_sampler)
    first = sample_chat(
        counting, renderer, requests[::2], log_path=tmp_path / "a.jsonl", **SETTINGS
    )
    assert counting.calls == 4
    # resumed with the requests in another order and smaller chunks: same seeds, same output
    resumed = sample_chat(
        counting,
        renderer,
        list(reversed(requests)),
        log_path=tmp_path / "a.jsonl",
        chunk_size=2,
        **SETTINGS,
    )
    assert counting.calls == 4 + 3  # only the missing keys were sampled
    assert _records(resumed) == _records(one_go)
    assert _logprob_sums(resumed) == pytest.approx(_logprob_sums(one_go), abs=1e-4)
    assert all(_records(first)[k] == _records(one_go)[k] for k in first)
    assert list(resumed) == [r.key for r in reversed(requests)]  # order of the request list
    assert {json.loads(x)["key"] for x in (tmp_path / "a.jsonl").read_text().splitlines()} == set(
        one_go
    )
    # seeds are the request's identity, not its position
    assert {k: c.seed for k, c in one_go.items()} == {k: derive_seed(3, k) for k in one_go}
    assert len({c.seed for c in one_go.values()}) == len(one_go)


def test_the_prefill_is_kept_apart_from_the_sampled_text_and_truncation_is_reported(
    tiny_sampler, renderer
):
    request = _requests()[-1]
    out = sample_chat(tiny_sampler, renderer, [request], **SETTINGS)[request.key]
    assert out.prefill == "Well," and not out.text.startswith("Well,")
    assert out.full_text == "Well," + out.text
    assert out.prompt_tokens == generation_prompt(renderer, request.messages, "Well,").length
    assert 1 <= out.num_tokens <= SETTINGS["max_tokens"]
    assert out.complete == (out.stop_reason == "stop")
    if not out.complete:
        assert out.num_tokens == SETTINGS["max_tokens"]
    assert out.logprob_sum is not None and out.logprob_sum < 0
    assert out.tokens is None  # only kept on request


def test_return_tokens_keeps_the_exact_sampled_tokens_and_their_logprobs(tiny_sampler, renderer):
    request = _requests()[0]
    out = sample_chat(tiny_sampler, renderer, [request], return_tokens=True, **SETTINGS)
    completion = out[request.key]
    assert len(completion.tokens) == len(completion.token_logprobs) == completion.num_tokens
    assert sum(completion.token_logprobs) == pytest.approx(completion.logprob_sum)
    prompt = generation_prompt(renderer, request.messages).to_ints()
    rescored = tiny_sampler.compute_logprobs(
        types.ModelInput.from_ints(prompt + completion.tokens)
    ).result()
    assert sum(rescored[len(prompt) :]) == pytest.approx(completion.logprob_sum, abs=1e-3)


def test_a_torn_last_line_is_counted_cut_off_and_that_request_sampled_again(
    tiny_sampler, renderer, tmp_path, caplog
):
    requests = _requests()[:4]
    log = tmp_path / "log.jsonl"
    full = sample_chat(tiny_sampler, renderer, requests, log_path=log, **SETTINGS)
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])  # killed mid-write
    assert read_log(log).torn_lines == 1
    assert len(read_log(log).rows) == 3

    counting = CountingSampler(tiny_sampler)
    with caplog.at_level("WARNING"):
        again = sample_chat(counting, renderer, requests, log_path=log, **SETTINGS)
    assert counting.calls == 1
    assert "dropped 1 torn last line" in caplog.text
    assert _records(again) == _records(full)
    assert [json.loads(x) for x in log.read_text().splitlines()]  # every line parses again
    assert read_log(log).torn_lines == 0


def test_a_corrupted_middle_line_is_an_error_not_a_silent_skip(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"key": "a"}\n{"key": \n{"key": "b"}\n')
    with pytest.raises(DataError, match=r"log.jsonl:2: not valid JSON"):
        read_log(log)


def test_a_fully_logged_rerun_builds_no_sampler(tiny_sampler, renderer, tmp_path):
    requests = _requests()[:2]
    log = tmp_path / "log.jsonl"
    sample_chat(tiny_sampler, renderer, requests, log_path=log, **SETTINGS)

    def no_sampler():
        raise AssertionError("the sampler factory must not be called")

    again = sample_chat(no_sampler, "smollm2", requests, log_path=log, **SETTINGS)
    assert set(again) == {r.key for r in requests}


def test_a_sampler_factory_and_a_renderer_name_work_like_the_objects(
    tiny_sampler, renderer, tmp_path
):
    requests = _requests()[:2]
    direct = sample_chat(tiny_sampler, renderer, requests, **SETTINGS)
    lazy = sample_chat(lambda: tiny_sampler, "smollm2", requests, **SETTINGS)
    assert _records(lazy) == _records(direct)


def test_duplicated_keys_are_refused(tiny_sampler, renderer):
    requests = _requests()[:2]
    clash = [requests[0], SampleRequest(requests[0].key, requests[1].messages)]
    with pytest.raises(DataError, match=r"request 1: key 'q0:s0' appears more than once"):
        sample_chat(tiny_sampler, renderer, clash, **SETTINGS)


def test_a_logged_row_for_a_changed_request_is_refused_not_reused(tiny_sampler, renderer, tmp_path):
    requests = _requests()[:2]
    log = tmp_path / "log.jsonl"
    sample_chat(tiny_sampler, renderer, requests, log_path=log, **SETTINGS)
    changed = [SampleRequest("q0:s0", [{"role": "user", "content": "Something else?"}])]
    with pytest.raises(DataError, match=r"logged row for key 'q0:s0' was sampled from a different"):
        sample_chat(tiny_sampler, renderer, changed, log_path=log, **SETTINGS)
    with pytest.raises(DataError, match="different request"):
        sample_chat(tiny_sampler, renderer, requests, log_path=log, **{**SETTINGS, "seed": 4})
    # meta is not part of a request's identity
    relabelled = [SampleRequest(r.key, r.messages, meta={"new": 1}) for r in requests]
    out = sample_chat(tiny_sampler, renderer, relabelled, log_path=log, **SETTINGS)
    assert all(c.meta == {"new": 1} for c in out.values())


def test_derived_seeds_are_pinned():
    """Changing the hash would silently change every resumed run's remaining samples."""
    assert derive_seed(0, "q0:s0") == derive_seed(0, "q0:s0")
    assert derive_seed(0, "q0:s0") != derive_seed(1, "q0:s0") != derive_seed(0, "q0:s1")
    assert 0 <= derive_seed(-5, "x") < 2**31
    assert derive_seed(0, "a:s0") == PINNED_SEED


PINNED_SEED = 1851302729


# -- scoring -------------------------------------------------------------------------------------
def _direct_score(sampler, renderer, tokenizer, messages, reply, include_end=True):
    """log p(reply tokens [+ <|im_end|>] | generation prompt), computed by hand."""
    prompt = generation_prompt(renderer, messages).to_ints()
    reply_tokens = tokenizer.encode(reply, add_special_tokens=False)
    if include_end:
        reply_tokens.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    full = types.ModelInput.from_ints(prompt + reply_tokens)
    logprobs = sampler.compute_logprobs(full).result()
    return sum(logprobs[len(prompt) :])


@pytest.mark.parametrize("include_end", [True, False])
def test_sequence_logprobs_equal_a_direct_computation(
    tiny_sampler, renderer, tokenizer, include_end
):
    messages = [{"role": "user", "content": "Answer with A or B: which is larger, 3 or 5?"}]
    replies = ["A", "B", "B, because five is larger than three.", ""]
    scores = sequence_logprobs(tiny_sampler, renderer, messages, replies, include_end=include_end)
    expected = [
        _direct_score(tiny_sampler, renderer, tokenizer, messages, r, include_end) for r in replies
    ]
    assert scores == pytest.approx(expected, abs=1e-4)
    if not include_end:
        assert scores[-1] == 0.0  # an empty prefix has probability one


def test_reply_logprobs_score_each_pair_in_its_own_conversation(tiny_sampler, renderer):
    a = [{"role": "user", "content": "Say hi."}]
    b = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Say bye."}]
    batched = reply_logprobs(tiny_sampler, renderer, [(a, "hi"), (b, "bye"), (a, "hello")])
    one_by_one = [
        sequence_logprobs(tiny_sampler, renderer, a, ["hi"])[0],
        sequence_logprobs(tiny_sampler, renderer, b, ["bye"])[0],
        sequence_logprobs(tiny_sampler, renderer, a, ["hello"])[0],
    ]
    assert batched == pytest.approx(one_by_one, abs=1e-4)
