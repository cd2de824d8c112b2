"""PLS: the probabilistic line search of Mahsereci and Hennig."""

import math
from collections.abc import Iterable

import torch

from ..lab_pal import BatchClosure
from ..line_search import (
    LineSearchBase,
    global_dot,
    global_norm,
    is_finite_number,
    log_values_known,
    require,
    require_integer,
)
from ..line_search import SAMPLE_LOSSES
from .gaussian_process import LineGaussianProcess
from .rules import (
    ABORT_TRIAL,
    ORIGINAL,
    RESEARCH,
    RULES,
    Abort,
    Accept,
    EvaluateNext,
    TakeEarlierPoint,
    check_rule_options,
    rule_options,
)
from .sample_statistics import BATCH_MEAN, VARIANCE_ESTIMATORS, evaluate_batch

__all__ = ["Pls"]

STARTING = "starting"
SEARCHING = "searching"

FIRST_TRIAL = 1.0
"""Every line search first evaluates at t = 1, i.e. at the base learning rate α₀."""


class Pls(LineSearchBase):
    r"""Probabilistic Line Search (PLS).

    M. Mahsereci and P. Hennig, "Probabilistic Line Searches for Stochastic Optimization",
    NeurIPS 2015 and JMLR 18(119), 2017.

    Every call of :meth:`step` is one function evaluation (forward and backward pass) on its own,
    new batch, at the next trial point of the current line search; PLS draws a new mini-batch for
    every evaluation. Along the line θ(t) = θ₀ + t α₀ d, with d = -g (+ ``momentum`` · previous d)
    and t in units of the base learning rate α₀ (``initial_learning_rate`` at first):

    1. **Start**: the very first step evaluates at t = 0 to begin the first line (the research
       code's first step evaluates its first batch twice at t = 0 and then once more at t = 1;
       here the evaluation at t = 1 takes the second step's batch). Each evaluation
       gives f (mean loss), g (mean gradient) and the variances of both means, estimated from the
       per-sample losses and gradients of the batch (see ``sample_statistics``); the line sees
       f(t), f'(t) = g·d and their variances Var f and Σ Var g · d², scaled by f(0) and |f'(0)|
       (section 3.4: f ← (f - f(0)) / (α₀ |f'(0)|), f' ← f' / |f'(0)|).
    2. **Model**: a Gaussian process with the integrated Wiener process kernel (cubic spline
       posterior mean) is conditioned on all (t, f, f') observations of the line with their noise.
    3. to 5. **Accept, stop or go on**, by one of two rule sets (``rules.py``), chosen by ``rules``:
       ``rules="original"`` (the default) are the rules of the authors' original algorithm
       (probLineSearch.m, post-NIPS 2015 release, and JMLR 2017; ``OriginalRules``), which also
       train at the LABPAL paper's batch size of 128; ``rules="research"`` are those of the research
       code of the LABPAL paper (``ResearchRules``), kept to reproduce its figures. Either accepts
       a point whose Wolfe probability is at least ``c_w``, and adapts α₀ after each search. A search
       that aborts takes a small step (t = 0.01) unconditionally; a non-finite value never becomes
       an observation, and if the abort point itself is not finite, the parameters return to the
       line's start and the next step starts a new line there.

    When the posterior variance of either Wolfe quantity is below 1e-9 (noise-free lines) the
    conditions are checked on the posterior mean, with the same bounds as the probabilistic test;
    the research code checks f'(t) ≥ 0 there instead of df_lo ≤ f'(t) ≤ df_hi.

    Options of one rule set are refused with the other (``ValueError`` naming the option): each
    set is coherent as it stands, and an option without effect would only mislead. Both take
    ``c_w``, ``c1``, ``momentum``, ``variance_estimator`` and ``sample_chunk_size``.

    Symbols: α₀ = ``initial_learning_rate``, c_W = ``c_w``, c₁ = ``c1``, c₂ = ``c2``. Defaults:
    α₀, c_W, c₁ and momentum from the LABPAL paper's legend (α 1e-4, c_W 0.2, c1 0.005, β 0) for
    both rule sets, the others from the respective implementation (c₂ 0.8 from probLineSearch.m).

    Variances: by default (``variance_estimator="batch_mean"``) the paper's estimators of the
    variance of the batch means, Var f = (mean f_i² - f²) / (n - 1) and per coordinate
    Var g = (mean g_i² - ḡ²) / (n - 1). The research code of the LABPAL paper used the sample
    variance of the losses and (Σ g_i² - ḡ²) / (n - 1), n times larger and more, so its searches
    saw far noisier lines and accepted steps whose slope had not flattened yet;
    ``variance_estimator="research"`` reproduces it, and with it the research code's steps.

    BatchNorm: the per-sample pass holds the batch statistics constant (see
    ``sample_statistics``). Buffers passed as ``buffers`` (BatchNorm running statistics) keep the
    update of an evaluation only when its point becomes, or already is, the iterate (accepted
    points, aborts taken, and a start at t = 0); after every other evaluation they are restored,
    so rejected trial points leave no trace.

    Closure contract: ``closure`` must come from :func:`make_batch_closure` with a loss of
    ``reduction='none'`` (``closure_loss`` is ``SAMPLE_LOSSES``): PLS differentiates the closure's
    model per sample. ``step`` returns the batch's mean loss at the point it evaluated. Each
    evaluation costs two forward and two backward passes (the ordinary one and the per-sample one),
    which the pass counters count.

    Memory: one copy of the parameters (the direction d, also the momentum buffer); during an
    evaluation also the gradient, its variance, the next direction and the per-sample gradients of
    at most ``sample_chunk_size`` samples at once (default: the whole batch; ResNet-20 with b = 128
    needs about 140 MB for them).

    One parameter group only, on one device (both checked by
    :class:`~source.optimizer.lab_pal.line_search_base.LineSearchBase`); its parameters must be
    parameters of the closure's model.

    Example:
        >>> optimizer = Pls(model.parameters(), buffers=model.buffers())
        >>> loss_function = torch.nn.CrossEntropyLoss(reduction="none")
        >>> for inputs, targets in loader:
        ...     closure = make_batch_closure(model, loss_function, inputs, targets, device)
        ...     loss = optimizer.step(closure)
    """

    closure_loss = SAMPLE_LOSSES
    supports_compiled_model = False
    """Its per-sample gradients call the plain module through torch.func, which a compiled model does not offer."""
    # Per-sample gradients and projections are taken per parameter, so only the device must be shared.
    _parameters_share = ("device",)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        initial_learning_rate: float = 1e-4,
        *,
        rules: str = ORIGINAL,
        c_w: float = 0.2,
        c1: float = 0.005,
        momentum: float = 0.0,
        c2: float | None = None,
        target_df: float | None = None,
        df_lo: float | None = None,
        df_hi: float | None = None,
        max_steps: int | None = None,
        max_expl: int | None = None,
        max_dmu0: float | None = None,
        max_change_factor: float | None = None,
        expl_policy: str | None = None,
        fpush: float | None = None,
        sample_chunk_size: int | None = None,
        variance_estimator: str = BATCH_MEAN,
        buffers: Iterable[torch.Tensor] | None = None,
    ):
        require(rules in RULES, "rules", rules, f"one of {tuple(RULES)}")
        options = rule_options(rules, c2=c2, target_df=target_df, df_lo=df_lo, df_hi=df_hi,
                                     max_steps=max_steps, max_expl=max_expl, max_dmu0=max_dmu0,
                                     max_change_factor=max_change_factor, expl_policy=expl_policy, fpush=fpush)
        require(is_finite_number(initial_learning_rate) and initial_learning_rate > 0, "initial_learning_rate",
                initial_learning_rate, "a finite number > 0")
        require(is_finite_number(c_w) and 0 < c_w < 1, "c_w", c_w, "in (0, 1)")
        require(is_finite_number(c1) and 0 <= c1 < 1, "c1", c1, "in [0, 1)")
        require(is_finite_number(momentum) and 0 <= momentum < 1, "momentum", momentum, "in [0, 1)")
        check_rule_options(options)
        if sample_chunk_size is not None:
            require_integer(sample_chunk_size, "sample_chunk_size", 1)
        require(variance_estimator in VARIANCE_ESTIMATORS, "variance_estimator", variance_estimator,
                f"one of {VARIANCE_ESTIMATORS}")
        defaults = dict(
            rules=rules,
            initial_learning_rate=float(initial_learning_rate),
            c_w=float(c_w),
            c1=float(c1),
            momentum=float(momentum),
            **options,
            sample_chunk_size=sample_chunk_size,
            variance_estimator=variance_estimator,
        )
        super().__init__(params, defaults, buffers)
        self._search = _initial_search(float(initial_learning_rate))
        self._process = None  # the Gaussian process of the current line, rebuilt from the observations

    # ------------------------------------------------------------------ protocol

    def log_values(self) -> dict[str, float]:
        """Learning rate (last accepted α, α₀ before the first), step size α‖d‖ (none before), passes, searches."""
        search = self._search
        learning_rate = search["learning_rate"]
        return log_values_known({
            "learning_rate": learning_rate if learning_rate is not None else search["alpha0"],
            "step_size": search["step_size"],
            "forward_passes": search["forward_passes"],
            "backward_passes": search["backward_passes"],
            "line_search_evaluations": search["last_search_evaluations"],
            "base_learning_rate": search["alpha0"],
            "accepted_searches": search["accepted_searches"],
            "aborted_searches": search["aborted_searches"],
        })

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The optimizer state: direction (per parameter), line observations, α₀, alpha_stats, counters."""
        state = super().state_dict()
        search = dict(self._search)
        search["observations"] = [tuple(observation) for observation in search["observations"]]
        state["pls"] = search
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        state_dict = dict(state_dict)
        search = dict(state_dict.pop("pls"))
        super().load_state_dict(state_dict)
        # A state without ``rules`` was saved when the research rules were the only ones.
        for group in self.param_groups:
            group.setdefault("rules", RESEARCH)
        search.setdefault("extrapolation", 1.0)
        search["observations"] = [tuple(observation) for observation in search["observations"]]
        self._search = search
        self._process = None
        self._events = []

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure) -> torch.Tensor:
        """Evaluate ``closure``'s batch at the next trial point; return its mean loss there."""
        if not isinstance(closure, BatchClosure):
            raise ValueError(
                f"Invalid closure: {closure!r}; PLS needs per-sample gradients, so it takes a BatchClosure "
                "from make_batch_closure over a loss with reduction='none'"
            )
        if self._search["phase"] == STARTING:
            return self._start_line(closure)
        return self._evaluate_trial(closure)

    def _start_line(self, closure) -> torch.Tensor:
        """Evaluate at the iterate (t = 0) and begin a line there."""
        saved_buffers = self._save_buffers()
        evaluation, line = self._evaluate(closure, with_current_line=False)
        failure = self._begin_line(evaluation, line)
        if failure is not None:
            self._restore_buffers(saved_buffers)
            self._report_failure(f"{failure} at the start of a line; starting again with the next batch")
        return evaluation.loss

    def _evaluate_trial(self, closure) -> torch.Tensor:
        search = self._search
        group = self.param_groups[0]
        position = search["next_position"]
        self._move_to(position)
        saved_buffers = self._save_buffers()
        evaluation, line = self._evaluate(closure, with_current_line=True)
        search["line_evaluations"] += 1
        finite = all(map(math.isfinite, line["current"]))
        if search["aborting"]:
            if finite:
                self._accept(evaluation, line, aborted=True)
            else:
                self._move_to(0.0)
                self._restore_buffers(saved_buffers)
                search["alpha0"] = search["alpha_stats"]
                search["phase"] = STARTING
                self._report_failure("non-finite loss or gradient at the abort step; back to the line's start")
            return evaluation.loss
        if not finite:
            self._restore_buffers(saved_buffers)
            self._abort(f"non-finite loss or gradient at learning rate {position * search['alpha0']:.3g}")
            return evaluation.loss
        search["observations"].append(self._scaled_observation(position, *line["current"]))
        self._process = None
        process = self._gaussian_process()
        if not process.is_finite():
            self._restore_buffers(saved_buffers)
            self._abort("the Gaussian process posterior is not finite")
            return evaluation.loss
        decision = RULES[group["rules"]].decide(process, search, group)
        if isinstance(decision, Accept):
            self._accept(evaluation, line, aborted=False)
            return evaluation.loss
        self._restore_buffers(saved_buffers)
        match decision:
            case Abort(reason, abort_position):
                self._abort(reason, abort_position)
            case TakeEarlierPoint(earlier_position, aborted, failure):
                if failure is not None:
                    self._report_failure(failure)
                self._take_earlier_point(earlier_position, aborted=aborted)
            case EvaluateNext(next_position, search_updates):
                search.update(search_updates)
                search["next_position"] = next_position
        return evaluation.loss

    # ------------------------------------------------------------------ line search pieces

    def _evaluate(self, closure, *, with_current_line: bool):
        """Evaluate the batch and reduce it to the line quantities, with one wait for the device.

        ``line["current"]``: (f, f', Var f, Var f') along the current direction d; ``line["next"]``:
        the same along the direction the next line would take from this point, d' = βd - g, and ‖d'‖.
        """
        group = self.param_groups[0]
        params = self._params()
        evaluation = evaluate_batch(closure, params, group["sample_chunk_size"], group["variance_estimator"])
        search = self._search
        search["forward_passes"] += 2
        search["backward_passes"] += 2
        directions = [self._state_tensor(p, "direction") for p in params]
        next_directions = torch._foreach_sub(torch._foreach_mul(directions, group["momentum"]), evaluation.gradient)
        quantities = [evaluation.loss, evaluation.loss_variance]
        quantities += _projections(evaluation, next_directions)
        quantities.append(global_norm(next_directions))
        if with_current_line:
            quantities += _projections(evaluation, directions)
        values = torch.stack([q.to(torch.float64) for q in quantities]).tolist()
        loss, loss_variance, next_slope, next_slope_variance, next_norm = values[:5]
        line = {
            "next": (loss, next_slope, loss_variance, next_slope_variance),
            "next_norm": next_norm,
            "next_directions": next_directions,
        }
        if with_current_line:
            line["current"] = (loss, values[5], loss_variance, values[6])
        return evaluation, line

    def _begin_line(self, evaluation, line) -> str | None:
        """Make the evaluated point the start of a new line along d' = βd - g; return why not, if it cannot be."""
        search = self._search
        loss, slope, loss_variance, slope_variance = line["next"]
        if not all(map(math.isfinite, (*line["next"], line["next_norm"]))):
            search["phase"] = STARTING
            return "non-finite loss or gradient"
        if slope == 0.0:
            search["phase"] = STARTING
            return "zero slope along the search direction"
        torch._foreach_copy_([self._state_tensor(p, "direction") for p in self._params()], line["next_directions"])
        search.update(
            phase=SEARCHING,
            start_loss=loss,
            slope_scale=abs(slope),
            direction_norm=line["next_norm"],
            position=0.0,
            next_position=FIRST_TRIAL,
            line_evaluations=0,
            explorations=0,
            extrapolation=1.0,
            aborting=False,
            observations=[],
        )
        search["observations"].append(self._scaled_observation(0.0, loss, slope, loss_variance, slope_variance))
        self._process = None
        return None

    def _scaled_observation(self, position, loss, slope, loss_variance, slope_variance) -> tuple:
        """(t, f, f', Var f, Var f') in the line's units: f and f' relative to f(0) and |f'(0)| α₀."""
        search = self._search
        value_scale = search["slope_scale"] * search["alpha0"]
        return (
            float(position),
            (loss - search["start_loss"]) / value_scale,
            slope / search["slope_scale"],
            loss_variance / value_scale**2,
            slope_variance / search["slope_scale"] ** 2,
        )

    def _take_earlier_point(self, position: float, *, aborted: bool) -> None:
        """Move to an evaluated point of the line and end the search there; the next step evaluates it anew."""
        self._move_to(position)
        self._finish_search(aborted=aborted)
        self._search["phase"] = STARTING

    def _accept(self, evaluation, line, *, aborted: bool) -> None:
        """Take the evaluated point: adapt α₀, report, and start the next line from its evaluation."""
        self._finish_search(aborted=aborted)
        failure = self._begin_line(evaluation, line)
        if failure is not None:
            self._report_failure(f"{failure} at the accepted point; starting a line there with the next batch")

    def _finish_search(self, *, aborted: bool) -> None:
        """End the search at the current position: adapt α₀, update the counters, report an acceptance."""
        search = self._search
        learning_rate = search["position"] * search["alpha0"]
        group = self.param_groups[0]
        search["alpha0"], search["alpha_stats"] = RULES[group["rules"]].next_base_learning_rates(
            learning_rate, search["alpha0"], search["alpha_stats"], group, aborted=aborted)
        step_size = learning_rate * search["direction_norm"]
        search["learning_rate"] = learning_rate
        search["step_size"] = step_size
        search["last_search_evaluations"] = search["line_evaluations"]
        if aborted:
            search["aborted_searches"] += 1
        else:
            search["accepted_searches"] += 1
            self._report_measurement(learning_rate, step_size)

    def _abort(self, reason: str, position: float = ABORT_TRIAL) -> None:
        """End the search with a small step to ``position`` (t = 0.01 unless the rules say), taken by the next step."""
        search = self._search
        search["aborting"] = True
        search["next_position"] = position
        self._report_failure(f"line search aborted: {reason}")

    # ------------------------------------------------------------------ helpers

    def _move_to(self, position: float) -> None:
        """Move the parameters from the current position on the line to ``position``."""
        search = self._search
        increment = (position - search["position"]) * search["alpha0"]
        params = self._params()
        torch._foreach_add_(params, [self._state_tensor(p, "direction") for p in params], alpha=increment)
        search["position"] = position

    def _gaussian_process(self) -> LineGaussianProcess:
        if self._process is None:
            self._process = LineGaussianProcess(self._search["observations"])
        return self._process


def _initial_search(initial_learning_rate: float) -> dict:
    return dict(
        phase=STARTING,
        alpha0=initial_learning_rate,
        alpha_stats=initial_learning_rate,
        start_loss=None,
        slope_scale=None,
        direction_norm=None,
        position=0.0,
        next_position=0.0,
        line_evaluations=0,
        explorations=0,
        extrapolation=1.0,
        aborting=False,
        observations=[],
        learning_rate=None,
        step_size=None,
        last_search_evaluations=0,
        accepted_searches=0,
        aborted_searches=0,
        forward_passes=0,
        backward_passes=0,
    )


def _projections(evaluation, directions) -> list[torch.Tensor]:
    """g·d and Σ Var g · d², the slope along d and its variance."""
    slope = global_dot(evaluation.gradient, directions)
    variance = torch.stack([torch.sum(v * d * d) for v, d in zip(evaluation.gradient_variance, directions)]).sum()
    return [slope, variance]

