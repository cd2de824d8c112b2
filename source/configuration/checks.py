"""Checks for configobj's ``validate`` module beyond its built-in types.

A check receives the text read from the configuration file (a string, or a list of strings for
comma-separated values) and returns the typed value, or raises ``InvalidValue`` whose message
says what the key expects. The name checks ask the model, data set, optimizer and schedule
registries handed in (``Registries``), so a wrong name is caught together with every other
configuration error.
"""

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from validate import ValidateError, VdtValueError, is_integer

from source.arguments import did_you_mean

__all__ = [
    "CHECKS",
    "MAX_NAME_LENGTH",
    "InvalidValue",
    "Registries",
    "all_checks",
    "parse_free_text",
]

MAX_NAME_LENGTH = 100
"""Longest experiment name and comparison entry id, in bytes (UTF-8): each becomes a folder name (runs
and plots, an entry's folder), well within the 255 bytes file systems allow a name."""

_CUDA_DEVICE = re.compile(r"cuda(:\d+)?")
# '#' starts a comment in configuration files (configobj cuts the value there), ';' separates
# shell commands, and the path separators would put the run outside its runs_folder.
_FORBIDDEN_IN_NAMES = "#;/\\"
_TRUE_WORDS = ("true", "yes", "on")
_FALSE_WORDS = ("false", "no", "off")


class InvalidValue(VdtValueError):
    """A value a check rejects; ``expectation`` says what the key expects instead."""

    def __init__(self, expectation):
        Exception.__init__(self, expectation)
        self.expectation = expectation


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
    expectation = (
        f"a folder name of at most {MAX_NAME_LENGTH} bytes (UTF-8) without spaces at its ends and without "
        f"any of {' '.join(_FORBIDDEN_IN_NAMES)} (the run's folder inside runs_folder)"
    )
    name = _require_text(value, expectation)
    if (
        not name.strip()
        or name != name.strip()
        or name in (".", "..")
        or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_LENGTH
        or any(character in name for character in _FORBIDDEN_IN_NAMES)
        or not name.isprintable()
    ):
        raise InvalidValue(expectation)
    return name


def _check_finite_float(value, min=None, max=None):
    """A finite number within [min, max]: inf and nan mean nothing for the keys that take this check."""
    bounds = " and ".join(
        f"{relation} {bound}" for relation, bound in ((">=", min), ("<=", max)) if bound is not None
    )
    expectation = f"a finite number {bounds}".strip()
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidValue(expectation) from None
    too_small = min is not None and number < float(min)
    too_large = max is not None and number > float(max)
    if not math.isfinite(number) or too_small or too_large:
        raise InvalidValue(expectation)
    return number


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


CHECKS = {
    "device": _check_device,
    "folder_name": _check_folder_name,
    "finite_float": _check_finite_float,
    "integer_or": _check_integer_or,
    "integer_list": _check_integer_list,
    "free_value": _check_free_value,
}
"""Custom checks by the name the configspec uses, but for the name checks, which ``all_checks`` adds."""


@dataclass(frozen=True)
class Registries:
    """The names a configuration may choose, asked of each registry when a name is checked.

    Each field returns the names of one registry in the order messages list them. The
    configuration imports no registry, so that it stays below the models, data sets, optimizers
    and schedules it configures; whoever loads a configuration hands them in (source/registries.py).
    """

    models: Callable[[], Sequence[str]]
    data_sets: Callable[[], Sequence[str]]
    optimizers: Callable[[], Sequence[str]]
    schedules: Callable[[], Sequence[str]]


def _check_recorded_name(value):
    return _require_text(value, "a name")


def all_checks(registries):
    """Every custom check by its configspec name: ``CHECKS`` and the name checks, which ask ``registries``.

    Without registries (None) names are read as written: a configuration that a run recorded was
    checked when it started, and reading a finished run then loads none of the registries.
    """
    if registries is None:
        return {
            **CHECKS,
            **dict.fromkeys(("model_name", "dataset_name", "optimizer_name", "schedule_name"), _check_recorded_name),
        }
    return {
        **CHECKS,
        "model_name": _registry_check("model", registries.models),
        "dataset_name": _registry_check("data set", registries.data_sets),
        "optimizer_name": _registry_check("optimizer", registries.optimizers),
        "schedule_name": _registry_check("schedule", registries.schedules),
    }
