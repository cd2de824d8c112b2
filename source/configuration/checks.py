"""Checks for configobj's ``validate`` module beyond its built-in types.

A check receives the text read from the configuration file (a string, or a list of strings for
comma-separated values) and returns the typed value, or raises ``InvalidValue`` whose message
says what the key expects. The registry checks ask the model, data set, optimizer and schedule
registries, so a wrong name is caught together with every other configuration error.
"""

import difflib
import re

from validate import ValidateError, VdtValueError, is_integer

__all__ = ["CHECKS", "InvalidValue", "did_you_mean", "parse_free_text"]

_CUDA_DEVICE = re.compile(r"cuda(:\d+)?")
_TRUE_WORDS = ("true", "yes", "on")
_FALSE_WORDS = ("false", "no", "off")


class InvalidValue(VdtValueError):
    """A value a check rejects; ``expectation`` says what the key expects instead."""

    def __init__(self, expectation):
        Exception.__init__(self, expectation)
        self.expectation = expectation


def did_you_mean(word, choices):
    """Return " (did you mean 'x'?)" for the closest of ``choices`` to ``word``, or ""."""
    matches = difflib.get_close_matches(str(word), [str(choice) for choice in choices], n=1)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def _require_text(value, expectation):
    if not isinstance(value, str):
        raise InvalidValue(expectation)
    return value


def _check_device(value):
    expectation = "auto, cpu, cuda or cuda:N (N = GPU index)"
    device = _require_text(value, expectation)
    if device in ("auto", "cpu") or _CUDA_DEVICE.fullmatch(device):
        return device
    raise InvalidValue(expectation)


def _check_folder_name(value):
    expectation = "a folder name without '/' or '\\' (the run's folder inside runs_folder)"
    name = _require_text(value, expectation)
    if not name.strip() or name != name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        raise InvalidValue(expectation)
    return name


def _check_integer_or(value, word, min=None, max=None):
    """An integer within [min, max] (validate passes the bounds by these names), or ``word``."""
    if value == word:
        return word
    bounds = " and ".join(
        f"{relation} {bound}" for relation, bound in ((">=", min), ("<=", max)) if bound is not None
    )
    expectation = f"an integer {bounds} or {word}" if bounds else f"an integer or {word}"
    try:
        return is_integer(value, min, max)
    except ValidateError:
        raise InvalidValue(expectation) from None


def _check_integer_list(value, min=None, max=None):
    """Distinct integers within [min, max], comma-separated; one value or none at all is a list too."""
    items = value if isinstance(value, list) else [value]
    bounds = " and ".join(
        f"{relation} {bound}" for relation, bound in ((">=", min), ("<=", max)) if bound is not None
    )
    expectation = f"a comma-separated list of distinct integers {bounds}".strip()
    try:
        numbers = [is_integer(item, min, max) for item in items if not (isinstance(item, str) and not item.strip())]
    except ValidateError:
        raise InvalidValue(expectation) from None
    if len(set(numbers)) != len(numbers):
        raise InvalidValue(expectation)
    return numbers


def parse_free_text(text):
    """Type one word of a free-form argument: boolean, none, integer, float or text."""
    word = text.strip()
    lowered = word.lower()
    if lowered in _TRUE_WORDS:
        return True
    if lowered in _FALSE_WORDS:
        return False
    if lowered == "none":
        return None
    for convert in (int, float):
        try:
            return convert(word)
        except ValueError:
            pass
    return word


def _check_free_value(value):
    """A free-form argument (optimizer or schedule): typed word, or list of typed words."""
    if isinstance(value, list):
        return [parse_free_text(item) for item in value]
    return parse_free_text(value)


def _registry_check(kind, names_of):
    """Make a check that accepts exactly the names ``names_of()`` returns."""

    def check(value):
        names = names_of()
        choices = ", ".join(names)
        name = _require_text(value, f"a {kind} name, one of: {choices}")
        if name not in names:
            raise InvalidValue(f"a known {kind}{did_you_mean(name, names)}; choose one of: {choices}")
        return name

    return check


def _models():
    from source.models import available_models

    return list(available_models())


def _datasets():
    from source.data import available_datasets

    return list(available_datasets())


def _optimizers():
    from source.optimizer import OPTIMIZERS

    return sorted(OPTIMIZERS)


def _schedules():
    from source.training.schedules import available_schedules

    return available_schedules()


CHECKS = {
    "device": _check_device,
    "folder_name": _check_folder_name,
    "integer_or": _check_integer_or,
    "integer_list": _check_integer_list,
    "free_value": _check_free_value,
    "model_name": _registry_check("model", _models),
    "dataset_name": _registry_check("data set", _datasets),
    "optimizer_name": _registry_check("optimizer", _optimizers),
    "schedule_name": _registry_check("schedule", _schedules),
}
"""Custom checks by the name the configspec uses."""
