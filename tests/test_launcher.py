"""The launcher: a grid of 8 digits runs trained in child processes (and through submitit's local
executor) gives the results of one process; a killed launcher leaves no run behind and a relaunch
finishes the grid exactly; --status and --dry-run; bad [launcher] values."""

import contextlib
import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

import main
from source.comparison import runner as comparison_runner
from source.files import hold_folder
from source.launcher import GridRun, LauncherSettings, read_launcher
from source.launcher import local, slurm
from source.launcher.launch import launch
from source.plotting import read_metrics
from source.registries import load_configuration
from source.training import RunFolder
from source.training.trainer import Aborted
from tests.tiny_run import ADAM_ENTRY, LABPAL_NSGD_ENTRY, TINY, digits_comparison

REPOSITORY = Path(__file__).resolve().parents[1]

SGD_ENTRY = """\
    [[sgd]]
    label = SGD
    optimizer = sgd
        [[[arguments]]]
        lr = 0.1
"""
PAL_ENTRY = """\
    [[pal]]
    label = PAL
    optimizer = pal
"""
# 4 entries × 2 seeds; evaluations at 6 and 12.
GRID_ENTRIES = LABPAL_NSGD_ENTRY + SGD_ENTRY + ADAM_ENTRY + PAL_ENTRY
GRID = digits_comparison("grid", steps=12, evaluate_every=6, entries=GRID_ENTRIES)
RUNS = [f"{entry}/seed_{seed}" for entry in ("lab_pal", "sgd", "adam", "pal") for seed in (0, 1)]


@dataclass(frozen=True)
class Trained:
    """A grid trained in a working folder: its exit status and output."""

    workspace: Path
    status: int
    output: str

    @property
    def folder(self):
        return self.workspace / "runs" / "grid"


def _main(arguments):
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        status = main.main(arguments)
    return status, output.getvalue()


def _train(workspace, *arguments, text=GRID):
    """Train the grid ``text`` with main.py in ``workspace`` (relaunched: grid.txt is there already)."""
    if not (workspace / "grid.txt").is_file():
        (workspace / "grid.txt").write_text(text)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        status, output = _main(["--config", "grid.txt", *arguments])
    return Trained(workspace, status, output)


@pytest.fixture(scope="module")
def in_one_process(tmp_path_factory):
    """The grid trained in this process, one run after another (parallel = 1)."""
    return _train(tmp_path_factory.mktemp("one_process"))


@pytest.fixture(scope="module")
def in_children(tmp_path_factory):
    """The grid trained in two child processes at a time."""
    return _train(tmp_path_factory.mktemp("children"), "--set", "launcher.parallel=2")


def _metrics(folder, runs=RUNS):
    """The metric records of ``runs`` without their wall-clock times."""
    return {
        run: [
            {key: value for key, value in record.items() if key != "elapsed_seconds"}
            for record in read_metrics(folder / run / "metrics.jsonl")
        ]
        for run in runs
    }


def _results(folder):
    """results.csv's rows without the wall time."""
    with open(folder / "results.csv", newline="") as file:
        return [
            {key: value for key, value in row.items() if key != "wall_time_seconds_mean"}
            for row in csv.DictReader(file)
        ]


def _assert_same_results(trained, reference):
    assert _metrics(trained.folder) == _metrics(reference.folder)
    rows = _results(trained.folder)
    assert rows == _results(reference.folder)
    assert [row["status"] for row in rows] == ["finished"] * 4


def test_a_grid_in_two_child_processes_equals_the_grid_in_one_process(in_children, in_one_process):
    assert (in_one_process.status, in_children.status) == (0, 0)
    _assert_same_results(in_children, in_one_process)
    # One line per run start and finish, naming the run folder; no per-run plot folders.
    for number, run in enumerate(RUNS, start=1):
        assert f"[{number}/8] " in in_children.output
        assert f"started in {Path('runs/grid') / run}" in in_children.output
    assert in_children.output.count(": finished (test accuracy ") == 8
    assert not (in_children.workspace / "plots").exists()
    assert (in_children.folder / "validation_accuracy.png").is_file()


def _descendants(pid):
    """The processes whose parent is ``pid``."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    children.append(int(entry.name))
    return children


def _alive(pid):
    """Whether process ``pid`` exists and is not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="children die with the launcher through Linux's prctl")
def test_a_launcher_killed_mid_grid_leaves_no_child_and_a_relaunch_equals_an_uninterrupted_grid(
    tmp_path, in_one_process
):
    (tmp_path / "grid.txt").write_text(GRID)
    command = [sys.executable, str(REPOSITORY / "main.py"), "--config", "grid.txt", "--set", "launcher.parallel=2"]
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "runs").glob("grid/*/seed_*/last.pt")):
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    children = _descendants(launcher.pid)
    assert children
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children):
        assert time.monotonic() < deadline, "a child outlived the killed launcher"
        time.sleep(0.05)
    relaunched = _train(tmp_path, "--resume", "--set", "launcher.parallel=2")
    assert relaunched.status == 0
    _assert_same_results(relaunched, in_one_process)


def test_the_grid_through_submitits_local_executor_equals_the_grid_in_one_process(
    tmp_path, monkeypatch, in_one_process
):
    pytest.importorskip("submitit")
    (tmp_path / "grid.txt").write_text(GRID)
    monkeypatch.chdir(tmp_path)
    configuration = load_configuration("grid.txt", ["launcher.name=slurm"])
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        status = launch([configuration], read_launcher([configuration]), resume=False, wait=True, cluster="local")
    assert status == 0
    assert output.getvalue().count("submitted as job ") == 8
    _assert_same_results(Trained(tmp_path, status, output.getvalue()), in_one_process)


def test_status_reads_every_run_from_its_folder(in_children, monkeypatch):
    monkeypatch.chdir(in_children.workspace)
    before = sorted(path.stat().st_mtime_ns for path in in_children.folder.rglob("*"))
    status, output = _main(["--config", "grid.txt", "--status"])
    assert status == 0
    lines = output.splitlines()
    assert lines[0].startswith("[1/8] lab_pal (LABPAL-NSGD) seed 0: finished, step 12/12, last validation accuracy 0.")
    assert lines[0].endswith(str(Path("runs/grid/lab_pal/seed_0")))
    assert lines[-1] == "8 finished"
    assert sorted(path.stat().st_mtime_ns for path in in_children.folder.rglob("*")) == before


def test_status_tells_running_stopped_failed_and_not_started_runs(tmp_path, monkeypatch):
    (tmp_path / "grid.txt").write_text(GRID)
    monkeypatch.chdir(tmp_path)
    assert _main(["--config", "grid.txt", "--stop-after-steps", "9"])[0] == 0
    (tmp_path / "runs/grid/lab_pal/seed_1").mkdir()
    (tmp_path / "runs/grid/lab_pal/seed_1/failure.txt").write_text("exit status 1: out of memory\n")
    status, output = _main(["--config", "grid.txt", "--status"])
    lines = output.splitlines()
    assert status == 0
    assert lines[0].startswith("[1/8] lab_pal (LABPAL-NSGD) seed 0: stopped, step 9/12, last validation accuracy 0.")
    assert lines[1].startswith("[2/8] lab_pal (LABPAL-NSGD) seed 1: failed, step 0/12")
    assert lines[1].endswith("(exit status 1: out of memory)")
    assert (
        lines[2]
        == f"[3/8] sgd (SGD) seed 0: not started, step 0/12, last validation –, {Path('runs/grid/sgd/seed_0')}"
    )
    assert lines[-1] == "1 failed, 6 not started, 1 stopped"
    with hold_folder(tmp_path / "runs/grid/lab_pal/seed_0"):  # as the process training it would
        status, output = _main(["--config", "grid.txt", "--status"])
    assert output.splitlines()[0].startswith("[1/8] lab_pal (LABPAL-NSGD) seed 0: running, step 9/12")


def test_dry_run_lists_every_run_and_where_it_goes_and_writes_nothing(tmp_path, monkeypatch):
    (tmp_path / "grid.txt").write_text(GRID)
    monkeypatch.chdir(tmp_path)
    status, output = _main(["--config", "grid.txt", "--dry-run", "--set", "launcher.parallel=2"])
    assert status == 0
    lines = output.splitlines()
    assert (
        lines[0]
        == f"[1/8] lab_pal (LABPAL-NSGD) seed 0: {Path('runs/grid/lab_pal/seed_0')}, 12 steps, "
        f"child process 1 of 2, CPU, {max(1, os.cpu_count() // 2)} threads"
    )
    assert lines[1].startswith("[2/8] lab_pal (LABPAL-NSGD) seed 1: ") and "child process 2 of 2" in lines[1]
    assert lines[-1] == "8 runs, 96 steps in all; 8 to start, 96 steps to train (dry run: nothing written)"
    status, output = _main(
        ["--config", "grid.txt", "--dry-run", "--set", "launcher.name=slurm", "--set", "launcher.partition=debug",
         "--set", "launcher.memory_gb=4", "--set", "launcher.sbatch_options.mail_type=END"]
    )  # fmt: skip
    if "submitit" in output or status == 2:
        pytest.skip("submitit is not installed")
    assert output.splitlines()[0].endswith(
        "12 steps, SLURM job: 0 GPUs, 1 CPU per task, 240 min, 4 GB, partition debug, --mail-type=END"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grid.txt"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["launcher.parallel=0"],
            "--set launcher.parallel=0: [launcher] parallel = '0': expected an integer >= 1 and <= 1024 or auto",
        ),
        (["launcher.name=kubernetes"], "[launcher] name = 'kubernetes': expected one of local, slurm"),
        (["launcher.sbatch_options.Mail=END"], "'Mail' is not an sbatch option name"),
        (["launcher.gpus_per_run=-1"], "[launcher] gpus_per_run = '-1': expected an integer >= 0 and <= 64 or auto"),
    ],
)
def test_a_bad_launcher_value_gives_one_line_and_status_2_before_anything_runs(
    tmp_path, monkeypatch, capsys, overrides, message
):
    (tmp_path / "grid.txt").write_text(GRID)
    monkeypatch.chdir(tmp_path)
    assert main.main(["--config", "grid.txt", *(argument for value in overrides for argument in ("--set", value))]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grid.txt"]


def test_slurm_without_submitit_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "grid.txt").write_text(GRID)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "submitit", None)
    assert main.main(["--config", "grid.txt", "--set", "launcher.name=slurm"]) == 2
    assert capsys.readouterr().err == (
        "error: --set launcher.name=slurm: [launcher] name = slurm needs the submitit package: pip install submitit\n"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grid.txt"]


def test_configurations_launched_together_share_one_launcher(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.txt").write_text(GRID)
    (tmp_path / "b.txt").write_text(
        GRID.replace("name = grid", "name = other").replace("[comparison]", "[launcher]\nparallel = 2\n[comparison]")
    )
    monkeypatch.chdir(tmp_path)
    assert main.main(["--config", "a.txt", "--config", "b.txt"]) == 2
    assert "b.txt: [launcher] differs from a.txt: [launcher]" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_children_take_the_visible_gpus_in_turn_or_share_the_cores(monkeypatch, tmp_path):
    (tmp_path / "tiny.txt").write_text(TINY)

    def run(device, threads="auto"):
        overrides = [f"experiment.device={device}", f"experiment.cpu_threads={threads}"]
        return GridRun("run", load_configuration(tmp_path / "tiny.txt", overrides), RunFolder(Path("runs/run")), None)

    monkeypatch.setattr(local, "_visible_gpus", lambda: ["3", "5"])
    slots = local.child_slots(LauncherSettings(parallel="auto", runs_per_device=2), [run("auto")])
    assert [slot.gpu for slot in slots] == ["3", "5", "3", "5"]
    assert local._environment(slots[1])["CUDA_VISIBLE_DEVICES"] == "5"
    assert local._command(run("cuda:1"), slots[1])[-2:] == ["--set", "experiment.device=cuda"]
    monkeypatch.setattr(local.os, "cpu_count", lambda: 8)
    slots = local.child_slots(LauncherSettings(parallel=3), [run("cpu")])
    assert [(slot.gpu, slot.cpu_threads) for slot in slots] == [(None, 2)] * 3
    assert local._environment(slots[0])["OMP_NUM_THREADS"] == "2"
    assert local._command(run("cpu"), slots[0])[-2:] == ["--set", "experiment.cpu_threads=2"]
    assert "experiment.cpu_threads=2" not in local._command(run("cpu", threads=1), slots[0])
    assert len(local.child_slots(LauncherSettings(parallel="auto"), [run("cpu")])) == 4


# 3 runs of 6 steps; evaluations at 3 and 6.
SMALL_GRID = digits_comparison("grid", steps=6, evaluate_every=3, entries=SGD_ENTRY, seeds="0, 1, 2")
SMALL_RUNS = [f"sgd/seed_{seed}" for seed in (0, 1, 2)]


def test_a_failing_run_never_stops_the_others_in_this_process_or_in_children(tmp_path, capsys):
    stopped = tmp_path / "in_this_process"
    stopped.mkdir()
    assert _train(stopped, "--stop-after-steps", "3", text=SMALL_GRID).status == 0
    first = stopped / "runs" / "grid" / "sgd" / "seed_0"
    for checkpoint in first.glob("last*.pt"):
        checkpoint.write_text("not a checkpoint")
    shutil.copytree(stopped, tmp_path / "children")
    capsys.readouterr()
    in_this_process = _train(stopped, "--resume", "--set", "launcher.parallel=1")
    error = capsys.readouterr().err
    in_children = _train(tmp_path / "children", "--resume", "--set", "launcher.parallel=2")
    children_error = capsys.readouterr().err
    assert (in_this_process.status, in_children.status) == (11, 11)
    assert error == children_error == "error: 1 of 3 runs failed: sgd (SGD) seed 0\n"
    # One line names the failed run and why, kept in its failure.txt; the runs after it trained all the same.
    reason = (in_this_process.folder / "sgd/seed_0/failure.txt").read_text().strip()
    assert reason.startswith(f"cannot read the checkpoint {Path('runs/grid/sgd/seed_0/last.pt')}: ")
    assert f"[1/3] sgd (SGD) seed 0: failed ({reason})\n" in in_this_process.output
    assert (in_children.folder / "sgd/seed_0/failure.txt").read_text().startswith(f"exit status 2: error: {reason} ")
    assert f"[1/3] sgd (SGD) seed 0: failed (exit status 2: error: {reason} " in in_children.output
    assert in_this_process.output.count(": finished, test accuracy ") == 2
    assert in_children.output.count(": finished (test accuracy ") == 2
    assert _metrics(in_children.folder, SMALL_RUNS[1:]) == _metrics(in_this_process.folder, SMALL_RUNS[1:])
    assert _results(in_children.folder) == _results(in_this_process.folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(stopped)
        status, output = _main(["--config", "grid.txt", "--status"])
    assert output.splitlines()[0].startswith("[1/3] sgd (SGD) seed 0: failed, step 3/6")
    assert output.splitlines()[-1] == "1 failed, 2 finished"


def test_a_run_that_crashes_in_this_process_shows_its_traceback_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    run_experiment = comparison_runner.run_experiment

    def crash_on_seed_0(configuration, **options):
        if configuration["experiment"]["seed"] == 0:
            run_experiment(configuration, resume=False, stop_after_steps=1)
            raise RuntimeError("a bug in\nthe run")
        return run_experiment(configuration, **options)

    monkeypatch.setattr(comparison_runner, "run_experiment", crash_on_seed_0)
    trained = _train(tmp_path, text=digits_comparison("grid", steps=3, evaluate_every=3, entries=SGD_ENTRY))
    error = capsys.readouterr().err
    assert trained.status == 11
    assert "[1/2] sgd (SGD) seed 0: failed (RuntimeError: a bug in the run (traceback above))\n" in trained.output
    assert "[2/2] sgd (SGD) seed 1: finished, test accuracy " in trained.output
    assert error.startswith("Traceback (most recent call last):\n") and "RuntimeError: a bug in\nthe run\n" in error
    assert error.endswith("error: 1 of 2 runs failed: sgd (SGD) seed 0\n")
    assert (trained.folder / "sgd/seed_0/failure.txt").read_text() == "RuntimeError: a bug in the run (traceback above)\n"


def test_a_launcher_stopped_while_waiting_for_slurm_jobs_says_they_go_on_and_how_to_cancel_them(
    tmp_path, monkeypatch, capsys
):
    pytest.importorskip("submitit")
    (tmp_path / "grid.txt").write_text(SMALL_GRID)
    monkeypatch.chdir(tmp_path)
    job_ids = iter(["7_0", "7_1", "7_2"])

    def submit(runs, settings, cluster):
        return [(run, SimpleNamespace(job_id=next(job_ids))) for run in runs]

    def stopped_while_waiting(submitted, report, cluster):
        raise Aborted(signal.SIGTERM)

    launching = sys.modules["source.launcher.launch"]  # the package's name "launch" is the function
    monkeypatch.setattr(launching, "submit_runs", submit)
    monkeypatch.setattr(launching, "wait_for_jobs", stopped_while_waiting)
    assert main.main(["--config", "grid.txt", "--set", "launcher.name=slurm", "--wait"]) == 143
    assert capsys.readouterr().err == (
        "aborted; the 3 submitted jobs whose runs have not ended go on: see them with python main.py "
        f"--config {Path('runs/grid/configuration.txt')} --status, cancel them with scancel 7_0 7_1 7_2\n"
    )


def test_waiting_for_slurm_jobs_takes_a_failing_squeue_for_no_answer(tmp_path, monkeypatch):
    answers = [
        subprocess.CompletedProcess([], 1, "", "slurm_load_jobs error: Socket timed out on send/recv operation"),
        subprocess.CompletedProcess([], 0, "5_0\n", ""),
        subprocess.CompletedProcess([], 0, "", ""),
    ]
    asked = []

    def squeue(command, **options):
        asked.append(command)
        return answers[len(asked) - 1]

    monkeypatch.setattr(slurm.subprocess, "run", squeue)
    monkeypatch.setattr(slurm, "_POLL_SECONDS", 0)
    (tmp_path / "tiny.txt").write_text(TINY)
    configuration = load_configuration(tmp_path / "tiny.txt", ["training.training_steps=6"])
    run = GridRun("run", configuration, RunFolder(tmp_path / "run"), None)
    reports = []
    ended = slurm.wait_for_jobs([(run, SimpleNamespace(job_id="5_0"))], lambda *report: reports.append(report))
    # Only the job's absence from a squeue that answered ends it.
    assert len(asked) == 3 and asked[0][0] == "squeue"
    assert ended == {run: "failed"} and reports == [(run, "failed", "job 5_0 ended at step 0")]
