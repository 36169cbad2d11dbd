"""`cbios scrub`: every block of both firmware copies read through dm-verity, so corruption in
blocks that nothing reads is found too; and what a copy found corrupt becomes.

A corrupt copy is marked bad in the boot state with the reason (`cbios status` shows it),
and, while the other copy is good, the other one boots next. Once the node is ready at
every boot, the health gate scrubs the running copy (the other was read back when it was
written): found corrupt, it reboots the node into the other copy at once. The scheduled
run (cbios-scrub.timer: an hour after boot, then daily) reads both copies, and a block the
kernel refuses at run time (udev, `cbios corrupt`) is marked at once; both leave a running
node up: the other copy boots next time. Nothing reboots a node whose other copy is bad too."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cbios.node.boot import bootenv, verity

PORT = Path("/dev/virtio-ports/org.cbios.ready")


@dataclass(frozen=True)
class Finding:
    copy: str
    result: str  # clean | corrupt | skipped
    detail: str


def scrub_copies(env: dict[str, str], device: Callable[[str], Path],
                 check: Callable[[Path, verity.Verity, str], str | None] = verity.scrub,
                 copies: Iterable[str] = bootenv.COPIES) -> list[Finding]:
    """Each of COPIES the boot state can open, read whole through dm-verity."""
    found = []
    for copy in copies:
        state, param = env.get(f"cbios_{copy}_state"), env.get(f"cbios_{copy}_verity", "")
        if state == "bad":
            found.append(Finding(copy, "skipped", "marked bad already"))
            continue
        try:
            v = verity.Verity.parse(param)
        except verity.VerityError:
            found.append(Finding(copy, "skipped", "no verity in the boot state (written by an older flasher)"))
            continue
        problem = check(device(copy), v, f"cbios-scrub-{copy}")
        if problem is None:
            found.append(Finding(copy, "clean", f"{v.data_blocks} blocks match the root hash"))
        else:
            found.append(Finding(copy, "corrupt", problem))
    return found


def mark(env: dict[str, str], findings: list[Finding]) -> dict[str, str]:
    """ENV with every corrupt copy marked bad."""
    for f in findings:
        if f.result == "corrupt":
            env = bootenv.corrupted(env, f.copy, f"corrupt: {f.detail} (scrub)")
    return env


def should_reboot(env: dict[str, str], running: str | None) -> bool:
    """After marking: the running copy is bad and the other one is not, so the next boot runs it."""
    if running is None:
        return False
    return (env.get(f"cbios_{running}_state") == "bad"
            and env.get(f"cbios_{bootenv.other(running)}_state") != "bad")


def report(line: str) -> None:
    """A verdict on the console and on the port a supervisor reads, like the health gate's."""
    print(f"cbios: {line}", flush=True)
    try:
        with open(PORT, "w") as port:
            port.write(line + "\n")
    except OSError:
        pass
