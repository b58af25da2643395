"""LoRA SFT throughput: the local engine's training client vs a plain transformers + peft loop.

Both sides train the same base weights (each gets its own fp32 copy from the engine's loader)
with the same LoRA (rank 8, alpha 16, every linear layer of the blocks, no dropout), the same
AdamW settings (Tinker's defaults: betas 0.9/0.95, eps 1e-12, no weight decay), the same
objective (the token sum of ``-weight * log p(target)``, as the engine's ``cross_entropy``) and
the same batch: 4 sequences x 256 tokens of chat data, multi-turn conversations built from
tinker-cookbook's bundled examples, rendered by the SmolLM2 renderer and `supervised_datum`.
The peer runs bf16 autocast when the engine does (fp32 master weights on both sides).

A step is ``forward_backward(..., "cross_entropy")`` + ``optim_step`` on the engine and
forward + backward + ``AdamW.step`` in the loop. After warm-up steps, timed steps alternate
between the two sides, so a change of machine load during the run hits both alike. The first
losses of the two sides are printed: with LoRA's zero-initialised B they are the base model's
loss on the same tokens, so they should agree up to autocast rounding.

Usage: python bench/sft_throughput.py [--steps 5] [--warmup 2] [--seq-len 256] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/README.md

import torch  # noqa: E402
from character_training.backends.local.lora import (  # noqa: E402
    PARTS,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from bench_common import engine_lora, machine_fields, report  # noqa: E402
from character_training.backends.local import SMOLLM2_NAME, LocalServiceClient  # noqa: E402
from character_training.backends.local.forward import autocast_context  # noqa: E402
from character_training.renderers import get_renderer  # noqa: E402
from character_training.renderers.conversation import supervised_datum  # noqa: E402
from tinker import types  # noqa: E402

RANK = 8
ADAM = types.AdamParams(learning_rate=1e-4)  # betas 0.9/0.95, eps 1e-12, no weight decay


def example_conversations() -> list[list[dict]]:
    import tinker_cookbook

    path = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    return [json.loads(line)["messages"] for line in path.read_text().splitlines()]


def chat_batch(renderer, batch: int, seq_len: int) -> list[types.Datum]:
    """``batch`` data of exactly ``seq_len`` tokens: multi-turn chats, cut after rendering.

    The bundled conversations are short, so each datum strings several of them together as
    one long chat (loss on every assistant reply), then keeps its first ``seq_len`` positions.
    """
    conversations = example_conversations()
    data, cursor = [], 0
    for _ in range(batch):
        messages: list[dict] = []
        datum = None
        while datum is None or datum.model_input.length < seq_len:
            turns = [m for m in conversations[cursor % len(conversations)] if m["role"] != "system"]
            cursor += 1
            while turns and turns[-1]["role"] != "assistant":
                turns.pop()
            if not turns or turns[0]["role"] != "user":
                continue
            messages += turns
            datum = supervised_datum(renderer, messages, train_on="all_assistant")
        tokens = datum.model_input.to_ints()[:seq_len]
        inputs = {
            key: types.TensorData.from_torch(value.to_torch()[:seq_len])
            for key, value in datum.loss_fn_inputs.items()
        }
        data.append(
            types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)
        )
    return data


class PeftLoop:
    """The textbook loop: peft LoRA model, AdamW, one padded forward per step."""

    def __init__(self, service: LocalServiceClient, data: list[types.Datum], seed: int):
        from peft import get_peft_model

        engine = service.engine
        torch.manual_seed(seed)
        base = engine.load_trainable_base(SMOLLM2_NAME)
        # The same adapter as the engine's: alpha 32, attention + MLP + unembedding (Tinker's
        # defaults); "all-linear" would leave out lm_head and give the peer less work.
        config = engine_lora(base, RANK, PARTS)
        self.model = get_peft_model(base, config)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=ADAM.learning_rate,
            betas=(ADAM.beta1, ADAM.beta2),
            eps=ADAM.eps,
            weight_decay=ADAM.weight_decay,
        )
        self.device = engine.device
        self.dtype = engine.compute_dtype
        self.ids = torch.tensor([d.model_input.to_ints() for d in data], device=self.device)
        self.targets = torch.stack(
            [d.loss_fn_inputs["target_tokens"].to_torch().long() for d in data]
        ).to(self.device)
        self.weights = torch.stack(
            [d.loss_fn_inputs["weights"].to_torch().float() for d in data]
        ).to(self.device)

    def step(self) -> float:
        with autocast_context(self.device, self.dtype):
            logits = self.model(input_ids=self.ids, use_cache=False).logits
        logprobs = -torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), self.targets.flatten(), reduction="none"
        ).view_as(self.targets)
        loss = -(logprobs * self.weights).sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sft.jsonl"))
    args = parser.parse_args()

    service = LocalServiceClient(root_dir=str(ROOT / "runs" / ".bench"), precision=args.precision)
    tokenizer = service.engine.tokenizer(SMOLLM2_NAME)
    data = chat_batch(get_renderer("smollm2", tokenizer), args.batch, args.seq_len)
    trained_tokens = sum(int((d.loss_fn_inputs["weights"].to_torch() > 0).sum()) for d in data)

    engine = service.create_lora_training_client(SMOLLM2_NAME, rank=RANK, seed=args.seed).result()
    peer = PeftLoop(service, data, seed=args.seed)

    def engine_step() -> float:
        out = engine.forward_backward(data, "cross_entropy").result()
        engine.optim_step(ADAM).result()
        return float(out.metrics["loss:sum"])

    first_losses = (engine_step(), peer.step())
    for _ in range(args.warmup - 1):
        engine_step()
        peer.step()
    times = {"engine": 0.0, "peer": 0.0}
    for _ in range(args.steps):
        for name, step in (("engine", engine_step), ("peer", peer.step)):
            started = time.perf_counter()
            step()
            times[name] += time.perf_counter() - started

    tokens = args.batch * args.seq_len * args.steps
    record = {
        "bench": "sft_throughput",
        "model": SMOLLM2_NAME,
        "autocast_dtype": str(service.engine.compute_dtype),
        "lora_rank": RANK,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "trained_tokens_per_batch": trained_tokens,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "engine_seconds": round(times["engine"], 2),
        "engine_tok_per_s": round(tokens / times["engine"], 1),
        "peft_loop_seconds": round(times["peer"], 2),
        "peft_loop_tok_per_s": round(tokens / times["peer"], 1),
        "ratio_engine_vs_peft_loop": round(times["peer"] / times["engine"], 2),
        "first_loss_engine": round(first_losses[0], 3),
        "first_loss_peft_loop": round(first_losses[1], 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
        **machine_fields(),
    }
    report(record, args.out, 28)


if __name__ == "__main__":
    main()
