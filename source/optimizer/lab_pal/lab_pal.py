"""LABPAL: the Large-Batch Parabolic Approximation Line Search optimizer."""

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .batch_schedule import (
    PAPER_BATCH_SIZE_SCHEDULE,
    REFERENCE_INFERENCE_BATCH_SIZE,
    REFERENCE_TRAINING_SET_SIZE,
    multiplier_at,
    noise_adaptation_factor,
    scale_batch_size_schedule,
    validate_batch_size_schedule,
)
from .closure import MEAN_LOSS, BatchClosure, make_batch_closure
from .line_search_base import (
    LineSearchBase,
    global_dot,
    global_norm,
    log_values_known,
    require,
    require_integer,
)
from .parabola import fit_parabola
from .research_code import fit_parabola_like_research_code, line_increments, numpy_mean, running_mean

__all__ = ["LabPal", "LabPalSummary"]

MEASURING = "measuring"
TRAINING = "training"

#: Options that may differ between parameter groups; all others are LABPAL's global settings.
PER_GROUP_OPTIONS = ("params", "weight_decay")

#: The settings the research code holds as float32 tensors, rounded so with ``research_code_steps``.
RESEARCH_CODE_FLOAT32_SETTINGS = ("step_adaptation", "max_step", "sample_step", "momentum")


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

       a. the first k batches give the mean gradient g, plus ``weight_decay · θ``
          per group; the direction d is that, or the momentum buffer
          ``momentum * buffer + g`` when momentum > 0;
       b. the mean loss of all batches is measured at the current parameters θ
          (L0) and at ``θ - h d/‖d‖`` and ``θ - μ d/‖d‖`` (``derivative_step`` h,
          ``sample_step`` μ), each plus the weight-decay term
          ``Σ weight_decay/2 · ‖θ_group‖²`` at that point;
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
       window means s̄ and λ̄ are used; earlier measurements are used as they
       are. Step size and learning rate are averaged separately.

    3. **Train** between measurements, one update every k inference batches,
       along the mean gradient plus ``weight_decay · θ`` (through the momentum
       buffer when momentum > 0): NSGD ``θ ← θ - s̄ d/‖d‖``, SGD ``θ ← θ - λ̄ d``.
       A non-finite loss or gradient skips the update, counted in
       ``summary.skipped_updates``; it never reaches the parameters.

    4. **Batch-size schedule** instead of learning-rate decay: the multipliers
       of ``batch_size_schedule`` ((step, k) pairs, steps counting inference
       batches) are scaled by ``f = (128 / inference_batch_size) *
       (training_set_size / 40000)`` as ``max(int(k f), 1)``. A switch takes
       effect at the first update boundary at or after its step and starts a
       new measurement.

    **Several processes** (``process_group``, e.g. ``torch.distributed.group.WORLD``
    under torchrun): every process takes an equal share of each inference batch
    (``inference_batch_size`` stays the global b) and all follow the mean over the
    global batch in lock-step, through exactly these all-reduces (sums, divided by
    the number of processes W), each of one flat buffer:

    - one per update: the training batch's gradient sum with its loss sum;
    - one per measurement, when its k direction batches are in: their gradient sums;
    - one per measurement whose direction was usable, at its end: the three line-loss sums.

    So every process fits the same parabola and applies the same update: parameters,
    learning rates, counters and events agree exactly, and a non-finite value on any
    process skips that update (or fails that measurement) on all of them. Closures
    evaluate the unwrapped model (``ddp_model.module``): line evaluations and the
    backward passes LABPAL makes itself then make no collective of
    DistributedDataParallel's. Every process must call ``step`` equally often, with
    gradients for the same parameters. ``step`` returns this process's own batch loss.
    Between update boundaries (:attr:`holds_partial_sums`) each process holds sums of
    its own share, so a state saved by one process resumes all of them exactly only
    when saved at a boundary. ``process_group=None`` (the default) or a group of one
    process makes no collective; ``research_code_steps`` is refused with several.

    Weight decay enters as in ``torch.optim.SGD``: it is the L2 term
    ``weight_decay/2 · ‖θ‖²`` of the objective, so it is added to the gradient of
    the direction and of every update, and to the line losses, so that the
    parabola is fitted to the objective whose negative gradient the line follows.
    ``weight_decay`` may differ between parameter groups; every other option is
    global (set once in the constructor). The paper trains without weight decay.

    The research code's fit halved the curvature, so its steps were about twice
    what α says; ``research_code_steps=True`` reproduces its steps (that fit and
    its other behaviours, listed in the README), and ``step_adaptation=3.6,
    max_step=0.5`` comes within α · h ≈ 3e-4 of its step with the exact fit.

    Closure contract: ``closure()`` evaluates the loss of one fixed batch, forward
    only, and returns it; called again it gives the same loss for the same
    parameters. LABPAL calls ``backward`` itself when it needs gradients and
    zeroes the gradients it uses, so the caller calls neither ``backward`` nor
    ``zero_grad``; a closure that calls ``backward`` (the ``torch.optim.LBFGS``
    convention) is refused. Build closures with :func:`make_batch_closure` (or
    :meth:`get_closure`), which binds its batch and replays its random state:
    LABPAL evaluates the first k closures of a measurement again after the k-th
    batch. ``step`` returns the batch loss.

    Measuring has no side effects: pass ``buffers=model.buffers()`` and the
    buffers (BatchNorm running statistics) are restored after every evaluation
    away from the iterate, and the parameters are restored by copy, bitwise.
    Line losses are measured with autocast disabled, in the parameters' precision:
    the loss differences at h ≈ 1.8e-4 are far below bfloat16's resolution. For
    the same reason the parameters themselves must be float32 or float64
    (bfloat16 and float16 parameters are refused; train them under autocast).

    Memory: one copy of the parameters (the line origin) and one of the direction
    during a measurement; a momentum buffer when momentum > 0; a gradient sum
    when k > 1; and the k closures of the direction batches (their batches stay
    where the caller made them; one at a time is moved to the device), which a
    state saved during those k steps also holds.

    All parameters must share one device and dtype (they are updated by one fused
    kernel). ``param_groups[i]["lr"]`` is the learning rate λ̄ of the last
    measurement, a float set only when a measurement succeeds; the rate each
    update applies, s̄/‖d‖ in NSGD mode, is :attr:`effective_learning_rate`, a
    0-dim tensor on the parameters' device, so training never waits for the host.
    LABPAL sets its own learning rate: a learning-rate scheduler is refused, and
    so is ``GradScaler.step`` while the scaler is enabled (LABPAL calls
    ``backward`` itself and skips non-finite updates on its own).

    Example:
        >>> optimizer = LabPal(model.parameters(), buffers=model.buffers(),
        ...                    training_set_size=len(train_set), inference_batch_size=128)
        >>> for inputs, targets in loader:
        ...     closure = make_batch_closure(model, loss_function, inputs, targets, device)
        ...     loss = optimizer.step(closure)
    """

    closure_loss = MEAN_LOSS
    # GradScaler hands scaler-aware optimizers to step() instead of unscaling gradients that LABPAL
    # has not made yet; step() then refuses it with a message instead of an assertion deep in torch.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        mode: str = "NSGD",
        *,
        step_adaptation: float = 1.8,
        max_step: float = 1.0,
        min_step: float = 1e-6,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        measurement_interval: int = 1000,
        approximation_batches: int = 10,
        untrustworthy_updates: int = 400,
        averaging_window: int = 25,
        sample_step: float = 0.01,
        derivative_step: float = 1.77e-4,
        min_direction_norm: float = 1e-3,
        max_direction_norm: float = 100.0,
        batch_size_schedule: Sequence[tuple[int, int]] | Sequence[str] | str = PAPER_BATCH_SIZE_SCHEDULE,
        training_set_size: int = REFERENCE_TRAINING_SET_SIZE,
        inference_batch_size: int = REFERENCE_INFERENCE_BATCH_SIZE,
        research_code_steps: bool = False,
        buffers: Iterable[torch.Tensor] | None = None,
        process_group: "dist.ProcessGroup | None" = None,
    ):
        if mode not in ("NSGD", "SGD"):
            raise ValueError(f"Invalid mode: {mode!r}; valid modes are 'NSGD' and 'SGD'")
        require(step_adaptation > 0, "step_adaptation", step_adaptation, "> 0")
        require(max_step > 0, "max_step", max_step, "> 0")
        require(0 < min_step <= max_step * step_adaptation, "min_step", min_step, "in (0, max_step * step_adaptation]")
        require(0 <= momentum < 1, "momentum", momentum, "in [0, 1)")
        _require_weight_decay(weight_decay)
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
        require(isinstance(research_code_steps, bool), "research_code_steps", research_code_steps, "True or False")
        processes = _process_count(process_group)
        if research_code_steps and processes > 1:
            raise ValueError(
                f"Invalid research_code_steps: True with a process group of {processes} processes; the research "
                "code's arithmetic runs in one process only; use research_code_steps=False (or one process)"
            )
        defaults = dict(
            lr=0.0,
            mode=mode,
            step_adaptation=step_adaptation,
            max_step=max_step,
            min_step=min_step,
            momentum=momentum,
            weight_decay=weight_decay,
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
            research_code_steps=research_code_steps,
        )
        if research_code_steps:
            for name in RESEARCH_CODE_FLOAT32_SETTINGS:
                defaults[name] = _float32(defaults[name])
        super().__init__(params, defaults, buffers)
        # Not in defaults: a process group is no setting of the state and cannot be saved.
        self._process_group = process_group if processes > 1 else None
        self._processes = processes
        self._pending_closures = []
        self._saved_pending_batches = []  # from load_state_dict, rebound to the next closure's model
        self._progress = _initial_progress(defaults)
        self._skipped_updates = None  # counted on the device, so training never waits for the host

    @staticmethod
    def get_closure(
        inputs: torch.Tensor,
        targets: torch.Tensor,
        model: torch.nn.Module,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        device: torch.device | str | None = None,
    ) -> BatchClosure:
        """:func:`make_batch_closure` in the research code's argument order, for code written for it.

        The closure's ``outputs`` is the research closure's ``output``; its loss is what ``step`` returns.
        """
        return make_batch_closure(model, loss_function, inputs, targets, device)

    # ------------------------------------------------------------------ parameter groups

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group; only ``weight_decay`` may differ from the first group's settings.

        All groups lie on one line through all parameters, searched with one set of settings.
        """
        param_group = dict(param_group)
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            param_group["params"] = [params]
        elif not isinstance(params, set):  # torch refuses sets with its own message
            param_group["params"] = list(params)
        for p in param_group["params"]:
            if isinstance(p, torch.Tensor) and p.dtype in (torch.bfloat16, torch.float16):
                raise ValueError(
                    f"Invalid parameters: {p.dtype} parameters; LabPal measures loss differences along steps of "
                    f"h = {self.defaults['derivative_step']} · d/‖d‖, below the resolution of {p.dtype}, so it "
                    "needs float32 or float64 parameters; keep them in float32 and run the model under "
                    "torch.autocast for lower-precision arithmetic"
                )
        if "weight_decay" in param_group:
            _require_weight_decay(param_group["weight_decay"])
        reference = self.param_groups[0] if self.param_groups else self.defaults
        different = [
            name for name, value in param_group.items()
            if name not in PER_GROUP_OPTIONS and not _same_setting(value, reference.get(name))
        ]
        if different:
            raise ValueError(
                f"Invalid parameter group: it sets {', '.join(sorted(different))}; LabPal searches one line through "
                "all parameter groups with one set of options, so only weight_decay may differ between groups; "
                "set the others once, as LabPal(..., option=value)"
            )
        if self.param_groups:
            first = self._params()[0]
            for p in param_group["params"]:
                if isinstance(p, torch.Tensor) and (p.device, p.dtype) != (first.device, first.dtype):
                    raise ValueError(
                        f"Invalid parameter group: its parameters are on {p.device}, {p.dtype} and the others on "
                        f"{first.device}, {first.dtype}; LabPal moves all parameters along one line as one vector"
                    )
        torch.optim.Optimizer.add_param_group(self, param_group)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # ------------------------------------------------------------------ public views

    @property
    def scaled_batch_size_schedule(self) -> tuple[tuple[int, int], ...]:
        """The batch-size schedule after scaling by the noise adaptation factor."""
        group = self.param_groups[0]
        factor = noise_adaptation_factor(group["training_set_size"], group["inference_batch_size"])
        return scale_batch_size_schedule(group["batch_size_schedule"], factor)

    @property
    def effective_learning_rate(self) -> torch.Tensor | None:
        """The learning rate of the last training update along the raw direction, a 0-dim device tensor.

        In NSGD mode s̄/‖d‖, which changes with ‖d‖ at every update; in SGD mode λ̄. None before the
        first successful measurement. Reading it as a float waits for the device.
        """
        return self._progress["effective_learning_rate"]

    @property
    def holds_partial_sums(self) -> bool:
        """Whether a training batch or measurement is partly gathered (between update boundaries).

        With several processes each then holds the sums of its own share, so a state saved now by
        one process would not resume the others exactly; at a boundary all hold the same state.
        """
        return not self._at_update_boundary()

    @property
    def summary(self) -> LabPalSummary:
        """What LABPAL is doing now (reading it synchronises with the device once)."""
        progress = self._progress
        group = self.param_groups[0]
        learning_rate = progress["effective_learning_rate"]
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

        The learning rate the last update applied (:attr:`effective_learning_rate`) and the step
        size in use (both absent before the first successful measurement), the last measured ones,
        the training batch size, the counts of measurements, failed measurements and skipped
        updates, and the forward and backward passes since step 0.
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
        progress = {
            key: value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
            for key, value in self._progress.items()
        }
        progress["skipped_updates"] = self._skipped_update_count()
        pending = self._pending_closures
        saveable = all(isinstance(closure, BatchClosure) for closure in pending)
        progress["pending_batches"] = [closure.batch_state() for closure in pending] if saveable else None
        state["lab_pal"] = progress
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state saved by :meth:`state_dict` (also one saved before weight decay existed)."""
        state_dict = dict(state_dict)
        progress = dict(state_dict.pop("lab_pal"))
        skipped_updates = progress.pop("skipped_updates")
        pending_batches = progress.pop("pending_batches")
        super().load_state_dict(state_dict)
        # torch's load_state_dict declares a default of its own optimizers that LabPal has not.
        self.defaults.pop("differentiable", None)
        for group in self.param_groups:
            for name, value in self.defaults.items():
                group.setdefault(name, value)
            group["lr"] = float(group["lr"])
        progress = {**_initial_progress(self.param_groups[0]), **progress}
        progress["step_size_history"] = list(progress["step_size_history"])
        progress["learning_rate_history"] = list(progress["learning_rate_history"])
        first = self._params()[0]
        device = first.device
        if progress["step_size"] is not None and progress["effective_learning_rate"] is None:
            # A state saved before these entries existed: the group's lr was the rate in use.
            progress["learning_rate"] = self.param_groups[0]["lr"]
            progress["effective_learning_rate"] = torch.tensor(self.param_groups[0]["lr"], dtype=first.dtype)
        for key in ("line_losses", "training_loss_sum", "effective_learning_rate", "research_origin_loss"):
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
        """Consume one inference batch through ``closure``; return its loss at the current parameters.

        With a process group, the loss of this process's share of the batch (not averaged over processes).
        """
        self._require_closure(closure)
        self._refuse_learning_rate_controllers()
        progress = self._progress
        if self._saved_pending_batches:
            self._rebind_saved_batches(closure)
        if self.param_groups[0]["research_code_steps"]:
            self._plan_like_research_code()
        elif self._at_update_boundary():
            self._follow_schedule_and_plan()
        if progress["phase"] == MEASURING:
            loss = self._measurement_step(closure)
        else:
            loss = self._training_step(closure)
        progress["steps"] += 1
        return loss

    def _refuse_learning_rate_controllers(self) -> None:
        if getattr(self, "grad_scale", None) is not None:
            # Set by GradScaler.step for this call only; gone, a later plain step(closure) works.
            del self.grad_scale
            self.__dict__.pop("found_inf", None)
            raise ValueError(
                "Invalid use: GradScaler.step(optimizer, closure) with an enabled scaler; LabPal calls backward "
                "itself (there are no scaled gradients to unscale) and skips non-finite updates on its own; call "
                "optimizer.step(closure) directly, with the forward pass under torch.autocast if you like"
            )
        if "initial_lr" in self.param_groups[0]:
            raise ValueError(
                "Invalid use: a learning-rate scheduler is attached to LabPal, which measures its own learning "
                "rate (param_groups' lr only reports it); remove the scheduler, and use batch_size_schedule "
                "where you would decay the learning rate"
            )

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

    def _plan_like_research_code(self) -> None:
        """The research code's timing, checked at every step.

        A switch of the schedule applies only exactly at its step and at an update boundary
        (otherwise it and all later ones are skipped), and starts a measurement even if k stays.
        Measurements start at step 0, when the update count reaches ``untrustworthy_updates + 2``,
        and ``measurement_interval * k`` steps after the last measurement ended, which discards a
        partly gathered training batch.
        """
        progress = self._progress
        group = self.param_groups[0]
        schedule = self.scaled_batch_size_schedule
        position = progress["schedule_position"]
        if position < len(schedule) and schedule[position][0] == progress["steps"] and self._at_update_boundary():
            progress["multiplier"] = schedule[position][1]
            progress["schedule_position"] = position + 1
            self._restart_measurement()
            return
        if progress["phase"] != TRAINING:
            return
        steps_since = progress["steps"] - progress["last_measurement_step"]
        if (
            steps_since // progress["multiplier"] >= group["measurement_interval"]
            or progress["steps"] == 0
            or progress["updates"] == group["untrustworthy_updates"] + 2
        ):
            self._restart_measurement()

    # ------------------------------------------------------------------ closures

    def _closure_loss(self, closure) -> torch.Tensor:
        """The closure's loss with its graph; refuses closures that call backward or return no graph."""
        loss = _call_forward_only(closure)
        # Gradients were set to None before: any now present come from a backward inside the closure.
        if any(p.grad is not None for p in self._params()):
            raise ValueError(_backward_closure_message("it called backward itself"))
        if not isinstance(loss, torch.Tensor):
            raise ValueError(_backward_closure_message(f"it returned a {type(loss).__name__}"))
        if not loss.requires_grad:
            raise ValueError(_backward_closure_message("it returned a loss without a graph (detached)"))
        return loss

    # ------------------------------------------------------------------ training phase

    def _training_step(self, closure) -> torch.Tensor:
        progress = self._progress
        multiplier = progress["multiplier"]
        loss = self._loss_with_gradient(closure, self._progress)
        params_with_grad = [p for p in self._params() if p.grad is not None]
        gradients = [p.grad for p in params_with_grad]
        if self.param_groups[0]["research_code_steps"]:
            return self._training_step_like_research_code(params_with_grad, gradients, loss)
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
        if self._processes > 1:
            # A copy: with k = 1 the loss sum is the loss that step returns, which stays this process's own.
            loss_sum = loss_sum.to(dtype=gradients[0].dtype, copy=True)
            self._sum_over_processes([*gradients, loss_sum])
            # This process's own sum, used up: at the update boundary all processes hold the same state.
            progress["training_loss_sum"] = None
        self._update_parameters(params_with_grad, gradients, loss_sum, 1.0 / (multiplier * self._processes))
        progress["updates"] += 1
        return loss

    def _update_parameters(self, params, gradients, loss_sum, gradient_scale) -> None:
        """One update along the mean gradient plus weight decay, skipped on the device when anything is not finite."""
        group = self.param_groups[0]
        progress = self._progress
        momentum = group["momentum"]
        device = params[0].device
        found_non_finite = (~torch.isfinite(loss_sum)).to(device=device, dtype=torch.float32)
        # The scale is float32 whatever the default dtype: the kernel takes no other.
        torch._amp_foreach_non_finite_check_and_unscale_(
            gradients, found_non_finite, torch.full((), gradient_scale, device=device, dtype=torch.float32)
        )
        self._add_weight_decay(params, gradients)
        buffers = [self._state_tensor(p, "momentum_buffer") for p in params] if momentum > 0 else []
        direction = torch._foreach_add(torch._foreach_mul(buffers, momentum), gradients) if buffers else gradients
        if group["mode"] == "NSGD":
            norm = global_norm(direction)
            learning_rate = progress["step_size"] / torch.clamp_min(norm, torch.finfo(norm.dtype).tiny)
            progress["effective_learning_rate"] = torch.where(
                found_non_finite > 0, progress["effective_learning_rate"], learning_rate
            )
        else:
            learning_rate = progress["learning_rate"]
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

    def _training_step_like_research_code(self, params, gradients, loss) -> torch.Tensor:
        """A training step in the research code's arithmetic (its running mean, norm and update order).

        With momentum and k = 1 it updates the buffer but steps along the raw gradient, as the
        research code does. Non-finite updates are skipped here too, which the research code does not.
        """
        progress = self._progress
        group = self.param_groups[0]
        multiplier, momentum = progress["multiplier"], group["momentum"]
        count = progress["training_batches"] + 1
        progress["training_loss_sum"] = loss.clone() if count == 1 else progress["training_loss_sum"] + loss
        if multiplier > 1:
            means = [self._state_tensor(p, "gradient_sum") for p in params]
            _running_mean_(means, gradients, count)
            gradients = means
        progress["training_batches"] = count % multiplier
        if count < multiplier:
            return loss
        self._add_weight_decay(params, gradients)
        found_non_finite = ~torch.isfinite(progress["training_loss_sum"])
        for gradient in gradients:
            found_non_finite |= ~torch.isfinite(gradient).all()
        direction = gradients
        if momentum > 0:
            buffers = [self._state_tensor(p, "momentum_buffer") for p in params]
            candidate = torch._foreach_add(torch._foreach_mul(buffers, momentum), gradients)
            for buffer, value in zip(buffers, candidate):
                buffer.copy_(torch.where(found_non_finite, buffer, value))
            direction = gradients if multiplier == 1 else buffers
            norm_of = buffers
        else:
            norm_of = gradients
        if group["mode"] == "NSGD":
            norm = _research_code_norm(norm_of)
            norm = torch.where(norm == 0, torch.full_like(norm, group["min_step"]), norm)
            step = progress["step_size"]
            updates = [torch.mul(d.neg(), step) / norm for d in direction]
            progress["effective_learning_rate"] = torch.where(
                found_non_finite, progress["effective_learning_rate"], step / norm
            )
        else:
            updates = [torch.mul(d.neg(), progress["learning_rate"]) for d in direction]
        for p, update in zip(params, updates):
            p.add_(torch.where(found_non_finite, torch.zeros_like(update), update))
        self._count_skipped(found_non_finite.to(torch.float32))
        progress["updates"] += 1
        return loss

    def _add_weight_decay(self, params, gradients) -> None:
        """``gradient += weight_decay · θ``, in place, for the parameters of groups that decay."""
        if not any(group["weight_decay"] for group in self.param_groups):
            return
        decay_of = {p: group["weight_decay"] for group in self.param_groups for p in group["params"]}
        by_decay = {}
        for p, gradient in zip(params, gradients):
            if decay_of[p] != 0:
                by_decay.setdefault(decay_of[p], ([], []))
                by_decay[decay_of[p]][0].append(gradient)
                by_decay[decay_of[p]][1].append(p)
        for decay, (decayed_gradients, decayed_params) in by_decay.items():
            torch._foreach_add_(decayed_gradients, decayed_params, alpha=decay)

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
                    failure = self._set_direction(params)
                    if failure is not None:
                        self._finish_failed_measurement(failure, params, direction_usable=False)
                        return loss.detach()
                    for stored in self._pending_closures:
                        self._measure_on_line(stored, params)
                    self._pending_closures = []
            else:
                loss = _call_forward_only(closure)
                progress["forward_passes"] += 1
                self._add_origin_loss(loss)
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
        self._progress["research_origin_loss"] = None
        self._progress["research_line_losses"] = [[], []]

    def _accumulate_direction_batch(self, params, loss, closure) -> None:
        """Add one direction batch's gradient and loss; keep its closure for the line evaluations."""
        first = self._progress["measurement_batches"] == 0
        if self.param_groups[0]["research_code_steps"]:
            with_gradient = [p for p in params if p.grad is not None]
            if first:
                for p in params:
                    self._state_tensor(p, "direction").zero_()
            means = [self._state_tensor(p, "direction") for p in with_gradient]
            _running_mean_(means, [p.grad for p in with_gradient], self._progress["measurement_batches"] + 1)
            self._add_origin_loss(loss)
            self._pending_closures.append(closure)
            return
        for p in params:
            gradient_sum = self._state_tensor(p, "direction")
            if first:
                gradient_sum.zero_()
            if p.grad is not None:
                gradient_sum.add_(p.grad)
        self._add_origin_loss(loss)
        self._pending_closures.append(closure)

    def _add_origin_loss(self, loss) -> None:
        progress = self._progress
        progress["line_losses"][0] += loss.detach()
        if self.param_groups[0]["research_code_steps"]:
            count = progress["measurement_batches"] + 1
            progress["research_origin_loss"] = running_mean(progress["research_origin_loss"], loss.detach(), count)

    def _set_direction(self, params) -> str | None:
        """Turn the gradient sum into the line direction d; return why the line is unusable, if it is.

        Also records the weight-decay term along the line, ``penalty(t) = A - B t + C t²`` with
        ``A = Σ λ/2 ‖θ_g‖²``, ``B = Σ λ θ_g·d_g/‖d‖`` and ``C = Σ λ/2 ‖d_g‖²/‖d‖²`` over the
        groups g and their weight decays λ, read in the same synchronisation as the norm.
        """
        group = self.param_groups[0]
        multiplier = self._progress["multiplier"]
        momentum = group["momentum"]
        directions = [self._state_tensor(p, "direction") for p in params]
        research_code = group["research_code_steps"]
        if not research_code:  # the research code keeps a running mean instead
            self._sum_over_processes(directions)
            torch._foreach_mul_(directions, 1.0 / (multiplier * self._processes))
        with_gradient = [(p, d) for p, d in zip(params, directions) if p.grad is not None]
        self._add_weight_decay([p for p, _ in with_gradient], [d for _, d in with_gradient])
        mean_gradient = [d.clone() for d in directions] if momentum > 0 else directions
        if momentum > 0:
            buffers = [self._state_tensor(p, "momentum_buffer") for p in params]
            candidate = torch._foreach_add(torch._foreach_mul(buffers, momentum), mean_gradient)
            torch._foreach_copy_(directions, candidate)
        norm = _research_code_norm(directions) if research_code else global_norm(directions)
        safe_norm = torch.clamp_min(norm, torch.finfo(norm.dtype).tiny)
        derivative = -global_dot(mean_gradient, directions) / safe_norm
        penalty = torch.zeros(3, dtype=norm.dtype, device=norm.device)
        for decayed in self.param_groups:
            decay = decayed["weight_decay"]
            if decay != 0 and decayed["params"]:
                decayed_directions = [self._state_tensor(p, "direction") for p in decayed["params"]]
                penalty += torch.stack([
                    decay / 2 * global_norm(decayed["params"]) ** 2,
                    decay * global_dot(decayed["params"], decayed_directions) / safe_norm,
                    decay / 2 * (global_norm(decayed_directions) / safe_norm) ** 2,
                ])
        norm_value, derivative_value, *penalty_terms = torch.cat([torch.stack([norm, derivative]), penalty]).tolist()
        self._progress["direction_norm"] = norm_value
        self._progress["line_penalty"] = penalty_terms
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
        progress = self._progress
        origins = [self._state_tensor(p, "line_origin") for p in params]
        saved_buffers = self._save_buffers()
        if group["research_code_steps"]:
            increments = line_increments(group["derivative_step"], group["sample_step"])
            points = ((1, increments[:1]), (2, increments))
        else:
            points = ((1, group["derivative_step"]), (2, group["sample_step"]))
        for index, position in points:
            self._move_along_direction(params, position)
            loss = _call_forward_only(closure).detach()
            progress["line_losses"][index] += loss
            if group["research_code_steps"]:
                progress["research_line_losses"][index - 1].append(loss.item())
            progress["forward_passes"] += 1
        torch._foreach_copy_(params, origins)
        self._restore_buffers(saved_buffers)

    def _finish_measurement(self, group, params) -> None:
        progress = self._progress
        research_code = group["research_code_steps"]
        positions = (0.0, group["derivative_step"], group["sample_step"])
        decay_offset, decay_slope, decay_curvature = progress["line_penalty"]
        if research_code:
            mean_losses = [progress["research_origin_loss"].item(), *map(numpy_mean, progress["research_line_losses"])]
        else:
            self._sum_over_processes([progress["line_losses"]])
            mean_losses = (progress["line_losses"] / (progress["measurement_batches"] * self._processes)).tolist()
        losses = [
            loss + decay_offset - decay_slope * x + decay_curvature * x * x for loss, x in zip(mean_losses, positions)
        ]
        parabola = (fit_parabola_like_research_code if research_code else fit_parabola)(positions, tuple(losses))
        if not all(map(math.isfinite, losses)):
            failure = "non-finite line loss ({}, {}, {})".format(*losses)
        elif not parabola.curvature > 0:
            failure = f"line is not convex (curvature {parabola.curvature:.3g})"
        elif not parabola.slope < 0:
            failure = f"loss does not decrease along the line (slope {parabola.slope:.3g})"
        else:
            failure = None
        if failure is not None:
            self._finish_failed_measurement(failure, params, direction_usable=True)
            return
        direction_norm = progress["direction_norm"]
        if research_code:
            step, learning_rate = self._research_code_step(group, parabola.minimum_position, direction_norm, params)
        else:
            step = max(min(parabola.minimum_position, group["max_step"]) * group["step_adaptation"], group["min_step"])
            learning_rate = step / direction_norm
        progress["measurements"] += 1
        progress["last_measured_step"] = step
        progress["last_measured_learning_rate"] = learning_rate
        averaged_from = group["untrustworthy_updates"] + (2 if research_code else 0)
        if progress["updates"] >= averaged_from:
            window = group["averaging_window"]
            progress["step_size_history"] = (progress["step_size_history"] + [step])[-window:]
            progress["learning_rate_history"] = (progress["learning_rate_history"] + [learning_rate])[-window:]
            mean = numpy_mean if research_code else _mean
            step = mean(progress["step_size_history"])
            learning_rate = mean(progress["learning_rate_history"])
        progress["step_size"] = step
        progress["learning_rate"] = learning_rate
        for each in self.param_groups:
            each["lr"] = learning_rate
        # The research code moves by the step size s̄ along d/‖d‖ in both modes.
        if research_code:
            self._move_along_direction(params, line_increments(group["derivative_step"], group["sample_step"], step))
        else:
            self._move_along_direction(params, step if group["mode"] == "NSGD" else learning_rate * direction_norm)
        self._count_measurement_update()
        training_learning_rate = step / direction_norm if group["mode"] == "NSGD" else learning_rate
        self._set_effective_learning_rate(params, training_learning_rate)
        self._report_measurement(training_learning_rate, step)
        self._end_measurement()

    def _research_code_step(self, group, minimum_position, direction_norm, params) -> tuple[float, float]:
        """The research code's step and learning rate, in its float32 arithmetic.

        Its clip assigns the stored cap to the step and then multiplies the step by α in place,
        so every clipped measurement also multiplies the cap by α.
        """
        progress = self._progress
        cap = torch.tensor(progress["research_step_cap"], dtype=torch.float32)
        adaptation = torch.tensor(group["step_adaptation"], dtype=torch.float32)
        if minimum_position > cap:
            cap *= adaptation
            progress["research_step_cap"] = cap.item()
            step = cap.item()
        else:
            step = (minimum_position * adaptation).item()
        step = max(step, group["min_step"])
        norm = torch.tensor(direction_norm, dtype=params[0].dtype)
        learning_rate = max((step / norm).item(), group["min_step"])
        return step, learning_rate

    def _move_along_direction(self, params, position: float | list[float]) -> None:
        """Put the parameters at ``origin - position · d/‖d‖``.

        A list of positions is the research code's way there: one in-place move
        ``θ += (increment · -d) / ‖d‖`` per increment, rounded as it rounds.
        """
        origins = [self._state_tensor(p, "line_origin") for p in params]
        directions = [self._state_tensor(p, "direction") for p in params]
        norm = self._progress["direction_norm"]
        torch._foreach_copy_(params, origins)
        if isinstance(position, list):
            for increment in position:
                torch._foreach_add_(params, torch._foreach_div(torch._foreach_mul(directions, -increment), norm))
        else:
            torch._foreach_add_(params, directions, alpha=-position / norm)

    def _count_measurement_update(self) -> None:
        self._progress["updates"] += 1
        self._progress["last_measurement_step"] = self._progress["steps"]

    def _set_effective_learning_rate(self, params, learning_rate: float) -> None:
        self._progress["effective_learning_rate"] = torch.tensor(
            learning_rate, dtype=params[0].dtype, device=params[0].device
        )

    def _finish_failed_measurement(self, failure: str, params, direction_usable: bool) -> None:
        """Keep the previous values and the parameters; measure again at once if there is no value yet.

        With ``research_code_steps`` a failed fit (``direction_usable``) moves by the previous step
        along the new direction, and a refused direction measures again at once.
        """
        progress = self._progress
        research_code = self.param_groups[0]["research_code_steps"]
        progress["failed_measurements"] += 1
        progress["last_failure"] = failure
        self._report_failure(f"measurement failed: {failure}")
        origins = [self._state_tensor(p, "line_origin") for p in params]
        torch._foreach_copy_(params, origins)
        if progress["step_size"] is None or (research_code and not direction_usable):
            self._restart_measurement()
        elif research_code:
            group = self.param_groups[0]
            increments = line_increments(group["derivative_step"], group["sample_step"], progress["step_size"])
            self._move_along_direction(params, increments)
            self._count_measurement_update()
            if self.param_groups[0]["mode"] == "NSGD":
                self._set_effective_learning_rate(params, progress["step_size"] / progress["direction_norm"])
            self._end_measurement()
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
        self._clear_measurement()

    def _restart_measurement(self) -> None:
        self._progress["phase"] = MEASURING
        self._progress["measurement_batches"] = 0
        self._progress["training_batches"] = 0
        self._clear_measurement()

    def _clear_measurement(self) -> None:
        self._pending_closures = []
        for p in self._params():
            self.state[p].pop("line_origin", None)
            self.state[p].pop("direction", None)

    # ------------------------------------------------------------------ helpers

    def _sum_over_processes(self, tensors: list[torch.Tensor]) -> None:
        """Replace ``tensors`` (one dtype and device) by their sums over the process group, in one all-reduce."""
        if self._processes == 1:
            return
        flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self._process_group)
        sums = flat.split([tensor.numel() for tensor in tensors])
        torch._foreach_copy_(tensors, [total.view_as(tensor) for total, tensor in zip(sums, tensors)])

    def _count_skipped(self, found_non_finite: torch.Tensor) -> None:
        if self._skipped_updates is None:
            self._skipped_updates = torch.zeros((), device=found_non_finite.device, dtype=torch.float32)
        self._skipped_updates += found_non_finite

    def _skipped_update_count(self) -> int:
        return 0 if self._skipped_updates is None else int(self._skipped_updates.item())


def _initial_progress(settings: dict) -> dict:
    return dict(
        phase=MEASURING,
        steps=0,
        updates=0,
        multiplier=1,
        measurement_batches=0,
        training_batches=0,
        next_measurement_update=0,
        step_size=None,
        learning_rate=None,
        effective_learning_rate=None,
        last_measured_step=None,
        last_measured_learning_rate=None,
        step_size_history=[],
        learning_rate_history=[],
        measurements=0,
        failed_measurements=0,
        last_failure=None,
        direction_norm=None,
        line_penalty=[0.0, 0.0, 0.0],
        line_losses=None,
        research_origin_loss=None,
        research_line_losses=[[], []],
        training_loss_sum=None,
        forward_passes=0,
        backward_passes=0,
        last_measurement_step=0,
        schedule_position=0,
        research_step_cap=settings["max_step"],
    )


def _process_count(process_group) -> int:
    """How many processes ``process_group`` joins; 1 for None."""
    if process_group is None:
        return 1
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"Invalid process_group: {process_group!r} while torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (torchrun's processes), or pass process_group=None"
        )
    processes = dist.get_world_size(process_group)
    require(processes >= 1, "process_group", process_group, "a group this process belongs to")
    return processes


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _running_mean_(means: list[torch.Tensor], values: list[torch.Tensor], count: int) -> None:
    """``mean ← mean·(c-1)/c + value/c`` in place, the research code's average of k gradients."""
    for mean, value in zip(means, values):
        mean.copy_(mean * (count - 1) / count + 1 / count * value)


def _research_code_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The norm as the research code sums it: one dot product per tensor, added in order."""
    total = torch.dot(tensors[0].reshape(-1), tensors[0].reshape(-1))
    for tensor in tensors[1:]:
        total = total + torch.dot(tensor.reshape(-1), tensor.reshape(-1))
    return torch.sqrt(total)


def _call_forward_only(closure) -> torch.Tensor:
    """``closure()``, with a closure that calls backward under ``no_grad`` named as such."""
    try:
        return closure()
    except RuntimeError as error:
        if "does not require grad" in str(error):
            raise ValueError(_backward_closure_message("it called backward")) from error
        raise


def _backward_closure_message(what: str) -> str:
    return (
        f"Invalid closure: {what}; LabPal's closure must only compute and return the batch's loss tensor "
        "(forward only, no zero_grad, no backward, no .item()): LabPal calls backward itself and evaluates "
        "the batch again at other parameters; build it with make_batch_closure(model, loss_function, "
        "inputs, targets, device)"
    )


def _require_weight_decay(weight_decay) -> None:
    require(
        isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool) and 0 <= weight_decay < math.inf,
        "weight_decay", weight_decay, "a number >= 0",
    )


def _same_setting(first, second) -> bool:
    try:
        return bool(first == second)
    except (TypeError, RuntimeError):
        return first is second


def _float32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


def _autocast_disabled(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)
