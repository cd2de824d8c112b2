"""Bad inputs, one table: each ends with exit status 2 and one line on stderr that names the problem
and where it came from (the file and key, or the --set option), before training, writing nothing.

A case is (arguments, fragments, setup): the command line after ``--config tiny.txt`` (unless it
gives its own --config), texts the message must contain, and an optional function that prepares
the workspace (a bad file, an existing run folder, ...). Whatever the workspace holds before the
run must be exactly what it holds after: no run folder, no plots folder, no changed file.
"""

import os
import pickle

import numpy as np
import pytest
import torch

import main
from configobj import ConfigObj
from source.configuration import SPECIFICATION_PATH
from source.registries import load_configuration
from source.training.run_folder import RunFolder
from tests.data_files import write_cifar10
from tests.tiny_run import TINY, workspace  # noqa: F401 (workspace is a fixture)
from tests.tiny_run import set_options as _set

SGD = ["--set", "optimizer.name=sgd", "--set", "optimizer.arguments.lr=0.1"]


def _file(name, text):
    """A setup that writes ``text`` to ``name`` in the workspace."""

    def setup(workspace):
        path = workspace / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return setup


def _tiny_with(old, new):
    """A setup that rewrites tiny.txt with ``old`` replaced by ``new``."""
    return _file("tiny.txt", TINY.replace(old, new))


def _stored_run(*overrides, checkpoint=False):
    """A setup that leaves runs/tiny as a started run would: its configuration.txt (and a folder)."""

    def setup(workspace):
        configuration = load_configuration(workspace / "tiny.txt", list(overrides))
        RunFolder.of(configuration).create(configuration).release()

    return setup


def _comparison_folder(workspace):
    _file("compare.txt", "[experiment]\nname = tiny\n[comparison]\n[[sgd]]\nlabel = SGD\noptimizer = sgd\n")(workspace)
    configuration = load_configuration(workspace / "compare.txt")
    RunFolder.of(configuration).create(configuration).release()


def _cifar10(damage):
    """A setup that writes a tiny CIFAR-10 copy under data/ and then ``damage``s its data_batch_1."""

    def setup(workspace):
        write_cifar10(workspace / "data")
        damage(workspace / "data" / "cifar-10-batches-py" / "data_batch_1")

    return setup


class _ShellCommand:
    """Unpickled by pickle.load, this would create the file ``ran`` in the working folder."""

    def __reduce__(self):
        return os.system, ("touch ran",)


def _crafted_pickle(path):
    path.write_bytes(pickle.dumps({"data": _ShellCommand(), "labels": [0]}))


def _empty_cifar10(workspace):
    """CIFAR-10 files of the right format whose batches hold no images."""
    write_cifar10(workspace / "data")
    folder = workspace / "data" / "cifar-10-batches-py"
    for name in [f"data_batch_{number}" for number in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as file:
            pickle.dump({"labels": [], "data": np.zeros((0, 3072), dtype=np.uint8)}, file)


def _comparison_file(entry_id):
    text = f"[experiment]\nname = many\n[comparison]\n[[{entry_id}]]\nlabel = SGD\noptimizer = sgd\n"
    return _file("compare.txt", text)


def _unwritable_runs(workspace):
    (workspace / "locked").mkdir()
    (workspace / "locked").chmod(0o500)


CIFAR10 = ["--set", "data.name=cifar10", "--set", "model.name=resnet20"]

# Each case: arguments after --config tiny.txt, fragments of the one-line message, setup (or None).
CASES = {
    # ------------------------------------------------------------------ configuration file
    "missing configuration file": (["--config", "absent.txt"], ["absent.txt not found"], None),
    "configuration file is a folder": (
        ["--config", "folder"],
        ["configuration file folder is a folder, not a file"],
        lambda workspace: (workspace / "folder").mkdir(),
    ),
    "configuration file is a device": (["--config", "/dev/null"], ["/dev/null is a device, not a file"], None),
    "unparsable file": (
        ["--config", "bad.txt"],
        ["bad.txt", "not a valid configuration file"],
        _file("bad.txt", "[training\nbatch_size = 3\n"),
    ),
    "unknown key in file": (
        [],
        ["tiny.txt: unknown key batchsize in [training]", "did you mean 'batch_size'"],
        _tiny_with("batch_size = 32", "batchsize = 32"),
    ),
    "unknown section in file": (
        [],
        ["tiny.txt: unknown section [trainig]", "did you mean '[training]'"],
        _tiny_with("[training]", "[trainig]"),
    ),
    "wrong type in file": (
        ["--config", "bad.txt"],
        ["bad.txt: [training] batch_size = 'many'", "integer >= 1"],
        _file("bad.txt", "[training]\nbatch_size = many\n"),
    ),
    "file not UTF-8": (
        ["--config", "bad.txt"],
        ["bad.txt", "not a valid configuration file"],
        lambda workspace: (workspace / "bad.txt").write_bytes(b"[training]\nbatch_size = \xff\xfe\n"),
    ),
    "name with a slash in file": (
        ["--config", "bad.txt"],
        ["bad.txt: [experiment] name = 'a/b'", "folder name"],
        _file("bad.txt", "[experiment]\nname = a/b\n"),
    ),
    "quoted name with a hash in file": (
        ["--config", "bad.txt"],
        ["bad.txt: [experiment] name = 'h#b'", "without any of # ; / \\"],
        _file("bad.txt", '[experiment]\nname = "h#b"\n'),
    ),
    "name with a semicolon in file": (
        ["--config", "bad.txt"],
        ["bad.txt: [experiment] name = 'a;rm'", "folder name"],
        _file("bad.txt", "[experiment]\nname = a;rm\n"),
    ),
    "empty name in file": (
        ["--config", "bad.txt"],
        ["bad.txt: [experiment] name", "folder name"],
        _file("bad.txt", '[experiment]\nname = ""\n'),
    ),
    "section given as value in file": (
        ["--config", "bad.txt"],
        ["bad.txt: [optimizer] arguments", "[[arguments]]"],
        _file("bad.txt", "[optimizer]\narguments = 3\n"),
    ),
    # ------------------------------------------------------------------ command line and --set
    "unknown option": (["--resum"], ["unrecognized arguments: --resum", "--help"], None),
    "stop after zero steps": (["--stop-after-steps", "0"], ["--stop-after-steps", "positive integer"], None),
    "stop after abc steps": (["--stop-after-steps", "abc"], ["--stop-after-steps", "'abc'"], None),
    "--set without a value": (["--set", "training"], ["--set training", "section.key=value"], None),
    "--set of an unknown key": (
        ["--set", "training.batchsize=3"],
        ["--set training.batchsize=3", "unknown key batchsize", "'batch_size'"],
        None,
    ),
    "--set of a wrong type": (
        ["--set", "training.batch_size=abc"],
        ["--set training.batch_size=abc: [training] batch_size = 'abc': expected an integer >= 1"],
        None,
    ),
    "--set out of range": (
        ["--set", "training.training_steps=0"],
        ["--set training.training_steps=0: [training] training_steps = '0'", "integer >= 1"],
        None,
    ),
    "--set of a section": (
        ["--set", "optimizer.arguments=3"],
        ["--set optimizer.arguments=3", "must be the section [optimizer] [[arguments]]"],
        None,
    ),
    "--set name cut at a hash": (
        ["--set", "experiment.name=h#b"],
        ["--set experiment.name=h#b", "'#'", "comment"],
        None,
    ),
    "--set name of 300 characters": (
        ["--set", "experiment.name=" + "n" * 300],
        ["[experiment] name = 'nnn", "at most 100 bytes"],
        None,
    ),
    "--set name of 70 characters and 280 bytes": (
        ["--set", "experiment.name=" + "\N{SLIGHTLY SMILING FACE}" * 70],
        ["--set experiment.name=", ": [experiment] name = ", "at most 100 bytes"],
        None,
    ),
    "--set divergence_loss_factor=nan": (
        ["--set", "training.divergence_loss_factor=nan"],
        ["--set training.divergence_loss_factor=nan: [training] divergence_loss_factor", "a finite number >= 0"],
        None,
    ),
    "--set divergence_loss_factor=inf": (
        ["--set", "training.divergence_loss_factor=inf"],
        ["[training] divergence_loss_factor = 'inf'", "a finite number >= 0"],
        None,
    ),
    "lab_pal multiplier longer than the run": (
        ["--set", "optimizer.arguments.batch_size_schedule=0:1000000000"],
        [
            "--set optimizer.arguments.batch_size_schedule=0:1000000000: [optimizer]",
            "multiplier 1000000000 at step 0",
            "longer than the run's 24 training steps, so LABPAL would never update",
        ],
        None,
    ),
    "lab_pal later multiplier longer than the run": (
        ["--set", "optimizer.arguments.batch_size_schedule=0:1, 10:500"],
        ["multiplier 500 at step 10", "never update"],
        None,
    ),
    "--set name with a backslash": (
        ["--set", "experiment.name=a\\b"],
        ["--set experiment.name=a\\b: [experiment] name", "folder name"],
        None,
    ),
    "--set batch larger than the training set": (
        ["--set", "training.batch_size=5000"],
        ["--set training.batch_size=5000: [training] batch_size: 5000 exceeds the 1150 training samples"],
        None,
    ),
    "--set of an unknown model": (["--set", "model.name=resnet"], ["--set model.name=resnet", "small_cnn"], None),
    # ------------------------------------------------------------------ optimizer arguments
    "unknown optimizer": (["--set", "optimizer.name=lbfgs"], ["[optimizer] name = 'lbfgs'", "lab_pal"], None),
    "unknown optimizer argument": (
        ["--set", "optimizer.arguments.step_adaption=3.6"],
        ["--set optimizer.arguments.step_adaption=3.6: [optimizer]", "did you mean 'step_adaptation'"],
        None,
    ),
    "sgd lr=abc": (
        _set("optimizer.name=sgd", "optimizer.arguments.lr=abc"),
        ["--set optimizer.arguments.lr=abc: [optimizer]: argument lr = 'abc': expected a number"],
        None,
    ),
    "adam betas=abc": (
        _set("optimizer.name=adam", "optimizer.arguments.betas=abc"),
        ["--set optimizer.arguments.betas=abc", "argument betas = 'abc': expected a comma-separated list of 2 numbers"],
        None,
    ),
    "adam betas of three numbers": (
        _set("optimizer.name=adam", "optimizer.arguments.betas=0.9, 0.99, 0.999"),
        ["argument betas = '0.9, 0.99, 0.999'", "list of 2 numbers"],
        None,
    ),
    "sgd lr=-1": (
        _set("optimizer.name=sgd", "optimizer.arguments.lr=-1"),
        ["--set optimizer.arguments.lr=-1: [optimizer]", "refuses argument lr: Invalid learning rate: -1"],
        None,
    ),
    "sgd lr=nan": (_set("optimizer.name=sgd", "optimizer.arguments.lr=nan"), ["argument lr = nan", "not nan"], None),
    "sgd nesterov=maybe": (
        [*SGD, "--set", "optimizer.arguments.nesterov=maybe"],
        ["--set optimizer.arguments.nesterov=maybe", "expected true or false"],
        None,
    ),
    "sgd nesterov without momentum": (
        [*SGD, "--set", "optimizer.arguments.nesterov=true"],
        ["--set optimizer.arguments.nesterov=true: [optimizer]", "refuses argument nesterov"],
        None,
    ),
    "optimizer argument of a wrong type in file": (
        [],
        ["tiny.txt: [optimizer]: argument lr = 'fast': expected a number"],
        _tiny_with("name = lab_pal", "name = sgd\n[[arguments]]\nlr = fast"),
    ),
    "lab_pal refused value in file": (
        [],
        ["tiny.txt: [optimizer]", "refuses argument step_adaptation"],
        _tiny_with("name = lab_pal", "name = lab_pal\n[[arguments]]\nstep_adaptation = -1"),
    ),
    # ------------------------------------------------------------------ schedules
    "unknown schedule": (["--set", "schedule.name=cosine"], ["[schedule] name = 'cosine'", "CosineAnnealingLR"], None),
    "schedule for lab_pal": (
        _set("schedule.name=StepLR", "schedule.arguments.step_size=5"),
        ["[schedule]", "LabPal sets its own learning rate"],
        None,
    ),
    "schedule arguments without a schedule": (
        [*SGD, "--set", "schedule.arguments.gamma=0.1"],
        ["--set schedule.arguments.gamma=0.1: [schedule]", "given, but the schedule is none"],
        None,
    ),
    "unknown schedule argument": (
        [*SGD, *_set("schedule.name=MultiStepLR", "schedule.arguments.milestone=5,")],
        ["--set schedule.arguments.milestone=5,: [schedule]", "no argument milestone", "milestones"],
        None,
    ),
    "StepLR without step_size": (
        [*SGD, "--set", "schedule.name=StepLR"],
        ["--set schedule.name=StepLR: [schedule]", "StepLR needs step_size"],
        None,
    ),
    "StepLR step_size=abc": (
        [*SGD, *_set("schedule.name=StepLR", "schedule.arguments.step_size=abc")],
        ["--set schedule.arguments.step_size=abc: [schedule]", "argument step_size = 'abc': expected an integer"],
        None,
    ),
    "MultiStepLR milestones=abc": (
        [*SGD, *_set("schedule.name=MultiStepLR", "schedule.arguments.milestones=abc")],
        ["--set schedule.arguments.milestones=abc", "expected a comma-separated list of integers"],
        None,
    ),
    "MultiStepLR one milestone without its comma": (
        [*SGD, *_set("schedule.name=MultiStepLR", "schedule.arguments.milestones=5")],
        ["argument milestones = 5", "trailing comma"],
        None,
    ),
    "OneCycleLR shorter than the run": (
        [*SGD, *_set("schedule.name=OneCycleLR", "schedule.arguments.max_lr=0.1", "schedule.arguments.total_steps=5")],
        ["--set schedule.arguments.total_steps=5", "OneCycleLR fails at training step 6 of 24", "total steps is 5"],
        None,
    ),
    "OneCycleLR anneal_strategy=cosine": (
        [*SGD, *_set("schedule.name=OneCycleLR", "schedule.arguments.max_lr=0.1", "schedule.arguments.anneal_strategy=x")],
        ["--set schedule.arguments.anneal_strategy=x", "expected one of cos, linear"],
        None,
    ),
    "CosineAnnealingLR T_max=0": (
        [*SGD, *_set("schedule.name=CosineAnnealingLR", "schedule.arguments.T_max=0")],
        ["--set schedule.arguments.T_max=0", "CosineAnnealingLR fails at training step 1 of 24"],
        None,
    ),
    "ExponentialLR negative gamma": (
        [*SGD, *_set("schedule.name=ExponentialLR", "schedule.arguments.gamma=-1")],
        ["ExponentialLR fails at training step 1 of 24", "learning rate -0.1"],
        None,
    ),
    "LinearLR start_factor=0": (
        [*SGD, *_set("schedule.name=LinearLR", "schedule.arguments.start_factor=0")],
        ["--set schedule.arguments.start_factor=0: [schedule]", "because of argument start_factor"],
        None,
    ),
    "schedule refused in file": (
        [],
        ["tiny.txt: [schedule]", "argument step_size = 'often'"],
        _tiny_with(
            "name = lab_pal",
            "name = sgd\n[[arguments]]\nlr = 0.1\n[schedule]\nname = StepLR\n[[arguments]]\nstep_size = often",
        ),
    ),
    # ------------------------------------------------------------------ data
    "unknown data set": (["--set", "data.name=mnist"], ["[data] name = 'mnist'", "digits"], None),
    "missing data files": (CIFAR10, ["--set data.name=cifar10", "cifar-10-batches-py"], None),
    "crafted pickle in a data file": (
        CIFAR10,
        ["--set data.name=cifar10: [data]", "data_batch_1 is not a CIFAR-10 data file", "posix.system"],
        _cifar10(_crafted_pickle),
    ),
    "data file that is no pickle": (
        CIFAR10,
        ["--set data.name=cifar10: [data]", "CIFAR-10"],
        _cifar10(lambda path: path.write_bytes(b"garbage")),
    ),
    "CIFAR-10 files without images": (CIFAR10, ["cifar10 has 0 training examples", "files"], _empty_cifar10),
    "train_size leaves no validation": (
        ["--set", "data.train_size=100000"],
        ["--set data.train_size=100000: [data]", "leaves no validation examples"],
        None,
    ),
    # ------------------------------------------------------------------ runs and plots folders
    "runs_folder is a file": (
        ["--set", "experiment.runs_folder=tiny.txt"],
        ["--set experiment.runs_folder=tiny.txt: [experiment] runs_folder", "tiny.txt is a file, not a folder"],
        None,
    ),
    "runs_folder inside a file": (
        [],
        ["tiny.txt: [experiment] runs_folder", "tiny.txt is a file, not a folder"],
        _tiny_with("cpu_threads = 1", "cpu_threads = 1\nruns_folder = tiny.txt/runs"),
    ),
    "runs_folder name too long": (
        ["--set", "experiment.runs_folder=" + "r" * 300],
        ["[experiment] runs_folder", "longer than the 255 bytes"],
        None,
    ),
    "resume with a runs_folder name too long": (
        ["--resume", "--set", "experiment.runs_folder=" + "r" * 300],
        ["[experiment] runs_folder", "longer than the 255 bytes"],
        None,
    ),
    "plots_folder name too long": (
        ["--set", "logging.plots_folder=" + "p" * 300],
        ["[logging] plots_folder", "longer than the 255 bytes"],
        None,
    ),
    "runs_folder not writable": (
        ["--set", "experiment.runs_folder=locked/runs"],
        ["[experiment] runs_folder", "locked is not writable"],
        _unwritable_runs,
    ),
    "plots_folder is a file": (
        ["--set", "logging.plots_folder=tiny.txt"],
        ["--set logging.plots_folder=tiny.txt: [logging] plots_folder", "tiny.txt is a file, not a folder"],
        None,
    ),
    "plots folder of another run": (
        [],
        ["tiny.txt: [logging] plots_folder", "holds the plots of"],
        lambda workspace: [
            _file("plots/tiny/figure.png", "")(workspace),
            _file("plots/tiny/run_folder.txt", "/elsewhere/runs/tiny\n")(workspace),
        ],
    ),
    # ------------------------------------------------------------------ run folders
    "run folder exists already": ([], ["runs/tiny already exists: continue that run with --resume"], _stored_run()),
    "resume without a run": (["--resume"], ["cannot resume runs/tiny", "does not exist"], None),
    "resume a folder that is no run": (
        ["--resume"],
        ["cannot resume runs/tiny", "not a run folder"],
        lambda workspace: (workspace / "runs" / "tiny").mkdir(parents=True),
    ),
    "resume changing the model": (
        ["--resume", "--set", "model.name=mlp"],
        ["--set model.name=mlp: [model] name cannot change when resuming runs/tiny (saved: small_cnn)"],
        _stored_run(),
    ),
    "resume changing an optimizer argument": (
        ["--resume", *SGD, "--set", "optimizer.arguments.momentum=0.9"],
        ["--set optimizer.arguments.momentum=0.9", "cannot change when resuming", "(saved: not set)"],
        _stored_run("optimizer.name=sgd", "optimizer.arguments.lr=0.1"),
    ),
    "resume with a wrong --set type": (
        ["--resume", "--set", "training.training_steps=many"],
        ["--set training.training_steps=many: [training] training_steps = 'many'"],
        _stored_run(),
    ),
    "resume with a damaged configuration.txt": (
        ["--resume"],
        ["runs/tiny/configuration.txt", "batch_size = 'x'"],
        lambda workspace: _file("runs/tiny/configuration.txt", "[training]\nbatch_size = x\n")(workspace),
    ),
    "comparison entry id of 300 characters": (
        ["--config", "compare.txt"],
        ["compare.txt: [comparison]: entry [comparison] [[eeeeeeeeeeeeeeeeeeee... (300 characters)]]", "at most 100"],
        _comparison_file("e" * 300),
    ),
    "resume a comparison as a run": (
        ["--resume"],
        ["cannot resume runs/tiny as a run: it is a comparison", "--config runs/tiny/configuration.txt"],
        _comparison_folder,
    ),
}


def _snapshot(folder):
    """Every path below ``folder`` with its size and modification time."""
    return {
        path.relative_to(folder): (path.is_dir(), path.lstat().st_size, path.lstat().st_mtime_ns)
        for path in folder.rglob("*")
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(workspace, capsys, case):
    arguments, fragments, setup = CASES[case]
    if case == "runs_folder not writable" and os.geteuid() == 0:
        pytest.skip("root may write into any folder")
    if setup is not None:
        setup(workspace)
    if "--config" not in arguments:
        arguments = ["--config", "tiny.txt", *arguments]
    before = _snapshot(workspace)
    assert main.main(arguments) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in captured.err, captured.err
    assert _snapshot(workspace) == before
    assert not (workspace / "ran").exists()


def test_there_are_at_least_forty_bad_inputs():
    assert len(CASES) >= 40


def test_resume_keeps_the_saved_configuration_and_lists_what_it_ignores(workspace, capsys):
    arguments = ["--config", "tiny.txt", *_set("training.training_steps=6", "logging.tensorboard=false")]
    assert main.main([*arguments, "--stop-after-steps", "3"]) == 0
    capsys.readouterr()
    # The file's 24 steps and a changed batch size are ignored; --set of a resumable key applies.
    (workspace / "tiny.txt").write_text(TINY.replace("batch_size = 32", "batch_size = 16"))
    assert main.main(["--config", "tiny.txt", "--resume", "--set", "training.training_steps=7"]) == 0
    output = capsys.readouterr().out
    ignoring = [line for line in output.splitlines() if line.startswith("ignoring changes")]
    assert ignoring == [
        "ignoring changes in tiny.txt: logging.tensorboard True (saved: False), training.batch_size 16 (saved: 32); "
        "a resumed run keeps its runs/tiny/configuration.txt"
    ]
    assert "resuming runs/tiny from step 3" in output
    stored = load_configuration(workspace / "runs" / "tiny" / "configuration.txt")
    assert stored["training"]["training_steps"] == 7 and stored["training"]["batch_size"] == 32
    last = torch.load(workspace / "runs" / "tiny" / "last.pt", weights_only=True)
    assert last["step"] == 7
    tests = [line for line in (workspace / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines() if '"test"' in line]
    assert len(tests) == 1


def _integer_keys():
    """(section, key, check) of every integer key of the configspec, [comparison] seeds included."""
    specification = ConfigObj(str(SPECIFICATION_PATH), list_values=False, _inspec=True, interpolation=False)
    return [
        (section, key, check)
        for section in specification.sections
        for key, check in specification[section].items()
        if isinstance(check, str) and check.startswith(("integer", "integer_or", "integer_list"))
    ]


def test_every_integer_key_has_a_maximum():
    keys = _integer_keys()
    assert len(keys) >= 14
    unbounded = [f"{section}.{key}" for section, key, check in keys if "max=" not in check]
    assert unbounded == []


@pytest.mark.parametrize(("section", "key"), [(section, key) for section, key, _ in _integer_keys()])
def test_a_huge_integer_is_refused_before_anything_is_created(workspace, capsys, section, key):
    huge = "99999999999999999999"
    configuration = "tiny.txt"
    if section == "comparison":
        configuration = "compare.txt"
        _comparison_file("sgd")(workspace)
    before = _snapshot(workspace)
    assert main.main(["--config", configuration, "--set", f"{section}.{key}={huge}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --set {section}.{key}={huge}: [{section}] {key} = '{huge}': expected ")
    assert "<= " in error and error.count("\n") == 1
    assert _snapshot(workspace) == before
