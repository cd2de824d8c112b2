"""One process per run folder, folders that appear complete, writes that never follow a link, and a
saved configuration that is the truth: two processes at once, kills at start-up, planted links,
an edited configuration.txt and a moved project."""

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import main
from source.comparison.runner import run_comparison
from source.errors import UserError
from source.files import (
    LOCK_FILE,
    FolderInUse,
    LocksUnsupported,
    create_owned_folder,
    hold_folder,
    open_for_append,
    write_text_atomically,
)
from source.files import ownership
from source.plotting import read_metrics
from source.registries import load_configuration
from source.training import run_folder, runner
from tests.test_comparison import COMPARE
from tests.tiny_run import TINY, workspace  # noqa: F401 (workspace is a fixture)
from tests.tiny_run import set_options as _set

REPOSITORY = Path(__file__).resolve().parents[1]
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}


def _one_line(error):
    assert error.startswith("error: ") and error.count("\n") == 1 and "Traceback" not in error, error
    return error


def _hold_in_another_process(folder, seconds=60):
    """A process that holds ``folder``'s lock for ``seconds``; returned once it holds it."""
    code = (
        f"from source.files import hold_folder; import time; hold_folder({str(folder)!r}); "
        f"print('held', flush=True); time.sleep({seconds})"
    )
    process = subprocess.Popen([sys.executable, "-c", code], env=ENVIRONMENT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    return process


def test_a_held_folder_names_its_holder_is_waited_for_and_is_freed_by_kill_9(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = _hold_in_another_process(folder)
    try:
        with pytest.raises(FolderInUse, match=f"in use by process {holder.pid} on {socket.gethostname()} since"):
            hold_folder(folder)
        started = time.monotonic()
        with pytest.raises(FolderInUse, match=r"\(waited 0.3 s\)"):
            hold_folder(folder, wait_seconds=0.3)
        assert time.monotonic() - started >= 0.3
    finally:
        holder.kill()
        holder.wait()
    # The operating system released the lock of the killed process: no stale lock.
    lock = hold_folder(folder)
    assert (folder / LOCK_FILE).read_text().startswith(f"process {os.getpid()} on ")
    lock.release()
    # A holder that lets go within the wait is waited for.
    short = _hold_in_another_process(folder, seconds=1)
    try:
        lock = hold_folder(folder, wait_seconds=30)
        assert lock.held and short.wait(timeout=30) == 0
        lock.release()
    finally:
        short.kill()


def test_a_waiter_does_not_take_over_a_folder_its_owner_removed(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    owner = hold_folder(folder)

    def remove_and_let_go():
        time.sleep(0.3)
        shutil.rmtree(folder)
        owner.release()

    remover = threading.Thread(target=remove_and_let_go)
    remover.start()
    with pytest.raises(UserError, match="run folder .*/run: it does not exist"):
        hold_folder(folder, wait_seconds=30)
    remover.join()


def test_a_file_system_without_locks_is_refused_in_one_line(workspace, monkeypatch, capsys):
    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(ownership.fcntl, "flock", no_locks)
    (workspace / "folder").mkdir()
    with pytest.raises(LocksUnsupported, match="does not support file locks"):
        hold_folder(workspace / "folder")
    assert main.main(["--config", "tiny.txt"]) == 2
    error = _one_line(capsys.readouterr().err)
    assert "cannot lock the run folder runs/tiny: its file system does not support file locks" in error
    assert not (workspace / "runs" / "tiny").exists()
    assert not [path for path in (workspace / "runs").iterdir()], "a hidden start folder was left behind"


def test_a_second_process_cannot_resume_a_run_in_progress_and_kill_9_frees_it(workspace, capsys):
    (workspace / "tiny.txt").write_text(TINY.replace("training_steps = 24", "training_steps = 100000"))
    command = [sys.executable, str(REPOSITORY / "main.py"), "--config", "tiny.txt"]
    first = subprocess.Popen(command, cwd=workspace, env=ENVIRONMENT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = workspace / "runs" / "tiny" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.stat().st_size) and first.poll() is None:
            assert time.monotonic() < deadline, "the first run did not start training"
            time.sleep(0.2)
        assert main.main(["--config", "tiny.txt", "--resume"]) == 2
        error = _one_line(capsys.readouterr().err)
        assert f"runs/tiny is in use by process {first.pid} on {socket.gethostname()}" in error
        assert main.main(["--config", "tiny.txt"]) == 2
        assert "runs/tiny already exists" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    assert main.main(["--config", "tiny.txt", "--resume", "--stop-after-steps", "2"]) == 0
    steps = [record["step"] for record in read_metrics(metrics) if record["split"] == "training"]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_a_comparison_in_progress_is_not_resumed_by_a_second_process(workspace, capsys):
    (workspace / "compare.txt").write_text(COMPARE)
    assert main.main(["--config", "compare.txt", "--stop-after-steps", "3"]) == 0
    capsys.readouterr()
    holder = _hold_in_another_process(workspace / "runs" / "cmp")
    try:
        assert main.main(["--config", "compare.txt", "--resume"]) == 2
        error = _one_line(capsys.readouterr().err)
        assert f"runs/cmp is in use by process {holder.pid}" in error and "comparison folder" in error
    finally:
        holder.kill()
        holder.wait()
    # Each run inside is owned as well: that run fails, as any run in a folder it cannot use; the others go on.
    run_holder = _hold_in_another_process(workspace / "runs" / "cmp" / "lab_pal" / "seed_0")
    try:
        assert main.main(["--config", "compare.txt", "--resume"]) == 11
        captured = capsys.readouterr()
        assert f"seed 0: failed (runs/cmp/lab_pal/seed_0 is in use by process {run_holder.pid}" in captured.out
        assert captured.out.count(": finished, test accuracy ") == 3
        assert captured.err == "error: 1 of 4 runs failed: lab_pal (LABPAL-NSGD) seed 0\n"
    finally:
        run_holder.kill()
        run_holder.wait()


def test_writes_replace_a_planted_link_and_appends_refuse_one(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "configuration.txt").symlink_to(outside)
    write_text_atomically("mine\n", folder / "configuration.txt")
    assert not (folder / "configuration.txt").is_symlink() and (folder / "configuration.txt").read_text() == "mine\n"
    (folder / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(UserError, match="metrics.jsonl is a symbolic link"):
        open_for_append(folder / "metrics.jsonl")
    os.mkfifo(folder / "pipe")
    with pytest.raises(UserError, match="pipe is not a regular file"):
        open_for_append(folder / "pipe")
    (folder / LOCK_FILE).symlink_to(outside)
    with pytest.raises(UserError, match="owner.lock is a symbolic link"):
        hold_folder(folder)
    assert outside.read_text() == "precious\n"


def test_a_link_planted_at_metrics_jsonl_is_not_followed(workspace, capsys):
    assert main.main(["--config", "tiny.txt", "--stop-after-steps", "10"]) == 0
    outside = workspace / "outside.txt"
    outside.write_text("precious\n")
    metrics = workspace / "runs" / "tiny" / "metrics.jsonl"
    metrics.unlink()
    metrics.symlink_to(outside)
    capsys.readouterr()
    assert main.main(["--config", "tiny.txt", "--resume"]) == 2
    assert "runs/tiny/metrics.jsonl is a symbolic link" in _one_line(capsys.readouterr().err)
    assert outside.read_text() == "precious\n"


def test_links_planted_in_the_plot_folder_are_replaced_not_followed(workspace):
    outside = workspace / "outside.txt"
    outside.write_text("precious\n")
    plots = workspace / "plots" / "tiny"
    plots.mkdir(parents=True)
    # Figures of no known run would be refused: only links where no .png figure is.
    for name in ("run_folder.txt", "learning_rate.pdf", "test_accuracy.pdf"):
        (plots / name).symlink_to(outside)
    assert main.main(["--config", "tiny.txt", "--set", "training.training_steps=10"]) == 0
    assert outside.read_text() == "precious\n"
    assert not any(path.is_symlink() for path in plots.iterdir())
    assert (plots / "learning_rate.pdf").read_bytes().startswith(b"%PDF")


def _signal_self(number):
    def send(*arguments, **keywords):
        os.kill(os.getpid(), number)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("the signal was not delivered")

    return send


# Where a signal arrives during start-up: before the run folder exists, while it is being built
# (hidden, beside its place), and once it is complete but before the first step.
START_UP_POINTS = {
    "building the experiment": (runner, "build_experiment"),
    "building the folder": (run_folder.RunFolder, "write_configuration"),
    "starting the trainer": (runner, "Trainer"),
}


@pytest.mark.parametrize("point", list(START_UP_POINTS))
@pytest.mark.parametrize(("number", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_at_start_up_says_so_and_leaves_nothing_in_the_way(workspace, monkeypatch, capsys, point, number,
                                                                     status):
    owner, name = START_UP_POINTS[point]
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, _signal_self(number))
        assert main.main(["--config", "tiny.txt"]) == status
    assert capsys.readouterr().err == "aborted; nothing was saved; start it again\n"
    assert not (workspace / "runs").exists() or not list((workspace / "runs").iterdir())
    assert main.main(["--config", "tiny.txt", *_set("training.training_steps=5")]) == 0


def test_a_signal_while_resuming_keeps_the_checkpoint(workspace, monkeypatch, capsys):
    assert main.main(["--config", "tiny.txt", "--stop-after-steps", "10"]) == 0
    monkeypatch.setattr(runner, "build_experiment", _signal_self(signal.SIGTERM))
    capsys.readouterr()
    assert main.main(["--config", "tiny.txt", "--resume"]) == 143
    assert capsys.readouterr().err == "aborted; the last checkpoint is kept, continue with --resume\n"


# kill -9 in a process of its own, at a point of start-up: inside the hidden folder being built,
# and once the run folder is complete, before its first step.
KILL_POINTS = {
    "building the folder": ("source.training.run_folder", "RunFolder", "write_configuration"),
    "starting the trainer": ("source.training.runner", None, "Trainer"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_at_start_up_leaves_a_folder_that_starts_or_resumes(workspace, capsys, point):
    module, owner, name = KILL_POINTS[point]
    code = textwrap.dedent(f"""
        import importlib, os, signal, sys
        import main
        place = importlib.import_module({module!r})
        place = getattr(place, {owner!r}) if {owner!r} else place
        setattr(place, {name!r}, lambda *arguments, **keywords: os.kill(os.getpid(), signal.SIGKILL))
        sys.exit(main.main(["--config", "tiny.txt"]))
    """)
    killed = subprocess.run([sys.executable, "-c", code], cwd=workspace, env=ENVIRONMENT, capture_output=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = os.listdir(workspace / "runs")
    if point == "building the folder":
        assert len(leftovers) == 1 and leftovers[0].startswith(".tiny.") and leftovers[0].endswith(".starting")
        assert main.main(["--config", "tiny.txt", *_set("training.training_steps=5")]) == 0
        assert os.listdir(workspace / "runs") == ["tiny"], "the abandoned start was not removed"
    else:
        assert leftovers == ["tiny"] and (workspace / "runs" / "tiny" / "configuration.txt").is_file()
        assert main.main(["--config", "tiny.txt", "--resume"]) == 0
        assert "has no checkpoint yet: starting it again from step 0" in capsys.readouterr().out
    assert any(record["split"] == "test" for record in read_metrics(workspace / "runs" / "tiny" / "metrics.jsonl"))


def test_an_edited_configuration_txt_is_found_and_listed_on_resume(workspace, capsys):
    assert main.main(["--config", "tiny.txt", "--stop-after-steps", "10"]) == 0
    stored = workspace / "runs" / "tiny" / "configuration.txt"
    original = stored.read_text()
    edited = original.replace("batch_size = 32", "batch_size = 64").replace("split_seed = 0", "split_seed = 5")
    assert edited.count("= 64") == original.count("= 64") + 1 and "split_seed = 5" in edited
    stored.write_text(edited)
    capsys.readouterr()
    assert main.main(["--config", "tiny.txt", "--resume"]) == 2
    error = _one_line(capsys.readouterr().err)
    assert "runs/tiny: its configuration.txt was changed after runs/tiny/last.pt was saved" in error
    assert "training.batch_size 64 (checkpoint: 32)" in error and "data.split_seed 5 (checkpoint: 0)" in error
    # A key a resume may change may be edited too: the run goes on with it.
    stored.write_text(original.replace("training_steps = 24", "training_steps = 12"))
    assert main.main(["--config", "tiny.txt", "--resume"]) == 0
    assert load_configuration(stored)["training"]["training_steps"] == 12


def test_a_moved_project_resumes(workspace, monkeypatch, capsys):
    old, new = workspace / "old", workspace / "new"
    old.mkdir()
    (old / "tiny.txt").write_text(TINY)
    monkeypatch.chdir(old)
    assert main.main(["--config", "tiny.txt", "--stop-after-steps", "10"]) == 0
    assert (old / "plots" / "tiny" / "learning_rate.png").exists()
    monkeypatch.chdir(workspace)
    old.rename(new)
    monkeypatch.chdir(new)
    capsys.readouterr()
    assert main.main(["--config", "tiny.txt", "--resume"]) == 0, capsys.readouterr().err
    records = read_metrics(new / "runs" / "tiny" / "metrics.jsonl")
    assert [record["step"] for record in records if record["split"] == "test"] == [24]


def test_a_comparison_killed_while_its_folder_is_built_starts_again(workspace, monkeypatch, capsys):
    (workspace / "compare.txt").write_text(COMPARE)
    with monkeypatch.context() as patch:
        patch.setattr("source.comparison.runner._write_configuration", _signal_self(signal.SIGTERM))
        assert main.main(["--config", "compare.txt"]) == 143
    assert capsys.readouterr().err == "aborted; nothing was saved; start it again\n"
    assert not list((workspace / "runs").iterdir())
    configuration = load_configuration("compare.txt", ["training.training_steps=3", "training.evaluate_every_steps=3"])
    assert run_comparison(configuration).finished
    assert os.listdir(workspace / "runs") == ["cmp"]


def _fill(folder):
    (folder / "configuration.txt").write_text("complete\n")


def test_a_folder_appears_complete_once_and_only_abandoned_starts_are_removed(tmp_path):
    lock = create_owned_folder(tmp_path / "run", _fill)
    assert (tmp_path / "run" / "configuration.txt").read_text() == "complete\n"
    with pytest.raises(FolderInUse):
        hold_folder(tmp_path / "run")
    with pytest.raises(UserError, match="run already exists"):
        create_owned_folder(tmp_path / "run", _fill)
    lock.release()
    # A start in progress elsewhere (its hidden folder locked) is left alone; an abandoned one is removed.
    busy, abandoned = tmp_path / ".busy.1.starting", tmp_path / ".gone.2.starting"
    for folder in (busy, abandoned):
        folder.mkdir()
        (folder / LOCK_FILE).touch()
    holder = _hold_in_another_process(busy)
    try:
        create_owned_folder(tmp_path / "other", _fill).release()
        assert sorted(path.name for path in tmp_path.iterdir()) == [".busy.1.starting", "other", "run"]
    finally:
        holder.kill()
        holder.wait()
