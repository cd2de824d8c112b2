"""Learning-rate schedules by name: torch.optim.lr_scheduler classes, stepped once per training step.

All step counts in a schedule's arguments are training steps (inference batches), as in the
paper: its SGD baseline is MultiStepLR with milestones 75000, 112500 and gamma 0.1.
"""

import inspect

from torch.optim import lr_scheduler

from source.configuration.checks import did_you_mean
from source.errors import UserError
from source.optimizer import LineSearch

__all__ = ["NO_SCHEDULE", "available_schedules", "build_schedule"]

NO_SCHEDULE = "none"
"""The schedule name that keeps the optimizer's learning rate as it is."""

# Schedules that need Python objects (functions, other schedulers) or a metric in step(), which a
# configuration file cannot give and a per-step training loop does not have.
_UNSUPPORTED = {"LRScheduler", "LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler", "ReduceLROnPlateau"}


def _schedule_classes():
    return {
        name: value
        for name, value in vars(lr_scheduler).items()
        if inspect.isclass(value)
        and issubclass(value, lr_scheduler.LRScheduler)
        and not name.startswith("_")
        and name not in _UNSUPPORTED
    }


def available_schedules():
    """Names the [schedule] name key accepts: "none" and the usable lr_scheduler classes, sorted."""
    return [NO_SCHEDULE, *sorted(_schedule_classes())]


def _accepted_arguments(schedule_class):
    parameters = inspect.signature(schedule_class.__init__).parameters
    return {name: parameter for name, parameter in parameters.items() if name not in ("self", "optimizer")}


def build_schedule(name, optimizer, arguments):
    """Build schedule ``name`` for ``optimizer`` with ``arguments``; None for "none".

    Unknown or missing arguments and values the class rejects raise ``UserError`` listing what it
    accepts. A line search such as LABPAL sets its own learning rate and takes no schedule.
    """
    if name == NO_SCHEDULE:
        if arguments:
            raise UserError(f"arguments {', '.join(arguments)} given, but the schedule is none")
        return None
    if isinstance(optimizer, LineSearch):
        raise UserError(
            f"{type(optimizer).__name__} sets its own learning rate; use name = none instead of {name}"
        )
    schedule_class = _schedule_classes()[name]
    accepted = _accepted_arguments(schedule_class)
    listing = ", ".join(accepted)
    for argument in arguments:
        if argument not in accepted:
            raise UserError(
                f"{name} takes no argument {argument}{did_you_mean(argument, accepted)}; it accepts: {listing}"
            )
    missing = [
        argument
        for argument, parameter in accepted.items()
        if parameter.default is inspect.Parameter.empty
        and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and argument not in arguments
    ]
    if missing:
        raise UserError(f"{name} needs {', '.join(missing)}; it accepts: {listing}")
    try:
        return schedule_class(optimizer, **arguments)
    except (TypeError, ValueError) as error:
        raise UserError(f"{name} rejects its arguments: {error}") from None
