"""The Gaussian process of PLS: a prior on the loss along one line, observed through f and f'.

The kernel is the once-integrated Wiener process with offset τ (Mahsereci and Hennig, JMLR 2017,
eq. 4): k(s, u) = min(s̃, ũ)³/3 + |s - u| min(s̃, ũ)²/2 with s̃ = s + τ. Its posterior mean given
observations of f and f' is a cubic spline with knots at the observed positions.
"""

import math

import numpy as np
from scipy import linalg

from .bivariate_normal import bivariate_normal_rectangle

__all__ = ["LineGaussianProcess", "KERNEL_OFFSET"]

KERNEL_OFFSET = 10.0
"""τ: keeps the kernel away from its zero at s = -τ for every position the search visits."""

DETERMINISTIC_VARIANCE = 1e-9
"""Below this posterior variance of a Wolfe quantity the conditions are evaluated on the mean."""


def prior_covariance(s, s_order: int, u, u_order: int):
    """Cov(∂^i f(s), ∂^j f(u)) under the prior, for derivative orders i in 0..3 and j in 0..1.

    Orders 2 and 3 of the first argument serve the posterior mean's second and third derivatives
    inside a spline cell (they are undefined exactly at s = u, where the branch s ≥ u is used).
    """
    s = np.asarray(s, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    left, right = s + KERNEL_OFFSET, u + KERNEL_OFFSET
    before = s < u  # then min(s̃, ũ) = s̃
    if (s_order, u_order) == (0, 0):
        low = np.minimum(left, right)
        return low**3 / 3.0 + 0.5 * np.abs(s - u) * low**2
    if (s_order, u_order) == (0, 1):
        return np.where(before, 0.5 * left**2, left * right - 0.5 * right**2)
    if (s_order, u_order) == (1, 0):
        return np.where(before, left * right - 0.5 * left**2, 0.5 * right**2)
    if (s_order, u_order) == (1, 1):
        return np.minimum(left, right)
    if (s_order, u_order) == (2, 0):
        return np.where(before, u - s, 0.0)
    if (s_order, u_order) == (2, 1):
        return np.where(before, 1.0, 0.0)
    if (s_order, u_order) == (3, 0):
        return np.where(before, -1.0, 0.0)
    if (s_order, u_order) == (3, 1):
        return np.zeros(np.broadcast(s, u).shape)
    raise ValueError(f"Invalid derivative orders: ({s_order}, {u_order})")


class LineGaussianProcess:
    """GP regression on f along a line from noisy observations (t, f(t), f'(t)) with known noise.

    ``observations`` is a list of (t, f, df, f_variance, df_variance) tuples; the posterior is
    computed when the process is built, so build a new one after adding an observation.
    """

    def __init__(self, observations):
        self.observations = [tuple(map(float, observation)) for observation in observations]
        if not self.observations:
            raise ValueError("Invalid observations: the Gaussian process needs at least one")
        positions, values, derivatives, value_variances, derivative_variances = map(np.array, zip(*self.observations))
        self.positions = positions
        self._observed = [(positions, 0), (positions, 1)]
        gram = np.block([
            [self._prior_block(positions, 0, positions, 0), self._prior_block(positions, 0, positions, 1)],
            [self._prior_block(positions, 1, positions, 0), self._prior_block(positions, 1, positions, 1)],
        ])
        gram += np.diag(np.concatenate([value_variances, derivative_variances]))
        self._factor = linalg.lu_factor(gram, check_finite=False)
        self._weights = linalg.lu_solve(self._factor, np.concatenate([values, derivatives]), check_finite=False)

    @staticmethod
    def _prior_block(s, s_order, u, u_order):
        return prior_covariance(s[:, None], s_order, u[None, :], u_order)

    def _cross_covariance(self, queries) -> np.ndarray:
        """Prior covariance of the queries ((t, order) pairs) with the observations, one row per query."""
        return np.array([
            np.concatenate([prior_covariance(t, order, positions, observed_order)
                            for positions, observed_order in self._observed])
            for t, order in queries
        ])

    def mean(self, t: float, order: int = 0) -> float:
        """The posterior mean of the ``order``-th derivative of f at ``t`` (orders 0 to 3)."""
        return float(self._cross_covariance([(t, order)])[0] @ self._weights)

    def posterior(self, queries) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean vector and covariance matrix of f or f' at the queries ((t, order), order 0 or 1)."""
        cross = self._cross_covariance(queries)
        prior = np.array([[float(prior_covariance(s, i, u, j)) for u, j in queries] for s, i in queries])
        covariance = prior - cross @ linalg.lu_solve(self._factor, cross.T, check_finite=False)
        return cross @ self._weights, covariance

    def is_finite(self) -> bool:
        """Whether the posterior is usable (the Gram matrix was not numerically singular)."""
        return bool(np.all(np.isfinite(self._weights)))

    def points_with_mean_derivative(self, target: float) -> list[float]:
        """Positions between observations where the posterior mean's slope is ``target`` and rising.

        In each cell between neighbouring observed positions the mean is one cubic, so its slope is
        the quadratic q(s) = d1 + d2 s + d3 s²/2 around the cell's midpoint c (t = c + s); of its
        roots the one where q rises (f'' > 0) is kept when it lies strictly inside the cell.
        """
        ordered = sorted(self.positions.tolist())
        points = []
        for low, high in zip(ordered, ordered[1:]):
            if not low < high:
                continue
            middle = low + 0.5 * (high - low)
            root = _rising_root(0.5 * self.mean(middle, 3), self.mean(middle, 2), self.mean(middle, 1) - target)
            if root is not None and low < middle + root < high:
                points.append(middle + root)
        return points

    def wolfe_probability(self, t: float, c1: float, df_lo: float, df_hi: float) -> float:
        """Probability that ``t`` satisfies the Wolfe conditions under the posterior.

        a = f(0) - f(t) + c1 t f'(0) ≥ 0 (sufficient decrease) and df_lo ≤ b = f'(t) ≤ df_hi (curvature,
        in units of |f'(0)| as the observations are scaled); (a, b) is jointly Gaussian, so the
        probability is a bivariate normal rectangle (JMLR 2017, eqs. 14 to 16). When a or b is
        almost certain (variance < 1e-9) the conditions are checked on the posterior mean instead.
        """
        mean, covariance = self.posterior([(0.0, 0), (0.0, 1), (t, 0), (t, 1)])
        a_weights = np.array([1.0, c1 * t, -1.0, 0.0])
        a_mean, b_mean = float(a_weights @ mean), float(mean[3])
        a_variance = float(a_weights @ covariance @ a_weights)
        b_variance = float(covariance[3, 3])
        if not all(map(math.isfinite, (a_mean, b_mean, a_variance, b_variance))):
            return math.nan
        if a_variance < DETERMINISTIC_VARIANCE or b_variance < DETERMINISTIC_VARIANCE:
            return 1.0 if a_mean >= 0.0 and df_lo <= b_mean <= df_hi else 0.0
        ab_covariance = float(a_weights @ covariance[:, 3])
        a_deviation, b_deviation = math.sqrt(a_variance), math.sqrt(b_variance)
        return bivariate_normal_rectangle(
            ab_covariance / (a_deviation * b_deviation),
            -a_mean / a_deviation, math.inf,
            (df_lo - b_mean) / b_deviation, (df_hi - b_mean) / b_deviation,
        )

    def strong_wolfe_probability(self, t: float, c1: float, c2: float) -> float:
        """The Wolfe probability of the original algorithm (Mahsereci and Hennig's probLineSearch.m).

        a = f(0) - f(t) + c1 t f'(0) ≥ 0 as in :meth:`wolfe_probability`; the curvature quantity is
        b = f'(t) - c2 f'(0), jointly Gaussian with a, and must lie in [0, 2 c2 (|m'(0)| + 2 σ'(0))]
        with m'(0) and σ'(0)² the posterior mean and variance of f'(0): the weak condition
        f'(t) ≥ c2 f'(0) and a strong one whose bound widens with the noise at the start.
        Below a variance of 1e-9 the conditions are checked on the posterior mean.
        """
        mean, covariance = self.posterior([(0.0, 0), (0.0, 1), (t, 0), (t, 1)])
        a_weights = np.array([1.0, c1 * t, -1.0, 0.0])
        b_weights = np.array([0.0, -c2, 0.0, 1.0])
        a_mean, b_mean = float(a_weights @ mean), float(b_weights @ mean)
        a_variance = float(a_weights @ covariance @ a_weights)
        b_variance = float(b_weights @ covariance @ b_weights)
        b_high = 2.0 * c2 * (abs(float(mean[1])) + 2.0 * math.sqrt(max(float(covariance[1, 1]), 0.0)))
        if not all(map(math.isfinite, (a_mean, b_mean, a_variance, b_variance, b_high))):
            return math.nan
        if a_variance < DETERMINISTIC_VARIANCE or b_variance < DETERMINISTIC_VARIANCE:
            return 1.0 if a_mean >= 0.0 and 0.0 <= b_mean <= b_high else 0.0
        ab_covariance = float(a_weights @ covariance @ b_weights)
        a_deviation, b_deviation = math.sqrt(a_variance), math.sqrt(b_variance)
        return bivariate_normal_rectangle(
            ab_covariance / (a_deviation * b_deviation),
            -a_mean / a_deviation, math.inf,
            -b_mean / b_deviation, (b_high - b_mean) / b_deviation,
        )

    def variance(self, t: float, order: int = 0) -> float:
        """The posterior variance of f (order 0) or f' (order 1) at ``t``."""
        return float(self.posterior([(t, order)])[1][0, 0])


def _rising_root(a: float, b: float, c: float) -> float | None:
    """The root of a s² + b s + c where the derivative 2 a s + b is positive, if there is one."""
    discriminant = b * b - 4.0 * a * c
    if not discriminant > 0.0:
        return None
    root_of_discriminant = math.sqrt(discriminant)
    # 2 a s + b = +sqrt(discriminant) picks the rising root; this form avoids cancellation for b > 0.
    if b > 0.0:
        return -2.0 * c / (b + root_of_discriminant)
    if a != 0.0:
        return (-b + root_of_discriminant) / (2.0 * a)
    return None
