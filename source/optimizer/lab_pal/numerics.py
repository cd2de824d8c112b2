"""LABPAL's numerics as plain functions of tensors and numbers: direction, line, step, average, schedule.

In-place functions end in ``_`` and change only the tensors they are given, like the
functional cores of ``torch.optim``.
"""

import math
from collections.abc import Callable, Sequence

import torch

from .batch_schedule import multiplier_at
from .line_search_base import global_dot, global_norm
from .parabola import Parabola

__all__ = [
    "add_weight_decay_",
    "clipped_step",
    "direction_failure",
    "directional_derivative",
    "line_failure",
    "mean",
    "momentum_direction",
    "next_measurement_update",
    "penalised_line_losses",
    "scheduled_multiplier_change",
    "weight_decay_along_line",
    "windowed_average",
]


def add_weight_decay_(gradients: list[torch.Tensor], params: list[torch.Tensor], decays: list[float]) -> None:
    """``gradient += decay · θ`` in place, one fused add per distinct non-zero decay."""
    by_decay = {}
    for param, gradient, decay in zip(params, gradients, decays):
        if decay != 0:
            by_decay.setdefault(decay, ([], []))
            by_decay[decay][0].append(gradient)
            by_decay[decay][1].append(param)
    for decay, (decayed_gradients, decayed_params) in by_decay.items():
        torch._foreach_add_(decayed_gradients, decayed_params, alpha=decay)


def momentum_direction(buffers: list[torch.Tensor], gradients: list[torch.Tensor], momentum: float) -> list[torch.Tensor]:
    """``momentum · buffer + gradient`` (new tensors); the gradients themselves without buffers."""
    if not buffers:
        return gradients
    return torch._foreach_add(torch._foreach_mul(buffers, momentum), gradients)


def directional_derivative(
    gradient: list[torch.Tensor], direction: list[torch.Tensor], safe_norm: torch.Tensor
) -> torch.Tensor:
    """The slope of the loss along ``-direction/‖direction‖``: ``-g·d / ‖d‖``, a 0-dim tensor."""
    return -global_dot(gradient, direction) / safe_norm


def weight_decay_along_line(
    decayed: Sequence[tuple[float, list[torch.Tensor], list[torch.Tensor]]], safe_norm: torch.Tensor
) -> torch.Tensor:
    """The L2 term along the line, ``penalty(t) = A - B t + C t²``, as the tensor (A, B, C).

    ``decayed`` holds (λ, parameters θ_g, directions d_g) per group g with λ ≠ 0:
    ``A = Σ λ/2 ‖θ_g‖²``, ``B = Σ λ θ_g·d_g/‖d‖`` and ``C = Σ λ/2 ‖d_g‖²/‖d‖²``.
    """
    penalty = torch.zeros(3, dtype=safe_norm.dtype, device=safe_norm.device)
    for decay, params, directions in decayed:
        penalty += torch.stack([
            decay / 2 * global_norm(params) ** 2,
            decay * global_dot(params, directions) / safe_norm,
            decay / 2 * (global_norm(directions) / safe_norm) ** 2,
        ])
    return penalty


def direction_failure(norm: float, derivative: float, min_norm: float, max_norm: float) -> str | None:
    """Why a line direction of this norm and directional derivative is unusable; None if it is usable."""
    if not math.isfinite(norm):
        return f"direction norm is {norm}"
    if not min_norm <= norm <= max_norm:
        return f"direction norm {norm:.3g} outside [{min_norm}, {max_norm}]"
    if not derivative < 0:
        return f"directional derivative {derivative:.3g} is not negative"
    return None


def penalised_line_losses(
    mean_losses: Sequence[float], positions: Sequence[float], penalty: Sequence[float]
) -> list[float]:
    """The mean line losses plus the weight-decay term ``A - B t + C t²`` at each position t."""
    offset, slope, curvature = penalty
    return [loss + offset - slope * x + curvature * x * x for loss, x in zip(mean_losses, positions)]


def line_failure(losses: Sequence[float], parabola: Parabola) -> str | None:
    """Why the fitted line gives no step (non-finite, not convex, not descending); None if it gives one."""
    if not all(map(math.isfinite, losses)):
        return "non-finite line loss ({}, {}, {})".format(*losses)
    if not parabola.curvature > 0:
        return f"line is not convex (curvature {parabola.curvature:.3g})"
    if not parabola.slope < 0:
        return f"loss does not decrease along the line (slope {parabola.slope:.3g})"
    return None


def clipped_step(minimum_position: float, max_step: float, step_adaptation: float, min_step: float) -> float:
    """The step along d/‖d‖: ``max(α · min(s*, s_max), ε)``."""
    return max(min(minimum_position, max_step) * step_adaptation, min_step)


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean of ``values``."""
    return sum(values) / len(values)


def windowed_average(
    history: list[float], value: float, window: int, average: Callable[[Sequence[float]], float] = mean
) -> tuple[list[float], float]:
    """The last ``window`` values after adding ``value``, and their ``average``."""
    history = (history + [value])[-window:]
    return history, average(history)


def next_measurement_update(updates: int, measurement_interval: int, untrustworthy_updates: int) -> int:
    """The update count at which the next measurement starts: an interval on, and at the end of the untrustworthy ones."""
    next_update = updates + measurement_interval
    if updates < untrustworthy_updates:
        next_update = min(next_update, untrustworthy_updates)
    return next_update


def scheduled_multiplier_change(schedule: Sequence[tuple[int, int]], steps: int, multiplier: int) -> int | None:
    """The multiplier ``schedule`` prescribes at ``steps`` if it differs from ``multiplier``, else None."""
    scheduled = multiplier_at(schedule, steps)
    return scheduled if scheduled != multiplier else None
