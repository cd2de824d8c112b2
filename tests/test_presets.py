"""The ready configurations in configs/: the paper's grid, valid, listed in the README, trainable."""

import itertools
from pathlib import Path

import pytest
import torch

import main
from source.optimizer import build_optimizer
from source.optimizer.schedules import build_schedule
from source.registries import load_configuration
from tests.data_files import copy_a_few_cifar10_jpegs

REPOSITORY = Path(__file__).resolve().parents[1]
# Comparisons (compare_*.txt, sweep_*.txt) list optimizers in entries, grid files (paper.txt) list
# comparisons; tests/test_comparison.py and tests/test_sweeps.py check them.
CONFIGS = REPOSITORY / "configs"
COMPARISONS = sorted({*CONFIGS.glob("compare_*.txt"), *CONFIGS.glob("sweep_*.txt")})
GRIDS = [CONFIGS / "paper.txt"]
PRESETS = sorted(set(CONFIGS.glob("*.txt")) - set(COMPARISONS) - set(GRIDS))
PAPER_GRID = {
    f"{data}_{model}_{optimizer}"
    for data, model, optimizer in itertools.product(
        ("cifar10", "cifar100", "svhn"),
        ("resnet20", "mobilenet_v2_cifar", "densenet40"),
        ("lab_pal_nsgd", "lab_pal_sgd", "sgd"),
    )
} | {"imagenet_resnet50_lab_pal_nsgd"}


def test_configs_hold_the_paper_grid():
    assert PAPER_GRID <= {path.stem for path in PRESETS}


@pytest.mark.parametrize("path", PRESETS, ids=lambda path: path.stem)
def test_preset_is_valid_and_its_optimizer_and_schedule_build(path):
    configuration = load_configuration(path)
    assert configuration["experiment"]["name"] == path.stem
    if path.stem in PAPER_GRID:
        assert configuration["training"]["batch_size"] == 128
        assert configuration["training"]["training_steps"] == 150_000
    optimizer_section = configuration["optimizer"]
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(
        optimizer_section["name"], model, dict(optimizer_section["arguments"]),
        training_set_size=40_000, inference_batch_size=128,
    )
    schedule = build_schedule(configuration["schedule"]["name"], optimizer, dict(configuration["schedule"]["arguments"]),
                              configuration["training"]["training_steps"])
    if path.stem.endswith("_sgd") and not path.stem.endswith("lab_pal_sgd"):
        assert optimizer.param_groups[0]["lr"] == 0.1
        assert dict(schedule.milestones) == {75_000: 1, 112_500: 1} and schedule.gamma == 0.1
    else:
        assert schedule is None
        assert optimizer.param_groups[0]["mode"] == ("SGD" if path.stem.endswith("lab_pal_sgd") else "NSGD")


def test_readme_lists_every_preset_with_its_command():
    readme = (REPOSITORY / "README.md").read_text()
    for path in PRESETS + COMPARISONS + GRIDS:
        assert f"python main.py --config configs/{path.name}" in readme


def test_a_few_steps_on_the_real_cifar10_jpegs(tmp_path, monkeypatch, capsys):
    copy_a_few_cifar10_jpegs(tmp_path / "cifar10-jpeg", ("bird", "frog"), train_per_class=20, test_per_class=5)
    monkeypatch.chdir(tmp_path)
    overrides = {
        "data.root": "cifar10-jpeg", "data.num_workers": "0", "data.train_size": "32",
        "training.training_steps": "12", "training.batch_size": "8", "experiment.cpu_threads": "1",
        "logging.progress_bar": "false",
    }
    arguments = ["--config", str(REPOSITORY / "configs" / "cifar10_jpeg_resnet20_lab_pal_nsgd.txt")]
    for key, value in overrides.items():
        arguments += ["--set", f"{key}={value}"]
    assert main.main(arguments) == 0
    assert "test accuracy:" in capsys.readouterr().out
    run_folder = tmp_path / "runs" / "cifar10_jpeg_resnet20_lab_pal_nsgd"
    assert (run_folder / "best.pt").is_file()
    assert len(list((tmp_path / "plots" / "cifar10_jpeg_resnet20_lab_pal_nsgd").glob("*.png"))) == 5
