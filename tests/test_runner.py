"""The experiment runner end to end: main.py, run folder, metrics, events, checkpoints, plots, resume."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from source.configuration.settings import MACHINE_CHOICES
from source.errors import UserError
from source.plotting import PlottedRun, check_plot_folder, claim_plot_folder, plot_runs, read_metrics
from source.registries import load_configuration
from source.training import RunFolder, build_experiment, run_experiment
from tests.tiny_run import TINY, workspace  # noqa: F401 (workspace is a fixture)
from tests.tiny_run import set_options as _set

REPOSITORY = Path(__file__).resolve().parents[1]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records(path):
    return [{key: value for key, value in record.items() if key != "elapsed_seconds"} for record in read_metrics(path)]


def _scalar_tags(run_folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for event_file in run_folder.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def test_main_runs_a_tiny_experiment_and_writes_everything(workspace, capsys):
    assert main.main(["--config", "tiny.txt"]) == 0
    folder = workspace / "runs" / "tiny"
    records = read_metrics(folder / "metrics.jsonl")
    by_split = {
        split: [record for record in records if record["split"] == split]
        for split in ("training", "validation", "test")
    }
    assert [record["step"] for record in by_split["training"]] == [5, 10, 15, 20]
    assert [record["step"] for record in by_split["validation"]] == [10, 20, 24]
    assert len(by_split["test"]) == 1 and by_split["test"][0]["step"] == 24
    assert {"step", "split", "loss", "accuracy", "learning_rate", "step_size", "training_batch_size",
            "forward_passes", "backward_passes", "measurements"} <= set(by_split["training"][-1])
    assert by_split["training"][-1]["backward_passes"] < by_split["training"][-1]["forward_passes"]
    measurements = [record for record in records if record["split"] == "event" and record["event"] == "measurement"]
    assert measurements and measurements[0]["learning_rate"] > 0
    assert by_split["test"][0]["forward_passes"] >= by_split["training"][-1]["forward_passes"]
    assert 0.0 <= by_split["test"][0]["accuracy"] <= 1.0
    assert by_split["test"][0]["best_step"] in (10, 20, 24)
    assert {
        "training/learning_rate",
        "training/loss",
        "training/accuracy",
        "validation/loss",
        "validation/accuracy",
        "test/accuracy",
        "training/training_batch_size",
        "training/step_size",
        "measurement/learning_rate",
    } <= _scalar_tags(folder)
    last = torch.load(folder / "last.pt", weights_only=True)
    best = torch.load(folder / "best.pt", weights_only=True)
    assert last["step"] == 24 and last["finished"] and best["step"] == by_split["test"][0]["best_step"]
    stored = load_configuration(folder / "configuration.txt")
    # The machine's choices for "auto" keys are recorded: on the CPU, no channels-last, no autocast.
    resolved = ["data.pipeline=device", "experiment.channels_last=false", "experiment.autocast=none"]
    assert stored.sections == load_configuration("tiny.txt", resolved).sections
    plots = workspace / "plots" / "tiny"
    for name in ("learning_rate", "training_loss", "validation_accuracy", "test_accuracy"):
        assert (plots / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)
    output = capsys.readouterr().out
    for shown in (str(Path("runs") / "tiny"), "metrics.jsonl", "last.pt", "best.pt", "test_accuracy.png", "events.out"):
        assert shown in output
    assert f"test accuracy: {by_split['test'][0]['accuracy']:.4f}" in output


def test_regression_run_reports_rmse_in_data_units(workspace):
    overrides = _set(
        "data.name=diabetes",
        "model.name=mlp",
        "optimizer.name=sgd",
        "optimizer.arguments.lr=0.01",
        "training.training_steps=12",
        "logging.tensorboard=false",
    )
    assert main.main(["--config", "tiny.txt", *overrides]) == 0
    records = read_metrics(workspace / "runs" / "tiny" / "metrics.jsonl")
    test = [record for record in records if record["split"] == "test"][0]
    # Diabetes targets spread over about 25..346 (std about 77): an untrained RMSE is tens of units.
    assert 20.0 < test["rmse"] < 200.0 and "accuracy" not in test
    assert (workspace / "plots" / "tiny" / "validation_rmse.png").exists()
    assert (workspace / "plots" / "tiny" / "test_rmse.png").exists()
    assert not list((workspace / "runs" / "tiny").glob("events.out.tfevents.*"))


def test_main_as_a_script(workspace):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPOSITORY / "main.py"), "--config", "tiny.txt", *_set("training.training_steps=10")]
    finished = subprocess.run(command, cwd=workspace, capture_output=True, text=True, env=environment, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert (workspace / "runs" / "tiny" / "best.pt").exists()
    assert {path.stem for path in (workspace / "plots" / "tiny").glob("*.png")} == {
        "learning_rate", "training_loss", "validation_accuracy", "test_accuracy", "training_batch_size"}
    failed = subprocess.run(command, cwd=workspace, capture_output=True, text=True, env=environment, timeout=300)
    assert failed.returncode == 2
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith("error: runs/tiny already exists: continue that run with --resume")


# Each case: --set overrides (or other arguments), fragments of the one-line message.
BAD_RUNS = {
    "unknown key": (
        ["--set", "training.batchsize=3"],
        ["--set training.batchsize=3", "unknown key batchsize", "'batch_size'"],
    ),
    "wrong type": (["--set", "training.training_steps=ten"], ["[training] training_steps = 'ten'", "integer >= 1"]),
    "out of range": (["--set", "training.batch_size=0"], ["[training] batch_size = '0'", "integer >= 1"]),
    "unknown model": (["--set", "model.name=resnet"], ["[model] name = 'resnet'", "small_cnn"]),
    "unknown data set": (["--set", "data.name=mnist"], ["[data] name = 'mnist'", "digits"]),
    "unknown optimizer": (["--set", "optimizer.name=lbfgs"], ["[optimizer] name = 'lbfgs'", "lab_pal", "sgd"]),
    "unknown schedule": (["--set", "schedule.name=cosine"], ["[schedule] name = 'cosine'", "CosineAnnealingLR"]),
    "unknown optimizer argument": (
        ["--set", "optimizer.arguments.step_adaption=3.6"],
        ["--set optimizer.arguments.step_adaption=3.6: [optimizer]", "step_adaption", "step_adaptation"],
    ),
    "unknown schedule argument": (
        _set(
            "optimizer.name=sgd",
            "optimizer.arguments.lr=0.1",
            "schedule.name=MultiStepLR",
            "schedule.arguments.milestone=5,",
        ),
        ["--set schedule.arguments.milestone=5,: [schedule]", "no argument milestone", "milestones"],
    ),
    "schedule for lab_pal": (
        ["--set", "schedule.name=StepLR", "--set", "schedule.arguments.step_size=5"],
        ["[schedule]", "LabPal sets its own learning rate"],
    ),
    "optimizer value refused": (
        ["--set", "optimizer.name=sgd", "--set", "optimizer.arguments.lr=-1"],
        ["--set optimizer.arguments.lr=-1: [optimizer]", "Invalid learning rate: -1"],
    ),
    "batch larger than training set": (
        ["--set", "training.batch_size=5000"],
        ["[training] batch_size", "5000 exceeds"],
    ),
    "missing data files": (
        ["--set", "data.name=cifar10", "--set", "model.name=resnet20"],
        ["--set data.name=cifar10: [data]", "cifar-10-batches-py"],
    ),
    "missing configuration file": (["--config", "absent.txt"], ["absent.txt not found"]),
    "bad --set": (["--set", "training"], ["--set training", "section.key=value"]),
    "bad command line option": (["--resum"], ["unrecognized arguments: --resum", "--help"]),
    "resume without a run": (["--resume"], ["cannot resume", "does not exist"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_input_exits_2_with_one_line_and_no_run_folder(workspace, capsys, case):
    arguments, fragments = BAD_RUNS[case]
    if "--config" not in arguments:
        arguments = ["--config", "tiny.txt", *arguments]
    assert main.main(arguments) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in captured.err
    assert not (workspace / "runs").exists() or not any((workspace / "runs").iterdir())
    assert not (workspace / "plots").exists()


def test_cuda_device_without_cuda_is_refused(workspace, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main.main(["--config", "tiny.txt", "--set", "experiment.device=cuda"]) == 2
    assert "[experiment] device: cuda asked for, but this machine has no CUDA device" in capsys.readouterr().err
    assert not (workspace / "runs").exists()


def test_existing_run_is_never_overwritten_and_resumes_only_with_its_configuration(workspace, capsys):
    arguments = ["--config", "tiny.txt", "--set", "training.training_steps=5"]
    assert main.main([*arguments, "--stop-after-steps", "3"]) == 0
    assert "stopped at step 3 of 5; continue with --resume" in capsys.readouterr().out
    assert main.main(arguments) == 2
    assert "runs/tiny already exists: continue that run with --resume" in capsys.readouterr().err
    assert main.main([*arguments, "--resume", "--set", "model.name=mlp"]) == 2
    assert "--set model.name=mlp: [model] name cannot change when resuming runs/tiny (saved: small_cnn)" in (
        capsys.readouterr().err
    )
    assert main.main([*arguments, "--resume"]) == 0
    assert "resuming runs/tiny from step 3" in capsys.readouterr().out
    records = (workspace / "runs" / "tiny" / "metrics.jsonl").read_bytes()
    assert main.main([*arguments, "--resume"]) == 0
    assert "finished at step 5 already" in capsys.readouterr().out
    assert (workspace / "runs" / "tiny" / "metrics.jsonl").read_bytes() == records


def _tensors_equal(first, second, path="checkpoint"):
    """Assert two checkpoint trees are equal, tensors bit for bit."""
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second), path
    elif isinstance(first, dict):
        assert set(first) == set(second), path
        for key in first:
            _tensors_equal(first[key], second[key], f"{path}/{key}")
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second), path
        for index, (left, right) in enumerate(zip(first, second)):
            _tensors_equal(left, right, f"{path}[{index}]")
    else:
        assert first == second, path


@pytest.mark.parametrize(
    ("optimizer", "stops"),
    [
        # SGD with the paper's kind of schedule: milestones in steps, one inside each resumed leg.
        (
            [
                "optimizer.name=sgd",
                "optimizer.arguments.lr=0.1",
                "schedule.name=MultiStepLR",
                "schedule.arguments.milestones=12, 30",
                "schedule.arguments.gamma=0.1",
            ],
            [13, 24],
        ),
        # LABPAL stopped inside its first measurement (10 batches) and again after an epoch boundary (35).
        (["optimizer.name=lab_pal"], [6, 31]),
    ],
    ids=["sgd_multistep", "lab_pal"],
)
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(workspace, optimizer, stops):
    common = [*optimizer, "training.training_steps=45", "training.evaluate_every_steps=15"]
    uninterrupted = load_configuration("tiny.txt", [*common, "experiment.name=whole"])
    assert run_experiment(uninterrupted).finished
    pieces = load_configuration("tiny.txt", [*common, "experiment.name=pieces"])
    resume = False
    for stop in stops:
        outcome = run_experiment(pieces, resume=resume, stop_after_steps=stop)
        assert not outcome.finished
        resume = True
    assert run_experiment(pieces, resume=True).finished
    whole_folder, pieces_folder = RunFolder.of(uninterrupted), RunFolder.of(pieces)
    whole_last = torch.load(whole_folder.last_checkpoint_path, weights_only=True)
    pieces_last = torch.load(pieces_folder.last_checkpoint_path, weights_only=True)
    # Wall times differ, and with them the byte length of the metrics records.
    for checkpoint in (whole_last, pieces_last):
        checkpoint.pop("elapsed_seconds")
        checkpoint.pop("metrics_offset")
    _tensors_equal(whole_last, pieces_last)
    _tensors_equal(
        torch.load(whole_folder.best_checkpoint_path, weights_only=True),
        torch.load(pieces_folder.best_checkpoint_path, weights_only=True),
    )
    assert _records(whole_folder.metrics_path) == _records(pieces_folder.metrics_path)


def test_resume_cuts_records_written_after_the_last_checkpoint(workspace):
    configuration = load_configuration("tiny.txt", ["logging.tensorboard=false"])
    run_experiment(configuration, stop_after_steps=12)
    folder = RunFolder.of(configuration)
    expected = _records(folder.metrics_path)
    # A run killed after step 12 may have logged more than its checkpoint knows about.
    with open(folder.metrics_path, "a") as file:
        record = {"step": 15, "split": "training", "loss": 1.0, "accuracy": 0.5, "learning_rate": 0.1}
        file.write(json.dumps(record) + "\n")
    run_experiment(configuration, resume=True, stop_after_steps=1)
    steps = [(record["step"], record["split"]) for record in _records(folder.metrics_path)]
    assert steps[: len(expected)] == [(record["step"], record["split"]) for record in expected]
    assert (15, "training") not in steps and len(steps) == len(set(steps))


def test_resume_refuses_fewer_steps_than_already_run(workspace):
    configuration = load_configuration("tiny.txt", ["logging.tensorboard=false"])
    run_experiment(configuration, stop_after_steps=12)
    shorter = load_configuration("tiny.txt", ["logging.tensorboard=false", "training.training_steps=11"])
    with pytest.raises(UserError, match=r"\[training\] training_steps: 11 is less than the 12 steps"):
        run_experiment(shorter, resume=True)


def _write_metrics(path, learning_rate, accuracy):
    records = [
        {"step": 10, "split": "training", "loss": 1.0, "accuracy": 0.5, "learning_rate": learning_rate},
        {"step": 20, "split": "training", "loss": 0.5, "accuracy": 0.7, "learning_rate": learning_rate / 10},
        {"step": 20, "split": "validation", "loss": 0.6, "accuracy": accuracy, "epoch": 1.0},
        {"step": 20, "split": "test", "loss": 0.6, "accuracy": accuracy, "best_step": 20},
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_plot_runs_draws_several_runs_into_titled_figures(tmp_path):
    runs = [
        PlottedRun("LABPAL-NSGD", _write_metrics(tmp_path / "a.jsonl", 0.1, 0.72)),
        PlottedRun("SGD", _write_metrics(tmp_path / "b.jsonl", 0.05, 0.68)),
    ]
    written = plot_runs(runs, tmp_path / "figures", dataset="cifar100", model="mobilenet_v2_cifar")
    assert [path.name for path in written] == [
        "learning_rate.png",
        "training_loss.png",
        "validation_accuracy.png",
        "test_accuracy.png",
    ]
    for path in written:
        assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_folder_of_another_run_is_refused(tmp_path):
    folder = tmp_path / "plots" / "name"
    claim_plot_folder(folder, tmp_path / "runs" / "name")
    plot_runs([PlottedRun("x", _write_metrics(tmp_path / "a.jsonl", 0.1, 0.7))], folder, dataset="d", model="m")
    check_plot_folder(folder, tmp_path / "runs" / "name")
    with pytest.raises(UserError, match="holds the plots of"):
        check_plot_folder(folder, tmp_path / "other_runs" / "name")


def test_building_an_experiment_leaves_the_configuration_as_given_and_returns_what_auto_became(workspace):
    configuration = load_configuration("tiny.txt")
    given = copy.deepcopy(configuration.sections)
    experiment = build_experiment(configuration)
    assert configuration.sections == given
    assert given["data"]["pipeline"] == given["experiment"]["channels_last"] == "auto"
    assert set(experiment.resolved) == MACHINE_CHOICES
    # On a CPU: digits are small enough to live on the device; no channels-last memory order off CUDA.
    assert experiment.resolved == {("data", "pipeline"): "device", ("experiment", "channels_last"): "false"}
    assert main.main(["--config", "tiny.txt", *_set("training.training_steps=2")]) == 0
    recorded = load_configuration("runs/tiny/configuration.txt")
    assert recorded["data"]["pipeline"] == "device" and recorded["experiment"]["channels_last"] == "false"
