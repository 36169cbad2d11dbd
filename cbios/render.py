"""Jinja2 rendering: mkosi configuration from a profile, and overlays into one tree.

Undefined names are errors (StrictUndefined), so a typo in a template fails the build
instead of rendering an empty string."""

from __future__ import annotations

import compileall
import os
import platform
import py_compile
import shutil
from pathlib import Path
from typing import Any

import jinja2

from cbios.errors import StepError
from cbios.node import contract
from cbios.node.boot import bootenv
from cbios.profile import Profile, parse_size
from cbios.profile import template as slot_template
from cbios.project import Project

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE_SUFFIX = ".j2"


def environment(project: Project) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([TEMPLATES, project.root]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["size"] = parse_size
    return env


ARCHITECTURES = {"x86_64": "x86-64", "aarch64": "arm64"}  # uname -m -> mkosi's names


def architecture() -> str:
    """The firmware's architecture: mkosi builds for the build machine's."""
    machine = platform.machine()
    return ARCHITECTURES.get(machine, machine)


# What the CBIOS initrd itself needs of every kernel, beside what a profile names: the
# firmware is a squashfs image read through dm-verity; the flasher loop-mounts slot images.
INITRD_MODULES = ["fs/squashfs", "drivers/md/dm-mod", "drivers/md/dm-verity", "drivers/md/dm-bufio",
                  "drivers/block/loop"]


def context(profile: Profile, extra_packages: list[str] | None = None) -> dict[str, Any]:
    """What templates see: the profile, and a few values derived from it. EXTRA_PACKAGES:
    what the profile's lxc-service slots need in the root they share."""
    root = next((u for u in profile.users if u.name == "root"), None)
    return {
        "profile": profile,
        "packages": sorted({profile.kernel.package, *profile.packages, *(extra_packages or [])}),
        "initrd_modules": [*profile.kernel.initrd_modules,
                           *(m for m in INITRD_MODULES if m not in profile.kernel.initrd_modules)],
        "root_password": root.password_hash if root else None,
        "ssh_keys": {u.name: u.ssh_keys for u in profile.users},
        "dist": profile.distribution,
        "vg": profile.storage.vg,
        "architecture": architecture(),
        "cmdline": " ".join(profile.kernel_cmdline()),
        "bootenv_keys": " ".join(bootenv.GRUB_KEYS),
        "manager_user": contract.MANAGER_USER,
        "executor_socket": str(contract.EXECUTOR_SOCKET),
        "manager_ids": contract.slot_ids(contract.MANAGER_EID),
        "sizes": {
            "boot": parse_size(profile.storage.boot_size),
            "root": parse_size(profile.storage.root_size),
            "var": parse_size(profile.storage.var_size),
            "swap": parse_size(profile.storage.swap_size),
        },
    }


def render_string(env: jinja2.Environment, name: str, ctx: dict[str, Any]) -> str:
    try:
        return env.get_template(name).render(ctx)
    except jinja2.TemplateError as e:
        where = getattr(e, "filename", None) or name
        line = getattr(e, "lineno", None)
        raise StepError("render", f"{where}{':' + str(line) if line else ''}: {e.message}") from e


def mkosi_configs(project: Project, profile: Profile) -> dict[str, dict[str, str]]:
    """The rendered mkosi configuration of each image: {image: {relative path: text}}."""
    env = environment(project)
    ctx = context(profile, slot_template.packages(slot_template.templates_of(project, profile)))
    sources = render_string(env, "mkosi/sources.j2", ctx)
    pkgmngr = "mkosi.pkgmngr/etc/apt/sources.list.d/mkosi.sources"
    return {
        "initrd": {"mkosi.conf": render_string(env, "initrd/mkosi.conf.j2", ctx), pkgmngr: sources},
        "root": {"mkosi.conf": render_string(env, "mkosi/root.conf.j2", ctx), pkgmngr: sources},
    }


def slot_image_configs(project: Project, profile: Profile) -> dict[str, dict[str, str]]:
    """mkosi configuration of each lxc-system template's image: {template: {path: text}}."""
    env = environment(project)
    ctx = context(profile)
    sources = render_string(env, "mkosi/sources.j2", ctx)
    out = {}
    for name, template in slot_template.templates_of(project, profile).items():
        if template.type != "lxc-system":
            continue
        out[name] = {
            "mkosi.conf": render_string(env, "mkosi/slot.conf.j2", {
                **ctx, "template": name, "slot_architecture": template.architecture,
                "mkosi_architecture": slot_template.ARCHITECTURES[template.architecture]}),
            "mkosi.conf.d/50-template.conf": (project.slot_templates / name / "mkosi.conf").read_text(),
            "mkosi.pkgmngr/etc/apt/sources.list.d/mkosi.sources": sources,
            **_template_extra(project.slot_templates / name / "mkosi.extra"),
        }
    return out


def _template_extra(tree: Path) -> dict[str, str]:
    """A template's mkosi.extra/ (text files: units, presets, configuration), copied into its
    image by mkosi: {path: text}."""
    if not tree.is_dir():
        return {}
    return {f"mkosi.extra/{p.relative_to(tree)}": p.read_text() for p in sorted(tree.rglob("*")) if p.is_file()}


IPXE_MENU_TIMEOUT_MS = 10000  # then the menu's default: netboot, which changes nothing


def boot_files(project: Project, profile: Profile) -> dict[str, str]:
    """What travels beside the firmware: GRUB's configuration (for the flasher), and the
    iPXE script of the PXE bundle."""
    env = environment(project)
    ctx = context(profile)
    return {
        "grub.cfg": render_string(env, "grub/grub.cfg.j2", ctx),
        "boot.ipxe": render_string(env, "pxe/boot.ipxe.j2", {**ctx, "menu_timeout_ms": IPXE_MENU_TIMEOUT_MS}),
    }


def disk_layout(project: Project, profile: Profile) -> dict[str, Any]:
    """The node's disk as the flasher makes it (the manifest's "layout", signed): sizes in
    bytes, and every slot volume (/dev/mapper/<vg>-slot<eid>-<iid>) with how it is filled:
    image (an lxc-system's root, a kvm-system's system disk), seed (the template's volume/
    tree) or format (an empty ext4)."""
    templates = slot_template.templates_of(project, profile)
    volumes = []
    for s in slot_template.node_slots(profile, templates)["slots"]:
        for v in s["volumes"]:
            has_image = templates[s["template"]].type in ("lxc-system", "kvm-system")
            fill = "format" if v["iid"] else "image" if has_image else "seed"
            volumes.append({"name": f"slot{s['eid']}-{v['iid']}", "size": v["size"], "template": s["template"],
                            "fill": fill})
    return {"object_id": profile.node.object_id, "vg": profile.storage.vg, "tries": profile.boot.tries,
            **{f"{part}_size": size for part, size in context(profile)["sizes"].items()},
            "slot_volumes": volumes}


NETWORK_DIR = "etc/systemd/network"


def network_files(project: Project, profile: Profile) -> dict[str, str]:
    """systemd-networkd's configuration of the node: NICs named by MAC, the management
    VLAN on its parent NIC, and the bridge that holds the VLAN and the slots' veths."""
    env = environment(project)
    net = profile.network
    ctx = {**context(profile), "net": net, "vlan_name": f"vlan{net.vlan}"}
    files = {}
    for nic in net.nics:
        nctx = {**ctx, "nic": nic}
        files[f"{NETWORK_DIR}/10-cbios-{nic.name}.link"] = render_string(env, "network/nic.link.j2", nctx)
        files[f"{NETWORK_DIR}/20-cbios-{nic.name}.network"] = render_string(env, "network/nic.network.j2", nctx)
    if any(nic.name == net.vlan_parent for nic in net.nics):
        files[f"{NETWORK_DIR}/30-cbios-{ctx['vlan_name']}.netdev"] = render_string(env, "network/vlan.netdev.j2", ctx)
        files[f"{NETWORK_DIR}/30-cbios-{ctx['vlan_name']}.network"] = render_string(
            env, "network/vlan.network.j2", ctx)
    files[f"{NETWORK_DIR}/40-cbios-{net.bridge}.netdev"] = render_string(env, "network/bridge.netdev.j2", ctx)
    files[f"{NETWORK_DIR}/40-cbios-{net.bridge}.network"] = render_string(env, "network/bridge.network.j2", ctx)
    return files


def add_files(files: dict[str, str], dest: Path) -> None:
    for rel, text in sorted(files.items()):
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace(path)
        path.write_text(text)


def write_tree(files: dict[str, str], dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    for rel, text in sorted(files.items()):
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def render_overlays(project: Project, profile: Profile, dest: Path) -> None:
    """Copy the profile's overlays, in order, into DEST; '*.j2' files are rendered."""
    env = environment(project)
    ctx = context(profile)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in profile.overlays:
        src = project.overlays / name
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if path.is_dir() and not path.is_symlink():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.name.endswith(TEMPLATE_SUFFIX) and not path.is_symlink():
                target = target.with_name(path.name.removesuffix(TEMPLATE_SUFFIX))
                template = path.relative_to(project.root).as_posix()
                _replace(target)
                target.write_text(render_string(env, template, ctx))
                shutil.copymode(path, target)
            elif path.is_symlink():
                _replace(target)
                os.symlink(os.readlink(path), target)
            else:
                _replace(target)
                shutil.copy2(path, target)


NODE_PYTHON = "usr/lib/cbios/python"


def add_node_package(dest: Path) -> None:
    """The node-side code (cbios.node, standard library only) into the root's tree."""
    package = Path(__file__).parent
    target = dest / NODE_PYTHON / "cbios"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copy2(package / "__init__.py", target / "__init__.py")
    for source in sorted((package / "node").rglob("*.py")):
        dest_file = target / source.relative_to(package)
        dest_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest_file)
    # Compiled here: the root is read-only, so Python could not cache its bytecode there and
    # would compile every module at every start of CB-Executor, CB-Manager, cbios and slot.
    # Unchecked hashes: the files never change under it, and the build stays reproducible.
    # (The build machine's Python is bookworm's 3.11, as the root's; another version's files
    # would only be ignored.)
    compileall.compile_dir(target, quiet=1, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


def _replace(target: Path) -> None:
    if target.is_symlink() or target.exists():
        target.unlink()
