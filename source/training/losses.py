"""Loss functions by the [training] loss key: mean over the batch of (outputs, targets)."""

import torch.nn.functional as functional

from source.errors import UserError

__all__ = ["choose_loss"]

_AUTOMATIC = {"classification": "cross_entropy", "regression": "mean_squared_error"}


def cross_entropy(outputs, targets):
    """Softmax cross-entropy of class scores against class indices."""
    return functional.cross_entropy(outputs, targets)


def mean_squared_error(outputs, targets):
    """Squared error against regression targets of the outputs' shape."""
    return functional.mse_loss(outputs, targets)


def mean_squared_error_to_one_hot(outputs, targets):
    """Squared error of class scores against one-hot class indices (MSE for classification)."""
    return functional.mse_loss(outputs, functional.one_hot(targets, outputs.shape[1]).to(outputs.dtype))


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
