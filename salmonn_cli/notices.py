"""One-line notices from the library to whoever runs it: a slower path taken, a start cost paid.

The library never prints. It logs to the `salmonn` logger; the command line shows each record as one line of its
own (`cli.app`), a server in its log, and a program using the library wherever its logging goes (Python's
last-resort handler prints warnings to stderr when nothing is configured).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("salmonn")


def warn(message: str) -> None:
    """Something the user would want to change or know: a faster path failed and a slower one is taken."""
    logger.warning(message)


def inform(message: str) -> None:
    """What a long wait was (a start cost paid once): shown by the command line, not by a bare library."""
    logger.info(message)
