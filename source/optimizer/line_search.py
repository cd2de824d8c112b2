"""The one interface between the trainer and the line searches (LABPAL, PAL, SLS, GOLS-I, PLS).

A line search is any ``torch.optim.Optimizer`` that has the three members of ``LineSearch``;
nothing needs to inherit from it. The trainer, the schedules and the registry know line searches
only through it, so a new one touches its own file and the registry and nothing else.

The line searches here build on ``LineSearchBase`` and its helpers, imported from this module;
they live in the ``lab_pal`` package because LABPAL, installable on its own, extends them too.
"""

from typing import ClassVar, Protocol, runtime_checkable

import torch

from .lab_pal import MEAN_LOSS, SAMPLE_LOSSES
from .lab_pal.line_search_base import (
    LineSearchBase,
    global_dot,
    global_norm,
    is_finite_number,
    log_values_known,
    require,
    require_integer,
)

__all__ = [
    "MEAN_LOSS",
    "SAMPLE_LOSSES",
    "LineSearch",
    "LineSearchBase",
    "global_dot",
    "global_norm",
    "is_finite_number",
    "log_values_known",
    "require",
    "require_integer",
]


@runtime_checkable
class LineSearch(Protocol):
    """An optimizer that evaluates its batches itself through closures and chooses its own steps.

    Taking a batch: the trainer calls ``step(closure)`` once per training step with a closure
    made by ``lab_pal.make_batch_closure`` over that step's batch, built with the loss reduction
    that ``closure_loss`` names (``MEAN_LOSS`` or ``SAMPLE_LOSSES``). The closure evaluates the
    batch forward only and may be called again, at other parameters, with the same result for the
    same parameters; the line search calls ``backward`` and ``zero_grad`` itself. ``step`` returns
    the mean loss of the batch at the parameters it was given, detached; the trainer reads the
    model's training outputs from ``closure.outputs``.

    Reporting: ``log_values()`` is read at log intervals only (it may wait for the device) and
    names at least ``learning_rate`` (the step along the raw gradient per unit of gradient, the
    one number comparable across optimizers), ``forward_passes`` and ``backward_passes`` (totals
    since the start, kept in ``state_dict``); ``step_size`` and ``training_batch_size`` where the
    method has them. ``take_events()`` returns what happened since its last call, such as
    measurements and failed searches, as dicts with an ``"event"`` name, plain Python values only;
    it is called after every step, so it must not wait for the device. Two event names mean
    something to the runner: ``"measurement"`` (a newly chosen learning rate: keys
    ``learning_rate``, and ``step_size`` where the method has one), which plots mark on the
    learning-rate curve, and ``"failure"`` (a search that gave no usable step: key ``reason``, a
    short sentence), which the run's log prints.

    Capabilities: ``supports_compiled_model`` says whether the closure may call a
    ``torch.compile``-d model; ``holds_partial_sums`` whether the state now holds sums of a batch
    that only this process has seen (then a checkpoint would not resume the other processes).
    A line search that takes a ``process_group`` makes its own collectives in a run of several
    processes; one that does not is refused there.
    """

    closure_loss: ClassVar[str]
    supports_compiled_model: ClassVar[bool]

    @property
    def holds_partial_sums(self) -> bool: ...

    def step(self, closure) -> torch.Tensor: ...

    def log_values(self) -> dict[str, float]: ...

    def take_events(self) -> list[dict]: ...
