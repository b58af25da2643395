"""Stage 06 (qualitative samples): discovering trained personas, the side-by-side tables, reply
lengths, the browser's static fallback, and notebook 06 end to end.

Bugs pinned here:

* a persona's table filled from another persona's run, or a missing stage filled from another
  stage (a persona without "final" must show an empty cell, not its dpo reply);
* the base model sampled per persona with different seeds (the base column would differ
  between tables for no reason);
* a model change that reuses an old sample log;
* a report that relies on the interactive widget (nbconvert does not draw widgets).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from character_training import plots
from character_training.backends import resolve_client, service_client_for
from character_training.config import with_overrides
from character_training.errors import DataError
from character_training.prompt_sources import qualitative_prompts
from character_training.runner import run_notebook
from character_training.stages import samples
from character_training.store import Checkpoint, record_checkpoint
from conftest import CountingService
from test_sft_stage import smoke_params


def fabricate_checkpoints(params, service, persona: str, stages=("dpo", "final"), size="tiny"):
    """Checkpoints as notebooks 03 and 05 record them, from tiny-random training clients."""
    run_dir = params.run_dir.parent.parent / persona / size
    for index, stage in enumerate(stages):
        client = resolve_client(
            service.create_lora_training_client(base_model="tiny-random", rank=4, seed=index)
        )
        record_checkpoint(
            run_dir,
            Checkpoint(
                stage,
                str(client.save_weights_for_sampler(f"{persona}-{stage}").result().path),
                str(client.save_state(f"{persona}-{stage}-state").result().path),
                "tiny-random",
                {"dpo": "03_dpo", "final": "05_sft"}[stage],
            ),
        )


def write_qualitative(run_dir: Path) -> list[dict]:
    """``01_prompts/qualitative.jsonl`` as notebook 01 writes it (no ``why`` notes)."""
    rows = [r.to_dict() for r in qualitative_prompts()]
    path = run_dir / "01_prompts" / "qualitative.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.fixture()
def two_personas(tmp_path):
    """Runs dir with sycophantic (dpo + final) and humorous (dpo only) at size tiny, plus noise:
    another size, and a persona folder without checkpoints."""
    params = with_overrides(smoke_params(tmp_path), {"sampling.max_tokens": 8})
    service = service_client_for(params)
    fabricate_checkpoints(params, service, "sycophantic")
    fabricate_checkpoints(params, service, "humorous", stages=("dpo",))
    fabricate_checkpoints(params, service, "poetic", size="qwen3.5-4b")
    (params.run_dir.parent.parent / "sarcastic" / "tiny").mkdir(parents=True)
    write_qualitative(params.run_dir)
    return params, service


def test_the_qualitative_set_tells_trait_relevant_from_neutral_prompts():
    rows = [r.to_dict() for r in qualitative_prompts()]
    categories = [r["category"] for r in rows]
    assert categories.count("trait-relevant") == categories.count("neutral") == 12
    assert set(categories) == set(samples.CATEGORIES)


def test_discovery_finds_every_trained_persona_of_the_size_and_only_those(two_personas):
    params, _ = two_personas
    found = samples.discover_trained(params.run_dir.parent.parent, "tiny")
    assert {p: sorted(c) for p, c in found.items()} == {
        "humorous": ["dpo"],
        "sycophantic": ["dpo", "final"],
    }


def test_side_by_side_tables_have_a_row_per_prompt_and_a_column_per_stage(two_personas):
    params, inner = two_personas
    service = CountingService(inner)
    result = samples.run(params, service)
    assert list(result.personas) == ["sycophantic", "humorous"]  # the notebook's persona first
    n = len(result.prompts)
    assert n == 24 and all(p["why"] for p in result.prompts)  # notes come from the package data
    # one base model for both personas: sampled once, and 3 checkpoints
    assert [c for c in service.created if "base_model" in c] == [{"base_model": "tiny-random"}]
    assert len(service.created) == 4
    assert result.counts == {"personas": 2, "prompts": 24, "replies": 24 * 5, "cut": 24 * 5}

    table = samples.side_by_side(result.rows, "sycophantic")
    assert table.shape == (n, 4) and list(table.columns) == ["prompt", "base", "dpo", "final"]
    assert (table[["base", "dpo", "final"]] != "").all().all()
    humorous = samples.side_by_side(result.rows, "humorous")
    assert humorous.shape == (n, 4) and (humorous["final"] == "").all()
    assert (humorous["dpo"] != "").all()
    assert (humorous["base"] == table["base"]).all()  # the very same base replies
    neutral = samples.side_by_side(result.rows, "sycophantic", category="neutral")
    assert neutral.shape == (12, 4)

    page = samples.side_by_side_html(result.rows, "humorous", result.prompts, caption="humorous")
    assert page.count("<tr>") == n + 1 and page.count("not trained") == n
    assert "[cut at max_tokens]" in page  # 8-token replies are all cut
    saved = [json.loads(line) for line in (result.stage_dir / "samples.jsonl").open()]
    assert saved == result.rows

    # a rerun samples nothing; a retrained checkpoint gets a new log
    again = samples.run(params, service)
    assert len(service.created) == 4 and again.rows == result.rows
    # a copied runs folder finds every log: replies are keyed by paths inside the run folder
    assert not any(Path(r["model"]).is_absolute() for r in result.rows)
    runs = Path(params.runs_dir)
    shutil.copytree(runs, runs.parent / "moved")
    moved = with_overrides(params, {"runs_dir": str(runs.parent / "moved")})
    assert samples.run(moved, service).rows == result.rows
    assert len(service.created) == 4
    fabricate_checkpoints(params, inner, "humorous", stages=("dpo",))
    samples.run(params, service)
    assert len(service.created) == 5


def test_length_stats_pool_the_shared_base_once():
    def row(persona, stage, model, pid, words, complete=True):
        return {"persona": persona, "stage": stage, "model": model, "prompt_id": pid,
                "words": words, "complete": complete}  # fmt: skip

    rows = [
        row("a", "base", "base:m", "p1", 10),
        row("a", "base", "base:m", "p2", 20),
        row("b", "base", "base:m", "p1", 10),
        row("b", "base", "base:m", "p2", 20),
        row("a", "dpo", "ckpt-a", "p1", 30, complete=False),
        row("a", "dpo", "ckpt-a", "p2", 50),
        row("b", "dpo", "ckpt-b", "p1", 40),
    ]
    stats = {(r["persona"], r["stage"]): r for r in samples.length_stats(rows)}
    assert stats[("a", "dpo")]["mean_words"] == 40 and stats[("a", "dpo")]["cut_share"] == 0.5
    assert stats[("(all)", "base")]["replies"] == 2  # not 4: one base model
    assert stats[("(all)", "dpo")]["median_words"] == 40
    assert list(stats)[-1][0] == "(all)"
    fig = plots.stage_lengths(list(stats.values()))
    assert len(fig.axes[0].patches) == len(stats)


def test_the_browser_shows_a_note_where_widgets_cannot_draw():
    rows = [
        {"persona": "x", "stage": s, "prompt_id": "q1", "text": f"<{s}> reply", "complete": True}
        for s in samples.STAGES
    ]
    prompts = [{"id": "q1", "category": "neutral", "prompt": "Convert 3 miles to km."}]
    browser = samples.SampleBrowser(rows, prompts)
    bundle = browser._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "open this notebook in Jupyter" in bundle["text/html"]
    assert "&lt;dpo&gt; reply" in browser.output.value  # escaped
    browser.stages[1].value = False  # hide dpo
    assert "&lt;dpo&gt;" not in browser.output.value and "&lt;final&gt;" in browser.output.value


def test_missing_inputs_name_the_notebook_to_run(tmp_path):
    params = smoke_params(tmp_path)
    with pytest.raises(DataError, match="run notebook 01_prompts first"):
        samples.run(params, None)
    write_qualitative(params.run_dir)
    with pytest.raises(DataError, match="run notebook 03_dpo first"):
        samples.run(params, None)


def test_notebook_06_lays_out_two_personas_in_the_report(two_personas):
    params, service = two_personas
    started = time.perf_counter()
    result = run_notebook(params, "06_samples", timeout=300)
    assert result.status == "ok", result.describe()
    assert time.perf_counter() - started < 180
    html = Path(result.html_path).read_text()
    assert html.count('class="ct-samples"') == 3  # sycophantic x 2 categories + humorous
    assert "not trained" in html and "open this notebook in Jupyter" in html
    assert html.count("data:image/png;base64") >= 1  # the length plot
    headline = json.loads((params.run_dir / "summaries" / "06_samples.json").read_text())
    assert headline["headline"]["personas"] == ["sycophantic", "humorous"]
    assert (params.run_dir / "06_samples" / "lengths.jsonl").is_file()
