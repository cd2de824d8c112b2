"""Free-form keyword arguments checked against the class they go to, and did-you-mean hints.

The [optimizer] and [schedule] ``[[arguments]]`` of a configuration are typed words; which types
they need is known only once the class they go to is chosen. ``check_argument_types`` compares
them with the type annotations of that class's signature, and ``find_refused_argument`` finds the
one argument that a class's constructor refuses, so that every message names its key. This module
knows no registry: the optimizer and schedule registries and the configuration checks all use it.
"""

import ast
import difflib
import inspect
import math
import re

from source.errors import UserError

__all__ = ["InvalidArgument", "check_argument_types", "did_you_mean", "find_refused_argument"]


def did_you_mean(word, choices):
    """Return " (did you mean 'x'?)" for the closest of ``choices`` to ``word``, or ""."""
    matches = difflib.get_close_matches(str(word), [str(choice) for choice in choices], n=1)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


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

    ``arguments`` are typed words as a configuration file gives them (booleans, none, numbers,
    texts, or lists of them). Parameters whose annotation is not understood are left to
    ``function`` itself; NaN is refused everywhere, since no argument means anything with it.
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
