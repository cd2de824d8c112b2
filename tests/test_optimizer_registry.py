"""Optimizers by name: arguments checked against the class, LABPAL wired to the model and data."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from source.errors import UserError
from source.optimizer import OPTIMIZERS, LabPal, accepted_arguments, build_optimizer, make_batch_closure
from source.registries import load_configuration
from source.training import build_experiment

REPOSITORY = Path(__file__).resolve().parents[1]


def small_model():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_lab_pal_gets_the_sizes_and_the_model_buffers():
    model = small_model()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(
        "lab_pal", model, {"mode": "SGD"}, training_set_size=1_281_167, inference_batch_size=128
    )
    assert isinstance(optimizer, LabPal) and optimizer.param_groups[0]["mode"] == "SGD"
    assert optimizer.scaled_batch_size_schedule == ((0, 32), (75_000, 64), (112_500, 128))
    inputs, targets = torch.randn(8, 3), torch.randint(0, 2, (8,))
    optimizer.step(make_batch_closure(model, nn.CrossEntropyLoss(), inputs, targets))
    reference(inputs)  # the one training pass of the batch; its line passes must leave no trace
    for buffer, expected in zip(model.buffers(), reference.buffers()):
        assert torch.equal(buffer, expected)


def test_torch_optimizers_take_their_own_arguments():
    optimizer = build_optimizer("sgd", small_model(), {"lr": 0.1, "momentum": 0.9},
                                training_set_size=10, inference_batch_size=2)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9
    assert "lr" in accepted_arguments("adam") and "buffers" not in accepted_arguments("lab_pal")
    assert set(OPTIMIZERS) >= {"lab_pal", "sgd", "adam", "adamw"}


@pytest.mark.parametrize(
    "name, arguments, message",
    [
        ("labpal", {}, "unknown optimizer 'labpal' (did you mean 'lab_pal'?); valid optimizers: adagrad, adam,"),
        ("lab_pal", {"step_adaption": 2.0}, "unknown argument 'step_adaption' for optimizer 'lab_pal' (did you mean 'step_adaptation'?); accepted: mode,"),
        ("lab_pal", {"buffers": None}, "unknown argument 'buffers'"),
        ("lab_pal", {"momentum": 1.5}, "optimizer 'lab_pal' refuses argument momentum: Invalid momentum: 1.5; it must be in [0, 1)"),
        ("sgd", {"lr": -1.0}, "optimizer 'sgd' refuses argument lr: Invalid learning rate: -1.0"),
        ("pls", {"expl_policy": "exponential"}, "optimizer 'pls' refuses argument expl_policy: Invalid expl_policy: "
         "'exponential' with rules='original'; expl_policy belongs to rules='research' only"),
    ],
)
def test_bad_names_and_arguments_are_user_errors(name, arguments, message):
    with pytest.raises(UserError) as error:
        build_optimizer(name, small_model(), arguments, training_set_size=10, inference_batch_size=2)
    assert message in str(error.value)


def test_experiment_gives_lab_pal_the_real_training_set_size_and_batch_size():
    configuration = load_configuration(REPOSITORY / "configuration_lab_pal.txt")
    experiment = build_experiment(configuration)
    group = experiment.optimizer.param_groups[0]
    assert group["training_set_size"] == len(experiment.splits.train) == 1150
    assert group["inference_batch_size"] == configuration["training"]["batch_size"]
