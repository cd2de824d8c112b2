"""LABPAL: the Large-Batch Parabolic Approximation Line Search optimizer."""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .batch_schedule import (
    PAPER_BATCH_SIZE_SCHEDULE,
    REFERENCE_INFERENCE_BATCH_SIZE,
    REFERENCE_TRAINING_SET_SIZE,
    multiplier_at,
    noise_adaptation_factor,
    scale_batch_size_schedule,
    validate_batch_size_schedule,
)
from .closure import MEAN_LOSS, BatchClosure
from .line_search_base import (
    LineSearchBase,
    global_dot,
    global_norm,
    log_values_known,
    require,
    require_integer,
)
from .parabola import fit_parabola

__all__ = ["LabPal", "LabPalSummary"]

MEASURING = "measuring"
TRAINING = "training"


@dataclass(frozen=True)
class LabPalSummary:
    """A read-only snapshot of what LABPAL is doing, for logs and progress bars."""

    phase: str
    batch_multiplier: int
    training_batch_size: int
    step_size: float | None
    learning_rate: float | None
    last_measured_step: float | None
    last_measured_learning_rate: float | None
    measurements: int
    failed_measurements: int
    last_failure: str | None
    skipped_updates: int
    steps: int
    updates: int


class LabPal(LineSearchBase):
    r"""Large-Batch Parabolic Approximation Line Search (LABPAL).

    Mutschler, Laube and Zell, "Using a one dimensional parabolic model of the
    full-batch loss to estimate learning rates during training", arXiv 2108.13880.

    Every call of :meth:`step` consumes one *inference batch* (size b) through a
    closure that evaluates that batch's loss, forward only. A *training batch* is
    k inference batches whose gradients are averaged (k, the batch multiplier,
    follows ``batch_size_schedule`` scaled by the noise adaptation factor), so it
    can exceed what fits in memory. The algorithm:

    1. **Measure** at step 0, right after the first ``untrustworthy_updates``
       updates, whenever k changes, and then every ``measurement_interval``
       updates, over ``approximation_batches * k`` inference batches:

       a. the first k batches give the mean gradient g; the direction d is g, or
          the momentum buffer ``momentum * buffer + g`` when momentum > 0;
       b. the mean loss of all batches is measured at the current parameters θ
          (L0) and at ``θ - h d/‖d‖`` and ``θ - μ d/‖d‖`` (``derivative_step`` h,
          ``sample_step`` μ);
       c. the exact parabola through (0, L0), (h, Lh), (μ, Lμ) gives slope and
          curvature; if it is convex and descending, its minimum s* is clipped to
          ``max_step``, multiplied by ``step_adaptation`` α and floored at
          ``min_step`` ε: s = max(α · min(s*, s_max), ε); the learning rate is
          λ = s / ‖d‖;
       d. the measurement fails, keeping the previous values and the parameters,
          when ‖d‖ is not finite or outside [``min_direction_norm``,
          ``max_direction_norm``], the directional derivative is not negative,
          a loss is not finite, or the parabola is not convex and descending;
          without a previous value the next batches measure again;
       e. otherwise the parameters move to ``θ - s d/‖d‖`` (NSGD) or ``θ - λ d``
          (SGD): one update.

    2. **Average**: measurements made after the first ``untrustworthy_updates``
       updates enter a window of the last ``averaging_window`` values, and the
       window means are used; earlier measurements are used as they are. Step
       size and learning rate are averaged separately.

    3. **Train** between measurements, one update every k inference batches:
       NSGD ``θ ← θ - s d/‖d‖`` (the effective learning rate is s/‖d‖), SGD
       ``θ ← θ - λ d``. A non-finite loss or gradient skips the update, counted
       in ``summary.skipped_updates``; it never reaches the parameters.

    4. **Batch-size schedule** instead of learning-rate decay: the multipliers
       of ``batch_size_schedule`` ((step, k) pairs, steps counting inference
       batches) are scaled by ``f = (128 / inference_batch_size) *
       (training_set_size / 40000)`` as ``max(int(k f), 1)``. A switch takes
       effect at the first update boundary at or after its step and starts a
       new measurement.

    The research code's fit halved the curvature, so its steps were twice what α
    says. ``step_adaptation=3.6, max_step=0.5`` reproduces its effective step
    exactly (min(2 s*, 1) · 1.8 = min(s*, 0.5) · 3.6); the defaults are the paper's.

    Closure contract: ``closure()`` evaluates the loss of one fixed batch, forward
    only, and returns it; called again it gives the same loss for the same
    parameters. LABPAL calls ``backward`` itself when it needs gradients and
    zeroes the gradients it uses, so the caller calls neither ``backward`` nor
    ``zero_grad``. Build closures with :func:`make_batch_closure`, which binds
    its batch and replays its random state: LABPAL evaluates the first k closures
    of a measurement again after the k-th batch. ``step`` returns the batch loss.

    Measuring has no side effects: pass ``buffers=model.buffers()`` and the
    buffers (BatchNorm running statistics) are restored after every evaluation
    away from the iterate, and the parameters are restored by copy, bitwise.
    Line losses are measured with autocast disabled, in the parameters' precision:
    the loss differences at h ≈ 1.8e-4 are far below bfloat16's resolution.

    Memory: one copy of the parameters (the line origin) and one of the direction
    during a measurement; a momentum buffer when momentum > 0; a gradient sum
    when k > 1; and the k closures of the direction batches (their batches stay
    where the caller made them; one at a time is moved to the device), which a
    state saved during those k steps also holds.

    All parameters must share one device and dtype (they are updated by one fused
    kernel). ``param_groups[0]["lr"]`` is the current effective learning rate: a float in
    SGD mode, a 0-dim tensor in NSGD mode (it changes with ‖d‖ every update and
    reading it as a float synchronises with the device). One parameter group only;
    :class:`~.line_search_base.LineSearchBase` enforces both and keeps the buffers and events.

    Example:
        >>> optimizer = LabPal(model.parameters(), buffers=model.buffers(),
        ...                    training_set_size=len(train_set), inference_batch_size=128)
        >>> for inputs, targets in loader:
        ...     closure = make_batch_closure(model, loss_function, inputs, targets, device)
        ...     loss = optimizer.step(closure)
    """

    closure_loss = MEAN_LOSS

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        mode: str = "NSGD",
        *,
        step_adaptation: float = 1.8,
        max_step: float = 1.0,
        min_step: float = 1e-6,
        momentum: float = 0.0,
        measurement_interval: int = 1000,
        approximation_batches: int = 10,
        untrustworthy_updates: int = 400,
        averaging_window: int = 25,
        sample_step: float = 0.01,
        derivative_step: float = 1.77e-4,
        min_direction_norm: float = 1e-3,
        max_direction_norm: float = 100.0,
        batch_size_schedule: Sequence[tuple[int, int]] = PAPER_BATCH_SIZE_SCHEDULE,
        training_set_size: int = REFERENCE_TRAINING_SET_SIZE,
        inference_batch_size: int = REFERENCE_INFERENCE_BATCH_SIZE,
        buffers: Iterable[torch.Tensor] | None = None,
    ):
        if mode not in ("NSGD", "SGD"):
            raise ValueError(f"Invalid mode: {mode!r}; valid modes are 'NSGD' and 'SGD'")
        require(step_adaptation > 0, "step_adaptation", step_adaptation, "> 0")
        require(max_step > 0, "max_step", max_step, "> 0")
        require(0 < min_step <= max_step * step_adaptation, "min_step", min_step, "in (0, max_step * step_adaptation]")
        require(0 <= momentum < 1, "momentum", momentum, "in [0, 1)")
        require_integer(measurement_interval, "measurement_interval", 1)
        require_integer(approximation_batches, "approximation_batches", 1)
        require_integer(untrustworthy_updates, "untrustworthy_updates", 0)
        require_integer(averaging_window, "averaging_window", 1)
        require(sample_step > 0, "sample_step", sample_step, "> 0")
        require(0 < derivative_step < sample_step, "derivative_step", derivative_step, "in (0, sample_step)")
        require(min_direction_norm >= 0, "min_direction_norm", min_direction_norm, ">= 0")
        require(max_direction_norm > min_direction_norm, "max_direction_norm", max_direction_norm, "> min_direction_norm")
        require_integer(training_set_size, "training_set_size", 1)
        require_integer(inference_batch_size, "inference_batch_size", 1)
        defaults = dict(
            lr=0.0,
            mode=mode,
            step_adaptation=step_adaptation,
            max_step=max_step,
            min_step=min_step,
            momentum=momentum,
            measurement_interval=measurement_interval,
            approximation_batches=approximation_batches,
            untrustworthy_updates=untrustworthy_updates,
            averaging_window=averaging_window,
            sample_step=sample_step,
            derivative_step=derivative_step,
            min_direction_norm=min_direction_norm,
            max_direction_norm=max_direction_norm,
            batch_size_schedule=validate_batch_size_schedule(batch_size_schedule),
            training_set_size=training_set_size,
            inference_batch_size=inference_batch_size,
        )
        super().__init__(params, defaults, buffers)
        self._pending_closures = []
        self._saved_pending_batches = []  # from load_state_dict, rebound to the next closure's model
        self._progress = _initial_progress()
        self._skipped_updates = None  # counted on the device, so training never waits for the host

    # ------------------------------------------------------------------ public views

    @property
    def scaled_batch_size_schedule(self) -> tuple[tuple[int, int], ...]:
        """The batch-size schedule after scaling by the noise adaptation factor."""
        group = self.param_groups[0]
        factor = noise_adaptation_factor(group["training_set_size"], group["inference_batch_size"])
        return scale_batch_size_schedule(group["batch_size_schedule"], factor)

    @property
    def summary(self) -> LabPalSummary:
        """What LABPAL is doing now (reading it synchronises with the device once)."""
        progress = self._progress
        group = self.param_groups[0]
        learning_rate = group["lr"] if progress["step_size"] is not None else None
        return LabPalSummary(
            phase=progress["phase"],
            batch_multiplier=progress["multiplier"],
            training_batch_size=progress["multiplier"] * group["inference_batch_size"],
            step_size=progress["step_size"],
            learning_rate=float(learning_rate) if learning_rate is not None else None,
            last_measured_step=progress["last_measured_step"],
            last_measured_learning_rate=progress["last_measured_learning_rate"],
            measurements=progress["measurements"],
            failed_measurements=progress["failed_measurements"],
            last_failure=progress["last_failure"],
            skipped_updates=self._skipped_update_count(),
            steps=progress["steps"],
            updates=progress["updates"],
        )

    def log_values(self) -> dict[str, float]:
        """The numbers a training log records now (reading them synchronises with the device once).

        The learning rate and step size in use (absent before the first successful measurement),
        the last measured ones, the training batch size, the counts of measurements, failed
        measurements and skipped updates, and the forward and backward passes since step 0.
        """
        summary = self.summary
        values = {
            "learning_rate": summary.learning_rate,
            "step_size": summary.step_size,
            "measured_step_size": summary.last_measured_step,
            "measured_learning_rate": summary.last_measured_learning_rate,
            "training_batch_size": summary.training_batch_size,
            "measurements": summary.measurements,
            "failed_measurements": summary.failed_measurements,
            "skipped_updates": summary.skipped_updates,
            "forward_passes": self._progress["forward_passes"],
            "backward_passes": self._progress["backward_passes"],
        }
        return log_values_known(values)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The optimizer state including LABPAL's counters, history, schedule position and phase.

        While a measurement with k > 1 gathers its direction batches, the state
        holds those batches (from closures made by ``make_batch_closure``), and the
        resumed optimizer replays them through the model and loss of the first
        closure it is given. Plain closures cannot be saved: the resumed optimizer
        then starts that measurement afresh.
        """
        state = super().state_dict()
        for group in state["param_groups"]:
            group["lr"] = float(group["lr"])
        progress = {
            key: value.clone() if isinstance(value, torch.Tensor) else value
            for key, value in self._progress.items()
        }
        progress["skipped_updates"] = self._skipped_update_count()
        pending = self._pending_closures
        saveable = all(isinstance(closure, BatchClosure) for closure in pending)
        progress["pending_batches"] = [closure.batch_state() for closure in pending] if saveable else None
        state["lab_pal"] = progress
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        state_dict = dict(state_dict)
        progress = dict(state_dict.pop("lab_pal"))
        skipped_updates = progress.pop("skipped_updates")
        pending_batches = progress.pop("pending_batches")
        super().load_state_dict(state_dict)
        progress["step_size_history"] = list(progress["step_size_history"])
        progress["learning_rate_history"] = list(progress["learning_rate_history"])
        device = self._params()[0].device
        for key in ("line_losses", "training_loss_sum"):
            if isinstance(progress[key], torch.Tensor):
                progress[key] = progress[key].to(device)
        self._progress = progress
        self._skipped_updates = None
        self._pending_closures = []
        self._saved_pending_batches = pending_batches or []
        if skipped_updates:
            self._count_skipped(torch.tensor(float(skipped_updates), device=device))
        if pending_batches is None:
            self._restart_measurement()

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure) -> torch.Tensor:
        """Consume one inference batch through ``closure``; return its loss at the current parameters."""
        self._require_closure(closure)
        progress = self._progress
        if self._saved_pending_batches:
            self._rebind_saved_batches(closure)
        if self._at_update_boundary():
            self._follow_schedule_and_plan()
        if progress["phase"] == MEASURING:
            loss = self._measurement_step(closure)
        else:
            loss = self._training_step(closure)
        progress["steps"] += 1
        return loss

    def _rebind_saved_batches(self, closure) -> None:
        """Turn the direction batches of a loaded state back into closures, like ``closure``."""
        if isinstance(closure, BatchClosure):
            self._pending_closures = [closure.for_batch(state) for state in self._saved_pending_batches]
        else:
            self._restart_measurement()
        self._saved_pending_batches = []

    def _at_update_boundary(self) -> bool:
        progress = self._progress
        if progress["phase"] == MEASURING:
            return progress["measurement_batches"] == 0
        return progress["training_batches"] == 0

    def _follow_schedule_and_plan(self) -> None:
        """At an update boundary: switch k if the schedule says so, and start a measurement when due."""
        progress = self._progress
        scheduled_multiplier = multiplier_at(self.scaled_batch_size_schedule, progress["steps"])
        if scheduled_multiplier != progress["multiplier"]:
            progress["multiplier"] = scheduled_multiplier
            progress["phase"] = MEASURING
        elif progress["phase"] == TRAINING and progress["updates"] >= progress["next_measurement_update"]:
            progress["phase"] = MEASURING
        if progress["phase"] == MEASURING:
            progress["measurement_batches"] = 0

    # ------------------------------------------------------------------ training phase

    def _training_step(self, closure) -> torch.Tensor:
        progress = self._progress
        group = self.param_groups[0]
        multiplier = progress["multiplier"]
        params = self._params()
        loss = self._loss_with_gradient(closure, self._progress)
        params_with_grad = [p for p in params if p.grad is not None]
        gradients = [p.grad for p in params_with_grad]
        if multiplier > 1:
            sums = [self._state_tensor(p, "gradient_sum") for p in params_with_grad]
            if progress["training_batches"] == 0:
                torch._foreach_copy_(sums, gradients)
                progress["training_loss_sum"] = loss.clone()
            else:
                torch._foreach_add_(sums, gradients)
                progress["training_loss_sum"] += loss
            gradients = sums
            loss_sum = progress["training_loss_sum"]
        else:
            loss_sum = loss
        progress["training_batches"] += 1
        if progress["training_batches"] < multiplier:
            return loss
        progress["training_batches"] = 0
        self._update_parameters(group, params_with_grad, gradients, loss_sum, 1.0 / multiplier)
        progress["updates"] += 1
        return loss

    def _update_parameters(self, group, params, gradients, loss_sum, gradient_scale) -> None:
        """One update along the mean gradient, skipped on the device when anything is not finite."""
        momentum = group["momentum"]
        device = params[0].device
        found_non_finite = (~torch.isfinite(loss_sum)).to(device=device, dtype=torch.float32)
        torch._amp_foreach_non_finite_check_and_unscale_(
            gradients, found_non_finite, torch.full((), gradient_scale, device=device)
        )
        buffers = [self._state_tensor(p, "momentum_buffer") for p in params] if momentum > 0 else []
        if group["mode"] == "NSGD":
            direction = torch._foreach_add(torch._foreach_mul(buffers, momentum), gradients) if buffers else gradients
            norm = global_norm(direction)
            learning_rate = self._progress["step_size"] / torch.clamp_min(norm, torch.finfo(norm.dtype).tiny)
            group["lr"] = torch.where(found_non_finite > 0, group["lr"], learning_rate)
        else:
            learning_rate = group["lr"]
        torch._fused_sgd_(
            params,
            gradients,
            buffers,
            weight_decay=0.0,
            momentum=momentum,
            lr=learning_rate,
            dampening=0.0,
            nesterov=False,
            maximize=False,
            is_first_step=False,
            grad_scale=None,
            found_inf=found_non_finite,
        )
        self._count_skipped(found_non_finite)

    # ------------------------------------------------------------------ measuring phase

    def _measurement_step(self, closure) -> torch.Tensor:
        progress = self._progress
        group = self.param_groups[0]
        multiplier = progress["multiplier"]
        batch_index = progress["measurement_batches"]
        params = self._params()
        with _autocast_disabled(params[0].device):
            if batch_index == 0:
                self._begin_measurement(params)
            if batch_index < multiplier:
                loss = self._loss_with_gradient(closure, self._progress)
                self._accumulate_direction_batch(params, loss, closure)
                progress["measurement_batches"] += 1
                if batch_index == multiplier - 1:
                    failure = self._set_direction(group, params)
                    if failure is not None:
                        self._finish_failed_measurement(failure, params)
                        return loss.detach()
                    for stored in self._pending_closures:
                        self._measure_on_line(stored, params)
                    self._pending_closures = []
            else:
                loss = closure()
                progress["forward_passes"] += 1
                progress["line_losses"][0] += loss.detach()
                self._measure_on_line(closure, params)
                progress["measurement_batches"] += 1
        if progress["measurement_batches"] == group["approximation_batches"] * multiplier:
            self._finish_measurement(group, params)
        return loss.detach()

    def _begin_measurement(self, params) -> None:
        for p in params:
            self._state_tensor(p, "line_origin").copy_(p)
        self._pending_closures = []
        # Summed in float64: the differences at h are tiny next to the losses themselves.
        self._progress["line_losses"] = torch.zeros(3, dtype=torch.float64, device=params[0].device)

    def _accumulate_direction_batch(self, params, loss, closure) -> None:
        """Add one direction batch's gradient and loss; keep its closure for the line evaluations."""
        first = self._progress["measurement_batches"] == 0
        for p in params:
            gradient_sum = self._state_tensor(p, "direction")
            if first:
                gradient_sum.zero_()
            if p.grad is not None:
                gradient_sum.add_(p.grad)
        self._progress["line_losses"][0] += loss.detach()
        self._pending_closures.append(closure)

    def _set_direction(self, group, params) -> str | None:
        """Turn the gradient sum into the line direction d; return why the line is unusable, if it is."""
        multiplier = self._progress["multiplier"]
        momentum = group["momentum"]
        directions = [self._state_tensor(p, "direction") for p in params]
        torch._foreach_mul_(directions, 1.0 / multiplier)
        mean_gradient = [d.clone() for d in directions] if momentum > 0 else directions
        if momentum > 0:
            buffers = [self._state_tensor(p, "momentum_buffer") for p in params]
            candidate = torch._foreach_add(torch._foreach_mul(buffers, momentum), mean_gradient)
            torch._foreach_copy_(directions, candidate)
        norm = global_norm(directions)
        derivative = -global_dot(mean_gradient, directions) / torch.clamp_min(norm, torch.finfo(norm.dtype).tiny)
        norm_value, derivative_value = torch.stack([norm, derivative]).tolist()
        self._progress["direction_norm"] = norm_value
        if not math.isfinite(norm_value):
            return f"direction norm is {norm_value}"
        if not group["min_direction_norm"] <= norm_value <= group["max_direction_norm"]:
            return (
                f"direction norm {norm_value:.3g} outside "
                f"[{group['min_direction_norm']}, {group['max_direction_norm']}]"
            )
        if not derivative_value < 0:
            return f"directional derivative {derivative_value:.3g} is not negative"
        if momentum > 0:
            torch._foreach_copy_(buffers, directions)
        return None

    def _measure_on_line(self, closure, params) -> None:
        """Add the closure's loss at h and μ along -d/‖d‖, then put parameters and buffers back exactly."""
        group = self.param_groups[0]
        origins = [self._state_tensor(p, "line_origin") for p in params]
        directions = [self._state_tensor(p, "direction") for p in params]
        saved_buffers = self._save_buffers()
        for index, position in ((1, group["derivative_step"]), (2, group["sample_step"])):
            torch._foreach_copy_(params, origins)
            torch._foreach_add_(params, directions, alpha=-position / self._progress["direction_norm"])
            self._progress["line_losses"][index] += closure().detach()
            self._progress["forward_passes"] += 1
        torch._foreach_copy_(params, origins)
        self._restore_buffers(saved_buffers)

    def _finish_measurement(self, group, params) -> None:
        progress = self._progress
        batch_count = progress["measurement_batches"]
        loss_0, loss_h, loss_mu = (progress["line_losses"] / batch_count).tolist()
        parabola = fit_parabola((0.0, group["derivative_step"], group["sample_step"]), (loss_0, loss_h, loss_mu))
        finite = all(map(math.isfinite, (loss_0, loss_h, loss_mu)))
        if not finite:
            failure = f"non-finite line loss ({loss_0}, {loss_h}, {loss_mu})"
        elif not parabola.curvature > 0:
            failure = f"line is not convex (curvature {parabola.curvature:.3g})"
        elif not parabola.slope < 0:
            failure = f"loss does not decrease along the line (slope {parabola.slope:.3g})"
        else:
            failure = None
        if failure is not None:
            self._finish_failed_measurement(failure, params)
            return
        step = max(min(parabola.minimum_position, group["max_step"]) * group["step_adaptation"], group["min_step"])
        direction_norm = progress["direction_norm"]
        learning_rate = step / direction_norm
        progress["measurements"] += 1
        progress["last_measured_step"] = step
        progress["last_measured_learning_rate"] = learning_rate
        if progress["updates"] >= group["untrustworthy_updates"]:
            window = group["averaging_window"]
            progress["step_size_history"] = (progress["step_size_history"] + [step])[-window:]
            progress["learning_rate_history"] = (progress["learning_rate_history"] + [learning_rate])[-window:]
            step = sum(progress["step_size_history"]) / len(progress["step_size_history"])
            learning_rate = sum(progress["learning_rate_history"]) / len(progress["learning_rate_history"])
        progress["step_size"] = step
        directions = [self._state_tensor(p, "direction") for p in params]
        applied_learning_rate = step / direction_norm if group["mode"] == "NSGD" else learning_rate
        torch._foreach_add_(params, directions, alpha=-applied_learning_rate)
        if group["mode"] == "NSGD":
            group["lr"] = torch.tensor(applied_learning_rate, device=params[0].device)
        else:
            group["lr"] = applied_learning_rate
        progress["updates"] += 1
        self._report_measurement(applied_learning_rate, step)
        self._end_measurement()

    def _finish_failed_measurement(self, failure: str, params) -> None:
        """Keep the previous values and the parameters; measure again at once if there is no value yet."""
        progress = self._progress
        progress["failed_measurements"] += 1
        progress["last_failure"] = failure
        self._report_failure(f"measurement failed: {failure}")
        origins = [self._state_tensor(p, "line_origin") for p in params]
        torch._foreach_copy_(params, origins)
        if progress["step_size"] is None:
            self._restart_measurement()
        else:
            self._end_measurement()

    def _end_measurement(self) -> None:
        progress = self._progress
        group = self.param_groups[0]
        progress["phase"] = TRAINING
        progress["measurement_batches"] = 0
        progress["training_batches"] = 0
        next_update = progress["updates"] + group["measurement_interval"]
        if progress["updates"] < group["untrustworthy_updates"]:
            next_update = min(next_update, group["untrustworthy_updates"])
        progress["next_measurement_update"] = next_update
        self._pending_closures = []
        for p in self._params():
            self.state[p].pop("line_origin", None)
            self.state[p].pop("direction", None)

    def _restart_measurement(self) -> None:
        self._progress["phase"] = MEASURING
        self._progress["measurement_batches"] = 0
        self._pending_closures = []

    # ------------------------------------------------------------------ helpers

    def _count_skipped(self, found_non_finite: torch.Tensor) -> None:
        if self._skipped_updates is None:
            self._skipped_updates = torch.zeros((), device=found_non_finite.device)
        self._skipped_updates += found_non_finite

    def _skipped_update_count(self) -> int:
        return 0 if self._skipped_updates is None else int(self._skipped_updates.item())


def _initial_progress() -> dict:
    return dict(
        phase=MEASURING,
        steps=0,
        updates=0,
        multiplier=1,
        measurement_batches=0,
        training_batches=0,
        next_measurement_update=0,
        step_size=None,
        last_measured_step=None,
        last_measured_learning_rate=None,
        step_size_history=[],
        learning_rate_history=[],
        measurements=0,
        failed_measurements=0,
        last_failure=None,
        direction_norm=None,
        line_losses=None,
        training_loss_sum=None,
        forward_passes=0,
        backward_passes=0,
    )


def _autocast_disabled(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)

