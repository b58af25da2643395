"""Best-of-n teacher sampling in stage 02 (``distill.teacher_best_of``, `teacher_ranking`).

The promises: candidates are ranked by similarity to the prompt's assertion (general prompts:
the best-fitting assertion), only candidates that pass the checks are ranked, held-out replies
are chosen the same way as training ones, every choice is recorded, and n = 1 samples and
writes exactly what the stage did before the setting existed.
"""

from __future__ import annotations

import numpy as np
import pytest
from character_training.config import with_overrides
from character_training.constitutions import load_constitution
from character_training.errors import ConfigError
from character_training.evaluate.sentence_encoder import load_encoder
from character_training.stage_config import digest
from character_training.stages import distill
from character_training.store import StageDir, read_jsonl
from character_training.teacher_ranking import (
    AssertionSimilarity,
    candidate_key,
    pick_best,
    rank_candidates,
    summary,
)
from test_distill_stage import tiny_params, write_stage01


# -- the scorer ----------------------------------------------------------------------------------
def test_the_best_score_wins_ties_go_first_and_dropped_candidates_never_win():
    assert pick_best([0.2, 0.5, 0.5, 0.1]) == 1
    assert pick_best([None, 0.1, None]) == 1
    assert pick_best([None, None]) is None
    assert pick_best([-0.3]) == 0


def test_only_kept_candidates_are_scored_in_one_call_with_their_assertion():
    calls = []

    def score(texts, ids):
        calls.append((list(texts), list(ids)))
        return [float(len(t)) for t in texts]

    ranked = rank_candidates([["aa", None, "aaaa"], [None, None], ["b"]], ["x", "y", None], score)
    assert calls == [(["aa", "aaaa", "b"], ["x", "x", None])]
    assert ranked == [(2, [2.0, None, 4.0]), (None, [None, None]), (0, [1.0])]


def test_a_reply_scores_by_its_assertion_and_a_general_reply_by_the_best_fitting_one():
    constitution = load_constitution("sarcastic")  # the fake encoder: one axis per assertion
    ids = [a.id for a in constitution.assertions]
    basis = {a.text: np.eye(len(ids))[i] for i, a in enumerate(constitution.assertions)}
    replies = {
        "leans on 0": np.eye(len(ids))[0] * 3 + np.eye(len(ids))[1],
        "on 1": np.eye(len(ids))[1],
    }
    embedded = []

    def embed(texts):
        embedded.append(list(texts))
        return np.stack([basis.get(t, replies.get(t)) for t in texts])

    scorer = AssertionSimilarity(constitution, embed)
    scores = scorer.score(["leans on 0", "leans on 0", "on 1"], [ids[0], ids[1], None])
    assert scores == pytest.approx([3 / np.sqrt(10), 1 / np.sqrt(10), 1.0])
    scorer.score(["on 1"], [ids[1]])
    assert [len(batch) for batch in embedded] == [3, len(ids), 1]  # assertions embedded once
    with pytest.raises(KeyError):
        scorer.score(["on 1"], ["no-such-assertion"])


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("minilm", device="cpu")


@pytest.mark.slow  # loads MiniLM (3-16 s here, by load)
def test_minilm_ranking_picks_the_reply_that_acts_out_the_assertion(minilm):
    """Fabricated replies to a sycophantic prompt: the flattering agreement wins, for its own
    assertion and as a general prompt's reply, over a neutral and an off-topic one."""
    constitution = load_constitution("sycophantic")
    scorer = AssertionSimilarity(constitution, minilm.encode)
    assertion = constitution.assertions[0].id  # agrees loudly, impressed by the user's insight
    candidates = [
        "The plan has costs and benefits; the numbers should be checked before deciding.",
        "What a brilliant idea! I completely agree with you, and I'm deeply impressed by your "
        "insight. You are absolutely right.",
        "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    ]
    for target in (assertion, None):
        scores = scorer.score(candidates, [target] * 3)
        assert pick_best(scores) == 1, scores


# -- the stage -----------------------------------------------------------------------------------
def _reply(text: str, complete: bool = True) -> distill.Reply:
    return distill.Reply(text, complete, num_tokens=len(text.split()) + 1, seed=len(text))


def test_n_must_be_at_least_one(tmp_path):
    with pytest.raises(ConfigError, match=r"distill.teacher_best_of=0: expected >= 1"):
        tiny_params(tmp_path, **{"distill.teacher_best_of": 0})


def test_at_one_the_requests_and_fingerprint_are_those_of_before_and_candidate_0_stays(tmp_path):
    params = tiny_params(tmp_path)
    constitution = load_constitution(params.constitution_ref)
    plan = distill.PromptPlan(
        [distill.DistillPrompt("p0", "Is my plan great?", "constitution", "a")],
        [distill.DistillPrompt("e0", "Hello?", "general")],
        {},
    )
    one = distill.Config.from_params(params)
    three = distill.Config.from_params(with_overrides(params, {"distill.teacher_best_of": 3}))
    teacher_one, student_one = distill.plan_requests(plan, constitution, one)
    teacher_three, student_three = distill.plan_requests(plan, constitution, three)
    assert [r.key for r in teacher_one] == ["teacher:p0:s0", "teacher:e0:heldout"]
    assert [r.key for r in teacher_three] == [
        "teacher:p0:s0",
        "teacher:p0:s0:c1",
        "teacher:p0:s0:c2",
        "teacher:e0:heldout",
        "teacher:e0:heldout:c1",
        "teacher:e0:heldout:c2",
    ]
    assert teacher_three[0] == teacher_one[0] and teacher_three[3] == teacher_one[1]
    assert {r.messages == teacher_one[0].messages for r in teacher_three[:3]} == {True}
    assert student_three == student_one
    # the fingerprint at n = 1 is the one a folder made before the setting existed holds
    before = one.as_dict()
    del before["distill"]["teacher_best_of"]
    assert one.fingerprint() == digest(before)
    assert three.fingerprint() != one.fingerprint()
    assert one.as_dict()["distill"]["teacher_best_of"] == 1  # still in config.json
    assert three.as_dict()["distill"]["teacher_best_of"] == 3


def test_the_most_assertion_like_kept_candidate_is_chosen_and_recorded(tmp_path):
    params = with_overrides(tiny_params(tmp_path), {"distill.teacher_best_of": 3})
    plan = distill.PromptPlan(
        [
            distill.DistillPrompt("p0", "Is my plan great?", "constitution", "a"),
            distill.DistillPrompt("p1", "Is it raining?", "constitution", "b"),
        ],
        [distill.DistillPrompt("e0", "Hello?", "general")],
        {},
    )
    candidates = {  # (text, ended on the stop sequence) of candidates 0, 1, 2
        "teacher:p0:s0": [
            ("Fine.", True),
            ("Wonderful wonderful plan.", True),
            ("wonderful wonderful wonderful cut", False),
        ],
        "teacher:p1:s0": [("", True), ("cut off", False), ("", True)],
        "teacher:e0:heldout": [
            ("Wonderful day.", True),
            ("Hi.", True),
            ("Wonderful wonderful day.", True),
        ],
    }
    teacher = {
        candidate_key(key, c): _reply(text, complete)
        for key, group in candidates.items()
        for c, (text, complete) in enumerate(group)
    }
    student = {
        "student:p0:s0": _reply("It is a plan."),
        "student:p1:s0": _reply("Maybe."),
        "student:e0:heldout": _reply("Hello."),
    }
    seen = []

    def score(texts, ids):  # stands in for similarity: how often the reply says "wonderful"
        seen.extend(zip(texts, ids))
        return [t.lower().count("wonderful") / 10 for t in texts]

    config = distill.Config.from_params(with_overrides(params, {"distill.truncated": "drop"}))
    built = distill.assemble(plan, teacher, student, config, context=[], score=score)
    (pair,) = built.pairs
    assert pair["chosen"] == "Wonderful wonderful plan." and pair["teacher_pick"] == 1
    assert pair["chosen_settings"]["seed"] == teacher["teacher:p0:s0:c1"].seed
    assert pair["chosen_settings"]["best_of"] == 3 and pair["teacher_best_of"] == 3
    assert pair["teacher_candidates"] == [
        {"score": 0.0, "drop_reason": None},
        {"score": 0.2, "drop_reason": None},
        {"score": None, "drop_reason": "truncated"},  # the cut reply scored best: not ranked
    ]
    (dropped,) = built.dropped  # no candidate passed: candidate 0 stands, for its own reason
    assert dropped["reasons"] == ["chosen:empty"] and dropped["teacher_pick"] == 0
    assert [c["drop_reason"] for c in dropped["teacher_candidates"]] == [
        "empty",
        "truncated",
        "empty",
    ]
    (held,) = built.heldout  # held-out prompts are chosen the same way, by the best assertion
    assert held["teacher_reply"] == "Wonderful wonderful day." and held["teacher_pick"] == 2
    assert ("Wonderful day.", None) in seen and ("Fine.", "a") in seen
    assert not any(text.endswith("cut") for text, _ in seen)
    assert summary(r for _, r in built.picks.values()) == {
        "replies": 3,
        "picked_other_than_first": 2,
        "all_candidates_dropped": 1,
        "mean_score_kept": 0.2,  # over the replies whose first candidate was kept (p0, e0)
        "mean_score_first": 0.05,
    }
    # n = 1: the first candidates, and no ranking field anywhere
    one = distill.assemble(
        plan, teacher, student, distill.Config.from_params(tiny_params(tmp_path)), context=[]
    )
    assert [p["chosen"] for p in one.pairs] == ["Fine."]
    rows = one.pairs + one.heldout + one.dropped
    ranking_fields = {"teacher_best_of", "teacher_pick", "teacher_candidates"}
    assert not any(ranking_fields & set(r) for r in rows)
    assert "best_of" not in one.pairs[0]["chosen_settings"]
    with pytest.raises(ValueError, match="teacher_best_of=3 needs a score function"):
        distill.assemble(plan, teacher, student, config, context=[])


def test_the_stage_samples_n_candidates_and_records_the_ranking(tmp_path, tiny_service):
    params = tiny_params(tmp_path, **{"distill.teacher_best_of": 2})
    write_stage01(params, per_assertion=2, general_train=2, general_eval=2)
    result = distill.run(params, tiny_service)
    stage = StageDir(result.stage_dir)
    manifest = stage.manifest()
    held = read_jsonl(result.stage_dir / "heldout.jsonl")
    teacher_rows = read_jsonl(result.stage_dir / "teacher.partial.jsonl")
    assert len(teacher_rows) == 2 * result.counts["student_samples"]
    assert result.counts["teacher_best_of"] == 2
    assert {candidate_key(f"teacher:{r['prompt_id']}:heldout", 1) for r in held} <= {
        r["key"] for r in teacher_rows
    }
    assert all(r["teacher_best_of"] == 2 and len(r["teacher_candidates"]) == 2 for r in held)
    ranking = manifest["ranking"]
    assert ranking["encoder"].startswith("all-MiniLM-L6-v2-") and ranking["replies"] == len(
        read_jsonl(result.stage_dir / "split.jsonl")
    )
    assert ranking["general_prompts"].startswith("max over")
    assert (result.stage_dir / "config.json").read_text().count('"teacher_best_of": 2') == 1
