"""Steps per second of the full trainer next to a minimal hand-written loop, on real CIFAR-10.

For LABPAL and for SGD, two copies of the same experiment are built from its preset
(configs/cifar10_resnet20_lab_pal_nsgd.txt, configs/cifar10_resnet20_sgd.txt) with the same
seed, so both have the same ResNet-20, optimizer, schedule and data:

- trainer: ``Trainer.train`` as ``main.py`` runs it (batches from the data pipeline, closures,
           metrics, logging, TensorBoard, divergence watch, progress), without evaluations
- bare:    a for loop over the same in-memory uint8 training images that crops, flips and
           normalises each batch and calls the optimizer, and nothing else

They alternate in rounds of ``--steps`` steps, so both see the same machine load and reach
LABPAL's measurements at the same steps; the table gives the median seconds per step and the
ratio trainer steps/s ÷ bare steps/s.

    python bench/trainer_overhead.py                       # 5 rounds of 20 steps, 1 thread
    python bench/trainer_overhead.py --rounds 3 --steps 40 --root DIR
"""

import argparse
import contextlib
import io
import pathlib
import statistics
import sys
import tempfile
import time


REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from source.data.sampling import batches_per_epoch, epoch_plan  # noqa: E402
from source.optimizer import LineSearch, make_batch_closure  # noqa: E402
from source.registries import load_configuration  # noqa: E402
from source.training import RunFolder, Trainer, build_experiment  # noqa: E402

PRESETS = {"LABPAL-NSGD": "cifar10_resnet20_lab_pal_nsgd.txt", "SGD": "cifar10_resnet20_sgd.txt"}


def bare_loop(experiment):
    """A function that trains ``experiment`` for n more steps with a hand-written loop."""
    split = experiment.splits.train
    images, targets = split.store.inputs[split.indices], split.store.targets[split.indices]
    augmentation, normalisation = split.augmentation, split.normalisation
    model, optimizer, loss_function = experiment.model, experiment.optimizer, experiment.loss_function
    schedule, batch_size, seed = experiment.schedule, experiment.settings.batch_size, 0
    steps_per_epoch = batches_per_epoch(len(images), batch_size)
    position = {"step": 0}

    def train(steps):
        for _ in range(steps):
            epoch, batch = divmod(position["step"], steps_per_epoch)
            plan = epoch_plan(len(images), seed, epoch, augmentation.padding)
            rows = slice(batch * batch_size, (batch + 1) * batch_size)
            inputs = normalisation(augmentation(images[plan.indices[rows]], plan.offsets[rows], plan.flips[rows]))
            labels = targets[plan.indices[rows]]
            if isinstance(optimizer, LineSearch):
                optimizer.step(make_batch_closure(model, loss_function, inputs, labels))
            else:
                optimizer.zero_grad(set_to_none=True)
                loss_function(model(inputs), labels).backward()
                optimizer.step()
                schedule.step()
            position["step"] += 1

    return train


def trainer_loop(experiment, folder):
    """A function that trains ``experiment`` for n more steps with the Trainer, its output swallowed."""
    run_folder = RunFolder(pathlib.Path(folder))
    run_folder.path.mkdir(parents=True)
    trainer = Trainer(experiment, run_folder)

    def train(steps):
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train(stop_after_steps=steps)

    return train


def seconds_per_step(train, steps):
    start = time.perf_counter()
    train(steps)
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data", help="folder holding cifar-10-batches-py (default: data)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per contender and round (default: 20)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-size", default="preset", help="training samples (default: the paper's 40,000)")
    parser.add_argument("--optimizers", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    options = parser.parse_args()

    print(f"CIFAR-10, ResNet-20, batch 128, {options.threads} thread(s), {options.rounds} rounds of "
          f"{options.steps} steps each, alternating; evaluation excluded")
    print("| optimizer | trainer s/step | bare s/step | trainer ÷ bare (steps/s) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name in options.optimizers:
            overrides = [
                f"data.root={options.root}",
                f"data.train_size={options.train_size}",
                f"experiment.cpu_threads={options.threads}",
                f"experiment.runs_folder={scratch}",
                "experiment.device=cpu",
                "training.evaluate_every_steps=1000000",
                "training.training_steps=1000000",
                "logging.progress_bar=false",
            ]
            configurations = [load_configuration(REPOSITORY / "configs" / PRESETS[name], overrides) for _ in range(2)]
            trainer = trainer_loop(build_experiment(configurations[0]), pathlib.Path(scratch) / name)
            bare = bare_loop(build_experiment(configurations[1]))
            times = {"trainer": [], "bare": []}
            for round_number in range(options.rounds):
                contenders = [("trainer", trainer), ("bare", bare)]
                for label, train in contenders if round_number % 2 == 0 else contenders[::-1]:
                    times[label].append(seconds_per_step(train, options.steps))
                print(f"{name}: round {round_number + 1}/{options.rounds} done", file=sys.stderr)
            trainer_time, bare_time = statistics.median(times["trainer"]), statistics.median(times["bare"])
            print(f"| {name} | {trainer_time:.4f} | {bare_time:.4f} | {bare_time / trainer_time:.3f} |")


if __name__ == "__main__":
    main()
