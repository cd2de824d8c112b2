"""Submit a grid's runs to SLURM through submitit: one job per run, the runs of a comparison as one job array.

Each job trains one run exactly as ``python main.py --config <run folder>/configuration.txt
--resume`` would, in the job's process (and, for a run with several GPUs, as one process per GPU
in the torchrun manner: submitit's tasks, joined by ``TorchDistributedEnvironment``). A job that is
preempted or reaches its time limit gets submitit's signal (SIGUSR2, 90 s before the end): the run
stops at its next step with a checkpoint, as after SIGTERM, and submitit requeues the job, which
continues from that checkpoint. A job requeued by SLURM itself (``scontrol requeue``, preemption
by requeue) gets SIGTERM, saves the same way and exits without a result, so that the requeued job
is the one that finishes. The job that finishes the last run of a comparison writes its results.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from source.files import FolderInUse
from source.launcher.grid import comparison_runs, run_state, test_result, write_comparison_results
from source.launcher.settings import LAUNCHER, import_submitit
from source.training import RunFolder

__all__ = ["RunJob", "submit_runs", "wait_for_jobs"]

REPOSITORY = Path(__file__).resolve().parents[2]
JOBS_FOLDER = "slurm"
"""In a comparison folder (or beside a single run's folder): submitit's job files and logs, per job id."""
_STOPPED_STATUSES = {128 + signal.SIGINT, 128 + signal.SIGTERM}
_FINISHED_STATUSES = {0, 3}
_POLL_SECONDS = 2.0


class RunFailed(RuntimeError):
    """A run that ended with an error; the job fails with this message."""


class RunJob:
    """The callable a SLURM job runs: one run, from its folder (submitit pickles it, with its paths)."""

    def __init__(self, configuration_path, comparison_folder, working_directory):
        self.configuration_path = str(configuration_path)
        self.comparison_folder = str(comparison_folder) if comparison_folder else None
        self.working_directory = str(working_directory)

    def __call__(self):
        submitit = import_submitit("[launcher] name")
        os.chdir(self.working_directory)
        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if str(REPOSITORY) not in sys.path:
            sys.path.insert(0, str(REPOSITORY))
        import main

        preempted = []
        requeue = signal.getsignal(signal.SIGUSR2)

        def stop_for_requeue(number, frame):
            # Once: a second SIGTERM would stop the run at once, without its checkpoint.
            if not preempted:
                os.kill(os.getpid(), signal.SIGTERM)
            preempted.append(number)

        signal.signal(signal.SIGUSR2, stop_for_requeue)
        failure_path = RunFolder(Path(self.configuration_path).parent).failure_path
        if environment.global_rank == 0:
            failure_path.unlink(missing_ok=True)
        status = main.main(["--config", self.configuration_path, "--resume", "--set", "logging.progress_bar=false"])
        if preempted and callable(requeue):
            requeue(signal.SIGUSR2, None)  # submitit: calls checkpoint(), requeues the job and exits
        if status in _STOPPED_STATUSES:
            sys.exit(status)  # no result: SLURM runs the requeued job, which resumes
        if environment.global_rank != 0:
            return status
        if status not in _FINISHED_STATUSES:
            message = f"exit status {status} (output: {environment.paths.stdout})"
            failure_path.write_text(message + "\n", encoding="utf-8")
            raise RunFailed(f"{self.configuration_path}: {message}")
        if self.comparison_folder and all(run_state(run).done for run in comparison_runs(self.comparison_folder)):
            try:
                write_comparison_results(Path(self.comparison_folder))
            except FolderInUse:
                pass  # the holder, a launcher waiting with --wait, writes them

        return status

    def checkpoint(self):
        """submitit's preemption hook: the run saved its checkpoint already; the same job resumes from it."""
        submitit = import_submitit("[launcher] name")
        return submitit.helpers.DelayedSubmission(self)


def _jobs_folder(run):
    base = run.comparison_folder if run.comparison_folder is not None else run.folder.path.parent
    return Path(base) / JOBS_FOLDER


def _parameters(settings, gpus, name):
    """submitit's AutoExecutor parameters for a job of ``gpus`` GPUs (one task per GPU)."""
    parameters = {
        "name": name,
        "timeout_min": settings.time_minutes,
        "nodes": 1,
        "tasks_per_node": max(1, gpus),
        "gpus_per_node": gpus,
        "cpus_per_task": settings.cpus_per_run,
    }
    # The job's Python unpickles RunJob: it must find this project wherever the job starts.
    for cluster in ("slurm", "local"):
        parameters[f"{cluster}_setup"] = [f"export PYTHONPATH={REPOSITORY}${{PYTHONPATH:+:$PYTHONPATH}}"]
    if settings.memory_gb != "none":
        parameters["mem_gb"] = settings.memory_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(settings, key):
            parameters[f"slurm_{key}"] = getattr(settings, key)
    if settings.sbatch_options:
        parameters["slurm_additional_parameters"] = dict(settings.sbatch_options)
    return parameters


def submit_runs(runs, settings, *, cluster="slurm"):
    """Write each run's folder and submit it; return [(run, job)]. ``cluster = "local"`` uses
    submitit's local executor, which runs the jobs as processes on this machine."""
    submitit = import_submitit(f"[{LAUNCHER}] name")
    groups = {}
    for run in runs:
        gpus = settings.gpus_for(run.configuration)
        groups.setdefault((_jobs_folder(run), gpus), []).append(run)
    submitted = []
    for (folder, gpus), group in groups.items():
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
        executor.update_parameters(**_parameters(settings, gpus, folder.parent.name))
        for run in group:
            run.write_configuration()
        with executor.batch():
            jobs = [
                executor.submit(
                    RunJob(run.folder.configuration_path.resolve(), _absolute(run.comparison_folder), Path.cwd())
                )
                for run in group
            ]
        submitted.extend(zip(group, jobs))
    return submitted


def _absolute(folder):
    return Path(folder).resolve() if folder is not None else None


def _in_queue(job_ids):
    """The ids among ``job_ids`` that SLURM still lists (pending, running, requeued); None when squeue
    fails (a busy or restarting slurmctld), which says nothing about the jobs."""
    result = subprocess.run(
        ["squeue", "--noheader", "--array", "--format=%i", "--jobs", ",".join(job_ids)], capture_output=True, text=True
    )
    if result.returncode != 0:
        return None
    return {line.strip() for line in result.stdout.splitlines()}


def wait_for_jobs(submitted, report, *, cluster="slurm"):
    """Wait until every submitted run finished, diverged or failed, or its job left the queue;
    ``report(run, event, detail)`` once per run. Returns {run: event}."""
    pending, ended = dict(submitted), {}
    while pending:
        time.sleep(_POLL_SECONDS)
        if cluster == "slurm":
            queued = _in_queue([job.job_id for job in pending.values()])
            if queued is None:
                continue
        for run, job in list(pending.items()):
            state = run_state(run)
            gone = job.job_id not in queued if cluster == "slurm" else job.done()
            if state.done:
                event, detail = state.status, test_result(run) if state.status == "finished" else ""
            elif state.status == "failed" or gone:
                event, detail = "failed", state.failure or f"job {job.job_id} ended at step {state.step}"
            else:
                continue
            del pending[run]
            ended[run] = event
            report(run, event, detail)
    return ended
