"""The simulated service counts what a loop costs on Tinker's clock (issue 18, item 2).

The local engine answers at once, so nothing else shows a loop paying two clock cycles a step
where one would do, or sampling requests waiting on each other instead of on the service's
slots. Pinned here, in cycles and latencies (never seconds):

* a loop that reads ``forward_backward``'s result before submitting ``optim_step`` pays 2
  cycles a step, `training.run_training` 1 (its pipelining lost in a refactor would show as 2),
  and a client-side custom loss (stage 03's DPO) 2 pipelined, 3 sequential;
* with a client delay, only a loop that enqueues the next step before reading stays at 1;
* N sampling requests on S slots take ceil(N / S) latencies when issued together, N when each
  is read before the next is sent; `sampling.sample_chat` issues a chunk together;
* ``optim_step`` with no ``forward_backward`` before it fails in one line;
* a checkpoint expired by hand or by its TTL (in simulated time) answers ``tinker.NotFoundError``;
* the wrapper changes no number the local engine computes, and is no backend.
"""

from __future__ import annotations

import math
import threading

import pytest
import tinker
from character_training.backends import BACKENDS, get_service_client, resolve_client
from character_training.backends.local import TINY_RANDOM_NAME
from character_training.errors import BackendError, ConfigError
from character_training.renderers.conversation import supervised_datum
from character_training.sampling import SampleRequest, sample_chat
from character_training.store import read_jsonl, stage_dir
from character_training.testing import SimulatedService
from character_training.training import LRSchedule, StepBatch, TrainingPlan, run_training
from tinker import types

TINY = TINY_RANDOM_NAME
CYCLE = 10.0
LR = types.AdamParams(learning_rate=1e-3)


@pytest.fixture(scope="module")
def data(renderer):
    """Two small chat examples: one step's batch."""
    return [
        supervised_datum(
            renderer,
            [
                {"role": "user", "content": f"Name a colour, please ({i})."},
                {"role": "assistant", "content": f"Blue, number {i}."},
            ],
        )
        for i in range(2)
    ]


def summed_logprob_loss(data, logprobs):
    """A client-side custom loss, as stage 03's DPO loss is."""
    return sum(-lp.sum() for lp in logprobs), {}


def simulated(tiny_service, **settings) -> SimulatedService:
    return SimulatedService(tiny_service, cycle_s=CYCLE, **settings)


def new_trainer(service, seed: int = 0):
    return service.create_lora_training_client(TINY, rank=4, seed=seed).result()


def sequential_steps(client, batch, steps: int, loss="cross_entropy") -> None:
    """The stages' loops before `run_training`: each result read before the next call."""
    for _ in range(steps):
        if callable(loss):
            client.forward_backward_custom(batch, loss).result()
        else:
            client.forward_backward(batch, loss).result()
        client.optim_step(LR).result()


def train(client, tmp_path, name, batch, steps, loss="cross_entropy", save_every=100):
    stage = stage_dir(tmp_path, name)
    stage.path.mkdir(parents=True)
    plan = TrainingPlan(
        name=name, total_steps=steps, schedule=LRSchedule(1e-3), save_every=save_every
    )
    run_training(
        client,
        stage,
        plan,
        lambda step: StepBatch(batch, loss),
        done_steps=0,
        read_metrics=lambda batch, out: {"loss": out.metrics["loss:sum"]},
    )
    return read_jsonl(stage.file("metrics.jsonl"))


def cycles_of(service, op: str) -> list[int]:
    return [e.cycle for e in service.events if e.op == op]


# -- training ------------------------------------------------------------------------------------
def test_a_loop_that_waits_for_forward_backward_pays_two_cycles_a_step(tiny_service, data):
    service = simulated(tiny_service)
    client = new_trainer(service)
    sequential_steps(client, data, steps=4)
    assert cycles_of(service, "forward_backward") == [0, 2, 4, 6]
    assert cycles_of(service, "optim_step") == [1, 3, 5, 7]
    stats = client.stats()
    assert (stats["steps"], stats["cycles"], stats["span_cycles"]) == (4, 8, 8)
    assert stats["cycles_per_step"] == 2.0
    assert service.now() == pytest.approx(8 * CYCLE)


def test_run_training_pays_one_cycle_a_step_resume_points_included(tiny_service, data, tmp_path):
    service = simulated(tiny_service)
    client = new_trainer(service)
    train(client, tmp_path, "sft", data, steps=6, save_every=2)
    assert cycles_of(service, "forward_backward") == cycles_of(service, "optim_step") == [*range(6)]
    stats = client.stats()
    assert (stats["steps"], stats["span_cycles"], stats["cycles_per_step"]) == (6, 6, 1.0)
    # resume points after steps 2 and 4 (none after the last) cost no cycle
    assert [e.op for e in service.events if e.cycle is None] == ["save_state", "save_state"]
    assert service.report()["wall_cycles"] == pytest.approx(6)


def test_a_client_side_custom_loss_costs_two_cycles_pipelined_three_sequential(
    tiny_service, data, tmp_path
):
    pipelined = simulated(tiny_service)
    train(new_trainer(pipelined), tmp_path, "dpo", data, 3, loss=summed_logprob_loss)
    assert cycles_of(pipelined, "forward_backward_custom:forward") == [0, 2, 4]
    assert cycles_of(pipelined, "forward_backward_custom:backward") == [1, 3, 5]
    assert cycles_of(pipelined, "optim_step") == [1, 3, 5]  # with its backward
    sequential = simulated(tiny_service)
    client = new_trainer(sequential)
    sequential_steps(client, data, 3, loss=summed_logprob_loss)
    assert cycles_of(sequential, "optim_step") == [2, 5, 8]
    assert client.stats()["cycles_per_step"] == 3.0


def test_with_a_client_delay_only_enqueuing_the_next_step_keeps_one_cycle(
    tiny_service, data, tmp_path
):
    """A request sent on reading an answer misses the cycle that began with the answer."""
    delay = {"arrival_delay_s": 0.1 * CYCLE}
    waiting = simulated(tiny_service, **delay)
    sequential_steps(new_trainer(waiting), data, 3)
    assert cycles_of(waiting, "forward_backward") == [1, 5, 9]
    assert cycles_of(waiting, "optim_step") == [3, 7, 11]

    back_to_back = simulated(tiny_service, **delay)
    client = new_trainer(back_to_back)
    for _ in range(3):  # both calls submitted together, the next step only after reading
        futures = client.forward_backward(data, "cross_entropy"), client.optim_step(LR)
        [f.result() for f in futures]
    assert cycles_of(back_to_back, "optim_step") == [1, 3, 5]

    pipelined = simulated(tiny_service, **delay)
    client = new_trainer(pipelined)
    train(client, tmp_path, "sft", data, steps=6, save_every=3)
    # a resume point reads the step before saving: the step after it misses one cycle
    assert cycles_of(pipelined, "optim_step") == [1, 2, 3, 5, 6, 7]


def test_optim_step_without_forward_backward_fails_in_one_line(tiny_service, data):
    service = simulated(tiny_service)
    client = new_trainer(service)
    with pytest.raises(BackendError, match="no forward_backward since the last optim_step"):
        client.optim_step(LR)
    client.forward_backward(data, "cross_entropy")
    client.optim_step(LR)
    client.forward(data, "cross_entropy")  # a forward leaves no gradient to apply
    with pytest.raises(BackendError, match="Submit forward_backward first"):
        client.optim_step(LR)
    assert client.stats()["steps"] == client.steps == 1  # the engine did not step either


def test_the_wrapper_changes_no_number_the_engine_computes(tiny_service, data, tmp_path):
    direct = train(new_trainer(tiny_service, seed=3), tmp_path, "direct", data, 3)
    service = simulated(tiny_service, arrival_delay_s=1.0)
    wrapped = train(new_trainer(service, seed=3), tmp_path, "wrapped", data, 3)
    for field in ("loss", "optim/grad_norm"):
        assert [r[field] for r in wrapped] == [r[field] for r in direct]


def test_chains_in_threads_overlap_in_scaled_time(tiny_service, data):
    """time_scale > 0: ``.result()`` sleeps, so two clients training at once share the wall
    time. A request sent on an answer arrives after the boundary: 4 cycles a sequential step."""
    service = simulated(tiny_service, time_scale=0.01)  # a 10 s cycle lasts 0.1 s
    clients = [new_trainer(service, seed=i) for i in range(2)]
    threads = [threading.Thread(target=sequential_steps, args=(c, data, 2)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spans = [c.stats()["span_cycles"] for c in clients]
    assert all(c.stats()["steps"] == 2 for c in clients)
    assert all(span >= 4 for span in spans)
    assert service.report()["wall_cycles"] < sum(spans)


# -- sampling ------------------------------------------------------------------------------------
def sampling_service(tiny_service, **settings):
    service = simulated(tiny_service, sampling_slots=4, sample_latency_s=3.0, **settings)
    return service, service.create_sampling_client(base_model=TINY).result()


def greeting(tokenizer):
    return types.ModelInput.from_ints(tokenizer.encode("Hello there, how are you"))


@pytest.mark.parametrize("count", [4, 10])
def test_requests_issued_together_take_one_latency_per_round_of_slots(
    tiny_service, tokenizer, count
):
    service, sampler = sampling_service(tiny_service)
    params = types.SamplingParams(max_tokens=3, temperature=1.0, seed=1)
    futures = [sampler.sample(greeting(tokenizer), 1, params) for _ in range(count)]
    assert all(len(f.result().sequences[0].tokens) >= 1 for f in futures)
    assert service.now() == pytest.approx(math.ceil(count / 4) * 3.0)
    report = service.report()["sampling"]
    assert (report["requests"], report["max_concurrency"]) == (count, 4)


def test_requests_read_one_at_a_time_take_one_latency_each(tiny_service, tokenizer):
    service, sampler = sampling_service(tiny_service, sample_token_s=0.5)
    params = types.SamplingParams(max_tokens=2, temperature=1.0, seed=1)
    for _ in range(5):
        sampler.sample(greeting(tokenizer), 1, params).result()
    assert service.now() == pytest.approx(5 * (3.0 + 0.5 * 2))  # latency + the token budget
    assert service.report()["sampling"]["max_concurrency"] == 1


def test_scoring_requests_share_the_slots(tiny_service, tokenizer):
    service, sampler = sampling_service(tiny_service, logprob_latency_s=1.0)
    futures = [sampler.compute_logprobs(greeting(tokenizer)) for _ in range(6)]
    futures.append(sampler.sample(greeting(tokenizer), 1, types.SamplingParams(max_tokens=2)))
    [f.result() for f in futures]
    # 4 scores, then 2 scores and the sample in the freed slots
    assert service.now() == pytest.approx(1.0 + 3.0)


def test_sample_chat_through_the_wrapper_samples_the_same_replies(
    tiny_service, tiny_sampler, renderer
):
    requests = [
        SampleRequest(key=f"q{i}", messages=[{"role": "user", "content": f"Say {i}."}])
        for i in range(6)
    ]
    settings = dict(max_tokens=4, temperature=1.0, top_p=1.0, seed=5)
    direct = sample_chat(tiny_sampler, renderer, requests, **settings)
    service, sampler = sampling_service(tiny_service)
    wrapped = sample_chat(sampler, renderer, requests, **settings)
    assert {k: c.text for k, c in wrapped.items()} == {k: c.text for k, c in direct.items()}
    assert service.now() == pytest.approx(2 * 3.0)  # one chunk: ceil(6 / 4) rounds of slots


# -- faults and identity -------------------------------------------------------------------------
def test_an_expired_checkpoint_answers_not_found(tiny_service, data):
    service = simulated(tiny_service)
    client = new_trainer(service)
    client.forward_backward(data, "cross_entropy")
    client.optim_step(LR)
    state = client.save_state("sim-state").result().path
    resumed = service.create_training_client_from_state_with_optimizer(state).result()
    assert resumed.steps == 1  # the local client underneath, restored from the state
    service.expire(state)
    with pytest.raises(tinker.NotFoundError, match="not found"):
        resolve_client(service.create_training_client_from_state_with_optimizer(state))
    with pytest.raises(tinker.NotFoundError):
        resolve_client(service.create_training_client_from_state(state))
    with pytest.raises(tinker.NotFoundError):
        client.load_state(state).result()


def test_a_checkpoint_saved_with_a_ttl_expires_in_simulated_time(tiny_service, data):
    service = SimulatedService(tiny_service, cycle_s=3600.0)  # the service's shortest TTL
    client = new_trainer(service)
    path = client.save_weights_for_sampler("sim-ttl", ttl_seconds=3600).result().path
    assert service.create_sampling_client(model_path=path).result() is not None
    client.forward_backward(data, "cross_entropy")
    client.optim_step(LR).result()  # one cycle later: the hour has passed
    with pytest.raises(tinker.NotFoundError):
        service.create_sampling_client(model_path=path).result()
    with pytest.raises(tinker.NotFoundError):
        client.create_sampling_client(path).result()


def test_it_is_no_backend_and_checks_its_settings(tiny_service):
    assert "simulated" not in BACKENDS
    with pytest.raises(ConfigError, match="backend='simulated'"):
        get_service_client("simulated")
    with pytest.raises(ConfigError, match="sampling_slots=0"):
        SimulatedService(tiny_service, sampling_slots=0)
    with pytest.raises(ConfigError, match="cycle_s=0"):
        SimulatedService(tiny_service, cycle_s=0)
