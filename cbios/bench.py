"""Figures, not assertions: build times (cold, warm, no-op), artifact sizes, boot time to ready,\nPXE install time."""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cbios import image, lvm_layout, manifest, mkosi, powercut
from cbios.artifacts import DISK, WORK
from cbios.boot import disk_boot_spec, kernel_boot_spec
from cbios.build import build, cache_dir
from cbios.disk import FLASH_TIMEOUT, disk_size, make_disk, overlay, read_record
from cbios.errors import CbiosError
from cbios.machine import Machine
from cbios.profile import Profile, load_profile
from cbios.project import Project
from cbios.pxe.bundle import PXE_DIR
from cbios.pxe.lab import PxeLab
from cbios.render import TEMPLATES, context, environment, render_string, write_tree
from cbios.run import run

log = logging.getLogger("cbios")


def _timed(fn: Any) -> float:
    start = time.monotonic()
    fn()
    return round(time.monotonic() - start, 1)


def _slot_figures(m: Machine, profile: Profile, figures: dict[str, Any]) -> None:
    """`slot restart` of each slot but CB-Manager, timed on the node."""
    for slot in profile.slots:
        if slot.eid == 0:
            continue
        oid = profile.slot_object_id(slot.eid)
        out = m.succeed(f"s=$(date +%s.%N); slot restart {oid} >/dev/null; e=$(date +%s.%N); "
                        "python3 -c \"import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))\" $s $e",
                        timeout=300)
        figures[f"slot_restart_{slot.template}_s"] = float(out)


def _pxe_figures(project: Project, profile: Profile, out: Path, logdir: Path, figures: dict[str, Any]) -> None:
    """A blank disk installed over PXE (QEMU user networking, HTTP through guestfwd), then
    the bytes the flasher wrote (both copies) written again with dd in the same VM."""
    root_bytes = manifest.read(out / manifest.MANIFEST)["artifacts"]["root.img"]["size"]
    with tempfile.TemporaryDirectory(prefix="cbios-bench-pxe-") as tmp:
        disk = Path(tmp) / "node.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", disk, str(disk_size(project, profile))], step="qemu-img")
        with PxeLab(out / PXE_DIR, Path(tmp), mode="install", kernel_args="cbios.flash.done=poweroff") as lab:
            spec = disk_boot_spec(project, profile, out, disk, persist=True)
            spec.pxe, spec.boot = lab.netdev_options(), "once=n"
            with Machine(spec, logdir, name=f"{profile.name}-pxe-install") as m:
                log.info("  %s", m.wait_report(("FLASHED",), FLASH_TIMEOUT))
                figures["pxe_install_s"] = round(m.uptime(), 1)
                figures["pxe_install_flasher_s"] = lab.wait_receipt().get("seconds")
                figures["pxe_install_bytes_sent"] = lab.server.bytes_sent()  # kernel and initrd too
                figures["pxe_install_root_img_bytes_sent"] = lab.server.bytes_sent("root.img")  # the copy's
                m.wait_exit(120)
        # The bytes the flasher wrote (root.img, twice), written again with dd: twice into the
        # spare copy (the running one is mounted), read from the running one.
        vg = profile.storage.vg
        with Machine(disk_boot_spec(project, profile, out, disk, persist=True), logdir,
                     name=f"{profile.name}-pxe-installed") as m:
            m.wait_ready(profile.qemu.ready_timeout)
            seconds = m.succeed(
                f"s=$(date +%s.%N); for i in 1 2; do head -c {root_bytes} /dev/{vg}/root "
                f"| dd of=/dev/{vg}/root-spare bs=4M iflag=fullblock conv=fsync status=none; done; e=$(date +%s.%N); "
                "python3 -c 'import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))' $s $e",
                timeout=900)
            figures["dd_same_bytes_s"] = float(seconds)
            m.kill()


def baseline_image(project: Project, profile: Profile) -> tuple[Path, str]:
    """A stock Debian root (systemd, udev, dbus, kmod, iproute2, the profile's kernel) made
    into a root.img as CBIOS's is, so that the same kernel and initrd boot it the same way;
    its verity parameter. Built once, then from mkosi's cache."""
    env = environment(project)
    ctx = context(profile)
    files = {"mkosi.conf": render_string(env, "mkosi/baseline.conf.j2", ctx),
             "mkosi.pkgmngr/etc/apt/sources.list.d/mkosi.sources": render_string(env, "mkosi/sources.j2", ctx)}
    work = project.build / "bench-baseline"
    write_tree(files, work / "mkosi")
    img = mkosi.MkosiImage(name="baseline", config_dir=work / "mkosi", output_dir=work / "out",
                           cache_dir=cache_dir(project, "baseline", files),
                           package_cache_dir=project.cache / "packages")
    mkosi.build(img, log_file=work / "baseline.log", extra_trees=[TEMPLATES / "baseline"])
    verity = image.make_root_img(img.output_dir / "baseline", work / "root.img", work / "image.log", None)
    return work / "root.img", verity.param


def _boot_figures(project: Project, profile: Profile, out: Path, logdir: Path, figures: dict[str, Any],
                  boots: int) -> None:
    """Boot to ready of CBIOS beside a stock Debian root's boot to multi-user: same QEMU, same
    kernel and initrd (kernel_boot_spec), both root.img read through dm-verity. They boot in
    turn, BOOTS times each, so that both see the same load; the medians make the ratio."""
    cbios_spec = kernel_boot_spec(project, profile, out)
    baseline_spec = kernel_boot_spec(project, profile, out, root=baseline_image(project, profile))
    cbios_s: list[float] = []
    baseline_s: list[float] = []
    for _ in range(boots):
        with Machine(cbios_spec, logdir, name=profile.name) as m:
            m.wait_ready(profile.qemu.ready_timeout)
            cbios_s.append(round(m.uptime(), 1))
            figures["accel"] = m.spec.accel
            m.shutdown()
        with Machine(baseline_spec, logdir, name="baseline") as m:
            m.wait_ready(profile.qemu.ready_timeout)
            baseline_s.append(round(m.uptime(), 1))
            m.kill()
    cbios_median = figures["boot_to_ready_s"] = statistics.median(cbios_s)
    baseline_median = figures["baseline_boot_to_multi_user_s"] = statistics.median(baseline_s)
    figures["boot_to_ready_vs_baseline"] = round(cbios_median / baseline_median, 2)
    figures["boot_to_ready_each_s"] = cbios_s
    figures["baseline_boot_to_multi_user_each_s"] = baseline_s


def run_bench(name: str, *, cold: bool, power_cuts: int = 0, boots: int = 3) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if boots < 1:
        raise CbiosError(f"bench: --boots {boots}: at least one boot of each root is needed")
    project = Project.find()
    profile = load_profile(project, name)
    figures: dict[str, Any] = {"profile": name, "version": profile.version}
    if cold:
        # Cold: no package cache, no incremental image (they are shared between profiles).
        shutil.rmtree(project.cache / "packages", ignore_errors=True)
        shutil.rmtree(project.cache / "mkosi", ignore_errors=True)
        figures["build_cold_s"] = _timed(lambda: build(project, profile, force=True))
    figures["build_warm_s"] = _timed(lambda: build(project, profile, force=True))
    figures["build_noop_s"] = _timed(lambda: build(project, profile))
    out = project.build / name
    figures["disk_s"] = _timed(lambda: make_disk(project, profile, force=True))
    data = manifest.read(out / manifest.MANIFEST)
    figures["sizes_bytes"] = {n: m["size"] for n, m in data["artifacts"].items()}
    figures["sizes_bytes"][DISK] = (read_record(out) or {}).get("size")
    for name_, img in data.get("slot_images", {}).items():
        figures["sizes_bytes"][f"slot image {name_} (unpacked, on its volume)"] = img["unpacked_bytes"]
    logdir = out / WORK / "bench"
    _boot_figures(project, profile, out, logdir, figures, boots)
    with tempfile.TemporaryDirectory(prefix="cbios-bench-") as tmp:
        disk = overlay(out / DISK, Path(tmp) / "node.qcow2")
        spec = disk_boot_spec(project, profile, out, disk, persist=True)
        with Machine(spec, logdir, name=f"{name}-disk") as m:
            m.wait_ready(profile.qemu.ready_timeout)
            figures["disk_boot_to_ready_s"] = round(m.uptime(), 1)
            _slot_figures(m, profile, figures)
            m.shutdown()
        lvm_layout.overwrite(disk, lvm_layout.lv_offset(disk, profile.storage.vg, "root"), 64 << 10)
        with Machine(spec, logdir, name=f"{name}-broken-primary") as m:
            m.wait_ready(profile.qemu.ready_timeout)
            figures["broken_primary_to_ready_on_spare_s"] = round(m.uptime(), 1)
            m.shutdown()
    _pxe_figures(project, profile, out, logdir, figures)
    if power_cuts:
        figures["power_cuts"] = powercut.record(project, profile, out, powercut.PHASES, power_cuts)
    path = out / "bench.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        print(f"{key:>16}: {value}")
    print(f"(written to {project.display(path)})")
    return figures
