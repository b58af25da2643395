"""The spend ledger, ``--max-usd`` and where the spend is shown (issue 18, section 4).

* every request through the metered service is counted as the service is asked: prompt tokens
  as prefill, returned replies as sampled tokens, ``forward_backward`` inputs as trained, the
  same through the local engine and the simulated service, and priced with the dated table;
* the wrapper changes no reply;
* ``--max-usd`` refuses to start in one line (estimate, cap, stages) and stops a stage in one
  line naming it, with its finished work kept, so a rerun with a higher cap resumes;
* the ledger shows in a report's footer, the summary and the provenance page.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from character_training import spend, spend_cap
from character_training.backends.local import TINY_RANDOM_NAME
from character_training.config import load_params
from character_training.errors import ConfigError
from character_training.metering import MeteredService
from character_training.renderers.conversation import supervised_datum
from character_training.sampling import SampleRequest, sample_chat
from character_training.spend_cap import CapGuard, SpendCap, SpendCapReached
from character_training.testing import SimulatedService
from tinker import types

TINY = TINY_RANDOM_NAME
RATES = {"prefill": 1.0, "sample": 2.0, "train": 3.0}  # USD per million tokens
SETTINGS = dict(max_tokens=4, temperature=1.0, top_p=1.0, seed=11)


def priced(run_dir: Path, backend: str = "tinker") -> SimpleNamespace:
    """What the ledger reads from run parameters: backend, price table, run folder."""
    prices = SimpleNamespace(per_million={TINY: RATES}, as_of="2026-06-26")
    return SimpleNamespace(backend=backend, prices=prices, run_dir=Path(run_dir))


def metered(inner, run_dir: Path, stage: str = "02_distillation", cap: float | None = None):
    params = priced(run_dir)
    ledger = spend.Ledger(run_dir, params, stage, flush_every_s=3600)
    guard = None
    if cap is not None:
        guard = CapGuard(SpendCap(cap, (Path(run_dir),)), run_dir, stage, ledger.spent_usd)
    return MeteredService(inner, ledger, guard, run_dir)


def requests(count: int) -> list[SampleRequest]:
    return [
        SampleRequest(key=f"q{i}", messages=[{"role": "user", "content": f"Count to {i}."}])
        for i in range(count)
    ]


def test_sampling_is_charged_as_asked_and_changes_no_reply(
    tiny_service, tiny_sampler, renderer, tmp_path
):
    direct = sample_chat(tiny_sampler, renderer, requests(5), **SETTINGS)
    service = metered(tiny_service, tmp_path / "run")
    sampler = service.create_sampling_client(base_model=TINY)
    got = sample_chat(sampler, renderer, requests(5), **SETTINGS, chunk_size=2)
    assert [c.tokens for c in got.values()] == [c.tokens for c in direct.values()]
    assert {k: c.text for k, c in got.items()} == {k: c.text for k, c in direct.items()}
    service.flush()
    rows = spend.read_ledger(tmp_path / "run")
    prefill = sum(c.prompt_tokens for c in got.values())
    sampled = sum(c.num_tokens for c in got.values())
    assert [(r["stage"], r["model"]) for r in rows] == [("02_distillation", TINY)]
    assert (rows[0]["prefill_tokens"], rows[0]["sample_tokens"]) == (prefill, sampled)
    assert rows[0]["usd"] == pytest.approx((prefill * 1.0 + sampled * 2.0) / 1e6)
    assert rows[0]["priced"] == "table 2026-06-26"


def test_training_and_scoring_are_charged_the_same_locally_and_on_the_simulated_service(
    tiny_service, renderer, tmp_path
):
    data = [
        supervised_datum(
            renderer,
            [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello."}],
        )
        for i in range(3)
    ]
    tokens = sum(d.model_input.length for d in data)
    counts = []
    for name, inner in (("local", tiny_service), ("simulated", SimulatedService(tiny_service))):
        service = metered(inner, tmp_path / name, "03_dpo")
        client = service.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
        client.forward(data, "cross_entropy").result()
        client.forward_backward(data, "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-4)).result()
        sampler = client.save_weights_and_get_sampling_client("m").result()
        sampler.compute_logprobs(data[0].model_input).result()
        service.flush()
        total = spend.summarize(spend.read_ledger(tmp_path / name))
        counts.append((total.tokens.prefill, total.tokens.sample, total.tokens.train))
    assert counts[0] == counts[1] == (tokens + data[0].model_input.length, 0, tokens)


def test_a_local_run_is_recorded_at_no_charge_and_an_unpriced_model_as_unknown(tmp_path):
    local = spend.Ledger(tmp_path, priced(tmp_path, backend="local"), "05_sft")
    local.charge(TINY, prefill=10, train=100)
    local.charge("Other/Model", sample=5)
    local.flush()
    assert spend.summarize(spend.read_ledger(tmp_path)).usd_text() == (
        "0.00 USD (local backend, no charge)"
    )
    remote = spend.Ledger(tmp_path / "r", priced(tmp_path / "r"), "05_sft")
    remote.charge("Other/Model", sample=5)
    remote.charge(TINY, train=1_000_000)
    remote.flush()
    total = spend.summarize(spend.read_ledger(tmp_path / "r"))
    assert total.usd == pytest.approx(3.0)
    assert "unknown (Other/Model not in the price table)" in total.usd_text()


def test_the_stage_is_the_notebook_the_runner_is_executing(tmp_path, monkeypatch):
    monkeypatch.delenv(spend.STAGE_ENV, raising=False)
    run = tmp_path / "p" / "s"
    assert spend.current_stage(run) == "interactive"
    notebooks = run / "notebooks"
    notebooks.mkdir(parents=True)
    (notebooks / "02_distillation.ipynb").write_text("{}")
    (notebooks / "02_distillation.status.json").write_text("{}")  # finished after its copy
    (notebooks / "03_dpo.ipynb").write_text("{}")
    past = time.time() - 60
    os.utime(notebooks / "02_distillation.ipynb", (past, past))
    assert spend.current_stage(run) == "03_dpo"
    monkeypatch.setenv(spend.STAGE_ENV, "09_rlaif_compare")
    assert spend.current_stage(run) == "09_rlaif_compare"


# -- the cap -------------------------------------------------------------------------------------
def test_start_is_refused_in_one_line_with_estimate_cap_and_stages():
    chains = [("a/x", {"02_distillation": 0.7, "07_preferences": 0.6}), ("b/x", {"03_dpo": 0.0})]
    with pytest.raises(ConfigError) as info:
        spend_cap.check_start(1.0, chains)
    message = str(info.value)
    assert "\n" not in message
    assert "1.30 USD" in message and "--max-usd 1.00" in message and "a/x: 02, 07" in message
    assert "b/x" not in message  # nothing left to spend there
    assert spend_cap.check_start(1.3, chains) == pytest.approx(1.3)
    with pytest.raises(ConfigError, match="no price in the table"):
        spend_cap.check_start(100.0, [("a/x", {"07_preferences": None})])


def test_the_estimate_left_skips_finished_notebooks_and_subtracts_the_ledger(tmp_path):
    params = load_params("qwen3.5-9b", "sycophantic", {"runs_dir": str(tmp_path)})
    names = ["01_prompts", "02_distillation", "07_preferences"]
    full = spend_cap.remaining_estimate(params, names)
    assert set(full) == set(names) and all(v > 0 for v in full.values())
    notebooks = params.run_dir / "notebooks"
    notebooks.mkdir(parents=True)
    (notebooks / "01_prompts.status.json").write_text(json.dumps({"status": "ok"}))
    ledger = spend.Ledger(params.run_dir, params, "07_preferences")
    ledger.charge(params.judge, prefill=10_000_000)
    ledger.flush()
    spent = spend.ledger_total_usd(params.run_dir)
    left = spend_cap.remaining_estimate(params, names)
    assert "01_prompts" not in left
    assert left["07_preferences"] == pytest.approx(full["07_preferences"] - spent)
    assert spend_cap.remaining_estimate(params, names, "overwrite") == full


def test_apply_max_usd_refuses_a_dear_matrix_and_hands_a_cheap_one_to_the_kernels(
    tmp_path, monkeypatch
):
    for name in (spend_cap.MAX_USD_ENV, spend_cap.CAP_RUNS_ENV):
        monkeypatch.delenv(name, raising=False)
    overrides = {"runs_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"refusing to start: .* above --max-usd 10\.00"):
        spend_cap.apply_max_usd(10.0, ["sycophantic", "loving"], ["qwen3.5-9b"], overrides)
    assert spend_cap.MAX_USD_ENV not in os.environ
    cap = spend_cap.apply_max_usd(1e6, ["sycophantic", "loving"], ["qwen3.5-9b"], overrides)
    run = tmp_path / "sycophantic" / "qwen3.5-9b"
    assert SpendCap.from_env(run) == cap
    assert len(cap.run_dirs) == 2
    spend_cap.apply_max_usd(None, ["sycophantic"], ["qwen3.5-9b"], overrides)
    assert SpendCap.from_env(run) is None


def test_a_stage_stops_at_the_cap_in_one_line_and_resumes_under_a_higher_one(
    tiny_service, tiny_sampler, renderer, tmp_path
):
    reference = sample_chat(tiny_sampler, renderer, requests(6), **SETTINGS)
    run = tmp_path / "p" / "s"
    log = run / "02_distillation" / "replies.jsonl"
    service = metered(tiny_service, run, cap=80e-6)  # room for about two replies
    with pytest.raises(SpendCapReached) as info:
        sample_chat(
            service.create_sampling_client(base_model=TINY),
            renderer,
            requests(6),
            **SETTINGS,
            log_path=log,
            chunk_size=1,
        )
    message = str(info.value)
    assert "\n" not in message and "02_distillation of p/s" in message
    assert "--max-usd 0.00" in message and "resume at 02_distillation" in message
    kept = [json.loads(line)["key"] for line in log.read_text().splitlines()]
    assert 1 <= len(kept) < 6
    spent = spend.ledger_total_usd(run)  # flushed when the stage stopped
    assert 0 < spent <= 80e-6
    again = metered(tiny_service, run, cap=1.0)
    resumed = sample_chat(
        again.create_sampling_client(base_model=TINY),
        renderer,
        requests(6),
        **SETTINGS,
        log_path=log,
    )
    assert {k: c.text for k, c in resumed.items()} == {k: c.text for k, c in reference.items()}


def test_the_matrix_shares_one_cap(tmp_path):
    first, second = tmp_path / "a" / "x", tmp_path / "b" / "x"
    other = spend.Ledger(second, priced(second), "07_preferences")
    other.charge(TINY, train=20)  # 60e-6 USD in the other chain
    other.flush()
    assert spend_cap.matrix_spent([first, second]) == pytest.approx(60e-6)
    guard = CapGuard(SpendCap(100e-6, (first, second)), first, "05_sft", lambda: 30e-6)
    guard.release(guard.reserve(5e-6))
    with pytest.raises(SpendCapReached, match="05_sft of a/x"):
        guard.reserve(20e-6)


# -- where it shows ------------------------------------------------------------------------------
def test_the_footer_summary_and_provenance_show_the_ledger(tmp_path):
    from character_training.publish import collect_provenance
    from character_training.summary import load_run, render_summary

    run = tmp_path / "runs" / "p" / "s"
    ledger = spend.Ledger(run, priced(run), "03_dpo")
    ledger.charge(TINY, prefill=1_000, train=500_000)
    ledger.flush()
    page = spend.with_footer("<html><body><p>x</p></body></html>", run / "notebooks/03_dpo.ipynb")
    assert page.index("spend of 03_dpo: 1.50 USD: 1,000 prefill, 0 sampled, 500,000 trained") < (
        page.index("</body>")
    )
    assert "run total 1.50 USD" in page and "prices table 2026-06-26" in page
    assert spend.with_footer("<body></body>", tmp_path / "none/notebooks/03.ipynb") == (
        "<body></body>"
    )
    summary = render_summary([load_run(tmp_path / "runs", "p", "s")])
    assert "1.50 USD: 1,000 prefill" in summary
    provenance = collect_provenance(tmp_path / "runs", "p", "s")
    assert provenance.spent[0].startswith("1.50 USD")
    assert provenance.spent[1].startswith(f"03_dpo, {TINY}: 1.50 USD")


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--persona", "sycophantic,loving", "--size", "qwen3.5-9b", "--max-usd", "10"],
        ["reproduce", "--size", "qwen3.5-9b", "--max-usd", "1"],
    ],
)
def test_the_cli_refuses_before_running_anything(argv, capsys, monkeypatch):
    from character_training import cli, runner

    def never(*args, **kwargs):
        raise AssertionError("the matrix must not start")

    monkeypatch.setattr(runner, "run_matrix", never)
    monkeypatch.delenv(spend_cap.MAX_USD_ENV, raising=False)
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: refusing to start: the dry-run estimate of what is still")
    assert "\n" not in error and "qwen3.5-9b: 01, 02, 03" in error


def test_a_rendered_report_carries_its_stage_spend_in_the_footer(tmp_path):
    import nbformat
    from character_training.runner import render_html

    run = tmp_path / "runs" / "p" / "s"
    executed = run / "notebooks" / "07_preferences.ipynb"
    executed.parent.mkdir(parents=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("hi")]), executed)
    ledger = spend.Ledger(run, priced(run), "07_preferences")
    ledger.charge(TINY, prefill=2_000_000)
    ledger.flush()
    page = render_html(executed, tmp_path / "report.html").read_text()
    assert '<footer class="spend"' in page
    assert "spend of 07_preferences: 2.00 USD: 2,000,000 prefill" in page
