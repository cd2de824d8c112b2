"""The report over several experiments: test table, performance profile, figure grids, and the command."""

import csv

import pytest

from source.comparison.grid import expand_grids
from source.plotting.paper_report import PROFILE_TAUS, group_experiments, performance_profile, tabulate_test_results
from source.plotting.results import collect_entries
from source.plotting import __main__ as plotting_command
from tests.constructed_runs import comparison_folder

COMPARISON = """\
[experiment]
name = {name}
[data]
name = {data}
[model]
name = {model}
[comparison]
seeds = 0, 1
    [[lab_pal]]
    label = LABPAL
    optimizer = lab_pal
    [[sgd]]
    label = SGD
    optimizer = sgd
{sgd_sweep}    [[adam]]
    label = Adam
    optimizer = adam
"""
SGD_SWEEP = "        [[[sweep]]]\n        lr = 0.1, 1.0\n"

# digits small_cnn: SGD swept; lr 0.1 is best on validation (test 0.90 and 0.94), lr 1.0 worse on
# validation but best on test: the table shows lr 0.1's 0.92.
SMALL_CNN = {
    "lab_pal": {0: ([0.90], 0.95), 1: ([0.90], 0.93)},
    "sgd/lr_0.1": {0: ([0.93], 0.90), 1: ([0.95], 0.94)},
    "sgd/lr_1": {0: ([0.70], 0.99), 1: ([0.70], 0.99)},
    "adam": {0: ([0.80], 0.80), 1: ([0.80], 0.84)},
}
# digits mlp: Adam's second seed has not finished.
MLP = {
    "lab_pal": {0: ([0.90], 0.88), 1: ([0.90], 0.90)},
    "sgd": {0: ([0.90], 0.85), 1: ([0.90], 0.87)},
    "adam": {0: ([0.90], 0.875), 1: ([0.90], None)},
}
# diabetes mlp, measured in RMSE: in the table, not in the profile.
DIABETES = {
    "lab_pal": {0: ([60.0], 55.0), 1: ([62.0], 57.0)},
    "sgd": {0: ([58.0], 54.0), 1: ([58.0], 54.0)},
    "adam": {0: ([70.0], 65.0), 1: ([70.0], 67.0)},
}


def _folders(root):
    folders = []
    for name, data, model, sweep, results, quality in (
        ("a", "digits", "small_cnn", SGD_SWEEP, SMALL_CNN, "accuracy"),
        ("b", "digits", "mlp", "", MLP, "accuracy"),
        ("c", "diabetes", "mlp", "", DIABETES, "rmse"),
    ):
        (root / name).mkdir()
        text = COMPARISON.format(name=name, data=data, model=model, sgd_sweep=sweep)
        folders.append(comparison_folder(root / name, text, results, quality))
    return folders


@pytest.fixture
def folders(tmp_path):
    return _folders(tmp_path)


def test_test_table_holds_the_means_and_standard_deviations_over_seeds(folders):
    experiments = group_experiments(collect_entries(folders))
    assert [experiment.name for experiment in experiments] == ["digits small_cnn", "digits mlp", "diabetes mlp"]
    table = tabulate_test_results(experiments)
    assert list(table) == ["LABPAL", "SGD", "Adam"]
    expected = {
        ("LABPAL", "digits small_cnn"): (0.94, 0.02**0.5 / 10),
        ("SGD", "digits small_cnn"): (0.92, 0.08**0.5 / 10),
        ("Adam", "digits small_cnn"): (0.82, 0.08**0.5 / 10),
        ("LABPAL", "digits mlp"): (0.89, 0.02**0.5 / 10),
        ("SGD", "digits mlp"): (0.86, 0.02**0.5 / 10),
        ("Adam", "digits mlp"): (0.875, None),
        ("LABPAL", "diabetes mlp"): (56.0, 2**0.5),
        ("SGD", "diabetes mlp"): (54.0, 0.0),
        ("Adam", "diabetes mlp"): (66.0, 2**0.5),
    }
    for (label, experiment), (mean, std) in expected.items():
        cell = table[label][experiment]
        assert cell.mean == pytest.approx(mean)
        assert cell.std == (None if std is None else pytest.approx(std))
    assert table["Adam"]["digits mlp"].status == "incomplete: 1/2 runs ended"
    assert table["SGD"]["digits small_cnn"].status == "finished"


def test_performance_profile_counts_the_experiments_within_tau_of_the_best(folders):
    experiments = group_experiments(collect_entries(folders))
    profile = performance_profile(tabulate_test_results(experiments), ["digits small_cnn", "digits mlp"])
    # Gaps to the best: LABPAL 0 and 0; SGD 0.02 and 0.03; Adam 0.12 and 0.015.
    at = {tau: PROFILE_TAUS.index(tau) for tau in (0.0, 0.014, 0.015, 0.02, 0.029, 0.03, 0.1)}
    expected = {
        "LABPAL": {0.0: 1.0, 0.014: 1.0, 0.015: 1.0, 0.02: 1.0, 0.029: 1.0, 0.03: 1.0, 0.1: 1.0},
        "SGD": {0.0: 0.0, 0.014: 0.0, 0.015: 0.0, 0.02: 0.5, 0.029: 0.5, 0.03: 1.0, 0.1: 1.0},
        "Adam": {0.0: 0.0, 0.014: 0.0, 0.015: 0.5, 0.02: 0.5, 0.029: 0.5, 0.03: 0.5, 0.1: 0.5},
    }
    for label, values in expected.items():
        assert {tau: profile[label][index] for tau, index in at.items()} == values
    assert PROFILE_TAUS[0] == 0.0 and PROFILE_TAUS[-1] == 0.1


def test_plotting_command_writes_the_report_of_several_experiments(folders, tmp_path, capsys):
    out = tmp_path / "report"
    assert plotting_command.main([*map(str, folders), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / "test_accuracy_table.md").read_text()
    assert table in printed
    lines = table.splitlines()
    assert lines[0] == "| optimizer | digits small_cnn | digits mlp | diabetes mlp (RMSE) |"
    assert lines[2] == "| LABPAL | **0.9400 ± 0.0141** | **0.8900 ± 0.0141** | 56.0000 ± 1.4142 |"
    assert lines[3] == "| SGD | 0.9200 ± 0.0283 | 0.8600 ± 0.0141 | **54.0000 ± 0.0000** |"
    assert lines[4] == "| Adam | 0.8200 ± 0.0283 | 0.8750 (incomplete: 1/2 runs ended) | 66.0000 ± 1.4142 |"
    with open(out / "test_accuracy_table.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0][:4] == ["optimizer", "digits small_cnn", "digits small_cnn std", "digits small_cnn status"]
    assert rows[2][:4] == ["SGD", "0.92", "0.028284271", "finished"]
    for name in ("learning_rate", "training_loss", "validation_accuracy", "validation_rmse", "test_accuracy",
                 "test_rmse", "performance_profile"):  # fmt: skip
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF"), name
    # Each experiment's own results, its sweep's sensitivity figure among them.
    assert (out / "digits_small_cnn" / "sensitivity.png").is_file()
    sgd = [row for row in csv.DictReader(open(out / "digits_small_cnn" / "results.csv")) if row["entry"] == "sgd"]
    assert sgd[0]["kind"] == "best" and sgd[0]["point"] == "lr=0.1"
    assert {path.name for path in (out / "digits_mlp").iterdir()} >= {"results.csv", "results.md", "test_accuracy.png"}


def test_report_problems_end_with_one_line(folders, tmp_path, capsys):
    assert plotting_command.main([*map(str, folders)]) == 2
    assert capsys.readouterr().err == (
        "error: give --out DIR: the folders hold several experiments, whose report goes there\n"
    )
    twice = tmp_path / "again"
    twice.mkdir()
    text = COMPARISON.format(name="a2", data="digits", model="mlp", sgd_sweep="")
    again = comparison_folder(twice, text, MLP)
    assert plotting_command.main([*map(str, folders), str(again), "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: digits mlp has several entries labelled 'Adam'") and error.count("\n") == 1


GRID_CASES = {
    "extra section": ("[grid]\ncomparisons = a.txt\n[training]\nbatch_size = 3\n", "holds only [grid]"),
    "unknown key": ("[grid]\ncomparison = a.txt\n", "unknown key comparison in [grid] (did you mean 'comparisons'?)"),
    "no files": ("[grid]\ncomparisons = ,\n", "[grid] comparisons is missing"),
    "missing file": ("[grid]\ncomparisons = a.txt, absent.txt\n", "names absent.txt, but"),
    "nested grid": ("[grid]\ncomparisons = a.txt, grid.txt\n", "names grid.txt, which is a grid file too"),
    "file twice": ("[grid]\ncomparisons = a.txt, ./a.txt\n", "is given twice"),
}


def test_a_grid_file_stands_for_the_comparison_files_it_names(tmp_path):
    (tmp_path / "a.txt").write_text("[experiment]\nname = a\n")
    (tmp_path / "b.txt").write_text("[experiment]\nname = b\n")
    (tmp_path / "grid.txt").write_text('[grid]\ncomparisons = """\n    a.txt\n    b.txt\n"""\n')
    assert expand_grids([tmp_path / "grid.txt"]) == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    assert expand_grids([tmp_path / "b.txt"]) == [str(tmp_path / "b.txt")]


@pytest.mark.parametrize("case", sorted(GRID_CASES))
def test_bad_grid_file_exits_2_with_one_line(tmp_path, monkeypatch, capsys, case):
    import main

    monkeypatch.chdir(tmp_path)
    text, fragment = GRID_CASES[case]
    (tmp_path / "a.txt").write_text("[experiment]\nname = a\n")
    (tmp_path / "grid.txt").write_text(text)
    assert main.main(["--config", "grid.txt"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and fragment in error
    assert not (tmp_path / "runs").exists()
