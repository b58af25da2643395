"""The summary page's HTML: the page frame and tables (shared with `publish`), the per-metric
sections and their figures.

Each section shows one metric of every run side by side: the numbers with their intervals, a
value a notebook could not measure as "no measurement (<reason>)" (never a number), and a
figure by size per persona. The sections only read `RunSummary` records (`summary` fills them),
so they live apart from the file readers. Figures (matplotlib, inlined as base64 PNG) are drawn
here rather than in `plots.py`: they take these records and exist only for this page.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import summary_records as records
from .summary_records import Interval, RunSummary, num, teacher_like_key
from .summary_sizes import ordered_sizes, scaled_change, scaled_share

# A rho reads as "training reordered the preferences" only this far below its ceiling.
CEILING_MARGIN = 0.1


# -- the page ------------------------------------------------------------------------------------
PAGE_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
    "margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;"
    "vertical-align:top}th{background:#f4f4f4}.missing{color:#999}.failed{color:#b00}"
    ".ok{color:#070}.note{color:#555;font-size:90%}img{max-width:100%}nav a{margin-right:1em}"
    "pre{background:#f7f7f7;padding:0.5em;overflow-x:auto;font-size:85%}"
)


def page(title: str, body: str, nav: Iterable[tuple[str, str]] = ()) -> str:
    """A self-contained HTML page (inline style, no scripts, nothing fetched)."""
    links = "".join(f'<a href="{html.escape(href)}">{html.escape(text)}</a>' for href, text in nav)
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{PAGE_STYLE}</style></head><body>"
        + (f"<nav>{links}</nav>" if links else "")
        + f"<h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def cell(estimate: Interval | None, reason: str | None = None) -> str:
    """A value with its interval, "no measurement (<reason>)" when the notebook could not
    measure it, or a dash when it was not measured at all."""
    if estimate:
        return html.escape(estimate.text())
    if reason:
        return f'<span class="missing">{html.escape(f"{records.NO_MEASUREMENT} ({reason})")}</span>'
    return '<span class="missing">–</span>'


def reading_cell(reading: Interval | str | None) -> str:
    """A derived value (`Interval`), the reason it cannot be derived (str), or a dash."""
    if isinstance(reading, str):
        return cell(None, reading)
    return cell(reading)


def ordered_models(labels: Iterable[str]) -> list[str]:
    labels = list(dict.fromkeys(labels))
    known = [m for m in records.MODEL_ORDER if m in labels]
    return known + sorted(m for m in labels if m not in records.MODEL_ORDER)


def run_cell(run: RunSummary) -> str:
    """persona/size, linked to its 07 report (else its first report) when one exists."""
    label = html.escape(run.label)
    if not run.reports:
        return label
    preferred = [r for r in run.reports if Path(r).stem == records.PREFERENCES] or run.reports
    return f'<a href="{html.escape(preferred[0])}">{label}</a>'


# -- figures -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    """One line of a figure: its legend name, how to read its value from a run, its look."""

    name: str
    pick: Callable[[RunSummary], Interval | None]
    color: int = 0  # index into FIGURE_COLORS; one colour per model or method
    dotted: bool = False  # the secondary variant (F1 without instructions)


FIGURE_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def _figure_png(
    runs: Sequence[RunSummary],
    series: Sequence[Series],
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
) -> str:
    """A base64 PNG: one panel per persona, sizes on x, one line per series with error bars.

    Built on a bare `Figure` (no pyplot), so drawing here never changes the backend or the
    figure list of a notebook that imports this module. Empty string when nothing to plot.
    """
    personas = sorted({r.persona for r in runs})
    sizes = ordered_sizes(runs)
    if not any(line.pick(r) for r in runs for line in series):
        return ""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.2 * len(sizes) + 2) * len(personas), 3.6))
    axes = fig.subplots(1, len(personas), squeeze=False)[0]
    width = 0.5 / max(1, len(series))
    for ax, persona in zip(axes, personas):
        mine = {r.size: r for r in runs if r.persona == persona}
        for k, line in enumerate(series):
            points = [
                (i, est)
                for i, size in enumerate(sizes)
                if size in mine and (est := line.pick(mine[size])) is not None
            ]
            if not points:
                continue
            shift = (k - (len(series) - 1) / 2) * width
            # A bootstrap percentile interval need not contain its point estimate (resampling
            # inflates an Elo spread, so the std can sit below its interval): clip at 0.
            below = [max(0.0, e.value - e.low) if e.has_interval else 0.0 for _, e in points]  # type: ignore[operator]
            above = [max(0.0, e.high - e.value) if e.has_interval else 0.0 for _, e in points]  # type: ignore[operator]
            color = FIGURE_COLORS[line.color % len(FIGURE_COLORS)]
            ax.errorbar(
                [i + shift for i, _ in points],
                [e.value for _, e in points],
                yerr=[below, above],
                label=line.name,
                color=color,
                linestyle=":" if line.dotted else "-",
                marker="o",
                markerfacecolor="white" if line.dotted else color,
                capsize=3,
            )
        ax.set_xticks(range(len(sizes)), sizes, rotation=20)
        ax.set_xlim(-0.5, len(sizes) - 0.5)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_title(persona)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _model_series(attr: str) -> list[Series]:
    return [
        Series(m, (lambda r, m=m: getattr(r, attr).get(m)), color=k)
        for k, m in enumerate(("base", "dpo", "final", "rlaif"))
    ]


def _f1_series() -> list[Series]:
    return [
        Series(
            f"{method}, {'plain' if plain else 'attacked'}",
            (lambda r, m=method, v=variant: r.f1.get(m, {}).get(v)),
            color=k,
            dotted=plain,
        )
        for k, method in enumerate(records.F1_METHODS)
        for variant, plain in (("with_instructions", False), ("no_instruction", True))
    ]


def _img(png: str, alt: str) -> str:
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{png}"></p>' if png else ""


def _absent(runs: Sequence[RunSummary], key: str) -> str:
    lacking = [f"{r.label} ({r.missing[key]})" for r in runs if key in r.missing]
    if not lacking:
        return ""
    return f'<p class="note">Missing for: {html.escape("; ".join(lacking))}.</p>'


def _values_cell(
    run: RunSummary, values: Mapping[str, Interval], name: str, key: str, notebook: str
) -> str:
    """``values[name]``, or why ``notebook`` withheld headline ``key``."""
    return cell(values.get(name), run.no_measurement(key, (notebook,)))


def _elo_section(runs: Sequence[RunSummary]) -> str:
    have = [r for r in runs if r.elo or r.unmeasured.get(records.PREFERENCES)]
    out = [
        "<h2>Elo spread (07)</h2>",
        '<p class="note">Standard deviation of Elo ratings across traits, per model: a wider '
        "spread means stronger preferences for some traits. Interval: bootstrap over matches.</p>",
    ]
    if have:
        out.append(
            _img(
                _figure_png(runs, _model_series("elo"), "std of Elo across traits", "Elo spread"),
                "Elo spread by size",
            )
        )
        models = ordered_models(m for r in have for m in r.elo)
        rows = [
            [run_cell(r), html.escape(r.elo_setting)]
            + [_values_cell(r, r.elo, m, f"elo_std_{m}", records.PREFERENCES) for m in models]
            for r in have
        ]
        out.append(table(["run", "setting", *models], rows))
    changed = [r for r in runs if r.elo_change or r.elo_beyond_noise]
    if changed:
        out.append(
            '<p class="note">Change of the spread from the base model (paired bootstrap over the '
            "same matches), and the spread beyond what coin-flip verdicts on the same matches "
            "would give: what the size answer above compares.</p>"
        )
        trained = ordered_models(m for r in changed for m in r.elo_change)
        noisy = ordered_models(m for r in changed for m in r.elo_beyond_noise)
        rows = [
            [run_cell(r)]
            + [
                _values_cell(r, r.elo_change, m, f"elo_std_change_{m}", records.PREFERENCES)
                for m in trained
            ]
            + [
                _values_cell(
                    r, r.elo_beyond_noise, m, f"elo_spread_beyond_noise_{m}", records.PREFERENCES
                )
                for m in noisy
            ]
            for r in changed
        ]
        header = [f"{m} - base" for m in trained] + [f"{m} beyond noise" for m in noisy]
        out.append(table(["run", *header], rows))
    out.append(_absent(runs, "elo"))
    return "".join(out)


def spearman_ceiling(run: RunSummary, model: str) -> float | None:
    """The ceiling of Spearman(base, model): recorded by 07, else sqrt(rel_base * rel_model)
    from the recorded reliabilities; None when unknown, not measured (07's headline says why) or
    when a reliability is not positive."""
    if run.no_measurement(f"spearman_ceiling_{model}", (records.PREFERENCES,)):
        return None
    if model in run.spearman_ceiling:
        return run.spearman_ceiling[model]
    base, other = run.elo_reliability.get(records.BASE), run.elo_reliability.get(model)
    if base is None or other is None or base.value <= 0 or other.value <= 0:
        return None
    return math.sqrt(base.value * other.value)


def spearman_reading(
    rho: float,
    ci: tuple[float, float] | None,
    ceiling: float | None,
    base_reliability: float | None,
    no_ceiling: str = "no reliabilities",
) -> str:
    """What a between-model Spearman may be read as, given the measurement's ceiling.

    Two measurements of unchanged preferences correlate only up to sqrt(rel_base * rel_model),
    so "low means training reordered the preferences" holds only when that ceiling is well
    (`CEILING_MARGIN`) above the rho's interval; otherwise a low rho is indistinguishable from
    the measurement's own noise. A rho well above the ceiling cannot come from the models'
    preferences alone (their own rankings are less reliable than that): it is read as such.
    ``no_ceiling`` says why there is no ceiling, if there is none.
    """
    if ceiling is None:
        if base_reliability is not None and base_reliability <= 0:
            return (
                f"the base model's Elo ranking does not agree with itself (split-half "
                f"reliability {base_reliability:.2f}), so a low rho cannot be told from noise"
            )
        return f"no ceiling recorded ({no_ceiling}), so a low rho cannot be told from noise"
    if rho - ceiling >= CEILING_MARGIN:
        return (
            f"rho is above its ceiling {ceiling:.2f}: the rankings share the judge's reading of "
            "the same matches, so rho says nothing about whether training kept the preferences"
        )
    upper = ci[1] if ci else rho
    if ceiling - upper >= CEILING_MARGIN:
        return (
            f"the ceiling {ceiling:.2f} is well above the interval: low means training "
            "reordered the preferences"
        )
    return f"the measurement's ceiling is {ceiling:.2f}, so a low rho cannot be told from noise"


def _spearman_section(runs: Sequence[RunSummary]) -> str:
    have = [r for r in runs if r.spearman or r.unmeasured.get(records.PREFERENCES)]
    out = [
        "<h2>Spearman vs base (07)</h2>",
        '<p class="note">Rank correlation of Elo over traits between the base model and each '
        "trained model, with a 95% interval from the paired bootstrap over matches and the "
        "p-value in parentheses. Beside it: the split-half reliability of each model's Elo "
        "ranking (Spearman-Brown corrected), the ceiling sqrt(reliability of base x reliability "
        "of the model), which is what two measurements of unchanged preferences would give, and "
        "the disattenuated rho (rho / ceiling). A low rho means training reordered the "
        f"preferences only where the ceiling is at least {CEILING_MARGIN:.1f} above its "
        "interval; the last column says which reading holds.</p>",
    ]
    rows = []
    for r in have:
        models = ordered_models(
            [m for m in r.spearman]
            + [
                k[len("spearman_base_") :]
                for k in r.unmeasured.get(records.PREFERENCES, {})
                if k.startswith("spearman_base_") and not k.endswith(("_ci", "_p"))
            ]
        )
        for m in models:
            value = r.spearman.get(m)
            base_rel = r.elo_reliability.get(records.BASE)
            ceiling = spearman_ceiling(r, m)
            why = r.no_measurement(f"spearman_ceiling_{m}", (records.PREFERENCES,))
            disattenuated = r.spearman_disattenuated.get(m)
            if disattenuated is None and value is not None and ceiling:
                disattenuated = Interval(value[0] / ceiling)
            if value is None:
                rho_cell = cell(
                    None, r.no_measurement(f"spearman_base_{m}", (records.PREFERENCES,))
                )
                reading = ""
            else:
                p = f" (p={value[1]:.2g})" if value[1] is not None else ""
                ci = r.spearman_ci.get(m)
                band = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
                rho_cell = html.escape(f"{value[0]:.2f}{band}{p}")
                reliability = base_rel.value if base_rel else None
                reading = html.escape(
                    spearman_reading(value[0], ci, ceiling, reliability, why or "no reliabilities")
                )
            rows.append(
                [
                    run_cell(r),
                    html.escape(f"base vs {m}"),
                    rho_cell,
                    _values_cell(
                        r,
                        r.elo_reliability,
                        records.BASE,
                        f"elo_reliability_{records.BASE}",
                        records.PREFERENCES,
                    ),
                    _values_cell(
                        r, r.elo_reliability, m, f"elo_reliability_{m}", records.PREFERENCES
                    ),
                    cell(Interval(ceiling) if ceiling is not None else None, why),
                    cell(
                        disattenuated,
                        r.no_measurement(f"spearman_disattenuated_{m}", (records.PREFERENCES,)),
                    ),
                    reading,
                ]
            )
    if rows:
        header = ["run", "models", "Spearman", "base reliability", "model reliability"]
        out.append(table([*header, "ceiling", "disattenuated", "reading"], rows))
    out.append(_absent(runs, "spearman"))
    return "".join(out)


def _f1_section(runs: Sequence[RunSummary]) -> str:
    have = [r for r in runs if r.f1 or r.unmeasured.get(records.ROBUSTNESS)]
    out = [
        "<h2>Classifier F1 (08)</h2>",
        '<p class="note">Macro F1 of the persona classifier on held-out prompts, per method, '
        "without instructions and averaged over the adversarial instructions (attacked). Higher "
        "means the persona stays recognisable. Interval: bootstrap over prompts.</p>",
    ]
    if have:
        out.append(
            _img(
                _figure_png(runs, _f1_series(), "macro F1", "Classifier F1", (0, 1.02)),
                "F1 by size",
            )
        )
        methods = ordered_models(
            [m for r in have for m in r.f1]
            + [m for r in have for m in records.F1_METHODS if _f1_withheld(r, m)]
        )
        out.append(_f1_grid(have, methods, lambda r: r.f1, "f1", "{m}"))
    diffs = [r for r in runs if r.f1_diff]
    if diffs:
        out.append(
            "<p class=\"note\">Each method's macro F1 minus the system-prompted model's on the "
            "same prompts (paired bootstrap): above 0, training made the persona more "
            "recognisable than asking for it.</p>"
        )
        methods = ordered_models(m for r in diffs for m in r.f1_diff)
        out.append(_f1_grid(diffs, methods, lambda r: r.f1_diff, "f1_diff", "{m} - system prompt,"))
    out.append(_absent(runs, "f1"))
    return "".join(out)


def _f1_grid(
    runs: Sequence[RunSummary],
    methods: Sequence[str],
    values_of: Any,
    key: str,
    column: str,
) -> str:
    """One row per run, one column per (method, plain or attacked): F1 levels or differences
    (``values_of(run)[method][variant]``), withheld values read "no measurement"."""
    header = ["run"] + [
        f"{column.format(m=m)} {'plain' if v == 'no_instruction' else 'attacked'}"
        for m in methods
        for v in records.F1_VARIANTS
    ]
    rows = [
        [run_cell(r)]
        + [
            _values_cell(r, values_of(r).get(m, {}), v, f"{key}_{m}_{v}", records.ROBUSTNESS)
            for m in methods
            for v in records.F1_VARIANTS
        ]
        for r in runs
    ]
    return table(header, rows)


def _f1_withheld(run: RunSummary, method: str) -> bool:
    return any(
        run.no_measurement(f"f1_{method}_{v}", (records.ROBUSTNESS,)) for v in records.F1_VARIANTS
    )


def _teacher_like_cell(run: RunSummary, label: str) -> str:
    reason = None
    if label not in run.teacher_like:
        reason = run.no_measurement(teacher_like_key(label), records.ADHERENCE_NOTEBOOKS)
    return cell(run.teacher_like.get(label), reason)


def _scaled_final(run: RunSummary) -> tuple[str, str, str]:
    """Cells: final - base (paired), that change and final's share on the common scale."""
    paired = run.teacher_like_change.get("final")
    if paired is None:
        reason = run.no_measurement("final_minus_base", records.ADHERENCE_NOTEBOOKS)
        change = cell(None, reason)
        scaled = cell(None, reason)
    else:
        change = cell(paired.change)
        if paired.teacher_ref is None or paired.student_ref is None:
            scaled = cell(None, "no reference rows measured with it")
        else:
            scaled = reading_cell(
                scaled_change(paired.change, paired.student_ref, paired.teacher_ref)
            )
    share, student = run.teacher_like.get("final"), run.teacher_like.get("student_ref")
    teacher = run.teacher_like.get("teacher_ref")
    level = reading_cell(
        scaled_share(share, student, teacher) if share and student and teacher else None
    )
    return change, scaled, level


def _teacher_like_section(runs: Sequence[RunSummary]) -> str:
    have = [
        r
        for r in runs
        if r.teacher_like or any(r.unmeasured.get(n) for n in records.ADHERENCE_NOTEBOOKS)
    ]
    out = [
        "<h2>Teacher-likeness (03, 05, 09)</h2>",
        '<p class="note">Share of replies (no system prompt) that the adherence classifier takes '
        "for the persona-prompted teacher's, on held-out constitution prompts; the teacher and "
        "student references bound what a model can reach. Interval: bootstrap over prompts. "
        "The classifier is refit for every run, so the last three columns put final on that "
        "run's own scale, 0 at the student reference and 1 at the teacher reference (paired "
        "change from base, and the share), with intervals from the ends of the change's or "
        "share's and both references' intervals; no scale where the references' intervals are "
        "not apart.</p>",
    ]
    if have:
        out.append(
            _img(
                _figure_png(
                    runs,
                    _model_series("teacher_like"),
                    "teacher-like share",
                    "Teacher-likeness",
                    (0, 1.02),
                ),
                "Teacher-likeness by size",
            )
        )
        labels = [m for m in ("base", "dpo", "final", "rlaif")] + list(records.REFERENCES)
        header = ["run"] + [records.REFERENCES.get(m, m) for m in labels]
        header += ["final - base", "final - base, scaled", "final, scaled"]
        rows = [
            [run_cell(r)] + [_teacher_like_cell(r, m) for m in labels] + list(_scaled_final(r))
            for r in have
        ]
        out.append(table(header, rows))
    out.append(_absent(runs, "teacher_like"))
    return "".join(out)


def _rlaif_section(runs: Sequence[RunSummary]) -> str:
    have = [r for r in runs if r.rlaif]
    out = [
        "<h2>RLAIF vs DPO+SFT (09)</h2>",
        '<p class="note">Notebook 09\'s headline: the RL reward at the end (win rate against the '
        "starting policy), teacher-likeness of final (DPO+SFT) and rlaif and their paired "
        "difference, Elo spread, attacked F1, and the reward-hacking verdict.</p>",
    ]
    if have:
        rows = []
        for r in have:
            h = r.rlaif
            elo = h.get("elo_std") or {}
            f1 = h.get("f1") or {}
            setting = ", ".join(
                f"{k} {h[k]}" for k in ("signal", "init", "kl_coef", "steps") if k in h
            )
            cells = [
                _values_cell(r, h, key, key, records.RLAIF)
                for key in ("reward_end", "teacher_like_final", "teacher_like_rlaif")
            ]
            rows.append(
                [
                    run_cell(r),
                    html.escape(setting),
                    *cells,
                    _values_cell(r, h, "rlaif_minus_final", "rlaif_minus_final", records.RLAIF),
                    html.escape(f"{num(elo.get('final'))} / {num(elo.get('rlaif'))}"),
                    html.escape(f"{_f1_attacked(f1, 'final')} / {_f1_attacked(f1, 'rlaif')}"),
                    html.escape(str(h.get("verdict", "n/a"))),
                ]
            )
        out.append(
            table(
                [
                    "run",
                    "setting",
                    "reward at end",
                    "teacher-like final",
                    "teacher-like rlaif",
                    "rlaif - final",
                    "Elo std final / rlaif",
                    "F1 attacked final / rlaif",
                    "reward hacking",
                ],
                rows,
            )
        )
    out.append(_absent(runs, "rlaif"))
    return "".join(out)


def _f1_attacked(f1: Mapping[str, Any], method: str) -> str:
    pair = f1.get(method)
    if isinstance(pair, (list, tuple)) and len(pair) == 2:
        return num(pair[1])
    return "n/a"


def metric_sections(runs: Sequence[RunSummary]) -> list[str]:
    """The page's per-metric sections, in the order of the pipeline."""
    return [
        _elo_section(runs),
        _spearman_section(runs),
        _f1_section(runs),
        _teacher_like_section(runs),
        _rlaif_section(runs),
    ]


__all__ = [
    "CEILING_MARGIN",
    "PAGE_STYLE",
    "cell",
    "metric_sections",
    "ordered_models",
    "page",
    "reading_cell",
    "run_cell",
    "spearman_ceiling",
    "spearman_reading",
    "table",
]
