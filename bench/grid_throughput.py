"""Wall time of an 8-run digits grid trained one run after another and two at a time, side by side.

The grid: LABPAL-NSGD, LABPAL-SGD, SGD and Adam on scikit-learn's digits with the small CNN,
two seeds each (``--seeds``), ``--steps`` steps a run. ``parallel = 1`` trains the runs one after another in
one process with every core; ``parallel = 2`` trains two at a time in child processes with the
cores divided between them; the two alternate in rounds, so that both see the same machine load.
Both write the same results (the tests check that); the table gives the median wall time of each
and the speed-up, and the time from command to first training step of a child run (process
start, imports, data, model), which every child pays again.

    python bench/grid_throughput.py                  # 8 runs of 1,500 steps
    python bench/grid_throughput.py --steps 200 --rounds 3
    python bench/grid_throughput.py --steps 2 --seeds 1 --startups 1   # does it run? (the tests)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]

GRID = """\
[experiment]
name = grid
cpu_threads = auto
device = cpu
[data]
name = digits
[model]
name = small_cnn
[training]
training_steps = {steps}
batch_size = 32
[logging]
progress_bar = false
tensorboard = false
log_every_steps = {log_every}
[comparison]
seeds = {seeds}
    [[lab_pal_nsgd]]
    label = LABPAL-NSGD
    optimizer = lab_pal
    [[lab_pal_sgd]]
    label = LABPAL-SGD
    optimizer = lab_pal
        [[[arguments]]]
        mode = SGD
    [[sgd]]
    label = SGD
    optimizer = sgd
        [[[arguments]]]
        lr = 0.1
    [[adam]]
    label = Adam
    optimizer = adam
"""


def _main_command(*arguments):
    return [sys.executable, str(REPOSITORY / "main.py"), *arguments]


def grid_seconds(workspace, parallel):
    """Wall time of ``python main.py --config grid.txt --set launcher.parallel=N`` in ``workspace``."""
    start = time.perf_counter()
    subprocess.run(
        _main_command("--config", "grid.txt", "--set", f"launcher.parallel={parallel}"),
        cwd=workspace,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def first_step_seconds(workspace):
    """Seconds from starting a child run (``main.py --config <run>/configuration.txt --resume``) to
    its first training record in metrics.jsonl; the run is stopped after that."""
    run = workspace / "runs" / "grid" / "sgd" / "seed_0"
    for name in ("metrics.jsonl", "last.pt", "best.pt", "last.previous.pt", "best.previous.pt"):
        (run / name).unlink(missing_ok=True)
    start = time.perf_counter()
    child = subprocess.Popen(
        _main_command("--config", str(run / "configuration.txt"), "--resume", "--set", "logging.log_every_steps=1",
                      "--stop-after-steps", "2"),
        cwd=workspace,
        stdout=subprocess.DEVNULL,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    metrics = run / "metrics.jsonl"
    while not (
        metrics.is_file()
        and any(json.loads(line)["split"] == "training" for line in metrics.read_text().splitlines()[:-1] or [])
    ):
        if child.poll() is not None:
            break
        time.sleep(0.002)
    seconds = time.perf_counter() - start
    child.wait()
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps of each run (default 1500)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of both launchers (default 1)")
    parser.add_argument("--startups", type=int, default=3, help="child start-ups timed (default 3)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of each of the 4 entries (default 2: 8 runs)")
    arguments = parser.parse_args()
    times = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as folder:
        # Alternating rounds, so that both launchers see the same machine load.
        for round_number in range(arguments.rounds):
            for parallel in (1, 2):
                workspace = Path(folder) / f"round_{round_number}_parallel_{parallel}"
                workspace.mkdir()
                seeds = ", ".join(map(str, range(arguments.seeds)))
                (workspace / "grid.txt").write_text(GRID.format(steps=arguments.steps, log_every=10, seeds=seeds))
                times[parallel].append(grid_seconds(workspace, parallel))
        startups = [first_step_seconds(Path(folder) / "round_0_parallel_2") for _ in range(arguments.startups)]
    times = {parallel: statistics.median(seconds) for parallel, seconds in times.items()}
    runs = 4 * arguments.seeds
    print(
        f"{runs}-run digits grid, {arguments.steps} steps a run, {os.cpu_count()} cores, "
        f"median of {arguments.rounds} rounds"
    )
    print()
    print("| launcher | wall time (s) | runs per hour | speed-up |")
    print("| --- | --- | --- | --- |")
    for parallel, seconds in times.items():
        print(f"| parallel = {parallel} | {seconds:.1f} | {runs * 3600 / seconds:.0f} | {times[1] / seconds:.2f}× |")
    print()
    print(f"command to first training step of a child run: median {statistics.median(startups):.2f} s "
          f"(of {', '.join(f'{value:.2f}' for value in startups)} s)")  # fmt: skip


if __name__ == "__main__":
    main()
