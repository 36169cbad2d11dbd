"""Slot templates (slot-templates/NAME/): what a slot is and how it is made.

A template is a directory:
  slot.yaml   what the slot is: type, version, description, packages, volumes, params;
  run         lxc-service: the one service, run as the container's PID 1;
  health      a check run inside the slot (by /bin/sh); exit 0 when the service serves;
  lxc.conf    optional: container configuration added to what CB-Executor writes
              (${eid}, ${volume0} ... substituted on the node);
  volume/     optional: the initial content of the slot's volume 0 (its /var);
  mkosi.conf  lxc-system: the image of the slot's own root file system;
  vm/         kvm-system: the VM's initrd (vm/init is its PID 1), made into its system
              disk with the node's kernel (cbios/vmimage.py); `health` runs on the node.

The build bakes the templates a profile uses into the root (as JSON, for the node's
standard-library code) with the profile's slots, resolved: slots.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

from cbios.errors import ProfileError
from cbios.node import contract, slotparams
from cbios.profile.model import Limits, Name, Profile, Size, SlotVolume, Strict, parse_size
from cbios.profile.yamlload import YamlError, format_path, load_yaml
from cbios.project import Project

SLOT_TYPES = ("lxc-service", "lxc-system", "kvm-system")
# A template's architecture (contract.ARCHITECTURES): mkosi's name of each.
NODE_ARCHITECTURE = contract.NODE_ARCHITECTURE
ARCHITECTURES = {NODE_ARCHITECTURE: "x86-64", "i386": "x86"}
MANAGER = contract.MANAGER_TEMPLATE
MANAGER_EID = contract.MANAGER_EID
# Where the node finds them (cbios/node/contract.py), relative to the root being built.
NODE_TEMPLATES = str(contract.TEMPLATES).lstrip("/")
NODE_SLOTS = str(contract.SLOTS).lstrip("/")
NODE_IMAGES = str(contract.IMAGES).lstrip("/")


class TemplateVolume(Strict):
    iid: Annotated[int, Field(ge=0, le=9)]
    size: Size


class TemplateParam(Strict):
    """A parameter: its type (cbios/node/slotparams.py) and its default."""

    type: str = Field(json_schema_extra={"enum": list(slotparams.TYPES)})
    default: str = Field(default="", description="empty: the template chooses")

    @pydantic.model_validator(mode="after")
    def _default_has_the_type(self) -> TemplateParam:
        if self.type not in slotparams.TYPES:
            raise ValueError(f"type '{self.type}' is none of {', '.join(slotparams.TYPES)}")
        slotparams.check(self.type, self.default, self.default)
        return self


class TemplateLimits(Strict):
    """What a slot of this template may use of the node, unless its profile says otherwise."""

    memory: Size = Field(default="512M", description="cgroup memory.max")
    pids: Annotated[int, Field(ge=contract.PIDS_MIN, le=contract.PIDS_MAX,
                               description="cgroup pids.max: processes and threads")] = 512


class VmSettings(Strict):
    """kvm-system: how CB-Executor runs the VM, and what its initrd holds."""

    memory: Annotated[int, Field(ge=64, le=65536, description="MiB")] = 256
    cpus: Annotated[int, Field(ge=1, le=64)] = 1
    cmdline: str = Field(default="console=ttyS0", pattern=r"^[^\n\x00]*$")
    modules: list[Annotated[str, Field(pattern=r"^[a-z0-9_-]+$")]] = Field(
        default=[], description="kernel modules the initrd loads, in this order (with what they need)")


class SlotTemplate(Strict):
    """slot.yaml."""

    type: Literal["lxc-service", "lxc-system", "kvm-system"]
    version: Annotated[str, Field(pattern=r"^\d+(\.\d+){0,3}$")]
    released: str | None = Field(default=None, pattern=r"^\d{4}-\d{2}-\d{2}$",
                                 description="release date, shown beside the version")
    description: str
    packages: list[Name] = Field(default=[], description="added to the CBIOS root: what an lxc-service slot "
                                 "runs from the root it shares, what the node needs to run a kvm-system slot")
    volumes: list[TemplateVolume] = Field(default_factory=lambda: [TemplateVolume(iid=0, size="16M")])
    address: Literal["required", "optional"] = "optional"
    architecture: str = Field(
        default=NODE_ARCHITECTURE, json_schema_extra={"enum": list(contract.ARCHITECTURES)},
        description="Debian's name; i386 for lxc-system only: an lxc-service slot runs from the node's root, "
        "a kvm-system VM boots the node's kernel")
    params: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")], TemplateParam] = Field(
        default={}, description="parameters a profile or `slot install` may set: their types and defaults")

    def param_defaults(self) -> dict[str, str]:
        return {k: p.default for k, p in self.params.items()}
    limits: TemplateLimits = Field(default_factory=TemplateLimits, description="lxc slots: memory and pids")
    privileged: str | None = Field(
        default=None, min_length=10, pattern=r"^[^\n\x00]*$",
        description="lxc slots: why this template's root must be the node's root (no user namespace); "
        "the exception, the reason stated for whoever reads the template")
    start_timeout: Annotated[int, Field(ge=1, le=600)] = 60
    stop_timeout: Annotated[int, Field(ge=1, le=300, description="s from the halt signal (the power button "
                                       "of a VM) to a kill")] = 30
    vm: VmSettings | None = Field(default=None, description="kvm-system: the VM")
    image_store: bool = Field(default=False, description="lxc-service: serves CB-Manager's store of compute "
                              "images, which it has read-only at /srv/images; its receipts are in show-runtime")

    @pydantic.field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        if value not in contract.ARCHITECTURES:
            raise ValueError(f"'{value}' is none of {', '.join(contract.ARCHITECTURES)}")
        return value


def available(project: Project) -> list[str]:
    return sorted(p.parent.name for p in project.slot_templates.glob("*/slot.yaml"))


def load_template(project: Project, name: str) -> SlotTemplate:
    path = project.slot_templates / name / "slot.yaml"
    shown = project.display(path)
    try:
        doc = load_yaml(path, shown)
        template = SlotTemplate.model_validate(doc.data)
    except YamlError as e:
        raise ProfileError([str(e)]) from None
    except pydantic.ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(err["loc"])
            line = next((doc.lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in doc.lines), 1)
            problems.append(f"{shown}:{line}: {format_path(loc) or '(top level)'}: {err['msg']}")
        raise ProfileError(problems) from None
    missing = [f for f in _required_files(template) if not (path.parent / f).is_file()]
    if template.type == "kvm-system" and template.vm is None:
        missing.append("a vm: section in slot.yaml")
    elif template.type != "kvm-system" and template.vm is not None:
        raise ProfileError([f"{shown}: vm: is for kvm-system templates, this one is {template.type}"])
    if template.image_store and template.type != "lxc-service":
        raise ProfileError([f"{shown}: image_store: is for lxc-service templates, this one is {template.type}"])
    if template.type == "kvm-system" and template.privileged is not None:
        raise ProfileError([f"{shown}: privileged: is for lxc templates: a VM has no root on the node"])
    if template.architecture != NODE_ARCHITECTURE and template.type == "lxc-service":
        raise ProfileError([f"{shown}: architecture: {template.architecture} is for lxc-system templates: an "
                            f"lxc-service slot runs from the node's root, so it is the node's ({NODE_ARCHITECTURE})"])
    if template.architecture != NODE_ARCHITECTURE and template.type == "kvm-system":
        raise ProfileError([f"{shown}: architecture: {template.architecture} is not supported for kvm-system "
                            f"templates: the VM boots the node's {NODE_ARCHITECTURE} kernel"])
    if missing:
        raise ProfileError([f"{project.display(path.parent)}: a {template.type} template needs "
                            f"{' and '.join(missing)}"])
    return template


def _required_files(template: SlotTemplate) -> list[str]:
    if template.type == "lxc-service":
        return ["run", "health"]
    if template.type == "lxc-system":
        return ["mkosi.conf", "health"]
    return ["vm/init", "health"]


def templates_of(project: Project, profile: Profile) -> dict[str, SlotTemplate]:
    return {name: load_template(project, name) for name in sorted({s.template for s in profile.slots})}


def slot_volumes(profile_volumes: list[SlotVolume], template: SlotTemplate) -> list[dict[str, int]]:
    """The profile's volumes where it names them, else the template's: [{iid, size}] in bytes."""
    chosen: list[SlotVolume] | list[TemplateVolume] = profile_volumes or template.volumes
    return sorted(({"iid": v.iid, "size": parse_size(v.size)} for v in chosen), key=lambda v: v["iid"])


def slot_limits(limits: Limits, template: SlotTemplate) -> dict[str, int]:
    """The profile's limits where it sets them, else the template's: memory in bytes, pids."""
    return {"memory": parse_size(limits.memory or template.limits.memory), "pids": limits.pids or template.limits.pids}


def packages(templates: dict[str, SlotTemplate]) -> list[str]:
    """What lxc-service slots need in the root they share, and what runs kvm-system slots."""
    return sorted({p for t in templates.values() if t.type in ("lxc-service", "kvm-system") for p in t.packages})


def node_slots(profile: Profile, templates: dict[str, SlotTemplate]) -> dict[str, Any]:
    """slots.json: the node, its network, and its slots resolved against their templates."""
    return {
        "node": {"object_id": profile.node.object_id, "hostname": profile.node.hostname},
        "vg": profile.storage.vg,
        "bridge": profile.network.bridge,
        "domain": profile.network.domain,
        "address": profile.network.address,
        "cluster": {
            "port": profile.cluster.port,
            "timeout": profile.cluster.timeout,
            "connect_timeout": profile.cluster.connect_timeout,
            "nodes": [n.model_dump() for n in profile.cluster.nodes if n.object_id != profile.node.object_id],
        },
        "slots": [
            {
                "eid": s.eid,
                "object_id": profile.slot_object_id(s.eid),
                "template": s.template,
                "address": s.address,
                "hostname": s.hostname,
                "autostart": s.autostart,
                "volumes": slot_volumes(s.volumes, templates[s.template]),
                "params": {**templates[s.template].param_defaults(), **s.params},
                "limits": slot_limits(s.limits, templates[s.template]),
            }
            for s in sorted(profile.slots, key=lambda s: s.eid)
        ],
    }


def node_template(name: str, template: SlotTemplate) -> dict[str, Any]:
    """template.json: slot.yaml as the node reads it, volume sizes in bytes."""
    data = {"name": name, **template.model_dump(mode="json")}
    data["volumes"] = [{"iid": v.iid, "size": parse_size(v.size)} for v in template.volumes]
    data["limits"] = slot_limits(Limits(), template)
    return data


def bake(project: Project, profile: Profile, dest: Path) -> None:
    """The profile's templates and slots into the root's tree at DEST."""
    templates = templates_of(project, profile)
    base = dest / NODE_TEMPLATES
    shutil.rmtree(base, ignore_errors=True)
    for name, template in templates.items():
        src = project.slot_templates / name
        target = base / name
        shutil.copytree(src, target, symlinks=True, ignore=shutil.ignore_patterns("slot.yaml"))
        (target / "template.json").write_text(json.dumps(node_template(name, template), indent=2, sort_keys=True)
                                              + "\n")
    for mount in [*(contract.volume_target("lxc-service", iid) for iid in contract.FURTHER_VOLUMES),
                  contract.STORE_TARGET]:  # mount points, in the root lxc-service slots share
        (dest / mount).mkdir(parents=True, exist_ok=True)
    (dest / NODE_SLOTS).parent.mkdir(parents=True, exist_ok=True)
    (dest / NODE_SLOTS).write_text(json.dumps(node_slots(profile, templates), indent=2) + "\n")
