"""Grid files: one configuration file that names several comparison files, launched together.

    # a grid file, e.g. configs/paper.txt
    [grid]
    comparisons = compare_cifar10_resnet20.txt, compare_cifar10_densenet40.txt

(or, in triple quotes, one file per line). ``--config`` with a grid file stands for ``--config``
with each file it names (paths relative to the grid file), in order; ``--set`` options apply to
every one of them. A grid file holds nothing else, and names no other grid file.
"""

from pathlib import Path

from configobj import ConfigObj, ConfigObjError

from source.arguments import did_you_mean
from source.errors import UserError

__all__ = ["GRID", "expand_grids", "is_grid_file"]

GRID = "grid"
"""The section that makes a configuration file a grid file."""

_KEY = "comparisons"


def _read(path):
    try:
        return ConfigObj(str(path), encoding="utf-8", interpolation=False, file_error=True, raise_errors=True)
    except (ConfigObjError, UnicodeDecodeError, OSError):
        return None


def is_grid_file(path):
    """Whether ``path`` is a grid file (a readable configuration file with a [grid] section)."""
    document = _read(path) if Path(path).is_file() else None
    return document is not None and GRID in document.sections


def _grid_paths(path):
    """The comparison files a grid file names; ``UserError`` for anything else in it."""
    document = _read(path)
    others = [name for name in (*document.scalars, *document.sections) if name != GRID]
    if others:
        raise UserError(
            f"{path}: a grid file holds only [{GRID}]; move {others[0]} into the comparison files it names"
        )
    section = document[GRID]
    unknown = [name for name in (*section.scalars, *section.sections) if name != _KEY]
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]} in [{GRID}]{did_you_mean(unknown[0], [_KEY])}")
    given = section.get(_KEY) or []
    # A list on one line, or a triple-quoted text with one file per line.
    lines = given.replace(",", "\n").splitlines() if isinstance(given, str) else given
    names = [name.strip() for name in lines if name.strip()]
    if not names:
        raise UserError(
            f"{path}: [{GRID}] {_KEY} is missing: list the comparison files, e.g. {_KEY} = compare_digits.txt"
        )
    paths = [Path(path).parent / name for name in names]
    for name, named in zip(names, paths):
        if not named.is_file():
            raise UserError(
                f"{path}: [{GRID}] {_KEY} names {name}, but {named} is not a file; paths are relative to the grid file"
            )
        if is_grid_file(named):
            raise UserError(
                f"{path}: [{GRID}] {_KEY} names {name}, which is a grid file too; list its comparison files instead"
            )
    return [str(named) for named in paths]


def expand_grids(paths):
    """``paths`` (values of --config) with each grid file replaced by the files it names.

    Raises ``UserError`` for a malformed grid file, a file it names that is missing or a grid
    file itself, and a file given twice.
    """
    expanded = []
    for path in paths:
        expanded += _grid_paths(path) if is_grid_file(path) else [str(path)]
    resolved = [Path(path).resolve() for path in expanded]
    for position, path in enumerate(resolved):
        if path in resolved[:position]:
            raise UserError(
                f"{expanded[position]} is given twice (with --config or in a grid file); give each comparison once"
            )
    return expanded
