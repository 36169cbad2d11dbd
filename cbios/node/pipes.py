"""A command whose reader went away (`cbios profile schema | head`, `slot show | less` quit
early) ends quietly with status 0: no traceback, no message. Standard library only: the
node's commands use it too."""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def stdout_closed(exc: BaseException) -> bool:
    """EXC comes from stdout's reader having gone, not from a socket's peer (both are EPIPE)."""
    if not isinstance(exc, BrokenPipeError):
        return False
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):
        return False
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    # The write end of a pipe with no reader left polls as an error.
    return any(events & select.POLLERR for _, events in poll.poll(0))


def parsed(parse: Callable[[], T]) -> T:
    """PARSE's result (argparse's parse_args); its --help and --version, printed into a pipe
    whose reader went away, end as quietly as a command's output (argparse itself ignores
    the failed write, and Python's flush at exit would not)."""
    try:
        return parse()
    except SystemExit:
        quietly(lambda: 0)
        raise


def quietly(call: Callable[[], int]) -> int:
    """CALL's status, its output flushed; 0 when stdout's reader went away first."""
    try:
        status = call()
        sys.stdout.flush()
        return status
    except BrokenPipeError as e:
        if not stdout_closed(e):
            raise
        # Python flushes stdout once more at exit: to /dev/null, that is quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
