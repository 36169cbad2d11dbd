"""The profile model: one strict, frozen description of a node's firmware.

Unknown keys and values of the wrong type are errors (pydantic, extra="forbid",
strict=True). Cross-field rules live here too; rules that need the project's files
(templates, overlays) live in loader.py."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
)

from cbios.node import contract

_SIZE = re.compile(r"^(\d+)([KMGT]?)$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'512M' -> bytes. Sizes are binary (K = 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"'{text}' is not a size (a whole number with K, M, G or T, e.g. 512M)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _check_size(text: str) -> str:
    if parse_size(text) == 0:
        raise ValueError("a size must be more than 0")
    return text


def _check_hostname(text: str) -> str:
    if not contract.HOSTNAME.fullmatch(text):
        raise ValueError(f"'{text}' is not a host name (lower-case letters, digits and '-', 1 to 63)")
    return text


def _check_object_id(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and not re.fullmatch(r"\d{8}010", value):
        raise ValueError(f"'{value}' is not a node ObjectID (11 digits ending in 010, e.g. 31000040010)")
    return value


def _check_interface(text: str) -> str:
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError as e:
        raise ValueError(f"'{text}' is not an IPv4 address with prefix (e.g. 10.0.249.52/24)") from e
    if "/" not in text:
        raise ValueError(f"'{text}' needs a prefix length (e.g. {iface.ip}/24)")
    return text


def _check_mac(text: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", text):
        raise ValueError(f"'{text}' is not a MAC address (lower-case, e.g. 52:54:00:12:34:56)")
    return text


def _check_mirror(text: str) -> str:
    if not re.fullmatch(r"https?://[^\s]+", text):
        raise ValueError(f"'{text}' is not an http(s) URL")
    return text.rstrip("/")


Size = Annotated[str, AfterValidator(_check_size)]
Hostname = Annotated[str, AfterValidator(_check_hostname)]
ObjectId = Annotated[str, BeforeValidator(_check_object_id)]
Interface = Annotated[str, AfterValidator(_check_interface)]
Mac = Annotated[str, AfterValidator(_check_mac)]
Mirror = Annotated[str, AfterValidator(_check_mirror)]
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Distribution(Strict):
    """The Debian release and the mirror the image is built from."""

    release: str = "bookworm"
    mirror: Mirror = "http://deb.debian.org/debian"
    security_mirror: Mirror = "http://deb.debian.org/debian-security"
    components: list[Name] = ["main"]


class Kernel(Strict):
    """The kernel package, its command line, and which modules the root and initrd keep."""

    package: Name = "linux-image-amd64"
    cmdline: list[str] = []
    modules: list[str] = Field(
        default=[".*"],
        description="regular expressions of module paths the root keeps (below kernel/); '.*' keeps all",
    )
    initrd_modules: list[str] = Field(
        default=[], description="regular expressions of module paths the initrd needs to reach the root",
    )


class User(Strict):
    name: Name
    password_hash: str | None = Field(
        default=None, description="crypt(3) hash; '' for an empty password; root only")
    ssh_keys: list[str] = []


class Node(Strict):
    object_id: ObjectId = "31000040010"
    hostname: Hostname = "cbios"


class SlotVolume(Strict):
    iid: Annotated[int, Field(ge=0, le=9)]
    size: Size


class Storage(Strict):
    """The node's disk: a small boot partition, then one LVM PV holding the VG."""

    vg: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", description="no '-': device-mapper doubles it")] = "lvm"
    boot_size: Size = "64M"
    root_size: Size = "2G"
    var_size: Size = "8G"
    swap_size: Size = "1G"
    slot_room: Size = Field(default="1G", description="free space in the VG for slots installed later")


class Nic(Strict):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9]{0,14}$")]
    mac: Mac


class Network(Strict):
    nics: list[Nic] = []
    vlan: Annotated[int, Field(ge=1, le=4094)] = 249
    vlan_parent: str = "ctl"
    bridge: Annotated[str, Field(pattern=r"^br[0-9]+$")] = "br0"
    stp: bool = True
    forward_delay: Annotated[int, Field(ge=2, le=30, description="seconds a new bridge port listens, "
                                        "then learns, before it forwards (STP)")] = 4
    address: Interface | None = Field(default=None, description="the node's own address, on the bridge")
    gateway: str | None = None
    domain: Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$",
                                 description="DNS zone of the node's slots (served by a dns_master slot)")] = "cluster"


class Limits(Strict):
    """What a slot may use of the node: cgroup memory.max and pids.max."""

    memory: Size | None = Field(default=None, description="memory.max, e.g. 256M")
    pids: Annotated[int, Field(ge=contract.PIDS_MIN, le=contract.PIDS_MAX,
                               description="pids.max: processes and threads")] | None = None


class Slot(Strict):
    template: Name
    eid: Annotated[int, Field(ge=0, le=9, description="the slot's number on its node (ObjectID digit); "
                              "0 is CB-Manager's")]
    address: Interface | None = None
    hostname: Hostname | None = None
    autostart: bool = True
    volumes: list[SlotVolume] = Field(default=[], description="sizes; the template's when empty")
    params: dict[str, Annotated[str, Field(pattern=r"^[A-Za-z0-9 ._:/,=-]*$")]] = Field(
        default={}, description="the template's parameters")
    limits: Limits = Field(default_factory=Limits, description="the template's limits where not set here")


class Boot(Strict):
    """How a node chooses between its two copies of the firmware."""

    tries: Annotated[int, Field(ge=1, le=9, description="boots a new copy gets to become ready")] = 3
    ready_timeout: Annotated[int, Field(ge=10, description="seconds a boot has to become ready")] = 600
    panic_reboot: Annotated[int, Field(ge=1, le=300, description="seconds from a kernel panic to a reboot "
                                       "(panic=): the boot loader then counts the try")] = 10
    watchdog: Annotated[int, Field(ge=0, le=600, description="seconds a hung node runs before the hardware "
                                   "watchdog, pinged by systemd, resets it; 0: no watchdog")] = 60


class Update(Strict):
    """How a node takes new firmware (cbios update)."""

    signing_key: str | None = Field(
        default=None,
        description="Ed25519 private key (PEM), a path from the project's root: it signs manifest.json, "
                    "and the firmware then takes only updates it signed")


def _check_ip(text: str) -> str:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(f"'{text}' is not an IPv4 address (e.g. 10.0.249.9)") from None
    return text


class ClusterNode(Strict):
    object_id: ObjectId
    address: Annotated[str, AfterValidator(_check_ip), Field(description="its CB-Manager's (slot 0's) address")]


class Cluster(Strict):
    """The management nodes whose slots `slot list` and `slot show` cover. Their shared key
    is no part of the firmware: the operator sets it on each node (`cbios cluster set-key`)."""

    port: Annotated[int, Field(ge=1, le=65535)] = 7475
    timeout: Annotated[int, Field(ge=1, le=60, description="seconds a node has to answer a query")] = 5
    connect_timeout: Annotated[float, Field(ge=0.1, le=60, description="seconds a node has to take a connection "
                                            "and send its challenge: a node that is down costs this")] = 1.0
    nodes: list[ClusterNode] = Field(default=[], description="the management nodes a node starts with (this one "
                                     "included or not); later, `cbios cluster join` and `leave` change a node's list")


class Qemu(Strict):
    """How tests boot the image in QEMU."""

    memory: Annotated[int, Field(ge=256, description="MiB")] = 1024
    cpus: Annotated[int, Field(ge=1, le=16)] = 2
    ready_timeout: Annotated[int, Field(ge=10, description="seconds to wait for ready")] = 600


class Profile(Strict):
    """A node's firmware, as the release engineer declares it."""

    name: Name
    version: Annotated[str, Field(pattern=r"^\d+(\.\d+){0,3}$")]
    description: str = ""
    extends: Name | None = None
    test: bool = Field(default=False, description="a firmware for tests in QEMU: only such a profile may name a "
                       "test key (profiles/keys/), a test overlay (test-*) or an empty root password")
    distribution: Distribution = Distribution()
    kernel: Kernel = Kernel()
    packages: list[Name] = []
    overlays: list[Name] = []
    users: list[User] = []
    node: Node = Node()
    storage: Storage = Storage()
    network: Network = Network()
    slots: list[Slot] = []
    boot: Boot = Boot()
    update: Update = Update()
    cluster: Cluster = Cluster()
    qemu: Qemu = Qemu()

    def kernel_cmdline(self) -> list[str]:
        """The kernel command line of every boot of this firmware: the profile's, and panic=,
        so that a kernel that panics reboots and the boot loader counts the try."""
        return [*self.kernel.cmdline, f"panic={self.boot.panic_reboot}"]

    def slot_object_id(self, eid: int) -> str:
        """The source document's scheme: node 31000040010, slot 1 -> 31000040175.

        A node's ObjectID ends in 010; its slots' replace those three digits with the
        slot's eid and 75."""
        return contract.slot_object_id(self.node.object_id, eid)
