"""Run a function in several CPU processes that form a gloo process group, as torchrun would start them.

``run_ranks(function, world_size)`` starts ``world_size`` processes (forked from multiprocessing's
fork server: clean interpreters, like torchrun's, that need not import torch each time), gives
each torchrun's environment variables and serves their rendezvous store, as torchrun's agent
does, calls ``function(distributed, *args)`` with the ``Distributed`` that ``from_environment``
builds there, and returns one ``RankResult`` per rank: what the function returned or raised, and
everything the process wrote to stdout and stderr. Every process is gone when it returns: those
still running at ``deadline_seconds`` are killed (``RankResult.killed``), so a hang fails a test
instead of stalling the suite. ``function`` and its ``args`` travel by pickle: a module-level
function, like the workers below.
"""

import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from source.data.sampling import share_of
from source.training.distributed import RankLost, from_environment

__all__ = ["RankResult", "run_ranks", "values_of"]


@dataclass(frozen=True)
class RankResult:
    """How one rank's process ended."""

    rank: int
    exit_code: int | None
    value: object
    error: str | None  # "ExceptionType: message" of what the function raised
    stdout: str
    stderr: str
    killed: bool  # still running at the deadline


def _process_context():
    """Processes forked from one fresh server that has imported torch and this module once.

    Like spawn, every rank starts from a clean single-threaded interpreter (forking pytest itself,
    with its thread pools, is unsafe), but the imports are paid once per session, not per rank.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _rank_main(function, args, rank, world_size, port, timeout_seconds, folder, launcher, joins):
    """The body of one rank's process: torchrun's environment, the function, the result file.

    ``launcher`` is the caller's working directory and environment at launch; the fork server's
    are those of when it started, before a test's chdir or monkeypatched variables.
    """
    folder = Path(folder)
    working_directory, environment = launcher
    os.chdir(working_directory)
    os.environ.clear()
    os.environ.update(environment)
    # File descriptors, not just sys.stdout: output of C++ code and of os._exit paths is caught too.
    for descriptor, name in ((1, "stdout"), (2, "stderr")):
        with open(folder / f"{rank}.{name}", "w") as file:
            os.dup2(file.fileno(), descriptor)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        # As under torchrun, every rank is a client of the store its launcher serves.
        TORCHELASTIC_USE_AGENT_STORE="True",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    outcome, distributed = {"value": None, "error": None}, None
    try:
        if joins:
            distributed = from_environment("cpu", timeout_seconds)
        outcome["value"] = function(distributed, *args)
    except BaseException as error:
        traceback.print_exc()
        outcome["error"] = f"{type(error).__name__}: {error}"
    finally:
        if distributed is not None:
            distributed.shutdown()
    with open(folder / f"{rank}.partial", "wb") as file:
        pickle.dump(outcome, file)
    os.replace(folder / f"{rank}.partial", folder / f"{rank}.result")
    sys.stdout.flush()
    sys.stderr.flush()
    # Without interpreter shutdown, which could wait on threads of a broken process group.
    os._exit(1 if outcome["error"] else 0)


def run_ranks(function, world_size=2, *, args=(), timeout_seconds=10, deadline_seconds=45, joins=True):
    """Run ``function(distributed, *args)`` on ``world_size`` gloo ranks; a list of ``RankResult``, by rank.

    ``timeout_seconds`` is the process-group timeout (distributed_timeout_seconds), and
    ``deadline_seconds`` the time after which processes still running are killed. With
    ``joins=False`` the ranks get torchrun's environment but join no group: ``function(None, *args)``
    joins it itself, as ``main.main`` does.
    """
    context = _process_context()
    folder = Path(tempfile.mkdtemp(prefix="ranks_"))
    # The rendezvous store, on a port the system picks while it binds (no race for a free port),
    # open until this function returns.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    port = store.port
    launcher = (os.getcwd(), dict(os.environ))
    processes = [
        context.Process(
            target=_rank_main,
            args=(function, args, rank, world_size, port, timeout_seconds, str(folder), launcher, joins),
            name=f"rank {rank}",
        )
        for rank in range(world_size)
    ]
    killed = set()
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + deadline_seconds
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
    finally:
        for rank, process in enumerate(processes):
            if process.is_alive():
                process.kill()
                killed.add(rank)
            if process.pid is not None:
                process.join()
    try:
        return [_result(folder, rank, processes[rank].exitcode, rank in killed) for rank in range(world_size)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _result(folder, rank, exit_code, killed):
    result_path = folder / f"{rank}.result"
    outcome = {"value": None, "error": None}
    if result_path.exists():
        with open(result_path, "rb") as file:
            outcome = pickle.load(file)

    def read(name):
        path = folder / f"{rank}.{name}"
        return path.read_text(errors="replace") if path.exists() else ""

    return RankResult(rank, exit_code, outcome["value"], outcome["error"], read("stdout"), read("stderr"), killed)


def values_of(results):
    """The ranks' return values; an AssertionError with their stderr when any rank failed."""
    failed = [result for result in results if result.exit_code != 0 or result.error is not None]
    if failed:
        report = "\n".join(
            f"rank {result.rank}: exit {result.exit_code}{' (killed)' if result.killed else ''}, "
            f"{result.error}\n{result.stderr[-3000:]}"
            for result in failed
        )
        raise AssertionError(f"{len(failed)} rank(s) failed:\n{report}")
    return [result.value for result in results]


# ---------------------------------------------------------------------- workers of test_distributed


def agreement(distributed):
    """Every collective once, on values that differ by rank; returns what each rank saw."""
    rank, world_size = distributed.rank, distributed.world_size
    seen = {
        "world": (distributed.rank, distributed.world_size, distributed.local_rank, distributed.local_world_size),
        "device": str(distributed.device),
        "is_main": distributed.is_main,
        "any_only_last": distributed.any_rank(rank == world_size - 1),
        "any_none": distributed.any_rank(False),
        "any_all": distributed.any_rank(True),
    }
    # Two dtypes (two coalesced collectives), a scalar, a matrix and an integer vector.
    loss_sum = torch.tensor(0.25 * (rank + 1), dtype=torch.float64)
    matrix = torch.arange(6, dtype=torch.float64).reshape(2, 3) * (rank + 1)
    counts = torch.tensor([rank, 10 * rank, 7], dtype=torch.int64)
    returned = distributed.sum_tensors([loss_sum, matrix, counts])
    seen["sum_returns_its_argument"] = returned[0] is loss_sum
    seen["sums"] = (loss_sum.item(), matrix.tolist(), counts.tolist())
    means = [torch.tensor([1.0, 2.0]) * (rank + 1), torch.tensor(float(rank))]
    distributed.mean_tensors(means)
    seen["means"] = [mean.tolist() for mean in means]
    seen["from_0"] = distributed.broadcast_object({"decision": "stop", "rank": rank} if rank == 0 else None)
    seen["from_last"] = distributed.broadcast_object(f"message of rank {rank}", source=world_size - 1)
    distributed.barrier()
    # Each rank marks the samples of its evaluation shard; the sum counts how often each was seen.
    for count in (0, 1, 5, 11):
        marks = torch.zeros(count, dtype=torch.int64)
        marks[list(share_of(count, rank, world_size))] += 1
        distributed.sum_tensors([marks])
        seen[f"coverage_{count}"] = marks.tolist()
    return seen


def printing(distributed):
    """Print to stdout and stderr inside ``quiet_unless_main``, and once outside it; returns where it ran."""
    with distributed.quiet_unless_main():
        print(f"report of rank {distributed.rank}", flush=True)
        print(f"error of rank {distributed.rank}", file=sys.stderr, flush=True)
    print(f"after, rank {distributed.rank}", flush=True)
    return os.getcwd(), os.environ.get("DISTRIBUTED_TEST_MARK")


def exit_before_collective(distributed):
    """The last rank dies (as if killed) while the others agree on a decision."""
    if distributed.rank == distributed.world_size - 1:
        os._exit(9)
    try:
        distributed.any_rank(False)
    except RankLost as error:
        return str(error)
    return None


def silent_rank(distributed, flag_path):
    """The last rank stays alive but never joins the collective; the others must time out.

    The silent rank waits until rank 0 has written ``flag_path`` (after its collective failed),
    so rank 0 can only have failed by the timeout, not because the silent rank's connections closed.
    """
    flag = Path(flag_path)
    if distributed.rank == distributed.world_size - 1:
        while not flag.exists():
            time.sleep(0.05)
        os._exit(0)
    try:
        distributed.sum_tensors([torch.ones(3)])
    except RankLost as error:
        return str(error)
    finally:
        if distributed.rank == 0:
            flag.write_text("done")
    return None


# ---------------------------------------------------------------------- workers of test_distributed_runs


def main_in_rank(_, argv):
    """``main.main(argv)`` in this rank, as ``torchrun main.py ARGV`` runs it; returns the exit status."""
    import main

    return main.main(argv)


def _main_with_replaced_method(argv, rank, method, replacement):
    """``main.main(argv)``, with ``Trainer.<method>`` replaced by ``replacement(original)`` on rank ``rank``."""
    import main
    from source.training import trainer

    if int(os.environ["RANK"]) == rank:
        setattr(trainer.Trainer, method, replacement(getattr(trainer.Trainer, method)))
    return main.main(argv)


def main_in_rank_dying(_, argv, rank_to_die, after_steps):
    """``main.main(argv)``, but rank ``rank_to_die`` dies without a word after ``after_steps`` steps."""

    def dying(train_step):
        def step(self, *arguments):
            if self.state.step == after_steps:
                os._exit(9)
            return train_step(self, *arguments)

        return step

    return _main_with_replaced_method(argv, rank_to_die, "_train_step", dying)


def main_in_rank_signalled(_, argv, rank_to_signal, after_steps):
    """``main.main(argv)``, but rank ``rank_to_signal`` gets SIGTERM after ``after_steps`` steps."""
    import signal

    def signalled(train_step):
        def step(self, *arguments):
            if self.state.step == after_steps:
                os.kill(os.getpid(), signal.SIGTERM)
            return train_step(self, *arguments)

        return step

    return _main_with_replaced_method(argv, rank_to_signal, "_train_step", signalled)


def main_in_rank_diverging(_, argv, rank_to_diverge, after_steps):
    """``main.main(argv)``, but the training loss of rank ``rank_to_diverge`` is infinite from ``after_steps`` on."""

    import dataclasses

    import main
    from source.optimizer.steppers import Stepper

    if int(os.environ["RANK"]) == rank_to_diverge:
        original, steps_done = Stepper.step, [0]

        def diverging(self, *arguments, **options):
            result = original(self, *arguments, **options)
            steps_done[0] += 1
            return dataclasses.replace(result, loss=result.loss * float("inf")) if steps_done[0] > after_steps else result

        Stepper.step = diverging
    return main.main(argv)


def main_in_rank_with_full_disk(_, argv, step):
    """``main.main(argv)``, but the disk is full when process 0 saves a checkpoint of ``step``."""
    import errno

    import main

    save = torch.save

    def save_on_a_full_disk(state, file, *arguments, **options):
        if isinstance(state, dict) and state.get("step") == step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(state, file, *arguments, **options)

    torch.save = save_on_a_full_disk
    return main.main(argv)
