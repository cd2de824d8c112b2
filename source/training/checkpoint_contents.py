"""What last.pt and best.pt must hold to continue a run, checked before anything in the run folder changes.

``torch.load(weights_only=True)`` admits any tensors and plain values, so an edited or damaged
checkpoint can hold weights on the meta device or in a sparse layout, float16 weights, an
optimizer buffer of another shape, or counters of the wrong type or out of range (``step = True``,
``metrics_offset = -1``). Restored, they would fail with a traceback steps later or, worse, train on
silently. Every check here raises ``UserError`` with one line naming the file and the entry.
Optimizer, schedule and counter states are compared with the states of the freshly built
experiment: the same keys, and numbers, flags and tensors (dtype and shape) where it has them.
"""

import math

import torch

from source.errors import UserError

__all__ = ["check_best_checkpoint", "check_last_checkpoint", "check_model_state"]

_LONGEST_NAME = 60


def _refuse(path, problem):
    raise UserError(f"cannot use the checkpoint {path}: {problem}")


def _is_count(value):
    """A whole number >= 0 (``True`` is no count, though Python's bool is an int)."""
    return type(value) is int and value >= 0


def _is_number(value):
    return type(value) in (int, float) and math.isfinite(value)


def _described(tensor):
    return f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"


def _check_tensors(value, path, where):
    """Every tensor inside ``value`` dense and in memory (read onto the CPU): no meta, sparse or quantized ones."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            layout = str(value.layout).removeprefix("torch.")
            _refuse(path, f"its {where[:_LONGEST_NAME]} is a {layout} tensor, not a dense one")
        if value.device.type != "cpu":
            _refuse(path, f"its {where[:_LONGEST_NAME]} is on the {value.device.type} device, which holds no values")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_tensors(item, path, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_tensors(item, path, f"{where}[{index}]")


def _kind_misfit(saved, fresh, where):
    """Where ``saved`` differs in kind from the freshly built ``fresh`` (None: nowhere).

    Flags must be flags, numbers numbers (whole and >= 0 where ``fresh`` is such a count), tensors
    of ``fresh``'s dtype and shape, and dictionaries hold ``fresh``'s keys. A None in ``fresh`` is a
    value not yet known, and lists of another length (histories) are not compared item by item.
    """
    if fresh is None:
        return None
    if isinstance(fresh, bool):
        return None if isinstance(saved, bool) else f"its {where} is {saved!r}, not true or false"
    if isinstance(fresh, (int, float)):
        if type(saved) not in (int, float):
            return f"its {where} is {saved!r}, not a number"
        if type(fresh) is int and fresh >= 0 and saved < 0:
            return f"its {where} is {saved!r}, below 0"
        return None
    if isinstance(fresh, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            return f"its {where} is a {type(saved).__name__}, not a tensor"
        if saved.dtype != fresh.dtype or saved.shape != fresh.shape:
            return f"its {where} is a {_described(saved)} tensor, not {_described(fresh)}"
        return None
    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            return f"its {where} is a {type(saved).__name__}, not a dict"
        missing = [str(key) for key in fresh if key not in saved]
        if missing:
            return f"its {where} lacks {', '.join(missing[:3])}"
        return next(
            (problem for key in fresh if (problem := _kind_misfit(saved[key], fresh[key], f"{where}.{key}"))), None
        )
    if isinstance(fresh, (list, tuple)):
        if not isinstance(saved, (list, tuple)):
            return f"its {where} is a {type(saved).__name__}, not a list"
        if len(saved) != len(fresh):
            return None
        return next(
            (problem for index, (item, own) in enumerate(zip(saved, fresh))
             if (problem := _kind_misfit(item, own, f"{where}[{index}]"))),
            None,
        )  # fmt: skip
    return None


def _check_kinds(saved, fresh, path, where):
    problem = _kind_misfit(saved, fresh, where)
    if problem is not None:
        _refuse(path, problem[: _LONGEST_NAME + 80])


def check_model_state(state, model, path):
    """``UserError`` unless ``state`` holds finite, dense weights of exactly ``model``'s names, shapes and dtypes."""
    if not isinstance(state, dict):
        _refuse(path, "its model entry is not a state dict")
    _check_tensors(state, path, "model")
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    reshaped = [
        name
        for name in expected
        if name in state and (not isinstance(state[name], torch.Tensor) or state[name].shape != expected[name].shape)
    ]
    if missing or unexpected or reshaped:
        example = (missing or unexpected or reshaped)[0][:_LONGEST_NAME]
        _refuse(
            path,
            f"it holds another model's weights ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(reshaped)} of another shape, e.g. {example})",
        )
    for name, tensor in expected.items():
        if state[name].dtype != tensor.dtype:
            _refuse(
                path,
                f"its model.{name[:_LONGEST_NAME]} is {str(state[name].dtype).removeprefix('torch.')}, "
                f"but the model's is {str(tensor.dtype).removeprefix('torch.')}",
            )
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            _refuse(
                path, f"its {name[:_LONGEST_NAME]} is not finite (NaN or inf); remove the file to start the run again"
            )


def _check_optimizer_state(state, optimizer, path):
    """``UserError`` unless ``state`` is a state dict of this optimizer over these parameters, in their shapes."""
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list) or "state" not in state:
        _refuse(path, "its optimizer entry is not an optimizer's state dict")
    fresh = optimizer.state_dict()
    groups, own_groups = state["param_groups"], fresh["param_groups"]
    if len(groups) != len(own_groups) or any(
        not isinstance(group, dict) or len(group.get("params", ())) != len(own["params"])
        for group, own in zip(groups, own_groups)
    ):
        _refuse(path, "its optimizer state is for other parameters")
    unexpected = sorted({key for group in groups for key in group} - {key for own in own_groups for key in own})
    if unexpected:
        _refuse(
            path,
            f"it holds another optimizer's state (settings {', '.join(unexpected[:3])}); "
            "put the arguments it was started with into its configuration.txt",
        )
    for number, (group, own) in enumerate(zip(groups, own_groups)):
        settings = {key: value for key, value in own.items() if key != "params"}
        _check_kinds(group, settings, path, f"optimizer setting group {number}")
    for key in fresh:
        if key not in ("state", "param_groups"):
            _check_kinds(state.get(key), fresh[key], path, f"optimizer.{key}")
    _check_parameter_states(state, optimizer, path)


def _check_parameter_states(state, optimizer, path):
    """Each parameter's optimizer buffers (momentum, averages) in the parameter's shape and dtype."""
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    identifiers = [identifier for group in state["param_groups"] for identifier in group["params"]]
    position = {identifier: index for index, identifier in enumerate(identifiers)}
    buffers = state["state"]
    if not isinstance(buffers, dict) or any(
        identifier not in position or not isinstance(values, dict) for identifier, values in buffers.items()
    ):
        _refuse(path, "its optimizer state names parameters the optimizer does not have")
    for identifier, values in buffers.items():
        parameter = parameters[position[identifier]]
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.shape != parameter.shape or value.dtype != parameter.dtype:
                    _refuse(
                        path,
                        f"its optimizer's {name} of parameter {position[identifier]} is a {_described(value)} "
                        f"tensor, but the parameter is {_described(parameter)}",
                    )


def _result_problem(values, quality, finite):
    """Why ``values`` is no evaluation result with loss and ``quality`` (None: it is one)."""
    if not isinstance(values, dict) or not values:
        return "is empty" if isinstance(values, dict) else f"is a {type(values).__name__}, not metrics"
    missing = [name for name in ("loss", quality) if name not in values]
    if missing:
        return f"lacks {', '.join(missing)}"
    wrong = [name for name, value in values.items() if type(value) not in (int, float)]
    if wrong:
        return f"has a {wrong[0][:_LONGEST_NAME]} that is not a number"
    if finite and not all(map(math.isfinite, values.values())):
        return "is not finite"
    return None


def _check_counters(checkpoint, path, quality):
    """The step, offsets, times, flags and results of last.pt: types and ranges."""
    step = checkpoint["step"]
    if not _is_count(step):
        _refuse(path, f"its step {step!r} is not a step count")
    if not _is_count(checkpoint["metrics_offset"]):
        _refuse(path, f"its metrics_offset {checkpoint['metrics_offset']!r} is not a byte offset (a whole number >= 0)")
    elapsed = checkpoint["elapsed_seconds"]
    if not (_is_number(elapsed) and elapsed >= 0):
        _refuse(path, f"its elapsed_seconds {str(elapsed)[:20]!r} is not a number of seconds >= 0")
    if not isinstance(checkpoint["finished"], bool):
        _refuse(path, f"its finished {checkpoint['finished']!r} is not true or false")
    best = checkpoint["best"]
    if best is not None:
        if not isinstance(best, dict) or not _is_count(best.get("step")) or best["step"] > step:
            _refuse(path, f"its record of the best checkpoint is damaged (it names no step from 0 to {step})")
        problem = _result_problem(best.get("validation"), quality, finite=True)
        if problem:
            _refuse(path, f"its best validation result {problem}")
    if checkpoint["test"] is not None:
        problem = _result_problem(checkpoint["test"], quality, finite=False)
        if problem:
            _refuse(path, f"its test result {problem}")
    diverged = checkpoint.get("diverged")
    if diverged is not None and not (
        isinstance(diverged, dict) and _is_count(diverged.get("step")) and isinstance(diverged.get("reason"), str)
    ):
        _refuse(path, "its record of the divergence is damaged")
    processes = checkpoint.get("partial_sums_of_processes")
    if processes is not None and not (_is_count(processes) and processes >= 1):
        _refuse(path, f"its partial_sums_of_processes {processes!r} is not a number of processes")


def _check_process_buffers(buffers, model, path):
    """Each process's BatchNorm statistics (several processes): the model's floating buffers, in their shapes."""
    if buffers is None:
        return
    own = [buffer for buffer in model.buffers() if buffer.is_floating_point()]
    if not isinstance(buffers, list) or any(
        not isinstance(process, list)
        or len(process) != len(own)
        or any(
            not isinstance(saved, torch.Tensor) or saved.shape != mine.shape or saved.dtype != mine.dtype
            for saved, mine in zip(process, own)
        )
        for process in buffers
    ):
        _refuse(path, "its process_buffers do not match the model's BatchNorm statistics")


def check_last_checkpoint(checkpoint, experiment, fresh_states, quality, path):
    """``UserError`` unless last.pt's ``checkpoint`` can continue ``experiment``.

    ``fresh_states`` maps the entries that hold state of the training loop (training_window,
    evaluation_interval, divergence, random_state, schedule) to their freshly built state, which
    the saved ones must match in kind; ``quality`` is the validation metric ("accuracy" or "rmse").
    """
    _check_tensors(checkpoint, path, "")
    _check_counters(checkpoint, path, quality)
    check_model_state(checkpoint["model"], experiment.model, path)
    _check_optimizer_state(checkpoint["optimizer"], experiment.optimizer, path)
    for key, fresh in fresh_states.items():
        if key in checkpoint or key != "divergence":  # older checkpoints have no divergence counters
            _check_kinds(checkpoint.get(key), fresh, path, key)
    _check_process_buffers(checkpoint.get("process_buffers"), experiment.model, path)


def check_best_checkpoint(checkpoint, model, quality, path):
    """``UserError`` unless best.pt's ``checkpoint`` holds a step, this model's weights and a validation result."""
    _check_tensors(checkpoint, path, "")
    if not _is_count(checkpoint["step"]):
        _refuse(path, f"its step {checkpoint['step']!r} is not a step count")
    check_model_state(checkpoint["model"], model, path)
    problem = _result_problem(checkpoint["validation"], quality, finite=True)
    if problem:
        _refuse(path, f"its validation result {problem}")
