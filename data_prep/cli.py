"""How every famtron command ends on bad input: one line that names what is wrong, no traceback.

    def main(argv: list[str] | None = None) -> int | None: ...   # or returns its results: exit 0

    if __name__ == "__main__":
        sys.exit(run_main(main))

Expected user errors (`UserError`, and the ValueError / OSError family that config checks and
file access raise) print `<prog>: error: <message>` on stderr and exit 2, as argparse does for
a bad flag. Anything else is a bug and keeps its traceback. `--debug` anywhere in the arguments
(or FAMTRON_DEBUG=1) shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, EOFError)


class UserError(Exception):
    """Bad input the user can fix: the message names the file, key or value and what to do."""


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("FAMTRON_DEBUG", "") not in ("", "0")


def run_main(main: Callable[[list[str]], int | None], argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run `main(argv)` (without `--debug`); a user error becomes one line on stderr and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        result = main([a for a in argv if a != "--debug"])
        # An int is the exit status; anything else (a main that returns its results, for
        # tests and callers) is success.
        return result if isinstance(result, int) else 0
    except (UserError, *USER_ERRORS) as err:
        if debug:
            raise
        name = prog or os.path.basename(sys.argv[0])
        message = str(err) or type(err).__name__
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2
