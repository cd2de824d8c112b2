"""The paper's CIFAR-10 / ResNet-20 run on one GPU: steps/s, data vs model time, projected wall time.

For LABPAL-NSGD and SGD (configs/cifar10_resnet20_lab_pal_nsgd.txt, configs/cifar10_resnet20_sgd.txt,
with the machine's "auto" choices: device pipeline, channels-last; float32 as in the paper unless
``--autocast bfloat16``) it trains
``--steps`` steps with the Trainer after ``--warmup`` steps, and prints:

- steps/s of training (LABPAL's measurements in that stretch included, evaluations excluded);
- seconds per step spent making batches (the data pipeline alone, timed separately) and the rest
  (model and optimizer);
- seconds per evaluation of the validation split;
- the projected wall time of the paper's 150,000 steps with an evaluation every epoch;
- the host synchronisations inside training steps, counted with
  ``torch.cuda.set_sync_debug_mode("warn")`` over ``--sync-steps`` steps without log intervals
  (LABPAL's measurements may synchronise: they decide on the host whether a fit is usable).

Runs in under 5 minutes on one GPU with the defaults. On the CPU (``--device cpu``) it runs the same
code with a small step count, which the tests do on tiny CIFAR-10 files.

    python bench/gpu_paper_run.py                                # cuda, 2,000 steps each
    python bench/gpu_paper_run.py --device cpu --steps 5 --warmup 2 --sync-steps 0
"""

import argparse
import contextlib
import io
import pathlib
import sys
import tempfile
import time
import warnings

import torch

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from source.registries import load_configuration  # noqa: E402
from source.training import RunFolder, Trainer, build_experiment  # noqa: E402

PRESETS = {"LABPAL-NSGD": "cifar10_resnet20_lab_pal_nsgd.txt", "SGD": "cifar10_resnet20_sgd.txt"}
PAPER_STEPS = 150_000


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, work):
    """Seconds ``work()`` takes, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def data_seconds_per_step(batches, steps, device):
    """Seconds per batch of the training pipeline alone."""

    def make():
        made = 0
        for epoch in range(steps // batches.steps_per_epoch + 1):
            for _ in batches.epoch(epoch):
                made += 1
                if made == steps:
                    return

    return timed(device, make) / steps


def count_synchronisations(trainer, steps):
    """Host synchronisations in ``steps`` training steps without log intervals or evaluations."""
    experiment = trainer.experiment
    batches = experiment.data.training
    epoch, first = divmod(trainer.state.step, experiment.steps_per_epoch)
    recorded = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for count, (inputs, targets, key) in enumerate(batches.epoch(epoch, first)):
                if count == steps:
                    break
                with trainer._autocast():
                    experiment.stepper.step(inputs, targets, key)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        recorded = [f"{pathlib.Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return recorded


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data", help="folder holding cifar-10-batches-py (default: data)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--sync-steps", type=int, default=50)
    parser.add_argument("--train-size", default="preset", help="training samples (default: the paper's 40,000)")
    parser.add_argument("--optimizers", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--autocast", default="none", choices=["none", "bfloat16"],
                        help="forward passes' precision (default: none, float32 as in the paper)")
    options = parser.parse_args()
    device = torch.device(options.device)
    name_of_device = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name_of_device}; torch {torch.__version__}; {options.steps} timed steps after {options.warmup}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in options.optimizers:
            overrides = [
                f"data.root={options.root}",
                f"data.train_size={options.train_size}",
                f"experiment.device={options.device}",
                f"experiment.autocast={options.autocast}",
                f"experiment.runs_folder={scratch}",
                "training.evaluate_every_steps=1000000",
                "training.training_steps=1000000",
                "logging.progress_bar=false",
            ]
            configuration = load_configuration(REPOSITORY / "configs" / PRESETS[name], overrides)
            experiment = build_experiment(configuration)
            run_folder = RunFolder(pathlib.Path(scratch) / name)
            run_folder.create(configuration).release()
            trainer = Trainer(experiment, run_folder)
            with contextlib.redirect_stdout(io.StringIO()):
                trainer.train(stop_after_steps=options.warmup)
                training_seconds = timed(device, lambda: trainer.train(stop_after_steps=options.steps))
            step_seconds = training_seconds / options.steps
            data_seconds = data_seconds_per_step(experiment.data.training, options.steps, device)
            evaluation_seconds = timed(device, lambda: trainer._evaluate(experiment.data.validation))
            evaluations = PAPER_STEPS // experiment.steps_per_epoch
            projected = PAPER_STEPS * step_seconds + evaluations * evaluation_seconds
            synchronisations = (
                count_synchronisations(trainer, options.sync_steps)
                if device.type == "cuda" and options.sync_steps
                else None
            )
            rows.append((name, step_seconds, data_seconds, evaluation_seconds, projected, synchronisations))
            print(
                f"{name}: pipeline {experiment.data.kind}, autocast {configuration['experiment']['autocast']}, "
                f"channels_last {configuration['experiment']['channels_last']}",
                file=sys.stderr,
            )
    print("| optimizer | steps/s | data s/step | model s/step | s/evaluation | projected 150,000 steps | syncs |")
    print("|---|---|---|---|---|---|---|")
    for name, step_seconds, data_seconds, evaluation_seconds, projected, synchronisations in rows:
        syncs = "not checked" if synchronisations is None else f"{len(synchronisations)} in {options.sync_steps} steps"
        print(
            f"| {name} | {1 / step_seconds:.1f} | {data_seconds:.5f} | {step_seconds - data_seconds:.5f} | "
            f"{evaluation_seconds:.3f} | {projected / 60:.1f} min | {syncs} |"
        )
    for name, *_, synchronisations in rows:
        if synchronisations:
            print(f"{name} synchronised at: {', '.join(sorted(set(synchronisations)))}")


if __name__ == "__main__":
    main()
