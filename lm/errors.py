"""The one exception type for user errors (bad config, bad data, bad checkpoint).

The CLI turns it into a one-line message and exit code 2; anything else is a bug and keeps its traceback.
"""

import argparse
import sys
from pathlib import Path


class LMError(Exception):
    """A problem with what the user gave us. The message names the file/line/key and says what was expected."""


def cannot_write(path: str | Path, error: OSError) -> LMError:
    """The one-line error for an output path that could not be written or created: `cannot write PATH: reason`, with
    the file or directory on the way to PATH that failed named before the reason when it is not PATH itself."""
    where = "" if error.filename is None or Path(error.filename) == Path(path) else f"{error.filename}: "
    return LMError(f"cannot write {path}: {where}{error.strerror or error}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse for lm's own commands (generate, chat, eval, ...): a usage error is one line and exit code 2, as every
    other user error, instead of argparse's usage block followed by the error."""

    def error(self, message: str):
        sys.stderr.write(f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)
