"""The exception types for problems a user can fix: bad input, and files the system would not let a run write."""

import contextlib


class UserError(Exception):
    """A problem with the user's input (configuration, data files, names).

    The message is one line that names the problem and the fix; ``main.py``
    prints it without a traceback and exits with status 2.
    """


class DataFileError(UserError):
    """A damaged file among the data, which the message names: no configuration key is to blame for it."""


class WriteFailed(Exception):
    """A file could not be written (full disk, file-size limit, permissions) or a figure could not be drawn.

    The input is fine; the system or the figure failed. The message is one line that names the
    file and the cause; ``main.py`` prints it and exits with ``EXIT_STATUS``. What was written
    before (the last checkpoint, a finished run's results) is kept.
    """

    EXIT_STATUS = 5


def os_error_within(error):
    """The ``OSError`` that ``error`` is or was raised while handling (torch.save hides it), or None."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None


def cause_of(error):
    """The operating system's words for ``error`` ("No space left on device"), or its own."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    detail = " ".join(str(error).split())[:120]
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


@contextlib.contextmanager
def writing(path):
    """Inside, an ``OSError`` (or an error hiding one) becomes ``WriteFailed`` naming ``path`` and the cause."""
    try:
        yield
    except (UserError, WriteFailed):
        raise
    except Exception as error:
        found = os_error_within(error)
        if found is None:
            raise
        raise WriteFailed(f"cannot write {path}: {cause_of(found)}") from error
