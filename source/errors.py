"""The one exception type for problems a user can fix by changing input."""


class UserError(Exception):
    """A problem with the user's input (configuration, data files, names).

    The message is one line that names the problem and the fix; ``main.py``
    prints it without a traceback and exits with status 2.
    """
