"""Checkpoint safety: damaged or foreign checkpoints, fallbacks, kills between writes, exit statuses.

A damaged last.pt or best.pt gives one short line and exit status 2, and changes nothing in the
run folder; last.pt falls back to last.previous.pt, and a best.pt newer than last.pt is replaced
by the best checkpoint last.pt names. SIGINT and SIGTERM save and exit with 130 and 143.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
from source.files import LOCK_FILE
from source.plotting import read_metrics
from source.registries import load_configuration
from source.training import RunFolder, run_experiment, trainer
from source.training.checkpoints import load_checkpoint, previous_path, save_atomically
from tests.tiny_run import tiny_with

REPOSITORY = Path(__file__).resolve().parents[1]

# The tiny digits run with SGD: 35 steps per epoch; evaluations at 10, 20, 24.
TINY = tiny_with(
    {"optimizer": {"name": "sgd", "arguments": {"lr": "0.05", "momentum": "0.9"}}, "logging": {"tensorboard": "false"}}
)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped at step 12: last.pt (12), last.previous.pt (10), best.pt (10)."""
    workspace = tmp_path_factory.mktemp("stopped")
    (workspace / "tiny.txt").write_text(TINY)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        run_experiment(load_configuration("tiny.txt"), stop_after_steps=12)
    return workspace


@pytest.fixture
def workspace(stopped_run, tmp_path, monkeypatch):
    """A copy of the stopped run to damage."""
    copy = tmp_path / "copy"
    shutil.copytree(stopped_run, copy)
    monkeypatch.chdir(copy)
    return copy


def _files(folder):
    """The run's files and their bytes; owner.lock names whichever process held the folder last."""
    return {
        path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file() and path.name != LOCK_FILE
    }


def _edit(name, change):
    def damage(folder):
        checkpoint = load_checkpoint(folder / name)
        save_atomically(change(checkpoint) or checkpoint, folder / name)

    return damage


def _write(name, content):
    def damage(folder):
        (folder / name).write_bytes(content(folder / name) if callable(content) else content)

    return damage


def _other_model(checkpoint):
    checkpoint["model"] = torch.nn.Linear(64, 10).state_dict()


def _other_optimizer(checkpoint):
    """Adam's state over as many parameters as the run's SGD has."""
    count = len(checkpoint["optimizer"]["param_groups"][0]["params"])
    parameters = [torch.nn.Parameter(torch.zeros(1)) for _ in range(count)]
    checkpoint["optimizer"] = torch.optim.Adam(parameters).state_dict()


def _not_finite(checkpoint):
    next(iter(checkpoint["model"].values()))[0] = float("nan")


class _RunsCode:
    """Unpickling this would create the file its path names."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _first_weight(checkpoint):
    """The name of the model's first weight of two or more dimensions."""
    return next(name for name, tensor in checkpoint["model"].items() if tensor.dim() >= 2)


def _on_meta_device(checkpoint):
    name = _first_weight(checkpoint)
    checkpoint["model"][name] = torch.empty_like(checkpoint["model"][name], device="meta")


def _sparse_weight(checkpoint):
    name = _first_weight(checkpoint)
    checkpoint["model"][name] = checkpoint["model"][name].to_sparse()


def _float16_weights(checkpoint):
    checkpoint["model"] = {name: tensor.half() for name, tensor in checkpoint["model"].items()}


def _reshaped_momentum(checkpoint):
    checkpoint["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(3)


def _counters_on_meta_device(checkpoint):
    checkpoint["training_window"]["loss_sum"] = torch.empty((), dtype=torch.float64, device="meta")


def _runs_code(folder):
    torch.save({"step": 12, "model": _RunsCode(folder / "payload_ran")}, folder / "last.pt")


def _damage_both(folder):
    _write("last.pt", b"")(folder)
    _write("last.previous.pt", lambda path: path.read_bytes()[:1000])(folder)


def _folder_for_last(folder):
    (folder / "last.pt").unlink()
    (folder / "last.pt").mkdir()


# Each case: how to damage the run folder (last.previous.pt is removed first unless the case
# keeps it), and fragments of the one-line message.
DAMAGED = {
    "truncated last.pt": (_write("last.pt", lambda path: path.read_bytes()[:2000]), ["last.pt", "truncated"]),
    "empty last.pt": (_write("last.pt", b""), ["last.pt", "truncated or not a PyTorch checkpoint"]),
    "text as last.pt": (_write("last.pt", b"step = 12\n"), ["last.pt", "not a PyTorch checkpoint"]),
    "last.pt is a folder": (_folder_for_last, ["last.pt", "it is a folder"]),
    "last.pt holds a list": (lambda folder: torch.save([1, 2], folder / "last.pt"), ["holds a list"]),
    "last.pt lacks keys": (_edit("last.pt", lambda c: c.pop("optimizer") and None), ["lacks optimizer"]),
    "another model's last.pt": (_edit("last.pt", _other_model), ["another model's weights"]),
    "another optimizer's last.pt": (_edit("last.pt", _other_optimizer), ["another optimizer's state", "betas"]),
    "non-finite last.pt": (_edit("last.pt", _not_finite), ["last.pt", "is not finite"]),
    "last.pt that runs code": (_runs_code, ["could run code"]),
    "last.pt and last.previous.pt damaged": (_damage_both, ["runs/tiny/last.pt", "truncated"]),
    "weights on the meta device": (_edit("last.pt", _on_meta_device), ["last.pt: its model.", "on the meta device"]),
    "a sparse weight": (_edit("last.pt", _sparse_weight), ["last.pt: its model.", "sparse_coo tensor, not a dense"]),
    "float16 weights": (_edit("last.pt", _float16_weights), ["last.pt: its model.", "is float16, but the model's is"]),
    "metrics_offset = -1": (_edit("last.pt", lambda c: c.update(metrics_offset=-1)), ["metrics_offset -1 is not"]),
    "elapsed_seconds text": (_edit("last.pt", lambda c: c.update(elapsed_seconds="long")), ["elapsed_seconds 'long'"]),
    "step = True": (_edit("last.pt", lambda c: c.update(step=True)), ["last.pt: its step True is not a step count"]),
    "empty best validation": (
        _edit("last.pt", lambda c: c["best"].update(validation={})),
        ["last.pt: its best validation result is empty"],
    ),
    "best step after the last": (
        _edit("last.pt", lambda c: c["best"].update(step=99)),
        ["last.pt: its record of the best checkpoint is damaged"],
    ),
    "momentum buffer of another shape": (
        _edit("last.pt", _reshaped_momentum),
        ["its optimizer's momentum_buffer of parameter 0 is a float32 (3,) tensor, but the parameter is float32"],
    ),
    "learning rate as text": (
        _edit("last.pt", lambda c: c["optimizer"]["param_groups"][0].update(lr="fast")),
        ["its optimizer setting group 0.lr is 'fast', not a number"],
    ),
    "counters on the meta device": (
        _edit("last.pt", _counters_on_meta_device),
        ["its training_window.loss_sum is on the meta device"],
    ),
    "random state of another dtype": (
        _edit("last.pt", lambda c: c["random_state"].update(torch=c["random_state"]["torch"].long())),
        ["its random_state.torch is a int64 (5056,) tensor, not uint8 (5056,)"],
    ),
    "float16 best.pt": (_edit("best.pt", _float16_weights), ["best.pt: its model.", "is float16"]),
    "best.pt of step True": (_edit("best.pt", lambda c: c.update(step=True)), ["best.pt: its step True"]),
    "best.pt without validation loss": (
        _edit("best.pt", lambda c: c["validation"].pop("loss") and None),
        ["best.pt: its validation result lacks loss"],
    ),
    "missing best.pt": (lambda folder: (folder / "best.pt").unlink(), ["best checkpoint (step 10) is lost"]),
    "truncated best.pt": (_write("best.pt", lambda path: path.read_bytes()[:1000]), ["best.pt", "truncated"]),
    "another model's best.pt": (_edit("best.pt", _other_model), ["best.pt", "another model's weights"]),
    "non-finite best.pt": (_edit("best.pt", _not_finite), ["best.pt", "is not finite"]),
    "best.pt newer than last.pt": (_edit("best.pt", lambda c: c.update(step=20)), ["step 10) is lost", "another step"]),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_checkpoint_gives_one_line_and_changes_nothing(workspace, capsys, case):
    damage, fragments = DAMAGED[case]
    folder = workspace / "runs" / "tiny"
    if case != "last.pt and last.previous.pt damaged":
        (folder / "last.previous.pt").unlink()
    damage(folder)
    before = _files(folder)
    assert main.main(["--config", "tiny.txt", "--resume"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot ") and error.count("\n") == 1 and len(error) <= 200, error
    assert "Traceback" not in error
    for fragment in fragments:
        assert fragment in error
    assert _files(folder) == before
    assert not (folder / "payload_ran").exists()


def _uninterrupted(workspace):
    configuration = load_configuration("tiny.txt", ["experiment.name=whole"])
    assert run_experiment(configuration).finished
    return RunFolder.of(configuration)


def _assert_same_end(folder, whole):
    """The resumed run ends with the uninterrupted run's weights, best checkpoint and test result."""
    for name in ("last.pt", "best.pt"):
        mine, theirs = load_checkpoint(folder / name), load_checkpoint(whole.path / name)
        assert mine["step"] == theirs["step"]
        for key, tensor in theirs["model"].items():
            assert torch.equal(mine["model"][key], tensor), (name, key)
    [test] = [record for record in read_metrics(folder / "metrics.jsonl") if record["split"] == "test"]
    [expected] = [record for record in read_metrics(whole.metrics_path) if record["split"] == "test"]
    assert (test["accuracy"], test["loss"], test["best_step"]) == (
        expected["accuracy"],
        expected["loss"],
        expected["best_step"],
    )


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(workspace, capsys):
    folder = workspace / "runs" / "tiny"
    (folder / "last.pt").write_bytes(b"")
    (folder / ".last.pt.4242.partial").write_bytes(b"half")
    (folder / ".best.pt.4242.partial").write_bytes(b"half")
    assert main.main(["--config", "tiny.txt", "--resume"]) == 0
    output = capsys.readouterr().out
    assert "last.pt: it is truncated or not a PyTorch checkpoint; falling back to runs/tiny/last.previous.pt" in output
    assert "resuming runs/tiny from step 10" in output
    assert not list(folder.glob(".*.partial"))
    _assert_same_end(folder, _uninterrupted(workspace))


def test_a_best_checkpoint_newer_than_last_is_replaced_by_the_previous_one(workspace, capsys):
    folder = workspace / "runs" / "tiny"
    shutil.copy(folder / "best.pt", folder / "best.previous.pt")
    _edit("best.pt", lambda checkpoint: checkpoint.update(step=20))(folder)
    assert main.main(["--config", "tiny.txt", "--resume", "--stop-after-steps", "1"]) == 0
    assert "restoring it from runs/tiny/best.previous.pt" in capsys.readouterr().out
    assert load_checkpoint(folder / "best.pt")["step"] == 10


def _kill_at(monkeypatch, name, step, *, after_rotation=False):
    """Raise KeyboardInterrupt, as a kill would stop the process, when ``name`` is saved at ``step``."""
    save = trainer.save_checkpoint

    def save_or_die(state, path):
        if Path(path).name == name and state["step"] == step:
            if after_rotation:
                os.replace(path, previous_path(path))
            raise KeyboardInterrupt
        save(state, path)

    monkeypatch.setattr(trainer, "save_checkpoint", save_or_die)


@pytest.mark.parametrize(
    ("name", "after_rotation", "message"),
    [
        ("best.pt", False, "rebuilding it from the last checkpoint"),
        ("last.pt", True, "last.pt is missing; falling back to runs/tiny/last.previous.pt, of step 12"),
    ],
    ids=["between_last_and_best", "between_rotation_and_last"],
)
def test_a_kill_between_checkpoint_writes_resumes_to_the_same_end(workspace, monkeypatch, capsys, name, after_rotation,
                                                                  message):
    configuration = load_configuration("tiny.txt")
    with monkeypatch.context() as patch:
        _kill_at(patch, name, 20, after_rotation=after_rotation)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(configuration, resume=True)
    assert run_experiment(configuration, resume=True).finished
    assert message in capsys.readouterr().out
    _assert_same_end(RunFolder.of(configuration).path, _uninterrupted(workspace))


def _wait_for_training(process, metrics, seconds=600):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and metrics.stat().st_size:
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not start training: {process.communicate()}")


@pytest.mark.parametrize(("signal_number", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_and_exits_with_128_plus_its_number(tmp_path, signal_number, status):
    (tmp_path / "tiny.txt").write_text(TINY.replace("training_steps = 24", "training_steps = 100000"))
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPOSITORY / "main.py"), "--config", "tiny.txt"]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_training(process, tmp_path / "runs" / "tiny" / "metrics.jsonl")
        process.send_signal(signal_number)
        output, errors = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == status, errors
    assert "Traceback" not in errors
    step = load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")["step"]
    assert f"stopped at step {step} of 100000; continue with --resume" in output
