"""Arithmetic of the research code that ``LabPal(research_code_steps=True)`` repeats to reproduce its steps.

The research code's parabola fit divides tiny loss differences by h twice, so its step moves by
about 1e-7 (relative) when one of its mean losses moves by one rounding unit: reproducing its
steps means reproducing the order in which it adds and scales, not only its formulas.
"""

from collections.abc import Sequence

import torch

from .parabola import Parabola

__all__ = ["fit_parabola_like_research_code", "line_increments", "numpy_mean", "running_mean"]

#: numpy's unrolled summation block, below which it adds eight partial sums.
_NUMPY_BLOCK = 128


def fit_parabola_like_research_code(
    positions: tuple[float, float, float], losses: tuple[float, float, float]
) -> Parabola:
    """The research code's fit: two nested first-order ``numpy.gradient`` calls, read at the first point.

    Its slope is the forward difference ``(y1 - y0) / (x1 - x0)``; its curvature is the forward
    difference of that and the central non-uniform derivative at the second point, which is half
    the true curvature for a parabola sampled at (0, h, μ) with h ≪ μ, so its vertex lies twice as
    far, and off by about h. Kept to reproduce the research code's steps exactly.
    """
    (x0, x1, x2), (y0, y1, y2) = positions, losses
    if len({x0, x1, x2}) != 3:
        raise ValueError(f"Invalid positions: {positions}; a parabola needs three distinct positions")
    left, right = x1 - x0, x2 - x1
    slope_first = (y1 - y0) / left
    slope_second = (
        -right / (left * (left + right)) * y0
        + (right - left) / (left * right) * y1
        + left / (right * (left + right)) * y2
    )
    # The research code halves this curvature estimate once more and steps to -slope / (2 · half).
    curvature = (slope_second - slope_first) / left
    return Parabola(curvature=curvature, slope=slope_first, offset=y0)


def numpy_mean(values: Sequence[float]) -> float:
    """``numpy.nanmean(values)`` for finite floats, bit for bit: numpy's pairwise sum over the count."""
    return _pairwise_sum(list(values)) / len(values)


def _pairwise_sum(values: list[float]) -> float:
    count = len(values)
    if count < 8:
        total = 0.0
        for value in values:
            total += value
        return total
    if count <= _NUMPY_BLOCK:
        partial = values[:8]
        index = 8
        while index < count - count % 8:
            for lane in range(8):
                partial[lane] += values[index + lane]
            index += 8
        total = ((partial[0] + partial[1]) + (partial[2] + partial[3])) + (
            (partial[4] + partial[5]) + (partial[6] + partial[7])
        )
        for value in values[index:]:
            total += value
        return total
    half = count // 2
    half -= half % 8
    return _pairwise_sum(values[:half]) + _pairwise_sum(values[half:])


def running_mean(mean: torch.Tensor | None, value: torch.Tensor, count: int) -> torch.Tensor:
    """The research code's running mean of the losses at the line origin, ``mean·(c-1)/c + value/c``."""
    previous = torch.zeros((), device=value.device) if mean is None else mean
    return previous * (count - 1) / count + 1 / count * value


def line_increments(derivative_step: float, sample_step: float, step: float | None = None) -> list[float]:
    """The research code's moves along the line: h, then μ - h, then ``step`` - μ (each float32, μ being float32)."""
    sample = torch.tensor(sample_step, dtype=torch.float32)
    increments = [derivative_step, (-derivative_step + sample).item()]
    if step is not None:
        increments.append((-sample + step).item())
    return increments
