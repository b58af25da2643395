"""Results that outlive the service's checkpoints (issue 18, section 5).

* a finished checkpoint is recorded with its creation time;
* a resume whose remote checkpoint is gone (the simulated service answering "not found" after
  `SimulatedService.expire`) fails in one line naming the stage to rerun and the command, both
  for a stage's resume point (``progress.json``) and for a finished checkpoint another stage
  starts or samples from (``checkpoints.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from character_training import spend
from character_training.backends.local import TINY_RANDOM_NAME
from character_training.checkpoint_expiry import CheckpointGoneError
from character_training.metering import MeteredService
from character_training.renderers.conversation import supervised_datum
from character_training.store import find_checkpoint, stage_dir
from character_training.testing import SimulatedService
from character_training.training import (
    CheckpointTarget,
    LRSchedule,
    StepBatch,
    TrainingPlan,
    open_training_client,
    read_progress,
    run_training,
)

TINY = TINY_RANDOM_NAME
RERUN = (
    "python -m character_training run --persona p --size s --notebooks {} --on-existing overwrite"
)


@pytest.fixture
def data(renderer):
    return [
        supervised_datum(
            renderer,
            [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "A."}],
        )
        for i in range(2)
    ]


@pytest.fixture
def setup(tiny_service, tmp_path):
    """A run folder ``runs/p/s``, the simulated service and the metered client over it."""
    run = tmp_path / "runs" / "p" / "s"
    simulated = SimulatedService(tiny_service)
    params = SimpleNamespace(
        backend="local", prices=SimpleNamespace(per_million={}, as_of=""), run_dir=run
    )
    service = MeteredService(simulated, spend.Ledger(run, params, "test"), None, run)
    return run, simulated, service


def train(
    service,
    run: Path,
    data,
    name: str,
    checkpoint: str | None = None,
    steps: int = 4,
    init_state: str | None = None,
):
    stage = stage_dir(run, name)
    stage.path.mkdir(parents=True, exist_ok=True)
    client, done = open_training_client(
        service, stage, base_model=TINY, rank=4, seed=0, init_state=init_state
    )
    plan = TrainingPlan(
        name=name,
        total_steps=steps,
        schedule=LRSchedule(1e-3),
        save_every=2,
        target=CheckpointTarget(run, name, checkpoint) if checkpoint else None,
        base_model=TINY,
    )
    return run_training(
        client, stage, plan, lambda step: StepBatch(data, "cross_entropy"), done_steps=done
    )


def test_a_gone_resume_point_names_the_stage_to_rerun(setup, data, interrupt_training):
    run, simulated, service = setup
    with interrupt_training(3):
        train(service, run, data, "05_sft")
    progress = read_progress(stage_dir(run, "05_sft"))
    assert progress is not None and progress.step == 2
    simulated.expire(progress.state_path)
    with pytest.raises(CheckpointGoneError) as info:
        train(service, run, data, "05_sft")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("the resume point of 05_sft (step 2,")
    assert "is gone from the service" in message
    assert message.endswith("rerun 05_sft from its start: " + RERUN.format("05"))


def test_a_gone_checkpoint_names_the_stage_that_made_it(setup, data):
    run, simulated, service = setup
    before = time.time()
    train(service, run, data, "03_dpo", checkpoint="dpo", steps=2)
    recorded = json.loads((run / "checkpoints.json").read_text())["dpo"]
    assert before <= recorded["created"] <= time.time()
    dpo = find_checkpoint(run, "dpo")
    assert service.create_sampling_client(model_path=dpo.sampler_path).result() is not None
    simulated.expire(dpo.sampler_path)
    simulated.expire(dpo.state_path)
    with pytest.raises(CheckpointGoneError) as info:
        service.create_sampling_client(model_path=dpo.sampler_path).result()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("checkpoint 'dpo' (") and "made by 03_dpo on " in message
    assert message.endswith("rerun 03_dpo and the stages after it: " + RERUN.format("03"))
    with pytest.raises(CheckpointGoneError, match="made by 03_dpo"):
        train(service, run, data, "05_sft", init_state=dpo.state_path)


def test_a_path_no_stage_recorded_still_fails_in_one_line(setup):
    run, simulated, service = setup
    simulated.expire("tinker://someone/sampler_weights/else")
    with pytest.raises(CheckpointGoneError, match="no stage of p/s recorded it"):
        service.create_sampling_client(model_path="tinker://someone/sampler_weights/else").result()
