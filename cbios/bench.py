"""Figures, not assertions: build times (cold, warm, no-op), artifact sizes, boot time to ready."""

from __future__ import annotations

import json
import logging
import shutil
import time
from typing import Any

from cbios import manifest
from cbios.boot import kernel_boot_spec
from cbios.build import build
from cbios.machine import Machine
from cbios.profile import load_profile
from cbios.project import Project

log = logging.getLogger("cbios")


def _timed(fn: Any) -> float:
    start = time.monotonic()
    fn()
    return round(time.monotonic() - start, 1)


def run_bench(name: str, *, cold: bool) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    project = Project.find()
    profile = load_profile(project, name)
    figures: dict[str, Any] = {"profile": name, "version": profile.version}
    if cold:
        # Cold: no package cache, no incremental image.
        shutil.rmtree(project.cache / "packages", ignore_errors=True)
        shutil.rmtree(project.cache / "mkosi" / name, ignore_errors=True)
        figures["build_cold_s"] = _timed(lambda: build(project, profile, force=True))
    figures["build_warm_s"] = _timed(lambda: build(project, profile, force=True))
    figures["build_noop_s"] = _timed(lambda: build(project, profile))
    out = project.build / name
    data = manifest.read(out / manifest.MANIFEST)
    figures["sizes_bytes"] = {n: m["size"] for n, m in data["artifacts"].items()}
    with Machine(kernel_boot_spec(project, profile, out), out / "work" / "bench", name=name) as m:
        m.wait_ready(profile.qemu.ready_timeout)
        figures["boot_to_ready_s"] = round(m.uptime(), 1)
        figures["accel"] = m.spec.accel
        m.shutdown()
    path = out / "bench.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        print(f"{key:>16}: {value}")
    print(f"(written to {project.display(path)})")
    return figures
