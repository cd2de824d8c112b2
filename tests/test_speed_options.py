"""The speed options channels_last, autocast and compile: each still trains the tiny digits run to a good accuracy."""

import shutil

import pytest

import main
from source.plotting import read_metrics
from tests.tiny_run import set_options, workspace  # noqa: F401 (a fixture)

_TRAINS = ("training.training_steps=100", "training.evaluate_every_steps=50")


def _test_accuracy(folder):
    return next(record for record in read_metrics(folder / "metrics.jsonl") if record["split"] == "test")["accuracy"]


@pytest.mark.parametrize(
    "options",
    [
        ("experiment.channels_last=true",),
        ("experiment.autocast=bfloat16",),
        ("experiment.channels_last=true", "experiment.autocast=bfloat16", "optimizer.name=sgd",
         "optimizer.arguments.lr=0.1"),
    ],
)
def test_training_converges_with_the_option(workspace, options):
    assert main.main(["--config", "tiny.txt", *set_options(*_TRAINS, *options)]) == 0
    assert _test_accuracy(workspace / "runs" / "tiny") >= 0.9
    recorded = (workspace / "runs" / "tiny" / "configuration.txt").read_text()
    for option in options[:2]:
        key, value = option.split(".", 1)[1].split("=")
        assert f"{key} = {value}" in recorded


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C++ compiler for torch.compile")
def test_training_converges_with_a_compiled_model(workspace):
    options = ("experiment.compile=true", "optimizer.name=sgd", "optimizer.arguments.lr=0.1")
    assert main.main(["--config", "tiny.txt", *set_options(*_TRAINS, *options)]) == 0
    assert _test_accuracy(workspace / "runs" / "tiny") >= 0.9


def test_options_that_cannot_apply_are_refused_before_training(workspace, capsys):
    arguments = ["--config", "tiny.txt", *set_options("data.name=diabetes", "model.name=mlp")]
    assert main.main([*arguments, *set_options("experiment.channels_last=true")]) == 2
    assert "experiment] channels_last: true needs images, but diabetes has inputs of shape (10,)" in capsys.readouterr().err
    assert main.main(["--config", "tiny.txt", *set_options("optimizer.name=pls", "experiment.compile=true")]) == 2
    assert "pls computes per-sample gradients of the plain model" in capsys.readouterr().err
    assert not (workspace / "runs").exists() or not any((workspace / "runs").iterdir())


def _training_losses(folder):
    return [record["loss"] for record in read_metrics(folder / "metrics.jsonl") if record["split"] == "training"]


def test_channels_last_changes_a_run_by_rounding_only(workspace):
    """The memory format is chosen for the machine, not per optimizer; results must not depend on it.

    SGD, because LABPAL's finite difference over h = 1.77e-4 turns float32 rounding differences of
    the loss into learning rates that differ by about 1 %, after which any two runs drift apart.
    """
    for memory_format in ("true", "false"):
        options = set_options(f"experiment.channels_last={memory_format}", f"experiment.name=channels_last_{memory_format}",
                              "optimizer.name=sgd", "optimizer.arguments.lr=0.1")
        assert main.main(["--config", "tiny.txt", *options]) == 0
    channels_last = _training_losses(workspace / "runs" / "channels_last_true")
    contiguous = _training_losses(workspace / "runs" / "channels_last_false")
    assert len(channels_last) == len(contiguous) >= 4
    assert channels_last != contiguous  # the two memory orders do round differently
    assert channels_last == pytest.approx(contiguous, rel=1e-5)


def test_autocast_is_float32_unless_bfloat16_is_asked_for(workspace, capsys):
    assert main.main(["--config", "tiny.txt"]) == 0
    assert "autocast = none" in (workspace / "runs" / "tiny" / "configuration.txt").read_text()
    # No per-optimizer "auto": that would give the runs of one comparison different precisions.
    assert main.main(["--config", "tiny.txt", *set_options("experiment.autocast=auto", "experiment.name=other")]) == 2
    error = capsys.readouterr().err
    assert "autocast" in error and "auto" in error and "Traceback" not in error
