"""Publishing the blog-appendix folder from fabricated runs; no model is loaded.

Pins the folder's rules: every page opens offline (nbconvert's CDN scripts for require.js,
MathJax and mermaid are removed from the copies; only ``<a>`` links may point at the web, since
they fetch nothing until followed), every relative ``href``/``src`` names a file inside the
folder (checked here with our own `html.parser` walk, not the module's checker), the summary
and provenance pages list both runs with their numbers, and a Tinker key anywhere refuses the
whole publish in one line without leaving a partial folder behind.

Also pins portable run folders: a finished run copied to another directory (the original
deleted) still builds its summary and bundle, and nothing in them names either location; a
report holding the repository's absolute path (a checkpoint path in a table, as notebooks 03
and 05 once printed) is refused.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest
from character_training.cli import main
from character_training.config import REPO_ROOT
from character_training.errors import ConfigError, DataError
from character_training.publish import (
    BUNDLE_FILE,
    link_problems,
    make_offline,
    publish,
)
from character_training.runner import NotebookResult, _write_status, render_html
from character_training.store import (
    Checkpoint,
    find_checkpoint,
    record_checkpoint,
    stage_dir,
)
from character_training.summary import build_summary
from test_summary import T0, fabricate_run

PIXEL = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)
PAPER = "https://arxiv.org/abs/2511.01689"
FAKE_KEY = "tml-" + "Ab3_x-9" * 4


@pytest.fixture(scope="module")
def nbconvert_report(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A report made by the runner's own nbconvert call: CDN scripts, a figure, links."""
    folder = tmp_path_factory.mktemp("nb")
    nb = nbformat.v4.new_notebook()
    nb.cells.append(
        nbformat.v4.new_markdown_cell(
            f"# Preferences\nSee [the notes](../docs/persona_following.md), [the paper]({PAPER}) "
            "and [below](#Preferences); $x^2$."
        )
    )
    code = nbformat.v4.new_code_cell("plot()")
    code.outputs = [
        nbformat.v4.new_output("display_data", data={"image/png": PIXEL, "text/plain": "fig"}),
        nbformat.v4.new_output(
            "display_data", data={"text/html": "<table><tr><td>elo 70</td></tr></table>"}
        ),
    ]
    nb.cells.append(code)
    executed = folder / "07_preferences.ipynb"
    nbformat.write(nb, str(executed))
    text = render_html(executed, folder / "07_preferences.html").read_text()
    assert "cdnjs.cloudflare.com" in text  # what the template loads from the web
    return text


HANDMADE = f"""<!doctype html><html><head><meta charset="utf-8">
<link rel="stylesheet" href="https://cdn.example.org/theme.css">
<style>@import url("https://fonts.example.org/css?family=Roboto"); body{{margin:0}}</style>
<script src="//cdn.example.org/lib.js"></script>
<script>var ok = 1;</script>
</head><body>
<p style="background: url(https://example.org/bg.png)">styled</p>
<img src="https://example.org/remote.png" alt="remote">
<img src="data:image/png;base64,{PIXEL}" alt="inline">
<a href="{PAPER}">the paper</a> <a href="missing/page.html">gone</a> <a href="#top">top</a>
<a href="/etc/hosts">absolute</a>
</body></html>"""


@pytest.fixture
def two_runs(tmp_path: Path, nbconvert_report: str) -> tuple[Path, Path]:
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    fabricate_run(runs, reports, "sycophantic", "tiny", 1.0, report_html=nbconvert_report)
    fabricate_run(
        runs,
        reports,
        "sycophantic",
        "qwen3.5-9b",
        1.3,
        commit="def5678",
        record_params=False,
        rlaif=False,
        report_html=HANDMADE,
    )
    return runs, reports


class _Refs(HTMLParser):
    """Every URL-valued attribute, script body and piece of CSS in one page."""

    URL_ATTRS = ("href", "src", "srcset", "poster", "data", "background", "xlink:href", "action")

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str, str]] = []
        self.scripts: list[str] = []
        self.css: list[str] = []
        self._inside = ""

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value is not None and name in self.URL_ATTRS:
                self.refs.append((tag, name, value))
            if value is not None and name == "style":
                self.css.append(value)
        if tag in ("script", "style"):
            self._inside = tag

    def handle_endtag(self, tag):
        if tag == self._inside:
            self._inside = ""

    def handle_data(self, data):
        if self._inside == "script":
            self.scripts.append(data)
        elif self._inside == "style":
            self.css.append(data)


WEB = re.compile(r"^\s*(?:(?:https?|ftp):)?//", re.IGNORECASE)


def check_offline_and_linked(bundle: Path) -> int:
    """Assert the folder's rules on every page; returns how many relative links were followed."""
    followed = 0
    pages = sorted(bundle.rglob("*.html"))
    assert pages
    for page_file in pages:
        parser = _Refs()
        parser.feed(page_file.read_text(encoding="utf-8"))
        for tag, name, value in parser.refs:
            if WEB.match(value):
                # the one allowed kind of web address: a text link the reader may follow
                assert (tag, name) == ("a", "href"), (page_file, tag, name, value)
                continue
            if value.startswith(("data:", "#", "mailto:")):
                continue
            assert not value.startswith("/"), (page_file, value)
            target = (page_file.parent / unquote(urlsplit(value).path)).resolve()
            assert target.is_file(), (page_file, value)
            assert bundle.resolve() in target.parents, (page_file, value)
            followed += 1
        for body in parser.scripts:
            assert not re.search(r"(?:https?|ftp)://", body, re.I), page_file
        for css in parser.css:
            assert not re.search(r"@import|url\(\s*['\"]?\s*(?:https?:)?//", css, re.I), page_file
    return followed


def test_bundle_of_two_runs_opens_offline_and_every_relative_link_resolves(two_runs, tmp_path):
    runs, reports = two_runs
    out = tmp_path / "site"
    result = publish(out, runs, reports)
    assert result.path == out.resolve() and result.reports == 2
    assert result.runs == ["sycophantic/qwen3.5-9b", "sycophantic/tiny"]
    for name in ("index.html", "summary.html", "provenance.html", BUNDLE_FILE):
        assert (out / name).is_file(), name
    followed = check_offline_and_linked(out)
    assert followed >= 8  # index -> reports/summary/provenance, summary -> reports, ...

    index = (out / "index.html").read_text()
    assert '<a href="summary.html">' in index and '<a href="provenance.html">' in index
    real = (out / "sycophantic" / "tiny" / "07_preferences.html").read_text()
    assert "cdnjs" not in real and "mermaid.esm" not in real
    assert f"data:image/png;base64,{PIXEL}" in real and "elo 70" in real  # content kept
    assert f'href="{PAPER}"' in real  # a link to a web page stays a link
    assert "persona_following.md" not in re.findall(r'href="([^"]*)"', real)  # unpublished
    handmade = (out / "sycophantic" / "qwen3.5-9b" / "07_preferences.html").read_text()
    assert ">gone</a>" in handmade and 'href="missing/page.html"' not in handmade
    assert "var ok = 1;" in handmade and "body{margin:0}" in handmade
    record = json.loads((out / BUNDLE_FILE).read_text())
    assert any("cdnjs.cloudflare.com" in item for item in record["removed_for_offline_reading"])
    assert any("persona_following.md" in item for item in record["unlinked"])
    assert set(record["files"]) >= {"index.html", "summary.html", "provenance.html"}
    assert not list(tmp_path.glob(".site-*"))  # the temporary build folder is gone


def test_summary_in_the_bundle_shows_both_runs_numbers(two_runs, tmp_path):
    runs, reports = two_runs
    text = (publish(tmp_path / "site", runs, reports).path / "summary.html").read_text()
    assert "70 [65, 75]" in text and "91 [86, 96]" in text  # Elo std of final per size
    assert "0.50 [0.40, 0.60]" in text and "0.65 [0.52, 0.78]" in text  # attacked F1
    assert 'href="sycophantic/qwen3.5-9b/07_preferences.html"' in text


def test_provenance_lists_both_runs_with_what_made_them(two_runs, tmp_path):
    runs, reports = two_runs
    text = (publish(tmp_path / "site", runs, reports).path / "provenance.html").read_text()
    for run, commit in (("sycophantic/tiny", "abc1234"), ("sycophantic/qwen3.5-9b", "def5678")):
        assert run in text and commit in text
    assert "08_robustness" in text  # which stages recorded the commit
    assert "papermill parameters of notebooks/07_preferences.ipynb" in text
    assert "re-resolved now from params/" in text  # the run that recorded none says so
    assert "student: Qwen/Qwen3.5-9B" in text and "judge: deepseek-ai/DeepSeek-V3.1" in text
    assert "seed=0" in text and time.strftime("%Y-%m-%d", time.gmtime(T0)) in text
    assert "USD 0.00 (local backend)" in text and "prices: USD per million tokens" in text
    assert "&quot;smoke&quot;: true" in text  # injected parameters other than params_json
    for package in ("torch", "transformers", "tinker", "tinker-cookbook"):
        assert f"<td>{package}</td>" in text


def test_a_key_anywhere_refuses_to_publish_in_one_line_and_leaves_nothing(two_runs, tmp_path):
    runs, reports = two_runs
    report = reports / "sycophantic" / "tiny" / "07_preferences.html"
    report.write_text(report.read_text() + f"<pre>key {FAKE_KEY}</pre>")
    out = tmp_path / "site"
    with pytest.raises(DataError) as caught:
        publish(out, runs, reports)
    message = str(caught.value)
    assert "\n" not in message and FAKE_KEY not in message
    assert message.startswith("refusing to publish: sycophantic/tiny/07_preferences.html")
    assert not out.exists() and not list(tmp_path.glob(".site-*"))


def test_the_environment_key_value_is_refused_too(two_runs, tmp_path, monkeypatch):
    runs, reports = two_runs
    secret = "sk-secret-value-4242"  # not the tml- pattern: only the value gives it away
    monkeypatch.setenv("TINKER_API_KEY", secret)
    summary = runs / "sycophantic" / "tiny" / "summaries" / "07_preferences.json"
    data = json.loads(summary.read_text())
    data["headline"]["note"] = f"called with {secret}"
    summary.write_text(json.dumps(data))  # reaches index.html through the headline numbers
    with pytest.raises(DataError, match="index.html contains the value of TINKER_API_KEY"):
        publish(tmp_path / "site", runs, reports)


def test_out_must_be_new_empty_or_an_earlier_bundle(two_runs, tmp_path):
    runs, reports = two_runs
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "draft.md").write_text("mine")
    with pytest.raises(ConfigError, match="not a folder written by publish"):
        publish(foreign, runs, reports)
    assert (foreign / "draft.md").read_text() == "mine"
    with pytest.raises(ConfigError, match="would overlap"):
        publish(reports, runs, reports)
    site = publish(tmp_path / "site", runs, reports).path
    (site / "stale.html").write_text("old")
    publish(site, runs, reports)  # an earlier bundle is replaced as a whole
    assert not (site / "stale.html").exists() and (site / "index.html").is_file()


def test_the_module_checker_flags_what_the_sanitiser_removes(tmp_path):
    page = tmp_path / "a" / "page.html"
    page.parent.mkdir()
    page.write_text(HANDMADE)
    problems = link_problems(tmp_path)
    for expected in ("theme.css", "//cdn.example.org/lib.js", "remote.png", "missing/page.html"):
        assert any(expected in p for p in problems), expected
    assert any("style" in p for p in problems) and not any(PAPER in p for p in problems)
    cleaned, stripped, unlinked = make_offline(HANDMADE, page, tmp_path)
    page.write_text(cleaned)
    assert link_problems(tmp_path) == []
    assert len(stripped) == 5 and len(unlinked) == 2  # missing page, absolute path


def test_cli_publish_prints_one_line_and_refusals_exit_2(two_runs, tmp_path, capsys):
    runs, reports = two_runs
    args = ["--runs-dir", str(runs), "--reports-dir", str(reports)]
    assert main(["publish", "--out", str(tmp_path / "site"), *args]) == 0
    assert capsys.readouterr().out.startswith(f"published {(tmp_path / 'site').resolve()}")
    (reports / "sycophantic" / "tiny" / "x.html").write_text(FAKE_KEY)
    assert main(["publish", "--out", str(tmp_path / "site"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: refusing to publish") and len(err.splitlines()) == 1


def test_a_report_holding_the_repository_path_is_refused_in_one_line(two_runs, tmp_path):
    runs, reports = two_runs
    report = reports / "sycophantic" / "tiny" / "07_preferences.html"
    checkpoint = REPO_ROOT / "runs" / "sycophantic" / "tiny" / "checkpoints" / "x" / "dpo"
    report.write_text(report.read_text() + f"<table><tr><td>{checkpoint}</td></tr></table>")
    out = tmp_path / "site"
    with pytest.raises(DataError) as caught:
        publish(out, runs, reports)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "refusing to publish: sycophantic/tiny/07_preferences.html contains the absolute path "
        "of the project root"
    )
    assert not out.exists() and not list(tmp_path.glob(".site-*"))
    report.write_text(report.read_text().replace(str(REPO_ROOT), "/elsewhere/project"))
    assert publish(out, runs, reports).reports == 2  # another machine's path is no leak of ours


def _finish_like_a_real_run(runs: Path, reports: Path) -> None:
    """What a finished tiny run adds beyond `fabricate_run`, written by the code that writes it
    in a real run: checkpoints, a stage manifest with inputs, status files with paths."""
    run = runs / "sycophantic" / "tiny"
    for name, stage in (("dpo", "03_dpo"), ("final", "05_sft")):
        sampler = run / "checkpoints" / "20260101-000000-1-0" / "sampler" / name
        sampler.mkdir(parents=True)
        (sampler / "adapter.safetensors").write_text("weights")
        state = sampler.parent.parent / "state" / f"{name}-final"
        record_checkpoint(run, Checkpoint(name, str(sampler), str(state), "Small/Model", stage))
    stage = stage_dir(run, "02_distillation")
    stage.prepare("fp", "resume", {"seed": 0})
    inputs = {"general_train.jsonl": str(run / "01_prompts" / "general_train.jsonl")}
    stage.write_manifest(inputs=inputs)
    stage.finish(pairs=3)
    for notebook in ("07_preferences", "08_robustness"):
        result = NotebookResult(
            "sycophantic",
            "tiny",
            notebook,
            "ok",
            str(run / "notebooks" / f"{notebook}.ipynb"),
            str(reports / "sycophantic" / "tiny" / f"{notebook}.html"),
        )
        _write_status(result, run / "notebooks")


def test_a_copied_run_folder_rebuilds_its_summary_and_bundle_with_no_trace_of_the_original(
    tmp_path, monkeypatch
):
    from character_training import store

    original = tmp_path / "machine-a"  # a project holding runs/ and reports/
    monkeypatch.setattr(store, "REPO_ROOT", original)
    runs, reports = original / "runs", original / "reports"
    fabricate_run(runs, reports, "sycophantic", "tiny", 1.0)
    _finish_like_a_real_run(runs, reports)
    copy = tmp_path / "machine-b" / "project"
    shutil.copytree(original, copy)
    shutil.rmtree(original)

    run = copy / "runs" / "sycophantic" / "tiny"
    assert find_checkpoint(run, "final").sampler_path.startswith(str(run / "checkpoints"))
    assert (Path(find_checkpoint(run, "dpo").sampler_path) / "adapter.safetensors").is_file()
    manifest = json.loads((run / "02_distillation" / "manifest.json").read_text())
    assert manifest["inputs"] == {"general_train.jsonl": "01_prompts/general_train.jsonl"}
    for written in run.rglob("*.json"):  # every record the run keeps about its files
        assert str(tmp_path) not in written.read_text(), written

    summary = build_summary(copy / "runs", copy / "reports").read_text()
    assert "70 [65, 75]" in summary and "sycophantic/tiny" in summary
    bundle = publish(tmp_path / "site", copy / "runs", copy / "reports").path
    assert (bundle / "sycophantic" / "tiny" / "07_preferences.html").is_file()
    pages = [summary] + [p.read_text() for p in bundle.rglob("*") if p.is_file()]
    for text in pages:
        assert "machine-a" not in text and str(copy) not in text
    provenance = (bundle / "provenance.html").read_text()
    assert "abc1234" in provenance and "sycophantic/tiny" in provenance
