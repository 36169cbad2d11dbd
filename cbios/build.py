"""The build of one profile: render, mkosi (initrd, then root), root.img, manifest.

Artifacts are made in a staging folder and published together at the end, manifest
last: a build that fails leaves no artifact that looks finished, and the previous
build's artifacts, if any, stay consistent with their manifest."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cbios import __version__, image, manifest, mkosi, signing, vmimage
from cbios.artifacts import ARTIFACTS, WORK, out_dir
from cbios.errors import StepError
from cbios.profile import Profile, parse_size, profile_hash
from cbios.profile import template as slot_template
from cbios.project import Project
from cbios.pxe.bundle import PXE_DIR, make_bundle
from cbios.render import (
    add_files,
    add_node_package,
    architecture,
    boot_files,
    disk_layout,
    mkosi_configs,
    network_files,
    render_overlays,
    slot_image_configs,
    write_tree,
)
from cbios.run import run

log = logging.getLogger("cbios")



@dataclass(frozen=True)
class BuildDirs:
    out: Path  # build/NAME: the published artifacts
    work: Path  # build/NAME/work: rendered configuration, mkosi outputs, logs

    @classmethod
    def of(cls, project: Project, profile: Profile) -> BuildDirs:
        out = out_dir(project, profile)
        return cls(out=out, work=out / WORK)

    @property
    def staging(self) -> Path:
        return self.work / "staging"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def outputs(self) -> Path:
        """mkosi's outputs, a folder per image."""
        return self.work / "out"


def build(project: Project, profile: Profile, *, force: bool = False) -> Path:
    """Build PROFILE; return build/NAME. Skips all work when nothing changed."""
    dirs = BuildDirs.of(project, profile)
    dirs.work.mkdir(parents=True, exist_ok=True)
    configs = mkosi_configs(project, profile)
    configs["boot"] = boot_files(project, profile)
    slot_configs = slot_image_configs(project, profile)
    configs.update({f"slot-{name}": files for name, files in slot_configs.items()})
    overlay = dirs.work / "overlay"
    render_overlays(project, profile, overlay)
    add_files(network_files(project, profile), overlay)
    slot_template.bake(project, profile, overlay)
    add_node_package(overlay)
    key = signing.key_of(project, profile)
    public = signing.public_key(key)
    # The initrd's flasher checks what it writes with the same key as the root.
    initrd_extra = dirs.work / "initrd-extra"
    shutil.rmtree(initrd_extra, ignore_errors=True)
    for tree in (overlay, initrd_extra):
        (tree / signing.NODE_KEY).parent.mkdir(parents=True, exist_ok=True)
        (tree / signing.NODE_KEY).write_bytes(public)
    inputs = _inputs_digest(project, profile, configs, overlay)
    if not force and _up_to_date(dirs.out, inputs):
        log.info("‣ %s %s is up to date (%s)", profile.name, profile.version, project.display(dirs.out))
        if not (dirs.out / PXE_DIR / manifest.MANIFEST).is_file():
            make_bundle(dirs.out)
        return dirs.out

    start = time.monotonic()
    shutil.rmtree(dirs.staging, ignore_errors=True)
    dirs.staging.mkdir(parents=True)
    dirs.logs.mkdir(parents=True, exist_ok=True)
    sde = _source_date_epoch(project)

    images = {}
    for name in ("initrd", "root"):
        files = configs[name]
        write_tree(files, dirs.work / "mkosi" / name)
        images[name] = mkosi.MkosiImage(
            name=name,
            config_dir=dirs.work / "mkosi" / name,
            output_dir=dirs.outputs / name,
            cache_dir=cache_dir(project, name, files),
            package_cache_dir=package_cache_dir(project, slot_template.NODE_ARCHITECTURE),
        )
    mkosi.build(images["initrd"], log_file=dirs.logs / "initrd.log",
                extra_trees=[project.initrd / "tree", initrd_extra], source_date_epoch=sde)
    initrd_cpio = images["initrd"].output_dir / "initrd.cpio.zst"
    slot_trees = _slot_images(project, profile, dirs, slot_configs, sde)
    mkosi.build(images["root"], log_file=dirs.logs / "root.log", extra_trees=[overlay],
                initrds=[initrd_cpio], source_date_epoch=sde)

    root_out = images["root"].output_dir
    tree = root_out / "root"
    _expect(root_out / "root.vmlinuz", "mkosi root", "no kernel in the image: is kernel.package installed?")
    _expect(root_out / "root.initrd", "mkosi root", "mkosi produced no initrd")
    shutil.copy2(root_out / "root.vmlinuz", dirs.staging / "vmlinuz")
    image.recompress_initrd(root_out / "root.initrd", [initrd_cpio], dirs.staging / "initrd.img",
                            project.cache / "initrd-xz")
    image.finish_tree(tree, profile, dirs.staging / "vmlinuz", dirs.staging / "initrd.img")
    slot_images = _place_slot_images(slot_trees, tree)
    slot_images.update(_vm_images(project, profile, dirs, tree))
    root_verity = image.make_root_img(tree, dirs.staging / "root.img", dirs.logs / "image.log", sde)
    size = (dirs.staging / "root.img").stat().st_size
    if size > parse_size(profile.storage.root_size):
        raise StepError("root.img", f"{size >> 20} MiB does not fit in storage.root_size "
                        f"({profile.storage.root_size}): raise it, or trim packages and modules")
    for name, text in configs["boot"].items():
        (dirs.staging / name).write_text(text)

    data = {
        "format": manifest.FORMAT,
        "profile": profile.name,
        "version": profile.version,
        "test": profile.test,  # the public test key, maybe a back door: never for real nodes
        "architecture": architecture(),
        "boot": {"tries": profile.boot.tries, "ready_timeout": profile.boot.ready_timeout},
        "profile_sha256": profile_hash(profile),
        "inputs_sha256": inputs,
        "cbios_version": __version__,
        "kernel": _kernel_version(tree),
        "root_format": "squashfs",
        # What the node opens root.img with (cbios/node/boot/verity.py): the flasher and `cbios
        # update` put it in the boot state, the boot loader on the kernel command line.
        "verity": {"root_hash": root_verity.root_hash, "data_blocks": root_verity.data_blocks,
                   "hash_offset": root_verity.hash_offset, "param": root_verity.param},
        # The node's disk, for the flasher: signed data, never code.
        "layout": disk_layout(project, profile),
        "node": {"object_id": profile.node.object_id, "hostname": profile.node.hostname},
        "slots": [
            {"template": s.template, "eid": s.eid, "object_id": profile.slot_object_id(s.eid)}
            for s in profile.slots
        ],
        "slot_templates": {name: {"type": t.type, "version": t.version, "architecture": t.architecture}
                           for name, t in slot_template.templates_of(project, profile).items()},
        "packages": {
            "root": mkosi.packages(root_out / "root.manifest"),
            "initrd": mkosi.packages(images["initrd"].output_dir / "initrd.manifest"),
        },
        "slot_images": slot_images,
        "artifacts": manifest.describe(dirs.staging, ARTIFACTS),
        "build_seconds": round(time.monotonic() - start, 1),
    }
    _publish(dirs, data, key)
    make_bundle(dirs.out)
    _drop_trees(dirs.outputs)
    log.info("‣ Built %s %s in %.0f s: %s", profile.name, profile.version,
             time.monotonic() - start, project.display(dirs.out))
    return dirs.out


def cache_dir(project: Project, name: str, files: dict[str, str]) -> Path:
    """mkosi's incremental cache of one image, keyed by its rendered configuration without
    comments and host name: profiles that install the same packages share it (a second
    node's profile is a warm build), and different ones never overwrite each other's."""
    h = hashlib.sha256()
    for path, text in sorted(files.items()):
        kept = [line for line in text.splitlines() if not line.startswith(("#", "Hostname="))]
        h.update(f"{path}\0{chr(10).join(kept)}\0".encode())
    return project.cache / "mkosi" / f"{name}-{h.hexdigest()[:16]}"


def package_cache_dir(project: Project, architecture: str) -> Path:
    """Downloaded packages and the archive's indexes, one cache an architecture (as mkosi keys
    its own default): an i386 image's apt never reads the amd64 indexes, nor the node's the i386."""
    if architecture == slot_template.NODE_ARCHITECTURE:
        return project.cache / "packages"
    return project.cache / f"packages-{architecture}"


def _slot_images(project: Project, profile: Profile, dirs: BuildDirs,
                 configs: dict[str, dict[str, str]], sde: int | None) -> dict[str, Path]:
    """Each lxc-system template's root file system, built by mkosi: {name: its tree}."""
    templates = slot_template.templates_of(project, profile)
    trees: dict[str, Path] = {}
    for name, files in configs.items():
        write_tree(files, dirs.work / "mkosi" / f"slot-{name}")
        img = mkosi.MkosiImage(
            name=f"slot {name}",
            config_dir=dirs.work / "mkosi" / f"slot-{name}",
            output_dir=dirs.outputs / f"slot-{name}",
            cache_dir=cache_dir(project, f"slot-{name}", files),
            package_cache_dir=package_cache_dir(project, templates[name].architecture),
        )
        mkosi.build(img, log_file=dirs.logs / f"slot-{name}.log", source_date_epoch=sde)
        _check_room(profile, templates[name], name, image.ext4_size(img.output_dir / name, 16 << 20))
        trees[name] = img.output_dir / name
    return trees


def _drop_trees(outputs: Path) -> None:
    """mkosi's directory outputs (the root's and the lxc-system slots' trees), once root.img
    holds them: a gigabyte or more per profile, that mkosi makes again from its cache on the
    next build. Its files (initrd, kernel, manifests) stay."""
    try:
        for out in (p for p in outputs.iterdir() if p.is_dir()):
            for path in out.iterdir():
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
    except OSError as e:  # the build is published whole already: this only costs disk
        log.warning("‣ %s: mkosi's trees not removed (%s)", outputs, e)


def _place_slot_images(trees: dict[str, Path], tree: Path) -> dict[str, dict[str, object]]:
    """The lxc-system trees into the root's slot-images/ (contract.IMAGES): the squashfs stores
    each of their files that the root has too (nearly all of a Debian system) once."""
    described: dict[str, dict[str, object]] = {}
    for name, src in trees.items():
        target = tree / slot_template.NODE_IMAGES / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        run(["cp", "-a", "--reflink=auto", src, target], step=f"slot {name}")
        described[name] = {"format": "tree", "unpacked_bytes": image.ext4_size(target, 16 << 20),
                           "packages": mkosi.packages(src.parent / f"{name}.manifest")}
    return described


def _vm_images(project: Project, profile: Profile, dirs: BuildDirs, tree: Path) -> dict[str, dict[str, object]]:
    """Each kvm-system template's system disk, made from the root just built (its kernel,
    its modules, its static busybox), as a tree in that root beside the other slot images."""
    described: dict[str, dict[str, object]] = {}
    for name, template in slot_template.templates_of(project, profile).items():
        if template.type != "kvm-system":
            continue
        target = tree / slot_template.NODE_IMAGES / name
        size = vmimage.make_system_disk(name, template, project.slot_templates / name, tree, dirs.staging / "vmlinuz",
                                        dirs.work / "vm" / name, target, dirs.logs / f"slot-{name}.log")
        _check_room(profile, template, name, size)
        described[name] = {"format": "tree", "unpacked_bytes": size, "packages": {}}
    return described


def _check_room(profile: Profile, template: slot_template.SlotTemplate, name: str, size: int) -> None:
    """The image must fit volume 0: the template's, and every one the profile sets for it."""
    room = min(parse_size(v.size) for v in template.volumes if v.iid == 0)
    room = min([room, *(parse_size(v.size) for s in profile.slots if s.template == name
                        for v in s.volumes if v.iid == 0)])
    if size > room:
        raise StepError(f"slot {name}", f"its image ({size >> 20} MiB) does not fit its volume 0 "
                        f"({room >> 20} MiB): raise the volume's size")


def _publish(dirs: BuildDirs, data: dict[str, object], key: Path) -> None:
    """Artifacts into OUT; the manifest and its signature last: a build cut off before has none.
    Nothing changes a file once it is signed: the node disk keeps its record in disk.json."""
    manifest.write(dirs.staging / manifest.MANIFEST, data)
    signing.sign(key, dirs.staging / manifest.MANIFEST)
    (dirs.out / manifest.MANIFEST).unlink(missing_ok=True)
    (dirs.out / manifest.SIGNATURE).unlink(missing_ok=True)
    for name in ("disk.qcow2", "disk.json", "root.img.zst", "disk.conf"):  # the previous firmware's
        (dirs.out / name).unlink(missing_ok=True)
    for name in ARTIFACTS:
        os.replace(dirs.staging / name, dirs.out / name)
    artifacts: dict[str, dict[str, object]] = data["artifacts"]  # type: ignore[assignment]
    (dirs.out / manifest.SUMS).write_text("".join(f"{m['sha256']}  {n}\n" for n, m in sorted(artifacts.items())))
    os.replace(dirs.staging / manifest.SIGNATURE, dirs.out / manifest.SIGNATURE)
    os.replace(dirs.staging / manifest.MANIFEST, dirs.out / manifest.MANIFEST)


def _up_to_date(out: Path, inputs: str) -> bool:
    path = out / manifest.MANIFEST
    if not path.is_file() or not (out / manifest.SIGNATURE).is_file():
        return False
    try:
        data = manifest.read(path)
    except (OSError, ValueError):
        return False
    if data.get("inputs_sha256") != inputs:
        return False
    return all((out / n).is_file() and (out / n).stat().st_size == m["size"]
               for n, m in data["artifacts"].items())


def _inputs_digest(project: Project, profile: Profile, configs: dict[str, dict[str, str]],
                   overlay: Path) -> str:
    """Everything a build depends on: the profile, the rendered configuration, the trees, the code."""
    h = hashlib.sha256()
    h.update(json.dumps({"cbios": __version__, "profile": profile_hash(profile), "configs": configs},
                        sort_keys=True).encode())
    for tree in (overlay, project.initrd / "tree", overlay.parent / "initrd-extra"):
        for path in sorted(tree.rglob("*")):
            st = path.lstat()
            h.update(f"{path.relative_to(tree)}\0{st.st_mode:o}\0".encode())
            if path.is_symlink():
                h.update(os.readlink(path).encode())
            elif path.is_file():
                h.update(manifest.sha256_file(path).encode())
    h.update(Path(image.__file__).read_bytes())
    return h.hexdigest()


def _source_date_epoch(project: Project) -> int | None:
    """$SOURCE_DATE_EPOCH, else the time of the checkout's last commit."""
    if env := os.environ.get("SOURCE_DATE_EPOCH"):
        return int(env)
    try:
        out = subprocess.run(["git", "-C", str(project.root), "log", "-1", "--format=%ct"],
                             capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return None
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def _kernel_version(tree: Path) -> str:
    versions = sorted(p.name for p in (tree / "usr/lib/modules").iterdir() if p.is_dir())
    return versions[-1] if versions else ""


def _expect(path: Path, step: str, reason: str) -> None:
    if not path.is_file():
        raise StepError(step, reason)
