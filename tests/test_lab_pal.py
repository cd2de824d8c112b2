"""LABPAL's numerical pieces and optimizer, pinned against known answers."""

import copy
import dataclasses
import io
import json
import math

import pytest
import torch
from torch import nn

from source.optimizer.lab_pal import (
    PAPER_BATCH_SIZE_SCHEDULE,
    LabPal,
    fit_parabola,
    make_batch_closure,
    multiplier_at,
    noise_adaptation_factor,
    scale_batch_size_schedule,
)
from source.optimizer.lab_pal import numerics
from tests.conftest import SmallBatchNormNet, image_batches, quadratic_problem, train_steps

# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("positions", [(0.0, 1.77e-4, 0.01), (-1.0, 0.5, 3.0), (2.0, 0.0, 1.0)])
def test_parabola_fit_is_exact_for_a_parabola(positions):
    curvature, slope, offset = 3.0, -1.5, 0.25

    def parabola(x):
        return curvature / 2 * x * x + slope * x + offset

    fitted = fit_parabola(positions, tuple(parabola(x) for x in positions))
    assert fitted.curvature == pytest.approx(curvature, rel=1e-6)
    assert fitted.slope == pytest.approx(slope, rel=1e-9)
    assert fitted.offset == pytest.approx(offset, rel=1e-12)
    assert fitted.minimum_position == pytest.approx(0.5, rel=1e-6)


def test_parabola_fit_needs_three_distinct_positions():
    with pytest.raises(ValueError, match="three distinct positions"):
        fit_parabola((0.0, 0.1, 0.1), (1.0, 2.0, 3.0))


def test_noise_factor_and_scaled_schedule_match_the_paper_examples():
    assert noise_adaptation_factor(40_000, 128) == 1.0
    assert scale_batch_size_schedule(PAPER_BATCH_SIZE_SCHEDULE, 1.0) == ((0, 1), (75_000, 2), (112_500, 4))
    small_batches = scale_batch_size_schedule(PAPER_BATCH_SIZE_SCHEDULE, noise_adaptation_factor(40_000, 12))
    assert small_batches[0] == (0, 10)
    imagenet = scale_batch_size_schedule(PAPER_BATCH_SIZE_SCHEDULE, noise_adaptation_factor(1_281_167, 128))
    assert imagenet == ((0, 32), (75_000, 64), (112_500, 128))
    assert scale_batch_size_schedule(((0, 1),), 0.3) == ((0, 1),)


@pytest.mark.parametrize("written", ["0:1, 75000:2, 112500:4", ["0:1", "75000:2", "112500:4"], ["0 : 1", " 75000:2 ", "112500:4"]])
def test_the_schedule_reads_its_written_form(written):
    assert LabPal([nn.Parameter(torch.zeros(1))], batch_size_schedule=written).param_groups[0][
        "batch_size_schedule"] == PAPER_BATCH_SIZE_SCHEDULE


@pytest.mark.parametrize("written", ["0-1, 5:2", "0:1:2", ["0:a"], "5:1"])
def test_a_malformed_written_schedule_names_the_form(written):
    with pytest.raises(ValueError, match="Invalid batch_size_schedule"):
        LabPal([nn.Parameter(torch.zeros(1))], batch_size_schedule=written)


def test_multiplier_at_follows_the_schedule():
    schedule = ((0, 1), (75_000, 2), (112_500, 4))
    assert [multiplier_at(schedule, s) for s in (0, 74_999, 75_000, 112_499, 200_000)] == [1, 1, 2, 2, 4]


def test_the_step_is_the_clipped_adapted_and_floored_parabola_minimum():
    assert numerics.clipped_step(0.5, max_step=1.0, step_adaptation=1.8, min_step=1e-6) == 0.9
    assert numerics.clipped_step(4.0, max_step=1.0, step_adaptation=1.8, min_step=1e-6) == 1.8
    assert numerics.clipped_step(1e-9, max_step=1.0, step_adaptation=1.8, min_step=1e-6) == 1e-6


def test_a_line_and_a_direction_name_why_they_give_no_step():
    descending = fit_parabola((0.0, 1.0, 2.0), (1.0, 0.5, 0.5))
    assert numerics.line_failure((1.0, 0.5, 0.5), descending) is None
    assert "non-finite" in numerics.line_failure((1.0, math.nan, 0.5), descending)
    assert "not convex" in numerics.line_failure((1.0, 0.5, 0.0), fit_parabola((0.0, 1.0, 2.0), (1.0, 0.5, 0.0)))
    assert "does not decrease" in numerics.line_failure((1.0, 1.5, 2.5), fit_parabola((0.0, 1.0, 2.0), (1.0, 1.5, 2.5)))
    assert numerics.direction_failure(1.0, -0.5, 1e-3, 100.0) is None
    assert numerics.direction_failure(math.inf, -0.5, 1e-3, 100.0) == "direction norm is inf"
    assert numerics.direction_failure(1e-4, -0.5, 1e-3, 100.0) == "direction norm 0.0001 outside [0.001, 100.0]"
    assert numerics.direction_failure(1.0, 0.0, 1e-3, 100.0) == "directional derivative 0 is not negative"


def test_the_average_runs_over_the_last_window_values():
    history, average = numerics.windowed_average([1.0, 2.0, 3.0], 6.0, window=3)
    assert history == [2.0, 3.0, 6.0] and average == pytest.approx(11 / 3)
    assert numerics.windowed_average([], 2.0, window=3) == ([2.0], 2.0)


def test_the_next_measurement_comes_an_interval_on_or_when_the_untrustworthy_updates_end():
    assert numerics.next_measurement_update(0, measurement_interval=1000, untrustworthy_updates=400) == 400
    assert numerics.next_measurement_update(400, measurement_interval=1000, untrustworthy_updates=400) == 1400
    assert numerics.next_measurement_update(10, measurement_interval=5, untrustworthy_updates=400) == 15
    assert numerics.scheduled_multiplier_change(((0, 1), (10, 2)), 10, multiplier=1) == 2
    assert numerics.scheduled_multiplier_change(((0, 1), (10, 2)), 9, multiplier=1) is None


def test_the_weight_decay_term_along_the_line_is_the_l2_penalty_at_each_position():
    generator = torch.Generator().manual_seed(0)
    theta = [torch.randn(3, generator=generator, dtype=torch.float64), torch.randn(2, generator=generator, dtype=torch.float64)]
    direction = [torch.randn(3, generator=generator, dtype=torch.float64), torch.randn(2, generator=generator, dtype=torch.float64)]
    norm = torch.cat(direction).norm()
    penalty = numerics.weight_decay_along_line([(0.1, theta[:1], direction[:1]), (0.3, theta[1:], direction[1:])], norm)
    for t in (0.0, 0.5, 2.0):
        moved = [p - t * d / norm for p, d in zip(theta, direction)]
        expected = 0.1 / 2 * moved[0].square().sum() + 0.3 / 2 * moved[1].square().sum()
        assert numerics.penalised_line_losses([0.0], [t], penalty.tolist())[0] == pytest.approx(expected.item(), rel=1e-12)


# --------------------------------------------------------------------------- problems


def exact_line_minimum(theta, a, b, direction):
    """θ − t d with t minimising the quadratic along −d."""
    gradient = a @ theta - b
    t = (gradient @ direction) / (direction @ a @ direction)
    return theta - t * direction


def run(optimizer, closure, steps):
    for _ in range(steps):
        optimizer.step(closure)


def few_updates(**overrides):
    """Arguments for a LabPal that measures often, for short tests."""
    arguments = dict(untrustworthy_updates=0, measurement_interval=3, approximation_batches=2)
    arguments.update(overrides)
    return arguments


# --------------------------------------------------------------------------- measuring


@pytest.mark.parametrize("mode", ["NSGD", "SGD"])
def test_one_measurement_lands_on_the_exact_line_minimum(mode):
    theta, a, b, loss = quadratic_problem()
    start = theta.detach().clone()
    expected = exact_line_minimum(start, a, b, a @ start - b)
    optimizer = LabPal([theta], mode, step_adaptation=1.0, max_step=1e6)
    run(optimizer, loss, 10)  # the measurement takes approximation_batches = 10 steps
    summary = optimizer.summary
    assert summary.measurements == 1 and summary.updates == 1 and summary.phase == "training"
    relative_error = (theta.detach() - expected).norm() / (expected - start).norm()
    assert relative_error < 1e-3


def test_research_code_setting_reproduces_its_doubled_step():
    theta, a, b, loss = quadratic_problem(seed=1)
    start = theta.detach().clone()
    minimum = exact_line_minimum(start, a, b, a @ start - b)
    optimizer = LabPal([theta], step_adaptation=3.6, max_step=0.5)
    run(optimizer, loss, 10)
    exact_step = (minimum - start).norm().item()
    expected_step = min(2 * exact_step, 1.0) * 1.8
    assert optimizer.summary.last_measured_step == pytest.approx(expected_step, rel=1e-3)


def test_learning_rate_is_step_over_direction_norm_and_visible_in_param_groups():
    theta, a, b, loss = quadratic_problem(seed=2)
    norm = (a @ theta.detach() - b).norm().item()
    optimizer = LabPal([theta], step_adaptation=1.0, max_step=1e6)
    assert optimizer.step(loss).item() == pytest.approx(loss().item())
    run(optimizer, loss, 9)
    summary = optimizer.summary
    assert summary.last_measured_learning_rate == pytest.approx(summary.last_measured_step / norm, rel=1e-9)
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(summary.last_measured_learning_rate)


def test_step_is_clipped_adapted_and_floored():
    theta, a, b, loss = quadratic_problem(seed=3)
    optimizer = LabPal([theta], step_adaptation=1.8, max_step=1e-3)
    run(optimizer, loss, 10)
    assert optimizer.summary.last_measured_step == pytest.approx(1.8e-3)


# --------------------------------------------------------------------------- iterative batches


class LinearRegression(nn.Module):
    def __init__(self, features=4):
        super().__init__()
        self.linear = nn.Linear(features, 1, dtype=torch.float64)

    def forward(self, inputs):
        return self.linear(inputs).squeeze(-1)


def regression_batches(count, size, features=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(features, generator=generator, dtype=torch.float64)
    batches = []
    for _ in range(count):
        inputs = torch.randn(size, features, generator=generator, dtype=torch.float64)
        targets = inputs @ weights + 0.1 * torch.randn(size, generator=generator, dtype=torch.float64)
        batches.append((inputs, targets))
    return batches


def test_k_accumulated_batches_give_the_direction_of_one_big_batch():
    k, size = 4, 8
    model = LinearRegression()
    loss_function = nn.MSELoss()
    measurement = regression_batches(2 * k, size, seed=1)
    training = regression_batches(k, size, seed=2)
    optimizer = LabPal(model.parameters(), **few_updates(batch_size_schedule=((0, k),)))
    for inputs, targets in measurement:
        optimizer.step(make_batch_closure(model, loss_function, inputs, targets))
    step_size = optimizer.summary.step_size

    reference = copy.deepcopy(model)
    big_inputs = torch.cat([inputs for inputs, _ in training])
    big_targets = torch.cat([targets for _, targets in training])
    loss_function(reference(big_inputs), big_targets).backward()
    gradient = [p.grad for p in reference.parameters()]
    norm = torch.sqrt(sum((g * g).sum() for g in gradient))
    expected = [p.detach() - step_size * g / norm for p, g in zip(reference.parameters(), gradient)]

    for inputs, targets in training:
        optimizer.step(make_batch_closure(model, loss_function, inputs, targets))
    assert optimizer.summary.updates == 2
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-5)


def test_measurement_over_k_batch_closures_finds_the_mean_loss_minimum_and_late_binding_does_not():
    """Stored closures must keep their own batch: LABPAL evaluates them again k steps later."""
    k, size = 3, 16
    batches = regression_batches(10 * k, size, seed=3)
    loss_function = nn.MSELoss()
    arguments = dict(step_adaptation=1.0, max_step=1e6, batch_size_schedule=((0, k),))

    def measured_step(bind_batch):
        torch.manual_seed(0)
        model = LinearRegression()
        optimizer = LabPal(model.parameters(), **arguments)
        for inputs, targets in batches:
            if bind_batch:
                closure = make_batch_closure(model, loss_function, inputs, targets)
            else:

                def closure():  # reads the loop variables when called: the newest batch
                    return loss_function(model(inputs), targets)

            optimizer.step(closure)
        return optimizer.summary.last_measured_step

    # The exact answer: the mean loss over all 10·k batches is a quadratic along the line.
    torch.manual_seed(0)
    model = LinearRegression()
    parameters = list(model.parameters())
    direction_loss = sum(loss_function(model(x), y) for x, y in batches[:k]) / k
    direction = torch.autograd.grad(direction_loss, parameters)
    unit = [d / torch.sqrt(sum((g * g).sum() for g in direction)) for d in direction]
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])

    def mean_loss_at(position):
        with torch.no_grad():
            weight = parameters[0] - position * unit[0]
            bias = parameters[1] - position * unit[1]
            return loss_function((inputs @ weight.T).squeeze(-1) + bias, targets).item()

    parabola = fit_parabola((0.0, 0.5, 1.0), tuple(mean_loss_at(x) for x in (0.0, 0.5, 1.0)))
    bound_step = measured_step(bind_batch=True)
    late_bound_step = measured_step(bind_batch=False)
    assert bound_step == pytest.approx(parabola.minimum_position, rel=1e-3)
    assert abs(late_bound_step - parabola.minimum_position) > 0.05 * parabola.minimum_position


# --------------------------------------------------------------------------- schedule


def test_batch_size_switch_inside_a_training_batch_waits_for_the_next_boundary():
    theta, _, _, loss = quadratic_problem(seed=4)
    optimizer = LabPal(
        [theta], **few_updates(measurement_interval=100, batch_size_schedule=((0, 2), (25, 4)))
    )
    run(optimizer, loss, 26)  # measurement: steps 0-3, training batches 4-5, ..., 24-25
    assert optimizer.summary.batch_multiplier == 2
    assert optimizer.summary.phase == "training" and optimizer.summary.updates == 12
    run(optimizer, loss, 1)  # step 26 is the first boundary at or after step 25
    assert optimizer.summary.batch_multiplier == 4
    assert optimizer.summary.phase == "measuring"
    run(optimizer, loss, 7)  # 2·k = 8 batches for the new measurement
    assert optimizer.summary.measurements == 2 and optimizer.summary.phase == "training"


def test_noise_factor_scales_the_schedule_used_by_the_optimizer():
    theta, _, _, _ = quadratic_problem()
    optimizer = LabPal([theta], training_set_size=40_000, inference_batch_size=12)
    assert optimizer.scaled_batch_size_schedule == ((0, 10), (75_000, 21), (112_500, 42))


def test_measurements_happen_at_start_after_untrustworthy_updates_and_every_interval():
    theta, _, _, loss = quadratic_problem(seed=5)
    optimizer = LabPal([theta], untrustworthy_updates=5, measurement_interval=8, approximation_batches=2)
    measured_at = []
    for _ in range(60):
        before = optimizer.summary.measurements
        updates = optimizer.summary.updates
        optimizer.step(loss)
        if optimizer.summary.measurements > before:
            measured_at.append(updates)
    assert measured_at[:4] == [0, 5, 14, 23]


def test_measurements_after_untrustworthy_updates_are_averaged():
    theta, _, _, loss = quadratic_problem(seed=6)
    optimizer = LabPal(
        [theta], untrustworthy_updates=1, measurement_interval=2, approximation_batches=1, averaging_window=2
    )
    raw = []
    for _ in range(12):
        before = optimizer.summary.measurements
        optimizer.step(loss)
        if optimizer.summary.measurements > before:
            raw.append(optimizer.summary.last_measured_step)
            summary = optimizer.summary
            if len(raw) == 1:
                assert summary.step_size == raw[0]
            else:
                assert summary.step_size == pytest.approx(sum(raw[1:][-2:]) / len(raw[1:][-2:]))
    assert len(raw) >= 4


# --------------------------------------------------------------------------- failures


def test_concave_line_fails_keeps_the_previous_value_and_the_parameters():
    theta, _, _, loss = quadratic_problem(seed=7)
    optimizer = LabPal([theta], **few_updates())
    run(optimizer, loss, 2)
    previous = optimizer.summary
    run(optimizer, loss, 3)  # three training updates; the next step starts a measurement
    before = theta.detach().clone()

    def concave():
        return -(theta * theta).sum() + theta.sum()

    run(optimizer, concave, 2)
    summary = optimizer.summary
    assert summary.failed_measurements == 1 and "not convex" in summary.last_failure
    assert summary.step_size == previous.step_size and summary.measurements == 1
    assert torch.equal(theta.detach(), before)
    assert summary.phase == "training"


def test_loss_increasing_along_the_line_fails():
    theta, _, _, loss = quadratic_problem(seed=8)
    optimizer = LabPal([theta], **few_updates())
    run(optimizer, loss, 5)
    origin = theta.detach().clone()
    weights = torch.linspace(1.0, 2.0, theta.numel(), dtype=torch.float64)

    def kinked():  # gradient −weights at the origin, but the loss rises steeply along the line
        offset = theta - origin
        return weights @ theta + 100 * torch.sqrt((offset * offset).sum() + 1e-30) + (offset * offset).sum()

    run(optimizer, kinked, 2)
    summary = optimizer.summary
    assert summary.failed_measurements == 1 and "does not decrease" in summary.last_failure
    assert torch.equal(theta.detach(), origin)


def test_nan_loss_during_a_measurement_fails_it_cleanly():
    theta, _, _, loss = quadratic_problem(seed=9)
    optimizer = LabPal([theta], **few_updates())
    run(optimizer, loss, 5)
    before, previous_step = theta.detach().clone(), optimizer.summary.step_size
    calls = []

    def nan_on_second_batch():
        calls.append(1)
        return loss() * (float("nan") if len(calls) > 3 else 1.0)

    run(optimizer, nan_on_second_batch, 2)
    summary = optimizer.summary
    assert summary.failed_measurements == 1 and "non-finite" in summary.last_failure
    assert summary.step_size == previous_step
    assert torch.equal(theta.detach(), before)


@pytest.mark.parametrize("scale, reason", [(1e-5, "outside"), (1e5, "outside"), (float("inf"), "direction norm")])
def test_tiny_huge_or_infinite_direction_norm_fails_the_first_measurement_and_measures_again(scale, reason):
    theta, _, _, loss = quadratic_problem(seed=10)
    before = theta.detach().clone()
    optimizer = LabPal([theta], **few_updates())

    def scaled():
        return loss() * scale

    run(optimizer, scaled, 3)
    summary = optimizer.summary
    assert summary.failed_measurements == 3 and reason in summary.last_failure
    assert summary.measurements == 0 and summary.step_size is None and summary.phase == "measuring"
    assert torch.equal(theta.detach(), before)
    run(optimizer, loss, 2)  # a good line afterwards is measured as usual
    assert optimizer.summary.measurements == 1 and optimizer.summary.phase == "training"


def test_non_finite_loss_during_training_skips_the_update():
    theta, _, _, loss = quadratic_problem(seed=11)
    optimizer = LabPal([theta], **few_updates())
    run(optimizer, loss, 3)
    before = theta.detach().clone()

    def infinite():
        return loss() * float("inf")

    optimizer.step(infinite)
    assert torch.equal(theta.detach(), before)
    assert optimizer.summary.skipped_updates == 1 and optimizer.summary.updates == 3
    assert math.isfinite(optimizer.summary.learning_rate)
    optimizer.step(loss)
    assert torch.isfinite(theta).all() and not torch.equal(theta.detach(), before)
    assert optimizer.summary.skipped_updates == 1


# --------------------------------------------------------------------------- side effects


def test_measurement_leaves_buffers_as_if_only_the_training_passes_ran():
    torch.manual_seed(0)
    model = SmallBatchNormNet()
    reference = copy.deepcopy(model)
    loss_function = nn.CrossEntropyLoss()
    batches = image_batches(10)
    optimizer = LabPal(model.parameters(), buffers=model.buffers())
    origin = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(1)
    for inputs, targets in batches:
        optimizer.step(make_batch_closure(model, loss_function, inputs, targets))
    torch.manual_seed(1)
    first_loss = loss_function(reference(batches[0][0]), batches[0][1])
    direction = torch.autograd.grad(first_loss, list(reference.parameters()))
    with torch.no_grad():
        for inputs, _ in batches[1:]:
            reference(inputs)

    for buffer, expected in zip(model.buffers(), reference.buffers()):
        assert torch.equal(buffer, expected)
    summary = optimizer.summary
    assert summary.measurements == 1
    direction_norm = summary.last_measured_step / summary.last_measured_learning_rate
    for p, p0, d in zip(model.parameters(), origin, direction):
        assert torch.equal(p.detach(), p0.add(d, alpha=-summary.last_measured_step / direction_norm))


def test_batch_closure_replays_its_randomness_and_keeps_its_batch():
    torch.manual_seed(0)
    model = SmallBatchNormNet()
    model.eval()
    model.features[3].train()  # dropout active, BatchNorm fixed: only randomness changes the loss
    inputs, targets = image_batches(1)[0]
    closure = make_batch_closure(model, nn.CrossEntropyLoss(), inputs, targets, device="cpu")
    first = closure()
    state_after_first = torch.get_rng_state()
    assert torch.equal(closure(), first) and torch.equal(closure(), first)
    assert torch.equal(torch.get_rng_state(), state_after_first)
    assert closure.outputs.shape == (8, 3) and not closure.outputs.requires_grad
    fresh = make_batch_closure(model, nn.CrossEntropyLoss(), inputs, targets)
    assert not torch.equal(fresh(), first)  # a new closure draws new dropout masks


# --------------------------------------------------------------------------- state


def decayed_groups(model, weight_decay):
    """Two parameter groups: the features decay by ``weight_decay``, the head does not."""
    return [
        {"params": list(model.features.parameters()), "weight_decay": weight_decay},
        {"params": list(model.head.parameters())},
    ]


@pytest.mark.parametrize(
    "mode, momentum, variant",
    [("NSGD", 0.0, None), ("SGD", 0.9, None), ("NSGD", 0.0, "weight decay"), ("SGD", 0.9, "research code")],
)
# Splits after: a training step; a measurement's line batches (k = 1); the first of the two
# direction batches of a k = 2 measurement; its line batches; the middle of a k = 2 training batch.
@pytest.mark.parametrize("split", [13, 16, 28, 30, 34])
def test_resuming_from_state_dict_continues_bitwise(mode, momentum, variant, split):
    batches = image_batches(48, seed=3)
    arguments = dict(
        mode=mode, momentum=momentum, untrustworthy_updates=4, measurement_interval=6,
        approximation_batches=3, averaging_window=3, batch_size_schedule=((0, 1), (26, 2)),
        research_code_steps=variant == "research code",
    )

    def parameters(model):
        return decayed_groups(model, 5e-3) if variant == "weight decay" else model.parameters()

    torch.manual_seed(0)
    model = SmallBatchNormNet()
    resumed_model = copy.deepcopy(model)
    uninterrupted = LabPal(parameters(model), buffers=model.buffers(), **arguments)
    torch.manual_seed(5)
    train_steps(model, uninterrupted, batches)

    torch.manual_seed(0)
    optimizer = LabPal(parameters(resumed_model), buffers=resumed_model.buffers(), **arguments)
    torch.manual_seed(5)
    train_steps(resumed_model, optimizer, batches[:split])
    saved = io.BytesIO()
    torch.save({"model": resumed_model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=False)
    fresh_model = SmallBatchNormNet()
    fresh_model.load_state_dict(checkpoint["model"])
    fresh = LabPal(parameters(fresh_model), buffers=fresh_model.buffers(), **arguments)
    fresh.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    train_steps(fresh_model, fresh, batches[split:])

    assert fresh.summary == uninterrupted.summary
    for expected, actual in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        assert torch.equal(expected, actual)


def test_state_saved_between_direction_batches_holds_them_only_for_batch_closures():
    theta, _, _, loss = quadratic_problem(seed=16)
    arguments = few_updates(batch_size_schedule=((0, 3),))
    optimizer = LabPal([theta], **arguments)
    run(optimizer, loss, 2)  # two of the three direction batches of the first measurement
    state = optimizer.state_dict()
    assert state["lab_pal"]["pending_batches"] is None  # plain closures cannot be saved
    restarted = LabPal([nn.Parameter(theta.detach().clone())], **arguments)
    restarted.load_state_dict(state)
    assert restarted.state_dict()["lab_pal"]["measurement_batches"] == 0

    model = LinearRegression()
    batches = regression_batches(2, 4)
    optimizer = LabPal(model.parameters(), **arguments)
    for inputs, targets in batches:
        optimizer.step(make_batch_closure(model, nn.MSELoss(), inputs, targets))
    saved = optimizer.state_dict()["lab_pal"]["pending_batches"]
    assert [torch.equal(state["inputs"], inputs) for state, (inputs, _) in zip(saved, batches)] == [True, True]


def test_state_dict_round_trip_keeps_counters_history_and_phase():
    theta, _, _, loss = quadratic_problem(seed=12)
    optimizer = LabPal([theta], **few_updates(averaging_window=4))
    run(optimizer, loss, 17)
    state = optimizer.state_dict()
    other = LabPal([nn.Parameter(theta.detach().clone())], **few_updates(averaging_window=4))
    other.load_state_dict(state)
    assert other.summary == optimizer.summary
    assert other.state_dict()["lab_pal"]["step_size_history"] == state["lab_pal"]["step_size_history"]


# --------------------------------------------------------------------------- momentum, modes, precision


@pytest.mark.parametrize("mode", ["NSGD", "SGD"])
def test_momentum_training_update_follows_the_buffer(mode):
    theta, a, b, loss = quadratic_problem(seed=13)
    momentum = 0.9
    optimizer = LabPal([theta], mode, momentum=momentum, **few_updates(measurement_interval=10))
    run(optimizer, loss, 2)  # measurement: buffer = first gradient
    buffer = optimizer.state[theta]["momentum_buffer"].clone()
    summary = optimizer.summary
    for _ in range(3):
        gradient = a @ theta.detach() - b
        buffer = momentum * buffer + gradient
        if mode == "NSGD":
            expected = theta.detach() - summary.step_size * buffer / buffer.norm()
        else:
            expected = theta.detach() - summary.learning_rate * buffer
        optimizer.step(loss)
        torch.testing.assert_close(theta.detach(), expected, rtol=1e-12, atol=1e-12)


def test_nsgd_effective_learning_rate_tracks_the_direction_norm_and_param_groups_keep_the_measured_one():
    theta, a, b, loss = quadratic_problem(seed=14)
    optimizer = LabPal([theta], **few_updates(measurement_interval=10))
    run(optimizer, loss, 2)
    measured = optimizer.summary.last_measured_learning_rate
    gradient_norm = (a @ theta.detach() - b).norm().item()
    optimizer.step(loss)
    rate = optimizer.effective_learning_rate
    assert isinstance(rate, torch.Tensor) and rate.dim() == 0 and rate.device == theta.device
    assert rate.item() == pytest.approx(optimizer.summary.step_size / gradient_norm)
    assert optimizer.log_values()["learning_rate"] == pytest.approx(rate.item())
    lr = optimizer.param_groups[0]["lr"]
    assert type(lr) is float and lr == measured  # set at the measurement only; json.dumps works
    assert json.loads(json.dumps(optimizer.state_dict()["param_groups"][0]["lr"])) == measured


def test_measurement_under_bfloat16_autocast_matches_full_precision():
    batches = regression_batches(10, 32, seed=4)

    def measured(autocast):
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1), nn.Flatten(0))
        torch.manual_seed(0)
        for p in model.parameters():
            nn.init.normal_(p, std=0.5)
        optimizer = LabPal(model.parameters())
        for inputs, targets in batches:
            closure = make_batch_closure(model, nn.MSELoss(), inputs.float(), targets.float())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                optimizer.step(closure)
        return optimizer.summary.last_measured_step

    assert measured(autocast=True) == pytest.approx(measured(autocast=False), rel=1e-6)


# --------------------------------------------------------------------------- arguments


def test_log_values_count_passes_and_events_report_each_measurement_once():
    theta, _, _, loss = quadratic_problem(seed=15)
    optimizer = LabPal([theta], **few_updates())
    run(optimizer, loss, 4)
    # Steps 0 and 1 measure over two batches: the direction batch with a backward pass, every
    # batch at 0 (the direction batch's training pass counts there), h and μ; steps 2 and 3 train.
    values = optimizer.log_values()
    assert values["forward_passes"] == 1 + 2 + 3 + 2 and values["backward_passes"] == 1 + 2
    assert values["training_batch_size"] == 128 and values["measurements"] == 1
    assert values["learning_rate"] == pytest.approx(optimizer.summary.learning_rate)
    (event,) = optimizer.take_events()
    assert event == {
        "event": "measurement",
        "learning_rate": optimizer.summary.last_measured_learning_rate,
        "step_size": optimizer.summary.last_measured_step,
    }
    assert optimizer.take_events() == []


def test_a_failed_measurement_is_an_event_with_its_reason():
    theta = nn.Parameter(torch.zeros(3))

    def increasing_line():  # gradient 0: no direction to measure along
        return (theta * 0.0).sum() + 1.0

    optimizer = LabPal([theta], **few_updates())
    run(optimizer, increasing_line, 1)
    (event,) = optimizer.take_events()
    assert event["event"] == "failure" and "direction norm 0 outside" in event["reason"]

# --------------------------------------------------------------------------- dtypes


def test_float64_default_dtype_trains_exactly_like_an_explicit_float64_model():
    batches = regression_batches(12, 8, seed=5)

    def trained(default_dtype):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default_dtype)
        try:
            model = nn.Linear(4, 1).double()
            with torch.no_grad():  # the same start under both defaults
                model.weight.copy_(torch.tensor([[0.5, -0.25, 1.0, 0.75]]))
                model.bias.fill_(0.1)
            optimizer = LabPal(model.parameters(), **few_updates(batch_size_schedule=((0, 2),)))
            for inputs, targets in batches:  # a k = 2 measurement, then k = 2 training updates
                optimizer.step(make_batch_closure(model, nn.MSELoss(), inputs, targets.unsqueeze(1)))
        finally:
            torch.set_default_dtype(previous)
        assert optimizer.summary.updates == 4 and optimizer.summary.skipped_updates == 0
        return [p.detach() for p in model.parameters()]

    for float64_default, float32_default in zip(trained(torch.float64), trained(torch.float32)):
        assert float64_default.dtype == torch.float64 and torch.equal(float64_default, float32_default)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_are_refused_with_the_reason(dtype):
    with pytest.raises(ValueError, match=rf"LabPal .*resolution of {dtype}.*autocast"):
        LabPal([nn.Parameter(torch.zeros(2, dtype=dtype))])


# --------------------------------------------------------------------------- torch.optim habits


def decayed_quadratic(decays):
    """The quadratic problem split into parameter groups, one per entry of ``decays``."""
    theta, a, b, _ = quadratic_problem(dimension=6, seed=20)
    sizes = [6 // len(decays)] * len(decays)
    parts = [nn.Parameter(part.clone()) for part in theta.detach().split(sizes)]

    def loss():
        whole = torch.cat(parts)
        return 0.5 * whole @ a @ whole - b @ whole

    groups = [{"params": [part], "weight_decay": decay} for part, decay in zip(parts, decays)]
    per_coordinate = torch.cat([torch.full((size,), decay, dtype=torch.float64) for size, decay in zip(sizes, decays)])
    return parts, groups, loss, a + torch.diag(per_coordinate), b


@pytest.mark.parametrize("mode", ["NSGD", "SGD"])
def test_weight_decay_per_group_measures_the_line_minimum_of_the_decayed_objective(mode):
    decays = (0.5, 0.0)
    parts, groups, loss, decayed_a, b = decayed_quadratic(decays)
    start = torch.cat([p.detach() for p in parts])
    direction = decayed_a @ start - b  # ∇(f + Σ λ/2 ‖θ_group‖²)
    expected = exact_line_minimum(start, decayed_a, b, direction)
    optimizer = LabPal(groups, mode, step_adaptation=1.0, max_step=1e6, **few_updates(measurement_interval=5))
    run(optimizer, loss, 2)
    assert [group["weight_decay"] for group in optimizer.param_groups] == list(decays)
    after = torch.cat([p.detach() for p in parts])
    assert (after - expected).norm() / (expected - start).norm() < 1e-3

    summary = optimizer.summary
    gradient = decayed_a @ after - b  # a training update follows the decayed gradient too
    step = summary.step_size * gradient / gradient.norm() if mode == "NSGD" else summary.learning_rate * gradient
    optimizer.step(loss)
    torch.testing.assert_close(torch.cat([p.detach() for p in parts]), after - step, rtol=1e-12, atol=1e-12)


def test_without_weight_decay_several_groups_train_like_one():
    parts, groups, loss, _, _ = decayed_quadratic((0.0, 0.0, 0.0))
    theta = nn.Parameter(torch.cat([p.detach() for p in parts]))
    _, a, b, _ = quadratic_problem(dimension=6, seed=20)

    def whole_loss():
        return 0.5 * theta @ a @ theta - b @ theta

    grouped = LabPal(groups, **few_updates())
    single = LabPal([theta], **few_updates())
    run(grouped, loss, 9)
    run(single, whole_loss, 9)
    torch.testing.assert_close(torch.cat([p.detach() for p in parts]), theta.detach(), rtol=1e-13, atol=1e-13)
    grouped_summary, single_summary = grouped.summary, single.summary
    assert grouped_summary.learning_rate == pytest.approx(single_summary.learning_rate, rel=1e-13)
    without_rate = dataclasses.replace(grouped_summary, learning_rate=None)
    assert without_rate == dataclasses.replace(single_summary, learning_rate=None)
    assert grouped_summary.measurements == 2


@pytest.mark.parametrize("option, value", [("momentum", 0.9), ("lr", 0.1), ("mode", "SGD"), ("sample_step", 0.02)])
def test_options_other_than_weight_decay_are_global(option, value):
    first, second = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=rf"sets {option}; .*only weight_decay may differ"):
        LabPal([{"params": [first]}, {"params": [second], option: value}])
    optimizer = LabPal([first])
    with pytest.raises(ValueError, match="only weight_decay may differ"):
        optimizer.add_param_group({"params": [second], option: value})
    optimizer.add_param_group({"params": [second], "weight_decay": 1e-4})
    assert len(optimizer.param_groups) == 2


@pytest.mark.parametrize("weight_decay", [-1.0, float("nan"), "0.1"])
def test_invalid_weight_decay_is_refused_per_group(weight_decay):
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        LabPal([{"params": [nn.Parameter(torch.zeros(2))], "weight_decay": weight_decay}])


def lbfgs_style_closure(optimizer, model, inputs, targets):
    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("kind", ["calls backward", "returns a float", "returns a detached loss"])
def test_a_closure_that_calls_backward_or_returns_no_graph_gets_the_fix(kind):
    model = LinearRegression()
    ((inputs, targets),) = regression_batches(1, 8)
    optimizer = LabPal(model.parameters())
    closures = {
        "calls backward": lbfgs_style_closure(optimizer, model, inputs, targets),
        "returns a float": lambda: nn.functional.mse_loss(model(inputs), targets).item(),
        "returns a detached loss": lambda: nn.functional.mse_loss(model(inputs), targets).detach(),
    }
    with pytest.raises(ValueError, match=r"Invalid closure: .*LabPal calls backward itself.*make_batch_closure"):
        optimizer.step(closures[kind])


def test_a_backward_calling_closure_at_a_forward_only_evaluation_gets_the_fix_too():
    model = LinearRegression()
    (inputs, targets), _ = regression_batches(2, 8)
    optimizer = LabPal(model.parameters(), **few_updates())
    optimizer.step(make_batch_closure(model, nn.MSELoss(), inputs, targets))  # the direction batch
    with pytest.raises(ValueError, match="Invalid closure: it called backward"):  # a line batch, under no_grad
        optimizer.step(lbfgs_style_closure(optimizer, model, inputs, targets))


def test_grad_scaler_step_is_refused_when_enabled_and_passes_through_when_disabled():
    model = LinearRegression()
    (inputs, targets), = regression_batches(1, 8)
    closure = make_batch_closure(model, nn.MSELoss(), inputs, targets)
    optimizer = LabPal(model.parameters(), **few_updates())
    torch.amp.GradScaler("cpu", enabled=False).step(optimizer, closure)
    assert optimizer.summary.steps == 1
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(closure())  # as mixed-precision code scales its loss
    with pytest.raises(ValueError, match="GradScaler.*call optimizer.step\\(closure\\) directly"):
        scaler.step(optimizer, closure)
    optimizer.step(closure)  # the refusal leaves nothing behind
    assert optimizer.summary.steps == 2


def test_a_learning_rate_scheduler_is_refused():
    theta, _, _, loss = quadratic_problem(seed=21)
    optimizer = LabPal([theta])
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    with pytest.raises(ValueError, match="learning-rate scheduler .*batch_size_schedule"):
        optimizer.step(loss)


def test_get_closure_is_make_batch_closure_in_the_research_code_argument_order():
    model = LinearRegression()
    (inputs, targets), = regression_batches(1, 8)
    optimizer = LabPal(model.parameters())
    closure = optimizer.get_closure(inputs, targets, model, nn.MSELoss(), "cpu")
    assert closure.model is model and closure.inputs is inputs and closure.targets is targets
    assert closure.device == torch.device("cpu")
    assert torch.equal(closure(), make_batch_closure(model, nn.MSELoss(), inputs, targets)())
    assert LabPal.get_closure(inputs, targets, model, nn.MSELoss()).device is None


@pytest.mark.parametrize(
    "mode, momentum, research_code_steps", [("NSGD", 0.0, False), ("NSGD", 0.9, False), ("SGD", 0.0, False),
                                            ("NSGD", 0.9, True), ("SGD", 0.0, True)]
)
def test_training_updates_never_wait_for_the_host(monkeypatch, mode, momentum, research_code_steps):
    model = LinearRegression()
    batches = regression_batches(12, 8, seed=6)
    groups = [{"params": [model.linear.weight], "weight_decay": 1e-2}, {"params": [model.linear.bias]}]
    optimizer = LabPal(groups, mode, momentum=momentum, research_code_steps=research_code_steps,
                       **few_updates(measurement_interval=20, untrustworthy_updates=50, batch_size_schedule=((0, 2),)))
    for inputs, targets in batches[:4]:  # the measurement
        optimizer.step(make_batch_closure(model, nn.MSELoss(), inputs, targets))

    def no_sync(*_):
        raise AssertionError("a training update read a device value on the host")

    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    for inputs, targets in batches[4:]:
        optimizer.step(make_batch_closure(model, nn.MSELoss(), inputs, targets))
    monkeypatch.undo()
    assert optimizer.summary.updates == 5 and optimizer.summary.skipped_updates == 0


def test_a_state_with_entries_of_another_kind_is_refused_by_name():
    theta, _, _, loss = quadratic_problem(seed=23)
    optimizer = LabPal([theta], **few_updates())
    run(optimizer, loss, 2)
    state = optimizer.state_dict()
    state["lab_pal"]["momentum_of_doom"] = 1
    with pytest.raises(ValueError, match="Invalid LabPal state: unknown entries momentum_of_doom"):
        LabPal([nn.Parameter(theta.detach().clone())], **few_updates()).load_state_dict(state)


def test_a_state_saved_before_weight_decay_and_the_effective_learning_rate_existed_still_loads():
    theta, a, b, loss = quadratic_problem(seed=22)
    optimizer = LabPal([theta], **few_updates())
    run(optimizer, loss, 4)  # a measurement, then training
    old = optimizer.state_dict()  # made to look like one saved by the previous version
    for group in old["param_groups"]:
        del group["weight_decay"], group["research_code_steps"]
    for key in ("learning_rate", "effective_learning_rate", "research_origin_loss", "research_line_losses",
                "last_measurement_step", "schedule_position", "research_step_cap", "line_penalty"):
        del old["lab_pal"][key]
    resumed_theta = nn.Parameter(theta.detach().clone())
    resumed = LabPal([resumed_theta], **few_updates())
    resumed.load_state_dict(old)
    assert resumed.param_groups[0]["weight_decay"] == 0.0

    run(optimizer, loss, 1)
    resumed.step(lambda: 0.5 * resumed_theta @ a @ resumed_theta - b @ resumed_theta)
    assert torch.equal(resumed_theta.detach(), theta.detach())
    assert resumed.summary == optimizer.summary
