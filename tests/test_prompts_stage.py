"""Stage 01 planning and splits: evaluation prompts are never trained on.

The paper evaluated its persona classifier on its own training data; here the general pool is
split once, deterministically, and every set is checked for overlap by normalised text.
"""

from __future__ import annotations

import json

import pytest
from character_training.config import load_params
from character_training.constitutions import load_constitution
from character_training.errors import ConfigError
from character_training.prompt_filters import normalize_prompt
from character_training.prompt_sources import (
    PromptRecord,
    cookbook_conversation_prompts,
    describe_pool,
    general_prompt_pool,
    qualitative_prompts,
    shipped_general_prompts,
)
from character_training.prompts import expansion_messages, persona_system_prompt, teacher_messages
from character_training.stages.prompts_gen import (
    Config,
    fit_split_sizes,
    plan_generation_calls,
    split_general_pool,
)


def test_the_shipped_pool_has_enough_diverse_prompts_and_the_cookbook_adds_real_ones():
    shipped = shipped_general_prompts()
    assert len(shipped) >= 300
    assert len({r.category for r in shipped}) >= 10
    assert len(cookbook_conversation_prompts()) == 128
    assert len({r.id for r in general_prompt_pool()}) == len(general_prompt_pool())


def test_train_and_eval_splits_are_disjoint_stable_and_exclude_the_qualitative_set():
    pool = general_prompt_pool()
    qualitative = [r.prompt for r in qualitative_prompts()]
    split = split_general_pool(pool, 200, 100, seed=0, exclude=qualitative)
    train, evaluation = split.train, split.evaluation
    assert (len(train), len(evaluation)) == (200, 100) and not split.warning
    norm = lambda records: {normalize_prompt(r.prompt) for r in records}  # noqa: E731
    assert not norm(train) & norm(evaluation)
    assert not (norm(train) | norm(evaluation)) & {normalize_prompt(q) for q in qualitative}
    again = split_general_pool(list(reversed(pool)), 200, 100, 0, qualitative)
    assert [r.id for r in again.evaluation] == [r.id for r in evaluation]


def test_a_duplicated_prompt_cannot_land_on_both_sides_of_the_split():
    pool = [
        PromptRecord(f"p{i}", f"How do I repot plant number {i} without killing it?", "t")
        for i in range(20)
    ]
    pool.append(PromptRecord("dup", pool[0].prompt, "t"))
    split = split_general_pool(pool, 12, 8, seed=1, exclude=[], allow_smaller=True)
    texts = [r.prompt for r in split.train + split.evaluation]
    assert len(texts) == len(set(texts))


def test_generation_calls_cover_the_budget_and_show_only_hand_written_examples():
    params = load_params(
        "tiny",
        "sarcastic",
        {"prompts.generated_per_assertion": 7, "prompts.per_generation_call": 3},
    )
    constitution = load_constitution("sarcastic")
    calls = plan_generation_calls(constitution, Config.from_params(params))
    per_assertion = {}
    for call in calls:
        per_assertion[call.assertion_id] = per_assertion.get(call.assertion_id, 0) + call.count
        assertion = next(a for a in constitution.assertions if a.id == call.assertion_id)
        assert set(call.examples) <= set(assertion.prompts)
    assert per_assertion == {a.id: 7 for a in constitution.assertions}
    assert [c.count for c in calls[:3]] == [3, 3, 1]
    assert len({c.key for c in calls}) == len(calls)


def test_rendered_templates_have_no_placeholder_and_end_with_the_user_turn():
    constitution = load_constitution("loving")
    system = persona_system_prompt(constitution, "SmolLM")
    assert "{" not in system and "SmolLM" in system
    assert all(a.text in system for a in constitution.assertions)
    messages = teacher_messages(constitution, "SmolLM", "Hi there", few_shot=2)
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert messages[-1]["content"] == "Hi there"
    expansion = expansion_messages(constitution.assertions[0], ["a?", "b?"], 4)
    assert (
        "1. a?\n2. b?" in expansion[-1]["content"]
        and "Write 4 new messages" in expansion[-1]["content"]
    )


def test_an_unreachable_hub_dataset_is_an_error_unless_offline_fallback_is_allowed(
    monkeypatch, caplog
):
    from character_training.errors import DataError
    from character_training.prompt_sources import hub_prompts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        hub_prompts("lima", 10)
    message = str(info.value)
    assert message.startswith("hub dataset lima (GAIR/lima) is unreachable (HF_HUB_OFFLINE is set)")
    assert "prompts.hub_offline_fallback=true" in message and "\n" not in message
    with pytest.raises(DataError, match="unreachable"):
        general_prompt_pool(("lima",))
    with caplog.at_level("WARNING"):
        assert hub_prompts("lima", 10, offline_fallback=True) == []
    assert "hub dataset lima (GAIR/lima) unavailable" in caplog.text
    assert "offline prompt pool" in caplog.text
    with pytest.raises(DataError, match="unknown hub dataset 'imdb'"):
        hub_prompts("imdb", 1)


def test_describe_pool_counts_sources_including_missing_hub_sets_and_hashes_the_content():
    pool = general_prompt_pool()
    info = describe_pool(pool, ("lima",))
    assert info["size"] == len(pool)
    assert info["sources"]["lima"] == 0 and info["sources"]["cookbook"] == 128
    assert sum(info["sources"].values()) == len(pool)
    assert describe_pool(list(pool))["sha256"] == info["sha256"]
    edited = [*pool[:-1], PromptRecord(pool[-1].id, pool[-1].prompt + "?", pool[-1].source)]
    assert describe_pool(edited)["sha256"] != info["sha256"]


def test_a_pool_too_small_for_the_requested_sizes_fails_in_one_line_or_shrinks_when_allowed():
    pool = [
        PromptRecord(f"p{i}", f"Question number {i}: how do tides {i} work here?", "shipped")
        for i in range(30)
    ]
    with pytest.raises(ConfigError) as info:
        split_general_pool(pool, 40, 20, seed=0, exclude=[])
    message = str(info.value)
    assert "prompts.general_prompts=40 + prompts.eval_prompts=20 = 60" in message
    assert "the pool holds 30 after de-duplication (shipped 30)" in message
    assert "prompts.allow_smaller_pool=true" in message and "\n" not in message
    split = split_general_pool(pool, 40, 20, seed=0, exclude=[], allow_smaller=True)
    assert (len(split.train), len(split.evaluation)) == (20, 10)  # 2:1 as requested
    assert "shrunk to 20 train + 10 eval" in split.warning
    assert fit_split_sizes(30, 10, 5, allow_smaller=False) == (10, 5, "")


def test_stage_01_refuses_a_too_small_pool_before_writing_and_records_a_shrink(tmp_path):
    from character_training.config import with_overrides
    from character_training.stages import prompts_gen
    from character_training.store import stage_dir

    params = with_overrides(
        load_params("tiny", "sarcastic"),
        {
            "runs_dir": str(tmp_path),
            "prompts.generated_per_assertion": 0,  # no generator call: no model is loaded
            "prompts.general_prompts": 5000,
            "prompts.eval_prompts": 1000,
        },
    )
    with pytest.raises(ConfigError, match=r"= 6000 general prompts requested, but the pool"):
        prompts_gen.run(params, service_client=None)
    assert not (params.run_dir / prompts_gen.STAGE).exists()

    shrunk = with_overrides(params, {"prompts.allow_smaller_pool": True})
    result = prompts_gen.run(shrunk, service_client=None)
    available = result.counts["general_available"]
    assert result.counts["general_train"] + result.counts["general_eval"] == available
    assert result.counts["general_train"] == round(available * 5000 / 6000)
    assert len(result.warnings) == 1 and "shrunk to" in result.warnings[0]
    manifest = stage_dir(shrunk.run_dir, prompts_gen.STAGE).manifest()
    assert manifest["warnings"] == result.warnings
    assert manifest["general_pool"]["sources"]["cookbook"] == 128
    config = json.loads((result.stage_dir / "config.json").read_text())
    assert config["general_pool"] == manifest["general_pool"]


def test_stage_01_records_an_offline_fallback_and_fingerprints_the_pool(tmp_path, monkeypatch):
    from character_training.config import with_overrides
    from character_training.errors import DataError
    from character_training.stages import prompts_gen
    from character_training.store import StageDir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = with_overrides(
        load_params("tiny", "sarcastic"),
        {
            "runs_dir": str(tmp_path),
            "prompts.generated_per_assertion": 0,
            "prompts.hub_datasets": ["lima"],
        },
    )
    with pytest.raises(DataError, match="hub dataset lima .* is unreachable"):
        prompts_gen.run(params, service_client=None)
    fallback = with_overrides(params, {"prompts.hub_offline_fallback": True})
    result = prompts_gen.run(fallback, service_client=None)
    assert any("hub dataset lima contributed no prompts" in w for w in result.warnings)
    config = json.loads((result.stage_dir / "config.json").read_text())
    assert config["general_pool"]["sources"]["lima"] == 0
    pool = describe_pool(general_prompt_pool(), ("lima",))
    settings = prompts_gen.Config.from_params(fallback, general_pool=pool)
    other = prompts_gen.Config.from_params(fallback, general_pool={**pool, "sha256": "0" * 16})
    assert settings.fingerprint() != other.fingerprint()
    assert StageDir(result.stage_dir).manifest()["fingerprint"] == settings.fingerprint()
    # stage 06's reply budget is not this stage's: changing it keeps the folder usable
    budget = with_overrides(fallback, {"sampling.max_tokens": 7})
    assert prompts_gen.Config.from_params(budget, general_pool=pool).fingerprint() == (
        settings.fingerprint()
    )


def test_stage_01_resumes_an_interrupted_run_issuing_only_the_missing_generator_calls(tmp_path):
    """Kill the stage after some generator calls: the rerun must reuse them, not redo them."""
    from character_training.backends import get_service_client, resolve_client
    from character_training.config import with_overrides
    from character_training.errors import ConfigError
    from character_training.stages import prompts_gen
    from character_training.store import read_jsonl, write_jsonl

    params = with_overrides(
        load_params("tiny", "sarcastic"),
        {
            "generator": "tiny-random",
            "runs_dir": str(tmp_path),
            "prompts.max_tokens": 24,
            "prompts.generated_per_assertion": 4,
            "prompts.per_generation_call": 2,
            "prompts.general_prompts": 10,
            "prompts.eval_prompts": 5,
        },
    )
    service = get_service_client("local", root_dir=str(tmp_path / "ckpt"), precision="fp32")
    calls: list[int] = []
    real_factory = service.create_sampling_client

    def counting_factory(**kwargs):
        client = resolve_client(real_factory(**kwargs))  # the SDK (and engine) may return a future
        real_sample = client.sample

        def sample(*args, **kw):
            calls.append(1)
            return real_sample(*args, **kw)

        client.sample = sample
        return client

    service.create_sampling_client = counting_factory
    first = prompts_gen.run(params, service)
    assert len(calls) == first.counts["generator_calls"] == 20  # 10 assertions x 2 calls
    raw = first.stage_dir / "generation_raw.partial.jsonl"
    rows = read_jsonl(raw)
    write_jsonl(raw, rows[:13])  # as if the process died after 13 calls
    calls.clear()
    second = prompts_gen.run(params, service)
    assert len(calls) == 7
    assert second.counts["generator_calls"] == 20
    assert read_jsonl(raw)[:13] == rows[:13]  # finished work kept as it was
    changed = with_overrides(params, {"seed": 5})
    with pytest.raises(ConfigError, match="different parameters"):
        prompts_gen.run(changed, service)


def test_resolve_client_unwraps_sdk_client_futures_and_passes_local_clients_through():
    from character_training.backends import resolve_client
    from character_training.backends.local.futures import LocalFuture

    sentinel = object()
    assert resolve_client(sentinel) is sentinel
    assert resolve_client(LocalFuture.completed(sentinel)) is sentinel
