"""The flasher seen from the host while it runs in QEMU: the lines it prints on the VM's
console ("cbios-flash: writing both copies") as the console log grows, and how much it
has written to the node disk (its image file grows), given to a StatusLine."""

from __future__ import annotations

import re
import time
from pathlib import Path

from cbios.node.printable import printable
from cbios.progress import Clock, StatusLine, rate, size

TAG = "cbios-flash: "
# The flasher's measure of root.img, every 5 s from a server (initrd/tree/usr/lib/cbios/flash);
# its last one ("... (100%) in 7 s") is a step.
PERCENT = re.compile(r"root\.img: \d+ of \d+ MiB \((\d+)%\)")
# The verdict is the report port's (Machine.wait_report logs it); the receipt is a long JSON line.
UNSHOWN = ("FLASHED", "FAILED", "receipt:")


class GrowingFile:
    """The complete lines a file gains, each once, from where the last look stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._partial = b""

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [line.decode(errors="replace").rstrip("\r") for line in lines]


def flasher_says(console_line: str) -> str | None:
    """What a console line has the flasher say, if it is one of its steps or measures."""
    _, tag, said = console_line.partition(TAG)
    said = printable(said.strip())  # the guest's words: no control character reaches the terminal
    return said if tag and said and not said.startswith(UNSHOWN) else None


def allocated(path: Path) -> int:
    """Bytes the disk image holds on the host: it grows as the guest writes."""
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


class FlasherWatch:
    """Call `poll()` now and then while the flasher runs."""

    def __init__(self, console_log: Path, status: StatusLine, *, target: Path | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.console = GrowingFile(console_log)
        self.status = status
        self.target = target
        self.clock = clock
        self.started = clock()
        self.base = allocated(target) if target is not None else 0
        self.percent = ""

    def poll(self) -> None:
        for line in self.console.new_lines():
            said = flasher_says(line)
            if said is None:
                continue
            if (m := PERCENT.fullmatch(said)) is not None:
                self.percent = f"root.img {m[1]}%"
                self.measure()
            else:
                self.status.note(said)
        if self.target is not None:
            self.measure()

    def measure(self) -> None:
        parts = [self.percent] if self.percent else []
        if self.target is not None:
            written = allocated(self.target) - self.base
            if written <= 0 and not parts:
                return
            parts.append(f"{size(written)} written to the disk, {rate(written, self.clock() - self.started)}")
        self.status.measured(", ".join(parts))
