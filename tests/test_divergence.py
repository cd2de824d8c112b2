"""Divergence: a training loss that stays non-finite (or blows up) stops the run with exit status 3.

Faults are injected into the training loss through a wrapped loss function: a constant added to
the loss changes its value but not its gradient, so the model itself stays finite and the only
sign of trouble is the loss, as when a data batch holds a non-finite value.
"""

import csv
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

import main
from source.plotting import read_metrics
from source.registries import load_configuration
from source.training import RunFolder, runner
from source.training.checkpoints import load_checkpoint, non_finite_entry
from source.training.run_state import RunState
from source.training.trainer import DivergenceWatch, Trainer
from tests.tiny_run import tiny_with

# The tiny digits run with SGD, 30 steps (35 per epoch), diverging after 4 bad steps.
SETTINGS = {"training": {"training_steps": "30", "divergence_steps": "4"}, "logging": {"tensorboard": "false"}}
TINY = tiny_with({**SETTINGS, "optimizer": {"name": "sgd", "arguments": {"lr": "0.05"}}})


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(TINY)
    return tmp_path


def _inject(monkeypatch, extra):
    """Add ``extra(step)`` to the training loss of the run built next (SGD: one loss call per step)."""
    build = runner.build_experiment

    def build_with_fault(configuration, distributed=None):
        experiment = build(configuration, distributed)
        stepper, model, calls = experiment.stepper, experiment.model, itertools.count(1)
        loss_function = stepper.loss_function

        def faulty_loss(outputs, targets, *arguments, **keywords):
            loss = loss_function(outputs, targets, *arguments, **keywords)
            return loss + extra(next(calls), loss.detach()) if model.training else loss

        stepper.loss_function = faulty_loss
        return experiment

    monkeypatch.setattr(runner, "build_experiment", build_with_fault)


def _between(first, last, value):
    return lambda step, loss: value if first <= step <= last else 0.0


def _split(folder, split):
    return [record for record in read_metrics(folder / "metrics.jsonl") if record["split"] == split]


def _assert_finite_checkpoints(folder):
    for path in folder.glob("*.pt"):
        assert non_finite_entry(load_checkpoint(path)["model"]) is None, path


def test_a_loss_that_turns_non_finite_stops_the_run_as_diverged(workspace, monkeypatch, capsys):
    _inject(monkeypatch, _between(13, 10**9, math.inf))
    assert main.main(["--config", "tiny.txt"]) == 3
    captured = capsys.readouterr()
    folder = workspace / "runs" / "tiny"
    # Steps 13-16 had no finite loss; the check at the log interval of step 20 sees it.
    [diverged] = _split(folder, "diverged")
    assert diverged["step"] == 16 and diverged["stopped_at_step"] == 20
    assert diverged["reason"].startswith(
        "training diverged at step 16: the training loss was not finite for 4 consecutive steps (13-16)"
    )
    assert "optimizer.arguments.lr" in diverged["reason"]
    assert captured.err == f"error: {diverged['reason']}\n"
    assert not _split(folder, "test") and [record["step"] for record in _split(folder, "validation")] == [10]
    last = load_checkpoint(folder / "last.pt")
    assert last["step"] == 10 and last["diverged"]["step"] == 16 and not last["finished"]
    assert load_checkpoint(folder / "best.pt")["step"] == 10
    _assert_finite_checkpoints(folder)
    # --resume reports the divergence again without training into it.
    records = (folder / "metrics.jsonl").read_bytes()
    assert main.main(["--config", "tiny.txt", "--resume"]) == 3
    assert "diverged already" in capsys.readouterr().out
    assert (folder / "metrics.jsonl").read_bytes() == records


def test_a_streak_shorter_than_the_log_interval_is_still_caught(workspace, monkeypatch):
    _inject(monkeypatch, _between(3, 6, math.nan))
    configuration = load_configuration("tiny.txt", ["logging.log_every_steps=25", "training.evaluate_every_steps=25"])
    outcome = runner.run_experiment(configuration)
    assert outcome.diverged.startswith("training diverged at step 6: the training loss was not finite")
    assert not outcome.finished and outcome.test is None
    assert not (RunFolder.of(configuration).path / "last.pt").exists()


def test_short_streaks_and_a_normal_run_do_not_diverge(workspace, monkeypatch):
    # Three non-finite steps at a time, each streak shorter than divergence_steps = 4.
    _inject(monkeypatch, lambda step, loss: math.inf if step % 5 in (1, 2, 3) and step < 20 else 0.0)
    configuration = load_configuration("tiny.txt", ["training.divergence_loss_factor=1000"])
    outcome = runner.run_experiment(configuration)
    assert outcome.finished and outcome.diverged is None and outcome.test is not None
    assert not _split(RunFolder.of(configuration).path, "diverged")


def test_a_blown_up_loss_diverges_only_with_a_loss_factor(workspace, monkeypatch):
    # From step 8 on, the loss reads a million times its value (its gradient does not change).
    _inject(monkeypatch, lambda step, loss: 1e6 * loss if step >= 8 else 0.0)
    factor = load_configuration("tiny.txt", ["training.divergence_loss_factor=100", "experiment.name=factor"])
    outcome = runner.run_experiment(factor)
    assert outcome.diverged.startswith("training diverged at step 11: the training loss was above 100 × its first")
    off = load_configuration("tiny.txt", ["experiment.name=off"])
    assert runner.run_experiment(off).finished


def test_a_model_that_becomes_non_finite_is_never_saved(workspace, capsys):
    overrides = ("optimizer.arguments.lr=1e10", "training.divergence_steps=50")
    arguments = ["--config", "tiny.txt", *(word for override in overrides for word in ("--set", override))]
    assert main.main(arguments) == 3
    folder = workspace / "runs" / "tiny"
    [diverged] = _split(folder, "diverged")
    assert "is not finite" in diverged["reason"]
    assert not (folder / "best.pt").exists()
    _assert_finite_checkpoints(folder)
    assert "error: training diverged at step" in capsys.readouterr().err


def test_lab_pal_skipping_every_update_ends_as_diverged(workspace, monkeypatch):
    # From its 25th loss evaluation on, LABPAL sees only non-finite losses and skips every update.
    _inject(monkeypatch, lambda call, loss: math.inf if call >= 25 else 0.0)
    lab_pal = tiny_with(SETTINGS)
    (workspace / "lab_pal.txt").write_text(lab_pal)
    configuration = load_configuration("lab_pal.txt", ["training.training_steps=40"])
    outcome = runner.run_experiment(configuration)
    assert outcome.diverged is not None and "the training loss was not finite" in outcome.diverged
    assert "step_adaptation" in outcome.diverged
    _assert_finite_checkpoints(RunFolder.of(configuration).path)


def test_a_non_finite_validation_never_becomes_best():
    trainer = SimpleNamespace(state=RunState(), quality="accuracy", higher_is_better=True)
    assert not Trainer._is_better(trainer, {"loss": math.nan, "accuracy": 0.1})
    assert not Trainer._is_better(trainer, {"loss": math.inf, "accuracy": 0.1})
    assert Trainer._is_better(trainer, {"loss": 2.0, "accuracy": 0.1})
    trainer.state.best = {"step": 10, "validation": {"loss": 2.0, "accuracy": 0.1}}
    assert not Trainer._is_better(trainer, {"loss": math.nan, "accuracy": 0.9})


def _forbid_synchronisation(monkeypatch):
    def synchronise(*arguments, **keywords):
        raise AssertionError("the divergence count waited for the device")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, synchronise)


def test_the_divergence_count_never_reads_the_device_per_step(monkeypatch):
    watch = DivergenceWatch(steps=3, loss_factor=10.0, device=torch.device("cpu"))
    watch.set_reference(2.0)
    losses = [1.0, math.nan, 5.0, 30.0, math.inf, 25.0, 1.0, math.nan]
    with monkeypatch.context() as patch:
        _forbid_synchronisation(patch)
        for step, loss in enumerate(losses, start=1):
            watch.add(torch.tensor(loss), step)
    # Steps 4-6: above 10 × 2.0 or not finite, three in a row; the streak ended before the check.
    assert watch.diverged_step() == 6 and int(watch.streak) == 1
    assert watch.reason(6).startswith("the training loss was above 10 × its first logged value 2 for 3 consecutive")


def test_the_trainer_reads_the_count_only_at_log_intervals_and_evaluations(workspace, monkeypatch):
    reads = []
    read = DivergenceWatch.diverged_step
    monkeypatch.setattr(DivergenceWatch, "diverged_step", lambda watch: reads.append(1) or read(watch))
    configuration = load_configuration("tiny.txt", ["logging.log_every_steps=10"])
    assert runner.run_experiment(configuration).finished
    # 30 steps: log intervals and evaluations at 10, 20, 30, and once after the loop.
    assert len(reads) == 4


COMPARISON = """\
[comparison]
seeds = 0
    [[steady]]
    label = SGD
    optimizer = sgd
        [[[arguments]]]
        lr = 0.05
    [[wild]]
    label = SGD too fast
    optimizer = sgd
        [[[arguments]]]
        lr = 1e10
"""


def test_a_comparison_marks_a_diverged_entry_and_goes_on(workspace, capsys):
    (workspace / "compare.txt").write_text(
        TINY.replace("name = tiny", "name = cmp").split("[optimizer]")[0]
        + "[training]\ntraining_steps = 10\nevaluate_every_steps = 5\ndivergence_steps = 3\n"
        + "[logging]\nprogress_bar = false\nlog_every_steps = 5\ntensorboard = false\n"
        + COMPARISON.replace("seeds = 0", "seeds = 0, 1")
    )
    assert main.main(["--config", "compare.txt"]) == 0
    output = capsys.readouterr().out
    assert "wild (SGD too fast) seed 0: diverged; going on with the next run" in output
    folder = workspace / "runs" / "cmp"
    with open(folder / "results.csv", newline="") as file:
        rows = {row["entry"]: row for row in csv.DictReader(file)}
    assert rows["steady"]["status"] == "finished" and rows["steady"]["test_accuracy_mean"]
    assert rows["wild"]["status"] == "diverged" and rows["wild"]["test_accuracy_mean"] == ""
    assert "| diverged |" in (folder / "results.md").read_text()
    # Resuming skips the diverged runs instead of training into the divergence again.
    assert main.main(["--config", "compare.txt", "--resume"]) == 0
    assert "diverged already, skipped" in capsys.readouterr().out


def test_a_comparison_whose_every_run_diverged_exits_3(workspace, capsys):
    (workspace / "compare.txt").write_text(
        TINY.replace("name = tiny", "name = cmp").split("[optimizer]")[0]
        + "[training]\ntraining_steps = 6\nevaluate_every_steps = 3\n"
        + "[logging]\nprogress_bar = false\ntensorboard = false\n"
        + COMPARISON.split("    [[steady]]")[0]
        + COMPARISON.split("lr = 0.05\n")[1]
    )
    assert main.main(["--config", "compare.txt"]) == 3
    assert capsys.readouterr().err == "error: every run of the comparison diverged; see results.md\n"
