"""The research code's steps, which ``LabPal(research_code_steps=True)`` repeats.

The research code's parabola fit divides tiny loss differences by h twice, so its step moves by
about 1e-7 (relative) when one of its mean losses moves by one rounding unit: reproducing its
steps means reproducing the order in which it adds and scales, not only its formulas. Its
behaviours are listed in the README; ``ResearchCodeSteps`` overrides the hooks of
``LabPalSteps`` where they differ, with the arithmetic functions below.
"""

from collections.abc import Sequence

import torch

from .parabola import Parabola
from .progress import TRAINING
from .steps import LabPalSteps

__all__ = [
    "ResearchCodeSteps",
    "fit_parabola_like_research_code",
    "line_increments",
    "numpy_mean",
    "research_code_norm",
    "running_mean",
    "running_mean_",
]


class ResearchCodeSteps(LabPalSteps):
    """LABPAL's steps in the research code's arithmetic, timing and fallbacks.

    1. Timing: a schedule switch applies only exactly at its step and at an update boundary
       (otherwise it and all later ones are skipped) and starts a measurement even if k stays;
       measurements start at step 0, when the update count reaches ``untrustworthy_updates + 2``,
       and ``measurement_interval * k`` steps after the last one ended, discarding a partly
       gathered training batch.
    2. Gradients and origin losses are running means; norms add one dot product per tensor.
    3. The parabola fit is :func:`fit_parabola_like_research_code`; the step is clipped in float32
       by a cap that every clipped measurement multiplies by α; averages are numpy's means over
       measurements from ``untrustworthy_updates + 2`` updates on.
    4. Moves along the line are increments (h, μ - h, step - μ), rounded as the research code rounds.
    5. A failed fit moves by the previous step along the new direction; a refused direction
       measures again at once.
    6. With momentum and k = 1 an update refreshes the buffer but steps along the raw gradient.
       Non-finite updates are skipped, which the research code does not do.

    Args: as :class:`LabPalSteps`.
    """

    averaging_delay = 2

    def plan(self) -> None:
        progress = self.progress
        group = self.group
        schedule = self.optimizer.scaled_batch_size_schedule
        position = progress.schedule_position
        if position < len(schedule) and schedule[position][0] == progress.steps and progress.at_update_boundary():
            progress.multiplier = schedule[position][1]
            progress.schedule_position = position + 1
            self.restart_measurement()
            return
        if progress.phase != TRAINING:
            return
        steps_since = progress.steps - progress.last_measurement_step
        if (
            steps_since // progress.multiplier >= group["measurement_interval"]
            or progress.steps == 0
            or progress.updates == group["untrustworthy_updates"] + 2
        ):
            self.restart_measurement()

    def training_step(self, params, gradients, loss) -> None:
        progress = self.progress
        group = self.group
        multiplier, momentum = progress.multiplier, group["momentum"]
        count = progress.training_batches + 1
        progress.training_loss_sum = loss.clone() if count == 1 else progress.training_loss_sum + loss
        if multiplier > 1:
            means = [self.state_tensor(p, "gradient_sum") for p in params]
            running_mean_(means, gradients, count)
            gradients = means
        progress.training_batches = count % multiplier
        if count < multiplier:
            return
        self.add_weight_decay(params, gradients)
        found_non_finite = ~torch.isfinite(progress.training_loss_sum)
        for gradient in gradients:
            found_non_finite |= ~torch.isfinite(gradient).all()
        direction = gradients
        if momentum > 0:
            buffers = [self.state_tensor(p, "momentum_buffer") for p in params]
            candidate = torch._foreach_add(torch._foreach_mul(buffers, momentum), gradients)
            for buffer, value in zip(buffers, candidate):
                buffer.copy_(torch.where(found_non_finite, buffer, value))
            direction = gradients if multiplier == 1 else buffers
            norm_of = buffers
        else:
            norm_of = gradients
        if group["mode"] == "NSGD":
            norm = research_code_norm(norm_of)
            norm = torch.where(norm == 0, torch.full_like(norm, group["min_step"]), norm)
            step = progress.step_size
            updates = [torch.mul(d.neg(), step) / norm for d in direction]
            progress.effective_learning_rate = torch.where(
                found_non_finite, progress.effective_learning_rate, step / norm
            )
        else:
            updates = [torch.mul(d.neg(), progress.learning_rate) for d in direction]
        for p, update in zip(params, updates):
            p.add_(torch.where(found_non_finite, torch.zeros_like(update), update))
        progress.count_skipped(found_non_finite.to(torch.float32))
        progress.updates += 1

    def accumulate_direction_batch(self, params, loss, closure) -> None:
        with_gradient = [p for p in params if p.grad is not None]
        if self.progress.measurement_batches == 0:
            for p in params:
                self.state_tensor(p, "direction").zero_()
        means = [self.state_tensor(p, "direction") for p in with_gradient]
        running_mean_(means, [p.grad for p in with_gradient], self.progress.measurement_batches + 1)
        self.add_origin_loss(loss)
        self.pending_closures.append(closure)

    def add_origin_loss(self, loss) -> None:
        super().add_origin_loss(loss)
        progress = self.progress
        count = progress.measurement_batches + 1
        progress.research_origin_loss = running_mean(progress.research_origin_loss, loss.detach(), count)

    def mean_direction_(self, directions) -> None:
        pass  # already the running mean

    def norm(self, tensors):
        return research_code_norm(tensors)

    def line_points(self) -> tuple:
        increments = line_increments(self.group["derivative_step"], self.group["sample_step"])
        return ((1, increments[:1]), (2, increments))

    def record_line_loss(self, index, loss) -> None:
        super().record_line_loss(index, loss)
        self.progress.research_line_losses[index - 1].append(loss.item())

    def mean_line_losses(self) -> list[float]:
        progress = self.progress
        return [progress.research_origin_loss.item(), *map(numpy_mean, progress.research_line_losses)]

    def fit_parabola(self, positions, losses) -> Parabola:
        return fit_parabola_like_research_code(positions, losses)

    def measured_step(self, minimum_position, direction_norm, params) -> tuple[float, float]:
        """The step and learning rate in float32; a clip sets the step to the cap and then scales the cap by α."""
        group = self.group
        progress = self.progress
        cap = torch.tensor(progress.research_step_cap, dtype=torch.float32)
        adaptation = torch.tensor(group["step_adaptation"], dtype=torch.float32)
        if minimum_position > cap:
            cap *= adaptation
            progress.research_step_cap = cap.item()
            step = cap.item()
        else:
            step = (minimum_position * adaptation).item()
        step = max(step, group["min_step"])
        norm = torch.tensor(direction_norm, dtype=params[0].dtype)
        learning_rate = max((step / norm).item(), group["min_step"])
        return step, learning_rate

    def average(self, values) -> float:
        return numpy_mean(values)

    def move_after_measurement(self, params, step, learning_rate) -> None:
        # The research code moves by the step size s̄ along d/‖d‖ in both modes.
        self.move_along_direction(params, line_increments(self.group["derivative_step"], self.group["sample_step"], step))

    def move_along_direction(self, params, increments: list[float]) -> None:
        """From the origin, one in-place move ``θ += (increment · -d) / ‖d‖`` per increment."""
        origins = [self.state_tensor(p, "line_origin") for p in params]
        directions = [self.state_tensor(p, "direction") for p in params]
        norm = self.progress.direction_norm
        torch._foreach_copy_(params, origins)
        for increment in increments:
            torch._foreach_add_(params, torch._foreach_div(torch._foreach_mul(directions, -increment), norm))

    def after_failed_measurement(self, params, direction_usable: bool) -> None:
        progress = self.progress
        group = self.group
        if progress.step_size is None or not direction_usable:
            self.restart_measurement()
            return
        self.move_along_direction(params, line_increments(group["derivative_step"], group["sample_step"],
                                                          progress.step_size))
        self.count_measurement_update()
        if group["mode"] == "NSGD":
            self.set_effective_learning_rate(params, progress.step_size / progress.direction_norm)
        self.end_measurement()

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


def running_mean_(means: list[torch.Tensor], values: list[torch.Tensor], count: int) -> None:
    """``mean ← mean·(c-1)/c + value/c`` in place, the research code's average of k gradients."""
    for mean, value in zip(means, values):
        mean.copy_(mean * (count - 1) / count + 1 / count * value)


def research_code_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The norm as the research code sums it: one dot product per tensor, added in order."""
    total = torch.dot(tensors[0].reshape(-1), tensors[0].reshape(-1))
    for tensor in tensors[1:]:
        total = total + torch.dot(tensor.reshape(-1), tensor.reshape(-1))
    return torch.sqrt(total)
