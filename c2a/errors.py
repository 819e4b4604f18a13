"""What every c2a command-line shell treats as the user's to fix, and how it says so.

The convention of every `python -m c2a...` entry point: a user error (bad data, a checkpoint that does not
load, a config value out of range, a busy out_dir) prints one line, `error: <what is wrong and what to
change>`, on stderr and exits 1; a usage error (an unknown flag, a missing argument) exits 2, as argparse
does. Library code raises; only the shells print and choose the exit code.
"""

from __future__ import annotations

import sys

EXIT_USER_ERROR = 1
EXIT_USAGE = 2


class UserError(Exception):
    """A problem the user can fix; its message is the whole story (no traceback is shown)."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work, found from the config (and the files it names) alone: every rank of a
    distributed run raises it alike, so only rank 0 needs to print it."""


# What the shells catch and print as one line. ValueError covers the validation errors of configs, data
# (DataError, ChatTemplateError, CacheMismatchError) and checkpoints (CheckpointError), which subclass it.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, KeyError, FileNotFoundError, FileExistsError)


def message(e: BaseException) -> str:
    """The one line a user sees: a KeyError's message without the quotes repr() adds."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def report(e: BaseException, prefix: str = "error") -> int:
    """Prints `prefix: message` on stderr; returns EXIT_USER_ERROR."""
    print(f"{prefix}: {message(e)}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
