"""A training step never waits for the device: nothing in it reads a tensor's value on the host.

On the CPU a host read cannot be observed as a CUDA synchronisation, so every way of reading a
tensor's value (item, tolist, bool, float, int, numpy) is made to raise while steps run between
log intervals; bench/gpu_paper_run.py counts real synchronisations on a GPU.
"""

import itertools

import pytest
import torch

from source.registries import load_configuration
from source.training import RunFolder, Trainer, build_experiment
from tests.tiny_run import workspace  # noqa: F401 (a fixture)

_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


def _refuse_reads(monkeypatch):
    def refuse(*arguments, **keywords):
        raise AssertionError("a training step read a tensor's value on the host")

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize(
    "optimizer",
    [
        ["optimizer.name=sgd", "optimizer.arguments.lr=0.05", "optimizer.arguments.momentum=0.9"],
        # After its first measurement (steps 1-10) LABPAL trains on the measured learning rate.
        ["optimizer.name=lab_pal"],
    ],
    ids=["sgd", "lab_pal"],
)
def test_training_steps_between_log_intervals_read_nothing_on_the_host(workspace, monkeypatch, optimizer):
    configuration = load_configuration(
        "tiny.txt",
        [*optimizer, "logging.log_every_steps=1000", "training.evaluate_every_steps=1000", "training.training_steps=1000"],
    )
    experiment = build_experiment(configuration)
    folder = RunFolder.of(configuration)
    folder.create(configuration).release()
    trainer = Trainer(experiment, folder)
    batches = experiment.data.training.epoch(0)
    for inputs, targets, key in itertools.islice(batches, 12):
        trainer._train_step(inputs, targets, key, _NoBar())
    with monkeypatch.context() as patches:
        _refuse_reads(patches)
        for inputs, targets, key in itertools.islice(batches, 15):
            trainer._train_step(inputs, targets, key, _NoBar())
    assert trainer.state.step == 27
    trainer.close()


class _NoBar:
    def update(self):
        pass
