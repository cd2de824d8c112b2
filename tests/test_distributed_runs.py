"""main.py in two gloo processes, as torchrun starts it: one set of files, agreed metrics, lost processes, resume."""

import json

import pytest
import torch

from tests import distributed_workers as workers
from tests.tiny_run import set_options, workspace  # noqa: F401 (a fixture)

# 24 steps of batches of 32: each process takes 16 samples of every batch.
ARGUMENTS = ["--config", "tiny.txt", *set_options("logging.log_every_steps=4")]


def _records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _statuses(results):
    return [result.value for result in results]


def test_two_processes_write_one_set_of_files_and_report_once(workspace):
    results = workers.run_ranks(workers.main_in_rank, 2, args=(ARGUMENTS,), joins=False, deadline_seconds=240)
    assert _statuses(results) == [0, 0], [result.stderr[-2000:] for result in results]
    folder = workspace / "runs" / "tiny"
    records = _records(folder)
    training_steps = [record["step"] for record in records if record["split"] == "training"]
    assert training_steps == [4, 8, 12, 16, 20, 24]  # once, not once per process
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    assert {path.name for path in folder.glob("*.pt")} == {
        "best.pt", "best.previous.pt", "last.pt", "last.previous.pt"
    }
    (test,) = [record for record in records if record["split"] == "test"]
    assert f"test accuracy: {test['accuracy']:.4f}" in results[0].stdout
    assert results[1].stdout == ""
    # Every validation sample counted once: accuracies are multiples of 1/288.
    for record in records:
        if record["split"] == "validation":
            assert abs(record["accuracy"] * 288 - round(record["accuracy"] * 288)) < 1e-6
    assert "pipeline = device" in (folder / "configuration.txt").read_text()


def test_one_and_two_processes_train_the_same_experiment(workspace):
    """The same global batches: the learning rates LABPAL measures agree, and so does the test accuracy.

    Not bitwise: each process normalises its 16 samples with their own BatchNorm statistics.
    """
    longer = [*ARGUMENTS, *set_options("training.training_steps=150", "training.evaluate_every_steps=50")]
    assert workers.values_of(workers.run_ranks(
        workers.main_in_rank, 1, args=([*longer, *set_options("experiment.name=one")],), joins=False,
        deadline_seconds=240,
    )) == [0]
    results = workers.run_ranks(
        workers.main_in_rank, 2, args=([*longer, *set_options("experiment.name=two")],), joins=False,
        deadline_seconds=240,
    )
    assert _statuses(results) == [0, 0]
    one, two = (_records(workspace / "runs" / name) for name in ("one", "two"))

    def measured(records):
        return [record["learning_rate"] for record in records if record.get("event") == "measurement"]

    assert len(measured(one)) >= 1
    assert measured(two) == pytest.approx(measured(one), rel=0.05)
    (test_one,), (test_two,) = ([r for r in records if r["split"] == "test"] for records in (one, two))
    assert test_one["accuracy"] >= 0.9 and abs(test_one["accuracy"] - test_two["accuracy"]) <= 0.02


def test_a_batch_size_the_processes_cannot_share_is_refused(workspace):
    results = workers.run_ranks(
        workers.main_in_rank, 2, args=([*ARGUMENTS, *set_options("training.batch_size=33")],), joins=False,
        deadline_seconds=120,
    )
    assert _statuses(results) == [2, 2]
    assert "training.batch_size 33 is not divisible by the 2 processes" in results[0].stderr
    assert results[0].stderr.count("\n") == 1 and results[1].stderr == ""  # printed once, not once per process
    assert not (workspace / "runs" / "tiny").exists()


def test_an_error_found_before_the_processes_join_is_printed_once(workspace):
    results = workers.run_ranks(
        workers.main_in_rank, 2, args=([*ARGUMENTS, *set_options("training.bogus=1")],), joins=False,
        deadline_seconds=120,
    )
    assert _statuses(results) == [2, 2]
    assert results[0].stderr.startswith("error: --set training.bogus=1: unknown key bogus in [training]")
    assert results[0].stderr.count("\n") == 1 and results[1].stderr == ""


def test_a_refused_checkpoint_write_stops_every_process_with_one_line(workspace):
    results = workers.run_ranks(
        workers.main_in_rank_with_full_disk, 2, args=(ARGUMENTS, 20), joins=False, deadline_seconds=240
    )
    assert _statuses(results) == [5, 5], results[0].stderr[-2000:]
    assert results[0].stderr == (
        "error: cannot write runs/tiny/last.pt: No space left on device; the checkpoint of step 10 is kept; "
        "once that is fixed, continue with --resume\n"
    )
    assert results[1].stderr == ""
    assert torch.load(workspace / "runs" / "tiny" / "last.pt", weights_only=True)["step"] == 10


def test_a_comparison_is_refused_under_torchrun(workspace):
    tiny = (workspace / "tiny.txt").read_text().replace("[optimizer]\nname = lab_pal\n", "")
    (workspace / "compare.txt").write_text(tiny + "[comparison]\n    [[sgd]]\n    label = SGD\n    optimizer = sgd\n")
    results = workers.run_ranks(
        workers.main_in_rank, 2, args=(["--config", "compare.txt"],), joins=False, deadline_seconds=120
    )
    assert _statuses(results) == [2, 2]
    assert "is a comparison, which runs in one process" in results[0].stderr


def test_a_dead_process_stops_the_others_with_a_clear_message_and_the_run_resumes(workspace):
    arguments = [*ARGUMENTS, *set_options("experiment.distributed_timeout_seconds=20")]
    results = workers.run_ranks(
        workers.main_in_rank_dying, 2, args=(arguments, 1, 14), joins=False, deadline_seconds=240
    )
    assert results[1].exit_code == 9
    assert results[0].value == 4, results[0].stderr[-2000:]
    assert "lost the others" in results[0].stderr and "continue with --resume" in results[0].stderr
    assert "Traceback" not in results[0].stderr
    folder = workspace / "runs" / "tiny"
    assert (folder / "last.pt").exists()  # the evaluation at step 10 saved it
    resumed = workers.run_ranks(
        workers.main_in_rank, 2, args=([*ARGUMENTS, "--resume"],), joins=False, deadline_seconds=240
    )
    assert _statuses(resumed) == [0, 0], resumed[0].stderr[-2000:]
    assert "resuming runs/tiny from step 10" in resumed[0].stdout
    assert [r["step"] for r in _records(folder) if r["split"] == "test"] == [24]


def test_a_signal_to_one_process_stops_all_at_the_next_log_interval(workspace):
    results = workers.run_ranks(
        workers.main_in_rank_signalled, 2, args=(ARGUMENTS, 1, 5), joins=False, deadline_seconds=240
    )
    assert [result.value for result in results] == [0, 143], results[1].stderr[-2000:]
    # Agreed at the log interval of step 8; the checkpoint waits until LABPAL's first measurement,
    # which spans steps 1-10, holds no partial sums of the processes' shares.
    assert "stopped at step 10 of 24; continue with --resume" in results[0].stdout
    checkpoint = torch.load(workspace / "runs" / "tiny" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 10


def test_a_run_of_two_processes_resumes_in_one(workspace):
    results = workers.run_ranks(
        workers.main_in_rank, 2, args=([*ARGUMENTS, "--stop-after-steps", "12"],), joins=False, deadline_seconds=240
    )
    assert _statuses(results) == [0, 0]
    resumed = workers.run_ranks(workers.main_in_rank, 1, args=([*ARGUMENTS, "--resume"],), joins=False,
                                deadline_seconds=240)
    assert _statuses(resumed) == [0]
    assert "resuming runs/tiny from step 12" in resumed[0].stdout
    assert [r["step"] for r in _records(workspace / "runs" / "tiny") if r["split"] == "test"] == [24]


def test_two_processes_resume_exactly(workspace):
    def run(name, *extra):
        arguments = [*ARGUMENTS, *set_options(f"experiment.name={name}"), *extra]
        results = workers.run_ranks(workers.main_in_rank, 2, args=(arguments,), joins=False, deadline_seconds=240)
        assert _statuses(results) == [0, 0], results[0].stderr[-2000:]

    run("whole")
    run("pieces", "--stop-after-steps", "12")
    run("pieces", "--resume")

    def without_times(name):
        return [{k: v for k, v in record.items() if k != "elapsed_seconds"} for record in _records(workspace / "runs" / name)]

    assert without_times("whole") == without_times("pieces")
    whole, pieces = (torch.load(workspace / "runs" / name / "last.pt", weights_only=True) for name in ("whole", "pieces"))
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, pieces["model"][name]), name


def test_a_divergence_on_one_process_stops_all(workspace):
    results = workers.run_ranks(
        workers.main_in_rank_diverging, 2, args=(ARGUMENTS, 1, 3), joins=False, deadline_seconds=240
    )
    assert _statuses(results) == [3, 3], results[0].stderr[-2000:]
    (diverged,) = [r for r in _records(workspace / "runs" / "tiny") if r["split"] == "diverged"]
    assert diverged["step"] == 13 and "(process 1)" in diverged["reason"]
    assert "training diverged at step 13" in results[0].stderr
