"""Comparisons of optimizers end to end: entries, runs per seed, resume, results table, figures, presets."""

import contextlib
import csv
import io
import runpy
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import main
from source.comparison import read_comparison
from source.optimizer import OPTIMIZERS, build_optimizer
from source.optimizer.schedules import build_schedule
from source.plotting import __main__ as plotting_command
from source.plotting import read_metrics
from source.registries import load_configuration
from source.training import build_experiment
from tests.tiny_run import LABPAL_NSGD_ENTRY, digits_comparison

REPOSITORY = Path(__file__).resolve().parents[1]

# Evaluations at 6 and 12; SGD's learning rate drops at steps 6 and 9.
COMPARE = digits_comparison(
    "cmp",
    steps=12,
    evaluate_every=6,
    entries=LABPAL_NSGD_ENTRY
    + """\
    [[sgd]]
    label = SGD
    optimizer = sgd
    schedule = MultiStepLR
        [[[arguments]]]
        lr = 0.1
        [[[schedule_arguments]]]
        milestones = 6, 9
""",
)

ENTRIES = ("lab_pal", "sgd")
FIGURES = ("learning_rate", "training_loss", "validation_accuracy", "test_accuracy", "training_batch_size")
RESULT_FILES = {"results.csv", "results.md", *(f"{name}{suffix}" for name in FIGURES for suffix in (".png", ".pdf"))}
COLUMNS = [
    "entry",
    "label",
    "optimizer",
    "kind",
    "point",
    "seeds",
    "best_validation_accuracy_mean",
    "best_validation_accuracy_std",
    "test_accuracy_mean",
    "test_accuracy_std",
    "final_training_loss_mean",
    "wall_time_seconds_mean",
    "forward_passes",
    "backward_passes",
    "status",
]


@dataclass(frozen=True)
class Finished:
    """A comparison trained once for the tests that read it: its working folder, status and output."""

    workspace: Path
    status: int
    output: str

    @property
    def folder(self):
        return self.workspace / "runs" / "cmp"


def _main(arguments):
    """Run main.main, returning its status and standard output."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        status = main.main(arguments)
    return status, output.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("finished")
    (workspace / "compare.txt").write_text(COMPARE.replace("tensorboard = false", "tensorboard = true"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        status, output = _main(["--config", "compare.txt"])
    return Finished(workspace, status, output)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A fresh working folder holding compare.txt."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "compare.txt").write_text(COMPARE)
    return tmp_path


def _read_csv(path):
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return reader.fieldnames, list(reader)


def _without_times(path):
    return [{key: value for key, value in record.items() if key != "elapsed_seconds"} for record in read_metrics(path)]


def _by_split(records, split):
    return [record for record in records if record["split"] == split]


def test_each_entry_and_seed_trains_as_an_ordinary_run_in_the_comparison_folder(finished):
    assert finished.status == 0
    for number, (entry, seed) in enumerate([(entry, seed) for entry in ENTRIES for seed in (0, 1)], start=1):
        run = finished.folder / entry / f"seed_{seed}"
        configuration = load_configuration(run / "configuration.txt")
        experiment = configuration["experiment"]
        assert (experiment["name"], experiment["seed"], experiment["runs_folder"]) == (
            f"seed_{seed}", seed, str(Path("runs") / "cmp" / entry)
        )
        assert experiment["label"] == {"lab_pal": "LABPAL-NSGD", "sgd": "SGD"}[entry]
        assert configuration["optimizer"]["name"] == entry
        if entry == "sgd":
            assert configuration["optimizer"]["arguments"] == {"lr": 0.1}
            assert configuration["schedule"] == {"name": "MultiStepLR", "arguments": {"milestones": [6, 9]}}
        last = torch.load(run / "last.pt", weights_only=True)
        assert last["finished"] and last["step"] == 12 and (run / "best.pt").is_file()
        assert [record["step"] for record in _by_split(read_metrics(run / "metrics.jsonl"), "validation")] == [6, 12]
        assert list(run.glob("events.out.tfevents.*"))
        label = configuration["experiment"]["label"]
        started = f"[{number}/4] {entry} ({label}) seed {seed}: starting in {Path('runs/cmp') / entry / f'seed_{seed}'}"
        assert started in finished.output
        assert f"[{number}/4] {entry} ({label}) seed {seed}: finished, test accuracy" in finished.output
    stored = load_configuration(finished.folder / "configuration.txt")
    assert stored.is_comparison and [entry.id for entry in read_comparison(stored).entries] == list(ENTRIES)


def test_results_table_has_one_row_per_entry_with_the_seeds_aggregated(finished):
    columns, rows = _read_csv(finished.folder / "results.csv")
    assert columns == COLUMNS
    assert [row["entry"] for row in rows] == list(ENTRIES)
    for row in rows:
        runs = [read_metrics(finished.folder / row["entry"] / f"seed_{seed}" / "metrics.jsonl") for seed in (0, 1)]
        best = [max(record["accuracy"] for record in _by_split(records, "validation")) for records in runs]
        tests = [_by_split(records, "test")[0] for records in runs]
        assert row["label"] == {"lab_pal": "LABPAL-NSGD", "sgd": "SGD"}[row["entry"]]
        assert (row["optimizer"], row["seeds"], row["status"]) == (row["entry"], "0 1", "finished")
        assert (row["kind"], row["point"]) == ("entry", "")
        assert float(row["best_validation_accuracy_mean"]) == pytest.approx(statistics.fmean(best), rel=1e-7)
        assert float(row["best_validation_accuracy_std"]) == pytest.approx(statistics.stdev(best), rel=1e-7)
        accuracies = [test["accuracy"] for test in tests]
        assert float(row["test_accuracy_mean"]) == pytest.approx(statistics.fmean(accuracies), rel=1e-7)
        assert float(row["test_accuracy_std"]) == pytest.approx(statistics.stdev(accuracies), rel=1e-7)
        losses = [_by_split(records, "training")[-1]["loss"] for records in runs]
        assert float(row["final_training_loss_mean"]) == pytest.approx(statistics.fmean(losses), rel=1e-7)
        times = [test["elapsed_seconds"] for test in tests]
        assert float(row["wall_time_seconds_mean"]) == pytest.approx(statistics.fmean(times), rel=1e-7)
        for passes in ("forward_passes", "backward_passes"):
            assert int(row[passes]) == round(statistics.fmean(test[passes] for test in tests))
    # SGD makes one forward and one backward pass a step.
    assert (rows[1]["forward_passes"], rows[1]["backward_passes"]) == ("12", "12")
    table = (finished.folder / "results.md").read_text()
    lines = table.splitlines()
    header = "| entry | label | optimizer | point | seeds | best validation accuracy | test accuracy |"
    assert lines[0].startswith(header)
    assert [line.split(" | ")[0] for line in lines[2:4]] == ["| lab_pal", "| sgd"] and lines[4] == ""
    mean, std = float(rows[0]["test_accuracy_mean"]), float(rows[0]["test_accuracy_std"])
    assert f"{mean:.4f} ± {std:.4f}" in lines[2]
    assert table in finished.output
    for shown in ("results.csv", "results.md", "test_accuracy.png", "tensorboard --logdir runs/cmp"):
        assert shown in finished.output


def test_every_figure_is_written_as_png_and_pdf(finished):
    for name in FIGURES:
        assert (finished.folder / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert (finished.folder / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    assert RESULT_FILES <= {path.name for path in finished.folder.iterdir()}


def test_an_existing_comparison_is_refused_without_resume(finished, monkeypatch, capsys):
    monkeypatch.chdir(finished.workspace)
    table = (finished.folder / "results.csv").read_bytes()
    assert main.main(["--config", "compare.txt"]) == 2
    error = capsys.readouterr().err
    assert error == (
        "error: runs/cmp already exists: continue that comparison with --resume, or start a new one under "
        "another name with --set experiment.name=NAME\n"
    )
    assert (finished.folder / "results.csv").read_bytes() == table


def test_resuming_a_finished_comparison_trains_nothing(finished, monkeypatch):
    monkeypatch.chdir(finished.workspace)
    metrics = finished.folder / "sgd" / "seed_1" / "metrics.jsonl"
    before = metrics.read_bytes()
    status, output = _main(["--config", "compare.txt", "--resume"])
    assert status == 0
    assert output.count("finished already, skipped") == 4 and "starting" not in output
    assert metrics.read_bytes() == before


def test_resume_refuses_a_changed_entry(finished, monkeypatch, capsys):
    monkeypatch.chdir(finished.workspace)
    assert main.main(["--config", "compare.txt", "--resume", "--set", "comparison.sgd.arguments.lr=0.2"]) == 2
    error = capsys.readouterr().err
    assert "cannot resume runs/cmp: [comparison] [[sgd]] [[[arguments]]] lr differ" in error
    assert "resume with --config runs/cmp/configuration.txt" in error and error.count("\n") == 1


def test_plotting_command_redraws_the_same_files(finished, tmp_path, capsys):
    assert plotting_command.main([str(finished.folder), "--out", str(tmp_path / "again")]) == 0
    assert {path.name for path in (tmp_path / "again").iterdir()} == RESULT_FILES
    for name in ("results.csv", "results.md"):
        assert (tmp_path / "again" / name).read_text() == (finished.folder / name).read_text()
    assert (finished.folder / "results.md").read_text() in capsys.readouterr().out


def test_plotting_command_as_a_module_writes_into_the_one_comparison_folder(finished, monkeypatch):
    monkeypatch.chdir(finished.workspace)
    table = finished.folder / "results.csv"
    before = table.read_text()
    table.unlink()
    (finished.folder / "learning_rate.pdf").unlink()
    # What python -m source.plotting runs/cmp does, in this process.
    monkeypatch.setattr(sys, "argv", ["source.plotting", "runs/cmp"])
    monkeypatch.delitem(sys.modules, "source.plotting.__main__")
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("source.plotting", run_name="__main__", alter_sys=True)
    assert exited.value.code == 0
    assert table.read_text() == before and (finished.folder / "learning_rate.pdf").is_file()


def test_plotting_run_folders_joins_the_seeds_of_an_entry(finished, tmp_path):
    runs = [finished.folder / entry / f"seed_{seed}" for entry, seed in (("sgd", 0), ("sgd", 1), ("lab_pal", 0))]
    assert plotting_command.main([*map(str, runs), "--out", str(tmp_path)]) == 0
    _, rows = _read_csv(tmp_path / "results.csv")
    _, comparison_rows = _read_csv(finished.folder / "results.csv")
    assert [(row["entry"], row["seeds"]) for row in rows] == [("sgd", "0 1"), ("lab_pal", "0")]
    assert rows[0] == comparison_rows[1]
    test = _by_split(read_metrics(runs[2] / "metrics.jsonl"), "test")[0]
    assert float(rows[1]["test_accuracy_mean"]) == pytest.approx(test["accuracy"], rel=1e-7)
    assert rows[1]["test_accuracy_std"] == ""


def test_one_seed_gives_every_entry_the_same_split_and_initial_weights(workspace):
    comparison = read_comparison(load_configuration("compare.txt"))

    def start(entry, seed):
        experiment = build_experiment(comparison.run_configuration(entry, seed))
        return experiment.model.state_dict(), experiment.splits.train.indices

    lab_pal, sgd = comparison.entries
    (first_weights, first_split), (second_weights, second_split) = start(lab_pal, 0), start(sgd, 0)
    assert list(first_split) == list(second_split)
    assert all(torch.equal(first_weights[name], second_weights[name]) for name in first_weights)
    other_weights, _ = start(sgd, 1)
    assert not torch.equal(first_weights["features.0.weight"], other_weights["features.0.weight"])


def test_an_interrupted_comparison_resumes_exactly_and_skips_finished_runs(workspace, finished):
    arguments = ["--config", "compare.txt", "--set", "comparison.seeds=0", "--set", "experiment.name=pieces"]
    status, output = _main([*arguments, "--stop-after-steps", "16"])
    assert status == 0
    assert "[2/2] sgd (SGD) seed 0: starting" in output and "comparison stopped; continue it with --resume" in output
    folder = workspace / "runs" / "pieces"
    assert torch.load(folder / "sgd" / "seed_0" / "last.pt", weights_only=True)["step"] == 4
    _, rows = _read_csv(folder / "results.csv")
    assert [row["status"] for row in rows] == ["finished", "incomplete (0/1 seeds finished)"]
    assert rows[1]["test_accuracy_mean"] == "" and rows[1]["best_validation_accuracy_mean"] == ""
    # An entry added on resume trains too; the finished one is skipped, the stopped one continues.
    added = ["--set", "comparison.adam.label=Adam", "--set", "comparison.adam.optimizer=adam"]
    status, output = _main([*arguments, *added, "--resume"])
    assert status == 0
    assert "[1/3] lab_pal (LABPAL-NSGD) seed 0: finished already, skipped" in output
    assert "[2/3] sgd (SGD) seed 0: resuming from step 4" in output
    assert "[3/3] adam (Adam) seed 0: starting" in output
    _, rows = _read_csv(folder / "results.csv")
    assert [(row["entry"], row["status"]) for row in rows] == [
        ("lab_pal", "finished"), ("sgd", "finished"), ("adam", "finished")
    ]
    pieces, whole = folder / "sgd" / "seed_0", finished.folder / "sgd" / "seed_0"
    pieces_last = torch.load(pieces / "last.pt", weights_only=True)
    whole_last = torch.load(whole / "last.pt", weights_only=True)
    assert all(torch.equal(pieces_last["model"][name], whole_last["model"][name]) for name in whole_last["model"])
    assert _without_times(pieces / "metrics.jsonl") == _without_times(whole / "metrics.jsonl")


# Each case: replacements in COMPARE (old, new), extra arguments, fragments of the one-line message.
BAD_COMPARISONS = {
    "no entries": (
        [(COMPARE[COMPARE.index("    [[lab_pal]]"):], "")], [], ["compare.txt: [comparison] has no entries"]
    ),
    "unknown optimizer": (
        [("optimizer = sgd", "optimizer = sgdd")],
        [],
        ["compare.txt: [comparison] [[sgd]] optimizer = 'sgdd'", "did you mean 'sgd'"],
    ),
    "unknown optimizer argument": (
        [("lr = 0.1", "lrr = 0.1")],
        [],
        ["compare.txt: [comparison] [[sgd]]: unknown argument 'lrr' for optimizer 'sgd'", "did you mean 'lr'"],
    ),
    "optimizer value refused": (
        [("lr = 0.1", "lr = -1")],
        [],
        ["compare.txt: [comparison] [[sgd]]: optimizer 'sgd'", "Invalid learning rate: -1"],
    ),
    "unknown schedule": (
        [("schedule = MultiStepLR", "schedule = multisteplr")],
        [],
        ["[comparison] [[sgd]] schedule = 'multisteplr'", "'MultiStepLR'"],
    ),
    "unknown schedule argument": (
        [("milestones = 6, 9", "milestone = 6, 9")],
        [],
        ["compare.txt: [comparison] [[sgd]]: MultiStepLR takes no argument milestone", "milestones"],
    ),
    "schedule for a line search": (
        [],
        ["--set", "comparison.lab_pal.schedule=StepLR", "--set", "comparison.lab_pal.schedule_arguments.step_size=5"],
        ["compare.txt: [comparison] [[lab_pal]]: ", "own learning rate"],
    ),
    "duplicate labels": (
        [("label = SGD", "label = LABPAL-NSGD")],
        [],
        ["[comparison] [[sgd]] label = 'LABPAL-NSGD' is the label of [comparison] [[lab_pal]] too"],
    ),
    "missing label": (
        [("    label = SGD\n", "")], [], ["[comparison] [[sgd]] label is missing: expected a non-empty text"]
    ),
    "missing optimizer": (
        [("    optimizer = sgd\n", "")],
        [],
        ["[comparison] [[sgd]] optimizer is missing: expected a known optimizer", "lab_pal"],
    ),
    "entry id not a folder name": (
        [("[[sgd]]", "[[s.g.d]]")],
        [],
        ["compare.txt: [comparison]: entry [comparison] [[s.g.d]]", "letters, digits, '_' and '-'"],
    ),
    "unknown key in an entry": (
        [("    optimizer = sgd\n", "    optimizer = sgd\n    lr = 0.1\n")],
        [],
        ["unknown key lr in [comparison] [[sgd]]", "arguments"],
    ),
    "bad seeds": ([("seeds = 0, 1", "seeds = 0, -1")], [], ["[comparison] seeds = '0, -1'", "distinct integers >= 0"]),
    "optimizer section beside a comparison": (
        [("[training]", "[optimizer]\nname = sgd\n[training]")],
        [],
        ["compare.txt: [optimizer] cannot be set in a file with [comparison]", "[comparison] [[<entry id>]]"],
    ),
    "optimizer override of a comparison": (
        [],
        ["--set", "schedule.name=StepLR"],
        ["--set schedule.name=StepLR: [schedule] cannot be set in a file with [comparison]"],
    ),
    "resume without a comparison": ([], ["--resume"], ["cannot resume runs/cmp: it does not exist"]),
}


@pytest.mark.parametrize("case", sorted(BAD_COMPARISONS))
def test_bad_comparison_exits_2_with_one_line_before_any_training(workspace, capsys, case):
    replacements, arguments, fragments = BAD_COMPARISONS[case]
    text = COMPARE
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    (workspace / "compare.txt").write_text(text)
    assert main.main(["--config", "compare.txt", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    for fragment in fragments:
        assert fragment in error
    assert not (workspace / "runs").exists()


COMPARISON_PRESETS = sorted((REPOSITORY / "configs").glob("compare_*.txt"))
PAPER_PAIRS = {
    f"compare_{data}_{model}"
    for data in ("cifar10", "cifar100", "svhn")
    for model in ("resnet20", "mobilenet_v2_cifar", "densenet40")
}
PAPER_ENTRIES = {
    "lab_pal_nsgd": "lab_pal",
    "lab_pal_sgd": "lab_pal",
    "sgd": "sgd",
    "pal": "pal",
    "sls": "sls",
    "gols_i": "gols_i",
    "pls": "pls",
}


def test_presets_hold_the_digits_comparison_and_every_paper_pair():
    assert PAPER_PAIRS | {"compare_digits"} <= {path.stem for path in COMPARISON_PRESETS}


@pytest.mark.parametrize("path", COMPARISON_PRESETS, ids=lambda path: path.stem)
def test_comparison_preset_is_valid_and_every_entry_builds(path):
    comparison = read_comparison(load_configuration(path))
    configuration = comparison.configuration
    assert configuration["experiment"]["name"] == path.stem
    modes = {entry.arguments.get("mode", "NSGD") for entry in comparison.entries if entry.optimizer == "lab_pal"}
    assert modes == {"NSGD", "SGD"}
    if path.stem == "compare_digits":
        assert {entry.optimizer for entry in comparison.entries} == set(OPTIMIZERS)
        comparison.check_entries_build()
        return
    assert configuration["training"]["batch_size"] == 128
    assert {entry.id: entry.optimizer for entry in comparison.entries} == PAPER_ENTRIES
    paper = path.stem in PAPER_PAIRS
    if paper:
        assert configuration["training"]["training_steps"] == 150_000
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    for entry in comparison.entries:
        optimizer = build_optimizer(
            entry.optimizer, model, dict(entry.arguments), training_set_size=40_000, inference_batch_size=128
        )
        schedule = build_schedule(
            entry.schedule, optimizer, dict(entry.schedule_arguments), configuration["training"]["training_steps"]
        )
        if entry.optimizer == "sgd" and paper:
            assert optimizer.param_groups[0]["lr"] == 0.1
            assert dict(schedule.milestones) == {75_000: 1, 112_500: 1} and schedule.gamma == 0.1

