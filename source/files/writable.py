"""Whether a folder can be written, asked before the work whose results go there."""

import os
from pathlib import Path

from source.errors import UserError

__all__ = ["check_writable_folder"]

_NAME_MAX = 255
"""Longest file name on common file systems, in bytes, where ``os.pathconf`` cannot tell."""


def check_writable_folder(path):
    """Raise ``UserError`` unless the folder ``path`` exists and is writable, or can be created.

    Checked before training, so that a path through a file, an unwritable parent or an overlong
    name is found before hours of work rather than at the first write.
    """
    path = Path(path)
    existing = path
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{path}: {existing} is a file, not a folder")
    name_max = _NAME_MAX
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        pass
    missing = path.relative_to(existing).parts if existing != path else ()
    for name in missing:
        if len(os.fsencode(name)) > name_max:
            raise UserError(f"{path}: the name {name[:20]}... is longer than the {name_max} bytes a file name may have")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{path}: the folder {existing} is not writable")


def _exists(path):
    """Whether ``path`` exists; an overlong name does not (``Path.exists`` raises for it)."""
    try:
        return path.exists()
    except OSError:
        return False
