"""The distributed room: torchrun's environment, batch and evaluation shards, and collectives on 2 gloo ranks."""

import pytest
import torch
import torch.distributed as dist

from source.errors import UserError
from source.training.distributed import (
    Distributed,
    RankLost,
    ReportedElsewhere,
    World,
    check_batch_size,
    from_environment,
    process_device,
    read_world,
    reported_once_per_node,
    speaks_for_node,
)
from tests import distributed_workers as workers


def _torchrun_environment(rank=1, world_size=4, local_rank=1, local_world_size=2):
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }


@pytest.fixture
def two_gpus(monkeypatch):
    """A node that claims two CUDA devices (nothing is ever placed on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# ---------------------------------------------------------------------- one process, environment


def test_empty_environment_gives_the_single_process_context_and_starts_nothing():
    distributed = from_environment("cpu", 5, environment={"PATH": "/usr/bin"})
    assert distributed == Distributed.single("cpu")
    world = (distributed.rank, distributed.world_size, distributed.local_rank, distributed.local_world_size)
    assert world == (0, 1, 0, 1)
    assert distributed.is_main and not distributed.is_distributed
    assert distributed.device == torch.device("cpu")
    assert not dist.is_initialized()


def test_torchrun_world_of_one_process_starts_nothing():
    distributed = from_environment("cpu", 5, environment=_torchrun_environment(0, 1, 0, 1))
    assert distributed == Distributed.single("cpu")
    assert not dist.is_initialized()


def test_single_process_collectives_return_at_once_unchanged():
    distributed = Distributed.single("cpu")
    tensors = [torch.tensor([1.5, -2.0]), torch.tensor(3, dtype=torch.int64)]
    assert distributed.sum_tensors(tensors) is tensors
    assert tensors[0].tolist() == [1.5, -2.0] and tensors[1].item() == 3
    assert distributed.mean_tensors(tensors[:1])[0].tolist() == [1.5, -2.0]
    assert distributed.any_rank(True) is True and distributed.any_rank(False) is False
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()
    distributed.shutdown()
    assert not dist.is_initialized()


def test_torchrun_variables_are_read_as_the_world():
    world = read_world(_torchrun_environment(5, 8, 1, 4))
    assert world == World(rank=5, world_size=8, local_rank=1, local_world_size=4)
    assert read_world({"HOME": "/root"}) is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"LOCAL_RANK": None}, "sets RANK, WORLD_SIZE, LOCAL_WORLD_SIZE but not LOCAL_RANK"),
        ({"MASTER_PORT": None}, "but not MASTER_PORT"),
        ({"RANK": "one"}, "RANK='one' is not a count"),
        ({"RANK": "4"}, "impossible process: RANK=4 WORLD_SIZE=4"),
        ({"LOCAL_WORLD_SIZE": "8"}, "LOCAL_WORLD_SIZE=8"),
    ],
)
def test_incomplete_or_impossible_torchrun_variables_are_refused(change, message):
    environment = _torchrun_environment()
    for name, value in change.items():
        if value is None:
            del environment[name]
        else:
            environment[name] = value
    with pytest.raises(UserError, match=message):
        from_environment("cpu", 5, environment=environment)
    assert not dist.is_initialized()


def test_each_process_takes_the_gpu_of_its_local_rank(two_gpus):
    assert process_device("auto", 1, 2) == torch.device("cuda", 1)
    assert process_device("cuda", 0, 2) == torch.device("cuda", 0)
    assert process_device("cpu", 1, 2) == torch.device("cpu")
    assert process_device("cuda:1", 0, 1) == torch.device("cuda", 1)


def test_auto_without_cuda_runs_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_device("auto", 1, 2) == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA device; use cpu or auto"):
        process_device("cuda", 0, 2)


def test_more_processes_than_gpus_on_a_node_is_refused_before_joining(two_gpus):
    environment = _torchrun_environment(rank=3, world_size=4, local_rank=3, local_world_size=4)
    with pytest.raises(UserError) as caught:
        from_environment("auto", 5, environment=environment)
    assert str(caught.value) == (
        "torchrun starts 4 processes on this node but it has 2 CUDA devices; start torchrun with --nproc_per_node=2"
    )
    assert not dist.is_initialized()


def test_one_named_gpu_for_several_processes_is_refused(two_gpus):
    with pytest.raises(UserError, match="device cuda:1 names one GPU for all 2 processes on this node"):
        from_environment("cuda:1", 5, environment=_torchrun_environment())


def test_invalid_timeout_is_refused():
    with pytest.raises(ValueError, match="Invalid timeout_seconds: 0"):
        from_environment("cpu", 0, environment={})


# ---------------------------------------------------------------------- batch and evaluation shards


def test_batch_size_is_split_equally_among_the_processes():
    assert check_batch_size(128, 1) == 128
    assert check_batch_size(128, 4) == 32
    assert check_batch_size(6, 6) == 1


def test_batch_size_the_processes_do_not_divide_is_refused():
    with pytest.raises(UserError) as caught:
        check_batch_size(130, 4)
    assert str(caught.value) == (
        "training.batch_size 130 is not divisible by the 4 processes; every process takes an equal share of "
        "each batch, so use a multiple of 4 (e.g. 128 or 132) or start torchrun with another --nproc_per_node"
    )
    with pytest.raises(UserError, match=r"use a multiple of 8 \(e.g. 8\)"):
        check_batch_size(3, 8)


def test_mean_of_integer_tensors_is_refused():
    with pytest.raises(ValueError, match="a mean needs floating point"):
        Distributed.single("cpu").mean_tensors([torch.tensor([1, 2])])


def test_broadcast_from_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="Invalid source rank: 1; there are 1 processes"):
        Distributed.single("cpu").broadcast_object("x", source=1)


def test_guard_turns_lost_contact_into_rank_lost_and_leaves_other_errors_alone():
    distributed = Distributed(rank=1, world_size=2, local_rank=1, local_world_size=2, device=torch.device("cpu"),
                              timeout_seconds=30)  # fmt: skip
    gloo_message = (
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:147: Connection reset "
        "by peer. This is typically caused by a remote worker hanging or bugs in the application."
    )
    with pytest.raises(RankLost) as caught, distributed.guard("taking a step"):
        raise RuntimeError(gloo_message)
    assert str(caught.value) == (
        "process 1 of 2 lost the others while taking a step: one of them stopped or did not answer within "
        "30 s ([experiment] distributed_timeout_seconds); every process stops; continue with --resume "
        "(Read error [127.0.0.1]:147: Connection reset by peer)"
    )
    assert not isinstance(caught.value, UserError) and RankLost.EXIT_STATUS == 4
    with pytest.raises(RankLost), distributed.guard("x"):
        raise dist.DistBackendError("NCCL error")
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"), distributed.guard("x"):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


# ---------------------------------------------------------------------- two gloo processes


@pytest.fixture(scope="module")
def agreement_results():
    return workers.values_of(workers.run_ranks(workers.agreement, 2))


def test_two_ranks_know_who_they_are(agreement_results):
    assert [seen["world"] for seen in agreement_results] == [(0, 2, 0, 2), (1, 2, 1, 2)]
    assert [seen["device"] for seen in agreement_results] == ["cpu", "cpu"]
    assert [seen["is_main"] for seen in agreement_results] == [True, False]


def test_any_rank_is_true_on_all_ranks_when_one_rank_says_so(agreement_results):
    for seen in agreement_results:
        assert (seen["any_only_last"], seen["any_none"], seen["any_all"]) == (True, False, True)


def test_sums_and_means_are_exact_on_every_rank(agreement_results):
    for seen in agreement_results:
        assert seen["sum_returns_its_argument"]
        assert seen["sums"] == (0.75, [[0.0, 3.0, 6.0], [9.0, 12.0, 15.0]], [1, 10, 14])
        assert seen["means"] == [[1.5, 3.0], 0.5]


def test_broadcast_object_gives_every_rank_the_source_ranks_object(agreement_results):
    for seen in agreement_results:
        assert seen["from_0"] == {"decision": "stop", "rank": 0}
        assert seen["from_last"] == "message of rank 1"


def test_evaluation_shards_of_two_ranks_see_every_sample_once(agreement_results):
    for seen in agreement_results:
        for count in (0, 1, 5, 11):
            assert seen[f"coverage_{count}"] == [1] * count


def test_only_the_main_rank_prints_to_stdout_but_every_rank_to_stderr(tmp_path, monkeypatch):
    # The ranks also run in the test's working directory and environment, as torchrun's would.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTRIBUTED_TEST_MARK", "set by the test")
    results = workers.run_ranks(workers.printing, 2)
    assert workers.values_of(results) == [(str(tmp_path), "set by the test")] * 2
    assert results[0].stdout == "report of rank 0\nafter, rank 0\n"
    assert results[1].stdout == "after, rank 1\n"
    assert "error of rank 0" in results[0].stderr and "error of rank 1" in results[1].stderr


def test_a_rank_that_dies_makes_the_others_stop_with_one_clear_line():
    results = workers.run_ranks(workers.exit_before_collective, 2, timeout_seconds=20)
    survivor, dead = results
    assert dead.exit_code == 9 and not dead.killed
    assert survivor.exit_code == 0 and not survivor.killed, survivor.stderr
    message = survivor.value
    assert message.startswith(
        "process 0 of 2 lost the others while agreeing on a decision: one of them stopped or did not answer "
        "within 20 s ([experiment] distributed_timeout_seconds); every process stops; continue with --resume ("
    )
    assert "\n" not in message


def test_a_rank_that_stops_answering_makes_the_others_stop_after_the_timeout(tmp_path):
    # Short, but long enough for both ranks to join the group on a busy machine (it bounds that too).
    results = workers.run_ranks(workers.silent_rank, 2, args=(str(tmp_path / "flag"),), timeout_seconds=3)
    survivor, silent = results
    assert survivor.exit_code == 0 and not survivor.killed, survivor.stderr
    assert silent.exit_code == 0 and not silent.killed
    assert survivor.value.startswith(
        "process 0 of 2 lost the others while summing across processes: one of them stopped or did not answer "
        "within 3 s ([experiment] distributed_timeout_seconds)"
    )
    assert "Timed out" in survivor.value


@pytest.mark.parametrize(
    ("environment", "speaks"), [({}, True), ({"LOCAL_RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False)]
)
def test_a_problem_every_process_of_a_node_meets_is_reported_by_its_local_rank_0(environment, speaks):
    assert speaks_for_node(environment) is speaks
    with pytest.raises(UserError) as raised, reported_once_per_node(environment):
        raise UserError("unknown key bogus in [training]")
    assert isinstance(raised.value, ReportedElsewhere) is not speaks
    assert str(raised.value) == "unknown key bogus in [training]"
