"""Redrawing figures reads runs from disk only: source/plotting reaches neither the training nor the models."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from source.comparison import read_comparison
from source.configuration import load_configuration
from source.errors import UserError
from source.records.comparison import read_comparison_entries
from source.registries import REGISTRIES
from tests.constructed_runs import comparison_folder

REPOSITORY = Path(__file__).resolve().parents[1]
SOURCE = REPOSITORY / "source"

COMPARISON = """\
[experiment]
name = {name}
[data]
name = digits
[model]
name = {model}
[comparison]
seeds = 0, 1
    [[sgd]]
    label = SGD
    optimizer = sgd
    schedule = StepLR
        [[[schedule_arguments]]]
        step_size = 5
        [[[sweep]]]
        lr = 0.1, 1.0
        gamma = 0.5, 0.9
    [[adam]]
    label = Adam
    optimizer = adam
"""
RESULTS = {
    "sgd/lr_0.1-gamma_0.5": {0: ([0.9], 0.91), 1: ([0.8], 0.85)},
    "sgd/lr_0.1-gamma_0.9": {0: ([0.7], 0.7), 1: ([0.7], 0.7)},
    "sgd/lr_1-gamma_0.5": {0: ([0.5], "diverged")},
    "adam": {0: ([0.6, 0.8], 0.82), 1: ([0.85], None)},
}


def _module_name(path):
    parts = path.relative_to(REPOSITORY).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    """{module name: its file} for every module of the source tree."""
    return {_module_name(path): path for path in SOURCE.rglob("*.py")}


def _imported_names(node, module, is_package):
    """The modules an import statement names, relative imports resolved; ``from a import b`` names a.b too."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    base = ".".join(filter(None, (package if node.level else "", node.module or "")))
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _statements_run_on_import(tree):
    """The statements a module runs when it is imported: its body, with the blocks of ``if`` (``if
    TYPE_CHECKING`` too), ``try``, ``with`` and class bodies, but not function bodies."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for field in ("body", "orelse", "finalbody", "handlers"):
            pending.extend(getattr(node, field, []))


def _named_modules(tree, module, is_package, *, in_functions):
    """The modules (and the packages above them) that the module's import statements name: those it
    runs when imported, or with ``in_functions`` those inside its functions too."""
    statements = ast.walk(tree) if in_functions else _statements_run_on_import(tree)
    named = set()
    for node in statements:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for name in _imported_names(node, module, is_package):
                parts = name.split(".")
                named.update(".".join(parts[:length]) for length in range(1, len(parts) + 1))
    return named


def _import_graph(modules, *, in_functions=False):
    """{module: the source modules that importing it imports}."""
    return {
        module: _named_modules(
            ast.parse(path.read_text()), module, path.name == "__init__.py", in_functions=in_functions
        ) & modules.keys()
        for module, path in modules.items()
    }


def test_the_import_check_sees_type_checking_blocks_classes_relative_imports_and_functions():
    tree = ast.parse(
        "import a.b\n"
        "if TYPE_CHECKING:\n    from c import d\n"
        "try:\n    from .e import f\nexcept ImportError:\n    from .. import g\n"
        "class K:\n    from h import i\n"
        "def run():\n    from source.training import trainer\n"
    )
    on_import = {"a", "a.b", "c", "c.d", "source", "source.plotting", "source.plotting.e", "source.plotting.e.f",
                 "source.g", "h", "h.i"}  # fmt: skip
    assert _named_modules(tree, "source.plotting.x", False, in_functions=False) == on_import
    everywhere = _named_modules(tree, "source.plotting.x", False, in_functions=True)
    assert everywhere == on_import | {"source.training", "source.training.trainer"}


def _reached(graph, start):
    seen, pending = set(), [start]
    while pending:
        module = pending.pop()
        if module not in seen:
            seen.add(module)
            pending.extend(graph[module])
    return seen


def test_no_module_of_plotting_imports_the_training_directly_or_through_others():
    modules = _modules()
    graph = _import_graph(modules)
    # The check sees through packages: the comparison runner reaches the training and the models.
    assert {"source.training", "source.training.trainer", "source.models"} <= _reached(graph, "source.comparison")
    assert "source.records.comparison" in _reached(graph, "source.plotting.__main__")
    plotting = [module for module in modules if module.startswith("source.plotting")]
    assert "source.plotting.__main__" in plotting and "source.plotting.results" in plotting
    for module in plotting:
        reached = _reached(graph, module)
        assert not {name for name in reached if name.startswith(("source.training", "source.models"))}, module


def test_plotting_and_records_name_the_training_nowhere_not_even_inside_functions():
    graph = _import_graph(_modules(), in_functions=True)
    readers = [module for module in graph if module.startswith(("source.plotting", "source.records"))]
    assert "source.records.metrics" in readers
    for module in readers:
        assert not {name for name in graph[module] if name.startswith("source.training")}, module


def test_a_comparison_read_from_disk_has_the_runs_the_comparison_trains(tmp_path):
    """Read without the registries, a comparison names the same entries, points, labels and seeds,
    so the figures look for the run folders where the runs were trained."""
    source = tmp_path / "comparison.txt"
    source.write_text(COMPARISON.format(name="swept", model="small_cnn"))
    configuration = load_configuration(source, registries=REGISTRIES)
    entries, seeds = read_comparison_entries(load_configuration(source, registries=None))
    comparison = read_comparison(configuration)
    assert seeds == comparison.seeds == (0, 1)
    read = [(point.id, point.label, point.optimizer, point.point) for entry in entries for point in entry.points()]
    trained = [(run.entry.id, run.entry.label, run.entry.optimizer, run.entry.point) for run in comparison.runs()]
    assert read == trained[::2] == [
        ("sgd/lr_0.1-gamma_0.5", "SGD lr 0.1, gamma 0.5", "sgd", {"lr": 0.1, "gamma": 0.5}),
        ("sgd/lr_0.1-gamma_0.9", "SGD lr 0.1, gamma 0.9", "sgd", {"lr": 0.1, "gamma": 0.9}),
        ("sgd/lr_1-gamma_0.5", "SGD lr 1, gamma 0.5", "sgd", {"lr": 1.0, "gamma": 0.5}),
        ("sgd/lr_1-gamma_0.9", "SGD lr 1, gamma 0.9", "sgd", {"lr": 1.0, "gamma": 0.9}),
        ("adam", "Adam", "adam", {}),
    ]
    # Only the comparison that trains asks the classes where a swept argument goes.
    [swept, _] = comparison.entries
    assert [(argument.name, argument.target) for argument in swept.sweep] == [
        ("lr", "arguments"), ("gamma", "schedule_arguments")
    ]
    assert [(argument.name, argument.target) for argument in entries[0].sweep] == [("lr", ""), ("gamma", "")]


def test_a_recorded_configuration_is_read_with_its_names_as_written(tmp_path):
    path = tmp_path / "configuration.txt"
    path.write_text("[model]\nname = a_model_of_an_older_version\n[training]\nbatch_size = 64\n")
    with pytest.raises(UserError, match="a_model_of_an_older_version"):
        load_configuration(path, registries=REGISTRIES)
    recorded = load_configuration(path, registries=None)
    assert recorded["model"]["name"] == "a_model_of_an_older_version"
    assert recorded["training"]["batch_size"] == 64
    path.write_text("[training]\nbatch_size = many\n")
    with pytest.raises(UserError, match=r"\[training\] batch_size = 'many': expected an integer >= 1"):
        load_configuration(path, registries=None)


REDRAW = """
import json, sys
from source.plotting.__main__ import main
statuses = [main(arguments) for arguments in json.loads(sys.argv[1])]
loaded = [name for name in sys.modules if name.split(".")[0] in ("torch", "torchvision", "sklearn")
          or name.startswith(("source.training", "source.models", "source.data", "source.optimizer", "source.comparison"))]
print(json.dumps({"statuses": statuses, "loaded": sorted(loaded)}))
"""


def test_the_plotting_command_redraws_comparisons_runs_and_reports_without_loading_training_or_models(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = comparison_folder(tmp_path / "a", COMPARISON.format(name="first", model="small_cnn"), RESULTS)
    second = comparison_folder(tmp_path / "b", COMPARISON.format(name="second", model="mlp"), RESULTS)
    runs = [first / "adam" / "seed_0", first / "sgd" / "lr_0.1-gamma_0.5" / "seed_1"]
    commands = [
        [str(first)],
        [*map(str, runs), "--out", str(tmp_path / "runs")],
        [str(first), str(second), "--out", str(tmp_path / "report")],
    ]
    finished = subprocess.run(
        [sys.executable, "-c", REDRAW, json.dumps(commands)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    outcome = json.loads(finished.stdout.splitlines()[-1])
    assert outcome == {"statuses": [0, 0, 0], "loaded": []}
    assert (first / "results.csv").is_file() and (first / "sensitivity_lr.png").is_file()
    assert (tmp_path / "runs" / "results.md").is_file()
    assert (tmp_path / "report" / "digits_small_cnn" / "results.csv").is_file()
    assert (tmp_path / "report" / "digits_mlp" / "results.csv").is_file()
