"""Checks for configobj's ``validate`` module beyond its built-in types, and of free-form arguments.

A check receives the text read from the configuration file (a string, or a list of strings for
comma-separated values) and returns the typed value, or raises ``InvalidValue`` whose message
says what the key expects. The registry checks ask the model, data set, optimizer and schedule
registries, so a wrong name is caught together with every other configuration error.

Free-form arguments ([optimizer] and [schedule] ``[[arguments]]``) are typed words; which types
they need is known only once the class they go to is chosen. ``check_argument_types`` compares
them with the type annotations of that class's signature, and ``find_refused_argument`` finds the
one argument that a class's constructor refuses, so that every message names its key.
"""

import ast
import difflib
import inspect
import math
import re

from validate import ValidateError, VdtValueError, is_integer

from source.errors import UserError

__all__ = [
    "CHECKS",
    "MAX_NAME_LENGTH",
    "RECORDED_NAME_CHECKS",
    "InvalidArgument",
    "InvalidValue",
    "check_argument_types",
    "did_you_mean",
    "find_refused_argument",
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
    "finite_float": _check_finite_float,
    "integer_or": _check_integer_or,
    "integer_list": _check_integer_list,
    "free_value": _check_free_value,
    "model_name": _registry_check("model", _models),
    "dataset_name": _registry_check("data set", _datasets),
    "optimizer_name": _registry_check("optimizer", _optimizers),
    "schedule_name": _registry_check("schedule", _schedules),
}
"""Custom checks by the name the configspec uses."""


def _check_recorded_name(value):
    return _require_text(value, "a name")


RECORDED_NAME_CHECKS = {
    **CHECKS,
    **dict.fromkeys(("model_name", "dataset_name", "optimizer_name", "schedule_name"), _check_recorded_name),
}
"""``CHECKS`` for a configuration a run recorded: its names of registry entries were checked when
it started, and are read as written, so that reading a finished run loads none of the registries."""


class InvalidArgument(UserError):
    """A free-form argument that the class it goes to refuses; ``argument`` names it."""

    def __init__(self, argument, message):
        super().__init__(message)
        self.argument = argument


# Annotation words, without module prefixes, that a typed word of a configuration can match.
_SIMPLE_TYPES = {
    "int": ("an integer", lambda value: isinstance(value, int) and not isinstance(value, bool)),
    "float": ("a number", lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)),
    "bool": ("true or false", lambda value: isinstance(value, bool)),
    "str": ("a text", lambda value: isinstance(value, str)),
    "None": ("none", lambda value: value is None),
}
_PLURALS = {"an integer": "integers", "a number": "numbers", "true or false": "booleans", "a text": "texts"}
_SEQUENCES = ("list", "List", "Iterable", "Sequence")
# A tensor-valued alternative (torch's ``lr: float | Tensor``) cannot come from a configuration file.
_UNREACHABLE = ("Tensor",)


def _split_top_level(text, separator):
    """Split ``text`` at ``separator`` outside brackets: "a | b[c | d]" -> ["a", "b[c | d]"]."""
    parts, depth, start = [], 0, 0
    for position, character in enumerate(text):
        depth += character == "["
        depth -= character == "]"
        if character == separator and depth == 0:
            parts.append(text[start:position])
            start = position + 1
    parts.append(text[start:])
    return [part.strip() for part in parts]


def _alternatives(annotation):
    """The (description, accepts) pairs of an annotation such as "int | None"; None if not understood."""
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    text = re.sub(r"\b(?:collections\.abc|typing|torch)\.", "", text)
    alternatives = []
    for part in _split_top_level(text, "|"):
        head, _, inner = part.partition("[")
        inner = inner[:-1]
        if part in _SIMPLE_TYPES:
            alternatives.append(_SIMPLE_TYPES[part])
        elif part in _UNREACHABLE:
            continue
        elif head == "Optional":
            alternatives += _alternatives(inner) or [None]
            alternatives.append(_SIMPLE_TYPES["None"])
        elif head == "Union":
            for member in _split_top_level(inner, ","):
                alternatives += _alternatives(member) or [None]
        elif head == "Literal":
            words = ast.literal_eval(f"({inner},)")
            alternatives.append((f"one of {', '.join(map(str, words))}", lambda value, words=words: value in words))
        elif head in _SEQUENCES and inner:
            element = _alternatives(inner)
            if element is None or len(element) != 1 or element[0][0] not in _PLURALS:
                return None
            description, accepts = element[0]
            alternatives.append(
                (
                    f"a comma-separated list of {_PLURALS[description]} (a single one with a trailing comma: 5,)",
                    lambda value, accepts=accepts: isinstance(value, list) and all(map(accepts, value)),
                )
            )
        elif head in ("tuple", "Tuple") and inner and "..." not in inner:
            elements = [_alternatives(member) for member in _split_top_level(inner, ",")]
            if any(element is None or len(element) != 1 or element[0][0] not in _PLURALS for element in elements):
                return None
            descriptions = {element[0][0] for element in elements}
            noun = _PLURALS[descriptions.pop()] if len(descriptions) == 1 else "values"
            alternatives.append(
                (
                    f"a comma-separated list of {len(elements)} {noun}",
                    lambda value, elements=elements: isinstance(value, list)
                    and len(value) == len(elements)
                    and all(element[0][1](item) for element, item in zip(elements, value)),
                )
            )
        else:
            return None
    if None in alternatives or not alternatives:
        return None
    return alternatives


def _expected_types(parameter):
    """(description, accepts) pairs for one constructor parameter, from its annotation or else its default."""
    if parameter.annotation is not inspect.Parameter.empty:
        return _alternatives(parameter.annotation)
    default = parameter.default
    if isinstance(default, bool):
        return [_SIMPLE_TYPES["bool"]]
    if isinstance(default, (int, float)):
        return [_SIMPLE_TYPES["float"]]
    if isinstance(default, str):
        return [_SIMPLE_TYPES["str"]]
    return None


def _has_nan(value):
    items = value if isinstance(value, list) else [value]
    return any(isinstance(item, float) and math.isnan(item) for item in items)


def check_argument_types(function, arguments):
    """Raise ``InvalidArgument`` for the first of ``arguments`` whose type ``function``'s signature refuses.

    ``arguments`` are typed words as ``parse_free_text`` makes them. Parameters whose annotation
    is not understood are left to ``function`` itself; NaN is refused everywhere, since no
    argument means anything with it.
    """
    parameters = inspect.signature(function).parameters
    for argument, value in arguments.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        if _has_nan(value):
            raise InvalidArgument(argument, f"argument {argument} = {shown!r}: expected a number, not nan")
        if argument not in parameters:
            continue
        alternatives = _expected_types(parameters[argument])
        if alternatives is None or any(accepts(value) for _, accepts in alternatives):
            continue
        expectation = " or ".join(description for description, _ in alternatives)
        raise InvalidArgument(argument, f"argument {argument} = {shown!r}: expected {expectation}")


def find_refused_argument(build, arguments):
    """The one of ``arguments`` without which ``build(arguments)`` succeeds; None if none or several are.

    A constructor's message ("Invalid learning rate: -1") rarely names the argument it refuses;
    leaving each out in turn finds it, so the message can name the key it came from.
    """
    culprits = []
    for argument in arguments:
        try:
            build({name: value for name, value in arguments.items() if name != argument})
        except Exception:  # noqa: BLE001 — any failure means this argument alone is not to blame
            continue
        culprits.append(argument)
    return culprits[0] if len(culprits) == 1 else None
