"""Writes that stay inside their folder: a symbolic link planted at a file's name is never followed.

A whole file is written to a new temporary file beside it (created exclusively, so not through a
link) and renamed over the name; the rename replaces a link rather than writing through it, and
a crash leaves the old file or the new one, never half of one. A file that grows (metrics.jsonl)
is opened with ``O_NOFOLLOW`` and must be a regular file, or the run stops with one line.
"""

import contextlib
import errno
import os
import stat
from pathlib import Path

from source.errors import UserError, writing

__all__ = ["PARTIAL_SUFFIX", "open_for_append", "remove_partial_files", "replace_atomically", "write_text_atomically"]

PARTIAL_SUFFIX = ".partial"
"""The suffix of a temporary file that becomes its file when complete (``.<name>.<pid>.partial``)."""

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def replace_atomically(path, write):
    """Call ``write(file)`` on a new temporary binary file beside ``path``, then rename it over ``path``.

    Whatever ``path`` was (a file, a symbolic link to anywhere) is replaced, never written through.
    A write the system refuses raises ``WriteFailed`` naming ``path``.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        with writing(path):
            # A file of this name is a leftover of this process id; unlink removes a link, not its target.
            temporary.unlink(missing_ok=True)
            with os.fdopen(os.open(temporary, _NEW_FILE, 0o644), "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
    except BaseException:
        # In a folder that became unwritable the temporary file cannot go either; a resume removes it.
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


def write_text_atomically(text, path):
    """Write ``text`` (UTF-8) to ``path`` atomically, replacing whatever is there."""
    replace_atomically(path, lambda file: file.write(text.encode("utf-8")))


def open_for_append(path):
    """Open the regular file ``path`` (created if missing) for appending text; never through a link.

    Raises ``UserError`` when ``path`` is a symbolic link or not a regular file: a run writes its
    own files only, and silently replacing a file that grows would lose its records.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        descriptor = os.open(path, flags, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UserError(
                f"{path} is a symbolic link; a run writes only files inside its folder: remove the link"
            ) from None
        if error.errno == errno.ENXIO:  # a named pipe without a reader
            raise UserError(f"{path} is not a regular file; remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise UserError(f"{path} is not a regular file; remove it")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "a", encoding="utf-8")


def remove_partial_files(folder):
    """Delete the temporary files of writes that a killed process left in ``folder``; return their paths."""
    stale = [path for path in Path(folder).glob(f".*{PARTIAL_SUFFIX}") if path.is_file() or path.is_symlink()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
