"""The one-dimensional parabolic model of the loss along the line direction."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Parabola:
    """``loss(x) = curvature / 2 * x**2 + slope * x + offset`` along the line."""

    curvature: float
    slope: float
    offset: float

    @property
    def minimum_position(self) -> float:
        """Position of the vertex, ``-slope / curvature`` (a minimum only if curvature > 0)."""
        return -self.slope / self.curvature


def fit_parabola(positions: tuple[float, float, float], losses: tuple[float, float, float]) -> Parabola:
    """Fit the unique parabola through three points; exact for any parabola.

    The slope and curvature at the first point come from non-uniform divided
    differences, so the points need not be equally spaced (LABPAL samples at
    0, h and mu with h much smaller than mu).
    """
    (x0, x1, x2), (y0, y1, y2) = positions, losses
    if len({x0, x1, x2}) != 3:
        raise ValueError(f"Invalid positions: {positions}; a parabola needs three distinct positions")
    # Newton form: loss(x) = y0 + d01 (x - x0) + d012 (x - x0)(x - x1), expanded around x = 0.
    d01 = (y1 - y0) / (x1 - x0)
    d12 = (y2 - y1) / (x2 - x1)
    d012 = (d12 - d01) / (x2 - x0)
    return Parabola(curvature=2.0 * d012, slope=d01 - d012 * (x0 + x1), offset=y0 - d01 * x0 + d012 * x0 * x1)
