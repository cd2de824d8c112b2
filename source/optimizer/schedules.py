"""Learning-rate schedules by name: torch.optim.lr_scheduler classes, stepped once per training step.

All step counts in a schedule's arguments are training steps (inference batches), as in the
paper: its SGD baseline is MultiStepLR with milestones 75000, 112500 and gamma 0.1.
"""

import copy
import inspect
import math

import torch
from torch.optim import lr_scheduler

from source.arguments import InvalidArgument, check_argument_types, did_you_mean, find_refused_argument
from source.errors import UserError

__all__ = ["NO_SCHEDULE", "accepted_schedule_arguments", "available_schedules", "build_schedule"]

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


def accepted_schedule_arguments(name):
    """The keyword arguments a user may give the schedule ``name`` (none for "none")."""
    return [] if name == NO_SCHEDULE else list(_accepted_arguments(_schedule_classes()[name]))


def _rehearse(schedule_class, optimizer, arguments, training_steps):
    """Build the schedule on a throwaway SGD with ``optimizer``'s settings and step it ``training_steps`` times.

    Returns the training step (0: construction) at which it failed and the exception, or None.
    The trainer steps the schedule once after every training step, so arguments that the class
    accepts but cannot run with (OneCycleLR's total_steps too short, CosineAnnealingLR's T_max = 0)
    fail here, before training, instead of at that step of the run.
    """
    groups = [
        {**copy.deepcopy({key: value for key, value in group.items() if key != "params"}), "params": [torch.zeros(1)]}
        for group in optimizer.param_groups
    ]
    stand_in = torch.optim.SGD(groups)
    step = 0
    try:
        schedule = schedule_class(stand_in, **arguments)
        # An optimizer step before the first schedule step, as in training (torch warns otherwise).
        stand_in.step()
        for step in range(1, training_steps + 1):
            schedule.step()
            for rate in schedule.get_last_lr():
                rate = float(rate)
                if not math.isfinite(rate) or rate < 0:
                    raise ValueError(f"it gives the learning rate {rate:g}")
    except Exception as error:  # noqa: BLE001 — whatever the class raises, its arguments caused it
        return step, error
    return None


def build_schedule(name, optimizer, arguments, training_steps, *, follows_schedule=True):
    """Build schedule ``name`` for ``optimizer`` with ``arguments``; None for "none".

    Unknown, missing or mistyped arguments, values the class rejects, and schedules that fail
    within ``training_steps`` steps raise ``UserError`` (an ``InvalidArgument`` where one argument
    is to blame) saying what the class accepts. An optimizer that does not ``follows_schedule``
    (a line search such as LABPAL) sets its own learning rate and takes no schedule.
    """
    if name == NO_SCHEDULE:
        if arguments:
            raise UserError(f"arguments {', '.join(arguments)} given, but the schedule is none")
        return None
    if not follows_schedule:
        raise UserError(
            f"{type(optimizer).__name__} sets its own learning rate; use name = none instead of {name}"
        )
    schedule_class = _schedule_classes()[name]
    accepted = _accepted_arguments(schedule_class)
    listing = ", ".join(accepted)
    for argument in arguments:
        if argument not in accepted:
            raise InvalidArgument(
                argument,
                f"{name} takes no argument {argument}{did_you_mean(argument, accepted)}; it accepts: {listing}",
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
        check_argument_types(schedule_class.__init__, arguments)
    except InvalidArgument as error:
        raise InvalidArgument(error.argument, f"{error} ({name})") from None
    failure = _rehearse(schedule_class, optimizer, arguments, training_steps)
    if failure is not None:
        step, error = failure
        when = "rejects its arguments" if step == 0 else f"fails at training step {step} of {training_steps}"
        reason = " ".join(str(error).split()) or type(error).__name__

        def rehearse(trial):
            if _rehearse(schedule_class, optimizer, trial, training_steps) is not None:
                raise ValueError(trial)

        culprit = find_refused_argument(rehearse, arguments)
        if culprit is not None:
            raise InvalidArgument(culprit, f"{name} {when} because of argument {culprit}: {reason}")
        raise UserError(f"{name} {when}: {reason}")
    return schedule_class(optimizer, **arguments)
