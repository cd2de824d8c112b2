"""The [launcher] section: where the runs of a grid go, checked before anything runs.

``name = local`` trains in this process (``parallel = 1``) or in ``parallel`` child processes;
``name = slurm`` submits one SLURM job per run through submitit. Several configuration files
launched together share one launcher, so their [launcher] sections must agree.
"""

import os
import re
from dataclasses import dataclass, field

from source.errors import UserError

__all__ = ["LAUNCHER", "LauncherSettings", "import_submitit", "read_launcher"]

LAUNCHER = "launcher"
AUTOMATIC = "auto"
_NO_LIMIT = "none"
_SBATCH_OPTION = re.compile(r"[a-z][a-z0-9_-]*")
CORES_PER_CPU_RUN = 2
"""parallel = auto on a CPU: one run per this many cores."""


@dataclass(frozen=True)
class LauncherSettings:
    """The typed [launcher] section (see configspec.ini and configuration_lab_pal.txt)."""

    name: str = "local"
    parallel: object = 1
    runs_per_device: int = 1
    partition: str = ""
    time_minutes: int = 240
    gpus_per_run: object = AUTOMATIC
    cpus_per_run: int = 1
    memory_gb: object = _NO_LIMIT
    account: str = ""
    qos: str = ""
    constraint: str = ""
    sbatch_options: dict = field(default_factory=dict)

    def parallel_runs(self, gpus):
        """How many runs train at once on this machine with ``gpus`` visible GPUs."""
        if self.parallel != AUTOMATIC:
            return self.parallel
        if gpus:
            return gpus * self.runs_per_device
        return max(1, (os.cpu_count() or 1) // CORES_PER_CPU_RUN)

    def gpus_for(self, run_configuration):
        """The GPUs a SLURM job of this run asks for: gpus_per_run, or 1 for a CUDA run and 0 otherwise."""
        if self.gpus_per_run != AUTOMATIC:
            return self.gpus_per_run
        return 1 if run_configuration.settings.experiment.device.startswith("cuda") else 0


def import_submitit(where):
    """The submitit module; ``UserError`` saying how to install it when it is missing."""
    try:
        import submitit
    except ImportError:
        raise UserError(f"{where} = slurm needs the submitit package: pip install submitit") from None
    return submitit


def read_launcher(configurations):
    """The ``LauncherSettings`` of configurations launched together; ``UserError`` for a bad or
    disagreeing [launcher] section, or ``name = slurm`` without submitit."""
    first = configurations[0]
    for other in configurations[1:]:
        if other[LAUNCHER] != first[LAUNCHER]:
            raise UserError(
                f"{other.where(LAUNCHER)} differs from {first.where(LAUNCHER)}: configurations launched together "
                "go through one launcher; give the same [launcher] keys, e.g. with --set launcher.KEY=VALUE"
            )
    section = first[LAUNCHER]
    for key in section["sbatch_options"]:
        if not _SBATCH_OPTION.fullmatch(key):
            raise UserError(
                f"{first.where(LAUNCHER, 'sbatch_options')}: {key!r} is not an sbatch option name; write an "
                "option such as --mail-type=END as mail_type = END"
            )
    settings = LauncherSettings(**section)
    if settings.name == "slurm":
        import_submitit(first.where(LAUNCHER, "name"))
    return settings
