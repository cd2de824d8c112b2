"""Rectangle probabilities of the standard bivariate normal distribution, through Owen's T function."""

import math

from scipy.special import ndtr, owens_t

__all__ = ["bivariate_normal_rectangle", "bivariate_normal_upper_orthant"]


def bivariate_normal_upper_orthant(x: float, y: float, rho: float) -> float:
    """P(X ≥ x, Y ≥ y) for standard normal X, Y with correlation ``rho`` (bounds may be ±inf).

    Uses Owen (1956): with h, k = -x, -y and s = sqrt(1 - ρ²),
    Φ₂(h, k; ρ) = ½Φ(h) + ½Φ(k) - T(h, (k - ρh)/(h s)) - T(k, (h - ρk)/(k s)) - β,
    β = ½ when hk < 0 or (hk = 0 and h + k < 0), else 0. Owen's T is deterministic and accurate
    to double precision, unlike Monte Carlo integrators.
    """
    if math.isnan(x) or math.isnan(y) or math.isnan(rho):
        return math.nan
    rho = min(max(rho, -1.0), 1.0)
    if x == math.inf or y == math.inf:
        return 0.0
    if x == -math.inf:
        return float(ndtr(-y))
    if y == -math.inf:
        return float(ndtr(-x))
    h, k = -x, -y
    if rho == 1.0:
        return float(ndtr(min(h, k)))
    if rho == -1.0:
        return max(0.0, float(ndtr(h) + ndtr(k)) - 1.0)
    if h == 0.0 and k == 0.0:
        return 0.25 + math.asin(rho) / (2.0 * math.pi)
    s = math.sqrt((1.0 - rho) * (1.0 + rho))
    probability = 0.5 * float(ndtr(h)) + 0.5 * float(ndtr(k))
    probability -= _owens_t_term(h, k, rho, s) + _owens_t_term(k, h, rho, s)
    if h * k < 0.0 or (h * k == 0.0 and h + k < 0.0):
        probability -= 0.5
    return min(max(probability, 0.0), 1.0)


def bivariate_normal_rectangle(rho: float, x_lower: float, x_upper: float, y_lower: float, y_upper: float) -> float:
    """P(x_lower ≤ X ≤ x_upper, y_lower ≤ Y ≤ y_upper) for standard normal X, Y with correlation ``rho``."""
    upper = bivariate_normal_upper_orthant
    probability = (
        upper(x_lower, y_lower, rho) - upper(x_upper, y_lower, rho)
        - upper(x_lower, y_upper, rho) + upper(x_upper, y_upper, rho)
    )
    return min(max(probability, 0.0), 1.0)


def _owens_t_term(h: float, k: float, rho: float, s: float) -> float:
    """T(h, (k - ρh)/(h s)), taking the limit a → ±inf when h = 0 (T(0, ±inf) = ±1/4)."""
    numerator = k - rho * h
    if h == 0.0:
        return math.copysign(0.25, numerator)
    return float(owens_t(h, numerator / (h * s)))
