"""What every ``python -m fedrec.<command>`` that trains does first."""

from __future__ import annotations

import logging
import sys


def command_arguments(argv: list[str] | None, doc: str | None) -> list[str] | None:
    """The command's arguments (``sys.argv``'s by default), with its progress lines set to
    print; None once ``-h`` or ``--help`` has printed ``doc``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(doc)
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return argv
