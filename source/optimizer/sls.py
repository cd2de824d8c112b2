"""SLS: stochastic gradient descent with an Armijo backtracking line search on every batch."""

import math
from collections.abc import Iterable

import torch

from .lab_pal.batch_schedule import REFERENCE_INFERENCE_BATCH_SIZE, REFERENCE_TRAINING_SET_SIZE
from .line_search import LineSearchBase, is_finite_number, log_values_known, require, require_integer
from .line_search import MEAN_LOSS

__all__ = ["Sls"]

#: Below this gradient norm the reference code neither searches nor steps.
MIN_GRADIENT_NORM = 1e-8
#: The step along -g that the reference code takes when no trial satisfies Armijo.
FALLBACK_LEARNING_RATE = 1e-6
RESET_OPTIONS = (0, 1, 2)


class Sls(LineSearchBase):
    r"""Stochastic Line Search (SLS) with Armijo backtracking.

    Vaswani, Mishkin, Laradji, Schmidt, Gidel and Lacoste-Julien, "Painless
    Stochastic Gradient: Interpolation, Line-Search, and Convergence Rates",
    NeurIPS 2019 (arXiv 1905.09997), Algorithms 1 and 2 with the Armijo condition.

    One call of :meth:`step` takes one batch through ``closure`` and makes one
    complete SLS iteration on it:

    1. **Gradient**: evaluate the batch loss L(θ) and its gradient g at the
       current parameters θ (one forward and one backward pass).
    2. **Reset** the step size η carried over from the previous iteration:
       ``reset_option`` 0 keeps it, 1 (the default) grows it to
       η · γ^(1/n) with γ = ``gamma`` and n the number of batches per epoch,
       2 sets it back to ``init_step_size`` (the numbering of the SLS authors'
       code).
    3. **Skip** the search when ‖g‖ < 1e-8: the parameters stay where they are
       (η keeps its reset value).
    4. **Backtrack** on the same batch, forward passes only: try
       θ' = θ − η g; if the Armijo condition
       L(θ') ≤ L(θ) − c · η · ‖g‖² holds (c = ``c``), accept θ' and keep η for
       the next iteration; otherwise η ← β_b · η (β_b = ``beta_b``) and try
       again. A non-finite L(θ') fails the condition.
    5. **Give up** after ``max_backtracking_steps`` rejected trials: like the
       reference code, step θ − 1e-6 g, keep the decreased η, and report a
       ``"failure"`` event.

    A non-finite L(θ) or gradient skips the iteration: parameters and η stay as
    they were and a ``"failure"`` event says why.

    n is ``training_set_size // inference_batch_size`` (at least 1), the number of
    batches of an epoch that drops its last partial batch; both default to the
    LABPAL paper's CIFAR-10 setting (40,000 images, batches of 128: n = 312).
    The defaults c = 0.1, β_b = 0.9 and ``init_step_size`` μ = 0.1 are the
    LABPAL paper's legend ("SLS c 0.1, β 0.9, μ 0.1"); the SLS authors' own
    default initial step size is 1.0.

    The research code used in the LABPAL paper spread one search over several
    ``step`` calls, one trial per call, and discarded the batches those calls
    were given; here one call makes the whole search on its own batch. The
    numbers of forward and backward passes (``log_values``) make the two
    comparable.

    Closure contract: ``closure()`` evaluates the mean loss of one fixed batch,
    forward only, and gives the same loss for the same parameters however often
    it is called; SLS calls ``backward`` and ``zero_grad`` itself. Closures made
    by :func:`~source.optimizer.lab_pal.make_batch_closure` replay their random
    state, so dropout draws the same masks at every trial; a plain function
    works too when its forward pass is deterministic. ``step`` returns L(θ),
    detached.

    Trials have no side effects: pass ``buffers=model.buffers()`` and the buffers
    (BatchNorm running statistics) are put back after every trial forward pass,
    so the only buffer update of an iteration is the one of the forward pass at θ.

    The Armijo condition is checked on the host in float64 from the losses and
    ‖g‖², which waits for the device once per trial. Trials run under whatever
    autocast the caller set for the forward pass at θ, so L(θ) and L(θ') share one
    precision. Memory: one copy of the parameters (and of the buffers) during a
    search; the gradient stays in ``.grad``. ``param_groups[0]["lr"]`` is the
    multiplier of −g in the last update (the accepted η, or 1e-6 after a failed
    search). One parameter group only (:class:`~source.optimizer.line_search.LineSearchBase`
    refuses a second); unlike the other line searches, its parameters may differ in device and dtype.

    Example:
        >>> optimizer = Sls(model.parameters(), buffers=model.buffers(),
        ...                 training_set_size=len(train_set), inference_batch_size=128)
        >>> for inputs, targets in loader:
        ...     closure = make_batch_closure(model, loss_function, inputs, targets, device)
        ...     loss = optimizer.step(closure)
    """

    closure_loss = MEAN_LOSS
    # ‖g‖² is summed on the loss's device in the widest dtype, so the parameters may differ in both.
    _parameters_share = ()

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        init_step_size: float = 0.1,
        *,
        c: float = 0.1,
        beta_b: float = 0.9,
        gamma: float = 2.0,
        reset_option: int = 1,
        max_backtracking_steps: int = 100,
        training_set_size: int = REFERENCE_TRAINING_SET_SIZE,
        inference_batch_size: int = REFERENCE_INFERENCE_BATCH_SIZE,
        buffers: Iterable[torch.Tensor] | None = None,
    ):
        require(is_finite_number(init_step_size) and init_step_size > 0, "init_step_size", init_step_size, "> 0")
        require(is_finite_number(c) and 0 < c < 1, "c", c, "in (0, 1)")
        require(is_finite_number(beta_b) and 0 < beta_b < 1, "beta_b", beta_b, "in (0, 1)")
        require(is_finite_number(gamma) and gamma >= 1, "gamma", gamma, ">= 1")
        require(type(reset_option) is int and reset_option in RESET_OPTIONS, "reset_option", reset_option,
                f"one of {RESET_OPTIONS}")
        require_integer(max_backtracking_steps, "max_backtracking_steps", 1)
        require_integer(training_set_size, "training_set_size", 1)
        require_integer(inference_batch_size, "inference_batch_size", 1)
        defaults = dict(
            lr=float(init_step_size),
            init_step_size=float(init_step_size),
            c=float(c),
            beta_b=float(beta_b),
            gamma=float(gamma),
            reset_option=reset_option,
            max_backtracking_steps=max_backtracking_steps,
            n_batches_per_epoch=max(training_set_size // inference_batch_size, 1),
        )
        super().__init__(params, defaults, buffers)
        self._progress = dict(
            step_size=float(init_step_size),
            steps=0,
            forward_passes=0,
            backward_passes=0,
            backtracking_steps=0,
            failed_searches=0,
        )

    # ------------------------------------------------------------------ reporting and state

    def log_values(self) -> dict[str, float]:
        """Learning rate and step size of the last search, pass counts, backtracking and failures."""
        progress = self._progress
        return log_values_known({
            "learning_rate": self.param_groups[0]["lr"],
            "step_size": progress["step_size"],
            "forward_passes": progress["forward_passes"],
            "backward_passes": progress["backward_passes"],
            "backtracking_steps": progress["backtracking_steps"],
            "failed_searches": progress["failed_searches"],
        })

    def state_dict(self) -> dict:
        """The optimizer state including the carried step size and the counters."""
        state = super().state_dict()
        state["sls"] = dict(self._progress)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        state_dict = dict(state_dict)
        progress = dict(state_dict.pop("sls"))
        super().load_state_dict(state_dict)
        self._progress = progress

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure) -> torch.Tensor:
        """One SLS iteration on the batch of ``closure``; return its loss at the parameters it was given."""
        self._require_closure(closure)
        group = self.param_groups[0]
        progress = self._progress
        loss = self._loss_with_gradient(closure, progress)
        progress["steps"] += 1
        params = [p for p in group["params"] if p.grad is not None]
        gradients = [p.grad for p in params]
        squared_norm = _squared_norm(gradients, loss)
        loss_value, squared_norm = torch.stack([loss.to(squared_norm.dtype), squared_norm]).tolist()
        progress["backtracking_steps"] = 0
        if not (math.isfinite(loss_value) and math.isfinite(squared_norm)):
            self._fail(f"non-finite loss {loss_value} or squared gradient norm {squared_norm}")
            return loss
        step_size = self._reset_step_size(group, progress["step_size"])
        progress["step_size"] = step_size
        if math.sqrt(squared_norm) < MIN_GRADIENT_NORM:
            return loss
        origins = [p.clone() for p in params]
        saved_buffers = self._save_buffers()
        for trial in range(group["max_backtracking_steps"]):
            self._move(params, origins, gradients, step_size)
            trial_loss = float(closure())
            progress["forward_passes"] += 1
            self._restore_buffers(saved_buffers)
            if trial_loss <= loss_value - step_size * group["c"] * squared_norm:
                progress["step_size"] = step_size
                progress["backtracking_steps"] = trial
                group["lr"] = step_size
                return loss
            step_size *= group["beta_b"]
        self._move(params, origins, gradients, FALLBACK_LEARNING_RATE)
        progress["step_size"] = step_size
        progress["backtracking_steps"] = group["max_backtracking_steps"]
        group["lr"] = FALLBACK_LEARNING_RATE
        self._fail(
            f"no step size satisfied the Armijo condition in {group['max_backtracking_steps']} trials; "
            f"stepped {FALLBACK_LEARNING_RATE} along the negative gradient"
        )
        return loss

    def _reset_step_size(self, group, step_size: float) -> float:
        if group["reset_option"] == 1:
            return step_size * group["gamma"] ** (1.0 / group["n_batches_per_epoch"])
        if group["reset_option"] == 2:
            return group["init_step_size"]
        return step_size

    @staticmethod
    def _move(params, origins, gradients, learning_rate: float) -> None:
        """Set the parameters to θ − learning_rate · g."""
        torch._foreach_copy_(params, origins)
        torch._foreach_add_(params, gradients, alpha=-learning_rate)

    def _fail(self, reason: str) -> None:
        self._progress["failed_searches"] += 1
        self._report_failure(reason, step=self._progress["steps"])


def _squared_norm(tensors: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """‖g‖² on the loss's device, in the widest of float32 and the loss's and gradients' dtypes."""
    dtype = torch.promote_types(loss.dtype, torch.float32)
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    if not tensors:
        return torch.zeros((), dtype=dtype, device=loss.device)
    norms = torch._foreach_norm(tensors)
    return torch.stack([norm.to(loss.device, dtype) for norm in norms]).square().sum()

