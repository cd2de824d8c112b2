"""PAL: the Parabolic Approximation Line Search, one extra forward pass per step."""

from collections.abc import Iterable

import torch

from .line_search import (
    MEAN_LOSS,
    LineSearchBase,
    global_dot,
    global_norm,
    is_finite_number,
    log_values_known,
    require,
)

__all__ = ["Pal", "pal_step_size"]


class Pal(LineSearchBase):
    r"""Parabolic Approximation Line Search (PAL).

    Mutschler and Zell, "Parabolic Approximation Line Search for DNNs", NeurIPS 2020.

    Every call of :meth:`step` takes one batch through ``closure`` (forward only; PAL
    calls ``backward`` itself) and makes one update:

    1. L0 and the gradient g at the current parameters θ (one forward and backward pass).
    2. The line direction d = β d_prev + g (``conjugate_gradient_factor`` β; β = 0
       gives d = g), its norm ‖d‖ (an exact 0 is replaced by the dtype's machine
       epsilon) and the directional derivative along -d/‖d‖, b = -g·d / ‖d‖
       (``exact_directional_derivative``) or the approximation b = -‖d‖. For β = 0
       both are -‖g‖, which is then used without the extra dot product.
    3. Lμ at θ - μ d/‖d‖ (one forward pass, ``measuring_step`` μ) and the curvature of
       the parabola through (0, L0) with slope b and through (μ, Lμ):
       a = (Lμ - L0 - b μ) / μ².
    4. The step s along the line: -b / (2a) · α if a > 0 and b < 0
       (``update_step_adaptation`` α); μ if a <= 0 and b < 0; 0 otherwise; then
       s = min(s, ``max_step``).
    5. θ ← θ - s d/‖d‖, taken from the saved θ, so the measuring point leaves no
       rounding behind. The learning rate (the step per unit of gradient) is s/‖d‖,
       and d becomes d_prev of the next step.

    A step fails when L0, Lμ, a, b or ‖d‖ is not finite: the parameters and the
    conjugate direction stay as they were (no non-finite value is ever written into
    them) and the step counts in ``log_values()["failed_steps"]``. The step size is
    chosen on the device with ``torch.where``, so :meth:`step` never waits for the
    device; for the same reason failures are counted there rather than reported by
    :meth:`take_events`, which returns nothing.

    Defaults: α = 1.66 and μ = 1.0 are the values of the LABPAL paper's comparison
    (Mutschler, Laube and Zell 2021); ``max_step`` 3.16 and β = 0.4 are PAL's own
    defaults from its authors' code.

    Differences from the authors' code, on purpose: after a non-finite value it left
    the parameters at the measuring point, here they stay at θ; its measuring forward
    pass moved BatchNorm statistics, here they are restored; it reached θ - s d/‖d‖
    through the measuring point, and a clipped step took s - μ in float32, its
    settings' precision (a relative 1e-8 off), here the step is taken from θ.

    Closure contract: ``closure()`` returns the batch's mean loss, forward only, and
    gives the same loss when called again at the same parameters. PAL calls it twice
    per step, at θ and at the measuring point. A plain function works for models
    without randomness; with dropout build closures with :func:`make_batch_closure`,
    which replays the first call's random state, so both evaluations see the same
    masks. The measuring point has no side effects: pass ``buffers=model.buffers()``
    and the buffers (BatchNorm running statistics) are put back after its forward
    pass, so after a step they are those of one training forward pass of the batch.

    Parameters without a gradient after ``backward`` are left alone, as in torch's
    SGD. All parameters must share one device and dtype, and there is one parameter
    group: the line search runs along the direction of all parameters together
    (:class:`~source.optimizer.line_search.LineSearchBase` checks both).
    ``param_groups[0]["lr"]`` holds the last learning rate s/‖d‖ as a 0-dim tensor
    (read it as a float only at log time: that waits for the device); it is an
    output, so setting it has no effect.

    Memory: a copy of the parameters (the line origin) during a step, and with β > 0
    the conjugate direction in the state and the new direction during a step.

    Example:
        >>> optimizer = Pal(model.parameters(), buffers=model.buffers())
        >>> for inputs, targets in loader:
        ...     closure = make_batch_closure(model, loss_function, inputs, targets, device)
        ...     loss = optimizer.step(closure)
    """

    closure_loss = MEAN_LOSS

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        *,
        measuring_step: float = 1.0,
        max_step: float = 3.16,
        conjugate_gradient_factor: float = 0.4,
        update_step_adaptation: float = 1.66,
        exact_directional_derivative: bool = True,
        buffers: Iterable[torch.Tensor] | None = None,
    ):
        require(is_finite_number(measuring_step) and measuring_step > 0, "measuring_step", measuring_step,
                "a finite number > 0")
        require(is_finite_number(max_step) and max_step > 0, "max_step", max_step, "a finite number > 0")
        require(
            isinstance(conjugate_gradient_factor, (int, float)) and 0 <= conjugate_gradient_factor < 1,
            "conjugate_gradient_factor", conjugate_gradient_factor, "in [0, 1)",
        )
        require(is_finite_number(update_step_adaptation) and update_step_adaptation > 0, "update_step_adaptation",
                update_step_adaptation, "a finite number > 0")
        require(isinstance(exact_directional_derivative, bool), "exact_directional_derivative",
                exact_directional_derivative, "True or False")
        defaults = dict(
            lr=0.0,
            measuring_step=float(measuring_step),
            max_step=float(max_step),
            conjugate_gradient_factor=float(conjugate_gradient_factor),
            update_step_adaptation=float(update_step_adaptation),
            exact_directional_derivative=exact_directional_derivative,
        )
        super().__init__(params, defaults, buffers)
        self._progress = _initial_progress()

    # ------------------------------------------------------------------ reporting

    def log_values(self) -> dict[str, float]:
        """Learning rate and step size of the last step (none before the first), passes, failed steps (waits)."""
        progress = self._progress
        return log_values_known({
            "learning_rate": self.param_groups[0]["lr"],
            "step_size": progress["step_size"],
            "forward_passes": progress["forward_passes"],
            "backward_passes": progress["backward_passes"],
            "failed_steps": progress["failed_steps"],
        })

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The optimizer state with PAL's counters and last values (waits for the device)."""
        state = super().state_dict()
        for group in state["param_groups"]:
            group["lr"] = float(group["lr"])
        progress = self._progress
        step_size = progress["step_size"]
        state["pal"] = {
            "forward_passes": progress["forward_passes"],
            "backward_passes": progress["backward_passes"],
            "failed_steps": int(progress["failed_steps"]),
            "step_size": float(step_size) if step_size is not None else None,
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        state_dict = dict(state_dict)
        saved = dict(state_dict.pop("pal"))
        super().load_state_dict(state_dict)
        self._progress = _initial_progress()
        self._progress.update(saved)

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure) -> torch.Tensor:
        """One PAL update on the batch of ``closure``; return its loss at the parameters before the update."""
        self._require_closure(closure)
        group = self.param_groups[0]
        progress = self._progress
        loss_0 = self._loss_with_gradient(closure, progress)  # step 1
        params = [p for p in self._params() if p.grad is not None]
        if not params:
            raise ValueError("Invalid closure: its loss has no gradient for any of the optimizer's parameters")
        directions, norm, derivative = self._line_direction(group, params)
        direction_failed = ~(torch.isfinite(norm) & torch.isfinite(derivative) & torch.isfinite(loss_0))
        loss_mu = self._loss_at_measuring_point(closure, params, directions, norm, direction_failed)

        step_size, failed = pal_step_size(
            loss_0, loss_mu, derivative, group["measuring_step"], group["update_step_adaptation"], group["max_step"]
        )
        failed = failed | direction_failed
        learning_rate = torch.where(failed, 0.0, step_size / norm)
        _move_along(params, directions, learning_rate, failed)
        if group["conjugate_gradient_factor"] > 0:
            for kept, new in zip((self.state[p]["conjugate_direction"] for p in params), directions):
                torch.where(failed, kept, new, out=kept)

        group["lr"] = learning_rate
        progress["step_size"] = step_size
        progress["failed_steps"] = progress["failed_steps"] + failed.to(torch.int64)
        return loss_0

    def _line_direction(self, group, params) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Step 2: the direction d (stored as the conjugate direction only after the step), ‖d‖ and the slope b."""
        gradients = [p.grad for p in params]
        momentum = group["conjugate_gradient_factor"]
        if momentum > 0:
            previous = [self._state_tensor(p, "conjugate_direction") for p in params]
            directions = torch._foreach_add(gradients, previous, alpha=momentum)
        else:
            directions = gradients
        norm = global_norm(directions)
        norm = torch.where(norm == 0, torch.finfo(norm.dtype).eps, norm)
        if momentum > 0 and group["exact_directional_derivative"]:
            derivative = -global_dot(gradients, directions) / norm
        else:
            derivative = -norm
        return directions, norm, derivative

    def _loss_at_measuring_point(self, closure, params, directions, norm, skip) -> torch.Tensor:
        """Step 3: Lμ at θ - μ d/‖d‖ (forward only); parameters and buffers are put back exactly."""
        origins = [p.clone() for p in params]
        saved_buffers = self._save_buffers()
        # Skipped for a non-finite direction, so not even the measuring point holds a non-finite value.
        _move_along(params, directions, self.param_groups[0]["measuring_step"] / norm, skip)
        loss = closure().detach()
        self._progress["forward_passes"] += 1
        torch._foreach_copy_(params, origins)
        self._restore_buffers(saved_buffers)
        return loss


def pal_step_size(
    loss_0: torch.Tensor,
    loss_mu: torch.Tensor,
    derivative: torch.Tensor,
    measuring_step: float,
    step_adaptation: float,
    max_step: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PAL's step along the line from L(0), L(μ) and the slope b at 0, and whether the inputs failed.

    Returns ``(s, failed)`` as 0-dim tensors, computed without leaving the device:
    s = min(-b / (2a) · α, s_max) on a convex descending line, min(μ, s_max) on a
    concave descending one, 0 when the line does not descend, and 0 with
    ``failed`` true when a loss, the slope or the curvature is not finite.
    """
    curvature = (loss_mu - loss_0 - derivative * measuring_step) / measuring_step**2
    failed = ~(torch.isfinite(loss_0) & torch.isfinite(loss_mu) & torch.isfinite(derivative)
               & torch.isfinite(curvature))
    descending = derivative < 0
    convex_step = -derivative / (2 * curvature) * step_adaptation
    step = torch.where(curvature > 0, convex_step, measuring_step)
    step = torch.where(descending & ~failed, torch.clamp_max(step, max_step), 0.0)
    return step, failed


def _move_along(params, directions, scale: torch.Tensor, skip: torch.Tensor) -> None:
    """θ ← θ - scale · d in one fused kernel, or nothing when ``skip`` is true, decided on the device."""
    torch._fused_sgd_(
        params,
        directions,
        [],
        weight_decay=0.0,
        momentum=0.0,
        lr=scale,
        dampening=0.0,
        nesterov=False,
        maximize=False,
        is_first_step=False,
        grad_scale=None,
        found_inf=skip.to(torch.float32),
    )


def _initial_progress() -> dict:
    # failed_steps and step_size are 0-dim device tensors during training, so steps never wait for the device.
    return dict(forward_passes=0, backward_passes=0, failed_steps=0, step_size=None)

