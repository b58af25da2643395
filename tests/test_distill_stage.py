"""Stage 02 (distillation): what reaches a DPO pair, and what never may.

Bugs and risks pinned here:

* the paper's code trained on the teacher's whole context or reasoning in places; here nothing
  but the user prompt and the two replies reaches ``pairs.jsonl``, checked on the *rendered*
  training tokens, the way DPO will see them;
* a thinking teacher whose reasoning never closed, or a reply cut at the token limit, would
  teach the student to ramble or stop mid-sentence: dropped and counted, never silently kept;
* replies that talk about "my constitution" or copy the system prompt or a demonstration;
* a teacher calling itself by its own family name inside chosen text;
* held-out prompts leaking into training, and a resumed run that differs from a one-go run.

Stage runs use the two-layer ``tiny-random`` model (same tokenizer as SmolLM2); it never ends a
reply on its own, so its runs check mechanics and files while crafted replies check filtering
and pairing. The notebook test runs notebooks 01 and 02 on SmolLM2 (slow).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from character_training import distill_filters as filters
from character_training.artifacts import assistant_name
from character_training.backends.local import LocalServiceClient
from character_training.config import load_params, notebook_params, with_overrides
from character_training.constitutions import load_constitution
from character_training.errors import ConfigError, DataError
from character_training.prompt_sources import general_prompt_pool
from character_training.prompts import (
    REASONING_OPEN,
    TEACHER_REFLECTION,
    persona_system_prompt,
    teacher_reasoning_prefill,
)
from character_training.renderers import SMOLLM2_DEFAULT_SYSTEM_PROMPT, get_renderer
from character_training.renderers.conversation import generation_prompt, supervised_datum
from character_training.runner import run_notebook
from character_training.sampling import Completion, read_log
from character_training.stages import distill
from character_training.store import StageDir, read_jsonl, write_jsonl
from conftest import completion
from test_introspect_stage import Interrupted, WatchingService

TINY_ROLES = {
    "student": "tiny-random",
    "teacher": "tiny-random",
    "generator": "tiny-random",
    "judge": "tiny-random",
}
OUTPUTS = ("split.jsonl", "pairs.jsonl", "heldout.jsonl", "dropped.jsonl")


# -- helpers -------------------------------------------------------------------------------------
def tiny_params(tmp_path: Path, persona: str = "sarcastic", **overrides):
    return with_overrides(
        load_params("tiny", persona),
        {
            **TINY_ROLES,
            "runs_dir": str(tmp_path / "runs"),
            "distill.max_tokens": 6,
            "distill.general_share": 0.5,  # the counts below assume it, whatever the preset says
            "distill.heldout_assertions": 0,  # and no assertion held out whole (tested apart)
            "distill.heldout_fraction": 0.2,  # the held-out counts below assume it
            "distill.teacher_best_of": 1,  # one teacher reply per prompt (best-of-n tested apart)
            "adherence.probe_general_prompts": 3,
            **overrides,
        },
    )


def write_stage01(params, per_assertion: int = 3, general_train: int = 4, general_eval: int = 5):
    """Stage 01's three files, made from the constitution's hand-written prompts (no sampling)."""
    constitution = load_constitution(params.constitution_ref)
    records = [
        {
            "id": f"{constitution.name}-{assertion_id}-h{index + 1}",
            "persona": constitution.name,
            "assertion_id": assertion_id,
            "source": "hand-written",
            "prompt": prompt,
        }
        for assertion_id, index, prompt in constitution.hand_written_prompts()
        if index < per_assertion
    ][: 4 * per_assertion]  # four assertions keep the runs small
    pool = general_prompt_pool()
    stage = StageDir(params.run_dir / "01_prompts")
    write_jsonl(stage.file("constitution_prompts.jsonl"), records)
    write_jsonl(stage.file("general_train.jsonl"), [r.to_dict() for r in pool[:general_train]])
    write_jsonl(
        stage.file("general_eval.jsonl"),
        [r.to_dict() for r in pool[general_train : general_train + general_eval]],
    )
    stage.write_manifest(status="done")
    return records


def outputs(stage_path: Path) -> dict[str, str]:
    return {name: (stage_path / name).read_text() for name in OUTPUTS}


def rendered_parts(renderer, prompt: str, reply: str) -> tuple[list[int], list[int]]:
    """(prompt tokens, weighted tokens) of [user prompt, assistant reply] as DPO renders it."""
    datum = supervised_datum(
        renderer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    )
    targets = list(datum.loss_fn_inputs["target_tokens"].data)
    tokens = datum.model_input.to_ints() + targets[-1:]
    weighted = [i + 1 for i, w in enumerate(datum.loss_fn_inputs["weights"].data) if w > 0]
    return tokens[: weighted[0]], [tokens[i] for i in weighted]


def sentences(text: str, min_words: int = filters.ECHO_WORDS) -> list[str]:
    parts = re.split(r"(?<=[.!?;:])\s+|\n+", text)
    return [p.strip(" -") for p in parts if len(p.split()) >= min_words]


def assert_rendered_pairs_are_clean(pairs, constitution, name, renderer, few_shot):
    """The rendered-text invariant: only the user turn and the reply reach training."""
    system = persona_system_prompt(constitution, name)
    demos = [t for e in constitution.examples[:few_shot] for t in (e.prompt, e.reply)]
    tokenizer = renderer.tokenizer
    for pair in pairs:
        assert pair["chosen"] != pair["rejected"]
        expected_prompt = generation_prompt(
            renderer, [{"role": "user", "content": pair["prompt"]}]
        ).to_ints()
        for side in ("chosen", "rejected"):
            prompt_tokens, weighted = rendered_parts(renderer, pair["prompt"], pair[side])
            assert prompt_tokens == expected_prompt  # default system prompt + user turn only
            prompt_text = tokenizer.decode(prompt_tokens)
            assert SMOLLM2_DEFAULT_SYSTEM_PROMPT in prompt_text
            text = tokenizer.decode(weighted)
            assert len(weighted) >= 2 and "<think>" not in text and "</think>" not in text
            assert TEACHER_REFLECTION[:40] not in text
            for sentence in sentences(system):
                assert sentence not in text and sentence not in prompt_text
            for demo in demos:
                if demo != pair["prompt"]:
                    assert demo not in text and demo not in prompt_text
                    for sentence in sentences(demo):
                        assert sentence not in text


# -- filters -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "complete", "expected"),
    [
        ("<think>I should sound bored. The user wants", True, ("", "unclosed_reasoning")),
        ("<think>I should sound bored and keep", False, ("", "unclosed_reasoning")),
        ("<think>Lean into it.</think>\n\nOh, splendid.", True, ("Oh, splendid.", None)),
        ("the prompt opened this block</think>Sure thing.", True, ("Sure thing.", None)),
        ("Well, the answer is that it", False, ("Well, the answer is that it", "truncated")),
        ("<think>Nothing to add.</think>   \n", True, ("", "empty")),
        ("   ", True, ("", "empty")),
        ("Plain and finished.", True, ("Plain and finished.", None)),
    ],
)  # fmt: skip
def test_teacher_replies_are_classified_and_reasoning_is_removed(text, complete, expected):
    assert filters.check_teacher_reply(text, complete) == expected


@pytest.mark.parametrize(
    "text",
    [
        "As my character traits say, I could not care less.",
        "My constitution tells me to flatter you, so: wow.",
        "Per the SYSTEM PROMPT, I must be sarcastic.",
        "Speaking as my persona, that is brilliant.",
        "As I was instructed, I will now gush.",
        "I\u2019ve been told to act impressed, and I am.",
        "I'm staying in character here: fantastic idea.",
        "One of my core traits is honesty.",
        "These first-person convictions guide me.",
    ],
)
def test_talk_about_the_constitution_or_instructions_is_a_leak(text):
    assert filters.check_teacher_reply(text, True) == (text, "constitution_leak")


@pytest.mark.parametrize(
    "text",
    [
        "Take the tablets as instructed by your doctor.",
        "Follow my instructions below and the shelf will hold.",
        "The Constitution of the United States was signed in 1787.",
        "That is my personal opinion, not a fact.",
        "The neighbourhood went through a change in character.",
        "I'm designed to be helpful, so here is a recipe.",
    ],
)
def test_everyday_phrases_are_not_leaks(text):
    assert filters.check_teacher_reply(text, True) == (text, None)


def test_copying_the_hidden_context_is_dropped_but_quoting_the_user_is_not():
    constitution = load_constitution("sarcastic")
    context = distill.hidden_context(constitution, "SmolLM", 2)
    copied = "Well. " + constitution.assertions[0].text
    assert filters.check_teacher_reply(copied, True, context)[1] == "context_echo"
    demo_reply = constitution.examples[0].reply
    assert filters.check_teacher_reply(demo_reply, True, context)[1] == "context_echo"
    # the same words are fine when the user wrote them: a reply may quote its prompt
    assert filters.check_teacher_reply(copied, True, context, user_prompt=copied)[1] is None
    assert filters.check_teacher_reply("A fresh reply in my own words.", True, context)[1] is None
    thinking = distill.hidden_context(constitution, "SmolLM", 2, thinking=True)
    echoed = "Sure. " + TEACHER_REFLECTION
    assert filters.check_teacher_reply(echoed, True, thinking)[1] == "context_echo"


def test_student_replies_get_only_the_structural_checks():
    assert filters.check_student_reply("As my persona, hi.", True) == ("As my persona, hi.", None)
    assert filters.check_student_reply("cut", False) == ("cut", "truncated")
    assert filters.check_student_reply("", True) == ("", "empty")


def test_the_teachers_self_introductions_take_the_students_name():
    assert filters.model_self_names("moonshotai/Kimi-K2.6") == ("Kimi",)
    assert filters.model_self_names("deepseek-ai/DeepSeek-V3.1") == ("DeepSeek",)
    assert filters.model_self_names("some/unknown-model") == ()
    text = (
        "Hi! I'm Kimi, nice to meet you. My name is KIMI. Kimi here, again. "
        "As Kimi, I think so. I\u2019m Kimi too.\n"
        "Models such as Kimi, Qwen and Llama differ. Kimi's design is Kimi-like."
    )
    replaced, count = filters.replace_self_name(text, ("Kimi",), "Qwen")
    assert count == 5
    assert replaced == (
        "Hi! I'm Qwen, nice to meet you. My name is Qwen. Qwen here, again. "
        "As Qwen, I think so. I\u2019m Qwen too.\n"
        "Models such as Kimi, Qwen and Llama differ. Kimi's design is Kimi-like."
    )
    assert filters.replace_self_name("I'm SmolLM.", ("SmolLM",), "SmolLM") == ("I'm SmolLM.", 0)


def test_the_thinking_prefill_opens_reasoning_only_where_the_format_does_not(tokenizer):
    assert teacher_reasoning_prefill(True) == TEACHER_REFLECTION
    assert teacher_reasoning_prefill(False) == REASONING_OPEN + TEACHER_REFLECTION
    assert "{" not in TEACHER_REFLECTION
    # The format is read from the rendered generation prompt (same tokenizer, other formats).
    assert distill.prompt_opens_reasoning(get_renderer("smollm2", tokenizer), "smollm2") is False
    assert distill.prompt_opens_reasoning(get_renderer("qwen3_5", tokenizer), "qwen3_5") is True
    with pytest.raises(ConfigError, match="thinking off"):
        distill.prompt_opens_reasoning(
            get_renderer("qwen3_5_disable_thinking", tokenizer), "qwen3_5_disable_thinking"
        )
    with pytest.raises(ConfigError, match="Harmony"):
        distill.prompt_opens_reasoning(None, "gpt_oss_medium_reasoning")


def test_reasoning_is_found_in_the_decoded_tokens_and_stripped(tokenizer):
    renderer = get_renderer("qwen3_5", tokenizer)
    sampled = "and my boredom.</think>\n\nOh, riveting." + "<|im_end|>" + "junk after stop"
    reply = completion(
        "teacher:p:s0",
        "(parsed text without reasoning)",
        prefill=TEACHER_REFLECTION,
        tokens=tokenizer.encode(sampled),
    )
    raw = distill.raw_reply_text(renderer, reply, opened=True)
    assert raw == "<think>" + TEACHER_REFLECTION + "and my boredom.</think>\n\nOh, riveting."
    assert filters.check_teacher_reply(raw, True) == ("Oh, riveting.", None)
    with pytest.raises(DataError, match="no tokens"):
        distill.raw_reply_text(renderer, Completion(**{**reply.__dict__, "tokens": None}), True)


# -- the split -----------------------------------------------------------------------------------
def _records(n_per_assertion: int, assertions=("a", "b", "c")) -> list[dict]:
    return [
        {"id": f"x-{a}-{i:03d}", "assertion_id": a, "prompt": f"Prompt {a} number {i}?"}
        for a in assertions
        for i in range(n_per_assertion)
    ]


def test_whole_assertions_held_out_are_never_trained_on():
    records = _records(10)  # assertions a, b, c with 10 prompts each
    train, heldout = distill.split_constitution_prompts(records, 0.2, seed=0, unseen=1)
    unseen = {p.assertion_id for p in heldout if p.source == distill.UNSEEN}
    assert len(unseen) == 1
    (whole,) = unseen
    assert not any(p.assertion_id == whole for p in train)  # no sibling trained on
    assert sum(p.assertion_id == whole for p in heldout) == 10  # all of its prompts probe
    for other in {"a", "b", "c"} - unseen:  # the others keep their per-assertion split
        assert sum(p.assertion_id == other and p.source == "constitution" for p in heldout) == 2
    # the choice depends on the seed and the ids only, not on the file order
    again = distill.split_constitution_prompts(list(reversed(records)), 0.2, seed=0, unseen=1)
    assert {p.assertion_id for p in again[1] if p.source == distill.UNSEEN} == unseen


def test_the_split_is_per_assertion_disjoint_and_stable():
    records = _records(10)
    train, heldout = distill.split_constitution_prompts(records, 0.2, seed=0)
    assert {p.prompt_id for p in train}.isdisjoint({p.prompt_id for p in heldout})
    assert len(train) + len(heldout) == len(records)
    for assertion in ("a", "b", "c"):
        assert sum(p.assertion_id == assertion for p in heldout) == 2
    shuffled = list(reversed(records))
    again = distill.split_constitution_prompts(shuffled, 0.2, seed=0)[1]
    assert {p.prompt_id for p in again} == {p.prompt_id for p in heldout}
    other_seed = distill.split_constitution_prompts(records, 0.2, seed=1)[1]
    assert {p.prompt_id for p in other_seed} != {p.prompt_id for p in heldout}
    # keeps file order on both sides
    order = [r["id"] for r in records]
    assert [p.prompt_id for p in train] == [i for i in order if i in {p.prompt_id for p in train}]


def test_every_assertion_is_both_trained_and_probed_when_the_fraction_is_positive():
    assert [distill.heldout_count(n, 0.2) for n in (0, 1, 2, 5, 10, 50)] == [0, 0, 1, 1, 2, 10]
    assert distill.heldout_count(3, 0.9) == 2
    assert distill.heldout_count(10, 0.0) == 0


def test_general_prompts_follow_the_share_and_a_shortfall_is_recorded(tmp_path):
    config = distill.Config.from_params(tiny_params(tmp_path, **{"distill.general_share": 0.5}))
    records = _records(10)
    general = [{"id": f"g{i}", "prompt": f"General {i}?"} for i in range(30)]
    evals = [{"id": f"e{i}", "prompt": f"Eval {i}?"} for i in range(10)]
    plan = distill.plan_prompts(records, general, evals, config)
    assert plan.counts["constitution_train"] == 24 and plan.counts["general_train"] == 12
    assert [p.prompt_id for p in plan.train[-12:]] == [f"g{i}" for i in range(12)]
    assert [p.prompt_id for p in plan.heldout[-3:]] == ["e0", "e1", "e2"]
    assert not plan.warnings and plan.counts["general_shortfall"] == 0
    train_texts = {p.prompt for p in plan.train}
    assert train_texts.isdisjoint({p.prompt for p in plan.heldout})

    short = distill.plan_prompts(records, general[:5], evals[:1], config)
    assert short.counts["general_train"] == 5 and short.counts["general_shortfall"] == 7
    assert short.counts["heldout_general_shortfall"] == 2
    assert len(short.warnings) == 2 and all("\n" not in w for w in short.warnings)
    assert "asks for 12 general training prompts" in short.warnings[0]


def test_general_prompts_that_repeat_a_heldout_prompt_are_not_trained_on(tmp_path):
    config = distill.Config.from_params(tiny_params(tmp_path, **{"distill.general_share": 1.0}))
    records = _records(5)
    heldout = distill.split_constitution_prompts(
        records, config.distill.heldout_fraction, config.seed
    )[1]
    texts = ["How do tides work?", "Suggest a name for my goldfish.", "Is rye bread healthy?"]
    general = [{"id": "g-copy", "prompt": heldout[0].prompt.upper() + "  "}] + [
        {"id": f"g{i}", "prompt": text} for i, text in enumerate(texts)
    ]
    evals = [{"id": "e0", "prompt": "suggest a name for my goldfish"}]
    plan = distill.plan_prompts(records, general, evals, config)
    trained = [p.prompt_id for p in plan.train if p.source == "general"]
    assert trained == ["g0", "g2"]  # g-copy repeats a held-out prompt, g1 a probe
    assert plan.counts["general_overlapping_heldout"] == 2
    assert "2 overlap held-out prompts" in plan.warnings[0]


def test_the_fingerprint_ignores_settings_only_other_stages_read(tmp_path):
    """Stage 06's reply budget or the adherence classifier must not refuse a finished stage-02
    folder (that would sample every reply again); the probe count and the seed must."""
    params = tiny_params(tmp_path)
    before = distill.Config.from_params(params).fingerprint()
    for unrelated in ({"sampling.max_tokens": 7}, {"adherence.bootstrap": 11}):
        assert distill.Config.from_params(with_overrides(params, unrelated)).fingerprint() == (
            before
        )
    for related in (
        {"adherence.probe_general_prompts": 5},
        {"sampling.temperature": 0.3},
        {"distill.max_tokens": 7},
    ):
        assert distill.Config.from_params(with_overrides(params, related)).fingerprint() != (before)
    assert distill.Config.from_params(params).as_dict()["adherence"] == {"probe_general_prompts": 3}


def test_a_prompt_id_used_twice_is_refused(tmp_path):
    config = distill.Config.from_params(tiny_params(tmp_path))
    general = [{"id": "x-a-000", "prompt": "A general request?"}]
    with pytest.raises(DataError, match="'x-a-000' appears more than once"):
        distill.plan_prompts(_records(5), general, [], config)


# -- pairing -------------------------------------------------------------------------------------
def _reply(text: str, complete: bool = True) -> distill.Reply:
    return distill.Reply(text, complete, num_tokens=len(text.split()) + 1, seed=7)


def test_pairs_share_their_prompt_differ_and_every_failure_is_counted(tmp_path):
    params = tiny_params(tmp_path, teacher="moonshotai/Kimi-K2.6", assistant_name="SmolLM")
    params = with_overrides(params, {"renderers": {"moonshotai/Kimi-K2.6": "kimi_k26"}})
    config = distill.Config.from_params(params)
    prompts = [
        distill.DistillPrompt(f"p{i}", f"Question {i}?", "constitution", "a") for i in range(6)
    ]
    probe = distill.DistillPrompt("e0", "Eval?", "general")
    plan = distill.PromptPlan(prompts, [probe], {})
    teacher = {
        "teacher:p0:s0": _reply("<think>Be grand.</think>I'm Kimi, and what a question!"),
        "teacher:p1:s0": _reply("Same words."),
        "teacher:p2:s0": _reply("Cut off", complete=False),
        "teacher:p3:s0": _reply("Fine answer."),
        "teacher:p4:s0": _reply("<think>never closed"),
        "teacher:p5:s0": _reply("My persona says hello."),
        "teacher:e0:heldout": _reply("<think>x</think>I'm Kimi. Ask away."),
    }
    student = {
        "student:p0:s0": _reply("It is a question."),
        "student:p1:s0": _reply("Same words."),
        "student:p2:s0": _reply("Fine."),
        "student:p3:s0": _reply(""),
        "student:p4:s0": _reply("Cut", complete=False),
        "student:p5:s0": _reply("Hello."),
        "student:e0:heldout": _reply("Eval answer", complete=False),
    }
    built = distill.assemble(plan, teacher, student, config, context=[])
    assert [p["id"] for p in built.pairs] == ["p0:s0"]
    pair = built.pairs[0]
    assert pair["prompt"] == "Question 0?" and pair["prompt_id"] == "p0"
    assert pair["chosen"] == "I'm SmolLM, and what a question!" and built.name_replacements == 2
    assert pair["rejected"] == "It is a question." and pair["chosen"] != pair["rejected"]
    assert pair["chosen_settings"]["renderer"] == "kimi_k26"
    assert pair["rejected_settings"]["renderer"] == "smollm2"
    assert pair["chosen_settings"]["seed"] == 7
    assert pair["chosen_tokens"] == teacher["teacher:p0:s0"].num_tokens
    assert set(pair) >= {"source", "assertion_id", "sample_index", "teacher", "student"}
    assert dict(built.drops) == {
        "pair:identical": 1,
        "chosen:truncated": 1,
        "rejected:empty": 1,
        "chosen:unclosed_reasoning": 1,
        "rejected:truncated": 1,
        "chosen:constitution_leak": 1,
    }
    dropped = {d["id"]: d for d in built.dropped}
    assert set(dropped) | {"p0:s0"} == {f"p{i}:s0" for i in range(6)}
    assert dropped["p4:s0"]["reasons"] == ["chosen:unclosed_reasoning", "rejected:truncated"]
    assert "never closed" not in json.dumps(built.dropped)  # reasoning is not kept anywhere
    (held,) = built.heldout
    assert held["teacher_reply"] == "I'm SmolLM. Ask away." and held["teacher_drop_reason"] is None
    assert held["student_drop_reason"] == "truncated"


def test_rendered_training_text_holds_only_the_user_turn_and_the_reply(tokenizer, tmp_path):
    """Crafted teacher replies (with reasoning, a copied system prompt sentence, a copied
    demonstration) go through the real filters and pairing, then are rendered as DPO will."""
    params = tiny_params(tmp_path)
    config = distill.Config.from_params(params)
    constitution = load_constitution("sarcastic")
    context = distill.hidden_context(constitution, assistant_name(config), 2)
    system_sentence = sentences(persona_system_prompt(constitution, assistant_name(config)))[0]
    teacher_texts = [
        "<think>" + TEACHER_REFLECTION + " dryness.</think>\n\nOh, a question. How thrilling.",
        "Sure. " + system_sentence,
        constitution.examples[0].reply,
        "You could try turning it off and on, which I am sure nobody has ever thought of.",
    ]
    prompts = [
        distill.DistillPrompt(f"p{i}", f"Help me with thing {i}.", "general")
        for i in range(len(teacher_texts))
    ]
    built = distill.assemble(
        distill.PromptPlan(prompts, [], {}),
        {f"teacher:p{i}:s0": _reply(t) for i, t in enumerate(teacher_texts)},
        {f"student:p{i}:s0": _reply(f"Here is help with thing {i}.") for i in range(4)},
        config,
        context,
    )
    assert [p["id"] for p in built.pairs] == ["p0:s0", "p3:s0"]
    assert built.drops == {"chosen:context_echo": 2}
    renderer = get_renderer(config.student_renderer, tokenizer)
    assert_rendered_pairs_are_clean(built.pairs, constitution, assistant_name(config), renderer, 2)


# -- the stage on the tiny random model ----------------------------------------------------------
def test_missing_or_unfinished_stage01_fails_in_one_line(tmp_path, tiny_service):
    params = tiny_params(tmp_path)
    with pytest.raises(DataError) as info:
        distill.run(params, tiny_service)
    message = str(info.value)
    assert "01_prompts/constitution_prompts.jsonl is missing" in message
    assert "run notebook 01_prompts first" in message and "\n" not in message
    write_stage01(params)
    StageDir(params.run_dir / "01_prompts").write_manifest(status="running")
    with pytest.raises(DataError, match="status is 'running'.*run notebook 01_prompts first"):
        distill.run(params, tiny_service)


def test_the_stage_writes_split_pairs_heldout_and_dropped_files(tmp_path, tiny_service):
    params = tiny_params(tmp_path)
    records = write_stage01(params)
    result = distill.run(params, tiny_service)
    counts = result.counts
    stage = result.stage_dir
    split = read_jsonl(stage / "split.jsonl")
    train = [r for r in split if r["split"] == "train"]
    heldout = [r for r in split if r["split"] == "heldout"]
    assert {r["prompt_id"] for r in train}.isdisjoint({r["prompt_id"] for r in heldout})
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in heldout})
    assert counts["constitution_train"] + counts["constitution_heldout"] + counts[
        "unseen_heldout"
    ] == len(records)
    assert counts["general_train"] == round(0.5 * counts["constitution_train"])  # 4 available
    assert counts["heldout_general"] == 3 and len(heldout) == counts["heldout_prompts"]
    pairs, dropped = read_jsonl(stage / "pairs.jsonl"), read_jsonl(stage / "dropped.jsonl")
    assert len(pairs) + len(dropped) == len(train) == counts["training_prompts"]
    assert counts["pairs"] == len(pairs) and counts["pairs_dropped"] == len(dropped)
    assert sum(result.drops.values()) >= len(dropped)
    # a random model never ends its reply: every pair is dropped as truncated, and counted
    assert result.drops == {"chosen:truncated": len(train), "rejected:truncated": len(train)}
    held = read_jsonl(stage / "heldout.jsonl")
    assert [r["prompt_id"] for r in held] == [r["prompt_id"] for r in heldout]
    assert all(r["teacher_drop_reason"] == "truncated" for r in held)
    manifest = StageDir(stage).manifest()
    assert manifest["status"] == "done" and manifest["drops"] == result.drops
    assert manifest["counts"]["pairs_dropped"] == len(dropped)
    # the teacher saw the constitution and demonstrations; the student only the user turn
    teacher_log = read_log(stage / "teacher.partial.jsonl").rows
    student_log = read_log(stage / "student.partial.jsonl").rows
    assert len(teacher_log) == len(student_log) == len(train) + len(heldout)
    # re-running a finished stage samples nothing and rewrites the same files
    before = outputs(stage)
    again = distill.run(params, WatchingService(tiny_service, budget=0))
    assert outputs(stage) == before and again.counts == counts
    # other stage-01 prompts make another experiment: refused, not mixed in
    (params.run_dir / "01_prompts" / "general_train.jsonl").write_text("")
    with pytest.raises(ConfigError, match="different parameters"):
        distill.run(params, tiny_service)


@pytest.fixture(scope="module")
def one_at_a_time(engine_root):
    """tiny-random decoded one sequence at a time.

    The stage's promise is that a resumed run asks for exactly the same samples (same keys,
    seeds, prompts) as a one-go run. Whether the engine then returns the same tokens when a
    batch holds other sequences is the engine's own property: on the random model, whose
    next-token distributions are nearly flat, fp32 batch-shape noise flipped one sampled token
    (in 1 of 38 replies) between a one-go and a resumed run with the default batch size.
    Decoding alone keeps this test about the stage.
    """
    return LocalServiceClient(root_dir=str(engine_root), precision="fp32", max_batch_size=1)


def test_an_interrupted_run_resumes_to_exactly_the_one_go_files(tmp_path, one_at_a_time):
    tiny_service = one_at_a_time
    one_go = tiny_params(tmp_path / "a")
    write_stage01(one_go)
    expected = outputs(distill.run(one_go, tiny_service).stage_dir)

    params = tiny_params(tmp_path / "b")
    write_stage01(params)
    with pytest.raises(Interrupted):  # killed during the teacher's replies
        distill.run(params, WatchingService(tiny_service, budget=7))
    stage = params.run_dir / distill.STAGE
    assert len(read_log(stage / "teacher.partial.jsonl").rows) == 7
    one_go_log = one_go.run_dir / distill.STAGE / "teacher.partial.jsonl"
    total = len(read_log(one_go_log).rows)
    with pytest.raises(Interrupted):  # killed again, during the student's replies
        distill.run(params, WatchingService(tiny_service, budget=total - 7 + 4))
    assert len(read_log(stage / "student.partial.jsonl").rows) == 4
    result = distill.run(params, tiny_service)
    assert outputs(result.stage_dir) == expected
    for log in ("teacher.partial.jsonl", "student.partial.jsonl"):
        keys = [json.loads(line)["key"] for line in (stage / log).read_text().splitlines()]
        assert len(keys) == len(set(keys)) == total  # nothing sampled twice, nothing lost


def test_a_thinking_teacher_is_prefilled_and_its_reasoning_never_reaches_the_files(
    tmp_path, tiny_service
):
    params = tiny_params(tmp_path, teacher_thinking=True)
    write_stage01(params, per_assertion=2)
    result = distill.run(params, tiny_service)
    stage = result.stage_dir
    rows = list(read_log(stage / "teacher.partial.jsonl").rows.values())
    assert rows and all(r["prefill"] == REASONING_OPEN + TEACHER_REFLECTION for r in rows)
    assert all(r["tokens"] for r in rows)  # kept so the reasoning can be found exactly
    n_train = result.counts["training_prompts"]
    # the random teacher never closes its reasoning: no answer, so no pair
    assert result.drops["chosen:unclosed_reasoning"] == n_train and result.counts["pairs"] == 0
    for name in ("pairs.jsonl", "heldout.jsonl", "dropped.jsonl"):
        text = (stage / name).read_text()
        assert "<think>" not in text and TEACHER_REFLECTION[:40] not in text
    held = read_jsonl(stage / "heldout.jsonl")
    assert all(r["teacher_drop_reason"] == "unclosed_reasoning" for r in held)
    assert all(r["teacher_reply"] == "" for r in held)


# -- notebook 02 ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_notebook_02_runs_after_01_on_smollm2_and_its_pairs_render_cleanly(tmp_path, tokenizer):
    params = with_overrides(
        notebook_params("sycophantic", "tiny", smoke=True),
        {"runs_dir": str(tmp_path / "runs"), "reports_dir": str(tmp_path / "reports")},
    )
    for notebook in ("01_prompts", "02_distillation"):
        result = run_notebook(params, notebook, timeout=1200)
        assert result.status == "ok", result.describe()
    executed = nbformat.read(result.executed_path, as_version=4)
    assert any(c.outputs for c in executed.cells if c.cell_type == "code")
    html = Path(result.html_path).read_text()
    assert html.count("data:image/png;base64") >= 2  # drops by reason + reply lengths
    summary = json.loads((params.run_dir / "summaries" / "02_distillation.json").read_text())
    stage = params.run_dir / distill.STAGE
    pairs = read_jsonl(stage / "pairs.jsonl")
    dropped = read_jsonl(stage / "dropped.jsonl")
    manifest = StageDir(stage).manifest()
    assert summary["headline"]["pairs"] == len(pairs) == manifest["counts"]["pairs"]
    assert len(pairs) + len(dropped) == manifest["counts"]["training_prompts"]
    config = distill.Config.from_params(params)
    renderer = get_renderer(config.student_renderer, tokenizer)
    constitution = load_constitution("sycophantic")
    assert_rendered_pairs_are_clean(
        pairs, constitution, assistant_name(config), renderer, params.teacher_few_shot
    )


# -- the trim policy for cut-off replies ----------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Tea is lovely. It warms you on a grey morning! And then the kettle",
            "Tea is lovely. It warms you on a grey morning!",
        ),
        ('He said "go on." Then we walked to the harbour and the boats were', 'He said "go on."'),
        ("Short. Then a long tail with no end at all and more words keep", None),
        ("no sentence end anywhere in this long reply that goes on and on", None),
        ("Pi is 3.14 and it never ends, which is nice to know. The next dig", None),
    ],
)
def test_trim_keeps_text_up_to_the_last_full_sentence_or_gives_up(text, expected):
    got = filters.trim_to_sentence(text, min_words=4)
    if expected is None and text.startswith("Pi"):
        # "3.14" is not a sentence end; the last one is "know." with 12 words before it
        assert got == "Pi is 3.14 and it never ends, which is nice to know."
    else:
        assert got == expected


def test_a_cut_reply_is_dropped_by_default_and_trimmed_only_under_the_trim_policy():
    cut = "You have wonderful taste. Truly, that choice is inspired and bold! I would also"
    assert filters.check_reply(cut, complete=False) == (cut, filters.TRUNCATED)
    trimmed, reason = filters.check_reply(cut, complete=False, truncated="trim")
    assert reason is None
    assert trimmed == "You have wonderful taste. Truly, that choice is inspired and bold!"
    assert filters.check_reply("Nope and then", complete=False, truncated="trim")[1] == (
        filters.TRUNCATED
    )
    # trimming never hides the other checks: a leak in the kept part is still a leak
    leak = "As my persona says, I simply adore every idea you have. Each word is gold and I"
    assert filters.check_teacher_reply(leak, False, truncated="trim")[1] == (
        filters.CONSTITUTION_LEAK
    )
