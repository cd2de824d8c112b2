"""Everything distributed goes through here: torchrun's environment, the process group, agreement.

``torchrun --nproc_per_node=N main.py ...`` starts N processes (ranks) and tells each who it is
in environment variables. ``from_environment`` reads them and joins the process group (NCCL on
GPUs, gloo on CPUs); without them it returns the one-process context and starts nothing, so the
code that uses a ``Distributed`` reads the same either way: each collective of a one-process
context returns at once.

Training keeps ``training.batch_size`` the global batch b: every rank takes its b/W samples of
each global batch, so the paper's b and the noise adaptation factor are the same on any number of
processes W. Evaluation splits a data set into W contiguous shares that cover every sample
exactly once, without padding duplicates, and sums the counts and losses across ranks (the data
pipelines cut the shares: source.data.sampling).

A process that dies or stops answering makes every collective of the others fail once the
process-group timeout (``[experiment] distributed_timeout_seconds``) has passed, or at once when
its connections close; the collectives here turn that into ``RankLost``, one line that says what
happened and how to continue, instead of a backend traceback or a hang. (With NCCL, PyTorch's
watchdog ends a process whose collective timed out before Python sees an error, by default; the
run still stops, with the watchdog's report.)
"""

import contextlib
import datetime
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from source.errors import UserError, WriteFailed

__all__ = [
    "Distributed",
    "RankLost",
    "TIMEOUT_KEY",
    "World",
    "ReportedElsewhere",
    "check_batch_size",
    "from_environment",
    "process_device",
    "read_world",
    "reported_once_per_node",
    "speaks_for_node",
]

TIMEOUT_KEY = "[experiment] distributed_timeout_seconds"
"""The configuration key of the timeout, as messages name it."""

_WORLD_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT")

# What gloo and NCCL say, in plain RuntimeErrors, when a peer closed its connection or a
# collective timed out. Backend errors of torch's own DistError types need no such match.
_LOST_CONTACT = re.compile(
    r"timed out|timeout|connection (reset|closed|refused)|by peer|pair closure|broken pipe|"
    r"communicator was aborted|remote process exited",
    re.IGNORECASE,
)
# gloo's messages start with the C++ source location, "[/path/to/pair.cc:545] ".
_SOURCE_LOCATION = re.compile(r"^\[[^\]]*\]\s*")


class RankLost(Exception):
    """Another process of a distributed run died or stopped answering: every process stops.

    Not a ``UserError``: the input is fine and the fix is to start again with ``--resume``, so
    ``main.py`` exits with its own status, ``EXIT_STATUS``, after printing the one-line message.
    """

    EXIT_STATUS = 4


class ReportedElsewhere(UserError):
    """A problem another process reports; this one stops silently with the same exit status.

    ``exit_status`` is 2 for a ``UserError`` and ``WriteFailed.EXIT_STATUS`` for a write that failed.
    """

    def __init__(self, message, exit_status=2):
        super().__init__(message)
        self.exit_status = exit_status


class World(NamedTuple):
    """Who this process is in a torchrun launch: its rank among all and among those on its node."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def read_world(environment: Mapping[str, str]) -> World | None:
    """The ``World`` that torchrun's variables in ``environment`` describe; None without torchrun.

    ``UserError`` when the variables are incomplete or contradict each other (a launch by hand
    that set some of them).
    """
    present = [name for name in _WORLD_VARIABLES if name in environment]
    if not present:
        return None
    missing = [name for name in _WORLD_VARIABLES + _RENDEZVOUS_VARIABLES if name not in environment]
    if missing:
        raise UserError(
            f"the environment sets {', '.join(present)} but not {', '.join(missing)}; "
            "start distributed runs with torchrun (python -m torch.distributed.run)"
        )
    values = {}
    for name in _WORLD_VARIABLES:
        text = environment[name].strip()
        if not text.isdigit():
            raise UserError(f"the environment variable {name}={environment[name]!r} is not a count; use torchrun")
        values[name] = int(text)
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"])
    if not (
        0 <= world.rank < world.world_size
        and 0 <= world.local_rank < world.local_world_size <= world.world_size
    ):
        raise UserError(
            f"the environment describes an impossible process: RANK={world.rank} WORLD_SIZE={world.world_size} "
            f"LOCAL_RANK={world.local_rank} LOCAL_WORLD_SIZE={world.local_world_size}; start with torchrun"
        )
    return world


def process_device(device_name: str, local_rank: int, local_world_size: int) -> torch.device:
    """The device of the process with ``local_rank`` of ``local_world_size`` on its node.

    "auto" is the GPU of the local rank when CUDA is available, else the CPU; "cuda" is the GPU
    of the local rank; "cuda:N" only for one process per node (NCCL refuses two ranks on one
    GPU). ``UserError`` when the node has fewer GPUs than processes. For a one-process run
    (``local_rank`` 0 of 1) it is the [experiment] device key's resolution.
    """
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"device {device_name} is not supported; use cpu, cuda or auto")
    if not torch.cuda.is_available():
        raise UserError(f"{device_name} asked for, but this machine has no CUDA device; use cpu or auto")
    gpus = torch.cuda.device_count()
    if device.index is not None:
        if local_world_size > 1:
            raise UserError(
                f"device {device_name} names one GPU for all {local_world_size} processes on this node; "
                "use device = cuda or auto, which give each process the GPU of its LOCAL_RANK"
            )
        if device.index >= gpus:
            raise UserError(f"{device_name} asked for, but this machine has {gpus} CUDA device(s)")
        return device
    if local_world_size > gpus:
        raise UserError(
            f"torchrun starts {local_world_size} processes on this node but it has {gpus} CUDA devices; "
            f"start torchrun with --nproc_per_node={gpus}"
        )
    return torch.device("cuda", local_rank)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run, and the collectives every rank calls together.

    ``rank`` counts all processes (0 is the main one, which alone writes files and prints),
    ``local_rank`` those on this node; ``device`` is where this process computes. With
    ``world_size`` 1 (``Distributed.single``) every collective returns at once without
    communicating. A collective that fails because another process died or stopped answering
    for ``timeout_seconds`` raises ``RankLost``.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    timeout_seconds: float = 0.0

    @classmethod
    def single(cls, device: torch.device | str) -> "Distributed":
        """The context of an ordinary run: one process, rank 0, on ``device``."""
        return cls(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device(device))

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes the run folder and prints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """Whether there are other processes to agree with."""
        return self.world_size > 1

    # ------------------------------------------------------------------ agreement and reductions

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on at least one rank (stop requests, divergence); all ranks call it."""
        if not self.is_distributed:
            return bool(flag)
        value = torch.tensor(int(bool(flag)), dtype=torch.int32, device=self.device)
        with self.guard("agreeing on a decision"):
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            return bool(value.item())

    def sum_tensors(self, tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Replace each tensor by its sum over all ranks, in place; returns ``tensors``.

        Tensors of one dtype travel in one collective, so a handful of metric sums cost one
        round trip. They must be on this process's device (the CPU for gloo, its GPU for NCCL).
        """
        if not self.is_distributed or not tensors:
            return tensors
        self._check_placement(tensors, "sum_tensors")
        groups = {}
        for tensor in tensors:
            groups.setdefault(tensor.dtype, []).append(tensor)
        with self.guard("summing across processes"):
            for group in groups.values():
                flat = torch.cat([tensor.reshape(-1) for tensor in group])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                offset = 0
                for tensor in group:
                    tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                    offset += tensor.numel()
        return tensors

    def mean_tensors(self, tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Replace each floating-point tensor by its mean over all ranks, in place; returns ``tensors``."""
        for tensor in tensors:
            if not tensor.is_floating_point():
                raise ValueError(f"Invalid tensor for mean_tensors: dtype {tensor.dtype}; a mean needs floating point")
        if not self.is_distributed:
            return tensors
        self.sum_tensors(tensors)
        for tensor in tensors:
            tensor.div_(self.world_size)
        return tensors

    def gather_objects(self, obj: object) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        objects = [None] * self.world_size
        with self.guard("collecting reports"):
            dist.all_gather_object(objects, obj)
        return objects

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor], source: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``source``'s (the initial weights of a model)."""
        if not self.is_distributed:
            return
        self._check_placement(tensors, "broadcast_tensors")
        with self.guard("receiving the initial weights"), torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor, src=source)

    def broadcast_object(self, obj: object, source: int = 0) -> object:
        """Rank ``source``'s ``obj`` (any picklable object), on every rank; the others pass anything."""
        if not 0 <= source < self.world_size:
            raise ValueError(f"Invalid source rank: {source}; there are {self.world_size} processes")
        if not self.is_distributed:
            return obj
        objects = [obj if self.rank == source else None]
        device = self.device if self.device.type == "cuda" else None
        with self.guard("receiving a decision"):
            dist.broadcast_object_list(objects, src=source, device=device)
        return objects[0]

    def barrier(self) -> None:
        """Wait until every rank has arrived here."""
        if not self.is_distributed:
            return
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        with self.guard("waiting for the other processes"):
            dist.barrier(device_ids=device_ids)

    def shutdown(self) -> None:
        """Leave the process group (if this process joined one); call it last, on every rank."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def on_main(self, work: Callable[[], object]) -> object:
        """``work()`` on rank 0 only (checks and writes of the run folder); its result on every rank.

        A ``UserError`` or ``WriteFailed`` it raises is raised on rank 0 and as ``ReportedElsewhere``
        on the others, so every process stops with the same exit status and the message is printed once.
        """
        if not self.is_distributed:
            return work()
        outcome = error = None
        if self.is_main:
            try:
                outcome = ("result", work())
            except UserError as raised:
                error, outcome = raised, ("error", (str(raised), 2))
            except WriteFailed as raised:
                error, outcome = raised, ("error", (str(raised), WriteFailed.EXIT_STATUS))
        kind, value = self.broadcast_object(outcome)
        if kind == "error":
            raise error if error is not None else ReportedElsewhere(*value)
        return value

    def together(self, work: Callable[[], object]) -> object:
        """``work()`` on every rank; if it raises ``UserError`` on any, every rank stops (no rank waits).

        The message is printed once: rank 0 raises its own error, or the first failing process's
        message naming that process; the others raise ``ReportedElsewhere``.
        """
        result = error = None
        try:
            result = work()
        except UserError as raised:
            error = raised
        if not self.is_distributed:
            if error is not None:
                raise error
            return result
        messages = self.gather_objects(None if error is None else str(error))
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if not failed:
            return result
        if not self.is_main:
            raise ReportedElsewhere(failed[0][1])
        if error is not None:
            raise error
        rank, message = failed[0]
        raise UserError(f"{message} (process {rank})")

    @contextlib.contextmanager
    def guard(self, activity: str) -> Iterator[None]:
        """Turn a collective's failure inside into ``RankLost`` that names ``activity`` ("taking a step").

        For collectives this module does not make itself: DistributedDataParallel's backward
        and an optimizer's reductions. Errors that are not about lost contact pass unchanged.
        """
        try:
            yield
        except RuntimeError as error:
            if not _lost_contact(error):
                raise
            raise RankLost(self._lost_message(activity, error)) from error

    def _lost_message(self, activity: str, error: BaseException) -> str:
        detail = _SOURCE_LOCATION.sub("", " ".join(str(error).split()))
        detail = detail.split(". ")[0][:100] or type(error).__name__
        return (
            f"process {self.rank} of {self.world_size} lost the others while {activity}: one of them stopped "
            f"or did not answer within {self.timeout_seconds:g} s ({TIMEOUT_KEY}); every process stops; "
            f"continue with --resume ({detail})"
        )

    def _check_placement(self, tensors: Sequence[torch.Tensor], name: str) -> None:
        for tensor in tensors:
            if tensor.device != self.device:
                raise ValueError(
                    f"Invalid tensor for {name}: it is on {tensor.device}, but this process communicates on "
                    f"{self.device}"
                )

    # ------------------------------------------------------------------ output

    @contextlib.contextmanager
    def quiet_unless_main(self) -> Iterator[None]:
        """Inside, only rank 0 prints to stdout; the others' stdout is discarded, their stderr kept.

        So a run prints one report however many processes it has, while an error of any rank
        still reaches the terminal.
        """
        if self.is_main:
            yield
            return
        with open(os.devnull, "w") as nowhere, contextlib.redirect_stdout(nowhere):
            yield


@contextlib.contextmanager
def reported_once_per_node(environment: Mapping[str, str] | None = None) -> Iterator[None]:
    """Inside, before the processes join, a ``UserError`` is printed by one process of each node.

    Every process of a node reads the same command line, files and environment, so each finds
    the same problem; local rank 0 raises it, the others ``ReportedElsewhere``: one line, not
    one per process (nodes keep their own logs). ``environment`` defaults to ``os.environ``.
    """
    try:
        yield
    except ReportedElsewhere:
        raise
    except UserError as error:
        if speaks_for_node(environment):
            raise
        raise ReportedElsewhere(str(error)) from None


def speaks_for_node(environment: Mapping[str, str] | None = None) -> bool:
    """Whether this process reports what every process of its node meets alike (a problem in the
    input, a signal torchrun sends to all): local rank 0, or a process outside torchrun."""
    environment = os.environ if environment is None else environment
    return environment.get("LOCAL_RANK", "0").strip() in ("", "0")


def _lost_contact(error: BaseException) -> bool:
    """Whether ``error`` says that another process died or stopped answering."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    return isinstance(error, dist.DistError) or bool(_LOST_CONTACT.search(str(error)))


def from_environment(
    device_name: str,
    timeout_seconds: float,
    environment: Mapping[str, str] | None = None,
) -> Distributed:
    """This process's ``Distributed`` context, joining torchrun's process group when there is one.

    ``environment`` defaults to ``os.environ``. Without torchrun's variables (or with a world of
    one process) nothing is initialised and the context is ``Distributed.single`` on the device
    ``device_name`` resolves to. Otherwise the device is chosen by ``process_device`` and the
    process joins the group with NCCL (GPU) or gloo (CPU), waiting at most ``timeout_seconds`` for
    the others, here and in every later collective. ``UserError`` for an impossible launch
    (see ``read_world`` and ``process_device``); ``RankLost`` when the others do not join in time.
    """
    if not timeout_seconds > 0:
        raise ValueError(f"Invalid timeout_seconds: {timeout_seconds!r}; it must be > 0")
    world = read_world(os.environ if environment is None else environment)
    if world is None or world.world_size == 1:
        local_rank = world.local_rank if world is not None else 0
        return Distributed.single(process_device(device_name, local_rank, 1))
    device = process_device(device_name, world.local_rank, world.local_world_size)
    distributed = Distributed(
        rank=world.rank,
        world_size=world.world_size,
        local_rank=world.local_rank,
        local_world_size=world.local_world_size,
        device=device,
        timeout_seconds=timeout_seconds,
    )
    options = {}
    if device.type == "cuda":
        # Before NCCL starts, so that its communicator and every collective use this GPU.
        torch.cuda.set_device(device)
        options["device_id"] = device
    try:
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method="env://",
            rank=world.rank,
            world_size=world.world_size,
            timeout=datetime.timedelta(seconds=timeout_seconds),
            **options,
        )
    except RuntimeError as error:
        if not _lost_contact(error):
            raise
        if re.search("timed out|timeout", str(error), re.IGNORECASE):
            raise RankLost(distributed._lost_message("waiting for all processes to start", error)) from error
        # Not a missing process but a rendezvous that cannot work, e.g. MASTER_PORT taken.
        detail = _SOURCE_LOCATION.sub("", " ".join(str(error).split()))[:120]
        raise UserError(f"process {world.rank} of {world.world_size} cannot join the run: {detail}") from None
    return distributed


def check_batch_size(batch_size: int, world_size: int) -> int:
    """Each of ``world_size`` processes' share of the global ``batch_size``; ``UserError`` unless it divides."""
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size}; it must be >= 1")
    if batch_size % world_size:
        lower = batch_size - batch_size % world_size
        multiples = f"{lower} or {lower + world_size}" if lower else f"{world_size}"
        raise UserError(
            f"training.batch_size {batch_size} is not divisible by the {world_size} processes; every process "
            f"takes an equal share of each batch, so use a multiple of {world_size} (e.g. {multiples}) "
            "or start torchrun with another --nproc_per_node"
        )
    return batch_size // world_size
