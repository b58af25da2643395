"""Every figure a notebook shows, as functions of plain records (no notebook logic).

Each function returns a matplotlib ``Figure`` so notebooks display it and reports embed it
(nbconvert inlines PNG outputs into the HTML). `table` is the one way a notebook shows a table
whose rows are records: headed by what it shows, without the row numbers pandas would add.

Length: one module on purpose: every figure a notebook draws shares the palette, the method
names and the interval conventions defined at the top, so a reader finds all of them in one
place; each function is a short, independent figure (the summary page's own figures live with
it in `summary_sections`).
"""

from __future__ import annotations

import html
from collections import Counter
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Patch


class Table:
    """A table in a report: an optional heading, then the frame without its index.

    pandas shows a record table with row numbers 0, 1, 2... that mean nothing to a reader;
    tables whose index does carry meaning (counts by name, a pivot) are shown as frames.
    Renders as HTML in notebooks and reports, and as aligned text elsewhere.
    """

    def __init__(self, frame: Any, title: str = ""):
        self.frame = frame
        self.title = title

    def _repr_html_(self) -> str:
        """The frame as HTML; intervals stored as pairs read ``[low, high]``, and a ``*reason``
        longer than `NOTE_CHARS` (why a row is "no measurement") becomes a numbered note under
        the table, so one long cell cannot squeeze every other column into a tall narrow strip.
        Other text (replies in a side-by-side table) stays in its cell."""
        heading = f"<p><strong>{html.escape(self.title)}</strong></p>" if self.title else ""
        notes: list[str] = []

        def cell(value: Any, noted: bool) -> Any:
            if isinstance(value, (tuple, list)) and value and all(_is_number(v) for v in value):
                return "[" + ", ".join(f"{float(v):.3g}" for v in value) + "]"
            if noted and isinstance(value, str) and len(value) > NOTE_CHARS:
                if value not in notes:
                    notes.append(value)
                return f"note {notes.index(value) + 1}"
            return value

        from pandas.api.types import is_numeric_dtype

        frame = self.frame.copy()
        for column in frame.columns:
            if not is_numeric_dtype(frame[column]):
                noted = str(column).endswith(NOTED_SUFFIX)
                frame[column] = frame[column].map(cell, noted=noted).astype(object)
        page = heading + frame.to_html(index=False)
        if notes:
            items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
            page += f'<ol style="font-size:smaller">{items}</ol>'
        return page

    def __repr__(self) -> str:
        heading = f"{self.title}\n" if self.title else ""
        return heading + self.frame.to_string(index=False)


NOTE_CHARS = 60  # a reason longer than this is shown as a note under the table
NOTED_SUFFIX = "reason"  # columns (reason, spearman_reason) whose long text goes to the notes


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def table(rows: Any, title: str = "", digits: int | None = None) -> Table:
    """``rows`` (a DataFrame, or records) as a `Table` headed by ``title``, floats rounded to
    ``digits`` when given."""
    import pandas as pd

    if not isinstance(rows, pd.DataFrame):
        rows = pd.DataFrame(rows if isinstance(rows, Mapping) else list(rows))
    frame = rows
    return Table(frame.round(digits) if digits is not None else frame, title)


def prompts_per_assertion(records: Sequence[dict], title: str = "") -> Figure:
    """Stacked bars: hand-written vs generated prompts kept, per assertion."""
    assertions = list(dict.fromkeys(r["assertion_id"] for r in records))
    hand = Counter(r["assertion_id"] for r in records if r["source"] == "hand-written")
    gen = Counter(r["assertion_id"] for r in records if r["source"] == "generated")
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(assertions) + 1.2))
    y = range(len(assertions))
    ax.barh(y, [hand[a] for a in assertions], label="hand-written", color="#4c72b0")
    ax.barh(
        y,
        [gen[a] for a in assertions],
        left=[hand[a] for a in assertions],
        label="generated (kept)",
        color="#dd8452",
    )
    ax.set_yticks(list(y), assertions)
    ax.invert_yaxis()
    ax.set_xlabel("prompts")
    ax.set_title(title or "Constitution-relevant prompts per assertion")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def length_histograms(groups: dict[str, Sequence[str]], title: str = "") -> Figure:
    """Word-count histograms of several prompt sets on shared bins."""
    lengths = {name: [len(text.split()) for text in texts] for name, texts in groups.items()}
    top = max((max(v) for v in lengths.values() if v), default=1)
    bins = list(range(0, top + 5, max(1, (top + 5) // 30)))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name, values in lengths.items():
        if values:
            ax.hist(values, bins=bins, alpha=0.55, label=f"{name} (n={len(values)})")
    ax.set_xlabel("words per prompt")
    ax.set_ylabel("prompts")
    ax.set_title(title or "Prompt lengths")
    ax.legend()
    fig.tight_layout()
    return fig


def rejection_reasons(rejected: Sequence[dict], title: str = "") -> Figure:
    """Why generated lines were dropped (parse failures, non-requests, duplicates)."""
    reasons = Counter(r["reason"].split(":")[0] for r in rejected)
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(1, len(reasons)) + 1.2))
    names = [name for name, _ in reasons.most_common()] or ["(none)"]
    ax.barh(names, [reasons[n] for n in names] if reasons else [0], color="#8172b2")
    ax.invert_yaxis()
    ax.set_xlabel("generated lines dropped")
    ax.set_title(title or "Rejected generator output by reason")
    fig.tight_layout()
    return fig


def training_curves(
    rows: Sequence[dict], panels: dict[str, Sequence[str]], title: str = "", smooth: int = 1
) -> Figure:
    """One panel per group of metric keys against the optimiser step (a metrics.jsonl).

    ``panels`` maps a panel title to the keys drawn in it, e.g.
    ``{"loss terms": ["dpo/loss", "dpo/nll"], "accuracy": ["dpo/accuracy"]}``. ``smooth`` > 1
    overlays a trailing moving average (the raw curve stays visible, faint), since per-step
    values of small batches are noisy.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, (name, keys) in zip(axes[0], panels.items()):
        for key in keys:
            values = [r.get(key) for r in rows]
            pts = [(s, v) for s, v in zip(steps, values) if v is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if smooth > 1 and len(ys) > smooth:
                line = ax.plot(xs, ys, alpha=0.3)[0]
                avg = [
                    sum(ys[max(0, i - smooth + 1) : i + 1])
                    / len(ys[max(0, i - smooth + 1) : i + 1])
                    for i in range(len(ys))
                ]
                ax.plot(xs, avg, color=line.get_color(), label=key)
            else:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


_PROBE_SET_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#8172b2")
_PROBE_SET_NAMES = {
    "unseen": "prompts of held-out assertions",
    "constitution": "held-out persona prompts",
    "general": "general prompts",
}


def _wrap_reason(text: str, width: int = 70) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def adherence_bars(report: Any, probe_sets: Sequence[str] | None = None, title: str = "") -> Figure:
    """Teacher-like share per model with its 95% bootstrap interval, one bar group per model.

    ``report`` is what `evaluate.adherence.measure` returns, the dict it writes to
    ``adherence.json``, or its flat row records. References (the teacher's and the student's
    own held-out replies, hatched) come first: they bound the scale, so a model's bar reads as
    "how far from the student towards the teacher". Probe sets (held-out persona prompts,
    general prompts) sit side by side; ``probe_sets`` picks and orders them. A probe set whose
    classifier could not tell the teacher from the student (rows with status "no measurement")
    gets no bars, only the words and the reason: a bar chart of a failed instrument reads as
    "no effect".
    """
    if hasattr(report, "records"):
        rows = report.records()
    elif isinstance(report, Mapping):
        rows = list(report["rows"])
    else:
        rows = list(report)
    sets = list(probe_sets or dict.fromkeys(r["probe_set"] for r in rows))
    rows = [r for r in rows if r["probe_set"] in sets]
    refs = [r["label"] for r in rows if r["kind"] == "reference"]
    labels = list(dict.fromkeys(refs + [r["label"] for r in rows]))
    by_key = {(r["label"], r["probe_set"]): r for r in rows}
    failed = {
        r["probe_set"]: r.get("reason", "")
        for r in rows
        if r.get("status", "measured") == "no measurement"
    }
    width = 0.8 / max(1, len(sets))
    fig, ax = plt.subplots(figsize=(1.1 * len(labels) + 2.5, 3.8))
    for k, probe_set in enumerate(sets):
        xs, values, errors, hatches = [], [], [[], []], []
        if probe_set in failed:
            shown = len([p for p in sets[:k] if p in failed])
            ax.text(
                0.5,
                0.9 - 0.15 * shown,
                _wrap_reason(f"{probe_set}: no measurement - {failed[probe_set]}"),
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize=8,
                color="#b03030",
            )
            continue
        for i, label in enumerate(labels):
            row = by_key.get((label, probe_set))
            if row is None:
                continue
            xs.append(i + (k - (len(sets) - 1) / 2) * width)
            values.append(row["teacher_like"])
            errors[0].append(row["teacher_like"] - row["teacher_like_low"])
            errors[1].append(row["teacher_like_high"] - row["teacher_like"])
            hatches.append("//" if row["kind"] == "reference" else "")
        bars = ax.bar(
            xs,
            values,
            width=width,
            yerr=errors,
            capsize=3,
            color=_PROBE_SET_COLORS[k % len(_PROBE_SET_COLORS)],
            edgecolor="white",
        )
        for bar, hatch, value, above in zip(bars, hatches, values, errors[1]):
            bar.set_hatch(hatch)
            ax.annotate(
                f"{value:.2f}",
                (bar.get_x() + bar.get_width() / 2, min(value + above + 0.02, 1.06)),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(range(len(labels)), [label.replace("_ref", "\n(reference)") for label in labels])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("teacher-like share of replies")
    ax.set_title(title or "Persona adherence: replies the classifier takes for the teacher's")
    if len(sets) > 1:  # plain patches: the first bar of a set may be a hatched reference
        handles = [
            Patch(color=_PROBE_SET_COLORS[k % len(_PROBE_SET_COLORS)], label=name)
            for k, name in enumerate(_PROBE_SET_NAMES.get(s, s) for s in sets)
        ]
        ax.legend(handles=handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


_SIDE_COLORS = {"chosen": "#4c72b0", "rejected": "#dd8452", "pair": "#8172b2"}


def distill_drops(drops: dict[str, int], title: str = "") -> Figure:
    """Dropped distillation replies by reason, one bar per ``<side>:<reason>`` key.

    Keys come from stage 02 (``chosen:truncated``, ``rejected:empty``, ``pair:identical``);
    bars are coloured by side so a teacher problem (chosen) stands apart from a student one.
    """
    items = sorted(drops.items(), key=lambda kv: (-kv[1], kv[0]))
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(1, len(items)) + 1.2))
    if items:
        labels = [key.replace(":", ": ") for key, _ in items]
        colors = [_SIDE_COLORS.get(key.split(":")[0], "#937860") for key, _ in items]
        ax.barh(labels, [n for _, n in items], color=colors)
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "no reply was dropped", ha="center", va="center")
        ax.set_yticks([])
    ax.set_xlabel("replies dropped")
    ax.set_title(title or "Distillation: dropped replies by side and reason")
    fig.tight_layout()
    return fig


def reply_lengths(groups: dict[str, Sequence[str]], title: str = "") -> Figure:
    """Word-count histograms of reply sets (e.g. chosen vs rejected) on shared bins.

    A DPO pair whose chosen side is systematically longer teaches length as much as persona,
    so the two distributions are worth a look before training.
    """
    lengths = {name: [len(text.split()) for text in texts] for name, texts in groups.items()}
    top = max((max(v) for v in lengths.values() if v), default=1)
    step = max(1, (top + 5) // 30)
    bins = list(range(0, top + step + 1, step))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name, values in lengths.items():
        if values:
            mean = sum(values) / len(values)
            label = f"{name} (n={len(values)}, mean {mean:.0f})"
            ax.hist(values, bins=bins, alpha=0.55, label=label)
    if not any(lengths.values()):
        ax.text(0.5, 0.5, "no replies", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend()
    ax.set_xlabel("words per reply")
    ax.set_ylabel("replies")
    ax.set_title(title or "Reply lengths")
    fig.tight_layout()
    return fig


# -- 07 revealed preferences ---------------------------------------------------------------------
_MODEL_COLORS = {"base": "#4c72b0", "dpo": "#dd8452", "final": "#55a868", "rlaif": "#8172b2"}


def _model_color(label: str, k: int) -> str:
    fallback = ("#c44e52", "#937860", "#da8bc3", "#8c8c8c")
    return _MODEL_COLORS.get(label, fallback[k % len(fallback)])


def elo_distributions(
    scores: Mapping[str, Sequence[float]], title: str = "", initial: float = 1000.0
) -> Figure:
    """Histograms of trait Elo scores per model on shared bins (e.g. base vs dpo vs final).

    A model with stronger preferences spreads its traits further from ``initial`` (the
    paper's Figure 4 shape: wider and flatter after training); the legend gives each std.
    """
    values = {name: [float(v) for v in vs] for name, vs in scores.items()}
    everything = [v for vs in values.values() for v in vs] or [initial]
    low, high = min(everything), max(everything)
    if high - low < 1:
        low, high = initial - 50, initial + 50
    step = (high - low) / 20
    bins = [low + i * step for i in range(21)]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for k, (name, vs) in enumerate(values.items()):
        if vs:
            mean = sum(vs) / len(vs)
            std = (sum((v - mean) ** 2 for v in vs) / len(vs)) ** 0.5
            ax.hist(
                vs,
                bins=bins,
                alpha=0.5,
                color=_model_color(name, k),
                label=f"{name} (std {std:.0f})",
            )
    ax.axvline(initial, color="#444", lw=0.8, ls=":")
    ax.set_xlabel("Elo score")
    ax.set_ylabel("traits")
    ax.set_title(title or "Trait Elo scores per model")
    ax.legend()
    fig.tight_layout()
    return fig


def elo_changes(rows: Sequence[Mapping[str, Any]], top: int = 5, title: str = "") -> Figure:
    """The ``top`` largest increases and decreases of Elo, with paired 95% intervals.

    ``rows`` carry ``trait, change, ci_low, ci_high`` (`preferences.Result.changes`). An
    interval that crosses zero is a change the matches cannot tell from noise.
    """
    ordered = sorted(rows, key=lambda r: -r["change"])
    up = [r for r in ordered if r["change"] > 0][:top]
    down = [r for r in reversed(ordered) if r["change"] < 0][:top]
    shown = up + list(reversed(down))
    fig, ax = plt.subplots(figsize=(7, 0.38 * max(1, len(shown)) + 1.3))
    if shown:
        ys = range(len(shown))
        changes = [r["change"] for r in shown]
        errors = [
            [max(0.0, r["change"] - r["ci_low"]) for r in shown],
            [max(0.0, r["ci_high"] - r["change"]) for r in shown],
        ]
        colors = ["#55a868" if c > 0 else "#c44e52" for c in changes]
        ax.barh(list(ys), changes, xerr=errors, color=colors, capsize=3)
        ax.set_yticks(list(ys), [r["trait"] for r in shown])
        ax.invert_yaxis()
        ax.axvline(0, color="#444", lw=0.8)
    else:
        ax.text(0.5, 0.5, "no trait changed", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("Elo change (95% paired bootstrap interval)")
    ax.set_title(title or f"Largest {top} increases and decreases")
    fig.tight_layout()
    return fig


def elo_extremes(rows: Sequence[Mapping[str, Any]], n: int = 10, title: str = "") -> Figure:
    """The ``n`` highest- and lowest-rated traits of one table, with their 95% intervals."""
    ordered = sorted(rows, key=lambda r: -r["elo"])
    shown = ordered if len(ordered) <= 2 * n else ordered[:n] + ordered[-n:]
    fig, ax = plt.subplots(figsize=(7, 0.3 * max(1, len(shown)) + 1.3))
    ys = list(range(len(shown)))
    elos = [r["elo"] for r in shown]
    errors = [
        [max(0.0, r["elo"] - r["ci_low"]) for r in shown],
        [max(0.0, r["ci_high"] - r["elo"]) for r in shown],
    ]
    ax.errorbar(elos, ys, xerr=errors, fmt="o", color="#4c72b0", capsize=3)
    ax.set_yticks(ys, [f"{r['trait']} ({r['wins']}/{r['games']})" for r in shown])
    ax.invert_yaxis()
    ax.set_xlabel("Elo (95% bootstrap interval); wins/games in brackets")
    ax.set_title(title or "Highest and lowest rated traits")
    fig.tight_layout()
    return fig


def elo_spread(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Strength of trait preferences per model, one bar group per condition.

    ``rows`` are `preferences.Result.spread` records. A bar is the spread of Elo *beyond* the
    coin-flip floor with its 95% interval (0: no preference these matches can detect); a cross
    marks the raw std of Elo across traits and a dotted line the floor, the std a judge
    flipping coins gives on the same matches (Elo with a fixed K never settles). A row the
    instrument could not measure (``status`` "no measurement") gets no bar, only the words.
    """
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    by_key = {(r["model"], r["condition"]): r for r in rows}
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(1.6 * max(1, len(conditions)) + 2.5, 3.5))
    labelled: set[str] = set()

    def once(label: str) -> str | None:
        if label in labelled:
            return None
        labelled.add(label)
        return label

    for k, model in enumerate(models):
        xs, values, lows, highs = [], [], [], []
        for i, condition in enumerate(conditions):
            row = by_key.get((model, condition))
            if row is None:
                continue
            x = i + (k - (len(models) - 1) / 2) * width
            if row.get("status", "measured") == "no measurement":
                ax.text(x, 0, "no measurement", rotation=90, ha="center", va="bottom", fontsize=7)
                continue
            xs.append(x)
            values.append(row["beyond_noise"])
            lows.append(row.get("beyond_low"))
            highs.append(row.get("beyond_high"))
            ax.plot(x, row["std"], "x", color="#222", label=once("raw std of Elo"))
            ax.hlines(
                row["noise_floor"],
                x - width / 2,
                x + width / 2,
                colors="#222",
                linestyles=":",
                label=once("coin-flip floor"),
            )
        if xs:
            ax.bar(
                xs,
                values,
                width=width,
                yerr=_interval_errors(values, lows, highs),
                capsize=3,
                color=_model_color(model, k),
                label=model,
            )
    ax.set_xticks(range(len(conditions)), conditions)
    ax.set_ylabel("Elo points")
    ax.set_title(title or "Elo spread beyond the coin-flip floor (95% interval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def rank_correlations(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Matrix of Spearman correlations between rankings, each cell annotated with its p-value.

    ``rows`` carry ``a, b, spearman, p_value`` for each unordered pair (models of one run, or
    persona/size/model columns across runs). With ``ceiling`` (`preferences.Result.
    model_correlations`) a cell also gives it: the rho two measurements of unchanged
    preferences would reach, against which a rho must be read. A pair the instrument could
    not measure (``status`` "no measurement") is left blank and says so.
    """
    names = list(dict.fromkeys([r["a"] for r in rows] + [r["b"] for r in rows]))
    index = {name: i for i, name in enumerate(names)}
    size = len(names)
    matrix = [[1.0 if i == j else float("nan") for j in range(size)] for i in range(size)]
    labels: dict[tuple[int, int], str] = {}
    for r in rows:
        i, j = index[r["a"]], index[r["b"]]
        rho, p = r["spearman"], r["p_value"]
        if r.get("status", "measured") == "no measurement":
            labels[(i, j)] = labels[(j, i)] = "no\nmeasurement"
            continue
        matrix[i][j] = matrix[j][i] = rho if rho == rho else float("nan")
        text = "n/a" if rho != rho else f"{rho:.2f}\np={p:.2g}"
        ceiling = r.get("ceiling")
        if rho == rho and ceiling is not None:
            text += "\nceiling n/a" if ceiling != ceiling else f"\nceiling {ceiling:.2f}"
        labels[(i, j)] = labels[(j, i)] = text
    fig, ax = plt.subplots(figsize=(1.1 * size + 2.5, 0.9 * size + 1.8))
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm")
    for (i, j), text in labels.items():
        ax.text(j, i, text, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(size), names, rotation=45, ha="right")
    ax.set_yticks(range(size), names)
    fig.colorbar(image, ax=ax, label="Spearman rho")
    ax.set_title(title or "Rank correlation of trait Elo")
    fig.tight_layout()
    return fig


# -- robustness and coherence (notebook 08) ------------------------------------------------------
_METHOD_NAMES = {"system_prompt": "system prompt", "dpo": "dpo", "final": "final", "base": "base"}


def robustness_heatmap(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Macro F1 per method (rows) and split (columns), each cell with its 95% interval.

    ``rows`` are stage 08's F1 records (``method``, ``split``, ``macro_f1``, ``macro_f1_low``,
    ``macro_f1_high``); rows without a macro F1 (the base model's) are left out, and a cell
    whose classifier could not measure is grey and says so. Columns keep
    the order given: no instruction first, the attacks, the prefill attack last, so a persona
    that only acts shows as a row that pales to the right of its first cell.
    """
    rows = [r for r in rows if r.get("macro_f1") == r.get("macro_f1")]  # drop NaN
    methods = list(dict.fromkeys(r["method"] for r in rows))
    splits = list(dict.fromkeys(r["split"] for r in rows))
    cell = {(r["method"], r["split"]): r for r in rows}
    nan = float("nan")
    values = [
        [cell[(m, s)]["macro_f1"] if (m, s) in cell else nan for s in splits] for m in methods
    ]
    fig, ax = plt.subplots(figsize=(1.15 * len(splits) + 2.4, 0.7 * len(methods) + 1.6))
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i, m in enumerate(methods):
        for j, s in enumerate(splits):
            r = cell.get((m, s))
            if r is None:
                continue
            if r.get("status", "measured") == "no measurement":
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color="#d0d0d0"))
                ax.text(j, i, "no\nmeasurement", ha="center", va="center", fontsize=7)
                continue
            text = f"{r['macro_f1']:.2f}\n[{r['macro_f1_low']:.2f}, {r['macro_f1_high']:.2f}]"
            color = "black" if r["macro_f1"] > 0.6 else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(len(splits)), [s.replace("_", "\n") for s in splits], fontsize=8)
    ax.set_yticks(range(len(methods)), [_METHOD_NAMES.get(m, m) for m in methods])
    fig.colorbar(image, ax=ax, label="macro F1")
    ax.set_title(title or "Persona classifier macro F1 under break-character attacks")
    fig.tight_layout()
    return fig


_SUMMARY_PARTS = (
    ("no_instruction", "no instruction", "#4c72b0"),
    ("with_instructions", "with instructions (mean)", "#dd8452"),
    ("prefill", "prefill attack", "#55a868"),
)


def robustness_summary(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Per method: macro F1 without instructions, mean over the attacks, and under the prefill
    attack, as grouped bars with 95% intervals (stage 08's summary records). A method whose
    classifier could not measure gets no bars, only "no measurement"."""
    methods = [r["method"] for r in rows]
    width = 0.8 / len(_SUMMARY_PARTS)
    fig, ax = plt.subplots(figsize=(1.6 * max(1, len(methods)) + 2.5, 3.8))
    for k, (key, label, color) in enumerate(_SUMMARY_PARTS):
        xs, values, errors = [], [], [[], []]
        for i, r in enumerate(rows):
            value = r.get(key)
            if r.get("status", "measured") == "no measurement":
                if k == 0:
                    ax.text(i, 0.5, "no\nmeasurement", ha="center", va="center", fontsize=8)
                continue
            if value is None or value != value:
                continue
            xs.append(i + (k - 1) * width)
            values.append(value)
            errors[0].append(value - r[f"{key}_low"])
            errors[1].append(r[f"{key}_high"] - value)
        bars = ax.bar(xs, values, width=width, yerr=errors, capsize=3, color=color, label=label)
        for bar, value, above in zip(bars, values, errors[1]):
            top = (bar.get_x() + bar.get_width() / 2, min(value + above + 0.02, 1.06))
            ax.annotate(f"{value:.2f}", top, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(methods)), [_METHOD_NAMES.get(m, m) for m in methods])
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("macro F1")
    ax.set_title(title or "Does the persona survive attempts to break it?")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def coherence_win_rates(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Win rate of each pair's first method (consistent verdicts only), Wilson 95% interval.

    One bar per (judge mode, pair) over all personas (``group == "all"``), labelled with the
    number of consistent comparisons and the share the order swap threw out; the dashed line is
    a tie. A pair with no consistent verdict gets an empty slot and its label says so.
    """
    rows = [r for r in rows if r.get("group", "all") == "all"]
    fig, ax = plt.subplots(figsize=(1.8 * max(1, len(rows)) + 2.5, 3.6))
    labels = []
    for i, r in enumerate(rows):
        first, second = (
            _METHOD_NAMES.get(r["first"], r["first"]),
            _METHOD_NAMES.get(r["second"], r["second"]),
        )
        labels.append(f"{first}\nvs {second}\n({r['mode']})")
        rate = r["win_rate"]
        if rate == rate:  # not NaN
            low, high = r.get("low", rate - r["se"]), r.get("high", rate + r["se"])
            ax.bar(i, rate, yerr=[[rate - low], [high - rate]], capsize=4, color="#8172b2")
        share = r["inconsistent_share"]
        note = f"n={r['consistent']}\n{share:.0%} inconsistent" if share == share else "no verdict"
        ax.annotate(note, (i, 1.02), ha="center", va="bottom", fontsize=7)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlim(-0.8, max(1, len(rows)) - 0.2)
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("win rate of the first method")
    ax.set_title(title or "Coherence judge: order-consistent win rates")
    fig.tight_layout()
    return fig


_STAGE_COLORS = {"base": "#8c8c8c", "dpo": "#4c72b0", "final": "#55a868"}


def stage_lengths(stats: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Mean words per reply (bars) and the median (black marks) per persona and stage.

    ``stats`` are `stages.samples.length_stats` rows (persona, stage, mean_words, median_words,
    cut_share). Training often changes length as much as tone, and a longer reply reads as
    "more persona"; this puts the side-by-side tables in proportion. The share of replies cut
    at ``max_tokens`` is printed above each bar, since a cut reply's length is a floor.
    """
    personas = list(dict.fromkeys(r["persona"] for r in stats))
    stages = [s for s in _STAGE_COLORS if any(r["stage"] == s for r in stats)]
    stages += [s for s in dict.fromkeys(r["stage"] for r in stats) if s not in stages]
    by_key = {(r["persona"], r["stage"]): r for r in stats}
    width = 0.8 / max(1, len(stages))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(personas) * len(stages) / 2 + 2), 3.8))
    for k, stage in enumerate(stages):
        xs, means, medians, cuts = [], [], [], []
        for i, persona in enumerate(personas):
            row = by_key.get((persona, stage))
            if row is None:
                continue
            xs.append(i + (k - (len(stages) - 1) / 2) * width)
            means.append(row["mean_words"])
            medians.append(row["median_words"])
            cuts.append(row.get("cut_share", 0.0))
        color = _STAGE_COLORS.get(stage, f"C{k}")
        ax.bar(xs, means, width=width, color=color, label=stage, edgecolor="white")
        ax.scatter(xs, medians, marker="_", s=200, color="black", zorder=3)
        for x, mean, cut in zip(xs, means, cuts):
            if cut:
                ax.annotate(f"{cut:.0%} cut", (x, mean), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(personas)), personas)
    ax.set_ylabel("words per reply")
    ax.set_title(title or "Reply length by training stage (bars: mean, marks: median)")
    if stages:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def diversity_bars(stats: Mapping[str, Mapping[str, float]], title: str = "") -> Figure:
    """Distinct-1/2/3 and self-BLEU per kind of text (e.g. reflections, free, reflect chats).

    ``stats`` is `evaluate.diversity.statistics_by_kind`'s output. Low distinct ratios with a
    high self-BLEU mean the same words over and over: the collapse to watch for before SFT.
    Missing values (NaN: too few texts or words) are left out and noted.
    """
    metrics = ("distinct_1", "distinct_2", "distinct_3", "self_bleu")
    kinds = list(stats)
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(kinds) + 2), 3.5))
    for k, metric in enumerate(metrics):
        xs, values = [], []
        for i, kind in enumerate(kinds):
            value = stats[kind].get(metric)
            if value is not None and value == value:  # NaN != NaN
                xs.append(i + (k - (len(metrics) - 1) / 2) * width)
                values.append(value)
        ax.bar(xs, values, width=width, label=metric.replace("_", "-"), color=f"C{k}")
    if not kinds:
        ax.text(0.5, 0.5, "no texts", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks(range(len(kinds)), [f"{k}\n(n={stats[k].get('texts', 0)})" for k in kinds])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("ratio / score")
    ax.set_title(title or "Diversity by kind (distinct-n: higher is more varied; self-BLEU: lower)")
    ax.legend(fontsize=8, ncol=len(metrics))
    fig.tight_layout()
    return fig


def turn_lengths(interactions: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Mean words per self-interaction turn, by turn index and speaker, with the cut share.

    Turns growing shorter towards the end, or more often cut at the token limit, show a
    conversation running down or running away; prompts truncated to the window are marked.
    """
    by_turn: dict[int, list[Mapping[str, Any]]] = {}
    for record in interactions:
        for turn in record["turns"]:
            by_turn.setdefault(int(turn["turn"]), []).append(turn)
    turns = sorted(by_turn)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(turns) + 3), 3.5))
    for speaker, color in (("A", "C0"), ("B", "C1")):
        xs = [t for t in turns if by_turn[t][0]["speaker"] == speaker]
        means = [sum(len(x["text"].split()) for x in by_turn[t]) / len(by_turn[t]) for t in xs]
        ax.bar(xs, means, color=color, label=f"instance {speaker}")
        for x, mean in zip(xs, means):
            rows = by_turn[x]
            cut = sum(not r["complete"] for r in rows) / len(rows)
            trunc = sum(bool(r.get("context_dropped")) for r in rows) / len(rows)
            note = (f"{cut:.0%} cut" if cut else "") + (f"\n{trunc:.0%} trunc." if trunc else "")
            if note:
                ax.annotate(note, (x, mean), ha="center", va="bottom", fontsize=7)
    if not turns:
        ax.text(0.5, 0.5, "no turns", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    ax.set_xticks(turns, [str(t + 1) for t in turns])
    ax.set_xlabel("turn (after B's opener)")
    ax.set_ylabel("mean words")
    ax.set_title(title or "Self-interaction turns: length, replies cut, prompts truncated")
    fig.tight_layout()
    return fig


def _interval_errors(values, lows, highs) -> list[list[float]]:
    """Asymmetric error-bar lengths from point values and interval ends (0 where missing, and
    0 where a percentile interval does not contain its point estimate)."""
    below = [
        max(0.0, v - lo) if v is not None and lo is not None else 0.0 for v, lo in zip(values, lows)
    ]
    above = [
        max(0.0, hi - v) if v is not None and hi is not None else 0.0
        for v, hi in zip(values, highs)
    ]
    return [below, above]


def _share_by_step(ax: Any, rows: Sequence[Mapping[str, Any]], key: str, color: str) -> None:
    """``key`` of every row against its RL step, with the ``<key>_low``/``<key>_high``
    interval as error bars."""
    values = [r[key] for r in rows]
    ax.errorbar(
        [r["step"] for r in rows],
        values,
        yerr=_interval_errors(
            values, [r[f"{key}_low"] for r in rows], [r[f"{key}_high"] for r in rows]
        ),
        marker="o",
        capsize=4,
        color=color,
    )


def _step_axes(ax: Any, ylabel: str, title: str) -> None:
    """A share-against-RL-step panel's axes: 0 to 1 (with a margin), labels and title."""
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def rl_reward_and_adherence(series: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """The reward-hacking check of notebook 09, two panels against the RL step.

    Left: the training reward, i.e. the win rate of the policy's probe replies against the
    starting policy's as the training signal judges them (0.5 at the start by definition).
    Right: the teacher-like share of the same policy on the adherence probes (an independent
    classifier). Both with 95% intervals; reward rising while the right panel falls is the
    pattern to worry about. ``series`` are `stages.rlaif.probe_series` rows.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    _share_by_step(left, series, "reward", "#8172b2")
    left.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    _step_axes(left, "win rate vs the start", "training reward (probe)")
    pts = [r for r in series if r.get("teacher_like") is not None]
    if pts:
        _share_by_step(right, pts, "teacher_like", "#55a868")
    _step_axes(right, "teacher-like share", "adherence (independent classifier)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def model_comparison(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """One panel per metric, one bar per model, with 95% intervals.

    ``rows`` are ``{"metric", "model", "value", "low", "high"}`` (interval ends may be None);
    metrics keep their order of appearance, models their order within each metric. Used by
    notebook 09 to set rlaif next to dpo+sft ("final") and the base model on every evaluation.
    """
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    fig, axes = plt.subplots(
        1, max(1, len(metrics)), figsize=(3.2 * max(1, len(metrics)), 3.4), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics):
        part = [r for r in rows if r["metric"] == metric]
        values = [r["value"] for r in part]
        xs = range(len(part))
        colors = [_model_color(r["model"], k) for k, r in enumerate(part)]
        ax.bar(
            xs,
            [v if v is not None else 0.0 for v in values],
            yerr=_interval_errors(
                values, [r.get("low") for r in part], [r.get("high") for r in part]
            ),
            capsize=4,
            color=colors,
        )
        ax.set_xticks(list(xs), [r["model"] for r in part], fontsize=8)
        ax.set_title(metric, fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def pairwise_accuracy(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Held-out pairwise accuracy of each preference signal per data source, with 95%
    intervals over prompts; the dashed line is chance (both orders are asked, so a signal with
    a position habit sits there)."""
    signals = list(dict.fromkeys(r["signal"] for r in rows))
    sources = list(dict.fromkeys(r["source"] for r in rows))
    width = 0.8 / max(1, len(signals))
    fig, ax = plt.subplots(figsize=(1.6 * max(2, len(sources)) + 2.0, 3.4))
    for k, signal in enumerate(signals):
        part = {r["source"]: r for r in rows if r["signal"] == signal}
        xs = [i + (k - (len(signals) - 1) / 2) * width for i, s in enumerate(sources) if s in part]
        vals = [part[s]["accuracy"] for s in sources if s in part]
        ax.bar(
            xs,
            vals,
            width=width,
            yerr=_interval_errors(
                vals,
                [part[s]["low"] for s in sources if s in part],
                [part[s]["high"] for s in sources if s in part],
            ),
            capsize=3,
            label=signal,
            color=f"C{k}",
        )
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(sources)), sources)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_title(title or "Does the signal prefer the teacher's reply on unseen prompts?")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
