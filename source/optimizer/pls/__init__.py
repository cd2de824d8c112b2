"""PLS, the probabilistic line search: the optimizer and its Gaussian-process and statistics pieces."""

from .bivariate_normal import bivariate_normal_rectangle, bivariate_normal_upper_orthant
from .gaussian_process import LineGaussianProcess
from .pls import Pls
from .sample_statistics import BatchEvaluation, evaluate_batch

__all__ = [
    "BatchEvaluation",
    "LineGaussianProcess",
    "Pls",
    "bivariate_normal_rectangle",
    "bivariate_normal_upper_orthant",
    "evaluate_batch",
]
