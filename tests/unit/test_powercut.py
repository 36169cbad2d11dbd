"""Where a power cut landed, read from what the cut node printed (cbios/powercut.py)."""

from __future__ import annotations

import pytest

from cbios.errors import CbiosError
from cbios.powercut import PHASES, STAGES, check_phases, landed

UPDATE = """\
cbios: manifest.json: signature good (/usr/share/cbios/signing.pub)
cbios: qemu-test 1.0.0 -> 1.0.0: 104 MiB
cbios: writing copy spare (/dev/lvm/root-spare)
cbios: writing copy spare: 52 of 104 MiB (50%)
"""

FIRST_BOOT = """\
[  301.2] systemd-shutdown[1]: Syncing filesystems and block devices.
CBIOS: booting copy spare (lvm/root-spare, state new)
[   98.1] health[545]: cbios: committed copy spare
"""


@pytest.mark.parametrize(("phase", "console", "stage"), [
    ("update", "", "fetching"),
    ("update", UPDATE, "writing the copy"),
    ("update", UPDATE + "cbios: reading copy spare back through dm-verity\n", "reading it back"),
    ("first-boot", FIRST_BOOT.splitlines()[0], "shutting down"),
    ("first-boot", "\n".join(FIRST_BOOT.splitlines()[:2]), "booting the new copy"),
    ("first-boot", FIRST_BOOT, "committed"),
    ("install", "[    1.2] Linux version 6.1.0", "booting the flasher"),
    ("install", "cbios-flash: writing both copies\ncbios-flash: slot volume slot1-0: service (image)\n",
     "filling slot volumes"),
])
def test_a_cut_is_placed_at_the_last_stage_its_console_shows(phase: str, console: str, stage: str) -> None:
    assert landed(phase, console) == stage


def test_every_phase_has_its_stages_from_its_start() -> None:
    assert set(STAGES) == set(PHASES)
    for stages in STAGES.values():
        assert stages[0][0] == ""  # the phase's start: reached by any console
        assert len({stage for _, stage in stages}) == len(stages)


def test_an_unknown_phase_is_named() -> None:
    with pytest.raises(CbiosError, match="no phase 'boot'"):
        check_phases(("update", "boot"))
