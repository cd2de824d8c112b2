"""What the line searches share: one parameter group, model buffers, events, argument checks.

LABPAL, PAL, SLS, GOLS-I and PLS each search one line through all parameters at once. The
base class holds the scaffolding that follows from that; the plain functions are the numeric
and validation helpers they all use. Everything here imports only torch, so the baselines
outside this package can build on it as they build on ``make_batch_closure``.
"""

import math
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch.optim import Optimizer

__all__ = [
    "LineSearchBase",
    "global_dot",
    "global_norm",
    "is_finite_number",
    "log_values_known",
    "require",
    "require_integer",
]


class LineSearchBase(Optimizer):
    """A ``torch.optim.Optimizer`` that searches one line through all its parameters.

    It provides, for the subclasses:

    - exactly one parameter group (:meth:`add_param_group` refuses a second, with a ValueError);
    - the check that all parameters share what ``_parameters_share`` names (by default device
      and dtype, since norms, dot products and fused updates run over all of them together);
    - ``self._buffers``, the model buffers passed as ``buffers`` (BatchNorm running
      statistics), with :meth:`_save_buffers` / :meth:`_restore_buffers` to undo what a
      forward pass away from the iterate did to them;
    - the event list behind :meth:`take_events`, filled by :meth:`_report_measurement` and
      :meth:`_report_failure`;
    - :meth:`_loss_with_gradient` (one forward and backward pass, counted), :meth:`_params`
      and :meth:`_state_tensor` (a zero-initialised tensor in ``self.state``).
    """

    #: What all parameters must have in common, as ``torch.Tensor`` attribute names.
    _parameters_share: ClassVar[tuple[str, ...]] = ("device", "dtype")

    #: Whether the closure may call a ``torch.compile``-d model (not where per-sample gradients are taken).
    supports_compiled_model: ClassVar[bool] = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        defaults: dict,
        buffers: Iterable[torch.Tensor] | None = None,
    ):
        super().__init__(params, defaults)
        shared = self._parameters_share
        kinds = {", ".join(str(getattr(p, attribute)) for attribute in shared) for p in self._params()}
        if len(kinds) > 1:
            raise ValueError(
                f"Invalid parameters: they span {sorted(kinds)}; {type(self).__name__} moves all parameters "
                f"along one line as one vector, so move them to one {' and '.join(shared)} first"
            )
        self._buffers = list(buffers) if buffers is not None else []
        self._events = []

    def add_param_group(self, param_group: dict) -> None:
        """Add the single parameter group; the line runs through all parameters together."""
        if self.param_groups:
            raise ValueError(
                f"Invalid parameter groups: {type(self).__name__} searches one line through all parameters, "
                "so it takes exactly one parameter group; pass all parameters in one group"
            )
        super().add_param_group(param_group)

    @property
    def holds_partial_sums(self) -> bool:
        """Whether the state holds sums of a batch not finished yet, which only this process has seen."""
        return False

    def take_events(self) -> list[dict]:
        """The events reported since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def _report_measurement(self, learning_rate: float, step_size: float, **details) -> None:
        self._events.append({"event": "measurement", "learning_rate": learning_rate, "step_size": step_size,
                             **details})

    def _report_failure(self, reason: str, **details) -> None:
        self._events.append({"event": "failure", "reason": reason, **details})

    def _require_closure(self, closure) -> None:
        if closure is None:
            name = type(self).__name__
            raise ValueError(f"Invalid closure: None; {name}.step needs a closure (see make_batch_closure)")

    def _loss_with_gradient(self, closure, counters: dict) -> torch.Tensor:
        """The closure's loss (detached) with its gradient in ``.grad``; counts the passes in ``counters``."""
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self._closure_loss(closure)
            if loss.dim() != 0:
                raise ValueError(
                    f"Invalid closure: it returned a loss of shape {tuple(loss.shape)}; {type(self).__name__} "
                    "needs the batch's mean loss, a 0-dim tensor"
                )
            loss.backward()
        counters["forward_passes"] += 1
        counters["backward_passes"] += 1
        return loss.detach()

    def _closure_loss(self, closure) -> torch.Tensor:
        """The closure's loss, before its gradient is taken; a subclass checks here how the closure behaved."""
        return closure()

    def _save_buffers(self) -> list[torch.Tensor]:
        return [buffer.clone() for buffer in self._buffers]

    def _restore_buffers(self, saved: list[torch.Tensor]) -> None:
        for buffer, value in zip(self._buffers, saved):
            buffer.copy_(value)

    def _params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    def _state_tensor(self, param: torch.Tensor, name: str) -> torch.Tensor:
        state = self.state[param]
        if name not in state:
            state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state[name]


def log_values_known(values: dict) -> dict[str, float]:
    """``values`` as floats, leaving out those not known yet (None): a log never holds NaN."""
    return {name: float(value) for name, value in values.items() if value is not None}


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The Euclidean norm of all ``tensors`` as one vector, a 0-dim tensor."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def global_dot(first: list[torch.Tensor], second: list[torch.Tensor]) -> torch.Tensor:
    """The dot product of two lists of tensors, each list taken as one vector, a 0-dim tensor."""
    return torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(first, second)]).sum()


def is_finite_number(value) -> bool:
    """Whether ``value`` is a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require(condition: bool, name: str, value, valid: str) -> None:
    """Raise ``ValueError("Invalid name: value; it must be valid")`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(f"Invalid {name}: {value!r}; it must be {valid}")


def require_integer(value, name: str, minimum: int) -> None:
    """Require an int (not a bool) of at least ``minimum``."""
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, name, value,
            f"an integer >= {minimum}")
