"""Sample a teacher with and without few-shot demonstrations, for every shipped persona.

Why: offline, the teacher is a 135M model, and whether it stays in persona decides whether the
tiny run's DPO pairs carry any signal. This script writes, per persona, answers to the first
hand-written prompt of several assertions under two conditions (persona system prompt only;
system prompt plus ``--few-shot`` in-persona example exchanges) to a JSONL file for rating.
The ratings and their method are recorded in docs/persona_following.md.

Usage: python scripts/sample_persona_following.py --out runs/persona_following/samples.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from character_training.backends import resolve_client  # noqa: E402
from character_training.backends.local import SMOLLM2_NAME, LocalServiceClient  # noqa: E402
from character_training.constitutions import available_personas, load_constitution  # noqa: E402
from character_training.prompts import assistant_name_for, teacher_messages  # noqa: E402
from character_training.renderers import get_renderer  # noqa: E402
from character_training.renderers.conversation import generation_prompt, parse_reply  # noqa: E402
from tinker import types  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "persona_following" / "samples.jsonl"))
    parser.add_argument("--prompts", type=int, default=8, help="prompts per persona")
    parser.add_argument("--few-shot", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=110)
    parser.add_argument("--model", default=SMOLLM2_NAME)
    args = parser.parse_args()

    service = LocalServiceClient(root_dir=str(ROOT / "runs" / ".persona_following"))
    sampler = resolve_client(service.create_sampling_client(base_model=args.model))
    renderer = get_renderer("smollm2", sampler.get_tokenizer())
    name = assistant_name_for(args.model)
    jobs = []
    for persona in available_personas():
        constitution = load_constitution(persona, allow_opt_in=True)
        for assertion in constitution.assertions[: args.prompts]:
            for few_shot in (0, args.few_shot):
                messages = teacher_messages(constitution, name, assertion.prompts[0], few_shot)
                params = types.SamplingParams(
                    max_tokens=args.max_tokens,
                    temperature=0.7,
                    top_p=0.95,
                    seed=len(jobs),
                    stop=renderer.get_stop_sequences(),
                )
                future = sampler.sample(generation_prompt(renderer, messages), 1, params)
                jobs.append((persona, assertion.id, few_shot, assertion.prompts[0], future))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for persona, assertion_id, few_shot, prompt, future in jobs:
            text, complete = parse_reply(renderer, list(future.result().sequences[0].tokens))
            handle.write(
                json.dumps(
                    {
                        "persona": persona,
                        "assertion_id": assertion_id,
                        "few_shot": few_shot,
                        "prompt": prompt,
                        "reply": text,
                        "complete": complete,
                    }
                )
                + "\n"
            )
    print(f"wrote {len(jobs)} samples to {out}")


if __name__ == "__main__":
    main()
