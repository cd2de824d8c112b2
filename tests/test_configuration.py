"""The configuration: configspec defaults and types, overrides, one-line errors, schedules, losses."""

import re
from pathlib import Path

import pytest
import torch
from configobj import ConfigObj

from source.arguments import InvalidArgument, check_argument_types, find_refused_argument
from source.configuration import COMPARISON, SPECIFICATION_PATH, differing_keys, format_configuration
from source.configuration.checks import parse_free_text
from source.errors import UserError
from source.optimizer import LabPal
from source.optimizer.schedules import available_schedules, build_schedule
from source.optimizer.steppers import stepper_kind
from source.registries import load_configuration
from source.training.losses import choose_loss

REPOSITORY = Path(__file__).resolve().parents[1]
SHIPPED = REPOSITORY / "configuration_lab_pal.txt"


@pytest.fixture
def empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    return path


def _specification_keys():
    specification = ConfigObj(str(SPECIFICATION_PATH), list_values=False)
    for section in specification.sections:
        if section == COMPARISON:  # present only in comparison files
            continue
        for key in specification[section].scalars:
            yield section, key


def test_empty_file_gives_every_key_its_typed_default(empty_file):
    configuration = load_configuration(empty_file)
    assert {section for section, _ in _specification_keys()} == set(configuration.sections)
    for section, key in _specification_keys():
        assert key in configuration[section]
    assert configuration["training"]["batch_size"] == 32
    assert configuration["experiment"]["seed"] == 0
    assert configuration["logging"]["tensorboard"] is True
    assert configuration["data"]["train_size"] == "preset"
    assert configuration["training"]["evaluate_every_steps"] == "epoch"
    assert configuration["optimizer"]["arguments"] == {}


def test_shipped_configuration_sets_and_explains_every_key():
    configuration = load_configuration(SHIPPED)
    assert configuration["optimizer"]["name"] == "lab_pal"
    assert configuration["data"]["name"] == "digits"
    assert configuration["model"]["name"] == "small_cnn"
    lines = SHIPPED.read_text().splitlines()
    for section, key in _specification_keys():
        if key == "__many__":
            continue
        section_start = lines.index(f"[{section}]")
        position = next(
            index for index in range(section_start, len(lines)) if re.match(rf"\s*{key}\s*=", lines[index])
        )
        assert lines[position - 1].lstrip().startswith("#"), f"[{section}] {key} has no comment above it"


def test_overrides_are_typed_like_values_in_the_file(empty_file):
    configuration = load_configuration(
        empty_file,
        [
            "training.batch_size=64",
            "experiment.device=cuda:1",
            "data.train_size=500",
            "optimizer.name=sgd",
            "optimizer.arguments.lr=0.1",
            "optimizer.arguments.nesterov=true",
            "optimizer.arguments.dampening=0",
            "schedule.name=MultiStepLR",
            "schedule.arguments.milestones=75000, 112500",
            "schedule.arguments.last_epoch=none",
        ],
    )
    assert configuration["training"]["batch_size"] == 64
    assert configuration["experiment"]["device"] == "cuda:1"
    assert configuration["data"]["train_size"] == 500
    assert configuration["optimizer"]["arguments"] == {"lr": 0.1, "nesterov": True, "dampening": 0}
    assert configuration["schedule"]["arguments"] == {"milestones": [75000, 112500], "last_epoch": None}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", 3),
        ("-2", -2),
        ("0.5", 0.5),
        ("1e-4", 1e-4),
        ("True", True),
        ("off", False),
        ("None", None),
        ("NSGD", "NSGD"),
    ],
)
def test_free_form_arguments_are_typed(text, expected):
    value = parse_free_text(text)
    assert value == expected and type(value) is type(expected)


def test_resolved_configuration_loads_back_to_equal_values(tmp_path, empty_file):
    configuration = load_configuration(
        empty_file,
        ["optimizer.arguments.betas=0.9, 0.99", "schedule.arguments.milestones=5,", "experiment.name=a b"],
    )
    path = tmp_path / "resolved.txt"
    path.write_text(format_configuration(configuration, ["header line"]))
    reloaded = load_configuration(path)
    assert reloaded.sections == configuration.sections
    assert differing_keys(reloaded, configuration) == []
    assert path.read_text().startswith("# header line\n")


def test_differing_keys_names_changed_and_added_keys(empty_file):
    first = load_configuration(empty_file)
    second = load_configuration(empty_file, ["training.batch_size=8", "optimizer.arguments.momentum=0.9"])
    assert differing_keys(first, second) == [("optimizer", "arguments", "momentum"), ("training", "batch_size")]


# Each case: file text, overrides, fragments the one-line message must contain.
BAD_CONFIGURATIONS = {
    "unknown key with suggestion": (
        "[training]\nbatchsize = 3\n",
        [],
        ["bad.txt", "batchsize", "did you mean 'batch_size'"],
    ),
    "unknown section": ("[trainig]\nbatch_size = 3\n", [], ["bad.txt", "[trainig]", "did you mean '[training]'"]),
    "wrong type": (
        "[training]\nbatch_size = many\n",
        [],
        ["bad.txt", "[training] batch_size", "'many'", "integer >= 1"],
    ),
    "out of range": ("[training]\ntraining_steps = 0\n", [], ["[training] training_steps", "integer >= 1"]),
    "seed out of range": ("[experiment]\nseed = -1\n", [], ["[experiment] seed", ">= 0 and <= 4294967295"]),
    "bad device": ("[experiment]\ndevice = gpu\n", [], ["[experiment] device", "auto, cpu, cuda or cuda:N"]),
    "bad option": (
        "[training]\nloss = mse\n",
        [],
        ["[training] loss", "one of auto, cross_entropy, mean_squared_error"],
    ),
    "bad boolean": ("[logging]\ntensorboard = maybe\n", [], ["[logging] tensorboard", "true or false"]),
    "unknown model": ("[model]\nname = resnet21\n", [], ["[model] name", "did you mean", "small_cnn"]),
    "unknown data set": ("[data]\nname = digit\n", [], ["[data] name", "did you mean 'digits'", "cifar10"]),
    "unknown optimizer": ("[optimizer]\nname = sgdd\n", [], ["[optimizer] name", "did you mean 'sgd'", "lab_pal"]),
    "unknown schedule": ("[schedule]\nname = multisteplr\n", [], ["[schedule] name", "'MultiStepLR'", "none"]),
    "section given as value": ("[optimizer]\narguments = 3\n", [], ["[optimizer] arguments", "[[arguments]]"]),
    "value given as section": ("[training]\n[[batch_size]]\n", [], ["[training] [[batch_size]]", "not a section"]),
    "unparsable file": ("[training\nbatch_size = 3\n", [], ["bad.txt", "not a valid configuration file"]),
    "bad override syntax": ("", ["training.batch_size"], ["--set training.batch_size", "section.key=value"]),
    "override of unknown key": (
        "",
        ["training.training_step=5"],
        ["--set training.training_step=5", "did you mean 'training_steps'"],
    ),
    "override of wrong type": ("", ["training.batch_size=abc"], ["--set training.batch_size=abc", "integer"]),
    "folder name with slash": ("[experiment]\nname = a/b\n", [], ["[experiment] name", "folder name"]),
    "folder name with quoted hash": ('[experiment]\nname = "a#b"\n', [], ["[experiment] name = 'a#b'", "# ; / \\"]),
    "folder name with semicolon": ("[experiment]\nname = a;b\n", [], ["[experiment] name = 'a;b'", "folder name"]),
    "folder name too long": ("[experiment]\nname = " + "x" * 101 + "\n", [], ["at most 100 bytes", "..."]),
    "override cut at a hash": ("", ["experiment.name=a#b"], ["--set experiment.name=a#b", "'#'", "comment"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGURATIONS))
def test_bad_configuration_raises_one_line_naming_the_problem(tmp_path, case):
    text, overrides, fragments = BAD_CONFIGURATIONS[case]
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(UserError) as raised:
        load_configuration(path, overrides)
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_several_problems_are_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("[training]\nbatch_size = x\ntraining_steps = y\nloss = z\n")
    with pytest.raises(UserError, match=r"\[training\] batch_size = 'x'.*\(2 more problems after this one\)"):
        load_configuration(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match="configuration file .*absent.txt not found"):
        load_configuration(tmp_path / "absent.txt")


def test_blame_prefixes_file_and_key(empty_file):
    configuration = load_configuration(empty_file)
    with pytest.raises(UserError) as raised:
        with configuration.blame("training", "batch_size"):
            raise UserError("too large")
    assert str(raised.value) == f"{empty_file}: [training] batch_size: too large"


def test_blame_names_the_set_option_a_value_came_from(empty_file):
    configuration = load_configuration(
        empty_file, ["training.batch_size=5000", "optimizer.name=sgd", "optimizer.arguments.lr=-1"]
    )
    assert configuration.overrides[("training", "batch_size")] == "--set training.batch_size=5000"
    with pytest.raises(UserError) as raised:
        with configuration.blame("training", "batch_size"):
            raise UserError("too large")
    assert str(raised.value) == "--set training.batch_size=5000: [training] batch_size: too large"
    # An argument's problem names its own --set, or the file when the argument came from there.
    for argument, origin in (("lr", "--set optimizer.arguments.lr=-1"), ("momentum", str(empty_file))):
        with pytest.raises(UserError) as raised:
            with configuration.blame("optimizer"):
                raise InvalidArgument(argument, f"argument {argument} refused")
        assert str(raised.value) == f"{origin}: [optimizer]: argument {argument} refused"
    # Keys from the file are named by the file.
    assert configuration.where("training", "training_steps") == f"{empty_file}: [training] training_steps"


def _sgd():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def test_multistep_schedule_divides_learning_rate_at_its_step_milestones():
    optimizer = _sgd()
    schedule = build_schedule("MultiStepLR", optimizer, {"milestones": [3, 5], "gamma": 0.1}, 6)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.001])


def test_schedule_is_rehearsed_on_a_stand_in_and_leaves_the_optimizer_as_built():
    optimizer = _sgd()
    build_schedule("OneCycleLR", optimizer, {"max_lr": 1.0, "total_steps": 10}, 10)
    # OneCycleLR starts at max_lr / div_factor; the rehearsal's 10 steps did not move the real one.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0 / 25)
    with pytest.raises(UserError, match="OneCycleLR fails at training step 11 of 11"):
        build_schedule("OneCycleLR", _sgd(), {"max_lr": 1.0, "total_steps": 10}, 11)


@pytest.mark.parametrize(
    ("name", "arguments", "fragment"),
    [
        (
            "MultiStepLR",
            {"milestones": [3], "gama": 0.1},
            "no argument gama (did you mean 'gamma'?); it accepts: milestones",
        ),
        ("StepLR", {}, "StepLR needs step_size"),
        ("none", {"gamma": 0.1}, "given, but the schedule is none"),
        ("MultiStepLR", {"milestones": 3}, "argument milestones = 3: expected a comma-separated list of integers"),
        ("MultiStepLR", {"milestones": "abc"}, "argument milestones = 'abc'"),
        ("StepLR", {"step_size": "abc"}, "argument step_size = 'abc': expected an integer (StepLR)"),
        ("StepLR", {"step_size": 0}, "StepLR fails at training step 1 of 20"),
        ("CosineAnnealingLR", {"T_max": 0}, "CosineAnnealingLR fails at training step 1 of 20"),
        ("OneCycleLR", {"max_lr": 0.1, "total_steps": 5}, "OneCycleLR fails at training step 6 of 20"),
        ("ExponentialLR", {"gamma": float("inf")}, "gives the learning rate inf"),
        ("LinearLR", {"start_factor": 0}, "LinearLR rejects its arguments because of argument start_factor"),
    ],
)
def test_bad_schedule_arguments_are_refused(name, arguments, fragment):
    with pytest.raises(UserError) as raised:
        build_schedule(name, _sgd(), arguments, 20)
    assert fragment in str(raised.value)


@pytest.mark.parametrize(
    ("function", "arguments", "message"),
    [
        (torch.optim.SGD.__init__, {"lr": "abc"}, "argument lr = 'abc': expected a number"),
        (torch.optim.SGD.__init__, {"lr": True}, "argument lr = True: expected a number"),
        (torch.optim.SGD.__init__, {"nesterov": 1}, "argument nesterov = 1: expected true or false"),
        (torch.optim.SGD.__init__, {"foreach": "x"}, "argument foreach = 'x': expected true or false or none"),
        (torch.optim.SGD.__init__, {"lr": float("nan")}, "argument lr = nan: expected a number, not nan"),
        (torch.optim.Adam.__init__, {"betas": 0.9}, "argument betas = 0.9: expected a comma-separated list of 2 numbers"),
        (torch.optim.Adam.__init__, {"betas": [0.9, "b"]}, "argument betas = '0.9, b': expected a comma-separated list of 2 numbers"),
        (
            torch.optim.lr_scheduler.OneCycleLR.__init__,
            {"anneal_strategy": "cosine"},
            "argument anneal_strategy = 'cosine': expected one of cos, linear",
        ),
    ],
)
def test_argument_types_are_checked_against_the_signature(function, arguments, message):
    with pytest.raises(InvalidArgument) as raised:
        check_argument_types(function, arguments)
    assert str(raised.value) == message and raised.value.argument == next(iter(arguments))


@pytest.mark.parametrize(
    ("function", "arguments"),
    [
        (torch.optim.SGD.__init__, {"lr": 1, "momentum": 0.9, "nesterov": True, "foreach": None}),
        (torch.optim.Adam.__init__, {"betas": [0.9, 0.99], "lr": 1e-3}),
        (torch.optim.lr_scheduler.OneCycleLR.__init__, {"max_lr": [0.1], "total_steps": None}),
        (torch.optim.lr_scheduler.MultiStepLR.__init__, {"milestones": [5]}),
        # An annotation it does not understand is left to the class: LABPAL reads "0:1, 75000:2".
        (LabPal.__init__, {"batch_size_schedule": ["0:1", "75000:2"], "mode": "SGD"}),
    ],
)
def test_arguments_of_the_right_types_pass(function, arguments):
    check_argument_types(function, arguments)


def test_the_refused_argument_is_the_one_whose_absence_mends_the_build():
    def build(arguments):
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], **arguments)

    assert find_refused_argument(build, {"lr": -1.0, "momentum": 0.9}) == "lr"
    # Nesterov needs momentum and no dampening: leaving out either nesterov or dampening mends it.
    assert find_refused_argument(build, {"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "nesterov": True}) is None


def test_schedules_exclude_those_a_file_cannot_configure():
    names = available_schedules()
    assert names[0] == "none" and "MultiStepLR" in names and "CosineAnnealingLR" in names
    assert not {"LambdaLR", "SequentialLR", "ReduceLROnPlateau", "LRScheduler"} & set(names)


def test_closure_optimizer_takes_no_schedule():
    model = torch.nn.Linear(2, 1)
    optimizer = LabPal(model.parameters(), buffers=model.buffers(), training_set_size=100, inference_batch_size=10)
    with pytest.raises(UserError, match="sets its own learning rate"):
        build_schedule("StepLR", optimizer, {"step_size": 5}, 10, follows_schedule=stepper_kind(optimizer).follows_schedule)


def test_losses_follow_the_task():
    outputs = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    assert choose_loss("auto", "classification")(outputs, labels) == pytest.approx(
        torch.nn.functional.cross_entropy(outputs, labels).item()
    )
    # One-hot targets [[1, 0], [0, 1]]: squared errors 1, 0, 0, 0.
    assert choose_loss("mean_squared_error", "classification")(outputs, labels).item() == pytest.approx(0.25)
    assert choose_loss("auto", "regression")(torch.ones(2, 1), torch.zeros(2, 1)).item() == pytest.approx(1.0)
    with pytest.raises(UserError, match="cross_entropy needs class labels"):
        choose_loss("cross_entropy", "regression")
