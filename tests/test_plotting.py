"""Figures and results tables from metrics files, and the plotting command's input checks."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from source.configuration import format_configuration
from source.plotting import PlottedRun, legend_label, plot_runs
from source.plotting.curves import label_log_axis
from source.plotting.results import collect_entries, result_rows
from source.plotting import __main__ as plotting_command
from source.registries import load_configuration

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPOSITORY = Path(__file__).resolve().parents[1]


def _configuration(tmp_path, *overrides):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    return load_configuration(empty, list(overrides))


def _write_records(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _run_folder(tmp_path, name, records, *overrides):
    """A run folder as a finished run leaves it: its configuration.txt and metrics.jsonl."""
    folder = tmp_path / name
    folder.mkdir()
    configuration = _configuration(tmp_path, f"experiment.name={name}", *overrides)
    (folder / "configuration.txt").write_text(format_configuration(configuration, ["test run"]))
    _write_records(folder / "metrics.jsonl", records)
    return folder


def _classification_records(seed_shift):
    """Records with every optional key: passes, batch sizes, a measurement and a failure event."""
    return [
        {"step": 0, "split": "event", "event": "measurement", "learning_rate": 0.2, "step_size": 0.5},
        {"step": 5, "split": "training", "loss": 1.0 + seed_shift, "accuracy": 0.5, "learning_rate": 0.2,
         "training_batch_size": 32, "forward_passes": 30, "backward_passes": 6, "step_size": 0.5},
        {"step": 7, "split": "event", "event": "failure", "reason": "the line had no minimum"},
        {"step": 10, "split": "training", "loss": 0.5 + seed_shift, "accuracy": 0.7, "learning_rate": 0.1,
         "training_batch_size": 64, "forward_passes": 40, "backward_passes": 11},
        {"step": 10, "split": "validation", "loss": 0.6, "accuracy": 0.8 - seed_shift, "epoch": 1.0,
         "elapsed_seconds": 2.0},
        {"step": 20, "split": "validation", "loss": 0.5, "accuracy": 0.75, "epoch": 2.0, "elapsed_seconds": 4.0},
        {"step": 20, "split": "test", "loss": 0.6, "accuracy": 0.7 + seed_shift, "best_step": 10,
         "elapsed_seconds": 4.5 + seed_shift, "forward_passes": 41, "backward_passes": 12},
    ]  # fmt: skip


def test_legend_label_names_label_and_explicit_hyper_parameters(tmp_path):
    configuration = _configuration(
        tmp_path,
        "experiment.label=SGD",
        "optimizer.name=sgd",
        "optimizer.arguments.lr=0.1",
        "optimizer.arguments.nesterov=true",
        "schedule.name=MultiStepLR",
        "schedule.arguments.milestones=75000, 112500",
        "schedule.arguments.gamma=0.1",
    )
    assert legend_label(configuration) == "SGD (lr 0.1, nesterov true; MultiStepLR milestones 75000/112500, gamma 0.1)"
    assert legend_label(_configuration(tmp_path, "experiment.name=plain")) == "plain"


def test_figures_of_several_seeds_and_events_as_png_and_pdf(tmp_path):
    runs = [
        PlottedRun("LABPAL (step_adaptation 1.8)", [_write_records(tmp_path / f"{seed}.jsonl", _classification_records(
            seed / 100)) for seed in range(3)], "LABPAL"),
        PlottedRun("SGD", _write_records(tmp_path / "sgd.jsonl", _classification_records(0.05))),
    ]  # fmt: skip
    written = plot_runs(runs, tmp_path / "figures", dataset="digits", model="small_cnn")
    assert [path.name for path in written] == [
        "learning_rate.png",
        "training_loss.png",
        "validation_accuracy.png",
        "test_accuracy.png",
        "training_batch_size.png",
    ]
    for path in written:
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        assert path.with_suffix(".pdf").read_bytes().startswith(b"%PDF")


def test_figures_leave_out_what_older_metrics_files_lack(tmp_path):
    records = [
        {"step": 10, "split": "training", "loss": 1.0, "accuracy": 0.5, "learning_rate": 0.1},
        {"step": 10, "split": "validation", "loss": 0.6, "accuracy": 0.7, "epoch": 1.0},
    ]
    written = plot_runs([PlottedRun("old", _write_records(tmp_path / "old.jsonl", records))], tmp_path / "f",
                        dataset="digits", model="small_cnn")  # fmt: skip
    assert [path.name for path in written] == ["learning_rate.png", "training_loss.png", "validation_accuracy.png"]


def test_results_aggregate_seeds_and_leave_missing_values_empty(tmp_path):
    comparison = tmp_path / "cmp"
    comparison.mkdir()
    (comparison / "configuration.txt").write_text(
        "[experiment]\nname = cmp\n[comparison]\nseeds = 0, 1\n    [[lab]]\n    label = L\n    optimizer = lab_pal\n"
        "    [[new]]\n    label = N\n    optimizer = adam\n"
    )
    (comparison / "lab").mkdir()
    for seed in (0, 1):
        _run_folder(comparison / "lab", f"seed_{seed}", _classification_records(seed / 10),
                    "experiment.label=L", f"experiment.seed={seed}")  # fmt: skip
    columns, rows = result_rows(collect_entries([comparison]))
    assert columns[6:10] == [
        "best_validation_accuracy_mean",
        "best_validation_accuracy_std",
        "test_accuracy_mean",
        "test_accuracy_std",
    ]
    lab, new = rows
    # Best validation per seed: 0.8 and max(0.7, 0.75) = 0.75.
    assert lab["best_validation_accuracy_mean"] == pytest.approx(0.775)
    assert lab["best_validation_accuracy_std"] == pytest.approx(statistics.stdev([0.8, 0.75]))
    assert lab["test_accuracy_mean"] == pytest.approx(0.75)
    assert lab["final_training_loss_mean"] == pytest.approx(0.55)
    assert lab["wall_time_seconds_mean"] == pytest.approx(4.55)
    assert (lab["forward_passes"], lab["backward_passes"], lab["seeds"], lab["status"]) == (41, 12, "0 1", "finished")
    assert new["status"] == "not started" and new["test_accuracy_mean"] is None and new["forward_passes"] is None


def test_regression_results_use_rmse_columns_and_the_lowest_validation_rmse(tmp_path):
    records = [
        {"step": 5, "split": "training", "loss": 900.0, "rmse": 30.0, "learning_rate": 0.01},
        {"step": 5, "split": "validation", "loss": 800.0, "rmse": 60.0, "epoch": 1.0, "elapsed_seconds": 1.0},
        {"step": 10, "split": "validation", "loss": 700.0, "rmse": 55.0, "epoch": 2.0, "elapsed_seconds": 2.0},
    ]
    folder = _run_folder(tmp_path, "diabetes", records, "data.name=diabetes", "model.name=mlp")
    columns, rows = result_rows(collect_entries([folder]))
    assert "best_validation_rmse_mean" in columns and "test_rmse_mean" in columns
    assert rows[0]["best_validation_rmse_mean"] == 55.0 and rows[0]["test_rmse_mean"] is None
    assert rows[0]["wall_time_seconds_mean"] == 2.0
    assert rows[0]["status"] == "incomplete (0/1 seeds finished)"
    written = plot_runs([PlottedRun("mlp", folder / "metrics.jsonl")], tmp_path / "f", dataset="diabetes", model="mlp")
    assert [path.name for path in written] == ["learning_rate.png", "training_loss.png", "validation_rmse.png"]


def _bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    untrained = _run_folder(tmp_path, "untrained", [])
    (untrained / "metrics.jsonl").unlink()
    broken = _run_folder(tmp_path, "broken", [{"step": 1, "split": "training", "loss": 1.0}])
    with open(broken / "metrics.jsonl", "a") as file:
        file.write("{not json\n{}\n")
    run = _run_folder(tmp_path, "run", _classification_records(0))
    (tmp_path / "a_file").write_text("not a folder")

    def damaged(name, line):
        records = _classification_records(0)
        folder = _run_folder(tmp_path, name, records)
        lines = (folder / "metrics.jsonl").read_text().splitlines(keepends=True)
        lines.insert(2, line + "\n")
        (folder / "metrics.jsonl").write_text("".join(lines))
        return str(folder)

    validation = {"step": 15, "split": "validation", "loss": 0.5}
    return {
        "--out an existing file": ([str(run), "--out", str(tmp_path / "a_file")], ["a_file is a file, not a folder"]),
        "--out inside a file": ([str(run), "--out", str(tmp_path / "a_file" / "x")], ["a_file is a file"]),
        "an empty record": ([damaged("empty_record", "{}"), "--out", "x"],
                            ["metrics.jsonl, line 3: not a metrics record: its step None"]),
        "a list as a record": ([damaged("list", "[1, 2]"), "--out", "x"], ["line 3: not a metrics record: a JSON list"]),
        "no validation accuracy": ([damaged("no_accuracy", json.dumps(validation)), "--out", "x"],
                                   ["line 3: not a metrics record: its validation record has no accuracy or rmse"]),
        "a validation accuracy as text": (
            [damaged("text_accuracy", json.dumps({**validation, "accuracy": "high"})), "--out", "x"],
            ["line 3: not a metrics record: its accuracy 'high' is not a number"],
        ),
        "missing folder": ([str(tmp_path / "absent")], ["absent is not a folder"]),
        "no configuration": ([str(tmp_path / "empty")], ["empty has no configuration.txt"]),
        "no metrics": ([str(untrained), "--out", "x"], ["untrained has no metrics yet"]),
        "broken metrics": ([str(broken), "--out", "x"], ["metrics.jsonl, line 2: not a JSON record"]),
        "run folder without --out": ([str(run)], ["give --out DIR"]),
        "no folder": ([], ["the following arguments are required: FOLDER", "--help"]),
    }


BAD_FOLDER_CASES = [
    "--out an existing file",
    "--out inside a file",
    "an empty record",
    "a list as a record",
    "no validation accuracy",
    "a validation accuracy as text",
    "missing folder",
    "no configuration",
    "no metrics",
    "broken metrics",
    "run folder without --out",
    "no folder",
]


@pytest.mark.parametrize("case", BAD_FOLDER_CASES)
def test_plotting_command_refuses_bad_folders_with_one_line(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    arguments, fragments = _bad_folders(tmp_path)[case]
    assert plotting_command.main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    for fragment in fragments:
        assert fragment in error
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("low, high", [(1.9, 3.1), (0.3, 1.9), (2.001, 2.004), (1e-3, 5e-2), (2e-4, 1.0), (1e-9, 1.0)])
def test_log_axes_label_enough_ticks_to_read_values_off(low, high):
    figure = Figure()
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([0, 1, 2], [low, (low * high) ** 0.5, high])
    axes.set_yscale("log")
    label_log_axis(axes.yaxis)
    figure.canvas.draw()
    bottom, top = axes.get_ylim()
    labelled = [(tick.get_loc(), tick.label1.get_text()) for tick in axes.yaxis.get_major_ticks()
                if bottom <= tick.get_loc() <= top and tick.label1.get_visible() and tick.label1.get_text()]
    assert 4 <= len(labelled) <= 12, labelled
    for location, text in labelled:
        assert float(text) == pytest.approx(location, rel=1e-3)  # plain numbers a reader can read


def test_an_unwritable_out_folder_is_refused_with_one_line(tmp_path):
    """Without root's capabilities (setpriv), so that chmod binds the command as it binds any user."""
    run = _run_folder(tmp_path, "run", _classification_records(0))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0 else []
    finished = subprocess.run(
        [*prefix, sys.executable, "-m", "source.plotting", str(run), "--out", str(locked / "figures")],
        cwd=REPOSITORY, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert finished.returncode == 2
    assert finished.stderr == f"error: {locked / 'figures'}: the folder {locked} is not writable\n"


def test_labels_are_drawn_as_plain_text(tmp_path):
    """A "$" in a label is a dollar sign: mathtext would refuse this one (an unknown macro, unpaired braces)."""
    label = "$\\undefinedmacro{$ costs $5"
    metrics = _write_records(tmp_path / "metrics.jsonl", _classification_records(0))
    written = plot_runs([PlottedRun(label, metrics)], tmp_path / "plots", dataset="digits$", model="$mlp")
    assert [path.name for path in written] == [
        "learning_rate.png", "training_loss.png", "validation_accuracy.png", "test_accuracy.png",
        "training_batch_size.png",
    ]  # fmt: skip


def test_a_figure_that_cannot_be_drawn_leaves_the_tables_and_says_so(tmp_path, monkeypatch, capsys):
    run = _run_folder(tmp_path, "run", _classification_records(0))

    def refuse(figure, path, **options):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", refuse)
    assert plotting_command.main([str(run), "--out", str(tmp_path / "out")]) == 5
    out = tmp_path / "out"
    assert capsys.readouterr().err == (
        f"error: cannot write {out / 'learning_rate.png'}: No space left on device; the results are written: "
        f"{out / 'results.csv'}, {out / 'results.md'}\n"
    )
    assert (out / "results.csv").read_text().startswith("entry,label")
