"""LABPAL: the Large-Batch Parabolic Approximation Line Search optimizer."""

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .batch_schedule import (
    PAPER_BATCH_SIZE_SCHEDULE,
    REFERENCE_INFERENCE_BATCH_SIZE,
    REFERENCE_TRAINING_SET_SIZE,
    noise_adaptation_factor,
    scale_batch_size_schedule,
    validate_batch_size_schedule,
)
from .closure import MEAN_LOSS, BatchClosure, call_forward_only, forward_only_message, make_batch_closure
from .line_search_base import LineSearchBase, log_values_known, require, require_integer
from .progress import MEASURING, LabPalProgress
from .research_code import ResearchCodeSteps
from .steps import LabPalSteps

__all__ = ["LabPal", "LabPalSummary"]

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

    Mutschler, Laube and Zell, "Using a one dimensional parabolic model of the full-batch loss to
    estimate learning rates during training", arXiv 2108.13880. Each :meth:`step` consumes one
    *inference batch* (size b) through a closure; a *training batch* is k of them (k, the batch
    multiplier, follows the batch-size schedule), so it can exceed what fits in memory.

    1. **Measure** at step 0, after ``untrustworthy_updates`` updates, whenever k changes and every
       ``measurement_interval`` updates, over ``approximation_batches * k`` inference batches:
       the first k give the mean gradient g (plus ``weight_decay · θ``) and the direction d (g, or
       ``momentum · buffer + g``); every batch is evaluated at θ, ``θ - h d/‖d‖`` and
       ``θ - μ d/‖d‖`` (plus the L2 term there); the parabola through the mean losses gives the
       minimum s*, and the step ``s = max(α · min(s*, max_step), min_step)``, ``λ = s / ‖d‖``.
       The parameters move by s along d/‖d‖ (NSGD) or λ along d (SGD).
    2. **Fail** a measurement, keeping the previous values and the parameters, when ‖d‖ is not
       finite or outside [``min_direction_norm``, ``max_direction_norm``], the slope along -d is
       not negative, a line loss is not finite or the parabola is not convex and descending;
       without a previous value the next batches measure again.
    3. **Average** the measurements after ``untrustworthy_updates`` updates over the last
       ``averaging_window`` ones: s̄ and λ̄ (earlier ones are used as they are).
    4. **Train** between measurements, one update per k inference batches along the mean gradient
       plus weight decay (through the momentum buffer): NSGD ``θ ← θ - s̄ d/‖d‖``, SGD
       ``θ ← θ - λ̄ d``. A non-finite loss or gradient skips the update on the device.
    5. **Schedule** k instead of decaying the learning rate: the multipliers of
       ``batch_size_schedule`` are scaled by ``f = (128 / b) · (training_set_size / 40000)`` as
       ``max(int(k f), 1)``; a switch takes effect at the next update boundary and measures anew.

    The closure evaluates one fixed batch forward only (build it with :func:`make_batch_closure`);
    LABPAL calls ``backward`` itself and evaluates the first k closures again. Evaluations away
    from the iterate restore the parameters bitwise and the ``buffers`` (BatchNorm statistics);
    line losses are measured without autocast, so parameters must be float32 or float64. With a
    ``process_group`` every process takes an equal share of each batch and all follow the global
    mean in lock-step, with one all-reduce per update, one per measurement direction and one per
    measured line. LABPAL sets its own learning rate: schedulers and an enabled ``GradScaler`` are
    refused. The README describes closures, processes, memory and the research-code switch in full.

    Args:
        params: the parameters, or parameter groups that may differ only in ``weight_decay``.
        mode: ``"NSGD"`` (steps of s̄ along d/‖d‖) or ``"SGD"`` (steps of λ̄ along d).
        step_adaptation: α, the factor on the parabola's minimum.
        max_step: the largest minimum position taken from a parabola.
        min_step: ε, the smallest step.
        momentum: the momentum of the direction, in [0, 1).
        weight_decay: the L2 factor, added to gradients and line losses.
        measurement_interval: updates between measurements.
        approximation_batches: inference batches per measurement, in units of k.
        untrustworthy_updates: updates before measurements are averaged.
        averaging_window: the number of measurements averaged.
        sample_step: μ, the far point on the line.
        derivative_step: h, the near point on the line.
        min_direction_norm: the smallest usable ‖d‖.
        max_direction_norm: the largest usable ‖d‖.
        batch_size_schedule: (step, k) pairs, steps counting inference batches, or "step:k, ..." text.
        training_set_size: N, for the noise adaptation factor.
        inference_batch_size: b, for the noise adaptation factor.
        research_code_steps: take the research code's steps bit for bit (``research_code.ResearchCodeSteps``).
        buffers: the model's buffers, restored after evaluations away from the iterate.
        process_group: the processes that train together (one process: None).

    Example:
        >>> optimizer = LabPal(model.parameters(), buffers=model.buffers(),
        ...                    training_set_size=len(train_set), inference_batch_size=128)
        >>> for inputs, targets in loader:
        ...     loss = optimizer.step(make_batch_closure(model, loss_function, inputs, targets, device))
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
        self._saved_pending_batches = []  # from load_state_dict, rebound to the next closure's model
        self.progress = LabPalProgress(research_step_cap=defaults["max_step"])
        self._steps = self._steps_for(research_code_steps)

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
        return self.progress.effective_learning_rate

    @property
    def holds_partial_sums(self) -> bool:
        """Whether a training batch or measurement is partly gathered (between update boundaries).

        With several processes each then holds the sums of its own share, so a state saved now by
        one process would not resume the others exactly; at a boundary all hold the same state.
        """
        return not self.progress.at_update_boundary()

    @property
    def summary(self) -> LabPalSummary:
        """What LABPAL is doing now (reading it synchronises with the device once)."""
        progress = self.progress
        learning_rate = progress.effective_learning_rate
        return LabPalSummary(
            phase=progress.phase,
            batch_multiplier=progress.multiplier,
            training_batch_size=progress.multiplier * self.param_groups[0]["inference_batch_size"],
            step_size=progress.step_size,
            learning_rate=float(learning_rate) if learning_rate is not None else None,
            last_measured_step=progress.last_measured_step,
            last_measured_learning_rate=progress.last_measured_learning_rate,
            measurements=progress.measurements,
            failed_measurements=progress.failed_measurements,
            last_failure=progress.last_failure,
            skipped_updates=progress.skipped_update_count(),
            steps=progress.steps,
            updates=progress.updates,
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
            "forward_passes": self.progress.forward_passes,
            "backward_passes": self.progress.backward_passes,
        }
        return log_values_known(values)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """torch's optimizer state with LABPAL's :class:`LabPalProgress` under ``"lab_pal"``.

        While a measurement with k > 1 gathers its direction batches, the state holds those batches
        (from closures made by ``make_batch_closure``), and the resumed optimizer replays them
        through the model and loss of the first closure it is given. Plain closures cannot be
        saved: the resumed optimizer then starts that measurement afresh.
        """
        state = super().state_dict()
        pending = self._steps.pending_closures
        saveable = all(isinstance(closure, BatchClosure) for closure in pending)
        state["lab_pal"] = {
            **self.progress.to_dict(),
            "pending_batches": [closure.batch_state() for closure in pending] if saveable else None,
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state saved by :meth:`state_dict` (also one saved before weight decay existed)."""
        state_dict = dict(state_dict)
        saved = dict(state_dict.pop("lab_pal"))
        pending_batches = saved.pop("pending_batches")
        super().load_state_dict(state_dict)
        # torch's load_state_dict declares a default of its own optimizers that LabPal has not.
        self.defaults.pop("differentiable", None)
        for group in self.param_groups:
            for name, value in self.defaults.items():
                group.setdefault(name, value)
            group["lr"] = float(group["lr"])
        group = self.param_groups[0]
        first = self._params()[0]
        progress = LabPalProgress.from_dict(saved, max_step=group["max_step"], device=first.device)
        if progress.step_size is not None and progress.effective_learning_rate is None:
            # A state saved before these entries existed: the group's lr was the rate in use.
            progress.learning_rate = group["lr"]
            progress.effective_learning_rate = torch.tensor(group["lr"], dtype=first.dtype, device=first.device)
        self.progress = progress
        self._steps = self._steps_for(group["research_code_steps"])
        self._saved_pending_batches = pending_batches or []
        if pending_batches is None:
            self._steps.restart_measurement()

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure) -> torch.Tensor:
        """Consume one inference batch through ``closure``; return its loss at the current parameters.

        With a process group, the loss of this process's share of the batch (not averaged over processes).
        """
        self._require_closure(closure)
        self._refuse_learning_rate_controllers()
        if self._saved_pending_batches:
            self._rebind_saved_batches(closure)
        self._steps.plan()
        if self.progress.phase == MEASURING:
            loss = self._steps.measure(closure)
        else:
            loss = self._steps.train(closure)
        self.progress.steps += 1
        return loss

    def _steps_for(self, research_code_steps: bool) -> LabPalSteps:
        steps_class = ResearchCodeSteps if research_code_steps else LabPalSteps
        return steps_class(self, self._process_group, self._processes)

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
            self._steps.pending_closures = [closure.for_batch(state) for state in self._saved_pending_batches]
        else:
            self._steps.restart_measurement()
        self._saved_pending_batches = []

    def _closure_loss(self, closure) -> torch.Tensor:
        """The closure's loss with its graph; refuses closures that call backward or return no graph."""
        loss = call_forward_only(closure)
        # Gradients were set to None before: any now present come from a backward inside the closure.
        if any(p.grad is not None for p in self._params()):
            raise ValueError(forward_only_message("it called backward itself"))
        if not isinstance(loss, torch.Tensor):
            raise ValueError(forward_only_message(f"it returned a {type(loss).__name__}"))
        if not loss.requires_grad:
            raise ValueError(forward_only_message("it returned a loss without a graph (detached)"))
        return loss


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
