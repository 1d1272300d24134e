"""Speed benchmarks (not tests): ``python -m benchmarks [--quick]``."""

from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the toolkit's rule for bad input: one ``error:`` line on stderr and exit 2
    (argparse's own prints its usage lines before the error), for every benchmark script."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")
