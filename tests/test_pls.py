"""PLS, the probabilistic line search: its numerical pieces and the optimizer, pinned against known answers."""

import contextlib
import copy
import importlib.util
import io
import math
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch import nn

import main
from source.optimizer.lab_pal import make_batch_closure
from source.optimizer.line_search import SAMPLE_LOSSES, LineSearch
from source.optimizer.pls import (
    LineGaussianProcess,
    Pls,
    bivariate_normal_rectangle,
    bivariate_normal_upper_orthant,
    evaluate_batch,
)
from source.optimizer.pls.rules import expected_improvement, next_base_learning_rate
from source.plotting import read_metrics
from tests.tiny_run import set_options, workspace  # noqa: F401 (workspace is a fixture)

# --------------------------------------------------------------------------- bivariate normal


@pytest.mark.parametrize("rho", [-0.9999, -0.95, -0.5, 0.0, 0.3, 0.8, 0.93, 0.9999])
@pytest.mark.parametrize(
    "x, y", [(0.0, 0.0), (0.0, 1.3), (-0.7, 0.0), (1.0, 2.0), (-2.0, 0.5), (3.0, -3.0), (-1.0, -1.5)]
)
def test_upper_orthant_matches_scipy(rho, x, y):
    expected = multivariate_normal(mean=[0, 0], cov=[[1, rho], [rho, 1]]).cdf([-x, -y])
    assert bivariate_normal_upper_orthant(x, y, rho) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "rho, bounds",
    [
        (0.6, (-0.5, math.inf, -1.2, 0.4)),
        (-0.7, (0.3, math.inf, -math.inf, 1.0)),
        (0.97, (-1.0, 2.0, -0.5, 0.5)),
        (-0.999, (-math.inf, 0.0, 0.0, math.inf)),
        (1.0, (-0.5, math.inf, 0.2, 1.0)),
    ],
)
def test_rectangle_matches_scipy_and_monte_carlo(rho, bounds):
    x_lower, x_upper, y_lower, y_upper = bounds
    probability = bivariate_normal_rectangle(rho, *bounds)
    if abs(rho) < 1:
        distribution = multivariate_normal(mean=[0, 0], cov=[[1, rho], [rho, 1]])
        clip = lambda value: float(np.clip(value, -40, 40))  # noqa: E731
        cdf = lambda x, y: distribution.cdf([clip(x), clip(y)])  # noqa: E731
        expected = cdf(x_upper, y_upper) - cdf(x_lower, y_upper) - cdf(x_upper, y_lower) + cdf(x_lower, y_lower)
        assert probability == pytest.approx(expected, abs=1e-10)
    generator = np.random.default_rng(0)
    first = generator.standard_normal(400_000)
    second = rho * first + math.sqrt(max(0.0, 1 - rho * rho)) * generator.standard_normal(first.size)
    inside = (first >= x_lower) & (first <= x_upper) & (second >= y_lower) & (second <= y_upper)
    assert probability == pytest.approx(inside.mean(), abs=4e-3)


# --------------------------------------------------------------------------- Gaussian process


def cubic(t):
    return 0.3 * t**3 - 1.1 * t**2 - 1.0 * t + 0.2


def cubic_slope(t):
    return 0.9 * t**2 - 2.2 * t - 1.0


def test_posterior_interpolates_noise_free_observations_of_a_cubic_exactly():
    positions = [0.0, 1.0, 2.5, 4.0]
    process = LineGaussianProcess([(t, cubic(t), cubic_slope(t), 0.0, 0.0) for t in positions])
    for t in [0.0, 0.2, 0.5, 1.0, 1.7, 2.5, 3.3, 3.99, 4.0]:
        assert process.mean(t) == pytest.approx(cubic(t), abs=1e-9)
        assert process.mean(t, 1) == pytest.approx(cubic_slope(t), abs=1e-9)
    for t in [0.5, 1.75, 3.25]:  # inside a cell the spline is the cubic itself, up to its third derivative
        assert process.mean(t, 2) == pytest.approx(1.8 * t - 2.2, abs=1e-8)
        assert process.mean(t, 3) == pytest.approx(1.8, abs=1e-8)
    mean, covariance = process.posterior([(1.0, 0), (2.5, 1), (1.7, 0)])
    assert mean[:2] == pytest.approx([cubic(1.0), cubic_slope(2.5)], abs=1e-9)
    assert abs(covariance[0, 0]) < 1e-8 and abs(covariance[1, 1]) < 1e-8 and covariance[2, 2] > 1e-6


def test_points_with_mean_derivative_are_the_rising_roots_inside_cells():
    process = LineGaussianProcess([(t, cubic(t), cubic_slope(t), 0.0, 0.0) for t in [0.0, 1.0, 2.5, 4.0]])
    target = 0.5
    rising_root = (2.2 + math.sqrt(2.2**2 + 4 * 0.9 * (1.0 + target))) / (2 * 0.9)  # ≈ 3.0, in the cell (2.5, 4)
    assert process.points_with_mean_derivative(target) == pytest.approx([rising_root], abs=1e-9)
    assert process.points_with_mean_derivative(-5.0) == []  # slope never -5: no root


def test_wolfe_probability_matches_sampling_the_posterior():
    observations = [(0.0, 0.0, -1.0, 0.05, 0.2), (1.0, -0.6, -0.3, 0.05, 0.2), (2.0, -0.7, 0.4, 0.05, 0.2)]
    process = LineGaussianProcess(observations)
    c1, df_lo, df_hi = 0.05, -0.1, 1.1
    for t in [0.7, 1.5, 3.0]:
        mean, covariance = process.posterior([(0.0, 0), (0.0, 1), (t, 0), (t, 1)])
        samples = np.random.default_rng(1).multivariate_normal(mean, covariance, size=400_000)
        a = samples[:, 0] - samples[:, 2] + c1 * t * samples[:, 1]
        b = samples[:, 3]
        expected = np.mean((a >= 0) & (b >= df_lo) & (b <= df_hi))
        assert process.wolfe_probability(t, c1, df_lo, df_hi) == pytest.approx(expected, abs=4e-3)


# --------------------------------------------------------------------------- problems


def half_squared_error(outputs, targets):
    return 0.5 * (outputs.squeeze(-1) - targets) ** 2


def quadratic_line(step_factor):
    """A batch of identical samples (no noise) whose loss along -g is a parabola with minimum at α* = 1/‖x‖².

    Returns the model, the closure and α₀ = step_factor α*, so the line minimum is at t* = 1 / step_factor.
    """
    model = nn.Linear(3, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.2, 0.1]], dtype=torch.float64))
    sample = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    inputs, targets = sample.repeat(8, 1), torch.full((8,), 3.0, dtype=torch.float64)
    closure = make_batch_closure(model, half_squared_error, inputs, targets)
    return model, closure, step_factor / float(sample @ sample)


@pytest.mark.parametrize("step_factor, expected_t", [(2.0, 0.75), (0.2, 6.0)])
def test_noise_free_quadratic_line_accepts_a_point_that_satisfies_the_wolfe_conditions(step_factor, expected_t):
    model, closure, alpha0 = quadratic_line(step_factor)
    start = model.weight.detach().clone()
    optimizer = Pls(model.parameters(), alpha0, rules="research")

    def line_loss(alpha):
        with torch.no_grad():
            model.weight.copy_(start - alpha * gradient)
            return closure().mean().item()

    with torch.enable_grad():
        closure().mean().backward()
    gradient = model.weight.grad.detach().clone()
    slope_at_zero = -float((gradient * gradient).sum())  # φ'(0) along -g
    for _ in range(10):
        optimizer.step(closure)
        events = optimizer.take_events()
        if events:
            break
    assert [event["event"] for event in events] == ["measurement"]
    alpha = events[0]["learning_rate"]
    assert alpha == pytest.approx(expected_t * alpha0, rel=1e-9)
    torch.testing.assert_close(model.weight.detach(), start - alpha * gradient)
    # The Wolfe conditions on the true line φ(α) = f(θ - α g), slope measured by central differences.
    h = 1e-7 * alpha
    phi_0, phi_alpha = line_loss(0.0), line_loss(alpha)
    slope_at_alpha = (line_loss(alpha + h) - line_loss(alpha - h)) / (2 * h)
    assert phi_alpha <= phi_0 + 0.005 * alpha * slope_at_zero
    assert -0.1 <= slope_at_alpha / abs(slope_at_zero) <= 1.1


# --------------------------------------------------------------------------- the original rules


def steps_until_the_search_ends(optimizer, closure, limit=20):
    """Step until a search ends (accepted or aborted); return the number of evaluations after the start."""
    def searches():
        values = optimizer.log_values()
        return values["accepted_searches"] + values["aborted_searches"]

    before = searches()
    optimizer.step(closure)  # t = 0
    for evaluations in range(1, limit + 1):
        optimizer.step(closure)
        if searches() > before:
            return evaluations
    raise AssertionError(f"no search ended within {limit} evaluations")


@pytest.mark.parametrize(
    "step_factor, expected_t, evaluations",
    [(2.0, 0.5, 2), (0.15, 2.0, 2), (0.03, 8.0, 4)],  # line minimum t* = 0.5, 6.7 and 33.3
)
def test_original_rules_on_a_noise_free_quadratic_accept_a_wolfe_point_and_grow_alpha0_by_1_3(
        step_factor, expected_t, evaluations):
    """t = 1 first; then the minimum of the posterior mean (exact on a parabola) or an extrapolation
    by doubling (1, 2, 4, 8); the first point with 0 ≤ f'(t) + 0.8 ≤ 1.6 and sufficient decrease is taken."""
    model, closure, alpha0 = quadratic_line(step_factor)
    start = model.weight.detach().clone()
    optimizer = Pls(model.parameters(), alpha0)
    with torch.enable_grad():
        closure().mean().backward()
    gradient = model.weight.grad.detach().clone()
    assert steps_until_the_search_ends(optimizer, closure) == evaluations
    values = optimizer.log_values()
    assert values["accepted_searches"] == 1 and values["aborted_searches"] == 0
    alpha = values["learning_rate"]
    assert alpha == pytest.approx(expected_t * alpha0, rel=1e-9)
    torch.testing.assert_close(model.weight.detach(), start - alpha * gradient)
    slope = -1.0 + expected_t * step_factor  # f'(t) / |f'(0)| on the parabola
    assert -0.8 <= slope <= 0.8
    assert values["base_learning_rate"] == pytest.approx(1.3 * alpha, rel=1e-12)


def linear_line():
    """Identical samples whose loss falls linearly along -g without end: no point is ever acceptable."""
    model = nn.Linear(3, 1, bias=False, dtype=torch.float64)
    inputs = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64).repeat(8, 1)
    closure = make_batch_closure(model, lambda outputs, targets: outputs.squeeze(-1), inputs, torch.zeros(8))
    return model, closure


def test_original_rules_stop_after_seven_evaluations_at_the_point_of_lowest_posterior_mean():
    model, closure = linear_line()
    start = model.weight.detach().clone()
    alpha0 = 1e-3
    optimizer = Pls(model.parameters(), alpha0)
    assert steps_until_the_search_ends(optimizer, closure) == 7
    observations = optimizer._search["observations"]
    positions = [observation[0] for observation in observations]
    assert positions == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]  # extrapolation by doubling
    process = LineGaussianProcess(observations)
    lowest = min(positions[1:], key=process.mean)
    assert lowest == 64.0  # a falling line: the farthest point
    direction = -torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(model.weight.detach(), start + lowest * alpha0 * direction)
    values = optimizer.log_values()
    assert values["aborted_searches"] == 1 and values["accepted_searches"] == 0
    assert values["learning_rate"] == pytest.approx(64 * alpha0)
    assert values["base_learning_rate"] == pytest.approx(1.3 * 64 * alpha0)
    # No evaluation is kept at the new iterate: the next step starts the next line there.
    assert optimizer._search["phase"] == "starting"
    assert steps_until_the_search_ends(optimizer, closure) == 7
    assert optimizer.log_values()["base_learning_rate"] == pytest.approx(1.3**2 * 64**2 * alpha0)


def test_original_rules_move_to_the_lowest_posterior_mean_among_noisy_evaluations():
    """On noisy lines the point taken after the last evaluation is the argmin of the posterior mean."""
    batches = tabular_batches(60, size=16, seed=2)
    model = tanh_network()
    optimizer = Pls(model.parameters(), 1e-4, c_w=0.99, max_steps=3)  # c_W 0.99: searches rarely accept
    checked = 0
    for inputs, targets in batches:
        before = [p.detach().clone() for p in model.parameters()]
        position, alpha0 = optimizer._search["position"], optimizer._search["alpha0"]
        aborted = optimizer.log_values()["aborted_searches"]
        run_steps(optimizer, model, [(inputs, targets)])
        if optimizer.log_values()["aborted_searches"] > aborted and optimizer._search["phase"] == "starting":
            observations = optimizer._search["observations"]
            assert len(observations) == 1 + 4  # t = 0 and max_steps + 1 evaluations
            process = LineGaussianProcess(observations)
            lowest = min((observation[0] for observation in observations[1:]), key=process.mean)
            for parameter, start in zip(model.parameters(), before):
                direction = optimizer.state[parameter]["direction"]
                torch.testing.assert_close(parameter.detach(), start + (lowest - position) * alpha0 * direction)
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize(
    "learning_rate, statistics, expected_alpha0, expected_statistics",
    [
        (2.0, 1.0, 2.6, 1.05),  # within the band: 1.3 α
        (1e-3, 1.0, 0.95005, 0.95005),  # below 0.01 × the statistics: reset to them
        (1e-2, 1.0, 0.013, 0.9505),  # just inside the band
    ],
)
def test_next_base_learning_rate_grows_by_1_3_and_resets_outside_0_01_to_100_times_the_statistics(
        learning_rate, statistics, expected_alpha0, expected_statistics):
    alpha0, new_statistics = next_base_learning_rate(learning_rate, statistics, 1.3, 100.0)
    assert new_statistics == pytest.approx(expected_statistics, rel=1e-12)
    assert alpha0 == pytest.approx(expected_alpha0, rel=1e-12)
    # The statistics include α, so with factor 100 no α lies above the band; factor 3 shows the upper reset.
    assert next_base_learning_rate(10.0, 1.0, 1.3, 3.0) == pytest.approx((1.45, 1.45))


def test_expected_improvement_matches_sampling():
    samples = np.random.default_rng(0).normal(0.3, 0.5, 400_000)
    assert expected_improvement(0.3, 0.5, 0.1) == pytest.approx(np.maximum(0.1 - samples, 0).mean(), rel=1e-2)
    assert expected_improvement(0.3, 0.0, 0.5) == pytest.approx(0.2)


def test_strong_wolfe_probability_matches_sampling_the_posterior():
    observations = [(0.0, 0.0, -1.0, 0.05, 0.2), (1.0, -0.6, -0.5, 0.05, 0.2), (2.5, -0.7, 0.4, 0.05, 0.2)]
    process = LineGaussianProcess(observations)
    for t in (0.7, 1.8, 3.0):
        mean, covariance = process.posterior([(0.0, 0), (0.0, 1), (t, 0), (t, 1)])
        samples = np.random.default_rng(1).multivariate_normal(mean, covariance, 400_000)
        a = samples[:, 0] - samples[:, 2] + 0.05 * t * samples[:, 1]
        b = samples[:, 3] - 0.8 * samples[:, 1]
        high = 1.6 * (abs(mean[1]) + 2 * math.sqrt(covariance[1, 1]))
        expected = np.mean((a >= 0) & (b >= 0) & (b <= high))
        assert process.strong_wolfe_probability(t, 0.05, 0.8) == pytest.approx(expected, abs=4e-3)


@pytest.mark.parametrize(
    "rules, argument, value",
    [("original", "expl_policy", "linear"), ("original", "df_lo", -0.1), ("original", "max_expl", 20),
     ("original", "target_df", 0.5), ("original", "max_dmu0", 0.0), ("research", "c2", 0.8)],
)
def test_an_option_of_the_other_rule_set_is_refused(rules, argument, value):
    with pytest.raises(ValueError, match=f"Invalid {argument}: {value!r} with rules='{rules}'; {argument} belongs to"):
        Pls([nn.Parameter(torch.zeros(2))], rules=rules, **{argument: value})


def test_unknown_rules_and_invalid_c2_are_refused():
    with pytest.raises(ValueError, match="Invalid rules: 'nips'"):
        Pls([nn.Parameter(torch.zeros(2))], rules="nips")
    with pytest.raises(ValueError, match="Invalid c2: 1.0"):
        Pls([nn.Parameter(torch.zeros(2))], c2=1.0)


def test_a_state_saved_without_rules_resumes_with_the_research_rules():
    batches = tabular_batches(8, seed=3)
    model = tanh_network()
    research = Pls(model.parameters(), 0.05, rules="research")
    run_steps(research, model, batches[:3])
    state = research.state_dict()
    for group in state["param_groups"]:
        del group["rules"]
    del state["pls"]["extrapolation"]
    resumed = Pls(model.parameters(), 0.05)
    resumed.load_state_dict(state)
    assert resumed.param_groups[0]["rules"] == "research"
    run_steps(resumed, model, batches[3:])


# --------------------------------------------------------------------------- per-sample statistics


def tanh_network(batch_norm=False, seed=0):
    torch.manual_seed(seed)
    middle = [nn.BatchNorm1d(7)] if batch_norm else []
    return nn.Sequential(nn.Linear(5, 7), *middle, nn.Tanh(), nn.Linear(7, 3)).double()


def tabular_batches(count, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 5, generator=generator, dtype=torch.float64) * 2 + 0.5,
         torch.randint(0, 3, (size,), generator=generator))
        for _ in range(count)
    ]


SAMPLE_CROSS_ENTROPY = nn.CrossEntropyLoss(reduction="none")


def brute_force_statistics(model, inputs, targets):
    """Mean loss, its variance and per-coordinate gradient variance from one backward pass per sample.

    With BatchNorm in training mode, each sample is normalised with the batch's statistics held
    constant: the layer runs in eval mode with running statistics set to the batch mean and variance.
    """
    model = copy.deepcopy(model)
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    if batch_norms:
        features = model[0](inputs).detach()
        batch_norms[0].running_mean.copy_(features.mean(0))
        batch_norms[0].running_var.copy_(features.var(0, unbiased=False))
        batch_norms[0].eval()
    losses, gradients = [], []
    for sample_input, sample_target in zip(inputs, targets):
        model.zero_grad()
        loss = SAMPLE_CROSS_ENTROPY(model(sample_input[None]), sample_target[None]).sum()
        loss.backward()
        losses.append(loss.item())
        gradients.append([p.grad.clone() for p in model.parameters()])
    n = len(losses)
    losses = torch.tensor(losses, dtype=torch.float64)
    loss_variance = ((losses**2).mean() - losses.mean() ** 2) / (n - 1)  # the paper's formula
    gradient_variance = []
    for per_sample in zip(*gradients):
        stacked = torch.stack(per_sample)
        gradient_variance.append(((stacked**2).mean(0) - stacked.mean(0) ** 2) / (n - 1))
    return losses.mean(), loss_variance, gradient_variance


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("sample_chunk_size", [None, 5])
def test_variances_equal_a_brute_force_per_sample_computation(batch_norm, sample_chunk_size):
    model = tanh_network(batch_norm)
    inputs, targets = tabular_batches(1)[0]
    loss, loss_variance, gradient_variance = brute_force_statistics(model, inputs, targets)
    reference = copy.deepcopy(model)
    closure = make_batch_closure(model, SAMPLE_CROSS_ENTROPY, inputs, targets)
    evaluation = evaluate_batch(closure, list(model.parameters()), sample_chunk_size)

    SAMPLE_CROSS_ENTROPY(reference(inputs), targets).mean().backward()  # the ordinary training pass
    for ours, expected in zip(evaluation.gradient, reference.parameters()):
        torch.testing.assert_close(ours, expected.grad, rtol=1e-12, atol=1e-14)
    for buffer, expected in zip(model.buffers(), reference.buffers()):
        assert torch.equal(buffer, expected)  # the per-sample pass leaves the running statistics alone
    assert all(module.training for module in model.modules())
    if not batch_norm:
        assert evaluation.loss.item() == pytest.approx(loss.item(), rel=1e-12)
    assert evaluation.loss_variance.item() == pytest.approx(loss_variance.item(), rel=1e-9)
    for ours, expected in zip(evaluation.gradient_variance, gradient_variance):
        torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-15)


def test_a_batch_norm_layer_without_running_statistics_is_refused():
    model = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3, track_running_stats=False)).double()
    inputs, targets = tabular_batches(1)[0]
    closure = make_batch_closure(model, SAMPLE_CROSS_ENTROPY, inputs, targets)
    with pytest.raises(ValueError, match="keeps no running statistics"):
        evaluate_batch(closure, list(model.parameters()))


# --------------------------------------------------------------------------- training


def test_lowers_the_loss_of_logistic_regression_on_digits():
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    inputs = torch.tensor(features / 16.0, dtype=torch.float32)
    targets = torch.tensor(labels)
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    optimizer = Pls(model.parameters(), 0.01)  # the authors' default α₀; the LABPAL legend's 1e-4 is for deep nets

    def full_loss():
        with torch.no_grad():
            return nn.functional.cross_entropy(model(inputs), targets).item()

    initial = full_loss()
    generator = torch.Generator().manual_seed(1)
    events = []
    for _ in range(200):
        batch = torch.randint(0, len(inputs), (64,), generator=generator)
        optimizer.step(make_batch_closure(model, SAMPLE_CROSS_ENTROPY, inputs[batch], targets[batch]))
        events += optimizer.take_events()
    assert full_loss() < 0.93 * initial
    assert any(event["event"] == "measurement" for event in events)
    assert all(math.isfinite(p.detach().abs().max().item()) for p in model.parameters())


def run_steps(optimizer, model, batches):
    for inputs, targets in batches:
        optimizer.step(make_batch_closure(model, SAMPLE_CROSS_ENTROPY, inputs, targets))


@pytest.mark.parametrize("split", [1, 2, 5, 9])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_resuming_from_state_dict_continues_bitwise(split, momentum):
    batches = tabular_batches(14, seed=3)
    model = tanh_network(batch_norm=True)
    optimizer = Pls(model.parameters(), 0.05, momentum=momentum, buffers=model.buffers())
    run_steps(optimizer, model, batches)

    resumed_model = tanh_network(batch_norm=True)
    first = Pls(resumed_model.parameters(), 0.05, momentum=momentum, buffers=resumed_model.buffers())
    run_steps(first, resumed_model, batches[:split])
    saved = io.BytesIO()
    torch.save({"model": resumed_model.state_dict(), "optimizer": first.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=False)
    resumed_model = tanh_network(batch_norm=True, seed=7)
    resumed_model.load_state_dict(checkpoint["model"])
    second = Pls(resumed_model.parameters(), 0.05, momentum=momentum, buffers=resumed_model.buffers())
    second.load_state_dict(checkpoint["optimizer"])
    run_steps(second, resumed_model, batches[split:])

    for expected, resumed in zip(model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(expected, resumed)
    assert second.log_values() == optimizer.log_values()
    assert second.state_dict()["pls"] == optimizer.state_dict()["pls"]


def test_rejected_trial_points_leave_no_trace_in_the_buffers():
    batches = tabular_batches(12, seed=4)
    model = tanh_network(batch_norm=True)
    optimizer = Pls(model.parameters(), 1e-3, rules="research", buffers=model.buffers())  # the first line explores
    shadow = copy.deepcopy(model)  # sees only the passes whose points became the iterate
    rejected = 0
    for inputs, targets in batches:
        before = optimizer.log_values()["accepted_searches"] + optimizer.log_values()["aborted_searches"]
        starting = optimizer._search["phase"] == "starting"
        run_steps(optimizer, model, [(inputs, targets)])
        after = optimizer.log_values()["accepted_searches"] + optimizer.log_values()["aborted_searches"]
        with torch.no_grad():
            shadow.load_state_dict({**shadow.state_dict(), **{n: p for n, p in model.named_parameters()}})
            if starting or after > before:
                shadow(inputs)
        for buffer, expected in zip(model.buffers(), shadow.buffers()):
            assert torch.equal(buffer, expected)
        rejected += not starting and after == before
    assert rejected >= 2 and optimizer.log_values()["accepted_searches"] >= 1
    assert optimizer.log_values()["forward_passes"] == 2 * len(batches)


# --------------------------------------------------------------------------- failures


def exploding_loss(outputs, targets):
    """Half squared error that turns NaN once an output leaves [-5, 5]."""
    outputs = outputs.squeeze(-1)
    return torch.where(outputs.abs() <= 5, 0.5 * (outputs - targets) ** 2, torch.full_like(outputs, math.nan))


def exploding_problem():
    model = nn.Linear(1, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.fill_(0.0)
    inputs = torch.tensor([[1.0], [1.1], [0.9], [1.0]], dtype=torch.float64)
    targets = torch.full((4,), 4.0, dtype=torch.float64)
    return model, make_batch_closure(model, exploding_loss, inputs, targets)


def test_non_finite_loss_at_a_trial_point_aborts_with_a_small_step_and_never_reaches_the_parameters():
    model, closure = exploding_problem()
    optimizer = Pls(model.parameters(), 3.0)  # d ≈ 4, so t = 1 jumps to w ≈ 12: outputs leave [-5, 5]
    optimizer.step(closure)  # t = 0
    assert optimizer.take_events() == []
    optimizer.step(closure)  # t = 1: NaN
    events = optimizer.take_events()
    assert [event["event"] for event in events] == ["failure"]
    assert "non-finite" in events[0]["reason"]
    assert optimizer._search["next_position"] == 0.01
    optimizer.step(closure)  # the abort step t = 0.01, finite, accepted
    assert optimizer.take_events() == []
    assert optimizer.log_values()["aborted_searches"] == 1
    weight = model.weight.item()
    assert math.isfinite(weight) and 0 < weight < 5
    assert optimizer.log_values()["learning_rate"] == pytest.approx(0.03)


def test_non_finite_loss_at_the_start_keeps_the_parameters_and_starts_again():
    model, closure = exploding_problem()
    with torch.no_grad():
        model.weight.fill_(10.0)
    optimizer = Pls(model.parameters())
    for _ in range(2):
        optimizer.step(closure)
        assert [event["event"] for event in optimizer.take_events()] == ["failure"]
        assert model.weight.item() == 10.0 and optimizer._search["phase"] == "starting"


def test_non_finite_abort_step_returns_to_the_line_start():
    model, closure = exploding_problem()
    optimizer = Pls(model.parameters(), 500.0)  # even 0.01 α₀ leaves [-5, 5]
    optimizer.step(closure)
    optimizer.step(closure)
    optimizer.step(closure)
    reasons = [event["reason"] for event in optimizer.take_events()]
    assert len(reasons) == 2 and "back to the line's start" in reasons[1]
    assert model.weight.item() == pytest.approx(0.0, abs=1e-12)
    assert optimizer._search["phase"] == "starting"


# --------------------------------------------------------------------------- interface


def test_follows_the_line_search_protocol_and_reports_acceptances():
    model = tanh_network()
    optimizer = Pls(model.parameters(), 0.1)
    assert isinstance(optimizer, LineSearch) and Pls.closure_loss == SAMPLE_LOSSES
    batches = tabular_batches(6, seed=5)
    inputs, targets = batches[0]
    loss = optimizer.step(make_batch_closure(model, SAMPLE_CROSS_ENTROPY, inputs, targets))
    assert loss.item() == pytest.approx(SAMPLE_CROSS_ENTROPY(model(inputs), targets).mean().item())
    before_acceptance = optimizer.log_values()  # no step size yet: left out, never NaN
    assert "step_size" not in before_acceptance and all(map(math.isfinite, before_acceptance.values()))
    run_steps(optimizer, model, batches[1:])
    values = optimizer.log_values()
    measurements = [event for event in optimizer.take_events() if event["event"] == "measurement"]
    assert measurements and optimizer.take_events() == []
    assert values["learning_rate"] == measurements[-1]["learning_rate"]
    assert values["step_size"] == measurements[-1]["step_size"]
    assert values["forward_passes"] == values["backward_passes"] == 12
    assert all(type(value) in (int, float) for value in values.values())


def test_bare_closures_and_mean_losses_are_refused():
    model = tanh_network()
    optimizer = Pls(model.parameters())
    inputs, targets = tabular_batches(1)[0]
    with pytest.raises(ValueError, match="BatchClosure"):
        optimizer.step(lambda: SAMPLE_CROSS_ENTROPY(model(inputs), targets))
    with pytest.raises(ValueError, match="reduction='none'"):
        optimizer.step(make_batch_closure(model, nn.CrossEntropyLoss(), inputs, targets))
    stranger = Pls([nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="not parameters of the closure's model"):
        stranger.step(make_batch_closure(model, SAMPLE_CROSS_ENTROPY, inputs, targets))


@pytest.mark.parametrize(
    "argument, value",
    [
        ("initial_learning_rate", 0.0),
        ("c_w", 1.0),
        ("c1", -0.1),
        ("momentum", 1.0),
        ("df_hi", -0.2),
        ("max_steps", 0),
        ("max_expl", 2.5),
        ("max_change_factor", 1.0),
        ("expl_policy", "quadratic"),
        ("fpush", math.nan),
        ("sample_chunk_size", 0),
    ],
)
def test_invalid_arguments_name_the_argument_and_value(argument, value):
    with pytest.raises(ValueError, match=f"Invalid {argument}: {value!r}"):
        Pls([nn.Parameter(torch.zeros(2))], rules="research", **{argument: value})


# --------------------------------------------------------------------------- the research code


REFERENCE_MODULES = {
    "source.optimizers.pls_utils.utils": "pls_utils/utils.py",
    "source.optimizers.pls_utils.gaussian_process": "pls_utils/gaussian_process.py",
    "source.optimizers.pls_utils.prob_ls": "pls_utils/prob_ls.py",
    "source.optimizers.pls_utils.autograd_hacks": "pls_utils/autograd_hacks.py",
    "source.optimizers.pls": "pls.py",
}


def load_reference():
    """The research code's pls module, loaded by file path under the package names its imports expect.

    Those names (``source.optimizers...``) clash with our ``source`` package, so they are registered
    in ``sys.modules`` only while the files load and our modules are put back afterwards.
    """
    folder = os.environ.get("LABPAL_REFERENCE")
    if not folder:
        pytest.skip("LABPAL_REFERENCE is not set: it names the folder of the authors' LABPAL code")
    folder = Path(folder) / "source" / "optimizers"
    packages = ["source", "source.optimizers", "source.optimizers.pls_utils"]
    saved = {name: sys.modules.get(name) for name in [*packages, *REFERENCE_MODULES]}
    try:
        for name in packages:
            package = types.ModuleType(name)
            package.__path__ = []
            sys.modules[name] = package
        for name, relative_path in REFERENCE_MODULES.items():
            spec = importlib.util.spec_from_file_location("labpal_reference_" + name.replace(".", "_"),
                                                          folder / relative_path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its `is "BatchNorm2d"` comparison warns when compiled
                spec.loader.exec_module(module)
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, module)
        return sys.modules["source.optimizers.pls"]
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def paper_scale(closure, batch_size):
    """The closure's per-sample losses with their spread shrunk by sqrt(n) and their mean kept.

    The research code takes Var f as the sample variance of the losses, n times the paper's
    variance of their mean; on these losses its estimate is the paper's (the mean, its gradient
    and the per-sample gradients are unchanged).
    """

    def scaled():
        losses = closure()
        mean = losses.mean()
        return mean + (losses - mean) / math.sqrt(batch_size)

    return scaled


@pytest.mark.parametrize("variance_estimator", ["batch_mean", "research"])
def test_matches_the_research_code_on_identical_batches(monkeypatch, variance_estimator):
    """With the research estimator ours matches the research code as it is; with the paper's, once
    the research code's variances are brought to the paper's scale."""
    reference = load_reference()
    batch_size = 16
    original_get_grads = reference.get_grads

    def get_grads_of_paper_scale(params):
        # Its gradient variance (Σ g_i² - ḡ²) / (n - 1) becomes the paper's (mean g_i² - ḡ²) / (n - 1).
        gradient, moments, norm = original_get_grads(params)
        return gradient, [[moment / batch_size for moment in group] for group in moments], norm

    paper = variance_estimator == "batch_mean"
    if paper:
        monkeypatch.setattr(reference, "get_grads", get_grads_of_paper_scale)
    batches = tabular_batches(40, size=batch_size, seed=6)
    ours_model, reference_model = tanh_network(), tanh_network()
    ours = Pls(ours_model.parameters(), 0.01, rules="research", variance_estimator=variance_estimator)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints every hooked layer
        warnings.simplefilter("ignore")  # torch deprecates the non-full backward hooks it uses
        research = reference.PLS(reference_model, alpha0=0.01, cW=0.2, c1=0.005)

        def reference_closure(batch):
            inputs, targets = batch
            closure = lambda: SAMPLE_CROSS_ENTROPY(reference_model(inputs), targets)  # noqa: E731
            return paper_scale(closure, batch_size) if paper else closure

        # Its first step evaluates batch 0 twice at t = 0, then t = 1; ours takes two steps for that.
        calls = []
        first, second = reference_closure(batches[0]), reference_closure(batches[1])

        def first_step_closure():
            calls.append(None)
            return first() if len(calls) <= 2 else second()

        run_steps(ours, ours_model, batches[:2])
        research.step(first_step_closure)
        compared_lines = accepted = 0
        for batch in batches[2:]:
            ours_line = ours._search["observations"]
            gp = research.prob_ls.gp
            reference_line = list(zip(gp.ts, gp.fs, gp.dfs, gp.fvars, gp.dfvars))
            if len(ours_line) == len(reference_line):  # ours accepts one step earlier than it
                np.testing.assert_allclose(np.array(ours_line), np.array(reference_line, dtype=float),
                                           rtol=1e-9, atol=1e-12)
                compared_lines += 1
            for p, q in zip(ours_model.parameters(), reference_model.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
            run_steps(ours, ours_model, [batch])
            research.step(reference_closure(batch))
            measurements = [event for event in ours.take_events() if event["event"] == "measurement"]
            if measurements:
                # The research code accepts at its next call; it still holds the accepted t and α₀.
                expected = research.prob_ls.rescale_t(research.prob_ls.gp.ts[-1])
                assert measurements[0]["learning_rate"] == pytest.approx(expected, rel=1e-12)
                accepted += 1
    assert accepted >= 10 and compared_lines >= 5
    assert ours.log_values()["base_learning_rate"] > 0.1  # α₀ adapted from 0.01, as in the research code


def test_the_research_code_variances_are_about_n_times_the_papers():
    """Its Var f is the sample variance of the losses (n times the variance of their mean) and its
    Var g is (Σ g_i² - ḡ²) / (n - 1); both enter the line's observations at t = 0 scaled alike."""
    reference = load_reference()
    batch_size = 16
    inputs, targets = tabular_batches(1, size=batch_size, seed=6)[0]
    ours_model, reference_model = tanh_network(), tanh_network()
    ours = Pls(ours_model.parameters(), 0.01, rules="research")
    run_steps(ours, ours_model, [(inputs, targets)])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        research = reference.PLS(reference_model, alpha0=0.01)
        research.step(lambda: SAMPLE_CROSS_ENTROPY(reference_model(inputs), targets))
    _, _, _, loss_variance, slope_variance = ours._search["observations"][0]
    reference_loss_variance, reference_slope_variance = research.prob_ls.gp.fvars[0], research.prob_ls.gp.dfvars[0]
    assert reference_loss_variance / loss_variance == pytest.approx(batch_size, rel=1e-10)
    # Per coordinate its (n S - ḡ²) / (S - ḡ²) times ours, S = mean g_i²: at least n (here 18.4 for n = 16).
    assert batch_size <= reference_slope_variance / slope_variance < 1.5 * batch_size


def test_the_research_estimator_is_the_research_codes_formula():
    """Var f: the sample variance of the single losses; Var g: (Σ_i g_i² - ḡ²) / (n - 1)."""
    model = tanh_network()
    inputs, targets = tabular_batches(1)[0]
    closure = make_batch_closure(model, SAMPLE_CROSS_ENTROPY, inputs, targets)
    evaluation = evaluate_batch(closure, list(model.parameters()), variance_estimator="research")
    n = len(targets)
    losses = SAMPLE_CROSS_ENTROPY(model(inputs), targets).detach()
    assert evaluation.loss_variance.item() == pytest.approx(losses.var(correction=1).item(), rel=1e-12)
    per_sample = [torch.autograd.grad(SAMPLE_CROSS_ENTROPY(model(x[None]), y[None]).sum(), list(model.parameters()))
                  for x, y in zip(inputs, targets)]
    for index, (ours, mean_gradient) in enumerate(zip(evaluation.gradient_variance, evaluation.gradient)):
        squares = sum(gradients[index].square() for gradients in per_sample)
        torch.testing.assert_close(ours, (squares - mean_gradient.square()) / (n - 1), rtol=1e-9, atol=1e-15)


# --------------------------------------------------------------------------- end to end


def test_with_its_defaults_pls_trains_the_digits_cnn_at_the_papers_batch_size(workspace):
    """Batch size 128: the research rules abort every search there and stay at chance (0.10)."""
    overrides = set_options("optimizer.name=pls", "training.batch_size=128", "training.training_steps=60",
                            "training.evaluate_every_steps=20", "logging.tensorboard=false")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main.main(["--config", "tiny.txt", *overrides]) == 0
    records = read_metrics(workspace / "runs" / "tiny" / "metrics.jsonl")
    training = [record for record in records if record["split"] == "training"]
    assert training[-1]["accepted_searches"] > 2 * training[-1]["aborted_searches"]
    test_accuracy = next(record["accuracy"] for record in records if record["split"] == "test")
    assert test_accuracy >= 0.85  # measured 0.905 (600 steps: 0.98)
