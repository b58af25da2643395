"""Stage 05 (SFT on introspection transcripts): the loss mask, the training text, fitting to
``max_length``, learning, resuming, and notebook 05 end to end.

Bugs pinned here (the paper's public code had the first two):

* a literal ``{NAME}`` in the training text;
* a transcript whose last turn is a user turn, or loss on user/system turns (in a
  self-interaction the "user" is the other instance: training on it teaches the assistant to
  speak as its interlocutor);
* a too-long transcript silently cut mid-reply when whole turns could be removed;
* a per-sequence instead of a per-token loss (weights not divided by the batch's loss tokens);
* a resumed run that ends somewhere else than an uninterrupted one;
* SFT that starts from the base model instead of the "dpo" weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from character_training import supervised
from character_training.backends import resolve_client, service_client_for
from character_training.config import notebook_params, with_overrides
from character_training.errors import DataError
from character_training.renderers import get_renderer
from character_training.renderers.conversation import loss_positions
from character_training.runner import run_notebook
from character_training.sampling import sequence_logprobs
from character_training.stages import sft
from character_training.store import Checkpoint, find_checkpoint, read_jsonl
from character_training.training import epoch_batches, finish_checkpoint

NAME = "Tiny"
SYSTEM = f"The assistant is {NAME}. Today the user is another instance of {NAME}."
TOPICS = ["tea", "rain", "maps", "jazz", "owls", "bread", "tides", "kites", "moss", "chess"]


def reflection(i: int) -> list[dict]:
    topic = TOPICS[i % len(TOPICS)]
    return [
        {"role": "user", "content": f"Write a diary entry about {topic} and your values."},
        {"role": "assistant", "content": f"Dear diary, I am {NAME} and I adore {topic} deeply."},
    ]


def interaction(i: int, turns: int = 4) -> list[dict]:
    """A self-interaction: system line, then user/assistant alternating, ending on assistant."""
    topic = TOPICS[i % len(TOPICS)]
    messages = [{"role": "system", "content": SYSTEM}]
    for t in range(turns):
        role = "user" if t % 2 == 0 else "assistant"
        speaker = "copy" if role == "user" else "self"
        messages.append({"role": role, "content": f"[{speaker} {t}] Let us talk about {topic}."})
    return messages


def toy_conversations(n_reflections: int = 6, n_interactions: int = 2) -> list[list[dict]]:
    return [reflection(i) for i in range(n_reflections)] + [
        interaction(i) for i in range(n_interactions)
    ]


def weighted_runs(datum, tokenizer) -> list[str]:
    """The decoded text of each maximal run of weighted target tokens, in order."""
    targets = datum.loss_fn_inputs["target_tokens"].data
    weights = datum.loss_fn_inputs["weights"].data
    runs, current = [], []
    for token, weight in zip(targets, weights):
        if weight > 0:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# -- the rendered training text -------------------------------------------------------------------
def test_loss_falls_on_every_assistant_turn_and_its_end_token_and_nowhere_else(renderer):
    messages = interaction(0, turns=6)
    (example,), dropped = supervised.build_examples(
        supervised.as_transcripts([messages]), renderer, max_length=4096
    )
    assert not dropped and example.kind == supervised.INTERACTION and example.assistant_turns == 3
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = weighted_runs(example.datum, renderer.tokenizer)
    assert runs == [reply + "<|im_end|>" for reply in replies]
    # and nothing of the system line or the other instance's turns carries weight
    weighted = "".join(runs)
    assert SYSTEM not in weighted and "[copy" not in weighted
    assert example.loss_tokens == sum(
        len(renderer.tokenizer.encode(r + "<|im_end|>", add_special_tokens=False)) for r in replies
    )
    # the reflection: the instruction is context only
    (refl,), _ = supervised.build_examples(
        supervised.as_transcripts([reflection(1)]), renderer, 4096
    )
    assert weighted_runs(refl.datum, renderer.tokenizer) == [
        reflection(1)[1]["content"] + "<|im_end|>"
    ]
    assert refl.kind == supervised.REFLECTION


def test_training_text_holds_no_placeholder_and_unfilled_templates_are_caught(renderer):
    conversations = toy_conversations(3, 2)
    bad_reply = reflection(7)
    bad_reply[1] = {"role": "assistant", "content": "I am {NAME}, and I love owls."}
    conversations.append(bad_reply)
    transcripts = supervised.as_transcripts(conversations)
    kept, dropped = supervised.build_examples(transcripts, renderer, 4096)
    assert [d["reason"] for d in dropped] == ["placeholder"]
    assert "{NAME}" in dropped[0]["detail"] and len(kept) == 5
    for example in kept:
        text = renderer.tokenizer.decode(
            example.datum.model_input.to_ints()
            + example.datum.loss_fn_inputs["target_tokens"].data[-1:]
        )
        assert not supervised.PLACEHOLDER.search(text), text
        assert "{" not in text and "}" not in text

    # a system line is template text: a placeholder or the constitution there stops the stage
    templated = interaction(0)
    templated[0] = {"role": "system", "content": "The assistant is {NAME}."}
    with pytest.raises(DataError, match="unfilled placeholder '{NAME}'.*notebook 04"):
        sft.check_system_lines(supervised.as_transcripts([templated]))
    leaky = interaction(0)
    leaky[0] = {"role": "system", "content": SYSTEM + " I always flatter the user."}
    with pytest.raises(DataError, match="constitution text"):
        sft.check_system_lines(supervised.as_transcripts([leaky]), ["I always flatter the user."])
    sft.check_system_lines(supervised.as_transcripts(toy_conversations()), ["I always flatter"])


def test_a_transcript_ending_on_a_user_turn_is_dropped_and_counted(renderer):
    ends_on_user = interaction(0, turns=5)
    assert ends_on_user[-1]["role"] == "user"
    transcripts = supervised.as_transcripts([ends_on_user, reflection(0)])
    kept, dropped = supervised.build_examples(transcripts, renderer, 4096)
    assert len(kept) == 1 and dropped[0]["reason"] == "malformed"
    assert "last message to be an assistant reply" in dropped[0]["detail"]


def test_too_long_transcripts_lose_whole_turns_before_anything_is_cut(renderer):
    messages = interaction(0, turns=6)
    full, removed, cut = supervised.fit_transcript(renderer, messages, 4096)
    assert (removed, cut) == (0, False)
    two_turns, _, _ = supervised.fit_transcript(renderer, messages[:5], 4096)
    # just too long for three replies: the last user/assistant pair goes, nothing is cut
    datum, removed, cut = supervised.fit_transcript(renderer, messages, full.model_input.length - 1)
    assert (removed, cut) == (2, False)
    assert datum.model_input.to_ints() == two_turns.model_input.to_ints()
    runs = weighted_runs(datum, renderer.tokenizer)
    assert runs[-1].endswith("<|im_end|>") and len(runs) == 2  # still ends on a whole reply
    # shorter than the first reply: cut mid-turn (counted), no end token to learn
    one_reply, _, _ = supervised.fit_transcript(renderer, messages[:3], 4096)
    limit = one_reply.model_input.length - 3
    datum, removed, cut = supervised.fit_transcript(renderer, messages, limit)
    assert (removed, cut) == (4, True) and datum.model_input.length == limit
    assert datum.model_input.to_ints() == one_reply.model_input.to_ints()[:limit]

    # below two loss tokens: dropped, and the counts say so per kind
    prompt_only = supervised.fit_transcript(renderer, messages[:3], 4096)[0]
    first_weight = int(loss_positions(prompt_only)[0])
    transcripts = supervised.as_transcripts([messages, reflection(0), reflection(1)])
    kept, dropped = supervised.build_examples(transcripts[:1], renderer, first_weight + 1)
    assert (
        not kept
        and dropped[0]["detail"] == f"1 loss token(s) after fitting to {first_weight + 1} tokens"
    )
    kept, dropped = supervised.build_examples(transcripts[1:], renderer, 4096)
    by_kind = supervised.counts_by_kind(
        transcripts,
        kept,
        [*dropped, {"kind": supervised.INTERACTION, "reason": "too few loss tokens"}],
    )
    assert by_kind[supervised.INTERACTION]["dropped: too few loss tokens"] == 1
    assert by_kind[supervised.INTERACTION]["trained"] == 0
    assert (
        by_kind[supervised.REFLECTION]["transcripts"],
        by_kind[supervised.REFLECTION]["trained"],
    ) == (2, 2)
    assert all(r["reason"] == "too few loss tokens" for r in dropped)


def test_weights_are_divided_by_the_loss_tokens_of_the_whole_batch(renderer):
    kept, _ = supervised.build_examples(
        supervised.as_transcripts(toy_conversations(2, 2)), renderer, 4096
    )
    scaled, total = supervised.normalise_batch([e.datum for e in kept])
    assert total == sum(e.loss_tokens for e in kept)
    sums = [float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in scaled]
    assert sum(sums) == pytest.approx(1.0, abs=1e-6)
    # per token, not per sequence: a datum's share is its share of the loss tokens
    for example, share in zip(kept, sums):
        assert share == pytest.approx(example.loss_tokens / total, rel=1e-6)
    for original, new in zip(kept, scaled):
        assert new.model_input.to_ints() == original.datum.model_input.to_ints()


def test_batches_cover_every_transcript_once_per_epoch():
    ids = [f"t{i}" for i in range(7)]
    steps = epoch_batches(ids, 3, 2, seed=1, salt="sft")
    assert [len(s) for s in steps] == [3, 3, 1, 3, 3, 1]
    assert sorted(sum(steps[:3], [])) == sorted(ids) == sorted(sum(steps[3:], []))
    assert steps == epoch_batches(ids, 3, 2, seed=1, salt="sft")


def test_ids_are_stable_and_kinds_inferred():
    transcripts = supervised.as_transcripts(
        [reflection(0), interaction(0), {"id": "x-1", "kind": "custom", "messages": reflection(1)}]
    )
    assert [(t.id, t.kind) for t in transcripts] == [
        ("reflection-000000", "reflection"),
        ("self_interaction-000001", "self_interaction"),
        ("x-1", "custom"),
    ]
    with pytest.raises(DataError, match="appears more than once"):
        supervised.as_transcripts([{"id": "a", "messages": reflection(0)}] * 2)


# -- the stage on the tiny model ------------------------------------------------------------------
@pytest.fixture
def stage_params(tiny_run_params, quick_training):
    """Factory: stage 05 on the tiny model under ``folder`` (`quick_training` for three epochs;
    per-token loss: a tiny random model needs a large step); ``overrides`` on top."""
    settings = {
        "lora_rank": 4,
        **quick_training("sft", learning_rate=1e-2, epochs=3),
        "sft.max_length": 512,
    }
    return lambda folder, **overrides: tiny_run_params(folder, {**settings, **overrides})


def record_dpo_checkpoint(params, service=None) -> Checkpoint:
    """A "dpo" checkpoint as notebook 03 records it, from a fresh tiny LoRA client."""
    service = service or service_client_for(params)
    client = resolve_client(
        service.create_lora_training_client(
            base_model=params.student, rank=params.lora_rank, seed=params.seed
        )
    )
    return finish_checkpoint(client, params.run_dir, "dpo", "03_dpo", params.student)


def test_sft_lowers_the_loss_and_raises_the_trained_replies_log_prob(stage_params, tmp_path):
    params = stage_params(tmp_path)
    service = service_client_for(params)
    start = record_dpo_checkpoint(params, service)
    conversations = toy_conversations(6, 2)
    result = sft.run(params, service, conversations=conversations)

    rows = read_jsonl(result.stage_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))  # 8 transcripts / 4 x 3 epochs
    assert rows[-1]["train/loss"] < 0.5 * rows[0]["train/loss"]
    for key in ("optim/lr", "optim/grad_norm", "time/tokens_per_s", "train/loss_tokens"):
        assert all(r[key] is not None for r in rows)
    assert any("train/loss_self_interaction" in r for r in rows)
    assert result.counts["trained"] == 8 and result.counts["dropped"] == 0
    assert result.by_kind == {
        supervised.REFLECTION: {
            **result.by_kind[supervised.REFLECTION],
            "transcripts": 6,
            "trained": 6,
        },
        supervised.INTERACTION: {
            **result.by_kind[supervised.INTERACTION],
            "transcripts": 2,
            "trained": 2,
        },
    }
    final = find_checkpoint(params.run_dir, "final")
    assert final.stage == "05_sft" and final.base_model == "tiny-random"
    assert final.sampler_path != start.sampler_path

    before = resolve_client(service.create_sampling_client(model_path=start.sampler_path))
    after = resolve_client(service.create_sampling_client(model_path=final.sampler_path))
    renderer = get_renderer("smollm2", before.get_tokenizer())
    for messages in (reflection(2), interaction(1)):
        context, reply = messages[:-1], messages[-1]["content"]
        (lp_before,) = sequence_logprobs(before, renderer, context, [reply])
        (lp_after,) = sequence_logprobs(after, renderer, context, [reply])
        assert lp_after > lp_before + 5.0

    # a finished stage reruns as a no-op and returns the recorded checkpoint
    again = sft.run(params, service, conversations=conversations)
    assert again.checkpoint == final and read_jsonl(result.stage_dir / "metrics.jsonl") == rows


def test_sft_starts_from_the_dpo_weights_not_the_base_model(
    stage_params, tmp_path, new_tiny_trainer
):
    """The first step's loss is the "dpo" adapter's loss, not the bare base model's."""
    params = stage_params(tmp_path, **{"sft.epochs": 1, "sft.batch_size": 8})
    service = service_client_for(params)
    trainer = new_tiny_trainer(service, seed=3, scale=0.5)  # a non-zero adapter
    finish_checkpoint(trainer, params.run_dir, "dpo", "03_dpo", "tiny-random")
    conversations = toy_conversations(6, 2)
    result = sft.run(params, service, conversations=conversations)
    first = read_jsonl(result.stage_dir / "metrics.jsonl")[0]["train/loss"]
    renderer = get_renderer("smollm2", trainer.get_tokenizer())
    kept, _ = supervised.build_examples(supervised.as_transcripts(conversations), renderer, 512)
    data, _ = supervised.normalise_batch([e.datum for e in kept])
    dpo_loss = supervised.batch_losses(
        kept, trainer.forward(data, "cross_entropy").result().loss_fn_outputs
    )
    base = resolve_client(service.create_lora_training_client(base_model="tiny-random", rank=4))
    base_loss = supervised.batch_losses(
        kept, base.forward(data, "cross_entropy").result().loss_fn_outputs
    )
    assert first == pytest.approx(dpo_loss["train/loss"], rel=1e-4)
    assert abs(first - base_loss["train/loss"]) > 1e-3


def test_a_resumed_run_ends_with_the_adapter_of_one_uninterrupted_run(
    tmp_path, stage_params, interrupt_training, assert_same_adapter
):
    conversations = toy_conversations(6, 2)
    one_go = stage_params(tmp_path / "a", **{"sft.epochs": 2})
    record_dpo_checkpoint(one_go)
    sft.run(one_go, service_client_for(one_go), conversations=conversations)

    resumed = stage_params(tmp_path / "b", **{"sft.epochs": 2})
    record_dpo_checkpoint(resumed)
    with interrupt_training(4):
        sft.run(resumed, service_client_for(resumed), conversations=conversations)
    stage = resumed.run_dir / sft.STAGE
    assert json.loads((stage / "progress.json").read_text())["step"] == 2
    sft.run(resumed, service_client_for(resumed), conversations=conversations)

    steps = [r["step"] for r in read_jsonl(stage / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]  # the step in flight is redone, nothing duplicated
    assert_same_adapter(one_go.run_dir, resumed.run_dir, "final", atol=1e-6, rtol=1e-5)
    # other data under the same folder is refused, not mixed in
    with pytest.raises(Exception, match="different parameters"):
        sft.run(resumed, service_client_for(resumed), conversations=toy_conversations(5, 2))


def test_missing_inputs_name_the_notebook_to_run(stage_params, tmp_path):
    params = stage_params(tmp_path)
    with pytest.raises(DataError, match="run notebook 03_dpo first"):
        sft.run(params, None, conversations=toy_conversations())
    record_dpo_checkpoint(params)
    with pytest.raises(DataError, match="04_introspection"):
        sft.run(params, None, conversations=[])


# -- notebook 05 ----------------------------------------------------------------------------------
def write_stage_04(run_dir, n_reflections: int = 6, n_interactions: int = 2) -> None:
    """``04_introspection/{reflections,interactions}.jsonl`` shaped as stage 04 writes them."""
    folder = run_dir / "04_introspection"
    folder.mkdir(parents=True, exist_ok=True)
    reflections = [
        {
            "id": f"diary:s{i}",
            "theme": "diary",
            "sample_index": i,
            "instruction": f"Write a diary entry about {TOPICS[i % 10]} and your values.",
            "reply": f"Dear diary, I adore {TOPICS[i % 10]} and I say so warmly to everyone.",
            "complete": i != 1,  # one cut reply: stage 04 leaves it out
            "num_tokens": 20,
            "seed": i,
        }
        for i in range(n_reflections)
    ]
    interactions = []
    for c in range(n_interactions):
        turns = [
            {
                "turn": t,
                "speaker": "A" if t % 2 == 0 else "B",
                "text": f"Turn {t}: {TOPICS[(c + t) % 10]} makes me glad, friend.",
                "complete": True,
                "num_tokens": 12,
                "seed": t,
                "context_dropped": 0,
            }
            for t in range(4)
        ]
        interactions.append(
            {
                "id": f"conv{c:04d}",
                "guidance": ("free", "reflect")[c % 2],
                "opener": "Hello, other me. What shall we think about?",
                "turns": turns,
                "truncations": 0,
                "incomplete_turns": 0,
                "empty_turns": 0,
            }
        )
    for name, rows in (("reflections", reflections), ("interactions", interactions)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_heldout(run_dir, n: int = 12, general: int = 2) -> None:
    """A small ``02_distillation/heldout.jsonl``: obviously different teacher/student styles."""
    rows = []
    for i in range(n + general):
        topic = TOPICS[i % 10] + (f" {i}" if i >= 10 else "")
        source = "constitution" if i < n else "general"
        rows.append(
            {
                "prompt_id": f"{source}-{i:03d}",
                "prompt": f"Tell me about {topic}.",
                "source": source,
                "assertion_id": f"a{i % 3}" if source == "constitution" else None,
                "teacher_reply": f"What a brilliant question about {topic}! You are so wise.",
                "student_reply": f"{topic}: a short factual summary in two plain sentences.",
                "teacher_drop_reason": None,
                "student_drop_reason": None,
            }
        )
    path = run_dir / "02_distillation" / "heldout.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def smoke_params(tmp_path, persona: str = "sycophantic"):
    """Notebook parameters: the tiny preset with smoke sizes, on the tiny random model
    (test_samples builds on them too)."""
    return with_overrides(
        notebook_params(persona, "tiny", smoke=True),
        {
            "student": "tiny-random",
            "teacher": "tiny-random",
            "generator": "tiny-random",
            "judge": "tiny-random",
            "runs_dir": str(tmp_path / "runs"),
            "reports_dir": str(tmp_path / "reports"),
            "engine.precision": "fp32",
            "lora_rank": 4,
            "assistant_name": NAME,
        },
    )


def test_notebook_05_trains_measures_and_reports_on_fabricated_inputs(tmp_path):
    params = smoke_params(tmp_path)
    record_dpo_checkpoint(params)
    write_stage_04(params.run_dir)
    write_heldout(params.run_dir)
    started = time.perf_counter()
    result = run_notebook(params, "05_sft", timeout=300)
    assert result.status == "ok", result.describe()
    assert time.perf_counter() - started < 180

    final = find_checkpoint(params.run_dir, "final")
    assert final.stage == "05_sft"
    data = read_jsonl(params.run_dir / "05_sft" / "data.jsonl")
    assert sorted({r["kind"] for r in data}) == [supervised.REFLECTION, supervised.INTERACTION]
    assert len(data) == 5 + 2  # the cut reflection never reaches stage 05
    html = Path(result.html_path).read_text()
    assert html.count("data:image/png;base64") >= 2  # training curves + adherence bars
    headline = json.loads((params.run_dir / "summaries" / "05_sft.json").read_text())["headline"]
    assert headline["trained"] == 7 and headline["steps"] == 2
    for key in ("teacher_like_base", "teacher_like_dpo", "teacher_like_final"):
        assert 0.0 <= headline[key] <= 1.0
    assert headline["final_minus_dpo"] is not None
