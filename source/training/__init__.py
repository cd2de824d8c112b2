"""Training: build the experiment, run the step-based loop in its run folder, log and checkpoint.

``run_experiment(configuration)`` is the whole of it; the modules hold the pieces (experiment
building, data order, evaluation, checkpoints, metric logs, run folder, losses).
"""

from source.training.experiment import Experiment, build_experiment, build_optimizer_and_schedule
from source.training.run_folder import RunFolder
from source.training.run_state import RunOutcome
from source.training.runner import run_experiment
from source.training.trainer import Trainer

__all__ = [
    "Experiment",
    "RunFolder",
    "RunOutcome",
    "Trainer",
    "build_experiment",
    "build_optimizer_and_schedule",
    "run_experiment",
]

