"""The slurm launcher on a real SLURM cluster: the 8-run digits grid submitted as jobs, one job
requeued mid-run with ``scontrol requeue``, finishes with the results of one process.

Runs only where ``sinfo`` shows an idle node and submitit imports; tests/slurm/start_local_slurm.sh
starts a one-node cluster on this machine (as root).
"""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_launcher import GRID, RUNS, Trained, _assert_same_results, _train

REPOSITORY = Path(__file__).resolve().parents[1]
# Runs long enough to be caught mid-run: evaluations at 10, 20, 30 and 40.
LONGER = GRID.replace("training_steps = 12", "training_steps = 40").replace(
    "evaluate_every_steps = 6", "evaluate_every_steps = 10"
)


def _idle_node():
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "--noheader", "--states=idle", "--format=%N"], capture_output=True, text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


pytestmark = pytest.mark.skipif(
    not _idle_node(), reason="no SLURM cluster with an idle node (start one with tests/slurm/start_local_slurm.sh)"
)


def _requeue_one_running_job(workspace, jobs, deadline):
    """``scontrol requeue`` the job of a run that has started training and not finished; return its id."""
    while time.monotonic() < deadline:
        for run, job in jobs.items():
            metrics = workspace / "runs" / "grid" / run / "metrics.jsonl"
            if metrics.is_file() and '"training"' in metrics.read_text() and '"test"' not in metrics.read_text():
                if subprocess.run(["scontrol", "requeue", job], capture_output=True).returncode == 0:
                    _start_when_pending(job, deadline)
                    return job
        time.sleep(0.05)
    pytest.fail("no job was caught mid-run")


def _start_when_pending(job, deadline):
    """SLURM holds a requeued job for two minutes; let it start as soon as it is pending again."""
    while time.monotonic() < deadline:
        state = subprocess.run(
            ["squeue", "--noheader", "--array", "--format=%T", "--jobs", job], capture_output=True, text=True
        )
        if state.stdout.strip() == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            return
        time.sleep(0.2)


def test_a_grid_through_slurm_with_a_requeued_job_equals_one_process(tmp_path):
    pytest.importorskip("submitit")
    reference = tmp_path / "one_process"
    reference.mkdir()
    in_one_process = _train(reference, text=LONGER)
    assert in_one_process.status == 0
    workspace = tmp_path / "slurm"
    workspace.mkdir()
    (workspace / "grid.txt").write_text(LONGER)
    launcher = subprocess.Popen(
        [sys.executable, str(REPOSITORY / "main.py"), "--config", "grid.txt", "--set", "launcher.name=slurm",
         "--set", "launcher.partition=debug", "--set", "launcher.time_minutes=30", "--wait"],
        cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    jobs, lines = {}, []
    while len(jobs) < len(RUNS):
        line = launcher.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
        if "submitted as job " in line:
            job, folder = line.split("submitted as job ")[1].strip().split(", ")
            jobs[str(Path(folder).relative_to(Path("runs") / "grid"))] = job
    requeued = _requeue_one_running_job(workspace, jobs, time.monotonic() + 600)
    output = "".join(lines) + launcher.communicate(timeout=900)[0]
    assert launcher.returncode == 0, output
    assert output.count(": finished (test accuracy ") == len(RUNS)
    restarts = subprocess.run(["scontrol", "show", "job", requeued], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts
    _assert_same_results(Trained(workspace, 0, output), in_one_process)
