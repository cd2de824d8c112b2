"""LabPal's speed next to SGD with momentum on a CIFAR ResNet-20, batch 128.

Both optimizers train their own copy of the model on the same in-memory batches,
step by step in alternation (each going first every other step), so that both see
the same machine load; each step is
timed including the model's forward and backward passes. Prints steps per second
in LabPal's training phase (between measurements) and the whole-run time ratio
with LabPal's measurements included.

    python bench/lab_pal_speed.py               # 2,000 steps: measurements at 0, 400, 1400
    python bench/lab_pal_speed.py --steps 500   # measurements at 0 and 400 updates
"""

import argparse
import copy
import pathlib
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from source.models import build_model  # noqa: E402
from source.optimizer import LabPal, make_batch_closure  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    options = parser.parse_args()
    device = torch.device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)

    torch.manual_seed(0)
    batches = [
        (torch.randn(options.batch_size, 3, 32, 32), torch.randint(0, 10, (options.batch_size,)))
        for _ in range(20)
    ]
    lab_pal_model = build_model("resnet20", 10, (3, 32, 32)).to(device)
    sgd_model = copy.deepcopy(lab_pal_model)
    loss_function = nn.CrossEntropyLoss()
    lab_pal = LabPal(lab_pal_model.parameters(), buffers=lab_pal_model.buffers())
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9)

    def sgd_step(inputs, targets):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        sgd.zero_grad()
        loss = loss_function(sgd_model(inputs), targets)
        loss.backward()
        sgd.step()

    def lab_pal_step(inputs, targets):
        lab_pal.step(make_batch_closure(lab_pal_model, loss_function, inputs, targets, device))

    totals = {"sgd": 0.0, "lab_pal": 0.0}
    training_phase = {"sgd": 0.0, "lab_pal": 0.0}
    training_phase_steps = 0
    started = time.perf_counter()
    for step in range(options.steps):
        inputs, targets = batches[step % len(batches)]
        phase_before = lab_pal.summary.phase
        durations = {}
        order = (("lab_pal", lab_pal_step), ("sgd", sgd_step))
        for name, run_step in order if step % 2 == 0 else order[::-1]:  # neither always runs first
            synchronize(device)
            begin = time.perf_counter()
            run_step(inputs, targets)
            synchronize(device)
            durations[name] = time.perf_counter() - begin
            totals[name] += durations[name]
        if phase_before == lab_pal.summary.phase == "training":
            training_phase_steps += 1
            for name in durations:
                training_phase[name] += durations[name]
        if (step + 1) % 100 == 0:
            elapsed = time.perf_counter() - started
            print(f"step {step + 1}/{options.steps}  elapsed {elapsed:.0f} s  so far: training-phase ratio "
                  f"{training_phase['sgd'] / training_phase['lab_pal']:.3f}, whole-run ratio "
                  f"{totals['sgd'] / totals['lab_pal']:.3f}", file=sys.stderr, flush=True)

    summary = lab_pal.summary
    print(f"device {device}, {torch.get_num_threads()} threads, ResNet-20, batch {options.batch_size}, "
          f"{options.steps} steps")
    print(f"LabPal measurements: {summary.measurements} (failed {summary.failed_measurements})")
    print(f"training phase, steps/s:  LabPal {training_phase_steps / training_phase['lab_pal']:.3f}   "
          f"SGD {training_phase_steps / training_phase['sgd']:.3f}   "
          f"ratio {training_phase['sgd'] / training_phase['lab_pal']:.3f} (target >= 0.97)")
    print(f"whole run, seconds:      LabPal {totals['lab_pal']:.1f}   SGD {totals['sgd']:.1f}   "
          f"ratio {totals['sgd'] / totals['lab_pal']:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
