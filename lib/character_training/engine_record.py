"""What the local engines of this process picked and did, for each stage's manifest.

Why: a run's speed, and its numbers in the last bits, depend on what the local engine picked
on the machine (compute dtype, threads, kernels, CPU flags), and a stage's cost on how much
prompt prefill the shared-prefix store saved. Stages get a service client, not an engine, and
the manifest writer (`store.StageDir`) sees neither, so engines register here when they are
made, and the manifest writer asks this module, with no import of the backend (Tinker runs
register nothing and their manifests carry none of this).

An engine is anything with ``runtime_info() -> dict`` and ``stats() -> dict`` (the local
engine's `LocalEngine`); ``stats()[kind]`` for ``kind`` in `PREFILL_KINDS` holds cumulative
counters (``requested``, ``computed``, ``reused``, ...). A stage's numbers are the
difference between the counters when it starts (`snapshot`) and when it finishes.
"""

from __future__ import annotations

import html
import itertools
import json
import sys
import weakref
from pathlib import Path
from typing import Any, Protocol

PREFILL_KINDS = ("sampling", "scoring")


class Engine(Protocol):
    def runtime_info(self) -> dict[str, Any]: ...

    def stats(self) -> dict[str, Any]: ...


# registration order -> engine, held weakly (a closed service is forgotten); ordered, so
# manifests list runtimes in the order their engines were made
_engines: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_order = itertools.count()

Snapshot = weakref.WeakKeyDictionary


def register(engine: Engine) -> None:
    """Record ``engine`` for later manifests."""
    _engines[next(_order)] = engine


def snapshot() -> Snapshot:
    """Every live engine's prefill counters now (the start of a stage)."""
    marks: Snapshot = weakref.WeakKeyDictionary()
    for engine in list(_engines.values()):
        marks[engine] = _counters(engine)
    return marks


def _counters(engine: Engine) -> dict[str, dict[str, int]]:
    stats = engine.stats()
    return {kind: dict(stats.get(kind, {})) for kind in PREFILL_KINDS}


def manifest_fields(start: Snapshot | None) -> dict[str, Any]:
    """``{"local_engine": {"runtime": [...], "prefill": {...}}}`` for a stage's manifest, or
    ``{}`` when no local engine exists in this process.

    ``runtime``: the distinct `runtime_info` of the live engines (one in a normal run).
    ``prefill``: per kind, the counters' increase since ``start`` over all engines (an engine
    made after ``start`` counts from zero), with ``saved`` = requested - computed, the prompt
    tokens the stage did not run through the model; omitted without ``start``.
    """
    engines = list(_engines.values())
    if not engines:
        return {}
    runtimes: list[dict[str, Any]] = []
    for engine in engines:
        info = engine.runtime_info()
        if info not in runtimes:
            runtimes.append(info)
    record: dict[str, Any] = {"runtime": runtimes}
    if start is not None:
        record["prefill"] = prefill_since(start, engines)
    peak = peak_rss_mb()
    if peak is not None:
        record["peak_rss_mb"] = peak
    return {"local_engine": record}


def peak_rss_mb() -> int | None:
    """The most resident memory this process has held, in MiB (None where the platform does
    not say). Each notebook runs in a kernel of its own, so a stage's manifest shows the peak
    of its notebook up to the stage's end: where a run's memory goes, stage by stage."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024))


def prefill_since(start: Snapshot, engines: list[Engine]) -> dict[str, dict[str, int]]:
    """Per kind, the sum over ``engines`` of each counter's increase since ``start``."""
    total: dict[str, dict[str, int]] = {kind: {} for kind in PREFILL_KINDS}
    for engine in engines:
        before = start.get(engine, {})
        for kind, now in _counters(engine).items():
            was = before.get(kind, {})
            for name, value in now.items():
                total[kind][name] = total[kind].get(name, 0) + value - was.get(name, 0)
    return _with_saved(total)


def _with_saved(total: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """``total`` with ``saved`` = requested - computed in every non-empty kind."""
    for counters in total.values():
        if counters:
            counters["saved"] = counters.get("requested", 0) - counters.get("computed", 0)
    return total


def engine_line(manifest: dict[str, Any]) -> str:
    """The sentences for a report's footer: the prompt tokens a stage asked the local engine
    to prefill and how many it computed (the rest came from shared prefixes), and the peak
    memory of the notebook's process; "" without a local-engine record (Tinker runs, or a
    stage from before this record existed)."""
    record = manifest.get("local_engine", {})
    prefill = record.get("prefill", {})
    parts = []
    for kind in PREFILL_KINDS:
        counters = prefill.get(kind, {})
        requested, computed = counters.get("requested", 0), counters.get("computed", 0)
        if requested:
            saved = 1 - computed / requested
            parts.append(
                f"{kind} {requested:,} prompt tokens requested, {computed:,} computed "
                f"({saved:.0%} reused from shared prefixes)"
            )
    line = ("Local engine prefill: " + "; ".join(parts) + ".") if parts else ""
    peak = record.get("peak_rss_mb")
    if peak is not None:
        gib = peak / 1024
        line = f"{line} Peak memory of the notebook's process by the stage's end: {gib:.2f} GiB."
        line = line.strip()
    return line


def footer_html(run_dir: Path, stage: str) -> str:
    """`engine_line` of ``run_dir/<stage>/manifest.json`` as a small HTML paragraph."""
    path = Path(run_dir) / stage / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    line = engine_line(manifest)
    return f'<p style="font-size:smaller;color:#555">{html.escape(line)}</p>' if line else ""


def keep_earlier_work(fields: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """``fields`` (this process's `manifest_fields`) with the prefill an earlier "done" of the
    same stage recorded added in, and the earlier peak memory: re-running a finished stage (a
    resumed chain, a notebook opened again) computes nothing new and must not erase what the
    stage's work cost.

    The peak stays the one of the process that finished the stage: a later process that
    re-opens it (09 adds the RLAIF checkpoint to 07's Elo tables) has its own history, and
    its peak written here made 07's manifest show 09's RL peak (4.0 GiB against 07's 2.8).
    That process's peak is in its own notebook's summary (`runner.write_summary`)."""
    earlier = manifest.get("local_engine", {}).get("prefill")
    now = fields.get("local_engine", {}).get("prefill")
    if not earlier or now is None:
        return fields
    total = {
        kind: {
            name: now.get(kind, {}).get(name, 0) + earlier.get(kind, {}).get(name, 0)
            for name in {**earlier.get(kind, {}), **now.get(kind, {})}
            if name != "saved"
        }
        for kind in PREFILL_KINDS
    }
    record = {**fields["local_engine"], "prefill": _with_saved(total)}
    earlier_peak = manifest.get("local_engine", {}).get("peak_rss_mb")
    if earlier_peak is not None:
        record["peak_rss_mb"] = earlier_peak
    return {**fields, "local_engine": record}
