"""A boot-server slot: compute nodes booted from CB-Manager's image store.

PID 1 of the slot (its run script): dnsmasq answers PXE (as proxy-DHCP beside the site's
DHCP server, or as the DHCP server where the slot's `range` says so) and serves iPXE over
TFTP; iPXE then asks this HTTP server for boot.ipxe, which sends it on to node.ipxe with
the node's MAC and SMBIOS serial. node.ipxe is the node's choice, from the slot's `nodes`
(by MAC, or by an ObjectID the node's SMBIOS serial carries) or its `default`: an image of
the store and a mode (contract.BOOT_MODES). It chains that image's own boot.ipxe (its
kernel command line is the image's) with the mode set. A node set to install whose last
receipt says it installed that image boots from its disk instead; so does one set to update
once its receipt says it updated to it, or was refused.

Receipts are what nodes say, over the management network: anyone there can send one. They
decide only whether a node set to install or update is sent to its disk instead, never that
a disk is erased that the operator did not set to be.

The store is CB-Manager's volume, read-only here (contract.STORE_TARGET); an image's files
are served at images/NAME/VERSION/FILE, and nothing else. The flasher's and the diskless
boot's receipts come back to images/NAME/VERSION/receipt: the last of each node is kept on
the slot's volume (contract.BOOT_RECEIPTS), which `slot show-runtime` shows."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from cbios.node import contract, files, slotparams
from cbios.node.bootserver import dnsmasq
from cbios.node.httpd import BundleServer, ipxe_presets

log = logging.getLogger("cbios")

STORE = Path("/") / contract.STORE_TARGET
RECEIPTS = Path("/var") / contract.BOOT_RECEIPTS
RUN = Path("/run/cbios-boot-server")
LEASES = Path("/var/lib/cbios-boot-server/dhcp/leases")
ENTRY = "boot.ipxe"
PER_NODE = "node.ipxe"
HTTP_PORT = 80
DNSMASQ = "/usr/sbin/dnsmasq"  # PID 1 of a container has no sbin in its PATH


class StoreServer(BundleServer):
    """The store's images over HTTP, and each node's script."""

    def __init__(self, address: tuple[str, int], store: Path, receipts: Path,
                 nodes: dict[str, slotparams.BootChoice], default: slotparams.BootChoice | None,
                 name: str = "boot server") -> None:
        super().__init__(address, store, [], receipts)
        self.nodes = nodes
        self.default = default
        self.name = name

    def locate(self, name: str) -> Path | None:
        parts = name.split("/")
        if len(parts) != 4 or parts[0] != "images" or parts[3] not in contract.STORE_FILES:
            return None
        if not slotparams.BOOT_CHOICE.fullmatch(f"{parts[1]}@{parts[2]}:boot"):
            return None
        path = self.bundle / parts[1] / parts[2] / parts[3]
        return path if path.is_file() else None

    def choice(self, mac: str, serial: str) -> slotparams.BootChoice | None:
        return self.nodes.get(mac) or self.nodes.get(serial) or self.default

    def script(self, name: str, host: str, mac: str, query: dict[str, list[str]]) -> bytes | None:
        if name == ENTRY:  # what iPXE is sent to: on to its own script, with what names the node
            return (f"#!ipxe\nchain http://{host}/{PER_NODE}?mac=${{netX/mac}}&serial=${{serial:uristring}} "
                    "|| exit 1\n").encode()
        if name != PER_NODE:
            return None
        serial = query.get("serial", [""])[0].strip()
        choice = self.choice(mac, serial)
        head = f"#!ipxe\necho CBIOS {self.name}: node ${{netX/mac}}"
        if choice is None:
            log.info("  %s: no image for it (nodes, default): it boots from its next device", mac)
            return f"{head}: no image is set for it here: booting from the next device\nexit 1\n".encode()
        where = self.bundle / choice.image / choice.version
        if not (where / ENTRY).is_file():
            log.warning("  %s: %s is not in the store", mac, choice)
            return (f"{head}: its image {choice.image} {choice.version} is not in the store\n"
                    "sleep 30\nexit 1\n").encode()
        if (done := self.done(mac, choice)) is not None:
            log.info("  %s: %s %s %s: boots from its disk", mac, done, choice.image, choice.version)
            return (f"{head}: {choice.image} {choice.version}: {done}: booting from its disk\n"
                    "sanboot --no-describe --drive 0x80 || exit 1\n").encode()
        log.info("  %s: %s %s, %s", mac, choice.image, choice.version, choice.mode)
        return (f"{head}: {choice.image} {choice.version}, {choice.mode}\n"
                f"set cbios-server http://{host}/images/{choice.image}/{choice.version}/\n"
                f"{ipxe_presets(choice.mode)}"
                f"chain ${{cbios-server}}{ENTRY}?mac=${{netX/mac}} || exit 1\n").encode()

    def done(self, mac: str, choice: slotparams.BootChoice) -> str | None:
        """What the node's last receipt says it did with CHOICE, if that is done with: an
        install that succeeded; an update that succeeded or was refused (the flasher reboots
        after either, and would be sent round again). A failed install is tried again."""
        last = self.last_receipt(mac)
        if not last or (last.get("mode"), last.get("profile"), last.get("version")) != (
                choice.mode, choice.image, choice.version):
            return None
        if choice.mode == "install" and last.get("result") == "FLASHED":
            return "installed"
        if choice.mode == "update" and last.get("result") in ("FLASHED", "FAILED"):
            return "updated" if last.get("result") == "FLASHED" else f"update refused ({last.get('reason', '')})"[:120]
        return None

    def last_receipt(self, mac: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.receipts / _receipt_name(mac)).read_text())
        except (OSError, ValueError):
            return None
        return data

    def keep_receipt(self, receipt: dict[str, object], name: str) -> Path:
        """The node's last receipt, one file a node (what show-runtime reads)."""
        self.receipts.mkdir(parents=True, exist_ok=True)
        path = self.receipts / _receipt_name(str(receipt["mac"]))
        files.replace_path(path, (json.dumps(receipt, indent=2, sort_keys=True) + "\n").encode(), 0o644)
        return path


def _receipt_name(mac: str) -> str:
    return mac.replace(":", "") + ".json"


def settings(env: dict[str, str]) -> dict[str, Any]:
    """The slot's settings from its slot.env (checked by CB-Manager at install; again here)."""
    address = ipaddress.IPv4Interface(env["SLOT_ADDRESS"])
    nodes, default = slotparams.boot_params({k: env.get(f"SLOT_PARAM_{k.upper()}", "") for k in ("nodes", "default")})
    return {"address": address, "range": env.get("SLOT_PARAM_RANGE", ""), "nodes": nodes, "default": default,
            "name": f"boot server {env.get('SLOT_OBJECT_ID', '')}".strip()}


def read_env(path: Path) -> dict[str, str]:
    """slot.env: KEY='value' lines, as CB-Manager writes them (shlex-quoted)."""
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = " ".join(shlex.split(value))
    return out


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="boot-server: %(message)s", stream=sys.stderr)
    s = settings(read_env(Path("/var/slot.env")))
    ip = str(s["address"].ip)
    RUN.mkdir(parents=True, exist_ok=True)
    conf = RUN / "dnsmasq.conf"
    conf.write_text(dnsmasq.conf(title=f"CBIOS {s['name']}", interface="eth0",
                                 network=str(s["address"].network.network_address), tftp_root=dnsmasq.IPXE_DIR,
                                 script_url=f"http://{ip}/{ENTRY}", dhcp_range=s["range"],
                                 leases=LEASES))
    LEASES.parent.mkdir(parents=True, exist_ok=True)
    shutil.chown(LEASES.parent, "dnsmasq")  # dnsmasq writes its leases after it drops root
    server = StoreServer((ip, HTTP_PORT), STORE, RECEIPTS, s["nodes"], s["default"], s["name"])
    proxy = "proxy-DHCP" if not s["range"] else f"DHCP {s['range']}"
    log.info("%s on %s (%s): %d nodes set, default %s; store %s", s["name"], ip, proxy, len(s["nodes"]),
             s["default"] or "none", STORE)
    dns = subprocess.Popen([DNSMASQ, "--keep-in-foreground", "--log-facility=-", f"--conf-file={conf}",
                            "--pid-file"], stdin=subprocess.DEVNULL)
    # PID 1 of its container: a stop signal ends both.
    def stop(*_: object) -> None:
        dns.terminate()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    server.start()
    code = dns.wait()
    log.error("dnsmasq ended (status %d)", code)
    server.stop()
    return 1


if __name__ == "__main__":
    sys.exit(main())
