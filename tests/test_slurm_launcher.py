"""The slurm launcher on a real SLURM cluster: a grid of digits runs submitted as jobs, one job
requeued mid-run with ``scontrol requeue`` or preempted with submitit's signal (SIGUSR2), finishes
with the results of one process; a launcher stopped while it waits leaves its jobs running.

Runs only where ``sinfo`` shows an idle node and submitit imports; tests/slurm/start_local_slurm.sh
starts a one-node cluster on this machine (as root).
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_launcher import GRID_ENTRIES, RUNS, SGD_ENTRY, Trained, _assert_same_results, _metrics, _results, _train
from tests.tiny_run import digits_comparison

REPOSITORY = Path(__file__).resolve().parents[1]
# Runs long enough to be caught mid-run: evaluations at 10, 20, 30 and 40.
LONGER = digits_comparison("grid", steps=40, evaluate_every=10, entries=GRID_ENTRIES)
# Two of its runs, one job array.
SGD_ONLY = digits_comparison("grid", steps=40, evaluate_every=10, entries=SGD_ENTRY)
SGD_RUNS = ["sgd/seed_0", "sgd/seed_1"]


def _idle_node():
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "--noheader", "--states=idle", "--format=%N"], capture_output=True, text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


pytestmark = pytest.mark.skipif(
    not _idle_node(), reason="no SLURM cluster with an idle node (start one with tests/slurm/start_local_slurm.sh)"
)


def _submit(workspace, text, runs):
    """Launch the grid ``text`` of ``runs`` runs through the slurm launcher with --wait; return the
    launcher, its lines so far and {run folder inside the comparison: job id}."""
    workspace.mkdir()
    (workspace / "grid.txt").write_text(text)
    launcher = subprocess.Popen(
        [sys.executable, str(REPOSITORY / "main.py"), "--config", "grid.txt", "--set", "launcher.name=slurm",
         "--set", "launcher.partition=debug", "--set", "launcher.time_minutes=30", "--wait"],
        cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    jobs, lines = {}, []
    while len(jobs) < runs:
        line = launcher.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
        if "submitted as job " in line:
            job, folder = line.split("submitted as job ")[1].strip().split(", ")
            jobs[str(Path(folder).relative_to(Path("runs") / "grid"))] = job
    return launcher, lines, jobs


def _one_job_mid_run(workspace, jobs, deadline):
    """(run, job id) of a run that has logged a training step and has at least ten more to go."""
    while time.monotonic() < deadline:
        for run, job in jobs.items():
            metrics = workspace / "runs" / "grid" / run / "metrics.jsonl"
            logged = metrics.read_text().splitlines() if metrics.is_file() else []  # the last may be half-written
            steps = [json.loads(line)["step"] for line in logged[:-1] if '"training"' in line]
            if steps and steps[-1] <= 30:
                return run, job
        time.sleep(0.05)
    pytest.fail("no job was caught mid-run")


def _squeue(job, fields):
    result = subprocess.run(
        ["squeue", "--noheader", "--array", f"--format={fields}", "--jobs", job], capture_output=True, text=True
    )
    return result.stdout.strip()


def _restarts(job):
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return int(re.search(r"Restarts=(\d+)", shown).group(1))


def _start_requeued_job_now(job, deadline):
    """SLURM holds a requeued job for two minutes (reason BeginTime); start it in two seconds instead.

    Not at once: slurmd refuses to launch a job in the second it killed it ("already killed, do not
    launch batch job", and the job fails). And SLURM sets its hold when the old job has completed,
    overriding a start time given before: so ask again for as long as the job is held.
    """
    while time.monotonic() < deadline:
        state = _squeue(job, "%T %r")
        if state == "PENDING BeginTime":
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        elif state.startswith("RUNNING") or not state:
            return
        time.sleep(0.2)
    pytest.fail(f"job {job} did not start again")


def _preempt(job, deadline):
    """Send ``job`` submitit's preemption signal until it has requeued itself.

    scancel retries a signal that SLURM refuses ("Job can not be altered now", as for a job being
    requeued) every few seconds for minutes: a retry can reach the requeued job in its first seconds,
    before anything handles SIGUSR2, and kill it. So each scancel may run only briefly.
    """
    while time.monotonic() < deadline:
        try:
            subprocess.run(["scancel", "--signal=USR2", job], capture_output=True, timeout=2)
        except subprocess.TimeoutExpired:
            pass
        answered = time.monotonic() + 10
        while time.monotonic() < answered:
            if _restarts(job):
                return
            time.sleep(0.1)
    pytest.fail(f"job {job} was not requeued after SIGUSR2")


def _job_output(workspace, job):
    return "".join(path.read_text() for path in (workspace / "runs" / "grid" / "slurm" / job).glob("*_log.out"))


@pytest.fixture(scope="module")
def in_one_process(tmp_path_factory):
    """The longer grid trained in this process, one run after another."""
    trained = _train(tmp_path_factory.mktemp("one_process"), text=LONGER)
    assert trained.status == 0
    return trained


def test_a_grid_through_slurm_with_a_requeued_job_equals_one_process(tmp_path, in_one_process):
    pytest.importorskip("submitit")
    workspace = tmp_path / "slurm"
    launcher, lines, jobs = _submit(workspace, LONGER, len(RUNS))
    deadline = time.monotonic() + 600
    _, requeued = _one_job_mid_run(workspace, jobs, deadline)
    subprocess.run(["scontrol", "requeue", requeued], check=True)
    _start_requeued_job_now(requeued, deadline)
    output = "".join(lines) + launcher.communicate(timeout=900)[0]
    assert launcher.returncode == 0, output
    assert output.count(": finished (test accuracy ") == len(RUNS)
    assert _restarts(requeued) == 1
    _assert_same_results(Trained(workspace, 0, output), in_one_process)


def test_a_job_preempted_with_submitits_signal_resumes_from_its_checkpoint_and_equals_one_process(
    tmp_path, in_one_process
):
    pytest.importorskip("submitit")
    workspace = tmp_path / "slurm"
    launcher, lines, jobs = _submit(workspace, SGD_ONLY, len(SGD_RUNS))
    deadline = time.monotonic() + 600
    run, preempted = _one_job_mid_run(workspace, jobs, deadline)
    _preempt(preempted, deadline)
    _start_requeued_job_now(preempted, deadline)
    output = "".join(lines) + launcher.communicate(timeout=900)[0]
    assert launcher.returncode == 0, output
    assert output.count(": finished (test accuracy ") == len(SGD_RUNS)
    assert _restarts(preempted) == 1
    job_output = _job_output(workspace, preempted)
    assert "Caught signal SIGUSR2" in job_output and f"Requeued job {preempted}" in job_output
    # The run stopped with a checkpoint and the requeued job continued from that step.
    stopped = re.search(r"stopped at step (\d+) of 40", job_output)
    assert stopped and 0 < int(stopped.group(1)) < 40, job_output
    assert f"resuming {Path('runs/grid') / run} from step {stopped.group(1)}" in job_output
    assert _metrics(workspace / "runs" / "grid", SGD_RUNS) == _metrics(in_one_process.folder, SGD_RUNS)
    reference_rows = [row for row in _results(in_one_process.folder) if row["entry"] == "sgd"]
    assert _results(workspace / "runs" / "grid") == reference_rows and reference_rows[0]["status"] == "finished"


def test_a_launcher_stopped_while_waiting_leaves_its_jobs_running_and_says_how_to_see_and_cancel_them(
    tmp_path, in_one_process
):
    pytest.importorskip("submitit")
    workspace = tmp_path / "slurm"
    launcher, lines, jobs = _submit(workspace, SGD_ONLY, len(SGD_RUNS))
    launcher.send_signal(signal.SIGINT)
    output = "".join(lines) + launcher.communicate(timeout=60)[0]
    assert launcher.returncode == 130, output
    status = f"python main.py --config {Path('runs/grid/configuration.txt')} --status"
    assert output.endswith(
        f"aborted; the 2 submitted jobs whose runs have not ended go on: see them with {status}, "
        f"cancel them with scancel {' '.join(jobs.values())}\n"
    )
    deadline = time.monotonic() + 300
    while _squeue(",".join(jobs.values()), "%i"):
        assert time.monotonic() < deadline, "the jobs did not end"
        time.sleep(0.5)
    shown = subprocess.run([sys.executable, str(REPOSITORY / "main.py"), *status.split()[2:]], cwd=workspace,
                           capture_output=True, text=True)  # fmt: skip
    assert shown.stdout.splitlines()[-1] == "2 finished"
    assert _metrics(workspace / "runs" / "grid", SGD_RUNS) == _metrics(in_one_process.folder, SGD_RUNS)
    # The job that finished the comparison's last run wrote its results.
    assert _results(workspace / "runs" / "grid") == [
        row for row in _results(in_one_process.folder) if row["entry"] == "sgd"
    ]
