"""Progress of long steps, drawn live where stderr is a terminal and written as plain log
lines where it is not (CI, a log file, `| cat`): the one place that decides which.

Live: one region at the bottom of the terminal (rich), redrawn in place; log lines printed
meanwhile go above it. Only one display is live at a time (a test run flashes a disk while
it builds the next image): another one meanwhile writes plain lines. Plain: log lines of
the "cbios" logger, no control codes, each new step once, measures at most every
PLAIN_EVERY seconds. NO_COLOR is honoured by rich; TERM=dumb means plain."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, cast

from rich.cells import cell_len
from rich.console import Console, RenderableType
from rich.file_proxy import FileProxy
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

log = logging.getLogger("cbios")

PLAIN_EVERY = 10.0  # s between two plain lines of a measure that keeps changing
REFRESH_PER_SECOND = 4
INDENT = "    "

Clock = Callable[[], float]
_live_lock = threading.Lock()  # held by the display that is live


def console() -> Console:
    """The console on stderr, interactive only where stderr is a terminal that can redraw
    (FORCE_COLOR and the like, which rich reads, do not make a CI log a terminal)."""
    live = sys.stderr.isatty() and os.environ.get("TERM", "") not in ("dumb", "unknown")
    return Console(file=sys.stderr, force_terminal=live, force_interactive=live, highlight=False)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


def size(count: float) -> str:
    return f"{count / (1 << 20):.0f} MiB" if count >= 10 << 20 else f"{count / (1 << 20):.1f} MiB"


def rate(count: float, seconds: float) -> str:
    return f"{count / (1 << 20) / seconds:.1f} MiB/s" if seconds > 0 and count > 0 else "-"


@contextmanager
def _logs_above(con: Console) -> Iterator[None]:
    """Log lines meant for the console's file printed above the live region, not through it."""
    swapped: list[tuple[logging.StreamHandler[Any], Any]] = []
    logger: logging.Logger | None = log
    while logger is not None:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is con.file:
                swapped.append((handler, handler.stream))
                handler.setStream(FileProxy(con, con.file))
        logger = logger.parent if logger.propagate else None
    try:
        yield
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)


class Display:
    """A live region where the console allows (and no other display has it), else nothing:
    subclasses say what it shows (`__rich__`) and what they log instead (`live` is False)."""

    def __init__(self, con: Console | None = None) -> None:
        self.console = con or console()
        self.live = False
        self._stack = ExitStack()

    def __rich__(self) -> RenderableType:
        raise NotImplementedError

    def __enter__(self) -> Self:
        if self.console.is_interactive and _live_lock.acquire(blocking=False):
            self.live = True
            try:
                self._stack.enter_context(_logs_above(self.console))
                self._stack.enter_context(Live(self, console=self.console, refresh_per_second=REFRESH_PER_SECOND,
                                               transient=True, redirect_stdout=False, redirect_stderr=False))
            except BaseException:
                self.__exit__(None, None, None)  # the log handlers back, the lock free
                raise
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.live:
            return
        try:
            self._stack.close()
        finally:
            self.live = False
            _live_lock.release()


class StatusLine(Display):
    """A step that runs for minutes: live, a spinner, what it is doing and for how long;
    plain, each new thing it does as an indented line (once), and a measure (bytes, a
    percentage) at most every PLAIN_EVERY seconds."""

    def __init__(self, label: str, con: Console | None = None, *, clock: Clock = time.monotonic,
                 plain_every: float = PLAIN_EVERY) -> None:
        super().__init__(con)
        self.label = label
        self.clock = clock
        self.plain_every = plain_every
        self.started = clock()
        self.doing = ""
        self.doing_since = self.started
        self.measure = ""
        self._said: set[str] = set()
        self._measured_at: float | None = None
        self._spinner = Spinner("dots")

    def note(self, text: str) -> None:
        """What the step does now (a new sub-step)."""
        if text != self.doing:
            self.doing, self.doing_since, self.measure = text, self.clock(), ""
        if not self.live and text not in self._said:
            self._said.add(text)
            log.info("%s%s: %s", INDENT, self.label, text)

    def measured(self, text: str) -> None:
        """How far it has got (bytes, a percentage, a rate): it changes all the time."""
        self.measure = text
        now = self.clock()
        if not self.live and (self._measured_at is None or now - self._measured_at >= self.plain_every):
            self._measured_at = now
            log.info("%s%s: %s", INDENT, self.label, text)

    def doing_text(self) -> str:
        return f"{self.label}: {self.doing or 'starting'}" + (f" · {self.measure}" if self.measure else "")

    def elapsed_text(self) -> str:
        now = self.clock()
        return f"{duration(now - self.doing_since)} (in all {duration(now - self.started)})"

    def __rich__(self) -> RenderableType:
        # One line, cut to the terminal's width: a wrapped one would leave its start behind.
        elapsed = self.elapsed_text()
        doing = Text(self.doing_text())
        doing.truncate(max(self.console.width - cell_len(elapsed) - 5, 10), overflow="ellipsis")
        frame = cast(Text, self._spinner.render(self.console.get_time()))  # a spinner without text: a Text
        return Text.assemble(frame, " ", doing, "  ", (elapsed, "dim"), no_wrap=True, overflow="ellipsis")


@dataclass(frozen=True)
class TransferRow:
    """One node's latest transfer, as a server sees it."""

    node: str  # client address, and MAC if known
    name: str
    sent: int
    size: int
    seconds: float  # since it started (or how long it took)
    done: bool  # every byte sent
    ended: bool  # the server is through with it

    def state(self) -> str:
        if self.ended:
            return "done" if self.done else "broken off"
        if self.sent == 0:
            return "starting"
        return f"{duration((self.size - self.sent) * self.seconds / self.sent)} left"

    def summary(self) -> str:
        percent = self.sent * 100 // self.size if self.size else 100
        return (f"{self.node}: {self.name} {size(self.sent)} of {size(self.size)} ({percent}%), "
                f"{rate(self.sent, self.seconds)}, {self.state()}")


class TransferBoard(Display):
    """Transfers to many nodes: live, a table with a row a node; plain, every PLAIN_EVERY
    seconds a line for each transfer under way (the server logs each one that ends)."""

    def __init__(self, con: Console | None = None, *, clock: Clock = time.monotonic,
                 plain_every: float = PLAIN_EVERY) -> None:
        super().__init__(con)
        self.clock = clock
        self.plain_every = plain_every
        self.rows: Sequence[TransferRow] = ()
        self._shown_at: float | None = None

    def update(self, rows: Sequence[TransferRow]) -> None:
        self.rows = rows
        now = self.clock()
        if self.live or (self._shown_at is not None and now - self._shown_at < self.plain_every):
            return
        under_way = [row for row in rows if not row.ended]
        if under_way:
            self._shown_at = now
            for row in under_way:
                log.info("%s%s", INDENT, row.summary())

    def __rich__(self) -> RenderableType:
        if not self.rows:
            return Text("waiting for nodes", style="dim")
        table = Table(box=None, pad_edge=False)
        for column in ("node", "file", "sent", "", "rate", ""):
            table.add_column(column, justify="right" if column in ("sent", "rate") else "left")
        for row in self.rows:
            percent = row.sent * 100 // row.size if row.size else 100
            table.add_row(row.node, row.name, f"{size(row.sent)} of {size(row.size)}", f"{percent}%",
                          rate(row.sent, row.seconds), row.state())
        return table
