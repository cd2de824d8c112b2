"""GOLS-I pinned on quadratics with exact gradients, on logistic regression, and against the research code."""

import copy
import importlib.util
import io
import math
import os
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from source.optimizer.gols_i import GolsI
from source.optimizer.lab_pal import make_batch_closure
from source.optimizer.line_search import MEAN_LOSS, LineSearch

ETA = 2.0
C = 0.9


def _quadratic(hessian: torch.Tensor, x: torch.Tensor):
    """The closure of 0.5 xᵀ A x: the same exact loss for every 'batch'."""
    return lambda: 0.5 * x @ (hessian @ x)


def _loss_value(hessian: torch.Tensor, x: torch.Tensor) -> float:
    x = x.detach()
    return float(0.5 * x @ (hessian @ x))


def _random_quadratic(dimension: int = 10, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dimension, dimension, generator=generator, dtype=torch.float64))
    eigenvalues = torch.linspace(1.0, 30.0, dimension, dtype=torch.float64)
    return basis @ torch.diag(eigenvalues) @ basis.T


def _line_snapshot(optimizer: GolsI, x: torch.Tensor):
    state = optimizer.state[x]
    if "line_origin" not in state:
        return None
    return state["line_origin"].clone(), state["direction"].clone(), optimizer._progress["initial_derivative"]


def _accepted_lines(optimizer: GolsI, closure, x: torch.Tensor, steps: int):
    """(origin, direction, F'(0), accepted α) of every line accepted within ``steps`` calls, and the failures."""
    lines, failures = [], []
    for _ in range(steps):
        line = _line_snapshot(optimizer, x)
        optimizer.step(closure)
        for event in optimizer.take_events():
            if event["event"] == "measurement":
                lines.append((*line, event["learning_rate"]))
            else:
                failures.append(event["reason"])
    return lines, failures


# --------------------------------------------------------------------------- the line search on exact gradients


def test_is_a_line_search_that_takes_mean_losses():
    optimizer = GolsI([nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, LineSearch)
    assert GolsI.closure_loss == MEAN_LOSS


def test_accepted_step_brackets_the_sign_change_within_a_factor_eta_of_the_line_minimum():
    hessian = _random_quadratic()
    rules = {"tolerance": 0, "grown past the sign change": 0, "shrunk before the sign change": 0}
    for initial_step_size in (1e-4, 1e3):
        x = nn.Parameter(torch.linspace(-0.05, 0.05, 10, dtype=torch.float64))
        initial_loss = _loss_value(hessian, x)
        optimizer = GolsI([x], initial_step_size)
        lines, failures = _accepted_lines(optimizer, _quadratic(hessian, x), x, steps=80)
        assert failures == []
        assert len(lines) >= 20
        for origin, direction, initial_derivative, step_size in lines:
            norm = torch.linalg.vector_norm(direction)

            def derivative(alpha):
                return float((hessian @ (origin + alpha * direction)) @ direction / norm)

            assert initial_derivative == pytest.approx(derivative(0.0), rel=1e-12) and initial_derivative < 0
            line_minimum = float(-(hessian @ origin) @ direction / (direction @ hessian @ direction))
            assert line_minimum / ETA <= step_size <= ETA * line_minimum
            if 0 < derivative(step_size) < C * abs(initial_derivative):
                rules["tolerance"] += 1
            elif derivative(step_size) >= 0:
                assert derivative(step_size / ETA) < 0
                rules["grown past the sign change"] += 1
            else:
                assert derivative(step_size * ETA) > 0
                rules["shrunk before the sign change"] += 1
        assert _loss_value(hessian, x) < 1e-3 * initial_loss
    assert all(count > 0 for count in rules.values()), rules


def test_first_line_grows_from_the_initial_step_and_moves_to_every_trial_point():
    hessian = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    start = torch.tensor([0.1, 0.1], dtype=torch.float64)
    x = nn.Parameter(start.clone())
    optimizer = GolsI([x])
    closure = _quadratic(hessian, x)
    gradient = hessian @ start
    visited = []
    for _ in range(14):
        visited.append(x.detach().clone())
        optimizer.step(closure)
    # step 0 evaluates x_0; steps 1..13 evaluate x_0 - α g with α = 1e-4 · 2^k, k = 0..12.
    assert torch.equal(visited[0], start)
    for k in range(13):
        assert torch.allclose(visited[k + 1], start - 1e-4 * 2**k * gradient, rtol=0, atol=1e-15)
    # The exact line minimum is at 17/65 ≈ 0.2615: F'(0.2048) < 0 <= F'(0.4096), so 0.4096 is accepted
    # and its gradient starts the next line (one evaluation per step, none extra).
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.4096, rel=1e-12)
    values = optimizer.log_values()
    assert values["forward_passes"] == values["backward_passes"] == 14
    assert values["lines"] == 1 and values["step_size"] == pytest.approx(0.4096 * float(gradient.norm()))
    assert torch.equal(optimizer.state[x]["line_origin"], visited[13])


def test_each_step_calls_the_closure_once_with_one_backward_pass():
    hessian = _random_quadratic(seed=1)
    x = nn.Parameter(torch.full((10,), 0.1, dtype=torch.float64))
    optimizer = GolsI([x])
    calls = []

    def closure():
        calls.append(1)
        return 0.5 * x @ (hessian @ x)

    for _ in range(25):
        optimizer.step(closure)
    values = optimizer.log_values()
    assert len(calls) == values["forward_passes"] == values["backward_passes"] == 25


def test_momentum_direction_that_is_not_a_descent_direction_is_replaced_by_the_negative_gradient():
    x = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = GolsI([x], 1.0, momentum=0.9)

    def closure():
        return 0.5 * 3.0 * x @ x

    non_descent_candidates = 0
    for _ in range(30):
        before = _line_snapshot(optimizer, x)
        optimizer.step(closure)
        after = _line_snapshot(optimizer, x)
        if before is not None and not torch.equal(before[1], after[1]):
            gradient = 3.0 * after[0]
            if float((0.9 * before[1] - gradient) @ gradient) > 0:
                non_descent_candidates += 1
                assert torch.equal(after[1], -gradient)
            else:
                assert torch.allclose(after[1], 0.9 * before[1] - gradient, rtol=1e-15, atol=0)
            assert after[2] < 0
    assert non_descent_candidates > 0
    assert abs(float(x.detach())) < 1e-6


# --------------------------------------------------------------------------- bounds and failures


def test_growth_stops_at_the_maximal_step_of_length_one_and_reports_a_failure():
    weights = torch.tensor([3.0, -4.0], dtype=torch.float64)  # a linear loss: F' < 0 everywhere
    x = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = GolsI([x])
    for _ in range(40):
        optimizer.step(lambda: weights @ x)
        origin = optimizer.state[x]["line_origin"]
        assert float(torch.linalg.vector_norm(x.detach() - origin)) <= 1.0 + 1e-12
        assert optimizer._progress["step_size"] <= 1 / 5.0
        events = optimizer.take_events()
        if any(event["event"] == "measurement" for event in events):
            break
    measurement, failure = events
    # 1e-4 · 2^10 = 0.1024 <= α_max = 1/‖w‖ = 0.2 < 0.2048.
    assert measurement["learning_rate"] == pytest.approx(0.1024) and measurement["step_size"] == pytest.approx(0.512)
    assert failure["event"] == "failure" and "maximum" in failure["reason"]


def test_user_maximal_step_size_bounds_every_trial():
    weights = torch.tensor([1e-3, 0.0], dtype=torch.float64)
    x = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = GolsI([x], 1e-4, max_step_size=1e-2)
    for _ in range(12):
        optimizer.step(lambda: weights @ x)
        assert optimizer._progress["step_size"] <= 1e-2
    assert optimizer.log_values()["failures"] >= 1


def test_shrinking_stops_at_the_minimal_step_and_reports_a_failure():
    # ‖x‖ from 1e-9 away from its kink: every step size >= 1e-8 overshoots, F' = +1 > c |F'(0)|.
    x = nn.Parameter(torch.tensor([1e-9, 0.0], dtype=torch.float64))
    optimizer = GolsI([x])
    events = []
    for _ in range(15):
        optimizer.step(lambda: torch.linalg.vector_norm(x))
        events += optimizer.take_events()
        assert optimizer._progress["step_size"] >= 1e-8
    measurement, failure = events
    assert measurement["learning_rate"] == pytest.approx(1e-4 / 2**13)  # 1.22e-8; one more halving is < 1e-8
    assert failure["event"] == "failure" and "minimum" in failure["reason"]


def test_non_finite_loss_at_a_trial_returns_to_the_line_origin():
    hessian = _random_quadratic(seed=2)
    x = nn.Parameter(torch.full((10,), 0.1, dtype=torch.float64))
    optimizer = GolsI([x])
    calls = []

    def closure():
        calls.append(1)
        loss = 0.5 * x @ (hessian @ x)
        return loss * math.nan if len(calls) in (1, 4) else loss

    start = x.detach().clone()
    optimizer.step(closure)  # NaN at x_0 itself: stay there
    assert torch.equal(x.detach(), start)
    assert [event["event"] for event in optimizer.take_events()] == ["failure"]
    optimizer.step(closure)
    optimizer.step(closure)
    step_size = optimizer._progress["step_size"]
    optimizer.step(closure)  # NaN at a trial point: back to x_0, α halved
    assert torch.equal(x.detach(), start)
    assert optimizer._progress["step_size"] == step_size / 2
    assert [event["event"] for event in optimizer.take_events()] == ["failure"]
    for _ in range(60):
        optimizer.step(closure)
        assert torch.isfinite(x).all()
    assert _loss_value(hessian, x) < 1e-2 * _loss_value(hessian, start)


# --------------------------------------------------------------------------- networks, buffers, state


def _digits():
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return inputs, torch.tensor(digits.target)


def test_lowers_the_loss_of_logistic_regression_on_digits_without_tuning():
    torch.manual_seed(0)
    inputs, targets = _digits()
    model = nn.Linear(64, 10)
    loss_function = nn.CrossEntropyLoss()
    optimizer = GolsI(model.parameters())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        initial_loss = float(loss_function(model(inputs), targets))
    for _ in range(300):
        batch = torch.randint(len(inputs), (32,), generator=generator)
        optimizer.step(make_batch_closure(model, loss_function, inputs[batch], targets[batch]))
    with torch.no_grad():
        final_loss = float(loss_function(model(inputs), targets))
    assert initial_loss > 2.0
    assert final_loss < 0.5
    assert optimizer.log_values()["lines"] > 50


def _batch_norm_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def _batches(count: int):
    generator = torch.Generator().manual_seed(4)
    return [(torch.randn(16, 8, generator=generator), torch.randint(3, (16,), generator=generator))
            for _ in range(count)]


def test_buffers_change_only_when_the_evaluated_point_becomes_the_iterate():
    model = _batch_norm_model()
    optimizer = GolsI(model.parameters(), 1e-3, buffers=model.buffers())
    kept = rejected = 0
    for inputs, targets in _batches(40):
        before = [buffer.clone() for buffer in model.buffers()]
        at_origin = optimizer._progress["position"] == "origin"
        optimizer.step(make_batch_closure(model, nn.functional.cross_entropy, inputs, targets))
        accepted = any(event["event"] == "measurement" for event in optimizer.take_events())
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
        if at_origin or accepted:
            assert not unchanged
            kept += 1
        else:
            assert unchanged
            rejected += 1
    assert kept > 1 and rejected > 1


def test_state_dict_round_trip_continues_bitwise():
    batches = _batches(24)

    def run(model, optimizer, part):
        for inputs, targets in part:
            torch.manual_seed(len(inputs) + int(targets[0]))
            optimizer.step(make_batch_closure(model, nn.functional.cross_entropy, inputs, targets))

    model = _batch_norm_model()
    optimizer = GolsI(model.parameters(), 1e-3, momentum=0.5, buffers=model.buffers())
    run(model, optimizer, batches[:9])
    assert optimizer._progress["position"] != "origin"  # saved in the middle of a line
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    run(model, optimizer, batches[9:])

    saved.seek(0)
    checkpoint = torch.load(saved)
    resumed_model = _batch_norm_model()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = GolsI(resumed_model.parameters(), buffers=resumed_model.buffers())
    resumed.load_state_dict(checkpoint["optimizer"])
    run(resumed_model, resumed, batches[9:])
    for original, copied in zip(model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(original, copied)
    assert resumed.log_values() == optimizer.log_values()
    assert resumed.log_values()["lines"] >= 3


# --------------------------------------------------------------------------- the research code (LABPAL_REFERENCE)


def _reference_golsi():
    """The authors' GOLSI class, loaded by file path (it imports only ``copy`` and ``torch``)."""
    root = os.environ.get("LABPAL_REFERENCE")
    if not root:
        pytest.skip("differential test: set LABPAL_REFERENCE to the authors' LABPAL code")
    spec = importlib.util.spec_from_file_location("labpal_reference_golsi",
                                                  Path(root) / "source" / "optimizers" / "golsi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GOLSI


@pytest.mark.parametrize("initial_step_size", [1e-4, 10.0])
def test_first_direction_clipping_and_trial_point_agree_with_the_research_code(initial_step_size):
    reference_class = _reference_golsi()
    inputs, targets = _digits()
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    reference_model = copy.deepcopy(model)
    ours = GolsI(model.parameters(), initial_step_size)
    reference = reference_class(reference_model.parameters(), initial_step_size=initial_step_size, momentum=0.0)
    batches = [(inputs[i:i + 32], targets[i:i + 32]) for i in (0, 32)]

    def closure(network, batch):
        return lambda: nn.functional.cross_entropy(network(batch[0]), batch[1])

    ours.step(closure(model, batches[0]))
    reference.step(closure(reference_model, batches[0]))
    directions = [ours.state[p]["direction"].clone() for p in model.parameters()]
    for p, q in zip(model.parameters(), reference_model.parameters()):
        assert torch.allclose(ours.state[p]["direction"], reference.state[q]["search_direction"], rtol=0, atol=1e-7)
    progress = ours._progress
    norm = float(reference.direction_norm)
    assert progress["direction_norm"] == pytest.approx(norm, rel=1e-6)
    assert progress["max_step_size"] == pytest.approx(float(reference.maximal_step_size), rel=1e-6)
    assert progress["step_size"] == pytest.approx(float(reference.current_step_size), rel=1e-6)
    if initial_step_size > 1 / norm:
        assert progress["step_size"] == progress["max_step_size"] == pytest.approx(1 / norm, rel=1e-6)
    else:
        assert progress["step_size"] == initial_step_size

    # Ours stands at the first trial point already; the reference moves there in its next call.
    reference.step(closure(reference_model, batches[1]))
    for p, q in zip(model.parameters(), reference_model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)
    ours.step(closure(model, batches[1]))
    for p, q in zip(model.parameters(), reference_model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-6)

    # The reference's "directional derivative" is -g·d/‖d‖: the opposite sign of F'(α).
    derivative = sum(float((p.grad * d).sum()) for p, d in zip(model.parameters(), directions)) / norm
    assert float(reference._get_dierctional_derivative()) == pytest.approx(-derivative, rel=1e-5)


def test_research_code_measures_signs_at_a_stale_point_and_with_the_opposite_sign():
    """The documented differences, on 0.5 (x₁² + 4 x₂²) from (0.1, 0.1), exact gradients.

    Ours visits x_0 − α g for α = 1e-4 · 2^k and accepts α = 0.4096 (line minimum 0.2615). The
    research code (a) with its own sign halves α while the loss still descends, down to
    1e-4 / 2^13, and (b) with the sign corrected doubles α to 1.6384, far past the minimum,
    because without moving the parameters the sign never changes; in both cases every
    evaluation after the first trial is at x_0 − 1e-4 g, which becomes its next iterate.
    """
    reference_class = _reference_golsi()
    hessian = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    start = torch.tensor([0.1, 0.1], dtype=torch.float64)
    first_trial = start - 1e-4 * (hessian @ start)

    def run_reference(correct_sign: bool, steps: int):
        x = nn.Parameter(start.clone())
        reference = reference_class([x], momentum=0.0)
        if correct_sign:
            derivative = reference._get_dierctional_derivative
            reference._get_dierctional_derivative = lambda: -derivative()
        visited = []
        for _ in range(steps):
            reference.step(_quadratic(hessian, x))
            visited.append(x.detach().clone())
        return reference, visited

    reference, visited = run_reference(correct_sign=False, steps=16)
    assert all(torch.equal(point, first_trial) for point in visited[1:])
    assert reference.flag == 0 and reference.current_step_size == pytest.approx(1e-4 / 2**13)

    reference, visited = run_reference(correct_sign=True, steps=16)
    assert all(torch.equal(point, first_trial) for point in visited[1:])
    assert reference.flag == 0 and reference.current_step_size == pytest.approx(1.6384)

    x = nn.Parameter(start.clone())
    ours = GolsI([x])
    for _ in range(14):
        ours.step(_quadratic(hessian, x))
    assert ours.param_groups[0]["lr"] == pytest.approx(0.4096)
    assert torch.allclose(ours.state[x]["line_origin"], start - 0.4096 * (hessian @ start), rtol=0, atol=1e-15)

    # Over 200 batches the research code, as published, leaves the loss where it was.
    reference, _ = run_reference(correct_sign=False, steps=200)
    initial_loss = float(0.5 * start @ (hessian @ start))
    x_reference = reference.param_groups[0]["params"][0].detach()
    reference_loss = float(0.5 * x_reference @ (hessian @ x_reference))
    for _ in range(186):
        ours.step(_quadratic(hessian, x))
    assert reference_loss > 0.99 * initial_loss
    assert _loss_value(hessian, x) < 1e-10 * initial_loss
