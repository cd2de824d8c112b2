"""The stepper: one training step for either kind of optimizer, exactly as written out by hand."""

import copy

import pytest
import torch

from source.optimizer import OPTIMIZERS, LabPal, LineSearchBase, Pls, build_optimizer, make_batch_closure
from source.optimizer.steppers import ClosureStepper, GradientStepper, stepper_kind
from source.training.losses import mean_squared_error


def _problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 3, generator=generator))
        model.bias.zero_()
    inputs, targets = torch.randn(8, 3, generator=generator), torch.randn(8, 1, generator=generator)
    return model, inputs, targets


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_registered_optimizer_gets_the_stepper_of_its_kind(name):
    model, _, _ = _problem()
    kind = stepper_kind(build_optimizer(name, model, {}, training_set_size=80, inference_batch_size=8))
    expected = ClosureStepper if issubclass(OPTIMIZERS[name], LineSearchBase) else GradientStepper
    assert kind is expected
    assert kind.follows_schedule == (kind is GradientStepper)


def test_a_gradient_step_is_zero_grad_forward_backward_step_then_the_schedule():
    model, inputs, targets = _problem()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    stepper = stepper_kind(optimizer)(optimizer, schedule, model, mean_squared_error, batch_size=8)
    by_hand = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for step in (1, 2):
        result = stepper.step(inputs, targets, None, report_as_step=step)
        by_hand.zero_grad()
        loss = mean_squared_error(twin(inputs), targets)
        loss.backward()
        by_hand.step()
        for group in by_hand.param_groups:
            group["lr"] *= 0.5
        assert torch.equal(result.loss, loss.detach())
        assert all(torch.equal(mine, theirs) for mine, theirs in zip(model.parameters(), twin.parameters()))
        # The learning rate the step used, read before the schedule halved it for the next step.
        assert result.values == {
            "learning_rate": 0.1 * 0.5 ** (step - 1),
            "training_batch_size": 8,
            "forward_passes": step,
            "backward_passes": step,
        }
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert stepper.take_events() == [] and not stepper.holds_partial_sums
    assert stepper.step(inputs, targets, None).values is None


def test_a_closure_step_is_the_line_search_s_own_step_on_a_batch_closure():
    model, inputs, targets = _problem()
    twin = copy.deepcopy(model)
    arguments = dict(training_set_size=80, inference_batch_size=8, measurement_interval=1)
    optimizer = LabPal(model.parameters(), buffers=model.buffers(), **arguments)
    by_hand = LabPal(twin.parameters(), buffers=twin.buffers(), **arguments)
    stepper = stepper_kind(optimizer)(optimizer, None, model, mean_squared_error, batch_size=8)
    for step in range(1, 4):
        result = stepper.step(inputs, targets, None, report_as_step=step)
        loss = by_hand.step(make_batch_closure(twin, mean_squared_error, inputs, targets))
        assert torch.equal(result.loss, loss)
        assert result.outputs.shape == (8, 1)
        assert all(torch.equal(mine, theirs) for mine, theirs in zip(model.parameters(), twin.parameters()))
        assert result.values == {"learning_rate": 0.0, "training_batch_size": 8, **by_hand.log_values()}
        assert stepper.take_events() == by_hand.take_events()
        assert stepper.holds_partial_sums == by_hand.holds_partial_sums


def test_a_line_search_that_asks_for_per_sample_losses_gets_them():
    model, inputs, targets = _problem()
    optimizer = Pls(model.parameters(), buffers=model.buffers())
    seen = []

    def recording_loss(outputs, targets, **options):
        seen.append(options.get("reduction"))
        return mean_squared_error(outputs, targets, **options)

    stepper = stepper_kind(optimizer)(optimizer, None, model, recording_loss, batch_size=8)
    stepper.step(inputs, targets, None)
    assert seen and set(seen) == {Pls.closure_loss}


def test_the_stepper_state_holds_the_optimizer_and_the_schedule_by_checkpoint_key():
    model, inputs, targets = _problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    stepper = GradientStepper(optimizer, schedule, model, mean_squared_error, batch_size=8)
    stepper.step(inputs, targets, None)
    state = stepper.state_dict()
    assert set(state) == {"optimizer", "schedule"} and state["schedule"]["last_epoch"] == 1
    fresh_optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fresh = GradientStepper(
        fresh_optimizer, torch.optim.lr_scheduler.StepLR(fresh_optimizer, step_size=1, gamma=0.5), model,
        mean_squared_error, batch_size=8,
    )  # fmt: skip
    fresh.load_state_dict(state)
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
