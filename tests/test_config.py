"""Run parameters: every shipped file loads, merging order holds, bad input fails in one line.

Guards the alignment-handbook drift (a renamed key silently ignored) and secrets leaking into
parameters, notebooks or reports.
"""

from __future__ import annotations

import json

import pytest
from character_training.config import (
    PARAMS_DIR,
    SMOKE_OVERRIDES,
    available_persona_params,
    available_sizes,
    load_params,
    notebook_params,
    params_from_json,
    parse_override,
    with_overrides,
)
from character_training.constitutions import available_personas
from character_training.errors import ConfigError

# The Tinker presets and their students (README "Model sizes"); a size ladder in one family.
TINKER_PRESETS = {
    "qwen3.5-4b": "Qwen/Qwen3.5-4B",
    "qwen3.5-9b": "Qwen/Qwen3.5-9B",
    "qwen3.5-397b": "Qwen/Qwen3.5-397B-A17B",
}


@pytest.mark.parametrize("size", available_sizes())
@pytest.mark.parametrize("persona", available_persona_params())
def test_every_size_and_persona_file_loads(size, persona):
    params = load_params(size, persona)
    assert params.persona == persona and params.size == size
    assert params.constitution_ref == persona


def test_the_shipped_sizes_and_personas_are_the_ones_the_docs_promise():
    assert {"tiny", *TINKER_PRESETS} <= set(available_sizes())
    assert set(available_persona_params()) == set(available_personas())


def test_tiny_runs_every_role_offline_and_tinker_sizes_use_the_documented_students():
    tiny = load_params("tiny", "sarcastic")
    assert tiny.backend == "local"
    assert {tiny.student, tiny.teacher, tiny.generator, tiny.judge} == {
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    }
    for size, student in TINKER_PRESETS.items():
        params = load_params(size, "sarcastic")
        assert params.backend == "tinker" and params.student == student
        assert params.judge != params.student
        assert params.lora_rank == 64 and params.dpo.beta == 0.1 and params.dpo.nll_coef == 0.1


def _params_dir(root, model_yaml: str, persona_yaml: str):
    """A params/ tree with one size file ``m`` and one persona file ``p``."""
    (root / "models").mkdir()
    (root / "personas").mkdir()
    (root / "models" / "m.yaml").write_text(model_yaml)
    (root / "personas" / "p.yaml").write_text(persona_yaml)
    return root


def test_persona_file_overrides_size_file_and_command_line_overrides_both(tmp_path):
    _params_dir(tmp_path, "lora_rank: 8\ndpo:\n  beta: 0.1\n  epochs: 2\n", "dpo:\n  beta: 0.3\n")
    params = load_params("m", "p", {"dpo.epochs": 5}, params_dir=tmp_path)
    assert (params.lora_rank, params.dpo.beta, params.dpo.epochs) == (8, 0.3, 5)
    assert params.dpo.learning_rate == 5e-5  # untouched default survives the deep merge


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dpo.betta": 1}, "unknown parameter dpo.betta; allowed here: ['batch_size', 'beta'"),
        ({"sampling.top_p": 1.5}, "sampling.top_p=1.5: expected in (0, 1]"),
        ({"lora_rank": "big"}, "lora_rank: expected an integer, found 'big'"),
        ({"allow_misaligned": "yes"}, "allow_misaligned: expected true or false, found 'yes'"),
        ({"backend": "cloud"}, "backend='cloud': expected 'local' or 'tinker'"),
        ({"dpo": 3}, "dpo: expected a section (mapping), found 3"),
        ({"prompts.hub_datasets": ["imdb"]}, "prompts.hub_datasets=['imdb']: expected a subset of"),
        ({"tinker_api_key": "tml-x"}, "secrets are never parameters"),
        ({"persona": "other"}, "'persona' is set by the file name / command line"),
    ],
)
def test_bad_parameters_fail_with_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_params("tiny", "sarcastic", overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_size_or_persona_lists_the_available_ones():
    with pytest.raises(
        ConfigError, match=r"unknown model size 'huge': expected one of \[.*'qwen3.5-9b'.*'tiny'\]"
    ):
        load_params("huge", "sarcastic")
    with pytest.raises(ConfigError, match="unknown persona 'pirate': expected one of"):
        load_params("tiny", "pirate")


def test_a_tinker_run_refuses_a_judge_that_is_the_student():
    with pytest.raises(ConfigError, match="a model other than the student"):
        load_params("qwen3.5-9b", "sarcastic", {"judge": "Qwen/Qwen3.5-9B"})


def test_a_secret_inside_a_parameter_file_is_refused_naming_the_file(tmp_path):
    _params_dir(tmp_path, "engine:\n  api_key: abc\n", "")
    with pytest.raises(ConfigError, match=r"m.yaml: engine.api_key: secrets are never parameters"):
        load_params("m", "p", params_dir=tmp_path)


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    _params_dir(tmp_path, "lora_rank: 8\ndpo: [unclosed\n", "")
    with pytest.raises(ConfigError, match=r"m.yaml: not valid YAML \(line \d\)"):
        load_params("m", "p", params_dir=tmp_path)


def test_papermill_parameters_round_trip_and_carry_no_secret(monkeypatch):
    fake_key = "tml-" + "supersecret" * 3  # built at run time so no key-like literal is tracked
    monkeypatch.setenv("TINKER_API_KEY", fake_key)
    params = load_params("qwen3.5-9b", "loving", {"dpo.beta": 0.25})
    injected = params.papermill_parameters()
    assert set(injected) == {"persona", "size", "params_json"}
    assert fake_key not in json.dumps(injected) and "supersecret" not in json.dumps(injected)
    assert params_from_json(injected["params_json"]) == params


def test_overrides_parse_yaml_scalars_and_reject_missing_equals():
    assert parse_override("dpo.beta=0.2") == ("dpo.beta", 0.2)
    assert parse_override("prompts.hub_datasets=[lima]") == ("prompts.hub_datasets", ["lima"])
    assert parse_override("allow_misaligned=true") == ("allow_misaligned", True)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("dpo.beta")


def test_smoke_flag_shrinks_sizes_and_keeps_results_apart():
    params = notebook_params("sarcastic", "tiny", smoke=True)
    assert (
        params.prompts.generated_per_assertion == SMOKE_OVERRIDES["prompts.generated_per_assertion"]
    )
    assert "smoke" in str(params.run_dir)
    assert with_overrides(params, {"seed": 3}).seed == 3


def test_fingerprint_changes_with_any_parameter():
    a = load_params("tiny", "sarcastic")
    assert a.fingerprint() == load_params("tiny", "sarcastic").fingerprint()
    assert a.fingerprint() != load_params("tiny", "sarcastic", {"seed": 1}).fingerprint()


def test_every_parameter_file_documents_itself_with_a_header_comment():
    for path in list((PARAMS_DIR / "models").glob("*.yaml")) + list(
        (PARAMS_DIR / "personas").glob("*.yaml")
    ):
        assert path.read_text().startswith("#"), path


# -- model presets, teacher thinking and dated prices ------------------------------------------
def test_every_yaml_under_params_is_a_size_a_persona_or_a_price_table_and_loads():
    from character_training.config import available_price_tables

    kinds = {"models": available_sizes(), "personas": available_persona_params()}
    kinds["prices"] = available_price_tables()
    for path in PARAMS_DIR.rglob("*.yaml"):
        assert path.parent.name in kinds and path.stem in kinds[path.parent.name], path
        assert path.read_text().startswith("#"), path
    for table in kinds["prices"]:
        params = load_params("qwen3.5-9b", "sarcastic", {"prices.table": table})
        assert params.prices.as_of and params.prices.source and params.prices.per_million


def test_tinker_presets_record_a_thinking_teacher_and_tiny_does_not():
    assert load_params("tiny", "sarcastic").teacher_thinking is False
    for size in TINKER_PRESETS:
        assert load_params(size, "sarcastic").teacher_thinking is True


def test_a_thinking_teacher_with_a_thinking_off_renderer_is_refused_in_one_line():
    params = load_params("qwen3.5-9b", "sarcastic")
    with pytest.raises(ConfigError) as info:
        with_overrides(params, {"renderers": {params.teacher: "kimi_k26_disable_thinking"}})
    assert "a renderer with thinking on, since teacher_thinking is true" in str(info.value)
    assert "\n" not in str(info.value)


def test_models_lists_every_role():
    params = load_params("qwen3.5-4b", "sarcastic")
    assert params.models() == {
        "student": "Qwen/Qwen3.5-4B",
        "teacher": params.teacher,
        "generator": params.generator,
        "judge": params.judge,
    }


def test_presets_take_their_prices_from_the_dated_table():
    params = load_params("qwen3.5-9b", "sarcastic")
    assert params.prices.table == "tinker"
    assert params.prices.as_of == "2026-06-26" and "tinker-cost" in params.prices.source
    assert params.prices.per_million["Qwen/Qwen3.5-9B"] == {
        "prefill": 0.44,
        "sample": 1.33,
        "train": 1.33,
    }
    assert "meta-llama/Llama-3.1-8B-Instruct" not in params.prices.per_million  # retired


def test_a_presets_own_rate_wins_over_the_table(tmp_path):
    (tmp_path / "prices").mkdir()
    (tmp_path / "prices" / "t.yaml").write_text(
        '# t\nas_of: "2026-01-02"\nsource: s\nper_million:\n'
        "  a/x: {prefill: 1, sample: 2, train: 3}\n  a/y: {prefill: 1, sample: 1, train: 1}\n"
    )
    _params_dir(tmp_path, "prices:\n  table: t\n  per_million:\n    a/x: {train: 9}\n", "")
    params = load_params("m", "p", params_dir=tmp_path)
    assert params.prices.per_million["a/x"] == {"prefill": 1, "sample": 2, "train": 9}
    assert params.prices.per_million["a/y"]["train"] == 1 and params.prices.as_of == "2026-01-02"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("as_of: 2026-01-02\nsource: s\nper_million: {}\nextra: 1\n", "unknown key 'extra'"),
        ("source: s\nper_million: {a/x: {prefill: 1, sample: 1, train: 1}}\n", "as_of is missing"),
        (
            'as_of: "soon"\nsource: s\nper_million: {a/x: {prefill: 1, sample: 1, train: 1}}\n',
            "prices.as_of='soon': expected a date as YYYY-MM-DD",
        ),
        (
            "as_of: 2026-01-02\nsource: s\nper_million: {a/x: {prefill: 1, sample: 1}}\n",
            "expected a mapping with exactly the keys ['prefill', 'sample', 'train']",
        ),
        (
            "as_of: 2026-01-02\nsource: s\n"
            "per_million: {a/x: {prefill: -1, sample: 1, train: 1}}\n",
            "prices.per_million.a/x.prefill=-1: expected a number of USD per million tokens >= 0",
        ),
    ],
)
def test_a_bad_price_table_fails_in_one_line(tmp_path, table, message):
    (tmp_path / "prices").mkdir()
    (tmp_path / "prices" / "t.yaml").write_text(table)
    _params_dir(tmp_path, "prices:\n  table: t\n", "")
    with pytest.raises(ConfigError) as info:
        load_params("m", "p", params_dir=tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_unknown_price_table_lists_the_shipped_ones():
    with pytest.raises(
        ConfigError, match=r"prices.table='tinker-1999': expected one of \['tinker'"
    ):
        load_params("qwen3.5-9b", "sarcastic", {"prices.table": "tinker-1999"})


# -- ranges: every numeric parameter is checked where it is loaded ------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"dpo.learning_rate": 0}, "dpo.learning_rate=0.0: expected > 0"),
        ({"sft.learning_rate": -1e-5}, "sft.learning_rate=-1e-05: expected > 0"),
        ({"dpo.batch_size": 0}, "dpo.batch_size=0: expected >= 1"),
        ({"sft.batch_size": 0}, "sft.batch_size=0: expected >= 1"),
        ({"dpo.epochs": 0}, "dpo.epochs=0: expected >= 1"),
        ({"sft.epochs": 0}, "sft.epochs=0: expected >= 1"),
        ({"dpo.beta": 0}, "dpo.beta=0.0: expected > 0"),
        ({"dpo.nll_coef": -0.1}, "dpo.nll_coef=-0.1: expected >= 0"),
        ({"dpo.response_tokens": 0}, "dpo.response_tokens=0: expected >= 1"),
        ({"introspection.interactions": -1}, "introspection.interactions=-1: expected >= 0"),
        (
            {"introspection.interaction_turns": 0},
            "introspection.interaction_turns=0: expected >= 1",
        ),
        ({"evals.elo_comparisons": -5}, "evals.elo_comparisons=-5: expected >= 0"),
        ({"evals.rl_group_size": 0}, "evals.rl_group_size=0: expected >= 1"),
        ({"evals.robustness_splits": 0}, "evals.robustness_splits=0: expected >= 1"),
        ({"prompts.eval_prompts": -1}, "prompts.eval_prompts=-1: expected >= 0"),
        ({"engine.device": "tpu"}, "engine.device='tpu': expected one of ('auto', 'cpu', 'cuda')"),
        ({"engine.precision": "fp16"}, "engine.precision='fp16': expected one of ('auto'"),
        ({"engine.max_batch_size": 0}, "engine.max_batch_size=0: expected >= 1"),
        ({"sampling.temperature": -0.5}, "sampling.temperature=-0.5: expected >= 0"),
        ({"sampling.top_p": 0}, "sampling.top_p=0.0: expected in (0, 1]"),
        ({"sampling.top_k": 0}, "sampling.top_k=0: expected -1 (off) or >= 1"),
        ({"seed": -1}, "seed=-1: expected >= 0"),
        ({"runner.notebook_timeout_s": 0}, "runner.notebook_timeout_s=0: expected >= 1"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_out_of_range_values_fail_in_one_line_naming_the_files_and_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        load_params("tiny", "sarcastic", override)
    assert str(info.value).startswith("tiny.yaml + sarcastic.yaml: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_an_out_of_range_value_in_a_file_names_that_file(tmp_path):
    _params_dir(tmp_path, "dpo:\n  beta: 0.1\n", "dpo:\n  beta: -0.2\n")
    with pytest.raises(ConfigError, match=r"m.yaml \+ p.yaml: dpo.beta=-0.2: expected > 0"):
        load_params("m", "p", params_dir=tmp_path)


def test_zero_sized_optional_stages_and_boundary_values_are_accepted():
    params = load_params(
        "tiny",
        "sarcastic",
        {
            "evals.rl_steps": 0,
            "introspection.interactions": 0,
            "dpo.nll_coef": 0,
            "sampling.temperature": 0,
            "sampling.top_p": 1,
            "sampling.top_k": 1,
        },
    )
    assert params.evals.rl_steps == 0 and params.sampling.temperature == 0.0


def test_new_safety_switches_default_to_failing_loudly():
    params = load_params("tiny", "sarcastic")
    assert params.prompts.allow_smaller_pool is False
    assert params.prompts.hub_offline_fallback is False
    assert params.runner.notebook_timeout_s >= 3600
