"""PLS's two rule sets: when a search accepts, stops or aborts, where it evaluates next, and the next α₀.

``Pls`` asks the rule set its ``rules`` option names (``RULES``) what to do after every finite
evaluation of a trial point (``decide``) and which α₀ the next line starts with after a search
(``next_base_learning_rates``). A rule set only decides; ``Pls`` moves the parameters, restores
buffers and reports. Symbols as in ``Pls``: t the position on the line in units of α₀, f and f'
the scaled loss and slope, c_W = ``c_w``, c₁ = ``c1``, c₂ = ``c2``.
"""

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtr

from ..line_search import is_finite_number, require, require_integer
from .gaussian_process import LineGaussianProcess

__all__ = [
    "ABORT_TRIAL",
    "ORIGINAL",
    "RESEARCH",
    "RULES",
    "Abort",
    "Accept",
    "EvaluateNext",
    "OriginalRules",
    "ResearchRules",
    "TakeEarlierPoint",
    "check_rule_options",
    "expected_improvement",
    "next_base_learning_rate",
    "rule_options",
]

ORIGINAL, RESEARCH = "original", "research"

ABORT_TRIAL = 0.01
"""An aborted search takes this small step (t = 0.01, i.e. 0.01 α₀) and accepts it."""

ABORT_STEP_FRACTION = 0.01
"""Original rules: a line that rises from its start is left with a step of 0.01 times its first point."""

ALPHA_STATISTICS_KEEP, ALPHA_STATISTICS_NEW = 0.95, 0.05
"""alpha_stats ← 0.95 alpha_stats + 0.05 α, the running statistics of the learning rates taken."""

EXPLORATION_POLICIES = ("linear", "exponential")


@dataclass(frozen=True)
class Accept:
    """Take the point just evaluated; its evaluation starts the next line."""


@dataclass(frozen=True)
class Abort:
    """End the search with a small step to ``position``, evaluated and taken by the next step."""

    reason: str
    position: float = ABORT_TRIAL


@dataclass(frozen=True)
class TakeEarlierPoint:
    """Move to the evaluated point at ``position`` and end the search there; ``failure`` is reported first."""

    position: float
    aborted: bool
    failure: str | None = None


@dataclass(frozen=True)
class EvaluateNext:
    """Evaluate ``position`` next; ``search_updates`` are the exploration counters that choice changes."""

    position: float
    search_updates: dict = field(default_factory=dict)


class OriginalRules:
    """The rules of the authors' original algorithm (probLineSearch.m, post-NIPS 2015 release, and JMLR 2017).

    Options ``c2``, ``max_steps`` 6, ``fpush`` 1.3, ``max_change_factor`` 100:

    3. **Accept** the point just evaluated when its Wolfe probability (the bivariate normal
       probability that f(0) - f(t) + ``c1`` t f'(0) ≥ 0 and 0 ≤ f'(t) - ``c2`` f'(0) ≤
       2 ``c2`` (|m'(0)| + 2 σ'(0)), m'(0) and σ'(0)² the posterior mean and variance of f'(0)) is
       at least ``c_w``; else **re-test** the earlier points of the line under the new posterior
       and take, of those that now pass, the one of lowest posterior mean.
    4. **Stop** after ``max_steps`` evaluations plus one: if that last point fails too, move to the
       evaluated point (t > 0) of lowest posterior mean. A line whose posterior slope at 0 is
       positive with no minimum of the posterior mean before its first point takes the step
       0.01 t₁ (t₁ the first point) unconditionally. Non-finite values abort (t = 0.01).
    5. **Next point**: the candidates are the minima of the posterior mean between observations and
       one extrapolation, the largest t so far plus e (e = 1 at first, doubled whenever the
       extrapolation is chosen, so it reaches t = 32 within 6 evaluations); the candidate with the
       largest expected improvement times Wolfe probability is evaluated next.

    After every search, whatever its end, with α = t α₀ the step taken: alpha_stats ← 0.95
    alpha_stats + 0.05 α and α₀ ← ``fpush`` · α, unless α is outside a factor ``max_change_factor``
    of alpha_stats, then α₀ ← alpha_stats. A step to an earlier point (re-test or lowest mean)
    leaves no evaluation at the new iterate, so the next step begins the next line there with a new
    batch; the original reuses the earlier evaluation, which would need a copy of the gradient per
    evaluated point. The original's stop at a point whose posterior slope is almost surely zero
    (noise-free lines only) is left out.
    """

    defaults = dict(c2=0.8, max_steps=6, max_change_factor=100.0, fpush=1.3)
    """The options of this rule set with their defaults."""

    def decide(self, process: LineGaussianProcess, search: dict, group: dict):
        """What to do after a finite evaluation at ``search["position"]`` under the posterior ``process``."""
        c_w, c1, c2 = group["c_w"], group["c1"], group["c2"]
        if process.strong_wolfe_probability(search["position"], c1, c2) >= c_w:
            return Accept()
        evaluated = [observation[0] for observation in search["observations"][1:]]
        if search["line_evaluations"] > group["max_steps"]:
            lowest = min(evaluated, key=process.mean)
            failure = (f"line search aborted: no acceptable point after {search['line_evaluations']} "
                       f"evaluations; moving to the point of lowest posterior mean, t = {lowest:.3g}")
            return TakeEarlierPoint(lowest, aborted=True, failure=failure)
        acceptable = [t for t in evaluated if process.strong_wolfe_probability(t, c1, c2) >= c_w]
        if acceptable:
            return TakeEarlierPoint(min(acceptable, key=process.mean), aborted=False)
        minima = process.points_with_mean_derivative(0.0)
        first_evaluated = min(evaluated)
        if process.mean(0.0, 1) > 0.0 and not any(0.0 < t < first_evaluated for t in minima):
            # The line rises from its start with no minimum before the first point: α₀ is far too large.
            position = ABORT_STEP_FRACTION * first_evaluated
            return Abort(f"the line rises from its start; taking t = {position:.3g}", position)
        extrapolation = max(evaluated) + search["extrapolation"]
        candidates = [*minima, extrapolation]
        best_mean = min(process.mean(t) for t in (0.0, *evaluated))
        scores = [
            expected_improvement(process.mean(t), math.sqrt(max(process.variance(t), 0.0)), best_mean)
            * process.strong_wolfe_probability(t, c1, c2)
            for t in candidates
        ]
        best = int(np.argmax([-1.0 if math.isnan(score) else score for score in scores]))
        if best == len(candidates) - 1:
            return EvaluateNext(float(candidates[best]), {"extrapolation": search["extrapolation"] * 2.0})
        return EvaluateNext(float(candidates[best]))

    def next_base_learning_rates(self, learning_rate, alpha0, alpha_stats, group, *, aborted):
        """(α₀, alpha_stats) of the next line after a search that took ``learning_rate``, however it ended."""
        return next_base_learning_rate(learning_rate, alpha_stats, group["fpush"], group["max_change_factor"])


class ResearchRules:
    """The rules of the LABPAL paper's research code (the PyTorch port by A. Mishkin, and Balles' TensorFlow port).

    Options ``target_df``, ``df_lo``, ``df_hi``, ``max_steps`` 20, ``max_expl``, ``max_dmu0``,
    ``max_change_factor`` 10, ``expl_policy``, ``fpush`` 1.0:

    3. **Accept**: the point just evaluated is accepted when its Wolfe probability, the bivariate
       normal probability that f(0) - f(t) + ``c1`` t f'(0) ≥ 0 and ``df_lo`` ≤ f'(t) ≤ ``df_hi``,
       is at least ``c_w``. Then α = t α₀ is the learning rate taken; α₀ ← ``fpush`` · α and
       alpha_stats ← 0.95 alpha_stats + 0.05 α when α is within a factor ``max_change_factor``
       of α₀, else α₀ ← alpha_stats; the point's own evaluation starts the next line.
    4. **Abort** when ``max_steps`` evaluations or ``max_expl`` explorations were made, the
       posterior mean slope at 0 is ≥ ``max_dmu0`` (not a descent direction) or a loss, gradient
       or posterior is not finite: the search evaluates at t = 0.01 and accepts that point
       unconditionally, with α₀ ← alpha_stats.
    5. **Next point** otherwise: the candidates are the points between observations where the
       posterior mean slope equals ``target_df`` and rises, plus one exploration point,
       t = 2 (k + 1) (``expl_policy`` "linear") or 2^(k + 1) ("exponential") after k
       explorations; the candidate with the largest Wolfe probability is evaluated next.

    A run whose every search aborts (the LABPAL paper's α₀ = 1e-4 at batch size 128: the slope
    never flattens within 38 α₀) keeps α₀ at alpha_stats, which only accepted steps move, so it
    never leaves its initial α₀.
    """

    defaults = dict(target_df=0.5, df_lo=-0.1, df_hi=1.1, max_steps=20, max_expl=20, max_dmu0=0.0,
                    max_change_factor=10.0, expl_policy="linear", fpush=1.0)
    """The options of this rule set with their defaults."""

    def decide(self, process: LineGaussianProcess, search: dict, group: dict):
        """What to do after a finite evaluation at ``search["position"]`` under the posterior ``process``."""
        wolfe_probability = process.wolfe_probability(search["position"], group["c1"], group["df_lo"], group["df_hi"])
        if wolfe_probability >= group["c_w"]:
            return Accept()
        slope_at_start = process.mean(0.0, 1)
        if search["line_evaluations"] >= group["max_steps"]:
            return Abort(f"no acceptable point after {search['line_evaluations']} evaluations")
        if search["explorations"] >= group["max_expl"]:
            return Abort(f"no acceptable point after {search['explorations']} explorations")
        if not slope_at_start < group["max_dmu0"]:
            return Abort(f"posterior slope at the line's start {slope_at_start:.3g} is not below {group['max_dmu0']}")
        candidates = process.points_with_mean_derivative(group["target_df"])
        explorations = search["explorations"]
        exploration = 2.0 * (explorations + 1) if group["expl_policy"] == "linear" else 2.0 ** (explorations + 1)
        candidates.append(exploration)
        probabilities = [process.wolfe_probability(t, group["c1"], group["df_lo"], group["df_hi"]) for t in candidates]
        # The first of equal maxima; a NaN probability (degenerate posterior) ranks below every number.
        best = int(np.argmax([-1.0 if math.isnan(p) else p for p in probabilities]))
        if best == len(candidates) - 1:
            return EvaluateNext(float(candidates[best]), {"explorations": explorations + 1})
        return EvaluateNext(float(candidates[best]))

    def next_base_learning_rates(self, learning_rate, alpha0, alpha_stats, group, *, aborted):
        """(α₀, alpha_stats) of the next line after a search that took ``learning_rate``.

        An accepted α within a factor max_change_factor of α₀ moves both; anything else resets α₀.
        """
        factor = group["max_change_factor"]
        if not aborted and alpha0 / factor < learning_rate < alpha0 * factor:
            statistics = ALPHA_STATISTICS_KEEP * alpha_stats + ALPHA_STATISTICS_NEW * learning_rate
            return group["fpush"] * learning_rate, statistics
        return alpha_stats, alpha_stats


RULES = {ORIGINAL: OriginalRules(), RESEARCH: ResearchRules()}
"""The rule sets by the name the ``rules`` option takes."""


def rule_options(rules: str, **given) -> dict:
    """The options of the rule set ``rules``: those given, the set's defaults for the others.

    An option given for the other rule set only is refused: it would have no effect.
    """
    defaults = RULES[rules].defaults
    for name, value in given.items():
        if value is not None and name not in defaults:
            other = RESEARCH if rules == ORIGINAL else ORIGINAL
            raise ValueError(f"Invalid {name}: {value!r} with rules={rules!r}; {name} belongs to rules={other!r} "
                             f"only (leave it out, or set rules={other!r})")
    return {name: given[name] if given[name] is not None else default for name, default in defaults.items()}


def check_rule_options(options: dict) -> None:
    """Check the values of a rule set's options (see ``defaults``); make the numbers floats."""
    checks = {
        "c2": lambda v: (is_finite_number(v) and 0 < v < 1, "in (0, 1)"),
        "target_df": lambda v: (is_finite_number(v), "a finite number"),
        "df_lo": lambda v: (is_finite_number(v), "a finite number"),
        "df_hi": lambda v: (is_finite_number(v) and v > options["df_lo"], "a finite number > df_lo"),
        "max_dmu0": lambda v: (is_finite_number(v), "a finite number"),
        "max_change_factor": lambda v: (is_finite_number(v) and v > 1, "> 1"),
        "expl_policy": lambda v: (v in EXPLORATION_POLICIES, f"one of {EXPLORATION_POLICIES}"),
        "fpush": lambda v: (is_finite_number(v) and v > 0, "a finite number > 0"),
    }
    for name, value in options.items():
        if name in ("max_steps", "max_expl"):
            require_integer(value, name, 1)
        else:
            valid, expected = checks[name](value)
            require(valid, name, value, expected)
        if name in ("c2", "target_df", "df_lo", "df_hi", "max_dmu0", "max_change_factor", "fpush"):
            options[name] = float(value)


def next_base_learning_rate(learning_rate: float, statistics: float, growth: float, factor: float):
    """The original rules' (α₀, alpha_stats) for the next line after a step of ``learning_rate`` α.

    alpha_stats ← 0.95 alpha_stats + 0.05 α; α₀ ← ``growth`` · α, or alpha_stats when α lies outside
    (alpha_stats / ``factor``, alpha_stats · ``factor``), a safeguard against runaway α₀.
    """
    statistics = ALPHA_STATISTICS_KEEP * statistics + ALPHA_STATISTICS_NEW * learning_rate
    within = statistics / factor < learning_rate < statistics * factor
    return (growth * learning_rate if within else statistics), statistics


def expected_improvement(mean: float, deviation: float, best: float) -> float:
    """E[max(best - f, 0)] for f ~ N(mean, deviation²) (JMLR 2017, eq. 9 of the NeurIPS paper)."""
    if deviation <= 0.0:
        return max(best - mean, 0.0)
    z = (best - mean) / deviation
    return (best - mean) * float(ndtr(z)) + deviation * math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
