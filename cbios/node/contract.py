"""The contract between the build and the node: every path, name, pattern and id scheme
that both sides use, written here once. The build (cbios/profile, build.py, signing.py,
manifest.py) and the node (cbios/node) import it; it imports nothing of either.

The build writes into the read-only root: /usr/lib/cbios/slots.json (the node and the
profile's slots), /usr/lib/cbios/slot-templates/NAME/template.json, the update key; the
node reads them, and keeps its own state under /var."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"  # a build's, a bundle's, a release's: the artifacts and their hashes
SIGNATURE = MANIFEST + ".sig"  # Ed25519 over the manifest's bytes
SUMS = "SHA256SUMS"  # the artifacts' sha256s, for people (sha256sum -c); nothing trusts it
UPDATE_KEY = Path("/usr/lib/cbios/update-key.pem")  # in the root and the initrd: what verifies SIGNATURE
TEMPLATES = Path("/usr/lib/cbios/slot-templates")
SLOTS = Path("/usr/lib/cbios/slots.json")
# An lxc-system template's root file system, or a kvm-system's system disk, is a directory
# IMAGES/TEMPLATE of the root, written into a fresh ext4 on the slot's volume 0 (mkfs.ext4 -d;
# the flasher does the same). A tree, not an image file: the root's squashfs stores a file
# once however many times it holds it, and a slot's Debian is nearly all the root's files.
IMAGES = Path("/usr/lib/cbios/slot-images")
EXECUTOR_SOCKET = Path("/run/cbios/executor/executor.sock")
MANAGER_SOCKET = Path("/run/cbios/manager/manager.sock")
# On the node's /var: never in the firmware, kept by updates and rollbacks (keyring.py).
# CB-Manager's container binds it; an lxc-service slot's /var is its own volume.
SECRETS = Path("/var/lib/cbios/secrets")
CLUSTER_KEY = SECRETS / "cluster.key"
# SECRETS as CB-Manager's container has it: bound under its /run, since its /var is its own
# volume, which LXC mounts over any bind made beneath it (idmapped mounts come last).
MANAGER_SECRETS = Path("/run/cbios/secrets")
MANAGER_EID = 0
MANAGER_TEMPLATE = "cb-manager"  # slot 0, and only slot 0: it holds CB-Executor's socket
# An lxc slot runs in a user namespace of its own: its ids 0..SLOT_IDS-1 are the node's
# slot_ids(eid)..slot_ids(eid)+SLOT_IDS-1, so its root is no one on the node and no other
# slot's. Slot 0's root has a name on the node (sysusers.d): CB-Executor's socket is its group's.
SLOT_IDS = 65536
MANAGER_USER = "cbios-manager"
# Where CB-Executor mounts an lxc slot's volumes on the node, to bind them into the slot:
# the kernel mounts a block device for the node's root only, never in a user namespace.
SLOT_MOUNTS = Path("/run/cbios/slots")
VOLUME_NAME = re.compile(r"slot([0-9])-([0-9])")  # fullmatch
# A slot's cgroup limits (its template's, its profile's): pids.max within these.
PIDS_MIN, PIDS_MAX = 16, 65536
HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # a node's or slot's; fullmatch
# A slot template's architecture (Debian's names): the node's, or i386 for an lxc-system slot,
# whose root is its own; template.json without one (an older firmware's) is the node's.
NODE_ARCHITECTURE = "amd64"
ARCHITECTURES = (NODE_ARCHITECTURE, "i386")


def node_config(path: Path = SLOTS) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def catalogue(root: Path = TEMPLATES) -> dict[str, dict[str, Any]]:
    """{template name: template.json} of the templates baked into this firmware."""
    out = {}
    for path in sorted(root.glob("*/template.json")):
        out[path.parent.name] = json.loads(path.read_text())
    return out


def slot_object_id(node_id: str, eid: int) -> str:
    """Node 31000040010, slot 2 -> 31000040275 (the source document's scheme)."""
    return f"{node_id[:-3]}{eid}75"


def volume_name(eid: int, iid: int) -> str:
    return f"slot{eid}-{iid}"


def container_name(eid: int) -> str:
    return f"slot{eid}"


def slot_ids(eid: int) -> int:
    """The node's id of root in slot EID (user and group): 1000000, 1065536, ..."""
    return 1_000_000 + eid * SLOT_IDS


def slot_mounts(eid: int) -> Path:
    """The directory of slot EID's volumes as the node mounts them."""
    return SLOT_MOUNTS / container_name(eid)


def slot_mount(eid: int, iid: int) -> Path:
    return slot_mounts(eid) / f"volume{iid}"


def volume_target(kind: str, iid: int) -> str:
    """Where an lxc slot has volume IID, relative to its root: an lxc-service's volume 0 is
    its /var; every other is /srv/volume<iid> (an lxc-system's volume 0 is its root). The
    build makes these directories in the CBIOS root, which lxc-service slots share: LXC binds
    an idmapped volume only onto a directory that is there, on the root's own file system."""
    return "var" if iid == 0 and kind == "lxc-service" else f"srv/volume{iid}"


FURTHER_VOLUMES = range(1, 10)  # the iids of VOLUME_NAME past 0

# CB-Manager's store of compute-node firmware (`slot image add`): its volume IMAGE_STORE_IID,
# one directory PROFILE/VERSION per image holding STORE_FILES: what `cbios release` puts in a
# release, in this order (the signed manifest first, root.img last), and what a node booted
# over the network asks for.
IMAGE_STORE_IID = 1
STORE_FILES = (MANIFEST, SIGNATURE, "boot.ipxe", "grub.cfg", "vmlinuz", "initrd.img", "root.img")
# What a node booted over the network does: boot.ipxe's cbios-mode (`cbios pxe serve --mode`,
# a boot-server slot's per-node choice).
BOOT_MODES = ("boot", "update", "install", "diskless")
IMAGE_STORE = Path("/") / volume_target("lxc-service", IMAGE_STORE_IID)  # in CB-Manager's container
# A slot whose template says image_store (a boot server) has the store read-only here (in its
# root), mounted on the node beside its volumes; its receipts are on its volume 0 (its /var).
STORE_TARGET = "srv/images"
STORE_MOUNT = "image-store"  # in slot_mounts(eid), beside its volumes
BOOT_RECEIPTS = "lib/cbios-boot-server/receipts"


OBJECT_ID = re.compile(r"[0-9]{11}")  # a node's or a slot's; fullmatch


def parse_object_id(node_id: str, text: str) -> tuple[str, int | None]:
    """('node', None) for this node's ObjectID, ('slot', eid) for one of its slots.
    ValueError for anything else, with a message for the person who typed it."""
    if not OBJECT_ID.fullmatch(text):
        raise ValueError(f"'{text}' is not an ObjectID (11 digits, e.g. {node_id})")
    if text == node_id:
        return "node", None
    if text[:-3] == node_id[:-3] and text.endswith("75"):
        return "slot", int(text[-3])
    raise ValueError(f"{text}: not this node ({node_id}) nor one of its slots")


def version_text(template: dict[str, Any]) -> str:
    """The Version column: '0.901.25.28 2010-09-10'."""
    released = template.get("released")
    return f"{template['version']} {released}" if released else str(template["version"])
