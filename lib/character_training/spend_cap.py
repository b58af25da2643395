"""``--max-usd``: refuse a run the estimate says is too dear, stop one the ledger says is.

Two checks, one cap for a whole matrix (every persona x size of one ``run``/``reproduce``):

* **Before anything runs** (`apply_max_usd`; the CLI calls `apply_cli_cap`): the estimate
  (`costs.estimate`, with measured prompt lengths) of what is still to do, summed over the
  matrix's chains, must not exceed the cap. Still to do: the selected notebooks that have not
  finished (a status file saying ``ok``; every selected one with ``on_existing=overwrite``),
  each at its estimate less what the ledger says it already spent. Otherwise the command stops
  in one line: estimate, cap, and the stages per chain. A model without a price refuses too:
  the cap could not be enforced.
* **While it runs** (`CapGuard`, inside each notebook's kernel, through `metering`): before a
  request is sent, the matrix's spend (every chain's ledger) plus the worst case of the requests
  in flight and of this one (a reply at its ``max_tokens``) must stay within the cap; otherwise
  `SpendCapReached` stops the stage in one line naming it. Everything finished is on disk
  (sampling logs, resume points), so raising the cap and rerunning resumes at that stage.

The cap reaches the kernels papermill starts through the environment they inherit
(`MAX_USD_ENV`, and `CAP_RUNS_ENV`: the run folders sharing it); `matrix_spent` is the sum the
matrix runner can show in its live table.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CharacterTrainingError, ConfigError
from .spend import by_stage, ledger_total_usd, read_ledger

MAX_USD_ENV = "CHARACTER_TRAINING_MAX_USD"
CAP_RUNS_ENV = "CHARACTER_TRAINING_CAP_RUNS"
REFRESH_S = 10.0  # how often a kernel re-reads the other chains' ledgers


class SpendCapReached(CharacterTrainingError):
    """The next request would take the ledger past ``--max-usd``; finished work is kept."""


@dataclass(frozen=True)
class SpendCap:
    """A cap in USD shared by the runs in ``run_dirs``."""

    max_usd: float
    run_dirs: tuple[Path, ...]

    def to_env(self) -> dict[str, str]:
        return {
            MAX_USD_ENV: repr(float(self.max_usd)),
            CAP_RUNS_ENV: os.pathsep.join(str(Path(d).resolve()) for d in self.run_dirs),
        }

    @classmethod
    def from_env(cls, run_dir: Path) -> SpendCap | None:
        """The cap this process runs under, or None; ``run_dir`` is always one of its runs."""
        text = os.environ.get(MAX_USD_ENV, "").strip()
        if not text:
            return None
        try:
            max_usd = float(text)
        except ValueError:
            raise ConfigError(f"{MAX_USD_ENV}={text!r}: expected a number of USD") from None
        dirs = [Path(p) for p in os.environ.get(CAP_RUNS_ENV, "").split(os.pathsep) if p]
        own = Path(run_dir).resolve()
        return cls(max_usd, tuple(dict.fromkeys([own, *(d.resolve() for d in dirs)])))


def matrix_spent(run_dirs: Iterable[Path]) -> float:
    """Priced USD spent by all ``run_dirs`` together (their ledgers)."""
    return sum(ledger_total_usd(Path(d)) for d in run_dirs)


# -- before the run ------------------------------------------------------------------------------
def notebook_done(run_dir: Path, notebook: str) -> bool:
    import json

    status = Path(run_dir) / "notebooks" / f"{notebook}.status.json"
    try:
        return json.loads(status.read_text()).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def remaining_estimate(
    params: Any, notebooks: Sequence[str], on_existing: str = "resume"
) -> dict[str, float | None]:
    """USD per notebook still to run for one chain: its estimate (`costs.estimate`) less what
    its ledger already spent; None for a notebook with an unpriced model."""
    from .costs import estimate, measured_lengths

    spent = by_stage(read_ledger(params.run_dir))
    rows = estimate(params, lengths=measured_lengths(params))
    left: dict[str, float | None] = {}
    for notebook in notebooks:
        if on_existing != "overwrite" and notebook_done(params.run_dir, notebook):
            continue
        number = notebook.split("_", 1)[0]
        prices = [row.usd for row in rows if row.stage.startswith(number)]
        if not prices:
            continue
        if any(p is None for p in prices):
            left[notebook] = None
            continue
        earlier = spent.get(notebook)
        used = earlier.usd if earlier is not None and on_existing != "overwrite" else 0.0
        left[notebook] = max(0.0, sum(prices) - used)  # type: ignore[arg-type]
    return left


def check_start(max_usd: float, chains: Sequence[tuple[str, dict[str, float | None]]]) -> float:
    """Raise `ConfigError` in one line unless the chains' remaining estimate fits ``max_usd``;
    returns the estimate. ``chains``: (``persona/size``, `remaining_estimate`) pairs."""
    if not (max_usd >= 0 and math.isfinite(max_usd)):
        raise ConfigError(f"--max-usd {max_usd!r}: expected a number of USD >= 0")
    unpriced = [
        f"{label} {nb}" for label, left in chains for nb, usd in left.items() if usd is None
    ]
    if unpriced:
        raise ConfigError(
            f"--max-usd {max_usd:.2f}: cannot hold the cap, {', '.join(unpriced)} use(s) a model "
            "with no price in the table (dry-run shows which); add its price or run without "
            "--max-usd"
        )
    total = sum(usd or 0.0 for _, left in chains for usd in left.values())
    if total > max_usd:
        stages = "; ".join(
            f"{label}: {', '.join(nb.split('_', 1)[0] for nb, usd in left.items() if usd)}"
            for label, left in chains
            if any(left.values())
        )
        raise ConfigError(
            f"refusing to start: the dry-run estimate of what is still to do is {total:.2f} USD, "
            f"above --max-usd {max_usd:.2f} (stages {stages})"
        )
    return total


def apply_max_usd(
    max_usd: float | None,
    personas: Sequence[str],
    sizes: Sequence[str],
    overrides: dict[str, Any] | None = None,
    notebooks: str | Sequence[str] | None = None,
    on_existing: str = "resume",
) -> SpendCap | None:
    """The CLI's check before ``run``/``reproduce``: refuse (see `check_start`) or set the cap
    for the kernels this process starts; ``None`` clears any cap set earlier."""
    if max_usd is None:
        for name in (MAX_USD_ENV, CAP_RUNS_ENV):
            os.environ.pop(name, None)
        return None
    from .config import load_params
    from .runner import resolve_notebooks

    names = resolve_notebooks(notebooks)
    chains = []
    run_dirs = []
    for persona in personas:
        for size in sizes:
            params = load_params(size, persona, overrides)
            run_dirs.append(params.run_dir)
            chains.append((f"{persona}/{size}", remaining_estimate(params, names, on_existing)))
    check_start(float(max_usd), chains)
    cap = SpendCap(float(max_usd), tuple(run_dirs))
    os.environ.update(cap.to_env())
    return cap


def apply_cli_cap(
    args: Any, default_personas: Sequence[str], overrides: dict[str, Any]
) -> SpendCap | None:
    """`apply_max_usd` for the CLI's parsed ``run`` or ``reproduce`` arguments (``reproduce``:
    ``--personas`` with "default" for ``default_personas``, every notebook)."""
    if args.command == "reproduce":
        named = getattr(args, "personas", "default")
        personas = list(default_personas) if named == "default" else _split(named)
    else:
        personas = _split(args.persona)
    return apply_max_usd(
        getattr(args, "max_usd", None),
        list(dict.fromkeys(personas)),
        list(dict.fromkeys(_split(args.size))),
        overrides,
        getattr(args, "notebooks", None),
        getattr(args, "on_existing", "resume"),
    )


def _split(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


# -- while it runs -------------------------------------------------------------------------------
class CapGuard:
    """Holds one chain's requests to the cap (see the module docstring).

    ``spent_here`` is this stage's ledger total (`spend.Ledger.spent_usd`); the other chains'
    ledgers are re-read at most every `REFRESH_S` seconds. `reserve` returns a token for
    `release` once the request's answer has been charged.
    """

    def __init__(self, cap: SpendCap, run_dir: Path, stage: str, spent_here: Any):
        self.cap = cap
        self.run_dir = Path(run_dir).resolve()
        self.stage = stage
        self._spent_here = spent_here
        self._others = 0.0
        self._read_at = -math.inf
        self._held: dict[int, float] = {}
        self._next = 0
        self._lock = threading.Lock()

    def _other_chains(self) -> float:
        now = time.monotonic()
        if now - self._read_at >= REFRESH_S:
            self._others = matrix_spent(d for d in self.cap.run_dirs if d != self.run_dir)
            self._read_at = now
        return self._others

    def reserve(self, worst_usd: float, held_usd: float | None = None) -> int:
        """Check that a request costing at most ``worst_usd`` fits, or raise `SpendCapReached`;
        then hold ``held_usd`` (default all of it: the part not yet charged to the ledger)
        until `release`."""
        with self._lock:
            here = float(self._spent_here())
            held = sum(self._held.values())
            total = self._other_chains() + here + held + worst_usd
            if total > self.cap.max_usd + 1e-9:
                label = f"{self.run_dir.parent.name}/{self.run_dir.name}"
                raise SpendCapReached(
                    f"spend cap reached in {self.stage} of {label}: the next request would take "
                    f"the ledger to {total:.2f} USD, above --max-usd {self.cap.max_usd:.2f} "
                    f"(this run {here:.2f} USD so far); finished work is kept: rerun with a "
                    f"higher --max-usd to resume at {self.stage}"
                )
            self._next += 1
            self._held[self._next] = worst_usd if held_usd is None else held_usd
            return self._next

    def release(self, token: int) -> None:
        with self._lock:
            self._held.pop(token, None)


__all__ = [
    "CAP_RUNS_ENV",
    "MAX_USD_ENV",
    "CapGuard",
    "SpendCap",
    "SpendCapReached",
    "apply_cli_cap",
    "apply_max_usd",
    "check_start",
    "matrix_spent",
    "remaining_estimate",
]
