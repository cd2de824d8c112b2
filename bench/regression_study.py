"""LABPAL on regression with the squared loss, against tuned SGD and against the research code's steps.

scikit-learn's diabetes data (283 training patients, 10 features, one standardised target), the
MLP 10-64-64-1, inference batches of 32, 600 steps, LABPAL-NSGD with the paper's defaults unless a
variant says otherwise. The noise adaptation factor is (128/32)·(283/40000) ≈ 0.03, so k = 1
throughout, and LABPAL measures at update 0 and at update 400 (then every 1,000 updates).

Each seed fixes the model's initialisation and the batch order, shared by every contender. For each
seed, the reference is the lowest final training MSE of SGD with momentum 0.9 at the learning rates
0.1, 0.03, 0.01 and 0.003; a contender's score is its final training MSE (the whole training split,
after the last step) divided by that reference. The table gives, over the seeds, the geometric mean
of the score, its geometric standard deviation, its minimum and maximum, and the geometric mean of
the paired ratio to LabPal with the paper's defaults with a ±2 standard-error interval; then the
research code's runs paired with their exact-fit equivalents.

The variants isolate the differences from the research code that act in this setting (k = 1, no
momentum, no BatchNorm, NSGD, finite losses; README, "How this implementation differs from the
research code"): its fit, whose step is 2s* − h, so that α = 0.9 halves its step, but whose clip
at s_max = 1 acts on that doubled step, that is at s* = 0.5 (item 1); its cap, which a clip
multiplies by α (item 2); and its timing, which measures after the untrustworthy phase at update
U + 2 = 402 instead of 400 (item 3; within 600 steps ``untrustworthy_updates=402`` gives our
optimizer the same timing).

    OMP_NUM_THREADS=1 python bench/regression_study.py              # 16 seeds, about 2 minutes
    OMP_NUM_THREADS=1 python bench/regression_study.py --seeds 48   # the README's table
"""

import argparse
import math
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from source.data import build_datasets  # noqa: E402
from source.data.sampling import batches_per_epoch, epoch_plan  # noqa: E402
from source.models import build_model  # noqa: E402
from source.optimizer import LabPal, make_batch_closure  # noqa: E402
from source.training.losses import mean_squared_error  # noqa: E402

SGD_LEARNING_RATES = (0.1, 0.03, 0.01, 0.003)
SGD_MOMENTUM = 0.9

#: (label, LabPal arguments beyond the data-dependent ones); the first is the paired reference.
LAB_PAL_VARIANTS = (
    ("LabPal (paper defaults: α 1.8, s_max 1)", {}),
    ("research code as shipped (α 1.8)", dict(research_code_steps=True)),
    ("research code, α 0.9", dict(research_code_steps=True, step_adaptation=0.9)),
    ("LabPal, research timing (U + 2)", dict(untrustworthy_updates=402)),
    ("LabPal, s_max 0.5 (research α 0.9's clip)", dict(max_step=0.5)),
    ("LabPal, s_max 0.5 and research timing", dict(max_step=0.5, untrustworthy_updates=402)),
    ("LabPal, α 3.6, s_max 0.5, research timing", dict(step_adaptation=3.6, max_step=0.5, untrustworthy_updates=402)),
    ("LabPal, α 0.9", dict(step_adaptation=0.9)),
    ("LabPal, α 1.2", dict(step_adaptation=1.2)),
)

#: (research code variant, ours with its clip and timing): they differ in its cap (item 2), rounding and α·h.
EXACT_FIT_EQUIVALENTS = (
    ("research code, α 0.9", "LabPal, s_max 0.5 and research timing"),
    ("research code as shipped (α 1.8)", "LabPal, α 3.6, s_max 0.5, research timing"),
)


def training_batches(split, seed: int, batch_size: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``steps`` full batches of the epochs that seed ``seed`` orders, in the data pipelines' order."""
    full_batches = batches_per_epoch(len(split), batch_size)
    batches = []
    epoch = 0
    while len(batches) < steps:
        order = epoch_plan(len(split), seed, epoch, 0).indices
        for start in range(0, full_batches * batch_size, batch_size):
            batches.append(split.batch(order[start : start + batch_size]))
        epoch += 1
    return batches[:steps]


def training_mse(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return mean_squared_error(model(inputs), targets).item()


def train_sgd(seed: int, learning_rate: float, batches, whole_split) -> float:
    torch.manual_seed(seed)
    model = build_model("mlp", 1, (10,))
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=SGD_MOMENTUM)
    for inputs, targets in batches:
        optimizer.zero_grad()
        mean_squared_error(model(inputs), targets).backward()
        optimizer.step()
    return training_mse(model, *whole_split)


def train_lab_pal(seed: int, arguments: dict, batches, whole_split) -> tuple[float, list[float], int]:
    """Final training MSE, the measured step sizes and the number of failed measurements."""
    torch.manual_seed(seed)
    model = build_model("mlp", 1, (10,))
    inputs, _ = whole_split
    optimizer = LabPal(
        model.parameters(), training_set_size=len(inputs), inference_batch_size=len(batches[0][0]), **arguments
    )
    for batch_inputs, batch_targets in batches:
        optimizer.step(make_batch_closure(model, mean_squared_error, batch_inputs, batch_targets))
    steps = [event["step_size"] for event in optimizer.take_events() if event["event"] == "measurement"]
    return training_mse(model, *whole_split), steps, optimizer.summary.failed_measurements


def geometric_summary(ratios: list[float]) -> tuple[float, float]:
    """Geometric mean and geometric standard deviation (1 for a single value)."""
    logs = [math.log(ratio) for ratio in ratios]
    spread = statistics.stdev(logs) if len(logs) > 1 else 0.0
    return math.exp(statistics.fmean(logs)), math.exp(spread)


def paired_interval(ratios: list[float]) -> str:
    """Geometric mean of paired ratios with a ±2 standard-error interval, e.g. '0.62 [0.51, 0.75]'."""
    logs = [math.log(ratio) for ratio in ratios]
    mean = statistics.fmean(logs)
    error = 2 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else 0.0
    return f"{math.exp(mean):.2f} [{math.exp(mean - error):.2f}, {math.exp(mean + error):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=16, help="seeds 0 .. N-1 (default 16)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    options = parser.parse_args()
    torch.set_num_threads(1)

    train = build_datasets("diabetes", ".").train
    whole_split = train.batch(torch.arange(len(train)))
    sgd_mse = {learning_rate: [] for learning_rate in SGD_LEARNING_RATES}
    lab_pal_mse = {label: [] for label, _ in LAB_PAL_VARIANTS}
    measured_steps = {label: [] for label, _ in LAB_PAL_VARIANTS}
    failures = dict.fromkeys(lab_pal_mse, 0)
    initial_mse = []
    started = time.perf_counter()
    for seed in range(options.seeds):
        batches = training_batches(train, seed, options.batch_size, options.steps)
        torch.manual_seed(seed)
        initial_mse.append(training_mse(build_model("mlp", 1, (10,)), *whole_split))
        for learning_rate in SGD_LEARNING_RATES:
            sgd_mse[learning_rate].append(train_sgd(seed, learning_rate, batches, whole_split))
        for label, arguments in LAB_PAL_VARIANTS:
            mse, steps, failed = train_lab_pal(seed, arguments, batches, whole_split)
            lab_pal_mse[label].append(mse)
            measured_steps[label] += steps
            failures[label] += failed
        print(f"seed {seed + 1}/{options.seeds} done, {time.perf_counter() - started:.0f} s", file=sys.stderr)

    best_sgd = [min(values) for values in zip(*sgd_mse.values())]
    print(f"diabetes, MLP 10-64-64-1, {len(train)} training patients, b = {options.batch_size}, "
          f"{options.steps} steps, {options.seeds} seeds; score = final training MSE ÷ the seed's best SGD "
          f"(momentum {SGD_MOMENTUM}); training MSE at initialisation: geo. mean "
          f"{geometric_summary(initial_mse)[0]:.3f}\n")
    print("| SGD learning rate | final training MSE, geo. mean | best at seeds |")
    print("| --- | --- | --- |")
    for learning_rate, values in sgd_mse.items():
        wins = sum(value == best for value, best in zip(values, best_sgd))
        print(f"| {learning_rate} | {geometric_summary(values)[0]:.4f} | {wins} |")
    print()
    reference = lab_pal_mse[LAB_PAL_VARIANTS[0][0]]
    print("| variant | final training MSE, geo. mean | score, geo. mean | geo. std | min | max "
          "| ÷ LabPal, geo. mean [±2 s.e.] | measured steps, median | failed measurements |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, values in lab_pal_mse.items():
        scores = [value / best for value, best in zip(values, best_sgd)]
        mean, spread = geometric_summary(scores)
        paired = paired_interval([value / other for value, other in zip(values, reference)])
        median_step = statistics.median(measured_steps[label]) if measured_steps[label] else float("nan")
        print(f"| {label} | {geometric_summary(values)[0]:.4f} | {mean:.2f} | {spread:.2f} | {min(scores):.2f} "
              f"| {max(scores):.2f} | {paired} | {median_step:.3f} | {failures[label]} |")
    steps = measured_steps[LAB_PAL_VARIANTS[0][0]]
    above = sum(step > 0.9 for step in steps)
    print(f"\nLabPal's measured steps above 0.9 (s* > 0.5, where the research code's α 0.9 clips): "
          f"{above} of {len(steps)}")
    for research, equivalent in EXACT_FIT_EQUIVALENTS:
        ratios = [value / other for value, other in zip(lab_pal_mse[research], lab_pal_mse[equivalent])]
        print(f"{research} ÷ {equivalent}: {paired_interval(ratios)}")


if __name__ == "__main__":
    main()
