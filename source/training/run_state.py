"""Where a run stands, as its checkpoints record it: one owner for last.pt's keys and the run's outcome.

last.pt holds the run's state (``RunState``: step, best validation, test, elapsed time,
divergence) beside the training state of its parts (model, optimizer and schedule, random
generators, running metrics, divergence counters), whose keys ``LAST_KEYS`` lists; best.pt holds
``BEST_KEYS``. ``read_last_checkpoint`` reads last.pt and checks it against the experiment.
"""

from dataclasses import dataclass

from source.errors import UserError
from source.quality_metric import quality_metric
from source.training.checkpoint_contents import check_last_checkpoint
from source.training.checkpoints import read_checkpoint

__all__ = ["BEST_KEYS", "LAST_KEYS", "RunOutcome", "RunState", "read_last_checkpoint"]

LAST_KEYS = (
    "step",
    "model",
    "optimizer",
    "schedule",
    "random_state",
    "best",
    "training_window",
    "evaluation_interval",
    "metrics_offset",
    "elapsed_seconds",
    "finished",
    "test",
)
"""What last.pt holds (besides the divergence counters and mark, which older checkpoints lack)."""

BEST_KEYS = ("step", "model", "validation")
"""What best.pt holds."""


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: at which step, whether it finished, its test result, and why it stopped early.

    ``diverged`` is the message of a run that diverged; ``stopped_by_signal`` the number of the
    signal (SIGINT, SIGTERM) that stopped an unfinished run.
    """

    step: int
    finished: bool
    test: dict | None
    best_step: int | None
    best_validation: dict | None
    diverged: str | None = None
    stopped_by_signal: int | None = None


@dataclass
class RunState:
    """The run's progress and results: ``step`` done, ``best`` validation ({"step", "validation"}),
    ``finished`` with its ``test`` result, ``elapsed_seconds`` of training, and ``diverged``
    ({"step", "reason"}) once it diverged."""

    step: int = 0
    best: dict | None = None
    finished: bool = False
    test: dict | None = None
    elapsed_seconds: float = 0.0
    diverged: dict | None = None

    @classmethod
    def from_dict(cls, checkpoint):
        """The state a checkpoint (checked by ``read_last_checkpoint``) records."""
        return cls(
            step=checkpoint["step"],
            best=checkpoint["best"],
            finished=checkpoint["finished"],
            test=checkpoint["test"],
            elapsed_seconds=checkpoint["elapsed_seconds"],
            diverged=checkpoint.get("diverged"),
        )

    def to_dict(self):
        """The state by checkpoint key."""
        return {
            "step": self.step,
            "best": self.best,
            "finished": self.finished,
            "test": self.test,
            "elapsed_seconds": self.elapsed_seconds,
            "diverged": self.diverged,
        }

    def outcome(self, stopped_by_signal=None):
        """The run's outcome now; ``stopped_by_signal`` counts only for a run neither finished nor diverged."""
        return RunOutcome(
            step=self.step,
            finished=self.finished,
            test=self.test,
            best_step=self.best["step"] if self.best else None,
            best_validation=self.best["validation"] if self.best else None,
            diverged=self.diverged["reason"] if self.diverged else None,
            stopped_by_signal=stopped_by_signal if not (self.finished or self.diverged) else None,
        )


def read_last_checkpoint(path, experiment, fresh_states):
    """last.pt (or last.previous.pt) at ``path``, read and checked against ``experiment`` and the
    ``fresh_states`` of a new training loop; ``UserError`` when it does not fit."""
    checkpoint = read_checkpoint(path, LAST_KEYS)
    quality, _ = quality_metric(experiment.splits.task)
    check_last_checkpoint(checkpoint, experiment, fresh_states, quality, path)
    if not isinstance(checkpoint.get("configuration", {}), (dict, type(None))):
        raise UserError(f"cannot use the checkpoint {path}: its record of the run's configuration is damaged")
    return checkpoint
