"""Loss functions by the [training] loss key: mean over the batch of (outputs, targets).

Each also gives one loss per sample with ``reduction="per_sample"`` (the probabilistic line
search needs their spread); the mean of those is the batch loss.
"""

import functools

import torch.nn.functional as functional

from source.errors import UserError
from source.optimizer import MEAN_LOSS, SAMPLE_LOSSES

__all__ = ["choose_loss", "with_reduction"]

_AUTOMATIC = {"classification": "cross_entropy", "regression": "mean_squared_error"}


def _reduced(loss, outputs, targets, reduction):
    """torch's own mean of ``loss``, or its mean per sample (over all but the batch dimension)."""
    if reduction == MEAN_LOSS:
        return loss(outputs, targets)
    losses = loss(outputs, targets, reduction="none")
    return losses.flatten(1).mean(1) if losses.dim() > 1 else losses


def cross_entropy(outputs, targets, reduction=MEAN_LOSS):
    """Softmax cross-entropy of class scores against class indices."""
    return _reduced(functional.cross_entropy, outputs, targets, reduction)


def mean_squared_error(outputs, targets, reduction=MEAN_LOSS):
    """Squared error against regression targets of the outputs' shape."""
    return _reduced(functional.mse_loss, outputs, targets, reduction)


def mean_squared_error_to_one_hot(outputs, targets, reduction=MEAN_LOSS):
    """Squared error of class scores against one-hot class indices (MSE for classification)."""
    one_hot = functional.one_hot(targets, outputs.shape[1]).to(outputs.dtype)
    return _reduced(functional.mse_loss, outputs, one_hot, reduction)


def with_reduction(loss_function, reduction):
    """``loss_function`` giving the batch's mean loss (``MEAN_LOSS``) or per-sample losses (``SAMPLE_LOSSES``)."""
    return loss_function if reduction == MEAN_LOSS else functools.partial(loss_function, reduction=reduction)


def choose_loss(name, task):
    """The loss function for ``name`` ("auto", "cross_entropy", "mean_squared_error") and the data's task.

    "auto" is cross-entropy for classification and mean squared error for regression.
    """
    name = _AUTOMATIC[task] if name == "auto" else name
    if name == "cross_entropy":
        if task != "classification":
            raise UserError(f"cross_entropy needs class labels, but the data set is for {task}; use auto")
        return cross_entropy
    return mean_squared_error if task == "regression" else mean_squared_error_to_one_hot
