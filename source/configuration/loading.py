"""Read a configuration file, apply command-line overrides and validate against the configspec.

Every problem becomes a ``UserError`` with one line that names the file (or the ``--set``
that caused it), the key and what is expected, so ``main.py`` can print it and exit.
"""

import ast
import contextlib
import copy
import dataclasses
import stat
from dataclasses import dataclass, field
from pathlib import Path

from configobj import ConfigObj, ConfigObjError, Section, flatten_errors
from validate import Validator

from source.arguments import did_you_mean
from source.configuration.checks import InvalidValue, Registries, all_checks
from source.configuration.settings import RunSettings
from source.errors import DataFileError, UserError

__all__ = [
    "COMPARISON",
    "ENTRY_SECTIONS",
    "SPECIFICATION_PATH",
    "Configuration",
    "Registries",
    "differing_keys",
    "format_configuration",
    "key_label",
    "load_configuration",
    "section_label",
]

SPECIFICATION_PATH = Path(__file__).with_name("configspec.ini")
"""The configspec: type, range and default of every key."""

COMPARISON = "comparison"
"""The optional section that makes a configuration a comparison of optimizers."""

ENTRY_SECTIONS = ("optimizer", "schedule")
"""Sections a comparison does not have: each of its entries names its own optimizer and schedule."""

_FREE_FORM = "__many__"


def section_label(path):
    """Name a (nested) section as in the file: ("optimizer", "arguments") -> "[optimizer] [[arguments]]"."""
    return " ".join("[" * depth + name + "]" * depth for depth, name in enumerate(path, start=1))


def key_label(path, key):
    """Name a key as in the file: "[training] batch_size"."""
    return f"{section_label(path)} {key}".strip()


@dataclass(frozen=True)
class Configuration:
    """A validated configuration: typed values by section, and the file they were read from.

    ``sections["training"]["batch_size"]`` (or ``configuration["training"]["batch_size"]``)
    is an int; free-form ``arguments`` subsections hold typed words (bool, None, int, float,
    text, or lists of them). A comparison has a [comparison] section and no [optimizer] or
    [schedule]; any other configuration has no [comparison]. ``overrides`` maps the key path of
    each value given with ``--set``, such as ("training", "batch_size"), to that option's text
    ("--set training.batch_size=64"), so that messages name the option instead of the file.
    """

    sections: dict
    source: str
    overrides: dict = field(default_factory=dict)

    def __getitem__(self, section):
        return self.sections[section]

    @property
    def settings(self):
        """The sections as frozen, typed ``RunSettings``."""
        return RunSettings.of(self)

    def with_values(self, values):
        """A copy with the values at the given key paths replaced: {("data", "pipeline"): "device"}."""
        sections = copy.deepcopy(self.sections)
        for (section, key), value in values.items():
            sections[section][key] = value
        return dataclasses.replace(self, sections=sections)

    @property
    def is_comparison(self):
        """Whether this is a comparison of optimizers (it has a [comparison] section)."""
        return COMPARISON in self.sections

    def origin(self, path):
        """Where the value at key path ``path`` (or the values inside it) came from: the --set options, or the file."""
        given = [text for key_path, text in self.overrides.items() if key_path[: len(path)] == path]
        return ", ".join(given) or self.source

    def where(self, section, key=None):
        """Name a section or key for messages: "configuration_lab_pal.txt: [training] batch_size"."""
        label = key_label((section,), key) if key else section_label((section,))
        return f"{self.origin((section, key) if key else (section,))}: {label}"

    @contextlib.contextmanager
    def blame(self, section, key=None):
        """Prefix a ``UserError`` raised inside with the file (or --set) and key it comes from.

        An ``InvalidArgument`` names one of the section's [[arguments]], and its --set if it has one;
        a ``DataFileError`` names its file and passes unchanged.
        """
        try:
            yield
        except DataFileError:
            raise
        except UserError as error:
            argument = getattr(error, "argument", None)
            where = self.where(section, key) if argument is None else self.where_argument(section, argument)
            raise UserError(f"{where}: {error}") from None

    def where_argument(self, section, argument):
        """Name one of a section's [[arguments]] for messages: its --set, or else the file and the section."""
        if not self.overrides:
            return self.where(section)
        origin = self.overrides.get((section, "arguments", argument), self.source)
        return f"{origin}: {section_label((section,))}"


def load_configuration(path, overrides=(), *, registries):
    """Read ``path``, apply ``overrides`` ("section.key=value" texts) and validate everything.

    Names of models, data sets, optimizers and schedules are checked against ``registries``
    (``source.registries.load_configuration`` hands in the project's). ``registries=None`` reads the
    configuration.txt of a run or comparison that was checked when it started: its names are taken
    as written, without loading their registries.
    Returns a ``Configuration`` with every key of the configspec present and typed.
    Raises ``UserError`` naming the first problem (and how many more there are).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"configuration file {path} {_why_not_a_file(path)}; give a configuration file with --config PATH"
        )
    source = str(path)
    try:
        document = ConfigObj(
            source,
            configspec=str(SPECIFICATION_PATH),
            encoding="utf-8",
            interpolation=False,
            file_error=True,
            raise_errors=True,
        )
    except (ConfigObjError, UnicodeDecodeError) as error:
        raise UserError(f"{source}: not a valid configuration file: {error}") from None
    origins = {}
    for override in overrides:
        origins[_apply_override(document, override)] = f"--set {_abbreviate(override)}"
    _check_structure(document, document.configspec, source, origins, ())
    is_comparison = COMPARISON in document
    if is_comparison:
        _check_no_entry_sections(document, source, origins)
    _validate(document, all_checks(registries), source, origins)
    sections = document.dict()
    # Validation fills in every section of the configspec; keep those this kind of configuration has.
    for name in ENTRY_SECTIONS if is_comparison else (COMPARISON,):
        del sections[name]
    return Configuration(sections=sections, source=source, overrides=origins)


def _why_not_a_file(path):
    """Why ``path``, which is not a regular file, cannot be read as a configuration file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "not found"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    return "is not a regular file (a pipe or socket)"


def format_configuration(configuration, header):
    """Render ``configuration`` as configuration-file text that loads back to equal values.

    ``header`` (a list of lines) becomes the file's leading comment.
    """
    document = ConfigObj(configuration.sections, interpolation=False)
    document.initial_comment = [f"# {line}" if line else "#" for line in header]
    return "\n".join(document.write()) + "\n"


def differing_keys(first, second):
    """Key paths such as ("training", "batch_size") whose values differ between two configurations."""
    return [path + (key,) for path, key in _walk_differences(first.sections, second.sections, ())]


def _walk_differences(first, second, path):
    for key in sorted(set(first) | set(second)):
        left, right = first.get(key), second.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            yield from _walk_differences(left, right, path + (key,))
        elif left != right or type(left) is not type(right):
            yield path, key


def _apply_override(document, override):
    """Set one "section.key=value" (value parsed as in the file) and return its key path."""
    dotted, separator, text = override.partition("=")
    key_path = tuple(part.strip() for part in dotted.split("."))
    if not separator or len(key_path) < 2 or not all(key_path):
        raise UserError(
            f"--set {override}: expected section.key=value, e.g. --set training.batch_size=64"
        )
    try:
        parsed = ConfigObj([f"value = {text}"], interpolation=False, raise_errors=True)
    except ConfigObjError as error:
        raise UserError(f"--set {override}: cannot read the value: {error}") from None
    value = parsed["value"]
    if parsed.inline_comments["value"]:
        # In a file "# ..." after a value is a comment; on the command line it is a typing slip.
        raise UserError(
            f"--set {override}: the value would end at '#', which starts a comment in configuration values; "
            "leave the '#' out"
        )
    section = document
    for depth, name in enumerate(key_path[:-1], start=1):
        if name not in section:
            section[name] = {}
        elif not isinstance(section[name], Section):
            raise UserError(
                f"--set {override}: {key_label(key_path[:depth - 1], name)} is a value, not a section"
            )
        section = section[name]
    if isinstance(section.get(key_path[-1]), Section):
        raise UserError(f"--set {override}: {section_label(key_path)} is a section, not a value")
    section[key_path[-1]] = value
    return key_path


def _origin(origins, path, source):
    """The ``--set`` that created ``path`` (or something inside it), else the file."""
    for key_path, origin in origins.items():
        if key_path[: len(path)] == path:
            return origin
    return source


def _check_no_entry_sections(document, source, origins):
    """A comparison's optimizers and schedules belong to its entries, not to [optimizer] and [schedule]."""
    for name in ENTRY_SECTIONS:
        if name in document:
            raise UserError(
                f"{_origin(origins, (name,), source)}: {section_label((name,))} cannot be set in a file with "
                f"{section_label((COMPARISON,))}; give each entry its own {name} in "
                f"{section_label((COMPARISON, '<entry id>'))}"
            )


def _check_structure(section, specification, source, origins, path):
    """Reject unknown sections and keys, and values given where sections belong (and vice versa)."""
    free_form = _FREE_FORM in specification.scalars
    known = [name for name in specification.scalars + specification.sections if name != _FREE_FORM]
    for key in section.scalars:
        where = _origin(origins, path + (key,), source)
        if key in specification.sections:
            raise UserError(f"{where}: {key_label(path, key)} must be the section {section_label(path + (key,))}")
        if key not in specification.scalars and not free_form:
            hint = did_you_mean(key, known) or f"; known keys: {', '.join(known)}"
            raise UserError(f"{where}: unknown key {key} in {section_label(path)}{hint}")
    for name in section.sections:
        where = _origin(origins, path + (name,), source)
        if name in specification.sections:
            _check_structure(section[name], specification[name], source, origins, path + (name,))
        elif name in specification.scalars:
            raise UserError(f"{where}: {section_label(path + (name,))} must be a plain key, not a section")
        elif _FREE_FORM in specification.sections:
            _check_structure(section[name], specification[_FREE_FORM], source, origins, path + (name,))
        else:
            known_sections = [section_label(path + (other,)) for other in specification.sections]
            hint = did_you_mean(section_label(path + (name,)), known_sections)
            if not hint:
                hint = f"; known sections: {', '.join(known_sections)}" if known_sections else ""
            raise UserError(f"{where}: unknown section {section_label(path + (name,))}{hint}")


def _validate(document, checks, source, origins):
    """Type every value with the configspec and ``checks``; raise the first problem as a ``UserError``."""
    result = document.validate(Validator(checks), preserve_errors=True, copy=True)
    if result is True:
        return
    problems = flatten_errors(document, result)
    sections, key, error = problems[0]
    path = tuple(sections)
    section = document
    for name in path:
        section = section[name]
    # Validation gave each section its part of the configspec, [[__many__]] ones included.
    specification = section.configspec
    where = _origin(origins, path + (key,), source)
    if isinstance(error, InvalidValue):
        expectation = error.expectation
    else:
        expectation = _describe_check(specification.get(key, specification.get(_FREE_FORM)), checks)
    more = len(problems) - 1
    suffix = f" ({more} more problem{'s' if more > 1 else ''} after this one)" if more else ""
    if error is False:
        raise UserError(f"{where}: {key_label(path, key)} is missing: expected {expectation}{suffix}")
    value = section.get(key, "")
    shown = _abbreviate(", ".join(value) if isinstance(value, list) else value)
    raise UserError(f"{where}: {key_label(path, key)} = {shown!r}: expected {expectation}{suffix}")


def _abbreviate(text, length=80):
    """``text``, or its start and "..." when it is longer than ``length``: messages stay one readable line."""
    return text if len(text) <= length else f"{text[: length - 3]}..."


def _describe_check(check, checks):
    """Say in words what a configspec check such as "integer(min=1)" accepts; ``checks`` are the custom ones."""
    call = ast.parse(check, mode="eval").body
    arguments = [ast.literal_eval(argument) for argument in call.args]
    options = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    kind = call.func.id
    if kind in checks:
        # A custom check says what it expects when it refuses a value; an empty text it refuses.
        try:
            checks[kind]("", *arguments, **options)
        except InvalidValue as error:
            return error.expectation
    if kind in ("integer", "float"):
        noun = "an integer" if kind == "integer" else "a number"
        bounds = " and ".join(
            f"{relation} {options[name]}" for relation, name in ((">=", "min"), ("<=", "max")) if name in options
        )
        return f"{noun} {bounds}".strip()
    if kind == "boolean":
        return "true or false"
    if kind == "option":
        return "one of " + ", ".join(arguments)
    if kind == "string":
        return "a non-empty text" if options.get("min", 0) >= 1 else "a text"
    return f"a value that passes {kind}"
