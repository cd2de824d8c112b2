"""The contract every registered optimizer keeps, written once and run for each row of ``CASES``.

Adding an optimizer to ``OPTIMIZERS`` adds a row here (a test fails until it has one). Line
searches take each batch through a closure; torch's optimizers take the usual forward, backward
and step. What a line search alone promises (no non-finite value reaches the parameters, events,
the closure and parameter checks) runs over the line searches only.
"""

import copy
import io
import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from source.optimizer import OPTIMIZERS, SAMPLE_LOSSES, LineSearch, make_batch_closure


@dataclass(frozen=True)
class Case:
    """One optimizer's sample arguments for short runs and arguments it must refuse."""

    arguments: dict = field(default_factory=dict)
    bad_arguments: tuple = ()  # (argument, value) pairs


CASES = {
    "lab_pal": Case(
        dict(untrustworthy_updates=0, measurement_interval=3, approximation_batches=2, batch_size_schedule=((0, 2),),
             training_set_size=64, inference_batch_size=16),
        (
            ("mode", "ADAM"),
            ("step_adaptation", 0.0),
            ("max_step", -1.0),
            ("min_step", 0.0),
            ("momentum", 1.0),
            ("measurement_interval", 0),
            ("approximation_batches", 2.5),
            ("untrustworthy_updates", -1),
            ("averaging_window", 0),
            ("sample_step", 0.0),
            ("derivative_step", 0.1),
            ("min_direction_norm", -1.0),
            ("max_direction_norm", 0.0),
            ("batch_size_schedule", ((5, 1),)),
            ("batch_size_schedule", ((0, 0),)),
            ("training_set_size", 0),
            ("inference_batch_size", 0),
        ),
    ),
    "pal": Case(
        dict(conjugate_gradient_factor=0.4),
        (
            ("measuring_step", 0.0),
            ("measuring_step", math.inf),
            ("max_step", -1.0),
            ("conjugate_gradient_factor", -0.1),
            ("conjugate_gradient_factor", 1.0),
            ("update_step_adaptation", 0.0),
            ("exact_directional_derivative", 1),
        ),
    ),
    "pls": Case(
        dict(initial_learning_rate=0.1, momentum=0.5),
        (("initial_learning_rate", 0.0), ("c_w", 1.0), ("momentum", 1.0), ("rules", "nips"), ("c2", 1.0)),
    ),
    "sls": Case(
        dict(init_step_size=2.0, training_set_size=64, inference_batch_size=16),
        (
            ("init_step_size", 0.0),
            ("init_step_size", math.inf),
            ("c", 1.0),
            ("c", 0.0),
            ("beta_b", 1.0),
            ("gamma", 0.5),
            ("reset_option", 3),
            ("reset_option", 1.0),
            ("max_backtracking_steps", 0),
            ("training_set_size", 0),
            ("inference_batch_size", 2.5),
        ),
    ),
    "gols_i": Case(
        dict(initial_step_size=1e-3, momentum=0.5),
        (
            ("initial_step_size", 0.0),
            ("initial_step_size", math.inf),
            ("c", 1.0),
            ("c", 0.0),
            ("eta", 1.0),
            ("eta", True),
            ("momentum", 1.0),
            ("momentum", -0.1),
            ("min_step_size", 0.0),
            ("max_step_size", 1e-9),
        ),
    ),
    "sgd": Case(dict(lr=0.1, momentum=0.9), (("lr", -1.0), ("momentum", -0.5))),
    "adam": Case(dict(lr=0.01), (("lr", -1.0), ("eps", -1.0))),
    "adamw": Case(dict(lr=0.01), (("lr", -1.0), ("weight_decay", -1.0))),
    "rmsprop": Case(dict(lr=0.01), (("lr", -1.0), ("alpha", -1.0))),
    "adagrad": Case(dict(lr=0.1), (("lr", -1.0), ("lr_decay", -1.0))),
}

LINE_SEARCHES = [name for name, optimizer_class in OPTIMIZERS.items() if hasattr(optimizer_class, "closure_loss")]
BAD_ARGUMENTS = [(name, argument, value) for name in OPTIMIZERS for argument, value in CASES[name].bad_arguments]


def build(name, model, **arguments):
    """Optimizer ``name`` over ``model`` with the case's arguments (or ``arguments``) and the model's buffers."""
    optimizer_class = OPTIMIZERS[name]
    if name in LINE_SEARCHES:
        return optimizer_class(model.parameters(), **arguments, buffers=model.buffers())
    return optimizer_class(model.parameters(), **arguments)


def network(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 3))


def batches(count, size=16, seed=0):
    """Three separable classes around random centres in six dimensions."""
    generator = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(3, 6, generator=generator)
    made = []
    for _ in range(count):
        targets = torch.randint(3, (size,), generator=generator)
        made.append((centres[targets] + torch.randn(size, 6, generator=generator), targets))
    return made


def take_step(optimizer, model, inputs, targets, scale=1.0):
    """One training step on a batch: a closure for line searches, forward-backward-step otherwise.

    ``scale`` multiplies the loss (NaN or infinity make a poisoned batch).
    """
    per_sample = getattr(optimizer, "closure_loss", None) == SAMPLE_LOSSES
    cross_entropy = nn.CrossEntropyLoss(reduction="none" if per_sample else "mean")

    def loss_function(outputs, targets):
        return cross_entropy(outputs, targets) * scale

    if isinstance(optimizer, LineSearch):
        return optimizer.step(make_batch_closure(model, loss_function, inputs, targets))
    optimizer.zero_grad()
    loss = loss_function(model(inputs), targets)
    loss.backward()
    optimizer.step()
    return loss.detach()


def mean_loss(model, data):
    evaluated = copy.deepcopy(model).eval()
    with torch.no_grad():
        return sum(nn.functional.cross_entropy(evaluated(inputs), targets).item() for inputs, targets in data) / len(data)


def test_every_registered_optimizer_has_a_case():
    assert set(CASES) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_lowers_a_simple_loss(name):
    model = network()
    optimizer = build(name, model, **CASES[name].arguments)
    data = batches(8)
    before = mean_loss(model, data)
    torch.manual_seed(1)
    for _ in range(4):
        for inputs, targets in data:
            take_step(optimizer, model, inputs, targets)
    assert mean_loss(model, data) < 0.7 * before


@pytest.mark.parametrize("split", [3, 6])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_round_trip_resumes_bitwise_with_the_batch_norm_buffers(name, split):
    """The settings come back from the state: the resumed optimizer is built without them."""
    data = batches(12, seed=2)

    def train(model, optimizer, part, seed):
        torch.manual_seed(seed)
        for inputs, targets in part:
            take_step(optimizer, model, inputs, targets)

    model = network()
    optimizer = build(name, model, **CASES[name].arguments)
    train(model, optimizer, data[:split], seed=3)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    train(model, optimizer, data[split:], seed=4)

    saved.seek(0)
    checkpoint = torch.load(saved)
    resumed_model = network(seed=99)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = build(name, resumed_model)
    resumed.load_state_dict(checkpoint["optimizer"])
    train(resumed_model, resumed, data[split:], seed=4)

    expected = model.state_dict()
    assert any(name.endswith("running_var") for name in expected)
    for key, value in resumed_model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    for group, resumed_group in zip(optimizer.param_groups, resumed.param_groups):
        assert {key: value for key, value in group.items() if key != "params"} == {
            key: value for key, value in resumed_group.items() if key != "params"
        }
    if name in LINE_SEARCHES:
        assert resumed.log_values() == optimizer.log_values()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_step_leaves_the_buffers_of_at_most_one_forward_pass_at_the_iterate(name):
    """Evaluations away from the iterate leave no trace: after a step the BatchNorm statistics are
    unchanged or those of one forward pass of the batch at the parameters before or after the step."""
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = build(name, model, **CASES[name].arguments)
    changed = 0
    for inputs, targets in batches(10, seed=5):
        before = copy.deepcopy(model)
        take_step(optimizer, model, inputs, targets)
        after = copy.deepcopy(model)
        after.load_state_dict(before.state_dict(), strict=False)
        after.load_state_dict({n: p for n, p in model.named_parameters()}, strict=False)
        candidates = [list(before.buffers())]
        for twin in (copy.deepcopy(before), after):
            with torch.no_grad():
                twin(inputs)
            candidates.append(list(twin.buffers()))
        buffers = list(model.buffers())
        assert any(all(torch.equal(a, b) for a, b in zip(buffers, candidate)) for candidate in candidates)
        changed += not all(torch.equal(a, b) for a, b in zip(buffers, candidates[0]))
    assert changed >= 1


@pytest.mark.parametrize("name, argument, value", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_naming_the_argument_and_the_value(name, argument, value):
    with pytest.raises(ValueError) as error:
        OPTIMIZERS[name]([nn.Parameter(torch.zeros(2))], **{argument: value})
    message = str(error.value)
    if name in LINE_SEARCHES:
        assert f"Invalid {argument}: {value!r}" in message
    else:
        assert "Invalid" in message and repr(value) in message


@pytest.mark.parametrize("name", LINE_SEARCHES)
def test_a_line_search_refuses_a_missing_closure_and_parameters_it_cannot_move_as_one_vector(name):
    """Each says what its parameters must share (``_parameters_share``); SLS moves them one by one."""
    optimizer_class = OPTIMIZERS[name]
    assert isinstance(optimizer_class([nn.Parameter(torch.zeros(2))]), LineSearch)
    with pytest.raises(ValueError, match="Invalid closure: None"):
        optimizer_class([nn.Parameter(torch.zeros(2))]).step(None)
    mixed = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    if "dtype" in optimizer_class._parameters_share:
        with pytest.raises(ValueError, match="one device and dtype"):
            optimizer_class(mixed)
    else:
        optimizer_class(mixed)


@pytest.mark.parametrize("name", sorted(set(LINE_SEARCHES) - {"lab_pal"}))
def test_a_baseline_line_search_refuses_a_second_parameter_group(name):
    """LABPAL alone takes several groups (to decay them differently); the baselines search one line in one group."""
    with pytest.raises(ValueError, match="exactly one parameter group"):
        OPTIMIZERS[name]([{"params": [nn.Parameter(torch.zeros(2))]}, {"params": [nn.Parameter(torch.zeros(2))]}])


@pytest.mark.parametrize("poison", [math.nan, math.inf])
@pytest.mark.parametrize("name", LINE_SEARCHES)
def test_no_non_finite_value_reaches_the_parameters(name, poison):
    model = network()
    start = copy.deepcopy(model)
    optimizer = build(name, model, **CASES[name].arguments)
    torch.manual_seed(1)
    for index, (inputs, targets) in enumerate(batches(16, seed=6)):
        take_step(optimizer, model, inputs, targets, scale=poison if index % 3 == 1 else 1.0)
        assert all(torch.isfinite(p).all() for p in model.parameters()), index
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters()))


@pytest.mark.parametrize("name", LINE_SEARCHES)
def test_events_and_log_values_are_plain_numbers_and_dicts(name):
    model = network()
    optimizer = build(name, model, **CASES[name].arguments)
    events = []
    torch.manual_seed(1)
    for index, (inputs, targets) in enumerate(batches(12, seed=7)):
        loss = take_step(optimizer, model, inputs, targets, scale=math.nan if index == 5 else 1.0)
        assert loss.dim() == 0 and not loss.requires_grad
        events += optimizer.take_events()
    assert optimizer.take_events() == []
    values = optimizer.log_values()
    assert {"learning_rate", "forward_passes", "backward_passes"} <= set(values)
    assert all(type(value) in (int, float) and math.isfinite(value) for value in values.values())
    assert values["forward_passes"] >= values["backward_passes"] >= 1
    for event in events:
        assert isinstance(event["event"], str)
        assert all(type(value) in (int, float, str, bool, type(None)) for value in event.values()), event
        if event["event"] == "measurement":
            assert type(event["learning_rate"]) is float and math.isfinite(event["learning_rate"])
        if event["event"] == "failure":
            assert isinstance(event["reason"], str) and event["reason"]
