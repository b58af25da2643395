"""``dry-run`` for a persona x size matrix: each chain's estimated cost and the total.

A single chain's dry-run is `costs.dry_run_report` (every stage, its tokens and price). A
matrix of them would be pages of stage tables, so this prints one line per chain (its tokens
and USD from the same `costs.estimate`, with the same measured lengths), a subtotal per size,
the total, the price tables' dates, and per size the evaluation sizes the money buys: the Elo
matches of stage 07 and the probe prompts of the teacher-likeness, robustness and RL measures
(`calibration.table.design_sizes`). What those sizes can detect is the `calibrate` command's
power table, which simulates for minutes, so it is named per size rather than run here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import RunParams
from .costs import StageCost, dry_run_report, estimate, measured_lengths, price_lines, total_usd


@dataclass(frozen=True)
class ChainCost:
    params: RunParams
    costs: list[StageCost]

    @property
    def usd(self) -> float | None:
        return total_usd(self.costs)

    def tokens(self, kind: str) -> int:
        return sum(getattr(c, f"{kind}_tokens") for c in self.costs)


def chain_costs(plans: Sequence[RunParams]) -> list[ChainCost]:
    """`costs.estimate` per chain, with the lengths its own dry-run would use."""
    return [ChainCost(p, estimate(p, lengths=measured_lengths(p))) for p in plans]


def _usd(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.2f}"


def _sum_usd(chains: Sequence[ChainCost]) -> float | None:
    values = [c.usd for c in chains]
    return None if any(v is None for v in values) else sum(values)  # type: ignore[misc]


def evaluation_sizes_line(params: RunParams) -> str:
    """What a size's evaluations measure with, and where their power is computed."""
    from .calibration.table import design_sizes

    s = design_sizes(params)
    return (
        f"{params.size}: 07 Elo {s.matches} matches per condition over {s.traits} traits; "
        f"teacher-likeness {s.probe_prompts} probe prompts x {s.samples_per_probe} samples; "
        f"08 {s.heldout_comparisons} held-out prompts; 09 {s.rl_probe_prompts} RL probes. "
        f"What these detect (80% power) and their false-positive rates: "
        f"python -m character_training calibrate --size {params.size}"
    )


def matrix_report(plans: Sequence[RunParams]) -> str:
    """What ``dry-run --persona a,b --size x,y`` prints (one chain: the full stage table)."""
    if len(plans) == 1:
        return dry_run_report(plans[0])
    chains = chain_costs(plans)
    header = f"{'chain':<34}{'backend':<9}{'prefill':>15}{'sample':>14}{'train':>14}{'USD':>12}"
    lines = [f"Planned cost of {len(chains)} chains (persona x size):", header]

    def row(label: str, backend: str, group: Sequence[ChainCost]) -> str:
        return (
            f"{label[:33]:<34}{backend:<9}{sum(c.tokens('prefill') for c in group):>15,}"
            f"{sum(c.tokens('sample') for c in group):>14,}"
            f"{sum(c.tokens('train') for c in group):>14,}{_usd(_sum_usd(group)):>12}"
        )

    for chain in chains:
        p = chain.params
        lines.append(row(f"{p.persona}/{p.size}", p.backend, [chain]))
    sizes = list(dict.fromkeys(c.params.size for c in chains))
    lines.append("")
    for size in sizes:
        group = [c for c in chains if c.params.size == size]
        lines.append(row(f"{size} ({len(group)} personas)", group[0].params.backend, group))
    lines.append(row("total", "", chains))
    lines.append("")
    by_size = {
        size: price_lines(first.params, first.costs)
        for size in sizes
        for first in [next(c for c in chains if c.params.size == size)]
    }
    if all(found == by_size[sizes[0]] for found in by_size.values()):
        lines.extend(by_size[sizes[0]])  # one price table for every size: said once
    else:
        lines.extend(f"{size}: {line}" for size, found in by_size.items() for line in found)
    unknown = [c for c in chains if c.usd is None]
    if unknown:
        lines.append(
            f"{len(unknown)} chain(s) have a model without a price; the total is unknown "
            "(run dry-run on one of them for the stage table)"
        )
    lines.append("")
    lines.append("What the evaluations buy, per size:")
    lines.extend(evaluation_sizes_line(next(p for p in plans if p.size == s)) for s in sizes)
    lines.append("One chain's stages: python -m character_training dry-run --persona P --size S")
    return "\n".join(lines)
