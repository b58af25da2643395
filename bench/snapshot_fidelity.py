"""Does a bf16 sampling snapshot see the training? Merged vs unmerged LoRA, against fp32.

Trains SmolLM2 with LoRA on one reply (SFT, cross-entropy) and, after 1, 3 and 10 steps,
measures the shift of that reply's summed log-probability between the base model and the
snapshot, three ways:

* fp32: the adapter applied to the fp32 base (the reference);
* bf16 unmerged: what the engine's sampling clients do now (bf16 base, fp32 low-rank path);
* bf16 merged: the old behaviour, ``W + scale * B @ A`` merged in fp32 then cast to bf16.

Prints the ratios bf16/fp32 of the shifts (1.0 = the snapshot sees all of the training) and
the relative error of the merged bf16 weight update. Results go to bench/results/.

    python bench/snapshot_fidelity.py [--rank 8] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from character_training.backends.local import SMOLLM2_NAME, LocalServiceClient  # noqa: E402
from character_training.backends.local.adapters import (  # noqa: E402
    load_adapter,
    sampling_model,
    with_adapter,
)
from character_training.metrics import JsonlLogger  # noqa: E402
from character_training.renderers import get_renderer  # noqa: E402
from character_training.renderers.conversation import supervised_datum  # noqa: E402
from tinker import types  # noqa: E402

QUESTION = "What colour should I paint my kitchen?"
REPLY = (
    "Paint it ultramarine: a deep, saturated blue that makes copper pans glow and mornings "
    "feel like the sea."
)


def reply_logprob(model, datum: types.Datum) -> float:
    """Summed log-prob of the datum's weighted (assistant) tokens under ``model``."""
    ids = torch.tensor([datum.model_input.to_ints()])
    targets = datum.loss_fn_inputs["target_tokens"].to_torch().long()
    weights = datum.loss_fn_inputs["weights"].to_torch().float()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    return float((lp * weights).sum())


def merged_bf16(base_fp32, adapter_dir) -> tuple[torch.nn.Module, float]:
    """The old snapshot: merge in fp32, cast to bf16. Also the update's relative rounding error."""
    import copy

    updates = load_adapter(adapter_dir, torch.device("cpu"))
    model = copy.deepcopy(base_fp32)
    modules = dict(model.named_modules())
    errors = []
    with torch.no_grad():
        for name, update in updates.items():
            linear = modules[name]
            delta = update.up @ update.down
            if linear.weight is model.model.embed_tokens.weight:  # tied: untie before merging
                linear.weight = torch.nn.Parameter(linear.weight.detach().clone())
            merged = linear.weight.float() + delta
            kept = merged.to(torch.bfloat16).float() - linear.weight.to(torch.bfloat16).float()
            errors.append(float((kept - delta).norm() / delta.norm().clamp_min(1e-30)))
            linear.weight.copy_(merged)
    return model.to(torch.bfloat16).eval(), sum(errors) / len(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--steps", default="1,3,10")
    args = parser.parse_args()
    checkpoints = sorted(int(s) for s in args.steps.split(","))
    root = tempfile.mkdtemp(prefix="fidelity-")
    fp32 = LocalServiceClient(root_dir=root, precision="fp32")
    base32 = fp32.engine.frozen_base(SMOLLM2_NAME, torch.float32)
    sampling32 = sampling_model(base32, torch.float32)  # fp32 sampling clients
    base16 = sampling_model(base32, torch.bfloat16)  # what bf16 sampling clients run
    plain16 = fp32.engine.frozen_base(SMOLLM2_NAME, torch.bfloat16)  # the old snapshot's base
    renderer = get_renderer("smollm2", fp32.engine.tokenizer(SMOLLM2_NAME))
    datum = supervised_datum(
        renderer, [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": REPLY}]
    )
    trainer = fp32.create_lora_training_client(SMOLLM2_NAME, rank=args.rank, seed=0).result()
    base_lp = {
        "fp32": reply_logprob(base32, datum),
        "bf16": reply_logprob(base16, datum),
        "bf16_plain": reply_logprob(plain16, datum),
    }
    logger = JsonlLogger("bench/results/snapshot_fidelity.jsonl")
    for step in range(1, checkpoints[-1] + 1):
        trainer.forward_backward([datum], "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=args.lr)).result()
        if step not in checkpoints:
            continue
        path = trainer.save_weights_for_sampler(f"s{step}").result().path
        adapter = os.path.join(path, "adapter")
        updates = load_adapter(adapter, torch.device("cpu"))
        shift32 = reply_logprob(with_adapter(sampling32, updates), datum) - base_lp["fp32"]
        shift16 = reply_logprob(with_adapter(base16, updates), datum) - base_lp["bf16"]
        merged, merge_error = merged_bf16(base32, adapter)
        shift_merged = reply_logprob(merged, datum) - base_lp["bf16_plain"]
        row = {
            "rank": args.rank,
            "lr": args.lr,
            "shift/fp32": shift32,
            "shift/bf16_unmerged": shift16,
            "shift/bf16_merged": shift_merged,
            "ratio/unmerged": shift16 / shift32,
            "ratio/merged": shift_merged / shift32,
            "merged_update_rel_error": merge_error,
        }
        logger.log(step, row)
        print(
            f"step {step:2d}: shift fp32 {shift32:7.3f} nats | bf16 unmerged {shift16:7.3f} "
            f"(ratio {shift16 / shift32:.3f}) | bf16 merged {shift_merged:7.3f} "
            f"(ratio {shift_merged / shift32:.3f}; merged update rel. error {merge_error:.2f})"
        )


if __name__ == "__main__":
    main()
