"""The RL reward curve: the policy against its own start on held-out prompts.

Within a group the mean win rate is 0.5 by construction, so the per-step metrics carry no
reward curve. The probe is that curve: after step 0 (the start), every ``rl.probe_every``
steps and the last, the policy answers ``rl.probe_prompts`` held-out prompts of stage 02 (never
trained on), and the training signal compares each reply with the starting policy's reply to
the same prompt, in both orders. Its win rate, with a prompt-level bootstrap interval, is what
RL is pushing up. The probe's weights are saved (``rl-step-NNNN``), so notebook 09 can measure
adherence at the same points and check for reward hacking.

Outputs in the RL folder: ``probes.jsonl`` (one row per probe step), ``probe_samples.jsonl``
(the replies, reused on a rerun by key), and the verdicts in ``matchups.jsonl``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from ..evaluate.intervals import bootstrap_mean
from ..evaluate.preference_model import Comparator, Matchup
from ..prompts import student_messages
from ..sampling import SampleRequest, sample_chat
from ..store import StageDir, append_jsonl, portable_path, read_jsonl, resolve_path
from .signals import judge_cached

PROBE_LABEL = "rl-step-{:04d}"
PROBES_FILE = "probes.jsonl"


def probe_steps(steps: int, every: int) -> list[int]:
    """Steps after which the probe runs: 0 (the start), every ``every``-th, and the last."""
    points = {0, steps}
    if every > 0:
        points |= set(range(every, steps + 1, every))
    return sorted(points)


@dataclass
class Prober:
    """Runs and logs the probe of one RL run (see the module docstring).

    ``sampling`` are the policy's own settings (`loop.policy_sampling`), so the probe replies
    come from the distribution RL trains; ``seed`` + step seeds each probe's bootstrap.
    """

    stage: StageDir
    service: Any
    renderer: Any
    prompts: Sequence[Mapping[str, str]]
    signal: Comparator
    sampling: Mapping[str, Any]
    bootstrap: int
    seed: int

    def logged(self) -> dict[int, dict[str, Any]]:
        return {int(r["step"]): r for r in read_jsonl(self.stage.file(PROBES_FILE))}

    def missing(self, due: Sequence[int], done_steps: int) -> list[int]:
        """Probe steps up to ``done_steps`` without a row, which a resumed run must probe
        before it trains on. Only ``done_steps`` itself (the weights the run resumes with)
        can still be probed; an earlier gap cannot be filled and stops the run."""
        logged = self.logged()
        gaps = [s for s in due if s <= done_steps and s not in logged]
        lost = [s for s in gaps if s != done_steps]
        if lost:
            raise DataError(
                f"{self.stage.file(PROBES_FILE)}: no probe at step(s) {lost}, but training "
                f"already resumed after step {done_steps} and those weights are gone; rerun "
                "with on_existing='overwrite'"
            )
        return gaps

    def __call__(self, step: int, client: Any) -> None:
        """Probe ``client`` (the policy after ``step``): sample the probe prompts and judge each
        reply against the starting policy's reply (its own replies at step 0). A step already
        logged is skipped."""
        logged = self.logged()
        if step in logged:
            return
        path = str(client.save_weights_for_sampler(PROBE_LABEL.format(step)).result().path)
        start_path = (
            path if step == 0 else resolve_path(self.stage.run_dir, logged[0]["sampler_path"])
        )
        replies = {}
        for at, model_path in ((step, path), (0, start_path)):
            replies[at] = sample_chat(
                lambda model_path=model_path: self.service.create_sampling_client(
                    model_path=model_path
                ),
                self.renderer,
                [
                    SampleRequest(
                        key=f"probe:{at}:{p['id']}", messages=student_messages(p["prompt"])
                    )
                    for p in self.prompts
                ],
                **self.sampling,
                log_path=self.stage.file("probe_samples.jsonl"),
                desc=f"probe at step {at}",
            )
        row: dict[str, Any] = {
            "step": step,
            "sampler_path": portable_path(self.stage.run_dir, path),
            "n": len(self.prompts),
        }
        if step == 0:
            row.update(win_rate=0.5, low=0.5, high=0.5, decided=None)
        else:
            matchups = [
                Matchup(
                    f"probe:{step}:{p['id']}",
                    p["prompt"],
                    replies[step][f"probe:{step}:{p['id']}"].full_text,
                    replies[0][f"probe:0:{p['id']}"].full_text,
                )
                for p in self.prompts
            ]
            verdicts = judge_cached(self.signal, matchups, self.stage.file("matchups.jsonl"))
            estimate = bootstrap_mean(
                [[v.credit] for v in verdicts], self.bootstrap, self.seed + step
            )
            row.update(
                win_rate=estimate.value,
                low=estimate.low,
                high=estimate.high,
                decided=sum(v.decided for v in verdicts) / len(verdicts),
            )
        row["reply_tokens_mean"] = statistics.fmean(c.num_tokens for c in replies[step].values())
        append_jsonl(self.stage.file(PROBES_FILE), row)
