"""What one LABPAL step does to the parameters: a training update or a part of a measurement.

``LabPalSteps`` holds the arithmetic of LABPAL itself; ``research_code.ResearchCodeSteps``
overrides its hooks to repeat the research code's. Neither holds state of its own: the counters
are the optimizer's ``progress`` and the tensors its ``state``, so saving the optimizer saves all.
"""

import torch
import torch.distributed as dist

from .closure import call_forward_only
from .line_search_base import global_norm
from .numerics import (
    add_weight_decay_,
    clipped_step,
    direction_failure,
    directional_derivative,
    line_failure,
    mean,
    momentum_direction,
    next_measurement_update,
    penalised_line_losses,
    scheduled_multiplier_change,
    weight_decay_along_line,
    windowed_average,
)
from .parabola import fit_parabola
from .progress import MEASURING, TRAINING

__all__ = ["LabPalSteps"]


class LabPalSteps:
    """LABPAL's training updates and measurements, for the optimizer that owns them.

    1. :meth:`plan`: at an update boundary, follow the batch-size schedule and start a measurement when due.
    2. :meth:`measure`: the first k batches give the direction (:meth:`set_direction`); every batch
       is evaluated on the line (:meth:`measure_on_line`); the last one fits the parabola, chooses,
       averages and takes the step (:meth:`finish_measurement`) or reports why not (:meth:`fail_measurement`).
    3. :meth:`train`: gather k batches, then one update (:meth:`update_parameters`), skipped on the
       device when a value is not finite.

    Args:
        optimizer: the ``LabPal`` whose parameters, ``progress`` and ``state`` the steps use.
        process_group: the group whose mean the steps follow, or None for one process.
        processes: the number of processes in ``process_group`` (1 without one).
    """

    #: Measurements count into the averaging window from ``untrustworthy_updates`` plus this.
    averaging_delay = 0

    def __init__(self, optimizer, process_group, processes: int):
        self.optimizer = optimizer
        self.process_group = process_group
        self.processes = processes
        # The closures of the measurement's direction batches, evaluated on the line once d is known.
        self.pending_closures = []

    @property
    def progress(self):
        return self.optimizer.progress

    @property
    def group(self) -> dict:
        return self.optimizer.param_groups[0]

    def state_tensor(self, param: torch.Tensor, name: str) -> torch.Tensor:
        return self.optimizer._state_tensor(param, name)

    def loss_with_gradient(self, closure) -> torch.Tensor:
        # The base class counts its passes by name in a dict: the progress record's attributes.
        return self.optimizer._loss_with_gradient(closure, vars(self.progress))

    # ------------------------------------------------------------------ planning

    def plan(self) -> None:
        """At an update boundary: switch k if the schedule says so, and start a measurement when due."""
        progress = self.progress
        if not progress.at_update_boundary():
            return
        change = scheduled_multiplier_change(self.optimizer.scaled_batch_size_schedule, progress.steps,
                                             progress.multiplier)
        if change is not None:
            progress.multiplier = change
            progress.phase = MEASURING
        elif progress.phase == TRAINING and progress.updates >= progress.next_measurement_update:
            progress.phase = MEASURING
        if progress.phase == MEASURING:
            progress.measurement_batches = 0

    # ------------------------------------------------------------------ training

    def train(self, closure) -> torch.Tensor:
        """Take one batch of the training batch through ``closure``; return its loss."""
        loss = self.loss_with_gradient(closure)
        params = [p for p in self.optimizer._params() if p.grad is not None]
        self.training_step(params, [p.grad for p in params], loss)
        return loss

    def training_step(self, params: list[torch.Tensor], gradients: list[torch.Tensor], loss: torch.Tensor) -> None:
        """Add one batch to the training batch; update the parameters when it holds k batches."""
        progress = self.progress
        multiplier = progress.multiplier
        if multiplier > 1:
            sums = [self.state_tensor(p, "gradient_sum") for p in params]
            if progress.training_batches == 0:
                torch._foreach_copy_(sums, gradients)
                progress.training_loss_sum = loss.clone()
            else:
                torch._foreach_add_(sums, gradients)
                progress.training_loss_sum += loss
            gradients = sums
            loss_sum = progress.training_loss_sum
        else:
            loss_sum = loss
        progress.training_batches += 1
        if progress.training_batches < multiplier:
            return
        progress.training_batches = 0
        if self.processes > 1:
            # A copy: with k = 1 the loss sum is the loss that step returns, which stays this process's own.
            loss_sum = loss_sum.to(dtype=gradients[0].dtype, copy=True)
            self.sum_over_processes([*gradients, loss_sum])
            # This process's own sum, used up: at the update boundary all processes hold the same state.
            progress.training_loss_sum = None
        self.update_parameters(params, gradients, loss_sum, 1.0 / (multiplier * self.processes))
        progress.updates += 1

    def update_parameters(self, params, gradients, loss_sum, gradient_scale) -> None:
        """One update along the mean gradient plus weight decay, skipped on the device when anything is not finite."""
        group = self.group
        progress = self.progress
        momentum = group["momentum"]
        device = params[0].device
        found_non_finite = (~torch.isfinite(loss_sum)).to(device=device, dtype=torch.float32)
        # The scale is float32 whatever the default dtype: the kernel takes no other.
        torch._amp_foreach_non_finite_check_and_unscale_(
            gradients, found_non_finite, torch.full((), gradient_scale, device=device, dtype=torch.float32)
        )
        self.add_weight_decay(params, gradients)
        buffers = [self.state_tensor(p, "momentum_buffer") for p in params] if momentum > 0 else []
        direction = momentum_direction(buffers, gradients, momentum)
        if group["mode"] == "NSGD":
            norm = global_norm(direction)
            learning_rate = progress.step_size / torch.clamp_min(norm, torch.finfo(norm.dtype).tiny)
            progress.effective_learning_rate = torch.where(
                found_non_finite > 0, progress.effective_learning_rate, learning_rate
            )
        else:
            learning_rate = progress.learning_rate
        torch._fused_sgd_(
            params, gradients, buffers, weight_decay=0.0, momentum=momentum, lr=learning_rate, dampening=0.0,
            nesterov=False, maximize=False, is_first_step=False, grad_scale=None, found_inf=found_non_finite,
        )
        progress.count_skipped(found_non_finite)

    def add_weight_decay(self, params, gradients) -> None:
        """``gradient += weight_decay · θ``, in place, for the parameters of groups that decay."""
        groups = self.optimizer.param_groups
        if not any(group["weight_decay"] for group in groups):
            return
        decay_of = {p: group["weight_decay"] for group in groups for p in group["params"]}
        add_weight_decay_(gradients, params, [decay_of[p] for p in params])

    # ------------------------------------------------------------------ measuring: the direction

    def measure(self, closure) -> torch.Tensor:
        """Take one batch of the measurement through ``closure``; return its loss at the line origin.

        The first k batches give the direction (with a backward pass); every batch is evaluated at
        0, h and μ along it. Autocast is off: the loss differences at h are below its resolution.
        """
        progress = self.progress
        multiplier = progress.multiplier
        batch_index = progress.measurement_batches
        params = self.optimizer._params()
        with torch.autocast(device_type=params[0].device.type, enabled=False):
            if batch_index == 0:
                self.begin_measurement(params)
            if batch_index < multiplier:
                loss = self.loss_with_gradient(closure)
                self.accumulate_direction_batch(params, loss, closure)
                progress.measurement_batches += 1
                if batch_index == multiplier - 1:
                    failure = self.set_direction(params)
                    if failure is not None:
                        self.fail_measurement(failure, params, direction_usable=False)
                        return loss.detach()
                    for stored in self.pending_closures:
                        self.measure_on_line(stored, params)
                    self.pending_closures = []
            else:
                loss = call_forward_only(closure)
                progress.forward_passes += 1
                self.add_origin_loss(loss)
                self.measure_on_line(closure, params)
                progress.measurement_batches += 1
        if progress.measurement_batches == self.group["approximation_batches"] * multiplier:
            self.finish_measurement(params)
        return loss.detach()

    def begin_measurement(self, params) -> None:
        for p in params:
            self.state_tensor(p, "line_origin").copy_(p)
        self.pending_closures = []
        # Summed in float64: the differences at h are tiny next to the losses themselves.
        self.progress.line_losses = torch.zeros(3, dtype=torch.float64, device=params[0].device)
        self.progress.research_origin_loss = None
        self.progress.research_line_losses = [[], []]

    def accumulate_direction_batch(self, params, loss, closure) -> None:
        """Add one direction batch's gradient and loss; keep its closure for the line evaluations."""
        first = self.progress.measurement_batches == 0
        for p in params:
            gradient_sum = self.state_tensor(p, "direction")
            if first:
                gradient_sum.zero_()
            if p.grad is not None:
                gradient_sum.add_(p.grad)
        self.add_origin_loss(loss)
        self.pending_closures.append(closure)

    def add_origin_loss(self, loss) -> None:
        self.progress.line_losses[0] += loss.detach()

    def mean_direction_(self, directions: list[torch.Tensor]) -> None:
        """Turn the direction batches' gradient sum into their mean over all processes, in place."""
        self.sum_over_processes(directions)
        torch._foreach_mul_(directions, 1.0 / (self.progress.multiplier * self.processes))

    def norm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The norm of ``tensors`` as one vector, a 0-dim tensor."""
        return global_norm(tensors)

    def set_direction(self, params) -> str | None:
        """Turn the direction batches into the line direction d; return why the line is unusable, if it is.

        Also records ‖d‖ and the weight-decay term along the line, read in one synchronisation.
        """
        group = self.group
        momentum = group["momentum"]
        directions = [self.state_tensor(p, "direction") for p in params]
        self.mean_direction_(directions)
        with_gradient = [(p, d) for p, d in zip(params, directions) if p.grad is not None]
        self.add_weight_decay([p for p, _ in with_gradient], [d for _, d in with_gradient])
        mean_gradient = [d.clone() for d in directions] if momentum > 0 else directions
        if momentum > 0:
            buffers = [self.state_tensor(p, "momentum_buffer") for p in params]
            torch._foreach_copy_(directions, momentum_direction(buffers, mean_gradient, momentum))
        norm = self.norm(directions)
        safe_norm = torch.clamp_min(norm, torch.finfo(norm.dtype).tiny)
        derivative = directional_derivative(mean_gradient, directions, safe_norm)
        decayed = [
            (each["weight_decay"], each["params"], [self.state_tensor(p, "direction") for p in each["params"]])
            for each in self.optimizer.param_groups
            if each["weight_decay"] != 0 and each["params"]
        ]
        penalty = weight_decay_along_line(decayed, safe_norm)
        norm_value, derivative_value, *penalty_terms = torch.cat([torch.stack([norm, derivative]), penalty]).tolist()
        self.progress.direction_norm = norm_value
        self.progress.line_penalty = penalty_terms
        failure = direction_failure(norm_value, derivative_value, group["min_direction_norm"],
                                    group["max_direction_norm"])
        if failure is None and momentum > 0:
            torch._foreach_copy_(buffers, directions)
        return failure

    # ------------------------------------------------------------------ measuring: the line

    def measure_on_line(self, closure, params) -> None:
        """Add the closure's loss at h and μ along -d/‖d‖, then put parameters and buffers back exactly."""
        origins = [self.state_tensor(p, "line_origin") for p in params]
        saved_buffers = self.optimizer._save_buffers()
        for index, position in self.line_points():
            self.move_along_direction(params, position)
            self.record_line_loss(index, call_forward_only(closure).detach())
            self.progress.forward_passes += 1
        torch._foreach_copy_(params, origins)
        self.optimizer._restore_buffers(saved_buffers)

    def line_points(self) -> tuple:
        """(index of the line loss, position) of the two points away from the origin."""
        return ((1, self.group["derivative_step"]), (2, self.group["sample_step"]))

    def record_line_loss(self, index: int, loss: torch.Tensor) -> None:
        self.progress.line_losses[index] += loss

    def mean_line_losses(self) -> list[float]:
        """The mean losses at 0, h and μ over the measurement's batches on all processes."""
        progress = self.progress
        self.sum_over_processes([progress.line_losses])
        return (progress.line_losses / (progress.measurement_batches * self.processes)).tolist()

    def fit_parabola(self, positions, losses):
        return fit_parabola(positions, losses)

    def measured_step(self, minimum_position: float, direction_norm: float, params) -> tuple[float, float]:
        """The step along d/‖d‖ and the learning rate for a parabola with this minimum."""
        group = self.group
        step = clipped_step(minimum_position, group["max_step"], group["step_adaptation"], group["min_step"])
        return step, step / direction_norm

    def average(self, values) -> float:
        return mean(values)

    def finish_measurement(self, params) -> None:
        """Fit the parabola, choose and average the step, and take it (or record why not)."""
        group = self.group
        progress = self.progress
        positions = (0.0, group["derivative_step"], group["sample_step"])
        losses = penalised_line_losses(self.mean_line_losses(), positions, progress.line_penalty)
        parabola = self.fit_parabola(positions, tuple(losses))
        failure = line_failure(losses, parabola)
        if failure is not None:
            self.fail_measurement(failure, params, direction_usable=True)
            return
        direction_norm = progress.direction_norm
        step, learning_rate = self.measured_step(parabola.minimum_position, direction_norm, params)
        progress.measurements += 1
        progress.last_measured_step = step
        progress.last_measured_learning_rate = learning_rate
        if progress.updates >= group["untrustworthy_updates"] + self.averaging_delay:
            window = group["averaging_window"]
            progress.step_size_history, step = windowed_average(progress.step_size_history, step, window,
                                                                self.average)
            progress.learning_rate_history, learning_rate = windowed_average(
                progress.learning_rate_history, learning_rate, window, self.average
            )
        progress.step_size = step
        progress.learning_rate = learning_rate
        for each in self.optimizer.param_groups:
            each["lr"] = learning_rate
        self.move_after_measurement(params, step, learning_rate)
        self.count_measurement_update()
        training_learning_rate = step / direction_norm if group["mode"] == "NSGD" else learning_rate
        self.set_effective_learning_rate(params, training_learning_rate)
        self.optimizer._report_measurement(training_learning_rate, step)
        self.end_measurement()

    def move_after_measurement(self, params, step: float, learning_rate: float) -> None:
        """Take the measured step: ``s`` along d/‖d‖ (NSGD) or ``λ`` along d (SGD)."""
        distance = step if self.group["mode"] == "NSGD" else learning_rate * self.progress.direction_norm
        self.move_along_direction(params, distance)

    def move_along_direction(self, params, position: float) -> None:
        """Put the parameters at ``origin - position · d/‖d‖``."""
        origins = [self.state_tensor(p, "line_origin") for p in params]
        directions = [self.state_tensor(p, "direction") for p in params]
        torch._foreach_copy_(params, origins)
        torch._foreach_add_(params, directions, alpha=-position / self.progress.direction_norm)

    def count_measurement_update(self) -> None:
        self.progress.updates += 1
        self.progress.last_measurement_step = self.progress.steps

    def set_effective_learning_rate(self, params, learning_rate: float) -> None:
        self.progress.effective_learning_rate = torch.tensor(
            learning_rate, dtype=params[0].dtype, device=params[0].device
        )

    def fail_measurement(self, failure: str, params, direction_usable: bool) -> None:
        """Report ``failure`` and put the parameters back at the line's origin."""
        progress = self.progress
        progress.failed_measurements += 1
        progress.last_failure = failure
        self.optimizer._report_failure(f"measurement failed: {failure}")
        origins = [self.state_tensor(p, "line_origin") for p in params]
        torch._foreach_copy_(params, origins)
        self.after_failed_measurement(params, direction_usable)

    def after_failed_measurement(self, params, direction_usable: bool) -> None:
        """Keep the previous values; measure again at once if there is no value yet."""
        if self.progress.step_size is None:
            self.restart_measurement()
        else:
            self.end_measurement()

    def end_measurement(self) -> None:
        progress = self.progress
        group = self.group
        progress.phase = TRAINING
        progress.measurement_batches = 0
        progress.training_batches = 0
        progress.next_measurement_update = next_measurement_update(
            progress.updates, group["measurement_interval"], group["untrustworthy_updates"]
        )
        self.clear_measurement()

    def restart_measurement(self) -> None:
        self.progress.phase = MEASURING
        self.progress.measurement_batches = 0
        self.progress.training_batches = 0
        self.clear_measurement()

    def clear_measurement(self) -> None:
        self.pending_closures = []
        for p in self.optimizer._params():
            self.optimizer.state[p].pop("line_origin", None)
            self.optimizer.state[p].pop("direction", None)

    def sum_over_processes(self, tensors: list[torch.Tensor]) -> None:
        """Replace ``tensors`` (one dtype and device) by their sums over the process group, in one all-reduce."""
        if self.processes == 1:
            return
        flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        sums = flat.split([tensor.numel() for tensor in tensors])
        torch._foreach_copy_(tensors, [total.view_as(tensor) for total, tensor in zip(sums, tensors)])
