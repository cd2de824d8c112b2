"""LABPAL under torch.distributed: ranks in lock-step, the same answer as one process, the documented collectives.

Two gloo processes on the CPU (``run_ranks``); each takes its half of every global batch.
"""

import math

import pytest
import torch
from torch import nn

from source.optimizer.lab_pal import LabPal
from tests.distributed_workers import run_ranks, values_of
from tests.lab_pal_distributed_workers import lock_step, research_code_steps_refused, resume_from_rank_0, train

GLOBAL_BATCH = 8

# Two measurements at k = 1, a switch to k = 2 at step 8 that measures again, momentum and weight decay.
LOCK_STEP_SETTINGS = dict(
    measurement_interval=3,
    untrustworthy_updates=2,
    approximation_batches=3,
    averaging_window=2,
    batch_size_schedule="0:1, 8:2",
    max_step=10.0,  # the fitted minimum, not the clip, sets the steps
    momentum=0.5,
    weight_decay=1e-3,
)
LOCK_STEP_STEPS = 30

# k = 2, then 4 from step 12: every update averages several inference batches.
COMPARISON_SETTINGS = dict(
    measurement_interval=3,
    untrustworthy_updates=2,
    approximation_batches=3,
    averaging_window=2,
    batch_size_schedule=((0, 2), (12, 4)),
    max_step=10.0,
)
COMPARISON_STEPS = 40


def _on_two_ranks(function, *args):
    return values_of(run_ranks(function, 2, args=args, timeout_seconds=20, deadline_seconds=55))


@pytest.fixture(scope="module")
def lock_step_ranks():
    return _on_two_ranks(lock_step, LOCK_STEP_SETTINGS, LOCK_STEP_STEPS, GLOBAL_BATCH, "float32")


def _measurements(record):
    return [event for events in record["events"] for event in events if event["event"] == "measurement"]


def test_ranks_stay_bitwise_identical_through_measurements_and_a_batch_size_switch(lock_step_ranks):
    first, second = lock_step_ranks
    assert len(_measurements(first)) >= 3  # two at k = 1, one after the switch
    assert first["log_values"]["training_batch_size"] == 2 * 128
    assert first["losses"] != second["losses"]  # each rank saw its own half of every batch
    for mine, theirs in zip(first["parameters"], second["parameters"]):
        assert torch.equal(mine, theirs)
    assert first["effective_learning_rates"] == second["effective_learning_rates"]
    assert first["events"] == second["events"]  # the measured step sizes and learning rates
    assert first["log_values"] == second["log_values"]  # including the forward and backward passes
    assert first["log_values"]["failed_measurements"] == 0


def test_at_an_update_boundary_every_rank_holds_the_same_state(lock_step_ranks):
    first, second = lock_step_ranks
    assert not first["partial"][-1]
    mine, theirs = first["state"]["optimizer"], second["state"]["optimizer"]
    assert mine["lab_pal"].keys() == theirs["lab_pal"].keys()
    for key, value in mine["lab_pal"].items():
        other = theirs["lab_pal"][key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    for index, tensors in mine["state"].items():
        for name, tensor in tensors.items():
            assert torch.equal(tensor, theirs["state"][index][name]), (index, name)


def test_a_state_saved_by_rank_0_at_an_update_boundary_resumes_every_rank_exactly(lock_step_ranks):
    first_steps = 14  # after the measurement that follows the switch to k = 2, at an update boundary
    ranks = _on_two_ranks(resume_from_rank_0, LOCK_STEP_SETTINGS, first_steps, LOCK_STEP_STEPS - first_steps,
                          GLOBAL_BATCH)
    for rank, record in enumerate(ranks):
        assert not record["before"]["partial"][-1]
        assert True in record["before"]["partial"]  # it also passed the middle of training batches
        for resumed, uninterrupted in zip(record["resumed"]["parameters"], lock_step_ranks[rank]["parameters"]):
            assert torch.equal(resumed, uninterrupted)
        assert record["resumed"]["events"] == lock_step_ranks[rank]["events"][first_steps:]


def test_closures_on_the_unwrapped_model_make_distributed_data_parallel_reduce_nothing(lock_step_ranks):
    wrapped = _on_two_ranks(lock_step, LOCK_STEP_SETTINGS, LOCK_STEP_STEPS, GLOBAL_BATCH, "float32", True)
    for record, plain in zip(wrapped, lock_step_ranks):
        assert record["ddp_buckets"] == []  # its communication hook was never called
        assert record["collectives"] == plain["collectives"]
        for mine, theirs in zip(record["parameters"], plain["parameters"]):
            assert torch.equal(mine, theirs)


def test_each_update_and_measurement_makes_exactly_the_documented_all_reduces(lock_step_ranks):
    first, second = lock_step_ranks
    assert first["collectives"] == second["collectives"]
    parameters = first["parameter_count"]
    update = (parameters + 1, "torch.float32")  # gradient sums and the loss sum
    direction = (parameters, "torch.float32")  # the direction batches' gradient sums
    line = (3, "torch.float64")  # the line-loss sums
    assert all(len(calls) <= 1 for calls in first["collectives"])  # approximation_batches > 1: never two at once
    calls = [call for step_calls in first["collectives"] for call in step_calls]
    assert set(calls) == {update, direction, line}
    measurements = len(_measurements(first))
    updates = first["state"]["optimizer"]["lab_pal"]["updates"]
    assert calls.count(line) == measurements
    assert calls.count(direction) == measurements
    assert calls.count(update) == updates - measurements
    for step_calls, events in zip(first["collectives"], first["events"]):
        assert (line in step_calls) == any(event["event"] == "measurement" for event in events)


@pytest.mark.parametrize("mode", ["NSGD", "SGD"])
def test_two_ranks_match_one_process_on_the_global_batch(mode):
    settings = dict(COMPARISON_SETTINGS, mode=mode)
    ranks = _on_two_ranks(lock_step, settings, COMPARISON_STEPS, GLOBAL_BATCH, "float64")
    alone = train(settings, COMPARISON_STEPS, GLOBAL_BATCH, "float64")
    assert len(_measurements(alone)) >= 3
    assert alone["log_values"]["training_batch_size"] == 4 * 128
    for record in ranks:
        difference = max((mine - single).abs().max().item() for mine, single in zip(record["parameters"],
                                                                                     alone["parameters"]))
        assert difference < 1e-5
        assert [len(events) for events in record["events"]] == [len(events) for events in alone["events"]]
        for mine, single in zip(_measurements(record), _measurements(alone)):
            assert mine["learning_rate"] == pytest.approx(single["learning_rate"], rel=1e-6)
        assert record["log_values"]["backward_passes"] == alone["log_values"]["backward_passes"]


def test_research_code_steps_are_refused_with_several_processes():
    messages = _on_two_ranks(research_code_steps_refused)
    assert all(message is not None and "research_code_steps" in message for message in messages)


def test_a_process_group_needs_torch_distributed_initialised():
    with pytest.raises(ValueError, match="Invalid process_group.*not initialised"):
        LabPal([nn.Parameter(torch.zeros(2))], process_group=object())


def test_holds_partial_sums_between_update_boundaries():
    parameter = nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = LabPal([parameter], approximation_batches=2, batch_size_schedule="0:2")

    def closure():
        return (parameter ** 2).sum() / 2

    partial = []
    for _ in range(6):
        optimizer.step(closure)
        partial.append(optimizer.holds_partial_sums)
    # A measurement over 2 · 2 batches, then training batches of 2.
    assert partial == [True, True, True, False, True, False]
    assert math.isfinite(optimizer.summary.step_size)
