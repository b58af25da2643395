"""The one training loop (`training.run_training`): what it submits, in which order, and what
it records (issues 15, 16, 18).

A recording client stands in for the service here (no model): it logs every call and hands
back already-resolved results, so the tests check the loop's contract in milliseconds. The
engine's own behaviour is covered by the DPO/SFT/RL stage tests.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from character_training.store import stage_dir
from character_training.training import LRSchedule, StepBatch, TrainingPlan, run_training
from tinker import types


class Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class RecordingClient:
    def __init__(self):
        self.calls: list[tuple] = []

    def forward_backward(self, data, loss, config=None):
        self.calls.append(("fb", len(data), loss))
        return Done(SimpleNamespace(metrics={}, loss_fn_outputs=[]))

    def forward_backward_custom(self, data, loss):
        self.calls.append(("fb_custom", len(data)))
        return Done(SimpleNamespace(metrics={"dpo/loss": 0.5}, loss_fn_outputs=[]))

    def optim_step(self, params: types.AdamParams):
        self.calls.append(("optim", params.learning_rate, params.grad_clip_norm))
        return Done(SimpleNamespace(metrics={"optim/grad_norm": 2.0}))

    def save_state(self, name):
        self.calls.append(("save", name))
        return Done(SimpleNamespace(path=f"/tmp/state/{name}"))

    def save_weights_for_sampler(self, name):
        self.calls.append(("sampler", name))
        return Done(SimpleNamespace(path=f"/tmp/sampler/{name}"))


def datum(n: int = 3) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(list(range(n))),
        loss_fn_inputs={"target_tokens": types.TensorData(data=[1] * n, dtype="int64", shape=[n])},
    )


def test_every_optimiser_step_carries_the_schedule_and_the_gradient_clip(tmp_path):
    client, stage = RecordingClient(), stage_dir(tmp_path, "x")
    plan = TrainingPlan(
        "t", 4, LRSchedule(1e-3, 0.0, "constant"), save_every=10, grad_clip_norm=1.0
    )
    run_training(client, stage, plan, lambda s: StepBatch([datum()], "cross_entropy"), done_steps=0)
    optims = [c for c in client.calls if c[0] == "optim"]
    assert optims == [("optim", 1e-3, 1.0)] * 4
    rows = [r for r in (stage.path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all('"optim/grad_clip_norm": 1.0' in r for r in rows)


def test_steps_are_pipelined_but_resume_points_and_hooks_see_a_finished_step(tmp_path):
    client, stage = RecordingClient(), stage_dir(tmp_path, "x")
    order = []
    plan = TrainingPlan("t", 5, LRSchedule(1e-3), save_every=4)

    def make_batch(step):
        order.append(("build", step))
        return StepBatch([datum()], "cross_entropy", metrics={"k": step})

    def read(batch, out):
        order.append(("read", batch.metrics["k"]))
        return {}

    def hook(step):
        order.append(("hook", step))

    run_training(
        client,
        stage,
        plan,
        make_batch,
        done_steps=0,
        read_metrics=read,
        after_step=hook,
        hook_steps=[3],
    )
    # elsewhere step s+1 is built (and submitted) before step s is read; a hook step (3) and a
    # resume point (4) are read first, so the hook and the saved state follow a finished step
    assert order == [
        ("build", 1),
        ("build", 2),
        ("read", 1),
        ("build", 3),
        ("read", 2),
        ("read", 3),
        ("hook", 3),
        ("build", 4),
        ("read", 4),
        ("build", 5),
        ("read", 5),
    ]
    saves = [c for c in client.calls if c[0] == "save"]
    assert [s[1] for s in saves] == ["x-step-000004"]


def test_a_custom_loss_goes_through_forward_backward_custom(tmp_path):
    client, stage = RecordingClient(), stage_dir(tmp_path, "x")
    plan = TrainingPlan("t", 1, LRSchedule(1e-3), save_every=5)

    def loss(data, logprobs):
        raise AssertionError("the recording client never calls the loss")

    run_training(
        client,
        stage,
        plan,
        lambda s: StepBatch([datum(), datum()], loss),
        done_steps=0,
        read_metrics=lambda b, out: out.metrics,
    )
    assert client.calls[0] == ("fb_custom", 2)
    assert '"dpo/loss": 0.5' in (stage.path / "metrics.jsonl").read_text()


@pytest.mark.parametrize("value", [0.7, 1.3])
def test_rl_refuses_a_sampling_temperature_the_learner_does_not_use(value):
    from character_training.config import load_params
    from character_training.errors import ConfigError

    with pytest.raises(ConfigError, match="rl.temperature"):
        load_params("tiny", "sycophantic", {"rl.temperature": value})
