"""A PXE site inside QEMU's user networking, for tests and benchmarks.

QEMU's own DHCP and TFTP servers hand the guest's iPXE a one-line script that chains to
http://10.0.2.100/boot.ipxe; QEMU forwards that address (guestfwd, one socat a
connection) to the same HTTP server `cbios pxe serve` runs, here on 127.0.0.1. The
network is restrict=on: the guest reaches nothing else."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import TracebackType

from cbios.errors import StepError
from cbios.node.httpd import BundleServer
from cbios.pxe.bundle import FILES
from cbios.qemu import GUEST_FORWARD

GUEST_SERVER = GUEST_FORWARD
# A CBIOS node on the lab: QEMU's user network is untagged on its ctl interface (the node's
# management VLAN rides on it), where the node has no address of its own after a boot. This
# gives it QEMU's guest address there, once, so that it reaches GUEST_SERVER.
JOIN_NODE = "ip -4 addr show dev ctl | grep -q 10.0.2.15/ || ip addr add 10.0.2.15/24 dev ctl"
CHAIN = "chain.ipxe"


class PxeLab:
    def __init__(self, bundle: Path, workdir: Path, *, mode: str | None, kernel_args: str = "",
                 hold_after: tuple[str, int] | None = None) -> None:
        """MODE: what the node does (boot, update, install); None: iPXE's menu, and its default.
        HOLD_AFTER: (file, bytes) after which that transfer waits for the server to stop."""
        if shutil.which("socat") is None:
            raise StepError("pxe lab", "socat is not installed", hint="run 'make deps'")
        self.workdir = workdir
        self.tftp = workdir / "tftp"
        self.tftp.mkdir(parents=True, exist_ok=True)
        (self.tftp / CHAIN).write_text(f"#!ipxe\nchain http://{GUEST_SERVER}/boot.ipxe?mac=${{netX/mac}}\n")
        self.taken: list[dict[str, object]] = []
        self.server = BundleServer(("127.0.0.1", 0), bundle, FILES, workdir / "receipts",
                                   preset_mode=mode, preset_args=kernel_args, hold_after=hold_after)

    def wait_receipt(self, timeout: float = 60) -> dict[str, object]:
        """The next receipt the flasher sends (it sends it just after its verdict)."""
        seen = len(self.taken)
        deadline = time.monotonic() + timeout
        while len(self.server.received) <= seen:
            if time.monotonic() > deadline:
                raise StepError("pxe lab", f"no receipt from the flasher within {timeout:.0f} s")
            time.sleep(0.2)
        receipt = self.server.received[seen]
        self.taken.append(receipt)
        return receipt

    def netdev_options(self) -> str:
        """Options for the PXE NIC's -netdev user,...: QEMU's TFTP, and the forward to HTTP."""
        return f"tftp={self.tftp},bootfile={CHAIN},{self.guestfwd()}"

    def guestfwd(self) -> str:
        """The -netdev user option that forwards GUEST_SERVER:80 to the HTTP server here."""
        return f"guestfwd=tcp:{GUEST_SERVER}:80-cmd:socat - TCP:127.0.0.1:{self.server.port}"

    def __enter__(self) -> PxeLab:
        self.server.start()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.stop()
