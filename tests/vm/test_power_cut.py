"""A sample of the power-cut trials (`invoke bench --power-cuts N` runs many, in every phase):
QEMU killed at a random moment of an install; powered on again, the flasher installs again by
itself, and the node boots to ready on a committed copy. (A cut in the middle of an update is
in test_update.py.) The moment is random by design: every moment must be survivable."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import pytest

from cbios import powercut
from cbios.profile import Profile
from cbios.project import Project

log = logging.getLogger("cbios")


@pytest.fixture(scope="module")
def site(vm_project: Project, profile: Profile, built: Path, node_disk: Path) -> powercut.Site:
    return powercut.Site(vm_project, profile, built, node_disk, built / "work" / "vm-power-cuts")


@pytest.mark.parametrize("phase", ["install"])  # first-boot and update: invoke bench --power-cuts
def test_a_power_cut_at_a_random_moment_is_survived(site: powercut.Site, phase: str, tmp_path: Path) -> None:
    seed = time.time_ns()
    log.info("power cut %s: seed %d", phase, seed)
    t = powercut.TRIALS[phase](site, tmp_path, random.Random(seed), powercut.LENGTHS[phase])
    assert t.recovered, f"cut after {t.cut_after_s:.1f} s (seed {seed}): {t.detail}"
