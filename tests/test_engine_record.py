"""Stage manifests record what the local engine picked and the stage's prefill work
(`engine_record`, written by `store.StageDir` when a stage is done); without a local engine
(a Tinker run) they record nothing of it."""

from __future__ import annotations

import json
import weakref

from character_training import engine_record
from character_training.store import StageDir


class FakeEngine:
    """Stands for `LocalEngine`: a runtime description and cumulative prefill counters."""

    def __init__(self, dtype: str, requested: int = 0, computed: int = 0):
        self.dtype = dtype
        self.counts = {"requested": requested, "computed": computed}

    def runtime_info(self):
        return {"compute_dtype": self.dtype}

    def stats(self):
        return {"sampling": dict(self.counts), "scoring": {"requested": 0, "computed": 0}}


def test_a_done_stage_records_each_runtime_once_and_the_prefill_since_it_started(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(engine_record, "_engines", weakref.WeakValueDictionary())
    old, same = FakeEngine("float32", 1000, 400), FakeEngine("float32", 50, 50)
    for engine in (old, same):
        engine_record.register(engine)
    stage = StageDir(tmp_path / "02_distillation", tmp_path)
    stage.prepare("fp", "resume", {})
    assert "local_engine" not in stage.manifest()  # only a finished stage records it
    old.counts = {"requested": 1700, "computed": 500}  # 700 asked, 100 computed
    late = FakeEngine("bfloat16", 30, 30)  # made during the stage: counts from zero
    engine_record.register(late)
    record = stage.finish(replies=3)["local_engine"]
    assert record["runtime"] == [{"compute_dtype": "float32"}, {"compute_dtype": "bfloat16"}]
    assert record["prefill"]["sampling"] == {"requested": 730, "computed": 130, "saved": 600}
    assert record["prefill"]["scoring"] == {"requested": 0, "computed": 0, "saved": 0}
    import resource

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert abs(record["peak_rss_mb"] - peak_kb / 1024) <= 1  # this process's peak so far
    assert StageDir(stage.path, tmp_path).manifest()["local_engine"] == record


def test_without_a_local_engine_the_manifest_has_no_engine_record(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_record, "_engines", weakref.WeakValueDictionary())
    stage = StageDir(tmp_path / "07_preferences", tmp_path)
    stage.prepare("fp", "resume", {})
    assert "local_engine" not in stage.finish(matches=5)
    assert engine_record.manifest_fields(None) == {}


def test_the_report_footer_states_the_prefill_a_stage_saved(tmp_path):
    stage = tmp_path / "02_distillation"
    stage.mkdir()
    counters = {"requested": 70823, "computed": 6478, "reused": 65179}
    manifest = {"local_engine": {"prefill": {"sampling": counters, "scoring": {"requested": 0}}}}
    (stage / "manifest.json").write_text(json.dumps(manifest))
    assert engine_record.engine_line(manifest) == (
        "Local engine prefill: sampling 70,823 prompt tokens requested, 6,478 computed "
        "(91% reused from shared prefixes)."
    )
    assert "70,823 prompt tokens" in engine_record.footer_html(tmp_path, "02_distillation")
    assert engine_record.footer_html(tmp_path, "03_dpo") == ""  # no manifest: no footer
    assert engine_record.engine_line({"status": "done"}) == ""  # a Tinker stage
    manifest["local_engine"]["peak_rss_mb"] = 3072
    assert engine_record.engine_line(manifest).endswith(
        "reused from shared prefixes). Peak memory of the notebook's process by the stage's end: "
        "3.00 GiB."
    )


def test_rerunning_a_finished_stage_keeps_the_prefill_its_work_cost():
    earlier = {
        "local_engine": {
            "prefill": {"sampling": {"requested": 100, "computed": 10}},
            "peak_rss_mb": 3100,
        }
    }
    rerun = {
        "local_engine": {
            "runtime": [],
            "prefill": {"sampling": {"requested": 0}},
            "peak_rss_mb": 900,
        }
    }
    merged = engine_record.keep_earlier_work(rerun, earlier)
    assert merged["local_engine"]["peak_rss_mb"] == 3100  # the work's peak, not the rerun's
    # a later notebook re-opening the stage (09 adding a model to 07's tables) has a higher
    # peak from its own work; it is not the stage's
    later = {"local_engine": {**rerun["local_engine"], "peak_rss_mb": 4100}}
    assert engine_record.keep_earlier_work(later, earlier)["local_engine"]["peak_rss_mb"] == 3100
    assert merged["local_engine"]["prefill"]["sampling"] == {
        "requested": 100,
        "computed": 10,
        "saved": 90,
    }
    assert merged["local_engine"]["prefill"]["scoring"] == {}
    assert engine_record.keep_earlier_work(rerun, {}) is rerun  # a first finish: as measured
