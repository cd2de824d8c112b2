"""Faults in the middle of a run: files the system will not write, figures that fail, signals at any point.

A write the system refuses (full disk, file-size limit, lost permission) ends the run with one line
naming the file and the cause and exit status 5, keeping the last good checkpoint; resumed after the
fix, the run ends as an uninterrupted one. A figure that cannot be drawn keeps the finished run's
results and says so (exit 5). SIGINT and SIGTERM are honoured in the final evaluation, the test and
the figures too. Permission faults are real: the run is started without root's capabilities
(``setpriv``), so that chmod binds it as it binds any user.
"""

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import main
from source.plotting import read_metrics
from source.registries import load_configuration
from source.training import run_experiment, trainer
from source.training.checkpoints import load_checkpoint
from source.training.metrics_log import MetricsLog
from tests import tiny_run
from tests.test_checkpoints import TINY, _assert_same_end, _uninterrupted

REPOSITORY = Path(__file__).resolve().parents[1]
ARGUMENTS = ["--config", "tiny.txt"]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working folder with the tiny SGD run's configuration (evaluations at 10, 20, 24)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text(TINY)
    return tmp_path


def _one_error_line(error):
    assert error.startswith("error: ") and error.count("\n") == 1, error
    assert "Traceback" not in error
    return error


def _step_of(path):
    return load_checkpoint(path)["step"]


def _splits(folder):
    return [record["split"] for record in read_metrics(folder / "metrics.jsonl")]


class _FullDisk:
    """The metrics file on a disk that is full from the record of step ``step`` on."""

    def __init__(self, file, step):
        self._file, self._full_at = file, f'{{"step": {step}, '

    def write(self, text):
        if text.startswith(self._full_at):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.write(text)

    def __getattr__(self, name):
        return getattr(self._file, name)


def test_a_full_disk_ends_the_run_with_one_line_and_the_run_resumes_exactly(workspace, monkeypatch, capsys):
    opened = MetricsLog.__init__

    def on_a_small_disk(self, *arguments, **options):
        opened(self, *arguments, **options)
        self._file = _FullDisk(self._file, step=15)

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLog, "__init__", on_a_small_disk)
        assert main.main(ARGUMENTS) == 5
    error = _one_error_line(capsys.readouterr().err)
    assert error == (
        "error: cannot write runs/tiny/metrics.jsonl: No space left on device; the checkpoint of step 10 is kept; "
        "once that is fixed, continue with --resume\n"
    )
    folder = workspace / "runs" / "tiny"
    assert _step_of(folder / "last.pt") == 10
    assert main.main([*ARGUMENTS, "--resume"]) == 0
    _assert_same_end(folder, _uninterrupted(workspace))


def _limited_file_size(limit):
    def limit_it():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_it


def _main_process(arguments, workspace, *, prefix=(), script=None, preexec_fn=None):
    """main.py (or ``script``, which calls main.main) in a process of its own; returns it finished."""
    code = ["-c", script] if script else [str(REPOSITORY / "main.py")]
    return subprocess.run(
        [*prefix, sys.executable, *code, *arguments],
        cwd=workspace,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)},
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=preexec_fn,
    )


def test_a_file_size_limit_ends_the_run_with_the_cause_named_and_the_run_resumes_exactly(workspace):
    """``ulimit -f``: the checkpoint of step 20 is larger than the limit; torch.save's own error hides the cause."""
    run_experiment(load_configuration("tiny.txt"), stop_after_steps=12)
    folder = workspace / "runs" / "tiny"
    limit = (folder / "last.pt").stat().st_size // 2
    finished = _main_process([*ARGUMENTS, "--resume"], workspace, preexec_fn=_limited_file_size(limit))
    assert finished.returncode == 5, finished.stderr
    assert _one_error_line(finished.stderr) == (
        "error: cannot write runs/tiny/last.pt: File too large; the checkpoint of step 12 is kept; "
        "once that is fixed, continue with --resume\n"
    )
    assert _step_of(folder / "last.pt") == 12  # the file the failed write would have replaced
    assert not list(folder.glob(".*.partial"))
    assert main.main([*ARGUMENTS, "--resume"]) == 0
    _assert_same_end(folder, _uninterrupted(workspace))


def _without_root_privileges():
    """A command prefix under which chmod binds this process: root without its capabilities, or nothing for a user."""
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0 else []


def _locking_script(method, target):
    """main.main(sys.argv[1:]), with ``target`` made read-only (chmod 555) when Trainer.<method> is called
    at step 20, or at once for the test."""
    return textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        import main
        from source.training import trainer

        original = trainer.Trainer.{method}

        def locked(self, *arguments):
            if self.state.step >= 20:
                Path({target!r}).mkdir(parents=True, exist_ok=True)
                os.chmod({target!r}, 0o555)
            return original(self, *arguments)

        trainer.Trainer.{method} = locked
        sys.exit(main.main(sys.argv[1:]))
        """
    )


def test_a_run_folder_that_becomes_read_only_ends_the_run_with_one_line_and_keeps_the_checkpoint(workspace):
    folder = workspace / "runs" / "tiny"
    finished = _main_process(
        ARGUMENTS, workspace, prefix=_without_root_privileges(),
        script=_locking_script("_evaluate_and_checkpoint", "runs/tiny"),
    )  # fmt: skip
    os.chmod(folder, 0o755)
    assert finished.returncode == 5, finished.stderr
    assert _one_error_line(finished.stderr) == (
        "error: cannot write runs/tiny/last.pt: Permission denied; the checkpoint of step 10 is kept; "
        "once that is fixed, continue with --resume\n"
    )
    assert _step_of(folder / "last.pt") == 10
    assert main.main([*ARGUMENTS, "--resume"]) == 0
    _assert_same_end(folder, _uninterrupted(workspace))


def test_a_plots_folder_that_becomes_read_only_keeps_the_finished_run_and_says_so(workspace):
    finished = _main_process(
        ARGUMENTS, workspace, prefix=_without_root_privileges(),
        script=_locking_script("_test_best_checkpoint", "plots/tiny"),
    )  # fmt: skip
    os.chmod(workspace / "plots" / "tiny", 0o755)
    assert finished.returncode == 5, finished.stderr
    assert _one_error_line(finished.stderr) == (
        "error: cannot write plots/tiny/run_folder.txt: Permission denied; the run's results are kept in "
        "runs/tiny; once that is fixed, draw the figures with python -m source.plotting runs/tiny --out plots/tiny\n"
    )
    assert "test accuracy: " in finished.stdout
    assert _splits(workspace / "runs" / "tiny")[-1] == "test"
    assert load_checkpoint(workspace / "runs" / "tiny" / "last.pt")["finished"]


def test_a_label_with_dollar_signs_is_drawn_as_written(workspace, capsys):
    assert main.main([*ARGUMENTS, "--set", "experiment.label=$\\undefinedmacro{$"]) == 0
    assert capsys.readouterr().err == ""
    assert (workspace / "plots" / "tiny" / "learning_rate.png").stat().st_size > 0


def test_a_comparison_whose_figures_fail_keeps_its_results_and_says_so(workspace, monkeypatch, capsys):
    tiny = tiny_run.TINY.replace("[optimizer]\nname = lab_pal\n", "").replace("name = tiny", "name = compare")
    (workspace / "compare.txt").write_text(tiny + "[comparison]\n    [[sgd]]\n    label = SGD\n    optimizer = sgd\n")

    def cannot_draw(figure, path, **options):
        raise ValueError("a font went missing")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", cannot_draw)
    assert main.main(["--config", "compare.txt"]) == 5
    error = _one_error_line(capsys.readouterr().err)
    assert error == (
        "error: cannot draw runs/compare/learning_rate.png: ValueError: a font went missing; the results are "
        "written: runs/compare/results.csv, runs/compare/results.md\n"
    )
    assert "| finished |" in (workspace / "runs" / "compare" / "results.md").read_text()


def _signalled_at(monkeypatch, owner, name, condition=lambda self: True):
    """Send this process SIGTERM when ``owner.<name>`` is called (and ``condition(self)`` holds)."""
    original = getattr(owner, name)

    def signalled(self, *arguments, **options):
        if condition(self):
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *arguments, **options)

    monkeypatch.setattr(owner, name, signalled)


def test_sigterm_in_the_final_evaluation_stops_before_the_test_and_the_resume_tests(workspace, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        _signalled_at(patch, trainer.Trainer, "_evaluate_and_checkpoint", lambda self: self.state.step == 24)
        assert main.main(ARGUMENTS) == 143
    output = capsys.readouterr().out
    assert "stopped at step 24 of 24, before the test; continue with --resume" in output
    folder = workspace / "runs" / "tiny"
    assert "test" not in _splits(folder)
    assert main.main([*ARGUMENTS, "--resume"]) == 0
    assert _splits(folder).count("test") == 1
    _assert_same_end(folder, _uninterrupted(workspace))


def test_sigterm_in_the_test_stops_at_once_and_the_resume_tests(workspace, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        _signalled_at(patch, trainer.Trainer, "_test_best_checkpoint")
        assert main.main(ARGUMENTS) == 143
    assert capsys.readouterr().err == "aborted; the last checkpoint is kept, continue with --resume\n"
    folder = workspace / "runs" / "tiny"
    assert "test" not in _splits(folder) and not load_checkpoint(folder / "last.pt")["finished"]
    assert main.main([*ARGUMENTS, "--resume"]) == 0
    assert _splits(folder).count("test") == 1


def test_sigterm_while_drawing_stops_at_once_and_keeps_the_results(workspace, monkeypatch, capsys):
    original = main.plot_runs

    def signalled(*arguments, **options):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*arguments, **options)

    monkeypatch.setattr(main, "plot_runs", signalled)
    assert main.main(ARGUMENTS) == 143
    assert capsys.readouterr().err == (
        "stopped while drawing the figures; the run's results are kept in runs/tiny; draw them with "
        "python -m source.plotting runs/tiny --out plots/tiny\n"
    )
    assert _splits(workspace / "runs" / "tiny")[-1] == "test"


@pytest.mark.parametrize("line", ["{}", "[1, 2]", json.dumps({"step": 3, "split": "validation", "accuracy": "high"})])
def test_a_damaged_metrics_record_is_found_when_the_resume_starts(workspace, capsys, line):
    run_experiment(load_configuration("tiny.txt"), stop_after_steps=12)
    metrics = workspace / "runs" / "tiny" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join([lines[0], line + "\n", *lines[1:]]))
    before = metrics.read_bytes()
    assert main.main([*ARGUMENTS, "--resume"]) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert error.startswith("error: runs/tiny/metrics.jsonl, line 2: not a metrics record: ")
    assert metrics.read_bytes() == before
    assert _step_of(metrics.parent / "last.pt") == 12
