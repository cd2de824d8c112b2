"""Optimizers by name: LABPAL and torch's own, built from a name and keyword arguments."""

import difflib
import inspect

import torch

from ..errors import UserError
from .lab_pal import LabPal, make_batch_closure

__all__ = ["OPTIMIZERS", "LabPal", "accepted_arguments", "build_optimizer", "make_batch_closure"]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "lab_pal": LabPal,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}

# Filled in from the model and the data, never by the user.
_AUTOMATIC_ARGUMENTS = {"params", "buffers", "training_set_size", "inference_batch_size"}


def accepted_arguments(name: str) -> list[str]:
    """The keyword arguments a user may give the optimizer ``name``."""
    signature = inspect.signature(_optimizer_class(name).__init__)
    return [argument for argument in signature.parameters if argument not in _AUTOMATIC_ARGUMENTS | {"self"}]


def build_optimizer(
    name: str,
    model: torch.nn.Module,
    arguments: dict,
    *,
    training_set_size: int,
    inference_batch_size: int,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model`` with the user's ``arguments``.

    LABPAL also gets the model's buffers (restored after its measurements) and the
    training-set and inference-batch sizes for its noise adaptation factor.
    """
    optimizer_class = _optimizer_class(name)
    accepted = accepted_arguments(name)
    for argument in arguments:
        if argument not in accepted:
            close = difflib.get_close_matches(argument, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"unknown argument {argument!r} for optimizer {name!r}{hint}; accepted: {', '.join(accepted)}"
            )
    automatic = {}
    if optimizer_class is LabPal:
        automatic = dict(
            buffers=model.buffers(),
            training_set_size=training_set_size,
            inference_batch_size=inference_batch_size,
        )
    try:
        return optimizer_class(model.parameters(), **arguments, **automatic)
    except (ValueError, TypeError) as error:
        raise UserError(f"optimizer {name!r}: {error}") from None


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(name, OPTIMIZERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown optimizer {name!r}{hint}; valid optimizers: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name]
