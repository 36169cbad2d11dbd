"""Jinja2 rendering: mkosi configuration from a profile, and overlays into one tree.

Undefined names are errors (StrictUndefined), so a typo in a template fails the build
instead of rendering an empty string."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jinja2

from cbios.errors import StepError
from cbios.profile import Profile, parse_size
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


def context(profile: Profile) -> dict[str, Any]:
    """What templates see: the profile, and a few values derived from it."""
    root = next((u for u in profile.users if u.name == "root"), None)
    return {
        "profile": profile,
        "packages": sorted({profile.kernel.package, *profile.packages}),
        "root_password": root.password_hash if root else None,
        "ssh_keys": {u.name: u.ssh_keys for u in profile.users},
        "dist": profile.distribution,
        "vg": profile.storage.vg,
        "cmdline": " ".join(profile.kernel.cmdline),
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
    ctx = context(profile)
    sources = render_string(env, "mkosi/sources.j2", ctx)
    pkgmngr = "mkosi.pkgmngr/etc/apt/sources.list.d/mkosi.sources"
    return {
        "initrd": {"mkosi.conf": render_string(env, "initrd/mkosi.conf.j2", ctx), pkgmngr: sources},
        "root": {"mkosi.conf": render_string(env, "mkosi/root.conf.j2", ctx), pkgmngr: sources},
    }


def boot_files(project: Project, profile: Profile) -> dict[str, str]:
    """What the flasher puts beside the firmware: GRUB's configuration and the disk layout."""
    env = environment(project)
    ctx = context(profile)
    return {
        "grub.cfg": render_string(env, "grub/grub.cfg.j2", ctx),
        "disk.conf": render_string(env, "disk.conf.j2", ctx),
    }


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
    (target / "node").mkdir(parents=True)
    shutil.copy2(package / "__init__.py", target / "__init__.py")
    for source in sorted((package / "node").glob("*.py")):
        shutil.copy2(source, target / "node" / source.name)


def _replace(target: Path) -> None:
    if target.is_symlink() or target.exists():
        target.unlink()
