"""Stage 09's RLAIF machinery, one module per job; `stages.rlaif` runs them in order.

* `settings`: what every piece reads from the stage's ``Config``, and where a trainer records
  its weights;
* `sft_start`: the optional SFT start on the chosen replies (checkpoint "rlaif_sft_init");
* `signals`: the two preference signals (prompted judge, trained preference model), verdicts
  cached by signal, and their held-out accuracy;
* `preference_model_training`: the preference model's LoRA on the judge's base;
* `advantages`: matchups within a group, win rates, group-centred advantages, KL shaping;
* `loop`: one RL step (sample, judge, score, datums) and the RL trainer;
* `probes`: the reward curve (win rate against the starting policy on held-out prompts);
* `compare`: what notebook 09 shows next to DPO + SFT (lengths, coherence, robustness F1,
  the reward-hacking check, overview rows).

All three trainers go through the one training loop (`training.run_training`). Nothing here
imports a stage module.
"""
