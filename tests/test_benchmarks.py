"""The benchmark scripts run to their tables on tiny CIFAR-10 files (their figures come from real runs)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_files import write_cifar10

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, per_batch=40)  # 200 training images: 128 training (one batch), 72 validation
    return root


def _run(script, *arguments):
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "bench" / script), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPOSITORY,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_data_benchmark_prints_every_contender_against_the_device_pipeline(cifar_root):
    output = _run("data_pipeline.py", "--root", str(cifar_root), "--train-size", "128", "--rounds", "1",
                  "--batches", "1", "--workers", "0")
    assert "| device |" in output and "| loader-0 |" in output and "| paper-0 |" in output
    assert "| device | " in output and "1.0× |" in output


def test_trainer_benchmark_compares_trainer_and_bare_loop(cifar_root):
    output = _run("trainer_overhead.py", "--root", str(cifar_root), "--train-size", "128", "--rounds", "1",
                  "--steps", "1", "--optimizers", "SGD")
    assert "| SGD |" in output


def test_gpu_script_runs_on_the_cpu_with_a_few_steps(cifar_root):
    output = _run("gpu_paper_run.py", "--device", "cpu", "--root", str(cifar_root), "--train-size", "128",
                  "--steps", "2", "--warmup", "1", "--sync-steps", "0")
    assert "| LABPAL-NSGD |" in output and "| SGD |" in output and "min | not checked |" in output


def test_regression_study_prints_every_variant_against_tuned_sgd():
    output = _run("regression_study.py", "--seeds", "1", "--steps", "20")
    assert "| 0.1 |" in output and "| 0.003 |" in output
    assert "| LabPal (paper defaults: α 1.8, s_max 1) |" in output and "| 1.00 [1.00, 1.00] |" in output
    assert "| research code, α 0.9 |" in output and "| LabPal, s_max 0.5 (research α 0.9's clip) |" in output


def test_grid_throughput_prints_both_launchers_and_their_speed_up():
    output = _run("grid_throughput.py", "--steps", "2", "--seeds", "1", "--rounds", "1", "--startups", "1")
    assert "4-run digits grid, 2 steps a run" in output
    assert re.search(r"^\| parallel = 1 \| [\d.]+ \| \d+ \| 1\.00× \|$", output, re.MULTILINE)
    assert re.search(r"^\| parallel = 2 \| [\d.]+ \| \d+ \| [\d.]+× \|$", output, re.MULTILINE)
    assert re.search(r"^command to first training step of a child run: median [\d.]+ s \(of [\d.]+ s\)$", output,
                     re.MULTILINE)  # fmt: skip
