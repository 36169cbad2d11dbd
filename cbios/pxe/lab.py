"""A PXE site inside QEMU's user networking, for tests and benchmarks.

QEMU's own DHCP and TFTP servers hand the guest's iPXE a one-line script that chains to
http://10.0.2.100/boot.ipxe; QEMU forwards that address (guestfwd, one socat a
connection) to an HTTP server here on 127.0.0.1: the one `cbios pxe serve` runs
(PxeLab), or a stock nginx serving the bundle as plain files (StaticLab). The network is
restrict=on: the guest reaches nothing else."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from cbios.errors import StepError
from cbios.node.httpd import BundleServer, ipxe_presets
from cbios.pxe import newer_ipxe, service
from cbios.pxe.bundle import FILES
from cbios.pxe.nginx import Nginx
from cbios.qemu import GUEST_FORWARD

GUEST_SERVER = GUEST_FORWARD
# A CBIOS node on the lab: QEMU's user network is untagged on its ctl interface (the node's
# management VLAN rides on it), where the node has no address of its own after a boot. This
# gives it QEMU's guest address there, once, so that it reaches GUEST_SERVER.
JOIN_NODE = "ip -4 addr show dev ctl | grep -q 10.0.2.15/ || ip addr add 10.0.2.15/24 dev ctl"
CHAIN = "chain.ipxe"


class Server(Protocol):
    @property
    def port(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Site:
    """QEMU's DHCP and TFTP, chaining iPXE to GUEST_SERVER, forwarded to the HTTP server
    here, which runs while the site is entered."""

    server: Server
    rom: Path | None = None  # the PXE NIC's iPXE ROM; None: QEMU's own

    def __init__(self, workdir: Path, script: str = "boot.ipxe", first: str = "") -> None:
        """SCRIPT: the bundle's boot.ipxe on the server; FIRST: iPXE lines the site runs before it."""
        if shutil.which("socat") is None:
            raise StepError("pxe lab", "socat is not installed", hint="run 'make deps'")
        self.workdir = workdir
        self.tftp = workdir / "tftp"
        self.tftp.mkdir(parents=True, exist_ok=True)
        (self.tftp / CHAIN).write_text(f"#!ipxe\n{first}chain http://{GUEST_SERVER}/{script}?mac=${{netX/mac}}\n")

    def netdev_options(self) -> str:
        """Options for the PXE NIC's -netdev user,...: QEMU's TFTP, and the forward to HTTP."""
        return f"tftp={self.tftp},bootfile={CHAIN},{self.guestfwd()}"

    def guestfwd(self) -> str:
        """The -netdev user option that forwards GUEST_SERVER:80 to the HTTP server here."""
        return f"guestfwd=tcp:{GUEST_SERVER}:80-cmd:socat - TCP:127.0.0.1:{self.server.port}"

    def __enter__(self) -> Self:
        self.server.start()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.stop()


class PxeLab(Site):
    server: BundleServer

    def __init__(self, bundle: Path, workdir: Path, *, mode: str | None, kernel_args: str = "",
                 hold_after: tuple[str, int] | None = None) -> None:
        """MODE: what the node does (boot, update, install); None: iPXE's menu, and its default.
        HOLD_AFTER: (file, bytes) after which that transfer waits for the server to stop."""
        super().__init__(workdir)
        self.taken: list[dict[str, object]] = []
        self.server = BundleServer(("127.0.0.1", 0), bundle, FILES, workdir / service.RECEIPTS,
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


class StaticLab(Site):
    """A site whose web server is a stock one (nginx) serving the bundle as plain files, and
    whose nodes run Debian 13's iPXE: nothing sets cbios-server, boot.ipxe finds its folder."""

    server: Nginx

    def __init__(self, site: Path, script: str, workdir: Path, cache: Path, *, mode: str | None = None,
                 kernel_args: str = "", rate: str = "", rate_after: str = "") -> None:
        """SITE: the web server's root; SCRIPT: the bundle's boot.ipxe in it. MODE and
        KERNEL_ARGS: what the site's own chain script sets before it chains the bundle's."""
        super().__init__(workdir, script, ipxe_presets(mode, kernel_args))
        self.rom = newer_ipxe.rom(cache)
        self.server = Nginx(site, workdir / "nginx", rate=rate, rate_after=rate_after)
