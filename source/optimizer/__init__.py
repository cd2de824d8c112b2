"""Optimizers by name: the line searches (LABPAL and its baselines) and torch's own.

Line searches follow the ``LineSearch`` protocol of ``line_search.py``; the trainer knows them
only through it. Adding one means adding its file and a line in ``OPTIMIZERS``.
"""

import difflib
import inspect

import torch

from ..arguments import InvalidArgument, check_argument_types, find_refused_argument
from ..errors import UserError
from .gols_i import GolsI
from .lab_pal import LabPal, make_batch_closure, noise_adaptation_factor
from .line_search import MEAN_LOSS, SAMPLE_LOSSES, LineSearch, LineSearchBase
from .pal import Pal
from .pls import Pls
from .sls import Sls

__all__ = [
    "MEAN_LOSS",
    "OPTIMIZERS",
    "SAMPLE_LOSSES",
    "GolsI",
    "LabPal",
    "LineSearch",
    "LineSearchBase",
    "Pal",
    "Pls",
    "Sls",
    "accepted_arguments",
    "available_optimizers",
    "build_optimizer",
    "make_batch_closure",
]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "lab_pal": LabPal,
    "pal": Pal,
    "pls": Pls,
    "sls": Sls,
    "gols_i": GolsI,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}

# Filled in from the model and the data, never by the user, for every class whose constructor
# takes them: the model's buffers (restored after evaluations away from the iterate) and the
# sizes behind LABPAL's noise adaptation factor and SLS's epoch length.
_AUTOMATIC_ARGUMENTS = ("buffers", "training_set_size", "inference_batch_size", "process_group")


def available_optimizers() -> list[str]:
    """Names ``build_optimizer`` accepts, sorted."""
    return sorted(OPTIMIZERS)


def accepted_arguments(name: str) -> list[str]:
    """The keyword arguments a user may give the optimizer ``name``."""
    signature = inspect.signature(_optimizer_class(name).__init__)
    return [
        argument
        for argument in signature.parameters
        if argument not in (*_AUTOMATIC_ARGUMENTS, "self", "params")
    ]


def build_optimizer(
    name: str,
    model: torch.nn.Module,
    arguments: dict,
    *,
    training_set_size: int,
    inference_batch_size: int,
    process_group=None,
    training_steps: int | None = None,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model`` with the user's ``arguments``.

    Classes that take them also get the model's buffers, the training-set and inference-batch
    sizes and the ``process_group`` of a run in several processes. A line search that takes no
    process group is refused in such a run: its processes would measure different lines. A problem
    with one argument (unknown, of the wrong type, or refused by the class, or a LABPAL training
    batch longer than a run of ``training_steps``) raises ``InvalidArgument`` naming it.
    """
    optimizer_class = _optimizer_class(name)
    accepted = accepted_arguments(name)
    for argument in arguments:
        if argument not in accepted:
            close = difflib.get_close_matches(argument, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidArgument(
                argument,
                f"unknown argument {argument!r} for optimizer {name!r}{hint}; accepted: {', '.join(accepted)}",
            )
    try:
        check_argument_types(optimizer_class.__init__, arguments)
    except InvalidArgument as error:
        raise InvalidArgument(error.argument, f"{error} (optimizer {name!r})") from None
    takes = inspect.signature(optimizer_class.__init__).parameters
    is_line_search = hasattr(optimizer_class, "closure_loss")
    if process_group is not None and is_line_search and "process_group" not in takes:
        raise UserError(
            f"optimizer {name!r} measures its line in one process only; run it without torchrun, "
            "or use lab_pal or a torch.optim optimizer"
        )

    def build(parameters, arguments, buffers):
        available = dict(
            buffers=buffers,
            training_set_size=training_set_size,
            inference_batch_size=inference_batch_size,
            process_group=process_group,
        )
        automatic = {argument: value for argument, value in available.items() if argument in takes}
        return optimizer_class(parameters, **arguments, **automatic)

    try:
        optimizer = build(model.parameters(), arguments, model.buffers())
    except (ValueError, TypeError) as error:
        reason = " ".join(str(error).split())
        # Trial builds over one throwaway tensor find the argument the class refuses.
        culprit = find_refused_argument(
            lambda trial: build([torch.zeros(1, requires_grad=True)], trial, []), arguments
        )
        if culprit is None:
            raise UserError(f"optimizer {name!r}: {reason}") from None
        raise InvalidArgument(culprit, f"optimizer {name!r} refuses argument {culprit}: {reason}") from None
    if isinstance(optimizer, LabPal) and training_steps is not None:
        _check_batch_multipliers(optimizer, training_steps)
    return optimizer


def _check_batch_multipliers(optimizer: LabPal, training_steps: int) -> None:
    """``InvalidArgument`` for a LABPAL batch-size multiplier whose training batch is longer than the run.

    A training batch of k inference batches takes k steps: with k above ``training_steps`` LABPAL
    gathers without ever updating, and the run would end untrained as if it had finished.
    """
    group = optimizer.param_groups[0]
    factor = noise_adaptation_factor(group["training_set_size"], group["inference_batch_size"])
    for (step, given), (_, multiplier) in zip(group["batch_size_schedule"], optimizer.scaled_batch_size_schedule):
        if step < training_steps and multiplier > training_steps:
            raise InvalidArgument(
                "batch_size_schedule",
                f"argument batch_size_schedule: its multiplier {given} at step {step} (times the noise adaptation "
                f"factor {factor:.4g}: {multiplier}) makes training batches of {multiplier} steps, longer than the "
                f"run's {training_steps} training steps, so LABPAL would never update; choose multipliers k with "
                f"k × {factor:.4g} at most {training_steps}",
            )


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(name, OPTIMIZERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown optimizer {name!r}{hint}; valid optimizers: {', '.join(available_optimizers())}")
    return OPTIMIZERS[name]
