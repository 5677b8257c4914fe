"""The ``ml3`` console script. Importing the command line (torch, typer, rich) takes a second or more; a Ctrl-C in
that second ends the program quietly (exit 130) instead of with a traceback of whatever was being imported. (From
the package's first line, ``ml3cli/__init__.py`` makes a Ctrl-C exit at once when the command line is starting.)"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Import the command line and run it; an interrupt during the import is a quiet exit."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is a KeyboardInterrupt from here on
    try:
        from ml3cli.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    run()
