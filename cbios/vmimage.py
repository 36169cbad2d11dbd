"""The system disk of a kvm-system slot: a compute node's image, booted as a VM.

Made from the root the build has just made, so the VM runs the firmware's own kernel:
boot/vmlinuz; boot/initrd.img, a cpio of the template's vm/ tree, a static busybox and the
kernel modules the template names (with what they need, in load order, listed in
lib/modules/load); boot/cmdline. An ext4 image of that, which CB-Executor writes to the
slot's volume 0 at install and reads the kernel from at every start."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from cbios import image
from cbios.errors import StepError
from cbios.profile.template import SlotTemplate

BUSYBOX = ("usr/bin/busybox", "bin/busybox")
PT_INTERP = 3


def module_paths(modules_dep: str, wanted: list[str]) -> list[str]:
    """modules.dep's paths of WANTED (names, '-' and '_' alike), each after what it needs."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        path, sep, rest = line.partition(":")
        if not sep:
            continue
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    order: list[str] = []

    def add(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            add(dep)
        order.append(path)

    for name in wanted:
        found = by_name.get(name.replace("-", "_"))
        if found is None:
            raise KeyError(name)
        add(found)
    return order


def _module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def is_static(path: Path) -> bool:
    """An ELF executable with no program interpreter: it runs with no libraries beside it."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            p_type, = struct.unpack("<I", f.read(4))
            if p_type == PT_INTERP:
                return False
    return True


def make_system_disk(name: str, template: SlotTemplate, template_dir: Path, tree: Path, kernel: Path,
                     work: Path, disk: Path, log_file: Path) -> int:
    """NAME's system disk, the tree DISK; the bytes an ext4 of it takes."""
    assert template.vm is not None
    step = f"slot {name}"
    busybox = next((tree / p for p in BUSYBOX if (tree / p).is_file() and not (tree / p).is_symlink()), None)
    if busybox is None or not is_static(busybox):
        raise StepError(step, "its image needs a static busybox in the root: add busybox-static to the "
                        "template's packages (it replaces busybox)")
    kdirs = sorted((tree / "usr/lib/modules").glob("*/modules.dep"))
    if len(kdirs) != 1:
        raise StepError(step, f"expected one kernel's modules in the root, found {len(kdirs)}")
    kdir = kdirs[0].parent
    try:
        modules = module_paths(kdirs[0].read_text(), template.vm.modules)
    except KeyError as e:
        raise StepError(step, f"kernel module {e.args[0]} is not in the root (kernel.modules of the profile)") \
            from None

    shutil.rmtree(work, ignore_errors=True)
    initrd = work / "initrd"
    shutil.copytree(template_dir / "vm", initrd, symlinks=True)
    for d in ("bin", "proc", "sys", "dev", "lib/modules"):
        (initrd / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, initrd / "bin/busybox")
    (initrd / "bin/sh").symlink_to("busybox")
    for rel in modules:
        target = initrd / "lib/modules" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(kdir / rel, target)
    (initrd / "lib/modules/load").write_text("".join(f"{rel}\n" for rel in modules))

    shutil.rmtree(disk, ignore_errors=True)
    (disk / "boot").mkdir(parents=True)
    for d in ("etc/cbios", "var/lib/compute"):
        (disk / d).mkdir(parents=True)
    shutil.copy2(kernel, disk / "boot/vmlinuz")
    (disk / "boot/cmdline").write_text(template.vm.cmdline + "\n")
    files = sorted(str(p.relative_to(initrd)) for p in initrd.rglob("*"))
    with (disk / "boot/initrd.img").open("wb") as cpio, log_file.open("a") as log:
        # Not compressed: under nested TCG the kernel would spend longer unpacking it than reading it.
        proc = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "--reproducible", "-R", "0:0"],
                              input="\n".join(files).encode(), cwd=initrd, stdout=cpio, stderr=log, check=False)
    if proc.returncode != 0:
        raise StepError(step, f"cpio of its initrd failed (see {log_file})")
    shutil.rmtree(work, ignore_errors=True)
    return image.ext4_size(disk, 8 << 20)
