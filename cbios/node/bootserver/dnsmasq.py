"""dnsmasq for PXE: what `cbios pxe serve` and a boot-server slot run.

By default a proxy-DHCP server: the site's DHCP server keeps giving the addresses, this one
only adds the boot information for PXE clients. Given a range, it is the DHCP server
itself. TFTP serves iPXE (Debian's ipxe package) to the node's firmware; iPXE, asking
again (its user class says iPXE), is sent to SCRIPT_URL over HTTP."""

from __future__ import annotations

from pathlib import Path

IPXE_DIR = Path("/usr/lib/ipxe")
IPXE_FILES = ["undionly.kpxe", "ipxe.efi"]  # BIOS and UEFI clients
# PXE's client system architectures, and the iPXE each gets.
CLIENTS = [("x86PC", IPXE_FILES[0]), ("X86-64_EFI", IPXE_FILES[1]), ("BC_EFI", IPXE_FILES[1])]


def conf(*, title: str, interface: str, network: str, tftp_root: Path, script_url: str,
         dhcp_range: str = "", leases: Path | None = None) -> str:
    """dnsmasq.conf. NETWORK: the interface's IPv4 network address (proxy-DHCP); DHCP_RANGE
    'first,last': hand out addresses in it instead, their leases in LEASES."""
    if dhcp_range:
        dhcp = [f"dhcp-range={dhcp_range},12h", "dhcp-authoritative",
                f"dhcp-leasefile={leases}" if leases else "leasefile-ro"]
    else:
        dhcp = [f"dhcp-range={network},proxy", "dhcp-no-override", "leasefile-ro"]
    lines = [
        f"# dnsmasq for {title} on {interface}. Written by cbios.",
        "port=0",  # no DNS
        "no-resolv",
        "no-hosts",
        f"interface={interface}",
        "bind-interfaces",
        *dhcp,
        "log-dhcp",
        "enable-tftp",
        f"tftp-root={tftp_root}",
        "# iPXE says so in its user class: it gets the script, the firmware's PXE gets iPXE.",
        "# As a proxy, the script goes to iPXE as a PXE boot service too: iPXE asks the proxy",
        "# for it on port 4011 and takes no file name from the proxy's first offer.",
        "dhcp-userclass=set:ipxe,iPXE",
        f'pxe-prompt=tag:!ipxe,"{title}",0',
        *(f'pxe-service=tag:!ipxe,{csa},"{title} (iPXE)",{name}' for csa, name in CLIENTS),
        *(f'pxe-service=tag:ipxe,{csa},"{title} (script)",{script_url}' for csa, _ in CLIENTS),
        f"dhcp-boot=tag:ipxe,{script_url}",
    ]
    return "\n".join(lines) + "\n"
