"""Sweeps in comparisons: expansion into points, the point chosen on validation, sensitivity figures, bad input."""

import contextlib
import csv
import io
from pathlib import Path

import pytest

import main
from source.comparison import read_comparison
from source.comparison.grid import expand_grids
from source.plotting.results import collect_entries, result_rows, sensitivity_lines, write_results
from source.registries import load_configuration
from source.training import RunFolder
from tests.constructed_runs import comparison_folder
from tests.tiny_run import ADAM_ENTRY, LABPAL_NSGD_ENTRY, digits_comparison

# One seed; evaluations at 3 and 6.
SWEEP = digits_comparison(
    "swept",
    steps=6,
    evaluate_every=3,
    seeds="0",
    entries=LABPAL_NSGD_ENTRY
    + """\
        [[[sweep]]]
        step_adaptation = 1.2, 1.8
        measurement_interval = 500, 1000
    [[sgd]]
    label = SGD
    optimizer = sgd
    schedule = MultiStepLR
        [[[arguments]]]
        momentum = 0.9
        [[[schedule_arguments]]]
        milestones = 3, 5
        [[[sweep]]]
        lr = 0.01, 0.1
        gamma = 0.5,
"""
    + ADAM_ENTRY,
)


def _main(arguments):
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        status = main.main(arguments)
    return status, output.getvalue()


def _read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.txt").write_text(SWEEP)
    return tmp_path


def test_a_swept_entry_becomes_one_run_per_combination_and_seed_with_a_label_naming_the_point(workspace):
    comparison = read_comparison(load_configuration("sweep.txt", ["comparison.seeds=0,1"]))
    points = [point for entry in comparison.entries for point in entry.points()]
    assert [point.id for point in points] == [
        "lab_pal/step_adaptation_1.2-measurement_interval_500",
        "lab_pal/step_adaptation_1.2-measurement_interval_1000",
        "lab_pal/step_adaptation_1.8-measurement_interval_500",
        "lab_pal/step_adaptation_1.8-measurement_interval_1000",
        "sgd/lr_0.01-gamma_0.5",
        "sgd/lr_0.1-gamma_0.5",
        "adam",
    ]
    assert len(comparison.runs()) == 2 * len(points)
    by_id = {point.id: point for point in points}
    lab_pal = by_id["lab_pal/step_adaptation_1.2-measurement_interval_1000"]
    assert lab_pal.label == "LABPAL-NSGD step_adaptation 1.2, measurement_interval 1000"
    assert lab_pal.arguments == {"step_adaptation": 1.2, "measurement_interval": 1000}
    assert (lab_pal.point, lab_pal.swept_entry, lab_pal.entry_id) == (lab_pal.arguments, "lab_pal", "lab_pal")
    # A swept argument goes where its class takes it: lr to the optimizer, gamma to the schedule.
    sgd = by_id["sgd/lr_0.1-gamma_0.5"]
    assert sgd.arguments == {"momentum": 0.9, "lr": 0.1}
    assert sgd.schedule_arguments == {"milestones": [3, 5], "gamma": 0.5}
    assert sgd.label == "SGD lr 0.1, gamma 0.5"
    configuration = comparison.run_configuration(sgd, 1)
    assert configuration["experiment"]["label"] == "SGD lr 0.1, gamma 0.5"
    assert configuration["optimizer"] == {"name": "sgd", "arguments": {"momentum": 0.9, "lr": 0.1}}
    assert configuration["schedule"]["arguments"] == {"milestones": [3, 5], "gamma": 0.5}
    assert RunFolder.of(configuration).path == Path("runs/swept/sgd/lr_0.1-gamma_0.5/seed_1")
    adam = comparison.run_configuration(by_id["adam"], 0)
    assert by_id["adam"].point == {} and RunFolder.of(adam).path == Path("runs/swept/adam/seed_0")


# Each case: replacements in SWEEP (old, new), extra arguments, fragments of the one-line message.
BAD_SWEEPS = {
    "unknown argument": (
        [("lr = 0.01, 0.1", "lrr = 0.01, 0.1")],
        [],
        ["sweep.txt: [comparison] [[sgd]] [[[sweep]]] lrr: lrr is not an argument of optimizer 'sgd' or schedule "
         "'MultiStepLR' (did you mean 'lr'?); sweep one of: lr, momentum"],
    ),
    "unknown argument from --set": (
        [],
        ["--set", "comparison.adam.sweep.betas2=0.9,0.99"],
        ["--set comparison.adam.sweep.betas2=0.9,0.99: [comparison] [[adam]] [[[sweep]]] betas2", "'betas'"],
    ),
    "a single value": (
        [("lr = 0.01, 0.1", "lr = 0.1")],
        [],
        ["[[[sweep]]] lr = '0.1': expected a comma-separated list of values", "trailing comma: 0.1,"],
    ),
    "a value twice": (
        [("lr = 0.01, 0.1", "lr = 0.1, 0.10")], [], ["[[[sweep]]] lr = '0.1, 0.1': a value is listed twice"]
    ),
    "swept and set": (
        [("lr = 0.01, 0.1", "momentum = 0.5, 0.9")],
        [],
        ["[[[sweep]]] momentum: momentum is set in [comparison] [[sgd]] [[[arguments]]] too"],
    ),
    "wrong type": (
        [("lr = 0.01, 0.1", "lr = 0.01, fast")],
        [],
        ["sweep.txt: [comparison] [[sgd]] [[[sweep]]] lr = fast: argument lr = 'fast': expected a number"],
    ),
    "value the optimizer refuses": (
        [("step_adaptation = 1.2, 1.8", "step_adaptation = 1.2, -1")],
        [],
        ["sweep.txt: [comparison] [[lab_pal]] [[[sweep]]] step_adaptation = -1: optimizer 'lab_pal' refuses"],
    ),
    "value the schedule fails with": (
        [("gamma = 0.5,", "gamma = 0.5, -1")],
        [],
        ["[comparison] [[sgd]] [[[sweep]]] gamma = -1: MultiStepLR fails at training step 3 of 6"],
    ),
    "value that cannot name a folder": (
        [("lr = 0.01, 0.1", "lr = 0.01, 0.1\n        foreach = a/b, none")],
        [],
        ["[[[sweep]]] foreach: the value 'a/b' cannot name a run folder ('foreach_a/b')"],
    ),
    "point whose folder name is too long": (
        [("lr = 0.01, 0.1", "lr = 0.01, 0.1\n        foreach = " + "a" * 90 + ", none")],
        [],
        [
            "[comparison] [[sgd]] [[[sweep]]]: the sweep point 'lr_0.01-foreach_aaaa",
            "bytes, more than 100; sweep fewer arguments",
        ],
    ),
    "point label of another entry": (
        [("label = Adam", 'label = "SGD lr 0.1, gamma 0.5"')],
        [],
        ["the runs sgd/lr_0.1-gamma_0.5 and adam both have the label 'SGD lr 0.1, gamma 0.5'"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SWEEPS))
def test_bad_sweep_exits_2_with_one_line_before_anything_runs(workspace, capsys, case):
    replacements, arguments, fragments = BAD_SWEEPS[case]
    text = SWEEP
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    (workspace / "sweep.txt").write_text(text)
    assert main.main(["--config", "sweep.txt", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    for fragment in fragments:
        assert fragment in error
    assert not (workspace / "runs").exists()


SWEEP_FOLDER = """\
[experiment]
name = chosen
[comparison]
seeds = 0, 1
    [[sgd]]
    label = SGD
    optimizer = sgd
        [[[sweep]]]
        lr = 0.01, 0.1, 1.0, 3.0
    [[adam]]
    label = Adam
    optimizer = adam
"""

# Per point and seed: the validation accuracies (at steps 10 and 20) and the test accuracy. lr 0.1
# is best on validation (means 0.90), lr 1.0 best on test; lr 3.0 is best on validation of all
# but one of its seeds diverged; lr 0.01 has not finished its second seed.
METRICS = {
    "sgd/lr_0.01": {0: ([0.50, 0.60], 0.61), 1: ([0.55], None)},
    "sgd/lr_0.1": {0: ([0.80, 0.92], 0.70), 1: ([0.88, 0.86], 0.72)},
    "sgd/lr_1": {0: ([0.85, 0.80], 0.95), 1: ([0.86, 0.84], 0.93)},
    "sgd/lr_3": {0: ([0.99, 0.98], 0.97), 1: ([0.99], "diverged")},
}


def _swept_comparison_folder(root, metrics=METRICS, quality="accuracy"):
    return comparison_folder(root, SWEEP_FOLDER, metrics, quality)


def test_the_best_row_is_the_point_best_on_validation_not_on_test(tmp_path):
    columns, rows = result_rows(collect_entries([_swept_comparison_folder(tmp_path)]))
    assert columns[:6] == ["entry", "label", "optimizer", "kind", "point", "seeds"]
    assert [(row["entry"], row["kind"], row["point"]) for row in rows] == [
        ("sgd/lr_0.01", "point", "lr=0.01"),
        ("sgd/lr_0.1", "point", "lr=0.1"),
        ("sgd/lr_1", "point", "lr=1"),
        ("sgd/lr_3", "point", "lr=3"),
        ("sgd", "best", "lr=0.1"),
        ("adam", "entry", ""),
    ]
    points = {row["entry"]: row for row in rows}
    assert points["sgd/lr_0.1"]["best_validation_accuracy_mean"] == pytest.approx(0.90)
    assert points["sgd/lr_1"]["best_validation_accuracy_mean"] == pytest.approx(0.855)
    assert points["sgd/lr_3"]["status"] == "diverged (1/2 seeds; 1/2 finished)"
    assert points["sgd/lr_0.01"]["status"] == "incomplete (1/2 seeds finished)"
    best = rows[4]
    assert (best["label"], best["optimizer"], best["seeds"], best["status"]) == ("SGD", "sgd", "0 1", "finished")
    assert best["best_validation_accuracy_mean"] == pytest.approx(0.90)
    assert best["test_accuracy_mean"] == pytest.approx(0.71)
    assert best["test_accuracy_std"] == pytest.approx(0.02**0.5 / 10)
    assert rows[5]["status"] == "not started"


def test_the_lowest_validation_rmse_is_chosen_for_regression(tmp_path):
    _, rows = result_rows(collect_entries([_swept_comparison_folder(tmp_path, quality="rmse")]))
    best = next(row for row in rows if row["kind"] == "best")
    # Means of the lowest validation RMSE over the seeds: lr 0.01 0.525, lr 0.1 0.83, lr 1 0.82 (lr 3 diverged).
    assert best["point"] == "lr=0.01" and best["best_validation_rmse_mean"] == pytest.approx(0.525)


def test_no_point_is_chosen_while_none_has_a_validation_result(tmp_path):
    empty = {name: {0: ([], None), 1: ([], None)} for name in METRICS}
    _, rows = result_rows(collect_entries([_swept_comparison_folder(tmp_path, empty)]))
    best = rows[4]
    assert (best["entry"], best["kind"], best["point"]) == ("sgd", "best", "")
    assert best["status"] == "none chosen: no validation result yet" and best["test_accuracy_mean"] is None


def test_sensitivity_shows_each_value_over_the_seeds_and_marks_diverged_points(tmp_path):
    entries = collect_entries([_swept_comparison_folder(tmp_path)])
    lines = sensitivity_lines(entries)
    assert list(lines) == ["lr"] and [line.label for line in lines["lr"]] == ["SGD"]
    (line,) = lines["lr"]
    assert line.colour_index == 0
    assert [(point.value, point.results, point.diverged) for point in line.points] == [
        (0.01, (0.60, 0.55), False),
        (0.1, (0.92, 0.88), False),
        (1.0, (0.85, 0.86), False),
        (3.0, (), True),
    ]
    files, table = write_results(entries, tmp_path / "out")
    assert tmp_path / "out" / "sensitivity.png" in files
    assert (tmp_path / "out" / "sensitivity.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (tmp_path / "out" / "sensitivity.pdf").read_bytes().startswith(b"%PDF")
    assert "| sgd | SGD | sgd | **best**: lr=0.1 | 0 1 | 0.9000 ± 0.0283 | 0.7100 ± 0.0141 |" in table


def test_a_swept_comparison_trains_every_point_draws_the_chosen_one_and_resumes_with_added_values(workspace):
    overrides = ["--set", "comparison.lab_pal.sweep.measurement_interval=500,"]
    status, output = _main(["--config", "sweep.txt", *overrides])
    assert status == 0
    assert "[1/5] lab_pal/step_adaptation_1.2-measurement_interval_500 (LABPAL-NSGD step_adaptation 1.2, " in output
    folder = workspace / "runs" / "swept"
    rows = _read_csv(folder / "results.csv")
    assert [(row["entry"], row["kind"]) for row in rows] == [
        ("lab_pal/step_adaptation_1.2-measurement_interval_500", "point"),
        ("lab_pal/step_adaptation_1.8-measurement_interval_500", "point"),
        ("lab_pal", "best"),
        ("sgd/lr_0.01-gamma_0.5", "point"),
        ("sgd/lr_0.1-gamma_0.5", "point"),
        ("sgd", "best"),
        ("adam", "entry"),
    ]
    assert all(row["status"] == "finished" for row in rows)
    for best in (rows[2], rows[5]):
        points = [row for row in rows if row["entry"].startswith(best["entry"] + "/")]
        chosen = max(points, key=lambda row: float(row["best_validation_accuracy_mean"]))
        assert best["point"] == chosen["point"] and best["test_accuracy_mean"] == chosen["test_accuracy_mean"]
    figures = {path.name for path in folder.iterdir()}
    assert {f"sensitivity_{name}.png" for name in ("step_adaptation", "measurement_interval", "lr", "gamma")} <= figures
    # A value added to a sweep trains its point only.
    added = ["--set", "comparison.sgd.sweep.lr=0.01,0.1,0.03", "--resume"]
    status, output = _main(["--config", "sweep.txt", *overrides, *added])
    assert status == 0
    assert output.count("finished already, skipped") == 5
    assert "[5/6] sgd/lr_0.03-gamma_0.5 (SGD lr 0.03, gamma 0.5) seed 0: starting" in output
    assert [row["entry"] for row in _read_csv(folder / "results.csv")][3:6] == [
        "sgd/lr_0.01-gamma_0.5",
        "sgd/lr_0.1-gamma_0.5",
        "sgd/lr_0.03-gamma_0.5",
    ]


REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["sweep_cifar10_resnet20", "sweep_digits"])
def test_sweep_presets_sweep_sgd_lr_and_lab_pal_in_both_modes(name):
    comparison = read_comparison(load_configuration(REPOSITORY / "configs" / f"{name}.txt"))
    assert comparison.configuration["experiment"]["name"] == name
    sweeps = {entry.id: {swept.name: swept.values for swept in entry.sweep} for entry in comparison.entries}
    assert sweeps["sgd"] == {"lr": (0.01, 0.03, 0.1, 0.3, 1.0)}
    for entry, mode in (("lab_pal_nsgd", "NSGD"), ("lab_pal_sgd", "SGD")):
        assert set(sweeps[entry]) == {"step_adaptation", "measurement_interval"}
        assert next(e for e in comparison.entries if e.id == entry).arguments.get("mode", "NSGD") == mode
    if name == "sweep_digits":
        comparison.check_entries_build()


def test_the_paper_grid_names_the_nine_paper_comparisons():
    paths = expand_grids([REPOSITORY / "configs" / "paper.txt"])
    names = [load_configuration(path).sections["experiment"]["name"] for path in paths]
    assert names == [
        f"compare_{data}_{model}"
        for data in ("cifar10", "cifar100", "svhn")
        for model in ("resnet20", "mobilenet_v2_cifar", "densenet40")
    ]
    assert all(load_configuration(path).is_comparison for path in paths)
