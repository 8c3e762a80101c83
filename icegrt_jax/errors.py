"""The one base class for mistakes in what a user gave us (files, configs, flags).

The CLI turns any ``UserInputError`` into a one-line message on stderr and exit code 2.
"""


class UserInputError(ValueError):
    """Bad input from the user: the message names the file, line, field or key."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient; the message names the step and the last
    good checkpoint. The CLI prints it as one line and exits 1."""


class TrainingStopped(Exception):
    """A trainer stopped by SIGTERM/SIGINT after saving a checkpoint (preemption): the run is not
    finished. The CLI exits with 128 + the signal's number, as a process the signal killed, so
    schedulers and job dependencies (``afterok``) do not take it for complete."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
