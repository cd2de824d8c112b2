"""PAL pinned against closed forms on quadratics, a real data set and the authors' research code."""

import contextlib
import copy
import importlib.util
import io
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from source.optimizer.lab_pal import make_batch_closure
from source.optimizer.line_search import MEAN_LOSS, LineSearch
from source.optimizer.pal import Pal, pal_step_size
from tests.conftest import SmallBatchNormNet, image_batches, quadratic_problem, train_steps

# --------------------------------------------------------------------------- problems


def line_minimum_distance(theta, a, b):
    """t minimising the quadratic along −g, as a multiple of g: θ − t g is the line minimum."""
    gradient = a @ theta - b
    return (gradient @ gradient) / (gradient @ a @ gradient), gradient


# --------------------------------------------------------------------------- the step rule


def test_step_rule_covers_all_branches():
    def step(loss_0, loss_mu, derivative, measuring_step=1.0, adaptation=1.0, max_step=10.0):
        values = [torch.tensor(v, dtype=torch.float64) for v in (loss_0, loss_mu, derivative)]
        s, failed = pal_step_size(*values, measuring_step, adaptation, max_step)
        return s.item(), failed.item()

    # Parabola 2 x² − 2 x + 1: minimum at 0.5, measured at μ = 1 (L = 1).
    assert step(1.0, 1.0, -2.0) == (pytest.approx(0.5), False)
    assert step(1.0, 1.0, -2.0, adaptation=1.66) == (pytest.approx(0.83), False)
    assert step(1.0, 1.0, -2.0, adaptation=1.66, max_step=0.6) == (0.6, False)
    assert step(1.0, -2.0, -2.0, measuring_step=0.7) == (0.7, False)  # concave: s = μ
    assert step(1.0, -1.0, -2.0) == (1.0, False)  # straight line (a = 0): s = μ
    assert step(1.0, -5.0, -2.0, measuring_step=4.0, max_step=3.16) == (3.16, False)
    assert step(1.0, 2.0, 0.5) == (0.0, False)  # not descending
    assert step(1.0, 2.0, 0.0) == (0.0, False)
    for bad in (math.nan, math.inf, -math.inf):
        assert step(bad, 1.0, -2.0) == (0.0, True)
        assert step(1.0, bad, -2.0) == (0.0, True)
        assert step(1.0, 1.0, bad) == (0.0, True)


@pytest.mark.parametrize("adaptation", [1.0, 1.66])
def test_step_lands_on_the_line_minimum_times_the_adaptation(adaptation):
    theta, a, b, loss = quadratic_problem()
    start = theta.detach().clone()
    distance, gradient = line_minimum_distance(start, a, b)
    optimizer = Pal([theta], conjugate_gradient_factor=0.0, update_step_adaptation=adaptation, max_step=100.0)

    returned = optimizer.step(loss)

    expected = start - adaptation * distance * gradient
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-6, atol=0)
    assert returned.item() == (0.5 * start @ a @ start - b @ start).item()
    values = optimizer.log_values()
    assert values["learning_rate"] == pytest.approx(adaptation * distance.item(), rel=1e-6)
    assert values["step_size"] == pytest.approx(adaptation * (distance * gradient.norm()).item(), rel=1e-6)
    assert (values["forward_passes"], values["backward_passes"], values["failed_steps"]) == (2, 1, 0)


def test_measuring_step_does_not_change_the_step_on_a_quadratic():
    theta, a, b, loss = quadratic_problem(seed=3)
    start = theta.detach().clone()
    distance, gradient = line_minimum_distance(start, a, b)
    Pal([theta], measuring_step=0.01, conjugate_gradient_factor=0.0, update_step_adaptation=1.0,
        max_step=100.0).step(loss)
    torch.testing.assert_close(theta.detach(), start - distance * gradient, rtol=1e-6, atol=0)


def test_step_is_clipped_to_max_step():
    theta, a, b, loss = quadratic_problem(seed=1)
    start = theta.detach().clone()
    distance, gradient = line_minimum_distance(start, a, b)
    max_step = 0.25 * (distance * gradient.norm()).item()
    optimizer = Pal([theta], conjugate_gradient_factor=0.0, max_step=max_step)
    optimizer.step(loss)
    torch.testing.assert_close(theta.detach(), start - max_step * gradient / gradient.norm(), rtol=1e-12, atol=0)
    assert optimizer.log_values()["step_size"] == max_step


def test_concave_line_takes_the_measuring_step():
    theta = nn.Parameter(torch.tensor([0.3, -0.4], dtype=torch.float64))
    start = theta.detach().clone()
    optimizer = Pal([theta], measuring_step=0.5, conjugate_gradient_factor=0.0)
    optimizer.step(lambda: -0.5 * theta @ theta)  # gradient −θ: the loss falls ever faster along θ
    torch.testing.assert_close(theta.detach(), start + 0.5 * start / start.norm(), rtol=1e-12, atol=0)
    assert optimizer.log_values()["step_size"] == 0.5
    assert optimizer.log_values()["learning_rate"] == pytest.approx(0.5 / 0.5)


def test_direction_that_does_not_descend_takes_no_step_but_keeps_the_direction():
    theta, a, b, loss = quadratic_problem(seed=2)
    start = theta.detach().clone()
    gradient = a @ start - b
    optimizer = Pal([theta], conjugate_gradient_factor=0.5)
    optimizer.state[theta]["conjugate_direction"] = -4.0 * gradient  # d = −2g + g = −g: uphill along −d
    optimizer.step(loss)
    assert torch.equal(theta.detach(), start)
    torch.testing.assert_close(optimizer.state[theta]["conjugate_direction"], -gradient, rtol=1e-12, atol=0)
    values = optimizer.log_values()
    assert (values["step_size"], values["learning_rate"], values["failed_steps"]) == (0.0, 0.0, 0)


@pytest.mark.parametrize("exact", [True, False])
def test_conjugate_direction_and_directional_derivative(exact):
    theta, a, b, loss = quadratic_problem(seed=4)
    optimizer = Pal([theta], conjugate_gradient_factor=0.4, exact_directional_derivative=exact,
                    update_step_adaptation=1.0, max_step=100.0)
    first_gradient = a @ theta.detach() - b
    optimizer.step(loss)
    first_direction = optimizer.state[theta]["conjugate_direction"].clone()
    torch.testing.assert_close(first_direction, first_gradient, rtol=1e-14, atol=0)  # no previous direction yet
    start = theta.detach().clone()
    gradient = a @ start - b

    optimizer.step(loss)

    direction = 0.4 * first_direction + gradient
    unit = direction / direction.norm()
    slope = -(gradient @ unit) if exact else -direction.norm()

    def f(point):
        return 0.5 * point @ a @ point - b @ point

    curvature = f(start - unit) - f(start) - slope  # μ = 1
    expected = start - (-slope / (2 * curvature)) * unit
    if exact:  # then the parabola is the quadratic's own line: curvature ½ uᵀAu
        torch.testing.assert_close(curvature, unit @ a @ unit / 2, rtol=1e-9, atol=0)
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-9, atol=0)
    torch.testing.assert_close(optimizer.state[theta]["conjugate_direction"], direction, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- training


def test_lowers_the_loss_of_logistic_regression_on_digits_without_tuning():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    loss_function = nn.CrossEntropyLoss()
    with torch.no_grad():
        initial = loss_function(model(inputs), targets).item()
    optimizer = Pal(model.parameters())
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        order = torch.randperm(len(inputs), generator=generator)
        for batch in order.split(128):
            optimizer.step(make_batch_closure(model, loss_function, inputs[batch], targets[batch]))
    with torch.no_grad():
        final = loss_function(model(inputs), targets).item()
        accuracy = (model(inputs).argmax(1) == targets).float().mean().item()
    assert initial > 2.0
    assert final < 0.35 and accuracy > 0.9
    values = optimizer.log_values()
    assert values["forward_passes"] == 2 * 5 * 15 and values["backward_passes"] == 5 * 15
    assert values["failed_steps"] == 0 and values["learning_rate"] > 0


def test_buffers_after_a_step_are_those_of_one_training_forward_pass():
    torch.manual_seed(0)
    model = SmallBatchNormNet()
    reference = copy.deepcopy(model)
    inputs, targets = image_batches(1)[0]
    optimizer = Pal(model.parameters(), buffers=model.buffers())
    torch.manual_seed(1)
    optimizer.step(make_batch_closure(model, nn.CrossEntropyLoss(), inputs, targets))
    torch.manual_seed(1)
    with torch.no_grad():
        reference(inputs)
    for buffer, expected in zip(model.buffers(), reference.buffers()):
        assert torch.equal(buffer, expected)
    assert not torch.equal(model.features[1].running_mean, torch.zeros(4))


def test_satisfies_the_line_search_protocol():
    theta, _, _, loss = quadratic_problem()
    optimizer = Pal([theta])
    assert isinstance(optimizer, LineSearch) and Pal.closure_loss == MEAN_LOSS
    assert optimizer.log_values() == dict(learning_rate=0.0, forward_passes=0, backward_passes=0, failed_steps=0)
    optimizer.step(loss)
    assert optimizer.take_events() == []
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)


# --------------------------------------------------------------------------- failures


def failing_closure(theta, loss, fail_on_call, value):
    """``loss`` but returning ``value`` on the given call numbers (1-based)."""
    calls = []

    def closure():
        calls.append(None)
        result = loss()
        return result * value if len(calls) in fail_on_call else result

    return closure


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("failing_call", [1, 2], ids=["loss_0", "loss_mu"])
def test_non_finite_loss_leaves_parameters_and_direction_unchanged(value, failing_call):
    theta, _, _, loss = quadratic_problem(seed=6)
    optimizer = Pal([theta], conjugate_gradient_factor=0.4)
    optimizer.step(loss)
    start = theta.detach().clone()
    direction = optimizer.state[theta]["conjugate_direction"].clone()

    optimizer.step(failing_closure(theta, loss, {failing_call}, value))

    assert torch.equal(theta.detach(), start)
    assert torch.equal(optimizer.state[theta]["conjugate_direction"], direction)
    values = optimizer.log_values()
    assert (values["failed_steps"], values["step_size"], values["learning_rate"]) == (1, 0.0, 0.0)
    assert optimizer.take_events() == []
    optimizer.step(loss)  # and it carries on
    assert optimizer.log_values()["failed_steps"] == 1
    assert not torch.equal(theta.detach(), start) and torch.isfinite(theta).all()


def test_infinite_gradient_with_finite_loss_never_reaches_the_parameters():
    theta = nn.Parameter(torch.tensor([0.0, 1.0], dtype=torch.float64))
    optimizer = Pal([theta], conjugate_gradient_factor=0.0)
    optimizer.step(lambda: theta.abs().sqrt().sum())  # d/dx sqrt(|x|) is infinite at 0
    assert torch.equal(theta.detach(), torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert optimizer.log_values()["failed_steps"] == 1


def test_zero_gradient_takes_no_step():
    theta = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = Pal([theta])
    optimizer.step(lambda: (theta**2).sum())
    assert torch.equal(theta.detach(), torch.zeros(3, dtype=torch.float64))
    assert optimizer.log_values()["failed_steps"] == 0


# --------------------------------------------------------------------------- state


@pytest.mark.parametrize("momentum", [0.0, 0.4])
def test_resuming_from_state_dict_continues_bitwise(momentum):
    batches = image_batches(10, seed=3)
    torch.manual_seed(0)
    model = SmallBatchNormNet()
    resumed_model = copy.deepcopy(model)

    def first_part(model, optimizer):
        torch.manual_seed(5)
        train_steps(model, optimizer, batches[:4])
        optimizer.step(lambda: model(batches[0][0]).sum() * math.nan)  # a failure, counted in the state

    uninterrupted = Pal(model.parameters(), buffers=model.buffers(), conjugate_gradient_factor=momentum)
    first_part(model, uninterrupted)
    train_steps(model, uninterrupted, batches[4:])

    optimizer = Pal(resumed_model.parameters(), buffers=resumed_model.buffers(), conjugate_gradient_factor=momentum)
    first_part(resumed_model, optimizer)
    saved = io.BytesIO()
    torch.save({"model": resumed_model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=False)
    fresh_model = SmallBatchNormNet()
    fresh_model.load_state_dict(checkpoint["model"])
    fresh = Pal(fresh_model.parameters(), buffers=fresh_model.buffers(), conjugate_gradient_factor=momentum)
    fresh.load_state_dict(checkpoint["optimizer"])
    assert fresh.log_values() == optimizer.log_values()
    torch.set_rng_state(checkpoint["rng"])
    train_steps(fresh_model, fresh, batches[4:])

    for expected, actual in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        assert torch.equal(expected, actual)
    assert fresh.log_values() == uninterrupted.log_values()
    assert fresh.log_values()["failed_steps"] == 1 and fresh.log_values()["forward_passes"] == 22


# --------------------------------------------------------------------------- arguments


def test_per_sample_losses_and_missing_closures_are_rejected():
    theta = nn.Parameter(torch.ones(3))
    optimizer = Pal([theta])
    with pytest.raises(ValueError, match="0-dim tensor"):
        optimizer.step(lambda: theta * 2)
    with pytest.raises(ValueError, match="needs a closure"):
        optimizer.step(None)
    other = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="no gradient for any"):
        optimizer.step(lambda: (other**2).sum())


def test_parameters_without_a_gradient_are_left_alone():
    theta, _, _, loss = quadratic_problem()
    unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    optimizer = Pal([theta, unused])
    optimizer.step(loss)
    optimizer.step(loss)
    assert torch.equal(unused.detach(), torch.ones(2, dtype=torch.float64))
    assert "conjugate_direction" not in optimizer.state[unused]


# --------------------------------------------------------------------------- the research code


def load_reference(monkeypatch):
    """The authors' PalOptimizer, loaded by file path with its CPU and torch >= 2.0 problems patched."""
    folder = os.environ.get("LABPAL_REFERENCE")
    if not folder:
        pytest.skip("LABPAL_REFERENCE is not set: it names the folder of the authors' LABPAL code")
    path = Path(folder) / "source" / "optimizers" / "pal_optimizer.py"
    spec = importlib.util.spec_from_file_location("labpal_reference_pal_optimizer", path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its `is not 0` comparison warns when compiled
        spec.loader.exec_module(module)
    reference_class = module.PalOptimizer

    def no_reseeding(self, seed):
        # Its version seeds from time.time() and calls torch.cuda unconditionally (it fails on CPU); the
        # models of these tests draw no random numbers, so there is nothing to replay.
        return contextlib.nullcontext()

    def zero_grad(self, set_to_none=False):
        # As on torch < 2.0, for which it was written: zero the gradients in place.
        torch.optim.Optimizer.zero_grad(self, set_to_none=False)

    monkeypatch.setattr(reference_class, "random_seed_torch", no_reseeding)
    monkeypatch.setattr(reference_class, "zero_grad", zero_grad)
    return reference_class


def tanh_network(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def tabular_batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (16,), generator=generator))
        for _ in range(count)
    ]


@pytest.mark.parametrize(
    "arguments, tolerance",
    [
        (dict(conjugate_gradient_factor=0.0, exact_directional_derivative=True), 1e-12),
        (dict(conjugate_gradient_factor=0.4, exact_directional_derivative=True), 1e-12),
        (dict(conjugate_gradient_factor=0.4, exact_directional_derivative=False), 1e-12),
        (dict(conjugate_gradient_factor=0.4, measuring_step=0.25, max_step=0.5), 1e-12),
        # A clipped step of the research code is μ + (s_max − μ) with the difference taken in float32, its
        # settings' precision: steps of 0.3 drift by a relative 1e-8 from the exact 0.3 ours takes.
        (dict(conjugate_gradient_factor=0.4, measuring_step=0.1, max_step=0.3), 1e-7),
    ],
)
def test_matches_the_research_code_on_identical_batches(monkeypatch, arguments, tolerance):
    reference_class = load_reference(monkeypatch)
    settings = dict(measuring_step=1.0, max_step=3.16, update_step_adaptation=1.66, exact_directional_derivative=True)
    settings.update(arguments)
    # The research code stores its settings as float32 tensors (α = 1.66 becomes 1.6599999666); give ours the
    # same rounded values, or the steps differ by a relative 2e-8.
    settings = {key: float(torch.tensor(value)) if isinstance(value, float) else value
                for key, value in settings.items()}
    model = tanh_network()
    reference_model = copy.deepcopy(model)
    optimizer = Pal(model.parameters(), **settings)
    reference = reference_class(
        reference_model.parameters(),
        measuring_step_size=settings["measuring_step"],
        max_step_size=settings["max_step"],
        conjugate_gradient_factor=settings["conjugate_gradient_factor"],
        update_step_adaptation=settings["update_step_adaptation"],
        calc_exact_directional_derivative=settings["exact_directional_derivative"],
    )
    loss_function = nn.CrossEntropyLoss()
    for inputs, targets in tabular_batches(8):
        loss = optimizer.step(lambda: loss_function(model(inputs), targets))
        reference_loss, reference_rate = reference.step(lambda: loss_function(reference_model(inputs), targets))
        assert loss.item() == pytest.approx(reference_loss.item(), rel=tolerance)
        assert optimizer.log_values()["learning_rate"] == pytest.approx(reference_rate, rel=max(tolerance, 1e-9))
        for ours, theirs in zip(model.parameters(), reference_model.parameters()):
            torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)


def test_research_code_is_left_at_its_measuring_point_after_a_nan_but_ours_is_not(monkeypatch):
    reference_class = load_reference(monkeypatch)
    model = tanh_network(seed=1)
    reference_model = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = Pal(model.parameters(), conjugate_gradient_factor=0.0)
    reference = reference_class(reference_model.parameters(), conjugate_gradient_factor=0.0)
    (inputs, targets), = tabular_batches(1, seed=2)
    loss_function = nn.CrossEntropyLoss()

    def nan_at_measuring_point(network):
        calls = []

        def closure():
            calls.append(None)
            loss = loss_function(network(inputs), targets)
            return loss * math.nan if len(calls) == 2 else loss

        return closure

    optimizer.step(nan_at_measuring_point(model))
    reference.step(nan_at_measuring_point(reference_model))

    assert all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), start))
    moved = torch.cat([(p - p0).flatten() for p, p0 in zip(reference_model.parameters(), start)])
    assert moved.norm().item() == pytest.approx(1.0, rel=1e-9)  # it stayed at θ − μ d/‖d‖ with μ = 1


def test_research_code_moves_batchnorm_statistics_at_its_measuring_point_and_ours_does_not(monkeypatch):
    reference_class = load_reference(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    reference_model = copy.deepcopy(model)
    single_pass = copy.deepcopy(model)
    (inputs, targets), = tabular_batches(1, seed=3)
    loss_function = nn.CrossEntropyLoss()
    Pal(model.parameters(), buffers=model.buffers()).step(lambda: loss_function(model(inputs), targets))
    reference_class(reference_model.parameters()).step(lambda: loss_function(reference_model(inputs), targets))
    with torch.no_grad():
        single_pass(inputs)
    assert torch.equal(model[1].running_mean, single_pass[1].running_mean)
    assert model[1].num_batches_tracked.item() == 1 and reference_model[1].num_batches_tracked.item() == 2
    assert not torch.allclose(reference_model[1].running_mean, single_pass[1].running_mean)
