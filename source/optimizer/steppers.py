"""One training step for any optimizer: the trainer's only view of optimizers and schedules.

Two kinds of optimizer take a batch differently. A line search (``LineSearch``) gets a
forward-only closure over the batch and does everything else itself; a plain ``torch.optim``
optimizer gets zero_grad, forward, backward and step, and its schedule steps once per training
step. ``stepper_kind`` tells them apart, once, here; the trainer calls ``Stepper.step`` and reads
what it reports, whatever the optimizer.
"""

import contextlib
import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from .lab_pal import MEAN_LOSS, make_batch_closure
from .line_search import LineSearch

__all__ = ["ClosureStepper", "GradientStepper", "Stepper", "StepResult", "stepper_kind"]


@dataclass(frozen=True)
class StepResult:
    """What one training step gives the trainer: the batch's mean loss and the model's outputs
    (detached, on the device), and the optimizer's numbers (``Stepper.values``) when asked for."""

    loss: torch.Tensor
    outputs: torch.Tensor
    values: dict | None


class Stepper:
    """Performs training steps of ``optimizer`` (and its ``schedule``, None for none) on ``network``.

    ``batch_size`` is the inference batch size, reported as the training batch size by optimizers
    that have no other; ``batches`` the training pipeline the batches come from and ``device``
    theirs; ``guard`` a context manager factory that names a failing collective ("taking a step").
    Subclasses declare what the optimizer supports.
    """

    #: Whether a learning-rate schedule may drive the optimizer.
    follows_schedule: ClassVar[bool]
    #: Whether, in several processes, the network is wrapped to average gradients (DDP).
    averages_gradients_through_network: ClassVar[bool]
    #: What to try when the run diverges, for the run's message.
    divergence_advice: ClassVar[str]

    def __init__(self, optimizer, schedule, network, loss_function, *, batch_size, batches=None, device=None,
                 guard=None):
        self.optimizer = optimizer
        self.schedule = schedule
        self.network = network
        self.loss_function = loss_function
        self.batch_size = batch_size
        self.batches = batches
        self.device = device
        self.guard = guard or (lambda activity: contextlib.nullcontext())

    @classmethod
    def supports_compiled_model(cls, optimizer) -> bool:
        """Whether ``optimizer`` may train a ``torch.compile``-d network."""
        return True

    def step(self, inputs, targets, key, *, report_as_step=None) -> StepResult:
        """One training step on the batch. With ``report_as_step``, the number of steps done once this
        one is, the result holds the optimizer's numbers, read before the schedule moves the learning
        rate on for the next step."""
        loss, outputs = self._optimize(inputs, targets, key)
        values = self.values(report_as_step) if report_as_step is not None else None
        if self.schedule is not None:
            self.schedule.step()
        return StepResult(loss, outputs, values)

    def values(self, steps_done) -> dict:
        """The optimizer's numbers after ``steps_done`` steps: learning rate, training batch size,
        forward and backward passes, …"""
        raise NotImplementedError

    def take_events(self) -> list[dict]:
        """The optimizer's events since the last call (measurements, failures); never waits for the device."""
        return []

    @property
    def holds_partial_sums(self) -> bool:
        """Whether the optimizer holds sums of a batch only this process has seen: no checkpoint now."""
        return False

    def state_dict(self) -> dict:
        """The optimizer's and the schedule's states, by checkpoint key."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
        }

    def load_state_dict(self, state) -> None:
        """Continue from ``state_dict``'s states."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])

    def _optimize(self, inputs, targets, key):
        raise NotImplementedError


class GradientStepper(Stepper):
    """A ``torch.optim`` optimizer: zero_grad, forward, backward, step; one pass each per step."""

    follows_schedule = True
    averages_gradients_through_network = True
    divergence_advice = (
        "lower the learning rate (optimizer.arguments.lr), add a warm-up schedule, "
        "or check the data for non-finite values"
    )

    def _optimize(self, inputs, targets, key):
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self.network(inputs)
        loss = self.loss_function(outputs, targets)
        with self.guard("taking a step"):
            loss.backward()
        self.optimizer.step()
        return loss.detach(), outputs.detach()

    def values(self, steps_done):
        return {
            "learning_rate": float(self.optimizer.param_groups[0]["lr"]),
            "training_batch_size": self.batch_size,
            "forward_passes": steps_done,
            "backward_passes": steps_done,
        }


class ClosureStepper(Stepper):
    """A line search: ``step(closure)`` with a forward-only closure over the batch, which names the
    batch by its pipeline key (``batches``) so that a replayed batch is loaded again, not kept."""

    follows_schedule = False
    # Line searches reduce across the process group themselves.
    averages_gradients_through_network = False
    divergence_advice = (
        "make the optimizer's steps smaller (optimizer.arguments, e.g. step_adaptation for lab_pal) "
        "or check the data for non-finite values"
    )

    @classmethod
    def supports_compiled_model(cls, optimizer):
        return optimizer.supports_compiled_model

    def _optimize(self, inputs, targets, key):
        reduction = self.optimizer.closure_loss
        # The loss reduction the line search asks for: the batch's mean, or one loss per sample.
        loss_function = (
            self.loss_function if reduction == MEAN_LOSS else functools.partial(self.loss_function, reduction=reduction)
        )
        closure = make_batch_closure(
            self.network, loss_function, inputs, targets, self.device, batches=self.batches, key=key
        )
        with self.guard("taking a step"):
            loss = self.optimizer.step(closure)
        return loss, closure.outputs

    def values(self, steps_done):
        # A learning rate of 0 before the search has chosen one; the inference batch size unless the
        # method trains on larger batches, as LABPAL does.
        return {"learning_rate": 0.0, "training_batch_size": self.batch_size, **self.optimizer.log_values()}

    def take_events(self):
        return self.optimizer.take_events()

    @property
    def holds_partial_sums(self):
        return self.optimizer.holds_partial_sums


def stepper_kind(optimizer) -> type[Stepper]:
    """The stepper that trains with ``optimizer``: closures for a line search, gradients otherwise."""
    return ClosureStepper if isinstance(optimizer, LineSearch) else GradientStepper
