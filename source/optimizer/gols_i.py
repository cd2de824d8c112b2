"""GOLS-I: the inexact gradient-only line search, one mini-batch per evaluation."""

import math
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

__all__ = ["GolsI"]

# Where the parameters stand between two calls of ``step``.
AT_ORIGIN = "origin"  # at the iterate x_n; the next batch gives the direction of a new line
FIRST_TRIAL = "first_trial"  # at x_n + α d with the carried-over α
GROWING = "growing"  # at x_n + α d after α was multiplied by η
SHRINKING = "shrinking"  # at x_n + α d after α was divided by η

# What a trial's directional derivative decides.
ACCEPTED = "accepted"
AT_BOUND = "at_bound"
CONTINUE = "continue"


class GolsI(LineSearchBase):
    r"""Inexact Gradient-Only Line Search (GOLS-I).

    D. Kafka and D. N. Wilke, "Resolving learning rates adaptively by locating
    stochastic non-negative associated gradient projection points using line
    searches", Journal of Global Optimization 79 (2021); arXiv 1903.09383.

    The search looks only at the sign of the directional derivative
    F'(α) = g(x_n + α d)·d/‖d‖ along the line, never at loss values, and
    evaluates every point on a newly sampled mini-batch: each call of
    :meth:`step` takes one batch and makes exactly one forward and one backward
    pass at the parameters it is given. The algorithm:

    1. **Direction**: at the iterate x_n the batch's gradient g gives
       d = −g, or d = β d_prev − g with ``momentum`` β > 0 (replaced by −g when
       it is not a descent direction), and F'(0) = g·d/‖d‖.
    2. **Bounds**: α_max = min(1/‖d‖, ``max_step_size``), so no step is longer
       than 1, and α_min = ``min_step_size`` (α_min wins if ‖d‖ > 1/α_min). The
       step size α (``initial_step_size`` on the first line, afterwards the one
       the previous line ended with) is clipped to [α_min, α_max], and the
       parameters move to the first trial point x_n + α d.
    3. **First trial**: the next batch's gradient there gives F'(α). Accept α
       when 0 < F'(α) < c |F'(0)| (c = ``c``) or F'(α) = 0; otherwise shrink
       if F'(α) > 0 (past the sign change) and grow if F'(α) < 0.
    4. **Grow** α ← η α (η = ``eta``) and evaluate at x_n + α d, until
       F'(α) ≥ 0; **shrink** α ← α / η likewise until F'(α) < 0. Either way the
       sign change lies between the accepted α and its neighbour a factor η
       away, so on a convex line α is within a factor η of the line minimum.
    5. **Bound**: when the next α would leave [α_min, α_max] the search stops
       at the current α, accepts it and reports a ``"failure"`` event (no sign
       change inside the bounds).
    6. **Accept**: x_{n+1} = x_n + α d is where the parameters already are.
       The gradient just computed there, on a fresh batch, is the gradient at
       x_{n+1} that step 1 needs, so it starts the next line at once: no
       extra evaluation.

    A non-finite loss or gradient at a trial point abandons the line: the
    parameters return to x_n, α ← max(α / η, α_min), and the next batch starts
    a new line at x_n; at x_n itself the parameters stay. Both report a
    ``"failure"`` event; the parameters only ever hold x_n or a trial point
    computed from finite values.

    Differences from the research code used in the LABPAL paper (its
    ``GOLSI`` class): there, the grow and shrink phases change α but never
    move the parameters, so every sign after the first trial is measured at
    the first trial point and the next iterate is always x_n + α_0 d; its
    directional derivative has the opposite sign (−g·d/‖d‖), so it shrinks
    while the loss still descends; it starts shrinking only below α_max and
    growing only above α_min, so a first trial at a bound is accepted with
    either sign; and it spends one more batch per line, evaluating x_{n+1}
    again for the next direction. The gradient reused here is the one whose
    sign ended the search: with noisy batches the next direction is thereby
    conditioned on that sign, which the extra batch would avoid.

    Defaults are the LABPAL paper's legend (c 0.9, η 2.0, α 1e-4, β 0) and the
    GOLS-I paper's α_min = 1e-8 and α_max ≤ 1e7.

    Closure contract: ``closure()`` evaluates the mean loss of one batch, forward
    only; GOLS-I calls ``backward`` and ``zero_grad`` itself and calls each
    closure once, so plain functions work as well as closures made by
    :func:`~source.optimizer.lab_pal.make_batch_closure`. ``step`` returns the
    batch loss at the parameters it was given: between two calls the model holds
    the point the next batch evaluates (x_n or a trial point).

    Pass ``buffers=model.buffers()`` and the buffers (BatchNorm running
    statistics) changed by an evaluation are kept only when its point becomes
    the iterate (an accepted trial, or x_n itself) and its loss and gradient
    are finite; otherwise they are put back.

    ``param_groups[0]["lr"]`` is the last accepted α (``initial_step_size``
    before the first line ends): with β = 0 the update is x_n − α g, so α is the
    learning rate. The decisions read F' on the host, which waits for the
    device once per step (twice when a line ends). All parameters share one
    device and dtype, and there is one parameter group
    (:class:`~source.optimizer.line_search.LineSearchBase` checks both).

    Example:
        >>> optimizer = GolsI(model.parameters(), buffers=model.buffers())
        >>> for inputs, targets in loader:
        ...     closure = make_batch_closure(model, loss_function, inputs, targets, device)
        ...     loss = optimizer.step(closure)
    """

    closure_loss = MEAN_LOSS

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        initial_step_size: float = 1e-4,
        *,
        c: float = 0.9,
        eta: float = 2.0,
        momentum: float = 0.0,
        min_step_size: float = 1e-8,
        max_step_size: float = 1e7,
        buffers: Iterable[torch.Tensor] | None = None,
    ):
        require(is_finite_number(initial_step_size) and initial_step_size > 0, "initial_step_size",
                initial_step_size, "> 0")
        require(is_finite_number(c) and 0 < c < 1, "c", c, "in (0, 1)")
        require(is_finite_number(eta) and eta > 1, "eta", eta, "> 1")
        require(is_finite_number(momentum) and 0 <= momentum < 1, "momentum", momentum, "in [0, 1)")
        require(is_finite_number(min_step_size) and min_step_size > 0, "min_step_size", min_step_size, "> 0")
        require(is_finite_number(max_step_size) and max_step_size > min_step_size, "max_step_size",
                max_step_size, "> min_step_size")
        defaults = dict(
            lr=float(initial_step_size),
            c=float(c),
            eta=float(eta),
            momentum=float(momentum),
            min_step_size=float(min_step_size),
            max_step_size=float(max_step_size),
        )
        super().__init__(params, defaults, buffers)
        self._progress = dict(
            position=AT_ORIGIN,
            step_size=float(initial_step_size),  # α: the one being tried, or carried to the next line
            max_step_size=None,  # α_max of the current line
            direction_norm=None,
            initial_derivative=None,  # F'(0) of the current line
            line_evaluations=0,
            accepted_distance=None,  # α ‖d‖ of the last accepted line
            steps=0,
            forward_passes=0,
            backward_passes=0,
            lines=0,
            failures=0,
        )

    # ------------------------------------------------------------------ reporting and state

    def log_values(self) -> dict[str, float]:
        """The last accepted α and its distance α‖d‖, pass counts, accepted lines and failures."""
        progress = self._progress
        values = {
            "learning_rate": self.param_groups[0]["lr"],
            "step_size": progress["accepted_distance"],
            "forward_passes": progress["forward_passes"],
            "backward_passes": progress["backward_passes"],
            "lines": progress["lines"],
            "failures": progress["failures"],
        }
        return log_values_known(values)

    def state_dict(self) -> dict:
        """The optimizer state: line origin and direction per parameter, position on the line, counters."""
        state = super().state_dict()
        state["gols_i"] = dict(self._progress)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        state_dict = dict(state_dict)
        progress = dict(state_dict.pop("gols_i"))
        super().load_state_dict(state_dict)
        self._progress = progress

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure) -> torch.Tensor:
        """Evaluate one batch at the current point, advance the search; return the batch loss there."""
        self._require_closure(closure)
        progress = self._progress
        params = self._params()
        saved_buffers = self._save_buffers()
        loss = self._loss_with_gradient(closure, progress)
        progress["steps"] += 1
        gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if progress["position"] == AT_ORIGIN:
            if not self._start_line(params, gradients, loss):
                self._restore_buffers(saved_buffers)
        else:
            self._judge_trial(params, gradients, loss, saved_buffers)
        return loss

    def _start_line(self, params, gradients, loss) -> bool:
        """Steps 1 and 2 at the iterate (the current parameters); False, staying there, if not finite."""
        group = self.param_groups[0]
        progress = self._progress
        directions = [self._state_tensor(p, "direction") for p in params]
        momentum = group["momentum"]
        if momentum > 0:
            candidate = torch._foreach_sub(torch._foreach_mul(directions, momentum), gradients)
        else:
            candidate = torch._foreach_neg(gradients)
        norm = global_norm(candidate)
        derivative = global_dot(gradients, candidate) / torch.clamp_min(norm, torch.finfo(norm.dtype).tiny)
        loss_value, norm_value, derivative_value = torch.stack([loss.to(norm.dtype), norm, derivative]).tolist()
        if not all(map(math.isfinite, (loss_value, norm_value, derivative_value))):
            self._fail(f"non-finite loss {loss_value:.3g} or gradient at the line origin")
            return False
        if derivative_value >= 0 and momentum > 0:
            candidate = torch._foreach_neg(gradients)
            norm_value = global_norm(candidate).item()
            derivative_value = -norm_value
        torch._foreach_copy_(directions, candidate)
        for p in params:
            self._state_tensor(p, "line_origin").copy_(p)
        max_step = min(1.0 / norm_value, group["max_step_size"]) if norm_value > 0 else group["max_step_size"]
        max_step = max(max_step, group["min_step_size"])
        progress.update(
            position=FIRST_TRIAL,
            step_size=min(max(progress["step_size"], group["min_step_size"]), max_step),
            max_step_size=max_step,
            direction_norm=norm_value,
            initial_derivative=derivative_value,
            line_evaluations=0,
        )
        self._move_on_line(params)
        return True

    def _judge_trial(self, params, gradients, loss, saved_buffers) -> None:
        """Steps 3 to 6 at the trial point x_n + α d (the current parameters)."""
        progress = self._progress
        progress["line_evaluations"] += 1
        directions = [self._state_tensor(p, "direction") for p in params]
        norm = max(progress["direction_norm"], torch.finfo(torch.float64).tiny)
        derivative = global_dot(gradients, directions) / norm
        loss_value, derivative_value = torch.stack([loss.to(derivative.dtype), derivative]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(derivative_value)):
            self._restore_buffers(saved_buffers)
            self._fail(f"non-finite loss {loss_value:.3g} or gradient at step size {progress['step_size']:.3g}; "
                       "back to the line origin")
            group = self.param_groups[0]
            progress["step_size"] = max(progress["step_size"] / group["eta"], group["min_step_size"])
            torch._foreach_copy_(params, [self._state_tensor(p, "line_origin") for p in params])
            progress["position"] = AT_ORIGIN
            return
        decision = self._decide(derivative_value)
        if decision == CONTINUE:
            self._restore_buffers(saved_buffers)
            self._move_on_line(params)
            return
        self._accept(decision, derivative_value)
        progress["position"] = AT_ORIGIN
        if not self._start_line(params, gradients, loss):
            self._restore_buffers(saved_buffers)

    def _decide(self, derivative: float) -> str:
        """Accept α, stop at a bound, or set the next α (and the phase) from the sign of F'(α)."""
        group = self.param_groups[0]
        progress = self._progress
        position = progress["position"]
        if position == FIRST_TRIAL:
            if derivative == 0 or 0 < derivative < group["c"] * abs(progress["initial_derivative"]):
                return ACCEPTED
            position = SHRINKING if derivative > 0 else GROWING
        elif (position == SHRINKING and derivative < 0) or (position == GROWING and derivative >= 0):
            return ACCEPTED
        if position == SHRINKING:
            step_size = progress["step_size"] / group["eta"]
        else:
            step_size = progress["step_size"] * group["eta"]
        if not group["min_step_size"] <= step_size <= progress["max_step_size"]:
            return AT_BOUND
        progress["position"] = position
        progress["step_size"] = step_size
        return CONTINUE

    def _accept(self, decision: str, derivative: float) -> None:
        """Step 6: the current trial point is x_{n+1}; record and report its α."""
        progress = self._progress
        step_size = progress["step_size"]
        distance = step_size * progress["direction_norm"]
        self.param_groups[0]["lr"] = step_size
        progress["accepted_distance"] = distance
        progress["lines"] += 1
        self._report_measurement(step_size, distance, evaluations=progress["line_evaluations"])
        if decision == AT_BOUND:
            bound = "maximum" if derivative < 0 else "minimum"
            self._fail(f"step size reached its {bound} {step_size:.3g} without a sign change of the "
                       "directional derivative")

    # ------------------------------------------------------------------ helpers

    def _move_on_line(self, params) -> None:
        """Put the parameters at x_n + α d, computed afresh from the line origin."""
        torch._foreach_copy_(params, [self._state_tensor(p, "line_origin") for p in params])
        torch._foreach_add_(params, [self._state_tensor(p, "direction") for p in params],
                            alpha=self._progress["step_size"])

    def _fail(self, reason: str) -> None:
        self._progress["failures"] += 1
        self._report_failure(reason)

