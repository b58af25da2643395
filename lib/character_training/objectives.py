"""Training objectives as pure functions of per-token log-probabilities.

Kept apart from any client so each term can be checked against a hand computation and its
gradient against autograd on the plain formula (tests/test_dpo.py). The stages wrap these in
the ``loss_fn(data, logprobs)`` closures that ``forward_backward_custom`` takes, which is the
same call on the local engine and on Tinker.

DPO, as the paper trains it (sigmoid DPO with an NLL term on the chosen reply and a per-token
KL penalty to the reference). For one pair, with ``c``/``r`` the chosen/rejected reply tokens,
``p`` the policy's and ``q`` the reference's per-token log-probabilities:

    margin  = beta * ((sum p_c - sum q_c) - (sum p_r - sum q_r))
    dpo     = -log sigmoid(margin)
    nll     = -mean_t p_c                                (per token of the chosen reply)
    kl      = mean_t (p - q)^2  over the tokens of c and r together
    loss    = dpo + nll_coef * nll + kl_coef * kl

and the batch loss is the mean over pairs. ``(p - q)^2`` is the squared log-ratio, a
non-negative per-token penalty whose expectation under the policy is twice the KL for small
differences; it keeps the trained model near its starting point on *every* token, which plain
DPO (a function of sums only) does not.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def compute_dpo_loss(
    policy_chosen: Sequence[torch.Tensor],
    policy_rejected: Sequence[torch.Tensor],
    reference_chosen: Sequence[torch.Tensor],
    reference_rejected: Sequence[torch.Tensor],
    *,
    beta: float,
    nll_coef: float = 0.0,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss over the pairs and its parts (see the module docstring).

    Each argument holds one 1-D tensor per pair: the log-probabilities of that reply's loss
    tokens only (already masked). Returns ``(loss, metrics)``; metrics are batch means:
    ``dpo/loss``, ``dpo/nll``, ``dpo/sq_log_ratio`` (the penalty term: a mean squared
    log-ratio, not a KL), ``dpo/accuracy`` (share of pairs whose margin is
    positive), ``dpo/margin``, ``dpo/chosen_reward`` and ``dpo/rejected_reward`` (beta times
    the summed log-ratio to the reference), ``dpo/total``.
    """
    n = len(policy_chosen)
    if not (n == len(policy_rejected) == len(reference_chosen) == len(reference_rejected)) or not n:
        raise ValueError(
            "compute_dpo_loss: expected the same non-zero number of chosen, rejected and "
            f"reference sequences; got {len(policy_chosen)}, {len(policy_rejected)}, "
            f"{len(reference_chosen)}, {len(reference_rejected)}"
        )
    for i in range(n):
        for label, p, q in (
            ("chosen", policy_chosen[i], reference_chosen[i]),
            ("rejected", policy_rejected[i], reference_rejected[i]),
        ):
            if p.shape != q.shape or p.numel() == 0:
                raise ValueError(
                    f"pair {i}: {label} policy has {tuple(p.shape)} log-probs, reference "
                    f"{tuple(q.shape)}; expected the same non-empty length"
                )
    chosen_ratio = torch.stack(
        [p.sum() - q.to(p.dtype).sum() for p, q in zip(policy_chosen, reference_chosen)]
    )
    rejected_ratio = torch.stack(
        [p.sum() - q.to(p.dtype).sum() for p, q in zip(policy_rejected, reference_rejected)]
    )
    margin = beta * (chosen_ratio - rejected_ratio)
    dpo = -F.logsigmoid(margin)
    nll = torch.stack([-p.mean() for p in policy_chosen])
    kl = torch.stack(
        [
            torch.cat([pc - qc.to(pc.dtype), pr - qr.to(pr.dtype)]).pow(2).mean()
            for pc, qc, pr, qr in zip(
                policy_chosen, reference_chosen, policy_rejected, reference_rejected
            )
        ]
    )
    per_pair = dpo + nll_coef * nll + kl_coef * kl
    loss = per_pair.mean()
    metrics = {
        "dpo/loss": float(dpo.mean().detach()),
        "dpo/nll": float(nll.mean().detach()),
        "dpo/sq_log_ratio": float(kl.mean().detach()),
        "dpo/accuracy": float((margin > 0).float().mean()),
        "dpo/margin": float(margin.mean().detach()),
        "dpo/chosen_reward": float((beta * chosen_ratio).mean().detach()),
        "dpo/rejected_reward": float((beta * rejected_ratio).mean().detach()),
        "dpo/total": float(loss.detach()),
    }
    return loss, metrics
