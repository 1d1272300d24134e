"""User-facing errors.

Anything a user can cause (bad input, a refused option) raises :class:`NmosdError`; the CLI
prints its message on one line to stderr and exits with code 2. Everything else is a bug.

Messages speak the library's terms (a Python user never typed a flag); when an error is about
one option, ``option`` names its parameter (``"model_sizes"``, ``"out"``), and the CLI adds the
flag that sets it.
"""


class NmosdError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""

    exit_code = 2

    def __init__(self, message: str, option: str | None = None):
        super().__init__(" ".join(str(message).split()))
        self.option = option
