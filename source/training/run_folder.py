"""The run folder ``<runs_folder>/<experiment name>/`` and the rules for starting or resuming in it.

A new run never reuses a folder: if it exists, the run stops with a message to pass --resume
or to choose another experiment name. A resumed run must have the configuration the folder was
started with, except for keys that do not change the experiment's results (see ``RESUMABLE``).
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

from source.configuration import differing_keys, format_configuration, key_label, load_configuration
from source.errors import UserError
from source.training.checkpoints import write_text_atomically

__all__ = ["RESUMABLE", "RunFolder"]

RESUMABLE = {
    ("experiment", "device"),
    ("experiment", "label"),
    ("experiment", "cpu_threads"),
    ("experiment", "runs_folder"),
    ("data", "root"),
    ("data", "download"),
    ("data", "num_workers"),
    ("training", "training_steps"),
    ("training", "evaluation_batch_size"),
    ("logging", "tensorboard"),
    ("logging", "progress_bar"),
    ("logging", "log_every_steps"),
    ("logging", "plots_folder"),
}
"""(section, key) pairs a resumed run may change: where and how it runs, how long, what it logs."""


@dataclass(frozen=True)
class RunFolder:
    """Where one run's files live."""

    path: Path

    @classmethod
    def of(cls, configuration):
        """The run folder a configuration names: <runs_folder>/<experiment name>."""
        experiment = configuration["experiment"]
        return cls(Path(experiment["runs_folder"]) / experiment["name"])

    @property
    def configuration_path(self):
        """The resolved configuration the run was started (or last resumed) with."""
        return self.path / "configuration.txt"

    @property
    def metrics_path(self):
        """The JSON-lines metrics file."""
        return self.path / "metrics.jsonl"

    @property
    def last_checkpoint_path(self):
        """The checkpoint a resume continues from (saved at every evaluation and at the end)."""
        return self.path / "last.pt"

    @property
    def best_checkpoint_path(self):
        """The weights with the best validation metric so far."""
        return self.path / "best.pt"

    def event_files(self):
        """The TensorBoard event files, oldest first."""
        return sorted(self.path.glob("events.out.tfevents.*"))

    def check_can_start(self, configuration, resume):
        """Raise ``UserError`` unless a new run may start here (or, with ``resume``, continue here)."""
        if not resume:
            if self.path.exists():
                raise UserError(
                    f"{self.path} already exists: continue that run with --resume, or start a new one "
                    "under another name with --set experiment.name=NAME"
                )
            return
        if not self.configuration_path.is_file():
            if self.path.exists():
                raise UserError(f"cannot resume {self.path}: it has no configuration.txt, so it is not a run folder")
            raise UserError(f"cannot resume {self.path}: it does not exist; start the run without --resume")
        stored = load_configuration(self.configuration_path)
        changed = [
            key_label(path[:-1], path[-1]) for path in differing_keys(stored, configuration) if path not in RESUMABLE
        ]
        if changed:
            raise UserError(
                f"cannot resume {self.path}: {', '.join(changed)} differ from its configuration.txt; "
                f"resume with --config {self.configuration_path}"
            )

    def create(self):
        """Make the folder (and its parents) for a new run."""
        self.path.mkdir(parents=True, exist_ok=False)

    def remove(self):
        """Delete the folder and everything in it (a new run that failed before its first step)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def write_configuration(self, configuration):
        """Store the resolved configuration (file, overrides and defaults) in the folder."""
        header = [
            f"Resolved configuration of the run in {self.path}: {configuration.source},",
            "the --set overrides and the defaults of source/configuration/configspec.ini.",
            f"Resume it with: python main.py --config {self.configuration_path} --resume",
        ]
        write_text_atomically(format_configuration(configuration, header), self.configuration_path)
