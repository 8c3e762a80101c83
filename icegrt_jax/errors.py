"""The one base class for mistakes in what a user gave us (files, configs, flags).

The CLI turns any ``UserInputError`` into a one-line message on stderr and exit code 2.
"""


class UserInputError(ValueError):
    """Bad input from the user: the message names the file, line, field or key."""
