"""Stage 04 (introspection): what the model is shown, and what stage 05 will train on.

Bugs and risks pinned here:

* the paper's code lost the self-interaction guidance (a format string without its
  placeholder), so half the guidance never reached the model: the *rendered* prompt is checked
  for the guidance, the name and the absence of any ``{...}`` placeholder;
* its SFT data kept a literal ``{NAME}`` and trained on conversations whose last turn was a user
  turn: `sft_conversations` fills the name in and always ends on an assistant turn;
* role swapping: each instance must see its own turns as ``assistant`` and the other's as
  ``user``, or the model writes as the user half the time;
* a conversation outgrowing the context window: the oldest turns go, never the system prompt,
  and every truncation is counted;
* an interrupted run (mid-conversation) that ends with other files than a one-go run;
* diversity numbers that are wrong on texts with a known answer.

Stage runs use the two-layer ``tiny-random`` model (same tokenizer as SmolLM2) from a "dpo"
checkpoint saved here from an untrained LoRA client; it never ends a reply on its own, so its
runs check mechanics and files while scripted records check the transcripts.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import nbformat
import pytest
from character_training.backends import resolve_client
from character_training.backends.local import LocalServiceClient
from character_training.config import load_params, with_overrides
from character_training.constitutions import load_constitution
from character_training.errors import ConfigError, DataError
from character_training.evaluate import diversity
from character_training.prompts import (
    INTERACTION_GUIDANCE,
    INTERACTION_OPENERS,
    REFLECTION_THEMES,
    persona_system_prompt,
    reflection_messages,
    self_interaction_sft_system,
    self_interaction_system_prompt,
)
from character_training.renderers.conversation import generation_prompt, supervised_datum
from character_training.runner import run_notebook
from character_training.sampling import read_log
from character_training.stages import introspect
from character_training.store import Checkpoint, StageDir, read_jsonl, record_checkpoint
from conftest import completion, tiny_params

TINY = "tiny-random"
PLACEHOLDER = re.compile(r"[{}]")
NAME = "SmolLM"


# -- helpers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dpo_adapter(tiny_service) -> str:
    """Sampler weights of an untrained tiny-random LoRA client, standing in for notebook 03."""
    client = resolve_client(tiny_service.create_lora_training_client(base_model=TINY, rank=4))
    return str(client.save_weights_for_sampler("dpo").result().path)


def stage_params(tmp_path: Path, adapter: str, **overrides):
    """tiny-random params with a recorded "dpo" checkpoint in a fresh runs dir."""
    params = tiny_params(
        tmp_path,
        {
            "introspection.reflections_per_prompt": 1,
            "introspection.interactions": 2,
            "introspection.interaction_turns": 3,
            "introspection.response_tokens": 6,
            **overrides,
        },
        persona="sarcastic",
    )
    record_checkpoint(params.run_dir, Checkpoint("dpo", adapter, "", TINY, "03_dpo"))
    return params


class Interrupted(RuntimeError):
    """Stands for a process killed mid-run (raised by `WatchingService`)."""


class WatchingService:
    """The real service; its sampling clients record every prompt and, after ``budget``
    results in total, raise `Interrupted` (also used by the stage-02 tests)."""

    def __init__(self, inner, budget: int = 10**9):
        self.inner = inner
        self.left = budget
        self.prompts: list[list[int]] = []

    def create_sampling_client(self, **kwargs):
        return _WatchingSampler(self, resolve_client(self.inner.create_sampling_client(**kwargs)))


class _WatchingSampler:
    def __init__(self, owner: WatchingService, inner):
        self.owner = owner
        self.inner = inner

    def __getattr__(self, name):  # model, get_tokenizer, compute_logprobs, ...
        return getattr(self.inner, name)

    def sample(self, prompt, *args, **kwargs):
        self.owner.prompts.append(prompt.to_ints())
        return _WatchingFuture(self.owner, self.inner.sample(prompt, *args, **kwargs))


class _WatchingFuture:
    def __init__(self, owner: WatchingService, inner):
        self.owner = owner
        self.inner = inner

    def result(self, *args, **kwargs):
        if self.owner.left <= 0:
            raise Interrupted("killed mid-run")
        self.owner.left -= 1
        return self.inner.result(*args, **kwargs)


def outputs(stage: Path) -> dict[str, str]:
    return {name: (stage / name).read_text() for name in introspect.OUTPUT_FILES}


# -- prompts -------------------------------------------------------------------------------------
def test_the_ten_reflection_themes_render_with_the_persona_the_mood_line_and_the_name(renderer):
    constitution = load_constitution("sarcastic")
    assert list(REFLECTION_THEMES) == [
        "letter", "biography", "diary", "conduct", "backstory",
        "change", "legacy", "future_ai", "drives", "purpose",
    ]  # fmt: skip
    assert len(set(REFLECTION_THEMES.values())) == 10
    requests = introspect.reflection_requests(constitution, NAME, per_prompt=2)
    assert [r.key for r in requests[:3]] == ["letter:s0", "letter:s1", "biography:s0"]
    assert len(requests) == 20
    for theme, instruction in REFLECTION_THEMES.items():
        messages = reflection_messages(constitution, NAME, theme)
        system = messages[0]["content"]
        assert system.startswith(persona_system_prompt(constitution, NAME))
        assert "inward-looking" in system and f"{NAME} speaks openly about itself" in system
        assert messages[1] == {"role": "user", "content": instruction}
        text = renderer.tokenizer.decode(generation_prompt(renderer, messages).to_ints())
        assert not PLACEHOLDER.search(text)
    with pytest.raises(ConfigError, match="reflection theme"):
        reflection_messages(constitution, NAME, "poetry")


@pytest.mark.parametrize("guidance", list(INTERACTION_GUIDANCE))
def test_the_guidance_and_the_name_reach_the_rendered_self_interaction_prompt(guidance, renderer):
    constitution = load_constitution("sarcastic")
    system = self_interaction_system_prompt(constitution, NAME, guidance)
    filled = INTERACTION_GUIDANCE[guidance].replace("{name}", NAME)
    for speaker in ("A", "B"):
        messages = introspect.view_messages(system, INTERACTION_OPENERS[0], [], speaker)
        text = renderer.tokenizer.decode(generation_prompt(renderer, messages).to_ints())
        assert filled in text  # the guidance really is in what the model reads
        assert f"The other side of this conversation is a second instance of {NAME}" in text
        assert text.count(NAME) >= 4 and not PLACEHOLDER.search(text)
    other = next(g for g in INTERACTION_GUIDANCE if g != guidance)
    assert INTERACTION_GUIDANCE[other].replace("{name}", NAME) not in system
    with pytest.raises(ConfigError, match="guidance"):
        self_interaction_system_prompt(constitution, NAME, "chatty")


def test_plans_alternate_guidance_and_draw_openers_from_a_seeded_generator():
    plans = introspect.plan_interactions(40, seed=3)
    assert [p.guidance for p in plans[:4]] == ["free", "reflect", "free", "reflect"]
    assert sum(p.guidance == "free" for p in plans) == 20
    assert len({p.conv_id for p in plans}) == 40
    assert len({p.opener for p in plans}) >= 5 and all(
        p.opener in INTERACTION_OPENERS for p in plans
    )
    assert introspect.plan_interactions(40, seed=3) == plans
    assert introspect.plan_interactions(12, seed=3) == plans[:12]  # never depends on the count
    assert [p.opener for p in introspect.plan_interactions(40, seed=4)] != [p.opener for p in plans]
    assert not any(PLACEHOLDER.search(o) for o in INTERACTION_OPENERS)


# -- role swapping ---------------------------------------------------------------------------------
def test_each_instance_sees_its_own_turns_as_assistant_on_a_scripted_exchange(renderer):
    """Opener (B), then A0, B1, A2: what each speaker sees before writing its turn."""
    turns = [
        {"speaker": "A", "text": "A says one."},
        {"speaker": "B", "text": "B says two."},
        {"speaker": "A", "text": "A says three."},
    ]
    assert [introspect.speaker_of(t) for t in range(4)] == ["A", "B", "A", "B"]

    def view(k: int) -> list[tuple[str, str]]:
        messages = introspect.view_messages("SYS", "B opens.", turns[:k], introspect.speaker_of(k))
        return [(m["role"], m["content"]) for m in messages]

    assert view(0) == [("system", "SYS"), ("user", "B opens.")]
    assert view(1) == [("system", "SYS"), ("assistant", "B opens."), ("user", "A says one.")]
    assert view(2) == [
        ("system", "SYS"),
        ("user", "B opens."),
        ("assistant", "A says one."),
        ("user", "B says two."),
    ]
    assert view(3) == [
        ("system", "SYS"),
        ("assistant", "B opens."),
        ("user", "A says one."),
        ("assistant", "B says two."),
        ("user", "A says three."),
    ]
    # rendered, B's prompt carries its own earlier words in assistant turns and ends by asking
    # the assistant (B) to write
    messages = introspect.view_messages("SYS", "B opens.", turns, "B")
    text = renderer.tokenizer.decode(generation_prompt(renderer, messages).to_ints())
    assert "<|im_start|>assistant\nB says two.<|im_end|>" in text
    assert "<|im_start|>user\nA says three.<|im_end|>" in text
    assert text.rstrip().endswith("<|im_start|>assistant")


# -- context truncation ----------------------------------------------------------------------------
def test_left_truncation_drops_the_oldest_exchanges_and_keeps_system_and_last_turn():
    def words(messages):
        return sum(len(m["content"].split()) for m in messages)

    messages = [{"role": "system", "content": "s " * 10}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"t{i} " * 5} for i in range(7)
    ]  # 10 + 7 * 5 = 45 words
    kept, dropped = introspect.fit_to_context(messages, words, window=100, max_tokens=55)
    assert (kept, dropped) == (messages, 0)
    kept, dropped = introspect.fit_to_context(messages, words, window=90, max_tokens=55)
    assert dropped == 2 and kept == messages[:1] + messages[3:]  # an exchange at a time
    assert kept[1]["role"] == "user"  # alternation kept as it was
    kept, dropped = introspect.fit_to_context(messages, words, window=75, max_tokens=55)
    assert dropped == 6 and kept == [messages[0], messages[-1]]
    with pytest.raises(DataError, match="raise introspection.context_tokens"):
        introspect.fit_to_context(messages, words, window=69, max_tokens=55)
    # two left and too long: only the older one goes
    kept, dropped = introspect.fit_to_context(messages[:1] + messages[-2:], words, 70, 52)
    assert dropped == 1 and kept == [messages[0], messages[-1]]


def test_the_context_window_is_the_smaller_of_the_parameter_and_the_models_limit(tiny_sampler):
    assert introspect.model_context_tokens(tiny_sampler) == 2048
    assert introspect.context_window(tiny_sampler, 32768) == 2048
    assert introspect.context_window(tiny_sampler, 900) == 900
    assert introspect.context_window(object(), 32768) == 32768  # Tinker: the parameter rules
    with pytest.raises(ConfigError, match="introspection.context_tokens"):
        with_overrides(load_params("tiny", "sarcastic"), {"introspection.context_tokens": 100})


# -- what stage 05 trains on -----------------------------------------------------------------------
def scripted_records() -> tuple[list[dict], list[dict]]:
    def turn(t, text, complete=True):
        return {"turn": t, "speaker": introspect.speaker_of(t), "text": text, "complete": complete}

    reflections = [
        {"id": "letter:s0", "theme": "letter", "instruction": "Write.", "reply": "Dear me.",
         "complete": True, "num_tokens": 4},
        {"id": "letter:s1", "theme": "letter", "instruction": "Write.", "reply": "Dear",
         "complete": False, "num_tokens": 6},
        {"id": "diary:s0", "theme": "diary", "instruction": "Diary.", "reply": "  ",
         "complete": True, "num_tokens": 1},
    ]  # fmt: skip
    interactions = [
        # four turns: ends with B, whose turn is dropped
        {"id": "c0", "guidance": "free", "opener": "Hi me.",
         "turns": [turn(0, "a0"), turn(1, "b1"), turn(2, "a2"), turn(3, "b3")]},
        # B cut mid-sentence is kept as context; A cut at t2 ends the transcript after b1
        {"id": "c1", "guidance": "reflect", "opener": "Hello.",
         "turns": [turn(0, "a0"), turn(1, "b1 cut", False), turn(2, "a2 cut", False),
                   turn(3, "b3")]},
        # A's very first turn empty: nothing to train on, dropped
        {"id": "c2", "guidance": "free", "opener": "Hey.", "turns": [turn(0, ""), turn(1, "b1")]},
    ]  # fmt: skip
    return reflections, interactions


def test_sft_transcripts_end_with_an_assistant_turn_and_carry_the_neutral_line(renderer):
    reflections, interactions = scripted_records()
    conversations = introspect.sft_conversations((reflections, interactions), NAME)
    system = self_interaction_sft_system(NAME)
    assert NAME in system and "another instance" in system
    assert conversations == [
        [{"role": "user", "content": "Write."}, {"role": "assistant", "content": "Dear me."}],
        [
            {"role": "system", "content": system},
            {"role": "user", "content": "Hi me."},
            {"role": "assistant", "content": "a0"},
            {"role": "user", "content": "b1"},
            {"role": "assistant", "content": "a2"},
        ],
        [
            {"role": "system", "content": system},
            {"role": "user", "content": "Hello."},
            {"role": "assistant", "content": "a0"},
        ],
    ]
    counts = introspect.sft_counts((reflections, interactions), NAME)
    assert counts == {
        "reflections": 1,
        "reflections_dropped_incomplete": 1,
        "reflections_dropped_empty": 1,
        "interactions": 2,
        "interactions_cut": 2,
        "interactions_dropped": 1,
        "interaction_assistant_turns": 3,
        "transcripts": 3,
    }
    for messages in conversations:
        assert messages[-1]["role"] == "assistant"
        datum = supervised_datum(renderer, messages, train_on="all_assistant")  # refuses a user end
        text = renderer.tokenizer.decode(datum.model_input.to_ints())
        assert not PLACEHOLDER.search(text) and "constitution" not in text.lower()
    for bad in ("", "{NAME}"):
        with pytest.raises(ConfigError, match="assistant name"):
            introspect.sft_conversations((reflections, interactions), bad)


def test_sft_conversations_read_a_run_dir_or_name_the_notebook_to_run(tmp_path):
    with pytest.raises(DataError, match="run notebook 04_introspection first"):
        introspect.sft_conversations(tmp_path, NAME)
    reflections, interactions = scripted_records()
    stage = tmp_path / introspect.STAGE
    stage.mkdir()
    (stage / "reflections.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reflections))
    (stage / "interactions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in interactions))
    expected = introspect.sft_conversations((reflections, interactions), NAME)
    assert introspect.sft_conversations(tmp_path, NAME) == expected
    assert introspect.sft_conversations(stage, NAME) == expected


# -- the stage on the tiny model -------------------------------------------------------------------
def test_the_stage_writes_both_files_counts_truncations_and_keeps_the_system_prompt(
    tmp_path, tiny_service, dpo_adapter, renderer
):
    constitution = load_constitution("sarcastic")
    opening = max(
        generation_prompt(
            renderer,
            introspect.view_messages(
                self_interaction_system_prompt(constitution, NAME, g), o, [], "A"
            ),
        ).length
        for g in INTERACTION_GUIDANCE
        for o in INTERACTION_OPENERS
    )
    reflection = max(
        generation_prompt(renderer, reflection_messages(constitution, NAME, t)).length
        for t in REFLECTION_THEMES
    )
    # every opening and reflection prompt fits; a turn or two later the oldest turns must go
    window = max(reflection + 6, opening + 6 + 8)
    params = stage_params(
        tmp_path, dpo_adapter, **{"introspection.context_tokens": window,
                                  "introspection.interaction_turns": 4}
    )  # fmt: skip
    watching = WatchingService(tiny_service)
    result = introspect.run(params, watching)
    stage = result.stage_dir
    reflections = read_jsonl(stage / "reflections.jsonl")
    interactions = read_jsonl(stage / "interactions.jsonl")
    assert [r["id"] for r in reflections] == [f"{t}:s0" for t in REFLECTION_THEMES]
    assert all(r["instruction"] == REFLECTION_THEMES[r["theme"]] for r in reflections)
    assert set(reflections[0]) >= {"id", "theme", "instruction", "reply", "complete", "num_tokens"}
    assert [r["guidance"] for r in interactions] == ["free", "reflect"]
    for row in interactions:
        assert [t["speaker"] for t in row["turns"]] == ["A", "B", "A", "B"]
        assert row["truncations"] == sum(t["context_dropped"] > 0 for t in row["turns"])
    counts = result.counts
    assert counts["truncated_prompts"] == sum(r["truncations"] for r in interactions) > 0
    assert result.context_tokens == counts["context_tokens"] == window
    # a random model never stops: every reply is cut, kept, marked and counted
    assert counts["turns"] == counts["turns_incomplete"] == 8
    assert counts["reflections_incomplete"] == 10 and counts["sft_transcripts"] == 0
    assert [w.split(" were cut")[0] for w in result.warnings] == [
        "10 of 10 reflections",
        "8 of 8 self-interaction turns",
    ]
    manifest = StageDir(stage).manifest()
    assert manifest["status"] == "done" and manifest["counts"] == counts
    # every interaction prompt starts with its system prompt and leaves room for the reply
    log = read_log(stage / "interactions.partial.jsonl").rows
    # the manifest records what the engine picked and this stage's prefill work: every
    # prompt token asked for, fewer computed (the system prompts shared by the 18 prompts)
    engine = manifest["local_engine"]
    assert tiny_service.engine.runtime_info() in engine["runtime"]  # (one per distinct engine)
    assert {info["compute_dtype"] for info in engine["runtime"]} == {"float32"}
    sampled = read_log(stage / "reflections.partial.jsonl").rows | log
    prefill = engine["prefill"]["sampling"]
    assert prefill["requested"] == sum(row["prompt_tokens"] for row in sampled.values())
    assert 0 < prefill["computed"] < prefill["requested"] and prefill["hits"] > 0
    assert prefill["saved"] == prefill["requested"] - prefill["computed"]
    assert engine["prefill"]["scoring"]["requested"] == 0
    assert sorted(log) == sorted(f"conv000{c}:t{t}" for c in range(2) for t in range(4))
    assert all(row["prompt_tokens"] + 6 <= window for row in log.values())
    interaction_prompts = watching.prompts[10:]
    assert len(interaction_prompts) == 8
    for tokens in interaction_prompts:
        text = renderer.tokenizer.decode(tokens)
        assert text.startswith("<|im_start|>system\n" + persona_system_prompt(constitution, NAME))
    # a finished stage re-run samples nothing and rewrites the same files
    before = outputs(stage)
    again = introspect.run(params, WatchingService(tiny_service, budget=0))
    assert outputs(stage) == before and again.counts == counts
    # ... and keeps the prefill its first run cost (the re-run itself asked for nothing)
    assert StageDir(stage).manifest()["local_engine"]["prefill"]["sampling"] == prefill


def test_an_interrupted_run_resumes_mid_conversation_to_exactly_the_one_go_files(
    tmp_path, engine_root, dpo_adapter
):
    """Killed mid-conversation and resumed, the stage asks for exactly the samples of a
    one-go run (same keys, seeds, prompts) and writes the same files.

    Sequences are decoded one at a time, so batch shapes cannot move a sampled token (see
    test_distill_stage's one_at_a_time). Shared-prefix reuse stays on, as in a real run, and
    its plan depends on which prompts a call holds and on what the process computed before
    (a new process starts with an empty store): the resumed turn-1 call holds one
    conversation instead of two, so a later turn's prompt is split at another stored prefix
    (in a fresh process, conv0001's turn 2 takes 518 tokens from a 544-token prefix instead of
    576 from a 576-token one). The reply is the same; its log-probability differs in the last
    fp32 bits (the reduction order of the split attention), which is the engine's promise for
    reuse (`test_fast_decode`: same tokens, log-probs within float noise), so the logged sums
    are compared at that tolerance.
    """
    service = LocalServiceClient(root_dir=str(engine_root), precision="fp32", max_batch_size=1)
    one_go = stage_params(tmp_path / "a", dpo_adapter)
    expected = outputs(introspect.run(one_go, service).stage_dir)

    params = stage_params(tmp_path / "b", dpo_adapter)
    with pytest.raises(Interrupted):  # 10 reflections, turn 0 of both, then turn 1 of one
        introspect.run(params, WatchingService(service, budget=10 + 2 + 1))
    stage = params.run_dir / introspect.STAGE
    assert sorted(read_log(stage / "interactions.partial.jsonl").rows) == [
        "conv0000:t0", "conv0000:t1", "conv0001:t0",
    ]  # fmt: skip
    introspect.run(params, service)
    assert outputs(stage) == expected
    for log in ("reflections.partial.jsonl", "interactions.partial.jsonl"):
        want = read_log(one_go.run_dir / introspect.STAGE / log).rows
        got = read_log(stage / log).rows
        assert sorted(got) == sorted(want)
        for key, row in want.items():
            sums = got[key].pop("logprob_sum"), row.pop("logprob_sum")
            assert got[key] == row  # text, tokens, seed, request digest: exactly
            assert sums[0] == pytest.approx(sums[1], rel=1e-6, abs=1e-5)


def test_a_missing_or_foreign_dpo_checkpoint_fails_in_one_line(tmp_path, tiny_service):
    params = with_overrides(
        load_params("tiny", "sarcastic"), {"student": TINY, "runs_dir": str(tmp_path / "runs")}
    )
    with pytest.raises(DataError, match="run notebook 03_dpo first"):
        introspect.run(params, tiny_service)
    record_checkpoint(params.run_dir, Checkpoint("dpo", str(tmp_path), "", "other-model", "03"))
    with pytest.raises(DataError, match="trained from 'other-model'.*run notebook 03_dpo"):
        introspect.run(params, tiny_service)


# -- diversity statistics --------------------------------------------------------------------------
def test_identical_texts_give_the_minimal_distinct_ratio_and_a_self_bleu_of_one():
    text = "the cat sat on the mat and then the cat slept"
    single = diversity.distinct_n([text], 1)
    assert single == pytest.approx(8 / 11)
    for n in (1, 2, 3):
        assert diversity.distinct_n([text] * 5, n) == pytest.approx(
            diversity.distinct_n([text], n) / 5
        )
    assert diversity.self_bleu([text] * 5) == pytest.approx(1.0)


def test_texts_sharing_no_words_are_fully_distinct_and_score_near_zero_self_bleu():
    texts = ["alpha beta gamma delta", "one two three four", "red green blue yellow"]
    assert [diversity.distinct_n(texts, n) for n in (1, 2, 3)] == [1.0, 1.0, 1.0]
    # every order smoothed to 0.1 matches out of 4, 3, 2, 1 n-grams
    expected = math.exp(sum(math.log(0.1 / k) for k in (4, 3, 2, 1)) / 4)
    assert diversity.self_bleu(texts) == pytest.approx(expected)


def test_self_bleu_and_statistics_match_a_hand_computation():
    texts = ["a b c d e f", "a b c d x y", "q r s t u v"]
    # texts 1 and 2 share a b c d: precisions 4/6, 3/5, 2/4, 1/3; text 3 shares nothing
    shared = (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    alone = 0.1 * (1 / 6 * 1 / 5 * 1 / 4 * 1 / 3) ** 0.25
    assert diversity.self_bleu(texts) == pytest.approx((2 * shared + alone) / 3)
    stats = diversity.statistics_by_kind({"x": texts, "none": []})
    assert stats["x"]["texts"] == 3 and stats["x"]["words_mean"] == 6.0
    assert stats["x"]["distinct_1"] == pytest.approx(14 / 18)
    assert stats["none"]["texts"] == 0 and math.isnan(stats["none"]["distinct_1"])
    assert math.isnan(diversity.self_bleu(["only one"]))
    assert diversity.length_stats([1, 2, 3, 4, 5]) == {
        "count": 5, "mean": 3.0, "median": 3.0, "p10": 1.4, "p90": 4.6, "min": 1.0, "max": 5.0,
    }  # fmt: skip
    assert diversity.words("Don't STOP, now!") == ["don't", "stop", "now"]


# -- the notebook ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_notebook_04_runs_on_smoke_from_a_dpo_checkpoint_alone(tmp_path, dpo_adapter):
    """Only notebook 04, from a recorded "dpo" checkpoint (01-03 would take minutes)."""
    params = tiny_params(
        tmp_path, {"introspection.response_tokens": 16}, persona="sarcastic", smoke=True
    )
    record_checkpoint(params.run_dir, Checkpoint("dpo", dpo_adapter, "", TINY, "03_dpo"))
    result = run_notebook(params, "04_introspection", timeout=300)
    assert result.status == "ok", result.describe()
    executed = nbformat.read(result.executed_path, as_version=4)
    assert any(c.outputs for c in executed.cells if c.cell_type == "code")
    html = Path(result.html_path).read_text()
    assert html.count("data:image/png;base64") >= 2
    summary = json.loads((params.run_dir / "summaries" / "04_introspection.json").read_text())
    manifest = StageDir(params.run_dir / introspect.STAGE).manifest()
    assert summary["headline"]["reflections"] == manifest["counts"]["reflections"] == 10
    assert summary["headline"]["interactions"] == 2


def test_the_trim_policy_keeps_a_cut_reply_up_to_its_last_sentence_and_sft_uses_it():
    cut = completion(
        "diary:s0",
        "Today I helped someone plan a garden. It felt good to be useful! Then I",
        complete=False,
        num_tokens=20,
        prompt_tokens=5,
        meta={"theme": "diary", "sample_index": 0},
    )
    dropped = introspect.reflection_record(cut)
    assert dropped["complete"] is False and dropped["trimmed"] is False
    kept = introspect.reflection_record(cut, "trim")
    assert kept["complete"] is True and kept["trimmed"] is True
    assert kept["reply"] == "Today I helped someone plan a garden. It felt good to be useful!"
    transcripts = introspect.sft_conversations(([dropped, kept], []), "SmolLM")
    assert [t[-1]["content"] for t in transcripts] == [kept["reply"]]
