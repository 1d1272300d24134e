"""User-facing errors.

Anything a user can cause (bad input, a refused option) raises :class:`NmosdError`; the CLI
prints its message on one line to stderr and exits with code 2. Everything else is a bug.
"""


class NmosdError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
